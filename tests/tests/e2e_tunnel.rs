//! Tier 3, the tunnel (issue 3): the real `ztxdp up` on real wireguard-go
//! tunnels: the lab's tunnel (`zt_tests::lab::Lab::create_with_tunnel`),
//! whose edge runs wireguard-go plus both programs (XDP on its eth0, the
//! tunnel classifier on its `WireGuard` device), with the app peers `app-1`
//! (reaching the edge over IPv4) and `app-2` (over IPv6), each with its own
//! wireguard-go device:
//!
//! ```text
//!   app-1  10.100.0.1  fd00:100::1  ─┐  WireGuard over the lab's link
//!   app-2  10.100.0.2  fd00:100::2   ├─ (UDP 51820 to 10.77.0.1 and fd77::1)
//!   edge   10.100.0.254 fd00:100::fe ┘
//! ```
//!
//! Needs root, wireguard-go and wireguard-tools. Each test builds its own
//! namespaces and devices and removes them on drop, also when it fails.

mod e2e;

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use e2e::{
    CONNECT_TIMEOUT, Daemon, Enforced, Scratch, accept, assert_all_time_out, assert_connects,
    assert_times_out, at, attached, build_lab, counter, events_follower, expect_audit,
    expect_counter, expect_no_datagram, is, listen,
    mesh::{
        app, app_ns, expect_peer_line, grant, listed, mesh, mesh_config, peer_list, rewrite_config,
        tunnel,
    },
    status, udp_socket, verify_audit, ztxdp, ztxdp_ok,
};
use serde_json::Value;
use zt_tests::{
    lab::{
        APP_1_TUNNEL_V4, APP_1_TUNNEL_V6, APP_2_TUNNEL_V4, EDGE_TUNNEL_V4, EDGE_TUNNEL_V6, EDGE_V4,
        EDGE_V6, HOST_INTERFACE,
    },
    netns::NetNs,
    packet::{Ipv6, Transport},
    wg::{KeyPair, LISTEN_PORT, WgDevice},
};
use ztxdp::{config::Config, grants::RuntimeGrants};

const SSH: u16 = 22;
const POSTGRES: u16 = 5432;

/// After traffic of both peers: the edge program passed `WireGuard` and
/// dropped the outer-address SYN; the tunnel program counted both peers.
fn check_counters(mesh: &Enforced, before: &Value, after: &Value) {
    assert!(
        counter(after, "edge", "wireguard") > counter(before, "edge", "wireguard"),
        "no WireGuard packet passed the edge program, yet the tunnel works: {after:#}"
    );
    assert!(
        counter(after, "edge", "port_not_allowed") > counter(before, "edge", "port_not_allowed"),
        "the SYN to the outer address was not dropped by the edge program: {after:#}"
    );
    assert_eq!(
        after["tunnel"]["interface"],
        tunnel(&mesh.lab).edge_device().name(),
        "{after:#}"
    );
    let peers = after["tunnel"]["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no tunnel peers in status: {after:#}"));
    for (index, name) in [(0, "app-1"), (1, "app-2")] {
        let peer = peers
            .iter()
            .find(|p| p["index"] == index)
            .unwrap_or_else(|| panic!("peer {index} missing from status: {after:#}"));
        for field in ["allowed", "denied"] {
            assert!(
                peer[field].as_u64().is_some_and(|n| n > 0),
                "{name} has no {field} packets: {after:#}"
            );
        }
    }
}

#[test]
fn tunnel_traffic_passes_a_path_that_fragments_wireguard_packets() {
    // A 1420-byte tunnel packet makes a WireGuard packet of up to 1500
    // bytes. On a path with a smaller MTU (PPPoE, a tunnel in a tunnel)
    // the peer's kernel fragments it, and only the first fragment carries
    // the UDP port the edge allows. Here app-1's route to the edge has an
    // MTU of 1280, so every full-size tunnel packet arrives in two parts.
    const BYTES: usize = 256 * 1024;
    let mesh = mesh("frags");
    let app1 = app_ns(&mesh, "app-1");
    let route = EDGE_V4.to_string();
    app1.run(&[
        "ip",
        "route",
        "replace",
        &route,
        "dev",
        HOST_INTERFACE,
        "mtu",
        "1280",
    ])
    .unwrap_or_else(|e| panic!("lowering app-1's path MTU to the edge: {e:?}"));
    let listener = listen(mesh.edge(), POSTGRES);
    let before = counter(&status(mesh.edge()), "edge", "fragment_of_allowed");
    let received = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut server = accept(&listener, CONNECT_TIMEOUT);
            server
                .set_read_timeout(Some(CONNECT_TIMEOUT))
                .unwrap_or_else(|e| panic!("read timeout: {e}"));
            let mut got = Vec::new();
            let read = server.read_to_end(&mut got);
            (got, read)
        });
        let mut client = assert_connects(
            app1,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-1 over a path that fragments",
        );
        // Bounded: lost packets would otherwise leave the write blocked.
        client
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .unwrap_or_else(|e| panic!("write timeout: {e}"));
        client.write_all(&vec![0x5a; BYTES]).unwrap_or_else(|e| {
            panic!("app-1 could not send {BYTES} bytes through the tunnel: {e}")
        });
        client
            .shutdown(std::net::Shutdown::Write)
            .unwrap_or_else(|e| panic!("app-1 closing: {e}"));
        reader
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    let (got, read) = received;
    assert!(
        read.is_ok() && got.len() == BYTES && got.iter().all(|&b| b == 0x5a),
        "the edge received {} of {BYTES} bytes ({read:?}): full-size tunnel packets were lost",
        got.len()
    );
    let after = counter(&status(mesh.edge()), "edge", "fragment_of_allowed");
    assert!(
        after > before,
        "no later fragment passed, so the path did not fragment and this proved nothing"
    );
}

