use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use zt_common::{limits, proto, tcp_flag};

use super::parse::{
    ETHERNET_LEN, ETHERTYPE_8021AD, ETHERTYPE_8021Q, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
    ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_LEN, ICMPV6_DEST_UNREACHABLE, ICMPV6_ECHO_REPLY,
    ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, IPV4_LEN, IPV6_AUTH,
    IPV6_DEST_OPTS, IPV6_FRAGMENT, IPV6_HOP_BY_HOP, IPV6_LEN, IPV6_ROUTING, TCP_LEN, UDP_LEN,
};
use super::*;
use crate::policy::{EchoRate, EdgePolicy, FlowSettings, Peer, Protocol, TunnelPolicy};

/// The interface every test packet uses; the kernel keys flows by it too.
const TEST_IF: u32 = 2;

// Packet builders. Checksums are left zero: neither program reads them.

const ALLOWED_V4: [u8; 4] = [10, 77, 0, 2];
const OTHER_V4: [u8; 4] = [198, 51, 100, 9];
const ALLOWED_V6: &str = "fd77::2";
const OTHER_V6: &str = "2001:db8::9";
/// The protected host.
const HOST_V4: [u8; 4] = [10, 77, 0, 1];
const HOST_V6: &str = "fd77::1";

fn addr6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().expect("test address").octets()
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    tagged(&[], ethertype, payload)
}

/// An Ethernet frame with VLAN tags `tags` (their TPIDs, outermost first).
fn tagged(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for tpid in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&[0x00, 0x64]); // VLAN 100
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(hardware_len: u8, protocol_len: u8) -> Vec<u8> {
    let mut a = vec![0, 1, 0x08, 0x00, hardware_len, protocol_len, 0, 1];
    a.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 10, 77, 0, 2]);
    a.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 77, 0, 1]);
    a
}

/// IPv4 to the host with `options` (a multiple of 4 bytes) and an honest length.
fn ipv4(src: [u8; 4], protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    ipv4_between(src, HOST_V4, protocol, options, l4)
}

fn ipv4_between(src: [u8; 4], dst: [u8; 4], protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
    let header_len = IPV4_LEN + options.len();
    let total = u16::try_from(header_len + l4.len()).expect("test packet fits");
    let ihl = u8::try_from(header_len / 4).expect("test IHL");
    let mut p = vec![0x40 | ihl, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]); // id 1, DF
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(options);
    p.extend_from_slice(l4);
    p
}

/// IPv6 to the host whose payload is `rest` (extension headers and L4),
/// hop limit 64.
fn ipv6(src: [u8; 16], next: u8, rest: &[u8]) -> Vec<u8> {
    ipv6_between(src, addr6(HOST_V6), next, rest)
}

fn ipv6_between(src: [u8; 16], dst: [u8; 16], next: u8, rest: &[u8]) -> Vec<u8> {
    let len = u16::try_from(rest.len()).expect("test packet fits");
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[next, 64]);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(rest);
    p
}

/// A hop-by-hop, routing or destination options header of `len` bytes
/// (a multiple of 8).
fn extension(next: u8, len: usize) -> Vec<u8> {
    let mut e = vec![0u8; len];
    e[0] = next;
    e[1] = u8::try_from(len / 8 - 1).expect("test extension length");
    e
}

/// An authentication header of `len` bytes (a multiple of 4, at least 12).
fn auth(next: u8, len: usize) -> Vec<u8> {
    let mut e = vec![0u8; len];
    e[0] = next;
    e[1] = u8::try_from(len / 4 - 2).expect("test AH length");
    e
}

/// A fragment header at `offset` 8-byte units, more-fragments set.
fn fragment(next: u8, offset: u16) -> Vec<u8> {
    let mut e = vec![next, 0];
    e.extend_from_slice(&(offset << 3 | 1).to_be_bytes());
    e.extend_from_slice(&[0, 0, 0, 7]);
    e
}

fn tcp(dst: u16) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40];
    t.extend_from_slice(&dst.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

fn udp(dst: u16) -> Vec<u8> {
    let mut u = vec![0x9c, 0x40];
    u.extend_from_slice(&dst.to_be_bytes());
    u.extend_from_slice(&[0, 8, 0, 0]);
    u
}

fn icmp(kind: u8) -> Vec<u8> {
    vec![kind, 0, 0, 0, 0, 1, 0, 1]
}

fn eth4(src: [u8; 4], protocol: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(ETHERTYPE_IPV4, &ipv4(src, protocol, &[], l4))
}

fn eth6(src: &str, next: u8, rest: &[u8]) -> Vec<u8> {
    ethernet(ETHERTYPE_IPV6, &ipv6(addr6(src), next, rest))
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

fn edge() -> EdgeModel {
    EdgeModel::new(&edge_policy())
}

fn edge_policy() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![51820, 51821],
        ssh_port: 22,
        ssh_allow: vec![net("10.77.0.2/32"), net("fd77::/64")],
        services: Vec::new(),
        icmp_echo: EchoRate::default(),
        mode: crate::policy::Mode::Enforce,
    }
}

fn assert_edge(model: &EdgeModel, frame: &[u8], want: u32, what: &str) {
    let got = model.verdict(frame);
    assert_eq!(
        reason::name(got),
        reason::name(want),
        "{what}: frame {frame:02x?}"
    );
}

#[test]
fn edge_passes_wireguard_and_drops_other_udp() {
    let m = edge();
    assert_edge(
        &m,
        &eth4(OTHER_V4, proto::UDP, &udp(51820)),
        reason::PASS_WIREGUARD,
        "v4 wireguard",
    );
    assert_edge(
        &m,
        &eth4(OTHER_V4, proto::UDP, &udp(51821)),
        reason::PASS_WIREGUARD,
        "second port",
    );
    assert_edge(
        &m,
        &eth6(OTHER_V6, proto::UDP, &udp(51820)),
        reason::PASS_WIREGUARD,
        "v6 wireguard",
    );
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, proto::UDP, &udp(53)),
        reason::DROP_PORT_NOT_ALLOWED,
        "udp 53",
    );
    assert_edge(
        &m,
        &eth4(OTHER_V4, proto::UDP, &udp(22)),
        reason::DROP_PORT_NOT_ALLOWED,
        "udp 22 is not ssh",
    );
}

#[test]
fn edge_lets_only_allowed_sources_reach_ssh() {
    let m = edge();
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, proto::TCP, &tcp(22)),
        reason::PASS_SSH,
        "v4 allowed",
    );
    assert_edge(
        &m,
        &eth4(OTHER_V4, proto::TCP, &tcp(22)),
        reason::DROP_SSH_SOURCE,
        "v4 other",
    );
    assert_edge(
        &m,
        &eth6(ALLOWED_V6, proto::TCP, &tcp(22)),
        reason::PASS_SSH,
        "v6 allowed",
    );
    assert_edge(
        &m,
        &eth6("fd77::ffff:1", proto::TCP, &tcp(22)),
        reason::PASS_SSH,
        "v6 inside /64",
    );
    assert_edge(
        &m,
        &eth6(OTHER_V6, proto::TCP, &tcp(22)),
        reason::DROP_SSH_SOURCE,
        "v6 other",
    );
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, proto::TCP, &tcp(80)),
        reason::DROP_PORT_NOT_ALLOWED,
        "tcp 80",
    );
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, proto::TCP, &tcp(51820)),
        reason::DROP_PORT_NOT_ALLOWED,
        "tcp wg",
    );
    // An IPv4-mapped address is IPv6 to the kernel: no match in the v4 list.
    assert_edge(
        &m,
        &eth6("::ffff:10.77.0.2", proto::TCP, &tcp(22)),
        reason::DROP_SSH_SOURCE,
        "mapped",
    );
}

#[test]
fn edge_passes_arp_and_neighbor_discovery_only() {
    let m = edge();
    assert_edge(
        &m,
        &ethernet(ETHERTYPE_ARP, &arp(6, 4)),
        reason::PASS_ARP,
        "arp",
    );
    let mut ns = eth6(OTHER_V6, proto::ICMPV6, &icmp(135));
    ns[ETHERNET_LEN + 7] = 255;
    assert_edge(
        &m,
        &ns,
        reason::PASS_NEIGHBOR_DISCOVERY,
        "neighbour solicitation",
    );
    for kind in [133, 137] {
        let mut nd = eth6(OTHER_V6, proto::ICMPV6, &icmp(kind));
        nd[ETHERNET_LEN + 7] = 255;
        assert_edge(&m, &nd, reason::PASS_NEIGHBOR_DISCOVERY, "nd type range");
    }
    let routed = eth6(OTHER_V6, proto::ICMPV6, &icmp(135));
    assert_edge(
        &m,
        &routed,
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        "nd with hop limit 64",
    );
    // Echo requests are not ND whatever their hop limit; the first one
    // from a source passes at the default rate.
    let mut echo = eth6(OTHER_V6, proto::ICMPV6, &icmp(128));
    echo[ETHERNET_LEN + 7] = 255;
    assert_edge(&m, &echo, reason::PASS_ICMP_ECHO, "icmpv6 echo");
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, proto::ICMP, &icmp(8)),
        reason::PASS_ICMP_ECHO,
        "ping",
    );
    assert_edge(
        &m,
        &eth4(ALLOWED_V4, 47, &[0; 4]),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        "gre",
    );
}

