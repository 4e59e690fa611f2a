//! The reference model of the policy: the decisions of `zt_edge` and
//! `zt_tunnel`, recomputed in plain safe Rust over a packet's bytes.
//!
//! It is written from the rules, not from the BPF code's data structures: it
//! reads bytes from a slice instead of casting header structs, matches
//! prefixes with `ipnet` instead of an LPM trie, and checks grants as port
//! ranges instead of 64-port bitmap words. What it shares with the kernel is
//! the *behaviour*, to the reason code: the same order of checks and the same
//! reason for every malformed case (`zt-ebpf/src/parse.rs` and `verdict.rs`).
//! The differential tests hold the two to that, packet by packet, so a
//! disagreement is a bug in one of them.
//!
//! The model evaluates a configured program: the kernel's
//! `not_configured` state has no counterpart here.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use zt_common::{limits, proto, reason};

use crate::policy::{EdgePolicy, Grant, TunnelPolicy};

const ETHERNET_LEN: usize = 14;
const VLAN_LEN: usize = 4;
/// ARP for Ethernet and IPv4: 8 bytes of header and two (MAC, IPv4) pairs.
const ARP_LEN: usize = 28;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// Type, code and checksum.
const ICMP_LEN: usize = 4;
/// Every IPv6 extension header is at least this long.
const IPV6_EXT_MIN_LEN: usize = 8;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86DD;
const ETHERTYPE_8021Q: u16 = 0x8100;
const ETHERTYPE_8021AD: u16 = 0x88A8;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// Neighbour discovery message types (RFC 4861): router and neighbour
/// solicitation and advertisement, and redirect.
const NEIGHBOR_DISCOVERY: std::ops::RangeInclusive<u8> = 133..=137;
/// Hop limit RFC 4861 requires on neighbour discovery.
const ND_HOP_LIMIT: u8 = 255;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// Why a packet could not be parsed; each is one drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ParseError {
    /// Truncated, or a header field that contradicts the packet.
    Malformed,
    /// More VLAN tags or IPv6 extension headers than the parser walks.
    HeaderLimit,
    /// Neither ARP, IPv4 nor IPv6.
    UnsupportedL3,
}

impl ParseError {
    const fn reason(self) -> u32 {
        match self {
            Self::Malformed => reason::DROP_MALFORMED,
            Self::HeaderLimit => reason::DROP_HEADER_LIMIT,
            Self::UnsupportedL3 => reason::DROP_UNSUPPORTED_L3,
        }
    }
}

/// Layer 3, with the source address the policies look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    Arp,
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
}

/// What the verdicts read from a packet.
#[derive(Clone, Copy, Debug)]
struct Packet {
    network: Network,
    /// A fragment other than the first: it carries no L4 header.
    later_fragment: bool,
    /// IP protocol number (of the L4 header, past IPv6 extension headers).
    protocol: u8,
    hop_limit: u8,
    /// Set only for ICMP over IPv4 and for `ICMPv6`.
    icmp_type: u8,
    /// Set only for TCP and UDP.
    dst_port: u16,
}

impl Packet {
    const fn new(network: Network) -> Self {
        Self {
            network,
            later_fragment: false,
            protocol: 0,
            hop_limit: 0,
            icmp_type: 0,
            dst_port: 0,
        }
    }

    fn source(&self) -> Option<IpAddr> {
        match self.network {
            Network::Arp => None,
            Network::Ipv4(a) => Some(IpAddr::V4(a)),
            Network::Ipv6(a) => Some(IpAddr::V6(a)),
        }
    }

    fn is_neighbor_discovery(&self) -> bool {
        matches!(self.network, Network::Ipv6(_))
            && self.protocol == proto::ICMPV6
            && NEIGHBOR_DISCOVERY.contains(&self.icmp_type)
            && self.hop_limit == ND_HOP_LIMIT
    }
}

/// The packet's bytes; every read is bounds-checked and a short packet is
/// [`ParseError::Malformed`].
#[derive(Clone, Copy)]
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn array<const N: usize>(self, offset: usize) -> Result<[u8; N], ParseError> {
        let end = offset.checked_add(N).ok_or(ParseError::Malformed)?;
        self.0
            .get(offset..end)
            .and_then(|s| s.try_into().ok())
            .ok_or(ParseError::Malformed)
    }
}

