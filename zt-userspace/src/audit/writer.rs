//! The audit file: sequence numbers and the chain continued from what is
//! already on disk, whole lines only, rotation by size, group commit.
//!
//! Crash safety rests on three things. Records are appended with `write(2)`
//! calls that each hold whole lines, so a killed daemon leaves whole lines;
//! the one exception is a kill that lands inside a multi-page write, which
//! the kernel may cut at a page boundary (`generic_perform_write` checks for
//! fatal signals between pages), and which the next start repairs by
//! truncating the incomplete last line before appending. `fdatasync` runs
//! at most `audit.fsync_ms` after a write, so a power loss costs at most
//! that batch. And one lock file (`PATH.lock`, `flock`) makes sure that only
//! one daemon appends: a new `ztxdp up` that takes over from a running one
//! waits for it to let go before it reads where the trail ends.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use super::{
    AuditError, chain, format,
    record::{Body, Record},
};
use crate::policy::{AuditFormat, AuditSettings};

/// A record as written: the line holds the chain value.
#[derive(Clone, Debug)]
pub struct Sealed {
    pub record: Record,
    pub chain: String,
    /// The file line, without its newline.
    pub line: String,
}

/// `PATH.N`, the N-th most recent rotated file.
#[must_use]
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The audit files that exist for `path`, oldest first: `PATH.N` ... `PATH.1`,
/// `PATH`.
#[must_use]
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut numbered: Vec<(u32, PathBuf)> = Vec::new();
    if let (Some(dir), Some(base)) = (path.parent(), path.file_name().and_then(|b| b.to_str()))
        && let Ok(entries) = fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        })
    {
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|n| n.strip_prefix(base))
                .and_then(|rest| rest.strip_prefix('.'))
                .and_then(|digits| digits.parse::<u32>().ok())
            else {
                continue;
            };
            numbered.push((n, rotated(path, n)));
        }
    }
    numbered.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    let mut out: Vec<PathBuf> = numbered.into_iter().map(|(_, p)| p).collect();
    if path.exists() {
        out.push(path.to_owned());
    }
    out
}

/// `PATH.lock`, the file whose `flock` guards `path`.
pub(crate) fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Opens `path` for appending, creating it with mode 0640.
pub(crate) fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

/// Makes a new directory entry durable.
fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Appends records to the audit file; see the module docs.
pub struct AuditWriter {
    path: PathBuf,
    format: AuditFormat,
    rotate_bytes: u64,
    keep: u32,
    file: File,
    /// Bytes in `file`.
    size: u64,
    next_seq: u64,
    /// Chain value of the last record appended.
    chain: String,
    /// Lines appended but not yet written.
    pending: Vec<u8>,
    /// Their records, handed out once written.
    sealed: Vec<Sealed>,
    /// Written since the last `fdatasync`.
    dirty: bool,
    /// Holds the `flock` for as long as this writer lives.
    _lock: File,
}

