//! `ztxdp audit verify`: every line is a record, sequence numbers run
//! without a gap, and every chain value is the hash of its predecessor's and
//! its own record (see [`super::chain`]).
//!
//! Files are put in order by the sequence number of their first record, so
//! `audit.jsonl*` can be given in any order. A `gap` record links from the
//! head it names (the last record the daemon wrote before it reopened the
//! file, or the head persisted in `audit.state`), not from the line before
//! it: the report lists each such declared gap, and a trail that starts
//! with one is reported as starting at that seq after that head, never as
//! complete. What the files alone cannot show: records removed from the
//! very end of the newest file, or from the start of the oldest one (where
//! a rotation legitimately drops records too). `--state` closes the first:
//! the trail must reach the head persisted in `audit.state`, with the same
//! chain value. A copy kept off the host (the syslog collector) is the only
//! check that an attacker with root cannot rewrite along with the trail.

use std::{
    fmt,
    fs::File,
    io::{self, BufRead as _, BufReader, Read as _},
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{chain, format};

/// `seq` of a record of either format.
pub(crate) fn seq_of(record: &Value) -> Option<u64> {
    format::own(record)?.get("seq")?.as_u64()
}

/// A file could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {}: {source}", path.display())]
pub struct VerifyError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What is wrong with a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The last line has no newline: a write cut short.
    Incomplete,
    NotJson {
        message: String,
    },
    NoSeq,
    NoChain,
    /// Sequence numbers jumped: records are missing before this one.
    Gap {
        expected: u64,
        found: u64,
    },
    /// A sequence number at or below the previous one: lines were moved or
    /// repeated.
    OutOfOrder {
        expected: u64,
        found: u64,
    },
    /// The chain value is not the hash of the previous chain value and this
    /// record: this record, or the previous one, was edited.
    Chain {
        seq: u64,
    },
    /// A record after the one numbered `after`, the last number there is.
    SeqExhausted {
        after: u64,
    },
    /// A line longer than any record (`limit` bytes): read no further.
    TooLong {
        limit: usize,
    },
    /// A `gap` record whose seq does not follow the head it names.
    BadGap {
        seq: u64,
    },
    /// The trail ends before the head persisted in `audit.state`: its
    /// newest records were removed.
    BehindState {
        last: u64,
        state: u64,
    },
    /// The record at the persisted head's seq has another chain value: the
    /// trail was rewritten, or is another trail.
    StateMismatch {
        seq: u64,
    },
}

/// The longest line read: far above any record (a few hundred bytes; peer
/// names and keys are bounded), far below what would exhaust memory on a
/// file an attacker wrote, or on `/dev/zero`.
pub const MAX_LINE: usize = 1 << 20;

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete => f.write_str("incomplete last line (no newline)"),
            Self::NotJson { message } => write!(f, "not a JSON record: {message}"),
            Self::NoSeq => f.write_str("no ztxdp.seq"),
            Self::NoChain => f.write_str("does not end with a ztxdp.chain member"),
            Self::Gap { expected, found } => {
                write!(
                    f,
                    "sequence gap: expected seq {expected}, found {found} ({} records missing)",
                    found - expected
                )
            }
            Self::OutOfOrder { expected, found } => {
                write!(
                    f,
                    "out of order: expected seq {expected}, found {found} (lines moved or repeated)"
                )
            }
            Self::Chain { seq } => write!(
                f,
                "chain mismatch at seq {seq}: this record (or the chain value of the one before it) was changed"
            ),
            Self::SeqExhausted { after } => write!(
                f,
                "a record after seq {after}, the highest sequence number there is"
            ),
            Self::TooLong { limit } => {
                write!(f, "a line longer than {limit} bytes: not a record")
            }
            Self::BadGap { seq } => write!(
                f,
                "gap record at seq {seq} does not follow the previous_seq it names"
            ),
            Self::BehindState { last, state } => write!(
                f,
                "the trail ends at seq {last}, but the audit state says seq {state} was written: \
                 the newest records were removed"
            ),
            Self::StateMismatch { seq } => write!(
                f,
                "the chain value at seq {seq} is not the one in the audit state: \
                 the trail was rewritten, or is another trail"
            ),
        }
    }
}

/// The first bad line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based.
    pub line: usize,
    pub fault: Fault,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file.display(), self.line, self.fault)
    }
}

