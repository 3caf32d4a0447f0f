//! Local training of the 2-D segmentation U-Net with candle.
//!
//! - [`unet`]: the network, its parameter names and deterministic initialisation.
//! - [`loss`]: soft Dice + cross-entropy.
//! - [`ops`]: fast CPU kernels (convolutions, GroupNorm + ReLU, pooling) as candle custom ops.
//! - [`optim`]: AdamW with saveable state.
//! - [`data`]: volumes → normalised slices → augmented batches.
//! - [`trainer`]: the loop, checkpoints and resume.
//! - [`session`]: the incremental trainer federation strategies drive a few steps at a time.
//! - [`eval`]: whole-volume prediction and 3-D Dice.
//! - [`export`]: writes a trained model as an ONNX bundle the SDK can run.
//! - [`flat`]: a model's variables as the federation's flat weights, and back.
//! - [`selector`]: FedSM's site selector (a small K-way image classifier) and its local epoch.
//! - `gradcheck` (tests): finite-difference checks of every op the model's gradient uses.
//!
//! Training is CPU-bound and runs on the caller's thread; the daemon gives it a thread of its own.

pub mod data;
pub mod eval;
pub mod export;
pub mod flat;
pub mod loss;
pub mod ops;
pub mod optim;
pub mod selector;
pub mod session;
pub mod trainer;
pub mod unet;

#[cfg(test)]
mod gradcheck;
#[cfg(test)]
mod test_fixtures;

use cosilo_sdk::preprocess::Normalisation;
use serde::{Deserialize, Serialize};

pub use data::{Augment, LabelledVolume};
pub use optim::AdamWConfig;
pub use trainer::{train, CheckpointSink, EpochRecord, TrainEvent, TrainOutcome};
pub use unet::{UNet, UNetConfig};

/// Errors of training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("invalid training configuration: {0}")]
    Config(String),
    #[error("no training data: {0}")]
    NoData(String),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("run {0:?} has a checkpoint made with a different configuration; start a new run name or remove it")]
    ConfigChanged(String),
    #[error("model weights: {0}")]
    Weights(#[from] Box<flat::FlatError>),
    #[error("training diverged (non-finite loss) at epoch {epoch}, step {step}")]
    Diverged { epoch: usize, step: usize },
}

/// The device training runs on: the first CUDA GPU when built with `--features cuda` and one can
/// be opened, else the CPU. A `cuda` build on a machine without a usable GPU (no device, a driver
/// that refuses, `CUDA_VISIBLE_DEVICES=""`) logs one warning with the reason, once per process,
/// and trains on the CPU. (The `cuda` build still needs the driver's `libcuda.so.1` and the CUDA
/// libraries to start at all, since candle links them: docs/DEPENDENCIES.md.)
pub fn device() -> Result<candle_core::Device, TrainError> {
    Ok(pick_device())
}

#[cfg(feature = "cuda")]
fn pick_device() -> candle_core::Device {
    static DEVICE: std::sync::OnceLock<candle_core::Device> = std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match candle_core::Device::new_cuda(0) {
            Ok(d) => {
                tracing::info!("training on CUDA GPU 0");
                d
            }
            Err(e) => {
                // candle appends a backtrace to driver errors under RUST_BACKTRACE: first line only.
                let e = e.to_string();
                let reason = e.lines().next().unwrap_or("unknown error");
                tracing::warn!(
                    "cuda build, but no usable CUDA GPU ({reason}); training on the CPU"
                );
                candle_core::Device::Cpu
            }
        })
        .clone()
}

#[cfg(not(feature = "cuda"))]
fn pick_device() -> candle_core::Device {
    candle_core::Device::Cpu
}

/// The class names of the default label map.
pub const DEFAULT_CLASSES: [&str; 5] =
    ["background", "csf", "grey_matter", "white_matter", "tumour"];

/// Everything that determines a training run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: UNetConfig,
    pub optimiser: AdamWConfig,
    pub augment: Augment,
    pub normalisation: Normalisation,
    /// Label value in the data → training class (values beyond the map are background).
    pub label_map: Vec<u8>,
    /// One name per class.
    pub class_names: Vec<String>,
    pub epochs: usize,
    /// Steps per epoch; 0 = one pass over the foreground slices.
    pub steps_per_epoch: usize,
    pub batch_size: usize,
    /// Training crop, rows × columns (multiples of 2^depth).
    pub patch: [usize; 2],
    pub seed: u64,
    /// Checkpoint every this many steps inside an epoch (0 = epoch ends only).
    pub checkpoint_every: usize,
    /// Share of each batch drawn from slices that contain a rare class (one under 5 % of the
    /// labelled voxels, e.g. tumour); the rest follows the epoch's shuffled order.
    pub oversample_rare: f64,
}

/// The checked-in defaults (`appliance/config/train.toml`).
pub const DEFAULT_TRAIN_TOML: &str = include_str!("../config/train.toml");

impl Default for TrainConfig {
    fn default() -> Self {
        // The embedded file is checked by a unit test; failing here is a build defect, not input.
        toml::from_str(DEFAULT_TRAIN_TOML)
            .expect("appliance/config/train.toml is a valid TrainConfig")
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), TrainError> {
        self.model.validate().map_err(TrainError::Config)?;
        let m = self.model.multiple();
        if self.patch.iter().any(|&p| p == 0 || p % m != 0) {
            return Err(TrainError::Config(format!(
                "patch {:?} must be positive multiples of {m}",
                self.patch
            )));
        }
        if self.class_names.len() != self.model.classes {
            return Err(TrainError::Config(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                self.model.classes
            )));
        }
        if let Some(&c) = self
            .label_map
            .iter()
            .find(|&&c| c as usize >= self.model.classes)
        {
            return Err(TrainError::Config(format!(
                "label map names class {c}, beyond the model's classes"
            )));
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return Err(TrainError::Config(
                "epochs and batch_size must be at least 1".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.oversample_rare) {
            return Err(TrainError::Config(
                "oversample_rare must be between 0 and 1".into(),
            ));
        }
        if !(self.optimiser.lr > 0.0 && self.optimiser.lr.is_finite()) {
            return Err(TrainError::Config("learning rate must be positive".into()));
        }
        Ok(())
    }

    /// Reads a TOML training configuration and validates it.
    pub fn from_toml(text: &str) -> Result<Self, TrainError> {
        let cfg: TrainConfig =
            toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Steps in one epoch for a set of `slices` training slices.
    pub fn steps_per_epoch(&self, slices: usize) -> usize {
        if self.steps_per_epoch > 0 {
            self.steps_per_epoch
        } else {
            slices.div_ceil(self.batch_size).max(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_validates_and_round_trips() {
        let cfg = TrainConfig::from_toml(DEFAULT_TRAIN_TOML).unwrap();
        assert_eq!(cfg, TrainConfig::default());
        assert_eq!(cfg.model.classes, cfg.class_names.len());
        let again = TrainConfig::from_toml(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let c = TrainConfig {
            patch: [90, 96],
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("multiples of 8"));
        let c = TrainConfig {
            label_map: vec![0, 7],
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("class 7"));
        let e = TrainConfig::from_toml("epochs = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
    }
}
