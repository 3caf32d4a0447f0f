//! Round bookkeeping and personalisation: carrying out the strategy's actions, the evaluation
//! queue (a round waits for its validation scores before it is logged and checkpointed, and the
//! next round trains only behind that checkpoint), and the personalisation phase after the
//! strategy has finished.

use std::collections::VecDeque;
use std::time::Instant;

use tracing::info;

use super::outbound::Announced;
use super::trainer::Cmd;
use super::{DaemonError, RoundLog, Site};
use cosilo_federation::strategy::{Action, Purpose, StrategyKind};
use cosilo_federation::wire::{topics, Body, Control, Metrics, SiteStatus};
use cosilo_train::eval::{mean_per_class, CaseScore};

/// What an evaluation (or a round that skips it) was asked for, in order.
#[derive(Debug)]
pub(super) enum Pending {
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
pub(super) enum Personalisation {
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

/// The rounds of this run and the evaluations they wait for.
pub(super) struct RoundBook {
    pub rounds: Vec<RoundLog>,
    pub initial_dice: Vec<Option<f64>>,
    /// Evaluations asked for and rounds waiting behind them.
    pub pending_eval: VecDeque<Pending>,
    pub last_loss: Option<f64>,
    pub round_started: Instant,
    /// Bytes sent and received when the current round started.
    pub round_bytes: (u64, u64),
    pub final_dice: Vec<Option<f64>>,
    pub personalisation: Personalisation,
    pub personalised_dice: Vec<Option<f64>>,
    /// A `Train` the strategy asked for while a round still waits for its evaluation and
    /// checkpoint: sent after that checkpoint's `Save`, so that the checkpoint holds the round's
    /// own weights, not the next round's (regression: a restarted site trained a round twice).
    pub held_train: Option<usize>,
}

impl RoundBook {
    /// A run resuming `rounds` (empty for a fresh run), personalising when `personalise`.
    pub(super) fn new(
        rounds: Vec<RoundLog>,
        initial_dice: Vec<Option<f64>>,
        personalise: bool,
    ) -> Self {
        RoundBook {
            rounds,
            initial_dice,
            pending_eval: VecDeque::new(),
            last_loss: None,
            round_started: Instant::now(),
            round_bytes: (0, 0),
            final_dice: Vec::new(),
            personalisation: if personalise {
                Personalisation::Waiting
            } else {
                Personalisation::Off
            },
            personalised_dice: Vec::new(),
            held_train: None,
        }
    }
}

impl Site {
    /// Asks the trainer for `steps` more steps (after any command queued before).
    pub(super) async fn train(&mut self, steps: usize) -> Result<(), DaemonError> {
        let evaluate = self.cfg.federation.strategy == StrategyKind::Iil;
        self.command(Cmd::Train { steps, evaluate })?;
        if self.out.status != SiteStatus::Training {
            self.presence(SiteStatus::Training).await?;
        }
        Ok(())
    }

    /// Carries out a strategy's actions in order.
    pub(super) async fn apply(&mut self, actions: Vec<Action>) -> Result<(), DaemonError> {
        for a in actions {
            match a {
                Action::Train { steps } => {
                    if self.book.pending_eval.is_empty() {
                        self.train(steps).await?;
                    } else {
                        // Sent once the rounds waiting for their evaluation are checkpointed.
                        self.book.held_train = Some(steps);
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
                    // Encoded once, when the model came from the trainer; a site without a
                    // broker has no encoding and publishes nothing.
                    if let Some(payload) = weights.encoded {
                        let model = Announced {
                            purpose,
                            round,
                            model_version,
                            payload,
                        };
                        self.out.publish_model(model, retain).await?;
                    }
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
                        update_id: self.out.next_update_id.saturating_sub(1),
                    });
                    let topic = topics::control(&self.out.federation);
                    self.out.send(&topic, body, false).await?;
                }
                Action::Offer {
                    model_version,
                    weights,
                } => {
                    // Answered on a pull (inbound); nothing is published now. The encoding
                    // made when the model came from the trainer is kept (shared, not copied);
                    // a site without a broker has none and answers nothing.
                    if let Some(payload) = weights.encoded {
                        self.out.last_gossip = Some(Announced {
                            purpose: Purpose::Gossip,
                            round: model_version.saturating_sub(1),
                            model_version,
                            payload,
                        });
                    }
                }
                Action::Pull { from, have_version } => {
                    info!(peer = %from, have_version, "pulling a newer model");
                    let body = Body::Control(Control::Pull { from, have_version });
                    let topic = topics::control(&self.out.federation);
                    self.out.send(&topic, body, false).await?;
                }
                Action::EndOfRound {
                    round,
                    contributors,
                } => self.end_of_round(round, contributors).await?,
                Action::Note(n) => info!("{n}"),
                Action::Finished => {
                    info!("strategy finished");
                    self.command(Cmd::FinalScore {
                        personalised: false,
                    })?;
                    self.book.pending_eval.push_back(Pending::Final);
                }
            }
        }
        Ok(())
    }

