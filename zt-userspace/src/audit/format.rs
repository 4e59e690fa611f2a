//! Field names: [`Record`]s as Elastic Common Schema or OCSF 4001 Network
//! Activity JSON (the file formats, which parse back), and as CEF (an output
//! format of `ztxdp events`).
//!
//! Both JSON formats end with ztxdp's own object (sequence number, chain,
//! and what neither schema has a field for), which [`super::chain`] needs:
//! `ztxdp` in ECS (a custom field set), `unmapped` in OCSF (the schema's
//! place for attributes it does not define). Field names follow ECS 9.4.0
//! and OCSF 1.3.0; a test checks every name against their published field
//! lists (`tests/data/schemas`).

use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat};
use serde_json::{Map, Value, json};
use zt_common::reason;

use super::{
    chain,
    record::{self, Body, ChangeStage, Flow, IpFlow, Peer, Program, Record},
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
/// ECS version the records follow (`ecs.version`).
pub const ECS_VERSION: &str = "9.4.0";
/// The OCSF profiles whose attributes the records use: `*_dt` times, and
/// `action_id` / `disposition_id`.
const OCSF_PROFILES: [&str; 2] = ["datetime", "security_control"];
const OCSF_NETWORK_ACTIVITY: u64 = 4001;
/// OCSF 1.3.0's `action_id` knows only Allowed (1), Denied (2) and Other
/// (99); "Observed" arrived in 1.4.0. A would-deny is therefore Other, with
/// the caption that names it, as the schema asks of every Other.
const OCSF_ACTION_OTHER: u64 = 99;
const OCSF_ACTION_OBSERVED: &str = "Observed";

pub(crate) fn rfc3339(ns: i64) -> String {
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

/// The member that holds ztxdp's own fields, last in every record.
const fn own_member(format: AuditFormat) -> &'static str {
    match format {
        AuditFormat::Ecs => "ztxdp",
        AuditFormat::Ocsf => "unmapped",
    }
}

/// ztxdp's own object of a parsed line of either format (`ztxdp` or
/// `unmapped`), which holds `seq`, `chain` and `gap`.
#[must_use]
pub fn own(v: &Value) -> Option<&Value> {
    v.get("ztxdp").or_else(|| v.get("unmapped"))
}

/// The record text without its chain member: `{...,"ztxdp":{...}}` (ECS)
/// or `{...,"unmapped":{...}}` (OCSF), with that member last whatever order
/// the JSON map keeps keys in.
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
    text.push('"');
    text.push_str(own_member(format));
    text.push_str("\":");
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
fn peer_value(p: &Peer) -> Value {
    let mut v = json!({ "name": p.name, "public_key": p.public_key });
    // Only when a group granted the decision: other records stay as they
    // were before groups.
    if !p.groups.is_empty() {
        v["groups"] = json!(p.groups);
    }
    v
}

fn ecs_event(flow: &Flow, action: &str) -> Value {
    let (kind, outcome) = if flow.would_drop {
        // The packet passed (audit mode): allowed, not a connection the
        // policy started; `event.action` says the policy would deny it.
        (json!(["allowed"]), "success")
    } else if flow.allowed() {
        (json!(["allowed", "start"]), "success")
    } else {
        (json!(["denied"]), "failure")
    };
    json!({
        "kind": "event",
        "category": ["network"],
        "type": kind,
        "action": action,
        "outcome": outcome,
        "reason": reason::name(flow.reason),
    })
}

fn ecs_flow(flow: &Flow, top: &mut Map<String, Value>, z: &mut Map<String, Value>) {
    top.insert(
        "observer".into(),
        json!({ "ingress": { "interface": { "name": flow.interface } } }),
    );
    // Decided on the host, about what arrived at it.
    top.insert("network".into(), json!({ "direction": "ingress" }));
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
                "direction": "ingress",
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
    if let Some(s) = &flow.service {
        z.insert("service".into(), json!({ "name": s }));
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
            program, interface, ..
        } => {
            top.insert(
                "event".into(),
                json!({ "kind": "metric", "action": "lost", "outcome": "unknown" }),
            );
            top.insert(
                "observer".into(),
                json!({ "ingress": { "interface": { "name": interface } } }),
            );
            z.insert("program".into(), json!(program.name()));
            lost_counts(&r.body, &mut z);
        }
        Body::SyslogDropped { address, dropped } => {
            top.insert(
                "event".into(),
                json!({ "kind": "metric", "action": "syslog_dropped", "outcome": "unknown" }),
            );
            z.insert(
                "syslog".into(),
                json!({ "address": address, "dropped": dropped }),
            );
        }
        Body::Gap { reason, .. } => {
            top.insert(
                "event".into(),
                json!({
                    "kind": "alert",
                    "action": "gap",
                    "outcome": "unknown",
                    "reason": reason.meaning(),
                }),
            );
            gap_member(&r.body, &mut z);
        }
        Body::Drift { differences, .. } => {
            top.insert(
                "event".into(),
                json!({
                    "kind": if *differences == 0 { "event" } else { "alert" },
                    "category": ["configuration"],
                    "type": ["change"],
                    "action": "drift",
                    "outcome": "unknown",
                    "reason": message(&r.body),
                }),
            );
            drift_member(&r.body, &mut z);
        }
        Body::Change { stage, .. } => {
            top.insert(
                "event".into(),
                json!({
                    "kind": if *stage == ChangeStage::Rollback { "alert" } else { "event" },
                    "category": ["configuration"],
                    "type": ["change"],
                    "action": stage.name(),
                    "outcome": "unknown",
                    "reason": message(&r.body),
                }),
            );
            change_member(&r.body, &mut z);
        }
    }
    top.insert("ecs".into(), json!({ "version": ECS_VERSION }));
    let observer = top
        .entry("observer")
        .or_insert_with(|| Value::Object(Map::new()));
    observer["type"] = json!("firewall");
    (top, z)
}

