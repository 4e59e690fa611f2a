//! The policy maps' side of a drift check: what the kernel's maps hold
//! ([`Tables::contents`]) against what the policy puts there
//! ([`Contents::of`]), as differences a reader matches to the config.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use zt_common::{
    FlowConfig, GrantKey, PEER_ICMP, PeerInfo, SOURCE_DEEPER_24, SOURCE_DEEPER_32, map,
};

use super::{Area, Change, Difference};
use crate::{
    grants,
    policy::{EdgePolicy, Grant, Protocol, TunnelPolicy},
    tables::{Contents, LpmParts, Sources, net},
};

/// Peer names by index.
pub(super) fn peer_names(tunnel: Option<&TunnelPolicy>) -> Vec<String> {
    tunnel.map_or_else(Vec::new, |t| {
        t.peers.iter().map(|p| p.name.clone()).collect()
    })
}

/// Edge service names by bit: `ssh`, then the `[[edge.service]]` tables.
pub(super) fn service_names(edge: Option<&EdgePolicy>) -> Vec<String> {
    edge.map_or_else(Vec::new, |e| {
        e.services().map(|s| s.name.to_owned()).collect()
    })
}

fn name_of(names: &[String], index: u32) -> String {
    names
        .get(index as usize)
        .cloned()
        .unwrap_or_else(|| format!("#{index}"))
}

/// A prefix as the config writes it.
fn prefix<const N: usize>((bytes, len): &LpmParts<N>) -> String {
    if let Ok(v4) = <[u8; 4]>::try_from(&bytes[..]) {
        format!("{}/{len}", Ipv4Addr::from(v4))
    } else {
        let mut v6 = [0u8; 16];
        v6.copy_from_slice(&bytes[..16.min(N)]);
        format!("{}/{len}", Ipv6Addr::from(v6))
    }
}

fn entry_difference(
    area: Area,
    change: Change,
    peer: Option<String>,
    item: String,
    text: String,
) -> Difference {
    Difference {
        area,
        change,
        peer,
        interface: None,
        item,
        kernel: None,
        text,
    }
}

