//! The live stream behind `ztxdp events --follow`: the daemon serves every
//! record it has written, once, to each client of a unix socket.
//!
//! The socket is `/run/ztxdp/events-<netns inode>.sock`: `/run` is shared
//! by every `ip netns exec` (which remounts only `/sys`), and the inode of
//! `/proc/thread-self/ns/net` names the network namespace, so `ztxdp events` finds
//! the daemon of its own namespace from any shell in it. The directory is
//! root's alone (mode 0700), and the socket too (0600): the stream carries
//! the whole audit trail. With `audit.socket_group` the socket is that
//! group's too (0660), and the directory lets the group through to it
//! (0710: it can open a name it knows, not list the others).
//!
//! Each line the daemon sends is a JSON [`Message`]. A record goes out only
//! after it is in the file. A client that reads too slowly to keep up gets
//! a `lagged` message with the number of records it missed (they are in the
//! file), never a record twice.

use std::{
    fs,
    io::{self, BufRead as _, BufReader, Write},
    os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
    path::Path,
    path::PathBuf,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use super::{
    AuditError, format,
    record::{Body, Record},
    writer::{self, Sealed},
};
use crate::policy::{AuditFormat, SocketGroup};

/// Directory of the per-namespace sockets.
pub const SOCKET_DIR: &str = "/run/ztxdp";

/// How long `events --follow` waits for the daemon's socket. `ztxdp up`
/// reports ready once its programs are attached, and binds the socket a
/// moment later, once it holds the audit file: a follower started on that
/// signal can be there first.
pub(crate) const SOCKET_WAIT: Duration = Duration::from_secs(5);

/// One line on the events socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Record {
        /// Boxed: a record is far larger than the other messages.
        record: Box<Record>,
        chain: String,
    },
    /// This client missed `missed` records because it read too slowly.
    Lagged { missed: u64 },
}

/// How `ztxdp events` prints records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// One of the file formats: the exact line the file holds (when the file
    /// is written in that format).
    Json(AuditFormat),
    Cef,
}

impl Output {
    /// The printed line (without newline).
    #[must_use]
    pub fn render(self, record: &Record, chain: &str) -> String {
        match self {
            Self::Json(f) => format::line(f, record, chain),
            Self::Cef => format::cef(record, chain),
        }
    }
}

/// Which records `ztxdp events` prints: every one, or the decisions and
/// summaries that pass every filter given. A filter given several values
/// takes any of them (`--reason a --reason b`). Records about no single
/// decision (`lost`, `gap`, `syslog_dropped`) pass no filter. Filtering is
/// the client's: the daemon streams every record to every reader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// `allow` or `deny` ([`super::record::Flow::action`], a decision's
    /// `event.action` in ECS); a summary has the action of its decisions.
    pub actions: Vec<String>,
    /// Reason codes.
    pub reasons: Vec<u32>,
    /// Tunnel peers, by name or public key.
    pub peers: Vec<String>,
    /// Prefixes holding the packet's source.
    pub sources: Vec<IpNet>,
}

impl Filter {
    /// Whether `record` is to be printed.
    #[must_use]
    pub fn matches(&self, record: &Record) -> bool {
        if *self == Self::default() {
            return true;
        }
        let (Body::Decision { flow, .. } | Body::Summary { flow, .. }) = &record.body else {
            return false;
        };
        any_of(&self.actions, |a| a == flow.action())
            && any_of(&self.reasons, |&r| r == flow.reason)
            && any_of(&self.peers, |p| {
                flow.peer
                    .as_ref()
                    .is_some_and(|peer| *p == peer.name || Some(p) == peer.public_key.as_ref())
            })
            && any_of(&self.sources, |net| {
                flow.ip.as_ref().is_some_and(|ip| net.contains(&ip.src))
            })
    }
}

/// A filter of no values passes all; else any value that `hit`s.
fn any_of<T>(values: &[T], hit: impl Fn(&T) -> bool) -> bool {
    values.is_empty() || values.iter().any(hit)
}

