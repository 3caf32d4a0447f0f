//! Series assembly: de-identified instances wait in the spool (`<spool>/<study>/<series>/<sop>.dcm`,
//! written durably by [`crate::scp::SpoolSink`]) until their series is complete by the evidence
//! DICOM gives, then become a volume ([`cosilo_sdk::dicom::series::read_series`]) handed to a
//! [`SeriesSink`].
//!
//! When a series is complete:
//! - no instance arrived for the quiet period (an injectable [`Clock`], so tests need not sleep)
//!   and no association is still delivering it;
//! - every association that delivered it ended with an A-RELEASE. One that was aborted, lost its
//!   connection or whose bridge was killed leaves the series **interrupted**: it waits (bounded by
//!   the incomplete wait) for a later association to complete it. The clean end is recorded in
//!   the series' folder (`.released`, with the instance count then), so a restart knows too;
//! - where every instance declares ImagesInAcquisition (0020,1002) for one acquisition, the
//!   series holds that many;
//! - the slices are contiguous along the normal with consistent spacing (the SDK refuses gaps).
//!
//! Every state has an exit, and each exit is one line at INFO or WARN:
//! - complete → handed to the sink → `done/` (kept inside the hospital, for a SEG arriving later
//!   and for write-back);
//! - interrupted or short of its declared count beyond the incomplete wait, or refused by the SDK
//!   (a gap, mixed orientations, ...) → `refused/` with a `reason.txt`;
//! - the sink failing beyond the incomplete wait → `refused/`.
//!
//! A series that starts waiting as incomplete is listed in [`PollReport::incomplete`]; with a PACS
//! configured the bridge then C-MOVEs the missing instances to itself ([`crate::fetch`]), and
//! they complete the series like a later association would.
//!
//! A later association for a series in `refused/` or `done/` is **merged** with what is there:
//! the 108th slice of a series refused for its gap completes it; a resend of an imported series
//! that holds more instances **replaces** the case ([`AssembledSeries::replaces`]); a resend that
//! adds nothing changes nothing (and says so only at DEBUG).
//!
//! A Segmentation series is a label map: once the image series it references has been imported,
//! it is read onto that series' grid ([`cosilo_sdk::dicom::seg::read_seg`]) and the image is
//! handed over again with its labels.
//!
//! `done/` is bounded by [`retention`] (age and size), which never removes a series a labelled
//! case still needs.
//!
//! Nothing here handles patient identity: the instances were de-identified before the spool, and
//! log lines name only pseudonymous UIDs and file names.

mod assembler;
mod files;
pub mod retention;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cosilo_sdk::volume::Volume;

pub use assembler::SeriesAssembler;

/// The SOP class of DICOM Segmentation Storage.
pub const SEG_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.66.4";
/// The spool's folder for refused series.
pub const REFUSED_DIR: &str = "refused";
/// The spool's folder for series handed over.
pub const DONE_DIR: &str = "done";
/// The marker a cleanly released association leaves in its series' folder.
pub const RELEASED_MARKER: &str = ".released";

/// Errors of the assembler itself (not of one series: those are refusals).
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("cannot scan the spool {path}")]
    Scan {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot move series {from} to {to}")]
    Move {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The case an [`AssembledSeries`] replaces: the same series imported before with fewer
/// instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replacement {
    /// Instances in the case being replaced.
    pub previous_instances: usize,
    /// Why, in words (kept by the store with the case).
    pub reason: String,
}

/// A complete series, de-identified, ready for the appliance's store.
#[derive(Debug, Clone)]
pub struct AssembledSeries {
    /// The case id: `<patient pseudonym>-<pseudonymous series UID>`.
    pub case_id: String,
    /// The patient pseudonym (already a keyed hash; no identifier).
    pub patient_pseudonym: String,
    /// Pseudonymous UIDs.
    pub study_uid: String,
    pub series_uid: String,
    pub modality: String,
    pub image: Volume<f32>,
    /// Labels from a SEG referencing this series, on the image's grid.
    pub labels: Option<Volume<u8>>,
    /// The SEG series the labels came from.
    pub seg_series_uid: Option<String>,
    /// Number of image instances.
    pub instances: usize,
    /// Set when this series replaces a case imported earlier from fewer of its instances.
    pub replaces: Option<Replacement>,
}

/// What a [`SeriesSink`] did with a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkOutcome {
    /// Written (or replaced) and durable.
    Stored,
    /// The same case was already there; nothing changed.
    Unchanged,
}

/// Why a [`SeriesSink`] did not take a series. Its message and sources must not carry patient
/// identifiers (the case id is a pseudonym).
#[derive(Debug, thiserror::Error)]
#[error("the store did not take case {case_id}")]
pub struct SeriesSinkError {
    pub case_id: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// Where complete series go (the appliance's store implements it).
pub trait SeriesSink: Send + Sync {
    /// Takes one series; `Ok` only once it is durable. An `Err` keeps the series in the spool,
    /// to be offered again after another quiet period (at most until the incomplete wait ends).
    fn import(&self, series: AssembledSeries) -> Result<SinkOutcome, SeriesSinkError>;
}

/// A source of monotonic time.
pub trait Clock: Send + Sync {
    /// Time since some fixed start.
    fn now(&self) -> Duration;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A clock that moves only when told to, for tests.
#[derive(Debug, Default)]
pub struct ManualClock(Mutex<Duration>);

impl ManualClock {
    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one [`SeriesAssembler::poll`] did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct PollReport {
    /// Case ids handed to the sink and stored (image-only or with labels, new or replacing).
    pub imported: Vec<String>,
    /// Of those, the case ids that replaced an earlier, less complete import.
    pub replaced: Vec<String>,
    /// Series refused, with the reason.
    pub refused: Vec<(String, String)>,
    /// Series the sink did not take this time (kept for the next poll), with its reason.
    pub deferred: Vec<(String, String)>,
    /// Series resent with nothing new (dropped from the spool, the case untouched).
    pub unchanged: Vec<String>,
    /// Series still receiving, interrupted and waiting, or waiting for their referenced series.
    pub waiting: usize,
    /// `(study, series)` of series that began waiting as incomplete in this poll (interrupted, or
    /// short of their declared count): the bridge asks the PACS for their missing instances
    /// ([`crate::fetch`]).
    pub incomplete: Vec<(String, String)>,
}

/// The SOP Instance UIDs (pseudonymous, the spool's file names) of a series held anywhere in the
/// spool: receiving, `done/` or `refused/`.
pub fn held_instances(
    spool: &std::path::Path,
    study_uid: &str,
    series_uid: &str,
) -> Result<std::collections::BTreeSet<String>, AssembleError> {
    let mut held = std::collections::BTreeSet::new();
    for base in [
        spool.to_path_buf(),
        spool.join(DONE_DIR),
        spool.join(REFUSED_DIR),
    ] {
        for f in files::dcm_files(&base.join(study_uid).join(series_uid))? {
            if let Some(stem) = f.file_stem().and_then(|s| s.to_str()) {
                held.insert(stem.to_string());
            }
        }
    }
    Ok(held)
}

/// The store's case id for a series: `<patient pseudonym>-<series UID>`.
pub fn case_id(patient_pseudonym: &str, series_uid: &str) -> String {
    let p: String = patient_pseudonym
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    if p.is_empty() {
        series_uid.to_string()
    } else {
        format!("{p}-{series_uid}")
    }
}
