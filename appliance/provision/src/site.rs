//! A site's (or observer's) half of provisioning. `request` makes the secret keys on the site
//! and writes the request the operator admits; `install` checks the kit the operator sends back
//! and copies it into the site's folder.
//!
//! ```text
//! {dir}/{id}.key      the site's Ed25519 signing key (0600; sites only)
//! {dir}/{id}.pub      its roster entry
//! {dir}/tls.key       the TLS key (ECDSA P-256, PKCS#8, 0600)
//! {dir}/request.toml  what goes to the operator: CSR, public key, signature
//! {dir}/federation.toml, roster.toml, ca.crt, {id}.crt, site.toml   installed from the kit
//! ```

use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use cosilo_federation::keys::{from_hex, to_hex, Roster, SiteKeys};

use crate::declaration::Declaration;
use crate::operator::Role;
use crate::pki::TlsKey;
use crate::{files, ProvisionError};

/// The request file's name in a site folder.
pub const REQUEST_FILE: &str = "request.toml";
/// The TLS key's file name.
pub const TLS_KEY_FILE: &str = "tls.key";
/// The files a kit holds besides the member's certificate (`{id}.crt`) and, for sites, its
/// configuration (`site.toml`).
pub const KIT_FILES: [&str; 3] = ["federation.toml", "roster.toml", "ca.crt"];
/// The kit's description of whom it is for.
pub const KIT_FILE: &str = "kit.toml";

/// What a site sends to the operator. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The federation it asks to join.
    pub federation: String,
    /// The requester's id.
    pub id: String,
    /// Site or observer.
    pub role: Role,
    /// The Ed25519 public key for the roster (sites only), hex.
    #[serde(default)]
    pub public_key: Option<String>,
    /// The certificate signing request for the TLS key (PEM, signed with that key).
    pub csr: String,
    /// Ed25519 signature (hex) over [`Request::signed_text`] (sites only): proves the requester
    /// holds the signing key and binds it to this CSR.
    #[serde(default)]
    pub signature: Option<String>,
}

impl Request {
    /// The bytes the site's signing key signs.
    pub fn signed_text(&self) -> String {
        format!(
            "cosilo-provision-request-v1\n{}\n{}\n{}",
            self.federation, self.id, self.csr
        )
    }

    /// Reads a request file.
    pub fn load(path: &Path) -> Result<Request, ProvisionError> {
        let text = files::read(path)?;
        toml::from_str(&text).map_err(|e| ProvisionError::State {
            path: path.to_path_buf(),
            reason: format!("not a Cosilo provisioning request: {}", e.message()),
        })
    }

    /// The request as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks the Ed25519 signature of a site's request; returns its public key.
    pub fn verify_site(&self) -> Result<VerifyingKey, ProvisionError> {
        let bad = |reason: &str| ProvisionError::BadRequest {
            id: self.id.clone(),
            reason: reason.to_string(),
        };
        let key = self
            .public_key
            .as_deref()
            .and_then(from_hex::<32>)
            .ok_or_else(|| bad("a site's request needs public_key (64 hex digits)"))?;
        let key = VerifyingKey::from_bytes(&key)
            .map_err(|_| bad("public_key is not an Ed25519 point"))?;
        if key.is_weak() {
            return Err(bad("public_key is a weak (small-order) key"));
        }
        let sig = self
            .signature
            .as_deref()
            .and_then(from_hex::<64>)
            .ok_or_else(|| bad("a site's request needs signature (128 hex digits)"))?;
        key.verify(self.signed_text().as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| bad("the signature does not verify with public_key"))?;
        Ok(key)
    }
}

