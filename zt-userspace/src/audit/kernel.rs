//! The kernel's half of the trail, read into records: decision events from
//! the ring buffer, per-flow counts from the summary table, and the
//! rate-limit and ring-full counters.
//!
//! Accounting: every audited decision of a program ends up in exactly one
//! of a decision record (1 + its `suppressed`), a summary record (its
//! count), or a `lost` record (the counter deltas). Summing
//! `ztxdp.decisions` over the trail gives the audited decisions `status`
//! counts. A new `up` writes what the daemon of the programs it replaced
//! left in their maps ([`Feed::recover`]), and its ledger makes the sum
//! exact across a `kill -9` (see [`super::ledger`]).

use std::{
    collections::HashMap,
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use zt_common::{
    COUNTER_SLOTS, Event, FlowSummary, Ledger, SUMMARY_CACHE_SLOTS, SUMMARY_WINDOW_NS,
    SummaryCacheSlot, SummaryKey, counter_index, map, program, reason, summary_cache_index,
    summary_cache_slot, summary_window, summary_window_start,
};

use super::{
    AuditError, Clock, Names, ServiceNames, Trail,
    ledger::{self, Keeper, LedgerEntry, Tally},
    record::{self, Body, Program},
};
use crate::{adopt, policy::EdgePolicy, tables::Tables};

/// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` (`enum bpf_cmd` in `uapi/linux/bpf.h`).
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;

/// The map-element part of `union bpf_attr`. The kernel reads only `size`
/// bytes of the union and takes the rest as zero.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Copies a summary out of the kernel's table and removes it, atomically
/// with respect to other map operations (one bucket lock; hash maps support
/// this since Linux 5.14). aya 0.14 offers it only for queues and stacks.
pub(crate) fn lookup_and_delete(
    fd: BorrowedFd<'_>,
    key: &SummaryKey,
) -> io::Result<Option<FlowSummary>> {
    let mut value = FlowSummary::default();
    let attr = ElemAttr {
        map_fd: u32::try_from(fd.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        _pad: 0,
        key: std::ptr::from_ref(key) as u64,
        value: std::ptr::from_mut(&mut value) as u64,
        flags: 0,
    };
    // SAFETY: `attr` points at a live key and a value buffer of exactly the
    // map's key and value sizes (checked when the map was opened); the
    // kernel reads `size_of::<ElemAttr>()` bytes of `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &raw const attr,
            size_of::<ElemAttr>(),
        )
    };
    if rc == 0 {
        return Ok(Some(value));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Where the kernel keeps per-flow counts: the shared table
/// (`map::SUMMARIES`) and each CPU's cached flow (`map::SUMMARY_CACHE`).
pub struct Summaries {
    table: Map,
    cache: Map,
}

/// Takes the summary table and cache out of a freshly loaded object.
///
/// # Errors
/// When the object lacks one of them.
pub fn take_summaries(ebpf: &mut aya::Ebpf) -> Result<Summaries, AuditError> {
    let mut take = |name| ebpf.take_map(name).ok_or(AuditError::MissingMap { name });
    Summaries::new(take(map::SUMMARIES)?, take(map::SUMMARY_CACHE)?)
}

/// Records a drain or a sweep of this run's maps writes at a time. What
/// leaves the kernel waits in memory until it is written, and a kill then
/// loses its detail (the ledger still counts it, as `unwritten`): under a
/// flood, one drain of a ring the programs keep filling took 1.9 s of
/// records before this bound, a sweep 0.7 s (a debug build).
const COMMIT_EVERY: u32 = 1024;

/// Where records go: the trail, as records of this run or of the previous
/// one, with what they stand for counted.
struct Sink<'a> {
    trail: &'a mut Trail,
    previous_run: bool,
    pushed: Tally,
    /// Records pushed since the last commit.
    pending: u32,
}

impl<'a> Sink<'a> {
    const fn new(trail: &'a mut Trail, previous_run: bool) -> Self {
        Self {
            trail,
            previous_run,
            pushed: Tally {
                accounted: [0; 2],
                reported: [[0; 2]; 2],
            },
            pending: 0,
        }
    }

    fn push(&mut self, time_ns: i64, body: Body) {
        self.pushed.add_body(&body, self.previous_run);
        if self.previous_run {
            // Written in one go by the first commit, once the daemon keeps
            // its ledger with every write (`Feed::recover`).
            self.trail.push_previous(time_ns, body);
            return;
        }
        self.trail.push(time_ns, body);
        self.pending += 1;
        if self.pending >= COMMIT_EVERY {
            self.trail.commit();
            self.pending = 0;
        }
    }
}

/// Which cache slots (window modulo `SUMMARY_CACHE_SLOTS`) can be collected
/// at `now_ns` without racing the programs, oldest window first. The
/// programs write only the slot of the current window (by a clock that lags
/// `CLOCK_MONOTONIC` by at most a tick), so the slots two and three windows
/// back are frozen; the latter only while the next window is still far,
/// since it becomes the programs' slot then.
fn collectable_slots(now_ns: u64) -> Vec<u32> {
    let current = summary_window(now_ns);
    let into_window = now_ns & (SUMMARY_WINDOW_NS - 1);
    let slot = |back: u32| summary_cache_slot(current.wrapping_sub(back));
    let mut out = Vec::with_capacity(2);
    if into_window < SUMMARY_WINDOW_NS / 4 * 3 {
        out.push(slot(3));
    }
    out.push(slot(2));
    out
}

/// Turns the events in `ring` into decision records, at most `limit` of
/// them; returns how many. Each event leaves the ring before its record is
/// written: a kill in between loses the record, never writes it twice, and
/// the ledger counts what was lost.
fn drain_ring<T: std::borrow::Borrow<MapData>>(
    ring: &mut RingBuf<T>,
    names: &Names,
    clock: &Clock,
    out: &mut Sink<'_>,
    limit: usize,
) -> usize {
    let mut written = 0;
    while written < limit
        && let Some(item) = ring.next()
    {
        if item.len() >= size_of::<Event>() {
            // SAFETY: the kernel wrote a whole Event (checked length);
            // read_unaligned copes with any alignment of the slot.
            let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let (time_ns, body) = record::decision(&e, names, clock);
            out.push(time_ns, body);
            written += 1;
        }
    }
    written
}

fn mono_ns() -> u64 {
    u64::try_from(super::clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// The kernel side of the trail, for one loaded program set.
pub struct Feed {
    ring: AsyncFd<RingBuf<MapData>>,
    summaries: Summaries,
    names: Names,
    clock: Clock,
    /// `(EVENTS_SUPPRESSED, EVENTS_LOST)` already reported, per program.
    reported: [(u64, u64); 2],
    /// The last [`Self::drain_batch`] left events in the ring.
    more: bool,
}

impl Feed {
    /// Takes over the ring buffer and the summary table and cache.
    ///
    /// # Errors
    /// When the ring buffer cannot be registered with the runtime.
    pub fn new(
        ring: RingBuf<MapData>,
        summaries: Summaries,
        names: Names,
    ) -> Result<Self, AuditError> {
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd owns
        // the ring buffer, so the fd cannot be closed while registered.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(|e| AuditError::Ring {
            source: io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            ring,
            summaries,
            names,
            clock: Clock::now(),
            reported: [(0, 0); 2],
            more: false,
        })
    }

    /// Names peers by `peers`, and their groups by `groups`, from now on
    /// (after a reload changed them): index `i` is `peers[i]`.
    pub fn set_peers(
        &mut self,
        peers: Vec<(String, Option<String>)>,
        groups: crate::grants::GroupWatch,
    ) {
        self.names.peers = peers;
        self.names.groups = groups;
    }

    /// Names edge services by `edge`'s from now on (after a reload).
    pub fn set_services(&mut self, edge: Option<&EdgePolicy>) {
        self.names.services = edge.map(ServiceNames::new);
    }

    /// Waits until the ring buffer has events. Cancel-safe.
    ///
    /// # Errors
    /// When polling the ring buffer fails.
    pub async fn readable(&mut self) -> Result<(), AuditError> {
        if self.more {
            return Ok(());
        }
        let mut guard = self
            .ring
            .readable_mut()
            .await
            .map_err(|source| AuditError::Ring { source })?;
        // Cleared before draining: an event that arrives after the drain
        // wakes the next wait.
        guard.clear_ready();
        Ok(())
    }

    /// Turns every event in the ring buffer into a decision record.
    pub fn drain(&mut self, trail: &mut Trail) {
        self.names.groups.refresh();
        let mut out = Sink::new(trail, false);
        drain_ring(
            self.ring.get_mut(),
            &self.names,
            &self.clock,
            &mut out,
            usize::MAX,
        );
        self.more = false;
    }

    /// [`Self::drain`], of one batch at most: a ring the programs refill as
    /// fast as it is read would otherwise keep the daemon from its other
    /// work (sweeps, `lost` reports) for as long as a flood lasts. The next
    /// [`Self::readable`] returns at once while events are left.
    pub fn drain_batch(&mut self, trail: &mut Trail) {
        // A group grant changed by `ztxdp allow @group` from another
        // process is named in the records from the next batch on.
        self.names.groups.refresh();
        let mut out = Sink::new(trail, false);
        let limit = COMMIT_EVERY as usize;
        let n = drain_ring(
            self.ring.get_mut(),
            &self.names,
            &self.clock,
            &mut out,
            limit,
        );
        self.more = n == limit;
    }

    /// Removes summaries whose window is over and can no longer change
    /// (every one when `all`, once the programs are gone) and writes a
    /// summary record for each with a count.
    ///
    /// # Errors
    /// When a map cannot be read or written, or appending fails.
    pub fn sweep(&mut self, trail: &mut Trail, all: bool) -> Result<(), AuditError> {
        let mut out = Sink::new(trail, false);
        self.summaries
            .sweep(&self.names, &self.clock, all, &mut out)
            .map(drop)
    }

    /// Starts the ledger of our programs (`entry`) where the trail stands
    /// now, and writes into the trail, as records of the previous run, what
    /// the daemon of the programs we replaced (`old`, idle now) left in
    /// their maps: the events in their ring buffer, the counts of their
    /// summary table and cache, their rate-limit and ring-full counts not
    /// yet reported, and, in a `lost` record's `unwritten`, the decisions
    /// that daemon took out of the kernel but did not write (it was
    /// killed). Call it once the trail is ours, before the first commit;
    /// hand the keeper to [`Trail::on_written`]. A problem with the old
    /// maps (programs of an older build, say) is logged: it costs records
    /// of the previous run, not this daemon.
    ///
    /// # Errors
    /// When our ledger cannot be stored.
    pub fn recover(
        &self,
        old: Option<&mut adopt::Maps>,
        entry: LedgerEntry,
        trail: &mut Trail,
    ) -> Result<Keeper, AuditError> {
        let (next_seq, chain) = trail.head().ok_or(AuditError::NotStarted)?;
        let mut start = Ledger {
            next_seq,
            chain: ledger::chain_prefix(chain),
            ..Ledger::default()
        };
        let Some(old) = old else {
            return Ok(Keeper::start(entry, start)?);
        };
        // Read now that the old programs are idle: what they counted after
        // the copies `up` made around the swap is carried too.
        let totals = match old.counter_totals() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "audit: cannot read the replaced programs' counters; their leftovers are not written");
                return Ok(Keeper::start(entry, start)?);
            }
        };
        start.carried = adopt::carried_counters(&totals);
        let known = Self::accounted_before(old, trail, next_seq);
        if let Some(k) = &known {
            // Stored before anything leaves the old maps: from here on the
            // ledger counts what a kill would lose.
            start.accounted = k.accounted;
        }
        let mut keeper = Keeper::start(entry, start)?;
        let audited = ledger::audited(&start.carried);
        let mut out = Sink::new(trail, true);
        if let Err(e) = self.write_leftovers(old, &totals, audited, known.as_ref(), &mut out) {
            tracing::warn!(error = %e, "audit: could not write all the replaced programs left");
        }
        if known.is_none() {
            // How much of the old programs' decisions the trail holds is
            // not known: take it as all they counted but what was written
            // now, so that the sum over the trail is exact from here on.
            keeper.set_accounted(
                [0, 1].map(|i| audited[i].saturating_sub(out.pushed.accounted[i])),
            )?;
        }
        Ok(keeper)
    }

    /// The records of [`Self::recover`]: events, summaries, and a `lost`
    /// record per program for the counts not written (only the summaries
    /// and events when `known`, what the trail accounts for, is not known).
    fn write_leftovers(
        &self,
        old: &mut adopt::Maps,
        totals: &[u64; COUNTER_SLOTS as usize],
        audited: [u64; 2],
        known: Option<&Tally>,
        out: &mut Sink<'_>,
    ) -> Result<(), AuditError> {
        let map_err = |name| move |source| AuditError::Map { name, source };
        let events = match old.take(map::EVENTS) {
            Some(ring) => {
                let ring = Map::from_map_data(ring).map_err(map_err(map::EVENTS))?;
                let mut ring = RingBuf::try_from(ring).map_err(map_err(map::EVENTS))?;
                drain_ring(&mut ring, &self.names, &self.clock, out, usize::MAX)
            }
            None => 0,
        };
        let summaries = match (old.take(map::SUMMARIES), old.take(map::SUMMARY_CACHE)) {
            (Some(table), Some(cache)) => Summaries::new(
                Map::from_map_data(table).map_err(map_err(map::SUMMARIES))?,
                Map::from_map_data(cache).map_err(map_err(map::SUMMARY_CACHE))?,
            )?
            .sweep(&self.names, &self.clock, true, out)?,
            _ => 0,
        };
        let mut lost = [0; 2];
        for (prog, id) in [
            (Program::Edge, program::EDGE),
            (Program::Tunnel, program::TUNNEL),
        ] {
            let Some(k) = known else { break };
            let i = id as usize;
            let own = |code| totals[counter_index(id, code) as usize];
            let rate_limited = own(reason::EVENTS_SUPPRESSED).saturating_sub(k.reported[i][0]);
            let ring_full = own(reason::EVENTS_LOST).saturating_sub(k.reported[i][1]);
            let in_trail = k.accounted[i] + out.pushed.accounted[i];
            let unwritten = audited[i]
                .checked_sub(in_trail + rate_limited + ring_full)
                .unwrap_or_else(|| {
                    tracing::warn!(
                        program = prog.name(),
                        audited = audited[i],
                        in_trail,
                        rate_limited,
                        ring_full,
                        "audit: the trail has more decisions of the replaced programs than they counted"
                    );
                    0
                });
            lost[i] = rate_limited + ring_full + unwritten;
            if lost[i] > 0 {
                let body = Body::Lost {
                    program: prog,
                    interface: self.names.programs.get(&prog).cloned().unwrap_or_default(),
                    rate_limited,
                    ring_full,
                    unwritten,
                };
                out.push(record::now_ns(), body);
            }
        }
        tracing::info!(
            events,
            summaries,
            edge_lost = lost[0],
            tunnel_lost = lost[1],
            "wrote what the replaced programs' daemon left in the kernel"
        );
        Ok(())
    }

    /// What the trail up to `head` (the next `seq`) accounts for of the
    /// replaced programs' decisions, from their ledger and the records
    /// after it; `None` (logged) when that cannot be told.
    fn accounted_before(old: &adopt::Maps, trail: &Trail, head: u64) -> Option<Tally> {
        let not_counted = "what their daemon did not write is not counted";
        let earlier = old
            .ledger()
            .and_then(|entry| entry.map(|e| e.read()).transpose().map_err(Into::into));
        let earlier = match earlier {
            Ok(Some(l)) if l.next_seq > 0 => l,
            Ok(Some(_)) => {
                tracing::warn!(
                    "audit: the replaced programs' daemon never started its ledger; {not_counted}"
                );
                return None;
            }
            Ok(None) => {
                tracing::warn!(
                    "audit: the replaced programs keep no ledger (an older build); {not_counted}"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit: cannot read the replaced programs' ledger; {not_counted}");
                return None;
            }
        };
        match ledger::account_tail(trail.path(), &earlier, head) {
            Ok(Some(t)) => Some(t),
            Ok(None) => {
                tracing::warn!(
                    path = %trail.path().display(),
                    ledger_seq = earlier.next_seq.saturating_sub(1),
                    "audit: the trail is not the one the replaced programs' ledger describes (moved, rotated away or edited); what their daemon did not write is not counted"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "audit: cannot read the trail back; what the replaced programs' daemon did not write is not counted");
                None
            }
        }
    }

    /// Writes a `lost` record for each program whose rate-limit or
    /// ring-full counters grew since the last report.
    ///
    /// # Errors
    /// When the counters cannot be read or appending fails.
    pub fn report_lost(&mut self, tables: &Tables, trail: &mut Trail) -> Result<(), AuditError> {
        for (prog, id) in [
            (Program::Edge, program::EDGE),
            (Program::Tunnel, program::TUNNEL),
        ] {
            let c = tables
                .counters(id)
                .map_err(|source| AuditError::Counters { source })?;
            let now = (
                c.get(&reason::EVENTS_SUPPRESSED).copied().unwrap_or(0),
                c.get(&reason::EVENTS_LOST).copied().unwrap_or(0),
            );
            let last = &mut self.reported[id as usize];
            if now != *last {
                let body = Body::Lost {
                    program: prog,
                    interface: self.names.programs.get(&prog).cloned().unwrap_or_default(),
                    rate_limited: now.0.saturating_sub(last.0),
                    ring_full: now.1.saturating_sub(last.1),
                    unwritten: 0,
                };
                trail.push(record::now_ns(), body);
                *last = now;
            }
        }
        Ok(())
    }
}