/// The counts of a `lost` record, the same in both formats.
fn lost_counts(body: &Body, z: &mut Map<String, Value>) {
    if let Body::Lost {
        rate_limited,
        ring_full,
        unwritten,
        ..
    } = body
    {
        z.insert("rate_limited".into(), json!(rate_limited));
        z.insert("ring_full".into(), json!(ring_full));
        z.insert("unwritten".into(), json!(unwritten));
        z.insert("lost".into(), json!(body.decisions().unwrap_or(0)));
    }
}

/// `ztxdp.gap` of a `gap` record, the same in both formats.
fn gap_member(body: &Body, z: &mut Map<String, Value>) {
    if let Body::Gap {
        previous_seq,
        previous_head,
        reason,
    } = body
    {
        z.insert(
            "gap".into(),
            json!({
                "previous_seq": previous_seq,
                "previous_head": previous_head,
                "reason": reason.name(),
            }),
        );
    }
}

/// `ztxdp.drift` of a `drift` record, the same in both formats.
fn drift_member(body: &Body, z: &mut Map<String, Value>) {
    if let Body::Drift {
        config_sha256,
        differences,
        summary,
    } = body
    {
        z.insert(
            "drift".into(),
            json!({
                "config_sha256": config_sha256,
                "differences": differences,
                "summary": summary,
            }),
        );
    }
}

/// `ztxdp.change` of a change, confirm or rollback record, the same in
/// both formats.
fn change_member(body: &Body, z: &mut Map<String, Value>) {
    if let Body::Change {
        stage,
        command,
        config,
        config_sha256,
        previous_sha256,
        deadline_ns,
        by,
    } = body
    {
        z.insert(
            "change".into(),
            json!({
                "stage": stage.name(),
                "command": command,
                "config": config,
                "config_sha256": config_sha256,
                "previous_sha256": previous_sha256,
                "deadline": rfc3339(*deadline_ns),
                "by": by,
            }),
        );
    }
}

/// OCSF activity of a record: (id, name).
fn ocsf_activity(body: &Body) -> (u64, &'static str) {
    match body {
        Body::Decision { flow, .. } if flow.allowed() => (1, "Open"),
        Body::Decision { .. } => (5, "Refuse"),
        Body::Summary { .. } => (6, "Traffic"),
        Body::Lost { .. } => (99, "Lost"),
        Body::SyslogDropped { .. } => (99, "Forwarding Gap"),
        Body::Gap { .. } => (99, "Trail Gap"),
        Body::Drift { .. } => (99, "Policy Drift"),
        Body::Change { stage, .. } => match stage {
            ChangeStage::Change => (99, "Policy Change"),
            ChangeStage::Confirm => (99, "Policy Confirmed"),
            ChangeStage::Rollback => (99, "Policy Rollback"),
        },
    }
}

fn ms(ns: i64) -> i64 {
    ns.div_euclid(1_000_000)
}

