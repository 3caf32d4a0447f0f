//! Durable writes, in one place: the spool's journal, the outbox and the series assembler all
//! make a file or a rename survive a power cut the same way (write a temporary file, sync it,
//! rename it over the target, sync the directory).

use std::io::Write;
use std::path::Path;

/// Makes the entries of `dir` (created, renamed or removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Writes `bytes` to `<path>.tmp`, syncs it and renames it over `path`; the caller syncs the
/// directory (once for several files). A failure removes the temporary file.
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// [`replace_file`], then the directory synced: `path` is durable when this returns.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_file(path, bytes)?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Renames `from` to `to` and syncs both parent directories.
pub fn rename_synced(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    for d in [from.parent(), to.parent()].into_iter().flatten() {
        sync_dir(d)?;
    }
    Ok(())
}