/// Errors of the `events` client.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot find this network namespace (/proc/thread-self/ns/net): {source}")]
    Namespace {
        #[source]
        source: io::Error,
    },
    #[error("no ztxdp daemon listens in this network namespace ({}); is `ztxdp up` running here?", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket is there, and root's alone: whether a daemon listens
    /// cannot be told.
    #[error("may not connect to the daemon's socket {}", path.display())]
    Refused {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading from the daemon: {source}")]
    Read {
        #[source]
        source: io::Error,
    },
    #[error("the daemon sent a line that is not a message ({source}): {line}")]
    Protocol {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read audit file {}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing to standard output: {source}")]
    Output {
        #[source]
        source: io::Error,
    },
}

/// The socket path of the current network namespace.
///
/// # Errors
/// When `/proc/thread-self/ns/net` cannot be read.
pub fn socket_path() -> io::Result<PathBuf> {
    socket_path_named("events")
}

/// The path of the daemon's socket `name` (`events`, `control`) in the
/// current network namespace.
///
/// # Errors
/// When `/proc/thread-self/ns/net` cannot be read.
pub fn socket_path_named(name: &str) -> io::Result<PathBuf> {
    namespace_file(name, "sock")
}

/// Creates [`SOCKET_DIR`], root's alone (mode 0700), if it is missing.
/// Whoever writes there first creates it: the daemon's sockets carry the
/// audit trail, and a directory made with the umask's mode would not be
/// tightened later.
///
/// # Errors
/// When it cannot be created.
pub fn create_dir() -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(SOCKET_DIR)
}

/// `/run/ztxdp/<stem>-<netns inode>.<extension>`: a file of the current
/// network namespace's daemon, found from any `ip netns exec` of it.
///
/// # Errors
/// When `/proc/thread-self/ns/net` cannot be read.
pub fn namespace_file(stem: &str, extension: &str) -> io::Result<PathBuf> {
    // The calling thread's namespace, not the process's: a thread that
    // entered another namespace (setns) means that one.
    let ino = fs::metadata("/proc/thread-self/ns/net")?.ino();
    Ok(PathBuf::from(SOCKET_DIR).join(format!("{stem}-{ino}.{extension}")))
}

/// The daemon's listening socket.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Inode of the socket file we bound, so we never remove a newer
    /// daemon's socket.
    ino: u64,
}

impl Server {
    /// Binds the namespace's events socket, replacing a stale one, for
    /// root and the members of `group` (`audit.socket_group`).
    ///
    /// # Errors
    /// When the directory or the socket cannot be created, or given to
    /// the group.
    pub fn bind(group: Option<&SocketGroup>) -> Result<Self, AuditError> {
        let server = Self::bind_named("events")?;
        if let Some(group) = group {
            server.share(group)?;
        }
        Ok(server)
    }

