//! Tier 3, the edge (issue 2): the real `ztxdp up` enforcing on the lab's
//! edge (`zt_tests::lab`), judged by sockets opened in the bastion and
//! outsider namespaces, by `ztxdp status --json` counters and by the audit
//! file. Needs root. Each test builds its own lab and tears it down on drop,
//! also when it fails.

mod e2e;

use std::{
    net::{IpAddr, Ipv6Addr, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use e2e::{
    Daemon, Enforced, SETTLE_TIMEOUT, Scratch, assert_all_time_out, assert_connects,
    assert_times_out, at, attached, audit_lines, build_lab, counter, expect_audit, expect_counter,
    expect_no_datagram, has_xdp, is, listen, mac, patterned, run_with_stdout_closed, send_frames,
    status, udp_socket, ztxdp, ztxdp_cmd,
};
use serde_json::Value;
use zt_tests::{
    lab::{BASTION_V4, BASTION_V6, EDGE_V4, EDGE_V6, HOST_INTERFACE, OUTSIDER_V4, OUTSIDER_V6},
    packet::{Ethernet, Ipv4, Ipv6, Transport, ethertype},
};

const SSH: u16 = 22;
const POSTGRES: u16 = 5432;
const WIREGUARD: u16 = 51820;
/// Nothing listens here and the edge policy does not open it.
const CLOSED_UDP: u16 = 9;
/// ICMPv6 multicast listener query.
const MLD_QUERY: u8 = 130;

/// The lab's policy, with the audit file in `scratch`; `edge_lines` replaces
/// the `[edge]` table's body (lines 2-5), so errors have known lines.
fn config_text(scratch: &Scratch, edge_lines: &str) -> String {
    format!(
        "[edge]\n{edge_lines}\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n",
        scratch.path("audit.jsonl").display(),
        scratch.path("audit.state").display()
    )
}

/// Lines 2-5 of a valid config: the lab's own policy.
const EDGE_LINES: &str = "interface = \"eth0\"\n\
    wireguard_ports = [51820]\n\
    ssh_port = 22\n\
    ssh_allow = [\"10.77.0.2/32\", \"fd77::2/128\"]";

/// The lab with `ztxdp up` enforcing its policy on the edge.
fn start(tag: &str) -> Enforced {
    Enforced::start(tag, build_lab(), |_, scratch| {
        config_text(scratch, EDGE_LINES)
    })
}

#[test]
fn only_the_bastion_reaches_ssh_over_ipv4_and_ipv6() {
    let edge = start("ssh");
    let (bastion, outsider) = (edge.lab.bastion(), edge.lab.outsider());
    let _ssh = listen(edge.lab.edge(), SSH);
    let _postgres = listen(edge.lab.edge(), POSTGRES);

    let v4 = assert_connects(bastion, at(EDGE_V4, SSH), "bastion SSH over IPv4");
    let v6 = assert_connects(bastion, at(EDGE_V6, SSH), "bastion SSH over IPv6");
    assert_all_time_out(&[
        (outsider, at(EDGE_V4, SSH), "outsider SSH over IPv4"),
        (outsider, at(EDGE_V6, SSH), "outsider SSH over IPv6"),
        (
            outsider,
            at(EDGE_V4, POSTGRES),
            "outsider to 5432 over IPv4",
        ),
        (
            outsider,
            at(EDGE_V6, POSTGRES),
            "outsider to 5432 over IPv6",
        ),
        (
            bastion,
            at(EDGE_V4, POSTGRES),
            "bastion to a port other than SSH",
        ),
    ]);

    // One allow line per SYN, with the exact ports of the connection.
    for (stream, source) in [(&v4, IpAddr::V4(BASTION_V4)), (&v6, IpAddr::V6(BASTION_V6))] {
        let port = stream
            .local_addr()
            .unwrap_or_else(|e| panic!("local address: {e}"))
            .port();
        let line = expect_audit(
            &edge.audit(),
            &format!("the SSH allow from {source}"),
            |l| {
                is(l, "/event/action", &"allow".into())
                    && is(l, "/source/ip", &source.to_string().into())
                    && is(l, "/source/port", &port.into())
            },
        );
        assert!(is(&line, "/event/reason", &"ssh_allowed".into()), "{line}");
        assert!(
            is(&line, "/destination/port", &SSH.into()),
            "destination.port must be the number 22: {line}"
        );
        assert!(is(&line, "/network/transport", &"tcp".into()), "{line}");
    }
    for (source, port, reason) in [
        (IpAddr::V4(OUTSIDER_V4), SSH, "ssh_source_not_allowed"),
        (IpAddr::V6(OUTSIDER_V6), SSH, "ssh_source_not_allowed"),
        (IpAddr::V4(OUTSIDER_V4), POSTGRES, "port_not_allowed"),
        (IpAddr::V6(OUTSIDER_V6), POSTGRES, "port_not_allowed"),
        (IpAddr::V4(BASTION_V4), POSTGRES, "port_not_allowed"),
    ] {
        let line = expect_audit(
            &edge.audit(),
            &format!("{reason} for {source} to {port}"),
            |l| {
                is(l, "/event/action", &"deny".into())
                    && is(l, "/source/ip", &source.to_string().into())
                    && is(l, "/destination/port", &port.into())
            },
        );
        assert!(is(&line, "/event/reason", &reason.into()), "{line}");
        assert!(
            line.pointer("/source/port").is_some_and(Value::is_u64),
            "source.port must be a number: {line}"
        );
    }
    // Every kind of record (decision, summary, lost) names the interface.
    for line in audit_lines(&edge.audit()) {
        assert!(
            line.pointer("/@timestamp").is_some_and(Value::is_string),
            "no @timestamp: {line}"
        );
        assert!(
            is(
                &line,
                "/observer/ingress/interface/name",
                &HOST_INTERFACE.into()
            ),
            "wrong or missing observer.ingress.interface.name: {line}"
        );
    }
}

/// A socket on the edge's WireGuard port, and one on the outsider to send
/// to it from. A datagram has gone from the one to the other over each
/// family: that resolves the neighbours, so every datagram after it is sent
/// at once.
fn wireguard_and_sender(edge: &Enforced) -> (UdpSocket, UdpSocket) {
    let any = IpAddr::from([0u8; 16]);
    let wireguard = udp_socket(edge.lab.edge(), at(any, WIREGUARD));
    let sender = udp_socket(edge.lab.outsider(), at(any, 0));
    let mut buf = [0u8; 64];
    for target in [at(EDGE_V4, WIREGUARD), at(EDGE_V6, WIREGUARD)] {
        sender
            .send_to(b"warm-up", target)
            .unwrap_or_else(|e| panic!("send to {target}: {e}"));
        wireguard
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("the warm-up datagram to {target} did not arrive: {e}"));
    }
    (wireguard, sender)
}

#[test]
fn a_fragmented_datagram_passes_whole_or_not_at_all() {
    // Over the lab's 1500-byte link the sender's kernel splits this into
    // three fragments, and only the first carries the UDP header.
    const SIZE: usize = 3000;
    const LATER: u64 = 2;
    let edge = start("frag");
    let host = edge.lab.edge();
    let (wireguard, sender) = wireguard_and_sender(&edge);
    // Something listens on the closed port, so only the filter stops it.
    let closed = udp_socket(host, at(IpAddr::from([0u8; 16]), CLOSED_UDP));
    let mut buf = vec![0u8; 2 * SIZE];
    let big = patterned(SIZE);
    for target in [at(EDGE_V4, WIREGUARD), at(EDGE_V6, WIREGUARD)] {
        let before = status(host);
        sender
            .send_to(&big, target)
            .unwrap_or_else(|e| panic!("send to {target}: {e}"));
        let (n, _) = wireguard.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!("the {SIZE}-byte datagram to {target} did not arrive whole: {e}")
        });
        assert!(
            buf[..n] == big[..],
            "the datagram to {target} arrived changed ({n} bytes)"
        );
        expect_counter(
            host,
            "edge",
            "wireguard",
            counter(&before, "edge", "wireguard"),
            1,
        );
        expect_counter(
            host,
            "edge",
            "fragment_of_allowed",
            counter(&before, "edge", "fragment_of_allowed"),
            LATER,
        );
    }

    // Both datagrams are remembered, and `status` shows it.
    let remembered = &status(host)["edge"]["maps"]["fragments"];
    assert!(
        remembered.as_u64().is_some_and(|n| n >= 2),
        "the fragment table's fill level: {remembered}"
    );

    // To a closed port the first fragment drops, and the later ones with it.
    for target in [at(EDGE_V4, CLOSED_UDP), at(EDGE_V6, CLOSED_UDP)] {
        let before = status(host);
        sender
            .send_to(&big, target)
            .unwrap_or_else(|e| panic!("send to {target}: {e}"));
        expect_counter(
            host,
            "edge",
            "port_not_allowed",
            counter(&before, "edge", "port_not_allowed"),
            1,
        );
        expect_counter(
            host,
            "edge",
            "non_first_fragment",
            counter(&before, "edge", "non_first_fragment"),
            LATER,
        );
        expect_no_datagram(&closed, &format!("a fragmented datagram to {target}"));
    }
}

