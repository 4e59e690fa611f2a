//! Forwarding records to a syslog collector: RFC 5424 messages over TCP with
//! octet-counting framing (RFC 6587), e.g. to rsyslog's `imtcp`.
//!
//! The file is the record; forwarding is a copy that must never slow the
//! daemon down. Records go through a bounded queue to a thread of their own;
//! when the queue is full (the collector is slow or away for longer than
//! the queue covers) a record is dropped and counted, and the daemon writes
//! the count as a `syslog_dropped` record. The thread reconnects with
//! exponential back-off. Plain TCP syslog has no acknowledgements: records
//! written into the socket just before the collector dies can vanish
//! without an error. Every message carries `ztxdp.seq`, so the collector
//! side can find such gaps, and the file has every record.

use std::{
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat};

use super::{AuditError, record::Body, writer::Sealed};
use crate::policy::SyslogSettings;

/// First wait after a failed connect; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bounds a connect and a write to a collector that does not answer.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle connection is checked for a collector that went away.
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// Facility 13, "log audit" (RFC 5424 table 1).
const FACILITY: u8 = 13;
/// RFC 5612's enterprise number for documentation: ztxdp has none of its own.
const SD_ID: &str = "ztxdp@32473";

/// The RFC 5424 message for one record (without framing).
#[must_use]
pub fn message(s: &Sealed, hostname: &str, pid: u32) -> String {
    // Severities: 6 informational, 5 notice, 4 warning.
    let severity = match &s.record.body {
        Body::Decision { flow, .. } | Body::Summary { flow, .. } => {
            if flow.allowed() {
                6
            } else {
                5
            }
        }
        Body::Lost { .. } | Body::SyslogDropped { .. } => 4,
    };
    let time = DateTime::from_timestamp_nanos(s.record.time_ns)
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    format!(
        "<{}>1 {time} {hostname} ztxdp {pid} {} [{SD_ID} seq=\"{}\"] {}",
        FACILITY * 8 + severity,
        s.record.body.kind(),
        s.record.seq,
        s.line
    )
}

/// `LEN SP MSG`, RFC 6587 octet counting.
#[must_use]
pub fn frame(message: &str) -> String {
    format!("{} {message}", message.len())
}

/// RFC 5424 HOSTNAME: printable ASCII without spaces, at most 255, or `-`.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name: String = if rc == 0 {
        buf.iter()
            .take_while(|&&b| b != 0)
            .filter(|b| b.is_ascii_graphic())
            .map(|&b| char::from(b))
            .collect()
    } else {
        String::new()
    };
    if name.is_empty() {
        "-".to_owned()
    } else {
        name
    }
}

/// Whether the collector closed its end (or the connection broke).
fn peer_gone(conn: &TcpStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&raw mut pfd, 1, 0) };
    if n <= 0 {
        return false;
    }
    if pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return true;
    }
    // A collector has nothing to say; read what it sent to see whether it is EOF.
    let mut buf = [0u8; 512];
    matches!(io::Read::read(&mut &*conn, &mut buf), Ok(0) | Err(_))
}

