//! The running programs as the reference model sees them: their policy
//! maps, their flow, echo and fragment tables, and the settings they were
//! loaded with, read by kernel map id (as `status` reads them) and turned
//! into a [`StatefulModel`].
//!
//! Reading changes nothing the programs use. Lookups and walks from user
//! space move no counter, refresh no flow, take no token and write no
//! event; the kernel's LRU maps do not even mark an entry used for a
//! lookup made through the `bpf` syscall (`htab_lru_map_lookup_elem_sys`).
//! The model decides on its own copy of the tables.

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    time::Duration,
};

use aya::maps::{MapData, MapError};
use ipnet::IpNet;
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use zt_common::{
    EDGE_AUDIT, EDGE_CONFIGURED, EdgeConfig, FLOW_ANSWER, FLOW_CLOSING, FlowConfig, FlowKey,
    FragmentKey, PEER_AUDIT, PEER_ICMP, SourceKey, global, reason,
};

use crate::{
    audit::record::Program,
    model::{Explanation, Fact, FlowEntry, StatefulModel},
    policy::{
        EchoRate, EdgePolicy, FlowSettings, Grant, Mode, Peer, PortRange, Protocol, Service,
        TunnelPolicy,
    },
    tables::{Contents, Tables, TablesError, net},
};

/// The kernel's name for the object's read-only data section, as a map.
const RODATA: &str = ".rodata";

/// Errors reading the running programs' state.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error("opening map id {id}: {source}")]
    Open {
        id: u32,
        #[source]
        source: MapError,
    },
    #[error("reading the programs' load-time settings (map {RODATA}): {source}")]
    Lookup {
        #[source]
        source: io::Error,
    },
    #[error("the programs have no {RODATA} map, so their load-time settings cannot be read")]
    NoSettings,
    #[error(
        "the running programs' {RODATA} holds {found} bytes where this ztxdp's holds {expected}: \
         they were loaded by another build of ztxdp; explain with that build, or `ztxdp up` again"
    )]
    OtherBuild { expected: u64, found: u64 },
    #[error("this ztxdp's BPF object has no {what}")]
    Object { what: &'static str },
}

/// What the programs were specialised with when they were loaded
/// (`loader::LoadOptions`), read back from their read-only data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Specialised {
    /// Loaded with an edge policy; without one the edge program drops all
    /// as `not_configured` (`up` never attaches it).
    pub edge: bool,
    /// The tunnel device has an Ethernet header.
    pub tunnel_l2: bool,
    /// `tunnel.link_local_neighbors`.
    pub tunnel_link_local: bool,
    /// The edge's mode (`EDGE_AUDIT` of its configuration).
    pub edge_mode: Mode,
    /// The tunnel's mode for packets of no peer (`TUNNEL_AUDIT`); a
    /// peer's own is in its entry.
    pub tunnel_mode: Mode,
}

/// The running programs' policy, the model of it, and their maps, open.
///
/// What the model looks up in the flow, echo and fragment tables depends
/// on the packet alone, never on what the tables hold: the flow it would
/// reply to or an ICMP error quotes, its source's echo bucket, its
/// datagram. So [`Self::explain`] asks the model twice: first with empty
/// tables, whose facts name those entries, then with just those entries
/// read from the kernel's maps at that moment. A few lookups, where
/// reading the tables whole would walk up to 65,536 flows.
pub struct Live {
    pub settings: Specialised,
    /// The policy maps, runtime grants included, when read.
    pub contents: Contents,
    /// The timeouts and echo rate in force (`ZT_FLOW_CFG`).
    pub flows: FlowSettings,
    /// The model of the policy, with empty tables.
    model: StatefulModel,
    tables: Tables,
}

