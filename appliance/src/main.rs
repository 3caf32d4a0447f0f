//! `cosilo`: the appliance's command line. Thin by design: parse arguments, set up logging, call the
//! library, print the error chain and exit with a meaningful code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "cosilo", version, about = "Cosilo: cross-silo federated segmentation for hospitals")]
struct Cli {
    /// Where fetched source data is cached (outside git).
    #[arg(long, global = true, env = "COSILO_CACHE")]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {}

fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("cosilo");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("cosilo"),
        None => PathBuf::from(".cosilo-cache"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let _cache = cli.cache.clone().unwrap_or_else(default_cache);
    match cli.command {}
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
