//! The packet `ztxdp explain` asks about, from its command line
//! (`tcp 203.0.113.9:40000 192.0.2.1:22 --flags SA`), built into the bytes
//! a program would see: the reference model reads bytes, as the kernel
//! does, so the question goes through the same parser as a real packet.

use std::net::{IpAddr, SocketAddr};

use serde::Serialize;
use zt_common::{proto, tcp_flag};

use crate::audit::record::{transport_name, transport_number};

/// The TCP flags by letter, in the order `tcpdump` prints them.
const FLAG_LETTERS: [(char, u8); 8] = [
    ('F', tcp_flag::FIN),
    ('S', tcp_flag::SYN),
    ('R', tcp_flag::RST),
    ('P', 0x08),
    ('A', tcp_flag::ACK),
    ('U', 0x20),
    ('E', 0x40),
    ('C', 0x80),
];

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
/// Neighbour discovery (RFC 4861), which a host accepts at hop limit 255.
const NEIGHBOR_DISCOVERY: std::ops::RangeInclusive<u8> = 133..=137;
/// MLD query and reports, which a host accepts at hop limit 1.
const MLD: [u8; 4] = [130, 131, 132, 143];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];

/// What is wrong with the packet asked about; nothing was looked up.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("unknown protocol {given:?}: give tcp, udp, icmp or a protocol number (0-255)")]
    Protocol { given: String },
    #[error("{given:?} is not ADDRESS, ADDRESS:PORT or [IPv6]:PORT")]
    Endpoint { given: String },
    #[error("{src} and {dst} are not of the same IP version")]
    Versions { src: IpAddr, dst: IpAddr },
    #[error("protocol {protocol} has no ports; give the addresses alone")]
    NoPorts { protocol: u8 },
    #[error("--flags is for tcp only")]
    FlagsNotTcp,
    #[error("unknown TCP flag {flag:?} in {given:?}: use the letters F S R P A U E C")]
    Flag { flag: char, given: String },
    #[error("--icmp-type is for icmp only")]
    IcmpTypeNotIcmp,
    #[error("an echo identifier is given twice, {src} and {dst}; give it on one address")]
    TwoIdentifiers { src: u16, dst: u16 },
}

/// The L4 protocol asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP in IPv4, `ICMPv6` in IPv6.
    Icmp,
    /// Any other protocol number: the programs read no header of it.
    Other(u8),
}

impl Protocol {
    /// `tcp`, `udp`, `icmp` (`icmpv6`, `ipv6-icmp`: the same, by the
    /// addresses' version), or a protocol number.
    ///
    /// # Errors
    /// [`RequestError::Protocol`] for anything else.
    pub fn parse(s: &str) -> Result<Self, RequestError> {
        let name = s.to_ascii_lowercase();
        let number = if name == "icmpv6" {
            Some(proto::ICMPV6)
        } else {
            transport_number(&name)
        };
        match number {
            Some(proto::TCP) => Ok(Self::Tcp),
            Some(proto::UDP) => Ok(Self::Udp),
            Some(proto::ICMP | proto::ICMPV6) => Ok(Self::Icmp),
            Some(n) => Ok(Self::Other(n)),
            None => Err(RequestError::Protocol {
                given: s.to_owned(),
            }),
        }
    }

    /// The IP protocol number, in an IPv6 packet when `v6`.
    #[must_use]
    pub const fn number(self, v6: bool) -> u8 {
        match self {
            Self::Tcp => proto::TCP,
            Self::Udp => proto::UDP,
            Self::Icmp if v6 => proto::ICMPV6,
            Self::Icmp => proto::ICMP,
            Self::Other(n) => n,
        }
    }
}

/// `ADDRESS`, `ADDRESS:PORT` or `[IPv6]:PORT`.
///
/// # Errors
/// [`RequestError::Endpoint`] for anything else.
pub fn parse_endpoint(s: &str) -> Result<(IpAddr, Option<u16>), RequestError> {
    s.parse::<SocketAddr>()
        .map(|a| (a.ip(), Some(a.port())))
        .or_else(|_| s.parse::<IpAddr>().map(|ip| (ip, None)))
        .map_err(|_| RequestError::Endpoint {
            given: s.to_owned(),
        })
}

