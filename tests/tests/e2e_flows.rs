//! Tier 3, return traffic (issue 4): the real `ztxdp up` on the lab's edge
//! (`zt_tests::lab`), with real sockets. The edge host must be able to
//! talk out (TCP, DNS-style UDP, ping) and get its replies, while nothing
//! gets in that is not an exact reply; echo requests are held to their
//! rate per source; ICMP errors about its flows keep path-MTU discovery
//! working. Judged by the sockets, `ztxdp status --json` counters, and the
//! kernel's path MTU. Needs root. Each test builds its own lab and tears it
//! down on drop, also when it fails.

mod e2e;

use std::{
    io::{self, Read as _, Write as _},
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::OnceLock,
    thread,
    time::{Duration, Instant},
};

use e2e::{
    CONNECT_TIMEOUT, Enforced, SETTLE_TIMEOUT, accept, assert_connects, assert_times_out, at,
    build_lab, counter, expect_counter, expect_no_datagram, listen, mac, patterned, send_frames,
    status, udp_socket,
};
use serde_json::Value;
use zt_tests::{
    lab::{EDGE_V4, EDGE_V6, HOST_INTERFACE, OUTSIDER_V4, OUTSIDER_V6},
    netns::NetNs,
    packet::{Ethernet, Ipv4, Transport, checksum},
};

/// What the edge's echo limit is set to in these tests.
const ECHO_RATE_PER_SEC: u64 = 5;
const ECHO_BURST: u64 = 5;
const SERVER_TCP: u16 = 8080;
const SERVER_UDP: u16 = 5353;
/// ICMP "destination unreachable", code "fragmentation needed".
const DEST_UNREACHABLE: u8 = 3;
const FRAG_NEEDED: u8 = 4;
const LOWER_MTU: u16 = 1280;
const LINK_MTU: i32 = 1500;

fn any_v4() -> SocketAddr {
    at(Ipv4Addr::UNSPECIFIED, 0)
}

/// One dual-stack server socket in the outsider, answering both families,
/// and a client socket of each family on the edge with the server address
/// it queries (IPv4 first).
fn dual_stack(f: &Enforced) -> (UdpSocket, [(UdpSocket, SocketAddr); 2]) {
    let server = udp_socket(f.lab.outsider(), at(Ipv6Addr::UNSPECIFIED, SERVER_UDP));
    let edge = f.edge();
    let clients = [
        (udp_socket(edge, any_v4()), at(OUTSIDER_V4, SERVER_UDP)),
        (
            udp_socket(edge, at(Ipv6Addr::UNSPECIFIED, 0)),
            at(OUTSIDER_V6, SERVER_UDP),
        ),
    ];
    (server, clients)
}

/// The lab with `ztxdp up` on the edge: the lab's policy, with the echo
/// limit above and `flows_lines` as the body of `[flows]`.
fn start(tag: &str, flows_lines: &str) -> Enforced {
    Enforced::start(tag, build_lab(), |_, scratch| {
        format!(
            "[edge]\n\
             interface = \"{HOST_INTERFACE}\"\n\
             wireguard_ports = [51820]\n\
             ssh_port = 22\n\
             ssh_allow = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\
             icmp_echo_rate = \"{ECHO_RATE_PER_SEC}/s\"\n\
             icmp_echo_burst = {ECHO_BURST}\n\n\
             [flows]\n{flows_lines}\n\n\
             [audit]\npath = \"{}\"\nstate = \"{}\"\n",
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display()
        )
    })
}

/// `client` sends `query` to `server` at `target`, which must get it and
/// answer with `answer`; the answer must reach `client` from `target`.
/// Returns the client's address as the server saw it.
fn exchange(
    f: &Enforced,
    client: &UdpSocket,
    server: &UdpSocket,
    target: SocketAddr,
    query: &[u8],
    answer: &[u8],
) -> SocketAddr {
    let mut buf = [0u8; 4096];
    client
        .send_to(query, target)
        .unwrap_or_else(|e| panic!("query to {target}: {e}"));
    let (n, from) = server
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("the server got no query: {e}"));
    assert_eq!(&buf[..n], query, "the query");
    server
        .send_to(answer, from)
        .unwrap_or_else(|e| panic!("answer: {e}"));
    match client.recv_from(&mut buf) {
        Ok((n, src)) => assert_eq!((&buf[..n], src), (answer, target), "the answer"),
        Err(e) => f.fail(&format!("the answer from {target} did not arrive: {e}")),
    }
    from
}

