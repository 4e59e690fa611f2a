//! The audit file: sequence numbers and the chain continued from what is
//! already on disk (or from `audit.state`), whole lines only, rotation by
//! size, group commit, and a file that is watched for being deleted.
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
//!
//! A write that fails (a full disk, an I/O error) is cut back to the last
//! whole record at once, and its records are handed back unwritten, never
//! numbered: the sequence and the chain go on from the last record in the
//! file. [`super::Trail`] counts their decisions. A rotation that fails
//! leaves appending in the current file and is tried again later.
//!
//! Before each write the file at `audit.path` is compared with the one
//! open (device and inode, and its size): when it was deleted, renamed,
//! replaced or cut, appending goes on in a file at `audit.path` again,
//! led by a `gap` record naming the last record written before.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Seek as _, SeekFrom, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::fs::{MetadataExt as _, OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    AuditError, chain, format,
    record::{self, Body, GapReason, Record},
    state,
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

/// What one [`AuditWriter::write`] did.
#[derive(Debug, Default)]
pub struct Written {
    /// Records now in the file, in order.
    pub sealed: Vec<Sealed>,
    /// Records that could not be written (time and body, never numbered),
    /// because of `error`.
    pub failed: Vec<(i64, Body)>,
    pub error: Option<AuditError>,
}

/// A record waiting for [`AuditWriter::write`]: its time, body, and
/// whether it is of the previous run ([`Record::previous_run`]).
type Queued = (i64, Body, bool);

/// `PATH.N`, the N-th most recent rotated file.
#[must_use]
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// `PATH` of a rotated file `PATH.N`; `None` when `file` is not named so.
#[must_use]
pub fn rotated_base(file: &Path) -> Option<PathBuf> {
    let name = file.file_name()?.to_str()?;
    let (base, n) = name.rsplit_once('.')?;
    (!base.is_empty() && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| file.with_file_name(base))
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

/// Which file a descriptor or a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    /// A regular file: one that can be deleted, replaced or cut, and whose
    /// head is worth persisting (`/dev/null` as `audit.path` is not).
    regular: bool,
}

impl FileId {
    fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            regular: meta.is_file(),
        }
    }
}

/// The first retry of a failed rotation, and the longest wait between two.
const ROTATE_RETRY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_mins(1));

/// Appends records to the audit file; see the module docs.
pub struct AuditWriter {
    path: PathBuf,
    /// `audit.state`, where the head is persisted after each sync.
    state: PathBuf,
    format: AuditFormat,
    rotate_bytes: u64,
    keep: u32,
    file: File,
    /// The file `file` is, or `None` right after our own rotation renamed
    /// it away (then a new `PATH` is opened without a gap).
    id: Option<FileId>,
    /// Bytes of whole records in `file`.
    size: u64,
    /// Set when a failed write could not be cut back: the file holds part
    /// of a line past `size`, to be cut before the next write.
    torn: bool,
    next_seq: u64,
    /// Chain value of the last record in the file.
    chain: String,
    /// Records appended but not yet written, not yet numbered.
    queue: Vec<Queued>,
    /// Written since the last `fdatasync`.
    dirty: bool,
    /// The seq last stored in `state`.
    persisted: Option<u64>,
    /// After a failed rotation: when to try again, the wait after that, and
    /// the error.
    rotate_retry: Option<(Instant, Duration, String)>,
    /// Holds the `flock` for as long as this writer lives.
    _lock: File,
}

