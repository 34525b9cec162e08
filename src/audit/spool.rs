//! The local spool: append-only JSON-lines segments (`spool-<seq>.jsonl`), written by one OS
//! thread with batched fsync, rotated by size, pruned by age and count once every sink has
//! shipped them; plus the reader the shippers and `idgate audit query --spool` use.
//!
//! Positions are `(segment, byte offset)`. The writer publishes the *durable* position (the end of
//! the last fsynced batch) and only that much is ever shipped, so a sink never holds an event the
//! spool could still lose. On open, a torn last line (a crash mid-write) is cut off and writing
//! continues in a new segment. Before every batch the writer checks that the segment file it holds
//! is still the one at its path (an operator may have moved or replaced the directory); if not, it
//! opens a new segment, and a failure there makes the spool unhealthy until a retry succeeds.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{atomic::Ordering, mpsc, Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::watch;

use super::{AuditEvent, Health};

/// A position in the spool.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct SpoolPos {
    /// Segment number.
    pub seq: u64,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// What the writer has made durable.
#[derive(Debug, Clone, Copy)]
pub struct Durable {
    /// End of the last fsynced batch.
    pub pos: SpoolPos,
    /// The writer has stopped; nothing more will come.
    pub closed: bool,
}

/// Shipped positions per sink (the writer prunes only what every sink has passed).
#[derive(Debug, Clone, Default)]
pub struct Cursors(Arc<Mutex<HashMap<String, SpoolPos>>>);

impl Cursors {
    /// Record `sink`'s position.
    pub fn set(&self, sink: &str, pos: SpoolPos) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(sink.to_owned(), pos);
        }
    }

    /// The lowest position over all sinks (`None` with no sink).
    fn min(&self) -> Option<SpoolPos> {
        self.0.lock().ok().and_then(|m| m.values().min().copied())
    }
}

/// The file name of segment `seq`.
pub fn segment_name(seq: u64) -> String {
    format!("spool-{seq:020}.jsonl")
}

/// Segments in `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(num) = name
            .strip_prefix("spool-")
            .and_then(|n| n.strip_suffix(".jsonl"))
        else {
            continue;
        };
        if let Ok(seq) = num.parse::<u64>() {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writer settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterSettings {
    /// Longest an event waits before its batch is fsynced.
    pub fsync_interval: Duration,
    /// Shipped segments older than this are deleted.
    pub retention: Duration,
    /// Shipped segments beyond this count are deleted.
    pub max_files: usize,
}

/// Mode of audit files: who connected from where is for the operator and the SIEM agent's group,
/// not for every local user.
pub const FILE_MODE: u32 = 0o640;
/// Mode of the directories idgate creates for audit data.
pub const DIR_MODE: u32 = 0o750;

/// `create_dir_all` with [`DIR_MODE`] for the directories it creates.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
}

/// The name of the lock file a writer holds in its spool directory.
pub const LOCK_FILE: &str = ".lock";

/// The segment writer (used by one thread only). It holds an exclusive lock on the spool
/// directory for as long as it lives: two gateways writing one spool would interleave segments
/// and overwrite each other's cursors.
pub struct SpoolWriter {
    _lock: File,
    dir: PathBuf,
    max_bytes: u64,
    /// Segment to write next (opened lazily).
    seq: u64,
    file: Option<(File, u64, u64)>, // (file, size, inode)
    durable: SpoolPos,
}

