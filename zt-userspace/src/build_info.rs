//! What this binary is: its version, the commit it was built from, and the
//! SHA-256 of the BPF object it embeds ([`crate::BPF_OBJECT`]), set by
//! `build.rs`.
//!
//! `ztxdp --version` prints them, and `up` records them in the identity
//! file, so that `status` can tell whether the running programs came from
//! the BPF object of the binary asking: after a package upgrade, a daemon
//! that was not restarted still runs the old programs.

use serde::{Deserialize, Serialize};

/// The package version (the workspace's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit built, or `unknown`.
pub const COMMIT: &str = env!("ZTXDP_GIT_COMMIT");
/// Hex SHA-256 of the embedded BPF object.
pub const BPF_SHA256: &str = env!("ZTXDP_BPF_SHA256");

/// `ztxdp --version`: the version line clap prefixes with `ztxdp `, then
/// one line each for the commit and the BPF object.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit ",
    env!("ZTXDP_GIT_COMMIT"),
    "\nbpf sha256 ",
    env!("ZTXDP_BPF_SHA256")
);

/// The build of a ztxdp binary, as the identity file records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub commit: String,
    /// Hex SHA-256 of the BPF object its programs were loaded from.
    pub bpf_sha256: String,
}

impl Build {
    /// This binary's build.
    #[must_use]
    pub fn this() -> Self {
        Self {
            version: VERSION.to_owned(),
            commit: COMMIT.to_owned(),
            bpf_sha256: BPF_SHA256.to_owned(),
        }
    }

    /// Whether programs loaded by `self` came from this binary's BPF
    /// object. The programs are what the object holds, so the object's
    /// hash decides, not the version or commit.
    #[must_use]
    pub fn is_this_object(&self) -> bool {
        self.bpf_sha256 == BPF_SHA256
    }
}

#[cfg(test)]
mod tests {
    use sha2::{Digest as _, Sha256};

    use super::*;

    #[test]
    fn the_recorded_hash_is_the_embedded_objects() {
        let hex = Sha256::digest(crate::BPF_OBJECT)
            .iter()
            .fold(String::new(), |mut s, b| {
                use std::fmt::Write as _;
                let _ = write!(s, "{b:02x}");
                s
            });
        assert_eq!(BPF_SHA256, hex);
        assert!(LONG_VERSION.ends_with(&format!("bpf sha256 {hex}")));
    }

    #[test]
    fn another_object_is_not_this_one() {
        let mut other = Build::this();
        assert!(other.is_this_object());
        other.bpf_sha256 = "0".repeat(64);
        assert!(!other.is_this_object());
    }
}
