//! The appliance's side of provisioning (`cosilo federation`, crate `cosilo-provision`): the
//! site configuration a kit carries, made from the federation declaration, and a whole
//! federation provisioned on one machine for a trial (each site's keys still made in its own
//! folder).
//!
//! A kit's `site.toml` names everything relative to the site folder it is installed in:
//! `store` (the store), `roster.toml`, `{id}.key`, and with TLS `ca.crt`, with mutual TLS also
//! `{id}.crt` and `tls.key`; `SiteConfig::load` resolves them against that folder.

use std::path::{Path, PathBuf};

use cosilo_provision::declaration::{BrokerKind, QuorumSpec, Security};
use cosilo_provision::{site, Declaration, Operator, ProvisionError, Role};

use crate::config::{ConfigError, Quorum, SiteConfig};

/// Errors of turning a declaration into site configurations and kits.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    #[error("the declaration gives {site} an invalid site configuration: {source}")]
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

/// The site configuration of `id` in the federation `decl`, with paths relative to the site
/// folder, validated (so a hyper-parameter the daemon would refuse is refused here).
pub fn site_config(decl: &Declaration, id: &str) -> Result<SiteConfig, KitError> {
    let site = decl.site(id).ok_or_else(|| ProvisionError::NotDeclared {
        id: id.to_string(),
        federation: decl.federation.name.clone(),
    })?;
    let mut cfg = SiteConfig::default();
    cfg.site.id = id.to_string();
    cfg.site.store = PathBuf::from("store");
    cfg.site.hospital = site.hospital.clone();
    let f = &mut cfg.federation;
    f.name = decl.federation.name.clone();
    f.strategy = decl.strategy_kind();
    f.roster = PathBuf::from("roster.toml");
    f.key = PathBuf::from(format!("{id}.key"));
    let s = &decl.strategy;
    if let Some(v) = s.rounds {
        f.rounds = v;
    }
    if let Some(v) = s.steps_per_round {
        f.steps_per_round = v;
    }
    if let Some(q) = s.quorum {
        f.quorum = match q {
            QuorumSpec::Count(c) => Quorum::Count(c),
            QuorumSpec::Fraction(x) => Quorum::Fraction(x),
        };
    }
    if let Some(v) = s.round_deadline_s {
        f.round_deadline_s = v;
    }
    if let Some(v) = s.update_timeout_s {
        f.update_timeout_s = v;
    }
    if let Some(v) = s.patience {
        f.patience = v;
    }
    if let Some(v) = s.weight_format {
        f.weight_format = v;
    }
    if let Some(v) = s.personalise_steps {
        f.personalise_steps = v;
    }
    if let Some(v) = s.eval_every {
        f.eval_every = v;
    }
    if let Some(v) = &s.score_classes {
        f.score_classes = v.clone();
    }
    let m = &decl.model;
    let t = &mut cfg.train;
    t.base = m.base;
    t.depth = m.depth;
    t.batch_size = m.batch_size;
    t.patch = m.patch;
    t.seed = m.seed;
    t.lr = m.lr;
    let b = &decl.broker;
    cfg.broker.embedded = b.kind == BrokerKind::Embedded && b.on_site.as_deref() == Some(id);
    cfg.broker.host = b.host.clone();
    cfg.broker.port = b.port;
    cfg.broker.max_packet_bytes = b.max_packet_bytes;
    if decl.uses_tls() {
        cfg.broker.ca_file = PathBuf::from("ca.crt");
    }
    if decl.federation.security == Security::Mtls {
        cfg.broker.client_cert = PathBuf::from(format!("{id}.crt"));
        cfg.broker.client_key = PathBuf::from(site::TLS_KEY_FILE);
    }
    cfg.validate().map_err(|source| KitError::Config {
        site: id.to_string(),
        source,
    })?;
    Ok(cfg)
}

