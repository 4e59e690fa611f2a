//! Fuzzing `ztxdp audit verify` (`ztxdp::audit::verify::verify`), which is
//! run on files an attacker may have touched. Properties, each for a time
//! budget (see `fuzz/mod.rs`):
//!
//! - a trail written as the daemon writes it (real records of every kind,
//!   either format, peer names with newlines and right-to-left overrides,
//!   any start, rotated into files given in any order) verifies, with the
//!   right count, sequence range and last chain value;
//! - the same trail with one detectable change (a byte replaced, a line
//!   deleted, repeated or moved, the file cut inside a line, bytes put in)
//!   reports a problem;
//! - hostile bytes (runs of NULs or of one byte longer than a line may be,
//!   `seq` at and past `u64::MAX`, deep nesting, huge numbers, invalid
//!   UTF-8, pieces of real records) are reported, never a panic, and the
//!   verifier's memory stays bounded by the line limit, not the input.

mod fuzz;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use proptest::{collection::vec, prelude::*, sample::select};
use zt_common::reason;
use ztxdp::{
    audit::{
        chain,
        format::unchained,
        record::{Body, Flow, IpFlow, Peer, Program, Record},
        verify::{MAX_LINE, Report, verify},
    },
    policy::AuditFormat,
};

/// The most the verifier may hold at once, whatever the input: a line of
/// [`MAX_LINE`] bytes, its parse, and a copy or two. Inputs below are up
/// to several times larger than a line.
const MEMORY_BOUND: usize = 64 * MAX_LINE;

// Allocation accounting per thread: the properties run on several threads
// at once, and each measures only its own calls.
thread_local! {
    static LIVE: Cell<usize> = const { Cell::new(0) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

struct Counting;

fn count(grow: usize, shrink: usize) {
    // `try_with`: the allocator runs during thread teardown too.
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(grow).saturating_sub(shrink);
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting touches only const-initialised thread-locals, which allocate
// nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size(), 0);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size(), 0);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as the caller gave it.
        unsafe { System.dealloc(ptr, layout) };
        count(0, layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as the caller gave it.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(new_size, layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns what it returned and the most it held allocated
/// at once beyond what was allocated before.
fn peak_of<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get).saturating_sub(base))
}

/// A directory of its own for each case.
struct Dir(PathBuf);

impl Dir {
    fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "ztxdp-fuzz-verify-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self(path)
    }

    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Text as an attacker (or an odd config of old) could put it into a
/// record: newlines, a right-to-left override, quotes, backslashes,
/// control characters, trailing spaces, astral characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let piece = select(vec![
        "app-1",
        "\n",
        "\u{202e}",
        "\"",
        "\\",
        "\u{0}",
        "\u{7f}",
        "   ",
        "😀",
        "}}",
        ",\"chain\":\"",
    ]);
    prop_oneof![
        3 => vec(piece, 0..6).prop_map(|p| p.concat()),
        1 => any::<String>(),
    ]
}

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
    ]
}

fn flow() -> impl Strategy<Value = Flow> {
    let ip_flow = (
        ip(),
        ip(),
        select(vec![1u8, 6, 17, 58, 132]),
        any::<Option<u16>>(),
        any::<Option<u16>>(),
        any::<Option<u8>>(),
    )
        .prop_map(
            |(src, dst, protocol, src_port, dst_port, tcp_flags)| IpFlow {
                src,
                dst,
                protocol,
                src_port,
                dst_port,
                tcp_flags,
            },
        );
    let peer = (
        hostile_text(),
        proptest::option::of(hostile_text()),
        proptest::collection::vec(hostile_text(), 0..3),
    )
        .prop_map(|(name, public_key, groups)| Peer {
            name,
            public_key,
            groups,
        });
    (
        select(vec![Program::Edge, Program::Tunnel]),
        hostile_text(),
        select(reason::ALL.to_vec()),
        proptest::option::of(ip_flow),
        proptest::option::of(peer),
        any::<bool>(),
    )
        .prop_map(|(program, interface, reason, ip, peer, audit)| Flow {
            program,
            interface,
            reason,
            ip,
            peer,
            service: None,
            // A would-drop has a drop reason, as the kernel reports it.
            would_drop: audit && !reason::is_allow(reason),
        })
}

