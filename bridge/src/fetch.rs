//! Completing a waiting series from the PACS: when a series waits as incomplete (an association
//! delivering it was aborted or cut, or it holds fewer instances than it declares), the bridge asks
//! the PACS which instances the series has (an image-level Study Root C-FIND of the original study
//! and series, whose UIDs the pseudonym table holds), and C-MOVEs to itself exactly those it does
//! not hold ([`scu::move_instances`]). The moved instances arrive through the SCP like any other,
//! are de-identified to the same pseudonyms and complete the series; the assembler then imports it
//! on its usual evidence (a released association, the declared count, contiguous slices).
//!
//! Which instances the bridge holds is decided without the pseudonym table's instance lines
//! (synced lazily): a pseudonymous UID is a keyed hash of the original
//! ([`Deidentifier::remap_uid`]), so each instance the PACS lists is hashed and looked up among
//! the spool's file names ([`held_instances`]).
//!
//! Nothing here logs or returns an original UID: errors and log lines name the pseudonymous
//! series.

use std::path::Path;

use crate::assemble::{held_instances, AssembleError};
use crate::deid::Deidentifier;
use crate::scu::{self, PeerAe, QueryFilter, QueryLevel, ScuError};

/// What one [`fetch_missing`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Instances the PACS lists for the series.
    pub at_pacs: usize,
    /// Of those, instances the bridge already held.
    pub held: usize,
    /// Instances asked for (one C-MOVE request each).
    pub requested: usize,
    /// C-MOVE sub-operations the PACS reported completed.
    pub moved: u32,
    /// C-MOVE sub-operations the PACS reported failed.
    pub failed: u32,
}

/// Why the missing instances of a series could not be fetched. No variant carries an original
/// identifier.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the bridge keeps no pseudonym table, so it cannot name series {series} to the PACS")]
    NoMapping { series: String },
    #[error("the pseudonym table does not know the original {what} of series {series}")]
    UnknownUid { what: &'static str, series: String },
    #[error("cannot list the instances of series {series} in the spool")]
    Spool {
        series: String,
        #[source]
        source: AssembleError,
    },
    #[error("the PACS {peer} did not list the instances of series {series}")]
    Query {
        peer: String,
        series: String,
        #[source]
        source: Box<ScuError>,
    },
    #[error("the PACS {peer} did not move the missing instances of series {series}")]
    Move {
        peer: String,
        series: String,
        #[source]
        source: Box<ScuError>,
    },
}

/// Asks `pacs` for the instances of the pseudonymous series `(study, series)` that the spool at
/// `spool` does not hold, and C-MOVEs them to `our_ae` (the bridge's own AE title, which the PACS
/// must know). `deid` gives the keyed hash and the pseudonym table. Blocks until the PACS has
/// finished the moves (the instances have been received and acknowledged by then).
pub fn fetch_missing(
    pacs: &PeerAe,
    our_ae: &str,
    deid: &Deidentifier,
    spool: &Path,
    study: &str,
    series: &str,
) -> Result<Fetched, FetchError> {
    let mapping = deid.mapping().ok_or_else(|| FetchError::NoMapping {
        series: series.to_string(),
    })?;
    let original = |what, uid: &str| {
        mapping
            .original_uid(uid)
            .ok_or_else(|| FetchError::UnknownUid {
                what,
                series: series.to_string(),
            })
    };
    let study_uid = original("StudyInstanceUID", study)?;
    let series_uid = original("SeriesInstanceUID", series)?;
    let filter = QueryFilter {
        study_uid: Some(study_uid.clone()),
        series_uid: Some(series_uid.clone()),
        ..Default::default()
    };
    let at_pacs =
        scu::find(pacs, QueryLevel::Image, &filter).map_err(|source| FetchError::Query {
            peer: pacs.address.clone(),
            series: series.to_string(),
            source: Box::new(source),
        })?;
    let held = held_instances(spool, study, series).map_err(|source| FetchError::Spool {
        series: series.to_string(),
        source,
    })?;
    let mut missing: Vec<String> = at_pacs
        .iter()
        .map(|m| m.sop_instance_uid.clone())
        .filter(|uid| !uid.is_empty() && !held.contains(&deid.remap_uid(uid)))
        .collect();
    missing.sort();
    missing.dedup();
    let mut out = Fetched {
        at_pacs: at_pacs.len(),
        held: at_pacs.len().saturating_sub(missing.len()),
        requested: missing.len(),
        ..Default::default()
    };
    if missing.is_empty() {
        return Ok(out);
    }
    let moved =
        scu::move_instances(pacs, &study_uid, &series_uid, &missing, our_ae).map_err(|source| {
            FetchError::Move {
                peer: pacs.address.clone(),
                series: series.to_string(),
                source: Box::new(source),
            }
        })?;
    out.moved = moved.completed;
    out.failed = moved.failed;
    Ok(out)
}
