//! Groups merged into peers' grants, down to the kernel's bitmaps.

use std::{collections::BTreeSet, path::Path};

use zt_common::PEER_ICMP;

use super::*;
use crate::{
    audit::writer::tests::TempDir,
    config::{Config, parse_cli_grant},
    grants::GrantsLock,
    policy::{FlowSettings, Grant},
    tables::Contents,
};

/// `app-1` to `app-4`; groups `db` (app-1, app-2: tcp/5432, icmp) and
/// `web` (app-2, app-3: tcp/8000-8100).
fn config() -> Config {
    let text = "[tunnel]\ninterface = \"wg0\"\n\n\
        [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.0.0.1/32\"]\nallow = [\"tcp/22\"]\n\n\
        [[tunnel.peer]]\nname = \"app-2\"\naddresses = [\"10.0.0.2/32\"]\nallow = [\"tcp/5432\"]\n\n\
        [[tunnel.peer]]\nname = \"app-3\"\naddresses = [\"10.0.0.3/32\"]\n\n\
        [[tunnel.peer]]\nname = \"app-4\"\naddresses = [\"10.0.0.4/32\"]\nallow = [\"udp/53\"]\n\n\
        [[tunnel.group]]\nname = \"db\"\npeers = [\"app-1\", \"app-2\"]\nallow = [\"tcp/5432\", \"icmp\"]\n\n\
        [[tunnel.group]]\nname = \"web\"\npeers = [\"app-2\", \"app-3\"]\nallow = [\"tcp/8000-8100\"]\n\n\
        [audit]\npath = \"/tmp/audit.jsonl\"\n";
    Config::parse(text, Path::new("/etc/ztxdp.toml")).unwrap_or_else(|e| panic!("{e}"))
}

fn tunnel(config: &Config) -> &TunnelPolicy {
    config.policy.tunnel.as_ref().expect("a tunnel")
}