/// Record bodies; counts stay below 2^62 so that their sums fit.
fn body() -> impl Strategy<Value = Body> {
    let count = 0u64..(1 << 62);
    prop_oneof![
        (flow(), count.clone()).prop_map(|(flow, suppressed)| Body::Decision { flow, suppressed }),
        (flow(), count.clone(), any::<i64>(), any::<i64>()).prop_map(
            |(flow, count, start_ns, end_ns)| Body::Summary {
                flow,
                count,
                start_ns,
                end_ns
            }
        ),
        (
            select(vec![Program::Edge, Program::Tunnel]),
            hostile_text(),
            count.clone(),
            count.clone(),
            count.clone()
        )
            .prop_map(|(program, interface, rate_limited, ring_full, unwritten)| {
                Body::Lost {
                    program,
                    interface,
                    rate_limited,
                    ring_full,
                    unwritten,
                }
            }),
        (hostile_text(), count)
            .prop_map(|(address, dropped)| Body::SyslogDropped { address, dropped }),
    ]
}

/// A trail as the daemon writes it.
#[derive(Debug)]
struct Trail {
    /// Each record's line, newline included.
    lines: Vec<String>,
    first_seq: u64,
    last_chain: String,
}

fn trail(
    start: impl Strategy<Value = u64>,
    len: std::ops::Range<usize>,
) -> impl Strategy<Value = Trail> {
    (
        start,
        select(vec![AuditFormat::Ecs, AuditFormat::Ocsf]),
        vec((any::<i64>(), body()), len),
    )
        .prop_map(|(first, format, bodies)| {
            // Room for every record: a start near the end is moved back.
            let n = bodies.len() as u64;
            let first_seq = first.min(u64::MAX - (n - 1));
            let mut prev = if first_seq == 1 {
                chain::GENESIS.to_owned()
            } else {
                // Predecessors rotated away: any chain value.
                chain::link("rotated away", &first_seq.to_string())
            };
            let mut lines = Vec::new();
            // Not `first_seq..`: that range overflows past its last item.
            for (i, (time_ns, body)) in (0..n).zip(bodies) {
                let seq = first_seq + i;
                let record = Record {
                    seq,
                    time_ns,
                    body,
                    previous_run: false,
                };
                let (line, next) = chain::seal(&prev, &unchained(format, &record));
                lines.push(line + "\n");
                prev = next;
            }
            Trail {
                lines,
                first_seq,
                last_chain: prev,
            }
        })
}

/// Where a trail starts: at 1, anywhere, or at the very end of the range.
fn start() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1u64), any::<u64>(), Just(u64::MAX)]
}

#[test]
fn a_valid_trail_verifies() {
    let cases = (
        trail(start(), 1..24),
        vec(any::<prop::sample::Index>(), 0..3),
        any::<prop::sample::Index>(),
    );
    fuzz::fuzz("a valid trail verifies", cases, |(t, cuts, order)| {
        // Rotated into up to three files, none empty, oldest
        // `audit.jsonl.N` first, as the writer names them; given to the
        // verifier in any order.
        let inner = t.lines.len() - 1;
        let mut cuts: Vec<usize> = if inner == 0 {
            Vec::new()
        } else {
            cuts.iter().map(|i| 1 + i.index(inner)).collect()
        };
        cuts.sort_unstable();
        cuts.dedup();
        let dir = Dir::new();
        let mut files = Vec::new();
        let mut from = 0;
        for (i, &to) in cuts.iter().chain([&t.lines.len()]).enumerate() {
            let name = if to == t.lines.len() {
                "audit.jsonl".to_owned()
            } else {
                format!("audit.jsonl.{}", cuts.len() - i)
            };
            files.push(dir.write(&name, t.lines[from..to].concat().as_bytes()));
            from = to;
        }
        let turn = order.index(files.len());
        files.rotate_left(turn);
        let report = verify(&files).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let n = t.lines.len() as u64;
        prop_assert_eq!(&report.problem, &None, "{:?}", report);
        prop_assert_eq!(report.records, n);
        prop_assert_eq!(report.first_seq, Some(t.first_seq));
        prop_assert_eq!(report.last_seq, Some(t.first_seq + (n - 1)));
        prop_assert_eq!(report.from_start, t.first_seq == 1);
        prop_assert_eq!(report.last_chain.as_deref(), Some(t.last_chain.as_str()));
        Ok(())
    });
}