/// TCP flags as letters (`SA`), as `tcpdump` prints them.
///
/// # Errors
/// [`RequestError::Flag`] for a letter that is no flag.
pub fn parse_flags(s: &str) -> Result<u8, RequestError> {
    s.chars().try_fold(0u8, |flags, c| {
        FLAG_LETTERS
            .iter()
            .find(|(letter, _)| *letter == c.to_ascii_uppercase())
            .map(|(_, bit)| flags | bit)
            .ok_or_else(|| RequestError::Flag {
                flag: c,
                given: s.to_owned(),
            })
    })
}

/// TCP flags as letters.
#[must_use]
pub fn flag_letters(flags: u8) -> String {
    FLAG_LETTERS
        .iter()
        .filter(|(_, bit)| flags & bit != 0)
        .map(|(letter, _)| letter)
        .collect()
}

/// One packet arriving at the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Request {
    #[serde(serialize_with = "serialize_protocol")]
    pub protocol: Protocol,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// TCP and UDP ports; 0 where none was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub src_port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_port: Option<u16>,
    /// TCP only: the flags byte, SYN unless given.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_flags"
    )]
    pub tcp_flags: Option<u8>,
    /// ICMP only: the type, an echo request unless given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    /// ICMP only: the echo identifier, given as a port on either address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icmp_id: Option<u16>,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes the field by reference"
)]
fn serialize_protocol<S: serde::Serializer>(p: &Protocol, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&match p {
        Protocol::Tcp => "tcp".to_owned(),
        Protocol::Udp => "udp".to_owned(),
        Protocol::Icmp => "icmp".to_owned(),
        Protocol::Other(n) => n.to_string(),
    })
}

#[expect(
    clippy::ref_option,
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes the field by reference"
)]
fn serialize_flags<S: serde::Serializer>(flags: &Option<u8>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&flags.map(flag_letters).unwrap_or_default())
}

impl Request {
    /// The packet `PROTO SRC[:PORT] DST[:PORT] [--flags F] [--icmp-type N]`.
    ///
    /// # Errors
    /// When an argument does not parse, or does not fit the protocol.
    pub fn new(
        protocol: &str,
        src: &str,
        dst: &str,
        flags: Option<&str>,
        icmp_type: Option<u8>,
    ) -> Result<Self, RequestError> {
        let protocol = Protocol::parse(protocol)?;
        let (src, src_port) = parse_endpoint(src)?;
        let (dst, dst_port) = parse_endpoint(dst)?;
        if src.is_ipv4() != dst.is_ipv4() {
            return Err(RequestError::Versions { src, dst });
        }
        if flags.is_some() && protocol != Protocol::Tcp {
            return Err(RequestError::FlagsNotTcp);
        }
        if icmp_type.is_some() && protocol != Protocol::Icmp {
            return Err(RequestError::IcmpTypeNotIcmp);
        }
        let mut r = Self {
            protocol,
            src,
            dst,
            src_port: None,
            dst_port: None,
            tcp_flags: None,
            icmp_type: None,
            icmp_id: None,
        };
        match protocol {
            Protocol::Tcp | Protocol::Udp => {
                r.src_port = Some(src_port.unwrap_or(0));
                r.dst_port = Some(dst_port.unwrap_or(0));
                if protocol == Protocol::Tcp {
                    r.tcp_flags = Some(flags.map_or(Ok(tcp_flag::SYN), parse_flags)?);
                }
            }
            Protocol::Icmp => {
                let echo = if src.is_ipv6() {
                    ICMPV6_ECHO_REQUEST
                } else {
                    ICMP_ECHO_REQUEST
                };
                r.icmp_type = Some(icmp_type.unwrap_or(echo));
                r.icmp_id = match (src_port, dst_port) {
                    (Some(s), Some(d)) if s != d => {
                        return Err(RequestError::TwoIdentifiers { src: s, dst: d });
                    }
                    (s, d) => Some(s.or(d).unwrap_or(0)),
                };
            }
            Protocol::Other(number) => {
                if src_port.is_some() || dst_port.is_some() {
                    return Err(RequestError::NoPorts { protocol: number });
                }
            }
        }
        Ok(r)
    }

    /// The IP protocol number.
    #[must_use]
    pub const fn protocol_number(&self) -> u8 {
        self.protocol.number(self.src.is_ipv6())
    }

