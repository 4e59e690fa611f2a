//! [`Contents`]: what a policy puts in the maps, as plain data, and what
//! the programs decide from it where user space must judge as they do.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use zt_common::{FlowConfig, GrantKey, PeerInfo, capacity, proto, service_port_index};

use super::{
    LpmParts, Sources, TablesError, both_masks, check_peer_count, contains, flow_config,
    grant_words, peer_info, split_families,
};
use crate::policy::{EdgePolicy, FlowSettings, TunnelPolicy};

/// Everything a policy puts in the maps, as plain data: what a reload
/// reads from the running maps and computes from the new policy, in full,
/// before it writes anything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub(crate) udp_ports: Vec<u64>,
    /// The service mask of each entry of `map::SERVICE_PORTS` that has one.
    pub(crate) service_ports: BTreeMap<u32, u64>,
    /// The service sources, as the kernel looks them up.
    pub(crate) sources: Sources,
    pub(crate) peer_v4: BTreeMap<LpmParts<4>, PeerInfo>,
    pub(crate) peer_v6: BTreeMap<LpmParts<16>, PeerInfo>,
    pub(crate) grants: HashMap<GrantKey, u64>,
    pub(crate) flow_config: FlowConfig,
}

impl Contents {
    /// The service sources, as the kernel looks them up.
    #[must_use]
    pub fn sources(&self) -> &Sources {
        &self.sources
    }

    /// The peer owning `addr` by its longest prefix, as the tunnel
    /// program finds it.
    pub(crate) fn peer_of(&self, addr: IpAddr) -> Option<PeerInfo> {
        match addr {
            IpAddr::V4(a) => longest(&self.peer_v4, (a.octets(), 32)),
            IpAddr::V6(a) => longest(&self.peer_v6, (a.octets(), 128)),
        }
    }

    /// Whether peer `index` is granted `port` of `protocol`.
    pub(crate) fn granted(&self, index: u32, protocol: u8, port: u16) -> bool {
        let key = GrantKey {
            peer: index,
            protocol,
            _pad0: 0,
            word: port >> 6,
        };
        self.grants
            .get(&key)
            .is_some_and(|w| w & (1 << (port & 63)) != 0)
    }

    /// Whether the host's UDP datagram from `local_port` to `remote`
    /// answers this policy, as `zt_ebpf::flows::answers_policy` judges it:
    /// on the edge (`edge`), a `WireGuard` port, or a UDP service's port
    /// that admits `remote`; on the tunnel, a port the peer owning
    /// `remote` is granted.
    pub(crate) fn answers(&self, edge: bool, local_port: u16, remote: IpAddr) -> bool {
        if edge {
            let wireguard = self
                .udp_ports
                .get(usize::from(local_port >> 6))
                .is_some_and(|w| w & (1 << (local_port & 63)) != 0);
            let services = self
                .service_ports
                .get(&service_port_index(proto::UDP, local_port))
                .copied()
                .unwrap_or(0);
            wireguard || services & self.sources.services_of(remote) != 0
        } else {
            self.peer_of(remote)
                .is_some_and(|p| self.granted(p.index, proto::UDP, local_port))
        }
    }

    /// What [`crate::loader::load_filled`] writes for this policy; a peer's
    /// index is its position in `tunnel.peers`.
    ///
    /// # Errors
    /// When a set exceeds its map.
    pub fn of(
        edge: Option<&EdgePolicy>,
        tunnel: Option<&TunnelPolicy>,
        flows: &FlowSettings,
    ) -> Result<Self, TablesError> {
        let mut c = Self {
            udp_ports: vec![0; capacity::PORT_BITMAP_WORDS as usize],
            flow_config: flow_config(flows, edge.map(|e| e.icmp_echo).unwrap_or_default()),
            ..Self::default()
        };
        if let Some(e) = edge {
            c.fill_edge(e)?;
        }
        if let Some(t) = tunnel {
            check_peer_count(t)?;
            for (index, peer) in (0u32..).zip(&t.peers) {
                let info = peer_info(index, peer);
                let (v4, v6) = split_families(&peer.addresses);
                c.peer_v4.extend(v4.into_iter().map(|k| (k, info)));
                c.peer_v6.extend(v6.into_iter().map(|k| (k, info)));
                c.grants.extend(grant_words(index, &peer.grants));
            }
        }
        Ok(c)
    }

