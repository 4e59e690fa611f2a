//! `[[edge.service]]`: the grammar, the defaults, and every refusal, each
//! named by key and line.

use super::*;
use crate::policy::{PortRange, Protocol};

/// An edge whose `[[edge.service]]` tables start at line 5.
fn services(tables: &str) -> String {
    edge_with(tables)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn range(protocol: Protocol, first: u16, last: u16) -> PortRange {
    PortRange {
        protocol,
        first,
        last,
    }
}

#[test]
fn services_parse_with_from_defaulting_to_everyone() {
    let config = parse_ok(&services(
        "[[edge.service]]\nname = \"https\"\nallow = [\"tcp/443\", \"udp/443\"]\n\n\
         [[edge.service]]\nname = \"admin\"\nallow = [\"tcp/8000-8100\"]\nfrom = [\"10.1.2.3/8\", \"2001:db8::1\"]\n",
    ));
    let edge = config.policy.edge.clone().expect("an edge");
    assert_eq!(edge.services.len(), 2);
    assert_eq!(edge.services[0].name, "https");
    assert_eq!(
        edge.services[0].ports,
        [
            range(Protocol::Tcp, 443, 443),
            range(Protocol::Udp, 443, 443)
        ]
    );
    assert_eq!(
        edge.services[0].from,
        [net("0.0.0.0/0"), net("::/0")],
        "from defaults to every source"
    );
    assert_eq!(
        edge.services[1].from,
        [net("10.0.0.0/8"), net("2001:db8::1/128")],
        "host bits cleared, a bare address is a host"
    );
    let names: Vec<&str> = edge.services().map(|s| s.name).collect();
    assert_eq!(names, ["ssh", "https", "admin"], "ssh comes first");
    assert_eq!(config.line_of("edge.service[1].from[0]"), Some(12));
}

#[test]
fn an_empty_from_admits_nobody() {
    let config = parse_ok(&services(
        "[[edge.service]]\nname = \"closed\"\nallow = [\"tcp/443\"]\nfrom = []\n",
    ));
    let edge = config.policy.edge.expect("an edge");
    assert!(edge.services[0].from.is_empty());
}

#[test]
fn bad_services_are_named_by_key_and_line() {
    for (table, key, line) in [
        (
            "[[edge.service]]\nallow = [\"tcp/443\"]\n",
            "edge.service[0].name",
            5,
        ),
        (
            "[[edge.service]]\nname = \"\"\nallow = [\"tcp/443\"]\n",
            "edge.service[0].name",
            6,
        ),
        (
            "[[edge.service]]\nname = \"a b\"\nallow = [\"tcp/443\"]\n",
            "edge.service[0].name",
            6,
        ),
        (
            "[[edge.service]]\nname = \"ssh\"\nallow = [\"tcp/2222\"]\n",
            "edge.service[0].name",
            6,
        ),
        (
            "[[edge.service]]\nname = \"x\"\n",
            "edge.service[0].allow",
            5,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = []\n",
            "edge.service[0].allow",
            7,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"icmp\"]\n",
            "edge.service[0].allow[0]",
            7,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"tcp/443\", \"sctp/9\"]\n",
            "edge.service[0].allow[1]",
            7,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"tcp/0\"]\n",
            "edge.service[0].allow[0]",
            7,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"udp/51800-51830\"]\n",
            "edge.service[0].allow[0]",
            7,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"tcp/443\"]\nfrom = [\"10.0.0/8\"]\n",
            "edge.service[0].from[0]",
            8,
        ),
        (
            "[[edge.service]]\nname = \"x\"\nallow = [\"tcp/443\"]\nport = 1\n",
            "edge.service[0].port",
            8,
        ),
    ] {
        expect_error(&services(table), key, line);
    }
}

#[test]
fn names_are_unique() {
    let shown = expect_error(
        &services(
            "[[edge.service]]\nname = \"web\"\nallow = [\"tcp/80\"]\n\
             [[edge.service]]\nname = \"web\"\nallow = [\"tcp/443\"]\n",
        ),
        "edge.service[1].name",
        9,
    );
    assert!(shown.contains("already used by edge.service[0]"), "{shown}");
}

#[test]
fn shared_ports_need_different_sources() {
    // Same port, same sources: the second could never be the one named.
    let shown = expect_error(
        &services(
            "[[edge.service]]\nname = \"a\"\nallow = [\"tcp/8000-8100\"]\n\
             [[edge.service]]\nname = \"b\"\nallow = [\"udp/53\", \"tcp/8080\"]\n",
        ),
        "edge.service[1].allow[1]",
        10,
    );
    assert!(shown.contains("service \"a\""), "{shown}");
    // The ssh port with ssh_allow's sources.
    expect_error(
        &services(
            "[[edge.service]]\nname = \"a\"\nallow = [\"tcp/22\"]\nfrom = [\"192.0.2.10/32\"]\n",
        ),
        "edge.service[0].allow[0]",
        7,
    );
    // Different sources (even overlapping ones), or another protocol: fine.
    parse_ok(&services(
        "[[edge.service]]\nname = \"a\"\nallow = [\"tcp/22\"]\nfrom = [\"192.0.2.0/24\"]\n\
         [[edge.service]]\nname = \"b\"\nallow = [\"tcp/443\"]\n\
         [[edge.service]]\nname = \"c\"\nallow = [\"tcp/443\"]\nfrom = [\"10.0.0.0/8\"]\n\
         [[edge.service]]\nname = \"d\"\nallow = [\"udp/443\"]\nfrom = [\"10.0.0.0/8\"]\n",
    ));
}

#[test]
fn at_most_64_services_with_ssh() {
    let table = |i: usize| {
        format!(
            "[[edge.service]]\nname = \"s{i}\"\nallow = [\"tcp/{}\"]\n",
            1000 + i
        )
    };
    let most: String = (0..63).map(table).collect();
    let edge = parse_ok(&services(&most)).policy.edge.expect("an edge");
    assert_eq!(edge.services().count(), 64);
    let over: String = (0..64).map(table).collect();
    let shown = expect_error(&services(&over), "edge.service[63]", 194);
    assert!(shown.contains("more than 64 services"), "{shown}");
}

#[test]
fn sources_count_against_the_map_once_each() {
    let limits = Limits {
        ssh_allow_per_family: 3,
        ..Limits::KERNEL
    };
    // ssh_allow's one, and the default from's one IPv4 prefix shared by
    // both services: two distinct IPv4 prefixes.
    let shared = services(
        "[[edge.service]]\nname = \"a\"\nallow = [\"tcp/80\"]\n\
         [[edge.service]]\nname = \"b\"\nallow = [\"tcp/443\"]\n",
    );
    parse_with(&shared, Path::new(PATH), limits)
        .unwrap_or_else(|e| panic!("shared sources count once: {e}"));
    let over = services(
        "[[edge.service]]\nname = \"a\"\nallow = [\"tcp/80\"]\n\
         from = [\"10.0.0.0/8\", \"10.1.0.0/16\", \"10.2.0.0/16\"]\n",
    );
    let shown = expect_error_with(&over, limits, "edge.service[0].from[2]", 8);
    assert!(shown.contains("more than 3 distinct IPv4"), "{shown}");
}
