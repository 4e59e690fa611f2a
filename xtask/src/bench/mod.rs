//! `cargo xtask bench`: packets per second of ztxdp against no filter,
//! nftables (with and without conntrack), xdp-filter and a bare `XDP_DROP`,
//! in one run, plus `BPF_PROG_TEST_RUN` costs, scaling curves and
//! control-plane figures. `bench/README.md` explains the method and how to
//! read the results.
//!
//! The benchmark links the ztxdp library (for the generator program, the
//! loader and the map tables), whose build needs the BPF toolchain that
//! `cargo xtask` itself installs. So the plain xtask installs and builds,
//! then runs itself again with the `bench` feature, which compiles the
//! modules below.

#[cfg(feature = "bench")]
mod ctlplane;
#[cfg(feature = "bench")]
mod filters;
#[cfg(feature = "bench")]
mod generator;
#[cfg(feature = "bench")]
mod inputs;
#[cfg(feature = "bench")]
mod mpps;
#[cfg(feature = "bench")]
mod plot;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod testrun;
#[cfg(feature = "bench")]
mod topo;
#[cfg(feature = "bench")]
mod traffic;

use std::path::PathBuf;

use clap::ValueEnum;

use crate::{Steps, cmd::ensure_root};

/// What `cargo xtask bench` measures and how long.
#[derive(clap::Args, Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent command-line switches"
)]
pub struct BenchArgs {
    /// A seconds-long run for CI: small counts, one repeat. Checks that every
    /// mode produces nonzero figures and drops and passes what it should;
    /// asserts no speed.
    #[arg(long)]
    pub smoke: bool,
    /// Repeats of every filter, interleaved A B C A B C ... (median, min, max).
    /// Nine by default: on a VM one measurement in five or so lands 10-20 %
    /// low (the host's noise), which a median of five still feels.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Seconds measured per filter and traffic mix.
    #[arg(long, default_value_t = 2.0)]
    pub duration: f64,
    /// Seconds of traffic before each measurement starts.
    #[arg(long, default_value_t = 0.5)]
    pub warmup: f64,
    /// How packets are generated.
    #[arg(long, value_enum, default_value_t = GeneratorKind::XdpLive)]
    pub generator: GeneratorKind,
    /// CPU that runs the generator and, inline, the receiving side (default:
    /// the last CPU).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Filters to measure, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub filters: Vec<FilterKind>,
    /// Traffic mixes to send, comma-separated (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    pub traffic: Vec<TrafficKind>,
    /// Skip the packet-rate runs (only `test_run`, scaling, control plane).
    #[arg(long)]
    pub skip_mpps: bool,
    /// Skip the scaling curves.
    #[arg(long)]
    pub skip_scaling: bool,
    /// Skip the control-plane figures.
    #[arg(long)]
    pub skip_control_plane: bool,
    /// Directory for latest.json, latest.md and the plots (default: bench/results;
    /// with --smoke: target/xtask/bench-smoke).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The latest.json of an earlier run, whose scaling curves scaling.png
    /// draws dashed behind this run's, as "before".
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GeneratorKind {
    /// `BPF_PROG_RUN` with XDP live frames and an `XDP_TX` program (no kernel module needed).
    XdpLive,
    /// The kernel's pktgen module through bench/pktgen.sh (UDP mixes only).
    Pktgen,
}

/// The filters compared, in the order they run within each repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum FilterKind {
    /// The kernel stack, no filter.
    None,
    /// `ztxdp export nft`: the same policy as an nftables input chain.
    Nft,
    /// The same, with `ct state established,related accept` first.
    NftCt,
    /// xdp-filter (xdp-tools), native mode, as close to the policy as it can get.
    XdpFilter,
    /// `ztxdp up`.
    Ztxdp,
    /// A bare `XDP_DROP` program: the limit.
    XdpDrop,
}

/// The traffic mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum TrafficKind {
    /// UDP to a closed port (denied).
    Udp,
    /// TCP SYN to 5432 from a source not on the SSH allow-list (denied).
    Syn,
    /// TCP SYN to 22 from an allow-listed source (passes).
    Ssh,
    /// UDP to the `WireGuard` port 51820 (passes).
    Wg,
    /// SSH SYNs from 262,144 rotating sources against a 100,000-entry allow-list.
    Mix,
}

/// `cargo xtask bench`. Without the `bench` feature: install, build, and run
/// again with it. With it: measure.
pub fn run(steps: &mut Steps, args: &BenchArgs) -> anyhow::Result<()> {
    ensure_root("the benchmark creates network namespaces and loads BPF programs")?;
    #[cfg(not(feature = "bench"))]
    {
        // The relaunched xtask parses the same command line itself.
        let _ = args;
        crate::install_and_build(steps)?;
        steps.run("bench", |_| relaunch())
    }
    #[cfg(feature = "bench")]
    {
        measure(steps, args)
    }
}

/// Runs this same command line again as `cargo run --release -p xtask
/// --features bench`: optimised, as `ztxdp` ships, because the bench times
/// the control plane too (a debug build fills a million sources 2.7 times
/// slower).
#[cfg(not(feature = "bench"))]
fn relaunch() -> anyhow::Result<String> {
    use anyhow::Context as _;
    let mut command = crate::cargo();
    command.args([
        "run",
        "--release",
        "--quiet",
        "--package",
        "xtask",
        "--features",
        "bench",
        "--",
    ]);
    command.args(std::env::args_os().skip(1));
    crate::cmd::run(&mut command).context("the benchmark failed; its output is above")?;
    Ok("done".to_owned())
}

