//! The validator: the `Raw*` tables in, a checked [`Policy`] out, every
//! value checked against its bounds.

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;

use super::grammar::{
    RawAudit, RawConfig, RawEdge, RawFlows, RawMetrics, RawPeer, RawSyslog, RawTunnel, parse_grant,
};
use super::position::Locator;
use super::{
    ConfigError, DEFAULT_RUNTIME_GRANTS, DEFAULT_SSH_PORT, ECHO_RATE_FORM, Limits,
    MAX_FLOW_ENTRIES, MAX_FRAGMENT_TIMEOUT, MAX_INTERFACE_NAME, MIN_FLOW_ENTRIES, group_id,
    is_name, is_wireguard_key, not_a_name, too_many_peers,
};
use crate::audit::syslog::tls;
use crate::policy::{
    AuditFormat, AuditSettings, EchoRate, EdgePolicy, FlowSettings, Grant, MetricsSettings, Mode,
    Peer, Policy, SocketGroup, SyslogSettings, TunnelPolicy,
};

/// Bounds of the `[audit]` numbers: a rotated file holds at least one
/// record; fsync at least once a minute; a queue of at most a million
/// records (about 1 GiB).
pub(crate) const MIN_ROTATE_BYTES: u64 = 4096;
pub(crate) const MAX_KEEP: u64 = 1000;
pub(crate) const MAX_FSYNC_MS: u64 = 60_000;
pub(crate) const MAX_SYSLOG_QUEUE: u64 = 1_000_000;

/// Turns the raw file into a [`Policy`], checking every value.
pub(crate) struct Validator<'a> {
    pub(crate) at: &'a Locator<'a>,
    pub(crate) limits: Limits,
}