fn grant(text: &str) -> Grant {
    parse_cli_grant(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn strings(grants: &[Grant]) -> Vec<String> {
    grants.iter().map(ToString::to_string).collect()
}

/// Runtime changes to both groups and to two members.
fn changes() -> RuntimeGrants {
    let mut r = RuntimeGrants::default();
    r.allow_group("db", grant("6000"));
    // app-1 loses it; app-2 keeps it, from its own grant.
    r.revoke_group("db", grant("5432"));
    r.revoke_group("web", grant("8050"));
    r.allow_group("web", grant("icmp"));
    // A peer's own revoke wins over both of its groups.
    r.revoke("app-2", grant("icmp"));
    // ...and its own grant gives back what a group revoke took.
    r.allow("app-3", grant("8050"));
    r
}

#[test]
fn members_get_their_groups_grants_and_group_revokes_keep_other_sources() {
    let config = config();
    let merged = changes().apply(tunnel(&config));
    let got: Vec<(String, Vec<String>)> = merged
        .peers
        .iter()
        .map(|p| (p.name.clone(), strings(&p.grants)))
        .collect();
    let want = [
        ("app-1", &["tcp/22", "tcp/6000", "icmp"][..]),
        (
            "app-2",
            &["tcp/5432", "tcp/6000", "tcp/8000-8049", "tcp/8051-8100"][..],
        ),
        ("app-3", &["tcp/8000-8100", "icmp"][..]),
        ("app-4", &["udp/53"][..]),
    ]
    .map(|(n, g)| (n.to_owned(), g.iter().map(|s| (*s).to_owned()).collect()));
    assert_eq!(got, want);
    assert_eq!(
        changes().apply(&merged),
        merged,
        "applying the result again changes it"
    );
    // Without runtime changes, the config's groups alone.
    let plain = RuntimeGrants::default().apply(tunnel(&config));
    assert_eq!(
        strings(&plain.peers[1].grants),
        ["tcp/5432", "tcp/8000-8100", "icmp"]
    );
    assert_eq!(
        plain.peers[3],
        tunnel(&config).peers[3],
        "app-4 is untouched"
    );
}

#[test]
fn sources_say_where_each_grant_comes_from() {
    let config = config();
    let runtime = changes();
    let merger = Merger::new(tunnel(&config), &runtime);
    let shown = |index: usize| -> Vec<(Origin, Option<usize>, Vec<String>)> {
        merger
            .sources(index)
            .into_iter()
            .map(|s| (s.origin, s.group, strings(&s.grants.grants())))
            .collect()
    };
    let s = |list: &[&str]| list.iter().map(|g| (*g).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        shown(1),
        [
            (Origin::Peer, None, s(&["tcp/5432"])),
            (Origin::Runtime, Some(0), s(&["tcp/6000"])),
            (
                Origin::Group,
                Some(1),
                s(&["tcp/8000-8049", "tcp/8051-8100"])
            ),
        ],
        "app-2: db's icmp and 5432 are revoked, web's icmp is revoked for app-2"
    );
    assert_eq!(
        shown(2),
        [
            (Origin::Runtime, None, s(&["tcp/8050"])),
            (
                Origin::Group,
                Some(1),
                s(&["tcp/8000-8049", "tcp/8051-8100"])
            ),
            (Origin::Runtime, Some(1), s(&["icmp"])),
        ]
    );
    assert_eq!(merger.groups_of(1), [0, 1]);
    assert!(merger.untouched(3) && !merger.untouched(0));

    let audit = GroupGrants::of(tunnel(&config), &runtime);
    let tcp = crate::policy::Protocol::Tcp.number();
    for (peer, port, want) in [
        (0, Some(6000), &["db"][..]),
        (1, Some(6000), &["db"][..]),
        (1, Some(5432), &[][..]),
        (1, Some(8000), &["web"][..]),
        (1, Some(8050), &[][..]),
        (2, None, &["web"][..]),
        (0, None, &["db"][..]),
        (3, Some(53), &[][..]),
    ] {
        assert_eq!(
            audit.granting(peer, tcp, port),
            want,
            "peer {peer}, {port:?}"
        );
    }
}

/// What the kernel gets: each peer's grant words and ICMP flag, from the
/// merged policy, are its own grants and its groups' as bits.
#[test]
fn group_expansion_yields_each_members_bitmap() {
    let config = config();
    let merged = changes().apply(tunnel(&config));
    let contents = Contents::of(None, Some(&merged), &FlowSettings::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let mut bits: Vec<BTreeSet<(u8, u16)>> = vec![BTreeSet::new(); 4];
    for (key, word) in &contents.grants {
        for b in 0..64u16 {
            if word & (1 << b) != 0 {
                bits[key.peer as usize].insert((key.protocol, (key.word << 6) | b));
            }
        }
    }
    let mut icmp = [false; 4];
    for info in contents.peer_v4.values() {
        icmp[info.index as usize] = info.flags & PEER_ICMP != 0;
    }
    let tcp = |ports: &[std::ops::RangeInclusive<u16>]| -> BTreeSet<(u8, u16)> {
        ports.iter().cloned().flatten().map(|p| (6, p)).collect()
    };
    let want = [
        (tcp(&[22..=22, 6000..=6000]), true),
        (
            tcp(&[5432..=5432, 6000..=6000, 8000..=8049, 8051..=8100]),
            false,
        ),
        (tcp(&[8000..=8100]), true),
        ([(17, 53)].into_iter().collect(), false),
    ];
    for (peer, (ports, echo)) in want.into_iter().enumerate() {
        assert_eq!(bits[peer], ports, "grant bits of peer {peer}");
        assert_eq!(icmp[peer], echo, "ICMP flag of peer {peer}");
    }
}

#[test]
fn the_watch_follows_the_runtime_file() {
    let dir = TempDir::new("group-watch");
    let mut config = config();
    let path = dir.0.join("grants.json");
    config
        .policy
        .tunnel
        .as_mut()
        .expect("a tunnel")
        .runtime_grants
        .clone_from(&path);
    let tcp = crate::policy::Protocol::Tcp.number();
    let mut watch = GroupWatch::new(config.policy.tunnel.as_ref());
    assert_eq!(watch.granting(0, tcp, Some(5432)), ["db"]);
    assert!(watch.granting(0, tcp, Some(6000)).is_empty());
    let lock = GrantsLock::acquire(&path).unwrap_or_else(|e| panic!("{e}"));
    changes().save(&lock).unwrap_or_else(|e| panic!("{e}"));
    watch.refresh();
    assert_eq!(watch.granting(0, tcp, Some(6000)), ["db"]);
    assert!(watch.granting(0, tcp, Some(5432)).is_empty());
    // A tunnel without groups has nothing to watch.
    let mut none = GroupWatch::new(None);
    none.refresh();
    assert!(none.granting(0, tcp, Some(22)).is_empty());
}
