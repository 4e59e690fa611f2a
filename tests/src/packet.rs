//! A packet builder for the tests: Ethernet (with VLAN tags), ARP, IPv4 (with
//! options and fragments), IPv6 (with extension headers), TCP, UDP, ICMP.
//!
//! Every header field a parser could trust is settable, including the ones
//! that make a packet wrong (IHL, total length, payload length), because the
//! interesting tests are the malformed ones. Checksums are computed so that
//! the same frames are also accepted by a real kernel stack in the
//! namespace tests; a test that wants a bad checksum patches the bytes.

use std::net::{Ipv4Addr, Ipv6Addr};

/// `EtherType` values the parser knows.
pub mod ethertype {
    pub const IPV4: u16 = 0x0800;
    pub const ARP: u16 = 0x0806;
    pub const VLAN: u16 = 0x8100;
    pub const QINQ: u16 = 0x88A8;
    pub const IPV6: u16 = 0x86DD;
}

/// IPv6 extension header numbers.
pub mod ext {
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const AUTH: u8 = 51;
    pub const DEST_OPTS: u8 = 60;
    /// "No next header": the chain ends without a transport header.
    pub const NONE: u8 = 59;
}

/// Length of an Ethernet header without tags.
pub const ETH_LEN: usize = 14;
/// Length of one VLAN tag.
pub const VLAN_LEN: usize = 4;
/// Length of an IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_LEN: usize = 40;
/// Length of a TCP header without options.
pub const TCP_LEN: usize = 20;
/// Length of a UDP header.
pub const UDP_LEN: usize = 8;
/// Length of an ICMP echo header (type, code, checksum, id, sequence).
pub const ICMP_LEN: usize = 8;

/// ICMP types used by the tests.
pub mod icmp {
    /// Identifier of every echo [`super::Transport::Icmp`] builds (bytes 4-5).
    pub const ECHO_ID: u16 = 0x1234;
    pub const DEST_UNREACHABLE: u8 = 3;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const V6_DEST_UNREACHABLE: u8 = 1;
    pub const V6_PACKET_TOO_BIG: u8 = 2;
    pub const V6_ECHO_REPLY: u8 = 129;
    pub const ECHO_REQUEST: u8 = 8;
    pub const ECHO_REPLY: u8 = 0;
    pub const V6_ECHO_REQUEST: u8 = 128;
    pub const V6_ROUTER_SOLICIT: u8 = 133;
    pub const V6_NEIGHBOR_SOLICIT: u8 = 135;
    pub const V6_NEIGHBOR_ADVERT: u8 = 136;
    pub const V6_ROUTER_ADVERT: u8 = 134;
    pub const V6_REDIRECT: u8 = 137;
}

/// The transport header an IP packet carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A 20-byte TCP header; `flags` is byte 13 (see `zt_common::tcp_flag`).
    Tcp {
        src: u16,
        dst: u16,
        flags: u8,
    },
    Udp {
        src: u16,
        dst: u16,
    },
    /// An 8-byte echo-style header (identifier [`icmp::ECHO_ID`], sequence
    /// 1): ICMP under IPv4, `ICMPv6` under IPv6. For an error message, the
    /// quoted packet goes in the IP builder's `data`.
    Icmp {
        kind: u8,
        code: u8,
    },
    /// Any protocol number followed by the given bytes, unchanged.
    Raw {
        protocol: u8,
        bytes: Vec<u8>,
    },
}

impl Transport {
    #[must_use]
    pub const fn tcp_syn(dst: u16) -> Self {
        Self::Tcp {
            src: 40_000,
            dst,
            flags: zt_common::tcp_flag::SYN,
        }
    }

    #[must_use]
    pub const fn udp(dst: u16) -> Self {
        Self::Udp { src: 40_000, dst }
    }

    /// IP protocol number, given the IP version (ICMP differs).
    #[must_use]
    pub const fn protocol(&self, v6: bool) -> u8 {
        match self {
            Self::Tcp { .. } => zt_common::proto::TCP,
            Self::Udp { .. } => zt_common::proto::UDP,
            Self::Icmp { .. } if v6 => zt_common::proto::ICMPV6,
            Self::Icmp { .. } => zt_common::proto::ICMP,
            Self::Raw { protocol, .. } => *protocol,
        }
    }

