use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;

use super::*;
use crate::policy::{
    AuditFormat, AuditSettings, EchoRate, EdgePolicy, FlowSettings, Grant, Mode, Peer, Protocol,
    SocketGroup, SyslogSettings, TunnelPolicy,
};

mod groups;
mod services;
mod syslog_tls;

const PATH: &str = "/etc/ztxdp.toml";

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new(PATH))
}

fn parse_ok(text: &str) -> Config {
    parse(text).unwrap_or_else(|e| panic!("expected a valid config, got: {e}\n---\n{text}"))
}

/// Asserts that `text` is refused with an error about `key` at `line`.
fn expect_error_with(text: &str, limits: Limits, key: &str, line: usize) -> String {
    let Err(error) = parse_with(text, Path::new(PATH), limits) else {
        panic!("expected an error about {key} at line {line}, the config was accepted:\n{text}");
    };
    let shown = error.to_string();
    let want = format!("{PATH}:{line}: {key}: ");
    assert!(
        shown.starts_with(&want),
        "expected the error to start with {want:?}, got {shown:?}"
    );
    match &error {
        ConfigError::Invalid {
            key: k,
            line: l,
            path,
            ..
        } => {
            assert_eq!(
                (k.as_str(), *l, path.as_path()),
                (key, line, Path::new(PATH)),
                "structured fields of {shown}"
            );
        }
        other => panic!("expected ConfigError::Invalid, got {other:?}"),
    }
    shown
}

fn expect_error(text: &str, key: &str, line: usize) -> String {
    expect_error_with(text, Limits::KERNEL, key, line)
}

const AUDIT: &str = "[audit]\npath = \"/tmp/audit.jsonl\"\n";

/// An edge table whose line 5 is `extra` (line 1 is `[edge]`).
fn edge_with(extra: &str) -> String {
    format!(
        "[edge]\ninterface = \"eth0\"\nwireguard_ports = [51820]\nssh_allow = [\"192.0.2.10/32\"]\n{extra}\n{AUDIT}"
    )
}

/// A tunnel with the given peers (each a complete `[[tunnel.peer]]` table).
fn tunnel_with(peers: &[&str]) -> String {
    format!(
        "[tunnel]\ninterface = \"wg0\"\n{}\n{AUDIT}",
        peers.join("\n")
    )
}

#[test]
fn unknown_keys_are_named() {
    expect_error(&edge_with("bogus = 1"), "edge.bogus", 5);
    expect_error(&format!("{}\n[extra]\nx = 1\n", edge_with("")), "extra", 9);
    expect_error(
        &tunnel_with(&["[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallowed = []"]),
        "tunnel.peer[0].allowed",
        6,
    );
    expect_error(
        "edge = { interface = \"eth0\", wireguard_ports = [], ssh_allow = [], port = 22 }\n[audit]\npath = \"/a\"",
        "edge.port",
        1,
    );
}

#[test]
fn bad_cidrs_are_named() {
    let text = edge_with("").replace(
        "[\"192.0.2.10/32\"]",
        "[\"192.0.2.10/32\",\n  \"10.0.0.0/33\"]",
    );
    expect_error(&text, "edge.ssh_allow[1]", 5);
    expect_error(
        &edge_with("").replace("192.0.2.10/32", "192.0.2.300/32"),
        "edge.ssh_allow[0]",
        4,
    );
    expect_error(
        &edge_with("").replace("192.0.2.10/32", "eth0"),
        "edge.ssh_allow[0]",
        4,
    );
    let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\", \"fd00::/129\"]";
    expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].addresses[1]", 5);
}

#[test]
fn zero_ports_are_refused() {
    let shown = expect_error(
        &edge_with("").replace("[51820]", "[51820, 0]"),
        "edge.wireguard_ports[1]",
        3,
    );
    assert!(shown.contains("port 0"), "message should say why: {shown}");
    expect_error(&edge_with("ssh_port = 0"), "edge.ssh_port", 5);
}

#[test]
fn ports_above_65535_are_refused() {
    let shown = expect_error(&edge_with("ssh_port = 70000"), "edge.ssh_port", 5);
    assert!(
        shown.contains("70000"),
        "message should quote the value: {shown}"
    );
    expect_error(
        &edge_with("").replace("[51820]", "[65536]"),
        "edge.wireguard_ports[0]",
        3,
    );
    expect_error(&edge_with("ssh_port = -1"), "edge.ssh_port", 5);
    // Too large even for the integer serde reads.
    expect_error(
        &edge_with("ssh_port = 99999999999999999999"),
        "edge.ssh_port",
        5,
    );
}

#[test]
fn wrong_types_are_named() {
    expect_error(&edge_with("ssh_port = \"22\""), "edge.ssh_port", 5);
    expect_error(
        &edge_with("").replace("[51820]", "51820"),
        "edge.wireguard_ports",
        3,
    );
    expect_error(
        &edge_with("").replace("[51820]", "[51820, \"x\"]"),
        "edge.wireguard_ports[1]",
        3,
    );
    expect_error(
        &tunnel_with(&[
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/1\", 2]",
        ]),
        "tunnel.peer[0].allow[1]",
        6,
    );
    expect_error(&format!("edge = 5\n{AUDIT}"), "edge", 1);
    expect_error(
        &format!(
            "audit = \"/tmp/audit.jsonl\"\n{}",
            edge_with("").replace(AUDIT, "")
        ),
        "audit",
        1,
    );
}

