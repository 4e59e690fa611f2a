//! The reference model of the policy: the decisions of `zt_edge` and
//! `zt_tunnel`, recomputed in plain safe Rust over a packet's bytes.
//!
//! It is written from the rules, not from the BPF code's data structures: it
//! reads bytes from a slice instead of casting header structs, matches
//! prefixes with `ipnet` instead of an LPM trie, and checks grants as port
//! ranges instead of 64-port bitmap words. What it shares with the kernel is
//! the *behaviour*, to the reason code: the same order of checks and the same
//! reason for every malformed case (`zt-ebpf/src/parse.rs` and `verdict.rs`).
//! The differential tests hold the two to that, packet by packet, so a
//! disagreement is a bug in one of them.
//!
//! The state (`zt-ebpf/src/flows.rs`) is modelled by [`FlowTable`] and driven
//! through [`StatefulModel`], with the clock passed in (`now_ns`, the
//! kernel's `bpf_ktime_get_ns`) so tests decide when time passes. The
//! stateless [`EdgeModel::verdict`] and [`TunnelModel::verdict`] judge a
//! packet as the first one a freshly loaded program sees: no flow recorded,
//! and a full echo bucket for every source.
//!
//! Its modules mirror `zt-ebpf`'s: [`parse`] the headers, [`verdict`] the
//! policy, [`flows`] the state; this file holds what `ztxdp explain`
//! reports about a decision ([`Fact`], [`Explanation`]).
//!
//! The model evaluates a configured program: the kernel's
//! `not_configured` state has no counterpart here. Nor does the kernel's
//! least-recently-used eviction, which is approximate (per-CPU free lists):
//! the model never forgets a flow or an echo source, so it agrees with the
//! kernel while the tables are well below their capacity.

use std::net::IpAddr;

use ipnet::IpNet;
use zt_common::reason;

use crate::policy::{Grant, Mode};

/// Whether a packet the program decided `code` for is a would-drop under
/// `mode`: the policy drops it, but it passes because of audit mode. Parse
/// failures are never would-drops (`reason::drops_in_audit`).
#[must_use]
pub const fn would_drop(mode: Mode, code: u32) -> bool {
    matches!(mode, Mode::Audit) && !reason::is_allow(code) && !reason::drops_in_audit(code)
}

/// Whether a packet the program decided `code` for passes under `mode`.
#[must_use]
pub const fn passes(mode: Mode, code: u32) -> bool {
    reason::is_allow(code) || would_drop(mode, code)
}

mod flows;
mod parse;
mod verdict;

pub use flows::{Datagram, Flow, FlowEntry, FlowTable};
pub use verdict::{EdgeModel, StatefulModel, TunnelDecision, TunnelModel, names_service};

/// One thing a decision rested on, in the order the program looked: what
/// `ztxdp explain` reports. The reason code says how a decision ended; these
/// say which rule, table entry or flow led there, or that none matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fact {
    /// UDP to `port`, which `edge.wireguard_ports` lists or not.
    WireguardPort { port: u16, listed: bool },
    /// TCP or UDP (`protocol`) to `port`, which no edge service opens.
    NoService { protocol: u8, port: u16 },
    /// TCP or UDP to a port of edge service `service` (its position in
    /// [`EdgePolicy::services`]; 0 is `ssh`) from `source`: the longest
    /// prefix of its `from` (`ssh_allow`) holding the source, if any. A
    /// decision lists the port's services in order up to the first that
    /// admits the source.
    Service {
        service: u32,
        source: IpAddr,
        prefix: Option<IpNet>,
    },
    /// The tunnel peer (index, prefix) owning `source` by its longest
    /// prefix, if any.
    Peer {
        source: IpAddr,
        owner: Option<(u32, IpNet)>,
    },
    /// TCP or UDP from peer `peer` to `port`: the grant covering it, if any.
    Grant {
        peer: u32,
        protocol: u8,
        port: u16,
        grant: Option<Grant>,
    },
    /// An echo request from peer `peer`, granted `icmp` or not.
    IcmpGrant { peer: u32, granted: bool },
    /// A TCP SYN without ACK: it opens a connection, so it is never a reply.
    Syn,
    /// The host's flow this packet would reply to, or an ICMP error quotes,
    /// and what the table holds of it.
    Flow { flow: Flow, seen: Option<Seen> },
    /// An ICMP error whose quote names no flow: too short, of the other IP
    /// version, a later fragment, behind IPv6 extension headers, or not TCP,
    /// UDP or an echo request.
    Unquoted,
    /// An echo request from `source` to the edge: the tokens its bucket
    /// holds after this one took one, or `None` when it took none (none
    /// left, or echo off).
    Echo {
        source: IpAddr,
        tokens_left: Option<u64>,
    },
    /// A later fragment of `datagram`: how long ago its first fragment
    /// passed, if one did.
    Fragment {
        datagram: Datagram,
        first_passed_ns_ago: Option<u64>,
    },
}

/// What the flow table holds of a flow, when a decision looks it up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub entry: FlowEntry,
    /// Since the flow's last packet.
    pub age_ns: u64,
    /// Its timeout, by protocol and whether it is closing.
    pub timeout_ns: u64,
}

impl Seen {
    /// Within its timeout.
    #[must_use]
    pub const fn live(&self) -> bool {
        self.age_ns <= self.timeout_ns
    }
}

/// A decision and what it rested on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// Reason code (`zt_common::reason`).
    pub reason: u32,
    /// As [`TunnelDecision::peer`]; `None` on the edge.
    pub peer: Option<u32>,
    /// On the edge, the service the decision names (its position in
    /// [`EdgePolicy::services`]): the first of the port's services that
    /// admits the source, or, when none does, the port's first.
    pub service: Option<u32>,
    pub facts: Vec<Fact>,
}

#[cfg(test)]
mod tests;
