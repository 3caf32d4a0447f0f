//! Writes a [`Volume<f32>`] as a DICOM image series: CT Image Storage or MR Image Storage, one
//! single-frame instance per axial slice (k), explicit VR little endian, signed 16-bit stored
//! values with one RescaleSlope/Intercept for the whole series.
//!
//! Stored values: when every voxel is a whole number in −32768..=32767 (CT in HU) they are stored
//! as they are (slope 1, intercept 0); otherwise the range is spread over the 65,536 steps of int16,
//! so a value reads back within half a step (`(max − min) / 65535 / 2`).
//!
//! Geometry: ImagePositionPatient, ImageOrientationPatient and PixelSpacing come from the affine
//! (RAS → LPS, see the [module docs](super)); SliceThickness and SpacingBetweenSlices are the slice
//! step's length. UIDs are `2.25.` UUID-derived ([`super::uid_from_seed`]) from
//! [`SeriesMeta::uid_seed`]: `<seed>/study`, `<seed>/series`, `<seed>/frame-of-reference`,
//! `<seed>/instance/<k>`, so writing the same volume with the same seed gives the same files.

use std::path::{Path, PathBuf};

use dicom::core::value::DataSetSequence;
use dicom::core::{DataElement, PrimitiveValue, Tag, VR};
use dicom::dictionary_std::{tags, uids};
use dicom::object::meta::FileMetaTableBuilder;
use dicom::object::InMemDicomObject;

use super::{ds, plane_geometry, uid_from_seed, DicomError, PlaneGeometry};
use crate::volume::Volume;

/// The implementation class UID Cosilo writes in file meta groups (UUID-derived, fixed).
pub const IMPLEMENTATION_CLASS_UID: &str = "2.25.223372036854775807100000000000000001";
/// The implementation version name in file meta groups.
pub const IMPLEMENTATION_VERSION_NAME: &str = "COSILO_SDK";

/// Which image storage class to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// CT Image Storage (1.2.840.10008.5.1.4.1.1.2), values in HU.
    Ct,
    /// MR Image Storage (1.2.840.10008.5.1.4.1.1.4).
    Mr,
}

impl Modality {
    /// The Modality attribute's value.
    pub fn code(self) -> &'static str {
        match self {
            Modality::Ct => "CT",
            Modality::Mr => "MR",
        }
    }

    /// The SOP class UID.
    pub fn sop_class_uid(self) -> &'static str {
        match self {
            Modality::Ct => uids::CT_IMAGE_STORAGE,
            Modality::Mr => uids::MR_IMAGE_STORAGE,
        }
    }
}

/// Who and what a written series is about. [`SeriesMeta::new`] fills plausible defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesMeta {
    pub modality: Modality,
    /// Seed for every UID (see the module docs).
    pub uid_seed: String,
    /// DICOM person name, `Family^Given`.
    pub patient_name: String,
    pub patient_id: String,
    /// `YYYYMMDD`.
    pub patient_birth_date: String,
    /// `M`, `F` or `O`.
    pub patient_sex: String,
    /// `YYYYMMDD`.
    pub study_date: String,
    /// `HHMMSS`.
    pub study_time: String,
    pub study_id: String,
    pub accession_number: String,
    pub study_description: String,
    pub referring_physician_name: String,
    pub series_number: i32,
    pub series_description: String,
    pub body_part: String,
    pub manufacturer: String,
    pub institution_name: String,
}

impl SeriesMeta {
    /// Metadata with placeholder patient and study values, UIDs from `uid_seed`.
    pub fn new(modality: Modality, uid_seed: impl Into<String>) -> Self {
        SeriesMeta {
            modality,
            uid_seed: uid_seed.into(),
            patient_name: "Doe^Jane".into(),
            patient_id: "COSILO-0001".into(),
            patient_birth_date: "19700101".into(),
            patient_sex: "O".into(),
            study_date: "20260101".into(),
            study_time: "090000".into(),
            study_id: "1".into(),
            accession_number: "ACC0001".into(),
            study_description: String::new(),
            referring_physician_name: String::new(),
            series_number: 1,
            series_description: String::new(),
            body_part: "HEAD".into(),
            manufacturer: "Cosilo".into(),
            institution_name: String::new(),
        }
    }

    /// The study instance UID this metadata gives.
    pub fn study_uid(&self) -> String {
        uid_from_seed(&format!("{}/study", self.uid_seed))
    }

    /// The series instance UID this metadata gives.
    pub fn series_uid(&self) -> String {
        uid_from_seed(&format!("{}/series", self.uid_seed))
    }