#[test]
fn edge_passes_mld_from_link_local_with_hop_limit_one() {
    let m = edge();
    let mld = |src, kind, hop_limit| {
        let mut f = eth6(src, proto::ICMPV6, &icmp(kind));
        f[ETHERNET_LEN + 7] = hop_limit;
        f
    };
    for kind in [130, 131, 132, 143] {
        assert_edge(&m, &mld("fe80::1", kind, 1), reason::PASS_MLD, "mld");
        assert_edge(
            &m,
            &mld("fe80::1", kind, 64),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
            "mld with hop limit 64",
        );
        assert_edge(
            &m,
            &mld(OTHER_V6, kind, 1),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
            "mld from a global address",
        );
    }
    // Other types at hop limit 1 (a reply, ND, a type past MLD) are not MLD.
    for kind in [129, 135, 144] {
        assert_edge(
            &m,
            &mld("fe80::1", kind, 1),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
            "not mld",
        );
    }
}

#[test]
fn ipv4_options_shift_the_ports() {
    let m = edge();
    // Options whose bytes 2..4 read as port 51820: a parser that assumed
    // 20 bytes of IP header would take them for the UDP port.
    let options = [0x01, 0x01, 0xca, 0x6c, 0x01, 0x01, 0x01, 0x00];
    let frame = ethernet(
        ETHERTYPE_IPV4,
        &ipv4(OTHER_V4, proto::UDP, &options, &udp(53)),
    );
    assert_edge(
        &m,
        &frame,
        reason::DROP_PORT_NOT_ALLOWED,
        "udp 53 behind options",
    );
    let frame = ethernet(
        ETHERTYPE_IPV4,
        &ipv4(OTHER_V4, proto::UDP, &options, &udp(51820)),
    );
    assert_edge(
        &m,
        &frame,
        reason::PASS_WIREGUARD,
        "udp 51820 behind options",
    );
    let frame = ethernet(
        ETHERTYPE_IPV4,
        &ipv4(ALLOWED_V4, proto::TCP, &[1; 40], &tcp(22)),
    );
    assert_edge(
        &m,
        &frame,
        reason::PASS_SSH,
        "tcp 22 behind 40 bytes of options",
    );
}

#[test]
fn bad_ipv4_headers_are_malformed() {
    let m = edge();
    let good = eth4(OTHER_V4, proto::UDP, &udp(51820));
    let with = |i: usize, byte: u8| {
        let mut f = good.clone();
        f[ETHERNET_LEN + i] = byte;
        f
    };
    assert_edge(
        &m,
        &with(0, 0x65),
        reason::DROP_MALFORMED,
        "version 6 in an IPv4 ethertype",
    );
    assert_edge(&m, &with(0, 0x44), reason::DROP_MALFORMED, "IHL 4");
    // Total length 19 < IHL 20.
    assert_edge(
        &m,
        &with(3, 19),
        reason::DROP_MALFORMED,
        "total length below header length",
    );
    // Total length 27: the UDP header would end past it.
    assert_edge(
        &m,
        &with(3, 27),
        reason::DROP_MALFORMED,
        "udp past total length",
    );
    // IHL 15 (60 bytes): the UDP header would start past the frame.
    assert_edge(
        &m,
        &with(0, 0x4f),
        reason::DROP_MALFORMED,
        "IHL beyond the frame",
    );
    // Trailing bytes after the packet are not an error.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 18]);
    assert_edge(&m, &padded, reason::PASS_WIREGUARD, "ethernet padding");
}

#[test]
fn ipv4_options_are_not_required_to_be_present_for_portless_protocols() {
    // The kernel reads only the L4 header: GRE behind an IHL that runs
    // past the frame is still judged by protocol.
    let m = edge();
    let mut gre = eth4(OTHER_V4, 47, &[]);
    gre[ETHERNET_LEN] = 0x4f;
    gre[ETHERNET_LEN + 3] = 60;
    assert_edge(
        &m,
        &gre,
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        "gre with missing options",
    );
    // ICMP in IPv4 is read; protocol 58 there is not.
    // The whole 8-byte header: type, code, checksum, identifier, sequence.
    let short_icmp = eth4(OTHER_V4, proto::ICMP, &[8, 0, 0, 0, 0, 1, 0]);
    assert_edge(&m, &short_icmp, reason::DROP_MALFORMED, "7-byte icmp");
    assert_edge(
        &m,
        &eth4(OTHER_V4, proto::ICMPV6, &[]),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        "icmpv6 in v4",
    );
    assert_edge(
        &m,
        &eth6(OTHER_V6, proto::ICMP, &[]),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        "icmp in v6",
    );
}

