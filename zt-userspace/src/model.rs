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
//! The state (`zt-ebpf/src/flows.rs`) is modelled by [`FlowTable`] and driven
//! through [`StatefulModel`], with the clock passed in (`now_ns`, the
//! kernel's `bpf_ktime_get_ns`) so tests decide when time passes. The
//! stateless [`EdgeModel::verdict`] and [`TunnelModel::verdict`] judge a
//! packet as the first one a freshly loaded program sees: no flow recorded,
//! and a full echo bucket for every source.
//!
//! The model evaluates a configured program: the kernel's
//! `not_configured` state has no counterpart here. Nor does the kernel's
//! least-recently-used eviction, which is approximate (per-CPU free lists):
//! the model never forgets a flow or an echo source, so it agrees with the
//! kernel while the tables are well below their capacity.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;
use zt_common::{limits, proto, reason, tcp_flag};

use crate::policy::{
    EchoRate, EdgePolicy, FlowSettings, Grant, Mode, PortRange, Protocol, TunnelPolicy,
};

/// Whether a packet the program decided `code` for is a would-drop under
/// `mode`: the policy drops it, but it passes because of audit mode. Parse
/// failures are never would-drops (`reason::drops_in_audit`).
#[must_use]
pub const fn would_drop(mode: Mode, code: u32) -> bool {
    matches!(mode, Mode::Audit) && !reason::is_allow(code) && !reason::drops_in_audit(code)
}

/// Whether a packet the program decided `code` for passes under `mode`.
#[must_use]
pub const fn passes(mode: Mode, code: u32) -> bool {
    reason::is_allow(code) || would_drop(mode, code)
}

const ETHERNET_LEN: usize = 14;
const VLAN_LEN: usize = 4;
/// ARP for Ethernet and IPv4: 8 bytes of header and two (MAC, IPv4) pairs.
const ARP_LEN: usize = 28;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
const TCP_LEN: usize = 20;
const UDP_LEN: usize = 8;
/// Type, code, checksum and four type-specific bytes (the echo identifier
/// and sequence, or an error's MTU or pointer).
const ICMP_LEN: usize = 8;
/// What an ICMP error must quote of the offending packet's L4 header: its
/// ports, or its echo identifier.
const QUOTED_L4_LEN: usize = 8;
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
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

/// Neighbour discovery message types (RFC 4861): router and neighbour
/// solicitation and advertisement, and redirect.
const NEIGHBOR_DISCOVERY: std::ops::RangeInclusive<u8> = 133..=137;
/// Hop limit RFC 4861 requires on neighbour discovery.
const ND_HOP_LIMIT: u8 = 255;
/// Router solicitation, router advertisement and redirect: the neighbour
/// discovery messages that come from or go to routers.
const ROUTER_MESSAGES: [u8; 3] = [133, 134, 137];
/// MLD query, v1 report, v1 done and v2 report (RFC 2710, 3810).
const MLD: [u8; 4] = [130, 131, 132, 143];
/// Hop limit MLD is sent with.
const MLD_HOP_LIMIT: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACHABLE: u8 = 1;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

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

/// Layer 3, with the addresses the policies and flows look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Network {
    /// ARP, with the sender's protocol address.
    Arp {
        sender: Ipv4Addr,
    },
    Ipv4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
    },
    Ipv6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
    },
}

/// What the verdicts read from a packet.
#[derive(Clone, Copy, Debug)]
struct Packet {
    network: Network,
    /// The first fragment of a datagram: its L4 header was parsed.
    first_fragment: bool,
    /// A fragment other than the first: it carries no L4 header.
    later_fragment: bool,
    /// The datagram's identification, for either kind of fragment.
    fragment_id: u32,
    /// IP protocol number (of the L4 header, past IPv6 extension headers).
    protocol: u8,
    hop_limit: u8,
    /// Set only for ICMP over IPv4 and for `ICMPv6`.
    icmp_type: u8,
    /// The echo identifier; set with `icmp_type`.
    icmp_id: u16,
    /// Set only for TCP.
    tcp_flags: u8,
    /// Set only for TCP and UDP.
    src_port: u16,
    dst_port: u16,
    /// Where the L4 header starts and where the IP header's length field
    /// says the packet ends: the bounds of what an ICMP error quotes.
    l4_offset: usize,
    l4_limit: usize,
}

impl Packet {
    const fn new(network: Network) -> Self {
        Self {
            network,
            first_fragment: false,
            later_fragment: false,
            fragment_id: 0,
            protocol: 0,
            hop_limit: 0,
            icmp_type: 0,
            icmp_id: 0,
            tcp_flags: 0,
            src_port: 0,
            dst_port: 0,
            l4_offset: 0,
            l4_limit: 0,
        }
    }

    /// The source address; for ARP the sender's.
    fn source(&self) -> Option<IpAddr> {
        match self.network {
            Network::Arp { sender } => Some(sender.into()),
            _ => self.addresses().map(|(src, _)| src),
        }
    }

    fn is_arp(&self) -> bool {
        matches!(self.network, Network::Arp { .. })
    }

    fn addresses(&self) -> Option<(IpAddr, IpAddr)> {
        match self.network {
            Network::Arp { .. } => None,
            Network::Ipv4 { src, dst } => Some((src.into(), dst.into())),
            Network::Ipv6 { src, dst } => Some((src.into(), dst.into())),
        }
    }

    /// ICMP of the packet's own family: ICMP in IPv4, `ICMPv6` in IPv6.
    fn is_icmp(&self) -> bool {
        match self.network {
            Network::Ipv4 { .. } => self.protocol == proto::ICMP,
            Network::Ipv6 { .. } => self.protocol == proto::ICMPV6,
            Network::Arp { .. } => false,
        }
    }

    fn is_v6(&self) -> bool {
        matches!(self.network, Network::Ipv6 { .. })
    }