#[test]
fn missing_required_keys_are_named() {
    let no_interface = edge_with("").replace("interface = \"eth0\"\n", "");
    expect_error(&no_interface, "edge.interface", 1);
    let no_ports = edge_with("").replace("wireguard_ports = [51820]\n", "");
    expect_error(&no_ports, "edge.wireguard_ports", 1);
    let no_allow = edge_with("").replace("ssh_allow = [\"192.0.2.10/32\"]\n", "");
    expect_error(&no_allow, "edge.ssh_allow", 1);
    expect_error(&edge_with("").replace(AUDIT, ""), "audit", 1);
    expect_error(
        &edge_with("").replace("path = \"/tmp/audit.jsonl\"\n", ""),
        "audit.path",
        6,
    );
    expect_error(
        &tunnel_with(&[]).replace("interface = \"wg0\"\n", ""),
        "tunnel.interface",
        1,
    );
    let nameless = "[[tunnel.peer]]\naddresses = [\"10.0.0.1\"]";
    expect_error(&tunnel_with(&[nameless]), "tunnel.peer[0].name", 3);
    let homeless = "[[tunnel.peer]]\nname = \"a\"";
    expect_error(&tunnel_with(&[homeless]), "tunnel.peer[0].addresses", 3);
    let idle = parse_ok(AUDIT);
    assert!(idle.policy.edge.is_none() && idle.policy.tunnel.is_none());
    let refused = idle
        .check_enforces()
        .expect_err("`up` must refuse a config with nothing to enforce");
    assert!(
        refused.to_string().contains("nothing to enforce"),
        "{refused}"
    );
    parse_ok(&edge_with(""))
        .check_enforces()
        .unwrap_or_else(|e| panic!("an edge is something to enforce: {e}"));
}

#[test]
fn peer_names_are_short_and_safe_to_print() {
    let named = |name: &str| {
        format!(
            "[[tunnel.peer]]\nname = {}\naddresses = [\"10.0.0.1\"]",
            // A JSON string is a TOML basic string: one line, escaped.
            serde_json::Value::String(name.to_owned())
        )
    };
    for bad in [
        "app\n1",
        "app\u{202e}1",
        "app-1 ",
        "app 1",
        "",
        &"a".repeat(65),
        &"x".repeat(10 << 20),
    ] {
        let shown = expect_error(&tunnel_with(&[&named(bad)]), "tunnel.peer[0].name", 4);
        assert!(
            shown.len() < 400,
            "the message repeats the whole name: {} bytes",
            shown.len()
        );
    }
    for good in ["app-1", "db_2.eu", "A", &"a".repeat(64)] {
        let config = parse_with(
            &tunnel_with(&[&named(good)]),
            Path::new(PATH),
            Limits::KERNEL,
        )
        .unwrap_or_else(|e| panic!("{good:?} refused: {e}"));
        assert_eq!(
            config
                .policy
                .tunnel
                .map(|t| t.peers[0].name.clone())
                .as_deref(),
            Some(good)
        );
    }
}

#[test]
fn duplicate_peer_names_are_refused() {
    let a = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]";
    let b = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.2\"]";
    let shown = expect_error(&tunnel_with(&[a, b]), "tunnel.peer[1].name", 7);
    assert!(
        shown.contains("tunnel.peer[0]"),
        "message should name the first use: {shown}"
    );
}

#[test]
fn peer_prefixes_must_not_overlap() {
    let a = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1/32\", \"fd00::1\"]";
    // The same prefix, spelled differently.
    let same = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"fd00::2\", \"10.0.0.1\"]";
    let shown = expect_error(&tunnel_with(&[a, same]), "tunnel.peer[1].addresses[1]", 8);
    assert!(
        shown.contains("peer \"a\""),
        "message should name the other peer: {shown}"
    );
    // A later, wider prefix that contains an earlier one.
    let wider = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.0/24\"]";
    expect_error(&tunnel_with(&[a, wider]), "tunnel.peer[1].addresses[0]", 8);
    let v6 = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"fd00::/64\"]";
    expect_error(&tunnel_with(&[a, v6]), "tunnel.peer[1].addresses[0]", 8);
    // Overlaps inside one peer are harmless: the source still maps to it.
    let own = "[[tunnel.peer]]\nname = \"c\"\naddresses = [\"10.1.0.0/16\", \"10.1.2.0/24\", \"10.1.2.0/24\"]";
    let config = parse_ok(&tunnel_with(&[a, own]));
    let peers = &config.policy.tunnel.as_ref().expect("tunnel").peers;
    assert_eq!(
        peers[1].addresses.len(),
        3,
        "the peer keeps its prefixes as written"
    );
}

#[test]
fn grants_with_other_protocols_are_refused() {
    let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\n  \"tcp/1\",\n  \"udp/2\",\n  \"sctp/5\",\n]";
    let shown = expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[2]", 9);
    assert!(
        shown.contains("sctp"),
        "message should quote the protocol: {shown}"
    );
}

#[test]
fn reversed_grant_ranges_are_refused() {
    let peer =
        "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/9000-8000\"]";
    let shown = expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[0]", 6);
    assert!(
        shown.contains("9000-8000"),
        "message should show the range: {shown}"
    );
}

#[test]
fn grants_of_port_zero_are_refused() {
    let peer = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/22\", \"udp/0\"]";
    expect_error(&tunnel_with(&[peer]), "tunnel.peer[0].allow[1]", 6);
    let range = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nallow = [\"tcp/0-10\"]";
    expect_error(&tunnel_with(&[range]), "tunnel.peer[0].allow[0]", 6);
}

fn peers_text(count: usize) -> String {
    let peers: Vec<String> = (0..count)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).expect("peer count fits u32"));
            format!("[[tunnel.peer]]\nname = \"p{i}\"\naddresses = [\"{ip}\"]")
        })
        .collect();
    let refs: Vec<&str> = peers.iter().map(String::as_str).collect();
    tunnel_with(&refs)
}

