//! The validated policy: what `config` produces, what `tables` writes into
//! the BPF maps, and what `model` evaluates. Plain data, no parsing.

use std::{borrow::Cow, fmt, path::PathBuf, time::Duration};

use ipnet::IpNet;

use crate::audit::syslog::tls::SyslogTls;

/// A transport protocol a port grant applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as used in `zt_common::GrantKey::protocol`.
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => zt_common::proto::TCP,
            Self::Udp => zt_common::proto::UDP,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// One tunnel grant: a port range of one protocol, or ICMP echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Grant {
    /// Ports `first..=last` (`first == last` for a single port; never 0).
    Ports {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// ICMP and `ICMPv6` echo requests.
    Icmp,
}

/// The configuration-file form: `tcp/5432`, `udp/8000-8100`, `icmp`.
impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ports {
                protocol,
                first,
                last,
            } if first == last => write!(f, "{}/{first}", protocol.name()),
            Self::Ports {
                protocol,
                first,
                last,
            } => write!(f, "{}/{first}-{last}", protocol.name()),
            Self::Icmp => f.write_str("icmp"),
        }
    }
}

/// Whether a program or tunnel peer enforces its policy (`mode`).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// What the policy drops, drops.
    #[default]
    Enforce,
    /// What the policy drops passes, counted under its reason and as a
    /// would-drop, and audited as a would-deny; parse failures still drop
    /// (`zt_common::reason::drops_in_audit`).
    Audit,
}

impl Mode {
    /// The configuration-file spelling.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }

    /// From the configuration-file spelling.
    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Enforce, Self::Audit]
            .into_iter()
            .find(|m| m.name() == name)
    }
}

/// The edge (XDP) policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgePolicy {
    /// External interface, e.g. `eth0`.
    pub interface: String,
    /// UDP ports that pass from anywhere (`WireGuard`).
    pub wireguard_ports: Vec<u16>,
    /// TCP port open to `ssh_allow`.
    pub ssh_port: u16,
    /// Sources allowed to reach `ssh_port`, IPv4 and IPv6.
    pub ssh_allow: Vec<IpNet>,
    /// The `[[edge.service]]` tables, in file order. With the `ssh`
    /// service of `ssh_port` and `ssh_allow` first, [`Self::services`]
    /// gives every service the edge opens.
    pub services: Vec<Service>,
    /// ICMP echo requests to the host, per source (`edge.icmp_echo_rate`,
    /// `edge.icmp_echo_burst`).
    pub icmp_echo: EchoRate,
    /// The top-level `mode`; fixed when the edge program is loaded.
    pub mode: Mode,
}

impl EdgePolicy {
    /// The name of the service `ssh_port` and `ssh_allow` define.
    pub const SSH_SERVICE: &str = "ssh";

    /// Every service the edge opens, the `ssh` service first, then the
    /// `[[edge.service]]` tables in file order: a service's position is
    /// its bit in the kernel's service masks, and where services share a
    /// port, the first that admits a source is the one a decision names.
    pub fn services(&self) -> impl Iterator<Item = ServiceView<'_>> {
        let ssh = ServiceView {
            name: Self::SSH_SERVICE,
            ports: Cow::Owned(vec![PortRange {
                protocol: Protocol::Tcp,
                first: self.ssh_port,
                last: self.ssh_port,
            }]),
            from: &self.ssh_allow,
        };
        std::iter::once(ssh).chain(self.services.iter().map(Service::view))
    }
}

/// Ports `first..=last` of one transport protocol (`first == last` for a
/// single port; never 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRange {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    /// Whether it holds `port` of `protocol`.
    #[must_use]
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.protocol == protocol && (self.first..=self.last).contains(&port)
    }

    /// Whether it shares a port with `other`.
    #[must_use]
    pub fn overlaps(&self, other: &Self) -> bool {
        self.protocol == other.protocol && self.first <= other.last && other.first <= self.last
    }
}

/// The configuration-file form: `tcp/443`, `udp/8000-8100`.
impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Grant::Ports {
            protocol: self.protocol,
            first: self.first,
            last: self.last,
        }
        .fmt(f)
    }
}

