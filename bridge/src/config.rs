//! Typed configuration of the bridge's network side: our SCP (AE title, port, allowlist, limits),
//! the spool and its disk reserve, the PACS we query and write back to, and the write-back retry
//! policy. [`NetworkConfig::validate`] checks it before anything starts; [`NetworkConfig::scp`] and
//! [`NetworkConfig::retry_policy`] turn it into the runtime types of [`crate::scp`] and
//! [`crate::outbox`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::outbox::RetryPolicy;
use crate::scp::ScpConfig;
use crate::scu::PeerAe;

/// The network part of the bridge's configuration (its `[network]` table, inside [`crate::pipeline::BridgeConfig`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Our AE title, for the SCP and as calling AE.
    pub ae_title: String,
    /// Where the SCP listens.
    pub bind: SocketAddr,
    /// Calling AE titles allowed to send to us; empty allows any.
    #[serde(default)]
    pub allowed_calling_aes: Vec<String>,
    pub max_associations: usize,
    pub max_pdu: u32,
    pub read_timeout_s: u64,
    pub grace_period_s: u64,
    /// Where received instances are spooled.
    pub spool_dir: PathBuf,
    /// Free space the spool never eats into.
    pub reserve_bytes: u64,
    /// The hospital PACS (query/retrieve and write-back), if configured.
    #[serde(default)]
    pub pacs: Option<PeerAe>,
    /// The write-back queue.
    pub outbox_dir: PathBuf,
    pub outbox_max_attempts: u32,
    pub outbox_base_delay_s: u64,
    pub outbox_max_delay_s: u64,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid bridge configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: &'static str,
    pub reason: String,
}

fn valid_ae(ae: &str) -> bool {
    let t = ae.trim();
    !t.is_empty()
        && ae.len() <= 16
        && ae
            .chars()
            .all(|c| c.is_ascii() && !c.is_ascii_control() && c != '\\')
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            ae_title: "COSILO".into(),
            bind: SocketAddr::from(([0, 0, 0, 0], 11112)),
            allowed_calling_aes: Vec::new(),
            max_associations: 8,
            max_pdu: 65_536,
            read_timeout_s: 60,
            grace_period_s: 10,
            spool_dir: PathBuf::from("/var/lib/cosilo/spool"),
            reserve_bytes: 5 << 30,
            pacs: None,
            outbox_dir: PathBuf::from("/var/lib/cosilo/outbox"),
            outbox_max_attempts: 10,
            outbox_base_delay_s: 30,
            outbox_max_delay_s: 3600,
        }
    }
}

impl NetworkConfig {
    /// Checks every field that could make the bridge fail at run time.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |field, reason: &str| {
            Err(ConfigError {
                field,
                reason: reason.into(),
            })
        };
        if !valid_ae(&self.ae_title) {
            return err("ae_title", "1-16 ASCII characters, no backslash");
        }
        if let Some(bad) = self.allowed_calling_aes.iter().find(|a| !valid_ae(a)) {
            return Err(ConfigError {
                field: "allowed_calling_aes",
                reason: format!("{bad:?} is not an AE title"),
            });
        }
        if self.max_associations == 0 {
            return err("max_associations", "must be at least 1");
        }
        if !(4096..=(1 << 24)).contains(&self.max_pdu) {
            return err("max_pdu", "must be between 4096 and 16 MiB");
        }
        if self.read_timeout_s == 0 {
            return err("read_timeout_s", "must be at least 1 s");
        }
        if let Some(p) = &self.pacs {
            if !valid_ae(&p.ae_title) || !valid_ae(&p.calling_ae) {
                return err("pacs", "ae_title and calling_ae must be AE titles");
            }
            if !p.address.contains(':') {
                return err("pacs.address", "must be host:port");
            }
        }
        if self.outbox_max_attempts == 0 {
            return err("outbox_max_attempts", "must be at least 1");
        }
        if self.outbox_base_delay_s > self.outbox_max_delay_s {
            return err("outbox_base_delay_s", "must not exceed outbox_max_delay_s");
        }
        Ok(())
    }

    /// The SCP settings.
    pub fn scp(&self) -> ScpConfig {
        ScpConfig {
            ae_title: self.ae_title.clone(),
            bind: self.bind,
            allowed_calling_aes: self.allowed_calling_aes.clone(),
            max_associations: self.max_associations,
            max_pdu: self.max_pdu,
            read_timeout: Duration::from_secs(self.read_timeout_s),
            grace_period: Duration::from_secs(self.grace_period_s),
        }
    }

    /// The write-back retry policy.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.outbox_max_attempts,
            base_delay: Duration::from_secs(self.outbox_base_delay_s),
            max_delay: Duration::from_secs(self.outbox_max_delay_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips_through_toml() {
        let c = NetworkConfig::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: NetworkConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn bad_values_name_their_field() {
        let mut c = NetworkConfig {
            ae_title: "THIS-TITLE-IS-TOO-LONG".into(),
            ..Default::default()
        };
        assert_eq!(c.validate().unwrap_err().field, "ae_title");
        c.ae_title = "COSILO".into();
        c.max_associations = 0;
        assert_eq!(c.validate().unwrap_err().field, "max_associations");
    }
}
