//! The BPF maps as one object: writing a policy into them, reading the
//! counters back. The same code serves a freshly loaded object (`up`) and
//! the maps of an already attached program found by kernel id (`status`,
//! `allow`, `revoke`), so the two can never disagree on the layout.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, lpm_trie::Key,
    },
};
use ipnet::IpNet;
use zt_common::{
    COUNTER_SLOTS, CpuState, EventBucket, FlowConfig, FlowKey, FlowState, FragmentKey, GrantKey,
    PEER_AUDIT, PEER_ICMP, PeerCounters, PeerInfo, SourceKey, capacity, counter_index, map,
    program, reason,
};

use crate::policy::{
    EchoRate, EdgePolicy, FlowSettings, Grant, Mode, Peer, Protocol, TunnelPolicy,
};

mod batch;
mod contents;
mod flows;
mod peers;
mod sources;

pub use contents::Contents;
pub use flows::FlowInterfaces;
pub use sources::Sources;

/// Errors reading or writing the maps.
#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("BPF map {name} is missing from the loaded object")]
    MissingMap { name: &'static str },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("BPF map {name}: reading or writing entries in batches: {source}")]
    Batch {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping BPF map {name} into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} has {count} entries; the limit is {limit}")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: u32,
    },
}

/// Packets passed and dropped in `counters` (by reason code, as
/// [`Tables::counters`] returns them): the sums of the decision counters.
#[must_use]
pub fn passed_dropped(counters: &BTreeMap<u32, u64>) -> (u64, u64) {
    let total = |allow: bool| -> u64 {
        reason::ALL
            .iter()
            .filter(|&&code| reason::is_allow(code) == allow)
            .filter_map(|code| counters.get(code))
            .sum()
    };
    // A would-drop is counted under its drop reason too, but it passed.
    let would_drop = counters.get(&reason::WOULD_DROP).copied().unwrap_or(0);
    (
        total(true) + would_drop,
        total(false).saturating_sub(would_drop),
    )
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> TablesError {
    move |source| TablesError::Map { name, source }
}

/// Every map the programs share, by kernel name.
pub struct Tables {
    maps: HashMap<&'static str, Map>,
    /// `max_entries` by map name, of maps opened by id.
    capacity: HashMap<&'static str, u32>,
    /// Bytes of kernel memory by map name (the map's `memlock`), of maps
    /// opened by id.
    memory: HashMap<&'static str, u64>,
}

/// The set-like maps `status` and the metrics report, by the label they
/// report them under ([`label`]).
const FILLED: [(&str, &str); 14] = [
    (map::SERVICE_PORTS, "service_ports"),
    (map::SOURCES_V4_16, "service_sources_v4_16"),
    (map::SOURCES_V4_24, "service_sources_v4_24"),
    (map::SOURCES_V4_32, "service_sources_v4_32"),
    (map::SOURCES_V6, "service_sources_v6"),
    (map::SERVICE_SOURCES_V6, "service_sources_v6_trie"),
    (map::PEER_HOSTS_V4, "peer_hosts_v4"),
    (map::PEER_HOSTS_V6, "peer_hosts_v6"),
    (map::PEER_V4, "peer_v4"),
    (map::PEER_V6, "peer_v6"),
    (map::GRANTS, "grant_words"),
    (map::FLOWS, "flows"),
    (map::FRAGMENTS, "fragments"),
    (map::EDGE_UDP_PORTS, "udp_ports"),
];

/// The label of a map of [`FILLED`].
fn label(name: &'static str) -> &'static str {
    FILLED
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(name, |(_, l)| l)
}

/// Map names `Tables` handles; a fresh object must have all of them.
const ALL_MAPS: [&str; 18] = [
    map::FLOWS,
    map::FLOW_CONFIG,
    map::ECHO_BUCKETS,
    map::EDGE_UDP_PORTS,
    map::SERVICE_PORTS,
    map::SOURCES_V4_16,
    map::SOURCES_V4_24,
    map::SOURCES_V4_32,
    map::SOURCES_V6,
    map::SOURCE_V6_LENGTHS,
    map::SERVICE_SOURCES_V6,
    map::CPU_STATE,
    map::PEER_HOSTS_V4,
    map::PEER_HOSTS_V6,
    map::PEER_V4,
    map::PEER_V6,
    map::GRANTS,
    map::PEER_COUNTERS,
];

/// Maps user space only reads, for `status`: opened by id there, and left
/// in a freshly loaded object, which keeps them.
const READ_ONLY_MAPS: [&str; 1] = [map::FRAGMENTS];

impl Tables {
    /// Takes the maps out of a freshly loaded object. The ring buffer stays
    /// in `ebpf` for the audit reader.
    ///
    /// # Errors
    /// When a map is missing from the object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, TablesError> {
        let mut maps = HashMap::new();
        for name in ALL_MAPS {
            let m = ebpf
                .take_map(name)
                .ok_or(TablesError::MissingMap { name })?;
            maps.insert(name, m);
        }
        Ok(Self {
            maps,
            capacity: HashMap::new(),
            memory: HashMap::new(),
        })
    }

    /// Opens the maps of an attached program from its map ids; this works
    /// from any process and mount namespace.
    ///
    /// # Errors
    /// When an id cannot be opened.
    pub fn from_map_ids(ids: &[u32]) -> Result<Self, TablesError> {
        let mut maps = HashMap::new();
        let mut capacity = HashMap::new();
        let mut memory = HashMap::new();
        for &id in ids {
            let data = MapData::from_id(id).map_err(map_err("(by id)"))?;
            let info = data.info().map_err(map_err("(by id)"))?;
            let Some(name) = info
                .name_as_str()
                .and_then(|n| ALL_MAPS.iter().chain(&READ_ONLY_MAPS).find(|m| **m == n))
            else {
                continue;
            };
            capacity.insert(*name, info.max_entries());
            if let Some(bytes) = memlock(&data) {
                memory.insert(*name, bytes);
            }
            maps.insert(*name, Map::from_map_data(data).map_err(map_err(name))?);
        }
        // A program only holds the maps it uses (the edge program has no peer
        // maps), so absence is reported when a missing map is used.
        Ok(Self {
            maps,
            capacity,
            memory,
        })
    }

    fn get(&mut self, name: &'static str) -> Result<&mut Map, TablesError> {
        self.maps
            .get_mut(name)
            .ok_or(TablesError::MissingMap { name })
    }

    fn get_ref(&self, name: &'static str) -> Result<&Map, TablesError> {
        self.maps.get(name).ok_or(TablesError::MissingMap { name })
    }

    /// Writes the edge policy's sets into fresh maps. Its settings
    /// (whether there is an edge policy at all, and its mode) were fixed
    /// when the programs were loaded ([`crate::loader::LoadOptions::edge`]);
    /// the daemon attaches only after this returns, so a program never runs
    /// on half-filled maps. Crate-private: only
    /// [`crate::loader::load_filled`] calls it, with the policy it loaded
    /// the programs for.
    ///
    /// # Errors
    /// When a map update fails or a set exceeds its map.
    pub(crate) fn apply_edge(&mut self, p: &EdgePolicy) -> Result<(), TablesError> {
        let fresh = Contents {
            udp_ports: vec![0; capacity::PORT_BITMAP_WORDS as usize],
            ..Contents::default()
        };
        let mut c = fresh.clone();
        c.fill_edge(p)?;
        self.write_edge(&fresh, &c)
    }

    /// Writes every peer of the tunnel policy: addresses, ICMP flag, grants.
    ///
    /// # Errors
    /// When a map update fails.
    pub fn apply_tunnel(&mut self, p: &TunnelPolicy) -> Result<(), TablesError> {
        check_peer_count(p)?;
        // Fresh maps: nothing stale to remove, so no per-peer probing.
        for (index, peer) in (0u32..).zip(&p.peers) {
            self.write_peer(index, peer)?;
        }
        Ok(())
    }

    /// Makes the kernel's view of one peer match `peer`: grants that are no
    /// longer wanted are deleted after the new ones are in, and the ICMP flag
    /// and addresses are rewritten. Used for start-up and for runtime
    /// `allow`/`revoke`, which take effect on the next packet.
    ///
    /// # Errors
    /// When a map update fails.
    pub fn set_peer(&mut self, index: u32, peer: &Peer) -> Result<(), TablesError> {
        self.write_peer(index, peer)?;
        // Remove the words no grant needs any more. The peer's possible words
        // are probed (2 protocols x 1024 words) rather than the whole map
        // walked, so this costs the same with 10 peers or 65,536.
        let wanted = grant_words(index, &peer.grants);
        let mut grants: BpfHashMap<_, GrantKey, u64> =
            BpfHashMap::try_from(self.get(map::GRANTS)?).map_err(map_err(map::GRANTS))?;
        for protocol in [zt_common::proto::TCP, zt_common::proto::UDP] {
            for word in 0..u16::try_from(capacity::PORT_BITMAP_WORDS).unwrap_or(u16::MAX) {
                let key = GrantKey {
                    peer: index,
                    protocol,
                    _pad0: 0,
                    word,
                };
                if !wanted.contains_key(&key) && grants.get(&key, 0).is_ok() {
                    grants.remove(&key).map_err(map_err(map::GRANTS))?;
                }
            }
        }
        Ok(())
    }

    /// Writes one peer's grant words, ICMP flag and addresses, adding to
    /// what is there.
    fn write_peer(&mut self, index: u32, peer: &Peer) -> Result<(), TablesError> {
        let wanted = grant_words(index, &peer.grants);
        let mut grants: BpfHashMap<_, GrantKey, u64> =
            BpfHashMap::try_from(self.get(map::GRANTS)?).map_err(map_err(map::GRANTS))?;
        for (key, word) in &wanted {
            grants.insert(key, word, 0).map_err(map_err(map::GRANTS))?;
        }
        let (v4, v6) = split_families(&peer.addresses);
        self.insert_peer_prefixes(peer_info(index, peer), &v4, &v6)
    }

    /// Writes the flow timeouts and the echo rate. Until this entry exists,
    /// nothing is admitted as a reply.
    ///
    /// # Errors
    /// When the map update fails.
    pub fn apply_flows(&mut self, flows: &FlowSettings, echo: EchoRate) -> Result<(), TablesError> {
        let cfg = flow_config(flows, echo);
        let mut arr: Array<_, FlowConfig> =
            Array::try_from(self.get(map::FLOW_CONFIG)?).map_err(map_err(map::FLOW_CONFIG))?;
        arr.set(0, cfg, 0).map_err(map_err(map::FLOW_CONFIG))
    }

    /// Every counter of one program, summed over CPUs, by reason code.
    ///
    /// # Errors
    /// When the counter map cannot be read.
    pub fn counters(&self, program: u32) -> Result<BTreeMap<u32, u64>, TablesError> {
        let cpus = self.cpu_counters()?;
        let mut out = BTreeMap::new();
        let extra: &[u32] = if program == program::EGRESS {
            &[reason::FLOWS_CREATED]
        } else {
            &[
                reason::WOULD_DROP,
                reason::ALLOWS_AUDITED,
                reason::EVENTS_SUPPRESSED,
                reason::EVENTS_LOST,
            ]
        };
        let codes: &[u32] = if program == program::EGRESS {
            &[]
        } else {
            &reason::ALL
        };
        for &code in codes.iter().chain(extra) {
            let idx = counter_index(program, code) as usize;
            out.insert(code, cpus.iter().map(|c| c[idx]).sum());
        }
        Ok(out)
    }

    /// Packets passed and dropped by one program: the sums of its decision
    /// counters (the event counters, suppressed and lost, count records).
    ///
    /// # Errors
    /// When the counter map cannot be read.
    pub fn passed_dropped(&self, program: u32) -> Result<(u64, u64), TablesError> {
        Ok(passed_dropped(&self.counters(program)?))
    }

    /// Every CPU's counters. Read through a read-only mapping of the
    /// (mmapable) state array, one 8-byte load per counter: a map lookup
    /// copies the entry with a plain `memcpy` while the programs add to it,
    /// which does not promise whole words, and a torn counter would put a
    /// wrong delta in the audit trail's `lost` records. (Per-CPU maps copy
    /// word by word; this array is not one, see `zt_common::CpuState`.)
    fn cpu_counters(&self) -> Result<Vec<[u64; COUNTER_SLOTS as usize]>, TablesError> {
        self.mapped::<CpuState, _>(map::CPU_STATE, |states, entries| {
            (0..entries)
                .map(|cpu| {
                    std::array::from_fn(|i| {
                        // SAFETY: inside the mapping (cpu < entries, i <
                        // COUNTER_SLOTS), page-aligned so every u64 is
                        // aligned; volatile because the programs write it
                        // meanwhile.
                        unsafe { (&raw const (*states.add(cpu)).counters[i]).read_volatile() }
                    })
                })
                .collect()
        })
    }

    /// Runs `read` on a read-only mapping of the mmapable array `name`
    /// (its first value and their number): one pass over memory where
    /// lookups would take a system call per entry.
    fn mapped<T: aya::Pod, R>(
        &self,
        name: &'static str,
        read: impl FnOnce(*const T, usize) -> R,
    ) -> Result<R, TablesError> {
        let m = self.get_ref(name)?;
        let entries = Array::<_, T>::try_from(m).map_err(map_err(name))?.len() as usize;
        let Map::Array(data) = m else {
            return Err(TablesError::MissingMap { name });
        };
        let len = entries * size_of::<T>();
        let mmap_err = |source| TablesError::Mmap { name, source };
        // SAFETY: a fresh read-only shared mapping of the map's fd, `len`
        // bytes, which the kernel allows for an mmapable array of `entries`
        // values; nothing else aliases it, and it is unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        let out = read(base.cast::<T>(), entries);
        // SAFETY: the mapping made above, no longer used.
        if unsafe { libc::munmap(base, len) } != 0 {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        Ok(out)
    }

    /// The grants the kernel enforces for peer `index`, read back from the
    /// maps: its grant words as port ranges, and its ICMP flag. What
    /// `list` compares with the files.
    ///
    /// # Errors
    /// When the grant map or the peer tries cannot be read.
    pub fn peer_grants(&self, index: u32) -> Result<Vec<Grant>, TablesError> {
        let words: BpfHashMap<_, GrantKey, u64> =
            BpfHashMap::try_from(self.get_ref(map::GRANTS)?).map_err(map_err(map::GRANTS))?;
        let mut ports = Vec::new();
        // Probed, not walked, as in `set_peer`: the cost does not grow
        // with the number of peers.
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for word in 0..u16::try_from(capacity::PORT_BITMAP_WORDS).unwrap_or(u16::MAX) {
                let key = GrantKey {
                    peer: index,
                    protocol: protocol.number(),
                    _pad0: 0,
                    word,
                };
                let Ok(bits) = words.get(&key, 0) else {
                    continue;
                };
                ports.extend((0..64u16).filter(|b| bits & (1 << b) != 0).map(|b| {
                    let port = (word << 6) | b;
                    Grant::Ports {
                        protocol,
                        first: port,
                        last: port,
                    }
                }));
            }
        }
        let has_icmp = |info: PeerInfo| info.index == index && info.flags & PEER_ICMP != 0;
        let (v4, v6) = self.read_peers()?;
        if v4.values().chain(v6.values()).any(|info| has_icmp(*info)) {
            ports.push(Grant::Icmp);
        }
        // Single ports merged into the minimal ranges the files use.
        Ok(crate::grants::effective(&ports, &[], &[]))
    }

    /// Allowed and denied packet counts of peers `0..n`, summed over CPUs.
    ///
    /// # Errors
    /// When the per-peer counter map cannot be read.
    pub fn peer_counters(&self, n: u32) -> Result<Vec<PeerCounters>, TablesError> {
        let arr: PerCpuArray<_, PeerCounters> =
            PerCpuArray::try_from(self.get_ref(map::PEER_COUNTERS)?)
                .map_err(map_err(map::PEER_COUNTERS))?;
        (0..n.min(capacity::PEERS))
            .map(|i| {
                let v = arr.get(&i, 0).map_err(map_err(map::PEER_COUNTERS))?;
                Ok(v.iter().fold(PeerCounters::default(), |a, c| PeerCounters {
                    allowed: a.allowed + c.allowed,
                    denied: a.denied + c.denied,
                }))
            })
            .collect()
    }

    /// The flow table's entry for `key`, if it has one.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowState>, TablesError> {
        self.lookup(map::FLOWS, key)
    }

    /// The echo token bucket of a source, if it has one.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn echo_bucket(&self, key: &SourceKey) -> Result<Option<EventBucket>, TablesError> {
        self.lookup(map::ECHO_BUCKETS, key)
    }

    /// When the first fragment of a datagram passed, if one did.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn fragment(&self, key: &FragmentKey) -> Result<Option<u64>, TablesError> {
        self.lookup(map::FRAGMENTS, key)
    }

    /// The value at `key` of the hash (or LRU) map `name`; none when the
    /// programs opened by id do not use the map (the tunnel program has no
    /// echo buckets). A lookup from user space does not mark an LRU entry
    /// used (`htab_lru_map_lookup_elem_sys`).
    fn lookup<K: aya::Pod, V: aya::Pod>(
        &self,
        name: &'static str,
        key: &K,
    ) -> Result<Option<V>, TablesError> {
        let Some(m) = self.maps.get(name) else {
            return Ok(None);
        };
        match BpfHashMap::<_, K, V>::try_from(m)
            .map_err(map_err(name))?
            .get(key, 0)
        {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(name)(e)),
        }
    }

    /// Entries in each set-like map, for `status`.
    ///
    /// # Errors
    /// When a map cannot be walked.
    pub fn fill_levels(&self) -> Result<BTreeMap<&'static str, usize>, TablesError> {
        let mut out = BTreeMap::new();
        if self.maps.contains_key(map::SERVICE_PORTS) {
            let ports = self.service_ports()?;
            out.insert(label(map::SERVICE_PORTS), ports.len());
        }
        let sources = self.read_sources()?;
        let (peer_v4, peer_v6) = self.read_peers()?;
        let hosts_v4 = peer_v4.keys().filter(|(_, len)| *len == 32).count();
        let hosts_v6 = peer_v6.keys().filter(|(_, len)| *len == 128).count();
        for (name, n) in [
            (map::SOURCES_V4_16, sources.blocks().len()),
            (map::SOURCES_V4_24, sources.v4_24.len()),
            (map::SOURCES_V4_32, sources.v4_32.len()),
            (map::SOURCES_V6, sources.v6.len()),
            (map::SERVICE_SOURCES_V6, sources.v6_trie.len()),
            (map::PEER_HOSTS_V4, hosts_v4),
            (map::PEER_HOSTS_V6, hosts_v6),
            (map::PEER_V4, peer_v4.len() - hosts_v4),
            (map::PEER_V6, peer_v6.len() - hosts_v6),
        ] {
            if self.maps.contains_key(name) {
                out.insert(label(name), n);
            }
        }
        if let Some(m) = self.maps.get(map::GRANTS) {
            let g: BpfHashMap<_, GrantKey, u64> =
                BpfHashMap::try_from(m).map_err(map_err(map::GRANTS))?;
            out.insert(label(map::GRANTS), g.keys().count());
        }
        if self.maps.contains_key(map::FLOWS) {
            let mut n = 0;
            self.each_flow(|_, _| n += 1)?;
            out.insert(label(map::FLOWS), n);
        }
        // Datagrams remembered for their later fragments, live or expired,
        // up to capacity::FRAGMENTS.
        if let Some(m) = self.maps.get(map::FRAGMENTS) {
            let f: BpfHashMap<_, FragmentKey, u64> =
                BpfHashMap::try_from(m).map_err(map_err(map::FRAGMENTS))?;
            out.insert(label(map::FRAGMENTS), f.keys().count());
        }
        if let Some(m) = self.maps.get(map::EDGE_UDP_PORTS) {
            let udp: Array<_, u64> = Array::try_from(m).map_err(map_err(map::EDGE_UDP_PORTS))?;
            let ports: u32 = udp.iter().filter_map(Result::ok).map(u64::count_ones).sum();
            out.insert(label(map::EDGE_UDP_PORTS), ports as usize);
        }
        Ok(out)
    }

    /// The kernel memory each set-like map of [`Self::fill_levels`] takes,
    /// in bytes, by the same labels. Known for maps opened by id.
    #[must_use]
    pub fn memory(&self) -> BTreeMap<&'static str, u64> {
        FILLED
            .iter()
            .filter_map(|&(name, label)| Some((label, *self.memory.get(name)?)))
            .collect()
    }

    /// How many entries each set-like map of [`Self::fill_levels`] holds at
    /// most, by the same labels: `max_entries`, and for `udp_ports` the
    /// bits of the port bitmap. Known for maps opened by id.
    #[must_use]
    pub fn capacities(&self) -> BTreeMap<&'static str, u64> {
        FILLED
            .iter()
            .filter_map(|&(name, label)| {
                let entries = self.capacity.get(name)?;
                Some((
                    label,
                    if name == map::EDGE_UDP_PORTS {
                        u64::from(*entries) * 64
                    } else {
                        u64::from(*entries)
                    },
                ))
            })
            .collect()
    }
}

