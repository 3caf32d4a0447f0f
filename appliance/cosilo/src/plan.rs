//! A federation of sites on one machine, laid out in one folder: each site's store with its own
//! hospital's cases, its key pair, the shared roster and each site's configuration. `cosilo demo`
//! and the cross-crate test harness both set up their federations with a [`FederationPlan`].
//!
//! ```text
//! {dir}/{site}-store/     the site's store (its hospital's cases from the cohort)
//! {keys}/{site}.key       the site's secret key (made once; reused when present)
//! {dir}/roster.toml       every site's public key
//! ```

use std::path::{Path, PathBuf};

use cosilo_federation::keys::{KeysError, Roster, RosterSite, SiteKeys};
use cosilo_federation::strategy::StrategyKind;
use cosilo_store::{Store, StoreError};

use crate::config::{ConfigError, SiteConfig};

/// Errors of setting up a federation.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("reading the cohort manifest failed: {0}")]
    Manifest(#[from] cosilo_store::import::ManifestError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("the cohort has no cases of hospital {0}")]
    NoCases(String),
    #[error("{0} of {1}'s cases were refused at import")]
    Refused(usize, String),
    #[error("keys: {0}")]
    Keys(#[from] KeysError),
    #[error("the configuration of {site}: {source}")]
    Config {
        site: String,
        #[source]
        source: ConfigError,
    },
    #[error("cannot serialise the configuration of {site}: {reason}")]
    Serialise { site: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where a federation's sites live on disk and how their configurations start.
#[derive(Debug, Clone)]
pub struct FederationPlan {
    /// The federation's name (topics live under `cosilo/{name}/`).
    pub name: String,
    /// Site ids; each site holds the cohort's hospital of the same id.
    pub sites: Vec<String>,
    /// The folder of stores, roster and configurations.
    pub dir: PathBuf,
    /// The folder of the sites' secret keys.
    pub keys: PathBuf,
}

impl FederationPlan {
    /// A plan with its keys beside the stores in `dir`.
    pub fn new(name: &str, sites: &[&str], dir: &Path) -> FederationPlan {
        FederationPlan {
            name: name.to_string(),
            sites: sites.iter().map(|s| s.to_string()).collect(),
            dir: dir.to_path_buf(),
            keys: dir.to_path_buf(),
        }
    }

    /// A site's store.
    pub fn store_path(&self, site: &str) -> PathBuf {
        self.dir.join(format!("{site}-store"))
    }

    /// A site's secret key file.
    pub fn key_path(&self, site: &str) -> PathBuf {
        SiteKeys::key_path(&self.keys, site)
    }

    /// The roster file.
    pub fn roster_path(&self) -> PathBuf {
        self.dir.join("roster.toml")
    }

    /// Imports each site's hospital from the cohort `manifest` into a fresh store (an existing
    /// one is removed first: a rerun must train again, not resume the previous run's sessions).
    pub fn import_cohort(&self, manifest: &Path) -> Result<(), PlanError> {
        for site in &self.sites {
            let dir = self.store_path(site);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|source| PlanError::Io {
                    path: dir.clone(),
                    source,
                })?;
            }
            let store = Store::open(&dir)?;
            let requests = cosilo_store::import::read_manifest(manifest, Some(site))?;
            if requests.is_empty() {
                return Err(PlanError::NoCases(site.clone()));
            }
            let report = cosilo_store::import::import_all(&store, &requests)?;
            if !report.refused.is_empty() {
                return Err(PlanError::Refused(report.refused.len(), site.clone()));
            }
        }
        Ok(())
    }

    /// Loads each site's key (generating and saving it when missing) and writes the roster.
    pub fn write_keys_and_roster(&self) -> Result<Roster, PlanError> {
        let mut members = Vec::new();
        for site in &self.sites {
            let path = self.key_path(site);
            let keys = if path.exists() {
                SiteKeys::load(&path)?
            } else {
                let k = SiteKeys::generate(site)?;
                k.save(&self.keys)?;
                k
            };
            members.push(RosterSite {
                id: site.clone(),
                public_key: keys.verifying_key(),
                samples_hint: None,
            });
        }
        let roster = Roster::new(&self.name, members)?;
        let path = self.roster_path();
        std::fs::write(&path, roster.to_toml()).map_err(|source| PlanError::Io { path, source })?;
        Ok(roster)
    }

    /// A site's configuration with the plan filled in: its id, hospital and store, the
    /// federation's name, roster and the site's key, the strategy, and an outside broker on
    /// 127.0.0.1:`broker_port` with `max_packet_bytes`. The caller sets the rest.
    pub fn site_config(
        &self,
        site: &str,
        strategy: StrategyKind,
        broker_port: u16,
        max_packet_bytes: usize,
    ) -> SiteConfig {
        let mut cfg = SiteConfig::default();
        cfg.site.id = site.to_string();
        cfg.site.store = self.store_path(site);
        cfg.site.hospital = site.to_string();
        cfg.federation.name = self.name.clone();
        cfg.federation.strategy = strategy;
        cfg.federation.roster = self.roster_path();
        cfg.federation.key = self.key_path(site);
        cfg.broker.embedded = false;
        cfg.broker.host = "127.0.0.1".into();
        cfg.broker.port = broker_port;
        cfg.broker.max_packet_bytes = max_packet_bytes;
        // Several sites on one machine: each status server on a free port (logged at start).
        cfg.status.listen = "127.0.0.1:0".into();
        cfg
    }

    /// Validates `cfg` and writes it to `path` as TOML.
    pub fn write_config(&self, cfg: &SiteConfig, path: &Path) -> Result<(), PlanError> {
        let site = cfg.site.id.clone();
        cfg.validate().map_err(|source| PlanError::Config {
            site: site.clone(),
            source,
        })?;
        let text = toml::to_string(cfg).map_err(|e| PlanError::Serialise {
            site,
            reason: e.to_string(),
        })?;
        std::fs::write(path, text).map_err(|source| PlanError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_roster_are_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FederationPlan::new("plan", &["h1", "h2"], dir.path());
        let first = plan.write_keys_and_roster().unwrap();
        let again = plan.write_keys_and_roster().unwrap();
        assert_eq!(first, again, "a rerun keeps the keys");
        let read = Roster::load(&plan.roster_path()).unwrap();
        assert_eq!(read, first);
        assert_eq!(read.name(), "plan");
        assert!(read.contains("h1") && read.contains("h2") && !read.contains("h3"));
    }

    #[test]
    fn site_configs_point_into_the_plan_and_validate() {
        let dir = tempfile::tempdir().unwrap();
        let plan = FederationPlan::new("plan", &["h1"], dir.path());
        let cfg = plan.site_config("h1", StrategyKind::FedAvg, 1883, 1 << 20);
        assert_eq!(cfg.site.store, dir.path().join("h1-store"));
        assert_eq!(cfg.federation.key, SiteKeys::key_path(dir.path(), "h1"));
        assert_eq!(cfg.federation.roster, dir.path().join("roster.toml"));
        let path = dir.path().join("h1.toml");
        plan.write_config(&cfg, &path).unwrap();
        let back = SiteConfig::load(&path).unwrap();
        assert_eq!(back.federation.strategy, StrategyKind::FedAvg);
        assert_eq!(back.broker.port, 1883);
        let mut bad = cfg.clone();
        bad.federation.rounds = 0;
        assert!(matches!(
            plan.write_config(&bad, &path),
            Err(PlanError::Config { .. })
        ));
    }
}
