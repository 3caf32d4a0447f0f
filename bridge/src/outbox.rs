//! The persistent retry queue for write-back: results (DICOM SEG) waiting to be C-STOREd into the
//! hospital's PACS, surviving restarts and PACS outages.
//!
//! Layout under the outbox directory:
//! - `pending/<id>.dcm` + `pending/<id>.json`: the file to send and its [`OutboxItem`] record
//!   (destination, attempts, next attempt time, last error). The record is written after the file
//!   and marks the item as enqueued; a `.dcm` without a record (a crash mid-enqueue) is removed on
//!   [`Outbox::open`].
//! - `dead/<id>.dcm` + `dead/<id>.json`: items that failed [`RetryPolicy::max_attempts`] times, with
//!   the reason in the record.
//!
//! Every change is written to a temp file, fsynced, renamed and the directory fsynced, so
//! [`Outbox::enqueue`] returning `Ok` means the item survives a power cut. Retries back off
//! exponentially: `base_delay * 2^(attempts-1)`, capped at `max_delay`.
//!
//! An enqueue that would leave less free disk than the outbox's reserve
//! ([`Outbox::with_reserve_bytes`]) is refused with [`OutboxError::DiskReserve`] before anything
//! is written.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cosilo_hardware::clock::now_ms;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::scu::{self, PeerAe};

/// When to retry and when to give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts before an item goes to the dead-letter folder.
    pub max_attempts: u32,
    /// Delay after the first failure.
    pub base_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(3600),
        }
    }
}

impl RetryPolicy {
    /// The wait after the `attempts`-th failure.
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.base_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

/// The persisted record of one queued file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxItem {
    /// Unique id (also the file stem).
    pub id: String,
    /// Where to send it.
    pub destination: PeerAe,
    /// The original file name, for logs.
    pub source_name: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before this time (milliseconds since the Unix epoch).
    pub next_attempt_ms: u64,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// What one [`Outbox::run_once`] pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub sent: usize,
    /// Failed this pass and rescheduled.
    pub retried: usize,
    /// Moved to the dead-letter folder this pass.
    pub dead: usize,
    /// Not yet due.
    pub waiting: usize,
}

/// Errors of the outbox itself (a failed send is not an error: it is rescheduled).
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot create outbox directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list {path}: {source}")]
    List {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy {from} into the outbox: {source}")]
    Copy {
        from: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read outbox record {path}: {reason}")]
    ReadRecord { path: PathBuf, reason: String },
    #[error("{file} not queued, nothing written: {source}")]
    DiskReserve {
        file: PathBuf,
        source: cosilo_hardware::HardwareError,
    },
    #[error("cannot move {from} to {to}: {source}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        source: std::io::Error,
    },
}

/// The queue; see the module documentation for its layout and guarantees.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    policy: RetryPolicy,
    /// Free bytes an enqueue must leave on the outbox's disk.
    reserve_bytes: u64,
}

/// The outbox's default disk reserve: 256 MiB.
pub const DEFAULT_OUTBOX_RESERVE_BYTES: u64 = 256 << 20;

/// Bytes a record (`<id>.json`) and the temporary copies take beyond the file itself.
const RECORD_ALLOWANCE: u64 = 64 << 10;

