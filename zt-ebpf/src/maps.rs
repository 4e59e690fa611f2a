//! Every map the programs use, in one place, and the read-only globals the
//! loader sets. The statics are named exactly as the constants in
//! `zt_common::map` and `zt_common::global`, because the kernel name is the
//! static's name; the loader's tests check that each constant is present.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    helpers::bpf_get_smp_processor_id,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use zt_common::{
    CpuState, EdgeConfig, EventBucket, FlowConfig, FlowKey, FlowState, FlowSummary, FragmentKey,
    GrantKey, PeerCounters, PeerInfo, SUMMARY_CACHE_SLOTS, Source6Key, Source6Lengths, SourceBlock,
    SourceKey, SummaryCacheSlot, SummaryKey, capacity, summary_cache_index,
};

/// The edge settings (`zt_common::global::EDGE_CONFIG`). The loader writes
/// it into `.rodata` before load, so the verifier reads the value itself and
/// folds every branch on it: no lookup, no null check per packet.
#[unsafe(no_mangle)]
static ZT_EDGE_CONFIG: EdgeConfig = EdgeConfig { _pad0: 0, flags: 0 };

/// `zt_common::global::TUNNEL_L2`, set by the loader like `ZT_EDGE_CONFIG`.
#[unsafe(no_mangle)]
static TUNNEL_L2: u8 = 0;

/// `zt_common::global::TUNNEL_LINK_LOCAL`, set by the loader like
/// `ZT_EDGE_CONFIG`.
#[unsafe(no_mangle)]
static TUNNEL_LINK_LOCAL: u8 = 0;

/// `zt_common::global::TUNNEL_AUDIT`, set by the loader like
/// `ZT_EDGE_CONFIG`.
#[unsafe(no_mangle)]
static TUNNEL_AUDIT: u8 = 0;

/// The edge settings the programs were loaded with.
#[inline(always)]
pub fn edge_config() -> EdgeConfig {
    // SAFETY: a read of a constant the loader may have rewritten before
    // load; volatile so that LLVM does not fold the compile-time zeros.
    unsafe { core::ptr::read_volatile(&raw const ZT_EDGE_CONFIG) }
}

/// Whether the tunnel device has an Ethernet header.
#[inline(always)]
pub fn tunnel_l2() -> bool {
    // SAFETY: as in `edge_config`.
    unsafe { core::ptr::read_volatile(&raw const TUNNEL_L2) != 0 }
}

/// Whether neighbour messages from link-local sources pass on an Ethernet
/// tunnel device.
#[inline(always)]
pub fn tunnel_link_local() -> bool {
    // SAFETY: as in `edge_config`.
    unsafe { core::ptr::read_volatile(&raw const TUNNEL_LINK_LOCAL) != 0 }
}

/// Whether the tunnel program runs in audit mode for packets of no peer.
#[inline(always)]
pub fn tunnel_audit() -> bool {
    // SAFETY: as in `edge_config`.
    unsafe { core::ptr::read_volatile(&raw const TUNNEL_AUDIT) != 0 }
}

#[map]
pub static ZT_EDGE_UDP: Array<u64> = Array::with_max_entries(capacity::PORT_BITMAP_WORDS, 0);

// An array, not a hash: a port's services are one inlined lookup, and the
// deny path of a port of no service reads one entry (a zero mask).
// Mmapable, as ZT_SRC4_16, for user space to read it in one pass.
#[map]
pub static ZT_SVC_PORTS: Array<u64> =
    Array::with_max_entries(capacity::SERVICE_PORTS, BPF_F_MMAPABLE);

// The service sources: exact lookups whose cost does not grow with the
// lists (zt_common::map::SOURCES_V4_16 says how they combine). The hashes
// are read on every packet to a service port and written only by the
// control plane, so they are not preallocated: a million entries cost
// memory only when a list has them.
// Mmapable so that user space reads its 65,536 entries in one pass, not
// one system call each (Tables::read_sources, which every `explain`,
// `check --live` and reload does).
#[map]
pub static ZT_SRC4_16: Array<SourceBlock> =
    Array::with_max_entries(capacity::SOURCE_V4_BLOCKS, BPF_F_MMAPABLE);

