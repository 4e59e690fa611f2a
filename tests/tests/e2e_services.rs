//! Tier 3, edge services (`[[edge.service]]`, issue 16): the real `ztxdp
//! up` on the lab's edge, judged by connections from the outsider and the
//! bastion namespaces and by the audit file, before and after a reload.
//! Needs root. Each test builds its own lab and tears it down on drop.

mod e2e;

use std::{
    fs,
    io::Read as _,
    net::IpAddr,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use e2e::{
    Enforced, assert_connects, assert_times_out, at, attached, build_lab, counter, expect_audit,
    expect_counter, is, listen, status, udp_socket, ztxdp_cmd, ztxdp_ok,
};
use zt_tests::lab::{BASTION_V4, EDGE_V4, EDGE_V6, HOST_INTERFACE, OUTSIDER_V4};

const HTTPS: u16 = 443;
const ADMIN: u16 = 8443;
/// The outsider's first port the host answers during a reload.
const FIRST_CLIENT_PORT: u16 = 20_000;
/// At most this many answers (20 s of them), however long the reload.
const MAX_ANSWERS: u16 = 10_000;

/// The lab's edge with two services: `https` open to every IPv4 source,
/// `admin` to `admin_from`.
fn config(audit: &std::path::Path, state: &std::path::Path, admin_from: &str) -> String {
    format!(
        "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\n\
         ssh_allow = [\"10.77.0.2/32\", \"fd77::2/128\"]\n\n\
         [[edge.service]]\nname = \"https\"\nallow = [\"tcp/443\", \"udp/443\"]\n\
         from = [\"0.0.0.0/0\"]\n\n\
         [[edge.service]]\nname = \"admin\"\nallow = [\"tcp/{ADMIN}\"]\nfrom = [{admin_from}]\n\n\
         [audit]\npath = \"{}\"\nstate = \"{}\"\n",
        audit.display(),
        state.display()
    )
}

/// The audit line of a decision about `source` to `port` of reason
/// `reason`, which must name `service`.
fn expect_service_audit(t: &Enforced, source: IpAddr, port: u16, reason: &str, service: &str) {
    let line = expect_audit(
        &t.audit(),
        &format!("{reason} for {source} to {port}"),
        |l| {
            is(l, "/event/reason", &reason.into())
                && is(l, "/source/ip", &source.to_string().into())
                && is(l, "/destination/port", &port.into())
        },
    );
    assert!(
        is(&line, "/ztxdp/service/name", &service.into()),
        "the record must name service {service}: {line}"
    );
}

#[test]
fn an_outsider_reaches_a_service_open_to_all_and_not_one_that_leaves_it_out() {
    let t = Enforced::start("services", build_lab(), |_, scratch| {
        config(
            &scratch.path("audit.jsonl"),
            &scratch.path("audit.state"),
            "\"10.77.0.2/32\"",
        )
    });
    let (bastion, outsider) = (t.lab.bastion(), t.lab.outsider());
    let _https = listen(t.edge(), HTTPS);
    let _admin = listen(t.edge(), ADMIN);

    assert_connects(outsider, at(EDGE_V4, HTTPS), "outsider to https over IPv4");
    assert_times_out(outsider, at(EDGE_V4, ADMIN), "outsider to admin");
    assert_connects(bastion, at(EDGE_V4, ADMIN), "bastion to admin");
    // https's from holds no IPv6 prefix.
    assert_times_out(outsider, at(EDGE_V6, HTTPS), "outsider to https over IPv6");

    let outsider_v4 = IpAddr::V4(OUTSIDER_V4);
    expect_service_audit(&t, outsider_v4, HTTPS, "service_allowed", "https");
    expect_service_audit(
        &t,
        outsider_v4,
        ADMIN,
        "service_source_not_allowed",
        "admin",
    );
    expect_service_audit(
        &t,
        IpAddr::V4(BASTION_V4),
        ADMIN,
        "service_allowed",
        "admin",
    );

    // admin opens to the outsider too: a reload swaps the maps in place.
    fs::write(
        &t.config,
        config(
            &t.audit(),
            &t.scratch.path("audit.state"),
            "\"10.77.0.2/32\", \"10.77.0.3/32\"",
        ),
    )
    .unwrap_or_else(|e| panic!("rewriting the config: {e}"));
    ztxdp_ok(t.edge(), &["reload"]);
    assert_connects(
        outsider,
        at(EDGE_V4, ADMIN),
        "outsider to admin after reload",
    );
    assert_connects(
        outsider,
        at(EDGE_V4, HTTPS),
        "outsider to https after reload",
    );
}

/// A list whose expansion the maps cannot hold (8,193 /25s are 1,048,704
/// addresses, and `ssh_allow`'s /32 one more; one map holds 1,048,576) is
/// refused by `check` and by `up` as bad input (status 2), with the whole
/// count and the limit, and nothing is attached.
#[test]
fn a_list_the_maps_cannot_hold_is_refused_by_check_and_up_alike() {
    let lab = build_lab();
    let scratch = e2e::Scratch::new("services-too-many");
    let sources: Vec<String> = (0u32..8_193)
        .map(|i| format!("\"{}/25\"", std::net::Ipv4Addr::from((10 << 24) | (i << 7))))
        .collect();
    let text = format!(
        "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\nssh_allow = [\"10.77.0.2/32\"]\n\n\
         [[edge.service]]\nname = \"wide\"\nallow = [\"tcp/443\"]\nfrom = [{}]\n\n\
         [audit]\npath = \"{}\"\n",
        sources.join(", "),
        scratch.path("audit.jsonl").display()
    );
    let path = scratch.path("ztxdp.toml");
    fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    let config = path.display().to_string();
    for args in [
        &["check", "--config", &config][..],
        &["up", "--config", &config][..],
    ] {
        let out = e2e::ztxdp(lab.edge(), args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "`ztxdp {}`: {stderr}", args[0]);
        assert!(
            stderr.contains("1048705") && stderr.contains("1048576"),
            "`ztxdp {}` must give the count and the limit: {stderr}",
            args[0]
        );
    }
    let status = e2e::ztxdp(lab.edge(), &["status"]);
    assert!(
        String::from_utf8_lossy(&status.stderr).contains("no ztxdp program is attached"),
        "nothing may be attached: {status:?}"
    );
}

/// `[[edge.service]]` tables: `dns` first when `renumbered` (every later
/// service's bit moves), then `https` on udp/443 from `https_from`, and
/// `bulk`, whose 7,000 /25s (896,000 addresses) make a reload's halves
/// take about a second each.
fn reload_config(scratch: &e2e::Scratch, renumbered: bool, https_from: &str) -> String {
    let bulk: Vec<String> = (0u32..7_000)
        .map(|i| format!("\"{}/25\"", std::net::Ipv4Addr::from((11 << 24) | (i << 7))))
        .collect();
    let dns = if renumbered {
        "[[edge.service]]\nname = \"dns\"\nallow = [\"udp/53\"]\n\n"
    } else {
        ""
    };
    format!(
        "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\n\
         ssh_allow = [\"10.77.0.2/32\"]\n\n{dns}\
         [[edge.service]]\nname = \"https\"\nallow = [\"udp/443\"]\nfrom = [{https_from}]\n\n\
         [[edge.service]]\nname = \"bulk\"\nallow = [\"tcp/9000\"]\nfrom = [{}]\n\n\
         [audit]\npath = \"{}\"\nstate = \"{}\"\n",
        bulk.join(", "),
        scratch.path("audit.jsonl").display(),
        scratch.path("audit.state").display()
    )
}

/// The host answers clients of a UDP service while a reload renumbers
/// the services, which closes them all between its halves. A flow the
/// host's datagram starts then is judged again once the reload is done:
/// when a later reload closes the service to the outsider, none of those
/// flows keeps port 443 open to it.
#[test]
fn answers_sent_during_a_reload_do_not_keep_a_closed_service_open() {
    let mut t = Enforced::start("services-gap", build_lab(), |_, scratch| {
        reload_config(scratch, false, "\"0.0.0.0/0\"")
    });

    // The host sends from udp/443 to a new port of the outsider every
    // 2 ms (a new flow each) until the renumbering reload is done.
    let host = udp_socket(t.edge(), at(EDGE_V4, HTTPS));
    let done = Arc::new(AtomicBool::new(false));
    let sender = {
        let done = Arc::clone(&done);
        thread::spawn(move || {
            let mut sent = 0u16;
            while !done.load(Ordering::Relaxed) && sent < MAX_ANSWERS {
                host.send_to(b"answer", at(OUTSIDER_V4, FIRST_CLIENT_PORT + sent))
                    .unwrap_or_else(|e| panic!("the host's answer: {e}"));
                sent += 1;
                thread::sleep(Duration::from_millis(2));
            }
            sent
        })
    };
    fs::write(&t.config, reload_config(&t.scratch, true, "\"0.0.0.0/0\""))
        .unwrap_or_else(|e| panic!("rewriting the config: {e}"));
    ztxdp_ok(t.edge(), &["reload"]);
    done.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .unwrap_or_else(|_| panic!("the host's sender panicked"));
    t.daemon
        .expect_log("flows started during the change judged as answers");

    // https closes to the outsider; each client port the host answered
    // sends once.
    fs::write(
        &t.config,
        reload_config(&t.scratch, true, "\"10.77.0.2/32\""),
    )
    .unwrap_or_else(|e| panic!("rewriting the config: {e}"));
    ztxdp_ok(t.edge(), &["reload"]);
    let before = (
        counter(&status(t.edge()), "edge", "reply"),
        counter(&status(t.edge()), "edge", "service_source_not_allowed"),
    );
    for port in FIRST_CLIENT_PORT..FIRST_CLIENT_PORT + sent {
        udp_socket(t.lab.outsider(), at(OUTSIDER_V4, port))
            .send_to(b"question", at(EDGE_V4, HTTPS))
            .unwrap_or_else(|e| panic!("the outsider's datagram from {port}: {e}"));
    }
    expect_counter(
        t.edge(),
        "edge",
        "service_source_not_allowed",
        before.1,
        u64::from(sent),
    );
    assert_eq!(
        counter(&status(t.edge()), "edge", "reply"),
        before.0,
        "a flow the host started during the reload kept https open"
    );
}

/// A stop that comes while a second `up` loads its programs (a policy of
/// 896,000 source addresses takes a second or more) ends that `up` with
/// nothing changed: the programs it would have replaced go on enforcing,
/// and their daemon keeps running.
#[test]
fn a_stop_before_attaching_changes_nothing() {
    let mut t = Enforced::start("services-early-stop", build_lab(), |_, scratch| {
        reload_config(scratch, false, "\"0.0.0.0/0\"")
    });
    let enforcing = attached(t.edge(), HOST_INTERFACE);
    let config = t.config.display().to_string();
    let mut second = ztxdp_cmd(t.edge(), &["up", "--config", &config])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting a second `up`: {e}"));
    thread::sleep(Duration::from_millis(400));
    let pid = i32::try_from(second.id()).unwrap_or_else(|e| panic!("pid: {e}"));
    // SAFETY: a plain kill(2) of the child started above, still ours to
    // signal (it has not been waited for).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for the second `up`: {e}"))
        {
            break status;
        }
        assert!(Instant::now() < deadline, "the second `up` did not stop");
        thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    if let Some(mut err) = second.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    assert!(status.success(), "the second `up`: {status}\n{stderr}");
    assert!(stderr.contains("nothing changed"), "{stderr}");
    assert_eq!(attached(t.edge(), HOST_INTERFACE), enforcing);
    t.daemon
        .expect_running("a second `up` stopped before attaching");
}
