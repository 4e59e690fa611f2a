//! Tier 3, confirm or roll back: the real `ztxdp up` on the lab's edge,
//! changed with `reload --confirm SECS` and `up --confirm SECS`. Unless
//! `ztxdp confirm` runs in time, the previous policy comes back (its very
//! programs, for an `up`), also when the daemon was `kill -9`ed during the
//! wait; a connection the edge opened before the change carries data all
//! along. Judged by real connections between the lab's namespaces, by
//! `ztxdp status --json`, and by the trail's records. Needs root. Every
//! wait is bounded; the lab and the daemons go on drop.

mod e2e;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use e2e::{
    CONNECT_TIMEOUT, Daemon, EXIT_TIMEOUT, Enforced, SETTLE_TIMEOUT, Scratch, accept,
    assert_connects, assert_times_out, at, attached, audit_lines, build_lab, listen, status,
    verify_audit, ztxdp, ztxdp_ok,
};
use serde_json::Value;
use zt_tests::lab::{EDGE_V4, HOST_INTERFACE, Lab, OUTSIDER_V4};

/// The edge's SSH port, which the new policy opens to the outsider.
const SSH: u16 = 22;
/// A server in the outsider that the edge connects to before the change.
const SERVER: u16 = 8080;
/// The confirmation window: long enough for a loaded machine to make the
/// checks of the new policy before it ends.
const WINDOW: &str = "8";
/// A rollback happens at the deadline; this bounds a failure to roll back.
const ROLLBACK_TIMEOUT: Duration = Duration::from_secs(40);

/// A config of the lab's edge whose SSH port is open to `ssh_allow`.
fn config(scratch: &Scratch, ssh_allow: &str) -> String {
    format!(
        "[edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
         ssh_port = {SSH}\nssh_allow = [{ssh_allow}]\n\n\
         [audit]\npath = \"{}\"\nstate = \"{}\"\n",
        scratch.path("audit.jsonl").display(),
        scratch.path("audit.state").display()
    )
}

/// The bastion only: the outsider may not reach the SSH port.
const OLD: &str = "\"10.77.0.2/32\"";
/// The bastion and the outsider.
const NEW: &str = "\"10.77.0.2/32\", \"10.77.0.3/32\"";

/// The lab's edge under `ztxdp up` with the old policy.
fn start(tag: &str) -> Enforced {
    Enforced::start(tag, build_lab(), |_: &Lab, scratch: &Scratch| {
        config(scratch, OLD)
    })
}

/// A TCP connection the edge opened to the outsider: its replies pass
/// only because the flow table knows it.
struct Flow {
    client: TcpStream,
    server: TcpStream,
}

impl Flow {
    fn open(t: &Enforced) -> Self {
        let listener = listen(t.lab.outsider(), SERVER);
        let client = assert_connects(t.edge(), at(OUTSIDER_V4, SERVER), "the edge connects out");
        let server = accept(&listener, CONNECT_TIMEOUT);
        for s in [&client, &server] {
            s.set_read_timeout(Some(CONNECT_TIMEOUT))
                .unwrap_or_else(|e| panic!("read timeout: {e}"));
        }
        let flow = Self { client, server };
        flow.carries(t, *b"opened");
        flow
    }

    /// Six bytes each way.
    fn carries(&self, t: &Enforced, what: [u8; 6]) {
        let mut buf = [0u8; 6];
        (&self.server)
            .write_all(&what)
            .unwrap_or_else(|e| panic!("server write: {e}"));
        if let Err(e) = (&self.client).read_exact(&mut buf) {
            t.fail(&format!(
                "the outsider's data ({}) did not reach the edge: {e}",
                String::from_utf8_lossy(&what)
            ));
        }
        assert_eq!(buf, what);
        (&self.client)
            .write_all(&what)
            .unwrap_or_else(|e| panic!("client write: {e}"));
        (&self.server)
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("the outsider got nothing back: {e}"));
        assert_eq!(buf, what);
    }
}