impl AuditWriter {
    /// Checks, without locking or reading anything, that the file and its
    /// lock can be created and appended to: run before anything is attached.
    ///
    /// # Errors
    /// When the directory or a file cannot be created or opened for writing.
    pub fn check(settings: &AuditSettings) -> Result<(), AuditError> {
        let path = &settings.path;
        let open_err = |p: &Path| {
            let p = p.to_owned();
            move |source| AuditError::Open { path: p, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(open_err(dir))?;
        }
        open_append(path).map_err(open_err(path))?;
        open_append(&lock_path(path)).map_err(open_err(&lock_path(path)))?;
        Ok(())
    }

    /// Takes the lock and opens the file for appending, continuing the
    /// sequence and the chain from the newest record on disk. `None` when
    /// another process holds the lock.
    ///
    /// # Errors
    /// When a file cannot be opened, or the newest record on disk cannot be
    /// read (then the trail cannot be continued without a gap).
    pub fn try_open(settings: &AuditSettings) -> Result<Option<Self>, AuditError> {
        let path = &settings.path;
        let lock_file = lock_path(path);
        let lock = open_append(&lock_file).map_err(|source| AuditError::Open {
            path: lock_file.clone(),
            source,
        })?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let source = io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Ok(None);
            }
            return Err(AuditError::Lock {
                path: lock_file,
                source,
            });
        }
        repair_tail(path)?;
        let (next_seq, chain) = match newest_record(path)? {
            Some((seq, chain)) => (seq + 1, chain),
            None => (1, chain::GENESIS.to_owned()),
        };
        let file = open_append(path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        let size = file
            .metadata()
            .map_err(|source| AuditError::Open {
                path: path.clone(),
                source,
            })?
            .len();
        sync_dir(path).map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Some(Self {
            path: path.clone(),
            format: settings.format,
            rotate_bytes: settings.rotate_bytes,
            keep: settings.keep,
            file,
            size,
            next_seq,
            chain,
            pending: Vec::new(),
            sealed: Vec::new(),
            dirty: false,
            _lock: lock,
        }))
    }

    /// The sequence number the next record gets.
    #[must_use]
    pub const fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Chain value of the last record appended (of the newest on disk, until
    /// one is).
    #[must_use]
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Numbers, seals and queues one record; it reaches the file with the
    /// next [`Self::write`] (or earlier, when the file is rotated first).
    ///
    /// # Errors
    /// When a rotation this record triggers fails.
    pub fn append(&mut self, time_ns: i64, body: Body) -> Result<(), AuditError> {
        self.append_run(time_ns, body, false)
    }

    /// [`Self::append`], of a record that belongs to the programs this
    /// daemon replaced when `previous_run` ([`Record::previous_run`]).
    ///
    /// # Errors
    /// When a rotation this record triggers fails.
    pub fn append_run(
        &mut self,
        time_ns: i64,
        body: Body,
        previous_run: bool,
    ) -> Result<(), AuditError> {
        let record = Record {
            seq: self.next_seq,
            time_ns,
            body,
            previous_run,
        };
        let (line, chain) = chain::seal(&self.chain, &format::unchained(self.format, &record));
        let len = line.len() as u64 + 1;
        let queued = self.size + self.pending.len() as u64;
        if self.rotate_bytes > 0 && queued > 0 && queued + len > self.rotate_bytes {
            self.write_pending()?;
            self.rotate()?;
        }
        self.pending.extend_from_slice(line.as_bytes());
        self.pending.push(b'\n');
        self.next_seq += 1;
        self.chain.clone_from(&chain);
        self.sealed.push(Sealed {
            record,
            chain,
            line,
        });
        Ok(())
    }

    /// Writes every queued line with one append and returns their records,
    /// which from now on are in the file.
    ///
    /// # Errors
    /// When the write fails.
    pub fn write(&mut self) -> Result<Vec<Sealed>, AuditError> {
        self.write_pending()?;
        Ok(std::mem::take(&mut self.sealed))
    }

    fn write_pending(&mut self) -> Result<(), AuditError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(&self.pending)
            .map_err(|source| AuditError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.size += self.pending.len() as u64;
        self.pending.clear();
        self.dirty = true;
        Ok(())
    }

    /// `fdatasync` if anything was written since the last one.
    ///
    /// # Errors
    /// When the sync fails.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.dirty {
            self.file.sync_data().map_err(|source| AuditError::Sync {
                path: self.path.clone(),
                source,
            })?;
            self.dirty = false;
        }
        Ok(())
    }

    /// `PATH` becomes `PATH.1`, `PATH.1` becomes `PATH.2`, ..., `PATH.KEEP`
    /// is dropped; appending goes on in a new, empty `PATH`.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.sync()?;
        let rename = |from: PathBuf, to: PathBuf| {
            fs::rename(&from, &to)
                .or_else(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(|source| AuditError::Rotate { from, to, source })
        };
        // At least one rotated file stays: `PATH.1` holds the newest record
        // when `PATH` is new, and a restart continues the sequence from it.
        let keep = self.keep.max(1);
        for n in (1..keep).rev() {
            rename(rotated(&self.path, n), rotated(&self.path, n + 1))?;
        }
        rename(self.path.clone(), rotated(&self.path, 1))?;
        // Files beyond `keep` (left by a larger `audit.keep`) go too.
        let mut n = keep + 1;
        while fs::remove_file(rotated(&self.path, n)).is_ok() {
            n += 1;
        }
        self.file = open_append(&self.path).map_err(|source| AuditError::Open {
            path: self.path.clone(),
            source,
        })?;
        self.size = 0;
        sync_dir(&self.path).map_err(|source| AuditError::Open {
            path: self.path.clone(),
            source,
        })?;
        Ok(())
    }
}