impl AuditWriter {
    /// Checks, without locking or reading anything, that the file and its
    /// lock can be created and appended to, and that the state file can be
    /// read: run before anything is attached.
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
        state::check(&settings.state)?;
        Ok(())
    }

    /// Takes the lock and opens the file for appending, continuing the
    /// sequence and the chain from the newest record on disk, or from the
    /// head in `audit.state` (behind a `gap` record) when the trail on disk
    /// ends before it. `None` when another process holds the lock.
    ///
    /// # Errors
    /// When a file cannot be opened, or the newest record on disk or the
    /// state file cannot be read (then the trail cannot be continued
    /// without a gap).
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
        let on_disk = newest_record(path)?;
        let (file, id, size) = open_at(path)?;
        let persisted = if id.regular {
            state::load(&settings.state, path)?
        } else {
            None
        };
        let (next_seq, chain, gap) = continue_from(on_disk, persisted.as_ref());
        let mut writer = Self {
            path: path.clone(),
            state: settings.state.clone(),
            format: settings.format,
            rotate_bytes: settings.rotate_bytes,
            keep: settings.keep,
            file,
            id: Some(id),
            size,
            torn: false,
            next_seq,
            chain,
            queue: Vec::new(),
            dirty: false,
            persisted: persisted.map(|h| h.seq),
            rotate_retry: None,
            _lock: lock,
        };
        if let Some(body) = gap {
            tracing::warn!(
                path = %path.display(),
                state = %settings.state.display(),
                "the audit trail ends before the head persisted in the state file \
                 (deleted, replaced or cut while no ztxdp ran); continuing from that head with a gap record"
            );
            writer.queue.push((record::now_ns(), body, false));
        }
        Ok(Some(writer))
    }

    /// The sequence number the next record written gets.
    #[must_use]
    pub const fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The error of the last failed rotation, while rotation fails.
    #[must_use]
    pub fn rotation_error(&self) -> Option<&str> {
        self.rotate_retry.as_ref().map(|(_, _, e)| e.as_str())
    }

    /// Chain value of the newest record in the file.
    #[must_use]
    pub fn chain(&self) -> &str {
        &self.chain
    }

    /// Queues one record; it is numbered, sealed and written by the next
    /// [`Self::write`].
    pub fn append(&mut self, time_ns: i64, body: Body) {
        self.append_run(time_ns, body, false);
    }

    /// [`Self::append`], of a record that belongs to the programs this
    /// daemon replaced when `previous_run` ([`Record::previous_run`]).
    pub fn append_run(&mut self, time_ns: i64, body: Body, previous_run: bool) {
        self.queue.push((time_ns, body, previous_run));
    }

    /// Writes every queued record, rotating the file where it grows past
    /// `audit.rotate_bytes`. Records that cannot be written come back in
    /// [`Written::failed`]; the file then still ends with a whole record,
    /// and the sequence goes on from it. A `gap` record that cannot be
    /// written stays queued, to lead the next write.
    pub fn write(&mut self) -> Written {
        let mut out = Written::default();
        if self.queue.is_empty() {
            return out;
        }
        if let Err(e) = self.follow_path().and_then(|()| self.mend()) {
            let queued = std::mem::take(&mut self.queue);
            self.fail(queued, &mut out, e);
            return out;
        }
        let mut queue = std::mem::take(&mut self.queue).into_iter();
        let mut batch: Vec<Sealed> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        let (mut seq, mut chain) = (self.next_seq, self.chain.clone());
        while let Some((time_ns, body, previous_run)) = queue.next() {
            let record = Record {
                seq,
                time_ns,
                body,
                previous_run,
            };
            let (line, sealed_chain) =
                chain::seal(&chain, &format::unchained(self.format, &record));
            let len = line.len() as u64 + 1;
            let queued = self.size + buf.len() as u64;
            if self.rotate_bytes > 0 && queued > 0 && queued + len > self.rotate_bytes {
                if let Err(e) = self.flush(&mut buf, &mut batch, &mut out) {
                    let rest = batch
                        .drain(..)
                        .map(|s| s.record)
                        .chain(std::iter::once(record))
                        .map(|r| (r.time_ns, r.body, r.previous_run))
                        .chain(queue)
                        .collect();
                    self.fail(rest, &mut out, e);
                    return out;
                }
                self.rotate_when_due();
            }
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            seq += 1;
            chain.clone_from(&sealed_chain);
            batch.push(Sealed {
                record,
                chain: sealed_chain,
                line,
            });
        }
        if let Err(e) = self.flush(&mut buf, &mut batch, &mut out) {
            let rest = batch
                .drain(..)
                .map(|s| (s.record.time_ns, s.record.body, s.record.previous_run))
                .collect();
            self.fail(rest, &mut out, e);
        }
        out
    }

    /// Appends `buf` (the lines of `batch`) in one write. On success the
    /// records are in the file and move to `out`; on failure the file is cut
    /// back to its last whole record and `batch` is left as it was.
    fn flush(
        &mut self,
        buf: &mut Vec<u8>,
        batch: &mut Vec<Sealed>,
        out: &mut Written,
    ) -> Result<(), AuditError> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Err(source) = self.file.write_all(buf) {
            // Part of `buf` may be in the file: cut it off now, or before
            // the next write if even that fails.
            self.torn = true;
            let _ = self.mend();
            return Err(AuditError::Write {
                path: self.path.clone(),
                source,
            });
        }
        self.size += buf.len() as u64;
        buf.clear();
        self.dirty = true;
        if let Some(last) = batch.last() {
            self.next_seq = last.record.seq + 1;
            self.chain.clone_from(&last.chain);
        }
        out.sealed.append(batch);
        Ok(())
    }

    /// Hands `records` back as failed, except `gap` records, which stay
    /// queued: a later write must still say where the trail broke.
    fn fail(&mut self, records: Vec<Queued>, out: &mut Written, error: AuditError) {
        for (time_ns, body, previous_run) in records {
            if matches!(body, Body::Gap { .. }) {
                self.queue.push((time_ns, body, previous_run));
            } else {
                out.failed.push((time_ns, body));
            }
        }
        out.error = Some(error);
    }

    /// Cuts a torn write off the end of the file.
    fn mend(&mut self) -> Result<(), AuditError> {
        if self.torn {
            self.file
                .set_len(self.size)
                .map_err(|source| AuditError::Write {
                    path: self.path.clone(),
                    source,
                })?;
            self.torn = false;
        }
        Ok(())
    }

    /// Makes sure that we append to the file at `audit.path`: when the one
    /// open was deleted, renamed, replaced or cut, opens `audit.path` and
    /// queues a `gap` record first.
    fn follow_path(&mut self) -> Result<(), AuditError> {
        let reason = match (fs::metadata(&self.path), self.id) {
            (Err(e), _) if e.kind() == io::ErrorKind::NotFound => Some(GapReason::Unlinked),
            (Err(source), _) => {
                return Err(AuditError::Open {
                    path: self.path.clone(),
                    source,
                });
            }
            (Ok(_), None) => None,
            (Ok(_), Some(id)) if !id.regular => return Ok(()),
            (Ok(m), Some(id)) if FileId::of(&m) != id => Some(GapReason::Replaced),
            (Ok(m), Some(_)) if m.len() < self.size => Some(GapReason::Truncated),
            (Ok(_), Some(_)) => return Ok(()),
        };
        repair_tail(&self.path)?;
        let (file, id, size) = open_at(&self.path)?;
        (self.file, self.id, self.size, self.torn) = (file, Some(id), size, false);
        if let Some(reason) = reason {
            tracing::warn!(
                path = %self.path.display(),
                reason = reason.name(),
                last_seq = self.next_seq - 1,
                "{}; appending to a file at the audit path again, after a gap record",
                reason.meaning()
            );
            self.queue.insert(
                0,
                (
                    record::now_ns(),
                    Body::Gap {
                        previous_seq: self.next_seq - 1,
                        previous_head: self.chain.clone(),
                        reason,
                    },
                    false,
                ),
            );
        }
        Ok(())
    }

    /// `fdatasync` if anything was written since the last one, then the
    /// head goes to `audit.state`.
    ///
    /// # Errors
    /// When the sync or the state file fails.
    pub fn sync(&mut self) -> Result<(), AuditError> {
        if self.dirty {
            self.file.sync_data().map_err(|source| AuditError::Sync {
                path: self.path.clone(),
                source,
            })?;
            self.dirty = false;
        }
        let last = self.next_seq - 1;
        let regular = self.id.is_none_or(|id| id.regular);
        if regular && last > 0 && self.persisted.is_none_or(|p| p < last) {
            let head = state::Head {
                seq: last,
                head: self.chain.clone(),
                updated: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            };
            state::store(&self.state, &self.path, head)?;
            self.persisted = Some(last);
        }
        Ok(())
    }

    /// Rotates, unless a failed rotation waits for its retry. A failure is
    /// logged and appending goes on in the current file: a file larger
    /// than `audit.rotate_bytes` loses nothing, a record not written does.
    fn rotate_when_due(&mut self) {
        let wait = match &self.rotate_retry {
            Some((at, _, _)) if Instant::now() < *at => return,
            Some((_, wait, _)) => *wait,
            None => ROTATE_RETRY.0,
        };
        match self.rotate() {
            Ok(()) => {
                if self.rotate_retry.take().is_some() {
                    tracing::info!(path = %self.path.display(), "audit file rotation works again");
                }
            }
            Err(e) => {
                tracing::warn!(
                    path = %self.path.display(),
                    error = %e,
                    retry_in = ?wait,
                    "cannot rotate the audit file; records go on into the current file"
                );
                self.rotate_retry = Some((
                    Instant::now() + wait,
                    (wait * 2).min(ROTATE_RETRY.1),
                    e.to_string(),
                ));
            }
        }
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
        // `PATH` is gone by our own hand: the next write opens a new one
        // without a gap, also if opening it here fails.
        self.id = None;
        // Files beyond `keep` (left by a larger `audit.keep`) go too.
        let mut n = keep + 1;
        while fs::remove_file(rotated(&self.path, n)).is_ok() {
            n += 1;
        }
        let (file, id, size) = open_at(&self.path)?;
        (self.file, self.id, self.size) = (file, Some(id), size);
        Ok(())
    }
}

