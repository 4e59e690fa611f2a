//! What an audit record says, independent of the field names it is written
//! with ([`super::format`]). The daemon builds these from kernel events and
//! counters; `ztxdp events` gets them over the events socket or parses them
//! back from the file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use zt_common::{
    EVENT_WOULD_DROP, Event, FlowSummary, NO_PEER, SummaryKey, program, proto, reason,
};

use super::{Clock, Names};

/// The program that made a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Program {
    Edge,
    Tunnel,
}

impl Program {
    /// From a kernel program id ([`zt_common::program`]).
    #[must_use]
    pub fn from_id(id: u32) -> Self {
        if id == program::TUNNEL {
            Self::Tunnel
        } else {
            Self::Edge
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Edge => "edge",
            Self::Tunnel => "tunnel",
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "edge" => Some(Self::Edge),
            "tunnel" => Some(Self::Tunnel),
            _ => None,
        }
    }
}

/// A tunnel peer as the configuration names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub name: String,
    pub public_key: Option<String>,
    /// For a decision a grant passed: the peer's groups that grant it
    /// (`[[tunnel.group]]`), when the record was written. Empty for every
    /// other decision, and when the grant is the peer's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// The IP part of a decision. Ports are present for TCP and UDP only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpFlow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// TCP flags byte, for TCP decisions.
    pub tcp_flags: Option<u8>,
}

/// One decision's subject: where it was made, why, and about which packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    pub program: Program,
    /// Interface the packet arrived on.
    pub interface: String,
    /// Reason code ([`zt_common::reason`]); decides allow or deny.
    pub reason: u32,
    /// `None` for a non-IP frame (ARP).
    pub ip: Option<IpFlow>,
    pub peer: Option<Peer>,
    /// On the edge, the service a service's decision names
    /// (`ztxdp.service.name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The policy denied it (`reason` is a drop reason), but the packet
    /// passed: its program or peer runs in audit mode. A would-deny.
    #[serde(default)]
    pub would_drop: bool,
}

impl Flow {
    /// Whether the policy allows it (a would-deny is not allowed by it).
    #[must_use]
    pub const fn allowed(&self) -> bool {
        reason::is_allow(self.reason)
    }

    /// `"allow"`, `"deny"` or `"would_deny"`.
    #[must_use]
    pub const fn action(&self) -> &'static str {
        if self.would_drop {
            "would_deny"
        } else if self.allowed() {
            "allow"
        } else {
            "deny"
        }
    }

    /// Whether the packet passed: allowed, or a would-deny.
    #[must_use]
    pub const fn passed(&self) -> bool {
        self.would_drop || self.allowed()
    }
}

/// What a record reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Body {
    /// One decision the kernel sent, carrying `suppressed` earlier decisions
    /// of the same flow that it summarised instead of sending.
    Decision { flow: Flow, suppressed: u64 },
    /// Decisions of a flow summarised in a window that ended without a new
    /// event to carry them, swept from the kernel's summary table.
    Summary {
        flow: Flow,
        count: u64,
        /// Window start and end, nanoseconds since the Unix epoch.
        start_ns: i64,
        end_ns: i64,
    },
    /// Decisions that have no record of their own: held back by the per-CPU
    /// deny rate limit, lost because the ring buffer was full, or whose
    /// records were never written: the file refused them (a full disk, a
    /// write error), or a daemon took them from the kernel and was killed
    /// before it wrote them.
    Lost {
        program: Program,
        /// The interface the program runs on.
        interface: String,
        rate_limited: u64,
        ring_full: u64,
        /// Decisions whose records were never written: counted while the
        /// file refused writes and written here once it took them again;
        /// or, in a record of a previous run ([`Record::previous_run`]),
        /// read from the kernel by a daemon killed before it wrote them.
        unwritten: u64,
    },
    /// Records that could not be forwarded to the syslog collector (they are
    /// in the file).
    SyslogDropped { address: String, dropped: u64 },
    /// The trail goes on after records that are not in this file: the file
    /// was deleted, replaced or cut while the daemon wrote it, or was missing
    /// records when the daemon started. `previous_seq` and `previous_head`
    /// are the last record written before (the head persisted in
    /// `audit.state` at a start); this record's chain links from that head.
    Gap {
        previous_seq: u64,
        previous_head: String,
        reason: GapReason,
    },
    /// What the kernel runs differs from the policy the daemon enforces,
    /// differs in another way, or no longer differs (see
    /// [`crate::drift`]). Written when that changes, not at every check.
    Drift {
        /// SHA-256 of the config the kernel was compared with.
        config_sha256: String,
        /// How many differences there are; 0 when back in sync.
        differences: u64,
        /// The first of them, as `ztxdp check --live` prints them.
        summary: Vec<String>,
    },
    /// A policy change made with `--confirm`, its confirmation, or its
    /// rollback (see [`crate::confirm`]).
    Change {
        stage: ChangeStage,
        /// `up` or `reload`.
        command: String,
        /// The config of the change, and the SHA-256 of its text.
        config: String,
        config_sha256: String,
        /// The SHA-256 of the policy the change replaced, which a rollback
        /// restores; `None` when there was none (a rollback detaches).
        previous_sha256: Option<String>,
        /// When it rolls back unless confirmed, nanoseconds since the Unix
        /// epoch.
        deadline_ns: i64,
        /// Who wrote the record: `daemon`, `watchdog` or `confirm` (the
        /// command, when no daemon ran).
        by: String,
    },
}

