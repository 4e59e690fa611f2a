//! `BPF_PROG_TEST_RUN` costs: ns per run of each program on each path, and
//! how the ztxdp programs scale with their tables.
//!
//! `test_run` runs a program `repeat` times on one copy of the frame and
//! reports the average. It measures the program alone: no driver, no
//! generator, warm caches. ztxdp's programs are loaded and filled exactly as
//! `ztxdp up` does (`loader::load`, then `Tables::apply_*`), without being
//! attached anywhere. One artefact: nothing drains the audit ring buffer
//! here, so after 65,536 allowed SYNs (the SSH pass path, which is always
//! audited) every further run takes the "ring full, count it lost" branch.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use ipnet::IpNet;
use zt_common::program;
use ztxdp::{
    config::Config,
    loader,
    policy::{Grant, Policy, Protocol},
};

use super::{
    FilterKind, Plan, TrafficKind,
    filters::{Attached, Env, quiet},
    generator,
    topo::Topology,
    traffic::{self, Traffic},
};
use crate::cmd::Progress;

/// A one-peer tunnel config; the benchmarks replace the peers.
pub const TUNNEL_TOML: &str = "[tunnel]\ninterface = \"t0\"\nruntime_grants = \"/nonexistent/grants.json\"\n\n[[tunnel.peer]]\nname = \"p0\"\naddresses = [\"10.200.0.1/32\"]\n\n[audit]\npath = \"/dev/null\"\n";

/// Calls per figure; the median is reported.
const CALLS: usize = 5;

/// ns/run of one program on one kind of packet.
#[derive(Clone, Debug)]
pub struct ProgramCost {
    pub program: String,
    pub path: String,
    pub ns_per_run: f64,
}

/// One point of a scaling curve.
#[derive(Clone, Debug)]
pub struct ScalingPoint {
    /// `ssh_allow` or `tunnel_peers`.
    pub curve: &'static str,
    pub size: u32,
    /// Seconds to fill the maps (`Tables::apply_edge` / `apply_tunnel`).
    pub fill_seconds: f64,
    pub pass_ns: f64,
    pub deny_ns: f64,
}

/// ns/run of the bare drop, ztxdp's edge program on every path, and
/// xdp-filter (through `bpftool prog run`, as it is loaded by libxdp).
///
/// # Errors
/// When a program cannot be loaded or run.
pub fn programs(
    plan: &Plan,
    ztxdp: &Path,
    progress: &Progress,
) -> anyhow::Result<Vec<ProgramCost>> {
    let mut out = Vec::new();
    let udp = Traffic::new(TrafficKind::Udp);
    let mut bench =
        Ebpf::load(ztxdp::BENCH_OBJECT).context("could not load the benchmark BPF object")?;
    let drop = generator::xdp_mut(&mut bench, generator::DROP_PROGRAM)?;
    drop.load()
        .context("the kernel refused the bare drop program")?;
    out.push(ProgramCost {
        program: "xdp-drop".into(),
        path: "any".into(),
        ns_per_run: prog_ns(drop, &udp.frame, plan.testrun_repeat)?,
    });

    let policy = policy(&traffic::config_toml(Path::new("/dev/null"), 0))?;
    let mut edge = fill(&policy, false)?;
    let prog: &mut Xdp = loader::program_mut(&mut edge, program::EDGE_NAME)?;
    for kind in [
        TrafficKind::Udp,
        TrafficKind::Syn,
        TrafficKind::Ssh,
        TrafficKind::Wg,
    ] {
        let frame = Traffic::new(kind).frame;
        out.push(ProgramCost {
            program: "ztxdp".into(),
            path: path_name(kind).into(),
            ns_per_run: prog_ns(prog, &frame, plan.testrun_repeat)?,
        });
    }
    if plan.filters.contains(&FilterKind::XdpFilter) {
        out.extend(xdp_filter(plan, ztxdp, progress)?);
    }
    for c in &out {
        progress.say(format!(
            "{} {}: {:.1} ns/run",
            c.program, c.path, c.ns_per_run
        ));
    }
    Ok(out)
}

