//! The appliance daemon: `cosilo run --config site.toml`.
//!
//! [`run`] opens the site's store, starts the trainer on a thread of its own (training is
//! CPU-bound; the async side talks to it over channels), connects the MQTT link, and drives the
//! configured [`strategy`](cosilo_federation::strategy) with what arrives: its own training results, peers'
//! models (signed envelopes checked against the roster, replay-guarded, chunk-reassembled,
//! decoded and refused when malformed: a refusal is logged with its reason and never reaches a
//! model), presence and control messages, and a clock tick. It carries out the strategy's
//! actions: train, install a model, publish (chunked to the broker's packet size), pass the
//! token, pull. At the end of each round it logs one line (loss, Dice, bytes sent and received),
//! evaluates the validation cases every `eval_every`-th round (publishing aggregate metrics, never
//! patient identifiers) and checkpoints the session with the strategy's state and the replay
//! guards. Everything that selects or stops (IIL's patience) reads validation; the final model
//! (and the personalised one) is scored once on the test cases, through the store's
//! [`FinalEvaluation`](cosilo_store::FinalEvaluation), which records the read.
//!
//! Personalisation (`personalise_steps` > 0): once the strategy has finished and its final
//! (shared) model is scored and checkpointed, the site fine-tunes that model on its own cases for
//! `personalise_steps` more steps, scores it, and saves it as the run [`personalised_run`]. The
//! personalised model is never published; the session run keeps the shared model. The
//! learning-rate schedule spans both phases ([`SiteConfig::schedule_steps`]), so a local-only run
//! with the same settings trains exactly as many steps on the same schedule.
//!
//! Shutdown (the `shutdown` future: SIGTERM or ctrl-c in the binary) stops training after the
//! step in progress, checkpoints, flushes the store, publishes a `Leaving` presence and
//! disconnects cleanly. A restarted site resumes from its store and catches up from retained
//! announcements and its persistent MQTT session.
//!
//! Module map, by job:
//! - [`trainer`]: the trainer thread and its protocol (`Cmd` in, `Reply` out).
//! - [`outbound`]: sequence numbers, sealing, chunking and publishing.
//! - [`inbound`]: opening, the replay guard, reassembly and dispatch to the strategy.
//! - [`rounds`]: carrying out the strategy's actions, round bookkeeping, personalisation.
//! - [`labels`]: the class names and the score, from the training and site configuration.
//! - [`event_loop`]: setup, and the `select!` over shutdown, link, trainer and clock.
//! - [`report`]: the site's progress for the status board (page, `/status.json`, metrics).
//! - [`roster`]: membership changes while running (SIGHUP, or the roster file changed): a new
//!   roster is checked in full before it replaces the one in use.

mod event_loop;
mod inbound;
mod labels;
mod outbound;
mod report;
mod roster;
mod rounds;
#[cfg(test)]
mod tests;
mod trainer;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info_span, Instrument};

use crate::config::{ConfigError, SiteConfig};
use crate::local::LocalError;
use crate::status::Board;
use cosilo_federation::broker::BrokerError;
use cosilo_federation::keys::{KeysError, Roster, SiteKeys};
use cosilo_federation::link::{Link, LinkError};
use cosilo_federation::strategy::{self, Strategy};
use cosilo_federation::weights::{Layout, WeightsError};
use cosilo_federation::wire::{
    self, Reassembler, ReassemblyLimits, ReplayGuard, SiteStatus, WireError,
};
use cosilo_store::StoreError;
use cosilo_train::TrainError;

use inbound::Inbound;
use labels::Classes;
use outbound::{now_ms, Outbound};
use roster::RosterWatch;
use rounds::RoundBook;
use trainer::Cmd;