    /// Header bytes followed by `data`, checksum left at zero.
    fn encode(&self, data: &[u8]) -> Vec<u8> {
        let mut out = match self {
            Self::Tcp { src, dst, flags } => {
                let mut h = vec![0u8; TCP_LEN];
                h[0..2].copy_from_slice(&src.to_be_bytes());
                h[2..4].copy_from_slice(&dst.to_be_bytes());
                h[4..8].copy_from_slice(&1u32.to_be_bytes());
                // Data offset 5 words, no options.
                h[12] = 5 << 4;
                h[13] = *flags;
                h[14..16].copy_from_slice(&64_240u16.to_be_bytes());
                h
            }
            Self::Udp { src, dst } => {
                let mut h = vec![0u8; UDP_LEN];
                h[0..2].copy_from_slice(&src.to_be_bytes());
                h[2..4].copy_from_slice(&dst.to_be_bytes());
                let len = u16::try_from(UDP_LEN + data.len()).unwrap_or(u16::MAX);
                h[4..6].copy_from_slice(&len.to_be_bytes());
                h
            }
            Self::Icmp { kind, code } => {
                let mut h = vec![0u8; ICMP_LEN];
                h[0] = *kind;
                h[1] = *code;
                h[4..6].copy_from_slice(&icmp::ECHO_ID.to_be_bytes());
                h[6..8].copy_from_slice(&1u16.to_be_bytes());
                h
            }
            Self::Raw { bytes, .. } => bytes.clone(),
        };
        out.extend_from_slice(data);
        out
    }

    /// Offset of the checksum inside the encoded header, if it has one.
    const fn checksum_offset(&self) -> Option<usize> {
        match self {
            Self::Tcp { .. } => Some(16),
            Self::Udp { .. } => Some(6),
            Self::Icmp { .. } => Some(2),
            Self::Raw { .. } => None,
        }
    }
}

/// The Internet checksum (RFC 1071) of the concatenated slices.
#[must_use]
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop above folded `sum` into 16 bits.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// Fills the transport checksum of `l4` (header plus data) given the
/// pseudo-header bytes; `ICMPv4` has no pseudo-header and passes `&[]`.
fn fill_l4_checksum(t: &Transport, pseudo: &[u8], l4: &mut [u8]) {
    let Some(at) = t.checksum_offset() else {
        return;
    };
    if l4.len() < at + 2 {
        return;
    }
    let mut c = checksum(&[pseudo, l4]);
    // UDP sends a computed zero as all ones: zero means "no checksum".
    if c == 0 && matches!(t, Transport::Udp { .. }) {
        c = 0xffff;
    }
    l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An IPv4 header. Fields that are normally derived (IHL, total length) can
/// be forced to wrong values.
#[derive(Clone, Debug)]
pub struct Ipv4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ttl: u8,
    /// Option bytes; padded with zeros (end of options) to a multiple of 4.
    pub options: Vec<u8>,
    /// Identification: which datagram a fragment belongs to.
    pub id: u16,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    /// Overrides the IHL nibble (header length in 32-bit words).
    pub ihl: Option<u8>,
    /// Overrides the total length field.
    pub total_len: Option<u16>,
    /// Overrides the version nibble.
    pub version: Option<u8>,
    /// Overrides the protocol number.
    pub protocol: Option<u8>,
    /// Bytes after the transport header.
    pub data: Vec<u8>,
}

impl Ipv4 {
    #[must_use]
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        Self {
            src,
            dst,
            ttl: 64,
            options: Vec::new(),
            id: 0x4242,
            more_fragments: false,
            fragment_offset: 0,
            ihl: None,
            total_len: None,
            version: None,
            protocol: None,
            data: Vec::new(),
        }
    }

    #[must_use]
    pub fn options(mut self, options: &[u8]) -> Self {
        self.options = options.to_vec();
        self
    }

    #[must_use]
    pub fn fragment(mut self, more: bool, offset: u16) -> Self {
        self.more_fragments = more;
        self.fragment_offset = offset;
        self
    }

    #[must_use]
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    #[must_use]
    pub fn ihl(mut self, ihl: u8) -> Self {
        self.ihl = Some(ihl);
        self
    }

    #[must_use]
    pub fn total_len(mut self, len: u16) -> Self {
        self.total_len = Some(len);
        self
    }

    #[must_use]
    pub fn data(mut self, data: &[u8]) -> Self {
        self.data = data.to_vec();
        self
    }

    /// The IP packet: header, options, transport header, data.
    ///
    /// # Panics
    /// When the options or the packet are too long for their length fields.
    #[must_use]
    pub fn packet(&self, t: &Transport) -> Vec<u8> {
        let mut options = self.options.clone();
        options.resize(options.len().div_ceil(4) * 4, 0);
        let hlen = IPV4_LEN + options.len();
        let protocol = self.protocol.unwrap_or_else(|| t.protocol(false));
        let mut l4 = t.encode(&self.data);
        let pseudo = self.pseudo_header(protocol, l4.len());
        let pseudo: &[u8] = if protocol == zt_common::proto::ICMP {
            &[]
        } else {
            &pseudo
        };
        fill_l4_checksum(t, pseudo, &mut l4);

        let ihl = self
            .ihl
            .unwrap_or_else(|| u8::try_from(hlen / 4).expect("IPv4 options longer than 40 bytes"));
        let total = self.total_len.unwrap_or_else(|| {
            u16::try_from(hlen + l4.len()).expect("IPv4 packet longer than 65535 bytes")
        });
        let mut h = vec![0u8; IPV4_LEN];
        h[0] = (self.version.unwrap_or(4) << 4) | (ihl & 0x0f);
        h[2..4].copy_from_slice(&total.to_be_bytes());
        h[4..6].copy_from_slice(&self.id.to_be_bytes());
        let frag = (u16::from(self.more_fragments) << 13) | (self.fragment_offset & 0x1fff);
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[8] = self.ttl;
        h[9] = protocol;
        h[12..16].copy_from_slice(&self.src.octets());
        h[16..20].copy_from_slice(&self.dst.octets());
        h.extend_from_slice(&options);
        let c = checksum(&[&h]);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(&l4);
        h
    }

    fn pseudo_header(&self, protocol: u8, l4_len: usize) -> Vec<u8> {
        let mut p = Vec::with_capacity(12);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.push(0);
        p.push(protocol);
        p.extend_from_slice(&u16::try_from(l4_len).unwrap_or(u16::MAX).to_be_bytes());
        p
    }
}

