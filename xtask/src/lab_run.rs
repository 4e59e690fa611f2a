//! `cargo xtask run`: ztxdp in a throw-away lab of network namespaces, with a
//! little traffic of every kind and its decisions printed live.
//!
//! Safe on a laptop: the daemon, wireguard-go, the listeners and every
//! packet stay inside namespaces created here, and dropping the [`Lab`]
//! removes them (wireguard-go and its control socket first), also on error,
//! panic or Ctrl-C.
use std::{
    fs::{self, File},
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc::{self, RecvTimeoutError},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use zt_tests::{
    lab::{self, Lab, Tunnel},
    netns::NetNs,
};

use crate::{
    audit_view,
    cmd::{Progress, echo, show},
};

/// Only bounds a daemon that never gets ready: loading takes a second here,
/// and tens of seconds in a VM without KVM (`cargo xtask vmtest`).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Dropped packets surface as connect timeouts; keep them short.
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
const ROUND: Duration = Duration::from_secs(1);
/// Without `--duration` the run lasts until Ctrl-C, but never longer.
const MAX_DURATION: Duration = Duration::from_hours(1);
const SSH_PORT: u16 = 22;
/// Closed on the edge's eth0; inside the tunnel granted to app-1 only.
const POSTGRES_PORT: u16 = 5432;
const WIREGUARD_PORT: u16 = 51820;

/// `ztxdp up ARGS...` in this process's place, for real: the binary's own
/// checks (lockout protection) apply.
pub fn exec_up(ztxdp: &Path, args: &[String]) -> anyhow::Error {
    let mut command = Command::new(ztxdp);
    command.arg("up").args(args);
    echo(&command);
    let error = command.exec();
    anyhow!(error).context(format!("could not execute `{}`", show(&command)))
}

pub fn lab(
    ztxdp: &Path,
    run_dir: &Path,
    duration: Option<Duration>,
    progress: &Progress,
) -> anyhow::Result<String> {
    let stop = stop_on_signal()?;
    for name in NetNs::remove_stale().context("could not clean up namespaces of earlier runs")? {
        progress.say(format!("removed namespace {name} left by a killed run"));
    }
    fs::create_dir_all(run_dir)
        .with_context(|| format!("could not create {}", run_dir.display()))?;

    // Dropping the lab stops every wireguard-go (removing its control
    // socket), then deletes the namespaces: on success, error or Ctrl-C.
    let lab = Lab::create_with_tunnel().context(
        "could not build the lab namespaces and its WireGuard tunnel \
         (iproute2, ethtool, wireguard-go and wireguard-tools are needed)",
    )?;
    let tunnel = lab
        .tunnel()
        .ok_or_else(|| anyhow!("the lab was built without its tunnel"))?;
    describe_lab(&lab, tunnel, progress);
    let (config, audit) = write_config(run_dir, tunnel)?;
    let ssh = listen(lab.edge(), SSH_PORT)?;
    let postgres = listen(lab.edge(), POSTGRES_PORT)?;

    let finished = AtomicBool::new(false);
    let outcome = thread::scope(|scope| {
        scope.spawn(|| serve(&ssh, b"SSH-2.0-ztxdp-lab\r\n", &finished));
        scope.spawn(|| serve(&postgres, b"ztxdp lab: port 5432\r\n", &finished));
        // Also on panic, or the scope would wait for the listener forever.
        let _finish = SetOnDrop(&finished);
        let settings = Settings {
            ztxdp,
            config: &config,
            audit: &audit,
            log: &run_dir.join("ztxdp.log"),
            duration: duration.unwrap_or(MAX_DURATION).min(MAX_DURATION),
        };
        drive(&lab, tunnel, &settings, &stop, progress)
    });
    drop(lab);
    progress.say("wireguard-go stopped, lab namespaces removed");
    outcome
}

/// A non-blocking listener on `port` in `ns`, both families.
pub fn listen(ns: &NetNs, port: u16) -> anyhow::Result<TcpListener> {
    let listener = ns
        .enter(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)))
        .with_context(|| format!("could not enter namespace {}", ns.name()))?
        .with_context(|| format!("could not listen on TCP port {port} in {}", ns.name()))?;
    listener
        .set_nonblocking(true)
        .with_context(|| format!("could not make the listener on port {port} non-blocking"))?;
    Ok(listener)
}

struct Settings<'a> {
    ztxdp: &'a Path,
    config: &'a Path,
    audit: &'a Path,
    log: &'a Path,
    duration: Duration,
}

