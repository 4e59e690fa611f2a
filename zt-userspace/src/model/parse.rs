//! The packet parser of the model: `zt-ebpf/src/parse.rs` recomputed over
//! a byte slice, to the same reason for every malformed case.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use zt_common::{limits, proto, reason, tcp_flag};

pub(crate) const ETHERNET_LEN: usize = 14;
pub(crate) const VLAN_LEN: usize = 4;
/// ARP for Ethernet and IPv4: 8 bytes of header and two (MAC, IPv4) pairs.
pub(crate) const ARP_LEN: usize = 28;
pub(crate) const IPV4_LEN: usize = 20;
pub(crate) const IPV6_LEN: usize = 40;
pub(crate) const TCP_LEN: usize = 20;
pub(crate) const UDP_LEN: usize = 8;
/// Type, code, checksum and four type-specific bytes (the echo identifier
/// and sequence, or an error's MTU or pointer).
pub(crate) const ICMP_LEN: usize = 8;
/// What an ICMP error must quote of the offending packet's L4 header: its
/// ports, or its echo identifier.
pub(crate) const QUOTED_L4_LEN: usize = 8;
/// Every IPv6 extension header is at least this long.
pub(crate) const IPV6_EXT_MIN_LEN: usize = 8;

pub(crate) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(crate) const ETHERTYPE_ARP: u16 = 0x0806;
pub(crate) const ETHERTYPE_IPV6: u16 = 0x86DD;
pub(crate) const ETHERTYPE_8021Q: u16 = 0x8100;
pub(crate) const ETHERTYPE_8021AD: u16 = 0x88A8;

pub(crate) const IPV6_HOP_BY_HOP: u8 = 0;
pub(crate) const IPV6_ROUTING: u8 = 43;
pub(crate) const IPV6_FRAGMENT: u8 = 44;
pub(crate) const IPV6_AUTH: u8 = 51;
pub(crate) const IPV6_DEST_OPTS: u8 = 60;
pub(crate) const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;
pub(crate) const IPV4_MORE_FRAGMENTS: u16 = 0x2000;

/// Neighbour discovery message types (RFC 4861): router and neighbour
/// solicitation and advertisement, and redirect.
pub(crate) const NEIGHBOR_DISCOVERY: std::ops::RangeInclusive<u8> = 133..=137;
/// Hop limit RFC 4861 requires on neighbour discovery.
pub(crate) const ND_HOP_LIMIT: u8 = 255;
/// Router solicitation, router advertisement and redirect: the neighbour
/// discovery messages that come from or go to routers.
pub(crate) const ROUTER_MESSAGES: [u8; 3] = [133, 134, 137];
/// MLD query, v1 report, v1 done and v2 report (RFC 2710, 3810).
pub(crate) const MLD: [u8; 4] = [130, 131, 132, 143];
/// Hop limit MLD is sent with.
pub(crate) const MLD_HOP_LIMIT: u8 = 1;
pub(crate) const ICMP_ECHO_REPLY: u8 = 0;
pub(crate) const ICMP_DEST_UNREACHABLE: u8 = 3;
pub(crate) const ICMP_ECHO_REQUEST: u8 = 8;
pub(crate) const ICMP_TIME_EXCEEDED: u8 = 11;
pub(crate) const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub(crate) const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub(crate) const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub(crate) const ICMPV6_ECHO_REQUEST: u8 = 128;
pub(crate) const ICMPV6_ECHO_REPLY: u8 = 129;

/// Why a packet could not be parsed; each is one drop reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// Truncated, or a header field that contradicts the packet.
    Malformed,
    /// More VLAN tags or IPv6 extension headers than the parser walks.
    HeaderLimit,
    /// Neither ARP, IPv4 nor IPv6.
    UnsupportedL3,
}

impl ParseError {
    pub(crate) const fn reason(self) -> u32 {
        match self {
            Self::Malformed => reason::DROP_MALFORMED,
            Self::HeaderLimit => reason::DROP_HEADER_LIMIT,
            Self::UnsupportedL3 => reason::DROP_UNSUPPORTED_L3,
        }
    }
}

/// Layer 3, with the addresses the policies and flows look up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Network {
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
pub(crate) struct Packet {
    pub(crate) network: Network,
    /// The first fragment of a datagram: its L4 header was parsed.
    pub(crate) first_fragment: bool,
    /// A fragment other than the first: it carries no L4 header.
    pub(crate) later_fragment: bool,
    /// The datagram's identification, for either kind of fragment.
    pub(crate) fragment_id: u32,
    /// IP protocol number (of the L4 header, past IPv6 extension headers).
    pub(crate) protocol: u8,
    pub(crate) hop_limit: u8,
    /// Set only for ICMP over IPv4 and for `ICMPv6`.
    pub(crate) icmp_type: u8,
    /// The echo identifier; set with `icmp_type`.
    pub(crate) icmp_id: u16,
    /// Set only for TCP.
    pub(crate) tcp_flags: u8,
    /// Set only for TCP and UDP.
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    /// Where the L4 header starts and where the IP header's length field
    /// says the packet ends: the bounds of what an ICMP error quotes.
    pub(crate) l4_offset: usize,
    pub(crate) l4_limit: usize,
}

