//! `ztxdp`: the command line. Parsing and printing only; the work is done by
//! the `ztxdp` library.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ztxdp::{
    config::Config,
    control::{self, Status},
    daemon::{self, Enforcing, UpOptions},
    identity,
    policy::Mode,
};

use ztxdp::identity::DEFAULT_CONFIG;

/// Where the commands that act on the running policy find their config.
const CONFIG_HELP: &str = "The config [default: $ZTXDP_CONFIG, else the one the running programs \
    were loaded from, else /etc/ztxdp/ztxdp.toml]";
const EVENTS_CONFIG_HELP: &str = "The config whose audit.path is read, without --follow \
    [default: $ZTXDP_CONFIG, else the one the running programs were loaded from, \
    else /etc/ztxdp/ztxdp.toml]";

/// Stdout's reader went away (`ztxdp status | head -1`): the command ends
/// quietly with status 0, as the reader asked for no more.
///
/// Not by restoring `SIGPIPE`'s default action at the start of `main`: that
/// ends the process with the signal (status 141 in a shell, not 0), and
/// would kill `up` when its syslog collector closes the connection, where a
/// write error is handled.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct StdoutClosed;

/// What a failed write to stdout means to the caller.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// `print!` that returns an error (see [`StdoutClosed`]) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        write!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

/// `println!` that returns an error (see [`StdoutClosed`]) instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {
        writeln!(std::io::stdout(), $($arg)*).map_err(stdout_error)?
    };
}

