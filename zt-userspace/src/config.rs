//! The configuration file: TOML in, a validated [`Policy`] out.
//!
//! Every error names the file, the line and the dotted key it is about
//! (`edge.ssh_allow[1]`, `tunnel.peer[0].allow[2]`), because the person
//! reading it is fixing a firewall, usually in a hurry.
//!
//! Parsing happens in two steps. `toml` first parses the text into a
//! [`DeTable`], whose keys and values carry their byte spans; walking it once
//! gives the line of every key. The same table is then deserialized into
//! private `Raw*` structs in which every key is optional, so that a missing key
//! is reported by our own code (which knows its name) rather than by serde (which
//! only knows the enclosing table). Errors serde does report (unknown keys,
//! wrong types) carry a span, which the walk maps back to a key.
//!
//! The grammar (the grant syntax and the `Raw*` tables) is in `grammar`,
//! the checks in `validator` (`service` and `group` add theirs to it), and
//! the key-to-line bookkeeping of error messages in `position`.
//!
//! Addresses: a prefix with host bits set (`10.0.0.1/8`) is accepted and
//! normalised to its network (`10.0.0.0/8`), because that is what the maps
//! match anyway; a bare address (`192.0.2.10`) means the host prefix.

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use toml::de::DeTable;
use zt_common::capacity;

use self::{
    grammar::RawConfig,
    position::{LineIndex, Locator, collect_entries, toml_error},
    validator::Validator,
};
pub use self::{
    grammar::{GrantError, parse_cli_grant, parse_grant},
    group::{bad_group_name, is_group_name},
};
use crate::policy::Policy;

mod grammar;
mod group;
mod position;
mod service;
mod validator;

/// `ssh_port` when the file does not set it.
const DEFAULT_SSH_PORT: u16 = 22;
/// The longest peer name.
pub const MAX_PEER_NAME: usize = 64;

/// Whether `b` may appear in a peer name: `[A-Za-z0-9._-]`.
#[must_use]
pub const fn peer_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// Whether `name` may name a peer or a group: 1 to [`MAX_PEER_NAME`]
/// bytes of [`peer_name_byte`].
fn is_name(name: &str) -> bool {
    (1..=MAX_PEER_NAME).contains(&name.len()) && name.bytes().all(peer_name_byte)
}

/// Why `name` cannot name a `kind` (`peer`, `group`), quoting at most its
/// first 40 characters, escaped.
fn not_a_name(kind: &str, name: &str) -> String {
    let shown: String = name.chars().take(40).collect();
    let cut = if shown.len() < name.len() { "..." } else { "" };
    format!(
        "{shown:?}{cut} is not a {kind} name: use 1 to {MAX_PEER_NAME} of \
         A-Z a-z 0-9 . _ - (names appear in audit records and terminals)"
    )
}

/// The largest config or wg-quick file read, so that a huge or endless file
/// (`/dev/zero`) is refused before it is parsed. The largest config the
/// kernel maps can hold, every allow-list and peer table full, is about
/// 100 MB.
pub const MAX_FILE_BYTES: u64 = 128 << 20;

/// `tunnel.runtime_grants` when the file does not set it.
const DEFAULT_RUNTIME_GRANTS: &str = "/var/lib/ztxdp/grants.json";
/// Linux `IFNAMSIZ` minus the terminating NUL.
const MAX_INTERFACE_NAME: usize = 15;
/// A 32-byte Curve25519 key in base64: 43 characters and one `=`.
const WIREGUARD_KEY_LEN: usize = 44;
/// Bounds of `flows.max_entries`. Below the minimum a busy host would evict
/// live flows; above the maximum the table alone would take gigabytes.
const MIN_FLOW_ENTRIES: u32 = 1024;
const MAX_FLOW_ENTRIES: u32 = 1 << 24;
/// Longest `flows.fragment_timeout`, in seconds. IPv4's 16-bit
/// identification comes round again within seconds on a busy sender, and
/// every second longer is a second in which a new datagram's stray later
/// fragments could follow an old first; fragments of one datagram arrive
/// within milliseconds of each other.
const MAX_FRAGMENT_TIMEOUT: u64 = 120;
const ECHO_RATE_FORM: &str = "N/s, N/m or N/h (echo requests per second, minute or hour from one source), or \"0\" to drop them all";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the configuration file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The text is not TOML, at a place that belongs to no key.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// A key is missing, unknown, or has a value we refuse.
    #[error("{}:{line}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// Map capacities the validation enforces; tests shrink them.
