//! The stateful part: flows the host starts are recorded on egress, and an
//! ingress packet that the policy would drop gets a second look here. It
//! passes only as the exact reverse of a recorded, unexpired flow (a TCP SYN
//! never counts as a reply), as an ICMP error quoting such a flow, or as an
//! echo request within its source's rate. This is what nftables gets from
//! `ct state established,related` and `limit rate`, without opening a hole.
//!
//! Fragments: only a datagram's first fragment has ports, so the policy can
//! judge only that one. When it passes, the datagram is remembered, and its
//! later fragments (same interface, addresses, identification and, for
//! IPv4, protocol) pass for `fragment_ns` after it: what nftables gets from reassembling
//! before its input chain. A later fragment of a datagram whose first
//! fragment did not pass, or has not arrived yet, drops.

use zt_common::{
    CpuState, EventBucket, FLOW_ANSWER, FLOW_CLOSING, FlowConfig, FlowKey, FlowState, FragmentKey,
    SourceKey, program, proto, reason, tcp_flag,
};

use crate::{
    maps::{ZT_ECHO_BKT, ZT_FLOW_CFG, ZT_FLOWS, ZT_FRAGS, ZT_LOCAL_PORTS},
    parse::{
        self, Bounds, Fragment, ICMP_DEST_UNREACHABLE, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
        ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACHABLE, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST,
        ICMPV6_PACKET_TOO_BIG, ICMPV6_TIME_EXCEEDED, L3, Packet,
    },
    record, verdict,
};

#[inline(always)]
fn icmp_protocol(p: &Packet) -> u8 {
    if p.l3 == L3::Ipv4 {
        proto::ICMP
    } else {
        proto::ICMPV6
    }
}

#[inline(always)]
fn is_icmp(p: &Packet) -> bool {
    p.protocol == icmp_protocol(p)
}

/// The key of a flow: `local` is this host, `ports` are (local, remote).
#[inline(always)]
fn flow_key(
    ifindex: u32,
    local: &[u8; 16],
    remote: &[u8; 16],
    ports: (u16, u16),
    protocol: u8,
    ip_version: u8,
) -> FlowKey {
    FlowKey {
        ifindex,
        local: *local,
        remote: *remote,
        local_port: ports.0,
        remote_port: ports.1,
        protocol,
        ip_version,
        _pad: [0; 2],
    }
}

/// `FLOW_CLOSING` for a TCP FIN or RST, else 0.
#[inline(always)]
fn closing_flag(p: &Packet) -> u32 {
    if p.protocol == proto::TCP && p.tcp_flags & (tcp_flag::FIN | tcp_flag::RST) != 0 {
        FLOW_CLOSING
    } else {
        0
    }
}

#[inline(always)]
fn timeout(cfg: &FlowConfig, protocol: u8, flags: u32) -> u64 {
    match protocol {
        proto::TCP if flags & FLOW_CLOSING != 0 => cfg.tcp_closing_ns,
        proto::TCP => cfg.tcp_established_ns,
        proto::UDP => cfg.udp_ns,
        _ => cfg.icmp_ns,
    }
}

/// Slot of (protocol, local port) in `ZT_LOCAL_PORTS`: TCP first, then UDP.
#[inline(always)]
fn local_port_slot(protocol: u8, port: u16) -> u32 {
    let base = if protocol == proto::TCP { 0 } else { 65_536 };
    base + u32::from(port)
}

/// Whether the host ever started a flow from this local port. Set before
/// the flow is inserted and never cleared, so it is true for every port a
/// live flow has: a clear entry proves there is no flow to reply to.
#[inline(always)]
fn local_port_used(protocol: u8, port: u16) -> bool {
    ZT_LOCAL_PORTS
        .get(local_port_slot(protocol, port))
        .is_some_and(|used| *used != 0)
}

