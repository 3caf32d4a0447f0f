//! A DICOM image series (single-frame CT, MR or similar instances) read into a [`Volume<f32>`] with
//! its world geometry.
//!
//! [`read_series`] checks that the files are one series (one SeriesInstanceUID), with one
//! orientation, one grid (rows, columns, pixel spacing) and no two slices at the same place; sorts
//! them by the projection of ImagePositionPatient on the slice normal (row direction × column
//! direction); and takes the slice step from the positions (never from SliceThickness), refusing a
//! missing slice (a step that is a whole multiple ≥ 2 of the smallest) or otherwise non-uniform
//! steps (tolerance: 1 % of the spacing, at least 0.01 mm). The step vector may be oblique to the
//! normal (gantry tilt): it becomes the affine's third column as it is. Pixel values come out
//! rescaled (RescaleSlope/Intercept applied, PixelRepresentation honoured, so CT is in HU).
//! Multi-frame (enhanced) images are refused with [`DicomError::MultiFrame`].
//!
//! The geometry conventions are in the [module docs](super).

use std::path::{Path, PathBuf};

use dicom::core::Tag;
use dicom::dictionary_std::tags;
use dicom::object::{FileDicomObject, InMemDicomObject};
use dicom::pixeldata::PixelDecoder;

use super::{flip_lps_ras, DicomError};
use crate::volume::{Geometry, Volume};

/// One instance of a series: its SOP class and instance UIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SopInstance {
    pub class_uid: String,
    pub instance_uid: String,
}

/// Patient and study attributes carried from a source series into derived objects (a SEG).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StudyInfo {
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub accession_number: String,
    pub referring_physician_name: String,
    pub study_description: String,
}

/// A series read into a volume, with what is needed to refer back to it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeriesVolume {
    /// The pixel values after RescaleSlope/Intercept; the geometry per the [module docs](super).
    pub volume: Volume<f32>,
    pub study_uid: String,
    pub series_uid: String,
    /// Empty when the instances have none.
    pub frame_of_reference_uid: String,
    /// One per slice, in slice (k) order.
    pub sop_instances: Vec<SopInstance>,
    /// ImagePositionPatient (LPS, mm) per slice, in slice order.
    pub positions: Vec<[f64; 3]>,
    /// The files, in slice order (empty for a series built in memory).
    pub files: Vec<PathBuf>,
    pub modality: String,
    pub series_number: Option<i32>,
    pub series_description: String,
    pub study: StudyInfo,
    /// The transfer syntax UID of the first instance.
    pub transfer_syntax: String,
}

/// Reads every file in `dir` (not recursing; files that are not DICOM, such as DICOMDIR or notes,
/// are an error unless their name starts with `.`) as one series. See [`read_series`].
pub fn read_series_dir(dir: impl AsRef<Path>) -> Result<SeriesVolume, DicomError> {
    let dir = dir.as_ref();
    let read_dir = |source| DicomError::ReadDir {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir)? {
        let entry = entry.map_err(read_dir)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.eq_ignore_ascii_case("DICOMDIR") {
            continue;
        }
        if entry.file_type().map_err(read_dir)?.is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(DicomError::NoFiles {
            path: dir.to_path_buf(),
        });
    }
    files.sort();
    read_series(&files)
}

/// One instance's header facts, before sorting.
struct Slice {
    path: PathBuf,
    obj: FileDicomObject<InMemDicomObject>,
    position: [f64; 3],
    distance: f64,
}

pub(crate) fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    let s = obj.get(tag)?.to_str().ok()?;
    let s = s.trim_end_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_string())
}

pub(crate) fn floats(obj: &InMemDicomObject, tag: Tag) -> Option<Vec<f64>> {
    obj.get(tag)?.to_multi_float64().ok()
}

pub(crate) fn int(obj: &InMemDicomObject, tag: Tag) -> Option<i64> {
    obj.get(tag)?.to_int::<i64>().ok()
}

fn required(path: &Path, attribute: &'static str, v: Option<String>) -> Result<String, DicomError> {
    v.ok_or_else(|| DicomError::MissingAttribute {
        path: path.to_path_buf(),
        attribute,
    })
}

