//! Accounting for every decision: a per-CPU counter per (program, reason),
//! per-peer counters for the tunnel, and audit events to user space.
//!
//! Allowed new connections (TCP SYN without ACK) are always sent. Denies go
//! through a per-CPU token bucket so a flood cannot fill the ring buffer or
//! the disk; the ones held back are counted in `EVENTS_SUPPRESSED`. Then
//! each flow (addresses, ports, protocol, reason) sends one event per
//! window: later decisions of the window only raise its count, which
//! travels with the flow's next event or is swept by user space.
//! Summarising comes before the token: a flow that already sent its event
//! costs no token. A failed ring-buffer reservation counts in `EVENTS_LOST`,
//! together with the count it carried. So every audited decision is either
//! in a record or in a counter that reaches the audit file.
//!
//! Counts live in two places. `ZT_SUMMARY`, shared by all CPUs, has every
//! flow of the window; a hash lookup per packet, though, is most of what a
//! denied packet would cost. So each CPU also keeps the first flows it
//! summarised in the window (`SUMMARY_CACHE_WAYS` of them) in
//! `ZT_SUM_CACHE` and counts their packets there with a key compare: a
//! flood of a few flows never reaches the hash table. User space adds both
//! up in the flow's summary record.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::bpf_ktime_get_ns;

use zt_common::{
    CpuState, DENY_EVENTS_PER_SEC, EVENT_WOULD_DROP, Event, EventBucket, FlowSummary, NO_PEER,
    PeerInfo, SummaryCacheSlot, SummaryKey, counter_index, proto, reason, summary_cache_slot,
    summary_window, tcp_flag,
};

use crate::{
    maps::{ZT_EVENTS, ZT_PEER_CNT, ZT_SUMMARY, summary_cache},
    parse::Packet,
};

const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_TOKEN: u64 = NS_PER_SEC / DENY_EVENTS_PER_SEC;

/// A program id as the byte events and summary keys carry.
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "program ids are 0, 1 and 2"
)]
const fn program_id(program: u32) -> u8 {
    program as u8
}

#[inline(always)]
pub fn count(cpu: &mut CpuState, program: u32, code: u32) {
    add(cpu, program, code, 1);
}

#[inline(always)]
fn add(cpu: &mut CpuState, program: u32, code: u32, n: u64) {
    // This CPU's own slot (see maps::this_cpu), so a plain add is race-free.
    if let Some(c) = cpu.counters.get_mut(counter_index(program, code) as usize) {
        *c += n;
    }
}

/// The `flags` byte of an event and a summary key: [`EVENT_WOULD_DROP`]
/// for a would-deny. `audit` is a constant in the edge program's copies,
/// so this folds away there.
#[inline(always)]
const fn event_flags(audit: bool) -> u8 {
    if audit { EVENT_WOULD_DROP } else { 0 }
}

/// The summary key of `p`'s flow in `window`, as the six little-endian
/// words of `SummaryKey`'s layout. Built in registers: writing the fields
/// one by one and reading them back as words stalls store forwarding, which
/// cost more than the rest of the cache lookup.
#[inline(always)]
fn summary_words(program: u32, p: &Packet, code: u32, audit: bool, window: u32) -> [u64; 6] {
    let (src, dst) = (p.src.words(), p.dst.words());
    [
        src[0],
        src[1],
        dst[0],
        dst[1],
        u64::from(window) | u64::from(p.src_port) << 32 | u64::from(p.dst_port) << 48,
        u64::from(code)
            | u64::from(p.protocol) << 32
            | u64::from(p.ip_version()) << 40
            | u64::from(program_id(program)) << 48
            | u64::from(event_flags(audit)) << 56,
    ]
}

/// `words` as the key they lay out.
#[inline(always)]
const fn summary_key(words: [u64; 6]) -> SummaryKey {
    // SAFETY: SummaryKey is 48 bytes, aligned to 8, with no padding bytes
    // (asserted in zt_common), and any bit pattern is a valid key.
    unsafe { core::mem::transmute::<[u64; 6], SummaryKey>(words) }
}

/// Whether the key in a cached flow is `words`. The source address and the
/// window-and-ports word come first: they tell almost any other flow apart,
/// and a packet of a many-source flood misses every way (full compares in
/// four ways cost it 5 ns more than in one). Then all six words, without
/// branches.
#[inline(always)]
fn same_key(key: &SummaryKey, words: &[u64; 6]) -> bool {
    // SAFETY: as in `summary_key`, so the key is readable as six words.
    let k = unsafe { &*(&raw const *key).cast::<[u64; 6]>() };
    if (k[0] ^ words[0]) | (k[4] ^ words[4]) != 0 {
        return false;
    }
    let mut diff = 0;
    for i in 0..6 {
        diff |= k[i] ^ words[i];
    }
    diff == 0
}

