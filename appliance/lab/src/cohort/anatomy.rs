//! The three real subjects, each prepared once: read, given tissue labels, brain-extracted,
//! resampled to the hospital's coarse grid and cropped to the brain.
//!
//! Every subject goes through the same steps ([`prepare`]): tissue "soft maps" (background, CSF,
//! GM, WM) on the source grid are Gaussian pre-filtered when the grid gets coarser, resampled
//! trilinearly through world coordinates and turned into labels by argmax, so labels at 2 mm are a
//! partial-volume majority rather than an aliased pick. The image is resampled the same way,
//! zeroed outside the brain, scaled so that white matter is 1, and both are cropped to the brain's
//! bounding box plus [`CROP_MARGIN`] voxels. The new grid's voxel axes run along R, A and S, so an
//! axial slice of every hospital's volume is a true axial slice.

use cosilo_sdk::volume::{read_nifti, Geometry, Volume};

use super::grid::{
    bounding_box, close, crop_or_pad, fill_holes, gaussian_blur, largest_component,
    ras_grid_covering, resample_linear, spacing_along_world_axes, world_axis_of,
};
use super::labels::{BACKGROUND, CSF, GREY_MATTER, WHITE_MATTER};
use super::CohortError;
use crate::fetch::AnatomyFiles;

/// Voxels kept around the brain's bounding box. Six (12 mm at 2 mm) rather than four: with the
/// patients' ±6° rotations and ±6 % scaling the brain's corners move up to ~10 mm, and four voxels
/// let the cortex touch the grid's edge in about one case in eight. In-plane sizes stay ≤ 85×103.
pub const CROP_MARGIN: usize = 6;

/// Which real subject a hospital starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectKind {
    /// Colin27 (mricron-data).
    Colin27,
    /// MNI ICBM152 2009a (nilearn).
    Mni152,
    /// The ITK example subject.
    ItkT1,
}

impl SubjectKind {
    /// Short name for the manifest.
    pub fn name(self) -> &'static str {
        match self {
            SubjectKind::Colin27 => "Colin27",
            SubjectKind::Mni152 => "MNI152-2009a",
            SubjectKind::ItkT1 => "ITK-KmeansTest-T1",
        }
    }

    /// A plain description for the manifest.
    pub fn description(self) -> &'static str {
        match self {
            SubjectKind::Colin27 => {
                "Colin27: one adult scanned 27 times and averaged (Debian mricron-data ch2/ch2bet); \
                 tissue labels by 3-class k-means of the T1 inside ch2bet > 0"
            }
            SubjectKind::Mni152 => {
                "MNI ICBM152 2009a symmetric T1: an average of 152 adults (nilearn 0.14.1 wheel); \
                 tissue labels by argmax of (CSF = 1 - GM - WM, GM, WM) inside the closed, \
                 hole-filled mask GM + WM > 0.1"
            }
            SubjectKind::ItkT1 => {
                "one adult's T1 from the ITK examples (Debian insighttoolkit5-examples, \
                 KmeansTest); tissue labels from its 6-class k-means segmentation \
                 (classes 0 and 4 = CSF, 5 = GM, 6 = WM)"
            }
        }
    }

    /// The source files, as named in the cache.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            SubjectKind::Colin27 => &["mricron-data/ch2.nii.gz", "mricron-data/ch2bet.nii.gz"],
            SubjectKind::Mni152 => &[
                "nilearn/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
                "nilearn/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
                "nilearn/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
            ],
            SubjectKind::ItkT1 => &[
                "insighttoolkit5-examples/KmeansTest_T1UCharRaw.nii.gz",
                "insighttoolkit5-examples/KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
            ],
        }
    }
}

/// A prepared subject: the clean, brain-extracted T1 (white matter ≈ 1, 0 outside the brain) and
/// its tissue labels (0..=3) on the hospital's cropped grid.
#[derive(Debug, Clone)]
pub struct Subject {
    pub kind: SubjectKind,
    pub image: Volume<f32>,
    pub labels: Volume<u8>,
}

