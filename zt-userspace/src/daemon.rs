//! `ztxdp up`: validate, load, fill, attach, then stream audit records until
//! told to stop.
//!
//! The order is what makes it safe: nothing is attached before the config
//! is valid and every map is filled, and a running ztxdp is replaced
//! atomically (`XDP_FLAGS_REPLACE`, tc filter replace), so there is no moment
//! without enforcement. A graceful stop (SIGINT, SIGTERM) removes what this
//! process attached, unless `--keep-attached`; a crash leaves it in place,
//! failing closed.

use std::{path::PathBuf, time::Duration};

use aya::{
    Ebpf,
    maps::RingBuf,
    programs::{SchedClassifier, TcAttachType, Xdp},
};
use tokio::signal::unix::SignalKind;
use zt_common::{map, program};

use crate::{
    adopt::{self, AdoptError, Pass},
    attach::{self, AttachError, Attachment, XdpMode},
    audit::{
        self, AuditError, Names, ServiceNames, Trail,
        kernel::Feed,
        ledger::LedgerEntry,
        record::{ChangeStage, Program},
        stream::Server,
    },
    config::{Config, ConfigError},
    confirm::{self, ConfirmError},
    drift,
    grants::{GrantsError, GrantsLock, GroupWatch, RuntimeGrants},
    identity::{self, Identity},
    loader::{self, LoadError},
    lockout::{self, LockoutError},
    metrics, notify,
    policy::TunnelPolicy,
    reload,
    tables::{Contents, FlowInterfaces, Tables, TablesError},
};

