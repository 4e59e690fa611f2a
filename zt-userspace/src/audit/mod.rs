//! The audit trail: every audited decision either written as a record or
//! counted in one, in a file whose later edit can be detected.
//!
//! - [`record`]: what a record says; [`format`]: ECS and OCSF field names
//!   (and CEF for `ztxdp events`); [`chain`]: the hash chain.
//! - [`writer`]: the file (sequence numbers, rotation, group commit, crash
//!   safety); [`verify`]: `ztxdp audit verify`.
//! - [`kernel`]: events, summaries and counters from the BPF maps;
//!   [`ledger`]: how far the trail accounts for them, kept in the
//!   programs' maps so that a new `up` makes up for a killed daemon.
//! - [`syslog`]: forwarding to a collector; [`stream`]: the live stream
//!   behind `ztxdp events --follow`.
//!
//! [`Trail`] ties the outputs together for the daemon: a record is written
//! to the file first, then offered to the syslog forwarder and to live
//! readers, so neither ever has a record the file lacks.
//!
//! The audit log is data, not a log stream: records go to their own file,
//! never through `tracing`.

pub mod chain;
pub mod format;
pub mod kernel;
pub mod ledger;
pub mod record;
pub mod state;
pub mod stream;
pub mod syslog;
pub mod verify;
pub mod writer;

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{net::UnixStream, sync::broadcast};

use self::{
    record::{Body, Program},
    stream::Server,
    syslog::Forwarder,
    writer::{AuditWriter, Sealed},
};
use crate::{
    model::EdgeModel,
    policy::{AuditSettings, EdgePolicy, Protocol},
    tables::TablesError,
};

/// Errors of the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write audit file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot sync audit file {path}: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rotate audit file {from} to {to}: {source}")]
    Rotate {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another process has held {} for {waited:?}; only one ztxdp may write an audit file", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error(
        "{decisions} decisions have no record: {} refused writes to the end ({error}); \
         free space there, and check `ztxdp status` on the next start",
        path.display()
    )]
    Unwritten {
        decisions: u64,
        path: PathBuf,
        error: String,
    },
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("cannot continue the audit trail in {}: {reason}", path.display())]
    Recover { path: PathBuf, reason: String },
    #[error("events socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot give {} to group {group} (audit.socket_group): {source}; \
         the daemon needs CAP_CHOWN for it",
        path.display()
    )]
    SocketGroup {
        path: PathBuf,
        group: String,
        #[source]
        source: io::Error,
    },
    #[error("audit ring buffer: {source}")]
    Ring {
        #[source]
        source: io::Error,
    },
    #[error("BPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the BPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("BPF map {name} is not a hash map")]
    WrongMapType { name: &'static str },
    #[error("sweeping the audit summary table: {source}")]
    Sweep {
        #[source]
        source: io::Error,
    },
    #[error("reading the audit counters: {source}")]
    Counters {
        #[source]
        source: TablesError,
    },
    #[error(transparent)]
    Ledger(#[from] ledger::LedgerError),
    #[error("the audit trail was used before it started")]
    NotStarted,
    #[error("cannot start the syslog forwarding thread: {source}")]
    Thread {
        #[source]
        source: io::Error,
    },
}

/// What the kernel's numbers mean to a reader: interface names and peers.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub interfaces: HashMap<u32, String>,
    /// The interface each program runs on, for records without an ifindex.
    pub programs: HashMap<Program, String>,
    /// Peer name and public key, by peer index.
    pub peers: Vec<(String, Option<String>)>,
    /// Which groups grant what to each peer, for `ztxdp.peer.groups`.
    pub groups: crate::grants::GroupWatch,
    /// The edge's services, for the one an edge decision names.
    pub services: Option<ServiceNames>,
}

/// The edge services by name, and which one a decision names: the kernel
/// sends no service, since it follows from the policy, the protocol, the
/// port and the source (the first service of the port that admits the
/// source, or the port's first when none does), as the model computes it.
#[derive(Clone, Debug)]
pub struct ServiceNames {
    model: EdgeModel,
    names: Vec<String>,
}

impl ServiceNames {
    #[must_use]
    pub fn new(edge: &EdgePolicy) -> Self {
        Self {
            model: EdgeModel::new(edge),
            names: edge.services().map(|s| s.name.to_owned()).collect(),
        }
    }

