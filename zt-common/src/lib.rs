//! Types and constants shared by the BPF programs (`zt-ebpf`) and user space
//! (`zt-userspace`).
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, built from
//! fixed-width integers, and padded explicitly: implicit padding in a map key
//! makes lookups miss at random, because the kernel hashes the padding bytes
//! too. Sizes are asserted at compile time so that a field added on one side
//! cannot silently shift the other side's view. No `bool` or enum crosses the
//! boundary; flags are bits and reasons are plain `u32` codes.
#![no_std]
// The explicit `_pad` fields are public so both sides can build the structs
// with every byte initialised; they are never read.
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding must be writable on both sides"
)]

use core::mem::size_of;

/// Map names, defined once. BPF object names are truncated by the kernel to
/// 15 bytes (`BPF_OBJ_NAME_LEN` is 16 with the NUL), so every name fits.
pub mod map {
    /// `Array<u64>`: a 65,536-bit bitmap of UDP ports allowed on the edge.
    pub const EDGE_UDP_PORTS: &str = "ZT_EDGE_UDP";
    /// `Array<u64>` with [`super::capacity::SERVICE_PORTS`] entries: the
    /// services (bit `i`: the edge's service `i`, the `ssh` service bit 0)
    /// that open a TCP or UDP port, at [`super::service_port_index`].
    pub const SERVICE_PORTS: &str = "ZT_SVC_PORTS";
    /// `Array<SourceBlock>` indexed by an IPv4 address's top 16 bits: the
    /// services (a mask like [`SERVICE_PORTS`]') that the source prefixes
    /// of /16 and shorter holding the block open, and whether longer
    /// prefixes lie in it. An allow-list is a set, not a routing table: an
    /// address may reach a service when any prefix holding it says so, so
    /// the answer is the union of three exact lookups (this one,
    /// [`SOURCES_V4_24`], [`SOURCES_V4_32`]), whatever the list's size.
    pub const SOURCES_V4_16: &str = "ZT_SRC4_16";
    /// `HashMap<[u8; 4], u64>`: the services of source prefixes /17 to /24,
    /// each expanded to its /24s, keyed by the /24 (last byte zero).
    pub const SOURCES_V4_24: &str = "ZT_SRC4_24";
    /// `HashMap<[u8; 4], u64>`: the services of source prefixes /25 to /32,
    /// each expanded to its addresses.
    pub const SOURCES_V4_32: &str = "ZT_SRC4_32";
    /// `HashMap<Source6Key, u64>`: the services of each IPv6 source prefix,
    /// keyed by its length and its network; looked up once per length of
    /// [`SOURCE_V6_LENGTHS`].
    pub const SOURCES_V6: &str = "ZT_SRC6";
    /// `Array<Source6Lengths>` with one entry: the prefix lengths
    /// [`SOURCES_V6`] holds, or [`super::SOURCE_V6_USE_TRIE`] when there are
    /// more than [`super::capacity::SOURCE_V6_LENGTHS`] of them.
    pub const SOURCE_V6_LENGTHS: &str = "ZT_SRC6_LENS";
    /// `LpmTrie<[u8; 16], u64>`: the IPv6 service sources when they use
    /// more prefix lengths than [`SOURCES_V6`] is looked up for. Each
    /// prefix's mask holds the bits of every prefix containing it, so the
    /// longest match answers for all of them. Empty otherwise.
    pub const SERVICE_SOURCES_V6: &str = "ZT_SVC_SRC_V6";
    /// `Array<CpuState>` with one entry per possible CPU, indexed by CPU
    /// number: each CPU's counters, clock and audit rate limiter; then one
    /// more, the [`super::Ledger`], which no program writes. Created
    /// mmapable, which puts the entries on a page boundary, so that each
    /// starts a cache line, and lets user space read the counters through
    /// a mapping, a whole word at a time.
    pub const CPU_STATE: &str = "ZT_CPU";
    /// `RingBuf` carrying [`super::Event`] records to the audit writer.
    pub const EVENTS: &str = "ZT_EVENTS";
    /// `HashMap<[u8; 4], PeerInfo>`: tunnel peer by IPv4 source, for the
    /// peers' /32 addresses (nearly all of them): one exact lookup.
    pub const PEER_HOSTS_V4: &str = "ZT_PEER_H4";
    /// `HashMap<[u8; 16], PeerInfo>`: as [`PEER_HOSTS_V4`], for /128s.
    pub const PEER_HOSTS_V6: &str = "ZT_PEER_H6";
    /// `LpmTrie<[u8; 4], PeerInfo>`: tunnel peer by IPv4 source, for the
    /// peers' prefixes shorter than /32; looked up only when
    /// [`PEER_HOSTS_V4`] has no entry (a host address is the longest
    /// match there can be).
    pub const PEER_V4: &str = "ZT_PEER_V4";
    /// `LpmTrie<[u8; 16], PeerInfo>`: as [`PEER_V4`], for IPv6.
    pub const PEER_V6: &str = "ZT_PEER_V6";
    /// `HashMap<GrantKey, u64>`: per-peer port bitmaps, 64 ports a word.
    pub const GRANTS: &str = "ZT_GRANTS";
    /// `PerCpuArray<PeerCounters>` indexed by peer index.
    pub const PEER_COUNTERS: &str = "ZT_PEER_CNT";
    /// `LruHashMap<FlowKey, FlowState>`: flows the host started.
    pub const FLOWS: &str = "ZT_FLOWS";
    /// `Array<FlowConfig>` with one entry: timeouts and the echo rate.
    pub const FLOW_CONFIG: &str = "ZT_FLOW_CFG";
    /// `LruHashMap<SourceKey, EventBucket>`: ICMP echo token bucket per source.
    pub const ECHO_BUCKETS: &str = "ZT_ECHO_BKT";
    /// `HashMap<SummaryKey, FlowSummary>`: per-flow audit summarising.
    pub const SUMMARIES: &str = "ZT_SUMMARY";
    /// `Array<SummaryCacheSlot>` with [`super::SUMMARY_CACHE_SLOTS`] entries
    /// per possible CPU (see [`super::summary_cache_index`]): each CPU's
    /// first summarised flows, per window. Mmapable like [`CPU_STATE`].
    pub const SUMMARY_CACHE: &str = "ZT_SUM_CACHE";
    /// `Array<u8>`: local TCP and UDP ports the host started flows from.
    pub const LOCAL_PORTS: &str = "ZT_LOCAL_PORTS";
    /// `LruHashMap<FragmentKey, u64>`: datagrams whose first fragment
    /// passed, with when it did (`bpf_ktime_get_coarse_ns`).
    pub const FRAGMENTS: &str = "ZT_FRAGS";
}