/// What `verify` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub files: usize,
    /// Records checked before the first problem (all of them when none).
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The first record is seq 1, so the chain was checked from its start;
    /// otherwise the first record's chain value is taken as given.
    pub from_start: bool,
    /// Chain value of the last good record.
    pub last_chain: Option<String>,
    /// When the first record is a `gap` record: the seq and chain value of
    /// the head it continues from, which is not in these files.
    pub previous: Option<(u64, String)>,
    /// `gap` records after which records are missing (or come from another
    /// trail), in order.
    pub gaps: Vec<Declared>,
    /// With a state head: the trail holds its seq, with its chain value
    /// (`false`: the trail begins after it, rotated away, not checkable).
    pub state_checked: bool,
    pub problem: Option<Problem>,
}

/// A `gap` record inside the files checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    /// The gap record's seq.
    pub seq: u64,
    /// The last record before it in these files.
    pub after: u64,
    /// The head the gap record names.
    pub previous_seq: u64,
    pub reason: String,
}

/// The sequence number of the first line of `path`; `None` when the file is
/// empty or its first line has none.
fn first_seq(path: &Path) -> Result<Option<u64>, VerifyError> {
    let file = File::open(path).map_err(|source| VerifyError {
        path: path.to_owned(),
        source,
    })?;
    let mut line = String::new();
    // A first line that is not UTF-8, or longer than a record, leaves
    // `line` empty or cut: no sequence number.
    let _ = BufReader::new(file.take(MAX_LINE as u64)).read_line(&mut line);
    Ok(serde_json::from_str::<Value>(&line)
        .ok()
        .and_then(|v| seq_of(&v)))
}

struct Walk {
    report: Report,
    prev: Option<(u64, String)>,
    /// The head persisted in `audit.state`, to be met on the way.
    state: Option<(u64, String)>,
}

/// The named head of a `gap` record: `(previous_seq, previous_head,
/// reason)`.
fn gap_head(value: &Value) -> Option<(u64, String, String)> {
    let gap = format::own(value)?.get("gap")?;
    Some((
        gap.get("previous_seq")?.as_u64()?,
        gap.get("previous_head")?.as_str()?.to_owned(),
        gap.get("reason")?.as_str()?.to_owned(),
    ))
}

impl Walk {
    fn line(&mut self, raw: &[u8]) -> Result<(), Fault> {
        let text = raw.strip_suffix(b"\n").ok_or(Fault::Incomplete)?;
        let text = std::str::from_utf8(text).map_err(|e| Fault::NotJson {
            message: e.to_string(),
        })?;
        let value: Value = serde_json::from_str(text).map_err(|e| Fault::NotJson {
            message: e.to_string(),
        })?;
        let seq = seq_of(&value).ok_or(Fault::NoSeq)?;
        let (unchained, chain) = chain::split(text).ok_or(Fault::NoChain)?;
        let gap = gap_head(&value);
        if let Some((previous_seq, _, _)) = &gap
            && previous_seq.checked_add(1) != Some(seq)
        {
            return Err(Fault::BadGap { seq });
        }
        let prev_chain = match (&self.prev, &gap) {
            (Some((prev_seq, prev_chain)), gap) => {
                let expected = prev_seq
                    .checked_add(1)
                    .ok_or(Fault::SeqExhausted { after: *prev_seq })?;
                if seq < expected {
                    return Err(Fault::OutOfOrder {
                        expected,
                        found: seq,
                    });
                }
                match gap {
                    // Declared: records after `prev_seq` up to the named
                    // head are not here (or the head is another trail's).
                    Some((previous_seq, previous_head, reason))
                        if (*previous_seq, previous_head) != (*prev_seq, prev_chain) =>
                    {
                        self.report.gaps.push(Declared {
                            seq,
                            after: *prev_seq,
                            previous_seq: *previous_seq,
                            reason: reason.clone(),
                        });
                        Some(previous_head.as_str())
                    }
                    _ if seq > expected => {
                        return Err(Fault::Gap {
                            expected,
                            found: seq,
                        });
                    }
                    _ => Some(prev_chain.as_str()),
                }
            }
            (None, Some((previous_seq, previous_head, _))) => {
                self.report.first_seq = Some(seq);
                self.report.previous = Some((*previous_seq, previous_head.clone()));
                Some(previous_head.as_str())
            }
            (None, None) => {
                self.report.first_seq = Some(seq);
                self.report.from_start = seq == 1;
                (seq == 1).then_some(chain::GENESIS)
            }
        };
        if let Some(prev_chain) = prev_chain
            && chain::link(prev_chain, &unchained) != chain
        {
            return Err(Fault::Chain { seq });
        }
        if let Some((state_seq, state_head)) = &self.state
            && *state_seq == seq
        {
            if state_head != chain {
                return Err(Fault::StateMismatch { seq });
            }
            self.report.state_checked = true;
        }
        self.prev = Some((seq, chain.to_owned()));
        self.report.records += 1;
        self.report.last_seq = Some(seq);
        self.report.last_chain = Some(chain.to_owned());
        Ok(())
    }
}