#[test]
fn udp_passes_only_to_wireguard_ports_and_counters_are_exact() {
    const SENT: u64 = 10;
    const CLOSED_SENT: u64 = 25;
    let edge = start("udp");
    let (wireguard, sender) = wireguard_and_sender(&edge);
    let mut buf = [0u8; 64];

    let before = status(edge.lab.edge());
    for i in 0..SENT {
        let target = if i % 2 == 0 {
            at(EDGE_V4, WIREGUARD)
        } else {
            at(EDGE_V6, WIREGUARD)
        };
        sender
            .send_to(&i.to_be_bytes(), target)
            .unwrap_or_else(|e| panic!("send to {target}: {e}"));
    }
    let mut received = Vec::new();
    for _ in 0..SENT {
        let (n, from) = wireguard.recv_from(&mut buf).unwrap_or_else(|e| {
            panic!(
                "datagram {} of {SENT} to 51820 did not arrive: {e}",
                received.len() + 1
            )
        });
        assert_eq!(n, 8, "datagram from {from} has the wrong size");
        received.push(u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()));
    }
    received.sort_unstable();
    assert_eq!(
        received,
        (0..SENT).collect::<Vec<_>>(),
        "datagrams to 51820 lost or changed"
    );
    expect_counter(
        edge.lab.edge(),
        "edge",
        "wireguard",
        counter(&before, "edge", "wireguard"),
        SENT,
    );

    let closed = counter(&status(edge.lab.edge()), "edge", "port_not_allowed");
    for _ in 0..CLOSED_SENT {
        sender
            .send_to(b"closed", at(EDGE_V4, CLOSED_UDP))
            .unwrap_or_else(|e| panic!("send: {e}"));
    }
    expect_counter(
        edge.lab.edge(),
        "edge",
        "port_not_allowed",
        closed,
        CLOSED_SENT,
    );
    expect_audit(&edge.audit(), "a deny of UDP to the closed port", |l| {
        is(l, "/event/reason", &"port_not_allowed".into())
            && is(l, "/network/transport", &"udp".into())
            && is(l, "/destination/port", &CLOSED_UDP.into())
            && is(l, "/source/ip", &OUTSIDER_V4.to_string().into())
    });

    let now = status(edge.lab.edge());
    let e = &now["edge"];
    assert_eq!(e["interface"], HOST_INTERFACE, "{now:#}");
    assert_eq!(
        e["mode"], "native",
        "a veth with GRO runs XDP natively: {now:#}"
    );
    assert!(e["program_id"].as_u64().is_some_and(|id| id > 0), "{now:#}");
    for (map, entries) in [
        ("service_ports", 1),
        ("service_sources_v4_32", 1),
        ("service_sources_v6", 1),
        ("udp_ports", 1),
    ] {
        assert_eq!(e["maps"][map], entries, "fill level of {map}: {now:#}");
        // Every structure's kernel memory, as the kernel accounts it.
        assert!(
            e["memory"][map].as_u64().is_some_and(|bytes| bytes > 0),
            "memory of {map}: {now:#}"
        );
    }
    assert!(now["tunnel"].is_null(), "no tunnel was configured: {now:#}");
}