/// Map capacities, defined once.
pub mod capacity {
    /// Words in the UDP port bitmap: 65,536 ports / 64 bits.
    pub const PORT_BITMAP_WORDS: u32 = 1024;
    /// Entries per service source map (`ssh_allow` and every service's
    /// `from`, prefixes as each map expands them). The benchmarks go to
    /// 1,000,000.
    pub const SERVICE_SOURCES: u32 = 1 << 20;
    /// Entries of [`super::map::SOURCES_V4_16`]: one per /16.
    pub const SOURCE_V4_BLOCKS: u32 = 1 << 16;
    /// Distinct IPv6 source prefix lengths looked up one by one; past
    /// this, the IPv6 sources go to the trie.
    pub const SOURCE_V6_LENGTHS: u32 = 16;
    /// Edge services, the `ssh` service included: the bits of a service
    /// mask (`u64`).
    pub const SERVICES: u32 = 64;
    /// Entries of the service port map: a mask per TCP port, then per UDP
    /// port ([`super::service_port_index`]).
    pub const SERVICE_PORTS: u32 = 2 * 65_536;
    /// Tunnel peers; also the size of the per-peer counter array.
    pub const PEERS: u32 = 65_536;
    /// Peer address prefixes per family.
    pub const PEER_PREFIXES: u32 = 4 * PEERS;
    /// Grant words: every peer with a handful of ranges.
    pub const GRANTS: u32 = 1 << 18;
    /// Audit ring buffer size in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 1 << 22;
    /// Default flow table size; `flows.max_entries` overrides it at load time.
    pub const FLOWS_DEFAULT: u32 = 65_536;
    /// Sources with an ICMP echo token bucket; the least recently seen go first.
    pub const ECHO_SOURCES: u32 = 16_384;
    /// Flows being summarised for the audit trail at once.
    pub const SUMMARIES: u32 = 65_536;
    /// Fragmented datagrams being let through at once; the least recently
    /// used go first.
    pub const FRAGMENTS: u32 = 8192;
}

/// Which program counted a decision. Counters are laid out per program so
/// that `status` can show the edge and the tunnel separately.
pub mod program {
    pub const EDGE: u32 = 0;
    pub const TUNNEL: u32 = 1;
    /// The egress flow recorders (both interfaces share one block).
    pub const EGRESS: u32 = 2;
    /// Number of programs; the counter array holds this many reason blocks.
    pub const COUNT: u32 = 3;
    /// Kernel-visible program names, used to recognise our own attachments.
    pub const EDGE_NAME: &str = "zt_edge";
    pub const TUNNEL_NAME: &str = "zt_tunnel";
    /// TC egress on the edge interface (Ethernet).
    pub const EDGE_EGRESS_NAME: &str = "zt_edge_out";
    /// TC egress on the tunnel interface (L3 or Ethernet, as `TUNNEL_L2`).
    pub const TUNNEL_EGRESS_NAME: &str = "zt_tunnel_out";
}