#[test]
fn later_fragments_drop_and_first_fragments_are_parsed() {
    let m = edge();
    let mut later = eth4(ALLOWED_V4, proto::UDP, &udp(51820));
    later[ETHERNET_LEN + 6..ETHERNET_LEN + 8].copy_from_slice(&[0x20, 0xb9]); // MF, offset 185
    assert_edge(&m, &later, reason::DROP_FRAGMENT, "v4 later fragment");
    // A later fragment has no L4 header, and none is looked for.
    let mut bare = eth4(ALLOWED_V4, proto::TCP, &[]);
    bare[ETHERNET_LEN + 6..ETHERNET_LEN + 8].copy_from_slice(&[0x00, 0x01]);
    assert_edge(
        &m,
        &bare,
        reason::DROP_FRAGMENT,
        "v4 last fragment without ports",
    );
    let mut first = eth4(OTHER_V4, proto::UDP, &udp(51820));
    first[ETHERNET_LEN + 6] = 0x20; // MF, offset 0
    assert_edge(&m, &first, reason::PASS_WIREGUARD, "v4 first fragment");
    let mut first_short = eth4(OTHER_V4, proto::UDP, &[0; 4]);
    first_short[ETHERNET_LEN + 6] = 0x20;
    assert_edge(
        &m,
        &first_short,
        reason::DROP_MALFORMED,
        "first fragment without a full header",
    );

    let frag = [fragment(proto::UDP, 100), udp(51820)].concat();
    assert_edge(
        &m,
        &eth6(OTHER_V6, IPV6_FRAGMENT, &frag),
        reason::DROP_FRAGMENT,
        "v6 later fragment",
    );
    let frag = fragment(proto::TCP, 1);
    assert_edge(
        &m,
        &eth6(OTHER_V6, IPV6_FRAGMENT, &frag),
        reason::DROP_FRAGMENT,
        "v6 fragment, no L4",
    );
    let frag = [fragment(proto::UDP, 0), udp(51820)].concat();
    assert_edge(
        &m,
        &eth6(OTHER_V6, IPV6_FRAGMENT, &frag),
        reason::PASS_WIREGUARD,
        "v6 first fragment",
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let m = edge();
    let chain = [
        extension(IPV6_ROUTING, 8),
        extension(IPV6_DEST_OPTS, 24),
        extension(IPV6_AUTH, 16),
        auth(proto::TCP, 24),
        tcp(22),
    ]
    .concat();
    let frame = eth6(ALLOWED_V6, IPV6_HOP_BY_HOP, &chain);
    assert_edge(
        &m,
        &frame,
        reason::PASS_SSH,
        "tcp 22 behind four extension headers",
    );
    let frame = eth6(OTHER_V6, IPV6_HOP_BY_HOP, &chain);
    assert_edge(&m, &frame, reason::DROP_SSH_SOURCE, "same, other source");
    // Lengths matter: a 24-byte options header read as 8 would land in
    // its own padding (next header 0: hop-by-hop, then garbage).
    let frame = eth6(
        OTHER_V6,
        IPV6_DEST_OPTS,
        &[extension(proto::UDP, 24), udp(51820)].concat(),
    );
    assert_edge(
        &m,
        &frame,
        reason::PASS_WIREGUARD,
        "udp behind 24 bytes of options",
    );
    // ND behind an extension header is still ND.
    let mut nd = eth6(
        OTHER_V6,
        IPV6_HOP_BY_HOP,
        &[extension(proto::ICMPV6, 8), icmp(136)].concat(),
    );
    nd[ETHERNET_LEN + 7] = 255;
    assert_edge(
        &m,
        &nd,
        reason::PASS_NEIGHBOR_DISCOVERY,
        "nd behind hop-by-hop",
    );
}

fn chain_of(count: usize, last: &[u8]) -> Vec<u8> {
    let mut rest = Vec::new();
    for i in 0..count {
        let next = if i + 1 == count {
            proto::UDP
        } else {
            IPV6_DEST_OPTS
        };
        rest.extend(extension(next, 8));
    }
    rest.extend_from_slice(last);
    rest
}

#[test]
fn ipv6_extension_chains_are_capped() {
    let m = edge();
    let first = IPV6_DEST_OPTS;
    let frame = eth6(
        OTHER_V6,
        first,
        &chain_of(limits::MAX_IPV6_EXT, &udp(51820)),
    );
    assert_edge(&m, &frame, reason::PASS_WIREGUARD, "MAX_IPV6_EXT headers");
    let frame = eth6(
        OTHER_V6,
        first,
        &chain_of(limits::MAX_IPV6_EXT + 1, &udp(51820)),
    );
    assert_edge(&m, &frame, reason::DROP_HEADER_LIMIT, "one header too many");
    // A later-fragment header in the last pass still ends the walk.
    let mut rest = chain_of(limits::MAX_IPV6_EXT, &[]);
    let last = rest.len() - 8;
    rest[last] = IPV6_FRAGMENT;
    rest.extend(fragment(proto::UDP, 9));
    let frame = eth6(OTHER_V6, first, &rest);
    assert_edge(
        &m,
        &frame,
        reason::DROP_FRAGMENT,
        "fragment as the seventh header",
    );
}

#[test]
fn ipv6_lengths_are_checked_against_payload_length_and_frame() {
    let m = edge();
    let rest = [extension(proto::UDP, 8), udp(51820)].concat();
    let good = eth6(OTHER_V6, IPV6_HOP_BY_HOP, &rest);
    assert_edge(&m, &good, reason::PASS_WIREGUARD, "baseline");
    let payload_len = ETHERNET_LEN + 4;
    for (len, want, what) in [
        (16, reason::PASS_WIREGUARD, "exact"),
        (15, reason::DROP_MALFORMED, "udp ends past payload length"),
        (8, reason::DROP_MALFORMED, "udp starts at payload end"),
        (
            7,
            reason::DROP_MALFORMED,
            "extension header past payload length",
        ),
        (0, reason::DROP_MALFORMED, "empty payload"),
        // The frame is shorter than the payload length claims, but
        // every header the parser reads is present.
        (
            300,
            reason::PASS_WIREGUARD,
            "payload length beyond the frame",
        ),
    ] {
        let mut f = good.clone();
        f[payload_len..payload_len + 2].copy_from_slice(&u16::to_be_bytes(len));
        assert_edge(&m, &f, want, what);
    }
    // Payload length covers a header the frame lacks.
    let mut cut = good.clone();
    cut.truncate(cut.len() - 1);
    assert_edge(&m, &cut, reason::DROP_MALFORMED, "udp cut short");
    let mut bad_version = good.clone();
    bad_version[ETHERNET_LEN] = 0x40;
    assert_edge(
        &m,
        &bad_version,
        reason::DROP_MALFORMED,
        "version 4 in an IPv6 ethertype",
    );
}

#[test]
fn tcp_headers_are_checked() {
    let m = edge();
    let mut short_doff = eth4(ALLOWED_V4, proto::TCP, &tcp(22));
    short_doff[ETHERNET_LEN + IPV4_LEN + 12] = 0x40;
    assert_edge(&m, &short_doff, reason::DROP_MALFORMED, "data offset 4");
    // Inside the frame but past the IP total length.
    let mut past_limit = eth4(ALLOWED_V4, proto::TCP, &tcp(22));
    past_limit[ETHERNET_LEN + 3] = 39;
    assert_edge(
        &m,
        &past_limit,
        reason::DROP_MALFORMED,
        "tcp past total length",
    );
    // Inside the total length but past the frame.
    let mut past_frame = eth4(ALLOWED_V4, proto::TCP, &tcp(22));
    past_frame.truncate(past_frame.len() - 1);
    assert_edge(&m, &past_frame, reason::DROP_MALFORMED, "tcp past frame");
}

#[test]
fn vlan_tags_are_walked_up_to_the_limit() {
    let m = edge();
    let ip = ipv4(OTHER_V4, proto::UDP, &[], &udp(51820));
    let one = tagged(&[ETHERTYPE_8021Q], ETHERTYPE_IPV4, &ip);
    assert_edge(&m, &one, reason::PASS_WIREGUARD, "one tag");
    let two = tagged(&[ETHERTYPE_8021AD, ETHERTYPE_8021Q], ETHERTYPE_IPV4, &ip);
    assert_edge(&m, &two, reason::PASS_WIREGUARD, "two tags");
    let three = tagged(
        &[ETHERTYPE_8021AD, ETHERTYPE_8021Q, ETHERTYPE_8021Q],
        ETHERTYPE_IPV4,
        &ip,
    );
    assert_edge(&m, &three, reason::DROP_HEADER_LIMIT, "three tags");
    let arp_two = tagged(
        &[ETHERTYPE_8021Q, ETHERTYPE_8021Q],
        ETHERTYPE_ARP,
        &arp(6, 4),
    );
    assert_edge(&m, &arp_two, reason::PASS_ARP, "arp behind two tags");
    // A truncated tag is malformed, not a limit.
    let mut cut = tagged(&[ETHERTYPE_8021Q], ETHERTYPE_IPV4, &[]);
    cut.truncate(ETHERNET_LEN + 3);
    assert_edge(&m, &cut, reason::DROP_MALFORMED, "truncated tag");
    let cut = tagged(&[ETHERTYPE_8021Q, ETHERTYPE_8021Q], ETHERTYPE_8021Q, &[]);
    assert_edge(
        &m,
        &cut,
        reason::DROP_HEADER_LIMIT,
        "third tag need not be present",
    );
}

#[test]
fn arp_must_be_ethernet_ipv4() {
    let m = edge();
    assert_edge(
        &m,
        &ethernet(ETHERTYPE_ARP, &arp(8, 4)),
        reason::DROP_MALFORMED,
        "hlen 8",
    );
    assert_edge(
        &m,
        &ethernet(ETHERTYPE_ARP, &arp(6, 16)),
        reason::DROP_MALFORMED,
        "plen 16",
    );
    let mut short = ethernet(ETHERTYPE_ARP, &arp(6, 4));
    short.pop();
    assert_edge(&m, &short, reason::DROP_MALFORMED, "27-byte arp");
}

#[test]
fn other_ethertypes_are_unsupported() {
    let m = edge();
    assert_edge(
        &m,
        &ethernet(0x88cc, &[0; 46]),
        reason::DROP_UNSUPPORTED_L3,
        "lldp",
    );
    assert_edge(
        &m,
        &ethernet(0x8847, &[0; 46]),
        reason::DROP_UNSUPPORTED_L3,
        "mpls",
    );
    assert_edge(&m, &[0; 13], reason::DROP_MALFORMED, "13-byte frame");
    assert_edge(&m, &[], reason::DROP_MALFORMED, "empty frame");
}

/// Every prefix of a frame shorter than its last header is malformed.
fn assert_truncations_malformed(frame: &[u8], headers_end: usize, check: impl Fn(&[u8]) -> u32) {
    for len in 0..headers_end {
        let got = check(&frame[..len]);
        assert_eq!(
            reason::name(got),
            "malformed",
            "frame cut to {len} of {} bytes: {:02x?}",
            frame.len(),
            &frame[..len]
        );
    }
}

#[test]
fn truncation_at_every_boundary_is_malformed() {
    let m = edge();
    let v4 = tagged(
        &[ETHERTYPE_8021Q],
        ETHERTYPE_IPV4,
        &ipv4(ALLOWED_V4, proto::TCP, &[1; 8], &tcp(22)),
    );
    assert_edge(&m, &v4, reason::PASS_SSH, "full v4 frame");
    assert_truncations_malformed(&v4, v4.len(), |f| m.verdict(f));
    let chain = [
        extension(IPV6_FRAGMENT, 16),
        fragment(proto::UDP, 0),
        udp(51820),
    ]
    .concat();
    let v6 = tagged(
        &[ETHERTYPE_8021AD, ETHERTYPE_8021Q],
        ETHERTYPE_IPV6,
        &ipv6(addr6(OTHER_V6), 0, &chain),
    );
    assert_edge(&m, &v6, reason::PASS_WIREGUARD, "full v6 frame");
    assert_truncations_malformed(&v6, v6.len(), |f| m.verdict(f));
    let arp = ethernet(ETHERTYPE_ARP, &arp(6, 4));
    assert_truncations_malformed(&arp, arp.len(), |f| m.verdict(f));
    let t = tunnel();
    let l3 = ipv6(addr6("fd00:100::5"), proto::ICMPV6, &icmp(128));
    assert_eq!(
        t.verdict(&l3, false).reason,
        reason::PASS_ICMP_GRANT,
        "full l3 packet"
    );
    // The whole 8-byte ICMP header is read.
    assert_truncations_malformed(&l3, l3.len(), |f| t.verdict(f, false).reason);
    let l3 = ipv4([10, 100, 0, 5], proto::UDP, &[], &udp(53));
    assert_eq!(
        t.verdict(&l3, false).reason,
        reason::PASS_GRANT,
        "full l3 packet"
    );
    assert_truncations_malformed(&l3, l3.len(), |f| t.verdict(f, false).reason);
}

fn peer(name: &str, addresses: &[&str], grants: Vec<Grant>) -> Peer {
    Peer {
        name: name.into(),
        addresses: addresses.iter().map(|a| net(a)).collect(),
        public_key: None,
        grants,
        mode: crate::policy::Mode::Enforce,
    }
}

fn tunnel() -> TunnelModel {
    TunnelModel::new(&tunnel_policy())
}

fn tunnel_policy() -> TunnelPolicy {
    let ports = |protocol, first, last| Grant::Ports {
        protocol,
        first,
        last,
    };
    TunnelPolicy {
        interface: "wg0".into(),
        peers: vec![
            peer(
                "app",
                &["10.100.0.0/24", "fd00:100::/64"],
                vec![
                    ports(Protocol::Tcp, 5432, 5432),
                    ports(Protocol::Udp, 53, 53),
                    ports(Protocol::Tcp, 8000, 8100),
                    Grant::Icmp,
                ],
            ),
            // Inside app's /24: the longest prefix decides.
            peer(
                "narrow",
                &["10.100.0.7/32"],
                vec![ports(Protocol::Tcp, 22, 22)],
            ),
            peer("idle", &["fd00:200::1/128"], vec![]),
        ],
        groups: Vec::new(),
        runtime_grants: PathBuf::from("/nonexistent/grants.json"),
        link_local_neighbors: false,
        mode: crate::policy::Mode::Enforce,
    }
}

const APP: [u8; 4] = [10, 100, 0, 5];
const NARROW: [u8; 4] = [10, 100, 0, 7];
const STRANGER: [u8; 4] = [10, 200, 0, 1];

fn assert_tunnel(decision: TunnelDecision, reason: u32, peer: Option<u32>, what: &str) {
    assert_eq!(
        (reason::name(decision.reason), decision.peer),
        (reason::name(reason), peer),
        "{what}"
    );
}

#[test]
fn tunnel_grants_ports_per_peer() {
    let t = tunnel();
    let l3 = |src, protocol, l4: Vec<u8>| ipv4(src, protocol, &[], &l4);
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(5432)), false),
        reason::PASS_GRANT,
        Some(0),
        "tcp/5432",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(5433)), false),
        reason::DROP_NOT_GRANTED,
        Some(0),
        "5433",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(8000)), false),
        reason::PASS_GRANT,
        Some(0),
        "range start",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(8100)), false),
        reason::PASS_GRANT,
        Some(0),
        "range end",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(8101)), false),
        reason::DROP_NOT_GRANTED,
        Some(0),
        "past",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::UDP, udp(53)), false),
        reason::PASS_GRANT,
        Some(0),
        "udp/53",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::UDP, udp(5432)), false),
        reason::DROP_NOT_GRANTED,
        Some(0),
        "udp",
    );
    assert_tunnel(
        t.verdict(&l3(APP, proto::TCP, tcp(53)), false),
        reason::DROP_NOT_GRANTED,
        Some(0),
        "tcp/53",
    );
    assert_tunnel(
        t.verdict(&l3(NARROW, proto::TCP, tcp(22)), false),
        reason::PASS_GRANT,
        Some(1),
        "narrow 22",
    );
    assert_tunnel(
        t.verdict(&l3(NARROW, proto::TCP, tcp(5432)), false),
        reason::DROP_NOT_GRANTED,
        Some(1),
        "the longest prefix wins over app's /24",
    );
    assert_tunnel(
        t.verdict(&l3(STRANGER, proto::TCP, tcp(5432)), false),
        reason::DROP_PEER_UNKNOWN,
        None,
        "unknown source",
    );
    let v6 = ipv6(addr6("fd00:100::abcd"), proto::TCP, &tcp(8080));
    assert_tunnel(
        t.verdict(&v6, false),
        reason::PASS_GRANT,
        Some(0),
        "v6 in range",
    );
    let v6 = ipv6(addr6("fd00:200::1"), proto::UDP, &udp(53));
    assert_tunnel(
        t.verdict(&v6, false),
        reason::DROP_NOT_GRANTED,
        Some(2),
        "peer without grants",
    );
    let gre = ipv4(APP, 47, &[], &[0; 4]);
    assert_tunnel(
        t.verdict(&gre, false),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        Some(0),
        "gre",
    );
}

