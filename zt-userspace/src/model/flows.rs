//! The flow state of the model: `zt-ebpf/src/flows.rs` (flows the host
//! started, echo buckets, fragments let through), with the clock passed in.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use zt_common::{proto, reason};

use super::parse::{
    Bytes, ICMP_ECHO_REQUEST, ICMP_LEN, ICMPV6_ECHO_REQUEST, IPV4_FRAGMENT_OFFSET, IPV4_LEN,
    IPV6_LEN, Network, Packet, QUOTED_L4_LEN, be16, ipv6_at, within,
};
use super::{Fact, Seen};
use crate::policy::{EchoRate, FlowSettings};

/// A flow as the host sees it, `local` being this host: an egress packet
/// gives it as (source, destination), its reply as (destination, source).
/// An echo flow has the identifier as `local_port` and 0 as `remote_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The interface the flow left by; its replies must come in by it.
    pub ifindex: u32,
    pub local: IpAddr,
    pub remote: IpAddr,
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
}

/// What the table knows of a flow (the kernel's `FlowState`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEntry {
    pub last_seen_ns: u64,
    /// A FIN or RST was seen: the closing timeout applies.
    pub closing: bool,
    /// The host began the flow by answering what the policy passed: it
    /// admits no reply (the kernel's `FLOW_ANSWER`).
    pub answer: bool,
}

/// A fragmented datagram as all its fragments carry it: the interface it
/// arrived on, its addresses, identification and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Datagram {
    pub ifindex: u32,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
    /// IPv4's protocol; 0 for IPv6, which reassembles without it.
    pub protocol: u8,
}

/// One source's echo token bucket.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bucket {
    pub(crate) last_ns: u64,
    pub(crate) tokens: u64,
}

