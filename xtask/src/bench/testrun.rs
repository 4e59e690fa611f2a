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
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp},
};
use ipnet::{IpNet, Ipv6Net};
use zt_common::program;
use zt_tests::packet::Transport;
use ztxdp::{
    config::Config,
    loader,
    policy::{Grant, Policy, Protocol},
    tables::Tables,
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

/// `enum xdp_action` of the kernel's UAPI.
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// The scaling curves, in the order they are measured.
pub const CURVES: [&str; 3] = ["ssh_allow", "ssh_allow_v6", "tunnel_peers"];

/// The flat-lookup target: a lookup may cost at most this many
/// times as much at a curve's largest size as at its smallest.
pub const FLAT_TARGET: f64 = 1.15;

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
    /// One of [`CURVES`].
    pub curve: &'static str,
    pub size: u32,
    /// Seconds to fill the maps (`Tables::apply_edge` / `apply_tunnel`).
    pub fill_seconds: f64,
    /// Kernel memory of the maps holding the list (as `ztxdp status`
    /// reports it); unknown in a baseline file from before it was kept.
    pub memory_bytes: Option<u64>,
    pub pass_ns: f64,
    pub deny_ns: f64,
}

/// How much more a curve costs at its largest size than at its smallest.
#[derive(Clone, Copy, Debug)]
pub struct Growth {
    pub from: u32,
    pub to: u32,
    /// Largest size's `pass_ns` over the smallest's.
    pub pass: f64,
    pub deny: f64,
}

impl Growth {
    /// The growth over the points of one curve; `None` with fewer than two
    /// sizes or a zero cost to divide by.
    pub fn of<'a>(points: impl IntoIterator<Item = &'a ScalingPoint>) -> Option<Self> {
        let points: Vec<&ScalingPoint> = points.into_iter().collect();
        let small = points.iter().min_by_key(|p| p.size)?;
        let large = points.iter().max_by_key(|p| p.size)?;
        (large.size > small.size && small.pass_ns > 0.0 && small.deny_ns > 0.0).then(|| Self {
            from: small.size,
            to: large.size,
            pass: large.pass_ns / small.pass_ns,
            deny: large.deny_ns / small.deny_ns,
        })
    }

    pub fn met(&self) -> bool {
        self.pass <= FLAT_TARGET && self.deny <= FLAT_TARGET
    }
}

impl fmt::Display for Growth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            from,
            to,
            pass,
            deny,
        } = self;
        write!(
            f,
            "largest ÷ smallest size: pass {pass:.2}x, deny {deny:.2}x; flat-lookup target (<= {FLAT_TARGET}x from {from} to {to}): {}",
            if self.met() { "met" } else { "NOT met" }
        )
    }
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
        runs.push(run_once(prog, frame, repeat)?);
    }
    Ok(median(&mut runs))
}

/// ns per run of one `test_run` call of `repeat` runs.
fn run_once<P>(prog: &P, frame: &[u8], repeat: u32) -> anyhow::Result<f64>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN failed")?;
    Ok(nanos(r.duration))
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

/// The scaling curves: SSH allow-list size (IPv4, IPv6) and tunnel peer
/// count, in the order of [`CURVES`].
///
/// # Errors
/// When a program cannot be loaded, filled or run.
pub fn scaling(plan: &Plan, progress: &Progress) -> anyhow::Result<Vec<ScalingPoint>> {
    type Load = fn(u32) -> anyhow::Result<Loaded>;
    let curves: [(&[u32], Load); 3] = [
        (&plan.ssh_sizes, ssh_point),
        (&plan.ssh_sizes, ssh_v6_point),
        (&plan.peer_sizes, peer_point),
    ];
    let mut out: Vec<ScalingPoint> = Vec::new();
    for (sizes, load) in curves {
        let mut loaded = Vec::with_capacity(sizes.len());
        for &n in sizes {
            let l = load(n)?;
            progress.say(format!(
                "{:<12} {n:>9}: filled in {:.2} s",
                l.curve, l.fill_seconds
            ));
            loaded.push(l);
        }
        // Every size once per round, the rounds one after another: a
        // slow spell of the machine touches all sizes alike instead of
        // one point, and the ratio compares like with like. As many
        // rounds as the packet-rate runs repeat (`--runs`, 9), at least
        // CALLS: five still let one slow spell move a curve's end by 15 %.
        let mut samples = vec![(Vec::new(), Vec::new()); loaded.len()];
        let rounds = usize::try_from(plan.runs).map_or(CALLS, |r| r.max(CALLS));
        for _ in 0..rounds {
            for (l, (pass, deny)) in loaded.iter_mut().zip(&mut samples) {
                let (p, d) = l.once(plan.testrun_repeat)?;
                pass.push(p);
                deny.push(d);
            }
        }
        let first = out.len();
        for (l, (mut pass, mut deny)) in loaded.into_iter().zip(samples) {
            let p = ScalingPoint {
                curve: l.curve,
                size: l.size,
                fill_seconds: l.fill_seconds,
                memory_bytes: Some(l.memory_bytes),
                pass_ns: median(&mut pass),
                deny_ns: median(&mut deny),
            };
            progress.say(format!(
                "{:<12} {:>9}: pass {:.1} ns, deny {:.1} ns",
                p.curve, p.size, p.pass_ns, p.deny_ns
            ));
            out.push(p);
        }
        if let Some(g) = Growth::of(&out[first..]) {
            progress.say(format!("{}: {g}", out[first].curve));
        }
    }
    Ok(out)
}

