//! The appliance side of the PACS bridge: complete, de-identified series from
//! [`cosilo_bridge::assemble`] become cases in the site's [`Store`].
//!
//! An image-only series becomes an [`Split::Unlabelled`] case; when a SEG referencing it arrives,
//! the same case is stored again with its labels in the [`Split::Train`] split. A series the
//! bridge re-assembled with more instances ([`AssembledSeries::replaces`]) replaces the case in
//! one transaction, with the reason kept in the case's history. Case ids are the pseudonymous
//! `<patient>-<series UID>` the bridge made; nothing identifying reaches the store.

use std::time::{SystemTime, UNIX_EPOCH};

use cosilo_bridge::assemble::{AssembledSeries, SeriesSink, SeriesSinkError, SinkOutcome};

use cosilo_store::{ImportOutcome, Provenance, Split, Store};

/// Imports the bridge's series into a store, naming `hospital` in each case's provenance.
#[derive(Debug, Clone)]
pub struct StoreSeriesSink {
    store: Store,
    hospital: String,
}

impl StoreSeriesSink {
    /// A sink into `store`.
    pub fn new(store: Store, hospital: impl Into<String>) -> Self {
        StoreSeriesSink {
            store,
            hospital: hospital.into(),
        }
    }
}

impl SeriesSink for StoreSeriesSink {
    fn import(&self, series: AssembledSeries) -> Result<SinkOutcome, SeriesSinkError> {
        let split = if series.labels.is_some() {
            Split::Train
        } else {
            Split::Unlabelled
        };
        let provenance = Provenance {
            source: format!("dicom {}", series.modality),
            image_file: format!(
                "series {} ({} instances)",
                series.series_uid, series.instances
            ),
            label_file: series
                .seg_series_uid
                .as_deref()
                .map(|s| format!("seg series {s}"))
                .unwrap_or_default(),
            hospital: self.hospital.clone(),
            imported_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            tool_version: concat!("cosilo-appliance ", env!("CARGO_PKG_VERSION")).to_string(),
        };
        let err = |e: cosilo_store::StoreError| SeriesSinkError {
            case_id: series.case_id.clone(),
            source: Box::new(e),
        };
        let outcome = match &series.replaces {
            Some(r) => self
                .store
                .replace_volume(
                    &series.case_id,
                    split,
                    &series.image,
                    series.labels.as_ref(),
                    provenance,
                    &r.reason,
                )
                .map_err(err)?,
            None => self
                .store
                .import_volume(
                    &series.case_id,
                    split,
                    &series.image,
                    series.labels.as_ref(),
                    provenance,
                )
                .map_err(err)?,
        };
        Ok(match outcome {
            ImportOutcome::Imported => SinkOutcome::Stored,
            ImportOutcome::AlreadyPresent => SinkOutcome::Unchanged,
        })
    }
}
