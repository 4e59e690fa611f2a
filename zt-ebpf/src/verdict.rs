//! Policy decisions over a parsed [`Packet`]. Each function returns a reason
//! code from `zt_common::reason`; whether that code allows or drops is decided
//! in one place (`reason::is_allow`), so a verdict cannot be computed and then
//! ignored.

use aya_ebpf::maps::lpm_trie::Key;
use zt_common::{
    GrantKey, PEER_ICMP, PeerInfo, SOURCE_DEEPER_24, SOURCE_DEEPER_32, SOURCE_V6_USE_TRIE,
    SSH_SERVICE, Source6Key, proto, reason, service_port_index, v6_network,
};

use crate::{
    maps::{
        ZT_EDGE_UDP, ZT_GRANTS, ZT_PEER_H4, ZT_PEER_H6, ZT_PEER_V4, ZT_PEER_V6, ZT_SRC4_16,
        ZT_SRC4_24, ZT_SRC4_32, ZT_SRC6, ZT_SRC6_LENS, ZT_SVC_PORTS, ZT_SVC_SRC_V6, tunnel_l2,
        tunnel_link_local,
    },
    parse::{Addr, Fragment, ICMP_ECHO_REQUEST, ICMPV6_ECHO_REQUEST, L3, Packet, ParseError},
};

/// ICMPv6 neighbour discovery: router solicitation/advertisement, neighbour
/// solicitation/advertisement, redirect (RFC 4861). Without them an IPv6
/// host is unreachable.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;
/// The neighbour messages proper; the others (133, 134, 137) come from or
/// go to routers.
const ND_NEIGHBOR_SOLICITATION: u8 = 135;
const ND_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// RFC 4861 requires hop limit 255 on ND, which proves it was not routed.
const ND_HOP_LIMIT: u8 = 255;
/// MLD: query (130), v1 report (131), v1 done (132), v2 report (143).
const MLD_QUERY: u8 = 130;
const MLD_V1_DONE: u8 = 132;
const MLD_V2_REPORT: u8 = 143;
/// RFC 2710 and 3810 send MLD with hop limit 1 from a link-local address.
const MLD_HOP_LIMIT: u8 = 1;

/// The drop reason for a parse failure.
#[inline(always)]
pub fn parse_error_reason(e: ParseError) -> u32 {
    match e {
        ParseError::Malformed => reason::DROP_MALFORMED,
        ParseError::HeaderLimit => reason::DROP_HEADER_LIMIT,
        ParseError::UnsupportedL3 => reason::DROP_UNSUPPORTED_L3,
    }
}

#[inline(always)]
fn is_neighbor_discovery(p: &Packet) -> bool {
    p.l3 == L3::Ipv6
        && p.protocol == proto::ICMPV6
        && (ND_FIRST..=ND_LAST).contains(&p.icmp_type)
        && p.hop_limit == ND_HOP_LIMIT
}

/// Whether `p` is an ICMPv6 router solicitation, router advertisement or
/// redirect, whatever its hop limit.
#[inline(always)]
fn is_router_message(p: &Packet) -> bool {
    p.l3 == L3::Ipv6
        && p.protocol == proto::ICMPV6
        && (ND_FIRST..=ND_LAST).contains(&p.icmp_type)
        && p.icmp_type != ND_NEIGHBOR_SOLICITATION
        && p.icmp_type != ND_NEIGHBOR_ADVERTISEMENT
}

/// `fe80::/10`.
#[inline(always)]
fn link_local_source(p: &Packet) -> bool {
    p.l3 == L3::Ipv6 && p.src.0[0] == 0xfe && p.src.0[1] & 0xc0 == 0x80
}

/// An MLD message as a host must accept it (RFC 4890 4.4.1).
#[inline(always)]
fn is_mld(p: &Packet) -> bool {
    p.l3 == L3::Ipv6
        && p.protocol == proto::ICMPV6
        && ((MLD_QUERY..=MLD_V1_DONE).contains(&p.icmp_type) || p.icmp_type == MLD_V2_REPORT)
        && p.hop_limit == MLD_HOP_LIMIT
        && link_local_source(p)
}

