//! # cosilo-lab
//!
//! Experiment tooling: what turns real anatomy from the package registries into multi-hospital
//! cohorts, the DICOM data the bridge tests and demos send, and the pictures people compare.
//! Nothing here runs on an appliance in production.
//!
//! Module map:
//! - [`fetch`]: obtains the real anatomy (registry packages) into a checksummed cache outside git.
//! - [`cohort`]: builds deterministic multi-hospital cohorts (real anatomy, simulated tumours and
//!   scanner looks) as NIfTI image/label pairs with a manifest and per-hospital montages.
//! - [`dicom_data`]: `cosilo data dicom`: the real CT and a cohort case as DICOM image series.
//! - [`plot`]: PNG images (cohort montages) for people to look at.
//! - [`chart`]: SVG line charts (training curves, method comparisons).

pub mod chart;
pub mod cohort;
pub mod dicom_data;
pub mod fetch;
pub mod plot;