/// Writes `cfg` as TOML to `path`.
pub fn write_config(cfg: &SiteConfig, path: &Path) -> Result<(), KitError> {
    let text = toml::to_string(cfg).map_err(|e| KitError::Serialise {
        site: cfg.site.id.clone(),
        reason: e.to_string(),
    })?;
    cosilo_hardware::durable::write_atomic(path, text.as_bytes()).map_err(|source| KitError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `cosilo federation admit`: admits the request and, for a site, adds its `site.toml` to the
/// kit. Returns the kit folder.
pub fn admit(op: &mut Operator, request: &Path) -> Result<PathBuf, KitError> {
    // Check the configuration before anything is signed: a declaration the daemon would refuse
    // admits no one.
    let req = site::Request::load(request)?;
    let cfg = match req.role {
        Role::Site => Some(site_config(op.declaration(), &req.id)?),
        Role::Observer => None,
    };
    let kit = op.admit(request)?;
    if let Some(cfg) = cfg {
        write_config(&cfg, &kit.join("site.toml"))?;
    }
    Ok(kit)
}

/// `cosilo federation install`: installs the kit into `dir`; `store` (when given) replaces the
/// configuration's store folder. Returns the site configuration's path for a site.
pub fn install(kit: &Path, dir: &Path, store: Option<&Path>) -> Result<Option<PathBuf>, KitError> {
    let installed = site::install(kit, dir)?;
    if installed.info.role != Role::Site {
        return Ok(None);
    }
    let path = dir.join("site.toml");
    if let Some(store) = store {
        let mut cfg = SiteConfig::load(&path).map_err(|source| KitError::Config {
            site: installed.info.id.clone(),
            source,
        })?;
        // Written back relative to nothing: an absolute store path stays absolute, and the
        // other paths (resolved by load) are absolute now too, which is what the site wants.
        cfg.site.store = store.to_path_buf();
        write_config(&cfg, &path)?;
    }
    Ok(Some(path))
}

/// A federation provisioned on one machine: the operator folder and one folder per member.
#[derive(Debug, Clone)]
pub struct LocalFederation {
    /// The operator folder (CA, roster, kits, Mosquitto configuration).
    pub ops: PathBuf,
    /// `(site id, site folder)`, in declaration order; each holds `site.toml`.
    pub sites: Vec<(String, PathBuf)>,
    /// `(observer id, folder)`.
    pub observers: Vec<(String, PathBuf)>,
}

/// Provisions every site and observer of the declaration at `declaration` under `dir`, the way
/// separate machines would (request, admit, install), each member's keys made in its own
/// folder `dir/{id}`; the operator's folder is `dir/operator`.
pub fn provision_local(declaration: &Path, dir: &Path) -> Result<LocalFederation, KitError> {
    let ops = dir.join("operator");
    let checked = Declaration::load(declaration).map_err(ProvisionError::from)?;
    for s in &checked.site {
        site_config(&checked, &s.id)?;
    }
    let mut op = Operator::init(declaration, &ops)?;
    let decl = op.declaration().clone();
    let ids: Vec<(String, bool)> = decl
        .site
        .iter()
        .map(|s| (s.id.clone(), true))
        .chain(decl.observer.iter().map(|o| (o.id.clone(), false)))
        .collect();
    let mut sites = Vec::new();
    let mut observers = Vec::new();
    for (id, _) in &ids {
        let folder = dir.join(id);
        let req = site::request(&decl, id, &folder)?;
        admit(&mut op, &req)?;
    }
    // Install after every admission, so each kit carries the full roster.
    for (id, is_site) in ids {
        let folder = dir.join(&id);
        if let Some(path) = install(&op.kit_dir(&id), &folder, None)? {
            // Several sites on one machine: each status server on a free port (logged at
            // start), as the demo's plan does; the default fixed port would clash.
            let mut cfg = SiteConfig::load(&path).map_err(|source| KitError::Config {
                site: id.clone(),
                source,
            })?;
            cfg.status.listen = "127.0.0.1:0".into();
            write_config(&cfg, &path)?;
        }
        if is_site {
            sites.push((id, folder));
        } else {
            observers.push((id, folder));
        }
    }
    Ok(LocalFederation {
        ops,
        sites,
        observers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosilo_federation::strategy::StrategyKind;

    const DECL: &str = r#"
[federation]
name = "kit"

[strategy]
kind = "ciil"
rounds = 4
steps_per_round = 7
quorum = 2

[model]
base = 8
patch = [48, 48]

[broker]
kind = "mosquitto"
host = "localhost"
port = 18884

[[site]]
id = "h1"
hospital = "a"

[[site]]
id = "h2"

[[observer]]
id = "nb"
"#;

    #[test]
    fn a_site_configuration_follows_the_declaration() {
        let d = Declaration::parse(DECL, "t").unwrap();
        let c = site_config(&d, "h1").unwrap();
        assert_eq!(c.federation.strategy, StrategyKind::Ciil);
        assert_eq!((c.federation.rounds, c.federation.steps_per_round), (4, 7));
        assert_eq!(c.federation.quorum, Quorum::Count(2));
        assert_eq!((c.train.base, c.train.patch), (Some(8), Some([48, 48])));
        assert_eq!(c.site.hospital, "a");
        assert_eq!(c.broker.ca_file, PathBuf::from("ca.crt"));
        assert_eq!(c.broker.client_cert, PathBuf::from("h1.crt"));
        assert!(!c.broker.embedded);
        assert!(matches!(
            site_config(&d, "nb"),
            Err(KitError::Provision(ProvisionError::NotDeclared { .. }))
        ));
        // A value the declaration lets through but the training configuration refuses.
        let bad = Declaration::parse(&DECL.replace("base = 8", "base = 3"), "t").unwrap();
        assert!(matches!(
            site_config(&bad, "h1"),
            Err(KitError::Config { .. })
        ));
        // An embedded broker runs on its site only, over plain TCP.
        let emb = DECL
            .replace(
                "kind = \"mosquitto\"",
                "kind = \"embedded\"\non_site = \"h2\"",
            )
            .replace("name = \"kit\"", "name = \"kit\"\nsecurity = \"none\"");
        let d = Declaration::parse(&emb, "t").unwrap();
        assert!(site_config(&d, "h2").unwrap().broker.embedded);
        let h1 = site_config(&d, "h1").unwrap();
        assert!(!h1.broker.embedded && h1.broker.ca_file.as_os_str().is_empty());
        // A client certificate needs its key and TLS.
        let mut half = h1.clone();
        half.broker.client_cert = PathBuf::from("h1.crt");
        assert!(half
            .validate()
            .unwrap_err()
            .to_string()
            .contains("both or neither"));
        half.broker.client_key = PathBuf::from("tls.key");
        assert!(half.validate().unwrap_err().to_string().contains("ca_file"));
    }

    #[test]
    fn a_local_federation_installs_loadable_site_configurations() {
        let dir = tempfile::tempdir().unwrap();
        let decl = dir.path().join("federation.toml");
        std::fs::write(&decl, DECL).unwrap();
        let fed = provision_local(&decl, &dir.path().join("fed")).unwrap();
        assert_eq!(fed.sites.len(), 2);
        assert_eq!(fed.observers.len(), 1);
        for (id, folder) in &fed.sites {
            let cfg = SiteConfig::load(&folder.join("site.toml")).unwrap();
            assert_eq!(&cfg.site.id, id);
            assert_eq!(cfg.site.store, folder.join("store"));
            assert_eq!(cfg.broker.client_key, folder.join("tls.key"));
            assert!(cfg.federation.key.exists() && cfg.broker.client_cert.exists());
            let roster = cosilo_federation::keys::Roster::load(&cfg.federation.roster).unwrap();
            assert_eq!(roster.sites().len(), 2, "every kit carries the full roster");
        }
        // --store replaces the store; installing again keeps the site's choice.
        let (_, h2) = &fed.sites[1];
        let store = dir.path().join("elsewhere");
        install(&fed.ops.join("kits/h2"), h2, Some(&store)).unwrap();
        install(&fed.ops.join("kits/h2"), h2, None).unwrap();
        let cfg = SiteConfig::load(&h2.join("site.toml")).unwrap();
        assert_eq!(cfg.site.store, store);
        assert!(fed.ops.join("mosquitto/mosquitto.conf").exists());
    }
}
