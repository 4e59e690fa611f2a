//! The one packet parser, shared by the edge (XDP, Ethernet) and tunnel (TC,
//! L3 or Ethernet) programs.
//!
//! Every read goes through [`Bounds::ptr_at`], which checks the read against
//! `data_end` so the verifier can prove it safe. Nothing assumes a fixed
//! header length: IPv4 uses IHL, IPv6 walks its extension headers, and both
//! loops are capped by constants from `zt_common::limits` so the verifier sees
//! them end. A packet the parser cannot account for is an error, and every
//! error becomes a counted drop in the ingress programs (the egress programs
//! only record flows, from parsed packets): the parser never decides to pass
//! anything.
//!
//! The common packet, untagged IPv4 TCP or UDP, also has a straight-line
//! parse built from the same header checks ([`ethernet_with`]).
//!
//! The user-space reference model (`ztxdp::model`) implements the same rules
//! over byte slices; the differential tests hold the two to identical verdicts.

use core::mem::size_of;

use network_types::{
    arp::ArpHdr,
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use zt_common::{limits, proto};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ETH_P_IPV6: u16 = 0x86DD;

const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
/// IPv4 "more fragments" flag, in the same 16 bits as the offset.
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// Every IPv6 extension header is a multiple of 8 bytes long.
const IPV6_EXT_MIN_LEN: usize = 8;
/// Byte of the TCP header that holds FIN..CWR.
const TCP_FLAGS_OFFSET: usize = 13;
/// Every ICMP and ICMPv6 message starts with 8 bytes: type, code, checksum
/// and four type-specific bytes (the echo identifier, or the MTU).
const ICMP_HDR_LEN: usize = 8;
/// What an ICMP error must quote of the offending packet's L4 header: the
/// ports (or the echo identifier).
const EMBEDDED_L4_LEN: usize = 8;

/// Why a packet could not be parsed. Each maps to one drop reason.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Truncated, or a header field that contradicts the packet.
    Malformed,
    /// More VLAN tags or IPv6 extension headers than we walk.
    HeaderLimit,
    /// Neither ARP, IPv4 nor IPv6.
    UnsupportedL3,
}

/// What the frame carries at layer 3.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L3 {
    Arp,
    Ipv4,
    Ipv6,
}

/// Fragment position of an IP packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented: its L4 header was parsed.
    No,
    /// The first fragment of a datagram: its L4 header was parsed, and the
    /// datagram's later fragments follow its verdict.
    First,
    /// A later fragment: it has no L4 header, so ports are unknown.
    Later,
}

/// Defines `$name`, which reads the `$ty` at a packet pointer as it lies in
/// memory, in one BPF load (`$width` in BPF assembly) whatever its
/// alignment. LLVM's BPF backend may not assume a packet field is aligned,
/// so a plain read of 4 bytes becomes 4 byte loads, 3 shifts and 3 ors; the
/// BPF load itself has no alignment rule on packet data where the CPU has
/// efficient unaligned access (x86-64, arm64). Where it does not, the
/// verifier checks the alignment and refuses a load it cannot prove aligned
/// (on a tunnel device without Ethernet the addresses are not), so the
/// programs fail to load there rather than misread.
macro_rules! packet_load {
    ($name:ident, $ty:ty, $width:literal) => {
        /// # Safety
        /// `p` must be a bounds-checked packet pointer with
        #[doc = concat!("`size_of::<", stringify!($ty), ">()` readable bytes.")]
        #[inline(always)]
        unsafe fn $name(p: *const u8) -> $ty {
            let v: u64;
            // SAFETY: the caller's; the asm only reads those bytes.
            unsafe {
                core::arch::asm!(
                    concat!("{v} = *(", $width, " *)({p} + 0)"),
                    v = lateout(reg) v,
                    p = in(reg) p,
                    options(nostack, readonly, preserves_flags),
                );
            }
            #[expect(
                clippy::cast_possible_truncation,
                reason = "the load zero-extends the field"
            )]
            let v = v as $ty;
            v
        }
    };
}

packet_load!(load_u32, u32, "u32");
packet_load!(load_u16, u16, "u16");

/// A big-endian 2-byte field, in host order.
///
/// # Safety
/// As [`load_u16`].
#[inline(always)]
unsafe fn load_be16(p: *const u8) -> u16 {
    // SAFETY: the caller's.
    u16::from_be(unsafe { load_u16(p) })
}

