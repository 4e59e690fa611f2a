//! `ztxdp explain`: the verdict and reason the running programs would give
//! one packet, and why: which allow-list prefix, peer, grant or flow
//! matched, or that none did, with the config line each rule came from.
//!
//! Nothing here decides. The running programs' maps are read
//! ([`live::Live`]) into the reference model (`crate::model`), which the
//! differential tests hold to the kernel reason for reason, and the model
//! is asked, recording what it looked at ([`Fact`]). This module only
//! puts names, config lines and words to those facts. No counter, token
//! bucket, flow or audit record changes.

pub mod live;
pub mod packet;

use std::{fmt, net::IpAddr, path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Serialize;
use zt_common::{proto, reason};

use crate::{
    attach::{self, AttachError, Attached, Attachment},
    audit::record::{Program, transport_name},
    config::Config,
    identity::{self, Identity, IdentityError},
    model::{self, Explanation, Fact, Flow, Seen},
    policy::{EdgePolicy, Grant, Mode, Peer},
};
use live::{Live, LiveError};
use packet::Request;

/// Errors of `ztxdp explain`.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error(transparent)]
    Live(#[from] LiveError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("no ztxdp program is attached in this network namespace (is `ztxdp up` running?)")]
    NothingAttached,
    #[error("no ztxdp edge or tunnel program is attached to {iface}; attached: {attached}")]
    NotOn { iface: String, attached: String },
    #[error("tunnel programs are attached to {attached}; pick one with --iface")]
    Ambiguous { attached: String },
}

/// The config entry a rule came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub file: PathBuf,
    /// Dotted key (`edge.ssh_allow[1]`), or what else holds the rule.
    pub key: String,
    /// 1-based; `None` for a key the file leaves at its default.
    pub line: Option<usize>,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} at {}:{line}", self.key, self.file.display()),
            None => write!(f, "{} in {}", self.key, self.file.display()),
        }
    }
}

/// The tunnel peer a packet's source belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub index: u32,
    /// From the running policy's identity, else the config.
    pub name: Option<String>,
    pub public_key: Option<String>,
    /// The peer's longest prefix holding the source.
    pub prefix: IpNet,
    pub rule: Option<Rule>,
}

/// A kernel grant word: bit `bit` of word `word` of the peer's
/// protocol's bitmap grants the port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GrantWord {
    pub peer: u32,
    pub protocol: String,
    pub word: u16,
    pub bit: u16,
    /// The word as the map holds it, in hex; `None` when it has none.
    pub value: Option<String>,
}

/// A flow of the host's, from its side.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub local: String,
    pub remote: String,
    pub ifindex: u32,
    /// Since its last packet; `None` when the table has no such flow.
    pub age_ms: Option<u64>,
    pub timeout_s: Option<u64>,
    pub closing: Option<bool>,
    /// It began as an answer to what the policy passed: no reply passes.
    pub answer: Option<bool>,
}

/// One step of why, in the order the program looked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Why {
    /// `wireguard_port`, `ssh_port`, `ssh_allow`, `grant`, `icmp_grant`,
    /// `syn`, `flow`, `quote`, `echo_bucket` or `fragment`.
    pub step: &'static str,
    /// A rule, entry or live flow matched.
    pub matched: bool,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<Rule>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_word: Option<GrantWord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<FlowView>,
}

impl Why {
    fn new(step: &'static str, matched: bool, text: String, rule: Option<Rule>) -> Self {
        Self {
            step,
            matched,
            text,
            rule,
            prefix: None,
            grant: None,
            grant_word: None,
            flow: None,
        }
    }
}

