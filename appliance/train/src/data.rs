//! From labelled volumes to training batches of axial slices.
//!
//! Every volume is normalised once with the SDK's [`Normalisation`] (the same code runs at
//! inference), its labels mapped to training classes, and its axial slices indexed. A batch is a
//! set of random crops (zero-padded where a slice is smaller than the patch) with light
//! augmentation: left-right flip, intensity scale and shift, and a small gamma change.

use cosilo_sdk::preprocess::Normalisation;
use cosilo_sdk::volume::Volume;

use cosilo_rng::Rng;

/// A labelled volume ready for training or evaluation.
#[derive(Debug, Clone)]
pub struct LabelledVolume {
    pub id: String,
    pub image: Volume<f32>,
    pub label: Volume<u8>,
}

/// A volume after normalisation and class mapping, its slices row-major (`ny` rows × `nx` columns).
#[derive(Debug, Clone)]
pub struct PreparedVolume {
    pub id: String,
    pub nx: usize,
    pub ny: usize,
    pub nz: usize,
    pub image: Vec<f32>,
    pub classes: Vec<u8>,
}

impl PreparedVolume {
    /// Normalises the image and maps labels through `label_map` (label value → class; values past
    /// the end of the map become background).
    pub fn new(v: &LabelledVolume, norm: &Normalisation, label_map: &[u8]) -> Self {
        let [nx, ny, nz] = v.image.geometry.dims;
        PreparedVolume {
            id: v.id.clone(),
            nx,
            ny,
            nz,
            image: norm.apply(&v.image.data),
            classes: v
                .label
                .data
                .iter()
                .map(|&l| label_map.get(l as usize).copied().unwrap_or(0))
                .collect(),
        }
    }

    pub fn slice_image(&self, k: usize) -> &[f32] {
        &self.image[k * self.nx * self.ny..(k + 1) * self.nx * self.ny]
    }

    pub fn slice_classes(&self, k: usize) -> &[u8] {
        &self.classes[k * self.nx * self.ny..(k + 1) * self.nx * self.ny]
    }
}

/// Augmentation switches.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    pub flip: bool,
    /// Maximum relative intensity scale change (0.1 = ×0.9..×1.1).
    pub intensity: f32,
    /// Maximum gamma exponent change (0.2 = γ ∈ 0.8..1.2).
    pub gamma: f32,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            flip: true,
            intensity: 0.1,
            gamma: 0.2,
        }
    }
}

/// A batch in network layout: images `(b, 1, h, w)` and class maps `(b, h, w)`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub image: Vec<f32>,
    pub classes: Vec<u8>,
}

/// The training slices of a set of volumes.
pub struct SliceSet {
    pub volumes: Vec<PreparedVolume>,
    /// (volume, k) of every slice that contains foreground.
    pub slices: Vec<(usize, usize)>,
    /// Indices into `slices` of the slices that contain a rare class (see [`SliceSet::mark_rare`]).
    pub rare: Vec<usize>,
}

impl SliceSet {
    /// Indexes every axial slice that has any non-background class.
    pub fn new(volumes: Vec<PreparedVolume>) -> Self {
        let mut slices = Vec::new();
        for (vi, v) in volumes.iter().enumerate() {
            for k in 0..v.nz {
                if v.slice_classes(k).iter().any(|&c| c != 0) {
                    slices.push((vi, k));
                }
            }
        }
        SliceSet {
            volumes,
            slices,
            rare: Vec::new(),
        }
    }

    /// Marks the slices holding any foreground class that makes up less than `share` of the
    /// labelled (non-background) voxels: small structures such as tumours, which a batch drawn
    /// uniformly shows the network too rarely. Returns the rare classes.
    pub fn mark_rare(&mut self, classes: usize, share: f64) -> Vec<u8> {
        let mut counts = vec![0u64; classes];
        for v in &self.volumes {
            for &c in &v.classes {
                if (c as usize) < classes {
                    counts[c as usize] += 1;
                }
            }
        }
        let fg: u64 = counts[1..].iter().sum();
        let rare: Vec<u8> = (1..classes)
            .filter(|&c| counts[c] > 0 && (counts[c] as f64) < share * fg as f64)
            .map(|c| c as u8)
            .collect();
        self.rare = self
            .slices
            .iter()
            .enumerate()
            .filter(|(_, &(vi, k))| {
                self.volumes[vi]
                    .slice_classes(k)
                    .iter()
                    .any(|c| rare.contains(c))
            })
            .map(|(i, _)| i)
            .collect();
        rare
    }