fn flows_status(status: &Value) -> (u64, u64, u64) {
    let f = &status["flows"];
    let n = |k: &str| {
        f[k].as_u64()
            .unwrap_or_else(|| panic!("status has no flows.{k}:\n{status:#}"))
    };
    (n("entries"), n("created"), n("evicted"))
}

#[test]
fn tcp_out_works_and_the_server_cannot_connect_in() {
    let f = start("flows-tcp", "");
    let (edge, outsider) = (f.edge(), f.lab.outsider());
    let server = listen(outsider, SERVER_TCP);
    let before = f.counter("reply");
    let mut clients = Vec::new();
    for target in [at(OUTSIDER_V4, SERVER_TCP), at(OUTSIDER_V6, SERVER_TCP)] {
        let mut client = assert_connects(edge, target, "the edge connects out");
        let mut accepted = accept(&server, CONNECT_TIMEOUT);
        client
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .unwrap_or_else(|e| panic!("read timeout: {e}"));
        accepted
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .unwrap_or_else(|e| panic!("read timeout: {e}"));
        // A response bigger than one segment: every data segment is a reply.
        let response = vec![0x5a_u8; 64 * 1024];
        client
            .write_all(b"GET /\n")
            .unwrap_or_else(|e| panic!("{target}: request: {e}"));
        let mut request = [0u8; 6];
        accepted
            .read_exact(&mut request)
            .unwrap_or_else(|e| panic!("{target}: the server got no request: {e}"));
        accepted
            .write_all(&response)
            .unwrap_or_else(|e| panic!("{target}: response: {e}"));
        let mut got = vec![0u8; response.len()];
        if let Err(e) = client.read_exact(&mut got) {
            f.fail(&format!(
                "{target}: the edge did not get the whole response: {e}"
            ));
        }
        assert!(got == response, "{target}: the response arrived changed");
        clients.push((client, accepted));
    }
    let now = status(edge);
    assert!(
        counter(&now, "edge", "reply") > before,
        "replies were not counted as such:\n{now:#}"
    );
    let (entries, created, evicted) = flows_status(&now);
    assert!(
        created >= 2 && entries >= 2 && evicted == 0,
        "two flows recorded, none evicted:\n{now:#}"
    );
    assert_eq!(
        now["flows"]["recorders"][0]["interface"], HOST_INTERFACE,
        "the egress recorder:\n{now:#}"
    );

    // The same server cannot open a connection to a listener on the edge.
    let _edge_server = listen(edge, SERVER_TCP);
    let refused = f.counter("port_not_allowed");
    assert_times_out(outsider, at(EDGE_V4, SERVER_TCP), "the server connects in");
    assert_times_out(
        outsider,
        at(EDGE_V6, SERVER_TCP),
        "the server connects in over IPv6",
    );
    assert!(
        f.counter("port_not_allowed") >= refused + 2,
        "the SYNs were not counted as port_not_allowed"
    );
    // Not even on the exact reverse of the live connection: a SYN is never
    // a reply.
    let client_port = clients[0]
        .0
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port();
    let eth = Ethernet {
        dst: mac(edge, HOST_INTERFACE),
        src: mac(outsider, HOST_INTERFACE),
        tags: Vec::new(),
    };
    let syn = Transport::Tcp {
        src: SERVER_TCP,
        dst: client_port,
        flags: zt_common::tcp_flag::SYN,
    };
    let dropped = f.counter("port_not_allowed");
    send_frames(
        outsider,
        HOST_INTERFACE,
        &[eth.ipv4(&Ipv4::new(OUTSIDER_V4, EDGE_V4), &syn)],
    );
    expect_counter(edge, "edge", "port_not_allowed", dropped, 1);
}

