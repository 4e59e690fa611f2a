//! Tier 3, `ztxdp explain` and the `events` filters (issue 15): the real
//! binary in the lab's edge, with `ztxdp up` running. What explain says of
//! a packet is what the packet then gets: the status counter of the reason
//! it named moves by one when the packet is sent for real. The `events`
//! followers print only the records their filters keep. Needs root.

mod e2e;

use std::{
    net::SocketAddr,
    process::Child,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use e2e::{
    Enforced, SETTLE_TIMEOUT, at, audit_lines, build_lab, counter, events_follower, expect_counter,
    flood, mac, send_frames, status, udp_socket, ztxdp, ztxdp_ok,
};
use serde_json::Value;
use zt_tests::{
    lab::{BASTION_V4, EDGE_V4, HOST_INTERFACE, OUTSIDER_V4},
    netns::NetNs,
};
use ztxdp::explain::packet::Request;

/// The lab with `ztxdp up` on the edge. Line 3 lists the `WireGuard` port,
/// line 4 the SSH sources: the bastion, and two halves of 192.0.2.0/24,
/// which the maps hold as one set of addresses.
fn start(tag: &str) -> Enforced {
    Enforced::start(tag, build_lab(), |_, scratch| {
        format!(
            "[edge]\n\
             interface = \"{HOST_INTERFACE}\"\n\
             wireguard_ports = [51820]\n\
             ssh_allow = [\"{BASTION_V4}/32\", \"192.0.2.0/25\", \"192.0.2.128/25\"]\n\
             \n\
             [audit]\n\
             path = \"{}\"\n\
             state = \"{}\"\n",
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display()
        )
    })
}

/// `ztxdp explain --json ARGS...` in the edge.
fn explain(t: &Enforced, args: &[&str]) -> Value {
    let mut all = vec!["explain", "--json"];
    all.extend(args);
    let text = ztxdp_ok(t.edge(), &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("explain --json ({e}):\n{text}"))
}

/// The step `name` of a report's `why`.
fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["why"]
        .as_array()
        .and_then(|why| why.iter().find(|w| w["step"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {report:#}"))
}

/// The frame of `ztxdp explain ARGS...`'s packet, sent from `from`'s link
/// to the edge's: the packet explained is the packet sent.
fn frame(t: &Enforced, from: &NetNs, args: &[&str]) -> Vec<u8> {
    let request = Request::new(args[0], args[1], args[2], None, None)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let mut f = request.packet(true);
    f[..6].copy_from_slice(&mac(t.edge(), HOST_INTERFACE));
    f[6..12].copy_from_slice(&mac(from, HOST_INTERFACE));
    f
}

/// Explains `args`, expecting `reason`, then sends the packet from `from`:
/// the edge counter of `reason` must move by exactly one.
fn explain_then_send(t: &Enforced, from: &NetNs, args: &[&str], reason: &str) -> Value {
    let report = explain(t, args);
    assert_eq!(report["reason"], reason, "{args:?}: {report:#}");
    assert_eq!(report["program"], "edge", "{report:#}");
    assert_eq!(report["interface"], HOST_INTERFACE, "{report:#}");
    let before = counter(&status(t.edge()), "edge", reason);
    send_frames(from, HOST_INTERFACE, &[frame(t, from, args)]);
    expect_counter(t.edge(), "edge", reason, before, 1);
    report
}

/// A step's rule must be `key` at `line` of the running config.
fn expect_rule(t: &Enforced, w: &Value, key: &str, line: Option<u64>) {
    let rule = &w["rule"];
    assert_eq!(rule["key"], key, "{w:#}");
    assert_eq!(rule["line"].as_u64(), line, "{w:#}");
    assert_eq!(
        rule["file"],
        t.config.display().to_string(),
        "the rule's file is the running config: {w:#}"
    );
}

#[test]
fn explain_says_what_a_real_packet_then_gets_and_why() {
    let t = start("explain");
    let (outsider, bastion) = (t.lab.outsider(), t.lab.bastion());
    let (out, bas, edge) = (
        OUTSIDER_V4.to_string(),
        BASTION_V4.to_string(),
        EDGE_V4.to_string(),
    );

    let ssh = |from: &str| [format!("{from}:40000"), format!("{edge}:22")];
    let [src, dst] = ssh(&out);
    let r = explain_then_send(&t, outsider, &["tcp", &src, &dst], "ssh_source_not_allowed");
    assert_eq!(r["verdict"], "drop", "{r:#}");
    let w = step(&r, "ssh_allow");
    assert_eq!(w["matched"], false, "{w:#}");
    expect_rule(&t, w, "edge.ssh_allow", Some(4));
    assert_eq!(step(&r, "syn")["matched"], false, "{r:#}");

    let [src, dst] = ssh(&bas);
    let r = explain_then_send(&t, bastion, &["tcp", &src, &dst], "ssh_allowed");
    assert_eq!(r["verdict"], "pass", "{r:#}");
    let w = step(&r, "ssh_allow");
    assert_eq!(w["matched"], true, "{w:#}");
    assert_eq!(w["prefix"], format!("{bas}/32"), "{w:#}");
    expect_rule(&t, w, "edge.ssh_allow[0]", Some(4));

    // The prefix named is the config's, though the kernel's entries no
    // longer say which of two adjacent prefixes listed an address.
    let r = explain(&t, &["tcp", "192.0.2.200:40000", &format!("{edge}:22")]);
    assert_eq!(r["reason"], "ssh_allowed", "{r:#}");
    let w = step(&r, "ssh_allow");
    assert_eq!(w["prefix"], "192.0.2.128/25", "{w:#}");
    expect_rule(&t, w, "edge.ssh_allow[2]", Some(4));

    let (src, wg) = (format!("{out}:40002"), format!("{edge}:51820"));
    let r = explain_then_send(&t, outsider, &["udp", &src, &wg], "wireguard");
    expect_rule(
        &t,
        step(&r, "wireguard_port"),
        "edge.wireguard_ports[0]",
        Some(3),
    );

    // A reply: refused until the edge sends the datagram it answers, then
    // admitted by that flow, which explain names.
    let (remote, local) = (format!("{out}:5353"), format!("{edge}:40123"));
    let reply = ["udp", remote.as_str(), local.as_str()];
    let r = explain_then_send(&t, outsider, &reply, "port_not_allowed");
    expect_rule(
        &t,
        step(&r, "wireguard_port"),
        "edge.wireguard_ports",
        Some(3),
    );
    assert_eq!(step(&r, "flow")["matched"], false, "{r:#}");
    let socket = udp_socket(t.edge(), at(EDGE_V4, 40_123));
    socket
        .send_to(b"question", SocketAddr::from((OUTSIDER_V4, 5353)))
        .unwrap_or_else(|e| panic!("sending from the edge: {e}"));
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while explain(&t, &reply)["reason"] != "reply" {
        assert!(
            Instant::now() < deadline,
            "the edge's datagram opened no flow: {:#}",
            explain(&t, &reply)
        );
        thread::sleep(Duration::from_millis(100));
    }
    let r = explain_then_send(&t, outsider, &reply, "reply");
    let w = step(&r, "flow");
    assert_eq!(w["matched"], true, "{w:#}");
    assert_eq!(w["flow"]["local"], local, "{w:#}");
    assert_eq!(w["flow"]["remote"], remote, "{w:#}");
    // The timeout is the default: the key has no line.
    expect_rule(&t, w, "flows.udp_timeout", None);

    // For people: the verdict, and the rule with its file and line.
    let [src, dst] = ssh(&out);
    let text = ztxdp_ok(t.edge(), &["explain", "tcp", &src, &dst]);
    let rule = format!("edge.ssh_allow at {}:4", t.config.display());
    assert!(
        text.contains("drop: ssh_source_not_allowed") && text.contains(&rule),
        "{text}"
    );

    // A question that is not a packet changes nothing and says why.
    let bad = ztxdp(t.edge(), &["explain", "tcp", &out, "fd77::1"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("same IP version"),
        "{bad:?}"
    );
    let elsewhere = ztxdp(t.edge(), &["explain", "--iface", "lo", "tcp", &src, &dst]);
    assert_eq!(elsewhere.status.code(), Some(1), "{elsewhere:?}");
    assert!(
        String::from_utf8_lossy(&elsewhere.stderr).contains("attached: eth0 (edge)"),
        "{elsewhere:?}"
    );
}

fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a record ({e}): {line}"))
}

/// A line's source port, if it has one.
fn source_port(line: &Value) -> Option<u64> {
    line.pointer("/source/port").and_then(Value::as_u64)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, step by step")]
fn events_filters_keep_only_the_matching_decisions() {
    let t = start("filters");
    let (outsider, bastion) = (t.lab.outsider(), t.lab.bastion());
    let (out, bas, edge) = (
        OUTSIDER_V4.to_string(),
        BASTION_V4.to_string(),
        EDGE_V4.to_string(),
    );
    let out_cidr = format!("{out}/32");
    let followers = [
        events_follower(t.edge(), &["--action", "deny", "--src", &out_cidr]),
        events_follower(t.edge(), &["--reason", "ssh_allowed"]),
    ];
    // Denied UDP from the outsider, and SSH SYNs from the bastion, each
    // from a port of its own (a flow's repeats would be summarised).
    let denied = |port: u16| {
        let (src, dst) = (format!("{out}:{port}"), format!("{edge}:9"));
        send_frames(
            outsider,
            HOST_INTERFACE,
            &[frame(&t, outsider, &["udp", &src, &dst])],
        );
    };
    let allowed = |port: u16| {
        let (src, dst) = (format!("{bas}:{port}"), format!("{edge}:22"));
        send_frames(
            bastion,
            HOST_INTERFACE,
            &[frame(&t, bastion, &["tcp", &src, &dst])],
        );
    };
    let mut got: [Vec<Value>; 2] = [Vec::new(), Vec::new()];
    let collect = |got: &mut [Vec<Value>; 2], followers: &[(Child, mpsc::Receiver<String>)]| {
        for ((_, rx), lines) in followers.iter().zip(got.iter_mut()) {
            lines.extend(rx.try_iter().map(|l| json(&l)));
        }
    };
    // A follower starts at the first record after it connected: probe
    // until both print.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    for probe in 0.. {
        collect(&mut got, &followers);
        if got.iter().all(|lines| !lines.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "the followers printed nothing");
        denied(30_000 + probe);
        allowed(30_000 + probe);
        thread::sleep(Duration::from_millis(200));
    }
    // What neither filter keeps, then the markers each must print.
    flood(&t.lab, 9000, 50, 1);
    denied(45_000);
    allowed(45_001);
    let (src, dst) = (format!("{out}:45002"), format!("{edge}:22"));
    send_frames(
        outsider,
        HOST_INTERFACE,
        &[frame(&t, outsider, &["tcp", &src, &dst])],
    );
    let has = |lines: &[Value], port| lines.iter().any(|l| source_port(l) == Some(port));
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        collect(&mut got, &followers);
        if has(&got[0], 45_000) && has(&got[0], 45_002) && has(&got[1], 45_001) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the markers did not arrive; deny follower {:?}, ssh follower {:?}",
            got[0].iter().filter_map(source_port).collect::<Vec<_>>(),
            got[1].iter().filter_map(source_port).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(100));
    }
    for line in &got[0] {
        assert!(
            line.pointer("/event/outcome") == Some(&"failure".into())
                && line.pointer("/source/ip") == Some(&out.clone().into()),
            "--action deny --src {out_cidr} printed {line}"
        );
    }
    for line in &got[1] {
        assert_eq!(
            line.pointer("/event/reason"),
            Some(&"ssh_allowed".into()),
            "--reason ssh_allowed printed {line}"
        );
    }
    assert!(
        !has(&got[1], 45_000) && !has(&got[1], 45_002),
        "{:?}",
        got[1]
    );
    // The flood is in the trail, and was filtered out.
    let flooded = |l: &Value| {
        l.pointer("/source/ip")
            .and_then(Value::as_str)
            .is_some_and(|ip| ip.starts_with("198.18."))
    };
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    while !audit_lines(&t.audit()).iter().any(flooded) {
        assert!(
            Instant::now() < deadline,
            "the flood never reached the trail"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(!got[0].iter().any(flooded), "{:?}", got[0]);

    // The files, filtered the same way.
    let config = t.config.display().to_string();
    let text = ztxdp_ok(
        t.edge(),
        &[
            "events", "--config", &config, "--action", "deny", "--src", &out,
        ],
    );
    let lines: Vec<Value> = text.lines().map(json).collect();
    assert!(has(&lines, 45_000) && has(&lines, 45_002), "{text}");
    assert!(
        lines
            .iter()
            .all(|l| l.pointer("/source/ip") == Some(&out.clone().into())),
        "{text}"
    );
    let bad = ztxdp(t.edge(), &["events", "--reason", "no_such_reason"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");

    for (mut child, _) in followers {
        let _ = child.kill();
        let _ = child.wait();
    }
}
