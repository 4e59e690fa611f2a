//! Tier 2: `zt_tunnel` (TC classifier) run by the kernel on crafted packets
//! through `BPF_PROG_TEST_RUN`, loaded both ways: `tunnel_l2 = false` (bare
//! IP packets, as on a `WireGuard` device) and `tunnel_l2 = true` (Ethernet
//! frames, as on a veth). Every case runs in both modes and checks the
//! reason counter that moved (see `tier2/mod.rs`). Needs root.
//!
//! `BPF_PROG_TEST_RUN` refuses `SCHED_CLS` inputs shorter than 14 bytes, so
//! the shortest packets tested here are 14 bytes long, and truncated IP
//! headers go in a VLAN tag in L2 mode; see `tier2/mod.rs` for these kernel
//! limits and for why a bare IP packet reaches the program unchanged.

mod tier2;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use tier2::{Case, Prog, Programs, Shared, peer, ports};
use zt_common::{PeerCounters, reason};
use zt_tests::packet::{
    ETH_LEN, Ethernet, ExtHeader, IPV4_LEN, IPV6_LEN, Ipv4, Ipv6, TCP_LEN, Transport, arp_request,
    ethertype, icmp,
};
use ztxdp::policy::{Grant, Protocol, TunnelPolicy};

const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;

const ALICE_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const ALICE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 2);
const BOB_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
/// Inside bob's second prefix, 10.10.1.0/24.
const BOB_NET_HOST: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 77);
/// Inside carol's only prefix, `fd00:20::/64`: an IPv6-only peer.
const CAROL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0xab, 0xcd);
const UNKNOWN_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 99);
const UNKNOWN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x99);

const LOCAL_V4: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const LOCAL_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);

fn policy() -> TunnelPolicy {
    TunnelPolicy {
        interface: "wg0".into(),
        peers: vec![
            peer(
                "alice",
                &["10.10.0.2/32", "fd00:10::2/128"],
                vec![
                    ports(Protocol::Tcp, 5432, 5432),
                    ports(Protocol::Udp, 53, 53),
                    ports(Protocol::Tcp, 8000, 8010),
                    Grant::Icmp,
                ],
            ),
            peer(
                "bob",
                &["10.10.0.3/32", "10.10.1.0/24"],
                vec![ports(Protocol::Tcp, 443, 443)],
            ),
            // 5000..=5100 spans the 64-port words 78 and 79 (5056 = 79 * 64).
            peer(
                "carol",
                &["fd00:20::/64"],
                vec![
                    ports(Protocol::Udp, 5000, 5100),
                    ports(Protocol::Tcp, 22, 22),
                ],
            ),
        ],
        groups: Vec::new(),
        runtime_grants: "/nonexistent/runtime-grants.json".into(),
        link_local_neighbors: false,
        mode: ztxdp::policy::Mode::Enforce,
    }
}

static L3: Shared = Shared::new(|| Mutex::new(Programs::load(false, None, Some(&policy()))));
static L2: Shared = Shared::new(|| Mutex::new(Programs::load(true, None, Some(&policy()))));

/// What a tunnel packet carries, before it is framed for a mode.
enum Pkt {
    /// An IP packet: bare in L3 mode, in an Ethernet frame in L2 mode.
    Ip(Vec<u8>),
    /// Only meaningful with a link layer: L2 mode only.
    Frame(Vec<u8>),
    /// An IP packet judged in L3 mode only (where L2 mode decides otherwise).
    Bare(Vec<u8>),
}

fn ip(src: IpAddr, t: &Transport) -> Pkt {
    Pkt::Ip(match src {
        IpAddr::V4(a) => Ipv4::new(a, LOCAL_V4).packet(t),
        IpAddr::V6(a) => Ipv6::new(a, LOCAL_V6).packet(t),
    })
}