#[test]
fn arp_and_neighbour_discovery_work_from_cold_caches() {
    let edge = start("arp");
    let bastion = edge.lab.bastion();
    let _ssh = listen(edge.lab.edge(), SSH);
    for ns in [edge.lab.edge(), bastion] {
        ns.ip(&["neigh", "flush", "all"])
            .unwrap_or_else(|e| panic!("flushing neighbours in {}: {e}", ns.name()));
    }
    let (arp, nd) = (edge.counter("arp"), edge.counter("neighbor_discovery"));
    assert_connects(
        bastion,
        at(EDGE_V4, SSH),
        "bastion SSH over IPv4 with cold ARP caches",
    );
    assert_connects(
        bastion,
        at(EDGE_V6, SSH),
        "bastion SSH over IPv6 with cold neighbour caches",
    );
    assert!(
        edge.counter("arp") > arp,
        "no ARP passed the edge, yet the connection needed it"
    );
    assert!(
        edge.counter("neighbor_discovery") > nd,
        "no neighbour discovery passed the edge, yet the connection needed it"
    );
}

#[test]
fn vlan_tagged_frames_are_judged_by_their_inner_header() {
    const EACH: u64 = 5;
    let edge = start("vlan");
    let outsider = edge.lab.outsider();
    let link = Ethernet {
        dst: mac(edge.lab.edge(), HOST_INTERFACE),
        src: mac(outsider, HOST_INTERFACE),
        tags: Vec::new(),
    };
    let vlan = link.clone().tag(ethertype::VLAN, 100);
    let qinq = link.tag(ethertype::QINQ, 200).tag(ethertype::VLAN, 100);
    // The outsider's veth sends all of them; only the inner headers differ.
    let cases = [
        (
            "ssh_allowed",
            vlan.ipv4(&Ipv4::new(BASTION_V4, EDGE_V4), &Transport::tcp_syn(SSH)),
        ),
        (
            "port_not_allowed",
            vlan.ipv4(
                &Ipv4::new(BASTION_V4, EDGE_V4),
                &Transport::tcp_syn(POSTGRES),
            ),
        ),
        (
            "ssh_source_not_allowed",
            qinq.ipv4(&Ipv4::new(OUTSIDER_V4, EDGE_V4), &Transport::tcp_syn(SSH)),
        ),
        (
            "wireguard",
            qinq.ipv6(&Ipv6::new(OUTSIDER_V6, EDGE_V6), &Transport::udp(WIREGUARD)),
        ),
    ];
    let before = status(edge.lab.edge());
    let frames: Vec<Vec<u8>> = cases
        .iter()
        .flat_map(|(_, frame)| {
            std::iter::repeat_n(frame.clone(), usize::try_from(EACH).unwrap_or_default())
        })
        .collect();
    send_frames(outsider, HOST_INTERFACE, &frames);
    for (reason, _) in &cases {
        expect_counter(
            edge.lab.edge(),
            "edge",
            reason,
            counter(&before, "edge", reason),
            EACH,
        );
    }
    for reason in ["malformed", "unsupported_l3"] {
        assert_eq!(
            edge.counter(reason),
            counter(&before, "edge", reason),
            "a tagged frame was counted as {reason}: the tags were not parsed"
        );
    }
}

