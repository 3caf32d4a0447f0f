//! Reading and writing the provisioning files: text read with the path in the error, secrets
//! (mode 0600, refused when others can read them), and every write made whole or not at all
//! (`cosilo_hardware::durable`), so a crash never leaves half a roster.

use std::io::Write;
use std::path::Path;

use cosilo_hardware::durable;

use crate::ProvisionError;

/// Reads a text file.
pub fn read(path: &Path) -> Result<String, ProvisionError> {
    std::fs::read_to_string(path).map_err(|source| ProvisionError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a secret file, refusing one readable by group or others.
pub fn read_secret(path: &Path) -> Result<String, ProvisionError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| ProvisionError::Read {
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(ProvisionError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
    }
    read(path)
}

/// Writes a public file atomically and durably (`cosilo_hardware::durable`).
pub fn write(path: &Path, text: &str) -> Result<(), ProvisionError> {
    let err = |source| ProvisionError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    durable::write_atomic(path, text.as_bytes()).map_err(err)
}

/// Creates a secret file (mode 0600 from the start, never readable by others) exclusively: a
/// key is never overwritten, since that would lose an identity. Synced with its folder.
pub fn write_secret(path: &Path, text: &str) -> Result<(), ProvisionError> {
    let err = |source| ProvisionError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ProvisionError::Exists(path.to_path_buf())
        } else {
            err(e)
        }
    })?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    durable::sync_dir(dir).map_err(err)
}