/// Runs every case through both modes.
fn expect(cases: Vec<(String, Pkt, u32)>) {
    let mut l3 = Vec::new();
    let mut l2 = Vec::new();
    for (name, pkt, want) in cases {
        match pkt {
            Pkt::Ip(p) => {
                let (ethertype, min) = if p.first().is_some_and(|b| b >> 4 == 6) {
                    (ethertype::IPV6, IPV6_LEN)
                } else {
                    (ethertype::IPV4, IPV4_LEN)
                };
                // The kernel refuses an untagged IP frame shorter than a
                // minimal IP header (see tier2/mod.rs), but not a tagged one.
                let (eth, label) = if p.len() < min {
                    (Ethernet::default().tag(ethertype::VLAN, 1), "l2 (vlan)")
                } else {
                    (Ethernet::default(), "l2")
                };
                l2.push(Case::new(
                    format!("{label} {name}"),
                    eth.frame(ethertype, &p),
                    want,
                ));
                l3.push(Case::new(format!("l3 {name}"), p, want));
            }
            Pkt::Frame(f) => l2.push(Case::new(format!("l2 {name}"), f, want)),
            Pkt::Bare(p) => l3.push(Case::new(format!("l3 {name}"), p, want)),
        }
    }
    if !l3.is_empty() {
        tier2::lock(&L3).expect_all(Prog::Tunnel, &l3);
    }
    tier2::lock(&L2).expect_all(Prog::Tunnel, &l2);
}

fn case(name: &str, pkt: Pkt, want: u32) -> (String, Pkt, u32) {
    (name.to_owned(), pkt, want)
}

fn tcp(dst: u16) -> Transport {
    Transport::tcp_syn(dst)
}

fn udp(dst: u16) -> Transport {
    Transport::udp(dst)
}

const ECHO: Transport = Transport::Icmp {
    kind: icmp::ECHO_REQUEST,
    code: 0,
};
const ECHO6: Transport = Transport::Icmp {
    kind: icmp::V6_ECHO_REQUEST,
    code: 0,
};

