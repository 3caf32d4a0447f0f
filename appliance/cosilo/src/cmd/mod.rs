//! One module per `cosilo` subcommand: its arguments and the function that runs it.

use std::path::PathBuf;

pub(crate) mod bridge;
pub(crate) mod cases;
pub(crate) mod data;
pub(crate) mod demo;
pub(crate) mod ensure_keys;
pub(crate) mod evaluate;
pub(crate) mod experiment;
pub(crate) mod export;
pub(crate) mod federation;
pub(crate) mod import;
pub(crate) mod run;
pub(crate) mod segment;
pub(crate) mod status;
pub(crate) mod train;
pub(crate) mod writeback;

/// The appliance store every store-using command takes.
#[derive(clap::Args, Debug)]
pub(crate) struct StoreDir {
    /// The store directory (also accepted after a subcommand: `cosilo cases list --store DIR`).
    #[arg(
        long = "store",
        global = true,
        value_name = "DIR",
        env = "COSILO_STORE",
        default_value = "./cosilo-store"
    )]
    pub(crate) path: PathBuf,
}

/// A configuration problem: `cosilo run` exits with this code (EX_USAGE of sysexits.h).
#[derive(Debug)]
pub(crate) struct BadConfig(pub(crate) String);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadConfig {}
