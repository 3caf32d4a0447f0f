//! The federation declaration, `federation.toml`: one small file that says what a federation is
//! (name, security mode, strategy and its hyper-parameters, model, broker, sites, observers).
//! [`Declaration::load`] parses it into types and [`Declaration::validate`] checks it, each
//! problem a [`DeclarationError`] naming the key and the reason. The format is documented in
//! `docs/FEDERATION.md`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cosilo_federation::keys::validate_id;
use cosilo_federation::strategy::StrategyKind;
use cosilo_federation::weights::WeightFormat;

/// The largest MQTT packet (3.1.1's limit).
const MAX_PACKET_LIMIT: usize = 256 * 1024 * 1024;
/// The smallest packet that leaves room for weight chunks (as a site configuration requires).
const MIN_PACKET_BYTES: usize = 16 * 1024;

/// Errors of reading and checking a declaration.
#[derive(Debug, thiserror::Error)]
pub enum DeclarationError {
    /// The file could not be read.
    #[error("cannot read the federation declaration {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML of the declaration's shape.
    #[error("the federation declaration {origin} is not valid: {reason}")]
    Parse {
        /// The file (or "<string>").
        origin: String,
        /// What the TOML parser said (line, column, key).
        reason: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid federation declaration: {key}: {reason}")]
    Invalid {
        /// The key at fault (`site[2].id`, `broker.port`).
        key: String,
        /// Why.
        reason: String,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> DeclarationError {
    DeclarationError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// How the broker and its clients authenticate each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    /// Plain TCP, any client may connect (a trial on one machine). Updates are still signed and
    /// checked against the roster.
    None,
    /// TLS: the sites check the broker's certificate; the broker does not check the sites.
    Tls,
    /// Mutual TLS: the broker also requires a client certificate signed by the federation's CA,
    /// takes the certificate's name as the user name, and enforces the topic ACL. The default.
    Mtls,
}

/// Which broker relays the federation's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// rumqttd inside one site's `cosilo run` (plain TCP only).
    Embedded,
    /// An external Mosquitto, whose configuration provisioning writes.
    Mosquitto,
}

/// FedAvg's quorum: a count of sites or a fraction of the roster (as a site configuration).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum QuorumSpec {
    /// At least this many sites.
    Count(u32),
    /// At least this share of the roster.
    Fraction(f64),
}

/// `[federation]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederationInfo {
    /// The federation's name (topics live under `cosilo/{name}/`).
    pub name: String,
    /// The security mode (default `mtls`).
    #[serde(default = "default_security")]
    pub security: Security,
}

fn default_security() -> Security {
    Security::Mtls
}

/// `[strategy]`: the strategy and its hyper-parameters. Absent values keep the site
/// configuration's defaults (`cosilo print-default-config site`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrategySettings {
    /// `fedavg`, `braintorrent` (the paper's pull protocol), `gossip-avg` (push gossip with a final
    /// average), `ciil`, `iil` or `local`.
    pub kind: Option<StrategyKind>,
    pub rounds: Option<u64>,
    pub steps_per_round: Option<usize>,
    pub quorum: Option<QuorumSpec>,
    pub round_deadline_s: Option<u64>,
    pub update_timeout_s: Option<u64>,
    pub patience: Option<u64>,
    pub weight_format: Option<WeightFormat>,
    pub personalise_steps: Option<usize>,
    pub eval_every: Option<u64>,
    pub score_classes: Option<Vec<String>>,
}

/// `[model]`: the U-Net and training settings every site uses (the same model everywhere).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSettings {
    pub base: Option<usize>,
    pub depth: Option<usize>,
    pub batch_size: Option<usize>,
    pub patch: Option<[usize; 2]>,
    pub seed: Option<u64>,
    pub lr: Option<f64>,
}

