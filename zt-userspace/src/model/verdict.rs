//! The policy decisions of the model: `zt-ebpf/src/verdict.rs`, over the
//! policy's prefixes and port ranges rather than the maps.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use ipnet::IpNet;
use zt_common::{proto, reason};

use super::flows::{FlowTable, Ingress};
use super::parse::{Bytes, Packet, parse_ethernet, parse_link};
use super::{Explanation, Fact};
use crate::policy::{
    EchoRate, EdgePolicy, FlowSettings, Grant, Mode, PortRange, Protocol, TunnelPolicy,
};

/// Longest-prefix match: the prefixes in a hash map, probed from the longest
/// prefix length in use to the shortest.
#[derive(Clone, Debug)]
pub(crate) struct PrefixMap<V> {
    pub(crate) map: HashMap<IpNet, V>,
    /// Prefix lengths in use, longest first.
    pub(crate) v4_lengths: Vec<u8>,
    pub(crate) v6_lengths: Vec<u8>,
}

impl<V: Copy> PrefixMap<V> {
    /// A later entry for the same prefix replaces an earlier one, as a
    /// second update of the same trie key does.
    pub(crate) fn new(entries: impl IntoIterator<Item = (IpNet, V)>) -> Self {
        let mut map = HashMap::new();
        let (mut v4, mut v6) = (BTreeSet::new(), BTreeSet::new());
        for (net, value) in entries {
            match net {
                IpNet::V4(_) => v4.insert(net.prefix_len()),
                IpNet::V6(_) => v6.insert(net.prefix_len()),
            };
            map.insert(net.trunc(), value);
        }
        Self {
            map,
            v4_lengths: v4.into_iter().rev().collect(),
            v6_lengths: v6.into_iter().rev().collect(),
        }
    }

    /// The longest prefix holding `addr`, with its value.
    pub(crate) fn longest_match(&self, addr: IpAddr) -> Option<(IpNet, V)> {
        let lengths = match addr {
            IpAddr::V4(_) => &self.v4_lengths,
            IpAddr::V6(_) => &self.v6_lengths,
        };
        lengths.iter().find_map(|&len| {
            let net = IpNet::new(addr, len).ok()?.trunc();
            self.map.get(&net).map(|&v| (net, v))
        })
    }
}

/// One edge service, as the model reads it: port ranges, and the
/// sources as prefixes to match.
#[derive(Clone, Debug)]
pub(crate) struct ModelService {
    pub(crate) ports: Vec<PortRange>,
    pub(crate) from: PrefixMap<()>,
}

/// The edge program's decisions for one [`EdgePolicy`].
#[derive(Clone, Debug)]
pub struct EdgeModel {
    pub(crate) wireguard_ports: BTreeSet<u16>,
    /// [`EdgePolicy::services`], in order.
    pub(crate) services: Vec<ModelService>,
    pub(crate) echo: EchoRate,
    pub(crate) mode: Mode,
}

impl EdgeModel {
    #[must_use]
    pub fn new(p: &EdgePolicy) -> Self {
        Self {
            wireguard_ports: p.wireguard_ports.iter().copied().collect(),
            services: p
                .services()
                .map(|s| ModelService {
                    ports: s.ports.into_owned(),
                    from: PrefixMap::new(s.from.iter().map(|net| (*net, ()))),
                })
                .collect(),
            echo: p.icmp_echo,
            mode: p.mode,
        }
    }

    /// The edge's mode: with [`passes`] and [`would_drop`], what
    /// `zt_edge` does with a packet of a given reason.
    #[must_use]
    pub const fn mode(&self) -> Mode {
        self.mode
    }

    /// The reason code (`zt_common::reason`) `zt_edge` gives the Ethernet
    /// frame `frame` when it is the first packet of a freshly configured
    /// program: no reply is admitted, every ICMP error is unrelated, no later
    /// fragment follows a first, and an echo request passes unless
    /// `icmp_echo_rate` is "0". For anything later, use [`StatefulModel`].
    #[must_use]
    pub fn verdict(&self, frame: &[u8]) -> u32 {
        let mut fresh = FlowTable::new(&FlowSettings::default(), self.echo);
        self.judge(frame, &mut fresh, 0, &mut Vec::new())
    }

