//! Tier 2: the kernel half of the audit trail, through `BPF_PROG_TEST_RUN`.
//! Per-flow summarising keeps a flow's later decisions of a window in one
//! of two places: the CPU's summary cache (the first `SUMMARY_CACHE_WAYS`
//! flows the CPU summarised in the window) or the shared summary table
//! (every other flow). These
//! tests read the ring buffer and both maps after crafted runs and check
//! where each decision went, and that none went missing. The events also
//! check that the straight-line parse of the common packet and the general
//! parse record the same fields. Needs root.

mod tier2;

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, RingBuf};
use tier2::{Programs, monotonic_ns};
use zt_common::{
    CachedFlow, EVENT_WOULD_DROP, Event, FlowSummary, SUMMARY_CACHE_SLOTS, SUMMARY_CACHE_WAYS,
    SUMMARY_WINDOW_NS, SummaryCacheSlot, SummaryKey, map, program, reason, summary_window,
    tcp_flag,
};
use zt_tests::packet::{ETH_LEN, Ethernet, Ipv4, Transport, eth_v4, ethertype};
use ztxdp::policy::{EchoRate, EdgePolicy, Protocol, TunnelPolicy};

const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const FLOW_A: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const FLOW_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
const CLOSED_PORT: u16 = 9;
/// Runs per flow: far more than the one event a flow sends per window, and
/// few enough that two flows' runs fit in one window on a loaded machine.
const RUNS: u64 = 200;

fn policy() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![51_820],
        ssh_port: 22,
        ssh_allow: vec![],
        services: Vec::new(),
        icmp_echo: EchoRate::default(),
        mode: ztxdp::policy::Mode::Enforce,
    }
}

/// A UDP packet from `src` to a closed port: denied, and audited.
fn denied(src: Ipv4Addr) -> Vec<u8> {
    eth_v4(&Ipv4::new(src, HOST_V4), &Transport::udp(CLOSED_PORT))
}

/// Attempts at a window-bound test before it counts as failed.
const WINDOW_ATTEMPTS: u32 = 5;

/// Loads the programs and runs `body` on them with this thread kept on the
/// CPU it is on (so every run uses the same per-CPU cache), from just after
/// the start of a summary window, so that the runs have the whole window.
/// The wait comes after the load, whose verification can take a while on a
/// loaded machine, and ends 20 ms into the window, past the tick by which
/// the programs' coarse clock may lag. `body` returns `None` when the clock
/// still moved on to a window it did not plan for (CI runs many tests on two
/// CPUs). Such an attempt says nothing about the programs, so it is run
/// again with fresh maps, at most [`WINDOW_ATTEMPTS`] times.
fn in_planned_windows<T>(mut body: impl FnMut(&mut Programs) -> Option<T>) -> (Programs, T) {
    // SAFETY: sched_getcpu has no preconditions; the set is plain data
    // handed to sched_setaffinity for the calling thread (pid 0).
    unsafe {
        let cpu = usize::try_from(libc::sched_getcpu()).unwrap_or(0);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
    for _ in 0..WINDOW_ATTEMPTS {
        let mut p = Programs::load(true, Some(&policy()), None);
        let into = monotonic_ns() & (SUMMARY_WINDOW_NS - 1);
        thread::sleep(Duration::from_nanos(SUMMARY_WINDOW_NS - into) + Duration::from_millis(20));
        if let Some(done) = body(&mut p) {
            return (p, done);
        }
    }
    panic!("{WINDOW_ATTEMPTS} attempts each ran past the summary window they were planned in");
}

/// The summary window the clock is in now.
fn window_now() -> u32 {
    summary_window(monotonic_ns())
}

fn run(p: &mut Programs, src: Ipv4Addr, times: u64) {
    for i in 0..times {
        let r = p
            .edge(&denied(src))
            .unwrap_or_else(|e| panic!("run {i} from {src}: {e:?}"));
        assert_eq!(
            r.reason,
            reason::DROP_PORT_NOT_ALLOWED,
            "run {i} from {src}"
        );
    }
}

fn source(key_src: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(key_src[0], key_src[1], key_src[2], key_src[3])
}

/// The events in the ring buffer.
fn drain(p: &mut Programs) -> Vec<Event> {
    let m = p
        .ebpf
        .map_mut(map::EVENTS)
        .unwrap_or_else(|| panic!("no map {}", map::EVENTS));
    let mut ring = RingBuf::try_from(m).unwrap_or_else(|e| panic!("ring buffer: {e:?}"));
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= size_of::<Event>(), "short event");
        // SAFETY: the kernel wrote a whole Event (checked length).
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    out
}

