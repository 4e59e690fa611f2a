//! Every map the programs use, in one place. The statics are named exactly
//! as the constants in `zt_common::map`, because the map's kernel name is the
//! static's name; the loader's tests check that each constant is present.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use zt_common::{
    COUNTER_SLOTS, ClockCache, EdgeConfig, EventBucket, FlowConfig, FlowKey, FlowState,
    FlowSummary, GrantKey, PeerCounters, PeerInfo, SUMMARY_CACHE_SLOTS, SourceKey,
    SummaryCacheSlot, SummaryKey, capacity,
};

#[map]
pub static ZT_EDGE_CFG: Array<EdgeConfig> = Array::with_max_entries(1, 0);

#[map]
pub static ZT_EDGE_UDP: Array<u64> = Array::with_max_entries(capacity::PORT_BITMAP_WORDS, 0);

// LPM tries must be created without preallocation (kernel requirement).
#[map]
pub static ZT_SSH_V4: LpmTrie<[u8; 4], u8> =
    LpmTrie::with_max_entries(capacity::SSH_ALLOW, BPF_F_NO_PREALLOC);

#[map]
pub static ZT_SSH_V6: LpmTrie<[u8; 16], u8> =
    LpmTrie::with_max_entries(capacity::SSH_ALLOW, BPF_F_NO_PREALLOC);

// Per-CPU so the hot path never contends on a shared cache line.
#[map]
pub static ZT_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
pub static ZT_EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map]
pub static ZT_EVT_BUCKET: PerCpuArray<EventBucket> = PerCpuArray::with_max_entries(1, 0);

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

// Each CPU's last coarse clock reading; see main::now.
#[map]
pub static ZT_CLOCK: PerCpuArray<ClockCache> = PerCpuArray::with_max_entries(1, 0);

// Each CPU's last summarised flow, one slot per window modulo
// SUMMARY_CACHE_SLOTS: a flood of one flow counts here, not in ZT_SUMMARY.
#[map]
pub static ZT_SUM_CACHE: PerCpuArray<SummaryCacheSlot> =
    PerCpuArray::with_max_entries(SUMMARY_CACHE_SLOTS, 0);

// One byte per (TCP or UDP, local port): set when the host starts a flow
// from the port, never cleared. Lets most denied packets skip the flow
// lookup (flows::local_port_used).
#[map]
pub static ZT_LOCAL_PORTS: Array<u8> = Array::with_max_entries(2 * 65_536, 0);
