//! Tier 3, running as a service (issue 14): what systemd hears over
//! `NOTIFY_SOCKET` (a socket the test listens on, as systemd would), what
//! an unprivileged user can do with the trail, the runtime grants and the
//! events socket, and whether `status` knows the build that runs. Needs root; every lab and daemon is torn down on
//! drop, every wait is bounded.

mod e2e;

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::unix::{
        fs::{MetadataExt as _, PermissionsExt as _},
        net::UnixDatagram,
    },
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use e2e::{
    Daemon, Enforced, SETTLE_TIMEOUT, Scratch, build_lab, flood, run_bounded, status, ztxdp_bin,
    ztxdp_cmd,
};
use zt_tests::{lab::HOST_INTERFACE, netns::NetNs};

/// The lab's edge policy, writing the trail to `scratch`; `audit_extra`
/// is appended to the `[audit]` table.
fn edge_config(scratch: &Scratch, audit_extra: &str) -> String {
    format!(
        "[edge]\ninterface = \"{HOST_INTERFACE}\"\nwireguard_ports = [51820]\n\
         ssh_allow = [\"10.77.0.2/32\"]\n\n[audit]\npath = \"{}\"\n{audit_extra}\n",
        scratch.path("audit.jsonl").display()
    )
}

/// The next datagram on `socket` whose text contains `want`, within
/// [`SETTLE_TIMEOUT`]; fails with everything received meanwhile.
fn expect_notify(socket: &UnixDatagram, want: &str) -> String {
    expect_notify_that(socket, want, |text| text.contains(want))
}

/// The next datagram on `socket` for which `fits` holds (`want` says
/// what that is), within [`SETTLE_TIMEOUT`].
fn expect_notify_that(socket: &UnixDatagram, want: &str, fits: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                if fits(&text) {
                    return text;
                }
                seen.push(text);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => panic!("reading the notify socket: {e}"),
        }
    }
    panic!("no notification with {want:?} within {SETTLE_TIMEOUT:?}; received:\n{seen:#?}");
}

#[test]
fn systemd_hears_ready_the_totals_a_reload_and_the_stop() {
    let lab = build_lab();
    let scratch = Scratch::new("notify");
    let config = scratch.write("ztxdp.toml", &edge_config(&scratch, ""));
    let socket_path = scratch.path("notify.sock");
    let socket = UnixDatagram::bind(&socket_path)
        .unwrap_or_else(|e| panic!("binding {}: {e}", socket_path.display()));
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut command = ztxdp_cmd(lab.edge(), &["up", "--config"]);
    command.arg(&config).env("NOTIFY_SOCKET", &socket_path);
    let mut daemon = Daemon::spawn(command, scratch.path("daemon.log"));

    let ready = expect_notify(&socket, "READY=1");
    assert!(
        ready.contains(&format!("STATUS=enforcing; edge {HOST_INTERFACE}: ")),
        "READY=1 comes with a status line naming the edge: {ready:?}"
    );

    // The status line follows the counters: after a burst of 20 denies
    // it counts at least 20 drops.
    flood(&lab, 0, 20, 1);
    expect_notify_that(&socket, "a status line with 20 or more drops", |text| {
        text.split([',', ';', '\n'])
            .filter_map(|part| part.trim().strip_suffix(" dropped"))
            .filter_map(|n| n.trim().parse::<u64>().ok())
            .any(|n| n >= 20)
    });

    daemon.hangup();
    let reloading = expect_notify(&socket, "RELOADING=1");
    assert!(
        reloading.contains("MONOTONIC_USEC="),
        "RELOADING=1 carries the time: {reloading:?}"
    );
    let reloaded = expect_notify(&socket, "READY=1");
    assert!(
        reloaded.contains("; last reload: reloaded "),
        "the reload's outcome is in the status: {reloaded:?}"
    );

    daemon.terminate();
    expect_notify(&socket, "STOPPING=1");
}

/// A group made for one test, removed on drop.
struct TestGroup {
    name: String,
    gid: u32,
}

impl TestGroup {
    fn new() -> Self {
        let name = format!("zt-t{}", std::process::id());
        let out = run_bounded(Command::new("groupadd").args(["--system", &name]));
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let entry = run_bounded(Command::new("getent").args(["group", &name]));
        let gid = String::from_utf8_lossy(&entry.stdout)
            .split(':')
            .nth(2)
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or_else(|| panic!("no gid for {name}"));
        Self { name, gid }
    }
}

impl Drop for TestGroup {
    fn drop(&mut self) {
        let _ = Command::new("groupdel").arg(&self.name).status();
    }
}

/// `argv` in `ns` as the unprivileged user nobody, in no group but
/// `group` (if given).
fn as_nobody(ns: &NetNs, group: Option<u32>, argv: &[&str]) -> Command {
    let mut command = ns.cmd("setpriv");
    command.args(["--reuid=nobody", "--regid=nogroup"]);
    match group {
        Some(gid) => command.arg(format!("--groups={gid}")),
        None => command.arg("--clear-groups"),
    };
    command.args(argv).env_remove("SSH_CONNECTION");
    command
}