    /// The packet's bytes: an Ethernet frame (no VLAN tag, zero MACs) when
    /// `l2`, else the IP packet. An ICMP error quotes nothing, so it is
    /// about no flow.
    #[must_use]
    pub fn packet(&self, l2: bool) -> Vec<u8> {
        let l4 = self.l4();
        let protocol = self.protocol_number();
        let (ethertype, ip) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
                let mut ip = vec![0x45, 0];
                ip.extend(total.to_be_bytes());
                // Identification, no fragment, TTL 64; the checksum is
                // filled in below. The programs read none, but a bridge
                // with `br_netfilter` drops a frame whose header sum is
                // wrong, so a packet built here can also be sent.
                ip.extend([0, 0, 0, 0, 64, protocol, 0, 0]);
                ip.extend(src.octets());
                ip.extend(dst.octets());
                let sum = header_checksum(&ip);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                (ETHERTYPE_IPV4, ip)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let payload = u16::try_from(l4.len()).unwrap_or(u16::MAX);
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend(payload.to_be_bytes());
                ip.extend([protocol, self.hop_limit()]);
                ip.extend(src.octets());
                ip.extend(dst.octets());
                (ETHERTYPE_IPV6, ip)
            }
            // `new` refuses addresses of two versions.
            _ => return Vec::new(),
        };
        let mut out = Vec::with_capacity(14 + ip.len() + l4.len());
        if l2 {
            out.extend([0; 12]);
            out.extend(ethertype);
        }
        out.extend(ip);
        out.extend(l4);
        out
    }

    /// The hop limit a host accepts the message with: 255 for neighbour
    /// discovery, 1 for MLD, else 64.
    fn hop_limit(&self) -> u8 {
        match (self.protocol, self.icmp_type) {
            (Protocol::Icmp, Some(t)) if NEIGHBOR_DISCOVERY.contains(&t) => 255,
            (Protocol::Icmp, Some(t)) if MLD.contains(&t) => 1,
            _ => 64,
        }
    }

    /// The transport header.
    fn l4(&self) -> Vec<u8> {
        let port = |p: Option<u16>| p.unwrap_or(0).to_be_bytes();
        match self.protocol {
            Protocol::Tcp => {
                let mut h = Vec::with_capacity(20);
                h.extend(port(self.src_port));
                h.extend(port(self.dst_port));
                // Sequence and acknowledgement numbers, a 20-byte header.
                h.extend([0; 8]);
                h.extend([5 << 4, self.tcp_flags.unwrap_or(0), 0xff, 0xff, 0, 0, 0, 0]);
                h
            }
            Protocol::Udp => {
                let mut h = Vec::with_capacity(8);
                h.extend(port(self.src_port));
                h.extend(port(self.dst_port));
                h.extend([0, 8, 0, 0]);
                h
            }
            Protocol::Icmp => {
                let mut h = vec![self.icmp_type.unwrap_or(0), 0, 0, 0];
                h.extend(port(self.icmp_id));
                h.extend([0, 1]);
                h
            }
            Protocol::Other(_) => Vec::new(),
        }
    }
}

/// The Internet checksum (RFC 1071) of an IPv4 header whose checksum
/// field is 0.
fn header_checksum(header: &[u8]) -> u16 {
    let sum = header.chunks(2).fold(0u32, |sum, pair| {
        sum + u32::from(u16::from_be_bytes([
            pair[0],
            pair.get(1).copied().unwrap_or(0),
        ]))
    });
    let folded = (sum & 0xffff) + (sum >> 16);
    !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap_or(u16::MAX)
}

