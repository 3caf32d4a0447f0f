//! # cosilo-sdk
//!
//! The host library that clinical applications link to run a Cosilo segmentation model.
//!
//! - [`volume`]: volumes with their world geometry, NIfTI-1 in and out.
//! - [`bundle`]: the exported model bundle (`model.onnx` + `manifest.json`) and its manifest.
//!
//! The SDK never depends on the appliance: a bundle is the only thing that passes between them.

pub mod volume;

pub use volume::{Geometry, Volume, VolumeError};