/// The events in the ring buffer, as (source, carried count).
fn events(p: &mut Programs) -> Vec<(Ipv4Addr, u32)> {
    drain(p)
        .iter()
        .map(|e| (source(&e.src), e.suppressed))
        .collect()
}

/// The summary table's counts per source.
fn table(p: &Programs) -> Vec<(Ipv4Addr, u64)> {
    let m = p
        .ebpf
        .map(map::SUMMARIES)
        .unwrap_or_else(|| panic!("no map {}", map::SUMMARIES));
    let t = BpfHashMap::<_, SummaryKey, FlowSummary>::try_from(m)
        .unwrap_or_else(|e| panic!("summary table: {e:?}"));
    let mut out: Vec<(Ipv4Addr, u64)> = t
        .iter()
        .map(|r| r.unwrap_or_else(|e| panic!("summary table: {e:?}")))
        .map(|(k, v)| (source(&k.src), v.suppressed))
        .collect();
    out.sort_unstable();
    out
}

/// Cached flows with a count, on any CPU, as (source, window, count),
/// sorted.
fn cache(p: &Programs) -> Vec<(Ipv4Addr, u32, u64)> {
    let mut out: Vec<_> = cached_flows(p)
        .iter()
        .map(|v| (source(&v.key.src), v.key.window, v.count))
        .collect();
    out.sort_unstable();
    out
}

fn cached_keys(p: &Programs) -> Vec<SummaryKey> {
    cached_flows(p).iter().map(|v| v.key).collect()
}

/// Cached flows with a count, in every way of every slot of every CPU.
fn cached_flows(p: &Programs) -> Vec<CachedFlow> {
    let m = p
        .ebpf
        .map(map::SUMMARY_CACHE)
        .unwrap_or_else(|| panic!("no map {}", map::SUMMARY_CACHE));
    let c = Array::<_, SummaryCacheSlot>::try_from(m)
        .unwrap_or_else(|e| panic!("summary cache: {e:?}"));
    c.iter()
        .map(|v| v.unwrap_or_else(|e| panic!("summary cache: {e:?}")))
        .flat_map(|v| v.ways)
        .filter(|v| v.count > 0)
        .collect()
}

#[test]
fn a_one_flow_flood_is_counted_in_the_cpu_cache() {
    let (mut p, window) = in_planned_windows(|p| {
        let window = window_now();
        run(p, FLOW_A, RUNS);
        (window_now() == window).then_some(window)
    });
    // One event; the table has the flow, with nothing counted there; every
    // later decision is in this CPU's cache slot for the window.
    assert_eq!(events(&mut p), vec![(FLOW_A, 0)]);
    assert_eq!(table(&p), vec![(FLOW_A, 0)]);
    let cached = cache(&p);
    assert_eq!(cached.len(), 1, "cache slots with a count: {cached:?}");
    let (src, w, count) = cached[0];
    assert_eq!((src, count), (FLOW_A, RUNS - 1), "{cached:?}");
    // Every field of the key the program laid out word by word.
    let key = cached_keys(&p)[0];
    assert_eq!(source(&key.dst), HOST_V4);
    assert_eq!((key.src_port, key.dst_port), (40_000, CLOSED_PORT));
    assert_eq!(key.reason, reason::DROP_PORT_NOT_ALLOWED);
    assert_eq!((key.protocol, key.ip_version), (17, 4));
    assert_eq!(u32::from(key.program), program::EDGE);
    assert_eq!(key.flags, 0);
    // The kernel's clock is a tick behind at most.
    assert!(
        w == window || w + 1 == window,
        "slot window {w}, test window {window}"
    );
    assert_eq!(p.counter(program::EDGE, reason::EVENTS_SUPPRESSED), 0);
}