/// One change an edit of the trail can make. The hash chain shows each of
/// these when the trail starts at seq 1 and has two records or more; what
/// it cannot show (records cut off at either end, an edit of the first
/// record of a trail whose start was rotated away) is not generated.
#[derive(Clone, Debug)]
enum Edit {
    /// Replace the byte at this position with a different one.
    Byte(prop::sample::Index, u8),
    /// Delete a line that is neither the first nor the last.
    Delete(prop::sample::Index),
    /// Write a line a second time right after itself.
    Repeat(prop::sample::Index),
    /// Swap two different lines.
    Swap(prop::sample::Index, prop::sample::Index),
    /// Cut the file inside a line.
    Cut(prop::sample::Index),
    /// Put bytes in at a position.
    Insert(prop::sample::Index, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let at = any::<prop::sample::Index>;
    prop_oneof![
        (at(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        at().prop_map(Edit::Delete),
        at().prop_map(Edit::Repeat),
        (at(), at()).prop_map(|(a, b)| Edit::Swap(a, b)),
        at().prop_map(Edit::Cut),
        (at(), vec(any::<u8>(), 1..16)).prop_map(|(i, b)| Edit::Insert(i, b)),
    ]
}

/// The trail's bytes with `edit` made.
fn edited(lines: &[String], edit: &Edit) -> Vec<u8> {
    let mut lines: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
    let n = lines.len();
    match edit {
        Edit::Byte(at, b) => {
            let mut bytes = lines.concat();
            let i = at.index(bytes.len());
            bytes[i] = if bytes[i] == *b {
                b.wrapping_add(1)
            } else {
                *b
            };
            return bytes;
        }
        Edit::Delete(at) => {
            lines.remove(1 + at.index(n - 2));
        }
        Edit::Repeat(at) => {
            let i = at.index(n);
            lines.insert(i, lines[i].clone());
        }
        Edit::Swap(a, b) => {
            let (a, b) = (a.index(n), b.index(n - 1));
            // A second index among the others.
            let b = if b >= a { b + 1 } else { b };
            lines.swap(a, b);
        }
        Edit::Cut(at) => {
            let mut bytes = lines.concat();
            // Positions inside a line: after a byte that is not a newline.
            let inside: Vec<usize> = (1..bytes.len())
                .filter(|&i| bytes[i - 1] != b'\n')
                .collect();
            bytes.truncate(inside[at.index(inside.len())]);
            return bytes;
        }
        Edit::Insert(at, extra) => {
            let mut bytes = lines.concat();
            let i = at.index(bytes.len() + 1);
            bytes.splice(i..i, extra.iter().copied());
            return bytes;
        }
    }
    lines.concat()
}

#[test]
fn a_changed_trail_reports_a_problem() {
    // Deleting a middle line needs three.
    let cases = (trail(Just(1), 3..16), edit());
    fuzz::fuzz("a changed trail reports a problem", cases, |(t, edit)| {
        let dir = Dir::new();
        let file = dir.write("audit.jsonl", &edited(&t.lines, &edit));
        let report = verify(&[file]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            report.problem.is_some(),
            "{:?} went unnoticed: {:?}",
            edit,
            report
        );
        Ok(())
    });
}

/// A piece of a hostile file.
#[derive(Clone, Debug)]
enum Piece {
    Bytes(Vec<u8>),
    /// One byte many times: `/dev/zero` is `Run(0, ∞)`.
    Run(u8, usize),
    Text(&'static str),
    /// A record whose `seq` is this number, chained to nothing.
    Seq(String),
    /// Brackets nested this deep.
    Nested(usize),
}

fn piece() -> impl Strategy<Value = Piece> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64).prop_map(Piece::Bytes),
        2 => (any::<u8>(), 0..256usize).prop_map(|(b, n)| Piece::Run(b, n)),
        1 => (any::<u8>(), 0..3 * MAX_LINE).prop_map(|(b, n)| Piece::Run(b, n)),
        1 => (select(vec![0u8, b'a', b'[', b'"']), MAX_LINE - 2..MAX_LINE + 2).prop_map(|(b, n)| Piece::Run(b, n)),
        3 => select(vec![
            "\n", "{", "}", "\"ztxdp\":", "{\"ztxdp\":{\"seq\":1,\"chain\":\"", "\"}}\n",
            ",\"chain\":\"0000000000000000000000000000000000000000000000000000000000000000\"}}\n",
            "\u{202e}", "\u{feff}", "\\u0000", "1e999999", "-0", "\r\n",
        ]).prop_map(Piece::Text),
        2 => prop_oneof![
            Just(u64::MAX.to_string()),
            Just((u128::from(u64::MAX) + 1).to_string()),
            Just("18446744073709551615.0".to_owned()),
            Just("-1".to_owned()),
            Just("1e400".to_owned()),
            any::<u64>().prop_map(|n| n.to_string()),
        ].prop_map(Piece::Seq),
        1 => (0..4 * MAX_LINE / 2).prop_map(Piece::Nested),
    ]
}

fn render(pieces: &[Piece]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in pieces {
        match p {
            Piece::Bytes(b) => out.extend_from_slice(b),
            Piece::Run(b, n) => out.resize(out.len() + n, *b),
            Piece::Text(t) => out.extend_from_slice(t.as_bytes()),
            Piece::Seq(n) => {
                let unchained = format!("{{\"a\":1,\"ztxdp\":{{\"seq\":{n}}}}}");
                let (line, _) = chain::seal(chain::GENESIS, &unchained);
                out.extend_from_slice(line.as_bytes());
                out.push(b'\n');
            }
            Piece::Nested(depth) => {
                out.resize(out.len() + depth, b'[');
                out.resize(out.len() + depth, b']');
                out.push(b'\n');
            }
        }
    }
    out
}

#[test]
fn hostile_bytes_are_reported_within_bounded_memory() {
    // Zeros after the first file's pieces: sparse, so a gigabyte costs no
    // disk, and a verifier without a line limit would hold it all.
    let zeros = prop_oneof![3 => Just(0u64), 1 => 0..(1u64 << 30)];
    let cases = (
        vec(piece(), 0..12),
        zeros,
        vec(piece(), 0..4),
        trail(start(), 1..4),
    );
    fuzz::fuzz("hostile bytes are reported", cases, |(a, zeros, b, t)| {
        let dir = Dir::new();
        // A hostile file, and one with a valid start whose end is hostile.
        let first = dir.write("audit.jsonl.1", &render(&a));
        fs::OpenOptions::new()
            .write(true)
            .open(&first)
            .and_then(|f| f.set_len(f.metadata()?.len() + zeros))
            .unwrap_or_else(|e| panic!("{}: {e}", first.display()));
        let mut second = t.lines.concat().into_bytes();
        second.extend(render(&b));
        let second = dir.write("audit.jsonl", &second);
        let (report, peak) = peak_of(|| verify(&[first.clone(), second.clone()]));
        let report: Report = report.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert!(
            peak <= MEMORY_BOUND,
            "held {} bytes at once for inputs of {} and {} bytes",
            peak,
            fs::metadata(&first).map_or(0, |m| m.len()),
            fs::metadata(&second).map_or(0, |m| m.len())
        );
        if let Some(problem) = &report.problem {
            prop_assert!(problem.line >= 1 && !problem.fault.to_string().is_empty());
        }
        Ok(())
    });
}

#[test]
fn endless_and_huge_files_are_refused_after_one_line() {
    // The cases, every run: `/dev/zero`, and a sparse 1 GiB file of
    // zeros that takes no disk.
    let dir = Dir::new();
    let sparse = dir.0.join("sparse.jsonl");
    fs::File::create(&sparse)
        .and_then(|f| f.set_len(1 << 30))
        .unwrap_or_else(|e| panic!("{}: {e}", sparse.display()));
    // The sparse file first: a verifier without a line limit fails on its
    // gigabyte rather than reading `/dev/zero` until memory runs out.
    for path in [sparse.as_path(), Path::new("/dev/zero")] {
        let (report, peak) = peak_of(|| verify(&[path.to_owned()]));
        let report = report.unwrap_or_else(|e| panic!("{e}"));
        let problem = report
            .problem
            .unwrap_or_else(|| panic!("{} passed", path.display()));
        assert_eq!(problem.line, 1, "{problem}");
        assert!(
            peak <= MEMORY_BOUND,
            "{}: held {peak} bytes",
            path.display()
        );
    }
}