    fn is_echo_request(&self) -> bool {
        self.is_icmp()
            && self.icmp_type
                == if self.is_v6() {
                    ICMPV6_ECHO_REQUEST
                } else {
                    ICMP_ECHO_REQUEST
                }
    }

    fn is_echo_reply(&self) -> bool {
        self.is_icmp()
            && self.icmp_type
                == if self.is_v6() {
                    ICMPV6_ECHO_REPLY
                } else {
                    ICMP_ECHO_REPLY
                }
    }

    /// The ICMP errors that can concern a flow of ours.
    fn is_icmp_error(&self) -> bool {
        self.is_icmp()
            && if self.is_v6() {
                matches!(
                    self.icmp_type,
                    ICMPV6_DEST_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED
                )
            } else {
                matches!(self.icmp_type, ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED)
            }
    }

    /// A TCP segment that opens a connection: SYN without ACK.
    fn is_syn(&self) -> bool {
        self.protocol == proto::TCP
            && self.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
    }

    /// A TCP segment that ends a connection: FIN or RST.
    fn is_closing(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0
    }

    fn is_neighbor_discovery(&self) -> bool {
        self.is_v6()
            && self.protocol == proto::ICMPV6
            && NEIGHBOR_DISCOVERY.contains(&self.icmp_type)
            && self.hop_limit == ND_HOP_LIMIT
    }

    /// A router solicitation, advertisement or redirect, at any hop limit.
    fn is_router_message(&self) -> bool {
        self.is_v6() && self.protocol == proto::ICMPV6 && ROUTER_MESSAGES.contains(&self.icmp_type)
    }

    /// From `fe80::/10`.
    fn link_local_source(&self) -> bool {
        matches!(self.network, Network::Ipv6 { src, .. } if src.is_unicast_link_local())
    }

    /// MLD as a host accepts it (RFC 4890 4.4.1): from a link-local source
    /// with hop limit 1.
    fn is_mld(&self) -> bool {
        self.is_v6()
            && self.protocol == proto::ICMPV6
            && MLD.contains(&self.icmp_type)
            && self.hop_limit == MLD_HOP_LIMIT
            && self.link_local_source()
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

fn ipv6_at(bytes: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&bytes[..16]);
    Ipv6Addr::from(a)
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

/// An Ethernet frame when `l2`, else a packet starting at the IP header.
fn parse_link(b: Bytes<'_>, l2: bool) -> Result<Packet, ParseError> {
    if l2 { parse_ethernet(b) } else { parse_ip(b) }
}

fn parse_arp(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let arp: [u8; ARP_LEN] = b.array(offset)?;
    let (hardware_len, protocol_len) = (arp[4], arp[5]);
    if hardware_len != 6 || protocol_len != 4 {
        return Err(ParseError::Malformed);
    }
    let sender = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    Ok(Packet::new(Network::Arp { sender }))
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
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let mut p = Packet::new(Network::Ipv4 { src, dst });
    p.protocol = ip[9];
    p.hop_limit = ip[8];
    let frags = be16(ip[6], ip[7]);
    if frags & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET) != 0 {
        p.fragment_id = u32::from(be16(ip[4], ip[5]));
        if frags & IPV4_FRAGMENT_OFFSET != 0 {
            p.later_fragment = true;
            return Ok(p);
        }
        p.first_fragment = true;
    }
    // The options are never read, so only the L4 header has to be present.
    parse_l4(b, offset + header_len, offset + total_len, p)
}

fn parse_ipv6(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let ip: [u8; IPV6_LEN] = b.array(offset)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let mut p = Packet::new(Network::Ipv6 {
        src: ipv6_at(&ip[8..24]),
        dst: ipv6_at(&ip[24..40]),
    });
    p.hop_limit = ip[7];
    let limit = offset + IPV6_LEN + usize::from(be16(ip[4], ip[5]));
    let mut next = ip[6];
    let mut cursor = offset + IPV6_LEN;
    let mut fragment_header_seen = false;
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
            // Two fragment headers: which id would the stack reassemble by?
            IPV6_FRAGMENT if fragment_header_seen => return Err(ParseError::Malformed),
            IPV6_FRAGMENT => {
                fragment_header_seen = true;
                let ext = extension_header(b, cursor, limit)?;
                next = ext[0];
                let field = be16(ext[2], ext[3]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                if field >> 3 != 0 {
                    p.protocol = next;
                    p.later_fragment = true;
                    p.fragment_id = id;
                    return Ok(p);
                }
                // Offset 0 and "more fragments": the first of a datagram.
                // Offset 0 alone is an atomic fragment, a whole packet.
                if field & 1 != 0 {
                    p.first_fragment = true;
                    p.fragment_id = id;
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
    p.l4_offset = offset;
    p.l4_limit = limit;
    match (p.network, p.protocol) {
        (_, proto::TCP) => {
            within(offset, TCP_LEN, limit)?;
            let tcp: [u8; TCP_LEN] = b.array(offset)?;
            // Data offset, in 32-bit words: the header is at least 5.
            if tcp[12] >> 4 < 5 {
                return Err(ParseError::Malformed);
            }
            p.src_port = be16(tcp[0], tcp[1]);
            p.dst_port = be16(tcp[2], tcp[3]);
            p.tcp_flags = tcp[13];
        }
        (_, proto::UDP) => {
            within(offset, UDP_LEN, limit)?;
            let udp: [u8; UDP_LEN] = b.array(offset)?;
            p.src_port = be16(udp[0], udp[1]);
            p.dst_port = be16(udp[2], udp[3]);
        }
        (Network::Ipv4 { .. }, proto::ICMP) | (Network::Ipv6 { .. }, proto::ICMPV6) => {
            within(offset, ICMP_LEN, limit)?;
            let icmp: [u8; ICMP_LEN] = b.array(offset)?;
            p.icmp_type = icmp[0];
            p.icmp_id = be16(icmp[4], icmp[5]);
        }
        // Other protocols carry nothing the verdicts read.
        _ => {}
    }
    Ok(p)
}

/// A flow as the host sees it, `local` being this host: an egress packet
/// gives it as (source, destination), its reply as (destination, source).
/// An echo flow has the identifier as `local_port` and 0 as `remote_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The interface the flow left by; its replies must come in by it.
    pub ifindex: u32,
    pub local: IpAddr,
    pub remote: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
}

/// What the table knows of a flow (the kernel's `FlowState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub last_seen_ns: u64,
    /// A FIN or RST was seen: the closing timeout applies.
    pub closing: bool,
    /// The host began the flow by answering what the policy passed: it
    /// admits no reply (the kernel's `FLOW_ANSWER`).
    pub answer: bool,
}

/// A fragmented datagram as all its fragments carry it: the interface it
/// arrived on, its addresses, identification and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Datagram {
    pub ifindex: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    /// IPv4's protocol; 0 for IPv6, which reassembles without it.
    pub protocol: u8,
}

/// One source's echo token bucket.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    last_ns: u64,
    tokens: u64,
}

