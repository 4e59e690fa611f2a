//! Packet rates: every filter, every traffic mix, repeated and interleaved
//! (run 1: A B C ..., run 2: A B C ...), so slow drifts of the machine hit
//! every filter alike. Each filter gets a fresh topology.
//!
//! Per measurement: traffic starts, runs `warmup`, then the DUT's rx counter
//! and the CPU time of the generator thread and ksoftirqd are read at both
//! ends of `duration`. The sanity checks use totals taken before the
//! generator starts and after it stops, so the filter's own drop counter and
//! the stack's delivery counter cover exactly the same packets as rx.

use std::{
    path::Path,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    FilterKind, GeneratorKind, Plan, TrafficKind,
    filters::{Attached, Env},
    generator::{CpuAccount, LiveGen, Pktgen, Sent},
    topo::{self, BpfStatsOff, Topology},
    traffic::{self, Traffic},
};
use crate::cmd::Progress;

/// How far the delivered and dropped shares may stray from the expected.
const SHARE_TOLERANCE: f64 = 0.05;
/// Traffic after the measured window, so the window never sees the end.
const TAIL: Duration = Duration::from_millis(300);

/// One measurement.
#[derive(Clone, Debug)]
pub struct Sample {
    pub filter: FilterKind,
    pub traffic: TrafficKind,
    pub run: u32,
    /// Received by d0 per second, in the measured window.
    pub mpps: f64,
    /// CPU ns per received packet (generator + receiver).
    pub ns_per_packet: f64,
    /// CPU use of the accounted threads, in CPUs.
    pub cpu_util: f64,
    /// What the generator sent per second.
    pub offered_mpps: f64,
    /// Over the whole run: received / sent.
    pub received_share: f64,
    /// Over the whole run: the filter's own drops / received.
    pub dropped_share: Option<f64>,
    /// Over the whole run: delivered to L4 / received.
    pub delivered_share: f64,
    /// The share that should be delivered.
    pub expected_pass: f64,
    /// Empty when every sanity check passed.
    pub problems: Vec<String>,
}

enum Sender {
    Live { fixed: LiveGen, mix: LiveGen },
    Pktgen(Pktgen),
}

/// Runs every (filter, traffic) pair `plan.runs` times.
///
/// # Errors
/// When a topology, filter or generator cannot be set up.
pub fn run(plan: &Plan, ztxdp: &Path, progress: &Progress) -> anyhow::Result<Vec<Sample>> {
    let env = Env::new(ztxdp, super::scratch_dir())?;
    let sender = match plan.generator {
        GeneratorKind::XdpLive => Sender::Live {
            fixed: LiveGen::load(None)?,
            mix: LiveGen::load(Some((traffic::MIX_BASE, traffic::MIX_SOURCES)))?,
        },
        GeneratorKind::Pktgen => Sender::Pktgen(Pktgen::open(&crate::workspace_root())?),
    };
    keep_off_cpu(plan.cpu)?;
    let mut mixes: Vec<Traffic> = plan.traffic.iter().map(|k| Traffic::new(*k)).collect();
    if matches!(sender, Sender::Pktgen(_)) {
        let (udp, tcp): (Vec<_>, Vec<_>) = mixes
            .into_iter()
            .partition(|t| matches!(t.kind, TrafficKind::Udp | TrafficKind::Wg));
        for t in tcp {
            progress.say(format!("{:?}: skipped, pktgen sends only UDP", t.kind));
        }
        mixes = udp;
    }
    let (fixed, mix): (Vec<&Traffic>, Vec<&Traffic>) =
        mixes.iter().partition(|t| t.kind != TrafficKind::Mix);
    let mut samples = Vec::new();
    for run in 1..=plan.runs {
        for &filter in &plan.filters {
            for (group, mix_allow) in [(&fixed, 0), (&mix, plan.mix_allow)] {
                if group.is_empty() {
                    continue;
                }
                let topo = Topology::new()?;
                let Some(attached) = Attached::attach(filter, &topo, &env, mix_allow)
                    .with_context(|| format!("could not attach {filter:?}"))?
                else {
                    if run == 1 {
                        progress.say(format!("{filter:?} cannot express a {mix_allow}-source allow-list: not run on the mix"));
                    }
                    continue;
                };
                for t in group {
                    let s = measure(plan, &topo, &attached, t, &sender, run, mix_allow)
                        .with_context(|| format!("{filter:?} / {:?}, run {run}", t.kind))?;
                    progress.say(format!(
                        "run {run}/{} {filter:?} {:?}: {:.2} Mpps, {:.1} ns/pkt, delivered {:.2}, dropped {}{}",
                        plan.runs,
                        t.kind,
                        s.mpps,
                        s.ns_per_packet,
                        s.delivered_share,
                        s.dropped_share.map_or("-".to_owned(), |d| format!("{d:.2}")),
                        if s.problems.is_empty() { String::new() } else { format!(" PROBLEM: {}", s.problems.join("; ")) }
                    ));
                    samples.push(s);
                }
            }
        }
    }
    Ok(samples)
}