/// A header of `len` bytes at `offset` must end within `limit`, where the IP
/// header's own length field says the packet ends (trailing frame bytes do
/// not count). The frame bound is checked separately, by the read.
fn within(offset: usize, len: usize, limit: usize) -> Result<(), ParseError> {
    if offset + len > limit {
        Err(ParseError::Malformed)
    } else {
        Ok(())
    }
}

fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

/// A frame that starts with an Ethernet header.
fn parse_ethernet(b: Bytes<'_>) -> Result<Packet, ParseError> {
    let eth: [u8; ETHERNET_LEN] = b.array(0)?;
    let mut ethertype = be16(eth[12], eth[13]);
    let mut offset = ETHERNET_LEN;
    for _ in 0..limits::MAX_VLAN {
        if ethertype != ETHERTYPE_8021Q && ethertype != ETHERTYPE_8021AD {
            break;
        }
        let tag: [u8; VLAN_LEN] = b.array(offset)?;
        ethertype = be16(tag[2], tag[3]);
        offset += VLAN_LEN;
    }
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(b, offset),
        ETHERTYPE_IPV6 => parse_ipv6(b, offset),
        ETHERTYPE_ARP => parse_arp(b, offset),
        // A tag beyond the ones walked: refused, never skipped.
        ETHERTYPE_8021Q | ETHERTYPE_8021AD => Err(ParseError::HeaderLimit),
        _ => Err(ParseError::UnsupportedL3),
    }
}

/// A packet that starts with the IP header (a layer-3 tunnel device).
fn parse_ip(b: Bytes<'_>) -> Result<Packet, ParseError> {
    // The kernel reads a whole minimal IPv4 header before looking at the
    // version, so anything shorter is malformed whatever its version.
    let first: [u8; IPV4_LEN] = b.array(0)?;
    match first[0] >> 4 {
        4 => parse_ipv4(b, 0),
        6 => parse_ipv6(b, 0),
        _ => Err(ParseError::UnsupportedL3),
    }
}

fn parse_arp(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let arp: [u8; ARP_LEN] = b.array(offset)?;
    let (hardware_len, protocol_len) = (arp[4], arp[5]);
    if hardware_len != 6 || protocol_len != 4 {
        return Err(ParseError::Malformed);
    }
    Ok(Packet::new(Network::Arp))
}

fn parse_ipv4(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let ip: [u8; IPV4_LEN] = b.array(offset)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < IPV4_LEN {
        return Err(ParseError::Malformed);
    }
    let total_len = usize::from(be16(ip[2], ip[3]));
    if total_len < header_len {
        return Err(ParseError::Malformed);
    }
    let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let mut p = Packet::new(Network::Ipv4(source));
    p.protocol = ip[9];
    p.hop_limit = ip[8];
    let fragment_offset = be16(ip[6], ip[7]) & 0x1fff;
    if fragment_offset != 0 {
        p.later_fragment = true;
        return Ok(p);
    }
    // The options are never read, so only the L4 header has to be present.
    parse_l4(b, offset + header_len, offset + total_len, p)
}

fn parse_ipv6(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let ip: [u8; IPV6_LEN] = b.array(offset)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let mut source = [0u8; 16];
    source.copy_from_slice(&ip[8..24]);
    let mut p = Packet::new(Network::Ipv6(Ipv6Addr::from(source)));
    p.hop_limit = ip[7];
    let limit = offset + IPV6_LEN + usize::from(be16(ip[4], ip[5]));
    let mut next = ip[6];
    let mut cursor = offset + IPV6_LEN;
    // One pass per extension header plus one for the L4 header: a chain of
    // more than MAX_IPV6_EXT headers runs out of passes.
    for _ in 0..=limits::MAX_IPV6_EXT {
        let len = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext = extension_header(b, cursor, limit)?;
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            IPV6_AUTH => {
                let ext = extension_header(b, cursor, limit)?;
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            IPV6_FRAGMENT => {
                let ext = extension_header(b, cursor, limit)?;
                next = ext[0];
                if be16(ext[2], ext[3]) >> 3 != 0 {
                    p.protocol = next;
                    p.later_fragment = true;
                    return Ok(p);
                }
                IPV6_EXT_MIN_LEN
            }
            _ => {
                p.protocol = next;
                return parse_l4(b, cursor, limit, p);
            }
        };
        cursor += len;
    }
    Err(ParseError::HeaderLimit)
}

