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

mod maps;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    path::PathBuf,
    time::Instant,
};

use aya::Ebpf;
use maps::{compare_maps, peer_names, service_names};
use serde::Serialize;
use zt_common::program;

use crate::{
    attach::{self, AttachError, Attached, Hook, HookEntry},
    audit::record::Body,
    config::Config,
    grants::{GrantsError, GrantsLock, RuntimeGrants},
    identity::Identity,
    loader::{self, LoadError, LoadOptions},
    policy::TunnelPolicy,
    tables::{Contents, Tables, TablesError},
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
    /// Where the edge program looks for sources: which longer-prefix maps
    /// for a /16, which IPv6 lengths, the IPv6 trie.
    SourceLookup,
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
mod tests;