/// An address as bytes in network order (IPv4 in the first four), aligned so
/// that zeroing and copying it compile to a few 8-byte moves: unaligned byte
/// arrays make LLVM call `memset`, which the verifier handles badly.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Addr(pub [u8; 16]);

impl Addr {
    pub const ZERO: Self = Self([0; 16]);

    /// An IPv4 address in the first four bytes. Built whole: copying into
    /// a zeroed address made LLVM zero the other twelve bytes with a
    /// byte-at-a-time `memset` call, about 20 ns a packet.
    #[inline(always)]
    pub const fn v4(a: [u8; 4]) -> Self {
        Self::v4_word(u32::from_ne_bytes(a))
    }

    /// As [`Self::v4`], from the four bytes read as one native word.
    #[inline(always)]
    const fn v4_word(a: u32) -> Self {
        // On a little-endian machine the first four bytes are the low half.
        let word = a as u64;
        let mut out = Self::ZERO;
        // Two aligned 8-byte stores instead of a byte loop.
        // SAFETY: Addr is 16 bytes, aligned to 8, and every bit pattern of
        // its bytes is valid.
        unsafe {
            let w = (&raw mut out).cast::<[u64; 2]>();
            *w = [word, 0];
        }
        out
    }

    /// The address as two native-endian words, read whole.
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        // SAFETY: Addr is 16 bytes, aligned to 8; any bits are valid u64s.
        unsafe { *(&raw const *self).cast::<[u64; 2]>() }
    }

    /// The IPv4 address in the first four bytes.
    #[inline(always)]
    pub const fn v4_bytes(&self) -> [u8; 4] {
        // From the first word, not byte by byte, so that LLVM keeps the
        // address in one register instead of splitting it into bytes.
        #[expect(
            clippy::cast_possible_truncation,
            reason = "the low half is the address"
        )]
        (self.words()[0] as u32).to_ne_bytes()
    }
}

/// The fields the verdicts need. Addresses are kept as bytes because they
/// are LPM trie keys.
#[derive(Clone, Copy)]
pub struct Packet {
    pub l3: L3,
    pub fragment: Fragment,
    pub protocol: u8,
    pub hop_limit: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// ICMP echo identifier (bytes 4-5 of the ICMP header).
    pub icmp_id: u16,
    /// Where the L4 header starts and the IP payload ends, for reading what
    /// an ICMP error quotes.
    pub l4_offset: usize,
    pub l4_limit: usize,
    pub src_port: u16,
    pub dst_port: u16,
    pub src: Addr,
    pub dst: Addr,
    /// The datagram's identification when `fragment` is `First` or `Later`.
    pub fragment_id: u32,
}

impl Packet {
    /// 4 or 6, as events and flow keys carry it; 0 for ARP.
    #[inline(always)]
    pub const fn ip_version(&self) -> u8 {
        match self.l3 {
            L3::Ipv4 => 4,
            L3::Ipv6 => 6,
            L3::Arp => 0,
        }
    }

    const fn new(l3: L3) -> Self {
        Self {
            l3,
            fragment: Fragment::No,
            fragment_id: 0,
            protocol: 0,
            hop_limit: 0,
            tcp_flags: 0,
            icmp_type: 0,
            icmp_id: 0,
            l4_offset: 0,
            l4_limit: 0,
            src_port: 0,
            dst_port: 0,
            src: Addr::ZERO,
            dst: Addr::ZERO,
        }
    }
}

/// The packet's `[data, data_end)` window.
#[derive(Clone, Copy)]
pub struct Bounds {
    start: usize,
    end: usize,
}

impl Bounds {
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// A pointer to a `T` at `offset`, or `Malformed` when the packet is too
    /// short. The comparison against `end` is what the verifier needs to see
    /// before any load.
    #[inline(always)]
    fn ptr_at<T>(&self, offset: usize) -> Result<*const T, ParseError> {
        if self.start + offset + size_of::<T>() > self.end {
            return Err(ParseError::Malformed);
        }
        Ok((self.start + offset) as *const T)
    }
}