impl Live {
    /// Reads the policy of the programs whose maps are `map_ids`, and
    /// keeps their maps open: an attached program's (as `status` finds
    /// them), or a loaded object's (`loader::map_ids`). Maps the programs
    /// do not use read as empty.
    ///
    /// # Errors
    /// When a map cannot be opened or read, or the programs come from
    /// another build of ztxdp.
    pub fn read(map_ids: &[u32]) -> Result<Self, LiveError> {
        let settings = specialised(map_ids)?;
        let tables = Tables::from_map_ids(map_ids)?;
        let contents = tables.contents()?;
        let flows = flow_settings(&contents.flow_config);
        let edge = edge_policy(&contents, settings);
        let tunnel = tunnel_policy(&contents, settings);
        Ok(Self {
            settings,
            model: StatefulModel::new(&edge, Some(&tunnel), &flows),
            contents,
            flows,
            tables,
        })
    }

    /// The mode `program` decides a packet of `peer` in.
    #[must_use]
    pub fn mode(&self, program: Program, peer: Option<u32>) -> Mode {
        match program {
            Program::Edge => self.model.edge_mode(),
            Program::Tunnel => self
                .model
                .tunnel_mode_of(peer)
                .unwrap_or(self.settings.tunnel_mode),
        }
    }

    /// The decision `program` would make on `packet` (as the program sees
    /// it: an Ethernet frame on the edge and on an Ethernet tunnel device,
    /// else the IP packet) arriving on interface `ifindex` at `now_ns`
    /// (`CLOCK_MONOTONIC_COARSE`, the programs' clock), with what it rested
    /// on: the policy as read, the flow, echo and fragment tables as they
    /// are now. The model decides on a copy of the entries: a second call
    /// meets the kernel's state, not the one this packet would leave.
    ///
    /// # Errors
    /// When a table cannot be read.
    pub fn explain(
        &self,
        program: Program,
        packet: &[u8],
        ifindex: u32,
        now_ns: u64,
    ) -> Result<Explanation, LiveError> {
        let probe = self.ask(self.model.clone(), program, packet, ifindex, now_ns);
        let mut model = self.model.clone();
        self.fill(&mut model, &probe.facts)?;
        let e = self.ask(model, program, packet, ifindex, now_ns);
        // Unconfigured, the edge program judges what parses as
        // `not_configured`, before any policy.
        Ok(
            if program == Program::Edge && !self.settings.edge && !parse_failure(e.reason) {
                Explanation {
                    reason: reason::DROP_NOT_CONFIGURED,
                    peer: None,
                    service: None,
                    facts: Vec::new(),
                }
            } else {
                e
            },
        )
    }

    fn ask(
        &self,
        mut model: StatefulModel,
        program: Program,
        packet: &[u8],
        ifindex: u32,
        now_ns: u64,
    ) -> Explanation {
        match program {
            Program::Edge => model.explain_edge(packet, ifindex, now_ns),
            Program::Tunnel => model
                .explain_tunnel(packet, self.settings.tunnel_l2, ifindex, now_ns)
                // The model is always built with a tunnel policy, the one
                // the maps hold, so this is never taken; with no policy no
                // source would belong to a peer.
                .unwrap_or_else(|| Explanation {
                    reason: reason::DROP_PEER_UNKNOWN,
                    peer: None,
                    service: None,
                    facts: Vec::new(),
                }),
        }
    }

