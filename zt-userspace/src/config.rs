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
//! Addresses: a prefix with host bits set (`10.0.0.1/8`) is accepted and
//! normalised to its network (`10.0.0.0/8`), because that is what an LPM trie
//! matches anyway; a bare address (`192.0.2.10`) means the host prefix.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::CString,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use zt_common::capacity;

pub use self::group::{bad_group_name, is_group_name};

mod service;

use crate::{
    audit::syslog::tls,
    policy::{
        AuditFormat, AuditSettings, EchoRate, EdgePolicy, FlowSettings, Grant, MetricsSettings,
        Mode, Peer, Policy, Protocol, SocketGroup, SyslogSettings, TunnelPolicy,
    },
};

mod group;

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

/// Why a grant (`tcp/5432`, `5432/tcp`, `icmp`, ...) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("port 0 cannot be granted (ports are 1-65535)")]
    PortZero,
    #[error("range {first}-{last} ends before it starts; write it low-high")]
    RangeReversed { first: u16, last: u16 },
    #[error("unknown protocol \"{protocol}\"; expected tcp or udp (or icmp alone)")]
    UnknownProtocol { protocol: String },
    #[error("\"{text}\" is not a port number (1-65535)")]
    BadPort { text: String },
    /// Not shaped like a grant at all, e.g. a CLI grant in the config file.
    #[error("\"{text}\" is not a grant; expected {expected}")]
    Form {
        text: String,
        expected: &'static str,
    },
}

const CONFIG_GRANT_FORM: &str =
    "PROTO/PORT or PROTO/FIRST-LAST (tcp/5432, udp/53, tcp/8000-8100) or icmp";
const CLI_GRANT_FORM: &str =
    "PORT[/PROTO] or FIRST-LAST[/PROTO] (5432, 53/udp, 8000-8100/tcp) or icmp";

/// Parses a grant as written in the configuration file: `tcp/5432`,
/// `udp/53`, `tcp/8000-8100` or `icmp`.
///
/// # Errors
/// A [`GrantError`] saying what is wrong with `s`.
pub fn parse_grant(s: &str) -> Result<Grant, GrantError> {
    if s.eq_ignore_ascii_case("icmp") {
        return Ok(Grant::Icmp);
    }
    let Some((protocol, ports)) = s.split_once('/') else {
        return Err(GrantError::Form {
            text: s.to_owned(),
            expected: CONFIG_GRANT_FORM,
        });
    };
    let protocol = transport(protocol, s, CONFIG_GRANT_FORM)?;
    let (first, last) = port_range(ports)?;
    Ok(Grant::Ports {
        protocol,
        first,
        last,
    })
}

/// Parses a grant as written on the command line: `5432` (TCP), `5432/tcp`,
/// `53/udp`, `8000-8100/tcp` or `icmp`.
///
/// # Errors
/// A [`GrantError`] saying what is wrong with `s`.
pub fn parse_cli_grant(s: &str) -> Result<Grant, GrantError> {
    if s.eq_ignore_ascii_case("icmp") {
        return Ok(Grant::Icmp);
    }
    let (ports, protocol) = match s.split_once('/') {
        Some((ports, protocol)) => (ports, transport(protocol, s, CLI_GRANT_FORM)?),
        None => (s, Protocol::Tcp),
    };
    let (first, last) = port_range(ports)?;
    Ok(Grant::Ports {
        protocol,
        first,
        last,
    })
}

fn transport(name: &str, whole: &str, expected: &'static str) -> Result<Protocol, GrantError> {
    if name.eq_ignore_ascii_case("tcp") {
        Ok(Protocol::Tcp)
    } else if name.eq_ignore_ascii_case("udp") {
        Ok(Protocol::Udp)
    } else if name.eq_ignore_ascii_case("icmp") {
        // ICMP grants echo as a whole; a port after it is a mistake.
        Err(GrantError::Form {
            text: whole.to_owned(),
            expected,
        })
    } else {
        Err(GrantError::UnknownProtocol {
            protocol: name.to_owned(),
        })
    }
}

fn port_range(text: &str) -> Result<(u16, u16), GrantError> {
    let Some((first, last)) = text.split_once('-') else {
        let port = grant_port(text)?;
        return Ok((port, port));
    };
    let (first, last) = (grant_port(first)?, grant_port(last)?);
    if last < first {
        return Err(GrantError::RangeReversed { first, last });
    }
    Ok((first, last))
}

fn grant_port(text: &str) -> Result<u16, GrantError> {
    // `str::parse` would also take "+80"; a port is digits only.
    let bad = || GrantError::BadPort {
        text: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) => Err(GrantError::PortZero),
        Ok(port) => Ok(port),
        Err(_) => Err(bad()),
    }
}

// The file as serde sees it. Every key is optional here so that our own code,
// which knows the key's name, reports a missing one.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    // Read wide so that a negative number gets our message.
    drift_check_interval: Option<i64>,
    mode: Option<String>,
    edge: Option<RawEdge>,
    tunnel: Option<RawTunnel>,
    flows: Option<RawFlows>,
    audit: Option<RawAudit>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdge {
    interface: Option<String>,
    // Ports are read wide so that 0 and 70000 get our message, not serde's.
    wireguard_ports: Option<Vec<i64>>,
    ssh_port: Option<i64>,
    ssh_allow: Option<Vec<String>>,
    icmp_echo_rate: Option<String>,
    icmp_echo_burst: Option<i64>,
    service: Option<Vec<service::RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    interface: Option<String>,
    runtime_grants: Option<PathBuf>,
    link_local_neighbors: Option<bool>,
    peer: Option<Vec<RawPeer>>,
    group: Option<Vec<group::RawGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: Option<String>,
    addresses: Option<Vec<String>>,
    public_key: Option<String>,
    allow: Option<Vec<String>>,
    mode: Option<String>,
}

// Numbers are read wide for the same reason as ports.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlows {
    max_entries: Option<i64>,
    tcp_established_timeout: Option<i64>,
    tcp_closing_timeout: Option<i64>,
    udp_timeout: Option<i64>,
    icmp_timeout: Option<i64>,
    fragment_timeout: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAudit {
    path: Option<PathBuf>,
    format: Option<String>,
    // Numbers are read wide so that negative values get our message.
    rotate_bytes: Option<i64>,
    keep: Option<i64>,
    fsync_ms: Option<i64>,
    state: Option<PathBuf>,
    syslog: Option<RawSyslog>,
    socket_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSyslog {
    address: Option<String>,
    queue: Option<i64>,
    tls: Option<bool>,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    server_name: Option<String>,
}

/// Bounds of the `[audit]` numbers: a rotated file holds at least one
/// record; fsync at least once a minute; a queue of at most a million
/// records (about 1 GiB).
const MIN_ROTATE_BYTES: u64 = 4096;
const MAX_KEEP: u64 = 1000;
const MAX_FSYNC_MS: u64 = 60_000;
const MAX_SYSLOG_QUEUE: u64 = 1_000_000;

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

/// Turns keys into lines for error messages.
struct Locator<'a> {
    path: &'a Path,
    lines: &'a BTreeMap<String, usize>,
}

impl Locator<'_> {
    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        let mut scope = key;
        let line = loop {
            if let Some(line) = self.lines.get(scope) {
                break *line;
            }
            match scope.rfind(['.', '[']) {
                Some(cut) => scope = &scope[..cut],
                None => break 1,
            }
        };
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line,
            key: key.to_owned(),
            message: printable(&message.into()),
        }
    }
}

/// `text` with control characters (a newline) and the characters that
/// reorder text on a terminal (a right-to-left override) escaped: an error
/// message quotes what the file says, and must stay one honest line.
fn printable(text: &str) -> String {
    let hidden = |c: char| {
        c.is_control()
            || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    text.chars()
        .fold(String::with_capacity(text.len()), |mut out, c| {
            if hidden(c) {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

/// A key of the file as it appears in a dotted path: bare when TOML
/// allows it bare, else quoted and escaped, so that `"a.b"` is not the
/// table `a`'s key `b` and a newline in a key is not one in a message.
fn path_segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_owned()
    } else {
        format!("\"{}\"", printable(&key.escape_default().to_string()))
    }
}

/// Byte offsets where lines start, for offset → line lookups.
struct LineIndex(Vec<usize>);

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0).chain(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts.collect())
    }

    /// 1-based line and column of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.0.partition_point(|&start| start <= offset);
        let column = offset - self.0[line - 1] + 1;
        (line, column)
    }
}

/// A key of the document with where its key and value sit in the text.
struct Entry {
    path: String,
    key: Option<Range<usize>>,
    value: Range<usize>,
    /// A table's span is only its `[header]`.
    is_table: bool,
}

fn collect_entries(table: &DeTable<'_>, prefix: &str, out: &mut Vec<Entry>) {
    for (key, value) in table {
        let segment = path_segment(key.get_ref());
        let path = if prefix.is_empty() {
            segment
        } else {
            format!("{prefix}.{segment}")
        };
        out.push(Entry {
            path: path.clone(),
            key: Some(key.span()),
            value: value.span(),
            is_table: is_table(value.get_ref()),
        });
        collect_value(value.get_ref(), &path, out);
    }
}

fn collect_value(value: &DeValue<'_>, path: &str, out: &mut Vec<Entry>) {
    match value {
        DeValue::Table(table) => collect_entries(table, path, out),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let path = format!("{path}[{i}]");
                out.push(Entry {
                    path: path.clone(),
                    key: None,
                    value: item.span(),
                    is_table: is_table(item.get_ref()),
                });
                collect_value(item.get_ref(), &path, out);
            }
        }
        _ => {}
    }
}

fn is_table(value: &DeValue<'_>) -> bool {
    match value {
        DeValue::Table(_) => true,
        DeValue::Array(items) => items.iter().any(|item| item.get_ref().is_table()),
        _ => false,
    }
}