#[derive(Clone, Copy)]
struct Limits {
    peers: usize,
    ssh_allow_per_family: usize,
    peer_prefixes_per_family: usize,
}

impl Limits {
    const KERNEL: Self = Self {
        peers: capacity::PEERS as usize,
        ssh_allow_per_family: capacity::SERVICE_SOURCES as usize,
        peer_prefixes_per_family: capacity::PEER_PREFIXES as usize,
    };
}

/// A loaded, validated configuration file.
///
/// Keys the file leaves out take their defaults: `edge.ssh_port` = 22,
/// `edge.icmp_echo_rate` = `"1/s"`, `edge.icmp_echo_burst` = 5, the whole
/// `[flows]` table as [`FlowSettings::default`],
/// `tunnel.runtime_grants` = `/var/lib/ztxdp/grants.json`,
/// `tunnel.peer[].allow` = none (grants can be added at run time), and
/// `tunnel.peer[].public_key` = unknown. `edge.wireguard_ports` and
/// `edge.ssh_allow` must be present but may be empty.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it came from, for messages.
    pub path: PathBuf,
    pub policy: Policy,
    /// Hex SHA-256 of the text it was parsed from: what the running
    /// programs' identity file records, so a command can tell whether a
    /// config is the one they enforce.
    pub digest: String,
    /// Dotted key (`tunnel.peer[0].allow[2]`) → 1-based line.
    lines: BTreeMap<String, usize>,
}

impl Config {
    /// Reads and validates the configuration file at `path`.
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read or is larger than
    /// [`MAX_FILE_BYTES`], else as [`Config::parse`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_bounded(path, MAX_FILE_BYTES).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates configuration `text`; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Syntax`] when `text` is not TOML, [`ConfigError::Invalid`]
    /// naming the key and line of the first problem otherwise.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_with(text, path, Limits::KERNEL)
    }

    /// The 1-based line of a dotted key (`edge.ssh_allow[1]`), if the file
    /// spells it out.
    #[must_use]
    pub fn line_of(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }

    /// An error about `key`, for checks made outside this module (lockout
    /// protection, runtime grants...). A key the file leaves out is reported
    /// at the line of its nearest enclosing key, or line 1.
    #[must_use]
    pub fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        Locator {
            path: &self.path,
            lines: &self.lines,
        }
        .invalid(key, message)
    }

    /// Checks that the config enforces something: `check` accepts a config
    /// with neither `[edge]` nor `[tunnel]` (the packaged one, before it is
    /// edited), `up` and a reload do not.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] about `edge` when there is neither.
    pub fn check_enforces(&self) -> Result<(), ConfigError> {
        if self.policy.edge.is_none() && self.policy.tunnel.is_none() {
            return Err(self.invalid(
                "edge",
                "nothing to enforce: add (or uncomment) an [edge] table, a [tunnel] table, or both",
            ));
        }
        Ok(())
    }

    /// Checks that `edge.interface` and `tunnel.interface` exist in the
    /// current network namespace.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first interface key that has no
    /// interface.
    pub fn check_interfaces(&self) -> Result<(), ConfigError> {
        let edge = self
            .policy
            .edge
            .as_ref()
            .map(|e| ("edge.interface", e.interface.as_str()));
        let tunnel = self
            .policy
            .tunnel
            .as_ref()
            .map(|t| ("tunnel.interface", t.interface.as_str()));
        for (key, name) in edge.into_iter().chain(tunnel) {
            if !interface_exists(name) {
                return Err(self.invalid(
                    key,
                    format!("no interface \"{name}\" in this network namespace"),
                ));
            }
        }
        Ok(())
    }
}

