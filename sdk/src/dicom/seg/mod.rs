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
//!
//! - `codes`: the coded concepts: [`Code`], [`SegmentDescription`] and the SNOMED CT codes for
//!   Cosilo's classes.
//! - `write`: [`write_seg`] and the [`AlgorithmInfo`] it records.
//! - `read`: [`read_seg`] and [`read_seg_segments`].

mod codes;
mod read;
mod write;

pub use codes::{segments_for_classes, Code, SegmentDescription};
pub use read::{read_seg, read_seg_segments};
pub use write::{write_seg, AlgorithmInfo};

/// Segmentation Storage.
const SEG_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";
