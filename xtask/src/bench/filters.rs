//! The filters under test, attached to d0 in the DUT namespace, each with
//! the drop counter it keeps itself.
//!
//! Every filter enforces the same policy (`traffic::config_toml`): UDP 51820
//! from anywhere, TCP 22 from the allow-list, everything else dropped.
//! - nftables gets it from `ztxdp export nft`, in an `inet` input chain, with
//!   and without `ct state established,related accept` first;
//! - xdp-filter cannot combine a port with a source address: it is loaded
//!   with policy deny and rules "UDP port 51820" and "source 10.99.0.50",
//!   so it passes all of that source's traffic, not only SSH. Its IPv4 map
//!   holds 10,000 addresses, so it cannot run the 100,000-source mix;
//! - ztxdp runs as `ztxdp up` until it prints `ztxdp: ready`;
//! - the bare drop is `zt_bench_drop`, attached in native mode.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::{Ebpf, programs::XdpMode};
use zt_common::reason;

use super::{FilterKind, generator, topo, topo::Topology, traffic};

/// How long `ztxdp up` may take to print `ztxdp: ready` (a 100,000-entry
/// allow-list takes well under this).
const READY_TIMEOUT: Duration = Duration::from_mins(2);

/// What the filters need from outside: the ztxdp binary, a scratch
/// directory for configs and audit logs, and the bpffs libxdp pins to.
pub struct Env {
    pub ztxdp: PathBuf,
    pub dir: PathBuf,
    bpffs: Bpffs,
}

impl Env {
    /// # Errors
    /// When the scratch directory or the bpffs mount cannot be made.
    pub fn new(ztxdp: &Path, dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
        let bpffs = Bpffs::mount(&dir.join("bpffs"))?;
        Ok(Self {
            ztxdp: ztxdp.to_owned(),
            dir,
            bpffs,
        })
    }

    /// The config file for a policy with `mix_allow` mix sources (written once).
    pub fn config(&self, mix_allow: u32) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!("ztxdp-{mix_allow}.toml"));
        if !path.exists() {
            let audit = self.dir.join("audit.jsonl");
            std::fs::write(&path, traffic::config_toml(&audit, mix_allow))
                .with_context(|| format!("could not write {}", path.display()))?;
        }
        Ok(path)
    }

    /// `ztxdp export nft [--conntrack]` of that config (written once).
    fn nft_ruleset(&self, mix_allow: u32, conntrack: bool) -> anyhow::Result<PathBuf> {
        let path = self.dir.join(format!(
            "ztxdp-{mix_allow}{}.nft",
            if conntrack { "-ct" } else { "" }
        ));
        if !path.exists() {
            let mut command = Command::new(&self.ztxdp);
            command
                .args(["export", "nft", "--config"])
                .arg(self.config(mix_allow)?);
            if conntrack {
                command.arg("--conntrack");
            }
            let text = quiet(&mut command)?;
            std::fs::write(&path, text)
                .with_context(|| format!("could not write {}", path.display()))?;
        }
        Ok(path)
    }

    fn xdp_filter(&self, ns: &zt_tests::netns::NetNs, args: &[&str]) -> Command {
        let mut command = ns.cmd("xdp-filter");
        command.args(args).env("LIBXDP_BPFFS", &self.bpffs.path);
        command
    }
}

/// A filter attached in the DUT namespace; detached on drop (the namespace
/// going away would detach it too, but a daemon must be stopped and libxdp's
/// pins removed).
pub struct Attached<'t> {
    pub kind: FilterKind,
    topo: &'t Topology,
    env: &'t Env,
    daemon: Option<Child>,
    /// Keeps the bare-drop program attached while it lives.
    drop_prog: Option<Ebpf>,
}

