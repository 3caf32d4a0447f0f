//! DICOM Segmentation (SEG) objects: a label volume on a source series' grid written as a BINARY
//! Segmentation Storage instance, and SEGs (binary or fractional) read back onto that grid.
//!
//! [`write_seg`] writes one segment per [`SegmentDescription`] (segment numbers 1, 2, … in the
//! order given; segment `n` is the voxels equal to that description's `label_value`), one frame per
//! segment per source slice where the segment has a voxel (frames ordered by segment, then slice),
//! bit-packed pixel data, the source's patient, study and frame of reference, a new series, and
//! references back to every source instance (ReferencedSeriesSequence, and per frame a
//! DerivationImageSequence → SourceImageSequence naming the slice's SOP instance). When no segment
//! has any voxel a single all-zero frame of segment 1 on the first slice is written, since a SEG
//! needs at least one frame. Plane orientation and pixel measures are shared functional groups;
//! plane position, segment identification and frame content (dimension index values: segment
//! number, then slice number from 1) are per frame. Its series and instance UIDs are
//! [`super::uid_from_seed`] of the source series UID, the algorithm and a hash of the labels, so
//! the same labels give the same SEG.
//!
//! [`read_seg`] maps each frame to a source slice by the ReferencedSOPInstanceUID in its
//! DerivationImageSequence when that names an instance of the source, otherwise by its
//! ImagePositionPatient (within 1 % of the slice spacing, at least 0.01 mm). A FRACTIONAL frame
//! sets a voxel where its value is at least half the MaximumFractionalValue. The result's voxel
//! value is the segment number; where segments overlap the higher segment number wins. Only
//! natively encoded (uncompressed) SEG pixel data is read.

use std::collections::HashMap;
use std::path::Path;

use dicom::core::{DataElement, PrimitiveValue, Tag, VR};
use dicom::dictionary_std::tags;
use dicom::object::InMemDicomObject;

use super::series::{dot, fixed, floats, int, orientation_axes, text, SeriesVolume};
use super::write::{
    code_item, put_ds, put_patient_study, put_seq, put_str, put_strs, put_us, save,
};
use super::{plane_geometry, uid_from_seed, DicomError};
use crate::volume::Volume;

/// A coded concept (code value, coding scheme designator, code meaning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Code {
    pub value: String,
    pub scheme: String,
    pub meaning: String,
}

impl Code {
    /// A code in any scheme.
    pub fn new(value: &str, scheme: &str, meaning: &str) -> Self {
        Code {
            value: value.into(),
            scheme: scheme.into(),
            meaning: meaning.into(),
        }
    }

    /// A SNOMED CT code (scheme designator `SCT`).
    pub fn sct(value: &str, meaning: &str) -> Self {
        Code::new(value, "SCT", meaning)
    }

    /// SCT 85756007 Tissue (a segmented property category).
    pub fn tissue() -> Self {
        Code::sct("85756007", "Tissue")
    }

    /// SCT 49755003 Morphologically Abnormal Structure (a segmented property category).
    pub fn morphologically_abnormal_structure() -> Self {
        Code::sct("49755003", "Morphologically Abnormal Structure")
    }

    /// SCT 91723000 Anatomical Structure (a segmented property category).
    pub fn anatomical_structure() -> Self {
        Code::sct("91723000", "Anatomical Structure")
    }

    /// DCM 123110 Artificial Intelligence (CID 7162 algorithm family).
    pub fn artificial_intelligence() -> Self {
        Code::new("123110", "DCM", "Artificial Intelligence")
    }
}

/// One segment of a SEG: which label value it is, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDescription {
    /// The voxels of the label volume with this value form the segment.
    pub label_value: u8,
    /// SegmentLabel (LO, up to 64 characters).
    pub label: String,
    /// SegmentedPropertyCategoryCodeSequence.
    pub category: Code,
    /// SegmentedPropertyTypeCodeSequence.
    pub property_type: Code,
}