/// A replacing `ztxdp up` adopts the state of the programs it replaces: a
/// TCP connection the edge opened before it still carries data both ways
/// after it, and the counters go on from where they were.
#[test]
fn a_connection_opened_before_a_replacing_up_carries_data_after_it() {
    let mut f = start("flows-adopt", "");
    let server = listen(f.lab.outsider(), SERVER_TCP);
    let mut client = assert_connects(
        f.edge(),
        at(OUTSIDER_V4, SERVER_TCP),
        "the edge connects out",
    );
    let mut accepted = accept(&server, CONNECT_TIMEOUT);
    for stream in [&client, &accepted] {
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .unwrap_or_else(|e| panic!("read timeout: {e}"));
    }
    let mut buf = [0u8; 6];
    accepted
        .write_all(b"before")
        .unwrap_or_else(|e| panic!("server write: {e}"));
    client
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("the edge got nothing before the restart: {e}"));
    let replies = f.counter("reply");
    let before = status(f.edge());
    let mut old = f.restart("daemon-2.log");
    old.expect_replaced();
    accepted
        .write_all(b"after!")
        .unwrap_or_else(|e| panic!("server write: {e}"));
    if let Err(e) = client.read_exact(&mut buf) {
        f.fail(&format!(
            "the server's data did not reach the edge after the replacing up: {e}"
        ));
    }
    assert_eq!(&buf, b"after!");
    client
        .write_all(b"back!!")
        .unwrap_or_else(|e| panic!("client write: {e}"));
    accepted
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("the server got nothing after the restart: {e}"));
    assert_eq!(&buf, b"back!!");
    let now = status(f.edge());
    assert!(
        counter(&now, "edge", "reply") > replies,
        "the reply counter started over:\n{before:#}\n{now:#}"
    );
    let (_, created, _) = flows_status(&now);
    assert!(
        created >= flows_status(&before).1,
        "flows_created started over:\n{before:#}\n{now:#}"
    );
}

#[test]
fn a_reply_too_big_for_one_packet_arrives_whole() {
    // A 3000-byte answer (a big DNS response over EDNS0, say) leaves the
    // server in three fragments. Only the first has the ports that match it
    // to the query's flow; the other two follow it.
    let f = start("flows-frag", "");
    let edge = f.edge();
    let (server, clients) = dual_stack(&f);
    let answer = patterned(3000);
    for (client, target) in &clients {
        let (replies, followed) = (f.counter("reply"), f.counter("fragment_of_allowed"));
        exchange(
            &f,
            client,
            &server,
            *target,
            b"query example.org TXT",
            &answer,
        );
        expect_counter(edge, "edge", "reply", replies, 1);
        expect_counter(edge, "edge", "fragment_of_allowed", followed, 2);
    }
}

#[test]
fn a_udp_query_gets_its_reply_and_spoofed_replies_are_dropped() {
    let f = start("flows-udp", "");
    let (edge, bastion) = (f.edge(), f.lab.bastion());
    let (server, clients) = dual_stack(&f);
    let mut buf = [0u8; 512];
    for (client, target) in &clients {
        exchange(
            &f,
            client,
            &server,
            *target,
            b"query example.org A",
            b"answer 192.0.2.1",
        );
    }

    // Spoofed datagrams from the bastion, claiming to be the server.
    let client = &clients[0].0;
    let query_port = client
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port();
    let other = udp_socket(edge, any_v4());
    let other_port = other
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"))
        .port();
    let eth = Ethernet {
        dst: mac(edge, HOST_INTERFACE),
        src: mac(bastion, HOST_INTERFACE),
        tags: Vec::new(),
    };
    let spoof = |src: u16, dst: u16, text: &[u8]| {
        eth.ipv4(
            &Ipv4::new(OUTSIDER_V4, EDGE_V4).data(text),
            &Transport::Udp { src, dst },
        )
    };
    let (dropped, replies) = (f.counter("port_not_allowed"), f.counter("reply"));
    send_frames(
        bastion,
        HOST_INTERFACE,
        &[spoof(SERVER_UDP, other_port, b"to another port")],
    );
    send_frames(
        bastion,
        HOST_INTERFACE,
        &[spoof(SERVER_UDP + 1, query_port, b"from another port")],
    );
    expect_counter(edge, "edge", "port_not_allowed", dropped, 2);
    expect_no_datagram(&other, "a spoofed datagram to another port");
    expect_no_datagram(client, "a spoofed datagram from another port");
    // The same frame with the exact tuple is a reply: the frames are sound.
    send_frames(
        bastion,
        HOST_INTERFACE,
        &[spoof(SERVER_UDP, query_port, b"exact")],
    );
    match client.recv_from(&mut buf) {
        Ok((n, _)) => assert_eq!(&buf[..n], b"exact", "the exact spoofed reply"),
        Err(e) => f.fail(&format!(
            "a frame with the exact reply tuple did not arrive ({e}), so the drops prove nothing"
        )),
    }
    expect_counter(edge, "edge", "reply", replies, 1);
}