    /// The service an edge decision of reason `code` about `protocol` to
    /// `port` from `source` names, if it is a service's decision.
    #[must_use]
    pub fn of(&self, code: u32, protocol: u8, port: u16, source: IpAddr) -> Option<String> {
        if !crate::model::names_service(code) {
            return None;
        }
        let protocol = match protocol {
            zt_common::proto::TCP => Protocol::Tcp,
            zt_common::proto::UDP => Protocol::Udp,
            _ => return None,
        };
        let index = self.model.service_of(protocol, port, source)?;
        self.names.get(index as usize).cloned()
    }
}

/// Converts `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Realtime minus monotonic, in nanoseconds, at construction.
    offset_ns: i128,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: real - mono,
        }
    }

    /// Nanoseconds since the Unix epoch of a monotonic time.
    #[must_use]
    pub fn wall_ns(&self, mono_ns: u64) -> i64 {
        i64::try_from(i128::from(mono_ns) + self.offset_ns).unwrap_or(i64::MAX)
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid timespec; both clocks exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// How long a new daemon waits for the one it replaces to release the
/// audit file; that one notices within a second that it was replaced.
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Records kept for live readers that fall behind.
const LIVE_BUFFER: usize = 65_536;
/// Time the syslog forwarder gets at shutdown to send what is queued and
/// have the collector acknowledge it.
const FORWARD_GRACE: Duration = Duration::from_secs(2);
/// The first retry after the file refused a write, and the longest wait
/// between two: space freed is noticed within seconds, and a disk that
/// stays full costs a failed write every few seconds.
const WRITE_RETRY: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// Whether the trail is being written, as `status` and the daemon's log
/// report it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Records reach the file. `false` while the file refuses writes: then
    /// decisions are counted, and written as `lost` records (`unwritten`)
    /// once it takes writes again.
    pub writing: bool,
    /// Decisions counted, not yet written, since `since`.
    pub unwritten: u64,
    /// When the file started refusing writes, RFC 3339.
    pub since: Option<String>,
    /// The last write error.
    pub error: Option<String>,
    /// Decisions written as `unwritten` in `lost` records since the start.
    pub unwritten_total: u64,
    /// While the file cannot be rotated (appending goes on in it): why.
    pub rotation_error: Option<String>,
    /// The last `fdatasync` or `audit.state` error, while they fail.
    pub sync_error: Option<String>,
    /// Gap records written since the start (the file was deleted or
    /// replaced under the daemon, or the trail ended before its state).
    pub gaps: u64,
    /// Records written since the start, by `event.action` (`allow`,
    /// `deny`, `summary`, `lost`, `syslog_dropped`, `gap`).
    pub records: BTreeMap<String, u64>,
}

/// Decisions whose records the file refused, while it does.
struct Refused {
    /// By program and the interface it runs on.
    decisions: BTreeMap<(Program, String), u64>,
    since_ns: i64,
    error: String,
    retry_at: Instant,
    wait: Duration,
}

/// The parts that exist once the trail has started.
struct Running {
    writer: AuditWriter,
    server: Server,
    syslog: Option<Forwarder>,
    /// Forwarding drops already written as records.
    reported_drops: u64,
    last_sync: Instant,
    /// Set while the file refuses writes.
    refused: Option<Refused>,
    unwritten_total: u64,
    sync_error: Option<String>,
    gaps: u64,
    /// Records written, by `event.action`.
    records: BTreeMap<&'static str, u64>,
}

impl Running {
    /// Counts the decisions of records that could not be written, so that
    /// a `lost` record carries them later.
    fn refuse(&mut self, records: Vec<(i64, Body)>, error: &AuditError) {
        let refused = self.refused.get_or_insert_with(|| {
            tracing::error!(
                error = %error,
                "the audit file refuses writes: ztxdp goes on enforcing, counts every decision it cannot \
                 write, and writes the counts as `lost` records once the file takes writes again"
            );
            Refused {
                decisions: BTreeMap::new(),
                since_ns: record::now_ns(),
                error: String::new(),
                retry_at: Instant::now(),
                wait: WRITE_RETRY.0,
            }
        });
        refused.error = error.to_string();
        for (_, body) in records {
            self.count_refused(&body);
        }
    }

