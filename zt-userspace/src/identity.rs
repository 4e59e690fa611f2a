//! The identity of the running policy: which config the attached programs
//! were filled from (its absolute path and SHA-256), which peer holds which
//! index in their maps, and which daemon serves them.
//!
//! `allow`, `revoke` and `list` write and read the kernel maps by peer
//! index, and an index is a position in *a* config: taken from another
//! config that names the same peers in another order, it changes the
//! wrong peer. So `up` (once attached) and every successful reload write
//! this file, and those commands find their config through it and refuse
//! one that does not match it.
//!
//! It lives at `/run/ztxdp/policy-<netns inode>.json`, next to the
//! daemon's sockets (see [`crate::audit::stream`] for why `/run` and the
//! inode). It is a file, so it outlives a `kill -9` of the daemon as the
//! programs do; it records their program ids, so a reader tells a file
//! whose programs are gone or replaced (stale) from a live one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{
    attach::Attached,
    audit::stream,
    build_info::Build,
    config::{Config, ConfigError},
    grants,
    policy::{Mode, TunnelPolicy},
};

/// The file's name stem (see [`stream::namespace_file`]).
const STEM: &str = "policy";
/// Where the config is when nothing else says.
pub const DEFAULT_CONFIG: &str = "/etc/ztxdp/ztxdp.toml";
/// The environment variable naming the config.
pub const CONFIG_ENV: &str = "ZTXDP_CONFIG";

/// Errors reading or writing the identity file, or checking a config
/// against it.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot write the running policy's identity {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the running policy's identity {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find this network namespace (/proc/thread-self/ns/net): {source}")]
    Namespace {
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is not the policy the running programs enforce: they were loaded from {} \
         ({why}); {hint}",
        given.display(), running.display()
    )]
    Mismatch {
        given: PathBuf,
        running: PathBuf,
        why: &'static str,
        /// What to do instead.
        hint: String,
    },
}

/// One tunnel peer of the running policy; its index is its position.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerIdentity {
    pub name: String,
    pub public_key: Option<String>,
}

/// The content of the identity file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Absolute path of the config the programs were filled from.
    pub config: PathBuf,
    /// Hex SHA-256 of that file's bytes when it was read.
    pub digest: String,
    /// The tunnel peers, by map index.
    pub peers: Vec<PeerIdentity>,
    /// The daemon that wrote it.
    pub pid: u32,
    /// Kernel ids of the programs it describes.
    pub edge_program_id: Option<u32>,
    pub tunnel_program_id: Option<u32>,
    /// The binary that loaded them; `None` in a file written before it
    /// was recorded.
    #[serde(default)]
    pub build: Option<Build>,
    /// The programs' modes (`mode`, or `up --dry-run`), which they were
    /// loaded with; `None` without that program, and in files written
    /// before modes existed.
    #[serde(default)]
    pub edge_mode: Option<Mode>,
    #[serde(default)]
    pub tunnel_mode: Option<Mode>,
}

impl Identity {
    /// The identity of `config` (with its tunnel policy `tunnel`) enforced
    /// by the given programs, written by this process.
    #[must_use]
    pub fn new(
        config: &Config,
        tunnel: Option<&TunnelPolicy>,
        edge_program_id: Option<u32>,
        tunnel_program_id: Option<u32>,
    ) -> Self {
        Self {
            config: std::path::absolute(&config.path).unwrap_or_else(|_| config.path.clone()),
            digest: config.digest.clone(),
            peers: peer_table(tunnel),
            pid: std::process::id(),
            edge_program_id,
            tunnel_program_id,
            build: Some(Build::this()),
            edge_mode: config.policy.edge.as_ref().map(|e| e.mode),
            tunnel_mode: config.policy.tunnel.as_ref().map(|t| t.mode),
        }
    }