pub(crate) fn fixed<const N: usize>(
    path: &Path,
    attribute: &'static str,
    v: Option<Vec<f64>>,
) -> Result<[f64; N], DicomError> {
    let v = v.ok_or_else(|| DicomError::MissingAttribute {
        path: path.to_path_buf(),
        attribute,
    })?;
    <[f64; N]>::try_from(v.as_slice())
        .ok()
        .filter(|a| a.iter().all(|x| x.is_finite()))
        .ok_or_else(|| DicomError::BadAttribute {
            path: path.to_path_buf(),
            attribute,
            reason: format!("expected {N} finite numbers, found {v:?}"),
        })
}

pub(crate) fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub(crate) fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Row direction, column direction and slice normal (LPS unit vectors).
pub(crate) type Axes = ([f64; 3], [f64; 3], [f64; 3]);

/// Row and column direction cosines from ImageOrientationPatient, checked to be unit length and
/// perpendicular (within 1e-3), and the slice normal.
pub(crate) fn orientation_axes(path: &Path, iop: [f64; 6]) -> Result<Axes, DicomError> {
    let r = [iop[0], iop[1], iop[2]];
    let c = [iop[3], iop[4], iop[5]];
    let ok = (dot(r, r).sqrt() - 1.0).abs() < 1e-3
        && (dot(c, c).sqrt() - 1.0).abs() < 1e-3
        && dot(r, c).abs() < 1e-3;
    if !ok {
        return Err(DicomError::BadAttribute {
            path: path.to_path_buf(),
            attribute: "ImageOrientationPatient",
            reason: format!("{iop:?} is not two perpendicular unit vectors"),
        });
    }
    Ok((r, c, cross(r, c)))
}