#[test]
fn the_first_flows_of_the_window_are_counted_in_the_cache_and_later_ones_in_the_table() {
    // One flow per way, then one more.
    let flows: Vec<Ipv4Addr> = (0..=SUMMARY_CACHE_WAYS)
        .map(|i| Ipv4Addr::new(198, 51, 100, 20 + u8::try_from(i).expect("a few ways")))
        .collect();
    let (cached_flows, late) = flows.split_at(SUMMARY_CACHE_WAYS);
    // Runs per flow: as many runs in all as the one-flow tests make, so that
    // they fit in one window as well.
    let runs = RUNS / flows.len() as u64;
    let (mut p, ()) = in_planned_windows(|p| {
        let window = window_now();
        // The first flows take the CPU's ways for the window, in turn; the
        // last comes after they are all taken. Then all of them again,
        // interleaved as a flood of several flows arrives.
        for &f in &flows {
            run(p, f, 1);
        }
        for _ in 1..runs {
            for &f in &flows {
                run(p, f, 1);
            }
        }
        (window_now() == window).then_some(())
    });
    let mut sent = events(&mut p);
    sent.sort_unstable();
    let each_once: Vec<(Ipv4Addr, u32)> = flows.iter().map(|&f| (f, 0)).collect();
    assert_eq!(sent, each_once, "one event per flow");
    let want_table: Vec<(Ipv4Addr, u64)> = flows
        .iter()
        .map(|&f| (f, if late.contains(&f) { runs - 1 } else { 0 }))
        .collect();
    assert_eq!(
        table(&p),
        want_table,
        "only the late flow counted in the table"
    );
    let cached: Vec<(Ipv4Addr, u64)> = cache(&p).into_iter().map(|(s, _, n)| (s, n)).collect();
    let want_cached: Vec<(Ipv4Addr, u64)> = cached_flows.iter().map(|&f| (f, runs - 1)).collect();
    assert_eq!(cached, want_cached, "the first flows counted in the cache");
    assert_eq!(p.counter(program::EDGE, reason::EVENTS_SUPPRESSED), 0);
}

#[test]
fn a_count_left_in_the_cache_too_long_is_still_counted() {
    // User space collects a slot two windows after it; when nobody has when
    // the slot comes round again, the program counts what it held as
    // decisions not sent, rather than dropping it.
    let (p, ()) = in_planned_windows(|p| {
        let window = window_now();
        let start = Instant::now();
        run(p, FLOW_A, RUNS);
        if window_now() != window {
            return None;
        }
        assert_eq!(p.counter(program::EDGE, reason::EVENTS_SUPPRESSED), 0);
        // The same slot, one cycle of windows later.
        let cycle = Duration::from_nanos(SUMMARY_WINDOW_NS * u64::from(SUMMARY_CACHE_SLOTS));
        thread::sleep(cycle.saturating_sub(start.elapsed()) + Duration::from_millis(50));
        let later = window_now();
        run(p, FLOW_A, 1);
        (later == window + SUMMARY_CACHE_SLOTS && window_now() == later).then_some(())
    });
    assert_eq!(
        p.counter(program::EDGE, reason::EVENTS_SUPPRESSED),
        RUNS - 1,
        "the stale slot's count must move to events_suppressed"
    );
    // The slot now counts the new window, from zero.
    let cached = cache(&p);
    assert!(
        cached.iter().all(|&(_, _, n)| n != RUNS - 1),
        "the stale count is still cached: {cached:?}"
    );
}

/// A case for the parse-equivalence tests: (what, IP header, L4 header,
/// bytes after the IP packet, verdict).
type ParseCase<'a> = (&'a str, &'a Ipv4, &'a Transport, usize, u32);

