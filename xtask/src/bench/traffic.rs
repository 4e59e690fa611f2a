//! The traffic mixes: template frames, the policy they run against, and
//! what each filter should do with them.
//!
//! Every frame is 60 bytes on the wire (64 with the FCS a NIC would add),
//! with valid IPv4 and TCP/UDP checksums. The `mix` traffic varies its
//! source: the generator program rewrites the source address of every frame
//! from a per-CPU counter, spread over [`MIX_SOURCES`] addresses by
//! multiplicative hashing, and patches both checksums incrementally. The
//! allow-list holds every second address of the first 2 × N, so a known
//! share of the frames passes.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::Path,
};

use zt_tests::packet::{Ethernet, Ipv4, Ipv6, Transport};

use super::{FilterKind, TrafficKind, topo};

/// Frames are padded to this length, the minimum Ethernet frame without FCS.
const FRAME_LEN: usize = 60;
pub const WIREGUARD_PORT: u16 = 51_820;
pub const SSH_PORT: u16 = 22;
/// Closed UDP port of the `udp` traffic.
const CLOSED_UDP_PORT: u16 = 9_999;
/// The port of the `syn` traffic: a database port, not the SSH port.
const SYN_PORT: u16 = 5_432;
const SOURCE_PORT: u16 = 40_000;
/// First source address of the `mix` traffic.
pub const MIX_BASE: Ipv4Addr = Ipv4Addr::new(10, 64, 0, 0);
/// Sources the `mix` traffic cycles through (a /14).
pub const MIX_SOURCES: u32 = 1 << 18;

/// One traffic mix, ready to send.
#[derive(Clone, Debug)]
pub struct Traffic {
    pub kind: TrafficKind,
    pub frame: Vec<u8>,
    /// `(first source, count)` when the generator rewrites the source.
    pub sources: Option<(Ipv4Addr, u32)>,
}

impl Traffic {
    pub fn new(kind: TrafficKind) -> Self {
        let (src, transport) = match kind {
            TrafficKind::Udp => (
                topo::GEN_IP,
                Transport::Udp {
                    src: SOURCE_PORT,
                    dst: CLOSED_UDP_PORT,
                },
            ),
            TrafficKind::Syn => (topo::GEN_IP, Transport::tcp_syn(SYN_PORT)),
            TrafficKind::Ssh => (topo::SSH_ALLOWED, Transport::tcp_syn(SSH_PORT)),
            TrafficKind::Wg => (
                topo::GEN_IP,
                Transport::Udp {
                    src: SOURCE_PORT,
                    dst: WIREGUARD_PORT,
                },
            ),
            TrafficKind::Mix => (MIX_BASE, Transport::tcp_syn(SSH_PORT)),
        };
        let sources = (kind == TrafficKind::Mix).then_some((MIX_BASE, MIX_SOURCES));
        Self {
            kind,
            frame: frame(src, &transport),
            sources,
        }
    }

    /// Whether the mix is a deny path for a filter enforcing the policy.
    pub const fn denied(kind: TrafficKind) -> bool {
        matches!(kind, TrafficKind::Udp | TrafficKind::Syn)
    }
}

/// The Ethernet header from g0 to d0.
const fn ethernet() -> Ethernet {
    Ethernet {
        dst: topo::DUT_MAC,
        src: topo::GEN_MAC,
        tags: Vec::new(),
    }
}

/// A 60-byte frame from g0 to d0 carrying `transport` from `src`.
pub fn frame(src: Ipv4Addr, transport: &Transport) -> Vec<u8> {
    let eth = ethernet();
    let mut ip = Ipv4::new(src, topo::DUT_IP);
    if matches!(transport, Transport::Udp { .. }) {
        // 14 + 20 + 8 + 18 = 60: the payload fills the frame, so the
        // UDP length covers it.
        ip = ip.data(&[0; 18]);
    }
    let mut f = eth.ipv4(&ip, transport);
    // A TCP SYN without options is 54 bytes; the rest is Ethernet padding,
    // outside the IP total length.
    f.resize(FRAME_LEN, 0);
    f
}

/// As [`frame`], over IPv6. The 40-byte header leaves nothing to pad: a
/// SYN is 74 bytes.
pub fn frame_v6(src: Ipv6Addr, transport: &Transport) -> Vec<u8> {
    ethernet().ipv6(&Ipv6::new(src, topo::DUT_IP6), transport)
}

/// The allow-listed sources of the `mix` traffic: every second address.
pub fn mix_allowed(n: u32) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(MIX_BASE);
    (0..n.min(MIX_SOURCES / 2)).map(move |i| Ipv4Addr::from(base + 2 * i))
}