impl Tables {
    /// What the maps hold now, runtime `allow`s and `revoke`s included.
    /// A map that none of the programs opened by id uses (the edge sets
    /// of a load that runs only the tunnel program) reads as empty:
    /// nothing enforces it.
    ///
    /// # Errors
    /// When a map cannot be read.
    pub fn contents(&self) -> Result<Contents, TablesError> {
        let mut c = Contents {
            udp_ports: vec![0; capacity::PORT_BITMAP_WORDS as usize],
            ..Contents::default()
        };
        if let Some(m) = self.maps.get(map::EDGE_UDP_PORTS) {
            c.udp_ports = Array::<_, u64>::try_from(m)
                .map_err(map_err(map::EDGE_UDP_PORTS))?
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(map::EDGE_UDP_PORTS))?;
        }
        if self.maps.contains_key(map::SERVICE_PORTS) {
            c.service_ports = self.service_ports()?;
        }
        c.sources = self.read_sources()?;
        (c.peer_v4, c.peer_v6) = self.read_peers()?;
        if let Some(m) = self.maps.get(map::GRANTS) {
            c.grants = BpfHashMap::<_, GrantKey, u64>::try_from(m)
                .map_err(map_err(map::GRANTS))?
                .iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(map::GRANTS))?;
        }
        if let Some(m) = self.maps.get(map::FLOW_CONFIG) {
            c.flow_config = Array::<_, FlowConfig>::try_from(m)
                .map_err(map_err(map::FLOW_CONFIG))?
                .get(&0, 0)
                .map_err(map_err(map::FLOW_CONFIG))?;
        }
        Ok(c)
    }

    /// The nonzero entries of the service port map.
    fn service_ports(&self) -> Result<BTreeMap<u32, u64>, TablesError> {
        self.mapped::<u64, _>(map::SERVICE_PORTS, |masks, n| {
            (0..n)
                .filter_map(|at| {
                    // SAFETY: inside the mapping (at < n), page-aligned.
                    let mask = unsafe { masks.add(at).read_volatile() };
                    Some((u32::try_from(at).ok()?, mask)).filter(|_| mask != 0)
                })
                .collect()
        })
    }

    /// Whether the programs these maps were opened for use map `name`.
    #[must_use]
    pub fn has(&self, name: &'static str) -> bool {
        self.maps.contains_key(name)
    }

    /// Replaces what the maps hold with `new`, in place, while the programs
    /// run. Two halves, so that no packet ever passes that neither the old
    /// nor the new policy passes: first everything only the old policy
    /// allows is removed (down to [`Contents::narrowed`]), then the flow
    /// settings are written, then everything only the new policy allows is
    /// added. In between, a peer whose index changes has no trie entry and
    /// its packets drop (fail closed) for as long as the writes take.
    ///
    /// # Errors
    /// When a map cannot be read or written; the maps may then hold part
    /// of the change, never more than the old or the new policy allows.
    pub fn replace(&mut self, new: &Contents) -> Result<(), TablesError> {
        let old = self.contents()?;
        let narrowed = old.narrowed(new);
        self.write_changes(&old, &narrowed)?;
        self.write_changes(&narrowed, new)
    }

    /// Writes what differs between `from` (what the maps hold) and `to`:
    /// removals, then updates, the flow settings last. A map with nothing
    /// to change is not touched, so maps opened by id without the ones of
    /// a program that is not running (the tunnel's, on an edge-only host)
    /// take a change that does not concern them.
    fn write_changes(&mut self, from: &Contents, to: &Contents) -> Result<(), TablesError> {
        self.write_edge(from, to)?;
        self.write_peers((&from.peer_v4, &from.peer_v6), (&to.peer_v4, &to.peer_v6))?;
        if from.grants != to.grants {
            let mut grants: BpfHashMap<_, GrantKey, u64> =
                BpfHashMap::try_from(self.get(map::GRANTS)?).map_err(map_err(map::GRANTS))?;
            for key in from.grants.keys().filter(|k| !to.grants.contains_key(k)) {
                grants.remove(key).map_err(map_err(map::GRANTS))?;
            }
            for (key, word) in &to.grants {
                if from.grants.get(key) != Some(word) {
                    grants.insert(key, word, 0).map_err(map_err(map::GRANTS))?;
                }
            }
        }
        if from.flow_config != to.flow_config {
            let mut arr: Array<_, FlowConfig> =
                Array::try_from(self.get(map::FLOW_CONFIG)?).map_err(map_err(map::FLOW_CONFIG))?;
            arr.set(0, to.flow_config, 0)
                .map_err(map_err(map::FLOW_CONFIG))?;
        }
        Ok(())
    }
}