/// Errors that stop the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open the store {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot load this site's cases: {0}")]
    Cases(#[source] Box<LocalError>),
    #[error("training failed: {0}")]
    Train(#[source] TrainError),
    #[error("the trainer thread stopped unexpectedly")]
    TrainerGone,
    #[error("cannot start the hardware guards: {0}")]
    Guards(#[source] cosilo_hardware::HardwareError),
    #[error("cannot read this site's key or the roster: {0}")]
    Keys(#[from] KeysError),
    #[error("site {site:?} is not in the roster {roster}")]
    NotInRoster { site: String, roster: PathBuf },
    #[error("roster federation {roster:?} differs from the configured federation {config:?}")]
    WrongFederation { roster: String, config: String },
    #[error("cannot start the embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("broker address {0} does not resolve")]
    Address(String),
    #[error("MQTT link: {0}")]
    Link(#[from] LinkError),
    #[error("cannot build the strategy: {0}")]
    Strategy(#[from] strategy::StrategyError),
    #[error("cannot encode this site's model: {0}")]
    Weights(#[from] WeightsError),
    #[error("cannot seal a message: {0}")]
    Seal(#[from] WireError),
}

/// One round as the log line reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundLog {
    pub round: u64,
    pub model_version: u64,
    pub loss: Option<f64>,
    /// Mean validation Dice per class (background first); empty when the round was not scored.
    pub dice: Vec<Option<f64>>,
    pub tissue_mean: Option<f64>,
    pub contributors: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub seconds: f64,
}

/// What a run did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub site: String,
    pub strategy: String,
    /// True when the strategy finished; false when shut down before.
    pub finished: bool,
    pub rounds: Vec<RoundLog>,
    /// Validation Dice of the initial model (before any training of this run).
    pub initial_dice: Vec<Option<f64>>,
    pub initial_tissue_mean: Option<f64>,
    /// Test Dice of the final model (the store's final evaluation of the session run); empty
    /// when the run stopped before its final score.
    pub final_dice: Vec<Option<f64>>,
    pub final_tissue_mean: Option<f64>,
    /// Personalisation steps taken after the final model (0: none).
    #[serde(default)]
    pub personalise_steps: usize,
    /// Test Dice of the personalised model (empty without personalisation).
    #[serde(default)]
    pub personalised_dice: Vec<Option<f64>>,
    #[serde(default)]
    pub personalised_tissue_mean: Option<f64>,
    pub training_cases: u64,
    #[serde(default)]
    pub validation_cases: usize,
    pub test_cases: usize,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Messages refused (bad signature, non-member, replay, malformed, wrong model).
    pub refused: u64,
    pub seconds: f64,
}

/// The run name of a site's federation session in its store.
pub fn session_run(cfg: &SiteConfig) -> String {
    format!(
        "fed-{}-{}",
        cfg.federation.name,
        cfg.federation.strategy.name()
    )
}

/// The run name of a site's personalised model (the shared model fine-tuned on its own cases).
pub fn personalised_run(cfg: &SiteConfig) -> String {
    format!("{}-personalised", session_run(cfg))
}

/// What the daemon saves with the session checkpoint besides the strategy's state.
#[derive(Debug, Default, Serialize, Deserialize)]
struct DaemonState {
    strategy: serde_json::Value,
    /// The last sequence number this site used.
    seq: u64,
    /// The replay guard (highest seq per sender and kind).
    replay: Option<ReplayGuard>,
    rounds: Vec<RoundLog>,
    initial_dice: Vec<Option<f64>>,
}

/// This site's identity and its way to the others.
pub(super) struct Membership {
    pub keys: SiteKeys,
    pub roster: Roster,
    /// None when the site runs alone.
    pub link: Option<Link>,
}

/// What the daemon knows of the model: its layout, the samples it trains on, its classes.
pub(super) struct ModelShape {
    pub layout: Layout,
    pub samples: u64,
    pub classes: Classes,
}

/// The state of a running site, by job.
struct Site {
    cfg: SiteConfig,
    strategy: Box<dyn Strategy>,
    /// To the trainer thread.
    commands: std::sync::mpsc::Sender<Cmd>,
    classes: Classes,
    out: Outbound,
    inb: Inbound,
    book: RoundBook,
    /// The roster file, read again on SIGHUP and when it changes (None: a site running alone).
    roster_watch: Option<RosterWatch>,
}

impl Site {
    /// A site starting (or resuming from `saved`) with `strategy`.
    fn new(
        cfg: SiteConfig,
        membership: Membership,
        shape: ModelShape,
        strategy: Box<dyn Strategy>,
        commands: std::sync::mpsc::Sender<Cmd>,
        saved: DaemonState,
    ) -> Self {
        let fed = &cfg.federation;
        let out = Outbound {
            me: cfg.site.id.clone(),
            federation: fed.name.clone(),
            keys: membership.keys,
            link: membership.link,
            layout: shape.layout,
            format: fed.weight_format,
            chunk_bytes: wire::chunk_payload_budget(cfg.broker.max_packet_bytes),
            samples: shape.samples,
            seq: saved.seq,
            next_update_id: now_ms(),
            sent_seqs: Default::default(),
            last_gossip: None,
            status: SiteStatus::Joining,
            bytes_sent: 0,
        };
        let inb = Inbound {
            roster: membership.roster,
            replay: saved
                .replay
                .unwrap_or_else(|| ReplayGuard::new(Duration::from_secs(fed.replay_window_s))),
            reassembler: Reassembler::new(ReassemblyLimits {
                timeout: Duration::from_secs(fed.update_timeout_s),
                ..Default::default()
            }),
            own_seq_floor: saved.seq.max(now_ms().saturating_mul(1000)),
            refused: 0,
            refused_by: Default::default(),
            bytes_received: 0,
            seen: Default::default(),
            removed: Default::default(),
            rosters_refused: 0,
        };
        let book = RoundBook::new(saved.rounds, saved.initial_dice, fed.personalise_steps > 0);
        Site {
            strategy,
            commands,
            classes: shape.classes,
            out,
            inb,
            book,
            roster_watch: None,
            cfg,
        }
    }

    /// What the checkpoint saves besides the session.
    fn state(&self) -> serde_json::Value {
        serde_json::to_value(DaemonState {
            strategy: self.strategy.snapshot(),
            seq: self.out.seq,
            replay: Some(self.inb.replay.clone()),
            rounds: self.book.rounds.clone(),
            initial_dice: self.book.initial_dice.clone(),
        })
        .unwrap_or(serde_json::Value::Null)
    }

    fn command(&self, c: Cmd) -> Result<(), DaemonError> {
        self.commands.send(c).map_err(|_| DaemonError::TrainerGone)
    }
}

/// Runs the site until its strategy finishes or `shutdown` completes.
/// `board` receives the run's progress for the status page and metrics (`crate::status`).
pub async fn run(
    cfg: SiteConfig,
    shutdown: impl Future<Output = ()>,
    board: Arc<Board>,
) -> Result<RunSummary, DaemonError> {
    let span = info_span!("site", id = %cfg.site.id, strategy = cfg.federation.strategy.name());
    event_loop::run_site(cfg, shutdown, board)
        .instrument(span)
        .await
}