    /// Writes the file of this network namespace atomically, mode 0640.
    ///
    /// # Errors
    /// When the file cannot be written; the old one is then untouched.
    pub fn save(&self) -> Result<(), IdentityError> {
        let path = path()?;
        let write_err = |source| IdentityError::Write {
            path: path.clone(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self).map_err(|e| write_err(e.into()))?;
        text.push('\n');
        stream::create_dir().map_err(write_err)?;
        grants::write_atomically(&path, &text).map_err(write_err)
    }

    /// The identity of the programs attached here: the file, if the
    /// program ids it records are the attached ones. `None` when nothing
    /// is attached, or the file is missing, not an identity, or stale.
    ///
    /// # Errors
    /// When the file is there but cannot be read: a user who may not read
    /// it (it is root's) cannot tell which config runs, and must not be
    /// told that none does.
    pub fn live(attached: &Attached) -> Result<Option<Self>, IdentityError> {
        if attached.is_empty() {
            return Ok(None);
        }
        let path = path()?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Read { path, source }),
        };
        let Ok(id) = serde_json::from_str::<Self>(&text) else {
            return Ok(None);
        };
        let ids = |found: &[crate::attach::Attachment]| found.first().map(|a| a.program_id);
        let matches = id.edge_program_id == ids(&attached.edge)
            && id.tunnel_program_id == ids(&attached.tunnel);
        Ok(matches.then_some(id))
    }

    /// Whether `config` is the policy these programs enforce: the same
    /// bytes, or at least the same peers at the same indices.
    ///
    /// # Errors
    /// [`IdentityError::Mismatch`], naming both files, when it is not.
    pub fn check(&self, config: &Config) -> Result<(), IdentityError> {
        let why = if peer_table(config.policy.tunnel.as_ref()) != self.peers {
            "its peers are not the running peers in the same order"
        } else if config.digest == self.digest {
            return Ok(());
        } else {
            "its content differs"
        };
        let same_file = std::path::absolute(&config.path).is_ok_and(|p| p == self.config);
        let hint = if same_file {
            "it was edited since: apply it with `ztxdp reload` first".to_owned()
        } else {
            format!(
                "use --config {} (or no --config), or make this one the running policy \
                 with `ztxdp up --config {}`",
                self.config.display(),
                config.path.display()
            )
        };
        Err(IdentityError::Mismatch {
            given: config.path.clone(),
            running: self.config.clone(),
            why,
            hint,
        })
    }
}

/// Removes the identity file once the programs it describes are detached,
/// if it still describes `program_ids` (edge, tunnel) or, with `None`,
/// whatever it describes: a file a newer daemon wrote is left alone. A
/// failure only leaves a stale file behind, which readers ignore, so it
/// is logged.
pub fn forget(program_ids: Option<(Option<u32>, Option<u32>)>) {
    let Ok(path) = path() else { return };
    if let Some(ids) = program_ids {
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let Ok(id) = serde_json::from_str::<Identity>(&text) else {
            return;
        };
        if (id.edge_program_id, id.tunnel_program_id) != ids {
            return;
        }
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(error = %e, file = %path.display(), "cannot remove the identity of detached programs");
        }
        _ => {}
    }
}

/// The peers of `tunnel` by index.
fn peer_table(tunnel: Option<&TunnelPolicy>) -> Vec<PeerIdentity> {
    tunnel.map_or_else(Vec::new, |t| {
        t.peers
            .iter()
            .map(|p| PeerIdentity {
                name: p.name.clone(),
                public_key: p.public_key.clone(),
            })
            .collect()
    })
}

/// The identity file of the current network namespace.
///
/// # Errors
/// When `/proc/thread-self/ns/net` cannot be read.
pub fn path() -> Result<PathBuf, IdentityError> {
    stream::namespace_file(STEM, "json").map_err(|source| IdentityError::Namespace { source })
}