/// Cuts an incomplete last line (a write cut short by a crash) off `path`.
fn repair_tail(path: &Path) -> Result<(), AuditError> {
    let err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut file = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let len = file.metadata().map_err(err)?.len();
    if len == 0 {
        return Ok(());
    }
    let keep = match last_newline(&mut file, len).map_err(err)? {
        Some(at) if at + 1 == len => return Ok(()),
        Some(at) => at + 1,
        None => 0,
    };
    tracing::warn!(
        path = %path.display(),
        bytes = len - keep,
        "the audit file ends with an incomplete line (a write cut short by a crash); removing it"
    );
    file.set_len(keep).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Offset of the last `\n` in the first `len` bytes of `file`.
fn last_newline(file: &mut File, len: u64) -> io::Result<Option<u64>> {
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        buf.resize(usize::try_from(end - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf)?;
        if let Some(i) = buf.iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

/// The last complete line of `path` (without its newline), if any.
fn last_line(path: &Path) -> io::Result<Option<String>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let Some(end) = last_newline(&mut file, len)? else {
        return Ok(None);
    };
    let start = last_newline(&mut file, end)?.map_or(0, |at| at + 1);
    let mut buf = vec![0; usize::try_from(end - start).unwrap_or(0)];
    file.seek(SeekFrom::Start(start))?;
    file.read_exact(&mut buf)?;
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Sequence number and chain value of the newest record in `path` and its
/// rotated files. Every file is looked at, so a rotation that a crash
/// interrupted half way (a number missing) still finds the newest record.
fn newest_record(path: &Path) -> Result<Option<(u64, String)>, AuditError> {
    let mut newest: Option<(u64, String)> = None;
    for file in files(path) {
        let line = last_line(&file).map_err(|source| AuditError::Open {
            path: file.clone(),
            source,
        })?;
        let Some(line) = line else { continue };
        let bad = |reason: &str| AuditError::Recover {
            path: file.clone(),
            reason: format!(
                "{reason}; check it with `ztxdp audit verify`, then move the file away to start a new trail"
            ),
        };
        let (_, chain) =
            chain::split(&line).ok_or_else(|| bad("its last line has no ztxdp.chain"))?;
        let seq = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.pointer("/ztxdp/seq").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| bad("its last line has no ztxdp.seq"))?;
        if newest.as_ref().is_none_or(|(s, _)| seq > *s) {
            newest = Some((seq, chain.to_owned()));
        }
    }
    Ok(newest)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::audit::{record::Program, verify};

    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("ztxdp-audit-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    pub(crate) fn settings(dir: &Path, rotate_bytes: u64, keep: u32) -> AuditSettings {
        AuditSettings {
            rotate_bytes,
            keep,
            fsync: Duration::ZERO,
            ..AuditSettings::new(dir.join("audit.jsonl"))
        }
    }

    /// A `lost` record of `n` rate-limited edge decisions.
    pub(crate) fn lost(n: u64) -> Body {
        Body::Lost {
            program: Program::Edge,
            interface: "eth0".into(),
            rate_limited: n,
            ring_full: 0,
            unwritten: 0,
        }
    }

    fn open(s: &AuditSettings) -> AuditWriter {
        AuditWriter::check(s).unwrap_or_else(|e| panic!("check: {e}"));
        AuditWriter::try_open(s)
            .unwrap_or_else(|e| panic!("open: {e}"))
            .expect("the lock is free")
    }

    /// Writes `n` records with one writer and closes it.
    pub(crate) fn write_records(s: &AuditSettings, n: u64) {
        let mut w = open(s);
        for i in 0..n {
            w.append(1_000 + i64::try_from(i).unwrap_or(0), lost(i + 1))
                .unwrap_or_else(|e| panic!("append: {e}"));
            if i % 7 == 0 {
                w.write().unwrap_or_else(|e| panic!("write: {e}"));
            }
        }
        w.write().unwrap_or_else(|e| panic!("write: {e}"));
        w.sync().unwrap_or_else(|e| panic!("sync: {e}"));
    }

    fn seqs(path: &Path) -> Vec<u64> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                format::parse(l)
                    .unwrap_or_else(|e| panic!("{e}: {l}"))
                    .0
                    .seq
            })
            .collect()
    }

    #[test]
    fn sequence_and_chain_continue_across_restarts() {
        let dir = TempDir::new("restart");
        let s = settings(&dir.0, 0, 3);
        write_records(&s, 5);
        write_records(&s, 4);
        assert_eq!(
            seqs(&s.path),
            (1..=9).collect::<Vec<_>>(),
            "seq continues, never reused"
        );
        let report =
            verify::verify(std::slice::from_ref(&s.path)).unwrap_or_else(|e| panic!("verify: {e}"));
        assert!(report.problem.is_none(), "{report:?}");
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (9, Some(1), Some(9))
        );
    }

    #[test]
    fn rotation_keeps_whole_lines_and_continues_the_chain() {
        let dir = TempDir::new("rotate");
        let s = settings(&dir.0, 1000, 3);
        write_records(&s, 40);
        let all = files(&s.path);
        assert_eq!(all.len(), 4, "PATH.3 PATH.2 PATH.1 PATH: {all:?}");
        assert!(
            !rotated(&s.path, 4).exists(),
            "only `keep` rotated files stay"
        );
        for f in &all {
            let size = fs::metadata(f).map_or(0, |m| m.len());
            assert!(
                size <= 1000,
                "{} is {size} bytes, over rotate_bytes",
                f.display()
            );
            let text = fs::read_to_string(f).unwrap_or_default();
            assert!(text.ends_with('\n'), "{} ends mid-line", f.display());
        }
        let report = verify::verify(&all).unwrap_or_else(|e| panic!("verify: {e}"));
        assert!(
            report.problem.is_none(),
            "the chain runs across files: {report:?}"
        );
        assert_eq!(report.last_seq, Some(40));
        let first = report.first_seq.unwrap_or(0);
        assert!(
            first > 1,
            "the oldest files were dropped, so the trail starts later ({first})"
        );
        // Restart after rotation: the chain goes on from the newest file.
        write_records(&s, 3);
        let report = verify::verify(&files(&s.path)).unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(
            (report.problem.is_none(), report.last_seq),
            (true, Some(43)),
            "{report:?}"
        );
    }

    #[test]
    fn an_incomplete_last_line_is_removed_before_appending() {
        let dir = TempDir::new("repair");
        let s = settings(&dir.0, 0, 1);
        write_records(&s, 3);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&s.path)
            .unwrap_or_else(|e| panic!("open: {e}"));
        f.write_all(b"{\"@timestamp\":\"2026-")
            .unwrap_or_else(|e| panic!("write: {e}"));
        drop(f);
        write_records(&s, 2);
        assert_eq!(seqs(&s.path), [1, 2, 3, 4, 5]);
        let report =
            verify::verify(std::slice::from_ref(&s.path)).unwrap_or_else(|e| panic!("verify: {e}"));
        assert!(report.problem.is_none(), "{report:?}");
    }

    #[test]
    fn a_second_writer_waits_for_the_lock() {
        let dir = TempDir::new("lock");
        let s = settings(&dir.0, 0, 1);
        let first = open(&s);
        assert!(
            AuditWriter::try_open(&s)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_none(),
            "the lock is held"
        );
        drop(first);
        assert!(
            AuditWriter::try_open(&s)
                .unwrap_or_else(|e| panic!("{e}"))
                .is_some(),
            "the lock was released"
        );
    }

    #[test]
    fn a_file_that_does_not_end_in_a_record_is_refused() {
        let dir = TempDir::new("garbage");
        let s = settings(&dir.0, 0, 1);
        fs::write(&s.path, "not a record\n").unwrap_or_else(|e| panic!("{e}"));
        let err = AuditWriter::try_open(&s)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("audit verify"),
            "the error says what to do: {err}"
        );
    }
}