/// The steps of a [`Body::Change`], each a record of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeStage {
    /// The new policy is applied and awaits `ztxdp confirm`.
    Change,
    /// `ztxdp confirm` kept it.
    Confirm,
    /// It was not confirmed in time: the previous policy is back.
    Rollback,
}

impl ChangeStage {
    /// The name records carry (`event.action` in ECS).
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Change => "change",
            Self::Confirm => "confirm",
            Self::Rollback => "rollback",
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Change, Self::Confirm, Self::Rollback]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

/// Why the trail has a [`Body::Gap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GapReason {
    /// The file the daemon wrote was removed (or renamed away) from
    /// `audit.path`.
    Unlinked,
    /// Another file took the place of the one the daemon wrote.
    Replaced,
    /// The file became shorter than what the daemon had written.
    Truncated,
    /// At a start, the trail ended before the head persisted in
    /// `audit.state`: it was deleted, replaced or cut while no daemon ran.
    BehindState,
}

impl GapReason {
    /// The name records carry.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unlinked => "unlinked",
            Self::Replaced => "replaced",
            Self::Truncated => "truncated",
            Self::BehindState => "behind_state",
        }
    }

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Unlinked,
            Self::Replaced,
            Self::Truncated,
            Self::BehindState,
        ]
        .into_iter()
        .find(|r| r.name() == name)
    }

    /// What happened, for a reader.
    #[must_use]
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::Unlinked => "the audit file was deleted or renamed while ztxdp wrote it",
            Self::Replaced => "another file replaced the audit file while ztxdp wrote it",
            Self::Truncated => "the audit file was cut shorter while ztxdp wrote it",
            Self::BehindState => {
                "the trail ended before the head persisted in audit.state when ztxdp started"
            }
        }
    }
}

impl Body {
    /// How many kernel decisions this record accounts for: summing this over
    /// a complete trail gives the audited decisions of the programs.
    #[must_use]
    pub const fn decisions(&self) -> Option<u64> {
        match self {
            // Saturating: a record parsed from a hostile file may carry any
            // numbers.
            Self::Decision { suppressed, .. } => Some(suppressed.saturating_add(1)),
            Self::Summary { count, .. } => Some(*count),
            Self::Lost {
                rate_limited,
                ring_full,
                unwritten,
                ..
            } => Some(
                rate_limited
                    .saturating_add(*ring_full)
                    .saturating_add(*unwritten),
            ),
            Self::SyslogDropped { .. }
            | Self::Gap { .. }
            | Self::Drift { .. }
            | Self::Change { .. } => None,
        }
    }

    /// The program whose decisions this record stands for.
    #[must_use]
    pub const fn program(&self) -> Option<Program> {
        match self {
            Self::Decision { flow, .. } | Self::Summary { flow, .. } => Some(flow.program),
            Self::Lost { program, .. } => Some(*program),
            Self::SyslogDropped { .. }
            | Self::Gap { .. }
            | Self::Drift { .. }
            | Self::Change { .. } => None,
        }
    }

    /// Short name of the record kind: `decision`, `summary`, `lost`,
    /// `syslog_dropped`, `gap`, `drift`, and a change's `change`,
    /// `confirm` or `rollback`.
    #[must_use]
    pub const fn kind(&self) -> &'static str {
        match self {
            Self::Decision { .. } => "decision",
            Self::Summary { .. } => "summary",
            Self::Lost { .. } => "lost",
            Self::SyslogDropped { .. } => "syslog_dropped",
            Self::Gap { .. } => "gap",
            Self::Drift { .. } => "drift",
            Self::Change { stage, .. } => stage.name(),
        }
    }
}

