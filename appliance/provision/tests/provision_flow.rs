//! The whole provisioning path on files: operator init, three sites and an observer request,
//! the operator admits, the sites install; refusals of bad requests and mismatched kits; removal
//! revokes the certificate (checked by `openssl verify -crl_check` as an independent reader) and
//! drops the site from the roster and the ACL.

use std::path::{Path, PathBuf};
use std::process::Command;

use cosilo_federation::keys::{Roster, SiteKeys};
use cosilo_provision::site::{self, Request};
use cosilo_provision::{Operator, ProvisionError};

const DECL: &str = r#"
[federation]
name = "trial"
security = "mtls"

[strategy]
kind = "fedavg"
rounds = 2

[broker]
kind = "mosquitto"
host = "localhost"
port = 18883

[[site]]
id = "h1"

[[site]]
id = "h2"

[[site]]
id = "h3"

[[observer]]
id = "notebook"
"#;

struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    decl: PathBuf,
    op: Operator,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let decl = root.join("federation.toml");
        std::fs::write(&decl, DECL).unwrap();
        let op = Operator::init(&decl, &root.join("ops")).unwrap();
        Setup {
            _tmp: tmp,
            root,
            decl,
            op,
        }
    }

    fn site_dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    fn request(&self, id: &str) -> PathBuf {
        let d = cosilo_provision::Declaration::load(&self.decl).unwrap();
        site::request(&d, id, &self.site_dir(id)).unwrap()
    }

    fn join(&mut self, id: &str) -> PathBuf {
        let req = self.request(id);
        let kit = self.op.admit(&req).unwrap();
        site::install(&kit, &self.site_dir(id)).unwrap();
        kit
    }
}