/// Defines every verdict reason once: its constant, code, machine name,
/// class (`pass` or `drop`) and one-line meaning. The constants, [`reason::ALL`],
/// [`reason::name`], [`reason::meaning`] and the README's reason table
/// (checked by a test in zt-userspace) all follow from the one list.
macro_rules! reasons {
    ($(
        $(#[$doc:meta])*
        $konst:ident = $code:literal, $name:literal, $class:ident, $meaning:literal;
    )*) => {
        $( $(#[$doc])* pub const $konst: u32 = $code; )*

        /// Every verdict code, in code order, for reports that list all counters.
        pub const ALL: [u32; [$($code),*].len()] = [$($konst),*];

        /// Stable machine name of a reason code (or counter slot), used in
        /// audit records, `status` and the metrics.
        #[must_use]
        pub const fn name(code: u32) -> &'static str {
            match code {
                $( $konst => $name, )*
                WOULD_DROP => "would_drop",
                ALLOWS_AUDITED => "allows_audited",
                FLOWS_CREATED => "flows_created",
                EVENTS_SUPPRESSED => "events_suppressed",
                EVENTS_LOST => "events_lost",
                _ => "unknown",
            }
        }

        /// What a verdict reason means, in one line.
        #[must_use]
        pub const fn meaning(code: u32) -> &'static str {
            match code {
                $( $konst => $meaning, )*
                _ => "",
            }
        }

        // The class in the list must agree with the code range that
        // `is_allow` reads, which the programs' hot path relies on.
        $(
            const _: () = assert!(matches!(stringify!($class).as_bytes(), b"pass" | b"drop"));
            const _: () = assert!(is_allow($konst) == class_is_pass(stringify!($class)));
        )*
    };
}

/// Reason codes. Codes below [`reason::FIRST_DENY`] allow, the others drop.
/// Each code is also an index into the per-CPU counter array.
pub mod reason {
    pub const FIRST_DENY: u32 = 16;

    reasons! {
        PASS_WIREGUARD = 0, "wireguard", pass, "edge: UDP to a WireGuard port";
        /// The `ssh` service's own pass, named as before services.
        PASS_SSH = 1, "ssh_allowed", pass, "edge: TCP to the SSH port from a source in ssh_allow";
        PASS_ARP = 2, "arp", pass, "ARP (on the tunnel: from a peer, or link-local with link_local_neighbors)";
        PASS_NEIGHBOR_DISCOVERY = 3, "neighbor_discovery", pass, "IPv6 neighbour solicitation or advertisement";
        PASS_GRANT = 4, "granted", pass, "tunnel: TCP or UDP to a port granted to the peer";
        PASS_ICMP_GRANT = 5, "icmp_granted", pass, "tunnel: ICMP granted to the peer";
        /// The exact reverse of a flow the host started.
        PASS_REPLY = 6, "reply", pass, "the exact reverse of a flow the host started";
        /// An echo request within its source's rate.
        PASS_ICMP_ECHO = 7, "icmp_echo", pass, "edge: an echo request within its source's rate";
        /// An ICMP error about a flow the host started (keeps PMTU discovery working).
        PASS_ICMP_RELATED = 8, "icmp_related", pass, "an ICMP error about a flow the host started (keeps PMTU discovery working)";
        /// A later fragment of a datagram whose first fragment passed.
        PASS_FRAGMENT = 9, "fragment_of_allowed", pass, "a later fragment of a datagram whose first fragment passed";
        /// An MLD query or report (ICMPv6 130, 131, 132, 143) from a link-local
        /// source with hop limit 1, as RFC 4890 4.4.1 asks a host to accept:
        /// without them a switch that snoops MLD stops forwarding the host's
        /// solicited-node multicast, and IPv6 neighbour discovery with it.
        PASS_MLD = 10, "mld", pass, "edge: an MLD query or report (ICMPv6 130, 131, 132, 143) from link-local with hop limit 1 (RFC 4890 4.4.1)";
        PASS_SERVICE = 11, "service_allowed", pass, "edge: TCP or UDP to a port of an edge service from a source in its from";
        DROP_PORT_NOT_ALLOWED = 16, "port_not_allowed", drop, "edge: TCP or UDP to a port of no service (UDP: nor a WireGuard port)";
        DROP_SSH_SOURCE = 17, "ssh_source_not_allowed", drop, "TCP to the SSH port from outside ssh_allow";
        DROP_MALFORMED = 18, "malformed", drop, "truncated or contradictory headers";
        DROP_FRAGMENT = 19, "non_first_fragment", drop, "a fragment other than the first, of a datagram whose first fragment did not pass (or not within flows.fragment_timeout)";
        DROP_UNSUPPORTED_L3 = 20, "unsupported_l3", drop, "neither ARP, IPv4 nor IPv6";
        DROP_PROTOCOL_NOT_ALLOWED = 21, "protocol_not_allowed", drop, "any other L4 protocol or ICMP type";
        DROP_HEADER_LIMIT = 22, "header_limit", drop, "a third VLAN tag or a seventh IPv6 extension header";
        DROP_PEER_UNKNOWN = 23, "peer_unknown", drop, "tunnel: the source belongs to no peer";
        DROP_NOT_GRANTED = 24, "not_granted", drop, "tunnel: the peer was not granted this port or ICMP";
        /// The configuration map is empty: the program was attached before it
        /// was configured. Dropping is the only safe answer.
        DROP_NOT_CONFIGURED = 25, "not_configured", drop, "edge: the programs were loaded without an edge policy";
        /// An echo request over its source's rate (or echo disabled with rate 0).
        DROP_ICMP_RATE = 26, "icmp_rate_limited", drop, "edge: an echo request over its source's rate (every one with icmp_echo_rate = \"0\")";
        /// An ICMP error that matches no flow the host started.
        DROP_ICMP_UNRELATED = 27, "icmp_unrelated", drop, "an ICMP error that quotes no live flow of the host's";
        /// A router solicitation, router advertisement or redirect on the
        /// tunnel: a peer is never the host's router, and an advertisement
        /// accepted there would install routes.
        DROP_ROUTER_MESSAGE = 28, "router_message", drop, "tunnel: an ICMPv6 router solicitation, router advertisement or redirect, from anyone (a peer is never the host's router)";
        /// The port is a service's, but no service with the port admits
        /// the source (for the `ssh` service alone: `ssh_source_not_allowed`).
        DROP_SERVICE_SOURCE = 29, "service_source_not_allowed", drop, "edge: TCP or UDP to a port of an edge service from a source in none of its services' from";
    }

    /// Size of one program's block of counters: a multiple of 8, so that
    /// [`super::CpuState`] stays whole cache lines.
    pub const COUNT: u32 = 40;

    /// Whether a reason code allows the packet.
    #[must_use]
    pub const fn is_allow(code: u32) -> bool {
        code < FIRST_DENY
    }

    /// The word for a verdict that allows (`true`) or drops, as `status`,
    /// the metrics, `explain` and the README's reason table write it.
    #[must_use]
    pub const fn class_name(allow: bool) -> &'static str {
        if allow { "pass" } else { "drop" }
    }

    /// The verdict word of reason `code`.
    #[must_use]
    pub const fn class(code: u32) -> &'static str {
        class_name(is_allow(code))
    }

    /// Whether a class word of the reason list is `pass`.
    const fn class_is_pass(class: &str) -> bool {
        matches!(class.as_bytes(), b"pass")
    }

    /// Counter slot (not a verdict): packets that the policy drops but that
    /// passed because their program or peer runs in audit mode. Each is also
    /// counted under its drop reason. Below [`FIRST_DENY`] on purpose: a
    /// program returns it as the code of a would-drop, so the entry points'
    /// one `is_allow` test passes the packet and the enforce path gains no
    /// instruction.
    pub const WOULD_DROP: u32 = 15;
    /// Whether a drop reason still drops in audit mode: the parser's
    /// refusals (and an edge program loaded without a policy), which are
    /// not the policy's to relax. A packet the parser cannot account for
    /// is never let through, audit or not.
    #[must_use]
    pub const fn drops_in_audit(code: u32) -> bool {
        matches!(
            code,
            DROP_MALFORMED | DROP_HEADER_LIMIT | DROP_UNSUPPORTED_L3 | DROP_NOT_CONFIGURED
        )
    }

    /// Counter slot (not a verdict): allowed decisions that were audited
    /// (each a new TCP connection). With the deny counters (every deny is
    /// audited) it gives the decisions the audit trail accounts for.
    pub const ALLOWS_AUDITED: u32 = 14;
    /// Counter slot (not a verdict): flows the egress programs created.
    /// With the table's current size this gives the LRU evictions.
    pub const FLOWS_CREATED: u32 = 37;
    /// Counter slot (not a verdict): deny events the rate limiter held back.
    pub const EVENTS_SUPPRESSED: u32 = 38;
    /// Counter slot (not a verdict): events lost because the ring buffer was full.
    pub const EVENTS_LOST: u32 = 39;
}

