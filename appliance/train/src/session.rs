//! The one training driver: a site's model, optimiser and data, trained a few steps at a time.
//! Local training ([`super::train`]) runs epochs of steps over a session; federation strategies
//! drive it a round at a time and replace the weights between rounds.
//!
//! A [`Session`] keeps one AdamW optimiser for its whole life. The learning rate follows the run's
//! schedule by the session's global step (rounds × steps per round stand for epochs × steps per
//! epoch; [`Session::set_schedule_steps`] lengthens it for a personalisation phase), and batches derive from `(seed, global step)` exactly as in the local trainer. When a
//! strategy installs a merged model with [`Session::set_weights`], the AdamW moments are **kept**:
//! they describe the local loss surface of this site's data, which averaging does not change, and
//! keeping them is what FedAvg with local adaptive optimisers (e.g. "FedAvg with local Adam" in
//! Reddi et al., *Adaptive Federated Optimization*) does; resetting them would re-run the bias
//! warm-up every round with a few dozen steps per round.
//!
//! The whole state (weights, optimiser moments, step and the caller's strategy state as JSON) is
//! saved into the store's checkpoints with the same safetensors helpers the local trainer uses,
//! so a killed appliance resumes where it stopped.
//!
//! A session may be given a [`TrainingGate`] ([`Session::set_gate`]): before every step it reports
//! the step boundary to the gate, which throttles it or parks it there (clinical work holds the
//! gate; the hardware guards set it). Parking between steps changes nothing of the trajectory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::data::{LabelledVolume, PreparedVolume, SliceSet};
use super::eval::{score, CaseScore};
use super::optim::AdamW;
use super::trainer::{
    epoch_order, load_weights, lr_at, pick_batch, train_step, weights_to_bytes, CheckpointSink,
    EpochRecord, TrainOutcome, RARE_SHARE,
};
use super::unet::{build, UNet};
use super::{TrainConfig, TrainError};
use cosilo_federation::weights::FlatWeights;
use cosilo_hardware::gate::TrainingGate;

/// Format number of a session checkpoint's metadata.
const SESSION_FORMAT: u32 = 1;

/// What a call to [`Session::steps`] did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StepsReport {
    /// Steps taken (fewer than asked when stopped).
    pub steps: usize,
    /// Mean total loss of those steps (NaN when none was taken).
    pub mean_loss: f64,
    /// The session's global step afterwards.
    pub global_step: u64,
    /// True when the stop flag ended the call early.
    pub stopped: bool,
}

/// One step's progress, for a log or a progress bar.
#[derive(Debug, Clone, Copy)]
pub struct StepEvent {
    pub global_step: u64,
    /// The step's total loss and its two terms.
    pub loss: f32,
    pub cross_entropy: f32,
    pub dice_loss: f32,
}

/// The metadata of a session checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SessionMeta {
    format: u32,
    /// The training configuration (the store's model loader reads this key too).
    config: TrainConfig,
    step: u64,
    optimiser_step: u64,
    /// Whatever the caller keeps with the model (a federation strategy's state).
    strategy: serde_json::Value,
}

/// A site's model, optimiser and training data, trained a few steps at a time.
pub struct Session {
    cfg: TrainConfig,
    device: Device,
    net: UNet,
    vars: VarMap,
    opt: AdamW,
    set: SliceSet,
    cases: usize,
    steps_per_epoch: usize,
    total_steps: usize,
    step: u64,
    gate: Option<TrainingGate>,
}

