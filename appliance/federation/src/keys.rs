//! A site's signing key and the federation's roster of members.
//!
//! Every appliance holds one Ed25519 key ([`SiteKeys`]), generated on the box (`cosilo keygen`)
//! and never leaving it: a small text file of mode 0600 holding the 32-byte secret seed in hex.
//! Loading refuses a key file that other users can read. The federation is defined by a
//! [`Roster`], a TOML file every member holds the same copy of: its name and, per site, the id
//! and public key. A message is accepted only when its sender is on the roster and its signature
//! verifies with that site's key (see `wire`). Site and federation ids appear in MQTT topics, so
//! they are restricted to `[a-z0-9_-]{1,32}`.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::Deserialize;

/// A failed key or roster operation.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// A site or federation id outside `[a-z0-9_-]{1,32}`.
    #[error("invalid id {0:?}: use 1-32 characters of a-z, 0-9, '_' and '-'")]
    BadId(String),
    /// The operating system's random source failed.
    #[error("no randomness for key generation: {0}")]
    Random(String),
    /// A key file already exists (never overwritten: that would lose the site's identity).
    #[error("{0} already exists; move it away first to replace the site's key")]
    Exists(PathBuf),
    /// Writing a key file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading a key or roster file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A secret key file is readable by other users.
    #[error("{path} has mode {mode:o}: a secret key must not be readable by group or others (chmod 600 it)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A key file is malformed.
    #[error("{path}: not a Cosilo key file: {reason}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A roster is malformed (TOML, duplicate or bad ids, bad keys).
    #[error("roster {origin}: {reason}")]
    Roster {
        /// The file (or "<string>").
        origin: String,
        /// What is wrong.
        reason: String,
    },
}

/// Checks a site or federation id: `^[a-z0-9_-]{1,32}$` (it becomes an MQTT topic level).
pub fn validate_id(id: &str) -> Result<(), KeysError> {
    let ok = (1..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(KeysError::BadId(id.to_string()))
    }
}

/// Lower-case hex of some bytes.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.as_bytes();
    if s.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

/// One site's Ed25519 key pair.
pub struct SiteKeys {
    site: String,
    signing: SigningKey,
}

impl fmt::Debug for SiteKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secret.
        f.debug_struct("SiteKeys")
            .field("site", &self.site)
            .field("public", &self.public_hex())
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    site: String,
    secret_key: String,
}

impl SiteKeys {
    /// A fresh key pair for `site` from the operating system's random source.
    pub fn generate(site: &str) -> Result<Self, KeysError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeysError::Random(e.to_string()))?;
        Self::from_seed(site, seed)
    }

    /// The key pair for a given secret seed (tests and key import).
    pub fn from_seed(site: &str, seed: [u8; 32]) -> Result<Self, KeysError> {
        validate_id(site)?;
        Ok(SiteKeys {
            site: site.to_string(),
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// The site's id.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The public key's 32 bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The public key in hex, as the roster holds it.
    pub fn public_hex(&self) -> String {
        to_hex(&self.public_bytes())
    }

    /// The roster entry for this site (TOML).
    pub fn roster_entry(&self) -> String {
        format!(
            "[[site]]\nid = \"{}\"\npublic_key = \"{}\"\n",
            self.site,
            self.public_hex()
        )
    }

    /// Signs `message` (Ed25519, 64 bytes).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// Path of the secret key file for `site` in `dir`.
    pub fn key_path(dir: &Path, site: &str) -> PathBuf {
        dir.join(format!("{site}.key"))
    }

    /// Writes `DIR/{site}.key` (secret, mode 0600, created exclusively: an existing key is never
    /// overwritten) and `DIR/{site}.pub` (the roster entry). Returns the key file's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, KeysError> {
        std::fs::create_dir_all(dir).map_err(|source| KeysError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = Self::key_path(dir, &self.site);
        let text = format!(
            "# Cosilo site key (Ed25519 secret seed). Keep it secret: it never leaves this box.\n\
             site = \"{}\"\nsecret_key = \"{}\"\n",
            self.site,
            to_hex(self.signing.as_bytes())
        );
        let write_err = |source| KeysError::Write {
            path: path.clone(),
            source,
        };
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeysError::Exists(path.clone())
            } else {
                write_err(e)
            }
        })?;
        f.write_all(text.as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
        let pub_path = dir.join(format!("{}.pub", self.site));
        std::fs::write(&pub_path, self.roster_entry()).map_err(|source| KeysError::Write {
            path: pub_path,
            source,
        })?;
        Ok(path)
    }

    /// Reads a key file written by [`SiteKeys::save`]; refuses one readable by group or others.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let read_err = |source| KeysError::Read {
            path: path.to_path_buf(),
            source,
        };
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)
                .map_err(read_err)?
                .permissions()
                .mode()
                & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeysError::Permissions {
                    path: path.to_path_buf(),
                    mode,
                });
            }
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        let bad = |reason: String| KeysError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let file: KeyFile = toml::from_str(&text).map_err(|e| bad(e.message().to_string()))?;
        let seed = from_hex::<32>(&file.secret_key)
            .ok_or_else(|| bad("secret_key must be 64 hex digits".into()))?;
        Self::from_seed(&file.site, seed)
    }
}

