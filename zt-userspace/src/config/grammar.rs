//! The file's grammar: the grant syntax (`tcp/5432`, `5432/tcp`, `icmp`)
//! and the `Raw*` tables serde reads the file into.

use std::path::PathBuf;

use serde::Deserialize;

use super::{group, service};
use crate::policy::{Grant, Protocol};

/// Why a grant (`tcp/5432`, `5432/tcp`, `icmp`, ...) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("port 0 cannot be granted (ports are 1-65535)")]
    PortZero,
    #[error("range {first}-{last} ends before it starts; write it low-high")]
    RangeReversed { first: u16, last: u16 },
    #[error("unknown protocol \"{protocol}\"; expected tcp or udp (or icmp alone)")]
    UnknownProtocol { protocol: String },
    #[error("\"{text}\" is not a port number (1-65535)")]
    BadPort { text: String },
    /// Not shaped like a grant at all, e.g. a CLI grant in the config file.
    #[error("\"{text}\" is not a grant; expected {expected}")]
    Form {
        text: String,
        expected: &'static str,
    },
}

pub(crate) const CONFIG_GRANT_FORM: &str =
    "PROTO/PORT or PROTO/FIRST-LAST (tcp/5432, udp/53, tcp/8000-8100) or icmp";
pub(crate) const CLI_GRANT_FORM: &str =
    "PORT[/PROTO] or FIRST-LAST[/PROTO] (5432, 53/udp, 8000-8100/tcp) or icmp";

/// Parses a grant as written in the configuration file: `tcp/5432`,
/// `udp/53`, `tcp/8000-8100` or `icmp`.
///
/// # Errors
/// A [`GrantError`] saying what is wrong with `s`.
pub fn parse_grant(s: &str) -> Result<Grant, GrantError> {
    if s.eq_ignore_ascii_case("icmp") {
        return Ok(Grant::Icmp);
    }
    let Some((protocol, ports)) = s.split_once('/') else {
        return Err(GrantError::Form {
            text: s.to_owned(),
            expected: CONFIG_GRANT_FORM,
        });
    };
    let protocol = transport(protocol, s, CONFIG_GRANT_FORM)?;
    let (first, last) = port_range(ports)?;
    Ok(Grant::Ports {
        protocol,
        first,
        last,
    })
}

/// Parses a grant as written on the command line: `5432` (TCP), `5432/tcp`,
/// `53/udp`, `8000-8100/tcp` or `icmp`.
///
/// # Errors
/// A [`GrantError`] saying what is wrong with `s`.
pub fn parse_cli_grant(s: &str) -> Result<Grant, GrantError> {
    if s.eq_ignore_ascii_case("icmp") {
        return Ok(Grant::Icmp);
    }
    let (ports, protocol) = match s.split_once('/') {
        Some((ports, protocol)) => (ports, transport(protocol, s, CLI_GRANT_FORM)?),
        None => (s, Protocol::Tcp),
    };
    let (first, last) = port_range(ports)?;
    Ok(Grant::Ports {
        protocol,
        first,
        last,
    })
}

pub(crate) fn transport(
    name: &str,
    whole: &str,
    expected: &'static str,
) -> Result<Protocol, GrantError> {
    if name.eq_ignore_ascii_case("tcp") {
        Ok(Protocol::Tcp)
    } else if name.eq_ignore_ascii_case("udp") {
        Ok(Protocol::Udp)
    } else if name.eq_ignore_ascii_case("icmp") {
        // ICMP grants echo as a whole; a port after it is a mistake.
        Err(GrantError::Form {
            text: whole.to_owned(),
            expected,
        })
    } else {
        Err(GrantError::UnknownProtocol {
            protocol: name.to_owned(),
        })
    }
}

pub(crate) fn port_range(text: &str) -> Result<(u16, u16), GrantError> {
    let Some((first, last)) = text.split_once('-') else {
        let port = grant_port(text)?;
        return Ok((port, port));
    };
    let (first, last) = (grant_port(first)?, grant_port(last)?);
    if last < first {
        return Err(GrantError::RangeReversed { first, last });
    }
    Ok((first, last))
}

pub(crate) fn grant_port(text: &str) -> Result<u16, GrantError> {
    // `str::parse` would also take "+80"; a port is digits only.
    let bad = || GrantError::BadPort {
        text: text.to_owned(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match text.parse::<u16>() {
        Ok(0) => Err(GrantError::PortZero),
        Ok(port) => Ok(port),
        Err(_) => Err(bad()),
    }
}

// The file as serde sees it. Every key is optional here so that our own code,
// which knows the key's name, reports a missing one.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    // Read wide so that a negative number gets our message.
    pub(crate) drift_check_interval: Option<i64>,
    pub(crate) mode: Option<String>,
    pub(crate) edge: Option<RawEdge>,
    pub(crate) tunnel: Option<RawTunnel>,
    pub(crate) flows: Option<RawFlows>,
    pub(crate) audit: Option<RawAudit>,
    pub(crate) metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub(crate) listen: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEdge {
    pub(crate) interface: Option<String>,
    // Ports are read wide so that 0 and 70000 get our message, not serde's.
    pub(crate) wireguard_ports: Option<Vec<i64>>,
    pub(crate) ssh_port: Option<i64>,
    pub(crate) ssh_allow: Option<Vec<String>>,
    pub(crate) icmp_echo_rate: Option<String>,
    pub(crate) icmp_echo_burst: Option<i64>,
    pub(crate) service: Option<Vec<service::RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTunnel {
    pub(crate) interface: Option<String>,
    pub(crate) runtime_grants: Option<PathBuf>,
    pub(crate) link_local_neighbors: Option<bool>,
    pub(crate) peer: Option<Vec<RawPeer>>,
    pub(crate) group: Option<Vec<group::RawGroup>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeer {
    pub(crate) name: Option<String>,
    pub(crate) addresses: Option<Vec<String>>,
    pub(crate) public_key: Option<String>,
    pub(crate) allow: Option<Vec<String>>,
    pub(crate) mode: Option<String>,
}

// Numbers are read wide for the same reason as ports.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlows {
    pub(crate) max_entries: Option<i64>,
    pub(crate) tcp_established_timeout: Option<i64>,
    pub(crate) tcp_closing_timeout: Option<i64>,
    pub(crate) udp_timeout: Option<i64>,
    pub(crate) icmp_timeout: Option<i64>,
    pub(crate) fragment_timeout: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    pub(crate) path: Option<PathBuf>,
    pub(crate) format: Option<String>,
    // Numbers are read wide so that negative values get our message.
    pub(crate) rotate_bytes: Option<i64>,
    pub(crate) keep: Option<i64>,
    pub(crate) fsync_ms: Option<i64>,
    pub(crate) state: Option<PathBuf>,
    pub(crate) syslog: Option<RawSyslog>,
    pub(crate) socket_group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSyslog {
    pub(crate) address: Option<String>,
    pub(crate) queue: Option<i64>,
    pub(crate) tls: Option<bool>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
}
