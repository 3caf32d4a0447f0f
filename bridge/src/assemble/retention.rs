//! Retention of `done/`: the series handed over stay in the spool (for a SEG arriving later, a
//! resend that merges with them, and write-back), but not forever and not without bound.
//!
//! [`apply`] removes image series older than [`Retention::max_age`], then the oldest further
//! ones while `done/` holds more than [`Retention::max_bytes`]. It never removes a series a
//! labelled case still needs: a Segmentation series, and every image series a Segmentation in its
//! study references (a resend of that image merges with what is in `done/` and takes its labels
//! from that SEG). A series is removed by renaming it out of `done/` first (one atomic step, the
//! parent synced), then deleting it, so the assembler never sees half a series; leftovers of an
//! interrupted removal are deleted by the next pass.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::files::{classify, dcm_files, move_dir, sub_dirs, Kind};
use super::{AssembleError, DONE_DIR};

/// Where removed series wait for deletion (not a UID, so the spool scan ignores it).
const TRASH_DIR: &str = ".retention-trash";

/// How long and how much `done/` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Image series older than this (their newest file) are removed.
    pub max_age: Duration,
    /// Beyond this many bytes the oldest removable series go first.
    pub max_bytes: u64,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// (study, series) removed, oldest first.
    pub removed: Vec<(String, String)>,
    /// Series kept because a labelled case needs them.
    pub protected: usize,
    /// Bytes in `done/` after the pass.
    pub bytes_after: u64,
}

struct Entry {
    study: String,
    series: String,
    bytes: u64,
    newest: SystemTime,
    protected: bool,
}

fn scan_err(path: &Path) -> impl Fn(std::io::Error) -> AssembleError + '_ {
    move |source| AssembleError::Scan {
        path: path.to_path_buf(),
        source,
    }
}

/// Applies `policy` to `<spool>/done` at time `now`.
pub fn apply(
    spool: &Path,
    policy: &Retention,
    now: SystemTime,
) -> Result<RetentionReport, AssembleError> {
    let trash = spool.join(TRASH_DIR);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(scan_err(&trash))?;
    }
    let done = spool.join(DONE_DIR);
    let mut entries = Vec::new();
    for study in sub_dirs(&done)? {
        let study_dir = done.join(&study);
        let mut in_study = Vec::new();
        let mut referenced = Vec::new();
        for series in sub_dirs(&study_dir)? {
            let dir = study_dir.join(&series);
            let files = dcm_files(&dir)?;
            let (mut bytes, mut newest) = (0u64, SystemTime::UNIX_EPOCH);
            for f in &files {
                let m = std::fs::metadata(f).map_err(scan_err(f))?;
                bytes += m.len();
                newest = newest.max(m.modified().map_err(scan_err(f))?);
            }
            // A series whose header cannot be read is kept: better too much than a lost label.
            let protected = match files.first().map(|f| classify(f)) {
                Some(Ok(Kind::Seg { referenced_series })) => {
                    referenced.push(referenced_series);
                    true
                }
                Some(Ok(Kind::Image { .. })) | None => false,
                Some(Err(_)) => true,
            };
            in_study.push(Entry {
                study: study.clone(),
                series,
                bytes,
                newest,
                protected,
            });
        }
        for e in &mut in_study {
            e.protected |= referenced.contains(&e.series);
        }
        entries.extend(in_study);
    }
    let mut report = RetentionReport {
        protected: entries.iter().filter(|e| e.protected).count(),
        ..Default::default()
    };
    let mut total: u64 = entries.iter().map(|e| e.bytes).sum();
    entries.retain(|e| !e.protected);
    entries.sort_by_key(|e| e.newest);
    for e in entries {
        let age = now.duration_since(e.newest).unwrap_or(Duration::ZERO);
        if age <= policy.max_age && total <= policy.max_bytes {
            continue;
        }
        let from = done.join(&e.study).join(&e.series);
        let to: PathBuf = trash.join(format!("{}-{}", e.study, e.series));
        move_dir(&from, &to)?;
        std::fs::remove_dir_all(&to).map_err(scan_err(&to))?;
        tracing::info!(study = %e.study, series = %e.series, bytes = e.bytes, age_s = age.as_secs(), "retention: removed a series from done/");
        total -= e.bytes;
        report.removed.push((e.study, e.series));
    }
    let _ = std::fs::remove_dir(&trash);
    report.bytes_after = total;
    Ok(report)
}