/// The `ssh` service's bit in a service mask ([`map::SERVICE_PORTS`]):
/// the lowest, so that where it shares a port, a decision names it first.
pub const SSH_SERVICE: u64 = 1;

/// Where the services of `port` of IP protocol `protocol` (TCP or UDP)
/// are in [`map::SERVICE_PORTS`].
#[must_use]
pub const fn service_port_index(protocol: u8, port: u16) -> u32 {
    let base = if protocol == proto::UDP { 65_536 } else { 0 };
    base + port as u32
}

/// Index of `(program, reason)` in the counter array.
#[must_use]
pub const fn counter_index(program: u32, reason: u32) -> u32 {
    program * reason::COUNT + reason
}

/// Total slots in the counter array.
pub const COUNTER_SLOTS: u32 = program::COUNT * reason::COUNT;

/// Names of the programs' read-only globals, which the loader sets before
/// the programs are verified. The verifier then knows their values, so the
/// branches on them cost nothing per packet.
pub mod global {
    /// [`super::EdgeConfig`].
    pub const EDGE_CONFIG: &str = "ZT_EDGE_CONFIG";
    /// `u8`: 1 when the tunnel device has an Ethernet header (a veth in
    /// tests), 0 for a `WireGuard` device, where packets start at the IP
    /// header.
    pub const TUNNEL_L2: &str = "TUNNEL_L2";
    /// `u8`: 1 when ARP and neighbour solicitations and advertisements from
    /// link-local sources pass on an Ethernet tunnel device
    /// (`tunnel.link_local_neighbors`); otherwise only a peer's addresses may
    /// send them.
    pub const TUNNEL_LINK_LOCAL: &str = "TUNNEL_LINK_LOCAL";
    /// `u8`: 1 when the tunnel program runs in audit mode for packets of
    /// no peer (the top-level `mode`); a peer's own mode is
    /// [`super::PEER_AUDIT`].
    pub const TUNNEL_AUDIT: &str = "TUNNEL_AUDIT";
}

