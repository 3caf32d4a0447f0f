//! `cosilo bridge`: the PACS bridge process.

use std::path::PathBuf;

use cosilo_appliance::service::ServiceNotifier;

use super::BadConfig;
use super::StoreDir;

#[derive(clap::Args, Debug)]
#[command(subcommand_negates_reqs = true)]
pub(crate) struct BridgeArgs {
    #[command(subcommand)]
    pub(crate) init: Option<BridgeInit>,
    /// The bridge configuration (TOML; see --print-default-config).
    #[arg(long, required_unless_present = "print_default_config")]
    pub(crate) config: Option<PathBuf>,
    /// Print the default bridge configuration and exit.
    #[arg(long)]
    pub(crate) print_default_config: bool,
    /// The hospital named in each imported case's provenance.
    #[arg(long, default_value = "local")]
    pub(crate) hospital: String,
    #[command(flatten)]
    pub(crate) store: StoreDir,
}

#[derive(clap::Subcommand, Debug)]
pub(crate) enum BridgeInit {
    /// Set up a site's bridge: state directory (0700), a new de-identification key (0600) and a
    /// commented bridge.toml pointing at both, all in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
}

/// `cosilo bridge`: SCP → de-identify → spool → assembler → store, until SIGINT/SIGTERM.
pub(crate) fn bridge(args: BridgeArgs) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use cosilo_bridge::pipeline::{Bridge, BridgeConfig, PipelineError, DEFAULT_CONFIG};

    if let Some(BridgeInit::Init { dir }) = &args.init {
        let r = cosilo_bridge::init::init(dir)?;
        println!(
            "config: {}\nkey (0600, back it up): {}\nstate: {}",
            r.config.display(),
            r.key.display(),
            r.state_dir.display()
        );
        return Ok(());
    }
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let Some(path) = args.config else {
        anyhow::bail!("--config is required");
    };
    let cfg = match BridgeConfig::from_file(&path) {
        Ok(cfg) => cfg,
        Err(e @ (PipelineError::ParseConfig { .. } | PipelineError::Invalid(_))) => {
            return Err(anyhow::Error::new(BadConfig(format!("{e:#}"))))
        }
        Err(e) => return Err(e.into()),
    };
    cfg.check_key()?;
    let store = cosilo_store::Store::open(&args.store.path)?;
    let sink = Arc::new(cosilo_appliance::bridge_sink::StoreSeriesSink::new(
        store,
        args.hospital,
    ));
    let shutdown = Arc::new(AtomicBool::new(false));
    // Under systemd (Type=notify): READY once the SCP accepts associations, WATCHDOG while the
    // process runs, STOPPING on SIGTERM.
    let notifier = ServiceNotifier::from_env();
    let watchdog = notifier.spawn_watchdog(shutdown.clone(), || true);
    {
        let shutdown = shutdown.clone();
        let notifier = notifier.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                }
            });
            notifier.stopping("stopping: finishing running associations");
            shutdown.store(true, Ordering::SeqCst);
        });
    }
    let report = Bridge::run(&cfg, sink, &shutdown, |addr| {
        println!("listening on {addr}");
        notifier.ready(&format!("listening on {addr}"));
    });
    shutdown.store(true, Ordering::SeqCst);
    if let Some(w) = watchdog {
        let _ = w.join();
    }
    let report = report?;
    println!(
        "bridge stopped: {} series imported, {} refused",
        report.imported.len(),
        report.refused.len()
    );
    Ok(())
}
