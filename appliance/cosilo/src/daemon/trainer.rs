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
use crate::local::{load_volumes, LocalError, StoreCheckpoints};
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
    Evaluate,
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
    pub schedule_steps: usize,
    pub hospital: Option<String>,
    pub run: String,
    pub personal_run: String,
    pub stop: Arc<AtomicBool>,
    /// Clinical work and the hardware guards throttle or park training through it.
    pub gate: cosilo_hardware::gate::TrainingGate,
    /// The classes and the score the strategy ranks models by.
    pub classes: Classes,
}

/// The trainer's session and this site's held-out cases.
struct Trainer {
    spec: TrainerSpec,
    session: Session,
    test: Vec<LabelledVolume>,
}

/// Opens the session (restored from the store when a checkpoint exists) and loads the cases.
type Opened = (Session, Vec<LabelledVolume>, Option<serde_json::Value>);

fn setup(spec: &TrainerSpec) -> Result<Opened, DaemonError> {
    let device = cosilo_train::device().map_err(DaemonError::Train)?;
    let hospital = spec.hospital.as_deref();
    let train = load_volumes(&spec.store, hospital, Split::Train)
        .map_err(|e| DaemonError::Cases(Box::new(e)))?;
    let test = match load_volumes(&spec.store, hospital, Split::Test) {
        Ok(v) => v,
        Err(LocalError::NoCases { .. }) => Vec::new(),
        Err(e) => return Err(DaemonError::Cases(Box::new(e))),
    };
    let mut session = Session::new(&spec.cfg, &train, &device).map_err(DaemonError::Train)?;
    session.set_schedule_steps(spec.schedule_steps);
    session.set_gate(spec.gate.clone());
    let saved = session
        .restore(&StoreCheckpoints(&spec.store), &spec.run)
        .map_err(DaemonError::Train)?;
    Ok((session, test, saved))
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
    let (session, test, saved) = match setup(&spec) {
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
    let mut trainer = Trainer {
        spec,
        session,
        test,
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
    fn evaluate(&self) -> Result<Vec<CaseScore>, TrainError> {
        if self.test.is_empty() {
            Ok(Vec::new())
        } else {
            self.session.evaluate(&self.test)
        }
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
