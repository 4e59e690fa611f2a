//! Tier 3, a user without root: the real `ztxdp` binary run as `nobody`
//! with no capabilities (`setpriv`), in a namespace where a root daemon
//! enforces and serves events. Every command that needs privileges must
//! say so once, naming root and the capabilities, and exit with the
//! "not permitted" status, changing nothing. Needs root (to set it up).

mod e2e;

use std::{os::unix::fs::PermissionsExt as _, process::Output};

use e2e::{Daemon, Scratch, attached, run_bounded, ztxdp_bin, ztxdp_ok};
use zt_tests::netns::{NetNs, veth_pair};

/// The exit status README.md documents for "not permitted".
const NOT_PERMITTED: i32 = 77;
/// `nobody` on Debian.
const NOBODY: &str = "65534";

/// `ztxdp ARGS...` in `ns` as `nobody`, with no capabilities at all.
fn as_nobody(ns: &NetNs, args: &[&str]) -> Output {
    let mut command = ns.cmd("setpriv");
    command
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(ztxdp_bin())
        .args(args)
        .env_remove("SSH_CONNECTION")
        .env_remove("ZTXDP_CONFIG");
    run_bounded(&mut command)
}

/// The refusal of `ztxdp ARGS...` must be the one documented: status 77,
/// a message saying once that root (or the capabilities) is needed and
/// naming `names` (what was refused), no cause printed twice, and none of
/// the hints that sent users looking elsewhere.
fn expect_refused(out: &Output, args: &[&str], names: &str) {
    let shown = args.join(" ");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(NOT_PERMITTED),
        "`ztxdp {shown}` as nobody: expected exit status {NOT_PERMITTED}; stderr:\n{stderr}"
    );
    assert_eq!(
        stderr.matches("needs root").count(),
        1,
        "`ztxdp {shown}`: must say once that it needs root:\n{stderr}"
    );
    for word in ["CAP_BPF", "CAP_NET_ADMIN", names] {
        assert!(
            stderr.contains(word),
            "`ztxdp {shown}`: the message does not name {word}:\n{stderr}"
        );
    }
    for misleading in ["5.15", "is `ztxdp up` running"] {
        assert!(
            !stderr.contains(misleading),
            "`ztxdp {shown}`: a hint at something else ({misleading:?}):\n{stderr}"
        );
    }
    for line in stderr.lines() {
        let parts: Vec<&str> = line.split(": ").collect();
        assert!(
            parts.windows(2).all(|w| w[0] != w[1]),
            "`ztxdp {shown}`: a cause printed twice in {line:?}"
        );
    }
}

#[test]
fn every_privileged_command_tells_a_user_without_root_what_it_needs() {
    let ns = NetNs::new("nonroot").unwrap_or_else(|e| panic!("namespace (root?): {e}"));
    for (a, b) in [("ea", "eb"), ("ta", "tb")] {
        veth_pair(&ns, a, &ns, b).unwrap_or_else(|e| panic!("veth {a}: {e}"));
    }
    let scratch = Scratch::new("nonroot");
    // Readable by nobody, as a config in /etc is; the files the daemon
    // makes (audit trail, grants lock) are root's, as on a server.
    let config = scratch.write(
        "ztxdp.toml",
        &format!(
            "[edge]\ninterface = \"ea\"\nwireguard_ports = [51820]\nssh_allow = []\n\n\
             [tunnel]\ninterface = \"ta\"\nruntime_grants = \"{}\"\n\n\
             [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\"]\n\
             allow = [\"tcp/5432\"]\n\n[audit]\npath = \"{}\"\n",
            scratch.path("grants.json").display(),
            scratch.path("audit.jsonl").display()
        ),
    );
    let chmod = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    };
    if let Some(dir) = config.parent() {
        chmod(dir, 0o755);
    }
    chmod(&config, 0o644);
    // An edge-only config whose audit directory nobody may write: its
    // `up` gets as far as the bpf syscall.
    let own = scratch.path("nobody");
    std::fs::create_dir(&own).unwrap_or_else(|e| panic!("{}: {e}", own.display()));
    chmod(&own, 0o777);
    let edge_only = scratch.write(
        "edge.toml",
        &format!(
            "[edge]\ninterface = \"ea\"\nwireguard_ports = [51820]\nssh_allow = []\n\n\
             [audit]\npath = \"{}\"\n",
            own.join("audit.jsonl").display()
        ),
    );
    chmod(&edge_only, 0o644);
    let mut daemon = Daemon::start(&ns, &config, &[], scratch.path("up.log"));
    let config = config.display().to_string();
    let edge_only = edge_only.display().to_string();
    let audit = scratch.path("audit.jsonl").display().to_string();

    let bpf = "bpf_prog_get_next_id";
    let cases: [(&[&str], &str); 16] = [
        (&["status"], bpf),
        (&["status", "--json"], bpf),
        (&["explain", "tcp", "192.0.2.9:40000", "192.0.2.1:22"], bpf),
        (&["down"], bpf),
        (&["allow", "app-1", "5433"], bpf),
        (&["revoke", "app-1", "5432", "--config", &config], bpf),
        (&["list"], bpf),
        (&["list", "--json", "--config", &config], bpf),
        (&["reload"], "/run/ztxdp/control-"),
        (&["events", "--follow"], "/run/ztxdp/events-"),
        (&["events"], bpf),
        (&["export", "nft"], bpf),
        (&["up", "--config", &config], "grants.json.lock"),
        (&["up", "--config", &edge_only], "the kernel refused"),
        (&["events", "--config", &config], &audit),
        (&["audit", "verify", &audit], &audit),
    ];
    for (args, names) in cases {
        expect_refused(&as_nobody(&ns, args), args, names);
    }

    // Nothing was changed: the daemon runs, its programs are attached, and
    // the grants are the config's.
    daemon.expect_running("the refused commands");
    assert!(
        !attached(&ns, "ea").is_empty() && !attached(&ns, "ta").is_empty(),
        "a refused `down` removed programs"
    );
    let listed = ztxdp_ok(&ns, &["list"]);
    assert!(
        listed.contains("tcp/5432") && !listed.contains("5433"),
        "a refused grant change changed the grants:\n{listed}"
    );
}
