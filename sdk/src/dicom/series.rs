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

/// Opens the DICOM file at `path`.
pub(crate) fn open(path: &Path) -> Result<FileDicomObject<InMemDicomObject>, DicomError> {
    dicom::object::open_file(path).map_err(|source| DicomError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
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
    let slice = |path: &PathBuf, obj, position, normal| Slice {
        path: path.clone(),
        obj,
        position,
        distance: dot(position, normal),
    };
    let (obj, header) = read_instance(first_path)?;
    let position = header.position;
    let layout = SeriesLayout::of_first(first_path, header)?;
    let mut slices = Vec::with_capacity(files.len());
    slices.push(slice(first_path, obj, position, layout.normal));
    for path in &files[1..] {
        let (obj, header) = read_instance(path)?;
        let position = header.position;
        layout.check(path, header)?;
        slices.push(slice(path, obj, position, layout.normal));
    }
    slices.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    let step = check_spacing(&slices)?;
    let first = layout.first;
    let (rows, cols) = (first.rows as usize, first.cols as usize);
    let data = decode_pixels(&slices, rows, cols)?;
    let (r, c, _) = orientation_axes(first_path, first.iop)?;
    let geometry = Geometry {
        dims: [cols, rows, slices.len()],
        affine: ras_affine(r, c, first.spacing, step, slices[0].position),
    };
    let volume = Volume::new(geometry, data).map_err(|e| DicomError::PixelLayout {
        path: first_path.clone(),
        reason: e.to_string(),
    })?;
    series_volume(volume, first.series_uid, &slices)
}

/// What one instance's header says about its series and where it lies, before it is checked
/// against the rest of the series.
struct InstanceHeader {
    series_uid: String,
    /// ImageOrientationPatient.
    iop: [f64; 6],
    /// ImagePositionPatient.
    position: [f64; 3],
    rows: u32,
    cols: u32,
    /// PixelSpacing (between rows, between columns).
    spacing: [f64; 2],
}

/// Opens the instance at `path` and reads its header, refusing multi-frame and colour images and
/// missing or unusable geometry.
fn read_instance(
    path: &Path,
) -> Result<(FileDicomObject<InMemDicomObject>, InstanceHeader), DicomError> {
    let obj = open(path)?;
    let series_uid = required(
        path,
        "SeriesInstanceUID",
        text(&obj, tags::SERIES_INSTANCE_UID),
    )?;
    let frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
    if frames > 1 {
        return Err(DicomError::MultiFrame {
            path: path.to_path_buf(),
            frames: frames as u32,
        });
    }
    let samples = int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    if samples != 1 {
        return Err(DicomError::NotGreyscale {
            path: path.to_path_buf(),
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
            path: path.to_path_buf(),
            attribute: "PixelSpacing",
            reason: format!("{spacing:?} is not positive"),
        });
    }
    let rows = int(&obj, tags::ROWS).filter(|&r| r > 0);
    let cols = int(&obj, tags::COLUMNS).filter(|&c| c > 0);
    let (Some(rows), Some(cols)) = (rows, cols) else {
        return Err(DicomError::MissingAttribute {
            path: path.to_path_buf(),
            attribute: "Rows/Columns",
        });
    };
    let header = InstanceHeader {
        series_uid,
        iop,
        position,
        rows: rows as u32,
        cols: cols as u32,
        spacing,
    };
    Ok((obj, header))
}

/// What every instance of the series shares, as the first instance gives it: the series, the
/// orientation (and so the slice normal) and the grid.
struct SeriesLayout {
    first: InstanceHeader,
    normal: [f64; 3],
}

impl SeriesLayout {
    /// The layout the first instance (at `path`) sets; its orientation must be usable.
    fn of_first(path: &Path, first: InstanceHeader) -> Result<Self, DicomError> {
        Ok(SeriesLayout {
            normal: orientation_axes(path, first.iop)?.2,
            first,
        })
    }

    /// Refuses an instance of another series, orientation or grid.
    fn check(&self, path: &Path, h: InstanceHeader) -> Result<(), DicomError> {
        let first = &self.first;
        if h.series_uid != first.series_uid {
            return Err(DicomError::MixedSeries {
                path: path.to_path_buf(),
                expected: first.series_uid.clone(),
                found: h.series_uid,
            });
        }
        if h.iop
            .iter()
            .zip(&first.iop)
            .any(|(a, b)| (a - b).abs() > 1e-4)
        {
            return Err(DicomError::MixedOrientation {
                path: path.to_path_buf(),
                expected: first.iop,
                found: h.iop,
            });
        }
        if (h.rows, h.cols) != (first.rows, first.cols) {
            return Err(DicomError::MixedGrid {
                path: path.to_path_buf(),
                what: "rows × columns",
                expected: format!("{} × {}", first.rows, first.cols),
                found: format!("{} × {}", h.rows, h.cols),
            });
        }
        let spacing = first.spacing;
        if (0..2).any(|a| (h.spacing[a] - spacing[a]).abs() > 1e-4 * spacing[a].max(1.0)) {
            return Err(DicomError::MixedGrid {
                path: path.to_path_buf(),
                what: "pixel spacing",
                expected: format!("{spacing:?}"),
                found: format!("{:?}", h.spacing),
            });
        }
        Ok(())
    }
}

/// The sorted slices' pixel values, rescaled, one `rows × cols` slice after another.
fn decode_pixels(slices: &[Slice], rows: usize, cols: usize) -> Result<Vec<f32>, DicomError> {
    let mut data = Vec::with_capacity(rows * cols * slices.len());
    for s in slices {
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
    Ok(data)
}

/// The RAS affine of a series from its LPS row direction `r`, column direction `c`, PixelSpacing,
/// slice step and first slice's position: i along the row direction (column spacing), j along the
/// column direction (row spacing), k along the measured step; then x and y flipped to RAS.
fn ras_affine(
    r: [f64; 3],
    c: [f64; 3],
    pixel_spacing: [f64; 2],
    step: [f64; 3],
    origin: [f64; 3],
) -> [[f64; 4]; 4] {
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
    affine
}

/// The series read into `volume`, with the UIDs, study and series attributes of its first slice
/// (in slice order) and every slice's instance, position and file.
fn series_volume(
    volume: Volume<f32>,
    series_uid: String,
    slices: &[Slice],
) -> Result<SeriesVolume, DicomError> {
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
        volume,
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
        study: study_info(first),
        transfer_syntax: first
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string(),
    })
}

/// The patient and study attributes of `obj` (empty where absent).
fn study_info(obj: &InMemDicomObject) -> StudyInfo {
    let t = |tag| text(obj, tag).unwrap_or_default();
    StudyInfo {
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
    }
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
