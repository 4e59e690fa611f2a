//! Tier 2, adoption (`ztxdp::adopt`): a replacing `ztxdp up` copies the
//! state of the programs it replaces into its own. Two program sets are
//! loaded side by side, as during a restart; the old one records flows and
//! counts through `BPF_PROG_TEST_RUN`, and after adoption the new one must
//! know them. Needs root.

mod tier2;

use std::net::Ipv4Addr;

use tier2::{Prog, Programs};
use zt_common::{program, reason, tcp_flag};
use zt_tests::packet::{Ethernet, Ipv4, Transport};
use ztxdp::{
    adopt::{self, Adopted, Maps, Pass},
    loader,
    policy::{EchoRate, EdgePolicy, FlowSettings},
};

const HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const REMOTE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const SERVER: u16 = 443;

fn edge() -> EdgePolicy {
    EdgePolicy {
        interface: "eth0".into(),
        wireguard_ports: vec![51_820],
        ssh_port: 22,
        ssh_allow: Vec::new(),
        services: Vec::new(),
        icmp_echo: EchoRate::default(),
        mode: ztxdp::policy::Mode::Enforce,
    }
}

fn load(max_entries: u32) -> Programs {
    Programs::load_with_flows(
        false,
        Some(&edge()),
        None,
        &FlowSettings {
            max_entries,
            ..FlowSettings::default()
        },
    )
}

/// The host's SYN from `port` to the server, and the server's SYN-ACK back.
fn connection(port: u16) -> (Vec<u8>, Vec<u8>) {
    let tcp = |src, dst, flags| Transport::Tcp { src, dst, flags };
    (
        Ethernet::default().ipv4(&Ipv4::new(HOST, REMOTE), &tcp(port, SERVER, tcp_flag::SYN)),
        Ethernet::default().ipv4(
            &Ipv4::new(REMOTE, HOST),
            &tcp(SERVER, port, tcp_flag::SYN | tcp_flag::ACK),
        ),
    )
}

fn adopt_all(old: &Programs, new: &Programs, pass: Pass) -> Adopted {
    let open = |p: &Programs| {
        Maps::open(&loader::map_ids(&p.ebpf)).unwrap_or_else(|e| panic!("opening maps: {e}"))
    };
    adopt::adopt(&open(old), &open(new), 0, pass).unwrap_or_else(|e| panic!("adopting: {e}"))
}

#[test]
fn a_replacement_admits_the_replies_of_its_predecessors_flows_and_keeps_its_counts() {
    let mut old = load(1024);
    let (syn, syn_ack) = connection(40_000);
    assert!(
        old.egress(program::EDGE_EGRESS_NAME, &syn),
        "the old recorder opened no flow"
    );
    let closed = Ethernet::default().ipv4(&Ipv4::new(REMOTE, HOST), &Transport::udp(9));
    assert_eq!(
        old.run(Prog::Edge, &closed).reason,
        reason::DROP_PORT_NOT_ALLOWED
    );
    let mut new = load(1024);
    // Unadopted, the reply drops: the test can tell.
    assert_eq!(
        new.run(Prog::Edge, &syn_ack).reason,
        reason::DROP_PORT_NOT_ALLOWED
    );
    let adopted = adopt_all(&old, &new, Pass::BeforeSwap);
    assert_eq!((adopted.flows, adopted.left_out), (1, 0), "{adopted:?}");
    new.recount();
    assert_eq!(new.run(Prog::Edge, &syn_ack).reason, reason::PASS_REPLY);
    // Counters carry over: the old drop, the one unadopted drop, the reply,
    // and the flow the old recorder created.
    assert_eq!(new.counter(program::EDGE, reason::DROP_PORT_NOT_ALLOWED), 2);
    assert_eq!(new.counter(program::EGRESS, reason::FLOWS_CREATED), 1);
    // A second pass copies only what changed: counts are not doubled.
    let again = adopt_all(&old, &new, Pass::AfterSwap);
    assert_eq!(again.flows, 0, "the flow was copied twice: {again:?}");
    assert_eq!(new.counter(program::EDGE, reason::DROP_PORT_NOT_ALLOWED), 2);
}

#[test]
fn counts_made_between_the_two_copies_are_carried_too() {
    let closed = Ethernet::default().ipv4(&Ipv4::new(REMOTE, HOST), &Transport::udp(9));
    let mut old = load(1024);
    assert_eq!(
        old.run(Prog::Edge, &closed).reason,
        reason::DROP_PORT_NOT_ALLOWED
    );
    let new = load(1024);
    adopt_all(&old, &new, Pass::BeforeSwap);
    // Decided by the old programs after the first copy, before the swap.
    for _ in 0..3 {
        old.run(Prog::Edge, &closed);
    }
    adopt_all(&old, &new, Pass::AfterSwap);
    assert_eq!(new.counter(program::EDGE, reason::DROP_PORT_NOT_ALLOWED), 4);
    // Set, not added: a further pass changes nothing.
    adopt_all(&old, &new, Pass::AfterSwap);
    assert_eq!(new.counter(program::EDGE, reason::DROP_PORT_NOT_ALLOWED), 4);
}

#[test]
fn a_smaller_flow_table_takes_what_fits_and_counts_the_rest() {
    const FLOWS: u16 = 1500;
    let mut old = load(2048);
    for port in 0..FLOWS {
        let (syn, _) = connection(40_000 + port);
        assert!(old.egress(program::EDGE_EGRESS_NAME, &syn), "flow {port}");
    }
    let new = load(1024);
    let adopted = adopt_all(&old, &new, Pass::BeforeSwap);
    assert_eq!(
        (adopted.flows, adopted.left_out),
        (1024, usize::from(FLOWS) - 1024),
        "{adopted:?}"
    );
    let entries = new
        .tables
        .fill_levels()
        .unwrap_or_else(|e| panic!("fill levels: {e:?}"))["flows"];
    assert_eq!(entries, 1024, "the LRU evicted what it was given");
}
