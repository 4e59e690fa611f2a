//! A replacing `ztxdp up` adopts the state of the programs it replaces, so
//! that a restart cuts no connection and resets no count: the flows the host
//! started, the datagrams whose first fragment passed, the echo buckets, the
//! local ports used, the per-reason counters and the per-peer counters are
//! copied from the old maps into the new ones.
//!
//! Both sides are opened by kernel map id, like the control commands do, so
//! this works whatever started the old programs and from any mount
//! namespace. The copy runs twice: once before anything new is attached
//! (everything), and once after the swap (the flow-like tables and the
//! per-reason counters), which picks up what the old programs recorded
//! between the two. A table the new config makes smaller takes the most
//! recently used entries that fit; the rest are counted in
//! [`Adopted::left_out`]. The per-reason counters go to the new programs'
//! ledger ([`zt_common::Ledger`]), which no program writes, so they can be
//! set again at any time: the daemon sets them a last time once the old
//! programs are certainly idle (`audit::kernel::Feed::recover`). The old
//! audit maps are not copied but read: see [`Maps::take`].
//!
//! The old maps are opened once, before the swap, and held: once detached,
//! the old programs are unloaded, and their maps would go with them.

use std::collections::HashMap;

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use serde::Serialize;
use zt_common::{
    COUNTER_SLOTS, CpuState, EventBucket, FlowKey, FlowState, FragmentKey, PeerCounters, SourceKey,
    map, program, reason,
};

use crate::audit::ledger::{LedgerEntry, LedgerError};

/// Why the state of the replaced programs could not be adopted.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error("opening map id {id}: {source}")]
    Open {
        id: u32,
        #[source]
        source: MapError,
    },
    #[error("copying {name}: {source}")]
    Copy {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("the new programs have no ledger entry in {}", map::CPU_STATE)]
    NoLedger,
}

/// Which copy this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Before the new programs are attached: every table and counter.
    BeforeSwap,
    /// After the swap: the flow, fragment and echo tables and the
    /// per-reason counters again, for what the old programs recorded
    /// meanwhile. The per-peer counters are not: they would overwrite what
    /// the new programs counted since.
    AfterSwap,
}

/// What was adopted, for the daemon's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Adopted {
    pub flows: usize,
    pub fragments: usize,
    pub echo_sources: usize,
    /// Entries that did not fit a table the new config made smaller.
    pub left_out: usize,
}

impl Adopted {
    fn add(&mut self, other: Self) {
        self.flows += other.flows;
        self.fragments += other.fragments;
        self.echo_sources += other.echo_sources;
        self.left_out += other.left_out;
    }
}

/// The maps of one program set by kernel name, held open.
pub struct Maps(HashMap<String, MapData>);

impl Maps {
    /// Opens the maps `ids` (of a loaded or attached program set).
    ///
    /// # Errors
    /// When a map cannot be opened.
    pub fn open(ids: &[u32]) -> Result<Self, AdoptError> {
        let mut maps = HashMap::new();
        for &id in ids {
            let data = MapData::from_id(id).map_err(|source| AdoptError::Open { id, source })?;
            let info = data
                .info()
                .map_err(|source| AdoptError::Open { id, source })?;
            if let Some(name) = info.name_as_str() {
                maps.entry(name.to_owned()).or_insert(data);
            }
        }
        Ok(Self(maps))
    }

    /// The map `name` on a fresh fd.
    fn data(&self, name: &'static str) -> Result<Option<MapData>, AdoptError> {
        let Some(data) = self.0.get(name) else {
            return Ok(None);
        };
        let id = data
            .info()
            .map_err(|source| AdoptError::Copy { name, source })?
            .id();
        MapData::from_id(id)
            .map(Some)
            .map_err(|source| AdoptError::Open { id, source })
    }

    /// The map `name` as aya's typed enum (a fresh fd on the same map).
    fn map(&self, name: &'static str) -> Result<Option<Map>, AdoptError> {
        self.data(name)?
            .map(|d| Map::from_map_data(d).map_err(|source| AdoptError::Copy { name, source }))
            .transpose()
    }

    /// The map `name`, taken out: the audit ring buffer and summary maps,
    /// which the new daemon reads once the old one is gone
    /// (`audit::kernel::Feed::recover`).
    #[must_use]
    pub fn take(&mut self, name: &'static str) -> Option<MapData> {
        self.0.remove(name)
    }