/// Why `up` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Lockout(#[from] LockoutError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Grants(#[from] GrantsError),
    #[error(transparent)]
    Metrics(#[from] metrics::MetricsError),
    #[error(transparent)]
    Drift(#[from] drift::DriftError),
    #[error("our own maps: {0}")]
    OwnMaps(#[from] AdoptError),
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
    #[error("the BPF object has no audit ring buffer ({name})")]
    NoRingBuffer { name: &'static str },
    #[error("audit ring buffer: {source}")]
    RingBuffer {
        #[source]
        source: std::io::Error,
    },
    #[error("installing a signal handler: {source}")]
    Signal {
        #[source]
        source: std::io::Error,
    },
}

/// What `up` was asked to do.
#[derive(Clone, Debug, Default)]
pub struct UpOptions {
    pub config: PathBuf,
    /// Overrides `edge.interface`.
    pub iface: Option<String>,
    /// Overrides `tunnel.interface`.
    pub tunnel_iface: Option<String>,
    /// Start even if the SSH session running us is not in `edge.ssh_allow`.
    pub allow_lockout: bool,
    /// On SIGINT or SIGTERM leave the programs attached, as a crash does.
    pub keep_attached: bool,
    /// `--dry-run`: audit mode for the whole config (and every reload of
    /// it), whatever its `mode` keys say.
    pub dry_run: bool,
    /// Put the previous policy back after this many seconds unless
    /// `ztxdp confirm` runs (see [`crate::confirm`]).
    pub confirm: Option<u64>,
}

/// What `up` put in place, reported once enforcement is live.
#[derive(Clone, Debug)]
pub struct Enforcing {
    pub edge: Option<(Attachment, XdpMode)>,
    pub tunnel: Option<Attachment>,
    /// Egress flow recorders.
    pub egress: Vec<Attachment>,
}

/// Runs the daemon until SIGINT or SIGTERM (then detaches, unless
/// `opts.keep_attached`). `ready` is called once, when enforcement is in
/// place.
///
/// # Errors
/// On any failure before enforcement starts (then nothing was changed) or
/// while writing the audit trail.
#[expect(
    clippy::too_many_lines,
    reason = "the start-up steps in their order, each with why it comes there"
)]
pub async fn up(
    opts: &UpOptions,
    ready: impl FnOnce(&Enforcing, Option<&confirm::Change>),
) -> Result<(), DaemonError> {
    opts.confirm.map(confirm::check_window).transpose()?;
    // Held until our programs are attached: a grant change made meanwhile
    // waits, then finds and updates them, instead of updating the programs
    // we replace after we read the file without it.
    let (config, tunnel_policy, grants_lock) = checked_config(opts)?;
    // After the wait for the grants lock, which a stop still interrupts;
    // from here on a stop waits for the loop (see `Signals`).
    let mut signals = Signals::new()?;
    // An old kernel is refused here, naming what it lacks, before anything
    // is loaded or attached.
    crate::probe::kernel().map_err(LoadError::from)?;

    let tunnel_l2 = tunnel_policy
        .as_ref()
        .is_some_and(|t| has_ethernet_header(&t.interface));
    let (mut ebpf, mut tables) = loader::load_filled(
        tunnel_l2,
        config.policy.edge.as_ref(),
        tunnel_policy.as_ref(),
        &config.policy.flows,
    )?;
    let tags = drift::Tags::of(&ebpf)?;
    let ring = ebpf
        .take_map(map::EVENTS)
        .ok_or(DaemonError::NoRingBuffer { name: map::EVENTS })?;
    let ring = RingBuf::try_from(ring).map_err(|e| DaemonError::RingBuffer {
        source: std::io::Error::other(e),
    })?;
    let summaries = audit::kernel::take_summaries(&mut ebpf)?;
    let mut trail = Trail::open(&config.policy.audit)?;
    // Bound before anything is attached: an address in use fails `up`
    // with nothing changed.
    let scrapes = match &config.policy.metrics {
        Some(m) => Some(metrics::bind(m.listen).await?),
        None => None,
    };

    let handle = attach::connect()?;
    let new_maps = adopt::Maps::open(&loader::map_ids(&ebpf))?;
    let ledger = new_maps.ledger()?.ok_or(AdoptError::NoLedger)?;
    // The state of the programs we replace: adopted before the swap, and
    // once more after it for what they recorded meanwhile. Held open until
    // the trail is ours: their audit maps hold what their daemon did not
    // write yet.
    let old_maps = open_replaced(&handle).await;
    let peers = tunnel_policy
        .as_ref()
        .map_or(0, |t| u32::try_from(t.peers.len()).unwrap_or(u32::MAX));
    adopt_state(old_maps.as_ref(), &new_maps, peers, Pass::BeforeSwap);
    // Nothing attached yet: a change awaiting confirmation refuses this
    // one before anything is.
    if old_maps.is_none() {
        confirm::forget_orphaned();
    }
    confirm::refuse_if_pending()?;
    // A stop before anything is attached ends `up` as the signal's default
    // action would have: the programs we would replace go on enforcing.
    if signals.stop_pending() {
        tracing::info!("stopped before attaching; nothing changed");
        return Ok(());
    }
    // Armed while the programs we replace still run: the watchdog holds
    // them from now on. Should attaching fail half way, it puts them back
    // at the deadline.
    let armed = opts
        .confirm
        .map(|seconds| confirm::arm(confirm::Command::Up, seconds, &config))
        .transpose()?;
    let enforcing = attach_all(&mut ebpf, &config, tunnel_policy.as_ref(), &handle).await?;
    adopt_state(old_maps.as_ref(), &new_maps, peers, Pass::AfterSwap);
    drop(new_maps);
    drop(grants_lock);
    let ids = ProgramIds::of(&enforcing);
    ids.record(&config, tunnel_policy.as_ref());
    if let Some(a) = &armed {
        trail.push(
            audit::record::now_ns(),
            a.change.record(ChangeStage::Change, "daemon"),
        );
    }
    ready(&enforcing, armed.as_ref().map(|a| &a.change));

    let mut feed = Feed::new(
        ring,
        summaries,
        names(&enforcing, &config, tunnel_policy.as_ref()),
    )?;
    let mut running = Running {
        opts,
        metrics: metrics::Shared::default(),
        drift: drift::Watch::new(tags, &config),
        config,
        tables: &mut tables,
        ids,
        last_reload: None,
        watchdog: armed.map(|a| a.child),
        before: None,
    };
    running.refresh_metrics(&trail);
    if let Some(listener) = scrapes {
        tokio::spawn(metrics::serve(listener, running.metrics.clone()));
    }
    notify::ready(&status_line(&enforcing, &running));
    let stop = stream_audit(
        &mut feed,
        &mut trail,
        &mut running,
        (&handle, &enforcing),
        (old_maps, ledger),
        signals,
    )
    .await;
    if matches!(stop, Ok(Stop::Signal)) {
        notify::stopping();
        if opts.keep_attached {
            // A service manager's stop or restart must not open the host
            // until the next `up` swaps in its programs.
            tracing::info!("stopping; the programs stay attached (--keep-attached)");
        } else {
            detach(&handle, &enforcing).await;
            identity::forget(Some((running.ids.edge, running.ids.tunnel)));
        }
    }
    let flushed = flush_audit(&mut feed, trail, &tables);
    stop?;
    Ok(flushed?)
}

/// The maps of the programs a new `up` replaces, held open so that they
/// outlive the swap; `None` when nothing of ours runs here, or they cannot
/// be opened (logged: the new programs then start empty, enforcement is not
/// at stake).
async fn open_replaced(handle: &rtnetlink::Handle) -> Option<adopt::Maps> {
    let old = match attach::find(handle).await {
        Ok(found) if !found.is_empty() => found.map_ids(),
        Ok(_) => return None,
        Err(e) => {
            tracing::warn!(error = %e, "could not find the programs being replaced");
            return None;
        }
    };
    adopt::Maps::open(&old)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "could not open the maps to adopt; starting empty");
        })
        .ok()
}