/// MLD from a link-local router with hop limit 1 passes (RFC 4890 4.4.1),
/// or a switch that snoops MLD stops forwarding the host's solicited-node
/// group; the same query routed (hop limit 64) drops as before.
#[test]
fn mld_from_a_link_local_router_passes_and_routed_mld_drops() {
    const EACH: u64 = 3;
    let edge = start("mld");
    let outsider = edge.lab.outsider();
    let link = Ethernet {
        dst: mac(edge.lab.edge(), HOST_INTERFACE),
        src: mac(outsider, HOST_INTERFACE),
        tags: Vec::new(),
    };
    let router = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let query = |hop_limit| {
        link.ipv6(
            &Ipv6::new(router, all_nodes).hop_limit(hop_limit),
            &Transport::Icmp {
                kind: MLD_QUERY,
                code: 0,
            },
        )
    };
    let before = status(edge.lab.edge());
    let count = usize::try_from(EACH).unwrap_or_default();
    let mut frames = vec![query(1); count];
    frames.extend(vec![query(64); count]);
    send_frames(outsider, HOST_INTERFACE, &frames);
    // At least: the outsider's own kernel sends MLD reports of its groups
    // too (from its link-local address, hop limit 1), and they pass as well.
    for reason in ["mld", "protocol_not_allowed"] {
        let want = counter(&before, "edge", reason) + EACH;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while edge.counter(reason) < want && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        assert!(
            edge.counter(reason) >= want,
            "edge counter {reason}: expected at least {want}, got {}",
            edge.counter(reason)
        );
    }
}