#[map]
pub static ZT_SRC4_24: HashMap<[u8; 4], u64> =
    HashMap::with_max_entries(capacity::SERVICE_SOURCES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_SRC4_32: HashMap<[u8; 4], u64> =
    HashMap::with_max_entries(capacity::SERVICE_SOURCES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_SRC6: HashMap<Source6Key, u64> =
    HashMap::with_max_entries(capacity::SERVICE_SOURCES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_SRC6_LENS: Array<Source6Lengths> = Array::with_max_entries(1, 0);

// LPM tries must be created without preallocation (kernel requirement).
#[map]
pub static ZT_SVC_SRC_V6: LpmTrie<[u8; 16], u64> =
    LpmTrie::with_max_entries(capacity::SERVICE_SOURCES, BPF_F_NO_PREALLOC);

// Each CPU's counters, clock and audit limiter (see zt_common::CpuState for
// why not a per-CPU map). One entry here; the loader sizes it to the
// possible CPUs, plus one that no program touches: user space's
// zt_common::Ledger, which lives as long as the programs. Mmapable for two reasons: the kernel then puts the values
// on a page boundary, so each 64-byte multiple starts a cache line (a plain
// array's values start where `struct bpf_array` ends, 56 bytes into a line
// on 6.18, and every entry would straddle lines); and user space reads the
// counters through a read-only mapping, whole words at a time
// (Tables::cpu_counters).
#[map]
pub static ZT_CPU: Array<CpuState> = Array::with_max_entries(1, BPF_F_MMAPABLE);

#[map]
pub static ZT_EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

// A peer's host address, the common case, in one exact lookup; its
// shorter prefixes in the tries below.
#[map]
pub static ZT_PEER_H4: HashMap<[u8; 4], PeerInfo> =
    HashMap::with_max_entries(capacity::PEER_PREFIXES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_PEER_H6: HashMap<[u8; 16], PeerInfo> =
    HashMap::with_max_entries(capacity::PEER_PREFIXES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_PEER_V4: LpmTrie<[u8; 4], PeerInfo> =
    LpmTrie::with_max_entries(capacity::PEER_PREFIXES, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_PEER_V6: LpmTrie<[u8; 16], PeerInfo> =
    LpmTrie::with_max_entries(capacity::PEER_PREFIXES, BPF_F_NO_PREALLOC);

// Read on every tunnel packet, written only by the control plane, so the
// memory saving of no preallocation costs nothing on the hot path.
#[map]
pub static ZT_GRANTS: HashMap<GrantKey, u64> =
    HashMap::with_max_entries(capacity::GRANTS, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_PEER_CNT: PerCpuArray<PeerCounters> =
    PerCpuArray::with_max_entries(capacity::PEERS, 0);

// Least recently used flows go first when the table is full; the size is
// set by the loader from `flows.max_entries`.
#[map]
pub static ZT_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(capacity::FLOWS_DEFAULT, 0);

#[map]
pub static ZT_FLOW_CFG: Array<FlowConfig> = Array::with_max_entries(1, 0);

#[map]
pub static ZT_ECHO_BKT: LruHashMap<SourceKey, EventBucket> =
    LruHashMap::with_max_entries(capacity::ECHO_SOURCES, 0);

// One entry per recently audited flow; see record::decision.
#[map]
pub static ZT_SUMMARY: LruHashMap<SummaryKey, FlowSummary> =
    LruHashMap::with_max_entries(capacity::SUMMARIES, 0);

// Each CPU's first summarised flows (SUMMARY_CACHE_WAYS), one slot per
// window modulo SUMMARY_CACHE_SLOTS: a flood of a few flows counts here, not
// in ZT_SUMMARY.
// Sized and line-aligned like ZT_CPU; its own map because user space
// writes it (zeroing collected slots), which would race the counters in
// ZT_CPU.
#[map]
pub static ZT_SUM_CACHE: Array<SummaryCacheSlot> =
    Array::with_max_entries(SUMMARY_CACHE_SLOTS, BPF_F_MMAPABLE);

// Datagrams whose first fragment passed, keyed as all their fragments
// carry them; see flows::fragment_of_allowed. The least recently used go
// first when full: a forgotten datagram's later fragments drop, never pass.
#[map]
pub static ZT_FRAGS: LruHashMap<FragmentKey, u64> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

// One byte per (TCP or UDP, local port): set when the host starts a flow
// from the port, never cleared. Lets most denied packets skip the flow
// lookup (flows::local_port_used).
#[map]
pub static ZT_LOCAL_PORTS: Array<u8> = Array::with_max_entries(2 * 65_536, 0);

/// The state of the CPU this program runs on. `None` only if the loader did
/// not size `ZT_CPU` to the possible CPUs.
#[inline(always)]
pub fn this_cpu() -> Option<&'static mut CpuState> {
    // SAFETY: no preconditions; the verifier inlines it.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    // SAFETY: the entry of this CPU, valid as long as the map. Programs do
    // not migrate while they run, and two never run at once on one CPU
    // (XDP and TC ingress run in softirq, TC egress with softirqs off), so
    // nothing else writes it meanwhile.
    ZT_CPU.get_ptr_mut(cpu).map(|s| unsafe { &mut *s })
}

/// This CPU's summary cache slot `slot`.
#[inline(always)]
pub fn summary_cache(slot: u32) -> Option<*mut SummaryCacheSlot> {
    // SAFETY: as in `this_cpu`.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    ZT_SUM_CACHE.get_ptr_mut(summary_cache_index(cpu, slot))
}