/// One IPv6 extension header, encoded whole; its first byte (next header) is
/// filled in by [`Ipv6::packet`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtHeader {
    pub kind: u8,
    pub bytes: Vec<u8>,
}

impl ExtHeader {
    /// Hop-by-hop, routing or destination options of `(units + 1) * 8`
    /// bytes. The body is zeros: Pad1 options, or a routing header with no
    /// segments left, which a receiver ignores.
    fn eight_byte_units(kind: u8, units: u8) -> Self {
        let mut bytes = vec![0u8; (usize::from(units) + 1) * 8];
        bytes[1] = units;
        Self { kind, bytes }
    }

    #[must_use]
    pub fn hop_by_hop(units: u8) -> Self {
        Self::eight_byte_units(ext::HOP_BY_HOP, units)
    }

    #[must_use]
    pub fn routing(units: u8) -> Self {
        let mut h = Self::eight_byte_units(ext::ROUTING, units);
        // Type 4 (segment routing) with zero segments left: skipped by receivers.
        h.bytes[2] = 4;
        h
    }

    #[must_use]
    pub fn dest_opts(units: u8) -> Self {
        Self::eight_byte_units(ext::DEST_OPTS, units)
    }

    /// Authentication header of `(len + 2) * 4` bytes.
    #[must_use]
    pub fn auth(len: u8) -> Self {
        let mut bytes = vec![0u8; (usize::from(len) + 2) * 4];
        bytes[1] = len;
        Self {
            kind: ext::AUTH,
            bytes,
        }
    }

    /// Fragment header; `offset` in 8-byte units.
    #[must_use]
    pub fn fragment(offset: u16, more: bool) -> Self {
        Self::fragment_of(offset, more, 0x0bad_cafe)
    }

    /// Fragment header of datagram `id`; `offset` in 8-byte units.
    #[must_use]
    pub fn fragment_of(offset: u16, more: bool, id: u32) -> Self {
        let mut bytes = vec![0u8; 8];
        let field = (offset << 3) | u16::from(more);
        bytes[2..4].copy_from_slice(&field.to_be_bytes());
        bytes[4..8].copy_from_slice(&id.to_be_bytes());
        Self {
            kind: ext::FRAGMENT,
            bytes,
        }
    }
}

/// An IPv6 header with an extension header chain.
#[derive(Clone, Debug)]
pub struct Ipv6 {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub hop_limit: u8,
    pub exts: Vec<ExtHeader>,
    /// Overrides the payload length field.
    pub payload_len: Option<u16>,
    /// Overrides the version nibble.
    pub version: Option<u8>,
    /// Overrides the next-header value the last extension header (or the
    /// fixed header) announces.
    pub next_header: Option<u8>,
    /// Bytes after the transport header.
    pub data: Vec<u8>,
}

impl Ipv6 {
    #[must_use]
    pub const fn new(src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Self {
            src,
            dst,
            hop_limit: 64,
            exts: Vec::new(),
            payload_len: None,
            version: None,
            next_header: None,
            data: Vec::new(),
        }
    }

    #[must_use]
    pub const fn hop_limit(mut self, hop_limit: u8) -> Self {
        self.hop_limit = hop_limit;
        self
    }

    #[must_use]
    pub fn ext(mut self, h: ExtHeader) -> Self {
        self.exts.push(h);
        self
    }

    #[must_use]
    pub const fn payload_len(mut self, len: u16) -> Self {
        self.payload_len = Some(len);
        self
    }

    #[must_use]
    pub fn data(mut self, data: &[u8]) -> Self {
        self.data = data.to_vec();
        self
    }