impl Packet {
    pub(crate) const fn new(network: Network) -> Self {
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
    pub(crate) fn source(&self) -> Option<IpAddr> {
        match self.network {
            Network::Arp { sender } => Some(sender.into()),
            _ => self.addresses().map(|(src, _)| src),
        }
    }

    pub(crate) fn is_arp(&self) -> bool {
        matches!(self.network, Network::Arp { .. })
    }

    pub(crate) fn addresses(&self) -> Option<(IpAddr, IpAddr)> {
        match self.network {
            Network::Arp { .. } => None,
            Network::Ipv4 { src, dst } => Some((src.into(), dst.into())),
            Network::Ipv6 { src, dst } => Some((src.into(), dst.into())),
        }
    }

    /// ICMP of the packet's own family: ICMP in IPv4, `ICMPv6` in IPv6.
    pub(crate) fn is_icmp(&self) -> bool {
        match self.network {
            Network::Ipv4 { .. } => self.protocol == proto::ICMP,
            Network::Ipv6 { .. } => self.protocol == proto::ICMPV6,
            Network::Arp { .. } => false,
        }
    }

    pub(crate) fn is_v6(&self) -> bool {
        matches!(self.network, Network::Ipv6 { .. })
    }

    pub(crate) fn is_echo_request(&self) -> bool {
        self.is_icmp()
            && self.icmp_type
                == if self.is_v6() {
                    ICMPV6_ECHO_REQUEST
                } else {
                    ICMP_ECHO_REQUEST
                }
    }

    pub(crate) fn is_echo_reply(&self) -> bool {
        self.is_icmp()
            && self.icmp_type
                == if self.is_v6() {
                    ICMPV6_ECHO_REPLY
                } else {
                    ICMP_ECHO_REPLY
                }
    }

    /// The ICMP errors that can concern a flow of ours.
    pub(crate) fn is_icmp_error(&self) -> bool {
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
    pub(crate) fn is_syn(&self) -> bool {
        self.protocol == proto::TCP
            && self.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
    }

    /// A TCP segment that ends a connection: FIN or RST.
    pub(crate) fn is_closing(&self) -> bool {
        self.protocol == proto::TCP && self.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0
    }

    pub(crate) fn is_neighbor_discovery(&self) -> bool {
        self.is_v6()
            && self.protocol == proto::ICMPV6
            && NEIGHBOR_DISCOVERY.contains(&self.icmp_type)
            && self.hop_limit == ND_HOP_LIMIT
    }

    /// A router solicitation, advertisement or redirect, at any hop limit.
    pub(crate) fn is_router_message(&self) -> bool {
        self.is_v6() && self.protocol == proto::ICMPV6 && ROUTER_MESSAGES.contains(&self.icmp_type)
    }

    /// From `fe80::/10`.
    pub(crate) fn link_local_source(&self) -> bool {
        matches!(self.network, Network::Ipv6 { src, .. } if src.is_unicast_link_local())
    }

    /// MLD as a host accepts it (RFC 4890 4.4.1): from a link-local source
    /// with hop limit 1.
    pub(crate) fn is_mld(&self) -> bool {
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
pub(crate) struct Bytes<'a>(pub(crate) &'a [u8]);

impl Bytes<'_> {
    pub(crate) fn array<const N: usize>(self, offset: usize) -> Result<[u8; N], ParseError> {
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
pub(crate) fn within(offset: usize, len: usize, limit: usize) -> Result<(), ParseError> {
    if offset + len > limit {
        Err(ParseError::Malformed)
    } else {
        Ok(())
    }
}

pub(crate) fn be16(hi: u8, lo: u8) -> u16 {
    u16::from_be_bytes([hi, lo])
}

pub(crate) fn ipv6_at(bytes: &[u8]) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&bytes[..16]);
    Ipv6Addr::from(a)
}

/// A frame that starts with an Ethernet header.
pub(crate) fn parse_ethernet(b: Bytes<'_>) -> Result<Packet, ParseError> {
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
pub(crate) fn parse_ip(b: Bytes<'_>) -> Result<Packet, ParseError> {
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
pub(crate) fn parse_link(b: Bytes<'_>, l2: bool) -> Result<Packet, ParseError> {
    if l2 { parse_ethernet(b) } else { parse_ip(b) }
}

pub(crate) fn parse_arp(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
    let arp: [u8; ARP_LEN] = b.array(offset)?;
    let (hardware_len, protocol_len) = (arp[4], arp[5]);
    if hardware_len != 6 || protocol_len != 4 {
        return Err(ParseError::Malformed);
    }
    let sender = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    Ok(Packet::new(Network::Arp { sender }))
}

pub(crate) fn parse_ipv4(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
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

pub(crate) fn parse_ipv6(b: Bytes<'_>, offset: usize) -> Result<Packet, ParseError> {
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
pub(crate) fn extension_header(
    b: Bytes<'_>,
    cursor: usize,
    limit: usize,
) -> Result<[u8; IPV6_EXT_MIN_LEN], ParseError> {
    within(cursor, IPV6_EXT_MIN_LEN, limit)?;
    b.array(cursor)
}

pub(crate) fn parse_l4(
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