#[test]
fn more_peers_than_the_maps_hold_are_refused() {
    let limits = Limits {
        peers: 2,
        ..Limits::KERNEL
    };
    // Line 1 [tunnel], 2 interface, then three lines per peer.
    parse_with(&peers_text(2), Path::new(PATH), limits).expect("two peers fit a limit of two");
    expect_error_with(&peers_text(3), limits, "tunnel.peer[2]", 9);
}

#[test]
fn peers_over_the_limit_are_refused_before_the_rest_is_read() {
    let limits = Limits {
        peers: 2,
        ..Limits::KERNEL
    };
    // The third header (line 10: two lines of [tunnel], three a peer,
    // one blank) is past the limit; what follows it is not even TOML,
    // and must not be what the error is about.
    let text = format!(
        "[tunnel]\ninterface = \"wg0\"\n{}\n[[ \"tunnel\" . peer ]]  # a third\n= not toml\n{}",
        ["p0", "p1"]
            .map(|n| format!("[[tunnel.peer]]\nname = \"{n}\"\naddresses = [\"10.0.0.1\"]\n"))
            .join(""),
        "[[tunnel.peer]]\n".repeat(1000)
    );
    let shown = expect_error_with(&text, limits, "tunnel.peer[2]", 10);
    assert!(
        shown.contains("more than 2 peers"),
        "the message names the limit: {shown}"
    );
}

#[test]
fn peers_over_the_limit_in_an_inline_array_are_refused_after_the_parse() {
    let limits = Limits {
        peers: 2,
        ..Limits::KERNEL
    };
    let peer = |i: u8| format!("{{ name = \"p{i}\", addresses = [\"10.0.0.{i}\"] }}");
    let text = format!(
        "[tunnel]\ninterface = \"wg0\"\npeer = [\n  {},\n  {},\n  {},\n]\n{AUDIT}",
        peer(1),
        peer(2),
        peer(3)
    );
    let shown = expect_error_with(&text, limits, "tunnel.peer[2]", 6);
    assert!(shown.contains("more than 2 peers"), "{shown}");
}

#[test]
fn a_file_over_the_size_limit_is_refused_unread() {
    let dir = crate::audit::writer::tests::TempDir::new("config-size");
    let path = dir.0.join("big.toml");
    std::fs::write(&path, "# a comment\n".repeat(100)).expect("writing the file");
    let error = read_bounded(&path, 1000).expect_err("1200 bytes over a limit of 1000");
    assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
    assert!(
        error.to_string().contains("larger than 1000 bytes"),
        "the message names the limit: {error}"
    );
    assert_eq!(
        read_bounded(&path, 1200).map(|text| text.len()).ok(),
        Some(1200),
        "a file of exactly the limit is read"
    );
    // An endless file is refused after the limit, not read to the end.
    let error = read_bounded(Path::new("/dev/zero"), 1 << 16).expect_err("endless");
    assert_eq!(error.kind(), std::io::ErrorKind::FileTooLarge);
    let error = Config::load(Path::new("/dev/zero")).expect_err("endless");
    assert!(
        error.to_string().starts_with("/dev/zero: ")
            && std::error::Error::source(&error)
                .is_some_and(|e| e.to_string().contains(&MAX_FILE_BYTES.to_string())),
        "{error:?}"
    );
}

#[test]
fn more_peers_than_capacity_peers_are_refused() {
    let count = capacity::PEERS as usize;
    let text = peers_text(count + 1);
    expect_error(&text, &format!("tunnel.peer[{count}]"), 3 + 3 * count);
}

#[test]
fn more_peer_prefixes_than_the_maps_hold_are_refused() {
    let limits = Limits {
        peer_prefixes_per_family: 2,
        ..Limits::KERNEL
    };
    let a = "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\", \"fd00::1\", \"fd00::2\"]";
    let b = "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.2\", \"10.0.0.3\"]";
    let shown = expect_error_with(
        &tunnel_with(&[a, b]),
        limits,
        "tunnel.peer[1].addresses[1]",
        8,
    );
    assert!(
        shown.contains("IPv4"),
        "message should name the family: {shown}"
    );
    let c = "[[tunnel.peer]]\nname = \"c\"\naddresses = [\"fd00::3\"]";
    expect_error_with(
        &tunnel_with(&[a, c]),
        limits,
        "tunnel.peer[1].addresses[0]",
        8,
    );
}

#[test]
fn more_ssh_sources_than_the_maps_hold_are_refused() {
    let limits = Limits {
        ssh_allow_per_family: 2,
        ..Limits::KERNEL
    };
    let two_each = edge_with("").replace(
        "[\"192.0.2.10/32\"]",
        "[\"192.0.2.1\", \"2001:db8::1\", \"192.0.2.2\", \"2001:db8::2\"]",
    );
    parse_with(&two_each, Path::new(PATH), limits)
        .expect("two entries per family fit a limit of two");
    let three_v6 = two_each.replace("\"2001:db8::2\"]", "\"2001:db8::2\",\n  \"2001:db8::3\"]");
    let shown = expect_error_with(&three_v6, limits, "edge.ssh_allow[4]", 5);
    assert!(
        shown.contains("IPv6"),
        "message should name the family: {shown}"
    );
}

#[test]
fn empty_lists_are_allowed() {
    let text = edge_with("")
        .replace("[51820]", "[]")
        .replace("[\"192.0.2.10/32\"]", "[]");
    let edge = parse_ok(&text).policy.edge.expect("edge");
    assert!(
        edge.wireguard_ports.is_empty() && edge.ssh_allow.is_empty(),
        "{edge:?}"
    );
    assert_eq!(edge.ssh_port, DEFAULT_SSH_PORT, "ssh_port defaults to 22");
}

