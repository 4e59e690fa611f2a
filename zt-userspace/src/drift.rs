//! Drift: whether the kernel runs what the config and the runtime grants
//! say. `ztxdp check --live` asks once; the daemon asks every
//! `drift_check_interval` and writes a `drift` record when the answer
//! changes. Neither repairs anything: `ztxdp reload` rewrites the maps,
//! `ztxdp up` the programs.
//!
//! Three things are compared:
//! - **The programs on the config's interfaces.** Each of ztxdp's programs
//!   must sit on its hook (`zt_edge` on the edge's XDP hook, the flow
//!   recorders on clsact egress, `zt_tunnel` on the tunnel's clsact
//!   ingress), and be from this binary's BPF object: its
//!   `bpf_prog_info.tag` must equal the tag of the same program loaded
//!   from [`crate::BPF_OBJECT`]. The kernel computes the tag (a SHA-1 over
//!   the instructions as submitted, before the verifier rewrites them,
//!   with map references zeroed) at load, so it does not depend on the
//!   maps or on load-time settings, which live in a read-only map; it
//!   changes with the object's code. A program id would change with every
//!   load and a name can be copied. The daemon takes the tags of the
//!   programs it loaded; the command loads the object once, attaching
//!   nothing, to learn them.
//! - **Every policy map**, read back ([`Tables::contents`]) and compared
//!   with what the policy puts there ([`Contents::of`]): the edge's UDP
//!   ports and SSH allow-lists, the peer tries, grant words and ICMP
//!   flags, and the flow and echo settings.
//! - **Programs that are not ztxdp's** on the XDP, clsact and TCX hooks of
//!   those interfaces: a TCX program or an earlier clsact filter runs
//!   before ztxdp's and can let a packet through that ztxdp would drop.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Instant,
};

use aya::Ebpf;
use serde::Serialize;
use zt_common::{FlowConfig, GrantKey, PEER_ICMP, PeerInfo, map, program};

use crate::{
    attach::{self, AttachError, Attached, Hook, HookEntry},
    audit::record::Body,
    config::Config,
    grants::{self, GrantsError, GrantsLock, RuntimeGrants},
    identity::Identity,
    loader::{self, LoadError, LoadOptions},
    policy::{EdgePolicy, Grant, Protocol, TunnelPolicy},
    tables::{Contents, LpmParts, Tables, TablesError},
};

/// Why the check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error(transparent)]
    Grants(#[from] GrantsError),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error("loading this binary's BPF object to learn its programs' tags: {source}")]
    Load {
        #[source]
        source: LoadError,
    },
    #[error("reading the tag of program {name} of this binary's BPF object: {source}")]
    Tag {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },
}

/// `bpf_prog_info.tag` of each program of this binary's BPF object, by
/// program name.
#[derive(Clone, Debug, Default)]
pub struct Tags(BTreeMap<String, u64>);

impl Tags {
    /// Loads this binary's object into the kernel (verifying its programs,
    /// attaching nothing) and reads their tags; the object is unloaded
    /// again when this returns.
    ///
    /// # Errors
    /// When the object cannot be loaded.
    pub fn of_this_binary() -> Result<Self, DriftError> {
        let ebpf =
            loader::load(LoadOptions::default()).map_err(|source| DriftError::Load { source })?;
        Self::of(&ebpf)
    }

