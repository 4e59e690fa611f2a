//! `ztxdp`: the command line. Parsing and printing only; the work is done by
//! the `ztxdp` library.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use ztxdp::{
    config::Config,
    control::{self, Status},
    daemon::{self, Enforcing, UpOptions},
    grants::Origin,
    identity,
    policy::Mode,
    report,
};

use ztxdp::identity::DEFAULT_CONFIG;

/// Where the commands that act on the running policy find their config.
const CONFIG_HELP: &str = "The config [default: $ZTXDP_CONFIG, else the one the running programs \
    were loaded from, else /etc/ztxdp/ztxdp.toml]";
const CHECK_CONFIG_HELP: &str = "The config [default: $ZTXDP_CONFIG, else with --live the one \
    the running programs were loaded from, else /etc/ztxdp/ztxdp.toml]";
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
    long_version = ztxdp::build_info::LONG_VERSION,
    about = "Zero-trust packet authorization: XDP on the external interface, per-peer grants on WireGuard",
    after_help = "Examples:\n  \
        ztxdp check --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp up --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp status --json\n  \
        ztxdp reload\n  \
        ztxdp reload --confirm 120 && ztxdp confirm\n  \
        ztxdp allow app-2 5432\n  \
        ztxdp revoke 10.100.0.1 53/udp\n  \
        ztxdp explain tcp 203.0.113.9:40000 192.0.2.1:22\n  \
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
        # under systemd: a stop or restart leaves enforcement in place\n  \
        ztxdp up --config new.toml --confirm 120   \
        # the previous programs come back unless `ztxdp confirm` runs within 120 s"
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
        /// Put the previous programs and maps back (or detach, if none ran)
        /// unless `ztxdp confirm` runs within SECS seconds (1 to 86400);
        /// a watchdog process enforces it, also if this one is killed.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=ztxdp::confirm::MAX_SECONDS))]
        confirm: Option<u64>,
    },
    /// Validate a config file without touching the kernel; with --live,
    /// also compare what the kernel runs (programs, maps, other programs
    /// on the same hooks) with it and the runtime grants: exits 0 printing
    /// "in sync", or 1 listing the differences.
    #[command(
        after_help = "Examples:\n  ztxdp check --config /etc/ztxdp/ztxdp.toml\n  \
        ztxdp check --live\n  ip netns exec edge ztxdp check --live --json"
    )]
    Check {
        #[arg(long, env = "ZTXDP_CONFIG", value_name = "FILE", help = CHECK_CONFIG_HELP)]
        config: Option<PathBuf>,
        /// Compare the running programs and maps with the config.
        #[arg(long)]
        live: bool,
        /// With --live: print the report as JSON.
        #[arg(long, requires = "live")]
        json: bool,
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
    /// restart (interfaces, `mode`, `flows.max_entries`, `[audit]`).
    #[command(
        after_help = "Examples:\n  ztxdp check --config /etc/ztxdp/ztxdp.toml && ztxdp reload\n  \
        ip netns exec edge ztxdp reload\n  kill -HUP \"$(pidof ztxdp)\"   # same, result in the daemon's log\n  \
        ztxdp reload --confirm 120   # then `ztxdp confirm`, or it rolls back after 120 s"
    )]
    Reload {
        /// Put the previous policy back unless `ztxdp confirm` runs within
        /// SECS seconds (1 to 86400); a watchdog process enforces it, also
        /// if the daemon is killed.
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=ztxdp::confirm::MAX_SECONDS))]
        confirm: Option<u64>,
    },
    /// Keep the change that `up --confirm` or `reload --confirm` made, which
    /// would otherwise roll back at its deadline. Exits 0 once it is
    /// confirmed and recorded; 1 when nothing awaits confirmation (or it
    /// was rolled back already).
    #[command(
        after_help = "Examples:\n  ztxdp reload --confirm 120 && ztxdp confirm\n  \
        ip netns exec edge ztxdp confirm"
    )]
    Confirm,
    /// The watchdog of a change made with --confirm (started by the daemon).
    #[command(name = "confirm-watchdog", hide = true)]
    ConfirmWatchdog {
        #[arg(long, value_enum)]
        command: ztxdp::confirm::Command,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        digest: String,
    },
    /// Remove every ztxdp program from this network namespace.
    #[command(after_help = "Example:\n  ztxdp down")]
    Down,
    /// Grant a tunnel peer, or every member of a group, access to a local
    /// port, now and across restarts.
    #[command(
        after_help = "Examples:\n  ztxdp allow app-2 5432\n  ztxdp allow 10.100.0.2 53/udp\n  \
        ztxdp allow app-1 8000-8100/tcp\n  ztxdp allow app-1 icmp\n  ztxdp allow @db-clients 5432"
    )]
    Allow {
        /// Peer name, an address inside one of its prefixes, or @GROUP (a
        /// [[tunnel.group]]: every member).
        peer: String,
        /// PORT[/PROTO] (tcp by default), a range FIRST-LAST[/PROTO], or `icmp`.
        grant: String,
        #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
        config: Option<PathBuf>,
    },
    /// Take a grant away from a peer or a group; open connections stop
    /// passing at the next packet. A group's member keeps what its own
    /// grant or another group still gives it.
    #[command(
        after_help = "Examples:\n  ztxdp revoke app-1 5432\n  ztxdp revoke app-1 icmp\n  \
        ztxdp revoke @db-clients 5432"
    )]
    Revoke {
        /// Peer name, an address inside one of its prefixes, or @GROUP.
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
        ztxdp import-wg --live wg0\n  \
        ztxdp import-wg --group office /etc/wireguard/wg0.conf"
    )]
    ImportWg {
        /// A wg-quick configuration file.
        #[arg(required_unless_present = "live", conflicts_with = "live")]
        file: Option<PathBuf>,
        /// Read the peers of this running interface (`wg show IFACE dump`).
        #[arg(long, value_name = "IFACE")]
        live: Option<String>,
        /// Also print a [[tunnel.group]] of this name holding every imported
        /// peer (grant them all with `ztxdp allow @NAME PORT`).
        #[arg(long, value_name = "NAME", value_parser = group_name)]
        group: Option<String>,
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
    /// The filters keep the decisions (and summaries) that match each one
    /// given; a filter repeated takes any of its values. Records about no
    /// single decision (`lost`, `gap`, `syslog_dropped`) pass no filter.
    #[command(
        after_help = "Examples:\n  ztxdp events --format ocsf > trail.jsonl\n  \
        ztxdp events --follow --format cef | your-siem-shipper\n  \
        ip netns exec edge ztxdp events --follow\n  \
        ztxdp events --follow --action deny --src 203.0.113.0/24\n  \
        ztxdp events --follow --peer app-1 --reason not_granted --reason granted"
    )]
    Events {
        /// Stream from the running daemon instead of reading the files.
        #[arg(long)]
        follow: bool,
        #[arg(long, value_enum, default_value_t = EventsFormat::Ecs)]
        format: EventsFormat,
        #[arg(long, value_name = "FILE", help = EVENTS_CONFIG_HELP)]
        config: Option<PathBuf>,
        #[command(flatten)]
        filter: EventsFilter,
    },
    /// Write bash, zsh and fish completions into DIR/completions and the
    /// ztxdp(8) man pages into DIR/man, made from this command line's own
    /// definitions (the Debian package ships them).
    #[command(after_help = "Example:\n  ztxdp generate --out /tmp/ztxdp-docs")]
    Generate {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Say what the running programs would do with one packet, and why:
    /// the verdict and reason, the allow-list prefix, peer, grant or flow
    /// that matched (or that none did), the config line each rule came
    /// from, and a tunnel peer's name and key. It reads the programs' maps
    /// and changes nothing: no counter, token bucket, flow or audit record.
    #[command(
        after_help = "A port given with icmp is the echo identifier. An ICMP error \
        (--icmp-type 3, 11; 1, 2, 3 for IPv6) quotes no packet, so it is explained as about \
        no flow.\n\nExamples:\n  \
        ztxdp explain tcp 203.0.113.9:40000 192.0.2.1:22\n  \
        ztxdp explain tcp 203.0.113.9:443 192.0.2.1:40000 --flags SA   # a reply?\n  \
        ztxdp explain --iface wg0 tcp 10.100.0.2:40000 10.100.0.254:5432\n  \
        ztxdp explain icmp 198.51.100.7 192.0.2.1\n  \
        ztxdp explain --json udp [2001:db8::9]:40000 [2001:db8::1]:51820"
    )]
    Explain(ExplainArgs),
}