pub const fn path_name(kind: TrafficKind) -> &'static str {
    match kind {
        TrafficKind::Udp => "deny: UDP closed port",
        TrafficKind::Syn => "deny: SYN to 5432",
        TrafficKind::Ssh => "pass: SSH from allow-list",
        TrafficKind::Wg => "pass: WireGuard",
        TrafficKind::Mix => "mix",
    }
}

/// xdp-filter is loaded by libxdp (a dispatcher plus the filter), so it is
/// run by id with bpftool, on the dispatcher as attached.
fn xdp_filter(plan: &Plan, ztxdp: &Path, progress: &Progress) -> anyhow::Result<Vec<ProgramCost>> {
    let dir = super::scratch_dir();
    let env = Env::new(ztxdp, dir.clone())?;
    let topo = Topology::new()?;
    let Some(attached) = Attached::attach(FilterKind::XdpFilter, &topo, &env, 0)? else {
        return Ok(Vec::new());
    };
    let id = attached.xdp_prog_id()?.to_string();
    let mut out = Vec::new();
    for kind in [TrafficKind::Udp, TrafficKind::Wg] {
        let file = dir.join(format!("frame-{kind:?}.bin"));
        std::fs::write(&file, Traffic::new(kind).frame)?;
        let mut runs = Vec::new();
        for _ in 0..CALLS {
            let text = quiet(
                std::process::Command::new("bpftool")
                    .args(["prog", "run", "id", &id, "data_in"])
                    .arg(&file)
                    .args(["repeat", &plan.testrun_repeat.to_string()]),
            )
            .context("bpftool prog run failed (bpftool installed?)")?;
            runs.push(
                bpftool_average(&text).context("no `duration (average)` in bpftool's output")?,
            );
        }
        out.push(ProgramCost {
            program: "xdp-filter".into(),
            path: path_name(kind).into(),
            ns_per_run: median(&mut runs),
        });
    }
    progress.say(format!("xdp-filter measured as dispatcher program {id}"));
    Ok(out)
}

/// `Return value: 1, duration (average): 31ns`
fn bpftool_average(text: &str) -> Option<f64> {
    let rest = text.split("duration (average):").nth(1)?;
    rest.trim_start().split("ns").next()?.trim().parse().ok()
}

/// Median ns/run of `prog` (XDP or TC) on `frame` over [`CALLS`] calls.
fn prog_ns<P>(prog: &P, frame: &[u8], repeat: u32) -> anyhow::Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let mut runs = Vec::with_capacity(CALLS);
    for _ in 0..CALLS {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN failed")?;
        runs.push(nanos(r.duration));
    }
    Ok(median(&mut runs))
}

#[expect(clippy::cast_precision_loss, reason = "ns per run are small")]
fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// A policy through the real parser, so defaults are the product's.
pub fn policy(toml: &str) -> anyhow::Result<Policy> {
    Ok(Config::parse(toml, Path::new("bench.toml"))
        .context("the benchmark's generated config is invalid")?
        .policy)
}

/// Loads the ztxdp programs and fills their maps the way `ztxdp up` does,
/// without attaching them.
pub fn fill(policy: &Policy, tunnel_l2: bool) -> anyhow::Result<Ebpf> {
    let (ebpf, _tables) = loader::load_filled(
        tunnel_l2,
        policy.edge.as_ref(),
        policy.tunnel.as_ref(),
        &policy.flows,
    )
    .context("could not load and fill the ztxdp programs")?;
    Ok(ebpf)
}

/// The scaling curves: SSH allow-list size and tunnel peer count.
///
/// # Errors
/// When a program cannot be loaded, filled or run.
pub fn scaling(plan: &Plan, progress: &Progress) -> anyhow::Result<Vec<ScalingPoint>> {
    let mut out = Vec::new();
    for &n in &plan.ssh_sizes {
        let p = ssh_point(n, plan.testrun_repeat)?;
        progress.say(format!(
            "ssh_allow {n:>9}: fill {:.2} s, pass {:.1} ns, deny {:.1} ns",
            p.fill_seconds, p.pass_ns, p.deny_ns
        ));
        out.push(p);
    }
    for &n in &plan.peer_sizes {
        let p = peer_point(n, plan.testrun_repeat)?;
        progress.say(format!(
            "tunnel peers {n:>6}: fill {:.2} s, pass {:.1} ns, deny {:.1} ns",
            p.fill_seconds, p.pass_ns, p.deny_ns
        ));
        out.push(p);
    }
    Ok(out)
}

