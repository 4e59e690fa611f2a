//! Tier 3, tunnel groups (issue 16): `[[tunnel.group]]` and `ztxdp allow`
//! / `revoke @GROUP` on the real `ztxdp up` and real wireguard-go tunnels
//! (the mesh of `e2e_tunnel.rs`: app-1 over IPv4 and IPv6, app-2 the same).
//!
//! Needs root, wireguard-go and wireguard-tools.

mod e2e;

use std::net::IpAddr;

use e2e::{
    Enforced, assert_all_time_out, assert_connects, at, listen,
    mesh::{app_ns, expect_peer_line, grant, listed, mesh_config, peer_list, tunnel_lab},
    ztxdp,
};
use serde_json::{Value, json};
use zt_tests::lab::{
    APP_1_TUNNEL_V4, APP_1_TUNNEL_V6, APP_2_TUNNEL_V4, EDGE_TUNNEL_V4, EDGE_TUNNEL_V6,
};

const POSTGRES: u16 = 5432;

/// The mesh with both app peers in the group `db-clients`; `app-1`'s own
/// `allow` line is `app1_allow`, the group's is `group_allow`.
fn grouped_mesh(tag: &str, app1_allow: &str, group_allow: &str) -> Enforced {
    Enforced::start(tag, tunnel_lab(), |lab, scratch| {
        mesh_config(
            lab,
            scratch,
            &[("app-1", app1_allow), ("app-2", "")],
            &format!(
                "\n[[tunnel.group]]\nname = \"db-clients\"\npeers = [\"app-1\", \"app-2\"]\n\
                 {group_allow}\n"
            ),
        )
    })
}

/// The `sources` of `peer` in `list --json`.
fn sources(list: &Value, peer: &str) -> Value {
    listed(list, peer)["sources"].clone()
}

#[test]
fn a_runtime_group_grant_reaches_every_member_and_a_revoke_cuts_every_member() {
    let mesh = grouped_mesh("group-grant", "", "");
    let (app1, app2) = (app_ns(&mesh, "app-1"), app_ns(&mesh, "app-2"));
    let _postgres = listen(mesh.edge(), POSTGRES);
    assert_all_time_out(&[
        (
            app1,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-1 before the group grant",
        ),
        (
            app2,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-2 before the group grant",
        ),
    ]);

    let said = grant(&mesh, "allow", "@db-clients", "5432");
    assert!(
        said.contains("allowed tcp/5432 for @db-clients (in effect now for its 2 members)"),
        "`allow @db-clients` must say the kernel holds it for both members: {said}"
    );
    for (ns, to, what) in [
        (
            app1,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-1 after the group grant",
        ),
        (
            app1,
            at(EDGE_TUNNEL_V6, POSTGRES),
            "app-1 over IPv6 after it",
        ),
        (
            app2,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-2 after the group grant",
        ),
    ] {
        assert_connects(ns, to, what);
    }
    // The decisions name the peer, and the group whose grant passed them.
    for (peer, source) in [
        ("app-1", IpAddr::V4(APP_1_TUNNEL_V4)),
        ("app-1", IpAddr::V6(APP_1_TUNNEL_V6)),
        ("app-2", IpAddr::V4(APP_2_TUNNEL_V4)),
    ] {
        let line = expect_peer_line(&mesh, peer, "granted", source, POSTGRES);
        assert_eq!(
            line.pointer("/ztxdp/peer/groups"),
            Some(&json!(["db-clients"])),
            "ztxdp.peer.groups of {peer}'s granted connection: {line}"
        );
    }
    let list = peer_list(&mesh);
    for peer in ["app-1", "app-2"] {
        let entry = listed(&list, peer);
        assert_eq!(entry["grants"], json!(["tcp/5432"]), "{list:#}");
        assert_eq!(entry["kernel"], json!(["tcp/5432"]), "{list:#}");
        assert_eq!(entry["groups"], json!(["db-clients"]), "{list:#}");
        assert_eq!(
            entry["sources"],
            json!([{"from": "runtime", "group": "db-clients", "grants": ["tcp/5432"]}]),
            "{peer} has tcp/5432 from the group's runtime grant: {list:#}"
        );
    }

    let said = grant(&mesh, "revoke", "@db-clients", "5432");
    assert!(
        said.contains("revoked tcp/5432 for @db-clients (in effect now for its 2 members)")
            && !said.contains("note:"),
        "`revoke @db-clients` must cut both members: {said}"
    );
    assert_all_time_out(&[
        (
            app1,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-1 after the group revoke",
        ),
        (
            app1,
            at(EDGE_TUNNEL_V6, POSTGRES),
            "app-1 over IPv6 after it",
        ),
        (
            app2,
            at(EDGE_TUNNEL_V4, POSTGRES),
            "app-2 after the group revoke",
        ),
    ]);
    for (peer, source) in [
        ("app-1", IpAddr::V4(APP_1_TUNNEL_V4)),
        ("app-2", IpAddr::V4(APP_2_TUNNEL_V4)),
    ] {
        let line = expect_peer_line(&mesh, peer, "not_granted", source, POSTGRES);
        assert!(
            line.pointer("/ztxdp/peer/groups").is_none(),
            "a refusal names no group: {line}"
        );
    }
    let list = peer_list(&mesh);
    for peer in ["app-1", "app-2"] {
        assert_eq!(listed(&list, peer)["kernel"], json!([]), "{list:#}");
    }
}

/// Effective grants are a union: a member that has the port from its own
/// grant keeps it when the group's grant goes, and `list` says why.
#[test]
fn a_group_revoke_leaves_a_members_own_grant() {
    let mesh = grouped_mesh(
        "group-union",
        "allow = [\"tcp/5432\"]",
        "allow = [\"tcp/5432\"]",
    );
    let (app1, app2) = (app_ns(&mesh, "app-1"), app_ns(&mesh, "app-2"));
    let _postgres = listen(mesh.edge(), POSTGRES);
    assert_connects(
        app2,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 by the group's config grant",
    );

    let said = grant(&mesh, "revoke", "@db-clients", "5432");
    assert!(
        said.contains("note: app-1 keeps tcp/5432: its own grant in the config"),
        "`revoke @db-clients` must say app-1 keeps its own grant: {said}"
    );
    assert_connects(app1, at(EDGE_TUNNEL_V4, POSTGRES), "app-1 by its own grant");
    assert_all_time_out(&[(
        app2,
        at(EDGE_TUNNEL_V4, POSTGRES),
        "app-2 after the group revoke",
    )]);
    let list = peer_list(&mesh);
    assert_eq!(
        sources(&list, "app-1"),
        json!([{"from": "peer", "grants": ["tcp/5432"]}]),
        "{list:#}"
    );
    assert_eq!(sources(&list, "app-2"), json!([]), "{list:#}");

    // An unknown group is refused as bad input, and changes nothing.
    let config = mesh.config.display().to_string();
    let out = ztxdp(
        mesh.edge(),
        &["allow", "@db-client", "5432", "--config", &config],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no group named \"db-client\"") && stderr.contains("@db-clients"),
        "the refusal names the group and the known ones: {stderr}"
    );
    assert_eq!(peer_list(&mesh), list, "a refused change changed something");
}