    /// The service a decision about TCP or UDP (`protocol`) to `port`
    /// from `source` names (see [`Explanation::service`]); `None` for a
    /// port of no service.
    #[must_use]
    pub fn service_of(&self, protocol: Protocol, port: u16, source: IpAddr) -> Option<u32> {
        let mut facts = Vec::new();
        self.decide_service(protocol, port, source, &mut facts);
        named_service(&facts)
    }

    pub(crate) fn judge(
        &self,
        frame: &[u8],
        flows: &mut FlowTable,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let b = Bytes(frame);
        match parse_ethernet(b) {
            Ok(p) => {
                let code = match self.decide(&p, facts) {
                    code if reason::is_allow(code) => code,
                    code => flows.second_chance(b, &p, code, Ingress::Edge, now_ns, facts),
                };
                flows.remember_fragment(&p, code, now_ns);
                code
            }
            Err(e) => e.reason(),
        }
    }

    pub(crate) fn decide(&self, p: &Packet, facts: &mut Vec<Fact>) -> u32 {
        if p.is_arp() {
            return reason::PASS_ARP;
        }
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        match p.protocol {
            proto::UDP => {
                let listed = self.wireguard_ports.contains(&p.dst_port);
                facts.push(Fact::WireguardPort {
                    port: p.dst_port,
                    listed,
                });
                if listed {
                    reason::PASS_WIREGUARD
                } else {
                    self.decide_packet_service(p, Protocol::Udp, facts)
                }
            }
            proto::TCP => self.decide_packet_service(p, Protocol::Tcp, facts),
            _ if p.is_neighbor_discovery() => reason::PASS_NEIGHBOR_DISCOVERY,
            _ if p.is_mld() => reason::PASS_MLD,
            _ => reason::DROP_PROTOCOL_NOT_ALLOWED,
        }
    }

    /// TCP or UDP to a port that is no `WireGuard` port: the services of
    /// the port, in order, until one admits the source. The `ssh` service
    /// (the first) keeps its own reasons.
    pub(crate) fn decide_packet_service(
        &self,
        p: &Packet,
        protocol: Protocol,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        match p.source() {
            Some(source) => self.decide_service(protocol, p.dst_port, source, facts),
            // TCP and UDP come over IP: there is always a source.
            None => reason::DROP_MALFORMED,
        }
    }

    pub(crate) fn decide_service(
        &self,
        protocol: Protocol,
        port: u16,
        source: IpAddr,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let mut of_port = self
            .services
            .iter()
            .zip(0u32..)
            .filter(|(s, _)| s.ports.iter().any(|r| r.contains(protocol, port)))
            .peekable();
        let Some(&(_, first)) = of_port.peek() else {
            facts.push(Fact::NoService {
                protocol: protocol.number(),
                port,
            });
            return reason::DROP_PORT_NOT_ALLOWED;
        };
        for (s, service) in of_port {
            let prefix = s.from.longest_match(source).map(|(net, ())| net);
            facts.push(Fact::Service {
                service,
                source,
                prefix,
            });
            if prefix.is_some() {
                return if service == 0 {
                    reason::PASS_SSH
                } else {
                    reason::PASS_SERVICE
                };
            }
        }
        if first == 0 {
            reason::DROP_SSH_SOURCE
        } else {
            reason::DROP_SERVICE_SOURCE
        }
    }

    /// Whether the policy alone passes UDP to `port` from `source`.
    pub(crate) fn passes_udp(&self, port: u16, source: IpAddr) -> bool {
        self.wireguard_ports.contains(&port)
            || self.services.iter().any(|s| {
                s.ports.iter().any(|r| r.contains(Protocol::Udp, port))
                    && s.from.longest_match(source).is_some()
            })
    }
}

/// Whether a decision of reason `code` is a service's, and names it: an
/// `ssh_allowed` or `service_allowed`, or a drop for the source.
#[must_use]
pub const fn names_service(code: u32) -> bool {
    matches!(
        code,
        reason::PASS_SSH
            | reason::PASS_SERVICE
            | reason::DROP_SSH_SOURCE
            | reason::DROP_SERVICE_SOURCE
    )
}

