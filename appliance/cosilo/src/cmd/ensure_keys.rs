//! `cosilo ensure-keys`: a service's secrets at first start (the units' `ExecStartPre=`).

use std::path::PathBuf;

use cosilo_appliance::service::{ensure_deid_key, ensure_site_key, KeyOutcome};

use super::BadConfig;

#[derive(clap::Args, Debug)]
#[command(arg_required_else_help = true)]
pub(crate) struct EnsureKeysArgs {
    /// A site configuration: its federation key (`federation.key`) is made when missing and its
    /// roster entry printed (send it to the federation's operator).
    #[arg(long)]
    pub(crate) site_config: Option<PathBuf>,
    /// A bridge configuration: its de-identification key (`deid.secret_file`) is made when
    /// missing. Back it up with the store: a new key changes every pseudonym.
    #[arg(long)]
    pub(crate) bridge_config: Option<PathBuf>,
}

pub(crate) fn ensure_keys(args: EnsureKeysArgs) -> anyhow::Result<()> {
    use cosilo_appliance::service::ServiceError as E;
    let bad = |e: E| -> anyhow::Error {
        match e {
            E::SiteConfig(_) | E::BridgeConfig(_) | E::KeyName { .. } | E::WrongSite { .. } => {
                BadConfig(e.to_string()).into()
            }
            e => e.into(),
        }
    };
    if let Some(cfg) = &args.site_config {
        let (outcome, keys) = ensure_site_key(cfg).map_err(bad)?;
        match outcome {
            KeyOutcome::Created(p) => eprintln!("made this site's federation key {}", p.display()),
            KeyOutcome::Kept(p) => eprintln!("federation key {} present", p.display()),
            KeyOutcome::NotNeeded => eprintln!("strategy \"local\": no federation key needed"),
        }
        if let Some(keys) = keys {
            eprintln!("this site's roster entry (for the federation's roster.toml):");
            print!("{}", keys.roster_entry());
        }
    }
    if let Some(cfg) = &args.bridge_config {
        match ensure_deid_key(cfg).map_err(bad)? {
            KeyOutcome::Created(p) => {
                eprintln!(
                    "made the de-identification key {} (back it up)",
                    p.display()
                )
            }
            KeyOutcome::Kept(p) => eprintln!("de-identification key {} present", p.display()),
            KeyOutcome::NotNeeded => {}
        }
    }
    Ok(())
}