/// Checks `files` as one trail; stops at the first problem.
///
/// # Errors
/// When a file cannot be read.
pub fn verify(files: &[PathBuf]) -> Result<Report, VerifyError> {
    verify_against(files, None)
}

/// [`verify`], and the trail must reach `state` (the head persisted in
/// `audit.state`: seq and chain value) with that chain value.
///
/// # Errors
/// When a file cannot be read.
pub fn verify_against(
    files: &[PathBuf],
    state: Option<&(u64, String)>,
) -> Result<Report, VerifyError> {
    let mut ordered = Vec::with_capacity(files.len());
    for f in files {
        ordered.push((first_seq(f)?, f.clone()));
    }
    // Files whose first line has no sequence number go first: that line is
    // where verification fails.
    ordered.sort_by_key(|(seq, _)| seq.map_or((0, 0), |s| (1, s)));
    let mut walk = Walk {
        report: Report {
            files: files.len(),
            ..Report::default()
        },
        prev: None,
        state: state.cloned(),
    };
    for (_, path) in &ordered {
        let file = File::open(path).map_err(|source| VerifyError {
            path: path.clone(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let mut raw = Vec::new();
        for line in 1.. {
            raw.clear();
            // One byte past the limit tells a line of exactly MAX_LINE bytes
            // from a longer one.
            let n = (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut raw)
                .map_err(|source| VerifyError {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            let checked = if n > MAX_LINE {
                Err(Fault::TooLong { limit: MAX_LINE })
            } else {
                walk.line(&raw)
            };
            if let Err(fault) = checked {
                walk.report.problem = Some(Problem {
                    file: path.clone(),
                    line,
                    fault,
                });
                return Ok(walk.report);
            }
        }
    }
    let last = walk.report.last_seq.unwrap_or(0);
    if let Some((state_seq, _)) = state
        && *state_seq > last
    {
        walk.report.problem = Some(Problem {
            file: ordered.last().map(|(_, p)| p.clone()).unwrap_or_default(),
            line: 0,
            fault: Fault::BehindState {
                last,
                state: *state_seq,
            },
        });
    }
    Ok(walk.report)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::audit::writer::{
        files,
        tests::{TempDir, settings, write_records},
    };

    /// A good trail of `n` records in one file, and its lines.
    fn trail(dir: &TempDir, n: u64) -> (PathBuf, Vec<String>) {
        let s = settings(&dir.0, 0, 1);
        write_records(&s, n);
        let text = fs::read_to_string(&s.path).unwrap_or_else(|e| panic!("{e}"));
        (s.path, text.lines().map(str::to_owned).collect())
    }

    fn check(path: &Path, lines: &[String]) -> Report {
        let text: String = lines.iter().flat_map(|l| [l.as_str(), "\n"]).collect();
        fs::write(path, text).unwrap_or_else(|e| panic!("{e}"));
        verify(&[path.to_owned()]).unwrap_or_else(|e| panic!("{e}"))
    }

    fn fault(report: &Report) -> (usize, Fault) {
        let p = report
            .problem
            .clone()
            .unwrap_or_else(|| panic!("expected a problem, got {report:?}"));
        (p.line, p.fault)
    }

    #[test]
    fn a_good_trail_passes() {
        let dir = TempDir::new("good");
        let (path, lines) = trail(&dir, 6);
        let r = check(&path, &lines);
        assert_eq!(r.problem, None);
        assert_eq!(
            (r.records, r.first_seq, r.last_seq, r.from_start),
            (6, Some(1), Some(6), true)
        );
    }

    #[test]
    fn every_edited_byte_is_caught() {
        let dir = TempDir::new("edit");
        let (path, lines) = trail(&dir, 3);
        let target = 1;
        for at in 0..lines[target].len() {
            let mut edited = lines.clone();
            let mut bytes = edited[target].clone().into_bytes();
            // Flip to another printable byte, so the line stays text.
            bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
            edited[target] = String::from_utf8(bytes).unwrap_or_default();
            let r = check(&path, &edited);
            let (line, _) = fault(&r);
            assert!(
                line == 2 || line == 3,
                "byte {at}: reported at line {line}: {r:?}"
            );
        }
    }

    #[test]
    fn an_edited_value_is_a_chain_mismatch() {
        let dir = TempDir::new("value");
        let (path, mut lines) = trail(&dir, 3);
        lines[1] = lines[1].replace("\"rate_limited\":2", "\"rate_limited\":0");
        assert_eq!(fault(&check(&path, &lines)), (2, Fault::Chain { seq: 2 }));
        let shown = check(&path, &lines)
            .problem
            .map(|p| p.to_string())
            .unwrap_or_default();
        assert!(
            shown.contains("audit.jsonl:2: chain mismatch at seq 2"),
            "{shown}"
        );
    }

    #[test]
    fn a_deleted_line_is_a_gap() {
        let dir = TempDir::new("delete");
        let (path, mut lines) = trail(&dir, 5);
        lines.remove(2);
        assert_eq!(
            fault(&check(&path, &lines)),
            (
                3,
                Fault::Gap {
                    expected: 3,
                    found: 4
                }
            )
        );
    }

    #[test]
    fn a_reordered_line_is_caught() {
        let dir = TempDir::new("reorder");
        let (path, mut lines) = trail(&dir, 5);
        lines.swap(1, 3);
        assert_eq!(
            fault(&check(&path, &lines)),
            (
                2,
                Fault::Gap {
                    expected: 2,
                    found: 4
                }
            )
        );
        let (_, mut lines) = trail(&TempDir::new("reorder2"), 5);
        lines.swap(3, 4);
        assert_eq!(
            fault(&check(&path, &lines)),
            (
                4,
                Fault::Gap {
                    expected: 4,
                    found: 5
                }
            )
        );
        let (_, mut lines) = trail(&TempDir::new("reorder3"), 5);
        let moved = lines.remove(1);
        lines.push(moved);
        assert_eq!(
            fault(&check(&path, &lines)),
            (
                2,
                Fault::Gap {
                    expected: 2,
                    found: 3
                }
            )
        );
    }

    #[test]
    fn a_renumbered_line_still_fails_the_chain() {
        // Delete line 3, then renumber what follows to hide the gap.
        let dir = TempDir::new("renumber");
        let (path, mut lines) = trail(&dir, 4);
        lines.remove(2);
        lines[2] = lines[2].replace("\"seq\":4", "\"seq\":3");
        assert_eq!(fault(&check(&path, &lines)), (3, Fault::Chain { seq: 3 }));
    }

    #[test]
    fn bad_lines_are_named() {
        let dir = TempDir::new("bad");
        let (path, lines) = trail(&dir, 2);
        let mut garbage = lines.clone();
        garbage.insert(1, "hello".into());
        assert!(matches!(
            fault(&check(&path, &garbage)),
            (2, Fault::NotJson { .. })
        ));
        fs::write(&path, format!("{}\n{}", lines[0], lines[1])).unwrap_or_else(|e| panic!("{e}"));
        let r = verify(std::slice::from_ref(&path)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fault(&r), (2, Fault::Incomplete));
        let unchained = lines[0].replace(",\"chain\":", ",\"chainX\":");
        assert_eq!(fault(&check(&path, &[unchained])), (1, Fault::NoChain));
    }

    #[test]
    fn rotated_files_are_checked_in_sequence_order_whatever_the_argument_order() {
        let dir = TempDir::new("files");
        let s = settings(&dir.0, 600, 50);
        write_records(&s, 20);
        let mut all = files(&s.path);
        assert!(all.len() > 2, "rotation happened: {all:?}");
        all.reverse();
        let r = verify(&all).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.problem, r.records, r.last_seq), (None, 20, Some(20)));
        // A missing middle file is a gap.
        let middle = all.remove(1);
        let r = verify(&all).unwrap_or_else(|e| panic!("{e}"));
        let p = r
            .problem
            .unwrap_or_else(|| panic!("a missing file {} must be a gap", middle.display()));
        assert!(matches!(p.fault, Fault::Gap { .. }), "{p}");
    }

    #[test]
    fn a_record_after_the_last_sequence_number_is_a_fault_not_a_panic() {
        let dir = TempDir::new("seq-max");
        let (path, mut lines) = trail(&dir, 2);
        lines[0] = lines[0].replacen("\"seq\":1,", &format!("\"seq\":{},", u64::MAX), 1);
        assert!(lines[0].contains(&u64::MAX.to_string()), "{}", lines[0]);
        let r = check(&path, &lines);
        assert_eq!(fault(&r), (2, Fault::SeqExhausted { after: u64::MAX }));
    }

    #[test]
    fn an_endless_line_is_a_fault_after_a_bounded_read() {
        let dir = TempDir::new("endless");
        let path = dir.0.join("zeros");
        fs::write(&path, vec![b'x'; MAX_LINE + 10]).unwrap_or_else(|e| panic!("{e}"));
        let r = verify(&[path]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fault(&r), (1, Fault::TooLong { limit: MAX_LINE }));
        // A device that never ends: read no further than the bound.
        let r = verify(&[PathBuf::from("/dev/zero")]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(fault(&r), (1, Fault::TooLong { limit: MAX_LINE }));
    }
}
