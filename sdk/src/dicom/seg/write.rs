//! The SEG writer: a label volume on a source series' grid as one BINARY Segmentation Storage
//! instance (what is written is in the [module docs](super)).
//!
//! [`write_seg`] names its steps: check the inputs, choose the frames, pack their bits, derive the
//! UIDs, then put each module of the SEG IOD (SOP common and series, references, frame of
//! reference, multi-frame dimensions, image pixel, segmentation image, segments, shared and
//! per-frame functional groups) and save.

use std::path::Path;

use dicom::core::{DataElement, PrimitiveValue, Tag, VR};
use dicom::dictionary_std::tags;
use dicom::object::InMemDicomObject;

use super::codes::{Code, SegmentDescription};
use super::SEG_SOP_CLASS;
use crate::dicom::series::{SeriesVolume, SopInstance};
use crate::dicom::write::{
    code_item, put_ds, put_patient_study, put_seq, put_str, put_strs, put_us, save,
};
use crate::dicom::{plane_geometry, uid_from_seed, DicomError, PlaneGeometry};
use crate::volume::Volume;

/// The algorithm (and device) that produced a segmentation, and the new series' description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlgorithmInfo {
    /// SegmentAlgorithmName and AlgorithmName.
    pub name: String,
    /// AlgorithmVersion and SoftwareVersions.
    pub version: String,
    /// AlgorithmFamilyCodeSequence (CID 7162).
    pub family: Code,
    pub manufacturer: String,
    pub model_name: String,
    pub device_serial_number: String,
    pub series_number: i32,
    pub series_description: String,
    /// ContentLabel (CS: upper case, digits, `_`, up to 16 characters).
    pub content_label: String,
}

impl AlgorithmInfo {
    /// An AI algorithm called `name` at `version`, made by Cosilo.
    pub fn new(name: &str, version: &str) -> Self {
        AlgorithmInfo {
            name: name.into(),
            version: version.into(),
            family: Code::artificial_intelligence(),
            manufacturer: "Cosilo".into(),
            model_name: "cosilo-sdk".into(),
            device_serial_number: "0".into(),
            series_number: 300,
            series_description: format!("Segmentation by {name}"),
            content_label: "SEGMENTATION".into(),
        }
    }
}

/// Writes `labels` (on `source`'s grid) as a BINARY Segmentation Storage instance at `out`.
/// See the module docs for what is written.
pub fn write_seg(
    labels: &Volume<u8>,
    source: &SeriesVolume,
    segments: &[SegmentDescription],
    algorithm: &AlgorithmInfo,
    out: impl AsRef<Path>,
) -> Result<(), DicomError> {
    check_inputs(labels, source, segments)?;
    let g = &source.volume.geometry;
    let [nx, ny, nz] = g.dims;
    let slice_len = nx * ny;
    let frames = frames_of(labels, segments, slice_len, nz);
    let pixels = pack_bits(labels, segments, &frames, slice_len);
    let uids = SegUids::new(labels, source, algorithm);

    let mut o = InMemDicomObject::new_empty();
    put_instance_and_series(&mut o, source, algorithm, &uids);
    put_referenced_series(&mut o, source);
    put_patient_study(&mut o, &source.study);
    put_frame_of_reference(&mut o, source);
    put_dimensions(&mut o, &uids.dimension_organization);
    put_image_pixel(&mut o, [nx, ny], frames.len());
    put_segmentation_image(&mut o, algorithm);
    let segment_items = (1..)
        .zip(segments)
        .map(|(number, seg)| segment_item(number, seg, algorithm))
        .collect();
    put_seq(&mut o, tags::SEGMENT_SEQUENCE, segment_items);
    put_seq(
        &mut o,
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared_functional_groups(&plane_geometry(g, 0))],
    );
    let per_frame = frames
        .iter()
        .map(|&frame| per_frame_functional_groups(source, frame))
        .collect();
    put_seq(
        &mut o,
        tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE,
        per_frame,
    );
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OB,
        PrimitiveValue::U8(pixels.into()),
    ));
    save_creating_parent(o, out.as_ref())
}

