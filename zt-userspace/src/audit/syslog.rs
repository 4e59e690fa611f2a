//! Forwarding records to a syslog collector: RFC 5424 messages over TCP with
//! octet-counting framing (RFC 6587), e.g. to rsyslog's `imtcp`, or over
//! TLS (RFC 5425, [`tls`]), e.g. to rsyslog's `imtcp` with its `ossl` or
//! `gtls` stream driver.
//!
//! The file is the record; forwarding is a copy that must never slow the
//! daemon down, and every record it does not deliver is counted. Records
//! go to a thread of their own, which holds at most `audit.syslog.queue` of
//! them: queued, or sent and not yet acknowledged. A record that arrives
//! while that many are held is dropped and counted, and the daemon writes
//! the count as a `syslog_dropped` record.
//!
//! Delivered means acknowledged by the collector's TCP stack. A successful
//! write(2) only puts bytes into the local send buffer, so the thread asks
//! the kernel instead: `SIOCOUTQ` gives the bytes written that the peer has
//! not acknowledged yet (`write_seq - snd_una`). A record stays held until
//! its last byte is acknowledged. When the connection breaks, the records
//! not acknowledged are sent again, first, on the next connection, marked
//! `possible_duplicate="true"` in their structured data: the collector may
//! have some of them already. At a stop the thread gets a grace period for
//! the collector to acknowledge what was sent; what is still held then is
//! counted. The thread reconnects with exponential back-off, which only a
//! record acknowledged resets: a collector that takes connections and
//! closes them before it takes a record is not hammered.
//!
//! With TLS the same window works on the ciphertext. `SIOCOUTQ` counts the
//! bytes of the TCP stream, whatever they carry, so the offsets must be
//! stream offsets too, and they are: every byte the TLS session sends
//! (handshake, records, alerts, key updates) goes to the socket through
//! the connection's one output buffer and is counted as it is written. A
//! record's frame is handed to the session whole and its ciphertext taken
//! out at once, so all of it lies before the offset noted for the record
//! (bytes the session had waiting go ahead of it and count against it:
//! the record is held a little longer, never let go early). Once the
//! collector's kernel has acknowledged that offset it holds every TLS
//! record carrying the message, so it can decrypt it; no other bytes may
//! be needed for that. A test feeds the collector the stream byte by byte
//! and checks that each message becomes readable exactly at its offset.
//!
//! Not covered: the acknowledgement comes from the collector's kernel, not
//! from the collector. A collector that dies with bytes in its socket's
//! receive buffer, or with records in its own queues, loses them without
//! a sign to the sender; only an application-level acknowledgement (RELP)
//! would show it, TLS adds none. Every message carries `ztxdp.seq`, so the
//! collector side can find such a gap, and the file has every record.

pub mod tls;

