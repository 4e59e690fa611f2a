//! Commands that act on the running programs from another process: `status`,
//! `down`, `allow`, `revoke`, `list`. They find our programs through netlink
//! in the current network namespace and open their maps by kernel id, so they
//! work from any `ip netns exec`, and after the daemon has died.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::programs::TcAttachType;
use serde::Serialize;
use zt_common::{PEER_AUDIT, program, reason};

use crate::{
    attach::{self, AttachError, Attached, Attachment},
    build_info::Build,
    config::{Config, GrantError, parse_cli_grant},
    grants::{GrantSet, GrantsError, GrantsLock, Merger, Origin, RuntimeGrants, Source},
    identity::{self, Identity},
    policy::{Grant, Mode, TunnelPolicy},
    report,
    tables::{Tables, TablesError},
};

/// Errors of the control commands.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error(transparent)]
    Grants(#[from] GrantsError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Confirm(#[from] crate::confirm::ConfirmError),
    #[error("cannot tell whether a daemon serves this network namespace ({})", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no ztxdp program is attached in this network namespace (is `ztxdp up` running?)")]
    NothingAttached,
    #[error("{config} has no [tunnel] section, so there are no peers to grant to")]
    NoTunnel { config: String },
    #[error("no peer named or owning address {peer:?}; peers are: {known}")]
    UnknownPeer { peer: String, known: String },
    #[error("no group named {group:?} (`@NAME` names a [[tunnel.group]]); groups are: {known}")]
    UnknownGroup { group: String, known: String },
    #[error(
        "the kernel holds the change for {done} of the {total} members of @{group}, \
         then failed; the runtime grants file has it: run the command again, or `ztxdp reload`"
    )]
    Members {
        group: String,
        done: usize,
        total: usize,
        #[source]
        source: Box<TablesError>,
    },
    #[error("bad grant {text:?}")]
    BadGrant {
        text: String,
        #[source]
        source: GrantError,
    },
}

/// One attached program, as `status` reports it.
#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    #[serde(flatten)]
    pub attachment: Attachment,
    /// Packets per reason name, summed over CPUs.
    pub counters: BTreeMap<&'static str, u64>,
    /// What each decision reason does to the packet: `pass` or `drop`.
    pub verdicts: BTreeMap<&'static str, &'static str>,
    /// Packets passed and dropped: the sums of the decision counters, with
    /// the would-drops of audit mode (counted under drop reasons, and in
    /// `would_drop`) among the passed.
    pub passed: u64,
    pub dropped: u64,
    /// `enforce` or `audit`, as the program was loaded (from the running
    /// policy's identity; `None` when it cannot be told). Not `mode`,
    /// which is the attach mode.
    pub policy_mode: Option<Mode>,
    /// The reasons that drop even in audit mode: the parser's refusals.
    pub drops_in_audit: Vec<&'static str>,
    /// Audited decisions: every drop, and each allowed new connection
    /// (`allows_audited`). The audit trail's `ztxdp.decisions` of this
    /// program sum to it (see "The audit trail" in the README).
    pub audited: u64,
    /// Entries in each set-like map.
    pub maps: BTreeMap<&'static str, usize>,
    /// The most entries each of `maps` can hold.
    pub capacity: BTreeMap<&'static str, u64>,
    /// The kernel memory each of `maps` takes, in bytes.
    pub memory: BTreeMap<&'static str, u64>,
    /// Tunnel only: per-peer packet counts.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerStatus>,
}

#[derive(Debug, Serialize)]
pub struct PeerStatus {
    pub index: u32,
    /// From the running policy's identity; `None` if it cannot be told.
    pub name: Option<String>,
    pub public_key: Option<String>,
    pub allowed: u64,
    /// Packets of the peer its policy drops; in audit mode they pass.
    pub denied: u64,
    /// The peer's mode, read from its entry in the kernel's peer tries.
    pub policy_mode: Mode,
}

/// The flow table, as `status` reports it.
#[derive(Debug, Serialize)]
pub struct FlowStatus {
    /// Flows in the table now (live or expired but not yet evicted).
    pub entries: usize,
    /// Flows the egress programs have created since load.
    pub created: u64,
    /// Flows the LRU pushed out to make room: created minus present. A
    /// growing number means `flows.max_entries` is too small.
    pub evicted: u64,
    /// Egress recorders attached, by interface.
    pub recorders: Vec<Attachment>,
}

