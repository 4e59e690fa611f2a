//! Accounting for every decision: a per-CPU counter per (program, reason),
//! per-peer counters for the tunnel, and audit events to user space.
//!
//! Allowed new connections (TCP SYN without ACK) are always sent. Denies go
//! through a per-CPU token bucket so a flood cannot fill the ring buffer or
//! the disk; the ones held back are counted in `EVENTS_SUPPRESSED`. Then
//! each flow (addresses, ports, protocol, reason) sends one event per
//! window: later decisions of the window only raise its count in
//! `ZT_SUMMARY`, which travels with the flow's next event (or is swept by
//! user space). A failed ring-buffer reservation counts in `EVENTS_LOST`,
//! together with the count it carried. So every audited decision is either
//! in a record or in a counter that reaches the audit file.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use zt_common::{
    DENY_EVENTS_PER_SEC, Event, EventBucket, FlowSummary, NO_PEER, PeerInfo, SUMMARY_WINDOW_NS,
    SummaryKey, counter_index, proto, reason, tcp_flag,
};

use crate::{
    maps::{ZT_COUNTERS, ZT_EVENTS, ZT_EVT_BUCKET, ZT_PEER_CNT, ZT_SUMMARY},
    parse::{L3, Packet},
};

const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_TOKEN: u64 = NS_PER_SEC / DENY_EVENTS_PER_SEC;

#[inline(always)]
pub fn count(program: u32, code: u32) {
    add(program, code, 1);
}

#[inline(always)]
fn add(program: u32, code: u32, n: u64) {
    if let Some(slot) = ZT_COUNTERS.get_ptr_mut(counter_index(program, code)) {
        // SAFETY: per-CPU slot; no other context on this CPU runs concurrently
        // with an XDP or TC program, so a plain add is race-free.
        unsafe { *slot += n };
    }
}

/// Per-flow summarising. `None`: the flow already sent its event in this
/// window, so this decision only raised the window's count. `Some(n)`: send
/// an event carrying the `n` decisions the previous window summarised.
#[inline(always)]
fn summarise(program: u32, p: &Packet, code: u32, now: u64) -> Option<u32> {
    let key = SummaryKey {
        src: p.src.0,
        dst: p.dst.0,
        src_port: p.src_port,
        dst_port: p.dst_port,
        reason: code,
        protocol: p.protocol,
        ip_version: match p.l3 {
            L3::Ipv4 => 4,
            L3::Ipv6 => 6,
            L3::Arp => 0,
        },
        // Program ids are 0 and 1; the truncation cannot lose bits.
        program: program as u8,
        _pad: 0,
    };
    if let Some(s) = ZT_SUMMARY.get_ptr_mut(&key) {
        // SAFETY: a pointer into the map value, valid for this run. Two CPUs
        // on one flow may race on the count; the loss is at most one each.
        let s = unsafe { &mut *s };
        if now.saturating_sub(s.window_start_ns) < SUMMARY_WINDOW_NS {
            s.suppressed += 1;
            return None;
        }
        let carried = s.suppressed;
        s.window_start_ns = now;
        s.suppressed = 0;
        return Some(carried);
    }
    // If the table refuses the entry the event is still sent: a flow that
    // cannot be summarised costs events, never silence.
    let _ = ZT_SUMMARY.insert(
        &key,
        &FlowSummary {
            window_start_ns: now,
            suppressed: 0,
            _pad: 0,
        },
        0,
    );
    Some(0)
}

#[inline(always)]
pub fn count_peer(peer: &PeerInfo, allowed: bool) {
    if let Some(c) = ZT_PEER_CNT.get_ptr_mut(peer.index) {
        // SAFETY: per-CPU slot, as in `count`.
        unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        }
    }
}

/// Whether this decision is audited at all: denies, and allows that open a
/// TCP connection.
#[inline(always)]
fn audited(p: Option<&Packet>, code: u32) -> bool {
    if !reason::is_allow(code) {
        return true;
    }
    match p {
        Some(p) => {
            p.protocol == proto::TCP
                && code != reason::PASS_WIREGUARD
                && p.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
        }
        None => false,
    }
}

/// Refills `b` for the time since its last refill (one token per
/// `ns_per_token`, at most `cap`) and takes one token if there is one.
/// Shared by the audit limiter and the per-source ICMP echo limiter.
#[inline(always)]
pub fn take_token(b: &mut EventBucket, now: u64, ns_per_token: u64, cap: u64) -> bool {
    let earned = now.saturating_sub(b.last_ns) / ns_per_token;
    if earned > 0 {
        b.tokens = (b.tokens + earned).min(cap);
        b.last_ns = now;
    }
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Takes one deny-event token from this CPU's bucket.
#[inline(always)]
fn take_event_token(now: u64) -> bool {
    let Some(b) = ZT_EVT_BUCKET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot, as in `count`.
    take_token(unsafe { &mut *b }, now, NS_PER_TOKEN, DENY_EVENTS_PER_SEC)
}

/// Counts the decision and, when it is audited, sends an event.
#[inline(always)]
pub fn decision(
    program: u32,
    ifindex: u32,
    p: Option<&Packet>,
    code: u32,
    peer: Option<&PeerInfo>,
) {
    count(program, code);
    if !audited(p, code) {
        return;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !reason::is_allow(code) && !take_event_token(now) {
        count(program, reason::EVENTS_SUPPRESSED);
        return;
    }
    let carried = match p {
        Some(p) => match summarise(program, p, code, now) {
            Some(c) => c,
            None => return,
        },
        None => 0,
    };
    let Some(mut entry) = ZT_EVENTS.reserve::<Event>(0) else {
        add(program, reason::EVENTS_LOST, 1 + u64::from(carried));
        return;
    };
    // Filled in place: an Event built on the stack and copied would cost 64
    // of the program's 512 stack bytes.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring-buffer slot
    // of size_of::<Event>() bytes; every field is written before submit.
    unsafe {
        (*e).ts_ns = now;
        (*e).ifindex = ifindex;
        (*e).reason = code;
        // Program ids are 0 and 1; the truncation cannot lose bits.
        (*e).program = program as u8;
        (*e).peer = peer.map_or(NO_PEER, |p| p.index);
        (*e).suppressed = carried;
        match p {
            Some(p) => {
                (*e).src = p.src.0;
                (*e).dst = p.dst.0;
                (*e).src_port = p.src_port;
                (*e).dst_port = p.dst_port;
                (*e).protocol = p.protocol;
                (*e).tcp_flags = p.tcp_flags;
                (*e).ip_version = match p.l3 {
                    L3::Ipv4 => 4,
                    L3::Ipv6 => 6,
                    L3::Arp => 0,
                };
            }
            None => {
                (*e).src = [0; 16];
                (*e).dst = [0; 16];
                (*e).src_port = 0;
                (*e).dst_port = 0;
                (*e).protocol = 0;
                (*e).tcp_flags = 0;
                (*e).ip_version = 0;
            }
        }
    }
    entry.submit(0);
}
