//! The BPF maps as one object: writing a policy into them, reading the
//! counters back. The same code serves a freshly loaded object (`up`) and
//! the maps of an already attached program found by kernel id (`status`,
//! `allow`, `revoke`), so the two can never disagree on the layout.

use std::{
    collections::{BTreeMap, HashMap},
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
    COUNTER_SLOTS, CpuState, FlowConfig, FlowKey, FlowState, FragmentKey, GrantKey, PEER_ICMP,
    PeerCounters, PeerInfo, capacity, counter_index, map, program, reason,
};

use crate::policy::{EchoRate, EdgePolicy, FlowSettings, Grant, Peer, TunnelPolicy};

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

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> TablesError {
    move |source| TablesError::Map { name, source }
}

/// Every map the programs share, by kernel name.
pub struct Tables {
    maps: HashMap<&'static str, Map>,
}

/// Map names `Tables` handles; a fresh object must have all of them.
const ALL_MAPS: [&str; 11] = [
    map::FLOWS,
    map::FLOW_CONFIG,
    map::ECHO_BUCKETS,
    map::EDGE_UDP_PORTS,
    map::SSH_ALLOW_V4,
    map::SSH_ALLOW_V6,
    map::CPU_STATE,
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
        Ok(Self { maps })
    }

    /// Opens the maps of an attached program from its map ids; this works
    /// from any process and mount namespace.
    ///
    /// # Errors
    /// When an id cannot be opened.
    pub fn from_map_ids(ids: &[u32]) -> Result<Self, TablesError> {
        let mut maps = HashMap::new();
        for &id in ids {
            let data = MapData::from_id(id).map_err(map_err("(by id)"))?;
            let info = data.info().map_err(map_err("(by id)"))?;
            let Some(name) = info
                .name_as_str()
                .and_then(|n| ALL_MAPS.iter().chain(&READ_ONLY_MAPS).find(|m| **m == n))
            else {
                continue;
            };
            maps.insert(*name, Map::from_map_data(data).map_err(map_err(name))?);
        }
        // A program only holds the maps it uses (the edge program has no peer
        // maps), so absence is reported when a missing map is used.
        Ok(Self { maps })
    }

    fn get(&mut self, name: &'static str) -> Result<&mut Map, TablesError> {
        self.maps
            .get_mut(name)
            .ok_or(TablesError::MissingMap { name })
    }

    fn get_ref(&self, name: &'static str) -> Result<&Map, TablesError> {
        self.maps.get(name).ok_or(TablesError::MissingMap { name })
    }

    /// Writes the edge policy's sets. Its settings (the SSH port, and whether
    /// there is an edge policy at all) were fixed when the programs were
    /// loaded ([`crate::loader::LoadOptions::ssh_port`]); the daemon attaches
    /// only after this returns, so a program never runs on half-filled maps.
    /// Crate-private: only [`crate::loader::load_filled`] calls it, with the
    /// policy it loaded the programs for, so the sets written here and the
    /// SSH port fixed at load always come from one policy.
    ///
    /// # Errors
    /// When a map update fails or a set exceeds its map.
    pub(crate) fn apply_edge(&mut self, p: &EdgePolicy) -> Result<(), TablesError> {
        let mut words = [0u64; capacity::PORT_BITMAP_WORDS as usize];
        for &port in &p.wireguard_ports {
            words[usize::from(port >> 6)] |= 1 << (port & 63);
        }
        let mut udp: Array<_, u64> = Array::try_from(self.get(map::EDGE_UDP_PORTS)?)
            .map_err(map_err(map::EDGE_UDP_PORTS))?;
        for (i, w) in (0u32..).zip(words) {
            udp.set(i, w, 0).map_err(map_err(map::EDGE_UDP_PORTS))?;
        }
        let (v4, v6) = split_families(&p.ssh_allow);
        for (what, n) in [
            ("edge.ssh_allow (IPv4)", v4.len()),
            ("edge.ssh_allow (IPv6)", v6.len()),
        ] {
            if n > capacity::SSH_ALLOW as usize {
                return Err(TablesError::TooMany {
                    what,
                    count: n,
                    limit: capacity::SSH_ALLOW,
                });
            }
        }
        let mut t4: LpmTrie<_, [u8; 4], u8> =
            LpmTrie::try_from(self.get(map::SSH_ALLOW_V4)?).map_err(map_err(map::SSH_ALLOW_V4))?;
        for (key, len) in &v4 {
            t4.insert(&Key::new(*len, *key), 1, 0)
                .map_err(map_err(map::SSH_ALLOW_V4))?;
        }
        let mut t6: LpmTrie<_, [u8; 16], u8> =
            LpmTrie::try_from(self.get(map::SSH_ALLOW_V6)?).map_err(map_err(map::SSH_ALLOW_V6))?;
        for (key, len) in &v6 {
            t6.insert(&Key::new(*len, *key), 1, 0)
                .map_err(map_err(map::SSH_ALLOW_V6))?;
        }
        Ok(())
    }

    /// Writes every peer of the tunnel policy: addresses, ICMP flag, grants.
    ///
    /// # Errors
    /// When a map update fails.
    pub fn apply_tunnel(&mut self, p: &TunnelPolicy) -> Result<(), TablesError> {
        if p.peers.len() > capacity::PEERS as usize {
            return Err(TablesError::TooMany {
                what: "tunnel.peer",
                count: p.peers.len(),
                limit: capacity::PEERS,
            });
        }
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
        let info = PeerInfo {
            index,
            flags: if peer.grants.contains(&Grant::Icmp) {
                PEER_ICMP
            } else {
                0
            },
        };
        let (v4, v6) = split_families(&peer.addresses);
        let mut t4: LpmTrie<_, [u8; 4], PeerInfo> =
            LpmTrie::try_from(self.get(map::PEER_V4)?).map_err(map_err(map::PEER_V4))?;
        for (key, len) in &v4 {
            t4.insert(&Key::new(*len, *key), info, 0)
                .map_err(map_err(map::PEER_V4))?;
        }
        let mut t6: LpmTrie<_, [u8; 16], PeerInfo> =
            LpmTrie::try_from(self.get(map::PEER_V6)?).map_err(map_err(map::PEER_V6))?;
        for (key, len) in &v6 {
            t6.insert(&Key::new(*len, *key), info, 0)
                .map_err(map_err(map::PEER_V6))?;
        }
        Ok(())
    }

    /// Writes the flow timeouts and the echo rate. Until this entry exists,
    /// nothing is admitted as a reply.
    ///
    /// # Errors
    /// When the map update fails.
    pub fn apply_flows(&mut self, flows: &FlowSettings, echo: EchoRate) -> Result<(), TablesError> {
        let ns = |d: std::time::Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let cfg = FlowConfig {
            tcp_established_ns: ns(flows.tcp_established),
            tcp_closing_ns: ns(flows.tcp_closing),
            udp_ns: ns(flows.udp),
            icmp_ns: ns(flows.icmp),
            echo_ns_per_token: echo.ns_per_token,
            echo_burst: echo.burst,
            fragment_ns: ns(flows.fragment),
        };
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
            &[reason::EVENTS_SUPPRESSED, reason::EVENTS_LOST]
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

    /// Every CPU's counters. Read through a read-only mapping of the
    /// (mmapable) state array, one 8-byte load per counter: a map lookup
    /// copies the entry with a plain `memcpy` while the programs add to it,
    /// which does not promise whole words, and a torn counter would put a
    /// wrong delta in the audit trail's `lost` records. (Per-CPU maps copy
    /// word by word; this array is not one, see `zt_common::CpuState`.)
    fn cpu_counters(&self) -> Result<Vec<[u64; COUNTER_SLOTS as usize]>, TablesError> {
        let m = self.get_ref(map::CPU_STATE)?;
        let entries = Array::<_, CpuState>::try_from(m)
            .map_err(map_err(map::CPU_STATE))?
            .len();
        let Map::Array(data) = m else {
            return Err(TablesError::MissingMap {
                name: map::CPU_STATE,
            });
        };
        let len = entries as usize * size_of::<CpuState>();
        let mmap_err = |source| TablesError::Mmap {
            name: map::CPU_STATE,
            source,
        };
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
        let states = base.cast::<CpuState>();
        let out = (0..entries as usize)
            .map(|cpu| {
                std::array::from_fn(|i| {
                    // SAFETY: inside the mapping (cpu < entries, i <
                    // COUNTER_SLOTS), page-aligned so every u64 is aligned;
                    // volatile because the programs write it meanwhile.
                    unsafe { (&raw const (*states.add(cpu)).counters[i]).read_volatile() }
                })
            })
            .collect();
        // SAFETY: the mapping made above, no longer used.
        if unsafe { libc::munmap(base, len) } != 0 {
            return Err(mmap_err(std::io::Error::last_os_error()));
        }
        Ok(out)
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

    /// Entries in each set-like map, for `status`.
    ///
    /// # Errors
    /// When a map cannot be walked.
    pub fn fill_levels(&self) -> Result<BTreeMap<&'static str, usize>, TablesError> {
        let mut out = BTreeMap::new();
        if let Some(m) = self.maps.get(map::SSH_ALLOW_V4) {
            let t: LpmTrie<_, [u8; 4], u8> =
                LpmTrie::try_from(m).map_err(map_err(map::SSH_ALLOW_V4))?;
            out.insert("ssh_allow_v4", t.keys().count());
        }
        if let Some(m) = self.maps.get(map::SSH_ALLOW_V6) {
            let t: LpmTrie<_, [u8; 16], u8> =
                LpmTrie::try_from(m).map_err(map_err(map::SSH_ALLOW_V6))?;
            out.insert("ssh_allow_v6", t.keys().count());
        }
        if let Some(m) = self.maps.get(map::PEER_V4) {
            let t: LpmTrie<_, [u8; 4], PeerInfo> =
                LpmTrie::try_from(m).map_err(map_err(map::PEER_V4))?;
            out.insert("peer_v4", t.keys().count());
        }
        if let Some(m) = self.maps.get(map::PEER_V6) {
            let t: LpmTrie<_, [u8; 16], PeerInfo> =
                LpmTrie::try_from(m).map_err(map_err(map::PEER_V6))?;
            out.insert("peer_v6", t.keys().count());
        }
        if let Some(m) = self.maps.get(map::GRANTS) {
            let g: BpfHashMap<_, GrantKey, u64> =
                BpfHashMap::try_from(m).map_err(map_err(map::GRANTS))?;
            out.insert("grant_words", g.keys().count());
        }
        if let Some(m) = self.maps.get(map::FLOWS) {
            let f: BpfHashMap<_, FlowKey, FlowState> =
                BpfHashMap::try_from(m).map_err(map_err(map::FLOWS))?;
            out.insert("flows", f.keys().count());
        }
        // Datagrams remembered for their later fragments, live or expired,
        // up to capacity::FRAGMENTS.
        if let Some(m) = self.maps.get(map::FRAGMENTS) {
            let f: BpfHashMap<_, FragmentKey, u64> =
                BpfHashMap::try_from(m).map_err(map_err(map::FRAGMENTS))?;
            out.insert("fragments", f.keys().count());
        }
        if let Some(m) = self.maps.get(map::EDGE_UDP_PORTS) {
            let udp: Array<_, u64> = Array::try_from(m).map_err(map_err(map::EDGE_UDP_PORTS))?;
            let ports: u32 = udp.iter().filter_map(Result::ok).map(u64::count_ones).sum();
            out.insert("udp_ports", ports as usize);
        }
        Ok(out)
    }
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

/// An LPM trie key's parts: address bytes and prefix length.
type LpmParts<const N: usize> = ([u8; N], u32);

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
