//! Control-plane figures: how long `ztxdp allow` takes, how long `up` takes
//! to load a large config, how filling the tunnel tables grows with the
//! peer count, what the audit trail keeps up with under a deny flood
//! from many sources, and how long `import-wg` and `check` take on large
//! inputs.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Child,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use zt_tests::netns::NetNs;
use ztxdp::policy::{Grant, Protocol};

use super::{
    Plan,
    filters::{self, Env, quiet},
    generator::LiveGen,
    inputs,
    testrun::{self, median},
    topo::{self, Topology},
    traffic,
};
use crate::cmd::Progress;

/// The control-plane results.
#[derive(Clone, Debug, Default)]
pub struct ControlPlane {
    /// Wall-clock ms of `ip netns exec NS ztxdp allow PEER PORT`, each run.
    pub allow_ms: Vec<f64>,
    /// Wall-clock ms of `ip netns exec NS true`: the part of `allow_ms` that
    /// is not ztxdp.
    pub netns_exec_ms: Vec<f64>,
    /// (allow-list entries, seconds from start of `up` to `ztxdp: ready`).
    pub up_seconds: Vec<(u32, f64)>,
    /// (peers, each with one grant; seconds to fill the tunnel maps).
    pub tunnel_fill_seconds: Vec<(u32, f64)>,
    pub flood: Option<Flood>,
    /// `import-wg` and `check` of large files.
    pub inputs: Vec<inputs::Timing>,
}

/// The audit trail under a deny flood from many sources.
#[derive(Clone, Debug, Default)]
pub struct Flood {
    pub seconds: f64,
    pub packets_denied: u64,
    /// Deny records written to the audit file.
    pub deny_lines: u64,
    /// Rate-limit summary records written.
    pub summary_lines: u64,
    /// Deny events the kernel held back (rate limit), from the counters.
    pub events_suppressed: u64,
    /// Events that did not fit into the ring buffer.
    pub events_lost: u64,
}

impl Flood {
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    pub fn lines_per_second(&self) -> f64 {
        self.deny_lines as f64 / self.seconds.max(1e-9)
    }
}

/// Measures all of it.
///
/// # Errors
/// When the daemon or a command fails.
pub fn run(plan: &Plan, ztxdp: &Path, progress: &Progress) -> anyhow::Result<ControlPlane> {
    let env = Env::new(ztxdp, super::scratch_dir())?;
    let mut out = ControlPlane::default();
    allow_latency(plan, &env, &mut out)?;
    progress.say(format!(
        "ztxdp allow: median {:.1} ms (of which ip netns exec {:.1} ms)",
        median(&mut out.allow_ms.clone()),
        median(&mut out.netns_exec_ms.clone())
    ));
    let sizes = if plan.smoke {
        [0, 10_000]
    } else {
        [0, 100_000]
    };
    for n in sizes {
        let s = up_time(&env, n, if plan.smoke { 1 } else { 3 })?;
        progress.say(format!(
            "ztxdp up with {n} allow-list entries: ready after {s:.2} s"
        ));
        out.up_seconds.push((n, s));
    }
    let peers: &[u32] = if plan.smoke {
        &[100, 400]
    } else {
        &[1_000, 4_000]
    };
    for &n in peers {
        let s = tunnel_fill(n)?;
        progress.say(format!(
            "filling {n} tunnel peers with a grant each: {s:.2} s"
        ));
        out.tunnel_fill_seconds.push((n, s));
    }
    let flood = audit_flood(plan, &env)?;
    progress.say(format!(
        "audit under a many-source deny flood: {:.0} deny records/s written, {} denied packets, {} events suppressed by the rate limit, {} lost",
        flood.lines_per_second(),
        flood.packets_denied,
        flood.events_suppressed,
        flood.events_lost
    ));
    out.flood = Some(flood);
    out.inputs = inputs::run(plan.smoke, &env.ztxdp, &env.dir)?;
    for t in &out.inputs {
        progress.say(format!(
            "{}, {} MB: {:.2} s CPU, {:.2} s wall",
            t.what,
            t.bytes / 1_000_000,
            t.cpu_seconds,
            t.seconds
        ));
    }
    Ok(out)
}

/// ms since `start`.
fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// A namespace with a veth as the tunnel interface (the tunnel program
/// handles devices with an Ethernet header), `ztxdp up` on it, then
/// `ztxdp allow` of a new port, again and again.
fn allow_latency(plan: &Plan, env: &Env, out: &mut ControlPlane) -> anyhow::Result<()> {
    let ns = NetNs::new("bctl").context("could not create a namespace")?;
    ns.ip(&["link", "add", "t0", "type", "veth", "peer", "name", "t1"])?;
    ns.link_up("t0")?;
    ns.link_up("t1")?;
    let config = env.dir.join("tunnel.toml");
    let grants = env.dir.join("grants.json");
    let _ = std::fs::remove_file(&grants);
    std::fs::write(
        &config,
        format!(
            "[tunnel]\ninterface = \"t0\"\nruntime_grants = \"{}\"\n\n[[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\"]\nallow = [\"tcp/5432\"]\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n",
            grants.display(),
            env.dir.join("tunnel-audit.jsonl").display(),
            env.dir.join("tunnel-audit.state").display()
        ),
    )?;
    let daemon = Daemon(filters::start_daemon(
        &ns,
        &env.ztxdp,
        &config,
        &env.dir.join("tunnel.log"),
    )?);
    let count = if plan.smoke { 3 } else { 20 };
    for i in 0..count {
        let start = Instant::now();
        quiet(ns.cmd("true").stdin(std::process::Stdio::null()))?;
        out.netns_exec_ms.push(ms(start));
        let port = (10_000 + i).to_string();
        let start = Instant::now();
        quiet(
            ns.cmd(&env.ztxdp)
                .args(["allow", "app-1", &port, "--config"])
                .arg(&config),
        )
        .context("ztxdp allow failed")?;
        out.allow_ms.push(ms(start));
    }
    // The grants must be in force: `list` reads them back.
    let list = quiet(
        ns.cmd(&env.ztxdp)
            .args(["list", "--json", "--config"])
            .arg(&config),
    )?;
    if !list.contains(&format!("tcp/{}", 10_000 + count - 1)) {
        bail!("after `ztxdp allow`, `ztxdp list` does not show the grant: {list}");
    }
    drop(daemon);
    Ok(())
}

