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
//! evaluates the held-out cases every `eval_every`-th round (publishing aggregate metrics, never
//! patient identifiers) and checkpoints the session with the strategy's state and the replay
//! guards. The final model is always scored.
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

use std::future::Future;
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::{ConfigError, SiteConfig};
use crate::local::{load_volumes, LocalError, StoreCheckpoints};
use cosilo_federation::broker::{BrokerError, EmbeddedBroker};
use cosilo_federation::keys::{KeysError, Roster, SiteKeys};
use cosilo_federation::link::{self, Link, LinkConfig, LinkError, LinkEvent, TlsConfig};
use cosilo_federation::strategy::StrategyKind;
use cosilo_federation::strategy::{
    self, Action, Context, Input, PeerModel, PeerStatus, Purpose, Strategy,
};
use cosilo_federation::weights::{FlatWeights, Layout, WeightFormat, WeightsError};
use cosilo_federation::wire::{
    self, topics, Admission, Body, Control, Envelope, Metrics, Presence, Reassembler,
    ReassemblyLimits, ReplayGuard, SiteStatus, UpdateMeta, UpdatePurpose, WireError,
};
use cosilo_store::{Split, Store, StoreError};
use cosilo_train::eval::{mean_per_class, CaseScore};
use cosilo_train::session::Session;
use cosilo_train::{TrainConfig, TrainError};

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
    Cases(#[source] LocalError),
    #[error("training failed: {0}")]
    Train(#[source] TrainError),
    #[error("the trainer thread stopped unexpectedly")]
    TrainerGone,
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
    /// Mean held-out Dice per class (background first).
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
    /// Held-out Dice of the initial model (before any training of this run).
    pub initial_dice: Vec<Option<f64>>,
    pub initial_tissue_mean: Option<f64>,
    /// Held-out Dice of the final model.
    pub final_dice: Vec<Option<f64>>,
    pub final_tissue_mean: Option<f64>,
    /// Personalisation steps taken after the final model (0: none).
    #[serde(default)]
    pub personalise_steps: usize,
    /// Held-out Dice of the personalised model (empty without personalisation).
    #[serde(default)]
    pub personalised_dice: Vec<Option<f64>>,
    #[serde(default)]
    pub personalised_tissue_mean: Option<f64>,
    pub training_cases: u64,
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

// ------------------------------------------------------------------------------- trainer thread

enum Cmd {
    Train {
        steps: usize,
        evaluate: bool,
    },
    SetWeights(Vec<f32>),
    Evaluate,
    Save(serde_json::Value),
    /// Saves the session as the personalised run.
    SavePersonalised(serde_json::Value),
    Quit,
}

enum Reply {
    Ready {
        weights: FlatWeights,
        samples: u64,
        test_cases: usize,
        saved: Option<serde_json::Value>,
    },
    Trained {
        weights: Vec<f32>,
        loss: f64,
        score: Option<f64>,
        stopped: bool,
    },
    Evaluated(Vec<CaseScore>),
    Saved,
    Failed(DaemonError),
}

/// Tissue classes (CSF, grey matter, white matter) of the default label map.
const TISSUE: [usize; 3] = [1, 2, 3];

fn tissue_mean(dice: &[Option<f64>]) -> Option<f64> {
    let v: Vec<f64> = TISSUE
        .iter()
        .filter_map(|&c| dice.get(c).copied().flatten())
        .collect();
    (v.len() == TISSUE.len()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// The trainer thread: owns the store and the session.
#[allow(clippy::too_many_arguments)]
fn trainer(
    store: Store,
    cfg: TrainConfig,
    schedule_steps: usize,
    hospital: Option<String>,
    run: String,
    personal_run: String,
    commands: std::sync::mpsc::Receiver<Cmd>,
    replies: mpsc::UnboundedSender<Reply>,
    stop: Arc<AtomicBool>,
) {
    let span = info_span!("trainer", run = %run);
    let _g = span.enter();
    let send = |r: Reply| replies.send(r).is_ok();
    let setup = || -> Result<(Session, Vec<_>, Option<serde_json::Value>), DaemonError> {
        let device = cosilo_train::device().map_err(DaemonError::Train)?;
        let train =
            load_volumes(&store, hospital.as_deref(), Split::Train).map_err(DaemonError::Cases)?;
        let test = match load_volumes(&store, hospital.as_deref(), Split::Test) {
            Ok(v) => v,
            Err(LocalError::NoCases { .. }) => Vec::new(),
            Err(e) => return Err(DaemonError::Cases(e)),
        };
        let mut session = Session::new(&cfg, &train, &device).map_err(DaemonError::Train)?;
        session.set_schedule_steps(schedule_steps);
        let saved = session
            .restore(&StoreCheckpoints(&store), &run)
            .map_err(DaemonError::Train)?;
        Ok((session, test, saved))
    };
    let (mut session, test, saved) = match setup() {
        Ok(s) => s,
        Err(e) => {
            send(Reply::Failed(e));
            return;
        }
    };
    let ready = match session.weights() {
        Ok(weights) => Reply::Ready {
            weights,
            samples: session.samples(),
            test_cases: test.len(),
            saved,
        },
        Err(e) => Reply::Failed(DaemonError::Train(e)),
    };
    if !send(ready) {
        return;
    }
    let classes = cfg.model.classes;
    let evaluate = |s: &Session| -> Result<Vec<CaseScore>, TrainError> {
        if test.is_empty() {
            Ok(Vec::new())
        } else {
            s.evaluate(&test)
        }
    };
    while let Ok(cmd) = commands.recv() {
        let reply = match cmd {
            Cmd::Train {
                steps,
                evaluate: eval,
            } => {
                let t0 = Instant::now();
                match session.steps(steps, &mut |_| {}, &stop) {
                    Ok(report) => {
                        debug!(
                            steps = report.steps,
                            seconds = t0.elapsed().as_secs_f64(),
                            "trained"
                        );
                        let score = if eval && !report.stopped {
                            match evaluate(&session) {
                                Ok(s) => tissue_mean(&mean_per_class(&s, classes)),
                                Err(e) => {
                                    send(Reply::Failed(DaemonError::Train(e)));
                                    return;
                                }
                            }
                        } else {
                            None
                        };
                        match session.weights() {
                            Ok(w) => Reply::Trained {
                                weights: w.data,
                                loss: report.mean_loss,
                                score,
                                stopped: report.stopped,
                            },
                            Err(e) => Reply::Failed(DaemonError::Train(e)),
                        }
                    }
                    Err(e) => Reply::Failed(DaemonError::Train(e)),
                }
            }
            Cmd::SetWeights(data) => {
                let w = match session.weights() {
                    Ok(w) => FlatWeights {
                        layout: w.layout,
                        data,
                    },
                    Err(e) => {
                        send(Reply::Failed(DaemonError::Train(e)));
                        return;
                    }
                };
                if let Err(e) = session.set_weights(&w) {
                    send(Reply::Failed(DaemonError::Train(e)));
                    return;
                }
                continue;
            }
            Cmd::Evaluate => match evaluate(&session) {
                Ok(s) => Reply::Evaluated(s),
                Err(e) => Reply::Failed(DaemonError::Train(e)),
            },
            cmd @ (Cmd::Save(_) | Cmd::SavePersonalised(_)) => {
                let (run, state) = match cmd {
                    Cmd::SavePersonalised(state) => (personal_run.as_str(), state),
                    Cmd::Save(state) => (run.as_str(), state),
                    _ => continue,
                };
                match session
                    .save(&StoreCheckpoints(&store), run, &state)
                    .map_err(DaemonError::Train)
                    .and_then(|_| {
                        store.flush().map_err(|source| DaemonError::Store {
                            path: store.dir().to_path_buf(),
                            source,
                        })
                    }) {
                    Ok(()) => Reply::Saved,
                    Err(e) => Reply::Failed(e),
                }
            }
            Cmd::Quit => return,
        };
        if !send(reply) {
            return;
        }
    }
}

// ------------------------------------------------------------------------------- daemon

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn to_purpose(p: Purpose) -> UpdatePurpose {
    match p {
        Purpose::Gossip => UpdatePurpose::BrainTorrent,
        Purpose::Round => UpdatePurpose::FedAvgRound,
        Purpose::Token => UpdatePurpose::Token,
    }
}

fn from_purpose(p: UpdatePurpose) -> Option<Purpose> {
    match p {
        UpdatePurpose::BrainTorrent | UpdatePurpose::Announce => Some(Purpose::Gossip),
        UpdatePurpose::FedAvgRound => Some(Purpose::Round),
        UpdatePurpose::Token => Some(Purpose::Token),
    }
}

fn peer_status(s: SiteStatus) -> PeerStatus {
    match s {
        SiteStatus::Joining => PeerStatus::Joining,
        SiteStatus::Training => PeerStatus::Training,
        SiteStatus::Idle => PeerStatus::Idle,
        SiteStatus::Leaving => PeerStatus::Leaving,
    }
}

/// What an evaluation (or a round that skips it) was asked for, in order.
#[derive(Debug)]
enum Pending {
    /// A round ended; `scored`: its evaluation was asked for (else it is logged without Dice).
    Round {
        round: u64,
        contributors: Vec<String>,
        loss: Option<f64>,
        scored: bool,
    },
    /// The strategy's final model.
    Final,
    /// The personalised model.
    Personalised,
}

/// Where a site is in the personalisation phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Personalisation {
    /// Not configured.
    Off,
    /// Starts once the final model is scored and saved.
    Waiting,
    /// Fine-tuning on the site's own cases.
    Training,
    /// Scoring and saving the personalised model.
    Scoring,
    Done,
}

/// The state of a running site.
struct Site {
    cfg: SiteConfig,
    me: String,
    keys: SiteKeys,
    roster: Roster,
    link: Option<Link>,
    strategy: Box<dyn Strategy>,
    layout: Layout,
    format: WeightFormat,
    chunk_bytes: usize,
    samples: u64,
    seq: u64,
    next_update_id: u64,
    replay: ReplayGuard,
    reassembler: Reassembler,
    commands: std::sync::mpsc::Sender<Cmd>,
    /// The last gossip announcement (header fields and payload), re-sent on a Pull.
    last_gossip: Option<(Purpose, u64, u64, Vec<u8>)>,
    status: SiteStatus,
    bytes_sent: u64,
    bytes_received: u64,
    refused: u64,
    rounds: Vec<RoundLog>,
    initial_dice: Vec<Option<f64>>,
    /// Evaluations asked for and rounds waiting behind them.
    pending_eval: std::collections::VecDeque<Pending>,
    last_loss: Option<f64>,
    round_started: Instant,
    round_bytes: (u64, u64),
    final_dice: Vec<Option<f64>>,
    personalisation: Personalisation,
    personalised_dice: Vec<Option<f64>>,
    /// A `Train` the strategy asked for while a round still waits for its evaluation and
    /// checkpoint: sent after that checkpoint's `Save`, so that the checkpoint holds the round's
    /// own weights, not the next round's (regression: a restarted site trained a round twice).
    held_train: Option<usize>,
    /// Own messages with a seq at most this are from an earlier run of this site (retained or
    /// still queued at the broker): the persisted seq, or the clock floor at start if higher.
    own_seq_floor: u64,
    /// The seqs this run sent (the newest [`SENT_SEQS_KEPT`]), to recognise its own messages
    /// when the broker hands them back.
    sent_seqs: std::collections::BTreeSet<u64>,
}

/// How many of its own sent seqs a site remembers.
const SENT_SEQS_KEPT: usize = 65_536;

impl Site {
    fn next_seq(&mut self) -> u64 {
        // Monotonic across restarts even if the last checkpoint missed some sends: at least the
        // clock in microseconds.
        let floor = now_ms().saturating_mul(1000);
        self.seq = (self.seq + 1).max(floor);
        self.seq
    }

    async fn send(&mut self, topic: &str, body: Body, retain: bool) -> Result<(), DaemonError> {
        let seq = self.next_seq();
        self.sent_seqs.insert(seq);
        if self.sent_seqs.len() > SENT_SEQS_KEPT {
            self.sent_seqs.pop_first();
        }
        let env = Envelope::new(&self.me, seq, now_ms(), body);
        let bytes = wire::seal(&env, &self.keys)?;
        self.bytes_sent += bytes.len() as u64;
        if let Some(link) = &self.link {
            link.publish(topic, bytes, retain).await?;
        }
        Ok(())
    }

    async fn presence(&mut self, status: SiteStatus) -> Result<(), DaemonError> {
        if self.link.is_none() {
            return Ok(());
        }
        self.status = status;
        let body = Body::Presence(Presence {
            status,
            model_version: self.strategy.model_version(),
            versions_seen: self.strategy.versions_seen(),
            samples: self.samples,
            round: self.strategy.round(),
            strategy: self.cfg.federation.strategy.name().to_string(),
            public_key: self.keys.public_bytes(),
        });
        let topic = topics::presence(&self.cfg.federation.name, &self.me);
        self.send(&topic, body, true).await
    }

    async fn publish_model(
        &mut self,
        purpose: Purpose,
        round: u64,
        model_version: u64,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), DaemonError> {
        if self.link.is_none() {
            return Ok(());
        }
        let update_id = self.next_update_id;
        self.next_update_id += 1;
        let meta = UpdateMeta {
            update_id,
            origin: self.me.clone(),
            model_version,
            round,
            samples: self.samples,
            purpose: to_purpose(purpose),
            format: self.format,
            layout_digest: self.layout.digest(),
        };
        let fed = self.cfg.federation.name.clone();
        let chunks = wire::split_update(&meta, &payload, self.chunk_bytes);
        let n = chunks.len();
        let header = meta.header(&payload, self.chunk_bytes);
        let topic = topics::updates(&fed, &self.me);
        for chunk in chunks {
            self.send(&topic, Body::UpdateChunk(chunk), false).await?;
        }
        if retain {
            // The retained announcement: a late or restarted peer learns the newest version
            // from it and pulls the weights.
            let topic = topics::model(&fed, &self.me);
            self.send(&topic, Body::ModelAnnouncement(header), true)
                .await?;
        }
        if let Some(link) = &self.link {
            link.flush().await?;
        }
        debug!(
            ?purpose,
            round,
            model_version,
            chunks = n,
            bytes = payload.len(),
            "published a model"
        );
        if purpose == Purpose::Gossip {
            self.last_gossip = Some((purpose, round, model_version, payload));
        }
        Ok(())
    }

    /// A model as peers receive it: encoded and decoded in the wire format. Strategies get this
    /// site's own model in that form, so that every site averages the very same numbers.
    fn as_sent(&self, data: Vec<f32>) -> Result<Vec<f32>, DaemonError> {
        if self.link.is_none() || self.format == WeightFormat::F32 {
            return Ok(data);
        }
        let w = FlatWeights {
            layout: self.layout.clone(),
            data,
        };
        Ok(FlatWeights::decode(&w.encode(self.format), self.format, &self.layout)?.data)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::to_value(DaemonState {
            strategy: self.strategy.snapshot(),
            seq: self.seq,
            replay: Some(self.replay.clone()),
            rounds: self.rounds.clone(),
            initial_dice: self.initial_dice.clone(),
        })
        .unwrap_or(serde_json::Value::Null)
    }

    fn command(&self, c: Cmd) -> Result<(), DaemonError> {
        self.commands.send(c).map_err(|_| DaemonError::TrainerGone)
    }

    /// Asks the trainer for `steps` more steps (after any command queued before).
    async fn train(&mut self, steps: usize) -> Result<(), DaemonError> {
        let evaluate = self.cfg.federation.strategy == StrategyKind::Iil;
        self.command(Cmd::Train { steps, evaluate })?;
        if self.status != SiteStatus::Training {
            self.presence(SiteStatus::Training).await?;
        }
        Ok(())
    }

    /// Carries out a strategy's actions in order.
    async fn apply(&mut self, actions: Vec<Action>) -> Result<(), DaemonError> {
        for a in actions {
            match a {
                Action::Train { steps } => {
                    if self.pending_eval.is_empty() {
                        self.train(steps).await?;
                    } else {
                        // Sent once the rounds waiting for their evaluation are checkpointed.
                        self.held_train = Some(steps);
                    }
                }
                Action::SetModel(w) => self.command(Cmd::SetWeights(w))?,
                Action::Publish {
                    purpose,
                    round,
                    model_version,
                    weights,
                    retain,
                } => {
                    let payload = FlatWeights {
                        layout: self.layout.clone(),
                        data: weights,
                    }
                    .encode(self.format);
                    self.publish_model(purpose, round, model_version, payload, retain)
                        .await?;
                }
                Action::PassToken {
                    next,
                    cycle,
                    position,
                } => {
                    let body = Body::Control(Control::Token {
                        cycle,
                        position,
                        next,
                        update_id: self.next_update_id.saturating_sub(1),
                    });
                    let topic = topics::control(&self.cfg.federation.name);
                    self.send(&topic, body, false).await?;
                }
                Action::Pull { from, have_version } => {
                    info!(peer = %from, have_version, "pulling a newer model");
                    let body = Body::Control(Control::Pull { from, have_version });
                    let topic = topics::control(&self.cfg.federation.name);
                    self.send(&topic, body, false).await?;
                }
                Action::EndOfRound {
                    round,
                    contributors,
                } => {
                    let every = self.cfg.federation.eval_every;
                    let scored = every > 0 && (round + 1) % every == 0;
                    let entry = Pending::Round {
                        round,
                        contributors,
                        loss: self.last_loss.take(),
                        scored,
                    };
                    if scored {
                        self.command(Cmd::Evaluate)?;
                        self.pending_eval.push_back(entry);
                    } else if self.pending_eval.is_empty() {
                        self.round_done(entry, Vec::new(), 0).await?;
                    } else {
                        // Logged in order, after the evaluation in flight.
                        self.pending_eval.push_back(entry);
                    }
                }
                Action::Note(n) => info!("{n}"),
                Action::Finished => {
                    info!("strategy finished");
                    self.command(Cmd::Evaluate)?;
                    self.pending_eval.push_back(Pending::Final);
                }
            }
        }
        Ok(())
    }

    /// A round's evaluation arrived: log, publish metrics, checkpoint.
    async fn evaluated(&mut self, scores: Vec<CaseScore>) -> Result<(), DaemonError> {
        let classes = self.layout_classes();
        let dice = if scores.is_empty() {
            Vec::new()
        } else {
            mean_per_class(&scores, classes)
        };
        let Some(entry) = self.pending_eval.pop_front() else {
            // The initial evaluation.
            self.initial_dice = dice;
            info!(tissue_dice = ?tissue_mean(&self.initial_dice), "initial model scored");
            return Ok(());
        };
        match entry {
            Pending::Final => {
                info!(tissue_dice = ?tissue_mean(&dice), "final model scored");
                self.final_dice = dice;
                self.command(Cmd::Save(self.state()))?;
            }
            Pending::Personalised => {
                info!(
                    steps = self.cfg.federation.personalise_steps,
                    tissue_dice = ?tissue_mean(&dice),
                    dice = ?dice,
                    "personalised model scored"
                );
                self.personalised_dice = dice;
                self.command(Cmd::SavePersonalised(self.state()))?;
            }
            round @ Pending::Round { .. } => {
                self.round_done(round, dice, scores.len() as u32).await?;
            }
        }
        // Rounds that skipped their evaluation and waited behind this one.
        while let Some(Pending::Round { scored: false, .. }) = self.pending_eval.front() {
            if let Some(entry) = self.pending_eval.pop_front() {
                self.round_done(entry, Vec::new(), 0).await?;
            }
        }
        // The next round trains only now, behind the checkpoint's Save.
        if self.pending_eval.is_empty() {
            if let Some(steps) = self.held_train.take() {
                self.train(steps).await?;
            }
        }
        Ok(())
    }

    /// A round is over (scored on `cases` held-out cases, or not scored: `dice` empty): log,
    /// publish metrics when scored, checkpoint.
    async fn round_done(
        &mut self,
        entry: Pending,
        dice: Vec<Option<f64>>,
        cases: u32,
    ) -> Result<(), DaemonError> {
        let Pending::Round {
            round,
            contributors,
            loss,
            scored,
        } = entry
        else {
            return Ok(());
        };
        let sent = self.bytes_sent - self.round_bytes.0;
        let received = self.bytes_received - self.round_bytes.1;
        self.round_bytes = (self.bytes_sent, self.bytes_received);
        let log = RoundLog {
            round,
            model_version: self.strategy.model_version(),
            loss,
            tissue_mean: tissue_mean(&dice),
            dice: dice.clone(),
            contributors,
            bytes_sent: sent,
            bytes_received: received,
            seconds: self.round_started.elapsed().as_secs_f64(),
        };
        self.round_started = Instant::now();
        let fmt = |d: Option<f64>| d.map_or("–".into(), |d| format!("{d:.3}"));
        info!(
            "round {:>3} v{}: loss {} | Dice csf {} gm {} wm {} tumour {} | tissue {} | sent {} B, received {} B | with {} | {:.1} s",
            round + 1,
            log.model_version,
            log.loss.map_or("–".into(), |l| format!("{l:.4}")),
            fmt(dice.get(1).copied().flatten()),
            fmt(dice.get(2).copied().flatten()),
            fmt(dice.get(3).copied().flatten()),
            fmt(dice.get(4).copied().flatten()),
            fmt(log.tissue_mean),
            sent,
            received,
            log.contributors.join(","),
            log.seconds
        );
        self.rounds.push(log);
        if self.link.is_some() {
            if scored {
                let body = Body::Metrics(Metrics {
                    round,
                    model_version: self.strategy.model_version(),
                    dice,
                    loss,
                    cases,
                });
                let topic = topics::metrics(&self.cfg.federation.name, &self.me);
                self.send(&topic, body, true).await?;
            }
            self.presence(self.status).await?;
        }
        self.command(Cmd::Save(self.state()))?;
        Ok(())
    }

    fn layout_classes(&self) -> usize {
        // The last layer's bias has one value per class.
        self.layout
            .tensors
            .iter()
            .filter(|(n, _)| n.contains("out") && n.ends_with("bias"))
            .map(|(_, s)| s.iter().product::<usize>())
            .next()
            .unwrap_or(5)
    }

    /// A message signed with this site's own key. This run's own messages come back through the
    /// federation-wide subscriptions and are dropped. One from an earlier run (its retained
    /// announcement or presence) is dropped too, but a retained announcement first tells the
    /// strategy the last version this site published (a restarted BrainTorrent site must not
    /// reuse it). Anything else was signed with this site's key by someone else.
    async fn own_message(
        &mut self,
        topic: &str,
        env: Envelope,
        retained: bool,
    ) -> Result<(), DaemonError> {
        if self.sent_seqs.contains(&env.seq) {
            return Ok(());
        }
        if env.seq > self.own_seq_floor {
            warn!(
                %topic,
                seq = env.seq,
                kind = env.kind().name(),
                "a message signed with this site's key that this appliance did not send: key may be compromised"
            );
            return Ok(());
        }
        debug!(%topic, seq = env.seq, retained, "own message from before this run");
        if let Body::ModelAnnouncement(h) = env.body {
            if h.origin == self.me {
                let input = Input::Announced {
                    site: h.origin,
                    model_version: h.model_version,
                };
                let actions = self.strategy.handle(input, now_ms());
                self.apply(actions).await?;
            }
        }
        Ok(())
    }

    /// A message from the broker.
    async fn message(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retained: bool,
    ) -> Result<(), DaemonError> {
        let env = match wire::open(&payload, &self.roster) {
            Ok(e) => e,
            Err(e) => {
                self.bytes_received += payload.len() as u64;
                self.refused += 1;
                warn!(%topic, reason = %e, "refused a message");
                return Ok(());
            }
        };
        if env.sender == self.me {
            return self.own_message(&topic, env, retained).await;
        }
        self.bytes_received += payload.len() as u64;
        match self.replay.admit(&env, &payload, now_ms()) {
            Ok(Admission::Fresh) => {}
            Ok(Admission::Duplicate) => {
                // A QoS 1 redelivery (after a reconnect or a broker restart), not a replay.
                info!(%topic, sender = %env.sender, seq = env.seq, "dropped a copy of the last message (a redelivery or a replay)");
                return Ok(());
            }
            Err(e) => {
                if !retained {
                    self.refused += 1;
                    warn!(%topic, sender = %env.sender, reason = %e, "refused a message");
                }
                return Ok(());
            }
        }
        let now = now_ms();
        match env.body {
            Body::Presence(p) => {
                let input = Input::Presence {
                    site: env.sender,
                    status: peer_status(p.status),
                    model_version: p.model_version,
                    round: p.round,
                };
                let actions = self.strategy.handle(input, now);
                self.apply(actions).await?;
            }
            Body::UpdateChunk(chunk) => {
                if chunk.update.origin != env.sender {
                    self.refused += 1;
                    warn!(sender = %env.sender, origin = %chunk.update.origin, "refused a chunk relayed for another site");
                    return Ok(());
                }
                if chunk.update.layout_digest != self.layout.digest() {
                    self.refused += 1;
                    warn!(sender = %env.sender, "refused an update for another model architecture");
                    return Ok(());
                }
                let complete = match self.reassembler.offer(chunk, Instant::now()) {
                    Ok(Some(c)) => c,
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        self.refused += 1;
                        warn!(sender = %env.sender, reason = %e, "refused a chunk");
                        return Ok(());
                    }
                };
                let h = complete.header;
                let weights = match FlatWeights::decode(&complete.payload, h.format, &self.layout) {
                    Ok(w) => w,
                    Err(e) => {
                        self.refused += 1;
                        warn!(sender = %h.origin, reason = %e, "refused an update");
                        return Ok(());
                    }
                };
                let Some(purpose) = from_purpose(h.purpose) else {
                    return Ok(());
                };
                debug!(origin = %h.origin, ?purpose, round = h.round, version = h.model_version, "model received");
                let input = Input::Model(PeerModel {
                    origin: h.origin,
                    purpose,
                    model_version: h.model_version,
                    round: h.round,
                    samples: h.samples,
                    weights: weights.data,
                });
                let actions = self.strategy.handle(input, now);
                self.apply(actions).await?;
            }
            Body::Control(Control::Pull { from, have_version }) => {
                if from == self.me {
                    if let Some((purpose, round, version, payload)) = self.last_gossip.clone() {
                        if version > have_version {
                            info!(peer = %env.sender, version, "answering a pull");
                            self.publish_model(purpose, round, version, payload, false)
                                .await?;
                        }
                    }
                }
            }
            Body::Control(Control::Token { next, position, .. }) => {
                debug!(from = %env.sender, %next, position, "token passed");
            }
            Body::Control(Control::Leave) => {
                let input = Input::Presence {
                    site: env.sender,
                    status: PeerStatus::Leaving,
                    model_version: 0,
                    round: 0,
                };
                let actions = self.strategy.handle(input, now);
                self.apply(actions).await?;
            }
            Body::Control(_) => {}
            Body::ModelAnnouncement(h) => {
                if h.origin == env.sender {
                    let input = Input::Announced {
                        site: h.origin,
                        model_version: h.model_version,
                    };
                    let actions = self.strategy.handle(input, now);
                    self.apply(actions).await?;
                }
            }
            Body::Metrics(m) => {
                debug!(from = %env.sender, round = m.round, "peer metrics");
            }
        }
        Ok(())
    }
}

/// Runs the site until its strategy finishes or `shutdown` completes.
pub async fn run(
    cfg: SiteConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, DaemonError> {
    let span = info_span!("site", id = %cfg.site.id, strategy = cfg.federation.strategy.name());
    run_inner(cfg, shutdown).instrument(span).await
}

async fn run_inner(
    cfg: SiteConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<RunSummary, DaemonError> {
    let t0 = Instant::now();
    cfg.validate()?;
    let train_cfg = cfg.train_config()?;
    let me = cfg.site.id.clone();
    let networked = cfg.federation.strategy != StrategyKind::Local;

    // Keys and roster first: a misconfigured site fails before any training.
    let (keys, roster) = if networked {
        let keys = SiteKeys::load(&cfg.federation.key)?;
        let roster = Roster::load(&cfg.federation.roster)?;
        if roster.name() != cfg.federation.name {
            return Err(DaemonError::WrongFederation {
                roster: roster.name().to_string(),
                config: cfg.federation.name.clone(),
            });
        }
        if !roster.contains(&me) {
            return Err(DaemonError::NotInRoster {
                site: me,
                roster: cfg.federation.roster.clone(),
            });
        }
        (keys, roster)
    } else {
        let keys = SiteKeys::generate(&me)?;
        let roster = Roster::parse(
            &format!(
                "[federation]\nname = \"{}\"\n\n{}",
                cfg.federation.name,
                keys.roster_entry()
            ),
            "local",
        )?;
        (keys, roster)
    };
    let mut sites: Vec<String> = roster.sites().iter().map(|s| s.id.clone()).collect();
    sites.sort();

    let store = Store::open(&cfg.site.store).map_err(|source| DaemonError::Store {
        path: cfg.site.store.clone(),
        source,
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel();
    let (reply_tx, mut replies) = mpsc::unbounded_channel();
    let run_name = session_run(&cfg);
    let trainer_thread = {
        let (stop, hospital, tc) = (
            stop.clone(),
            cfg.hospital().map(str::to_string),
            train_cfg.clone(),
        );
        let (run_name, personal_run) = (run_name.clone(), personalised_run(&cfg));
        let schedule = cfg.schedule_steps();
        std::thread::Builder::new()
            .name(format!("trainer-{me}"))
            .spawn(move || {
                trainer(
                    store,
                    tc,
                    schedule,
                    hospital,
                    run_name,
                    personal_run,
                    cmd_rx,
                    reply_tx,
                    stop,
                )
            })
            .map_err(|_| DaemonError::TrainerGone)?
    };
    let (weights, samples, test_cases, saved) = match replies.recv().await {
        Some(Reply::Ready {
            weights,
            samples,
            test_cases,
            saved,
        }) => (weights, samples, test_cases, saved),
        Some(Reply::Failed(e)) => return Err(e),
        _ => return Err(DaemonError::TrainerGone),
    };
    let saved: DaemonState = saved
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let resumed = !saved.strategy.is_null();
    info!(
        samples,
        test_cases,
        parameters = weights.data.len(),
        resumed,
        "session ready"
    );

    let ctx = Context {
        me: me.clone(),
        sites: sites.clone(),
        rounds: cfg.federation.rounds,
        steps_per_round: cfg.federation.steps_per_round,
        quorum: cfg.federation.quorum.sites(sites.len()),
        round_deadline_ms: cfg.federation.round_deadline_s * 1000,
        update_timeout_ms: cfg.federation.update_timeout_s * 1000,
        patience: cfg.federation.patience,
        samples,
    };
    let strat = strategy::build(
        cfg.federation.strategy,
        ctx,
        resumed.then_some(&saved.strategy),
    )?;

    // The broker (embedded when asked) and the link.
    let mut _broker = None;
    let mut link = None;
    let mut events = None;
    if networked {
        if cfg.broker.embedded {
            let addr = (cfg.broker.host.as_str(), cfg.broker.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| DaemonError::Address(cfg.broker.host.clone()))?;
            _broker = Some(EmbeddedBroker::start(addr, cfg.broker.max_packet_bytes)?);
            info!(%addr, "embedded broker started");
        }
        let mut lc = LinkConfig::new(
            cfg.broker.host.clone(),
            cfg.broker.port,
            format!("cosilo-{}-{}", cfg.federation.name, me),
        );
        lc.max_packet_bytes = cfg.broker.max_packet_bytes;
        if !cfg.broker.ca_file.as_os_str().is_empty() {
            lc.tls = Some(TlsConfig {
                ca_file: cfg.broker.ca_file.clone(),
                client_cert: None,
                client_key: None,
            });
        }
        let (l, ev) =
            link::connect(&lc, topics::member_filters(&cfg.federation.name), None).await?;
        link = Some(l);
        events = Some(ev);
    }

    let chunk_bytes = wire::chunk_payload_budget(cfg.broker.max_packet_bytes);
    let mut site = Site {
        me: me.clone(),
        keys,
        roster,
        link,
        strategy: strat,
        layout: weights.layout.clone(),
        format: cfg.federation.weight_format,
        chunk_bytes,
        samples,
        seq: saved.seq,
        next_update_id: now_ms(),
        replay: saved.replay.unwrap_or_else(|| {
            ReplayGuard::new(Duration::from_secs(cfg.federation.replay_window_s))
        }),
        reassembler: Reassembler::new(ReassemblyLimits {
            timeout: Duration::from_secs(cfg.federation.update_timeout_s),
            ..Default::default()
        }),
        commands: cmd_tx,
        last_gossip: None,
        status: SiteStatus::Joining,
        bytes_sent: 0,
        bytes_received: 0,
        refused: 0,
        rounds: saved.rounds,
        initial_dice: saved.initial_dice,
        pending_eval: Default::default(),
        last_loss: None,
        round_started: Instant::now(),
        round_bytes: (0, 0),
        final_dice: Vec::new(),
        personalisation: if cfg.federation.personalise_steps > 0 {
            Personalisation::Waiting
        } else {
            Personalisation::Off
        },
        personalised_dice: Vec::new(),
        held_train: None,
        own_seq_floor: saved.seq.max(now_ms().saturating_mul(1000)),
        sent_seqs: Default::default(),
        cfg,
    };
    if !resumed && test_cases > 0 {
        // The initial model's held-out Dice (the "before" column); answered before any round.
        site.command(Cmd::Evaluate)?;
        match replies.recv().await {
            Some(Reply::Evaluated(s)) => site.evaluated(s).await?,
            Some(Reply::Failed(e)) => return Err(e),
            _ => return Err(DaemonError::TrainerGone),
        }
    }
    site.presence(SiteStatus::Joining).await?;

    let start = Input::Start {
        weights: site.as_sent(weights.data)?,
    };
    let actions = site.strategy.handle(start, now_ms());
    site.apply(actions).await?;

    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tokio::pin!(shutdown);
    let mut shutting_down = false;
    let finished_saved = loop {
        tokio::select! {
                    _ = &mut shutdown, if !shutting_down => {
                        info!("shutdown requested: finishing the step in progress");
                        shutting_down = true;
                        stop.store(true, Ordering::SeqCst);
                        site.held_train = None;
                        if matches!(site.personalisation, Personalisation::Training | Personalisation::Scoring) {
                            // The shared model is saved already; a half-personalised one must not
                            // overwrite it. Personalisation runs again after a restart.
                            break true;
                        }
                        if site.pending_eval.is_empty() {
                            site.command(Cmd::Save(site.state()))?;
                        }
                        // Otherwise the rounds waiting for their evaluation are logged first and
                        // the last of them saves the state with them in: a restarted site must
                        // not lose a round it trained (regression: a SIGTERM between a round's end
                        // and its evaluation left that round out of the log).
                    }
                    ev = async { events.as_mut()?.recv().await }, if events.is_some() => {
                        match ev {
                            Some(LinkEvent::Connected { session_present }) => {
                                info!(session_present, "connected to the broker");
                                site.presence(site.status).await?;
                            }
                            Some(LinkEvent::Message { topic, payload, retained }) => {
                                if !shutting_down {
                                    site.message(topic, payload, retained).await?;
                                }
                            }
                            Some(LinkEvent::Disconnected { reason }) => warn!(%reason, "lost the broker; reconnecting"),
                            None => events = None,
                        }
                    }
                    reply = replies.recv() => {
                        match reply {
                            Some(Reply::Trained { weights, loss, score, stopped }) => {
                                if stopped || shutting_down {
                                    continue;
                                }
                                if site.personalisation == Personalisation::Training {
                                    info!(loss, "personalisation trained");
                                    site.personalisation = Personalisation::Scoring;
                                    site.pending_eval.push_back(Pending::Personalised);
                                    site.command(Cmd::Evaluate)?;
                                    continue;
                                }
                                site.last_loss = Some(loss);
                                // Peers hold this model as the wire format decodes it; so does this
                                // site, so that every site averages the same numbers.
        let weights = site.as_sent(weights)?;
                                let actions = site.strategy.handle(Input::Trained { weights, score, loss }, now_ms());
                                site.apply(actions).await?;
                            }
                            Some(Reply::Evaluated(s)) => site.evaluated(s).await?,
                            Some(Reply::Saved) => {
                                if shutting_down {
                                    if site.pending_eval.is_empty() {
                                        break site.strategy.finished();
                                    }
                                    continue;
                                }
                                if site.strategy.finished() && site.pending_eval.is_empty() {
                                    match site.personalisation {
                                        Personalisation::Waiting => {
                                            let steps = site.cfg.federation.personalise_steps;
                                            info!(steps, "personalising the final model on this site's cases");
                                            site.personalisation = Personalisation::Training;
                                            site.command(Cmd::Train { steps, evaluate: false })?;
                                        }
                                        Personalisation::Training => {}
                                        Personalisation::Scoring => {
                                            site.personalisation = Personalisation::Done;
                                            break true;
                                        }
                                        Personalisation::Off | Personalisation::Done => break true,
                                    }
                                }
                            }
                            Some(Reply::Failed(e)) => return Err(e),
                            Some(Reply::Ready { .. }) => {}
                            None => return Err(DaemonError::TrainerGone),
                        }
                    }
                    _ = tick.tick() => {
                        if !shutting_down {
                            let expired = site.reassembler.expire(Instant::now());
                            for (origin, id) in expired {
                                warn!(%origin, update_id = id, "gave up an incomplete update");
                            }
                            let actions = site.strategy.handle(Input::Tick, now_ms());
                            site.apply(actions).await?;
                        }
                    }
                }
    };

    // Leave cleanly.
    let _ = site.command(Cmd::Quit);
    let status = if finished_saved {
        SiteStatus::Idle
    } else {
        SiteStatus::Leaving
    };
    if site.link.is_some() {
        site.presence(status).await?;
        if !finished_saved {
            let topic = topics::control(&site.cfg.federation.name);
            site.send(&topic, Body::Control(Control::Leave), false)
                .await?;
        }
        if let Some(l) = &site.link {
            l.flush().await?;
            l.close().await?;
        }
    }
    let _ = tokio::task::spawn_blocking(move || trainer_thread.join()).await;
    let final_dice = if site.final_dice.is_empty() {
        site.rounds
            .last()
            .map(|r| r.dice.clone())
            .unwrap_or_default()
    } else {
        site.final_dice.clone()
    };
    let summary = RunSummary {
        site: me,
        strategy: site.cfg.federation.strategy.name().to_string(),
        finished: finished_saved,
        initial_tissue_mean: tissue_mean(&site.initial_dice),
        initial_dice: site.initial_dice.clone(),
        final_tissue_mean: tissue_mean(&final_dice),
        final_dice,
        personalise_steps: if site.personalisation == Personalisation::Done {
            site.cfg.federation.personalise_steps
        } else {
            0
        },
        personalised_tissue_mean: tissue_mean(&site.personalised_dice),
        personalised_dice: site.personalised_dice.clone(),
        rounds: site.rounds.clone(),
        training_cases: samples,
        test_cases,
        bytes_sent: site.bytes_sent,
        bytes_received: site.bytes_received,
        refused: site.refused,
        seconds: t0.elapsed().as_secs_f64(),
    };
    info!(
        finished = summary.finished,
        tissue_dice = ?summary.final_tissue_mean,
        bytes_sent = summary.bytes_sent,
        bytes_received = summary.bytes_received,
        refused = summary.refused,
        "site stopped"
    );
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site without a broker, driving strategy `kind` alone; its trainer commands go to the
    /// returned receiver. (Keep in step with the `Site` built in `run_inner`.)
    fn offline_site(eval_every: u64, kind: StrategyKind) -> (Site, std::sync::mpsc::Receiver<Cmd>) {
        let mut cfg = SiteConfig::default();
        cfg.federation.eval_every = eval_every;
        cfg.federation.personalise_steps = 0;
        let keys = SiteKeys::generate("h1").unwrap();
        let roster = Roster::parse(
            &format!(
                "[federation]\nname = \"{}\"\n\n{}",
                cfg.federation.name,
                keys.roster_entry()
            ),
            "test",
        )
        .unwrap();
        let ctx = Context {
            me: "h1".into(),
            sites: vec!["h1".into()],
            rounds: 3,
            steps_per_round: 7,
            quorum: 1,
            round_deadline_ms: 1_000,
            update_timeout_ms: 1_000,
            patience: 1,
            samples: 1,
        };
        let strategy = strategy::build(kind, ctx, None).unwrap();
        let (commands, rx) = std::sync::mpsc::channel();
        let site = Site {
            me: "h1".into(),
            keys,
            roster,
            link: None,
            strategy,
            layout: Layout {
                tensors: vec![("out.bias".into(), vec![5])],
            },
            format: WeightFormat::F32,
            chunk_bytes: 1 << 16,
            samples: 1,
            seq: 0,
            next_update_id: 1,
            replay: ReplayGuard::new(Duration::from_secs(60)),
            reassembler: Reassembler::new(ReassemblyLimits::default()),
            commands,
            last_gossip: None,
            status: SiteStatus::Joining,
            bytes_sent: 0,
            bytes_received: 0,
            refused: 0,
            rounds: Vec::new(),
            initial_dice: Vec::new(),
            pending_eval: Default::default(),
            last_loss: None,
            round_started: Instant::now(),
            round_bytes: (0, 0),
            final_dice: Vec::new(),
            personalisation: Personalisation::Off,
            personalised_dice: Vec::new(),
            held_train: None,
            own_seq_floor: 0,
            sent_seqs: Default::default(),
            cfg,
        };
        (site, rx)
    }

    /// The commands queued so far, by name; a `Save` with the strategy round it checkpoints.
    fn queued(rx: &std::sync::mpsc::Receiver<Cmd>) -> Vec<String> {
        rx.try_iter()
            .map(|c| match c {
                Cmd::Train { steps, .. } => format!("train {steps}"),
                Cmd::SetWeights(_) => "set".into(),
                Cmd::Evaluate => "evaluate".into(),
                Cmd::Save(v) => format!("save round {}", v["strategy"]["round"]),
                Cmd::SavePersonalised(_) => "save personalised".into(),
                Cmd::Quit => "quit".into(),
            })
            .collect()
    }

    fn trained() -> Input {
        Input::Trained {
            weights: vec![0.5; 5],
            score: None,
            loss: 0.25,
        }
    }

    #[tokio::test]
    async fn a_round_is_checkpointed_before_the_next_round_trains() {
        // Regression (issue 3, bug 1): the Save of round k's checkpoint was queued behind round
        // k+1's Train, so the checkpoint held the next round's weights with round k's state.
        let (mut site, rx) = offline_site(1, StrategyKind::Local);
        let a = site.strategy.handle(Input::Start { weights: vec![] }, 0);
        site.apply(a).await.unwrap();
        assert_eq!(queued(&rx), ["train 7"]);
        let a = site.strategy.handle(trained(), 1);
        site.apply(a).await.unwrap();
        // The next Train waits for the evaluation and the checkpoint.
        assert_eq!(queued(&rx), ["evaluate"]);
        site.evaluated(Vec::new()).await.unwrap();
        assert_eq!(queued(&rx), ["save round 1", "train 7"]);
        assert_eq!(site.rounds.len(), 1);
    }

    #[tokio::test]
    async fn rounds_without_evaluation_are_checkpointed_before_training_on() {
        let (mut site, rx) = offline_site(2, StrategyKind::Local);
        let a = site.strategy.handle(Input::Start { weights: vec![] }, 0);
        site.apply(a).await.unwrap();
        queued(&rx);
        // Round 0 is not scored (every 2nd round is): logged and saved at once.
        let a = site.strategy.handle(trained(), 1);
        site.apply(a).await.unwrap();
        assert_eq!(queued(&rx), ["save round 1", "train 7"]);
        // Round 1 is scored.
        let a = site.strategy.handle(trained(), 2);
        site.apply(a).await.unwrap();
        assert_eq!(queued(&rx), ["evaluate"]);
        site.evaluated(Vec::new()).await.unwrap();
        assert_eq!(queued(&rx), ["save round 2", "train 7"]);
        assert_eq!(site.rounds.len(), 2);
    }

    #[tokio::test]
    async fn own_announcement_from_before_a_restart_reaches_the_strategy_a_forged_one_not() {
        // Regression (issue 3, bugs 3 and 4): own messages were all dropped unseen.
        let (mut site, _rx) = offline_site(1, StrategyKind::BrainTorrent);
        site.own_seq_floor = 1_000;
        let announcement = |site: &Site, seq: u64, version: u64| {
            let meta = UpdateMeta {
                update_id: seq,
                origin: "h1".into(),
                model_version: version,
                round: version - 1,
                samples: 1,
                purpose: UpdatePurpose::Announce,
                format: WeightFormat::F32,
                layout_digest: site.layout.digest(),
            };
            let body = Body::ModelAnnouncement(meta.header(&[0; 20], 1 << 16));
            wire::seal(&Envelope::new("h1", seq, now_ms(), body), &site.keys).unwrap()
        };
        let topic = || "cosilo/test/model/h1".to_string();
        // Signed with this site's key, above its own seq floor, not sent by this run: dropped.
        let forged = announcement(&site, 5_000, 7);
        site.message(topic(), forged, true).await.unwrap();
        assert_eq!(site.strategy.model_version(), 0);
        // Its retained announcement from before the restart: the strategy learns the version.
        let retained = announcement(&site, 900, 2);
        site.message(topic(), retained, true).await.unwrap();
        assert_eq!(site.strategy.model_version(), 2);
        assert_eq!((site.refused, site.bytes_received), (0, 0));
    }
}
