//! The training loop: batches → forward → loss → backward → AdamW, with checkpoints that make a
//! killed run resume where it stopped and continue on the same trajectory.
//!
//! Everything random is derived from the run's seed and a counter: the slice order of epoch `e`
//! from `(seed, e)`, the crops and augmentation of step `s` from `(seed, s)`. A run resumed from a
//! checkpoint therefore sees exactly the batches it would have seen without the interruption.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::data::{LabelledVolume, PreparedVolume, SliceSet};
use super::eval::{mean_per_class, score, CaseScore};
use super::loss::{dice_cross_entropy, one_hot};
use super::optim::AdamW;
use super::session::{Session, StepEvent};
use super::unet::UNet;
use super::{TrainConfig, TrainError};
use cosilo_rng::Rng;

/// Where checkpoints go. The dataset store implements it; tests use a map in memory.
pub trait CheckpointSink {
    /// Saves durably; returns a sequence number.
    fn save(&self, run: &str, meta: &serde_json::Value, bytes: &[u8]) -> Result<u64, String>;
    /// The newest checkpoint of a run.
    fn latest(&self, run: &str) -> Result<Option<(serde_json::Value, Vec<u8>)>, String>;
}

/// One epoch's record, for the curve and the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub loss: f64,
    pub cross_entropy: f64,
    pub dice_loss: f64,
    /// Mean 3-D Dice per class on the validation volumes (empty when none were given).
    pub val_dice: Vec<Option<f64>>,
    pub seconds: f64,
}

/// Progress reports for a front end (progress bar, log, federation status).
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Started {
        total_steps: usize,
        slices: usize,
        parameters: usize,
    },
    Resumed {
        epoch: usize,
        step_in_epoch: usize,
    },
    Step {
        epoch: usize,
        step_in_epoch: usize,
        steps_per_epoch: usize,
        loss: f32,
    },
    Epoch(EpochRecord),
    Checkpoint {
        seq: u64,
        epoch: usize,
        step_in_epoch: usize,
    },
}

/// What a run produced.
pub struct TrainOutcome {
    pub net: UNet,
    pub vars: VarMap,
    pub history: Vec<EpochRecord>,
    /// Per-case scores on the validation volumes after the last epoch.
    pub final_scores: Vec<CaseScore>,
    /// False when the run was stopped early by the stop flag (a checkpoint was written).
    pub finished: bool,
}

/// What a local run keeps with its session checkpoint (the `strategy` state of
/// [`Session::save`]): one checkpoint format serves local runs and federation alike.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LocalProgress {
    /// Completed epochs.
    pub epoch: usize,
    pub history: Vec<EpochRecord>,
    /// Partial sums of the epoch in progress: (loss, ce, dice_loss, steps).
    pub partial: (f64, f64, f64, usize),
    pub finished: bool,
}

impl LocalProgress {
    /// The epoch history recorded in a checkpoint's metadata (empty when it has none, e.g. a
    /// federation session's checkpoint).
    pub fn history_of(meta: &serde_json::Value) -> Vec<EpochRecord> {
        meta.get("strategy")
            .and_then(|s| s.get("history"))
            .cloned()
            .and_then(|h| serde_json::from_value(h).ok())
            .unwrap_or_default()
    }
}

/// A class under this share of the labelled voxels counts as rare for oversampling.
pub(crate) const RARE_SHARE: f64 = 0.05;

/// Serialises weights (and optimiser moments when given) as safetensors.
pub fn weights_to_bytes(vars: &VarMap, opt: Option<&AdamW>) -> Result<Vec<u8>, TrainError> {
    let mut tensors: HashMap<String, Tensor> = vars
        .data()
        .lock()
        .map_err(|_| TrainError::Checkpoint("poisoned var map".into()))?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    if let Some(opt) = opt {
        tensors.extend(opt.state());
    }
    let mut sorted: Vec<(String, Tensor)> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize(sorted, None).map_err(|e| TrainError::Checkpoint(e.to_string()))
}