    /// The tags of the programs of an object loaded from
    /// [`crate::BPF_OBJECT`].
    ///
    /// # Errors
    /// When a program's information cannot be read.
    pub fn of(ebpf: &Ebpf) -> Result<Self, DriftError> {
        ebpf.programs()
            .map(|(name, p)| {
                let info = p.info().map_err(|source| DriftError::Tag {
                    name: name.to_owned(),
                    source,
                })?;
                Ok((name.to_owned(), info.tag()))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn get(&self, name: &str) -> Option<u64> {
        self.0.get(name).copied()
    }
}

/// The tunnel policy the kernel should enforce: the config's, with the
/// runtime grants file applied, read under the grants lock. The lock is
/// held until this is dropped, so that an `allow` between reading the
/// file and reading the maps does not show as a difference.
pub struct Expected {
    pub tunnel: Option<TunnelPolicy>,
    _lock: Option<GrantsLock>,
}

impl Expected {
    /// Reads the runtime grants of `config`, waiting for the grants lock.
    ///
    /// # Errors
    /// When the lock or the runtime grants file cannot be read.
    pub fn read(config: &Config) -> Result<Self, DriftError> {
        let lock = config
            .policy
            .tunnel
            .as_ref()
            .map(|t| GrantsLock::acquire(&t.runtime_grants))
            .transpose()?;
        Self::under(config, lock)
    }

    /// [`Self::read`], or `None` when another process holds the grants
    /// lock (an `allow` under way).
    ///
    /// # Errors
    /// When the lock or the runtime grants file cannot be read.
    pub fn try_read(config: &Config) -> Result<Option<Self>, DriftError> {
        let lock = match &config.policy.tunnel {
            Some(t) => match GrantsLock::try_acquire(&t.runtime_grants)? {
                Some(lock) => Some(lock),
                None => return Ok(None),
            },
            None => None,
        };
        Self::under(config, lock).map(Some)
    }

    fn under(config: &Config, lock: Option<GrantsLock>) -> Result<Self, DriftError> {
        let tunnel = match (&config.policy.tunnel, &lock) {
            (Some(t), Some(lock)) => Some(RuntimeGrants::load(lock.path())?.apply(t)),
            _ => None,
        };
        Ok(Self {
            tunnel,
            _lock: lock,
        })
    }
}

/// What a difference is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Area {
    /// One of ztxdp's programs.
    Program,
    /// A program (or tc filter) that is not ztxdp's, on a hook of one of
    /// the config's interfaces.
    ForeignProgram,
    /// The peers by index, against the running policy's identity.
    Peers,
    WireguardPorts,
    /// The `ssh` service's sources (`ssh_allow`).
    SshAllow,
    /// A port of an edge service, the `ssh` service's included.
    ServicePort,
    /// A source of an edge service other than `ssh`.
    ServiceSource,
    PeerAddress,
    Grant,
    /// The flow timeouts and the echo rate.
    Flows,
}

/// How the kernel differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// The config has it, the kernel does not.
    Missing,
    /// The kernel has it, the config does not.
    Extra,
    /// Something else runs where the program should.
    Replaced,
    /// Both have it, with other values.
    Differs,
}

/// One difference between the kernel and the policy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Difference {
    pub area: Area,
    pub change: Change,
    /// The tunnel peer, by its config name (`#N` for an index the config
    /// has no peer at).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The entry: `tcp/5432`, `10.77.0.2/32`, `zt_edge`, `udp_timeout`, ...
    pub item: String,
    /// What the kernel has instead, where it has something else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// What `check --live` prints for it.
    pub text: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The answer of one check.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub in_sync: bool,
    /// The config compared with, and the SHA-256 of its text.
    pub config: PathBuf,
    pub config_sha256: String,
    /// When the running programs' identity names another config text:
    /// the config they were loaded from, and its SHA-256.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loaded_from: Option<(PathBuf, String)>,
    pub differences: Vec<Difference>,
}