/// The id of the group `name` (through NSS, as `getent group` finds it).
fn group_id(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: an all-zero `group` is valid (null pointers, zero id); it is
    // only read after getgrnam_r filled it.
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // Group entries with many members need more than the usual 1 KiB.
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    // SAFETY: every pointer is valid for the call; `buf` outlives it and
    // its length is passed.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &raw mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &raw mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(group.gr_gid)
}

fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is NUL-terminated and outlives the call, which only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Refuses `text` at the `[[tunnel.peer]]` header of the first peer over
/// `limit`, before the document is parsed: parsing a million peers took
/// 12.8 s and 2.4 GB only to refuse them then. Headers are recognised
/// line by line (`[[tunnel.peer]]`, spaces and quoted keys allowed); peers
/// written as an inline array are counted after the parse, which
/// [`MAX_FILE_BYTES`] bounds.
fn count_peer_tables(text: &str, limit: usize, path: &Path) -> Result<(), ConfigError> {
    let mut count = 0;
    for (number, line) in (1..).zip(text.lines()) {
        let Some(header) = line.trim_start().strip_prefix("[[") else {
            continue;
        };
        let Some((name, _)) = header.split_once("]]") else {
            continue;
        };
        let name: String = name
            .chars()
            .filter(|c| !c.is_whitespace() && !matches!(c, '"' | '\''))
            .collect();
        if name != "tunnel.peer" {
            continue;
        }
        if count == limit {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: number,
                key: format!("tunnel.peer[{limit}]"),
                message: too_many_peers(limit),
            });
        }
        count += 1;
    }
    Ok(())
}

/// Why a config with more than `limit` peers is refused.
fn too_many_peers(limit: usize) -> String {
    format!("more than {limit} peers; the kernel peer maps hold no more")
}

fn parse_with(text: &str, path: &Path, limits: Limits) -> Result<Config, ConfigError> {
    count_peer_tables(text, limits.peers, path)?;
    let index = LineIndex::new(text);
    // The recoverable parse keeps what it could read, so that even a syntax
    // error inside a value can be attributed to its key.
    let (table, errors) = DeTable::parse_recoverable(text);
    let mut entries = Vec::new();
    collect_entries(table.get_ref(), "", &mut entries);
    if let Some(error) = errors.first() {
        return Err(toml_error(error, true, &entries, &index, path));
    }
    let lines: BTreeMap<String, usize> = entries
        .iter()
        .map(|e| {
            (
                e.path.clone(),
                index.position(e.key.as_ref().unwrap_or(&e.value).start).0,
            )
        })
        .collect();
    let raw = RawConfig::deserialize(toml::de::Deserializer::from(table))
        .map_err(|error| toml_error(&error, false, &entries, &index, path))?;
    let locator = Locator {
        path,
        lines: &lines,
    };
    let policy = Validator {
        at: &locator,
        limits,
    }
    .policy(raw)?;
    Ok(Config {
        path: path.to_owned(),
        policy,
        // The chain's hash with no predecessor: plain SHA-256 of the text.
        digest: crate::audit::chain::link("", text),
        lines,
    })
}

/// The text of the file at `path`, read only up to `limit` bytes
/// ([`MAX_FILE_BYTES`] for config and wg-quick files).
///
/// # Errors
/// When it cannot be read, is not UTF-8, or is larger.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::FileTooLarge,
            format!("larger than {limit} bytes, the most ztxdp reads of such a file"),
        ));
    }
    String::from_utf8(bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()))
}

pub(crate) fn is_wireguard_key(key: &str) -> bool {
    key.len() == WIREGUARD_KEY_LEN
        && key.ends_with('=')
        && key[..WIREGUARD_KEY_LEN - 1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
}

#[cfg(test)]
mod tests;
