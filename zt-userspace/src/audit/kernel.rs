//! The kernel's half of the trail, read into records: decision events from
//! the ring buffer, per-flow counts from the summary table, and the
//! rate-limit and ring-full counters.
//!
//! Accounting: every audited decision of a program ends up in exactly one
//! of a decision record (1 + its `suppressed`), a summary record (its
//! count), or a `lost` record (the counter deltas). Summing
//! `ztxdp.decisions` over the trail gives the audited decisions `status`
//! counts.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use zt_common::{Event, FlowSummary, SUMMARY_WINDOW_NS, SummaryKey, map, program, reason};

use super::{
    AuditError, Clock, Names, Trail,
    record::{self, Body, Program},
};
use crate::tables::Tables;

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
fn lookup_and_delete(fd: BorrowedFd<'_>, key: &SummaryKey) -> io::Result<Option<FlowSummary>> {
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

/// Takes the summary table out of a freshly loaded object.
///
/// # Errors
/// When the object has no summary table.
pub fn take_summaries(ebpf: &mut aya::Ebpf) -> Result<Map, AuditError> {
    ebpf.take_map(map::SUMMARIES).ok_or(AuditError::MissingMap {
        name: map::SUMMARIES,
    })
}

fn mono_ns() -> u64 {
    u64::try_from(super::clock_ns(libc::CLOCK_MONOTONIC)).unwrap_or(0)
}

/// The kernel side of the trail, for one loaded program set.
pub struct Feed {
    ring: AsyncFd<RingBuf<MapData>>,
    summaries: Map,
    names: Names,
    clock: Clock,
    /// `(EVENTS_SUPPRESSED, EVENTS_LOST)` already reported, per program.
    reported: [(u64, u64); 2],
}

impl Feed {
    /// Takes over the ring buffer and the summary table (`map::SUMMARIES`).
    ///
    /// # Errors
    /// When the ring buffer cannot be registered with the runtime or the
    /// summary table has the wrong type.
    pub fn new(ring: RingBuf<MapData>, summaries: Map, names: Names) -> Result<Self, AuditError> {
        BpfHashMap::<&MapData, SummaryKey, FlowSummary>::try_from(&summaries).map_err(
            |source| AuditError::Map {
                name: map::SUMMARIES,
                source,
            },
        )?;
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
        })
    }

    /// Waits until the ring buffer has events. Cancel-safe.
    ///
    /// # Errors
    /// When polling the ring buffer fails.
    pub async fn readable(&mut self) -> Result<(), AuditError> {
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
    ///
    /// # Errors
    /// When appending to the trail fails.
    pub fn drain(&mut self, trail: &mut Trail) -> Result<(), AuditError> {
        let rb = self.ring.get_mut();
        while let Some(item) = rb.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the kernel wrote a whole Event (checked length);
                // read_unaligned copes with any alignment of the slot.
                let e: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                let (time_ns, body) = record::decision(&e, &self.names, &self.clock);
                trail.push(time_ns, body)?;
            }
        }
        Ok(())
    }

    /// Removes summaries whose window is over and can no longer change
    /// (every one when `all`, once the programs are gone) and writes a
    /// summary record for each with a count. Windows with no count are
    /// removed too, so the table only holds recent flows.
    ///
    /// # Errors
    /// When the table cannot be read or appending fails.
    pub fn sweep(&mut self, trail: &mut Trail, all: bool) -> Result<(), AuditError> {
        let now = mono_ns();
        let table = BpfHashMap::<&MapData, SummaryKey, FlowSummary>::try_from(&self.summaries)
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
            .filter(|(k, _)| all || u64::from(k.window) + 1 < now / SUMMARY_WINDOW_NS)
            .map(|(k, _)| k)
            .collect();
        let fd = match &self.summaries {
            Map::HashMap(d) | Map::LruHashMap(d) => d.fd().as_fd(),
            _ => {
                return Err(AuditError::WrongMapType {
                    name: map::SUMMARIES,
                });
            }
        };
        for key in due {
            // The value as it was when removed: a decision counted between
            // the walk and now is in it.
            let value =
                lookup_and_delete(fd, &key).map_err(|source| AuditError::Sweep { source })?;
            if let Some(v) = value.filter(|v| v.suppressed > 0) {
                let body = record::summary(&key, &v, &self.names, &self.clock);
                trail.push(record::now_ns(), body)?;
            }
        }
        Ok(())
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
                };
                trail.push(record::now_ns(), body)?;
                *last = now;
            }
        }
        Ok(())
    }
}