/// Makes the keys of `id` in `dir` (reusing keys already there) and writes `dir/request.toml`.
/// Returns the request's path.
pub fn request(decl: &Declaration, id: &str, dir: &Path) -> Result<PathBuf, ProvisionError> {
    let role = if decl.site(id).is_some() {
        Role::Site
    } else if decl.is_observer(id) {
        Role::Observer
    } else {
        return Err(ProvisionError::NotDeclared {
            id: id.to_string(),
            federation: decl.federation.name.clone(),
        });
    };
    let tls_path = dir.join(TLS_KEY_FILE);
    let tls = if tls_path.exists() {
        TlsKey::load(&tls_path)?
    } else {
        let k = TlsKey::generate()?;
        files::write_secret(&tls_path, &k.pem())?;
        k
    };
    let fed = decl.federation.name.clone();
    let mut req = Request {
        federation: fed.clone(),
        id: id.to_string(),
        role,
        public_key: None,
        csr: tls.request(id, &fed)?,
        signature: None,
    };
    if role == Role::Site {
        let key_path = SiteKeys::key_path(dir, id);
        let keys = if key_path.exists() {
            SiteKeys::load(&key_path)?
        } else {
            let k = SiteKeys::generate(id)?;
            k.save(dir)?;
            k
        };
        req.public_key = Some(keys.public_hex());
        req.signature = Some(to_hex(&keys.sign(req.signed_text().as_bytes())));
    }
    let path = dir.join(REQUEST_FILE);
    files::write(&path, &req.to_toml())?;
    Ok(path)
}

/// Whom a kit is for (`kit.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KitInfo {
    /// The federation.
    pub federation: String,
    /// The member's id.
    pub id: String,
    /// Site or observer.
    pub role: Role,
}

impl KitInfo {
    /// Reads `kit/kit.toml`.
    pub fn load(kit: &Path) -> Result<KitInfo, ProvisionError> {
        let path = kit.join(KIT_FILE);
        toml::from_str(&files::read(&path)?).map_err(|e| ProvisionError::State {
            path,
            reason: format!("not a Cosilo kit description: {}", e.message()),
        })
    }
}

/// What `install` put in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Whom the kit is for.
    pub info: KitInfo,
    /// The files written into the site folder.
    pub files: Vec<PathBuf>,
}

/// Checks the kit at `kit` against the keys in `dir` and copies it there: the certificate must
/// certify this site's TLS key, and (for a site) the roster must hold this site's signing key.
/// Installing again (a new roster after a member joined or left) replaces the public files.
pub fn install(kit: &Path, dir: &Path) -> Result<Installed, ProvisionError> {
    let info = KitInfo::load(kit)?;
    let mismatch = |reason: String| ProvisionError::KitMismatch {
        kit: kit.to_path_buf(),
        site: dir.to_path_buf(),
        reason,
    };
    let decl = Declaration::load(&kit.join("federation.toml"))?;
    if decl.federation.name != info.federation {
        return Err(mismatch(format!(
            "kit.toml names federation {:?}, its declaration {:?}",
            info.federation, decl.federation.name
        )));
    }
    let cert_name = format!("{}.crt", info.id);
    let cert = files::read(&kit.join(&cert_name))?;
    let tls = TlsKey::load(&dir.join(TLS_KEY_FILE))?;
    if !tls.matches_certificate(&cert)? {
        return Err(mismatch(format!(
            "{cert_name} certifies another key than {}",
            dir.join(TLS_KEY_FILE).display()
        )));
    }
    let roster_path = kit.join("roster.toml");
    let roster = Roster::load(&roster_path)?;
    if roster.name() != info.federation {
        return Err(mismatch(format!(
            "the roster is of federation {:?}",
            roster.name()
        )));
    }
    let mut names: Vec<String> = KIT_FILES.iter().map(|s| s.to_string()).collect();
    names.push(cert_name);
    names.push(KIT_FILE.to_string());
    if info.role == Role::Site {
        let keys = SiteKeys::load(&SiteKeys::key_path(dir, &info.id))?;
        match roster.verifying_key(&info.id) {
            Some(k) if *k == keys.verifying_key() => {}
            Some(_) => {
                return Err(mismatch(format!(
                    "the roster holds another signing key for {}",
                    info.id
                )))
            }
            None => return Err(mismatch(format!("the roster does not list {}", info.id))),
        }
        // The site's configuration is installed once: installing again (a new roster) keeps
        // what the site changed in it (its store folder, say).
        if kit.join("site.toml").exists() && !dir.join("site.toml").exists() {
            names.push("site.toml".to_string());
        }
    }
    let mut written = Vec::new();
    for name in names {
        let text = files::read(&kit.join(&name))?;
        let to = dir.join(&name);
        files::write(&to, &text)?;
        written.push(to);
    }
    Ok(Installed {
        info,
        files: written,
    })
}