impl std::fmt::Display for Request {
    /// `tcp 203.0.113.9:40000 -> 192.0.2.1:22 [S]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let end = |ip: IpAddr, port: Option<u16>| match port {
            Some(p) => SocketAddr::new(ip, p).to_string(),
            None => ip.to_string(),
        };
        write!(
            f,
            "{} {} -> {}",
            transport_name(self.protocol_number()),
            end(self.src, self.src_port),
            end(self.dst, self.dst_port)
        )?;
        if let Some(flags) = self.tcp_flags {
            write!(f, " [{}]", flag_letters(flags))?;
        }
        if let Some(kind) = self.icmp_type {
            write!(f, " type {kind}")?;
            if let Some(id) = self.icmp_id.filter(|&id| id != 0) {
                write!(f, " id {id}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::EdgeModel,
        policy::{EchoRate, EdgePolicy},
    };

    fn request(protocol: &str, src: &str, dst: &str) -> Result<Request, RequestError> {
        Request::new(protocol, src, dst, None, None)
    }

    #[test]
    fn arguments_parse_as_written_and_mistakes_are_named() {
        let r = request("TCP", "203.0.113.9:40000", "192.0.2.1:22").expect("a tcp request");
        assert_eq!(
            (r.src_port, r.dst_port, r.tcp_flags),
            (Some(40_000), Some(22), Some(tcp_flag::SYN))
        );
        assert_eq!(r.to_string(), "tcp 203.0.113.9:40000 -> 192.0.2.1:22 [S]");
        let v6 = request("udp", "[2001:db8::9]:53", "2001:db8::1").expect("bare v6 address");
        assert_eq!((v6.src_port, v6.dst_port), (Some(53), Some(0)));
        let ping = request("icmpv6", "2001:db8::9", "[2001:db8::1]:7").expect("an echo");
        assert_eq!((ping.icmp_type, ping.icmp_id), (Some(128), Some(7)));
        assert_eq!(parse_flags("sa").ok(), Some(tcp_flag::SYN | tcp_flag::ACK));
        assert_eq!(flag_letters(0x12), "SA");
        assert_eq!(
            request("47", "192.0.2.9", "192.0.2.1")
                .map(|r| r.protocol_number())
                .ok(),
            Some(47)
        );
        let refused = [
            request("sctpx", "192.0.2.9", "192.0.2.1").err(),
            request("tcp", "192.0.2.9:99999", "192.0.2.1").err(),
            request("tcp", "192.0.2.9", "2001:db8::1").err(),
            request("gre", "192.0.2.9:1", "192.0.2.1").err(),
            request("47", "192.0.2.9:1", "192.0.2.1").err(),
            request("icmp", "192.0.2.9:1", "192.0.2.1:2").err(),
            Request::new("udp", "192.0.2.9", "192.0.2.1", Some("S"), None).err(),
            Request::new("tcp", "192.0.2.9", "192.0.2.1", Some("SX"), None).err(),
            Request::new("tcp", "192.0.2.9", "192.0.2.1", None, Some(8)).err(),
        ];
        let shown: Vec<String> = refused
            .iter()
            .map(|e| {
                e.as_ref()
                    .map_or_else(|| "accepted".into(), ToString::to_string)
            })
            .collect();
        for (e, want) in shown.iter().zip([
            "unknown protocol",
            "is not ADDRESS",
            "same IP version",
            "unknown protocol",
            "has no ports",
            "given twice",
            "for tcp only",
            "unknown TCP flag 'X'",
            "for icmp only",
        ]) {
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
    }

    #[test]
    fn the_packet_is_what_the_model_judges_by_the_arguments() {
        let edge = EdgeModel::new(&EdgePolicy {
            interface: "eth0".into(),
            mode: crate::policy::Mode::Enforce,
            wireguard_ports: vec![51_820],
            ssh_port: 22,
            ssh_allow: vec!["198.51.100.0/24".parse().expect("a prefix")],
            services: Vec::new(),
            icmp_echo: EchoRate::default(),
        });
        let cases = [
            (
                "tcp",
                "198.51.100.7:40000",
                "192.0.2.1:22",
                zt_common::reason::PASS_SSH,
            ),
            (
                "tcp",
                "203.0.113.9:40000",
                "192.0.2.1:22",
                zt_common::reason::DROP_SSH_SOURCE,
            ),
            (
                "udp",
                "203.0.113.9:40000",
                "192.0.2.1:51820",
                zt_common::reason::PASS_WIREGUARD,
            ),
            (
                "icmp",
                "203.0.113.9",
                "192.0.2.1",
                zt_common::reason::PASS_ICMP_ECHO,
            ),
            (
                "47",
                "203.0.113.9",
                "192.0.2.1",
                zt_common::reason::DROP_PROTOCOL_NOT_ALLOWED,
            ),
        ];
        for (protocol, src, dst, want) in cases {
            let frame = request(protocol, src, dst).expect("a request").packet(true);
            assert_eq!(
                zt_common::reason::name(edge.verdict(&frame)),
                zt_common::reason::name(want),
                "{protocol} {src} {dst}"
            );
        }
        // Neighbour discovery goes at the hop limit a host accepts it with.
        let solicit = Request::new("icmp", "fe80::1", "ff02::1:ff00:1", None, Some(135))
            .expect("a solicitation")
            .packet(true);
        assert_eq!(
            edge.verdict(&solicit),
            zt_common::reason::PASS_NEIGHBOR_DISCOVERY
        );
        // The IPv4 header sums to zero with its checksum, as RFC 1071 has it.
        let ip = request("udp", "203.0.113.9:1", "192.0.2.1:2")
            .expect("a request")
            .packet(false);
        assert_eq!(header_checksum(&ip[..20]), 0);
    }
}