    /// The frame of reference UID this metadata gives.
    pub fn frame_of_reference_uid(&self) -> String {
        uid_from_seed(&format!("{}/frame-of-reference", self.uid_seed))
    }
}

pub(crate) fn put_str(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: impl Into<String>) {
    obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v.into())));
}

pub(crate) fn put_strs<S: Into<String>>(
    obj: &mut InMemDicomObject,
    tag: Tag,
    vr: VR,
    v: impl IntoIterator<Item = S>,
) {
    let v: Vec<String> = v.into_iter().map(Into::into).collect();
    obj.put(DataElement::new(tag, vr, PrimitiveValue::Strs(v.into())));
}

pub(crate) fn put_ds(obj: &mut InMemDicomObject, tag: Tag, v: &[f64]) {
    put_strs(obj, tag, VR::DS, v.iter().map(|&x| ds(x)));
}

pub(crate) fn put_us(obj: &mut InMemDicomObject, tag: Tag, v: &[u16]) {
    obj.put(DataElement::new(
        tag,
        VR::US,
        PrimitiveValue::U16(v.to_vec().into()),
    ));
}

pub(crate) fn put_seq(obj: &mut InMemDicomObject, tag: Tag, items: Vec<InMemDicomObject>) {
    obj.put(DataElement::new(tag, VR::SQ, DataSetSequence::from(items)));
}

/// An item of a code sequence.
pub(crate) fn code_item(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    put_str(&mut o, tags::CODE_VALUE, VR::SH, value);
    put_str(&mut o, tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme);
    put_str(&mut o, tags::CODE_MEANING, VR::LO, meaning);
    o
}

/// Puts the patient and general study modules.
#[allow(clippy::too_many_arguments)]
pub(crate) fn put_patient_study(obj: &mut InMemDicomObject, s: &super::series::StudyInfo) {
    put_str(obj, tags::PATIENT_NAME, VR::PN, &s.patient_name);
    put_str(obj, tags::PATIENT_ID, VR::LO, &s.patient_id);
    put_str(obj, tags::PATIENT_BIRTH_DATE, VR::DA, &s.patient_birth_date);
    put_str(obj, tags::PATIENT_SEX, VR::CS, &s.patient_sex);
    put_str(obj, tags::STUDY_DATE, VR::DA, &s.study_date);
    put_str(obj, tags::STUDY_TIME, VR::TM, &s.study_time);
    put_str(obj, tags::STUDY_ID, VR::SH, &s.study_id);
    put_str(obj, tags::ACCESSION_NUMBER, VR::SH, &s.accession_number);
    put_str(
        obj,
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        &s.referring_physician_name,
    );
    if !s.study_description.is_empty() {
        put_str(obj, tags::STUDY_DESCRIPTION, VR::LO, &s.study_description);
    }
}

/// Writes `obj` to `path` with an explicit VR little endian file meta group.
pub(crate) fn save(obj: InMemDicomObject, path: &Path) -> Result<(), DicomError> {
    let write_err = |e: Box<dyn std::error::Error + Send + Sync>| DicomError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
                .implementation_version_name(IMPLEMENTATION_VERSION_NAME),
        )
        .map_err(|e| write_err(Box::new(e)))?;
    file.write_to_file(path).map_err(|e| write_err(Box::new(e)))
}

/// How stored int16 values map to the volume's values: `value = stored × slope + intercept`.
fn rescale_for(data: &[f32]) -> Result<(f64, f64), DicomError> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    let mut whole = true;
    for (i, &v) in data.iter().enumerate() {
        if !v.is_finite() {
            return Err(DicomError::Unwritable {
                reason: format!("voxel {i} is not a finite number ({v})"),
            });
        }
        let v = v as f64;
        lo = lo.min(v);
        hi = hi.max(v);
        whole &= v.fract() == 0.0;
    }
    if whole && lo >= i16::MIN as f64 && hi <= i16::MAX as f64 {
        return Ok((1.0, 0.0));
    }
    let slope = if hi > lo { (hi - lo) / 65535.0 } else { 1.0 };
    // DS holds 16 characters: round the slope and intercept to what will be written.
    let slope: f64 = ds(slope).parse().unwrap_or(slope);
    let intercept: f64 = ds(lo + 32768.0 * slope).parse().unwrap_or(lo);
    Ok((slope, intercept))
}