/// Compares what the kernel runs in this network namespace with `config`
/// and `expected` (its tunnel policy with the runtime grants), taking
/// `tags` as the tags of ztxdp's programs.
///
/// # Errors
/// When netlink, a program or a map cannot be read.
pub async fn check(
    config: &Config,
    expected: &Expected,
    tags: &Tags,
) -> Result<Report, DriftError> {
    let handle = attach::connect()?;
    let slots = slots(config);
    let interfaces: BTreeSet<&str> = slots.iter().map(|s| s.interface.as_str()).collect();
    let mut found = Vec::new();
    for &interface in &interfaces {
        match attach::hooks(&handle, interface).await {
            Ok(entries) => found.extend(entries.into_iter().map(|e| (interface.to_owned(), e))),
            // Its programs are reported missing.
            Err(AttachError::NoInterface { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let ours = attach::find(&handle).await?;
    let (mut differences, matched) = compare_programs(&slots, &found, tags);
    differences.extend(elsewhere(&ours, &interfaces));
    let (load, others) = one_load(&matched);
    differences.extend(others);
    let names = peer_names(expected.tunnel.as_ref());
    if !load.is_empty() {
        let tables = Tables::from_map_ids(&load)?;
        let kernel = tables.contents()?;
        let want = Contents::of(
            config.policy.edge.as_ref(),
            expected.tunnel.as_ref(),
            &config.policy.flows,
        )?;
        let services = service_names(config.policy.edge.as_ref());
        differences.extend(compare_maps(
            &want,
            &kernel,
            &|m| tables.has(m),
            &names,
            &services,
        ));
    }
    let running = Identity::live(&ours)?;
    if let Some(r) = &running {
        let running_names: Vec<&str> = r.peers.iter().map(|p| p.name.as_str()).collect();
        if running_names != names.iter().map(String::as_str).collect::<Vec<_>>() {
            differences.push(Difference {
                area: Area::Peers,
                change: Change::Differs,
                peer: None,
                interface: None,
                item: "peers".into(),
                kernel: Some(running_names.join(", ")),
                text: format!(
                    "peers: the running programs hold [{}] by index, the config [{}]",
                    running_names.join(", "),
                    names.join(", ")
                ),
            });
        }
    }
    differences.sort();
    differences.dedup();
    Ok(Report {
        in_sync: differences.is_empty(),
        config: config.path.clone(),
        config_sha256: config.digest.clone(),
        loaded_from: running
            .filter(|r| r.digest != config.digest)
            .map(|r| (r.config, r.digest)),
        differences,
    })
}

/// Where one of ztxdp's programs should run.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    program: &'static str,
    interface: String,
    hook: Hook,
}

/// Where the config puts ztxdp's programs, in the order `up` attaches
/// them.
fn slots(config: &Config) -> Vec<Slot> {
    let edge = config.policy.edge.as_ref().map(|e| &e.interface);
    let tunnel = config.policy.tunnel.as_ref().map(|t| &t.interface);
    [
        (edge, program::EDGE_NAME, Hook::Xdp),
        (edge, program::EDGE_EGRESS_NAME, Hook::TcEgress),
        (tunnel, program::TUNNEL_NAME, Hook::TcIngress),
        (tunnel, program::TUNNEL_EGRESS_NAME, Hook::TcEgress),
    ]
    .into_iter()
    .filter_map(|(interface, program, hook)| {
        Some(Slot {
            program,
            interface: interface?.clone(),
            hook,
        })
    })
    .collect()
}

/// ztxdp's program names.
const OURS: [&str; 4] = [
    program::EDGE_NAME,
    program::EDGE_EGRESS_NAME,
    program::TUNNEL_NAME,
    program::TUNNEL_EGRESS_NAME,
];

/// A program found on a hook, for a reader.
fn describe(e: &HookEntry) -> String {
    match e.program_id {
        Some(id) => format!("{} (id {id})", e.name),
        None => format!("a {} filter", e.name),
    }
}

fn program_difference(
    change: Change,
    slot: &Slot,
    kernel: Option<String>,
    text: String,
) -> Difference {
    Difference {
        area: Area::Program,
        change,
        peer: None,
        interface: Some(slot.interface.clone()),
        item: slot.program.to_owned(),
        kernel,
        text,
    }
}

/// Compares the hooks of the config's interfaces (`found`: interface and
/// entry) with the slots. Returns the differences, and the entries that
/// are ztxdp's programs of this object in their slots.
fn compare_programs<'a>(
    slots: &[Slot],
    found: &'a [(String, HookEntry)],
    tags: &Tags,
) -> (Vec<Difference>, Vec<&'a HookEntry>) {
    let mut used = vec![false; found.len()];
    let mut out = Vec::new();
    let mut matched = Vec::new();
    for slot in slots {
        let here = |i: usize| {
            let (interface, e) = &found[i];
            !used[i] && *interface == slot.interface && e.hook == slot.hook
        };
        // Ours by name; in ztxdp's own tc slot first, should there be two.
        let mine = (0..found.len())
            .filter(|&i| here(i) && found[i].1.name == slot.program)
            .max_by_key(|&i| found[i].1.our_slot);
        let at = format!("{} {}", slot.interface, slot.hook.name());
        if let Some(i) = mine {
            used[i] = true;
            let e = &found[i].1;
            let want = tags.get(slot.program);
            if e.tag.is_some() && e.tag == want {
                matched.push(e);
            } else {
                let hex =
                    |t: Option<u64>| t.map_or_else(|| "?".to_owned(), |t| format!("{t:016x}"));
                out.push(program_difference(
                    Change::Replaced,
                    slot,
                    Some(describe(e)),
                    format!(
                        "program {} on {at}: {} is not from this binary's BPF object \
                         (tag {}, this binary's {})",
                        slot.program,
                        describe(e),
                        hex(e.tag),
                        hex(want)
                    ),
                ));
            }
            continue;
        }
        // What took its place: the interface's one XDP program, or a
        // filter in ztxdp's own tc slot.
        let in_place =
            (0..found.len()).find(|&i| here(i) && (slot.hook == Hook::Xdp || found[i].1.our_slot));
        if let Some(i) = in_place {
            used[i] = true;
            let e = &found[i].1;
            out.push(program_difference(
                Change::Replaced,
                slot,
                Some(describe(e)),
                format!(
                    "program {}: replaced on {at} by {}",
                    slot.program,
                    describe(e)
                ),
            ));
        } else {
            out.push(program_difference(
                Change::Missing,
                slot,
                None,
                format!("program {}: missing from {at}", slot.program),
            ));
        }
    }
    for (interface, e) in found
        .iter()
        .zip(&used)
        .filter(|(_, u)| !**u)
        .map(|(f, _)| f)
    {
        let at = format!("{interface} {}", e.hook.name());
        let ours = OURS.contains(&e.name.as_str()) && e.tag.is_some() && e.tag == tags.get(&e.name);
        out.push(Difference {
            area: if ours {
                Area::Program
            } else {
                Area::ForeignProgram
            },
            change: Change::Extra,
            peer: None,
            interface: Some(interface.clone()),
            item: e.name.clone(),
            kernel: Some(describe(e)),
            text: if ours {
                format!("program {}: extra on {at}", describe(e))
            } else {
                format!("foreign program on {at}: {}", describe(e))
            },
        });
    }
    (out, matched)
}

/// ztxdp's programs attached to interfaces the config does not name.
fn elsewhere(ours: &Attached, interfaces: &BTreeSet<&str>) -> Vec<Difference> {
    ours.edge
        .iter()
        .chain(&ours.tunnel)
        .chain(&ours.egress)
        .filter(|a| !interfaces.contains(a.interface.as_str()))
        .map(|a| Difference {
            area: Area::Program,
            change: Change::Extra,
            peer: None,
            interface: Some(a.interface.clone()),
            item: a.program.clone(),
            kernel: Some(format!("{} (id {})", a.program, a.program_id)),
            text: format!(
                "program {} (id {}): extra on {} ({}), an interface the config does not name",
                a.program, a.program_id, a.interface, a.mode
            ),
        })
        .collect()
}

/// The map ids of the first matched program's load (programs of one load
/// share their maps; two loads share none), and a difference for each
/// matched program of another load, whose maps are then not compared.
fn one_load(matched: &[&HookEntry]) -> (Vec<u32>, Vec<Difference>) {
    let Some(first) = matched.first() else {
        return (Vec::new(), Vec::new());
    };
    let mut ids: BTreeSet<u32> = first.map_ids.iter().copied().collect();
    let mut out = Vec::new();
    for e in &matched[1..] {
        if e.map_ids.iter().any(|id| first.map_ids.contains(id)) {
            ids.extend(&e.map_ids);
        } else {
            out.push(Difference {
                area: Area::Program,
                change: Change::Differs,
                peer: None,
                interface: None,
                item: e.name.clone(),
                kernel: Some(describe(e)),
                text: format!(
                    "program {}: loaded apart from {} (they share no map), so its maps are \
                     not compared",
                    describe(e),
                    describe(first)
                ),
            });
        }
    }
    (ids.into_iter().collect(), out)
}

/// Peer names by index.
fn peer_names(tunnel: Option<&TunnelPolicy>) -> Vec<String> {
    tunnel.map_or_else(Vec::new, |t| {
        t.peers.iter().map(|p| p.name.clone()).collect()
    })
}

/// Edge service names by bit: `ssh`, then the `[[edge.service]]` tables.
fn service_names(edge: Option<&EdgePolicy>) -> Vec<String> {
    edge.map_or_else(Vec::new, |e| {
        e.services().map(|s| s.name.to_owned()).collect()
    })
}

fn name_of(names: &[String], index: u32) -> String {
    names
        .get(index as usize)
        .cloned()
        .unwrap_or_else(|| format!("#{index}"))
}

/// A prefix as the config writes it.
fn prefix<const N: usize>((bytes, len): &LpmParts<N>) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(&bytes[..]) {
        format!("{}/{len}", Ipv4Addr::from(v4))
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&bytes[..16.min(N)]);
        format!("{}/{len}", Ipv6Addr::from(v6))
    }
}

