//! The live stream behind `ztxdp events --follow`: the daemon serves every
//! record it has written, once, to each client of a unix socket.
//!
//! The socket is `/run/ztxdp/events-<netns inode>.sock`: `/run` is shared
//! by every `ip netns exec` (which remounts only `/sys`), and the inode of
//! `/proc/self/ns/net` names the network namespace, so `ztxdp events` finds
//! the daemon of its own namespace from any shell in it. The directory is
//! root's alone (mode 0700): the stream carries the whole audit trail.
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
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::AsyncWriteExt as _,
    net::{UnixListener, UnixStream},
    sync::broadcast,
};

use super::{
    AuditError, format,
    record::Record,
    writer::{self, Sealed},
};
use crate::policy::AuditFormat;

/// Directory of the per-namespace sockets.
pub const SOCKET_DIR: &str = "/run/ztxdp";

/// One line on the events socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Record {
        record: Record,
        chain: String,
    },
    /// This client missed `missed` records because it read too slowly.
    Lagged {
        missed: u64,
    },
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

/// Errors of the `events` client.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot find this network namespace (/proc/self/ns/net): {source}")]
    Namespace {
        #[source]
        source: io::Error,
    },
    #[error("no ztxdp daemon serves events in this network namespace ({}); is `ztxdp up` running here?", path.display())]
    Connect {
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
/// When `/proc/self/ns/net` cannot be read.
pub fn socket_path() -> io::Result<PathBuf> {
    let ino = fs::metadata("/proc/self/ns/net")?.ino();
    Ok(PathBuf::from(SOCKET_DIR).join(format!("events-{ino}.sock")))
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
    /// Binds the namespace's socket, replacing a stale one.
    ///
    /// # Errors
    /// When the directory or the socket cannot be created.
    pub fn bind() -> Result<Self, AuditError> {
        let path = socket_path().map_err(|source| AuditError::Socket {
            path: PathBuf::from(SOCKET_DIR),
            source,
        })?;
        let err = |source| AuditError::Socket {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(SOCKET_DIR)
            .map_err(err)?;
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
                    record: s.record.clone(),
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
/// namespace writes from now on, until the daemon stops. Missed records are
/// reported on standard error.
///
/// # Errors
/// When there is no daemon, or reading or printing fails.
pub fn follow(output: Output, out: &mut impl Write) -> Result<(), StreamError> {
    let path = socket_path().map_err(|source| StreamError::Namespace { source })?;
    let conn =
        std::os::unix::net::UnixStream::connect(&path).map_err(|source| StreamError::Connect {
            path: path.clone(),
            source,
        })?;
    let mut reader = BufReader::new(conn);
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
                writeln!(out, "{}", output.render(&record, &chain))
                    .map_err(|source| StreamError::Output { source })?;
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

/// `ztxdp events` without `--follow`: every record in the audit files of
/// `path` (rotated ones first), then returns how many it printed. Lines
/// that are not records are reported on standard error and skipped.
///
/// # Errors
/// When a file cannot be read or printing fails.
pub fn print_files(path: &Path, output: Output, out: &mut impl Write) -> Result<u64, StreamError> {
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
