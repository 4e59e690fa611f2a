//! `[[edge.service]]`: ports of the edge open to a set of sources.
//!
//! The `ssh` service of `edge.ssh_port` and `edge.ssh_allow` is one of
//! them (`EdgePolicy::services`), so it counts against the limit and its
//! port takes part in the overlap rule, and its name is taken.

use std::collections::{BTreeSet, HashMap};

use ipnet::IpNet;
use serde::Deserialize;
use zt_common::capacity;

use super::{
    ConfigError, MAX_PEER_NAME, parse_grant, peer_name_byte,
    validator::{Validator, family},
};
use crate::policy::{EdgePolicy, Grant, PortRange, Protocol, Service};

/// One `[[edge.service]]` table as serde reads it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    name: Option<String>,
    allow: Option<Vec<String>>,
    from: Option<Vec<String>>,
}

/// `from` when a service leaves it out: every source.
const ANYWHERE: [&str; 2] = ["0.0.0.0/0", "::/0"];

impl Validator<'_> {
    /// The `[[edge.service]]` tables of an edge whose other keys are in
    /// `edge` (its `services` still empty), checked against each other and
    /// against the `ssh` service.
    pub(super) fn services(
        &self,
        raw: Vec<RawService>,
        edge: &EdgePolicy,
    ) -> Result<Vec<Service>, ConfigError> {
        // The ssh service takes one bit of the kernel's 64-bit masks.
        let most = capacity::SERVICES as usize - 1;
        if raw.len() > most {
            return Err(self.at.invalid(
                &format!("edge.service[{most}]"),
                format!(
                    "more than {} services; the edge holds {} (the ssh service of ssh_port \
                     and ssh_allow is one of them)",
                    capacity::SERVICES,
                    capacity::SERVICES
                ),
            ));
        }
        let mut sources = SourceCount::new(&edge.ssh_allow, self.limits.ssh_allow_per_family);
        let mut services = Vec::with_capacity(raw.len());
        for (i, raw) in raw.into_iter().enumerate() {
            let service = self.service(raw, i, &edge.wireguard_ports)?;
            for (j, net) in service.from.iter().enumerate() {
                sources.add(*net).map_err(|limit| {
                    self.at.invalid(
                        &format!("edge.service[{i}].from[{j}]"),
                        format!(
                            "more than {limit} distinct {} prefixes in ssh_allow and the \
                             services' from lists; the kernel's source map holds no more",
                            family(net)
                        ),
                    )
                })?;
            }
            services.push(service);
        }
        self.distinct(edge, &services)?;
        Ok(services)
    }

    fn service(
        &self,
        raw: RawService,
        index: usize,
        wireguard_ports: &[u16],
    ) -> Result<Service, ConfigError> {
        let at = format!("edge.service[{index}]");
        let name = self.required(
            raw.name,
            &format!("{at}.name"),
            "a unique service name, e.g. \"https\"",
        )?;
        // Names go into audit records and terminals, as peer names do.
        if name.is_empty() || name.len() > MAX_PEER_NAME || !name.bytes().all(peer_name_byte) {
            let shown: String = name.chars().take(40).collect();
            return Err(self.at.invalid(
                &format!("{at}.name"),
                format!(
                    "{shown:?} is not a service name: use 1 to {MAX_PEER_NAME} of \
                     A-Z a-z 0-9 . _ - (names appear in audit records and terminals)"
                ),
            ));
        }
        if name == EdgePolicy::SSH_SERVICE {
            return Err(self.at.invalid(
                &format!("{at}.name"),
                "\"ssh\" is the service of edge.ssh_port and edge.ssh_allow; set those, \
                 or pick another name",
            ));
        }
        let key = format!("{at}.allow");
        let texts = self.required(
            raw.allow,
            &key,
            "the ports the service opens, e.g. [\"tcp/443\", \"udp/443\"]",
        )?;
        if texts.is_empty() {
            return Err(self
                .at
                .invalid(&key, "empty; a service opens at least one port"));
        }
        let mut ports = Vec::with_capacity(texts.len());
        for (i, text) in texts.iter().enumerate() {
            let key = format!("{key}[{i}]");
            let range = match parse_grant(text) {
                Ok(Grant::Ports {
                    protocol,
                    first,
                    last,
                }) => PortRange {
                    protocol,
                    first,
                    last,
                },
                Ok(Grant::Icmp) => {
                    return Err(self.at.invalid(
                        &key,
                        "a service opens TCP or UDP ports; echo requests to the edge are \
                         edge.icmp_echo_rate's",
                    ));
                }
                Err(e) => return Err(self.at.invalid(&key, e.to_string())),
            };
            // The edge passes a WireGuard port before it looks for a
            // service, so a service there would never be the one deciding.
            if range.protocol == Protocol::Udp
                && let Some(port) = wireguard_ports
                    .iter()
                    .find(|&&p| range.contains(Protocol::Udp, p))
            {
                return Err(self.at.invalid(
                    &key,
                    format!(
                        "udp/{port} is a WireGuard port (edge.wireguard_ports), open to \
                         every source already"
                    ),
                ));
            }
            ports.push(range);
        }
        let from = match raw.from {
            Some(texts) => texts
                .iter()
                .enumerate()
                .map(|(i, text)| self.prefix(text, &format!("{at}.from[{i}]")))
                .collect::<Result<Vec<_>, _>>()?,
            None => ANYWHERE
                .iter()
                .map(|text| self.prefix(text, &format!("{at}.from")))
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(Service { name, ports, from })
    }

    /// Names are unique, and two services that share a port admit
    /// different sources: otherwise the later one could never be the one
    /// a decision names, and is a mistake.
    fn distinct(&self, edge: &EdgePolicy, services: &[Service]) -> Result<(), ConfigError> {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            if let Some(first) = names.insert(&s.name, i) {
                return Err(self.at.invalid(
                    &format!("edge.service[{i}].name"),
                    format!(
                        "service name \"{}\" is already used by edge.service[{first}]",
                        s.name
                    ),
                ));
            }
        }
        // `edge` has no services yet: its ssh service, then these.
        let all: Vec<_> = edge
            .services()
            .take(1)
            .chain(services.iter().map(Service::view))
            .collect();
        // Position 0 is the ssh service; `services[i]` is at i + 1.
        for (later, service) in all.iter().enumerate().skip(1) {
            for earlier in &all[..later] {
                let Some((mine, theirs)) = service.ports.iter().enumerate().find_map(|(k, p)| {
                    earlier
                        .ports
                        .iter()
                        .find(|q| p.overlaps(q))
                        .map(|q| ((k, p), q))
                }) else {
                    continue;
                };
                let set = |from: &[IpNet]| from.iter().copied().collect::<BTreeSet<_>>();
                if set(service.from) == set(earlier.from) {
                    let (k, p) = mine;
                    return Err(self.at.invalid(
                        &format!("edge.service[{}].allow[{k}]", later - 1),
                        format!(
                            "{p} overlaps {theirs} of service \"{}\", which admits the same \
                             sources; services may share a port only when their from lists \
                             differ",
                            earlier.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Distinct source prefixes per family, against the kernel map's size.
struct SourceCount {
    seen: BTreeSet<IpNet>,
    per_family: [usize; 2],
    limit: usize,
}

impl SourceCount {
    fn new(ssh_allow: &[IpNet], limit: usize) -> Self {
        let mut count = Self {
            seen: BTreeSet::new(),
            per_family: [0; 2],
            limit,
        };
        for net in ssh_allow {
            // ssh_allow was held to the limit already.
            let _ = count.add(*net);
        }
        count
    }

    /// Counts `net`; `Err(limit)` when its family holds more than the map.
    fn add(&mut self, net: IpNet) -> Result<(), usize> {
        if !self.seen.insert(net) {
            return Ok(());
        }
        let n = &mut self.per_family[usize::from(matches!(net, IpNet::V6(_)))];
        *n += 1;
        if *n > self.limit {
            Err(self.limit)
        } else {
            Ok(())
        }
    }
}
