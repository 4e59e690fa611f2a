//! Network namespaces that clean up after themselves.
//!
//! Every namespace gets a name no other process picks (`zt-PREFIX-PID-N`), is
//! deleted on drop together with any process left in it, and can be entered
//! in-process from a short-lived thread ([`NetNs::enter`]), so tests open
//! sockets in the namespace without spawning helpers.
use std::{
    ffi::OsStr,
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    process::{Command, ExitStatus, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

/// Every name this module creates starts with this, so stale namespaces of
/// killed runs can be recognised (see [`NetNs::remove_stale`]).
const NAME_PREFIX: &str = "zt-";

/// Where `ip netns add` bind-mounts the namespace handle.
const NETNS_RUN_DIR: &str = "/run/netns";

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error(
        "could not start `{command}` (is iproute2 installed? `cargo xtask build` installs it): {source}"
    )]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error("could not open namespace handle {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setns into network namespace {name} failed (needs root): {source}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("could not start a thread to enter network namespace {name}: {source}")]
    Thread {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("could not set sysctl {key} in network namespace {name}: {source}")]
    Sysctl {
        name: String,
        key: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "{interface} in network namespace {name} is not up after {timeout:?} (operstate {operstate:?})"
    )]
    LinkTimeout {
        name: String,
        interface: String,
        timeout: Duration,
        operstate: String,
    },
}

/// A command that ran and exited unsuccessfully.
#[derive(Debug, thiserror::Error)]
#[error("`{command}` failed ({status}): {stderr}")]
pub struct CommandFailed {
    pub command: String,
    pub status: ExitStatus,
    pub stderr: String,
}