    /// The strategy closed `round`: scored every `eval_every`-th round, logged in order.
    async fn end_of_round(
        &mut self,
        round: u64,
        contributors: Vec<String>,
    ) -> Result<(), DaemonError> {
        let every = self.cfg.federation.eval_every;
        let scored = every > 0 && (round + 1) % every == 0;
        let entry = Pending::Round {
            round,
            contributors,
            loss: self.book.last_loss.take(),
            scored,
        };
        if scored {
            self.command(Cmd::Evaluate)?;
            self.book.pending_eval.push_back(entry);
        } else if self.book.pending_eval.is_empty() {
            self.round_done(entry, Vec::new(), 0).await?;
        } else {
            // Logged in order, after the evaluation in flight.
            self.book.pending_eval.push_back(entry);
        }
        Ok(())
    }

    /// A round's evaluation arrived: log, publish metrics, checkpoint.
    pub(super) async fn evaluated(&mut self, scores: Vec<CaseScore>) -> Result<(), DaemonError> {
        let dice = if scores.is_empty() {
            Vec::new()
        } else {
            mean_per_class(&scores, self.classes.len())
        };
        let Some(entry) = self.book.pending_eval.pop_front() else {
            // The initial evaluation.
            self.book.initial_dice = dice;
            info!(tissue_dice = ?self.classes.score(&self.book.initial_dice), "initial model scored");
            return Ok(());
        };
        match entry {
            Pending::Final => {
                info!(tissue_dice = ?self.classes.score(&dice), "final model scored");
                self.book.final_dice = dice;
                self.command(Cmd::Save(self.state()))?;
            }
            Pending::Personalised => {
                info!(
                    steps = self.cfg.federation.personalise_steps,
                    tissue_dice = ?self.classes.score(&dice),
                    dice = ?dice,
                    "personalised model scored"
                );
                self.book.personalised_dice = dice;
                self.command(Cmd::SavePersonalised(self.state()))?;
            }
            round @ Pending::Round { .. } => {
                self.round_done(round, dice, scores.len() as u32).await?;
            }
        }
        // Rounds that skipped their evaluation and waited behind this one.
        while let Some(Pending::Round { scored: false, .. }) = self.book.pending_eval.front() {
            if let Some(entry) = self.book.pending_eval.pop_front() {
                self.round_done(entry, Vec::new(), 0).await?;
            }
        }
        // The next round trains only now, behind the checkpoint's Save.
        if self.book.pending_eval.is_empty() {
            if let Some(steps) = self.book.held_train.take() {
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
        let (sent, received) = (self.out.bytes_sent, self.inb.bytes_received);
        let (sent, received) = (
            sent - self.book.round_bytes.0,
            received - self.book.round_bytes.1,
        );
        self.book.round_bytes = (self.out.bytes_sent, self.inb.bytes_received);
        let log = RoundLog {
            round,
            model_version: self.strategy.model_version(),
            loss,
            tissue_mean: self.classes.score(&dice),
            dice: dice.clone(),
            contributors,
            bytes_sent: sent,
            bytes_received: received,
            seconds: self.book.round_started.elapsed().as_secs_f64(),
        };
        self.book.round_started = Instant::now();
        info!(
            "round {:>3} v{}: loss {} | Dice {} | tissue {} | sent {} B, received {} B | with {} | {:.1} s",
            round + 1,
            log.model_version,
            log.loss.map_or("–".into(), |l| format!("{l:.4}")),
            self.classes.describe(&dice),
            log.tissue_mean.map_or("–".into(), |d| format!("{d:.3}")),
            sent,
            received,
            log.contributors.join(","),
            log.seconds
        );
        self.book.rounds.push(log);
        if self.out.link.is_some() {
            if scored {
                let body = Body::Metrics(Metrics {
                    round,
                    model_version: self.strategy.model_version(),
                    dice,
                    loss,
                    cases,
                });
                let topic = topics::metrics(&self.out.federation, &self.out.me);
                self.out.send(&topic, body, true).await?;
            }
            self.presence(self.out.status).await?;
        }
        self.command(Cmd::Save(self.state()))?;
        Ok(())
    }

    /// A checkpoint was saved after the strategy finished: the personalisation phase moves on.
    /// True when the run is over.
    pub(super) fn finished_and_saved(&mut self) -> Result<bool, DaemonError> {
        match self.book.personalisation {
            Personalisation::Waiting => {
                let steps = self.cfg.federation.personalise_steps;
                info!(steps, "personalising the final model on this site's cases");
                self.book.personalisation = Personalisation::Training;
                self.command(Cmd::Train {
                    steps,
                    evaluate: false,
                })?;
                Ok(false)
            }
            Personalisation::Training => Ok(false),
            Personalisation::Scoring => {
                self.book.personalisation = Personalisation::Done;
                Ok(true)
            }
            Personalisation::Off | Personalisation::Done => Ok(true),
        }
    }

    /// The personalised model finished training: score it (and then save it).
    pub(super) fn personalisation_trained(&mut self, loss: f64) -> Result<(), DaemonError> {
        info!(loss, "personalisation trained");
        self.book.personalisation = Personalisation::Scoring;
        self.book.pending_eval.push_back(Pending::Personalised);
        self.command(Cmd::FinalScore { personalised: true })
    }
}