/// The filters of `ztxdp events`.
#[derive(clap::Args)]
struct EventsFilter {
    /// Only decisions that allowed, or denied.
    #[arg(long, value_enum)]
    action: Vec<EventsAction>,
    /// Only decisions of this reason (see `ztxdp status` or the README's
    /// reason table), e.g. `ssh_source_not_allowed`.
    #[arg(long, value_name = "REASON", value_parser = reason_name)]
    reason: Vec<u32>,
    /// Only decisions about this tunnel peer, by name or public key.
    #[arg(long, value_name = "NAME|KEY")]
    peer: Vec<String>,
    /// Only decisions whose source address is inside this prefix (a bare
    /// address is a /32 or /128).
    #[arg(long, value_name = "CIDR", value_parser = source_prefix)]
    src: Vec<ipnet::IpNet>,
}

impl EventsFilter {
    fn into_filter(self) -> ztxdp::audit::stream::Filter {
        ztxdp::audit::stream::Filter {
            actions: self.action.iter().map(|a| a.name().to_owned()).collect(),
            reasons: self.reason,
            peers: self.peer,
            sources: self.src,
        }
    }
}

/// `ztxdp explain PROTO SRC DST`.
#[derive(clap::Args)]
struct ExplainArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The interface whose program answers [default: the edge's, else
    /// the only tunnel program's].
    #[arg(long, value_name = "IF")]
    iface: Option<String>,
    /// tcp, udp, icmp, or an IP protocol number.
    proto: String,
    /// ADDRESS[:PORT]; [IPv6]:PORT.
    src: String,
    /// ADDRESS[:PORT]; [IPv6]:PORT.
    dst: String,
    /// TCP flags as letters: F S R P A U E C [default: S].
    #[arg(long)]
    flags: Option<String>,
    /// ICMP type [default: echo request, 8 or 128].
    #[arg(long, value_name = "N")]
    icmp_type: Option<u8>,
    #[arg(long, value_name = "FILE", help = CONFIG_HELP)]
    config: Option<PathBuf>,
}