/// How one side of a parse-equivalence test loads its programs and frames
/// a packet.
type Side<'a> = (
    &'a dyn Fn() -> Programs,
    &'a dyn Fn(&Ipv4, &Transport) -> Vec<u8>,
);

/// Runs each case through two freshly loaded programs, framed once for the
/// straight-line parse and once for the general one, and requires the same
/// verdict and the identical event, whose ports and flags must also be the
/// packet's. Fresh programs for every run: a flow sends one event per window.
fn expect_same_events(
    cases: &[ParseCase<'_>],
    straight: Side<'_>,
    general: Side<'_>,
    run: fn(&mut Programs, &[u8]) -> Result<tier2::Run, aya::programs::ProgramError>,
) {
    for &(what, ip, transport, trailing, want) in cases {
        let mut seen = Vec::new();
        for (load, frame) in [straight, general] {
            let mut frame = frame(ip, transport);
            frame.resize(frame.len() + trailing, 0);
            let mut p = load();
            let r = run(&mut p, &frame).unwrap_or_else(|e| panic!("{what}: {e:?}"));
            assert_eq!(r.reason, want, "{what}");
            let mut sent = drain(&mut p);
            assert_eq!(sent.len(), 1, "{what}: {sent:?}");
            sent[0].ts_ns = 0;
            seen.push(sent[0]);
        }
        assert_eq!(
            seen[0], seen[1],
            "{what}: straight-line parse, then general"
        );
        let e = seen[0];
        assert_eq!((source(&e.src), source(&e.dst)), (ip.src, ip.dst), "{what}");
        assert_eq!(
            (e.protocol, e.ip_version, u32::from(e.reason), e.flags),
            (transport.protocol(false), 4, want, 0),
            "{what}"
        );
        let l4 = match *transport {
            Transport::Tcp { src, dst, flags } => (src, dst, flags),
            Transport::Udp { src, dst } => (src, dst, 0),
            _ => unreachable!("only TCP and UDP cases"),
        };
        assert_eq!((e.src_port, e.dst_port, e.tcp_flags), l4, "{what}");
    }
}

/// Untagged IPv4 TCP and UDP take a straight-line parse (zt-ebpf's
/// `parse::ethernet_with`); a VLAN tag sends the same packet through the
/// general parse. Both must reach the same verdict and send the same event,
/// field for field, for denies and audited allows, with IP options, and
/// with bytes after the IP packet. A first fragment takes the general parse
/// either way (the straight line takes no fragment); it stays as a case so
/// that a straight line taking fragments again is held to the same events.
#[test]
fn the_straight_line_parse_records_what_the_general_parse_records() {
    let mut policy = policy();
    policy.ssh_allow = vec![format!("{FLOW_B}/32").parse().expect("a CIDR")];
    let syn = Transport::tcp_syn(5432);
    let ssh_syn = Transport::tcp_syn(22);
    let fin_ack = Transport::Tcp {
        src: 51_000,
        dst: 22,
        flags: tcp_flag::ACK | tcp_flag::FIN,
    };
    let udp = Transport::udp(CLOSED_PORT);
    let from_a = Ipv4::new(FLOW_A, HOST_V4);
    let from_b = Ipv4::new(FLOW_B, HOST_V4);
    let with_options = from_a.clone().options(&[1, 1, 1, 0]);
    let first_fragment = from_a.clone().fragment(true, 0);
    let denied = reason::DROP_PORT_NOT_ALLOWED;
    let load = || Programs::load(true, Some(&policy), None);
    expect_same_events(
        &[
            ("udp", &from_a, &udp, 0, denied),
            ("syn", &from_a, &syn, 0, denied),
            ("syn, ip options", &with_options, &syn, 0, denied),
            ("udp, first fragment", &first_fragment, &udp, 0, denied),
            ("udp, 20 bytes after the packet", &from_a, &udp, 20, denied),
            ("ssh fin-ack", &from_a, &fin_ack, 0, reason::DROP_SSH_SOURCE),
            ("allowed ssh syn", &from_b, &ssh_syn, 0, reason::PASS_SSH),
        ],
        (&load, &|ip, t| Ethernet::default().ipv4(ip, t)),
        (&load, &|ip, t| {
            Ethernet::default().tag(ethertype::VLAN, 5).ipv4(ip, t)
        }),
        Programs::edge,
    );
}

/// As above, for the tunnel program: a bare IPv4 packet (a `WireGuard`
/// device) takes the straight line (`parse::ip_with`); the same packet in a
/// VLAN-tagged frame on a device with a link layer takes the general parse.
/// The events carry the peer too.
#[test]
fn the_tunnel_straight_line_parse_records_what_the_general_parse_records() {
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
    const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 99);
    const LOCAL: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
    let tunnel = TunnelPolicy {
        interface: "wg0".into(),
        peers: vec![tier2::peer(
            "alice",
            &["10.10.0.2/32"],
            vec![tier2::ports(Protocol::Tcp, 5432, 5432)],
        )],
        groups: Vec::new(),
        runtime_grants: "/nonexistent/runtime-grants.json".into(),
        link_local_neighbors: false,
        mode: ztxdp::policy::Mode::Enforce,
    };
    let granted = Transport::tcp_syn(5432);
    let udp = Transport::udp(CLOSED_PORT);
    let from_peer = Ipv4::new(PEER, LOCAL);
    let with_options = from_peer.clone().options(&[1, 1, 1, 0]);
    let from_stranger = Ipv4::new(STRANGER, LOCAL);
    expect_same_events(
        &[
            ("granted syn", &from_peer, &granted, 0, reason::PASS_GRANT),
            (
                "granted syn, ip options",
                &with_options,
                &granted,
                0,
                reason::PASS_GRANT,
            ),
            (
                "udp not granted",
                &from_peer,
                &udp,
                0,
                reason::DROP_NOT_GRANTED,
            ),
            (
                "unknown peer",
                &from_stranger,
                &granted,
                0,
                reason::DROP_PEER_UNKNOWN,
            ),
        ],
        (&|| Programs::load(false, None, Some(&tunnel)), &|ip, t| {
            ip.packet(t)
        }),
        (&|| Programs::load(true, None, Some(&tunnel)), &|ip, t| {
            Ethernet::default().tag(ethertype::VLAN, 5).ipv4(ip, t)
        }),
        Programs::tunnel,
    );
}