/// Refuses labels off the source's grid, a source whose instances do not match its slices, and a
/// segment count a SEG cannot hold.
fn check_inputs(
    labels: &Volume<u8>,
    source: &SeriesVolume,
    segments: &[SegmentDescription],
) -> Result<(), DicomError> {
    let g = &source.volume.geometry;
    if labels.geometry.dims != g.dims
        || labels.data.len() != g.len()
        || !labels.geometry.same_grid(g, 1e-3)
    {
        return Err(DicomError::LabelGrid {
            labels: labels.geometry.dims,
            source_dims: g.dims,
        });
    }
    let nz = g.dims[2];
    if source.sop_instances.len() != nz {
        return Err(DicomError::Unwritable {
            reason: format!(
                "the source names {} instances for {nz} slices",
                source.sop_instances.len()
            ),
        });
    }
    if segments.is_empty() || segments.len() > u16::MAX as usize {
        return Err(DicomError::Unwritable {
            reason: format!("{} segments given; a SEG needs 1..=65535", segments.len()),
        });
    }
    Ok(())
}

/// One frame of the SEG: segment number `segment` (from 1) on source slice `slice` (from 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    segment: u16,
    slice: usize,
}

/// The frames to write, segment-major: one per segment per slice where the segment has a voxel.
/// When no segment has any voxel, a single frame of segment 1 on the first slice (a SEG needs at
/// least one frame; its pixels are all zero since segment 1's label is nowhere).
fn frames_of(
    labels: &Volume<u8>,
    segments: &[SegmentDescription],
    slice_len: usize,
    nz: usize,
) -> Vec<Frame> {
    let mut frames = Vec::new();
    for (segment, seg) in (1..).zip(segments) {
        for slice in 0..nz {
            if labels.data[slice * slice_len..(slice + 1) * slice_len].contains(&seg.label_value) {
                frames.push(Frame { segment, slice });
            }
        }
    }
    if frames.is_empty() {
        frames.push(Frame {
            segment: 1,
            slice: 0,
        });
    }
    frames
}

/// The frames' pixels, bit-packed least significant bit first, continuous across frames, padded
/// to an even length.
fn pack_bits(
    labels: &Volume<u8>,
    segments: &[SegmentDescription],
    frames: &[Frame],
    slice_len: usize,
) -> Vec<u8> {
    let mut pixels = vec![0u8; (frames.len() * slice_len).div_ceil(8)];
    for (f, frame) in frames.iter().enumerate() {
        let value = segments[frame.segment as usize - 1].label_value;
        let base = f * slice_len;
        let slice = &labels.data[frame.slice * slice_len..(frame.slice + 1) * slice_len];
        for (p, &v) in slice.iter().enumerate() {
            if v == value {
                let b = base + p;
                pixels[b / 8] |= 1 << (b % 8);
            }
        }
    }
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }
    pixels
}

/// The UIDs a SEG is given: seeded by the source series, the algorithm and a hash of the labels,
/// so the same labels give the same SEG.
struct SegUids {
    series: String,
    instance: String,
    dimension_organization: String,
}

impl SegUids {
    fn new(labels: &Volume<u8>, source: &SeriesVolume, algorithm: &AlgorithmInfo) -> Self {
        let seed = format!(
            "seg/{}/{}/{}/{}",
            source.series_uid,
            algorithm.name,
            algorithm.version,
            labels_digest(labels)
        );
        SegUids {
            series: uid_from_seed(&format!("{seed}/series")),
            instance: uid_from_seed(&format!("{seed}/instance")),
            dimension_organization: uid_from_seed(&format!("{seed}/dimension-organization")),
        }
    }
}

