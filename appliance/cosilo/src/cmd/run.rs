//! `cosilo run`: the site daemon.

use std::path::PathBuf;

use super::BadConfig;

#[derive(clap::Args, Debug)]
pub(crate) struct RunArgs {
    /// The site configuration (see `cosilo print-default-config site`).
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// Write the run's summary (rounds, Dice before and after, bytes) here as JSON.
    #[arg(long)]
    pub(crate) summary: Option<PathBuf>,
}

/// `cosilo run`: the daemon until its strategy finishes, SIGTERM or ctrl-c.
pub(crate) fn run_site(args: RunArgs) -> anyhow::Result<()> {
    use cosilo_appliance::{config::SiteConfig, daemon};
    let cfg = SiteConfig::load(&args.config).map_err(|e| BadConfig(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = runtime.block_on(async {
        let shutdown = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        daemon::run(cfg, shutdown).await
    });
    let summary = match summary {
        Ok(s) => s,
        Err(daemon::DaemonError::Config(e)) => return Err(BadConfig(e.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    println!(
        "{}: {} ({} rounds), held-out tissue Dice {} -> {}, sent {} B, received {} B, refused {}",
        summary.site,
        if summary.finished {
            "finished"
        } else {
            "stopped"
        },
        summary.rounds.len(),
        summary
            .initial_tissue_mean
            .map_or("–".into(), |d| format!("{d:.3}")),
        summary
            .final_tissue_mean
            .map_or("–".into(), |d| format!("{d:.3}")),
        summary.bytes_sent,
        summary.bytes_received,
        summary.refused
    );
    Ok(())
}