impl Validator<'_> {
    /// The `allow` list at key `at` of a peer or a group, each grant
    /// checked; an error names the grant's index.
    pub(crate) fn grants(&self, at: &str, allow: &[String]) -> Result<Vec<Grant>, ConfigError> {
        allow
            .iter()
            .enumerate()
            .map(|(i, text)| {
                parse_grant(text)
                    .map_err(|e| self.at.invalid(&format!("{at}.allow[{i}]"), e.to_string()))
            })
            .collect()
    }

    pub(crate) fn policy(&self, raw: RawConfig) -> Result<Policy, ConfigError> {
        let mode = self.mode(raw.mode.as_deref(), "mode")?.unwrap_or_default();
        let edge = raw.edge.map(|e| self.edge(e, mode)).transpose()?;
        let tunnel = raw.tunnel.map(|t| self.tunnel(t, mode)).transpose()?;
        let flows = raw
            .flows
            .map_or_else(|| Ok(FlowSettings::default()), |f| self.flows(&f))?;
        let audit = self.audit(raw.audit)?;
        let metrics = raw.metrics.map(|m| self.metrics(m)).transpose()?;
        let drift_check_interval = self.drift_check_interval(raw.drift_check_interval)?;
        // Neither [edge] nor [tunnel] is valid (the packaged config, before
        // it is edited), but `up` refuses it: see `Config::check_enforces`.
        Ok(Policy {
            edge,
            tunnel,
            flows,
            audit,
            metrics,
            drift_check_interval,
        })
    }

    pub(crate) fn drift_check_interval(
        &self,
        seconds: Option<i64>,
    ) -> Result<Duration, ConfigError> {
        match seconds {
            None => Ok(Policy::DEFAULT_DRIFT_CHECK_INTERVAL),
            Some(s) => u64::try_from(s).map(Duration::from_secs).map_err(|_| {
                self.at.invalid(
                    "drift_check_interval",
                    format!(
                        "{s} is not an interval; give whole seconds, or 0 to turn the check off"
                    ),
                )
            }),
        }
    }

    pub(crate) fn metrics(&self, raw: RawMetrics) -> Result<MetricsSettings, ConfigError> {
        let listen = self.required(
            raw.listen,
            "metrics.listen",
            "the address to serve /metrics on, e.g. \"127.0.0.1:9542\"",
        )?;
        let listen = listen.parse().map_err(|_| {
            self.at.invalid(
                "metrics.listen",
                format!("\"{listen}\" is not IP:PORT (e.g. \"127.0.0.1:9542\", \"[::1]:9542\")"),
            )
        })?;
        Ok(MetricsSettings { listen })
    }

    /// A `mode` key: `"enforce"` or `"audit"`; `None` when absent.
    pub(crate) fn mode(&self, text: Option<&str>, key: &str) -> Result<Option<Mode>, ConfigError> {
        text.map(|t| {
            Mode::from_name(t).ok_or_else(|| {
                self.at.invalid(
                    key,
                    format!("\"{t}\" is not a mode: use \"enforce\" or \"audit\""),
                )
            })
        })
        .transpose()
    }

    pub(crate) fn required<T>(
        &self,
        value: Option<T>,
        key: &str,
        what: &str,
    ) -> Result<T, ConfigError> {
        value.ok_or_else(|| self.at.invalid(key, format!("missing; set it to {what}")))
    }

    pub(crate) fn edge(&self, raw: RawEdge, mode: Mode) -> Result<EdgePolicy, ConfigError> {
        let interface = self.interface(
            raw.interface,
            "edge.interface",
            "the external interface, e.g. \"eth0\"",
        )?;
        let ports = self.required(
            raw.wireguard_ports,
            "edge.wireguard_ports",
            "the UDP ports WireGuard listens on, e.g. [51820] ([] for none)",
        )?;
        let wireguard_ports = ports
            .into_iter()
            .enumerate()
            .map(|(i, port)| self.port(port, &format!("edge.wireguard_ports[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let ssh_port = match raw.ssh_port {
            Some(port) => self.port(port, "edge.ssh_port")?,
            None => DEFAULT_SSH_PORT,
        };
        let allow = self.required(
            raw.ssh_allow,
            "edge.ssh_allow",
            "the networks allowed to reach SSH, e.g. [\"192.0.2.10/32\"] ([] for none)",
        )?;
        let mut per_family = [0usize; 2];
        let mut ssh_allow = Vec::with_capacity(allow.len());
        for (i, text) in allow.iter().enumerate() {
            let key = format!("edge.ssh_allow[{i}]");
            let net = self.prefix(text, &key)?;
            let count = &mut per_family[usize::from(matches!(net, IpNet::V6(_)))];
            *count += 1;
            if *count > self.limits.ssh_allow_per_family {
                return Err(self.at.invalid(
                    &key,
                    format!(
                        "more than {} {} entries; the kernel allow-list holds no more",
                        self.limits.ssh_allow_per_family,
                        family(&net)
                    ),
                ));
            }
            ssh_allow.push(net);
        }
        let icmp_echo = self.echo_rate(raw.icmp_echo_rate.as_deref(), raw.icmp_echo_burst)?;
        let mut edge = EdgePolicy {
            interface,
            wireguard_ports,
            ssh_port,
            ssh_allow,
            services: Vec::new(),
            icmp_echo,
            mode,
        };
        edge.services = self.services(raw.service.unwrap_or_default(), &edge)?;
        Ok(edge)
    }

    /// `edge.icmp_echo_rate` and `edge.icmp_echo_burst`.
    pub(crate) fn echo_rate(
        &self,
        rate: Option<&str>,
        burst: Option<i64>,
    ) -> Result<EchoRate, ConfigError> {
        let default = EchoRate::default();
        let ns_per_token = match rate {
            Some(text) => self.rate(text, "edge.icmp_echo_rate")?,
            None => default.ns_per_token,
        };
        let burst = match burst {
            None => default.burst,
            Some(n) => u64::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(|| {
                self.at.invalid(
                    "edge.icmp_echo_burst",
                    format!(
                        "{n} is not a burst; use 1 or more echo requests \
                         (icmp_echo_rate = \"0\" drops them all)"
                    ),
                )
            })?,
        };
        Ok(EchoRate {
            ns_per_token,
            burst,
        })
    }

    /// Nanoseconds per token of a rate such as `"5/s"`; 0 for `"0"`.
    pub(crate) fn rate(&self, text: &str, key: &str) -> Result<u64, ConfigError> {
        const NS_PER_SEC: u64 = 1_000_000_000;
        let bad = |why: &str| {
            self.at
                .invalid(key, format!("\"{text}\" {why}; expected {ECHO_RATE_FORM}"))
        };
        if text.trim() == "0" {
            return Ok(0);
        }
        let Some((count, unit)) = text.split_once('/') else {
            return Err(bad("is not a rate"));
        };
        let (count, unit) = (count.trim(), unit.trim());
        // `str::parse` would also take "+5"; a count is digits only.
        let count: u64 = if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
            count
                .parse()
                .map_err(|_| bad("has a count too large to be a rate"))?
        } else {
            return Err(bad("does not start with a whole number"));
        };
        let period = match unit {
            "s" => NS_PER_SEC,
            "m" => 60 * NS_PER_SEC,
            "h" => 3600 * NS_PER_SEC,
            _ => return Err(bad("has an unknown unit")),
        };
        if count == 0 {
            return Ok(0);
        }
        // The kernel refills in whole nanoseconds per token; 0 would mean
        // "drop all", the opposite of what a huge rate asks for.
        match period / count {
            0 => Err(bad("is faster than one echo per nanosecond")),
            ns => Ok(ns),
        }
    }

    pub(crate) fn flows(&self, raw: &RawFlows) -> Result<FlowSettings, ConfigError> {
        let default = FlowSettings::default();
        let max_entries = match raw.max_entries {
            None => default.max_entries,
            Some(n) => u32::try_from(n)
                .ok()
                .filter(|n| (MIN_FLOW_ENTRIES..=MAX_FLOW_ENTRIES).contains(n))
                .ok_or_else(|| {
                    self.at.invalid(
                        "flows.max_entries",
                        format!(
                            "{n} is out of range; the flow table holds {MIN_FLOW_ENTRIES} to \
                             {MAX_FLOW_ENTRIES} entries"
                        ),
                    )
                })?,
        };
        Ok(FlowSettings {
            max_entries,
            tcp_established: self.timeout(
                raw.tcp_established_timeout,
                "flows.tcp_established_timeout",
                default.tcp_established,
            )?,
            tcp_closing: self.timeout(
                raw.tcp_closing_timeout,
                "flows.tcp_closing_timeout",
                default.tcp_closing,
            )?,
            udp: self.timeout(raw.udp_timeout, "flows.udp_timeout", default.udp)?,
            icmp: self.timeout(raw.icmp_timeout, "flows.icmp_timeout", default.icmp)?,
            fragment: self.fragment_timeout(raw.fragment_timeout, default.fragment)?,
        })
    }

    pub(crate) fn fragment_timeout(
        &self,
        seconds: Option<i64>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        const KEY: &str = "flows.fragment_timeout";
        let timeout = self.timeout(seconds, KEY, default)?;
        if timeout.as_secs() > MAX_FRAGMENT_TIMEOUT {
            return Err(self.at.invalid(
                KEY,
                format!(
                    "{} s is longer than a datagram's fragments take to arrive; give 1 to \
                     {MAX_FRAGMENT_TIMEOUT} seconds",
                    timeout.as_secs()
                ),
            ));
        }
        Ok(timeout)
    }

    pub(crate) fn timeout(
        &self,
        seconds: Option<i64>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match seconds {
            None => Ok(default),
            Some(s) => u64::try_from(s)
                .ok()
                .filter(|&s| s > 0)
                .map(Duration::from_secs)
                .ok_or_else(|| {
                    self.at.invalid(
                        key,
                        format!("{s} is not a timeout; give whole seconds above 0"),
                    )
                }),
        }
    }

    pub(crate) fn tunnel(&self, raw: RawTunnel, mode: Mode) -> Result<TunnelPolicy, ConfigError> {
        let interface = self.interface(
            raw.interface,
            "tunnel.interface",
            "the WireGuard interface, e.g. \"wg0\"",
        )?;
        let runtime_grants = match raw.runtime_grants {
            Some(path) if path.as_os_str().is_empty() => {
                return Err(self.at.invalid(
                    "tunnel.runtime_grants",
                    "empty; give a file path or leave the key out",
                ));
            }
            Some(path) => path,
            None => PathBuf::from(DEFAULT_RUNTIME_GRANTS),
        };
        let raw_peers = raw.peer.unwrap_or_default();
        if raw_peers.len() > self.limits.peers {
            return Err(self.at.invalid(
                &format!("tunnel.peer[{}]", self.limits.peers),
                too_many_peers(self.limits.peers),
            ));
        }
        let peers = raw_peers
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.peer(p, i, mode))
            .collect::<Result<Vec<_>, _>>()?;
        self.unique_names(&peers)?;
        self.disjoint_addresses(&peers)?;
        let groups = self.groups(raw.group.unwrap_or_default(), &peers)?;
        Ok(TunnelPolicy {
            interface,
            peers,
            groups,
            runtime_grants,
            link_local_neighbors: raw.link_local_neighbors.unwrap_or(false),
            mode,
        })
    }

    pub(crate) fn peer(&self, raw: RawPeer, index: usize, mode: Mode) -> Result<Peer, ConfigError> {
        let at = format!("tunnel.peer[{index}]");
        let mode = self
            .mode(raw.mode.as_deref(), &format!("{at}.mode"))?
            .unwrap_or(mode);
        let name = self.required(
            raw.name,
            &format!("{at}.name"),
            "a unique peer name, e.g. \"app-1\"",
        )?;
        if name.is_empty() {
            return Err(self
                .at
                .invalid(&format!("{at}.name"), "empty; give the peer a name"));
        }
        // Names go into audit records, CEF lines, syslog and terminals: a
        // newline, a right-to-left override or trailing space there would
        // forge or hide what a reader sees.
        if !is_name(&name) {
            return Err(self
                .at
                .invalid(&format!("{at}.name"), not_a_name("peer", &name)));
        }
        if name.parse::<IpAddr>().is_ok() || name.parse::<IpNet>().is_ok() {
            // `ztxdp allow PEER` takes a name or an address; a name that looks
            // like an address would make that ambiguous.
            return Err(self.at.invalid(
                &format!("{at}.name"),
                format!("\"{name}\" looks like an address; pick a name"),
            ));
        }
        let key = format!("{at}.addresses");
        let texts = self.required(
            raw.addresses,
            &key,
            "the peer's tunnel addresses, e.g. [\"10.100.0.1/32\"]",
        )?;
        if texts.is_empty() {
            return Err(self
                .at
                .invalid(&key, "empty; a peer needs at least one address"));
        }
        let addresses = texts
            .iter()
            .enumerate()
            .map(|(i, text)| self.prefix(text, &format!("{key}[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(public_key) = &raw.public_key
            && !is_wireguard_key(public_key)
        {
            return Err(self.at.invalid(
                &format!("{at}.public_key"),
                "not a WireGuard public key (44 base64 characters ending in '=', as `wg show` prints)",
            ));
        }
        let grants = self.grants(&at, &raw.allow.unwrap_or_default())?;
        Ok(Peer {
            name,
            addresses,
            public_key: raw.public_key,
            grants,
            mode,
        })
    }

    pub(crate) fn unique_names(&self, peers: &[Peer]) -> Result<(), ConfigError> {
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(peers.len());
        for (i, peer) in peers.iter().enumerate() {
            if let Some(first) = seen.insert(&peer.name, i) {
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{i}].name"),
                    format!(
                        "peer name \"{}\" is already used by tunnel.peer[{first}]",
                        peer.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Rejects a prefix of one peer that overlaps a prefix of another: the
    /// kernel would pick one by longest match, and the other peer's grants
    /// would silently apply to part of its range, or not at all.
    pub(crate) fn disjoint_addresses(&self, peers: &[Peer]) -> Result<(), ConfigError> {
        // (prefix, peer, address index), sorted so that a prefix comes right
        // after every prefix that contains it.
        let mut all: Vec<(IpNet, usize, usize)> = peers
            .iter()
            .enumerate()
            .flat_map(|(p, peer)| {
                peer.addresses
                    .iter()
                    .enumerate()
                    .map(move |(a, net)| (*net, p, a))
            })
            .collect();
        let mut per_family = [0usize; 2];
        for &(net, p, a) in &all {
            let count = &mut per_family[usize::from(matches!(net, IpNet::V6(_)))];
            *count += 1;
            if *count > self.limits.peer_prefixes_per_family {
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{p}].addresses[{a}]"),
                    format!(
                        "more than {} {} peer prefixes; the kernel peer map holds no more",
                        self.limits.peer_prefixes_per_family,
                        family(&net)
                    ),
                ));
            }
        }
        all.sort_unstable();
        // Open prefixes that contain the current one. Overlaps within one peer
        // are harmless; across peers the first one is an error, so everything
        // on the stack belongs to one peer and checking the top is enough.
        let mut open: Vec<(IpNet, usize, usize)> = Vec::new();
        for &current in &all {
            while open
                .last()
                .is_some_and(|(outer, ..)| !outer.contains(&current.0))
            {
                open.pop();
            }
            if let Some(&outer) = open.last()
                && outer.1 != current.1
            {
                // Report the one written later in the file.
                let (later, earlier) = if (outer.1, outer.2) > (current.1, current.2) {
                    (outer, current)
                } else {
                    (current, outer)
                };
                return Err(self.at.invalid(
                    &format!("tunnel.peer[{}].addresses[{}]", later.1, later.2),
                    format!(
                        "{} overlaps {} of peer \"{}\" (tunnel.peer[{}].addresses[{}]); \
                         a source address must belong to exactly one peer",
                        later.0, earlier.0, peers[earlier.1].name, earlier.1, earlier.2
                    ),
                ));
            }
            open.push(current);
        }
        Ok(())
    }

    pub(crate) fn audit(&self, raw: Option<RawAudit>) -> Result<AuditSettings, ConfigError> {
        let raw = self.required(
            raw,
            "audit",
            "an [audit] table with path = \"/var/log/ztxdp/audit.jsonl\"",
        )?;
        let path = self.required(
            raw.path,
            "audit.path",
            "the audit log file, e.g. \"/var/log/ztxdp/audit.jsonl\"",
        )?;
        if path.as_os_str().is_empty() {
            return Err(self
                .at
                .invalid("audit.path", "empty; give the audit log file path"));
        }
        let mut audit = AuditSettings::new(path);
        audit.format = match raw.format.as_deref() {
            None | Some("ecs") => AuditFormat::Ecs,
            Some("ocsf") => AuditFormat::Ocsf,
            Some(other) => {
                return Err(self.at.invalid(
                    "audit.format",
                    format!("unknown format \"{other}\"; use \"ecs\" or \"ocsf\""),
                ));
            }
        };
        audit.rotate_bytes = match raw.rotate_bytes {
            None => audit.rotate_bytes,
            // 0: never rotate.
            Some(0) => 0,
            Some(n) => self.audit_number(n, "audit.rotate_bytes", MIN_ROTATE_BYTES..=u64::MAX)?,
        };
        if let Some(n) = raw.keep {
            // At least one: the newest rotated file tells a restarted
            // daemon where the sequence and the chain go on.
            let keep = self.audit_number(n, "audit.keep", 1..=MAX_KEEP)?;
            audit.keep = u32::try_from(keep).unwrap_or(u32::MAX);
        }
        if let Some(n) = raw.fsync_ms {
            let ms = self.audit_number(n, "audit.fsync_ms", 0..=MAX_FSYNC_MS)?;
            audit.fsync = Duration::from_millis(ms);
        }
        if let Some(state) = raw.state {
            // The state is what shows that a trail was deleted: it must not
            // be one of the trail's own files, nor go with them.
            let trail_file = |p: &Path| {
                p == audit.path
                    || p.parent() == audit.path.parent()
                        && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                            audit
                                .path
                                .file_name()
                                .and_then(|b| b.to_str())
                                .and_then(|b| n.strip_prefix(b))
                                .is_some_and(|rest| rest.starts_with('.'))
                        })
            };
            if state.as_os_str().is_empty() || trail_file(&state) {
                return Err(self.at.invalid(
                    "audit.state",
                    "must name a file apart from the audit trail and its rotated files, \
                     e.g. \"/var/lib/ztxdp/audit.state\"",
                ));
            }
            audit.state = state;
        }
        if let Some(raw) = raw.syslog {
            audit.syslog = Some(self.syslog(raw)?);
        }
        if let Some(name) = raw.socket_group {
            let gid = group_id(&name).ok_or_else(|| {
                self.at.invalid(
                    "audit.socket_group",
                    format!(
                        "no group \"{name}\" on this host; create it (groupadd) or name another"
                    ),
                )
            })?;
            audit.socket_group = Some(SocketGroup { name, gid });
        }
        Ok(audit)
    }

    pub(crate) fn syslog(&self, raw: RawSyslog) -> Result<SyslogSettings, ConfigError> {
        let address = self.required(
            raw.address,
            "audit.syslog.address",
            "the collector's HOST:PORT, e.g. \"127.0.0.1:514\"",
        )?;
        let host = address.rsplit_once(':').and_then(|(host, port)| {
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let port = port.parse::<u16>().ok().filter(|p| *p != 0);
            (!bare.is_empty() && port.is_some()).then_some(host)
        });
        let Some(host) = host else {
            return Err(self.at.invalid(
                "audit.syslog.address",
                format!("\"{address}\" is not HOST:PORT (e.g. \"127.0.0.1:514\", \"[::1]:514\")"),
            ));
        };
        let queue = match raw.queue {
            Some(n) => self.audit_number(n, "audit.syslog.queue", 1..=MAX_SYSLOG_QUEUE)?,
            None => SyslogSettings::DEFAULT_QUEUE as u64,
        };
        let tls = if raw.tls == Some(true) {
            let ca_file = self.required(
                raw.ca_file,
                "audit.syslog.ca_file",
                "the PEM file of the CAs the collector's certificate chains to, \
                 e.g. \"/etc/ztxdp/syslog-ca.pem\"",
            )?;
            let refused = |key: &str, e: tls::TlsError| self.at.invalid(key, e.to_string());
            let anchors =
                tls::certificates(&ca_file).map_err(|e| refused("audit.syslog.ca_file", e))?;
            let identity = match (raw.cert_file, raw.key_file) {
                (None, None) => None,
                (Some(cert_file), Some(key_file)) => Some(tls::ClientIdentity {
                    chain: tls::certificates(&cert_file)
                        .map_err(|e| refused("audit.syslog.cert_file", e))?,
                    cert_file,
                    key: tls::private_key(&key_file)
                        .map_err(|e| refused("audit.syslog.key_file", e))?,
                    key_file,
                }),
                (Some(_), None) => {
                    return Err(self.at.invalid(
                        "audit.syslog.key_file",
                        "missing; cert_file needs the PEM file of its private key",
                    ));
                }
                (None, Some(_)) => {
                    return Err(self.at.invalid(
                        "audit.syslog.cert_file",
                        "missing; key_file needs the PEM file of its certificate",
                    ));
                }
            };
            let name = raw.server_name.as_deref().unwrap_or(host);
            let server_name = tls::server_name(name).map_err(|e| {
                let key = if raw.server_name.is_some() {
                    "audit.syslog.server_name"
                } else {
                    "audit.syslog.address"
                };
                refused(key, e)
            })?;
            Some(
                tls::SyslogTls::new(ca_file, anchors, identity, server_name).map_err(|e| {
                    let key = match &e {
                        tls::TlsError::Anchor { .. } => "audit.syslog.ca_file",
                        tls::TlsError::ClientKey { .. } => "audit.syslog.key_file",
                        _ => "audit.syslog.tls",
                    };
                    refused(key, e)
                })?,
            )
        } else {
            // Without tls = true these would be ignored, and records would
            // go in clear text to someone who meant them encrypted.
            let stray = [
                ("audit.syslog.ca_file", raw.ca_file.is_some()),
                ("audit.syslog.cert_file", raw.cert_file.is_some()),
                ("audit.syslog.key_file", raw.key_file.is_some()),
                ("audit.syslog.server_name", raw.server_name.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.at.invalid(
                    key,
                    "only used with TLS; add tls = true to [audit.syslog], or remove it",
                ));
            }
            None
        };
        Ok(SyslogSettings {
            address,
            queue: usize::try_from(queue).unwrap_or(usize::MAX),
            tls,
        })
    }

    /// A whole number of an `[audit]` key within `range`.
    pub(crate) fn audit_number(
        &self,
        value: i64,
        key: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        u64::try_from(value)
            .ok()
            .filter(|n| range.contains(n))
            .ok_or_else(|| {
                let upper = if *range.end() == u64::MAX {
                    String::new()
                } else {
                    format!(" to {}", range.end())
                };
                let zero = if key == "audit.rotate_bytes" {
                    " (or 0 to never rotate)"
                } else {
                    ""
                };
                self.at.invalid(
                    key,
                    format!(
                        "{value} is out of range; use {}{upper}{zero}",
                        range.start()
                    ),
                )
            })
    }

    pub(crate) fn interface(
        &self,
        name: Option<String>,
        key: &str,
        what: &str,
    ) -> Result<String, ConfigError> {
        let name = self.required(name, key, what)?;
        // The kernel's own rule (dev_valid_name): 1-15 bytes, not "." or
        // "..", no '/', ':' or whitespace.
        let valid = !name.is_empty()
            && name.len() <= MAX_INTERFACE_NAME
            && name != "."
            && name != ".."
            && !name.contains(['/', ':', '\0'])
            && !name.chars().any(char::is_whitespace);
        if !valid {
            return Err(self.at.invalid(
                key,
                format!("\"{name}\" is not a valid interface name (1-15 characters, no '/', ':' or spaces)"),
            ));
        }
        Ok(name)
    }

    pub(crate) fn port(&self, value: i64, key: &str) -> Result<u16, ConfigError> {
        match u16::try_from(value) {
            Ok(0) => Err(self.at.invalid(key, "port 0 is not a port; use 1-65535")),
            Ok(port) => Ok(port),
            Err(_) => Err(self
                .at
                .invalid(key, format!("port {value} is out of range; use 1-65535"))),
        }
    }

    pub(crate) fn prefix(&self, text: &str, key: &str) -> Result<IpNet, ConfigError> {
        let net = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                self.at.invalid(
                    key,
                    format!("\"{text}\" is not an address prefix (e.g. 192.0.2.0/24, 2001:db8::/32, 192.0.2.10)"),
                )
            })?;
        Ok(net.trunc())
    }
}

pub(crate) fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}
