//! `ztxdp export nft`: the policy as an nftables ruleset, for people who
//! move between the two and for the benchmarks, which compare ztxdp against
//! nftables enforcing the same policy.
//!
//! The ruleset mirrors the BPF programs' decisions, in their order:
//! - the edge interface passes `WireGuard` UDP ports, each service's ports
//!   from its sources (the `ssh` service's are `ssh_port` and `ssh_allow`;
//!   one set per service and family, `service_N_v4`, N its position), IPv6
//!   neighbour discovery with hop limit 255, and ICMP echo
//!   requests within a per-source rate (`limit rate` over a dynamic set, as
//!   ztxdp's per-source token bucket), and drops everything else (ARP never
//!   reaches an `inet` chain, so it passes as in ztxdp);
//! - the tunnel interface passes neighbour discovery, then looks the source
//!   up among the peers and passes only the peer's granted ports and, with
//!   an `icmp` grant, echo requests;
//! - other interfaces are not touched.
//!
//! ztxdp also admits replies of flows the host opened and ICMP errors about
//! them (its egress flow recorders); nftables does that with
//! `ct state established,related`, which [`NftOptions::conntrack`] adds. The
//! plain variant is stricter than ztxdp: replies are dropped. One difference
//! remains by nature: nftables sees packets after the stack has reassembled
//! or dropped fragments and checked checksums, where XDP sees them first
//! (ztxdp judges a datagram by its first fragment and lets the later ones
//! follow it).

use std::fmt::Write as _;

use ipnet::IpNet;
use zt_common::capacity;

use crate::{
    grants::RuntimeGrants,
    policy::{EchoRate, EdgePolicy, Grant, Policy, Protocol, TunnelPolicy},
};

/// The nftables table every generated rule lives in.
pub const TABLE: &str = "ztxdp";
/// Named counter of packets the edge chain drops.
pub const EDGE_DROP_COUNTER: &str = "edge_drop";
/// Named counter of packets the tunnel chains drop.
pub const TUNNEL_DROP_COUNTER: &str = "tunnel_drop";

/// `ICMPv6` neighbour discovery types, as `verdict.rs` passes them (RFC 4861).
const ND_TYPES: &str =
    "nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect";
/// The neighbour messages proper, which the tunnel passes from peers.
const ND_NEIGHBOR_TYPES: &str = "nd-neighbor-solicit, nd-neighbor-advert";
/// The router messages, which the tunnel never passes.
const ND_ROUTER_TYPES: &str = "nd-router-solicit, nd-router-advert, nd-redirect";
/// MLD query, v1 report, v1 done and v2 report (130, 131, 132, 143), as
/// numbers: their names differ between nft versions.
const MLD_TYPES: &str = "130, 131, 132, 143";

/// Variations of the generated ruleset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftOptions {
    /// Accept `ct state established,related` first in each chain, as most
    /// published host firewalls do. Costs a conntrack lookup per packet.
    pub conntrack: bool,
    /// Comment lines put at the top, after the header (see
    /// [`merge_runtime_grants`]).
    pub notes: Vec<String>,
}

/// What [`merge_runtime_grants`] merged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// The comment lines for [`NftOptions::notes`].
    pub notes: Vec<String>,
    /// Peers the runtime grants name that the config does not have.
    pub unknown_peers: Vec<String>,
    /// Groups the runtime grants name that the config does not have.
    pub unknown_groups: Vec<String>,
}

/// Applies the runtime grants to `policy`'s tunnel, as every `up` does,
/// and says so: from which file, and which of its entries name no peer of
/// the config (ignored, as `up` ignores them). The ruleset then matches
/// what the kernel enforces, not only what the config file says.
pub fn merge_runtime_grants(
    policy: &mut Policy,
    path: &std::path::Path,
    grants: &RuntimeGrants,
) -> Merged {
    let Some(tunnel) = &policy.tunnel else {
        return Merged::default();
    };
    let unknown_peers: Vec<String> = grants
        .peers
        .keys()
        .filter(|name| !tunnel.peers.iter().any(|p| p.name == **name))
        .map(|name| one_line(name))
        .collect();
    let unknown_groups: Vec<String> = grants
        .groups
        .keys()
        .filter(|name| !tunnel.groups.iter().any(|g| g.name == **name))
        .map(|name| one_line(name))
        .collect();
    let groups = if grants.groups.is_empty() {
        String::new()
    } else {
        format!(" and {} groups", grants.groups.len())
    };
    let mut notes = vec![format!(
        "Includes the runtime grants of {} ({} peers{groups} changed by `ztxdp allow`/`revoke`).",
        path.display(),
        grants.peers.len()
    )];
    notes.extend(unknown_peers.iter().map(|name| {
        format!("Ignored: the runtime grants name {name}, which is no peer of this config.")
    }));
    notes.extend(unknown_groups.iter().map(|name| {
        format!("Ignored: the runtime grants name group @{name}, which is no group of this config.")
    }));
    policy.tunnel = Some(grants.apply(tunnel));
    Merged {
        notes,
        unknown_peers,
        unknown_groups,
    }
}