/// The first 8 bytes of an extension header, which must lie inside both the
/// payload length and the frame.
fn extension_header(
    b: Bytes<'_>,
    cursor: usize,
    limit: usize,
) -> Result<[u8; IPV6_EXT_MIN_LEN], ParseError> {
    within(cursor, IPV6_EXT_MIN_LEN, limit)?;
    b.array(cursor)
}

fn parse_l4(
    b: Bytes<'_>,
    offset: usize,
    limit: usize,
    mut p: Packet,
) -> Result<Packet, ParseError> {
    match (p.network, p.protocol) {
        (_, proto::TCP) => {
            within(offset, TCP_LEN, limit)?;
            let tcp: [u8; TCP_LEN] = b.array(offset)?;
            // Data offset, in 32-bit words: the header is at least 5.
            if tcp[12] >> 4 < 5 {
                return Err(ParseError::Malformed);
            }
            p.dst_port = be16(tcp[2], tcp[3]);
        }
        (_, proto::UDP) => {
            within(offset, UDP_LEN, limit)?;
            let udp: [u8; UDP_LEN] = b.array(offset)?;
            p.dst_port = be16(udp[2], udp[3]);
        }
        (Network::Ipv4(_), proto::ICMP) | (Network::Ipv6(_), proto::ICMPV6) => {
            within(offset, ICMP_LEN, limit)?;
            let icmp: [u8; ICMP_LEN] = b.array(offset)?;
            p.icmp_type = icmp[0];
        }
        // Other protocols carry nothing the verdicts read.
        _ => {}
    }
    Ok(p)
}

/// Longest-prefix match: the prefixes in a hash map, probed from the longest
/// prefix length in use to the shortest.
#[derive(Clone, Debug)]
struct PrefixMap<V> {
    map: HashMap<IpNet, V>,
    /// Prefix lengths in use, longest first.
    v4_lengths: Vec<u8>,
    v6_lengths: Vec<u8>,
}

impl<V: Copy> PrefixMap<V> {
    /// A later entry for the same prefix replaces an earlier one, as a
    /// second update of the same trie key does.
    fn new(entries: impl IntoIterator<Item = (IpNet, V)>) -> Self {
        let mut map = HashMap::new();
        let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
        for (net, value) in entries {
            match net {
                IpNet::V4(_) => v4.insert(net.prefix_len()),
                IpNet::V6(_) => v6.insert(net.prefix_len()),
            };
            map.insert(net.trunc(), value);
        }
        Self {
            map,
            v4_lengths: v4.into_iter().rev().collect(),
            v6_lengths: v6.into_iter().rev().collect(),
        }
    }

    fn longest_match(&self, addr: IpAddr) -> Option<V> {
        let lengths = match addr {
            IpAddr::V4(_) => &self.v4_lengths,
            IpAddr::V6(_) => &self.v6_lengths,
        };
        lengths.iter().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.map.get(&net).copied()
        })
    }
}

/// The edge program's decisions for one [`EdgePolicy`].
#[derive(Clone, Debug)]
pub struct EdgeModel {
    wireguard_ports: BTreeSet<u16>,
    ssh_port: u16,
    ssh_allow: PrefixMap<()>,
}

impl EdgeModel {
    #[must_use]
    pub fn new(p: &EdgePolicy) -> Self {
        Self {
            wireguard_ports: p.wireguard_ports.iter().copied().collect(),
            ssh_port: p.ssh_port,
            ssh_allow: PrefixMap::new(p.ssh_allow.iter().map(|net| (*net, ()))),
        }
    }

    /// The reason code (`zt_common::reason`) `zt_edge` gives the Ethernet
    /// frame `frame`.
    #[must_use]
    pub fn verdict(&self, frame: &[u8]) -> u32 {
        match parse_ethernet(Bytes(frame)) {
            Ok(p) => self.decide(&p),
            Err(e) => e.reason(),
        }
    }