/// Adopts what the programs we replace know (see [`adopt`]). A failure
/// costs connections and counts, not enforcement: it is logged, and the
/// new programs start with what they have.
fn adopt_state(old: Option<&adopt::Maps>, new: &adopt::Maps, peers: u32, pass: Pass) {
    let Some(old) = old else {
        return;
    };
    match adopt::adopt(old, new, peers, pass) {
        Ok(a) => tracing::info!(
            ?pass,
            flows = a.flows,
            fragments = a.fragments,
            echo_sources = a.echo_sources,
            left_out = a.left_out,
            "adopted the state of the programs replaced"
        ),
        Err(e) => tracing::warn!(
            ?pass,
            error = %e,
            "could not adopt the state of the programs replaced; their flows are forgotten"
        ),
    }
}

/// Attaches the loaded programs where the config says, replacing ours
/// atomically where they run already: the egress recorders first, then the
/// edge, then the tunnel. Returns what is attached now.
async fn attach_all(
    ebpf: &mut Ebpf,
    config: &Config,
    tunnel_policy: Option<&TunnelPolicy>,
    handle: &rtnetlink::Handle,
) -> Result<Enforcing, DaemonError> {
    let before = attach::find(handle).await?;
    let mut enforcing = Enforcing {
        edge: None,
        tunnel: None,
        egress: Vec::new(),
    };
    // Egress recorders first: replies to flows started while the ingress
    // programs come up are then already known.
    let recorders = [
        (
            config.policy.edge.as_ref().map(|e| e.interface.clone()),
            program::EDGE_EGRESS_NAME,
        ),
        (
            tunnel_policy.map(|t| t.interface.clone()),
            program::TUNNEL_EGRESS_NAME,
        ),
    ];
    for (interface, name) in &recorders {
        let Some(interface) = interface else { continue };
        let prog: &mut SchedClassifier = loader::program_mut(ebpf, name)?;
        let replace = before
            .egress
            .iter()
            .any(|a| a.interface == *interface && a.program == *name);
        attach::attach_tc(prog, interface, TcAttachType::Egress, replace)?;
    }
    if let Some(edge) = &config.policy.edge {
        let prog: &mut Xdp = loader::program_mut(ebpf, program::EDGE_NAME)?;
        let fd = prog.fd().map_err(|source| LoadError::Program {
            name: program::EDGE_NAME,
            source,
        })?;
        let previous = before.edge.iter().find(|a| a.interface == edge.interface);
        let mode = attach::attach_xdp(handle, &edge.interface, fd, previous).await?;
        let now = attach::find(handle).await?;
        let a = now
            .edge
            .into_iter()
            .find(|a| a.interface == edge.interface)
            .ok_or_else(|| AttachError::NoInterface {
                interface: edge.interface.clone(),
            })?;
        enforcing.edge = Some((a, mode));
    }
    if let Some(t) = tunnel_policy {
        let prog: &mut SchedClassifier = loader::program_mut(ebpf, program::TUNNEL_NAME)?;
        let replace = before.tunnel.iter().any(|a| a.interface == t.interface);
        attach::attach_tc(prog, &t.interface, TcAttachType::Ingress, replace)?;
    }
    let now = attach::find(handle).await?;
    if let Some(t) = tunnel_policy {
        enforcing.tunnel = now.tunnel.into_iter().find(|a| a.interface == t.interface);
    }
    enforcing.egress = now
        .egress
        .into_iter()
        .filter(|a| {
            recorders
                .iter()
                .any(|(i, n)| i.as_deref() == Some(a.interface.as_str()) && *n == a.program)
        })
        .collect();
    Ok(enforcing)
}

