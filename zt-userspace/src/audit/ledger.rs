//! How far the trail accounts for the programs' audited decisions, kept
//! where a `kill -9` cannot take it: in the programs' own state array
//! ([`zt_common::Ledger`]), which lives as long as the programs.
//!
//! The accounting is a conservation law. The kernel counts every audited
//! decision (every deny, and each allowed new connection in
//! `allows_audited`), and a new `up` carries the counts of the programs it
//! replaces. Every record the daemon writes stands for `ztxdp.decisions` of
//! them. After each write the daemon stores in the ledger the `seq` of the
//! newest record written and the decisions that the trail's records up to
//! it stand for. A daemon that dies leaves a ledger that may lag the file
//! by the records of its last write; the next `up` reads those back from
//! the file (they follow the ledger's `seq`, whose chain value the ledger
//! keeps to tell its trail from another). So it knows exactly what the
//! trail already accounts for, writes what the dead daemon left in the
//! kernel (events, summaries, rate-limit and ring-full counts), and counts
//! the rest in a `lost` record's `unwritten`: decisions the dead daemon had
//! taken out of the kernel but not written. Every transfer from the kernel
//! takes a decision out before it is written, never after, so nothing is
//! written twice, and the rest is exact whatever instant the kill hit.

use std::{
    fs::File,
    io::{self, Read as _, Seek as _, SeekFrom},
    path::Path,
};

use aya::maps::{Array, MapData, MapError};
use zt_common::{Ledger, counter_index, map, program, reason};

use super::{
    format,
    record::{Body, Program, Record},
    writer::{self, Sealed},
};
use crate::loader::{self, LoadError};

/// Why the ledger cannot be read or stored.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("the ledger in BPF map {}: {source}", map::CPU_STATE)]
    Map {
        #[source]
        source: MapError,
    },
    #[error("finding the ledger: {source}")]
    Cpus {
        #[source]
        source: Box<LoadError>,
    },
}

/// The programs whose decisions a ledger accounts for, by their index in
/// [`Ledger::accounted`].
const PROGRAMS: [(Program, u32); 2] = [
    (Program::Edge, program::EDGE),
    (Program::Tunnel, program::TUNNEL),
];

const fn index(p: Program) -> usize {
    match p {
        Program::Edge => 0,
        Program::Tunnel => 1,
    }
}

/// What some records stand for: decisions per program, and the own
/// rate-limit and ring-full counts that `lost` records reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// By [`Program`]: edge, tunnel.
    pub accounted: [u64; 2],
    /// By program: `[rate_limited, ring_full]` of records of this run.
    pub reported: [[u64; 2]; 2],
}

impl Tally {
    /// Counts one record in.
    pub fn add(&mut self, r: &Record) {
        self.add_body(&r.body, r.previous_run);
    }

    /// Counts in a record with `body`, of the previous run when
    /// `previous_run`.
    pub fn add_body(&mut self, body: &Body, previous_run: bool) {
        let Some(p) = body.program().map(index) else {
            return;
        };
        self.accounted[p] += body.decisions().unwrap_or(0);
        if let Body::Lost {
            rate_limited,
            ring_full,
            ..
        } = body
            && !previous_run
        {
            self.reported[p][0] += rate_limited;
            self.reported[p][1] += ring_full;
        }
    }

    /// Decisions of program `p`.
    #[must_use]
    pub const fn of(&self, p: Program) -> u64 {
        self.accounted[index(p)]
    }
}

