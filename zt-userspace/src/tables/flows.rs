//! The flow table's answer flags after a reload: what the egress programs
//! judged while the maps were between a reload's halves, judged again.

use std::{collections::HashSet, net::IpAddr};

use aya::maps::{HashMap as BpfHashMap, MapError};
use zt_common::{FLOW_ANSWER, FlowKey, FlowState, map, proto};

use super::{Contents, Tables, TablesError, batch, map_err};

/// `bpf_map_update_elem`'s `BPF_EXIST`: update an entry, never create one
/// (a flow the kernel dropped meanwhile stays gone).
const BPF_EXIST: u64 = 2;

/// The interfaces the edge and the tunnel programs run on, by ifindex,
/// which the flow table's keys name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowInterfaces {
    pub edge: Option<u32>,
    pub tunnel: Option<u32>,
}

impl Tables {
    /// The keys of the UDP flows in the flow table now: what
    /// [`Self::judge_answers`] leaves alone after a reload.
    ///
    /// # Errors
    /// When the flow table cannot be read.
    pub fn udp_flows(&self) -> Result<HashSet<FlowKey>, TablesError> {
        let mut out = HashSet::new();
        self.each_flow(|key, _| {
            if key.protocol == proto::UDP {
                out.insert(*key);
            }
        })?;
        Ok(out)
    }

    /// Calls `each` with every entry of the flow table, read in batches.
    pub(super) fn each_flow(
        &self,
        each: impl FnMut(&FlowKey, &FlowState),
    ) -> Result<(), TablesError> {
        let name = map::FLOWS;
        let data = batch::data(self.get_ref(name)?).ok_or(TablesError::MissingMap { name })?;
        batch::for_each(data, each).map_err(|source| TablesError::Batch { name, source })
    }

    /// Marks as answers the UDP flows started since `before` was taken
    /// ([`Self::udp_flows`]) that answer `policy`, what the maps now hold:
    /// a datagram from one of the edge's `WireGuard` ports or UDP services
    /// to a source it admits (flows of `interfaces.edge`), or from a port
    /// the destination peer is granted (of `interfaces.tunnel`). The
    /// egress programs judge this once, when a flow starts, so that the
    /// flow admits nothing the policy stops admitting later. Between a
    /// reload's halves ([`Tables::replace`]) a service or peer whose bit
    /// or index changes is closed, and a flow started then is judged the
    /// host's own; judged again here, with the new policy in place, it is
    /// what it would have been had it started a moment later. Flows that
    /// were there before keep their judgement, as the programs keep it.
    /// Returns how many flows it marked.
    ///
    /// # Errors
    /// When the flow table cannot be read or written.
    pub fn judge_answers(
        &mut self,
        policy: &Contents,
        before: &HashSet<FlowKey>,
        interfaces: FlowInterfaces,
    ) -> Result<usize, TablesError> {
        let mut answers = Vec::new();
        self.each_flow(|key, state| {
            let on_edge = if Some(key.ifindex) == interfaces.edge {
                true
            } else if Some(key.ifindex) == interfaces.tunnel {
                false
            } else {
                return;
            };
            if key.protocol == proto::UDP
                && state.flags & FLOW_ANSWER == 0
                && !before.contains(key)
                && policy.answers(on_edge, key.local_port, remote(key))
            {
                answers.push(*key);
            }
        })?;
        let mut flows: BpfHashMap<_, FlowKey, FlowState> =
            BpfHashMap::try_from(self.get(map::FLOWS)?).map_err(map_err(map::FLOWS))?;
        let gone = |e: &MapError| match e {
            MapError::KeyNotFound => true,
            MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
            _ => false,
        };
        let mut marked = 0;
        for key in &answers {
            // Read again, so the mark keeps a refresh made since the walk;
            // one the programs make between this read and the write is
            // lost (the flow looks a moment older). A flow gone meanwhile
            // (expired, evicted) has nothing to mark.
            let state = match flows.get(key, 0) {
                Ok(state) => state,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(map_err(map::FLOWS)(e)),
            };
            let answer = FlowState {
                flags: state.flags | FLOW_ANSWER,
                ..state
            };
            match flows.insert(key, answer, BPF_EXIST) {
                Ok(()) => marked += 1,
                Err(e) if gone(&e) => {}
                Err(e) => return Err(map_err(map::FLOWS)(e)),
            }
        }
        Ok(marked)
    }
}

/// A flow's remote address.
fn remote(key: &FlowKey) -> IpAddr {
    if key.ip_version == 4 {
        let mut v4 = [0u8; 4];
        v4.copy_from_slice(&key.remote[..4]);
        IpAddr::from(v4)
    } else {
        IpAddr::from(key.remote)
    }
}