#[test]
fn host_bits_are_cleared_and_bare_addresses_are_hosts() {
    let text = edge_with("").replace(
        "[\"192.0.2.10/32\"]",
        "[\"10.0.0.1/8\", \"2001:db8::1/32\", \"192.0.2.10\"]",
    );
    let edge = parse_ok(&text).policy.edge.expect("edge");
    let want: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.10/32"]
        .iter()
        .map(|s| s.parse().expect("test prefix"))
        .collect();
    assert_eq!(edge.ssh_allow, want);
}

#[test]
fn other_bad_values_are_named() {
    expect_error(
        &edge_with("").replace("\"eth0\"", "\"a-name-longer-than-15\""),
        "edge.interface",
        2,
    );
    expect_error(
        &edge_with("").replace("\"eth0\"", "\"\""),
        "edge.interface",
        2,
    );
    let address_name = "[[tunnel.peer]]\nname = \"10.0.0.9\"\naddresses = [\"10.0.0.1\"]";
    expect_error(&tunnel_with(&[address_name]), "tunnel.peer[0].name", 4);
    let no_addresses = "[[tunnel.peer]]\nname = \"a\"\naddresses = []";
    expect_error(&tunnel_with(&[no_addresses]), "tunnel.peer[0].addresses", 5);
    let bad_key =
        "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\npublic_key = \"short\"";
    expect_error(&tunnel_with(&[bad_key]), "tunnel.peer[0].public_key", 6);
}

#[test]
fn toml_syntax_errors_have_a_line() {
    // Inside a value: attributed to the key.
    expect_error(&edge_with("ssh_port = twenty-two"), "edge.ssh_port", 5);
    // Between keys: only a position.
    let error = parse(&edge_with("[edge")).expect_err("unclosed table header");
    let shown = error.to_string();
    assert!(
        matches!(error, ConfigError::Syntax { line: 5, .. })
            && shown.starts_with(&format!("{PATH}:5:")),
        "expected a syntax error at line 5, got {shown:?}"
    );
    let duplicate = parse(&edge_with("interface = \"eth1\"")).expect_err("duplicate key");
    assert!(
        duplicate.to_string().starts_with(&format!("{PATH}:5:")),
        "{duplicate}"
    );
}

#[test]
fn unreadable_files_name_the_path() {
    let path = Path::new("/nonexistent/ztxdp.toml");
    let error = Config::load(path).expect_err("the file does not exist");
    assert!(
        matches!(&error, ConfigError::Read { path: p, .. } if p == path)
            && error.to_string().contains("/nonexistent/ztxdp.toml"),
        "{error:?}"
    );
}

const FULL: &str = r#"
[edge]
interface = "eth0"
wireguard_ports = [51820, 51821]
ssh_port = 2222
ssh_allow = ["192.0.2.10/32", "2001:db8:1::/64"]

[tunnel]
interface = "wg0"
runtime_grants = "/run/grants.json"

[[tunnel.peer]]
name = "app-1"
addresses = ["10.100.0.1/32", "fd00:100::1/128"]
public_key = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
allow = ["tcp/5432", "udp/53", "tcp/8000-8100", "icmp"]

[[tunnel.peer]]
name = "db"
addresses = ["10.100.1.0/24"]

[audit]
path = "/var/log/ztxdp/audit.jsonl"
"#;

#[test]
fn a_full_config_round_trips() {
    let config = parse_ok(FULL);
    let net = |s: &str| -> IpNet { s.parse().expect("test prefix") };
    let want = Policy {
        edge: Some(EdgePolicy {
            interface: "eth0".into(),
            wireguard_ports: vec![51820, 51821],
            ssh_port: 2222,
            ssh_allow: vec![net("192.0.2.10/32"), net("2001:db8:1::/64")],
            services: Vec::new(),
            icmp_echo: EchoRate::default(),
            mode: crate::policy::Mode::Enforce,
        }),
        tunnel: Some(TunnelPolicy {
            interface: "wg0".into(),
            peers: vec![
                Peer {
                    name: "app-1".into(),
                    addresses: vec![net("10.100.0.1/32"), net("fd00:100::1/128")],
                    public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
                    grants: vec![
                        Grant::Ports {
                            protocol: Protocol::Tcp,
                            first: 5432,
                            last: 5432,
                        },
                        Grant::Ports {
                            protocol: Protocol::Udp,
                            first: 53,
                            last: 53,
                        },
                        Grant::Ports {
                            protocol: Protocol::Tcp,
                            first: 8000,
                            last: 8100,
                        },
                        Grant::Icmp,
                    ],
                    mode: crate::policy::Mode::Enforce,
                },
                Peer {
                    name: "db".into(),
                    addresses: vec![net("10.100.1.0/24")],
                    public_key: None,
                    grants: vec![],
                    mode: crate::policy::Mode::Enforce,
                },
            ],
            groups: Vec::new(),
            runtime_grants: PathBuf::from("/run/grants.json"),
            link_local_neighbors: false,
            mode: crate::policy::Mode::Enforce,
        }),
        flows: FlowSettings::default(),
        audit: AuditSettings::new(PathBuf::from("/var/log/ztxdp/audit.jsonl")),
        metrics: None,
        drift_check_interval: Policy::DEFAULT_DRIFT_CHECK_INTERVAL,
    };
    assert_eq!(config.policy, want);
    assert_eq!(config.path, Path::new(PATH));
    // Lines of keys, for callers that report their own errors.
    assert_eq!(config.line_of("edge"), Some(2));
    assert_eq!(config.line_of("edge.ssh_allow[1]"), Some(6));
    assert_eq!(config.line_of("tunnel.peer[1]"), Some(18));
    assert_eq!(config.line_of("tunnel.peer[0].allow[3]"), Some(16));
    assert_eq!(config.line_of("tunnel.peer[1].allow"), None);
    let shown = config
        .invalid("tunnel.peer[1].allow", "no grants")
        .to_string();
    assert_eq!(shown, format!("{PATH}:18: tunnel.peer[1].allow: no grants"));
    // Grants print in the form they were written.
    let grants = &config.policy.tunnel.as_ref().expect("tunnel").peers[0].grants;
    let printed: Vec<String> = grants.iter().map(ToString::to_string).collect();
    assert_eq!(printed, ["tcp/5432", "udp/53", "tcp/8000-8100", "icmp"]);
}