fn drive(
    lab: &Lab,
    tunnel: &Tunnel,
    settings: &Settings,
    stop: &AtomicBool,
    progress: &Progress,
) -> anyhow::Result<String> {
    let mut daemon = Daemon::start(
        lab.edge(),
        &Up {
            ztxdp: settings.ztxdp,
            config: settings.config,
            log: settings.log,
        },
        stop,
        progress,
    )?;
    progress.say(format!(
        "ztxdp is enforcing on the edge's eth0 and {}; sending traffic every second {}",
        tunnel.edge_device().name(),
        if settings.duration < MAX_DURATION {
            format!("for {} s", settings.duration.as_secs())
        } else {
            "until Ctrl-C".to_owned()
        }
    ));
    // Only now, so the handshakes meet the edge's XDP program.
    tunnel.handshake().context(
        "the app peers completed no WireGuard handshake with the edge; \
         is the edge filter dropping UDP 51820 (see edge.wireguard_ports)?",
    )?;
    progress.say("app-1 and app-2 completed WireGuard handshakes through the edge's filter");
    let mut tail = AuditTail::new(settings.audit);
    let started = Instant::now();
    let mut rounds = 0_u64;
    let mut decisions = 0_usize;
    while !stop.load(Ordering::SeqCst) && started.elapsed() < settings.duration {
        rounds += 1;
        let round_start = Instant::now();
        let results = send_traffic(lab, tunnel);
        progress.say(format!("traffic round {rounds}: {}", results.join("; ")));
        // Decisions as they arrive, until the next round is due.
        while round_start.elapsed() < ROUND && !stop.load(Ordering::SeqCst) {
            decisions += tail.print_new()?;
            thread::sleep(Duration::from_millis(100));
        }
        if daemon.exited()? {
            bail!(
                "ztxdp exited during the run; its log:\n{}",
                read_log(settings.log)
            );
        }
    }
    // The last events reach the file a moment after their packets.
    thread::sleep(Duration::from_millis(300));
    decisions += tail.print_new()?;

    let report = crate::cmd::output(lab.edge().cmd(settings.ztxdp).arg("status"))
        .context("`ztxdp status` failed in the edge namespace")?;
    progress.say("ztxdp status before stopping:");
    for line in report.lines() {
        println!("    {line}");
    }
    let exit = daemon.stop()?;
    if !exit.success() {
        bail!(
            "ztxdp exited with {exit} on SIGTERM; its log:\n{}",
            read_log(settings.log)
        );
    }
    Ok(format!(
        "{rounds} traffic rounds, {decisions} audited decisions, ztxdp stopped cleanly (log: {})",
        settings.log.display()
    ))
}

/// Sets a flag on SIGINT or SIGTERM instead of dying, so the lab is torn
/// down. Later signals are ignored: every remaining step is bounded in time.
fn stop_on_signal() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("could not start the signal-handling runtime")?;
    let (mut interrupt, mut terminate) = {
        let _context = runtime.enter();
        (
            signal(SignalKind::interrupt()).context("could not handle SIGINT")?,
            signal(SignalKind::terminate()).context("could not handle SIGTERM")?,
        )
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                loop {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                    if flag.swap(true, Ordering::SeqCst) {
                        println!("xtask: already stopping; the lab is being removed");
                    } else {
                        println!("xtask: stopping ...");
                    }
                }
            });
        })
        .context("could not start the signal thread")?;
    Ok(stop)
}

pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// examples/lab.toml with what only the run knows filled in: the edge's
/// `WireGuard` device, each app peer's public key, and files in the run's
/// directory for the audit log and the runtime grants.
fn write_config(run_dir: &Path, tunnel: &Tunnel) -> anyhow::Result<(PathBuf, PathBuf)> {
    let example = crate::workspace_root().join("examples/lab.toml");
    let text = fs::read_to_string(&example).with_context(|| {
        format!(
            "could not read {}, the lab's configuration",
            example.display()
        )
    })?;
    let mut config: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", example.display()))?;
    let audit = run_dir.join("audit.jsonl");
    table(&mut config, "audit", &example)?.insert("path".to_owned(), path_value(&audit)?);
    if config.contains_key("tunnel") {
        let section = table(&mut config, "tunnel", &example)?;
        section.insert(
            "interface".to_owned(),
            toml::Value::String(tunnel.edge_device().name().to_owned()),
        );
        section.insert(
            "runtime_grants".to_owned(),
            path_value(&run_dir.join("grants.json"))?,
        );
        if let Some(peers) = section.get_mut("peer") {
            let toml::Value::Array(peers) = peers else {
                bail!(
                    "`tunnel.peer` in {} must be an array of tables ([[tunnel.peer]])",
                    example.display()
                );
            };
            for peer in peers.iter_mut().filter_map(toml::Value::as_table_mut) {
                let app = peer
                    .get("name")
                    .and_then(toml::Value::as_str)
                    .and_then(|name| tunnel.app(name));
                // Peers the lab has no host for keep what the file says.
                if let Some(app) = app {
                    peer.insert(
                        "public_key".to_owned(),
                        toml::Value::String(app.device().public_key().to_owned()),
                    );
                }
            }
        }
    }
    let path = run_dir.join("lab.toml");
    fs::write(
        &path,
        format!("# Written by `cargo xtask run` from examples/lab.toml.\n{config}"),
    )
    .with_context(|| format!("could not write {}", path.display()))?;
    Ok((path, audit))
}

/// The table `key` of `config`, created when missing.
fn table<'a>(
    config: &'a mut toml::Table,
    key: &str,
    example: &Path,
) -> anyhow::Result<&'a mut toml::Table> {
    let section = config
        .entry(key)
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let toml::Value::Table(section) = section else {
        bail!("`{key}` in {} must be a table", example.display());
    };
    Ok(section)
}

fn path_value(path: &Path) -> anyhow::Result<toml::Value> {
    let text = path
        .to_str()
        .ok_or_else(|| anyhow!("the path {} is not UTF-8", path.display()))?;
    Ok(toml::Value::String(text.to_owned()))
}

fn describe_lab(lab: &Lab, tunnel: &Tunnel, progress: &Progress) {
    let edge_note = format!(
        "runs ztxdp on eth0 and on its WireGuard device {} ({}, {}); listens on TCP 22 and 5432",
        tunnel.edge_device().name(),
        lab::EDGE_TUNNEL_V4,
        lab::EDGE_TUNNEL_V6,
    );
    let mut hosts = vec![
        ("edge", lab.edge(), lab::EDGE_V4, lab::EDGE_V6, edge_note),
        (
            "bastion",
            lab.bastion(),
            lab::BASTION_V4,
            lab::BASTION_V6,
            "in edge.ssh_allow".to_owned(),
        ),
        (
            "outsider",
            lab.outsider(),
            lab::OUTSIDER_V4,
            lab::OUTSIDER_V6,
            "no rights".to_owned(),
        ),
    ];
    for (app, v4, v6, rights) in [
        (
            "app-1",
            lab::APP_1_V4,
            lab::APP_1_V6,
            "granted tcp/5432 and icmp",
        ),
        ("app-2", lab::APP_2_V4, lab::APP_2_V6, "no grants"),
    ] {
        if let Some(peer) = tunnel.app(app) {
            let note = format!(
                "tunnel peer via {} ({}, {}), {rights}",
                peer.device().name(),
                peer.tunnel_v4(),
                peer.tunnel_v6(),
            );
            hosts.push((app, peer.ns(), v4, v6, note));
        }
    }
    for (role, ns, v4, v6, note) in hosts {
        progress.say(format!(
            "{role:<8} {v4:<10} {v6:<8} ({note}; `ip netns exec {} ...`)",
            ns.name()
        ));
    }
}

pub fn serve(listener: &TcpListener, greeting: &[u8], finished: &AtomicBool) {
    while !finished.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                // Only proves the connection got through; a peer that hung up
                // already is no failure.
                let _ = stream.write_all(greeting);
            }
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Tcp,
    Udp,
}

