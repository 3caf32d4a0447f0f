//! One simulated patient from a prepared subject: a random smooth deformation of the real anatomy,
//! then a random synthetic tumour with a small mass effect. The scanner look is added afterwards by
//! [`super::scanner`].
//!
//! Everything is computed as a pull-back: each output voxel at world position `p` reads the subject
//! at `D(M(p))`, where `M` is the tumour's mass effect (tissue pushed away from the tumour centre)
//! and `D` the random deformation (affine about the brain centre plus a smooth displacement
//! field). The image is read with trilinear interpolation, the labels by nearest neighbour, so the
//! output stays on the subject's grid and geometry.

use cosilo_sdk::volume::Volume;

use super::anatomy::Subject;
use super::grid::{
    apply, bounding_box, gaussian_blur, invert, nearest_index, trilinear, world_box, Affine,
};
use super::labels::{BACKGROUND, ENHANCING, GREY_MATTER, NECROTIC, OEDEMA, WHITE_MATTER};
use cosilo_rng::Rng;

/// A smooth random field: Gaussian noise on a coarse lattice, Gaussian-smoothed, scaled to unit
/// standard deviation, read back with trilinear interpolation in world millimetres.
#[derive(Debug, Clone)]
pub struct SmoothField {
    origin: [f64; 3],
    step: f64,
    dims: [usize; 3],
    values: Vec<f32>,
}

impl SmoothField {
    /// A field over the box `lo..hi` (mm) with lattice spacing `step` mm, smoothed over
    /// `smooth_cells` lattice cells.
    pub fn random(rng: &mut Rng, lo: [f64; 3], hi: [f64; 3], step: f64, smooth_cells: f64) -> Self {
        let pad = 2.0 * step;
        let origin = lo.map(|v| v - pad);
        let dims = [0, 1, 2].map(|a| ((hi[a] - lo[a] + 2.0 * pad) / step).ceil() as usize + 1);
        let mut values: Vec<f32> = (0..dims[0] * dims[1] * dims[2])
            .map(|_| rng.normal() as f32)
            .collect();
        gaussian_blur(&mut values, dims, [smooth_cells; 3]);
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let inv_sd = if var > 0.0 { 1.0 / var.sqrt() } else { 0.0 };
        values
            .iter_mut()
            .for_each(|v| *v = ((*v as f64 - mean) * inv_sd) as f32);
        SmoothField {
            origin,
            step,
            dims,
            values,
        }
    }

    /// The field at world position `p` (0 far outside its box).
    #[inline]
    pub fn at(&self, p: [f64; 3]) -> f64 {
        let x = (p[0] - self.origin[0]) / self.step;
        let y = (p[1] - self.origin[1]) / self.step;
        let z = (p[2] - self.origin[2]) / self.step;
        trilinear(&self.values, self.dims, x, y, z) as f64
    }
}

/// Rotation about x, then y, then z, by the given angles (radians).
fn rotation(ax: f64, ay: f64, az: f64) -> [[f64; 3]; 3] {
    let (sx, cx) = ax.sin_cos();
    let (sy, cy) = ay.sin_cos();
    let (sz, cz) = az.sin_cos();
    let rx = [[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]];
    let ry = [[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]];
    let rz = [[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]];
    mul3(&rz, &mul3(&ry, &rx))
}

fn mul3(a: &[[f64; 3]; 3], b: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut m = [[0.0; 3]; 3];
    for (r, row) in m.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..3).map(|t| a[r][t] * b[t][c]).sum();
        }
    }
    m
}

/// The random deformation `D`: an affine about the brain centre plus a smooth displacement field.
struct Deformation {
    affine: Affine,
    field: [SmoothField; 3],
    amplitude_mm: f64,
}

