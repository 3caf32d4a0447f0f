//! The appliance's dataset and model store: imported cases (image, label, metadata) and training
//! checkpoints, in one directory on the appliance's disk.
//!
//! This is the only module that names `sled` (pinned to 0.34.7, unmaintained since 2021); none of
//! its types leave this module, so it can be replaced here alone. On disk the store directory holds
//! one folder, `data/`, the sled database.
//!
//! - [`case`]: what a case is, the checks an image/label pair must pass, and case storage.
//! - [`checkpoint`]: numbered model checkpoints per training run.
//! - [`import`]: importing a cohort manifest (or one pair) with progress and a report.
//! - [`volume_import`]: importing volumes already in memory (the PACS bridge's series).
//! - [`final_evaluation`]: the test split's only door, [`FinalEvaluation`], which records every
//!   read ([`Store::load_case`] refuses test cases).
//! - [`error`]: the error type, [`StoreError`].
//!
//! Invariants:
//! - A case is written in one transaction across the metadata, image and label trees, so a store
//!   opened after a crash holds each case whole or not at all; reads check the recorded SHA-256.
//! - Nothing is acknowledged (`Ok` from a write) before it has been flushed to disk.
//! - Import checks every input before writing anything; a refused case leaves the store as it was.
//! - Test-split voxels are read only through a [`FinalEvaluation`], and every such read is recorded.
//! - The store records its format version and refuses to open one it does not know.
//! - Every write of cases or checkpoints first consults the disk reserve
//!   ([`Store::set_reserve_bytes`], [`DEFAULT_RESERVE_BYTES`]): a write that would leave less free
//!   is refused with [`StoreError::DiskReserve`] before anything is written.

pub mod case;
pub mod checkpoint;
pub mod error;
pub mod final_evaluation;
pub mod import;
pub mod manage;
pub mod volume_import;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cosilo_hardware::durable::sync_dir;
use sha2::{Digest, Sha256};

pub use case::{Case, CaseMeta, ImportOutcome, Provenance, Split, GRID_TOLERANCE_MM};
pub use error::{BackendError, StoreError};
pub use final_evaluation::FinalEvaluation;
pub use import::{ImportReport, ImportRequest, ManifestError, Refusal};
pub use manage::CaseChange;

/// The free space (bytes) a store leaves on its disk unless told otherwise: 1 GiB.
pub const DEFAULT_RESERVE_BYTES: u64 = 1 << 30;

/// The on-disk layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"cosilo.store.format";
/// The database's directory inside the store directory, and where a new one is built.
const DATA_DIR: &str = "data";
const STAGING_DIR: &str = ".data.creating";

const CASES_TREE: &str = "cases";
const IMAGES_TREE: &str = "case_images";
const LABELS_TREE: &str = "case_labels";
const CHECKPOINTS_TREE: &str = "checkpoints";
const CHECKPOINT_WEIGHTS_TREE: &str = "checkpoint_weights";
const CHECKPOINT_SEQ_TREE: &str = "checkpoint_seq";
const TEST_READS_TREE: &str = "test_reads";

/// The dataset and model store. Cheap to clone; clones share the open database. One process at a
/// time may have a store open.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    cases: sled::Tree,
    images: sled::Tree,
    labels: sled::Tree,
    checkpoints: sled::Tree,
    checkpoint_weights: sled::Tree,
    checkpoint_seq: sled::Tree,
    /// Run name → how many times it opened the test split ([`FinalEvaluation`]).
    test_reads: sled::Tree,
    /// Blob files already fsynced, with the length they had then (see [`Store::flush`]).
    synced_blobs: Arc<Mutex<HashMap<OsString, u64>>>,
    /// Bytes to leave free on the store's disk; shared by clones.
    reserve_bytes: Arc<AtomicU64>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// Counts and sizes, for people and dashboards.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    pub train_cases: usize,
    pub validation_cases: usize,
    pub test_cases: usize,
    /// Image-only cases from the bridge.
    pub unlabelled_cases: usize,
    /// Voxels held for all cases (image and label), in bytes.
    pub voxel_bytes: u64,
    pub checkpoints: usize,
    /// What the store takes on disk, in bytes.
    pub size_on_disk: u64,
}