    fn decide(&self, p: &Packet) -> u32 {
        if p.network == Network::Arp {
            return reason::PASS_ARP;
        }
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        match p.protocol {
            proto::UDP if self.wireguard_ports.contains(&p.dst_port) => reason::PASS_WIREGUARD,
            proto::UDP => reason::DROP_PORT_NOT_ALLOWED,
            proto::TCP if p.dst_port != self.ssh_port => reason::DROP_PORT_NOT_ALLOWED,
            proto::TCP => {
                let allowed = p
                    .source()
                    .and_then(|src| self.ssh_allow.longest_match(src))
                    .is_some();
                if allowed {
                    reason::PASS_SSH
                } else {
                    reason::DROP_SSH_SOURCE
                }
            }
            _ if p.is_neighbor_discovery() => reason::PASS_NEIGHBOR_DISCOVERY,
            _ => reason::DROP_PROTOCOL_NOT_ALLOWED,
        }
    }
}

/// One tunnel decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelDecision {
    /// Reason code (`zt_common::reason`).
    pub reason: u32,
    /// Index in [`TunnelPolicy::peers`] of the peer the source address
    /// belongs to: set exactly when the kernel counts the packet for a peer
    /// (it parsed, and the source matched), whatever the reason.
    pub peer: Option<u32>,
}

/// A peer as the verdict needs it.
#[derive(Clone, Debug)]
struct ModelPeer {
    grants: Vec<Grant>,
    icmp: bool,
}

/// The tunnel program's decisions for one [`TunnelPolicy`]. Runtime grants
/// must already be merged into the peers' `grants`.
#[derive(Clone, Debug)]
pub struct TunnelModel {
    peers: Vec<ModelPeer>,
    by_source: PrefixMap<u32>,
}

impl TunnelModel {
    #[must_use]
    pub fn new(p: &TunnelPolicy) -> Self {
        let peers = p
            .peers
            .iter()
            .map(|peer| ModelPeer {
                grants: peer.grants.clone(),
                icmp: peer.grants.contains(&Grant::Icmp),
            })
            .collect();
        let by_source = PrefixMap::new(
            (0u32..)
                .zip(&p.peers)
                .flat_map(|(index, peer)| peer.addresses.iter().map(move |net| (*net, index))),
        );
        Self { peers, by_source }
    }

    /// The decision `zt_tunnel` makes on `packet`: an Ethernet frame when
    /// `l2` (the loader's `TUNNEL_L2`), else a packet starting at the IP header.
    #[must_use]
    pub fn verdict(&self, packet: &[u8], l2: bool) -> TunnelDecision {
        let parsed = if l2 {
            parse_ethernet(Bytes(packet))
        } else {
            parse_ip(Bytes(packet))
        };
        match parsed {
            Ok(p) => {
                let peer = p.source().and_then(|src| self.by_source.longest_match(src));
                TunnelDecision {
                    reason: self.decide(&p, peer),
                    peer,
                }
            }
            Err(e) => TunnelDecision {
                reason: e.reason(),
                peer: None,
            },
        }
    }