/// An edge service (`[[edge.service]]`): TCP and UDP ports open to a set
/// of sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Unique among the edge's services; named in audit records.
    pub name: String,
    /// `allow`: never empty.
    pub ports: Vec<PortRange>,
    /// `from`: the sources the ports are open to; any prefix holding an
    /// address admits it.
    pub from: Vec<IpNet>,
}

impl Service {
    /// As [`EdgePolicy::services`] lists it.
    #[must_use]
    pub fn view(&self) -> ServiceView<'_> {
        ServiceView {
            name: &self.name,
            ports: Cow::Borrowed(&self.ports),
            from: &self.from,
        }
    }
}

/// A service as [`EdgePolicy::services`] lists it: a `[[edge.service]]`
/// table, or the `ssh` service of `ssh_port` and `ssh_allow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView<'a> {
    pub name: &'a str,
    pub ports: Cow<'a, [PortRange]>,
    pub from: &'a [IpNet],
}

/// A per-source token bucket for ICMP echo requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EchoRate {
    /// Nanoseconds to earn one echo; 0 drops every echo request.
    pub ns_per_token: u64,
    /// Echoes a quiet source may send back to back.
    pub burst: u64,
}

impl Default for EchoRate {
    /// One echo a second with a burst of five, like the usual
    /// `limit rate 1/second burst 5 packets`.
    fn default() -> Self {
        Self {
            ns_per_token: 1_000_000_000,
            burst: 5,
        }
    }
}

/// Return-traffic tracking (`[flows]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// Size of the LRU flow table; the least recently used flow goes first.
    pub max_entries: u32,
    pub tcp_established: Duration,
    /// After a FIN or RST.
    pub tcp_closing: Duration,
    pub udp: Duration,
    pub icmp: Duration,
    /// How long after a datagram's first fragment passed its later
    /// fragments follow it.
    pub fragment: Duration,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            max_entries: zt_common::capacity::FLOWS_DEFAULT,
            tcp_established: Duration::from_hours(2),
            tcp_closing: Duration::from_secs(30),
            udp: Duration::from_mins(1),
            icmp: Duration::from_secs(30),
            // The kernel's own reassembly timeout (net.ipv4.ipfrag_time):
            // a fragment later than this could not be reassembled anyway.
            fragment: Duration::from_secs(30),
        }
    }
}

/// One tunnel peer. Its index in [`TunnelPolicy::peers`] is its kernel peer
/// index (`zt_common::PeerInfo::index`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Addresses the peer sends from inside the tunnel.
    pub addresses: Vec<IpNet>,
    /// `WireGuard` public key (base64), reported in audit events.
    pub public_key: Option<String>,
    pub grants: Vec<Grant>,
    /// The peer's own `mode`, or the top-level one when it has none.
    pub mode: Mode,
}

/// A named set of peers that share grants (`[[tunnel.group]]`). Groups
/// are a control-plane notion: the kernel holds one grant bitmap per peer,
/// each member's own grants and its groups' together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    /// The members, as indices into [`TunnelPolicy::peers`], in file order.
    pub members: Vec<usize>,
    pub grants: Vec<Grant>,
}

/// The tunnel (TC) policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnelPolicy {
    /// `WireGuard` interface, e.g. `wg0`.
    pub interface: String,
    /// In a [`crate::config::Config`], each peer's `grants` are its own
    /// (`tunnel.peer[].allow`); once [`crate::grants::RuntimeGrants::apply`]
    /// merged the groups and the runtime grants, they are what the kernel
    /// enforces, which is what the tables and the model take.
    pub peers: Vec<Peer>,
    /// `[[tunnel.group]]`, in file order.
    pub groups: Vec<Group>,
    /// JSON file holding grants added and revoked at run time with
    /// `ztxdp allow`/`revoke` (`tunnel.runtime_grants`); they are applied on
    /// top of `peers[..].grants` by every `up`.
    pub runtime_grants: PathBuf,
    /// On an Ethernet tunnel device, ARP and neighbour solicitations and
    /// advertisements from link-local sources pass too, not only from a
    /// peer's addresses (`tunnel.link_local_neighbors`).
    pub link_local_neighbors: bool,
    /// The top-level `mode`: of packets from no peer's address, and of
    /// peers without a `mode` of their own. Fixed when the tunnel program
    /// is loaded.
    pub mode: Mode,
}