#[test]
fn enforcement_survives_kill_9_and_takeover_until_down() {
    let mut edge = start("kill");
    let (bastion, outsider, host) = (edge.lab.bastion(), edge.lab.outsider(), edge.lab.edge());
    let _ssh = listen(host, SSH);
    assert_connects(bastion, at(EDGE_V4, SSH), "bastion before the kill");
    let first_id = status(host)["edge"]["program_id"].clone();

    edge.daemon.kill9();
    assert!(
        has_xdp(host, HOST_INTERFACE),
        "the XDP program went away with the daemon"
    );
    let after_kill = status(host);
    assert_eq!(
        after_kill["edge"]["program_id"], first_id,
        "status after the kill shows another program"
    );
    assert_all_time_out(&[
        (outsider, at(EDGE_V4, SSH), "outsider after kill -9"),
        (outsider, at(EDGE_V6, SSH), "outsider after kill -9"),
    ]);
    assert_connects(bastion, at(EDGE_V4, SSH), "bastion after kill -9");
    assert_connects(bastion, at(EDGE_V6, SSH), "bastion after kill -9");
    let dropped = counter(&status(host), "edge", "port_not_allowed");
    let sender = udp_socket(outsider, at(IpAddr::from([0u8; 4]), 0));
    for _ in 0..7 {
        sender
            .send_to(b"x", at(EDGE_V4, CLOSED_UDP))
            .unwrap_or_else(|e| panic!("send: {e}"));
    }
    expect_counter(host, "edge", "port_not_allowed", dropped, 7);

    // A new `up` replaces the orphaned program in place.
    let mut second = edge.up("daemon-2.log");
    let taken = status(host);
    assert_ne!(
        taken["edge"]["program_id"], first_id,
        "the second `up` did not replace the program"
    );
    assert_eq!(taken["edge"]["mode"], "native", "{taken:#}");
    assert_times_out(outsider, at(EDGE_V4, SSH), "outsider after the takeover");
    assert_connects(bastion, at(EDGE_V4, SSH), "bastion after the takeover");

    // A third `up` while the second runs: the second sees it was replaced and leaves.
    let mut third = edge.up("daemon-3.log");
    second.expect_replaced();
    assert!(
        has_xdp(host, HOST_INTERFACE),
        "the replaced daemon took the new program with it"
    );
    assert_times_out(
        outsider,
        at(EDGE_V4, SSH),
        "outsider after the second takeover",
    );

    let down = ztxdp(host, &["down"]);
    let said = String::from_utf8_lossy(&down.stdout);
    assert!(
        down.status.success(),
        "`ztxdp down` failed: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(
        said.contains(HOST_INTERFACE),
        "`down` did not say what it removed: {said}"
    );
    let left = third.wait_exit(Duration::from_secs(10));
    assert!(
        left.is_some(),
        "the daemon kept running after `down`; its log:\n{}",
        third.log()
    );
    let left = attached(host, HOST_INTERFACE);
    assert!(left.is_empty(), "still attached after `down`: {left:?}");
    let gone = ztxdp(host, &["status"]);
    assert_eq!(
        gone.status.code(),
        Some(1),
        "`status` with nothing attached must exit 1"
    );
    assert_connects(
        outsider,
        at(EDGE_V4, SSH),
        "outsider once enforcement is removed",
    );
    assert_eq!(
        ztxdp(host, &["down"]).status.code(),
        Some(0),
        "a second `down` has nothing to remove, which is no error"
    );
}