#[test]
fn peers_reach_only_their_granted_ports_through_wireguard() {
    let mesh = mesh("grants");
    let (app1, app2) = (app_ns(&mesh, "app-1"), app_ns(&mesh, "app-2"));
    let _postgres = listen(mesh.edge(), POSTGRES);
    let _ssh = listen(mesh.edge(), SSH);
    let before = status(mesh.edge());

    assert_connects(
        app1,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 to its granted port",
    );
    assert_connects(
        app1,
        at(EDGE_TUNNEL_V6, POSTGRES),
        "app-1 to its granted port over IPv6",
    );
    assert_all_time_out(&[
        (app1, at(EDGE_TUNNEL_V4, SSH), "app-1 to 22, not granted"),
        (
            app1,
            at(EDGE_TUNNEL_V6, SSH),
            "app-1 to 22 over IPv6, not granted",
        ),
        (app2, at(EDGE_TUNNEL_V4, POSTGRES), "app-2 before `allow`"),
    ]);
    // The SYN did cross the tunnel: the tunnel program dropped it, naming app-2.
    expect_peer_line(
        &mesh,
        "app-2",
        "not_granted",
        IpAddr::V4(APP_2_TUNNEL_V4),
        POSTGRES,
    );

    let said = grant(&mesh, "allow", "app-2", "5432");
    assert!(
        said.contains("in effect now"),
        "`allow` did not reach the running program: {said}"
    );
    assert_connects(
        app2,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after `allow app-2 5432`",
    );
    let list = peer_list(&mesh);
    for (peer, field) in [("app-2", "grants"), ("app-2", "added"), ("app-1", "grants")] {
        let got = &listed(&list, peer)[field];
        assert_eq!(
            *got,
            serde_json::json!(["tcp/5432"]),
            "{peer} {field}: {list:#}"
        );
    }

    // The edge filter let the handshake and the tunnel traffic in, and
    // nothing else: the same port on the outer address stays closed.
    assert_times_out(
        app1,
        at(EDGE_V4, POSTGRES),
        "app-1 to 5432 on the outer address",
    );
    check_counters(&mesh, &before, &status(mesh.edge()));

    for (peer, reason, source, port) in [
        ("app-1", "granted", IpAddr::V4(APP_1_TUNNEL_V4), POSTGRES),
        ("app-1", "granted", IpAddr::V6(APP_1_TUNNEL_V6), POSTGRES),
        ("app-1", "not_granted", IpAddr::V4(APP_1_TUNNEL_V4), SSH),
        ("app-1", "not_granted", IpAddr::V6(APP_1_TUNNEL_V6), SSH),
        ("app-2", "granted", IpAddr::V4(APP_2_TUNNEL_V4), POSTGRES),
    ] {
        expect_peer_line(&mesh, peer, reason, source, port);
    }
}

/// Reads from `stream` until `want` bytes arrived or `timeout` passed.
fn read_within(stream: &mut TcpStream, want: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} of {want} bytes", got.len()),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // A signal cut the wait short (seen once in CI): wait out the
            // rest, as `read_exact` does, so that the outcome is about the
            // filter and not about the signal.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[test]
fn revoke_cuts_an_open_connection_at_once() {
    let mesh = mesh("revoke");
    let listener = listen(mesh.edge(), POSTGRES);
    let mut client = assert_connects(
        app_ns(&mesh, "app-1"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 to its granted port",
    );
    let mut server = accept(&listener, e2e::CONNECT_TIMEOUT);
    client
        .write_all(b"before")
        .unwrap_or_else(|e| panic!("client write: {e}"));
    let got = read_within(&mut server, 6, e2e::CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("server read: {e}"));
    assert_eq!(got, b"before");

    let denied = counter(&status(mesh.edge()), "tunnel", "not_granted");
    grant(&mesh, "revoke", "app-1", "5432");
    client
        .write_all(b"after")
        .unwrap_or_else(|e| panic!("client write: {e}"));
    match read_within(&mut server, 5, Duration::from_secs(3)) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) => {}
        other => panic!("the server still received data after `revoke app-1 5432`: {other:?}"),
    }
    assert!(
        counter(&status(mesh.edge()), "tunnel", "not_granted") > denied,
        "the revoked connection's segments were not counted as not_granted"
    );
    // The connection itself is intact: granting again lets TCP's
    // retransmission through, so only the filter had stopped it.
    grant(&mesh, "allow", "app-1", "5432");
    let got = read_within(&mut server, 5, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("data did not resume after granting again: {e}"));
    assert_eq!(got, b"after");
}

/// A UDP service the host answered through a grant closes at `revoke`: the
/// peer's datagrams on the same four-tuple no longer arrive, whether the
/// server answered before the revoke or goes on answering after it.
#[test]
fn revoke_closes_a_udp_service_that_answered_the_peer() {
    const SERVICE: u16 = 9999;
    let mesh = mesh("udp-revoke");
    grant(&mesh, "allow", "app-1", "9999/udp");
    let server = udp_socket(mesh.edge(), at(EDGE_TUNNEL_V4, SERVICE));
    let client = udp_socket(app_ns(&mesh, "app-1"), at(APP_1_TUNNEL_V4, 0));
    let service = at(EDGE_TUNNEL_V4, SERVICE);
    let mut buf = [0u8; 64];
    // The first datagram starts the WireGuard handshake; a lost one is sent again.
    let peer = (0..5)
        .find_map(|_| {
            client
                .send_to(b"hello", service)
                .unwrap_or_else(|e| panic!("client send: {e}"));
            server.recv_from(&mut buf).ok().map(|(_, from)| from)
        })
        .unwrap_or_else(|| panic!("app-1's datagrams to its granted udp/9999 never arrived"));
    for round in 0..3u8 {
        server
            .send_to(&[round], peer)
            .unwrap_or_else(|e| panic!("server answer: {e}"));
        let (n, _) = client
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("app-1 got no answer {round}: {e}"));
        assert_eq!(&buf[..n], &[round]);
        client
            .send_to(&[round], service)
            .unwrap_or_else(|e| panic!("client send: {e}"));
        let (n, _) = server
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {round} of the exchange lost: {e}"));
        assert_eq!(&buf[..n], &[round]);
    }
    let denied = counter(&status(mesh.edge()), "tunnel", "not_granted");
    grant(&mesh, "revoke", "app-1", "9999/udp");
    client
        .send_to(b"after", service)
        .unwrap_or_else(|e| panic!("client send: {e}"));
    expect_no_datagram(&server, "app-1's datagram after `revoke app-1 9999/udp`");
    // The server goes on answering: that reopens nothing either.
    server
        .send_to(b"still here", peer)
        .unwrap_or_else(|e| panic!("server answer: {e}"));
    client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("the host's answer after the revoke was not sent: {e}"));
    client
        .send_to(b"again", service)
        .unwrap_or_else(|e| panic!("client send: {e}"));
    expect_no_datagram(&server, "app-1's datagram after the host answered again");
    assert!(
        counter(&status(mesh.edge()), "tunnel", "not_granted") >= denied + 2,
        "the revoked datagrams were not counted as not_granted"
    );
}

/// A TUN device in `ns`, as wireguard-go makes one: packets written to the
/// returned file arrive on the device as received from the tunnel.
fn tun_device(ns: &NetNs, name: &str) -> File {
    /// `TUNSETIFF`, `IFF_TUN` and `IFF_NO_PI` from `<linux/if_tun.h>`.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TUN: u16 = 0x0001;
    const IFF_NO_PI: u16 = 0x1000;
    let tun = ns
        .enter(|| {
            let tun = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            // struct ifreq: the name, then the flags (a short).
            let mut ifreq = [0u8; 40];
            ifreq[..name.len()].copy_from_slice(name.as_bytes());
            ifreq[16..18].copy_from_slice(&(IFF_TUN | IFF_NO_PI).to_ne_bytes());
            // SAFETY: TUNSETIFF reads and writes a struct ifreq, which
            // `ifreq` is large enough to hold.
            if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(tun)
        })
        .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()))
        .unwrap_or_else(|e| panic!("creating TUN device {name} in {}: {e}", ns.name()));
    ns.ip(&["link", "set", name, "up"])
        .unwrap_or_else(|e| panic!("{name} up: {e:?}"));
    tun
}

