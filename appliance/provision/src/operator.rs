//! The operator's half of provisioning: the federation's CA, the members, the roster, the kits,
//! and (for an external Mosquitto) the broker's certificate and configuration.
//!
//! ```text
//! {ops}/federation.toml        the declaration (edit it to declare a new site, then admit it)
//! {ops}/ca.key, ca.crt         the federation's CA (the key is 0600 and never leaves here)
//! {ops}/crl.pem                the revocation list
//! {ops}/members.toml           admitted members: id, role, certificate serial, public key
//! {ops}/roster.toml            the active sites' public keys
//! {ops}/kits/{id}/             what goes back to a member: kit.toml, federation.toml,
//!                              roster.toml, ca.crt, {id}.crt (+ site.toml from the appliance)
//! {ops}/mosquitto/             mosquitto.conf, acl, server.crt, server.key
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use cosilo_federation::keys::{to_hex, Roster, RosterSite};

use crate::declaration::{BrokerKind, Declaration};
use crate::pki::{ca_paths, Ca};
use crate::site::{KitInfo, Request, KIT_FILE};
use crate::{files, mosquitto, ProvisionError};

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A hospital: on the roster, publishes under its own topics.
    Site,
    /// A read-only client of the broker (a notebook): not on the roster, publishes nothing.
    Observer,
}

/// One admitted (or revoked) certificate holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Its id (certificate name, MQTT user name).
    pub id: String,
    /// Site or observer.
    pub role: Role,
    /// Its certificate's serial number.
    pub serial: u64,
    /// The Ed25519 public key (hex) of a site.
    #[serde(default)]
    pub public_key: Option<String>,
    /// Revoked by `remove`.
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Members {
    /// The next certificate serial (1 is the CA's, 2 the broker's).
    next_serial: u64,
    /// The number of the CRL last written.
    crl_number: u64,
    #[serde(default)]
    member: Vec<Member>,
}

/// An operator folder, opened.
pub struct Operator {
    dir: PathBuf,
    decl: Declaration,
    members: Members,
    ca: Ca,
}

impl Operator {
    /// Creates the operator folder `dir` for the declaration at `declaration`: copies the
    /// declaration, makes the CA, an empty CRL and (for an external Mosquitto with TLS) the
    /// broker's certificate and configuration.
    pub fn init(declaration: &Path, dir: &Path) -> Result<Operator, ProvisionError> {
        let decl = Declaration::load(declaration)?;
        let (ca_key, ca_cert) = ca_paths(dir);
        if ca_key.exists() || dir.join("members.toml").exists() {
            return Err(ProvisionError::AlreadyInitialised(dir.to_path_buf()));
        }
        let ca = Ca::generate(&decl.federation.name)?;
        files::write_secret(&ca_key, &ca.key_pem())?;
        files::write(&ca_cert, &ca.cert_pem())?;
        files::write(&dir.join("federation.toml"), &files::read(declaration)?)?;
        let mut op = Operator {
            dir: dir.to_path_buf(),
            decl,
            members: Members {
                next_serial: 3,
                crl_number: 0,
                member: Vec::new(),
            },
            ca,
        };
        if op.decl.broker.kind == BrokerKind::Mosquitto && op.decl.uses_tls() {
            let mut names = vec![op.decl.broker.host.clone()];
            names.extend(op.decl.broker.alt_names.iter().cloned());
            let (cert, key) = op
                .ca
                .broker_certificate(&op.decl.federation.name, &names, 2)?;
            files::write(&op.dir.join("mosquitto/server.crt"), &cert)?;
            files::write_secret(&op.dir.join("mosquitto/server.key"), &key)?;
        }
        op.save()?;
        Ok(op)
    }

    /// Opens an initialised operator folder (re-reading its declaration, so a site declared
    /// since can be admitted).
    pub fn open(dir: &Path) -> Result<Operator, ProvisionError> {
        let state = dir.join("members.toml");
        if !state.exists() {
            return Err(ProvisionError::NotInitialised(dir.to_path_buf()));
        }
        let members: Members =
            toml::from_str(&files::read(&state)?).map_err(|e| ProvisionError::State {
                path: state.clone(),
                reason: e.message().to_string(),
            })?;
        let decl = Declaration::load(&dir.join("federation.toml"))?;
        let (key, cert) = ca_paths(dir);
        let ca = Ca::load(&key, &cert)?;
        Ok(Operator {
            dir: dir.to_path_buf(),
            decl,
            members,
            ca,
        })
    }

    /// The operator folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The declaration.
    pub fn declaration(&self) -> &Declaration {
        &self.decl
    }

    /// Every certificate holder, revoked ones included.
    pub fn members(&self) -> &[Member] {
        &self.members.member
    }

    /// An active (not revoked) member.
    pub fn member(&self, id: &str) -> Option<&Member> {
        self.members
            .member
            .iter()
            .find(|m| m.id == id && !m.revoked)
    }

    /// A member's kit folder.
    pub fn kit_dir(&self, id: &str) -> PathBuf {
        self.dir.join("kits").join(id)
    }

    /// The roster file.
    pub fn roster_path(&self) -> PathBuf {
        self.dir.join("roster.toml")
    }

    /// The Mosquitto configuration file (external broker only).
    pub fn mosquitto_conf_path(&self) -> PathBuf {
        self.dir.join("mosquitto/mosquitto.conf")
    }