/// `--action` of `ztxdp events`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum EventsAction {
    Allow,
    Deny,
    /// Audit mode's: what the policy would drop, and let pass.
    WouldDeny,
}

impl EventsAction {
    /// As decisions name their action (`Flow::action`).
    const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::WouldDeny => "would_deny",
        }
    }
}

/// `--reason` of `ztxdp events`: a reason name.
fn reason_name(name: &str) -> Result<u32, String> {
    ztxdp::audit::record::reason_code(name).ok_or_else(|| {
        let names: Vec<&str> = zt_common::reason::ALL
            .iter()
            .map(|&c| zt_common::reason::name(c))
            .collect();
        format!("no reason {name:?}; reasons are {}", names.join(", "))
    })
}

/// `--src` of `ztxdp events`: a prefix, or an address as a host prefix.
fn source_prefix(text: &str) -> Result<ipnet::IpNet, String> {
    text.parse::<ipnet::IpNet>()
        .map(|n| n.trunc())
        .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| format!("{text:?} is not a prefix (192.0.2.0/24, 2001:db8::/32) or address"))
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
            eprintln!("ztxdp: {}", report::chain(e.as_ref()));
            if let Some(privileges) = lacking_privileges(&e) {
                eprintln!("ztxdp: not permitted: {}", privilege_hint(privileges));
                return ExitCode::from(NOT_PERMITTED);
            }
            // Bad config, bad arguments and lockout refusals are usage errors (2):
            // nothing was changed.
            let usage = e.chain().any(|c| {
                c.downcast_ref::<ztxdp::config::ConfigError>().is_some()
                    || c.downcast_ref::<ztxdp::lockout::LockoutError>().is_some()
                    || c.downcast_ref::<identity::CheckedError>().is_some()
                    || c.downcast_ref::<ztxdp::explain::packet::RequestError>()
                        .is_some()
                    || matches!(
                        c.downcast_ref::<ztxdp::tables::TablesError>(),
                        Some(ztxdp::tables::TablesError::TooMany { .. })
                    )
                    || matches!(
                        c.downcast_ref::<daemon::DaemonError>(),
                        Some(daemon::DaemonError::Config(_) | daemon::DaemonError::Lockout(_))
                    )
                    || matches!(
                        c.downcast_ref::<control::ControlError>(),
                        Some(
                            control::ControlError::UnknownPeer { .. }
                                | control::ControlError::UnknownGroup { .. }
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

/// Exit status of a command the kernel or the file system refused because
/// this process lacks root or the capabilities ztxdp needs (`EX_NOPERM` of
/// sysexits.h); distinct from 1 (failed) and 2 (bad input, nothing changed).
const NOT_PERMITTED: u8 = 77;

/// The privileges of this process, when `e` is a refusal (`EPERM`,
/// `EACCES`) for lack of them. A refusal of a process that has them all
/// (an immutable file, a security module) is an ordinary failure: telling
/// root to run as root would mislead.
fn lacking_privileges(e: &anyhow::Error) -> Option<report::Privileges> {
    if !report::refused(e.as_ref()) {
        return None;
    }
    report::Privileges::current().filter(|p| !p.complete())
}

/// What to do about a refusal, naming what this process lacks.
fn privilege_hint(p: report::Privileges) -> String {
    let missing = words(&p.missing());
    let lacks = match p.uid {
        0 => format!("this process lacks {missing}"),
        uid if missing.is_empty() => format!(
            "this process has the capabilities but runs as uid {uid}, not root, \
             so it may open only what that user may"
        ),
        uid => format!("this process runs as uid {uid} without {missing}"),
    };
    let needed: Vec<&str> = report::NEEDED_CAPABILITIES
        .iter()
        .map(|(name, _)| *name)
        .collect();
    format!(
        "ztxdp needs root here, or {} with access to the files and sockets named above; {lacks}",
        words(&needed)
    )
}

/// `a`, `a and b`, `a, b and c`.
fn words(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
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
            confirm,
        } => {
            let opts = UpOptions {
                config,
                iface,
                tunnel_iface,
                allow_lockout,
                keep_attached,
                dry_run,
                confirm,
            };
            daemon::up(&opts, print_ready)
                .await
                .context("ztxdp up failed; nothing was left half-applied")?;
        }
        Command::Check {
            config,
            live: true,
            json,
        } => return check_live(config.as_deref(), json).await,
        Command::Check { config, .. } => {
            check(&config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)))?;
        }
        Command::Status { json } => {
            let s = control::status().await.context("ztxdp status")?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s)?;
            }
        }
        Command::Reload { confirm } => {
            let summary = ztxdp::reload::request(confirm)
                .context("ztxdp reload: fix the config and run `ztxdp reload` again")?;
            outln!("{summary}");
        }
        Command::Confirm => confirm().await?,
        Command::ConfirmWatchdog {
            command,
            seconds,
            config,
            digest,
        } => {
            ztxdp::confirm::watchdog(command, seconds, &config, &digest)
                .await
                .context("ztxdp confirm-watchdog")?;
        }
        Command::Down => down().await?,
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
        Command::ImportWg { file, live, group } => import_wg(file, live, group.as_deref())?,
        Command::Export(ExportFormat::Nft { config, conntrack }) => {
            let config = control::config_path(config.as_deref())
                .await
                .context("ztxdp export nft: finding the running config (or give --config)")?;
            out!("{}", export_nft(&config, conntrack)?);
        }
        Command::Audit(AuditCommand::Verify { state, files }) => {
            return audit_verify(&files, state.as_deref());
        }
        Command::Events {
            follow,
            format,
            config,
            filter,
        } => events(follow, format, &filter.into_filter(), config.as_deref()).await?,
        Command::Generate { out } => {
            for path in ztxdp::docs::generate(Cli::command(), &out)? {
                outln!("{}", path.display());
            }
        }
        Command::Explain(args) => explain(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `ztxdp down`: every program of this namespace removed, and a change
/// awaiting confirmation forgotten with them.
async fn down() -> anyhow::Result<()> {
    let removed = control::down().await.context("ztxdp down")?;
    // Nothing is left to roll back to, or from.
    ztxdp::confirm::cancel(None);
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
    Ok(())
}

/// `ztxdp confirm`: exits 0 once the pending change is confirmed.
async fn confirm() -> anyhow::Result<()> {
    let change = ztxdp::confirm::confirm().await.context("ztxdp confirm")?;
    outln!(
        "confirmed the {} of {} (sha256 {})",
        change.command.name(),
        change.config.display(),
        change.config_sha256
    );
    Ok(())
}

/// `ztxdp check`: the config is valid; notes what `up` would still refuse.
fn check(config: &Path) -> anyhow::Result<()> {
    let c = Config::load(config)?;
    // What the maps hold once the lists are expanded (a /25 is 128
    // addresses): `up` and `reload` would refuse it, so `check` does.
    ztxdp::tables::Contents::of(
        c.policy.edge.as_ref(),
        c.policy.tunnel.as_ref(),
        &c.policy.flows,
    )
    .with_context(|| {
        format!(
            "{}: the kernel's maps cannot hold this policy; shorten the list (README: How the lists are looked up)",
            config.display()
        )
    })?;
    outln!(
        "{}: ok (edge: {}, tunnel: {} peers)",
        config.display(),
        c.policy
            .edge
            .as_ref()
            .map_or("none", |e| e.interface.as_str()),
        c.policy.tunnel.as_ref().map_or(0, |t| t.peers.len())
    );
    if let Err(e) = c.check_enforces() {
        outln!("note: `ztxdp up` refuses it as it is: {e}");
    }
    Ok(())
}

/// `ztxdp explain`: the report of the running programs' model.
async fn explain(args: ExplainArgs) -> anyhow::Result<()> {
    let request = ztxdp::explain::packet::Request::new(
        &args.proto,
        &args.src,
        &args.dst,
        args.flags.as_deref(),
        args.icmp_type,
    )
    .context("ztxdp explain: nothing was looked up")?;
    let report = ztxdp::explain::run(&request, args.iface.as_deref(), args.config.as_deref())
        .await
        .context("ztxdp explain")?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        out!("{report}");
    }
    Ok(())
}