    /// Counts a record the file refused (or would refuse: pushed while it
    /// refuses writes).
    fn count_refused(&mut self, body: &Body) {
        let key = match body {
            Body::Decision { flow, .. } | Body::Summary { flow, .. } => {
                (flow.program, flow.interface.clone())
            }
            Body::Lost {
                program, interface, ..
            } => (*program, interface.clone()),
            // Reported again with the next forwarding report.
            Body::SyslogDropped { dropped, .. } => {
                self.reported_drops = self.reported_drops.saturating_sub(*dropped);
                return;
            }
            // The writer keeps gap records queued; none comes here.
            Body::Gap { .. } => return,
            // Not a decision: the daemon's log and `ztxdp_drift` have it.
            Body::Drift { .. } | Body::Change { .. } => {
                tracing::warn!(kind = body.kind(), "the audit file refused a record");
                return;
            }
        };
        if let Some(r) = &mut self.refused {
            *r.decisions.entry(key).or_default() += body.decisions().unwrap_or(0);
        }
    }

    /// Writes what is queued and hands it out; while the file refuses
    /// writes, tries (at most every few seconds) to write the counts.
    fn write(&mut self, live: &broadcast::Sender<Arc<Sealed>>, on_written: Option<&mut OnWritten>) {
        if let Some(r) = &mut self.refused {
            if Instant::now() < r.retry_at {
                return;
            }
            r.retry_at = Instant::now() + r.wait;
            r.wait = (r.wait * 2).min(WRITE_RETRY.1);
            for ((program, interface), unwritten) in std::mem::take(&mut r.decisions) {
                self.writer.append(
                    record::now_ns(),
                    Body::Lost {
                        program,
                        interface,
                        rate_limited: 0,
                        ring_full: 0,
                        unwritten,
                    },
                );
            }
        }
        let written = self.writer.write();
        if let Some(f) = on_written {
            f(&written.sealed);
        }
        for s in written.sealed {
            if let Body::Lost { unwritten, .. } = s.record.body {
                self.unwritten_total += unwritten;
            }
            if matches!(s.record.body, Body::Gap { .. }) {
                self.gaps += 1;
            }
            let action = match &s.record.body {
                Body::Decision { flow, .. } => flow.action(),
                other => other.kind(),
            };
            *self.records.entry(action).or_default() += 1;
            let s = Arc::new(s);
            if let Some(f) = &self.syslog {
                f.send(&s);
            }
            // No live reader is not an error.
            let _ = live.send(s);
        }
        match written.error {
            Some(e) => self.refuse(written.failed, &e),
            None => {
                if let Some(r) = self.refused.take() {
                    tracing::warn!(
                        since = %format::rfc3339(r.since_ns),
                        unwritten_total = self.unwritten_total,
                        "the audit file takes writes again; the decisions it refused are in `lost` records (ztxdp.unwritten)"
                    );
                }
            }
        }
    }

    fn sync(&mut self) {
        let result = self.writer.sync();
        self.last_sync = Instant::now();
        match (result, &self.sync_error) {
            (Ok(()), None) => {}
            (Ok(()), Some(_)) => {
                tracing::info!("the audit file syncs again");
                self.sync_error = None;
            }
            (Err(e), _) => {
                let e = e.to_string();
                if self.sync_error.as_ref() != Some(&e) {
                    tracing::error!(error = %e, "the audit trail cannot be made durable; records written since the last sync may not survive a power loss");
                }
                self.sync_error = Some(e);
            }
        }
    }

    fn health(&self) -> Health {
        Health {
            writing: self.refused.is_none(),
            unwritten: self
                .refused
                .as_ref()
                .map_or(0, |r| r.decisions.values().sum()),
            since: self.refused.as_ref().map(|r| format::rfc3339(r.since_ns)),
            error: self.refused.as_ref().map(|r| r.error.clone()),
            unwritten_total: self.unwritten_total,
            rotation_error: self.writer.rotation_error().map(str::to_owned),
            sync_error: self.sync_error.clone(),
            gaps: self.gaps,
            records: self
                .records
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
        }
    }