/// Parses a frame that starts with an Ethernet header (XDP, or TC on an L2
/// device) and hands the packet to `judge`.
///
/// `judge` is inlined twice: once for the common case, an untagged IPv4 TCP
/// or UDP packet that is not a fragment, whose fields are all set in
/// one straight line ([`ipv4_ports`]), and once for every other packet. In
/// one copy fed by every kind of packet, LLVM merged a dozen fields from a
/// dozen parse exits and spilled most of them to the stack, and the policy
/// then read them back. Split, a denied packet's own cost over a bare drop
/// at the device about halved (`bench/NOTES.md`, stage 4).
#[inline(always)]
pub fn ethernet_with<R>(b: &Bounds, judge: impl FnOnce(&Packet) -> R) -> Result<R, ParseError> {
    let untagged_ipv4 = b
        .ptr_at::<EthHdr>(0)
        // SAFETY: ptr_at checked the whole header.
        .is_ok_and(|eth| u16::from_be(unsafe { (*eth).ether_type }) == ETH_P_IP);
    if untagged_ipv4 && let Some(p) = ipv4_ports(b, EthHdr::LEN) {
        return Ok(judge(&p));
    }
    parse_ethernet(b).map(|p| judge(&p))
}

/// As [`ethernet_with`], for a packet that starts with the IP header (TC on
/// a WireGuard device).
#[inline(always)]
pub fn ip_with<R>(b: &Bounds, judge: impl FnOnce(&Packet) -> R) -> Result<R, ParseError> {
    if let Some(p) = ipv4_ports(b, 0) {
        return Ok(judge(&p));
    }
    parse_ip(b).map(|p| judge(&p))
}

/// The IPv4 packet at `offset` if it is TCP or UDP, not a fragment, and
/// well formed: the same [`Packet`] as the general parse makes of it,
/// built in one place. `None` for anything else, which the general parse
/// then handles, malformed packets and fragments included, so this path
/// never decides what a bad packet's verdict is and never deals with
/// fragment state.
#[inline(always)]
fn ipv4_ports(b: &Bounds, offset: usize) -> Option<Packet> {
    let ip = ipv4_header(b, offset).ok()?;
    if ip.fragmented() {
        return None;
    }
    let (src_port, dst_port, tcp_flags) = match ip.protocol {
        proto::TCP => tcp_header(b, ip.l4_offset, ip.l4_limit).ok()?,
        proto::UDP => {
            let (src, dst) = udp_header(b, ip.l4_offset, ip.l4_limit).ok()?;
            (src, dst, 0)
        }
        _ => return None,
    };
    Some(Packet {
        l3: L3::Ipv4,
        fragment: Fragment::No,
        fragment_id: 0,
        protocol: ip.protocol,
        hop_limit: ip.ttl,
        tcp_flags,
        icmp_type: 0,
        icmp_id: 0,
        l4_offset: ip.l4_offset,
        l4_limit: ip.l4_limit,
        src_port,
        dst_port,
        src: ip.src,
        dst: ip.dst,
    })
}

/// Parses a frame that starts with an Ethernet header.
#[inline(always)]
fn parse_ethernet(b: &Bounds) -> Result<Packet, ParseError> {
    let eth: *const EthHdr = b.ptr_at(0)?;
    // SAFETY: ptr_at checked the whole header.
    let mut ethertype = u16::from_be(unsafe { (*eth).ether_type });
    let mut offset = EthHdr::LEN;
    // Up to MAX_VLAN tags; a further tag is refused rather than skipped, so
    // that stacking tags cannot hide the real header from us.
    for _ in 0..limits::MAX_VLAN {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = b.ptr_at(offset)?;
        // SAFETY: ptr_at checked the whole tag.
        ethertype = u16::from_be(unsafe { (*vlan).ether_type });
        offset += VlanHdr::LEN;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(b, offset),
        ETH_P_IPV6 => parse_ipv6(b, offset),
        ETH_P_ARP => parse_arp(b, offset),
        ETH_P_8021Q | ETH_P_8021AD => Err(ParseError::HeaderLimit),
        _ => Err(ParseError::UnsupportedL3),
    }
}

/// Parses a packet that starts with the IP header.
#[inline(always)]
fn parse_ip(b: &Bounds) -> Result<Packet, ParseError> {
    // Any IP header is at least 20 bytes, and reading that much (not one
    // byte) keeps the bounds check in a form the verifier tracks.
    let first: *const [u8; Ipv4Hdr::LEN] = b.ptr_at(0)?;
    // SAFETY: ptr_at checked all 20 bytes.
    match unsafe { (*first)[0] } >> 4 {
        4 => parse_ipv4(b, 0),
        6 => parse_ipv6(b, 0),
        _ => Err(ParseError::UnsupportedL3),
    }
}