/// The first 16 hex digits of a chain value as a number: enough to tell
/// one trail from another, which is all the ledger uses it for.
#[must_use]
pub fn chain_prefix(chain: &str) -> u64 {
    chain
        .get(..16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

/// Audited decisions of each program in `counters` (as summed from a state
/// array): every deny, and the audited allows.
#[must_use]
pub fn audited(counters: &[u64]) -> [u64; 2] {
    PROGRAMS.map(|(_, id)| {
        audited_of(|code| {
            counters
                .get(counter_index(id, code) as usize)
                .copied()
                .unwrap_or(0)
        })
    })
}

/// Audited decisions of one program whose counter of each reason code is
/// `at(code)`: every deny (a would-drop of audit mode too, which is
/// counted under its drop reason), and the audited allows.
pub fn audited_of(at: impl Fn(u32) -> u64) -> u64 {
    reason::ALL
        .iter()
        .filter(|&&code| !reason::is_allow(code))
        .map(|&code| at(code))
        .sum::<u64>()
        + at(reason::ALLOWS_AUDITED)
}

/// The ledger entry of one program set's state array, opened on its own
/// file descriptor.
pub struct LedgerEntry {
    array: Array<MapData, Ledger>,
    index: u32,
}

impl LedgerEntry {
    /// The ledger of the state array `map` (`map::CPU_STATE`); `None` when
    /// the array has no entry beyond the CPUs' (programs of an older build).
    ///
    /// # Errors
    /// When the map is not such an array, or the CPUs cannot be counted.
    pub fn open(map: MapData) -> Result<Option<Self>, LedgerError> {
        let map_err = |source| LedgerError::Map { source };
        let array: Array<MapData, Ledger> =
            Array::try_from(aya::maps::Map::from_map_data(map).map_err(map_err)?)
                .map_err(map_err)?;
        let index = loader::ledger_index(array.len()).map_err(|source| LedgerError::Cpus {
            source: Box::new(source),
        })?;
        Ok(index.map(|index| Self { array, index }))
    }

    /// The ledger as stored.
    ///
    /// # Errors
    /// When the map cannot be read.
    pub fn read(&self) -> Result<Ledger, LedgerError> {
        self.array
            .get(&self.index, 0)
            .map_err(|source| LedgerError::Map { source })
    }

    /// Stores `ledger`: one map update, so a kill leaves the old value or
    /// the new one, never a mix.
    ///
    /// # Errors
    /// When the map cannot be written.
    pub fn write(&mut self, ledger: &Ledger) -> Result<(), LedgerError> {
        self.array
            .set(self.index, ledger, 0)
            .map_err(|source| LedgerError::Map { source })
    }
}

/// The daemon's own programs' ledger, kept up to date with every write.
pub struct Keeper {
    entry: LedgerEntry,
    ledger: Ledger,
}

impl Keeper {
    /// Starts accounting from `ledger` and stores it.
    ///
    /// # Errors
    /// When it cannot be stored.
    pub fn start(mut entry: LedgerEntry, ledger: Ledger) -> Result<Self, LedgerError> {
        entry.write(&ledger)?;
        Ok(Self { entry, ledger })
    }

    /// Replaces what the records up to the ledger's `seq` account for.
    ///
    /// # Errors
    /// When it cannot be stored.
    pub fn set_accounted(&mut self, accounted: [u64; 2]) -> Result<(), LedgerError> {
        self.ledger.accounted = accounted;
        self.entry.write(&self.ledger)
    }

    /// Counts in the records of one write, which are in the file now. A
    /// failure to store is logged: the stored ledger then lags the file,
    /// which the next `up` makes up for by reading the records after it.
    pub fn written(&mut self, records: &[Sealed]) {
        let Some(last) = records.last() else {
            return;
        };
        let mut tally = Tally::default();
        for s in records {
            tally.add(&s.record);
        }
        for p in 0..2 {
            self.ledger.accounted[p] += tally.accounted[p];
            for k in 0..2 {
                self.ledger.reported[p][k] += tally.reported[p][k];
            }
        }
        self.ledger.next_seq = last.record.seq + 1;
        self.ledger.chain = chain_prefix(&last.chain);
        if let Err(e) = self.entry.write(&self.ledger) {
            tracing::warn!(error = %e, "audit: could not store the ledger; a restart after a crash reads more of the trail");
        }
    }
}

/// What the records of the trail at `path` from `from.next_seq` up to (not
/// including) `head` stand for, added to what `from` says those before
/// stand for. `None` when the trail cannot be shown to be the one `from`
/// describes: the record before `from.next_seq` is gone (rotated away) or
/// has another chain value (another file), a record is missing, or a line
/// is not a record.
///
/// # Errors
/// When a file cannot be read.
pub fn account_tail(path: &Path, from: &Ledger, head: u64) -> io::Result<Option<Tally>> {
    let mut tally = Tally {
        accounted: from.accounted,
        reported: from.reported,
    };
    // The seq the next record read (going back) must have.
    let mut expect = head.checked_sub(1);
    for file in writer::files(path).iter().rev() {
        let mut lines = Backward::open(file)?;
        while let Some(line) = lines.next_line()? {
            let Ok((record, chain)) = format::parse(&line) else {
                return Ok(None);
            };
            if Some(record.seq) != expect {
                return Ok(None);
            }
            if record.seq < from.next_seq {
                // The record the ledger ends at.
                return Ok((chain_prefix(&chain) == from.chain).then_some(tally));
            }
            tally.add(&record);
            expect = record.seq.checked_sub(1);
        }
    }
    // The beginning of the trail: right only for a ledger that starts there.
    Ok((expect == Some(0) && from.next_seq == 1 && from.chain == 0).then_some(tally))
}

/// A file's lines from the last to the first, read in chunks from the end:
/// the records the ledger lags by are the newest, whatever the file's size.
struct Backward {
    file: File,
    /// Bytes of the file before `buf`.
    pos: u64,
    /// The unread bytes after `pos`, without the newline that ends them.
    buf: Vec<u8>,
}

impl Backward {
    const CHUNK: u64 = 64 * 1024;

    fn open(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let mut len = file.metadata()?.len();
        if len > 0 {
            let mut last = [0];
            file.seek(SeekFrom::Start(len - 1))?;
            file.read_exact(&mut last)?;
            if last[0] == b'\n' {
                len -= 1;
            }
        }
        Ok(Self {
            file,
            pos: len,
            buf: Vec::new(),
        })
    }

    fn next_line(&mut self) -> io::Result<Option<String>> {
        loop {
            if let Some(at) = self.buf.iter().rposition(|&b| b == b'\n') {
                let line = self.buf.split_off(at + 1);
                self.buf.truncate(at);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            if self.pos == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buf);
                return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
            }
            let start = self.pos.saturating_sub(Self::CHUNK);
            let mut chunk = vec![0; usize::try_from(self.pos - start).unwrap_or(0)];
            self.file.seek(SeekFrom::Start(start))?;
            self.file.read_exact(&mut chunk)?;
            chunk.append(&mut self.buf);
            self.buf = chunk;
            self.pos = start;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::writer::{
        AuditWriter,
        tests::{TempDir, lost, settings},
    };

    /// Writes records 1..=n (record i stands for i decisions; every third
    /// is of the previous run) and returns them as written.
    fn trail(s: &crate::policy::AuditSettings, n: u64) -> Vec<Sealed> {
        AuditWriter::check(s).unwrap_or_else(|e| panic!("check: {e}"));
        let mut w = AuditWriter::try_open(s)
            .unwrap_or_else(|e| panic!("open: {e}"))
            .expect("the lock is free");
        let mut out = Vec::new();
        for i in 1..=n {
            w.append_run(1_000, lost(i), i % 3 == 0);
            let written = w.write();
            if let Some(e) = written.error {
                panic!("write: {e}");
            }
            out.extend(written.sealed);
        }
        out
    }

    /// The ledger a daemon stored after writing `written`.
    fn ledger_after(written: &[Sealed]) -> Ledger {
        let mut tally = Tally::default();
        for s in written {
            tally.add(&s.record);
        }
        Ledger {
            next_seq: written.last().map_or(1, |s| s.record.seq + 1),
            chain: written.last().map_or(0, |s| chain_prefix(&s.chain)),
            accounted: tally.accounted,
            reported: tally.reported,
            ..Ledger::default()
        }
    }

    fn whole(written: &[Sealed]) -> Tally {
        let l = ledger_after(written);
        Tally {
            accounted: l.accounted,
            reported: l.reported,
        }
    }

    #[test]
    fn a_record_counts_its_decisions_and_only_this_runs_lost_counts_as_reported() {
        let mut t = Tally::default();
        t.add_body(&lost(5), false);
        t.add_body(&lost(7), true);
        assert_eq!(t.accounted, [12, 0]);
        assert_eq!(t.reported, [[5, 0], [0, 0]]);
    }

    #[test]
    fn the_records_after_the_ledger_are_read_back_from_the_file() {
        let dir = TempDir::new("ledger-tail");
        let s = settings(&dir.0, 0, 1);
        let written = trail(&s, 40);
        for stored in [0, 1, 17, 39, 40] {
            let from = ledger_after(&written[..stored]);
            let got = account_tail(&s.path, &from, 41).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(got, Some(whole(&written)), "ledger after {stored} records");
        }
    }

    #[test]
    fn rotated_files_are_read_back_too() {
        let dir = TempDir::new("ledger-rotated");
        let s = settings(&dir.0, 4096, 100);
        let written = trail(&s, 200);
        assert!(writer::files(&s.path).len() > 3, "the trail was rotated");
        let from = ledger_after(&written[..20]);
        let got = account_tail(&s.path, &from, 201).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got, Some(whole(&written)));
    }

    #[test]
    fn another_trail_or_a_missing_record_is_not_taken_for_the_ledgers() {
        let dir = TempDir::new("ledger-other");
        let s = settings(&dir.0, 0, 1);
        let written = trail(&s, 10);
        let mut from = ledger_after(&written[..5]);
        from.chain ^= 1;
        assert_eq!(
            account_tail(&s.path, &from, 11).ok(),
            Some(None),
            "another chain"
        );
        // The trail does not reach back to where the ledger starts.
        let from = ledger_after(&[]);
        let text = fs::read_to_string(&s.path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().skip(3).collect();
        fs::write(&s.path, tail.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(account_tail(&s.path, &from, 11).ok(), Some(None), "cut");
        // A record missing in between.
        let dir = TempDir::new("ledger-gap");
        let s = settings(&dir.0, 0, 1);
        let written = trail(&s, 10);
        let text = fs::read_to_string(&s.path).unwrap_or_default();
        let gap: Vec<&str> = text.lines().filter(|l| !l.contains("\"seq\":8,")).collect();
        fs::write(&s.path, gap.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
        let from = ledger_after(&written[..5]);
        assert_eq!(account_tail(&s.path, &from, 11).ok(), Some(None), "gap");
    }

    #[test]
    fn lines_come_back_last_first_across_chunks() {
        let dir = TempDir::new("ledger-backward");
        let path = dir.0.join("lines");
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("line {i} {}", "x".repeat(i % 50)))
            .collect();
        fs::write(&path, lines.join("\n") + "\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(
            fs::metadata(&path).map_or(0, |m| m.len()) > 3 * Backward::CHUNK,
            "several chunks"
        );
        let mut back = Backward::open(&path).unwrap_or_else(|e| panic!("{e}"));
        let mut got = Vec::new();
        while let Some(l) = back.next_line().unwrap_or_else(|e| panic!("{e}")) {
            got.push(l);
        }
        got.reverse();
        assert_eq!(got, lines);
    }
}