use std::{
    collections::VecDeque,
    io::{self, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{self, RecvTimeoutError, Sender},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use chrono::{DateTime, SecondsFormat};
use rustls::ClientConnection;

use self::tls::SyslogTls;
use super::{AuditError, record::Body, writer::Sealed};
use crate::policy::SyslogSettings;

/// First wait after a failed connect; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bounds a connect to a collector that does not answer, and then a TLS
/// handshake; the thread checks for a stop at least every two of these.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How often an idle connection is checked for a collector that went away.
const IDLE_CHECK: Duration = Duration::from_millis(100);
/// How often acknowledgements are read while records wait for them and
/// nothing else happens: a collector a LAN away acknowledges within it.
const ACK_CHECK: Duration = Duration::from_millis(10);
/// Facility 13, "log audit" (RFC 5424 table 1).
const FACILITY: u8 = 13;
/// RFC 5612's enterprise number for documentation: ztxdp has none of its own.
const SD_ID: &str = "ztxdp@32473";

/// The RFC 5424 message for one record (without framing); `resent` marks a
/// record sent again after a connection broke before the collector
/// acknowledged it.
#[must_use]
pub fn message(s: &Sealed, hostname: &str, pid: u32, resent: bool) -> String {
    // Severities: 6 informational, 5 notice, 4 warning, 2 critical.
    let severity = match &s.record.body {
        Body::Decision { flow, .. } | Body::Summary { flow, .. } => {
            if flow.allowed() {
                6
            } else {
                5
            }
        }
        Body::Lost { .. } | Body::SyslogDropped { .. } => 4,
        Body::Drift { differences: 0, .. } | Body::Change { .. } => 5,
        Body::Gap { .. } | Body::Drift { .. } => 2,
    };
    let time = DateTime::from_timestamp_nanos(s.record.time_ns)
        .to_rfc3339_opts(SecondsFormat::Micros, true);
    let duplicate = if resent {
        " possible_duplicate=\"true\""
    } else {
        ""
    };
    format!(
        "<{}>1 {time} {hostname} ztxdp {pid} {} [{SD_ID} seq=\"{}\"{duplicate}] {}",
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

/// Waits up to `timeout` for `events` (POLLERR and POLLHUP are always
/// reported); the events that happened.
fn wait_for(conn: &TcpStream, events: libc::c_short, timeout: Duration) -> libc::c_short {
    let mut pfd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if n > 0 { pfd.revents } else { 0 }
}

/// Bytes written to `conn` that its peer has not acknowledged.
fn unacknowledged(conn: &TcpStream) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (the same number as TIOCOUTQ, linux/sockios.h) writes
    // one int. For TCP it is `write_seq - snd_una`: sent or not, not yet
    // acknowledged (SIOCOUTQNSD would give the part not sent).
    let rc = unsafe { libc::ioctl(conn.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(outq).unwrap_or(0))
}

/// The sending side; the thread does the network work.
pub struct Forwarder {
    address: String,
    tx: Option<Sender<Arc<Sealed>>>,
    /// Records given to the thread and neither acknowledged nor counted yet.
    held: Arc<AtomicUsize>,
    /// `audit.syslog.queue`: the most `held` may be.
    limit: usize,
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
        let (tx, rx) = mpsc::channel();
        let held = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            address: settings.address.clone(),
            tls: settings.tls.clone(),
            rx,
            held: Arc::clone(&held),
            dropped: Arc::clone(&dropped),
            closing: Arc::clone(&closing),
            hostname: hostname(),
            pid: std::process::id(),
            conn: None,
            resend: VecDeque::new(),
            next: None,
            backoff: BACKOFF_MIN,
            next_attempt: Instant::now(),
            logged: None,
        };
        let thread = thread::Builder::new()
            .name("ztxdp-syslog".into())
            .spawn(move || worker.run())
            .map_err(|source| AuditError::Thread { source })?;
        Ok(Self {
            address: settings.address.clone(),
            tx: Some(tx),
            held,
            limit: settings.queue.max(1),
            dropped,
            closing,
            thread: Some(thread),
        })
    }

    #[must_use]
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Hands a record to the thread; never blocks. When `queue` records are
    /// held already, it is dropped and counted.
    pub fn send(&self, s: &Arc<Sealed>) {
        // Only this side adds, so the check cannot be overtaken; it adds
        // before the thread can see the record, so the thread's subtraction
        // never comes first.
        if self.held.load(Ordering::Acquire) >= self.limit {
            tracing::debug!("syslog queue full; dropping a record");
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.held.fetch_add(1, Ordering::AcqRel);
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send(Arc::clone(s)).is_ok());
        if !sent {
            self.held.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records waiting for the collector: queued, or sent and not yet
    /// acknowledged. At `audit.syslog.queue`, new records are dropped.
    #[must_use]
    pub fn queued(&self) -> u64 {
        self.held.load(Ordering::Relaxed) as u64
    }

    /// Records not forwarded so far.
    #[must_use]
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lets the thread send what is queued and the collector acknowledge
    /// it, for up to `grace`, then stops it; returns the final count of
    /// records not forwarded (queued, or sent and not acknowledged).
    #[must_use = "the count is what could not be forwarded"]
    pub fn stop(mut self, grace: Duration) -> u64 {
        drop(self.tx.take());
        let deadline = Instant::now() + grace;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            self.closing.store(true, Ordering::Relaxed);
            // The worker checks `closing` at least every two IO_TIMEOUTs
            // (a connect, then a TLS handshake).
            let hard = Instant::now() + 2 * IO_TIMEOUT + Duration::from_secs(1);
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

impl Drop for Forwarder {
    /// A forwarder dropped without [`Self::stop`] must not leave its thread
    /// retrying a collector that is away for the life of the process.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

/// Why a connection to the collector could not be made, or broke.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The handshake failed (the collector's certificate is not from the
    /// CA, or not for the name; it refused ours), or the collector sent a
    /// TLS alert.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("the collector closed the connection")]
    Closed,
    #[error("the TLS handshake did not finish within {IO_TIMEOUT:?}")]
    HandshakeTimeout,
}

/// One connection to the collector.
struct Conn {
    stream: TcpStream,
    /// RFC 5425: the session over `stream`. Whatever it sends goes out
    /// through `out`, so `written` counts ciphertext, as `SIOCOUTQ` does.
    tls: Option<ClientConnection>,
    /// Bytes the socket took so far.
    written: u64,
    /// The bytes of the newest window record (or of the TLS session alone),
    /// of which the socket took `out_at`; no other bytes may go between them.
    out: Vec<u8>,
    out_at: usize,
    /// Records given to this connection and not acknowledged yet, oldest
    /// first, each with the stream offset just past its last byte.
    window: VecDeque<(Arc<Sealed>, u64)>,
}

impl Conn {
    /// Connects to `address`, with the TLS handshake when `tls` is set;
    /// each step bounded by [`IO_TIMEOUT`].
    fn open(address: &str, tls: Option<&SyslogTls>) -> Result<Self, LinkError> {
        let addr = address.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing")
        })?;
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        // Never blocked by a collector that stops reading: the thread keeps
        // reading acknowledgements and noticing a stop.
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        let mut conn = Self {
            stream,
            tls: tls.map(SyslogTls::session).transpose()?,
            written: 0,
            out: Vec::new(),
            out_at: 0,
            window: VecDeque::new(),
        };
        if let Err(e) = conn.handshake() {
            // Best effort: the alert tells the collector why.
            let _ = conn.take_tls().and_then(|()| conn.flush());
            return Err(e);
        }
        Ok(conn)
    }

    /// Completes the TLS handshake, if any, within [`IO_TIMEOUT`]. Its bytes
    /// are counted in `written` like any others.
    fn handshake(&mut self) -> Result<(), LinkError> {
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            self.take_tls()?;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::HandshakeTimeout);
            }
            if !self.flush()? {
                wait_for(&self.stream, libc::POLLOUT, left);
                continue;
            }
            let Some(tls) = &self.tls else { return Ok(()) };
            if !tls.is_handshaking() {
                if tls.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                    return self.await_answer(deadline);
                }
                return Ok(());
            }
            wait_for(&self.stream, libc::POLLIN, left);
            if self.receive()? {
                return Err(LinkError::Closed);
            }
        }
    }

    /// In TLS 1.3 the client's handshake is over before the collector has
    /// checked the client's certificate. A collector that refuses it
    /// answers the client's last message with an alert; one that takes it
    /// usually with session tickets. Records sent before that answer would
    /// be acknowledged by the collector's kernel and then thrown away by a
    /// collector that refused the session: delivered by this module's
    /// measure, and lost uncounted. So wait for the answer, until
    /// `deadline` (a collector that sends no tickets says nothing).
    fn await_answer(&mut self, deadline: Instant) -> Result<(), LinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if wait_for(&self.stream, libc::POLLIN, left) != 0 && self.receive()? {
            return Err(LinkError::Closed);
        }
        // Silence, or an answer that was no alert: the session stands.
        Ok(())
    }

    /// Whether bytes are partly written.
    fn writing(&self) -> bool {
        self.out_at < self.out.len()
    }

    /// Moves what the TLS session has to send into `out`; only when not
    /// [`Self::writing`]. (Until then it waits in the session, which keeps
    /// its order.)
    fn take_tls(&mut self) -> io::Result<()> {
        if !self.writing()
            && let Some(tls) = &mut self.tls
        {
            self.out.clear();
            self.out_at = 0;
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
        }
        Ok(())
    }

    /// Starts `framed`, the frame of `record` (encrypted, with TLS); only
    /// when not [`Self::writing`]. The record joins the window even when
    /// this fails: the caller then drops the connection, which sends the
    /// window again.
    fn push(&mut self, record: Arc<Sealed>, framed: String) -> io::Result<()> {
        let result = if let Some(tls) = &mut self.tls {
            tls.writer()
                .write_all(framed.as_bytes())
                .and_then(|()| self.take_tls())
        } else {
            self.out = framed.into_bytes();
            self.out_at = 0;
            Ok(())
        };
        self.window
            .push_back((record, self.written + self.out.len() as u64));
        result
    }

    /// Writes what the socket takes without blocking; `false` while part
    /// of `out` is left.
    fn flush(&mut self) -> io::Result<bool> {
        while self.writing() {
            match self.stream.write(&self.out[self.out_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_at += n;
                    self.written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads what the collector sent, without blocking; whether it closed
    /// its end. A collector has nothing to say: over TLS its session
    /// tickets, key updates and alerts go to the session (an alert comes
    /// back as the error), anything else is discarded.
    fn receive(&mut self) -> Result<bool, LinkError> {
        let revents = wait_for(&self.stream, libc::POLLIN | libc::POLLRDHUP, Duration::ZERO);
        let hung_up = revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0;
        let Some(tls) = &mut self.tls else {
            if hung_up || revents & libc::POLLIN == 0 {
                return Ok(hung_up);
            }
            let mut buf = [0u8; 512];
            return match io::Read::read(&mut &self.stream, &mut buf) {
                Ok(n) => Ok(n == 0),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        // Read even after a hang-up: an alert saying why may come first.
        loop {
            match tls.read_tls(&mut &self.stream) {
                Ok(0) => return Ok(true),
                Ok(_) => {
                    let state = tls.process_new_packets()?;
                    let _ = io::copy(
                        &mut io::Read::take(tls.reader(), state.plaintext_bytes_to_read() as u64),
                        &mut io::sink(),
                    );
                    if state.peer_has_closed() {
                        return Ok(true);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(hung_up),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Lets go of the records the collector acknowledged; how many. Valid
    /// also after the connection broke: the kernel keeps what was acknowledged.
    fn acknowledge(&mut self) -> io::Result<usize> {
        let acked = self.written - unacknowledged(&self.stream)?.min(self.written);
        let before = self.window.len();
        while self.window.front().is_some_and(|(_, end)| *end <= acked) {
            self.window.pop_front();
        }
        Ok(before - self.window.len())
    }
}

struct Worker {
    address: String,
    tls: Option<SyslogTls>,
    rx: mpsc::Receiver<Arc<Sealed>>,
    held: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    closing: Arc<AtomicBool>,
    hostname: String,
    pid: u32,
    conn: Option<Conn>,
    /// Records a broken connection did not get acknowledged, oldest first:
    /// sent again, before anything newer, as possible duplicates.
    resend: VecDeque<Arc<Sealed>>,
    /// A record taken from the queue that waits for a connection.
    next: Option<Arc<Sealed>>,
    backoff: Duration,
    next_attempt: Instant,
    /// The failure last logged since records last got through: each
    /// different one is logged once, not every retry.
    logged: Option<String>,
}

impl Worker {
    fn run(mut self) {
        loop {
            if self.closing.load(Ordering::Relaxed) {
                self.give_up();
                return;
            }
            self.tend();
            if self.conn.as_ref().is_some_and(Conn::writing) {
                self.flush();
                continue;
            }
            let (record, resent) = if let Some(r) = self.resend.pop_front() {
                (r, true)
            } else if let Some(r) = self.next.take() {
                (r, false)
            } else {
                let waiting = self.conn.as_ref().is_some_and(|c| !c.window.is_empty());
                match self
                    .rx
                    .recv_timeout(if waiting { ACK_CHECK } else { IDLE_CHECK })
                {
                    Ok(r) => (r, false),
                    Err(RecvTimeoutError::Timeout) => continue,
                    // Stopping: done once everything sent is acknowledged.
                    Err(RecvTimeoutError::Disconnected) => {
                        if !waiting {
                            return;
                        }
                        thread::sleep(ACK_CHECK);
                        continue;
                    }
                }
            };
            let Some(c) = &mut self.conn else {
                if resent {
                    self.resend.push_front(record);
                } else {
                    self.next = Some(record);
                }
                self.reconnect();
                continue;
            };
            let framed = frame(&message(&record, &self.hostname, self.pid, resent));
            match c.push(record, framed) {
                Ok(()) => self.flush(),
                Err(e) => self.broken(&e),
            }
        }
    }

    /// Reads the acknowledgements, and notices a collector that went away.
    fn tend(&mut self) {
        let Some(c) = &mut self.conn else { return };
        // What it sent first: the acknowledgements that came before its
        // FIN or alert count too. Then what the TLS session has to answer.
        let received = c
            .receive()
            .and_then(|gone| c.take_tls().map(|()| gone).map_err(LinkError::from));
        match c.acknowledge() {
            Ok(0) => {}
            Ok(n) => {
                self.held.fetch_sub(n, Ordering::AcqRel);
                self.backoff = BACKOFF_MIN;
                self.logged = None;
            }
            Err(e) => return self.broken(&e),
        }
        match received {
            Ok(false) => {}
            Ok(true) => self.broken(&LinkError::Closed),
            Err(e) => self.broken(&e),
        }
    }

    fn flush(&mut self) {
        let Some(c) = &mut self.conn else { return };
        match c.flush() {
            Ok(true) => {}
            // The send buffer is full: wait for room (or a stop), not spin.
            Ok(false) => {
                wait_for(&c.stream, libc::POLLOUT, IDLE_CHECK);
            }
            Err(e) => self.broken(&e),
        }
    }

    /// Drops the connection; what it did not get acknowledged goes first
    /// on the next one, after the back-off.
    fn broken(&mut self, why: &dyn std::fmt::Display) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        if let Ok(n) = c.acknowledge() {
            self.held.fetch_sub(n, Ordering::AcqRel);
        }
        tracing::warn!(
            address = self.address,
            error = %why,
            unacknowledged = c.window.len(),
            "the syslog connection broke; what the collector did not acknowledge is sent again"
        );
        let mut again: VecDeque<_> = c.window.into_iter().map(|(r, _)| r).collect();
        again.append(&mut self.resend);
        self.resend = again;
        self.logged = Some(why.to_string());
        self.retry_later();
    }

    fn retry_later(&mut self) {
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// Connects when the back-off allows, else waits a little for it.
    fn reconnect(&mut self) {
        let now = Instant::now();
        if now < self.next_attempt {
            thread::sleep((self.next_attempt - now).min(IDLE_CHECK));
            return;
        }
        match Conn::open(&self.address, self.tls.as_ref()) {
            Ok(conn) => {
                tracing::info!(
                    address = self.address,
                    tls = self.tls.is_some(),
                    resending = self.resend.len(),
                    "forwarding audit records to the syslog collector"
                );
                self.conn = Some(conn);
            }
            Err(e) => {
                let error = e.to_string();
                if self.logged.as_ref() != Some(&error) {
                    if matches!(e, LinkError::Tls(_) | LinkError::HandshakeTimeout) {
                        tracing::warn!(
                            address = self.address,
                            error = %error,
                            "the TLS handshake with the syslog collector failed; retrying with \
                             back-off (the file keeps every record)"
                        );
                    } else {
                        tracing::warn!(
                            address = self.address,
                            error = %error,
                            "cannot reach the syslog collector; retrying with back-off (the \
                             file keeps every record)"
                        );
                    }
                    self.logged = Some(error);
                }
                self.retry_later();
            }
        }
    }

    /// The stop's grace is over: every record still held counts as not
    /// forwarded.
    fn give_up(&mut self) {
        let mut left =
            self.resend.len() + usize::from(self.next.is_some()) + self.rx.try_iter().count();
        if let Some(c) = &mut self.conn {
            // A failed read leaves the window counted whole: counted twice
            // rather than lost.
            let _ = c.acknowledge();
            left += c.window.len();
        }
        self.dropped.fetch_add(left as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
