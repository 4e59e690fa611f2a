//! Tier 2: `zt_edge` (XDP) run by the kernel on crafted frames through
//! `BPF_PROG_TEST_RUN`. Every case checks the reason counter that moved, not
//! only pass or drop (see `tier2/mod.rs`). Needs root.

mod tier2;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use tier2::{Case, Prog, Programs, Shared};
use zt_common::{limits, map, proto, reason};
use zt_tests::packet::{
    ETH_LEN, Ethernet, ExtHeader, IPV4_LEN, IPV6_LEN, Ipv4, Ipv6, TCP_LEN, Transport, arp_request,
    eth_v4, eth_v6, ethertype, icmp,
};
use ztxdp::policy::{EchoRate, EdgePolicy};

/// `BPF_F_MMAPABLE` (`uapi/linux/bpf.h`).
const BPF_F_MMAPABLE: u32 = 1 << 10;

const SSH: u16 = 22;
const WG: u16 = 51_820;
const WG2: u16 = 51_821;
const POSTGRES: u16 = 5432;

/// Allowed to SSH: a single IPv4 address, an IPv4 /24 and an IPv6 /64.
const SSH_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const SSH_V4_NET_HOST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 200);
const SSH_V6_NET_HOST: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 1, 0, 0, 0, 0x1234);
/// Not allowed: the neighbour of the /32, and the /64 next door.
const STRANGER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);
const STRANGER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 2, 0, 0, 0, 1);

const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1);

fn policy() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![WG, WG2],
        ssh_port: SSH,
        ssh_allow: ["198.51.100.7/32", "203.0.113.0/24", "2001:db8:aa:1::/64"]
            .iter()
            .map(|s| s.parse().unwrap_or_else(|e| panic!("prefix {s}: {e}")))
            .collect(),
        services: Vec::new(),
        icmp_echo: EchoRate::default(),
        mode: ztxdp::policy::Mode::Enforce,
    }
}

static PROGRAMS: Shared = Shared::new(|| Mutex::new(Programs::load(true, Some(&policy()), None)));

fn expect(cases: &[Case]) {
    tier2::lock(&PROGRAMS).expect_all(Prog::Edge, cases);
}

fn v4(src: Ipv4Addr) -> Ipv4 {
    Ipv4::new(src, HOST_V4)
}

fn v6(src: Ipv6Addr) -> Ipv6 {
    Ipv6::new(src, HOST_V6)
}

fn tcp(dst: u16) -> Transport {
    Transport::tcp_syn(dst)
}

fn udp(dst: u16) -> Transport {
    Transport::udp(dst)
}

