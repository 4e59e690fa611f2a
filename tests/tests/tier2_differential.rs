//! Tier 2 differential test: the kernel programs against the reference
//! model (`ztxdp::model`) on randomized and mutated packets, reason for
//! reason (and, for the tunnel, peer counter for peer). Needs root.
//!
//! Packets start as valid templates of every kind the parser knows (VLAN
//! stacks, IPv4 with options and fragments, IPv6 extension chains, TCP,
//! UDP, ICMP, ARP, unknown types), from addresses and to ports near the
//! policy's edges, and are then mutated: length and header-length fields,
//! extension header lengths and types, TCP data offset, fragment fields,
//! `EtherType` fields, random bytes, truncation, trailing bytes.
//!
//! The policies hold what a config can: edge services with nested and
//! overlapping sources of every prefix length the maps split on, and
//! tunnel groups with a runtime group grant, merged into each member's
//! grants as `up` merges them.
//!
//! Every packet is also put to `ztxdp explain`'s engine
//! (`ztxdp::explain::live::Live`), which reads the loaded programs' maps
//! into the model: its verdict must be the kernel's too.
//!
//! `ZT_DIFF_SEED` (a u64) picks the run; `ZT_DIFF_PACKETS` the number of
//! packets per program (default 100,000). Each packet is generated from the
//! seed and its own index, so a failure names both and is reproducible.

mod tier2;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::programs::ProgramError;
use tier2::{Programs, Rng, Run, env_count, env_seed, peer, ports};
use zt_common::{PeerCounters, reason};
use zt_tests::packet::{
    ETH_LEN, Ethernet, ExtHeader, IPV4_LEN, IPV6_LEN, Ipv4, Ipv6, Transport, arp_request,
    ethertype, ext, hex_dump, icmp,
};
use ztxdp::{
    audit::record::Program,
    explain::live::Live,
    grants::RuntimeGrants,
    loader,
    model::{self, EdgeModel, Explanation, TunnelModel},
    policy::{
        EchoRate, EdgePolicy, Grant, Group, Mode, PortRange, Protocol, Service, TunnelPolicy,
    },
};

const DEFAULT_SEED: u64 = 0x5eed_2a7e_d1ff_0001;
/// The interface `BPF_PROG_TEST_RUN` runs every packet on: the loopback.
const TEST_RUN_IFINDEX: u32 = 1;
const DEFAULT_PACKETS: usize = 100_000;

fn seed() -> u64 {
    env_seed("ZT_DIFF_SEED", DEFAULT_SEED)
}

fn packets() -> usize {
    env_count("ZT_DIFF_PACKETS", DEFAULT_PACKETS)
}

/// Addresses and ports the generator favours: the policy's own prefixes,
/// their neighbours, and anything.
struct Pools {
    v4: Vec<Ipv4Addr>,
    v6: Vec<Ipv6Addr>,
    ports: Vec<u16>,
}

impl Pools {
    fn v4(&self, r: &mut Rng) -> Ipv4Addr {
        if r.chance(85) {
            r.pick(&self.v4)
        } else {
            Ipv4Addr::from(r.next().to_le_bytes()[..4].try_into().unwrap_or([0; 4]))
        }
    }

    fn v6(&self, r: &mut Rng) -> Ipv6Addr {
        if r.chance(85) {
            r.pick(&self.v6)
        } else {
            let b: [u8; 16] = r.bytes(16).try_into().unwrap_or([0; 16]);
            Ipv6Addr::from(b)
        }
    }

    fn port(&self, r: &mut Rng) -> u16 {
        if r.chance(80) {
            r.pick(&self.ports)
        } else {
            r.u16()
        }
    }
}

/// Parses prefixes (or addresses); generic so that this crate needs no
/// `ipnet` dependency of its own.
fn nets<T: std::str::FromStr>(list: &[&str]) -> Vec<T>
where
    T::Err: std::fmt::Display,
{
    list.iter()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("{s}: {e}")))
        .collect()
}

fn range(protocol: Protocol, first: u16, last: u16) -> PortRange {
    PortRange {
        protocol,
        first,
        last,
    }
}