/// The edge policy: WireGuard UDP ports, the services (SSH among them) from
/// their sources, ARP, neighbour discovery and MLD; everything else drops.
/// The caller has checked that the programs were loaded with an edge policy.
#[inline(always)]
pub fn edge(p: &Packet) -> u32 {
    if p.l3 == L3::Arp {
        return reason::PASS_ARP;
    }
    if p.fragment == Fragment::Later {
        return reason::DROP_FRAGMENT;
    }
    match p.protocol {
        proto::UDP if udp_port_allowed(p.dst_port) => reason::PASS_WIREGUARD,
        proto::TCP | proto::UDP => service(p),
        _ if is_neighbor_discovery(p) => reason::PASS_NEIGHBOR_DISCOVERY,
        _ if is_mld(p) => reason::PASS_MLD,
        _ => reason::DROP_PROTOCOL_NOT_ALLOWED,
    }
}

/// Whether the edge passes UDP to `port` (a `WireGuard` port).
#[inline(always)]
pub fn udp_port_allowed(port: u16) -> bool {
    let word = ZT_EDGE_UDP.get(u32::from(port >> 6)).copied().unwrap_or(0);
    word & (1u64 << (port & 63)) != 0
}

/// TCP or UDP to an edge service: the services of the port, ANDed with
/// those the source may reach. The `ssh` service keeps its own reasons.
/// A port of no service costs one array lookup and no source lookup.
#[inline(always)]
fn service(p: &Packet) -> u32 {
    let ports = services_of_port(p.protocol, p.dst_port);
    if ports == 0 {
        return reason::DROP_PORT_NOT_ALLOWED;
    }
    let admitted = ports & services_of_source(p.l3, &p.src);
    if admitted & SSH_SERVICE != 0 {
        reason::PASS_SSH
    } else if admitted != 0 {
        reason::PASS_SERVICE
    } else if ports & SSH_SERVICE != 0 {
        reason::DROP_SSH_SOURCE
    } else {
        reason::DROP_SERVICE_SOURCE
    }
}

/// The services that open `port` of `protocol` (TCP or UDP), as a mask.
#[inline(always)]
pub fn services_of_port(protocol: u8, port: u16) -> u64 {
    ZT_SVC_PORTS
        .get(service_port_index(protocol, port))
        .copied()
        .unwrap_or(0)
}

/// The services `addr` (of family `l3`) may reach: the union of what every
/// prefix holding it opens.
#[inline(always)]
pub fn services_of_source(l3: L3, addr: &Addr) -> u64 {
    match l3 {
        L3::Ipv4 => services_of_v4(addr.v4_bytes()),
        L3::Ipv6 => services_of_v6(addr.0),
        L3::Arp => 0,
    }
}

/// The /16's own mask, ORed with its /24's and its address's when the
/// block says those maps have entries in it.
#[inline(always)]
fn services_of_v4(a: [u8; 4]) -> u64 {
    let Some(block) = ZT_SRC4_16.get(u32::from(a[0]) << 8 | u32::from(a[1])) else {
        return 0;
    };
    let mut mask = block.services;
    if block.deeper & SOURCE_DEEPER_24 != 0 {
        // SAFETY: a plain u64 the control plane writes whole.
        mask |= unsafe { ZT_SRC4_24.get(&[a[0], a[1], a[2], 0]) }.map_or(0, |m| *m);
    }
    if block.deeper & SOURCE_DEEPER_32 != 0 {
        // SAFETY: as above.
        mask |= unsafe { ZT_SRC4_32.get(&a) }.map_or(0, |m| *m);
    }
    mask
}

/// One exact lookup per prefix length in use, or the trie past
/// `capacity::SOURCE_V6_LENGTHS` lengths. The lengths are read from a map
/// the control plane rewrites whole: a read torn by a rewrite looks up
/// prefixes that may not exist (a miss, so a drop), never passes what the
/// hash does not hold.
#[inline(always)]
fn services_of_v6(addr: [u8; 16]) -> u64 {
    let Some(lengths) = ZT_SRC6_LENS.get(0) else {
        return 0;
    };
    if lengths.count == SOURCE_V6_USE_TRIE {
        return ZT_SVC_SRC_V6.get(&Key::new(128, addr)).map_or(0, |m| *m);
    }
    let mut mask = 0;
    for (i, &prefix_len) in (0u32..).zip(lengths.lengths.iter()) {
        if i >= lengths.count {
            break;
        }
        let prefix_len = u32::from(prefix_len);
        let key = Source6Key {
            prefix_len,
            addr: v6_network(addr, prefix_len),
        };
        // SAFETY: a plain u64 the control plane writes whole.
        mask |= unsafe { ZT_SRC6.get(&key) }.map_or(0, |m| *m);
    }
    mask
}

