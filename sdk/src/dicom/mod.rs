//! DICOM in and out for the SDK: a series of image instances becomes a [`crate::Volume`] with its
//! world geometry, and a label volume becomes a DICOM Segmentation (SEG) referencing that series.
//!
//! - [`series`]: instances → volume (sorting along the slice normal, geometry, rescale).
//! - [`seg`]: DICOM SEG writer and reader (binary and fractional).
//! - [`write`]: writes a volume as an image series (test data, the CT/MR demo series).

pub mod seg;
pub mod series;
pub mod write;