#[test]
fn audit_mode_events_and_summaries_say_would_drop_and_parse_failures_drop() {
    let mut p = Programs::load(
        true,
        Some(&EdgePolicy {
            mode: ztxdp::policy::Mode::Audit,
            ..policy()
        }),
        None,
    );
    drain(&mut p);
    let before = p.counter(program::EDGE, reason::WOULD_DROP);
    for _ in 0..3 {
        let run = p
            .edge(&denied(FLOW_A))
            .unwrap_or_else(|e| panic!("run: {e:?}"));
        assert!(
            run.would_drop && run.reason == reason::DROP_PORT_NOT_ALLOWED,
            "{run:?}"
        );
    }
    assert_eq!(p.counter(program::EDGE, reason::WOULD_DROP), before + 3);
    let sent = drain(&mut p);
    assert!(
        !sent.is_empty() && sent.iter().all(|e| e.flags == EVENT_WOULD_DROP),
        "would-drop events carry the flag: {sent:?}"
    );
    // The flow's later packets counted in the CPU's cache under a key that
    // says would-drop, so its summary does too.
    assert!(
        cached_keys(&p)
            .iter()
            .any(|k| k.flags == EVENT_WOULD_DROP && source(&k.src) == FLOW_A),
        "{:?}",
        cached_keys(&p)
    );
    // A truncated IPv4 header: the parser refuses it, and that drops.
    let mut malformed = denied(FLOW_B);
    malformed.truncate(ETH_LEN + 10);
    let run = p.edge(&malformed).unwrap_or_else(|e| panic!("run: {e:?}"));
    assert!(
        !run.would_drop && run.reason == reason::DROP_MALFORMED && run.action == tier2::XDP_DROP,
        "{run:?}"
    );
    assert!(drain(&mut p).iter().all(|e| e.flags == 0));
}
