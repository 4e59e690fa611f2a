//! Confirm or roll back: `ztxdp up --confirm SECS` and `ztxdp reload
//! --confirm SECS` apply a new policy that goes back to the previous one
//! unless `ztxdp confirm` runs within SECS.
//!
//! A timer in the daemon would die with it, so a second process enforces
//! the deadline: the *watchdog*, this binary run as `ztxdp
//! confirm-watchdog` in a session of its own (`setsid`), so that a `kill
//! -9` of the daemon, or of its process group, leaves it running. The
//! daemon starts it before it changes anything and waits until it is
//! armed. Armed, the watchdog holds the previous policy in memory:
//!
//! - for a reload, what the maps held (the programs stay);
//! - for an `up`, file descriptors of the programs being replaced, which
//!   keep them loaded with their maps after they are detached, so that
//!   they can be put back as they were;
//! - for an `up` with nothing running, nothing: a rollback detaches.
//!
//! Then it writes the change's state file `/run/ztxdp/confirm-<netns
//! inode>.json` (beside the identity file, found from any `ip netns exec`
//! of the namespace) and looks at it a few times a second. `ztxdp confirm`
//! marks it confirmed, and the watchdog exits. At the deadline (or on
//! SIGTERM, SIGINT or SIGHUP: a service stop that takes the watchdog down
//! must not leave an unconfirmed change behind) it rolls back: a reload
//! through the daemon when one answers (which then also puts its own view
//! of the config back), else itself on the maps; an `up` by swapping the
//! held programs back in, adopting the flows and counts of the replaced
//! ones as a replacing `up` does. Whoever rolls back or confirms writes the
//! trail's record. One lock (`confirm-<inode>.lock`) orders a confirm and a
//! rollback: whichever takes it first wins, and the other finds the change
//! settled.

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::mpsc,
    time::Duration,
};

use aya::programs::{ProgramFd, TcAttachType};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::SignalKind;

use crate::{
    adopt::{self, AdoptError, Pass},
    attach::{self, AttachError, Attached, Attachment},
    audit::{
        AuditError, Trail,
        record::{self, Body, ChangeStage},
        stream,
    },
    config::{Config, ConfigError},
    control::{self, ControlError},
    grants,
    identity::{self, Identity, IdentityError},
    policy::AuditSettings,
    reload,
    tables::{Contents, Tables, TablesError},
};

/// The hidden subcommand that runs the watchdog.
pub const WATCHDOG_COMMAND: &str = "confirm-watchdog";
/// The state file's name stem (see [`stream::namespace_file`]).
const STEM: &str = "confirm";
/// The longest confirmation window: a day.
pub const MAX_SECONDS: u64 = 86_400;
/// A watchdog arms in milliseconds; this bounds one that hangs.
const ARM_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watchdog reads the state file: how soon after a confirm
/// it exits, and how late after its deadline it may roll back.
const POLL: Duration = Duration::from_millis(200);

/// Errors of a confirmed change.
#[derive(Debug, thiserror::Error)]
pub enum ConfirmError {
    #[error(
        "a {command} awaits confirmation until {deadline}: `ztxdp confirm` keeps it, \
         otherwise it rolls back then; one change at a time, so nothing was changed"
    )]
    Pending {
        command: &'static str,
        deadline: String,
    },
    #[error(
        "a {command} awaits confirmation, but its watchdog (pid {pid}) is gone, so nothing \
         will roll it back: `ztxdp confirm` keeps it, `ztxdp down` removes every program; \
         nothing was changed"
    )]
    Orphaned { command: &'static str, pid: u32 },
    #[error("nothing awaits confirmation in this network namespace")]
    NothingPending,
    #[error("the {command} of {config} was {state} at {at}; nothing awaits confirmation")]
    Settled {
        command: &'static str,
        config: String,
        state: &'static str,
        at: String,
    },
    #[error("a rollback is under way; nothing awaits confirmation any more")]
    RollingBack,
    #[error("{message}")]
    Daemon { message: String },
    #[error("--confirm takes 1 to {MAX_SECONDS} seconds, not {seconds}")]
    Window { seconds: u64 },
    #[error("confirmation state {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("confirmation state {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot start the confirmation watchdog: {source}")]
    Spawn {
        #[source]
        source: std::io::Error,
    },
    #[error("the confirmation watchdog did not arm: {reason}")]
    NotArmed { reason: String },
    #[error("installing a signal handler: {source}")]
    Signal {
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Tables(#[from] TablesError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Adopt(#[from] AdoptError),
    #[error(transparent)]
    Control(#[from] Box<ControlError>),
}

/// What was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    Up,
    Reload,
}

impl Command {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Reload => "reload",
        }
    }
}