/// `check --live`: exit 0 when the kernel runs the config, 1 with the
/// differences when it does not.
async fn check_live(config: Option<&Path>, json: bool) -> anyhow::Result<ExitCode> {
    use ztxdp::drift;
    let (config, _) = control::discover(config)
        .await
        .context("ztxdp check --live")?;
    let c = Config::load(&config)?;
    let tags = drift::Tags::of_this_binary().context("ztxdp check --live")?;
    let expected = drift::Expected::read(&c).context("ztxdp check --live")?;
    let report = drift::check(&c, &expected, &tags)
        .await
        .context("ztxdp check --live")?;
    drop(expected);
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.in_sync {
        outln!("in sync");
    } else {
        outln!(
            "{} differences between the kernel and {} with its runtime grants:",
            report.differences.len(),
            config.display()
        );
        for d in &report.differences {
            outln!("  {d}");
        }
        outln!("`ztxdp reload` rewrites the maps; a missing or replaced program needs `ztxdp up`.");
    }
    if let Some((path, digest)) = report.loaded_from.as_ref().filter(|_| !json) {
        outln!(
            "note: the running programs were loaded from {} (sha256 {digest}), not from this text",
            path.display()
        );
    }
    Ok(if report.in_sync {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn list(json: bool, config: Option<&Path>) -> anyhow::Result<()> {
    let (config, running) = control::discover(config).await.context("ztxdp list")?;
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
            // A peer whose grants are its own config grants needs no
            // explanation; one in a group or changed at run time does.
            if !(p.groups.is_empty() && p.added.is_empty() && p.revoked.is_empty()) {
                for s in &p.sources {
                    let from = match (&s.group, s.from) {
                        (None, Origin::Runtime) => "the runtime grants file".to_owned(),
                        (None, _) => "its own grant".to_owned(),
                        (Some(g), Origin::Runtime) => format!("@{g} (runtime grants file)"),
                        (Some(g), _) => format!("@{g}"),
                    };
                    outln!("  from {from}: {}", s.grants.join(" "));
                }
                if !p.revoked.is_empty() {
                    outln!("  revoked for {} itself: {}", p.name, p.revoked.join(" "));
                }
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
        for group in &merged.unknown_groups {
            eprintln!(
                "ztxdp: warning: {} has grants for group @{group}, which is no group of {}; ignored",
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

/// `--group NAME` of `import-wg`: a name a config accepts for a group.
fn group_name(name: &str) -> Result<String, String> {
    if ztxdp::config::is_group_name(name) {
        Ok(name.to_owned())
    } else {
        Err(ztxdp::config::bad_group_name(name))
    }
}

fn import_wg(
    file: Option<PathBuf>,
    live: Option<String>,
    group: Option<&str>,
) -> anyhow::Result<()> {
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
    out!("{}", ztxdp::import_wg::render(&peers, &origin, group));
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

/// `ztxdp events`: with `follow` from the daemon, else from the files of
/// `config` (or the config found as `allow` finds it); what passes `filter`.
async fn events(
    follow: bool,
    format: EventsFormat,
    filter: &ztxdp::audit::stream::Filter,
    config: Option<&Path>,
) -> anyhow::Result<()> {
    use ztxdp::{audit::stream, policy::AuditFormat};
    let config = if follow {
        None
    } else {
        Some(
            control::config_path(config)
                .await
                .context("ztxdp events: finding the running config (or give --config)")?,
        )
    };
    let output = match format {
        EventsFormat::Ecs => stream::Output::Json(AuditFormat::Ecs),
        EventsFormat::Ocsf => stream::Output::Json(AuditFormat::Ocsf),
        EventsFormat::Cef => stream::Output::Cef,
    };
    let mut out = std::io::stdout().lock();
    let result = match &config {
        None => stream::follow(output, filter, &mut out),
        Some(config) => {
            let path = Config::load(config)?.policy.audit.path;
            stream::print_files(&path, output, filter, &mut out).map(drop)
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
    let unchanged = || {
        format!(
            "{} {peer} {grant}: nothing was changed",
            if allow { "allow" } else { "revoke" }
        )
    };
    let (config, running) = control::discover(config).await.with_context(unchanged)?;
    let c = identity::load_checked(&config, running.as_ref()).with_context(unchanged)?;
    let change = control::change_grant(&c, peer, grant, allow)
        .await
        .with_context(unchanged)?;
    let verb = if allow { "allowed" } else { "revoked" };
    let state = match (change.live, change.peers.as_slice()) {
        (false, _) => {
            "saved; no tunnel program is running here, applies at next `ztxdp up`".to_owned()
        }
        (true, [_]) if !change.target.starts_with('@') => "in effect now".to_owned(),
        (true, members) => format!("in effect now for its {} members", members.len()),
    };
    match change.peers.as_slice() {
        [peer] if !change.target.starts_with('@') => outln!(
            "{verb} {} for {} ({state}); grants now: {}",
            change.grant,
            change.target,
            none_if_empty(&peer.grants)
        ),
        members => {
            outln!("{verb} {} for {} ({state})", change.grant, change.target);
            for m in members {
                outln!("  {}: {}", m.name, none_if_empty(&m.grants));
            }
        }
    }
    for note in change.peers.iter().filter_map(|p| p.note.as_ref()) {
        outln!("note: {note}");
    }
    Ok(())
}

fn print_ready(e: &Enforcing, pending: Option<&ztxdp::confirm::Change>) {
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
    if let Some(c) = pending {
        eprintln!(
            "ztxdp: this up rolls back at {} unless `ztxdp confirm` runs by then",
            c.deadline
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

/// The latest change made with `--confirm`, loudly while it awaits
/// confirmation.
fn print_confirmation(c: &ztxdp::confirm::Confirmation) -> anyhow::Result<()> {
    use ztxdp::confirm::State;
    let ch = &c.change;
    let what = format!(
        "{} of {} (sha256 {})",
        ch.command.name(),
        ch.config.display(),
        ch.config_sha256
    );
    let previous = ch
        .previous_sha256
        .as_deref()
        .map_or_else(|| "nothing (detach)".to_owned(), |d| format!("sha256 {d}"));
    let settled = ch.settled.as_deref().unwrap_or("?");
    match ch.state {
        State::Pending if c.watchdog_alive => outln!(
            "CHANGE AWAITS CONFIRMATION: {what}; rolls back to {previous} at {} (in {} s) \
             unless `ztxdp confirm` runs (watchdog pid {})",
            ch.deadline,
            c.seconds_left.unwrap_or(0),
            ch.watchdog_pid
        ),
        State::Pending => outln!(
            "CHANGE AWAITS CONFIRMATION, BUT ITS WATCHDOG (pid {}) IS GONE: {what} will not roll \
             back by itself; `ztxdp confirm` keeps it",
            ch.watchdog_pid
        ),
        State::Confirmed => outln!("last change: {what}, confirmed at {settled}"),
        State::RolledBack => {
            outln!("last change: {what}, not confirmed: rolled back to {previous} at {settled}");
        }
        State::RollbackFailed => outln!(
            "LAST CHANGE NOT ROLLED BACK: {what}; the rollback to {previous} failed at {settled}: {}",
            ch.error.as_deref().unwrap_or("?")
        ),
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
    if let Some(c) = &s.confirmation {
        print_confirmation(c)?;
    }
    if let Some(a) = &d.audit {
        print_audit_health(a)?;
    }
    match (&d.build, d.this_binary) {
        (Some(b), Some(true)) => outln!(
            "programs: from this binary's BPF object (ztxdp {}, commit {})",
            b.version,
            b.commit
        ),
        (Some(b), _) => outln!(
            "programs: loaded by ztxdp {} (commit {}, bpf sha256 {}), not from this binary's \
             BPF object; `ztxdp up` again (or restart the service) to run this one",
            b.version,
            b.commit,
            b.bpf_sha256
        ),
        (None, _) => outln!("programs: loaded by an unknown build (no identity file names it)"),
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
        let maps: Vec<String> = p
            .maps
            .iter()
            .map(|(k, v)| match p.memory.get(k) {
                Some(bytes) => format!("{k}={v} ({} KiB)", bytes.div_ceil(1024)),
                None => format!("{k}={v}"),
            })
            .collect();
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
