//! `metrics.listen`: the daemon serves `/metrics` in the `OpenMetrics` text
//! format for Prometheus.
//!
//! A scrape reads the programs' per-CPU counters and map fill levels the
//! way `ztxdp status` does ([`control::programs`]), so both always agree,
//! and the packet path pays nothing for it. What only the daemon knows
//! (records written, whether the audit file takes writes, the syslog
//! queue, the policy it loaded) comes from a [`Daemon`] snapshot the
//! daemon refreshes every second. The exposition format is
//! prometheus-client's; the HTTP around it is the one exchange a scraper
//! needs: one `GET /metrics` per connection, answered and closed.

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use zt_common::reason;

use crate::{
    audit::Health,
    build_info,
    control::{self, Programs},
    policy::Mode,
};

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on metrics.listen = \"{address}\": {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the daemon knows that the kernel does not.
#[derive(Clone, Debug, Default)]
pub struct Daemon {
    pub health: Health,
    /// Records waiting for the syslog collector, and how many the queue
    /// holds (`audit.syslog.queue`), when forwarding.
    pub syslog_queue: Option<(u64, u64)>,
    /// SHA-256 of the config text enforced, and when it was loaded
    /// (RFC 3339).
    pub config_sha256: String,
    pub loaded_at: String,
    /// The last drift check found the kernel running something other than
    /// the policy.
    pub drifted: bool,
    /// Drift checks made since the start.
    pub drift_checks: u64,
}

/// The snapshot the daemon refreshes and scrapes read.
pub type Shared = Arc<Mutex<Daemon>>;

/// A request head longer than this is not a scrape.
const MAX_REQUEST: usize = 8192;
/// Bounds a client that connects and sends nothing.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// `Content-Type` of the `OpenMetrics` text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `address`; done before anything is attached, so a bad address
/// fails `up` with nothing changed.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(address: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| MetricsError::Bind { address, source })
}

