//! Durable file writes: the one home of the appliance's fsync discipline.
//!
//! Data the appliance acknowledges must survive a power cut. On Linux that means: write the
//! bytes, `fsync` the file, and `fsync` the directory whose entry changed (a new name or a
//! rename), in that order. Every crate that promises durability (the store, the bridge's spool,
//! journal and outbox, the SDK's bundle writer) calls these functions instead of its own copy.
//!
//! All functions return plain [`std::io::Error`]s; callers wrap them in their own typed error
//! with the path they were writing.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

/// `fsync`s a directory, so that entries created, renamed or removed in it are on disk.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates (or truncates) `path`, writes `bytes` and `fsync`s the file. The directory entry is
/// not synced: call [`sync_dir`] on the parent, or use [`write_atomic`].
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Writes `bytes` to `<path>.tmp` (same directory, so the rename stays on one filesystem),
/// syncs it and renames it over `path`; the caller syncs the directory (once for several files).
/// A reader sees the old content or the new, never a mix. A failure removes the temporary file.
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let result = write_synced(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`replace_file`], then the directory synced: `path` is durable when this returns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
        _ => sync_dir(Path::new(".")),
    }
}

/// Renames `from` to `to` and syncs both parent directories.
pub fn rename_synced(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    for d in [from.parent(), to.parent()].into_iter().flatten() {
        sync_dir(d)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn write_atomic_into_a_missing_directory_fails_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing").join("x");
        assert!(write_atomic(&p, b"x").is_err());
        assert!(!dir.path().join("missing").exists());
        assert!(write_synced(&p, b"x").is_err());
        assert!(sync_dir(&dir.path().join("missing")).is_err());
    }
}
