//! The federation's certificates, made with rcgen (ECDSA P-256, PEM that rustls and OpenSSL
//! read): the operator's CA, the broker's server certificate, a site's TLS key and certificate
//! signing request, the CA's signature on a request, and the certificate revocation list.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

use crate::files;
use crate::ProvisionError;

/// How long the CA is valid.
const CA_DAYS: i64 = 3650;
/// How long a site's, an observer's or the broker's certificate is valid.
const CERT_DAYS: i64 = 365;
/// How long a CRL is valid: OpenSSL (Mosquitto) refuses every client once it has expired, so it
/// lasts as long as the certificates; every admission and removal writes a fresh one.
const CRL_DAYS: i64 = 365;

fn pki(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> ProvisionError {
    let what = what.into();
    move |e| ProvisionError::Pki {
        what,
        reason: e.to_string(),
    }
}

fn name(common_name: &str, federation: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(
        DnType::OrganizationName,
        format!("Cosilo federation {federation}"),
    );
    dn
}

/// The federation's certificate authority: its key (kept by the operator) and certificate.
pub struct Ca {
    key: KeyPair,
    cert: Certificate,
}

impl Ca {
    /// A new CA for `federation`.
    pub fn generate(federation: &str) -> Result<Ca, ProvisionError> {
        let key = KeyPair::generate().map_err(pki("generating the CA key"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("Cosilo {federation} CA"), federation);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CA_DAYS);
        params.serial_number = Some(SerialNumber::from(1u64));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key).map_err(pki("signing the CA"))?;
        Ok(Ca { key, cert })
    }

    /// Reads the CA from its key and certificate files.
    pub fn load(key_path: &Path, cert_path: &Path) -> Result<Ca, ProvisionError> {
        let key_pem = files::read_secret(key_path)?;
        let cert_pem = files::read(cert_path)?;
        let key =
            KeyPair::from_pem(&key_pem).map_err(pki(format!("reading {}", key_path.display())))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(pki(format!("reading {}", cert_path.display())))?;
        // Re-signing the same parameters gives an issuer with the same name and key identifier;
        // only its own signature (never used) differs from the file's.
        let cert = params
            .self_signed(&key)
            .map_err(pki("loading the CA certificate"))?;
        Ok(Ca { key, cert })
    }

    /// The CA key in PEM (secret).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for the broker, valid for `names` (DNS names or IP addresses), with
    /// a key made here. Returns (certificate PEM, key PEM).
    pub fn broker_certificate(
        &self,
        federation: &str,
        names: &[String],
        serial: u64,
    ) -> Result<(String, String), ProvisionError> {
        let key = KeyPair::generate().map_err(pki("generating the broker key"))?;
        let mut params =
            CertificateParams::new(names.to_vec()).map_err(pki("the broker's names"))?;
        params.distinguished_name = name(&names[0], federation);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.validity(&mut params, serial);
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(pki("signing the broker certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Signs a site's or observer's request: checks the request's own signature (proof that the
    /// requester holds the key), then issues a client certificate for `id` with the request's
    /// public key. Nothing else of the request (names, extensions) is copied.
    pub fn sign_request(
        &self,
        csr_pem: &str,
        federation: &str,
        id: &str,
        serial: u64,
    ) -> Result<String, ProvisionError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            ProvisionError::BadRequest {
                id: id.to_string(),
                reason: format!("the certificate signing request does not verify: {e}"),
            }
        })?;
        let cn = csr
            .params
            .distinguished_name
            .get(&DnType::CommonName)
            .and_then(dn_string);
        if cn.as_deref() != Some(id) {
            return Err(ProvisionError::BadRequest {
                id: id.to_string(),
                reason: format!("the request is for the name {cn:?}, not {id:?}"),
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = name(id, federation);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.validity(&mut params, serial);
        csr.params = params;
        let cert = csr
            .signed_by(&self.cert, &self.key)
            .map_err(pki(format!("signing {id}'s certificate")))?;
        Ok(cert.pem())
    }

    /// The revocation list: every serial in `revoked`, numbered `number`.
    pub fn crl(&self, number: u64, revoked: &[u64]) -> Result<String, ProvisionError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(CRL_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|&s| RevokedCertParams {
                    serial_number: SerialNumber::from(s),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.cert, &self.key)
            .map_err(pki("signing the revocation list"))?;
        crl.pem().map_err(pki("encoding the revocation list"))
    }

    fn validity(&self, params: &mut CertificateParams, serial: u64) {
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(CERT_DAYS);
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
    }
}

fn dn_string(v: &rcgen::DnValue) -> Option<String> {
    match v {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_string()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A site's (or observer's) TLS key: made on the site, it never leaves it.
pub struct TlsKey {
    key: KeyPair,
}

impl TlsKey {
    /// A fresh ECDSA P-256 key.
    pub fn generate() -> Result<TlsKey, ProvisionError> {
        Ok(TlsKey {
            key: KeyPair::generate().map_err(pki("generating the TLS key"))?,
        })
    }

    /// Reads a key file (refused when others can read it).
    pub fn load(path: &Path) -> Result<TlsKey, ProvisionError> {
        let pem = files::read_secret(path)?;
        Ok(TlsKey {
            key: KeyPair::from_pem(&pem).map_err(pki(format!("reading {}", path.display())))?,
        })
    }

    /// The key in PEM (PKCS#8; secret).
    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public key as DER SubjectPublicKeyInfo (as it appears inside a certificate).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.public_key_der()
    }

    /// A certificate signing request for the name `id`, signed with this key.
    pub fn request(&self, id: &str, federation: &str) -> Result<String, ProvisionError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(id, federation);
        params
            .serialize_request(&self.key)
            .and_then(|csr| csr.pem())
            .map_err(pki("making the certificate signing request"))
    }

    /// Whether `cert_pem` certifies this key (its SubjectPublicKeyInfo is this key's).
    pub fn matches_certificate(&self, cert_pem: &str) -> Result<bool, ProvisionError> {
        let der = pem_der(cert_pem, "CERTIFICATE")?;
        let spki = self.public_key_der();
        Ok(der.windows(spki.len()).any(|w| w == spki.as_slice()))
    }
}

/// The DER bytes of the first PEM block with `label`.
pub fn pem_der(text: &str, label: &str) -> Result<Vec<u8>, ProvisionError> {
    let blocks = pem::parse_many(text).map_err(|e| ProvisionError::Pki {
        what: format!("reading a PEM {label}"),
        reason: e.to_string(),
    })?;
    blocks
        .into_iter()
        .find(|b| b.tag() == label)
        .map(|b| b.into_contents())
        .ok_or_else(|| ProvisionError::Pki {
            what: format!("reading a PEM {label}"),
            reason: format!("no {label} block"),
        })
}

/// Where the operator keeps the CA.
pub fn ca_paths(ops: &Path) -> (PathBuf, PathBuf) {
    (ops.join("ca.key"), ops.join("ca.crt"))
}
