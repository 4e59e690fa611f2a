//! Tier 2: edge services (`[[edge.service]]`, and the `ssh` service of
//! `ssh_port` and `ssh_allow`) in `zt_edge`, run by the kernel through
//! `BPF_PROG_TEST_RUN`: every verdict branch, checked against the
//! reference model too, and a reload that swaps the service maps in place.
//! Needs root.

mod tier2;

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    sync::Mutex,
};

use tier2::{Case, Prog, Programs, Shared, TEST_RUN_IFINDEX};
use zt_common::{program, reason};
use zt_tests::packet::{Ipv4, Ipv6, Transport, eth_v4, eth_v6};
use ztxdp::{
    model::EdgeModel,
    policy::{EchoRate, EdgePolicy, FlowSettings, Mode, PortRange, Protocol, Service},
    tables::{Contents, FlowInterfaces},
};

const SSH: u16 = 22;
const WG: u16 = 51_820;
const HTTPS: u16 = 443;
const ADMIN: u16 = 8443;
const METRICS: u16 = 9100;

/// In `ssh_allow`.
const SSH_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// In the `admin` service's 10.0.0.0/8, and in `metrics`' 10.1.0.0/16: the
/// longest prefix holding it is not the one that admits it to `admin`.
const INSIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 1, 2, 3);
/// In 10.0.0.0/8 only.
const OTHER_INSIDE_V4: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
/// In `alt-ssh`'s 192.0.2.0/24, not in `ssh_allow`.
const ALT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 5);
const INSIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xaa, 1, 0, 0, 0, 1);
/// In no list but the services open to everyone.
const OUTSIDER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
const OUTSIDER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 9);

const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x1, 0, 0, 0, 0, 1);

fn nets<T: std::str::FromStr>(list: &[&str]) -> Vec<T>
where
    T::Err: std::fmt::Display,
{
    list.iter()
        .map(|s| s.parse().unwrap_or_else(|e| panic!("prefix {s}: {e}")))
        .collect()
}

fn ports(protocol: Protocol, first: u16, last: u16) -> PortRange {
    PortRange {
        protocol,
        first,
        last,
    }
}

fn service(name: &str, ports: Vec<PortRange>, from: &[&str]) -> Service {
    Service {
        name: name.into(),
        ports,
        from: nets(from),
    }
}

fn policy() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![WG],
        ssh_port: SSH,
        ssh_allow: nets(&["198.51.100.7/32"]),
        services: vec![
            service(
                "https",
                vec![
                    ports(Protocol::Tcp, HTTPS, HTTPS),
                    ports(Protocol::Udp, HTTPS, HTTPS),
                ],
                &["0.0.0.0/0", "::/0"],
            ),
            service(
                "admin",
                vec![ports(Protocol::Tcp, ADMIN, ADMIN)],
                &["10.0.0.0/8", "2001:db8:aa::/48"],
            ),
            service(
                "metrics",
                vec![ports(Protocol::Tcp, METRICS, METRICS)],
                &["10.1.0.0/16"],
            ),
            service(
                "range",
                vec![ports(Protocol::Tcp, 8000, 8100)],
                &["198.51.100.0/24"],
            ),
            // Shares the ssh port, for other sources.
            service(
                "alt-ssh",
                vec![ports(Protocol::Tcp, SSH, SSH)],
                &["192.0.2.0/24"],
            ),
        ],
        icmp_echo: EchoRate::default(),
        mode: Mode::Enforce,
    }
}

static PROGRAMS: Shared = Shared::new(|| Mutex::new(Programs::load(true, Some(&policy()), None)));

fn v4(src: Ipv4Addr, t: &Transport) -> Vec<u8> {
    eth_v4(&Ipv4::new(src, HOST_V4), t)
}

fn v6(src: Ipv6Addr, t: &Transport) -> Vec<u8> {
    eth_v6(&Ipv6::new(src, HOST_V6), t)
}

fn tcp(dst: u16) -> Transport {
    Transport::tcp_syn(dst)
}

fn udp(dst: u16) -> Transport {
    Transport::udp(dst)
}