fn entry_difference(
    area: Area,
    change: Change,
    peer: Option<String>,
    item: String,
    text: String,
) -> Difference {
    Difference {
        area,
        change,
        peer,
        interface: None,
        item,
        kernel: None,
        text,
    }
}

/// The differences between the maps' contents `want` (the policy) and
/// `kernel` (read back), for the maps `present` says the running programs
/// use; `names` are the peers by index, `services` the edge services by bit.
fn compare_maps(
    want: &Contents,
    kernel: &Contents,
    present: &dyn Fn(&'static str) -> bool,
    names: &[String],
    services: &[String],
) -> Vec<Difference> {
    let mut out = Vec::new();
    if present(map::EDGE_UDP_PORTS) {
        for (word, (w, k)) in (0u32..).zip(want.udp_ports.iter().zip(&kernel.udp_ports)) {
            for (bits, change) in [(w & !k, Change::Missing), (k & !w, Change::Extra)] {
                for bit in (0..64u32).filter(|b| bits & (1 << b) != 0) {
                    let port = word * 64 + bit;
                    out.push(entry_difference(
                        Area::WireguardPorts,
                        change,
                        None,
                        port.to_string(),
                        format!("wireguard_ports: {port} {}", word_of(change)),
                    ));
                }
            }
        }
    }
    if present(map::SERVICE_PORTS) {
        out.extend(mask_differences(
            &want.service_ports,
            &kernel.service_ports,
            services,
            |&at| {
                let (protocol, port) = if at >= 65_536 {
                    ("udp", at - 65_536)
                } else {
                    ("tcp", at)
                };
                format!("{protocol}/{port}")
            },
            |service, _| (Area::ServicePort, format!("service {service}:")),
        ));
    }
    // The ssh service's sources are `ssh_allow`, as before services.
    let source_area = |service: &str, bit: u32| {
        if bit == 0 {
            (Area::SshAllow, "ssh_allow:".to_owned())
        } else {
            (Area::ServiceSource, format!("service {service}: from"))
        }
    };
    if present(map::SOURCES_V4_16) {
        out.extend(mask_differences(
            &want.sources.v4_prefixes(),
            &kernel.sources.v4_prefixes(),
            services,
            prefix,
            source_area,
        ));
    }
    if present(map::SOURCES_V6) {
        out.extend(mask_differences(
            &want.sources.v6_prefixes(),
            &kernel.sources.v6_prefixes(),
            services,
            prefix,
            source_area,
        ));
    }
    let mut icmp = IcmpFlags::default();
    if present(map::PEER_V4) {
        out.extend(peer_entries(
            &want.peer_v4,
            &kernel.peer_v4,
            names,
            &mut icmp,
        ));
    }
    if present(map::PEER_V6) {
        out.extend(peer_entries(
            &want.peer_v6,
            &kernel.peer_v6,
            names,
            &mut icmp,
        ));
    }
    out.extend(icmp.differences(names));
    if present(map::GRANTS) {
        out.extend(grant_differences(&want.grants, &kernel.grants, names));
    }
    if present(map::FLOW_CONFIG) {
        out.extend(flow_differences(&want.flow_config, &kernel.flow_config));
    }
    out
}

/// The service bits one side gives an entry (a port, a source prefix)
/// and the other does not, one difference per entry and service:
/// `service https: tcp/443 missing`. `area` gives a service's area and
/// the words before the entry.
fn mask_differences<K: Ord>(
    want: &BTreeMap<K, u64>,
    kernel: &BTreeMap<K, u64>,
    services: &[String],
    item: impl Fn(&K) -> String,
    area: impl Fn(&str, u32) -> (Area, String),
) -> Vec<Difference> {
    let keys: BTreeSet<&K> = want.keys().chain(kernel.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let w = want.get(key).copied().unwrap_or(0);
        let k = kernel.get(key).copied().unwrap_or(0);
        for (bits, change) in [(w & !k, Change::Missing), (k & !w, Change::Extra)] {
            for bit in (0..u64::BITS).filter(|b| bits & (1 << b) != 0) {
                let service = name_of(services, bit);
                let (area, before) = area(&service, bit);
                let item = item(key);
                out.push(entry_difference(
                    area,
                    change,
                    None,
                    item.clone(),
                    format!("{before} {item} {}", word_of(change)),
                ));
            }
        }
    }
    out
}

const fn word_of(change: Change) -> &'static str {
    match change {
        Change::Missing => "missing",
        Change::Extra => "extra",
        Change::Replaced => "replaced",
        Change::Differs => "differs",
    }
}