    /// Puts the edge policy's sets in: the `WireGuard` ports, and each
    /// service's ports and sources as its bit ([`EdgePolicy::services`]
    /// gives the order).
    pub(super) fn fill_edge(&mut self, e: &EdgePolicy) -> Result<(), TablesError> {
        self.udp_ports = udp_words(&e.wireguard_ports).to_vec();
        let mut own_v4 = BTreeMap::new();
        let mut own_v6 = BTreeMap::new();
        for (bit, service) in e.services().enumerate() {
            let mask = 1u64 << bit;
            for r in service.ports.iter() {
                for port in r.first..=r.last {
                    let at = service_port_index(r.protocol.number(), port);
                    *self.service_ports.entry(at).or_default() |= mask;
                }
            }
            let (v4, v6) = split_families(service.from);
            for key in v4 {
                *own_v4.entry(key).or_default() |= mask;
            }
            for key in v6 {
                *own_v6.entry(key).or_default() |= mask;
            }
        }
        self.sources = Sources::of(&own_v4, &own_v6)?;
        Ok(())
    }

    /// What both `self` and `new` allow, and no more: the state a reload
    /// passes through between removing and adding. A trie entry stays only
    /// where both give its prefix the same peer index (its ICMP flag only
    /// if both set it), a grant word keeps the bits both set, an edge set
    /// the members of both. Since a source address belongs to one peer in
    /// each policy (`config` refuses overlaps), an address this finds a
    /// peer for has that peer in both, so every packet it passes, both
    /// pass. A service port or source entry keeps the bits both give it
    /// ([`Sources::narrowed`]): an address's services are the union over
    /// the entries holding it, so it is admitted to no bit that either
    /// policy's entries would not admit it to (and a bit both give a port
    /// and a source passes in both, whichever service it stands for in
    /// each). The flow settings are already the new ones: they are
    /// written once, between the two halves.
    #[must_use]
    pub fn narrowed(&self, new: &Self) -> Self {
        fn both<K: Ord + Copy>(
            old: &BTreeMap<K, PeerInfo>,
            new: &BTreeMap<K, PeerInfo>,
        ) -> BTreeMap<K, PeerInfo> {
            old.iter()
                .filter_map(|(k, o)| {
                    let n = new.get(k)?;
                    (n.index == o.index).then_some((
                        *k,
                        PeerInfo {
                            index: o.index,
                            flags: o.flags & n.flags,
                        },
                    ))
                })
                .collect()
        }
        Self {
            udp_ports: self
                .udp_ports
                .iter()
                .zip(&new.udp_ports)
                .map(|(o, n)| o & n)
                .collect(),
            service_ports: both_masks(&self.service_ports, &new.service_ports),
            sources: self.sources.narrowed(&new.sources),
            peer_v4: both(&self.peer_v4, &new.peer_v4),
            peer_v6: both(&self.peer_v6, &new.peer_v6),
            grants: self
                .grants
                .iter()
                .filter_map(|(k, o)| {
                    let w = o & new.grants.get(k)?;
                    (w != 0).then_some((*k, w))
                })
                .collect(),
            flow_config: new.flow_config,
        }
    }
}

/// The edge's UDP port bitmap: bit `port % 64` of word `port / 64`.
fn udp_words(ports: &[u16]) -> [u64; capacity::PORT_BITMAP_WORDS as usize] {
    let mut words = [0u64; capacity::PORT_BITMAP_WORDS as usize];
    for &port in ports {
        words[usize::from(port >> 6)] |= 1 << (port & 63);
    }
    words
}

/// The value of the longest prefix of `map` holding `addr`.
fn longest<const N: usize, V: Copy>(
    map: &BTreeMap<LpmParts<N>, V>,
    addr: LpmParts<N>,
) -> Option<V> {
    map.iter()
        .filter(|(k, _)| contains(k, &addr))
        .max_by_key(|((_, len), _)| *len)
        .map(|(_, v)| *v)
}