impl Bucket {
    /// Refills one token per `ns_per_token` elapsed, at most `cap`, and takes
    /// one if there is one. The same integer steps as the kernel's
    /// `record::take_token`, including where the refill time moves.
    fn take(&mut self, now_ns: u64, ns_per_token: u64, cap: u64) -> bool {
        let earned = now_ns.saturating_sub(self.last_ns) / ns_per_token;
        if earned > 0 {
            // The kernel adds in plain (wrapping) u64 arithmetic.
            self.tokens = self.tokens.wrapping_add(earned).min(cap);
            self.last_ns = now_ns;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// One thing a decision rested on, in the order the program looked: what
/// `ztxdp explain` reports. The reason code says how a decision ended; these
/// say which rule, table entry or flow led there, or that none matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fact {
    /// UDP to `port`, which `edge.wireguard_ports` lists or not.
    WireguardPort { port: u16, listed: bool },
    /// TCP or UDP (`protocol`) to `port`, which no edge service opens.
    NoService { protocol: u8, port: u16 },
    /// TCP or UDP to a port of edge service `service` (its position in
    /// [`EdgePolicy::services`]; 0 is `ssh`) from `source`: the longest
    /// prefix of its `from` (`ssh_allow`) holding the source, if any. A
    /// decision lists the port's services in order up to the first that
    /// admits the source.
    Service {
        service: u32,
        source: IpAddr,
        prefix: Option<IpNet>,
    },
    /// The tunnel peer (index, prefix) owning `source` by its longest
    /// prefix, if any.
    Peer {
        source: IpAddr,
        owner: Option<(u32, IpNet)>,
    },
    /// TCP or UDP from peer `peer` to `port`: the grant covering it, if any.
    Grant {
        peer: u32,
        protocol: u8,
        port: u16,
        grant: Option<Grant>,
    },
    /// An echo request from peer `peer`, granted `icmp` or not.
    IcmpGrant { peer: u32, granted: bool },
    /// A TCP SYN without ACK: it opens a connection, so it is never a reply.
    Syn,
    /// The host's flow this packet would reply to, or an ICMP error quotes,
    /// and what the table holds of it.
    Flow { flow: Flow, seen: Option<Seen> },
    /// An ICMP error whose quote names no flow: too short, of the other IP
    /// version, a later fragment, behind IPv6 extension headers, or not TCP,
    /// UDP or an echo request.
    Unquoted,
    /// An echo request from `source` to the edge: the tokens its bucket
    /// holds after this one took one, or `None` when it took none (none
    /// left, or echo off).
    Echo {
        source: IpAddr,
        tokens_left: Option<u64>,
    },
    /// A later fragment of `datagram`: how long ago its first fragment
    /// passed, if one did.
    Fragment {
        datagram: Datagram,
        first_passed_ns_ago: Option<u64>,
    },
}

/// What the flow table holds of a flow, when a decision looks it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub entry: FlowEntry,
    /// Since the flow's last packet.
    pub age_ns: u64,
    /// Its timeout, by protocol and whether it is closing.
    pub timeout_ns: u64,
}

impl Seen {
    /// Within its timeout.
    #[must_use]
    pub const fn live(&self) -> bool {
        self.age_ns <= self.timeout_ns
    }
}

/// A decision and what it rested on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Reason code (`zt_common::reason`).
    pub reason: u32,
    /// As [`TunnelDecision::peer`]; `None` on the edge.
    pub peer: Option<u32>,
    /// On the edge, the service the decision names (its position in
    /// [`EdgePolicy::services`]): the first of the port's services that
    /// admits the source, or, when none does, the port's first.
    pub service: Option<u32>,
    pub facts: Vec<Fact>,
}

/// Which ingress program is deciding: only the edge rate-limits echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ingress {
    Edge,
    Tunnel,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The kernel's flow state (`ZT_FLOWS`, `ZT_ECHO_BKT`, `ZT_FLOW_CFG`,
/// `ZT_FRAGS`): flows the host started, with when each was last seen, an
/// echo token bucket per source, and the datagrams whose first fragment
/// passed, with when. One table serves both interfaces, as the one map does
/// in the kernel, but every flow is keyed by the interface it left by, so a
/// flow started through the tunnel admits no reply on the edge (that would
/// let the internet spoof tunnel peers).
#[derive(Clone, Debug)]
pub struct FlowTable {
    flows: HashMap<Flow, FlowEntry>,
    buckets: HashMap<IpAddr, Bucket>,
    fragments: HashMap<Datagram, u64>,
    tcp_established_ns: u64,
    tcp_closing_ns: u64,
    udp_ns: u64,
    icmp_ns: u64,
    fragment_ns: u64,
    echo: EchoRate,
    created: u64,
    /// The interface of the packet being judged or recorded; set by
    /// `StatefulModel` before each packet.
    ifindex: u32,
}

