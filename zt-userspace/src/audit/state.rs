//! `audit.state`: the sequence number and chain head of each trail, kept
//! outside the trail (by default in `/var/lib/ztxdp/audit.state`), so that
//! a trail deleted, replaced or cut while no daemon ran does not start over
//! at seq 1 as if it were complete: the next daemon continues from the
//! persisted head with a `gap` record, and `ztxdp audit verify --state`
//! checks a trail against it.
//!
//! One file can hold the heads of several trails (one per network
//! namespace's daemon, say), keyed by the trail's absolute path. It is
//! rewritten atomically (a temporary file, `fsync`, `rename`, `fsync` of
//! the directory) under `STATE.lock`, after each group commit of the trail.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Errors of the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the audit state {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the audit state {} is not a ztxdp state file ({source}); move it away only if you \
         know why it changed: it holds the heads that later trails continue from",
        path.display()
    )]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the audit state {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the audit state {} has no head for the trail {trail}; it has heads for: {known}",
        path.display()
    )]
    NoEntry {
        path: PathBuf,
        trail: String,
        known: String,
    },
}

/// The last record of a trail that reached its file and was synced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub seq: u64,
    /// Its `ztxdp.chain`.
    pub head: String,
    /// When it was persisted, RFC 3339.
    pub updated: String,
}

/// The file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    /// By the trail's absolute `audit.path`.
    trails: BTreeMap<String, Head>,
}

/// The key of `trail` in the state file.
fn key(trail: &Path) -> String {
    std::path::absolute(trail)
        .unwrap_or_else(|_| trail.to_owned())
        .display()
        .to_string()
}

fn read(path: &Path) -> Result<StateFile, StateError> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Parse {
            path: path.to_owned(),
            source,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(StateFile::default()),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The persisted head of `trail`, if any.
///
/// # Errors
/// When the state file exists but cannot be read or parsed.
pub fn load(path: &Path, trail: &Path) -> Result<Option<Head>, StateError> {
    Ok(read(path)?.trails.remove(&key(trail)))
}

/// The head of `trail`, which must be in the state file: for
/// `ztxdp audit verify --state`.
///
/// # Errors
/// When the file cannot be read, or has no head for `trail`.
pub fn expect(path: &Path, trail: &Path) -> Result<Head, StateError> {
    let mut state = read(path)?;
    let wanted = key(trail);
    state
        .trails
        .remove(&wanted)
        .ok_or_else(|| StateError::NoEntry {
            path: path.to_owned(),
            trail: wanted,
            known: if state.trails.is_empty() {
                "none".to_owned()
            } else {
                state.trails.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
}

/// Checks, before anything is attached, that the state file can be read
/// and its directory created.
///
/// # Errors
/// As [`load`], or when the directory cannot be created.
pub fn check(path: &Path) -> Result<(), StateError> {
    create_dir(path)?;
    read(path).map(drop)
}

fn create_dir(path: &Path) -> Result<(), StateError> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| StateError::Write {
                path: dir.to_owned(),
                source,
            }),
        None => Ok(()),
    }
}

/// Records `head` as the head of `trail`, atomically.
///
/// # Errors
/// When the file cannot be read, locked, written, or renamed into place.
pub fn store(path: &Path, trail: &Path, head: Head) -> Result<(), StateError> {
    let werr = |p: &Path| {
        let p = p.to_owned();
        move |source| StateError::Write { path: p, source }
    };
    create_dir(path)?;
    let lock_path = with_suffix(path, ".lock");
    let lock = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&lock_path)
        .map_err(werr(&lock_path))?;
    // Daemons of other network namespaces update their own trails' heads
    // in the same file: read, change and replace it under one lock.
    lock.lock().map_err(werr(&lock_path))?;
    let mut state = read(path)?;
    state.trails.insert(key(trail), head);
    let text = serde_json::to_vec_pretty(&state).map_err(|e| StateError::Write {
        path: path.to_owned(),
        source: io::Error::other(e),
    })?;
    let tmp = with_suffix(path, &format!(".tmp.{}", std::process::id()));
    let write = || -> io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o640)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        StateError::Write {
            path: path.to_owned(),
            source,
        }
    })
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::tests::TempDir;

    fn head(seq: u64) -> Head {
        Head {
            seq,
            head: format!("{seq:064x}"),
            updated: "2026-12-05T00:00:00Z".into(),
        }
    }

    #[test]
    fn heads_of_several_trails_live_side_by_side() {
        let dir = TempDir::new("state");
        let state = dir.0.join("lib/audit.state");
        let (a, b) = (dir.0.join("a.jsonl"), dir.0.join("b.jsonl"));
        assert_eq!(load(&state, &a).ok().flatten(), None, "no file yet");
        store(&state, &a, head(5)).unwrap_or_else(|e| panic!("{e}"));
        store(&state, &b, head(9)).unwrap_or_else(|e| panic!("{e}"));
        store(&state, &a, head(6)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(load(&state, &a).ok().flatten(), Some(head(6)));
        assert_eq!(load(&state, &b).ok().flatten(), Some(head(9)));
        let missing = expect(&state, &dir.0.join("c.jsonl"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            missing.contains("a.jsonl") && missing.contains("b.jsonl"),
            "the error lists the trails it knows: {missing}"
        );
        let leftovers: Vec<_> = fs::read_dir(dir.0.join("lib"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains(".tmp"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_fresh_start() {
        let dir = TempDir::new("state-bad");
        let state = dir.0.join("audit.state");
        fs::write(&state, "{\"trails\": 5").unwrap_or_else(|e| panic!("{e}"));
        assert!(matches!(
            load(&state, &dir.0.join("a.jsonl")),
            Err(StateError::Parse { .. })
        ));
    }
}
