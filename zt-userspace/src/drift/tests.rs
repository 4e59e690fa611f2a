//! Tests of the comparisons, on made-up hooks and maps; the kernel's side
//! is tested end to end in `tests/tests/e2e_drift.rs`.

use std::path::Path;

use zt_common::{GrantKey, PeerInfo, map};

use super::*;
use crate::tables::Sources;

const TAG: u64 = 0x0123_4567_89ab_cdef;

fn tags() -> Tags {
    Tags(OURS.iter().map(|n| ((*n).to_owned(), TAG)).collect())
}

fn config() -> Config {
    let text = "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\n\
                ssh_allow = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\n\
                [tunnel]\ninterface = \"wg0\"\nruntime_grants = \"/tmp/g.json\"\n\n\
                [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\", \"fd00:100::1/128\"]\n\
                allow = [\"tcp/5432\", \"tcp/8000-8100\", \"icmp\"]\n\n\
                [[tunnel.peer]]\nname = \"app-2\"\naddresses = [\"10.100.0.2/32\"]\n\n\
                [audit]\npath = \"/tmp/audit.jsonl\"\n";
    Config::parse(text, Path::new("/etc/ztxdp/ztxdp.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn hook(hook: Hook, name: &str, id: u32, tag: u64, our_slot: bool) -> HookEntry {
    HookEntry {
        hook,
        name: name.to_owned(),
        program_id: Some(id),
        tag: Some(tag),
        // Programs of one load share their maps.
        map_ids: vec![100, 101, id],
        our_slot,
    }
}

/// Everything `up` attaches for [`config`], from this binary.
fn attached() -> Vec<(String, HookEntry)> {
    vec![
        (
            "eth0".into(),
            hook(Hook::Xdp, program::EDGE_NAME, 1, TAG, false),
        ),
        (
            "eth0".into(),
            hook(Hook::TcEgress, program::EDGE_EGRESS_NAME, 2, TAG, true),
        ),
        (
            "wg0".into(),
            hook(Hook::TcIngress, program::TUNNEL_NAME, 3, TAG, true),
        ),
        (
            "wg0".into(),
            hook(Hook::TcEgress, program::TUNNEL_EGRESS_NAME, 4, TAG, true),
        ),
    ]
}

fn texts(d: &[Difference]) -> Vec<&str> {
    d.iter().map(|d| d.text.as_str()).collect()
}

#[test]
fn ztxdps_programs_in_place_match() {
    let found = attached();
    let (d, matched) = compare_programs(&slots(&config()), &found, &tags());
    assert_eq!(texts(&d), Vec::<&str>::new());
    assert_eq!(matched.len(), 4);
    let (ids, others) = one_load(&matched);
    assert!(others.is_empty());
    assert_eq!(ids, [1, 2, 3, 4, 100, 101]);
}

#[test]
fn missing_replaced_foreign_and_other_binaries_programs_are_named() {
    let mut found = attached();
    // The edge's XDP program replaced by another tool's; the tunnel
    // program by a zt_tunnel of another build; a TCX program before it.
    found[0].1 = hook(Hook::Xdp, "xdp_pass", 9, 7, false);
    found[2].1 = hook(Hook::TcIngress, program::TUNNEL_NAME, 10, 8, true);
    found.push(("wg0".into(), hook(Hook::TcxIngress, "sneaky", 11, 9, false)));
    found.push((
        "wg0".into(),
        HookEntry {
            hook: Hook::TcIngress,
            name: "u32".into(),
            program_id: None,
            tag: None,
            map_ids: Vec::new(),
            our_slot: false,
        },
    ));
    // The edge's flow recorder is gone.
    found.remove(1);
    let (d, matched) = compare_programs(&slots(&config()), &found, &tags());
    assert_eq!(
        texts(&d),
        [
            "program zt_edge: replaced on eth0 xdp by xdp_pass (id 9)",
            "program zt_edge_out: missing from eth0 tc-egress",
            "program zt_tunnel on wg0 tc-ingress: zt_tunnel (id 10) is not from this binary's \
             BPF object (tag 0000000000000008, this binary's 0123456789abcdef)",
            "foreign program on wg0 tcx-ingress: sneaky (id 11)",
            "foreign program on wg0 tc-ingress: a u32 filter",
        ]
    );
    assert_eq!(
        matched.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        [program::TUNNEL_EGRESS_NAME]
    );
}

#[test]
fn a_second_copy_of_ours_is_extra_and_another_load_is_named() {
    let mut found = attached();
    found.push((
        "wg0".into(),
        hook(Hook::TcIngress, program::TUNNEL_NAME, 12, TAG, false),
    ));
    let (d, _) = compare_programs(&slots(&config()), &found, &tags());
    assert_eq!(
        texts(&d),
        ["program zt_tunnel (id 12): extra on wg0 tc-ingress"]
    );
    let a = hook(Hook::Xdp, program::EDGE_NAME, 1, TAG, false);
    let mut b = hook(Hook::TcIngress, program::TUNNEL_NAME, 3, TAG, true);
    b.map_ids = vec![200, 201];
    let (ids, others) = one_load(&[&a, &b]);
    assert_eq!(ids, [1, 100, 101]);
    assert_eq!(
        texts(&others),
        [
            "program zt_tunnel (id 3): loaded apart from zt_edge (id 1) (they share no map), \
          so its maps are not compared"
        ]
    );
}

fn contents(config: &Config) -> Contents {
    Contents::of(
        config.policy.edge.as_ref(),
        config.policy.tunnel.as_ref(),
        &config.policy.flows,
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn map_differences_read_as_the_config_writes_them() {
    let config = config();
    let names = peer_names(config.policy.tunnel.as_ref());
    let services = service_names(config.policy.edge.as_ref());
    let want = contents(&config);
    let all = |_: &'static str| true;
    assert!(compare_maps(&want, &want, &all, &names, &services).is_empty());

    let mut kernel = want.clone();
    kernel.sources.v4_24.insert([203, 0, 113, 0], 1);
    kernel.sources.v6.clear();
    // The ssh port moves to 2200.
    kernel.service_ports.clear();
    kernel.service_ports.insert(2200, 1);
    kernel.udp_ports[801] |= 1 << 1;
    // app-1 loses tcp/5432 and tcp/8050-8051, app-2 gains udp/53.
    let word = |peer, protocol, port: u16| GrantKey {
        peer,
        protocol,
        _pad0: 0,
        word: port >> 6,
    };
    kernel.grants.remove(&word(0, zt_common::proto::TCP, 5432));
    if let Some(w) = kernel.grants.get_mut(&word(0, zt_common::proto::TCP, 8050)) {
        *w &= !(0b11 << (8050 % 64));
    }
    kernel
        .grants
        .insert(word(1, zt_common::proto::UDP, 53), 1 << 53);
    // app-1's IPv6 address lost its ICMP flag; app-2's address is app-1's.
    if let Some(info) = kernel.peer_v6.values_mut().next() {
        info.flags = 0;
    }
    if let Some(info) = kernel.peer_v4.get_mut(&([10, 100, 0, 2], 32)) {
        info.index = 0;
    }
    kernel
        .peer_v4
        .insert(([10, 9, 0, 0], 16), PeerInfo { index: 7, flags: 0 });
    kernel.flow_config.udp_ns = 5_000_000_000;
    let mut d = compare_maps(&want, &kernel, &all, &names, &services);
    d.sort();
    assert_eq!(
        texts(&d),
        [
            "wireguard_ports: 51265 extra",
            "ssh_allow: fd77::2/128 missing",
            "ssh_allow: 203.0.113.0/24 extra",
            "service ssh: tcp/22 missing",
            "service ssh: tcp/2200 extra",
            "peer #7: address 10.9.0.0/16 extra",
            "address 10.100.0.2/32: peer app-1 in the kernel, app-2 in the config",
            "peer app-1: icmp missing for fd00:100::1/128",
            "peer app-1: tcp/5432 missing",
            "peer app-1: tcp/8050-8051 missing",
            "peer app-2: udp/53 extra",
            "flows.udp_timeout: 60 s in the config, 5 s in the kernel",
        ]
    );
    let grant = d
        .iter()
        .find(|d| d.item == "tcp/5432")
        .unwrap_or_else(|| panic!("no tcp/5432 difference"));
    assert_eq!(
        (grant.area, grant.change, grant.peer.as_deref()),
        (Area::Grant, Change::Missing, Some("app-1"))
    );

    // Maps no running program uses are not compared.
    let tunnel_only = |m: &'static str| {
        ![
            map::EDGE_UDP_PORTS,
            map::SERVICE_PORTS,
            map::SOURCES_V4_16,
            map::SOURCES_V6,
        ]
        .contains(&m)
    };
    assert!(
        !compare_maps(&want, &kernel, &tunnel_only, &names, &services)
            .iter()
            .any(|d| matches!(
                d.area,
                Area::SshAllow | Area::WireguardPorts | Area::ServicePort
            ))
    );
}

#[test]
fn a_peer_without_icmp_anywhere_is_one_line() {
    let config = config();
    let names = peer_names(config.policy.tunnel.as_ref());
    let services = service_names(config.policy.edge.as_ref());
    let want = contents(&config);
    let mut kernel = want.clone();
    for info in kernel
        .peer_v4
        .values_mut()
        .chain(kernel.peer_v6.values_mut())
    {
        info.flags = 0;
    }
    assert_eq!(
        texts(&compare_maps(&want, &kernel, &|_| true, &names, &services)),
        ["peer app-1: icmp missing"]
    );
}

/// An edge whose `ssh_allow` lists prefixes the maps hold expanded.
fn expanded_config() -> Config {
    let text = "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\n\
                ssh_allow = [\"10.0.0.0/8\", \"192.0.2.0/25\", \"192.0.2.128/25\", \"fd77::/48\"]\n\n\
                [audit]\npath = \"/tmp/audit.jsonl\"\n";
    Config::parse(text, Path::new("/etc/ztxdp/ztxdp.toml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_missing_prefix_is_one_line_not_its_expansion() {
    let config = expanded_config();
    let services = service_names(config.policy.edge.as_ref());
    let want = contents(&config);
    let mut kernel = want.clone();
    kernel.sources = Sources::default();
    let mut d = compare_maps(&want, &kernel, &|_| true, &[], &services);
    d.sort();
    assert_eq!(
        texts(&d),
        [
            "ssh_allow: 10.0.0.0/8 missing",
            "ssh_allow: 192.0.2.0/24 missing",
            "ssh_allow: fd77::/48 missing",
            "edge source lookup: /32 map under 192.0.0.0/16 missing",
            "edge source lookup: IPv6 /48 missing",
        ]
    );
}

#[test]
fn lookups_the_kernel_skips_are_differences_though_the_entries_are_there() {
    let config = expanded_config();
    let services = service_names(config.policy.edge.as_ref());
    let want = contents(&config);
    let mut kernel = want.clone();
    // The block of 192.0.2.0/25's addresses no longer says to look for
    // /32s, and the IPv6 lengths say the trie: every entry is still in
    // its map, and none of them is looked up.
    kernel.sources.deeper.clear();
    kernel.sources.lengths = zt_common::Source6Lengths {
        count: zt_common::SOURCE_V6_USE_TRIE,
        ..zt_common::Source6Lengths::default()
    };
    let mut d = compare_maps(&want, &kernel, &|_| true, &[], &services);
    d.sort();
    assert_eq!(
        texts(&d),
        [
            "edge source lookup: /32 map under 192.0.0.0/16 missing",
            "edge source lookup: IPv6 /48 missing",
            "edge source lookup: IPv6 trie extra",
        ]
    );
    assert!(d.iter().all(|d| d.area == Area::SourceLookup), "{d:?}");
    // A reload writes the lookups back, not only the entries.
    assert_ne!(want.sources, kernel.sources);
}
