//! Federation: appliances train one model together by exchanging signed weight updates over MQTT.
//! The broker is only a relay; every appliance aggregates for itself.
//!
//! - [`wire`]: the versioned message format (presence, weight-update chunks, control, metrics),
//!   signing and verification, chunking and reassembly. No MQTT types; see `docs/PROTOCOL.md`.
//! - [`keys`]: a site's Ed25519 key pair and the federation's roster of sites and public keys.
//! - [`weights`]: flat model parameters, their wire formats (f32, f16, f16+zstd) and checks.
//! - [`aggregate`]: the one streaming weighted-average kernel every strategy uses.
//! - [`fedsm`]: FedSM's SoftPull over the newest personalised models received from peers.
//! - [`link`]: the MQTT connection (the only module that names `rumqttc`).
//! - [`broker`]: the embedded MQTT broker (rumqttd) for zero-setup, one-machine federations.
//! - [`strategy`]: BrainTorrent, gossip-avg, FedAvg, CIIL/IIL and local-only, as state machines,
//!   and the [`strategy::StrategyKind`] a site configuration names.
//!
//! This crate depends on neither candle nor sled: weights are flat `f32` vectors with a layout
//! (the training crate converts), and the daemon that drives a strategy lives in the appliance.

pub mod aggregate;
pub mod broker;
pub mod fedsm;
pub mod keys;
pub mod link;
pub mod strategy;
pub mod weights;
pub mod wire;