/// The innermost key whose key or value text covers `offset`. A syntax
/// error can leave a table header's span swallowing the broken text, so
/// tables are only considered for errors found after a clean parse.
fn entry_at(entries: &[Entry], offset: usize, syntax: bool) -> Option<&Entry> {
    entries
        .iter()
        .filter(|e| !(syntax && e.is_table))
        .flat_map(|e| e.key.iter().chain([&e.value]).map(move |span| (e, span)))
        .filter(|(_, span)| span.contains(&offset) || (span.is_empty() && span.start == offset))
        // Smallest span first; on a tie (a `[[table]]` header is the span of
        // both the array and its element) the deeper key wins.
        .min_by_key(|(e, span)| (span.len(), std::cmp::Reverse(e.path.len())))
        .map(|(e, _)| e)
}

fn toml_error(
    error: &toml::de::Error,
    syntax: bool,
    entries: &[Entry],
    index: &LineIndex,
    path: &Path,
) -> ConfigError {
    let offset = error.span().map_or(0, |s| s.start);
    let (line, column) = index.position(offset);
    let message = printable(error.message().trim());
    match entry_at(entries, offset, syntax) {
        Some(entry) => ConfigError::Invalid {
            path: path.to_owned(),
            line,
            key: entry.path.clone(),
            message,
        },
        None => ConfigError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message,
        },
    }
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

/// Turns the raw file into a [`Policy`], checking every value.
struct Validator<'a> {
    at: &'a Locator<'a>,
    limits: Limits,
}