impl SegmentDescription {
    /// A segment from a class name, with SNOMED CT codes for the classes Cosilo's cohorts use
    /// (`csf`, `grey_matter`, `white_matter`, `tumour*`, `brain`); any other name is coded as
    /// Tissue / Tissue.
    pub fn for_class(label_value: u8, name: &str) -> Self {
        let lower = name.to_ascii_lowercase();
        let (category, property_type) = if lower.contains("tumour") || lower.contains("tumor") {
            (
                Code::morphologically_abnormal_structure(),
                Code::sct("108369006", "Neoplasm"),
            )
        } else if lower == "csf" || lower.contains("cerebrospinal") {
            (Code::tissue(), Code::sct("65216001", "Cerebrospinal Fluid"))
        } else if lower.starts_with("grey") || lower.starts_with("gray") {
            (Code::tissue(), Code::sct("389081007", "Gray Matter"))
        } else if lower.starts_with("white") {
            (Code::tissue(), Code::sct("389080008", "White Matter"))
        } else if lower == "brain" {
            (Code::anatomical_structure(), Code::sct("12738006", "Brain"))
        } else {
            (Code::tissue(), Code::tissue())
        };
        SegmentDescription {
            label_value,
            label: name.chars().take(64).collect(),
            category,
            property_type,
        }
    }
}

/// One segment per non-background class of a bundle (every class whose label value is not 0), in
/// manifest order, coded as [`SegmentDescription::for_class`] does.
pub fn segments_for_classes(classes: &[crate::bundle::ClassSpec]) -> Vec<SegmentDescription> {
    classes
        .iter()
        .filter(|c| c.label != 0)
        .map(|c| SegmentDescription::for_class(c.label, &c.name))
        .collect()
}

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

const SEG_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";

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