#[derive(Parser)]
#[command(
    name = "ztxdp",
    version,
    about = "Zero-trust packet authorization: XDP on the external interface, per-peer grants on WireGuard",
    after_help = "Examples:\n  \
        ztxdp check --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp up --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp status --json\n  \
        ztxdp reload\n  \
        ztxdp allow app-2 5432\n  \
        ztxdp revoke 10.100.0.1 53/udp\n  \
        ztxdp down"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config, load and attach the programs, and write the audit
    /// log until Ctrl-C or SIGTERM (which detach, unless --keep-attached). If
    /// this process is killed, enforcement stays in place; a new `up` takes
    /// over without a gap.
    #[command(
        after_help = "Examples:\n  ztxdp up --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp up --config lab.toml --iface veth0\n  \
        ztxdp up --config /etc/ztxdp/ztxdp.toml --keep-attached   \
        # under systemd: a stop or restart leaves enforcement in place"
    )]
    Up {
        #[arg(long, env = "ZTXDP_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Attach the edge program here instead of `edge.interface`.
        #[arg(long)]
        iface: Option<String>,
        /// Attach the tunnel program here instead of `tunnel.interface`.
        #[arg(long)]
        tunnel_iface: Option<String>,
        /// Start even if your own SSH session is not in `edge.ssh_allow`.
        #[arg(long)]
        allow_lockout: bool,
        /// On SIGTERM or Ctrl-C leave the programs attached, as after a
        /// crash: write the rest of the audit trail and exit 0. The next
        /// `up` takes over without a gap; `ztxdp down` removes them.
        #[arg(long)]
        keep_attached: bool,
        /// Audit mode for the whole config, as `mode = "audit"`: what the
        /// policy would drop passes and is recorded as `would_deny`; parse
        /// failures still drop.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file without touching the kernel.
    #[command(after_help = "Example:\n  ztxdp check --config /etc/ztxdp/ztxdp.toml")]
    Check {
        #[arg(long, env = "ZTXDP_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the daemon (or that none writes the audit trail), attached
    /// programs, passed and dropped totals, counters per reason, named
    /// tunnel peers and map fill levels.
    #[command(after_help = "Examples:\n  ztxdp status\n  ip netns exec edge ztxdp status --json")]
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Make the daemon of this network namespace re-read its config and
    /// runtime grants and swap the policy in place (as SIGHUP does):
    /// programs, flows, counters and the audit trail go on. Exits non-zero,
    /// changing nothing, when the config is invalid or changes what needs a
    /// restart (interfaces, `edge.ssh_port`, `flows.max_entries`, `[audit]`).
    #[command(
        after_help = "Examples:\n  ztxdp check --config /etc/ztxdp/ztxdp.toml && ztxdp reload\n  \
        ip netns exec edge ztxdp reload\n  kill -HUP \"$(pidof ztxdp)\"   # same, result in the daemon's log"
    )]
    Reload,
    /// Remove every ztxdp program from this network namespace.
    #[command(after_help = "Example:\n  ztxdp down")]
    Down,
    /// Grant a tunnel peer access to a local port, now and across restarts.
    #[command(
        after_help = "Examples:\n  ztxdp allow app-2 5432\n  ztxdp allow 10.100.0.2 53/udp\n  \
        ztxdp allow app-1 8000-8100/tcp\n  ztxdp allow app-1 icmp"
    )]
    Allow {
        /// Peer name, or an address inside one of its prefixes.
        peer: String,
        /// PORT[/PROTO] (tcp by default), a range FIRST-LAST[/PROTO], or `icmp`.
        grant: String,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Take a grant away; open connections stop passing at the next packet.
    #[command(after_help = "Examples:\n  ztxdp revoke app-1 5432\n  ztxdp revoke app-1 icmp")]
    Revoke {
        peer: String,
        grant: String,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// List every peer's effective grants (config plus runtime changes) and
    /// the grants the running tunnel program enforces, flagging differences.
    #[command(after_help = "Example:\n  ztxdp list --json")]
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Print `[[tunnel.peer]]` entries (no grants yet) for the peers of a
    /// wg-quick config, or of a running `WireGuard` interface.
    #[command(
        after_help = "A `# name` comment right above or inside a [Peer] section names the peer; \
        others are named peer-1, peer-2, ...\n\nExamples:\n  \
        ztxdp import-wg /etc/wireguard/wg0.conf >> /etc/ztxdp/ztxdp.toml\n  \
        ztxdp import-wg --live wg0"
    )]
    ImportWg {
        /// A wg-quick configuration file.
        #[arg(required_unless_present = "live", conflicts_with = "live")]
        file: Option<PathBuf>,
        /// Read the peers of this running interface (`wg show IFACE dump`).
        #[arg(long, value_name = "IFACE")]
        live: Option<String>,
    },
    /// Print the policy in another firewall's language.
    #[command(subcommand)]
    Export(ExportFormat),
    /// Check audit files.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Print audit records: the ones in the audit files, or with --follow the
    /// ones the daemon of this network namespace writes from now on (each
    /// once; a reader too slow to keep up is told how many it missed).
    #[command(
        after_help = "Examples:\n  ztxdp events --format ocsf > trail.jsonl\n  \
        ztxdp events --follow --format cef | your-siem-shipper\n  \
        ip netns exec edge ztxdp events --follow"
    )]
    Events {
        /// Stream from the running daemon instead of reading the files.
        #[arg(long)]
        follow: bool,
        #[arg(long, value_enum, default_value_t = EventsFormat::Ecs)]
        format: EventsFormat,
        #[arg(long, value_name = "FILE", help = EVENTS_CONFIG_HELP)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check that every line is a record, sequence numbers have no gaps, and
    /// the hash chain holds; prints the first bad line (<FILE:LINE>: why) and
    /// exits 1 if there is one. Rotated files may be given in any order.
    /// Gaps the daemon declared (`gap` records) are listed, and a trail that
    /// starts with one is reported as starting after the head it names.
    #[command(
        after_help = "Examples:\n  ztxdp audit verify /var/log/ztxdp/audit.jsonl*\n  \
        ztxdp audit verify --state /var/lib/ztxdp/audit.state /var/log/ztxdp/audit.jsonl*"
    )]
    Verify {
        /// Also check the trail against the head persisted in this state
        /// file (`audit.state`): the trail must reach it, with the same
        /// chain value, or its newest records were removed.
        #[arg(long, value_name = "STATE")]
        state: Option<PathBuf>,
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

/// Output format of `ztxdp events`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EventsFormat {
    /// Elastic Common Schema JSON lines.
    Ecs,
    /// OCSF 4001 Network Activity JSON lines.
    Ocsf,
    /// `ArcSight` Common Event Format.
    Cef,
}