    pub fn len(&self) -> usize {
        self.slices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slices.is_empty()
    }

    /// Cuts the batch of slices `order` as random `h × w` crops with augmentation from `rng`.
    pub fn batch(
        &self,
        order: &[usize],
        h: usize,
        w: usize,
        aug: &Augment,
        rng: &mut Rng,
    ) -> Batch {
        let b = order.len();
        let mut image = vec![0f32; b * h * w];
        let mut classes = vec![0u8; b * h * w];
        for (n, &si) in order.iter().enumerate() {
            let (vi, k) = self.slices[si];
            let v = &self.volumes[vi];
            let (img, cls) = (v.slice_image(k), v.slice_classes(k));
            // Crop origin in the slice; negative means the slice is padded on that side.
            let oy = crop_origin(v.ny, h, rng);
            let ox = crop_origin(v.nx, w, rng);
            let flip = aug.flip && rng.uniform() < 0.5;
            let scale = 1.0 + aug.intensity * (2.0 * rng.uniform() as f32 - 1.0);
            let shift = 0.5 * aug.intensity * (2.0 * rng.uniform() as f32 - 1.0);
            let gamma = 1.0 + aug.gamma * (2.0 * rng.uniform() as f32 - 1.0);
            let out_img = &mut image[n * h * w..(n + 1) * h * w];
            let out_cls = &mut classes[n * h * w..(n + 1) * h * w];
            for y in 0..h {
                let sy = oy + y as isize;
                if sy < 0 || sy >= v.ny as isize {
                    continue;
                }
                for x in 0..w {
                    let xx = if flip { w - 1 - x } else { x };
                    let sx = ox + xx as isize;
                    if sx < 0 || sx >= v.nx as isize {
                        continue;
                    }
                    let src = sy as usize * v.nx + sx as usize;
                    let val = img[src];
                    out_img[y * w + x] = if val > 0.0 {
                        val.powf(gamma) * scale + shift
                    } else {
                        0.0
                    };
                    out_cls[y * w + x] = cls[src];
                }
            }
        }
        Batch {
            b,
            h,
            w,
            image,
            classes,
        }
    }
}

/// Where a crop of `patch` starts in a side of `len`: random inside when the side is longer, and
/// centred (negative = padding) when it is shorter.
fn crop_origin(len: usize, patch: usize, rng: &mut Rng) -> isize {
    if len >= patch {
        rng.below(len - patch + 1) as isize
    } else {
        -(((patch - len) / 2) as isize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosilo_sdk::volume::Geometry;

    fn toy() -> LabelledVolume {
        let g = Geometry::axis_aligned([6, 5, 3], [1.0; 3], [0.0; 3]);
        let image = Volume::new(g.clone(), (0..90).map(|i| i as f32).collect()).unwrap();
        let mut label = Volume::filled(g, 0u8);
        // Slice 1 is CSF (label 1) but for one tumour voxel (label 6 → class 4): tumour is 1/30 of
        // the labelled voxels, a rare class.
        label.data[30..60].fill(1);
        label.data[30 + 7] = 6;
        LabelledVolume {
            id: "t".into(),
            image,
            label,
        }
    }

    #[test]
    fn prepares_indexes_and_crops_without_augmentation() {
        let p = PreparedVolume::new(&toy(), &Normalisation::default(), &[0, 1, 2, 3, 4, 4, 4]);
        assert_eq!(p.classes[37], 4);
        let mut set = SliceSet::new(vec![p]);
        assert_eq!(set.slices, vec![(0, 1)]);
        // The only foreground voxel is class 4, so it is rare below any share and its slice marked.
        assert_eq!(set.mark_rare(5, 0.05), vec![4]);
        assert_eq!(set.rare, vec![0]);
        let none = Augment {
            flip: false,
            intensity: 0.0,
            gamma: 0.0,
        };
        let mut rng = Rng::new(1);
        // A patch larger than the slice: centred with zero padding, the labelled voxel kept.
        let b = set.batch(&[0], 8, 8, &none, &mut rng);
        assert_eq!((b.b, b.h, b.w), (1, 8, 8));
        assert_eq!(b.classes.iter().filter(|&&c| c == 4).count(), 1);
        // Slice voxel (x=1, y=1) lands at (1+1, 1+1) after padding by 1 on each side.
        assert_eq!(b.classes[2 * 8 + 2], 4);
        let v = &set.volumes[0];
        assert_eq!(b.image[2 * 8 + 2], v.slice_image(1)[7]);
    }
}