/// A router advertisement from `fe80::9` to all nodes, announcing the
/// on-link, autonomous prefix `prefix`/64.
fn router_advertisement(prefix: Ipv6Addr) -> Vec<u8> {
    const ROUTER_ADVERTISEMENT: u8 = 134;
    const PREFIX_INFORMATION: u8 = 3;
    // Reachable time and retransmission timer (0: unspecified), then the
    // prefix information option: 4 units of 8 bytes, /64, on-link and
    // autonomous, valid a day, preferred 4 hours.
    let mut rest = vec![0u8; 8];
    rest.extend_from_slice(&[PREFIX_INFORMATION, 4, 64, 0xc0]);
    rest.extend_from_slice(&86_400u32.to_be_bytes());
    rest.extend_from_slice(&14_400u32.to_be_bytes());
    rest.extend_from_slice(&[0; 4]);
    rest.extend_from_slice(&prefix.octets());
    Ipv6::new(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9),
        Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
    )
    .hop_limit(255)
    .data(&rest)
    .packet(&Transport::Icmp {
        kind: ROUTER_ADVERTISEMENT,
        code: 0,
    })
}

/// Whether `ns` has a route to `prefix`/64 through `device`.
fn has_route(ns: &NetNs, prefix: &str, device: &str) -> bool {
    ns.ip(&["-6", "route", "show", "dev", device])
        .unwrap_or_else(|e| panic!("ip -6 route: {e:?}"))
        .lines()
        .any(|l| l.starts_with(&format!("{prefix}/64")))
}

