//! The trainer thread and its protocol: the async side sends [`Cmd`]s, the thread answers with
//! [`Reply`]s. The thread owns the store and the training session; training is CPU-bound and
//! never runs on the async workers.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::{debug, info_span};

use super::labels::Classes;
use super::DaemonError;
use crate::local::{count_cases, load_test_volumes, load_volumes, LocalError, StoreCheckpoints};
use cosilo_federation::weights::FlatWeights;
use cosilo_store::{Split, Store};
use cosilo_train::data::LabelledVolume;
use cosilo_train::eval::{mean_per_class, CaseScore};
use cosilo_train::session::Session;
use cosilo_train::{TrainConfig, TrainError};

/// What the daemon asks of the trainer.
pub(super) enum Cmd {
    Train {
        steps: usize,
        evaluate: bool,
    },
    /// Installs these values (the session's own layout).
    SetWeights(Arc<Vec<f32>>),
    /// Scores the installed model on the validation cases (what rounds log and strategies rank).
    Evaluate,
    /// Scores the installed model on the test cases, through the store's
    /// [`FinalEvaluation`](cosilo_store::FinalEvaluation) for the run (the personalised run with
    /// `personalised`): the final score, read once per model.
    FinalScore {
        personalised: bool,
    },
    Save(serde_json::Value),
    /// Saves the session as the personalised run.
    SavePersonalised(serde_json::Value),
    Quit,
}

/// What the trainer answers.
pub(super) enum Reply {
    Ready {
        weights: FlatWeights,
        samples: u64,
        /// Optimiser steps in one pass over this site's labelled training slices.
        steps_per_epoch: usize,
        validation_cases: usize,
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

/// What the trainer thread starts from.
pub(super) struct TrainerSpec {
    pub store: Store,
    pub cfg: TrainConfig,
    /// Steps the learning-rate schedule spans; `None`: `rounds` local epochs (one epoch a round)
    /// plus `personalise_steps`, known once the session counted its slices.
    pub schedule_steps: Option<usize>,
    pub rounds: usize,
    pub personalise_steps: usize,
    pub hospital: Option<String>,
    pub run: String,
    pub personal_run: String,
    pub stop: Arc<AtomicBool>,
    /// Clinical work and the hardware guards throttle or park training through it.
    pub gate: cosilo_hardware::gate::TrainingGate,
    /// The classes and the score the strategy ranks models by.
    pub classes: Classes,
}

/// The trainer's session and this site's validation cases. The test cases are not loaded here:
/// only [`Cmd::FinalScore`] reads them, through the store's final-evaluation door.
struct Trainer {
    spec: TrainerSpec,
    session: Session,
    validation: Vec<LabelledVolume>,
    test_cases: usize,
}

/// Opens the session (restored from the store when a checkpoint exists) and loads the cases.
type Opened = (
    Session,
    Vec<LabelledVolume>,
    usize,
    Option<serde_json::Value>,
);

fn setup(spec: &TrainerSpec) -> Result<Opened, DaemonError> {
    let device = cosilo_train::device().map_err(DaemonError::Train)?;
    let hospital = spec.hospital.as_deref();
    let cases = |e| DaemonError::Cases(Box::new(e));
    let train = load_volumes(&spec.store, hospital, Split::Train).map_err(cases)?;
    let validation = match load_volumes(&spec.store, hospital, Split::Validation) {
        Ok(v) => v,
        Err(LocalError::NoCases { .. }) => Vec::new(),
        Err(e) => return Err(cases(e)),
    };
    let test_cases = count_cases(&spec.store, hospital, Split::Test).map_err(cases)?;
    let mut session = Session::new(&spec.cfg, &train, &device).map_err(DaemonError::Train)?;
    session.set_schedule_steps(spec.schedule_steps.unwrap_or_else(|| {
        (session.steps_per_epoch() * spec.rounds).saturating_add(spec.personalise_steps)
    }));
    session.set_gate(spec.gate.clone());
    let saved = session
        .restore(&StoreCheckpoints(&spec.store), &spec.run)
        .map_err(DaemonError::Train)?;
    Ok((session, validation, test_cases, saved))
}

/// The trainer thread: owns the store and the session until `Quit` or the daemon goes away.
pub(super) fn run(
    spec: TrainerSpec,
    commands: std::sync::mpsc::Receiver<Cmd>,
    replies: mpsc::UnboundedSender<Reply>,
) {
    let span = info_span!("trainer", run = %spec.run);
    let _g = span.enter();
    let send = |r: Reply| replies.send(r).is_ok();
    let (session, validation, test_cases, saved) = match setup(&spec) {
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
            steps_per_epoch: session.steps_per_epoch(),
            validation_cases: validation.len(),
            test_cases,
            saved,
        },
        Err(e) => Reply::Failed(DaemonError::Train(e)),
    };
    if !send(ready) {
        return;
    }
    let mut trainer = Trainer {
        spec,
        session,
        validation,
        test_cases,
    };
    while let Ok(cmd) = commands.recv() {
        let reply = match cmd {
            Cmd::Train { steps, evaluate } => trainer.train(steps, evaluate),
            Cmd::SetWeights(data) => match trainer.set_weights(data) {
                Ok(()) => continue,
                Err(e) => Reply::Failed(e),
            },
            Cmd::Evaluate => match trainer.evaluate() {
                Ok(s) => Reply::Evaluated(s),
                Err(e) => Reply::Failed(DaemonError::Train(e)),
            },
            Cmd::FinalScore { personalised } => match trainer.final_score(personalised) {
                Ok(s) => Reply::Evaluated(s),
                Err(e) => Reply::Failed(e),
            },
            Cmd::Save(state) => trainer.save(false, &state),
            Cmd::SavePersonalised(state) => trainer.save(true, &state),
            Cmd::Quit => return,
        };
        if !send(reply) {
            return;
        }
    }
}

impl Trainer {
    /// The installed model's scores on the validation cases.
    fn evaluate(&self) -> Result<Vec<CaseScore>, TrainError> {
        if self.validation.is_empty() {
            Ok(Vec::new())
        } else {
            self.session.evaluate(&self.validation)
        }
    }