/// The service a decision's facts name: the one that admitted the source,
/// else the first of the port's.
pub(crate) fn named_service(facts: &[Fact]) -> Option<u32> {
    let mut first = None;
    for fact in facts {
        if let Fact::Service {
            service, prefix, ..
        } = fact
        {
            if prefix.is_some() {
                return Some(*service);
            }
            first = first.or(Some(*service));
        }
    }
    first
}

/// One tunnel decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelDecision {
    /// Reason code (`zt_common::reason`).
    pub reason: u32,
    /// Index in [`TunnelPolicy::peers`] of the peer the source address
    /// belongs to: set exactly when the kernel counts the packet for a peer
    /// (it parsed, and the source matched), whatever the reason.
    pub peer: Option<u32>,
}

/// A peer as the verdict needs it.
#[derive(Clone, Debug)]
pub(crate) struct ModelPeer {
    pub(crate) grants: Vec<Grant>,
    pub(crate) icmp: bool,
    pub(crate) mode: Mode,
}

impl ModelPeer {
    /// The grant covering `port` of `protocol` (TCP or UDP), if any.
    pub(crate) fn grant_for(&self, protocol: u8, port: u16) -> Option<Grant> {
        self.grants.iter().copied().find(|g| match *g {
            Grant::Ports {
                protocol: granted,
                first,
                last,
            } => granted.number() == protocol && (first..=last).contains(&port),
            Grant::Icmp => false,
        })
    }
}

/// The tunnel program's decisions for one [`TunnelPolicy`]. Runtime grants
/// must already be merged into the peers' `grants`.
#[derive(Clone, Debug)]
pub struct TunnelModel {
    pub(crate) peers: Vec<ModelPeer>,
    pub(crate) by_source: PrefixMap<u32>,
    /// `tunnel.link_local_neighbors`.
    pub(crate) link_local_neighbors: bool,
    /// The program's mode, for packets of no peer.
    pub(crate) mode: Mode,
}

impl TunnelModel {
    #[must_use]
    pub fn new(p: &TunnelPolicy) -> Self {
        let peers = p
            .peers
            .iter()
            .map(|peer| ModelPeer {
                grants: peer.grants.clone(),
                icmp: peer.grants.contains(&Grant::Icmp),
                mode: peer.mode,
            })
            .collect();
        let by_source = PrefixMap::new(
            (0u32..)
                .zip(&p.peers)
                .flat_map(|(index, peer)| peer.addresses.iter().map(move |net| (*net, index))),
        );
        Self {
            peers,
            by_source,
            link_local_neighbors: p.link_local_neighbors,
            mode: p.mode,
        }
    }

    /// The mode `zt_tunnel` applies to a packet of `peer` (a
    /// [`TunnelDecision::peer`]): the peer's own, or the program's for a
    /// packet of no peer.
    #[must_use]
    pub fn mode_of(&self, peer: Option<u32>) -> Mode {
        peer.and_then(|i| self.peers.get(i as usize))
            .map_or(self.mode, |p| p.mode)
    }

    /// The decision `zt_tunnel` makes on `packet` (an Ethernet frame when
    /// `l2`, the loader's `TUNNEL_L2`, else a packet starting at the IP
    /// header) when it is the first packet of a freshly configured program:
    /// no reply is admitted, every ICMP error is unrelated and no later
    /// fragment follows a first. For anything later, use [`StatefulModel`].
    #[must_use]
    pub fn verdict(&self, packet: &[u8], l2: bool) -> TunnelDecision {
        // The tunnel never rate-limits echo, so the rate is irrelevant.
        let mut fresh = FlowTable::new(&FlowSettings::default(), EchoRate::default());
        let e = self.judge(packet, l2, &mut fresh, 0);
        TunnelDecision {
            reason: e.reason,
            peer: e.peer,
        }
    }