/// Where a change stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Applied; rolls back at the deadline unless confirmed.
    Pending,
    Confirmed,
    RolledBack,
    /// The deadline passed but the previous policy could not be put back
    /// (`error` says why); the new one runs.
    RollbackFailed,
}

impl State {
    const fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Confirmed => "confirmed",
            Self::RolledBack => "rolled back",
            Self::RollbackFailed => "not rolled back (the rollback failed)",
        }
    }
}

/// The state file of the latest change made with `--confirm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub state: State,
    pub command: Command,
    /// The config of the change and the SHA-256 of its text.
    pub config: PathBuf,
    pub config_sha256: String,
    /// The policy a rollback restores; `None` when nothing ran before (a
    /// rollback detaches).
    pub previous_config: Option<PathBuf>,
    pub previous_sha256: Option<String>,
    /// When it rolls back unless confirmed (RFC 3339, and nanoseconds
    /// since the Unix epoch).
    pub deadline: String,
    pub deadline_ns: i64,
    pub watchdog_pid: u32,
    /// When it was confirmed or rolled back.
    pub settled: Option<String>,
    /// Why a rollback failed.
    pub error: Option<String>,
}

impl Change {
    /// The trail's record of this change at `stage`, written by `by`.
    #[must_use]
    pub fn record(&self, stage: ChangeStage, by: &str) -> Body {
        Body::Change {
            stage,
            command: self.command.name().to_owned(),
            config: self.config.display().to_string(),
            config_sha256: self.config_sha256.clone(),
            previous_sha256: self.previous_sha256.clone(),
            deadline_ns: self.deadline_ns,
            by: by.to_owned(),
        }
    }

    fn settle(&mut self, state: State) {
        self.state = state;
        self.settled = Some(now_text());
    }
}

fn now_text() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> ConfirmError + '_ {
    move |source| ConfirmError::File {
        path: path.to_owned(),
        source,
    }
}

fn path() -> Result<PathBuf, ConfirmError> {
    stream::namespace_file(STEM, "json").map_err(file_err(Path::new(stream::SOCKET_DIR)))
}

/// The state file of this network namespace, if there is one.
///
/// # Errors
/// When it cannot be read or is not a state file.
pub fn read() -> Result<Option<Change>, ConfirmError> {
    let path = path()?;
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| ConfirmError::Parse { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConfirmError::File { path, source }),
    }
}

fn save(change: &Change) -> Result<(), ConfirmError> {
    let path = path()?;
    let mut text = serde_json::to_string_pretty(change).map_err(|source| ConfirmError::Parse {
        path: path.clone(),
        source,
    })?;
    text.push('\n');
    stream::create_dir().map_err(file_err(&path))?;
    grants::write_atomically(&path, &text).map_err(file_err(&path))
}

/// The lock that orders confirms, rollbacks and new changes; held until
/// dropped (or the process dies).
struct Lock(#[expect(dead_code, reason = "held for its lock, never read")] File);

impl Lock {
    fn file() -> Result<(File, PathBuf), ConfirmError> {
        let path = stream::namespace_file(STEM, "lock")
            .map_err(file_err(Path::new(stream::SOCKET_DIR)))?;
        stream::create_dir().map_err(file_err(&path))?;
        let file = crate::audit::writer::open_append(&path).map_err(file_err(&path))?;
        Ok((file, path))
    }

    fn take() -> Result<Self, ConfirmError> {
        let (file, path) = Self::file()?;
        file.lock().map_err(file_err(&path))?;
        Ok(Self(file))
    }

    /// `None` while a rollback holds it.
    fn try_take() -> Result<Option<Self>, ConfirmError> {
        let (file, path) = Self::file()?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self(file))),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(file_err(&path)(e)),
        }
    }
}

/// Whether `pid` is a live watchdog (a ztxdp process, not a zombie).
fn alive(pid: u32) -> bool {
    control::is_ztxdp(pid)
}