impl FlowTable {
    /// An empty table with the given timeouts and echo rate.
    #[must_use]
    pub fn new(settings: &FlowSettings, echo: EchoRate) -> Self {
        Self {
            flows: HashMap::new(),
            buckets: HashMap::new(),
            fragments: HashMap::new(),
            tcp_established_ns: nanos(settings.tcp_established),
            tcp_closing_ns: nanos(settings.tcp_closing),
            udp_ns: nanos(settings.udp),
            icmp_ns: nanos(settings.icmp),
            fragment_ns: nanos(settings.fragment),
            echo,
            created: 0,
            ifindex: 0,
        }
    }

    /// Flows created so far: the kernel's `flows_created` counter.
    #[must_use]
    pub const fn created(&self) -> u64 {
        self.created
    }

    /// Flows in the table, live or expired: entries are never removed, as
    /// in the kernel's map (short of eviction).
    #[must_use]
    pub fn entries(&self) -> usize {
        self.flows.len()
    }

    /// Puts in a flow as a running host's table holds it: `ztxdp explain`
    /// models the host from the kernel's maps this way.
    pub fn insert_flow(&mut self, flow: Flow, entry: FlowEntry) {
        self.flows.insert(flow, entry);
    }

    /// Puts in `source`'s echo token bucket: `tokens` left, last refilled
    /// at `last_ns`.
    pub fn insert_echo_bucket(&mut self, source: IpAddr, last_ns: u64, tokens: u64) {
        self.buckets.insert(source, Bucket { last_ns, tokens });
    }

    /// Puts in a datagram whose first fragment passed at `at_ns`.
    pub fn insert_fragment(&mut self, datagram: Datagram, at_ns: u64) {
        self.fragments.insert(datagram, at_ns);
    }

    fn timeout_ns(&self, protocol: u8, closing: bool) -> u64 {
        match protocol {
            proto::TCP if closing => self.tcp_closing_ns,
            proto::TCP => self.tcp_established_ns,
            proto::UDP => self.udp_ns,
            _ => self.icmp_ns,
        }
    }

    /// Records or refreshes the flow of a packet the host sends. New flows
    /// start only from what opens one: a TCP SYN, any UDP datagram, an echo
    /// request. A packet of a known flow refreshes it even if it expired.
    /// `answer`: the packet's reverse passes the ingress policy by itself
    /// (a UDP answer through a grant or a `WireGuard` port); a flow it
    /// starts admits no reply, then or later.
    fn egress(&mut self, p: &Packet, answer: bool, now_ns: u64) {
        let Some((src, dst)) = p.addresses() else {
            return;
        };
        if p.later_fragment {
            return;
        }
        let (local_port, remote_port, opens) = match p.protocol {
            proto::TCP => (p.src_port, p.dst_port, p.is_syn()),
            proto::UDP => (p.src_port, p.dst_port, true),
            _ if p.is_echo_request() => (p.icmp_id, 0, true),
            _ => return,
        };
        let flow = Flow {
            ifindex: self.ifindex,
            local: src,
            remote: dst,
            local_port,
            remote_port,
            protocol: p.protocol,
        };
        if let Some(entry) = self.flows.get_mut(&flow) {
            entry.last_seen_ns = now_ns;
            // A new SYN on a closing tuple is a new connection.
            entry.closing = if p.is_syn() {
                false
            } else {
                entry.closing || p.is_closing()
            };
            return;
        }
        if opens {
            self.flows.insert(
                flow,
                FlowEntry {
                    last_seen_ns: now_ns,
                    closing: p.is_closing(),
                    answer,
                },
            );
            self.created += 1;
        }
    }

    /// The datagram `p` is a fragment of, if it is one, on this interface.
    fn datagram(&self, p: &Packet) -> Option<Datagram> {
        let (src, dst) = p.addresses()?;
        (p.first_fragment || p.later_fragment).then_some(Datagram {
            ifindex: self.ifindex,
            src,
            dst,
            id: p.fragment_id,
            protocol: if src.is_ipv4() { p.protocol } else { 0 },
        })
    }

    /// Remembers the datagram of a first fragment that passed with `code`
    /// (but not neighbour discovery): its later fragments then pass for the
    /// fragment timeout. Unlike the kernel's LRU map, this table is never
    /// full; no test fills the kernel's.
    fn remember_fragment(&mut self, p: &Packet, code: u32, now_ns: u64) {
        if p.first_fragment
            && reason::is_allow(code)
            && code != reason::PASS_NEIGHBOR_DISCOVERY
            && let Some(d) = self.datagram(p)
        {
            self.fragments.insert(d, now_ns);
        }
    }

    /// A second look at an ingress packet the policy dropped with `code`:
    /// an exact reply, a related ICMP error, (edge only) an echo request
    /// within its source's rate, or a later fragment of a datagram whose
    /// first fragment passed recently passes; anything else keeps `code`.
    fn second_chance(
        &mut self,
        b: Bytes<'_>,
        p: &Packet,
        code: u32,
        ingress: Ingress,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let Some((src, dst)) = p.addresses() else {
            return code;
        };
        if p.later_fragment {
            let Some(datagram) = self.datagram(p) else {
                return code;
            };
            let age = self
                .fragments
                .get(&datagram)
                .map(|&at| now_ns.saturating_sub(at));
            facts.push(Fact::Fragment {
                datagram,
                first_passed_ns_ago: age,
            });
            return match age {
                Some(age) if age <= self.fragment_ns => reason::PASS_FRAGMENT,
                _ => code,
            };
        }
        if p.is_icmp() {
            return if p.is_echo_request() && ingress == Ingress::Edge {
                self.echo_request(src, now_ns, facts)
            } else if p.is_echo_reply() {
                let flow = Flow {
                    ifindex: self.ifindex,
                    local: dst,
                    remote: src,
                    local_port: p.icmp_id,
                    remote_port: 0,
                    protocol: p.protocol,
                };
                self.reply(flow, false, code, now_ns, facts)
            } else if p.is_icmp_error() {
                self.related(b, p, now_ns, facts)
            } else {
                code
            };
        }
        if p.protocol != proto::TCP && p.protocol != proto::UDP {
            return code;
        }
        // A SYN opens a connection; it is never a reply, whatever its ports.
        if p.is_syn() {
            facts.push(Fact::Syn);
            return code;
        }
        let flow = Flow {
            ifindex: self.ifindex,
            local: dst,
            remote: src,
            local_port: p.dst_port,
            remote_port: p.src_port,
            protocol: p.protocol,
        };
        self.reply(flow, p.is_closing(), code, now_ns, facts)
    }

