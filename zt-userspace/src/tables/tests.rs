use std::net::Ipv4Addr;

use super::*;
use crate::policy::Protocol;

fn peer(name: &str, address: &str, grants: &[Grant]) -> Peer {
    Peer {
        name: name.to_owned(),
        addresses: vec![
            address
                .parse()
                .unwrap_or_else(|e| panic!("test prefix {address}: {e}")),
        ],
        public_key: None,
        grants: grants.to_vec(),
        mode: crate::policy::Mode::Enforce,
    }
}

fn tcp(port: u16) -> Grant {
    Grant::Ports {
        protocol: Protocol::Tcp,
        first: port,
        last: port,
    }
}

fn contents(peers: Vec<Peer>) -> Contents {
    let tunnel = TunnelPolicy {
        interface: "wg0".to_owned(),
        peers,
        groups: Vec::new(),
        runtime_grants: "grants.json".into(),
        link_local_neighbors: false,
        mode: crate::policy::Mode::Enforce,
    };
    Contents::of(None, Some(&tunnel), &FlowSettings::default())
        .unwrap_or_else(|e| panic!("contents of a small test policy: {e}"))
}

/// What the tunnel program decides for an IPv4 source, as
/// `zt_ebpf::verdict::tunnel` does: the longest matching prefix gives
/// the peer, its grant word the port (`None`: ICMP echo).
fn passes(c: &Contents, source: Ipv4Addr, port: Option<u16>) -> bool {
    let Some(info) = c.peer_of(source.into()) else {
        return false;
    };
    match port {
        None => info.flags & PEER_ICMP != 0,
        Some(port) => c.granted(info.index, zt_common::proto::TCP, port),
    }
}

#[test]
fn between_the_halves_of_a_reload_nothing_passes_that_either_policy_drops() {
    let a = "10.0.0.1/32";
    let b = "10.0.0.2/32";
    let cases = [
        (
            "peers swap places",
            vec![
                peer("a", a, &[tcp(22)]),
                peer("b", b, &[tcp(80), Grant::Icmp]),
            ],
            vec![
                peer("b", b, &[tcp(80), Grant::Icmp]),
                peer("a", a, &[tcp(22)]),
            ],
        ),
        (
            "a grant and ICMP change in place",
            vec![
                peer("a", a, &[tcp(22), Grant::Icmp]),
                peer("b", b, &[tcp(80)]),
            ],
            vec![
                peer("a", a, &[tcp(23)]),
                peer("b", b, &[tcp(80), Grant::Icmp]),
            ],
        ),
        (
            "a peer leaves and the other takes its index",
            vec![peer("a", a, &[tcp(22)]), peer("b", b, &[tcp(80)])],
            vec![peer("b", b, &[tcp(80), tcp(22)])],
        ),
        (
            "an address moves to another peer",
            vec![
                peer("a", "10.0.0.0/30", &[tcp(22)]),
                peer("b", "10.0.1.0/24", &[]),
            ],
            vec![
                peer("a", a, &[tcp(22)]),
                peer("b", "10.0.0.2/31", &[tcp(80)]),
            ],
        ),
    ];
    let sources: Vec<Ipv4Addr> = (0..4).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
    let ports = [None, Some(22), Some(23), Some(80), Some(443)];
    for (what, old, new) in cases {
        let (old, new) = (contents(old), contents(new));
        let narrowed = old.narrowed(&new);
        for &source in &sources {
            for port in ports {
                if passes(&narrowed, source, port) {
                    assert!(
                        passes(&old, source, port) && passes(&new, source, port),
                        "{what}: {source} to {port:?} passes mid-reload but not in both \
                         policies\nold {old:?}\nnew {new:?}\nmid {narrowed:?}"
                    );
                }
            }
        }
        // What both allow from an address whose entry keeps its index
        // survives the first half: no needless drop.
        for &source in &sources {
            let host = (source.octets(), 32);
            let kept = old
                .peer_v4
                .get(&host)
                .zip(new.peer_v4.get(&host))
                .is_some_and(|(o, n)| o.index == n.index);
            for port in ports {
                if kept && passes(&old, source, port) && passes(&new, source, port) {
                    assert!(
                        passes(&narrowed, source, port),
                        "{what}: {source} to {port:?} is dropped mid-reload though \
                         both policies pass it under the same index"
                    );
                }
            }
        }
    }
}

#[test]
fn a_datagram_answers_the_tunnel_policy_from_a_port_its_peer_is_granted() {
    let udp = |port| Grant::Ports {
        protocol: Protocol::Udp,
        first: port,
        last: port,
    };
    let c = contents(vec![
        peer("dns", "10.0.0.0/24", &[udp(53)]),
        peer("host", "10.0.1.7/32", &[tcp(53)]),
    ]);
    let (dns, host) = (Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 1, 7));
    assert!(c.answers(false, 53, dns.into()));
    assert!(!c.answers(false, 54, dns.into()), "another port");
    assert!(
        !c.answers(false, 53, host.into()),
        "a peer granted tcp/53 only"
    );
    assert!(
        !c.answers(false, 53, Ipv4Addr::new(10, 0, 2, 1).into()),
        "no peer"
    );
    // Not the edge's: it has no WireGuard port or service here.
    assert!(!c.answers(true, 53, dns.into()));
}