#[test]
fn tunnel_grants_icmp_echo_per_peer() {
    let t = tunnel();
    let ping = |src| ipv4(src, proto::ICMP, &[], &icmp(ICMP_ECHO_REQUEST));
    assert_tunnel(
        t.verdict(&ping(APP), false),
        reason::PASS_ICMP_GRANT,
        Some(0),
        "app pings",
    );
    assert_tunnel(
        t.verdict(&ping(NARROW), false),
        reason::DROP_NOT_GRANTED,
        Some(1),
        "no icmp grant",
    );
    assert_tunnel(
        t.verdict(&ping(STRANGER), false),
        reason::DROP_PEER_UNKNOWN,
        None,
        "stranger",
    );
    let reply = ipv4(APP, proto::ICMP, &[], &icmp(0));
    assert_tunnel(
        t.verdict(&reply, false),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        Some(0),
        "echo reply",
    );
    let ping6 = ipv6(
        addr6("fd00:100::1"),
        proto::ICMPV6,
        &icmp(ICMPV6_ECHO_REQUEST),
    );
    assert_tunnel(
        t.verdict(&ping6, false),
        reason::PASS_ICMP_GRANT,
        Some(0),
        "v6 ping",
    );
    let v4_type_in_v6 = ipv6(
        addr6("fd00:100::1"),
        proto::ICMPV6,
        &icmp(ICMP_ECHO_REQUEST),
    );
    assert_tunnel(
        t.verdict(&v4_type_in_v6, false),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        Some(0),
        "type 8 in v6",
    );
    let icmp_in_v6 = ipv6(addr6("fd00:100::1"), proto::ICMP, &icmp(ICMP_ECHO_REQUEST));
    assert_tunnel(
        t.verdict(&icmp_in_v6, false),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        Some(0),
        "icmp in v6",
    );
}

#[test]
fn tunnel_checks_the_peer_before_fragments() {
    let t = tunnel();
    let later = |src| {
        let mut p = ipv4(src, proto::TCP, &[], &[]);
        p[6..8].copy_from_slice(&[0, 3]);
        p
    };
    assert_tunnel(
        t.verdict(&later(APP), false),
        reason::DROP_FRAGMENT,
        Some(0),
        "peer's fragment",
    );
    assert_tunnel(
        t.verdict(&later(STRANGER), false),
        reason::DROP_PEER_UNKNOWN,
        None,
        "stranger's fragment",
    );
    let frag6 = ipv6(
        addr6("fd00:100::1"),
        IPV6_FRAGMENT,
        &fragment(proto::ICMPV6, 2),
    );
    assert_tunnel(
        t.verdict(&frag6, false),
        reason::DROP_FRAGMENT,
        Some(0),
        "v6 fragment",
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "every neighbour rule, case by case")]
fn tunnel_admits_neighbour_messages_only_from_peers() {
    let t = tunnel();
    let arp_from = |sender: [u8; 4]| {
        let mut a = arp(6, 4);
        a[14..18].copy_from_slice(&sender);
        ethernet(ETHERTYPE_ARP, &a)
    };
    assert_tunnel(
        t.verdict(&arp_from(APP), true),
        reason::PASS_ARP,
        Some(0),
        "arp from a peer's address",
    );
    assert_tunnel(
        t.verdict(&arp_from(STRANGER), true),
        reason::DROP_PEER_UNKNOWN,
        None,
        "arp from no peer",
    );
    let icmp6 = |src, kind, hop_limit| {
        let mut f = eth6(src, proto::ICMPV6, &icmp(kind));
        f[ETHERNET_LEN + 7] = hop_limit;
        f
    };
    for kind in [135, 136] {
        assert_tunnel(
            t.verdict(&icmp6("fd00:100::1", kind, 255), true),
            reason::PASS_NEIGHBOR_DISCOVERY,
            Some(0),
            "nd from a peer",
        );
        assert_tunnel(
            t.verdict(&icmp6("fe80::1", kind, 255), true),
            reason::DROP_PEER_UNKNOWN,
            None,
            "nd from a link-local stranger, not allowed by the config",
        );
        // On an L3 device nothing passes that is not a peer's.
        let bare = &icmp6("fd00:100::1", kind, 255)[ETHERNET_LEN..];
        assert_tunnel(
            t.verdict(bare, false),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
            Some(0),
            "nd from a peer on an l3 device",
        );
        let bare = &icmp6("fe80::1", kind, 255)[ETHERNET_LEN..];
        assert_tunnel(
            t.verdict(bare, false),
            reason::DROP_PEER_UNKNOWN,
            None,
            "nd from a stranger on an l3 device",
        );
    }
    let mut policy = tunnel_policy();
    policy.link_local_neighbors = true;
    let allowing = TunnelModel::new(&policy);
    assert_tunnel(
        allowing.verdict(&icmp6("fe80::1", 135, 255), true),
        reason::PASS_NEIGHBOR_DISCOVERY,
        None,
        "nd from link-local, allowed by the config",
    );
    let bare = &icmp6("fe80::1", 135, 255)[ETHERNET_LEN..];
    assert_tunnel(
        allowing.verdict(bare, false),
        reason::DROP_PEER_UNKNOWN,
        None,
        "link-local is an l2 allowance only",
    );
    assert_tunnel(
        allowing.verdict(&icmp6("fd00:9::1", 135, 255), true),
        reason::DROP_PEER_UNKNOWN,
        None,
        "a global stranger stays out",
    );
    // Router messages never pass, from a peer or not, on any device.
    for (src, peer) in [("fe80::9", None), ("fd00:100::1", Some(0))] {
        for kind in [133, 134, 137] {
            for hop_limit in [255, 64] {
                let framed = icmp6(src, kind, hop_limit);
                assert_tunnel(
                    allowing.verdict(&framed, true),
                    reason::DROP_ROUTER_MESSAGE,
                    peer,
                    "router message on l2",
                );
                assert_tunnel(
                    allowing.verdict(&framed[ETHERNET_LEN..], false),
                    reason::DROP_ROUTER_MESSAGE,
                    peer,
                    "router message on l3",
                );
            }
        }
    }
    let grant = eth4(APP, proto::TCP, &tcp(5432));
    assert_tunnel(
        t.verdict(&grant, true),
        reason::PASS_GRANT,
        Some(0),
        "tcp over ethernet",
    );
    // The same bytes in L3 mode start with a MAC address, not IP.
    assert_tunnel(
        t.verdict(&grant, false),
        reason::DROP_UNSUPPORTED_L3,
        None,
        "ethernet read as IP",
    );
    let three_tags = tagged(
        &[ETHERTYPE_8021Q; 3],
        ETHERTYPE_IPV4,
        &ipv4(APP, proto::TCP, &[], &tcp(5432)),
    );
    assert_tunnel(
        t.verdict(&three_tags, true),
        reason::DROP_HEADER_LIMIT,
        None,
        "three tags",
    );
}