impl Subject {
    /// Reads and prepares a subject from the fetched files at the given grid spacing in mm along
    /// R, A, S (`None`: the source's own spacing, a lossless reorientation).
    pub fn load(
        kind: SubjectKind,
        files: &AnatomyFiles,
        spacing: Option<[f64; 3]>,
    ) -> Result<Subject, CohortError> {
        let read = |p: &std::path::Path| {
            read_nifti(p).map_err(|source| CohortError::ReadVolume {
                path: p.display().to_string(),
                source,
            })
        };
        let (image, maps) = match kind {
            SubjectKind::Colin27 => {
                let t1 = read(&files.colin_t1)?;
                let bet = read(&files.colin_brain)?;
                same_grid(kind, &t1, &bet)?;
                colin27_maps(t1, &bet)
            }
            SubjectKind::Mni152 => {
                let t1 = read(&files.mni_t1)?;
                let gm = read(&files.mni_gm)?;
                let wm = read(&files.mni_wm)?;
                same_grid(kind, &t1, &gm)?;
                same_grid(kind, &t1, &wm)?;
                mni152_maps(t1, &gm, &wm)
            }
            SubjectKind::ItkT1 => {
                let t1 = read(&files.itk_t1)?;
                let seg = read(&files.itk_seg)?;
                same_grid(kind, &t1, &seg)?;
                itk_maps(t1, &seg)
            }
        };
        prepare(kind, image, maps, spacing)
    }
}

fn same_grid(kind: SubjectKind, a: &Volume<f32>, b: &Volume<f32>) -> Result<(), CohortError> {
    if a.geometry.same_grid(&b.geometry, 1e-3) {
        Ok(())
    } else {
        Err(CohortError::Anatomy {
            subject: kind.name(),
            detail: format!(
                "image and mask/label grids differ: {:?} vs {:?}",
                a.geometry, b.geometry
            ),
        })
    }
}

/// Soft tissue maps on the source grid, in label order: background, CSF, GM, WM.
type Maps = [Vec<f32>; 4];

fn one_hot(labels: &[u8]) -> Maps {
    let mut maps: Maps = std::array::from_fn(|_| vec![0.0f32; labels.len()]);
    for (i, &l) in labels.iter().enumerate() {
        maps[l as usize][i] = 1.0;
    }
    maps
}

/// Colin27: brain = the largest component of `ch2bet > 0` with its holes filled; tissue by 1-D
/// k-means (3 classes, initialised at fixed percentiles) of the T1 intensities inside it.
fn colin27_maps(t1: Volume<f32>, bet: &Volume<f32>) -> (Volume<f32>, Maps) {
    let dims = t1.geometry.dims;
    let mask: Vec<bool> = bet.data.iter().map(|&v| v > 0.0).collect();
    let mask = fill_holes(&largest_component(&mask, dims), dims);
    let values: Vec<f32> = t1
        .data
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v)
        .collect();
    let centres = kmeans_1d(&values, 3);
    let labels: Vec<u8> = t1
        .data
        .iter()
        .zip(&mask)
        .map(|(&v, &m)| {
            if !m {
                return BACKGROUND;
            }
            let c = (0..3)
                .min_by(|&a, &b| (v - centres[a]).abs().total_cmp(&(v - centres[b]).abs()))
                .unwrap_or(0);
            CSF + c as u8
        })
        .collect();
    let image = brain_extract(t1, &mask);
    (image, one_hot(&labels))
}

/// Deterministic 1-D k-means (initialised at evenly spread percentiles between the 10th and the
/// 90th); centres returned in increasing order.
pub fn kmeans_1d(values: &[f32], k: usize) -> Vec<f32> {
    if values.is_empty() {
        return vec![0.0; k];
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f32::total_cmp);
    let mut centres: Vec<f64> = (0..k)
        .map(|c| {
            let q = (c as f64 + 0.5) / k as f64 * 0.8 + 0.1;
            sorted[((sorted.len() - 1) as f64 * q) as usize] as f64
        })
        .collect();
    for _ in 0..200 {
        // The values are sorted: each cluster is a contiguous run between centre midpoints.
        let mut sums = vec![0.0f64; k];
        let mut counts = vec![0usize; k];
        let mut c = 0;
        for &v in &sorted {
            let v = v as f64;
            while c + 1 < k && v > 0.5 * (centres[c] + centres[c + 1]) {
                c += 1;
            }
            sums[c] += v;
            counts[c] += 1;
        }
        let next: Vec<f64> = (0..k)
            .map(|c| {
                if counts[c] > 0 {
                    sums[c] / counts[c] as f64
                } else {
                    centres[c]
                }
            })
            .collect();
        let moved = next
            .iter()
            .zip(&centres)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        centres = next;
        if moved < 1e-6 {
            break;
        }
    }
    centres.iter().map(|&c| c as f32).collect()
}