/// The configuration with the command line's interface overrides, checked
/// against the interfaces and lockout, and the tunnel policy with the
/// runtime grants applied, read under the grants lock, which is returned.
fn checked_config(
    opts: &UpOptions,
) -> Result<(Config, Option<TunnelPolicy>, Option<GrantsLock>), DaemonError> {
    let mut config = Config::load(&opts.config)?;
    if opts.dry_run {
        config.policy.dry_run();
    }
    if let (Some(iface), Some(edge)) = (&opts.iface, config.policy.edge.as_mut()) {
        edge.interface.clone_from(iface);
    }
    if let (Some(iface), Some(tunnel)) = (&opts.tunnel_iface, config.policy.tunnel.as_mut()) {
        tunnel.interface.clone_from(iface);
    }
    config.check_enforces()?;
    config.check_interfaces()?;
    if let Some(edge) = &config.policy.edge
        && !opts.allow_lockout
    {
        lockout::check(
            std::env::var("SSH_CONNECTION").ok().as_deref(),
            &edge.ssh_allow,
        )?;
    }
    let (tunnel_policy, lock) = match &config.policy.tunnel {
        Some(t) => {
            let lock = GrantsLock::acquire(&t.runtime_grants)?;
            let policy = RuntimeGrants::load(lock.path())?.apply(t);
            (Some(policy), Some(lock))
        }
        None => (None, None),
    };
    Ok((config, tunnel_policy, lock))
}

/// What a reload needs: how the daemon was started, the config it
/// enforces (interface overrides applied), and the maps.
struct Running<'a> {
    opts: &'a UpOptions,
    config: Config,
    tables: &'a mut Tables,
    ids: ProgramIds,
    /// What scrapes of `metrics.listen` read besides the kernel's counters.
    metrics: metrics::Shared,
    /// The outcome of the last reload, for the service manager's status.
    last_reload: Option<String>,
    drift: drift::Watch,
    /// The confirmation watchdog this daemon started, reaped when it exits.
    watchdog: Option<std::process::Child>,
    /// What a `reload --confirm` replaced, until it is confirmed or rolled
    /// back.
    before: Option<Before>,
}

/// The policy a `reload --confirm` replaced: what the maps held, and its
/// config.
struct Before {
    contents: Contents,
    config: Config,
}

impl Running<'_> {
    /// Refreshes what the metrics endpoint reports of the daemon itself.
    fn refresh_metrics(&self, trail: &Trail) {
        let Ok(mut m) = self.metrics.lock() else {
            return;
        };
        m.health = trail.health().unwrap_or_default();
        m.syslog_queue = trail.syslog_queue();
        m.drifted = self.drift.drifted();
        m.drift_checks = self.drift.checks();
        if m.config_sha256 != self.config.digest {
            m.config_sha256.clone_from(&self.config.digest);
            m.loaded_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        }
    }
}

/// The kernel ids of the programs this daemon attached, which its
/// identity file names, and of the interfaces they run on, which the
/// flow table's keys name.
#[derive(Clone, Copy, Debug)]
struct ProgramIds {
    edge: Option<u32>,
    tunnel: Option<u32>,
    interfaces: FlowInterfaces,
}

impl ProgramIds {
    fn of(enforcing: &Enforcing) -> Self {
        Self {
            edge: enforcing.edge.as_ref().map(|(a, _)| a.program_id),
            tunnel: enforcing.tunnel.as_ref().map(|a| a.program_id),
            interfaces: FlowInterfaces {
                edge: enforcing.edge.as_ref().map(|(a, _)| a.ifindex),
                tunnel: enforcing.tunnel.as_ref().map(|a| a.ifindex),
            },
        }
    }

    /// Writes the identity file for `config` enforced by these programs.
    /// Enforcement does not depend on it, so a failure is logged: commands
    /// then find no live identity and use the config they are given.
    fn record(self, config: &Config, tunnel: Option<&TunnelPolicy>) {
        if let Err(e) = Identity::new(config, tunnel, self.edge, self.tunnel).save() {
            tracing::warn!(error = %e, "`allow`, `revoke` and `list` will not find the running config by themselves");
        }
    }
}

/// Why a reload was refused. The running policy is then unchanged.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The message `ztxdp check` (or `up`) prints for this config.
    #[error(transparent)]
    Check(#[from] DaemonError),
    #[error(
        "{config}: {changed} changed, which cannot change in the running programs; \
         it needs a restart (`ztxdp up` again)"
    )]
    NeedsRestart { config: String, changed: String },
    #[error("the new policy does not fit the maps: {source}")]
    Contents {
        #[source]
        source: TablesError,
    },
    #[error("writing the new policy into the maps failed ({source}); the old one was put back")]
    Write {
        #[source]
        source: TablesError,
    },
    #[error(transparent)]
    Confirm(#[from] ConfirmError),
}