impl Store {
    /// Opens the store in `dir`, creating it when `dir` is missing or empty.
    ///
    /// Refuses a directory holding anything but a store, a store of another format version, and
    /// a store another process (or another `Store` in this one) has open.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let data = dir.join(DATA_DIR);
        if !data.join("conf").is_file() {
            // No complete store here: create one, if the directory holds nothing else.
            let open_io = |e: io::Error| StoreError::Open {
                dir: dir.to_path_buf(),
                source: Box::new(e),
            };
            match std::fs::read_dir(dir) {
                Ok(entries) => {
                    for entry in entries {
                        let name = entry.map_err(open_io)?.file_name();
                        if name != STAGING_DIR && name != "lost+found" {
                            return Err(StoreError::NotAStore {
                                dir: dir.to_path_buf(),
                            });
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(open_io(e)),
            }
            create(dir).map_err(|source| StoreError::Open {
                dir: dir.to_path_buf(),
                source,
            })?;
        }

        let open_err = |e: sled::Error| StoreError::Open {
            dir: dir.to_path_buf(),
            source: backend(e),
        };
        let db = sled_config(&data).open().map_err(open_err)?;
        let found = db.get(FORMAT_KEY).map_err(open_err)?;
        if found.as_deref() != Some(FORMAT_VERSION.to_string().as_bytes()) {
            return Err(StoreError::UnknownFormat {
                dir: dir.to_path_buf(),
                found: found.map_or_else(
                    || "none recorded".to_string(),
                    |v| String::from_utf8_lossy(&v).into_owned(),
                ),
                expected: FORMAT_VERSION,
            });
        }
        let tree = |name: &str| db.open_tree(name).map_err(open_err);
        Ok(Store {
            dir: dir.to_path_buf(),
            cases: tree(CASES_TREE)?,
            images: tree(IMAGES_TREE)?,
            labels: tree(LABELS_TREE)?,
            checkpoints: tree(CHECKPOINTS_TREE)?,
            checkpoint_weights: tree(CHECKPOINT_WEIGHTS_TREE)?,
            checkpoint_seq: tree(CHECKPOINT_SEQ_TREE)?,
            test_reads: tree(TEST_READS_TREE)?,
            db,
            synced_blobs: Arc::default(),
            reserve_bytes: Arc::new(AtomicU64::new(DEFAULT_RESERVE_BYTES)),
        })
    }

    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Sets the free space every write must leave on the store's disk (all clones share it).
    pub fn set_reserve_bytes(&self, bytes: u64) {
        self.reserve_bytes.store(bytes, Ordering::SeqCst);
    }

    /// The free space every write must leave on the store's disk.
    pub fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes.load(Ordering::SeqCst)
    }

    /// Refuses a write of about `bytes` (`what`, for the message) that would cross the reserve.
    /// sled appends to its log before it compacts, so a write needs about its size again.
    fn check_reserve(&self, what: impl Into<String>, bytes: u64) -> Result<(), StoreError> {
        let reserve = cosilo_hardware::DiskReserve {
            path: self.dir.clone(),
            reserve_bytes: self.reserve_bytes(),
        };
        reserve
            .check(bytes.saturating_mul(2))
            .map(|_| ())
            .map_err(|source| StoreError::DiskReserve {
                what: what.into(),
                source,
            })
    }

    /// Makes every write so far durable: on disk and fsynced.
    ///
    /// sled 0.34 keeps values and tree nodes larger than about 128 KiB in separate "blob" files,
    /// which its own flush does not fsync; those are fsynced here first, then sled's log.
    pub fn flush(&self) -> Result<(), StoreError> {
        let flush_err = |source: BackendError| StoreError::Flush {
            dir: self.dir.clone(),
            source,
        };
        self.sync_blobs().map_err(|e| flush_err(Box::new(e)))?;
        self.db.flush().map_err(|e| flush_err(backend(e)))?;
        Ok(())
    }

    fn sync_blobs(&self) -> io::Result<()> {
        let blob_dir = self.dir.join(DATA_DIR).join("blobs");
        let entries = match std::fs::read_dir(&blob_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut synced = self
            .synced_blobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut now = HashMap::new();
        let mut any_new = false;
        for entry in entries {
            let entry = entry?;
            // sled deletes blobs it no longer needs at any time; a vanished one needs no sync.
            let len = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let name = entry.file_name();
            if synced.get(&name) != Some(&len) {
                match File::open(entry.path()) {
                    Ok(f) => f.sync_all()?,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                }
                any_new = true;
            }
            now.insert(name, len);
        }
        if any_new {
            sync_dir(&blob_dir)?;
        }
        *synced = now;
        Ok(())
    }

    /// Case and checkpoint counts and sizes.
    pub fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = StoreStats::default();
        for id in self.case_ids(None)? {
            let meta = self.case_meta(&id)?;
            match meta.split {
                Split::Train => stats.train_cases += 1,
                Split::Validation => stats.validation_cases += 1,
                Split::Test => stats.test_cases += 1,
                Split::Unlabelled => stats.unlabelled_cases += 1,
            }
            stats.voxel_bytes += meta.geometry.len() as u64 * 5;
        }
        stats.checkpoints = self.checkpoints.len();
        stats.size_on_disk = self.db.size_on_disk().map_err(|e| StoreError::Read {
            what: "size on disk".to_string(),
            source: backend(e),
        })?;
        Ok(stats)
    }
}

fn backend(e: sled::Error) -> BackendError {
    Box::new(e)
}

fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .cache_capacity(256 * 1024 * 1024)
}

/// Creates an empty store in `dir` so that a crash at any point leaves either no store or a
/// complete one: the database is built and flushed in a staging directory inside `dir` (so on the
/// same file system, even when `dir` is a mount point), then renamed into place. A staging
/// directory left by an earlier crash is discarded.
fn create(dir: &Path) -> Result<(), BackendError> {
    std::fs::create_dir_all(dir)?;
    let staging = dir.join(STAGING_DIR);
    if let Err(e) = std::fs::remove_dir_all(&staging) {
        if e.kind() != io::ErrorKind::NotFound {
            return Err(Box::new(e));
        }
    }
    {
        let db = sled_config(&staging).open()?;
        db.insert(FORMAT_KEY, FORMAT_VERSION.to_string().as_bytes())?;
        db.flush()?;
    }
    // sled fsyncs its log but not its configuration file or its directory.
    File::open(staging.join("conf"))?.sync_all()?;
    sync_dir(&staging)?;
    std::fs::rename(&staging, dir.join(DATA_DIR))?;
    sync_dir(dir)?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sha256_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in Sha256::digest(bytes) {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

/// Case ids and run names become keys: 1-128 bytes of ASCII letters, digits, `.`, `_` and `-`,
/// not starting with `.`.
fn validate_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > 128 {
        Some("it is longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        Some("only ASCII letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidName {
            what,
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