/// The daemon behind the attached programs, as `status` reports it.
#[derive(Debug, Serialize)]
pub struct DaemonStatus {
    /// The daemon that attached or last reloaded the programs, while it
    /// runs; `None` after it died (`kill -9`) or when it cannot be told.
    pub pid: Option<u32>,
    /// Whether the namespace's events socket accepts a connection: a
    /// daemon is writing the audit trail. Without one the programs go on
    /// deciding and counting, but no decision is written.
    pub serving_events: bool,
    /// The config the programs were loaded from.
    pub config: Option<PathBuf>,
    /// Whether the daemon writes the audit trail, as it answers on its
    /// control socket; `None` when no daemon answers.
    pub audit: Option<crate::audit::Health>,
    /// The binary that loaded the programs, from the identity file.
    pub build: Option<Build>,
    /// Whether the programs came from this binary's BPF object (see
    /// [`Build::is_this_object`]); `None` when their build is unknown.
    pub this_binary: Option<bool>,
}

/// `ztxdp status`.
#[derive(Debug, Serialize)]
pub struct Status {
    pub daemon: DaemonStatus,
    /// The latest change made with `--confirm`: pending (with its
    /// deadline), confirmed or rolled back; `None` when there was none.
    pub confirmation: Option<crate::confirm::Confirmation>,
    #[serde(flatten)]
    pub programs: Programs,
}

/// What the attached programs count: `status` without the daemon, and
/// what the daemon's metrics report.
#[derive(Debug, Serialize)]
pub struct Programs {
    pub edge: Option<ProgramStatus>,
    pub tunnel: Option<ProgramStatus>,
    pub flows: Option<FlowStatus>,
}

fn program_status(
    a: &Attachment,
    prog: u32,
    running: Option<&Identity>,
) -> Result<ProgramStatus, ControlError> {
    let tables = Tables::from_map_ids(&a.map_ids)?;
    let by_code = tables.counters(prog)?;
    let counters = by_code
        .iter()
        .map(|(&code, &n)| (reason::name(code), n))
        .collect();
    let verdicts = reason::ALL
        .iter()
        .map(|&code| (reason::name(code), reason::class(code)))
        .collect();
    let (passed, dropped) = crate::tables::passed_dropped(&by_code);
    let maps = tables.fill_levels()?;
    let capacity = tables.capacities();
    let memory = tables.memory();
    let mut peers = Vec::new();
    if prog == program::TUNNEL {
        let indices = peer_indices(&tables)?;
        let max = indices.keys().max().map_or(0, |m| m + 1);
        let counts = tables.peer_counters(max)?;
        for (i, flags) in indices {
            let c = counts.get(i as usize).copied().unwrap_or_default();
            let known = running.and_then(|r| r.peers.get(i as usize));
            peers.push(PeerStatus {
                index: i,
                name: known.map(|p| p.name.clone()),
                public_key: known.and_then(|p| p.public_key.clone()),
                allowed: c.allowed,
                denied: c.denied,
                policy_mode: if flags & PEER_AUDIT == 0 {
                    Mode::Enforce
                } else {
                    Mode::Audit
                },
            });
        }
    }
    Ok(ProgramStatus {
        attachment: a.clone(),
        counters,
        verdicts,
        passed,
        dropped,
        policy_mode: running.and_then(|r| {
            if prog == program::TUNNEL {
                r.tunnel_mode
            } else {
                r.edge_mode
            }
        }),
        drops_in_audit: reason::ALL
            .iter()
            .filter(|&&code| reason::drops_in_audit(code))
            .map(|&code| reason::name(code))
            .collect(),
        audited: crate::audit::ledger::audited_of(|code| by_code.get(&code).copied().unwrap_or(0)),
        maps,
        capacity,
        memory,
        peers,
    })
}

/// Peer indices present in the peer maps, with their `PeerInfo` flags
/// (a peer's prefixes all carry the same).
fn peer_indices(tables: &Tables) -> Result<BTreeMap<u32, u32>, ControlError> {
    let (v4, v6) = tables.read_peers()?;
    Ok(v4
        .values()
        .chain(v6.values())
        .map(|info| (info.index, info.flags))
        .collect())
}

async fn attached() -> Result<Attached, ControlError> {
    let handle = attach::connect()?;
    let found = attach::find(&handle).await?;
    Ok(found)
}

