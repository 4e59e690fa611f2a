//! Forwarding records to a syslog collector: RFC 5424 messages over TCP with
//! octet-counting framing (RFC 6587), e.g. to rsyslog's `imtcp`.
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
//! counted. The thread reconnects with exponential back-off.
//!
//! Not covered: the acknowledgement comes from the collector's kernel, not
//! from the collector. A collector that dies with bytes in its socket's
//! receive buffer, or with records in its own queues, loses them without
//! a sign to the sender; only an application-level acknowledgement (RELP)
//! would show it. Every message carries `ztxdp.seq`, so the collector side
//! can find such a gap, and the file has every record. (The window counts
//! bytes written to the socket, whatever they carry: TLS, RFC 5425, would
//! change what the bytes are, not how they are acknowledged.)

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

use super::{AuditError, record::Body, writer::Sealed};
use crate::policy::SyslogSettings;

/// First wait after a failed connect; doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Bounds a connect to a collector that does not answer; the thread checks
/// for a stop at least this often.
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
        Body::Drift { differences: 0, .. } => 5,
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

/// Whether the collector closed its end (or the connection broke).
fn peer_gone(conn: &TcpStream) -> bool {
    let revents = wait_for(conn, libc::POLLIN | libc::POLLRDHUP, Duration::ZERO);
    if revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
        return true;
    }
    if revents & libc::POLLIN == 0 {
        return false;
    }
    // A collector has nothing to say; read what it sent to see whether it is EOF.
    let mut buf = [0u8; 512];
    match io::Read::read(&mut &*conn, &mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != io::ErrorKind::WouldBlock,
    }
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
            outage_logged: false,
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