/// One attempt of each kind, in parallel so a round takes one probe timeout.
fn send_traffic(lab: &Lab, tunnel: &Tunnel) -> Vec<String> {
    let edge_v4 = IpAddr::V4(lab::EDGE_V4);
    let edge_v6 = IpAddr::V6(lab::EDGE_V6);
    let mut probes = vec![
        ("bastion", lab.bastion(), edge_v4, SSH_PORT, Transport::Tcp),
        ("bastion", lab.bastion(), edge_v6, SSH_PORT, Transport::Tcp),
        (
            "outsider",
            lab.outsider(),
            edge_v4,
            SSH_PORT,
            Transport::Tcp,
        ),
        (
            "outsider",
            lab.outsider(),
            edge_v4,
            POSTGRES_PORT,
            Transport::Tcp,
        ),
        (
            "outsider",
            lab.outsider(),
            edge_v6,
            POSTGRES_PORT,
            Transport::Tcp,
        ),
        (
            "outsider",
            lab.outsider(),
            edge_v4,
            WIREGUARD_PORT,
            Transport::Udp,
        ),
    ];
    // Through the tunnel, to the edge's address inside it.
    let tunnel_v4 = IpAddr::V4(lab::EDGE_TUNNEL_V4);
    let tunnel_v6 = IpAddr::V6(lab::EDGE_TUNNEL_V6);
    for (app, target, port) in [
        ("app-1", tunnel_v4, POSTGRES_PORT),
        ("app-1", tunnel_v6, POSTGRES_PORT),
        ("app-1", tunnel_v4, SSH_PORT),
        ("app-2", tunnel_v4, POSTGRES_PORT),
    ] {
        if let Some(peer) = tunnel.app(app) {
            probes.push((app, peer.ns(), target, port, Transport::Tcp));
        }
    }
    thread::scope(|scope| {
        let running: Vec<_> = probes
            .iter()
            .map(|&(role, host, ip, port, transport)| {
                let target = SocketAddr::new(ip, port);
                let label = match transport {
                    Transport::Tcp => format!("{role} -> {target}/tcp"),
                    Transport::Udp => format!("{role} -> {target}/udp"),
                };
                (label, scope.spawn(move || attempt(host, target, transport)))
            })
            .collect();
        running
            .into_iter()
            .map(|(label, handle)| {
                let outcome = handle
                    .join()
                    .unwrap_or_else(|_| "probe panicked".to_owned());
                format!("{label} {outcome}")
            })
            .collect()
    })
}

fn attempt(host: &NetNs, target: SocketAddr, transport: Transport) -> String {
    let result = host.enter(|| match transport {
        Transport::Tcp => TcpStream::connect_timeout(&target, PROBE_TIMEOUT).map(|_| "connected"),
        Transport::Udp => {
            let any: SocketAddr = if target.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            UdpSocket::bind(any)
                .and_then(|socket| socket.send_to(b"ztxdp lab probe", target))
                .map(|_| "sent")
        }
    });
    match result {
        Ok(Ok(outcome)) => outcome.to_owned(),
        Ok(Err(error)) if error.kind() == ErrorKind::TimedOut => "timed out (dropped)".to_owned(),
        Ok(Err(error)) if error.kind() == ErrorKind::ConnectionRefused => "refused".to_owned(),
        Ok(Err(error)) => format!("failed: {error}"),
        Err(error) => format!("could not enter {}: {error}", host.name()),
    }
}

/// What [`Daemon::start`] runs: `ZTXDP up --config CONFIG`, its stderr
/// into `log`.
pub struct Up<'a> {
    pub ztxdp: &'a Path,
    pub config: &'a Path,
    pub log: &'a Path,
}

/// The `ztxdp up` process; killed on drop if still running.
pub struct Daemon {
    child: Child,
}

impl Daemon {
    /// `ztxdp up --config CONFIG` in `edge`; returns once it prints
    /// `ztxdp: ready`.
    pub fn start(
        edge: &NetNs,
        up: &Up,
        stop: &AtomicBool,
        progress: &Progress,
    ) -> anyhow::Result<Self> {
        let log = File::create(up.log)
            .with_context(|| format!("could not create {}", up.log.display()))?;
        let mut command = edge.cmd(up.ztxdp);
        command
            .arg("up")
            .arg("--config")
            .arg(up.config)
            // The lab is not reachable over the caller's SSH session, so
            // lockout protection has nothing to protect here.
            .env_remove("SSH_CONNECTION")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Ctrl-C reaches only xtask, which then stops the daemon in order.
            .process_group(0);
        echo(&command);
        let mut child = command
            .spawn()
            .with_context(|| format!("could not start `{}`", show(&command)))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("ztxdp's stdout was not captured"))?;
        let mut daemon = Self { child };