/// What is attached here; nothing where netlink cannot be used (commands
/// then work on the config they are given, as with nothing running).
///
/// # Errors
/// When the kernel refuses (`EPERM`, `EACCES`): a process without the
/// privileges cannot tell what runs, and must not act as if nothing did.
async fn attached_if_known() -> Result<Attached, ControlError> {
    match attached().await {
        Err(e) if !report::refused(&e) => Ok(Attached::default()),
        other => other,
    }
}

/// The identity of the policy the programs attached here enforce (see
/// [`Identity::live`]); `None` when none runs or it cannot be told, as
/// where netlink is unavailable.
///
/// # Errors
/// When the kernel or the identity file refuses this process.
pub async fn running() -> Result<Option<Identity>, ControlError> {
    Ok(Identity::live(&attached_if_known().await?)?)
}

/// Where `allow`, `revoke` and `list` find their config (see
/// [`identity::config_path`]), and the running policy's identity to check
/// it against.
///
/// # Errors
/// See [`running`].
pub async fn discover(
    explicit: Option<&Path>,
) -> Result<(PathBuf, Option<Identity>), ControlError> {
    let running = running().await?;
    Ok((identity::config_path(explicit, running.as_ref()), running))
}

/// Where `events` and `export nft` find their config (see
/// [`identity::config_path`]); the running programs are asked only when
/// the user named none, so these work on a named file without privileges.
///
/// # Errors
/// See [`running`].
pub async fn config_path(explicit: Option<&Path>) -> Result<PathBuf, ControlError> {
    match identity::given_config(explicit) {
        Some(path) => Ok(path),
        None => Ok(discover(None).await?.0),
    }
}

/// Reports what is attached here, with counters and fill levels.
///
/// # Errors
/// When nothing is attached or the kernel objects cannot be read.
pub async fn status() -> Result<Status, ControlError> {
    let (programs, running) = programs().await?;
    Ok(Status {
        daemon: daemon_status(running.as_ref())?,
        confirmation: crate::confirm::status(),
        programs,
    })
}

/// The attached programs' counters and fill levels, and the identity of
/// the policy they enforce.
///
/// # Errors
/// When nothing is attached or the kernel objects cannot be read.
pub async fn programs() -> Result<(Programs, Option<Identity>), ControlError> {
    let found = attached().await?;
    if found.is_empty() {
        return Err(ControlError::NothingAttached);
    }
    let flows = match found.egress.first() {
        Some(a) => {
            let tables = Tables::from_map_ids(&a.map_ids)?;
            let created = tables
                .counters(program::EGRESS)?
                .get(&reason::FLOWS_CREATED)
                .copied()
                .unwrap_or(0);
            let entries = tables.fill_levels()?.get("flows").copied().unwrap_or(0);
            Some(FlowStatus {
                entries,
                created,
                evicted: created.saturating_sub(entries as u64),
                recorders: found.egress.clone(),
            })
        }
        None => None,
    };
    let running = Identity::live(&found)?;
    let programs = Programs {
        edge: found
            .edge
            .first()
            .map(|a| program_status(a, program::EDGE, running.as_ref()))
            .transpose()?,
        tunnel: found
            .tunnel
            .first()
            .map(|a| program_status(a, program::TUNNEL, running.as_ref()))
            .transpose()?,
        flows,
    };
    Ok((programs, running))
}

/// Whether the daemon of the running policy still runs, and whether a
/// daemon serves this namespace's events socket.
///
/// # Errors
/// When this process may not connect to the socket (it is root's): it
/// cannot tell, and must not report that no daemon writes the trail.
fn daemon_status(running: Option<&Identity>) -> Result<DaemonStatus, ControlError> {
    let serving_events = match crate::audit::stream::socket_path() {
        Ok(path) => match std::os::unix::net::UnixStream::connect(&path) {
            Ok(_) => true,
            Err(source) if report::refused_io(&source) => {
                return Err(ControlError::Socket { path, source });
            }
            Err(_) => false,
        },
        Err(_) => false,
    };
    let build = running.and_then(|r| r.build.clone());
    Ok(DaemonStatus {
        pid: running.map(|r| r.pid).filter(|&pid| is_ztxdp(pid)),
        serving_events,
        config: running.map(|r| r.config.clone()),
        audit: crate::reload::audit_health().ok(),
        this_binary: build.as_ref().map(Build::is_this_object),
        build,
    })
}