    /// What the table holds of `flow` at `now_ns`.
    fn seen(&self, flow: &Flow, now_ns: u64) -> Option<Seen> {
        self.flows.get(flow).map(|&entry| Seen {
            entry,
            age_ns: now_ns.saturating_sub(entry.last_seen_ns),
            timeout_ns: self.timeout_ns(flow.protocol, entry.closing),
        })
    }

    /// `reply` if `flow` is live (and then it is seen now, and marked
    /// closing if `closing`), else `code`.
    fn reply(
        &mut self,
        flow: Flow,
        closing: bool,
        code: u32,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let seen = self.seen(&flow, now_ns);
        facts.push(Fact::Flow { flow, seen });
        let Some(Seen { entry, .. }) = seen.filter(|s| !s.entry.answer && s.live()) else {
            return code;
        };
        self.flows.insert(
            flow,
            FlowEntry {
                last_seen_ns: now_ns,
                closing: entry.closing || closing,
                answer: false,
            },
        );
        reason::PASS_REPLY
    }

    /// An ICMP error passes only if it quotes a live flow; it does not
    /// refresh the flow.
    fn related(&self, b: Bytes<'_>, p: &Packet, now_ns: u64, facts: &mut Vec<Fact>) -> u32 {
        let Some(flow) = quoted(b, p).map(|flow| Flow {
            ifindex: self.ifindex,
            ..flow
        }) else {
            facts.push(Fact::Unquoted);
            return reason::DROP_ICMP_UNRELATED;
        };
        let seen = self.seen(&flow, now_ns);
        facts.push(Fact::Flow { flow, seen });
        if seen.is_some_and(|s| s.live()) {
            reason::PASS_ICMP_RELATED
        } else {
            reason::DROP_ICMP_UNRELATED
        }
    }

    /// An echo request to the edge: a token from its source's bucket; a new
    /// source starts with a full bucket.
    fn echo_request(&mut self, src: IpAddr, now_ns: u64, facts: &mut Vec<Fact>) -> u32 {
        let EchoRate {
            ns_per_token,
            burst,
        } = self.echo;
        let passes = if ns_per_token == 0 {
            false
        } else if let Some(bucket) = self.buckets.get_mut(&src) {
            bucket.take(now_ns, ns_per_token, burst)
        } else if burst == 0 {
            false
        } else {
            self.buckets.insert(
                src,
                Bucket {
                    last_ns: now_ns,
                    tokens: burst - 1,
                },
            );
            true
        };
        facts.push(Fact::Echo {
            source: src,
            tokens_left: passes.then(|| self.buckets.get(&src).map_or(0, |b| b.tokens)),
        });
        if passes {
            reason::PASS_ICMP_ECHO
        } else {
            reason::DROP_ICMP_RATE
        }
    }
}

/// The flow an ICMP error `p` quotes: the quoted packet is one the host sent,
/// so its source is local. `None` when the quote is too short (an IP header
/// and 8 bytes of L4 header, within the outer packet's length), of another
/// IP version, a later fragment, an IPv6 packet with extension headers, or
/// not TCP, UDP or an echo request: such an error cannot be matched.
fn quoted(b: Bytes<'_>, p: &Packet) -> Option<Flow> {
    let inner = p.l4_offset + ICMP_LEN;
    let limit = p.l4_limit;
    let (v6, protocol, local, remote, l4) = match p.network {
        Network::Ipv4 { .. } => {
            within(inner, IPV4_LEN, limit).ok()?;
            let ip: [u8; IPV4_LEN] = b.array(inner).ok()?;
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4
                || header_len < IPV4_LEN
                || be16(ip[6], ip[7]) & IPV4_FRAGMENT_OFFSET != 0
            {
                return None;
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (false, ip[9], src.into(), dst.into(), inner + header_len)
        }
        Network::Ipv6 { .. } => {
            within(inner, IPV6_LEN, limit).ok()?;
            let ip: [u8; IPV6_LEN] = b.array(inner).ok()?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let (src, dst) = (ipv6_at(&ip[8..24]), ipv6_at(&ip[24..40]));
            (true, ip[6], src.into(), dst.into(), inner + IPV6_LEN)
        }
        Network::Arp { .. } => return None,
    };
    within(l4, QUOTED_L4_LEN, limit).ok()?;
    let hdr: [u8; QUOTED_L4_LEN] = b.array(l4).ok()?;
    let (local_port, remote_port) = match (v6, protocol) {
        (_, proto::TCP | proto::UDP) => (be16(hdr[0], hdr[1]), be16(hdr[2], hdr[3])),
        // Only the host's own echo requests can draw an error it cares about.
        (false, proto::ICMP) if hdr[0] == ICMP_ECHO_REQUEST => (be16(hdr[4], hdr[5]), 0),
        (true, proto::ICMPV6) if hdr[0] == ICMPV6_ECHO_REQUEST => (be16(hdr[4], hdr[5]), 0),
        _ => return None,
    };
    Some(Flow {
        // The caller sets the interface the error arrived by.
        ifindex: 0,
        local,
        remote,
        local_port,
        remote_port,
        protocol,
    })
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

    /// The longest prefix holding `addr`, with its value.
    fn longest_match(&self, addr: IpAddr) -> Option<(IpNet, V)> {
        let lengths = match addr {
            IpAddr::V4(_) => &self.v4_lengths,
            IpAddr::V6(_) => &self.v6_lengths,
        };
        lengths.iter().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.map.get(&net).map(|&v| (net, v))
        })
    }
}