fn labels_digest(labels: &Volume<u8>) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(&labels.data);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// SOP common, general series, general equipment and the content date: what the instance is,
/// which study and new series it is in, and who made it.
fn put_instance_and_series(
    o: &mut InMemDicomObject,
    source: &SeriesVolume,
    algorithm: &AlgorithmInfo,
    uids: &SegUids,
) {
    put_str(o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    put_strs(o, tags::IMAGE_TYPE, VR::CS, ["DERIVED", "PRIMARY"]);
    put_str(o, tags::SOP_CLASS_UID, VR::UI, SEG_SOP_CLASS);
    put_str(o, tags::SOP_INSTANCE_UID, VR::UI, &uids.instance);
    let date = if source.study.study_date.is_empty() {
        "20260101"
    } else {
        &source.study.study_date
    };
    put_str(o, tags::SERIES_DATE, VR::DA, date);
    put_str(o, tags::CONTENT_DATE, VR::DA, date);
    put_str(o, tags::SERIES_TIME, VR::TM, "120000");
    put_str(o, tags::CONTENT_TIME, VR::TM, "120000");
    put_str(o, tags::MODALITY, VR::CS, "SEG");
    put_str(o, tags::MANUFACTURER, VR::LO, &algorithm.manufacturer);
    put_str(
        o,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &algorithm.series_description,
    );
    put_str(
        o,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &algorithm.model_name,
    );
    put_str(
        o,
        tags::DEVICE_SERIAL_NUMBER,
        VR::LO,
        &algorithm.device_serial_number,
    );
    put_str(o, tags::SOFTWARE_VERSIONS, VR::LO, &algorithm.version);
    put_str(o, tags::STUDY_INSTANCE_UID, VR::UI, &source.study_uid);
    put_str(o, tags::SERIES_INSTANCE_UID, VR::UI, &uids.series);
    put_str(
        o,
        tags::SERIES_NUMBER,
        VR::IS,
        algorithm.series_number.to_string(),
    );
    put_str(o, tags::INSTANCE_NUMBER, VR::IS, "1");
}

/// An item naming one source instance by SOP class and instance UID.
fn referenced_instance(inst: &SopInstance) -> InMemDicomObject {
    let mut r = InMemDicomObject::new_empty();
    put_str(
        &mut r,
        tags::REFERENCED_SOP_CLASS_UID,
        VR::UI,
        &inst.class_uid,
    );
    put_str(
        &mut r,
        tags::REFERENCED_SOP_INSTANCE_UID,
        VR::UI,
        &inst.instance_uid,
    );
    r
}

/// Common instance reference: the source series and every instance in it.
fn put_referenced_series(o: &mut InMemDicomObject, source: &SeriesVolume) {
    let refs = source
        .sop_instances
        .iter()
        .map(referenced_instance)
        .collect();
    let mut ref_series = InMemDicomObject::new_empty();
    put_seq(&mut ref_series, tags::REFERENCED_INSTANCE_SEQUENCE, refs);
    put_str(
        &mut ref_series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &source.series_uid,
    );
    put_seq(o, tags::REFERENCED_SERIES_SEQUENCE, vec![ref_series]);
}

/// The source's frame of reference, or one seeded from its series UID when it has none.
fn put_frame_of_reference(o: &mut InMemDicomObject, source: &SeriesVolume) {
    let for_uid = if source.frame_of_reference_uid.is_empty() {
        uid_from_seed(&format!("{}/frame-of-reference", source.series_uid))
    } else {
        source.frame_of_reference_uid.clone()
    };
    put_str(o, tags::FRAME_OF_REFERENCE_UID, VR::UI, &for_uid);
    put_str(o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
}

/// Multi-frame dimensions: segment number, then image position.
fn put_dimensions(o: &mut InMemDicomObject, dim_org: &str) {
    let mut org = InMemDicomObject::new_empty();
    put_str(&mut org, tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org);
    put_seq(o, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]);
    put_str(o, tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D");
    put_seq(
        o,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dimension_index(
                dim_org,
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            dimension_index(
                dim_org,
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "Image Position Patient",
            ),
        ],
    );
}

/// One item of the DimensionIndexSequence: attribute `pointer` inside functional group `group`.
fn dimension_index(dim_org: &str, pointer: Tag, group: Tag, label: &str) -> InMemDicomObject {
    let mut d = InMemDicomObject::new_empty();
    put_str(&mut d, tags::DIMENSION_ORGANIZATION_UID, VR::UI, dim_org);
    d.put(DataElement::new(
        tags::DIMENSION_INDEX_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![pointer].into()),
    ));
    d.put(DataElement::new(
        tags::FUNCTIONAL_GROUP_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![group].into()),
    ));
    put_str(&mut d, tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label);
    d
}