/// On a TUN device, a router advertisement from an address of no peer was
/// taken before the peer check: it installed a default route and a prefix.
/// With ztxdp attached it drops as `router_message` and installs nothing.
#[test]
fn a_router_advertisement_from_no_peer_installs_nothing_on_a_tun_device() {
    const DEVICE: &str = "ztun0";
    let ns = NetNs::new("ra").unwrap_or_else(|e| panic!("namespace: {e:?}"));
    let mut tun = tun_device(&ns, DEVICE);
    ns.ip(&["-6", "addr", "add", "fd00:100::fe/64", "dev", DEVICE])
        .unwrap_or_else(|e| panic!("address: {e:?}"));
    // Unfiltered, the device takes the advertisement: the test can tell.
    tun.write_all(&router_advertisement(
        "2001:db8:a::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
    ))
    .unwrap_or_else(|e| panic!("writing to the TUN device: {e}"));
    let deadline = Instant::now() + e2e::SETTLE_TIMEOUT;
    while !has_route(&ns, "2001:db8:a::", DEVICE) {
        assert!(
            Instant::now() < deadline,
            "the unfiltered device never took the advertisement: the test proves nothing"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let scratch = Scratch::new("ra");
    let config = scratch.write(
        "ztxdp.toml",
        &format!(
            "[tunnel]
             interface = \"{DEVICE}\"
             runtime_grants = \"{}\"
             [[tunnel.peer]]
             name = \"app-1\"
             addresses = [\"fd00:100::1/128\"]
             allow = [\"tcp/5432\"]
             [audit]
             path = \"{}\"
             state = \"{}\"
",
            scratch.path("grants.json").display(),
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display(),
        ),
    );
    let _daemon = Daemon::start(&ns, &config, &[], scratch.path("up.log"));
    tun.write_all(&router_advertisement(
        "2001:db8:b::".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
    ))
    .unwrap_or_else(|e| panic!("writing to the TUN device: {e}"));
    expect_counter(&ns, "tunnel", "router_message", 0, 1);
    assert!(
        !has_route(&ns, "2001:db8:b::", DEVICE),
        "the advertisement from fe80::9 installed its prefix through ztxdp"
    );
}

#[test]
fn runtime_grants_survive_a_restart() {
    let mut mesh = mesh("restart");
    let _postgres = listen(mesh.edge(), POSTGRES);
    let _ssh = listen(mesh.edge(), SSH);
    grant(&mesh, "allow", "app-2", "5432");
    assert_connects(
        app_ns(&mesh, "app-2"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after `allow`",
    );
    let first_id = status(mesh.edge())["tunnel"]["program_id"].clone();

    mesh.daemon.kill9();
    // A new `up` loads a new program with maps filled from scratch: the
    // grant can only come from the runtime grants file.
    mesh.restart("daemon-2.log");
    let now = status(mesh.edge());
    assert_ne!(
        now["tunnel"]["program_id"], first_id,
        "the tunnel program was not replaced: {now:#}"
    );
    assert_connects(
        app_ns(&mesh, "app-2"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after the restart",
    );
    assert_times_out(
        app_ns(&mesh, "app-1"),
        at(EDGE_TUNNEL_V4, SSH),
        "app-1 to 22 after the restart",
    );
    let list = peer_list(&mesh);
    assert_eq!(
        listed(&list, "app-2")["grants"],
        serde_json::json!(["tcp/5432"]),
        "{list:#}"
    );

    // `down` removes both programs; the grants stay saved for the next `up`.
    ztxdp_ok(mesh.edge(), &["down"]);
    let left = mesh.daemon.wait_exit(Duration::from_secs(10));
    assert!(
        left.is_some(),
        "the daemon kept running after `down`:\n{}",
        mesh.daemon.log()
    );
    for interface in [HOST_INTERFACE, tunnel(&mesh.lab).edge_device().name()] {
        let left = attached(mesh.edge(), interface);
        assert!(
            left.is_empty(),
            "still attached to {interface} after `down`: {left:?}"
        );
    }
    assert_eq!(
        listed(&peer_list(&mesh), "app-2")["added"],
        serde_json::json!(["tcp/5432"])
    );
}

/// `app-2`'s effective grants as the runtime grants file makes them, read
/// by the library (not by the binary under test).
fn file_grants(mesh: &Enforced) -> Vec<String> {
    let config = Config::load(&mesh.config).unwrap_or_else(|e| panic!("{e}"));
    let tunnel = config
        .policy
        .tunnel
        .unwrap_or_else(|| panic!("{} has no tunnel", mesh.config.display()));
    let runtime = RuntimeGrants::load(&tunnel.runtime_grants).unwrap_or_else(|e| panic!("{e}"));
    let merged = runtime.apply(&tunnel);
    let peer = merged
        .peers
        .iter()
        .find(|p| p.name == "app-2")
        .unwrap_or_else(|| panic!("no app-2 in {}", mesh.config.display()));
    peer.grants.iter().map(ToString::to_string).collect()
}

#[test]
fn parallel_grant_changes_all_take_effect_in_the_file_and_the_kernel() {
    // 25 allows and 25 revokes for one peer at once: each reads the whole
    // file, changes it and writes it back, then updates the kernel map.
    // Unserialized, a later write undid earlier ones: all 50 printed
    // success, the file kept a few of the changes and the kernel others.
    const ALLOWED: std::ops::RangeInclusive<u16> = 8000..=8024;
    const REVOKED: std::ops::RangeInclusive<u16> = 7000..=7024;
    let mesh = mesh("parallel");
    let app2 = app_ns(&mesh, "app-2");
    let _listeners: Vec<_> = ALLOWED
        .chain(REVOKED)
        .map(|port| listen(mesh.edge(), port))
        .collect();
    grant(&mesh, "allow", "app-2", "7000-7024");
    let config = mesh.config.display().to_string();
    let changes: Vec<(&str, String)> = ALLOWED
        .map(|p| ("allow", p.to_string()))
        .chain(REVOKED.map(|p| ("revoke", p.to_string())))
        .collect();
    let outputs = std::thread::scope(|s| {
        let running: Vec<_> = changes
            .iter()
            .map(|(action, port)| {
                let args = [*action, "app-2", port.as_str(), "--config", config.as_str()];
                let edge = mesh.edge();
                s.spawn(move || ztxdp(edge, &args))
            })
            .collect();
        running
            .into_iter()
            .map(|r| r.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect::<Vec<_>>()
    });
    for ((action, port), out) in changes.iter().zip(&outputs) {
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("in effect now"),
            "`{action} app-2 {port}` ({}): {said}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let want = vec![format!("tcp/{}-{}", ALLOWED.start(), ALLOWED.end())];
    assert_eq!(
        file_grants(&mesh),
        want,
        "the runtime grants file lost changes that were reported in effect"
    );
    let list = peer_list(&mesh);
    assert_eq!(
        listed(&list, "app-2")["grants"],
        serde_json::json!(want),
        "{list:#}"
    );
    for port in ALLOWED {
        assert_connects(
            app2,
            at(EDGE_TUNNEL_V4, port),
            &format!("app-2 to {port}, allowed in parallel"),
        );
    }
    let whats: Vec<String> = REVOKED
        .map(|port| format!("app-2 to {port}, revoked in parallel"))
        .collect();
    let cases: Vec<_> = REVOKED
        .zip(&whats)
        .map(|(port, what)| (app2, at(EDGE_TUNNEL_V4, port), what.as_str()))
        .collect();
    assert_all_time_out(&cases);
}

#[test]
fn a_revoke_during_a_replacing_up_is_in_force_after_it() {
    // The new `up` reads the grants file, then loads and fills its programs
    // for a while before it swaps them in. A revoke in that time, without
    // a lock, reaches the file and the old program, and the new one comes
    // up with the grant. The delays put the revoke at different points of
    // the start.
    let mut mesh = mesh("uprace");
    let config = mesh.config.display().to_string();
    for (round, delay_ms) in [0u16, 20, 50, 100, 200].into_iter().enumerate() {
        let port = 9000 + delay_ms;
        let _listener = listen(mesh.edge(), port);
        grant(&mesh, "allow", "app-2", &port.to_string());
        let mut revoke = e2e::ztxdp_cmd(
            mesh.edge(),
            &["revoke", "app-2", &port.to_string(), "--config", &config],
        );
        let (old, out) = std::thread::scope(|s| {
            let revoking = s.spawn(move || {
                std::thread::sleep(Duration::from_millis(delay_ms.into()));
                e2e::run_bounded(&mut revoke)
            });
            let old = mesh.restart(&format!("daemon-{}.log", round + 2));
            let out = revoking
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (old, out)
        });
        let mut old = old;
        old.expect_replaced();
        assert!(
            out.status.success(),
            "`revoke app-2 {port}` {delay_ms} ms into an `up` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !file_grants(&mesh).contains(&format!("tcp/{port}")),
            "the revoke {delay_ms} ms into an `up` is not in the file"
        );
        assert_times_out(
            app_ns(&mesh, "app-2"),
            at(EDGE_TUNNEL_V4, port),
            &format!("app-2 to {port}, revoked {delay_ms} ms after a new `up` started"),
        );
    }
}

/// The `/ztxdp/seq` of an audit line.
fn seq(line: &Value) -> u64 {
    line.pointer("/ztxdp/seq")
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("audit line without /ztxdp/seq: {line}"))
}

#[test]
fn sighup_reloads_the_config_in_place_and_the_trail_goes_on() {
    let mut mesh = mesh("sighup");
    // Borrowed from the lab alone: the daemon is borrowed mutably below.
    let tunnel = tunnel(&mesh.lab);
    let (app1, app2) = (app(tunnel, "app-1").ns(), app(tunnel, "app-2").ns());
    let _postgres = listen(mesh.edge(), POSTGRES);
    let _ssh = listen(mesh.edge(), SSH);
    let program = status(mesh.edge())["tunnel"]["program_id"].clone();
    assert_times_out(
        app2,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 before the reload",
    );
    let denied = expect_audit(&mesh.audit(), "app-2's SYN to 5432 denied", |l| {
        is(l, "/event/reason", &"not_granted".into())
            && is(l, "/source/ip", &APP_2_TUNNEL_V4.to_string().into())
    });

    // app-2 is granted 5432 and listed first: both peers change index.
    rewrite_config(
        &mesh,
        &[
            ("app-2", "allow = [\"tcp/5432\"]"),
            ("app-1", "allow = [\"tcp/5432\"]"),
        ],
        "",
    );
    mesh.daemon.hangup();
    mesh.daemon.expect_log("policy reloaded");
    mesh.daemon.expect_running("SIGHUP");

    assert_connects(app2, at(EDGE_TUNNEL_V4, POSTGRES), "app-2 after the reload");
    assert_connects(
        app1,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1, now listed second",
    );
    assert_times_out(
        app1,
        at(EDGE_TUNNEL_V4, SSH),
        "app-1 to 22, granted to nobody",
    );
    let now = status(mesh.edge());
    assert_eq!(
        now["tunnel"]["program_id"], program,
        "the reload replaced the tunnel program instead of its maps' contents: {now:#}"
    );
    mesh.daemon.expect_running("the traffic after SIGHUP");

    // The same trail goes on: the pass is named with app-2's new index,
    // comes after the deny, and the sequence has no gap.
    expect_peer_line(
        &mesh,
        "app-2",
        "granted",
        IpAddr::V4(APP_2_TUNNEL_V4),
        POSTGRES,
    );
    expect_peer_line(
        &mesh,
        "app-1",
        "granted",
        IpAddr::V4(APP_1_TUNNEL_V4),
        POSTGRES,
    );
    let granted = expect_audit(&mesh.audit(), "app-2's connection to 5432", |l| {
        is(l, "/event/reason", &"granted".into())
            && is(l, "/source/ip", &APP_2_TUNNEL_V4.to_string().into())
    });
    assert!(
        seq(&granted) > seq(&denied),
        "the pass after the reload ({granted}) is not later in the trail than the deny \
         before it ({denied})"
    );
    let verified = verify_audit(&mesh);
    assert!(
        verified.contains("chain checked from the first record"),
        "the trail was restarted rather than continued: {verified}"
    );
}

/// `ztxdp reload` in the edge, whatever its exit; `(success, stdout, stderr)`.
fn reload(mesh: &Enforced) -> (bool, String, String) {
    let out = ztxdp(mesh.edge(), &["reload"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn reload_refuses_a_bad_config_and_the_old_policy_stays_whole() {
    let mut mesh = mesh("reload-bad");
    // Borrowed from the lab alone: the daemon is borrowed mutably below.
    let tunnel = tunnel(&mesh.lab);
    let (app1, app2) = (app(tunnel, "app-1").ns(), app(tunnel, "app-2").ns());
    let _postgres = listen(mesh.edge(), POSTGRES);
    let config = mesh.config.display().to_string();

    // Each refused config also drops app-1's grant: half applied, app-1
    // would be cut off.
    let port_zero = [("app-1", ""), ("app-2", "allow = [\"tcp/0\"]")];
    let flows = "[flows]\nmax_entries = 4096\n";
    for (what, peers, extra, mention) in [
        ("a config `check` refuses", &port_zero, "", None),
        (
            "a new flows.max_entries",
            &[("app-1", ""), ("app-2", "")],
            flows,
            Some("flows.max_entries"),
        ),
    ] {
        rewrite_config(&mesh, peers, extra);
        let check = ztxdp(mesh.edge(), &["check", "--config", &config]);
        let message = String::from_utf8_lossy(&check.stderr)
            .trim()
            .trim_start_matches("ztxdp: ")
            .to_owned();
        let (ok, stdout, stderr) = reload(&mesh);
        assert!(!ok, "{what}: `ztxdp reload` succeeded: {stdout}{stderr}");
        match mention {
            // The very message `check` prints.
            None => {
                assert!(!check.status.success(), "{what}: `check` accepted it");
                assert!(
                    stderr.contains(&message),
                    "{what}: `reload` does not say what `check` says ({message:?}):\n{stderr}"
                );
            }
            Some(key) => {
                assert!(
                    check.status.success(),
                    "{what}: `check` refused it: {message}"
                );
                for word in [key, "restart", "ztxdp up"] {
                    assert!(
                        stderr.contains(word),
                        "{what}: the refusal does not mention {word:?}:\n{stderr}"
                    );
                }
            }
        }
        mesh.daemon.expect_running(what);
        assert_connects(
            app1,
            at(EDGE_TUNNEL_V4, POSTGRES),
            &format!("app-1 to its granted port after {what} was refused"),
        );
        assert_times_out(
            app2,
            at(EDGE_TUNNEL_V4, POSTGRES),
            &format!("app-2 to 5432 after {what} was refused"),
        );
    }

    mesh.daemon.terminate();
    let (ok, _, stderr) = reload(&mesh);
    assert!(!ok, "`ztxdp reload` succeeded without a daemon");
    assert!(
        stderr.contains("is `ztxdp up` running here?"),
        "`ztxdp reload` without a daemon does not say so:\n{stderr}"
    );
}

#[test]
fn reload_applies_a_valid_change_and_keeps_runtime_grants() {
    let mesh = mesh("reload-ok");
    let (app1, app2) = (app_ns(&mesh, "app-1"), app_ns(&mesh, "app-2"));
    let _postgres = listen(mesh.edge(), POSTGRES);
    assert_connects(
        app1,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 before the reload",
    );
    grant(&mesh, "allow", "app-2", "5432");

    // app-1's grant leaves the config; app-2's runtime grant is in the
    // runtime grants file, which the reload reads again.
    rewrite_config(&mesh, &[("app-1", ""), ("app-2", "")], "");
    let (ok, stdout, stderr) = reload(&mesh);
    assert!(
        ok,
        "`ztxdp reload` failed:\n{stdout}{stderr}\ndaemon log:\n{}",
        mesh.daemon.log()
    );
    assert!(stdout.contains("reloaded"), "`ztxdp reload` said: {stdout}");
    assert_times_out(
        app1,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 after its grant left the config",
    );
    assert_connects(
        app2,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2, granted at run time, after the reload",
    );
}

/// The lab with `ztxdp up` on the edge running only the tunnel program, on
/// its eth0 (a veth with an Ethernet header): the bastion is app-1, the
/// outsider app-2.
fn l2_mesh(tag: &str) -> Enforced {
    Enforced::start(tag, build_lab(), |_, scratch| {
        format!(
            "[tunnel]\n\
             interface = \"{HOST_INTERFACE}\"\n\
             runtime_grants = \"{}\"\n\
             \n\
             [[tunnel.peer]]\n\
             name = \"app-1\"\n\
             addresses = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\
             allow = [\"tcp/5432\"]\n\
             \n\
             [[tunnel.peer]]\n\
             name = \"app-2\"\n\
             addresses = [\"10.77.0.3/32\"]\n\
             \n\
             [audit]\n\
             path = \"{}\"\n\
             state = \"{}\"\n",
            scratch.path("grants.json").display(),
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display(),
        )
    })
}

#[test]
fn the_tunnel_program_enforces_the_same_grants_on_an_l2_device() {
    let l2 = l2_mesh("l2");
    let lab = &l2.lab;
    let _postgres = listen(lab.edge(), POSTGRES);
    let _ssh = listen(lab.edge(), SSH);
    for ns in [lab.edge(), lab.bastion(), lab.outsider()] {
        ns.ip(&["neigh", "flush", "all"])
            .unwrap_or_else(|e| panic!("flushing neighbours: {e}"));
    }

    assert_connects(
        lab.bastion(),
        at(EDGE_V4, POSTGRES),
        "app-1 (L2) to its granted port",
    );
    assert_connects(
        lab.bastion(),
        at(EDGE_V6, POSTGRES),
        "app-1 (L2) to its granted port over IPv6",
    );
    assert_all_time_out(&[
        (lab.bastion(), at(EDGE_V4, SSH), "app-1 (L2) to 22"),
        (
            lab.outsider(),
            at(EDGE_V4, POSTGRES),
            "app-2 (L2) before `allow`",
        ),
    ]);
    let config_arg = l2.config.display().to_string();
    ztxdp_ok(
        lab.edge(),
        &["allow", "app-2", "5432", "--config", &config_arg],
    );
    assert_connects(
        lab.outsider(),
        at(EDGE_V4, POSTGRES),
        "app-2 (L2) after `allow`",
    );

    let now = status(lab.edge());
    assert!(
        now["edge"].is_null(),
        "only the tunnel program was configured: {now:#}"
    );
    assert_eq!(now["tunnel"]["interface"], HOST_INTERFACE, "{now:#}");
    for reason in ["arp", "neighbor_discovery", "granted", "not_granted"] {
        assert!(
            counter(&now, "tunnel", reason) > 0,
            "no {reason} on the L2 device: {now:#}"
        );
    }
    expect_audit(&l2.audit(), "app-1's granted SYN on the L2 device", |l| {
        is(l, "/ztxdp/peer/name", &"app-1".into()) && is(l, "/event/reason", &"granted".into())
    });
}

#[test]
fn bad_grant_input_is_refused_and_changes_nothing() {
    let l2 = l2_mesh("badgrant");
    let lab = &l2.lab;
    let config_arg = l2.config.display().to_string();
    ztxdp_ok(
        lab.edge(),
        &["allow", "app-2", "5432", "--config", &config_arg],
    );
    let grants = l2.scratch.path("grants.json");
    let saved =
        std::fs::read(&grants).unwrap_or_else(|e| panic!("reading {}: {e}", grants.display()));
    let list = || ztxdp_ok(lab.edge(), &["list", "--json", "--config", &config_arg]);
    let list_before = list();
    let maps = status(lab.edge())["tunnel"]["maps"].clone();

    for (what, args, mention) in [
        ("unknown peer", ["allow", "app-9", "5432"], "app-9"),
        ("unknown peer", ["revoke", "app-9", "5432"], "app-9"),
        ("port 0", ["allow", "app-1", "0"], "port 0"),
        (
            "reversed range",
            ["allow", "app-1", "9000-8000"],
            "9000-8000",
        ),
        ("protocol sctp", ["allow", "app-1", "5432/sctp"], "sctp"),
        ("protocol sctp", ["revoke", "app-2", "5432/sctp"], "sctp"),
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--config", &config_arg]);
        let out = ztxdp(lab.edge(), &argv);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{what}: `ztxdp {}` succeeded",
            argv.join(" ")
        );
        assert!(
            stderr.contains(mention),
            "{what}: the error does not mention {mention:?}:\n{stderr}"
        );
        let now =
            std::fs::read(&grants).unwrap_or_else(|e| panic!("reading {}: {e}", grants.display()));
        assert_eq!(now, saved, "{what}: the grants file changed");
        assert_eq!(list(), list_before, "{what}: `list` changed");
        assert_eq!(
            status(lab.edge())["tunnel"]["maps"],
            maps,
            "{what}: the live maps changed"
        );
    }
}

#[test]
fn import_wg_prints_the_peers_of_a_running_device_and_of_a_file() {
    let scratch = Scratch::new("import");
    let ns = NetNs::new("import").unwrap_or_else(|e| panic!("creating a namespace (root?): {e}"));
    let device = WgDevice::start(&ns).unwrap_or_else(|e| panic!("wireguard-go: {e}"));
    let keys: Vec<KeyPair> = (0..2)
        .map(|_| KeyPair::generate().unwrap_or_else(|e| panic!("{e}")))
        .collect();
    let addresses = [
        vec!["10.100.0.1/32", "fd00:100::1/128"],
        vec!["10.100.0.2/32"],
    ];
    device
        .add_peer(
            &ns,
            &keys[0].public,
            &addresses[0],
            Some(at(Ipv4Addr::new(192, 0, 2, 1), LISTEN_PORT)),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    device
        .add_peer(&ns, &keys[1].public, &addresses[1], None)
        .unwrap_or_else(|e| panic!("{e}"));

    let printed = ztxdp_ok(&ns, &["import-wg", "--live", device.name()]);
    assert!(
        !printed.contains(device.public_key()),
        "the interface's own key is not a peer:\n{printed}"
    );
    let peers = parse_imported(&scratch, device.name(), &printed);
    // wg lists peers in its own order; names follow it.
    let mut names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["peer-1", "peer-2"], "{printed}");
    for (key, want) in keys.iter().zip(&addresses) {
        let peer = peers
            .iter()
            .find(|p| p.public_key.as_deref() == Some(key.public.as_str()))
            .unwrap_or_else(|| panic!("peer {} missing:\n{printed}", key.public));
        let got: Vec<String> = peer.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(got, *want, "{printed}");
        assert!(
            peer.grants.is_empty(),
            "imported peers have no grants:\n{printed}"
        );
    }

    let file = scratch.write(
        "wg0.conf",
        &format!(
            "[Interface]\nPrivateKey = {}\nListenPort = 51820\n\n\
             # app-1\n[Peer]\nPublicKey = {}\nAllowedIPs = 10.100.0.1/32\nAllowedIPs = fd00:100::1/128\n\n\
             [Peer]\n# app-2\nPublicKey = {}\nAllowedIPs = 10.100.0.2/32\n",
            KeyPair::generate().unwrap_or_else(|e| panic!("{e}")).private,
            keys[0].public,
            keys[1].public,
        ),
    );
    let printed = ztxdp_ok(&ns, &["import-wg", &file.display().to_string()]);
    assert!(!printed.contains("PrivateKey"), "{printed}");
    let peers = parse_imported(&scratch, device.name(), &printed);
    let got: Vec<(&str, usize)> = peers
        .iter()
        .map(|p| (p.name.as_str(), p.addresses.len()))
        .collect();
    assert_eq!(got, [("app-1", 2), ("app-2", 1)], "{printed}");

    let missing = ztxdp(&ns, &["import-wg", "--live", "wz-none"]);
    assert!(
        !missing.status.success(),
        "import from a missing interface must fail"
    );
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("wz-none"),
        "the error must name the interface: {}",
        String::from_utf8_lossy(&missing.stderr)
    );
}

/// Checks `printed` is a valid `[[tunnel.peer]]` list, with the real binary
/// (`ztxdp check`) and the library; returns the peers.
fn parse_imported(scratch: &Scratch, interface: &str, printed: &str) -> Vec<ztxdp::policy::Peer> {
    let text = format!(
        "[audit]\npath = \"/dev/null\"\n\n[tunnel]\ninterface = \"{interface}\"\n\n{printed}"
    );
    let path = scratch.write("imported.toml", &text);
    let check = e2e::run_bounded(
        std::process::Command::new(e2e::ztxdp_bin())
            .args(["check", "--config"])
            .arg(&path),
    );
    assert!(
        check.status.success(),
        "`ztxdp check` refuses the imported peers:\n{}\n{text}",
        String::from_utf8_lossy(&check.stderr)
    );
    Config::parse(&text, &path)
        .unwrap_or_else(|e| panic!("{e}\n{text}"))
        .policy
        .tunnel
        .unwrap_or_else(|| panic!("no tunnel in:\n{text}"))
        .peers
}

/// `ztxdp ARGS...` in the edge with no `ZTXDP_CONFIG` in its environment,
/// whatever the test runner's is.
fn ztxdp_without_env(mesh: &Enforced, args: &[&str]) -> std::process::Output {
    let mut command = e2e::ztxdp_cmd(mesh.edge(), args);
    command.env_remove("ZTXDP_CONFIG");
    e2e::run_bounded(&mut command)
}

#[test]
fn allow_without_a_config_changes_the_running_policy() {
    // The mesh's config is in a scratch directory, not /etc/ztxdp: `allow`
    // must find it through the running programs' identity.
    let mesh = mesh("discover");
    let _postgres = listen(mesh.edge(), POSTGRES);
    let out = ztxdp_without_env(&mesh, &["allow", "app-2", "5432"]);
    assert!(
        out.status.success(),
        "`ztxdp allow app-2 5432` without --config failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_connects(
        app_ns(&mesh, "app-2"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after `allow app-2 5432` without --config",
    );
}

#[test]
fn a_config_with_the_peers_in_another_order_is_refused() {
    let mesh = mesh("other-order");
    let _postgres = listen(mesh.edge(), POSTGRES);
    let grants_file = mesh.scratch.path("grants.json");
    let before = std::fs::read(&grants_file).ok();
    // The same peers and grants, app-2 first: app-2 is index 0 here, the
    // running programs' app-1.
    let other = mesh.scratch.write(
        "other.toml",
        &mesh_config(
            &mesh.lab,
            &mesh.scratch,
            &[("app-2", ""), ("app-1", "allow = [\"tcp/5432\"]")],
            "",
        ),
    );
    let other_text = other.display().to_string();
    let out = ztxdp_without_env(&mesh, &["allow", "app-2", "5432", "--config", &other_text]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "`allow` with a config whose peers are in another order was not refused as a usage error:\n{stderr}"
    );
    for file in [&other, &mesh.config] {
        assert!(
            stderr.contains(&file.display().to_string()),
            "the refusal does not name {}:\n{stderr}",
            file.display()
        );
    }
    assert_eq!(
        std::fs::read(&grants_file).ok(),
        before,
        "the refused `allow` changed the runtime grants file"
    );
    assert_times_out(
        app_ns(&mesh, "app-2"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after the refused `allow`",
    );
    assert_connects(
        app_ns(&mesh, "app-1"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 after the refused `allow`",
    );
}

#[test]
fn list_shows_what_the_kernel_enforces_and_where_the_files_differ() {
    let mesh = mesh("list-kernel");
    grant(&mesh, "allow", "app-2", "5432");
    let list = peer_list(&mesh);
    for peer in ["app-1", "app-2"] {
        let entry = listed(&list, peer);
        assert_eq!(
            entry["kernel"],
            serde_json::json!(["tcp/5432"]),
            "{peer}'s kernel grants: {list:#}"
        );
        assert_eq!(entry["differs"], false, "{peer}: {list:#}");
    }

    // A change written to the file behind the kernel's back (as an `allow`
    // killed between saving and updating the map leaves it): the file
    // says more than the kernel enforces, and `list` says so.
    let config = Config::load(&mesh.config).unwrap_or_else(|e| panic!("{e}"));
    let grants_file = config
        .policy
        .tunnel
        .unwrap_or_else(|| panic!("{} has no tunnel", mesh.config.display()))
        .runtime_grants;
    let mut runtime = RuntimeGrants::load(&grants_file).unwrap_or_else(|e| panic!("{e}"));
    runtime.allow(
        "app-2",
        ztxdp::policy::Grant::Ports {
            protocol: ztxdp::policy::Protocol::Udp,
            first: 53,
            last: 53,
        },
    );
    let lock = ztxdp::grants::GrantsLock::acquire(&grants_file).unwrap_or_else(|e| panic!("{e}"));
    runtime.save(&lock).unwrap_or_else(|e| panic!("{e}"));
    drop(lock);
    let list = peer_list(&mesh);
    let app2 = listed(&list, "app-2");
    assert_eq!(
        app2["grants"],
        serde_json::json!(["tcp/5432", "udp/53"]),
        "{list:#}"
    );
    assert_eq!(app2["kernel"], serde_json::json!(["tcp/5432"]), "{list:#}");
    assert_eq!(app2["differs"], true, "{list:#}");
    let config = mesh.config.display().to_string();
    let text = ztxdp_ok(mesh.edge(), &["list", "--config", &config]);
    assert!(
        text.lines()
            .any(|l| l.starts_with("app-2") && l.contains("! the kernel enforces: tcp/5432")),
        "`list` does not flag app-2's difference:\n{text}"
    );
}

/// `status`'s `passed` and `dropped` of `program` must be the sums of its
/// counters whose reason `verdicts` says passes or drops.
fn check_totals(status: &Value, program: &str) -> (u64, u64) {
    let p = &status[program];
    let verdicts = p["verdicts"]
        .as_object()
        .unwrap_or_else(|| panic!("no {program} verdicts in status: {status:#}"));
    let counters = p["counters"]
        .as_object()
        .unwrap_or_else(|| panic!("no {program} counters in status: {status:#}"));
    let sum = |verdict: &str| -> u64 {
        verdicts
            .iter()
            .filter(|(_, v)| *v == verdict)
            .map(|(reason, _)| {
                counters[reason].as_u64().unwrap_or_else(|| {
                    panic!("{program} has a verdict but no counter for {reason}: {status:#}")
                })
            })
            .sum()
    };
    let (passed, dropped) = (sum("pass"), sum("drop"));
    assert_eq!(p["passed"], passed, "{program} passed: {status:#}");
    assert_eq!(p["dropped"], dropped, "{program} dropped: {status:#}");
    assert_eq!(verdicts["granted"], "pass", "granted must pass: {status:#}");
    assert_eq!(
        verdicts["not_granted"], "drop",
        "not_granted must drop: {status:#}"
    );
    (passed, dropped)
}

#[test]
fn status_names_the_daemon_the_peers_and_the_totals() {
    let mut mesh = mesh("status-daemon");
    let _postgres = listen(mesh.edge(), POSTGRES);
    assert_connects(
        app_ns(&mesh, "app-1"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-1 to its granted port",
    );
    assert_times_out(
        app_ns(&mesh, "app-2"),
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2, not granted",
    );
    let running = status(mesh.edge());
    assert_eq!(
        running["daemon"]["pid"],
        mesh.daemon.pid(),
        "status does not name the running daemon: {running:#}"
    );
    assert_eq!(running["daemon"]["serving_events"], true, "{running:#}");
    let peers = running["tunnel"]["peers"]
        .as_array()
        .unwrap_or_else(|| panic!("no tunnel peers in status: {running:#}"));
    for (index, name) in [(0, "app-1"), (1, "app-2")] {
        let peer = peers
            .iter()
            .find(|p| p["index"] == index)
            .unwrap_or_else(|| panic!("peer {index} missing from status: {running:#}"));
        assert_eq!(peer["name"], name, "peer {index}: {running:#}");
        assert_eq!(
            peer["public_key"],
            app(tunnel(&mesh.lab), name).device().public_key(),
            "{name}'s key: {running:#}"
        );
    }
    let (passed, dropped) = check_totals(&running, "tunnel");
    assert!(passed > 0 && dropped > 0, "{running:#}");
    check_totals(&running, "edge");
    let text = ztxdp_ok(mesh.edge(), &["status"]);
    assert!(
        text.contains("app-1") && text.contains(&format!("daemon {}", mesh.daemon.pid())),
        "text status names neither the peer nor the daemon:\n{text}"
    );

    mesh.daemon.kill9();
    let orphaned = status(mesh.edge());
    assert_eq!(orphaned["daemon"]["pid"], Value::Null, "{orphaned:#}");
    assert_eq!(orphaned["daemon"]["serving_events"], false, "{orphaned:#}");
    assert_eq!(
        orphaned["tunnel"]["peers"][0]["name"], "app-1",
        "the peers' names must outlive the daemon: {orphaned:#}"
    );
    let text = ztxdp_ok(mesh.edge(), &["status"]);
    assert!(
        text.contains("enforcing, no daemon: decisions are counted, not written"),
        "status after kill -9 does not say that nobody writes the trail:\n{text}"
    );
}

#[test]
fn the_identity_file_outlives_the_daemon_and_goes_with_down() {
    use std::os::unix::fs::PermissionsExt as _;
    let mut mesh = mesh("identity-file");
    let path = mesh
        .edge()
        .enter(ztxdp::identity::path)
        .unwrap_or_else(|e| panic!("entering the edge: {e}"))
        .unwrap_or_else(|e| panic!("the identity file's path: {e}"));
    let read = || -> Value {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} ({e}):\n{text}", path.display()))
    };
    let identity = read();
    assert_eq!(
        identity["config"],
        mesh.config.display().to_string(),
        "{identity:#}"
    );
    assert_eq!(identity["pid"], mesh.daemon.pid(), "{identity:#}");
    assert_eq!(
        identity["peers"][1]["name"], "app-2",
        "the peer table: {identity:#}"
    );
    let mode = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode & !0o640, 0, "{} has mode {mode:o}", path.display());

    mesh.daemon.kill9();
    assert_eq!(
        read(),
        identity,
        "the identity changed with the daemon's death"
    );
    // Still the running policy: `allow` finds the config through it.
    let out = ztxdp_without_env(&mesh, &["allow", "app-2", "5432"]);
    assert!(
        out.status.success(),
        "`allow` without --config after kill -9 failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ztxdp_ok(mesh.edge(), &["down"]);
    assert!(
        !path.exists(),
        "{} outlived `down`, which removed the programs it describes",
        path.display()
    );
}

/// `ztxdp explain --iface WG` names the peer, its key and the grant that
/// decides, with their config lines, and a real connection then gets what
/// it said; `events --follow --peer` prints only that peer's decisions.
#[test]
fn explain_names_the_peer_and_grant_the_tunnel_decides_by() {
    let mesh = mesh("explain");
    let tunnel = tunnel(&mesh.lab);
    let wg = tunnel.edge_device().name();
    let _postgres = listen(mesh.edge(), POSTGRES);
    let (mut follower, lines) = events_follower(mesh.edge(), &["--peer", "app-2"]);
    let dst = format!("{EDGE_TUNNEL_V4}:{POSTGRES}");
    for (index, name, reason) in [(0, "app-1", "granted"), (1, "app-2", "not_granted")] {
        let app = app(tunnel, name);
        let src = format!("{}:40000", app.tunnel_v4());
        let text = ztxdp_ok(
            mesh.edge(),
            &["explain", "--json", "--iface", wg, "tcp", &src, &dst],
        );
        let r: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("explain --json ({e}):\n{text}"));
        assert_eq!(r["reason"], reason, "{r:#}");
        assert_eq!(r["program"], "tunnel", "{r:#}");
        let peer = &r["peer"];
        assert_eq!(peer["name"], name, "{r:#}");
        assert_eq!(peer["public_key"], app.device().public_key(), "{r:#}");
        assert_eq!(
            peer["rule"]["key"],
            format!("tunnel.peer[{index}].addresses[0]"),
            "{r:#}"
        );
        let grant = r["why"]
            .as_array()
            .and_then(|w| w.iter().find(|s| s["step"] == "grant"))
            .unwrap_or_else(|| panic!("no grant step: {r:#}"));
        assert_eq!(grant["matched"], index == 0, "{grant:#}");
        let (key, word) = if index == 0 {
            ("tunnel.peer[0].allow[0]", POSTGRES >> 6)
        } else {
            ("tunnel.peer[1].allow", POSTGRES >> 6)
        };
        assert_eq!(grant["grant_word"]["word"], word, "{grant:#}");
        // app-2's entry has no `allow` key: no line to point at.
        let line = (index == 0).then_some(mesh_line(&mesh, "allow = [\"tcp/5432\"]"));
        assert_eq!(grant["rule"]["key"], key, "{grant:#}");
        assert_eq!(grant["rule"]["line"].as_u64(), line, "{grant:#}");

        let before = counter(&status(mesh.edge()), "tunnel", reason);
        let to = at(EDGE_TUNNEL_V4, POSTGRES);
        if index == 0 {
            assert_connects(app.ns(), to, "app-1 to its granted port");
        } else {
            assert_times_out(app.ns(), to, "app-2 to a port it is not granted");
        }
        let after = counter(&status(mesh.edge()), "tunnel", reason);
        assert!(after > before, "{name}: {reason} stayed at {before}");
    }
    // The follower may have connected after app-2's first attempt: app-2
    // tries again until it prints.
    let mut got: Vec<Value> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.is_empty() {
        assert!(
            Instant::now() < deadline,
            "`events --follow --peer app-2` printed nothing"
        );
        assert_times_out(
            app_ns(&mesh, "app-2"),
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-2 again",
        );
        got.extend(
            lines
                .try_iter()
                .map(|l| serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l}"))),
        );
    }
    let _ = follower.kill();
    let _ = follower.wait();
    got.extend(
        lines
            .try_iter()
            .filter_map(|l| serde_json::from_str::<Value>(&l).ok()),
    );
    for line in &got {
        assert!(
            is(line, "/ztxdp/peer/name", &"app-2".into()),
            "--peer app-2 printed {line}"
        );
    }
    // app-1's decisions are in the trail: the filter left them out.
    expect_peer_line(
        &mesh,
        "app-1",
        "granted",
        IpAddr::V4(APP_1_TUNNEL_V4),
        POSTGRES,
    );
}

/// The 1-based line of the first line of the mesh's config that is `text`.
fn mesh_line(mesh: &Enforced, text: &str) -> u64 {
    let config = std::fs::read_to_string(&mesh.config)
        .unwrap_or_else(|e| panic!("{}: {e}", mesh.config.display()));
    (1u64..)
        .zip(config.lines())
        .find(|(_, l)| l.trim() == text)
        .map_or_else(|| panic!("no line {text:?} in:\n{config}"), |(n, _)| n)
}