impl Tables {
    /// Writes what differs between the edge sets of `from` (what the maps
    /// hold) and `to`.
    fn write_edge(&mut self, from: &Contents, to: &Contents) -> Result<(), TablesError> {
        if from.udp_ports != to.udp_ports {
            let mut udp: Array<_, u64> = Array::try_from(self.get(map::EDGE_UDP_PORTS)?)
                .map_err(map_err(map::EDGE_UDP_PORTS))?;
            for (i, (f, t)) in (0u32..).zip(from.udp_ports.iter().zip(&to.udp_ports)) {
                if f != t {
                    udp.set(i, *t, 0).map_err(map_err(map::EDGE_UDP_PORTS))?;
                }
            }
        }
        if from.service_ports != to.service_ports {
            let mut ports: Array<_, u64> = Array::try_from(self.get(map::SERVICE_PORTS)?)
                .map_err(map_err(map::SERVICE_PORTS))?;
            let indices: BTreeSet<u32> = from
                .service_ports
                .keys()
                .chain(to.service_ports.keys())
                .copied()
                .collect();
            for at in indices {
                let (f, t) = (from.service_ports.get(&at), to.service_ports.get(&at));
                if f != t {
                    ports
                        .set(at, t.copied().unwrap_or(0), 0)
                        .map_err(map_err(map::SERVICE_PORTS))?;
                }
            }
        }
        self.write_sources(&from.sources, &to.sources)
    }
}