/// Stops a daemon with SIGTERM (it detaches) on drop.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.0.wait();
    }
}

/// Median seconds from starting `ztxdp up` to `ztxdp: ready` with `n`
/// allow-list entries (plus the one SSH source).
fn up_time(env: &Env, n: u32, repeats: usize) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for _ in 0..repeats {
        let topo = Topology::new()?;
        let start = Instant::now();
        let daemon = Daemon(filters::start_ztxdp(&topo, env, n)?);
        times.push(start.elapsed().as_secs_f64());
        drop(daemon);
    }
    Ok(median(&mut times))
}

/// Seconds to load and fill the tunnel tables with `n` peers that each
/// have one grant, as `up` would.
fn tunnel_fill(n: u32) -> anyhow::Result<f64> {
    let mut policy = testrun::policy(testrun::TUNNEL_TOML)?;
    let tunnel = policy
        .tunnel
        .as_mut()
        .context("no tunnel in the generated config")?;
    let template = tunnel.peers.first().cloned().context("no peer")?;
    tunnel.peers = (0..n)
        .map(|i| {
            let mut p = template.clone();
            p.name = format!("p{i}");
            p.addresses = vec![ipnet::IpNet::from(IpAddr::V4(Ipv4Addr::from(
                0x0AC8_0000 + i,
            )))];
            p.grants = vec![Grant::Ports {
                protocol: Protocol::Tcp,
                first: 5432,
                last: 5432,
            }];
            p
        })
        .collect();
    let start = Instant::now();
    let _ebpf = testrun::fill(&policy, true)?;
    Ok(start.elapsed().as_secs_f64())
}

/// UDP to a closed port from 262,144 rotating sources at full rate, with
/// `ztxdp up` writing the audit trail.
fn audit_flood(plan: &Plan, env: &Env) -> anyhow::Result<Flood> {
    let topo = Topology::new()?;
    let audit = env.dir.join("flood-audit.jsonl");
    let _ = std::fs::remove_file(&audit);
    let config = env.dir.join("flood.toml");
    std::fs::write(&config, traffic::config_toml(&audit, 0))?;
    let daemon = Daemon(filters::start_daemon(
        &topo.dut,
        &env.ztxdp,
        &config,
        &env.dir.join("flood.log"),
    )?);
    let before = edge_counters(&topo, env)?;
    let lines_before = audit_lines(&audit);
    let frame = traffic::frame(
        traffic::MIX_BASE,
        &zt_tests::packet::Transport::Udp {
            src: 40_000,
            dst: 9_999,
        },
    );
    let generator = LiveGen::load(Some((traffic::MIX_BASE, traffic::MIX_SOURCES)))?;
    let seconds = if plan.smoke { 1.0 } else { 5.0 };
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let (tx, _rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| generator.send(&topo.src, topo::GEN_IF, &frame, plan.cpu, until, &tx))
            .join()
    })
    .map_err(|_| anyhow::anyhow!("the generator thread panicked"))??;
    // The writer drains the ring buffer and flushes; give it a moment.
    thread::sleep(Duration::from_millis(1500));
    let after = edge_counters(&topo, env)?;
    let lines = audit_lines(&audit);
    drop(daemon);
    let delta = |k: &str| {
        after
            .get(k)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(k).copied().unwrap_or(0))
    };
    Ok(Flood {
        seconds,
        packets_denied: delta("port_not_allowed"),
        deny_lines: lines.0.saturating_sub(lines_before.0),
        summary_lines: lines.1.saturating_sub(lines_before.1),
        events_suppressed: delta("events_suppressed"),
        events_lost: delta("events_lost"),
    })
}

fn edge_counters(
    topo: &Topology,
    env: &Env,
) -> anyhow::Result<std::collections::BTreeMap<String, u64>> {
    let json = quiet(topo.dut.cmd(&env.ztxdp).args(["status", "--json"]))?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let counters = v
        .pointer("/edge/counters")
        .and_then(|c| c.as_object())
        .context("no edge counters in status")?;
    Ok(counters
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
        .collect())
}

/// (deny records, summary records) in the audit file.
fn audit_lines(path: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut deny = 0;
    let mut summary = 0;
    for line in text.lines() {
        if line.contains("\"action\":\"deny\"") {
            deny += 1;
        } else if line.contains("\"action\":\"suppressed\"") {
            summary += 1;
        }
    }
    (deny, summary)
}