/// The peer that owns the packet's source address (for ARP the sender's
/// address), if any.
#[inline(always)]
pub fn peer_of(p: &Packet) -> Option<PeerInfo> {
    peer_owning(p.l3, &p.src)
}

/// The peer that owns `addr`, an address of family `l3`.
#[inline(always)]
pub fn peer_owning(l3: L3, addr: &Addr) -> Option<PeerInfo> {
    match l3 {
        // SAFETY (both hashes): PeerInfo is plain data the control plane
        // writes whole.
        L3::Ipv4 | L3::Arp => {
            let a = addr.v4_bytes();
            unsafe { ZT_PEER_H4.get(&a) }
                .copied()
                .or_else(|| ZT_PEER_V4.get(&Key::new(32, a)).copied())
        }
        L3::Ipv6 => unsafe { ZT_PEER_H6.get(&addr.0) }
            .copied()
            .or_else(|| ZT_PEER_V6.get(&Key::new(128, addr.0)).copied()),
    }
}

/// Whether `peer` is granted UDP or TCP (`protocol`) to local `port`.
#[inline(always)]
pub fn port_granted(peer: &PeerInfo, protocol: u8, port: u16) -> bool {
    let key = GrantKey {
        peer: peer.index,
        protocol,
        _pad0: 0,
        word: port >> 6,
    };
    // SAFETY: the value is a plain u64 the control plane writes whole.
    let word = unsafe { ZT_GRANTS.get(&key) }.copied().unwrap_or(0);
    word & (1u64 << (port & 63)) != 0
}

/// The tunnel policy: a packet from peer P to local port X of protocol T
/// passes only if (P, T, X) is granted. `peer` is `peer_of(p)`, looked up
/// once by the caller because it also indexes the per-peer counters.
#[inline(always)]
pub fn tunnel(p: &Packet, peer: Option<PeerInfo>) -> u32 {
    // A peer is never the host's router: an advertisement accepted here
    // would install a default route and a prefix through the tunnel.
    if is_router_message(p) {
        return reason::DROP_ROUTER_MESSAGE;
    }
    // ARP and neighbour messages only matter when the tunnel device has a
    // link layer, and then only from a peer's address (or a link-local one,
    // where the config allows it). On a WireGuard device nothing passes that
    // does not come from a peer.
    let neighbor = if p.l3 == L3::Arp {
        Some(reason::PASS_ARP)
    } else if is_neighbor_discovery(p) {
        Some(reason::PASS_NEIGHBOR_DISCOVERY)
    } else {
        None
    };
    if let Some(neighbor) = neighbor {
        let link_local = tunnel_l2() && tunnel_link_local() && link_local_source(p);
        return if tunnel_l2() && (peer.is_some() || link_local) {
            neighbor
        } else if peer.is_some() {
            reason::DROP_PROTOCOL_NOT_ALLOWED
        } else {
            reason::DROP_PEER_UNKNOWN
        };
    }
    let Some(peer) = peer else {
        return reason::DROP_PEER_UNKNOWN;
    };
    if p.fragment == Fragment::Later {
        return reason::DROP_FRAGMENT;
    }
    match (p.l3, p.protocol) {
        (_, proto::TCP | proto::UDP) => {
            if port_granted(&peer, p.protocol, p.dst_port) {
                reason::PASS_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        }
        (L3::Ipv4, proto::ICMP) if p.icmp_type == ICMP_ECHO_REQUEST => icmp_grant(peer),
        (L3::Ipv6, proto::ICMPV6) if p.icmp_type == ICMPV6_ECHO_REQUEST => icmp_grant(peer),
        _ => reason::DROP_PROTOCOL_NOT_ALLOWED,
    }
}

#[inline(always)]
fn icmp_grant(peer: PeerInfo) -> u32 {
    if peer.flags & PEER_ICMP != 0 {
        reason::PASS_ICMP_GRANT
    } else {
        reason::DROP_NOT_GRANTED
    }
}