/// Loads weights saved by [`weights_to_bytes`] into a var map built for the same configuration.
pub fn load_weights(
    vars: &VarMap,
    bytes: &[u8],
    device: &Device,
) -> Result<HashMap<String, Tensor>, TrainError> {
    let tensors = candle_core::safetensors::load_buffer(bytes, device)?;
    let data = vars
        .data()
        .lock()
        .map_err(|_| TrainError::Checkpoint("poisoned var map".into()))?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .ok_or_else(|| TrainError::Checkpoint(format!("weights lack {name}")))?;
        if t.dims() != var.dims() {
            return Err(TrainError::Checkpoint(format!(
                "{name}: saved shape {:?}, model shape {:?}",
                t.dims(),
                var.dims()
            )));
        }
        var.set(t)?;
    }
    Ok(tensors)
}

/// The shuffled order of `slices` training slices in epoch `epoch`.
pub(crate) fn epoch_order(cfg: &TrainConfig, slices: usize, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..slices).collect();
    Rng::derive(cfg.seed, 0x0e90c + epoch as u64).shuffle(&mut order);
    order
}

/// The losses of one optimiser step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepLoss {
    pub total: f32,
    pub cross_entropy: f32,
    pub dice_loss: f32,
}

/// The slices of the batch of global step `global` (step `step_in_epoch` of its epoch, whose
/// shuffled slice order is `order`): a share from rare-class slices, the rest in order. Returns
/// the step's generator too: the crops and augmentation continue its stream.
pub(crate) fn pick_batch(
    cfg: &TrainConfig,
    set: &SliceSet,
    order: &[usize],
    global: usize,
    step_in_epoch: usize,
) -> (Vec<usize>, Rng) {
    let mut rng = Rng::derive(cfg.seed, 0x5_7e9 + global as u64);
    let n_rare = if set.rare.is_empty() {
        0
    } else {
        (cfg.batch_size as f64 * cfg.oversample_rare).round() as usize
    };
    let picks = (0..cfg.batch_size)
        .map(|i| {
            if i < n_rare {
                set.rare[rng.below(set.rare.len())]
            } else {
                order[(step_in_epoch * cfg.batch_size + i) % order.len()]
            }
        })
        .collect();
    (picks, rng)
}

/// One optimiser step on the slices `picks` (from [`pick_batch`], whose generator `rng` draws
/// the crops and augmentation): forward, loss, backward, AdamW with the learning rate already
/// set. A non-finite loss is returned without updating the weights; the caller decides.
pub(crate) fn train_step(
    cfg: &TrainConfig,
    net: &UNet,
    opt: &mut AdamW,
    set: &SliceSet,
    (picks, mut rng): (Vec<usize>, Rng),
    device: &Device,
) -> Result<StepLoss, TrainError> {
    let [h, w] = cfg.patch;
    let batch = set.batch(&picks, h, w, &cfg.augment, &mut rng);
    let x = Tensor::from_vec(batch.image, (batch.b, 1, h, w), device)?;
    let classes = cfg.model.classes;
    let oh = one_hot(&batch.classes, batch.b, classes, h, w);
    let target = Tensor::from_vec(oh, (batch.b, classes, h, w), device)?;
    let logits = net.forward(&x)?;
    let loss = dice_cross_entropy(&logits, &target)?;
    let total = loss.total.to_scalar::<f32>()?;
    if total.is_finite() {
        opt.apply(&loss.total.backward()?)?;
    }
    Ok(StepLoss {
        total,
        cross_entropy: loss.cross_entropy,
        dice_loss: loss.dice_loss,
    })
}

pub(crate) fn lr_at(cfg: &TrainConfig, global_step: usize, total: usize) -> f64 {
    // Linear warm-up over the first 3 % of steps, then cosine decay to 5 % of the peak.
    let base = cfg.optimiser.lr;
    let warm = (total as f64 * 0.03).max(1.0);
    let s = global_step as f64;
    if s < warm {
        return base * (s + 1.0) / warm;
    }
    let t = ((s - warm) / (total as f64 - warm).max(1.0)).min(1.0);
    base * (0.05 + 0.95 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()))
}