/// `edge_with("")` followed by a `[flows]` table whose first key is on line 9.
fn flows_with(body: &str) -> String {
    format!("{}[flows]\n{body}\n", edge_with(""))
}

#[test]
fn echo_rate_and_flows_default() {
    let config = parse_ok(&edge_with(""));
    let edge = config.policy.edge.expect("edge");
    assert_eq!(
        edge.icmp_echo,
        EchoRate {
            ns_per_token: 1_000_000_000,
            burst: 5
        },
        "\"1/s\" with a burst of 5"
    );
    assert_eq!(config.policy.flows, FlowSettings::default());
    assert_eq!(
        FlowSettings::default(),
        FlowSettings {
            max_entries: 65_536,
            tcp_established: Duration::from_hours(2),
            tcp_closing: Duration::from_secs(30),
            udp: Duration::from_mins(1),
            icmp: Duration::from_secs(30),
            fragment: Duration::from_secs(30),
        }
    );
    // An empty table is all defaults too.
    let empty = parse_ok(&flows_with(""));
    assert_eq!(empty.policy.flows, FlowSettings::default());
}

#[test]
fn echo_rates_parse() {
    let echo = |extra: &str| {
        parse_ok(&edge_with(extra))
            .policy
            .edge
            .expect("edge")
            .icmp_echo
    };
    let ns = |rate: &str| echo(&format!("icmp_echo_rate = \"{rate}\"")).ns_per_token;
    assert_eq!(ns("1/s"), 1_000_000_000);
    assert_eq!(ns("4/s"), 250_000_000);
    assert_eq!(ns("3/s"), 333_333_333, "whole nanoseconds, rounded down");
    assert_eq!(ns("30/m"), 2_000_000_000);
    assert_eq!(ns("2/h"), 1_800_000_000_000);
    assert_eq!(ns(" 10 / s "), 100_000_000, "spaces around the parts");
    assert_eq!(ns("1000000000/s"), 1, "the fastest rate");
    assert_eq!(ns("0"), 0, "\"0\" drops every echo request");
    assert_eq!(ns("0/m"), 0, "zero per anything is zero");
    let both = echo("icmp_echo_rate = \"0\"\nicmp_echo_burst = 9");
    assert_eq!(both.burst, 9, "the burst is kept when the rate is 0");
    let burst = echo("icmp_echo_burst = 1");
    assert_eq!(
        burst,
        EchoRate {
            ns_per_token: 1_000_000_000,
            burst: 1
        }
    );
}

#[test]
fn bad_echo_rates_are_named() {
    for rate in [
        "fast",
        "1",
        "1/d",
        "1/sec",
        "/s",
        "-1/s",
        "+1/s",
        "1.5/s",
        "",
        "1000000001/s",
        "99999999999999999999999/s",
    ] {
        let shown = expect_error(
            &edge_with(&format!("icmp_echo_rate = \"{rate}\"")),
            "edge.icmp_echo_rate",
            5,
        );
        assert!(
            shown.contains(&format!("\"{rate}\"")) && shown.contains("N/s"),
            "message should quote the value and show the forms: {shown}"
        );
    }
    expect_error(&edge_with("icmp_echo_rate = 0"), "edge.icmp_echo_rate", 5);
    for burst in ["0", "-1"] {
        let shown = expect_error(
            &edge_with(&format!("icmp_echo_burst = {burst}")),
            "edge.icmp_echo_burst",
            5,
        );
        assert!(
            shown.contains(burst),
            "message should quote the value: {shown}"
        );
    }
    expect_error(
        &edge_with("icmp_echo_burst = \"5\""),
        "edge.icmp_echo_burst",
        5,
    );
}

#[test]
fn flows_parse() {
    let config = parse_ok(&flows_with(
        "max_entries = 1024\ntcp_established_timeout = 3600\ntcp_closing_timeout = 10\nudp_timeout = 2\nicmp_timeout = 5\nfragment_timeout = 3",
    ));
    assert_eq!(
        config.policy.flows,
        FlowSettings {
            max_entries: 1024,
            tcp_established: Duration::from_hours(1),
            tcp_closing: Duration::from_secs(10),
            udp: Duration::from_secs(2),
            icmp: Duration::from_secs(5),
            fragment: Duration::from_secs(3),
        }
    );
    assert_eq!(config.line_of("flows.udp_timeout"), Some(12));
    let largest = parse_ok(&flows_with("max_entries = 16777216"));
    assert_eq!(largest.policy.flows.max_entries, 16_777_216);
    // Only some keys: the others keep their defaults.
    let some = parse_ok(&flows_with("udp_timeout = 2"));
    assert_eq!(
        some.policy.flows,
        FlowSettings {
            udp: Duration::from_secs(2),
            ..FlowSettings::default()
        }
    );
    // The table applies without an edge, too.
    let tunnel_only = format!(
        "{}[flows]\nicmp_timeout = 7\n",
        tunnel_with(&["[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]"])
    );
    assert_eq!(
        parse_ok(&tunnel_only).policy.flows.icmp,
        Duration::from_secs(7)
    );
}

