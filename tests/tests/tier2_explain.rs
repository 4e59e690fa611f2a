//! Tier 2, `ztxdp explain` (issue 15): its engine
//! (`ztxdp::explain::live::Live`) reads the loaded programs' maps and asks
//! the model, and leaves no trace. Many explains of packets that would
//! move every kind of state (a reply refreshing its flow, an echo request
//! taking a token, a later fragment, denials that would be audited) change
//! no counter, flow, token bucket, fragment or summary entry and write
//! nothing to the ring buffer; and the kernel then gives each packet the
//! verdict explain gave. That explain agrees with the kernel on every
//! packet of the tier-2 corpus is checked where the corpus is run
//! (`tier2_differential.rs`, `tier2_flows.rs`). Needs root.

mod tier2;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use tier2::{Prog, Programs, monotonic_ns};
use zt_common::{
    EventBucket, FlowKey, FlowState, FlowSummary, FragmentKey, SourceKey, SummaryKey, map, program,
    reason,
};
use zt_tests::packet::{Ipv4, Transport, eth_v4, hex_dump};
use ztxdp::{
    audit::record::Program,
    explain::{live::Live, packet::Request},
    loader,
    policy::{EchoRate, EdgePolicy, FlowSettings, Grant, Mode, Peer, Protocol, TunnelPolicy},
};

const HOST: &str = "192.0.2.1";
const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const REMOTE: &str = "203.0.113.10";
const PINGER: &str = "198.51.100.9";
const PEER: &str = "10.10.0.2";
/// Explains per packet kind.
const ROUNDS: usize = 200;

fn policies() -> (EdgePolicy, TunnelPolicy) {
    let edge = EdgePolicy {
        interface: "eth0".into(),
        mode: Mode::Enforce,
        wireguard_ports: vec![51_820],
        ssh_port: 22,
        ssh_allow: vec!["198.51.100.0/24".parse().unwrap_or_else(|e| panic!("{e}"))],
        // Three echoes back to back, then one a minute: a token taken by an
        // explain would show within the test.
        services: Vec::new(),
        icmp_echo: EchoRate {
            ns_per_token: 60_000_000_000,
            burst: 3,
        },
    };
    let tunnel = TunnelPolicy {
        interface: "wg0".into(),
        mode: Mode::Enforce,
        peers: vec![Peer {
            name: "alice".into(),
            addresses: vec!["10.10.0.2/32".parse().unwrap_or_else(|e| panic!("{e}"))],
            public_key: None,
            mode: Mode::Enforce,
            grants: vec![Grant::Ports {
                protocol: Protocol::Tcp,
                first: 5432,
                last: 5432,
            }],
        }],
        groups: Vec::new(),
        runtime_grants: "/nonexistent/runtime-grants.json".into(),
        link_local_neighbors: false,
    };
    (edge, tunnel)
}

fn request(protocol: &str, src: &str, dst: &str, flags: Option<&str>) -> Request {
    Request::new(protocol, src, dst, flags, None)
        .unwrap_or_else(|e| panic!("{protocol} {src} {dst}: {e}"))
}

/// Every entry of hash map `name` of the loaded programs, as text, sorted.
fn entries<K: aya::Pod + std::fmt::Debug, V: aya::Pod + std::fmt::Debug>(
    progs: &Programs,
    name: &str,
) -> Vec<String> {
    let id = loader::map_ids(&progs.ebpf)
        .into_iter()
        .find(|&id| {
            MapData::from_id(id)
                .ok()
                .and_then(|d| d.info().ok())
                .is_some_and(|i| i.name_as_str() == Some(name))
        })
        .unwrap_or_else(|| panic!("no map {name}"));
    let data = MapData::from_id(id).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let m = Map::from_map_data(data).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let table = BpfHashMap::<_, K, V>::try_from(&m).unwrap_or_else(|e| panic!("{name}: {e:?}"));
    let mut out: Vec<String> = table
        .iter()
        .map(|kv| format!("{:?}", kv.unwrap_or_else(|e| panic!("{name}: {e:?}"))))
        .collect();
    out.sort();
    out
}

/// Everything an explain must not change: every counter of every
/// program, the peer counters, and the flow, echo, fragment and summary
/// tables.
fn state(progs: &Programs) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    for prog in [program::EDGE, program::TUNNEL, program::EGRESS] {
        let counters = progs
            .tables
            .counters(prog)
            .unwrap_or_else(|e| panic!("counters: {e:?}"));
        s.insert(
            format!("counters of program {prog}"),
            format!("{counters:?}"),
        );
    }
    let peers = progs
        .tables
        .peer_counters(1)
        .unwrap_or_else(|e| panic!("peer counters: {e:?}"));
    s.insert("peer counters".into(), format!("{peers:?}"));
    s.insert(
        map::FLOWS.into(),
        format!("{:?}", entries::<FlowKey, FlowState>(progs, map::FLOWS)),
    );
    s.insert(
        map::ECHO_BUCKETS.into(),
        format!(
            "{:?}",
            entries::<SourceKey, EventBucket>(progs, map::ECHO_BUCKETS)
        ),
    );
    s.insert(
        map::FRAGMENTS.into(),
        format!("{:?}", entries::<FragmentKey, u64>(progs, map::FRAGMENTS)),
    );
    s.insert(
        map::SUMMARIES.into(),
        format!(
            "{:?}",
            entries::<SummaryKey, FlowSummary>(progs, map::SUMMARIES)
        ),
    );
    s
}

