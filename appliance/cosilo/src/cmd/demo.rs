//! `cosilo demo`: its arguments (the library runs it).

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    /// Working folder (cohort, stores, keys, configs, logs).
    #[arg(long, default_value = "out/federation-demo")]
    pub(crate) out: PathBuf,
    /// Where the results (federation-demo.md/.json/.svg) go.
    #[arg(long, default_value = "out/federation-demo/results")]
    pub(crate) results: PathBuf,
    /// Training rounds.
    #[arg(long, default_value_t = 8)]
    pub(crate) rounds: u64,
    /// Optimiser steps per round.
    #[arg(long, default_value_t = 20)]
    pub(crate) steps_per_round: usize,
    /// Steps of personalisation after the rounds (local-only: as many more local steps);
    /// default 2 x steps per round, 0 = off.
    #[arg(long)]
    pub(crate) personalise_steps: Option<usize>,
    /// Score the held-out cases every this many rounds (0 = only before and at the end).
    #[arg(long, default_value_t = 0)]
    pub(crate) eval_every: u64,
    /// Strategy of the federated run.
    #[arg(long, default_value = "gossip-avg")]
    pub(crate) strategy: String,
}