#[test]
fn bad_flow_settings_are_named() {
    for n in ["1023", "16777217", "0", "-5", "99999999999999"] {
        let shown = expect_error(
            &flows_with(&format!("max_entries = {n}")),
            "flows.max_entries",
            9,
        );
        assert!(
            shown.contains(n) && shown.contains("1024") && shown.contains("16777216"),
            "message should quote the value and the bounds: {shown}"
        );
    }
    for key in [
        "tcp_established_timeout",
        "tcp_closing_timeout",
        "udp_timeout",
        "icmp_timeout",
        "fragment_timeout",
    ] {
        for value in ["0", "-1"] {
            let shown = expect_error(
                &flows_with(&format!("{key} = {value}")),
                &format!("flows.{key}"),
                9,
            );
            assert!(
                shown.contains("seconds"),
                "message should say the unit: {shown}"
            );
        }
        expect_error(
            &flows_with(&format!("{key} = \"30s\"")),
            &format!("flows.{key}"),
            9,
        );
    }
    let shown = expect_error(
        &flows_with("fragment_timeout = 121"),
        "flows.fragment_timeout",
        9,
    );
    assert!(
        shown.contains("121") && shown.contains("1 to 120 seconds"),
        "message should quote the value and the bounds: {shown}"
    );
    assert_eq!(
        parse_ok(&flows_with("fragment_timeout = 120"))
            .policy
            .flows
            .fragment,
        Duration::from_mins(2)
    );
    expect_error(&flows_with("tcp_timeout = 5"), "flows.tcp_timeout", 9);
    expect_error(&format!("flows = 5\n{}", edge_with("")), "flows", 1);
}

#[test]
fn defaults_apply() {
    let config = parse_ok(&tunnel_with(&[
        "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
    ]));
    let tunnel = config.policy.tunnel.expect("tunnel");
    assert_eq!(tunnel.runtime_grants, Path::new(DEFAULT_RUNTIME_GRANTS));
    assert_eq!(tunnel.peers[0].grants, []);
    assert_eq!(tunnel.peers[0].public_key, None);
    assert_eq!(config.policy.edge, None);
}

#[test]
fn the_drift_check_interval_defaults_and_bad_values_are_named() {
    assert_eq!(
        parse_ok(&edge_with("")).policy.drift_check_interval,
        Duration::from_mins(1)
    );
    for (value, want) in [("0", Duration::ZERO), ("5", Duration::from_secs(5))] {
        let text = format!("drift_check_interval = {value}\n{}", edge_with(""));
        assert_eq!(parse_ok(&text).policy.drift_check_interval, want, "{text}");
    }
    let shown = expect_error(
        &format!("drift_check_interval = -1\n{}", edge_with("")),
        "drift_check_interval",
        1,
    );
    assert!(shown.contains("0 to turn the check off"), "{shown}");
    expect_error(
        &format!("\ndrift_check_interval = \"1m\"\n{}", edge_with("")),
        "drift_check_interval",
        2,
    );
}

#[test]
fn config_grants_parse() {
    let ports = |protocol, first, last| Grant::Ports {
        protocol,
        first,
        last,
    };
    assert_eq!(
        parse_grant("tcp/5432"),
        Ok(ports(Protocol::Tcp, 5432, 5432))
    );
    assert_eq!(parse_grant("udp/53"), Ok(ports(Protocol::Udp, 53, 53)));
    assert_eq!(
        parse_grant("tcp/8000-8100"),
        Ok(ports(Protocol::Tcp, 8000, 8100))
    );
    assert_eq!(
        parse_grant("TCP/1-65535"),
        Ok(ports(Protocol::Tcp, 1, 65535))
    );
    assert_eq!(parse_grant("icmp"), Ok(Grant::Icmp));
    assert_eq!(parse_grant("tcp/0"), Err(GrantError::PortZero));
    assert_eq!(parse_grant("tcp/10-0"), Err(GrantError::PortZero));
    assert_eq!(
        parse_grant("udp/9-8"),
        Err(GrantError::RangeReversed { first: 9, last: 8 })
    );
    assert_eq!(
        parse_grant("sctp/5"),
        Err(GrantError::UnknownProtocol {
            protocol: "sctp".into()
        })
    );
    assert_eq!(
        parse_grant("tcp/65536"),
        Err(GrantError::BadPort {
            text: "65536".into()
        })
    );
    assert_eq!(
        parse_grant("tcp/+5"),
        Err(GrantError::BadPort { text: "+5".into() })
    );
    assert_eq!(
        parse_grant("tcp/"),
        Err(GrantError::BadPort {
            text: String::new()
        })
    );
    assert_eq!(
        parse_grant("tcp/1-"),
        Err(GrantError::BadPort {
            text: String::new()
        })
    );
    // The CLI form is not the config form.
    assert!(
        matches!(parse_grant("5432"), Err(GrantError::Form { .. })),
        "{:?}",
        parse_grant("5432")
    );
    assert!(matches!(
        parse_grant("5432/tcp"),
        Err(GrantError::UnknownProtocol { .. })
    ));
    assert!(matches!(
        parse_grant("icmp/8"),
        Err(GrantError::Form { .. })
    ));
}

