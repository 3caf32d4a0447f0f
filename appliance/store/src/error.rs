//! The store's error type: one variant per failed operation, each naming what it failed on.

use std::path::PathBuf;

use cosilo_sdk::volume::VolumeError;

/// The storage engine's own error, boxed so that its type stays inside this module.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in the dataset and model store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{dir} is not empty and is not a Cosilo store; refusing to create one there")]
    NotAStore { dir: PathBuf },
    #[error("cannot open the store at {dir}")]
    Open {
        dir: PathBuf,
        #[source]
        source: BackendError,
    },
    #[error(
        "the store at {dir} has format version {found:?}; this build of cosilo reads version {expected}"
    )]
    UnknownFormat {
        dir: PathBuf,
        found: String,
        expected: u32,
    },
    #[error("{what} {name:?} is not a valid name: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    /// The image file could not be read as a finite 3-D NIfTI volume (the message names the file).
    #[error("image refused: {reason}")]
    ReadImage { file: PathBuf, reason: VolumeError },
    /// The label file could not be read as a finite 3-D NIfTI volume (the message names the file).
    #[error("label refused: {reason}")]
    ReadLabel { file: PathBuf, reason: VolumeError },
    #[error(
        "label refused: {file}: voxel {index} has value {value}; labels must be integers 0..=255"
    )]
    LabelValue {
        file: PathBuf,
        index: usize,
        value: f32,
    },
    #[error("label {label} is not on the grid of image {image}: {reason}")]
    GridMismatch {
        image: PathBuf,
        label: PathBuf,
        reason: String,
    },
    #[error(
        "case {id} is already in the store with different {differs}; remove it first or import it under another id"
    )]
    CaseConflict { id: String, differs: String },
    #[error("case {id} is not in the store")]
    CaseNotFound { id: String },
    #[error(
        "case {id} is in the test split, which is read only by the final evaluation \
         (Store::final_evaluation), never for training, selection or stopping"
    )]
    SealedTestSplit { id: String },
    #[error("case {id} is damaged in the store: {reason}")]
    CaseCorrupt { id: String, reason: String },
    #[error("checkpoint {seq} of run {run} is damaged in the store: {reason}")]
    CheckpointCorrupt {
        run: String,
        seq: u64,
        reason: String,
    },
    #[error("cannot decode the stored {what}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode {what} for the store")]
    Encode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("store read failed ({what})")]
    Read {
        what: String,
        #[source]
        source: BackendError,
    },
    #[error("store write failed ({what})")]
    Write {
        what: String,
        #[source]
        source: BackendError,
    },
    /// The write would leave less free disk than the reserve: nothing was written.
    #[error("{what} refused, nothing written: {source}")]
    DiskReserve {
        what: String,
        #[source]
        source: cosilo_hardware::HardwareError,
    },
    #[error("cannot flush the store at {dir} to disk")]
    Flush {
        dir: PathBuf,
        #[source]
        source: BackendError,
    },
}

impl StoreError {
    /// True when the error is about the input offered to the store (a bad file, a bad name, a
    /// conflicting case) rather than about the store itself: a batch import refuses that case and
    /// goes on with the next; any other error stops it.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::InvalidName { .. }
                | StoreError::ReadImage { .. }
                | StoreError::ReadLabel { .. }
                | StoreError::LabelValue { .. }
                | StoreError::GridMismatch { .. }
                | StoreError::CaseConflict { .. }
        )
    }
}