/// The kernel memory of the maps that hold `curve`'s list, by the labels
/// `ztxdp status` reports them under.
fn list_memory(ebpf: &Ebpf, curve: &str) -> anyhow::Result<u64> {
    let labels: &[&str] = match curve {
        "ssh_allow" => &[
            "service_sources_v4_16",
            "service_sources_v4_24",
            "service_sources_v4_32",
        ],
        "ssh_allow_v6" => &["service_sources_v6", "service_sources_v6_trie"],
        _ => &["peer_hosts_v4", "peer_v4"],
    };
    let memory = Tables::from_map_ids(&loader::map_ids(ebpf))
        .context("could not open the filled maps by id")?
        .memory();
    Ok(labels.iter().filter_map(|l| memory.get(l)).sum())
}

/// One point of a curve, loaded and filled, waiting to be timed.
struct Loaded {
    curve: &'static str,
    size: u32,
    fill_seconds: f64,
    memory_bytes: u64,
    ebpf: Ebpf,
    /// The edge program (XDP), else the tunnel program (TC).
    edge: bool,
    pass: Vec<u8>,
    deny: Vec<u8>,
}

impl Loaded {
    /// ns per run of the pass frame and of the deny frame, one call each.
    fn once(&mut self, repeat: u32) -> anyhow::Result<(f64, f64)> {
        if self.edge {
            let prog: &mut Xdp = loader::program_mut(&mut self.ebpf, program::EDGE_NAME)?;
            Ok((
                run_once(prog, &self.pass, repeat)?,
                run_once(prog, &self.deny, repeat)?,
            ))
        } else {
            let prog: &mut SchedClassifier =
                loader::program_mut(&mut self.ebpf, program::TUNNEL_NAME)?;
            Ok((
                run_once(prog, &self.pass, repeat)?,
                run_once(prog, &self.deny, repeat)?,
            ))
        }
    }
}

/// `i`-th of `n` distinct addresses spread over `base`/8: an odd multiplier
/// is a bijection on 24 bits, so the trie is filled all over, not in a
/// dense corner.
fn spread(base: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(base) << 24) | (i.wrapping_mul(0x9E37_79B1) & 0x00ff_ffff))
}

/// The `i`-th of distinct IPv6 source prefixes spread over `2001:db8::/32`
/// as [`spread`] spreads IPv4: the odd multiplier, a bijection on 32 bits,
/// gives every `i` its own /64. Even `i` list one address of theirs (a
/// /128), odd `i` the whole /64, so that both lookups the list needs are
/// exercised and no /128 lies in a listed /64.
fn spread_v6(i: u32) -> Ipv6Net {
    let block = u128::from(i.wrapping_mul(0x9E37_79B1));
    let net = (0x2001_0db8_u128 << 96) | (block << 64);
    if i.is_multiple_of(2) {
        Ipv6Net::new_assert(Ipv6Addr::from(net | block), 128)
    } else {
        Ipv6Net::new_assert(Ipv6Addr::from(net), 64)
    }
}

/// The pass and deny sources of an IPv6 list of `n`: a /128 in the middle,
/// and its neighbour, which shares only that /128's unlisted /64.
fn v6_hit_miss(n: u32) -> (Ipv6Addr, Ipv6Addr) {
    let hit = spread_v6((n / 2) & !1).addr();
    (hit, Ipv6Addr::from(u128::from(hit) ^ 1))
}