/// One audit record. `seq` is given by the writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    /// Nanoseconds since the Unix epoch.
    pub time_ns: i64,
    pub body: Body,
    /// Written by a new `ztxdp up` for the programs it replaced, from what
    /// their daemon left in the kernel: the decision belongs to the earlier
    /// run.
    #[serde(default)]
    pub previous_run: bool,
}

/// Wall-clock now, nanoseconds since the Unix epoch.
#[must_use]
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

fn ip(version: u8, bytes: &[u8; 16]) -> Option<IpAddr> {
    match version {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(*bytes))),
        _ => None,
    }
}

/// The flow fields the kernel sends, in whichever struct carries them.
struct Wire<'a> {
    program: u32,
    ifindex: Option<u32>,
    reason: u32,
    ip_version: u8,
    src: &'a [u8; 16],
    dst: &'a [u8; 16],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    tcp_flags: Option<u8>,
    peer: u32,
    /// `EVENT_*` bits.
    flags: u8,
}

fn flow(w: &Wire<'_>, names: &Names) -> Flow {
    let program = Program::from_id(w.program);
    let interface = match w.ifindex {
        Some(i) => names
            .interfaces
            .get(&i)
            .cloned()
            .unwrap_or_else(|| i.to_string()),
        // A summary key has no ifindex; each program runs on one interface.
        None => names.programs.get(&program).cloned().unwrap_or_default(),
    };
    let ip = match (ip(w.ip_version, w.src), ip(w.ip_version, w.dst)) {
        (Some(src), Some(dst)) => {
            let ports = matches!(w.protocol, proto::TCP | proto::UDP);
            Some(IpFlow {
                src,
                dst,
                protocol: w.protocol,
                src_port: ports.then_some(w.src_port),
                dst_port: ports.then_some(w.dst_port),
                tcp_flags: w.tcp_flags.filter(|_| w.protocol == proto::TCP),
            })
        }
        _ => None,
    };
    let peer = (w.peer != NO_PEER).then(|| {
        let index = usize::try_from(w.peer).ok();
        let groups = match (index, w.reason) {
            (Some(i), reason::PASS_GRANT) => names.groups.granting(i, w.protocol, Some(w.dst_port)),
            (Some(i), reason::PASS_ICMP_GRANT) => names.groups.granting(i, w.protocol, None),
            _ => Vec::new(),
        };
        index.and_then(|i| names.peers.get(i)).map_or_else(
            || Peer {
                name: format!("#{}", w.peer),
                public_key: None,
                groups: Vec::new(),
            },
            |(name, key)| Peer {
                name: name.clone(),
                public_key: key.clone(),
                groups,
            },
        )
    });
    let service = match (&ip, &names.services) {
        (Some(ip), Some(services)) if program == Program::Edge => {
            services.of(w.reason, ip.protocol, w.dst_port, ip.src)
        }
        _ => None,
    };
    Flow {
        program,
        interface,
        reason: w.reason,
        ip,
        peer,
        service,
        would_drop: w.flags & EVENT_WOULD_DROP != 0,
    }
}

/// A decision event from the ring buffer; `time_ns` is its wall-clock time.
#[must_use]
pub fn decision(e: &Event, names: &Names, clock: &Clock) -> (i64, Body) {
    let w = Wire {
        program: u32::from(e.program),
        ifindex: Some(e.ifindex),
        reason: u32::from(e.reason),
        ip_version: e.ip_version,
        src: &e.src,
        dst: &e.dst,
        protocol: e.protocol,
        src_port: e.src_port,
        dst_port: e.dst_port,
        tcp_flags: Some(e.tcp_flags),
        peer: e.peer,
        flags: e.flags,
    };
    (
        clock.wall_ns(e.ts_ns),
        Body::Decision {
            flow: flow(&w, names),
            suppressed: u64::from(e.suppressed),
        },
    )
}

/// A summary swept from the kernel's table.
#[must_use]
pub fn summary(key: &SummaryKey, value: &FlowSummary, names: &Names, clock: &Clock) -> Body {
    let w = Wire {
        program: u32::from(key.program),
        ifindex: None,
        reason: key.reason,
        ip_version: key.ip_version,
        src: &key.src,
        dst: &key.dst,
        protocol: key.protocol,
        src_port: key.src_port,
        dst_port: key.dst_port,
        tcp_flags: None,
        peer: NO_PEER,
        flags: key.flags,
    };
    let start_ns = clock.wall_ns(value.window_start_ns);
    let window = i64::try_from(zt_common::SUMMARY_WINDOW_NS).unwrap_or(i64::MAX);
    Body::Summary {
        flow: flow(&w, names),
        count: value.suppressed,
        start_ns,
        end_ns: start_ns.saturating_add(window),
    }
}