/// Edge settings that are not sets: the read-only global
/// [`global::EDGE_CONFIG`], fixed when the programs are loaded. A global
/// rather than a map because a map lookup (and the branches on what it
/// returns) was a fifth of a denied packet's cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EdgeConfig {
    /// Once the SSH port; it is the `ssh` service's entry in
    /// [`map::SERVICE_PORTS`] now, which a reload can change.
    pub _pad0: u32,
    /// [`EDGE_CONFIGURED`] when the programs were loaded with an edge
    /// policy. Without one the edge program drops everything. (The policy's
    /// maps are filled before the program is attached, so it never sees a
    /// packet with half a policy.)
    pub flags: u32,
}
const _: () = assert!(size_of::<EdgeConfig>() == 8);

/// [`EdgeConfig::flags`] bit: there is an edge policy.
pub const EDGE_CONFIGURED: u32 = 1;
/// [`EdgeConfig::flags`] bit: the edge runs in audit mode (`mode =
/// "audit"`): a packet its policy drops passes, counted in
/// [`reason::WOULD_DROP`] and audited as a would-deny. Fixed at load like
/// the rest of `EdgeConfig`, so the enforce path pays nothing for it.
pub const EDGE_AUDIT: u32 = 2;

/// One /16 of [`map::SOURCES_V4_16`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceBlock {
    /// The services its prefixes of /16 and shorter open.
    pub services: u64,
    /// `SOURCE_DEEPER_*` bits: which longer-prefix maps have entries in
    /// this /16, so that an address of a block with none costs one lookup.
    pub deeper: u32,
    pub _pad0: u32,
}
const _: () = assert!(size_of::<SourceBlock>() == 16);

/// [`SourceBlock::deeper`] bit: [`map::SOURCES_V4_24`] has entries in the block.
pub const SOURCE_DEEPER_24: u32 = 1;
/// [`SourceBlock::deeper`] bit: [`map::SOURCES_V4_32`] has entries in the block.
pub const SOURCE_DEEPER_32: u32 = 2;

/// Key of [`map::SOURCES_V6`]: a prefix length and the address with every
/// bit past it cleared.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source6Key {
    pub prefix_len: u32,
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<Source6Key>() == 20);

/// The one entry of [`map::SOURCE_V6_LENGTHS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Source6Lengths {
    /// How many of `lengths` are in use, or [`SOURCE_V6_USE_TRIE`].
    pub count: u32,
    pub lengths: [u8; capacity::SOURCE_V6_LENGTHS as usize],
}
const _: () = assert!(size_of::<Source6Lengths>() == 20);

/// [`Source6Lengths::count`] when the IPv6 sources are in the trie.
pub const SOURCE_V6_USE_TRIE: u32 = u32::MAX;

/// `addr` with every bit past `prefix_len` (at most 128) cleared.
#[expect(
    clippy::inline_always,
    reason = "the BPF side calls it per packet; a BPF-to-BPF call would cost more than its body"
)]
#[inline(always)]
#[must_use]
pub fn v6_network(addr: [u8; 16], prefix_len: u32) -> [u8; 16] {
    // Indexing by constants, not slicing: nothing for the verifier to
    // bound-check.
    let a = addr;
    let hi = [a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]];
    let lo = [a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]];
    let (mut hi, mut lo) = (u64::from_be_bytes(hi), u64::from_be_bytes(lo));
    if prefix_len == 0 {
        hi = 0;
        lo = 0;
    } else if prefix_len <= 64 {
        hi &= u64::MAX << (64 - prefix_len);
        lo = 0;
    } else if prefix_len < 128 {
        lo &= u64::MAX << (128 - prefix_len);
    }
    let (h, l) = (hi.to_be_bytes(), lo.to_be_bytes());
    [
        h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], l[0], l[1], l[2], l[3], l[4], l[5], l[6],
        l[7],
    ]
}