#[test]
fn a_keep_attached_stop_and_the_next_start_let_no_denied_packet_through() {
    // A datagram every millisecond, for at most this many: bounds the test
    // if the daemons hang.
    const MAX_SENT: u64 = 60_000;
    // Datagrams sent around each step, so the stream covers all of it.
    const MARGIN: u64 = 50;
    let mut edge = Enforced::start_with("keep", build_lab(), &["--keep-attached"], |_, s| {
        config_text(s, EDGE_LINES)
    });
    let (host, outsider) = (edge.lab.edge(), edge.lab.outsider());
    // Only the filter keeps datagrams from this socket on the closed port.
    let closed = udp_socket(host, at(IpAddr::from([0u8; 16]), CLOSED_UDP));
    let first_id = status(host)["edge"]["program_id"].clone();
    let sent = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let wait_for = |n: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while sent.load(Ordering::Relaxed) < n {
            assert!(
                Instant::now() < deadline,
                "the sender did not get to {n} datagrams ({what})"
            );
            thread::sleep(Duration::from_millis(5));
        }
    };
    let (after_stop, at_ready, still, second) = thread::scope(|s| {
        s.spawn(|| {
            let sender = udp_socket(outsider, at(IpAddr::from([0u8; 4]), 0));
            while !done.load(Ordering::Relaxed) && sent.load(Ordering::Relaxed) < MAX_SENT {
                sender
                    .send_to(b"denied", at(EDGE_V4, CLOSED_UDP))
                    .unwrap_or_else(|e| panic!("send: {e}"));
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_millis(1));
            }
        });
        wait_for(MARGIN, "before the stop");
        edge.daemon.terminate();
        let after_stop = sent.load(Ordering::Relaxed);
        let still = attached(host, HOST_INTERFACE);
        // Not `edge.up`: that borrows all of `edge`, whose daemon is borrowed here.
        let second = Daemon::start(host, &edge.config, &[], edge.scratch.path("daemon-2.log"));
        let at_ready = sent.load(Ordering::Relaxed);
        wait_for(at_ready + MARGIN, "after the start");
        done.store(true, Ordering::Relaxed);
        (after_stop, at_ready, still, second)
    });
    let total = sent.load(Ordering::Relaxed);
    // Datagrams in flight when the sender stopped have arrived by now.
    thread::sleep(Duration::from_millis(200));
    closed
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("nonblocking socket: {e}"));
    let mut buf = [0u8; 64];
    let delivered = std::iter::from_fn(|| closed.recv_from(&mut buf).ok()).count();
    assert_eq!(
        delivered, 0,
        "{delivered} of {total} denied datagrams reached the closed port during a \
         `--keep-attached` stop (after {after_stop}) and the next start (ready after {at_ready})"
    );
    assert!(
        still.iter().any(|line| line.contains("xdp")),
        "the edge program was not attached after a `--keep-attached` SIGTERM: {still:?}"
    );
    assert!(
        at_ready > after_stop,
        "no datagram was sent between the stop and the next start: this proved nothing"
    );
    let now = status(host);
    assert_ne!(
        now["edge"]["program_id"], first_id,
        "the next `up` did not replace the program: {now:#}"
    );
    assert!(
        counter(&now, "edge", "port_not_allowed") > 0,
        "the new program dropped none of the stream: {now:#}"
    );
    drop(second);
}

#[test]
fn commands_end_quietly_when_stdout_closes_and_down_is_idempotent() {
    let edge = start("pipe");
    let host = edge.edge();
    let config = edge.config.display().to_string();
    // `list` needs a tunnel; this config is only listed, never enforced.
    let tunnel = edge
        .scratch
        .write(
            "tunnel.toml",
            &format!(
                "[tunnel]\ninterface = \"{HOST_INTERFACE}\"\nruntime_grants = \"{}\"\n\n\
                 [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\"]\n\
                 allow = [\"tcp/5432\"]\n\n[audit]\npath = \"/dev/null\"\n",
                edge.scratch.path("grants.json").display()
            ),
        )
        .display()
        .to_string();
    let commands: [&[&str]; 6] = [
        &["status"],
        &["status", "--json"],
        &["check", "--config", &config],
        &["list", "--config", &tunnel],
        &["export", "nft", "--config", &config],
        // Last: it removes what `status` shows.
        &["down"],
    ];
    for args in commands {
        let out = run_with_stdout_closed(&mut ztxdp_cmd(host, args));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(0) && !stderr.contains("Broken pipe"),
            "`ztxdp {}` with its stdout closed (as in `| head -0`) must end quietly \
             with status 0, not {}:\n{stderr}",
            args.join(" "),
            out.status
        );
    }
    let left = attached(host, HOST_INTERFACE);
    assert!(left.is_empty(), "still attached after `down`: {left:?}");

    // Nothing is attached now: `down` has nothing to do, which is no error.
    let again = ztxdp(host, &["down"]);
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && said.contains("nothing"),
        "`down` with nothing attached must exit 0 and say so ({}): {said}{}",
        again.status,
        String::from_utf8_lossy(&again.stderr)
    );
}

