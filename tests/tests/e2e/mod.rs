//! Tier 3 helpers: the real `ztxdp` binary run inside test namespaces, and
//! sockets opened in those namespaces. Every wait here is bounded; every
//! helper panics with context, so a failure points at its cause.
#![allow(
    dead_code,
    reason = "each test binary includes this module and uses a different part of it"
)]

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

pub mod audit;

use serde_json::Value;
use zt_tests::{
    lab::{EDGE_V4, HOST_INTERFACE, Lab},
    netns::{NetNs, describe},
    packet::{Ethernet, Ipv4, Transport},
};

pub mod mesh;

/// `ztxdp up` loads and attaches in well under a second; this bounds a hang.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A daemon (or a follower of its events) stops in well under a second;
/// this bounds a hang on a loaded machine.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds every other ztxdp command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// A connect (or a datagram) that must succeed: local links answer in
/// microseconds, a `WireGuard` tunnel adds one handshake, and wireguard-go
/// retries a lost handshake only after 5 s, so this allows two.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A connect that must be dropped: the first SYN retransmit is after 1 s,
/// so this is already two unanswered SYNs.
pub const DROP_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long counters and audit lines may take to show what happened: both
/// are polled, so this only bounds a failure, and allows for a loaded
/// machine.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The binary under test: `ZTXDP_BIN` (set by `cargo xtask test`), else the
/// workspace's debug build.
pub fn ztxdp_bin() -> PathBuf {
    let path = std::env::var_os("ZTXDP_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ztxdp"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "ztxdp binary not found at {}: run `cargo build` first, or set ZTXDP_BIN \
         (`cargo xtask test` does both)",
        path.display()
    );
    path
}

