//! `cosilo bridge init`: a site's bridge set up in one step — the state directory (0700), a fresh
//! de-identification key (0600) and a commented configuration pointing at both.
//!
//! The key is the secret behind every pseudonym: it is never overwritten (pseudonyms would change
//! and write-back could no longer find a patient). Running `init` again over an existing key is an
//! error that names the file.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::pipeline::DEFAULT_CONFIG;

/// What [`init`] created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitReport {
    /// The configuration to pass to `cosilo bridge --config`.
    pub config: PathBuf,
    /// The de-identification key (0600).
    pub key: PathBuf,
    /// The bridge's state directory (0700): pseudonym mapping, spool, outbox.
    pub state_dir: PathBuf,
}

/// Errors of [`init`].
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{path} already exists; remove it first if you really mean to replace it (a new key changes every pseudonym)")]
    Exists { path: PathBuf },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read random bytes for the key")]
    Random(#[source] std::io::Error),
}

/// Creates `<dir>/state/` (spool and outbox inside), `<dir>/deid.key` and `<dir>/bridge.toml`.
pub fn init(dir: &Path) -> Result<InitReport, InitError> {
    let key = dir.join("deid.key");
    let config = dir.join("bridge.toml");
    let state_dir = dir.join("state");
    for p in [&key, &config] {
        if p.exists() {
            return Err(InitError::Exists { path: p.clone() });
        }
    }
    let create = |path: &Path| {
        let path = path.to_path_buf();
        move |source| InitError::Create { path, source }
    };
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    for d in [
        state_dir.clone(),
        state_dir.join("spool"),
        state_dir.join("outbox"),
    ] {
        builder.create(&d).map_err(create(&d))?;
    }

    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(InitError::Random)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    write_new(&key, format!("{hex}\n").as_bytes(), 0o600).map_err(create(&key))?;

    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut text = DEFAULT_CONFIG.to_string();
    for (from, to) in [
        (
            "state_dir = \"/var/lib/cosilo/bridge\"",
            format!("state_dir = {:?}", abs(&state_dir)),
        ),
        (
            "spool_dir = \"/var/lib/cosilo/spool\"",
            format!("spool_dir = {:?}", abs(&state_dir.join("spool"))),
        ),
        (
            "outbox_dir = \"/var/lib/cosilo/outbox\"",
            format!("outbox_dir = {:?}", abs(&state_dir.join("outbox"))),
        ),
        (
            "secret_file = \"/etc/cosilo/deid.key\"",
            format!("secret_file = {:?}", abs(&key)),
        ),
    ] {
        text = text.replace(from, &to);
    }
    let text = format!(
        "# Written by `cosilo bridge init`. The key next to it ({}) makes every pseudonym:\n\
         # back it up with the store, never share it, never replace it.\n{text}",
        key.display()
    );
    write_new(&config, text.as_bytes(), 0o644).map_err(create(&config))?;
    Ok(InitReport {
        config,
        key,
        state_dir,
    })
}

/// Writes a file that must not exist yet, with `mode`, and syncs it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::BridgeConfig;

    #[test]
    fn init_makes_a_config_that_validates_a_0600_key_and_refuses_to_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let r = init(d.path()).unwrap();
        let cfg = BridgeConfig::from_file(&r.config).unwrap();
        assert_eq!(cfg.deid.secret_file, std::path::absolute(&r.key).unwrap());
        cfg.check_key().unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&r.key), 0o600);
            assert_eq!(mode(&r.state_dir), 0o700);
        }
        let before = std::fs::read(&r.key).unwrap();
        assert!(matches!(init(d.path()), Err(InitError::Exists { .. })));
        assert_eq!(std::fs::read(&r.key).unwrap(), before, "key untouched");
        // Two sites get different keys.
        let other = tempfile::tempdir().unwrap();
        assert_ne!(
            std::fs::read(init(other.path()).unwrap().key).unwrap(),
            before
        );
    }
}