/// The config a command works on, in this order: `--config`, then
/// `$ZTXDP_CONFIG`, then the config the running programs were loaded from
/// (`running`, the live identity), then [`DEFAULT_CONFIG`].
#[must_use]
pub fn config_path(explicit: Option<&Path>, running: Option<&Identity>) -> PathBuf {
    given_config(explicit)
        .or_else(|| running.map(|r| r.config.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG))
}

/// The config the user named: `--config`, else `$ZTXDP_CONFIG`.
#[must_use]
pub fn given_config(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit.map(Path::to_owned).or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Loads the config at `path` (from [`config_path`]) and checks it against
/// the running policy, when a tunnel program runs here. Peer indices are
/// only in the tunnel program's maps: without one, a config is used as
/// with nothing running (a grant change is saved for the next `up`).
///
/// # Errors
/// When the config is invalid ([`ConfigError`]), or does not match the
/// running policy ([`IdentityError::Mismatch`]).
pub fn load_checked(path: &Path, running: Option<&Identity>) -> Result<Config, CheckedError> {
    let config = Config::load(path)?;
    if let Some(r) = running.filter(|r| r.tunnel_program_id.is_some()) {
        r.check(&config)?;
    }
    Ok(config)
}

/// Errors of [`load_checked`].
#[derive(Debug, thiserror::Error)]
pub enum CheckedError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;

    use super::*;

    fn config(peers: &[&str]) -> Config {
        let mut text = String::from(
            "[audit]\npath = \"/tmp/audit.jsonl\"\n\n[tunnel]\ninterface = \"wg0\"\nruntime_grants = \"/tmp/g.json\"\n\n",
        );
        for (i, name) in (1..).zip(peers) {
            let _ = write!(
                text,
                "[[tunnel.peer]]\nname = \"{name}\"\naddresses = [\"10.100.0.{i}/32\"]\n\n"
            );
        }
        Config::parse(&text, Path::new("/etc/ztxdp/x.toml"))
            .unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }

    #[test]
    fn the_same_peers_in_another_order_do_not_match() {
        let running = Identity::new(
            &config(&["app-1", "app-2"]),
            config(&["app-1", "app-2"]).policy.tunnel.as_ref(),
            None,
            Some(7),
        );
        let other = config(&["app-2", "app-1"]);
        let err = running.check(&other).err();
        assert!(
            matches!(err, Some(IdentityError::Mismatch { why, .. }) if why.contains("order")),
            "a config with the peers swapped was accepted: {err:?}"
        );
        running
            .check(&config(&["app-1", "app-2"]))
            .unwrap_or_else(|e| panic!("the running config itself was refused: {e}"));
    }

    #[test]
    fn an_edited_running_config_is_refused_until_reloaded() {
        let before = config(&["app-1"]);
        let running = Identity::new(&before, before.policy.tunnel.as_ref(), None, Some(7));
        // The same peers, other bytes: as after an edit of another setting.
        let mut edited = config(&["app-1"]);
        edited.digest = crate::audit::chain::link("", "# an edit\n");
        let err = running.check(&edited).err();
        assert!(
            matches!(&err, Some(IdentityError::Mismatch { why, hint, .. })
                if why.contains("content") && hint.contains("ztxdp reload")),
            "an edited running config was not refused with a hint to reload: {err:?}"
        );
    }

    #[test]
    fn an_explicit_config_wins_then_the_running_one_then_the_default() {
        // The environment is the process's; this test runs with it unset
        // unless the caller set it, which the assertions allow for.
        if std::env::var_os(CONFIG_ENV).is_some() {
            return;
        }
        let mut running = Identity::new(&config(&["a"]), None, None, Some(1));
        running.config = PathBuf::from("/srv/lab.toml");
        assert_eq!(
            config_path(Some(Path::new("x.toml")), Some(&running)),
            PathBuf::from("x.toml")
        );
        assert_eq!(
            config_path(None, Some(&running)),
            PathBuf::from("/srv/lab.toml")
        );
        assert_eq!(config_path(None, None), PathBuf::from(DEFAULT_CONFIG));
    }
}