impl Summaries {
    /// Checks the two maps' types.
    ///
    /// # Errors
    /// When one is not what the programs declare.
    fn new(table: Map, cache: Map) -> Result<Self, AuditError> {
        BpfHashMap::<&MapData, SummaryKey, FlowSummary>::try_from(&table).map_err(|source| {
            AuditError::Map {
                name: map::SUMMARIES,
                source,
            }
        })?;
        Array::<&MapData, SummaryCacheSlot>::try_from(&cache).map_err(|source| {
            AuditError::Map {
                name: map::SUMMARY_CACHE,
                source,
            }
        })?;
        Ok(Self { table, cache })
    }

    /// Removes summaries whose window is over and can no longer change
    /// (every one when `all`, once the programs are gone) and writes a
    /// summary record for each with a count: the table's count plus what
    /// the CPUs' caches counted for the same flow and window. Windows with
    /// no count are removed too, so the table only holds recent flows.
    /// Returns how many records.
    fn sweep(
        &mut self,
        names: &Names,
        clock: &Clock,
        all: bool,
        out: &mut Sink<'_>,
    ) -> Result<usize, AuditError> {
        let now = mono_ns();
        let mut cached = self.collect_cache(all, now)?;
        let table = BpfHashMap::<&MapData, SummaryKey, FlowSummary>::try_from(&self.table)
            .map_err(|source| AuditError::Map {
                name: map::SUMMARIES,
                source,
            })?;
        let due: Vec<SummaryKey> = table
            .iter()
            .filter_map(Result::ok)
            // Only windows two or more behind the current one: the kernel
            // still adds to the current window and takes over the previous
            // one's count when a flow's next window opens.
            .filter(|(k, _)| all || u64::from(k.window) + 1 < u64::from(summary_window(now)))
            .map(|(k, _)| k)
            .collect();
        let fd = match &self.table {
            Map::HashMap(d) | Map::LruHashMap(d) => d.fd().as_fd(),
            _ => {
                return Err(AuditError::WrongMapType {
                    name: map::SUMMARIES,
                });
            }
        };
        let mut written = 0;
        for key in due {
            // The value as it was when removed: a decision counted between
            // the walk and now is in it.
            let value =
                lookup_and_delete(fd, &key).map_err(|source| AuditError::Sweep { source })?;
            if let Some(mut v) = value {
                v.suppressed += cached.remove(&key).unwrap_or(0);
                if v.suppressed > 0 {
                    out.push(record::now_ns(), record::summary(&key, &v, names, clock));
                    written += 1;
                }
            }
        }
        // Counts of flows whose table entry is gone (evicted, or swept
        // before the cache was collected).
        for (key, count) in cached {
            let v = FlowSummary {
                window_start_ns: summary_window_start(key.window),
                suppressed: count,
            };
            out.push(record::now_ns(), record::summary(&key, &v, names, clock));
            written += 1;
        }
        Ok(written)
    }

