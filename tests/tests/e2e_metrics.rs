//! Tier 3, metrics for Prometheus: the real `ztxdp up` on the lab's edge
//! with `metrics.listen`, scraped by a real Prometheus server (Debian's
//! `prometheus`) running in the edge's namespace, judged through
//! Prometheus' HTTP API against `ztxdp status --json`. Needs root. The lab,
//! the daemon and Prometheus are torn down on drop; every wait is bounded.

mod e2e;

use std::{
    fs,
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use e2e::{Enforced, build_lab, flood, status};
use serde_json::Value;
use zt_common::reason;
use zt_tests::{lab::HOST_INTERFACE, netns::NetNs};

/// Where the daemon serves `/metrics`, in the edge's namespace.
const METRICS: &str = "127.0.0.1:9542";
/// Where Prometheus answers queries, in the same namespace.
const PROMETHEUS: &str = "127.0.0.1:9090";
/// Scrapes every second plus Prometheus' start: generous on a loaded machine.
const SETTLE: Duration = Duration::from_mins(1);
/// The rules shipped for Prometheus.
const ALERTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../packaging/prometheus/alerts.yml"
);

/// A Prometheus server in a namespace; killed on drop.
struct Prometheus {
    child: Child,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(ns: &NetNs, dir: &std::path::Path) -> Self {
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files: [\"{ALERTS}\"]\n\
                 scrape_configs:\n  - job_name: ztxdp\n    static_configs:\n      - targets: [\"{METRICS}\"]\n"
            ),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", config.display()));
        let log = dir.join("prometheus.log");
        let out = fs::File::create(&log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let child = ns
            .cmd("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting prometheus (is it installed?): {e}"));
        Self { child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `GET /api/v1/PATH?query=QUERY` of Prometheus in `ns`; `None` until it
/// answers with success.
fn api(ns: &NetNs, path: &str, query: Option<&str>) -> Option<Value> {
    let url = format!("http://{PROMETHEUS}/api/v1/{path}");
    let mut args = vec!["curl", "-sfG", "--max-time", "5", &url];
    let data;
    if let Some(q) = query {
        data = format!("query={q}");
        args.extend(["--data-urlencode", &data]);
    }
    let text = ns.run(&args).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    (v["status"] == "success").then(|| v["data"].clone())
}

/// `sum by (reason) (ztxdp_packets_total)`, by reason.
fn packets_by_reason(ns: &NetNs) -> Option<Vec<(String, u64)>> {
    let data = api(ns, "query", Some("sum by (reason) (ztxdp_packets_total)"))?;
    let mut out: Vec<(String, u64)> = data["result"]
        .as_array()?
        .iter()
        .filter_map(|r| {
            let reason = r["metric"]["reason"].as_str()?.to_owned();
            let n = r["value"][1].as_str()?.parse::<f64>().ok()?;
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "counters below 2^53 are exact in f64"
            )]
            Some((reason, n as u64))
        })
        .collect();
    out.sort();
    Some(out)
}

/// Decision counts per reason of `status --json`, summed over programs.
fn status_by_reason(ns: &NetNs) -> Vec<(String, u64)> {
    let s = status(ns);
    let mut out: Vec<(String, u64)> = reason::ALL
        .iter()
        .map(|&code| {
            let name = reason::name(code);
            let n = ["edge", "tunnel"]
                .iter()
                .filter_map(|p| s[p]["counters"][name].as_u64())
                .sum();
            (name.to_owned(), n)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn prometheus_scrapes_exactly_what_status_counts() {
    let t = Enforced::start("metrics", build_lab(), |_, scratch| {
        format!(
            "[edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
             ssh_allow = [\"10.77.0.2/32\"]\n\n[audit]\npath = \"{}\"\nstate = \"{}\"\n\n\
             [metrics]\nlisten = \"{METRICS}\"\n",
            scratch.path("audit.jsonl").display(),
            scratch.path("audit.state").display()
        )
    });
    let prometheus = Prometheus::start(t.edge(), &t.scratch.path(""));
    // A known burst: 300 SYNs to a closed port from 300 sources.
    flood(&t.lab, 0, 300, 1);
    let deadline = Instant::now() + SETTLE;
    let (mut scraped, mut counted) = (None, Vec::new());
    while Instant::now() < deadline {
        counted = status_by_reason(t.edge());
        scraped = packets_by_reason(t.edge());
        if scraped.as_ref() == Some(&counted) {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        scraped.as_ref(),
        Some(&counted),
        "Prometheus' sum by (reason) (ztxdp_packets_total) against status --json; \
         Prometheus log:\n{}\ndaemon log:\n{}",
        prometheus.log(),
        t.daemon.log()
    );
    let denied = counted
        .iter()
        .find(|(r, _)| r == "port_not_allowed")
        .map_or(0, |(_, n)| *n);
    assert!(denied >= 300, "the burst was counted: {counted:?}");

    // The policy the daemon loaded, by the config's SHA-256.
    let text = fs::read(&t.config).unwrap_or_default();
    let digest = ztxdp::audit::chain::link("", &String::from_utf8_lossy(&text));
    let info = api(t.edge(), "query", Some("ztxdp_policy_info"))
        .unwrap_or_else(|| panic!("no ztxdp_policy_info"));
    assert_eq!(
        info["result"][0]["metric"]["config_sha256"].as_str(),
        Some(digest.as_str()),
        "{info}"
    );
    // The shipped rules load, and nothing fires on a healthy daemon.
    let rules = api(t.edge(), "rules", None).unwrap_or_else(|| panic!("no rules"));
    let loaded: Vec<&str> = rules["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(loaded.len(), 6, "{loaded:?}");
    let alerts = api(t.edge(), "alerts", None).unwrap_or_else(|| panic!("no alerts"));
    assert_eq!(
        alerts["alerts"].as_array().map(Vec::len),
        Some(0),
        "{alerts}"
    );
}

#[test]
fn the_shipped_alert_rules_pass_promtool() {
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", ALERTS])
        .output()
        .unwrap_or_else(|e| panic!("promtool (is prometheus installed?): {e}"));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