/// Peer-trie entries whose ICMP flag differs, by peer index: the
/// addresses where the kernel lacks it, and where it has it unasked,
/// out of all the addresses both sides give that peer.
#[derive(Default)]
struct IcmpFlags {
    missing: BTreeMap<u32, Vec<String>>,
    extra: BTreeMap<u32, Vec<String>>,
    common: BTreeMap<u32, usize>,
}

impl IcmpFlags {
    /// `peer app-1: icmp missing`, with the addresses when only some of
    /// the peer's lack it.
    fn differences(&self, names: &[String]) -> Vec<Difference> {
        let mut out = Vec::new();
        for (flags, change) in [
            (&self.missing, Change::Missing),
            (&self.extra, Change::Extra),
        ] {
            for (index, addresses) in flags {
                let name = name_of(names, *index);
                let whole = self.common.get(index) == Some(&addresses.len());
                let text = if whole {
                    format!("peer {name}: icmp {}", word_of(change))
                } else {
                    format!(
                        "peer {name}: icmp {} for {}",
                        word_of(change),
                        addresses.join(", ")
                    )
                };
                out.push(entry_difference(
                    Area::Grant,
                    change,
                    Some(name),
                    "icmp".into(),
                    text,
                ));
            }
        }
        out
    }
}

/// The differences of one peer trie; ICMP flags go to `icmp`.
fn peer_entries<const N: usize>(
    want: &BTreeMap<LpmParts<N>, PeerInfo>,
    kernel: &BTreeMap<LpmParts<N>, PeerInfo>,
    names: &[String],
    icmp: &mut IcmpFlags,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for (key, w) in want {
        let p = prefix(key);
        match kernel.get(key) {
            None => {
                let name = name_of(names, w.index);
                out.push(entry_difference(
                    Area::PeerAddress,
                    Change::Missing,
                    Some(name.clone()),
                    p.clone(),
                    format!("peer {name}: address {p} missing"),
                ));
            }
            Some(k) if k.index != w.index => {
                let (kn, wn) = (name_of(names, k.index), name_of(names, w.index));
                out.push(Difference {
                    kernel: Some(kn.clone()),
                    ..entry_difference(
                        Area::PeerAddress,
                        Change::Differs,
                        Some(wn.clone()),
                        p.clone(),
                        format!("address {p}: peer {kn} in the kernel, {wn} in the config"),
                    )
                });
            }
            Some(k) => {
                *icmp.common.entry(w.index).or_default() += 1;
                let (w_icmp, k_icmp) = (w.flags & PEER_ICMP != 0, k.flags & PEER_ICMP != 0);
                if w_icmp && !k_icmp {
                    icmp.missing.entry(w.index).or_default().push(p);
                } else if k_icmp && !w_icmp {
                    icmp.extra.entry(w.index).or_default().push(p);
                }
            }
        }
    }
    for (key, k) in kernel.iter().filter(|(key, _)| !want.contains_key(*key)) {
        let (p, name) = (prefix(key), name_of(names, k.index));
        out.push(entry_difference(
            Area::PeerAddress,
            Change::Extra,
            Some(name.clone()),
            p.clone(),
            format!("peer {name}: address {p} extra"),
        ));
    }
    out
}

