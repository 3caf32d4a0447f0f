//! `cosilo status`: what a running appliance is doing, at the terminal (the status page's
//! content, from its `/status.json`).

use std::path::PathBuf;

use cosilo_appliance::config::{SiteConfig, DEFAULT_STATUS_LISTEN};
use cosilo_appliance::status::client;

use super::BadConfig;

#[derive(clap::Args, Debug)]
pub(crate) struct StatusArgs {
    /// The appliance's status address (its `[status] listen`).
    #[arg(long, conflicts_with = "config")]
    pub(crate) addr: Option<String>,
    /// Read the address from this site configuration instead.
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Print the raw JSON report.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn status(args: StatusArgs) -> anyhow::Result<()> {
    let addr = match (&args.addr, &args.config) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => {
            let cfg = SiteConfig::load(path).map_err(|e| BadConfig(e.to_string()))?;
            match cfg
                .status
                .listen_addr()
                .map_err(|e| BadConfig(e.to_string()))?
            {
                Some(a) if a.port() != 0 => a.to_string(),
                Some(_) => {
                    return Err(BadConfig(format!(
                    "{}: [status] listen has port 0 (a free port, logged at start): pass --addr",
                    path.display()
                ))
                    .into())
                }
                None => {
                    return Err(BadConfig(format!(
                        "{}: the status server is off ([status] listen = \"\")",
                        path.display()
                    ))
                    .into())
                }
            }
        }
        (None, None) => DEFAULT_STATUS_LISTEN.to_string(),
    };
    let report = client::fetch(&addr)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", client::render_text(&report));
    }
    Ok(())
}