    /// The IP packet: fixed header, extension headers, transport, data. The
    /// transport checksum uses `dst` even behind a routing header.
    ///
    /// # Panics
    /// When the payload is longer than 65535 bytes.
    #[must_use]
    pub fn packet(&self, t: &Transport) -> Vec<u8> {
        let protocol = self.next_header.unwrap_or_else(|| t.protocol(true));
        let mut l4 = t.encode(&self.data);
        let mut pseudo = Vec::with_capacity(40);
        pseudo.extend_from_slice(&self.src.octets());
        pseudo.extend_from_slice(&self.dst.octets());
        pseudo.extend_from_slice(&u32::try_from(l4.len()).unwrap_or(u32::MAX).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, t.protocol(true)]);
        fill_l4_checksum(t, &pseudo, &mut l4);

        // Built back to front: each header announces the one after it.
        let mut chain = Vec::new();
        let mut first = protocol;
        for h in self.exts.iter().rev() {
            let mut bytes = h.bytes.clone();
            if let Some(b) = bytes.first_mut() {
                *b = first;
            }
            first = h.kind;
            bytes.extend_from_slice(&chain);
            chain = bytes;
        }
        let payload = chain.len() + l4.len();
        let len = self.payload_len.unwrap_or_else(|| {
            u16::try_from(payload).expect("IPv6 payload longer than 65535 bytes")
        });
        let mut h = vec![0u8; IPV6_LEN];
        h[0] = self.version.unwrap_or(6) << 4;
        h[4..6].copy_from_slice(&len.to_be_bytes());
        h[6] = first;
        h[7] = self.hop_limit;
        h[8..24].copy_from_slice(&self.src.octets());
        h[24..40].copy_from_slice(&self.dst.octets());
        h.extend_from_slice(&chain);
        h.extend_from_slice(&l4);
        h
    }
}

/// ARP request body for Ethernet/IPv4 (28 bytes).
#[must_use]
pub fn arp_request(sender_mac: [u8; 6], sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut a = Vec::with_capacity(28);
    a.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    a.extend_from_slice(&ethertype::IPV4.to_be_bytes());
    a.push(6); // hardware address length
    a.push(4); // protocol address length
    a.extend_from_slice(&1u16.to_be_bytes()); // request
    a.extend_from_slice(&sender_mac);
    a.extend_from_slice(&sender.octets());
    a.extend_from_slice(&[0; 6]);
    a.extend_from_slice(&target.octets());
    a
}

/// An Ethernet header with zero or more VLAN tags.
#[derive(Clone, Debug)]
pub struct Ethernet {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// (TPID, TCI) of each tag, outermost first.
    pub tags: Vec<(u16, u16)>,
}

impl Default for Ethernet {
    fn default() -> Self {
        Self {
            dst: [0x02, 0, 0, 0, 0, 0x01],
            src: [0x02, 0, 0, 0, 0, 0x02],
            tags: Vec::new(),
        }
    }
}

impl Ethernet {
    /// Adds a tag inside the ones already present.
    #[must_use]
    pub fn tag(mut self, tpid: u16, vid: u16) -> Self {
        self.tags.push((tpid, vid & 0x0fff));
        self
    }

    /// The frame: header, tags, `ethertype`, `payload`.
    #[must_use]
    pub fn frame(&self, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_LEN + VLAN_LEN * self.tags.len() + payload.len());
        f.extend_from_slice(&self.dst);
        f.extend_from_slice(&self.src);
        for (tpid, tci) in &self.tags {
            f.extend_from_slice(&tpid.to_be_bytes());
            f.extend_from_slice(&tci.to_be_bytes());
        }
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// Length of this header including tags: where the L3 header starts.
    #[must_use]
    pub fn header_len(&self) -> usize {
        ETH_LEN + VLAN_LEN * self.tags.len()
    }

    #[must_use]
    pub fn ipv4(&self, ip: &Ipv4, t: &Transport) -> Vec<u8> {
        self.frame(ethertype::IPV4, &ip.packet(t))
    }

    #[must_use]
    pub fn ipv6(&self, ip: &Ipv6, t: &Transport) -> Vec<u8> {
        self.frame(ethertype::IPV6, &ip.packet(t))
    }
}

/// An untagged Ethernet frame carrying `ip`.
#[must_use]
pub fn eth_v4(ip: &Ipv4, t: &Transport) -> Vec<u8> {
    Ethernet::default().ipv4(ip, t)
}

/// An untagged Ethernet frame carrying `ip`.
#[must_use]
pub fn eth_v6(ip: &Ipv6, t: &Transport) -> Vec<u8> {
    Ethernet::default().ipv6(ip, t)
}

/// Classic hex dump, 16 bytes a line, for failure messages.
#[must_use]
pub fn hex_dump(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(s, "{:04x}:", i * 16);
        for b in line {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s
}