/// The sending side; the thread does the network work.
pub struct Forwarder {
    address: String,
    tx: Option<SyncSender<Arc<Sealed>>>,
    dropped: Arc<AtomicU64>,
    closing: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Starts the forwarding thread; it connects in the background.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start(settings: &SyslogSettings) -> Result<Self, AuditError> {
        let (tx, rx) = mpsc::sync_channel(settings.queue.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            address: settings.address.clone(),
            rx,
            dropped: Arc::clone(&dropped),
            closing: Arc::clone(&closing),
            hostname: hostname(),
            pid: std::process::id(),
        };
        let thread = thread::Builder::new()
            .name("ztxdp-syslog".into())
            .spawn(move || worker.run())
            .map_err(|source| AuditError::Thread { source })?;
        Ok(Self {
            address: settings.address.clone(),
            tx: Some(tx),
            dropped,
            closing,
            thread: Some(thread),
        })
    }

    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Queues a record; never blocks. A full queue drops it and counts it.
    pub fn send(&self, s: &Arc<Sealed>) {
        let sent = self.tx.as_ref().map(|tx| tx.try_send(Arc::clone(s)));
        if !matches!(sent, Some(Ok(()))) {
            if let Some(Err(TrySendError::Full(_))) = sent {
                tracing::debug!("syslog queue full; dropping a record");
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records not forwarded so far.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lets the thread send what is queued for up to `grace`, then stops it;
    /// returns the final count of records not forwarded.
    #[must_use = "the count is what could not be forwarded"]
    pub fn stop(mut self, grace: Duration) -> u64 {
        drop(self.tx.take());
        let deadline = Instant::now() + grace;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            self.closing.store(true, Ordering::Relaxed);
            // The worker checks `closing` at least every IO_TIMEOUT.
            let hard = Instant::now() + IO_TIMEOUT + Duration::from_secs(1);
            while !thread.is_finished() && Instant::now() < hard {
                thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
        self.dropped()
    }
}

struct Worker {
    address: String,
    rx: mpsc::Receiver<Arc<Sealed>>,
    dropped: Arc<AtomicU64>,
    closing: Arc<AtomicBool>,
    hostname: String,
    pid: u32,
}

impl Worker {
    fn connect(&self) -> io::Result<TcpStream> {
        let addr = self.address.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing")
        })?;
        let conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        conn.set_nodelay(true)?;
        Ok(conn)
    }

    fn run(self) {
        let mut conn: Option<TcpStream> = None;
        let mut backoff = BACKOFF_MIN;
        let mut next_attempt = Instant::now();
        let mut outage_logged = false;
        // A record taken from the queue that still waits for a connection.
        let mut held: Option<Arc<Sealed>> = None;
        loop {
            if self.closing.load(Ordering::Relaxed) {
                let left = u64::from(held.is_some()) + self.rx.try_iter().count() as u64;
                self.dropped.fetch_add(left, Ordering::Relaxed);
                return;
            }
            let record = match held.take() {
                Some(r) => r,
                None => match self.rx.recv_timeout(IDLE_CHECK) {
                    Ok(r) => r,
                    Err(RecvTimeoutError::Timeout) => {
                        if conn.as_ref().is_some_and(peer_gone) {
                            tracing::warn!(
                                address = self.address,
                                "the syslog collector closed the connection"
                            );
                            conn = None;
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            };
            if conn.as_ref().is_some_and(peer_gone) {
                tracing::warn!(
                    address = self.address,
                    "the syslog collector closed the connection"
                );
                conn = None;
                outage_logged = true;
            }
            let Some(stream) = conn.as_mut() else {
                let now = Instant::now();
                if now < next_attempt {
                    held = Some(record);
                    thread::sleep((next_attempt - now).min(IDLE_CHECK));
                    continue;
                }
                match self.connect() {
                    Ok(c) => {
                        tracing::info!(
                            address = self.address,
                            "forwarding audit records to the syslog collector"
                        );
                        conn = Some(c);
                        backoff = BACKOFF_MIN;
                        outage_logged = false;
                    }
                    Err(e) => {
                        if !outage_logged {
                            tracing::warn!(
                                address = self.address,
                                error = %e,
                                "cannot reach the syslog collector; retrying with back-off (the file keeps every record)"
                            );
                            outage_logged = true;
                        }
                        next_attempt = now + backoff;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
                held = Some(record);
                continue;
            };
            let bytes = frame(&message(&record, &self.hostname, self.pid));
            if let Err(e) = stream.write_all(bytes.as_bytes()) {
                // Part of it may have gone out: the record counts as not forwarded.
                tracing::warn!(address = self.address, error = %e, "writing to the syslog collector failed");
                self.dropped.fetch_add(1, Ordering::Relaxed);
                conn = None;
                outage_logged = true;
                next_attempt = Instant::now() + backoff;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Read as _},
        net::TcpListener,
    };

    use super::*;
    use crate::audit::record::{Program, Record};

    fn sealed(seq: u64) -> Arc<Sealed> {
        Arc::new(Sealed {
            record: Record {
                seq,
                time_ns: 1_795_326_000_123_456_789,
                body: Body::Lost {
                    program: Program::Edge,
                    interface: "eth0".into(),
                    rate_limited: seq,
                    ring_full: 0,
                    unwritten: 0,
                },
                previous_run: false,
            },
            chain: "c".into(),
            line: format!("{{\"ztxdp\":{{\"seq\":{seq}}}}}"),
        })
    }

    #[test]
    fn messages_follow_rfc5424_with_octet_counting() {
        let m = message(&sealed(3), "host1", 42);
        assert_eq!(
            m,
            r#"<108>1 2026-11-22T05:40:00.123456Z host1 ztxdp 42 lost [ztxdp@32473 seq="3"] {"ztxdp":{"seq":3}}"#
        );
        assert_eq!(frame("héllo"), "6 héllo", "the length counts octets");
    }

    /// Reads octet-counted frames until `n` arrived.
    fn read_frames(conn: TcpStream, n: usize) -> Vec<String> {
        let mut reader = BufReader::new(conn);
        let mut out = Vec::new();
        while out.len() < n {
            let mut len = Vec::new();
            reader
                .read_until(b' ', &mut len)
                .unwrap_or_else(|e| panic!("{e}"));
            let len: usize = String::from_utf8_lossy(&len)
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{e}"));
            let mut msg = vec![0; len];
            reader
                .read_exact(&mut msg)
                .unwrap_or_else(|e| panic!("{e}"));
            out.push(String::from_utf8_lossy(&msg).into_owned());
        }
        out
    }

    #[test]
    fn records_queue_while_the_collector_is_away_and_overflow_is_counted() {
        // Find a free port, then close it: nothing listens yet.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or_else(|e| panic!("{e}"), |a| a.port());
        let f = Forwarder::start(&SyslogSettings {
            address: format!("127.0.0.1:{port}"),
            queue: 4,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        // One record is held by the thread, four fit the queue, the rest drop.
        for seq in 1..=10 {
            f.send(&sealed(seq));
            thread::sleep(Duration::from_millis(5));
        }
        let dropped = f.dropped();
        assert!(
            (5..=6).contains(&dropped),
            "10 sent, 4 or 5 kept: dropped {dropped}"
        );
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
        let (conn, _) = listener
            .accept()
            .unwrap_or_else(|e| panic!("the forwarder reconnects: {e}"));
        let got = read_frames(conn, usize::try_from(10 - dropped).unwrap_or(0));
        assert!(
            got[0].contains("seq=\"1\""),
            "the oldest record first: {got:?}"
        );
        assert_eq!(
            f.stop(Duration::from_secs(1)),
            dropped,
            "nothing else was lost"
        );
    }
}