#[test]
fn port_grants_are_per_peer_and_protocol() {
    let a = IpAddr::V4(ALICE_V4);
    let b = IpAddr::V4(BOB_V4);
    expect(vec![
        case("alice tcp 5432", ip(a, &tcp(5432)), reason::PASS_GRANT),
        case(
            "alice tcp 5432 from v6",
            ip(IpAddr::V6(ALICE_V6), &tcp(5432)),
            reason::PASS_GRANT,
        ),
        case("alice tcp 22", ip(a, &tcp(22)), reason::DROP_NOT_GRANTED),
        case("alice udp 53", ip(a, &udp(53)), reason::PASS_GRANT),
        case(
            "alice tcp 53 (granted for udp only)",
            ip(a, &tcp(53)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "alice udp 5432 (granted for tcp only)",
            ip(a, &udp(5432)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "alice tcp 443 (bob's grant)",
            ip(a, &tcp(443)),
            reason::DROP_NOT_GRANTED,
        ),
        case("bob tcp 443", ip(b, &tcp(443)), reason::PASS_GRANT),
        case(
            "bob tcp 5432 (alice's grant)",
            ip(b, &tcp(5432)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "bob from his /24",
            ip(IpAddr::V4(BOB_NET_HOST), &tcp(443)),
            reason::PASS_GRANT,
        ),
        case("alice tcp 0", ip(a, &tcp(0)), reason::DROP_NOT_GRANTED),
        case(
            "alice udp 65535",
            ip(a, &udp(u16::MAX)),
            reason::DROP_NOT_GRANTED,
        ),
    ]);
}

#[test]
fn port_range_edges() {
    let a = IpAddr::V4(ALICE_V4);
    let c = IpAddr::V6(CAROL_V6);
    expect(vec![
        case(
            "tcp 7999 (first - 1)",
            ip(a, &tcp(7999)),
            reason::DROP_NOT_GRANTED,
        ),
        case("tcp 8000 (first)", ip(a, &tcp(8000)), reason::PASS_GRANT),
        case("tcp 8005", ip(a, &tcp(8005)), reason::PASS_GRANT),
        case("tcp 8010 (last)", ip(a, &tcp(8010)), reason::PASS_GRANT),
        case(
            "tcp 8011 (last + 1)",
            ip(a, &tcp(8011)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "udp 4999 (first - 1)",
            ip(c, &udp(4999)),
            reason::DROP_NOT_GRANTED,
        ),
        case("udp 5000 (first)", ip(c, &udp(5000)), reason::PASS_GRANT),
        case(
            "udp 5055 (end of a 64-port word)",
            ip(c, &udp(5055)),
            reason::PASS_GRANT,
        ),
        case(
            "udp 5056 (start of the next word)",
            ip(c, &udp(5056)),
            reason::PASS_GRANT,
        ),
        case("udp 5100 (last)", ip(c, &udp(5100)), reason::PASS_GRANT),
        case(
            "udp 5101 (last + 1)",
            ip(c, &udp(5101)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "tcp 5000 (range is udp only)",
            ip(c, &tcp(5000)),
            reason::DROP_NOT_GRANTED,
        ),
    ]);
}

#[test]
fn unknown_sources_are_dropped() {
    expect(vec![
        case(
            "unknown v4 tcp 5432",
            ip(IpAddr::V4(UNKNOWN_V4), &tcp(5432)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "unknown v6 tcp 5432",
            ip(IpAddr::V6(UNKNOWN_V6), &tcp(5432)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "unknown v4 echo",
            ip(IpAddr::V4(UNKNOWN_V4), &ECHO),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "next to bob's /24",
            ip(IpAddr::V4(Ipv4Addr::new(10, 10, 2, 1)), &tcp(443)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "next to carol's /64",
            ip(
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x20, 0, 1, 0, 0, 0, 1)),
                &udp(5000),
            ),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "alice's v4 as v4-mapped v6",
            ip(IpAddr::V6(ALICE_V4.to_ipv6_mapped()), &tcp(5432)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "unknown source, later fragment",
            Pkt::Ip(
                Ipv4::new(UNKNOWN_V4, LOCAL_V4)
                    .fragment(false, 4)
                    .packet(&tcp(5432)),
            ),
            reason::DROP_PEER_UNKNOWN,
        ),
    ]);
}

#[test]
fn icmp_echo_needs_the_icmp_grant() {
    expect(vec![
        case(
            "alice echo (icmp granted)",
            ip(IpAddr::V4(ALICE_V4), &ECHO),
            reason::PASS_ICMP_GRANT,
        ),
        case(
            "alice v6 echo (icmp granted)",
            ip(IpAddr::V6(ALICE_V6), &ECHO6),
            reason::PASS_ICMP_GRANT,
        ),
        case(
            "bob echo (no icmp grant)",
            ip(IpAddr::V4(BOB_V4), &ECHO),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "carol v6 echo (no icmp grant)",
            ip(IpAddr::V6(CAROL_V6), &ECHO6),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "alice echo reply",
            ip(
                IpAddr::V4(ALICE_V4),
                &Transport::Icmp {
                    kind: icmp::ECHO_REPLY,
                    code: 0,
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        case(
            "alice v4 icmp carrying the v6 echo type",
            ip(
                IpAddr::V4(ALICE_V4),
                &Transport::Icmp {
                    kind: icmp::V6_ECHO_REQUEST,
                    code: 0,
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        case(
            "alice v6 icmpv6 carrying the v4 echo type",
            ip(
                IpAddr::V6(ALICE_V6),
                &Transport::Icmp {
                    kind: icmp::ECHO_REQUEST,
                    code: 0,
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        case(
            "alice gre",
            ip(
                IpAddr::V4(ALICE_V4),
                &Transport::Raw {
                    protocol: 47,
                    bytes: vec![0; 8],
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
    ]);
}

#[test]
fn ipv6_peer_and_extension_headers() {
    let carol = || Ipv6::new(CAROL_V6, LOCAL_V6);
    expect(vec![
        case(
            "carol tcp 22",
            ip(IpAddr::V6(CAROL_V6), &tcp(22)),
            reason::PASS_GRANT,
        ),
        case(
            "carol tcp 23",
            ip(IpAddr::V6(CAROL_V6), &tcp(23)),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "carol tcp 22 behind hop-by-hop + routing + dest-opts",
            Pkt::Ip(
                carol()
                    .ext(ExtHeader::hop_by_hop(0))
                    .ext(ExtHeader::routing(2))
                    .ext(ExtHeader::dest_opts(0))
                    .packet(&tcp(22)),
            ),
            reason::PASS_GRANT,
        ),
        case(
            "carol first fragment udp 5000",
            Pkt::Ip(carol().ext(ExtHeader::fragment(0, true)).packet(&udp(5000))),
            reason::PASS_GRANT,
        ),
        case(
            "carol later fragment",
            Pkt::Ip(
                carol()
                    .ext(ExtHeader::fragment(9, false))
                    .packet(&udp(5000)),
            ),
            reason::DROP_FRAGMENT,
        ),
        case(
            "carol behind 7 extension headers",
            Pkt::Ip(
                (0..7)
                    .fold(carol(), |ip, _| ip.ext(ExtHeader::dest_opts(0)))
                    .packet(&tcp(22)),
            ),
            reason::DROP_HEADER_LIMIT,
        ),
        case(
            "alice v4 later fragment",
            Pkt::Ip(
                Ipv4::new(ALICE_V4, LOCAL_V4)
                    .fragment(true, 1)
                    .packet(&tcp(5432)),
            ),
            reason::DROP_FRAGMENT,
        ),
        case(
            "alice v4 first fragment",
            Pkt::Ip(
                Ipv4::new(ALICE_V4, LOCAL_V4)
                    .fragment(true, 0)
                    .packet(&tcp(5432)),
            ),
            reason::PASS_GRANT,
        ),
    ]);
}

/// An IPv6 ICMP message of `kind` from `src` with `hop_limit`.
fn icmp6(src: Ipv6Addr, kind: u8, hop_limit: u8) -> Vec<u8> {
    Ipv6::new(src, LOCAL_V6)
        .hop_limit(hop_limit)
        .packet(&Transport::Icmp { kind, code: 0 })
}

fn framed(ethertype: u16, payload: &[u8]) -> Pkt {
    Pkt::Frame(Ethernet::default().frame(ethertype, payload))
}

const LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 9);

/// ARP and neighbour messages pass only with a link layer, and only from a
/// peer's address; router messages never pass. On an L3 device nothing
/// passes that does not come from a peer.
#[test]
fn neighbour_messages_pass_only_from_peers() {
    let arp = |sender| arp_request([2, 0, 0, 0, 0, 7], sender, LOCAL_V4);
    let mut bad_arp = arp(ALICE_V4);
    bad_arp[4] = 5;
    let mut cases = vec![
        case(
            "arp from alice",
            framed(ethertype::ARP, &arp(ALICE_V4)),
            reason::PASS_ARP,
        ),
        case(
            "arp from no peer",
            framed(ethertype::ARP, &arp(UNKNOWN_V4)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "arp hlen 5",
            framed(ethertype::ARP, &bad_arp),
            reason::DROP_MALFORMED,
        ),
        case(
            "NS hop 64 from no peer",
            Pkt::Ip(icmp6(UNKNOWN_V6, icmp::V6_NEIGHBOR_SOLICIT, 64)),
            reason::DROP_PEER_UNKNOWN,
        ),
        case(
            "alice tcp 5432 in a vlan",
            Pkt::Frame(
                Ethernet::default()
                    .tag(ethertype::VLAN, 3)
                    .ipv4(&Ipv4::new(ALICE_V4, LOCAL_V4), &tcp(5432)),
            ),
            reason::PASS_GRANT,
        ),
        case(
            "unknown ethertype",
            Pkt::Frame(Ethernet::default().frame(0x88cc, &[0; 46])),
            reason::DROP_UNSUPPORTED_L3,
        ),
    ];
    for kind in [icmp::V6_NEIGHBOR_SOLICIT, icmp::V6_NEIGHBOR_ADVERT] {
        let from_alice = icmp6(ALICE_V6, kind, 255);
        let from_stranger = icmp6(UNKNOWN_V6, kind, 255);
        let from_link_local = icmp6(LINK_LOCAL, kind, 255);
        cases.extend([
            case(
                &format!("nd {kind} from alice"),
                framed(ethertype::IPV6, &from_alice),
                reason::PASS_NEIGHBOR_DISCOVERY,
            ),
            case(
                &format!("nd {kind} from alice"),
                Pkt::Bare(from_alice),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
            ),
            case(
                &format!("nd {kind} from no peer"),
                Pkt::Ip(from_stranger),
                reason::DROP_PEER_UNKNOWN,
            ),
            case(
                &format!("nd {kind} from link-local, not allowed"),
                Pkt::Ip(from_link_local),
                reason::DROP_PEER_UNKNOWN,
            ),
        ]);
    }
    // Router solicitation, advertisement and redirect, from a peer or not,
    // with the hop limit of ND or not: never.
    for kind in [
        icmp::V6_ROUTER_SOLICIT,
        icmp::V6_ROUTER_ADVERT,
        icmp::V6_REDIRECT,
    ] {
        for src in [ALICE_V6, LINK_LOCAL] {
            for hop_limit in [255, 64] {
                cases.push(case(
                    &format!("router message {kind} from {src} hop {hop_limit}"),
                    Pkt::Ip(icmp6(src, kind, hop_limit)),
                    reason::DROP_ROUTER_MESSAGE,
                ));
            }
        }
    }
    expect(cases);
}

/// `tunnel.link_local_neighbors` admits neighbour messages from `fe80::/10`
/// on an Ethernet tunnel device only.
#[test]
fn link_local_neighbours_pass_on_l2_when_the_config_allows() {
    let allowing = TunnelPolicy {
        link_local_neighbors: true,
        ..policy()
    };
    let ns = icmp6(LINK_LOCAL, icmp::V6_NEIGHBOR_SOLICIT, 255);
    let mut l2 = Programs::load(true, None, Some(&allowing));
    l2.expect_all(
        Prog::Tunnel,
        &[
            Case::new(
                "l2 ns from link-local",
                Ethernet::default().frame(ethertype::IPV6, &ns),
                reason::PASS_NEIGHBOR_DISCOVERY,
            ),
            Case::new(
                "l2 ns from a global stranger",
                Ethernet::default().frame(
                    ethertype::IPV6,
                    &icmp6(UNKNOWN_V6, icmp::V6_NEIGHBOR_SOLICIT, 255),
                ),
                reason::DROP_PEER_UNKNOWN,
            ),
            Case::new(
                "l2 ra from link-local",
                Ethernet::default().frame(
                    ethertype::IPV6,
                    &icmp6(LINK_LOCAL, icmp::V6_ROUTER_ADVERT, 255),
                ),
                reason::DROP_ROUTER_MESSAGE,
            ),
        ],
    );
    let mut l3 = Programs::load(false, None, Some(&allowing));
    l3.expect_all(
        Prog::Tunnel,
        &[Case::new(
            "l3 ns from link-local",
            ns,
            reason::DROP_PEER_UNKNOWN,
        )],
    );
}

#[test]
fn malformed_packets() {
    let alice = || Ipv4::new(ALICE_V4, LOCAL_V4);
    let full = alice().packet(&tcp(5432));
    let mut cases = Vec::new();
    // Every cut of a granted packet short of its TCP header; 14 bytes is
    // the shortest input BPF_PROG_TEST_RUN takes.
    for cut in ETH_LEN..IPV4_LEN + TCP_LEN {
        cases.push((
            format!("alice tcp 5432 cut to {cut}"),
            Pkt::Ip(full[..cut].to_vec()),
            reason::DROP_MALFORMED,
        ));
    }
    let v6 = Ipv6::new(ALICE_V6, LOCAL_V6).packet(&udp(53));
    for cut in [ETH_LEN, 39, 40, 47] {
        cases.push((
            format!("alice v6 udp 53 cut to {cut}"),
            Pkt::Ip(v6[..cut].to_vec()),
            reason::DROP_MALFORMED,
        ));
    }
    cases.extend([
        case(
            "ihl 4",
            Pkt::Ip(alice().ihl(4).packet(&tcp(5432))),
            reason::DROP_MALFORMED,
        ),
        case(
            "total_len < ihl * 4",
            Pkt::Ip(alice().total_len(19).packet(&tcp(5432))),
            reason::DROP_MALFORMED,
        ),
        case(
            "total_len ends inside tcp",
            Pkt::Ip(alice().total_len(39).packet(&tcp(5432))),
            reason::DROP_MALFORMED,
        ),
        case(
            "ihl 15 options hide a decoy port",
            Pkt::Ip(
                alice()
                    .options(&{
                        let mut o = vec![1u8; 40];
                        o[2..4].copy_from_slice(&5432u16.to_be_bytes());
                        o
                    })
                    .packet(&tcp(22)),
            ),
            reason::DROP_NOT_GRANTED,
        ),
        case(
            "doff 4",
            Pkt::Ip({
                let mut p = full.clone();
                p[IPV4_LEN + 12] = 4 << 4;
                p
            }),
            reason::DROP_MALFORMED,
        ),
    ]);
    // L3 only: the IP version nibble is the only type information there.
    let mut v5 = full.clone();
    v5[0] = 0x55;
    tier2::lock(&L3).expect_all(
        Prog::Tunnel,
        &[Case::new(
            "l3 ip version 5",
            v5,
            reason::DROP_UNSUPPORTED_L3,
        )],
    );
    expect(cases);
}

fn peer_counters(p: &Programs) -> Vec<PeerCounters> {
    p.tables
        .peer_counters(3)
        .unwrap_or_else(|e| panic!("reading peer counters: {e:?}"))
}

/// Decisions about a known peer move that peer's allowed or denied counter;
/// decisions without a peer move none.
#[test]
fn per_peer_counters_move() {
    let a = Ipv4::new(ALICE_V4, LOCAL_V4);
    let c = Ipv6::new(CAROL_V6, LOCAL_V6);
    // (packet, peer whose counter moves, allowed?)
    let steps: Vec<(Vec<u8>, Option<usize>, bool)> = vec![
        (a.packet(&tcp(5432)), Some(ALICE), true),
        (a.packet(&tcp(22)), Some(ALICE), false),
        (a.packet(&ECHO), Some(ALICE), true),
        (Ipv4::new(BOB_V4, LOCAL_V4).packet(&ECHO), Some(BOB), false),
        (c.packet(&udp(5050)), Some(CAROL), true),
        (
            c.clone()
                .ext(ExtHeader::fragment(3, false))
                .packet(&udp(5050)),
            Some(CAROL),
            false,
        ),
        (
            Ipv4::new(UNKNOWN_V4, LOCAL_V4).packet(&tcp(5432)),
            None,
            false,
        ),
        (a.clone().ihl(3).packet(&tcp(5432)), None, false),
    ];
    for (shared, l2) in [(&L3, false), (&L2, true)] {
        let mut p = tier2::lock(shared);
        for (i, (pkt, who, allowed)) in steps.iter().enumerate() {
            let input = if l2 {
                let t = if pkt[0] >> 4 == 6 {
                    ethertype::IPV6
                } else {
                    ethertype::IPV4
                };
                Ethernet::default().frame(t, pkt)
            } else {
                pkt.clone()
            };
            let before = peer_counters(&p);
            let run = p.run(Prog::Tunnel, &input);
            assert_eq!(
                reason::is_allow(run.reason),
                *allowed,
                "l2={l2} step {i}: reason {}",
                reason::name(run.reason)
            );
            let after = peer_counters(&p);
            let mut want = before.clone();
            if let Some(w) = who {
                if *allowed {
                    want[*w].allowed += 1;
                } else {
                    want[*w].denied += 1;
                }
            }
            assert_eq!(
                after, want,
                "l2={l2} step {i}: peer counters before {before:?}"
            );
        }
    }
}
