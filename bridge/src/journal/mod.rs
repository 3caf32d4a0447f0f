//! The spool's write-ahead journal: one device flush per received instance instead of two.
//!
//! Making a new file durable on ext4 costs two journal commits (the file's data and size, then the
//! directory entry after the rename), each ending in a device flush; the C-STORE sender waits for
//! them before it sends the next instance. [`Journal::commit`] instead appends the instance as one
//! record to a preallocated, zero-filled segment file and calls `fdatasync` on it: the append
//! changes neither the file's size nor its allocation, so that sync writes the data blocks and
//! flushes the device once, with no metadata commit. Only then does it write the instance's
//! spool file (temp file + rename, no fsync: page cache) and return. A background flusher later
//! makes the materialised files durable (`fdatasync` of each, `fsync` of their directories, or
//! `syncfs` if one was moved meanwhile) and only then frees the segment by writing a new
//! generation into its header.
//!
//! Durability claims:
//! - When [`Journal::commit`] returns `Ok`, the instance is durable: its record is on the disk
//!   (crc32-checked) in a segment whose header names the record's generation, and its spool file
//!   exists (possibly only in the page cache). After a crash or `SIGKILL`, [`Journal::open`]
//!   replays every valid record of every segment no live journal holds, oldest generation first,
//!   rewriting the spool files, syncs them and their directories, and only then resets the
//!   segments. A record cut short by the crash (torn tail) fails its crc and is ignored: its
//!   `commit` never returned, so nothing was acknowledged.
//! - A segment's header changes only after every file journaled in it was synced, so replay never
//!   needs a record that was dropped. Records start on 4 KiB boundaries, so writing a record never
//!   rewrites a block holding an earlier one.
//! - Instances too large for a segment are written the slow way (temp file + fdatasync + rename +
//!   directory fsync) after a full checkpoint, so an older journaled copy can never be replayed
//!   over them.
//! - A spool file moved away by its consumer before the flusher ran (the assembler waits for a
//!   quiet period of seconds, the flusher runs within [`JournalConfig::checkpoint_after`]) is synced
//!   with `syncfs`; after a crash in that window its record would be replayed into the spool again
//!   (at-least-once delivery, never loss).
//!
//! Each journal holds its segment files under `flock`, so several journals (in one process or in
//! several) can share a spool; segments of a dead process are replayed by the next opener.
//!
//! Segment layout (little-endian): a 4 KiB header `"CSJSEG01"`, generation `u64`, crc32 of those
//! 16 bytes; then records at 4 KiB-aligned offsets: magic `u32` ([`RECORD_MAGIC`]), generation
//! `u64`, path length `u32`, data length `u64`, crc32 `u32` of generation, lengths, path and data;
//! then the path (relative to the spool, UTF-8) and the data. See [`encode_record`].

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use cosilo_hardware::durable::sync_dir;

mod record;

use record::{align, checked_rel, header_bytes, read_records, Record};
pub use record::{encode_record, scan_segment, SegmentScan};

/// Bytes reserved for a segment's header; records start here.
pub const SEGMENT_HEADER_BYTES: u64 = 4096;
/// Records start at multiples of this.
pub const RECORD_ALIGN: u64 = 4096;
/// The first four bytes of every record.
pub const RECORD_MAGIC: u32 = 0x3152_4a43; // "CJR1"
/// Bytes of a record before its path.
pub const RECORD_HEADER_BYTES: usize = 28;
const SEGMENT_MAGIC: &[u8; 8] = b"CSJSEG01";
const SEGMENT_EXT: &str = "cjs";
/// Name of the journal's folder inside the spool.
pub const JOURNAL_DIR: &str = ".journal";