fn ocsf_flow(flow: &Flow, top: &mut Map<String, Value>, z: &mut Map<String, Value>) {
    let (action, disposition) = if flow.would_drop {
        // The control observed what it would have denied, and let it pass.
        (
            json!([OCSF_ACTION_OTHER, OCSF_ACTION_OBSERVED]),
            json!([1, "Allowed"]),
        )
    } else if flow.allowed() {
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
    if let Some(s) = &flow.service {
        // The service the packet was for, on the host it reached.
        dst.insert("svc_name".into(), json!(s));
        z.insert("service".into(), json!({ "name": s }));
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
            "profiles": OCSF_PROFILES,
            "sequence": r.seq,
            "product": { "name": "ztxdp", "vendor_name": "ztxdp", "version": env!("CARGO_PKG_VERSION") },
        }),
    );
    if let Some(n) = r.body.decisions() {
        top.insert("count".into(), json!(n));
    }
    let (severity_id, severity) = match r.body {
        Body::Decision { .. }
        | Body::Summary { .. }
        | Body::Drift { differences: 0, .. }
        | Body::Change {
            stage: ChangeStage::Change | ChangeStage::Confirm,
            ..
        } => (1, "Informational"),
        Body::Lost { .. } | Body::SyslogDropped { .. } | Body::Change { .. } => (3, "Medium"),
        Body::Gap { .. } | Body::Drift { .. } => (4, "High"),
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
            program, interface, ..
        } => {
            top.insert(
                "dst_endpoint".into(),
                json!({ "interface_name": interface }),
            );
            z.insert("program".into(), json!(program.name()));
            lost_counts(&r.body, &mut z);
        }
        Body::SyslogDropped { address, dropped } => {
            z.insert(
                "syslog".into(),
                json!({ "address": address, "dropped": dropped }),
            );
        }
        Body::Gap { .. } => gap_member(&r.body, &mut z),
        Body::Drift { .. } => drift_member(&r.body, &mut z),
        Body::Change { .. } => change_member(&r.body, &mut z),
    }
    // Every record has an action; a count or a gap allows or denies nothing.
    if !top.contains_key("action_id") {
        top.insert("action_id".into(), json!(0));
        top.insert("action".into(), json!("Unknown"));
        top.insert("disposition_id".into(), json!(0));
        top.insert("disposition".into(), json!("Unknown"));
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
        } => format!(
            "{} {} decisions without a record: {rate_limited} rate-limited, {ring_full} lost to a full ring buffer, \
             {unwritten} not written (audit file refused writes)",
            body.decisions().unwrap_or(0),
            program.name()
        ),
        Body::SyslogDropped { address, dropped } => {
            format!("{dropped} records could not be forwarded to syslog collector {address}")
        }
        Body::Gap {
            previous_seq,
            reason,
            ..
        } => format!(
            "records after seq {previous_seq} are not in this file: {}",
            reason.meaning()
        ),
        Body::Drift { differences: 0, .. } => "the kernel runs the policy again".to_owned(),
        Body::Drift {
            differences,
            summary,
            ..
        } => format!(
            "the kernel differs from the policy ({differences} differences): {}",
            summary.join("; ")
        ),
        Body::Change {
            stage,
            command,
            config,
            config_sha256,
            previous_sha256,
            deadline_ns,
            ..
        } => {
            let previous = previous_sha256.as_deref().unwrap_or("none");
            match stage {
                ChangeStage::Change => format!(
                    "`{command} --confirm` applied {config} (sha256 {config_sha256}); it rolls \
                     back to sha256 {previous} at {} unless confirmed",
                    rfc3339(*deadline_ns)
                ),
                ChangeStage::Confirm => {
                    format!("confirmed {config} (sha256 {config_sha256})")
                }
                ChangeStage::Rollback => format!(
                    "{config} (sha256 {config_sha256}) was not confirmed in time: rolled back \
                     to sha256 {previous}"
                ),
            }
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
        // The field pointers below name ztxdp's object as in ECS.
        let mut v = v;
        if let Some(own) = v.get("unmapped").cloned() {
            v["ztxdp"] = own;
        }
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
        groups: p
            .get("groups")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default(),
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

fn parse_flow(
    v: &Value,
    f: &FlowFields,
    protocol: Option<u8>,
    would_drop: bool,
) -> Result<Flow, FormatError> {
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
        service: v
            .pointer("/ztxdp/service/name")
            .and_then(Value::as_str)
            .map(str::to_owned),
        would_drop,
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
        "allow" | "deny" | "would_deny" => Body::Decision {
            flow: parse_flow(v, &ECS_FLOW, protocol, action == "would_deny")?,
            suppressed: u64_at(v, "/ztxdp/suppressed")?,
        },
        "summary" => Body::Summary {
            flow: parse_flow(
                v,
                &ECS_FLOW,
                protocol,
                v.pointer("/ztxdp/decision").and_then(Value::as_str) == Some("would_deny"),
            )?,
            count: u64_at(v, "/ztxdp/suppressed")?,
            start_ns: parse_time(v, "/event/start")?,
            end_ns: parse_time(v, "/event/end")?,
        },
        "lost" => parse_lost(v, ECS_FLOW.interface)?,
        "syslog_dropped" => parse_syslog_dropped(v)?,
        "gap" => parse_gap(v)?,
        "drift" => parse_drift(v)?,
        "change" | "confirm" | "rollback" => parse_change(v)?,
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
        // Absent in records written before write failures were counted.
        unwritten: v
            .pointer("/ztxdp/unwritten")
            .map_or(Ok(0), |_| u64_at(v, "/ztxdp/unwritten"))?,
    })
}