/// Whether `pid` is a live (not zombie) ztxdp process: a pid reused by
/// another program after the daemon died is not it.
pub(crate) fn is_ztxdp(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `PID (COMM) STATE ...`; COMM may hold spaces and parentheses.
    let Some((head, tail)) = stat.rsplit_once(") ") else {
        return false;
    };
    head.ends_with("(ztxdp") && !tail.starts_with(['Z', 'X'])
}

/// Removes every ztxdp program from this namespace; returns what was
/// removed, which is nothing when nothing was attached: the namespace is as
/// asked either way, so a second `down` (or one in a stop script) succeeds.
///
/// # Errors
/// When a detach fails.
pub async fn down() -> Result<Vec<Attachment>, ControlError> {
    let handle = attach::connect()?;
    let found = attach::find(&handle).await?;
    for a in &found.edge {
        attach::detach_xdp(&handle, a).await?;
    }
    for a in &found.tunnel {
        attach::detach_tc(&a.interface, TcAttachType::Ingress, &a.program)?;
    }
    for a in &found.egress {
        attach::detach_tc(&a.interface, TcAttachType::Egress, &a.program)?;
    }
    // Nothing of ours is attached now: whatever the file describes is gone.
    identity::forget(None);
    Ok(found
        .edge
        .into_iter()
        .chain(found.tunnel)
        .chain(found.egress)
        .collect())
}

/// The config's tunnel policy, or the error saying there is none.
fn tunnel_of(config: &Config) -> Result<&TunnelPolicy, ControlError> {
    config
        .policy
        .tunnel
        .as_ref()
        .ok_or_else(|| ControlError::NoTunnel {
            config: config.path.display().to_string(),
        })
}

