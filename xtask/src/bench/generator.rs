//! Traffic generators and CPU accounting.
//!
//! The default generator is `zt_bench_tx` (zt-ebpf/src/bin/bench.rs) run by
//! `BPF_PROG_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`: the kernel builds real
//! frames from a template, runs the program on each, and transmits the ones
//! it returns `XDP_TX` for out of g0, 256 at a time. The veth hands them to
//! d0's NAPI, which on this path runs in softirq on the same CPU right after
//! each batch ("inline"): one core does generator plus receiver, so
//! Mpps = 1 / (generator ns + DUT ns), and since the generator's share is
//! the same for every filter, differences in ns/packet are the filters' own.
//!
//! CPU time comes from schedstat (ns on CPU) of the generator thread and of
//! the ksoftirqd thread of its CPU, which picks up softirq work deferred
//! under load.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, TestRun as _, TestRunAttrs, TestRunOptions, Xdp},
};
use zt_tests::netns::NetNs;

use super::topo;

pub const TX_PROGRAM: &str = "zt_bench_tx";
pub const DROP_PROGRAM: &str = "zt_bench_drop";
/// Frames per `BPF_PROG_RUN` batch: the kernel's maximum.
const BATCH: u32 = 256;
/// Every `BPF_PROG_RUN` call pays two RCU grace periods (milliseconds), so
/// calls are sized to last about this long.
const CALL_TARGET: Duration = Duration::from_millis(500);
const FIRST_CALL: u32 = 1 << 16;

/// The generator program, loaded and ready to run.
pub struct LiveGen {
    ebpf: Ebpf,
}

/// What one generator run did.
#[derive(Clone, Copy, Debug)]
pub struct Sent {
    pub packets: u64,
    pub elapsed: Duration,
}

impl LiveGen {
    /// Loads `zt_bench_tx`; with `sources`, every frame gets the next of
    /// `count` source addresses starting at `first`.
    ///
    /// # Errors
    /// When the kernel refuses the program.
    pub fn load(sources: Option<(Ipv4Addr, u32)>) -> anyhow::Result<Self> {
        let (first, count) = sources.map_or((0, 0), |(a, n)| (u32::from(a), n));
        let mut ebpf = EbpfLoader::new()
            .override_global("SRC_COUNT", &count, true)
            .override_global("SRC_BASE", &first, true)
            .load(ztxdp::BENCH_OBJECT)
            .context("could not load the benchmark BPF object")?;
        let prog = xdp_mut(&mut ebpf, TX_PROGRAM)?;
        prog.load()
            .context("the kernel refused the generator program")?;
        Ok(Self { ebpf })
    }

    /// Sends `frame` out of `interface` in namespace `ns` until `until`, from
    /// a thread pinned to `cpu` that reports its thread id on `tid` first.
    ///
    /// # Errors
    /// When the namespace cannot be entered or `BPF_PROG_RUN` fails.
    pub fn send(
        &self,
        ns: &NetNs,
        interface: &str,
        frame: &[u8],
        cpu: usize,
        until: Instant,
        tid: &mpsc::Sender<libc::pid_t>,
    ) -> anyhow::Result<Sent> {
        let prog: &Xdp = self
            .ebpf
            .program(TX_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .context("the generator program is missing from the object")?;
        ns.enter(|| {
            pin_to_cpu(cpu)?;
            // SAFETY: gettid has no preconditions.
            let _ = tid.send(unsafe { libc::gettid() });
            let ifindex = if_index(interface)?;
            let ctx = xdp_md(frame.len(), ifindex);
            let start = Instant::now();
            let mut packets = 0u64;
            let mut repeat = FIRST_CALL;
            loop {
                let call = Instant::now();
                let opts = TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..TestRunOptions::default()
                };
                prog.test_run(opts).map_err(|e| live_frames_error(&e))?;
                packets += u64::from(repeat);
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let rate = f64::from(repeat) / now.duration_since(call).as_secs_f64().max(1e-6);
                let left = until.duration_since(now).min(CALL_TARGET).as_secs_f64();
                repeat = clamp_u32(rate * left).max(BATCH);
            }
            Ok(Sent {
                packets,
                elapsed: start.elapsed(),
            })
        })
        .context("could not enter the generator namespace")?
    }
}

fn live_frames_error(e: &ProgramError) -> anyhow::Error {
    anyhow::anyhow!(
        "BPF_PROG_RUN with XDP live frames failed ({e}); it needs Linux 5.18 or newer and a receiving \
         side that accepts XDP frames (GRO on, or an XDP program)"
    )
}

/// A typed handle on one of `ebpf`'s XDP programs.
pub fn xdp_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .with_context(|| format!("no XDP program {name} in the benchmark object"))
}

/// The 24-byte `struct xdp_md` a live-frames run takes as context: `data`
/// 0, `data_end` the frame length, `ingress_ifindex` the interface the
/// frames appear on and leave from.
fn xdp_md(len: usize, ifindex: u32) -> [u8; 24] {
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

fn clamp_u32(x: f64) -> u32 {
    if x >= f64::from(u32::MAX) {
        u32::MAX
    } else if x > 0.0 {
        // In range: checked just above.
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "range checked"
        )]
        let v = x as u32;
        v
    } else {
        0
    }
}