fn fsync_dir(dir: &Path) -> Result<(), OutboxError> {
    cosilo_hardware::durable::sync_dir(dir).map_err(|source| OutboxError::Write {
        path: dir.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` atomically and durably (the caller fsyncs the directory).
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), OutboxError> {
    cosilo_hardware::durable::replace_file(path, bytes).map_err(|source| OutboxError::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl Outbox {
    /// Opens (creating if needed) the outbox at `dir` and removes leftovers of interrupted enqueues.
    pub fn open(dir: impl Into<PathBuf>, policy: RetryPolicy) -> Result<Outbox, OutboxError> {
        let dir = dir.into();
        for sub in ["pending", "dead"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p)
                .map_err(|source| OutboxError::CreateDir { path: p, source })?;
        }
        let ob = Outbox {
            dir,
            policy,
            reserve_bytes: DEFAULT_OUTBOX_RESERVE_BYTES,
        };
        let pending = ob.pending_dir();
        for entry in list(&pending)? {
            let ext = entry.extension().and_then(|e| e.to_str()).unwrap_or("");
            let orphan = match ext {
                "tmp" => true,
                "dcm" => !entry.with_extension("json").exists(),
                _ => false,
            };
            if orphan {
                warn!(file = %entry.display(), "removing an interrupted outbox entry");
                let _ = std::fs::remove_file(&entry);
            }
        }
        Ok(ob)
    }

    /// Sets the free space every enqueue must leave on the outbox's disk.
    pub fn with_reserve_bytes(mut self, bytes: u64) -> Outbox {
        self.reserve_bytes = bytes;
        self
    }

    /// The outbox's folder (callers may stage files here before [`Outbox::enqueue`]; only
    /// `pending/` and `dead/` belong to the queue).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pending_dir(&self) -> PathBuf {
        self.dir.join("pending")
    }

    /// The dead-letter folder.
    pub fn dead_dir(&self) -> PathBuf {
        self.dir.join("dead")
    }

    /// Copies `file` into the queue for `destination`; durable when this returns `Ok`.
    pub fn enqueue(&self, file: &Path, destination: &PeerAe) -> Result<OutboxItem, OutboxError> {
        let bytes = std::fs::read(file).map_err(|source| OutboxError::Copy {
            from: file.to_path_buf(),
            source,
        })?;
        cosilo_hardware::DiskReserve {
            path: self.dir.clone(),
            reserve_bytes: self.reserve_bytes,
        }
        .check(bytes.len() as u64 + RECORD_ALLOWANCE)
        .map_err(|source| OutboxError::DiskReserve {
            file: file.to_path_buf(),
            source,
        })?;
        let id = format!(
            "{:016x}-{:08x}-{:04x}",
            now_ms(),
            std::process::id(),
            rand_suffix()
        );
        let pending = self.pending_dir();
        write_durable(&pending.join(format!("{id}.dcm")), &bytes)?;
        let item = OutboxItem {
            id: id.clone(),
            destination: destination.clone(),
            source_name: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
        };
        self.write_record(&pending, &item)?;
        fsync_dir(&pending)?;
        info!(id = %item.id, file = %file.display(), destination = %destination.ae_title, "queued for write-back");
        Ok(item)
    }

    fn write_record(&self, dir: &Path, item: &OutboxItem) -> Result<(), OutboxError> {
        let json = serde_json::to_vec_pretty(item).map_err(|e| OutboxError::Write {
            path: dir.join(&item.id),
            source: std::io::Error::other(e),
        })?;
        write_durable(&dir.join(format!("{}.json", item.id)), &json)
    }

    /// The queued items, oldest first.
    pub fn pending(&self) -> Result<Vec<OutboxItem>, OutboxError> {
        read_records(&self.pending_dir())
    }

    /// The dead-letter items.
    pub fn dead(&self) -> Result<Vec<OutboxItem>, OutboxError> {
        read_records(&self.dead_dir())
    }

    /// Sends every due item once with [`scu::store`]; failures are rescheduled with backoff or,
    /// after the last attempt, moved to the dead-letter folder with the reason.
    pub fn run_once(&self) -> Result<RunReport, OutboxError> {
        let mut report = RunReport::default();
        let pending = self.pending_dir();
        let now = now_ms();
        for mut item in self.pending()? {
            if item.next_attempt_ms > now {
                report.waiting += 1;
                continue;
            }
            let file = pending.join(format!("{}.dcm", item.id));
            let error = match scu::store(&item.destination, std::slice::from_ref(&file)) {
                Ok(o) if o.failed.is_empty() && !o.stored.is_empty() => None,
                Ok(o) => Some(
                    o.failed
                        .first()
                        .map(|(_, why)| why.clone())
                        .unwrap_or_else(|| "not stored".into()),
                ),
                Err(e) => Some(e.to_string()),
            };
            match error {
                None => {
                    let _ = std::fs::remove_file(pending.join(format!("{}.json", item.id)));
                    let _ = std::fs::remove_file(&file);
                    fsync_dir(&pending)?;
                    info!(id = %item.id, destination = %item.destination.ae_title, "write-back sent");
                    report.sent += 1;
                }
                Some(why) => {
                    item.attempts += 1;
                    item.last_error = Some(why.clone());
                    if item.attempts >= self.policy.max_attempts {
                        self.bury(&item)?;
                        warn!(id = %item.id, attempts = item.attempts, reason = %why, "write-back given up");
                        report.dead += 1;
                    } else {
                        let delay = self.policy.delay_after(item.attempts);
                        item.next_attempt_ms = now_ms() + delay.as_millis() as u64;
                        self.write_record(&pending, &item)?;
                        fsync_dir(&pending)?;
                        warn!(id = %item.id, attempts = item.attempts, retry_in_s = delay.as_secs_f64(),
                            reason = %why, "write-back failed, will retry");
                        report.retried += 1;
                    }
                }
            }
        }
        Ok(report)
    }

    /// Moves an item to the dead-letter folder: record first (with the reason), then the file.
    fn bury(&self, item: &OutboxItem) -> Result<(), OutboxError> {
        let (pending, dead) = (self.pending_dir(), self.dead_dir());
        let from = pending.join(format!("{}.dcm", item.id));
        let to = dead.join(format!("{}.dcm", item.id));
        std::fs::rename(&from, &to).map_err(|source| OutboxError::Move {
            from: from.clone(),
            to: to.clone(),
            source,
        })?;
        self.write_record(&dead, item)?;
        fsync_dir(&dead)?;
        let _ = std::fs::remove_file(pending.join(format!("{}.json", item.id)));
        fsync_dir(&pending)
    }
}

fn rand_suffix() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static COUNTER: AtomicU16 = AtomicU16::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn list(dir: &Path) -> Result<Vec<PathBuf>, OutboxError> {
    let rd = std::fs::read_dir(dir).map_err(|source| OutboxError::List {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    v.sort();
    Ok(v)
}

fn read_records(dir: &Path) -> Result<Vec<OutboxItem>, OutboxError> {
    let mut out = Vec::new();
    for p in list(dir)? {
        if p.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let bytes = std::fs::read(&p).map_err(|e| OutboxError::ReadRecord {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let item: OutboxItem =
            serde_json::from_slice(&bytes).map_err(|e| OutboxError::ReadRecord {
                path: p.clone(),
                reason: e.to_string(),
            })?;
        out.push(item);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_secs(2),
            max_delay: Duration::from_secs(10),
        };
        assert_eq!(p.delay_after(1), Duration::from_secs(2));
        assert_eq!(p.delay_after(2), Duration::from_secs(4));
        assert_eq!(p.delay_after(3), Duration::from_secs(8));
        assert_eq!(p.delay_after(4), Duration::from_secs(10));
        assert_eq!(p.delay_after(40), Duration::from_secs(10));
    }

    #[test]
    fn failing_item_backs_off_then_dead_letters_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("x.dcm");
        std::fs::write(&src, b"not even dicom").unwrap();
        let policy = RetryPolicy {
            max_attempts: 2,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(1),
        };
        let ob = Outbox::open(d.path().join("ob"), policy).unwrap();
        let peer = PeerAe::new("PACS", "127.0.0.1:1", "COSILO");
        ob.enqueue(&src, &peer).unwrap();
        // A crash mid-enqueue leaves a file without a record: reopen removes it.
        std::fs::write(d.path().join("ob/pending/zz.dcm"), b"x").unwrap();
        let ob = Outbox::open(d.path().join("ob"), policy).unwrap();
        assert!(!d.path().join("ob/pending/zz.dcm").exists());
        let r = ob.run_once().unwrap();
        assert_eq!(r.retried, 1);
        let items = ob.pending().unwrap();
        assert_eq!(items[0].attempts, 1);
        assert!(items[0].last_error.is_some());
        std::thread::sleep(Duration::from_millis(5));
        let r = ob.run_once().unwrap();
        assert_eq!(r.dead, 1);
        assert!(ob.pending().unwrap().is_empty());
        let dead = ob.dead().unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].attempts, 2);
        assert!(d
            .path()
            .join(format!("ob/dead/{}.dcm", dead[0].id))
            .exists());
    }

    #[test]
    fn an_enqueue_that_would_cross_the_disk_reserve_is_refused_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("seg.dcm");
        std::fs::write(&src, b"a SEG").unwrap();
        let total = cosilo_hardware::disk(d.path()).unwrap().total_bytes;
        let ob = Outbox::open(d.path().join("ob"), RetryPolicy::default())
            .unwrap()
            .with_reserve_bytes(total);
        let peer = PeerAe::new("PACS", "127.0.0.1:1", "COSILO");
        let e = ob.enqueue(&src, &peer).unwrap_err();
        assert!(matches!(e, OutboxError::DiskReserve { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("seg.dcm") && text.contains("not enough disk space"),
            "{text}"
        );
        assert_eq!(
            std::fs::read_dir(d.path().join("ob/pending"))
                .unwrap()
                .count(),
            0
        );
        assert!(ob.pending().unwrap().is_empty());
        let ob = ob.with_reserve_bytes(0);
        ob.enqueue(&src, &peer).unwrap();
        assert_eq!(ob.pending().unwrap().len(), 1);
        assert!(src.exists(), "the source is copied, never moved");
    }
}
