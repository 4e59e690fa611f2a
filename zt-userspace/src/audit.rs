//! Decision events from the kernel, turned into audit records (JSON Lines,
//! Elastic Common Schema names) and written to `audit.path`.
//!
//! The audit log is data, not a log stream: records go to their own file,
//! never through `tracing`. Each record is written whole with one `write`
//! of complete lines, so a crash can lose the tail of a batch but never
//! leaves a partial line.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value, json};
use zt_common::{Event, NO_PEER, program, proto, reason};

/// Errors writing the audit file.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open audit file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write audit file {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the kernel's numbers mean to a reader: interface names and peers.
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub interfaces: HashMap<u32, String>,
    /// Peer name and public key, by peer index.
    pub peers: Vec<(String, Option<String>)>,
}

/// Converts `bpf_ktime_get_ns` (CLOCK_MONOTONIC) to wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// Realtime minus monotonic, in nanoseconds, at construction.
    offset_ns: i128,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self { offset_ns: real - mono }
    }

    #[must_use]
    pub fn wall(&self, mono_ns: u64) -> DateTime<Utc> {
        let ns = i128::from(mono_ns) + self.offset_ns;
        DateTime::from_timestamp_nanos(i64::try_from(ns).unwrap_or(i64::MAX))
    }
}

fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into a valid timespec; both clocks exist on Linux.
    unsafe { libc::clock_gettime(clock, &raw mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

fn ip(version: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match version {
        4 => Some(IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

fn transport(protocol: u8, version: u8) -> String {
    match (protocol, version) {
        (proto::TCP, _) => "tcp".into(),
        (proto::UDP, _) => "udp".into(),
        (proto::ICMP, 4) => "icmp".into(),
        (proto::ICMPV6, 6) => "ipv6-icmp".into(),
        (p, _) => p.to_string(),
    }
}

/// One decision as an ECS record.
#[must_use]
pub fn record(e: &Event, names: &Names, clock: &Clock) -> Value {
    let mut r = Map::new();
    r.insert(
        "@timestamp".into(),
        json!(clock.wall(e.ts_ns).to_rfc3339_opts(SecondsFormat::Nanos, true)),
    );
    let action = if reason::is_allow(e.reason) { "allow" } else { "deny" };
    r.insert("event".into(), json!({ "action": action, "reason": reason::name(e.reason) }));
    let ifname = names.interfaces.get(&e.ifindex).cloned().unwrap_or_else(|| e.ifindex.to_string());
    r.insert("observer".into(), json!({ "ingress": { "interface": { "name": ifname } } }));
    let mut ztxdp = Map::new();
    ztxdp.insert(
        "program".into(),
        json!(if u32::from(e.program) == program::TUNNEL { "tunnel" } else { "edge" }),
    );
    if let (Some(src), Some(dst)) = (ip(e.ip_version, &e.src), ip(e.ip_version, &e.dst)) {
        let ports = matches!(e.protocol, proto::TCP | proto::UDP);
        let mut source = Map::new();
        source.insert("ip".into(), json!(src.to_string()));
        let mut destination = Map::new();
        destination.insert("ip".into(), json!(dst.to_string()));
        if ports {
            source.insert("port".into(), json!(e.src_port));
            destination.insert("port".into(), json!(e.dst_port));
        }
        r.insert("source".into(), Value::Object(source));
        r.insert("destination".into(), Value::Object(destination));
        r.insert(
            "network".into(),
            json!({
                "transport": transport(e.protocol, e.ip_version),
                "type": if e.ip_version == 4 { "ipv4" } else { "ipv6" },
            }),
        );
        if e.protocol == proto::TCP {
            ztxdp.insert("tcp_flags".into(), json!(e.tcp_flags));
        }
    }
    if e.peer != NO_PEER {
        let (name, key) = usize::try_from(e.peer)
            .ok()
            .and_then(|i| names.peers.get(i))
            .cloned()
            .unwrap_or_else(|| (format!("#{}", e.peer), None));
        ztxdp.insert("peer".into(), json!({ "name": name, "public_key": key }));
    }
    r.insert("ztxdp".into(), Value::Object(ztxdp));
    Value::Object(r)
}

/// A record saying how many events the kernel held back or lost since the
/// previous such record, so the file accounts for every decision.
#[must_use]
pub fn suppressed_record(program_name: &str, suppressed: u64, lost: u64) -> Value {
    json!({
        "@timestamp": Utc::now().to_rfc3339_opts(SecondsFormat::Nanos, true),
        "event": { "action": "suppressed" },
        "ztxdp": { "program": program_name, "suppressed": suppressed, "lost": lost },
    })
}

/// Appends records to the audit file.
pub struct AuditWriter {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
}

impl AuditWriter {
    /// Opens (creating it and its directory) `path` for appending.
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let open_err = |source| AuditError::Open { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(open_err)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(open_err)?;
        Ok(Self { path: path.to_owned(), file, pending: Vec::new() })
    }

    /// Queues one record; nothing reaches the file before `commit`.
    pub fn push(&mut self, record: &Value) {
        // Serialising a Value cannot fail.
        self.pending.extend_from_slice(record.to_string().as_bytes());
        self.pending.push(b'\n');
    }

    /// Writes every queued line with one append and syncs the data.
    ///
    /// # Errors
    /// When the write or the sync fails.
    pub fn commit(&mut self) -> Result<(), AuditError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let write_err = |source| AuditError::Write { path: self.path.clone(), source };
        self.file.write_all(&self.pending).map_err(write_err)?;
        self.file.sync_data().map_err(write_err)?;
        self.pending.clear();
        Ok(())
    }
}