    /// The roster of the active sites, in declaration order; `None` before any site is admitted.
    pub fn roster(&self) -> Result<Option<Roster>, ProvisionError> {
        let mut sites = Vec::new();
        for s in &self.decl.site {
            let Some(m) = self.member(&s.id) else {
                continue;
            };
            let Some(hex) = &m.public_key else { continue };
            let key = cosilo_federation::keys::from_hex::<32>(hex)
                .and_then(|b| ed25519_dalek::VerifyingKey::from_bytes(&b).ok())
                .ok_or_else(|| ProvisionError::State {
                    path: self.dir.join("members.toml"),
                    reason: format!("{}: public_key is not an Ed25519 key", m.id),
                })?;
            sites.push(RosterSite {
                id: s.id.clone(),
                public_key: key,
                samples_hint: None,
            });
        }
        if sites.is_empty() {
            return Ok(None);
        }
        Ok(Some(Roster::new(&self.decl.federation.name, sites)?))
    }

    /// Admits the request at `request`: checks that it is for this federation, from a declared
    /// and not yet admitted id, that its CSR and (for a site) its Ed25519 signature verify;
    /// signs its certificate, adds it to the roster and writes its kit and the new roster into
    /// every member's kit. Returns the member's kit folder.
    pub fn admit(&mut self, request: &Path) -> Result<PathBuf, ProvisionError> {
        let req = Request::load(request)?;
        let fed = self.decl.federation.name.clone();
        if req.federation != fed {
            return Err(ProvisionError::BadRequest {
                id: req.id.clone(),
                reason: format!("it asks to join {:?}, not {fed:?}", req.federation),
            });
        }
        let declared = match req.role {
            Role::Site => self.decl.site(&req.id).is_some(),
            Role::Observer => self.decl.is_observer(&req.id),
        };
        if !declared {
            return Err(ProvisionError::NotDeclared {
                id: req.id.clone(),
                federation: fed,
            });
        }
        if self.member(&req.id).is_some() {
            return Err(ProvisionError::AlreadyMember(req.id.clone()));
        }
        let public_key = match req.role {
            Role::Site => {
                let key = req.verify_site()?;
                let hex = to_hex(key.as_bytes());
                if let Some(o) = self
                    .members
                    .member
                    .iter()
                    .find(|m| !m.revoked && m.public_key.as_deref() == Some(hex.as_str()))
                {
                    return Err(ProvisionError::BadRequest {
                        id: req.id.clone(),
                        reason: format!("its signing key is {}'s", o.id),
                    });
                }
                Some(hex)
            }
            Role::Observer => None,
        };
        let serial = self.members.next_serial;
        let cert = self.ca.sign_request(&req.csr, &fed, &req.id, serial)?;
        self.members.next_serial += 1;
        self.members.member.push(Member {
            id: req.id.clone(),
            role: req.role,
            serial,
            public_key,
            revoked: false,
        });
        let kit = self.kit_dir(&req.id);
        files::write(&kit.join(format!("{}.crt", req.id)), &cert)?;
        let info = KitInfo {
            federation: fed,
            id: req.id.clone(),
            role: req.role,
        };
        files::write(
            &kit.join(KIT_FILE),
            &toml::to_string(&info).unwrap_or_default(),
        )?;
        self.save()?;
        Ok(kit)
    }

    /// Removes `id`: revokes its certificate (a new CRL), drops it from the roster and the
    /// broker's ACL, deletes its kit and writes the new roster into every remaining kit.
    pub fn remove(&mut self, id: &str) -> Result<(), ProvisionError> {
        let Some(m) = self
            .members
            .member
            .iter_mut()
            .find(|m| m.id == id && !m.revoked)
        else {
            return Err(ProvisionError::NotMember(id.to_string()));
        };
        m.revoked = true;
        let kit = self.kit_dir(id);
        if kit.exists() {
            std::fs::remove_dir_all(&kit).map_err(|source| ProvisionError::Write {
                path: kit.clone(),
                source,
            })?;
        }
        self.save()
    }

    /// Writes everything derived from the members: state, CRL, roster, kits, broker files.
    fn save(&mut self) -> Result<(), ProvisionError> {
        self.members.crl_number += 1;
        let revoked: Vec<u64> = self
            .members
            .member
            .iter()
            .filter(|m| m.revoked)
            .map(|m| m.serial)
            .collect();
        let crl = self.ca.crl(self.members.crl_number, &revoked)?;
        files::write(&self.dir.join("crl.pem"), &crl)?;
        let roster = self.roster()?;
        let roster_path = self.roster_path();
        match &roster {
            Some(r) => files::write(&roster_path, &r.to_toml())?,
            None if roster_path.exists() => {
                std::fs::remove_file(&roster_path).map_err(|source| ProvisionError::Write {
                    path: roster_path.clone(),
                    source,
                })?
            }
            None => {}
        }
        let decl_text = files::read(&self.dir.join("federation.toml"))?;
        let ca_cert = self.ca.cert_pem();
        let active: Vec<String> = self
            .members
            .member
            .iter()
            .filter(|m| !m.revoked)
            .map(|m| m.id.clone())
            .collect();
        for id in &active {
            let kit = self.kit_dir(id);
            files::write(&kit.join("federation.toml"), &decl_text)?;
            files::write(&kit.join("ca.crt"), &ca_cert)?;
            if let Some(r) = &roster {
                files::write(&kit.join("roster.toml"), &r.to_toml())?;
            }
        }
        if self.decl.broker.kind == BrokerKind::Mosquitto {
            mosquitto::write(&self.dir, &self.decl, &self.members.member)?;
        }
        let state = toml::to_string(&self.members).map_err(|e| ProvisionError::State {
            path: self.dir.join("members.toml"),
            reason: e.to_string(),
        })?;
        files::write(&self.dir.join("members.toml"), &state)
    }
}