/// Per-flow summarising in the shared table. `None`: the flow already sent
/// its event in this window, so this decision only raised the window's
/// count. `Some(n)`: send an event, carrying the `n` decisions of the flow's
/// previous window that user space has not swept yet.
#[inline(always)]
fn summarise(key: &SummaryKey, now: u64) -> Option<u32> {
    if let Some(s) = ZT_SUMMARY.get_ptr_mut(key) {
        // SAFETY: a pointer into the map value, valid for this run; the
        // count is shared by all CPUs, hence the atomic add. core's atomic
        // types offer no fetch_add on BPF (the target has no compare-and-swap),
        // so the intrinsic is used, its result unused: that is an XADD,
        // which every BPF CPU level has.
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*s).suppressed, 1)
        };
        return None;
    }
    // The flow's first decision in this window: take over what the previous
    // window counted. Subtracting what was read (not storing 0) keeps any
    // increment that lands in between for the user-space sweep.
    let mut previous = *key;
    previous.window = key.window.wrapping_sub(1);
    let carried = match ZT_SUMMARY.get_ptr_mut(&previous) {
        // SAFETY: as above.
        Some(s) => unsafe {
            let n = core::ptr::read_volatile(&raw const (*s).suppressed);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                &raw mut (*s).suppressed,
                n.wrapping_neg(),
            );
            // An event carries at most u32::MAX; a window cannot count more
            // packets than that at line rate.
            u32::try_from(n).unwrap_or(u32::MAX)
        },
        None => 0,
    };
    // If the table refuses the entry the event is still sent: a flow that
    // cannot be summarised costs events, never silence.
    let _ = ZT_SUMMARY.insert(
        key,
        &FlowSummary {
            window_start_ns: now,
            suppressed: 0,
        },
        0,
    );
    Some(carried)
}

/// Makes `key`'s flow (which has just been summarised or sent, and is in no
/// way of `slot`) one that this CPU counts in `slot` for the rest of the
/// window: in the first way that holds no flow of this window. When every
/// way does, the flow stays uncached: the first flows of a window keep their
/// ways, so floods that start there keep them.
#[inline(always)]
fn remember(cpu: &mut CpuState, slot: *mut SummaryCacheSlot, key: &SummaryKey) {
    // SAFETY: this CPU's slot (see maps::this_cpu) in ZT_SUM_CACHE; user space
    // touches it only while its window is two or three behind, never the
    // current one.
    let slot = unsafe { &mut *slot };
    for way in &mut slot.ways {
        if way.key.window == key.window {
            continue;
        }
        // A count user space did not collect in time (it was stalled for
        // over a window): still accounted, as a decision not sent.
        if way.count > 0 {
            add(
                cpu,
                u32::from(way.key.program),
                reason::EVENTS_SUPPRESSED,
                way.count,
            );
        }
        way.key = *key;
        way.count = 0;
        return;
    }
}

#[inline(always)]
pub fn count_peer(peer: &PeerInfo, allowed: bool) {
    if let Some(c) = ZT_PEER_CNT.get_ptr_mut(peer.index) {
        // SAFETY: per-CPU slot; only programs on this CPU write it, one at
        // a time (see maps::this_cpu).
        unsafe {
            if allowed {
                (*c).allowed += 1;
            } else {
                (*c).denied += 1;
            }
        }
    }
}

/// Whether an allowed decision is audited: when it opens a TCP connection.
/// (Every deny is.)
#[inline(always)]
fn audited_allow(p: Option<&Packet>, code: u32) -> bool {
    match p {
        Some(p) => {
            p.protocol == proto::TCP
                && code != reason::PASS_WIREGUARD
                && p.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
        }
        None => false,
    }
}

/// Refills `b` for the time since its last refill: one token per
/// `ns_per_token`, at most `cap`.
#[inline(always)]
fn refill(b: &mut EventBucket, now: u64, ns_per_token: u64, cap: u64) {
    let elapsed = now.saturating_sub(b.last_ns);
    // Under a flood nearly every packet comes less than a token's time
    // after the last refill: skip the division then.
    if elapsed < ns_per_token {
        return;
    }
    let earned = elapsed / ns_per_token;
    if earned > 0 {
        b.tokens = (b.tokens + earned).min(cap);
        b.last_ns = now;
    }
}