/// Image pixel module for `frames` one-bit frames of `cols × rows`.
fn put_image_pixel(o: &mut InMemDicomObject, [cols, rows]: [usize; 2], frames: usize) {
    put_us(o, tags::SAMPLES_PER_PIXEL, &[1]);
    put_str(o, tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2");
    put_str(o, tags::NUMBER_OF_FRAMES, VR::IS, frames.to_string());
    put_us(o, tags::ROWS, &[rows as u16]);
    put_us(o, tags::COLUMNS, &[cols as u16]);
    put_us(o, tags::BITS_ALLOCATED, &[1]);
    put_us(o, tags::BITS_STORED, &[1]);
    put_us(o, tags::HIGH_BIT, &[0]);
    put_us(o, tags::PIXEL_REPRESENTATION, &[0]);
    put_str(o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
}

/// Segmentation image module: content identification and the segmentation type.
fn put_segmentation_image(o: &mut InMemDicomObject, algorithm: &AlgorithmInfo) {
    put_str(
        o,
        tags::CONTENT_LABEL,
        VR::CS,
        content_label(&algorithm.content_label),
    );
    put_str(
        o,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        &algorithm.series_description,
    );
    put_str(o, tags::CONTENT_CREATOR_NAME, VR::PN, "");
    put_str(o, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
}

/// `s` as a code string of at most 16 characters (upper case, digits, space, else `_`);
/// `SEGMENTATION` when nothing is left.
fn content_label(s: &str) -> String {
    let v: String = s
        .chars()
        .map(|c| c.to_ascii_uppercase())
        .map(|c| {
            if c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    if v.trim().is_empty() {
        "SEGMENTATION".into()
    } else {
        v
    }
}

/// An item of a code sequence holding `code`.
fn coded(code: &Code) -> InMemDicomObject {
    code_item(&code.value, &code.scheme, &code.meaning)
}

/// One item of the SegmentSequence: segment `number`, what it is, and the algorithm that made it.
fn segment_item(
    number: u16,
    seg: &SegmentDescription,
    algorithm: &AlgorithmInfo,
) -> InMemDicomObject {
    let mut i = InMemDicomObject::new_empty();
    put_seq(
        &mut i,
        tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
        vec![coded(&seg.category)],
    );
    put_us(&mut i, tags::SEGMENT_NUMBER, &[number]);
    put_str(&mut i, tags::SEGMENT_LABEL, VR::LO, &seg.label);
    put_str(&mut i, tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC");
    put_str(
        &mut i,
        tags::SEGMENT_ALGORITHM_NAME,
        VR::LO,
        &algorithm.name,
    );
    let mut alg = InMemDicomObject::new_empty();
    put_seq(
        &mut alg,
        tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
        vec![coded(&algorithm.family)],
    );
    put_str(
        &mut alg,
        tags::ALGORITHM_VERSION,
        VR::LO,
        &algorithm.version,
    );
    put_str(&mut alg, tags::ALGORITHM_NAME, VR::LO, &algorithm.name);
    put_seq(
        &mut i,
        tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
        vec![alg],
    );
    put_seq(
        &mut i,
        tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE,
        vec![coded(&seg.property_type)],
    );
    i
}

/// The shared functional groups: plane orientation and pixel measures (every frame is on the
/// source's grid).
fn shared_functional_groups(plane0: &PlaneGeometry) -> InMemDicomObject {
    let mut measures = InMemDicomObject::new_empty();
    put_ds(
        &mut measures,
        tags::SLICE_THICKNESS,
        &[plane0.slice_step_mm],
    );
    put_ds(
        &mut measures,
        tags::SPACING_BETWEEN_SLICES,
        &[plane0.slice_step_mm],
    );
    put_ds(&mut measures, tags::PIXEL_SPACING, &plane0.pixel_spacing);
    let mut orientation = InMemDicomObject::new_empty();
    put_ds(
        &mut orientation,
        tags::IMAGE_ORIENTATION_PATIENT,
        &plane0.orientation,
    );
    let mut shared = InMemDicomObject::new_empty();
    put_seq(
        &mut shared,
        tags::PLANE_ORIENTATION_SEQUENCE,
        vec![orientation],
    );
    put_seq(&mut shared, tags::PIXEL_MEASURES_SEQUENCE, vec![measures]);
    shared
}

/// One frame's functional groups: derivation from its source slice, frame content (dimension
/// index values), plane position and segment identification.
fn per_frame_functional_groups(source: &SeriesVolume, frame: Frame) -> InMemDicomObject {
    let Frame { segment, slice: k } = frame;
    let mut content = InMemDicomObject::new_empty();
    content.put(DataElement::new(
        tags::DIMENSION_INDEX_VALUES,
        VR::UL,
        PrimitiveValue::U32(vec![segment as u32, k as u32 + 1].into()),
    ));
    let mut position = InMemDicomObject::new_empty();
    let ipp = source
        .positions
        .get(k)
        .copied()
        .unwrap_or_else(|| plane_geometry(&source.volume.geometry, k).position);
    put_ds(&mut position, tags::IMAGE_POSITION_PATIENT, &ipp);
    let mut ident = InMemDicomObject::new_empty();
    put_us(&mut ident, tags::REFERENCED_SEGMENT_NUMBER, &[segment]);
    let mut f = InMemDicomObject::new_empty();
    put_seq(
        &mut f,
        tags::DERIVATION_IMAGE_SEQUENCE,
        vec![derivation_item(&source.sop_instances[k])],
    );
    put_seq(&mut f, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
    put_seq(&mut f, tags::PLANE_POSITION_SEQUENCE, vec![position]);
    put_seq(&mut f, tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![ident]);
    f
}

/// A DerivationImageSequence item: segmentation of source instance `inst`, on its exact grid.
fn derivation_item(inst: &SopInstance) -> InMemDicomObject {
    let mut src = referenced_instance(inst);
    // The SEG frame is on the source slice's exact grid.
    put_str(&mut src, tags::SPATIAL_LOCATIONS_PRESERVED, VR::CS, "YES");
    put_seq(
        &mut src,
        tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
        vec![code_item(
            "121322",
            "DCM",
            "Source image for image processing operation",
        )],
    );
    let mut derivation = InMemDicomObject::new_empty();
    put_seq(
        &mut derivation,
        tags::DERIVATION_CODE_SEQUENCE,
        vec![code_item("113076", "DCM", "Segmentation")],
    );
    put_seq(&mut derivation, tags::SOURCE_IMAGE_SEQUENCE, vec![src]);
    derivation
}

/// Saves `o` at `out`, creating its parent folder first.
fn save_creating_parent(o: InMemDicomObject, out: &Path) -> Result<(), DicomError> {
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| DicomError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    save(o, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_labels_are_valid_code_strings() {
        assert_eq!(content_label("brain-unet v1"), "BRAIN_UNET V1");
        assert_eq!(
            content_label("a_very_long_content_label"),
            "A_VERY_LONG_CONT"
        );
        assert_eq!(content_label(""), "SEGMENTATION");
    }
}