/// One edge service, as the model reads it: port ranges, and the
/// sources as prefixes to match.
#[derive(Clone, Debug)]
struct ModelService {
    ports: Vec<PortRange>,
    from: PrefixMap<()>,
}

/// The edge program's decisions for one [`EdgePolicy`].
#[derive(Clone, Debug)]
pub struct EdgeModel {
    wireguard_ports: BTreeSet<u16>,
    /// [`EdgePolicy::services`], in order.
    services: Vec<ModelService>,
    echo: EchoRate,
    mode: Mode,
}

impl EdgeModel {
    #[must_use]
    pub fn new(p: &EdgePolicy) -> Self {
        Self {
            wireguard_ports: p.wireguard_ports.iter().copied().collect(),
            services: p
                .services()
                .map(|s| ModelService {
                    ports: s.ports.into_owned(),
                    from: PrefixMap::new(s.from.iter().map(|net| (*net, ()))),
                })
                .collect(),
            echo: p.icmp_echo,
            mode: p.mode,
        }
    }

    /// The edge's mode: with [`passes`] and [`would_drop`], what
    /// `zt_edge` does with a packet of a given reason.
    #[must_use]
    pub const fn mode(&self) -> Mode {
        self.mode
    }

    /// The reason code (`zt_common::reason`) `zt_edge` gives the Ethernet
    /// frame `frame` when it is the first packet of a freshly configured
    /// program: no reply is admitted, every ICMP error is unrelated, no later
    /// fragment follows a first, and an echo request passes unless
    /// `icmp_echo_rate` is "0". For anything later, use [`StatefulModel`].
    #[must_use]
    pub fn verdict(&self, frame: &[u8]) -> u32 {
        let mut fresh = FlowTable::new(&FlowSettings::default(), self.echo);
        self.judge(frame, &mut fresh, 0, &mut Vec::new())
    }

    /// The service a decision about TCP or UDP (`protocol`) to `port`
    /// from `source` names (see [`Explanation::service`]); `None` for a
    /// port of no service.
    #[must_use]
    pub fn service_of(&self, protocol: Protocol, port: u16, source: IpAddr) -> Option<u32> {
        let mut facts = Vec::new();
        self.decide_service(protocol, port, source, &mut facts);
        named_service(&facts)
    }

    fn judge(
        &self,
        frame: &[u8],
        flows: &mut FlowTable,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let b = Bytes(frame);
        match parse_ethernet(b) {
            Ok(p) => {
                let code = match self.decide(&p, facts) {
                    code if reason::is_allow(code) => code,
                    code => flows.second_chance(b, &p, code, Ingress::Edge, now_ns, facts),
                };
                flows.remember_fragment(&p, code, now_ns);
                code
            }
            Err(e) => e.reason(),
        }
    }

    fn decide(&self, p: &Packet, facts: &mut Vec<Fact>) -> u32 {
        if p.is_arp() {
            return reason::PASS_ARP;
        }
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        match p.protocol {
            proto::UDP => {
                let listed = self.wireguard_ports.contains(&p.dst_port);
                facts.push(Fact::WireguardPort {
                    port: p.dst_port,
                    listed,
                });
                if listed {
                    reason::PASS_WIREGUARD
                } else {
                    self.decide_packet_service(p, Protocol::Udp, facts)
                }
            }
            proto::TCP => self.decide_packet_service(p, Protocol::Tcp, facts),
            _ if p.is_neighbor_discovery() => reason::PASS_NEIGHBOR_DISCOVERY,
            _ if p.is_mld() => reason::PASS_MLD,
            _ => reason::DROP_PROTOCOL_NOT_ALLOWED,
        }
    }

    /// TCP or UDP to a port that is no `WireGuard` port: the services of
    /// the port, in order, until one admits the source. The `ssh` service
    /// (the first) keeps its own reasons.
    fn decide_packet_service(&self, p: &Packet, protocol: Protocol, facts: &mut Vec<Fact>) -> u32 {
        match p.source() {
            Some(source) => self.decide_service(protocol, p.dst_port, source, facts),
            // TCP and UDP come over IP: there is always a source.
            None => reason::DROP_MALFORMED,
        }
    }

    fn decide_service(
        &self,
        protocol: Protocol,
        port: u16,
        source: IpAddr,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let mut of_port = self
            .services
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| s.ports.iter().any(|r| r.contains(protocol, port)))
            .peekable();
        let Some(&(_, first)) = of_port.peek() else {
            facts.push(Fact::NoService {
                protocol: protocol.number(),
                port,
            });
            return reason::DROP_PORT_NOT_ALLOWED;
        };
        for (s, service) in of_port {
            let prefix = s.from.longest_match(source).map(|(net, ())| net);
            facts.push(Fact::Service {
                service,
                source,
                prefix,
            });
            if prefix.is_some() {
                return if service == 0 {
                    reason::PASS_SSH
                } else {
                    reason::PASS_SERVICE
                };
            }
        }
        if first == 0 {
            reason::DROP_SSH_SOURCE
        } else {
            reason::DROP_SERVICE_SOURCE
        }
    }

    /// Whether the policy alone passes UDP to `port` from `source`.
    fn passes_udp(&self, port: u16, source: IpAddr) -> bool {
        self.wireguard_ports.contains(&port)
            || self.services.iter().any(|s| {
                s.ports.iter().any(|r| r.contains(Protocol::Udp, port))
                    && s.from.longest_match(source).is_some()
            })
    }
}