/// Marks a local port as used. A plain store of 1 is idempotent, so CPUs
/// racing on it cannot undo each other; it is skipped when already set to
/// keep the cache line shared.
#[inline(always)]
fn mark_local_port(protocol: u8, port: u16) {
    if let Some(slot) = ZT_LOCAL_PORTS.get_ptr_mut(local_port_slot(protocol, port)) {
        // SAFETY: a pointer into the array's value, valid for this run.
        unsafe {
            if *slot == 0 {
                *slot = 1;
            }
        }
    }
}

/// A second look at a packet the policy dropped with `code`; an allowing
/// `code` is returned as it is. `ifindex`
/// reads the receiving device only when a flow key needs it: on XDP that
/// is three dependent loads, which most denied packets never pay.
#[inline(always)]
pub fn second_chance(
    b: &Bounds,
    p: &Packet,
    code: u32,
    prog: u32,
    ifindex: &impl Fn() -> u32,
    now: u64,
) -> u32 {
    // Allowed already; ARP is never rescued.
    if reason::is_allow(code) || p.l3 == L3::Arp {
        return code;
    }
    // No ports to match a flow with: a later fragment follows its first.
    if p.fragment == Fragment::Later {
        return match ZT_FLOW_CFG.get(0) {
            Some(cfg) => fragment_of_allowed(p, cfg, code, ifindex(), now),
            None => code,
        };
    }
    // The cheap refusals first, before the config lookup: floods take these.
    if !is_icmp(p) {
        if p.protocol != proto::TCP && p.protocol != proto::UDP {
            return code;
        }
        // A SYN opens a connection; it is never a reply, whatever its ports.
        if p.protocol == proto::TCP
            && p.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
        {
            return code;
        }
        // Most denied packets go to ports the host never used for a flow of
        // its own: one array read settles them before the hash lookup.
        if !local_port_used(p.protocol, p.dst_port) {
            return code;
        }
    }
    let Some(cfg) = ZT_FLOW_CFG.get(0) else {
        return code;
    };
    if is_icmp(p) {
        return match (p.l3, p.icmp_type) {
            (L3::Ipv4, ICMP_ECHO_REQUEST) | (L3::Ipv6, ICMPV6_ECHO_REQUEST)
                if prog == program::EDGE =>
            {
                echo_rate(p, cfg, now)
            }
            (L3::Ipv4, ICMP_ECHO_REPLY) | (L3::Ipv6, ICMPV6_ECHO_REPLY) => {
                let key = flow_key(
                    ifindex(),
                    &p.dst.0,
                    &p.src.0,
                    (p.icmp_id, 0),
                    p.protocol,
                    p.ip_version(),
                );
                if refresh(&key, cfg, now, 0) {
                    reason::PASS_REPLY
                } else {
                    code
                }
            }
            (L3::Ipv4, ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED)
            | (L3::Ipv6, ICMPV6_DEST_UNREACHABLE | ICMPV6_PACKET_TOO_BIG | ICMPV6_TIME_EXCEEDED) => {
                related(b, p, cfg, now, ifindex())
            }
            _ => code,
        };
    }
    let key = flow_key(
        ifindex(),
        &p.dst.0,
        &p.src.0,
        (p.dst_port, p.src_port),
        p.protocol,
        p.ip_version(),
    );
    if refresh(&key, cfg, now, closing_flag(p)) {
        reason::PASS_REPLY
    } else {
        code
    }
}

/// The key of the datagram `p` is a fragment of, on `ifindex`.
#[inline(always)]
fn fragment_key(p: &Packet, ifindex: u32) -> FragmentKey {
    FragmentKey {
        ifindex,
        src: p.src.0,
        dst: p.dst.0,
        id: p.fragment_id,
        // IPv6 reassembles by addresses and identification alone, and its
        // first fragment's protocol (past any extension headers after the
        // fragment header) need not be the later ones' next header.
        protocol: if p.l3 == L3::Ipv4 { p.protocol } else { 0 },
        ip_version: p.ip_version(),
        _pad: [0; 2],
    }
}