/// A `gap` record's body, the same in both formats.
fn parse_gap(v: &Value) -> Result<Body, FormatError> {
    let reason = str_at(v, "/ztxdp/gap/reason")?;
    Ok(Body::Gap {
        previous_seq: u64_at(v, "/ztxdp/gap/previous_seq")?,
        previous_head: str_at(v, "/ztxdp/gap/previous_head")?.to_owned(),
        reason: record::GapReason::from_name(reason).ok_or_else(|| FormatError::Bad {
            field: "/ztxdp/gap/reason",
            value: reason.to_owned(),
        })?,
    })
}

/// A `drift` record's body, the same in both formats.
fn parse_drift(v: &Value) -> Result<Body, FormatError> {
    let summary = v
        .pointer("/ztxdp/drift/summary")
        .and_then(Value::as_array)
        .ok_or(FormatError::Missing {
            field: "/ztxdp/drift/summary",
        })?
        .iter()
        .map(|line| {
            line.as_str()
                .map(str::to_owned)
                .ok_or_else(|| FormatError::Bad {
                    field: "/ztxdp/drift/summary",
                    value: line.to_string(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Body::Drift {
        config_sha256: str_at(v, "/ztxdp/drift/config_sha256")?.to_owned(),
        differences: u64_at(v, "/ztxdp/drift/differences")?,
        summary,
    })
}

/// `ztxdp.previous_run`, present (and true) only on records of an earlier run.
fn previous_run_at(v: &Value) -> bool {
    v.pointer("/ztxdp/previous_run")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// A change, confirm or rollback record's body, the same in both formats.
fn parse_change(v: &Value) -> Result<Body, FormatError> {
    let stage = str_at(v, "/ztxdp/change/stage")?;
    let previous = v.pointer("/ztxdp/change/previous_sha256");
    Ok(Body::Change {
        stage: ChangeStage::from_name(stage).ok_or_else(|| FormatError::Bad {
            field: "/ztxdp/change/stage",
            value: stage.to_owned(),
        })?,
        command: str_at(v, "/ztxdp/change/command")?.to_owned(),
        config: str_at(v, "/ztxdp/change/config")?.to_owned(),
        config_sha256: str_at(v, "/ztxdp/change/config_sha256")?.to_owned(),
        previous_sha256: match previous {
            None | Some(Value::Null) => None,
            Some(_) => Some(str_at(v, "/ztxdp/change/previous_sha256")?.to_owned()),
        },
        deadline_ns: parse_time(v, "/ztxdp/change/deadline")?,
        by: str_at(v, "/ztxdp/change/by")?.to_owned(),
    })
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
    let would_drop = v.pointer("/action_id").and_then(Value::as_u64) == Some(OCSF_ACTION_OTHER)
        && v.pointer("/action").and_then(Value::as_str) == Some(OCSF_ACTION_OBSERVED);
    let body = match u64_at(v, "/activity_id")? {
        1 | 5 => Body::Decision {
            flow: parse_flow(v, &OCSF_FLOW, protocol, would_drop)?,
            suppressed: u64_at(v, "/ztxdp/suppressed")?,
        },
        6 => Body::Summary {
            flow: parse_flow(v, &OCSF_FLOW, protocol, would_drop)?,
            count: u64_at(v, "/ztxdp/suppressed")?,
            start_ns: parse_time(v, "/start_time_dt")?,
            end_ns: parse_time(v, "/end_time_dt")?,
        },
        99 if v.pointer("/ztxdp/syslog").is_some() => parse_syslog_dropped(v)?,
        99 if v.pointer("/ztxdp/gap").is_some() => parse_gap(v)?,
        99 if v.pointer("/ztxdp/drift").is_some() => parse_drift(v)?,
        99 if v.pointer("/ztxdp/change").is_some() => parse_change(v)?,
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

/// CEF severity of a decision: an allow 1, a would-deny (audit mode) 3,
/// a deny 5.
const fn cef_severity(flow: &Flow) -> u8 {
    if flow.would_drop {
        3
    } else if flow.allowed() {
        1
    } else {
        5
    }
}

/// CEF signature id, name and severity of a record.
fn cef_signature(body: &Body) -> (String, String, u8) {
    match body {
        Body::Decision { flow, .. } => (
            reason::name(flow.reason).to_owned(),
            message(body),
            cef_severity(flow),
        ),
        Body::Summary { flow, .. } => (
            "summary".to_owned(),
            format!("summary {} {}", flow.action(), reason::name(flow.reason)),
            cef_severity(flow),
        ),
        Body::Lost { .. } => ("lost".to_owned(), "decisions lost".to_owned(), 7),
        Body::SyslogDropped { .. } => (
            "syslog_dropped".to_owned(),
            "syslog forwarding gap".to_owned(),
            7,
        ),
        Body::Gap { .. } => ("gap".to_owned(), "audit trail gap".to_owned(), 9),
        Body::Drift { differences: 0, .. } => {
            ("drift".to_owned(), "policy back in sync".to_owned(), 3)
        }
        Body::Drift { .. } => ("drift".to_owned(), "policy drift".to_owned(), 8),
        Body::Change { stage, .. } => {
            let (name, severity) = match stage {
                ChangeStage::Change => ("policy change awaiting confirmation", 3),
                ChangeStage::Confirm => ("policy change confirmed", 3),
                ChangeStage::Rollback => ("policy change rolled back", 6),
            };
            (stage.name().to_owned(), name.to_owned(), severity)
        }
    }
}

/// The CEF extension of a drift or change record: the policy's digests.
fn cef_policy(body: &Body, ext: &mut Vec<(&str, String)>) {
    ext.push(("msg", message(body)));
    match body {
        Body::Drift {
            config_sha256,
            differences,
            ..
        } => {
            ext.push(("cn1", differences.to_string()));
            ext.push(("cn1Label", "differences".to_owned()));
            ext.push(("cs4", config_sha256.clone()));
            ext.push(("cs4Label", "configSha256".to_owned()));
        }
        Body::Change {
            command,
            config_sha256,
            previous_sha256,
            by,
            ..
        } => {
            ext.push(("cs4", config_sha256.clone()));
            ext.push(("cs4Label", "configSha256".to_owned()));
            ext.push(("cs5", previous_sha256.clone().unwrap_or_default()));
            ext.push(("cs5Label", "previousSha256".to_owned()));
            ext.push(("cs6", format!("{command} by {by}")));
            ext.push(("cs6Label", "change".to_owned()));
        }
        _ => {}
    }
}

/// A tunnel decision's peer: its name, and the groups whose grant passed
/// it (group names hold no comma).
fn cef_peer(ext: &mut Vec<(&str, String)>, p: &Peer) {
    ext.push(("cs3", p.name.clone()));
    ext.push(("cs3Label", "peer".to_owned()));
    if !p.groups.is_empty() {
        ext.push(("cs4", p.groups.join(",")));
        ext.push(("cs4Label", "peerGroups".to_owned()));
    }
}

/// The CEF extension fields of a decision or summary of `flow`.
fn cef_flow(flow: &Flow, body: &Body, ext: &mut Vec<(&str, String)>) {
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
        cef_peer(ext, p);
    }
    if let Some(s) = &flow.service {
        ext.push(("destinationServiceName", s.clone()));
    }
    if let Body::Summary {
        start_ns, end_ns, ..
    } = body
    {
        ext.push(("start", ms(*start_ns).to_string()));
        ext.push(("end", ms(*end_ns).to_string()));
    }
}

/// One record as an `ArcSight` CEF line (version 0), for `ztxdp events`.
#[must_use]
pub fn cef(r: &Record, chain: &str) -> String {
    let mut ext: Vec<(&str, String)> = vec![("rt", ms(r.time_ns).to_string())];
    let (signature, name, severity) = cef_signature(&r.body);
    match &r.body {
        Body::Decision { flow, .. } | Body::Summary { flow, .. } => {
            cef_flow(flow, &r.body, &mut ext);
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
            ext.push(("cn1", rate_limited.to_string()));
            ext.push(("cn1Label", "rateLimited".to_owned()));
            ext.push(("cn2", ring_full.to_string()));
            ext.push(("cn2Label", "ringFull".to_owned()));
            ext.push(("cn3", unwritten.to_string()));
            ext.push(("cn3Label", "unwritten".to_owned()));
        }
        Body::Gap {
            previous_seq,
            previous_head,
            reason,
        } => {
            ext.push(("reason", reason.name().to_owned()));
            ext.push(("cs5", previous_head.clone()));
            ext.push(("cs5Label", "previousHead".to_owned()));
            ext.push(("cs6", previous_seq.to_string()));
            ext.push(("cs6Label", "previousSeq".to_owned()));
        }
        Body::SyslogDropped { address, dropped } => {
            ext.push(("cn3", dropped.to_string()));
            ext.push(("cn3Label", "syslogDropped".to_owned()));
            ext.push(("cs4", address.clone()));
            ext.push(("cs4Label", "syslogAddress".to_owned()));
        }
        Body::Drift { .. } | Body::Change { .. } => cef_policy(&r.body, &mut ext),
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
                    service: None,
                    would_drop: false,
                },
                suppressed: 4,
            },
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one literal record of each kind, side by side"
    )]
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
                        groups: vec!["db-clients".into(), "ops".into()],
                    }),
                    service: None,
                    would_drop: false,
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
                    service: None,
                    would_drop: false,
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
                unwritten: 40,
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
        let trail_gap = Record {
            seq: 40,
            time_ns: T + 6,
            body: Body::Gap {
                previous_seq: 38,
                previous_head: "ab".repeat(32),
                reason: record::GapReason::Unlinked,
            },
            previous_run: false,
        };
        let mut all = vec![
            tcp_deny(),
            tunnel_allow,
            arp,
            summary,
            lost,
            gap,
            trail_gap,
            would_deny(),
            would_deny_summary(),
            previous_run(),
        ];
        all.extend(drift_samples());
        all.push(service_allow());
        all.extend(change_samples());
        all
    }

    /// An edge service's decision, which names the service.
    fn service_allow() -> Record {
        let mut r = tcp_deny();
        r.seq = 13;
        if let Body::Decision { flow, .. } = &mut r.body {
            flow.reason = reason::PASS_SERVICE;
            flow.service = Some("https".into());
            if let Some(ip) = &mut flow.ip {
                ip.dst_port = Some(443);
            }
        }
        r
    }

    #[test]
    fn a_service_decision_names_the_service_in_every_format() {
        let r = service_allow();
        assert_eq!(
            json(AuditFormat::Ecs, &r)["ztxdp"]["service"]["name"],
            "https"
        );
        let o = json(AuditFormat::Ocsf, &r);
        assert_eq!(o["unmapped"]["service"]["name"], "https");
        assert_eq!(o["dst_endpoint"]["svc_name"], "https");
        let line = cef(&r, GENESIS);
        assert!(line.contains(" destinationServiceName=https "), "{line}");
        // Records without a service say nothing of one.
        assert!(
            json(AuditFormat::Ecs, &tcp_deny())["ztxdp"]
                .get("service")
                .is_none()
        );
    }

    /// What a new `up` writes for the programs it replaced.
    fn previous_run() -> Record {
        Record {
            previous_run: true,
            seq: 45,
            time_ns: T + 10,
            body: Body::Lost {
                program: Program::Tunnel,
                interface: "wg0".into(),
                rate_limited: 1,
                ring_full: 0,
                unwritten: 40,
            },
        }
    }

    /// A drift record, and one back in sync.
    fn drift_samples() -> [Record; 2] {
        let drift = Record {
            seq: 41,
            time_ns: T + 7,
            body: Body::Drift {
                config_sha256: "cd".repeat(32),
                differences: 2,
                summary: vec![
                    "peer app-1: tcp/5432 missing".into(),
                    "ssh_allow: 203.0.113.0/24 extra".into(),
                ],
            },
            previous_run: false,
        };
        let in_sync = Record {
            seq: 42,
            time_ns: T + 8,
            body: Body::Drift {
                config_sha256: "cd".repeat(32),
                differences: 0,
                summary: Vec::new(),
            },
            previous_run: false,
        };
        [drift, in_sync]
    }

    /// A tunnel decision the policy denies, passed in audit mode.
    fn would_deny() -> Record {
        let mut r = tcp_deny();
        r.seq = 43;
        if let Body::Decision { flow, .. } = &mut r.body {
            flow.program = Program::Tunnel;
            flow.interface = "wg0".into();
            flow.reason = reason::DROP_NOT_GRANTED;
            flow.peer = Some(Peer {
                name: "app-2".into(),
                public_key: None,
                groups: Vec::new(),
            });
            flow.would_drop = true;
        }
        r
    }

    fn would_deny_summary() -> Record {
        let Body::Decision { flow, .. } = would_deny().body else {
            unreachable!("a decision")
        };
        Record {
            seq: 44,
            time_ns: T + 9,
            body: Body::Summary {
                flow,
                count: 3,
                start_ns: T,
                end_ns: T + 1_000_000_000,
            },
            previous_run: false,
        }
    }

    #[test]
    fn would_denies_say_so_in_every_format() {
        let ecs = json(AuditFormat::Ecs, &would_deny());
        assert_eq!(ecs["event"]["action"], "would_deny", "{ecs}");
        assert_eq!(ecs["event"]["type"], json!(["allowed"]), "{ecs}");
        assert_eq!(ecs["event"]["outcome"], "success", "{ecs}");
        assert_eq!(ecs["event"]["reason"], "not_granted", "{ecs}");
        let summary = json(AuditFormat::Ecs, &would_deny_summary());
        assert_eq!(summary["event"]["action"], "summary", "{summary}");
        assert_eq!(summary["ztxdp"]["decision"], "would_deny", "{summary}");
        for r in [would_deny(), would_deny_summary()] {
            let ocsf = json(AuditFormat::Ocsf, &r);
            assert_eq!(
                (&ocsf["action_id"], &ocsf["action"]),
                (&json!(99), &json!("Observed")),
                "{ocsf}"
            );
            assert_eq!(ocsf["disposition_id"], 1, "{ocsf}");
            assert_eq!(ocsf["status_detail"], "not_granted", "{ocsf}");
        }
        let line = cef(&would_deny(), GENESIS);
        assert!(
            line.contains("|not_granted|would_deny not_granted|3|")
                && line.contains(" act=would_deny "),
            "{line}"
        );
        let line = cef(&would_deny_summary(), GENESIS);
        assert!(
            line.contains("|summary would_deny not_granted|3|"),
            "{line}"
        );
    }

    /// A change awaiting confirmation, and its rollback.
    fn change_samples() -> [Record; 2] {
        let change = |seq, stage, by: &str| Record {
            seq,
            time_ns: T + 9,
            body: Body::Change {
                stage,
                command: "reload".into(),
                config: "/etc/ztxdp/ztxdp.toml".into(),
                config_sha256: "ef".repeat(32),
                previous_sha256: Some("cd".repeat(32)),
                deadline_ns: T + 60_000_000_000,
                by: by.into(),
            },
            previous_run: false,
        };
        [
            change(47, ChangeStage::Change, "daemon"),
            change(48, ChangeStage::Rollback, "watchdog"),
        ]
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
            json!({ "direction": "ingress", "transport": "tcp", "type": "ipv4", "iana_number": "6" })
        );
        assert_eq!(
            (
                &v["ecs"]["version"],
                &v["observer"]["type"],
                &v["event"]["outcome"]
            ),
            (&json!(ECS_VERSION), &json!("firewall"), &json!("failure"))
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
        assert_eq!(lost["ztxdp"]["lost"], 17_043);
        assert_eq!(lost["ztxdp"]["decisions"], 17_043);
        assert_eq!(
            (
                lost["ztxdp"]["rate_limited"].as_u64(),
                lost["ztxdp"]["ring_full"].as_u64(),
                lost["ztxdp"]["unwritten"].as_u64()
            ),
            (Some(17_000), Some(3), Some(40))
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
            lost["ztxdp"].get("previous_run").is_none(),
            "only records of a previous run say so: {lost}"
        );
        let earlier = json(AuditFormat::Ecs, &previous_run());
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
            arp.get("source").is_none() && arp["network"] == json!({ "direction": "ingress" }),
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
        assert_eq!(v["metadata"]["profiles"], json!(OCSF_PROFILES));
        assert_eq!(v["unmapped"]["seq"], 7);
        assert!(v.get("ztxdp").is_none(), "ztxdp's fields are unmapped");
        let all = samples();
        let allow = json(AuditFormat::Ocsf, &all[1]);
        assert_eq!(
            (allow["activity_id"].as_u64(), allow["action_id"].as_u64()),
            (Some(1), Some(1))
        );
        assert_eq!(allow["connection_info"]["protocol_ver_id"], 6);
        assert_eq!(allow["src_endpoint"]["name"], "app=1|x");
        assert_eq!(
            allow["unmapped"]["peer"]["groups"],
            json!(["db-clients", "ops"])
        );
        assert_eq!(
            json(AuditFormat::Ecs, &all[1])["ztxdp"]["peer"]["groups"],
            json!(["db-clients", "ops"])
        );
        let summary = json(AuditFormat::Ocsf, &all[3]);
        assert_eq!(
            (summary["activity_id"].as_u64(), summary["count"].as_u64()),
            (Some(6), Some(9))
        );
        let lost = json(AuditFormat::Ocsf, &all[4]);
        assert_eq!(
            (lost["activity_id"].as_u64(), lost["count"].as_u64()),
            (Some(99), Some(17_043))
        );
        for r in &all {
            let v = json(AuditFormat::Ocsf, r);
            assert!(
                v["action_id"].is_u64(),
                "every record has an action_id: {v}"
            );
        }
    }

    /// Dotted paths of the fields of `v` (through objects, not arrays),
    /// leaving out the member named `own`.
    fn field_paths(v: &Value, own: &str) -> Vec<String> {
        fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
            if let Value::Object(m) = v {
                for (k, child) in m {
                    let path = format!("{prefix}{k}");
                    if child.is_object() {
                        walk(&format!("{path}."), child, out);
                    } else {
                        out.push(path);
                    }
                }
            }
        }
        let mut out = Vec::new();
        if let Value::Object(m) = v {
            for (k, child) in m.iter().filter(|(k, _)| *k != own) {
                if child.is_object() {
                    walk(&format!("{k}."), child, &mut out);
                } else {
                    out.push(k.clone());
                }
            }
        }
        out
    }

    #[test]
    fn every_field_name_is_in_the_published_schema() {
        let list = |text: &'static str| -> std::collections::BTreeSet<&'static str> {
            text.lines().filter(|l| !l.starts_with('#')).collect()
        };
        let ecs = list(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/schemas/ecs-9.4.0-fields.txt"
        )));
        let ocsf = list(include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/data/schemas/ocsf-1.3.0-network_activity.txt"
        )));
        assert!(ecs.contains("@timestamp") && ocsf.contains("class_uid"));
        for r in samples() {
            for (format, known, own) in [
                (AuditFormat::Ecs, &ecs, "ztxdp"),
                (AuditFormat::Ocsf, &ocsf, "unmapped"),
            ] {
                let v = json(format, &r);
                for path in field_paths(&v, own) {
                    assert!(
                        known.contains(path.as_str()),
                        "{format:?} field {path} is not in the schema: {v}"
                    );
                }
            }
        }
        assert!(ocsf.contains("unmapped"), "OCSF defines the member we use");
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
    fn drift_records_name_the_differences_in_every_format() {
        let [drift, in_sync] = &drift_samples();
        let v = json(AuditFormat::Ecs, drift);
        assert_eq!(v["event"]["action"], "drift");
        assert_eq!(v["event"]["kind"], "alert");
        assert_eq!(v["event"]["category"], json!(["configuration"]));
        assert_eq!(
            v["ztxdp"]["drift"],
            json!({
                "config_sha256": "cd".repeat(32),
                "differences": 2,
                "summary": ["peer app-1: tcp/5432 missing", "ssh_allow: 203.0.113.0/24 extra"],
            })
        );
        assert!(
            v["ztxdp"].get("decisions").is_none(),
            "a drift is not a decision count"
        );
        assert_eq!(json(AuditFormat::Ecs, in_sync)["event"]["kind"], "event");
        let o = json(AuditFormat::Ocsf, drift);
        assert_eq!(
            (o["activity_id"].as_u64(), o["severity_id"].as_u64()),
            (Some(99), Some(4))
        );
        assert_eq!(o["unmapped"]["drift"]["differences"], 2);
        assert_eq!(json(AuditFormat::Ocsf, in_sync)["severity_id"], 1);
        let c = cef(drift, GENESIS);
        assert!(c.contains("|drift|policy drift|8|"), "{c}");
        assert!(
            c.contains(" msg=the kernel differs from the policy (2 differences): peer app-1: tcp/5432 missing; ")
                && c.contains(" cn1=2 "),
            "{c}"
        );
        assert!(cef(in_sync, GENESIS).contains("|drift|policy back in sync|3|"));
    }

    #[test]
    fn change_records_carry_both_digests_in_every_format() {
        let [change, rollback] = &change_samples();
        let v = json(AuditFormat::Ecs, change);
        assert_eq!(v["event"]["action"], "change");
        assert_eq!(v["event"]["kind"], "event");
        assert_eq!(v["ztxdp"]["change"]["config_sha256"], "ef".repeat(32));
        assert_eq!(v["ztxdp"]["change"]["previous_sha256"], "cd".repeat(32));
        assert_eq!(v["ztxdp"]["change"]["command"], "reload");
        let v = json(AuditFormat::Ecs, rollback);
        assert_eq!(v["event"]["action"], "rollback");
        assert_eq!(v["event"]["kind"], "alert");
        assert_eq!(v["ztxdp"]["change"]["by"], "watchdog");
        assert!(v.get("ztxdp").and_then(|z| z.get("decisions")).is_none());
        let o = json(AuditFormat::Ocsf, rollback);
        assert_eq!(o["activity_name"], "Policy Rollback");
        assert_eq!(o["severity"], "Medium");
        assert_eq!(o["unmapped"]["change"]["stage"], "rollback");
        let c = cef(rollback, GENESIS);
        assert!(c.contains("|rollback|policy change rolled back|6|"), "{c}");
        assert!(c.contains(&format!("cs5={}", "cd".repeat(32))), "{c}");
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
            allow.contains(" cs4=db-clients,ops cs4Label=peerGroups "),
            "the groups that granted it: {allow}"
        );
        assert!(
            cef(&all[4], GENESIS).contains(" cnt=17043 "),
            "lost records count what they stand for"
        );
        let earlier = cef(&previous_run(), GENESIS);
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