#[test]
fn tunnel_in_l3_mode_checks_the_version() {
    let t = tunnel();
    let mut v5 = ipv4(APP, proto::TCP, &[], &tcp(5432));
    v5[0] = 0x55;
    assert_tunnel(
        t.verdict(&v5, false),
        reason::DROP_UNSUPPORTED_L3,
        None,
        "version 5",
    );
    // 20 bytes claiming IPv6: the 40-byte header is missing.
    let mut short6 = ipv6(addr6("fd00:100::1"), proto::UDP, &udp(53));
    short6.truncate(20);
    assert_tunnel(
        t.verdict(&short6, false),
        reason::DROP_MALFORMED,
        None,
        "short v6",
    );
    // 19 bytes of anything are malformed before the version is read.
    assert_tunnel(
        t.verdict(&[0x55; 19], false),
        reason::DROP_MALFORMED,
        None,
        "19 bytes",
    );
    assert_tunnel(
        t.verdict(&[0x55; 20], false),
        reason::DROP_UNSUPPORTED_L3,
        None,
        "20 bytes",
    );
    let mut malformed = ipv4(APP, proto::TCP, &[], &tcp(5432));
    malformed[3] = 30;
    assert_tunnel(
        t.verdict(&malformed, false),
        reason::DROP_MALFORMED,
        None,
        "tcp past total length",
    );
}

// The flow state.

const S: u64 = 1_000_000_000;
const REMOTE_V4: [u8; 4] = [192, 0, 2, 53];
const NEIGHBOR_V4: [u8; 4] = [192, 0, 2, 54];
const REMOTE_V6: &str = "2001:db8::53";

/// Timeouts that differ per protocol, so a test can tell them apart.
fn settings() -> FlowSettings {
    FlowSettings {
        max_entries: 1024,
        tcp_established: Duration::from_secs(100),
        tcp_closing: Duration::from_secs(10),
        udp: Duration::from_secs(30),
        icmp: Duration::from_secs(20),
        fragment: Duration::from_secs(5),
    }
}

fn host(echo: EchoRate) -> StatefulModel {
    let edge = EdgePolicy {
        icmp_echo: echo,
        ..edge_policy()
    };
    StatefulModel::new(&edge, Some(&tunnel_policy()), &settings())
}

fn segment(src: u16, dst: u16, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; TCP_LEN];
    t[0..2].copy_from_slice(&src.to_be_bytes());
    t[2..4].copy_from_slice(&dst.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn datagram(src: u16, dst: u16) -> Vec<u8> {
    let mut u = vec![0u8; UDP_LEN];
    u[0..2].copy_from_slice(&src.to_be_bytes());
    u[2..4].copy_from_slice(&dst.to_be_bytes());
    u[4..6].copy_from_slice(&8u16.to_be_bytes());
    u
}

fn echo(kind: u8, id: u16) -> Vec<u8> {
    let mut e = vec![kind, 0, 0, 0];
    e.extend_from_slice(&id.to_be_bytes());
    e.extend_from_slice(&[0, 1]);
    e
}

/// An ICMP error (fragmentation needed's MTU field says 1280) quoting `quote`.
fn error(kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut e = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
    e.extend_from_slice(quote);
    e
}

/// The host's packet as a router quotes it: IP header and 8 bytes more.
fn quote4(protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut q = ipv4_between(HOST_V4, REMOTE_V4, protocol, &[], l4);
    q.truncate(IPV4_LEN + 8);
    q
}

fn quote6(next: u8, rest: &[u8]) -> Vec<u8> {
    let mut q = ipv6_between(addr6(HOST_V6), addr6(REMOTE_V6), next, rest);
    q.truncate(IPV6_LEN + 8);
    q
}

/// From the host to `REMOTE_V4` (egress, Ethernet).
fn out4(protocol: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(
        ETHERTYPE_IPV4,
        &ipv4_between(HOST_V4, REMOTE_V4, protocol, &[], l4),
    )
}

fn out6(next: u8, l4: &[u8]) -> Vec<u8> {
    ethernet(
        ETHERTYPE_IPV6,
        &ipv6_between(addr6(HOST_V6), addr6(REMOTE_V6), next, l4),
    )
}

fn in6(next: u8, l4: &[u8]) -> Vec<u8> {
    eth6(REMOTE_V6, next, l4)
}

/// Feeds `(seconds, frame, reason)` steps to the edge, in order.
fn assert_edge_steps(m: &mut StatefulModel, steps: &[(u64, &[u8], u32, &str)]) {
    for (at, frame, want, what) in steps {
        let got = m.edge_ingress(frame, TEST_IF, at * S);
        assert_eq!(
            reason::name(got),
            reason::name(*want),
            "{what} at {at} s: frame {frame:02x?}"
        );
    }
}

#[test]
fn a_reply_must_come_in_by_the_interface_its_flow_left_by() {
    let mut m = host(EchoRate::default());
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 0);
    let reply = eth4(REMOTE_V4, proto::UDP, &datagram(53, 40_000));
    assert_eq!(
        m.edge_ingress(&reply, TEST_IF + 1, 1),
        reason::DROP_PORT_NOT_ALLOWED,
        "a spoofed reply on another interface"
    );
    assert_eq!(
        m.edge_ingress(&reply, TEST_IF, 2),
        reason::PASS_REPLY,
        "the real reply"
    );
}

#[test]
fn udp_replies_pass_only_as_the_exact_reverse() {
    let mut m = host(EchoRate::default());
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 0);
    assert_eq!(m.flows().created(), 1, "a datagram opens a flow");
    let reply = eth4(REMOTE_V4, proto::UDP, &datagram(53, 40_000));
    let mut later = reply.clone();
    later[ETHERNET_LEN + 6..ETHERNET_LEN + 8].copy_from_slice(&[0, 10]);
    let to_other_local = ethernet(
        ETHERTYPE_IPV4,
        &ipv4_between(
            REMOTE_V4,
            [10, 77, 0, 9],
            proto::UDP,
            &[],
            &datagram(53, 40_000),
        ),
    );
    assert_edge_steps(
        &mut m,
        &[
            (1, &reply, reason::PASS_REPLY, "the reply"),
            (
                1,
                &eth4(REMOTE_V4, proto::UDP, &datagram(54, 40_000)),
                reason::DROP_PORT_NOT_ALLOWED,
                "other remote port",
            ),
            (
                1,
                &eth4(REMOTE_V4, proto::UDP, &datagram(53, 40_001)),
                reason::DROP_PORT_NOT_ALLOWED,
                "other local port",
            ),
            (
                1,
                &eth4(NEIGHBOR_V4, proto::UDP, &datagram(53, 40_000)),
                reason::DROP_PORT_NOT_ALLOWED,
                "other remote address",
            ),
            (
                1,
                &to_other_local,
                reason::DROP_PORT_NOT_ALLOWED,
                "other local address",
            ),
            (
                1,
                &eth4(REMOTE_V4, proto::TCP, &segment(53, 40_000, tcp_flag::ACK)),
                reason::DROP_PORT_NOT_ALLOWED,
                "tcp on the udp ports",
            ),
            (
                1,
                &in6(proto::UDP, &datagram(53, 40_000)),
                reason::DROP_PORT_NOT_ALLOWED,
                "the v6 neighbour",
            ),
            (
                1,
                &later,
                reason::DROP_FRAGMENT,
                "a later fragment of the reply",
            ),
        ],
    );
    m.edge_egress(&out6(proto::UDP, &datagram(40_000, 53)), TEST_IF, 2 * S);
    assert_eq!(m.flows().created(), 2, "v6 is a flow of its own");
    assert_edge_steps(
        &mut m,
        &[(
            3,
            &in6(proto::UDP, &datagram(53, 40_000)),
            reason::PASS_REPLY,
            "v6 reply",
        )],
    );
    // Replies that the policy passes anyway keep their own reason.
    m.edge_egress(&out4(proto::UDP, &datagram(51_820, 51_820)), TEST_IF, 3 * S);
    assert_edge_steps(
        &mut m,
        &[(
            4,
            &eth4(REMOTE_V4, proto::UDP, &datagram(51_820, 51_820)),
            reason::PASS_WIREGUARD,
            "wireguard",
        )],
    );
}