/// The policy as an nftables ruleset (`nft -f`), without conntrack.
#[must_use]
pub fn nft_ruleset(policy: &Policy) -> String {
    nft_ruleset_with(policy, &NftOptions::default())
}

/// The policy as an nftables ruleset (`nft -f`). Loading it replaces any
/// earlier version of the table: the text deletes the table first.
#[must_use]
pub fn nft_ruleset_with(policy: &Policy, opts: &NftOptions) -> String {
    let mut out = String::new();
    out.push_str("#!/usr/sbin/nft -f\n");
    out.push_str("# Generated by `ztxdp export nft`: the same policy as ztxdp enforces.\n");
    for note in &opts.notes {
        let _ = writeln!(out, "# {}", one_line(note));
    }
    // `add` then `delete` makes reloading idempotent whether or not the table exists.
    let _ = writeln!(out, "add table inet {TABLE}\ndelete table inet {TABLE}\n");
    let _ = writeln!(out, "table inet {TABLE} {{");
    let _ = writeln!(out, "  counter {EDGE_DROP_COUNTER} {{ }}");
    let _ = writeln!(out, "  counter {TUNNEL_DROP_COUNTER} {{ }}");
    if let Some(edge) = &policy.edge {
        edge_sets(&mut out, edge);
    }
    if let Some(tunnel) = &policy.tunnel {
        peer_maps(&mut out, tunnel);
    }
    out.push_str("\n  chain input {\n    type filter hook input priority filter; policy accept;\n");
    if let Some(edge) = &policy.edge {
        let _ = writeln!(out, "    iifname {} jump edge", quoted(&edge.interface));
    }
    if let Some(tunnel) = &policy.tunnel {
        let _ = writeln!(out, "    iifname {} jump tunnel", quoted(&tunnel.interface));
    }
    out.push_str("  }\n");
    if let Some(edge) = &policy.edge {
        edge_chain(&mut out, edge, opts);
    }
    if let Some(tunnel) = &policy.tunnel {
        tunnel_chains(&mut out, tunnel, opts);
    }
    out.push_str("}\n");
    out
}

fn edge_sets(out: &mut String, edge: &EdgePolicy) {
    for (i, service) in edge.services().enumerate() {
        let _ = writeln!(out, "  # service {}", one_line(service.name));
        let (v4, v6) = split(service.from);
        set(out, &format!("service_{i}_v4"), "ipv4_addr", &v4);
        set(out, &format!("service_{i}_v6"), "ipv6_addr", &v6);
    }
    if echo_allowed(edge.icmp_echo) {
        // One limiter per source, like ztxdp's LRU of token buckets; an idle
        // source's entry expires, and a fresh one starts with a full burst,
        // which is also where an idle bucket would be.
        for (name, kind) in [("echo_v4", "ipv4_addr"), ("echo_v6", "ipv6_addr")] {
            let _ = writeln!(
                out,
                "  set {name} {{\n    type {kind}; size {}; flags dynamic,timeout; timeout 60s;\n  }}",
                capacity::ECHO_SOURCES
            );
        }
    }
}

/// Whether any echo request can pass: a zero rate or burst drops them all.
const fn echo_allowed(rate: EchoRate) -> bool {
    rate.ns_per_token != 0 && rate.burst != 0
}

/// `N/unit` for nftables' `limit rate`: the largest unit in which one token
/// every `ns_per_token` is a whole number, else the nearest per-day rate.
fn limit_rate(ns_per_token: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("second", 1_000_000_000),
        ("minute", 60_000_000_000),
        ("hour", 3_600_000_000_000),
        ("day", 86_400_000_000_000),
    ];
    for (unit, ns) in UNITS {
        if ns % ns_per_token == 0 {
            return format!("{}/{unit}", ns / ns_per_token);
        }
    }
    let day = UNITS[3].1;
    format!("{}/day", ((day + ns_per_token / 2) / ns_per_token).max(1))
}