fn edge_policy() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![444, 51_820, 51_821, 65_535],
        ssh_port: 2222,
        // Overlapping prefixes on purpose: the longest match must not matter
        // for a set, but a wrong key would. Lengths on both sides of each
        // boundary of the IPv4 maps (/16 and shorter in blocks, /17-/24 as
        // /24s, /25-/32 as addresses) and several IPv6 lengths.
        ssh_allow: nets(&[
            "198.51.100.7/32",
            "203.0.113.0/24",
            "10.0.0.0/8",
            "10.1.2.0/24",
            "172.16.0.0/12",
            "100.64.0.0/17",
            "198.51.100.128/25",
            "192.168.10.16/28",
            "2001:db8:aa:1::/64",
            "2001:db8:dd:ff00::/56",
            "2001:db8:bb::/48",
            "2001:db8:cc::1/128",
        ]),
        // Services over the same prefixes and others: nested prefixes of
        // different services (the longest match must carry the shorter
        // prefix's services), a service sharing the ssh port, ranges, and
        // one open to everyone.
        services: vec![
            Service {
                name: "https".into(),
                ports: vec![
                    range(Protocol::Tcp, 443, 443),
                    range(Protocol::Udp, 8443, 8443),
                ],
                from: nets(&["0.0.0.0/0", "::/0"]),
            },
            Service {
                name: "admin".into(),
                ports: vec![range(Protocol::Tcp, 8000, 8100)],
                from: nets(&[
                    "10.1.2.0/24",
                    "203.0.0.0/8",
                    "172.20.0.0/16",
                    "100.64.127.0/24",
                    "2001:db8:aa::/48",
                ]),
            },
            Service {
                name: "alt-ssh".into(),
                ports: vec![
                    range(Protocol::Tcp, 2222, 2222),
                    range(Protocol::Udp, 2222, 2223),
                ],
                from: nets(&["10.0.0.0/9", "192.0.2.1/32", "2001:db8:bb:ff::/64"]),
            },
        ],
        icmp_echo: ECHO_OFF,
        mode: ztxdp::policy::Mode::Enforce,
    }
}

/// `EdgeModel` and `TunnelModel` keep no state (an empty flow table, a
/// full echo bucket per source, no fragmented datagram let through), so the
/// kernel runs with none that could change a verdict: echo is off, so every
/// echo request is refused whatever its bucket holds, the flow table stays
/// empty because no egress program runs here, and the fragment table is
/// emptied after every packet that passed (only a passing first fragment
/// fills it). The stateful paths are `tier2_flows.rs`'s.
const ECHO_OFF: EchoRate = EchoRate {
    ns_per_token: 0,
    burst: 0,
};

fn edge_pools() -> Pools {
    Pools {
        v4: [
            [198, 51, 100, 7],
            [198, 51, 100, 6],
            [198, 51, 100, 8],
            [203, 0, 113, 0],
            [203, 0, 113, 255],
            [203, 0, 112, 255],
            [203, 0, 114, 0],
            [10, 0, 0, 1],
            [10, 255, 255, 255],
            [11, 0, 0, 0],
            [9, 255, 255, 255],
            [10, 1, 2, 3],
            [192, 0, 2, 1],
            [172, 16, 0, 0],
            [172, 31, 255, 255],
            [172, 32, 0, 0],
            [172, 15, 255, 255],
            [172, 20, 1, 1],
            [100, 64, 0, 5],
            [100, 64, 127, 255],
            [100, 64, 128, 0],
            [198, 51, 100, 127],
            [198, 51, 100, 128],
            [198, 51, 100, 255],
            [192, 168, 10, 15],
            [192, 168, 10, 16],
            [192, 168, 10, 31],
            [192, 168, 10, 32],
        ]
        .into_iter()
        .map(Ipv4Addr::from)
        .collect(),
        v6: nets(&[
            "2001:db8:aa:1::1",
            "2001:db8:aa:1:ffff:ffff:ffff:ffff",
            "2001:db8:aa:2::",
            "2001:db8:aa::ffff",
            "2001:db8:bb:ffff::1",
            "2001:db8:bb:ff::5",
            "2001:db8:bc::1",
            "2001:db8:cc::1",
            "2001:db8:cc::2",
            "2001:db8:dd:ff12::1",
            "2001:db8:dd:fe00::1",
            "::ffff:198.51.100.7",
            "fe80::1",
        ]),
        ports: vec![
            0, 22, 442, 443, 444, 2221, 2222, 2223, 2224, 7999, 8000, 8050, 8100, 8101, 8443,
            51_819, 51_820, 51_821, 51_822, 65_534, 65_535,
        ],
    }
}

