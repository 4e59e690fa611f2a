//! Runtime grants: what `ztxdp allow` and `ztxdp revoke` changed on top of
//! the config file, kept in `tunnel.runtime_grants` (JSON) so that they
//! survive a restart of `up`.
//!
//! The file records, per peer name and per group name, grants added and
//! grants revoked. The effective grants of a peer are its configured grants
//! and its groups', plus the added, minus the revoked ones ([`merge`] says
//! exactly how), computed over port sets, so revoking one port out of a
//! configured range works. Writes go to a temporary file that is synced
//! and renamed over the old one: a crash leaves the old or the new file,
//! never a torn one.
//!
//! Every change is a read, modify and write of the whole file, and then of
//! the kernel's maps: two at once would each write what they read plus their
//! own change, and the later write would undo the earlier one. So changes
//! (and `ztxdp up`, from reading the file until its programs are attached)
//! hold an exclusive lock on `PATH.lock` ([`GrantsLock`]); saving needs it.

use std::{
    collections::BTreeMap,
    fs::{File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

pub use self::{
    merge::{GroupGrants, GroupWatch, Merger, Origin, Source},
    set::GrantSet,
};
use crate::{
    audit::writer::{lock_path, open_append},
    config::parse_grant,
    policy::{Grant, TunnelPolicy},
};

mod merge;
mod set;

/// Errors reading or writing the runtime grants file.
#[derive(Debug, thiserror::Error)]
pub enum GrantsError {
    #[error("cannot read runtime grants {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime grants {path} are not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot write runtime grants {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock runtime grants with {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Mode of the grants file: who may reach which port is the host's business,
/// so others may not read it.
const MODE: u32 = 0o640;

/// The exclusive lock on a runtime grants file, held until dropped (or the
/// process dies: the kernel releases it with the descriptor).
#[derive(Debug)]
pub struct GrantsLock {
    /// The grants file (not the lock file).
    path: PathBuf,
    _file: File,
}

impl GrantsLock {
    /// Takes the lock of the grants file `path`, waiting for whoever holds it.
    ///
    /// # Errors
    /// When the lock file cannot be created or locked.
    pub fn acquire(path: &Path) -> Result<Self, GrantsError> {
        let file = Self::lock_file(path)?;
        file.lock().map_err(|e| lock_error(path, e))?;
        Ok(Self {
            path: path.to_owned(),
            _file: file,
        })
    }

    /// Takes the lock of the grants file `path` if nobody holds it;
    /// `None` if somebody does.
    ///
    /// # Errors
    /// When the lock file cannot be created or locked.
    pub fn try_acquire(path: &Path) -> Result<Option<Self>, GrantsError> {
        let file = Self::lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self {
                path: path.to_owned(),
                _file: file,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(lock_error(path, e)),
        }
    }

    /// The lock file of the grants file `path`, opened.
    fn lock_file(path: &Path) -> Result<File, GrantsError> {
        std::fs::create_dir_all(parent_dir(path)).map_err(|e| lock_error(path, e))?;
        open_append(&lock_path(path)).map_err(|e| lock_error(path, e))
    }

    /// The grants file this lock protects.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A failure to lock the grants file `path`, naming its lock file.
fn lock_error(path: &Path, source: std::io::Error) -> GrantsError {
    GrantsError::Lock {
        path: lock_path(path),
        source,
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Changes to one peer's or group's grants, in config notation
/// (`tcp/5432`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerChanges {
    #[serde(default)]
    pub added: Vec<String>,
    #[serde(default)]
    pub revoked: Vec<String>,
}

impl PeerChanges {
    fn allow(&mut self, grant: Grant) {
        let g = grant.to_string();
        self.revoked.retain(|r| *r != g);
        if !self.added.contains(&g) {
            self.added.push(g);
        }
    }

    fn revoke(&mut self, grant: Grant) {
        let g = grant.to_string();
        self.added.retain(|a| *a != g);
        if !self.revoked.contains(&g) {
            self.revoked.push(g);
        }
    }
}

/// The whole runtime grants file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeGrants {
    pub peers: BTreeMap<String, PeerChanges>,
    /// By group name (`ztxdp allow @db-clients 5432`). Left out of a file
    /// without group changes, which is then what it was before groups.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, PeerChanges>,
}

impl RuntimeGrants {
    /// Reads the file; a missing file means no runtime changes.
    ///
    /// # Errors
    /// When the file exists but cannot be read or parsed.
    pub fn load(path: &Path) -> Result<Self, GrantsError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(GrantsError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        let parsed: Self = serde_json::from_str(&text).map_err(|e| GrantsError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let entries = parsed
            .peers
            .iter()
            .map(|(name, c)| (format!("peer {name}"), c))
            .chain(
                parsed
                    .groups
                    .iter()
                    .map(|(name, c)| (format!("group {name}"), c)),
            );
        for (owner, c) in entries {
            for g in c.added.iter().chain(&c.revoked) {
                parse_grant(g).map_err(|e| GrantsError::Parse {
                    path: path.to_owned(),
                    message: format!("{owner}: {g}: {e}"),
                })?;
            }
        }
        Ok(parsed)
    }

    /// Writes the file the lock protects atomically (temporary file, fsync,
    /// rename, fsync dir), mode 0640. Temporaries another writer left (one
    /// killed between creating and renaming its own) are removed first:
    /// with the lock held, no writer is between those steps.
    ///
    /// # Errors
    /// When any step fails; the old file is then untouched.
    pub fn save(&self, lock: &GrantsLock) -> Result<(), GrantsError> {
        let path = lock.path();
        let write_err = |source| GrantsError::Write {
            path: path.to_owned(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self).map_err(|e| write_err(e.into()))?;
        text.push('\n');
        write_atomically(path, &text).map_err(write_err)
    }

    /// Records `grant` as allowed for `peer`.
    pub fn allow(&mut self, peer: &str, grant: Grant) {
        self.peers.entry(peer.to_owned()).or_default().allow(grant);
    }

    /// Records `grant` as revoked for `peer`.
    pub fn revoke(&mut self, peer: &str, grant: Grant) {
        self.peers.entry(peer.to_owned()).or_default().revoke(grant);
    }

    /// Records `grant` as allowed for the group `group`.
    pub fn allow_group(&mut self, group: &str, grant: Grant) {
        self.groups
            .entry(group.to_owned())
            .or_default()
            .allow(grant);
    }

    /// Records `grant` as revoked for the group `group`.
    pub fn revoke_group(&mut self, group: &str, grant: Grant) {
        self.groups
            .entry(group.to_owned())
            .or_default()
            .revoke(grant);
    }

    /// The config's tunnel policy with every peer's grants merged with its
    /// groups' and these changes ([`merge`]): what the kernel enforces.
    /// A peer in no group and not in this file keeps its grants as the
    /// config writes them. Applying the result again changes nothing.
    #[must_use]
    pub fn apply(&self, tunnel: &TunnelPolicy) -> TunnelPolicy {
        let merger = Merger::new(tunnel, self);
        let mut out = tunnel.clone();
        for (index, peer) in out.peers.iter_mut().enumerate() {
            if !merger.untouched(index) {
                peer.grants = merger.effective(index).grants();
            }
        }
        out
    }
}

/// Replaces `path` with `text` atomically (temporary file, fsync, rename,
/// fsync dir), mode 0640: a reader sees the old file or the new one, never
/// a torn one, even if the writer is killed. Temporaries another writer
/// left (one killed between creating and renaming its own) are removed
/// first; callers serialize their writers, so none is between those steps.
///
/// # Errors
/// When any step fails; the old file is then untouched.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir)?;
    let prefix = format!(
        ".{}.tmp.",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("grants")
    );
    remove_temporaries(dir, &prefix);
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(MODE)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    File::open(dir).and_then(|d| d.sync_all())
}

/// Removes the files in `dir` whose names start with `prefix`. A failure
/// only leaves a harmless file behind, so it is logged, not returned.
fn remove_temporaries(dir: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix))
            && let Err(e) = std::fs::remove_file(entry.path())
        {
            tracing::warn!(error = %e, file = %entry.path().display(), "cannot remove a stale temporary file");
        }
    }
}

/// `(base ∪ added) − revoked`, over port sets, as a minimal list of ranges.
#[must_use]
pub fn effective(base: &[Grant], added: &[Grant], revoked: &[Grant]) -> Vec<Grant> {
    GrantSet::of(base)
        .union(&GrantSet::of(added))
        .difference(&GrantSet::of(revoked))
        .grants()
}

#[cfg(test)]
mod tests {
    use super::{set::tests::tcp, *};

    #[test]
    fn revoking_one_port_splits_a_range() {
        let got = effective(&[tcp(8000, 8100)], &[], &[tcp(8050, 8050)]);
        assert_eq!(got, vec![tcp(8000, 8049), tcp(8051, 8100)]);
    }

    #[test]
    fn added_and_revoked_icmp() {
        assert_eq!(effective(&[], &[Grant::Icmp], &[]), vec![Grant::Icmp]);
        assert_eq!(
            effective(&[Grant::Icmp], &[], &[Grant::Icmp]),
            Vec::<Grant>::new()
        );
    }

    #[test]
    fn allow_then_revoke_round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("ztxdp-grants-{}", std::process::id()));
        let path = dir.join("grants.json");
        let mut g = RuntimeGrants::default();
        g.allow("app-2", tcp(5432, 5432));
        g.save(&lock(&path)).unwrap_or_else(|e| panic!("save: {e}"));
        let mut back = RuntimeGrants::load(&path).unwrap_or_else(|e| panic!("load: {e}"));
        assert_eq!(back, g);
        back.revoke("app-2", tcp(5432, 5432));
        assert_eq!(back.peers["app-2"].added, Vec::<String>::new());
        assert_eq!(back.peers["app-2"].revoked, vec!["tcp/5432".to_owned()]);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_file_is_empty_and_a_torn_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("ztxdp-grants-torn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        assert_eq!(
            RuntimeGrants::load(&dir.join("absent.json")).ok(),
            Some(RuntimeGrants::default())
        );
        std::fs::write(dir.join("torn.json"), "{\"peers\": {\"a\"")
            .unwrap_or_else(|e| panic!("write: {e}"));
        assert!(RuntimeGrants::load(&dir.join("torn.json")).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn lock(path: &Path) -> GrantsLock {
        GrantsLock::acquire(path).unwrap_or_else(|e| panic!("locking {}: {e}", path.display()))
    }

    #[test]
    fn the_saved_file_is_mode_0640_and_stale_temporaries_go() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("ztxdp-grants-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
        let path = dir.join("grants.json");
        // What an `allow` killed between creating and renaming its temporary leaves.
        let stale = dir.join(".grants.json.tmp.4194304");
        std::fs::write(&stale, "{\"peers\": {\"a\"").unwrap_or_else(|e| panic!("write: {e}"));
        RuntimeGrants::default()
            .save(&lock(&path))
            .unwrap_or_else(|e| panic!("save: {e}"));
        let mode = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
            .permissions()
            .mode()
            & 0o777;
        // The umask may take more away, never add.
        assert_eq!(mode & !0o640, 0, "{} has mode {mode:o}", path.display());
        assert_eq!(mode & 0o600, 0o600, "{} has mode {mode:o}", path.display());
        assert!(
            !stale.exists(),
            "the stale {} is still there",
            stale.display()
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_lock_is_exclusive_until_dropped() {
        let dir = std::env::temp_dir().join(format!("ztxdp-grants-lock-{}", std::process::id()));
        let path = dir.join("grants.json");
        let held = lock(&path);
        // flock conflicts between open file descriptions, also in one process.
        let other = std::fs::File::open(lock_path(&path))
            .unwrap_or_else(|e| panic!("opening the lock file: {e}"));
        assert!(
            matches!(other.try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            "a second holder got the lock while the first held it"
        );
        drop(held);
        other
            .try_lock()
            .unwrap_or_else(|e| panic!("the lock was not released on drop: {e}"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn concurrent_changes_under_the_lock_lose_nothing() {
        let dir = std::env::temp_dir().join(format!("ztxdp-grants-race-{}", std::process::id()));
        let path = dir.join("grants.json");
        std::thread::scope(|s| {
            for port in 1000..1016 {
                let path = &path;
                s.spawn(move || {
                    let held = lock(path);
                    let mut g = RuntimeGrants::load(path).unwrap_or_else(|e| panic!("load: {e}"));
                    g.allow("app-1", tcp(port, port));
                    g.save(&held).unwrap_or_else(|e| panic!("save: {e}"));
                });
            }
        });
        let got = RuntimeGrants::load(&path).unwrap_or_else(|e| panic!("load: {e}"));
        let mut added = got.peers["app-1"].added.clone();
        added.sort();
        let want: Vec<String> = (1000..1016).map(|p| format!("tcp/{p}")).collect();
        assert_eq!(added, want, "changes made at the same time were lost");
        let _ = std::fs::remove_dir_all(dir);
    }
}