/// Writes `volume` as a series of single-frame instances in `dir` (created if needed), named
/// `<modality>_<k+1, 4 digits>.dcm`, and returns their paths in slice order.
pub fn write_series(
    volume: &Volume<f32>,
    meta: &SeriesMeta,
    dir: impl AsRef<Path>,
) -> Result<Vec<PathBuf>, DicomError> {
    let dir = dir.as_ref();
    check_writable(volume)?;
    std::fs::create_dir_all(dir).map_err(|source| DicomError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let series = WrittenSeries::new(meta, rescale_for(&volume.data)?);
    let nz = volume.geometry.dims[2];
    let mut paths = Vec::with_capacity(nz);
    for k in 0..nz {
        let path = dir.join(format!("{}_{:04}.dcm", meta.modality.code(), k + 1));
        save(series.instance(volume, k), &path)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Refuses an empty volume, one whose data does not fill its grid, and slices larger than DICOM's
/// rows and columns hold.
fn check_writable(volume: &Volume<f32>) -> Result<(), DicomError> {
    let [nx, ny, _] = volume.geometry.dims;
    if volume.geometry.is_empty() || volume.data.len() != volume.geometry.len() {
        return Err(DicomError::Unwritable {
            reason: format!(
                "the volume is empty or does not fill its grid {:?}",
                volume.geometry.dims
            ),
        });
    }
    if nx > u16::MAX as usize || ny > u16::MAX as usize {
        return Err(DicomError::Unwritable {
            reason: format!("slices of {nx} × {ny} exceed DICOM's 65535 rows/columns"),
        });
    }
    Ok(())
}

/// What every instance of a series being written shares: its metadata, UIDs and rescale.
struct WrittenSeries<'a> {
    meta: &'a SeriesMeta,
    study: super::series::StudyInfo,
    study_uid: String,
    series_uid: String,
    frame_of_reference_uid: String,
    /// RescaleSlope and RescaleIntercept.
    slope: f64,
    intercept: f64,
}

impl<'a> WrittenSeries<'a> {
    fn new(meta: &'a SeriesMeta, (slope, intercept): (f64, f64)) -> Self {
        let study = super::series::StudyInfo {
            patient_name: meta.patient_name.clone(),
            patient_id: meta.patient_id.clone(),
            patient_birth_date: meta.patient_birth_date.clone(),
            patient_sex: meta.patient_sex.clone(),
            study_date: meta.study_date.clone(),
            study_time: meta.study_time.clone(),
            study_id: meta.study_id.clone(),
            accession_number: meta.accession_number.clone(),
            referring_physician_name: meta.referring_physician_name.clone(),
            study_description: meta.study_description.clone(),
        };
        WrittenSeries {
            meta,
            study,
            study_uid: meta.study_uid(),
            series_uid: meta.series_uid(),
            frame_of_reference_uid: meta.frame_of_reference_uid(),
            slope,
            intercept,
        }
    }

    /// The instance holding slice `k` of `volume`.
    fn instance(&self, volume: &Volume<f32>, k: usize) -> InMemDicomObject {
        let meta = self.meta;
        let m = meta.modality;
        let plane = plane_geometry(&volume.geometry, k);
        let mut o = InMemDicomObject::new_empty();
        put_str(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
        put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, m.sop_class_uid());
        let sop_uid = uid_from_seed(&format!("{}/instance/{k}", meta.uid_seed));
        put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &sop_uid);
        put_str(&mut o, tags::CONTENT_DATE, VR::DA, &meta.study_date);
        put_str(&mut o, tags::CONTENT_TIME, VR::TM, &meta.study_time);
        put_str(&mut o, tags::MODALITY, VR::CS, m.code());
        put_str(&mut o, tags::MANUFACTURER, VR::LO, &meta.manufacturer);
        put_nonempty(
            &mut o,
            tags::INSTITUTION_NAME,
            VR::LO,
            &meta.institution_name,
        );
        put_nonempty(
            &mut o,
            tags::SERIES_DESCRIPTION,
            VR::LO,
            &meta.series_description,
        );
        put_patient_study(&mut o, &self.study);
        put_nonempty(&mut o, tags::BODY_PART_EXAMINED, VR::CS, &meta.body_part);
        put_acquisition(&mut o, m, plane.slice_step_mm);
        put_str(&mut o, tags::PATIENT_POSITION, VR::CS, "HFS");
        put_str(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, &self.study_uid);
        put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, &self.series_uid);
        put_str(
            &mut o,
            tags::SERIES_NUMBER,
            VR::IS,
            meta.series_number.to_string(),
        );
        put_str(&mut o, tags::ACQUISITION_NUMBER, VR::IS, "1");
        put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, (k + 1).to_string());
        put_image_plane(&mut o, &plane);
        put_str(
            &mut o,
            tags::FRAME_OF_REFERENCE_UID,
            VR::UI,
            &self.frame_of_reference_uid,
        );
        put_str(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
        self.put_pixels(&mut o, volume, k);
        o
    }

    /// Image pixel module, rescale and the stored values of slice `k`.
    fn put_pixels(&self, o: &mut InMemDicomObject, volume: &Volume<f32>, k: usize) {
        let [nx, ny, _] = volume.geometry.dims;
        put_us(o, tags::SAMPLES_PER_PIXEL, &[1]);
        put_str(o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
        put_us(o, tags::ROWS, &[ny as u16]);
        put_us(o, tags::COLUMNS, &[nx as u16]);
        put_us(o, tags::BITS_ALLOCATED, &[16]);
        put_us(o, tags::BITS_STORED, &[16]);
        put_us(o, tags::HIGH_BIT, &[15]);
        put_us(o, tags::PIXEL_REPRESENTATION, &[1]);
        put_ds(o, tags::RESCALE_INTERCEPT, &[self.intercept]);
        put_ds(o, tags::RESCALE_SLOPE, &[self.slope]);
        let rescale_type = if self.meta.modality == Modality::Ct {
            "HU"
        } else {
            "US"
        };
        put_str(o, tags::RESCALE_TYPE, VR::LO, rescale_type);
        let stored: Vec<u16> = volume
            .axial_slice(k)
            .iter()
            .map(|&v| {
                let s = ((v as f64 - self.intercept) / self.slope).round();
                s.clamp(i16::MIN as f64, i16::MAX as f64) as i16 as u16
            })
            .collect();
        o.put(DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16(stored.into()),
        ));
    }
}