/// Trains (or resumes) run `run` on `train`, scoring on `val` after every epoch: epochs of steps
/// over one [`Session`], so local training and federation share one driver and one checkpoint
/// format.
///
/// Checkpoints go to `sink` every `cfg.checkpoint_every` steps, at every epoch end, and when
/// `stop` becomes true (then the function returns with `finished: false`).
#[allow(clippy::too_many_arguments)]
pub fn train(
    cfg: &TrainConfig,
    run: &str,
    train: &[LabelledVolume],
    val: &[LabelledVolume],
    sink: &dyn CheckpointSink,
    device: &Device,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    let mut session = Session::new(cfg, train, device)?;
    let val: Vec<PreparedVolume> = val
        .iter()
        .map(|v| PreparedVolume::new(v, &cfg.normalisation, &cfg.label_map))
        .collect();
    let spe = session.steps_per_epoch();
    let mut progress = LocalProgress::default();
    if let Some(state) = session.restore(sink, run)? {
        progress = serde_json::from_value(state)
            .map_err(|e| TrainError::Checkpoint(format!("unreadable progress of {run:?}: {e}")))?;
        on_event(&TrainEvent::Resumed {
            epoch: progress.epoch,
            step_in_epoch: session.global_step() as usize - progress.epoch * spe,
        });
    }
    let scores = |s: &Session| -> Result<Vec<CaseScore>, TrainError> {
        val.iter().map(|v| Ok(score(s.net(), v, device)?)).collect()
    };
    if progress.finished {
        let final_scores = scores(&session)?;
        return Ok(session.into_outcome(progress.history, final_scores, true));
    }
    on_event(&TrainEvent::Started {
        total_steps: spe * cfg.epochs,
        slices: session.slices(),
        parameters: UNet::parameter_count(session.vars()),
    });
    let save = |s: &Session, p: &LocalProgress| -> Result<u64, TrainError> {
        let state = serde_json::to_value(p).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        s.save(sink, run, &state)
    };
    let mut final_scores = Vec::new();
    while progress.epoch < cfg.epochs {
        let t0 = Instant::now();
        let epoch = progress.epoch;
        loop {
            let done = session.global_step() as usize - epoch * spe;
            if done == spe {
                break;
            }
            // Train up to the next checkpoint boundary (or the epoch's end).
            let next = match cfg.checkpoint_every {
                0 => spe,
                every => spe.min((done / every + 1) * every),
            };
            let partial = &mut progress.partial;
            let report = session.steps(
                next - done,
                &mut |e: &StepEvent| {
                    partial.0 += e.loss as f64;
                    partial.1 += e.cross_entropy as f64;
                    partial.2 += e.dice_loss as f64;
                    partial.3 += 1;
                    on_event(&TrainEvent::Step {
                        epoch,
                        step_in_epoch: e.global_step as usize - epoch * spe,
                        steps_per_epoch: spe,
                        loss: e.loss,
                    });
                },
                stop,
            )?;
            let at = session.global_step() as usize - epoch * spe;
            if report.stopped || at < spe {
                let seq = save(&session, &progress)?;
                on_event(&TrainEvent::Checkpoint {
                    seq,
                    epoch,
                    step_in_epoch: at,
                });
            }
            if report.stopped {
                return Ok(session.into_outcome(progress.history, final_scores, false));
            }
        }
        final_scores = scores(&session)?;
        let n = progress.partial.3.max(1) as f64;
        let record = EpochRecord {
            epoch,
            loss: progress.partial.0 / n,
            cross_entropy: progress.partial.1 / n,
            dice_loss: progress.partial.2 / n,
            val_dice: if val.is_empty() {
                Vec::new()
            } else {
                mean_per_class(&final_scores, cfg.model.classes)
            },
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress.history.push(record.clone());
        on_event(&TrainEvent::Epoch(record));
        progress.epoch += 1;
        progress.partial = (0.0, 0.0, 0.0, 0);
        progress.finished = progress.epoch == cfg.epochs;
        let seq = save(&session, &progress)?;
        on_event(&TrainEvent::Checkpoint {
            seq,
            epoch: progress.epoch,
            step_in_epoch: 0,
        });
    }
    Ok(session.into_outcome(progress.history, final_scores, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::{toy_config, toy_volume, MemorySink};
    use std::sync::atomic::Ordering;

    fn weights(vars: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = vars.data().lock().unwrap();
        let mut v: Vec<(String, Vec<f32>)> = data
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    t.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn loss_falls_and_dice_is_scored() {
        let cfg = toy_config();
        let data: Vec<_> = (0..3).map(toy_volume).collect();
        let val = vec![toy_volume(99)];
        let sink = MemorySink::default();
        let stop = AtomicBool::new(false);
        let mut steps = 0;
        let out = train(
            &cfg,
            "t",
            &data,
            &val,
            &sink,
            &Device::Cpu,
            &mut |e| {
                if let TrainEvent::Step { .. } = e {
                    steps += 1
                }
            },
            &stop,
        )
        .unwrap();
        assert!(out.finished);
        assert_eq!(steps, 24);
        let first = out.history.first().unwrap().loss;
        let last = out.history.last().unwrap().loss;
        assert!(last < 0.75 * first, "loss {first} → {last}");
        let val_dice = &out.history.last().unwrap().val_dice;
        assert_eq!(val_dice.len(), 3);
        assert!(val_dice[1].unwrap() > 0.5, "{val_dice:?}");
        // Checkpoints: every 4 steps inside an epoch plus every epoch end.
        assert_eq!(sink.0.borrow().len(), 4 + 4);
    }

    #[test]
    fn killed_run_resumes_on_the_same_trajectory() {
        let cfg = toy_config();
        let data: Vec<_> = (0..3).map(toy_volume).collect();
        let straight_sink = MemorySink::default();
        let never = AtomicBool::new(false);
        let straight = train(
            &cfg,
            "a",
            &data,
            &[],
            &straight_sink,
            &Device::Cpu,
            &mut |_| {},
            &never,
        )
        .unwrap();

        // Interrupt twice: mid-epoch (step 9 = epoch 1, step 3) and again later; resume each time.
        let sink = MemorySink::default();
        for stop_after in [9usize, 17] {
            let stop = AtomicBool::new(false);
            let mut n = 0;
            let part = train(
                &cfg,
                "a",
                &data,
                &[],
                &sink,
                &Device::Cpu,
                &mut |e| {
                    if let TrainEvent::Step { .. } = e {
                        n += 1;
                        if n == stop_after - if stop_after == 17 { 9 } else { 0 } {
                            stop.store(true, Ordering::SeqCst);
                        }
                    }
                },
                &stop,
            )
            .unwrap();
            assert!(!part.finished);
        }
        let resumed = train(
            &cfg,
            "a",
            &data,
            &[],
            &sink,
            &Device::Cpu,
            &mut |_| {},
            &never,
        )
        .unwrap();
        assert!(resumed.finished);
        let (a, b) = (weights(&straight.vars), weights(&resumed.vars));
        for ((na, wa), (nb, wb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let diff = wa
                .iter()
                .zip(wb)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{na} differs by {diff}");
        }
        let la: Vec<f64> = straight.history.iter().map(|h| h.loss).collect();
        let lb: Vec<f64> = resumed.history.iter().map(|h| h.loss).collect();
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() < 1e-5, "{la:?} vs {lb:?}");
        }
        // A finished run reopened does not train again, and a changed config is refused.
        let again = train(
            &cfg,
            "a",
            &data,
            &[],
            &sink,
            &Device::Cpu,
            &mut |e| {
                assert!(!matches!(e, TrainEvent::Step { .. }), "trained again");
            },
            &never,
        )
        .unwrap();
        assert!(again.finished);
        let mut other = cfg.clone();
        other.epochs = 5;
        let err = train(
            &other,
            "a",
            &data,
            &[],
            &sink,
            &Device::Cpu,
            &mut |_| {},
            &never,
        )
        .err()
        .unwrap();
        assert!(matches!(err, TrainError::ConfigChanged(_)));
    }
}