/// A peer by name, or by an address inside one of its prefixes.
fn resolve_peer(tunnel: &TunnelPolicy, peer: &str) -> Result<usize, ControlError> {
    let by_name = tunnel.peers.iter().position(|p| p.name == peer);
    let by_addr = || {
        let ip: IpAddr = peer.parse().ok()?;
        tunnel
            .peers
            .iter()
            .position(|p| p.addresses.iter().any(|n| n.contains(&ip)))
    };
    by_name
        .or_else(by_addr)
        .ok_or_else(|| ControlError::UnknownPeer {
            peer: peer.to_owned(),
            known: tunnel
                .peers
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The attached tunnel program enforcing `tunnel`: the one on its
/// interface, else (`up --tunnel-iface`) the one there is.
fn tunnel_attachment<'a>(found: &'a Attached, tunnel: &TunnelPolicy) -> Option<&'a Attachment> {
    found
        .tunnel
        .iter()
        .find(|a| a.interface == tunnel.interface)
        .or(found.tunnel.first())
}

/// What `allow` and `revoke` change: one peer, or a group's members.
#[derive(Clone, Copy)]
enum Target {
    Peer(usize),
    Group(usize),
}

/// `@NAME` as a group of `tunnel`, anything else as a peer.
fn resolve_target(tunnel: &TunnelPolicy, text: &str) -> Result<Target, ControlError> {
    let Some(name) = text.strip_prefix('@') else {
        return resolve_peer(tunnel, text).map(Target::Peer);
    };
    tunnel
        .groups
        .iter()
        .position(|g| g.name == name)
        .map(Target::Group)
        .ok_or_else(|| ControlError::UnknownGroup {
            group: name.to_owned(),
            known: if tunnel.groups.is_empty() {
                "none (the config has no [[tunnel.group]])".to_owned()
            } else {
                tunnel
                    .groups
                    .iter()
                    .map(|g| format!("@{}", g.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
}

/// Whether a runtime grant change reached a running program.
#[derive(Debug, Serialize)]
pub struct GrantChange {
    /// The peer's name, or `@` and the group's.
    pub target: String,
    pub grant: String,
    /// The peer, or every member of the group, with its grants after the
    /// change.
    pub peers: Vec<PeerChange>,
    /// False when no tunnel program is attached here: the change is saved
    /// and applies at the next `up`.
    pub live: bool,
}

/// One peer's grants after an `allow` or `revoke`.
#[derive(Debug, Serialize)]
pub struct PeerChange {
    pub name: String,
    /// Its effective grants after the change.
    pub grants: Vec<String>,
    /// Why the change did not give it the whole grant (an `allow`: the
    /// peer's own revoke wins), or did not take it all away (a `revoke` of
    /// a group: another source still grants it).
    pub note: Option<String>,
}

/// `ztxdp allow` (`allow = true`) and `ztxdp revoke` of a peer, or with
/// `@NAME` of a group: validates everything first, then saves the runtime
/// grants atomically, then updates the running program for the peer or
/// every member, which enforces the change from the next packet on. It
/// returns only once the kernel holds the change for every peer it
/// touches.
///
/// The grants lock is held from reading the file until the kernel holds the
/// change, so concurrent changes apply one after the other (none undoes
/// another), and an `up` starting meanwhile fills its maps either before
/// the change (which then finds and updates the new program) or after it.
///
/// # Errors
/// On an unknown peer or group or a bad grant (nothing is changed), a
/// failed write, or a map update that failed (then the error says for how
/// many members the kernel holds the change).
pub async fn change_grant(
    config: &Config,
    target: &str,
    grant: &str,
    allow: bool,
) -> Result<GrantChange, ControlError> {
    let tunnel = tunnel_of(config)?;
    let target = resolve_target(tunnel, target)?;
    let grant: Grant = parse_cli_grant(grant).map_err(|source| ControlError::BadGrant {
        text: grant.to_owned(),
        source,
    })?;
    // A rollback would put back the grants the change replaced, and
    // with them undo this one.
    crate::confirm::refuse_if_pending()?;
    let lock = GrantsLock::acquire(&tunnel.runtime_grants)?;
    let mut runtime = RuntimeGrants::load(lock.path())?;
    let (label, members) = match target {
        Target::Peer(index) => {
            let name = &tunnel.peers[index].name;
            if allow {
                runtime.allow(name, grant);
            } else {
                runtime.revoke(name, grant);
            }
            (name.clone(), vec![index])
        }
        Target::Group(index) => {
            let group = &tunnel.groups[index];
            if allow {
                runtime.allow_group(&group.name, grant);
            } else {
                runtime.revoke_group(&group.name, grant);
            }
            (format!("@{}", group.name), group.members.clone())
        }
    };
    runtime.save(&lock)?;
    let merged = runtime.apply(tunnel);
    let found = attached().await?;
    let live = match tunnel_attachment(&found, tunnel) {
        Some(a) => {
            let mut tables = Tables::from_map_ids(&a.map_ids)?;
            for (done, &index) in members.iter().enumerate() {
                // Indices are positions in the config, bounded by capacity::PEERS.
                let set = tables.set_peer(
                    u32::try_from(index).unwrap_or(u32::MAX),
                    &merged.peers[index],
                );
                match (set, target) {
                    (Ok(()), _) => {}
                    (Err(source), Target::Peer(_)) => return Err(source.into()),
                    (Err(source), Target::Group(g)) => {
                        return Err(ControlError::Members {
                            group: tunnel.groups[g].name.clone(),
                            done,
                            total: members.len(),
                            source: Box::new(source),
                        });
                    }
                }
            }
            true
        }
        None => false,
    };
    drop(lock);
    let by_source = Merger::new(tunnel, &runtime);
    let changed = GrantSet::of(&[grant]);
    let peers = members
        .iter()
        .map(|&index| PeerChange {
            name: tunnel.peers[index].name.clone(),
            grants: strings(&merged.peers[index].grants),
            note: change_note(tunnel, &by_source, index, &changed, allow),
        })
        .collect();
    Ok(GrantChange {
        target: label,
        grant: grant.to_string(),
        peers,
        live,
    })
}

fn strings(grants: &[Grant]) -> Vec<String> {
    grants.iter().map(ToString::to_string).collect()
}

/// What of `changed` peer `index` still has after a revoke, and from
/// where, or lacks after an allow, and why; `None` when the change took
/// or gave it all.
fn change_note(
    tunnel: &TunnelPolicy,
    merger: &Merger<'_>,
    index: usize,
    changed: &GrantSet,
    allow: bool,
) -> Option<String> {
    let effective = merger.effective(index);
    let name = &tunnel.peers[index].name;
    if allow {
        let missing = changed.difference(&effective);
        return (!missing.is_empty()).then(|| {
            format!(
                "{name} does not get {}: it is revoked for {name} itself, which wins over \
                 groups (`ztxdp allow {name} ...` lifts it)",
                strings(&missing.grants()).join(" ")
            )
        });
    }
    let kept = changed.intersection(&effective);
    if kept.is_empty() {
        return None;
    }
    let from: Vec<String> = merger
        .sources(index)
        .iter()
        .filter(|s| !s.grants.intersection(&kept).is_empty())
        .map(|s| source_name(tunnel, s))
        .collect();
    Some(format!(
        "{name} keeps {}: {}",
        strings(&kept.grants()).join(" "),
        from.join(", ")
    ))
}

/// Where a grant comes from, for a reader.
fn source_name(tunnel: &TunnelPolicy, s: &Source) -> String {
    let group = s.group.and_then(|g| tunnel.groups.get(g)).map(|g| &g.name);
    match (s.origin, group) {
        (Origin::Peer, _) => "its own grant in the config".to_owned(),
        (Origin::Group, Some(g)) => format!("group @{g} in the config"),
        (Origin::Runtime, Some(g)) => format!("group @{g}'s runtime grant"),
        // A group's sources always name it.
        (Origin::Runtime | Origin::Group, None) => "its own runtime grant".to_owned(),
    }
}

/// One peer's effective grants, for `ztxdp list`.
#[derive(Debug, Serialize)]
pub struct PeerGrants {
    pub name: String,
    pub addresses: Vec<String>,
    pub public_key: Option<String>,
    /// What the files say: the config (the peer's own grants and its
    /// groups') plus the runtime changes.
    pub grants: Vec<String>,
    /// The groups the peer is in, in file order.
    pub groups: Vec<String>,
    /// Where `grants` come from: what each source gives the peer.
    pub sources: Vec<GrantSource>,
    /// Runtime changes to the peer itself on top of the config file.
    pub added: Vec<String>,
    pub revoked: Vec<String>,
    /// What the running tunnel program enforces, read from its maps;
    /// `None` when no tunnel program runs here.
    pub kernel: Option<Vec<String>>,
    /// The kernel enforces something other than `grants` (a change made
    /// to the files but not to the kernel, or the reverse).
    pub differs: bool,
}

/// What one source gives a peer, for `ztxdp list`.
#[derive(Debug, Serialize)]
pub struct GrantSource {
    /// `peer` (its own `allow` in the config), `group` (a group's `allow`
    /// in the config) or `runtime` (the runtime grants file, for the peer
    /// or, with `group`, for a group).
    pub from: Origin,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// What it gives, less what the runtime file revokes from the peer.
    pub grants: Vec<String>,
}

/// `ztxdp list`: the grants the files give each peer and, when a tunnel
/// program runs here, the ones it enforces. `config` must be the running
/// policy (see [`crate::identity::load_checked`]): a peer's kernel grants
/// are read at its index in `config`.
///
/// # Errors
/// When the config has no tunnel, or the runtime grants or the maps
/// cannot be read.
pub async fn list(config: &Config) -> Result<Vec<PeerGrants>, ControlError> {
    let tunnel = tunnel_of(config)?;
    let runtime = RuntimeGrants::load(&tunnel.runtime_grants)?;
    let merged = runtime.apply(tunnel);
    let by_source = Merger::new(tunnel, &runtime);
    let group_name = |g: usize| tunnel.groups[g].name.clone();
    let found = attached_if_known().await?;
    let tables = tunnel_attachment(&found, tunnel)
        .map(|a| Tables::from_map_ids(&a.map_ids))
        .transpose()?;
    let mut out = Vec::new();
    for (index, p) in (0u32..).zip(&merged.peers) {
        let changes = runtime.peers.get(&p.name).cloned().unwrap_or_default();
        let grants = strings(&p.grants);
        let at = index as usize;
        let sources = by_source
            .sources(at)
            .iter()
            .map(|s| GrantSource {
                from: s.origin,
                group: s.group.map(group_name),
                grants: strings(&s.grants.grants()),
            })
            .collect();
        let kernel = tables
            .as_ref()
            .map(|t| t.peer_grants(index))
            .transpose()?
            .map(|g| g.iter().map(ToString::to_string).collect::<Vec<_>>());
        out.push(PeerGrants {
            name: p.name.clone(),
            addresses: p.addresses.iter().map(ToString::to_string).collect(),
            public_key: p.public_key.clone(),
            differs: kernel.as_ref().is_some_and(|k| *k != grants),
            grants,
            groups: by_source
                .groups_of(at)
                .iter()
                .map(|&g| group_name(g))
                .collect(),
            sources,
            added: changes.added,
            revoked: changes.revoked,
            kernel,
        });
    }
    Ok(out)
}