/// Refills `b` and takes one token if there is one. Shared by the audit
/// limiter and the per-source ICMP echo limiter.
#[inline(always)]
pub fn take_token(b: &mut EventBucket, now: u64, ns_per_token: u64, cap: u64) -> bool {
    refill(b, now, ns_per_token, cap);
    if b.tokens == 0 {
        return false;
    }
    b.tokens -= 1;
    true
}

/// Whether this CPU's deny-event bucket, refilled, holds a token.
#[inline(always)]
fn has_event_token(cpu: &mut CpuState, now: u64) -> bool {
    refill(&mut cpu.bucket, now, NS_PER_TOKEN, DENY_EVENTS_PER_SEC);
    cpu.bucket.tokens > 0
}

/// Counts the decision and, when it is audited, sends an event. `audit`:
/// the policy dropped the packet (`code`) but it passes, as its program or
/// peer runs in audit mode; it is counted under `code` and in
/// `WOULD_DROP`, and its event and summary say so.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "every argument is a register the caller already holds; a struct would go through the stack"
)]
pub fn decision(
    cpu: &mut CpuState,
    program: u32,
    ifindex: &impl Fn() -> u32,
    p: Option<&Packet>,
    code: u32,
    peer: Option<&PeerInfo>,
    audit: bool,
    now: u64,
) {
    count(cpu, program, code);
    if audit {
        count(cpu, program, reason::WOULD_DROP);
    }
    if reason::is_allow(code) {
        if !audited_allow(p, code) {
            return;
        }
        // Denies need no count of their own: every one is audited. With
        // this, user space knows how many decisions the trail must account
        // for, which is how a daemon killed mid-write is made up for.
        count(cpu, program, reason::ALLOWS_AUDITED);
    }
    // The cheapest case first: this CPU already counts the flow for this
    // window. This is what every packet of a flood of a few flows takes;
    // a one-flow flood finds its flow in the first way.
    let window = summary_window(now);
    let flow = p.map(|p| summary_words(program, p, code, audit, window));
    let slot = summary_cache(summary_cache_slot(window));
    if let (Some(words), Some(slot)) = (&flow, slot) {
        // SAFETY: as in `remember`.
        let slot = unsafe { &mut *slot };
        for way in &mut slot.ways {
            if same_key(&way.key, words) {
                way.count += 1;
                return;
            }
        }
    }
    // Denies need a token from this CPU's bucket, but a flow that already
    // sent its event this window takes none: summarising comes first, so one
    // flooding flow cannot starve the others' events. When the bucket is
    // empty nothing more can be sent, and the summary lookup is skipped to
    // keep floods cheap.
    let deny = !reason::is_allow(code);
    if deny && !has_event_token(cpu, now) {
        count(cpu, program, reason::EVENTS_SUPPRESSED);
        return;
    }
    let carried = match flow {
        Some(words) => {
            let key = summary_key(words);
            let sent = summarise(&key, now);
            if let Some(slot) = slot {
                remember(cpu, slot, &key);
            }
            match sent {
                Some(c) => c,
                None => return,
            }
        }
        None => 0,
    };
    if deny {
        cpu.bucket.tokens -= 1;
    }
    let Some(mut entry) = ZT_EVENTS.reserve::<Event>(0) else {
        add(cpu, program, reason::EVENTS_LOST, 1 + u64::from(carried));
        return;
    };
    // Filled in place: an Event built on the stack and copied would cost 64
    // of the program's 512 stack bytes.
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring-buffer slot
    // of size_of::<Event>() bytes; every field is written before submit.
    unsafe {
        // The event's own time is precise; `now` is the coarse clock the
        // limits run on.
        (*e).ts_ns = bpf_ktime_get_ns();
        (*e).ifindex = ifindex();
        #[expect(clippy::cast_possible_truncation, reason = "reason codes are below 32")]
        {
            (*e).reason = code as u16;
        }
        (*e).flags = event_flags(audit);
        (*e)._pad0 = 0;
        (*e).program = program_id(program);
        (*e).peer = peer.map_or(NO_PEER, |p| p.index);
        (*e).suppressed = carried;
        if let Some(p) = p {
            (*e).src = p.src.0;
            (*e).dst = p.dst.0;
            (*e).src_port = p.src_port;
            (*e).dst_port = p.dst_port;
            (*e).protocol = p.protocol;
            (*e).tcp_flags = p.tcp_flags;
            (*e).ip_version = p.ip_version();
        } else {
            (*e).src = [0; 16];
            (*e).dst = [0; 16];
            (*e).src_port = 0;
            (*e).dst_port = 0;
            (*e).protocol = 0;
            (*e).tcp_flags = 0;
            (*e).ip_version = 0;
        }
    }
    entry.submit(0);
}