/// Serves scrapes on `listener` until the daemon exits.
pub async fn serve(listener: TcpListener, shared: Shared) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                tokio::spawn(answer(conn, Arc::clone(&shared)));
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Reads one request head and answers it.
async fn answer(mut conn: TcpStream, shared: Shared) {
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        io::Result::Ok(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) {
        return;
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut words = line.split(|&b| b == b' ');
    let (method, target) = (words.next(), words.next());
    let (status, content_type, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics")) => match scrape(&shared).await {
            Ok(text) => ("200 OK", CONTENT_TYPE, text),
            Err(e) => (
                "500 Internal Server Error",
                "text/plain; charset=utf-8",
                format!("{e}\n"),
            ),
        },
        (Some(b"GET"), Some(_)) => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only /metrics is served here\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A scraper that went away is not the daemon's problem.
    let _ = conn.write_all(response.as_bytes()).await;
    let _ = conn.shutdown().await;
}

/// The metrics text for now.
async fn scrape(shared: &Shared) -> Result<String, String> {
    let (programs, _) = control::programs().await.map_err(|e| e.to_string())?;
    let daemon = shared
        .lock()
        .map_err(|_| "the daemon's snapshot is poisoned".to_owned())?
        .clone();
    render(&programs, &daemon).map_err(|e| e.to_string())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PacketLabels {
    program: String,
    interface: String,
    verdict: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
    public_key: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
    interface: String,
}

/// Which mode a program, or a tunnel peer of it (`peer` empty for the
/// program itself), runs in.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    program: String,
    interface: String,
    peer: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

/// Encodes the programs' counters and the daemon's snapshot.
///
/// # Errors
/// When encoding fails (a label the format cannot hold).
#[expect(
    clippy::too_many_lines,
    reason = "one registration per series, in the order the README lists them"
)]
pub fn render(programs: &Programs, daemon: &Daemon) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    let packets = Family::<PacketLabels, Counter>::default();
    registry.register(
        "ztxdp_packets",
        "Packets decided, by program, interface, verdict and reason",
        packets.clone(),
    );
    let peers = Family::<PeerLabels, Counter>::default();
    registry.register(
        "ztxdp_peer_packets",
        "Tunnel packets by peer and verdict",
        peers.clone(),
    );
    let would_drop = Family::<ProgramLabels, Counter>::default();
    registry.register(
        "ztxdp_would_drop",
        "Packets the policy drops that passed in audit mode (also counted under their reason)",
        would_drop.clone(),
    );
    let modes = Family::<ModeLabels, Gauge<u64, std::sync::atomic::AtomicU64>>::default();
    registry.register(
        "ztxdp_mode",
        "1 for the mode (enforce or audit) each program and tunnel peer runs in",
        modes.clone(),
    );
    let (mut lost, mut suppressed) = (0, 0);
    let mut entries = BTreeMap::new();
    let mut capacity = BTreeMap::new();
    let mut memory = BTreeMap::new();
    for (name, p) in [("edge", &programs.edge), ("tunnel", &programs.tunnel)] {
        let Some(p) = p else { continue };
        for &code in &reason::ALL {
            let n = p.counters.get(reason::name(code)).copied().unwrap_or(0);
            packets
                .get_or_create(&PacketLabels {
                    program: name.to_owned(),
                    interface: p.attachment.interface.clone(),
                    verdict: reason::class(code).to_owned(),
                    reason: reason::name(code).to_owned(),
                })
                .inc_by(n);
        }
        let event = |code| p.counters.get(reason::name(code)).copied().unwrap_or(0);
        would_drop
            .get_or_create(&ProgramLabels {
                program: name.to_owned(),
                interface: p.attachment.interface.clone(),
            })
            .inc_by(event(reason::WOULD_DROP));
        let mode = |peer: String, mode: Option<Mode>| ModeLabels {
            program: name.to_owned(),
            interface: p.attachment.interface.clone(),
            peer,
            mode: mode.map_or("unknown", Mode::name).to_owned(),
        };
        modes
            .get_or_create(&mode(String::new(), p.policy_mode))
            .set(1);
        lost += event(reason::EVENTS_LOST);
        suppressed += event(reason::EVENTS_SUPPRESSED);
        for peer in &p.peers {
            let name = peer
                .name
                .clone()
                .unwrap_or_else(|| format!("#{}", peer.index));
            let key = peer.public_key.clone().unwrap_or_default();
            modes
                .get_or_create(&mode(name.clone(), Some(peer.policy_mode)))
                .set(1);
            for (allow, n) in [(true, peer.allowed), (false, peer.denied)] {
                peers
                    .get_or_create(&PeerLabels {
                        peer: name.clone(),
                        public_key: key.clone(),
                        verdict: reason::class_name(allow).to_owned(),
                    })
                    .inc_by(n);
            }
        }
        // Both programs of one object share maps: the same numbers twice.
        entries.extend(p.maps.iter().map(|(k, v)| (*k, *v as u64)));
        capacity.extend(p.capacity.iter().map(|(k, v)| (*k, *v)));
        memory.extend(p.memory.iter().map(|(k, v)| (*k, *v)));
    }
    if let Some(f) = &programs.flows {
        let flows = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
        flows.set(f.entries as u64);
        registry.register("ztxdp_flows", "Flows in the flow table", flows);
        let evicted = Counter::<u64>::default();
        evicted.inc_by(f.evicted);
        registry.register(
            "ztxdp_flows_evicted",
            "Flows the full table pushed out before they ended",
            evicted,
        );
    }
    for (metric, help, values) in [
        (
            "ztxdp_map_entries",
            "Entries in each set-like map",
            &entries,
        ),
        (
            "ztxdp_map_capacity",
            "Most entries each set-like map holds",
            &capacity,
        ),
        (
            "ztxdp_map_bytes",
            "Kernel memory each set-like map takes, in bytes",
            &memory,
        ),
    ] {
        let family = Family::<MapLabels, Gauge<u64, std::sync::atomic::AtomicU64>>::default();
        for (map, n) in values {
            family
                .get_or_create(&MapLabels {
                    map: (*map).to_owned(),
                })
                .set(*n);
        }
        registry.register(metric, help, family);
    }
    let records = Family::<ActionLabels, Counter>::default();
    for (action, n) in &daemon.health.records {
        records
            .get_or_create(&ActionLabels {
                action: action.clone(),
            })
            .inc_by(*n);
    }
    registry.register(
        "ztxdp_audit_records",
        "Audit records written, by event.action",
        records,
    );
    for (metric, help, n) in [
        (
            "ztxdp_audit_events_lost",
            "Decision events lost to a full ring buffer",
            lost,
        ),
        (
            "ztxdp_audit_events_suppressed",
            "Deny events held back by the per-CPU rate limit (counted in lost records)",
            suppressed,
        ),
        (
            "ztxdp_audit_unwritten",
            "Decisions whose records the audit file refused, written as counts",
            daemon.health.unwritten_total,
        ),
        (
            "ztxdp_audit_gaps",
            "Gap records written: the audit file was deleted, replaced or cut",
            daemon.health.gaps,
        ),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        registry.register(metric, help, c);
    }
    let writing = Gauge::<i64>::default();
    writing.set(i64::from(daemon.health.writing));
    registry.register(
        "ztxdp_audit_writing",
        "1 while records reach the audit file, 0 while it refuses writes",
        writing,
    );
    let pending = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
    pending.set(daemon.health.unwritten);
    registry.register(
        "ztxdp_audit_unwritten_pending",
        "Decisions counted while the audit file refuses writes, not yet written",
        pending,
    );
    if let Some((queued, size)) = daemon.syslog_queue {
        for (metric, help, n) in [
            (
                "ztxdp_syslog_queue_depth",
                "Records waiting for the syslog collector",
                queued,
            ),
            (
                "ztxdp_syslog_queue_capacity",
                "Records the syslog queue holds (audit.syslog.queue)",
                size,
            ),
        ] {
            let g = Gauge::<u64, std::sync::atomic::AtomicU64>::default();
            g.set(n);
            registry.register(metric, help, g);
        }
    }
    let drifted = Gauge::<i64>::default();
    drifted.set(i64::from(daemon.drifted));
    registry.register(
        "ztxdp_drift",
        "1 while the last drift check found the kernel running something other than the policy",
        drifted,
    );
    let checks = Counter::<u64>::default();
    checks.inc_by(daemon.drift_checks);
    registry.register(
        "ztxdp_drift_checks",
        "Drift checks made (drift_check_interval)",
        checks,
    );
    registry.register(
        "ztxdp_policy",
        "The policy the daemon enforces",
        Info::new(vec![
            ("config_sha256", daemon.config_sha256.clone()),
            ("loaded_at", daemon.loaded_at.clone()),
        ]),
    );
    registry.register(
        "ztxdp_build",
        "The ztxdp binary",
        Info::new(vec![
            ("version", build_info::VERSION.to_owned()),
            ("commit", build_info::COMMIT.to_owned()),
            ("bpf_sha256", build_info::BPF_SHA256.to_owned()),
        ]),
    );
    let mut text = String::new();
    encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_series_are_open_metrics() {
        let mut daemon = Daemon {
            syslog_queue: Some((3, 10_000)),
            config_sha256: "ab".repeat(32),
            loaded_at: "2026-12-05T08:00:00Z".into(),
            drifted: true,
            drift_checks: 4,
            ..Daemon::default()
        };
        daemon.health.writing = true;
        daemon.health.records.insert("deny".into(), 7);
        let programs = Programs {
            edge: None,
            tunnel: None,
            flows: None,
        };
        let text = render(&programs, &daemon).unwrap_or_else(|e| panic!("{e}"));
        for line in [
            "ztxdp_audit_records_total{action=\"deny\"} 7",
            "ztxdp_audit_writing 1",
            "ztxdp_syslog_queue_depth 3",
            "ztxdp_syslog_queue_capacity 10000",
            "ztxdp_drift 1",
            "ztxdp_drift_checks_total 4",
            "# TYPE ztxdp_audit_records counter",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
        assert!(
            text.contains(&format!(
                "ztxdp_policy_info{{config_sha256=\"{}\",loaded_at=\"2026-12-05T08:00:00Z\"}} 1",
                "ab".repeat(32)
            )),
            "{text}"
        );
        assert!(text.contains("ztxdp_build_info{version=\""), "{text}");
        assert!(
            text.ends_with("# EOF\n"),
            "an OpenMetrics exposition ends so"
        );
    }
}
