//! `WireGuard` devices for the tunnel tests: `wireguard-go` (the machine has
//! no `WireGuard` kernel module) run in the foreground inside a test
//! namespace, configured with `wg`, and stopped on drop.
//!
//! wireguard-go keeps its control socket in `/var/run/wireguard/NAME.sock`,
//! which every namespace shares (`ip netns exec` only remounts `/sys`), so
//! device names are unique per process ([`WgDevice::start`] picks them).
use std::{
    io::{self, Write as _},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::netns::{CommandFailed, NetNs, describe, stdout};

/// The port every test device listens on; each lives in its own namespace.
pub const LISTEN_PORT: u16 = 51820;

/// Where wireguard-go puts its control sockets.
const SOCKET_DIR: &str = "/var/run/wireguard";

/// wireguard-go creates its device in milliseconds; this bounds a broken one.
const START_TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error(
        "could not start `{command}` (are wireguard-go and wireguard-tools installed? \
         `cargo xtask test` installs them): {source}"
    )]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Command(#[from] CommandFailed),
    #[error(
        "wireguard-go for {device} in {namespace} exited before its device appeared ({status})"
    )]
    Exited {
        device: String,
        namespace: String,
        status: ExitStatus,
    },
    #[error("wireguard-go did not create {device} in {namespace} within {timeout:?}")]
    Timeout {
        device: String,
        namespace: String,
        timeout: Duration,
    },
}

/// A `WireGuard` key pair in `wg`'s base64 form.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    /// `wg genkey`, then `wg pubkey`.
    ///
    /// # Errors
    /// When `wg` is missing or fails.
    pub fn generate() -> Result<Self, WgError> {
        let private = run(Command::new("wg").arg("genkey"), None)?;
        let public = run(Command::new("wg").arg("pubkey"), Some(&private))?;
        Ok(Self {
            private: private.trim().to_owned(),
            public: public.trim().to_owned(),
        })
    }
}

/// A running wireguard-go device; the process is killed and its control
/// socket removed on drop.
#[derive(Debug)]
pub struct WgDevice {
    name: String,
    namespace: String,
    keys: KeyPair,
    child: Child,
}

