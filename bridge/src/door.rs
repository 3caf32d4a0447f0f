//! What the SCP accepts, and the checks it makes before it answers a C-STORE: the bridge says no
//! at the door, so the PACS's own log shows the truth.
//!
//! - [`STORAGE_SOP_CLASSES`] and [`TRANSFER_SYNTAXES`] are what association negotiation accepts:
//!   only what the SDK can turn into a volume (single-frame CT and MR, and SEG as a label map) in
//!   a syntax the build decodes (dicom-pixeldata's default `native` codecs: RLE, deflate, and
//!   the `jpeg-decoder` crate for JPEG baseline and lossless). JPEG Extended (4.51) is rejected:
//!   `jpeg-decoder` 0.3 refuses 12-bit sample precision, which is what CT and MR use it for.
//!   JPEG 2000, JPEG-LS and the enhanced multi-frame classes are rejected at negotiation.
//! - [`check_pixels`] runs on every parsed data set before the sink: a native pixel data element
//!   shorter than rows × columns × frames × samples × bits says the instance is unusable; an
//!   encapsulated one must decode its first frame; an image class other than SEG must have one
//!   frame. A failure becomes a C-STORE failure status (`A900`-family "cannot understand"), never
//!   a success followed by a refusal at assembly.

use dicom::dictionary_std::tags;
use dicom::object::{FileMetaTableBuilder, InMemDicomObject};
use dicom::pixeldata::PixelDecoder;

/// Verification (C-ECHO).
pub const VERIFICATION: &str = crate::dimse::VERIFICATION;
/// CT Image Storage.
pub const CT_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// MR Image Storage.
pub const MR_IMAGE: &str = "1.2.840.10008.5.1.4.1.1.4";
/// Segmentation Storage.
pub const SEGMENTATION: &str = "1.2.840.10008.5.1.4.1.1.66.4";

/// SOP classes the SCP accepts, with their names: Verification plus what becomes a volume.
pub const STORAGE_SOP_CLASSES: &[(&str, &str)] = &[
    (VERIFICATION, "Verification"),
    (CT_IMAGE, "CT Image Storage"),
    (MR_IMAGE, "MR Image Storage"),
    (SEGMENTATION, "Segmentation Storage"),
];

/// Transfer syntaxes the SCP accepts, with their names. Each is proven, with a real file sent
/// by a real peer, by `bridge/tests/net_syntaxes.rs`.
pub const TRANSFER_SYNTAXES: &[(&str, &str)] = &[
    ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),
    ("1.2.840.10008.1.2", "Implicit VR Little Endian"),
    ("1.2.840.10008.1.2.2", "Explicit VR Big Endian (retired)"),
    (
        "1.2.840.10008.1.2.1.99",
        "Deflated Explicit VR Little Endian",
    ),
    ("1.2.840.10008.1.2.5", "RLE Lossless"),
    ("1.2.840.10008.1.2.4.50", "JPEG Baseline (Process 1)"),
    (
        "1.2.840.10008.1.2.4.57",
        "JPEG Lossless, Non-Hierarchical (Process 14)",
    ),
    (
        "1.2.840.10008.1.2.4.70",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    ),
];

/// Native (uncompressed) transfer syntaxes, whose pixel data length is checked exactly.
const NATIVE: &[&str] = &[
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
];

/// Why an instance's pixels cannot be used. The message names no UID (it goes to the log).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelRefusal {
    #[error("no pixel data")]
    Missing,
    #[error("{attribute} missing or not a positive number")]
    Attribute { attribute: &'static str },
    #[error("{frames} frames in a single-frame SOP class")]
    MultiFrame { frames: u64 },
    #[error(
        "pixel data holds {found} bytes; rows × columns × frames × samples × bits need {needed}"
    )]
    Short { found: u64, needed: u64 },
    #[error("first frame undecodable: {reason} ({transfer_syntax})")]
    Undecodable {
        transfer_syntax: String,
        reason: String,
    },
}

fn number(obj: &InMemDicomObject, tag: dicom::core::Tag) -> Option<u64> {
    obj.get(tag).and_then(|e| {
        e.to_int::<i64>()
            .ok()
            .or_else(|| e.to_str().ok().and_then(|s| s.trim().parse::<i64>().ok()))
            .and_then(|v| u64::try_from(v).ok())
    })
}

/// Checks that `obj` (SOP class `sop_class`, received in `transfer_syntax`) has pixels the
/// bridge can use. Verification and non-image objects are not asked.
pub fn check_pixels(
    obj: &InMemDicomObject,
    sop_class: &str,
    sop_instance: &str,
    transfer_syntax: &str,
) -> Result<(), PixelRefusal> {
    if sop_class == VERIFICATION {
        return Ok(());
    }
    let positive = |tag, attribute| {
        number(obj, tag)
            .filter(|&v| v > 0)
            .ok_or(PixelRefusal::Attribute { attribute })
    };
    let rows = positive(tags::ROWS, "Rows")?;
    let cols = positive(tags::COLUMNS, "Columns")?;
    let bits = positive(tags::BITS_ALLOCATED, "BitsAllocated")?;
    let samples = number(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
    let frames = number(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    if frames > 1 && sop_class != SEGMENTATION {
        return Err(PixelRefusal::MultiFrame { frames });
    }
    let pixel = obj.get(tags::PIXEL_DATA).ok_or(PixelRefusal::Missing)?;
    if NATIVE.contains(&transfer_syntax) {
        let found = pixel
            .value()
            .to_bytes()
            .map(|b| b.len() as u64)
            .unwrap_or(0);
        let needed_bits = rows
            .saturating_mul(cols)
            .saturating_mul(frames)
            .saturating_mul(samples)
            .saturating_mul(bits);
        let needed = needed_bits.div_ceil(8);
        if found < needed {
            return Err(PixelRefusal::Short { found, needed });
        }
        return Ok(());
    }
    // Encapsulated: decode the first frame (the PACS learns now, not at assembly).
    let undecodable = |reason: String| PixelRefusal::Undecodable {
        transfer_syntax: transfer_syntax.to_string(),
        reason,
    };
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(transfer_syntax)
        .build()
        .map_err(|e| undecodable(e.to_string()))?;
    let file = obj.clone().with_exact_meta(meta);
    let frame = file
        .decode_pixel_data_frame(0)
        .map_err(|e| undecodable(e.to_string()))?;
    let values = frame
        .to_vec::<f32>()
        .map_err(|e| undecodable(e.to_string()))?;
    if (values.len() as u64) < rows * cols * samples {
        return Err(undecodable(format!(
            "{} values decoded for {rows} × {cols}",
            values.len()
        )));
    }
    Ok(())
}
