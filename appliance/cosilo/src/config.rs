//! A site's configuration for `cosilo run`: who the site is, where its store lives, which
//! federation it joins with which strategy, how it reaches the broker and how it trains.
//!
//! The documented defaults are the checked-in `appliance/config/site.toml`, embedded with
//! `include_str!` and printed by `cosilo print-default-config site`. A file is read with
//! [`SiteConfig::load`], which resolves relative paths against the file's folder and runs
//! [`SiteConfig::validate`]; every problem is a [`ConfigError`] naming the key and the reason.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cosilo_federation::strategy::StrategyKind;
use cosilo_federation::weights::WeightFormat;
use cosilo_train::TrainConfig;

/// The checked-in defaults (`appliance/config/site.toml`).
pub const DEFAULT_SITE_TOML: &str = include_str!("../config/site.toml");

/// Errors of reading and checking a site configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the configuration {path} is not valid TOML for a site: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid configuration: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read the training configuration {path}: {reason}")]
    Train { path: PathBuf, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The whole site configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub site: SiteSection,
    pub federation: FederationSection,
    pub broker: BrokerSection,
    #[serde(default)]
    pub train: TrainSection,
    /// `[guards]`: thermal, memory and GPU guards that throttle or pause training.
    #[serde(default)]
    pub guards: cosilo_hardware::guard::GuardsConfig,
    #[serde(default)]
    pub status: StatusSection,
}

/// `[status]`: the status page, `/status.json` and the Prometheus metrics (`crate::status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusSection {
    /// The local address served on ("" = off; port 0 = any free port, logged at start).
    pub listen: String,
    /// The bridge's write-back outbox, whose depth the metrics report ("" = none).
    pub outbox_dir: PathBuf,
}

/// The status server's default address: loopback only, a fixed port.
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:9833";

impl Default for StatusSection {
    fn default() -> Self {
        StatusSection {
            listen: DEFAULT_STATUS_LISTEN.to_string(),
            outbox_dir: PathBuf::new(),
        }
    }
}

impl StatusSection {
    /// The address to serve on; None when off.
    pub fn listen_addr(&self) -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            invalid(
                "status.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:9833 (\"\" = off)",
                    self.listen
                ),
            )
        })
    }
}

/// `[site]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// The site id (as in the roster and in topics).
    pub id: String,
    /// The appliance store.
    pub store: PathBuf,
    /// Train only on this hospital's cases; empty = all cases of the store.
    #[serde(default)]
    pub hospital: String,
}

/// FedAvg's quorum: a fraction of the roster or a count of sites.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Quorum {
    /// At least this many sites (own included).
    Count(u32),
    /// At least this share of the roster, rounded up.
    Fraction(f64),
}

impl Quorum {
    /// The number of sites of a roster of `n` that make a quorum (at least 1, at most n).
    pub fn sites(self, n: usize) -> usize {
        let q = match self {
            Quorum::Count(c) => c as usize,
            Quorum::Fraction(f) => (f * n as f64).ceil() as usize,
        };
        q.clamp(1, n.max(1))
    }
}

/// `[federation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationSection {
    pub name: String,
    pub strategy: StrategyKind,
    pub roster: PathBuf,
    pub key: PathBuf,
    pub rounds: u64,
    /// Optimiser steps per round; 0 = one local epoch (a pass over this site's labelled training
    /// slices), so a round's length follows each site's sample count as in Sheller et al.
    pub steps_per_round: usize,
    pub quorum: Quorum,
    pub round_deadline_s: u64,
    pub update_timeout_s: u64,
    pub patience: u64,
    pub weight_format: WeightFormat,
    pub replay_window_s: u64,
    /// Personalisation: after the federated rounds, optimiser steps of fine-tuning the final
    /// (consensus) model on this site's own cases (FedAvg + fine-tuning). The result is kept as
    /// the run `<session run>-personalised` and never leaves the site; 0 = off. The learning-rate
    /// schedule spans `rounds × steps_per_round + personalise_steps`, so a local-only run with the
    /// same setting trains exactly as many steps in all. Absent from a file: 0.
    #[serde(default)]
    pub personalise_steps: usize,
    /// Evaluate the held-out cases after every `eval_every`-th round (1 = every round; 0 = only
    /// before training and at the end). The final model is always scored. Absent from a file: 1.
    #[serde(default = "one")]
    pub eval_every: u64,
    /// The classes (names from the training configuration's `class_names`) whose mean held-out
    /// Dice is the score a round logs and a strategy ranks models by. Absent from a file: the
    /// tissue classes of the default label map.
    #[serde(default = "tissue_classes")]
    pub score_classes: Vec<String>,
}

