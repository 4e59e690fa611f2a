//! One readable line per audit JSON line (ECS, the default format), for
//! watching decisions live. The record kinds are those of
//! `ztxdp::audit::record::Body`, told apart by `event.action`; xtask cannot
//! link the ztxdp library (it compiles before the BPF toolchain exists), so
//! this reads the JSON itself.
use std::fmt::Write as _;

use serde_json::Value;

pub fn summarize(line: &str) -> String {
    let Ok(event) = serde_json::from_str::<Value>(line) else {
        return format!("(not JSON) {line}");
    };
    let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
    let count = |pointer: &str| event.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let time = clock(text("/@timestamp"));
    let program = text("/ztxdp/program").unwrap_or("?");
    let interface = text("/observer/ingress/interface/name").unwrap_or("?");
    match text("/event/action") {
        Some(action @ ("allow" | "deny")) => {
            let mut summary = flow(&event, time, action);
            let earlier = count("/ztxdp/suppressed");
            if earlier > 0 {
                let _ = write!(summary, " (+{earlier} earlier of this flow)");
            }
            summary
        }
        Some("summary") => {
            let decision = text("/ztxdp/decision").unwrap_or("?");
            let mut summary = flow(&event, time, decision);
            let _ = write!(
                summary,
                " ({} more, {}-{})",
                count("/ztxdp/suppressed"),
                clock(text("/event/start")),
                clock(text("/event/end"))
            );
            summary
        }
        Some("lost") => format!(
            "{time} {program:<6} {interface:<4} lost: {} decisions without a record \
             ({} rate-limited, {} to a full ring buffer)",
            count("/ztxdp/lost"),
            count("/ztxdp/rate_limited"),
            count("/ztxdp/ring_full")
        ),
        Some("syslog_dropped") => format!(
            "{time} syslog: {} records not forwarded to {} (they are in the file)",
            count("/ztxdp/syslog/dropped"),
            text("/ztxdp/syslog/address").unwrap_or("?")
        ),
        // A kind this viewer does not know yet: show it whole.
        other => format!("{time} {}: {line}", other.unwrap_or("?")),
    }
}

/// "2026-11-22T05:40:00.123456789Z" -> "05:40:00.123".
fn clock(stamp: Option<&str>) -> &str {
    stamp
        .and_then(|stamp| stamp.get(11..23))
        .unwrap_or("--:--:--.---")
}

/// The columns of a decision or summary: where, `action`, why, and the
/// packet's ends and peer.
fn flow(event: &Value, time: &str, action: &str) -> String {
    let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
    let mut summary = format!(
        "{time} {:<6} {:<4} {action:<6} {:<24}",
        text("/ztxdp/program").unwrap_or("?"),
        text("/observer/ingress/interface/name").unwrap_or("?"),
        text("/event/reason").unwrap_or("?"),
    );
    if let Some(kind) = text("/network/transport").or_else(|| text("/network/type")) {
        let _ = write!(summary, " {kind:<6}");
    }
    if let (Some(source), Some(destination)) =
        (endpoint(event, "source"), endpoint(event, "destination"))
    {
        let _ = write!(summary, " {source} -> {destination}");
    }
    if let Some(peer) = text("/ztxdp/peer/name").or_else(|| text("/ztxdp/peer/public_key")) {
        let _ = write!(summary, " (peer {peer})");
    }
    summary.trim_end().to_owned()
}

