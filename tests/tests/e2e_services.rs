//! Tier 3, edge services (`[[edge.service]]`, issue 16): the real `ztxdp
//! up` on the lab's edge, judged by connections from the outsider and the
//! bastion namespaces and by the audit file, before and after a reload.
//! Needs root. Each test builds its own lab and tears it down on drop.

mod e2e;

use std::{fs, net::IpAddr};

use e2e::{
    Enforced, assert_connects, assert_times_out, at, build_lab, expect_audit, is, listen, ztxdp_ok,
};
use zt_tests::lab::{BASTION_V4, EDGE_V4, EDGE_V6, OUTSIDER_V4};

const HTTPS: u16 = 443;
const ADMIN: u16 = 8443;

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