/// Fails when any sample missed a sanity check or has a zero figure.
///
/// # Errors
/// Listing every failed check.
pub fn check(plan: &Plan, samples: &[Sample]) -> anyhow::Result<String> {
    let failed: Vec<String> = samples
        .iter()
        .filter(|s| !s.problems.is_empty())
        .map(|s| {
            format!(
                "{:?}/{:?} run {}: {}",
                s.filter,
                s.traffic,
                s.run,
                s.problems.join("; ")
            )
        })
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} measurements failed their checks:\n  {}",
            failed.len(),
            samples.len(),
            failed.join("\n  ")
        );
    }
    Ok(format!(
        "{} measurements, {} runs, all checks passed",
        samples.len(),
        plan.runs
    ))
}

fn measure(
    plan: &Plan,
    topo: &Topology,
    attached: &Attached<'_>,
    t: &Traffic,
    sender: &Sender,
    run: u32,
    mix_allow: u32,
) -> anyhow::Result<Sample> {
    if !BpfStatsOff::is_off() {
        bail!(
            "kernel.bpf_stats_enabled was turned on during the benchmark; packet rates would be wrong"
        );
    }
    let before = topo.counters()?;
    let drops_before = attached.drops()?;
    let until = Instant::now() + plan.warmup + plan.duration + TAIL;
    let (sent, window) = thread::scope(|s| -> anyhow::Result<(Sent, Window)> {
        let (tid_tx, tid_rx) = mpsc::channel();
        let generator = s.spawn(move || match sender {
            Sender::Live { fixed, mix } => {
                let g = if t.sources.is_some() { mix } else { fixed };
                g.send(&topo.src, topo::GEN_IF, &t.frame, plan.cpu, until, &tid_tx)
            }
            Sender::Pktgen(p) => {
                drop(tid_tx);
                p.send(
                    &topo.src,
                    &t.frame,
                    plan.cpu,
                    until.saturating_duration_since(Instant::now()),
                    t.sources,
                )
            }
        });
        let account = match sender {
            Sender::Live { .. } => match tid_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(tid) => CpuAccount::live(tid, plan.cpu),
                // The generator ended before it started: its error says why.
                Err(_) => {
                    return Err(join(generator)
                        .err()
                        .unwrap_or_else(|| anyhow::anyhow!("the generator never started")));
                }
            },
            Sender::Pktgen(_) => CpuAccount::pktgen(plan.cpu),
        };
        let window = account.and_then(|a| Window::take(topo, &a, plan.warmup, plan.duration));
        let sent = join(generator)?;
        Ok((sent, window?))
    })?;
    // Let the last batch's softirq finish before the totals.
    thread::sleep(Duration::from_millis(50));
    let after = topo.counters()?;
    let drops_after = attached.drops()?;
    Ok(sample(
        plan,
        attached.kind,
        t.kind,
        run,
        mix_allow,
        &sent,
        &window,
        (before, after),
        drops_before.zip(drops_after),
    ))
}

fn join(h: thread::ScopedJoinHandle<'_, anyhow::Result<Sent>>) -> anyhow::Result<Sent> {
    h.join()
        .map_err(|_| anyhow::anyhow!("the generator thread panicked"))?
}

/// The measured window.
struct Window {
    start: topo::Counters,
    end: topo::Counters,
    cpu_ns: u64,
}