        let (lines, received) = mpsc::channel();
        thread::spawn(move || {
            // Keep draining after `ready` so the daemon never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The receiver is gone once the daemon is ready; drop the rest.
                let _ = lines.send(line);
            }
        });
        progress.say(format!(
            "waiting for `ztxdp: ready` (at most {} s) ...",
            READY_TIMEOUT.as_secs()
        ));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match received.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.trim() == "ztxdp: ready" => return Ok(daemon),
                Ok(line) => progress.say(format!("ztxdp: {line}")),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(100)),
            }
            if daemon.exited()? {
                bail!(
                    "`ztxdp up` exited before it was ready; its log ({}):\n{}",
                    up.log.display(),
                    read_log(up.log)
                );
            }
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted while waiting for ztxdp to get ready");
            }
            if Instant::now() >= deadline {
                bail!(
                    "`ztxdp up` did not print `ztxdp: ready` within {} s; its log ({}):\n{}",
                    READY_TIMEOUT.as_secs(),
                    up.log.display(),
                    read_log(up.log)
                );
            }
        }
    }

    pub fn exited(&mut self) -> anyhow::Result<bool> {
        Ok(self
            .child
            .try_wait()
            .context("could not check on the ztxdp process")?
            .is_some())
    }

    /// SIGTERM, then SIGKILL after [`STOP_TIMEOUT`].
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .try_wait()
                .context("could not check on the ztxdp process")?
            {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.signal(libc::SIGKILL)?;
                let status = self
                    .child
                    .wait()
                    .context("could not reap the ztxdp process")?;
                bail!(
                    "ztxdp did not exit within {} s of SIGTERM; killed it ({status})",
                    STOP_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id())
            .context("ztxdp's process id does not fit pid_t")?;
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .context(format!("could not signal ztxdp (pid {pid})"));
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // Best effort on an error path; the namespace's removal kills it too.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn read_log(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|error| format!("(could not read {}: {error})", path.display()))
}

/// Follows the audit file from its start; the file appears with the first
/// decision.
struct AuditTail {
    path: PathBuf,
    file: Option<File>,
    partial: Vec<u8>,
}

impl AuditTail {
    fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            partial: Vec::new(),
        }
    }

    /// Prints the complete lines written since the last call; returns how many.
    fn print_new(&mut self) -> anyhow::Result<usize> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(error) if error.kind() == ErrorKind::NotFound => return Ok(0),
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("could not open {}", self.path.display()));
                }
            }
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(0);
        };
        file.read_to_end(&mut self.partial)
            .with_context(|| format!("could not read {}", self.path.display()))?;
        let Some(last_newline) = self.partial.iter().rposition(|&byte| byte == b'\n') else {
            return Ok(0);
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        let mut printed = 0;
        for line in String::from_utf8_lossy(&complete)
            .lines()
            .filter(|line| !line.trim().is_empty())
        {
            println!("  audit {}", audit_view::summarize(line));
            printed += 1;
        }
        Ok(printed)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn namespaces_of_this_process() -> Vec<String> {
        let listing = crate::cmd::output(Command::new("ip").args(["netns", "list"]))
            .unwrap_or_else(|error| panic!("ip netns list: {error:#}"));
        let marker = format!("-{}-", std::process::id());
        listing
            .lines()
            .filter(|line| line.starts_with("zt-") && line.contains(&marker))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_daemon_that_fails_reports_its_log_and_leaves_no_namespace() {
        let run_dir = std::env::temp_dir().join(format!("xtask-lab-test-{}", std::process::id()));
        fs::create_dir_all(&run_dir)
            .unwrap_or_else(|error| panic!("creating {}: {error}", run_dir.display()));
        let fake = run_dir.join("fake-ztxdp");
        fs::write(
            &fake,
            "#!/bin/sh\necho \"config error: edge.interface missing ($*)\" >&2\nexit 2\n",
        )
        .unwrap_or_else(|error| panic!("writing {}: {error}", fake.display()));
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|error| panic!("chmod {}: {error}", fake.display()));

        let progress = Progress::new("test".to_owned());
        let result = lab(&fake, &run_dir, Some(Duration::from_secs(1)), &progress);
        let Err(error) = result else {
            panic!("a daemon that exits at once must fail the run");
        };
        let message = format!("{error:#}");
        assert!(
            message.contains("exited before it was ready")
                && message.contains("config error: edge.interface missing (up --config"),
            "the error must carry the daemon's log: {message}"
        );
        let left = namespaces_of_this_process();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        // zt_tests::wg names devices `wzPIDxN`.
        let prefix = format!("wz{}x", std::process::id());
        let sockets: Vec<_> = fs::read_dir("/var/run/wireguard")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        assert!(
            sockets.is_empty(),
            "wireguard-go sockets left behind: {sockets:?}"
        );
        fs::remove_dir_all(&run_dir)
            .unwrap_or_else(|error| panic!("removing {}: {error}", run_dir.display()));
    }
}