/// Refuses a new change (`up`, `reload`, `allow`, `revoke`) while one
/// awaits confirmation: a rollback restores the policy as it was before
/// that change, and would undo this one with it.
///
/// # Errors
/// [`ConfirmError::Pending`] or [`ConfirmError::Orphaned`], or when the
/// state file cannot be read.
pub fn refuse_if_pending() -> Result<(), ConfirmError> {
    match read()? {
        Some(c) if c.state == State::Pending => Err(if alive(c.watchdog_pid) {
            ConfirmError::Pending {
                command: c.command.name(),
                deadline: c.deadline,
            }
        } else {
            ConfirmError::Orphaned {
                command: c.command.name(),
                pid: c.watchdog_pid,
            }
        }),
        _ => Ok(()),
    }
}

/// Forgets a pending change whose watchdog is gone, for an `up` that
/// finds no ztxdp program in this namespace: such a change has nothing
/// left to keep or roll back (a namespace deleted during its wait, whose
/// inode a new namespace reuses, leaves one behind).
pub fn forget_orphaned() {
    if let Ok(Some(c)) = read()
        && c.state == State::Pending
        && !alive(c.watchdog_pid)
    {
        tracing::warn!(
            command = c.command.name(),
            config = %c.config.display(),
            "forgetting a change that awaited confirmation: its watchdog is gone and no ztxdp program runs here"
        );
        cancel(Some(c.watchdog_pid));
    }
}

/// Checks a `--confirm` window.
///
/// # Errors
/// [`ConfirmError::Window`] outside 1 s to a day.
pub const fn check_window(seconds: u64) -> Result<(), ConfirmError> {
    if seconds == 0 || seconds > MAX_SECONDS {
        return Err(ConfirmError::Window { seconds });
    }
    Ok(())
}

/// A watchdog the daemon started, armed: its change, and the process,
/// which the daemon reaps when it exits.
#[derive(Debug)]
pub struct Armed {
    pub change: Change,
    pub child: Child,
}

/// Starts the watchdog for a `command` of `config` that rolls back after
/// `seconds`, and returns once it holds the previous policy and has
/// written the state file. Called before anything is changed.
///
/// # Errors
/// When it cannot start or does not arm (then nothing is pending).
pub fn arm(command: Command, seconds: u64, config: &Config) -> Result<Armed, ConfirmError> {
    check_window(seconds)?;
    let exe = std::env::current_exe().map_err(|source| ConfirmError::Spawn { source })?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg(WATCHDOG_COMMAND)
        .arg("--command")
        .arg(command.name())
        .arg("--seconds")
        .arg(seconds.to_string())
        .arg("--config")
        .arg(std::path::absolute(&config.path).unwrap_or_else(|_| config.path.clone()))
        .arg("--digest")
        .arg(&config.digest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: setsid(2) is async-signal-safe and touches no memory of the
    // parent. A session of its own: a kill of the daemon's process group
    // or the hang-up of its terminal does not reach the watchdog.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|source| ConfirmError::Spawn { source })?;
    let Some(stdout) = child.stdout.take() else {
        return Err(not_armed(
            &mut child,
            "its standard output was not captured",
        ));
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = tx.send(BufReader::new(stdout).read_line(&mut line).map(|_| line));
    });
    let line = match rx.recv_timeout(ARM_TIMEOUT) {
        Ok(Ok(line)) if !line.is_empty() => line,
        Ok(Ok(_)) => return Err(not_armed(&mut child, "it exited (see its log above)")),
        Ok(Err(e)) => return Err(not_armed(&mut child, &e.to_string())),
        Err(_) => return Err(not_armed(&mut child, "no answer within 10 s")),
    };
    match serde_json::from_str::<Change>(line.trim_end()) {
        Ok(change) => Ok(Armed { change, child }),
        Err(e) => Err(not_armed(&mut child, &format!("{e}: {line:?}"))),
    }
}

/// Stops a watchdog that did not arm, and forgets a change it may have
/// written: nothing was changed yet.
fn not_armed(child: &mut Child, reason: &str) -> ConfirmError {
    let _ = child.kill();
    let _ = child.wait();
    cancel(Some(child.id()));
    ConfirmError::NotArmed {
        reason: reason.to_owned(),
    }
}

