//! `xtask vm-guest`: what runs inside a `cargo xtask vmtest` guest. It
//! writes `uname -r` to [`BOOTED`] first, then the outcome to [`RESULT`],
//! both in its output folder, because the host cannot learn the guest's
//! exit status through virtme-ng.
//!
//! The smoke is tier 3 in miniature: the lab's namespaces (inside the VM),
//! `ztxdp up` on the edge, a connect the policy allows and one it drops,
//! `status`, `down`.
use std::{
    fs, io,
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use zt_tests::{
    lab::{self, Lab},
    netns::NetNs,
};

use crate::{
    TestCounts,
    cmd::{self, Progress},
    lab_run::{self, Daemon, SetOnDrop, Up},
};

/// Written first, holding `uname -r`: the guest booted the right kernel
/// and reached user space.
pub const BOOTED: &str = "booted";
/// Written last: `ok` or `failed` on the first line, then the note or error.
pub const RESULT: &str = "result";

const SSH_PORT: u16 = 22;
/// An allowed connect completes in milliseconds; this bounds a slow VM.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// A dropped SYN is retried after a second, so a connect that has not
/// completed by then has lost at least one SYN to the filter.
const DROPPED_AFTER: Duration = Duration::from_secs(3);
/// `down` detaches at once; the daemon notices at its next check.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the smoke and the `tests`, and records the outcome in `out`.
///
/// # Errors
/// Only when the outcome cannot be written; a failing test is an outcome.
pub fn run(out: &Path, ztxdp: &Path, tests: &[PathBuf]) -> anyhow::Result<()> {
    let release = cmd::output(Command::new("uname").arg("-r"))?;
    write(out, BOOTED, release.trim())?;
    let progress = Progress::new(format!("guest {}", release.trim()));
    let outcome = smoke(out, ztxdp, &progress).and_then(|smoke| {
        if tests.is_empty() {
            return Ok(smoke);
        }
        Ok(format!("{smoke}; tier 2: {}", tier2(tests)?))
    });
    let text = match &outcome {
        Ok(note) => format!("ok\n{note}\n"),
        Err(error) => format!("failed\n{error:#}\n"),
    };
    progress.say(text.trim_end());
    write(out, RESULT, &text)
}

/// What the guest wrote to [`RESULT`] in `out`: its note or its error;
/// `None` when it wrote nothing readable.
pub fn read_result(out: &Path) -> Option<Result<String, String>> {
    let text = fs::read_to_string(out.join(RESULT)).ok()?;
    let (verdict, rest) = text.split_once('\n')?;
    let rest = rest.trim().to_owned();
    match verdict {
        "ok" => Some(Ok(rest)),
        "failed" => Some(Err(rest)),
        _ => None,
    }
}

fn write(out: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = out.join(name);
    fs::write(&path, text).with_context(|| format!("could not write {}", path.display()))
}

fn smoke(out: &Path, ztxdp: &Path, progress: &Progress) -> anyhow::Result<String> {
    let start = Instant::now();
    let lab = Lab::create().context("could not build the lab's namespaces in the guest")?;
    let config = out.join("smoke.toml");
    fs::write(
        &config,
        format!(
            "[edge]\ninterface = \"{}\"\nwireguard_ports = [51820]\nssh_port = {SSH_PORT}\n\
             ssh_allow = [\"{}/32\"]\n\n[audit]\npath = \"{}\"\n",
            lab::HOST_INTERFACE,
            lab::BASTION_V4,
            out.join("audit.jsonl").display()
        ),
    )
    .with_context(|| format!("could not write {}", config.display()))?;
    let ssh = lab_run::listen(lab.edge(), SSH_PORT)?;
    let finished = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| lab_run::serve(&ssh, b"SSH-2.0-ztxdp-vm\r\n", &finished));
        // Also on error or panic, or the scope would wait for the listener.
        let _finish = SetOnDrop(&finished);
        let up = Up {
            ztxdp,
            config: &config,
            log: &out.join("ztxdp.log"),
        };
        let mut daemon = Daemon::start(lab.edge(), &up, &AtomicBool::new(false), progress)?;
        progress.say(format!("ztxdp is enforcing after {:.1} s", secs(start)));
        let edge_ssh = SocketAddr::new(IpAddr::V4(lab::EDGE_V4), SSH_PORT);

        connect(lab.bastion(), edge_ssh, CONNECT_TIMEOUT)
            .context("the bastion (in edge.ssh_allow) could not connect to the edge's SSH port")?;
        match connect(lab.outsider(), edge_ssh, DROPPED_AFTER) {
            Err(error) if error.kind() == io::ErrorKind::TimedOut => {}
            Ok(()) => bail!("the outsider connected to the edge's SSH port through the filter"),
            Err(error) => {
                return Err(error).context("the outsider's connect failed other than by a drop");
            }
        }
        progress.say("the bastion connected, the outsider's SYNs were dropped");

        let status = cmd::output(lab.edge().cmd(ztxdp).args(["status", "--json"]))
            .context("`ztxdp status --json` failed in the edge namespace")?;
        let status: serde_json::Value =
            serde_json::from_str(&status).context("`ztxdp status --json` printed no JSON")?;
        for reason in ["ssh_allowed", "ssh_source_not_allowed"] {
            let count = status["edge"]["counters"][reason].as_u64().unwrap_or(0);
            if count == 0 {
                bail!("`status` counted no {reason} packet: {status:#}");
            }
        }

        let removed = cmd::output(lab.edge().cmd(ztxdp).arg("down"))
            .context("`ztxdp down` failed in the edge namespace")?;
        if !removed.contains(lab::HOST_INTERFACE) {
            bail!("`ztxdp down` did not say it removed the program from eth0: {removed}");
        }
        wait_exit(&mut daemon, up.log)?;
        connect(lab.outsider(), edge_ssh, CONNECT_TIMEOUT)
            .context("the outsider could not connect once `down` removed enforcement")?;
        Ok(format!(
            "smoke ({:.1} s): up, allowed and dropped connects, status counted both, \
             down detached and the daemon left",
            secs(start)
        ))
    })
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

/// A TCP connect from inside `host`.
fn connect(host: &NetNs, target: SocketAddr, timeout: Duration) -> io::Result<()> {
    host.enter(|| TcpStream::connect_timeout(&target, timeout).map(drop))
        .map_err(io::Error::other)?
}

/// The daemon leaves once `down` took its programs.
fn wait_exit(daemon: &mut Daemon, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    while !daemon.exited()? {
        if Instant::now() >= deadline {
            bail!(
                "the daemon kept running {} s after `down`; its log:\n{}",
                EXIT_TIMEOUT.as_secs(),
                lab_run::read_log(log)
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Runs each test binary, its output passed through, the counts summed.
fn tier2(tests: &[PathBuf]) -> anyhow::Result<String> {
    let mut counts = TestCounts::default();
    let mut failed = Vec::new();
    for test in tests {
        let status = crate::run_counted(&mut Command::new(test), &mut counts)?;
        if !status.success() {
            failed.push(format!("{} ({status})", test.display()));
        }
    }
    if !failed.is_empty() {
        bail!("{counts}; failed: {}", failed.join(", "));
    }
    counts.note()
}