/// Sizes and timing of a journal.
#[derive(Debug, Clone)]
pub struct JournalConfig {
    /// Size of each of the two segment files (zero-filled at creation). An instance larger than
    /// this (less the 4 KiB header) is written the slow way.
    pub segment_bytes: u64,
    /// The flusher checkpoints the active segment this long after its first record (or as soon as
    /// it is half full).
    pub checkpoint_after: Duration,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig {
            segment_bytes: 16 << 20,
            checkpoint_after: Duration::from_millis(200),
        }
    }
}

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The journal folder or a segment could not be created or preallocated.
    #[error("cannot create journal segment {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    /// An existing segment could not be opened, locked or read.
    #[error("cannot read journal segment {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Appending a record (write + fdatasync) failed.
    #[error("cannot append to journal segment {path}: {source}")]
    Append {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Writing an instance's spool file failed.
    #[error("cannot write {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Syncing materialised files or resetting a segment failed.
    #[error("cannot checkpoint journal segment {path}: {source}")]
    Checkpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A record's path is not a plain relative path.
    #[error("journal path {0:?} is not a relative path inside the spool")]
    BadPath(String),
    /// The flusher thread could not be started.
    #[error("cannot start the journal flusher: {0}")]
    Spawn(std::io::Error),
}

impl JournalError {
    /// The file concerned and the underlying I/O error (for callers with an I/O error type).
    pub fn into_parts(self) -> (PathBuf, std::io::Error) {
        match self {
            JournalError::Create { path, source }
            | JournalError::Read { path, source }
            | JournalError::Append { path, source }
            | JournalError::WriteFile { path, source }
            | JournalError::Checkpoint { path, source } => (path, source),
            JournalError::BadPath(p) => (
                PathBuf::from(&p),
                std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a relative path"),
            ),
            JournalError::Spawn(e) => (PathBuf::from("journal flusher"), e),
        }
    }
}

/// How [`Journal::commit`] made an instance durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Appended to the journal (one fdatasync); the file is synced later by the flusher.
    Journaled,
    /// Too large for a segment: written with its own fsyncs.
    Direct,
}

/// What [`Journal::open`] found from before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Segments of a previous run (no live journal held them).
    pub segments: usize,
    /// Valid records rewritten to their spool files.
    pub records: usize,
}