impl Deformation {
    fn random(rng: &mut Rng, centre: [f64; 3], lo: [f64; 3], hi: [f64; 3]) -> Self {
        let deg = std::f64::consts::PI / 180.0;
        let rot = rotation(
            rng.range(-6.0, 6.0) * deg,
            rng.range(-6.0, 6.0) * deg,
            rng.range(-6.0, 6.0) * deg,
        );
        let global = rng.range(0.94, 1.06);
        let scale = [0, 1, 2].map(|_| global * rng.range(0.985, 1.015));
        // q = c + R·S·(p − c): no translation, so that the deformed brain stays inside the
        // subject's grid (4 voxels of margin around the brain) in nearly every case.
        let mut affine = [[0.0; 4]; 4];
        for r in 0..3 {
            for c in 0..3 {
                affine[r][c] = rot[r][c] * scale[c];
            }
            affine[r][3] = centre[r] - (0..3).map(|c| affine[r][c] * centre[c]).sum::<f64>();
        }
        affine[3][3] = 1.0;
        let field = std::array::from_fn(|_| SmoothField::random(rng, lo, hi, 8.0, 1.5));
        let amplitude_mm = rng.range(1.0, 2.0);
        Deformation {
            affine,
            field,
            amplitude_mm,
        }
    }

    #[inline]
    fn map(&self, p: [f64; 3]) -> [f64; 3] {
        let q = apply(&self.affine, p);
        let a = self.amplitude_mm;
        [
            q[0] + a * self.field[0].at(p),
            q[1] + a * self.field[1].at(p),
            q[2] + a * self.field[2].at(p),
        ]
    }
}

/// The synthetic tumour: nested noisy ellipsoids (necrotic core ⊂ enhancing rim ⊂ oedema).
#[derive(Debug, Clone)]
pub struct Tumour {
    pub centre: [f64; 3],
    /// Rows: the ellipsoid's axes in world coordinates.
    pub axes: [[f64; 3]; 3],
    /// Oedema semi-axes (mm).
    pub radii: [f64; 3],
    /// Rim outer boundary as a fraction of the oedema radii.
    pub rim: f64,
    /// Necrotic core as a fraction of the oedema radii.
    pub core: f64,
    /// Mass effect strength (0..1) and reach (mm).
    pub mass: f64,
    pub mass_sigma: f64,
}

impl Tumour {
    /// Normalised ellipsoid radius of world point `p` (1 on the oedema boundary).
    #[inline]
    fn radius(&self, p: [f64; 3]) -> f64 {
        let d = [
            p[0] - self.centre[0],
            p[1] - self.centre[1],
            p[2] - self.centre[2],
        ];
        let mut s = 0.0;
        for a in 0..3 {
            let u = (self.axes[a][0] * d[0] + self.axes[a][1] * d[1] + self.axes[a][2] * d[2])
                / self.radii[a];
            s += u * u;
        }
        s.sqrt()
    }

    /// The mass effect `M`: points near the centre read from closer in, pushing tissue outwards.
    /// Monotone in the distance for `mass < 1`, so no tissue folds over.
    #[inline]
    fn push(&self, p: [f64; 3]) -> [f64; 3] {
        let d = [
            p[0] - self.centre[0],
            p[1] - self.centre[1],
            p[2] - self.centre[2],
        ];
        let r2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        let f = 1.0 - self.mass * (-r2 / (2.0 * self.mass_sigma * self.mass_sigma)).exp();
        [
            self.centre[0] + f * d[0],
            self.centre[1] + f * d[1],
            self.centre[2] + f * d[2],
        ]
    }
}

/// A simulated patient before the scanner: the clean image (white matter ≈ 1), labels 0..=6, and
/// the tumour drawn.
#[derive(Debug, Clone)]
pub struct CleanPatient {
    pub image: Volume<f32>,
    pub labels: Volume<u8>,
    pub tumour: Tumour,
}