/// An ICMP echo ("ping") socket: the kernel sets the identifier and
/// checksum and hands this socket only the replies to its own requests.
struct Pinger {
    fd: OwnedFd,
}

impl Pinger {
    fn new(ns: &NetNs) -> Self {
        // Ping sockets are off by default: allow them for every group here.
        ns.sysctl("net.ipv4.ping_group_range", "0 2147483647")
            .unwrap_or_else(|e| panic!("enabling ping sockets in {}: {e}", ns.name()));
        let fd = ns
            .enter(|| {
                // SAFETY: plain socket(2); the result is checked and owned below.
                let fd =
                    unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP) };
                assert!(fd >= 0, "ICMP socket: {}", io::Error::last_os_error());
                // SAFETY: `fd` is a fresh descriptor nobody else owns.
                unsafe { OwnedFd::from_raw_fd(fd) }
            })
            .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()));
        let pinger = Self { fd };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        pinger.setsockopt(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout);
        pinger
    }

    fn setsockopt<T>(&self, level: i32, name: i32, value: &T) {
        let len = u32::try_from(size_of::<T>()).unwrap_or(0);
        // SAFETY: `value` is a valid T for the length passed.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                std::ptr::from_ref(value).cast(),
                len,
            )
        };
        assert_eq!(
            rc,
            0,
            "setsockopt({level}, {name}): {}",
            io::Error::last_os_error()
        );
    }

    fn send(&self, to: Ipv4Addr, seq: u16) {
        let mut request = [8u8, 0, 0, 0, 0, 0, 0, 0];
        request[6..8].copy_from_slice(&seq.to_be_bytes());
        // SAFETY: sockaddr_in is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(0);
        addr.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
        // SAFETY: `request` and `addr` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                (&raw const addr).cast(),
                u32::try_from(size_of::<libc::sockaddr_in>()).unwrap_or(0),
            )
        };
        assert_eq!(
            sent,
            8,
            "sending echo request {seq}: {}",
            io::Error::last_os_error()
        );
    }

    /// Echo replies received until `until` is set and has passed.
    fn replies_until(&self, until: &OnceLock<Instant>) -> usize {
        let mut count = 0;
        let mut buf = [0u8; 128];
        while until.get().is_none_or(|&t| Instant::now() < t) {
            // SAFETY: `buf` is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 8 && buf[0] == 0 {
                count += 1;
            } else if n < 0 {
                let e = io::Error::last_os_error();
                assert!(
                    matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ),
                    "receiving echo replies: {e}"
                );
            }
        }
        count
    }
}