/// SIGHUP and `ztxdp reload`: re-reads the config file and the runtime
/// grants, validates them as `up` does, and swaps the maps' contents in
/// place ([`Tables::replace`]); the programs, flows, counters and the trail
/// go on. Everything is checked and computed before the first write.
fn reload(
    running: &mut Running<'_>,
    feed: &mut Feed,
    trail: &mut Trail,
    confirm: Option<u64>,
) -> Result<String, ReloadError> {
    confirm::refuse_if_pending()?;
    // Held to the end: an `allow` or `revoke` then waits for the swap, and
    // the swap for it, so neither undoes the other.
    let (config, tunnel, _grants_lock) = checked_config(running.opts)?;
    let changed = restart_only_changes(&running.config, &config);
    if !changed.is_empty() {
        return Err(ReloadError::NeedsRestart {
            config: running.opts.config.display().to_string(),
            changed: changed.join(", "),
        });
    }
    let new = Contents::of(
        config.policy.edge.as_ref(),
        tunnel.as_ref(),
        &config.policy.flows,
    )
    .map_err(|source| ReloadError::Contents { source })?;
    // Armed before the first write: from here on, the watchdog holds
    // what the maps hold now.
    let armed = confirm
        .map(|seconds| confirm::arm(confirm::Command::Reload, seconds, &config))
        .transpose()?;
    let before = swap(running, feed, trail, &new, config, tunnel.as_ref()).inspect_err(|_| {
        if let Some(a) = &armed {
            confirm::cancel(Some(a.change.watchdog_pid));
        }
    })?;
    let peers = tunnel.as_ref().map_or(0, |t| t.peers.len());
    let reloaded = format!(
        "reloaded {} ({peers} tunnel peers)",
        running.opts.config.display()
    );
    let Some(armed) = armed else {
        return Ok(reloaded);
    };
    running.before = Some(before);
    trail.push(
        audit::record::now_ns(),
        armed.change.record(ChangeStage::Change, "daemon"),
    );
    trail.commit();
    reap(&mut running.watchdog);
    running.watchdog = Some(armed.child);
    let deadline = armed.change.deadline;
    Ok(format!(
        "{reloaded}; it rolls back at {deadline} unless `ztxdp confirm` runs by then"
    ))
}

/// Writes `new` into the maps in place of what they hold, and makes
/// `config` the policy this daemon enforces (its peers' names in the
/// records, its identity file); returns what it replaced.
fn swap(
    running: &mut Running<'_>,
    feed: &mut Feed,
    trail: &mut Trail,
    new: &Contents,
    config: Config,
    tunnel: Option<&TunnelPolicy>,
) -> Result<Before, ReloadError> {
    let old = running
        .tables
        .contents()
        .map_err(|source| ReloadError::Write { source })?;
    // Events already queued were decided under the old peer indices: named
    // with the old names before the indices change.
    feed.drain(trail);
    replace_judged(running.tables, new, Some(&old), running.ids.interfaces)
        .map_err(|source| ReloadError::Write { source })?;
    feed.set_peers(peer_names(tunnel), GroupWatch::new(tunnel));
    feed.set_services(config.policy.edge.as_ref());
    running.ids.record(&config, tunnel);
    let replaced = std::mem::replace(&mut running.config, config);
    Ok(Before {
        contents: old,
        config: replaced,
    })
}

/// [`Tables::replace`] with `new`, putting `old` back if that fails, then
/// the UDP flows started meanwhile judged again ([`Tables::judge_answers`]):
/// one the host started between the halves was judged with a service or
/// peer closed that both policies open, and would keep a port open that a
/// later change closes. Judging is not the change: when the flow table
/// cannot be read or written it is skipped with a warning (those flows
/// admit replies until they expire, as before), and the change stands.
///
/// # Errors
/// The failed write of `new`; the maps then hold `old` again, or what a
/// failed write of it left.
pub(crate) fn replace_judged(
    tables: &mut Tables,
    new: &Contents,
    old: Option<&Contents>,
    interfaces: FlowInterfaces,
) -> Result<(), TablesError> {
    let skipped = |e: &TablesError| {
        tracing::warn!(
            error = %e,
            "flows started during the change keep admitting replies until they expire"
        );
    };
    let flows = tables.udp_flows().inspect_err(skipped).ok();
    let written = tables.replace(new);
    let mut now = new;
    if written.is_err()
        && let Some(old) = old
    {
        now = old;
        if let Err(e) = tables.replace(old) {
            tracing::error!(error = %e, "could not put the old policy back after a failed change");
        }
    }
    if let Some(flows) = &flows {
        match tables.judge_answers(now, flows, interfaces) {
            Ok(0) => {}
            Ok(flows) => tracing::info!(flows, "flows started during the change judged as answers"),
            Err(e) => skipped(&e),
        }
    }
    written
}