/// MNI152: brain = `gm + wm > 0.1`, closed (cube of half-width 2 mm), holes (ventricles) filled,
/// largest component; CSF = 1 − GM − WM inside it.
fn mni152_maps(t1: Volume<f32>, gm: &Volume<f32>, wm: &Volume<f32>) -> (Volume<f32>, Maps) {
    let dims = t1.geometry.dims;
    // The probability maps are stored as 0..255 in the wheel.
    let scale = |v: &Volume<f32>| {
        let max = v.data.iter().copied().fold(0.0f32, f32::max);
        if max > 1.5 {
            1.0 / 255.0
        } else {
            1.0
        }
    };
    let (sg, sw) = (scale(gm), scale(wm));
    let raw: Vec<bool> = gm
        .data
        .iter()
        .zip(&wm.data)
        .map(|(&g, &w)| g * sg + w * sw > 0.1)
        .collect();
    let mask = largest_component(&fill_holes(&close(&raw, dims, 2), dims), dims);
    let n = mask.len();
    let mut maps: Maps = std::array::from_fn(|_| vec![0.0f32; n]);
    for i in 0..n {
        if mask[i] {
            let g = (gm.data[i] * sg).clamp(0.0, 1.0);
            let w = (wm.data[i] * sw).clamp(0.0, 1.0);
            maps[1][i] = (1.0 - g - w).max(0.0);
            maps[2][i] = g;
            maps[3][i] = w;
        } else {
            maps[0][i] = 1.0;
        }
    }
    (brain_extract(t1, &mask), maps)
}

/// The ITK example's 6-class k-means segmentation, checked against its T1 (voxel count, mean
/// intensity and extent of each class): 1 is air (729 k voxels, mean 1); 2 and 3 are scalp,
/// skull, fat and neck (they surround the brain and reach the bottom of the field of view, means
/// 43 and 80); 4, 5 and 6 lie only inside the skull with increasing means 48 < 76 < 101, the order
/// of CSF, grey and white matter in a T1. Class 0 is 126 voxels inside the brain with a CSF-like
/// mean (45), so it joins CSF.
fn itk_maps(t1: Volume<f32>, seg: &Volume<f32>) -> (Volume<f32>, Maps) {
    let dims = t1.geometry.dims;
    let labels: Vec<u8> = seg
        .data
        .iter()
        .map(|&c| match c.round() as i32 {
            0 | 4 => CSF,
            5 => GREY_MATTER,
            6 => WHITE_MATTER,
            _ => BACKGROUND,
        })
        .collect();
    let mask: Vec<bool> = labels.iter().map(|&l| l != BACKGROUND).collect();
    let mask = largest_component(&mask, dims);
    let labels: Vec<u8> = labels
        .iter()
        .zip(&mask)
        .map(|(&l, &m)| if m { l } else { BACKGROUND })
        .collect();
    (brain_extract(t1, &mask), one_hot(&labels))
}

fn brain_extract(mut t1: Volume<f32>, mask: &[bool]) -> Volume<f32> {
    for (v, &m) in t1.data.iter_mut().zip(mask) {
        if !m {
            *v = 0.0;
        }
    }
    t1
}