/// A map key as a prefix.
pub(crate) fn net<const N: usize>((bytes, len): &LpmParts<N>) -> Option<IpNet>
where
    IpAddr: From<[u8; N]>,
{
    IpNet::new(IpAddr::from(*bytes), u8::try_from(*len).ok()?).ok()
}

/// The entries both `old` and `new` have, each with the bits both give
/// it; none left empty.
fn both_masks<K: Ord + Copy>(old: &BTreeMap<K, u64>, new: &BTreeMap<K, u64>) -> BTreeMap<K, u64> {
    old.iter()
        .filter_map(|(k, o)| {
            let m = o & new.get(k)?;
            (m != 0).then_some((*k, m))
        })
        .collect()
}

/// Each prefix of `own` with its mask joined with the masks of every prefix
/// of `own` that contains it: what the kernel's longest match then finds
/// for an address is the union of all the prefixes holding it. In key
/// order a prefix comes right after the prefixes containing it, so one
/// pass with a stack of the open ones does it.
pub(crate) fn inherited<const N: usize>(
    own: &BTreeMap<LpmParts<N>, u64>,
) -> BTreeMap<LpmParts<N>, u64> {
    let mut open: Vec<(LpmParts<N>, u64)> = Vec::new();
    let mut out = Vec::with_capacity(own.len());
    for (&key, &mask) in own {
        while open.last().is_some_and(|(outer, _)| !contains(outer, &key)) {
            open.pop();
        }
        let mask = mask | open.last().map_or(0, |(_, m)| *m);
        out.push((key, mask));
        open.push((key, mask));
    }
    out.into_iter().collect()
}