impl SpoolWriter {
    /// Create or recover the spool in `dir`; returns the writer and the durable position. An
    /// error of kind [`io::ErrorKind::WouldBlock`] means another writer holds the spool.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<(SpoolWriter, SpoolPos)> {
        create_private_dir(dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(dir.join(LOCK_FILE))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => io::Error::new(
                io::ErrorKind::WouldBlock,
                "another idgate process is writing this spool (give each gateway its own spool_dir)",
            ),
            fs::TryLockError::Error(e) => e,
        })?;
        let segments = list_segments(dir)?;
        let durable = match segments.last() {
            Some((seq, path)) => SpoolPos {
                seq: *seq,
                offset: cut_torn_line(path)?,
            },
            None => SpoolPos::default(),
        };
        let writer = SpoolWriter {
            _lock: lock,
            dir: dir.to_path_buf(),
            max_bytes,
            seq: durable.seq + 1,
            file: None,
            durable,
        };
        Ok((writer, durable))
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(segment_name(seq))
    }

    /// Make sure the open segment is still the file at its path; open a new one otherwise.
    fn ensure_open(&mut self) -> io::Result<()> {
        if let Some((_, _, ino)) = &self.file {
            let same = fs::metadata(self.path(self.seq)).is_ok_and(|m| m.ino() == *ino);
            if same {
                return Ok(());
            }
            self.file = None;
            self.seq += 1;
        }
        create_private_dir(&self.dir)?;
        if let Some((last, _)) = list_segments(&self.dir)?.last() {
            self.seq = self.seq.max(last + 1);
        }
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(FILE_MODE)
            .open(self.path(self.seq))?;
        let ino = file.metadata()?.ino();
        // The new directory entry must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.file = Some((file, 0, ino));
        Ok(())
    }

    /// Append `bytes` (complete lines) and fsync. On error nothing is considered written.
    pub fn write_batch(&mut self, bytes: &[u8]) -> io::Result<SpoolPos> {
        self.ensure_open()?;
        let Some((file, size, _)) = self.file.as_mut() else {
            return Err(io::Error::other("spool segment not open"));
        };
        let result = file.write_all(bytes).and_then(|()| file.sync_data());
        if let Err(e) = result {
            // Cut a partial write off; if even that fails, never append to this file again.
            if file.set_len(*size).is_err() {
                self.file = None;
                self.seq += 1;
            }
            return Err(e);
        }
        *size += bytes.len() as u64;
        self.durable = SpoolPos {
            seq: self.seq,
            offset: *size,
        };
        if *size >= self.max_bytes {
            self.file = None;
            self.seq += 1;
        }
        Ok(self.durable)
    }

    /// Whether the spool directory can be written now (checks the open segment, or creates one).
    pub fn probe(&mut self) -> io::Result<()> {
        self.ensure_open()
    }

    /// Delete shipped segments past the retention age or the count limit.
    fn prune(&self, settings: &WriterSettings, shipped: Option<SpoolPos>) -> io::Result<()> {
        let segments = list_segments(&self.dir)?;
        let total = segments.len();
        let now = SystemTime::now();
        for (i, (seq, path)) in segments.iter().enumerate() {
            let fully_shipped = shipped.is_none_or(|p| *seq < p.seq);
            if !fully_shipped || *seq >= self.durable.seq || *seq >= self.seq {
                break;
            }
            let old = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > settings.retention);
            if old || total - i > settings.max_files {
                fs::remove_file(path)?;
            }
        }
        Ok(())
    }
}

/// Cut a torn last line off `path`; returns the new length.
fn cut_torn_line(path: &Path) -> io::Result<u64> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    let tail = len.min(1 << 20);
    file.seek(SeekFrom::Start(len - tail))?;
    let mut buf = Vec::with_capacity(tail as usize);
    file.read_to_end(&mut buf)?;
    let keep = match buf.iter().rposition(|b| *b == b'\n') {
        Some(i) => len - tail + i as u64 + 1,
        None if tail == len => 0,
        None => len,
    };
    if keep != len {
        tracing::warn!(path = %path.display(), cut = len - keep, "audit spool: cut a torn last line");
        file.set_len(keep)?;
        file.sync_all()?;
    }
    Ok(keep)
}

/// Events kept in memory while the spool is unwritable, at most.
const MAX_PENDING_BYTES: usize = 64 << 20;
/// How often an idle or failing writer checks the directory.
const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How often shipped segments are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(30);
/// After the last handle is gone, how long a failing spool is retried.
const CLOSE_RETRY: Duration = Duration::from_secs(3);

