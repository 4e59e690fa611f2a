//! Tier 3, the dry run (issue 15): the real `ztxdp up --dry-run` on the
//! lab's edge. A flood the policy denies reaches a listening socket, and
//! the trail records every packet of it as a would-deny, as many as the
//! kernel counted. Needs root; the lab and the daemon are torn down on
//! drop, and every wait is bounded.

mod e2e;

use std::{
    net::IpAddr,
    thread,
    time::{Duration, Instant},
};

use e2e::{
    Enforced, at, audit_lines, build_lab, counter, status, udp_socket, verify_audit, ztxdp_ok,
};
use serde_json::{Value, json};
use zt_tests::lab::{EDGE_V4, HOST_INTERFACE};

/// Not a WireGuard port: the policy denies UDP to it (`port_not_allowed`).
const CLOSED_UDP: u16 = 9;
/// Datagrams in the flood; each must arrive.
const FLOOD: u64 = 300;
/// Bounds the wait for the trail to account for the flood.
const CATCH_UP: Duration = Duration::from_secs(30);

/// Decisions the trail records as would-denies: would-deny records (with
/// what they carry) and would-deny summaries.
fn would_denies(lines: &[Value]) -> u64 {
    let text = |l: &Value, p: &str| l.pointer(p).and_then(Value::as_str).map(str::to_owned);
    lines
        .iter()
        .filter(|l| match text(l, "/event/action").as_deref() {
            Some("would_deny") => true,
            Some("summary") => text(l, "/ztxdp/decision").as_deref() == Some("would_deny"),
            _ => false,
        })
        .filter_map(|l| l.pointer("/ztxdp/decisions").and_then(Value::as_u64))
        .sum()
}

#[test]
fn a_dry_run_flood_is_delivered_and_recorded_as_would_deny() {
    let t = Enforced::start_with("dryrun", build_lab(), &["--dry-run"], |_, scratch| {
        format!(
            "[edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
             ssh_allow = [\"10.77.0.2/32\"]\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n",
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display()
        )
    });
    let host = t.edge();
    let s = status(host);
    assert_eq!(s["edge"]["policy_mode"], "audit", "status --json: {s}");
    let drops: Vec<&str> = s["edge"]["drops_in_audit"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        drops.contains(&"malformed") && drops.contains(&"header_limit"),
        "status says parse failures still drop: {s}"
    );
    // explain tells the same: the policy's reason, and that it passes.
    let dst = format!("{EDGE_V4}:{CLOSED_UDP}");
    let explained: Value = serde_json::from_str(&ztxdp_ok(
        host,
        &["explain", "--json", "udp", "10.77.0.9:4000", &dst],
    ))
    .unwrap_or_else(|e| t.fail(&format!("explain --json: {e}")));
    assert_eq!(
        (
            &explained["verdict"],
            &explained["mode"],
            &explained["reason"]
        ),
        (&json!("pass"), &json!("audit"), &json!("port_not_allowed")),
        "{explained}"
    );
    let before = (
        counter(&s, "edge", "port_not_allowed"),
        counter(&s, "edge", "would_drop"),
    );
    let any = IpAddr::from([0u8; 16]);
    let listener = udp_socket(host, at(any, CLOSED_UDP));
    let sender = udp_socket(t.lab.outsider(), at(any, 0));
    let mut buf = [0u8; 64];
    for i in 0..FLOOD {
        let payload = i.to_be_bytes();
        sender
            .send_to(&payload, at(EDGE_V4, CLOSED_UDP))
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        let (n, _) = listener.recv_from(&mut buf).unwrap_or_else(|e| {
            t.fail(&format!(
                "datagram {i} to a denied port did not arrive in the dry run: {e}"
            ))
        });
        assert_eq!(&buf[..n], &payload, "datagram {i} arrived changed");
    }
    let s = status(host);
    assert_eq!(
        (
            counter(&s, "edge", "port_not_allowed") - before.0,
            counter(&s, "edge", "would_drop") - before.1
        ),
        (FLOOD, FLOOD),
        "counted under its reason and as would-drops: {s}"
    );
    // Every would-drop of the program, the warm-up of none included, is in
    // the trail once its summary window has been swept.
    let want = counter(&s, "edge", "would_drop");
    let deadline = Instant::now() + CATCH_UP;
    let lines = loop {
        let lines = audit_lines(&t.audit());
        if would_denies(&lines) == want {
            break lines;
        }
        if Instant::now() > deadline {
            t.fail(&format!(
                "the trail records {} would-denies, the kernel counted {want}",
                would_denies(&lines)
            ));
        }
        thread::sleep(Duration::from_millis(200));
    };
    let first = lines
        .iter()
        .find(|l| l.pointer("/event/action").and_then(Value::as_str) == Some("would_deny"))
        .unwrap_or_else(|| t.fail("no would_deny record"));
    assert_eq!(first["event"]["reason"], "port_not_allowed", "{first}");
    assert_eq!(first["event"]["outcome"], "success", "{first}");
    assert_eq!(first["destination"]["port"], CLOSED_UDP, "{first}");
    assert!(
        !lines
            .iter()
            .any(|l| l.pointer("/event/action").and_then(Value::as_str) == Some("deny")),
        "nothing was denied in a dry run"
    );
    verify_audit(&t);
}