/// `10.77.0.3:40000`, `[fd77::3]:40000`, or the bare address without a port.
fn endpoint(event: &Value, side: &str) -> Option<String> {
    let ip = event.pointer(&format!("/{side}/ip"))?.as_str()?;
    let port = event
        .pointer(&format!("/{side}/port"))
        .and_then(Value::as_u64);
    Some(match port {
        Some(port) if ip.contains(':') => format!("[{ip}]:{port}"),
        Some(port) => format!("{ip}:{port}"),
        None => ip.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_line_shows_reason_and_both_ends() {
        let line = r#"{"@timestamp":"2026-11-22T05:40:00.123456789Z","event":{"action":"deny","reason":"port_not_allowed"},"observer":{"ingress":{"interface":{"name":"eth0"}}},"network":{"transport":"tcp","type":"ipv6"},"source":{"ip":"fd77::3","port":40000},"destination":{"ip":"fd77::1","port":5432},"ztxdp":{"program":"edge","suppressed":0}}"#;
        let summary = summarize(line);
        assert!(summary.starts_with("05:40:00.123 edge"), "{summary}");
        assert!(
            summary.contains("deny") && summary.contains("port_not_allowed"),
            "{summary}"
        );
        assert!(
            summary.ends_with("tcp    [fd77::3]:40000 -> [fd77::1]:5432"),
            "{summary}"
        );
    }

    #[test]
    fn a_decision_carrying_earlier_ones_and_a_peer_says_so() {
        let line = r#"{"@timestamp":"2026-11-22T05:40:00.500000000Z","event":{"action":"allow","reason":"granted"},"observer":{"ingress":{"interface":{"name":"wz1x0"}}},"network":{"transport":"tcp","type":"ipv4"},"source":{"ip":"10.100.0.1","port":40000},"destination":{"ip":"10.100.0.254","port":5432},"ztxdp":{"program":"tunnel","peer":{"name":"app-1","public_key":"k="},"suppressed":3}}"#;
        assert_eq!(
            summarize(line),
            "05:40:00.500 tunnel wz1x0 allow  granted                  tcp    \
             10.100.0.1:40000 -> 10.100.0.254:5432 (peer app-1) (+3 earlier of this flow)"
        );
    }

    #[test]
    fn a_summary_shows_its_decision_count_and_window() {
        let line = r#"{"@timestamp":"2026-11-22T05:40:02.000000000Z","event":{"action":"summary","reason":"port_not_allowed","start":"2026-11-22T05:40:00.250000000Z","end":"2026-11-22T05:40:01.250000000Z"},"observer":{"ingress":{"interface":{"name":"eth0"}}},"network":{"transport":"udp","type":"ipv4"},"source":{"ip":"10.77.0.3","port":40000},"destination":{"ip":"10.77.0.1","port":9},"ztxdp":{"program":"edge","decision":"deny","suppressed":12,"decisions":12}}"#;
        assert_eq!(
            summarize(line),
            "05:40:02.000 edge   eth0 deny   port_not_allowed         udp    \
             10.77.0.3:40000 -> 10.77.0.1:9 (12 more, 05:40:00.250-05:40:01.250)"
        );
    }

    #[test]
    fn lost_and_syslog_records_are_one_line_each() {
        let lost = summarize(
            r#"{"@timestamp":"2026-11-22T05:40:01.000000000Z","event":{"kind":"metric","action":"lost"},"observer":{"ingress":{"interface":{"name":"eth0"}}},"ztxdp":{"program":"edge","rate_limited":7,"ring_full":1,"lost":8,"decisions":8}}"#,
        );
        assert_eq!(
            lost,
            "05:40:01.000 edge   eth0 lost: 8 decisions without a record \
             (7 rate-limited, 1 to a full ring buffer)"
        );
        let dropped = summarize(
            r#"{"@timestamp":"2026-11-22T05:40:03.000000000Z","event":{"kind":"metric","action":"syslog_dropped"},"ztxdp":{"syslog":{"address":"127.0.0.1:6514","dropped":42}}}"#,
        );
        assert_eq!(
            dropped,
            "05:40:03.000 syslog: 42 records not forwarded to 127.0.0.1:6514 (they are in the file)"
        );
    }

    #[test]
    fn unknown_kinds_and_garbage_stay_readable() {
        let line = r#"{"@timestamp":"2026-11-22T05:40:04.000000000Z","event":{"action":"novel"}}"#;
        assert_eq!(summarize(line), format!("05:40:04.000 novel: {line}"));
        assert_eq!(summarize("oops"), "(not JSON) oops");
    }
}