fn set(out: &mut String, name: &str, kind: &str, nets: &[IpNet]) {
    let _ = write!(out, "  set {name} {{\n    type {kind}; flags interval;\n");
    if !nets.is_empty() {
        out.push_str("    elements = {");
        elements(out, nets.iter().map(ToString::to_string));
        out.push_str(" }\n");
    }
    out.push_str("  }\n");
}

/// Comma-separated, a few per line: `nft` reads 1,000,000 elements fine,
/// but not on one line of tens of megabytes in an editor.
fn elements(out: &mut String, items: impl Iterator<Item = String>) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(if i % 8 == 0 { "\n      " } else { " " });
        out.push_str(&item);
    }
}

fn edge_chain(out: &mut String, edge: &EdgePolicy, opts: &NftOptions) {
    out.push_str("\n  chain edge {\n");
    if opts.conntrack {
        out.push_str("    ct state established,related accept\n");
    }
    if !edge.wireguard_ports.is_empty() {
        let ports: Vec<String> = edge
            .wireguard_ports
            .iter()
            .map(ToString::to_string)
            .collect();
        let _ = writeln!(out, "    udp dport {{ {} }} accept", ports.join(", "));
    }
    // A packet passes when any service of its port admits its source:
    // one accept rule per service, protocol and family.
    for (i, service) in edge.services().enumerate() {
        let (v4, v6) = split(service.from);
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let ports: Vec<String> = service
                .ports
                .iter()
                .filter(|r| r.protocol == protocol)
                .map(|r| {
                    if r.first == r.last {
                        r.first.to_string()
                    } else {
                        format!("{}-{}", r.first, r.last)
                    }
                })
                .collect();
            if ports.is_empty() {
                continue;
            }
            let ports = ports.join(", ");
            let name = protocol.name();
            for (nets, family, set) in [(&v4, "ip", "v4"), (&v6, "ip6", "v6")] {
                if !nets.is_empty() {
                    let _ = writeln!(
                        out,
                        "    {name} dport {{ {ports} }} {family} saddr @service_{i}_{set} accept"
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "    icmpv6 type {{ {ND_TYPES} }} ip6 hoplimit 255 accept"
    );
    let _ = writeln!(
        out,
        "    icmpv6 type {{ {MLD_TYPES} }} ip6 saddr fe80::/10 ip6 hoplimit 1 accept"
    );
    if echo_allowed(edge.icmp_echo) {
        let limit = format!(
            "limit rate {} burst {} packets",
            limit_rate(edge.icmp_echo.ns_per_token),
            edge.icmp_echo.burst
        );
        let _ = writeln!(
            out,
            "    icmp type echo-request add @echo_v4 {{ ip saddr {limit} }} accept"
        );
        let _ = writeln!(
            out,
            "    icmpv6 type echo-request add @echo_v6 {{ ip6 saddr {limit} }} accept"
        );
    }
    let _ = writeln!(out, "    counter name {EDGE_DROP_COUNTER} drop\n  }}");
}

/// Source prefix → peer chain, one verdict map per family.
fn peer_maps(out: &mut String, tunnel: &TunnelPolicy) {
    for (family, kind, v6) in [("v4", "ipv4_addr", false), ("v6", "ipv6_addr", true)] {
        let entries: Vec<String> = tunnel
            .peers
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.addresses
                    .iter()
                    .filter(move |a| matches!(a, IpNet::V6(_)) == v6)
                    .map(move |a| format!("{a} : jump peer_{i}"))
            })
            .collect();
        let _ = write!(
            out,
            "  map peers_{family} {{\n    type {kind} : verdict; flags interval;\n"
        );
        if !entries.is_empty() {
            out.push_str("    elements = {");
            elements(out, entries.into_iter());
            out.push_str(" }\n");
        }
        out.push_str("  }\n");
    }
}

fn tunnel_chains(out: &mut String, tunnel: &TunnelPolicy, opts: &NftOptions) {
    out.push_str("\n  chain tunnel {\n");
    if opts.conntrack {
        out.push_str("    ct state established,related accept\n");
    }
    // Router messages never pass, as in the tunnel program; neighbour
    // messages pass from peers (in their chains) and, where the config
    // allows, from link-local sources. ARP is the `arp` family's, not
    // this table's.
    let _ = writeln!(
        out,
        "    icmpv6 type {{ {ND_ROUTER_TYPES} }} counter name {TUNNEL_DROP_COUNTER} drop"
    );
    if tunnel.link_local_neighbors {
        let _ = writeln!(
            out,
            "    icmpv6 type {{ {ND_NEIGHBOR_TYPES} }} ip6 saddr fe80::/10 ip6 hoplimit 255 accept"
        );
    }
    out.push_str("    ip saddr vmap @peers_v4\n    ip6 saddr vmap @peers_v6\n");
    let _ = writeln!(out, "    counter name {TUNNEL_DROP_COUNTER} drop\n  }}");
    for (i, peer) in tunnel.peers.iter().enumerate() {
        let _ = writeln!(out, "\n  # peer {}", one_line(&peer.name));
        let _ = writeln!(out, "  chain peer_{i} {{");
        let _ = writeln!(
            out,
            "    icmpv6 type {{ {ND_NEIGHBOR_TYPES} }} ip6 hoplimit 255 accept"
        );
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let ports: Vec<String> = peer
                .grants
                .iter()
                .filter_map(|g| match g {
                    Grant::Ports {
                        protocol: p,
                        first,
                        last,
                    } if *p == protocol => Some(if first == last {
                        first.to_string()
                    } else {
                        format!("{first}-{last}")
                    }),
                    _ => None,
                })
                .collect();
            if !ports.is_empty() {
                let _ = writeln!(
                    out,
                    "    {} dport {{ {} }} accept",
                    protocol.name(),
                    ports.join(", ")
                );
            }
        }
        if peer.grants.contains(&Grant::Icmp) {
            out.push_str(
                "    icmp type echo-request accept\n    icmpv6 type echo-request accept\n",
            );
        }
        let _ = writeln!(out, "    counter name {TUNNEL_DROP_COUNTER} drop\n  }}");
    }
}