fn one() -> u64 {
    1
}

fn tissue_classes() -> Vec<String> {
    ["csf", "grey_matter", "white_matter"]
        .map(String::from)
        .to_vec()
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSection {
    pub embedded: bool,
    pub host: String,
    pub port: u16,
    pub max_packet_bytes: usize,
    /// A CA certificate (PEM) for TLS; empty = plain TCP.
    #[serde(default)]
    pub ca_file: PathBuf,
    /// This site's TLS client certificate (PEM) for a broker that requires one (mutual TLS,
    /// `cosilo federation install` sets it); empty = none. Needs `ca_file` and `client_key`.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub client_cert: PathBuf,
    /// The private key (PEM) of `client_cert`.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub client_key: PathBuf,
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

/// `[train]`: a training configuration file and single overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// A `TrainConfig` TOML file; empty = the built-in defaults.
    #[serde(default)]
    pub config: PathBuf,
    pub base: Option<usize>,
    pub depth: Option<usize>,
    pub batch_size: Option<usize>,
    pub patch: Option<[usize; 2]>,
    pub seed: Option<u64>,
    pub lr: Option<f64>,
}

/// The smallest max packet that leaves useful room for weight chunks.
const MIN_PACKET_BYTES: usize = 16 * 1024;

impl Default for SiteConfig {
    fn default() -> Self {
        // The embedded file is checked by a unit test; failing here is a build defect, not input.
        toml::from_str(DEFAULT_SITE_TOML).expect("appliance/config/site.toml is a valid SiteConfig")
    }
}

impl SiteConfig {
    /// Parses TOML text (no path resolution) and validates it.
    pub fn from_toml(text: &str, origin: &Path) -> Result<SiteConfig, ConfigError> {
        let cfg: SiteConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            reason: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a site configuration file, resolves its relative paths against the file's folder
    /// and validates it.
    pub fn load(path: &Path) -> Result<SiteConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.resolve_paths(base);
        Ok(cfg)
    }

    /// Makes every relative path relative to `base`.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.site.store);
        fix(&mut self.federation.roster);
        fix(&mut self.federation.key);
        fix(&mut self.broker.ca_file);
        fix(&mut self.broker.client_cert);
        fix(&mut self.broker.client_key);
        fix(&mut self.train.config);
        fix(&mut self.status.outbox_dir);
    }

    /// Checks every value for range and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let id_ok = |s: &str| {
            (1..=32).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !id_ok(&self.site.id) {
            return Err(invalid(
                "site.id",
                format!(
                    "{:?} must be 1-32 characters of a-z, 0-9, '-' or '_'",
                    self.site.id
                ),
            ));
        }
        if !id_ok(&self.federation.name) {
            return Err(invalid(
                "federation.name",
                format!(
                    "{:?} must be 1-32 characters of a-z, 0-9, '-' or '_'",
                    self.federation.name
                ),
            ));
        }
        if self.site.store.as_os_str().is_empty() {
            return Err(invalid("site.store", "must name a folder"));
        }
        let f = &self.federation;
        let networked = f.strategy != StrategyKind::Local;
        if networked && f.roster.as_os_str().is_empty() {
            return Err(invalid("federation.roster", "must name the roster file"));
        }
        if networked && f.key.as_os_str().is_empty() {
            return Err(invalid("federation.key", "must name this site's key file"));
        }
        if f.rounds == 0 {
            return Err(invalid("federation.rounds", "must be at least 1"));
        }
        match f.quorum {
            Quorum::Count(0) => return Err(invalid("federation.quorum", "a count must be >= 1")),
            Quorum::Fraction(q) if !(q > 0.0 && q <= 1.0) => {
                return Err(invalid(
                    "federation.quorum",
                    format!("a fraction must be in (0, 1], not {q}"),
                ))
            }
            _ => {}
        }
        if f.round_deadline_s == 0 || f.update_timeout_s == 0 {
            return Err(invalid(
                "federation.round_deadline_s / update_timeout_s",
                "must be at least 1 second",
            ));
        }
        if f.patience == 0 {
            return Err(invalid("federation.patience", "must be at least 1"));
        }
        if f.replay_window_s == 0 {
            return Err(invalid("federation.replay_window_s", "must be at least 1"));
        }
        if self.broker.host.is_empty() {
            return Err(invalid("broker.host", "must not be empty"));
        }
        if self.broker.port == 0 {
            return Err(invalid("broker.port", "must not be 0"));
        }
        if self.broker.max_packet_bytes < MIN_PACKET_BYTES
            || self.broker.max_packet_bytes > 256 * 1024 * 1024
        {
            return Err(invalid(
                "broker.max_packet_bytes",
                format!(
                    "{} is outside {MIN_PACKET_BYTES}..=268435456 (MQTT's limit)",
                    self.broker.max_packet_bytes
                ),
            ));
        }
        self.status.listen_addr()?;
        let b = &self.broker;
        if is_empty_path(&b.client_cert) != is_empty_path(&b.client_key) {
            return Err(invalid(
                "broker.client_cert / client_key",
                "give both or neither",
            ));
        }
        if !is_empty_path(&b.client_cert) && is_empty_path(&b.ca_file) {
            return Err(invalid(
                "broker.client_cert",
                "a client certificate needs TLS: set broker.ca_file",
            ));
        }
        self.train_config()?;
        self.guards
            .validate()
            .map_err(|reason| invalid("guards", reason))?;
        Ok(())
    }

    /// The training configuration: the `[train]` file or the defaults, with the overrides, and
    /// the schedule set to `rounds × steps_per_round` (as epochs × steps per epoch).
    pub fn train_config(&self) -> Result<TrainConfig, ConfigError> {
        let t = &self.train;
        let mut cfg = if t.config.as_os_str().is_empty() {
            TrainConfig::default()
        } else {
            let text = std::fs::read_to_string(&t.config).map_err(|e| ConfigError::Train {
                path: t.config.clone(),
                reason: e.to_string(),
            })?;
            TrainConfig::from_toml(&text).map_err(|e| ConfigError::Train {
                path: t.config.clone(),
                reason: e.to_string(),
            })?
        };
        if let Some(b) = t.base {
            cfg.model.base = b;
        }
        if let Some(d) = t.depth {
            cfg.model.depth = d;
        }
        if let Some(b) = t.batch_size {
            cfg.batch_size = b;
        }
        if let Some(p) = t.patch {
            cfg.patch = p;
        }
        if let Some(s) = t.seed {
            cfg.seed = s;
        }
        if let Some(lr) = t.lr {
            cfg.optimiser.lr = lr;
        }
        cfg.epochs = self.federation.rounds as usize;
        cfg.steps_per_epoch = self.federation.steps_per_round;
        cfg.checkpoint_every = 0;
        cfg.validate()
            .map_err(|e| invalid("train", e.to_string()))?;
        Ok(cfg)
    }

    /// The hospital filter, if any.
    /// The optimiser steps a run takes in all, which the learning-rate schedule spans: the
    /// rounds plus the personalisation phase.
    pub fn schedule_steps(&self) -> usize {
        (self.federation.rounds as usize)
            .saturating_mul(self.federation.steps_per_round)
            .saturating_add(self.federation.personalise_steps)
    }

    pub fn hospital(&self) -> Option<&str> {
        (!self.site.hospital.is_empty()).then_some(self.site.hospital.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_validates_and_round_trips() {
        let cfg = SiteConfig::from_toml(DEFAULT_SITE_TOML, Path::new("site.toml")).unwrap();
        assert_eq!(cfg, SiteConfig::default());
        assert_eq!(cfg.federation.strategy, StrategyKind::BrainTorrent);
        assert_eq!(cfg.federation.weight_format, WeightFormat::F16Zstd);
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(SiteConfig::from_toml(&text, Path::new("x")).unwrap(), cfg);
        let t = cfg.train_config().unwrap();
        assert_eq!(t.epochs as u64, cfg.federation.rounds);
        assert_eq!(t.steps_per_epoch, cfg.federation.steps_per_round);
    }

    #[test]
    fn personalisation_and_evaluation_settings_default_and_parse() {
        let cfg = SiteConfig::default();
        assert_eq!(
            cfg.federation.personalise_steps,
            2 * cfg.federation.steps_per_round
        );
        assert_eq!(cfg.federation.eval_every, 1);
        assert_eq!(
            cfg.schedule_steps(),
            cfg.federation.rounds as usize * cfg.federation.steps_per_round
                + cfg.federation.personalise_steps
        );
        // Files written before these settings existed: personalisation off, every round scored.
        let old = DEFAULT_SITE_TOML
            .lines()
            .filter(|l| !l.starts_with("personalise_steps") && !l.starts_with("eval_every"))
            .collect::<Vec<_>>()
            .join("\n");
        let cfg = SiteConfig::from_toml(&old, Path::new("old.toml")).unwrap();
        assert_eq!(cfg.federation.personalise_steps, 0);
        assert_eq!(cfg.federation.eval_every, 1);
        let text = DEFAULT_SITE_TOML
            .replacen("personalise_steps = 100", "personalise_steps = 7", 1)
            .replacen("eval_every = 1", "eval_every = 0", 1);
        let cfg = SiteConfig::from_toml(&text, Path::new("t")).unwrap();
        assert_eq!(cfg.federation.personalise_steps, 7);
        assert_eq!(cfg.federation.eval_every, 0);
    }

    #[test]
    fn quorum_forms_and_counts() {
        let parse = |q: &str| {
            let text = DEFAULT_SITE_TOML.replace("quorum = 0.5", &format!("quorum = {q}"));
            SiteConfig::from_toml(&text, Path::new("t"))
        };
        assert_eq!(parse("2").unwrap().federation.quorum, Quorum::Count(2));
        assert_eq!(parse("0.5").unwrap().federation.quorum.sites(3), 2);
        assert_eq!(Quorum::Count(5).sites(3), 3);
        assert_eq!(Quorum::Fraction(1.0).sites(3), 3);
        let e = parse("1.5").unwrap_err().to_string();
        assert!(e.contains("federation.quorum"), "{e}");
        let e = parse("0").unwrap_err().to_string();
        assert!(e.contains("federation.quorum"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("id = \"h1\"", "id = \"H 1\"", "site.id"),
            (
                "strategy = \"braintorrent\"",
                "strategy = \"gossip\"",
                "strategy",
            ),
            ("rounds = 14", "rounds = 0", "federation.rounds"),
            (
                "weight_format = \"f16+zstd\"",
                "weight_format = \"f8\"",
                "weight_format",
            ),
            (
                "max_packet_bytes = 1048576",
                "max_packet_bytes = 100",
                "max_packet_bytes",
            ),
            ("port = 1883", "port = 0", "broker.port"),
            ("# base = 8", "base = 7", "train"),
            ("name = \"cosilo\"", "name = \"a/b\"", "federation.name"),
            ("throttle_factor = 0.5", "throttle_factor = 2", "guards"),
            (
                "listen = \"127.0.0.1:9833\"",
                "listen = \"localhost\"",
                "status.listen",
            ),
        ];
        for (from, to, key) in cases {
            assert!(DEFAULT_SITE_TOML.contains(from), "{from}");
            let text = DEFAULT_SITE_TOML.replacen(from, to, 1);
            let e = SiteConfig::from_toml(&text, Path::new("t"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
        let e = SiteConfig::from_toml("[site]\nid = 3", Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }

    #[test]
    fn relative_paths_follow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h1.toml");
        std::fs::write(&path, DEFAULT_SITE_TOML).unwrap();
        let cfg = SiteConfig::load(&path).unwrap();
        assert_eq!(cfg.federation.roster, dir.path().join("roster.toml"));
        assert_eq!(cfg.site.store, dir.path().join("./cosilo-store"));
        assert!(cfg.broker.ca_file.as_os_str().is_empty());
        assert!(matches!(
            SiteConfig::load(&dir.path().join("missing.toml")),
            Err(ConfigError::Read { .. })
        ));
    }
}