/// The differences between the maps' contents `want` (the policy) and
/// `kernel` (read back), for the maps `present` says the running programs
/// use; `names` are the peers by index, `services` the edge services by bit.
pub(super) fn compare_maps(
    want: &Contents,
    kernel: &Contents,
    present: &dyn Fn(&'static str) -> bool,
    names: &[String],
    services: &[String],
) -> Vec<Difference> {
    let mut out = Vec::new();
    if present(map::EDGE_UDP_PORTS) {
        for (word, (w, k)) in (0u32..).zip(want.udp_ports.iter().zip(&kernel.udp_ports)) {
            for (bits, change) in [(w & !k, Change::Missing), (k & !w, Change::Extra)] {
                for bit in (0..64u32).filter(|b| bits & (1 << b) != 0) {
                    let port = word * 64 + bit;
                    out.push(entry_difference(
                        Area::WireguardPorts,
                        change,
                        None,
                        port.to_string(),
                        format!("wireguard_ports: {port} {}", word_of(change)),
                    ));
                }
            }
        }
    }
    if present(map::SERVICE_PORTS) {
        out.extend(mask_differences(
            &want.service_ports,
            &kernel.service_ports,
            services,
            |&at| {
                let (protocol, port) = if at >= 65_536 {
                    ("udp", at - 65_536)
                } else {
                    ("tcp", at)
                };
                format!("{protocol}/{port}")
            },
            |service, _| (Area::ServicePort, format!("service {service}:")),
        ));
    }
    out.extend(source_differences(
        &want.sources,
        &kernel.sources,
        present,
        services,
    ));
    let mut icmp = IcmpFlags::default();
    if present(map::PEER_V4) {
        out.extend(peer_entries(
            &want.peer_v4,
            &kernel.peer_v4,
            names,
            &mut icmp,
        ));
    }
    if present(map::PEER_V6) {
        out.extend(peer_entries(
            &want.peer_v6,
            &kernel.peer_v6,
            names,
            &mut icmp,
        ));
    }
    out.extend(icmp.differences(names));
    if present(map::GRANTS) {
        out.extend(grant_differences(&want.grants, &kernel.grants, names));
    }
    if present(map::FLOW_CONFIG) {
        out.extend(flow_differences(&want.flow_config, &kernel.flow_config));
    }
    out
}

/// The service bits one side gives a port and the other does not, one
/// difference per port and service:
/// `service https: tcp/443 missing`. `area` gives a service's area and
/// the words before the entry.
fn mask_differences<K: Ord>(
    want: &BTreeMap<K, u64>,
    kernel: &BTreeMap<K, u64>,
    services: &[String],
    item: impl Fn(&K) -> String,
    area: impl Fn(&str, u32) -> (Area, String),
) -> Vec<Difference> {
    let keys: BTreeSet<&K> = want.keys().chain(kernel.keys()).collect();
    let mut out = Vec::new();
    for key in keys {
        let w = want.get(key).copied().unwrap_or(0);
        let k = kernel.get(key).copied().unwrap_or(0);
        for (bits, change) in [(w & !k, Change::Missing), (k & !w, Change::Extra)] {
            for bit in (0..u64::BITS).filter(|b| bits & (1 << b) != 0) {
                let service = name_of(services, bit);
                let (area, before) = area(&service, bit);
                let item = item(key);
                out.push(entry_difference(
                    area,
                    change,
                    None,
                    item.clone(),
                    format!("{before} {item} {}", word_of(change)),
                ));
            }
        }
    }
    out
}

/// The service bits one side gives a source address and the other does
/// not, as the fewest prefixes that cover those addresses: a prefix the
/// maps hold expanded (10.0.0.0/8 is 256 blocks) is one line, as the
/// config lists it (`ssh_allow: 10.0.0.0/8 missing`). Then where the
/// program looks, which differs apart from the entries.
fn source_differences(
    want: &Sources,
    kernel: &Sources,
    present: &dyn Fn(&'static str) -> bool,
    services: &[String],
) -> Vec<Difference> {
    let (v4, v6) = (present(map::SOURCES_V4_16), present(map::SOURCES_V6));
    let nets = |s: &Sources| {
        let mut out: BTreeMap<IpNet, u64> = BTreeMap::new();
        if v4 {
            out.extend(
                s.v4_prefixes()
                    .iter()
                    .filter_map(|(k, &m)| Some((net(k)?, m))),
            );
        }
        if v6 {
            out.extend(
                s.v6_prefixes()
                    .iter()
                    .filter_map(|(k, &m)| Some((net(k)?, m))),
            );
        }
        out
    };
    let (w, k) = (nets(want), nets(kernel));
    let mut by: BTreeMap<(u32, Change), Vec<IpNet>> = BTreeMap::new();
    for key in w.keys().chain(k.keys()).collect::<BTreeSet<_>>() {
        let wm = w.get(key).copied().unwrap_or(0);
        let km = k.get(key).copied().unwrap_or(0);
        for (bits, change) in [(wm & !km, Change::Missing), (km & !wm, Change::Extra)] {
            for bit in (0..u64::BITS).filter(|b| bits & (1 << b) != 0) {
                by.entry((bit, change)).or_default().push(*key);
            }
        }
    }
    let mut out = Vec::new();
    for ((bit, change), nets) in by {
        // The ssh service's sources are `ssh_allow`, as before services.
        let (area, before) = if bit == 0 {
            (Area::SshAllow, "ssh_allow:".to_owned())
        } else {
            let service = name_of(services, bit);
            (Area::ServiceSource, format!("service {service}: from"))
        };
        for n in IpNet::aggregate(&nets) {
            out.push(entry_difference(
                area,
                change,
                None,
                n.to_string(),
                format!("{before} {n} {}", word_of(change)),
            ));
        }
    }
    out.extend(lookup_differences(want, kernel, v4, v6));
    out
}

/// Where the program looks for sources, where it differs: a block whose
/// /24s or /32s it does not look up has entries there that admit no one
/// (`edge source lookup: /32 map under 10.77.0.0/16 missing`), and so has
/// an IPv6 length it skips, or the hash it skips for the trie.
fn lookup_differences(want: &Sources, kernel: &Sources, v4: bool, v6: bool) -> Vec<Difference> {
    let mut items: Vec<(Change, String)> = Vec::new();
    if v4 {
        for (bit, length) in [(SOURCE_DEEPER_24, 24), (SOURCE_DEEPER_32, 32)] {
            let blocks = |s: &Sources| -> BTreeSet<u32> {
                s.deeper
                    .iter()
                    .filter(|(_, d)| *d & bit != 0)
                    .map(|(at, _)| *at)
                    .collect()
            };
            let (w, k) = (blocks(want), blocks(kernel));
            for (change, only) in [
                (Change::Missing, w.difference(&k)),
                (Change::Extra, k.difference(&w)),
            ] {
                let nets: Vec<IpNet> = only
                    .filter_map(|&at| net(&((at << 16).to_be_bytes(), 16)))
                    .collect();
                for n in IpNet::aggregate(&nets) {
                    items.push((change, format!("/{length} map under {n}")));
                }
            }
        }
    }
    if v6 {
        let ((w_trie, w), (k_trie, k)) = (want.v6_lookups(), kernel.v6_lookups());
        for (change, only) in [
            (Change::Missing, w.difference(&k)),
            (Change::Extra, k.difference(&w)),
        ] {
            items.extend(only.map(|len| (change, format!("IPv6 /{len}"))));
        }
        for (change, differs) in [
            (Change::Missing, w_trie && !k_trie),
            (Change::Extra, k_trie && !w_trie),
        ] {
            if differs {
                items.push((change, "IPv6 trie".to_owned()));
            }
        }
    }
    items
        .into_iter()
        .map(|(change, item)| {
            let text = format!("edge source lookup: {item} {}", word_of(change));
            entry_difference(Area::SourceLookup, change, None, item, text)
        })
        .collect()
}

const fn word_of(change: Change) -> &'static str {
    match change {
        Change::Missing => "missing",
        Change::Extra => "extra",
        Change::Replaced => "replaced",
        Change::Differs => "differs",
    }
}

/// Peer-trie entries whose ICMP flag differs, by peer index: the
/// addresses where the kernel lacks it, and where it has it unasked,
/// out of all the addresses both sides give that peer.
#[derive(Default)]
struct IcmpFlags {
    missing: BTreeMap<u32, Vec<String>>,
    extra: BTreeMap<u32, Vec<String>>,
    common: BTreeMap<u32, usize>,
}

impl IcmpFlags {
    /// `peer app-1: icmp missing`, with the addresses when only some of
    /// the peer's lack it.
    fn differences(&self, names: &[String]) -> Vec<Difference> {
        let mut out = Vec::new();
        for (flags, change) in [
            (&self.missing, Change::Missing),
            (&self.extra, Change::Extra),
        ] {
            for (index, addresses) in flags {
                let name = name_of(names, *index);
                let whole = self.common.get(index) == Some(&addresses.len());
                let text = if whole {
                    format!("peer {name}: icmp {}", word_of(change))
                } else {
                    format!(
                        "peer {name}: icmp {} for {}",
                        word_of(change),
                        addresses.join(", ")
                    )
                };
                out.push(entry_difference(
                    Area::Grant,
                    change,
                    Some(name),
                    "icmp".into(),
                    text,
                ));
            }
        }
        out
    }
}

/// The differences of one peer trie; ICMP flags go to `icmp`.
fn peer_entries<const N: usize>(
    want: &BTreeMap<LpmParts<N>, PeerInfo>,
    kernel: &BTreeMap<LpmParts<N>, PeerInfo>,
    names: &[String],
    icmp: &mut IcmpFlags,
) -> Vec<Difference> {
    let mut out = Vec::new();
    for (key, w) in want {
        let p = prefix(key);
        match kernel.get(key) {
            None => {
                let name = name_of(names, w.index);
                out.push(entry_difference(
                    Area::PeerAddress,
                    Change::Missing,
                    Some(name.clone()),
                    p.clone(),
                    format!("peer {name}: address {p} missing"),
                ));
            }
            Some(k) if k.index != w.index => {
                let (kn, wn) = (name_of(names, k.index), name_of(names, w.index));
                out.push(Difference {
                    kernel: Some(kn.clone()),
                    ..entry_difference(
                        Area::PeerAddress,
                        Change::Differs,
                        Some(wn.clone()),
                        p.clone(),
                        format!("address {p}: peer {kn} in the kernel, {wn} in the config"),
                    )
                });
            }
            Some(k) => {
                *icmp.common.entry(w.index).or_default() += 1;
                let (w_icmp, k_icmp) = (w.flags & PEER_ICMP != 0, k.flags & PEER_ICMP != 0);
                if w_icmp && !k_icmp {
                    icmp.missing.entry(w.index).or_default().push(p);
                } else if k_icmp && !w_icmp {
                    icmp.extra.entry(w.index).or_default().push(p);
                }
            }
        }
    }
    for (key, k) in kernel.iter().filter(|(key, _)| !want.contains_key(*key)) {
        let (p, name) = (prefix(key), name_of(names, k.index));
        out.push(entry_difference(
            Area::PeerAddress,
            Change::Extra,
            Some(name.clone()),
            p.clone(),
            format!("peer {name}: address {p} extra"),
        ));
    }
    out
}

/// Grant words that differ, as the config writes grants:
/// `peer app-1: tcp/5432 missing`, ranges merged.
fn grant_differences(
    want: &HashMap<GrantKey, u64>,
    kernel: &HashMap<GrantKey, u64>,
    names: &[String],
) -> Vec<Difference> {
    // By peer index: ports missing and extra, as single-port grants.
    let mut by_peer: BTreeMap<u32, (Vec<Grant>, Vec<Grant>)> = BTreeMap::new();
    for key in want.keys().chain(kernel.keys()) {
        let w = want.get(key).copied().unwrap_or(0);
        let k = kernel.get(key).copied().unwrap_or(0);
        let protocol = match key.protocol {
            zt_common::proto::TCP => Protocol::Tcp,
            zt_common::proto::UDP => Protocol::Udp,
            // A key of no protocol the programs look up: nothing passes by it.
            _ => continue,
        };
        let entry = by_peer.entry(key.peer).or_default();
        for (bits, list) in [(w & !k, &mut entry.0), (k & !w, &mut entry.1)] {
            for bit in (0..64u16).filter(|b| bits & (1 << b) != 0) {
                let port = (key.word << 6) | bit;
                let g = Grant::Ports {
                    protocol,
                    first: port,
                    last: port,
                };
                if !list.contains(&g) {
                    list.push(g);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (index, (missing, extra)) in by_peer {
        let name = name_of(names, index);
        for (ports, change) in [(missing, Change::Missing), (extra, Change::Extra)] {
            for g in grants::effective(&ports, &[], &[]) {
                out.push(entry_difference(
                    Area::Grant,
                    change,
                    Some(name.clone()),
                    g.to_string(),
                    format!("peer {name}: {g} {}", word_of(change)),
                ));
            }
        }
    }
    out
}

/// The flow and echo settings that differ, by config key.
fn flow_differences(want: &FlowConfig, kernel: &FlowConfig) -> Vec<Difference> {
    let time = |ns: u64| {
        if ns.is_multiple_of(1_000_000_000) {
            format!("{} s", ns / 1_000_000_000)
        } else {
            format!("{ns} ns")
        }
    };
    let fields = [
        (
            "flows.tcp_established_timeout",
            want.tcp_established_ns,
            kernel.tcp_established_ns,
            true,
        ),
        (
            "flows.tcp_closing_timeout",
            want.tcp_closing_ns,
            kernel.tcp_closing_ns,
            true,
        ),
        ("flows.udp_timeout", want.udp_ns, kernel.udp_ns, true),
        ("flows.icmp_timeout", want.icmp_ns, kernel.icmp_ns, true),
        (
            "flows.fragment_timeout",
            want.fragment_ns,
            kernel.fragment_ns,
            true,
        ),
        (
            "edge.icmp_echo_rate",
            want.echo_ns_per_token,
            kernel.echo_ns_per_token,
            true,
        ),
        (
            "edge.icmp_echo_burst",
            want.echo_burst,
            kernel.echo_burst,
            false,
        ),
    ];
    fields
        .into_iter()
        .filter(|(_, w, k, _)| w != k)
        .map(|(key, w, k, is_time)| {
            let show = |v: u64| if is_time { time(v) } else { v.to_string() };
            let what = if key == "edge.icmp_echo_rate" {
                " an echo"
            } else {
                ""
            };
            Difference {
                kernel: Some(show(k)),
                ..entry_difference(
                    Area::Flows,
                    Change::Differs,
                    None,
                    key.to_owned(),
                    format!(
                        "{key}: {}{what} in the config, {}{what} in the kernel",
                        show(w),
                        show(k)
                    ),
                )
            }
        })
        .collect()
}
