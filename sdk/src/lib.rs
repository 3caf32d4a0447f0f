//! # cosilo-sdk
//!
//! The host library that clinical applications link to run a Cosilo segmentation model.
//!
//! - [`dicom`]: DICOM series in (volume with geometry), DICOM SEG out and in.
//! - [`volume`]: volumes with their world geometry, NIfTI-1 in and out.
//! - [`preprocess`]: the intensity normalisation shared with training.
//! - [`bundle`]: the exported model bundle (`model.onnx` + `manifest.json`) and its manifest.
//! - [`route`]: FedSM's site selector run through ONNX Runtime, and the rule that routes a study to
//!   the personalised or the global model.
//! - [`segment`]: [`Segmenter`] runs a bundle through ONNX Runtime: volume in, labels out on the
//!   input's geometry.
//!
//! The SDK never depends on the appliance: a bundle is the only thing that passes between them.

pub mod bundle;
pub mod dicom;
pub mod preprocess;
pub mod route;
pub mod segment;
pub mod volume;

pub use bundle::{Bundle, BundleError, Manifest};
pub use segment::{SegmentError, Segmentation, Segmenter, SegmenterOptions};
pub use volume::{Geometry, Volume, VolumeError};