/// A `reload --confirm` not confirmed in time (its watchdog asks): the
/// maps and this daemon's config back to what the reload replaced.
fn roll_back(
    running: &mut Running<'_>,
    feed: &mut Feed,
    trail: &mut Trail,
) -> Result<String, String> {
    let change = confirm::read()
        .map_err(|e| e.to_string())?
        .filter(|c| c.state == confirm::State::Pending && c.command == confirm::Command::Reload)
        .ok_or("no reload of this daemon awaits confirmation")?;
    let before = running
        .before
        .take()
        .ok_or("this daemon made no reload that awaits confirmation")?;
    let tunnel = before.config.policy.tunnel.clone();
    if let Err(e) = swap(
        running,
        feed,
        trail,
        &before.contents,
        before.config,
        tunnel.as_ref(),
    ) {
        return Err(crate::report::chain(&e));
    }
    trail.push(
        audit::record::now_ns(),
        change.record(ChangeStage::Rollback, "daemon"),
    );
    trail.commit();
    let summary = format!(
        "rolled back to {} (sha256 {})",
        running.config.path.display(),
        running.config.digest
    );
    tracing::warn!("not confirmed in time: {summary}");
    running.last_reload = Some(summary.clone());
    Ok(summary)
}

/// `ztxdp confirm`, asked of this daemon: confirms and records.
fn confirmed(running: &mut Running<'_>, trail: &mut Trail) -> reload::Reply {
    match confirm::confirm_here(false) {
        Ok(change) => {
            running.before = None;
            trail.push(
                audit::record::now_ns(),
                change.record(ChangeStage::Confirm, "daemon"),
            );
            trail.commit();
            tracing::info!(config = %change.config.display(), "change confirmed");
            reload::Reply::Confirmed { change }
        }
        Err(e) => reload::Reply::Refused {
            message: crate::report::chain(&e),
        },
    }
}

/// Reaps the watchdog once it exited (confirmed, or rolled back), so it
/// lingers as no zombie.
fn reap(watchdog: &mut Option<std::process::Child>) {
    if let Some(child) = watchdog
        && !matches!(child.try_wait(), Ok(None))
    {
        *watchdog = None;
    }
}

/// The settings a reload refuses to change, as config keys: what the
/// programs were loaded or attached with, and the audit trail's file.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (old, new) = (&old.policy, &new.policy);
    let mut out = Vec::new();
    match (&old.edge, &new.edge) {
        (Some(o), Some(n)) => {
            if o.interface != n.interface {
                out.push("edge.interface");
            }
            // A load-time constant of the programs (the ssh port, like
            // every service's, is in a map and reloads in place); a
            // peer's own mode travels with the peer and reloads in place.
            if o.mode != n.mode {
                out.push("mode");
            }
        }
        (None, None) => {}
        _ => out.push("[edge]"),
    }
    match (&old.tunnel, &new.tunnel) {
        (Some(o), Some(n)) => {
            if o.interface != n.interface {
                out.push("tunnel.interface");
            }
            // A load-time global of the tunnel program.
            if o.link_local_neighbors != n.link_local_neighbors {
                out.push("tunnel.link_local_neighbors");
            }
            if o.mode != n.mode && !out.contains(&"mode") {
                out.push("mode");
            }
        }
        (None, None) => {}
        _ => out.push("[tunnel]"),
    }
    if old.flows.max_entries != new.flows.max_entries {
        out.push("flows.max_entries");
    }
    if old.audit != new.audit {
        out.push("[audit]");
    }
    if old.metrics != new.metrics {
        out.push("[metrics]");
    }
    out
}

/// Graceful stop: removes exactly what we attached, if it is still ours.
async fn detach(handle: &rtnetlink::Handle, enforcing: &Enforcing) {
    if let Some((a, _)) = &enforcing.edge
        && let Err(e) = attach::detach_xdp(handle, a).await
    {
        tracing::warn!(error = %e, interface = a.interface, "could not detach the edge program");
    }
    if let Some(a) = &enforcing.tunnel
        && still_ours(handle, enforcing).await.1
        && let Err(e) = attach::detach_tc(&a.interface, TcAttachType::Ingress, &a.program)
    {
        tracing::warn!(error = %e, interface = a.interface, "could not detach the tunnel program");
    }
    for a in &enforcing.egress {
        if let Err(e) = attach::detach_tc(&a.interface, TcAttachType::Egress, &a.program) {
            tracing::warn!(error = %e, interface = a.interface, "could not detach a flow recorder");
        }
    }
}

