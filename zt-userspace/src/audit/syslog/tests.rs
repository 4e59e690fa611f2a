use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read},
    net::TcpListener,
};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use super::{tls::tests::TestCa, *};
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
            previous_run: false,
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

fn forwarder(address: String, queue: usize, tls: Option<SyslogTls>) -> Forwarder {
    Forwarder::start(&SyslogSettings {
        address,
        queue,
        tls,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn listen() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let address = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("{e}"))
        .to_string();
    (listener, address)
}

/// A collector on a free port: plain, or with TLS and a certificate for
/// 127.0.0.1 from `ca`, which the forwarder trusts.
struct Collector {
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
}

impl Collector {
    /// The collector, and a forwarder to it.
    fn start(ca: Option<&TestCa>) -> (Self, Forwarder) {
        let (listener, address) = listen();
        let tls = ca.map(|ca| ca.server(&["127.0.0.1"]));
        let f = forwarder(address, 100, ca.map(|ca| ca.client("127.0.0.1")));
        (Self { listener, tls }, f)
    }

    /// The forwarder's next connection, decrypted with TLS; reads bounded
    /// by [`PATIENCE`].
    fn accept(&self) -> BufReader<Box<dyn Read>> {
        let conn = accept(&self.listener);
        BufReader::new(match &self.tls {
            None => Box::new(conn),
            Some(config) => Box::new(StreamOwned::new(
                ServerConnection::new(Arc::clone(config)).unwrap_or_else(|e| panic!("{e}")),
                conn,
            )),
        })
    }
}

/// The forwarder's next connection, reads bounded by [`PATIENCE`].
fn accept(listener: &TcpListener) -> TcpStream {
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
                return conn;
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
fn read_frames(reader: &mut impl BufRead, n: usize) -> Vec<String> {
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
    let f = forwarder(format!("127.0.0.1:{port}"), 4, None);
    for seq in 1..=10 {
        f.send(&sealed(seq));
    }
    assert_eq!(f.dropped(), 6, "4 are held, the rest counted at once");
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("{e}"));
    let got = read_frames(&mut BufReader::new(accept(&listener)), 4);
    let got: Vec<_> = got.iter().map(|m| seq_of(m)).collect();
    assert_eq!(got, [(1, false), (2, false), (3, false), (4, false)]);
    assert_eq!(f.stop(PATIENCE), 6, "nothing else was lost");
}

#[test]
fn acknowledged_records_are_not_sent_again() {
    acknowledged_records_are_not_sent_again_with(None);
}

#[test]
fn acknowledged_records_are_not_sent_again_over_tls() {
    acknowledged_records_are_not_sent_again_with(Some(&TestCa::new("ca")));
}

fn acknowledged_records_are_not_sent_again_with(ca: Option<&TestCa>) {
    let (collector, f) = Collector::start(ca);
    for seq in 1..=3 {
        f.send(&sealed(seq));
    }
    let mut first = collector.accept();
    assert_eq!(read_frames(&mut first, 3).len(), 3);
    // The collector restarts having read everything: nothing is lost.
    drop(first);
    f.send(&sealed(4));
    let got = read_frames(&mut collector.accept(), 1);
    assert_eq!(
        seq_of(&got[0]).0,
        4,
        "1 to 3 were acknowledged; only 4 may have been cut off"
    );
    assert_eq!(f.stop(PATIENCE), 0);
}

#[test]
fn records_cut_off_by_a_collector_that_goes_away_are_sent_again_marked() {
    records_cut_off_are_sent_again_marked_with(None);
}

#[test]
fn records_cut_off_over_tls_are_sent_again_marked() {
    records_cut_off_are_sent_again_marked_with(Some(&TestCa::new("ca")));
}

fn records_cut_off_are_sent_again_marked_with(ca: Option<&TestCa>) {
    let (collector, f) = Collector::start(ca);
    let cut = big(2);
    for s in [sealed(1), Arc::clone(&cut), sealed(3)] {
        f.send(&s);
    }
    let mut first = collector.accept();
    assert_eq!(seq_of(&read_frames(&mut first, 1)[0]), (1, false));
    // A little of record 2, then the collector goes away with the rest
    // unread (a reset): 2 was never acknowledged whole, nor 3 after it.
    first
        .read_exact(&mut [0; 100])
        .unwrap_or_else(|e| panic!("{e}"));
    drop(first);
    let mut second = collector.accept();
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
    let (collector, f) = Collector::start(None);
    for s in [sealed(1), big(2), sealed(3)] {
        f.send(&s);
    }
    let first = accept(&collector.listener);
    // The collector reads nothing. Its kernel acknowledges what fits
    // its receive buffer: all of record 1, the start of record 2.
    let one = frame(&message(&sealed(1), &hostname(), std::process::id(), false)).len();
    let deadline = Instant::now() + PATIENCE;
    let mut buf = vec![0; one];
    while first.peek(&mut buf).unwrap_or(0) < one {
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

/// The collector's side of a TLS connection, fed the stream one byte at a
/// time: how many bytes it received in all, and at which stream offsets
/// its plaintext grew, to how many bytes.
fn receive_bytewise(listener: &TcpListener, config: Arc<ServerConfig>) -> (u64, Vec<(u64, u64)>) {
    let mut conn = accept(listener);
    let mut tls = ServerConnection::new(config).unwrap_or_else(|e| panic!("{e}"));
    let (mut offset, mut plaintext, mut grew) = (0, 0, Vec::new());
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).unwrap_or_else(|e| panic!("{e}"));
        if n == 0 {
            return (offset, grew);
        }
        for byte in &buf[..n] {
            offset += 1;
            tls.read_tls(&mut &[*byte][..])
                .unwrap_or_else(|e| panic!("{e}"));
            let state = tls.process_new_packets().unwrap_or_else(|e| panic!("{e}"));
            let new = state.plaintext_bytes_to_read() as u64;
            if new > 0 {
                io::copy(&mut tls.reader().take(new), &mut io::sink())
                    .unwrap_or_else(|e| panic!("{e}"));
                plaintext += new;
                grew.push((offset, plaintext));
            }
            while tls.wants_write() {
                tls.write_tls(&mut conn).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }
}

#[test]
fn over_tls_each_record_is_whole_at_its_offset_in_the_ciphertext() {
    // What lets a record go is the collector's kernel acknowledging the
    // offset noted for it; that offset must be where the collector can
    // first read the whole message, no earlier (a record let go too soon
    // is lost unseen), no later.
    let ca = TestCa::new("ca");
    let (listener, address) = listen();
    let config = ca.server(&["127.0.0.1"]);
    let collector = thread::spawn(move || receive_bytewise(&listener, config));
    let mut c =
        Conn::open(&address, Some(&ca.client("127.0.0.1"))).unwrap_or_else(|e| panic!("{e}"));
    let mut frame_ends = Vec::new();
    let mut plaintext = 0;
    // A record larger than a TLS record (16 KiB) between two small ones.
    for record in [sealed(1), big(2), sealed(3)] {
        let framed = frame(&message(&record, "host", 1, false));
        plaintext += framed.len() as u64;
        frame_ends.push(plaintext);
        c.push(record, framed).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + PATIENCE;
        while !c.flush().unwrap_or_else(|e| panic!("{e}")) {
            assert!(Instant::now() < deadline, "the collector stopped reading");
            c.receive().unwrap_or_else(|e| panic!("{e}"));
            wait_for(&c.stream, libc::POLLOUT, IDLE_CHECK);
        }
    }
    let offsets: Vec<u64> = c.window.iter().map(|(_, end)| *end).collect();
    let written = c.written;
    // A FIN, not a reset: the collector's session tickets are unread.
    c.stream
        .shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| panic!("{e}"));
    let (received, grew) = collector
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    assert_eq!(
        received, written,
        "every byte on the wire is counted, the handshake's too"
    );
    let readable_at: Vec<u64> = frame_ends
        .iter()
        .map(|&end| {
            grew.iter()
                .find(|&&(_, plaintext)| plaintext >= end)
                .map_or_else(
                    || panic!("message ending at {end} never readable"),
                    |&(at, _)| at,
                )
        })
        .collect();
    assert_eq!(
        offsets, readable_at,
        "each record's offset is where its message becomes readable"
    );
}

#[test]
fn a_collector_not_certified_by_the_ca_for_the_name_is_refused() {
    let (trusted, other) = (TestCa::new("trusted"), TestCa::new("other"));
    for (server, why) in [
        (other.server(&["127.0.0.1"]), "UnknownIssuer"),
        (trusted.server(&["collector.example"]), "not valid for name"),
    ] {
        let (listener, address) = listen();
        // The collector's side of the handshake, until it fails.
        let collector = thread::spawn(move || {
            let mut tls = StreamOwned::new(
                ServerConnection::new(server).unwrap_or_else(|e| panic!("{e}")),
                accept(&listener),
            );
            let _ = tls.read(&mut [0; 64]);
        });
        let refused = Conn::open(&address, Some(&trusted.client("127.0.0.1")));
        let _ = collector.join();
        match refused {
            Err(e @ LinkError::Tls(_)) => {
                assert!(e.to_string().contains(why), "{e} should say {why}");
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a collector whose certificate does not say {why} was taken"),
        }
    }
}

#[test]
fn a_collector_that_refuses_the_client_certificate_gets_no_record() {
    // TLS 1.3: the client is done with its handshake before the collector
    // has looked at its certificate (none here).
    let ca = TestCa::new("ca");
    let (listener, address) = listen();
    let server = ca.server_asking(&["127.0.0.1"]);
    let collector = thread::spawn(move || {
        let mut tls = StreamOwned::new(
            ServerConnection::new(server).unwrap_or_else(|e| panic!("{e}")),
            accept(&listener),
        );
        let _ = tls.read(&mut [0; 64]);
    });
    let refused = Conn::open(&address, Some(&ca.client("127.0.0.1")));
    let _ = collector.join();
    match refused {
        Err(e @ LinkError::Tls(_)) => {
            assert!(e.to_string().contains("CertificateRequired"), "{e}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!(
            "a session the collector refused was taken: records sent on it would be \
             acknowledged by its kernel, and lost"
        ),
    }
}
