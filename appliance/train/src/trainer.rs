//! The training loop: batches → forward → loss → backward → AdamW, with checkpoints that make a
//! killed run resume where it stopped and continue on the same trajectory.
//!
//! Everything random is derived from the run's seed and a counter: the slice order of epoch `e`
//! from `(seed, e)`, the crops and augmentation of step `s` from `(seed, s)`. A run resumed from a
//! checkpoint therefore sees exactly the batches it would have seen without the interruption.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::data::{LabelledVolume, PreparedVolume, SliceSet};
use super::eval::{mean_per_class, score, CaseScore};
use super::loss::{dice_cross_entropy, one_hot};
use super::optim::AdamW;
use super::unet::{build, UNet};
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

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointMeta {
    format: u32,
    config: TrainConfig,
    /// The epoch in progress and the steps of it already done.
    epoch: usize,
    step_in_epoch: usize,
    optimiser_step: u64,
    history: Vec<EpochRecord>,
    /// Partial sums of the epoch in progress: (loss, ce, dice_loss, steps).
    partial: (f64, f64, f64, usize),
    finished: bool,
}

const CHECKPOINT_FORMAT: u32 = 1;

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

/// Trains (or resumes) run `run` on `train`, scoring on `val` after every epoch.
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
    cfg.validate()?;
    let prep = |v: &LabelledVolume| PreparedVolume::new(v, &cfg.normalisation, &cfg.label_map);
    let mut set = SliceSet::new(train.iter().map(prep).collect());
    set.mark_rare(cfg.model.classes, RARE_SHARE);
    if set.is_empty() {
        return Err(TrainError::NoData(
            "no training slice contains a labelled voxel".into(),
        ));
    }
    let val: Vec<PreparedVolume> = val.iter().map(prep).collect();
    let (net, vars) = build(&cfg.model, device, cfg.seed)?;
    let mut opt = AdamW::new(&vars, cfg.optimiser)?;

    let steps_per_epoch = cfg.steps_per_epoch(set.len());
    let total = steps_per_epoch * cfg.epochs;
    let mut epoch = 0;
    let mut start_step = 0;
    let mut history = Vec::new();
    let mut partial = (0.0, 0.0, 0.0, 0usize);

    if let Some((meta, bytes)) = sink.latest(run).map_err(TrainError::Checkpoint)? {
        let meta: CheckpointMeta = serde_json::from_value(meta)
            .map_err(|e| TrainError::Checkpoint(format!("unreadable checkpoint metadata: {e}")))?;
        if meta.format != CHECKPOINT_FORMAT {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint format {} is unknown",
                meta.format
            )));
        }
        if meta.config != *cfg {
            return Err(TrainError::ConfigChanged(run.to_string()));
        }
        let tensors = load_weights(&vars, &bytes, device)?;
        opt.restore(&tensors, meta.optimiser_step)?;
        epoch = meta.epoch;
        start_step = meta.step_in_epoch;
        history = meta.history;
        partial = meta.partial;
        on_event(&TrainEvent::Resumed {
            epoch,
            step_in_epoch: start_step,
        });
        if meta.finished {
            let final_scores = val
                .iter()
                .map(|v| score(&net, v, device))
                .collect::<Result<_, _>>()?;
            return Ok(TrainOutcome {
                net,
                vars,
                history,
                final_scores,
                finished: true,
            });
        }
    }
    on_event(&TrainEvent::Started {
        total_steps: total,
        slices: set.len(),
        parameters: UNet::parameter_count(&vars),
    });

    let save = |opt: &AdamW,
                epoch: usize,
                step_in_epoch: usize,
                history: &[EpochRecord],
                partial: (f64, f64, f64, usize),
                finished: bool|
     -> Result<u64, TrainError> {
        let meta = CheckpointMeta {
            format: CHECKPOINT_FORMAT,
            config: cfg.clone(),
            epoch,
            step_in_epoch,
            optimiser_step: opt.step,
            history: history.to_vec(),
            partial,
            finished,
        };
        let meta =
            serde_json::to_value(&meta).map_err(|e| TrainError::Checkpoint(e.to_string()))?;
        let bytes = weights_to_bytes(&vars, Some(opt))?;
        sink.save(run, &meta, &bytes)
            .map_err(TrainError::Checkpoint)
    };

    let mut final_scores = Vec::new();
    while epoch < cfg.epochs {
        let t0 = Instant::now();
        let order = epoch_order(cfg, set.len(), epoch);
        for step in start_step..steps_per_epoch {
            if stop.load(Ordering::SeqCst) {
                let seq = save(&opt, epoch, step, &history, partial, false)?;
                on_event(&TrainEvent::Checkpoint {
                    seq,
                    epoch,
                    step_in_epoch: step,
                });
                return Ok(TrainOutcome {
                    net,
                    vars,
                    history,
                    final_scores,
                    finished: false,
                });
            }
            let global = epoch * steps_per_epoch + step;
            opt.set_lr(lr_at(cfg, global, total));
            let batch = pick_batch(cfg, &set, &order, global, step);
            let loss = train_step(cfg, &net, &mut opt, &set, batch, device)?;
            let value = loss.total;
            if !value.is_finite() {
                return Err(TrainError::Diverged { epoch, step });
            }
            partial.0 += value as f64;
            partial.1 += loss.cross_entropy as f64;
            partial.2 += loss.dice_loss as f64;
            partial.3 += 1;
            on_event(&TrainEvent::Step {
                epoch,
                step_in_epoch: step + 1,
                steps_per_epoch,
                loss: value,
            });
            let done = step + 1;
            if cfg.checkpoint_every > 0
                && done % cfg.checkpoint_every == 0
                && done < steps_per_epoch
            {
                let seq = save(&opt, epoch, done, &history, partial, false)?;
                on_event(&TrainEvent::Checkpoint {
                    seq,
                    epoch,
                    step_in_epoch: done,
                });
            }
        }
        final_scores = val
            .iter()
            .map(|v| score(&net, v, device))
            .collect::<Result<_, _>>()?;
        let n = partial.3.max(1) as f64;
        let record = EpochRecord {
            epoch,
            loss: partial.0 / n,
            cross_entropy: partial.1 / n,
            dice_loss: partial.2 / n,
            val_dice: if val.is_empty() {
                Vec::new()
            } else {
                mean_per_class(&final_scores, cfg.model.classes)
            },
            seconds: t0.elapsed().as_secs_f64(),
        };
        history.push(record.clone());
        on_event(&TrainEvent::Epoch(record));
        epoch += 1;
        start_step = 0;
        partial = (0.0, 0.0, 0.0, 0);
        let seq = save(&opt, epoch, 0, &history, partial, epoch == cfg.epochs)?;
        on_event(&TrainEvent::Checkpoint {
            seq,
            epoch,
            step_in_epoch: 0,
        });
    }
    Ok(TrainOutcome {
        net,
        vars,
        history,
        final_scores,
        finished: true,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{Augment, UNetConfig};
    use cosilo_sdk::volume::{Geometry, Volume};
    use std::cell::RefCell;

    /// Checkpoints in memory, for tests.
    #[derive(Default)]
    pub(crate) struct MemorySink(RefCell<Vec<(serde_json::Value, Vec<u8>)>>);

    impl CheckpointSink for MemorySink {
        fn save(&self, _run: &str, meta: &serde_json::Value, bytes: &[u8]) -> Result<u64, String> {
            self.0.borrow_mut().push((meta.clone(), bytes.to_vec()));
            Ok(self.0.borrow().len() as u64)
        }
        fn latest(&self, _run: &str) -> Result<Option<(serde_json::Value, Vec<u8>)>, String> {
            Ok(self.0.borrow().last().cloned())
        }
    }

    /// A volume with a bright disc (class 1) and a dim ring (class 2) on a dark background.
    fn toy_volume(seed: u64) -> LabelledVolume {
        let mut rng = Rng::new(seed);
        let g = Geometry::axis_aligned([16, 16, 6], [1.0; 3], [0.0; 3]);
        let (cx, cy) = (rng.range(6.0, 10.0), rng.range(6.0, 10.0));
        let mut image = Volume::filled(g.clone(), 0f32);
        let mut label = Volume::filled(g, 0u8);
        for k in 0..6 {
            for j in 0..16 {
                for i in 0..16 {
                    let r = ((i as f64 - cx).powi(2) + (j as f64 - cy).powi(2)).sqrt();
                    let idx = i + 16 * (j + 16 * k);
                    let (c, v) = if r < 3.0 {
                        (1, 1.0)
                    } else if r < 5.0 {
                        (2, 0.5)
                    } else {
                        (0, 0.05)
                    };
                    label.data[idx] = c;
                    image.data[idx] = v + 0.05 * rng.normal() as f32;
                }
            }
        }
        LabelledVolume {
            id: format!("toy{seed}"),
            image,
            label,
        }
    }

    fn toy_config() -> TrainConfig {
        TrainConfig {
            model: UNetConfig {
                in_channels: 1,
                classes: 3,
                base: 4,
                depth: 2,
                groups: 2,
            },
            label_map: vec![0, 1, 2],
            class_names: vec!["bg".into(), "disc".into(), "ring".into()],
            epochs: 4,
            steps_per_epoch: 6,
            batch_size: 4,
            patch: [16, 16],
            augment: Augment::default(),
            checkpoint_every: 4,
            oversample_rare: 0.25,
            optimiser: crate::AdamWConfig {
                lr: 1e-2,
                ..Default::default()
            },
            ..Default::default()
        }
    }

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