/// Events waiting in the ring buffer, read (and so removed).
fn drain(progs: &mut Programs) -> usize {
    let m = progs
        .ebpf
        .map_mut(map::EVENTS)
        .unwrap_or_else(|| panic!("no map {}", map::EVENTS));
    let mut ring = RingBuf::try_from(m).unwrap_or_else(|e| panic!("ring buffer: {e:?}"));
    let mut n = 0;
    while ring.next().is_some() {
        n += 1;
    }
    n
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn explaining_changes_nothing_and_the_kernel_then_agrees() {
    let (edge, tunnel) = policies();
    let flows = FlowSettings {
        tcp_established: Duration::from_hours(1),
        ..FlowSettings::default()
    };
    let mut progs = Programs::load_with_flows(false, Some(&edge), Some(&tunnel), &flows);

    // State worth changing: a flow of the host's, an echo source with two
    // tokens left, a datagram whose first fragment passed.
    let out = request(
        "tcp",
        &format!("{HOST}:40000"),
        &format!("{REMOTE}:443"),
        None,
    );
    assert!(
        progs.egress(program::EDGE_EGRESS_NAME, &out.packet(true)),
        "the SYN out opens a flow"
    );
    let ping = request("icmp", PINGER, HOST, None).packet(true);
    assert_eq!(progs.run(Prog::Edge, &ping).reason, reason::PASS_ICMP_ECHO);
    let remote: Ipv4Addr = REMOTE.parse().unwrap_or_else(|e| panic!("{e}"));
    let first = eth_v4(
        &Ipv4::new(remote, HOST_V4).id(7).fragment(true, 0),
        &Transport::udp(51_820),
    );
    let later = eth_v4(
        &Ipv4::new(remote, HOST_V4).id(7).fragment(false, 3),
        &Transport::udp(51_820),
    );
    assert_eq!(progs.run(Prog::Edge, &first).reason, reason::PASS_WIREGUARD);

    let reply = request(
        "tcp",
        &format!("{REMOTE}:443"),
        &format!("{HOST}:40000"),
        Some("SA"),
    );
    let denied = request("udp", &format!("{REMOTE}:9"), &format!("{HOST}:9"), None);
    let ssh = request("tcp", "198.51.100.7:50000", &format!("{HOST}:22"), None);
    let granted = request("tcp", &format!("{PEER}:50000"), "10.10.0.1:5432", None);
    let ungranted = request("tcp", &format!("{PEER}:50000"), "10.10.0.1:5433", None);
    let cases: [(&str, Program, Vec<u8>, u32); 7] = [
        (
            "reply",
            Program::Edge,
            reply.packet(true),
            reason::PASS_REPLY,
        ),
        ("echo", Program::Edge, ping.clone(), reason::PASS_ICMP_ECHO),
        (
            "later fragment",
            Program::Edge,
            later,
            reason::PASS_FRAGMENT,
        ),
        (
            "denied",
            Program::Edge,
            denied.packet(true),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        ("ssh", Program::Edge, ssh.packet(true), reason::PASS_SSH),
        (
            "granted",
            Program::Tunnel,
            granted.packet(false),
            reason::PASS_GRANT,
        ),
        (
            "not granted",
            Program::Tunnel,
            ungranted.packet(false),
            reason::DROP_NOT_GRANTED,
        ),
    ];

    // A denial is audited: the ring buffer must be seen to take events.
    assert_eq!(
        progs.run(Prog::Edge, &denied.packet(true)).reason,
        reason::DROP_PORT_NOT_ALLOWED
    );
    assert!(drain(&mut progs) > 0, "a denial wrote no event");
    let before = state(&progs);
    let ids = loader::map_ids(&progs.ebpf);
    let mut explained = 0;
    for round in 0..ROUNDS {
        // Read afresh now and then, as every `ztxdp explain` does.
        let live = Live::read(&ids).unwrap_or_else(|e| panic!("reading the policy: {e:?}"));
        for (what, prog, packet, want) in &cases {
            let got = live
                .explain(*prog, packet, 1, monotonic_ns())
                .unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(
                reason::name(got.reason),
                reason::name(*want),
                "{what}, round {round}: explain changed its own answer\n{}",
                hex_dump(packet)
            );
            explained += 1;
        }
    }
    assert_eq!(explained, ROUNDS * cases.len());
    let after = state(&progs);
    for (what, was) in &before {
        assert_eq!(&after[what], was, "{explained} explains changed {what}");
    }
    assert_eq!(drain(&mut progs), 0, "explains wrote to the ring buffer");

    // Each packet now meets the state the explains met: the kernel gives
    // what explain said, the echo source's bucket included.
    for (what, prog, packet, want) in &cases {
        let p = match prog {
            Program::Edge => Prog::Edge,
            Program::Tunnel => Prog::Tunnel,
        };
        assert_eq!(
            reason::name(progs.run(p, packet).reason),
            reason::name(*want),
            "{what}: the kernel, after the explains\n{}",
            hex_dump(packet)
        );
    }
}