/// What `ztxdp explain` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub program: Program,
    pub interface: String,
    pub ifindex: u32,
    pub program_id: u32,
    pub packet: Request,
    /// `pass` or `drop`: what the packet meets, in `mode`.
    pub verdict: &'static str,
    /// The program's or peer's mode: in `audit`, a packet the policy drops
    /// (`reason`, a drop reason) passes, except parse failures.
    pub mode: Mode,
    #[serde(skip)]
    code: u32,
    pub reason: &'static str,
    pub meaning: &'static str,
    pub peer: Option<PeerView>,
    /// On the edge, the service the decision names (as audit records do):
    /// the first of the port's services that admits the source, or the
    /// port's first when none does.
    pub service: Option<String>,
    pub why: Vec<Why>,
    /// The config the rules' lines are from.
    pub config: Option<PathBuf>,
    /// Why those lines may not be the running policy's, when they may not.
    pub config_note: Option<String>,
}

/// Where names and lines come from: the config (found as `allow` finds
/// it) and the running policy's identity.
struct Sources {
    config: Option<Config>,
    identity: Option<Identity>,
    /// Why the config's lines may not be the running policy's.
    note: Option<String>,
}

impl Sources {
    /// The config at `path`, checked against the running identity.
    fn load(path: &std::path::Path, identity: Option<Identity>) -> Self {
        match Config::load(path) {
            Ok(config) => {
                let note = identity
                    .as_ref()
                    .and_then(|id| id.check(&config).err())
                    .map(|e| format!("{e}; its lines may not be the running policy's"));
                Self {
                    config: Some(config),
                    identity,
                    note,
                }
            }
            Err(e) => Self {
                config: None,
                identity,
                note: Some(format!("no config lines: {e}")),
            },
        }
    }

    fn rule(&self, key: String) -> Option<Rule> {
        let config = self.config.as_ref()?;
        Some(Rule {
            file: config.path.clone(),
            line: config.line_of(&key),
            key,
        })
    }

    fn config_peer(&self, index: u32) -> Option<&Peer> {
        self.config
            .as_ref()?
            .policy
            .tunnel
            .as_ref()?
            .peers
            .get(index as usize)
    }

    /// A peer's name and key: the identity's, else the config's.
    fn peer_name(&self, index: u32) -> (Option<String>, Option<String>) {
        if let Some(p) = self
            .identity
            .as_ref()
            .and_then(|id| id.peers.get(index as usize))
        {
            return (Some(p.name.clone()), p.public_key.clone());
        }
        self.config_peer(index).map_or((None, None), |p| {
            (Some(p.name.clone()), p.public_key.clone())
        })
    }

    /// The name of edge service `index` (0 is `ssh`), and its config key.
    fn service(&self, index: u32) -> (String, Option<String>) {
        if index == 0 {
            return (EdgePolicy::SSH_SERVICE.to_owned(), None);
        }
        let key = format!("edge.service[{}]", index - 1);
        let name = self
            .config
            .as_ref()
            .and_then(|c| c.policy.edge.as_ref())
            .and_then(|e| e.services.get(index as usize - 1))
            .map_or_else(|| format!("#{index}"), |s| s.name.clone());
        (name, Some(key))
    }

    fn peer_label(&self, index: u32) -> String {
        self.peer_name(index)
            .0
            .unwrap_or_else(|| format!("#{index}"))
    }

    /// The config grant of peer `index` that covers `port` (`None`: ICMP):
    /// its own, else one of a group it is in.
    fn config_grant(&self, index: u32, protocol: u8, port: Option<u16>) -> Option<Rule> {
        let covers = |grants: &[Grant]| {
            grants.iter().position(|g| match (*g, port) {
                (Grant::Icmp, None) => true,
                (
                    Grant::Ports {
                        protocol: p,
                        first,
                        last,
                    },
                    Some(port),
                ) => p.number() == protocol && (first..=last).contains(&port),
                _ => false,
            })
        };
        if let Some(j) = covers(&self.config_peer(index)?.grants) {
            return self.rule(format!("tunnel.peer[{index}].allow[{j}]"));
        }
        let tunnel = self.config.as_ref()?.policy.tunnel.as_ref()?;
        let (g, j) = tunnel.groups.iter().enumerate().find_map(|(g, group)| {
            group
                .members
                .contains(&(index as usize))
                .then(|| covers(&group.grants))
                .flatten()
                .map(|j| (g, j))
        })?;
        self.rule(format!("tunnel.group[{g}].allow[{j}]"))
    }