/// A tunnel peer, as found by source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// Index into [`map::PEER_COUNTERS`] and part of every [`GrantKey`].
    pub index: u32,
    /// `PEER_*` bits.
    pub flags: u32,
}
const _: () = assert!(size_of::<PeerInfo>() == 8);

/// [`PeerInfo::flags`] bit: ICMP echo requests from this peer pass.
pub const PEER_ICMP: u32 = 1;
/// [`PeerInfo::flags`] bit: the peer runs in audit mode: what the policy
/// drops from it passes, as with [`EDGE_AUDIT`]. It travels with the peer,
/// so a reload changes it in place.
pub const PEER_AUDIT: u32 = 2;

/// Key of one 64-port word of a peer's grants.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrantKey {
    pub peer: u32,
    /// IP protocol number: 6 (TCP) or 17 (UDP).
    pub protocol: u8,
    pub _pad0: u8,
    /// `port / 64`; bit `port % 64` of the value grants the port.
    pub word: u16,
}
const _: () = assert!(size_of::<GrantKey>() == 8);

/// Packets allowed and dropped from one tunnel peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub allowed: u64,
    pub denied: u64,
}
const _: () = assert!(size_of::<PeerCounters>() == 16);

/// A CPU's last reading of the coarse clock and the jiffies value it was
/// taken at. The coarse clock only moves when jiffies do, so while jiffies
/// (one inlined load) have not moved, the cached reading is the clock, and
/// the helper call (with its return thunk, ~10 ns in a VM) is saved.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockCache {
    pub jiffies: u64,
    pub ns: u64,
}
const _: () = assert!(size_of::<ClockCache>() == 16);

/// Per-CPU token bucket that limits deny events sent to user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBucket {
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
    /// Tokens left; one deny event costs one.
    pub tokens: u64,
}
const _: () = assert!(size_of::<EventBucket>() == 16);

/// One CPU's state in [`map::CPU_STATE`]: what every packet touches,
/// written only by the programs running on that CPU.
///
/// A plain array indexed by CPU number, not per-CPU maps: one lookup per
/// packet serves the clock, the limiter and the counters, where separate
/// per-CPU maps took one each, and a per-CPU lookup reads two cache lines
/// (the map's pointer table, then the value) where this reads one. The
/// clock and the limiter share the first line.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    pub clock: ClockCache,
    pub bucket: EventBucket,
    /// Indexed by [`counter_index`].
    pub counters: [u64; COUNTER_SLOTS as usize],
    /// Up to a whole number of cache lines, so no two CPUs' hot first lines
    /// share one.
    pub _pad: [u64; 4],
}
const _: () = assert!(size_of::<CpuState>() == 16 + 16 + 8 * COUNTER_SLOTS as usize + 32);
const _: () = assert!(size_of::<CpuState>().is_multiple_of(64));

/// The last entry of [`map::CPU_STATE`], after every CPU's: user space's
/// own, never written by a program, so it lives exactly as long as the
/// programs, through any number of daemons. It carries what a `kill -9`
/// would otherwise lose: the counts of the programs these replaced
/// (`carried`, where a [`CpuState`] has its counters, so every reader that
/// sums the entries' counters counts them), and how far the audit trail
/// accounts for the audited decisions counted here, so that the next
/// `ztxdp up` can write what a killed daemon did not (see
/// `zt-userspace/src/audit/ledger.rs`).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ledger {
    /// One more than the `seq` of the newest trail record accounted for
    /// here; 0 while no daemon has started accounting for these programs.
    pub next_seq: u64,
    /// The first 8 bytes of that record's chain value (big-endian, as the
    /// hex reads; 0 for none), telling its trail from another file.
    pub chain: u64,
    /// Audited decisions of the edge and the tunnel program that the trail's
    /// records up to `next_seq - 1` stand for, since the `up` that replaced
    /// no programs: the same span as the counters (own plus `carried`).
    pub accounted: [u64; 2],
    /// The counters of the programs these replaced, summed over their CPUs
    /// and their own `carried`; the audit's own slots (events suppressed
    /// and lost) stay 0, since each program set reports its own.
    pub carried: [u64; COUNTER_SLOTS as usize],
    /// `[events_suppressed, events_lost]` of these programs (edge, tunnel)
    /// that `lost` records up to `next_seq - 1` reported.
    pub reported: [[u64; 2]; 2],
}
const _: () = assert!(size_of::<Ledger>() == size_of::<CpuState>());
const _: () =
    assert!(core::mem::offset_of!(Ledger, carried) == core::mem::offset_of!(CpuState, counters));

impl Default for Ledger {
    fn default() -> Self {
        Self {
            next_seq: 0,
            chain: 0,
            accounted: [0; 2],
            carried: [0; COUNTER_SLOTS as usize],
            reported: [[0; 2]; 2],
        }
    }
}

/// Deny events each CPU may send per second; the rest are counted in
/// [`reason::EVENTS_SUPPRESSED`]. Allow events are never rate-limited.
pub const DENY_EVENTS_PER_SEC: u64 = 1000;

