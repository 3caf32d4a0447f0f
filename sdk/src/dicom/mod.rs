//! DICOM in and out for the SDK: a series of image instances becomes a [`crate::Volume`] with its
//! world geometry, and a label volume becomes a DICOM Segmentation (SEG) referencing that series.
//!
//! - [`series`]: instances → volume (sorting along the slice normal, geometry, rescale).
//! - [`seg`]: DICOM SEG writer and reader (binary and fractional).
//! - [`write`]: writes a volume as an image series (test data, the CT/MR demo series).
//!
//! Coordinates: DICOM patient coordinates are LPS (x to the patient's left, y to the posterior),
//! the SDK's [`Geometry`] affine is RAS (the NIfTI convention). Voxel `(i, j, k)` of a volume read
//! from DICOM is column `i`, row `j` of the `k`-th slice in order along the slice normal
//! (row direction × column direction of ImageOrientationPatient), so the volume's x-fastest
//! layout is exactly DICOM's row-major pixel order, one slice after another. The affine is
//! `diag(-1, -1, 1, 1) · [row_dir·Δcol | col_dir·Δrow | slice step | IPP₀]` in LPS.
//!
//! Transfer syntaxes read (dicom-rs 0.10.1 with its default `native` codecs): implicit VR little
//! endian, explicit VR little endian, explicit VR big endian, deflated explicit VR little endian,
//! JPEG baseline (8-bit), JPEG extended and JPEG lossless (process 14, SV1), and RLE lossless. Not
//! read: JPEG-LS, JPEG 2000, JPEG XL (dicom-rs needs the `charls`/`openjp2` features, C
//! libraries). Everything written is explicit VR little endian.

use std::path::PathBuf;

use crate::volume::Geometry;

pub mod seg;
pub mod series;
pub mod write;

pub use seg::{
    read_seg, read_seg_segments, segments_for_classes, write_seg, AlgorithmInfo, Code,
    SegmentDescription,
};
pub use series::{read_series, read_series_dir, SeriesVolume, SopInstance, StudyInfo};
pub use write::{write_series, Modality, SeriesMeta};

/// Errors reading or writing DICOM series and segmentations.
#[derive(Debug, thiserror::Error)]
pub enum DicomError {
    #[error("cannot list the DICOM folder {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no DICOM files in {path}")]
    NoFiles { path: PathBuf },
    #[error("cannot read DICOM file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<dicom::object::ReadError>,
    },
    #[error("{path}: required attribute {attribute} is missing or empty")]
    MissingAttribute {
        path: PathBuf,
        attribute: &'static str,
    },
    #[error("{path}: attribute {attribute} has an unusable value: {reason}")]
    BadAttribute {
        path: PathBuf,
        attribute: &'static str,
        reason: String,
    },
    #[error("{path}: multi-frame images ({frames} frames) are not supported as a series source; export the series as single-frame instances")]
    MultiFrame { path: PathBuf, frames: u32 },
    #[error("{path}: colour images ({samples} samples per pixel) are not supported")]
    NotGreyscale { path: PathBuf, samples: u16 },
    #[error("{path} belongs to series {found}, not {expected}: one series at a time")]
    MixedSeries {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: image orientation {found:?} differs from the series' {expected:?}")]
    MixedOrientation {
        path: PathBuf,
        expected: [f64; 6],
        found: [f64; 6],
    },
    #[error("{path}: {what} {found} differs from the series' {expected}")]
    MixedGrid {
        path: PathBuf,
        what: &'static str,
        expected: String,
        found: String,
    },
    #[error("{first} and {second} are at the same position ({position_mm:.3} mm along the slice normal)")]
    DuplicatePosition {
        first: PathBuf,
        second: PathBuf,
        position_mm: f64,
    },
    #[error("slice gap: {missing} slice(s) missing between {before} and {after} ({step_mm:.3} mm apart, the series' spacing is {spacing_mm:.3} mm)")]
    SliceGap {
        before: PathBuf,
        after: PathBuf,
        missing: usize,
        step_mm: f64,
        spacing_mm: f64,
    },
    #[error("non-uniform slice spacing: {before} → {after} is {step_mm:.4} mm, the series' mean is {spacing_mm:.4} mm (tolerance {tolerance_mm:.4} mm)")]
    NonUniformSpacing {
        before: PathBuf,
        after: PathBuf,
        step_mm: f64,
        spacing_mm: f64,
        tolerance_mm: f64,
    },
    #[error("{path}: cannot decode the pixel data (transfer syntax {transfer_syntax})")]
    PixelData {
        path: PathBuf,
        transfer_syntax: String,
        #[source]
        source: Box<dicom::pixeldata::Error>,
    },
    #[error("{path}: {reason}")]
    PixelLayout { path: PathBuf, reason: String },
    #[error("cannot write DICOM: {reason}")]
    Unwritable { reason: String },
    #[error("cannot create folder {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write DICOM file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path} is not a segmentation: {reason}")]
    NotSegmentation { path: PathBuf, reason: String },
    #[error("{path}: frame {frame} cannot be placed on the source series: {reason}")]
    UnmappedFrame {
        path: PathBuf,
        frame: usize,
        reason: String,
    },
    #[error("the label volume's grid {labels:?} differs from the source series' {source_dims:?}")]
    LabelGrid {
        labels: [usize; 3],
        source_dims: [usize; 3],
    },
}