/// Forgets the pending change (of the watchdog `pid`, or any): its
/// watchdog then exits without rolling back. For a change that failed
/// before it was applied, and for `ztxdp down`, after which there is
/// nothing to roll back to. A failure leaves the file, which the watchdog
/// still honours, so it is logged.
pub fn cancel(pid: Option<u32>) {
    let result = (|| {
        let _lock = Lock::take()?;
        match read()? {
            Some(c) if pid.is_none_or(|p| p == c.watchdog_pid) => {
                let path = path()?;
                std::fs::remove_file(&path).map_err(file_err(&path))
            }
            _ => Ok(()),
        }
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not cancel the change awaiting confirmation");
    }
}

/// `ztxdp confirm`, in whichever process runs it (the daemon, or the
/// command when no daemon answers): marks the pending change confirmed.
/// `wait` is false in the daemon, which must not block its loop on a
/// rollback under way.
///
/// # Errors
/// When nothing is pending, or the change was settled already.
pub fn confirm_here(wait: bool) -> Result<Change, ConfirmError> {
    let _lock = if wait {
        Lock::take()?
    } else {
        Lock::try_take()?.ok_or(ConfirmError::RollingBack)?
    };
    let mut change = read()?.ok_or(ConfirmError::NothingPending)?;
    if change.state != State::Pending {
        return Err(ConfirmError::Settled {
            command: change.command.name(),
            config: change.config.display().to_string(),
            state: change.state.name(),
            at: change.settled.clone().unwrap_or_default(),
        });
    }
    change.settle(State::Confirmed);
    save(&change)?;
    Ok(change)
}

/// `ztxdp confirm`: the daemon confirms and writes the record; with no
/// daemon, this process does both. Returns the change and who recorded it.
///
/// # Errors
/// When nothing is pending or it was settled; the daemon's refusal.
pub async fn confirm() -> Result<Change, ConfirmError> {
    match reload::confirm_request() {
        Ok(change) => return Ok(change),
        Err(reload::ReloadError::Declined { message }) => {
            return Err(ConfirmError::Daemon { message });
        }
        Err(e) => tracing::debug!(error = %e, "no daemon answers; confirming here"),
    }
    let change = confirm_here(true)?;
    record_apart(&change, ChangeStage::Confirm, "confirm").await;
    Ok(change)
}

/// Writes a record of `change` into its config's trail from a process
/// other than the daemon (which, gone, no longer holds the trail), after
/// the daemon being replaced, if any, let it go. A failure costs the
/// record, not the change: logged.
async fn record_apart(change: &Change, stage: ChangeStage, by: &str) {
    let audit = match Config::load(&change.config) {
        Ok(c) => c.policy.audit,
        Err(e) => {
            tracing::error!(error = %e, "cannot find the trail: no {} record written", stage.name());
            return;
        }
    };
    if let Err(e) = append(&audit, change.record(stage, by)).await {
        tracing::error!(error = %e, "no {} record written", stage.name());
    }
}

/// Opens the trail of `audit`, appends `body`, closes it.
async fn append(audit: &AuditSettings, body: Body) -> Result<(), AuditError> {
    let mut trail = Trail::open(audit)?;
    trail.start().await?;
    trail.push(record::now_ns(), body);
    trail.close()
}

/// What `status` shows of the latest change.
#[derive(Clone, Debug, Serialize)]
pub struct Confirmation {
    #[serde(flatten)]
    pub change: Change,
    /// Whether its watchdog runs (only a pending change has one).
    pub watchdog_alive: bool,
    /// Seconds to the deadline, while pending.
    pub seconds_left: Option<u64>,
}

/// The latest change of this namespace for `status`; `None` when there is
/// none, or its file cannot be read (logged).
#[must_use]
pub fn status() -> Option<Confirmation> {
    let change = match read() {
        Ok(c) => c?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether a change awaits confirmation");
            return None;
        }
    };
    let pending = change.state == State::Pending;
    let left_ns = change.deadline_ns.saturating_sub(record::now_ns()).max(0);
    Some(Confirmation {
        watchdog_alive: pending && alive(change.watchdog_pid),
        seconds_left: pending.then(|| u64::try_from(left_ns).unwrap_or(0).div_ceil(1_000_000_000)),
        change,
    })
}

/// The previous policy, as the watchdog holds it.
enum Previous {
    /// What the maps held before a reload.
    Maps(Box<Contents>),
    /// The programs an `up` replaced, held open.
    Programs(Held),
    /// Nothing ran before the `up`.
    Nothing,
}

/// The programs an `up` replaces, held by file descriptor.
struct Held {
    edge: Vec<(Attachment, ProgramFd)>,
    tunnel: Vec<(Attachment, ProgramFd)>,
    egress: Vec<(Attachment, ProgramFd)>,
    map_ids: Vec<u32>,
}

