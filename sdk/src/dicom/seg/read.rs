//! The SEG reader: a BINARY or FRACTIONAL SEG onto a source series' grid (how frames are placed is
//! in the [module docs](super)).
//!
//! [`read_seg`] names its steps: read and check the header ([`SegHeader`]), take the pixel bytes,
//! place every frame on a source slice ([`SlicePlacer`]), then paint the frames in segment order.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use dicom::core::Tag;
use dicom::dictionary_std::tags;
use dicom::object::{FileDicomObject, InMemDicomObject};

use super::codes::{Code, SegmentDescription};
use super::SEG_SOP_CLASS;
use crate::dicom::series::{dot, fixed, floats, int, open, orientation_axes, text, SeriesVolume};
use crate::dicom::{plane_geometry, DicomError};
use crate::volume::Volume;

/// Reads a BINARY or FRACTIONAL SEG onto `source`'s grid: each voxel the number of the (highest
/// numbered) segment covering it, 0 elsewhere. See the module docs for how frames are placed.
pub fn read_seg(path: impl AsRef<Path>, source: &SeriesVolume) -> Result<Volume<u8>, DicomError> {
    let path = path.as_ref();
    let obj = open(path)?;
    let g = &source.volume.geometry;
    let header = SegHeader::read(&obj, path, g.dims)?;
    let bytes = pixel_bytes(&obj, path, &header)?;

    // Orientation must match the source's.
    let shared = first_item(&obj, tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE);
    let per_frame: Vec<&InMemDicomObject> = obj
        .get(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE)
        .and_then(|e| e.items())
        .map(|items| items.iter().collect())
        .unwrap_or_default();
    if per_frame.len() != header.frames {
        return Err(not_seg(
            path,
            format!(
                "{} per-frame functional groups for {} frames",
                per_frame.len(),
                header.frames
            ),
        ));
    }
    let placer = SlicePlacer::new(path, source)?;
    // Process frames in segment order so the highest segment number wins overlaps.
    let mut placed = per_frame
        .iter()
        .enumerate()
        .map(|(f, item)| placer.place(f, item, shared))
        .collect::<Result<Vec<_>, _>>()?;
    placed.sort_by_key(|p| (p.segment, p.frame));
    let out = header.paint(&placed, &bytes, g.len());
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
    let obj = open(path)?;
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
        .ok_or_else(|| not_seg(path, "no SegmentSequence".into()))?;
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

fn not_seg(path: &Path, reason: String) -> DicomError {
    DicomError::NotSegmentation {
        path: path.to_path_buf(),
        reason,
    }
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

/// What a SEG's header says about its frames, checked against the source's grid.
struct SegHeader {
    fractional: bool,
    /// Number of frames.
    frames: usize,
    /// Columns and rows of a frame (the source's).
    cols: usize,
    rows: usize,
    /// MaximumFractionalValue of a FRACTIONAL SEG (1 for BINARY).
    max_fraction: f64,
}

impl SegHeader {
    /// Checks the SOP class, segmentation type, frame size and bits allocated of the SEG `obj`
    /// against the source's `[columns, rows, slices]`.
    fn read(obj: &InMemDicomObject, path: &Path, dims: [usize; 3]) -> Result<Self, DicomError> {
        let class = text(obj, tags::SOP_CLASS_UID).unwrap_or_default();
        if class != SEG_SOP_CLASS {
            return Err(not_seg(path, format!("its SOP class is {class:?}")));
        }
        let seg_type = text(obj, tags::SEGMENTATION_TYPE).unwrap_or_default();
        let fractional = match seg_type.as_str() {
            "BINARY" => false,
            "FRACTIONAL" => true,
            other => return Err(not_seg(path, format!("SegmentationType {other:?}"))),
        };
        let [nx, ny, _] = dims;
        let rows = int(obj, tags::ROWS).unwrap_or(0) as usize;
        let cols = int(obj, tags::COLUMNS).unwrap_or(0) as usize;
        if (cols, rows) != (nx, ny) {
            return Err(DicomError::MixedGrid {
                path: path.to_path_buf(),
                what: "columns × rows",
                expected: format!("{nx} × {ny} (the source series)"),
                found: format!("{cols} × {rows}"),
            });
        }
        let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(0) as usize;
        let bits = int(obj, tags::BITS_ALLOCATED).unwrap_or(0);
        let expected_bits = if fractional { 8 } else { 1 };
        if bits != expected_bits {
            return Err(not_seg(
                path,
                format!("{seg_type} with BitsAllocated {bits} (expected {expected_bits})"),
            ));
        }
        let max_fraction = if fractional {
            int(obj, tags::MAXIMUM_FRACTIONAL_VALUE)
                .filter(|&m| m > 0)
                .ok_or_else(|| DicomError::MissingAttribute {
                    path: path.to_path_buf(),
                    attribute: "MaximumFractionalValue",
                })? as f64
        } else {
            1.0
        };
        Ok(SegHeader {
            fractional,
            frames,
            cols,
            rows,
            max_fraction,
        })
    }

    /// Pixels in one frame.
    fn slice_len(&self) -> usize {
        self.cols * self.rows
    }

    /// Bytes of pixel data the frames need.
    fn bytes_needed(&self) -> usize {
        if self.fractional {
            self.frames * self.slice_len()
        } else {
            (self.frames * self.slice_len()).div_ceil(8)
        }
    }

    /// The label volume (`len` voxels): each placed frame, in the order given, sets its segment
    /// number where it is set (FRACTIONAL: at least half the maximum fractional value).
    fn paint(&self, placed: &[PlacedFrame], bytes: &[u8], len: usize) -> Vec<u8> {
        let slice_len = self.slice_len();
        let mut out = vec![0u8; len];
        for p in placed {
            let (f, k) = (p.frame, p.slice);
            let dst = &mut out[k * slice_len..(k + 1) * slice_len];
            if self.fractional {
                let src = &bytes[f * slice_len..(f + 1) * slice_len];
                for (o, &v) in dst.iter_mut().zip(src) {
                    if v as f64 >= 0.5 * self.max_fraction {
                        *o = p.segment as u8;
                    }
                }
            } else {
                let base = f * slice_len;
                for (i, o) in dst.iter_mut().enumerate() {
                    let b = base + i;
                    if bytes[b / 8] >> (b % 8) & 1 == 1 {
                        *o = p.segment as u8;
                    }
                }
            }
        }
        out
    }
}

/// The SEG's pixel data (natively encoded only), checked to hold every frame.
fn pixel_bytes<'o>(
    obj: &'o FileDicomObject<InMemDicomObject>,
    path: &Path,
    header: &SegHeader,
) -> Result<Cow<'o, [u8]>, DicomError> {
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
    let needed = header.bytes_needed();
    if bytes.len() < needed {
        return Err(DicomError::PixelLayout {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes of pixel data for {} frames of {} × {} ({needed} needed)",
                bytes.len(),
                header.frames,
                header.cols,
                header.rows
            ),
        });
    }
    Ok(bytes)
}