#[test]
fn wireguard_ports_pass_from_anywhere_and_other_udp_ports_drop() {
    expect(&[
        Case::new(
            "udp 51820 v4",
            eth_v4(&v4(STRANGER_V4), &udp(WG)),
            reason::PASS_WIREGUARD,
        ),
        Case::new(
            "udp 51821 v4",
            eth_v4(&v4(STRANGER_V4), &udp(WG2)),
            reason::PASS_WIREGUARD,
        ),
        Case::new(
            "udp 51820 v6",
            eth_v6(&v6(STRANGER_V6), &udp(WG)),
            reason::PASS_WIREGUARD,
        ),
        Case::new(
            "udp 51819",
            eth_v4(&v4(STRANGER_V4), &udp(WG - 1)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "udp 51822",
            eth_v4(&v4(STRANGER_V4), &udp(WG2 + 1)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "udp 53",
            eth_v4(&v4(SSH_V4), &udp(53)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "udp 22 (ssh port, wrong protocol)",
            eth_v4(&v4(SSH_V4), &udp(SSH)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "udp 0",
            eth_v6(&v6(STRANGER_V6), &udp(0)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "udp 65535",
            eth_v6(&v6(STRANGER_V6), &udp(u16::MAX)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "tcp 51820 (wireguard port, wrong protocol)",
            eth_v4(&v4(SSH_V4), &tcp(WG)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
    ]);
}

#[test]
fn ssh_passes_only_from_allowed_sources() {
    expect(&[
        Case::new(
            "tcp 22 from allowed v4 /32",
            eth_v4(&v4(SSH_V4), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "tcp 22 from inside allowed v4 /24",
            eth_v4(&v4(SSH_V4_NET_HOST), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "tcp 22 from inside allowed v6 /64",
            eth_v6(&v6(SSH_V6_NET_HOST), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "tcp 22 from next to the /32",
            eth_v4(&v4(STRANGER_V4), &tcp(SSH)),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "tcp 22 from next /64",
            eth_v6(&v6(STRANGER_V6), &tcp(SSH)),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "tcp 22 from v4-mapped allowed address",
            eth_v6(&v6(SSH_V4.to_ipv6_mapped()), &tcp(SSH)),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "tcp 22 ack (not a new connection) from allowed",
            eth_v4(
                &v4(SSH_V4),
                &Transport::Tcp {
                    src: 40_000,
                    dst: SSH,
                    flags: zt_common::tcp_flag::ACK,
                },
            ),
            reason::PASS_SSH,
        ),
        Case::new(
            "tcp 5432 from allowed",
            eth_v4(&v4(SSH_V4), &tcp(POSTGRES)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "tcp 5432 from stranger",
            eth_v6(&v6(STRANGER_V6), &tcp(POSTGRES)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
    ]);
}

#[test]
fn arp_passes_when_well_formed() {
    let body = arp_request([2, 0, 0, 0, 0, 9], STRANGER_V4, HOST_V4);
    let eth = Ethernet::default();
    let with = |at: usize, value: u8| {
        let mut b = body.clone();
        b[at] = value;
        eth.frame(ethertype::ARP, &b)
    };
    expect(&[
        Case::new(
            "arp request",
            eth.frame(ethertype::ARP, &body),
            reason::PASS_ARP,
        ),
        Case::new(
            "arp in a vlan",
            eth.clone()
                .tag(ethertype::VLAN, 7)
                .frame(ethertype::ARP, &body),
            reason::PASS_ARP,
        ),
        Case::new("arp hlen 5", with(4, 5), reason::DROP_MALFORMED),
        Case::new("arp hlen 0", with(4, 0), reason::DROP_MALFORMED),
        Case::new("arp plen 16", with(5, 16), reason::DROP_MALFORMED),
        Case::new(
            "arp truncated to 27 bytes",
            eth.frame(ethertype::ARP, &body[..27]),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "arp with no body",
            eth.frame(ethertype::ARP, &[]),
            reason::DROP_MALFORMED,
        ),
    ]);
}

/// MLD (RFC 4890 4.4.1): queries and reports from a link-local source with
/// hop limit 1 pass; routed or from a global address they drop as before.
#[test]
fn mld_needs_a_link_local_source_and_hop_limit_1() {
    let link_local = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
    let mld = |src: Ipv6Addr, kind: u8, hop: u8| {
        eth_v6(
            &Ipv6::new(src, HOST_V6).hop_limit(hop),
            &Transport::Icmp { kind, code: 0 },
        )
    };
    let mut cases = Vec::new();
    for kind in [130, 131, 132, 143] {
        cases.extend([
            Case::new(
                format!("mld {kind} from fe80::1 hop 1"),
                mld(link_local, kind, 1),
                reason::PASS_MLD,
            ),
            Case::new(
                format!("mld {kind} from fe80::1 hop 64"),
                mld(link_local, kind, 64),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
            ),
            Case::new(
                format!("mld {kind} from a global source hop 1"),
                mld(STRANGER_V6, kind, 1),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
            ),
        ]);
    }
    cases.push(Case::new(
        "mld query behind hop-by-hop (router alert)",
        eth_v6(
            &Ipv6::new(link_local, HOST_V6)
                .hop_limit(1)
                .ext(ExtHeader::hop_by_hop(0)),
            &Transport::Icmp { kind: 130, code: 0 },
        ),
        reason::PASS_MLD,
    ));
    expect(&cases);
}

#[test]
fn neighbor_discovery_needs_hop_limit_255() {
    let nd = |kind: u8, hop: u8| {
        eth_v6(
            &v6(STRANGER_V6).hop_limit(hop),
            &Transport::Icmp { kind, code: 0 },
        )
    };
    expect(&[
        Case::new(
            "NS hop 255",
            nd(icmp::V6_NEIGHBOR_SOLICIT, 255),
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        Case::new(
            "NA hop 255",
            nd(icmp::V6_NEIGHBOR_ADVERT, 255),
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        Case::new(
            "RS hop 255 (first ND type)",
            nd(icmp::V6_ROUTER_SOLICIT, 255),
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        Case::new(
            "redirect hop 255 (last ND type)",
            nd(icmp::V6_REDIRECT, 255),
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        Case::new(
            "type 132 hop 255",
            nd(icmp::V6_ROUTER_SOLICIT - 1, 255),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "type 138 hop 255",
            nd(icmp::V6_REDIRECT + 1, 255),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "NS hop 64",
            nd(icmp::V6_NEIGHBOR_SOLICIT, 64),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "NS hop 254",
            nd(icmp::V6_NEIGHBOR_SOLICIT, 254),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "NS hop 255 behind hop-by-hop",
            eth_v6(
                &v6(STRANGER_V6).hop_limit(255).ext(ExtHeader::hop_by_hop(0)),
                &Transport::Icmp {
                    kind: icmp::V6_NEIGHBOR_SOLICIT,
                    code: 0,
                },
            ),
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        Case::new(
            "ICMPv4 with ND type number and TTL 255",
            eth_v4(
                &Ipv4 {
                    ttl: 255,
                    ..v4(STRANGER_V4)
                },
                &Transport::Icmp {
                    kind: icmp::V6_NEIGHBOR_SOLICIT,
                    code: 0,
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "ICMPv6 echo reply to no echo of ours",
            nd(icmp::V6_ECHO_REPLY, 64),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
    ]);
}

#[test]
fn other_protocols_drop() {
    let reply = Transport::Icmp {
        kind: icmp::ECHO_REPLY,
        code: 0,
    };
    let gre = Transport::Raw {
        protocol: 47,
        bytes: vec![0; 4],
    };
    expect(&[
        Case::new(
            "ICMP echo reply to no echo of ours",
            eth_v4(&v4(SSH_V4), &reply),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "ICMP type 13 (timestamp)",
            eth_v4(&v4(SSH_V4), &Transport::Icmp { kind: 13, code: 0 }),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "GRE",
            eth_v4(&v4(SSH_V4), &gre),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "IPv6 no next header",
            eth_v6(
                &v6(SSH_V6_NET_HOST),
                &Transport::Raw {
                    protocol: 59,
                    bytes: vec![],
                },
            ),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        Case::new(
            "unknown ethertype (LLDP)",
            Ethernet::default().frame(0x88cc, &[0; 46]),
            reason::DROP_UNSUPPORTED_L3,
        ),
        Case::new(
            "unknown ethertype (MPLS)",
            Ethernet::default().frame(0x8847, &[0; 46]),
            reason::DROP_UNSUPPORTED_L3,
        ),
        Case::new(
            "802.3 length field",
            Ethernet::default().frame(46, &[0; 46]),
            reason::DROP_UNSUPPORTED_L3,
        ),
        Case::new(
            "unknown ethertype inside a vlan",
            Ethernet::default()
                .tag(ethertype::VLAN, 1)
                .frame(0x88cc, &[0; 46]),
            reason::DROP_UNSUPPORTED_L3,
        ),
    ]);
}

/// Option bytes whose bytes 2..4 read as `fake` to a parser that assumes a
/// 20-byte header and takes the destination port from offset 22.
fn decoy_options(ihl: u8, fake: u16) -> Vec<u8> {
    let mut o = vec![1u8; (usize::from(ihl) - 5) * 4]; // NOPs
    o[2..4].copy_from_slice(&fake.to_be_bytes());
    o
}

#[test]
fn ipv4_options_are_skipped_by_ihl() {
    let mut cases = Vec::new();
    for ihl in 6..=15u8 {
        cases.push(Case::new(
            format!("ihl {ihl}: tcp 5432 with decoy 22 from allowed"),
            eth_v4(
                &v4(SSH_V4).options(&decoy_options(ihl, SSH)),
                &tcp(POSTGRES),
            ),
            reason::DROP_PORT_NOT_ALLOWED,
        ));
        cases.push(Case::new(
            format!("ihl {ihl}: tcp 22 with decoy 5432 from allowed"),
            eth_v4(
                &v4(SSH_V4).options(&decoy_options(ihl, POSTGRES)),
                &tcp(SSH),
            ),
            reason::PASS_SSH,
        ));
        cases.push(Case::new(
            format!("ihl {ihl}: udp 53 with decoy 51820"),
            eth_v4(&v4(STRANGER_V4).options(&decoy_options(ihl, WG)), &udp(53)),
            reason::DROP_PORT_NOT_ALLOWED,
        ));
        cases.push(Case::new(
            format!("ihl {ihl}: udp 51820 with decoy 53"),
            eth_v4(&v4(STRANGER_V4).options(&decoy_options(ihl, 53)), &udp(WG)),
            reason::PASS_WIREGUARD,
        ));
    }
    expect(&cases);
}

#[test]
fn ipv4_length_fields_are_checked() {
    let mut cases = Vec::new();
    for ihl in 0..5u8 {
        cases.push(Case::new(
            format!("ihl {ihl}"),
            eth_v4(&v4(SSH_V4).ihl(ihl), &tcp(SSH)),
            reason::DROP_MALFORMED,
        ));
    }
    let ihl_len = |ihl: u8| u16::from(ihl) * 4;
    for ihl in 5..=15u8 {
        let opts = vec![1u8; (usize::from(ihl) - 5) * 4];
        cases.push(Case::new(
            format!("ihl {ihl}, total_len one short of the header"),
            eth_v4(
                &v4(SSH_V4).options(&opts).total_len(ihl_len(ihl) - 1),
                &tcp(SSH),
            ),
            reason::DROP_MALFORMED,
        ));
        cases.push(Case::new(
            format!("ihl {ihl}, total_len ends inside tcp"),
            eth_v4(
                &v4(SSH_V4).options(&opts).total_len(ihl_len(ihl) + 19),
                &tcp(SSH),
            ),
            reason::DROP_MALFORMED,
        ));
        cases.push(Case::new(
            format!("ihl {ihl}, total_len exactly header + tcp"),
            eth_v4(
                &v4(SSH_V4).options(&opts).total_len(ihl_len(ihl) + 20),
                &tcp(SSH),
            ),
            reason::PASS_SSH,
        ));
    }
    cases.extend([
        Case::new(
            "total_len 0",
            eth_v4(&v4(SSH_V4).total_len(0), &tcp(SSH)),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "udp cut by total_len",
            eth_v4(&v4(STRANGER_V4).total_len(27), &udp(WG)),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "ihl 15 but only 20 header bytes in the frame",
            Ethernet::default().frame(
                ethertype::IPV4,
                &v4(SSH_V4).ihl(15).total_len(80).packet(&tcp(SSH))[..IPV4_LEN],
            ),
            reason::DROP_MALFORMED,
        ),
        // The frame ends before total_len says; the headers that are there
        // are complete, and nothing past them is read.
        Case::new(
            "total_len past the frame end",
            eth_v4(&v4(SSH_V4).total_len(1500), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        // Ethernet padding after the IP packet is normal and ignored.
        Case::new(
            "trailing ethernet padding",
            {
                let mut f = eth_v4(&v4(SSH_V4), &tcp(SSH));
                f.extend_from_slice(&[0; 20]);
                f
            },
            reason::PASS_SSH,
        ),
        Case::new(
            "version 6 in an IPv4 ethertype",
            eth_v4(
                &Ipv4 {
                    version: Some(6),
                    ..v4(SSH_V4)
                },
                &tcp(SSH),
            ),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "version 4 in an IPv6 ethertype",
            eth_v6(
                &Ipv6 {
                    version: Some(4),
                    ..v6(SSH_V6_NET_HOST)
                },
                &tcp(SSH),
            ),
            reason::DROP_MALFORMED,
        ),
    ]);
    expect(&cases);
}

#[test]
fn tcp_data_offset_below_five_is_malformed() {
    let mut cases = Vec::new();
    for doff in 0..5u8 {
        let mut f = eth_v4(&v4(SSH_V4), &tcp(SSH));
        f[ETH_LEN + IPV4_LEN + 12] = doff << 4;
        cases.push(Case::new(format!("doff {doff}"), f, reason::DROP_MALFORMED));
    }
    let mut f = eth_v4(&v4(SSH_V4), &tcp(SSH));
    f[ETH_LEN + IPV4_LEN + 12] = 5 << 4;
    cases.push(Case::new("doff 5", f, reason::PASS_SSH));
    expect(&cases);
}

/// Each frame cut at every length from the end of the Ethernet header to
/// one byte before `needed` must be malformed; from `needed` on (the end of
/// the last header the verdict reads) it must be judged as the whole frame,
/// since the length fields still describe the whole packet and trailing
/// bytes are never read.
#[test]
fn truncation_at_every_byte_is_malformed() {
    let vlan = Ethernet::default().tag(ethertype::VLAN, 5);
    let qinq = Ethernet::default()
        .tag(ethertype::QINQ, 5)
        .tag(ethertype::VLAN, 6);
    let reply = Transport::Icmp {
        kind: icmp::ECHO_REPLY,
        code: 0,
    };
    let ns = Transport::Icmp {
        kind: icmp::V6_NEIGHBOR_SOLICIT,
        code: 0,
    };
    let exts = v6(SSH_V6_NET_HOST)
        .ext(ExtHeader::hop_by_hop(1))
        .ext(ExtHeader::fragment(0, true));
    // (name, frame, bytes the verdict needs, reason of the whole frame)
    let templates: Vec<(&str, Vec<u8>, usize, u32)> = vec![
        (
            "v4 tcp",
            eth_v4(&v4(SSH_V4), &tcp(SSH)),
            ETH_LEN + IPV4_LEN + TCP_LEN,
            reason::PASS_SSH,
        ),
        (
            "v4 udp",
            eth_v4(&v4(SSH_V4), &udp(WG)),
            ETH_LEN + IPV4_LEN + 8,
            reason::PASS_WIREGUARD,
        ),
        (
            "v4 icmp",
            eth_v4(&v4(SSH_V4), &reply),
            ETH_LEN + IPV4_LEN + 8,
            reason::DROP_PROTOCOL_NOT_ALLOWED,
        ),
        (
            "v4 options tcp",
            eth_v4(&v4(SSH_V4).options(&[1; 8]), &tcp(SSH)),
            ETH_LEN + IPV4_LEN + 8 + TCP_LEN,
            reason::PASS_SSH,
        ),
        (
            "vlan v4 tcp",
            vlan.ipv4(&v4(SSH_V4), &tcp(SSH)),
            vlan.header_len() + IPV4_LEN + TCP_LEN,
            reason::PASS_SSH,
        ),
        (
            "qinq v4 udp",
            qinq.ipv4(&v4(SSH_V4), &udp(WG)),
            qinq.header_len() + IPV4_LEN + 8,
            reason::PASS_WIREGUARD,
        ),
        (
            "v6 tcp",
            eth_v6(&v6(SSH_V6_NET_HOST), &tcp(SSH)),
            ETH_LEN + IPV6_LEN + TCP_LEN,
            reason::PASS_SSH,
        ),
        (
            "v6 udp",
            eth_v6(&v6(STRANGER_V6), &udp(WG2)),
            ETH_LEN + IPV6_LEN + 8,
            reason::PASS_WIREGUARD,
        ),
        (
            "v6 icmp NS",
            eth_v6(&v6(STRANGER_V6).hop_limit(255), &ns),
            ETH_LEN + IPV6_LEN + 8,
            reason::PASS_NEIGHBOR_DISCOVERY,
        ),
        (
            "v6 ext tcp",
            eth_v6(&exts, &tcp(SSH)),
            ETH_LEN + IPV6_LEN + 16 + 8 + TCP_LEN,
            reason::PASS_SSH,
        ),
        (
            "arp",
            Ethernet::default().frame(ethertype::ARP, &arp_request([2; 6], SSH_V4, HOST_V4)),
            ETH_LEN + 28,
            reason::PASS_ARP,
        ),
    ];
    let mut cases = Vec::new();
    for (name, frame, needed, whole) in templates {
        for cut in ETH_LEN..frame.len() {
            let want = if cut < needed {
                reason::DROP_MALFORMED
            } else {
                whole
            };
            cases.push(Case::new(
                format!("{name} cut to {cut} of {}", frame.len()),
                frame[..cut].to_vec(),
                want,
            ));
        }
    }
    expect(&cases);
}

/// `BPF_PROG_TEST_RUN` refuses inputs shorter than an Ethernet header
/// (`EINVAL`), also when the rest is declared XDP metadata, so the parser's
/// own check on those cannot be reached here; a 14-byte frame is the
/// shortest the program can be given.
#[test]
fn frames_of_zero_to_fourteen_bytes() {
    let mut p = tier2::lock(&PROGRAMS);
    for len in 0..ETH_LEN {
        let before = p.counters(zt_common::program::EDGE);
        match p.edge(&vec![0u8; len]) {
            Err(aya::programs::ProgramError::SyscallError(e)) => {
                assert_eq!(
                    e.io_error.raw_os_error(),
                    Some(libc::EINVAL),
                    "{len}-byte frame: {e:?}"
                );
            }
            other => panic!(
                "{len}-byte frame: the kernel ran it ({other:?}); extend this test to check malformed"
            ),
        }
        assert_eq!(
            p.counters(zt_common::program::EDGE),
            before,
            "{len}-byte frame moved counters"
        );
    }
    drop(p);
    let eth_only = |t: u16| Ethernet::default().frame(t, &[]);
    expect(&[
        Case::new(
            "14 bytes, IPv4 ethertype",
            eth_only(ethertype::IPV4),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "14 bytes, IPv6 ethertype",
            eth_only(ethertype::IPV6),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "14 bytes, ARP ethertype",
            eth_only(ethertype::ARP),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "14 bytes, VLAN ethertype",
            eth_only(ethertype::VLAN),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "14 bytes, unknown ethertype",
            eth_only(0x1234),
            reason::DROP_UNSUPPORTED_L3,
        ),
        Case::new(
            "14 zero bytes",
            vec![0; ETH_LEN],
            reason::DROP_UNSUPPORTED_L3,
        ),
    ]);
}

#[test]
fn vlan_tags_are_walked_up_to_the_limit() {
    assert_eq!(
        limits::MAX_VLAN,
        2,
        "this test stacks one tag more than MAX_VLAN"
    );
    let ssh = |eth: Ethernet| eth.ipv4(&v4(SSH_V4), &tcp(SSH));
    let base = Ethernet::default;
    expect(&[
        Case::new(
            "802.1Q, allowed ssh",
            ssh(base().tag(ethertype::VLAN, 10)),
            reason::PASS_SSH,
        ),
        Case::new(
            "802.1Q, ssh from stranger",
            base()
                .tag(ethertype::VLAN, 10)
                .ipv4(&v4(STRANGER_V4), &tcp(SSH)),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "802.1ad + 802.1Q, allowed ssh",
            ssh(base().tag(ethertype::QINQ, 10).tag(ethertype::VLAN, 20)),
            reason::PASS_SSH,
        ),
        Case::new(
            "802.1ad + 802.1Q, v6 wireguard",
            base()
                .tag(ethertype::QINQ, 10)
                .tag(ethertype::VLAN, 20)
                .ipv6(&v6(STRANGER_V6), &udp(WG)),
            reason::PASS_WIREGUARD,
        ),
        Case::new(
            "802.1Q + 802.1Q, allowed ssh",
            ssh(base().tag(ethertype::VLAN, 10).tag(ethertype::VLAN, 20)),
            reason::PASS_SSH,
        ),
        Case::new(
            "three tags around allowed ssh",
            ssh(base()
                .tag(ethertype::QINQ, 1)
                .tag(ethertype::VLAN, 2)
                .tag(ethertype::VLAN, 3)),
            reason::DROP_HEADER_LIMIT,
        ),
        Case::new(
            "three tags around wireguard",
            base()
                .tag(ethertype::VLAN, 1)
                .tag(ethertype::VLAN, 2)
                .tag(ethertype::VLAN, 3)
                .ipv4(&v4(SSH_V4), &udp(WG)),
            reason::DROP_HEADER_LIMIT,
        ),
        Case::new(
            "two tags then 802.1ad ethertype with nothing after",
            base()
                .tag(ethertype::VLAN, 1)
                .tag(ethertype::VLAN, 2)
                .frame(ethertype::QINQ, &[]),
            reason::DROP_HEADER_LIMIT,
        ),
    ]);
}

#[test]
fn ipv4_fragments() {
    let gre = Transport::Raw {
        protocol: 47,
        bytes: vec![0; 8],
    };
    expect(&[
        Case::new(
            "first fragment, tcp 22 from allowed",
            eth_v4(&v4(SSH_V4).fragment(true, 0), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "first fragment, tcp 5432",
            eth_v4(&v4(SSH_V4).fragment(true, 0), &tcp(POSTGRES)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "first fragment, tcp 22 from stranger",
            eth_v4(&v4(STRANGER_V4).fragment(true, 0), &tcp(SSH)),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "first fragment, wireguard",
            eth_v4(&v4(STRANGER_V4).fragment(true, 0), &udp(WG)),
            reason::PASS_WIREGUARD,
        ),
        Case::new(
            "middle fragment that looks like wireguard",
            eth_v4(&v4(STRANGER_V4).fragment(true, 1), &udp(WG)),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "last fragment that looks like ssh",
            eth_v4(&v4(SSH_V4).fragment(false, 185), &tcp(SSH)),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "largest offset",
            eth_v4(&v4(SSH_V4).fragment(false, 0x1fff), &tcp(SSH)),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "later fragment with no bytes after the header",
            eth_v4(
                &v4(SSH_V4).fragment(false, 8).total_len(20),
                &Transport::Raw {
                    protocol: proto::TCP,
                    bytes: vec![],
                },
            ),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "later fragment of another protocol",
            eth_v4(&v4(SSH_V4).fragment(true, 3), &gre),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "DF bit set is not a fragment",
            {
                let mut f = eth_v4(&v4(SSH_V4), &tcp(SSH));
                f[ETH_LEN + 6] |= 0x40;
                f
            },
            reason::PASS_SSH,
        ),
    ]);
}

#[test]
fn ipv6_extension_headers() {
    let allowed = || v6(SSH_V6_NET_HOST);
    expect(&[
        Case::new(
            "hop-by-hop + routing + dest-opts, tcp 22 from allowed",
            eth_v6(
                &allowed()
                    .ext(ExtHeader::hop_by_hop(0))
                    .ext(ExtHeader::routing(2))
                    .ext(ExtHeader::dest_opts(1)),
                &tcp(SSH),
            ),
            reason::PASS_SSH,
        ),
        Case::new(
            "hop-by-hop + routing + dest-opts, tcp 22 from stranger",
            eth_v6(
                &v6(STRANGER_V6)
                    .ext(ExtHeader::hop_by_hop(0))
                    .ext(ExtHeader::routing(2))
                    .ext(ExtHeader::dest_opts(1)),
                &tcp(SSH),
            ),
            reason::DROP_SSH_SOURCE,
        ),
        Case::new(
            "hop-by-hop + routing + dest-opts, tcp 5432",
            eth_v6(
                &allowed()
                    .ext(ExtHeader::hop_by_hop(0))
                    .ext(ExtHeader::routing(2))
                    .ext(ExtHeader::dest_opts(1)),
                &tcp(POSTGRES),
            ),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "auth header, tcp 22",
            eth_v6(&allowed().ext(ExtHeader::auth(4)), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "fragment offset 0 (more), tcp 22",
            eth_v6(&allowed().ext(ExtHeader::fragment(0, true)), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "fragment offset 0 (atomic), tcp 22",
            eth_v6(&allowed().ext(ExtHeader::fragment(0, false)), &tcp(SSH)),
            reason::PASS_SSH,
        ),
        Case::new(
            "fragment offset 0, tcp 5432",
            eth_v6(&allowed().ext(ExtHeader::fragment(0, true)), &tcp(POSTGRES)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "fragment offset 1, tcp 22",
            eth_v6(&allowed().ext(ExtHeader::fragment(1, true)), &tcp(SSH)),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "fragment offset 8191, wireguard",
            eth_v6(
                &v6(STRANGER_V6).ext(ExtHeader::fragment(0x1fff, false)),
                &udp(WG),
            ),
            reason::DROP_FRAGMENT,
        ),
        Case::new(
            "two fragment headers",
            eth_v6(
                &allowed()
                    .ext(ExtHeader::fragment(0, true))
                    .ext(ExtHeader::fragment(0, true)),
                &tcp(SSH),
            ),
            reason::DROP_MALFORMED,
        ),
        Case::new(
            "later fragment after hop-by-hop",
            eth_v6(
                &allowed()
                    .ext(ExtHeader::hop_by_hop(0))
                    .ext(ExtHeader::fragment(2, false)),
                &tcp(SSH),
            ),
            reason::DROP_FRAGMENT,
        ),
    ]);
}

#[test]
fn ipv6_extension_header_limits_and_lengths() {
    let allowed = || v6(SSH_V6_NET_HOST);
    let chain = |n: usize| {
        let mut ip = allowed();
        for i in 0..n {
            ip = ip.ext(if i % 2 == 0 {
                ExtHeader::dest_opts(0)
            } else {
                ExtHeader::hop_by_hop(1)
            });
        }
        ip
    };
    let mut cases = Vec::new();
    assert_eq!(
        limits::MAX_IPV6_EXT,
        6,
        "the chains below are built around MAX_IPV6_EXT"
    );
    for n in 1..=6 {
        cases.push(Case::new(
            format!("{n} extension headers, tcp 22"),
            eth_v6(&chain(n), &tcp(SSH)),
            reason::PASS_SSH,
        ));
    }
    cases.push(Case::new(
        "7 extension headers, tcp 22",
        eth_v6(&chain(7), &tcp(SSH)),
        reason::DROP_HEADER_LIMIT,
    ));
    cases.push(Case::new(
        "8 extension headers, wireguard",
        eth_v6(&chain(8), &udp(WG)),
        reason::DROP_HEADER_LIMIT,
    ));

    // payload_len claims less than the chain: the header crosses the end of
    // the IPv6 payload even though the frame has the bytes.
    let ext_tcp = allowed().ext(ExtHeader::hop_by_hop(1));
    let full = u16::try_from(16 + TCP_LEN).unwrap_or(u16::MAX);
    for len in [0u16, 7, 8, 15] {
        cases.push(Case::new(
            format!("payload_len {len} ends inside a 16-byte hop-by-hop"),
            eth_v6(&ext_tcp.clone().payload_len(len), &tcp(SSH)),
            reason::DROP_MALFORMED,
        ));
    }
    cases.push(Case::new(
        "payload_len ends inside tcp",
        eth_v6(&ext_tcp.clone().payload_len(full - 1), &tcp(SSH)),
        reason::DROP_MALFORMED,
    ));
    cases.push(Case::new(
        "payload_len exact",
        eth_v6(&ext_tcp.clone().payload_len(full), &tcp(SSH)),
        reason::PASS_SSH,
    ));
    // An extension header whose length runs past the frame.
    let mut long = allowed().ext(ExtHeader::hop_by_hop(200));
    long.payload_len = Some(u16::MAX);
    let mut f = eth_v6(&long, &tcp(SSH));
    f.truncate(ETH_LEN + IPV6_LEN + 64);
    cases.push(Case::new(
        "hop-by-hop of 1608 bytes in a short frame",
        f,
        reason::DROP_MALFORMED,
    ));
    expect(&cases);
}

/// Loaded without an edge policy, the program must drop everything, ARP
/// included.
#[test]
fn unconfigured_program_drops_everything() {
    let mut p = Programs::load(true, None, None);
    let frames = [
        eth_v4(&v4(SSH_V4), &tcp(SSH)),
        eth_v4(&v4(STRANGER_V4), &udp(WG)),
        Ethernet::default().frame(ethertype::ARP, &arp_request([2; 6], SSH_V4, HOST_V4)),
        eth_v6(
            &v6(STRANGER_V6).hop_limit(255),
            &Transport::Icmp {
                kind: icmp::V6_NEIGHBOR_SOLICIT,
                code: 0,
            },
        ),
    ];
    let cases: Vec<Case> = frames
        .into_iter()
        .enumerate()
        .map(|(i, f)| Case::new(format!("frame {i}"), f, reason::DROP_NOT_CONFIGURED))
        .collect();
    p.expect_all(Prog::Edge, &cases);
    // Parse failures are still told apart from "not configured".
    p.expect_all(
        Prog::Edge,
        &[Case::new(
            "unknown ethertype",
            Ethernet::default().frame(0x1234, &[0; 46]),
            reason::DROP_UNSUPPORTED_L3,
        )],
    );
}

#[test]
fn every_map_name_exists_in_the_object() {
    let names = [
        map::EDGE_UDP_PORTS,
        map::SERVICE_PORTS,
        map::SOURCES_V4_16,
        map::SOURCES_V4_24,
        map::SOURCES_V4_32,
        map::SOURCES_V6,
        map::SOURCE_V6_LENGTHS,
        map::SERVICE_SOURCES_V6,
        map::CPU_STATE,
        map::EVENTS,
        map::PEER_HOSTS_V4,
        map::PEER_HOSTS_V6,
        map::PEER_V4,
        map::PEER_V6,
        map::GRANTS,
        map::PEER_COUNTERS,
        map::FLOWS,
        map::FLOW_CONFIG,
        map::ECHO_BUCKETS,
        map::SUMMARIES,
        map::SUMMARY_CACHE,
        map::LOCAL_PORTS,
        map::FRAGMENTS,
    ];
    let ebpf = ztxdp::loader::load(ztxdp::loader::LoadOptions::default())
        .unwrap_or_else(|e| panic!("loading (tests must run as root): {e:?}"));
    for name in names {
        assert!(
            name.len() < 16,
            "map name {name} is longer than the kernel keeps"
        );
        assert!(
            ebpf.map(name).is_some(),
            "map {name} from zt_common::map is missing from the object"
        );
    }
    // The other direction: a map in the object that zt_common does not
    // name could not be reached by user space. Sections (.rodata, .bss)
    // are global data, not maps of ours.
    let unknown: Vec<&str> = ebpf
        .maps()
        .map(|(n, _)| n)
        .filter(|n| !n.starts_with('.') && !names.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "maps not named in zt_common::map: {unknown:?}"
    );
    // The per-CPU state is indexed by CPU number: every possible CPU needs
    // its entry, or the programs on it would drop everything (fail closed).
    // The state array has user space's ledger after them.
    let cpus = ztxdp::loader::cpu_slots().unwrap_or_else(|e| panic!("{e:?}"));
    for (name, per_cpu, more) in [
        (map::CPU_STATE, 1, 1),
        (map::SUMMARY_CACHE, zt_common::SUMMARY_CACHE_SLOTS, 0),
    ] {
        let info = match ebpf.map(name) {
            Some(aya::maps::Map::Array(m)) => m.info(),
            other => panic!("{name} is not an array: {other:?}"),
        }
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(
            info.max_entries(),
            cpus * per_cpu + more,
            "{name} is not sized to the possible CPUs"
        );
        // Mmapable arrays keep their values page-aligned, so the 64-byte
        // entries do not straddle cache lines.
        assert_ne!(
            info.map_flags() & BPF_F_MMAPABLE,
            0,
            "{name} is not mmapable"
        );
    }
}
