//! The external Mosquitto's configuration for a federation, rewritten by every `init`, `admit`
//! and `remove` (Mosquitto reads it when it starts; restart it after a change).
//!
//! With `security = "mtls"`: TLS with client certificates required and checked against the
//! federation's CA and CRL, the certificate's common name as the MQTT user name
//! (`use_identity_as_username`), no anonymous clients, and an ACL in which each site may publish
//! only under its own topics (presence, updates, model, metrics) and on the shared, signed control
//! topic, and read the whole federation; an observer may only read. `tls`: the broker's
//! certificate only (no client identity, no ACL). `none`: plain TCP, anyone connects.

use std::path::Path;

use cosilo_federation::wire::topics;

use crate::declaration::{Declaration, Security};
use crate::operator::{Member, Role};
use crate::{files, ProvisionError};

/// The ACL of the active `members` (revoked ones are left out).
pub fn acl(decl: &Declaration, members: &[Member]) -> String {
    let fed = &decl.federation.name;
    let mut s = format!(
        "# Topic ACL of Cosilo federation {fed}: written by `cosilo federation`; do not edit.\n\
         # A site publishes only under its own topics and on the (signed) control topic; an\n\
         # observer only reads. The user name is the client certificate's common name.\n"
    );
    for m in members.iter().filter(|m| !m.revoked) {
        s.push_str(&format!("\nuser {}\n", m.id));
        if m.role == Role::Site {
            for t in [
                topics::presence(fed, &m.id),
                topics::updates(fed, &m.id),
                topics::model(fed, &m.id),
                topics::metrics(fed, &m.id),
                topics::control(fed),
            ] {
                s.push_str(&format!("topic write {t}\n"));
            }
        }
        s.push_str(&format!("topic read {}\n", topics::all(fed)));
    }
    s
}

/// The configuration for a broker whose files live in `mosquitto` (absolute) beside the
/// operator's `ca.crt` and `crl.pem` in `ops` (absolute).
pub fn conf(decl: &Declaration, ops: &Path) -> String {
    let fed = &decl.federation.name;
    let b = &decl.broker;
    let p = |name: &str| ops.join(name).display().to_string();
    let mut s = format!(
        "# Mosquitto configuration of Cosilo federation {fed}: written by `cosilo federation`\n\
         # (init, admit, remove); restart Mosquitto after each change. Security: {:?}.\n\
         per_listener_settings false\n\
         max_packet_size {}\n",
        decl.federation.security, b.max_packet_bytes
    );
    match decl.federation.security {
        Security::Mtls => s.push_str(&format!(
            "allow_anonymous false\nacl_file {}\n",
            p("mosquitto/acl")
        )),
        Security::Tls | Security::None => s.push_str("allow_anonymous true\n"),
    }
    s.push_str(&format!("\nlistener {}\n", b.port));
    if decl.uses_tls() {
        s.push_str(&format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            p("ca.crt"),
            p("mosquitto/server.crt"),
            p("mosquitto/server.key")
        ));
    }
    if decl.federation.security == Security::Mtls {
        s.push_str(&format!(
            "require_certificate true\nuse_identity_as_username true\ncrlfile {}\n",
            p("crl.pem")
        ));
    }
    s
}

/// Writes `ops/mosquitto/mosquitto.conf` and `ops/mosquitto/acl`.
pub(crate) fn write(
    ops: &Path,
    decl: &Declaration,
    members: &[Member],
) -> Result<(), ProvisionError> {
    let abs = std::fs::canonicalize(ops).map_err(|source| ProvisionError::Read {
        path: ops.to_path_buf(),
        source,
    })?;
    files::write(&ops.join("mosquitto/acl"), &acl(decl, members))?;
    files::write(&ops.join("mosquitto/mosquitto.conf"), &conf(decl, &abs))
}