fn flock_exclusive(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

fn syncfs(dir: &Path) -> std::io::Result<()> {
    let f = File::open(dir)?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(f.as_raw_fd()) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One preallocated segment file, locked by this journal.
#[derive(Debug)]
struct Segment {
    file: File,
    path: PathBuf,
    generation: u64,
    /// Where the next record goes; `SEGMENT_HEADER_BYTES` when empty.
    tail: u64,
    /// Spool files journaled in this segment (absolute paths), to sync at checkpoint.
    files: Vec<PathBuf>,
    first_at: Option<Instant>,
}

impl Segment {
    fn is_empty(&self) -> bool {
        self.tail == SEGMENT_HEADER_BYTES
    }
}

#[derive(Debug)]
struct State {
    segs: [Segment; 2],
    active: usize,
    stopping: bool,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    dir: PathBuf,
    cfg: JournalConfig,
    state: Mutex<State>,
    changed: Condvar,
    next_gen: AtomicU64,
    tmp_counter: AtomicU64,
}

/// The write-ahead journal of one spool directory (see the module documentation).
#[derive(Debug)]
pub struct Journal {
    inner: Arc<Inner>,
    flusher: Option<JoinHandle<()>>,
    replay: Replay,
}

impl Journal {
    /// Opens the journal of the spool `root` (under `root/.journal`): replays and syncs what a
    /// previous run left, then takes two clean segments and starts the flusher.
    pub fn open(root: &Path, cfg: JournalConfig) -> Result<Journal, JournalError> {
        let dir = root.join(JOURNAL_DIR);
        let create = |path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Create { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(create(&dir))?;
        let cfg = JournalConfig {
            segment_bytes: align(cfg.segment_bytes.max(SEGMENT_HEADER_BYTES + RECORD_ALIGN)),
            ..cfg
        };
        // Segments nobody holds: a previous run's.
        let mut orphans = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|source| JournalError::Read {
            path: dir.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != SEGMENT_EXT && ext != "tmp" {
                continue;
            }
            let read_err = |source| JournalError::Read {
                path: path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(read_err)?;
            if !flock_exclusive(&file).map_err(read_err)? {
                continue; // a live journal's
            }
            if ext == "tmp" {
                // A segment whose creation was interrupted: never held records.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            orphans.push((path, file));
        }
        let mut replay = Replay::default();
        let mut max_gen = 0u64;
        let mut pending: Vec<(u64, Vec<Record>)> = Vec::new();
        for (path, file) in &orphans {
            let (gen, records, _) = read_records(file, path, true)?;
            replay.segments += 1;
            if let Some(g) = gen {
                max_gen = max_gen.max(g);
                pending.push((g, records));
            }
        }
        pending.sort_by_key(|(g, _)| *g);
        let mut written = Vec::new();
        let counter = AtomicU64::new(0);
        for (_, records) in pending {
            for (_, rel, data) in records {
                let target = root.join(checked_rel(&rel)?);
                write_file(&target, &data, false, &counter)?;
                written.push(target);
                replay.records += 1;
            }
        }
        if !written.is_empty() {
            sync_files(root, &written).map_err(|source| JournalError::Checkpoint {
                path: root.to_path_buf(),
                source,
            })?;
            info!(records = replay.records, segments = replay.segments, spool = %root.display(),
                "journal replayed after an unclean stop");
        }
        let next_gen = AtomicU64::new(max_gen + 1);
        // Reuse up to two orphans of the right size; remove the rest.
        let mut segs = Vec::new();
        for (path, file) in orphans {
            let right_size = file.metadata().map(|m| m.len()).ok() == Some(cfg.segment_bytes);
            if segs.len() < 2 && right_size {
                let generation = next_gen.fetch_add(1, Ordering::SeqCst);
                write_header(&file, generation).map_err(|source| JournalError::Checkpoint {
                    path: path.clone(),
                    source,
                })?;
                segs.push(Segment {
                    file,
                    path,
                    generation,
                    tail: SEGMENT_HEADER_BYTES,
                    files: Vec::new(),
                    first_at: None,
                });
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        while segs.len() < 2 {
            let generation = next_gen.fetch_add(1, Ordering::SeqCst);
            segs.push(create_segment(&dir, cfg.segment_bytes, generation)?);
        }
        sync_dir(&dir).map_err(create(&dir))?;
        let mut segs = segs.into_iter();
        let (Some(a), Some(b)) = (segs.next(), segs.next()) else {
            return Err(JournalError::Create {
                path: dir,
                source: std::io::Error::other("no segment"),
            });
        };
        let inner = Arc::new(Inner {
            root: root.to_path_buf(),
            dir,
            cfg,
            state: Mutex::new(State {
                segs: [a, b],
                active: 0,
                stopping: false,
            }),
            changed: Condvar::new(),
            next_gen,
            tmp_counter: counter,
        });
        let thread_inner = inner.clone();
        let flusher = std::thread::Builder::new()
            .name("spool-journal".into())
            .spawn(move || flusher_loop(&thread_inner))
            .map_err(JournalError::Spawn)?;
        Ok(Journal {
            inner,
            flusher: Some(flusher),
            replay,
        })
    }

    /// What opening found from a previous run.
    pub fn replayed(&self) -> &Replay {
        &self.replay
    }

    /// The folder holding the segment files.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Makes `data` durable as the file `rel_path` (relative to the spool): appended to the
    /// journal and synced, then written to its file without a sync. Returns once durable.
    pub fn commit(&self, rel_path: &str, data: &[u8]) -> Result<Committed, JournalError> {
        let target = self.inner.root.join(checked_rel(rel_path)?);
        let need = align(RECORD_HEADER_BYTES as u64 + rel_path.len() as u64 + data.len() as u64);
        let inner = &self.inner;
        if need > inner.cfg.segment_bytes - SEGMENT_HEADER_BYTES {
            // Too large: checkpoint everything first so no older copy can be replayed over it.
            self.checkpoint()?;
            write_file(&target, data, true, &inner.tmp_counter)?;
            return Ok(Committed::Direct);
        }
        let mut st = inner.lock();
        loop {
            let a = st.active;
            if st.segs[a].tail + need <= inner.cfg.segment_bytes {
                break;
            }
            let other = 1 - a;
            if st.segs[other].is_empty() {
                st.active = other;
                inner.changed.notify_all();
                break;
            }
            // Both busy: wait for the flusher to free the other one.
            inner.changed.notify_all();
            st = inner
                .changed
                .wait_timeout(st, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let a = st.active;
        let seg = &mut st.segs[a];
        let record = encode_record(seg.generation, rel_path, data);
        let append_err = |source| JournalError::Append {
            path: seg.path.clone(),
            source,
        };
        seg.file
            .write_all_at(&record, seg.tail)
            .map_err(append_err)?;
        seg.file.sync_data().map_err(append_err)?;
        seg.tail += need;
        let first = seg.first_at.is_none();
        seg.first_at.get_or_insert_with(Instant::now);
        // Durable from here on; the file itself only needs to exist.
        write_file(&target, data, false, &inner.tmp_counter)?;
        seg.files.push(target);
        let due =
            seg.tail - SEGMENT_HEADER_BYTES >= (inner.cfg.segment_bytes - SEGMENT_HEADER_BYTES) / 2;
        drop(st);
        if due || first {
            inner.changed.notify_all();
        }
        Ok(Committed::Journaled)
    }

    /// Syncs every journaled file and frees both segments (what the flusher does in the
    /// background). After it returns, the spool files alone hold everything committed before.
    pub fn checkpoint(&self) -> Result<(), JournalError> {
        let inner = &self.inner;
        let mut st = inner.lock();
        // Wait for a checkpoint the flusher is running to finish, then do the rest here.
        for idx in [1 - st.active, st.active] {
            loop {
                if st.segs[idx].is_empty() {
                    break;
                }
                if st.segs[idx].files.is_empty() && st.segs[idx].first_at.is_none() {
                    // The flusher took the files and is syncing them.
                    st = inner
                        .changed
                        .wait_timeout(st, Duration::from_millis(50))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    continue;
                }
                let files = std::mem::take(&mut st.segs[idx].files);
                let first_at = st.segs[idx].first_at.take();
                if let Err(e) = checkpoint_segment(inner, &mut st, idx, &files) {
                    // Keep them for the flusher's next try (or the next open's replay).
                    st.segs[idx].files = files;
                    st.segs[idx].first_at = first_at.or_else(|| Some(Instant::now()));
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Syncs `files` and their directories, writes a new generation into segment `idx`'s header and
/// marks it empty. Called with the lock held (from [`Journal::checkpoint`]).
fn checkpoint_segment(
    inner: &Inner,
    st: &mut State,
    idx: usize,
    files: &[PathBuf],
) -> Result<(), JournalError> {
    let seg = &mut st.segs[idx];
    let ck_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Checkpoint { path, source }
    };
    sync_files(&inner.root, files).map_err(ck_err(&inner.root))?;
    let generation = inner.next_gen.fetch_add(1, Ordering::SeqCst);
    write_header(&seg.file, generation).map_err(ck_err(&seg.path))?;
    seg.generation = generation;
    seg.tail = SEGMENT_HEADER_BYTES;
    seg.files.clear();
    seg.first_at = None;
    inner.changed.notify_all();
    Ok(())
}

fn flusher_loop(inner: &Inner) {
    let mut st = inner.lock();
    loop {
        // A segment to checkpoint: a full inactive one, or the active one when due.
        let inactive = 1 - st.active;
        let target = if !st.segs[inactive].is_empty() && st.segs[inactive].first_at.is_some() {
            Some(inactive)
        } else {
            let act = &st.segs[st.active];
            let half = (inner.cfg.segment_bytes - SEGMENT_HEADER_BYTES) / 2;
            let due = act
                .first_at
                .is_some_and(|t| t.elapsed() >= inner.cfg.checkpoint_after || st.stopping)
                || act.tail - SEGMENT_HEADER_BYTES >= half;
            if due && !act.is_empty() && st.segs[inactive].is_empty() {
                let old = st.active;
                st.active = inactive;
                Some(old)
            } else {
                None
            }
        };
        let Some(idx) = target else {
            if st.stopping {
                return;
            }
            let wait = st.segs[st.active]
                .first_at
                .map(|t| inner.cfg.checkpoint_after.saturating_sub(t.elapsed()))
                .unwrap_or(Duration::from_secs(3600))
                .max(Duration::from_millis(1));
            st = inner
                .changed
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            continue;
        };
        // Sync outside the lock: appends continue in the other segment meanwhile.
        let files = std::mem::take(&mut st.segs[idx].files);
        st.segs[idx].first_at = None;
        let (file, path) = match st.segs[idx].file.try_clone() {
            Ok(f) => (f, st.segs[idx].path.clone()),
            Err(e) => {
                warn!(error = %e, "journal checkpoint cannot start; retrying");
                st.segs[idx].files = files;
                st.segs[idx].first_at = Some(Instant::now());
                continue;
            }
        };
        drop(st);
        let t0 = Instant::now();
        let generation = inner.next_gen.fetch_add(1, Ordering::SeqCst);
        let result = sync_files(&inner.root, &files).and_then(|()| write_header(&file, generation));
        st = inner.lock();
        match result {
            Ok(()) => {
                let seg = &mut st.segs[idx];
                seg.generation = generation;
                seg.tail = SEGMENT_HEADER_BYTES;
                debug!(
                    files = files.len(),
                    ms = t0.elapsed().as_millis() as u64,
                    "journal checkpoint"
                );
            }
            Err(e) => {
                warn!(error = %e, segment = %path.display(), "journal checkpoint failed; retrying in 1 s");
                let seg = &mut st.segs[idx];
                seg.files.extend(files);
                seg.first_at = Some(Instant::now());
                if st.stopping {
                    // Left for the next open to replay.
                    return;
                }
                drop(st);
                std::thread::sleep(Duration::from_secs(1));
                st = inner.lock();
            }
        }
        inner.changed.notify_all();
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        {
            let mut st = self.inner.lock();
            st.stopping = true;
            self.inner.changed.notify_all();
        }
        if let Some(t) = self.flusher.take() {
            let _ = t.join();
        }
        if let Err(e) = self.checkpoint() {
            warn!(error = %e, "final journal checkpoint failed; the next open replays it");
        }
    }
}

/// Writes a segment's header (new generation) and syncs it.
fn write_header(file: &File, generation: u64) -> std::io::Result<()> {
    file.write_all_at(&header_bytes(generation), 0)?;
    file.sync_data()
}

/// Creates a zero-filled segment: written blocks, so later appends change no metadata.
fn create_segment(dir: &Path, size: u64, generation: u64) -> Result<Segment, JournalError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!(
        "{}-{}-{}",
        std::process::id(),
        stamp,
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let tmp = dir.join(format!("{name}.tmp"));
    let path = dir.join(format!("{name}.{SEGMENT_EXT}"));
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| JournalError::Create { path: p, source }
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(err(&tmp))?;
    if !flock_exclusive(&file).map_err(err(&tmp))? {
        return Err(err(&tmp)(std::io::Error::other(
            "segment locked by another",
        )));
    }
    let zero = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = zero.len().min((size - off) as usize);
        file.write_all_at(&zero[..n], off).map_err(err(&tmp))?;
        off += n as u64;
    }
    file.write_all_at(&header_bytes(generation), 0)
        .map_err(err(&tmp))?;
    file.sync_all().map_err(err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(err(&path))?;
    Ok(Segment {
        file,
        path,
        generation,
        tail: SEGMENT_HEADER_BYTES,
        files: Vec::new(),
        first_at: None,
    })
}

/// Writes `data` to `target` through a temp file and a rename; with `durable`, also fdatasync
/// the file and fsync its directory (and the parents it created).
pub(crate) fn write_file(
    target: &Path,
    data: &[u8],
    durable: bool,
    counter: &AtomicU64,
) -> Result<(), JournalError> {
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |source| JournalError::WriteFile { path: p, source }
    };
    let dir = target.parent().unwrap_or(Path::new("."));
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
        if durable {
            // The new folders' entries: parent and grandparent (study and spool).
            for d in dir.ancestors().skip(1).take(2) {
                sync_dir(d).map_err(err(d))?;
            }
        }
    }
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("instance");
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        counter.fetch_add(1, Ordering::Relaxed)
    ));
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_data()?;
        }
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(&tmp)(e));
    }
    std::fs::rename(&tmp, target).map_err(err(target))?;
    if durable {
        sync_dir(dir).map_err(err(dir))?;
    }
    Ok(())
}

/// Makes `files` and the directories leading to them durable. A file that is gone (moved by its
/// consumer) makes this fall back to `syncfs`, which covers wherever it went.
fn sync_files(root: &Path, files: &[PathBuf]) -> std::io::Result<()> {
    let mut dirs: Vec<&Path> = Vec::new();
    for f in files {
        match File::open(f) {
            Ok(h) => h.sync_data()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return syncfs(root),
            Err(e) => return Err(e),
        }
        let mut d = f.parent();
        while let Some(dir) = d {
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
            if dir == root {
                break;
            }
            d = dir.parent();
        }
    }
    for d in dirs {
        match sync_dir(d) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return syncfs(root),
            other => other?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> JournalConfig {
        JournalConfig {
            segment_bytes: 64 << 10,
            checkpoint_after: Duration::from_millis(20),
        }
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(
            d.path(),
            JournalConfig {
                checkpoint_after: Duration::from_secs(3600),
                ..small()
            },
        )
        .unwrap();
        j.commit("1.2/3.4/5.dcm", b"hello").unwrap();
        j.commit("1.2/3.4/6.dcm", &[7u8; 5000]).unwrap();
        let seg = std::fs::read_dir(j.dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                scan_segment(p)
                    .map(|s| !s.records.is_empty())
                    .unwrap_or(false)
            })
            .expect("a segment with records");
        let scan = scan_segment(&seg).unwrap();
        assert_eq!(scan.records.len(), 2);
        assert_eq!(scan.records[1].1, "1.2/3.4/6.dcm");
        assert_eq!(scan.records[1].2, 5000);
        // A torn record after them: header and half the data.
        let gen = scan.generation.unwrap();
        let rec = encode_record(gen, "1.2/3.4/7.dcm", &[9u8; 3000]);
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&rec[..1500], scan.tail).unwrap();
        assert_eq!(scan_segment(&seg).unwrap().records.len(), 2);
        // A record of another generation is not part of this one either.
        let stale = encode_record(gen + 7, "1.2/3.4/8.dcm", b"x");
        f.write_all_at(&stale, scan.tail).unwrap();
        assert_eq!(scan_segment(&seg).unwrap().records.len(), 2);
        std::mem::forget(j); // as if killed: no final checkpoint, segments stay
    }

    #[test]
    fn files_moved_away_before_the_checkpoint_are_synced_with_syncfs() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(
            d.path(),
            JournalConfig {
                checkpoint_after: Duration::from_secs(3600),
                ..small()
            },
        )
        .unwrap();
        j.commit("1.2/3.4/5.dcm", b"hello").unwrap();
        std::fs::create_dir_all(d.path().join("done/1.2")).unwrap();
        std::fs::rename(d.path().join("1.2/3.4"), d.path().join("done/1.2/3.4")).unwrap();
        std::fs::remove_dir(d.path().join("1.2")).unwrap();
        j.checkpoint().unwrap();
    }

    #[test]
    fn many_records_cycle_through_both_segments_and_large_ones_go_direct() {
        let d = tempfile::tempdir().unwrap();
        let j = Journal::open(d.path(), small()).unwrap();
        let mut journaled = 0;
        for i in 0..60u32 {
            let data = vec![(i % 251) as u8; 9000 + i as usize];
            if j.commit(&format!("1/2/{i}.dcm"), &data).unwrap() == Committed::Journaled {
                journaled += 1;
            }
        }
        assert_eq!(journaled, 60, "a 64 KiB segment holds 9 KB records");
        let big = vec![3u8; 100_000];
        assert_eq!(j.commit("1/2/big.dcm", &big).unwrap(), Committed::Direct);
        assert!(matches!(
            j.commit("../x.dcm", b"x"),
            Err(JournalError::BadPath(_))
        ));
        drop(j);
        for i in 0..60u32 {
            let got = std::fs::read(d.path().join(format!("1/2/{i}.dcm"))).unwrap();
            assert_eq!(got, vec![(i % 251) as u8; 9000 + i as usize]);
        }
        assert_eq!(std::fs::read(d.path().join("1/2/big.dcm")).unwrap(), big);
        // A clean stop leaves nothing to replay.
        let j = Journal::open(d.path(), small()).unwrap();
        assert_eq!(j.replayed().records, 0);
        assert_eq!(j.replayed().segments, 2, "the two segments are reused");
    }
}
