//! Test fixtures the training tests share: toy volumes (a bright disc and a dim ring on a dark
//! background, three classes), the small U-Net configuration that learns them in a few dozen
//! steps, and checkpoints kept in memory.

use std::cell::RefCell;

use cosilo_rng::Rng;
use cosilo_sdk::volume::{Geometry, Volume};

use crate::data::LabelledVolume;
use crate::trainer::CheckpointSink;
use crate::{Augment, TrainConfig, UNetConfig};

/// Checkpoints in memory, for tests.
#[derive(Default)]
pub(crate) struct MemorySink(pub(crate) RefCell<Vec<(serde_json::Value, Vec<u8>)>>);

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
pub(crate) fn toy_volume(seed: u64) -> LabelledVolume {
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

/// Base 4, depth 2, three classes; 4 epochs of 6 steps of 4 slices, a checkpoint every 4 steps,
/// a quarter of each batch from slices holding the rare class.
pub(crate) fn toy_config() -> TrainConfig {
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
