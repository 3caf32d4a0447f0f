//! Whole-volume prediction and 3-D Dice.
//!
//! Dice is computed per class over the whole volume (not averaged over slices), which is what a
//! radiologist's volume measurement depends on.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::data::PreparedVolume;
use super::unet::UNet;

/// Predicts the class of every voxel of a prepared volume, slice by slice in batches of `batch`.
/// Slices are zero-padded (centred) to the network's multiple and cropped back.
pub fn predict(
    net: &UNet,
    v: &PreparedVolume,
    device: &Device,
    batch: usize,
) -> candle_core::Result<Vec<u8>> {
    let m = net.config().multiple();
    let h = v.ny.div_ceil(m) * m;
    let w = v.nx.div_ceil(m) * m;
    let (py, px) = ((h - v.ny) / 2, (w - v.nx) / 2);
    let mut out = vec![0u8; v.nx * v.ny * v.nz];
    let mut k0 = 0;
    while k0 < v.nz {
        let n = batch.min(v.nz - k0);
        let mut input = vec![0f32; n * h * w];
        for s in 0..n {
            let img = v.slice_image(k0 + s);
            for y in 0..v.ny {
                let dst = s * h * w + (y + py) * w + px;
                input[dst..dst + v.nx].copy_from_slice(&img[y * v.nx..(y + 1) * v.nx]);
            }
        }
        let x = Tensor::from_vec(input, (n, 1, h, w), device)?;
        let classes = net
            .forward(&x)?
            .argmax(1)?
            .to_dtype(candle_core::DType::U8)?;
        let classes: Vec<u8> = classes.flatten_all()?.to_vec1()?;
        for s in 0..n {
            let slice = &mut out[(k0 + s) * v.nx * v.ny..(k0 + s + 1) * v.nx * v.ny];
            for y in 0..v.ny {
                let src = s * h * w + (y + py) * w + px;
                slice[y * v.nx..(y + 1) * v.nx].copy_from_slice(&classes[src..src + v.nx]);
            }
        }
        k0 += n;
    }
    Ok(out)
}

/// Dice of one class between a prediction and the truth; `None` when the class is absent from both.
pub fn dice(pred: &[u8], truth: &[u8], class: u8) -> Option<f64> {
    let (mut inter, mut p, mut t) = (0u64, 0u64, 0u64);
    for (&a, &b) in pred.iter().zip(truth) {
        let (x, y) = (a == class, b == class);
        inter += (x && y) as u64;
        p += x as u64;
        t += y as u64;
    }
    if p + t == 0 {
        None
    } else {
        Some(2.0 * inter as f64 / (p + t) as f64)
    }
}

/// Per-class 3-D Dice of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseScore {
    pub case: String,
    /// Dice per class, background first; `None` where the class is in neither volume.
    pub dice: Vec<Option<f64>>,
}

impl CaseScore {
    /// Mean Dice over the given classes that are scored for this case.
    pub fn mean_over(&self, classes: &[usize]) -> Option<f64> {
        let v: Vec<f64> = classes
            .iter()
            .filter_map(|&c| self.dice.get(c).copied().flatten())
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }
}

/// Scores a prepared volume: predicts it and computes Dice for every class.
pub fn score(net: &UNet, v: &PreparedVolume, device: &Device) -> candle_core::Result<CaseScore> {
    let pred = predict(net, v, device, 16)?;
    let classes = net.config().classes;
    Ok(CaseScore {
        case: v.id.clone(),
        dice: (0..classes as u8)
            .map(|c| dice(&pred, &v.classes, c))
            .collect(),
    })
}

/// Mean of each class's Dice over cases (cases where the class is unscored are left out).
pub fn mean_per_class(scores: &[CaseScore], classes: usize) -> Vec<Option<f64>> {
    (0..classes)
        .map(|c| {
            let v: Vec<f64> = scores
                .iter()
                .filter_map(|s| s.dice.get(c).copied().flatten())
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_counts() {
        let truth = [0, 1, 1, 2, 2, 2];
        let pred = [0, 1, 2, 2, 2, 0];
        assert_eq!(dice(&pred, &truth, 1), Some(2.0 / 3.0));
        assert_eq!(dice(&pred, &truth, 2), Some(2.0 * 2.0 / 6.0));
        assert_eq!(dice(&pred, &truth, 3), None);
        let s = CaseScore {
            case: "c".into(),
            dice: vec![Some(1.0), Some(0.5), None, Some(0.7)],
        };
        assert!((s.mean_over(&[1, 2, 3]).unwrap() - 0.6).abs() < 1e-12);
        let m = mean_per_class(&[s.clone(), s], 4);
        assert_eq!(m[2], None);
        assert_eq!(m[1], Some(0.5));
    }
}