fn labels_digest(labels: &Volume<u8>) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(&labels.data);
    d.iter().take(8).map(|b| format!("{b:02x}")).collect()
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
    let out = out.as_ref();
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
    let [nx, ny, nz] = g.dims;
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
    let slice_len = nx * ny;
    // Frames: (segment number, slice), segment-major.
    let mut frames: Vec<(u16, usize)> = Vec::new();
    for (s, seg) in segments.iter().enumerate() {
        for k in 0..nz {
            if labels.data[k * slice_len..(k + 1) * slice_len].contains(&seg.label_value) {
                frames.push((s as u16 + 1, k));
            }
        }
    }
    let empty = frames.is_empty();
    if empty {
        frames.push((1, 0));
    }
    // Bit-packed, least significant bit first, continuous across frames.
    let mut pixels = vec![0u8; (frames.len() * slice_len).div_ceil(8)];
    if !empty {
        for (f, &(s, k)) in frames.iter().enumerate() {
            let value = segments[s as usize - 1].label_value;
            let base = f * slice_len;
            for (p, &v) in labels.data[k * slice_len..(k + 1) * slice_len]
                .iter()
                .enumerate()
            {
                if v == value {
                    let b = base + p;
                    pixels[b / 8] |= 1 << (b % 8);
                }
            }
        }
    }
    if pixels.len() % 2 == 1 {
        pixels.push(0);
    }

    let seed = format!(
        "seg/{}/{}/{}/{}",
        source.series_uid,
        algorithm.name,
        algorithm.version,
        labels_digest(labels)
    );
    let series_uid = uid_from_seed(&format!("{seed}/series"));
    let instance_uid = uid_from_seed(&format!("{seed}/instance"));
    let plane0 = plane_geometry(g, 0);

    let mut o = InMemDicomObject::new_empty();
    put_str(&mut o, tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192");
    put_strs(&mut o, tags::IMAGE_TYPE, VR::CS, ["DERIVED", "PRIMARY"]);
    put_str(&mut o, tags::SOP_CLASS_UID, VR::UI, SEG_SOP_CLASS);
    put_str(&mut o, tags::SOP_INSTANCE_UID, VR::UI, &instance_uid);
    let date = if source.study.study_date.is_empty() {
        "20260101".to_string()
    } else {
        source.study.study_date.clone()
    };
    put_str(&mut o, tags::SERIES_DATE, VR::DA, &date);
    put_str(&mut o, tags::CONTENT_DATE, VR::DA, &date);
    put_str(&mut o, tags::SERIES_TIME, VR::TM, "120000");
    put_str(&mut o, tags::CONTENT_TIME, VR::TM, "120000");
    put_str(&mut o, tags::MODALITY, VR::CS, "SEG");
    put_str(&mut o, tags::MANUFACTURER, VR::LO, &algorithm.manufacturer);
    put_str(
        &mut o,
        tags::SERIES_DESCRIPTION,
        VR::LO,
        &algorithm.series_description,
    );
    put_str(
        &mut o,
        tags::MANUFACTURER_MODEL_NAME,
        VR::LO,
        &algorithm.model_name,
    );
    // Common Instance Reference: every source instance.
    let mut refs = Vec::with_capacity(nz);
    for inst in &source.sop_instances {
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
        refs.push(r);
    }
    let mut ref_series = InMemDicomObject::new_empty();
    put_seq(&mut ref_series, tags::REFERENCED_INSTANCE_SEQUENCE, refs);
    put_str(
        &mut ref_series,
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        &source.series_uid,
    );
    put_seq(&mut o, tags::REFERENCED_SERIES_SEQUENCE, vec![ref_series]);
    put_patient_study(&mut o, &source.study);
    put_str(
        &mut o,
        tags::DEVICE_SERIAL_NUMBER,
        VR::LO,
        &algorithm.device_serial_number,
    );
    put_str(&mut o, tags::SOFTWARE_VERSIONS, VR::LO, &algorithm.version);
    put_str(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, &source.study_uid);
    put_str(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, &series_uid);
    put_str(
        &mut o,
        tags::SERIES_NUMBER,
        VR::IS,
        algorithm.series_number.to_string(),
    );
    put_str(&mut o, tags::INSTANCE_NUMBER, VR::IS, "1");
    let for_uid = if source.frame_of_reference_uid.is_empty() {
        uid_from_seed(&format!("{}/frame-of-reference", source.series_uid))
    } else {
        source.frame_of_reference_uid.clone()
    };
    put_str(&mut o, tags::FRAME_OF_REFERENCE_UID, VR::UI, &for_uid);
    put_str(&mut o, tags::POSITION_REFERENCE_INDICATOR, VR::LO, "");
    // Multi-frame dimensions: segment number, then image position.
    let dim_org = uid_from_seed(&format!("{seed}/dimension-organization"));
    let mut org = InMemDicomObject::new_empty();
    put_str(&mut org, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_org);
    put_seq(&mut o, tags::DIMENSION_ORGANIZATION_SEQUENCE, vec![org]);
    put_str(&mut o, tags::DIMENSION_ORGANIZATION_TYPE, VR::CS, "3D");
    let dim = |pointer: Tag, group: Tag, label: &str| {
        let mut d = InMemDicomObject::new_empty();
        put_str(&mut d, tags::DIMENSION_ORGANIZATION_UID, VR::UI, &dim_org);
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
    };
    put_seq(
        &mut o,
        tags::DIMENSION_INDEX_SEQUENCE,
        vec![
            dim(
                tags::REFERENCED_SEGMENT_NUMBER,
                tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                "Segment Number",
            ),
            dim(
                tags::IMAGE_POSITION_PATIENT,
                tags::PLANE_POSITION_SEQUENCE,
                "Image Position Patient",
            ),
        ],
    );
    put_us(&mut o, tags::SAMPLES_PER_PIXEL, &[1]);
    put_str(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    put_str(
        &mut o,
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        frames.len().to_string(),
    );
    put_us(&mut o, tags::ROWS, &[ny as u16]);
    put_us(&mut o, tags::COLUMNS, &[nx as u16]);
    put_us(&mut o, tags::BITS_ALLOCATED, &[1]);
    put_us(&mut o, tags::BITS_STORED, &[1]);
    put_us(&mut o, tags::HIGH_BIT, &[0]);
    put_us(&mut o, tags::PIXEL_REPRESENTATION, &[0]);
    put_str(&mut o, tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00");
    put_str(
        &mut o,
        tags::CONTENT_LABEL,
        VR::CS,
        content_label(&algorithm.content_label),
    );
    put_str(
        &mut o,
        tags::CONTENT_DESCRIPTION,
        VR::LO,
        &algorithm.series_description,
    );
    put_str(&mut o, tags::CONTENT_CREATOR_NAME, VR::PN, "");
    put_str(&mut o, tags::SEGMENTATION_TYPE, VR::CS, "BINARY");
    let segment_items = segments
        .iter()
        .enumerate()
        .map(|(s, seg)| {
            let mut i = InMemDicomObject::new_empty();
            put_seq(
                &mut i,
                tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE,
                vec![code_item(
                    &seg.category.value,
                    &seg.category.scheme,
                    &seg.category.meaning,
                )],
            );
            put_us(&mut i, tags::SEGMENT_NUMBER, &[s as u16 + 1]);
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
                vec![code_item(
                    &algorithm.family.value,
                    &algorithm.family.scheme,
                    &algorithm.family.meaning,
                )],
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
                vec![code_item(
                    &seg.property_type.value,
                    &seg.property_type.scheme,
                    &seg.property_type.meaning,
                )],
            );
            i
        })
        .collect();
    put_seq(&mut o, tags::SEGMENT_SEQUENCE, segment_items);
    // Shared functional groups: orientation and pixel measures.
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
    put_seq(
        &mut o,
        tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
        vec![shared],
    );
    // Per frame: derivation, frame content, plane position, segment.
    let per_frame = frames
        .iter()
        .map(|&(s, k)| {
            let inst = &source.sop_instances[k];
            let mut src = InMemDicomObject::new_empty();
            put_str(
                &mut src,
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                &inst.class_uid,
            );
            put_str(
                &mut src,
                tags::REFERENCED_SOP_INSTANCE_UID,
                VR::UI,
                &inst.instance_uid,
            );
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
            let mut content = InMemDicomObject::new_empty();
            content.put(DataElement::new(
                tags::DIMENSION_INDEX_VALUES,
                VR::UL,
                PrimitiveValue::U32(vec![s as u32, k as u32 + 1].into()),
            ));
            let mut position = InMemDicomObject::new_empty();
            let ipp = source
                .positions
                .get(k)
                .copied()
                .unwrap_or_else(|| plane_geometry(g, k).position);
            put_ds(&mut position, tags::IMAGE_POSITION_PATIENT, &ipp);
            let mut ident = InMemDicomObject::new_empty();
            put_us(&mut ident, tags::REFERENCED_SEGMENT_NUMBER, &[s]);
            let mut f = InMemDicomObject::new_empty();
            put_seq(&mut f, tags::DERIVATION_IMAGE_SEQUENCE, vec![derivation]);
            put_seq(&mut f, tags::FRAME_CONTENT_SEQUENCE, vec![content]);
            put_seq(&mut f, tags::PLANE_POSITION_SEQUENCE, vec![position]);
            put_seq(&mut f, tags::SEGMENT_IDENTIFICATION_SEQUENCE, vec![ident]);
            f
        })
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
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| DicomError::CreateDir {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    save(o, out)
}

/// The first item of sequence `tag` in `obj`.
fn first_item(obj: &InMemDicomObject, tag: Tag) -> Option<&InMemDicomObject> {
    obj.get(tag)?.items()?.first()
}

/// Looks up a functional group's item: the frame's own, else the shared one.
fn group<'a>(
    frame: Option<&'a InMemDicomObject>,
    shared: Option<&'a InMemDicomObject>,
    tag: Tag,
) -> Option<&'a InMemDicomObject> {
    frame
        .and_then(|f| first_item(f, tag))
        .or_else(|| shared.and_then(|s| first_item(s, tag)))
}