#[test]
fn a_ping_flood_is_held_to_the_rate_while_another_source_gets_its_replies() {
    const FLOOD: u16 = 100;
    const OTHER: u16 = 3;
    let f = start("flows-ping", "");
    let (edge, flooder, other) = (f.edge(), f.lab.outsider(), f.lab.bastion());
    let (a, b) = (&Pinger::new(flooder), &Pinger::new(other));
    // Resolve the neighbours without spending echo tokens: UDP to the
    // WireGuard port passes (and draws a port unreachable back).
    for ns in [flooder, other] {
        let s = udp_socket(ns, any_v4());
        s.send_to(b"warm-up", at(EDGE_V4, 51820))
            .unwrap_or_else(|e| panic!("warm-up: {e}"));
    }
    thread::sleep(Duration::from_millis(200));
    let (echoes, limited) = (f.counter("icmp_echo"), f.counter("icmp_rate_limited"));

    // Replies are counted until a second after the last request, however
    // long a loaded machine took to send them.
    let deadline = &OnceLock::new();
    let start = Instant::now();
    let (flood_replies, other_replies, flood_took) = thread::scope(|s| {
        let flood = s.spawn(|| {
            for seq in 0..FLOOD {
                a.send(EDGE_V4, seq);
                thread::sleep(Duration::from_millis(10));
            }
            start.elapsed()
        });
        let paced = s.spawn(|| {
            for seq in 0..OTHER {
                thread::sleep(Duration::from_millis(250));
                b.send(EDGE_V4, seq);
            }
        });
        let flood_replies = s.spawn(move || a.replies_until(deadline));
        let other_replies = s.spawn(move || b.replies_until(deadline));
        paced
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let took = flood
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        let _ = deadline.set(Instant::now() + Duration::from_secs(1));
        let replies = |h: thread::ScopedJoinHandle<usize>| {
            h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
        };
        (replies(flood_replies), replies(other_replies), took)
    });

    // A burst, then one every 1/rate: never more than that over the flood
    // (plus a little for the time the packets take to reach the edge).
    let took_ms = u64::try_from(flood_took.as_millis()).unwrap_or(u64::MAX);
    let most = ECHO_BURST + ECHO_RATE_PER_SEC * (took_ms + 200) / 1000 + 1;
    let answered = u64::try_from(flood_replies).unwrap_or(u64::MAX);
    eprintln!(
        "ping flood: {answered} of {FLOOD} answered in {flood_took:?} (at most {most}); \
         the other source: {other_replies} of {OTHER}"
    );
    if !(ECHO_BURST..=most).contains(&answered) {
        f.fail(&format!(
            "{answered} of {FLOOD} echo requests sent in {flood_took:?} were answered; \
             expected {ECHO_BURST} to {most} at {ECHO_RATE_PER_SEC}/s with a burst of {ECHO_BURST}"
        ));
    }
    assert_eq!(
        other_replies,
        usize::from(OTHER),
        "the second source lost echo replies while the first flooded"
    );
    // Every request was either answered or dropped by the rate limit.
    let passed = answered + u64::from(OTHER);
    expect_counter(edge, "edge", "icmp_echo", echoes, passed);
    expect_counter(
        edge,
        "edge",
        "icmp_rate_limited",
        limited,
        u64::from(FLOOD + OTHER) - passed,
    );
}

/// `getsockopt(IP_MTU)`: the path MTU the kernel uses for a connected socket.
fn path_mtu(socket: &UdpSocket) -> i32 {
    let mut mtu: i32 = 0;
    let mut len = u32::try_from(size_of::<i32>()).unwrap_or(0);
    // SAFETY: `mtu` and `len` are valid for writing and describe each other.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut mtu).cast(),
            &raw mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(IP_MTU): {}", io::Error::last_os_error());
    mtu
}

/// A UDP socket on the edge connected to the outsider, with path-MTU
/// discovery on (the DF bit set, errors lower the path MTU).
fn pmtu_socket(edge: &NetNs) -> UdpSocket {
    let socket = udp_socket(edge, any_v4());
    socket
        .connect(at(OUTSIDER_V4, SERVER_UDP))
        .unwrap_or_else(|e| panic!("connect: {e}"));
    let on: i32 = libc::IP_PMTUDISC_DO;
    // SAFETY: `on` is a valid int for the length passed.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const on).cast(),
            u32::try_from(size_of::<i32>()).unwrap_or(0),
        )
    };
    assert_eq!(rc, 0, "IP_MTU_DISCOVER: {}", io::Error::last_os_error());
    assert_eq!(
        path_mtu(&socket),
        LINK_MTU,
        "a fresh path has the link's MTU"
    );
    socket
}

