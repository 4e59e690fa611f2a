//! Tier 3 helpers of the audit tests: the lab's edge under `ztxdp up`, deny
//! floods of raw frames from the outsider, and the accounting check that
//! the trail stands for exactly the decisions the kernel counted.

use std::{
    path::Path,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use zt_common::reason;
use zt_tests::{
    lab::{HOST_INTERFACE, Lab},
    netns::NetNs,
};

use super::{Daemon, Enforced, Scratch, audit_lines, build_lab, flood, status};

/// Bounds every "until the trail has caught up" loop.
pub const CATCH_UP: Duration = Duration::from_secs(30);

/// A summary window (1.07 s), the sweep that follows it (every second), and margin.
pub const QUIET: Duration = Duration::from_millis(2500);

/// The lab with `ztxdp up` on the edge; `audit_extra` is appended to the
/// `[audit]` table.
pub fn start(tag: &str, audit_extra: &str) -> Enforced {
    start_with(tag, |_| audit_extra.to_owned())
}

/// [`start`], with the `[audit]` lines written once the scratch directory
/// is there (for files they name).
pub fn start_with(tag: &str, audit_extra: impl FnOnce(&Scratch) -> String) -> Enforced {
    Enforced::start(tag, build_lab(), |_, scratch| {
        format!(
            "[edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
             ssh_allow = [\"10.77.0.2/32\"]\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n{}\n",
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display(),
            audit_extra(scratch)
        )
    })
}

/// Edge deny decisions as `status --json` counts them.
pub fn denies(ns: &NetNs) -> u64 {
    let s = status(ns);
    reason::ALL
        .iter()
        .filter(|&&code| !reason::is_allow(code))
        .filter_map(|&code| s["edge"]["counters"][reason::name(code)].as_u64())
        .sum()
}

/// Edge deny decisions the trail accounts for: deny records (1 + what they
/// carry), deny summaries, and lost records (which in these tests only
/// stand for denies: no allowed connection is opened).
fn accounted(lines: &[Value]) -> u64 {
    let n = |l: &Value| {
        l.pointer("/ztxdp/decisions")
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let text = |l: &Value, p: &str| {
        l.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    lines
        .iter()
        .filter(|l| text(l, "/ztxdp/program") == "edge")
        .filter(|l| match text(l, "/event/action").as_str() {
            "deny" | "lost" => true,
            "summary" => text(l, "/ztxdp/decision") == "deny",
            _ => false,
        })
        .map(n)
        .sum()
}

pub fn count_action(lines: &[Value], action: &str) -> usize {
    lines
        .iter()
        .filter(|l| l.pointer("/event/action").and_then(Value::as_str) == Some(action))
        .count()
}

/// Waits until the trail from record `skip` on accounts for exactly the
/// denies `status` counts, over a quiet spell long enough for every summary
/// window to be swept. (A new program starts its counters at zero: `skip`
/// leaves out the records of the programs before it.)
pub fn expect_exact_accounting(t: &Enforced, skip: usize) -> Vec<Value> {
    expect_exact_accounting_at(t, &t.audit(), skip)
}

/// [`expect_exact_accounting`] of the trail at `audit`.
pub fn expect_exact_accounting_at(t: &Enforced, audit: &Path, skip: usize) -> Vec<Value> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let before = denies(t.lab.edge());
        thread::sleep(QUIET);
        let mut lines = audit_lines(audit);
        lines.drain(..skip.min(lines.len()));
        let in_file = accounted(&lines);
        let after = denies(t.lab.edge());
        if before == after && in_file == after {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "the trail accounts for {in_file} edge denies, status counts {after} (and {before} a moment earlier); \
             decision records {}, summaries {}, lost records {}; daemon log:\n{}",
            count_action(&lines, "deny"),
            count_action(&lines, "summary"),
            count_action(&lines, "lost"),
            t.daemon.log()
        );
    }
}

/// Floods until `stop` is set (bounded by `limit`), counting the rounds
/// sent in `rounds`.
pub fn background_flood(lab: &Lab, stop: &AtomicBool, rounds: &AtomicU32, limit: Duration) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        flood(lab, rounds.load(Ordering::Relaxed) * 200, 200, 2);
        rounds.fetch_add(1, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the background flood has sent `wanted` rounds, or ended.
pub fn await_rounds(rounds: &AtomicU32, wanted: u32, flooding: &thread::ScopedJoinHandle<()>) {
    while rounds.load(Ordering::Relaxed) < wanted && !flooding.is_finished() {
        thread::sleep(Duration::from_millis(20));
    }
}

/// `kill -9` of `daemon` while the background flood goes on; then `more`
/// rounds that no daemon reads, and the flood stops. Returns the rounds
/// sent before the kill.
pub fn kill9_in_flood(
    daemon: &mut Daemon,
    (stop, rounds): (&AtomicBool, &AtomicU32),
    flooding: thread::ScopedJoinHandle<()>,
    more: u32,
) -> u32 {
    daemon.kill9();
    let killed_at = rounds.load(Ordering::Relaxed);
    await_rounds(rounds, killed_at + more, &flooding);
    stop.store(true, Ordering::Relaxed);
    flooding
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    let sent = rounds.load(Ordering::Relaxed);
    assert!(
        sent >= killed_at + more,
        "the flood ran only {killed_at} rounds before the kill and {sent} in all"
    );
    killed_at
}