/// `[broker]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerDecl {
    /// `embedded` or `mosquitto`.
    pub kind: BrokerKind,
    /// The host name the sites connect to (with TLS: the name in the broker's certificate).
    pub host: String,
    /// The broker's port.
    pub port: u16,
    /// `embedded`: the site whose `cosilo run` hosts the broker.
    #[serde(default)]
    pub on_site: Option<String>,
    /// The largest MQTT packet (default 1 MiB).
    #[serde(default = "default_max_packet")]
    pub max_packet_bytes: usize,
    /// Extra names (DNS or IP) for the broker's certificate besides `host`.
    #[serde(default)]
    pub alt_names: Vec<String>,
}

fn default_max_packet() -> usize {
    1 << 20
}

/// `[[site]]`: one hospital.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteDecl {
    /// The site id (roster, topics, certificate name).
    pub id: String,
    /// Train only on this hospital's cases of the store (default: all of them).
    #[serde(default)]
    pub hospital: String,
}

/// `[[observer]]`: a read-only client (a notebook, a dashboard).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserverDecl {
    /// Its id (certificate name, MQTT user name).
    pub id: String,
}

/// A whole `federation.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Declaration {
    pub federation: FederationInfo,
    #[serde(default)]
    pub strategy: StrategySettings,
    #[serde(default)]
    pub model: ModelSettings,
    pub broker: BrokerDecl,
    #[serde(default)]
    pub site: Vec<SiteDecl>,
    #[serde(default)]
    pub observer: Vec<ObserverDecl>,
}