/// Whether a decision of reason `code` is a service's, and names it: an
/// `ssh_allowed` or `service_allowed`, or a drop for the source.
#[must_use]
pub const fn names_service(code: u32) -> bool {
    matches!(
        code,
        reason::PASS_SSH
            | reason::PASS_SERVICE
            | reason::DROP_SSH_SOURCE
            | reason::DROP_SERVICE_SOURCE
    )
}

/// The service a decision's facts name: the one that admitted the source,
/// else the first of the port's.
fn named_service(facts: &[Fact]) -> Option<u32> {
    let mut first = None;
    for fact in facts {
        if let Fact::Service {
            service, prefix, ..
        } = fact
        {
            if prefix.is_some() {
                return Some(*service);
            }
            first = first.or(Some(*service));
        }
    }
    first
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
    mode: Mode,
}

impl ModelPeer {
    /// The grant covering `port` of `protocol` (TCP or UDP), if any.
    fn grant_for(&self, protocol: u8, port: u16) -> Option<Grant> {
        self.grants.iter().copied().find(|g| match *g {
            Grant::Ports {
                protocol: granted,
                first,
                last,
            } => granted.number() == protocol && (first..=last).contains(&port),
            Grant::Icmp => false,
        })
    }
}

/// The tunnel program's decisions for one [`TunnelPolicy`]. Runtime grants
/// must already be merged into the peers' `grants`.
#[derive(Clone, Debug)]
pub struct TunnelModel {
    peers: Vec<ModelPeer>,
    by_source: PrefixMap<u32>,
    /// `tunnel.link_local_neighbors`.
    link_local_neighbors: bool,
    /// The program's mode, for packets of no peer.
    mode: Mode,
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
                mode: peer.mode,
            })
            .collect();
        let by_source = PrefixMap::new(
            (0u32..)
                .zip(&p.peers)
                .flat_map(|(index, peer)| peer.addresses.iter().map(move |net| (*net, index))),
        );
        Self {
            peers,
            by_source,
            link_local_neighbors: p.link_local_neighbors,
            mode: p.mode,
        }
    }

    /// The mode `zt_tunnel` applies to a packet of `peer` (a
    /// [`TunnelDecision::peer`]): the peer's own, or the program's for a
    /// packet of no peer.
    #[must_use]
    pub fn mode_of(&self, peer: Option<u32>) -> Mode {
        peer.and_then(|i| self.peers.get(i as usize))
            .map_or(self.mode, |p| p.mode)
    }

    /// The decision `zt_tunnel` makes on `packet` (an Ethernet frame when
    /// `l2`, the loader's `TUNNEL_L2`, else a packet starting at the IP
    /// header) when it is the first packet of a freshly configured program:
    /// no reply is admitted, every ICMP error is unrelated and no later
    /// fragment follows a first. For anything later, use [`StatefulModel`].
    #[must_use]
    pub fn verdict(&self, packet: &[u8], l2: bool) -> TunnelDecision {
        // The tunnel never rate-limits echo, so the rate is irrelevant.
        let mut fresh = FlowTable::new(&FlowSettings::default(), EchoRate::default());
        let e = self.judge(packet, l2, &mut fresh, 0);
        TunnelDecision {
            reason: e.reason,
            peer: e.peer,
        }
    }

    fn judge(&self, packet: &[u8], l2: bool, flows: &mut FlowTable, now_ns: u64) -> Explanation {
        let b = Bytes(packet);
        let mut facts = Vec::new();
        match parse_link(b, l2) {
            Ok(p) => {
                let source = p.source();
                let owner = source.and_then(|src| self.by_source.longest_match(src));
                if let Some(source) = source {
                    facts.push(Fact::Peer {
                        source,
                        owner: owner.map(|(net, index)| (index, net)),
                    });
                }
                let peer = owner.map(|(_, index)| index);
                let reason = match self.decide(&p, peer, l2, &mut facts) {
                    code if reason::is_allow(code) => code,
                    code => flows.second_chance(b, &p, code, Ingress::Tunnel, now_ns, &mut facts),
                };
                flows.remember_fragment(&p, reason, now_ns);
                Explanation {
                    reason,
                    peer,
                    service: None,
                    facts,
                }
            }
            Err(e) => Explanation {
                reason: e.reason(),
                peer: None,
                service: None,
                facts,
            },
        }
    }

    /// Whether the policy alone passes UDP from `peer_addr` to `port`: the
    /// peer owning the address is granted it.
    fn passes_udp(&self, peer_addr: IpAddr, port: u16) -> bool {
        self.by_source
            .longest_match(peer_addr)
            .and_then(|(_, i)| self.peers.get(i as usize))
            .is_some_and(|peer| peer.grant_for(proto::UDP, port).is_some())
    }

    fn decide(&self, p: &Packet, peer: Option<u32>, l2: bool, facts: &mut Vec<Fact>) -> u32 {
        // A peer is never the host's router.
        if p.is_router_message() {
            return reason::DROP_ROUTER_MESSAGE;
        }
        // ARP and neighbour messages pass only on a link layer, from a
        // peer's address or (where allowed) a link-local one.
        let neighbor = if p.is_arp() {
            Some(reason::PASS_ARP)
        } else if p.is_neighbor_discovery() {
            Some(reason::PASS_NEIGHBOR_DISCOVERY)
        } else {
            None
        };
        if let Some(pass) = neighbor {
            return if l2 && (peer.is_some() || (self.link_local_neighbors && p.link_local_source()))
            {
                pass
            } else if peer.is_some() {
                reason::DROP_PROTOCOL_NOT_ALLOWED
            } else {
                reason::DROP_PEER_UNKNOWN
            };
        }
        let Some((index, peer)) = peer.and_then(|i| self.peers.get(i as usize).map(|p| (i, p)))
        else {
            return reason::DROP_PEER_UNKNOWN;
        };
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        if p.protocol == proto::TCP || p.protocol == proto::UDP {
            let grant = peer.grant_for(p.protocol, p.dst_port);
            facts.push(Fact::Grant {
                peer: index,
                protocol: p.protocol,
                port: p.dst_port,
                grant,
            });
            if grant.is_some() {
                reason::PASS_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        } else if p.is_echo_request() {
            facts.push(Fact::IcmpGrant {
                peer: index,
                granted: peer.icmp,
            });
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

/// The edge and tunnel programs together with their shared flow state, fed
/// packets in order with the time of each (`now_ns`, as
/// `bpf_ktime_get_ns`, never going backwards).
#[derive(Clone, Debug)]
pub struct StatefulModel {
    edge: EdgeModel,
    tunnel: Option<TunnelModel>,
    flows: FlowTable,
}

impl StatefulModel {
    /// A freshly configured host: no flows, no echo sources seen. The echo
    /// rate is the edge's (`edge.icmp_echo_rate`).
    #[must_use]
    pub fn new(edge: &EdgePolicy, tunnel: Option<&TunnelPolicy>, flows: &FlowSettings) -> Self {
        Self {
            edge: EdgeModel::new(edge),
            tunnel: tunnel.map(TunnelModel::new),
            flows: FlowTable::new(flows, edge.icmp_echo),
        }
    }

    /// The host sends the Ethernet frame `frame` out of the edge interface
    /// `ifindex` (`zt_edge_out`). Egress is never filtered; this only
    /// records flows.
    pub fn edge_egress(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) {
        self.flows.ifindex = ifindex;
        if let Ok(p) = parse_ethernet(Bytes(frame)) {
            // A datagram from a WireGuard port, or from a service's port
            // to a source it admits, answers the edge's policy.
            let answer = p.protocol == proto::UDP
                && p.addresses()
                    .is_some_and(|(_, dst)| self.edge.passes_udp(p.src_port, dst));
            self.flows.egress(&p, answer, now_ns);
        }
    }

    /// The host sends `packet` out of the tunnel interface `ifindex`
    /// (`zt_tunnel_out`): an Ethernet frame when `l2`, else a packet
    /// starting at the IP header. Records flows only.
    pub fn tunnel_egress(&mut self, packet: &[u8], l2: bool, ifindex: u32, now_ns: u64) {
        self.flows.ifindex = ifindex;
        if let Ok(p) = parse_link(Bytes(packet), l2) {
            // A datagram from a port the destination peer is granted answers
            // the tunnel's policy.
            let answer = p.protocol == proto::UDP
                && p.addresses().is_some_and(|(_, dst)| {
                    self.tunnel
                        .as_ref()
                        .is_some_and(|t| t.passes_udp(dst, p.src_port))
                });
            self.flows.egress(&p, answer, now_ns);
        }
    }

    /// `zt_edge`'s reason code for the Ethernet frame `frame` arriving now.
    pub fn edge_ingress(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) -> u32 {
        self.explain_edge(frame, ifindex, now_ns).reason
    }

    /// [`Self::edge_ingress`], with what the decision rested on.
    pub fn explain_edge(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) -> Explanation {
        self.flows.ifindex = ifindex;
        let mut facts = Vec::new();
        let reason = self.edge.judge(frame, &mut self.flows, now_ns, &mut facts);
        Explanation {
            reason,
            peer: None,
            service: names_service(reason)
                .then(|| named_service(&facts))
                .flatten(),
            facts,
        }
    }

    /// `zt_tunnel`'s decision on `packet` arriving now (framed as in
    /// [`Self::tunnel_egress`]); `None` when the model has no tunnel policy.
    pub fn tunnel_ingress(
        &mut self,
        packet: &[u8],
        l2: bool,
        ifindex: u32,
        now_ns: u64,
    ) -> Option<TunnelDecision> {
        self.explain_tunnel(packet, l2, ifindex, now_ns)
            .map(|e| TunnelDecision {
                reason: e.reason,
                peer: e.peer,
            })
    }

    /// [`Self::tunnel_ingress`], with what the decision rested on.
    pub fn explain_tunnel(
        &mut self,
        packet: &[u8],
        l2: bool,
        ifindex: u32,
        now_ns: u64,
    ) -> Option<Explanation> {
        self.flows.ifindex = ifindex;
        let tunnel = self.tunnel.as_ref()?;
        Some(tunnel.judge(packet, l2, &mut self.flows, now_ns))
    }

    /// The control plane rewrites the policy maps (`allow`, `revoke`, a
    /// reload) while the flow state stays, as it does in the kernel.
    pub fn set_policy(&mut self, edge: &EdgePolicy, tunnel: Option<&TunnelPolicy>) {
        self.edge = EdgeModel::new(edge);
        self.tunnel = tunnel.map(TunnelModel::new);
    }

    /// The edge's mode (see [`EdgeModel::mode`]).
    #[must_use]
    pub const fn edge_mode(&self) -> Mode {
        self.edge.mode
    }

    /// The tunnel's mode for `peer` (see [`TunnelModel::mode_of`]);
    /// `None` without a tunnel policy.
    #[must_use]
    pub fn tunnel_mode_of(&self, peer: Option<u32>) -> Option<Mode> {
        self.tunnel.as_ref().map(|t| t.mode_of(peer))
    }

    /// The flow state, for comparing counters and fill levels.
    #[must_use]
    pub const fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// The flow state, to fill it from a running host's maps.
    pub const fn flows_mut(&mut self) -> &mut FlowTable {
        &mut self.flows
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// The interface every test packet uses; the kernel keys flows by it too.
    const TEST_IF: u32 = 2;
    use crate::policy::{Peer, Protocol};

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

    fn ipv4_between(
        src: [u8; 4],
        dst: [u8; 4],
        protocol: u8,
        options: &[u8],
        l4: &[u8],
    ) -> Vec<u8> {
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
        let err6 =
            |kind, quote: &[u8]| eth6("2001:db8:ffff::1", proto::ICMPV6, &error(kind, 0, quote));
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
}