/// One member of the federation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterSite {
    /// The site's id (MQTT topic level).
    pub id: String,
    /// Its public key.
    pub public_key: VerifyingKey,
    /// Its approximate number of training samples, if the federation shares it up front.
    pub samples_hint: Option<u64>,
}

/// The federation's members and their public keys, from a TOML file.
///
/// ```toml
/// [federation]
/// name = "demo"
///
/// [[site]]
/// id = "h1"
/// public_key = "<64 hex digits>"
/// samples_hint = 40   # optional
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    name: String,
    sites: Vec<RosterSite>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RosterFile {
    federation: FederationSection,
    #[serde(default)]
    site: Vec<SiteSection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FederationSection {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteSection {
    id: String,
    public_key: String,
    samples_hint: Option<u64>,
}

impl Roster {
    /// A roster of `sites` for the federation `name`, validated as a file is.
    pub fn new(name: &str, sites: Vec<RosterSite>) -> Result<Self, KeysError> {
        let name = name.to_string();
        Self::parse(&Roster { name, sites }.to_toml(), "a new roster")
    }

    /// Reads and validates a roster file.
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates roster TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, KeysError> {
        let bad = |reason: String| KeysError::Roster {
            origin: origin.to_string(),
            reason,
        };
        let file: RosterFile = toml::from_str(text).map_err(|e| bad(e.message().to_string()))?;
        validate_id(&file.federation.name).map_err(|e| bad(format!("federation name: {e}")))?;
        if file.site.is_empty() {
            return Err(bad("no [[site]] entries".into()));
        }
        let mut sites: Vec<RosterSite> = Vec::with_capacity(file.site.len());
        for s in file.site {
            validate_id(&s.id).map_err(|e| bad(format!("site: {e}")))?;
            if sites.iter().any(|o| o.id == s.id) {
                return Err(bad(format!("site {:?} is listed twice", s.id)));
            }
            let bytes = from_hex::<32>(&s.public_key)
                .ok_or_else(|| bad(format!("site {}: public_key must be 64 hex digits", s.id)))?;
            let key = VerifyingKey::from_bytes(&bytes)
                .map_err(|_| bad(format!("site {}: public_key is not an Ed25519 point", s.id)))?;
            if key.is_weak() {
                return Err(bad(format!(
                    "site {}: public_key is a weak (small-order) key",
                    s.id
                )));
            }
            if let Some(o) = sites.iter().find(|o| o.public_key == key) {
                return Err(bad(format!(
                    "sites {} and {} share a public key",
                    o.id, s.id
                )));
            }
            sites.push(RosterSite {
                id: s.id,
                public_key: key,
                samples_hint: s.samples_hint,
            });
        }
        Ok(Roster {
            name: file.federation.name,
            sites,
        })
    }

    /// The federation's name (the MQTT topic prefix's second level).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The members, in file order.
    pub fn sites(&self) -> &[RosterSite] {
        &self.sites
    }

    /// A member's entry.
    pub fn site(&self, id: &str) -> Option<&RosterSite> {
        self.sites.iter().find(|s| s.id == id)
    }

    /// A member's public key, `None` for a non-member.
    pub fn verifying_key(&self, id: &str) -> Option<&VerifyingKey> {
        self.site(id).map(|s| &s.public_key)
    }

    /// Whether `id` is a member.
    pub fn contains(&self, id: &str) -> bool {
        self.site(id).is_some()
    }

    /// The roster as TOML that [`Roster::parse`] reads back.
    pub fn to_toml(&self) -> String {
        let mut s = format!("[federation]\nname = \"{}\"\n", self.name);
        for site in &self.sites {
            s.push_str(&format!(
                "\n[[site]]\nid = \"{}\"\npublic_key = \"{}\"\n",
                site.id,
                to_hex(site.public_key.as_bytes())
            ));
            if let Some(h) = site.samples_hint {
                s.push_str(&format!("samples_hint = {h}\n"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster_text(keys: &[&SiteKeys]) -> String {
        let mut s = "[federation]\nname = \"demo\"\n".to_string();
        for k in keys {
            s.push('\n');
            s.push_str(&k.roster_entry());
        }
        s
    }

    #[test]
    fn ids_are_topic_safe() {
        for ok in ["h1", "a", "site_2-b", &"x".repeat(32)] {
            validate_id(ok).unwrap();
        }
        for bad in ["", "H1", "h/1", "h+", "h#", "h 1", "é", &"x".repeat(33)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
        assert!(SiteKeys::generate("H1").is_err());
    }

    #[test]
    fn hex_round_trips_and_refuses_junk() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(to_hex(&b), "0001abff");
        assert_eq!(from_hex::<4>("0001ABff"), Some(b));
        assert_eq!(from_hex::<4>("0001abf"), None);
        assert_eq!(from_hex::<4>("0001abfg"), None);
        assert_eq!(from_hex::<2>("é1"), None);
    }

    #[test]
    fn save_and_load_a_key() {
        let dir = tempfile::tempdir().unwrap();
        let k = SiteKeys::generate("h1").unwrap();
        let path = k.save(dir.path()).unwrap();
        assert_eq!(path, dir.path().join("h1.key"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        let back = SiteKeys::load(&path).unwrap();
        assert_eq!(back.site(), "h1");
        assert_eq!(back.public_hex(), k.public_hex());
        assert_eq!(back.sign(b"x"), k.sign(b"x"));
        // The .pub file is a roster entry.
        let entry = std::fs::read_to_string(dir.path().join("h1.pub")).unwrap();
        let r = Roster::parse(&format!("[federation]\nname = \"f\"\n{entry}"), "pub").unwrap();
        assert_eq!(r.verifying_key("h1"), Some(&k.verifying_key()));
        // Never overwritten.
        let again = SiteKeys::generate("h1").unwrap().save(dir.path());
        assert!(matches!(again, Err(KeysError::Exists(_))));
        assert!(!format!("{k:?}").contains(&to_hex(k.signing.as_bytes())));
    }

    #[cfg(unix)]
    #[test]
    fn readable_key_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = SiteKeys::generate("h2").unwrap().save(dir.path()).unwrap();
        for mode in [0o644, 0o640, 0o604] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = SiteKeys::load(&path).unwrap_err();
            assert!(matches!(e, KeysError::Permissions { .. }), "{e}");
            assert!(e.to_string().contains("chmod 600"));
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        SiteKeys::load(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "site = \"h2\"\nsecret_key = \"zz\"\n").unwrap();
        assert!(matches!(
            SiteKeys::load(&path),
            Err(KeysError::KeyFile { .. })
        ));
    }

    #[test]
    fn roster_parses_and_round_trips() {
        let a = SiteKeys::generate("h1").unwrap();
        let b = SiteKeys::generate("h2").unwrap();
        let text = roster_text(&[&a, &b]) + "samples_hint = 15\n";
        let r = Roster::parse(&text, "t").unwrap();
        assert_eq!(r.name(), "demo");
        assert_eq!(r.sites().len(), 2);
        assert_eq!(r.verifying_key("h2"), Some(&b.verifying_key()));
        assert_eq!(r.site("h2").unwrap().samples_hint, Some(15));
        assert_eq!(r.site("h1").unwrap().samples_hint, None);
        assert!(r.verifying_key("h3").is_none());
        assert_eq!(Roster::parse(&r.to_toml(), "again").unwrap(), r);
    }

    #[test]
    fn bad_rosters_are_refused() {
        let a = SiteKeys::generate("h1").unwrap();
        let b = SiteKeys::generate("h2").unwrap();
        let good = roster_text(&[&a, &b]);
        let off_curve = (2u8..=255)
            .map(|y| {
                let mut k = [0u8; 32];
                k[0] = y;
                k
            })
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .unwrap();
        let cases = [
            // A key that is not hex, of the wrong length, and not a curve point.
            good.replace(&b.public_hex(), &"zz".repeat(32)),
            good.replace(&b.public_hex(), &b.public_hex()[..62]),
            good.replace(&b.public_hex(), &to_hex(&off_curve)),
            // The identity point is a weak key.
            good.replace(&b.public_hex(), &format!("01{}", "00".repeat(31))),
            good.replace("\"h2\"", "\"h1\""),
            good.replace("\"h2\"", "\"H2\""),
            good.replace("\"demo\"", "\"de/mo\""),
            good.replace(&b.public_hex(), &a.public_hex()),
            good.replace("public_key", "publickey"),
            "[federation]\nname = \"x\"\n".to_string(),
            "not toml".to_string(),
        ];
        for (i, text) in cases.iter().enumerate() {
            let e = Roster::parse(text, "case").unwrap_err();
            assert!(matches!(e, KeysError::Roster { .. }), "case {i}: {e}");
        }
        Roster::parse(&good, "good").unwrap();
    }
}
