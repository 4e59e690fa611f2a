//! Benchmark helpers, loaded only by `cargo xtask bench`, never by `ztxdp`.
//!
//! - `zt_bench_tx`: the traffic generator. `BPF_PROG_RUN` with
//!   `BPF_F_TEST_XDP_LIVE_FRAMES` runs it on copies of one template frame and
//!   transmits every frame it returns `XDP_TX` for, out of the interface named
//!   in the context, at tens of millions of frames a second.
//! - `zt_bench_drop`: a program that does nothing but drop; the physical limit
//!   every filter is measured against.
#![no_std]
#![no_main]
// As in the main object: BPF helpers are inlined on purpose.
#![expect(clippy::inline_always, reason = "BPF programs inline every helper")]

#[path = "../runtime.rs"]
mod runtime;

use aya_ebpf::{
    bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext,
};

/// Number of distinct IPv4 source addresses to cycle through; 0 sends the
/// template unchanged. Set by the loader before load (read-only data, so the
/// verifier drops the rewrite code when it is 0).
#[unsafe(no_mangle)]
static SRC_COUNT: u32 = 0;

/// First source address of the cycle, host byte order.
#[unsafe(no_mangle)]
static SRC_BASE: u32 = 0;

/// Frames sent by this CPU; drives the source sequence.
#[map]
static ZT_BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Ethernet (14) + IPv4 without options (20) + the first 20 bytes of L4:
/// the template frames are built that way, and the rewrite touches no more.
const FRAME_MIN: usize = 54;
const IP_OFF: usize = 14;
const IP_PROTO_OFF: usize = IP_OFF + 9;
const IP_CSUM_OFF: usize = IP_OFF + 10;
const IP_SRC_OFF: usize = IP_OFF + 12;
const L4_OFF: usize = IP_OFF + 20;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// Fibonacci hashing constant: multiplying the sequence number by it spreads
/// consecutive frames over the whole address range, so the filter sees
/// sources in an order no cache can predict.
const SPREAD: u32 = 0x9E37_79B1;

#[xdp]
#[expect(
    clippy::needless_pass_by_value,
    reason = "the aya macro fixes the entry point's signature"
)]
pub fn zt_bench_tx(ctx: XdpContext) -> u32 {
    // SAFETY: a read of a constant the loader may have rewritten before load.
    let count = unsafe { core::ptr::read_volatile(&raw const SRC_COUNT) };
    if count != 0 {
        rewrite_source(&ctx, count);
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn zt_bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

/// Writes the next source address of the cycle into the frame and patches
/// the IPv4 and TCP/UDP checksums incrementally (RFC 1624), so the frame
/// stays valid for a kernel stack that checks them. The update is computed
/// from the address the frame holds now: live-frame pages are recycled with
/// whatever the previous run left in them.
#[inline(always)]
fn rewrite_source(ctx: &XdpContext, count: u32) {
    let start = ctx.data();
    if start + FRAME_MIN > ctx.data_end() {
        return;
    }
    let Some(seq) = ZT_BENCH_SEQ.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot; nothing else runs on this CPU during the program.
    let n = unsafe {
        let n = *seq;
        *seq = n.wrapping_add(1);
        n
    };
    // SAFETY: a read of a constant the loader may have rewritten before load.
    let base = unsafe { core::ptr::read_volatile(&raw const SRC_BASE) };
    let new = base
        .wrapping_add(n.wrapping_mul(SPREAD) % count)
        .to_be_bytes();
    // SAFETY: every offset below is inside the FRAME_MIN bytes checked above.
    unsafe {
        let p = start as *mut u8;
        let src = p.add(IP_SRC_OFF);
        let old = [*src, *src.add(1), *src.add(2), *src.add(3)];
        for (i, b) in new.iter().enumerate() {
            *src.add(i) = *b;
        }
        patch_checksum(p.add(IP_CSUM_OFF), old, new, false);
        match *p.add(IP_PROTO_OFF) {
            PROTO_TCP => patch_checksum(p.add(L4_OFF + TCP_CSUM), old, new, false),
            PROTO_UDP => patch_checksum(p.add(L4_OFF + UDP_CSUM), old, new, true),
            _ => {}
        }
    }
}

/// HC' = ~(~HC + ~m + m') over the two 16-bit words of an address.
///
/// # Safety
/// `at` and `at + 1` must be inside the packet.
#[inline(always)]
unsafe fn patch_checksum(at: *mut u8, old: [u8; 4], new: [u8; 4], udp: bool) {
    // SAFETY: the caller guarantees both bytes are inside the packet.
    let hc = unsafe { u16::from_be_bytes([*at, *at.add(1)]) };
    // UDP over IPv4: zero means "no checksum", and stays zero.
    if udp && hc == 0 {
        return;
    }
    let mut sum = u32::from(!hc);
    for i in [0, 2] {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    // Two folds bring any sum of five 16-bit words into 16 bits.
    #[expect(clippy::cast_possible_truncation, reason = "folded into 16 bits above")]
    let mut c = !(sum as u16);
    if udp && c == 0 {
        c = 0xffff;
    }
    let b = c.to_be_bytes();
    // SAFETY: as above.
    unsafe {
        *at = b[0];
        *at.add(1) = b[1];
    }
}