/// `status --json`'s `confirmation` object (`null` when none).
fn confirmation(t: &Enforced) -> Value {
    status(t.edge())["confirmation"].clone()
}

/// Waits until the confirmation's `state` is `want`.
fn expect_state(t: &Enforced, want: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let c = confirmation(t);
        if c["state"] == want {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "the confirmation is not {want:?} after {within:?}: {c:#}; the daemon's log:\n{}",
            t.daemon.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The outsider reaches the SSH port: the new policy runs.
fn outsider_gets_in(t: &Enforced, listener: &std::net::TcpListener) {
    drop(assert_connects(
        t.lab.outsider(),
        at(EDGE_V4, SSH),
        "the new policy opens the SSH port to the outsider",
    ));
    drop(accept(listener, CONNECT_TIMEOUT));
}

/// The trail's change records (`change`, `confirm`, `rollback`), as
/// (action, `ztxdp.change`).
fn change_records(audit: &Path) -> Vec<(String, Value)> {
    audit_lines(audit)
        .into_iter()
        .filter(|l| {
            ["change", "confirm", "rollback"]
                .iter()
                .any(|a| l["event"]["action"] == *a)
        })
        .map(|l| {
            (
                l["event"]["action"].as_str().unwrap_or_default().to_owned(),
                l["ztxdp"]["change"].clone(),
            )
        })
        .collect()
}

/// Waits until the trail holds `n` change records.
fn expect_change_records(t: &Enforced, n: usize) -> Vec<(String, Value)> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let records = change_records(&t.audit());
        if records.len() >= n || Instant::now() >= deadline {
            assert_eq!(records.len(), n, "the change records: {records:#?}");
            return records;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The SHA-256 of a config file, as the records and the identity give it.
fn digest(path: &Path) -> String {
    ztxdp::config::Config::load(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .digest
}

#[test]
fn an_unconfirmed_reload_rolls_back_also_after_a_kill_9_of_the_daemon() {
    let mut t = start("confirm-reload");
    let ssh = listen(t.edge(), SSH);
    let flow = Flow::open(&t);
    assert_times_out(t.lab.outsider(), at(EDGE_V4, SSH), "the old policy");
    let old = digest(&t.config);
    let old_text = std::fs::read_to_string(&t.config).unwrap_or_default();
    let new_text = config(&t.scratch, NEW);

    for round in ["daemon alive", "daemon killed"] {
        std::fs::write(&t.config, &new_text).unwrap_or_else(|e| panic!("config: {e}"));
        let new = digest(&t.config);
        let said = ztxdp_ok(t.edge(), &["reload", "--confirm", WINDOW]);
        assert!(said.contains("ztxdp confirm"), "{round}: {said}");
        let pending = expect_state(&t, "pending", SETTLE_TIMEOUT);
        assert_eq!(pending["command"], "reload", "{pending:#}");
        assert_eq!(pending["config_sha256"], new.as_str(), "{pending:#}");
        assert_eq!(pending["previous_sha256"], old.as_str(), "{pending:#}");
        assert!(pending["deadline"].is_string(), "{pending:#}");
        assert_eq!(
            pending["watchdog_alive"],
            true,
            "{pending:#}\n{}",
            t.daemon.log()
        );
        let text = ztxdp_ok(t.edge(), &["status"]);
        assert!(
            text.to_lowercase().contains("awaits confirmation"),
            "{text}"
        );
        outsider_gets_in(&t, &ssh);
        flow.carries(&t, *b"during");

        // One change at a time.
        let second = ztxdp(t.edge(), &["reload", "--confirm", "60"]);
        assert_eq!(second.status.code(), Some(1), "{round}: a second --confirm");
        assert!(
            String::from_utf8_lossy(&second.stderr).contains("awaits confirmation"),
            "{}",
            String::from_utf8_lossy(&second.stderr)
        );

        if round == "daemon killed" {
            t.daemon.kill9();
        }
        expect_state(&t, "rolled_back", ROLLBACK_TIMEOUT);
        assert_times_out(t.lab.outsider(), at(EDGE_V4, SSH), "after the rollback");
        flow.carries(&t, *b"after!");
        let unconfirmed = ztxdp(t.edge(), &["confirm"]);
        assert_eq!(
            unconfirmed.status.code(),
            Some(1),
            "confirm after a rollback"
        );
        // The file is the operator's: put the old one back for the next round.
        std::fs::write(&t.config, &old_text).unwrap_or_else(|e| panic!("config: {e}"));
    }
    let s = status(t.edge());
    assert_eq!(s["daemon"]["pid"], Value::Null, "{s:#}");

    // change, rollback (by the daemon); change, rollback (by the watchdog).
    let records = expect_change_records(&t, 4);
    let new = digest(&t.scratch.write("new.toml", &new_text));
    for (i, (action, change)) in records.iter().enumerate() {
        assert_eq!(
            action,
            if i % 2 == 0 { "change" } else { "rollback" },
            "{records:#?}"
        );
        assert_eq!(change["command"], "reload", "{records:#?}");
        assert_eq!(change["config_sha256"], new.as_str(), "{records:#?}");
        assert_eq!(change["previous_sha256"], old.as_str(), "{records:#?}");
    }
    assert_eq!(records[1].1["by"], "daemon", "{records:#?}");
    assert_eq!(records[3].1["by"], "watchdog", "{records:#?}");
    verify_audit(&t);
}

#[test]
fn an_unconfirmed_up_puts_the_previous_programs_back() {
    let t = start("confirm-up");
    let ssh = listen(t.edge(), SSH);
    let flow = Flow::open(&t);
    let old_id = status(t.edge())["edge"]["program_id"].clone();
    let old = digest(&t.config);
    let other = t.scratch.write("new.toml", &config(&t.scratch, NEW));

    for round in ["daemon alive", "daemon killed"] {
        let log = t.scratch.path(&format!("daemon-{round}.log"));
        let mut new_daemon = Daemon::start(t.edge(), &other, &["--confirm", WINDOW], log);
        let pending = expect_state(&t, "pending", SETTLE_TIMEOUT);
        assert_eq!(pending["command"], "up", "{pending:#}");
        assert_ne!(status(t.edge())["edge"]["program_id"], old_id);
        outsider_gets_in(&t, &ssh);
        flow.carries(&t, *b"during");
        if round == "daemon killed" {
            new_daemon.kill9();
        }
        expect_state(&t, "rolled_back", ROLLBACK_TIMEOUT);
        // The very programs that ran before, with the flow kept.
        assert_eq!(
            status(t.edge())["edge"]["program_id"],
            old_id,
            "{round}: the previous edge program is not back"
        );
        assert_times_out(t.lab.outsider(), at(EDGE_V4, SSH), "after the rollback");
        flow.carries(&t, *b"after!");
        if round == "daemon alive" {
            // Its programs were replaced: it exits by itself.
            let exit = new_daemon.wait_exit(EXIT_TIMEOUT);
            assert!(
                exit.is_some_and(|s| s.success()),
                "{exit:?}\n{}",
                new_daemon.log()
            );
        }
    }
    let records = expect_change_records(&t, 4);
    for (i, (action, change)) in records.iter().enumerate() {
        assert_eq!(
            action,
            if i % 2 == 0 { "change" } else { "rollback" },
            "{records:#?}"
        );
        assert_eq!(change["command"], "up", "{records:#?}");
        assert_eq!(change["previous_sha256"], old.as_str(), "{records:#?}");
        assert_eq!(
            change["config_sha256"],
            digest(&other).as_str(),
            "{records:#?}"
        );
    }
    verify_audit(&t);
}

#[test]
fn a_confirmed_change_stays_and_an_unconfirmed_first_up_detaches() {
    let t = start("confirm-keep");
    let ssh = listen(t.edge(), SSH);
    std::fs::write(&t.config, config(&t.scratch, NEW)).unwrap_or_else(|e| panic!("config: {e}"));
    let started = Instant::now();
    ztxdp_ok(t.edge(), &["reload", "--confirm", WINDOW]);
    let pending = expect_state(&t, "pending", SETTLE_TIMEOUT);
    outsider_gets_in(&t, &ssh);
    let said = ztxdp_ok(t.edge(), &["confirm"]);
    assert!(said.contains("confirmed"), "{said}");
    let confirmed = expect_state(&t, "confirmed", SETTLE_TIMEOUT);
    assert_eq!(confirmed["config_sha256"], pending["config_sha256"]);
    // Past the deadline, the new policy still runs.
    // Not a guess: the deadline is WINDOW seconds after the reload began.
    let window = Duration::from_secs(WINDOW.parse().unwrap_or(8));
    let past = started + window + Duration::from_secs(2);
    while Instant::now() < past {
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(confirmation(&t)["state"], "confirmed");
    outsider_gets_in(&t, &ssh);
    let again = ztxdp(t.edge(), &["confirm"]);
    assert_eq!(again.status.code(), Some(1), "a second confirm");
    let records = expect_change_records(&t, 2);
    assert_eq!(records[0].0, "change", "{records:#?}");
    assert_eq!(records[1].0, "confirm", "{records:#?}");
    assert_eq!(records[1].1["config_sha256"], pending["config_sha256"]);
    verify_audit(&t);
    drop(t);

    // With no previous policy, the rollback detaches.
    let lab = build_lab();
    let scratch = Scratch::new("confirm-first");
    let path = scratch.write("ztxdp.toml", &config(&scratch, NEW));
    let mut first = Daemon::start(
        lab.edge(),
        &path,
        &["--confirm", "3"],
        scratch.path("d.log"),
    );
    assert!(!attached(lab.edge(), HOST_INTERFACE).is_empty());
    let exit = first.wait_exit(ROLLBACK_TIMEOUT);
    assert!(
        exit.is_some_and(|s| s.success()),
        "{exit:?}\n{}",
        first.log()
    );
    assert_eq!(attached(lab.edge(), HOST_INTERFACE), Vec::<String>::new());
}

/// Removes a state file on drop, also when the test fails.
struct StateFile(std::path::PathBuf);

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_change_orphaned_in_a_deleted_namespace_does_not_block_a_new_up() {
    // A namespace deleted while a change awaited confirmation leaves its
    // state file, named by the namespace's inode; a new namespace may get
    // the same inode. Made here directly: a pending change whose watchdog
    // is dead, in a namespace where no ztxdp program runs.
    let lab = build_lab();
    let inode = lab
        .edge()
        .cmd("stat")
        .args(["-L", "-c", "%i", "/proc/self/ns/net"])
        .output()
        .map_or_else(
            |e| panic!("stat: {e}"),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    let mut gone = std::process::Command::new("true")
        .spawn()
        .unwrap_or_else(|e| panic!("true: {e}"));
    let dead_pid = gone.id();
    let _ = gone.wait();
    let state = StateFile(Path::new("/run/ztxdp").join(format!("confirm-{inode}.json")));
    let change = ztxdp::confirm::Change {
        state: ztxdp::confirm::State::Pending,
        command: ztxdp::confirm::Command::Reload,
        config: "/nonexistent/ztxdp.toml".into(),
        config_sha256: "00".repeat(32),
        previous_config: None,
        previous_sha256: None,
        deadline: "2099-01-01T00:00:00Z".into(),
        deadline_ns: i64::MAX,
        watchdog_pid: dead_pid,
        settled: None,
        error: None,
    };
    std::fs::create_dir_all("/run/ztxdp").unwrap_or_else(|e| panic!("/run/ztxdp: {e}"));
    std::fs::write(
        &state.0,
        serde_json::to_string(&change).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{}: {e}", state.0.display()));

    // `up` starts, and the stale change no longer awaits anything.
    let t = Enforced::start("confirm-orphan", lab, |_: &Lab, scratch: &Scratch| {
        config(scratch, OLD)
    });
    let s = status(t.edge());
    assert_ne!(s["confirmation"]["state"], "pending", "{s:#}");
}