/// Whether `interface` has an Ethernet header (`ARPHRD_ETHER`); `WireGuard`
/// devices are `ARPHRD_NONE` and hand us bare IP packets.
fn has_ethernet_header(interface: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{interface}/type"))
        .is_ok_and(|t| t.trim() == "1")
}

/// The names records give what the kernel numbers: interfaces, peers,
/// groups and the edge's services.
fn names(enforcing: &Enforcing, config: &Config, tunnel: Option<&TunnelPolicy>) -> Names {
    let mut n = Names::default();
    for a in enforcing
        .edge
        .iter()
        .map(|(a, _)| a)
        .chain(&enforcing.tunnel)
    {
        n.interfaces.insert(a.ifindex, a.interface.clone());
    }
    if let Some((a, _)) = &enforcing.edge {
        n.programs.insert(Program::Edge, a.interface.clone());
    }
    if let Some(a) = &enforcing.tunnel {
        n.programs.insert(Program::Tunnel, a.interface.clone());
    }
    n.peers = peer_names(tunnel);
    n.groups = GroupWatch::new(tunnel);
    n.services = config.policy.edge.as_ref().map(ServiceNames::new);
    n
}

/// Peer name and public key by peer index, for [`Names::peers`].
fn peer_names(tunnel: Option<&TunnelPolicy>) -> Vec<(String, Option<String>)> {
    tunnel.map_or_else(Vec::new, |t| {
        t.peers
            .iter()
            .map(|p| (p.name.clone(), p.public_key.clone()))
            .collect()
    })
}

/// How often ended summary windows are swept and the rate-limit, ring-full
/// and syslog counters are reported.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(1);

/// Why the audit loop ended.
enum Stop {
    /// SIGINT or SIGTERM: detach (unless `--keep-attached`) and exit.
    Signal,
    /// Our programs were removed (`ztxdp down`) or replaced (a newer `up`):
    /// exit without touching what is attached now.
    Superseded,
}

/// Whether our edge and tunnel programs (where we attached them) are still
/// the ones attached. An error reading counts as "still ours", so a netlink
/// hiccup never makes the daemon walk away.
async fn still_ours(handle: &rtnetlink::Handle, enforcing: &Enforcing) -> (bool, bool) {
    let Ok(now) = attach::find(handle).await else {
        return (true, true);
    };
    let edge = enforcing
        .edge
        .as_ref()
        .is_none_or(|(a, _)| now.edge.iter().any(|n| n.program_id == a.program_id));
    let tunnel = enforcing
        .tunnel
        .as_ref()
        .is_none_or(|a| now.tunnel.iter().any(|n| n.program_id == a.program_id));
    (edge, tunnel)
}