impl Session {
    /// Builds the model (deterministic initial weights for the seed) and indexes the training
    /// slices. `cfg.epochs × cfg.steps_per_epoch` is the length the learning-rate schedule spans.
    pub fn new(
        cfg: &TrainConfig,
        train: &[LabelledVolume],
        device: &Device,
    ) -> Result<Session, TrainError> {
        cfg.validate()?;
        let mut set = SliceSet::new(
            train
                .iter()
                .map(|v| PreparedVolume::new(v, &cfg.normalisation, &cfg.label_map))
                .collect(),
        );
        set.mark_rare(cfg.model.classes, RARE_SHARE);
        if set.is_empty() {
            return Err(TrainError::NoData(
                "no training slice contains a labelled voxel".into(),
            ));
        }
        let (net, vars) = build(&cfg.model, device, cfg.seed)?;
        let opt = AdamW::new(&vars, cfg.optimiser)?;
        let steps_per_epoch = cfg.steps_per_epoch(set.len());
        Ok(Session {
            cfg: cfg.clone(),
            device: device.clone(),
            net,
            vars,
            opt,
            cases: train.len(),
            total_steps: steps_per_epoch * cfg.epochs,
            steps_per_epoch,
            set,
            step: 0,
            gate: None,
        })
    }

    /// Sets the number of steps the learning-rate schedule spans (by default `cfg.epochs ×
    /// cfg.steps_per_epoch`). Federation sets it to the rounds plus the personalisation steps so
    /// that fine-tuning continues the same schedule instead of running at its floor. Not saved:
    /// set it before [`Session::restore`] the same way on every start.
    pub fn set_schedule_steps(&mut self, total: usize) {
        self.total_steps = total.max(1);
    }

    /// Makes every step boundary go through `gate` (throttle, park while held).
    pub fn set_gate(&mut self, gate: TrainingGate) {
        self.gate = Some(gate);
    }

    /// The number of steps the learning-rate schedule spans.
    pub fn schedule_steps(&self) -> usize {
        self.total_steps
    }

    /// The training configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The number of training cases: the weight of this site's model in an average.
    pub fn samples(&self) -> u64 {
        self.cases as u64
    }

    /// Labelled training slices.
    pub fn slices(&self) -> usize {
        self.set.len()
    }

    /// Steps in one epoch (one pass over the labelled slices, or the configured count).
    pub fn steps_per_epoch(&self) -> usize {
        self.steps_per_epoch
    }

    /// Ends the session, handing its model to the caller.
    pub fn into_outcome(
        self,
        history: Vec<EpochRecord>,
        final_scores: Vec<CaseScore>,
        finished: bool,
    ) -> TrainOutcome {
        TrainOutcome {
            net: self.net,
            vars: self.vars,
            history,
            final_scores,
            finished,
        }
    }

    /// Steps taken so far.
    pub fn global_step(&self) -> u64 {
        self.step
    }

    /// The network (for evaluation or export).
    pub fn net(&self) -> &UNet {
        &self.net
    }

    /// The parameters.
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    /// Trains `n` more steps, continuing the optimiser and the schedule. Checks `stop` and the
    /// gate (which may throttle or park the thread) before every step; a stopped call returns
    /// after the step in progress with `stopped: true`.
    pub fn steps(
        &mut self,
        n: usize,
        on_event: &mut dyn FnMut(&StepEvent),
        stop: &AtomicBool,
    ) -> Result<StepsReport, TrainError> {
        let mut sum = 0.0;
        let mut done = 0;
        let mut stopped = false;
        let mut order_epoch = usize::MAX;
        let mut order = Vec::new();
        let mut last_step = Duration::ZERO;
        for _ in 0..n {
            if stop.load(Ordering::SeqCst) {
                stopped = true;
                break;
            }
            if let Some(gate) = &self.gate {
                if gate.boundary(self.step, last_step, stop).stopped {
                    stopped = true;
                    break;
                }
            }
            let t0 = Instant::now();
            let global = self.step as usize;
            let epoch = global / self.steps_per_epoch;
            let in_epoch = global % self.steps_per_epoch;
            if epoch != order_epoch {
                order = epoch_order(&self.cfg, self.set.len(), epoch);
                order_epoch = epoch;
            }
            self.opt.set_lr(lr_at(&self.cfg, global, self.total_steps));
            let batch = pick_batch(&self.cfg, &self.set, &order, global, in_epoch);
            let loss = train_step(
                &self.cfg,
                &self.net,
                &mut self.opt,
                &self.set,
                batch,
                &self.device,
            )?;
            if !loss.total.is_finite() {
                return Err(TrainError::Diverged {
                    epoch,
                    step: in_epoch,
                });
            }
            self.step += 1;
            last_step = t0.elapsed();
            sum += loss.total as f64;
            done += 1;
            on_event(&StepEvent {
                global_step: self.step,
                loss: loss.total,
                cross_entropy: loss.cross_entropy,
                dice_loss: loss.dice_loss,
            });
        }
        Ok(StepsReport {
            steps: done,
            mean_loss: if done == 0 {
                f64::NAN
            } else {
                sum / done as f64
            },
            global_step: self.step,
            stopped,
        })
    }