/// Opens `path` for appending (creating it, durably): the file, which file
/// it is, and its size.
fn open_at(path: &Path) -> Result<(File, FileId, u64), AuditError> {
    let err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let file = open_append(path).map_err(err)?;
    let meta = file.metadata().map_err(err)?;
    sync_dir(path).map_err(err)?;
    Ok((file, FileId::of(&meta), meta.len()))
}

/// Where a trail goes on: the next seq, the chain value to link from, and
/// the `gap` record to lead with when the trail on disk ends before the
/// persisted head (or at the same seq with another chain value: a
/// different trail took its place).
fn continue_from(
    on_disk: Option<(u64, String)>,
    persisted: Option<&state::Head>,
) -> (u64, String, Option<Body>) {
    match (on_disk, persisted) {
        (Some((seq, chain)), Some(h)) if seq > h.seq || (seq == h.seq && chain == h.head) => {
            (seq + 1, chain, None)
        }
        (_, Some(h)) => (
            h.seq + 1,
            h.head.clone(),
            Some(Body::Gap {
                previous_seq: h.seq,
                previous_head: h.head.clone(),
                reason: GapReason::BehindState,
            }),
        ),
        (Some((seq, chain)), None) => (seq + 1, chain, None),
        (None, None) => (1, chain::GENESIS.to_owned(), None),
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
            .and_then(|v| super::verify::seq_of(&v))
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
            state: dir.join("audit.state"),
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
            w.append(1_000 + i64::try_from(i).unwrap_or(0), lost(i + 1));
            if i % 7 == 0 {
                written(&mut w);
            }
        }
        written(&mut w);
        w.sync().unwrap_or_else(|e| panic!("sync: {e}"));
    }

    /// Writes what is queued, which must all reach the file.
    fn written(w: &mut AuditWriter) -> Vec<Sealed> {
        let out = w.write();
        if let Some(e) = out.error {
            panic!("write: {e} ({} records failed)", out.failed.len());
        }
        out.sealed
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

    /// The gap records of `path`: seq, `previous_seq`, `previous_head`, reason.
    fn gaps(path: &Path) -> Vec<(u64, u64, String, GapReason)> {
        fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| match format::parse(l).ok()?.0 {
                Record {
                    seq,
                    body:
                        Body::Gap {
                            previous_seq,
                            previous_head,
                            reason,
                        },
                    ..
                } => Some((seq, previous_seq, previous_head, reason)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_file_deleted_under_the_writer_is_noticed_and_the_chain_goes_on() {
        let dir = TempDir::new("unlinked");
        let s = settings(&dir.0, 0, 1);
        let mut w = open(&s);
        for i in 1..=3 {
            w.append(i, lost(1));
        }
        let head = written(&mut w).pop().map(|s| s.chain).unwrap_or_default();
        fs::remove_file(&s.path).unwrap_or_else(|e| panic!("{e}"));
        w.append(4, lost(1));
        let sealed = written(&mut w);
        assert_eq!(
            gaps(&s.path),
            [(4, 3, head.clone(), GapReason::Unlinked)],
            "a new file at the path starts with a gap record naming the last one written"
        );
        assert_eq!(sealed.last().map(|s| s.record.seq), Some(5));
        let report =
            verify::verify(std::slice::from_ref(&s.path)).unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(report.problem, None);
        assert_eq!(report.previous, Some((3, head)));
        assert!(!report.from_start, "not complete: {report:?}");
        // A file put in its place is no more ours than none.
        let moved = dir.0.join("moved.jsonl");
        fs::rename(&s.path, &moved).unwrap_or_else(|e| panic!("{e}"));
        fs::write(&s.path, "").unwrap_or_else(|e| panic!("{e}"));
        w.append(6, lost(1));
        written(&mut w);
        assert_eq!(
            gaps(&s.path).first().map(|g| (g.0, g.1, g.3)),
            Some((6, 5, GapReason::Replaced))
        );
        // Cut short (as `: > audit.jsonl` or a copytruncate does).
        fs::write(&s.path, "").unwrap_or_else(|e| panic!("{e}"));
        w.append(8, lost(1));
        written(&mut w);
        assert_eq!(
            gaps(&s.path).first().map(|g| (g.0, g.1, g.3)),
            Some((8, 7, GapReason::Truncated))
        );
    }

    #[test]
    fn a_trail_deleted_while_no_daemon_ran_continues_from_the_state() {
        let dir = TempDir::new("state-head");
        let s = settings(&dir.0, 0, 1);
        write_records(&s, 5);
        let head = state::load(&s.state, &s.path)
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|| panic!("no head persisted"));
        assert_eq!(head.seq, 5, "the sync persisted the head");
        fs::remove_file(&s.path).unwrap_or_else(|e| panic!("{e}"));
        write_records(&s, 2);
        assert_eq!(seqs(&s.path), [6, 7, 8], "seq goes on, after a gap record");
        assert_eq!(
            gaps(&s.path),
            [(6, 5, head.head.clone(), GapReason::BehindState)]
        );
        let now = state::load(&s.state, &s.path)
            .ok()
            .flatten()
            .map(|h| (h.seq, h.head));
        let report = verify::verify_against(std::slice::from_ref(&s.path), now.as_ref())
            .unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(
            (report.problem, report.previous, report.state_checked),
            (None, Some((5, head.head)), true)
        );
        // The newest record removed: only the state can tell.
        let text = fs::read_to_string(&s.path).unwrap_or_default();
        let cut: String = text.lines().take(2).flat_map(|l| [l, "\n"]).collect();
        fs::write(&s.path, cut).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            verify::verify(std::slice::from_ref(&s.path))
                .map(|r| r.problem)
                .ok(),
            Some(None),
            "the files alone look fine"
        );
        let report = verify::verify_against(std::slice::from_ref(&s.path), now.as_ref())
            .unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!(
            report.problem.map(|p| p.fault),
            Some(verify::Fault::BehindState { last: 7, state: 8 })
        );
    }

    #[test]
    fn a_rotation_that_fails_loses_nothing_and_is_tried_again() {
        let dir = TempDir::new("rotate-fail");
        let s = settings(&dir.0, 4096, 1);
        // A directory with something in it where `PATH.1` must go: the
        // rename fails, for root too.
        let mut w = open(&s);
        let blocker = rotated(&s.path, 1);
        fs::create_dir_all(blocker.join("x")).unwrap_or_else(|e| panic!("{e}"));
        for i in 0..40 {
            w.append(i, lost(1));
            written(&mut w);
        }
        assert!(
            w.rotation_error().is_some_and(|e| e.contains(".1")),
            "{:?}",
            w.rotation_error()
        );
        assert_eq!(
            seqs(&s.path),
            (1..=40).collect::<Vec<_>>(),
            "every record went on into the current file"
        );
        fs::remove_dir_all(&blocker).unwrap_or_else(|e| panic!("{e}"));
        std::thread::sleep(ROTATE_RETRY.0 + Duration::from_millis(100));
        w.append(41, lost(1));
        written(&mut w);
        assert_eq!(w.rotation_error(), None, "the retry rotated");
        assert_eq!(seqs(&s.path), [41]);
        let report = verify::verify(&files(&s.path)).unwrap_or_else(|e| panic!("verify: {e}"));
        assert_eq!((report.problem, report.last_seq), (None, Some(41)));
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