impl<'t> Attached<'t> {
    /// Attaches `kind` with the policy for `mix_allow` mix sources, or
    /// returns `None` when the filter cannot express that policy.
    ///
    /// # Errors
    /// When attaching fails.
    pub fn attach(
        kind: FilterKind,
        topo: &'t Topology,
        env: &'t Env,
        mix_allow: u32,
    ) -> anyhow::Result<Option<Self>> {
        let mut a = Self {
            kind,
            topo,
            env,
            daemon: None,
            drop_prog: None,
        };
        match kind {
            FilterKind::None => {}
            FilterKind::Nft | FilterKind::NftCt => {
                let ruleset = env.nft_ruleset(mix_allow, kind == FilterKind::NftCt)?;
                quiet(topo.dut.cmd("nft").arg("-f").arg(&ruleset))
                    .context("nft refused the exported ruleset")?;
            }
            FilterKind::XdpFilter => {
                // Its IPv4 map holds 10,000 addresses, and each takes one
                // `xdp-filter ip` run: the mix's allow-list is out of reach.
                if mix_allow > 0 {
                    return Ok(None);
                }
                quiet(&mut env.xdp_filter(
                    &topo.dut,
                    &[
                        "load",
                        topo::DUT_IF,
                        "-m",
                        "native",
                        "-p",
                        "deny",
                        "-f",
                        "tcp,udp,ipv4",
                    ],
                ))
                .context("xdp-filter load failed (xdp-tools installed?)")?;
                let port = traffic::WIREGUARD_PORT.to_string();
                quiet(&mut env.xdp_filter(&topo.dut, &["port", &port, "-p", "udp", "-m", "dst"]))?;
                let source = topo::SSH_ALLOWED.to_string();
                quiet(&mut env.xdp_filter(&topo.dut, &["ip", &source, "-m", "src"]))?;
            }
            FilterKind::Ztxdp => a.daemon = Some(start_ztxdp(topo, env, mix_allow)?),
            FilterKind::XdpDrop => {
                let mut ebpf = Ebpf::load(ztxdp::BENCH_OBJECT)
                    .context("could not load the benchmark BPF object")?;
                let prog = generator::xdp_mut(&mut ebpf, generator::DROP_PROGRAM)?;
                prog.load()
                    .context("the kernel refused the bare drop program")?;
                topo.dut
                    .enter(|| prog.attach(topo::DUT_IF, XdpMode::Driver))
                    .context("could not enter the DUT namespace")?
                    .context("could not attach the bare drop program to d0 in native mode")?;
                a.drop_prog = Some(ebpf);
            }
        }
        Ok(Some(a))
    }

    /// The filter's own count of dropped packets so far, if it keeps one.
    ///
    /// # Errors
    /// When the counter cannot be read.
    pub fn drops(&self) -> anyhow::Result<Option<u64>> {
        let dut = &self.topo.dut;
        Ok(Some(match self.kind {
            FilterKind::None => return Ok(None),
            FilterKind::Nft | FilterKind::NftCt => {
                let json = quiet(dut.cmd("nft").args([
                    "-j",
                    "list",
                    "counter",
                    "inet",
                    ztxdp::export::TABLE,
                    ztxdp::export::EDGE_DROP_COUNTER,
                ]))?;
                nft_counter_packets(&json).context("no packet count in `nft -j list counter`")?
            }
            FilterKind::XdpFilter => {
                let text = quiet(&mut self.env.xdp_filter(dut, &["status"]))?;
                xdp_filter_drops(&text).context("no XDP_DROP line in `xdp-filter status`")?
            }
            FilterKind::Ztxdp => {
                let json = quiet(dut.cmd(&self.env.ztxdp).args(["status", "--json"]))?;
                ztxdp_drops(&json).context("no edge counters in `ztxdp status --json`")?
            }
            FilterKind::XdpDrop => {
                let text = quiet(dut.cmd("ethtool").args(["-S", topo::DUT_IF]))?;
                veth_xdp_drops(&text).context("no rx_queue_*_xdp_drops in `ethtool -S d0`")?
            }
        }))
    }

    /// The id of the XDP program on d0, for `bpftool prog run`.
    pub fn xdp_prog_id(&self) -> anyhow::Result<u32> {
        let json = quiet(Command::new("ip").args([
            "-n",
            self.topo.dut.name(),
            "-j",
            "link",
            "show",
            topo::DUT_IF,
        ]))?;
        xdp_prog_id(&json).context("no XDP program on d0")
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            // SIGTERM: the daemon detaches what it attached and exits.
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
        if self.kind == FilterKind::XdpFilter {
            let _ = quiet(
                &mut self
                    .env
                    .xdp_filter(&self.topo.dut, &["unload", topo::DUT_IF, "--all"]),
            );
        }
    }
}

/// `ztxdp up` in the DUT namespace, once it has printed `ztxdp: ready`.
pub fn start_ztxdp(topo: &Topology, env: &Env, mix_allow: u32) -> anyhow::Result<Child> {
    let config = env.config(mix_allow)?;
    start_daemon(&topo.dut, &env.ztxdp, &config, &env.dir.join("ztxdp.log"))
}

