//! Provisioning: a federation declared in one file and set up without central secrets.
//!
//! - [`declaration`]: `federation.toml` (name, security mode, strategy and hyper-parameters,
//!   model, broker, sites, observers) parsed into types and validated.
//! - [`site`]: on each site, `request` makes the site's signing key (Ed25519) and TLS key (ECDSA
//!   P-256) locally and writes a request (certificate signing request + public key, signed with
//!   both keys); `install` checks and installs the operator's answer (the kit).
//! - [`operator`]: `init` makes the federation's CA; `admit` checks a request, signs the
//!   certificate, adds the public key to the roster and writes the kit (declaration, roster, CA
//!   certificate, the member's certificate) for it and the new roster into every member's kit;
//!   `remove` revokes a certificate (CRL) and drops the site from the roster.
//! - [`mosquitto`]: the external broker's configuration (mutual TLS, identity as user name,
//!   CRL, and a topic ACL: each site publishes only under its own topics, observers only read).
//! - [`pki`]: the certificates, made with rcgen.
//!
//! Secret keys never leave the machine that made them: the operator holds only the CA key (and
//! the broker's), a site only its own keys. Depends on the federation crate and lower, never on
//! candle or sled; the site configuration a kit carries is written by the appliance.

pub mod declaration;
mod files;
pub mod mosquitto;
pub mod operator;
pub mod pki;
pub mod site;

use std::path::PathBuf;

pub use declaration::{Declaration, DeclarationError, Security};
pub use operator::{Operator, Role};

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The declaration is unreadable or invalid.
    #[error(transparent)]
    Declaration(#[from] DeclarationError),
    /// A signing key or roster operation failed.
    #[error(transparent)]
    Keys(#[from] cosilo_federation::keys::KeysError),
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A secret file would be overwritten.
    #[error("{0} already exists; a key is never overwritten (move it away to replace it)")]
    Exists(PathBuf),
    /// A secret file is readable by others.
    #[error("{path} has mode {mode:o}: a secret key must not be readable by group or others (chmod 600 it)")]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Making, reading or signing a certificate, key or CRL failed.
    #[error("{what}: {reason}")]
    Pki {
        /// What was attempted.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A request cannot be admitted.
    #[error("the request of {id:?} is refused: {reason}")]
    BadRequest {
        /// The requester's id.
        id: String,
        /// Why.
        reason: String,
    },
    /// An id that the declaration does not name.
    #[error("{id:?} is neither a site nor an observer of federation {federation:?}: add it to the declaration first")]
    NotDeclared {
        /// The id.
        id: String,
        /// The federation.
        federation: String,
    },
    /// The id is already an active member.
    #[error("{0:?} is already admitted; remove it first to replace its keys")]
    AlreadyMember(String),
    /// The id is not an active member.
    #[error("{0:?} is not an admitted member")]
    NotMember(String),
    /// The operator folder has not been initialised.
    #[error("{0} is not an operator folder (run `cosilo federation init` first)")]
    NotInitialised(PathBuf),
    /// The operator folder already holds a federation.
    #[error("{0} already holds a federation's CA; use another folder")]
    AlreadyInitialised(PathBuf),
    /// A state file is malformed.
    #[error("{path}: {reason}")]
    State {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A kit does not fit the site it is installed on.
    #[error("the kit {kit} does not fit {site}: {reason}")]
    KitMismatch {
        /// The kit folder.
        kit: PathBuf,
        /// The site folder.
        site: PathBuf,
        /// Why.
        reason: String,
    },
}