/// The index of `interface` in the calling thread's namespace.
pub fn if_index(interface: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(interface)?;
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {interface} in this namespace");
    }
    Ok(index)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above; cpu is below CPU_SETSIZE on any machine we run on.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) } != 0 {
        bail!(
            "could not pin the generator to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Threads whose CPU time is the cost of the packets: schedstat paths.
#[derive(Clone, Debug)]
pub struct CpuAccount {
    paths: Vec<PathBuf>,
}

impl CpuAccount {
    /// The generator thread `tid` of this process, and ksoftirqd of `cpu`.
    pub fn live(tid: libc::pid_t, cpu: usize) -> anyhow::Result<Self> {
        let own = PathBuf::from(format!("/proc/{}/task/{tid}/schedstat", std::process::id()));
        Ok(Self {
            paths: vec![own, schedstat_of(&format!("ksoftirqd/{cpu}"))?],
        })
    }

    /// The pktgen kernel thread of `cpu`, and ksoftirqd of `cpu`.
    pub fn pktgen(cpu: usize) -> anyhow::Result<Self> {
        Ok(Self {
            paths: vec![
                schedstat_of(&format!("kpktgend_{cpu}"))?,
                schedstat_of(&format!("ksoftirqd/{cpu}"))?,
            ],
        })
    }

    /// Nanoseconds on CPU so far, summed over the threads.
    pub fn ns(&self) -> u64 {
        self.paths
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }
}

/// schedstat of the (kernel) thread named `comm`.
fn schedstat_of(comm: &str) -> anyhow::Result<PathBuf> {
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let path = entry.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == comm) {
            return Ok(path.join("schedstat"));
        }
    }
    bail!("no thread {comm} (is schedstat available? CONFIG_SCHEDSTATS)")
}

/// `bench/pktgen.sh` driven from the generator namespace.
pub struct Pktgen {
    script: PathBuf,
}

impl Pktgen {
    /// Checks that the kernel has pktgen (loading the module if needed).
    ///
    /// # Errors
    /// When there is no pktgen: the message says what to use instead.
    pub fn open(workspace: &Path) -> anyhow::Result<Self> {
        let script = workspace.join("bench").join("pktgen.sh");
        let loaded = Path::new("/proc/net/pktgen").exists()
            || Command::new("modprobe")
                .arg("pktgen")
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if !loaded {
            bail!(
                "--generator pktgen: this kernel has no pktgen module (modprobe pktgen failed). Use the default \
                 --generator xdp-live, or run on a host whose kernel ships pktgen (CONFIG_NET_PKTGEN)"
            );
        }
        Ok(Self { script })
    }

    /// Runs the script in `ns` for `duration`, sending `frame`'s addresses
    /// and ports (UDP only) from `cpu`.
    ///
    /// # Errors
    /// When the script fails.
    pub fn send(
        &self,
        ns: &NetNs,
        frame: &[u8],
        cpu: usize,
        duration: Duration,
        sources: Option<(Ipv4Addr, u32)>,
    ) -> anyhow::Result<Sent> {
        let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
        let dport = u16::from_be_bytes([frame[36], frame[37]]);
        let mut command = ns.cmd(&self.script);
        command.args([
            "-i",
            topo::GEN_IF,
            "-m",
            &topo::mac(topo::DUT_MAC),
            "-d",
            &topo::DUT_IP.to_string(),
        ]);
        command.args([
            "-p",
            &dport.to_string(),
            "-c",
            &cpu.to_string(),
            "-t",
            &format!("{:.3}", duration.as_secs_f64()),
        ]);
        match sources {
            Some((first, count)) => {
                let last = Ipv4Addr::from(u32::from(first) + count - 1);
                command.args(["-s", &format!("{first}-{last}")]);
            }
            None => {
                command.args(["-s", &src.to_string()]);
            }
        }
        let start = Instant::now();
        let out = command
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("could not run {}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                self.script.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // The script prints `sent=N` last.
        let text = String::from_utf8_lossy(&out.stdout);
        let packets = text
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("sent="))
            .next_back()
            .and_then(|n| n.parse().ok())
            .context("bench/pktgen.sh printed no sent=N")?;
        Ok(Sent {
            packets,
            elapsed: start.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_md_carries_length_and_ifindex() {
        let ctx = xdp_md(60, 7);
        assert_eq!(
            u32::from_ne_bytes([ctx[4], ctx[5], ctx[6], ctx[7]]),
            60,
            "data_end"
        );
        assert_eq!(
            u32::from_ne_bytes([ctx[12], ctx[13], ctx[14], ctx[15]]),
            7,
            "ingress_ifindex"
        );
        assert_eq!(&ctx[0..4], &[0; 4], "data");
    }

    #[test]
    fn clamp_u32_saturates() {
        assert_eq!(clamp_u32(-1.0), 0);
        assert_eq!(clamp_u32(1e12), u32::MAX);
        assert_eq!(clamp_u32(1234.7), 1234);
    }
}