/// A network namespace owned by this process; deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `zt-PREFIX-PID-N` with `lo` up.
    ///
    /// # Errors
    /// When `ip netns add` fails (not root, iproute2 missing) or `lo` cannot
    /// be brought up; the namespace is removed again in the latter case.
    pub fn new(prefix: &str) -> Result<Self, NetNsError> {
        let name = format!(
            "{NAME_PREFIX}{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run_command(Command::new("ip").args(["netns", "add", &name]))?;
        // From here on drop deletes it, also if bringing up lo fails.
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip netns exec NAME PROGRAM`; add arguments and run it as usual.
    #[must_use]
    pub fn cmd(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs `argv` inside the namespace and returns its stdout.
    ///
    /// # Errors
    /// When `argv` is empty, cannot start, or exits non-zero (the error holds
    /// its stderr).
    pub fn run(&self, argv: &[&str]) -> Result<String, NetNsError> {
        let Some((program, rest)) = argv.split_first() else {
            return Err(NetNsError::Spawn {
                command: format!("ip netns exec {}", self.name),
                source: io::Error::new(io::ErrorKind::InvalidInput, "empty command line"),
            });
        };
        run_command(self.cmd(program).args(rest))
    }

    /// `ip -n NAME ARGS...` (no `/sys` remount, cheaper than [`Self::run`]).
    ///
    /// # Errors
    /// When `ip` fails; the error holds its stderr.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        run_command(Command::new("ip").args(["-n", &self.name]).args(args))
    }

    /// Runs `f` on a new thread that has joined this namespace, so sockets it
    /// opens live there (a socket stays in the namespace it was created in,
    /// so `f` may return it for use from any thread). The calling thread is
    /// left untouched. A panic in `f` is resumed on the caller.
    ///
    /// # Errors
    /// When the namespace handle cannot be opened or `setns` fails.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, NetNsError> {
        let path = PathBuf::from(NETNS_RUN_DIR).join(&self.name);
        let handle = File::open(&path).map_err(|source| NetNsError::Open { path, source })?;
        thread::scope(|scope| {
            let worker = thread::Builder::new()
                .name(format!("netns-{}", self.name))
                .spawn_scoped(scope, || {
                    // SAFETY: `handle` is an open namespace file descriptor for the
                    // whole call; setns only changes this thread's namespace.
                    let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    if rc != 0 {
                        return Err(NetNsError::Setns {
                            name: self.name.clone(),
                            source: io::Error::last_os_error(),
                        });
                    }
                    Ok(f())
                })
                .map_err(|source| NetNsError::Thread {
                    name: self.name.clone(),
                    source,
                })?;
            worker
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Sets a `net.*` sysctl of this namespace, e.g.
    /// `net.ipv6.conf.all.accept_dad`, by writing `/proc/sys` from inside
    /// (no procps needed). Other keys are global to the machine, so they are
    /// refused.
    ///
    /// # Errors
    /// [`NetNsError::Sysctl`] when the key is not `net.*` or the write fails.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), NetNsError> {
        let error = |source| NetNsError::Sysctl {
            name: self.name.clone(),
            key: key.to_owned(),
            source,
        };
        if !key.starts_with("net.") || key.contains('/') {
            return Err(error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "only net.* keys are per network namespace",
            )));
        }
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        // /proc/sys/net shows the network namespace of the thread that opens it.
        self.enter(|| std::fs::write(&path, value))?.map_err(error)
    }

    /// Adds `addr/prefix_len` to `interface`. IPv6 addresses skip duplicate
    /// address detection: a tentative address cannot be used as a source, so
    /// the first packets of a test would otherwise go missing.
    ///
    /// # Errors
    /// When `ip addr add` fails.
    pub fn add_address(
        &self,
        interface: &str,
        addr: IpAddr,
        prefix_len: u8,
    ) -> Result<(), NetNsError> {
        let cidr = format!("{addr}/{prefix_len}");
        let mut args = vec!["addr", "add", &cidr, "dev", interface];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    /// `ip link set INTERFACE up`.
    ///
    /// # Errors
    /// When `ip link set` fails.
    pub fn link_up(&self, interface: &str) -> Result<(), NetNsError> {
        self.ip(&["link", "set", interface, "up"]).map(drop)
    }

    /// Turns GRO on: a veth only runs native XDP on frames that went through
    /// its NAPI path, which GRO enables.
    ///
    /// # Errors
    /// When `ethtool` fails.
    pub fn enable_gro(&self, interface: &str) -> Result<(), NetNsError> {
        self.run(&["ethtool", "-K", interface, "gro", "on"])
            .map(drop)
    }

    /// Waits until the kernel reports `interface` operationally up (for a
    /// veth: both ends up).
    ///
    /// # Errors
    /// [`NetNsError::LinkTimeout`] after `timeout`, or when `ip` fails.
    pub fn wait_link_up(&self, interface: &str, timeout: Duration) -> Result<(), NetNsError> {
        let start = Instant::now();
        loop {
            let operstate = self.operstate(interface)?;
            if operstate == "UP" {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(NetNsError::LinkTimeout {
                    name: self.name.clone(),
                    interface: interface.to_owned(),
                    timeout,
                    operstate,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn operstate(&self, interface: &str) -> Result<String, NetNsError> {
        // `ip -o link show IF`: "2: eth0@if3: <...> mtu 1500 ... state UP mode ..."
        let line = self.ip(&["-o", "link", "show", "dev", interface])?;
        let mut words = line.split_whitespace();
        Ok(words
            .find(|word| *word == "state")
            .and_then(|_| words.next())
            .unwrap_or("UNKNOWN")
            .to_owned())
    }

    /// Deletes namespaces left by processes of this module that no longer run
    /// (a run killed with SIGKILL cannot drop its guards). Returns their names.
    ///
    /// # Errors
    /// When `ip netns list` or a deletion fails.
    pub fn remove_stale() -> Result<Vec<String>, NetNsError> {
        let listing = run_command(Command::new("ip").args(["netns", "list"]))?;
        let mut removed = Vec::new();
        for name in listing
            .lines()
            .filter_map(|line| line.split_whitespace().next())
        {
            let Some(pid) = owner_pid(name) else { continue };
            if process_alive(pid) {
                continue;
            }
            kill_processes_in(name);
            run_command(Command::new("ip").args(["netns", "del", name]))?;
            removed.push(name.to_owned());
        }
        Ok(removed)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // A process left inside (a daemon, a test's helper) would keep the
        // namespace and its interfaces alive after the name is gone.
        kill_processes_in(&self.name);
        if let Err(error) = run_command(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!(
                "zt-tests: could not delete network namespace {}: {error}",
                self.name
            );
        }
    }
}

/// Creates a veth pair with `a_if` in `a` and `b_if` in `b`, both up.
///
/// # Errors
/// When `ip link add` or bringing a side up fails.
pub fn veth_pair(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<(), NetNsError> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.link_up(a_if)?;
    b.link_up(b_if)
}

/// The PID in `zt-PREFIX-PID-N`, when `name` was made by [`NetNs::new`].
fn owner_pid(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.rsplitn(3, '-');
    parts.next()?.parse::<u32>().ok()?;
    let pid = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(pid)
}

fn process_alive(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Best effort: used on teardown paths that must not fail.
fn kill_processes_in(name: &str) {
    let Ok(pids) = run_command(Command::new("ip").args(["netns", "pids", name])) else {
        return;
    };
    let own = std::process::id();
    for pid in pids
        .lines()
        .filter_map(|line| line.trim().parse::<u32>().ok())
    {
        // Never ourselves, whatever a caller did with setns on the main thread.
        if pid == own {
            continue;
        }
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            continue;
        };
        // SAFETY: plain kill(2) on a PID the kernel just listed for this namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn run_command(command: &mut Command) -> Result<String, NetNsError> {
    let output = command.output().map_err(|source| NetNsError::Spawn {
        command: describe(command),
        source,
    })?;
    Ok(stdout(command, &output)?)
}

/// The stdout of `command`, which ran to `output`, if it succeeded.
pub(crate) fn stdout(command: &Command, output: &Output) -> Result<String, CommandFailed> {
    if !output.status.success() {
        return Err(CommandFailed {
            command: describe(command),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `command` as one line, for messages.
#[must_use]
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `ip netns list` lists `name`, exactly (a parallel test's
/// `zt-edge-PID-12` is not `zt-edge-PID-1`).
#[cfg(test)]
pub(crate) fn listed(name: &str) -> bool {
    let listing = run_command(Command::new("ip").args(["netns", "list"]))
        .unwrap_or_else(|error| panic!("ip netns list: {error}"));
    listing
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_our_names() {
        assert_eq!(owner_pid("zt-edge-1234-0"), Some(1234), "plain prefix");
        assert_eq!(
            owner_pid("zt-my-lab-edge-77-12"),
            Some(77),
            "prefix with dashes"
        );
        assert_eq!(owner_pid("zt-edge-x-0"), None, "pid not a number");
        assert_eq!(owner_pid("other-edge-1234-0"), None, "foreign namespace");
        assert_eq!(owner_pid("zt-1234"), None, "too few parts");
    }

    #[test]
    fn namespace_is_isolated_and_removed_on_drop() {
        let name;
        {
            let ns = NetNs::new("unit")
                .unwrap_or_else(|error| panic!("creating a namespace (root?): {error}"));
            name = ns.name().to_owned();
            assert!(listed(&name), "{name} missing from `ip netns list`");
            // A listener bound inside is invisible from the root namespace's
            // view of ports, and lo inside is up.
            let port = ns
                .enter(|| {
                    let listener = std::net::TcpListener::bind("127.0.0.1:0")
                        .unwrap_or_else(|error| panic!("bind in namespace: {error}"));
                    let port = listener
                        .local_addr()
                        .map(|addr| addr.port())
                        .unwrap_or_default();
                    std::net::TcpStream::connect(("127.0.0.1", port))
                        .unwrap_or_else(|error| panic!("connect over the namespace's lo: {error}"));
                    port
                })
                .unwrap_or_else(|error| panic!("enter: {error}"));
            let sockets = ns
                .run(&["ss", "-Htln"])
                .unwrap_or_else(|error| panic!("ss: {error}"));
            assert!(
                sockets.is_empty(),
                "listener outlived its thread: {sockets}"
            );
            assert_ne!(port, 0, "listener had no port");
            let links = ns
                .ip(&["-o", "link", "show"])
                .unwrap_or_else(|error| panic!("ip link: {error}"));
            assert_eq!(
                links.lines().count(),
                1,
                "a fresh namespace has only lo: {links}"
            );
        }
        assert!(!listed(&name), "{name} still exists after drop");
    }

    #[test]
    fn sysctl_changes_only_the_namespace() {
        const KEY: &str = "net.ipv6.conf.default.hop_limit";
        const FILE: &str = "/proc/sys/net/ipv6/conf/default/hop_limit";
        let ns = NetNs::new("unit")
            .unwrap_or_else(|error| panic!("creating a namespace (root?): {error}"));
        let host_before =
            std::fs::read_to_string(FILE).unwrap_or_else(|error| panic!("reading {FILE}: {error}"));
        ns.sysctl(KEY, "17")
            .unwrap_or_else(|error| panic!("sysctl: {error}"));
        let inside = ns
            .run(&["cat", FILE])
            .unwrap_or_else(|error| panic!("cat in namespace: {error}"));
        let host_after =
            std::fs::read_to_string(FILE).unwrap_or_else(|error| panic!("reading {FILE}: {error}"));
        assert_eq!(inside.trim(), "17", "the namespace's value did not change");
        assert_eq!(
            host_before, host_after,
            "the root namespace's value changed"
        );
        let refused = ns.sysctl("kernel.hostname", "oops");
        assert!(
            matches!(refused, Err(NetNsError::Sysctl { .. })),
            "a global key must be refused: {refused:?}"
        );
    }

    #[test]
    fn drop_kills_processes_left_inside() {
        let ns = NetNs::new("unit")
            .unwrap_or_else(|error| panic!("creating a namespace (root?): {error}"));
        let name = ns.name().to_owned();
        let mut child = ns
            .cmd("sleep")
            .arg("60")
            .spawn()
            .unwrap_or_else(|error| panic!("spawning sleep in {name}: {error}"));
        let deadline = Instant::now() + Duration::from_secs(5);
        // Wait until `ip netns exec` has joined the namespace.
        while run_command(Command::new("ip").args(["netns", "pids", &name]))
            .is_ok_and(|pids| pids.trim().is_empty())
        {
            assert!(Instant::now() < deadline, "sleep never showed up in {name}");
            thread::sleep(Duration::from_millis(20));
        }
        drop(ns);
        let status = child
            .wait()
            .unwrap_or_else(|error| panic!("waiting for sleep: {error}"));
        assert!(
            !status.success(),
            "sleep finished normally instead of being killed: {status}"
        );
        assert!(!listed(&name), "{name} still exists after drop");
    }

    #[test]
    fn enter_resumes_panics_and_reports_setns_errors() {
        let ns = NetNs::new("unit")
            .unwrap_or_else(|error| panic!("creating a namespace (root?): {error}"));
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ns.enter(|| panic!("inner"))
        }));
        assert!(
            caught.is_err(),
            "a panic inside enter must reach the caller"
        );
        let gone = NetNs {
            name: format!("{NAME_PREFIX}missing-0-0"),
        };
        let error = gone.enter(|| ()).err();
        assert!(
            matches!(error, Some(NetNsError::Open { .. })),
            "expected Open error, got {error:?}"
        );
        std::mem::forget(gone);
    }
}