/// ARP for Ethernet/IPv4: anything else claiming to be ARP is malformed.
/// The sender's protocol address is the packet's `src`: the tunnel admits
/// ARP only from a peer's address.
#[inline(always)]
fn parse_arp(b: &Bounds, offset: usize) -> Result<Packet, ParseError> {
    let arp: *const ArpHdr = b.ptr_at(offset)?;
    // SAFETY: ptr_at checked the whole header.
    let (hlen, plen, spa) = unsafe { ((*arp).hlen, (*arp).plen, (*arp).spa) };
    if hlen != 6 || plen != 4 {
        return Err(ParseError::Malformed);
    }
    let mut p = Packet::new(L3::Arp);
    p.src = Addr::v4(spa);
    Ok(p)
}

/// The fields of a checked IPv4 header.
struct Ipv4Header {
    protocol: u8,
    ttl: u8,
    src: Addr,
    dst: Addr,
    /// Flags and fragment offset, as in the header.
    frags: u16,
    /// Identification: the datagram a fragment belongs to.
    id: u16,
    /// Where the L4 header starts (after the options) and the IP payload ends.
    l4_offset: usize,
    l4_limit: usize,
}

impl Ipv4Header {
    /// A fragment, first or later: "more fragments" or an offset.
    const fn fragmented(&self) -> bool {
        self.frags & (IPV4_MORE_FRAGMENTS | IPV4_FRAG_OFFSET_MASK) != 0
    }

    /// Not the first fragment: there is no L4 header to read.
    const fn later_fragment(&self) -> bool {
        self.frags & IPV4_FRAG_OFFSET_MASK != 0
    }
}

/// Checks the IPv4 header at `offset` and reads what the parse keeps.
#[inline(always)]
fn ipv4_header(b: &Bounds, offset: usize) -> Result<Ipv4Header, ParseError> {
    let ip: *const Ipv4Hdr = b.ptr_at(offset)?;
    // SAFETY: ptr_at checked the fixed 20-byte header; every read below is
    // inside it.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    // IHL, never a fixed 20: options would otherwise shift the ports we read.
    let ihl = usize::from(ip.vihl & 0x0f) * 4;
    if ihl < Ipv4Hdr::LEN {
        return Err(ParseError::Malformed);
    }
    // SAFETY: inside the checked header, as are the reads below.
    let total_len = usize::from(unsafe { load_be16(ip.tot_len.as_ptr()) });
    if total_len < ihl {
        return Err(ParseError::Malformed);
    }
    // SAFETY: as above.
    let (src, dst, frags, id) = unsafe {
        (
            Addr::v4_word(load_u32(ip.src_addr.as_ptr())),
            Addr::v4_word(load_u32(ip.dst_addr.as_ptr())),
            load_be16(ip.frags.as_ptr()),
            load_be16(ip.id.as_ptr()),
        )
    };
    Ok(Ipv4Header {
        protocol: ip.proto,
        ttl: ip.ttl,
        src,
        dst,
        frags,
        id,
        l4_offset: offset + ihl,
        l4_limit: offset + total_len,
    })
}

#[inline(always)]
fn parse_ipv4(b: &Bounds, offset: usize) -> Result<Packet, ParseError> {
    let ip = ipv4_header(b, offset)?;
    let mut p = Packet::new(L3::Ipv4);
    p.protocol = ip.protocol;
    p.hop_limit = ip.ttl;
    p.src = ip.src;
    p.dst = ip.dst;
    if ip.fragmented() {
        p.fragment_id = u32::from(ip.id);
        if ip.later_fragment() {
            p.fragment = Fragment::Later;
            return Ok(p);
        }
        p.fragment = Fragment::First;
    }
    parse_l4(b, ip.l4_offset, ip.l4_limit, p)
}