fn split(nets: &[IpNet]) -> (Vec<IpNet>, Vec<IpNet>) {
    nets.iter().partition(|n| matches!(n, IpNet::V4(_)))
}

/// An nftables string literal. Interface names are validated by `config`
/// (at most 15 bytes), but a quote would still end the literal early.
fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\\', '\n'], "_"))
}

/// Peer names go into `#` comments, which end at a newline.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::policy::{AuditSettings, FlowSettings};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap_or_else(|e| panic!("test prefix {s}: {e}"))
    }

    fn policy() -> Policy {
        Policy {
            edge: Some(EdgePolicy {
                interface: "eth0".into(),
                wireguard_ports: vec![51820, 51821],
                ssh_port: 2222,
                ssh_allow: vec![
                    net("192.0.2.10/32"),
                    net("2001:db8:1::/64"),
                    net("198.51.100.0/24"),
                ],
                services: Vec::new(),
                icmp_echo: EchoRate {
                    ns_per_token: 500_000_000,
                    burst: 3,
                },
                mode: crate::policy::Mode::Enforce,
            }),
            tunnel: Some(TunnelPolicy {
                interface: "wg0".into(),
                peers: vec![
                    crate::policy::Peer {
                        name: "app-1".into(),
                        addresses: vec![net("10.100.0.1/32"), net("fd00:100::1/128")],
                        public_key: None,
                        grants: vec![
                            Grant::Ports {
                                protocol: Protocol::Tcp,
                                first: 5432,
                                last: 5432,
                            },
                            Grant::Ports {
                                protocol: Protocol::Tcp,
                                first: 8000,
                                last: 8100,
                            },
                            Grant::Ports {
                                protocol: Protocol::Udp,
                                first: 53,
                                last: 53,
                            },
                            Grant::Icmp,
                        ],
                        mode: crate::policy::Mode::Enforce,
                    },
                    crate::policy::Peer {
                        name: "ops\nlaptop".into(),
                        addresses: vec![net("10.100.0.16/28")],
                        public_key: None,
                        grants: vec![],
                        mode: crate::policy::Mode::Enforce,
                    },
                ],
                groups: Vec::new(),
                runtime_grants: PathBuf::from("/tmp/grants.json"),
                link_local_neighbors: false,
                mode: crate::policy::Mode::Enforce,
            }),
            flows: FlowSettings::default(),
            audit: AuditSettings::new(PathBuf::from("/tmp/audit.jsonl")),
            metrics: None,
            drift_check_interval: Policy::DEFAULT_DRIFT_CHECK_INTERVAL,
        }
    }

    /// The lines of `text` with indentation removed.
    fn lines(text: &str) -> Vec<&str> {
        text.lines().map(str::trim).collect()
    }

    /// The body of `chain NAME { ... }`: chains end at a two-space `}` line.
    fn chain<'a>(text: &'a str, name: &str) -> &'a str {
        let start = text
            .split(&format!("chain {name} {{"))
            .nth(1)
            .unwrap_or_else(|| panic!("no chain {name}:\n{text}"));
        start.split("\n  }").next().unwrap_or_default()
    }

    fn assert_line(text: &str, want: &str) {
        assert!(
            lines(text).contains(&want),
            "missing line {want:?} in:\n{text}"
        );
    }

    #[test]
    fn edge_rules_follow_the_policy() {
        let text = nft_ruleset(&policy());
        assert_line(&text, "iifname \"eth0\" jump edge");
        assert_line(&text, "udp dport { 51820, 51821 } accept");
        assert_line(&text, "tcp dport { 2222 } ip saddr @service_0_v4 accept");
        assert_line(&text, "tcp dport { 2222 } ip6 saddr @service_0_v6 accept");
        assert_line(&text, "192.0.2.10/32, 198.51.100.0/24 }");
        assert_line(&text, "2001:db8:1::/64 }");
        assert_line(&text, &format!("counter name {EDGE_DROP_COUNTER} drop"));
        assert!(
            !text.contains("ct state"),
            "conntrack rule without the option:\n{text}"
        );
        // The drop is the last rule of the edge chain: nothing after it can pass.
        let edge = chain(&text, "edge");
        let body: Vec<&str> = lines(edge).into_iter().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            body.last(),
            Some(&"counter name edge_drop drop"),
            "edge chain:\n{edge}"
        );
    }

    #[test]
    fn echo_requests_are_rate_limited_per_source() {
        let text = nft_ruleset(&policy());
        assert_line(
            &text,
            "icmp type echo-request add @echo_v4 { ip saddr limit rate 2/second burst 3 packets } accept",
        );
        assert_line(
            &text,
            "icmpv6 type echo-request add @echo_v6 { ip6 saddr limit rate 2/second burst 3 packets } accept",
        );
        let mut p = policy();
        if let Some(e) = p.edge.as_mut() {
            e.icmp_echo.ns_per_token = 0;
        }
        let text = nft_ruleset(&p);
        let edge = chain(&text, "edge");
        assert!(
            !edge.contains("echo-request"),
            "a zero rate must not admit echoes:\n{edge}"
        );
    }

    #[test]
    fn limit_rate_picks_a_whole_unit() {
        assert_eq!(limit_rate(1_000_000_000), "1/second");
        assert_eq!(limit_rate(10_000_000), "100/second");
        assert_eq!(limit_rate(2_000_000_000), "30/minute");
        // 86,400 / 7 = 12,342.9 echoes a day: no unit divides evenly.
        assert_eq!(limit_rate(7_000_000_000), "12343/day");
    }

    #[test]
    fn runtime_grants_are_merged_and_said_so_and_strangers_named() {
        let mut p = policy();
        let mut grants = RuntimeGrants::default();
        grants.allow(
            "app-1",
            Grant::Ports {
                protocol: Protocol::Udp,
                first: 9999,
                last: 9999,
            },
        );
        grants.allow("gone\npeer", Grant::Icmp);
        let merged = merge_runtime_grants(&mut p, Path::new("/var/lib/ztxdp/grants.json"), &grants);
        assert_eq!(merged.unknown_peers, vec!["gone peer".to_owned()]);
        let notes = merged.notes;
        let text = nft_ruleset_with(
            &p,
            &NftOptions {
                notes,
                ..NftOptions::default()
            },
        );
        assert_line(
            &text,
            "# Includes the runtime grants of /var/lib/ztxdp/grants.json (2 peers changed by `ztxdp allow`/`revoke`).",
        );
        assert_line(
            &text,
            "# Ignored: the runtime grants name gone peer, which is no peer of this config.",
        );
        assert_line(&text, "udp dport { 53, 9999 } accept");
        assert!(text.starts_with("#!/usr/sbin/nft -f\n"), "{text}");
    }

    #[test]
    fn conntrack_variant_accepts_established_first() {
        let text = nft_ruleset_with(
            &policy(),
            &NftOptions {
                conntrack: true,
                ..NftOptions::default()
            },
        );
        for chain in ["chain edge {", "chain tunnel {"] {
            let after = text
                .split(chain)
                .nth(1)
                .unwrap_or_else(|| panic!("no {chain}:\n{text}"));
            assert_eq!(
                lines(after).get(1),
                Some(&"ct state established,related accept"),
                "first rule of {chain}:\n{after}"
            );
        }
    }

    #[test]
    fn tunnel_rules_map_sources_to_peer_grants() {
        let text = nft_ruleset(&policy());
        assert_line(&text, "iifname \"wg0\" jump tunnel");
        assert_line(
            &text,
            "10.100.0.1/32 : jump peer_0, 10.100.0.16/28 : jump peer_1 }",
        );
        assert_line(&text, "fd00:100::1/128 : jump peer_0 }");
        let peer0 = text
            .split("chain peer_0 {")
            .nth(1)
            .unwrap_or_else(|| panic!("no peer_0:\n{text}"));
        let peer0 = peer0.split("\n  }").next().unwrap_or_default();
        assert_line(peer0, "tcp dport { 5432, 8000-8100 } accept");
        assert_line(peer0, "udp dport { 53 } accept");
        assert_line(peer0, "icmp type echo-request accept");
        // A peer without grants reaches nothing but its neighbour messages,
        // and its name cannot break out of its comment.
        let peer1 = text
            .split("chain peer_1 {")
            .nth(1)
            .unwrap_or_else(|| panic!("no peer_1:\n{text}"));
        let peer1 = peer1.split("\n  }").next().unwrap_or_default();
        assert_eq!(
            peer1.matches("accept").count(),
            1,
            "peer without grants accepts more than neighbour messages:\n{peer1}"
        );
        assert_line(
            peer1,
            "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept",
        );
        // Router messages drop before any peer is looked up.
        assert_line(
            &text,
            "icmpv6 type { nd-router-solicit, nd-router-advert, nd-redirect } counter name tunnel_drop drop",
        );
        assert_line(&text, "# peer ops laptop");
    }

    #[test]
    fn services_get_a_set_per_family_and_a_rule_per_protocol() {
        let mut p = policy();
        if let Some(e) = p.edge.as_mut() {
            e.services = vec![
                crate::policy::Service {
                    name: "https".into(),
                    ports: vec![
                        crate::policy::PortRange {
                            protocol: Protocol::Tcp,
                            first: 443,
                            last: 443,
                        },
                        crate::policy::PortRange {
                            protocol: Protocol::Udp,
                            first: 443,
                            last: 443,
                        },
                    ],
                    from: vec![net("0.0.0.0/0"), net("::/0")],
                },
                crate::policy::Service {
                    name: "admin".into(),
                    ports: vec![crate::policy::PortRange {
                        protocol: Protocol::Tcp,
                        first: 8000,
                        last: 8100,
                    }],
                    from: vec![net("10.0.0.0/8")],
                },
            ];
        }
        let text = nft_ruleset(&p);
        assert_line(&text, "# service https");
        assert_line(&text, "tcp dport { 443 } ip saddr @service_1_v4 accept");
        assert_line(&text, "udp dport { 443 } ip6 saddr @service_1_v6 accept");
        assert_line(
            &text,
            "tcp dport { 8000-8100 } ip saddr @service_2_v4 accept",
        );
        assert!(
            !text.contains("@service_2_v6 accept"),
            "a service with no IPv6 source gets no IPv6 rule:\n{text}"
        );
        assert_line(&text, "0.0.0.0/0 }");
    }

    #[test]
    fn empty_sets_have_no_elements_and_no_rule() {
        let mut p = policy();
        p.tunnel = None;
        if let Some(e) = p.edge.as_mut() {
            e.ssh_allow.clear();
            e.wireguard_ports.clear();
        }
        let text = nft_ruleset(&p);
        assert!(
            !text.contains("elements"),
            "empty sets must not list elements:\n{text}"
        );
        assert!(!text.contains("dport"), "no port may be open:\n{text}");
        assert!(
            !text.contains("jump tunnel"),
            "no tunnel configured:\n{text}"
        );
        // Braces balance, or nft refuses the file.
        assert_eq!(
            text.matches('{').count(),
            text.matches('}').count(),
            "unbalanced braces:\n{text}"
        );
    }
}