/// Reads a BINARY or FRACTIONAL SEG onto `source`'s grid: each voxel the number of the (highest
/// numbered) segment covering it, 0 elsewhere. See the module docs for how frames are placed.
pub fn read_seg(path: impl AsRef<Path>, source: &SeriesVolume) -> Result<Volume<u8>, DicomError> {
    let path = path.as_ref();
    let not_seg = |reason: String| DicomError::NotSegmentation {
        path: path.to_path_buf(),
        reason,
    };
    let obj = dicom::object::open_file(path).map_err(|source| DicomError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let class = text(&obj, tags::SOP_CLASS_UID).unwrap_or_default();
    if class != SEG_SOP_CLASS {
        return Err(not_seg(format!("its SOP class is {class:?}")));
    }
    let seg_type = text(&obj, tags::SEGMENTATION_TYPE).unwrap_or_default();
    let fractional = match seg_type.as_str() {
        "BINARY" => false,
        "FRACTIONAL" => true,
        other => return Err(not_seg(format!("SegmentationType {other:?}"))),
    };
    let g = &source.volume.geometry;
    let [nx, ny, nz] = g.dims;
    let rows = int(&obj, tags::ROWS).unwrap_or(0) as usize;
    let cols = int(&obj, tags::COLUMNS).unwrap_or(0) as usize;
    if (cols, rows) != (nx, ny) {
        return Err(DicomError::MixedGrid {
            path: path.to_path_buf(),
            what: "columns × rows",
            expected: format!("{nx} × {ny} (the source series)"),
            found: format!("{cols} × {rows}"),
        });
    }
    let n_frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(0) as usize;
    let bits = int(&obj, tags::BITS_ALLOCATED).unwrap_or(0);
    let expected_bits = if fractional { 8 } else { 1 };
    if bits != expected_bits {
        return Err(not_seg(format!(
            "{seg_type} with BitsAllocated {bits} (expected {expected_bits})"
        )));
    }
    let max_fraction = if fractional {
        int(&obj, tags::MAXIMUM_FRACTIONAL_VALUE)
            .filter(|&m| m > 0)
            .ok_or_else(|| DicomError::MissingAttribute {
                path: path.to_path_buf(),
                attribute: "MaximumFractionalValue",
            })? as f64
    } else {
        1.0
    };
    let pixel = obj
        .get(tags::PIXEL_DATA)
        .ok_or_else(|| DicomError::MissingAttribute {
            path: path.to_path_buf(),
            attribute: "PixelData",
        })?;
    let bytes = pixel.to_bytes().map_err(|e| DicomError::PixelLayout {
        path: path.to_path_buf(),
        reason: format!(
            "only uncompressed SEG pixel data is read (transfer syntax {}): {e}",
            obj.meta().transfer_syntax().trim_end_matches('\0')
        ),
    })?;
    let slice_len = nx * ny;
    let needed = if fractional {
        n_frames * slice_len
    } else {
        (n_frames * slice_len).div_ceil(8)
    };
    if bytes.len() < needed {
        return Err(DicomError::PixelLayout {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes of pixel data for {n_frames} frames of {cols} × {rows} ({needed} needed)",
                bytes.len()
            ),
        });
    }

    // Orientation must match the source's.
    let shared = first_item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let per_frame: Vec<&InMemDicomObject> = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .map(|items| items.iter().collect())
        .unwrap_or_default();
    if per_frame.len() != n_frames {
        return Err(not_seg(format!(
            "{} per-frame functional groups for {n_frames} frames",
            per_frame.len()
        )));
    }
    let source_plane = plane_geometry(g, 0);
    let (_, _, normal) = orientation_axes(path, source_plane.orientation)?;
    let by_uid: HashMap<&str, usize> = source
        .sop_instances
        .iter()
        .enumerate()
        .map(|(k, s)| (s.instance_uid.as_str(), k))
        .collect();
    let positions: Vec<[f64; 3]> = if source.positions.len() == nz {
        source.positions.clone()
    } else {
        (0..nz).map(|k| plane_geometry(g, k).position).collect()
    };
    let tolerance = (0.01 * source_plane.slice_step_mm).max(0.01);

    let mut out = vec![0u8; g.len()];
    // Process frames in segment order so the highest segment number wins overlaps.
    let mut placed: Vec<(u16, usize, usize)> = Vec::with_capacity(n_frames);
    for (f, item) in per_frame.iter().enumerate() {
        let unmapped = |reason: String| DicomError::UnmappedFrame {
            path: path.to_path_buf(),
            frame: f + 1,
            reason,
        };
        let segment = group(Some(item), shared, tags::SEGMENT_IDENTIFICATION_SEQUENCE)
            .and_then(|i| int(i, tags::REFERENCED_SEGMENT_NUMBER))
            .filter(|&s| (1..=255).contains(&s))
            .ok_or_else(|| unmapped("no ReferencedSegmentNumber in 1..=255".into()))?
            as u16;
        if let Some(o) = group(Some(item), shared, tags::PLANE_ORIENTATION_SEQUENCE)
            .and_then(|p| floats(p, tags::IMAGE_ORIENTATION_PATIENT))
        {
            if o.len() != 6
                || o.iter()
                    .zip(&source_plane.orientation)
                    .any(|(a, b)| (a - b).abs() > 1e-3)
            {
                return Err(unmapped(format!(
                    "orientation {o:?} differs from the source's {:?}",
                    source_plane.orientation
                )));
            }
        }
        let by_reference = item
            .get(tags::DERIVATION_IMAGE_SEQUENCE)
            .and_then(|e| e.items())
            .into_iter()
            .flatten()
            .flat_map(|d| {
                d.get(tags::SOURCE_IMAGE_SEQUENCE)
                    .and_then(|e| e.items())
                    .into_iter()
                    .flatten()
            })
            .filter_map(|s| text(s, tags::REFERENCED_SOP_INSTANCE_UID))
            .find_map(|uid| by_uid.get(uid.as_str()).copied());
        let k = match by_reference {
            Some(k) => k,
            None => {
                let ipp = group(Some(item), shared, tags::PLANE_POSITION_SEQUENCE)
                    .and_then(|p| floats(p, tags::IMAGE_POSITION_PATIENT));
                let ipp: [f64; 3] = fixed(path, "ImagePositionPatient", ipp)
                    .map_err(|e| unmapped(format!("no source instance reference and {e}")))?;
                let (k, d) = positions
                    .iter()
                    .enumerate()
                    .map(|(k, p)| {
                        let d: [f64; 3] = std::array::from_fn(|a| ipp[a] - p[a]);
                        (k, dot(d, d).sqrt())
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .unwrap_or((0, f64::INFINITY));
                if d > tolerance {
                    return Err(unmapped(format!(
                        "position {ipp:?} is {d:.3} mm from the nearest source slice ({:.3} mm along the normal)",
                        dot(ipp, normal)
                    )));
                }
                k
            }
        };
        placed.push((segment, f, k));
    }
    placed.sort_by_key(|&(s, f, _)| (s, f));
    for (segment, f, k) in placed {
        let dst = &mut out[k * slice_len..(k + 1) * slice_len];
        if fractional {
            let src = &bytes[f * slice_len..(f + 1) * slice_len];
            for (o, &v) in dst.iter_mut().zip(src) {
                if v as f64 >= 0.5 * max_fraction {
                    *o = segment as u8;
                }
            }
        } else {
            let base = f * slice_len;
            for (p, o) in dst.iter_mut().enumerate() {
                let b = base + p;
                if bytes[b / 8] >> (b % 8) & 1 == 1 {
                    *o = segment as u8;
                }
            }
        }
    }
    Volume::new(g.clone(), out).map_err(|e| DicomError::PixelLayout {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The segments a SEG declares: number, label, category and type codes.
pub fn read_seg_segments(
    path: impl AsRef<Path>,
) -> Result<Vec<(u16, SegmentDescription)>, DicomError> {
    let path = path.as_ref();
    let obj = dicom::object::open_file(path).map_err(|source| DicomError::Open {
        path: path.to_path_buf(),
        source: Box::new(source),
    })?;
    let code = |i: &InMemDicomObject, tag| {
        first_item(i, tag)
            .map(|c| {
                Code::new(
                    &text(c, tags::CODE_VALUE).unwrap_or_default(),
                    &text(c, tags::CODING_SCHEME_DESIGNATOR).unwrap_or_default(),
                    &text(c, tags::CODE_MEANING).unwrap_or_default(),
                )
            })
            .unwrap_or_else(|| Code::new("", "", ""))
    };
    let items = obj
        .get(tags::SEGMENT_SEQUENCE)
        .and_then(|e| e.items())
        .ok_or_else(|| DicomError::NotSegmentation {
            path: path.to_path_buf(),
            reason: "no SegmentSequence".into(),
        })?;
    Ok(items
        .iter()
        .map(|i| {
            let n = int(i, tags::SEGMENT_NUMBER).unwrap_or(0) as u16;
            (
                n,
                SegmentDescription {
                    label_value: n.min(255) as u8,
                    label: text(i, tags::SEGMENT_LABEL).unwrap_or_default(),
                    category: code(i, tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE),
                    property_type: code(i, tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE),
                },
            )
        })
        .collect())
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

    #[test]
    fn class_names_get_snomed_codes() {
        assert_eq!(
            SegmentDescription::for_class(5, "tumour_enhancing_rim")
                .property_type
                .value,
            "108369006"
        );
        assert_eq!(
            SegmentDescription::for_class(2, "grey_matter")
                .property_type
                .value,
            "389081007"
        );
        assert_eq!(
            SegmentDescription::for_class(1, "csf").property_type.value,
            "65216001"
        );
    }
}
