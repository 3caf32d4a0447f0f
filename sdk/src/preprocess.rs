//! Intensity preprocessing shared by training (appliance) and inference (SDK).
//!
//! Hospitals store MR intensities on different scales (8-bit, 12-bit, z-scored). Both sides of a
//! bundle run exactly this code, so a model never sees intensities prepared differently from the
//! ones it was trained on. The method is named in the bundle manifest.

use serde::{Deserialize, Serialize};

/// How a volume's intensities are mapped before the network sees them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Normalisation {
    /// `clamp((x - p_lo) / (p_hi - p_lo), 0, 1)` with the volume's own percentiles.
    Percentile { low: f32, high: f32 },
    /// For brain-extracted volumes (background exactly 0, as BraTS distributes them): percentiles
    /// of the non-zero voxels only, non-zero voxels mapped to `floor + (1 - floor) · clamp((x -
    /// p_lo) / (p_hi - p_lo), 0, 1)` and background kept at 0. Works the same whether a site
    /// stores 8-bit, 12-bit or z-scored intensities (where 0 is the brain's mean, not dark), and
    /// degenerates to plain percentiles on a volume with no exact zeros.
    ForegroundPercentile { low: f32, high: f32, floor: f32 },
}

impl Default for Normalisation {
    fn default() -> Self {
        Normalisation::ForegroundPercentile {
            low: 0.5,
            high: 99.5,
            floor: 0.1,
        }
    }
}

fn scale(lo: f32, hi: f32) -> f32 {
    if hi - lo > f32::EPSILON {
        1.0 / (hi - lo)
    } else {
        0.0
    }
}

impl Normalisation {
    /// Normalises a whole volume's voxels (any order) and returns the mapped values.
    pub fn apply(&self, voxels: &[f32]) -> Vec<f32> {
        match *self {
            Normalisation::Percentile { low, high } => {
                let (lo, hi) = percentiles(voxels, low, high);
                let k = scale(lo, hi);
                voxels
                    .iter()
                    .map(|&x| ((x - lo) * k).clamp(0.0, 1.0))
                    .collect()
            }
            Normalisation::ForegroundPercentile { low, high, floor } => {
                let fg: Vec<f32> = voxels.iter().copied().filter(|&x| x != 0.0).collect();
                let (lo, hi) = percentiles(&fg, low, high);
                let k = scale(lo, hi);
                voxels
                    .iter()
                    .map(|&x| {
                        if x == 0.0 {
                            0.0
                        } else {
                            floor + (1.0 - floor) * ((x - lo) * k).clamp(0.0, 1.0)
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The `low` and `high` percentiles (0-100) of the values, by selection (no full sort).
pub fn percentiles(values: &[f32], low: f32, high: f32) -> (f32, f32) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let mut v: Vec<f32> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let rank = |p: f32| (((p / 100.0) * (v.len() - 1) as f32).round() as usize).min(v.len() - 1);
    let (rl, rh) = (rank(low), rank(high));
    let lo = *v.select_nth_unstable_by(rl, f32::total_cmp).1;
    let hi = *v.select_nth_unstable_by(rh, f32::total_cmp).1;
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreground_percentiles_ignore_background_and_storage_scale() {
        // The same brain stored as 8-bit-like, 12-bit-like and z-scored, background exactly 0.
        let brain: Vec<f32> = (0..500).map(|i| 40.0 + ((i * 37) % 200) as f32).collect();
        let mean = brain.iter().sum::<f32>() / brain.len() as f32;
        let sd =
            (brain.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / brain.len() as f32).sqrt();
        let stored = |f: &dyn Fn(f32) -> f32| -> Vec<f32> {
            let mut v: Vec<f32> = brain.iter().map(|&x| f(x)).collect();
            v.extend(std::iter::repeat_n(0.0, 700));
            v
        };
        let n = Normalisation::default();
        let a = n.apply(&stored(&|x| x));
        let b = n.apply(&stored(&|x| x * 16.0));
        let c = n.apply(&stored(&|x| (x - mean) / sd));
        for i in 0..a.len() {
            assert!(
                (a[i] - b[i]).abs() < 1e-5 && (a[i] - c[i]).abs() < 1e-4,
                "{i}: {} {} {}",
                a[i],
                b[i],
                c[i]
            );
        }
        assert!(a[500..].iter().all(|&x| x == 0.0));
        assert!(a[..500].iter().all(|&x| (0.1..=1.0).contains(&x)));
    }

    #[test]
    fn percentile_normalisation_is_scale_invariant() {
        let a: Vec<f32> = (0..1000).map(|i| ((i * 37) % 1000) as f32).collect();
        let b: Vec<f32> = a.iter().map(|x| x * 16.0 + 100.0).collect();
        let n = Normalisation::Percentile {
            low: 0.5,
            high: 99.5,
        };
        let (na, nb) = (n.apply(&a), n.apply(&b));
        for (x, y) in na.iter().zip(&nb) {
            assert!((x - y).abs() < 1e-5);
        }
        assert!(na.iter().all(|x| (0.0..=1.0).contains(x)));
        assert_eq!(percentiles(&a, 0.0, 100.0), (0.0, 999.0));
        assert_eq!(percentiles(&a, 50.0, 50.0).0, 500.0);
    }

    #[test]
    fn constant_volume_maps_to_the_floor() {
        let n = Normalisation::default();
        assert!(n.apply(&[3.0; 10]).iter().all(|&x| x == 0.1));
        assert!(n.apply(&[0.0; 10]).iter().all(|&x| x == 0.0));
    }
}