/// The reason code of a reason name, as written in records.
#[must_use]
pub fn reason_code(name: &str) -> Option<u32> {
    (0..reason::COUNT).find(|&c| reason::name(c) == name && name != "unknown")
}

/// The record name of an IP protocol: `tcp`, `udp`, `icmp`, `ipv6-icmp`, or
/// the number.
#[must_use]
pub fn transport_name(protocol: u8) -> String {
    match protocol {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "ipv6-icmp".into(),
        p => p.to_string(),
    }
}

/// Inverse of [`transport_name`].
#[must_use]
pub fn transport_number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(proto::TCP),
        "udp" => Some(proto::UDP),
        "icmp" => Some(proto::ICMP),
        "ipv6-icmp" => Some(proto::ICMPV6),
        n => n.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_names_map_back_to_codes() {
        for code in reason::ALL.into_iter().chain([reason::EVENTS_LOST]) {
            assert_eq!(
                reason_code(reason::name(code)),
                Some(code),
                "{}",
                reason::name(code)
            );
        }
        assert_eq!(reason_code("unknown"), None);
        assert_eq!(reason_code("no_such_reason"), None);
    }

    #[test]
    fn transports_map_both_ways() {
        for p in [proto::TCP, proto::UDP, proto::ICMP, proto::ICMPV6, 47] {
            assert_eq!(
                transport_number(&transport_name(p)),
                Some(p),
                "protocol {p}"
            );
        }
    }

    #[test]
    fn events_become_decisions_with_names() {
        let mut names = Names::default();
        names.interfaces.insert(7, "wg0".into());
        names.peers.push(("app-1".into(), Some("key=".into())));
        let mut e = Event {
            ts_ns: 5,
            ifindex: 7,
            reason: u16::try_from(reason::DROP_NOT_GRANTED).unwrap_or_default(),
            program: u8::try_from(program::TUNNEL).unwrap_or_default(),
            ip_version: 4,
            protocol: proto::UDP,
            src_port: 1000,
            dst_port: 53,
            tcp_flags: 0x12,
            peer: 0,
            suppressed: 3,
            ..Event::default()
        };
        e.src[..4].copy_from_slice(&[10, 0, 0, 2]);
        e.dst[..4].copy_from_slice(&[10, 0, 0, 1]);
        let (_, body) = decision(&e, &names, &Clock::now());
        let Body::Decision { flow, suppressed } = body else {
            panic!("not a decision: {body:?}")
        };
        assert_eq!(suppressed, 3);
        assert_eq!((flow.action(), flow.passed()), ("deny", false));
        assert_eq!(flow.interface, "wg0");
        assert_eq!(flow.program, Program::Tunnel);
        assert_eq!(
            flow.peer,
            Some(Peer {
                name: "app-1".into(),
                public_key: Some("key=".into()),
                groups: Vec::new(),
            })
        );
        let ip = flow.ip.expect("an IPv4 decision has addresses");
        assert_eq!(
            (ip.src.to_string(), ip.dst.to_string()),
            ("10.0.0.2".into(), "10.0.0.1".into())
        );
        assert_eq!(
            (ip.src_port, ip.dst_port, ip.tcp_flags),
            (Some(1000), Some(53), None),
            "UDP has no TCP flags"
        );
    }

    #[test]
    fn edge_service_decisions_name_their_service() {
        let net = |s: &str| s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        let edge = crate::policy::EdgePolicy {
            interface: "eth0".into(),
            wireguard_ports: vec![51_820],
            ssh_port: 22,
            ssh_allow: vec![net("10.0.0.2/32")],
            services: vec![crate::policy::Service {
                name: "https".into(),
                ports: vec![crate::policy::PortRange {
                    protocol: crate::policy::Protocol::Tcp,
                    first: 443,
                    last: 443,
                }],
                from: vec![net("192.0.2.0/24")],
            }],
            icmp_echo: crate::policy::EchoRate::default(),
            mode: crate::policy::Mode::Enforce,
        };
        let names = Names {
            services: Some(super::super::ServiceNames::new(&edge)),
            ..Names::default()
        };
        let service_of = |code: u32, src: [u8; 4], port: u16| {
            let mut e = Event {
                reason: u16::try_from(code).unwrap_or_default(),
                program: u8::try_from(program::EDGE).unwrap_or_default(),
                ip_version: 4,
                protocol: proto::TCP,
                dst_port: port,
                peer: NO_PEER,
                ..Event::default()
            };
            e.src[..4].copy_from_slice(&src);
            let (_, body) = decision(&e, &names, &Clock::now());
            let Body::Decision { flow, .. } = body else {
                panic!("not a decision: {body:?}")
            };
            flow.service
        };
        assert_eq!(
            service_of(reason::PASS_SERVICE, [192, 0, 2, 9], 443).as_deref(),
            Some("https")
        );
        assert_eq!(
            service_of(reason::DROP_SERVICE_SOURCE, [203, 0, 113, 9], 443).as_deref(),
            Some("https")
        );
        assert_eq!(
            service_of(reason::PASS_SSH, [10, 0, 0, 2], 22).as_deref(),
            Some("ssh")
        );
        assert_eq!(
            service_of(reason::DROP_PORT_NOT_ALLOWED, [192, 0, 2, 9], 444),
            None
        );
        assert_eq!(
            service_of(reason::PASS_REPLY, [192, 0, 2, 9], 443),
            None,
            "a reply is not a service's decision"
        );
    }

    #[test]
    fn would_drop_events_and_summaries_are_would_denies() {
        let names = Names::default();
        let e = Event {
            reason: u16::try_from(reason::DROP_PORT_NOT_ALLOWED).unwrap_or_default(),
            flags: EVENT_WOULD_DROP,
            ip_version: 4,
            protocol: proto::TCP,
            peer: NO_PEER,
            ..Event::default()
        };
        let (_, body) = decision(&e, &names, &Clock::now());
        let Body::Decision { flow, .. } = body else {
            panic!("not a decision: {body:?}")
        };
        assert!(flow.would_drop);
        assert_eq!(
            (flow.action(), flow.allowed(), flow.passed()),
            ("would_deny", false, true)
        );
        let key = SummaryKey {
            reason: reason::DROP_PORT_NOT_ALLOWED,
            ip_version: 4,
            protocol: proto::UDP,
            flags: EVENT_WOULD_DROP,
            ..SummaryKey::default()
        };
        let Body::Summary { flow, .. } =
            summary(&key, &FlowSummary::default(), &names, &Clock::now())
        else {
            panic!("not a summary")
        };
        assert_eq!(flow.action(), "would_deny");
        let enforced = SummaryKey { flags: 0, ..key };
        let Body::Summary { flow, .. } =
            summary(&enforced, &FlowSummary::default(), &names, &Clock::now())
        else {
            panic!("not a summary")
        };
        assert_eq!(flow.action(), "deny");
    }

    /// A decision a group's grant passed names the group; one the peer's
    /// own grant passed, or a refusal, names none.
    #[test]
    fn granted_decisions_name_the_groups_that_grant_them() {
        let text = "[tunnel]\ninterface = \"wg0\"\nruntime_grants = \"/nonexistent/g.json\"\n\
            [[tunnel.peer]]\nname = \"app-1\"\naddresses = [\"10.0.0.2/32\"]\nallow = [\"tcp/22\"]\n\
            [[tunnel.group]]\nname = \"db\"\npeers = [\"app-1\"]\nallow = [\"tcp/5432\", \"icmp\"]\n\
            [audit]\npath = \"/tmp/a.jsonl\"\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("/etc/ztxdp.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut names = Names::default();
        names.peers.push(("app-1".into(), None));
        names.groups = crate::grants::GroupWatch::new(config.policy.tunnel.as_ref());
        let event = |reason: u32, protocol, dst_port| Event {
            reason: u16::try_from(reason).unwrap_or_default(),
            program: u8::try_from(program::TUNNEL).unwrap_or_default(),
            ip_version: 4,
            protocol,
            dst_port,
            peer: 0,
            ..Event::default()
        };
        for (e, want) in [
            (event(reason::PASS_GRANT, proto::TCP, 5432), &["db"][..]),
            (event(reason::PASS_ICMP_GRANT, proto::ICMP, 0), &["db"][..]),
            (event(reason::PASS_GRANT, proto::TCP, 22), &[][..]),
            (event(reason::DROP_NOT_GRANTED, proto::UDP, 5432), &[][..]),
        ] {
            let (_, body) = decision(&e, &names, &Clock::now());
            let Body::Decision { flow, .. } = body else {
                panic!("not a decision: {body:?}")
            };
            assert_eq!(
                flow.peer.map(|p| p.groups),
                Some(want.iter().map(|g| (*g).to_owned()).collect()),
                "reason {}, port {}",
                reason::name(u32::from(e.reason)),
                e.dst_port
            );
        }
    }
}