/// `i`-th of `n` distinct addresses spread over `base`/8: an odd multiplier
/// is a bijection on 24 bits, so the trie is filled all over, not in a
/// dense corner.
fn spread(base: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(base) << 24) | (i.wrapping_mul(0x9E37_79B1) & 0x00ff_ffff))
}

fn ssh_point(n: u32, repeat: u32) -> anyhow::Result<ScalingPoint> {
    let mut policy = policy(&traffic::config_toml(Path::new("/dev/null"), 0))?;
    let edge = policy
        .edge
        .as_mut()
        .context("no edge in the generated config")?;
    edge.ssh_allow = (0..n)
        .map(|i| IpNet::from(IpAddr::V4(spread(11, i))))
        .collect();
    let hit = spread(11, n / 2);
    // The neighbouring address: same path down the trie, then a miss.
    let miss = Ipv4Addr::from(u32::from(hit) ^ 1);
    let start = Instant::now();
    let mut ebpf = fill(&policy, false)?;
    let fill_seconds = start.elapsed().as_secs_f64();
    let prog: &mut Xdp = loader::program_mut(&mut ebpf, program::EDGE_NAME)?;
    let syn = zt_tests::packet::Transport::tcp_syn(traffic::SSH_PORT);
    Ok(ScalingPoint {
        curve: "ssh_allow",
        size: n,
        fill_seconds,
        pass_ns: prog_ns(prog, &traffic::frame(hit, &syn), repeat)?,
        deny_ns: prog_ns(prog, &traffic::frame(miss, &syn), repeat)?,
    })
}

/// Peers with one /32 and one grant (tcp/5432) each. Pass: the last peer
/// to 5432; deny: a peer in the middle to 5433, which it is not granted.
fn peer_point(n: u32, repeat: u32) -> anyhow::Result<ScalingPoint> {
    let mut policy = policy(TUNNEL_TOML)?;
    let tunnel = policy
        .tunnel
        .as_mut()
        .context("no tunnel in the generated config")?;
    let template = tunnel
        .peers
        .first()
        .cloned()
        .context("no peer in the generated config")?;
    tunnel.peers = (0..n)
        .map(|i| {
            let mut p = template.clone();
            p.name = format!("p{i}");
            p.addresses = vec![IpNet::from(IpAddr::V4(spread(12, i)))];
            p.grants = vec![Grant::Ports {
                protocol: Protocol::Tcp,
                first: 5432,
                last: 5432,
            }];
            p
        })
        .collect();
    let pass_src = spread(12, n - 1);
    let deny_src = spread(12, n / 2);
    let start = Instant::now();
    let mut ebpf = fill(&policy, true)?;
    let fill_seconds = start.elapsed().as_secs_f64();
    let prog: &mut SchedClassifier = loader::program_mut(&mut ebpf, program::TUNNEL_NAME)?;
    let granted = zt_tests::packet::Transport::tcp_syn(5432);
    let not_granted = zt_tests::packet::Transport::tcp_syn(5433);
    Ok(ScalingPoint {
        curve: "tunnel_peers",
        size: n,
        fill_seconds,
        pass_ns: prog_ns(prog, &traffic::frame(pass_src, &granted), repeat)?,
        deny_ns: prog_ns(prog, &traffic::frame(deny_src, &not_granted), repeat)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < f64::EPSILON);
        assert!((median(&mut [4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < f64::EPSILON);
        assert_eq!(
            bpftool_average("Return value: 1, duration (average): 31ns\n"),
            Some(31.0)
        );
        let a: std::collections::HashSet<Ipv4Addr> = (0..10_000).map(|i| spread(11, i)).collect();
        assert_eq!(a.len(), 10_000, "spread addresses must be distinct");
    }
}