    fn decide(&self, p: &Packet, peer: Option<u32>) -> u32 {
        if p.network == Network::Arp {
            return reason::PASS_ARP;
        }
        if p.is_neighbor_discovery() {
            return reason::PASS_NEIGHBOR_DISCOVERY;
        }
        let Some(peer) = peer.and_then(|i| self.peers.get(i as usize)) else {
            return reason::DROP_PEER_UNKNOWN;
        };
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        let echo = match p.network {
            Network::Ipv4(_) => p.protocol == proto::ICMP && p.icmp_type == ICMP_ECHO_REQUEST,
            Network::Ipv6(_) => p.protocol == proto::ICMPV6 && p.icmp_type == ICMPV6_ECHO_REQUEST,
            Network::Arp => false,
        };
        if p.protocol == proto::TCP || p.protocol == proto::UDP {
            let granted = peer.grants.iter().any(|g| match *g {
                Grant::Ports {
                    protocol,
                    first,
                    last,
                } => protocol.number() == p.protocol && (first..=last).contains(&p.dst_port),
                Grant::Icmp => false,
            });
            if granted {
                reason::PASS_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        } else if echo {
            if peer.icmp {
                reason::PASS_ICMP_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        } else {
            reason::DROP_PROTOCOL_NOT_ALLOWED
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::policy::{Peer, Protocol};

    // Packet builders. Checksums are left zero: neither program reads them.

    const ALLOWED_V4: [u8; 4] = [10, 77, 0, 2];
    const OTHER_V4: [u8; 4] = [198, 51, 100, 9];
    const ALLOWED_V6: &str = "fd77::2";
    const OTHER_V6: &str = "2001:db8::9";

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

    /// IPv4 with `options` (a multiple of 4 bytes) and an honest length.
    fn ipv4(src: [u8; 4], protocol: u8, options: &[u8], l4: &[u8]) -> Vec<u8> {
        let header_len = IPV4_LEN + options.len();
        let total = u16::try_from(header_len + l4.len()).expect("test packet fits");
        let ihl = u8::try_from(header_len / 4).expect("test IHL");
        let mut p = vec![0x40 | ihl, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0]); // id 1, DF
        p.extend_from_slice(&src);
        p.extend_from_slice(&[10, 77, 0, 1]);
        p.extend_from_slice(options);
        p.extend_from_slice(l4);
        p
    }

    /// IPv6 whose payload is `rest` (extension headers and L4), hop limit 64.
    fn ipv6(src: [u8; 16], next: u8, rest: &[u8]) -> Vec<u8> {
        let len = u16::try_from(rest.len()).expect("test packet fits");
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&len.to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&src);
        p.extend_from_slice(&addr6("fd77::1"));
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
        EdgeModel::new(&EdgePolicy {
            interface: "eth0".into(),
            wireguard_ports: vec![51820, 51821],
            ssh_port: 22,
            ssh_allow: vec![net("10.77.0.2/32"), net("fd77::/64")],
        })
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
        let mut echo = eth6(OTHER_V6, proto::ICMPV6, &icmp(128));
        echo[ETHERNET_LEN + 7] = 255;
        assert_edge(&m, &echo, reason::DROP_PROTOCOL_NOT_ALLOWED, "icmpv6 echo");
        assert_edge(
            &m,
            &eth4(ALLOWED_V4, proto::ICMP, &icmp(8)),
            reason::DROP_PROTOCOL_NOT_ALLOWED,
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
        let short_icmp = eth4(OTHER_V4, proto::ICMP, &[8, 0, 0]);
        assert_edge(&m, &short_icmp, reason::DROP_MALFORMED, "3-byte icmp");
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
    fn assert_truncations_malformed(
        frame: &[u8],
        headers_end: usize,
        check: impl Fn(&[u8]) -> u32,
    ) {
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
        assert_truncations_malformed(&l3, l3.len() - 4, |f| t.verdict(f, false).reason);
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
        }
    }

    fn tunnel() -> TunnelModel {
        let ports = |protocol, first, last| Grant::Ports {
            protocol,
            first,
            last,
        };
        TunnelModel::new(&TunnelPolicy {
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
            runtime_grants: PathBuf::from("/nonexistent/grants.json"),
        })
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
    fn tunnel_on_a_link_layer_passes_arp_and_nd_but_counts_peers() {
        let t = tunnel();
        let arp = ethernet(ETHERTYPE_ARP, &arp(6, 4));
        assert_tunnel(
            t.verdict(&arp, true),
            reason::PASS_ARP,
            None,
            "arp has no source",
        );
        let nd = |src| {
            let mut f = eth6(src, proto::ICMPV6, &icmp(135));
            f[ETHERNET_LEN + 7] = 255;
            f
        };
        assert_tunnel(
            t.verdict(&nd("fe80::1"), true),
            reason::PASS_NEIGHBOR_DISCOVERY,
            None,
            "nd from stranger",
        );
        assert_tunnel(
            t.verdict(&nd("fd00:100::1"), true),
            reason::PASS_NEIGHBOR_DISCOVERY,
            Some(0),
            "nd from peer",
        );
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
}