impl Validator<'_> {
    /// The `allow` list at key `at` of a peer or a group, each grant
    /// checked; an error names the grant's index.
    fn grants(&self, at: &str, allow: &[String]) -> Result<Vec<Grant>, ConfigError> {
        allow
            .iter()
            .enumerate()
            .map(|(i, text)| {
                parse_grant(text)
                    .map_err(|e| self.at.invalid(&format!("{at}.allow[{i}]"), e.to_string()))
            })
            .collect()
    }

    fn policy(&self, raw: RawConfig) -> Result<Policy, ConfigError> {
        let mode = self.mode(raw.mode.as_deref(), "mode")?.unwrap_or_default();
        let edge = raw.edge.map(|e| self.edge(e, mode)).transpose()?;
        let tunnel = raw.tunnel.map(|t| self.tunnel(t, mode)).transpose()?;
        let flows = raw
            .flows
            .map_or_else(|| Ok(FlowSettings::default()), |f| self.flows(&f))?;
        let audit = self.audit(raw.audit)?;
        let metrics = raw.metrics.map(|m| self.metrics(m)).transpose()?;
        let drift_check_interval = self.drift_check_interval(raw.drift_check_interval)?;
        // Neither [edge] nor [tunnel] is valid (the packaged config, before
        // it is edited), but `up` refuses it: see `Config::check_enforces`.
        Ok(Policy {
            edge,
            tunnel,
            flows,
            audit,
            metrics,
            drift_check_interval,
        })
    }

    fn drift_check_interval(&self, seconds: Option<i64>) -> Result<Duration, ConfigError> {
        match seconds {
            None => Ok(Policy::DEFAULT_DRIFT_CHECK_INTERVAL),
            Some(s) => u64::try_from(s).map(Duration::from_secs).map_err(|_| {
                self.at.invalid(
                    "drift_check_interval",
                    format!(
                        "{s} is not an interval; give whole seconds, or 0 to turn the check off"
                    ),
                )
            }),
        }
    }

    fn metrics(&self, raw: RawMetrics) -> Result<MetricsSettings, ConfigError> {
        let listen = self.required(
            raw.listen,
            "metrics.listen",
            "the address to serve /metrics on, e.g. \"127.0.0.1:9542\"",
        )?;
        let listen = listen.parse().map_err(|_| {
            self.at.invalid(
                "metrics.listen",
                format!("\"{listen}\" is not IP:PORT (e.g. \"127.0.0.1:9542\", \"[::1]:9542\")"),
            )
        })?;
        Ok(MetricsSettings { listen })
    }

    /// A `mode` key: `"enforce"` or `"audit"`; `None` when absent.
    fn mode(&self, text: Option<&str>, key: &str) -> Result<Option<Mode>, ConfigError> {
        text.map(|t| {
            Mode::from_name(t).ok_or_else(|| {
                self.at.invalid(
                    key,
                    format!("\"{t}\" is not a mode: use \"enforce\" or \"audit\""),
                )
            })
        })
        .transpose()
    }

    fn required<T>(&self, value: Option<T>, key: &str, what: &str) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.at.invalid(key, format!("missing; set it to {what}")))
    }

    fn edge(&self, raw: RawEdge, mode: Mode) -> Result<EdgePolicy, ConfigError> {
        let interface = self.interface(
            raw.interface,
            "edge.interface",
            "the external interface, e.g. \"eth0\"",
        )?;
        let ports = self.required(
            raw.wireguard_ports,
            "edge.wireguard_ports",
            "the UDP ports WireGuard listens on, e.g. [51820] ([] for none)",
        )?;
        let wireguard_ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| self.port(port, &format!("edge.wireguard_ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let ssh_port = match raw.ssh_port {
            Some(port) => self.port(port, "edge.ssh_port")?,
            None => DEFAULT_SSH_PORT,
        };
        let allow = self.required(
            raw.ssh_allow,
            "edge.ssh_allow",
            "the networks allowed to reach SSH, e.g. [\"192.0.2.10/32\"] ([] for none)",
        )?;
        let mut per_family = [0usize; 2];
        let mut ssh_allow = Vec::with_capacity(allow.len());
        for (i, text) in allow.iter().enumerate() {
            let key = format!("edge.ssh_allow[{i}]");
            let net = self.prefix(text, &key)?;
            let count = &mut per_family[usize::from(matches!(net, IpNet::V6(_)))];
            *count += 1;
            if *count > self.limits.ssh_allow_per_family {
                return Err(self.at.invalid(
                    &key,
                    format!(
                        "more than {} {} entries; the kernel allow-list holds no more",
                        self.limits.ssh_allow_per_family,
                        family(&net)
                    ),
                ));
            }
            ssh_allow.push(net);
        }
        let icmp_echo = self.echo_rate(raw.icmp_echo_rate.as_deref(), raw.icmp_echo_burst)?;
        let mut edge = EdgePolicy {
            interface,
            wireguard_ports,
            ssh_port,
            ssh_allow,
            services: Vec::new(),
            icmp_echo,
            mode,
        };
        edge.services = self.services(raw.service.unwrap_or_default(), &edge)?;
        Ok(edge)
    }

    /// `edge.icmp_echo_rate` and `edge.icmp_echo_burst`.
    fn echo_rate(&self, rate: Option<&str>, burst: Option<i64>) -> Result<EchoRate, ConfigError> {
        let default = EchoRate::default();
        let ns_per_token = match rate {
            Some(text) => self.rate(text, "edge.icmp_echo_rate")?,
            None => default.ns_per_token,
        };
        let burst = match burst {
            None => default.burst,
            Some(n) => u64::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                self.at.invalid(
                    "edge.icmp_echo_burst",
                    format!(
                        "{n} is not a burst; use 1 or more echo requests \
                         (icmp_echo_rate = \"0\" drops them all)"
                    ),
                )
            })?,
        };
        Ok(EchoRate {
            ns_per_token,
            burst,
        })
    }

    /// Nanoseconds per token of a rate such as `"5/s"`; 0 for `"0"`.
    fn rate(&self, text: &str, key: &str) -> Result<u64, ConfigError> {
        const NS_PER_SEC: u64 = 1_000_000_000;
        let bad = |why: &str| {
            self.at
                .invalid(key, format!("\"{text}\" {why}; expected {ECHO_RATE_FORM}"))
        };
        if text.trim() == "0" {
            return Ok(0);
        }
        let Some((count, unit)) = text.split_once('/') else {
            return Err(bad("is not a rate"));
        };
        let (count, unit) = (count.trim(), unit.trim());
        // `str::parse` would also take "+5"; a count is digits only.
        let count: u64 = if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
            count
                .parse()
                .map_err(|_| bad("has a count too large to be a rate"))?
        } else {
            return Err(bad("does not start with a whole number"));
        };
        let period = match unit {
            "s" => NS_PER_SEC,
            "m" => 60 * NS_PER_SEC,
            "h" => 3600 * NS_PER_SEC,
            _ => return Err(bad("has an unknown unit")),
        };
        if count == 0 {
            return Ok(0);
        }
        // The kernel refills in whole nanoseconds per token; 0 would mean
        // "drop all", the opposite of what a huge rate asks for.
        match period / count {
            0 => Err(bad("is faster than one echo per nanosecond")),
            ns => Ok(ns),
        }
    }

    fn flows(&self, raw: &RawFlows) -> Result<FlowSettings, ConfigError> {
        let default = FlowSettings::default();
        let max_entries = match raw.max_entries {
            None => default.max_entries,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (MIN_FLOW_ENTRIES..=MAX_FLOW_ENTRIES).contains(n))
                .ok_or_else(|| {
                    self.at.invalid(
                        "flows.max_entries",
                        format!(
                            "{n} is out of range; the flow table holds {MIN_FLOW_ENTRIES} to \
                             {MAX_FLOW_ENTRIES} entries"
                        ),
                    )
                })?,
        };
        Ok(FlowSettings {
            max_entries,
            tcp_established: self.timeout(
                raw.tcp_established_timeout,
                "flows.tcp_established_timeout",
                default.tcp_established,
            )?,
            tcp_closing: self.timeout(
                raw.tcp_closing_timeout,
                "flows.tcp_closing_timeout",
                default.tcp_closing,
            )?,
            udp: self.timeout(raw.udp_timeout, "flows.udp_timeout", default.udp)?,
            icmp: self.timeout(raw.icmp_timeout, "flows.icmp_timeout", default.icmp)?,
            fragment: self.fragment_timeout(raw.fragment_timeout, default.fragment)?,
        })
    }

    fn fragment_timeout(
        &self,
        seconds: Option<i64>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        const KEY: &str = "flows.fragment_timeout";
        let timeout = self.timeout(seconds, KEY, default)?;
        if timeout.as_secs() > MAX_FRAGMENT_TIMEOUT {
            return Err(self.at.invalid(
                KEY,
                format!(
                    "{} s is longer than a datagram's fragments take to arrive; give 1 to \
                     {MAX_FRAGMENT_TIMEOUT} seconds",
                    timeout.as_secs()
                ),
            ));
        }
        Ok(timeout)
    }

    fn timeout(
        &self,
        seconds: Option<i64>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match seconds {
            None => Ok(default),
            Some(s) => u64::try_from(s)
                .ok()
                .filter(|&s| s > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    self.at.invalid(
                        key,
                        format!("{s} is not a timeout; give whole seconds above 0"),
                    )
                }),
        }
    }

    fn tunnel(&self, raw: RawTunnel, mode: Mode) -> Result<TunnelPolicy, ConfigError> {
        let interface = self.interface(
            raw.interface,
            "tunnel.interface",
            "the WireGuard interface, e.g. \"wg0\"",
        )?;
        let runtime_grants = match raw.runtime_grants {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(self.at.invalid(
                    "tunnel.runtime_grants",
                    "empty; give a file path or leave the key out",
                ));
            }
            Some(path) => path,
            None => PathBuf::from(DEFAULT_RUNTIME_GRANTS),
        };
        let raw_peers = raw.peer.unwrap_or_default();
        if raw_peers.len() > self.limits.peers {
            return Err(self.at.invalid(
                &format!("tunnel.peer[{}]", self.limits.peers),
                too_many_peers(self.limits.peers),
            ));
        }
        let peers = raw_peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.peer(p, i, mode))
            .collect::<Result<Vec<_>, _>>()?;
        self.unique_names(&peers)?;
        self.disjoint_addresses(&peers)?;
        let groups = self.groups(raw.group.unwrap_or_default(), &peers)?;
        Ok(TunnelPolicy {
            interface,
            peers,
            groups,
            runtime_grants,
            link_local_neighbors: raw.link_local_neighbors.unwrap_or(false),
            mode,
        })
    }

    fn peer(&self, raw: RawPeer, index: usize, mode: Mode) -> Result<Peer, ConfigError> {
        let at = format!("tunnel.peer[{index}]");
        let mode = self
            .mode(raw.mode.as_deref(), &format!("{at}.mode"))?
            .unwrap_or(mode);
        let name = self.required(
            raw.name,
            &format!("{at}.name"),
            "a unique peer name, e.g. \"app-1\"",
        )?;
        if name.is_empty() {
            return Err(self
                .at
                .invalid(&format!("{at}.name"), "empty; give the peer a name"));
        }
        // Names go into audit records, CEF lines, syslog and terminals: a
        // newline, a right-to-left override or trailing space there would
        // forge or hide what a reader sees.
        if !is_name(&name) {
            return Err(self
                .at
                .invalid(&format!("{at}.name"), not_a_name("peer", &name)));
        }
        if name.parse::<IpAddr>().is_ok() || name.parse::<IpNet>().is_ok() {
            // `ztxdp allow PEER` takes a name or an address; a name that looks
            // like an address would make that ambiguous.
            return Err(self.at.invalid(
                &format!("{at}.name"),
                format!("\"{name}\" looks like an address; pick a name"),
            ));
        }
        let key = format!("{at}.addresses");
        let texts = self.required(
            raw.addresses,
            &key,
            "the peer's tunnel addresses, e.g. [\"10.100.0.1/32\"]",
        )?;
        if texts.is_empty() {
            return Err(self
                .at
                .invalid(&key, "empty; a peer needs at least one address"));
        }
        let addresses = texts
            .iter()
            .enumerate()
            .map(|(i, text)| self.prefix(text, &format!("{key}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(public_key) = &raw.public_key
            && !is_wireguard_key(public_key)
        {
            return Err(self.at.invalid(
                &format!("{at}.public_key"),
                "not a WireGuard public key (44 base64 characters ending in '=', as `wg show` prints)",
            ));
        }
        let grants = self.grants(&at, &raw.allow.unwrap_or_default())?;
        Ok(Peer {
            name,
            addresses,
            public_key: raw.public_key,
            grants,
            mode,
        })
    }

    fn unique_names(&self, peers: &[Peer]) -> Result<(), ConfigError> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(peers.len());
        for (i, peer) in peers.iter().enumerate() {
            if let Some(first) = seen.insert(&peer.name, i) {
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{i}].name"),
                    format!(
                        "peer name \"{}\" is already used by tunnel.peer[{first}]",
                        peer.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rejects a prefix of one peer that overlaps a prefix of another: the
    /// kernel would pick one by longest match, and the other peer's grants
    /// would silently apply to part of its range, or not at all.
    fn disjoint_addresses(&self, peers: &[Peer]) -> Result<(), ConfigError> {
        // (prefix, peer, address index), sorted so that a prefix comes right
        // after every prefix that contains it.
        let mut all: Vec<(IpNet, usize, usize)> = peers
            .iter()
            .enumerate()
            .flat_map(|(p, peer)| {
                peer.addresses
                    .iter()
                    .enumerate()
                    .map(move |(a, net)| (*net, p, a))
            })
            .collect();
        let mut per_family = [0usize; 2];
        for &(net, p, a) in &all {
            let count = &mut per_family[usize::from(matches!(net, IpNet::V6(_)))];
            *count += 1;
            if *count > self.limits.peer_prefixes_per_family {
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{p}].addresses[{a}]"),
                    format!(
                        "more than {} {} peer prefixes; the kernel peer map holds no more",
                        self.limits.peer_prefixes_per_family,
                        family(&net)
                    ),
                ));
            }
        }
        all.sort_unstable();
        // Open prefixes that contain the current one. Overlaps within one peer
        // are harmless; across peers the first one is an error, so everything
        // on the stack belongs to one peer and checking the top is enough.
        let mut open: Vec<(IpNet, usize, usize)> = Vec::new();
        for &current in &all {
            while open
                .last()
                .is_some_and(|(outer, ..)| !outer.contains(&current.0))
            {
                open.pop();
            }
            if let Some(&outer) = open.last()
                && outer.1 != current.1
            {
                // Report the one written later in the file.
                let (later, earlier) = if (outer.1, outer.2) > (current.1, current.2) {
                    (outer, current)
                } else {
                    (current, outer)
                };
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{}].addresses[{}]", later.1, later.2),
                    format!(
                        "{} overlaps {} of peer \"{}\" (tunnel.peer[{}].addresses[{}]); \
                         a source address must belong to exactly one peer",
                        later.0, earlier.0, peers[earlier.1].name, earlier.1, earlier.2
                    ),
                ));
            }
            open.push(current);
        }
        Ok(())
    }

    fn audit(&self, raw: Option<RawAudit>) -> Result<AuditSettings, ConfigError> {
        let raw = self.required(
            raw,
            "audit",
            "an [audit] table with path = \"/var/log/ztxdp/audit.jsonl\"",
        )?;
        let path = self.required(
            raw.path,
            "audit.path",
            "the audit log file, e.g. \"/var/log/ztxdp/audit.jsonl\"",
        )?;
        if path.as_os_str().is_empty() {
            return Err(self
                .at
                .invalid("audit.path", "empty; give the audit log file path"));
        }
        let mut audit = AuditSettings::new(path);
        audit.format = match raw.format.as_deref() {
            None | Some("ecs") => AuditFormat::Ecs,
            Some("ocsf") => AuditFormat::Ocsf,
            Some(other) => {
                return Err(self.at.invalid(
                    "audit.format",
                    format!("unknown format \"{other}\"; use \"ecs\" or \"ocsf\""),
                ));
            }
        };
        audit.rotate_bytes = match raw.rotate_bytes {
            None => audit.rotate_bytes,
            // 0: never rotate.
            Some(0) => 0,
            Some(n) => self.audit_number(n, "audit.rotate_bytes", MIN_ROTATE_BYTES..=u64::MAX)?,
        };
        if let Some(n) = raw.keep {
            // At least one: the newest rotated file tells a restarted
            // daemon where the sequence and the chain go on.
            let keep = self.audit_number(n, "audit.keep", 1..=MAX_KEEP)?;
            audit.keep = u32::try_from(keep).unwrap_or(u32::MAX);
        }
        if let Some(n) = raw.fsync_ms {
            let ms = self.audit_number(n, "audit.fsync_ms", 0..=MAX_FSYNC_MS)?;
            audit.fsync = Duration::from_millis(ms);
        }
        if let Some(state) = raw.state {
            // The state is what shows that a trail was deleted: it must not
            // be one of the trail's own files, nor go with them.
            let trail_file = |p: &Path| {
                p == audit.path
                    || p.parent() == audit.path.parent()
                        && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            audit
                                .path
                                .file_name()
                                .and_then(|b| b.to_str())
                                .and_then(|b| n.strip_prefix(b))
                                .is_some_and(|rest| rest.starts_with('.'))
                        })
            };
            if state.as_os_str().is_empty() || trail_file(&state) {
                return Err(self.at.invalid(
                    "audit.state",
                    "must name a file apart from the audit trail and its rotated files, \
                     e.g. \"/var/lib/ztxdp/audit.state\"",
                ));
            }
            audit.state = state;
        }
        if let Some(raw) = raw.syslog {
            audit.syslog = Some(self.syslog(raw)?);
        }
        if let Some(name) = raw.socket_group {
            let gid = group_id(&name).ok_or_else(|| {
                self.at.invalid(
                    "audit.socket_group",
                    format!(
                        "no group \"{name}\" on this host; create it (groupadd) or name another"
                    ),
                )
            })?;
            audit.socket_group = Some(SocketGroup { name, gid });
        }
        Ok(audit)
    }

    fn syslog(&self, raw: RawSyslog) -> Result<SyslogSettings, ConfigError> {
        let address = self.required(
            raw.address,
            "audit.syslog.address",
            "the collector's HOST:PORT, e.g. \"127.0.0.1:514\"",
        )?;
        let host = address.rsplit_once(':').and_then(|(host, port)| {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let port = port.parse::<u16>().ok().filter(|p| *p != 0);
            (!bare.is_empty() && port.is_some()).then_some(host)
        });
        let Some(host) = host else {
            return Err(self.at.invalid(
                "audit.syslog.address",
                format!("\"{address}\" is not HOST:PORT (e.g. \"127.0.0.1:514\", \"[::1]:514\")"),
            ));
        };
        let queue = match raw.queue {
            Some(n) => self.audit_number(n, "audit.syslog.queue", 1..=MAX_SYSLOG_QUEUE)?,
            None => SyslogSettings::DEFAULT_QUEUE as u64,
        };
        let tls = if raw.tls == Some(true) {
            let ca_file = self.required(
                raw.ca_file,
                "audit.syslog.ca_file",
                "the PEM file of the CAs the collector's certificate chains to, \
                 e.g. \"/etc/ztxdp/syslog-ca.pem\"",
            )?;
            let refused = |key: &str, e: tls::TlsError| self.at.invalid(key, e.to_string());
            let anchors =
                tls::certificates(&ca_file).map_err(|e| refused("audit.syslog.ca_file", e))?;
            let identity = match (raw.cert_file, raw.key_file) {
                (None, None) => None,
                (Some(cert_file), Some(key_file)) => Some(tls::ClientIdentity {
                    chain: tls::certificates(&cert_file)
                        .map_err(|e| refused("audit.syslog.cert_file", e))?,
                    cert_file,
                    key: tls::private_key(&key_file)
                        .map_err(|e| refused("audit.syslog.key_file", e))?,
                    key_file,
                }),
                (Some(_), None) => {
                    return Err(self.at.invalid(
                        "audit.syslog.key_file",
                        "missing; cert_file needs the PEM file of its private key",
                    ));
                }
                (None, Some(_)) => {
                    return Err(self.at.invalid(
                        "audit.syslog.cert_file",
                        "missing; key_file needs the PEM file of its certificate",
                    ));
                }
            };
            let name = raw.server_name.as_deref().unwrap_or(host);
            let server_name = tls::server_name(name).map_err(|e| {
                let key = if raw.server_name.is_some() {
                    "audit.syslog.server_name"
                } else {
                    "audit.syslog.address"
                };
                refused(key, e)
            })?;
            Some(
                tls::SyslogTls::new(ca_file, anchors, identity, server_name).map_err(|e| {
                    let key = match &e {
                        tls::TlsError::Anchor { .. } => "audit.syslog.ca_file",
                        tls::TlsError::ClientKey { .. } => "audit.syslog.key_file",
                        _ => "audit.syslog.tls",
                    };
                    refused(key, e)
                })?,
            )
        } else {
            // Without tls = true these would be ignored, and records would
            // go in clear text to someone who meant them encrypted.
            let stray = [
                ("audit.syslog.ca_file", raw.ca_file.is_some()),
                ("audit.syslog.cert_file", raw.cert_file.is_some()),
                ("audit.syslog.key_file", raw.key_file.is_some()),
                ("audit.syslog.server_name", raw.server_name.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.at.invalid(
                    key,
                    "only used with TLS; add tls = true to [audit.syslog], or remove it",
                ));
            }
            None
        };
        Ok(SyslogSettings {
            address,
            queue: usize::try_from(queue).unwrap_or(usize::MAX),
            tls,
        })
    }

    /// A whole number of an `[audit]` key within `range`.
    fn audit_number(
        &self,
        value: i64,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        u64::try_from(value)
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                let upper = if *range.end() == u64::MAX {
                    String::new()
                } else {
                    format!(" to {}", range.end())
                };
                let zero = if key == "audit.rotate_bytes" {
                    " (or 0 to never rotate)"
                } else {
                    ""
                };
                self.at.invalid(
                    key,
                    format!(
                        "{value} is out of range; use {}{upper}{zero}",
                        range.start()
                    ),
                )
            })
    }

    fn interface(
        &self,
        name: Option<String>,
        key: &str,
        what: &str,
    ) -> Result<String, ConfigError> {
        let name = self.required(name, key, what)?;
        // The kernel's own rule (dev_valid_name): 1-15 bytes, not "." or
        // "..", no '/', ':' or whitespace.
        let valid = !name.is_empty()
            && name.len() <= MAX_INTERFACE_NAME
            && name != "."
            && name != ".."
            && !name.contains(['/', ':', '\0'])
            && !name.chars().any(char::is_whitespace);
        if !valid {
            return Err(self.at.invalid(
                key,
                format!("\"{name}\" is not a valid interface name (1-15 characters, no '/', ':' or spaces)"),
            ));
        }
        Ok(name)
    }

    fn port(&self, value: i64, key: &str) -> Result<u16, ConfigError> {
        match u16::try_from(value) {
            Ok(0) => Err(self.at.invalid(key, "port 0 is not a port; use 1-65535")),
            Ok(port) => Ok(port),
            Err(_) => Err(self
                .at
                .invalid(key, format!("port {value} is out of range; use 1-65535"))),
        }
    }

    fn prefix(&self, text: &str, key: &str) -> Result<IpNet, ConfigError> {
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                self.at.invalid(
                    key,
                    format!("\"{text}\" is not an address prefix (e.g. 192.0.2.0/24, 2001:db8::/32, 192.0.2.10)"),
                )
            })?;
        Ok(net.trunc())
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
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
mod tests {
    mod groups;
    mod services;
    mod syslog_tls;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const PATH: &str = "/etc/ztxdp.toml";

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(PATH))
    }

    fn parse_ok(text: &str) -> Config {
        parse(text).unwrap_or_else(|e| panic!("expected a valid config, got: {e}\n---\n{text}"))
    }

    /// Asserts that `text` is refused with an error about `key` at `line`.
    fn expect_error_with(text: &str, limits: Limits, key: &str, line: usize) -> String {
        let Err(error) = parse_with(text, Path::new(PATH), limits) else {
            panic!(
                "expected an error about {key} at line {line}, the config was accepted:\n{text}"
            );
        };
        let shown = error.to_string();
        let want = format!("{PATH}:{line}: {key}: ");
        assert!(
            shown.starts_with(&want),
            "expected the error to start with {want:?}, got {shown:?}"
        );
        match &error {
            ConfigError::Invalid {
                key: k,
                line: l,
                path,
                ..
            } => {
                assert_eq!(
                    (k.as_str(), *l, path.as_path()),
                    (key, line, Path::new(PATH)),
                    "structured fields of {shown}"
                );
            }
            other => panic!("expected ConfigError::Invalid, got {other:?}"),
        }
        shown
    }

    fn expect_error(text: &str, key: &str, line: usize) -> String {
        expect_error_with(text, Limits::KERNEL, key, line)
    }

    const AUDIT: &str = "[audit]\npath = \"/tmp/audit.jsonl\"\n";

    /// An edge table whose line 5 is `extra` (line 1 is `[edge]`).
    fn edge_with(extra: &str) -> String {
        format!(
            "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\nssh_allow = [\"192.0.2.10/32\"]\n{extra}\n{AUDIT}"
        )
    }

    /// A tunnel with the given peers (each a complete `[[tunnel.peer]]` table).
    fn tunnel_with(peers: &[&str]) -> String {
        format!(
            "[tunnel]\ninterface = \"wg0\"\n{}\n{AUDIT}",
            peers.join("\n")
        )
    }

    #[test]
    fn unknown_keys_are_named() {
        expect_error(&edge_with("bogus = 1"), "edge.bogus", 5);
        expect_error(&format!("{}\n[extra]\nx = 1\n", edge_with("")), "extra", 9);
        expect_error(
            &tunnel_with(&[
                "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallowed = []",
            ]),
            "tunnel.peer[0].allowed",
            6,
        );
        expect_error(
            "edge = { interface = \"eth0\", wireguard_ports = [], ssh_allow = [], port = 22 }\n[audit]\npath = \"/a\"",
            "edge.port",
            1,
        );
    }

    #[test]
    fn bad_cidrs_are_named() {
        let text = edge_with("").replace(
            "[\"192.0.2.10/32\"]",
            "[\"192.0.2.10/32\",\n  \"10.0.0.0/33\"]",
        );
        expect_error(&text, "edge.ssh_allow[1]", 5);
        expect_error(
            &edge_with("").replace("192.0.2.10/32", "192.0.2.300/32"),
            "edge.ssh_allow[0]",
            4,
        );
        expect_error(
            &edge_with("").replace("192.0.2.10/32", "eth0"),
            "edge.ssh_allow[0]",
            4,
        );
        let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\", \"fd00::/129\"]";
        expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].addresses[1]", 5);
    }

    #[test]
    fn zero_ports_are_refused() {
        let shown = expect_error(
            &edge_with("").replace("[51820]", "[51820, 0]"),
            "edge.wireguard_ports[1]",
            3,
        );
        assert!(shown.contains("port 0"), "message should say why: {shown}");
        expect_error(&edge_with("ssh_port = 0"), "edge.ssh_port", 5);
    }

    #[test]
    fn ports_above_65535_are_refused() {
        let shown = expect_error(&edge_with("ssh_port = 70000"), "edge.ssh_port", 5);
        assert!(
            shown.contains("70000"),
            "message should quote the value: {shown}"
        );
        expect_error(
            &edge_with("").replace("[51820]", "[65536]"),
            "edge.wireguard_ports[0]",
            3,
        );
        expect_error(&edge_with("ssh_port = -1"), "edge.ssh_port", 5);
        // Too large even for the integer serde reads.
        expect_error(
            &edge_with("ssh_port = 99999999999999999999"),
            "edge.ssh_port",
            5,
        );
    }

    #[test]
    fn wrong_types_are_named() {
        expect_error(&edge_with("ssh_port = \"22\""), "edge.ssh_port", 5);
        expect_error(
            &edge_with("").replace("[51820]", "51820"),
            "edge.wireguard_ports",
            3,
        );
        expect_error(
            &edge_with("").replace("[51820]", "[51820, \"x\"]"),
            "edge.wireguard_ports[1]",
            3,
        );
        expect_error(
            &tunnel_with(&[
                "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/1\", 2]",
            ]),
            "tunnel.peer[0].allow[1]",
            6,
        );
        expect_error(&format!("edge = 5\n{AUDIT}"), "edge", 1);
        expect_error(
            &format!(
                "audit = \"/tmp/audit.jsonl\"\n{}",
                edge_with("").replace(AUDIT, "")
            ),
            "audit",
            1,
        );
    }

    #[test]
    fn missing_required_keys_are_named() {
        let no_interface = edge_with("").replace("interface = \"eth0\"\n", "");
        expect_error(&no_interface, "edge.interface", 1);
        let no_ports = edge_with("").replace("wireguard_ports = [51820]\n", "");
        expect_error(&no_ports, "edge.wireguard_ports", 1);
        let no_allow = edge_with("").replace("ssh_allow = [\"192.0.2.10/32\"]\n", "");
        expect_error(&no_allow, "edge.ssh_allow", 1);
        expect_error(&edge_with("").replace(AUDIT, ""), "audit", 1);
        expect_error(
            &edge_with("").replace("path = \"/tmp/audit.jsonl\"\n", ""),
            "audit.path",
            6,
        );
        expect_error(
            &tunnel_with(&[]).replace("interface = \"wg0\"\n", ""),
            "tunnel.interface",
            1,
        );
        let nameless = "[[tunnel.peer]]\naddresses = [\"10.0.0.1\"]";
        expect_error(&tunnel_with(&[nameless]), "tunnel.peer[0].name", 3);
        let homeless = "[[tunnel.peer]]\nname = \"a\"";
        expect_error(&tunnel_with(&[homeless]), "tunnel.peer[0].addresses", 3);
        let idle = parse_ok(AUDIT);
        assert!(idle.policy.edge.is_none() && idle.policy.tunnel.is_none());
        let refused = idle
            .check_enforces()
            .expect_err("`up` must refuse a config with nothing to enforce");
        assert!(
            refused.to_string().contains("nothing to enforce"),
            "{refused}"
        );
        parse_ok(&edge_with(""))
            .check_enforces()
            .unwrap_or_else(|e| panic!("an edge is something to enforce: {e}"));
    }

    #[test]
    fn peer_names_are_short_and_safe_to_print() {
        let named = |name: &str| {
            format!(
                "[[tunnel.peer]]\nname = {}\naddresses = [\"10.0.0.1\"]",
                // A JSON string is a TOML basic string: one line, escaped.
                serde_json::Value::String(name.to_owned())
            )
        };
        for bad in [
            "app\n1",
            "app\u{202e}1",
            "app-1 ",
            "app 1",
            "",
            &"a".repeat(65),
            &"x".repeat(10 << 20),
        ] {
            let shown = expect_error(&tunnel_with(&[&named(bad)]), "tunnel.peer[0].name", 4);
            assert!(
                shown.len() < 400,
                "the message repeats the whole name: {} bytes",
                shown.len()
            );
        }
        for good in ["app-1", "db_2.eu", "A", &"a".repeat(64)] {
            let config = parse_with(
                &tunnel_with(&[&named(good)]),
                Path::new(PATH),
                Limits::KERNEL,
            )
            .unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
            assert_eq!(
                config
                    .policy
                    .tunnel
                    .map(|t| t.peers[0].name.clone())
                    .as_deref(),
                Some(good)
            );
        }
    }

    #[test]
    fn duplicate_peer_names_are_refused() {
        let a = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]";
        let b = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.2\"]";
        let shown = expect_error(&tunnel_with(&[a, b]), "tunnel.peer[1].name", 7);
        assert!(
            shown.contains("tunnel.peer[0]"),
            "message should name the first use: {shown}"
        );
    }

    #[test]
    fn peer_prefixes_must_not_overlap() {
        let a = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\", \"fd00::1\"]";
        // The same prefix, spelled differently.
        let same = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"fd00::2\", \"10.0.0.1\"]";
        let shown = expect_error(&tunnel_with(&[a, same]), "tunnel.peer[1].addresses[1]", 8);
        assert!(
            shown.contains("peer \"a\""),
            "message should name the other peer: {shown}"
        );
        // A later, wider prefix that contains an earlier one.
        let wider = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.0/24\"]";
        expect_error(&tunnel_with(&[a, wider]), "tunnel.peer[1].addresses[0]", 8);
        let v6 = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"fd00::/64\"]";
        expect_error(&tunnel_with(&[a, v6]), "tunnel.peer[1].addresses[0]", 8);
        // Overlaps inside one peer are harmless: the source still maps to it.
        let own = "[[tunnel.peer]]\nname = \"c\"\naddresses = [\"10.1.0.0/16\", \"10.1.2.0/24\", \"10.1.2.0/24\"]";
        let config = parse_ok(&tunnel_with(&[a, own]));
        let peers = &config.policy.tunnel.as_ref().expect("tunnel").peers;
        assert_eq!(
            peers[1].addresses.len(),
            3,
            "the peer keeps its prefixes as written"
        );
    }

    #[test]
    fn grants_with_other_protocols_are_refused() {
        let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\n  \"tcp/1\",\n  \"udp/2\",\n  \"sctp/5\",\n]";
        let shown = expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[2]", 9);
        assert!(
            shown.contains("sctp"),
            "message should quote the protocol: {shown}"
        );
    }

    #[test]
    fn reversed_grant_ranges_are_refused() {
        let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/9000-8000\"]";
        let shown = expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[0]", 6);
        assert!(
            shown.contains("9000-8000"),
            "message should show the range: {shown}"
        );
    }

    #[test]
    fn grants_of_port_zero_are_refused() {
        let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/22\", \"udp/0\"]";
        expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[1]", 6);
        let range =
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/0-10\"]";
        expect_error(&tunnel_with(&[range]), "tunnel.peer[0].allow[0]", 6);
    }

    fn peers_text(count: usize) -> String {
        let peers: Vec<String> = (0..count)
            .map(|i| {
                let ip =
                    Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).expect("peer count fits u32"));
                format!("[[tunnel.peer]]\nname = \"p{i}\"\naddresses = [\"{ip}\"]")
            })
            .collect();
        let refs: Vec<&str> = peers.iter().map(String::as_str).collect();
        tunnel_with(&refs)
    }

    #[test]
    fn more_peers_than_the_maps_hold_are_refused() {
        let limits = Limits {
            peers: 2,
            ..Limits::KERNEL
        };
        // Line 1 [tunnel], 2 interface, then three lines per peer.
        parse_with(&peers_text(2), Path::new(PATH), limits).expect("two peers fit a limit of two");
        expect_error_with(&peers_text(3), limits, "tunnel.peer[2]", 9);
    }

    #[test]
    fn peers_over_the_limit_are_refused_before_the_rest_is_read() {
        let limits = Limits {
            peers: 2,
            ..Limits::KERNEL
        };
        // The third header (line 10: two lines of [tunnel], three a peer,
        // one blank) is past the limit; what follows it is not even TOML,
        // and must not be what the error is about.
        let text = format!(
            "[tunnel]\ninterface = \"wg0\"\n{}\n[[ \"tunnel\" . peer ]]  # a third\n= not toml\n{}",
            ["p0", "p1"]
                .map(|n| format!("[[tunnel.peer]]\nname = \"{n}\"\naddresses = [\"10.0.0.1\"]\n"))
                .join(""),
            "[[tunnel.peer]]\n".repeat(1000)
        );
        let shown = expect_error_with(&text, limits, "tunnel.peer[2]", 10);
        assert!(
            shown.contains("more than 2 peers"),
            "the message names the limit: {shown}"
        );
    }

    #[test]
    fn peers_over_the_limit_in_an_inline_array_are_refused_after_the_parse() {
        let limits = Limits {
            peers: 2,
            ..Limits::KERNEL
        };
        let peer = |i: u8| format!("{{ name = \"p{i}\", addresses = [\"10.0.0.{i}\"] }}");
        let text = format!(
            "[tunnel]\ninterface = \"wg0\"\npeer = [\n  {},\n  {},\n  {},\n]\n{AUDIT}",
            peer(1),
            peer(2),
            peer(3)
        );
        let shown = expect_error_with(&text, limits, "tunnel.peer[2]", 6);
        assert!(shown.contains("more than 2 peers"), "{shown}");
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_unread() {
        let dir = crate::audit::writer::tests::TempDir::new("config-size");
        let path = dir.0.join("big.toml");
        std::fs::write(&path, "# a comment\n".repeat(100)).expect("writing the file");
        let error = read_bounded(&path, 1000).expect_err("1200 bytes over a limit of 1000");
        assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
        assert!(
            error.to_string().contains("larger than 1000 bytes"),
            "the message names the limit: {error}"
        );
        assert_eq!(
            read_bounded(&path, 1200).map(|text| text.len()).ok(),
            Some(1200),
            "a file of exactly the limit is read"
        );
        // An endless file is refused after the limit, not read to the end.
        let error = read_bounded(Path::new("/dev/zero"), 1 << 16).expect_err("endless");
        assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
        let error = Config::load(Path::new("/dev/zero")).expect_err("endless");
        assert!(
            error.to_string().starts_with("/dev/zero: ")
                && std::error::Error::source(&error)
                    .is_some_and(|e| e.to_string().contains(&MAX_FILE_BYTES.to_string())),
            "{error:?}"
        );
    }

    #[test]
    fn more_peers_than_capacity_peers_are_refused() {
        let count = capacity::PEERS as usize;
        let text = peers_text(count + 1);
        expect_error(&text, &format!("tunnel.peer[{count}]"), 3 + 3 * count);
    }

    #[test]
    fn more_peer_prefixes_than_the_maps_hold_are_refused() {
        let limits = Limits {
            peer_prefixes_per_family: 2,
            ..Limits::KERNEL
        };
        let a =
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\", \"fd00::1\", \"fd00::2\"]";
        let b = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.2\", \"10.0.0.3\"]";
        let shown = expect_error_with(
            &tunnel_with(&[a, b]),
            limits,
            "tunnel.peer[1].addresses[1]",
            8,
        );
        assert!(
            shown.contains("IPv4"),
            "message should name the family: {shown}"
        );
        let c = "[[tunnel.peer]]\nname = \"c\"\naddresses = [\"fd00::3\"]";
        expect_error_with(
            &tunnel_with(&[a, c]),
            limits,
            "tunnel.peer[1].addresses[0]",
            8,
        );
    }

    #[test]
    fn more_ssh_sources_than_the_maps_hold_are_refused() {
        let limits = Limits {
            ssh_allow_per_family: 2,
            ..Limits::KERNEL
        };
        let two_each = edge_with("").replace(
            "[\"192.0.2.10/32\"]",
            "[\"192.0.2.1\", \"2001:db8::1\", \"192.0.2.2\", \"2001:db8::2\"]",
        );
        parse_with(&two_each, Path::new(PATH), limits)
            .expect("two entries per family fit a limit of two");
        let three_v6 = two_each.replace("\"2001:db8::2\"]", "\"2001:db8::2\",\n  \"2001:db8::3\"]");
        let shown = expect_error_with(&three_v6, limits, "edge.ssh_allow[4]", 5);
        assert!(
            shown.contains("IPv6"),
            "message should name the family: {shown}"
        );
    }

    #[test]
    fn empty_lists_are_allowed() {
        let text = edge_with("")
            .replace("[51820]", "[]")
            .replace("[\"192.0.2.10/32\"]", "[]");
        let edge = parse_ok(&text).policy.edge.expect("edge");
        assert!(
            edge.wireguard_ports.is_empty() && edge.ssh_allow.is_empty(),
            "{edge:?}"
        );
        assert_eq!(edge.ssh_port, DEFAULT_SSH_PORT, "ssh_port defaults to 22");
    }

    #[test]
    fn host_bits_are_cleared_and_bare_addresses_are_hosts() {
        let text = edge_with("").replace(
            "[\"192.0.2.10/32\"]",
            "[\"10.0.0.1/8\", \"2001:db8::1/32\", \"192.0.2.10\"]",
        );
        let edge = parse_ok(&text).policy.edge.expect("edge");
        let want: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.10/32"]
            .iter()
            .map(|s| s.parse().expect("test prefix"))
            .collect();
        assert_eq!(edge.ssh_allow, want);
    }

    #[test]
    fn other_bad_values_are_named() {
        expect_error(
            &edge_with("").replace("\"eth0\"", "\"a-name-longer-than-15\""),
            "edge.interface",
            2,
        );
        expect_error(
            &edge_with("").replace("\"eth0\"", "\"\""),
            "edge.interface",
            2,
        );
        let address_name = "[[tunnel.peer]]\nname = \"10.0.0.9\"\naddresses = [\"10.0.0.1\"]";
        expect_error(&tunnel_with(&[address_name]), "tunnel.peer[0].name", 4);
        let no_addresses = "[[tunnel.peer]]\nname = \"a\"\naddresses = []";
        expect_error(&tunnel_with(&[no_addresses]), "tunnel.peer[0].addresses", 5);
        let bad_key =
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\npublic_key = \"short\"";
        expect_error(&tunnel_with(&[bad_key]), "tunnel.peer[0].public_key", 6);
    }

    #[test]
    fn toml_syntax_errors_have_a_line() {
        // Inside a value: attributed to the key.
        expect_error(&edge_with("ssh_port = twenty-two"), "edge.ssh_port", 5);
        // Between keys: only a position.
        let error = parse(&edge_with("[edge")).expect_err("unclosed table header");
        let shown = error.to_string();
        assert!(
            matches!(error, ConfigError::Syntax { line: 5, .. })
                && shown.starts_with(&format!("{PATH}:5:")),
            "expected a syntax error at line 5, got {shown:?}"
        );
        let duplicate = parse(&edge_with("interface = \"eth1\"")).expect_err("duplicate key");
        assert!(
            duplicate.to_string().starts_with(&format!("{PATH}:5:")),
            "{duplicate}"
        );
    }

    #[test]
    fn unreadable_files_name_the_path() {
        let path = Path::new("/nonexistent/ztxdp.toml");
        let error = Config::load(path).expect_err("the file does not exist");
        assert!(
            matches!(&error, ConfigError::Read { path: p, .. } if p == path)
                && error.to_string().contains("/nonexistent/ztxdp.toml"),
            "{error:?}"
        );
    }

    const FULL: &str = r#"
[edge]
interface = "eth0"
wireguard_ports = [51820, 51821]
ssh_port = 2222
ssh_allow = ["192.0.2.10/32", "2001:db8:1::/64"]

[tunnel]
interface = "wg0"
runtime_grants = "/run/grants.json"

[[tunnel.peer]]
name = "app-1"
addresses = ["10.100.0.1/32", "fd00:100::1/128"]
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
allow = ["tcp/5432", "udp/53", "tcp/8000-8100", "icmp"]

[[tunnel.peer]]
name = "db"
addresses = ["10.100.1.0/24"]

[audit]
path = "/var/log/ztxdp/audit.jsonl"
"#;

    #[test]
    fn a_full_config_round_trips() {
        let config = parse_ok(FULL);
        let net = |s: &str| -> IpNet { s.parse().expect("test prefix") };
        let want = Policy {
            edge: Some(EdgePolicy {
                interface: "eth0".into(),
                wireguard_ports: vec![51820, 51821],
                ssh_port: 2222,
                ssh_allow: vec![net("192.0.2.10/32"), net("2001:db8:1::/64")],
                services: Vec::new(),
                icmp_echo: EchoRate::default(),
                mode: crate::policy::Mode::Enforce,
            }),
            tunnel: Some(TunnelPolicy {
                interface: "wg0".into(),
                peers: vec![
                    Peer {
                        name: "app-1".into(),
                        addresses: vec![net("10.100.0.1/32"), net("fd00:100::1/128")],
                        public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
                        grants: vec![
                            Grant::Ports {
                                protocol: Protocol::Tcp,
                                first: 5432,
                                last: 5432,
                            },
                            Grant::Ports {
                                protocol: Protocol::Udp,
                                first: 53,
                                last: 53,
                            },
                            Grant::Ports {
                                protocol: Protocol::Tcp,
                                first: 8000,
                                last: 8100,
                            },
                            Grant::Icmp,
                        ],
                        mode: crate::policy::Mode::Enforce,
                    },
                    Peer {
                        name: "db".into(),
                        addresses: vec![net("10.100.1.0/24")],
                        public_key: None,
                        grants: vec![],
                        mode: crate::policy::Mode::Enforce,
                    },
                ],
                groups: Vec::new(),
                runtime_grants: PathBuf::from("/run/grants.json"),
                link_local_neighbors: false,
                mode: crate::policy::Mode::Enforce,
            }),
            flows: FlowSettings::default(),
            audit: AuditSettings::new(PathBuf::from("/var/log/ztxdp/audit.jsonl")),
            metrics: None,
            drift_check_interval: Policy::DEFAULT_DRIFT_CHECK_INTERVAL,
        };
        assert_eq!(config.policy, want);
        assert_eq!(config.path, Path::new(PATH));
        // Lines of keys, for callers that report their own errors.
        assert_eq!(config.line_of("edge"), Some(2));
        assert_eq!(config.line_of("edge.ssh_allow[1]"), Some(6));
        assert_eq!(config.line_of("tunnel.peer[1]"), Some(18));
        assert_eq!(config.line_of("tunnel.peer[0].allow[3]"), Some(16));
        assert_eq!(config.line_of("tunnel.peer[1].allow"), None);
        let shown = config
            .invalid("tunnel.peer[1].allow", "no grants")
            .to_string();
        assert_eq!(shown, format!("{PATH}:18: tunnel.peer[1].allow: no grants"));
        // Grants print in the form they were written.
        let grants = &config.policy.tunnel.as_ref().expect("tunnel").peers[0].grants;
        let printed: Vec<String> = grants.iter().map(ToString::to_string).collect();
        assert_eq!(printed, ["tcp/5432", "udp/53", "tcp/8000-8100", "icmp"]);
    }

    /// `edge_with("")` followed by a `[flows]` table whose first key is on line 9.
    fn flows_with(body: &str) -> String {
        format!("{}[flows]\n{body}\n", edge_with(""))
    }

    #[test]
    fn echo_rate_and_flows_default() {
        let config = parse_ok(&edge_with(""));
        let edge = config.policy.edge.expect("edge");
        assert_eq!(
            edge.icmp_echo,
            EchoRate {
                ns_per_token: 1_000_000_000,
                burst: 5
            },
            "\"1/s\" with a burst of 5"
        );
        assert_eq!(config.policy.flows, FlowSettings::default());
        assert_eq!(
            FlowSettings::default(),
            FlowSettings {
                max_entries: 65_536,
                tcp_established: Duration::from_hours(2),
                tcp_closing: Duration::from_secs(30),
                udp: Duration::from_mins(1),
                icmp: Duration::from_secs(30),
                fragment: Duration::from_secs(30),
            }
        );
        // An empty table is all defaults too.
        let empty = parse_ok(&flows_with(""));
        assert_eq!(empty.policy.flows, FlowSettings::default());
    }

    #[test]
    fn echo_rates_parse() {
        let echo = |extra: &str| {
            parse_ok(&edge_with(extra))
                .policy
                .edge
                .expect("edge")
                .icmp_echo
        };
        let ns = |rate: &str| echo(&format!("icmp_echo_rate = \"{rate}\"")).ns_per_token;
        assert_eq!(ns("1/s"), 1_000_000_000);
        assert_eq!(ns("4/s"), 250_000_000);
        assert_eq!(ns("3/s"), 333_333_333, "whole nanoseconds, rounded down");
        assert_eq!(ns("30/m"), 2_000_000_000);
        assert_eq!(ns("2/h"), 1_800_000_000_000);
        assert_eq!(ns(" 10 / s "), 100_000_000, "spaces around the parts");
        assert_eq!(ns("1000000000/s"), 1, "the fastest rate");
        assert_eq!(ns("0"), 0, "\"0\" drops every echo request");
        assert_eq!(ns("0/m"), 0, "zero per anything is zero");
        let both = echo("icmp_echo_rate = \"0\"\nicmp_echo_burst = 9");
        assert_eq!(both.burst, 9, "the burst is kept when the rate is 0");
        let burst = echo("icmp_echo_burst = 1");
        assert_eq!(
            burst,
            EchoRate {
                ns_per_token: 1_000_000_000,
                burst: 1
            }
        );
    }

    #[test]
    fn bad_echo_rates_are_named() {
        for rate in [
            "fast",
            "1",
            "1/d",
            "1/sec",
            "/s",
            "-1/s",
            "+1/s",
            "1.5/s",
            "",
            "1000000001/s",
            "99999999999999999999999/s",
        ] {
            let shown = expect_error(
                &edge_with(&format!("icmp_echo_rate = \"{rate}\"")),
                "edge.icmp_echo_rate",
                5,
            );
            assert!(
                shown.contains(&format!("\"{rate}\"")) && shown.contains("N/s"),
                "message should quote the value and show the forms: {shown}"
            );
        }
        expect_error(&edge_with("icmp_echo_rate = 0"), "edge.icmp_echo_rate", 5);
        for burst in ["0", "-1"] {
            let shown = expect_error(
                &edge_with(&format!("icmp_echo_burst = {burst}")),
                "edge.icmp_echo_burst",
                5,
            );
            assert!(
                shown.contains(burst),
                "message should quote the value: {shown}"
            );
        }
        expect_error(
            &edge_with("icmp_echo_burst = \"5\""),
            "edge.icmp_echo_burst",
            5,
        );
    }

    #[test]
    fn flows_parse() {
        let config = parse_ok(&flows_with(
            "max_entries = 1024\ntcp_established_timeout = 3600\ntcp_closing_timeout = 10\nudp_timeout = 2\nicmp_timeout = 5\nfragment_timeout = 3",
        ));
        assert_eq!(
            config.policy.flows,
            FlowSettings {
                max_entries: 1024,
                tcp_established: Duration::from_hours(1),
                tcp_closing: Duration::from_secs(10),
                udp: Duration::from_secs(2),
                icmp: Duration::from_secs(5),
                fragment: Duration::from_secs(3),
            }
        );
        assert_eq!(config.line_of("flows.udp_timeout"), Some(12));
        let largest = parse_ok(&flows_with("max_entries = 16777216"));
        assert_eq!(largest.policy.flows.max_entries, 16_777_216);
        // Only some keys: the others keep their defaults.
        let some = parse_ok(&flows_with("udp_timeout = 2"));
        assert_eq!(
            some.policy.flows,
            FlowSettings {
                udp: Duration::from_secs(2),
                ..FlowSettings::default()
            }
        );
        // The table applies without an edge, too.
        let tunnel_only = format!(
            "{}[flows]\nicmp_timeout = 7\n",
            tunnel_with(&["[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]"])
        );
        assert_eq!(
            parse_ok(&tunnel_only).policy.flows.icmp,
            Duration::from_secs(7)
        );
    }

    #[test]
    fn bad_flow_settings_are_named() {
        for n in ["1023", "16777217", "0", "-5", "99999999999999"] {
            let shown = expect_error(
                &flows_with(&format!("max_entries = {n}")),
                "flows.max_entries",
                9,
            );
            assert!(
                shown.contains(n) && shown.contains("1024") && shown.contains("16777216"),
                "message should quote the value and the bounds: {shown}"
            );
        }
        for key in [
            "tcp_established_timeout",
            "tcp_closing_timeout",
            "udp_timeout",
            "icmp_timeout",
            "fragment_timeout",
        ] {
            for value in ["0", "-1"] {
                let shown = expect_error(
                    &flows_with(&format!("{key} = {value}")),
                    &format!("flows.{key}"),
                    9,
                );
                assert!(
                    shown.contains("seconds"),
                    "message should say the unit: {shown}"
                );
            }
            expect_error(
                &flows_with(&format!("{key} = \"30s\"")),
                &format!("flows.{key}"),
                9,
            );
        }
        let shown = expect_error(
            &flows_with("fragment_timeout = 121"),
            "flows.fragment_timeout",
            9,
        );
        assert!(
            shown.contains("121") && shown.contains("1 to 120 seconds"),
            "message should quote the value and the bounds: {shown}"
        );
        assert_eq!(
            parse_ok(&flows_with("fragment_timeout = 120"))
                .policy
                .flows
                .fragment,
            Duration::from_mins(2)
        );
        expect_error(&flows_with("tcp_timeout = 5"), "flows.tcp_timeout", 9);
        expect_error(&format!("flows = 5\n{}", edge_with("")), "flows", 1);
    }

    #[test]
    fn defaults_apply() {
        let config = parse_ok(&tunnel_with(&[
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
        ]));
        let tunnel = config.policy.tunnel.expect("tunnel");
        assert_eq!(tunnel.runtime_grants, Path::new(DEFAULT_RUNTIME_GRANTS));
        assert_eq!(tunnel.peers[0].grants, []);
        assert_eq!(tunnel.peers[0].public_key, None);
        assert_eq!(config.policy.edge, None);
    }

    #[test]
    fn the_drift_check_interval_defaults_and_bad_values_are_named() {
        assert_eq!(
            parse_ok(&edge_with("")).policy.drift_check_interval,
            Duration::from_mins(1)
        );
        for (value, want) in [("0", Duration::ZERO), ("5", Duration::from_secs(5))] {
            let text = format!("drift_check_interval = {value}\n{}", edge_with(""));
            assert_eq!(parse_ok(&text).policy.drift_check_interval, want, "{text}");
        }
        let shown = expect_error(
            &format!("drift_check_interval = -1\n{}", edge_with("")),
            "drift_check_interval",
            1,
        );
        assert!(shown.contains("0 to turn the check off"), "{shown}");
        expect_error(
            &format!("\ndrift_check_interval = \"1m\"\n{}", edge_with("")),
            "drift_check_interval",
            2,
        );
    }

    #[test]
    fn config_grants_parse() {
        let ports = |protocol, first, last| Grant::Ports {
            protocol,
            first,
            last,
        };
        assert_eq!(
            parse_grant("tcp/5432"),
            Ok(ports(Protocol::Tcp, 5432, 5432))
        );
        assert_eq!(parse_grant("udp/53"), Ok(ports(Protocol::Udp, 53, 53)));
        assert_eq!(
            parse_grant("tcp/8000-8100"),
            Ok(ports(Protocol::Tcp, 8000, 8100))
        );
        assert_eq!(
            parse_grant("TCP/1-65535"),
            Ok(ports(Protocol::Tcp, 1, 65535))
        );
        assert_eq!(parse_grant("icmp"), Ok(Grant::Icmp));
        assert_eq!(parse_grant("tcp/0"), Err(GrantError::PortZero));
        assert_eq!(parse_grant("tcp/10-0"), Err(GrantError::PortZero));
        assert_eq!(
            parse_grant("udp/9-8"),
            Err(GrantError::RangeReversed { first: 9, last: 8 })
        );
        assert_eq!(
            parse_grant("sctp/5"),
            Err(GrantError::UnknownProtocol {
                protocol: "sctp".into()
            })
        );
        assert_eq!(
            parse_grant("tcp/65536"),
            Err(GrantError::BadPort {
                text: "65536".into()
            })
        );
        assert_eq!(
            parse_grant("tcp/+5"),
            Err(GrantError::BadPort { text: "+5".into() })
        );
        assert_eq!(
            parse_grant("tcp/"),
            Err(GrantError::BadPort {
                text: String::new()
            })
        );
        assert_eq!(
            parse_grant("tcp/1-"),
            Err(GrantError::BadPort {
                text: String::new()
            })
        );
        // The CLI form is not the config form.
        assert!(
            matches!(parse_grant("5432"), Err(GrantError::Form { .. })),
            "{:?}",
            parse_grant("5432")
        );
        assert!(matches!(
            parse_grant("5432/tcp"),
            Err(GrantError::UnknownProtocol { .. })
        ));
        assert!(matches!(
            parse_grant("icmp/8"),
            Err(GrantError::Form { .. })
        ));
    }

    #[test]
    fn cli_grants_parse() {
        let ports = |protocol, first, last| Grant::Ports {
            protocol,
            first,
            last,
        };
        assert_eq!(
            parse_cli_grant("5432"),
            Ok(ports(Protocol::Tcp, 5432, 5432))
        );
        assert_eq!(
            parse_cli_grant("5432/tcp"),
            Ok(ports(Protocol::Tcp, 5432, 5432))
        );
        assert_eq!(parse_cli_grant("53/udp"), Ok(ports(Protocol::Udp, 53, 53)));
        assert_eq!(
            parse_cli_grant("8000-8100/tcp"),
            Ok(ports(Protocol::Tcp, 8000, 8100))
        );
        assert_eq!(
            parse_cli_grant("8000-8100"),
            Ok(ports(Protocol::Tcp, 8000, 8100))
        );
        assert_eq!(parse_cli_grant("icmp"), Ok(Grant::Icmp));
        assert_eq!(parse_cli_grant("0"), Err(GrantError::PortZero));
        assert_eq!(parse_cli_grant("0/udp"), Err(GrantError::PortZero));
        assert_eq!(
            parse_cli_grant("100-99"),
            Err(GrantError::RangeReversed {
                first: 100,
                last: 99
            })
        );
        assert_eq!(
            parse_cli_grant("53/gre"),
            Err(GrantError::UnknownProtocol {
                protocol: "gre".into()
            })
        );
        assert_eq!(
            parse_cli_grant("http"),
            Err(GrantError::BadPort {
                text: "http".into()
            })
        );
        assert_eq!(
            parse_cli_grant("70000/udp"),
            Err(GrantError::BadPort {
                text: "70000".into()
            })
        );
        assert!(matches!(
            parse_cli_grant("8/icmp"),
            Err(GrantError::Form { .. })
        ));
        assert_eq!(
            parse_cli_grant("tcp/22"),
            Err(GrantError::UnknownProtocol {
                protocol: "22".into()
            })
        );
    }

    #[test]
    fn grants_print_in_config_form_and_parse_back() {
        for text in ["tcp/22", "udp/53", "tcp/8000-8100", "udp/1-65535", "icmp"] {
            let grant = parse_grant(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(grant.to_string(), text);
        }
    }

    #[test]
    fn interfaces_are_checked_in_this_namespace() {
        // Read-only lookups: nothing is attached to anything.
        let ok = parse_ok(&edge_with("").replace("\"eth0\"", "\"lo\""));
        ok.check_interfaces()
            .unwrap_or_else(|e| panic!("lo exists in every namespace: {e}"));
        let missing = parse_ok(&edge_with("").replace("\"eth0\"", "\"ztxdp-none9\""));
        let shown = missing
            .check_interfaces()
            .expect_err("no such interface")
            .to_string();
        assert_eq!(
            shown,
            format!(
                "{PATH}:2: edge.interface: no interface \"ztxdp-none9\" in this network namespace"
            )
        );
        let tunnel = parse_ok(&tunnel_with(&[]).replace("\"wg0\"", "\"ztxdp-none8\""));
        let shown = tunnel
            .check_interfaces()
            .expect_err("no such interface")
            .to_string();
        assert!(
            shown.starts_with(&format!("{PATH}:2: tunnel.interface: ")),
            "{shown}"
        );
    }

    #[test]
    fn the_examples_parse() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let lab = Config::load(&examples.join("lab.toml")).unwrap_or_else(|e| panic!("{e}"));
        let edge = lab.policy.edge.as_ref().expect("the lab has an edge");
        assert_eq!(
            (
                edge.interface.as_str(),
                edge.wireguard_ports.as_slice(),
                edge.ssh_port
            ),
            ("eth0", &[51820][..], 22)
        );
        let lab_sources = [
            IpNet::from(IpAddr::from(Ipv4Addr::new(10, 77, 0, 2))),
            IpNet::from(IpAddr::from(
                "fd77::2".parse::<Ipv6Addr>().expect("address"),
            )),
        ];
        assert_eq!(edge.ssh_allow, lab_sources);
        assert_eq!(
            lab.policy.audit.path,
            Path::new("/tmp/ztxdp-lab/audit.jsonl")
        );

        let production =
            Config::load(&examples.join("ztxdp.toml")).unwrap_or_else(|e| panic!("{e}"));
        let tunnel = production
            .policy
            .tunnel
            .as_ref()
            .expect("the production example has a tunnel");
        assert_eq!(tunnel.peers.len(), 2);
        assert!(
            production.policy.edge.is_some(),
            "the production example has an edge"
        );
        assert_eq!(
            production.policy.flows,
            FlowSettings::default(),
            "the production example shows the defaults"
        );
        assert_eq!(
            production.policy.edge.as_ref().map(|e| e.icmp_echo),
            Some(EchoRate::default()),
            "the production example shows the default echo rate"
        );
        for key in [
            "edge.ssh_port",
            "edge.icmp_echo_rate",
            "edge.icmp_echo_burst",
            "flows.max_entries",
            "flows.tcp_established_timeout",
            "flows.tcp_closing_timeout",
            "flows.udp_timeout",
            "flows.icmp_timeout",
            "tunnel.runtime_grants",
            "tunnel.peer[0].public_key",
            "tunnel.peer[1].allow",
        ] {
            assert!(
                production.line_of(key).is_some(),
                "the production example should show {key}"
            );
        }
    }

    #[test]
    fn audit_keys_parse_with_defaults() {
        let plain = parse_ok(&edge_with("")).policy.audit;
        assert_eq!(plain, AuditSettings::new(PathBuf::from("/tmp/audit.jsonl")));
        assert_eq!(
            (
                plain.format,
                plain.rotate_bytes,
                plain.keep,
                plain.fsync,
                plain.syslog
            ),
            (
                AuditFormat::Ecs,
                100 << 20,
                10,
                Duration::from_millis(100),
                None
            )
        );
        // The [audit] table is last in `edge_with`, so these lines extend it.
        let full = parse_ok(&format!(
            "{}format = \"ocsf\"\nrotate_bytes = 65536\nkeep = 3\nfsync_ms = 0\n\
             [audit.syslog]\naddress = \"127.0.0.1:6514\"\nqueue = 50\n",
            edge_with("")
        ))
        .policy
        .audit;
        assert_eq!(
            (full.format, full.rotate_bytes, full.keep, full.fsync),
            (AuditFormat::Ocsf, 65536, 3, Duration::ZERO)
        );
        assert_eq!(
            full.syslog,
            Some(SyslogSettings {
                address: "127.0.0.1:6514".into(),
                queue: 50,
                tls: None,
            })
        );
        let ipv6 = parse_ok(&format!(
            "{}[audit.syslog]\naddress = \"[::1]:514\"\n",
            edge_with("")
        ));
        let syslog = ipv6.policy.audit.syslog.expect("syslog");
        assert_eq!(syslog.queue, SyslogSettings::DEFAULT_QUEUE);
        let never = parse_ok(&format!("{}rotate_bytes = 0\n", edge_with("")));
        assert_eq!(never.policy.audit.rotate_bytes, 0, "0 never rotates");
        assert_eq!(
            plain.state,
            PathBuf::from("/var/lib/ztxdp/audit.state"),
            "the documented default"
        );
        let state = parse_ok(&format!("{}state = \"/srv/audit.state\"\n", edge_with("")));
        assert_eq!(state.policy.audit.state, PathBuf::from("/srv/audit.state"));
        let metrics = parse_ok(&format!(
            "{}[metrics]\nlisten = \"127.0.0.1:9542\"\n",
            edge_with("")
        ));
        assert_eq!(
            metrics.policy.metrics.map(|m| m.listen.to_string()),
            Some("127.0.0.1:9542".to_owned())
        );
        assert_eq!(
            parse_ok(&edge_with("")).policy.metrics,
            None,
            "no listener unless it is set"
        );
    }

    #[test]
    fn the_socket_group_is_a_group_of_this_host() {
        let audit = |extra: &str| format!("{}{extra}\n", edge_with(""));
        let root = parse_ok(&audit("socket_group = \"root\""));
        assert_eq!(
            root.policy.audit.socket_group,
            Some(SocketGroup {
                name: "root".into(),
                gid: 0
            })
        );
        assert_eq!(parse_ok(&audit("")).policy.audit.socket_group, None);
        let shown = expect_error(
            &audit("socket_group = \"no-such-group-zt\""),
            "audit.socket_group",
            8,
        );
        assert!(shown.contains("no group"), "{shown}");
    }

    #[test]
    fn modes_default_to_enforce_and_a_peer_may_differ() {
        let c = parse_ok(&tunnel_with(&[
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
        ]));
        let t = c.policy.tunnel.expect("tunnel");
        assert_eq!((t.mode, t.peers[0].mode), (Mode::Enforce, Mode::Enforce));
        let text = format!(
            "mode = \"audit\"\n{}",
            tunnel_with(&[
                "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
                "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.2\"]\nmode = \"enforce\"",
            ])
        );
        let mut p = parse_ok(&text).policy;
        let t = p.tunnel.as_ref().expect("tunnel");
        assert_eq!(
            (t.mode, t.peers[0].mode, t.peers[1].mode),
            (Mode::Audit, Mode::Audit, Mode::Enforce)
        );
        let edge = parse_ok(&format!("mode = \"audit\"\n{}", edge_with("")));
        assert_eq!(edge.policy.edge.map(|e| e.mode), Some(Mode::Audit));
        // `up --dry-run`: every program and peer audits.
        p.dry_run();
        let t = p.tunnel.as_ref().expect("tunnel");
        assert!(t.peers.iter().all(|peer| peer.mode == Mode::Audit));
    }

    #[test]
    fn bad_modes_are_named() {
        let shown = expect_error(&format!("mode = \"dry\"\n{}", edge_with("")), "mode", 1);
        assert!(shown.contains("\"enforce\" or \"audit\""), "{shown}");
        let text = tunnel_with(&[
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nmode = \"log\"",
        ]);
        let line = text
            .lines()
            .position(|l| l.starts_with("mode ="))
            .expect("mode line")
            + 1;
        expect_error(&text, "tunnel.peer[0].mode", line);
        expect_error(&format!("mode = 1\n{}", edge_with("")), "mode", 1);
    }

    #[test]
    fn bad_audit_keys_are_named() {
        let audit = |extra: &str| format!("{}{extra}\n", edge_with(""));
        let shown = expect_error(&audit("format = \"cef\""), "audit.format", 8);
        assert!(
            shown.contains("ecs"),
            "message says what is allowed: {shown}"
        );
        expect_error(&audit("rotate_bytes = 100"), "audit.rotate_bytes", 8);
        expect_error(&audit("rotate_bytes = -1"), "audit.rotate_bytes", 8);
        expect_error(&audit("keep = 1001"), "audit.keep", 8);
        expect_error(&audit("keep = 0"), "audit.keep", 8);
        expect_error(&audit("fsync_ms = 60001"), "audit.fsync_ms", 8);
        expect_error(&audit("fsync = 5"), "audit.fsync", 8);
        for bad in ["localhost:9542", "127.0.0.1", "[::1]"] {
            let shown = expect_error(
                &audit(&format!("[metrics]\nlisten = \"{bad}\"")),
                "metrics.listen",
                9,
            );
            assert!(shown.contains("IP:PORT"), "{shown}");
        }
        for bad in ["\"/tmp/audit.jsonl\"", "\"/tmp/audit.jsonl.state\"", "\"\""] {
            let shown = expect_error(&audit(&format!("state = {bad}")), "audit.state", 8);
            assert!(shown.contains("apart from the audit trail"), "{shown}");
        }
        expect_error(
            &audit("[audit.syslog]\nqueue = 5"),
            "audit.syslog.address",
            8,
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            ":6514",
            "host:port",
            "127.0.0.1:70000",
        ] {
            expect_error(
                &audit(&format!("[audit.syslog]\naddress = \"{bad}\"")),
                "audit.syslog.address",
                9,
            );
        }
        expect_error(
            &audit("[audit.syslog]\naddress = \"127.0.0.1:6514\"\nqueue = 0"),
            "audit.syslog.queue",
            10,
        );
    }
}