impl Declaration {
    /// Reads and validates a declaration file.
    pub fn load(path: &Path) -> Result<Declaration, DeclarationError> {
        let text = std::fs::read_to_string(path).map_err(|source| DeclarationError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates declaration TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Declaration, DeclarationError> {
        let decl: Declaration = toml::from_str(text).map_err(|e| DeclarationError::Parse {
            origin: origin.to_string(),
            reason: e.to_string(),
        })?;
        decl.validate()?;
        Ok(decl)
    }

    /// The declaration as TOML that [`Declaration::parse`] reads back.
    pub fn to_toml(&self) -> String {
        // Every field is a plain TOML value; serialisation cannot fail for this type.
        toml::to_string(self).unwrap_or_default()
    }

    /// The strategy (default: FedAvg).
    pub fn strategy_kind(&self) -> StrategyKind {
        self.strategy.kind.unwrap_or(StrategyKind::FedAvg)
    }

    /// A declared site.
    pub fn site(&self, id: &str) -> Option<&SiteDecl> {
        self.site.iter().find(|s| s.id == id)
    }

    /// Whether `id` is a declared observer.
    pub fn is_observer(&self, id: &str) -> bool {
        self.observer.iter().any(|o| o.id == id)
    }

    /// Whether the sites need certificates (TLS or mutual TLS).
    pub fn uses_tls(&self) -> bool {
        self.federation.security != Security::None
    }

    /// Checks every value for range and consistency.
    pub fn validate(&self) -> Result<(), DeclarationError> {
        let id_reason = "must be 1-32 characters of a-z, 0-9, '-' or '_'";
        validate_id(&self.federation.name).map_err(|_| {
            invalid(
                "federation.name",
                format!("{:?} {id_reason}", self.federation.name),
            )
        })?;
        if self.site.is_empty() {
            return Err(invalid("site", "declare at least one [[site]]"));
        }
        let mut seen: Vec<&str> = Vec::new();
        for (i, s) in self.site.iter().enumerate() {
            validate_id(&s.id)
                .map_err(|_| invalid(format!("site[{i}].id"), format!("{:?} {id_reason}", s.id)))?;
            if seen.contains(&s.id.as_str()) {
                return Err(invalid(
                    format!("site[{i}].id"),
                    format!("{:?} is declared twice", s.id),
                ));
            }
            seen.push(&s.id);
        }
        for (i, o) in self.observer.iter().enumerate() {
            validate_id(&o.id).map_err(|_| {
                invalid(
                    format!("observer[{i}].id"),
                    format!("{:?} {id_reason}", o.id),
                )
            })?;
            if seen.contains(&o.id.as_str()) {
                return Err(invalid(
                    format!("observer[{i}].id"),
                    format!("{:?} is already a site or an observer", o.id),
                ));
            }
            seen.push(&o.id);
        }
        self.validate_strategy()?;
        self.validate_model()?;
        self.validate_broker()
    }

    fn validate_strategy(&self) -> Result<(), DeclarationError> {
        let s = &self.strategy;
        let at_least_one = |key: &str, v: Option<u64>| match v {
            Some(0) => Err(invalid(format!("strategy.{key}"), "must be at least 1")),
            _ => Ok(()),
        };
        at_least_one("rounds", s.rounds)?;
        at_least_one("steps_per_round", s.steps_per_round.map(|v| v as u64))?;
        at_least_one("round_deadline_s", s.round_deadline_s)?;
        at_least_one("update_timeout_s", s.update_timeout_s)?;
        at_least_one("patience", s.patience)?;
        match s.quorum {
            Some(QuorumSpec::Count(0)) => {
                return Err(invalid("strategy.quorum", "a count must be at least 1"))
            }
            Some(QuorumSpec::Count(c)) if c as usize > self.site.len() => {
                return Err(invalid(
                    "strategy.quorum",
                    format!("{c} sites, but only {} are declared", self.site.len()),
                ))
            }
            Some(QuorumSpec::Fraction(q)) if !(q > 0.0 && q <= 1.0) => {
                return Err(invalid(
                    "strategy.quorum",
                    format!("a fraction must be in (0, 1], not {q}"),
                ))
            }
            _ => {}
        }
        if let Some(classes) = &s.score_classes {
            if classes.is_empty() {
                return Err(invalid("strategy.score_classes", "name at least one class"));
            }
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), DeclarationError> {
        let m = &self.model;
        if m.base == Some(0) || m.depth == Some(0) || m.batch_size == Some(0) {
            return Err(invalid(
                "model",
                "base, depth and batch_size must be at least 1",
            ));
        }
        if let Some(p) = m.patch {
            if p.contains(&0) {
                return Err(invalid("model.patch", "both sides must be at least 1"));
            }
        }
        if let Some(lr) = m.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(invalid("model.lr", format!("must be positive, not {lr}")));
            }
        }
        Ok(())
    }

    fn validate_broker(&self) -> Result<(), DeclarationError> {
        let b = &self.broker;
        if b.host.trim().is_empty() {
            return Err(invalid("broker.host", "must not be empty"));
        }
        if b.port == 0 {
            return Err(invalid("broker.port", "must not be 0"));
        }
        if !(MIN_PACKET_BYTES..=MAX_PACKET_LIMIT).contains(&b.max_packet_bytes) {
            return Err(invalid(
                "broker.max_packet_bytes",
                format!(
                    "{} is outside {MIN_PACKET_BYTES}..={MAX_PACKET_LIMIT}",
                    b.max_packet_bytes
                ),
            ));
        }
        match b.kind {
            BrokerKind::Embedded => {
                let Some(on) = &b.on_site else {
                    return Err(invalid(
                        "broker.on_site",
                        "an embedded broker runs on one of the sites: name it",
                    ));
                };
                if self.site(on).is_none() {
                    return Err(invalid(
                        "broker.on_site",
                        format!("{on:?} is not a declared site"),
                    ));
                }
                if self.uses_tls() {
                    return Err(invalid(
                        "federation.security",
                        "the embedded broker serves plain TCP only: use security = \"none\", or \
                         broker.kind = \"mosquitto\" for tls/mtls",
                    ));
                }
            }
            BrokerKind::Mosquitto => {
                if b.on_site.is_some() {
                    return Err(invalid(
                        "broker.on_site",
                        "only an embedded broker runs on a site",
                    ));
                }
            }
        }
        for (i, n) in b.alt_names.iter().enumerate() {
            if n.trim().is_empty() {
                return Err(invalid(format!("broker.alt_names[{i}]"), "empty name"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = r#"
[federation]
name = "trial"
security = "mtls"

[strategy]
kind = "fedavg"
rounds = 3
steps_per_round = 5
quorum = 1.0

[model]
base = 8
depth = 2
patch = [48, 48]

[broker]
kind = "mosquitto"
host = "localhost"
port = 8883

[[site]]
id = "h1"
hospital = "h1"

[[site]]
id = "h2"

[[site]]
id = "h3"

[[observer]]
id = "notebook"
"#;

    fn err(text: &str) -> String {
        Declaration::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn a_three_site_declaration_parses_and_round_trips() {
        let d = Declaration::parse(THREE, "t.toml").unwrap();
        assert_eq!(d.federation.name, "trial");
        assert_eq!(d.strategy_kind(), StrategyKind::FedAvg);
        assert_eq!(d.strategy.quorum, Some(QuorumSpec::Fraction(1.0)));
        assert_eq!(d.site.len(), 3);
        assert_eq!(d.site[0].hospital, "h1");
        assert!(d.is_observer("notebook") && !d.is_observer("h1"));
        assert!(d.uses_tls());
        assert_eq!(d.broker.max_packet_bytes, 1 << 20);
        let back = Declaration::parse(&d.to_toml(), "again").unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn mistakes_are_named_with_their_key() {
        let e = err(&THREE.replace("name = \"trial\"", "name = \"Trial/1\""));
        assert!(
            e.contains("federation.name") && e.contains("Trial/1"),
            "{e}"
        );
        let e = err(&THREE.replace("id = \"h3\"", "id = \"h2\""));
        assert!(e.contains("site[2].id") && e.contains("twice"), "{e}");
        let e = err(&THREE.replace("id = \"notebook\"", "id = \"h1\""));
        assert!(e.contains("observer[0].id"), "{e}");
        let e = err(&THREE.replace("rounds = 3", "rounds = 0"));
        assert!(e.contains("strategy.rounds"), "{e}");
        let e = err(&THREE.replace("quorum = 1.0", "quorum = 4"));
        assert!(e.contains("strategy.quorum") && e.contains("only 3"), "{e}");
        let e = err(&THREE.replace("quorum = 1.0", "quorum = 1.5"));
        assert!(e.contains("(0, 1]"), "{e}");
        let e = err(&THREE.replace("port = 8883", "port = 0"));
        assert!(e.contains("broker.port"), "{e}");
        let e = err(&THREE.replace("kind = \"fedavg\"", "kind = \"fedsgd\""));
        assert!(e.contains("fedsgd") && e.contains("t.toml"), "{e}");
        let e = err(&THREE.replace("patch = [48, 48]", "patch = [48, 48]\nwidth = 3"));
        assert!(e.contains("width"), "an unknown key is refused: {e}");
        let e = err(&THREE.replace("security = \"mtls\"", "security = \"ssl\""));
        assert!(e.contains("ssl"), "{e}");
        let no_sites: String = THREE.split("[[site]]").next().unwrap().to_string();
        assert!(err(&no_sites).contains("at least one [[site]]"));
    }

    #[test]
    fn an_embedded_broker_lives_on_a_declared_site_and_serves_plain_tcp() {
        let embedded = THREE.replace("kind = \"mosquitto\"", "kind = \"embedded\"");
        let e = err(&embedded);
        assert!(e.contains("broker.on_site"), "{e}");
        let e = err(&embedded.replace("port = 8883", "port = 8883\non_site = \"h9\""));
        assert!(e.contains("h9") && e.contains("not a declared site"), "{e}");
        let e = err(&embedded.replace("port = 8883", "port = 8883\non_site = \"h1\""));
        assert!(e.contains("plain TCP"), "{e}");
        let ok = embedded
            .replace("port = 8883", "port = 8883\non_site = \"h1\"")
            .replace("security = \"mtls\"", "security = \"none\"");
        let d = Declaration::parse(&ok, "t").unwrap();
        assert_eq!(d.broker.on_site.as_deref(), Some("h1"));
        assert!(!d.uses_tls());
    }

    #[test]
    fn security_defaults_to_mutual_tls() {
        let d = Declaration::parse(&THREE.replace("security = \"mtls\"\n", ""), "t").unwrap();
        assert_eq!(d.federation.security, Security::Mtls);
    }
}