#[test]
fn cli_grants_parse() {
    let ports = |protocol, first, last| Grant::Ports {
        protocol,
        first,
        last,
    };
    assert_eq!(
        parse_cli_grant("5432"),
        Ok(ports(Protocol::Tcp, 5432, 5432))
    );
    assert_eq!(
        parse_cli_grant("5432/tcp"),
        Ok(ports(Protocol::Tcp, 5432, 5432))
    );
    assert_eq!(parse_cli_grant("53/udp"), Ok(ports(Protocol::Udp, 53, 53)));
    assert_eq!(
        parse_cli_grant("8000-8100/tcp"),
        Ok(ports(Protocol::Tcp, 8000, 8100))
    );
    assert_eq!(
        parse_cli_grant("8000-8100"),
        Ok(ports(Protocol::Tcp, 8000, 8100))
    );
    assert_eq!(parse_cli_grant("icmp"), Ok(Grant::Icmp));
    assert_eq!(parse_cli_grant("0"), Err(GrantError::PortZero));
    assert_eq!(parse_cli_grant("0/udp"), Err(GrantError::PortZero));
    assert_eq!(
        parse_cli_grant("100-99"),
        Err(GrantError::RangeReversed {
            first: 100,
            last: 99
        })
    );
    assert_eq!(
        parse_cli_grant("53/gre"),
        Err(GrantError::UnknownProtocol {
            protocol: "gre".into()
        })
    );
    assert_eq!(
        parse_cli_grant("http"),
        Err(GrantError::BadPort {
            text: "http".into()
        })
    );
    assert_eq!(
        parse_cli_grant("70000/udp"),
        Err(GrantError::BadPort {
            text: "70000".into()
        })
    );
    assert!(matches!(
        parse_cli_grant("8/icmp"),
        Err(GrantError::Form { .. })
    ));
    assert_eq!(
        parse_cli_grant("tcp/22"),
        Err(GrantError::UnknownProtocol {
            protocol: "22".into()
        })
    );
}

#[test]
fn grants_print_in_config_form_and_parse_back() {
    for text in ["tcp/22", "udp/53", "tcp/8000-8100", "udp/1-65535", "icmp"] {
        let grant = parse_grant(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(grant.to_string(), text);
    }
}

#[test]
fn interfaces_are_checked_in_this_namespace() {
    // Read-only lookups: nothing is attached to anything.
    let ok = parse_ok(&edge_with("").replace("\"eth0\"", "\"lo\""));
    ok.check_interfaces()
        .unwrap_or_else(|e| panic!("lo exists in every namespace: {e}"));
    let missing = parse_ok(&edge_with("").replace("\"eth0\"", "\"ztxdp-none9\""));
    let shown = missing
        .check_interfaces()
        .expect_err("no such interface")
        .to_string();
    assert_eq!(
        shown,
        format!("{PATH}:2: edge.interface: no interface \"ztxdp-none9\" in this network namespace")
    );
    let tunnel = parse_ok(&tunnel_with(&[]).replace("\"wg0\"", "\"ztxdp-none8\""));
    let shown = tunnel
        .check_interfaces()
        .expect_err("no such interface")
        .to_string();
    assert!(
        shown.starts_with(&format!("{PATH}:2: tunnel.interface: ")),
        "{shown}"
    );
}

#[test]
fn the_examples_parse() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let lab = Config::load(&examples.join("lab.toml")).unwrap_or_else(|e| panic!("{e}"));
    let edge = lab.policy.edge.as_ref().expect("the lab has an edge");
    assert_eq!(
        (
            edge.interface.as_str(),
            edge.wireguard_ports.as_slice(),
            edge.ssh_port
        ),
        ("eth0", &[51820][..], 22)
    );
    let lab_sources = [
        IpNet::from(IpAddr::from(Ipv4Addr::new(10, 77, 0, 2))),
        IpNet::from(IpAddr::from(
            "fd77::2".parse::<Ipv6Addr>().expect("address"),
        )),
    ];
    assert_eq!(edge.ssh_allow, lab_sources);
    assert_eq!(
        lab.policy.audit.path,
        Path::new("/tmp/ztxdp-lab/audit.jsonl")
    );

    let production = Config::load(&examples.join("ztxdp.toml")).unwrap_or_else(|e| panic!("{e}"));
    let tunnel = production
        .policy
        .tunnel
        .as_ref()
        .expect("the production example has a tunnel");
    assert_eq!(tunnel.peers.len(), 2);
    assert!(
        production.policy.edge.is_some(),
        "the production example has an edge"
    );
    assert_eq!(
        production.policy.flows,
        FlowSettings::default(),
        "the production example shows the defaults"
    );
    assert_eq!(
        production.policy.edge.as_ref().map(|e| e.icmp_echo),
        Some(EchoRate::default()),
        "the production example shows the default echo rate"
    );
    for key in [
        "edge.ssh_port",
        "edge.icmp_echo_rate",
        "edge.icmp_echo_burst",
        "flows.max_entries",
        "flows.tcp_established_timeout",
        "flows.tcp_closing_timeout",
        "flows.udp_timeout",
        "flows.icmp_timeout",
        "tunnel.runtime_grants",
        "tunnel.peer[0].public_key",
        "tunnel.peer[1].allow",
    ] {
        assert!(
            production.line_of(key).is_some(),
            "the production example should show {key}"
        );
    }
}

#[test]
fn audit_keys_parse_with_defaults() {
    let plain = parse_ok(&edge_with("")).policy.audit;
    assert_eq!(plain, AuditSettings::new(PathBuf::from("/tmp/audit.jsonl")));
    assert_eq!(
        (
            plain.format,
            plain.rotate_bytes,
            plain.keep,
            plain.fsync,
            plain.syslog
        ),
        (
            AuditFormat::Ecs,
            100 << 20,
            10,
            Duration::from_millis(100),
            None
        )
    );
    // The [audit] table is last in `edge_with`, so these lines extend it.
    let full = parse_ok(&format!(
        "{}format = \"ocsf\"\nrotate_bytes = 65536\nkeep = 3\nfsync_ms = 0\n\
         [audit.syslog]\naddress = \"127.0.0.1:6514\"\nqueue = 50\n",
        edge_with("")
    ))
    .policy
    .audit;
    assert_eq!(
        (full.format, full.rotate_bytes, full.keep, full.fsync),
        (AuditFormat::Ocsf, 65536, 3, Duration::ZERO)
    );
    assert_eq!(
        full.syslog,
        Some(SyslogSettings {
            address: "127.0.0.1:6514".into(),
            queue: 50,
            tls: None,
        })
    );
    let ipv6 = parse_ok(&format!(
        "{}[audit.syslog]\naddress = \"[::1]:514\"\n",
        edge_with("")
    ));
    let syslog = ipv6.policy.audit.syslog.expect("syslog");
    assert_eq!(syslog.queue, SyslogSettings::DEFAULT_QUEUE);
    let never = parse_ok(&format!("{}rotate_bytes = 0\n", edge_with("")));
    assert_eq!(never.policy.audit.rotate_bytes, 0, "0 never rotates");
    assert_eq!(
        plain.state,
        PathBuf::from("/var/lib/ztxdp/audit.state"),
        "the documented default"
    );
    let state = parse_ok(&format!("{}state = \"/srv/audit.state\"\n", edge_with("")));
    assert_eq!(state.policy.audit.state, PathBuf::from("/srv/audit.state"));
    let metrics = parse_ok(&format!(
        "{}[metrics]\nlisten = \"127.0.0.1:9542\"\n",
        edge_with("")
    ));
    assert_eq!(
        metrics.policy.metrics.map(|m| m.listen.to_string()),
        Some("127.0.0.1:9542".to_owned())
    );
    assert_eq!(
        parse_ok(&edge_with("")).policy.metrics,
        None,
        "no listener unless it is set"
    );
}