#[test]
fn bad_config_is_refused_with_key_and_line_and_nothing_attached() {
    let scratch = Scratch::new("badcfg");
    let lab = build_lab();
    let cases = [
        (
            "unknown key",
            EDGE_LINES.replace("ssh_port = 22", "ssh_port = 22\nbogus = 1"),
            5,
            "edge.bogus",
        ),
        (
            "bad CIDR",
            EDGE_LINES.replace("\"fd77::2/128\"", "\"10.77.0.0/33\""),
            5,
            "edge.ssh_allow[1]",
        ),
        (
            "port 0",
            EDGE_LINES.replace("[51820]", "[0]"),
            3,
            "edge.wireguard_ports[0]",
        ),
        (
            "port 70000",
            EDGE_LINES.replace("ssh_port = 22", "ssh_port = 70000"),
            4,
            "edge.ssh_port",
        ),
        (
            "missing interface",
            EDGE_LINES.replace("\"eth0\"", "\"eth9\""),
            2,
            "edge.interface",
        ),
    ];
    for (what, lines, line, key) in cases {
        let config = scratch.write("bad.toml", &config_text(&scratch, &lines));
        let out = ztxdp(
            lab.edge(),
            &["up", "--config", &config.display().to_string()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{what}: exit code; stderr:\n{stderr}"
        );
        let located = format!("{}:{line}: {key}", config.display());
        assert!(
            stderr.contains(&located),
            "{what}: stderr does not name `{located}`:\n{stderr}"
        );
        let left = attached(lab.edge(), HOST_INTERFACE);
        assert!(
            left.is_empty(),
            "{what}: attached despite the bad config: {left:?}"
        );
        assert!(
            !scratch.path("audit.jsonl").exists(),
            "{what}: the audit file was created"
        );
        assert_eq!(
            ztxdp(lab.edge(), &["status"]).status.code(),
            Some(1),
            "{what}: something is attached"
        );
    }
}

#[test]
fn lockout_protection_refuses_unless_allowed() {
    let scratch = Scratch::new("lockout");
    let lab = build_lab();
    let config = scratch.write("ztxdp.toml", &config_text(&scratch, EDGE_LINES));
    let up = |ssh_client: &str, extra: &[&str]| {
        let mut command = ztxdp_cmd(
            lab.edge(),
            &["up", "--config", &config.display().to_string()],
        );
        command
            .args(extra)
            .env("SSH_CONNECTION", format!("{ssh_client} 50022 10.77.0.1 22"));
        command
    };

    let refused = e2e::run_bounded(&mut up("192.0.2.77", &[]));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "an SSH session outside ssh_allow must be refused:\n{stderr}"
    );
    assert!(
        stderr.contains("192.0.2.77") && stderr.contains("--allow-lockout"),
        "the refusal must name the client and the way out:\n{stderr}"
    );
    let left = attached(lab.edge(), HOST_INTERFACE);
    assert!(left.is_empty(), "attached despite the refusal: {left:?}");

    let mut forced = Daemon::spawn(
        up("192.0.2.77", &["--allow-lockout"]),
        scratch.path("forced.log"),
    );
    assert!(
        has_xdp(lab.edge(), HOST_INTERFACE),
        "--allow-lockout did not attach"
    );
    forced.terminate();
    let left = attached(lab.edge(), HOST_INTERFACE);
    assert!(left.is_empty(), "SIGTERM left these attached: {left:?}");

    // The bastion's own session is in ssh_allow: no flag needed.
    let _fine = Daemon::spawn(
        up(&BASTION_V4.to_string(), &[]),
        scratch.path("bastion.log"),
    );
    assert!(
        has_xdp(lab.edge(), HOST_INTERFACE),
        "`up` from an allowed SSH session did not attach"
    );
}

/// A stop that comes the moment `up` says it is ready (a service manager's
/// stop right after `READY=1`), while the new daemon still waits for the
/// one it replaced to hand over the trail: the new daemon exits 0 and
/// detaches its programs; it is not killed by the signal half way.
#[test]
fn a_stop_right_after_ready_exits_cleanly_while_taking_over() {
    let mut t = start("stop-at-ready");
    let mut old = t.restart("daemon-2.log");
    t.daemon.terminate();
    old.expect_replaced();
    let left = attached(t.edge(), HOST_INTERFACE);
    assert!(left.is_empty(), "SIGTERM left these attached: {left:?}");
}