#[derive(Subcommand)]
enum ExportFormat {
    /// An nftables ruleset (`nft -f`) enforcing the same policy, runtime grants included.
    #[command(
        after_help = "Examples:\n  ztxdp export nft --config /etc/ztxdp/ztxdp.toml > ztxdp.nft\n  \
        ztxdp export nft --conntrack | nft -f -"
    )]
    Nft {
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Accept `ct state established,related` first, as common host firewalls do.
        #[arg(long)]
        conntrack: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztxdp: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // What is still buffered is written now, so its error is seen here.
    let result = runtime.block_on(run(cli.command)).and_then(|code| {
        std::io::stdout()
            .flush()
            .map_err(stdout_error)
            .map(|()| code)
    });
    match result {
        Ok(code) => code,
        Err(e) if e.chain().any(<dyn std::error::Error>::is::<StdoutClosed>) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztxdp: {e:#}");
            // Bad config, bad arguments and lockout refusals are usage errors (2):
            // nothing was changed.
            let usage = e.chain().any(|c| {
                c.downcast_ref::<ztxdp::config::ConfigError>().is_some()
                    || c.downcast_ref::<ztxdp::lockout::LockoutError>().is_some()
                    || c.downcast_ref::<identity::CheckedError>().is_some()
                    || matches!(
                        c.downcast_ref::<daemon::DaemonError>(),
                        Some(daemon::DaemonError::Config(_) | daemon::DaemonError::Lockout(_))
                    )
                    || matches!(
                        c.downcast_ref::<control::ControlError>(),
                        Some(
                            control::ControlError::UnknownPeer { .. }
                                | control::ControlError::BadGrant { .. }
                        )
                    )
            });
            if usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Up {
            config,
            iface,
            tunnel_iface,
            allow_lockout,
            keep_attached,
            dry_run,
        } => {
            let opts = UpOptions {
                config,
                iface,
                tunnel_iface,
                allow_lockout,
                keep_attached,
                dry_run,
            };
            daemon::up(&opts, print_ready)
                .await
                .context("ztxdp up failed; nothing was left half-applied")?;
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            outln!(
                "{}: ok (edge: {}, tunnel: {} peers)",
                config.display(),
                c.policy
                    .edge
                    .as_ref()
                    .map_or("none", |e| e.interface.as_str()),
                c.policy.tunnel.as_ref().map_or(0, |t| t.peers.len())
            );
        }
        Command::Status { json } => {
            let s = control::status().await.context("ztxdp status")?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s)?;
            }
        }
        Command::Reload => {
            let summary = ztxdp::reload::request()
                .context("ztxdp reload: fix the config and run `ztxdp reload` again")?;
            println!("{summary}");
        }
        Command::Down => {
            let removed = control::down().await.context("ztxdp down")?;
            if removed.is_empty() {
                outln!("nothing was attached in this network namespace");
            }
            for a in removed {
                outln!(
                    "removed program {} ({}) from {}",
                    a.program_id,
                    a.mode,
                    a.interface
                );
            }
        }
        Command::Allow {
            peer,
            grant,
            config,
        } => grant_change(config.as_deref(), &peer, &grant, true).await?,
        Command::Revoke {
            peer,
            grant,
            config,
        } => grant_change(config.as_deref(), &peer, &grant, false).await?,
        Command::List { json, config } => list(json, config.as_deref()).await?,
        Command::ImportWg { file, live } => import_wg(file, live)?,
        Command::Export(ExportFormat::Nft { config, conntrack }) => {
            let (config, _) = control::discover(config.as_deref()).await;
            out!("{}", export_nft(&config, conntrack)?);
        }
        Command::Audit(AuditCommand::Verify { state, files }) => {
            return audit_verify(&files, state.as_deref());
        }
        Command::Events {
            follow,
            format,
            config,
        } => {
            let config = if follow {
                None
            } else {
                Some(control::discover(config.as_deref()).await.0)
            };
            events(format, config.as_deref())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(json: bool, config: Option<&Path>) -> anyhow::Result<()> {
    let (config, running) = control::discover(config).await;
    let c = identity::load_checked(&config, running.as_ref())?;
    let peers = control::list(&c).await.context("ztxdp list")?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&peers)?);
    } else {
        for p in peers {
            out!(
                "{:<16} {:<40} {}",
                p.name,
                p.addresses.join(","),
                p.grants.join(" ")
            );
            match &p.kernel {
                Some(k) if p.differs => {
                    outln!("  ! the kernel enforces: {}", none_if_empty(k));
                }
                _ => outln!(),
            }
        }
    }
    Ok(())
}