/// The signals the daemon answers. Each is taken over from its default
/// action (ending the process) when this is made, and one that arrives
/// before the loop polls it is kept for it: a SIGTERM right after
/// `READY=1`, while the daemon we replace still hands over the trail,
/// then detaches and writes the trail out instead of killing the process
/// half way.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Whether SIGINT or SIGTERM came since [`Self::new`], without waiting.
    fn stop_pending(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        [&mut self.interrupt, &mut self.terminate]
            .into_iter()
            .any(|s| s.poll_recv(&mut cx).is_ready())
    }

    fn new() -> Result<Self, DaemonError> {
        let signal = |kind| {
            tokio::signal::unix::signal(kind).map_err(|source| DaemonError::Signal { source })
        };
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

async fn stream_audit(
    feed: &mut Feed,
    trail: &mut Trail,
    running: &mut Running<'_>,
    (handle, enforcing): (&rtnetlink::Handle, &Enforcing),
    (mut replaced, ledger): (Option<adopt::Maps>, LedgerEntry),
    mut signals: Signals,
) -> Result<Stop, DaemonError> {
    // Waits for a daemon we replaced to finish its trail; our events wait
    // in the ring buffer meanwhile.
    trail.start().await?;
    // Now that the daemon we replaced is gone, what its programs decided
    // after its last read (or since a `kill -9`), and what it had not
    // written when it was killed, is ours to write.
    let mut keeper = feed.recover(replaced.as_mut(), ledger, trail)?;
    drop(replaced);
    trail.on_written(Box::new(move |written| keeper.written(written)));
    trail.commit();
    // Bound once the trail is ours: a daemon being replaced serves its own
    // reloads until then.
    let control = Server::bind_named(reload::SOCKET)?;
    let (requests, mut pending) = tokio::sync::mpsc::channel::<reload::Pending>(8);
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    let mut sync = tokio::time::interval(trail.sync_interval());
    sync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = loop {
        tokio::select! {
            ready = feed.readable() => {
                ready?;
                feed.drain_batch(trail);
                trail.commit();
            }
            _ = tick.tick() => {
                feed.sweep(trail, false)?;
                feed.report_lost(running.tables, trail)?;
                trail.report_forwarding();
                trail.commit();
                reap(&mut running.watchdog);
                if still_ours(handle, enforcing).await != (true, true) {
                    tracing::info!("our programs were removed or replaced by another ztxdp; exiting");
                    break Stop::Superseded;
                }
                if let Some(drift) = running.drift.tick(&running.config).await {
                    trail.push(audit::record::now_ns(), drift);
                    trail.commit();
                }
                // After the drift check: a scrape then agrees with the
                // trail's newest drift record.
                running.refresh_metrics(trail);
                if notify::listening() {
                    notify::status(&status_line(enforcing, running));
                }
            }
            _ = sync.tick() => trail.sync(),
            client = trail.accept() => match client {
                Ok(client) => trail.serve(client),
                Err(e) => tracing::warn!(error = %e, "events socket: accept failed"),
            },
            client = control.accept() => match client {
                Ok(client) => reload::serve(client, requests.clone()),
                Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
            },
            Some((request, reply)) = pending.recv() => {
                let _ = reply.send(match request {
                    reload::Request::Reload { confirm } => {
                        match logged_reload(running, feed, trail, enforcing, confirm) {
                            Ok(summary) => reload::Reply::Applied { summary },
                            Err(message) => reload::Reply::Refused { message },
                        }
                    }
                    reload::Request::Audit => reload::Reply::Audit {
                        health: trail.health().unwrap_or_default(),
                    },
                    reload::Request::Confirm => confirmed(running, trail),
                    reload::Request::Rollback => match roll_back(running, feed, trail) {
                        Ok(summary) => reload::Reply::Applied { summary },
                        Err(message) => reload::Reply::Refused { message },
                    },
                });
            }
            _ = signals.hangup.recv() => drop(logged_reload(running, feed, trail, enforcing, None)),
            _ = signals.interrupt.recv() => break Stop::Signal,
            _ = signals.terminate.recv() => break Stop::Signal,
        }
    };
    control.remove();
    Ok(stop)
}

/// [`reload`], logged: the audit trail has no record kind for the daemon's
/// own actions, so a reload goes to the daemon's log, and its outcome to
/// the service manager's status line.
fn logged_reload(
    running: &mut Running<'_>,
    feed: &mut Feed,
    trail: &mut Trail,
    enforcing: &Enforcing,
    confirm: Option<u64>,
) -> Result<String, String> {
    notify::reloading();
    let result = match reload(running, feed, trail, confirm) {
        Ok(summary) => {
            tracing::info!(config = %running.opts.config.display(), "policy reloaded: {summary}");
            Ok(summary)
        }
        Err(e) => {
            let message = crate::report::chain(&e);
            tracing::warn!("reload refused, the running policy is unchanged: {message}");
            Err(message)
        }
    };
    running.last_reload = Some(match &result {
        Ok(summary) => summary.clone(),
        Err(message) => format!("reload refused, the running policy is unchanged: {message}"),
    });
    notify::ready(&status_line(enforcing, running));
    result
}

/// The service manager's status line: where the programs are attached,
/// with their pass and drop totals, and how the last reload went.
fn status_line(enforcing: &Enforcing, running: &Running<'_>) -> String {
    let totals = |program| match running.tables.passed_dropped(program) {
        Ok((passed, dropped)) => format!("{passed} passed, {dropped} dropped"),
        Err(e) => format!("counters unreadable ({e})"),
    };
    let mut parts = Vec::new();
    if let Some((a, _)) = &enforcing.edge {
        parts.push(format!("edge {}: {}", a.interface, totals(program::EDGE)));
    }
    if let Some(a) = &enforcing.tunnel {
        let peers = running
            .config
            .policy
            .tunnel
            .as_ref()
            .map_or(0, |t| t.peers.len());
        parts.push(format!(
            "tunnel {} ({peers} peers): {}",
            a.interface,
            totals(program::TUNNEL)
        ));
    }
    if let Some(outcome) = &running.last_reload {
        parts.push(format!("last reload: {outcome}"));
    }
    format!("enforcing; {}", parts.join("; "))
}

/// Once our programs are detached or replaced, their maps change no more:
/// writes every event, summary and count left, then closes the trail.
fn flush_audit(feed: &mut Feed, mut trail: Trail, tables: &Tables) -> Result<(), AuditError> {
    feed.drain(&mut trail);
    feed.sweep(&mut trail, true)?;
    feed.report_lost(tables, &mut trail)?;
    trail.report_forwarding();
    trail.close()
}