/// Runs `cases` through the kernel and checks the model agrees, and names
/// the service `services[i]` for case `i` (`None`: no service).
fn expect(policy: &EdgePolicy, cases: &[Case], services: &[Option<&str>]) {
    tier2::lock(&PROGRAMS).expect_all(Prog::Edge, cases);
    model_agrees(policy, cases, services);
}

fn model_agrees(policy: &EdgePolicy, cases: &[Case], services: &[Option<&str>]) {
    let model = EdgeModel::new(policy);
    let names: Vec<String> = policy.services().map(|s| s.name.to_owned()).collect();
    for (case, service) in cases.iter().zip(services) {
        let mut m = ztxdp::model::StatefulModel::new(policy, None, &FlowSettings::default());
        let e = m.explain_edge(&case.input, 1, 0);
        assert_eq!(
            (
                reason::name(model.verdict(&case.input)),
                reason::name(e.reason)
            ),
            (reason::name(case.want), reason::name(case.want)),
            "model on {}",
            case.name
        );
        assert_eq!(
            e.service.map(|i| names[i as usize].as_str()),
            *service,
            "service the model names for {}",
            case.name
        );
    }
}

#[test]
fn a_service_open_to_everyone_passes_tcp_and_udp_from_anywhere() {
    expect(
        &policy(),
        &[
            Case::new(
                "tcp 443 outsider v4",
                v4(OUTSIDER_V4, &tcp(HTTPS)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "tcp 443 outsider v6",
                v6(OUTSIDER_V6, &tcp(HTTPS)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "udp 443 outsider v4",
                v4(OUTSIDER_V4, &udp(HTTPS)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "tcp 444 is no service's",
                v4(OUTSIDER_V4, &tcp(HTTPS + 1)),
                reason::DROP_PORT_NOT_ALLOWED,
            ),
            Case::new(
                "udp 444 is no service's nor WireGuard's",
                v4(OUTSIDER_V4, &udp(HTTPS + 1)),
                reason::DROP_PORT_NOT_ALLOWED,
            ),
            Case::new(
                "udp to WireGuard still passes",
                v4(OUTSIDER_V4, &udp(WG)),
                reason::PASS_WIREGUARD,
            ),
        ],
        &[
            Some("https"),
            Some("https"),
            Some("https"),
            None,
            None,
            None,
        ],
    );
}

#[test]
fn a_service_passes_only_from_its_sources() {
    expect(
        &policy(),
        &[
            Case::new(
                "admin from 10/8",
                v4(OTHER_INSIDE_V4, &tcp(ADMIN)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "admin from inside 10.1/16, which another service lists",
                v4(INSIDE_V4, &tcp(ADMIN)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "admin from its v6 /48",
                v6(INSIDE_V6, &tcp(ADMIN)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "admin from an outsider",
                v4(OUTSIDER_V4, &tcp(ADMIN)),
                reason::DROP_SERVICE_SOURCE,
            ),
            Case::new(
                "admin from an outsider v6",
                v6(OUTSIDER_V6, &tcp(ADMIN)),
                reason::DROP_SERVICE_SOURCE,
            ),
            Case::new(
                "admin over udp is no service's",
                v4(OTHER_INSIDE_V4, &udp(ADMIN)),
                reason::DROP_PORT_NOT_ALLOWED,
            ),
            Case::new(
                "metrics from 10.1/16",
                v4(INSIDE_V4, &tcp(METRICS)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "metrics from 10/8 outside 10.1/16",
                v4(OTHER_INSIDE_V4, &tcp(METRICS)),
                reason::DROP_SERVICE_SOURCE,
            ),
            Case::new(
                "first port of a range",
                v4(SSH_V4, &tcp(8000)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "last port of a range",
                v4(SSH_V4, &tcp(8100)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "past the range",
                v4(SSH_V4, &tcp(8101)),
                reason::DROP_PORT_NOT_ALLOWED,
            ),
        ],
        &[
            Some("admin"),
            Some("admin"),
            Some("admin"),
            Some("admin"),
            Some("admin"),
            None,
            Some("metrics"),
            Some("metrics"),
            Some("range"),
            Some("range"),
            None,
        ],
    );
}

#[test]
fn the_ssh_service_keeps_its_reasons_and_shares_its_port() {
    expect(
        &policy(),
        &[
            Case::new(
                "ssh from ssh_allow",
                v4(SSH_V4, &tcp(SSH)),
                reason::PASS_SSH,
            ),
            Case::new(
                "the ssh port from alt-ssh's sources",
                v4(ALT_V4, &tcp(SSH)),
                reason::PASS_SERVICE,
            ),
            Case::new(
                "the ssh port from neither",
                v4(OUTSIDER_V4, &tcp(SSH)),
                reason::DROP_SSH_SOURCE,
            ),
        ],
        &[Some("ssh"), Some("alt-ssh"), Some("ssh")],
    );
}

#[test]
fn a_reload_swaps_the_service_maps_in_place() {
    let old = policy();
    let mut new = policy();
    // https closes to all but 203.0.113.0/24, admin moves to 9443, the ssh
    // port to 2222, and a new service opens udp/5353 to everyone.
    new.services[0].from = nets(&["203.0.113.0/24"]);
    new.services[1].ports = vec![ports(Protocol::Tcp, 9443, 9443)];
    new.ssh_port = 2222;
    new.services.push(service(
        "mdns",
        vec![ports(Protocol::Udp, 5353, 5353)],
        &["0.0.0.0/0"],
    ));
    let mut p = Programs::load(true, Some(&old), None);
    let contents = |e: &EdgePolicy| {
        Contents::of(Some(e), None, &FlowSettings::default())
            .unwrap_or_else(|e| panic!("contents of a test policy: {e}"))
    };
    p.tables
        .replace(&contents(&new))
        .unwrap_or_else(|e| panic!("replacing the maps: {e}"));
    let cases = [
        Case::new(
            "https from inside its new from",
            v4(OUTSIDER_V4, &tcp(HTTPS)),
            reason::PASS_SERVICE,
        ),
        Case::new(
            "https from outside its new from",
            v6(OUTSIDER_V6, &tcp(HTTPS)),
            reason::DROP_SERVICE_SOURCE,
        ),
        Case::new(
            "admin's old port",
            v4(INSIDE_V4, &tcp(ADMIN)),
            reason::DROP_PORT_NOT_ALLOWED,
        ),
        Case::new(
            "admin's new port",
            v4(INSIDE_V4, &tcp(9443)),
            reason::PASS_SERVICE,
        ),
        Case::new(
            "the old ssh port is alt-ssh's alone",
            v4(SSH_V4, &tcp(SSH)),
            reason::DROP_SERVICE_SOURCE,
        ),
        Case::new("the new ssh port", v4(SSH_V4, &tcp(2222)), reason::PASS_SSH),
        Case::new("mdns", v4(OUTSIDER_V4, &udp(5353)), reason::PASS_SERVICE),
    ];
    p.expect_all(Prog::Edge, &cases);
    model_agrees(
        &new,
        &cases,
        &[
            Some("https"),
            Some("https"),
            None,
            Some("admin"),
            Some("alt-ssh"),
            Some("ssh"),
            Some("mdns"),
        ],
    );
    // The maps read back as the new policy writes them: nothing of the
    // old one is left.
    assert_eq!(
        p.tables
            .contents()
            .unwrap_or_else(|e| panic!("reading the maps: {e}")),
        contents(&new)
    );
    // And back: the old policy's verdicts again.
    p.tables
        .replace(&contents(&old))
        .unwrap_or_else(|e| panic!("replacing the maps: {e}"));
    p.expect_all(
        Prog::Edge,
        &[
            Case::new(
                "https from anywhere again",
                v6(OUTSIDER_V6, &tcp(HTTPS)),
                reason::PASS_SERVICE,
            ),
            Case::new("ssh on 22 again", v4(SSH_V4, &tcp(SSH)), reason::PASS_SSH),
        ],
    );
}

#[test]
fn audit_mode_passes_service_drops_as_would_drops() {
    let policy = EdgePolicy {
        mode: Mode::Audit,
        ..policy()
    };
    let mut p = Programs::load(true, Some(&policy), None);
    for (frame, want) in [
        (v4(OUTSIDER_V4, &tcp(ADMIN)), reason::DROP_SERVICE_SOURCE),
        (v4(OUTSIDER_V4, &tcp(SSH)), reason::DROP_SSH_SOURCE),
    ] {
        let run = p.run(Prog::Edge, &frame);
        assert_eq!(
            (reason::name(run.reason), run.would_drop, run.action),
            (reason::name(want), true, tier2::XDP_PASS),
            "a service drop in audit mode"
        );
    }
}

/// IPv6 sources of more distinct lengths than the exact lookups cover go
/// to the trie; a reload moves them between the two layouts and each
/// admits the same addresses, read back exactly as written.
#[test]
fn ipv6_sources_of_many_lengths_fall_back_to_the_trie_and_back() {
    let bound = zt_common::capacity::SOURCE_V6_LENGTHS;
    let few = policy();
    let mut many = policy();
    // admin's /48 plus one prefix of every length from /72 on: one more
    // length than the bound, none of them holding OUTSIDER_V6.
    let extra: Vec<String> = (0..bound)
        .map(|i| format!("2001:db8:aa:1:{:x}::/{}", i + 1, 72 + i))
        .collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let extra: Vec<_> = many.services[1]
        .from
        .iter()
        .copied()
        .chain(nets(&extra))
        .collect();
    many.services[1].from = extra;
    let contents = |e: &EdgePolicy| {
        Contents::of(Some(e), None, &FlowSettings::default())
            .unwrap_or_else(|e| panic!("contents of a test policy: {e}"))
    };
    assert!(contents(&many).sources().v6_in_trie());
    assert!(!contents(&few).sources().v6_in_trie());
    let cases = [
        Case::new(
            "admin from its v6 /48",
            v6(INSIDE_V6, &tcp(ADMIN)),
            reason::PASS_SERVICE,
        ),
        Case::new(
            "admin from an outsider v6",
            v6(OUTSIDER_V6, &tcp(ADMIN)),
            reason::DROP_SERVICE_SOURCE,
        ),
        Case::new(
            "https from an outsider v6",
            v6(OUTSIDER_V6, &tcp(HTTPS)),
            reason::PASS_SERVICE,
        ),
        Case::new(
            "ssh from its v4 /32",
            v4(SSH_V4, &tcp(SSH)),
            reason::PASS_SSH,
        ),
    ];
    let mut p = Programs::load(true, Some(&many), None);
    p.expect_all(Prog::Edge, &cases);
    for (to, name) in [(&few, "few"), (&many, "many")] {
        p.tables
            .replace(&contents(to))
            .unwrap_or_else(|e| panic!("replacing the maps with {name}: {e}"));
        p.expect_all(Prog::Edge, &cases);
        assert_eq!(
            p.tables
                .contents()
                .unwrap_or_else(|e| panic!("reading the maps: {e}")),
            contents(to),
            "the maps after the reload to {name}"
        );
    }
}

/// A list long enough to be written in batches (`BPF_MAP_UPDATE_BATCH`)
/// admits each of its addresses and no neighbour, and reads back whole.
#[test]
fn a_long_allow_list_is_written_in_batches_and_reads_back_whole() {
    let mut long = policy();
    let listed: Vec<String> = (0..5_000u32)
        .map(|i| format!("{}/32", Ipv4Addr::from(0x0b00_0000 | (i * 7))))
        .collect();
    long.ssh_allow = nets(&listed.iter().map(String::as_str).collect::<Vec<_>>());
    let mut p = Programs::load(true, Some(&long), None);
    let listed = Ipv4Addr::from(0x0b00_0000 | (4_321 * 7));
    let neighbour = Ipv4Addr::from(0x0b00_0000 | (4_321 * 7 + 1));
    p.expect_all(
        Prog::Edge,
        &[
            Case::new(
                "ssh from a listed address",
                v4(listed, &tcp(SSH)),
                reason::PASS_SSH,
            ),
            Case::new(
                "ssh from its unlisted neighbour",
                v4(neighbour, &tcp(SSH)),
                reason::DROP_SSH_SOURCE,
            ),
        ],
    );
    let want = Contents::of(Some(&long), None, &FlowSettings::default())
        .unwrap_or_else(|e| panic!("contents of a test policy: {e}"));
    assert_eq!(
        p.tables
            .contents()
            .unwrap_or_else(|e| panic!("reading the maps: {e}")),
        want
    );
}

/// A reload that renumbers the services (one inserted first) closes every
/// service for the moment between its halves ([`Contents::narrowed`]
/// keeps only the bits both policies give). A datagram the host sends
/// then from a UDP service's port to a client of it is not judged an
/// answer when its flow starts; once the reload is done the flow is
/// judged again, so a later reload that closes the service to that client
/// closes it, and the flow does not keep the port open. A flow the host
/// started on its own before the reload keeps its judgement, though it
/// sends on meanwhile and the new policy opens its port.
#[test]
fn a_reply_sent_between_a_reloads_halves_does_not_outlive_its_service() {
    let old = policy();
    let mut renumbered = policy();
    renumbered.services.insert(
        0,
        service("dns", vec![ports(Protocol::Udp, 53, 53)], &["0.0.0.0/0"]),
    );
    let mut closed = renumbered.clone();
    closed.services[1].from = nets(&["198.51.100.0/24"]);
    let contents = |e: &EdgePolicy| {
        Contents::of(Some(e), None, &FlowSettings::default())
            .unwrap_or_else(|e| panic!("contents of a test policy: {e}"))
    };
    let (before, after) = (contents(&old), contents(&renumbered));
    let mut p = Programs::load(true, Some(&old), None);
    // The host's own query from udp/53, which the new policy opens.
    let query = eth_v4(
        &Ipv4::new(HOST_V4, OUTSIDER_V4),
        &Transport::Udp { src: 53, dst: 7000 },
    );
    assert!(p.egress(program::EDGE_EGRESS_NAME, &query));
    let flows = p
        .tables
        .udp_flows()
        .unwrap_or_else(|e| panic!("reading the flows: {e}"));
    assert_eq!(flows.len(), 1);
    // The reload's first half, then the host queries again and answers a
    // client of https.
    p.tables
        .replace(&before.narrowed(&after))
        .unwrap_or_else(|e| panic!("narrowing the maps: {e}"));
    assert!(!p.egress(program::EDGE_EGRESS_NAME, &query), "a refresh");
    let answer = eth_v4(
        &Ipv4::new(HOST_V4, OUTSIDER_V4),
        &Transport::Udp {
            src: HTTPS,
            dst: 5000,
        },
    );
    assert!(
        p.egress(program::EDGE_EGRESS_NAME, &answer),
        "the host's datagram opens a flow"
    );
    p.tables
        .replace(&after)
        .unwrap_or_else(|e| panic!("replacing the maps: {e}"));
    let interfaces = FlowInterfaces {
        edge: Some(TEST_RUN_IFINDEX),
        tunnel: None,
    };
    let judged = p
        .tables
        .judge_answers(&after, &flows, interfaces)
        .unwrap_or_else(|e| panic!("judging the flows: {e}"));
    assert_eq!(judged, 1, "the flow opened between the halves, alone");
    let client = v4(
        OUTSIDER_V4,
        &Transport::Udp {
            src: 5000,
            dst: HTTPS,
        },
    );
    p.expect_all(
        Prog::Edge,
        &[Case::new(
            "the client, by https's policy",
            client.clone(),
            reason::PASS_SERVICE,
        )],
    );
    p.tables
        .replace(&contents(&closed))
        .unwrap_or_else(|e| panic!("closing https: {e}"));
    p.expect_all(
        Prog::Edge,
        &[Case::new(
            "the client, once https is closed to it",
            client,
            reason::DROP_SERVICE_SOURCE,
        )],
    );
}