    /// The ledger of these programs' state array; `None` for programs of an
    /// older build, which have none.
    ///
    /// # Errors
    /// When the array cannot be opened.
    pub fn ledger(&self) -> Result<Option<LedgerEntry>, AdoptError> {
        match self.data(map::CPU_STATE)? {
            Some(d) => Ok(LedgerEntry::open(d)?),
            None => Ok(None),
        }
    }

    /// Every per-reason counter of these programs, summed over their state
    /// array: the CPUs' counts and what their ledger carries. The programs
    /// may be counting meanwhile: a lookup copies each entry as the kernel
    /// has it, a counter possibly a packet behind, never torn into a wrong
    /// value on x86's aligned 8-byte stores.
    ///
    /// # Errors
    /// When the array cannot be read.
    pub fn counter_totals(&self) -> Result<[u64; COUNTER_SLOTS as usize], AdoptError> {
        let err = |source| AdoptError::Copy {
            name: map::CPU_STATE,
            source,
        };
        let mut totals = [0u64; COUNTER_SLOTS as usize];
        let Some(from) = self.map(map::CPU_STATE)? else {
            return Ok(totals);
        };
        let from: Array<_, CpuState> = Array::try_from(&from).map_err(err)?;
        for state in from.iter().filter_map(Result::ok) {
            for (total, n) in totals.iter_mut().zip(state.counters) {
                *total += n;
            }
        }
        Ok(totals)
    }

    fn max_entries(&self, name: &'static str) -> Result<usize, AdoptError> {
        self.0.get(name).map_or(Ok(0), |d| {
            d.info()
                .map(|i| i.max_entries() as usize)
                .map_err(|source| AdoptError::Copy { name, source })
        })
    }
}

/// Copies the state of the programs whose maps are `old` into those of
/// the new programs, `new`; `peers` per-peer counters are copied by index
/// (a peer keeps its counts where its position in the config stays).
///
/// # Errors
/// When a map cannot be opened, read or written. Maps of an older build
/// with other key or value sizes are not ours to read: the caller logs the
/// error and goes on with empty state, as before adoption existed.
pub fn adopt(old: &Maps, new: &Maps, peers: u32, pass: Pass) -> Result<Adopted, AdoptError> {
    let mut adopted = Adopted::default();
    let flows = copy_lru::<FlowKey, FlowState>(old, new, map::FLOWS, |s| s.last_seen_ns)?;
    adopted.add(Adopted {
        flows: flows.0,
        left_out: flows.1,
        ..Adopted::default()
    });
    let frags = copy_lru::<FragmentKey, u64>(old, new, map::FRAGMENTS, |&at| at)?;
    adopted.add(Adopted {
        fragments: frags.0,
        left_out: frags.1,
        ..Adopted::default()
    });
    let echo = copy_lru::<SourceKey, EventBucket>(old, new, map::ECHO_BUCKETS, |b| b.last_ns)?;
    adopted.add(Adopted {
        echo_sources: echo.0,
        left_out: echo.1,
        ..Adopted::default()
    });
    copy_local_ports(old, new)?;
    carry_counters(old, new)?;
    if pass == Pass::BeforeSwap {
        copy_peer_counters(old, new, peers)?;
    }
    Ok(adopted)
}

/// Copies an LRU table: every old entry the new table lacks or holds
/// older (by `age`), most recent first, as long as the new table has room
/// (an insert into a full LRU map would evict silently). Returns (copied,
/// left out).
fn copy_lru<K, V>(
    old: &Maps,
    new: &Maps,
    name: &'static str,
    age: impl Fn(&V) -> u64,
) -> Result<(usize, usize), AdoptError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let err = |source| AdoptError::Copy { name, source };
    let (Some(from), Some(mut to)) = (old.map(name)?, new.map(name)?) else {
        return Ok((0, 0));
    };
    let from: BpfHashMap<_, K, V> = BpfHashMap::try_from(&from).map_err(err)?;
    let mut entries: Vec<(K, V)> = from.iter().filter_map(Result::ok).collect();
    entries.sort_by_key(|(_, v)| std::cmp::Reverse(age(v)));
    let mut to: BpfHashMap<_, K, V> = BpfHashMap::try_from(&mut to).map_err(err)?;
    let present: HashMap<K, u64> = to
        .iter()
        .filter_map(Result::ok)
        .map(|(k, v)| (k, age(&v)))
        .collect();
    let mut room = new.max_entries(name)?.saturating_sub(present.len());
    let (mut copied, mut left_out) = (0, 0);
    for (k, v) in entries {
        match present.get(&k) {
            Some(&newer) if newer >= age(&v) => continue,
            // Replacing an entry takes no room.
            Some(_) => {}
            None if room == 0 => {
                left_out += 1;
                continue;
            }
            None => room -= 1,
        }
        to.insert(k, v, 0).map_err(err)?;
        copied += 1;
    }
    Ok((copied, left_out))
}