impl Bucket {
    /// Refills one token per `ns_per_token` elapsed, at most `cap`, and takes
    /// one if there is one. The same integer steps as the kernel's
    /// `record::take_token`, including where the refill time moves.
    pub(crate) fn take(&mut self, now_ns: u64, ns_per_token: u64, cap: u64) -> bool {
        let earned = now_ns.saturating_sub(self.last_ns) / ns_per_token;
        if earned > 0 {
            // The kernel adds in plain (wrapping) u64 arithmetic.
            self.tokens = self.tokens.wrapping_add(earned).min(cap);
            self.last_ns = now_ns;
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Which ingress program is deciding: only the edge rate-limits echo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ingress {
    Edge,
    Tunnel,
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The kernel's flow state (`ZT_FLOWS`, `ZT_ECHO_BKT`, `ZT_FLOW_CFG`,
/// `ZT_FRAGS`): flows the host started, with when each was last seen, an
/// echo token bucket per source, and the datagrams whose first fragment
/// passed, with when. One table serves both interfaces, as the one map does
/// in the kernel, but every flow is keyed by the interface it left by, so a
/// flow started through the tunnel admits no reply on the edge (that would
/// let the internet spoof tunnel peers).
#[derive(Clone, Debug)]
pub struct FlowTable {
    pub(crate) flows: HashMap<Flow, FlowEntry>,
    pub(crate) buckets: HashMap<IpAddr, Bucket>,
    pub(crate) fragments: HashMap<Datagram, u64>,
    pub(crate) tcp_established_ns: u64,
    pub(crate) tcp_closing_ns: u64,
    pub(crate) udp_ns: u64,
    pub(crate) icmp_ns: u64,
    pub(crate) fragment_ns: u64,
    pub(crate) echo: EchoRate,
    pub(crate) created: u64,
    /// The interface of the packet being judged or recorded; set by
    /// `StatefulModel` before each packet.
    pub(crate) ifindex: u32,
}

impl FlowTable {
    /// An empty table with the given timeouts and echo rate.
    #[must_use]
    pub fn new(settings: &FlowSettings, echo: EchoRate) -> Self {
        Self {
            flows: HashMap::new(),
            buckets: HashMap::new(),
            fragments: HashMap::new(),
            tcp_established_ns: nanos(settings.tcp_established),
            tcp_closing_ns: nanos(settings.tcp_closing),
            udp_ns: nanos(settings.udp),
            icmp_ns: nanos(settings.icmp),
            fragment_ns: nanos(settings.fragment),
            echo,
            created: 0,
            ifindex: 0,
        }
    }

    /// Flows created so far: the kernel's `flows_created` counter.
    #[must_use]
    pub const fn created(&self) -> u64 {
        self.created
    }

    /// Flows in the table, live or expired: entries are never removed, as
    /// in the kernel's map (short of eviction).
    #[must_use]
    pub fn entries(&self) -> usize {
        self.flows.len()
    }

    /// Puts in a flow as a running host's table holds it: `ztxdp explain`
    /// models the host from the kernel's maps this way.
    pub fn insert_flow(&mut self, flow: Flow, entry: FlowEntry) {
        self.flows.insert(flow, entry);
    }

    /// Puts in `source`'s echo token bucket: `tokens` left, last refilled
    /// at `last_ns`.
    pub fn insert_echo_bucket(&mut self, source: IpAddr, last_ns: u64, tokens: u64) {
        self.buckets.insert(source, Bucket { last_ns, tokens });
    }

    /// Puts in a datagram whose first fragment passed at `at_ns`.
    pub fn insert_fragment(&mut self, datagram: Datagram, at_ns: u64) {
        self.fragments.insert(datagram, at_ns);
    }

    pub(crate) fn timeout_ns(&self, protocol: u8, closing: bool) -> u64 {
        match protocol {
            proto::TCP if closing => self.tcp_closing_ns,
            proto::TCP => self.tcp_established_ns,
            proto::UDP => self.udp_ns,
            _ => self.icmp_ns,
        }
    }

    /// Records or refreshes the flow of a packet the host sends. New flows
    /// start only from what opens one: a TCP SYN, any UDP datagram, an echo
    /// request. A packet of a known flow refreshes it even if it expired.
    /// `answer`: the packet's reverse passes the ingress policy by itself
    /// (a UDP answer through a grant or a `WireGuard` port); a flow it
    /// starts admits no reply, then or later.
    pub(crate) fn egress(&mut self, p: &Packet, answer: bool, now_ns: u64) {
        let Some((src, dst)) = p.addresses() else {
            return;
        };
        if p.later_fragment {
            return;
        }
        let (local_port, remote_port, opens) = match p.protocol {
            proto::TCP => (p.src_port, p.dst_port, p.is_syn()),
            proto::UDP => (p.src_port, p.dst_port, true),
            _ if p.is_echo_request() => (p.icmp_id, 0, true),
            _ => return,
        };
        let flow = Flow {
            ifindex: self.ifindex,
            local: src,
            remote: dst,
            local_port,
            remote_port,
            protocol: p.protocol,
        };
        if let Some(entry) = self.flows.get_mut(&flow) {
            entry.last_seen_ns = now_ns;
            // A new SYN on a closing tuple is a new connection.
            entry.closing = if p.is_syn() {
                false
            } else {
                entry.closing || p.is_closing()
            };
            return;
        }
        if opens {
            self.flows.insert(
                flow,
                FlowEntry {
                    last_seen_ns: now_ns,
                    closing: p.is_closing(),
                    answer,
                },
            );
            self.created += 1;
        }
    }

    /// The datagram `p` is a fragment of, if it is one, on this interface.
    pub(crate) fn datagram(&self, p: &Packet) -> Option<Datagram> {
        let (src, dst) = p.addresses()?;
        (p.first_fragment || p.later_fragment).then_some(Datagram {
            ifindex: self.ifindex,
            src,
            dst,
            id: p.fragment_id,
            protocol: if src.is_ipv4() { p.protocol } else { 0 },
        })
    }

    /// Remembers the datagram of a first fragment that passed with `code`
    /// (but not neighbour discovery): its later fragments then pass for the
    /// fragment timeout. Unlike the kernel's LRU map, this table is never
    /// full; no test fills the kernel's.
    pub(crate) fn remember_fragment(&mut self, p: &Packet, code: u32, now_ns: u64) {
        if p.first_fragment
            && reason::is_allow(code)
            && code != reason::PASS_NEIGHBOR_DISCOVERY
            && let Some(d) = self.datagram(p)
        {
            self.fragments.insert(d, now_ns);
        }
    }

    /// A second look at an ingress packet the policy dropped with `code`:
    /// an exact reply, a related ICMP error, (edge only) an echo request
    /// within its source's rate, or a later fragment of a datagram whose
    /// first fragment passed recently passes; anything else keeps `code`.
    pub(crate) fn second_chance(
        &mut self,
        b: Bytes<'_>,
        p: &Packet,
        code: u32,
        ingress: Ingress,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let Some((src, dst)) = p.addresses() else {
            return code;
        };
        if p.later_fragment {
            let Some(datagram) = self.datagram(p) else {
                return code;
            };
            let age = self
                .fragments
                .get(&datagram)
                .map(|&at| now_ns.saturating_sub(at));
            facts.push(Fact::Fragment {
                datagram,
                first_passed_ns_ago: age,
            });
            return match age {
                Some(age) if age <= self.fragment_ns => reason::PASS_FRAGMENT,
                _ => code,
            };
        }
        if p.is_icmp() {
            return if p.is_echo_request() && ingress == Ingress::Edge {
                self.echo_request(src, now_ns, facts)
            } else if p.is_echo_reply() {
                let flow = Flow {
                    ifindex: self.ifindex,
                    local: dst,
                    remote: src,
                    local_port: p.icmp_id,
                    remote_port: 0,
                    protocol: p.protocol,
                };
                self.reply(flow, false, code, now_ns, facts)
            } else if p.is_icmp_error() {
                self.related(b, p, now_ns, facts)
            } else {
                code
            };
        }
        if p.protocol != proto::TCP && p.protocol != proto::UDP {
            return code;
        }
        // A SYN opens a connection; it is never a reply, whatever its ports.
        if p.is_syn() {
            facts.push(Fact::Syn);
            return code;
        }
        let flow = Flow {
            ifindex: self.ifindex,
            local: dst,
            remote: src,
            local_port: p.dst_port,
            remote_port: p.src_port,
            protocol: p.protocol,
        };
        self.reply(flow, p.is_closing(), code, now_ns, facts)
    }

    /// What the table holds of `flow` at `now_ns`.
    pub(crate) fn seen(&self, flow: &Flow, now_ns: u64) -> Option<Seen> {
        self.flows.get(flow).map(|&entry| Seen {
            entry,
            age_ns: now_ns.saturating_sub(entry.last_seen_ns),
            timeout_ns: self.timeout_ns(flow.protocol, entry.closing),
        })
    }

    /// `reply` if `flow` is live (and then it is seen now, and marked
    /// closing if `closing`), else `code`.
    pub(crate) fn reply(
        &mut self,
        flow: Flow,
        closing: bool,
        code: u32,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let seen = self.seen(&flow, now_ns);
        facts.push(Fact::Flow { flow, seen });
        let Some(Seen { entry, .. }) = seen.filter(|s| !s.entry.answer && s.live()) else {
            return code;
        };
        self.flows.insert(
            flow,
            FlowEntry {
                last_seen_ns: now_ns,
                closing: entry.closing || closing,
                answer: false,
            },
        );
        reason::PASS_REPLY
    }

    /// An ICMP error passes only if it quotes a live flow; it does not
    /// refresh the flow.
    pub(crate) fn related(
        &self,
        b: Bytes<'_>,
        p: &Packet,
        now_ns: u64,
        facts: &mut Vec<Fact>,
    ) -> u32 {
        let Some(flow) = quoted(b, p).map(|flow| Flow {
            ifindex: self.ifindex,
            ..flow
        }) else {
            facts.push(Fact::Unquoted);
            return reason::DROP_ICMP_UNRELATED;
        };
        let seen = self.seen(&flow, now_ns);
        facts.push(Fact::Flow { flow, seen });
        if seen.is_some_and(|s| s.live()) {
            reason::PASS_ICMP_RELATED
        } else {
            reason::DROP_ICMP_UNRELATED
        }
    }

    /// An echo request to the edge: a token from its source's bucket; a new
    /// source starts with a full bucket.
    pub(crate) fn echo_request(&mut self, src: IpAddr, now_ns: u64, facts: &mut Vec<Fact>) -> u32 {
        let EchoRate {
            ns_per_token,
            burst,
        } = self.echo;
        let passes = if ns_per_token == 0 {
            false
        } else if let Some(bucket) = self.buckets.get_mut(&src) {
            bucket.take(now_ns, ns_per_token, burst)
        } else if burst == 0 {
            false
        } else {
            self.buckets.insert(
                src,
                Bucket {
                    last_ns: now_ns,
                    tokens: burst - 1,
                },
            );
            true
        };
        facts.push(Fact::Echo {
            source: src,
            tokens_left: passes.then(|| self.buckets.get(&src).map_or(0, |b| b.tokens)),
        });
        if passes {
            reason::PASS_ICMP_ECHO
        } else {
            reason::DROP_ICMP_RATE
        }
    }
}

/// The flow an ICMP error `p` quotes: the quoted packet is one the host sent,
/// so its source is local. `None` when the quote is too short (an IP header
/// and 8 bytes of L4 header, within the outer packet's length), of another
/// IP version, a later fragment, an IPv6 packet with extension headers, or
/// not TCP, UDP or an echo request: such an error cannot be matched.
pub(crate) fn quoted(b: Bytes<'_>, p: &Packet) -> Option<Flow> {
    let inner = p.l4_offset + ICMP_LEN;
    let limit = p.l4_limit;
    let (v6, protocol, local, remote, l4) = match p.network {
        Network::Ipv4 { .. } => {
            within(inner, IPV4_LEN, limit).ok()?;
            let ip: [u8; IPV4_LEN] = b.array(inner).ok()?;
            let header_len = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4
                || header_len < IPV4_LEN
                || be16(ip[6], ip[7]) & IPV4_FRAGMENT_OFFSET != 0
            {
                return None;
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (false, ip[9], src.into(), dst.into(), inner + header_len)
        }
        Network::Ipv6 { .. } => {
            within(inner, IPV6_LEN, limit).ok()?;
            let ip: [u8; IPV6_LEN] = b.array(inner).ok()?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let (src, dst) = (ipv6_at(&ip[8..24]), ipv6_at(&ip[24..40]));
            (true, ip[6], src.into(), dst.into(), inner + IPV6_LEN)
        }
        Network::Arp { .. } => return None,
    };
    within(l4, QUOTED_L4_LEN, limit).ok()?;
    let hdr: [u8; QUOTED_L4_LEN] = b.array(l4).ok()?;
    let (local_port, remote_port) = match (v6, protocol) {
        (_, proto::TCP | proto::UDP) => (be16(hdr[0], hdr[1]), be16(hdr[2], hdr[3])),
        // Only the host's own echo requests can draw an error it cares about.
        (false, proto::ICMP) if hdr[0] == ICMP_ECHO_REQUEST => (be16(hdr[4], hdr[5]), 0),
        (true, proto::ICMPV6) if hdr[0] == ICMPV6_ECHO_REQUEST => (be16(hdr[4], hdr[5]), 0),
        _ => return None,
    };
    Some(Flow {
        // The caller sets the interface the error arrived by.
        ifindex: 0,
        local,
        remote,
        local_port,
        remote_port,
        protocol,
    })
}
