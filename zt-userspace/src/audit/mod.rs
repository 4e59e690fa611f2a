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
pub mod stream;
pub mod syslog;
pub mod verify;
pub mod writer;

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::UnixStream, sync::broadcast};

use self::{
    record::{Body, Program},
    stream::Server,
    syslog::Forwarder,
    writer::{AuditWriter, Sealed},
};
use crate::{policy::AuditSettings, tables::TablesError};

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
    #[error("cannot continue the audit trail in {}: {reason}", path.display())]
    Recover { path: PathBuf, reason: String },
    #[error("events socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
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
/// Time the syslog forwarder gets at shutdown to send what is queued.
const FORWARD_GRACE: Duration = Duration::from_secs(2);

/// The parts that exist once the trail has started.
struct Running {
    writer: AuditWriter,
    server: Server,
    syslog: Option<Forwarder>,
    /// Forwarding drops already written as records.
    reported_drops: u64,
    last_sync: Instant,
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
        let server = Server::bind()?;
        let syslog = self
            .settings
            .syslog
            .as_ref()
            .map(Forwarder::start)
            .transpose()?;
        self.running = Some(Running {
            writer,
            server,
            syslog,
            reported_drops: 0,
            last_sync: Instant::now(),
        });
        for (time_ns, body, previous_run) in std::mem::take(&mut self.early) {
            self.push_run(time_ns, body, previous_run)?;
        }
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
    ///
    /// # Errors
    /// When a rotation fails.
    pub fn push(&mut self, time_ns: i64, body: Body) -> Result<(), AuditError> {
        self.push_run(time_ns, body, false)
    }

    /// [`Self::push`], of a record that belongs to the programs this daemon
    /// replaced ([`record::Record::previous_run`]).
    ///
    /// # Errors
    /// When a rotation fails.
    pub fn push_previous(&mut self, time_ns: i64, body: Body) -> Result<(), AuditError> {
        self.push_run(time_ns, body, true)
    }

    fn push_run(&mut self, time_ns: i64, body: Body, previous_run: bool) -> Result<(), AuditError> {
        if let Some(r) = &mut self.running {
            return r.writer.append_run(time_ns, body, previous_run);
        }
        self.early.push((time_ns, body, previous_run));
        Ok(())
    }

    /// Writes what was pushed, then hands it to syslog and live readers;
    /// syncs when `audit.fsync_ms` has passed since the last sync.
    ///
    /// # Errors
    /// When writing or syncing fails.
    pub fn commit(&mut self) -> Result<(), AuditError> {
        let Some(r) = &mut self.running else {
            return Ok(());
        };
        let written = r.writer.write()?;
        if let Some(f) = &mut self.on_written {
            f(&written);
        }
        for s in written {
            let s = Arc::new(s);
            if let Some(f) = &r.syslog {
                f.send(&s);
            }
            // No live reader is not an error.
            let _ = self.live.send(s);
        }
        if r.last_sync.elapsed() >= self.settings.fsync {
            r.writer.sync()?;
            r.last_sync = Instant::now();
        }
        Ok(())
    }

    /// `fdatasync` of what was written (the group commit).
    ///
    /// # Errors
    /// When the sync fails.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if let Some(r) = &mut self.running {
            r.writer.sync()?;
            r.last_sync = Instant::now();
        }
        Ok(())
    }

    /// How often [`Self::sync`] should run.
    #[must_use]
    pub fn sync_interval(&self) -> Duration {
        self.settings.fsync.max(Duration::from_millis(1))
    }

    /// Writes a `syslog_dropped` record (and a log line) for records that
    /// could not be forwarded since the last report.
    ///
    /// # Errors
    /// When appending fails.
    pub fn report_forwarding(&mut self) -> Result<(), AuditError> {
        let Some(r) = &mut self.running else {
            return Ok(());
        };
        let Some(f) = &r.syslog else { return Ok(()) };
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
            r.writer.append(record::now_ns(), body)?;
        }
        Ok(())
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
    /// When the last write or sync fails.
    pub fn close(mut self) -> Result<(), AuditError> {
        self.commit()?;
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
                r.writer.append(
                    record::now_ns(),
                    Body::SyslogDropped {
                        address,
                        dropped: delta,
                    },
                )?;
            }
        }
        // Past this point nobody reads the live stream or the forwarder.
        let written = r.writer.write()?;
        if let Some(f) = &mut self.on_written {
            f(&written);
        }
        r.writer.sync()
    }
}
