//! ztxdp's kernel programs.
//!
//! - `zt_edge` (XDP, external interface): WireGuard UDP and allow-listed SSH.
//! - `zt_tunnel` (TC ingress, WireGuard interface): per-peer port grants.
//! - `zt_edge_out`, `zt_tunnel_out` (TC egress, both interfaces): record the
//!   flows the host starts, so that their replies pass.
//!
//! The entry points only glue the pieces together: [`parse`] reads headers,
//! [`verdict`] decides, [`record`] counts and audits, [`maps`] holds state.
#![no_std]
#![no_main]
// Atomic add on BPF: see record::summarise.
#![feature(core_intrinsics)]
// Single loads of unaligned packet fields: see parse::packet_load.
#![feature(asm_experimental_arch)]
// `#[inline(always)]` on the closures handed to the parser: see parse::ethernet_with.
#![feature(stmt_expr_attributes)]
#![expect(
    internal_features,
    reason = "atomic_xadd is the only atomic add core offers on BPF"
)]
// Every helper is inlined on purpose: BPF-to-BPF calls cost stack and
// verifier state, and packet pointers lose their checked range across them.
#![expect(
    clippy::inline_always,
    reason = "BPF programs inline every helper; see above"
)]
// Map keys are passed by reference so large keys are not copied again onto
// the 512-byte BPF stack.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "keep map keys off the BPF stack"
)]

mod flows;
mod maps;
mod parse;
mod record;
mod runtime;
mod verdict;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use zt_common::{CpuState, EDGE_AUDIT, EDGE_CONFIGURED, PEER_AUDIT, program, reason};

use crate::{
    maps::{edge_config, tunnel_audit, tunnel_l2},
    parse::{Bounds, Packet, ParseError},
};

/// Packet bytes the tunnel program wants in the skb's linear area: enough
/// for Ethernet, two VLAN tags, IPv6 with a few extension headers, and TCP.
const TC_LINEAR_WANT: u32 = 128;

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macro fixes the entry point's signature"
)]
pub fn zt_edge(ctx: XdpContext) -> u32 {
    // Two copies of the program, one per mode: the mode is a load-time
    // constant, so the verifier keeps only the live copy, and the enforce
    // path is the same code as without audit mode (bench/NOTES.md).
    let code = if edge_config().flags & EDGE_AUDIT == 0 {
        edge_code::<false>(&ctx)
    } else {
        edge_code::<true>(&ctx)
    };
    match code {
        Some(code) if reason::is_allow(code) => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

/// `zt_edge`'s code for one packet, with the edge in audit mode or not.
#[inline(always)]
fn edge_code<const AUDIT: bool>(ctx: &XdpContext) -> Option<u32> {
    let b = Bounds::new(ctx.data(), ctx.data_end());
    // SAFETY: ctx.ctx points at the kernel's xdp_md for this program run.
    let ifindex = || unsafe { (*ctx.ctx).ingress_ifindex };
    reason_code(
        program::EDGE,
        &ifindex,
        #[inline(always)]
        |cpu, now| {
            parse::ethernet_with(
                &b,
                #[inline(always)]
                |p| judge(program::EDGE, AUDIT, &b, cpu, &ifindex, p, now),
            )
        },
    )
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macro fixes the entry point's signature"
)]
pub fn zt_tunnel(ctx: TcContext) -> i32 {
    let b = linear_headers(&ctx);
    let ifindex = || skb_ifindex(&ctx);
    let code = reason_code(
        program::TUNNEL,
        &ifindex,
        #[inline(always)]
        |cpu, now| {
            tunnel_with(
                &b,
                #[inline(always)]
                |p| judge(program::TUNNEL, false, &b, cpu, &ifindex, p, now),
            )
        },
    );
    match code {
        Some(code) if reason::is_allow(code) => TC_ACT_OK,
        _ => TC_ACT_SHOT,
    }
}

/// The reason code for one packet of `program`: `parse_and_judge` parses
/// it and judges it, and an unparseable packet is a counted drop (fail
/// closed: never a pass). `None`, and the caller drops, if the loader did
/// not size `ZT_CPU` (see `maps::this_cpu`): nothing could be counted.
#[inline(always)]
fn reason_code(
    program: u32,
    ifindex: &impl Fn() -> u32,
    parse_and_judge: impl FnOnce(&mut CpuState, u64) -> Result<u32, ParseError>,
) -> Option<u32> {
    let cpu = maps::this_cpu()?;
    let now = now(cpu);
    let code = parse_and_judge(cpu, now).unwrap_or_else(|e| {
        let code = verdict::parse_error_reason(e);
        // Parse failures drop in audit mode too: never `audit` here.
        record::decision(cpu, program, ifindex, None, code, None, false, now);
        code
    });
    Some(code)
}

/// The verdict of `program`'s policy on a parsed packet, counted and
/// audited: the policy, then the flow table's second look at a drop, then
/// the records. `program` is a constant at every call, so each program's
/// copy keeps only its own branch; so is `edge_audit`, the edge's mode.
/// A drop in audit mode (the edge's, or the tunnel peer's) comes back as
/// `WOULD_DROP`, which passes, after it was counted under its own reason.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "inlined; each is a value the entry point already holds"
)]
fn judge(
    program: u32,
    edge_audit: bool,
    b: &Bounds,
    cpu: &mut CpuState,
    ifindex: &impl Fn() -> u32,
    p: &Packet,
    now: u64,
) -> u32 {
    if program == program::EDGE {
        // Loaded without an edge policy (the daemon never attaches such a
        // program): everything drops. Recorded without the packet's fields,
        // like a parse failure, so that this path shares no code with the
        // policy's: merged, the two paths' packet fields went through shared
        // stack slots, 2-3 ns on every policy decision.
        if edge_config().flags & EDGE_CONFIGURED == 0 {
            let code = reason::DROP_NOT_CONFIGURED;
            record::decision(cpu, program, ifindex, None, code, None, false, now);
            return code;
        }
        let code = flows::second_chance(b, p, verdict::edge(p), program, ifindex, now);
        flows::remember_fragment(p, code, ifindex, now);
        let audit = edge_audit && !reason::is_allow(code);
        record::decision(cpu, program, ifindex, Some(p), code, None, audit, now);
        if audit { reason::WOULD_DROP } else { code }
    } else {
        // The peer is looked up once: it is the policy's key and it indexes
        // the per-peer counters. It stays in this branch: returned out of an
        // `if` shared with the edge branch, its `None` went to the stack with
        // undefined padding, which the verifier refuses.
        let peer = verdict::peer_of(p);
        let code = flows::second_chance(b, p, verdict::tunnel(p, peer), program, ifindex, now);
        flows::remember_fragment(p, code, ifindex, now);
        if let Some(peer) = &peer {
            record::count_peer(peer, reason::is_allow(code));
        }
        // The peer's own mode, or the program's for a source of no peer.
        let audit = !reason::is_allow(code)
            && match &peer {
                Some(peer) => peer.flags & PEER_AUDIT != 0,
                None => tunnel_audit(),
            };
        record::decision(
            cpu,
            program,
            ifindex,
            Some(p),
            code,
            peer.as_ref(),
            audit,
            now,
        );
        if audit { reason::WOULD_DROP } else { code }
    }
}