/// Whether prefix `outer` contains prefix `inner`.
fn contains<const N: usize>((net, len): &LpmParts<N>, (addr, inner_len): &LpmParts<N>) -> bool {
    if len > inner_len {
        return false;
    }
    let whole = (*len / 8) as usize;
    let rest = *len % 8;
    net[..whole] == addr[..whole]
        && (rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            net[whole] & mask == addr[whole] & mask
        })
}

/// Makes a trie (of peers, or of service sources) go from `from` to `to`.
fn sync_trie<const N: usize, V: aya::Pod + PartialEq>(
    map: &mut Map,
    name: &'static str,
    from: &BTreeMap<LpmParts<N>, V>,
    to: &BTreeMap<LpmParts<N>, V>,
) -> Result<(), TablesError> {
    let mut t: LpmTrie<_, [u8; N], V> = LpmTrie::try_from(map).map_err(map_err(name))?;
    for (key, len) in from.keys().filter(|k| !to.contains_key(k)) {
        t.remove(&Key::new(*len, *key)).map_err(map_err(name))?;
    }
    for ((key, len), info) in to {
        if from.get(&(*key, *len)) != Some(info) {
            t.insert(&Key::new(*len, *key), *info, 0)
                .map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// The grant bitmap words of one peer, keyed as the kernel looks them up.
fn grant_words(peer: u32, grants: &[Grant]) -> HashMap<GrantKey, u64> {
    let mut words: HashMap<GrantKey, u64> = HashMap::new();
    for g in grants {
        let Grant::Ports {
            protocol,
            first,
            last,
        } = *g
        else {
            continue;
        };
        for port in first..=last {
            let key = GrantKey {
                peer,
                protocol: protocol.number(),
                _pad0: 0,
                word: port >> 6,
            };
            *words.entry(key).or_default() |= 1 << (port & 63);
        }
    }
    words
}

/// The kernel's account of the memory map `data` takes: the `memlock`
/// line of its fd's fdinfo (what `bpftool map show` prints), which kernels
/// from 6.4 compute from the map's actual contents and older ones from its
/// size. `None` where the kernel does not say.
fn memlock(data: &MapData) -> Option<u64> {
    let fd = data.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

/// An LPM trie key's parts: address bytes and prefix length.
pub(crate) type LpmParts<const N: usize> = ([u8; N], u32);

fn check_peer_count(p: &TunnelPolicy) -> Result<(), TablesError> {
    if p.peers.len() > capacity::PEERS as usize {
        return Err(TablesError::TooMany {
            what: "tunnel.peer",
            count: p.peers.len(),
            limit: capacity::PEERS,
        });
    }
    Ok(())
}

/// What the peer tries hold for the peer at `index`.
fn peer_info(index: u32, peer: &Peer) -> PeerInfo {
    let icmp = if peer.grants.contains(&Grant::Icmp) {
        PEER_ICMP
    } else {
        0
    };
    // A reload passes through the flags both policies set (`narrowed`):
    // audit only where both audit, so the half-way state drops what
    // either policy would drop.
    let audit = if peer.mode == Mode::Audit {
        PEER_AUDIT
    } else {
        0
    };
    PeerInfo {
        index,
        flags: icmp | audit,
    }
}

/// The one entry of `map::FLOW_CONFIG`.
fn flow_config(flows: &FlowSettings, echo: EchoRate) -> FlowConfig {
    let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    FlowConfig {
        tcp_established_ns: ns(flows.tcp_established),
        tcp_closing_ns: ns(flows.tcp_closing),
        udp_ns: ns(flows.udp),
        icmp_ns: ns(flows.icmp),
        echo_ns_per_token: echo.ns_per_token,
        echo_burst: echo.burst,
        fragment_ns: ns(flows.fragment),
    }
}

/// Splits prefixes into LPM keys per family.
fn split_families(nets: &[IpNet]) -> (Vec<LpmParts<4>>, Vec<LpmParts<16>>) {
    let mut v4 = Vec::new();
    let mut v6 = Vec::new();
    for net in nets {
        match net {
            IpNet::V4(n) => v4.push((n.network().octets(), u32::from(n.prefix_len()))),
            IpNet::V6(n) => v6.push((n.network().octets(), u32::from(n.prefix_len()))),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests;