/// The tunnel policy as `up` enforces it: each peer's own grants, plus
/// those of its groups (`db` holds alice and carol, `ops` bob and dave, so
/// a grant reaches peers of both families through a group), plus a runtime
/// group grant (`ztxdp allow @db 6000-6001`), merged as `up` merges them.
fn tunnel_policy() -> TunnelPolicy {
    let configured = configured_tunnel_policy();
    let mut runtime = RuntimeGrants::default();
    runtime.allow_group("db", ports(Protocol::Tcp, 6000, 6001));
    let merged = runtime.apply(&configured);
    // The merge must have reached every member and no one else; the
    // model takes the merged grants, so it could not notice otherwise.
    let has = |peer: usize, g: &Grant| merged.peers[peer].grants.contains(g);
    let db = ports(Protocol::Tcp, 6432, 6432);
    let runtime_db = ports(Protocol::Tcp, 6000, 6001);
    let ops = ports(Protocol::Udp, 161, 162);
    assert!(has(0, &db) && has(2, &db) && !has(1, &db) && !has(3, &db));
    assert!(has(0, &runtime_db) && has(2, &runtime_db) && !has(1, &runtime_db));
    assert!(has(1, &ops) && has(3, &ops) && !has(0, &ops) && !has(2, &ops));
    merged
}

fn configured_tunnel_policy() -> TunnelPolicy {
    let tcp = |first, last| ports(Protocol::Tcp, first, last);
    let udp = |first, last| ports(Protocol::Udp, first, last);
    TunnelPolicy {
        interface: "wg0".into(),
        peers: vec![
            peer(
                "alice",
                &["10.10.0.2/32", "fd00:10::2/128"],
                vec![tcp(5432, 5432), udp(53, 53), tcp(8000, 8010), Grant::Icmp],
            ),
            peer(
                "bob",
                &["10.10.1.0/24"],
                vec![tcp(443, 443), tcp(60_000, 65_535)],
            ),
            peer(
                "carol",
                &["fd00:20::/64"],
                vec![udp(5000, 5100), tcp(1, 1023)],
            ),
            // Contains alice's /32: the longest prefix decides the peer.
            peer(
                "dave",
                &["10.10.0.0/16", "fd00:10::/32"],
                vec![udp(9999, 9999), Grant::Icmp],
            ),
        ],
        groups: vec![
            Group {
                name: "db".into(),
                members: vec![0, 2],
                grants: vec![tcp(6432, 6432)],
            },
            Group {
                name: "ops".into(),
                members: vec![1, 3],
                grants: vec![udp(161, 162), Grant::Icmp],
            },
        ],
        runtime_grants: "/nonexistent/runtime-grants.json".into(),
        // Exercises both sides of the rule: allowed on an L2 device, and
        // ignored on an L3 one, where only peers' packets pass.
        link_local_neighbors: true,
        mode: Mode::Enforce,
    }
}

/// The tunnel policy in audit mode for packets of no peer, with alice and
/// carol auditing and bob and dave enforcing: every packet's mode is its
/// peer's, or the program's.
fn audit_tunnel_policy() -> TunnelPolicy {
    let mut p = tunnel_policy();
    p.mode = Mode::Audit;
    for (i, peer) in p.peers.iter_mut().enumerate() {
        peer.mode = if i % 2 == 0 {
            Mode::Audit
        } else {
            Mode::Enforce
        };
    }
    p
}

/// Checks a run's would-drop flag against the model's mode (every drop a
/// mode audits passes, parse failures never do), and counts would-drops.
fn check_mode(
    what: &str,
    (mode, run): (Mode, &Run),
    would_drops: &mut BTreeMap<u32, usize>,
    (seed, i, input): (u64, usize, &[u8]),
) {
    if run.would_drop {
        *would_drops.entry(run.reason).or_default() += 1;
    }
    let want = model::would_drop(mode, run.reason);
    if run.would_drop != want {
        mismatch(
            what,
            seed,
            i,
            input,
            &format!(
                "{} with would-drop {}",
                reason::name(run.reason),
                run.would_drop
            ),
            &format!(
                "{} with would-drop {want} ({mode:?})",
                reason::name(run.reason)
            ),
        );
    }
}

/// Every drop reason a mode audits was seen as a would-drop, and no parse
/// failure ever was.
fn assert_audit_coverage(
    what: &str,
    would_drops: &BTreeMap<u32, usize>,
    by_reason: &BTreeMap<u32, usize>,
) {
    for code in by_reason.keys() {
        if reason::drops_in_audit(*code) {
            assert!(
                !would_drops.contains_key(code),
                "{what}: {} passed in audit mode",
                reason::name(*code)
            );
        }
    }
    let wanted: Vec<u32> = by_reason
        .keys()
        .copied()
        .filter(|&c| !reason::is_allow(c) && !reason::drops_in_audit(c))
        .collect();
    assert_coverage(&format!("{what}, would-drops"), would_drops, &wanted);
}

