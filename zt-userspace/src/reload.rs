//! The daemon's control socket: `ztxdp reload` asks the daemon of this
//! network namespace to reload its config, as SIGHUP does (with
//! `--confirm`, one that rolls back unless confirmed), and brings back
//! whether it applied it; `ztxdp status` asks whether the audit trail is
//! being written; `ztxdp confirm` and a confirmation's watchdog ask it to
//! confirm or roll back a change (see [`crate::confirm`]).
//!
//! The daemon listens on `/run/ztxdp/control-<netns inode>.sock`, next to
//! its events socket (see [`crate::audit::stream`] for why `/run` and the
//! inode): reachable from any `ip netns exec` of the namespace. A client
//! sends one request line (`reload`, `reload --confirm SECS`, `audit`,
//! `confirm`, `rollback`); the daemon answers with one JSON [`Reply`].

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
    /// Re-read the config and runtime grants, and swap them in; with
    /// `confirm`, roll back after that many seconds unless confirmed.
    Reload { confirm: Option<u64> },
    /// Whether the audit trail is being written.
    Audit,
    /// Confirm the change awaiting confirmation.
    Confirm,
    /// Put back the policy a `reload --confirm` replaced (its watchdog
    /// asks, at the deadline).
    Rollback,
}

impl Request {
    fn line(self) -> String {
        match self {
            Self::Reload { confirm: None } => "reload".to_owned(),
            Self::Reload {
                confirm: Some(seconds),
            } => format!("reload --confirm {seconds}"),
            Self::Audit => "audit".to_owned(),
            Self::Confirm => "confirm".to_owned(),
            Self::Rollback => "rollback".to_owned(),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        match line.split(' ').collect::<Vec<_>>().as_slice() {
            ["reload"] => Some(Self::Reload { confirm: None }),
            ["reload", "--confirm", seconds] => Some(Self::Reload {
                confirm: Some(seconds.parse().ok()?),
            }),
            ["audit"] => Some(Self::Audit),
            ["confirm"] => Some(Self::Confirm),
            ["rollback"] => Some(Self::Rollback),
            _ => None,
        }
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
    /// The change is confirmed, and recorded.
    Confirmed { change: crate::confirm::Change },
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
    #[error("{message}")]
    Declined { message: String },
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

/// `ztxdp reload [--confirm SECS]`: the daemon's summary of what it
/// applied.
///
/// # Errors
/// When no daemon runs here, or it refused the new config.
pub fn request(confirm: Option<u64>) -> Result<String, ReloadError> {
    let request = Request::Reload { confirm };
    match ask(request, SOCKET_WAIT)? {
        Reply::Applied { summary } => Ok(summary),
        Reply::Refused { message } => Err(ReloadError::Refused { message }),
        reply => Err(ReloadError::Unexpected {
            request,
            reply: format!("{reply:?}"),
        }),
    }
}

/// `ztxdp confirm` through the daemon, asked without waiting for a socket
/// that is not there.
///
/// # Errors
/// When no daemon answers, or it declined ([`ReloadError::Declined`]).
pub fn confirm_request() -> Result<crate::confirm::Change, ReloadError> {
    match ask(Request::Confirm, std::time::Duration::ZERO)? {
        Reply::Confirmed { change } => Ok(change),
        Reply::Refused { message } => Err(ReloadError::Declined { message }),
        reply => Err(ReloadError::Unexpected {
            request: Request::Confirm,
            reply: format!("{reply:?}"),
        }),
    }
}

/// A watchdog's rollback through the daemon: its summary.
///
/// # Errors
/// When no daemon answers, or it could not roll back.
pub fn rollback_request() -> Result<String, ReloadError> {
    match ask(Request::Rollback, std::time::Duration::ZERO)? {
        Reply::Applied { summary } => Ok(summary),
        Reply::Refused { message } => Err(ReloadError::Declined { message }),
        reply => Err(ReloadError::Unexpected {
            request: Request::Rollback,
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

#[cfg(test)]
mod tests {
    use super::Request;

    #[test]
    fn every_request_parses_back_from_its_line() {
        for r in [
            Request::Reload { confirm: None },
            Request::Reload { confirm: Some(120) },
            Request::Audit,
            Request::Confirm,
            Request::Rollback,
        ] {
            assert_eq!(Request::parse(&r.line()), Some(r));
        }
        assert_eq!(Request::parse("reload --confirm soon"), None);
        assert_eq!(Request::parse("reload --confirm"), None);
    }
}