fn ssh_point(n: u32) -> anyhow::Result<Loaded> {
    let hit = spread(11, n / 2);
    // The neighbouring address: same path down the trie, then a miss.
    let miss = Ipv4Addr::from(u32::from(hit) ^ 1);
    let syn = Transport::tcp_syn(traffic::SSH_PORT);
    allow_list_point(
        "ssh_allow",
        (0..n)
            .map(|i| IpNet::from(IpAddr::V4(spread(11, i))))
            .collect(),
        traffic::frame(hit, &syn),
        traffic::frame(miss, &syn),
    )
}

fn ssh_v6_point(n: u32) -> anyhow::Result<Loaded> {
    let (hit, miss) = v6_hit_miss(n);
    let syn = Transport::tcp_syn(traffic::SSH_PORT);
    allow_list_point(
        "ssh_allow_v6",
        (0..n).map(|i| IpNet::V6(spread_v6(i))).collect(),
        traffic::frame_v6(hit, &syn),
        traffic::frame_v6(miss, &syn),
    )
}

/// The edge program with `allow` as the SSH allow-list, on an SSH SYN from
/// a listed source (`pass`) and from an unlisted one (`deny`).
fn allow_list_point(
    curve: &'static str,
    allow: Vec<IpNet>,
    pass: Vec<u8>,
    deny: Vec<u8>,
) -> anyhow::Result<Loaded> {
    let size = u32::try_from(allow.len())?;
    let mut policy = policy(&traffic::config_toml(Path::new("/dev/null"), 0))?;
    policy
        .edge
        .as_mut()
        .context("no edge in the generated config")?
        .ssh_allow = allow;
    let start = Instant::now();
    let mut ebpf = fill(&policy, false)?;
    let fill_seconds = start.elapsed().as_secs_f64();
    let prog: &mut Xdp = loader::program_mut(&mut ebpf, program::EDGE_NAME)?;
    // Timing a frame that takes the other path would measure nothing the
    // curve claims, and look just as plausible.
    for (frame, want) in [(&pass, XDP_PASS), (&deny, XDP_DROP)] {
        let got = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN failed")?
            .return_value;
        anyhow::ensure!(
            got == want,
            "{curve} at {size}: XDP action {got} where {want} was expected"
        );
    }
    Ok(Loaded {
        curve,
        size,
        fill_seconds,
        memory_bytes: list_memory(&ebpf, curve)?,
        ebpf,
        edge: true,
        pass,
        deny,
    })
}

/// Peers with one /32 and one grant (tcp/5432) each. Pass: the last peer
/// to 5432; deny: a peer in the middle to 5433, which it is not granted.
fn peer_point(n: u32) -> anyhow::Result<Loaded> {
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
    let ebpf = fill(&policy, true)?;
    let fill_seconds = start.elapsed().as_secs_f64();
    Ok(Loaded {
        curve: "tunnel_peers",
        size: n,
        fill_seconds,
        memory_bytes: list_memory(&ebpf, "tunnel_peers")?,
        ebpf,
        edge: false,
        pass: traffic::frame(pass_src, &Transport::tcp_syn(5432)),
        deny: traffic::frame(deny_src, &Transport::tcp_syn(5433)),
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
        let v6: std::collections::HashSet<Ipv6Net> = (0..10_000).map(spread_v6).collect();
        assert_eq!(v6.len(), 10_000, "spread IPv6 prefixes must be distinct");
        let (hit, miss) = v6_hit_miss(10_000);
        let holds = |a: Ipv6Addr| v6.iter().filter(|p| p.contains(&a)).count();
        assert_eq!(holds(hit), 1, "the pass source is in the list once");
        assert_eq!(holds(miss), 0, "the deny source is in no listed prefix");
        let growth = |pass_ns, deny_ns| {
            Growth::of(&[10, 1_000].map(|size| ScalingPoint {
                curve: "ssh_allow",
                size,
                fill_seconds: 0.0,
                memory_bytes: None,
                pass_ns: if size == 10 { 50.0 } else { pass_ns },
                deny_ns: if size == 10 { 50.0 } else { deny_ns },
            }))
        };
        assert!(growth(57.0, 50.0).is_some_and(|g| g.met()));
        assert!(growth(50.0, 58.0).is_some_and(|g| !g.met()));
    }
}
