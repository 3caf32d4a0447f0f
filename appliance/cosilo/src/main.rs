//! `cosilo`: the appliance's command line. Thin by design: parse arguments, set up logging, call the
//! library, print the error chain and exit with a meaningful code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

use cmd::bridge::BridgeArgs;
use cmd::data::DataCmd;
use cmd::demo::DemoArgs;
use cmd::ensure_keys::EnsureKeysArgs;
use cmd::evaluate::EvalArgs;
use cmd::experiment::ExperimentArgs;
use cmd::export::ExportArgs;
use cmd::import::ImportArgs;
use cmd::run::RunArgs;
use cmd::segment::SegmentArgs;
use cmd::status::StatusArgs;
use cmd::train::TrainArgs;
use cmd::writeback::WritebackArgs;
use cmd::BadConfig;

#[derive(Parser, Debug)]
#[command(
    name = "cosilo",
    version,
    about = "Cosilo: cross-silo federated segmentation for hospitals"
)]
struct Cli {
    /// Where fetched source data is cached (outside git).
    #[arg(long, global = true, env = "COSILO_CACHE")]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train (or resume) a model on the store's training cases; checkpoints go to the store.
    Train(TrainArgs),
    /// Score a trained run on the store's held-out cases (3-D Dice per class per case).
    Evaluate(EvalArgs),
    /// Export a trained run as an ONNX bundle (model.onnx + manifest.json) for the SDK.
    Export(ExportArgs),
    /// Print a default configuration (TOML) to start a --config file from: `train` (the default,
    /// for `cosilo train`) or `site` (for `cosilo run`).
    PrintDefaultConfig {
        #[arg(value_enum, default_value = "train")]
        which: DefaultConfig,
    },
    /// Run this appliance in its federation (or alone) as its site configuration says.
    Run(RunArgs),
    /// What a running appliance is doing: members, round, Dice over rounds, queues,
    /// temperatures, disk (from its status server, `[status] listen`).
    Status(StatusArgs),
    /// Three hospitals federated on this machine: gossip-avg against local-only training.
    Demo(DemoArgs),
    /// Import NIfTI image/label pairs into the store: one pair, or a cohort manifest.
    Import(ImportArgs),
    /// Segment a NIfTI volume with an exported bundle (ONNX Runtime, as a clinical app would).
    Segment(SegmentArgs),
    /// Run the PACS bridge: receive DICOM (C-STORE), de-identify, assemble series and import
    /// them into the store (image-only cases as "unlabelled"; labelled when a SEG arrives).
    Bridge(BridgeArgs),
    /// The store's cases: list, show one (with its history), remove one.
    Cases {
        #[command(subcommand)]
        cmd: cmd::cases::CasesCommand,
        #[command(flatten)]
        store: cmd::StoreDir,
    },
    /// Write a result back to the PACS: segment a case's de-identified series (from the bridge's
    /// spool) with a bundle, write a DICOM SEG against the PACS's own identifiers and queue it in
    /// the bridge's outbox (durable before "queued"); the running bridge delivers it.
    Writeback(WritebackArgs),
    /// Generate this site's federation key: DIR/SITE.key (secret, mode 0600) and DIR/SITE.pub
    /// (the roster entry, also printed).
    Keygen {
        /// The site's id (a-z, 0-9, '_', '-'; at most 32).
        #[arg(long)]
        site: String,
        /// The folder to write the key files into.
        #[arg(long)]
        out: PathBuf,
    },
    /// First start of a service: make this site's federation key and/or the bridge's
    /// de-identification key when missing (0600; never overwritten). The systemd units run it.
    EnsureKeys(EnsureKeysArgs),
    /// Provision a federation declared in one file: init, request, admit, install, remove.
    Federation {
        #[command(subcommand)]
        cmd: cmd::federation::FederationCommand,
    },
    /// Real anatomy and simulated cohorts for experiments.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
    /// Run a plan's arms (pooled, local-only, federated) on one cohort and write a results
    /// table and curves.
    Experiment(ExperimentArgs),
}

/// Which default configuration `print-default-config` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DefaultConfig {
    /// Training (`cosilo train --config`).
    Train,
    /// A site (`cosilo run --config`).
    Site,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cache = cli
        .cache
        .clone()
        .unwrap_or_else(cosilo_lab::fetch::default_cache_dir);
    match cli.command {
        Command::Import(args) => cmd::import::import(args),
        Command::Federation { cmd } => cmd::federation::run(cmd),
        Command::Bridge(args) => cmd::bridge::bridge(args),
        Command::Cases { cmd, store } => cmd::cases::run(&store.path, cmd),
        Command::Writeback(args) => cmd::writeback::writeback(args),
        Command::Segment(args) => cmd::segment::segment(args),
        Command::Train(args) => cmd::train::train(args),
        Command::Evaluate(args) => cmd::evaluate::evaluate(args),
        Command::Export(args) => cmd::export::export(args),
        Command::PrintDefaultConfig { which } => {
            print!(
                "{}",
                match which {
                    DefaultConfig::Train => cosilo_train::DEFAULT_TRAIN_TOML,
                    DefaultConfig::Site => cosilo_appliance::config::DEFAULT_SITE_TOML,
                }
            );
            Ok(())
        }
        Command::Run(args) => cmd::run::run_site(args),
        Command::Status(args) => cmd::status::status(args),
        Command::Demo(args) => {
            let opts = cosilo_appliance::demo::DemoOptions {
                out: args.out,
                results: args.results,
                cache,
                rounds: args.rounds,
                steps_per_round: args.steps_per_round,
                personalise_steps: args.personalise_steps.unwrap_or(2 * args.steps_per_round),
                eval_every: args.eval_every,
                strategy: args.strategy,
                cosilo: std::env::current_exe()?,
            };
            cosilo_appliance::demo::run_demo(&opts)?;
            Ok(())
        }
        Command::Keygen { site, out } => {
            let keys = cosilo_federation::keys::SiteKeys::generate(&site)?;
            let path = keys.save(&out)?;
            eprintln!("wrote {} (secret) and its .pub", path.display());
            print!("{}", keys.roster_entry());
            Ok(())
        }
        Command::EnsureKeys(args) => cmd::ensure_keys::ensure_keys(args),
        Command::Data { cmd } => cmd::data::data(cmd, &cache),
        Command::Experiment(args) => cmd::experiment::experiment(args, &cache),
    }
}

/// The log filter without `RUST_LOG`: INFO, but the embedded broker (rumqttd) logs a few INFO
/// lines per connection and subscription; those show only with `RUST_LOG=debug` (or
/// `RUST_LOG=info,rumqttd=info`). Colours only on a terminal (the journal gets plain text).
const DEFAULT_LOG_FILTER: &str = "info,rumqttd=warn";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadConfig>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