/// Resamples image and tissue maps to the hospital grid, labels by argmax, crops to the brain.
fn prepare(
    kind: SubjectKind,
    image: Volume<f32>,
    maps: Maps,
    spacing: Option<[f64; 3]>,
) -> Result<Subject, CohortError> {
    let src = image.geometry.clone();
    let spacing = spacing.unwrap_or_else(|| spacing_along_world_axes(&src));
    let target = ras_grid_covering(&src, spacing);
    let sigma = prefilter_sigma(&src, spacing);
    let resample = |mut data: Vec<f32>| {
        gaussian_blur(&mut data, src.dims, sigma);
        resample_linear(
            &Volume {
                geometry: src.clone(),
                data,
            },
            &target,
        )
        .data
    };
    let mut img = resample(image.data);
    let soft: Vec<Vec<f32>> = maps.into_iter().map(resample).collect();
    // Outside the source every map reads 0: that is background.
    let labels: Vec<u8> = (0..target.len())
        .map(|i| {
            let mut best = BACKGROUND;
            let mut best_v = soft[0][i].max(1e-6);
            for (l, m) in soft.iter().enumerate().skip(1) {
                if m[i] > best_v {
                    best_v = m[i];
                    best = l as u8;
                }
            }
            best
        })
        .collect();
    for (v, &l) in img.iter_mut().zip(&labels) {
        if l == BACKGROUND {
            *v = 0.0;
        }
    }
    let wm: Vec<f32> = img
        .iter()
        .zip(&labels)
        .filter(|(_, &l)| l == WHITE_MATTER)
        .map(|(&v, _)| v)
        .collect();
    let wm_level = median(&wm);
    if wm.len() < 100 || wm_level <= 0.0 {
        return Err(CohortError::Anatomy {
            subject: kind.name(),
            detail: format!(
                "white matter missing after preparation ({} voxels)",
                wm.len()
            ),
        });
    }
    img.iter_mut().for_each(|v| *v = (*v / wm_level).max(0.0));
    // The margin may reach beyond the source's field of view (the ITK scan ends close to the
    // brain): pad with background there, so every subject has room to be deformed.
    let (lo, hi) =
        bounding_box(target.dims, 0, |i| labels[i] != BACKGROUND).ok_or(CohortError::Anatomy {
            subject: kind.name(),
            detail: "empty brain mask".into(),
        })?;
    let m = CROP_MARGIN as isize;
    let lo = lo.map(|v| v as isize - m);
    let hi = hi.map(|v| v as isize + m);
    let image = crop_or_pad(
        &Volume {
            geometry: target.clone(),
            data: img,
        },
        lo,
        hi,
        0.0,
    );
    let labels = crop_or_pad(
        &Volume {
            geometry: target,
            data: labels,
        },
        lo,
        hi,
        BACKGROUND,
    );
    Ok(Subject {
        kind,
        image,
        labels,
    })
}

/// Gaussian pre-filter (in source voxels) before resampling to a coarser grid: σ = ½·√(t² − s²) mm
/// along each source axis, t the target spacing along the world axis it runs along.
fn prefilter_sigma(src: &Geometry, target_spacing: [f64; 3]) -> [f64; 3] {
    let sp = src.spacing();
    [0, 1, 2].map(|c| {
        let t = target_spacing[world_axis_of(src, c)];
        0.5 * (t * t - sp[c] * sp[c]).max(0.0).sqrt() / sp[c]
    })
}

/// Median of a slice (0 when empty).
pub fn median(v: &[f32]) -> f32 {
    percentile(v, 0.5)
}

/// The `q`-quantile (0..=1) by selection (0 when empty).
pub fn percentile(v: &[f32], q: f64) -> f32 {
    if v.is_empty() {
        return 0.0;
    }
    let mut c = v.to_vec();
    let k = (((c.len() - 1) as f64) * q.clamp(0.0, 1.0)).round() as usize;
    let (_, x, _) = c.select_nth_unstable_by(k, f32::total_cmp);
    *x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_finds_three_levels_in_order() {
        let mut v = Vec::new();
        for i in 0..300 {
            v.push(30.0 + (i % 7) as f32);
            v.push(70.0 + (i % 5) as f32);
            v.push(110.0 + (i % 3) as f32);
        }
        let c = kmeans_1d(&v, 3);
        assert!((c[0] - 33.0).abs() < 0.5, "{c:?}");
        assert!((c[1] - 72.0).abs() < 0.5, "{c:?}");
        assert!((c[2] - 111.0).abs() < 0.5, "{c:?}");
    }

    #[test]
    fn prefilter_only_when_coarser() {
        let g = Geometry::axis_aligned([4, 4, 4], [1.0, 1.0, 1.0], [0.0; 3]);
        let s = prefilter_sigma(&g, [2.0, 2.0, 2.0]);
        assert!((s[0] - 0.5 * 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(prefilter_sigma(&g, [1.0, 1.0, 1.0]), [0.0; 3]);
    }
}
