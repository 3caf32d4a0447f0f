//! The spool's folders as the assembler sees them: series folders, their instances, moves that
//! survive a power cut, and the clean-release marker.

use std::path::{Path, PathBuf};

use dicom::core::Tag;
use dicom::object::InMemDicomObject;

use super::{AssembleError, RELEASED_MARKER, SEG_SOP_CLASS};
use cosilo_hardware::durable::{rename_synced, sync_dir, write_atomic};

pub(super) fn is_uid(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

/// The UID-named sub-folders of `dir` (none when it does not exist).
pub(super) fn sub_dirs(dir: &Path) -> Result<Vec<String>, AssembleError> {
    let scan = |source| AssembleError::Scan {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(scan(e)),
    };
    for entry in entries {
        let entry = entry.map_err(scan)?;
        if entry.file_type().map_err(scan)?.is_dir() {
            if let Some(name) = entry.file_name().to_str().filter(|n| is_uid(n)) {
                out.push(name.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The instances (`*.dcm`) in `dir`, sorted; none when it does not exist.
pub(super) fn dcm_files(dir: &Path) -> Result<Vec<PathBuf>, AssembleError> {
    let scan = |source| AssembleError::Scan {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(scan(e)),
    };
    for entry in entries {
        let p = entry.map_err(scan)?.path();
        if p.extension().is_some_and(|e| e == "dcm") {
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}

pub(super) fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// Renames folder `from` to `to` (creating `to`'s parent, replacing an old `to`) and syncs both
/// parents; an empty study folder left behind is removed.
pub(super) fn move_dir(from: &Path, to: &Path) -> Result<(), AssembleError> {
    let err = |source| AssembleError::Move {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if to.exists() {
        std::fs::remove_dir_all(to).map_err(err)?;
    }
    rename_synced(from, to).map_err(err)?;
    if let Some(study) = from.parent() {
        let _ = std::fs::remove_dir(study);
    }
    Ok(())
}

/// Moves every instance of folder `from` into folder `to` (an instance already in `to` is
/// replaced), syncs `to`, then removes `from` with whatever else it held.
pub(super) fn merge_into(from: &Path, to: &Path) -> Result<(), AssembleError> {
    let err = |source| AssembleError::Move {
        from: from.to_path_buf(),
        to: to.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(to).map_err(err)?;
    for f in dcm_files(from)? {
        if let Some(name) = f.file_name() {
            std::fs::rename(&f, to.join(name)).map_err(err)?;
        }
    }
    sync_dir(to).map_err(err)?;
    std::fs::remove_dir_all(from).map_err(err)?;
    if let Some(parent) = from.parent() {
        sync_dir(parent).map_err(err)?;
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Writes `bytes` to `path` durably.
pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssembleError> {
    write_atomic(path, bytes).map_err(|source| AssembleError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Records that an association delivering into series folder `dir` ended with an A-RELEASE
/// while the folder held `instances`. Not synced: a lost marker only makes the series wait as
/// if interrupted, which is the safe side.
pub(super) fn mark_released(dir: &Path, instances: usize) {
    let _ = std::fs::write(dir.join(RELEASED_MARKER), format!("{instances}\n"));
}

/// Whether series folder `dir` was left by a clean release: its marker exists and counts at least
/// the instances the folder holds (a later instance without a release makes it stale).
pub(super) fn released(dir: &Path, instances: usize) -> bool {
    std::fs::read_to_string(dir.join(RELEASED_MARKER))
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .is_some_and(|n| n >= instances)
}

/// What a spooled series is.
pub(super) enum Kind {
    /// An image series; `declared` is ImagesInAcquisition when it states one acquisition's count.
    Image { declared: Option<usize> },
    /// A SEG and the series it references.
    Seg { referenced_series: String },
}

/// Reads the header of one instance (file names only in the reason: paths move).
pub(super) fn classify(file: &Path) -> Result<Kind, String> {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let obj = dicom::object::OpenFileOptions::new()
        .read_until(Tag(0x7FE0, 0x0010))
        .open_file(file)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if text(&obj, Tag(0x0008, 0x0016)) != SEG_SOP_CLASS {
        let declared = text(&obj, Tag(0x0020, 0x1002))
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&n| n > 0);
        return Ok(Kind::Image { declared });
    }
    let referenced = obj
        .get(Tag(0x0008, 0x1115))
        .and_then(|e| e.items())
        .and_then(|items| items.first())
        .map(|item| text(item, Tag(0x0020, 0x000E)))
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "the SEG has no ReferencedSeriesSequence".to_string())?;
    Ok(Kind::Seg {
        referenced_series: referenced,
    })
}

/// The number of instances whose ImagesInAcquisition equals `declared` with one
/// AcquisitionNumber among them, or None when the files do not all say so (several
/// acquisitions, or the attribute missing somewhere): then the declaration is not evidence.
pub(super) fn declared_count(files: &[PathBuf], declared: usize) -> Option<usize> {
    let mut acquisition: Option<String> = None;
    for f in files {
        let obj = dicom::object::OpenFileOptions::new()
            .read_until(Tag(0x7FE0, 0x0010))
            .open_file(f)
            .ok()?;
        let n = text(&obj, Tag(0x0020, 0x1002))
            .trim()
            .parse::<usize>()
            .ok()?;
        let acq = text(&obj, Tag(0x0020, 0x0012));
        if n != declared || acquisition.get_or_insert_with(|| acq.clone()) != &acq {
            return None;
        }
    }
    Some(declared)
}