impl Held {
    fn of(found: &Attached) -> Result<Self, AttachError> {
        let hold = |list: &[Attachment]| {
            list.iter()
                .map(|a| Ok((a.clone(), attach::hold(a.program_id)?)))
                .collect::<Result<Vec<_>, AttachError>>()
        };
        Ok(Self {
            edge: hold(&found.edge)?,
            tunnel: hold(&found.tunnel)?,
            egress: hold(&found.egress)?,
            map_ids: found.map_ids(),
        })
    }
}

/// `ztxdp confirm-watchdog`: holds the policy in place now, writes the
/// state file of the change about to be made, says so on standard output
/// (one JSON line, the state), and rolls back at the deadline unless the
/// change is confirmed first.
///
/// # Errors
/// When it cannot arm; a failed rollback is recorded in the state file.
pub async fn watchdog(
    command: Command,
    seconds: u64,
    config: &Path,
    digest: &str,
) -> Result<(), ConfirmError> {
    check_window(seconds)?;
    let audit = Config::load(config)?.policy.audit;
    let handle = attach::connect()?;
    let found = attach::find(&handle).await?;
    let identity = Identity::live(&found)?;
    let previous = match command {
        Command::Reload => Previous::Maps(Box::new(
            Tables::from_map_ids(&found.map_ids())?.contents()?,
        )),
        Command::Up if found.is_empty() => Previous::Nothing,
        Command::Up => Previous::Programs(Held::of(&found)?),
    };
    let me = std::process::id();
    let change = {
        let _lock = Lock::take()?;
        refuse_if_pending()?;
        let deadline_ns = record::now_ns().saturating_add(
            i64::try_from(seconds.saturating_mul(1_000_000_000)).unwrap_or(i64::MAX),
        );
        let change = Change {
            state: State::Pending,
            command,
            config: config.to_owned(),
            config_sha256: digest.to_owned(),
            previous_config: identity.as_ref().map(|i| i.config.clone()),
            previous_sha256: identity.as_ref().map(|i| i.digest.clone()),
            deadline: chrono::DateTime::from_timestamp_nanos(deadline_ns)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            deadline_ns,
            watchdog_pid: me,
            settled: None,
            error: None,
        };
        save(&change)?;
        change
    };
    let signal =
        |kind| tokio::signal::unix::signal(kind).map_err(|source| ConfirmError::Signal { source });
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    announce(&change);
    tracing::info!(
        command = command.name(),
        deadline = change.deadline,
        "armed: rolls back at the deadline unless `ztxdp confirm` runs"
    );
    let why = loop {
        tokio::select! {
            () = tokio::time::sleep(POLL) => {
                match read() {
                    Ok(Some(c)) if c.watchdog_pid == me && c.state == State::Pending => {}
                    // Confirmed, cancelled by `down`, or unreadable: a file
                    // nobody can read cannot say "pending" either.
                    _ => return Ok(()),
                }
                if record::now_ns() >= change.deadline_ns {
                    break "the deadline passed";
                }
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = hup.recv() => break "SIGHUP",
        }
    };
    tracing::warn!(
        reason = why,
        "not confirmed: rolling back to the previous policy"
    );
    roll_back(&handle, previous, identity.as_ref(), &audit).await
}

/// The armed state on standard output, for the daemon waiting for it;
/// then standard output is let go, so that nothing else is ever written
/// to a pipe whose reader may be gone.
fn announce(change: &Change) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let line = serde_json::to_string(change).unwrap_or_default();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Puts the previous policy back, if the change is still pending and
/// ours (a confirm may have come first), and settles the state file.
async fn roll_back(
    handle: &rtnetlink::Handle,
    previous: Previous,
    identity: Option<&Identity>,
    audit: &AuditSettings,
) -> Result<(), ConfirmError> {
    let lock = Lock::take()?;
    let Some(mut change) = read()? else {
        return Ok(());
    };
    if change.watchdog_pid != std::process::id() || change.state != State::Pending {
        return Ok(());
    }
    let result = match &previous {
        Previous::Maps(contents) => match reload::rollback_request() {
            Ok(summary) => {
                tracing::info!("the daemon rolled back: {summary}");
                Ok("daemon")
            }
            Err(e) => {
                tracing::info!(error = %e, "no daemon rolled back; writing the maps here");
                rewrite_maps(handle, contents)
                    .await
                    .map(|()| restore_identity(identity))
                    .map(|()| "watchdog")
            }
        },
        Previous::Programs(held) => {
            let peers = identity.map_or(0, |i| u32::try_from(i.peers.len()).unwrap_or(u32::MAX));
            restore_programs(handle, held, peers)
                .await
                .map(|()| restore_identity(identity))
                .map(|()| "watchdog")
        }
        Previous::Nothing => control::down()
            .await
            .map(drop)
            .map_err(|e| ConfirmError::Control(Box::new(e)))
            .map(|()| "watchdog"),
    };
    match result {
        Ok(by) => {
            change.settle(State::RolledBack);
            save(&change)?;
            drop(lock);
            tracing::info!(by, "rolled back");
            if by == "watchdog" {
                record_to(audit, &change).await;
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!(error = %e, "the rollback failed; the new policy runs");
            change.settle(State::RollbackFailed);
            change.error = Some(crate::report::chain(&e));
            save(&change)?;
            Err(e)
        }
    }
}

/// The watchdog's rollback record, in the trail the change was recorded
/// in.
async fn record_to(audit: &AuditSettings, change: &Change) {
    if let Err(e) = append(audit, change.record(ChangeStage::Rollback, "watchdog")).await {
        tracing::error!(error = %e, "no rollback record written");
    }
}

/// The previous identity file back: the programs it names run again.
fn restore_identity(identity: Option<&Identity>) {
    match identity {
        Some(i) => {
            if let Err(e) = i.save() {
                tracing::warn!(error = %e, "cannot restore the running policy's identity");
            }
        }
        None => identity::forget(None),
    }
}

/// A reload's rollback with no daemon: the maps of the programs attached
/// now get what they held before, as a reload writes them.
async fn rewrite_maps(handle: &rtnetlink::Handle, contents: &Contents) -> Result<(), ConfirmError> {
    let found = attach::find(handle).await?;
    let mut tables = Tables::from_map_ids(&found.map_ids())?;
    crate::daemon::replace_judged(&mut tables, contents, None, found.flow_interfaces())?;
    Ok(())
}

/// An `up`'s rollback: the held programs back on their hooks, replacing
/// the ones attached now atomically where both have one, and those of
/// the new programs the old ones did not have removed. The new programs'
/// state is adopted first, as a replacing `up` adopts it, so flows opened
/// during the wait keep their replies.
async fn restore_programs(
    handle: &rtnetlink::Handle,
    held: &Held,
    peers: u32,
) -> Result<(), ConfirmError> {
    let now = attach::find(handle).await?;
    let maps = adopt::Maps::open(&now.map_ids()).and_then(|new| {
        let old = adopt::Maps::open(&held.map_ids)?;
        Ok((new, old))
    });
    let adopt_pass = |pass| match &maps {
        Ok((new, old)) => {
            if let Err(e) = adopt::adopt(new, old, peers, pass) {
                tracing::warn!(?pass, error = %e, "could not adopt the state of the new programs");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not open the maps to adopt"),
    };
    adopt_pass(Pass::BeforeSwap);
    // The order of `up`: egress recorders, the edge, the tunnel.
    restore_tc(handle, &held.egress, &now.egress, TcAttachType::Egress).await?;
    for (a, fd) in &held.edge {
        let current = now.edge.iter().find(|n| n.interface == a.interface);
        attach::attach_xdp(handle, &a.interface, fd, current).await?;
    }
    for a in now.edge.iter().filter(|a| !held_on(&held.edge, a)) {
        attach::detach_xdp(handle, a).await?;
    }
    restore_tc(handle, &held.tunnel, &now.tunnel, TcAttachType::Ingress).await?;
    adopt_pass(Pass::AfterSwap);
    Ok(())
}

/// Whether `held` has a program on `a`'s interface.
fn held_on(held: &[(Attachment, ProgramFd)], a: &Attachment) -> bool {
    held.iter().any(|(h, _)| h.interface == a.interface)
}

/// The held clsact filters of one direction back in place of those
/// attached `now`, and the ones of `now` where none was held removed.
async fn restore_tc(
    handle: &rtnetlink::Handle,
    held: &[(Attachment, ProgramFd)],
    now: &[Attachment],
    direction: TcAttachType,
) -> Result<(), ConfirmError> {
    for (a, fd) in held {
        let replace = now.iter().any(|n| n.interface == a.interface);
        attach::attach_tc_fd(handle, a, fd, direction, replace).await?;
    }
    for a in now.iter().filter(|a| !held_on(held, a)) {
        attach::detach_tc(&a.interface, direction, &a.program)?;
    }
    Ok(())
}
