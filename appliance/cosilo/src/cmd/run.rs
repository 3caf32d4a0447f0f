//! `cosilo run`: the site daemon.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cosilo_appliance::service::ServiceNotifier;
use cosilo_appliance::status::{self, Board, BoardSources};

use super::BadConfig;

/// Seconds without a heartbeat from the async runtime after which the watchdog is withheld.
const HEARTBEAT_STALE_S: u64 = 10;

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
    // Under systemd (Type=notify): READY once the configuration is loaded and the runtime runs,
    // WATCHDOG while the runtime answers (a task stamps a heartbeat), STOPPING on SIGTERM.
    let notifier = ServiceNotifier::from_env();
    let heartbeat = Arc::new(AtomicU64::new(now_s()));
    let stop_watchdog = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let heartbeat = heartbeat.clone();
        notifier.spawn_watchdog(stop_watchdog.clone(), move || {
            now_s().saturating_sub(heartbeat.load(Ordering::Relaxed)) <= HEARTBEAT_STALE_S
        })
    };
    let site = cfg.site.id.clone();
    let board = Arc::new(Board::new(BoardSources {
        sysroot: Default::default(),
        disk_path: cfg.site.store.clone(),
        outbox_dir: (!cfg.status.outbox_dir.as_os_str().is_empty())
            .then(|| cfg.status.outbox_dir.clone()),
    }));
    let listen = cfg
        .status
        .listen_addr()
        .map_err(|e| BadConfig(e.to_string()))?;
    let (stop_status, status_stopped) = tokio::sync::watch::channel(false);
    let summary = runtime.block_on(async {
        if let Some(addr) = listen {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                anyhow::anyhow!("cannot serve the status page on {addr} ([status] listen): {e}")
            })?;
            let bound = listener.local_addr()?;
            tracing::info!("status page on http://{bound}/ (metrics: /metrics)");
            let mut stopped = status_stopped.clone();
            tokio::spawn(status::server::serve(listener, board.clone(), async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                heartbeat.store(now_s(), Ordering::Relaxed);
            }
        });
        notifier.ready(&format!("site {site} running"));
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
            notifier.stopping("finishing the step in progress, checkpointing");
        };
        let summary = daemon::run(cfg, shutdown, board.clone()).await;
        let _ = stop_status.send(true);
        anyhow::Ok(summary)
    })?;
    stop_watchdog.store(true, Ordering::SeqCst);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
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