    /// Takes the counts out of the cache slots no program writes now (all
    /// of them when `all`), zeroing them, summed per flow and window.
    fn collect_cache(
        &mut self,
        all: bool,
        now_ns: u64,
    ) -> Result<HashMap<SummaryKey, u64>, AuditError> {
        let map_error = |source| AuditError::Map {
            name: map::SUMMARY_CACHE,
            source,
        };
        let mut cache = Array::<&mut MapData, SummaryCacheSlot>::try_from(&mut self.cache)
            .map_err(map_error)?;
        let slots = if all {
            (0..SUMMARY_CACHE_SLOTS).collect()
        } else {
            collectable_slots(now_ns)
        };
        let cpus = cache.len() / SUMMARY_CACHE_SLOTS;
        let mut out: HashMap<SummaryKey, u64> = HashMap::new();
        for cpu in 0..cpus {
            for &slot in &slots {
                let index = summary_cache_index(cpu, slot);
                let mut v = cache.get(&index, 0).map_err(map_error)?;
                let mut taken = false;
                for way in v.ways.iter_mut().filter(|w| w.count > 0) {
                    *out.entry(way.key).or_default() += way.count;
                    way.count = 0;
                    taken = true;
                }
                if taken {
                    cache.set(index, v, 0).map_err(map_error)?;
                }
            }
        }
        if !all && collectable_slots(mono_ns()).len() < collectable_slots(now_ns).len() {
            // The collection ran into the last quarter of a window: the
            // oldest slot may have become the programs' own meanwhile.
            tracing::warn!(
                "audit: the summary cache was collected late; a flow's summary count may be off"
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slots_the_programs_cannot_be_writing_are_collected() {
        let window = |w: u32, fraction: f64| {
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss,
                reason = "test arithmetic on small values"
            )]
            let into = (SUMMARY_WINDOW_NS as f64 * fraction) as u64;
            summary_window_start(w) + into
        };
        // Window 10 is slot 2, which the programs write now; slot 1 (window
        // 9) may still be written by a lagging clock. Slots 3 and 0 hold
        // windows 7 and 8: frozen, until slot 3 becomes window 11's.
        assert_eq!(collectable_slots(window(10, 0.0)), vec![3, 0]);
        assert_eq!(collectable_slots(window(10, 0.5)), vec![3, 0]);
        // Late in the window, slot 3 is about to become the programs' slot.
        assert_eq!(collectable_slots(window(10, 0.8)), vec![0]);
        assert_eq!(collectable_slots(window(10, 0.999)), vec![0]);
        // Never the current window's slot, nor the one before it (the
        // kernel's coarse clock may still be there).
        for w in 4..12 {
            for f in [0.0, 0.3, 0.6, 0.9] {
                let slots = collectable_slots(window(w, f));
                let current = w % 4;
                assert!(!slots.contains(&current), "window {w}+{f}: {slots:?}");
                assert!(
                    !slots.contains(&((current + 3) % 4)),
                    "window {w}+{f}: {slots:?}"
                );
            }
        }
    }
}
