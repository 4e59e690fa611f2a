//! The daemon's control socket: `ztxdp reload` asks the daemon of this
//! network namespace to reload its config, as SIGHUP does, and brings back
//! whether it applied it; `ztxdp status` asks whether the audit trail is
//! being written.
//!
//! The daemon listens on `/run/ztxdp/control-<netns inode>.sock`, next to
//! its events socket (see [`crate::audit::stream`] for why `/run` and the
//! inode): reachable from any `ip netns exec` of the namespace. A client
//! sends one request line (`reload` or `audit`); the daemon answers with
//! one JSON [`Reply`].

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
    sync::{mpsc, oneshot},
};

use crate::audit::{
    Health,
    stream::{self, SOCKET_WAIT, StreamError},
};

/// Name of the control socket (see [`stream::socket_path_named`]).
pub const SOCKET: &str = "control";

/// What a client asks the daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Re-read the config and runtime grants, and swap them in.
    Reload,
    /// Whether the audit trail is being written.
    Audit,
}

impl Request {
    const fn line(self) -> &'static str {
        match self {
            Self::Reload => "reload",
            Self::Audit => "audit",
        }
    }

    fn parse(line: &str) -> Option<Self> {
        [Self::Reload, Self::Audit]
            .into_iter()
            .find(|r| r.line() == line)
    }
}
/// A reload validates and writes maps in well under a second; this bounds
/// a hung daemon or a client that never sends its request.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon's answer to a reload request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The new policy is in the maps.
    Applied { summary: String },
    /// Nothing was changed, because of `message`.
    Refused { message: String },
    /// The state of the audit trail.
    Audit { health: Health },
}

/// Errors of `ztxdp reload`.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Connect(#[from] StreamError),
    #[error("talking to the daemon: {source}")]
    Io {
        #[source]
        source: io::Error,
    },
    #[error("the daemon's answer is not a reply ({source}): {line:?}")]
    Protocol {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the daemon refused the reload; the running policy is unchanged: {message}")]
    Refused { message: String },
    #[error("the daemon answered {reply} to {request:?}")]
    Unexpected { request: Request, reply: String },
}

/// Sends `request` to the daemon of this namespace (waiting up to `wait`
/// for its socket) and reads its reply.
fn ask(request: Request, wait: std::time::Duration) -> Result<Reply, ReloadError> {
    let path =
        stream::socket_path_named(SOCKET).map_err(|source| StreamError::Namespace { source })?;
    let conn = stream::connect(&path, wait)?;
    let io_err = |source| ReloadError::Io { source };
    conn.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    (&conn)
        .write_all(format!("{}\n", request.line()).as_bytes())
        .map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(io_err)?;
    serde_json::from_str(line.trim_end()).map_err(|source| ReloadError::Protocol { line, source })
}

/// `ztxdp reload`: the daemon's summary of what it applied.
///
/// # Errors
/// When no daemon runs here, or it refused the new config.
pub fn request() -> Result<String, ReloadError> {
    match ask(Request::Reload, SOCKET_WAIT)? {
        Reply::Applied { summary } => Ok(summary),
        Reply::Refused { message } => Err(ReloadError::Refused { message }),
        reply @ Reply::Audit { .. } => Err(ReloadError::Unexpected {
            request: Request::Reload,
            reply: format!("{reply:?}"),
        }),
    }
}

/// Whether the daemon of this namespace writes its audit trail; asked
/// without waiting for a socket that is not there.
///
/// # Errors
/// When no daemon answers.
pub fn audit_health() -> Result<Health, ReloadError> {
    match ask(Request::Audit, std::time::Duration::ZERO)? {
        Reply::Audit { health } => Ok(health),
        reply => Err(ReloadError::Unexpected {
            request: Request::Audit,
            reply: format!("{reply:?}"),
        }),
    }
}

/// A request waiting for the daemon's loop, with where to answer.
pub type Pending = (Request, oneshot::Sender<Reply>);

/// Reads a client's request on a task of its own (so a silent client never
/// stalls the daemon), hands it to the daemon's loop through `requests`,
/// and writes the answer back.
pub fn serve(client: UnixStream, requests: mpsc::Sender<Pending>) {
    tokio::spawn(async move {
        let (read, mut write) = client.into_split();
        let mut line = String::new();
        let mut read = tokio::io::BufReader::new(read);
        if !matches!(
            tokio::time::timeout(TIMEOUT, read.read_line(&mut line)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let Some(request) = Request::parse(line.trim()) else {
            return;
        };
        let (tx, rx) = oneshot::channel();
        if requests.send((request, tx)).await.is_err() {
            return;
        }
        let Ok(reply) = rx.await else { return };
        let Ok(mut text) = serde_json::to_string(&reply) else {
            return;
        };
        text.push('\n');
        // A client that went away is not the daemon's problem.
        let _ = write.write_all(text.as_bytes()).await;
    });
}
