//! Running as a system service: what the systemd units (`images/systemd/`) need from the binary.
//!
//! - [`ensure_keys`] (`cosilo ensure-keys`, each unit's `ExecStartPre=`): at first start, this
//!   site's federation key and the bridge's de-identification key, each 0600 in a 0700 folder,
//!   made only when missing and never overwritten. The package never ships a secret.
//! - [`ServiceNotifier`]: readiness, watchdog and stopping notifications to systemd
//!   (`Type=notify`, `WatchdogSec=`) through `cosilo_hardware::systemd`; a no-op outside systemd.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cosilo_federation::keys::{KeysError, SiteKeys};
use cosilo_federation::strategy::StrategyKind;
use cosilo_hardware::systemd::{self, Notifier};
use tracing::{info, warn};

use crate::config::{ConfigError, SiteConfig};

/// Errors of preparing a service's secrets.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    SiteConfig(#[from] ConfigError),
    #[error("the bridge configuration: {0}")]
    BridgeConfig(String),
    #[error(
        "federation.key is {configured}, but a key for site {site:?} must be named {expected} \
         (set federation.key to it, or rename the site)"
    )]
    KeyName {
        configured: PathBuf,
        expected: PathBuf,
        site: String,
    },
    #[error("the key {path} is for site {found:?}, but this site is {site:?}")]
    WrongSite {
        path: PathBuf,
        found: String,
        site: String,
    },
    #[error(transparent)]
    Keys(#[from] KeysError),
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read random bytes for a key: {0}")]
    Random(#[source] std::io::Error),
}

/// What [`ensure_keys`] found or made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOutcome {
    /// A key was made at this path.
    Created(PathBuf),
    /// The key at this path was there already and is kept.
    Kept(PathBuf),
    /// The site runs alone (`strategy = "local"`): it needs no federation key.
    NotNeeded,
}

/// The federation key of the site configured in `site_config`: made at `federation.key` when
/// missing (0600, folder 0700), loaded and checked when present. Returns it with the outcome, so
/// the caller can print the roster entry for the federation's operator.
pub fn ensure_site_key(site_config: &Path) -> Result<(KeyOutcome, Option<SiteKeys>), ServiceError> {
    let cfg = SiteConfig::load(site_config)?;
    if cfg.federation.strategy == StrategyKind::Local {
        return Ok((KeyOutcome::NotNeeded, None));
    }
    let path = cfg.federation.key.clone();
    let site = cfg.site.id.clone();
    if path.exists() {
        let keys = SiteKeys::load(&path)?;
        if keys.site() != site {
            return Err(ServiceError::WrongSite {
                path,
                found: keys.site().to_string(),
                site,
            });
        }
        return Ok((KeyOutcome::Kept(path), Some(keys)));
    }
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let expected = SiteKeys::key_path(&dir, &site);
    if expected != path {
        return Err(ServiceError::KeyName {
            configured: path,
            expected,
            site,
        });
    }
    create_private_dir(&dir)?;
    let keys = SiteKeys::generate(&site)?;
    let written = keys.save(&dir)?;
    Ok((KeyOutcome::Created(written), Some(keys)))
}

/// The bridge's de-identification key (`deid.secret_file` of `bridge_config`): 32 random bytes
/// as hex, made when missing (0600, folder 0700), never overwritten. An existing key is checked
/// the way the bridge checks it at start (length, permissions).
pub fn ensure_deid_key(bridge_config: &Path) -> Result<KeyOutcome, ServiceError> {
    let cfg = cosilo_bridge::pipeline::BridgeConfig::from_file(bridge_config)
        .map_err(|e| ServiceError::BridgeConfig(format!("{e:#}")))?;
    let path = cfg.deid.secret_file.clone();
    if path.exists() {
        cfg.check_key()
            .map_err(|e| ServiceError::BridgeConfig(format!("{e:#}")))?;
        return Ok(KeyOutcome::Kept(path));
    }
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(ServiceError::Random)?;
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
    let create = |source| ServiceError::Create {
        path: path.clone(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options.open(&path).map_err(create)?;
    f.write_all(format!("{hex}\n").as_bytes()).map_err(create)?;
    f.sync_all().map_err(create)?;
    if let Some(dir) = path.parent() {
        cosilo_hardware::durable::sync_dir(dir).map_err(create)?;
    }
    cfg.check_key()
        .map_err(|e| ServiceError::BridgeConfig(format!("{e:#}")))?;
    Ok(KeyOutcome::Created(path))
}

/// Creates `dir` (and its parents) when missing; a folder this creates is 0700.
fn create_private_dir(dir: &Path) -> Result<(), ServiceError> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| ServiceError::Create {
        path: dir.to_path_buf(),
        source,
    })
}

/// Readiness, watchdog and stopping notifications to systemd; every call is a no-op when the
/// process was not started by systemd with `Type=notify`. A failed notification is logged,
/// never fatal: the service manager, not the appliance, decides what a missed one means.
#[derive(Debug, Clone, Default)]
pub struct ServiceNotifier {
    inner: Option<Arc<Notifier>>,
}