fn tunnel_pools() -> Pools {
    Pools {
        v4: [
            [10, 10, 0, 2],
            [10, 10, 0, 3],
            [10, 10, 1, 0],
            [10, 10, 1, 255],
            [10, 10, 2, 0],
            [10, 10, 255, 255],
            [10, 11, 0, 0],
            [10, 9, 255, 255],
            [192, 0, 2, 1],
        ]
        .into_iter()
        .map(Ipv4Addr::from)
        .collect(),
        v6: nets(&[
            "fd00:10::2",
            "fd00:10::3",
            "fd00:10:ffff::1",
            "fd00:11::1",
            "fd00:20::1",
            "fd00:20::ffff:ffff:ffff:ffff",
            "fd00:20:0:1::",
            "::ffff:10.10.0.2",
            "fe80::1",
        ]),
        ports: vec![
            0, 1, 22, 53, 54, 160, 161, 162, 163, 443, 444, 1023, 1024, 4999, 5000, 5055, 5056,
            5100, 5101, 5432, 5999, 6000, 6001, 6002, 6432, 7999, 8000, 8010, 8011, 9998, 9999,
            59_999, 60_000, 65_535,
        ],
    }
}

/// A generated packet and where its headers are, for the field mutations.
struct Sample {
    bytes: Vec<u8>,
    /// Start of the IP (or ARP) header; 0 for a bare IP packet.
    l3: usize,
    /// Offsets of the `EtherType` and TPID fields.
    ethertypes: Vec<usize>,
    ip: Ip,
    /// Start of the transport header, if the template has one.
    l4: Option<(usize, u8)>,
    /// Start of each IPv6 extension header.
    exts: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Ip {
    None,
    V4,
    V6,
}

fn transport(r: &mut Rng, pools: &Pools, v6: bool) -> Transport {
    match r.below(10) {
        0..=3 => Transport::Tcp {
            src: r.u16(),
            dst: pools.port(r),
            flags: r.pick(&[0x02, 0x10, 0x12, 0x01, 0x04]),
        },
        4..=6 => Transport::Udp {
            src: r.u16(),
            dst: pools.port(r),
        },
        7 | 8 => {
            let kinds: &[u8] = if v6 {
                &[
                    icmp::V6_ECHO_REQUEST,
                    129,
                    130,
                    131,
                    132,
                    143,
                    133,
                    134,
                    135,
                    136,
                    137,
                    138,
                    1,
                    2,
                    3,
                    4,
                ]
            } else {
                &[icmp::ECHO_REQUEST, icmp::ECHO_REPLY, 3, 11, 135]
            };
            Transport::Icmp {
                kind: if r.chance(90) {
                    r.pick(kinds)
                } else {
                    r.byte()
                },
                code: 0,
            }
        }
        _ => {
            // Protocols that cross the families (ICMP in IPv6, ICMPv6 in
            // IPv4) or carry nothing the verdicts read.
            let protocol = r.pick(&[1, 58, 47, 50, 51, 59, 132, 255, 0, 43, 44, 60]);
            let len = r.below(24);
            Transport::Raw {
                protocol,
                bytes: r.bytes(len),
            }
        }
    }
}

fn ext_chain(r: &mut Rng) -> Vec<ExtHeader> {
    let n = if r.chance(70) { r.below(4) } else { r.below(9) };
    (0..n)
        .map(|_| match r.below(5) {
            0 => ExtHeader::hop_by_hop(r.pick(&[0, 0, 1, 3])),
            1 => ExtHeader::routing(r.pick(&[0, 2, 4])),
            2 => ExtHeader::dest_opts(r.pick(&[0, 1, 2])),
            3 => ExtHeader::auth(r.pick(&[1, 2, 4, 6])),
            _ => ExtHeader::fragment(
                if r.chance(60) { 0 } else { r.u16() & 0x1fff },
                r.chance(50),
            ),
        })
        .collect()
}

fn ethernet(r: &mut Rng) -> Ethernet {
    let tags: &[u16] = match r.below(20) {
        0..=12 => &[],
        13..=15 => &[ethertype::VLAN],
        16 => &[ethertype::QINQ, ethertype::VLAN],
        17 => &[ethertype::VLAN, ethertype::VLAN],
        18 => &[ethertype::QINQ, ethertype::QINQ, ethertype::VLAN],
        _ => &[ethertype::VLAN, ethertype::VLAN, ethertype::VLAN],
    };
    tags.iter()
        .fold(Ethernet::default(), |e, &tpid| e.tag(tpid, r.u16()))
}

/// A valid packet of a random kind, in an Ethernet frame.
fn template(r: &mut Rng, pools: &Pools) -> Sample {
    let eth = ethernet(r);
    let l3 = eth.header_len();
    let ethertypes: Vec<usize> = (0..=eth.tags.len()).map(|i| 12 + 4 * i).collect();
    let sample = |bytes, ip, l4, exts| Sample {
        bytes,
        l3,
        ethertypes: ethertypes.clone(),
        ip,
        l4,
        exts,
    };
    match r.below(20) {
        0..=8 => {
            let t = transport(r, pools, false);
            let mut ip = Ipv4::new(pools.v4(r), Ipv4Addr::new(192, 0, 2, 254));
            ip.ttl = r.pick(&[64, 255, 1]);
            if r.chance(25) {
                let n = r.below(41);
                ip.options = if r.chance(50) { vec![1; n] } else { r.bytes(n) };
            }
            if r.chance(20) {
                ip = ip.fragment(
                    r.chance(50),
                    if r.chance(50) { 0 } else { r.u16() & 0x1fff },
                );
            }
            let hlen = IPV4_LEN + ip.options.len().div_ceil(4) * 4;
            let proto = t.protocol(false);
            sample(eth.ipv4(&ip, &t), Ip::V4, Some((l3 + hlen, proto)), vec![])
        }
        9..=16 => {
            let t = transport(r, pools, true);
            let mut ip = Ipv6::new(
                pools.v6(r),
                "2001:db8:ff::1".parse().unwrap_or(Ipv6Addr::LOCALHOST),
            );
            ip.hop_limit = r.pick(&[64, 255, 255, 1]);
            if r.chance(35) {
                ip.exts = ext_chain(r);
            }
            let mut at = l3 + IPV6_LEN;
            let mut exts = Vec::new();
            for h in &ip.exts {
                exts.push(at);
                at += h.bytes.len();
            }
            let proto = t.protocol(true);
            sample(eth.ipv6(&ip, &t), Ip::V6, Some((at, proto)), exts)
        }
        17 | 18 => sample(
            eth.frame(
                ethertype::ARP,
                &arp_request(
                    [2, 0, 0, 0, 0, 3],
                    pools.v4(r),
                    Ipv4Addr::new(192, 0, 2, 254),
                ),
            ),
            Ip::None,
            None,
            vec![],
        ),
        _ => {
            let et = r.pick(&[0x88cc, 0x8847, 0x0842, 0x0000, 0x05dc, 0x9100]);
            let len = r.below(64);
            sample(eth.frame(et, &r.bytes(len)), Ip::None, None, vec![])
        }
    }
}

/// A length field value near `honest`, or anything.
fn near(r: &mut Rng, honest: usize) -> u16 {
    let honest = i64::try_from(honest).unwrap_or(0);
    let delta = i64::try_from(r.below(41)).unwrap_or(0) - 20;
    if r.chance(85) {
        u16::try_from((honest + delta).clamp(0, 0xffff)).unwrap_or(0)
    } else {
        r.u16()
    }
}

/// Next-header values worth writing into a chain: every extension header
/// the parser walks, the end of the chain, and transports.
const NEXT_HEADERS: [u8; 10] = [
    ext::HOP_BY_HOP,
    ext::ROUTING,
    ext::FRAGMENT,
    ext::AUTH,
    ext::DEST_OPTS,
    ext::NONE,
    6,
    17,
    58,
    1,
];

/// Writes a big-endian `u16` at `at` if it fits.
fn set16(b: &mut [u8], at: usize, v: u16) {
    if let Some(field) = b.get_mut(at..at + 2) {
        field.copy_from_slice(&v.to_be_bytes());
    }
}

/// Applies a random handful of mutations; some samples stay valid.
fn mutate(r: &mut Rng, s: &mut Sample) {
    mutate_ip(r, s);
    mutate_l4(r, s);
    mutate_frame(r, s);
}

/// Length, header-length, version, fragment and next-header fields.
fn mutate_ip(r: &mut Rng, s: &mut Sample) {
    let (b, l3) = (&mut s.bytes, s.l3);
    if s.ip == Ip::V4 && b.len() > l3 + IPV4_LEN {
        if r.chance(10) {
            b[l3] = (b[l3] & 0xf0) | (r.byte() & 0x0f);
        }
        if r.chance(10) {
            let v = near(r, b.len() - l3);
            set16(b, l3 + 2, v);
        }
        if r.chance(6) {
            let extra = if r.chance(30) { r.u16() } else { 0 };
            let v = r.pick(&[0x2000, 0x4000, 0x0001, 0x1fff, 0x2001]) | extra;
            set16(b, l3 + 6, v);
        }
    }
    if s.ip == Ip::V6 && b.len() > l3 + IPV6_LEN {
        if r.chance(10) {
            let v = near(r, b.len() - l3 - IPV6_LEN);
            set16(b, l3 + 4, v);
        }
        if r.chance(5) {
            b[l3 + 6] = r.pick(&NEXT_HEADERS);
        }
    }
    if b.len() > l3 && r.chance(6) {
        b[l3] = (b[l3] & 0x0f) | (r.pick(&[4, 6, 0, 5, 15]) << 4);
    }
    if !s.exts.is_empty() && r.chance(30) {
        let at = r.pick(&s.exts);
        if at + 8 <= b.len() {
            match r.below(3) {
                0 => b[at] = r.pick(&NEXT_HEADERS),
                1 => b[at + 1] = if r.chance(70) { r.small(8) } else { r.byte() },
                _ => {
                    let v = r.u16();
                    set16(b, at + 2, v);
                }
            }
        }
    }
}

/// TCP data offset and ports.
fn mutate_l4(r: &mut Rng, s: &mut Sample) {
    let Some((at, proto)) = s.l4 else { return };
    let b = &mut s.bytes;
    if proto == zt_common::proto::TCP && at + 13 <= b.len() && r.chance(8) {
        b[at + 12] = r.small(16) << 4;
    }
    if (proto == zt_common::proto::TCP || proto == zt_common::proto::UDP) && r.chance(5) {
        let v = r.u16();
        set16(b, at + 2, v);
    }
}

/// `EtherType` fields, random bytes, truncation, trailing bytes.
fn mutate_frame(r: &mut Rng, s: &mut Sample) {
    let b = &mut s.bytes;
    if !s.ethertypes.is_empty() && r.chance(5) {
        let at = r.pick(&s.ethertypes);
        let types = [
            ethertype::VLAN,
            ethertype::QINQ,
            ethertype::IPV4,
            ethertype::IPV6,
            ethertype::ARP,
            0x9100,
        ];
        let v = r.pick(&types);
        set16(b, at, v);
    }
    if !b.is_empty() && r.chance(12) {
        for _ in 0..=r.below(4) {
            let at = r.below(b.len().min(96));
            b[at] = if r.chance(50) {
                b[at] ^ (1 << r.below(8))
            } else {
                r.byte()
            };
        }
    }
    if r.chance(15) {
        let len = ETH_LEN.max(r.below(b.len() + 1));
        b.truncate(len);
    }
    if r.chance(5) {
        let n = r.below(32);
        b.extend(r.bytes(n));
    }
}

/// Generates packet `index` of the run: an Ethernet frame, or with
/// `bare_ip` the packet from its IP header on. Never shorter than 14
/// bytes, the shortest input `BPF_PROG_TEST_RUN` takes.
fn generate(seed: u64, index: usize, pools: &Pools, bare_ip: bool) -> Vec<u8> {
    let mut r = Rng::for_packet(seed, index);
    let mut s = template(&mut r, pools);
    if bare_ip {
        let l3 = s.l3;
        s.bytes.drain(..l3);
        s.l3 = 0;
        s.ethertypes.clear();
        s.l4 = s.l4.map(|(at, p)| (at - l3, p));
        for e in &mut s.exts {
            *e -= l3;
        }
    }
    if r.chance(85) {
        mutate(&mut r, &mut s);
    }
    if s.bytes.len() < ETH_LEN {
        s.bytes.resize(ETH_LEN, 0);
    }
    s.bytes
}

/// The `EINVAL` a `SCHED_CLS` test run gives when bytes 12..14 claim IPv4
/// or IPv6 and a minimal header of that family does not fit (see
/// `tier2/mod.rs`); the program never runs, so there is nothing to compare.
fn kernel_refuses_skb(input: &[u8], err: &ProgramError) -> bool {
    let einval = matches!(err, ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::EINVAL));
    let claimed = u16::from_be_bytes([input[12], input[13]]);
    einval
        && ((claimed == ethertype::IPV4 && input.len() < ETH_LEN + IPV4_LEN)
            || (claimed == ethertype::IPV6 && input.len() < ETH_LEN + IPV6_LEN))
}