    /// Binds the namespace's socket `name` (see [`socket_path_named`]),
    /// root's alone.
    ///
    /// # Errors
    /// When the directory or the socket cannot be created.
    pub fn bind_named(name: &str) -> Result<Self, AuditError> {
        let path = socket_path_named(name).map_err(|source| AuditError::Socket {
            path: PathBuf::from(SOCKET_DIR),
            source,
        })?;
        let err = |source| AuditError::Socket {
            path: path.clone(),
            source,
        };
        create_dir().map_err(err)?;
        // Only one daemon per namespace writes the trail (the audit lock
        // makes the newcomer wait), so a socket left here is stale.
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(err(e)),
            _ => {}
        }
        let listener = UnixListener::bind(&path).map_err(err)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(err)?;
        let ino = fs::metadata(&path).map_err(err)?.ino();
        Ok(Self {
            listener,
            path,
            ino,
        })
    }

    /// Lets the members of `group` connect: the socket becomes the
    /// group's with mode 0660, and the directory 0710 with that group.
    fn share(&self, group: &SocketGroup) -> Result<(), AuditError> {
        let give = |path: &Path, mode: u32| {
            std::os::unix::fs::chown(path, None, Some(group.gid))
                .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(mode)))
                .map_err(|source| AuditError::SocketGroup {
                    path: path.to_owned(),
                    group: group.name.clone(),
                    source,
                })
        };
        give(Path::new(SOCKET_DIR), 0o710)?;
        give(&self.path, 0o660)
    }

    /// The next client. Cancel-safe.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn accept(&self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(s, _)| s)
    }

    /// Removes the socket file if it is still ours.
    pub fn remove(&self) {
        if fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Sends every record published after the client connected, until it goes
/// away.
pub async fn serve(mut stream: UnixStream, mut rx: broadcast::Receiver<Arc<Sealed>>) {
    let mut buf = Vec::new();
    loop {
        let first = rx.recv().await;
        // Batch what is already there into one write.
        let mut next = Some(first);
        while let Some(item) = next.take() {
            let message = match item {
                Ok(s) => Message::Record {
                    record: Box::new(s.record.clone()),
                    chain: s.chain.clone(),
                },
                Err(broadcast::error::RecvError::Lagged(missed)) => Message::Lagged { missed },
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if serde_json::to_writer(&mut buf, &message).is_err() {
                return;
            }
            buf.push(b'\n');
            next = match rx.try_recv() {
                Ok(s) => Some(Ok(s)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    Some(Err(broadcast::error::RecvError::Lagged(n)))
                }
                Err(_) => None,
            };
        }
        if stream.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
    }
}

/// `ztxdp events --follow`: prints every record the daemon of this network
/// namespace writes from now on that passes `filter`, until the daemon
/// stops. Missed records are reported on standard error.
///
/// # Errors
/// When there is no daemon, or reading or printing fails.
pub fn follow(output: Output, filter: &Filter, out: &mut impl Write) -> Result<(), StreamError> {
    let path = socket_path().map_err(|source| StreamError::Namespace { source })?;
    let mut reader = BufReader::new(connect(&path, SOCKET_WAIT)?);
    let mut line = String::new();
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .map_err(|source| StreamError::Read { source })?
            == 0
        {
            return Ok(());
        }
        let message: Message =
            serde_json::from_str(line.trim_end()).map_err(|source| StreamError::Protocol {
                line: line.trim_end().to_owned(),
                source,
            })?;
        match message {
            Message::Record { record, chain } => {
                if filter.matches(&record) {
                    writeln!(out, "{}", output.render(&record, &chain))
                        .map_err(|source| StreamError::Output { source })?;
                }
            }
            Message::Lagged { missed } => {
                tracing::warn!(
                    missed,
                    "this reader fell behind and missed records; they are in the audit file"
                );
            }
        }
        // Line by line for a shipper at the other end of a pipe, but one
        // flush per burst.
        if reader.buffer().is_empty() {
            out.flush()
                .map_err(|source| StreamError::Output { source })?;
        }
    }
}

/// Connects to the daemon's socket at `path`, waiting up to `wait` while
/// the socket is missing or nothing listens on it yet (a stale file of a
/// daemon killed earlier, until the new one replaces it).
pub(crate) fn connect(
    path: &Path,
    wait: Duration,
) -> Result<std::os::unix::net::UnixStream, StreamError> {
    let deadline = Instant::now() + wait;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(conn) => return Ok(conn),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(50));
            }
            Err(source) if crate::report::refused_io(&source) => {
                return Err(StreamError::Refused {
                    path: path.to_owned(),
                    source,
                });
            }
            Err(source) => {
                return Err(StreamError::Connect {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
}

/// `ztxdp events` without `--follow`: every record in the audit files of
/// `path` (rotated ones first) that passes `filter`, then returns how many
/// it printed. Lines that are not records are reported on standard error
/// and skipped.
///
/// # Errors
/// When a file cannot be read or printing fails.
pub fn print_files(
    path: &Path,
    output: Output,
    filter: &Filter,
    out: &mut impl Write,
) -> Result<u64, StreamError> {
    let mut printed = 0;
    for file in writer::files(path) {
        let err = |source| StreamError::File {
            path: file.clone(),
            source,
        };
        let reader = BufReader::new(fs::File::open(&file).map_err(err)?);
        for (n, line) in reader.lines().enumerate() {
            let line = line.map_err(err)?;
            match format::parse(&line) {
                Ok((record, _)) if !filter.matches(&record) => {}
                Ok((record, chain)) => {
                    writeln!(out, "{}", output.render(&record, &chain))
                        .map_err(|source| StreamError::Output { source })?;
                    printed += 1;
                }
                Err(e) => tracing::warn!(
                    file = %file.display(),
                    line = n + 1,
                    error = %e,
                    "skipping a line that is not a record"
                ),
            }
        }
    }
    out.flush()
        .map_err(|source| StreamError::Output { source })?;
    Ok(printed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::tests::TempDir;

    fn decision(reason: u32, src: &str, peer: Option<(&str, &str)>) -> Record {
        use super::super::record::{Flow, IpFlow, Peer, Program};
        Record {
            seq: 1,
            time_ns: 0,
            body: Body::Decision {
                flow: Flow {
                    program: Program::Tunnel,
                    interface: "wg0".into(),
                    reason,
                    ip: Some(IpFlow {
                        src: src.parse().expect("an address"),
                        dst: "10.100.0.254".parse().expect("an address"),
                        protocol: zt_common::proto::TCP,
                        src_port: Some(40_000),
                        dst_port: Some(5432),
                        tcp_flags: Some(2),
                    }),
                    peer: peer.map(|(name, key)| Peer {
                        name: name.into(),
                        public_key: Some(key.into()),
                        groups: Vec::new(),
                    }),
                    service: None,
                    would_drop: false,
                },
                suppressed: 0,
            },
            previous_run: false,
        }
    }

    #[test]
    fn filters_keep_the_decisions_that_match_each_one_given() {
        use zt_common::reason;
        let granted = decision(reason::PASS_GRANT, "10.100.0.1", Some(("app-1", "K1=")));
        let refused = decision(
            reason::DROP_NOT_GRANTED,
            "10.100.0.2",
            Some(("app-2", "K2=")),
        );
        let stranger = decision(reason::DROP_PEER_UNKNOWN, "10.200.0.1", None);
        let gap = Record {
            seq: 2,
            time_ns: 0,
            body: Body::Gap {
                previous_seq: 1,
                previous_head: String::new(),
                reason: super::super::record::GapReason::Unlinked,
            },
            previous_run: false,
        };
        let all = [&granted, &refused, &stranger, &gap];
        let kept = |f: Filter| -> Vec<u64> {
            (0u64..)
                .zip(all)
                .filter(|(_, r)| f.matches(r))
                .map(|(i, _)| i)
                .collect()
        };
        let net = |s: &str| s.parse::<IpNet>().expect("a prefix");
        assert_eq!(kept(Filter::default()), [0, 1, 2, 3], "no filter keeps all");
        let deny = || vec!["deny".to_owned()];
        assert_eq!(
            kept(Filter {
                actions: deny(),
                ..Filter::default()
            }),
            [1, 2]
        );
        assert_eq!(
            kept(Filter {
                reasons: vec![reason::PASS_GRANT, reason::DROP_PEER_UNKNOWN],
                ..Filter::default()
            }),
            [0, 2],
            "a filter's values are alternatives"
        );
        assert_eq!(
            kept(Filter {
                peers: vec!["K2=".into(), "app-1".into()],
                ..Filter::default()
            }),
            [0, 1],
            "by name or key"
        );
        assert_eq!(
            kept(Filter {
                sources: vec![net("10.100.0.0/24")],
                ..Filter::default()
            }),
            [0, 1]
        );
        assert_eq!(
            kept(Filter {
                actions: deny(),
                sources: vec![net("10.100.0.0/24")],
                ..Filter::default()
            }),
            [1],
            "filters together all hold"
        );
    }

    #[test]
    fn a_follower_waits_for_a_socket_bound_after_it_started() {
        let dir = TempDir::new("follow-late");
        let path = dir.0.join("events.sock");
        let bound = {
            let path = path.clone();
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(200));
                std::os::unix::net::UnixListener::bind(&path).expect("binding the socket")
            })
        };
        let conn = connect(&path, Duration::from_secs(5));
        let _listener = bound.join().expect("the binding thread");
        assert!(conn.is_ok(), "{conn:?}");
    }

    #[test]
    fn without_a_daemon_the_wait_ends_in_the_connect_error() {
        let dir = TempDir::new("follow-none");
        let path = dir.0.join("events.sock");
        let started = Instant::now();
        let err = connect(&path, Duration::from_millis(300)).expect_err("nothing listens");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "gave up early"
        );
        assert!(
            matches!(&err, StreamError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("is `ztxdp up` running here?"),
            "{err}"
        );
    }
}