fn openssl_verify(ca: &Path, crl: &Path, cert: &Path) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(ca)
        .arg("-CRLfile")
        .arg(crl)
        .arg(cert)
        .output()
        .expect("running openssl (apt-get install openssl)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn three_sites_and_an_observer_join_and_a_removed_site_is_revoked() {
    let mut s = Setup::new();
    for id in ["h1", "h2", "h3", "notebook"] {
        s.join(id);
    }
    // Secrets stay where they were made: the operator folder holds no site key.
    for id in ["h1", "h2", "h3"] {
        let d = s.site_dir(id);
        assert!(d.join(format!("{id}.key")).exists() && d.join("tls.key").exists());
        #[cfg(unix)]
        assert_eq!(mode(&d.join("tls.key")), 0o600);
        assert!(!s.op.dir().join("kits").join(id).join("tls.key").exists());
        assert!(!s
            .op
            .dir()
            .join("kits")
            .join(id)
            .join(format!("{id}.key"))
            .exists());
    }
    #[cfg(unix)]
    assert_eq!(mode(&s.op.dir().join("ca.key")), 0o600);
    // h1 installed its kit when it was alone; its kit now carries the three sites, and
    // installing it again picks the new roster up.
    let early = Roster::load(&s.site_dir("h1").join("roster.toml")).unwrap();
    assert_eq!(early.sites().len(), 1);
    site::install(&s.op.kit_dir("h1"), &s.site_dir("h1")).unwrap();
    // The notebook is not on the roster; the three sites are, with their own keys.
    let roster = Roster::load(&s.site_dir("h1").join("roster.toml")).unwrap();
    let ids: Vec<&str> = roster.sites().iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["h1", "h2", "h3"]);
    let k2 = SiteKeys::load(&s.site_dir("h2").join("h2.key")).unwrap();
    assert_eq!(roster.verifying_key("h2"), Some(&k2.verifying_key()));
    // Every certificate verifies against the CA and the CRL with OpenSSL.
    let ca = s.site_dir("h1").join("ca.crt");
    let crl = s.op.dir().join("crl.pem");
    for id in ["h1", "h2", "h3", "notebook"] {
        let (ok, text) = openssl_verify(&ca, &crl, &s.site_dir(id).join(format!("{id}.crt")));
        assert!(ok, "{id}: {text}");
    }
    let acl = std::fs::read_to_string(s.op.dir().join("mosquitto/acl")).unwrap();
    assert!(
        acl.contains("user h2\ntopic write cosilo/trial/presence/h2\n"),
        "{acl}"
    );
    assert!(
        acl.contains("user notebook\ntopic read cosilo/trial/#\n"),
        "{acl}"
    );
    assert!(
        !acl.contains("topic write cosilo/trial/updates/notebook"),
        "{acl}"
    );
    let conf = std::fs::read_to_string(s.op.mosquitto_conf_path()).unwrap();
    for line in [
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "listener 18883",
    ] {
        assert!(conf.contains(line), "{line} missing from\n{conf}");
    }

    // Remove h2: revoked (OpenSSL now refuses its certificate), off the roster, the ACL and its
    // kit gone, the other members' kits carry the new roster and installing it again picks it up.
    s.op.remove("h2").unwrap();
    let (ok, text) = openssl_verify(&ca, &crl, &s.site_dir("h2").join("h2.crt"));
    assert!(!ok && text.contains("revoked"), "{text}");
    let (ok, text) = openssl_verify(&ca, &crl, &s.site_dir("h1").join("h1.crt"));
    assert!(ok, "{text}");
    let acl = std::fs::read_to_string(s.op.dir().join("mosquitto/acl")).unwrap();
    assert!(!acl.contains("user h2"), "{acl}");
    assert!(!s.op.kit_dir("h2").exists());
    let kit1 = s.op.kit_dir("h1");
    let new_roster = Roster::load(&kit1.join("roster.toml")).unwrap();
    assert!(!new_roster.contains("h2") && new_roster.contains("h3"));
    site::install(&kit1, &s.site_dir("h1")).unwrap();
    let installed = Roster::load(&s.site_dir("h1").join("roster.toml")).unwrap();
    assert_eq!(installed, new_roster);
    // Removing again is refused; re-opening the folder sees the same members.
    assert!(matches!(
        s.op.remove("h2"),
        Err(ProvisionError::NotMember(_))
    ));
    let again = Operator::open(s.op.dir()).unwrap();
    assert_eq!(again.members(), s.op.members());
    assert!(again.member("h2").is_none() && again.member("h3").is_some());
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let mut s = Setup::new();
    let req_path = s.request("h1");
    let good = Request::load(&req_path).unwrap();
    let state_before = std::fs::read_to_string(s.op.dir().join("members.toml")).unwrap();

    // A signature that does not match (the CSR swapped for another site's).
    let other = Request::load(&s.request("h2")).unwrap();
    let mut forged = good.clone();
    forged.csr = other.csr.clone();
    let p = s.root.join("forged.toml");
    std::fs::write(&p, forged.to_toml()).unwrap();
    let e = s.op.admit(&p).unwrap_err().to_string();
    assert!(e.contains("signature does not verify"), "{e}");

    // A CSR for another name than the requester's id (signed consistently by h2's own key).
    let mut renamed = other.clone();
    renamed.id = "h3".into();
    let p = s.root.join("renamed.toml");
    std::fs::write(&p, renamed.to_toml()).unwrap();
    let e = s.op.admit(&p).unwrap_err().to_string();
    assert!(e.contains("signature") || e.contains("name"), "{e}");

    // A corrupted CSR.
    let mut broken = good.clone();
    broken.csr = broken.csr.replace("MI", "MA");
    let p = s.root.join("broken.toml");
    std::fs::write(&p, broken.to_toml()).unwrap();
    assert!(s.op.admit(&p).is_err());

    // Another federation; an undeclared id.
    let mut elsewhere = good.clone();
    elsewhere.federation = "other".into();
    let p = s.root.join("elsewhere.toml");
    std::fs::write(&p, elsewhere.to_toml()).unwrap();
    let e = s.op.admit(&p).unwrap_err().to_string();
    assert!(e.contains("\"other\""), "{e}");
    let d = cosilo_provision::Declaration::load(&s.decl).unwrap();
    let e = site::request(&d, "h9", &s.site_dir("h9")).unwrap_err();
    assert!(matches!(e, ProvisionError::NotDeclared { .. }), "{e}");

    // Not a request at all.
    let p = s.root.join("junk.toml");
    std::fs::write(&p, "hello").unwrap();
    let e = s.op.admit(&p).unwrap_err().to_string();
    assert!(e.contains("junk.toml"), "{e}");

    let state_after = std::fs::read_to_string(s.op.dir().join("members.toml")).unwrap();
    assert_eq!(
        state_before, state_after,
        "a refused request changed the state"
    );
    assert!(!s.op.roster_path().exists());

    // The good one passes; the same id again is refused.
    s.op.admit(&req_path).unwrap();
    let e = s.op.admit(&req_path).unwrap_err();
    assert!(matches!(e, ProvisionError::AlreadyMember(_)), "{e}");
}

#[test]
fn a_kit_installs_only_on_the_site_that_asked_for_it() {
    let mut s = Setup::new();
    let kit1 = s.join("h1");
    s.request("h2");
    // h1's kit on h2's folder: the certificate is for another TLS key.
    let e = site::install(&kit1, &s.site_dir("h2"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("certifies another key"), "{e}");
    assert!(!s.site_dir("h2").join("roster.toml").exists());
    // Requesting again reuses the keys (same public key), never overwrites them.
    let before = std::fs::read_to_string(s.site_dir("h2").join("tls.key")).unwrap();
    s.request("h2");
    assert_eq!(
        before,
        std::fs::read_to_string(s.site_dir("h2").join("tls.key")).unwrap()
    );
    // A key file others can read is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let p = s.site_dir("h2").join("tls.key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let d = cosilo_provision::Declaration::load(&s.decl).unwrap();
        let e = site::request(&d, "h2", &s.site_dir("h2")).unwrap_err();
        assert!(matches!(e, ProvisionError::Permissions { .. }), "{e}");
    }
    // A second init into the same folder is refused.
    let e = Operator::init(&s.decl, s.op.dir()).err().unwrap();
    assert!(matches!(e, ProvisionError::AlreadyInitialised(_)), "{e}");
}