/// The writer thread: batch, write, fsync, publish; retry while the spool is unwritable.
pub(crate) fn run_writer(
    rx: mpsc::Receiver<AuditEvent>,
    mut w: SpoolWriter,
    settings: WriterSettings,
    health: Arc<Health>,
    cursors: Cursors,
    durable_tx: watch::Sender<Durable>,
) {
    let counters = &health.counters;
    let mut pending: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut pending_events = 0u64;
    let mut closed = false;
    let mut closed_at: Option<Instant> = None;
    let mut last_prune = Instant::now();
    let push = |e: AuditEvent, pending: &mut Vec<u8>, n: &mut u64| {
        if pending.len() > MAX_PENDING_BYTES {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if serde_json::to_writer(&mut *pending, &e).is_ok() {
            pending.push(b'\n');
            *n += 1;
        }
    };
    loop {
        if pending.is_empty() && !closed {
            match rx.recv_timeout(PROBE_EVERY) {
                Ok(e) => push(e, &mut pending, &mut pending_events),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let ok = w.probe();
                    set_health(&health, ok.as_ref().err());
                    if last_prune.elapsed() > PRUNE_EVERY {
                        last_prune = Instant::now();
                        if let Err(e) = w.prune(&settings, cursors.min()) {
                            tracing::warn!(error = %e, "audit spool: pruning failed");
                        }
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
            }
            // Gather for at most fsync_interval: this is the bounded fsync delay.
            let deadline = Instant::now() + settings.fsync_interval;
            while !closed {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                match rx.recv_timeout(deadline - now) {
                    Ok(e) => push(e, &mut pending, &mut pending_events),
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => closed = true,
                }
            }
        } else if !closed {
            // Failing: take what arrived meanwhile, then retry.
            while let Ok(e) = rx.try_recv() {
                push(e, &mut pending, &mut pending_events);
            }
        }
        if closed {
            while let Ok(e) = rx.try_recv() {
                push(e, &mut pending, &mut pending_events);
            }
        }
        if !pending.is_empty() {
            let before = w.seq;
            match w.write_batch(&pending) {
                Ok(pos) => {
                    counters
                        .spooled
                        .fetch_add(pending_events, Ordering::Relaxed);
                    pending.clear();
                    pending_events = 0;
                    set_health(&health, None);
                    durable_tx.send_modify(|d| d.pos = pos);
                    if w.seq != before {
                        let _ = w.prune(&settings, cursors.min());
                    }
                }
                Err(e) => {
                    counters.spool_errors.fetch_add(1, Ordering::Relaxed);
                    set_health(&health, Some(&e));
                    let since = *closed_at.get_or_insert_with(Instant::now);
                    if closed && since.elapsed() > CLOSE_RETRY {
                        tracing::error!(
                            events = pending_events,
                            "audit spool unwritable at shutdown; events lost"
                        );
                        counters
                            .dropped
                            .fetch_add(pending_events, Ordering::Relaxed);
                        break;
                    }
                    if !closed {
                        closed_at = None;
                    }
                    std::thread::sleep(PROBE_EVERY);
                    continue;
                }
            }
        }
        if closed && pending.is_empty() {
            break;
        }
    }
    durable_tx.send_modify(|d| d.closed = true);
}

fn set_health(health: &Health, error: Option<&io::Error>) {
    let was = health.healthy.swap(error.is_none(), Ordering::Relaxed);
    match (was, error) {
        (true, Some(e)) => tracing::error!(error = %e, "audit spool cannot be written"),
        (false, None) => tracing::info!("audit spool is writable again"),
        _ => {}
    }
}

/// Read up to `max` complete lines from `from`, never past `durable`. Returns the lines and the
/// position after the last one returned.
pub fn read_batch(
    dir: &Path,
    from: SpoolPos,
    durable: SpoolPos,
    max: usize,
) -> io::Result<(Vec<Vec<u8>>, SpoolPos)> {
    let segments = list_segments(dir)?;
    let mut cur = from;
    let mut lines = Vec::new();
    loop {
        if !segments.iter().any(|(s, _)| *s == cur.seq) {
            match segments
                .iter()
                .find(|(s, _)| *s > cur.seq && *s <= durable.seq)
            {
                Some((s, _)) => cur = SpoolPos { seq: *s, offset: 0 },
                None => return Ok((lines, cur)),
            }
        }
        if cur.seq > durable.seq {
            return Ok((lines, cur));
        }
        let path = dir.join(segment_name(cur.seq));
        let mut file = File::open(&path)?;
        let limit = if cur.seq == durable.seq {
            durable.offset
        } else {
            file.metadata()?.len()
        };
        if cur.offset < limit {
            let want = (limit - cur.offset).min(4 << 20);
            file.seek(SeekFrom::Start(cur.offset))?;
            let mut buf = Vec::with_capacity(want as usize);
            file.take(want).read_to_end(&mut buf)?;
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|b| *b == b'\n') {
                lines.push(buf[start..start + nl].to_vec());
                start += nl + 1;
                if lines.len() >= max {
                    break;
                }
            }
            cur.offset += start as u64;
            if lines.len() >= max || cur.offset < limit {
                return Ok((lines, cur));
            }
        }
        // At the end of this segment: move on only if the writer is past it.
        if cur.seq >= durable.seq {
            return Ok((lines, cur));
        }
        match segments.iter().find(|(s, _)| *s > cur.seq) {
            Some((s, _)) => cur = SpoolPos { seq: *s, offset: 0 },
            None => return Ok((lines, cur)),
        }
    }
}

fn cursor_path(dir: &Path, sink: &str) -> PathBuf {
    dir.join("cursors").join(format!("{sink}.json"))
}

/// The persisted position of `sink` (the start of the spool when there is none).
pub fn load_cursor(dir: &Path, sink: &str) -> SpoolPos {
    fs::read(cursor_path(dir, sink))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Persist `sink`'s position atomically (write, fsync, rename).
pub fn save_cursor(dir: &Path, sink: &str, pos: SpoolPos) -> io::Result<()> {
    let path = cursor_path(dir, sink);
    let parent = dir.join("cursors");
    create_private_dir(&parent)?;
    let tmp = parent.join(format!(".{sink}.tmp"));
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(&pos).map_err(io::Error::other)?)?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    File::open(&parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_files_and_directories_are_not_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("spool");
        let (mut w, _) = SpoolWriter::open(&dir, 4096).unwrap();
        let pos = w.write_batch(b"{}\n").unwrap();
        save_cursor(&dir, "file", pos).unwrap();
        // At most these modes (a stricter umask may take more away), and nothing for others.
        let at_most = |p: &Path, max: u32| {
            let mode = fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode & !max, 0, "{}: {mode:o}", p.display());
            assert_eq!(mode & 0o600, 0o600, "{}: {mode:o}", p.display());
        };
        at_most(&dir, DIR_MODE);
        at_most(&dir.join(segment_name(pos.seq)), FILE_MODE);
        at_most(&dir.join(LOCK_FILE), FILE_MODE);
        at_most(&cursor_path(&dir, "file"), FILE_MODE);
    }

    #[test]
    fn one_writer_per_spool_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = SpoolWriter::open(dir.path(), 4096).unwrap();
        let err = SpoolWriter::open(dir.path(), 4096).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("own spool_dir"), "{err}");
        drop(first);
        assert!(SpoolWriter::open(dir.path(), 4096).is_ok());
    }

    #[test]
    fn prune_deletes_only_shipped_segments_past_the_count_or_age() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, _) = SpoolWriter::open(dir.path(), 16).unwrap();
        let mut positions = Vec::new();
        for n in 0..6 {
            // Each batch is larger than max_bytes: one segment per batch.
            positions.push(
                w.write_batch(format!("{{\"n\":{n:020}}}\n").as_bytes())
                    .unwrap(),
            );
        }
        let seqs =
            |d: &Path| -> Vec<u64> { list_segments(d).unwrap().iter().map(|(s, _)| *s).collect() };
        assert_eq!(seqs(dir.path()).len(), 6);
        let keep_all = WriterSettings {
            fsync_interval: Duration::from_millis(10),
            retention: Duration::from_secs(3600),
            max_files: 3,
        };
        // A sink has shipped only the first two segments: nothing past them is deleted.
        w.prune(&keep_all, Some(positions[2])).unwrap();
        assert_eq!(
            seqs(dir.path()),
            [
                positions[2].seq,
                positions[3].seq,
                positions[4].seq,
                positions[5].seq
            ]
        );
        // Everything shipped: the count limit keeps the newest three (the open one among them).
        w.prune(&keep_all, Some(positions[5])).unwrap();
        assert_eq!(
            seqs(dir.path()),
            [positions[3].seq, positions[4].seq, positions[5].seq]
        );
        // Past the retention age, shipped segments go even under the count limit; the open one
        // stays.
        let expired = WriterSettings {
            retention: Duration::ZERO,
            max_files: 100,
            ..keep_all
        };
        std::thread::sleep(Duration::from_millis(20));
        w.prune(&expired, Some(positions[5])).unwrap();
        assert_eq!(seqs(dir.path()), [positions[5].seq]);
    }

    #[test]
    fn torn_line_is_cut_and_reading_resumes_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut w, start) = SpoolWriter::open(dir.path(), 4096).unwrap();
        assert_eq!(start, SpoolPos::default());
        let a = w.write_batch(b"{\"n\":1}\n{\"n\":2}\n").unwrap();
        let (lines, pos) = read_batch(dir.path(), SpoolPos::default(), a, 1).unwrap();
        assert_eq!(lines, vec![b"{\"n\":1}".to_vec()]);
        let (lines, pos) = read_batch(dir.path(), pos, a, 10).unwrap();
        assert_eq!(lines, vec![b"{\"n\":2}".to_vec()]);
        assert_eq!(pos, a);
        drop(w);
        // A crash mid-line.
        let seg = dir.path().join(segment_name(a.seq));
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(b"{\"n\":3").unwrap();
        let (mut w, recovered) = SpoolWriter::open(dir.path(), 4096).unwrap();
        assert_eq!(recovered, a);
        let b = w.write_batch(b"{\"n\":4}\n").unwrap();
        assert_eq!(b.seq, a.seq + 1);
        let (lines, end) = read_batch(dir.path(), pos, b, 10).unwrap();
        assert_eq!(lines, vec![b"{\"n\":4}".to_vec()]);
        assert_eq!(end, b);
        save_cursor(dir.path(), "pg", end).unwrap();
        assert_eq!(load_cursor(dir.path(), "pg"), end);
    }

    #[test]
    fn rotation_by_size_and_replaced_directory_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let (mut w, _) = SpoolWriter::open(&spool, 4096).unwrap();
        let line = format!("{{\"pad\":\"{}\"}}\n", "x".repeat(3000));
        let a = w.write_batch(line.as_bytes()).unwrap();
        let b = w.write_batch(line.as_bytes()).unwrap();
        assert_eq!(b.seq, a.seq, "under the limit: same segment");
        let c = w.write_batch(line.as_bytes()).unwrap();
        assert_eq!(c.seq, a.seq + 1, "past the limit: a new segment");
        let (lines, _) = read_batch(&spool, SpoolPos::default(), c, 100).unwrap();
        assert_eq!(lines.len(), 3);
        fs::rename(&spool, dir.path().join("moved")).unwrap();
        fs::write(&spool, b"not a directory").unwrap();
        assert!(w.write_batch(b"{}\n").is_err());
        assert!(w.probe().is_err());
        fs::remove_file(&spool).unwrap();
        fs::rename(dir.path().join("moved"), &spool).unwrap();
        let d = w.write_batch(b"{}\n").unwrap();
        assert!(d.seq > c.seq);
    }
}