#[inline(always)]
fn parse_ipv6(b: &Bounds, offset: usize) -> Result<Packet, ParseError> {
    let ip: *const Ipv6Hdr = b.ptr_at(offset)?;
    // SAFETY: ptr_at checked the whole 40-byte header.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let mut p = Packet::new(L3::Ipv6);
    p.hop_limit = ip.hop_limit;
    p.src = Addr(ip.src_addr);
    p.dst = Addr(ip.dst_addr);
    let limit = offset + Ipv6Hdr::LEN + usize::from(u16::from_be_bytes(ip.payload_len));
    let mut next = ip.next_hdr;
    let mut cursor = offset + Ipv6Hdr::LEN;
    let mut fragment_header_seen = false;
    // One pass per extension header, capped; running out of passes while
    // still inside the chain is a drop, not a guess.
    for _ in 0..=limits::MAX_IPV6_EXT {
        let len = match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let ext = ext_hdr(b, cursor, limit)?;
                next = ext[0];
                (usize::from(ext[1]) + 1) * 8
            }
            // Authentication header: (len + 2) * 4 bytes.
            IPV6_AUTH => {
                let ext = ext_hdr(b, cursor, limit)?;
                next = ext[0];
                (usize::from(ext[1]) + 2) * 4
            }
            // A second fragment header would leave the id we key on and the
            // one the stack reassembles by to disagree: refused.
            IPV6_FRAGMENT if fragment_header_seen => return Err(ParseError::Malformed),
            IPV6_FRAGMENT => {
                fragment_header_seen = true;
                let ext = ext_hdr(b, cursor, limit)?;
                next = ext[0];
                let field = u16::from_be_bytes([ext[2], ext[3]]);
                let id = u32::from_be_bytes([ext[4], ext[5], ext[6], ext[7]]);
                if field >> 3 != 0 {
                    p.protocol = next;
                    p.fragment = Fragment::Later;
                    p.fragment_id = id;
                    return Ok(p);
                }
                // Offset 0 with "more fragments" starts a datagram; without
                // it, an atomic fragment is a whole packet (RFC 6946).
                if field & 1 != 0 {
                    p.fragment = Fragment::First;
                    p.fragment_id = id;
                }
                8
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

/// The first 8 bytes of the extension header at `cursor` (every extension
/// header has at least that many), checked against both the frame and the
/// IPv6 payload length.
#[inline(always)]
fn ext_hdr(b: &Bounds, cursor: usize, limit: usize) -> Result<[u8; IPV6_EXT_MIN_LEN], ParseError> {
    if cursor + IPV6_EXT_MIN_LEN > limit {
        return Err(ParseError::Malformed);
    }
    let ext: *const [u8; IPV6_EXT_MIN_LEN] = b.ptr_at(cursor)?;
    // SAFETY: ptr_at checked all eight bytes.
    Ok(unsafe { *ext })
}

/// Reads the L4 header at `offset`. `limit` is where the IP payload ends by
/// the IP header's own length field: an L4 header that runs past it is
/// malformed even if the frame has trailing bytes.
#[inline(always)]
fn parse_l4(b: &Bounds, offset: usize, limit: usize, mut p: Packet) -> Result<Packet, ParseError> {
    p.l4_offset = offset;
    p.l4_limit = limit;
    match (p.l3, p.protocol) {
        (_, proto::TCP) => {
            (p.src_port, p.dst_port, p.tcp_flags) = tcp_header(b, offset, limit)?;
        }
        (_, proto::UDP) => {
            (p.src_port, p.dst_port) = udp_header(b, offset, limit)?;
        }
        (L3::Ipv4, proto::ICMP) | (L3::Ipv6, proto::ICMPV6) => {
            if offset + ICMP_HDR_LEN > limit {
                return Err(ParseError::Malformed);
            }
            let icmp: *const [u8; ICMP_HDR_LEN] = b.ptr_at(offset)?;
            // SAFETY: ptr_at checked the whole 8-byte header.
            let icmp = unsafe { &*icmp };
            p.icmp_type = icmp[0];
            p.icmp_id = u16::from_be_bytes([icmp[4], icmp[5]]);
        }
        // Other protocols carry no ports we judge; the verdict decides.
        _ => {}
    }
    Ok(p)
}

/// The source port, destination port and flags of the TCP header at
/// `offset`, checked against the frame and the IP payload's `limit`.
#[inline(always)]
fn tcp_header(b: &Bounds, offset: usize, limit: usize) -> Result<(u16, u16, u8), ParseError> {
    if offset + TcpHdr::LEN > limit {
        return Err(ParseError::Malformed);
    }
    let tcp: *const TcpHdr = b.ptr_at(offset)?;
    // SAFETY: ptr_at checked the whole 20-byte header.
    let tcp = unsafe { &*tcp };
    if tcp.doff() < 5 {
        return Err(ParseError::Malformed);
    }
    // SAFETY: inside the checked header; TcpHdr is 20 bytes, so byte 13 was
    // checked with it.
    unsafe {
        Ok((
            load_be16(tcp.source.as_ptr()),
            load_be16(tcp.dest.as_ptr()),
            *(core::ptr::from_ref(tcp).cast::<u8>().add(TCP_FLAGS_OFFSET)),
        ))
    }
}

/// The source and destination ports of the UDP header at `offset`, checked
/// like [`tcp_header`].
#[inline(always)]
fn udp_header(b: &Bounds, offset: usize, limit: usize) -> Result<(u16, u16), ParseError> {
    if offset + UdpHdr::LEN > limit {
        return Err(ParseError::Malformed);
    }
    let udp: *const UdpHdr = b.ptr_at(offset)?;
    // SAFETY: ptr_at checked the whole 8-byte header.
    let udp = unsafe { &*udp };
    // SAFETY: inside the checked header.
    unsafe { Ok((load_be16(udp.src.as_ptr()), load_be16(udp.dst.as_ptr()))) }
}

/// The packet an ICMP error quotes, as the flow it belonged to: addresses,
/// protocol, and ports (or the echo identifier as the source port).
#[derive(Clone, Copy)]
pub struct Quoted {
    pub ip_version: u8,
    pub protocol: u8,
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
}

/// Reads the IP header and first 8 L4 bytes quoted by the ICMP error `p`.
/// `None` when the quote is too short, fragmented, of another IP version,
/// or (IPv6) has extension headers: such an error cannot be matched to a
/// flow, so the caller treats it as unrelated.
#[inline(always)]
pub fn quoted(b: &Bounds, p: &Packet) -> Option<Quoted> {
    let inner = p.l4_offset + ICMP_HDR_LEN;
    let limit = p.l4_limit;
    let mut q = Quoted {
        ip_version: 0,
        protocol: 0,
        src: Addr::ZERO,
        dst: Addr::ZERO,
        src_port: 0,
        dst_port: 0,
    };
    let l4 = match p.l3 {
        L3::Ipv4 => {
            if inner + Ipv4Hdr::LEN > limit {
                return None;
            }
            let ip: *const Ipv4Hdr = b.ptr_at(inner).ok()?;
            // SAFETY: ptr_at checked the fixed 20-byte header.
            let ip = unsafe { &*ip };
            let ihl = usize::from(ip.vihl & 0x0f) * 4;
            if ip.vihl >> 4 != 4
                || ihl < Ipv4Hdr::LEN
                || u16::from_be_bytes(ip.frags) & IPV4_FRAG_OFFSET_MASK != 0
            {
                return None;
            }
            q.ip_version = 4;
            q.protocol = ip.proto;
            q.src = Addr::v4(ip.src_addr);
            q.dst = Addr::v4(ip.dst_addr);
            inner + ihl
        }
        L3::Ipv6 => {
            if inner + Ipv6Hdr::LEN > limit {
                return None;
            }
            let ip: *const Ipv6Hdr = b.ptr_at(inner).ok()?;
            // SAFETY: ptr_at checked the whole 40-byte header.
            let ip = unsafe { &*ip };
            if ip.vcf[0] >> 4 != 6 {
                return None;
            }
            q.ip_version = 6;
            q.protocol = ip.next_hdr;
            q.src = Addr(ip.src_addr);
            q.dst = Addr(ip.dst_addr);
            inner + Ipv6Hdr::LEN
        }
        L3::Arp => return None,
    };
    if l4 + EMBEDDED_L4_LEN > limit {
        return None;
    }
    let hdr: *const [u8; EMBEDDED_L4_LEN] = b.ptr_at(l4).ok()?;
    // SAFETY: ptr_at checked all eight bytes.
    let hdr = unsafe { &*hdr };
    match (q.ip_version, q.protocol) {
        (_, proto::TCP | proto::UDP) => {
            q.src_port = u16::from_be_bytes([hdr[0], hdr[1]]);
            q.dst_port = u16::from_be_bytes([hdr[2], hdr[3]]);
        }
        // Only our own echo requests can draw an error we care about.
        (4, proto::ICMP) if hdr[0] == ICMP_ECHO_REQUEST => {
            q.src_port = u16::from_be_bytes([hdr[4], hdr[5]]);
        }
        (6, proto::ICMPV6) if hdr[0] == ICMPV6_ECHO_REQUEST => {
            q.src_port = u16::from_be_bytes([hdr[4], hdr[5]]);
        }
        _ => return None,
    }
    Some(q)
}

pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMPV6_DEST_UNREACHABLE: u8 = 1;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_TIME_EXCEEDED: u8 = 3;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;