impl Drop for Forwarder {
    /// A forwarder dropped without [`Self::stop`] must not leave its thread
    /// retrying a collector that is away for the life of the process.
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

/// One connection to the collector.
struct Conn {
    stream: TcpStream,
    /// Bytes the socket took so far.
    written: u64,
    /// The frame of the newest window record, of which the socket took
    /// `out_at` bytes; no other bytes may go between them.
    out: Vec<u8>,
    out_at: usize,
    /// Records given to this connection and not acknowledged yet, oldest
    /// first, each with the stream offset just past its last byte.
    window: VecDeque<(Arc<Sealed>, u64)>,
}

impl Conn {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            written: 0,
            out: Vec::new(),
            out_at: 0,
            window: VecDeque::new(),
        }
    }

    /// Whether a frame is partly written.
    fn writing(&self) -> bool {
        self.out_at < self.out.len()
    }

    /// Starts `framed`, the bytes of `record`; only when not [`Self::writing`].
    fn push(&mut self, record: Arc<Sealed>, framed: String) {
        self.out = framed.into_bytes();
        self.out_at = 0;
        self.window
            .push_back((record, self.written + self.out.len() as u64));
    }

    /// Writes what the socket takes without blocking; `false` while part
    /// of the frame is left.
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
    outage_logged: bool,
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
            c.push(record, framed);
            self.flush();
        }
    }

    /// Reads the acknowledgements, and notices a collector that went away.
    fn tend(&mut self) {
        let Some(c) = &mut self.conn else { return };
        // Whether it went away first: the acknowledgements that came before
        // its FIN count too.
        let gone = peer_gone(&c.stream);
        match c.acknowledge() {
            Ok(n) => {
                self.held.fetch_sub(n, Ordering::AcqRel);
                if gone {
                    self.broken(&"the collector closed the connection");
                }
            }
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
    /// on the next one.
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
        self.outage_logged = true;
        self.next_attempt = Instant::now() + self.backoff;
    }

    fn connect(&self) -> io::Result<TcpStream> {
        let addr = self.address.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the address resolves to nothing")
        })?;
        let conn = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        // Never blocked by a collector that stops reading: the thread keeps
        // reading acknowledgements and noticing a stop.
        conn.set_nonblocking(true)?;
        conn.set_nodelay(true)?;
        Ok(conn)
    }

    /// Connects when the back-off allows, else waits a little for it.
    fn reconnect(&mut self) {
        let now = Instant::now();
        if now < self.next_attempt {
            thread::sleep((self.next_attempt - now).min(IDLE_CHECK));
            return;
        }
        match self.connect() {
            Ok(stream) => {
                tracing::info!(
                    address = self.address,
                    resending = self.resend.len(),
                    "forwarding audit records to the syslog collector"
                );
                self.conn = Some(Conn::new(stream));
                self.backoff = BACKOFF_MIN;
                self.outage_logged = false;
            }
            Err(e) => {
                if !self.outage_logged {
                    tracing::warn!(
                        address = self.address,
                        error = %e,
                        "cannot reach the syslog collector; retrying with back-off (the file keeps every record)"
                    );
                    self.outage_logged = true;
                }
                self.next_attempt = now + self.backoff;
                self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
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
mod tests {
    use std::{
        collections::BTreeMap,
        io::{BufRead as _, BufReader, Read as _},
        net::TcpListener,
    };

    use super::*;
    use crate::audit::record::{Program, Record};

    /// Bounds every wait for the forwarder; it acts within milliseconds.
    const PATIENCE: Duration = Duration::from_secs(30);

    fn sealed_with(seq: u64, line: String) -> Arc<Sealed> {
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
            },
            chain: "c".into(),
            line,
        })
    }

    fn sealed(seq: u64) -> Arc<Sealed> {
        sealed_with(seq, format!("{{\"ztxdp\":{{\"seq\":{seq}}}}}"))
    }

    /// A record larger than what the collector's kernel buffers for a
    /// reader that stopped (`tcp_rmem`'s default is 128 KiB), so never
    /// acknowledged whole until read; small enough to fit whole in the
    /// forwarder's send buffer (about 1.3 MiB on loopback), so the record
    /// after it is written too, and waits for an acknowledgement.
    fn big(seq: u64) -> Arc<Sealed> {
        sealed_with(seq, "x".repeat(256 << 10))
    }

    fn forwarder(address: String, queue: usize) -> Forwarder {
        Forwarder::start(&SyslogSettings { address, queue }).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A collector on a free port, and a forwarder to it.
    fn collector() -> (TcpListener, Forwarder) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        let address = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("{e}"))
            .to_string();
        (listener, forwarder(address, 100))
    }

    /// The forwarder's next connection, reads bounded by [`PATIENCE`].
    fn accept(listener: &TcpListener) -> BufReader<TcpStream> {
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + PATIENCE;
        loop {
            match listener.accept() {
                Ok((conn, _)) => {
                    conn.set_nonblocking(false)
                        .and_then(|()| conn.set_read_timeout(Some(PATIENCE)))
                        .unwrap_or_else(|e| panic!("{e}"));
                    return BufReader::new(conn);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the forwarder never connected");
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// Reads `n` octet-counted frames.
    fn read_frames(reader: &mut BufReader<TcpStream>, n: usize) -> Vec<String> {
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

    /// A message's seq, and whether it is marked as a possible duplicate.
    fn seq_of(message: &str) -> (u64, bool) {
        let seq = message
            .split_once("seq=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(seq, _)| seq.parse().ok())
            .unwrap_or_else(|| panic!("no seq: {message:.200}"));
        (seq, message.contains(" possible_duplicate=\"true\"]"))
    }

    #[test]
    fn messages_follow_rfc5424_with_octet_counting() {
        let m = message(&sealed(3), "host1", 42, false);
        assert_eq!(
            m,
            r#"<108>1 2026-11-22T05:40:00.123456Z host1 ztxdp 42 lost [ztxdp@32473 seq="3"] {"ztxdp":{"seq":3}}"#
        );
        assert_eq!(
            message(&sealed(3), "host1", 42, true),
            r#"<108>1 2026-11-22T05:40:00.123456Z host1 ztxdp 42 lost [ztxdp@32473 seq="3" possible_duplicate="true"] {"ztxdp":{"seq":3}}"#,
            "a record sent again says so, and only in the structured data"
        );
        assert_eq!(frame("héllo"), "6 héllo", "the length counts octets");
    }

    #[test]
    fn records_wait_while_the_collector_is_away_and_overflow_is_counted() {
        // Find a free port, then close it: nothing listens yet.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_or_else(|e| panic!("{e}"), |a| a.port());
        let f = forwarder(format!("127.0.0.1:{port}"), 4);
        for seq in 1..=10 {
            f.send(&sealed(seq));
        }
        assert_eq!(f.dropped(), 6, "4 are held, the rest counted at once");
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
        let got = read_frames(&mut accept(&listener), 4);
        let got: Vec<_> = got.iter().map(|m| seq_of(m)).collect();
        assert_eq!(got, [(1, false), (2, false), (3, false), (4, false)]);
        assert_eq!(f.stop(PATIENCE), 6, "nothing else was lost");
    }

    #[test]
    fn acknowledged_records_are_not_sent_again() {
        let (listener, f) = collector();
        for seq in 1..=3 {
            f.send(&sealed(seq));
        }
        let mut first = accept(&listener);
        assert_eq!(read_frames(&mut first, 3).len(), 3);
        // The collector restarts having read everything: nothing is lost.
        drop(first);
        f.send(&sealed(4));
        let got = read_frames(&mut accept(&listener), 1);
        assert_eq!(
            seq_of(&got[0]).0,
            4,
            "1 to 3 were acknowledged; only 4 may have been cut off"
        );
        assert_eq!(f.stop(PATIENCE), 0);
    }

    #[test]
    fn records_cut_off_by_a_collector_that_goes_away_are_sent_again_marked() {
        let (listener, f) = collector();
        let cut = big(2);
        for s in [sealed(1), Arc::clone(&cut), sealed(3)] {
            f.send(&s);
        }
        let mut first = accept(&listener);
        assert_eq!(seq_of(&read_frames(&mut first, 1)[0]), (1, false));
        // A little of record 2, then the collector goes away with the rest
        // unread (a reset): 2 was never acknowledged whole, nor 3 after it.
        first
            .read_exact(&mut [0; 100])
            .unwrap_or_else(|e| panic!("{e}"));
        drop(first);
        let mut second = accept(&listener);
        f.send(&sealed(4));
        let mut got = BTreeMap::new();
        while !got.contains_key(&4) {
            let m = read_frames(&mut second, 1).remove(0);
            let (seq, resent) = seq_of(&m);
            assert!(
                resent || seq >= 3,
                "1 (if its acknowledgement came late) and 2 were sent on the \
                 first connection: sent again, they must be marked: {m:.200}"
            );
            if seq == 2 {
                assert!(
                    m.ends_with(&format!("\"] {}", cut.line)),
                    "the same line, whole"
                );
            }
            assert!(got.insert(seq, resent).is_none(), "{seq} came twice");
        }
        assert_eq!(got.get(&2), Some(&true), "2 was sent again: {got:?}");
        assert_eq!(got.get(&3).map(|_| ()), Some(()), "3 came: {got:?}");
        assert_eq!(got.get(&4), Some(&false), "new records are not marked");
        assert_eq!(f.stop(PATIENCE), 0, "every record was acknowledged");
    }

    #[test]
    fn stop_counts_what_the_collector_did_not_acknowledge() {
        let (listener, f) = collector();
        for s in [sealed(1), big(2), sealed(3)] {
            f.send(&s);
        }
        let first = accept(&listener);
        // The collector reads nothing. Its kernel acknowledges what fits
        // its receive buffer: all of record 1, the start of record 2.
        let one = frame(&message(&sealed(1), &hostname(), std::process::id(), false)).len();
        let deadline = Instant::now() + PATIENCE;
        let mut buf = vec![0; one];
        while first.get_ref().peek(&mut buf).unwrap_or(0) < one {
            assert!(Instant::now() < deadline, "record 1 never arrived");
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            f.stop(Duration::from_secs(1)),
            2,
            "2 and 3 were not acknowledged; 1 was, by the collector's kernel, \
             though the collector never read it"
        );
    }
}