#[test]
fn later_fragments_follow_a_first_that_passed_within_the_timeout() {
    let mut m = host(EchoRate::default());
    let first = eth6(
        OTHER_V6,
        IPV6_FRAGMENT,
        &[fragment(proto::UDP, 0), udp(51_820)].concat(),
    );
    let later = eth6(
        OTHER_V6,
        IPV6_FRAGMENT,
        &[fragment(proto::UDP, 100), vec![0; 8]].concat(),
    );
    let mut other = fragment(proto::UDP, 100);
    other[7] = 8;
    let other = eth6(OTHER_V6, IPV6_FRAGMENT, &[other, vec![0; 8]].concat());
    assert_edge_steps(
        &mut m,
        &[
            (0, &later, reason::DROP_FRAGMENT, "before its first"),
            (0, &first, reason::PASS_WIREGUARD, "the first, to wireguard"),
            (5, &later, reason::PASS_FRAGMENT, "5 s: the timeout itself"),
            (5, &other, reason::DROP_FRAGMENT, "another datagram"),
            (6, &later, reason::DROP_FRAGMENT, "6 s: too late"),
        ],
    );
}

#[test]
fn udp_flows_time_out_and_egress_revives_them() {
    let mut m = host(EchoRate::default());
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 0);
    let reply = eth4(REMOTE_V4, proto::UDP, &datagram(53, 40_000));
    assert_edge_steps(
        &mut m,
        &[
            (
                30,
                &reply,
                reason::PASS_REPLY,
                "30 s: the timeout itself still passes",
            ),
            (60, &reply, reason::PASS_REPLY, "a reply refreshes the flow"),
            (91, &reply, reason::DROP_PORT_NOT_ALLOWED, "31 s of silence"),
        ],
    );
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 92 * S);
    assert_eq!(m.flows().created(), 1, "the expired entry is reused");
    assert_eq!(m.flows().entries(), 1);
    assert_edge_steps(&mut m, &[(93, &reply, reason::PASS_REPLY, "revived")]);
}

#[test]
fn tcp_replies_never_open_and_closing_flows_expire_sooner() {
    let mut m = host(EchoRate::default());
    let seg = |flags| eth4(REMOTE_V4, proto::TCP, &segment(443, 40_000, flags));
    let (syn, ack) = (tcp_flag::SYN, tcp_flag::ACK);
    m.edge_egress(&out4(proto::TCP, &segment(40_000, 443, syn)), TEST_IF, 0);
    // Segments other than a SYN refresh flows but never open one.
    m.edge_egress(&out4(proto::TCP, &segment(40_001, 443, ack)), TEST_IF, 0);
    m.edge_egress(
        &out4(proto::TCP, &segment(40_002, 443, syn | ack)),
        TEST_IF,
        0,
    );
    assert_eq!(m.flows().created(), 1);
    assert_edge_steps(
        &mut m,
        &[
            (1, &seg(syn | ack), reason::PASS_REPLY, "syn-ack"),
            (
                2,
                &seg(syn),
                reason::DROP_PORT_NOT_ALLOWED,
                "a syn posing as a reply",
            ),
            (
                2,
                &eth4(REMOTE_V4, proto::TCP, &segment(443, 40_001, ack)),
                reason::DROP_PORT_NOT_ALLOWED,
                "no flow",
            ),
            (50, &seg(ack), reason::PASS_REPLY, "established"),
            (
                150,
                &seg(ack),
                reason::PASS_REPLY,
                "100 s: the established timeout",
            ),
            (
                150,
                &seg(tcp_flag::FIN | ack),
                reason::PASS_REPLY,
                "their fin",
            ),
            (
                160,
                &seg(ack),
                reason::PASS_REPLY,
                "10 s: the closing timeout",
            ),
            (171, &seg(ack), reason::DROP_PORT_NOT_ALLOWED, "closed"),
        ],
    );
    // The same ports again: a new connection, established timeouts.
    m.edge_egress(
        &out4(proto::TCP, &segment(40_000, 443, syn)),
        TEST_IF,
        172 * S,
    );
    assert_edge_steps(
        &mut m,
        &[
            (200, &seg(syn | ack), reason::PASS_REPLY, "new connection"),
            (200, &seg(tcp_flag::RST), reason::PASS_REPLY, "their rst"),
            (211, &seg(ack), reason::DROP_PORT_NOT_ALLOWED, "reset"),
        ],
    );
    // Our own fin closes too.
    m.edge_egress(
        &out4(proto::TCP, &segment(40_003, 443, syn)),
        TEST_IF,
        300 * S,
    );
    m.edge_egress(
        &out4(proto::TCP, &segment(40_003, 443, tcp_flag::FIN | ack)),
        TEST_IF,
        301 * S,
    );
    let ours = eth4(REMOTE_V4, proto::TCP, &segment(443, 40_003, ack));
    assert_edge_steps(
        &mut m,
        &[(312, &ours, reason::DROP_PORT_NOT_ALLOWED, "after our fin")],
    );
    // A syn with fin opens a flow that starts closing, as in the kernel.
    m.edge_egress(
        &out4(proto::TCP, &segment(40_004, 443, syn | tcp_flag::FIN)),
        TEST_IF,
        400 * S,
    );
    let odd = eth4(REMOTE_V4, proto::TCP, &segment(443, 40_004, ack));
    assert_edge_steps(
        &mut m,
        &[(411, &odd, reason::DROP_PORT_NOT_ALLOWED, "syn+fin")],
    );
}