    /// The installed model's scores on the test cases: opens the store's final evaluation for
    /// the run (recording the read), loads this site's test cases and scores them.
    fn final_score(&self, personalised: bool) -> Result<Vec<CaseScore>, DaemonError> {
        if self.test_cases == 0 {
            return Ok(Vec::new());
        }
        let spec = &self.spec;
        let run = if personalised {
            &spec.personal_run
        } else {
            &spec.run
        };
        let store_err = |source| DaemonError::Store {
            path: spec.store.dir().to_path_buf(),
            source,
        };
        let fin = spec.store.final_evaluation(run).map_err(store_err)?;
        let test = load_test_volumes(&fin, spec.hospital.as_deref())
            .map_err(|e| DaemonError::Cases(Box::new(e)))?;
        self.session.evaluate(&test).map_err(DaemonError::Train)
    }

    /// `steps` more steps; with `evaluate`, the score the strategy ranks models by.
    fn train(&mut self, steps: usize, evaluate: bool) -> Reply {
        let t0 = Instant::now();
        let report = match self.session.steps(steps, &mut |_| {}, &self.spec.stop) {
            Ok(r) => r,
            Err(e) => return Reply::Failed(DaemonError::Train(e)),
        };
        debug!(
            steps = report.steps,
            seconds = t0.elapsed().as_secs_f64(),
            "trained"
        );
        let score = if evaluate && !report.stopped {
            match self.evaluate() {
                Ok(s) => {
                    let classes = &self.spec.classes;
                    classes.score(&mean_per_class(&s, classes.len()))
                }
                Err(e) => return Reply::Failed(DaemonError::Train(e)),
            }
        } else {
            None
        };
        match self.session.weights() {
            Ok(w) => Reply::Trained {
                weights: w.data,
                loss: report.mean_loss,
                score,
                stopped: report.stopped,
            },
            Err(e) => Reply::Failed(DaemonError::Train(e)),
        }
    }

    fn set_weights(&mut self, data: Arc<Vec<f32>>) -> Result<(), DaemonError> {
        self.session.set_values(&data).map_err(DaemonError::Train)
    }

    /// Checkpoints the session (as the personalised run with `personalised`) and flushes.
    fn save(&self, personalised: bool, state: &serde_json::Value) -> Reply {
        let spec = &self.spec;
        let run = if personalised {
            &spec.personal_run
        } else {
            &spec.run
        };
        let saved = self
            .session
            .save(&StoreCheckpoints(&spec.store), run, state)
            .map_err(DaemonError::Train)
            .and_then(|_| {
                spec.store.flush().map_err(|source| DaemonError::Store {
                    path: spec.store.dir().to_path_buf(),
                    source,
                })
            });
        match saved {
            Ok(()) => Reply::Saved,
            Err(e) => Reply::Failed(e),
        }
    }
}