#[cfg(feature = "bench")]
fn measure(steps: &mut Steps, args: &BenchArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;

    let plan = Plan::new(args);
    // A smoke run is no measurement: it must not replace the published results.
    let default_out = if args.smoke {
        crate::target_dir().join("xtask").join("bench-smoke")
    } else {
        crate::workspace_root().join("bench").join("results")
    };
    let out = args.out.clone().unwrap_or(default_out);
    std::fs::create_dir_all(&out).with_context(|| format!("could not create {}", out.display()))?;
    let ztxdp = crate::ztxdp_bin()?;
    let mut report = report::Report::new(&plan);
    // Read now: a wrong path should fail before the minutes of measuring.
    if let Some(path) = &plan.baseline {
        report.baseline = report::baseline(path)?;
    }
    for name in zt_tests::netns::NetNs::remove_stale()
        .context("could not clean up namespaces of earlier runs")?
    {
        println!("xtask: removed namespace {name} left by a killed run");
    }
    let _stats_off = topo::BpfStatsOff::ensure()?;
    steps.run("packet rates", |progress| {
        if plan.skip_mpps {
            return Ok("skipped (--skip-mpps)".to_owned());
        }
        report.mpps = mpps::run(&plan, &ztxdp, progress)?;
        mpps::check(&plan, &report.mpps)
    })?;
    steps.run("test_run", |progress| {
        report.test_run = testrun::programs(&plan, &ztxdp, progress)?;
        Ok(format!("{} programs", report.test_run.len()))
    })?;
    steps.run("scaling", |progress| {
        if plan.skip_scaling {
            return Ok("skipped (--skip-scaling)".to_owned());
        }
        report.scaling = testrun::scaling(&plan, progress)?;
        Ok(format!("{} points", report.scaling.len()))
    })?;
    steps.run("control plane", |progress| {
        if plan.skip_control_plane {
            return Ok("skipped (--skip-control-plane)".to_owned());
        }
        report.control = Some(ctlplane::run(&plan, &ztxdp, progress)?);
        Ok("done".to_owned())
    })?;
    steps.run("report", |progress| report.write(&out, progress))?;
    // Kept after a failure: the daemon logs and configs explain it.
    let _ = std::fs::remove_dir_all(scratch_dir());
    Ok(())
}

/// Configs, audit logs and libxdp's bpffs of this run.
#[cfg(feature = "bench")]
fn scratch_dir() -> PathBuf {
    crate::target_dir()
        .join("xtask")
        .join(format!("bench-{}", std::process::id()))
}

/// Everything the run needs to know, with the `--smoke` reductions applied.
#[cfg(feature = "bench")]
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "mirrors the command-line switches"
)]
pub struct Plan {
    pub smoke: bool,
    pub runs: u32,
    pub duration: std::time::Duration,
    pub warmup: std::time::Duration,
    pub generator: GeneratorKind,
    pub cpu: usize,
    pub filters: Vec<FilterKind>,
    pub traffic: Vec<TrafficKind>,
    /// Entries of the allow-list the `mix` traffic runs against.
    pub mix_allow: u32,
    /// `test_run` repeat count per measurement.
    pub testrun_repeat: u32,
    /// Allow-list sizes of the SSH scaling curves (IPv4 and IPv6).
    pub ssh_sizes: Vec<u32>,
    /// Peer counts of the tunnel scaling curve.
    pub peer_sizes: Vec<u32>,
    pub skip_mpps: bool,
    pub skip_scaling: bool,
    pub skip_control_plane: bool,
    pub baseline: Option<PathBuf>,
}

#[cfg(feature = "bench")]
impl Plan {
    fn new(args: &BenchArgs) -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let all_filters = FilterKind::value_variants().to_vec();
        let all_traffic = TrafficKind::value_variants().to_vec();
        let pick = |v: &[FilterKind]| {
            if v.is_empty() {
                all_filters.clone()
            } else {
                v.to_vec()
            }
        };
        let pick_t = |v: &[TrafficKind]| {
            if v.is_empty() {
                all_traffic.clone()
            } else {
                v.to_vec()
            }
        };
        let mut plan = Self {
            smoke: args.smoke,
            runs: args.runs,
            duration: std::time::Duration::from_secs_f64(args.duration.max(0.1)),
            warmup: std::time::Duration::from_secs_f64(args.warmup.max(0.0)),
            generator: args.generator,
            cpu: args.cpu.unwrap_or(cpus - 1).min(cpus - 1),
            filters: pick(&args.filters),
            traffic: pick_t(&args.traffic),
            mix_allow: 100_000,
            testrun_repeat: 1_000_000,
            ssh_sizes: vec![10, 100, 1_000, 10_000, 100_000, 1_000_000],
            peer_sizes: vec![10, 100, 1_000, 10_000, 65_536],
            skip_mpps: args.skip_mpps,
            skip_scaling: args.skip_scaling,
            skip_control_plane: args.skip_control_plane,
            baseline: args.baseline.clone(),
        };
        if args.smoke {
            plan.runs = 1;
            plan.duration = std::time::Duration::from_millis(300);
            plan.warmup = std::time::Duration::from_millis(100);
            plan.mix_allow = 1_000;
            plan.testrun_repeat = 10_000;
            plan.ssh_sizes = vec![10, 1_000];
            plan.peer_sizes = vec![10, 1_000];
        }
        plan
    }
}
