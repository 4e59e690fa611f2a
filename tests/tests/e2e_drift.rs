//! Tier 3, drift: the real `ztxdp up` on the lab's edge, its maps changed
//! and its programs replaced behind its back (`bpftool`, and programs
//! loaded and attached by this test), and what `ztxdp check --live` and
//! the daemon's periodic check report. Needs root and bpftool. The lab,
//! the daemon and the programs this test attaches go on drop; every wait
//! is bounded.

mod e2e;

use std::{
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, Xdp, XdpMode},
};
use e2e::{
    Enforced, SETTLE_TIMEOUT, Scratch, audit_lines, build_lab, expect_audit, run_bounded, status,
    verify_audit, ztxdp, ztxdp_ok,
};
use serde_json::{Value, json};
use zt_common::map;
use zt_tests::lab::{HOST_INTERFACE, Lab};

/// The tunnel device: a veth in the edge's namespace (the tunnel program
/// works on any Ethernet or L3 device), so no `WireGuard` is needed.
const TUNNEL: &str = "zt-tun";
/// Where the daemon serves `/metrics`, in the edge's namespace.
const METRICS: &str = "127.0.0.1:9542";

/// The lab's edge with a tunnel device and `ztxdp up` checking for drift
/// every `interval` seconds.
fn drift_lab(tag: &str, interval: u32) -> Enforced {
    let lab = build_lab();
    lab.edge()
        .ip(&[
            "link", "add", TUNNEL, "type", "veth", "peer", "name", "zt-tun-b",
        ])
        .unwrap_or_else(|e| panic!("adding {TUNNEL}: {e}"));
    for link in [TUNNEL, "zt-tun-b"] {
        lab.edge()
            .link_up(link)
            .unwrap_or_else(|e| panic!("{link} up: {e}"));
    }
    Enforced::start(tag, lab, |_: &Lab, scratch: &Scratch| {
        format!(
            "drift_check_interval = {interval}\n\n\
             [edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
             ssh_allow = [\"10.77.0.2/32\"]\n\n\
             [tunnel]\ninterface = \"{TUNNEL}\"\nruntime_grants = \"{}\"\n\n\
             [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\"]\n\
             allow = [\"tcp/5432\", \"icmp\"]\n\n\
             [[tunnel.peer]]\nname = \"app-2\"\naddresses = [\"10.100.0.2/32\"]\n\n\
             [audit]\npath = \"{}\"\nstate = \"{}\"\n\n\
             [metrics]\nlisten = \"{METRICS}\"\n",
            scratch.path("grants.json").display(),
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display(),
        )
    })
}

/// `ztxdp check --live ARGS` on the edge: its exit code and the
/// differences it lists (the indented lines), or "in sync".
fn check_live(t: &Enforced, args: &[&str]) -> (Option<i32>, Vec<String>, Output) {
    let config = t.config.display().to_string();
    let mut command = vec!["check", "--live", "--config", &config];
    command.extend(args);
    let out = ztxdp(t.edge(), &command);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = text
        .lines()
        .filter_map(|l| {
            if l == "in sync" {
                Some(l.to_owned())
            } else {
                l.strip_prefix("  ").map(str::to_owned)
            }
        })
        .collect();
    (out.status.code(), lines, out)
}

/// [`check_live`], which must exit `code` listing exactly `want` (in any
/// order).
fn expect_check(t: &Enforced, code: i32, want: &[&str]) {
    let (got, mut lines, out) = check_live(t, &[]);
    lines.sort();
    let mut want = want.to_vec();
    want.sort_unstable();
    assert_eq!(
        (got, lines.iter().map(String::as_str).collect::<Vec<_>>()),
        (Some(code), want),
        "`ztxdp check --live`:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `bpftool -j ARGS`, which must succeed; its JSON.
fn bpftool(args: &[&str]) -> Value {
    let out = run_bounded(Command::new("bpftool").arg("-j").args(args));
    assert!(
        out.status.success(),
        "bpftool {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bpftool {} is not JSON: {e}", args.join(" ")))
}

/// The kernel id of map `name` of the running `program` (`edge` or
/// `tunnel` in `status --json`).
fn map_id(t: &Enforced, program: &str, name: &str) -> String {
    let s = status(t.edge());
    let prog = s[program]["program_id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {program} program: {s:#}"))
        .to_string();
    let info = bpftool(&["prog", "show", "id", &prog]);
    info["map_ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .map(|id| id.to_string())
        .find(|id| bpftool(&["map", "show", "id", id])["name"] == name)
        .unwrap_or_else(|| panic!("program {prog} has no map {name}: {info}"))
}

/// `bpftool map ACTION id ID ARGS...`, behind ztxdp's back.
fn bpftool_map(action: &str, id: &str, args: &[&str]) {
    let mut command = vec!["map", action, "id", id];
    command.extend(args);
    let out = run_bounded(Command::new("bpftool").args(&command));
    assert!(
        out.status.success(),
        "bpftool {}: {}",
        command.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The daemon's `/metrics` line of `series`.
fn metric(t: &Enforced, series: &str) -> Option<String> {
    let url = format!("http://{METRICS}/metrics");
    let text = t
        .edge()
        .run(&["curl", "-sf", "--max-time", "5", &url])
        .ok()?;
    text.lines()
        .find(|l| l.split(' ').next() == Some(series))
        .map(str::to_owned)
}

/// Waits until `/metrics` shows `line`.
fn expect_metric(t: &Enforced, line: &str) {
    let series = line.split(' ').next().unwrap_or_default();
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut seen = metric(t, series);
    while seen.as_deref() != Some(line) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        seen = metric(t, series);
    }
    assert_eq!(seen.as_deref(), Some(line), "{}", t.daemon.log());
}

/// `ztxdp_drift_checks_total`, 0 before the daemon serves it.
fn drift_checks(t: &Enforced) -> u64 {
    metric(t, "ztxdp_drift_checks_total")
        .and_then(|l| l.split(' ').nth(1).and_then(|n| n.parse::<u64>().ok()))
        .unwrap_or(0)
}

/// The `drift` records of the trail, as `ztxdp.drift` objects.
fn drift_records(t: &Enforced) -> Vec<Value> {
    audit_lines(&t.audit())
        .into_iter()
        .filter(|l| l["event"]["action"] == "drift")
        .map(|l| l["ztxdp"]["drift"].clone())
        .collect()
}

/// The bastion's block cleared behind ztxdp's back: `check --live`, the
/// daemon and `explain` see it, and a reload writes it back.
fn a_cleared_lookup_is_reported_and_written_back(t: &Enforced) {
    // The bastion's block (10.77.0.0/16, index 10 * 256 + 77, a
    // little-endian u32) cleared: its /32 is still in its map, and the
    // program no longer looks there.
    let blocks = map_id(t, "edge", map::SOURCES_V4_16);
    let mut update = vec!["key", "77", "10", "0", "0", "value"];
    update.extend(["0"; 16]);
    bpftool_map("update", &blocks, &update);
    expect_check(
        t,
        1,
        &["edge source lookup: /32 map under 10.77.0.0/16 missing"],
    );
    // And explain, which reads the maps as the program does, drops it.
    let ssh = [
        "explain",
        "--json",
        "tcp",
        "10.77.0.2:40000",
        "10.77.0.1:22",
    ];
    let reason = |t: &Enforced| {
        let report: Value = serde_json::from_str(&ztxdp_ok(t.edge(), &ssh))
            .unwrap_or_else(|e| panic!("explain --json is not JSON ({e})"));
        report["reason"].clone()
    };
    assert_eq!(reason(t), "ssh_source_not_allowed");
    expect_audit(&t.audit(), "a drift record naming the lookup", |l| {
        l["ztxdp"]["drift"]["summary"]
            == json!(["edge source lookup: /32 map under 10.77.0.0/16 missing"])
    });
    ztxdp_ok(t.edge(), &["reload"]);
    expect_check(t, 0, &["in sync"]);
    assert_eq!(reason(t), "ssh_allowed");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while drift_records(t).last().map(|r| r["differences"].clone()) != Some(json!(0)) {
        assert!(
            Instant::now() < deadline,
            "no drift record saying in sync after the reload"
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_map_changed_behind_ztxdps_back_is_reported_entry_by_entry() {
    let mut t = drift_lab("drift-maps", 1);
    expect_check(&t, 0, &["in sync"]);
    // The daemon's first check must see the maps in sync, or the change
    // below would be its first answer and the count below one short.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while drift_checks(&t) == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
    }

    // An SSH source nobody configured: 203.0.113.0/24 (the /24 map's key
    // is the /24's address; the value the services it admits, the ssh
    // service's bit 0, as a little-endian u64).
    let ssh = map_id(&t, "edge", map::SOURCES_V4_24);
    bpftool_map(
        "update",
        &ssh,
        &[
            "key", "203", "0", "113", "0", "value", "1", "0", "0", "0", "0", "0", "0", "0",
        ],
    );
    expect_check(&t, 1, &["ssh_allow: 203.0.113.0/24 extra"]);

    // app-1's grant word of tcp/5432 (peer 0, protocol 6, word 5432 / 64
    // = 84) deleted: exactly that grant is gone.
    let grants = map_id(&t, "tunnel", map::GRANTS);
    bpftool_map(
        "delete",
        &grants,
        &["key", "0", "0", "0", "0", "6", "0", "84", "0"],
    );
    let both = [
        "ssh_allow: 203.0.113.0/24 extra",
        "peer app-1: tcp/5432 missing",
    ];
    expect_check(&t, 1, &both);
    let (code, _, out) = check_live(&t, &["--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check --live --json is not JSON ({e})"));
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["in_sync"], false, "{report:#}");
    let grant = report["differences"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["area"] == "grant")
        .unwrap_or_else(|| panic!("no grant difference: {report:#}"));
    assert_eq!(
        (&grant["change"], &grant["peer"], &grant["item"]),
        (&json!("missing"), &json!("app-1"), &json!("tcp/5432")),
        "{report:#}"
    );

    // The daemon saw it too: a drift record naming both, and the metric.
    expect_audit(&t.audit(), "a drift record naming both changes", |l| {
        l["ztxdp"]["drift"]["summary"] == json!(both)
    });
    expect_metric(&t, "ztxdp_drift 1");

    // A reload rewrites the maps; the daemon records that they match again.
    ztxdp_ok(t.edge(), &["reload"]);
    expect_check(&t, 0, &["in sync"]);
    expect_audit(&t.audit(), "a drift record saying in sync", |l| {
        l["ztxdp"]["drift"]["differences"] == 0
    });
    expect_metric(&t, "ztxdp_drift 0");

    a_cleared_lookup_is_reported_and_written_back(&t);
    t.daemon.expect_running("the drift checks");

    // A record only when the answer changed: none while in sync at the
    // start, never the same twice in a row, in sync last.
    let records = drift_records(&t);
    assert!(
        records.first().is_some_and(|r| r["differences"] != 0),
        "{records:#?}"
    );
    assert!(
        records.windows(2).all(|w| w[0] != w[1]),
        "a drift record repeats the one before it: {records:#?}"
    );
    assert_eq!(
        records.last().map(|r| r["differences"].clone()),
        Some(json!(0))
    );
    let checks = drift_checks(&t);
    assert!(
        usize::try_from(checks).is_ok_and(|n| n > records.len()),
        "{checks} checks, {} records",
        records.len()
    );
    verify_audit(&t);
}

/// Loads `object` in the edge's namespace and attaches its program `name`
/// to `interface` on `hook`: XDP in generic mode, or TCX ingress. The
/// attachment lasts as long as the returned object.
fn attach_foreign(t: &Enforced, object: &'static [u8], name: &str, interface: &str) -> Ebpf {
    let name = name.to_owned();
    let interface = interface.to_owned();
    t.edge()
        .enter(move || {
            let mut ebpf = Ebpf::load(object).unwrap_or_else(|e| panic!("loading: {e}"));
            let program = ebpf
                .program_mut(&name)
                .unwrap_or_else(|| panic!("no program {name}"));
            if let Ok(xdp) = <&mut Xdp>::try_from(&mut *program) {
                xdp.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
                xdp.attach(&interface, XdpMode::Skb)
                    .unwrap_or_else(|e| panic!("attaching {name} to {interface}: {e}"));
            } else {
                let tc: &mut SchedClassifier = program
                    .try_into()
                    .unwrap_or_else(|e| panic!("{name} is neither XDP nor tc: {e}"));
                tc.load().unwrap_or_else(|e| panic!("loading {name}: {e}"));
                tc.attach(&interface, TcAttachType::Ingress)
                    .unwrap_or_else(|e| panic!("attaching {name} to {interface}: {e}"));
            }
            ebpf
        })
        .unwrap_or_else(|e| panic!("entering the edge: {e}"))
}

/// The kernel id of the program `name` the object `ebpf` loaded.
fn program_id(ebpf: &Ebpf, name: &str) -> u32 {
    ebpf.program(name)
        .and_then(|p| p.info().ok())
        .map_or_else(|| panic!("{name} is not loaded"), |i| i.id())
}

#[test]
fn foreign_programs_and_a_replaced_one_are_reported() {
    let mut t = drift_lab("drift-programs", 0);
    expect_check(&t, 0, &["in sync"]);

    // Another tool's XDP program on the tunnel device, before ztxdp's tc
    // filter.
    let foreign = attach_foreign(&t, ztxdp::BENCH_OBJECT, "zt_bench_drop", TUNNEL);
    let bench = program_id(&foreign, "zt_bench_drop");
    let foreign_line = format!("foreign program on {TUNNEL} xdp: zt_bench_drop (id {bench})");
    expect_check(&t, 1, &[&foreign_line]);

    // A second copy of ztxdp's tunnel program on the TCX hook, where it
    // runs before the clsact filter.
    let copy = attach_foreign(&t, ztxdp::BPF_OBJECT, "zt_tunnel", TUNNEL);
    let copy_line = format!(
        "program zt_tunnel (id {}): extra on {TUNNEL} tcx-ingress",
        program_id(&copy, "zt_tunnel")
    );
    let mut want = vec![copy_line, foreign_line];
    expect_check(&t, 1, &want.iter().map(String::as_str).collect::<Vec<_>>());

    // ztxdp's edge program replaced by another one: the daemon notices
    // and exits, and the check says what took its place.
    t.edge()
        .ip(&["link", "set", "dev", HOST_INTERFACE, "xdp", "off"])
        .unwrap_or_else(|e| panic!("removing the edge's XDP program: {e}"));
    t.daemon.expect_replaced();
    let other = attach_foreign(&t, ztxdp::BENCH_OBJECT, "zt_bench_drop", HOST_INTERFACE);
    want.push(format!(
        "program zt_edge: replaced on {HOST_INTERFACE} xdp by zt_bench_drop (id {})",
        program_id(&other, "zt_bench_drop")
    ));
    expect_check(&t, 1, &want.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        drift_records(&t).is_empty(),
        "drift_check_interval = 0 checks nothing"
    );
    drop((foreign, copy, other));
}
