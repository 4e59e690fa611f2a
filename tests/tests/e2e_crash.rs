//! Tier 3, the audit trail across a crash (issue 13): `kill -9` of the
//! daemon in mid-flood, then a new `ztxdp up`. The trail must account for
//! every audited decision the kernel counted, exactly: what the killed
//! daemon wrote, and what the new one wrote for it from the old programs'
//! maps and ledger. Needs root. The lab and every daemon are torn down on
//! drop, also when the test fails; every wait is bounded.

mod e2e;

use std::{
    sync::atomic::{AtomicBool, AtomicU32},
    thread,
    time::{Duration, Instant},
};

use e2e::{
    audit::{
        CATCH_UP, background_flood, count_action, denies, expect_exact_accounting, kill9_in_flood,
        start,
    },
    audit_lines, flood, status, verify_audit,
};
use serde_json::Value;

fn previous_run(l: &Value) -> bool {
    l.pointer("/ztxdp/previous_run") == Some(&Value::Bool(true))
}

fn decisions(lines: &[&Value]) -> u64 {
    lines
        .iter()
        .filter_map(|l| l.pointer("/ztxdp/decisions").and_then(Value::as_u64))
        .sum()
}

#[test]
fn a_kill_9_in_mid_flood_leaves_every_decision_accounted_for() {
    let mut t = start("killnine", "fsync_ms = 100");
    // A burst of new flows first, far over the per-CPU event rate, so that
    // rate-limited counts are in flight too, whatever the machine's speed.
    flood(&t.lab, 100_000, 3000, 1);
    let (stop, rounds) = (&AtomicBool::new(false), &AtomicU32::new(0));
    thread::scope(|scope| {
        let lab = &t.lab;
        // Rounds, not a fixed time, so a loaded machine floods as much.
        let flooding = scope.spawn(move || background_flood(lab, stop, rounds, CATCH_UP));
        // Long enough for every kind of record to be in flight: events,
        // swept summaries, rate-limited counts.
        let deadline = Instant::now() + CATCH_UP;
        loop {
            let lines = audit_lines(&t.audit());
            if count_action(&lines, "summary") > 0 && count_action(&lines, "lost") > 0 {
                break;
            }
            assert!(
                Instant::now() < deadline && !flooding.is_finished(),
                "the flood made no summary and lost records: {} records",
                lines.len()
            );
            thread::sleep(Duration::from_millis(50));
        }
        // And decisions made while no daemon runs.
        kill9_in_flood(&mut t.daemon, (stop, rounds), flooding, 3);
    });
    let by_the_killed = audit_lines(&t.audit()).len();
    t.restart("daemon-2.log");
    // The whole trail, both daemons' records, against the counters the new
    // programs carry over from the old ones.
    let lines = expect_exact_accounting(&t, 0);
    let (earlier, later): (Vec<&Value>, Vec<&Value>) = lines.iter().partition(|l| previous_run(l));
    let unwritten: u64 = earlier
        .iter()
        .filter_map(|l| l.pointer("/ztxdp/unwritten").and_then(Value::as_u64))
        .sum();
    eprintln!(
        "kill -9 in mid-flood: status counts {} edge denies, the trail accounts for all of them: \
         {} decision records, {} summaries, {} lost records; the killed daemon wrote {by_the_killed} \
         records, the new one {} for it ({} decisions, {unwritten} of them unwritten)",
        denies(t.lab.edge()),
        count_action(&lines, "deny"),
        count_action(&lines, "summary"),
        count_action(&lines, "lost"),
        earlier.len(),
        decisions(&earlier),
    );
    assert!(
        !earlier.is_empty(),
        "the new daemon wrote nothing for the killed one; its log:\n{}",
        t.daemon.log()
    );
    assert!(
        decisions(&later) > 0,
        "no records of the killed daemon's own"
    );
    // No connection was allowed: the audited decisions are the denies.
    assert_eq!(
        status(t.lab.edge())["edge"]["audited"].as_u64(),
        Some(denies(t.lab.edge())),
        "status says how many decisions the trail must account for"
    );
    t.daemon.terminate();
    let shown = verify_audit(&t);
    assert!(
        shown.contains("chain checked from the first record"),
        "{shown}"
    );
}
