//! Field names: [`Record`]s as Elastic Common Schema or OCSF 4001 Network
//! Activity JSON (the file formats, which parse back), and as CEF (an output
//! format of `ztxdp events`).
//!
//! Both JSON formats end with the `ztxdp` object (sequence number, chain,
//! and what neither schema has a field for), which [`super::chain`] needs.

use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value, json};
use zt_common::reason;

use super::{
    chain,
    record::{self, Body, Flow, IpFlow, Peer, Program, Record},
};
use crate::policy::AuditFormat;

/// Why a line is not a record.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not JSON: {source}")]
    Json {
        #[source]
        source: serde_json::Error,
    },
    #[error("does not end with the ztxdp.chain member (`,\"chain\":\"<64 hex>\"}}}}`)")]
    NoChain,
    #[error("{field} is missing")]
    Missing { field: &'static str },
    #[error("{field} has a value that is not allowed: {value}")]
    Bad { field: &'static str, value: String },
}

/// OCSF schema version the records follow.
const OCSF_VERSION: &str = "1.3.0";
const OCSF_NETWORK_ACTIVITY: u64 = 4001;

fn rfc3339(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

fn parse_time(v: &Value, pointer: &'static str) -> Result<i64, FormatError> {
    let text = v
        .pointer(pointer)
        .and_then(Value::as_str)
        .ok_or(FormatError::Missing { field: pointer })?;
    DateTime::parse_from_rfc3339(text)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
        .ok_or_else(|| FormatError::Bad {
            field: pointer,
            value: text.to_owned(),
        })
}

/// The record text without its chain member: `{...,"ztxdp":{...}}`, with
/// `ztxdp` last whatever order the JSON map keeps keys in.
#[must_use]
pub fn unchained(format: AuditFormat, r: &Record) -> String {
    let (top, ztxdp) = match format {
        AuditFormat::Ecs => ecs(r),
        AuditFormat::Ocsf => ocsf(r),
    };
    let mut text = Value::Object(top).to_string();
    text.pop();
    if text.len() > 1 {
        text.push(',');
    }
    text.push_str("\"ztxdp\":");
    text.push_str(&Value::Object(ztxdp).to_string());
    text.push('}');
    text
}

/// The full line (without newline) of a record whose chain value is known.
#[must_use]
pub fn line(format: AuditFormat, r: &Record, chain: &str) -> String {
    chain::attach(&unchained(format, r), chain)
}

fn ztxdp_base(r: &Record) -> Map<String, Value> {
    let mut z = Map::new();
    z.insert("seq".into(), json!(r.seq));
    if let Some(n) = r.body.decisions() {
        z.insert("decisions".into(), json!(n));
    }
    if r.previous_run {
        z.insert("previous_run".into(), json!(true));
    }
    z
}

/// The counts of a `lost` record, the same in both formats: `unwritten`
/// only where a killed daemon left some.
fn lost_counts(z: &mut Map<String, Value>, rate_limited: u64, ring_full: u64, unwritten: u64) {
    z.insert("rate_limited".into(), json!(rate_limited));
    z.insert("ring_full".into(), json!(ring_full));
    if unwritten > 0 {
        z.insert("unwritten".into(), json!(unwritten));
    }
    z.insert("lost".into(), json!(rate_limited + ring_full + unwritten));
}

fn peer_value(p: &Peer) -> Value {
    json!({ "name": p.name, "public_key": p.public_key })
}

fn ecs_event(flow: &Flow, action: &str) -> Value {
    let kind = if flow.allowed() {
        json!(["allowed", "start"])
    } else {
        json!(["denied"])
    };
    json!({
        "kind": "event",
        "category": ["network"],
        "type": kind,
        "action": action,
        "reason": reason::name(flow.reason),
    })
}

fn ecs_flow(flow: &Flow, top: &mut Map<String, Value>, z: &mut Map<String, Value>) {
    top.insert(
        "observer".into(),
        json!({ "ingress": { "interface": { "name": flow.interface } } }),
    );
    z.insert("program".into(), json!(flow.program.name()));
    if let Some(ip) = &flow.ip {
        let mut source = Map::new();
        source.insert("ip".into(), json!(ip.src.to_string()));
        let mut destination = Map::new();
        destination.insert("ip".into(), json!(ip.dst.to_string()));
        if let (Some(s), Some(d)) = (ip.src_port, ip.dst_port) {
            source.insert("port".into(), json!(s));
            destination.insert("port".into(), json!(d));
        }
        top.insert("source".into(), Value::Object(source));
        top.insert("destination".into(), Value::Object(destination));
        top.insert(
            "network".into(),
            json!({
                "transport": record::transport_name(ip.protocol),
                "type": if ip.src.is_ipv4() { "ipv4" } else { "ipv6" },
                "iana_number": ip.protocol.to_string(),
            }),
        );
        if let Some(f) = ip.tcp_flags {
            z.insert("tcp_flags".into(), json!(f));
        }
    }
    if let Some(p) = &flow.peer {
        z.insert("peer".into(), peer_value(p));
    }
}

fn ecs(r: &Record) -> (Map<String, Value>, Map<String, Value>) {
    let mut top = Map::new();
    let mut z = ztxdp_base(r);
    top.insert("@timestamp".into(), json!(rfc3339(r.time_ns)));
    match &r.body {
        Body::Decision { flow, suppressed } => {
            top.insert("event".into(), ecs_event(flow, flow.action()));
            ecs_flow(flow, &mut top, &mut z);
            z.insert("suppressed".into(), json!(suppressed));
        }
        Body::Summary {
            flow,
            count,
            start_ns,
            end_ns,
        } => {
            let mut event = ecs_event(flow, "summary");
            event["start"] = json!(rfc3339(*start_ns));
            event["end"] = json!(rfc3339(*end_ns));
            top.insert("event".into(), event);
            ecs_flow(flow, &mut top, &mut z);
            z.insert("decision".into(), json!(flow.action()));
            z.insert("suppressed".into(), json!(count));
        }
        Body::Lost {
            program,
            interface,
            rate_limited,
            ring_full,
            unwritten,
        } => {
            top.insert(
                "event".into(),
                json!({ "kind": "metric", "action": "lost" }),
            );
            top.insert(
                "observer".into(),
                json!({ "ingress": { "interface": { "name": interface } } }),
            );
            z.insert("program".into(), json!(program.name()));
            lost_counts(&mut z, *rate_limited, *ring_full, *unwritten);
        }
        Body::SyslogDropped { address, dropped } => {
            top.insert(
                "event".into(),
                json!({ "kind": "metric", "action": "syslog_dropped" }),
            );
            z.insert(
                "syslog".into(),
                json!({ "address": address, "dropped": dropped }),
            );
        }
    }
    (top, z)
}

/// OCSF activity of a record: (id, name).
fn ocsf_activity(body: &Body) -> (u64, &'static str) {
    match body {
        Body::Decision { flow, .. } if flow.allowed() => (1, "Open"),
        Body::Decision { .. } => (5, "Refuse"),
        Body::Summary { .. } => (6, "Traffic"),
        Body::Lost { .. } => (99, "Lost"),
        Body::SyslogDropped { .. } => (99, "Forwarding Gap"),
    }
}

fn ms(ns: i64) -> i64 {
    ns.div_euclid(1_000_000)
}

fn ocsf_flow(flow: &Flow, top: &mut Map<String, Value>, z: &mut Map<String, Value>) {
    let (action, disposition) = if flow.allowed() {
        (json!([1, "Allowed"]), json!([1, "Allowed"]))
    } else {
        (json!([2, "Denied"]), json!([2, "Blocked"]))
    };
    top.insert("action_id".into(), action[0].clone());
    top.insert("action".into(), action[1].clone());
    top.insert("disposition_id".into(), disposition[0].clone());
    top.insert("disposition".into(), disposition[1].clone());
    top.insert("status_detail".into(), json!(reason::name(flow.reason)));
    let mut src = Map::new();
    let mut dst = Map::new();
    dst.insert("interface_name".into(), json!(flow.interface));
    if let Some(ip) = &flow.ip {
        src.insert("ip".into(), json!(ip.src.to_string()));
        dst.insert("ip".into(), json!(ip.dst.to_string()));
        if let (Some(s), Some(d)) = (ip.src_port, ip.dst_port) {
            src.insert("port".into(), json!(s));
            dst.insert("port".into(), json!(d));
        }
        let mut conn = Map::new();
        conn.insert(
            "protocol_name".into(),
            json!(record::transport_name(ip.protocol)),
        );
        conn.insert("protocol_num".into(), json!(ip.protocol));
        conn.insert(
            "protocol_ver_id".into(),
            json!(if ip.src.is_ipv4() { 4 } else { 6 }),
        );
        conn.insert("direction_id".into(), json!(1));
        conn.insert("direction".into(), json!("Inbound"));
        if let Some(f) = ip.tcp_flags {
            conn.insert("tcp_flags".into(), json!(f));
        }
        top.insert("connection_info".into(), Value::Object(conn));
    }
    if let Some(p) = &flow.peer {
        src.insert("name".into(), json!(p.name));
        z.insert("peer".into(), peer_value(p));
    }
    if !src.is_empty() {
        top.insert("src_endpoint".into(), Value::Object(src));
    }
    top.insert("dst_endpoint".into(), Value::Object(dst));
    z.insert("program".into(), json!(flow.program.name()));
    z.insert("reason".into(), json!(reason::name(flow.reason)));
}

fn ocsf(r: &Record) -> (Map<String, Value>, Map<String, Value>) {
    let mut top = Map::new();
    let mut z = ztxdp_base(r);
    let (activity_id, activity_name) = ocsf_activity(&r.body);
    top.insert("class_uid".into(), json!(OCSF_NETWORK_ACTIVITY));
    top.insert("class_name".into(), json!("Network Activity"));
    top.insert("category_uid".into(), json!(4));
    top.insert("category_name".into(), json!("Network Activity"));
    top.insert("activity_id".into(), json!(activity_id));
    top.insert("activity_name".into(), json!(activity_name));
    top.insert(
        "type_uid".into(),
        json!(OCSF_NETWORK_ACTIVITY * 100 + activity_id),
    );
    top.insert(
        "type_name".into(),
        json!(format!("Network Activity: {activity_name}")),
    );
    top.insert("time".into(), json!(ms(r.time_ns)));
    top.insert("time_dt".into(), json!(rfc3339(r.time_ns)));
    top.insert(
        "metadata".into(),
        json!({
            "version": OCSF_VERSION,
            "product": { "name": "ztxdp", "vendor_name": "ztxdp", "version": env!("CARGO_PKG_VERSION") },
        }),
    );
    if let Some(n) = r.body.decisions() {
        top.insert("count".into(), json!(n));
    }
    let (severity_id, severity) = match r.body {
        Body::Decision { .. } | Body::Summary { .. } => (1, "Informational"),
        Body::Lost { .. } | Body::SyslogDropped { .. } => (3, "Medium"),
    };
    top.insert("severity_id".into(), json!(severity_id));
    top.insert("severity".into(), json!(severity));
    top.insert("message".into(), json!(message(&r.body)));
    match &r.body {
        Body::Decision { flow, suppressed } => {
            ocsf_flow(flow, &mut top, &mut z);
            z.insert("suppressed".into(), json!(suppressed));
        }
        Body::Summary {
            flow,
            count,
            start_ns,
            end_ns,
        } => {
            ocsf_flow(flow, &mut top, &mut z);
            top.insert("start_time".into(), json!(ms(*start_ns)));
            top.insert("end_time".into(), json!(ms(*end_ns)));
            top.insert("start_time_dt".into(), json!(rfc3339(*start_ns)));
            top.insert("end_time_dt".into(), json!(rfc3339(*end_ns)));
            z.insert("suppressed".into(), json!(count));
        }
        Body::Lost {
            program,
            interface,
            rate_limited,
            ring_full,
            unwritten,
        } => {
            top.insert(
                "dst_endpoint".into(),
                json!({ "interface_name": interface }),
            );
            z.insert("program".into(), json!(program.name()));
            lost_counts(&mut z, *rate_limited, *ring_full, *unwritten);
        }
        Body::SyslogDropped { address, dropped } => {
            z.insert(
                "syslog".into(),
                json!({ "address": address, "dropped": dropped }),
            );
        }
    }
    (top, z)
}

/// One human-readable sentence about a record.
#[must_use]
pub fn message(body: &Body) -> String {
    match body {
        Body::Decision { flow, .. } => format!("{} {}", flow.action(), reason::name(flow.reason)),
        Body::Summary { flow, count, .. } => {
            format!(
                "{count} more {} {} decisions of this flow",
                flow.action(),
                reason::name(flow.reason)
            )
        }
        Body::Lost {
            program,
            rate_limited,
            ring_full,
            unwritten,
            ..
        } => {
            let killed = if *unwritten > 0 {
                format!(", {unwritten} read by a daemon that was killed before it wrote them")
            } else {
                String::new()
            };
            format!(
                "{} {} decisions without a record: {rate_limited} rate-limited, {ring_full} lost to a full ring buffer{killed}",
                rate_limited + ring_full + unwritten,
                program.name()
            )
        }
        Body::SyslogDropped { address, dropped } => {
            format!("{dropped} records could not be forwarded to syslog collector {address}")
        }
    }
}

/// Parses a file line (without newline) of either format into the record
/// and its chain value.
///
/// # Errors
/// When the line is not a record of either format.
pub fn parse(line: &str) -> Result<(Record, String), FormatError> {
    let (_, chain) = chain::split(line).ok_or(FormatError::NoChain)?;
    let v: Value = serde_json::from_str(line).map_err(|source| FormatError::Json { source })?;
    let record = if v.get("class_uid").is_some() {
        parse_ocsf(&v)?
    } else {
        parse_ecs(&v)?
    };
    Ok((record, chain.to_owned()))
}

fn u64_at(v: &Value, pointer: &'static str) -> Result<u64, FormatError> {
    v.pointer(pointer)
        .and_then(Value::as_u64)
        .ok_or(FormatError::Missing { field: pointer })
}

fn str_at<'a>(v: &'a Value, pointer: &'static str) -> Result<&'a str, FormatError> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .ok_or(FormatError::Missing { field: pointer })
}

fn opt_u16(v: &Value, pointer: &'static str) -> Result<Option<u16>, FormatError> {
    v.pointer(pointer)
        .map(|p| {
            p.as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or_else(|| FormatError::Bad {
                    field: pointer,
                    value: p.to_string(),
                })
        })
        .transpose()
}

fn program_at(v: &Value, pointer: &'static str) -> Result<Program, FormatError> {
    let name = str_at(v, pointer)?;
    Program::from_name(name).ok_or_else(|| FormatError::Bad {
        field: pointer,
        value: name.to_owned(),
    })
}

fn reason_at(v: &Value, pointer: &'static str) -> Result<u32, FormatError> {
    let name = str_at(v, pointer)?;
    record::reason_code(name).ok_or_else(|| FormatError::Bad {
        field: pointer,
        value: name.to_owned(),
    })
}

fn addr_at(v: &Value, pointer: &'static str) -> Result<IpAddr, FormatError> {
    let text = str_at(v, pointer)?;
    text.parse().map_err(|_| FormatError::Bad {
        field: pointer,
        value: text.to_owned(),
    })
}

fn peer_at(v: &Value) -> Option<Peer> {
    let p = v.pointer("/ztxdp/peer")?;
    Some(Peer {
        name: p.get("name")?.as_str()?.to_owned(),
        public_key: p
            .get("public_key")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// JSON pointers to the flow fields of one format.
struct FlowFields {
    interface: &'static str,
    reason: &'static str,
    src: &'static str,
    dst: &'static str,
    src_port: &'static str,
    dst_port: &'static str,
    tcp_flags: &'static str,
}

const ECS_FLOW: FlowFields = FlowFields {
    interface: "/observer/ingress/interface/name",
    reason: "/event/reason",
    src: "/source/ip",
    dst: "/destination/ip",
    src_port: "/source/port",
    dst_port: "/destination/port",
    tcp_flags: "/ztxdp/tcp_flags",
};

const OCSF_FLOW: FlowFields = FlowFields {
    interface: "/dst_endpoint/interface_name",
    reason: "/ztxdp/reason",
    src: "/src_endpoint/ip",
    dst: "/dst_endpoint/ip",
    src_port: "/src_endpoint/port",
    dst_port: "/dst_endpoint/port",
    tcp_flags: "/connection_info/tcp_flags",
};

fn parse_flow(v: &Value, f: &FlowFields, protocol: Option<u8>) -> Result<Flow, FormatError> {
    let ip = match protocol {
        Some(protocol) => Some(IpFlow {
            src: addr_at(v, f.src)?,
            dst: addr_at(v, f.dst)?,
            protocol,
            src_port: opt_u16(v, f.src_port)?,
            dst_port: opt_u16(v, f.dst_port)?,
            tcp_flags: v
                .pointer(f.tcp_flags)
                .map(|t| t.as_u64().and_then(|n| u8::try_from(n).ok()))
                .map(|t| {
                    t.ok_or(FormatError::Bad {
                        field: "tcp_flags",
                        value: String::new(),
                    })
                })
                .transpose()?,
        }),
        None => None,
    };
    Ok(Flow {
        program: program_at(v, "/ztxdp/program")?,
        interface: str_at(v, f.interface)?.to_owned(),
        reason: reason_at(v, f.reason)?,
        ip,
        peer: peer_at(v),
    })
}

fn parse_ecs(v: &Value) -> Result<Record, FormatError> {
    let protocol = match v.pointer("/network/transport").and_then(Value::as_str) {
        Some(t) => Some(record::transport_number(t).ok_or_else(|| FormatError::Bad {
            field: "/network/transport",
            value: t.to_owned(),
        })?),
        None => None,
    };
    let action = str_at(v, "/event/action")?;
    let body = match action {
        "allow" | "deny" => Body::Decision {
            flow: parse_flow(v, &ECS_FLOW, protocol)?,
            suppressed: u64_at(v, "/ztxdp/suppressed")?,
        },
        "summary" => Body::Summary {
            flow: parse_flow(v, &ECS_FLOW, protocol)?,
            count: u64_at(v, "/ztxdp/suppressed")?,
            start_ns: parse_time(v, "/event/start")?,
            end_ns: parse_time(v, "/event/end")?,
        },
        "lost" => parse_lost(v, ECS_FLOW.interface)?,
        "syslog_dropped" => parse_syslog_dropped(v)?,
        other => {
            return Err(FormatError::Bad {
                field: "/event/action",
                value: other.to_owned(),
            });
        }
    };
    Ok(Record {
        seq: u64_at(v, "/ztxdp/seq")?,
        time_ns: parse_time(v, "/@timestamp")?,
        body,
        previous_run: previous_run_at(v),
    })
}

/// A `lost` record's body; both formats keep its counts under `ztxdp` and
/// differ only in where the interface name is.
fn parse_lost(v: &Value, interface: &'static str) -> Result<Body, FormatError> {
    Ok(Body::Lost {
        program: program_at(v, "/ztxdp/program")?,
        interface: str_at(v, interface)?.to_owned(),
        rate_limited: u64_at(v, "/ztxdp/rate_limited")?,
        ring_full: u64_at(v, "/ztxdp/ring_full")?,
        // Absent where zero, and in records written before it existed.
        unwritten: v
            .pointer("/ztxdp/unwritten")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// `ztxdp.previous_run`, present (and true) only on records of an earlier run.
fn previous_run_at(v: &Value) -> bool {
    v.pointer("/ztxdp/previous_run")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A `syslog_dropped` record's body, the same in both formats.
fn parse_syslog_dropped(v: &Value) -> Result<Body, FormatError> {
    Ok(Body::SyslogDropped {
        address: str_at(v, "/ztxdp/syslog/address")?.to_owned(),
        dropped: u64_at(v, "/ztxdp/syslog/dropped")?,
    })
}

fn parse_ocsf(v: &Value) -> Result<Record, FormatError> {
    let protocol = match v.pointer("/connection_info/protocol_num") {
        Some(p) => Some(
            p.as_u64()
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| FormatError::Bad {
                    field: "/connection_info/protocol_num",
                    value: p.to_string(),
                })?,
        ),
        None => None,
    };
    let body = match u64_at(v, "/activity_id")? {
        1 | 5 => Body::Decision {
            flow: parse_flow(v, &OCSF_FLOW, protocol)?,
            suppressed: u64_at(v, "/ztxdp/suppressed")?,
        },
        6 => Body::Summary {
            flow: parse_flow(v, &OCSF_FLOW, protocol)?,
            count: u64_at(v, "/ztxdp/suppressed")?,
            start_ns: parse_time(v, "/start_time_dt")?,
            end_ns: parse_time(v, "/end_time_dt")?,
        },
        99 if v.pointer("/ztxdp/syslog").is_some() => parse_syslog_dropped(v)?,
        99 => parse_lost(v, OCSF_FLOW.interface)?,
        other => {
            return Err(FormatError::Bad {
                field: "/activity_id",
                value: other.to_string(),
            });
        }
    };
    Ok(Record {
        seq: u64_at(v, "/ztxdp/seq")?,
        time_ns: parse_time(v, "/time_dt")?,
        body,
        previous_run: previous_run_at(v),
    })
}

/// CEF header field: `\` and `|` escaped.
fn cef_header(text: &str) -> String {
    text.replace('\\', "\\\\").replace('|', "\\|")
}

/// CEF extension value: `\`, `=` and line breaks escaped.
fn cef_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('=', "\\=")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// A `lost` record's `[rate_limited, ring_full, unwritten]` as CEF custom
/// numbers; `unwritten` only where a killed daemon left some, as in JSON.
fn cef_lost_counts(ext: &mut Vec<(&str, String)>, counts: [u64; 3]) {
    let labels = [
        ("cn1", "cn1Label", "rateLimited"),
        ("cn2", "cn2Label", "ringFull"),
        ("cn3", "cn3Label", "unwritten"),
    ];
    for ((key, label_key, label), n) in labels.into_iter().zip(counts) {
        if key != "cn3" || n > 0 {
            ext.push((key, n.to_string()));
            ext.push((label_key, label.to_owned()));
        }
    }
}

/// One record as an `ArcSight` CEF line (version 0), for `ztxdp events`.
#[must_use]
pub fn cef(r: &Record, chain: &str) -> String {
    let mut ext: Vec<(&str, String)> = vec![("rt", ms(r.time_ns).to_string())];
    let (signature, name, severity) = match &r.body {
        Body::Decision { flow, .. } => (
            reason::name(flow.reason).to_owned(),
            message(&r.body),
            if flow.allowed() { 1 } else { 5 },
        ),
        Body::Summary { flow, .. } => (
            "summary".to_owned(),
            format!("summary {} {}", flow.action(), reason::name(flow.reason)),
            if flow.allowed() { 1 } else { 5 },
        ),
        Body::Lost { .. } => ("lost".to_owned(), "decisions lost".to_owned(), 7),
        Body::SyslogDropped { .. } => (
            "syslog_dropped".to_owned(),
            "syslog forwarding gap".to_owned(),
            7,
        ),
    };
    match &r.body {
        Body::Decision { flow, .. } | Body::Summary { flow, .. } => {
            ext.push(("act", flow.action().to_owned()));
            ext.push(("reason", reason::name(flow.reason).to_owned()));
            ext.push(("deviceInboundInterface", flow.interface.clone()));
            if let Some(ip) = &flow.ip {
                if ip.src.is_ipv4() {
                    ext.push(("src", ip.src.to_string()));
                    ext.push(("dst", ip.dst.to_string()));
                } else {
                    ext.push(("c6a2", ip.src.to_string()));
                    ext.push(("c6a2Label", "Source IPv6 Address".to_owned()));
                    ext.push(("c6a3", ip.dst.to_string()));
                    ext.push(("c6a3Label", "Destination IPv6 Address".to_owned()));
                }
                if let (Some(s), Some(d)) = (ip.src_port, ip.dst_port) {
                    ext.push(("spt", s.to_string()));
                    ext.push(("dpt", d.to_string()));
                }
                ext.push(("proto", record::transport_name(ip.protocol).to_uppercase()));
            }
            ext.push(("cs2", flow.program.name().to_owned()));
            ext.push(("cs2Label", "program".to_owned()));
            if let Some(p) = &flow.peer {
                ext.push(("cs3", p.name.clone()));
                ext.push(("cs3Label", "peer".to_owned()));
            }
            if let Body::Summary {
                start_ns, end_ns, ..
            } = &r.body
            {
                ext.push(("start", ms(*start_ns).to_string()));
                ext.push(("end", ms(*end_ns).to_string()));
            }
        }
        Body::Lost {
            program,
            interface,
            rate_limited,
            ring_full,
            unwritten,
        } => {
            ext.push(("deviceInboundInterface", interface.clone()));
            ext.push(("cs2", program.name().to_owned()));
            ext.push(("cs2Label", "program".to_owned()));
            cef_lost_counts(&mut ext, [*rate_limited, *ring_full, *unwritten]);
        }
        Body::SyslogDropped { address, dropped } => {
            ext.push(("cn3", dropped.to_string()));
            ext.push(("cn3Label", "syslogDropped".to_owned()));
            ext.push(("cs4", address.clone()));
            ext.push(("cs4Label", "syslogAddress".to_owned()));
        }
    }
    if let Some(n) = r.body.decisions() {
        ext.push(("cnt", n.to_string()));
    }
    if r.previous_run {
        ext.push(("cs5", "previous".to_owned()));
        ext.push(("cs5Label", "run".to_owned()));
    }
    ext.push(("externalId", r.seq.to_string()));
    ext.push(("cs1", chain.to_owned()));
    ext.push(("cs1Label", "chain".to_owned()));
    let ext: Vec<String> = ext
        .iter()
        .map(|(k, v)| format!("{k}={}", cef_value(v)))
        .collect();
    format!(
        "CEF:0|ztxdp|ztxdp|{}|{}|{}|{severity}|{}",
        cef_header(env!("CARGO_PKG_VERSION")),
        cef_header(&signature),
        cef_header(&name),
        ext.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::GENESIS;

    const T: i64 = 1_795_326_000_123_456_789;

    fn tcp_deny() -> Record {
        Record {
            previous_run: false,
            seq: 7,
            time_ns: T,
            body: Body::Decision {
                flow: Flow {
                    program: Program::Edge,
                    interface: "eth0".into(),
                    reason: reason::DROP_PORT_NOT_ALLOWED,
                    ip: Some(IpFlow {
                        src: "10.1.0.3".parse().expect("address"),
                        dst: "10.1.0.1".parse().expect("address"),
                        protocol: zt_common::proto::TCP,
                        src_port: Some(40000),
                        dst_port: Some(5432),
                        tcp_flags: Some(2),
                    }),
                    peer: None,
                },
                suppressed: 4,
            },
        }
    }

    fn samples() -> Vec<Record> {
        let tunnel_allow = Record {
            previous_run: false,
            seq: 8,
            time_ns: T + 1,
            body: Body::Decision {
                flow: Flow {
                    program: Program::Tunnel,
                    interface: "wg0".into(),
                    reason: reason::PASS_GRANT,
                    ip: Some(IpFlow {
                        src: "fd00::2".parse().expect("address"),
                        dst: "fd00::1".parse().expect("address"),
                        protocol: zt_common::proto::TCP,
                        src_port: Some(1234),
                        dst_port: Some(22),
                        tcp_flags: Some(2),
                    }),
                    peer: Some(Peer {
                        name: "app=1|x".into(),
                        public_key: Some("k".into()),
                    }),
                },
                suppressed: 0,
            },
        };
        let arp = Record {
            previous_run: false,
            seq: 9,
            time_ns: T + 2,
            body: Body::Decision {
                flow: Flow {
                    program: Program::Edge,
                    interface: "eth0".into(),
                    reason: reason::DROP_MALFORMED,
                    ip: None,
                    peer: None,
                },
                suppressed: 0,
            },
        };
        let Body::Decision { flow, .. } = tcp_deny().body else {
            unreachable!("a decision")
        };
        let summary = Record {
            previous_run: false,
            seq: 10,
            time_ns: T + 3,
            body: Body::Summary {
                flow,
                count: 9,
                start_ns: T - 5,
                end_ns: T + 1_000_000_000,
            },
        };
        let lost = Record {
            previous_run: false,
            seq: 11,
            time_ns: T + 4,
            body: Body::Lost {
                program: Program::Edge,
                interface: "eth0".into(),
                rate_limited: 17_000,
                ring_full: 3,
                unwritten: 0,
            },
        };
        let gap = Record {
            previous_run: false,
            seq: 12,
            time_ns: T + 5,
            body: Body::SyslogDropped {
                address: "127.0.0.1:6514".into(),
                dropped: 5,
            },
        };
        // What a new `up` writes for the programs it replaced.
        let earlier = Record {
            previous_run: true,
            seq: 13,
            time_ns: T + 6,
            body: Body::Lost {
                program: Program::Tunnel,
                interface: "wg0".into(),
                rate_limited: 1,
                ring_full: 0,
                unwritten: 40,
            },
        };
        vec![tcp_deny(), tunnel_allow, arp, summary, lost, gap, earlier]
    }

    fn json(format: AuditFormat, r: &Record) -> Value {
        let text = line(format, r, GENESIS);
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{format:?} line is not JSON ({e}): {text}"))
    }

    #[test]
    fn ecs_keeps_the_documented_shape() {
        let v = json(AuditFormat::Ecs, &tcp_deny());
        assert_eq!(v["@timestamp"], "2026-11-22T05:40:00.123456789Z");
        assert_eq!(v["event"]["action"], "deny");
        assert_eq!(v["event"]["reason"], "port_not_allowed");
        assert_eq!(v["event"]["type"], json!(["denied"]));
        assert_eq!(v["observer"]["ingress"]["interface"]["name"], "eth0");
        assert_eq!(
            v["network"],
            json!({ "transport": "tcp", "type": "ipv4", "iana_number": "6" })
        );
        assert_eq!(v["source"], json!({ "ip": "10.1.0.3", "port": 40000 }));
        assert_eq!(v["destination"], json!({ "ip": "10.1.0.1", "port": 5432 }));
        assert_eq!(v["ztxdp"]["program"], "edge");
        assert_eq!(v["ztxdp"]["seq"], 7);
        assert_eq!(v["ztxdp"]["suppressed"], 4);
        assert_eq!(v["ztxdp"]["decisions"], 5, "1 + suppressed");
        assert_eq!(v["ztxdp"]["chain"], GENESIS);
    }

    #[test]
    fn ecs_lost_and_summary_records() {
        let all = samples();
        let summary = json(AuditFormat::Ecs, &all[3]);
        assert_eq!(summary["event"]["action"], "summary");
        assert_eq!(summary["ztxdp"]["decision"], "deny");
        assert_eq!(
            (
                summary["ztxdp"]["suppressed"].as_u64(),
                summary["ztxdp"]["decisions"].as_u64()
            ),
            (Some(9), Some(9))
        );
        assert!(
            summary["event"]["start"].is_string() && summary["event"]["end"].is_string(),
            "{summary}"
        );
        let lost = json(AuditFormat::Ecs, &all[4]);
        assert_eq!(lost["event"]["action"], "lost");
        assert_eq!(lost["ztxdp"]["lost"], 17_003);
        assert_eq!(lost["ztxdp"]["decisions"], 17_003);
        assert_eq!(
            (
                lost["ztxdp"]["rate_limited"].as_u64(),
                lost["ztxdp"]["ring_full"].as_u64()
            ),
            (Some(17_000), Some(3))
        );
        let gap = json(AuditFormat::Ecs, &all[5]);
        assert_eq!(gap["event"]["action"], "syslog_dropped");
        assert_eq!(
            gap["ztxdp"]["syslog"],
            json!({ "address": "127.0.0.1:6514", "dropped": 5 })
        );
        assert!(
            gap["ztxdp"].get("decisions").is_none(),
            "a forwarding gap is not a decision count"
        );
        assert!(
            lost["ztxdp"].get("unwritten").is_none() && lost["ztxdp"].get("previous_run").is_none(),
            "only records of a previous run carry these: {lost}"
        );
        let earlier = json(AuditFormat::Ecs, &all[6]);
        assert_eq!(earlier["ztxdp"]["previous_run"], true);
        assert_eq!(
            (
                earlier["ztxdp"]["unwritten"].as_u64(),
                earlier["ztxdp"]["lost"].as_u64(),
                earlier["ztxdp"]["decisions"].as_u64()
            ),
            (Some(40), Some(41), Some(41))
        );
        let arp = json(AuditFormat::Ecs, &all[2]);
        assert!(
            arp.get("source").is_none() && arp.get("network").is_none(),
            "non-IP has no addresses: {arp}"
        );
    }

    #[test]
    fn ocsf_uses_network_activity_names() {
        let v = json(AuditFormat::Ocsf, &tcp_deny());
        assert_eq!(v["class_uid"], 4001);
        assert_eq!(v["category_uid"], 4);
        assert_eq!(v["activity_id"], 5, "a deny is a refused connection");
        assert_eq!(v["type_uid"], 400_105);
        assert_eq!(
            (v["action_id"].as_u64(), v["action"].as_str()),
            (Some(2), Some("Denied"))
        );
        assert_eq!(
            (v["disposition_id"].as_u64(), v["disposition"].as_str()),
            (Some(2), Some("Blocked"))
        );
        assert_eq!(v["time"], 1_795_326_000_123_i64, "milliseconds");
        assert_eq!(v["time_dt"], "2026-11-22T05:40:00.123456789Z");
        assert_eq!(
            v["src_endpoint"],
            json!({ "ip": "10.1.0.3", "port": 40000 })
        );
        assert_eq!(
            v["dst_endpoint"],
            json!({ "ip": "10.1.0.1", "port": 5432, "interface_name": "eth0" })
        );
        assert_eq!(v["connection_info"]["protocol_name"], "tcp");
        assert_eq!(v["connection_info"]["protocol_num"], 6);
        assert_eq!(v["connection_info"]["protocol_ver_id"], 4);
        assert_eq!(v["count"], 5);
        assert_eq!(v["status_detail"], "port_not_allowed");
        assert_eq!(v["metadata"]["version"], OCSF_VERSION);
        assert_eq!(v["ztxdp"]["seq"], 7);
        let all = samples();
        let allow = json(AuditFormat::Ocsf, &all[1]);
        assert_eq!(
            (allow["activity_id"].as_u64(), allow["action_id"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(allow["connection_info"]["protocol_ver_id"], 6);
        assert_eq!(allow["src_endpoint"]["name"], "app=1|x");
        let summary = json(AuditFormat::Ocsf, &all[3]);
        assert_eq!(
            (summary["activity_id"].as_u64(), summary["count"].as_u64()),
            (Some(6), Some(9))
        );
        let lost = json(AuditFormat::Ocsf, &all[4]);
        assert_eq!(
            (lost["activity_id"].as_u64(), lost["count"].as_u64()),
            (Some(99), Some(17_003))
        );
    }

    #[test]
    fn both_formats_parse_back_to_the_same_record() {
        for format in [AuditFormat::Ecs, AuditFormat::Ocsf] {
            let mut prev = GENESIS.to_owned();
            for r in samples() {
                let (text, chain) = chain::seal(&prev, &unchained(format, &r));
                let (back, got_chain) =
                    parse(&text).unwrap_or_else(|e| panic!("{format:?}: {e}\n{text}"));
                assert_eq!(back, r, "{format:?} round trip of {text}");
                assert_eq!(got_chain, chain);
                assert!(
                    text.ends_with(&format!(",\"chain\":\"{chain}\"}}}}")),
                    "{text}"
                );
                prev = chain;
            }
        }
    }

    #[test]
    fn cef_escapes_and_maps_fields() {
        let all = samples();
        let deny = cef(&all[0], GENESIS);
        assert!(deny.starts_with("CEF:0|ztxdp|ztxdp|"), "{deny}");
        assert!(
            deny.contains("|port_not_allowed|deny port_not_allowed|5|rt=1795326000123 act=deny"),
            "{deny}"
        );
        for field in [
            "src=10.1.0.3",
            "spt=40000",
            "dst=10.1.0.1",
            "dpt=5432",
            "proto=TCP",
            "cnt=5",
            "externalId=7",
            "deviceInboundInterface=eth0",
        ] {
            assert!(
                deny.contains(&format!(" {field}")),
                "{field} missing: {deny}"
            );
        }
        let allow = cef(&all[1], GENESIS);
        assert!(
            allow.contains(" c6a2=fd00::2 ") && allow.contains(" c6a3=fd00::1 "),
            "IPv6 goes to c6a2/c6a3: {allow}"
        );
        assert!(
            allow.contains(" cs3=app\\=1|x "),
            "= is escaped in values, | is not: {allow}"
        );
        assert!(
            cef(&all[4], GENESIS).contains(" cnt=17003 "),
            "lost records count what they stand for"
        );
        let earlier = cef(&all[6], GENESIS);
        for field in [
            "cn3=40 cn3Label=unwritten",
            "cnt=41",
            "cs5=previous cs5Label=run",
        ] {
            assert!(
                earlier.contains(&format!(" {field} ")),
                "{field} missing: {earlier}"
            );
        }
        assert_eq!(cef_header("a|b\\c"), "a\\|b\\\\c");
    }
}