    pub(crate) fn judge(
        &self,
        packet: &[u8],
        l2: bool,
        flows: &mut FlowTable,
        now_ns: u64,
    ) -> Explanation {
        let b = Bytes(packet);
        let mut facts = Vec::new();
        match parse_link(b, l2) {
            Ok(p) => {
                let source = p.source();
                let owner = source.and_then(|src| self.by_source.longest_match(src));
                if let Some(source) = source {
                    facts.push(Fact::Peer {
                        source,
                        owner: owner.map(|(net, index)| (index, net)),
                    });
                }
                let peer = owner.map(|(_, index)| index);
                let reason = match self.decide(&p, peer, l2, &mut facts) {
                    code if reason::is_allow(code) => code,
                    code => flows.second_chance(b, &p, code, Ingress::Tunnel, now_ns, &mut facts),
                };
                flows.remember_fragment(&p, reason, now_ns);
                Explanation {
                    reason,
                    peer,
                    service: None,
                    facts,
                }
            }
            Err(e) => Explanation {
                reason: e.reason(),
                peer: None,
                service: None,
                facts,
            },
        }
    }

    /// Whether the policy alone passes UDP from `peer_addr` to `port`: the
    /// peer owning the address is granted it.
    pub(crate) fn passes_udp(&self, peer_addr: IpAddr, port: u16) -> bool {
        self.by_source
            .longest_match(peer_addr)
            .and_then(|(_, i)| self.peers.get(i as usize))
            .is_some_and(|peer| peer.grant_for(proto::UDP, port).is_some())
    }

    pub(crate) fn decide(
        &self,
        p: &Packet,
        peer: Option<u32>,
        l2: bool,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        // A peer is never the host's router.
        if p.is_router_message() {
            return reason::DROP_ROUTER_MESSAGE;
        }
        // ARP and neighbour messages pass only on a link layer, from a
        // peer's address or (where allowed) a link-local one.
        let neighbor = if p.is_arp() {
            Some(reason::PASS_ARP)
        } else if p.is_neighbor_discovery() {
            Some(reason::PASS_NEIGHBOR_DISCOVERY)
        } else {
            None
        };
        if let Some(pass) = neighbor {
            return if l2 && (peer.is_some() || (self.link_local_neighbors && p.link_local_source()))
            {
                pass
            } else if peer.is_some() {
                reason::DROP_PROTOCOL_NOT_ALLOWED
            } else {
                reason::DROP_PEER_UNKNOWN
            };
        }
        let Some((index, peer)) = peer.and_then(|i| self.peers.get(i as usize).map(|p| (i, p)))
        else {
            return reason::DROP_PEER_UNKNOWN;
        };
        if p.later_fragment {
            return reason::DROP_FRAGMENT;
        }
        if p.protocol == proto::TCP || p.protocol == proto::UDP {
            let grant = peer.grant_for(p.protocol, p.dst_port);
            facts.push(Fact::Grant {
                peer: index,
                protocol: p.protocol,
                port: p.dst_port,
                grant,
            });
            if grant.is_some() {
                reason::PASS_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        } else if p.is_echo_request() {
            facts.push(Fact::IcmpGrant {
                peer: index,
                granted: peer.icmp,
            });
            if peer.icmp {
                reason::PASS_ICMP_GRANT
            } else {
                reason::DROP_NOT_GRANTED
            }
        } else {
            reason::DROP_PROTOCOL_NOT_ALLOWED
        }
    }
}

/// The edge and tunnel programs together with their shared flow state, fed
/// packets in order with the time of each (`now_ns`, as
/// `bpf_ktime_get_ns`, never going backwards).
#[derive(Clone, Debug)]
pub struct StatefulModel {
    pub(crate) edge: EdgeModel,
    pub(crate) tunnel: Option<TunnelModel>,
    pub(crate) flows: FlowTable,
}

impl StatefulModel {
    /// A freshly configured host: no flows, no echo sources seen. The echo
    /// rate is the edge's (`edge.icmp_echo_rate`).
    #[must_use]
    pub fn new(edge: &EdgePolicy, tunnel: Option<&TunnelPolicy>, flows: &FlowSettings) -> Self {
        Self {
            edge: EdgeModel::new(edge),
            tunnel: tunnel.map(TunnelModel::new),
            flows: FlowTable::new(flows, edge.icmp_echo),
        }
    }

