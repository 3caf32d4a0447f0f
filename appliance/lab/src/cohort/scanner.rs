//! A hospital's scanner look, applied to a clean simulated patient: contrast curve, smooth
//! multiplicative bias field, blur, Rician noise, brain extraction and the site's intensity
//! normalisation. Each hospital has a fixed profile; every patient draws small variations of it.

use serde::{Deserialize, Serialize};

use super::anatomy::percentile;
use super::grid::{gaussian_blur, world_box};
use super::labels::BACKGROUND;
use super::patient::{CleanPatient, SmoothField};
use cosilo_rng::Rng;

/// How a site stores intensities.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Normalisation {
    /// Scaled so the brain's 99.5th percentile lands near `reference`, clipped to 0..=`max` and
    /// rounded to integers (an 8-bit or 12-bit export).
    IntegerRange { max: f32, reference: f32 },
    /// z-scored over the brain (mean 0, standard deviation 1), background left at 0.
    ZScore,
}

/// A site's scanner. Per patient, gamma varies by ±5 %, bias amplitude by ±30 %, SNR by ±15 %.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScannerProfile {
    /// Contrast curve exponent applied to the clean image (white matter = 1).
    pub gamma: f64,
    /// Typical amplitude of the log bias field (0.15 ≈ ±15 % shading, at most twice that).
    pub bias_amplitude: f64,
    /// Gaussian blur (mm, standard deviation), i.e. the scanner's resolution.
    pub blur_sigma_mm: f64,
    /// White-matter signal over noise standard deviation.
    pub snr: f64,
    pub normalisation: Normalisation,
}

/// The parameters one patient's scan actually used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScanDraw {
    pub gamma: f64,
    pub bias_amplitude: f64,
    pub snr: f64,
}

/// Applies the scanner to a clean patient; returns the final image (0 outside the brain).
pub fn acquire(
    patient: &CleanPatient,
    profile: &ScannerProfile,
    rng: &mut Rng,
) -> (Vec<f32>, ScanDraw) {
    let g = &patient.image.geometry;
    let labels = &patient.labels.data;
    let draw = ScanDraw {
        gamma: profile.gamma * rng.range(0.95, 1.05),
        bias_amplitude: profile.bias_amplitude * rng.range(0.7, 1.3),
        snr: profile.snr * rng.range(0.85, 1.15),
    };
    // Contrast curve.
    let gamma = draw.gamma as f32;
    let mut img: Vec<f32> = patient
        .image
        .data
        .iter()
        .map(|&v| v.max(0.0).powf(gamma))
        .collect();
    // Smooth multiplicative bias field: a coarse random field (~60 mm lattice) of unit standard
    // deviation, so the log shading is typically ±amplitude and at most ±2·amplitude.
    let (lo, hi) = world_box(g);
    let bias = SmoothField::random(rng, lo, hi, 60.0, 0.7);
    let amp = draw.bias_amplitude;
    let [nx, ny, nz] = g.dims;
    let mut idx = 0;
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                if labels[idx] != BACKGROUND {
                    let p = g.world([i as f64, j as f64, k as f64]);
                    let b = (amp * bias.at(p).clamp(-2.0, 2.0)).exp() as f32;
                    img[idx] *= b;
                }
                idx += 1;
            }
        }
    }
    // Resolution.
    let sp = g.spacing();
    gaussian_blur(
        &mut img,
        g.dims,
        [0, 1, 2].map(|a| profile.blur_sigma_mm / sp[a]),
    );
    // Rician noise (magnitude of a complex signal with Gaussian noise on both channels), then
    // brain extraction as a site pipeline would do after acquisition.
    let sigma = 1.0 / draw.snr;
    for (v, &l) in img.iter_mut().zip(labels) {
        if l == BACKGROUND {
            *v = 0.0;
        } else {
            let re = *v as f64 + sigma * rng.normal();
            let im = sigma * rng.normal();
            *v = (re * re + im * im).sqrt() as f32;
        }
    }
    normalise(&mut img, labels, profile.normalisation);
    (img, draw)
}

fn normalise(img: &mut [f32], labels: &[u8], how: Normalisation) {
    let brain: Vec<f32> = img
        .iter()
        .zip(labels)
        .filter(|(_, &l)| l != BACKGROUND)
        .map(|(&v, _)| v)
        .collect();
    match how {
        Normalisation::IntegerRange { max, reference } => {
            let p = percentile(&brain, 0.995).max(1e-6);
            let s = reference / p;
            for (v, &l) in img.iter_mut().zip(labels) {
                *v = if l == BACKGROUND {
                    0.0
                } else {
                    (*v * s).round().clamp(0.0, max)
                };
            }
        }
        Normalisation::ZScore => {
            let n = brain.len().max(1) as f64;
            let mean = brain.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = brain
                .iter()
                .map(|&v| (v as f64 - mean).powi(2))
                .sum::<f64>()
                / n;
            let sd = var.sqrt().max(1e-6);
            for (v, &l) in img.iter_mut().zip(labels) {
                *v = if l == BACKGROUND {
                    0.0
                } else {
                    ((*v as f64 - mean) / sd) as f32
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cohort::labels::{CSF, GREY_MATTER, WHITE_MATTER};
    use crate::cohort::patient::{simulate, tests::ball_subject};

    fn mean_of(img: &[f32], labels: &[u8], l: u8) -> f64 {
        let v: Vec<f64> = img
            .iter()
            .zip(labels)
            .filter(|(_, &x)| x == l)
            .map(|(&v, _)| v as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn tissue_order_survives_every_site_and_background_is_zero() {
        let s = ball_subject();
        let p = simulate(&s, &mut Rng::derive(3, 0));
        for profile in super::super::HOSPITALS.map(|h| h.scanner) {
            let (img, _) = acquire(&p, &profile, &mut Rng::derive(3, 1));
            let l = &p.labels.data;
            let (c, g, w) = (
                mean_of(&img, l, CSF),
                mean_of(&img, l, GREY_MATTER),
                mean_of(&img, l, WHITE_MATTER),
            );
            assert!(c < g && g < w, "{profile:?}: {c} {g} {w}");
            assert!(img
                .iter()
                .zip(l)
                .all(|(&v, &x)| x != BACKGROUND || v == 0.0));
            if let Normalisation::IntegerRange { max, .. } = profile.normalisation {
                assert!(img
                    .iter()
                    .all(|&v| v >= 0.0 && v <= max && v.fract() == 0.0));
            }
        }
    }
}