/// Reads `files` as one series into a volume (see the module docs for the checks).
pub fn read_series(files: &[PathBuf]) -> Result<SeriesVolume, DicomError> {
    let Some(first_path) = files.first() else {
        return Err(DicomError::NoFiles {
            path: PathBuf::new(),
        });
    };
    let mut slices = Vec::with_capacity(files.len());
    let mut series_uid = String::new();
    let mut iop0 = [0.0; 6];
    let mut normal = [0.0; 3];
    let mut grid0 = (0u32, 0u32, [0.0; 2]);
    for (n, path) in files.iter().enumerate() {
        let obj = dicom::object::open_file(path).map_err(|source| DicomError::Open {
            path: path.clone(),
            source: Box::new(source),
        })?;
        let uid = required(
            path,
            "SeriesInstanceUID",
            text(&obj, tags::SERIES_INSTANCE_UID),
        )?;
        let frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
        if frames > 1 {
            return Err(DicomError::MultiFrame {
                path: path.clone(),
                frames: frames as u32,
            });
        }
        let samples = int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
        if samples != 1 {
            return Err(DicomError::NotGreyscale {
                path: path.clone(),
                samples: samples as u16,
            });
        }
        let iop: [f64; 6] = fixed(
            path,
            "ImageOrientationPatient",
            floats(&obj, tags::IMAGE_ORIENTATION_PATIENT),
        )?;
        let position: [f64; 3] = fixed(
            path,
            "ImagePositionPatient",
            floats(&obj, tags::IMAGE_POSITION_PATIENT),
        )?;
        let spacing: [f64; 2] = fixed(path, "PixelSpacing", floats(&obj, tags::PIXEL_SPACING))?;
        if spacing.iter().any(|&s| s <= 0.0) {
            return Err(DicomError::BadAttribute {
                path: path.clone(),
                attribute: "PixelSpacing",
                reason: format!("{spacing:?} is not positive"),
            });
        }
        let rows = int(&obj, tags::ROWS).filter(|&r| r > 0);
        let cols = int(&obj, tags::COLUMNS).filter(|&c| c > 0);
        let (Some(rows), Some(cols)) = (rows, cols) else {
            return Err(DicomError::MissingAttribute {
                path: path.clone(),
                attribute: "Rows/Columns",
            });
        };
        let grid = (rows as u32, cols as u32, spacing);
        if n == 0 {
            series_uid = uid;
            normal = orientation_axes(path, iop)?.2;
            iop0 = iop;
            grid0 = grid;
        } else {
            if uid != series_uid {
                return Err(DicomError::MixedSeries {
                    path: path.clone(),
                    expected: series_uid,
                    found: uid,
                });
            }
            if iop.iter().zip(&iop0).any(|(a, b)| (a - b).abs() > 1e-4) {
                return Err(DicomError::MixedOrientation {
                    path: path.clone(),
                    expected: iop0,
                    found: iop,
                });
            }
            if (grid.0, grid.1) != (grid0.0, grid0.1) {
                return Err(DicomError::MixedGrid {
                    path: path.clone(),
                    what: "rows × columns",
                    expected: format!("{} × {}", grid0.0, grid0.1),
                    found: format!("{} × {}", grid.0, grid.1),
                });
            }
            if (0..2).any(|a| (grid.2[a] - grid0.2[a]).abs() > 1e-4 * grid0.2[a].max(1.0)) {
                return Err(DicomError::MixedGrid {
                    path: path.clone(),
                    what: "pixel spacing",
                    expected: format!("{:?}", grid0.2),
                    found: format!("{:?}", grid.2),
                });
            }
        }
        slices.push(Slice {
            path: path.clone(),
            obj,
            position,
            distance: dot(position, normal),
        });
    }
    slices.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    let step = check_spacing(&slices)?;

    let (rows, cols, pixel_spacing) = (grid0.0 as usize, grid0.1 as usize, grid0.2);
    let nz = slices.len();
    let mut data = Vec::with_capacity(rows * cols * nz);
    for s in &slices {
        let ts = s.obj.meta().transfer_syntax().trim_end_matches('\0');
        let pixel_err = |source| DicomError::PixelData {
            path: s.path.clone(),
            transfer_syntax: ts.to_string(),
            source: Box::new(source),
        };
        let decoded = s.obj.decode_pixel_data().map_err(pixel_err)?;
        // The default conversion applies the modality LUT (RescaleSlope/Intercept) and reads the
        // stored values signed or unsigned per PixelRepresentation.
        let values = decoded.to_vec::<f32>().map_err(pixel_err)?;
        if values.len() != rows * cols {
            return Err(DicomError::PixelLayout {
                path: s.path.clone(),
                reason: format!(
                    "{} pixel values decoded for a {rows} × {cols} image",
                    values.len()
                ),
            });
        }
        data.extend_from_slice(&values);
    }

    let (r, c, _) = orientation_axes(first_path, iop0)?;
    let origin = slices[0].position;
    // LPS columns: i along the row direction (column spacing), j along the column direction (row
    // spacing), k along the measured step; then flip x and y to RAS.
    let mut affine = [[0.0; 4]; 4];
    for a in 0..3 {
        let sign = if a < 2 { -1.0 } else { 1.0 };
        // `+ 0.0` turns the -0.0 of a flipped zero into 0.0.
        affine[a][0] = sign * r[a] * pixel_spacing[1] + 0.0;
        affine[a][1] = sign * c[a] * pixel_spacing[0] + 0.0;
        affine[a][2] = sign * step[a] + 0.0;
        affine[a][3] = flip_lps_ras(origin)[a] + 0.0;
    }
    affine[3][3] = 1.0;
    let geometry = Geometry {
        dims: [cols, rows, nz],
        affine,
    };
    let first = &slices[0].obj;
    let t = |tag| text(first, tag).unwrap_or_default();
    let sop_instances = slices
        .iter()
        .map(|s| {
            Ok(SopInstance {
                class_uid: required(&s.path, "SOPClassUID", text(&s.obj, tags::SOP_CLASS_UID))?,
                instance_uid: required(
                    &s.path,
                    "SOPInstanceUID",
                    text(&s.obj, tags::SOP_INSTANCE_UID),
                )?,
            })
        })
        .collect::<Result<Vec<_>, DicomError>>()?;
    Ok(SeriesVolume {
        volume: Volume::new(geometry, data).map_err(|e| DicomError::PixelLayout {
            path: first_path.clone(),
            reason: e.to_string(),
        })?,
        study_uid: required(
            &slices[0].path,
            "StudyInstanceUID",
            text(first, tags::STUDY_INSTANCE_UID),
        )?,
        series_uid,
        frame_of_reference_uid: t(tags::FRAME_OF_REFERENCE_UID),
        sop_instances,
        positions: slices.iter().map(|s| s.position).collect(),
        files: slices.iter().map(|s| s.path.clone()).collect(),
        modality: t(tags::MODALITY),
        series_number: int(first, tags::SERIES_NUMBER).map(|n| n as i32),
        series_description: t(tags::SERIES_DESCRIPTION),
        study: StudyInfo {
            patient_name: t(tags::PATIENT_NAME),
            patient_id: t(tags::PATIENT_ID),
            patient_birth_date: t(tags::PATIENT_BIRTH_DATE),
            patient_sex: t(tags::PATIENT_SEX),
            study_date: t(tags::STUDY_DATE),
            study_time: t(tags::STUDY_TIME),
            study_id: t(tags::STUDY_ID),
            accession_number: t(tags::ACCESSION_NUMBER),
            referring_physician_name: t(tags::REFERRING_PHYSICIAN_NAME),
            study_description: t(tags::STUDY_DESCRIPTION),
        },
        transfer_syntax: first
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string(),
    })
}