/// Share of the `mix` frames that come from an allow-listed source.
pub fn mix_pass_share(allow: u32) -> f64 {
    f64::from(allow.min(MIX_SOURCES / 2)) / f64::from(MIX_SOURCES)
}

/// The share of `kind`'s frames that `filter` should let through to the
/// stack, or `None` when it cannot be judged (the `mix` through a filter
/// that cannot hold its allow-list is not run at all).
pub fn expected_pass(filter: FilterKind, kind: TrafficKind, mix_allow: u32) -> f64 {
    match (filter, kind) {
        (FilterKind::None, _) => 1.0,
        (FilterKind::XdpDrop, _) => 0.0,
        (_, TrafficKind::Mix) => mix_pass_share(mix_allow),
        (_, k) if Traffic::denied(k) => 0.0,
        _ => 1.0,
    }
}

/// The ztxdp configuration every filter is measured against (nftables gets
/// it through `ztxdp export nft`, xdp-filter as far as it can express it):
/// `WireGuard` on 51820, SSH from [`topo::SSH_ALLOWED`] and, with
/// `mix_allow > 0`, from that many `mix` sources.
pub fn config_toml(audit: &Path, mix_allow: u32) -> String {
    let mut allow = format!("\"{}/32\"", topo::SSH_ALLOWED);
    for a in mix_allowed(mix_allow) {
        let _ = write!(allow, ", \"{a}/32\"");
    }
    format!(
        "[edge]\ninterface = \"{}\"\nwireguard_ports = [{WIREGUARD_PORT}]\nssh_port = {SSH_PORT}\nssh_allow = [{allow}]\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n",
        topo::DUT_IF,
        audit.display(),
        // Not `audit.jsonl.state` or `null.state`: `check` refuses a state
        // file named like one of the trail's rotated files.
        audit.with_file_name("audit-head.state").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_minimum_size_with_the_right_ports() {
        for kind in [
            TrafficKind::Udp,
            TrafficKind::Syn,
            TrafficKind::Ssh,
            TrafficKind::Wg,
            TrafficKind::Mix,
        ] {
            let t = Traffic::new(kind);
            assert_eq!(t.frame.len(), FRAME_LEN, "{kind:?} frame length");
            assert_eq!(&t.frame[0..6], &topo::DUT_MAC, "{kind:?} destination MAC");
            let dport = u16::from_be_bytes([t.frame[36], t.frame[37]]);
            let want = match kind {
                TrafficKind::Udp => CLOSED_UDP_PORT,
                TrafficKind::Syn => SYN_PORT,
                TrafficKind::Ssh | TrafficKind::Mix => SSH_PORT,
                TrafficKind::Wg => WIREGUARD_PORT,
            };
            assert_eq!(dport, want, "{kind:?} destination port");
            // The IPv4 header checksum verifies: the sum over the header is 0.
            assert_eq!(
                zt_tests::packet::checksum(&[&t.frame[14..34]]),
                0,
                "{kind:?} IPv4 checksum"
            );
        }
    }

    #[test]
    fn v6_frame_is_a_syn_to_the_ssh_port() {
        let src = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
        let f = frame_v6(src, &Transport::tcp_syn(SSH_PORT));
        assert_eq!(f.len(), 74);
        assert_eq!(u16::from_be_bytes([f[12], f[13]]), 0x86dd, "ethertype");
        assert_eq!(&f[22..38], &src.octets(), "source");
        assert_eq!(
            u16::from_be_bytes([f[56], f[57]]),
            SSH_PORT,
            "destination port"
        );
    }

    #[test]
    fn mix_allow_list_covers_the_expected_share() {
        let allowed: Vec<Ipv4Addr> = mix_allowed(3).collect();
        assert_eq!(
            allowed,
            [
                Ipv4Addr::new(10, 64, 0, 0),
                Ipv4Addr::new(10, 64, 0, 2),
                Ipv4Addr::new(10, 64, 0, 4)
            ]
        );
        assert!(
            (mix_pass_share(100_000) - 0.3815).abs() < 0.001,
            "share {}",
            mix_pass_share(100_000)
        );
        assert!((expected_pass(FilterKind::Ztxdp, TrafficKind::Ssh, 0) - 1.0).abs() < f64::EPSILON);
        assert!(expected_pass(FilterKind::Nft, TrafficKind::Udp, 0).abs() < f64::EPSILON);
    }

    #[test]
    fn config_lists_every_source() {
        let text = config_toml(Path::new("/tmp/a.jsonl"), 2);
        assert!(
            text.contains("ssh_allow = [\"10.99.0.50/32\", \"10.64.0.0/32\", \"10.64.0.2/32\"]"),
            "{text}"
        );
        assert!(text.contains("interface = \"d0\""), "{text}");
    }
}