impl ServiceNotifier {
    /// The notifier `$NOTIFY_SOCKET` names, if any.
    pub fn from_env() -> ServiceNotifier {
        match Notifier::from_env() {
            Ok(n) => ServiceNotifier {
                inner: n.map(Arc::new),
            },
            Err(e) => {
                warn!(error = %e, "cannot talk to the service manager; no readiness notifications");
                ServiceNotifier::default()
            }
        }
    }

    /// True when running under systemd with a notification socket.
    pub fn active(&self) -> bool {
        self.inner.is_some()
    }

    fn send(&self, what: &str, f: impl FnOnce(&Notifier) -> Result<(), systemd::NotifyError>) {
        if let Some(n) = &self.inner {
            if let Err(e) = f(n) {
                warn!(error = %e, "cannot notify the service manager ({what})");
            }
        }
    }

    /// `READY=1`: the service serves.
    pub fn ready(&self, status: &str) {
        self.send("ready", |n| n.ready(status));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.send("stopping", |n| n.stopping(status));
    }

    /// `STATUS=...`.
    pub fn status(&self, status: &str) {
        self.send("status", |n| n.status(status));
    }

    /// `WATCHDOG=1`.
    pub fn watchdog(&self) {
        self.send("watchdog", |n| n.watchdog());
    }

    /// Sends `WATCHDOG=1` every half watchdog period (`$WATCHDOG_USEC`) from a thread of its own
    /// while `alive()` says the service is healthy and until `stop` is set. Nothing is started
    /// when the unit has no watchdog.
    pub fn spawn_watchdog(
        &self,
        stop: Arc<AtomicBool>,
        alive: impl Fn() -> bool + Send + 'static,
    ) -> Option<std::thread::JoinHandle<()>> {
        let interval = systemd::watchdog_interval()?;
        let this = self.clone();
        this.inner.as_ref()?;
        info!(every = ?interval, "systemd watchdog on");
        std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    if Instant::now() >= next {
                        if alive() {
                            this.watchdog();
                        } else {
                            warn!("not healthy: withholding the watchdog notification");
                        }
                        next = Instant::now() + interval;
                    }
                    std::thread::sleep(Duration::from_millis(100).min(interval));
                }
            })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn site_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("site.toml");
        let text =
            crate::config::DEFAULT_SITE_TOML.replace("key = \"h1.key\"", "key = \"keys/h1.key\"");
        std::fs::write(&cfg, text).unwrap();
        let (first, keys) = ensure_site_key(&cfg).unwrap();
        let path = dir.path().join("keys/h1.key");
        assert_eq!(first, KeyOutcome::Created(path.clone()));
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("keys")), 0o700);
        let (again, keys2) = ensure_site_key(&cfg).unwrap();
        assert_eq!(again, KeyOutcome::Kept(path));
        assert_eq!(
            keys.unwrap().roster_entry(),
            keys2.unwrap().roster_entry(),
            "a second start keeps the key"
        );
    }

    #[test]
    fn a_key_named_for_another_site_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("site.toml");
        let text = crate::config::DEFAULT_SITE_TOML.replace("id = \"h1\"", "id = \"stmarys\"");
        std::fs::write(&cfg, text).unwrap();
        let e = ensure_site_key(&cfg).unwrap_err();
        assert!(matches!(e, ServiceError::KeyName { .. }), "{e}");
        assert!(e.to_string().contains("stmarys.key"), "{e}");
        assert!(!dir.path().join("h1.key").exists(), "nothing written");
    }

    #[test]
    fn deid_key_is_made_once_and_the_bridge_accepts_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("bridge.toml");
        let key = dir.path().join("state/deid.key");
        let text = cosilo_bridge::pipeline::DEFAULT_CONFIG.replace(
            "secret_file = \"/etc/cosilo/deid.key\"",
            &format!("secret_file = {:?}", key),
        );
        std::fs::write(&cfg, text).unwrap();
        assert_eq!(
            ensure_deid_key(&cfg).unwrap(),
            KeyOutcome::Created(key.clone())
        );
        assert_eq!(mode(&key), 0o600);
        let secret = std::fs::read_to_string(&key).unwrap();
        assert_eq!(secret.trim().len(), 64);
        assert_eq!(
            ensure_deid_key(&cfg).unwrap(),
            KeyOutcome::Kept(key.clone())
        );
        assert_eq!(
            std::fs::read_to_string(&key).unwrap(),
            secret,
            "never rewritten"
        );
        // A key others can read is refused, as the bridge refuses it.
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            ensure_deid_key(&cfg),
            Err(ServiceError::BridgeConfig(_))
        ));
    }

    #[test]
    fn the_notifier_is_silent_outside_systemd() {
        let n = ServiceNotifier::default();
        assert!(!n.active());
        n.ready("x");
        n.stopping("y");
        assert!(n
            .spawn_watchdog(Arc::new(AtomicBool::new(true)), || true)
            .is_none());
    }
}