/// A frame placed on the source: frame index `frame` (from 0) of segment `segment` lies on source
/// slice `slice`.
#[derive(Debug, Clone, Copy)]
struct PlacedFrame {
    segment: u16,
    frame: usize,
    slice: usize,
}

/// Places SEG frames on a source series' slices: by the source instance a frame's derivation
/// names, else by its position (within 1 % of the slice spacing, at least 0.01 mm).
struct SlicePlacer<'a> {
    path: &'a Path,
    /// ImageOrientationPatient of the source.
    orientation: [f64; 6],
    normal: [f64; 3],
    by_uid: HashMap<&'a str, usize>,
    positions: Vec<[f64; 3]>,
    tolerance: f64,
}

impl<'a> SlicePlacer<'a> {
    fn new(path: &'a Path, source: &'a SeriesVolume) -> Result<Self, DicomError> {
        let g = &source.volume.geometry;
        let nz = g.dims[2];
        let source_plane = plane_geometry(g, 0);
        let (_, _, normal) = orientation_axes(path, source_plane.orientation)?;
        let by_uid = source
            .sop_instances
            .iter()
            .enumerate()
            .map(|(k, s)| (s.instance_uid.as_str(), k))
            .collect();
        let positions = if source.positions.len() == nz {
            source.positions.clone()
        } else {
            (0..nz).map(|k| plane_geometry(g, k).position).collect()
        };
        Ok(SlicePlacer {
            path,
            orientation: source_plane.orientation,
            normal,
            by_uid,
            positions,
            tolerance: (0.01 * source_plane.slice_step_mm).max(0.01),
        })
    }

    /// Places frame `f` (from 0) whose per-frame functional groups are `item`.
    fn place(
        &self,
        f: usize,
        item: &InMemDicomObject,
        shared: Option<&InMemDicomObject>,
    ) -> Result<PlacedFrame, DicomError> {
        let unmapped = |reason: String| DicomError::UnmappedFrame {
            path: self.path.to_path_buf(),
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
                    .zip(&self.orientation)
                    .any(|(a, b)| (a - b).abs() > 1e-3)
            {
                return Err(unmapped(format!(
                    "orientation {o:?} differs from the source's {:?}",
                    self.orientation
                )));
            }
        }
        let slice = match self.by_reference(item) {
            Some(k) => k,
            None => self.by_position(item, shared).map_err(unmapped)?,
        };
        Ok(PlacedFrame {
            segment,
            frame: f,
            slice,
        })
    }

    /// The source slice whose instance the frame's DerivationImageSequence names, if any.
    fn by_reference(&self, item: &InMemDicomObject) -> Option<usize> {
        item.get(tags::DERIVATION_IMAGE_SEQUENCE)
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
            .find_map(|uid| self.by_uid.get(uid.as_str()).copied())
    }

    /// The source slice nearest the frame's ImagePositionPatient, if within the tolerance;
    /// otherwise why not.
    fn by_position(
        &self,
        item: &InMemDicomObject,
        shared: Option<&InMemDicomObject>,
    ) -> Result<usize, String> {
        let ipp = group(Some(item), shared, tags::PLANE_POSITION_SEQUENCE)
            .and_then(|p| floats(p, tags::IMAGE_POSITION_PATIENT));
        let ipp: [f64; 3] = fixed(self.path, "ImagePositionPatient", ipp)
            .map_err(|e| format!("no source instance reference and {e}"))?;
        let (k, d) = self
            .positions
            .iter()
            .enumerate()
            .map(|(k, p)| {
                let d: [f64; 3] = std::array::from_fn(|a| ipp[a] - p[a]);
                (k, dot(d, d).sqrt())
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f64::INFINITY));
        if d > self.tolerance {
            return Err(format!(
                "position {ipp:?} is {d:.3} mm from the nearest source slice ({:.3} mm along the normal)",
                dot(ipp, self.normal)
            ));
        }
        Ok(k)
    }
}