/// Checks the sorted slices' spacing and returns the mean step vector (LPS); a single slice gets
/// the unit normal times its SliceThickness (1 mm if absent).
fn check_spacing(slices: &[Slice]) -> Result<[f64; 3], DicomError> {
    let n = slices.len();
    if n == 1 {
        let s = &slices[0];
        let iop: [f64; 6] = fixed(
            &s.path,
            "ImageOrientationPatient",
            floats(&s.obj, tags::IMAGE_ORIENTATION_PATIENT),
        )?;
        let normal = orientation_axes(&s.path, iop)?.2;
        let t = floats(&s.obj, tags::SLICE_THICKNESS)
            .and_then(|v| v.first().copied())
            .filter(|t| *t > 0.0)
            .unwrap_or(1.0);
        return Ok(normal.map(|x| x * t));
    }
    let steps: Vec<f64> = slices
        .windows(2)
        .map(|w| w[1].distance - w[0].distance)
        .collect();
    for (w, &d) in slices.windows(2).zip(&steps) {
        if d.abs() < 1e-3 {
            return Err(DicomError::DuplicatePosition {
                first: w[0].path.clone(),
                second: w[1].path.clone(),
                position_mm: w[0].distance,
            });
        }
    }
    let smallest = steps.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = (slices[n - 1].distance - slices[0].distance) / (n - 1) as f64;
    let tolerance = (0.01 * smallest).max(0.01);
    for (w, &d) in slices.windows(2).zip(&steps) {
        if (d - smallest).abs() <= tolerance {
            continue;
        }
        let ratio = d / smallest;
        let whole = ratio.round();
        if whole >= 2.0 && (d - whole * smallest).abs() <= tolerance * whole {
            return Err(DicomError::SliceGap {
                before: w[0].path.clone(),
                after: w[1].path.clone(),
                missing: whole as usize - 1,
                step_mm: d,
                spacing_mm: smallest,
            });
        }
        return Err(DicomError::NonUniformSpacing {
            before: w[0].path.clone(),
            after: w[1].path.clone(),
            step_mm: d,
            spacing_mm: mean,
            tolerance_mm: tolerance,
        });
    }
    // The step vector itself (oblique to the normal for a tilted gantry), checked per pair.
    let (p0, pn) = (slices[0].position, slices[n - 1].position);
    let step: [f64; 3] = std::array::from_fn(|a| (pn[a] - p0[a]) / (n - 1) as f64);
    for w in slices.windows(2) {
        let d: [f64; 3] = std::array::from_fn(|a| w[1].position[a] - w[0].position[a]);
        let off = (0..3).map(|a| (d[a] - step[a]).powi(2)).sum::<f64>().sqrt();
        if off > tolerance {
            return Err(DicomError::NonUniformSpacing {
                before: w[0].path.clone(),
                after: w[1].path.clone(),
                step_mm: dot(d, d).sqrt(),
                spacing_mm: dot(step, step).sqrt(),
                tolerance_mm: tolerance,
            });
        }
    }
    Ok(step)
}
