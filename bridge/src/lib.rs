//! # cosilo-bridge
//!
//! The PACS bridge: receives DICOM from the hospital's PACS (C-STORE, query/retrieve), de-identifies
//! it, assembles series into volumes with their geometry ([`cosilo_sdk::volume::Volume`]), reads
//! labels (DICOM SEG, NIfTI) and writes results back to the PACS as DICOM SEG.
//!
//! Module map:
//! - [`guard`]: refuses received data sets whose declared lengths exceed the bytes received
//!   (dicom-rs would allocate them) before they are parsed.
//! - [`dimse`]: DIMSE command sets (C-ECHO, C-STORE, C-FIND, C-MOVE), built in one place.
//! - [`door`]: the SOP classes and transfer syntaxes accepted, and the pixel checks made
//!   before a C-STORE is answered.
//! - [`scp`]: the DICOM service provider (C-ECHO, C-STORE) that writes every instance to disk
//!   before acknowledging it.
//! - [`spool`]: the durable spool ([`spool::SpoolSink`]) the SCP writes through.
//! - [`journal`]: the spool's write-ahead journal (one device flush per received instance).
//! - [`scu`]: the client side: C-FIND / C-MOVE query-retrieve and C-STORE sends.
//! - [`fetch`]: completes a waiting series by C-MOVEing from the PACS exactly the instances it
//!   lacks.
//! - [`config`]: typed configuration of the network side (SCP, PACS peer, spool, outbox).
//! - [`init`]: `cosilo bridge init` (state directory, a 0600 de-identification key, a config).
//! - [`outbox`]: the persistent retry queue for results going back to the PACS.
//! - [`deid`]: PS3.15 Basic Application Level Confidentiality Profile with keyed-hash pseudonyms.
//! - [`assemble`]: groups received instances into series and declares them complete.
//! - [`pipeline`]: SCP → de-identification → spool → assembly → the appliance's store, and the
//!   outbox delivering write-back when a PACS is configured.
//! - [`writeback`]: re-identification of a segmented series (mapping store + C-FIND at the PACS)
//!   and queueing its DICOM SEG in the outbox.
//!
//! DICOM ↔ volume conversion and DICOM SEG live in the SDK ([`cosilo_sdk::dicom`]) so a clinical
//! app can use them without the bridge; the bridge never depends on the appliance.

pub mod assemble;
pub mod config;
pub mod deid;
pub mod dimse;
pub mod door;
pub mod fetch;
pub mod guard;
pub mod init;
pub mod journal;
pub mod outbox;
pub mod pipeline;
pub mod scp;
pub mod scu;
pub mod spool;
pub mod writeback;

pub use cosilo_sdk::volume::{Geometry, Volume};