/// Deforms the subject and places a tumour, drawing every random number from `rng`.
pub fn simulate(subject: &Subject, rng: &mut Rng) -> CleanPatient {
    let g = &subject.labels.geometry;
    let dims = g.dims;
    let to_index = invert(&g.affine).expect("subject grid is invertible");
    let (lo, hi) = world_box(g);
    let (blo, bhi) =
        bounding_box(dims, 0, |i| subject.labels.data[i] != BACKGROUND).unwrap_or(([0; 3], dims));
    let centre = {
        let a = g.world(blo.map(|v| v as f64));
        let b = g.world(bhi.map(|v| (v - 1) as f64));
        [0, 1, 2].map(|r| 0.5 * (a[r] + b[r]))
    };
    let deformation = Deformation::random(rng, centre, lo, hi);
    let subject_label_at = |q: [f64; 3]| {
        let s = apply(&to_index, q);
        nearest_index(dims, s[0], s[1], s[2])
            .map(|i| subject.labels.data[i])
            .unwrap_or(BACKGROUND)
    };

    // Tumour centre: a random voxel that the deformation maps into white matter (gliomas grow in
    // white matter); any brain voxel if white matter is never hit.
    let mut centre_t = None;
    for attempt in 0..4000 {
        let ijk = [
            rng.below(dims[0]) as f64,
            rng.below(dims[1]) as f64,
            rng.below(dims[2]) as f64,
        ];
        let p = g.world(ijk);
        let l = subject_label_at(deformation.map(p));
        if l == WHITE_MATTER || (attempt >= 3000 && l != BACKGROUND) {
            centre_t = Some(p);
            break;
        }
    }
    let centre_t = centre_t.unwrap_or(centre);
    let axes = rotation(
        rng.range(0.0, std::f64::consts::TAU),
        rng.range(0.0, std::f64::consts::TAU),
        rng.range(0.0, std::f64::consts::TAU),
    );
    // Rows of R^T are the ellipsoid's axes.
    let axes = [0, 1, 2].map(|a| [axes[0][a], axes[1][a], axes[2][a]]);
    let radii = [
        rng.range(16.0, 30.0),
        rng.range(14.0, 26.0),
        rng.range(12.0, 22.0),
    ];
    // Proportions roughly as in glioblastomas: most of the volume oedema, the rest enhancing rim
    // around a necrotic core.
    let rim = rng.range(0.55, 0.72);
    let core = rim * rng.range(0.55, 0.72);
    let mean_r = (radii[0] + radii[1] + radii[2]) / 3.0;
    let tumour = Tumour {
        centre: centre_t,
        axes,
        radii,
        rim,
        core,
        mass: rng.range(0.15, 0.35),
        mass_sigma: rim * mean_r * 1.2,
    };
    // Ragged edges and texture.
    let tlo = centre_t.map(|c| c - 1.6 * mean_r.max(radii[0]));
    let thi = centre_t.map(|c| c + 1.6 * mean_r.max(radii[0]));
    let edge_oedema = SmoothField::random(rng, tlo, thi, 5.0, 1.0);
    let edge_mass = SmoothField::random(rng, tlo, thi, 4.0, 1.0);
    let texture = SmoothField::random(rng, tlo, thi, 3.0, 0.8);
    let oedema_factor = rng.range(0.72, 0.85) as f32;
    let rim_level = rng.range(1.3, 1.5) as f32;
    let necrosis_level = rng.range(0.22, 0.38) as f32;
    let edge_amp = 0.12;

    let n = g.len();
    let mut image = vec![0.0f32; n];
    let mut labels = vec![BACKGROUND; n];
    let sdims = subject.image.geometry.dims;
    let [nx, ny, nz] = dims;
    let mut idx = 0;
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let p = g.world([i as f64, j as f64, k as f64]);
                let q = deformation.map(tumour.push(p));
                let s = apply(&to_index, q);
                let tissue = nearest_index(sdims, s[0], s[1], s[2])
                    .map(|o| subject.labels.data[o])
                    .unwrap_or(BACKGROUND);
                if tissue != BACKGROUND {
                    let mut value = trilinear(&subject.image.data, sdims, s[0], s[1], s[2]);
                    let mut label = tissue;
                    let r = tumour.radius(p);
                    if r < 1.6 {
                        let rm = r + edge_amp * edge_mass.at(p);
                        let ro = r + edge_amp * edge_oedema.at(p);
                        let tex = 1.0 + 0.08 * texture.at(p) as f32;
                        if rm < tumour.core {
                            label = NECROTIC;
                            value = necrosis_level * tex;
                        } else if rm < tumour.rim {
                            label = ENHANCING;
                            value = rim_level * tex;
                        } else if ro < 1.0 && (tissue == GREY_MATTER || tissue == WHITE_MATTER) {
                            label = OEDEMA;
                            value *= oedema_factor * tex;
                        }
                    }
                    image[idx] = value.max(0.0);
                    labels[idx] = label;
                }
                idx += 1;
            }
        }
    }
    CleanPatient {
        image: Volume {
            geometry: g.clone(),
            data: image,
        },
        labels: Volume {
            geometry: g.clone(),
            data: labels,
        },
        tumour,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cohort::labels::CSF;
    use cosilo_sdk::volume::Geometry;

    /// A synthetic "brain": a ball on a 2 mm grid with a CSF shell, a GM shell and a WM core.
    pub(crate) fn ball_subject() -> Subject {
        let g = Geometry::axis_aligned([48, 52, 44], [2.0, 2.0, 2.0], [-47.0, -51.0, -43.0]);
        let mut image = Vec::with_capacity(g.len());
        let mut labels = Vec::with_capacity(g.len());
        for k in 0..g.dims[2] {
            for j in 0..g.dims[1] {
                for i in 0..g.dims[0] {
                    let w = g.world([i as f64, j as f64, k as f64]);
                    let r = (w[0] * w[0] / 1.1 + w[1] * w[1] / 1.2 + w[2] * w[2]).sqrt();
                    let (l, v) = if r < 22.0 {
                        (WHITE_MATTER, 1.0)
                    } else if r < 32.0 {
                        (GREY_MATTER, 0.7)
                    } else if r < 37.0 {
                        (CSF, 0.3)
                    } else {
                        (BACKGROUND, 0.0)
                    };
                    labels.push(l);
                    image.push(v);
                }
            }
        }
        Subject {
            kind: super::super::anatomy::SubjectKind::Colin27,
            image: Volume::new(g.clone(), image).unwrap(),
            labels: Volume::new(g, labels).unwrap(),
        }
    }

    #[test]
    fn tumour_case_has_every_label_and_the_subject_grid() {
        let s = ball_subject();
        for seed in 0..3 {
            let p = simulate(&s, &mut Rng::derive(11, seed));
            assert_eq!(p.image.geometry, s.image.geometry);
            assert_eq!(p.labels.geometry, s.labels.geometry);
            let mut counts = [0usize; 7];
            for &l in &p.labels.data {
                counts[l as usize] += 1;
            }
            assert!(counts.iter().all(|&c| c > 0), "seed {seed}: {counts:?}");
            // Brain-extracted: nothing outside the brain.
            assert!(p
                .image
                .data
                .iter()
                .zip(&p.labels.data)
                .all(|(&v, &l)| l != BACKGROUND || v == 0.0));
        }
    }

    #[test]
    fn same_stream_same_patient() {
        let s = ball_subject();
        let a = simulate(&s, &mut Rng::derive(5, 1));
        let b = simulate(&s, &mut Rng::derive(5, 1));
        let c = simulate(&s, &mut Rng::derive(5, 2));
        assert_eq!(a.image.data, b.image.data);
        assert_eq!(a.labels.data, b.labels.data);
        assert_ne!(a.image.data, c.image.data);
    }
}