    /// Puts into `model`'s tables the kernel's entries for what `facts`
    /// looked up.
    fn fill(&self, model: &mut StatefulModel, facts: &[Fact]) -> Result<(), LiveError> {
        let table = model.flows_mut();
        for fact in facts {
            match *fact {
                Fact::Flow { flow, .. } => {
                    let (local, ip_version) = key_bytes(flow.local);
                    let key = FlowKey {
                        ifindex: flow.ifindex,
                        local,
                        remote: key_bytes(flow.remote).0,
                        local_port: flow.local_port,
                        remote_port: flow.remote_port,
                        protocol: flow.protocol,
                        ip_version,
                        _pad: [0; 2],
                    };
                    if let Some(s) = self.tables.flow(&key)? {
                        let entry = FlowEntry {
                            last_seen_ns: s.last_seen_ns,
                            closing: s.flags & FLOW_CLOSING != 0,
                            answer: s.flags & FLOW_ANSWER != 0,
                        };
                        table.insert_flow(flow, entry);
                    }
                }
                Fact::Echo { source, .. } => {
                    let (addr, ip_version) = key_bytes(source);
                    let key = SourceKey {
                        addr,
                        ip_version,
                        _pad: [0; 3],
                    };
                    if let Some(b) = self.tables.echo_bucket(&key)? {
                        table.insert_echo_bucket(source, b.last_ns, b.tokens);
                    }
                }
                Fact::Fragment { datagram: d, .. } => {
                    let (src, ip_version) = key_bytes(d.src);
                    let key = FragmentKey {
                        ifindex: d.ifindex,
                        src,
                        dst: key_bytes(d.dst).0,
                        id: d.id,
                        protocol: d.protocol,
                        ip_version,
                        _pad: [0; 2],
                    };
                    if let Some(at) = self.tables.fragment(&key)? {
                        table.insert_fragment(d, at);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// An address as the programs' keys hold it (IPv4 in the first four of
/// 16 bytes), and its IP version.
fn key_bytes(ip: IpAddr) -> ([u8; 16], u8) {
    match ip {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            (bytes, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

/// A reason the parser gives, before any policy.
const fn parse_failure(code: u32) -> bool {
    matches!(
        code,
        reason::DROP_MALFORMED | reason::DROP_HEADER_LIMIT | reason::DROP_UNSUPPORTED_L3
    )
}

/// The timeouts of the flow configuration map.
fn flow_settings(c: &FlowConfig) -> FlowSettings {
    FlowSettings {
        tcp_established: Duration::from_nanos(c.tcp_established_ns),
        tcp_closing: Duration::from_nanos(c.tcp_closing_ns),
        udp: Duration::from_nanos(c.udp_ns),
        icmp: Duration::from_nanos(c.icmp_ns),
        fragment: Duration::from_nanos(c.fragment_ns),
        ..FlowSettings::default()
    }
}

/// The edge policy the maps hold. Only what the edge program reads is
/// there: no interface name.
fn edge_policy(c: &Contents, settings: Specialised) -> EdgePolicy {
    let wireguard_ports = (0u16..)
        .zip(&c.udp_ports)
        .flat_map(|(word, &bits)| ports_of(word, bits))
        .collect();
    let mut services: Vec<Service> = Vec::new();
    // What the program looks up, not every entry the maps hold (a block
    // whose lookups were cleared admits none of its /24s).
    let sources = c.sources.looked_up_entries();
    let (sources_v4, sources_v6) = (sources.v4_prefixes(), sources.v6_prefixes());
    let bits = c
        .service_ports
        .values()
        .chain(sources_v4.values())
        .chain(sources_v6.values())
        .fold(0u64, |a, m| a | m);
    let used = u64::BITS - bits.leading_zeros();
    for bit in 0..used.max(1) {
        let mask = 1u64 << bit;
        let mut ports: BTreeMap<Protocol, Vec<u16>> = BTreeMap::new();
        for (&at, _) in c.service_ports.iter().filter(|(_, m)| *m & mask != 0) {
            let (protocol, port) = if at >= 65_536 {
                (Protocol::Udp, at - 65_536)
            } else {
                (Protocol::Tcp, at)
            };
            ports
                .entry(protocol)
                .or_default()
                .push(u16::try_from(port).unwrap_or(u16::MAX));
        }
        // An address may reach what any entry holding it opens (the
        // trie's masks hold those of the prefixes containing them):
        // listing every entry with the bit admits the same addresses.
        // The maps hold a prefix expanded (0.0.0.0/0 is 65,536 blocks);
        // merged back, the model has as few to match as the config listed.
        let from = IpNet::aggregate(
            &sources_v4
                .iter()
                .filter(|(_, m)| *m & mask != 0)
                .filter_map(|(k, _)| net(k))
                .chain(
                    sources_v6
                        .iter()
                        .filter(|(_, m)| *m & mask != 0)
                        .filter_map(|(k, _)| net(k)),
                )
                .collect(),
        );
        let ports = ports
            .into_iter()
            .flat_map(|(protocol, sorted)| ranges(protocol, &sorted))
            .filter_map(|g| match g {
                Grant::Ports {
                    protocol,
                    first,
                    last,
                } => Some(PortRange {
                    protocol,
                    first,
                    last,
                }),
                Grant::Icmp => None,
            })
            .collect();
        services.push(Service {
            name: format!("#{bit}"),
            ports,
            from,
        });
    }
    // Bit 0 is the ssh service: its one TCP port and its sources. (A map
    // giving the bit other ports, which ztxdp never writes, is explained
    // by its first; `check --live` reports such a map.)
    let ssh = services.remove(0);
    EdgePolicy {
        interface: String::new(),
        mode: settings.edge_mode,
        wireguard_ports,
        ssh_port: ssh
            .ports
            .iter()
            .find(|r| r.protocol == Protocol::Tcp)
            .map_or(0, |r| r.first),
        ssh_allow: ssh.from,
        services,
        icmp_echo: EchoRate {
            ns_per_token: c.flow_config.echo_ns_per_token,
            burst: c.flow_config.echo_burst,
        },
    }
}

/// The tunnel policy the maps hold: peer `i` at position `i` (an index no
/// map entry names is a peer with nothing), its addresses from the peer
/// tries, its grants from its grant words, merged into ranges, and its
/// ICMP flag. Names, keys and the interface are not in the maps.
fn tunnel_policy(c: &Contents, settings: Specialised) -> TunnelPolicy {
    let mut peers: BTreeMap<u32, Peer> = BTreeMap::new();
    let tries = c
        .peer_v4
        .iter()
        .map(|(k, info)| (net(k), info))
        .chain(c.peer_v6.iter().map(|(k, info)| (net(k), info)));
    for (prefix, info) in tries {
        let p = peers.entry(info.index).or_insert_with(empty_peer);
        p.addresses.extend(prefix);
        p.mode = if info.flags & PEER_AUDIT == 0 {
            Mode::Enforce
        } else {
            Mode::Audit
        };
        if info.flags & PEER_ICMP != 0 && !p.grants.contains(&Grant::Icmp) {
            p.grants.push(Grant::Icmp);
        }
    }
    let mut ports: BTreeMap<(u32, Protocol), Vec<u16>> = BTreeMap::new();
    for (key, bits) in &c.grants {
        let protocol = match key.protocol {
            zt_common::proto::TCP => Protocol::Tcp,
            zt_common::proto::UDP => Protocol::Udp,
            _ => continue,
        };
        ports
            .entry((key.peer, protocol))
            .or_default()
            .extend(ports_of(key.word, *bits));
    }
    for ((index, protocol), mut list) in ports {
        list.sort_unstable();
        let p = peers.entry(index).or_insert_with(empty_peer);
        p.grants.extend(ranges(protocol, &list));
    }
    let count = peers.keys().next_back().map_or(0, |&last| last + 1);
    TunnelPolicy {
        interface: String::new(),
        mode: settings.tunnel_mode,
        peers: (0..count)
            .map(|i| peers.remove(&i).unwrap_or_else(empty_peer))
            .collect(),
        groups: Vec::new(),
        runtime_grants: std::path::PathBuf::new(),
        link_local_neighbors: settings.tunnel_link_local,
    }
}

fn empty_peer() -> Peer {
    Peer {
        name: String::new(),
        addresses: Vec::new(),
        public_key: None,
        grants: Vec::new(),
        mode: Mode::Enforce,
    }
}

/// The ports a port bitmap word holds: bit `b` of word `w` is port
/// `64 * w + b`. Most words are empty, and cost one test.
fn ports_of(word: u16, bits: u64) -> impl Iterator<Item = u16> {
    (bits != 0)
        .then_some(bits)
        .into_iter()
        .flat_map(move |bits| (0..64u16).filter(move |b| bits & (1 << b) != 0))
        .map(move |b| (word << 6) | b)
}

/// Sorted ports as the fewest grants: runs of consecutive ports as ranges.
fn ranges(protocol: Protocol, sorted: &[u16]) -> Vec<Grant> {
    let mut out: Vec<Grant> = Vec::new();
    for &port in sorted {
        match out.last_mut() {
            Some(Grant::Ports { last, .. }) if last.checked_add(1) == Some(port) => *last = port,
            _ => out.push(Grant::Ports {
                protocol,
                first: port,
                last: port,
            }),
        }
    }
    out
}

/// The load-time settings, from the programs' `.rodata` map and the
/// offsets of the globals in this binary's BPF object.
fn specialised(map_ids: &[u32]) -> Result<Specialised, LiveError> {
    let object = object::File::parse(crate::BPF_OBJECT)
        .map_err(|_| LiveError::Object { what: "ELF header" })?;
    let section = object.section_by_name(RODATA).ok_or(LiveError::Object {
        what: "read-only data section",
    })?;
    for &id in map_ids {
        let data = MapData::from_id(id).map_err(|source| LiveError::Open { id, source })?;
        let info = data
            .info()
            .map_err(|source| LiveError::Open { id, source })?;
        if info.name_as_str() != Some(RODATA) {
            continue;
        }
        let found = u64::from(info.value_size());
        if found != section.size() {
            return Err(LiveError::OtherBuild {
                expected: section.size(),
                found,
            });
        }
        let bytes = lookup_first(data.fd().as_fd(), info.value_size() as usize)
            .map_err(|source| LiveError::Lookup { source })?;
        let field = |name: &'static str, len: usize| {
            object
                .symbol_by_name(name)
                .and_then(|symbol| usize::try_from(symbol.address()).ok())
                .and_then(|at| bytes.get(at..at + len))
                .ok_or(LiveError::Object { what: name })
        };
        let edge = field(global::EDGE_CONFIG, size_of::<EdgeConfig>())?;
        let at = std::mem::offset_of!(EdgeConfig, flags);
        let flags = u32::from_ne_bytes([edge[at], edge[at + 1], edge[at + 2], edge[at + 3]]);
        let mode = |audit: bool| if audit { Mode::Audit } else { Mode::Enforce };
        return Ok(Specialised {
            edge: flags & EDGE_CONFIGURED != 0,
            tunnel_l2: field(global::TUNNEL_L2, 1)?[0] != 0,
            tunnel_link_local: field(global::TUNNEL_LINK_LOCAL, 1)?[0] != 0,
            edge_mode: mode(flags & EDGE_AUDIT != 0),
            tunnel_mode: mode(field(global::TUNNEL_AUDIT, 1)?[0] != 0),
        });
    }
    Err(LiveError::NoSettings)
}

/// `union bpf_attr` as `BPF_MAP_LOOKUP_ELEM` reads it (`linux/bpf.h`).
#[repr(C)]
struct LookupAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `BPF_MAP_LOOKUP_ELEM` of `enum bpf_cmd`.
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;

/// The value at key 0 of an array map whose values are `value_size`
/// bytes. aya's typed maps need the value's size at compile time; the
/// read-only data's size is the BPF object's.
fn lookup_first(fd: BorrowedFd<'_>, value_size: usize) -> io::Result<Vec<u8>> {
    let key = 0u32;
    let mut value = vec![0u8; value_size];
    let attr = LookupAttr {
        map_fd: u32::try_from(fd.as_raw_fd()).map_err(io::Error::other)?,
        _pad: 0,
        key: (&raw const key).addr() as u64,
        value: value.as_mut_ptr().addr() as u64,
        flags: 0,
    };
    // SAFETY: `attr` is a valid BPF_MAP_LOOKUP_ELEM request: the fd is
    // open, `key` points at a u32 (array keys), and `value` at
    // `value_size` writable bytes, the map's value size; all outlive the
    // call, which writes nothing else.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_ELEM,
            &raw const attr,
            size_of::<LookupAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}