/// One decision, as sent through [`map::EVENTS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) at the decision.
    pub ts_ns: u64,
    /// Source address; IPv4 uses the first four bytes.
    pub src: [u8; 16],
    /// Destination address; IPv4 uses the first four bytes.
    pub dst: [u8; 16],
    pub src_port: u16,
    pub dst_port: u16,
    pub ifindex: u32,
    /// A `reason` code (all fit in 16 bits). 16 bits, not 32, to make room
    /// for `flags` in the same 64 bytes; on a little-endian machine the
    /// old 32-bit field read the same, and its upper bytes (now `flags`)
    /// were 0, so events of older programs read as enforced.
    pub reason: u16,
    /// `EVENT_*` bits.
    pub flags: u8,
    pub _pad0: u8,
    /// One of [`program`].
    pub program: u8,
    /// 4 or 6 (0 for a non-IP frame such as ARP).
    pub ip_version: u8,
    /// IP protocol number.
    pub protocol: u8,
    pub tcp_flags: u8,
    /// Peer index for tunnel decisions, [`NO_PEER`] otherwise.
    pub peer: u32,
    /// Decisions of this flow (same addresses, ports, protocol and reason)
    /// that were summarised into this event instead of sent: the earlier
    /// window's count, flushed with this event. Counts of windows that end
    /// without a new event are swept from [`map::SUMMARIES`] by user space.
    pub suppressed: u32,
}
const _: () = assert!(size_of::<Event>() == 64);

/// [`Event::flags`] and [`SummaryKey::flags`] bit: the policy dropped the
/// packet, but it passed because its program or peer runs in audit mode
/// (a would-deny).
pub const EVENT_WOULD_DROP: u8 = 1;

/// Per-flow audit summarising: one event per flow per window. Each window
/// of each flow is its own entry (the window number is in the key), so the
/// kernel never touches an entry after its window: user space removes
/// entries two windows old with an atomic lookup-and-delete, without racing
/// the programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowSummary {
    /// `bpf_ktime_get_coarse_ns` when the window's first event was sent.
    pub window_start_ns: u64,
    /// Decisions since then that were not sent (atomically incremented;
    /// 64 bits because BPF has no 32-bit atomics in Rust).
    pub suppressed: u64,
}
const _: () = assert!(size_of::<FlowSummary>() == 16);

/// A summarising window is 2^30 ns (1.07 s): a shift per packet where a
/// second would cost a 64-bit division.
pub const SUMMARY_WINDOW_SHIFT: u32 = 30;
/// Length of a summarising window.
pub const SUMMARY_WINDOW_NS: u64 = 1 << SUMMARY_WINDOW_SHIFT;

/// The summarising window that `ns` (`CLOCK_MONOTONIC`) falls in, as the
/// programs and user space both number it.
#[must_use]
#[expect(
    clippy::cast_possible_truncation,
    reason = "window numbers wrap after 146 years of uptime"
)]
pub const fn summary_window(ns: u64) -> u32 {
    (ns >> SUMMARY_WINDOW_SHIFT) as u32
}

/// When `window` (as [`summary_window`] numbers it) began.
#[must_use]
pub const fn summary_window_start(window: u32) -> u64 {
    (window as u64) << SUMMARY_WINDOW_SHIFT
}

/// Key of a summarised flow: the decision's addresses, ports, protocol,
/// reason and program. Addresses first and 8-byte aligned, so that building
/// and comparing a key are whole-word moves.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SummaryKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// `bpf_ktime_get_coarse_ns() >> SUMMARY_WINDOW_SHIFT`.
    pub window: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub reason: u32,
    pub protocol: u8,
    pub ip_version: u8,
    pub program: u8,
    /// [`EVENT_WOULD_DROP`] for a would-deny: its own flow, so that its
    /// summary says so too.
    pub flags: u8,
}

/// Windows a CPU's summary cache cycles through (window number modulo this).
/// A slot is written by the programs only while its window is current, and
/// user space collects it two windows later: four slots leave user space a
/// whole window to do so before the slot comes round again.
pub const SUMMARY_CACHE_SLOTS: u32 = 4;

/// The summary cache slot a window's counts go to: the programs write it,
/// user space collects it, so both take it from here.
#[must_use]
pub const fn summary_cache_slot(window: u32) -> u32 {
    window % SUMMARY_CACHE_SLOTS
}

/// Where CPU `cpu`'s `slot` is in [`map::SUMMARY_CACHE`].
#[must_use]
pub const fn summary_cache_index(cpu: u32, slot: u32) -> u32 {
    cpu * SUMMARY_CACHE_SLOTS + slot
}

/// Flows a CPU counts in its cache per window. With one, a second flow
/// flooding the same CPU in the same window paid a hash lookup and an
/// atomic add on every packet (about twice a cached packet's cost); each
/// way costs a flow the cache misses one more key compare.
pub const SUMMARY_CACHE_WAYS: usize = 4;