/// Egress on the edge interface: records the flows the host starts, so
/// that `zt_edge` admits their replies. Egress is never filtered.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macro fixes the entry point's signature"
)]
pub fn zt_edge_out(ctx: TcContext) -> i32 {
    let b = linear_headers(&ctx);
    // Unparsed packets are not flows the host started, and pass like every
    // other.
    let _ = parse::ethernet_with(
        &b,
        #[inline(always)]
        |p| record_outgoing(&ctx, p, program::EDGE),
    );
    TC_ACT_OK
}

/// Egress on the tunnel interface: as `zt_edge_out`, for `zt_tunnel`.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macro fixes the entry point's signature"
)]
pub fn zt_tunnel_out(ctx: TcContext) -> i32 {
    let b = linear_headers(&ctx);
    // As in zt_edge_out.
    let _ = tunnel_with(
        &b,
        #[inline(always)]
        |p| record_outgoing(&ctx, p, program::TUNNEL),
    );
    TC_ACT_OK
}

/// The egress programs' work: the packet's flow recorded. `ingress` is
/// the program that judges the interface's incoming packets.
#[inline(always)]
fn record_outgoing(ctx: &TcContext, p: &Packet, ingress: u32) {
    if let Some(cpu) = maps::this_cpu() {
        let now = now(cpu);
        flows::record_egress(cpu, p, ingress, skb_ifindex(ctx), now);
    }
}

/// Parses a packet on the tunnel device, which starts at the IP header
/// unless the device has an Ethernet header (`TUNNEL_L2`), and hands it to
/// `judge` (see [`parse::ethernet_with`]).
#[inline(always)]
fn tunnel_with<R>(b: &Bounds, judge: impl FnOnce(&Packet) -> R) -> Result<R, ParseError> {
    if tunnel_l2() {
        parse::ethernet_with(b, judge)
    } else {
        parse::ip_with(b, judge)
    }
}

/// The clock every limit and timeout runs on: `CLOCK_MONOTONIC` at jiffy
/// resolution (the coarse clock), read through this CPU's cache in its
/// `CpuState`. The precise clock reads the TSC (expensive in a VM), and even
/// the coarse clock's helper call is most of a denied packet's remaining
/// cost; jiffies are one inlined load. The limits work in milliseconds and
/// seconds, so a tick of precision is enough. A reading taken just as the
/// tick moved jiffies but not yet the clock lags by one more tick until the
/// next; it never goes backwards.
#[inline(always)]
fn now(cpu: &mut CpuState) -> u64 {
    // SAFETY: bpf_jiffies64 and bpf_ktime_get_coarse_ns have no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    let c = &mut cpu.clock;
    if c.jiffies != jiffies {
        c.jiffies = jiffies;
        // SAFETY: as above.
        c.ns = unsafe { bpf_ktime_get_coarse_ns() };
    }
    c.ns
}

/// The device the skb is on: the ingress device in `zt_tunnel`, the egress
/// device in the `_out` programs.
#[inline(always)]
fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: ctx.skb.skb points at the kernel's __sk_buff for this run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The packet window of a TC program, with the headers made linear first.
/// Nothing promises a linear skb (wireguard-go's small packets are, GSO
/// traffic on egress often is not); a failed pull leaves the skb short, and
/// the parse then treats it as malformed: still closed on ingress.
#[inline(always)]
fn linear_headers(ctx: &TcContext) -> Bounds {
    let want = ctx.len().min(TC_LINEAR_WANT);
    if ctx.data_end() - ctx.data() < want as usize {
        let _ = ctx.pull_data(want);
    }
    Bounds::new(ctx.data(), ctx.data_end())
}