pub fn at(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Whether the JSON `line` holds `want` at `pointer` (`/source/port`).
pub fn is(line: &Value, pointer: &str, want: &Value) -> bool {
    line.pointer(pointer) == Some(want)
}

/// A directory for one test's config, audit and grants files; removed on drop.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "zt-e2e-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating scratch dir {}: {e}", path.display()));
        Self { path }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.path.join(file)
    }

    /// Writes `file` and returns its path.
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path(file);
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `ztxdp ARGS...` in `ns` without `SSH_CONNECTION` (lockout protection is
/// tested on purpose, not inherited from whoever runs the tests).
pub fn ztxdp_cmd(ns: &NetNs, args: &[&str]) -> Command {
    let mut command = ns.cmd(ztxdp_bin());
    command.args(args).env_remove("SSH_CONNECTION");
    command
}

/// Runs `command` to completion within [`COMMAND_TIMEOUT`]; a command that
/// hangs (say an `up` that should have refused to start) is killed and fails
/// the test.
pub fn run_bounded(command: &mut Command) -> Output {
    run_bounded_to(command, Stdio::piped())
}

/// [`run_bounded`] with the command's stdout a pipe whose reading end is
/// already closed, as after `| head -0`: its every write to stdout fails
/// with `EPIPE`, not only those after a reader happened to exit. The
/// output has no stdout.
pub fn run_with_stdout_closed(command: &mut Command) -> Output {
    let (reader, writer) = io::pipe().unwrap_or_else(|e| panic!("creating a pipe: {e}"));
    drop(reader);
    run_bounded_to(command, writer.into())
}

/// [`run_bounded`] with the command's stdout sent to `stdout`; the output
/// holds it only if that is [`Stdio::piped`].
fn run_bounded_to(command: &mut Command, stdout: Stdio) -> Output {
    let shown = describe(command);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{shown}`: {e}"));
    // Drained on threads so a chatty child never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn io::Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn io::Read + Send>),
    );
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for `{shown}`: {e}"))
        {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{shown}` still running after {COMMAND_TIMEOUT:?}; killed it");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// Runs `ztxdp ARGS...` in `ns` and returns its output, whatever the exit.
pub fn ztxdp(ns: &NetNs, args: &[&str]) -> Output {
    run_bounded(&mut ztxdp_cmd(ns, args))
}

/// Runs `ztxdp ARGS...` in `ns`, which must succeed; returns its stdout.
pub fn ztxdp_ok(ns: &NetNs, args: &[&str]) -> String {
    let out = ztxdp(ns, args);
    assert!(
        out.status.success(),
        "`ztxdp {}` in {} failed ({}):\n{}",
        args.join(" "),
        ns.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `ztxdp status --json` in `ns`.
pub fn status(ns: &NetNs) -> Value {
    let text = ztxdp_ok(ns, &["status", "--json"]);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{text}"))
}

/// A counter of `status --json`: `program` is "edge" or "tunnel".
pub fn counter(status: &Value, program: &str, reason: &str) -> u64 {
    status[program]["counters"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no {program} counter {reason:?}:\n{status:#}"))
}

/// Waits until `program`'s `reason` counter in `ns` is exactly `before +
/// delta`, then checks it stays there (no late packet pushes it further).
pub fn expect_counter(ns: &NetNs, program: &str, reason: &str, before: u64, delta: u64) {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut now = counter(&status(ns), program, reason);
    while now < before + delta && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        now = counter(&status(ns), program, reason);
    }
    thread::sleep(Duration::from_millis(200));
    now = counter(&status(ns), program, reason);
    assert_eq!(
        now - before,
        delta,
        "{program} counter {reason}: expected exactly {delta} more packets (was {before}, now {now})"
    );
}

/// Whether `interface` in `ns` has an XDP program, as `ip link` shows it.
pub fn has_xdp(ns: &NetNs, interface: &str) -> bool {
    !xdp_lines(ns, interface).is_empty()
}

fn xdp_lines(ns: &NetNs, interface: &str) -> Vec<String> {
    ns.ip(&["link", "show", "dev", interface])
        .unwrap_or_else(|e| panic!("ip link show {interface}: {e}"))
        .lines()
        .filter(|line| line.contains("xdp"))
        .map(|line| line.trim().to_owned())
        .collect()
}

/// Everything of ztxdp's on `interface` in `ns`, as iproute2 shows it: an
/// XDP program, and tc filters (either direction) running one of our
/// programs (all named `zt_*`). Empty when nothing is left.
pub fn attached(ns: &NetNs, interface: &str) -> Vec<String> {
    let mut found = xdp_lines(ns, interface);
    for direction in ["ingress", "egress"] {
        let out = run_bounded(Command::new("tc").args([
            "-n",
            ns.name(),
            "filter",
            "show",
            "dev",
            interface,
            direction,
        ]));
        // Without a clsact qdisc tc fails: then there is no filter either.
        found.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|line| line.contains("zt_"))
                .map(|line| format!("{direction}: {}", line.trim())),
        );
    }
    found
}

/// The MAC address of `interface` in `ns`.
pub fn mac(ns: &NetNs, interface: &str) -> [u8; 6] {
    let shown = ns
        .ip(&["-o", "link", "show", "dev", interface])
        .unwrap_or_else(|e| panic!("ip link show {interface}: {e}"));
    let mut words = shown.split_whitespace();
    let text = words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .unwrap_or_else(|| panic!("no MAC address in: {shown}"));
    let mut mac = [0u8; 6];
    for (byte, hex) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("MAC {text}: {e}"));
    }
    mac
}

/// Not opened by the lab policy: every SYN to it is a `port_not_allowed` deny.
pub const CLOSED_PORT: u16 = 5432;

/// `count` TCP SYNs to the edge's closed port from the outsider's link, from
/// each of `sources` addresses of 198.18.0.0/15 starting at `first`,
/// round-robin over the sources.
pub fn flood(lab: &Lab, first: u32, sources: u32, count: u32) {
    let eth = Ethernet {
        dst: mac(lab.edge(), HOST_INTERFACE),
        src: mac(lab.outsider(), HOST_INTERFACE),
        tags: vec![],
    };
    let syn = Transport::tcp_syn(CLOSED_PORT);
    let frames: Vec<Vec<u8>> = (0..count)
        .flat_map(|_| first..first + sources)
        .map(|i| eth.ipv4(&Ipv4::new(Ipv4Addr::from(0xc612_0000 + i), EDGE_V4), &syn))
        .collect();
    // In slices: each call is one AF_PACKET socket on a short-lived thread.
    for chunk in frames.chunks(2000) {
        send_frames(lab.outsider(), HOST_INTERFACE, chunk);
    }
}

/// The reference lab (`zt_tests::lab`).
pub fn build_lab() -> Lab {
    Lab::create().unwrap_or_else(|e| panic!("building the lab (root?): {e:?}"))
}

/// A lab with `ztxdp up` running on its edge; the config, audit file and
/// logs are in `scratch`. Fields drop in order: the daemon first, the
/// namespaces last.
pub struct Enforced {
    pub daemon: Daemon,
    pub lab: Lab,
    pub config: PathBuf,
    pub scratch: Scratch,
}

impl Enforced {
    /// Writes `config(&lab, &scratch)` as `ztxdp.toml` and starts `ztxdp up`
    /// with it on the edge, logging to `daemon-1.log`. The config should
    /// put the audit file at [`Self::audit`].
    pub fn start(tag: &str, lab: Lab, config: impl FnOnce(&Lab, &Scratch) -> String) -> Self {
        Self::start_with(tag, lab, &[], config)
    }

    /// [`Self::start`] with more arguments for `ztxdp up`.
    pub fn start_with(
        tag: &str,
        lab: Lab,
        args: &[&str],
        config: impl FnOnce(&Lab, &Scratch) -> String,
    ) -> Self {
        let scratch = Scratch::new(tag);
        let config = scratch.write("ztxdp.toml", &config(&lab, &scratch));
        let daemon = Daemon::start(lab.edge(), &config, args, scratch.path("daemon-1.log"));
        Self {
            daemon,
            lab,
            config,
            scratch,
        }
    }

    pub fn edge(&self) -> &NetNs {
        self.lab.edge()
    }

    /// Where the config is told to write the audit trail.
    pub fn audit(&self) -> PathBuf {
        self.scratch.path("audit.jsonl")
    }

    /// Another `ztxdp up` with the same config, logging to `log`.
    pub fn up(&self, log: &str) -> Daemon {
        Daemon::start(self.edge(), &self.config, &[], self.scratch.path(log))
    }

    /// Replaces [`Self::daemon`] with a new `ztxdp up` (see [`Self::up`]);
    /// returns the one it replaced, which dropping kills if it still runs.
    pub fn restart(&mut self, log: &str) -> Daemon {
        let new = self.up(log);
        std::mem::replace(&mut self.daemon, new)
    }

    /// An edge counter of `status --json`.
    pub fn counter(&self, reason: &str) -> u64 {
        counter(&status(self.edge()), "edge", reason)
    }

    /// Fails with the daemon's log, which says what it saw.
    pub fn fail(&self, what: &str) -> ! {
        panic!(
            "{what}; the daemon's log ({}):\n{}",
            self.daemon.log.display(),
            self.daemon.log()
        );
    }
}

/// A foreground `ztxdp up`; killed (SIGKILL) on drop if still running.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// `ztxdp up --config CONFIG ARGS...` in `ns`; returns once it printed
    /// `ztxdp: ready`. Its stderr goes to `log`.
    pub fn start(ns: &NetNs, config: &Path, args: &[&str], log: PathBuf) -> Self {
        let mut command = ztxdp_cmd(ns, &["up", "--config"]);
        command.arg(config).args(args);
        Self::spawn(command, log)
    }

    /// Starts `command` (an `up` prepared by the caller, e.g. with an
    /// environment) and waits for it to be ready.
    pub fn spawn(mut command: Command, log: PathBuf) -> Self {
        let shown = describe(&command);
        let stderr =
            fs::File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{shown}`: {e}"));
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("`{shown}`: stdout not captured"));
        let mut daemon = Self { child, log };
        let (lines, received) = mpsc::channel();
        thread::spawn(move || {
            // Keeps draining after `ready` so the daemon never blocks on stdout.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match received.recv_timeout(Duration::from_millis(50)) {
                Ok(line) if line.trim() == "ztxdp: ready" => return daemon,
                Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(Duration::from_millis(50));
                }
            }
            if let Some(status) = daemon.try_status() {
                panic!(
                    "`{shown}` exited ({status}) before it was ready; its log:\n{}",
                    daemon.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "`{shown}` not ready within {READY_TIMEOUT:?}; its log:\n{}",
                daemon.log()
            );
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("checking on ztxdp: {e}"))
    }

    /// Waits up to `timeout` for the daemon to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap_or_else(|e| panic!("pid: {e}"));
        // SAFETY: kill(2) on our own child, not yet reaped.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            io::Error::last_os_error()
        );
    }

    /// SIGHUP, which must make the daemon reload its config in place.
    pub fn hangup(&self) {
        self.signal(libc::SIGHUP);
    }

    /// Waits until the daemon's log has a line containing `text`; fails at
    /// once if the daemon exits meanwhile, with its log.
    pub fn expect_log(&mut self, text: &str) {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while !self.log().contains(text) {
            if let Some(status) = self.try_status() {
                panic!(
                    "ztxdp exited ({status}) before logging {text:?}; its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "ztxdp did not log {text:?} within {SETTLE_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon must still be running.
    pub fn expect_running(&mut self, after: &str) {
        if let Some(status) = self.try_status() {
            panic!(
                "ztxdp exited ({status}) after {after}; its log:\n{}",
                self.log()
            );
        }
    }

    /// `kill -9`: the daemon gets no chance to clean up.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let status = self.wait_exit(EXIT_TIMEOUT);
        assert!(status.is_some(), "ztxdp survived SIGKILL");
    }

    /// SIGTERM, which must make the daemon exit 0 (detaching, unless it
    /// runs with `--keep-attached`).
    pub fn terminate(&mut self) {
        self.signal(libc::SIGTERM);
        self.expect_clean_exit("of SIGTERM");
    }

    /// Another `up` replaced this daemon's program: it must notice, and
    /// exit 0 by itself.
    pub fn expect_replaced(&mut self) {
        self.expect_clean_exit("of being replaced");
    }

    fn expect_clean_exit(&mut self, after: &str) {
        let status = self.wait_exit(EXIT_TIMEOUT);
        assert!(
            status.is_some_and(|s| s.success()),
            "ztxdp did not exit 0 within {EXIT_TIMEOUT:?} {after} ({status:?}); its log:\n{}",
            self.log()
        );
    }
}

impl Drop for Daemon {
    /// SIGTERM first, so a daemon a test left running detaches and removes
    /// its events socket under /run (shared by every namespace); SIGKILL if
    /// it has not gone within two seconds.
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP connection opened from inside `ns`.
pub fn connect(ns: &NetNs, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    ns.enter(|| TcpStream::connect_timeout(&to, timeout))
        .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()))
}

/// A connection from `ns` to `to` must succeed.
pub fn assert_connects(ns: &NetNs, to: SocketAddr, what: &str) -> TcpStream {
    connect(ns, to, CONNECT_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: connect from {} to {to} failed: {e}", ns.name()))
}

/// A connection from `ns` to `to` must time out: dropped, not refused (a
/// listener is there, so only the filter can make it time out).
pub fn assert_times_out(ns: &NetNs, to: SocketAddr, what: &str) {
    match connect(ns, to, DROP_TIMEOUT) {
        Ok(_) => panic!(
            "{what}: connect from {} to {to} succeeded; it must be dropped",
            ns.name()
        ),
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::TimedOut,
            "{what}: connect from {} to {to} failed with {e}, not a timeout (was it refused?)",
            ns.name()
        ),
    }
}

/// [`assert_times_out`] for every case at once, so the waits overlap.
pub fn assert_all_time_out(cases: &[(&NetNs, SocketAddr, &str)]) {
    thread::scope(|scope| {
        let workers: Vec<_> = cases
            .iter()
            .map(|&(ns, to, what)| scope.spawn(move || assert_times_out(ns, to, what)))
            .collect();
        for worker in workers {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
}

/// A TCP listener on every address of `ns` (IPv4 and IPv6) at `port`.
pub fn listen(ns: &NetNs, port: u16) -> TcpListener {
    ns.enter(|| TcpListener::bind(("::", port)))
        .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()))
        .unwrap_or_else(|e| panic!("listening on port {port} in {}: {e}", ns.name()))
}

/// The next connection on `listener`, within `timeout`.
pub fn accept(listener: &TcpListener, timeout: Duration) -> TcpStream {
    listener
        .set_nonblocking(true)
        .unwrap_or_else(|e| panic!("nonblocking listener: {e}"));
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .unwrap_or_else(|e| panic!("blocking stream: {e}"));
                return stream;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                assert!(
                    Instant::now() < deadline,
                    "no connection accepted within {timeout:?}"
                );
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// A UDP socket in `ns` bound to `bind`, with a read timeout for datagrams
/// that must arrive; [`expect_no_datagram`] waits less.
pub fn udp_socket(ns: &NetNs, bind: SocketAddr) -> UdpSocket {
    let socket = ns
        .enter(|| UdpSocket::bind(bind))
        .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()))
        .unwrap_or_else(|e| panic!("binding UDP {bind} in {}: {e}", ns.name()));
    set_read_timeout(&socket, CONNECT_TIMEOUT);
    socket
}

fn set_read_timeout(socket: &UdpSocket, timeout: Duration) {
    socket
        .set_read_timeout(Some(timeout))
        .unwrap_or_else(|e| panic!("UDP read timeout: {e}"));
}

/// Nothing arrives on `socket` within [`DROP_TIMEOUT`]; `what` names the
/// datagram that must have been dropped.
pub fn expect_no_datagram(socket: &UdpSocket, what: &str) {
    set_read_timeout(socket, DROP_TIMEOUT);
    let mut buf = [0u8; 512];
    let got = socket.recv_from(&mut buf);
    set_read_timeout(socket, CONNECT_TIMEOUT);
    if let Ok((n, src)) = got {
        panic!("{what} arrived: {:?} from {src}", &buf[..n]);
    }
}

/// Sends whole Ethernet frames out of `interface` in `ns` through an
/// `AF_PACKET` socket, exactly as given (tags and all).
pub fn send_frames(ns: &NetNs, interface: &str, frames: &[Vec<u8>]) {
    let name = std::ffi::CString::new(interface).unwrap_or_else(|e| panic!("interface name: {e}"));
    ns.enter(|| {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `name` is NUL-terminated; this thread is in `ns`.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no {interface} in {}", ns.name());
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
        addr.sll_ifindex = i32::try_from(ifindex).unwrap_or_else(|e| panic!("ifindex: {e}"));
        addr.sll_halen = 6;
        for frame in frames {
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            // SAFETY: `frame` and `addr` are valid for the lengths passed.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const addr).cast(),
                    u32::try_from(size_of::<libc::sockaddr_ll>()).unwrap_or_default(),
                )
            };
            assert_eq!(
                usize::try_from(sent).ok(),
                Some(frame.len()),
                "sending a {}-byte frame on {interface}: {}",
                frame.len(),
                io::Error::last_os_error()
            );
        }
    })
    .unwrap_or_else(|e| panic!("entering {}: {e}", ns.name()));
}

/// `len` bytes that are not all alike (0 to 250, repeating; 251 is prime,
/// so no fragment boundary lines up with the pattern): a datagram that is
/// cut, reordered or padded does not compare equal.
pub fn patterned(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect()
}

/// The lines of a file that another process is appending to, without a
/// last line it has not finished: a read can land in the middle of a write
/// (a CI run read half of an rsyslog line).
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    let whole = text.rfind('\n').map_or("", |end| &text[..end]);
    whole.lines()
}

/// `ztxdp audit verify` on every file of `t`'s trail, which must pass (no
/// gap in the sequence, an unbroken chain); its output.
pub fn verify_audit(t: &Enforced) -> String {
    let files: Vec<String> = ztxdp::audit::writer::files(&t.audit())
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let mut args = vec!["audit", "verify"];
    args.extend(files.iter().map(String::as_str));
    let out = ztxdp(t.edge(), &args);
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`ztxdp audit verify` failed on {files:?}:\n{shown}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    shown
}

/// Every JSON line of the audit file so far.
pub fn audit_lines(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    complete_lines(&text)
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line}"))
        })
        .collect()
}

/// Waits until the audit file has a line for which `matches` holds.
pub fn expect_audit(path: &Path, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let lines = audit_lines(path);
        if let Some(found) = lines.iter().find(|l| matches(l)) {
            return found.clone();
        }
        if Instant::now() >= deadline {
            let shown: Vec<String> = lines.iter().map(Value::to_string).collect();
            panic!(
                "no audit line for {what} within {SETTLE_TIMEOUT:?}; the file has:\n{}",
                shown.join("\n")
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `ztxdp events --follow ARGS...` in `ns` (its own `ip netns exec`: another
/// mount namespace, the same network namespace), and the lines it prints
/// as they come. Its stderr is a pipe, for saying why it ended; kill the
/// child when done.
pub fn events_follower(ns: &NetNs, args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let args = [&["events", "--follow"], args].concat();
    let mut child = ztxdp_cmd(ns, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting `ztxdp {}`: {e}", args.join(" ")));
    let out = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("stdout not captured"));
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}
