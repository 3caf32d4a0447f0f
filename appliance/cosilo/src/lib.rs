//! # cosilo-appliance
//!
//! The composition root of a hospital's Cosilo box: the site daemon and the `cosilo` command that
//! drives it. The work itself lives in crates with one concern each (see ARCHITECTURE.md):
//! `cosilo-store` (cases and checkpoints, the only crate naming sled), `cosilo-train` (U-Net,
//! kernels, sessions, export), `cosilo-federation` (protocol, keys, strategies, MQTT; no candle,
//! no sled), `cosilo-lab` (data fetch, cohorts, charts) and `cosilo-rng`. This crate joins them.
//!
//! Module map:
//! - [`config`]: a site's typed configuration for `cosilo run` (defaults in `config/site.toml`).
//! - [`daemon`]: `cosilo run`: trainer thread + link + strategy, checkpoints, clean shutdown.
//! - [`local`]: one site's pipeline: store → training → evaluation → report.
//! - [`bridge_sink`]: the PACS bridge's complete series become store cases.
//! - [`demo`]: `cosilo demo`: three hospitals federated on one machine against local-only.
//! - [`status`]: metrics, the status page and `/status.json` on a local address; `cosilo status`.
//! - [`service`]: running under systemd: first-start keys, readiness and watchdog notifications.
//! - [`kit`]: `cosilo federation`: a declared federation's site configurations and kits.
//! - [`experiment`]: `cosilo experiment`: a plan's arms (pooled, local-only, federated) on one
//!   cohort, with a results table and curves.
//! - [`plan`]: a federation laid out in one folder (stores, keys, roster, site configurations),
//!   shared by the demo and the test harness.

pub mod bridge_sink;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod experiment;
pub mod kit;
pub mod local;
pub mod plan;
pub mod service;
pub mod status;