/// `export nft`: the config's policy with the runtime grants merged, as
/// `up` enforces it; the ruleset says so, and stderr warns of entries for
/// peers the config does not have.
fn export_nft(config: &Path, conntrack: bool) -> anyhow::Result<String> {
    use ztxdp::export;
    let mut policy = Config::load(config)?.policy;
    let mut notes = Vec::new();
    if let Some(path) = policy.tunnel.as_ref().map(|t| t.runtime_grants.clone()) {
        let grants = ztxdp::grants::RuntimeGrants::load(&path)?;
        let merged = export::merge_runtime_grants(&mut policy, &path, &grants);
        for peer in &merged.unknown_peers {
            eprintln!(
                "ztxdp: warning: {} has grants for {peer}, which is no peer of {}; ignored",
                path.display(),
                config.display()
            );
        }
        notes = merged.notes;
    }
    Ok(export::nft_ruleset_with(
        &policy,
        &export::NftOptions { conntrack, notes },
    ))
}

/// A list of grants, or `none`.
fn none_if_empty(grants: &[String]) -> String {
    if grants.is_empty() {
        "none".to_owned()
    } else {
        grants.join(" ")
    }
}

fn import_wg(file: Option<PathBuf>, live: Option<String>) -> anyhow::Result<()> {
    let (peers, origin) = match (live, file) {
        (Some(iface), _) => (
            ztxdp::import_wg::live(&iface)?,
            format!("`wg show {iface} dump`"),
        ),
        (None, Some(file)) => (
            ztxdp::import_wg::from_file(&file)?,
            file.display().to_string(),
        ),
        (None, None) => anyhow::bail!("give a wg-quick FILE or --live IFACE"),
    };
    out!("{}", ztxdp::import_wg::render(&peers, &origin)?);
    Ok(())
}

