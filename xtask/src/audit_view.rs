//! One readable line per audit JSON line, for watching decisions live.
use std::fmt::Write as _;

use serde_json::Value;

pub fn summarize(line: &str) -> String {
    let Ok(event) = serde_json::from_str::<Value>(line) else {
        return format!("(not JSON) {line}");
    };
    let text = |pointer: &str| event.pointer(pointer).and_then(Value::as_str);
    // "2026-11-22T05:40:00.123456789Z" -> "05:40:00.123"
    let time = text("/@timestamp")
        .and_then(|stamp| stamp.get(11..23))
        .unwrap_or("--:--:--.---");
    let action = text("/event/action").unwrap_or("?");
    if action == "suppressed" {
        let count = |pointer| event.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
        return format!(
            "{time} rate limit: {} events suppressed, {} lost",
            count("/ztxdp/suppressed"),
            count("/ztxdp/lost")
        );
    }
    let mut summary = format!(
        "{time} {:<6} {:<4} {:<6} {:<24}",
        text("/ztxdp/program").unwrap_or("?"),
        text("/observer/ingress/interface/name").unwrap_or("?"),
        action,
        text("/event/reason").unwrap_or("?"),
    );
    if let Some(kind) = text("/network/transport").or_else(|| text("/network/type")) {
        let _ = write!(summary, " {kind:<6}");
    }
    if let (Some(source), Some(destination)) =
        (endpoint(&event, "source"), endpoint(&event, "destination"))
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
        let line = r#"{"@timestamp":"2026-11-22T05:40:00.123456789Z","event":{"action":"deny","reason":"port_not_allowed"},"observer":{"ingress":{"interface":{"name":"eth0"}}},"network":{"transport":"tcp","type":"ipv6"},"source":{"ip":"fd77::3","port":40000},"destination":{"ip":"fd77::1","port":5432},"ztxdp":{"program":"edge"}}"#;
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
    fn suppressed_and_garbage_lines_are_readable() {
        let summary = summarize(
            r#"{"@timestamp":"2026-11-22T05:40:01.000000000Z","event":{"action":"suppressed"},"ztxdp":{"suppressed":7,"lost":1}}"#,
        );
        assert_eq!(
            summary,
            "05:40:01.000 rate limit: 7 events suppressed, 1 lost"
        );
        assert_eq!(summarize("oops"), "(not JSON) oops");
    }
}