/// "Fragmentation needed, next-hop MTU 1280" from the outsider to the
/// edge, quoting the first 28 bytes of a 1400-byte datagram of `socket`'s.
fn frag_needed(f: &Enforced, socket: &UdpSocket) -> Vec<u8> {
    let local = socket
        .local_addr()
        .unwrap_or_else(|e| panic!("local address: {e}"));
    let mut quoted = Ipv4::new(EDGE_V4, OUTSIDER_V4)
        .data(&[0u8; 1372])
        .packet(&Transport::Udp {
            src: local.port(),
            dst: SERVER_UDP,
        });
    quoted.truncate(28);
    let mut message = vec![DEST_UNREACHABLE, FRAG_NEEDED, 0, 0, 0, 0];
    message.extend_from_slice(&LOWER_MTU.to_be_bytes());
    message.extend_from_slice(&quoted);
    let sum = checksum(&[&message]);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    let outsider = f.lab.outsider();
    let eth = Ethernet {
        dst: mac(f.edge(), HOST_INTERFACE),
        src: mac(outsider, HOST_INTERFACE),
        tags: Vec::new(),
    };
    eth.ipv4(
        &Ipv4::new(OUTSIDER_V4, EDGE_V4),
        &Transport::Raw {
            protocol: zt_common::proto::ICMP,
            bytes: message,
        },
    )
}

#[test]
fn frag_needed_about_a_tracked_flow_lowers_the_path_mtu() {
    let f = start("flows-pmtu", "");
    let socket = pmtu_socket(f.edge());
    socket
        .send(b"a datagram opens the flow")
        .unwrap_or_else(|e| panic!("send: {e}"));
    let related = f.counter("icmp_related");
    send_frames(
        f.lab.outsider(),
        HOST_INTERFACE,
        &[frag_needed(&f, &socket)],
    );
    expect_counter(f.edge(), "edge", "icmp_related", related, 1);
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while path_mtu(&socket) != i32::from(LOWER_MTU) {
        if Instant::now() >= deadline {
            f.fail(&format!(
                "the path MTU stayed {} after a related fragmentation-needed",
                path_mtu(&socket)
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    // The socket learns of it: a datagram over the new MTU is refused.
    let big = vec![0u8; 1400];
    let refused = socket.send(&big).and_then(|_| socket.send(&big));
    assert!(
        refused.is_err(),
        "a 1400-byte datagram with DF went out over a 1280-byte path"
    );
}

#[test]
fn frag_needed_about_an_untracked_flow_changes_nothing() {
    let f = start("flows-pmtu-unrelated", "");
    // Connected, but nothing sent: no flow.
    let socket = pmtu_socket(f.edge());
    let unrelated = f.counter("icmp_unrelated");
    send_frames(
        f.lab.outsider(),
        HOST_INTERFACE,
        &[frag_needed(&f, &socket)],
    );
    expect_counter(f.edge(), "edge", "icmp_unrelated", unrelated, 1);
    assert_eq!(
        path_mtu(&socket),
        LINK_MTU,
        "an unrelated error changed the path MTU"
    );
    assert_eq!(f.counter("icmp_related"), 0, "nothing is related here");
}

#[test]
fn replies_stop_passing_after_the_flow_times_out() {
    let f = start("flows-timeout", "udp_timeout = 2");
    let (edge, outsider) = (f.edge(), f.lab.outsider());
    let server = udp_socket(outsider, at(Ipv4Addr::UNSPECIFIED, SERVER_UDP));
    let client = udp_socket(edge, any_v4());
    let from = exchange(
        &f,
        &client,
        &server,
        at(OUTSIDER_V4, SERVER_UDP),
        b"query",
        b"answer",
    );
    thread::sleep(Duration::from_secs(3));
    let dropped = f.counter("port_not_allowed");
    server
        .send_to(b"late answer", from)
        .unwrap_or_else(|e| panic!("late answer: {e}"));
    expect_counter(edge, "edge", "port_not_allowed", dropped, 1);
    expect_no_datagram(&client, "a reply 3 s after a 2 s udp timeout");
    // Asking again opens the flow again.
    exchange(
        &f,
        &client,
        &server,
        at(OUTSIDER_V4, SERVER_UDP),
        b"query again",
        b"answer again",
    );
}