fn audit_verify(files: &[PathBuf], state: Option<&Path>) -> anyhow::Result<ExitCode> {
    use ztxdp::audit::{state as audit_state, verify, writer};
    let head = match state {
        Some(state) => {
            // The trail's own path: the file given that is not a rotated
            // `PATH.N`, or else the path the first one was rotated from.
            let trail = files
                .iter()
                .find(|f| writer::rotated_base(f).is_none())
                .cloned()
                .or_else(|| files.first().and_then(|f| writer::rotated_base(f)))
                .unwrap_or_default();
            let h = audit_state::expect(state, &trail).with_context(|| {
                format!(
                    "pass the trail that {} names, or another state file",
                    state.display()
                )
            })?;
            Some((h.seq, h.head))
        }
        None => None,
    };
    let report = verify::verify_against(files, head.as_ref()).context("ztxdp audit verify")?;
    if let Some(problem) = &report.problem {
        outln!("{problem}");
        outln!("({} good records before it)", report.records);
        return Ok(ExitCode::FAILURE);
    }
    let (Some(first), Some(last), Some(chain)) =
        (report.first_seq, report.last_seq, &report.last_chain)
    else {
        outln!("ok: no records");
        return Ok(ExitCode::SUCCESS);
    };
    let from = match (&report.previous, report.from_start) {
        (Some((seq, head)), _) => format!(
            "trail starts at seq {first}, previous head {head} (seq {seq}, not in these files)"
        ),
        (None, true) => "chain checked from the first record".to_owned(),
        (None, false) => {
            format!("chain checked from seq {first}, whose predecessors were rotated away")
        }
    };
    let count = if report.files == 1 {
        "1 file".to_owned()
    } else {
        format!("{} files", report.files)
    };
    outln!(
        "ok: {} records in {count}, seq {first} to {last}, {from}",
        report.records
    );
    for g in &report.gaps {
        outln!(
            "declared gap at seq {}: the records after seq {} up to seq {} are not in these files ({})",
            g.seq,
            g.after,
            g.previous_seq,
            g.reason
        );
    }
    if let Some((seq, _)) = head {
        if report.state_checked {
            outln!("audit state: seq {seq} is in the trail with the same chain value");
        } else {
            outln!("audit state: seq {seq} precedes these files (rotated away); not checked");
        }
    }
    outln!("last chain value: {chain}");
    Ok(ExitCode::SUCCESS)
}

/// `ztxdp events`: from the files of `config`, or with no config (`--follow`)
/// from the daemon.
fn events(format: EventsFormat, config: Option<&Path>) -> anyhow::Result<()> {
    use ztxdp::{audit::stream, policy::AuditFormat};
    let output = match format {
        EventsFormat::Ecs => stream::Output::Json(AuditFormat::Ecs),
        EventsFormat::Ocsf => stream::Output::Json(AuditFormat::Ocsf),
        EventsFormat::Cef => stream::Output::Cef,
    };
    let mut out = std::io::stdout().lock();
    let result = match config {
        None => stream::follow(output, &mut out),
        Some(config) => {
            let path = Config::load(config)?.policy.audit.path;
            stream::print_files(&path, output, &mut out).map(drop)
        }
    };
    match result {
        // The reader at the other end of the pipe is gone: nothing left to do.
        Err(stream::StreamError::Output { source })
            if source.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            Ok(())
        }
        other => other.context(if config.is_none() {
            "ztxdp events --follow"
        } else {
            "ztxdp events"
        }),
    }
}

async fn grant_change(
    config: Option<&Path>,
    peer: &str,
    grant: &str,
    allow: bool,
) -> anyhow::Result<()> {
    let (config, running) = control::discover(config).await;
    let c = identity::load_checked(&config, running.as_ref()).with_context(|| {
        format!(
            "{} {peer} {grant}: nothing was changed",
            if allow { "allow" } else { "revoke" }
        )
    })?;
    let change = control::change_grant(&c, peer, grant, allow)
        .await
        .with_context(|| {
            format!(
                "{} {peer} {grant}: nothing was changed",
                if allow { "allow" } else { "revoke" }
            )
        })?;
    let verb = if allow { "allowed" } else { "revoked" };
    let state = if change.live {
        "in effect now"
    } else {
        "saved; no tunnel program is running here, applies at next `ztxdp up`"
    };
    outln!(
        "{verb} {} for {} ({state}); grants now: {}",
        change.grant,
        change.peer,
        change.grants.join(" ")
    );
    Ok(())
}

fn print_ready(e: &Enforcing) {
    if let Some((a, mode)) = &e.edge {
        eprintln!(
            "ztxdp: edge program {} attached to {} ({mode:?} XDP)",
            a.program_id, a.interface
        );
    }
    if let Some(a) = &e.tunnel {
        eprintln!(
            "ztxdp: tunnel program {} attached to {} ingress (tc clsact filter)",
            a.program_id, a.interface
        );
    }
    let mut out = std::io::stdout();
    // Callers wait for this exact line; a closed stdout must not stop the daemon.
    let _ = writeln!(out, "ztxdp: ready");
    let _ = out.flush();
}