#[test]
fn echo_replies_match_by_identifier() {
    let mut m = host(EchoRate::default());
    m.edge_egress(
        &out4(proto::ICMP, &echo(ICMP_ECHO_REQUEST, 0x77)),
        TEST_IF,
        0,
    );
    // Answering someone else's ping opens nothing.
    m.edge_egress(&out4(proto::ICMP, &echo(ICMP_ECHO_REPLY, 0x99)), TEST_IF, 0);
    assert_eq!(m.flows().created(), 1);
    let reply = |src, id| eth4(src, proto::ICMP, &echo(ICMP_ECHO_REPLY, id));
    assert_edge_steps(
        &mut m,
        &[
            (1, &reply(REMOTE_V4, 0x77), reason::PASS_REPLY, "our reply"),
            (
                1,
                &reply(REMOTE_V4, 0x78),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "other id",
            ),
            (
                1,
                &reply(NEIGHBOR_V4, 0x77),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "other source",
            ),
            (
                1,
                &reply(REMOTE_V4, 0x99),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "the id we answered",
            ),
            (
                21,
                &reply(REMOTE_V4, 0x77),
                reason::PASS_REPLY,
                "20 s: the icmp timeout",
            ),
            (
                42,
                &reply(REMOTE_V4, 0x77),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "expired",
            ),
        ],
    );
    m.edge_egress(
        &out6(proto::ICMPV6, &echo(ICMPV6_ECHO_REQUEST, 5)),
        TEST_IF,
        50 * S,
    );
    assert_edge_steps(
        &mut m,
        &[
            (
                51,
                &in6(proto::ICMPV6, &echo(ICMPV6_ECHO_REPLY, 5)),
                reason::PASS_REPLY,
                "v6",
            ),
            (
                51,
                &in6(proto::ICMPV6, &echo(ICMP_ECHO_REPLY, 5)),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "v4 type in v6",
            ),
        ],
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn icmp_errors_pass_only_about_live_flows() {
    let mut m = host(EchoRate::default());
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 0);
    m.edge_egress(
        &out4(proto::TCP, &segment(40_001, 443, tcp_flag::SYN)),
        TEST_IF,
        0,
    );
    m.edge_egress(&out4(proto::ICMP, &echo(ICMP_ECHO_REQUEST, 9)), TEST_IF, 0);
    let router = [203, 0, 113, 1];
    let err = |kind, code, quote: &[u8]| eth4(router, proto::ICMP, &error(kind, code, quote));
    let udp = quote4(proto::UDP, &datagram(40_000, 53));
    let mut fragment = udp.clone();
    fragment[6..8].copy_from_slice(&[0, 1]);
    let with_options = {
        let mut q = ipv4_between(
            HOST_V4,
            REMOTE_V4,
            proto::UDP,
            &[1, 1, 1, 0],
            &datagram(40_000, 53),
        );
        q.truncate(IPV4_LEN + 4 + 8);
        q
    };
    // The outer length ends one byte before the quoted ports do.
    let mut short_outer = err(3, 4, &udp);
    let total = IPV4_LEN + ICMP_LEN + udp.len() - 1;
    short_outer[ETHERNET_LEN + 2..ETHERNET_LEN + 4]
        .copy_from_slice(&u16::try_from(total).expect("fits").to_be_bytes());
    let v6_in_v4 = quote6(proto::UDP, &datagram(40_000, 53));
    assert_edge_steps(
        &mut m,
        &[
            (
                1,
                &err(3, 4, &udp),
                reason::PASS_ICMP_RELATED,
                "fragmentation needed",
            ),
            (
                1,
                &err(3, 3, &udp),
                reason::PASS_ICMP_RELATED,
                "port unreachable",
            ),
            (
                1,
                &err(
                    11,
                    0,
                    &quote4(proto::TCP, &segment(40_001, 443, tcp_flag::SYN)),
                ),
                reason::PASS_ICMP_RELATED,
                "time exceeded, tcp",
            ),
            (
                1,
                &err(3, 1, &quote4(proto::ICMP, &echo(ICMP_ECHO_REQUEST, 9))),
                reason::PASS_ICMP_RELATED,
                "host unreachable, echo",
            ),
            (
                1,
                &err(3, 4, &with_options),
                reason::PASS_ICMP_RELATED,
                "quote with ip options",
            ),
            (
                1,
                &err(3, 4, &quote4(proto::UDP, &datagram(40_000, 54))),
                reason::DROP_ICMP_UNRELATED,
                "another flow",
            ),
            (
                1,
                &err(3, 1, &quote4(proto::ICMP, &echo(ICMP_ECHO_REPLY, 9))),
                reason::DROP_ICMP_UNRELATED,
                "quoting an echo reply",
            ),
            (
                1,
                &err(3, 4, &udp[..IPV4_LEN + 7]),
                reason::DROP_ICMP_UNRELATED,
                "truncated quote",
            ),
            (
                1,
                &err(3, 4, &udp[..IPV4_LEN - 1]),
                reason::DROP_ICMP_UNRELATED,
                "quote without an ip header",
            ),
            (
                1,
                &err(3, 4, &fragment),
                reason::DROP_ICMP_UNRELATED,
                "quoted later fragment",
            ),
            (
                1,
                &short_outer,
                reason::DROP_ICMP_UNRELATED,
                "quote past the outer length",
            ),
            (
                1,
                &err(3, 4, &v6_in_v4),
                reason::DROP_ICMP_UNRELATED,
                "v6 quoted in v4",
            ),
            (
                1,
                &err(5, 0, &udp),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "redirect",
            ),
            (
                1,
                &err(12, 0, &udp),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "parameter problem",
            ),
            (
                30,
                &err(3, 4, &udp),
                reason::PASS_ICMP_RELATED,
                "30 s: still live",
            ),
            (
                31,
                &err(3, 4, &udp),
                reason::DROP_ICMP_UNRELATED,
                "errors do not refresh",
            ),
        ],
    );
    let short = eth4(router, proto::ICMP, &error(3, 4, &[])[..7]);
    assert_edge_steps(
        &mut m,
        &[(31, &short, reason::DROP_MALFORMED, "7-byte icmp error")],
    );

    m.edge_egress(&out6(proto::UDP, &datagram(40_000, 53)), TEST_IF, 40 * S);
    let udp6 = quote6(proto::UDP, &datagram(40_000, 53));
    let err6 = |kind, quote: &[u8]| eth6("2001:db8:ffff::1", proto::ICMPV6, &error(kind, 0, quote));
    let behind_ext = quote6(
        IPV6_HOP_BY_HOP,
        &[extension(proto::UDP, 8), datagram(40_000, 53)].concat(),
    );
    assert_edge_steps(
        &mut m,
        &[
            (
                41,
                &err6(ICMPV6_PACKET_TOO_BIG, &udp6),
                reason::PASS_ICMP_RELATED,
                "packet too big",
            ),
            (
                41,
                &err6(ICMPV6_DEST_UNREACHABLE, &udp6),
                reason::PASS_ICMP_RELATED,
                "unreachable",
            ),
            (
                41,
                &err6(ICMPV6_TIME_EXCEEDED, &udp6),
                reason::PASS_ICMP_RELATED,
                "time exceeded",
            ),
            (
                41,
                &err6(ICMPV6_PACKET_TOO_BIG, &behind_ext),
                reason::DROP_ICMP_UNRELATED,
                "extension header in the quote",
            ),
            (
                41,
                &err6(ICMPV6_PACKET_TOO_BIG, &udp),
                reason::DROP_ICMP_UNRELATED,
                "v4 quoted in v6",
            ),
            (
                41,
                &err6(4, &udp6),
                reason::DROP_PROTOCOL_NOT_ALLOWED,
                "parameter problem",
            ),
        ],
    );
}

#[test]
fn echo_requests_are_rate_limited_per_source() {
    let mut m = host(EchoRate {
        ns_per_token: S,
        burst: 3,
    });
    let ping = |src| eth4(src, proto::ICMP, &echo(ICMP_ECHO_REQUEST, 1));
    let (a, b) = (ping(REMOTE_V4), ping(NEIGHBOR_V4));
    let (pass, limited) = (reason::PASS_ICMP_ECHO, reason::DROP_ICMP_RATE);
    let steps: &[(u64, &[u8], u32, &str)] = &[
        (0, &a, pass, "a: burst 1"),
        (0, &a, pass, "a: burst 2"),
        (0, &a, pass, "a: burst 3"),
        (0, &a, limited, "a: over"),
        (0, &b, pass, "b has its own bucket"),
    ];
    assert_edge_steps(&mut m, steps);
    let ns = |at_ns, frame: &[u8]| m.clone().edge_ingress(frame, TEST_IF, at_ns);
    assert_eq!(ns(S - 1, &a), limited, "a token takes a whole second");
    // Refills count from the last refill, not from the last echo.
    let mut at = |at_ns, want, what| {
        let got = m.edge_ingress(&a, TEST_IF, at_ns);
        assert_eq!(reason::name(got), reason::name(want), "{what}");
    };
    at(S + S / 2, pass, "1.5 s: one token");
    at(S + S / 2, limited, "and only one");
    at(2 * S + S / 2 - 1, limited, "not yet");
    at(2 * S + S / 2, pass, "2.5 s");
    at(100 * S, pass, "a long silence");
    at(100 * S, pass, "refills the burst");
    at(100 * S, pass, "but no more");
    at(100 * S, limited, "than the burst");
    let v6 = eth6(REMOTE_V6, proto::ICMPV6, &echo(ICMPV6_ECHO_REQUEST, 1));
    assert_edge_steps(&mut m, &[(100, &v6, pass, "v6 source")]);

    let mut off = host(EchoRate {
        ns_per_token: 0,
        burst: 3,
    });
    assert_edge_steps(&mut off, &[(0, &a, limited, "rate 0 drops the first echo")]);
    // The tunnel has grants, not rates.
    let t = |src, kind| ipv4(src, proto::ICMP, &[], &echo(kind, 1));
    let decision = |m: &mut StatefulModel, p: &[u8]| {
        m.tunnel_ingress(p, false, TEST_IF, 0)
            .map(|d| reason::name(d.reason))
    };
    assert_eq!(
        decision(&mut m, &t(NARROW, ICMP_ECHO_REQUEST)),
        Some("not_granted")
    );
    assert_eq!(
        decision(&mut m, &t(APP, ICMP_ECHO_REQUEST)),
        Some("icmp_granted")
    );
}

#[test]
fn an_answer_through_a_grant_reopens_nothing_after_a_revoke() {
    let mut m = host(EchoRate::default());
    let local = [10, 100, 0, 1];
    let ask = ipv4_between(APP, local, proto::UDP, &[], &datagram(40_000, 53));
    let answer = ipv4_between(local, APP, proto::UDP, &[], &datagram(53, 40_000));
    let decide = |m: &mut StatefulModel, at| {
        m.tunnel_ingress(&ask, false, TEST_IF, at * S)
            .map(|d| reason::name(d.reason))
    };
    assert_eq!(decide(&mut m, 0), Some("granted"));
    m.tunnel_egress(&answer, false, TEST_IF, 0);
    assert_eq!(m.flows().created(), 1, "the answer is a flow of its own");
    let mut revoked = tunnel_policy();
    revoked.peers[0].grants.retain(|g| {
        !matches!(
            g,
            Grant::Ports {
                protocol: Protocol::Udp,
                ..
            }
        )
    });
    m.set_policy(&edge_policy(), Some(&revoked));
    assert_eq!(decide(&mut m, 1), Some("not_granted"), "revoked");
    // The host goes on answering: still no way back in.
    m.tunnel_egress(&answer, false, TEST_IF, 2 * S);
    assert_eq!(
        decide(&mut m, 3),
        Some("not_granted"),
        "answered after the revoke"
    );
    // A flow the host starts itself from another port still admits replies.
    let own = ipv4_between(local, APP, proto::UDP, &[], &datagram(41_000, 53));
    m.tunnel_egress(&own, false, TEST_IF, 4 * S);
    let back = ipv4_between(APP, local, proto::UDP, &[], &datagram(53, 41_000));
    assert_eq!(
        m.tunnel_ingress(&back, false, TEST_IF, 5 * S)
            .map(|d| reason::name(d.reason)),
        Some("reply")
    );
}

#[test]
fn an_answer_from_a_wireguard_port_reopens_nothing_once_it_closes() {
    let mut m = host(EchoRate::default());
    let client = out4(proto::UDP, &datagram(51_820, 40_000));
    let back = ethernet(
        ETHERTYPE_IPV4,
        &ipv4_between(
            REMOTE_V4,
            HOST_V4,
            proto::UDP,
            &[],
            &datagram(40_000, 51_820),
        ),
    );
    m.edge_egress(&client, TEST_IF, 0);
    assert_eq!(reason::name(m.edge_ingress(&back, TEST_IF, S)), "wireguard");
    let closed = EdgePolicy {
        wireguard_ports: vec![51_821],
        ..edge_policy()
    };
    m.set_policy(&closed, Some(&tunnel_policy()));
    assert_eq!(
        reason::name(m.edge_ingress(&back, TEST_IF, 2 * S)),
        "port_not_allowed"
    );
}

#[test]
fn tunnel_replies_and_errors_use_the_same_flows() {
    let mut m = host(EchoRate::default());
    let local = [10, 100, 0, 1];
    let out = ipv4_between(
        local,
        APP,
        proto::TCP,
        &[],
        &segment(40_000, 9000, tcp_flag::SYN),
    );
    m.tunnel_egress(&out, false, TEST_IF, 0);
    let back =
        |src, flags| ipv4_between(src, local, proto::TCP, &[], &segment(9000, 40_000, flags));
    let decide = |m: &mut StatefulModel, p: &[u8]| {
        m.tunnel_ingress(p, false, TEST_IF, S)
            .map(|d| (reason::name(d.reason), d.peer))
    };
    let syn_ack = tcp_flag::SYN | tcp_flag::ACK;
    assert_eq!(
        decide(&mut m, &back(APP, syn_ack)),
        Some(("reply", Some(0)))
    );
    assert_eq!(
        decide(&mut m, &back(APP, tcp_flag::SYN)),
        Some(("not_granted", Some(0))),
        "a syn is never a reply"
    );
    assert_eq!(
        decide(&mut m, &back(NARROW, syn_ack)),
        Some(("not_granted", Some(1))),
        "another peer's address"
    );
    let mut quote = out.clone();
    quote.truncate(IPV4_LEN + 8);
    let error_from = |src| ipv4_between(src, local, proto::ICMP, &[], &error(3, 4, &quote));
    assert_eq!(
        decide(&mut m, &error_from(STRANGER)),
        Some(("icmp_related", None)),
        "a router inside the tunnel owns no peer address"
    );
    let mut other = quote.clone();
    other[IPV4_LEN + 1] ^= 1;
    let unrelated = ipv4_between(APP, local, proto::ICMP, &[], &error(3, 4, &other));
    assert_eq!(
        decide(&mut m, &unrelated),
        Some(("icmp_unrelated", Some(0)))
    );
    // The tunnel egress program may see Ethernet frames (TUNNEL_L2).
    let framed = ethernet(
        ETHERTYPE_IPV4,
        &ipv4_between(local, APP, proto::UDP, &[], &datagram(40_000, 7)),
    );
    m.tunnel_egress(&framed, true, TEST_IF, 0);
    let dgram = ethernet(
        ETHERTYPE_IPV4,
        &ipv4_between(APP, local, proto::UDP, &[], &datagram(7, 40_000)),
    );
    assert_eq!(
        m.tunnel_ingress(&dgram, true, TEST_IF, S).map(|d| d.reason),
        Some(reason::PASS_REPLY)
    );
    let edge_only = StatefulModel::new(&edge_policy(), None, &settings())
        .tunnel_ingress(&dgram, true, TEST_IF, 0);
    assert_eq!(edge_only, None, "no tunnel policy, no tunnel decisions");
}

#[test]
fn facts_name_the_prefix_peer_grant_and_flow_that_decided() {
    let mut m = host(EchoRate::default());
    let ssh = m.explain_edge(&eth4(ALLOWED_V4, proto::TCP, &tcp(22)), TEST_IF, 0);
    assert_eq!(
        ssh.facts,
        [Fact::Service {
            service: 0,
            source: Ipv4Addr::from(ALLOWED_V4).into(),
            prefix: Some(net("10.77.0.2/32")),
        }]
    );
    let refused = m.explain_edge(&eth4(OTHER_V4, proto::TCP, &tcp(22)), TEST_IF, 0);
    assert_eq!(refused.reason, reason::DROP_SSH_SOURCE);
    assert!(
        matches!(
            refused.facts[..],
            [
                Fact::Service {
                    service: 0,
                    prefix: None,
                    ..
                },
                Fact::Syn
            ]
        ),
        "{:?}",
        refused.facts
    );
    let granted = m
        .explain_tunnel(&ipv4(APP, proto::TCP, &[], &tcp(8050)), false, TEST_IF, 0)
        .expect("a tunnel policy");
    assert_eq!(
        (granted.reason, granted.peer),
        (reason::PASS_GRANT, Some(0))
    );
    assert_eq!(
        granted.facts,
        [
            Fact::Peer {
                source: Ipv4Addr::from(APP).into(),
                owner: Some((0, net("10.100.0.0/24"))),
            },
            Fact::Grant {
                peer: 0,
                protocol: proto::TCP,
                port: 8050,
                grant: Some(Grant::Ports {
                    protocol: Protocol::Tcp,
                    first: 8000,
                    last: 8100,
                }),
            },
        ]
    );
    // A reply names the flow it belongs to, and how old it is.
    m.edge_egress(&out4(proto::UDP, &datagram(40_000, 53)), TEST_IF, 0);
    let reply = eth4(REMOTE_V4, proto::UDP, &datagram(53, 40_000));
    let e = m.explain_edge(&reply, TEST_IF, 3 * S);
    assert_eq!(e.reason, reason::PASS_REPLY);
    let Some(Fact::Flow {
        flow,
        seen: Some(seen),
    }) = e.facts.last().copied()
    else {
        panic!("no flow in {:?}", e.facts);
    };
    assert_eq!(
        (flow.local_port, flow.remote_port, seen.age_ns, seen.live()),
        (40_000, 53, 3 * S, true)
    );
}

#[test]
fn stateless_verdicts_are_a_fresh_program() {
    let m = edge();
    let request = eth4(OTHER_V4, proto::ICMP, &echo(ICMP_ECHO_REQUEST, 1));
    assert_edge(&m, &request, reason::PASS_ICMP_ECHO, "a fresh bucket");
    assert_edge(
        &m,
        &request,
        reason::PASS_ICMP_ECHO,
        "still fresh: no state is kept",
    );
    let silent = EdgeModel::new(&EdgePolicy {
        icmp_echo: EchoRate {
            ns_per_token: 0,
            burst: 5,
        },
        ..edge_policy()
    });
    assert_edge(&silent, &request, reason::DROP_ICMP_RATE, "rate 0");
    let quote = quote4(proto::UDP, &datagram(40_000, 53));
    let err = eth4(OTHER_V4, proto::ICMP, &error(3, 4, &quote));
    assert_edge(
        &m,
        &err,
        reason::DROP_ICMP_UNRELATED,
        "no flow to relate to",
    );
    let reply = eth4(OTHER_V4, proto::UDP, &datagram(53, 40_000));
    assert_edge(
        &m,
        &reply,
        reason::DROP_PORT_NOT_ALLOWED,
        "no flow to reply to",
    );
    let t = tunnel();
    let err = |src| ipv4(src, proto::ICMP, &[], &error(11, 0, &quote));
    assert_tunnel(
        t.verdict(&err(APP), false),
        reason::DROP_ICMP_UNRELATED,
        Some(0),
        "peer",
    );
    assert_tunnel(
        t.verdict(&err(STRANGER), false),
        reason::DROP_ICMP_UNRELATED,
        None,
        "stranger",
    );
    let answer = ipv4(APP, proto::ICMP, &[], &echo(ICMP_ECHO_REPLY, 1));
    assert_tunnel(
        t.verdict(&answer, false),
        reason::DROP_PROTOCOL_NOT_ALLOWED,
        Some(0),
        "pong",
    );
}