fn mismatch(what: &str, seed: u64, index: usize, input: &[u8], bpf: &str, model: &str) -> ! {
    panic!(
        "{what}: kernel and model disagree on packet {index} of seed {seed:#x} \
         (rerun with ZT_DIFF_SEED={seed:#x})\n  kernel: {bpf}\n  model:  {model}\n{}",
        hex_dump(input)
    );
}

/// What `ztxdp explain` reads of the loaded programs' policy.
fn live(progs: &Programs) -> Live {
    Live::read(&loader::map_ids(&progs.ebpf))
        .unwrap_or_else(|e| panic!("reading the programs' policy as explain does: {e:?}"))
}

/// `ztxdp explain`'s answer about `input`, read from the maps now.
fn explain(live: &Live, program: Program, input: &[u8]) -> Explanation {
    live.explain(program, input, TEST_RUN_IFINDEX, 0)
        .unwrap_or_else(|e| panic!("explain reading the tables: {e:?}\n{}", hex_dump(input)))
}

/// `ztxdp explain`'s answer about `input`, packet `index` of run `seed`,
/// must be the kernel's reason and (on the tunnel) the model's peer, which
/// the peer counters hold the kernel to.
fn expect_explained(
    what: &str,
    (seed, index): (u64, usize),
    input: &[u8],
    (reason, peer): (u32, Option<u32>),
    explained: &Explanation,
) {
    if (reason, peer) != (explained.reason, explained.peer) {
        mismatch(
            &format!("{what} (explain)"),
            seed,
            index,
            input,
            &format!("{} peer {peer:?}", reason::name(reason)),
            &format!(
                "{} peer {:?}",
                reason::name(explained.reason),
                explained.peer
            ),
        );
    }
}