    /// The records to write: queued in the file's writer, or counted while
    /// it refuses writes.
    fn push(&mut self, time_ns: i64, body: Body, previous_run: bool) {
        if self.refused.is_some() {
            self.count_refused(&body);
        } else {
            self.writer.append_run(time_ns, body, previous_run);
        }
    }
}

/// Called with the records of each write once they are in the file.
pub type OnWritten = Box<dyn FnMut(&[Sealed]) + Send>;

/// The daemon's audit outputs: file, syslog, live readers.
pub struct Trail {
    settings: AuditSettings,
    live: broadcast::Sender<Arc<Sealed>>,
    running: Option<Running>,
    /// Records pushed before `start`, kept for it, and whether each is of
    /// the previous run.
    early: Vec<(i64, Body, bool)>,
    /// The next `seq` and the newest chain value on disk when `start` took
    /// the file over.
    head: Option<(u64, String)>,
    on_written: Option<OnWritten>,
}

impl Trail {
    /// Checks that the audit file can be written. Nothing is locked or read
    /// yet, so this can run before the programs are attached even while a
    /// daemon being replaced still writes.
    ///
    /// # Errors
    /// When the file or its directory cannot be created.
    pub fn open(settings: &AuditSettings) -> Result<Self, AuditError> {
        AuditWriter::check(settings)?;
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        Ok(Self {
            settings: settings.clone(),
            live,
            running: None,
            early: Vec::new(),
            head: None,
            on_written: None,
        })
    }