/// Runs `command`, which must fail with a permission error, not a panic:
/// a plain tool says `Permission denied`; `ztxdp` says what it needs and
/// exits 77 (see "Privileges" in the README).
fn expect_denied(mut command: Command, what: &str) {
    let out = run_bounded(&mut command);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && out.status.code() != Some(101),
        "{what}: expected a clean failure, got {} with:\n{stderr}",
        out.status
    );
    let ztxdp_refused = out.status.code() == Some(77) && stderr.contains("ztxdp needs root");
    assert!(
        (ztxdp_refused || stderr.contains("Permission denied")) && !stderr.contains("panicked"),
        "{what}: the error should say permission was denied:\n{stderr}"
    );
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn another_user_reads_nothing_changes_nothing_and_follows_only_in_the_group() {
    let group = TestGroup::new();
    let t = Enforced::start("perm", build_lab(), |_, scratch| {
        edge_config(
            scratch,
            &format!(
                "rotate_bytes = 4096\nkeep = 2\nsocket_group = \"{}\"",
                group.name
            ),
        )
    });
    // Everyone may walk to the files, so their own modes are what is tested.
    fs::set_permissions(t.scratch.path(""), fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));
    let audit = t.audit();
    let rotated = t.scratch.path("audit.jsonl.1");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let mut first = 0;
    while !rotated.exists() {
        flood(&t.lab, first, 20, 1);
        first += 20;
        assert!(
            Instant::now() < deadline,
            "the trail did not rotate; log:\n{}",
            t.daemon.log()
        );
        thread::sleep(Duration::from_millis(200));
    }
    // The runtime grants file, saved by `allow` for a tunnel config.
    let grants = t.scratch.path("grants.json");
    let tunnel = t.scratch.write(
        "tunnel.toml",
        &format!(
            "[tunnel]\ninterface = \"lo\"\nruntime_grants = \"{}\"\n\n\
             [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.100.0.1/32\"]\n\n\
             [audit]\npath = \"{}\"\n",
            grants.display(),
            t.scratch.path("tunnel-audit.jsonl").display()
        ),
    );
    let tunnel = tunnel.to_string_lossy().into_owned();
    let bin = ztxdp_bin();
    let bin = bin.to_string_lossy();
    let allowed = run_bounded(&mut ztxdp_cmd(
        t.edge(),
        &["allow", "--config", &tunnel, "app-1", "5432"],
    ));
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    for file in [&audit, &rotated, &grants] {
        assert_eq!(mode(file), 0o640, "{} must be 0640", file.display());
        let shown = file.to_string_lossy();
        expect_denied(
            as_nobody(t.edge(), None, &["cat", &shown]),
            &format!("nobody reading {shown}"),
        );
    }
    let before = fs::read(&grants).unwrap_or_else(|e| panic!("{e}"));
    expect_denied(
        as_nobody(
            t.edge(),
            None,
            &[&bin, "allow", "--config", &tunnel, "app-1", "22"],
        ),
        "nobody granting a port",
    );
    assert_eq!(
        fs::read(&grants).unwrap_or_else(|e| panic!("{e}")),
        before,
        "nobody changed the grants"
    );

    expect_only_the_group_follows(&t, &group, first);
}

/// The events socket is root's and `group`'s only: nobody outside the
/// group is refused, nobody in it gets records. `first` is the first
/// flood source not used yet.
fn expect_only_the_group_follows(t: &Enforced, group: &TestGroup, mut first: u32) {
    let socket = t
        .edge()
        .enter(ztxdp::audit::stream::socket_path)
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let meta = fs::metadata(&socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    assert_eq!(
        (meta.gid(), meta.mode() & 0o777),
        (group.gid, 0o660),
        "{} is the group's, 0660",
        socket.display()
    );
    let bin = ztxdp_bin();
    let bin = bin.to_string_lossy();
    expect_denied(
        as_nobody(t.edge(), None, &[&bin, "events", "--follow"]),
        "nobody outside the group following the events",
    );
    let mut follower = as_nobody(t.edge(), Some(group.gid), &[&bin, "events", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting a follower: {e}"));
    let stdout = follower
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no stdout"));
    let (lines, received) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    // The follower connects a moment after it starts: send until a record
    // reaches it.
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    let line = loop {
        flood(&t.lab, first, 5, 1);
        first += 5;
        if let Ok(line) = received.recv_timeout(Duration::from_millis(500)) {
            break line;
        }
        if let Ok(Some(status)) = follower.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = follower.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("a follower in the group exited ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "no record reached a follower in the group"
        );
    };
    assert!(line.starts_with('{'), "a record: {line}");
    // SIGKILL cannot be refused: the wait is immediate.
    let _ = follower.kill();
    let _ = follower.wait();
}

#[test]
fn status_tells_whether_the_programs_came_from_this_binary() {
    let t = Enforced::start("build", build_lab(), |_, scratch| edge_config(scratch, ""));
    let version = run_bounded(Command::new(ztxdp_bin()).arg("--version"));
    let version = String::from_utf8_lossy(&version.stdout);
    let hash = version
        .lines()
        .find_map(|l| l.strip_prefix("bpf sha256 "))
        .unwrap_or_else(|| panic!("no BPF hash in --version:\n{version}"));
    let s = status(t.edge());
    assert_eq!(
        (
            s["daemon"]["build"]["bpf_sha256"].as_str(),
            s["daemon"]["this_binary"].as_bool()
        ),
        (Some(hash), Some(true)),
        "status --json: {s}"
    );

    // As after an upgrade without a restart: the running programs were
    // loaded by a build whose BPF object is another.
    let identity = t
        .edge()
        .enter(ztxdp::identity::path)
        .unwrap_or_else(|e| panic!("{e:?}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let text = fs::read_to_string(&identity).unwrap_or_else(|e| panic!("{e}"));
    fs::write(&identity, text.replace(hash, &"0".repeat(64))).unwrap_or_else(|e| panic!("{e}"));
    let s = status(t.edge());
    assert_eq!(s["daemon"]["this_binary"].as_bool(), Some(false), "{s}");
    let text = run_bounded(&mut ztxdp_cmd(t.edge(), &["status"]));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("not from this binary's BPF object"),
        "status says the programs are another build's:\n{text}"
    );
}