/// Grant words that differ, as the config writes grants:
/// `peer app-1: tcp/5432 missing`, ranges merged.
fn grant_differences(
    want: &HashMap<GrantKey, u64>,
    kernel: &HashMap<GrantKey, u64>,
    names: &[String],
) -> Vec<Difference> {
    // By peer index: ports missing and extra, as single-port grants.
    let mut by_peer: BTreeMap<u32, (Vec<Grant>, Vec<Grant>)> = BTreeMap::new();
    for key in want.keys().chain(kernel.keys()) {
        let w = want.get(key).copied().unwrap_or(0);
        let k = kernel.get(key).copied().unwrap_or(0);
        let protocol = match key.protocol {
            zt_common::proto::TCP => Protocol::Tcp,
            zt_common::proto::UDP => Protocol::Udp,
            // A key of no protocol the programs look up: nothing passes by it.
            _ => continue,
        };
        let entry = by_peer.entry(key.peer).or_default();
        for (bits, list) in [(w & !k, &mut entry.0), (k & !w, &mut entry.1)] {
            for bit in (0..64u16).filter(|b| bits & (1 << b) != 0) {
                let port = (key.word << 6) | bit;
                let g = Grant::Ports {
                    protocol,
                    first: port,
                    last: port,
                };
                if !list.contains(&g) {
                    list.push(g);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (index, (missing, extra)) in by_peer {
        let name = name_of(names, index);
        for (ports, change) in [(missing, Change::Missing), (extra, Change::Extra)] {
            for g in grants::effective(&ports, &[], &[]) {
                out.push(entry_difference(
                    Area::Grant,
                    change,
                    Some(name.clone()),
                    g.to_string(),
                    format!("peer {name}: {g} {}", word_of(change)),
                ));
            }
        }
    }
    out
}

/// The flow and echo settings that differ, by config key.
fn flow_differences(want: &FlowConfig, kernel: &FlowConfig) -> Vec<Difference> {
    let time = |ns: u64| {
        if ns.is_multiple_of(1_000_000_000) {
            format!("{} s", ns / 1_000_000_000)
        } else {
            format!("{ns} ns")
        }
    };
    let fields = [
        (
            "flows.tcp_established_timeout",
            want.tcp_established_ns,
            kernel.tcp_established_ns,
            true,
        ),
        (
            "flows.tcp_closing_timeout",
            want.tcp_closing_ns,
            kernel.tcp_closing_ns,
            true,
        ),
        ("flows.udp_timeout", want.udp_ns, kernel.udp_ns, true),
        ("flows.icmp_timeout", want.icmp_ns, kernel.icmp_ns, true),
        (
            "flows.fragment_timeout",
            want.fragment_ns,
            kernel.fragment_ns,
            true,
        ),
        (
            "edge.icmp_echo_rate",
            want.echo_ns_per_token,
            kernel.echo_ns_per_token,
            true,
        ),
        (
            "edge.icmp_echo_burst",
            want.echo_burst,
            kernel.echo_burst,
            false,
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, w, k, _)| w != k)
        .map(|(key, w, k, is_time)| {
            let show = |v: u64| if is_time { time(v) } else { v.to_string() };
            let what = if key == "edge.icmp_echo_rate" {
                " an echo"
            } else {
                ""
            };
            Difference {
                kernel: Some(show(k)),
                ..entry_difference(
                    Area::Flows,
                    Change::Differs,
                    None,
                    key.to_owned(),
                    format!(
                        "{key}: {}{what} in the config, {}{what} in the kernel",
                        show(w),
                        show(k)
                    ),
                )
            }
        })
        .collect()
}

/// How many differences a `drift` record lists; the rest are counted.
const SUMMARY_LINES: usize = 20;

/// The daemon's periodic check: the programs' tags, what the last check
/// found, and when the next is due.
pub struct Watch {
    tags: Tags,
    next: Instant,
    /// The differences the last check found; `None` before the first.
    last: Option<Vec<String>>,
    checks: u64,
}

impl Watch {
    /// A watch over the programs whose tags are `tags` (the daemon's own);
    /// the first check is one interval after the start.
    #[must_use]
    pub fn new(tags: Tags, config: &Config) -> Self {
        Self {
            tags,
            next: Instant::now() + config.policy.drift_check_interval,
            last: None,
            checks: 0,
        }
    }

    /// Whether the last check found a difference.
    #[must_use]
    pub fn drifted(&self) -> bool {
        self.last.as_ref().is_some_and(|l| !l.is_empty())
    }

    /// Checks made since the start.
    #[must_use]
    pub const fn checks(&self) -> u64 {
        self.checks
    }

    /// Checks `config` when a check is due (`drift_check_interval`, 0 =
    /// never) and no grant change holds the grants lock (then it tries
    /// again at the next call). Returns the `drift` record to write when
    /// the answer differs from the last one: in sync to drifted, drifted
    /// differently, back in sync. A check that fails is logged, and
    /// changes nothing.
    pub async fn tick(&mut self, config: &Config) -> Option<Body> {
        let interval = config.policy.drift_check_interval;
        if interval.is_zero() {
            // Turned off (by a reload, perhaps): nothing is known any more.
            self.last = None;
            return None;
        }
        if Instant::now() < self.next {
            return None;
        }
        let report = match Expected::try_read(config) {
            Ok(None) => return None,
            Ok(Some(expected)) => check(config, &expected, &self.tags).await,
            Err(e) => Err(e),
        };
        self.next = Instant::now() + interval;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the drift check failed");
                return None;
            }
        };
        self.checks += 1;
        let now: Vec<String> = report.differences.iter().map(|d| d.text.clone()).collect();
        if self.last.as_ref() == Some(&now) || (self.last.is_none() && now.is_empty()) {
            self.last = Some(now);
            return None;
        }
        if now.is_empty() {
            tracing::info!("the kernel runs the policy again");
        } else {
            tracing::warn!(
                differences = now.len(),
                "the kernel differs from the policy (`ztxdp check --live` shows how; \
                 `ztxdp reload` rewrites the maps): {}",
                now.join("; ")
            );
        }
        let body = Body::Drift {
            config_sha256: config.digest.clone(),
            differences: now.len() as u64,
            summary: now.iter().take(SUMMARY_LINES).cloned().collect(),
        };
        self.last = Some(now);
        Some(body)
    }
}

#[cfg(test)]
#[path = "drift_tests.rs"]
mod tests;