/// Reasons each run must produce at least once, so a generator that stops
/// reaching a branch fails loudly instead of passing vacuously.
fn assert_coverage(what: &str, by_reason: &BTreeMap<u32, usize>, wanted: &[u32]) {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|c| !by_reason.contains_key(c))
        .map(|c| reason::name(*c))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: the generated packets never produced {missing:?}; counts {by_reason:?}"
    );
}

fn summary(by_reason: &BTreeMap<u32, usize>) -> String {
    by_reason
        .iter()
        .map(|(c, n)| format!("{}={n}", reason::name(*c)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn edge_program_matches_the_model() {
    edge_matches_the_model(Mode::Enforce);
}

#[test]
fn edge_program_matches_the_model_in_audit_mode() {
    edge_matches_the_model(Mode::Audit);
}

fn edge_matches_the_model(mode: Mode) {
    let what = format!("edge ({mode:?})");
    let (seed, n) = (seed(), packets() / if mode == Mode::Audit { 2 } else { 1 });
    let policy = EdgePolicy {
        mode,
        ..edge_policy()
    };
    let model = EdgeModel::new(&policy);
    let mut would_drops = BTreeMap::new();
    let pools = edge_pools();
    let mut progs = Programs::load(true, Some(&policy), None);
    let live = live(&progs);
    assert_eq!(
        live.mode(Program::Edge, None),
        mode,
        "explain reads the edge's mode"
    );
    let mut by_reason = BTreeMap::new();
    let start = Instant::now();
    for i in 0..n {
        let frame = generate(seed, i, &pools, false);
        let want = model.verdict(&frame);
        let explained = explain(&live, Program::Edge, &frame);
        let run = progs.edge(&frame).unwrap_or_else(|e| {
            panic!(
                "packet {i} of seed {seed:#x}: test run refused: {e:?}\n{}",
                hex_dump(&frame)
            )
        });
        let got = run.reason;
        if reason::is_allow(got) {
            progs.forget_fragments();
        }
        check_mode(
            &what,
            (model.mode(), &run),
            &mut would_drops,
            (seed, i, &frame),
        );
        if got != want {
            mismatch(
                &what,
                seed,
                i,
                &frame,
                reason::name(got),
                reason::name(want),
            );
        }
        expect_explained("edge", (seed, i), &frame, (got, None), &explained);
        *by_reason.entry(got).or_default() += 1;
    }
    eprintln!(
        "{what}: {n} packets in {:?}, seed {seed:#x}: {}; would-drops: {}",
        start.elapsed(),
        summary(&by_reason),
        summary(&would_drops)
    );
    if mode == Mode::Audit {
        assert_audit_coverage(&what, &would_drops, &by_reason);
    }
    assert_coverage(
        &what,
        &by_reason,
        &[
            reason::PASS_WIREGUARD,
            reason::PASS_SSH,
            reason::PASS_SERVICE,
            reason::PASS_ARP,
            reason::PASS_NEIGHBOR_DISCOVERY,
            reason::PASS_MLD,
            reason::DROP_PORT_NOT_ALLOWED,
            reason::DROP_SSH_SOURCE,
            reason::DROP_SERVICE_SOURCE,
            reason::DROP_MALFORMED,
            reason::DROP_FRAGMENT,
            reason::DROP_UNSUPPORTED_L3,
            reason::DROP_PROTOCOL_NOT_ALLOWED,
            reason::DROP_HEADER_LIMIT,
            reason::DROP_ICMP_RATE,
            reason::DROP_ICMP_UNRELATED,
        ],
    );
}

fn peer_counters(p: &Programs, peers: u32) -> Vec<PeerCounters> {
    p.tables
        .peer_counters(peers)
        .unwrap_or_else(|e| panic!("reading peer counters: {e:?}"))
}

#[expect(
    clippy::too_many_lines,
    reason = "one packet loop: run, model, explain and mode checks side by side"
)]
fn tunnel_matches_the_model(l2: bool, policy: &TunnelPolicy) {
    let what = &format!(
        "tunnel ({}, {:?})",
        if l2 { "l2" } else { "l3" },
        policy.mode
    );
    let audit = policy.mode == Mode::Audit;
    let (seed, n) = (seed(), packets() / if audit { 4 } else { 2 });
    let mut would_drops = BTreeMap::new();
    let peers = u32::try_from(policy.peers.len()).unwrap_or(u32::MAX);
    let model = TunnelModel::new(policy);
    let pools = tunnel_pools();
    let mut progs = Programs::load(l2, None, Some(policy));
    let live = live(&progs);
    let mut by_reason = BTreeMap::new();
    let mut refused = 0usize;
    let start = Instant::now();
    // Each packet's "after" is the next one's "before": one read a packet.
    let mut before = peer_counters(&progs, peers);
    for i in 0..n {
        let input = generate(seed, i, &pools, !l2);
        let want = model.verdict(&input, l2);
        let explained = explain(&live, Program::Tunnel, &input);
        assert_eq!(
            live.mode(Program::Tunnel, want.peer),
            model.mode_of(want.peer),
            "{what}: explain reads the mode of peer {:?}",
            want.peer
        );
        let got = match progs.tunnel(&input) {
            Ok(run) => {
                if reason::is_allow(run.reason) {
                    progs.forget_fragments();
                }
                let mode = model.mode_of(want.peer);
                check_mode(what, (mode, &run), &mut would_drops, (seed, i, &input));
                run.reason
            }
            Err(e) if kernel_refuses_skb(&input, &e) => {
                refused += 1;
                continue;
            }
            Err(e) => panic!(
                "{what}: packet {i} of seed {seed:#x}: test run refused: {e:?}\n{}",
                hex_dump(&input)
            ),
        };
        if got != want.reason {
            mismatch(
                what,
                seed,
                i,
                &input,
                reason::name(got),
                reason::name(want.reason),
            );
        }
        expect_explained(what, (seed, i), &input, (got, want.peer), &explained);
        let after = peer_counters(&progs, peers);
        let mut expected = std::mem::replace(&mut before, after.clone());
        if let Some(p) = want.peer {
            let c = &mut expected[p as usize];
            if reason::is_allow(got) {
                c.allowed += 1;
            } else {
                c.denied += 1;
            }
        }
        if after != expected {
            mismatch(
                what,
                seed,
                i,
                &input,
                &format!("peer counters {after:?}"),
                &format!("peer {:?}, counters {expected:?}", want.peer),
            );
        }
        *by_reason.entry(got).or_default() += 1;
    }
    eprintln!(
        "{what}: {n} packets in {:?} ({refused} refused by the kernel), seed {seed:#x}: {}; would-drops: {}",
        start.elapsed(),
        summary(&by_reason),
        summary(&would_drops)
    );
    if audit {
        assert_audit_coverage(what, &would_drops, &by_reason);
    }
    assert!(
        refused * 10 < n,
        "{what}: {refused} of {n} packets could not be run; the comparison is too thin"
    );
    let mut wanted = vec![
        reason::PASS_GRANT,
        reason::PASS_ICMP_GRANT,
        reason::DROP_MALFORMED,
        reason::DROP_FRAGMENT,
        reason::DROP_UNSUPPORTED_L3,
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        reason::DROP_HEADER_LIMIT,
        reason::DROP_PEER_UNKNOWN,
        reason::DROP_NOT_GRANTED,
        reason::DROP_ICMP_UNRELATED,
        reason::DROP_ROUTER_MESSAGE,
    ];
    // Neighbour messages pass only where there is a link layer.
    if l2 {
        wanted.extend([reason::PASS_ARP, reason::PASS_NEIGHBOR_DISCOVERY]);
    }
    assert_coverage(what, &by_reason, &wanted);
}

#[test]
fn tunnel_program_matches_the_model_with_ethernet() {
    tunnel_matches_the_model(true, &tunnel_policy());
}

#[test]
fn tunnel_program_matches_the_model_on_bare_ip() {
    tunnel_matches_the_model(false, &tunnel_policy());
}

#[test]
fn tunnel_program_matches_the_model_in_audit_mode_with_ethernet() {
    tunnel_matches_the_model(true, &audit_tunnel_policy());
}

#[test]
fn tunnel_program_matches_the_model_in_audit_mode_on_bare_ip() {
    tunnel_matches_the_model(false, &audit_tunnel_policy());
}