/// A later fragment passes if its datagram's first fragment passed on the
/// same interface within `fragment_ns`; else it keeps `code`.
#[inline(always)]
fn fragment_of_allowed(p: &Packet, cfg: &FlowConfig, code: u32, ifindex: u32, now: u64) -> u32 {
    // SAFETY: the value is a plain u64 written whole.
    match unsafe { ZT_FRAGS.get(&fragment_key(p, ifindex)) } {
        Some(&first) if now.saturating_sub(first) <= cfg.fragment_ns => reason::PASS_FRAGMENT,
        _ => code,
    }
}

/// Remembers the datagram of a first fragment that passed with `code`, so
/// that its later fragments pass too. Neighbour discovery is not: it passes
/// before the peer check on the tunnel, and the stack refuses it fragmented
/// anyway (RFC 6980). A full table forgets a datagram least recently used
/// (approximately: the kernel's LRU): its remaining fragments drop, and the
/// sender's retransmission starts afresh.
#[inline(always)]
pub fn remember_fragment(p: &Packet, code: u32, ifindex: &impl Fn() -> u32, now: u64) {
    if p.fragment == Fragment::First
        && reason::is_allow(code)
        && code != reason::PASS_NEIGHBOR_DISCOVERY
    {
        let _ = ZT_FRAGS.insert(&fragment_key(p, ifindex()), &now, 0);
    }
}

/// Whether a flow seen last at `state.last_seen_ns` is still within its
/// timeout at `now`.
#[inline(always)]
fn live(state: &FlowState, cfg: &FlowConfig, protocol: u8, now: u64) -> bool {
    now.saturating_sub(state.last_seen_ns) <= timeout(cfg, protocol, state.flags)
}

/// Whether `key` is a live flow that admits replies; if so, marks it seen
/// now (plus `flags`). A flow the host began by answering the policy
/// (`FLOW_ANSWER`) admits none: its other direction is the policy's alone.
#[inline(always)]
fn refresh(key: &FlowKey, cfg: &FlowConfig, now: u64, flags: u32) -> bool {
    let Some(state) = ZT_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a pointer into the map value, valid for this program run; a
    // racing update from another CPU can only make last_seen newer.
    let state = unsafe { &mut *state };
    if state.flags & FLOW_ANSWER != 0 || !live(state, cfg, key.protocol, now) {
        return false;
    }
    state.last_seen_ns = now;
    state.flags |= flags;
    true
}

/// An ICMP error passes only if it quotes a live flow of ours.
#[inline(always)]
fn related(b: &Bounds, p: &Packet, cfg: &FlowConfig, now: u64, ifindex: u32) -> u32 {
    let Some(q) = parse::quoted(b, p) else {
        return reason::DROP_ICMP_UNRELATED;
    };
    // The quoted packet is one we sent: its source is local.
    let key = flow_key(
        ifindex,
        &q.src.0,
        &q.dst.0,
        (q.src_port, q.dst_port),
        q.protocol,
        q.ip_version,
    );
    // SAFETY: the value is read at once; a concurrent update can only make
    // last_seen newer.
    match unsafe { ZT_FLOWS.get(&key) } {
        Some(state) if live(state, cfg, key.protocol, now) => reason::PASS_ICMP_RELATED,
        _ => reason::DROP_ICMP_UNRELATED,
    }
}

/// Echo requests: one token bucket per source, so one flooding source
/// cannot use up another's allowance.
#[inline(always)]
fn echo_rate(p: &Packet, cfg: &FlowConfig, now: u64) -> u32 {
    if cfg.echo_ns_per_token == 0 {
        return reason::DROP_ICMP_RATE;
    }
    let key = SourceKey {
        addr: p.src.0,
        ip_version: p.ip_version(),
        _pad: [0; 3],
    };
    if let Some(bucket) = ZT_ECHO_BKT.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map value, valid for this run. Two CPUs
        // racing on one source can at worst both spend the same token.
        let bucket = unsafe { &mut *bucket };
        return if record::take_token(bucket, now, cfg.echo_ns_per_token, cfg.echo_burst) {
            reason::PASS_ICMP_ECHO
        } else {
            reason::DROP_ICMP_RATE
        };
    }
    // A new source starts with a full bucket, less this echo.
    let fresh = EventBucket {
        last_ns: now,
        tokens: cfg.echo_burst.saturating_sub(1),
    };
    if cfg.echo_burst == 0 || ZT_ECHO_BKT.insert(&key, &fresh, 0).is_err() {
        return reason::DROP_ICMP_RATE;
    }
    reason::PASS_ICMP_ECHO
}

