//! The lab's tunnel with `ztxdp up` on the edge (see `e2e_tunnel.rs`):
//! its config, its peers, and the commands and audit lines about them.

use std::net::IpAddr;

use serde_json::Value;
use zt_tests::{
    lab::{AppPeer, HOST_INTERFACE, Lab, Tunnel},
    netns::NetNs,
    wg::LISTEN_PORT,
};

use super::{Enforced, Scratch, expect_audit, is, ztxdp_ok};

/// The lab with its `WireGuard` tunnel and `ztxdp up` on the edge, with a
/// config granting app-1 tcp/5432 and app-2 nothing. No handshake has
/// happened yet: the first packet into the tunnel starts one, so it
/// crosses the edge's filter.
pub fn mesh(tag: &str) -> Enforced {
    Enforced::start(tag, tunnel_lab(), |lab, scratch| {
        mesh_config(
            lab,
            scratch,
            &[("app-1", "allow = [\"tcp/5432\"]"), ("app-2", "")],
            "",
        )
    })
}

/// The mesh's config with `peers` (name, `allow` line) in this order, and
/// `extra` (whole tables) at the end.
pub fn mesh_config(lab: &Lab, scratch: &Scratch, peers: &[(&str, &str)], extra: &str) -> String {
    let tunnel = tunnel(lab);
    let peers = peers
        .iter()
        .map(|&(name, allow)| {
            let app = app(tunnel, name);
            format!(
                "[[tunnel.peer]]\n\
                 name = \"{name}\"\n\
                 addresses = [\"{}/32\", \"{}/128\"]\n\
                 public_key = \"{}\"\n\
                 {allow}\n\n",
                app.tunnel_v4(),
                app.tunnel_v6(),
                app.device().public_key(),
            )
        })
        .collect::<Vec<_>>()
        .concat();
    format!(
        "[edge]\n\
         interface = \"{HOST_INTERFACE}\"\n\
         wireguard_ports = [{LISTEN_PORT}]\n\
         ssh_allow = []\n\
         \n\
         [tunnel]\n\
         interface = \"{}\"\n\
         runtime_grants = \"{}\"\n\
         \n\
         {peers}\
         [audit]\n\
         path = \"{}\"\n\
         state = \"{}\"\n\
         {extra}",
        tunnel.edge_device().name(),
        scratch.path("grants.json").display(),
        scratch.path("audit.jsonl").display(),
        scratch.path("audit.state").display(),
    )
}

/// Rewrites the running mesh's config file with [`mesh_config`].
pub fn rewrite_config(mesh: &Enforced, peers: &[(&str, &str)], extra: &str) {
    mesh.scratch.write(
        "ztxdp.toml",
        &mesh_config(&mesh.lab, &mesh.scratch, peers, extra),
    );
}

pub fn tunnel(lab: &Lab) -> &Tunnel {
    lab.tunnel()
        .unwrap_or_else(|| panic!("the lab was built without its tunnel"))
}

pub fn app<'a>(tunnel: &'a Tunnel, name: &str) -> &'a AppPeer {
    tunnel
        .app(name)
        .unwrap_or_else(|| panic!("the lab's tunnel has no {name}"))
}

/// The namespace of the app peer `name`.
pub fn app_ns<'a>(mesh: &'a Enforced, name: &str) -> &'a NetNs {
    app(tunnel(&mesh.lab), name).ns()
}

/// `ztxdp ACTION PEER GRANT --config F` in the edge, which must succeed.
pub fn grant(mesh: &Enforced, action: &str, peer: &str, grant: &str) -> String {
    let config = mesh.config.display().to_string();
    ztxdp_ok(mesh.edge(), &[action, peer, grant, "--config", &config])
}

pub fn peer_list(mesh: &Enforced) -> Value {
    let config = mesh.config.display().to_string();
    let text = ztxdp_ok(mesh.edge(), &["list", "--json", "--config", &config]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("list --json is not JSON ({e}):\n{text}"))
}

/// The entry of `peer` in `list --json`.
pub fn listed<'a>(list: &'a Value, peer: &str) -> &'a Value {
    list.as_array()
        .and_then(|peers| peers.iter().find(|p| p["name"] == peer))
        .unwrap_or_else(|| panic!("{peer} missing from list --json:\n{list:#}"))
}

/// Waits for a tunnel audit line of `peer` with this reason and port, and
/// checks it names the peer and its public key; returns it.
pub fn expect_peer_line(
    mesh: &Enforced,
    peer: &str,
    reason: &str,
    source: IpAddr,
    port: u16,
) -> Value {
    let key = app(tunnel(&mesh.lab), peer).device().public_key();
    let what = format!("{reason} for {peer} ({source}) to {port}");
    let line = expect_audit(&mesh.audit(), &what, |l| {
        is(l, "/event/reason", &reason.into())
            && is(l, "/source/ip", &source.to_string().into())
            && is(l, "/destination/port", &port.into())
    });
    assert!(is(&line, "/ztxdp/program", &"tunnel".into()), "{line}");
    assert!(
        is(&line, "/ztxdp/peer/name", &peer.into()),
        "ztxdp.peer.name must be {peer}: {line}"
    );
    assert!(
        is(&line, "/ztxdp/peer/public_key", &key.into()),
        "ztxdp.peer.public_key: {line}"
    );
    line
}

/// The lab with its WireGuard tunnel between the app peers and the edge.
pub fn tunnel_lab() -> Lab {
    Lab::create_with_tunnel()
        .unwrap_or_else(|e| panic!("building the lab with its tunnel (root? wireguard-go?): {e:?}"))
}
