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

/// ICMPv6 router/neighbour solicitation/advertisement and redirect.
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
    /// Set only for ICMP in IPv4 and ICMPv6 in IPv6.
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

/// A packet that starts with the IP header (a WireGuard device).
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