/// `ztxdp up --config CONFIG` in `ns`, returned once it is ready; its
/// stderr goes to `log`.
pub fn start_daemon(
    ns: &zt_tests::netns::NetNs,
    ztxdp: &Path,
    config: &Path,
    log: &Path,
) -> anyhow::Result<Child> {
    let log_file = std::fs::File::create(log)
        .with_context(|| format!("could not create {}", log.display()))?;
    let mut child = ns
        .cmd(ztxdp)
        .args(["up", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .context("could not start ztxdp up")?;
    let stdout = child.stdout.take().context("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.trim() == "ztxdp: ready" {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(READY_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        let tail = std::fs::read_to_string(log).unwrap_or_default();
        bail!("ztxdp up did not print `ztxdp: ready` within {READY_TIMEOUT:?}; its log:\n{tail}");
    }
    Ok(child)
}

/// Runs a command, returns stdout, fails with its stderr. Not echoed: the
/// benchmark runs hundreds of these between measurements.
pub fn quiet(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", crate::cmd::show(command)))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            crate::cmd::show(command),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A bpffs for libxdp's pins: `ip netns exec` remounts /sys, so the usual
/// /sys/fs/bpf is not there inside the namespace. Unmounted on drop, which
/// also frees whatever was left pinned.
struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    fn mount(path: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(path)?;
        // A mount left by a killed run is reused.
        let mounted = std::fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
            m.lines()
                .any(|l| l.split_whitespace().nth(1) == path.to_str())
        });
        if !mounted {
            quiet(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(path))
                .context("could not mount a bpffs for xdp-filter")?;
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = quiet(Command::new("umount").arg(&self.path));
    }
}

fn nft_counter_packets(json: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    v.get("nftables")?
        .as_array()?
        .iter()
        .find_map(|o| o.get("counter")?.get("packets")?.as_u64())
}

/// `XDP_DROP            123 pkts           7890 KiB`
fn xdp_filter_drops(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == "XDP_DROP").then(|| w.next()?.parse().ok())?
    })
}

/// Sum of the edge program's deny counters.
fn ztxdp_drops(json: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let counters = v.get("edge")?.get("counters")?.as_object()?;
    Some(
        reason::ALL
            .iter()
            .filter(|c| !reason::is_allow(**c))
            .filter_map(|c| counters.get(reason::name(*c))?.as_u64())
            .sum(),
    )
}

/// Sum of veth's per-queue XDP drop counters.
fn veth_xdp_drops(text: &str) -> Option<u64> {
    let mut found = false;
    let mut sum = 0;
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.starts_with("rx_queue_") && name.ends_with("_xdp_drops") {
            found = true;
            sum += value.trim().parse::<u64>().ok()?;
        }
    }
    found.then_some(sum)
}

fn xdp_prog_id(json: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let xdp = v.as_array()?.first()?.get("xdp")?;
    let id = xdp.get("prog").and_then(|p| p.get("id")).or_else(|| {
        xdp.get("attached")?
            .as_array()?
            .iter()
            .find_map(|a| a.get("prog")?.get("id"))
    })?;
    u32::try_from(id.as_u64()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_parsers_read_each_tool() {
        let nft = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "edge_drop", "table": "ztxdp", "handle": 1, "packets": 42, "bytes": 2520}}]}"#;
        assert_eq!(nft_counter_packets(nft), Some(42), "nft");
        let xf = "Loaded on interfaces:\n  d0  native\n\n  XDP_ABORTED   0 pkts   0 KiB\n  XDP_DROP   123 pkts   7 KiB\n  XDP_PASS  5 pkts 0 KiB\n";
        assert_eq!(xdp_filter_drops(xf), Some(123), "xdp-filter");
        let zt = r#"{"edge": {"counters": {"wireguard": 5, "port_not_allowed": 10, "ssh_source_not_allowed": 2, "events_suppressed": 99}}}"#;
        assert_eq!(ztxdp_drops(zt), Some(12), "ztxdp: deny reasons only");
        let eth = "NIC statistics:\n     peer_ifindex: 7\n     rx_queue_0_xdp_drops: 100\n     rx_queue_1_xdp_drops: 5\n";
        assert_eq!(veth_xdp_drops(eth), Some(105), "veth");
        let ip = r#"[{"ifindex": 2, "ifname": "d0", "xdp": {"mode": 1, "prog": {"id": 77}}}]"#;
        assert_eq!(xdp_prog_id(ip), Some(77), "ip link xdp prog");
    }
}