impl Window {
    fn take(
        topo: &Topology,
        account: &CpuAccount,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Self> {
        thread::sleep(warmup);
        let start = topo.counters()?;
        let cpu0 = account.ns();
        thread::sleep(duration);
        let end = topo.counters()?;
        let cpu1 = account.ns();
        Ok(Self {
            start,
            end,
            cpu_ns: cpu1.saturating_sub(cpu0),
        })
    }
}

#[expect(clippy::too_many_arguments, reason = "assembles one record")]
#[expect(clippy::cast_precision_loss, reason = "packet counts far below 2^52")]
fn sample(
    plan: &Plan,
    filter: FilterKind,
    kind: TrafficKind,
    run: u32,
    mix_allow: u32,
    sent: &Sent,
    w: &Window,
    (before, after): (topo::Counters, topo::Counters),
    drops: Option<(u64, u64)>,
) -> Sample {
    let dt = w.end.at.duration_since(w.start.at).as_secs_f64();
    let packets = w.end.rx.saturating_sub(w.start.rx) as f64;
    let rx_total = after.rx.saturating_sub(before.rx) as f64;
    let share = |n: u64| {
        if rx_total > 0.0 {
            n as f64 / rx_total
        } else {
            0.0
        }
    };
    let expected_pass = traffic::expected_pass(filter, kind, mix_allow);
    let mut s = Sample {
        filter,
        traffic: kind,
        run,
        mpps: packets / dt.max(1e-9) / 1e6,
        ns_per_packet: if packets > 0.0 {
            w.cpu_ns as f64 / packets
        } else {
            0.0
        },
        cpu_util: w.cpu_ns as f64 / 1e9 / dt.max(1e-9),
        offered_mpps: sent.packets as f64 / sent.elapsed.as_secs_f64().max(1e-9) / 1e6,
        received_share: if sent.packets > 0 {
            rx_total / sent.packets as f64
        } else {
            0.0
        },
        dropped_share: drops.map(|(a, b)| share(b.saturating_sub(a))),
        delivered_share: share(after.delivered.saturating_sub(before.delivered)),
        expected_pass,
        problems: Vec::new(),
    };
    s.problems = problems(&s, plan.generator);
    s
}

fn problems(s: &Sample, generator: GeneratorKind) -> Vec<String> {
    let mut p = Vec::new();
    if s.mpps <= 0.0 || s.ns_per_packet <= 0.0 {
        p.push(format!(
            "zero figure: {:.3} Mpps, {:.1} ns/packet",
            s.mpps, s.ns_per_packet
        ));
    }
    // Deny traffic: nothing may reach L4. Otherwise: the expected share.
    if s.expected_pass == 0.0 {
        if s.delivered_share > 0.001 {
            p.push(format!(
                "{:.4} of denied packets were delivered to L4",
                s.delivered_share
            ));
        }
    } else if (s.delivered_share - s.expected_pass).abs() > SHARE_TOLERANCE {
        p.push(format!(
            "delivered {:.3}, expected {:.3}",
            s.delivered_share, s.expected_pass
        ));
    }
    if let Some(d) = s.dropped_share
        && (d - (1.0 - s.expected_pass)).abs() > SHARE_TOLERANCE
    {
        p.push(format!(
            "own drop counter says {d:.3} of rx, expected {:.3}",
            1.0 - s.expected_pass
        ));
    }
    // Live frames come back to the generator's own CPU: nothing may be lost
    // on the way. pktgen on a real link may lose some; not judged.
    if generator == GeneratorKind::XdpLive && s.received_share < 0.95 {
        p.push(format!(
            "only {:.3} of the sent packets arrived",
            s.received_share
        ));
    }
    p
}

/// Keeps this thread, and the commands it starts, off the measured CPU, so
/// that reading counters does not steal time from the generator.
fn keep_off_cpu(cpu: usize) -> anyhow::Result<()> {
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    if cpus < 2 {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in (0..cpus).filter(|c| *c != cpu) {
        // SAFETY: c < cpus <= CPU_SETSIZE.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: pid 0 is this thread; `set` is valid.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) } != 0 {
        bail!(
            "could not move the benchmark's control thread off CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_with(expected: f64, delivered: f64, dropped: Option<f64>) -> Sample {
        Sample {
            filter: FilterKind::Ztxdp,
            traffic: TrafficKind::Udp,
            run: 1,
            mpps: 10.0,
            ns_per_packet: 100.0,
            cpu_util: 1.0,
            offered_mpps: 10.0,
            received_share: 1.0,
            dropped_share: dropped,
            delivered_share: delivered,
            expected_pass: expected,
            problems: Vec::new(),
        }
    }

    #[test]
    fn checks_catch_leaks_and_miscounts() {
        assert!(
            problems(&sample_with(0.0, 0.0, Some(1.0)), GeneratorKind::XdpLive).is_empty(),
            "clean deny"
        );
        assert!(
            problems(&sample_with(1.0, 0.99, Some(0.0)), GeneratorKind::XdpLive).is_empty(),
            "clean pass"
        );
        let leak = problems(&sample_with(0.0, 0.01, Some(0.99)), GeneratorKind::XdpLive);
        assert_eq!(leak.len(), 1, "a denied packet reached L4: {leak:?}");
        let miscount = problems(&sample_with(0.0, 0.0, Some(0.5)), GeneratorKind::XdpLive);
        assert_eq!(miscount.len(), 1, "drop counter off: {miscount:?}");
        let mut lossy = sample_with(0.0, 0.0, None);
        lossy.received_share = 0.5;
        assert_eq!(
            problems(&lossy, GeneratorKind::XdpLive).len(),
            1,
            "lost packets"
        );
        assert!(
            problems(&lossy, GeneratorKind::Pktgen).is_empty(),
            "pktgen losses are not judged"
        );
    }
}