    /// Where a grant the kernel holds and the config lacks came from.
    fn runtime_rule(&self) -> Option<Rule> {
        let tunnel = self.config.as_ref()?.policy.tunnel.as_ref()?;
        Some(Rule {
            file: tunnel.runtime_grants.clone(),
            key: "added at run time (`ztxdp allow`)".into(),
            line: None,
        })
    }
}

/// The program `iface` names, else the edge, else the only tunnel program.
fn choose<'a>(
    found: &'a Attached,
    iface: Option<&str>,
) -> Result<(Program, &'a Attachment), ExplainError> {
    let programs = found
        .edge
        .iter()
        .map(|a| (Program::Edge, a))
        .chain(found.tunnel.iter().map(|a| (Program::Tunnel, a)));
    let list = |it: &mut dyn Iterator<Item = (Program, &Attachment)>| {
        it.map(|(p, a)| format!("{} ({})", a.interface, p.name()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(iface) = iface {
        return programs
            .clone()
            .find(|(_, a)| a.interface == iface)
            .ok_or_else(|| ExplainError::NotOn {
                iface: iface.to_owned(),
                attached: list(&mut programs.clone()),
            });
    }
    match (found.edge.first(), found.tunnel.as_slice()) {
        (Some(a), _) => Ok((Program::Edge, a)),
        (None, [a]) => Ok((Program::Tunnel, a)),
        (None, []) => Err(ExplainError::NothingAttached),
        (None, _) => Err(ExplainError::Ambiguous {
            attached: list(&mut programs.clone()),
        }),
    }
}

/// `CLOCK_MONOTONIC_COARSE`, the clock the programs time flows with.
fn programs_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec that we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) } != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// `ztxdp explain`: asks the model of the program on `iface` (see
/// [`choose`]) about `request`; names and lines come from the config at
/// `config` (else as `allow` finds it).
///
/// # Errors
/// When nothing is attached, `iface` runs none of ours, or the maps
/// cannot be read.
pub async fn run(
    request: &Request,
    iface: Option<&str>,
    config: Option<&std::path::Path>,
) -> Result<Report, ExplainError> {
    let found = attach::find(&attach::connect()?).await?;
    let (program, a) = choose(&found, iface)?;
    let live = Live::read(&a.map_ids)?;
    let l2 = program == Program::Edge || live.settings.tunnel_l2;
    let explanation = live.explain(program, &request.packet(l2), a.ifindex, programs_now_ns())?;
    let running = Identity::live(&found)?;
    let path = identity::config_path(config, running.as_ref());
    let sources = Sources::load(&path, running);
    Ok(report(request, program, a, &live, &explanation, &sources))
}

/// The report of `explanation`, the model's answer about `request` on the
/// program of `a`.
fn report(
    request: &Request,
    program: Program,
    a: &Attachment,
    live: &Live,
    explanation: &Explanation,
    sources: &Sources,
) -> Report {
    let mut peer = None;
    let why = explanation
        .facts
        .iter()
        .filter_map(|fact| {
            if let Fact::Peer {
                owner: Some((index, prefix)),
                ..
            } = *fact
            {
                let (name, public_key) = sources.peer_name(index);
                let k = sources
                    .config_peer(index)
                    .and_then(|p| p.addresses.iter().position(|n| *n == prefix));
                peer = Some(PeerView {
                    index,
                    name,
                    public_key,
                    prefix,
                    rule: k
                        .and_then(|k| sources.rule(format!("tunnel.peer[{index}].addresses[{k}]"))),
                });
            }
            why(fact, explanation.reason, live, sources)
        })
        .collect();
    let code = explanation.reason;
    let mode = live.mode(program, explanation.peer);
    Report {
        program,
        interface: a.interface.clone(),
        ifindex: a.ifindex,
        program_id: a.program_id,
        packet: request.clone(),
        verdict: reason::class_name(model::passes(mode, code)),
        mode,
        code,
        reason: reason::name(code),
        meaning: reason::meaning(code),
        peer,
        service: explanation.service.map(|i| sources.service(i).0),
        why,
        config: sources.config.as_ref().map(|c| c.path.clone()),
        config_note: sources.note.clone(),
    }
}

fn seconds(ns: u64) -> String {
    let d = Duration::from_nanos(ns);
    if d >= Duration::from_secs(1) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// The config key of the timeout of a flow of `protocol`.
const fn timeout_key(protocol: u8, closing: bool) -> &'static str {
    match protocol {
        proto::TCP if closing => "flows.tcp_closing_timeout",
        proto::TCP => "flows.tcp_established_timeout",
        proto::UDP => "flows.udp_timeout",
        _ => "flows.icmp_timeout",
    }
}

fn flow_view(flow: &Flow, seen: Option<&Seen>) -> FlowView {
    let end = |ip: IpAddr, port: u16| match flow.protocol {
        proto::TCP | proto::UDP => std::net::SocketAddr::new(ip, port).to_string(),
        // An echo flow's local port is its identifier.
        _ => format!("{ip} id {port}"),
    };
    FlowView {
        protocol: transport_name(flow.protocol),
        local: end(flow.local, flow.local_port),
        remote: if matches!(flow.protocol, proto::TCP | proto::UDP) {
            end(flow.remote, flow.remote_port)
        } else {
            flow.remote.to_string()
        },
        ifindex: flow.ifindex,
        age_ms: seen.map(|s| s.age_ns / 1_000_000),
        timeout_s: seen.map(|s| s.timeout_ns / 1_000_000_000),
        closing: seen.map(|s| s.entry.closing),
        answer: seen.map(|s| s.entry.answer),
    }
}

/// One fact in words, with its rule; `None` for the peer, which the
/// report carries on its own.
#[expect(clippy::too_many_lines, reason = "one arm per kind of fact")]
fn why(fact: &Fact, code: u32, live: &Live, sources: &Sources) -> Option<Why> {
    let edge = sources.config.as_ref().and_then(|c| c.policy.edge.as_ref());
    Some(match *fact {
        Fact::WireguardPort { port, listed } => {
            let j = edge.and_then(|e| e.wireguard_ports.iter().position(|&p| p == port));
            let key = j.map_or_else(
                || "edge.wireguard_ports".to_owned(),
                |j| format!("edge.wireguard_ports[{j}]"),
            );
            let text = if listed {
                format!("UDP to {port}, a WireGuard port")
            } else {
                format!("UDP to {port}, which is no WireGuard port")
            };
            Why::new("wireguard_port", listed, text, sources.rule(key))
        }
        Fact::NoService { protocol, port } => Why::new(
            "service_port",
            false,
            format!(
                "{} to {port}, which no edge service opens",
                transport_name(protocol).to_uppercase()
            ),
            None,
        ),
        Fact::Service {
            service,
            source,
            prefix,
        } => {
            let (name, at) = sources.service(service);
            // The ssh service's sources are `ssh_allow`, as before services.
            let (kind, list) = match &at {
                None => ("ssh_allow", "edge.ssh_allow".to_owned()),
                Some(at) => ("service_from", format!("{at}.from")),
            };
            let label = match &at {
                None => list.clone(),
                Some(_) => format!("{list} (service {name})"),
            };
            let Some(prefix) = prefix else {
                return Some(Why::new(
                    kind,
                    false,
                    format!("no prefix of {label} holds {source}"),
                    sources.rule(list),
                ));
            };
            // The kernel's entries hold the config's prefixes expanded,
            // and adjacent ones merged back read as one: the prefix to
            // name is the config's longest holding the source.
            let config = edge.and_then(|e| {
                e.services()
                    .nth(service as usize)?
                    .from
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| n.contains(&source))
                    .max_by_key(|(_, n)| n.prefix_len())
            });
            let (j, prefix) = config.map_or((None, prefix), |(j, listed)| (Some(j), *listed));
            let text = match j {
                Some(_) => format!("{prefix} of {label} holds {source}"),
                None => format!(
                    "{prefix} holds {source}: the kernel's sources of service {name} have it, \
                     the config does not"
                ),
            };
            let mut w = Why::new(
                kind,
                true,
                text,
                j.and_then(|j| sources.rule(format!("{list}[{j}]"))),
            );
            w.prefix = Some(prefix);
            w
        }
        Fact::Peer { owner: Some(_), .. } => return None,
        Fact::Peer {
            source,
            owner: None,
        } => Why::new(
            "peer",
            false,
            format!("{source} belongs to no tunnel peer"),
            None,
        ),
        Fact::Grant {
            peer,
            protocol,
            port,
            grant,
        } => {
            let name = sources.peer_label(peer);
            let what = format!("{}/{port}", transport_name(protocol));
            let in_config = sources.config_grant(peer, protocol, Some(port));
            let mut w = if let Some(g) = grant {
                let rule = in_config.or_else(|| sources.runtime_rule());
                let mut w = Why::new(
                    "grant",
                    true,
                    format!("{name} is granted {g}, which covers {what}"),
                    rule,
                );
                w.grant = Some(g.to_string());
                w
            } else {
                let text = match &in_config {
                    Some(r) => format!(
                        "{name} has no grant covering {what}: the config grants it ({}), \
                         but not the kernel (revoked at run time, or not yet reloaded)",
                        r.key
                    ),
                    None => format!("{name} has no grant covering {what}"),
                };
                let key = format!("tunnel.peer[{peer}].allow");
                Why::new(
                    "grant",
                    false,
                    text,
                    in_config.or_else(|| sources.rule(key)),
                )
            };
            let key = zt_common::GrantKey {
                peer,
                protocol,
                _pad0: 0,
                word: port >> 6,
            };
            w.grant_word = Some(GrantWord {
                peer,
                protocol: transport_name(protocol),
                word: key.word,
                bit: port & 63,
                value: live.contents.grants.get(&key).map(|v| format!("{v:#018x}")),
            });
            w
        }
        Fact::IcmpGrant { peer, granted } => {
            let name = sources.peer_label(peer);
            let in_config = sources.config_grant(peer, 0, None);
            let (text, rule) = match (granted, in_config) {
                (true, Some(r)) => (format!("{name} is granted icmp"), Some(r)),
                (true, None) => (format!("{name} is granted icmp"), sources.runtime_rule()),
                (false, Some(r)) => (
                    format!(
                        "{name} is not granted icmp in the kernel, though the config grants it \
                         (revoked at run time, or not yet reloaded)"
                    ),
                    Some(r),
                ),
                (false, None) => (
                    format!("{name} is not granted icmp"),
                    sources.rule(format!("tunnel.peer[{peer}].allow")),
                ),
            };
            Why::new("icmp_grant", granted, text, rule)
        }
        Fact::Syn => Why::new(
            "syn",
            false,
            "a TCP SYN opens a connection, so it is never a reply to a flow of the host's".into(),
            None,
        ),
        Fact::Flow { flow, seen } => {
            let related = matches!(
                code,
                reason::PASS_ICMP_RELATED | reason::DROP_ICMP_UNRELATED
            );
            let view = flow_view(&flow, seen.as_ref());
            let desc = format!("{} flow {} -> {}", view.protocol, view.local, view.remote);
            let (matched, text, rule) = match seen {
                None => (false, format!("the host has no {desc}"), None),
                Some(s) if s.entry.answer && !related => (
                    false,
                    format!(
                        "the host's {desc} began by answering what the policy passed, so it \
                         admits no reply"
                    ),
                    None,
                ),
                Some(s) => {
                    let rule = sources.rule(timeout_key(flow.protocol, s.entry.closing).into());
                    let when = format!(
                        "last packet {} ago, timeout {}",
                        seconds(s.age_ns),
                        seconds(s.timeout_ns)
                    );
                    if s.live() {
                        (true, format!("the host's {desc} is live ({when})"), rule)
                    } else {
                        (false, format!("the host's {desc} expired ({when})"), rule)
                    }
                }
            };
            let mut w = Why::new("flow", matched, text, rule);
            w.flow = Some(view);
            w
        }
        Fact::Unquoted => Why::new(
            "quote",
            false,
            "the ICMP error quotes no packet of a flow (explain builds errors without a quote)"
                .into(),
            None,
        ),
        Fact::Echo {
            source,
            tokens_left,
        } => {
            let rate = live.contents.flow_config.echo_ns_per_token;
            let text = match tokens_left {
                Some(n) => format!(
                    "{source}'s echo bucket has a token; taking it would leave {n} (burst {}, \
                     one more every {})",
                    live.contents.flow_config.echo_burst,
                    seconds(rate)
                ),
                None if rate == 0 => "echo requests are off (edge.icmp_echo_rate = \"0\")".into(),
                None => format!(
                    "{source}'s echo bucket is empty (one more every {})",
                    seconds(rate)
                ),
            };
            Why::new(
                "echo_bucket",
                tokens_left.is_some(),
                text,
                sources.rule("edge.icmp_echo_rate".into()),
            )
        }
        Fact::Fragment {
            datagram,
            first_passed_ns_ago,
        } => {
            let timeout = u64::try_from(live.flows.fragment.as_nanos()).unwrap_or(u64::MAX);
            let (matched, text) = match first_passed_ns_ago {
                Some(age) if age <= timeout => (
                    true,
                    format!(
                        "the first fragment of datagram {} passed {} ago",
                        datagram.id,
                        seconds(age)
                    ),
                ),
                Some(age) => (
                    false,
                    format!(
                        "the first fragment of datagram {} passed {} ago, too long ago",
                        datagram.id,
                        seconds(age)
                    ),
                ),
                None => (
                    false,
                    format!("no first fragment of datagram {} passed", datagram.id),
                ),
            };
            Why::new(
                "fragment",
                matched,
                text,
                sources.rule("flows.fragment_timeout".into()),
            )
        }
    })
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} on {} ({} program {})",
            self.packet,
            self.interface,
            self.program.name(),
            self.program_id
        )?;
        writeln!(f, "{}: {} ({})", self.verdict, self.reason, self.meaning)?;
        if self.mode == Mode::Audit {
            let effect = if reason::is_allow(self.code) {
                "no different here"
            } else if model::would_drop(self.mode, self.code) {
                "the policy would drop it; audit mode lets it pass"
            } else {
                "a parse failure drops in audit mode too"
            };
            writeln!(f, "  audit mode: {effect}")?;
        }
        if let Some(service) = &self.service {
            writeln!(f, "service {service}")?;
        }
        if let Some(p) = &self.peer {
            write!(
                f,
                "peer {} (index {}",
                p.name.as_deref().unwrap_or("?"),
                p.index
            )?;
            if let Some(key) = &p.public_key {
                write!(f, ", key {key}")?;
            }
            write!(f, ") owns {} by {}", self.packet.src, p.prefix)?;
            match &p.rule {
                Some(r) => writeln!(f, " [{r}]")?,
                None => writeln!(f)?,
            }
        }
        for w in &self.why {
            write!(f, "  - {}", w.text)?;
            match &w.rule {
                Some(r) => writeln!(f, " [{r}]")?,
                None => writeln!(f)?,
            }
        }
        if let Some(note) = &self.config_note {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}