impl WgDevice {
    /// Starts wireguard-go in `ns` under a fresh name, gives it a fresh key
    /// pair, makes it listen on [`LISTEN_PORT`] and brings the device up
    /// (without addresses or peers).
    ///
    /// # Errors
    /// When wireguard-go or `wg` cannot run, or the device does not appear.
    pub fn start(ns: &NetNs) -> Result<Self, WgError> {
        let keys = KeyPair::generate()?;
        // `wz` + PID + counter stays within IFNAMSIZ (15) for any PID.
        let name = format!(
            "wz{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut command = ns.cmd("wireguard-go");
        command
            .args(["-f", &name])
            // Only silences the "use the kernel module" banner.
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Ctrl-C reaches only the caller, which stops the device on drop
            // in its own time (after the daemon watching it, say).
            .process_group(0);
        let child = command.spawn().map_err(|source| WgError::Spawn {
            command: describe(&command),
            source,
        })?;
        // From here on drop stops it, whatever fails next.
        let mut device = Self {
            name,
            namespace: ns.name().to_owned(),
            keys,
            child,
        };
        device.wait_created(ns)?;
        let port = LISTEN_PORT.to_string();
        run(
            ns.cmd("wg").args([
                "set",
                &device.name,
                "private-key",
                "/dev/stdin",
                "listen-port",
                &port,
            ]),
            Some(&device.keys.private),
        )?;
        run(
            Command::new("ip").args(["-n", ns.name(), "link", "set", &device.name, "up"]),
            None,
        )?;
        Ok(device)
    }

    fn wait_created(&mut self, ns: &NetNs) -> Result<(), WgError> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().ok().flatten() {
                return Err(WgError::Exited {
                    device: self.name.clone(),
                    namespace: self.namespace.clone(),
                    status,
                });
            }
            if self.socket().exists() && ns.ip(&["link", "show", "dev", &self.name]).is_ok() {
                return Ok(());
            }
            if start.elapsed() >= START_TIMEOUT {
                return Err(WgError::Timeout {
                    device: self.name.clone(),
                    namespace: self.namespace.clone(),
                    timeout: START_TIMEOUT,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The interface name (unique per test process).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn public_key(&self) -> &str {
        &self.keys.public
    }

    /// `wg set NAME peer KEY allowed-ips A,B [endpoint E]`, run in `ns`.
    ///
    /// # Errors
    /// When `wg` fails.
    pub fn add_peer(
        &self,
        ns: &NetNs,
        public_key: &str,
        allowed_ips: &[&str],
        endpoint: Option<SocketAddr>,
    ) -> Result<(), WgError> {
        let allowed = allowed_ips.join(",");
        let mut command = ns.cmd("wg");
        command.args([
            "set",
            &self.name,
            "peer",
            public_key,
            "allowed-ips",
            &allowed,
        ]);
        if let Some(endpoint) = endpoint {
            command.arg("endpoint").arg(endpoint.to_string());
        }
        run(&mut command, None).map(drop)
    }

    /// `wg set NAME peer KEY persistent-keepalive SECONDS`, run in `ns`.
    /// Turning keepalives on sends one at once, which starts a handshake
    /// when there is no session yet, without putting a packet into the
    /// tunnel.
    ///
    /// # Errors
    /// When `wg` fails.
    pub fn keep_alive(&self, ns: &NetNs, public_key: &str, seconds: u16) -> Result<(), WgError> {
        let seconds = seconds.to_string();
        run(
            ns.cmd("wg").args([
                "set",
                &self.name,
                "peer",
                public_key,
                "persistent-keepalive",
                &seconds,
            ]),
            None,
        )
        .map(drop)
    }

    /// Whether a handshake with the peer `public_key` has completed, from
    /// `wg show NAME latest-handshakes` run in `ns`.
    ///
    /// # Errors
    /// When `wg` fails.
    pub fn handshake_done(&self, ns: &NetNs, public_key: &str) -> Result<bool, WgError> {
        let listing = run(
            ns.cmd("wg").args(["show", &self.name, "latest-handshakes"]),
            None,
        )?;
        // "KEY\tUNIX_SECONDS" per peer; 0 until the first handshake.
        Ok(listing.lines().any(|line| {
            let mut fields = line.split_whitespace();
            fields.next() == Some(public_key) && fields.next().is_some_and(|seconds| seconds != "0")
        }))
    }

    fn socket(&self) -> PathBuf {
        PathBuf::from(SOCKET_DIR).join(format!("{}.sock", self.name))
    }
}

impl Drop for WgDevice {
    fn drop(&mut self) {
        // Best effort on teardown paths; SIGKILL leaves the socket behind,
        // hence the removal.
        let _ = self.child.kill();
        let _ = self.child.wait();
        match std::fs::remove_file(self.socket()) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => eprintln!(
                "zt-tests: could not remove {}: {error}",
                self.socket().display()
            ),
        }
    }
}

/// Runs `command`, feeding it `stdin` if given; returns its stdout.
fn run(command: &mut Command, stdin: Option<&str>) -> Result<String, WgError> {
    command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|source| WgError::Spawn {
        command: describe(command),
        source,
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Dropping the pipe afterwards closes it, so the child sees EOF.
        pipe.write_all(text.as_bytes())
            .and_then(|()| pipe.write_all(b"\n"))
            .map_err(|source| WgError::Spawn {
                command: describe(command),
                source,
            })?;
    }
    let output = child.wait_with_output().map_err(|source| WgError::Spawn {
        command: describe(command),
        source,
    })?;
    Ok(stdout(command, &output)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_starts_and_its_process_and_socket_go_on_drop() {
        let ns = NetNs::new("wgunit")
            .unwrap_or_else(|error| panic!("creating a namespace (root?): {error}"));
        let device = WgDevice::start(&ns).unwrap_or_else(|error| panic!("{error}"));
        let peer = KeyPair::generate().unwrap_or_else(|error| panic!("{error}"));
        device
            .add_peer(
                &ns,
                &peer.public,
                &["10.9.0.2/32"],
                Some(SocketAddr::from(([192, 0, 2, 1], LISTEN_PORT))),
            )
            .unwrap_or_else(|error| panic!("{error}"));
        let dump = ns
            .run(&["wg", "show", device.name(), "dump"])
            .unwrap_or_else(|error| panic!("wg show: {error}"));
        let mut lines = dump.lines();
        let interface = lines.next().unwrap_or_default();
        assert!(
            interface.contains(device.public_key()) && interface.contains("51820"),
            "interface line lacks our key or port: {interface}"
        );
        assert!(
            lines.any(|l| l.starts_with(&peer.public) && l.contains("10.9.0.2/32")),
            "peer missing from the dump"
        );
        let socket = device.socket();
        let pid = device.child.id();
        drop(device);
        assert!(!socket.exists(), "{} survived the drop", socket.display());
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| !comm.starts_with("wireguard")),
            "wireguard-go (pid {pid}) survived the drop"
        );
    }
}