/// One CPU's cached flows for one window, the first flows it summarised
/// then, in the order they came.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SummaryCacheSlot {
    pub ways: [CachedFlow; SUMMARY_CACHE_WAYS],
}
const _: () = assert!(size_of::<SummaryCacheSlot>() == 64 * SUMMARY_CACHE_WAYS);

/// A flow in a CPU's summary cache: the flow (which already sent its event
/// in the key's window) and the decisions counted here instead of in
/// [`map::SUMMARIES`]. A flood of a few flows then costs no hash lookup per
/// packet. User space adds `count` to the flow's summary record and zeroes
/// it. One cache line, so a way costs the packet path one line and no two
/// CPUs' ways share one.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: SummaryKey,
    pub count: u64,
    pub _pad: u64,
}
const _: () = assert!(size_of::<CachedFlow>() == 64);
const _: () = assert!(size_of::<SummaryKey>() == 48);

/// [`Event::peer`] value when no tunnel peer is involved.
pub const NO_PEER: u32 = u32::MAX;

/// A flow as the host sees it: `local` is this host. Egress packets give it
/// as (src, dst); ingress replies give it as (dst, src). For ICMP echo,
/// `local_port` is the echo identifier and `remote_port` is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The interface the flow left by. Its replies must come in by the same
    /// one: otherwise a flow started through the tunnel would admit a
    /// spoofed "reply" from the internet on the edge.
    pub ifindex: u32,
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub protocol: u8,
    /// 4 or 6: keeps 1.2.3.4 apart from the IPv6 address `102:304::`.
    pub ip_version: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 44);

/// A fragmented datagram, as its fragments all carry it: the interface it
/// arrived on, its addresses, its identification and its protocol. Only the
/// first fragment has ports, so a datagram whose first fragment passed is
/// remembered under this key, and its later fragments follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    pub ifindex: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// IPv4's 16-bit identification, or the IPv6 fragment header's 32 bits.
    pub id: u32,
    /// IPv4's protocol; 0 for IPv6, which reassembles by addresses and
    /// identification alone, and whose first fragment's protocol need not be
    /// its later fragments' next header (extension headers may follow the
    /// fragment header).
    pub protocol: u8,
    /// 4 or 6, as in [`FlowKey`].
    pub ip_version: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FragmentKey>() == 44);

/// What is known of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` of the last packet either way.
    pub last_seen_ns: u64,
    /// `FLOW_*` bits.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<FlowState>() == 16);

/// [`FlowState::flags`] bit: a FIN or RST was seen; the short timeout applies.
pub const FLOW_CLOSING: u32 = 1;
/// [`FlowState::flags`] bit: the host's first packet of the flow answered
/// something the ingress policy passed (a granted port, a `WireGuard` port).
/// Such a flow admits no reply: the policy alone decides that direction, so
/// a revoke or a closed port is not reopened by what the host answered.
pub const FLOW_ANSWER: u32 = 2;

/// Timeouts and the echo rate: one entry in [`map::FLOW_CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowConfig {
    pub tcp_established_ns: u64,
    pub tcp_closing_ns: u64,
    pub udp_ns: u64,
    pub icmp_ns: u64,
    /// Nanoseconds per echo token; 0 disables echo entirely.
    pub echo_ns_per_token: u64,
    /// Bucket size: echoes a quiet source may send at once.
    pub echo_burst: u64,
    /// How long after its first fragment a datagram's later fragments pass.
    pub fragment_ns: u64,
}
const _: () = assert!(size_of::<FlowConfig>() == 56);

/// Key of a per-source bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceKey {
    pub addr: [u8; 16],
    pub ip_version: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(size_of::<SourceKey>() == 20);

/// IP protocol numbers used on both sides.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// TCP flag bits as they appear in byte 13 of the header.
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Parser limits; the model in user space uses the same numbers.
pub mod limits {
    /// VLAN tags walked (802.1Q and 802.1ad); a third tag is a drop.
    pub const MAX_VLAN: usize = 2;
    /// IPv6 extension headers walked before giving up with a drop.
    pub const MAX_IPV6_EXT: usize = 6;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers
    // and byte arrays, and has no implicit padding (the size asserts above pin
    // the layout), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::EdgeConfig {}
    unsafe impl aya::Pod for super::PeerInfo {}
    unsafe impl aya::Pod for super::SourceBlock {}
    unsafe impl aya::Pod for super::Source6Key {}
    unsafe impl aya::Pod for super::Source6Lengths {}
    unsafe impl aya::Pod for super::GrantKey {}
    unsafe impl aya::Pod for super::PeerCounters {}
    unsafe impl aya::Pod for super::EventBucket {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::FlowConfig {}
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::SummaryCacheSlot {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::Ledger {}
    unsafe impl aya::Pod for super::FlowSummary {}
    unsafe impl aya::Pod for super::SummaryKey {}
}
