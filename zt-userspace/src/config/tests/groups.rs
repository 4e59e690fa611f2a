//! `[[tunnel.group]]`: parsing, and every refusal naming its key and line.

use super::*;
use crate::policy::Group;

/// Peers `app-1` (lines 4-6), `app-2` (8-10) and `app-3` (12-14) with
/// `groups` after them, from line 15 (line 1 is `[tunnel]`).
fn with_groups(groups: &str) -> String {
    let peer =
        |n: u8| format!("[[tunnel.peer]]\nname = \"app-{n}\"\naddresses = [\"10.100.0.{n}/32\"]\n");
    format!(
        "[tunnel]\ninterface = \"wg0\"\n\n{}\n{}\n{}{groups}\n{AUDIT}",
        peer(1),
        peer(2),
        peer(3)
    )
}

#[test]
fn groups_name_their_members_by_index() {
    let config = parse_ok(&with_groups(
        "[[tunnel.group]]\nname = \"db-clients\"\npeers = [\"app-3\", \"app-1\"]\n\
         allow = [\"tcp/5432\", \"icmp\"]\n\n\
         [[tunnel.group]]\nname = \"ops\"\npeers = [\"app-1\"]\n",
    ));
    let tunnel = config.policy.tunnel.as_ref().expect("tunnel");
    assert_eq!(
        tunnel.groups,
        vec![
            Group {
                name: "db-clients".into(),
                members: vec![2, 0],
                grants: vec![
                    Grant::Ports {
                        protocol: Protocol::Tcp,
                        first: 5432,
                        last: 5432
                    },
                    Grant::Icmp
                ],
            },
            Group {
                name: "ops".into(),
                members: vec![0],
                grants: Vec::new(),
            },
        ]
    );
    // Groups are grants of their own: the peers' stay as written.
    assert!(tunnel.peers.iter().all(|p| p.grants.is_empty()));
    assert_eq!(config.line_of("tunnel.group[1].name"), Some(21));
}

#[test]
fn bad_groups_are_named_with_their_line() {
    let group = |body: &str| with_groups(&format!("[[tunnel.group]]\n{body}"));
    let cases: [(&str, &str, usize, &str); 9] = [
        (
            "name = \"db\"\npeers = [\"app-1\", \"app-9\"]",
            "tunnel.group[0].peers[1]",
            17,
            "no peer is named \"app-9\"",
        ),
        (
            "name = \"db\"\npeers = []",
            "tunnel.group[0].peers",
            17,
            "a group needs at least one peer",
        ),
        ("name = \"db\"", "tunnel.group[0].peers", 15, "missing"),
        ("peers = [\"app-1\"]", "tunnel.group[0].name", 15, "missing"),
        (
            "name = \"db clients\"\npeers = [\"app-1\"]",
            "tunnel.group[0].name",
            16,
            "is not a group name",
        ),
        (
            "name = \"a\\u202Eb\"\npeers = [\"app-1\"]",
            "tunnel.group[0].name",
            16,
            "\"a\\u{202e}b\" is not a group name",
        ),
        (
            "name = \"db\"\npeers = [\"app-1\", \"app-1\"]",
            "tunnel.group[0].peers[1]",
            17,
            "\"app-1\" is listed twice (also tunnel.group[0].peers[0])",
        ),
        (
            "name = \"db\"\npeers = [\"app-1\"]\nallow = [\"tcp/0\"]",
            "tunnel.group[0].allow[0]",
            18,
            "port 0",
        ),
        (
            "name = \"db\"\npeers = [\"app-1\"]\nmembers = [\"app-2\"]",
            "tunnel.group[0].members",
            18,
            "unknown field",
        ),
    ];
    for (body, key, line, says) in cases {
        let shown = expect_error(&group(body), key, line);
        assert!(shown.contains(says), "{shown:?} should say {says:?}");
    }
    let twice = with_groups(
        "[[tunnel.group]]\nname = \"db\"\npeers = [\"app-1\"]\n\n\
         [[tunnel.group]]\nname = \"db\"\npeers = [\"app-2\"]\n",
    );
    let shown = expect_error(&twice, "tunnel.group[1].name", 20);
    assert!(
        shown.contains("group name \"db\" is already used by tunnel.group[0]"),
        "{shown}"
    );
}