/// Whether the ingress program `prog` would pass the reverse of the host's
/// UDP datagram `p` by its policy alone: then `p` answers a peer's
/// datagram to a granted port (or a client of a `WireGuard` port or of a
/// UDP service that admits it), and its
/// flow must not admit what the policy stops admitting later (a revoke, a
/// reload that closes the port).
#[inline(always)]
fn answers_policy(p: &Packet, prog: u32) -> bool {
    if prog == program::EDGE {
        verdict::udp_port_allowed(p.src_port)
            || verdict::services_of_port(proto::UDP, p.src_port)
                & verdict::services_of_source(p.l3, &p.dst)
                != 0
    } else {
        verdict::peer_owning(p.l3, &p.dst)
            .is_some_and(|peer| verdict::port_granted(&peer, proto::UDP, p.src_port))
    }
}

/// Egress: records or refreshes the flow this packet belongs to. New flows
/// start only from what opens one: a TCP SYN, any UDP datagram, an echo
/// request. `prog` is the ingress program of the interface (`EDGE` or
/// `TUNNEL`), whose policy tells a UDP answer from a flow the host starts.
/// A TCP answer never opens a flow (only a SYN does), so only UDP needs it.
#[inline(always)]
pub fn record_egress(cpu: &mut CpuState, p: &Packet, prog: u32, ifindex: u32, now: u64) {
    if p.l3 == L3::Arp || p.fragment == Fragment::Later {
        return;
    }
    let (local_port, remote_port, opens) = match p.protocol {
        proto::TCP => (
            p.src_port,
            p.dst_port,
            p.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN,
        ),
        proto::UDP => (p.src_port, p.dst_port, true),
        _ if is_icmp(p) => {
            let request = matches!(
                (p.l3, p.icmp_type),
                (L3::Ipv4, ICMP_ECHO_REQUEST) | (L3::Ipv6, ICMPV6_ECHO_REQUEST)
            );
            if !request {
                return;
            }
            (p.icmp_id, 0, true)
        }
        _ => return,
    };
    let key = flow_key(
        ifindex,
        &p.src.0,
        &p.dst.0,
        (local_port, remote_port),
        p.protocol,
        p.ip_version(),
    );
    let closing = closing_flag(p);
    if let Some(state) = ZT_FLOWS.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map value, valid for this run.
        let state = unsafe { &mut *state };
        state.last_seen_ns = now;
        // A new SYN on a closing tuple is a new connection.
        state.flags = if opens && p.protocol == proto::TCP {
            0
        } else {
            state.flags | closing
        };
        return;
    }
    if !opens {
        return;
    }
    // Judged once, when the flow starts: refreshes keep the flag, so a
    // host that goes on sending after a revoke still reopens nothing.
    let answer = p.protocol == proto::UDP && answers_policy(p, prog);
    // An answer admits no reply, so its port needs no flow lookup.
    if (p.protocol == proto::TCP || p.protocol == proto::UDP) && !answer {
        mark_local_port(p.protocol, local_port);
    }
    let state = FlowState {
        last_seen_ns: now,
        flags: closing | if answer { FLOW_ANSWER } else { 0 },
        _pad: 0,
    };
    if ZT_FLOWS.insert(&key, &state, 0).is_ok() {
        record::count(cpu, program::EGRESS, reason::FLOWS_CREATED);
    }
}