    /// The host sends the Ethernet frame `frame` out of the edge interface
    /// `ifindex` (`zt_edge_out`). Egress is never filtered; this only
    /// records flows.
    pub fn edge_egress(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) {
        self.flows.ifindex = ifindex;
        if let Ok(p) = parse_ethernet(Bytes(frame)) {
            // A datagram from a WireGuard port, or from a service's port
            // to a source it admits, answers the edge's policy.
            let answer = p.protocol == proto::UDP
                && p.addresses()
                    .is_some_and(|(_, dst)| self.edge.passes_udp(p.src_port, dst));
            self.flows.egress(&p, answer, now_ns);
        }
    }

    /// The host sends `packet` out of the tunnel interface `ifindex`
    /// (`zt_tunnel_out`): an Ethernet frame when `l2`, else a packet
    /// starting at the IP header. Records flows only.
    pub fn tunnel_egress(&mut self, packet: &[u8], l2: bool, ifindex: u32, now_ns: u64) {
        self.flows.ifindex = ifindex;
        if let Ok(p) = parse_link(Bytes(packet), l2) {
            // A datagram from a port the destination peer is granted answers
            // the tunnel's policy.
            let answer = p.protocol == proto::UDP
                && p.addresses().is_some_and(|(_, dst)| {
                    self.tunnel
                        .as_ref()
                        .is_some_and(|t| t.passes_udp(dst, p.src_port))
                });
            self.flows.egress(&p, answer, now_ns);
        }
    }

    /// `zt_edge`'s reason code for the Ethernet frame `frame` arriving now.
    pub fn edge_ingress(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) -> u32 {
        self.explain_edge(frame, ifindex, now_ns).reason
    }

    /// [`Self::edge_ingress`], with what the decision rested on.
    pub fn explain_edge(&mut self, frame: &[u8], ifindex: u32, now_ns: u64) -> Explanation {
        self.flows.ifindex = ifindex;
        let mut facts = Vec::new();
        let reason = self.edge.judge(frame, &mut self.flows, now_ns, &mut facts);
        Explanation {
            reason,
            peer: None,
            service: names_service(reason)
                .then(|| named_service(&facts))
                .flatten(),
            facts,
        }
    }

    /// `zt_tunnel`'s decision on `packet` arriving now (framed as in
    /// [`Self::tunnel_egress`]); `None` when the model has no tunnel policy.
    pub fn tunnel_ingress(
        &mut self,
        packet: &[u8],
        l2: bool,
        ifindex: u32,
        now_ns: u64,
    ) -> Option<TunnelDecision> {
        self.explain_tunnel(packet, l2, ifindex, now_ns)
            .map(|e| TunnelDecision {
                reason: e.reason,
                peer: e.peer,
            })
    }

    /// [`Self::tunnel_ingress`], with what the decision rested on.
    pub fn explain_tunnel(
        &mut self,
        packet: &[u8],
        l2: bool,
        ifindex: u32,
        now_ns: u64,
    ) -> Option<Explanation> {
        self.flows.ifindex = ifindex;
        let tunnel = self.tunnel.as_ref()?;
        Some(tunnel.judge(packet, l2, &mut self.flows, now_ns))
    }

    /// The control plane rewrites the policy maps (`allow`, `revoke`, a
    /// reload) while the flow state stays, as it does in the kernel.
    pub fn set_policy(&mut self, edge: &EdgePolicy, tunnel: Option<&TunnelPolicy>) {
        self.edge = EdgeModel::new(edge);
        self.tunnel = tunnel.map(TunnelModel::new);
    }

    /// The edge's mode (see [`EdgeModel::mode`]).
    #[must_use]
    pub const fn edge_mode(&self) -> Mode {
        self.edge.mode
    }

    /// The tunnel's mode for `peer` (see [`TunnelModel::mode_of`]);
    /// `None` without a tunnel policy.
    #[must_use]
    pub fn tunnel_mode_of(&self, peer: Option<u32>) -> Option<Mode> {
        self.tunnel.as_ref().map(|t| t.mode_of(peer))
    }

    /// The flow state, for comparing counters and fill levels.
    #[must_use]
    pub const fn flows(&self) -> &FlowTable {
        &self.flows
    }

    /// The flow state, to fill it from a running host's maps.
    pub const fn flows_mut(&mut self) -> &mut FlowTable {
        &mut self.flows
    }
}