/// The local ports the host ever started a flow from: a set flag is copied.
fn copy_local_ports(old: &Maps, new: &Maps) -> Result<(), AdoptError> {
    let err = |source| AdoptError::Copy {
        name: map::LOCAL_PORTS,
        source,
    };
    let (Some(from), Some(mut to)) = (old.map(map::LOCAL_PORTS)?, new.map(map::LOCAL_PORTS)?)
    else {
        return Ok(());
    };
    let from: Array<_, u8> = Array::try_from(&from).map_err(err)?;
    let used: Vec<u32> = (0u32..)
        .zip(from.iter())
        .filter_map(|(i, v)| (v.ok()? != 0).then_some(i))
        .collect();
    let mut to: Array<_, u8> = Array::try_from(&mut to).map_err(err)?;
    for i in used {
        to.set(i, 1, 0).map_err(err)?;
    }
    Ok(())
}

/// Whether a counter slot carries over. The audit's own bookkeeping
/// (events rate-limited or lost) does not: the old daemon reported it in
/// its trail, and the new one reports what its programs add.
const fn carried(slot: u32) -> bool {
    let code = slot % reason::COUNT;
    !(slot / reason::COUNT != program::EGRESS
        && (code == reason::EVENTS_SUPPRESSED || code == reason::EVENTS_LOST))
}

/// What the new programs carry of the old programs' counters `totals`
/// ([`Maps::counter_totals`]): all but the audit's own bookkeeping.
#[must_use]
pub fn carried_counters(totals: &[u64; COUNTER_SLOTS as usize]) -> [u64; COUNTER_SLOTS as usize] {
    let mut out = *totals;
    for (slot, n) in (0u32..).zip(out.iter_mut()) {
        if !carried(slot) {
            *n = 0;
        }
    }
    out
}

/// The per-reason counters, summed over the old state array, into the new
/// programs' ledger (`status` sums it with the CPUs' counts). Set, not
/// added: every pass leaves the old programs' latest totals there.
fn carry_counters(old: &Maps, new: &Maps) -> Result<(), AdoptError> {
    let carried = carried_counters(&old.counter_totals()?);
    let mut to = new.ledger()?.ok_or(AdoptError::NoLedger)?;
    let mut ledger = to.read()?;
    ledger.carried = carried;
    Ok(to.write(&ledger)?)
}

/// The per-peer counters of peers `0..peers`, CPU by CPU.
fn copy_peer_counters(old: &Maps, new: &Maps, peers: u32) -> Result<(), AdoptError> {
    let err = |source| AdoptError::Copy {
        name: map::PEER_COUNTERS,
        source,
    };
    let (Some(from), Some(mut to)) = (old.map(map::PEER_COUNTERS)?, new.map(map::PEER_COUNTERS)?)
    else {
        return Ok(());
    };
    let from: PerCpuArray<_, PeerCounters> = PerCpuArray::try_from(&from).map_err(err)?;
    let mut to: PerCpuArray<_, PeerCounters> = PerCpuArray::try_from(&mut to).map_err(err)?;
    for i in 0..peers.min(from.len()).min(to.len()) {
        // Both sides have one value per possible CPU of this machine.
        let values = from.get(&i, 0).map_err(err)?;
        if values.iter().all(|c| *c == PeerCounters::default()) {
            continue;
        }
        to.set(i, values, 0).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use zt_common::counter_index;

    use super::*;

    fn slots(program: u32) -> impl Iterator<Item = u32> {
        (0..reason::COUNT).map(move |code| counter_index(program, code))
    }

    #[test]
    fn the_audit_bookkeeping_is_not_carried_over() {
        for program in [program::EDGE, program::TUNNEL] {
            for slot in slots(program) {
                let code = slot % reason::COUNT;
                assert_eq!(
                    carried(slot),
                    code != reason::EVENTS_SUPPRESSED && code != reason::EVENTS_LOST,
                    "slot {slot}"
                );
            }
        }
        assert!(slots(program::EGRESS).all(carried));
    }
}
