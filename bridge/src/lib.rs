//! # cosilo-bridge
//!
//! The PACS bridge: receives DICOM from the hospital's PACS (C-STORE, query/retrieve), de-identifies
//! it, assembles series into volumes with their geometry ([`cosilo_sdk::volume::Volume`]), reads
//! labels (DICOM SEG, NIfTI) and writes results back to the PACS as DICOM SEG.
//!
//! Its capability is tracked by its own issue (PACS bridge); until then the appliance imports
//! NIfTI pairs. This crate already fixes the boundary: the bridge hands the appliance volumes in
//! the SDK's types, and never the other way round.

pub use cosilo_sdk::volume::{Geometry, Volume};