#[test]
fn the_socket_group_is_a_group_of_this_host() {
    let audit = |extra: &str| format!("{}{extra}\n", edge_with(""));
    let root = parse_ok(&audit("socket_group = \"root\""));
    assert_eq!(
        root.policy.audit.socket_group,
        Some(SocketGroup {
            name: "root".into(),
            gid: 0
        })
    );
    assert_eq!(parse_ok(&audit("")).policy.audit.socket_group, None);
    let shown = expect_error(
        &audit("socket_group = \"no-such-group-zt\""),
        "audit.socket_group",
        8,
    );
    assert!(shown.contains("no group"), "{shown}");
}

#[test]
fn modes_default_to_enforce_and_a_peer_may_differ() {
    let c = parse_ok(&tunnel_with(&[
        "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
    ]));
    let t = c.policy.tunnel.expect("tunnel");
    assert_eq!((t.mode, t.peers[0].mode), (Mode::Enforce, Mode::Enforce));
    let text = format!(
        "mode = \"audit\"\n{}",
        tunnel_with(&[
            "[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]",
            "[[tunnel.peer]]\nname = \"b\"\naddresses = [\"10.0.0.2\"]\nmode = \"enforce\"",
        ])
    );
    let mut p = parse_ok(&text).policy;
    let t = p.tunnel.as_ref().expect("tunnel");
    assert_eq!(
        (t.mode, t.peers[0].mode, t.peers[1].mode),
        (Mode::Audit, Mode::Audit, Mode::Enforce)
    );
    let edge = parse_ok(&format!("mode = \"audit\"\n{}", edge_with("")));
    assert_eq!(edge.policy.edge.map(|e| e.mode), Some(Mode::Audit));
    // `up --dry-run`: every program and peer audits.
    p.dry_run();
    let t = p.tunnel.as_ref().expect("tunnel");
    assert!(t.peers.iter().all(|peer| peer.mode == Mode::Audit));
}

#[test]
fn bad_modes_are_named() {
    let shown = expect_error(&format!("mode = \"dry\"\n{}", edge_with("")), "mode", 1);
    assert!(shown.contains("\"enforce\" or \"audit\""), "{shown}");
    let text =
        tunnel_with(&["[[tunnel.peer]]\nname = \"a\"\naddresses = [\"10.0.0.1\"]\nmode = \"log\""]);
    let line = text
        .lines()
        .position(|l| l.starts_with("mode ="))
        .expect("mode line")
        + 1;
    expect_error(&text, "tunnel.peer[0].mode", line);
    expect_error(&format!("mode = 1\n{}", edge_with("")), "mode", 1);
}

#[test]
fn bad_audit_keys_are_named() {
    let audit = |extra: &str| format!("{}{extra}\n", edge_with(""));
    let shown = expect_error(&audit("format = \"cef\""), "audit.format", 8);
    assert!(
        shown.contains("ecs"),
        "message says what is allowed: {shown}"
    );
    expect_error(&audit("rotate_bytes = 100"), "audit.rotate_bytes", 8);
    expect_error(&audit("rotate_bytes = -1"), "audit.rotate_bytes", 8);
    expect_error(&audit("keep = 1001"), "audit.keep", 8);
    expect_error(&audit("keep = 0"), "audit.keep", 8);
    expect_error(&audit("fsync_ms = 60001"), "audit.fsync_ms", 8);
    expect_error(&audit("fsync = 5"), "audit.fsync", 8);
    for bad in ["localhost:9542", "127.0.0.1", "[::1]"] {
        let shown = expect_error(
            &audit(&format!("[metrics]\nlisten = \"{bad}\"")),
            "metrics.listen",
            9,
        );
        assert!(shown.contains("IP:PORT"), "{shown}");
    }
    for bad in ["\"/tmp/audit.jsonl\"", "\"/tmp/audit.jsonl.state\"", "\"\""] {
        let shown = expect_error(&audit(&format!("state = {bad}")), "audit.state", 8);
        assert!(shown.contains("apart from the audit trail"), "{shown}");
    }
    expect_error(
        &audit("[audit.syslog]\nqueue = 5"),
        "audit.syslog.address",
        8,
    );
    for bad in [
        "127.0.0.1",
        "127.0.0.1:0",
        ":6514",
        "host:port",
        "127.0.0.1:70000",
    ] {
        expect_error(
            &audit(&format!("[audit.syslog]\naddress = \"{bad}\"")),
            "audit.syslog.address",
            9,
        );
    }
    expect_error(
        &audit("[audit.syslog]\naddress = \"127.0.0.1:6514\"\nqueue = 0"),
        "audit.syslog.queue",
        10,
    );
}