/// Flips between DICOM LPS and RAS world coordinates (its own inverse).
pub(crate) fn flip_lps_ras(v: [f64; 3]) -> [f64; 3] {
    [-v[0], -v[1], v[2]]
}

/// The DICOM plane description of slice `k` of a geometry: ImagePositionPatient (LPS),
/// ImageOrientationPatient (row then column direction cosines, LPS) and PixelSpacing
/// (row spacing = between rows, then column spacing), plus the slice step's length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlaneGeometry {
    pub position: [f64; 3],
    pub orientation: [f64; 6],
    pub pixel_spacing: [f64; 2],
    pub slice_step_mm: f64,
}

/// See [`PlaneGeometry`]: what a slice of `geometry` looks like in DICOM terms.
pub fn plane_geometry(geometry: &Geometry, k: usize) -> PlaneGeometry {
    let a = &geometry.affine;
    let col = |c: usize| flip_lps_ras([a[0][c], a[1][c], a[2][c]]);
    let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
    let (r, c, s) = (col(0), col(1), col(2));
    let (dr, dc) = (norm(r), norm(c));
    let ras = geometry.world([0.0, 0.0, k as f64]);
    PlaneGeometry {
        position: flip_lps_ras(ras),
        orientation: [
            r[0] / dr,
            r[1] / dr,
            r[2] / dr,
            c[0] / dc,
            c[1] / dc,
            c[2] / dc,
        ],
        pixel_spacing: [dc, dr],
        slice_step_mm: norm(s),
    }
}

/// A DICOM decimal string (DS, at most 16 characters) for `v`.
pub(crate) fn ds(v: f64) -> String {
    let v = if v == 0.0 { 0.0 } else { v }; // no "-0"
    for prec in (0..=10).rev() {
        let s = format!("{v:.prec$}");
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        if s.len() <= 16 {
            return if s == "-0" { "0".into() } else { s };
        }
    }
    format!("{v:.6e}")
}

/// A `2.25.<decimal>` UID derived from `seed` (the 128 bits of a SHA-256 of it, marked as a
/// version-8 "custom" UUID as RFC 9562 describes), so the same seed always gives the same UID.
pub fn uid_from_seed(seed: &str) -> String {
    use sha2::{Digest, Sha256};
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x80; // version 8
    b[8] = (b[8] & 0x3f) | 0x80; // RFC variant
    format!("2.25.{}", u128::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        for v in [
            0.0,
            -0.0,
            1.5,
            -1024.0,
            0.957031,
            1.0 / 3.0,
            -123456.789012345,
            1e-9,
        ] {
            let s = ds(v);
            assert!(s.len() <= 16, "{s}");
            let back: f64 = s.parse().unwrap();
            assert!((back - v).abs() <= 1e-6 * v.abs().max(1.0), "{v} → {s}");
        }
    }

    #[test]
    fn seeded_uids_are_stable_and_valid() {
        let a = uid_from_seed("x/study");
        assert_eq!(a, uid_from_seed("x/study"));
        assert_ne!(a, uid_from_seed("x/series"));
        assert!(a.len() <= 64 && a.starts_with("2.25."));
        assert!(a[5..].bytes().all(|c| c.is_ascii_digit()) && !a[5..].starts_with('0'));
    }

    #[test]
    fn plane_geometry_flips_to_lps() {
        let g = Geometry::axis_aligned([4, 3, 2], [0.5, 0.7, 2.0], [10.0, 20.0, 30.0]);
        let p = plane_geometry(&g, 1);
        assert_eq!(p.position, [-10.0, -20.0, 32.0]);
        assert_eq!(p.orientation, [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]);
        assert_eq!(p.pixel_spacing, [0.7, 0.5]);
        assert_eq!(p.slice_step_mm, 2.0);
    }
}