/// Field names of the audit records (`audit.format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditFormat {
    /// Elastic Common Schema.
    #[default]
    Ecs,
    /// OCSF 4001 Network Activity.
    Ocsf,
}

impl AuditFormat {
    /// The configuration-file spelling.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Ecs => "ecs",
            Self::Ocsf => "ocsf",
        }
    }
}

/// Forwarding of every audit record to a syslog collector (`[audit.syslog]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogSettings {
    /// `HOST:PORT` of an RFC 5424 collector over TCP (`audit.syslog.address`).
    pub address: String,
    /// Records held while the collector is slow or away; more are dropped
    /// and counted (`audit.syslog.queue`).
    pub queue: usize,
    /// RFC 5425, syslog over TLS (`audit.syslog.tls` and its files); `None`
    /// for plain TCP.
    pub tls: Option<SyslogTls>,
}

impl SyslogSettings {
    /// `audit.syslog.queue` when the file does not set it.
    pub const DEFAULT_QUEUE: usize = 10_000;
}

/// Where and how decisions are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditSettings {
    /// JSON Lines file (`audit.path`).
    pub path: PathBuf,
    pub format: AuditFormat,
    /// Size at which the file is rotated (`audit.rotate_bytes`); 0 never rotates.
    pub rotate_bytes: u64,
    /// Rotated files kept, `path.1` (newest) to `path.KEEP` (`audit.keep`, at
    /// least 1).
    pub keep: u32,
    /// Longest time a written record waits for `fdatasync` (`audit.fsync_ms`).
    pub fsync: Duration,
    pub syslog: Option<SyslogSettings>,
    /// Where the trail's head is persisted outside the trail (`audit.state`).
    pub state: PathBuf,
    /// The group whose members may read the live stream (`ztxdp events
    /// --follow`) besides root (`audit.socket_group`); `None`: root only.
    pub socket_group: Option<SocketGroup>,
}

/// A group of this host, by name and id (`audit.socket_group`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGroup {
    pub name: String,
    pub gid: u32,
}

impl AuditSettings {
    /// `audit.rotate_bytes` when the file does not set it: 100 MiB.
    pub const DEFAULT_ROTATE_BYTES: u64 = 100 << 20;
    /// `audit.keep` when the file does not set it.
    pub const DEFAULT_KEEP: u32 = 10;
    /// `audit.fsync_ms` when the file does not set it.
    pub const DEFAULT_FSYNC: Duration = Duration::from_millis(100);
    /// `audit.state` when the file does not set it.
    pub const DEFAULT_STATE: &str = "/var/lib/ztxdp/audit.state";

    /// The settings for `path` with every other key at its default.
    #[must_use]
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            format: AuditFormat::default(),
            rotate_bytes: Self::DEFAULT_ROTATE_BYTES,
            keep: Self::DEFAULT_KEEP,
            fsync: Self::DEFAULT_FSYNC,
            syslog: None,
            state: PathBuf::from(Self::DEFAULT_STATE),
            socket_group: None,
        }
    }
}

/// The daemon's Prometheus endpoint (`[metrics]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Where `/metrics` is served (`metrics.listen`); no default.
    pub listen: std::net::SocketAddr,
}

/// A whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub edge: Option<EdgePolicy>,
    pub tunnel: Option<TunnelPolicy>,
    pub flows: FlowSettings,
    pub audit: AuditSettings,
    /// `None`: no listener.
    pub metrics: Option<MetricsSettings>,
    /// How often the daemon compares what the kernel runs with this
    /// policy (`drift_check_interval`); zero turns the check off.
    pub drift_check_interval: Duration,
}

impl Policy {
    /// `drift_check_interval` when the file does not set it.
    pub const DEFAULT_DRIFT_CHECK_INTERVAL: Duration = Duration::from_mins(1);
}

impl Policy {
    /// `ztxdp up --dry-run`: audit mode for the edge, the tunnel and every
    /// peer, whatever the file says.
    pub fn dry_run(&mut self) {
        if let Some(e) = &mut self.edge {
            e.mode = Mode::Audit;
        }
        if let Some(t) = &mut self.tunnel {
            t.mode = Mode::Audit;
            for p in &mut t.peers {
                p.mode = Mode::Audit;
            }
        }
    }
}