    /// The current parameters, flattened in name order.
    pub fn weights(&self) -> Result<FlatWeights, TrainError> {
        crate::flat::flatten(&self.vars).map_err(|e| Box::new(e).into())
    }

    /// Installs parameters (a merged or received model). The AdamW moments are kept (see the
    /// module documentation). Refuses a model of another architecture.
    pub fn set_weights(&mut self, w: &FlatWeights) -> Result<(), TrainError> {
        crate::flat::apply(w, &self.vars).map_err(|e| Box::new(e).into())
    }

    /// Installs `values` laid out as this session's model ([`Session::weights`]' order) without
    /// copying the model out first to learn its layout.
    pub fn set_values(&mut self, values: &[f32]) -> Result<(), TrainError> {
        crate::flat::layout(&self.vars)
            .and_then(|layout| crate::flat::apply_values(&layout, values, &self.vars))
            .map_err(|e| Box::new(e).into())
    }

    /// Scores the current model on volumes (3-D Dice per class per case).
    pub fn evaluate(&self, volumes: &[LabelledVolume]) -> Result<Vec<CaseScore>, TrainError> {
        volumes
            .iter()
            .map(|v| {
                let p = PreparedVolume::new(v, &self.cfg.normalisation, &self.cfg.label_map);
                Ok(score(&self.net, &p, &self.device)?)
            })
            .collect()
    }