    /// Takes the audit file over (waiting for a daemon being replaced to let
    /// go), continues its sequence and chain, and starts the events socket
    /// and syslog forwarding.
    ///
    /// # Errors
    /// When the file cannot be taken over, or the socket cannot be bound.
    pub async fn start(&mut self) -> Result<(), AuditError> {
        if self.running.is_some() {
            return Ok(());
        }
        let started = Instant::now();
        let mut said = false;
        let writer = loop {
            if let Some(w) = AuditWriter::try_open(&self.settings)? {
                break w;
            }
            if !said {
                tracing::info!(path = %self.settings.path.display(), "waiting for the previous ztxdp to release the audit file");
                said = true;
            }
            if started.elapsed() >= LOCK_WAIT {
                return Err(AuditError::LockTimeout {
                    path: self.settings.path.clone(),
                    waited: LOCK_WAIT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tracing::info!(path = %self.settings.path.display(), next_seq = writer.next_seq(), "audit trail open");
        self.head = Some((writer.next_seq(), writer.chain().to_owned()));
        let server = Server::bind(self.settings.socket_group.as_ref())?;
        let syslog = self
            .settings
            .syslog
            .as_ref()
            .map(Forwarder::start)
            .transpose()?;
        let mut running = Running {
            writer,
            server,
            syslog,
            reported_drops: 0,
            last_sync: Instant::now(),
            refused: None,
            unwritten_total: 0,
            sync_error: None,
            gaps: 0,
            records: BTreeMap::new(),
        };
        for (time_ns, body, previous_run) in std::mem::take(&mut self.early) {
            running.push(time_ns, body, previous_run);
        }
        self.running = Some(running);
        Ok(())
    }

    /// Where the trail is written (rotated files beside it).
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.settings.path
    }

    /// The next `seq` and the chain value of the newest record on disk
    /// when [`Self::start`] took the file over, before this daemon wrote
    /// anything; `None` before that.
    #[must_use]
    pub fn head(&self) -> Option<(u64, &str)> {
        self.head
            .as_ref()
            .map(|(seq, chain)| (*seq, chain.as_str()))
    }

    /// Calls `f` with the records of every write from now on, once they are
    /// in the file (the daemon keeps its ledger with it).
    pub fn on_written(&mut self, f: OnWritten) {
        self.on_written = Some(f);
    }

    /// Appends a record; it is written by the next [`Self::commit`].
    pub fn push(&mut self, time_ns: i64, body: Body) {
        self.push_run(time_ns, body, false);
    }

    /// [`Self::push`], of a record that belongs to the programs this daemon
    /// replaced ([`record::Record::previous_run`]).
    pub fn push_previous(&mut self, time_ns: i64, body: Body) {
        self.push_run(time_ns, body, true);
    }

    fn push_run(&mut self, time_ns: i64, body: Body, previous_run: bool) {
        match &mut self.running {
            Some(r) => r.push(time_ns, body, previous_run),
            None => self.early.push((time_ns, body, previous_run)),
        }
    }

    /// Writes what was pushed, then hands it to syslog and live readers;
    /// syncs when `audit.fsync_ms` has passed since the last sync. A write
    /// the file refuses does not stop anything: the decisions are counted
    /// (see [`Health`]).
    pub fn commit(&mut self) {
        let Some(r) = &mut self.running else {
            return;
        };
        r.write(&self.live, self.on_written.as_mut());
        if r.last_sync.elapsed() >= self.settings.fsync {
            r.sync();
        }
    }

    /// `fdatasync` of what was written (the group commit), and the head
    /// into `audit.state`; a failure is logged and shown in [`Health`].
    pub fn sync(&mut self) {
        if let Some(r) = &mut self.running {
            r.sync();
        }
    }

    /// How often [`Self::sync`] should run.
    #[must_use]
    pub fn sync_interval(&self) -> Duration {
        self.settings.fsync.max(Duration::from_millis(1))
    }

    /// Records waiting for the syslog collector, and how many the queue
    /// holds, when forwarding.
    #[must_use]
    pub fn syslog_queue(&self) -> Option<(u64, u64)> {
        let queued = self.running.as_ref()?.syslog.as_ref()?.queued();
        let size = self.settings.syslog.as_ref()?.queue;
        Some((queued, size as u64))
    }

    /// Whether records reach the file; `None` before [`Self::start`].
    #[must_use]
    pub fn health(&self) -> Option<Health> {
        self.running.as_ref().map(Running::health)
    }

    /// Writes a `syslog_dropped` record (and a log line) for records that
    /// could not be forwarded since the last report.
    pub fn report_forwarding(&mut self) {
        let Some(r) = &mut self.running else {
            return;
        };
        let Some(f) = &r.syslog else { return };
        let dropped = f.dropped();
        if dropped > r.reported_drops {
            let delta = dropped - r.reported_drops;
            tracing::warn!(
                address = f.address(),
                dropped = delta,
                total = dropped,
                "audit records could not be forwarded to syslog (they are in the file)"
            );
            let body = Body::SyslogDropped {
                address: f.address().to_owned(),
                dropped: delta,
            };
            r.reported_drops = dropped;
            r.push(record::now_ns(), body, false);
        }
    }

    /// The next `ztxdp events --follow` client; never resolves before
    /// [`Self::start`]. Cancel-safe.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        match &self.running {
            Some(r) => r.server.accept().await,
            None => std::future::pending().await,
        }
    }

    /// Serves records published from now on to `client`, on a task of its own.
    pub fn serve(&self, client: UnixStream) {
        tokio::spawn(stream::serve(client, self.live.subscribe()));
    }

    /// Stops forwarding (after up to two seconds to send what is queued),
    /// writes the last records and syncs; the events socket and the lock go.
    ///
    /// # Errors
    /// When decisions remain that the file refused to the end: they are
    /// counted in the error (and the log), nowhere else.
    pub fn close(mut self) -> Result<(), AuditError> {
        self.commit();
        let Some(mut r) = self.running.take() else {
            return Ok(());
        };
        r.server.remove();
        if let Some(f) = r.syslog.take() {
            let address = f.address().to_owned();
            let dropped = f.stop(FORWARD_GRACE);
            if dropped > r.reported_drops {
                let delta = dropped - r.reported_drops;
                tracing::warn!(
                    address,
                    dropped = delta,
                    "audit records not forwarded to syslog at shutdown"
                );
                r.push(
                    record::now_ns(),
                    Body::SyslogDropped {
                        address,
                        dropped: delta,
                    },
                    false,
                );
            }
        }
        // Past this point nobody reads the live stream or the forwarder; a
        // file that refuses writes gets one last try without waiting.
        let (live, _) = broadcast::channel(1);
        if let Some(refused) = &mut r.refused {
            refused.retry_at = Instant::now();
        }
        r.write(&live, self.on_written.as_mut());
        r.sync();
        match r.refused {
            Some(refused) => Err(AuditError::Unwritten {
                decisions: refused.decisions.values().sum(),
                path: self.settings.path.clone(),
                error: refused.error,
            }),
            None => Ok(()),
        }
    }
}