/// Puts `v` unless it is empty (for type 3 attributes).
fn put_nonempty(obj: &mut InMemDicomObject, tag: Tag, vr: VR, v: &str) {
    if !v.is_empty() {
        put_str(obj, tag, vr, v);
    }
}

/// ImageType and the modality's acquisition attributes (CT: KVP; MR: sequence, timing, field).
fn put_acquisition(o: &mut InMemDicomObject, m: Modality, slice_step_mm: f64) {
    match m {
        Modality::Ct => {
            put_strs(
                o,
                tags::IMAGE_TYPE,
                VR::CS,
                ["ORIGINAL", "PRIMARY", "AXIAL"],
            );
            put_ds(o, tags::KVP, &[120.0]);
        }
        Modality::Mr => {
            put_strs(
                o,
                tags::IMAGE_TYPE,
                VR::CS,
                ["ORIGINAL", "PRIMARY", "OTHER"],
            );
            put_str(o, tags::SCANNING_SEQUENCE, VR::CS, "GR");
            put_str(o, tags::SEQUENCE_VARIANT, VR::CS, "SP");
            put_str(o, tags::SCAN_OPTIONS, VR::CS, "");
            put_str(o, tags::MR_ACQUISITION_TYPE, VR::CS, "3D");
            put_ds(o, tags::REPETITION_TIME, &[8.1]);
            put_ds(o, tags::ECHO_TIME, &[3.7]);
            put_str(o, tags::ECHO_TRAIN_LENGTH, VR::IS, "1");
            put_ds(o, tags::MAGNETIC_FIELD_STRENGTH, &[3.0]);
            put_ds(o, tags::SPACING_BETWEEN_SLICES, &[slice_step_mm]);
        }
    }
}

/// Image plane module: where the slice is, its orientation, spacing, thickness and location
/// along the normal.
fn put_image_plane(o: &mut InMemDicomObject, plane: &PlaneGeometry) {
    put_ds(o, tags::SLICE_THICKNESS, &[plane.slice_step_mm]);
    put_ds(o, tags::IMAGE_POSITION_PATIENT, &plane.position);
    put_ds(o, tags::IMAGE_ORIENTATION_PATIENT, &plane.orientation);
    let d = plane.orientation;
    let normal = super::series::cross([d[0], d[1], d[2]], [d[3], d[4], d[5]]);
    put_ds(
        o,
        tags::SLICE_LOCATION,
        &[super::series::dot(plane.position, normal)],
    );
    put_ds(o, tags::PIXEL_SPACING, &plane.pixel_spacing);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_hu_values_are_stored_unscaled() {
        assert_eq!(rescale_for(&[-1024.0, 0.0, 2986.0]).unwrap(), (1.0, 0.0));
        let (slope, intercept) = rescale_for(&[0.0, 0.5, 1000.25]).unwrap();
        assert!(slope > 0.0 && slope < 1000.25 / 65000.0);
        // The extremes map inside int16.
        for v in [0.0, 1000.25] {
            let s = ((v - intercept) / slope).round();
            assert!((i16::MIN as f64..=i16::MAX as f64).contains(&s), "{s}");
            assert!((s * slope + intercept - v).abs() <= slope, "{v}");
        }
        assert!(rescale_for(&[f32::NAN]).is_err());
    }
}