    /// Saves weights, optimiser moments, step and `strategy` (the caller's state) as checkpoint
    /// run `run`; durable when this returns. Returns the checkpoint's sequence number.
    pub fn save(
        &self,
        sink: &dyn CheckpointSink,
        run: &str,
        strategy: &serde_json::Value,
    ) -> Result<u64, TrainError> {
        let meta = SessionMeta {
            format: SESSION_FORMAT,
            config: self.cfg.clone(),
            step: self.step,
            optimiser_step: self.opt.step,
            strategy: strategy.clone(),
        };
        let meta =
            serde_json::to_value(&meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let bytes = weights_to_bytes(&self.vars, Some(&self.opt))?;
        sink.save(run, &meta, &bytes)
            .map_err(TrainError::Checkpoint)
    }

    /// Restores the newest checkpoint of `run` if there is one, returning the strategy state
    /// saved with it (`None`: nothing saved yet, the session is unchanged). A checkpoint made with
    /// another training configuration is refused.
    pub fn restore(
        &mut self,
        sink: &dyn CheckpointSink,
        run: &str,
    ) -> Result<Option<serde_json::Value>, TrainError> {
        let Some((meta, bytes)) = sink.latest(run).map_err(TrainError::Checkpoint)? else {
            return Ok(None);
        };
        let meta: SessionMeta = serde_json::from_value(meta).map_err(|e| {
            TrainError::Checkpoint(format!("unreadable session checkpoint of {run:?}: {e}"))
        })?;
        if meta.format != SESSION_FORMAT {
            return Err(TrainError::Checkpoint(format!(
                "session checkpoint format {} is unknown",
                meta.format
            )));
        }
        if meta.config != self.cfg {
            return Err(TrainError::ConfigChanged(run.to_string()));
        }
        let tensors = load_weights(&self.vars, &bytes, &self.device)?;
        self.opt.restore(&tensors, meta.optimiser_step)?;
        self.step = meta.step;
        Ok(Some(meta.strategy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{toy_config, toy_volume, MemorySink};

    #[test]
    fn session_steps_match_the_local_trainer() {
        // The whole schedule (4 epochs of 6 steps) as session calls of 10, 6 and 8 steps, each
        // crossing an epoch boundary, lands on the weights of the local run.
        let cfg = toy_config();
        let total = cfg.epochs * cfg.steps_per_epoch;
        let pieces = [10, 6, 8];
        assert_eq!(pieces.iter().sum::<usize>(), total);
        let data: Vec<_> = (0..2).map(toy_volume).collect();
        let never = AtomicBool::new(false);
        let mut s = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        assert_eq!(s.schedule_steps(), total);
        let mut seen = 0;
        for n in pieces {
            let r = s.steps(n, &mut |_| seen += 1, &never).unwrap();
            assert_eq!(r.steps, n);
            assert!(r.mean_loss.is_finite());
        }
        assert_eq!(seen, total);
        assert_eq!(s.global_step(), total as u64);
        let local = crate::train(
            &cfg,
            "x",
            &data,
            &[],
            &MemorySink::default(),
            &Device::Cpu,
            &mut |_| {},
            &never,
        )
        .unwrap();
        let a = s.weights().unwrap();
        let b = crate::flat::flatten(&local.vars).unwrap();
        assert_eq!(a.data.len(), b.data.len());
        let diff = a
            .data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-5, "session and trainer differ by {diff}");

        // A longer schedule (room for personalisation steps: one epoch more) keeps the learning
        // rate higher, so the same steps land elsewhere; they match a run of one epoch more.
        let longer_schedule = total + cfg.steps_per_epoch;
        let mut longer = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        longer.set_schedule_steps(longer_schedule);
        longer.steps(total, &mut |_| {}, &never).unwrap();
        let c = longer.weights().unwrap();
        let moved = a
            .data
            .iter()
            .zip(&c.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            moved > 1e-4,
            "the schedule length changed nothing ({moved})"
        );
        let mut one_more = cfg.clone();
        one_more.epochs += 1;
        let mut by_epochs = Session::new(&one_more, &data, &Device::Cpu).unwrap();
        assert_eq!(by_epochs.schedule_steps(), longer_schedule);
        by_epochs.steps(total, &mut |_| {}, &never).unwrap();
        assert_eq!(by_epochs.weights().unwrap().data, c.data);
    }

    #[test]
    fn a_run_parked_mid_way_by_the_gate_ends_bit_identical() {
        use std::sync::Arc;
        use std::time::Duration;
        let cfg = toy_config();
        let data: Vec<_> = (0..2).map(toy_volume).collect();
        let never = AtomicBool::new(false);
        let mut plain = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        plain.steps(12, &mut |_| {}, &never).unwrap();

        let gate = TrainingGate::new();
        let mut gated = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        gated.set_gate(gate.clone());
        // The hold is taken from inside step 5 (as a clinical job arriving while the trainer is
        // busy would): the gate has seen boundary 4 then, so parking at 5 is a latency of 1 step.
        let slot: Arc<std::sync::Mutex<Option<cosilo_hardware::gate::GateHold>>> = Arc::default();
        let (g2, slot2) = (gate.clone(), slot.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let trainer = std::thread::spawn(move || {
            let mut steps_seen = Vec::new();
            let r = gated
                .steps(
                    12,
                    &mut |e| {
                        steps_seen.push(e.global_step);
                        if e.global_step == 5 {
                            *slot2.lock().unwrap() = Some(g2.hold());
                        }
                    },
                    &flag,
                )
                .unwrap();
            (gated, r, steps_seen)
        });
        let long = Duration::from_secs(120);
        let (parked, ok) = gate.wait_for(long, |s| s.parked);
        assert!(ok, "never parked: {parked:?}");
        assert_eq!(parked.boundary, 5, "{parked:?}");
        assert_eq!(parked.last_pause_latency_steps, Some(1), "{parked:?}");
        // While parked no step is taken (the boundary stays).
        let (_, moved) = gate.wait_for(Duration::from_millis(300), |s| {
            s.boundary != parked.boundary
        });
        assert!(!moved);
        let hold = slot.lock().unwrap().take().expect("the hold was taken");
        drop(hold);
        let (gated, report, seen) = trainer.join().unwrap();
        assert_eq!(report.steps, 12);
        assert!(!report.stopped);
        assert_eq!(seen, (1..=12).collect::<Vec<u64>>());
        assert_eq!(gate.status().clinical_pauses, 1);
        // Bit-identical to the uninterrupted run.
        assert_eq!(gated.weights().unwrap().data, plain.weights().unwrap().data);

        // A stop raised while parked ends the call at once, before any further step.
        let mut parked_run = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        parked_run.set_gate(gate.clone());
        let _hold = gate.hold();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let t = std::thread::spawn(move || parked_run.steps(5, &mut |_| {}, &flag).unwrap());
        assert!(gate.wait_for(long, |s| s.parked).1);
        stop.store(true, Ordering::SeqCst);
        let r = t.join().unwrap();
        assert!(r.stopped);
        assert_eq!(r.steps, 0);
    }

    #[test]
    fn save_restore_set_weights_and_stop() {
        let cfg = toy_config();
        let data: Vec<_> = (0..2).map(toy_volume).collect();
        let never = AtomicBool::new(false);
        let sink = MemorySink::default();
        let mut a = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        assert_eq!(a.samples(), 2);
        a.steps(3, &mut |_| {}, &never).unwrap();
        let state = serde_json::json!({"round": 3});
        a.save(&sink, "fed", &state).unwrap();
        a.steps(2, &mut |_| {}, &never).unwrap();

        let mut b = Session::new(&cfg, &data, &Device::Cpu).unwrap();
        assert_eq!(b.restore(&sink, "fed").unwrap(), Some(state));
        assert_eq!(b.global_step(), 3);
        b.steps(2, &mut |_| {}, &never).unwrap();
        let (wa, wb) = (a.weights().unwrap(), b.weights().unwrap());
        let diff = wa
            .data
            .iter()
            .zip(&wb.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6, "resumed session differs by {diff}");

        // set_weights installs exactly the given model.
        let mut w = wa.clone();
        for x in &mut w.data {
            *x *= 0.5;
        }
        b.set_weights(&w).unwrap();
        assert_eq!(b.weights().unwrap().data, w.data);
        // set_values does the same from bare values in the session's layout order, and refuses
        // a vector of another length, changing nothing.
        let mut v = w.data.clone();
        v[0] += 1.0;
        b.set_values(&v).unwrap();
        assert_eq!(b.weights().unwrap().data, v);
        assert!(b.set_values(&v[1..]).is_err());
        assert_eq!(b.weights().unwrap().data, v);
        b.set_weights(&w).unwrap();
        let scores = b.evaluate(&data[..1]).unwrap();
        assert_eq!(scores.len(), 1);
        assert_eq!(scores[0].dice.len(), cfg.model.classes);

        // A raised stop flag ends the call before any step.
        let stop = AtomicBool::new(true);
        let r = b.steps(4, &mut |_| {}, &stop).unwrap();
        assert!(r.stopped);
        assert_eq!(r.steps, 0);

        // Another configuration's checkpoint is refused.
        let mut other = cfg.clone();
        other.seed = 99;
        let mut c = Session::new(&other, &data, &Device::Cpu).unwrap();
        assert!(matches!(
            c.restore(&sink, "fed"),
            Err(TrainError::ConfigChanged(_))
        ));
    }
}