/// The daemon's audit trail, loudly when records are not being written.
fn print_audit_health(a: &ztxdp::audit::Health) -> anyhow::Result<()> {
    if !a.writing {
        outln!(
            "AUDIT NOT WRITING since {}: {}; {} decisions counted, to be written as `lost` \
             records when the file takes writes again",
            a.since.as_deref().unwrap_or("?"),
            a.error.as_deref().unwrap_or("?"),
            a.unwritten
        );
    }
    if a.unwritten_total > 0 {
        outln!(
            "audit: {} decisions were written as counts only (lost records, ztxdp.unwritten)",
            a.unwritten_total
        );
    }
    if let Some(e) = &a.rotation_error {
        outln!("audit: cannot rotate ({e}); records go on into the current file");
    }
    if let Some(e) = &a.sync_error {
        outln!(
            "audit: cannot sync ({e}); records since the last sync may not survive a power loss"
        );
    }
    if a.gaps > 0 {
        outln!(
            "audit: {} gap records written (the audit file was deleted, replaced or cut)",
            a.gaps
        );
    }
    Ok(())
}

fn print_status(s: &Status) -> anyhow::Result<()> {
    let d = &s.daemon;
    match (d.pid, d.serving_events) {
        (Some(pid), true) => outln!("daemon {pid}: enforcing, writing the audit trail"),
        (Some(pid), false) => {
            outln!("daemon {pid}: enforcing, not serving events (starting or stopping?)");
        }
        (None, true) => outln!("daemon: enforcing, writing the audit trail"),
        (None, false) => outln!("enforcing, no daemon: decisions are counted, not written"),
    }
    if let Some(config) = &d.config {
        outln!("config: {}", config.display());
    }
    if let Some(a) = &d.audit {
        print_audit_health(a)?;
    }
    for (label, p) in [("edge", &s.programs.edge), ("tunnel", &s.programs.tunnel)] {
        let Some(p) = p else { continue };
        outln!(
            "{label}: program {} on {} (ifindex {}), mode {}",
            p.attachment.program_id,
            p.attachment.interface,
            p.attachment.ifindex,
            p.attachment.mode
        );
        match p.policy_mode {
            Some(Mode::Audit) => outln!(
                "  policy mode audit: what the policy drops passes (would_drop); \
                 parse failures still drop ({})",
                p.drops_in_audit.join(", ")
            ),
            Some(Mode::Enforce) => outln!("  policy mode enforce"),
            None => outln!("  policy mode unknown (no identity of the running policy)"),
        }
        outln!("  passed {}, dropped {}", p.passed, p.dropped);
        for (name, n) in p.counters.iter().filter(|(_, n)| **n > 0) {
            let verdict = p.verdicts.get(name).copied().unwrap_or("");
            outln!("  {name:<24} {verdict:<5} {n}");
        }
        let maps: Vec<String> = p.maps.iter().map(|(k, v)| format!("{k}={v}")).collect();
        outln!("  maps: {}", maps.join(" "));
        for peer in &p.peers {
            let name = peer
                .name
                .clone()
                .unwrap_or_else(|| format!("#{}", peer.index));
            outln!(
                "  peer {name:<16} allowed {:<10} denied {:<10} {:<7} {}",
                peer.allowed,
                peer.denied,
                peer.policy_mode.name(),
                peer.public_key.as_deref().unwrap_or("")
            );
        }
    }
    if let Some(f) = &s.programs.flows {
        let on: Vec<&str> = f.recorders.iter().map(|a| a.interface.as_str()).collect();
        outln!(
            "flows: {} in table, {} created, {} evicted (recording egress on {})",
            f.entries,
            f.created,
            f.evicted,
            on.join(", ")
        );
    }
    Ok(())
}
