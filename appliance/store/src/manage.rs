//! Managing cases after import: replacing a case by a more complete version of the same DICOM
//! series (one transaction, the reason kept in the case's history) and reading that history.
//!
//! A replacement never touches checkpoints: a training run that used the old case keeps its
//! weights and its own record; the next run reads the new voxels.

use serde::{Deserialize, Serialize};
use sled::transaction::{abort, TransactionError, Transactional};
use sled::IVec;

use cosilo_sdk::volume::Volume;

use super::volume_import::{prepare_volume, PreparedVolume};
use super::{backend, CaseMeta, ImportOutcome, Provenance, Split, Store, StoreError};

/// The sled tree holding each case's history (JSON list of [`CaseChange`]).
const HISTORY_TREE: &str = "case_history";

/// One change to a case after its first import.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseChange {
    pub at_unix: u64,
    /// Why, in words (e.g. "series resent: 108 instances where the case had 50").
    pub reason: String,
    /// The replaced version's image and label hashes and its provenance's image description.
    pub previous_image_sha256: String,
    pub previous_label_sha256: String,
    pub previous_source: String,
}

impl Store {
    fn history_tree(&self) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(HISTORY_TREE)
            .map_err(|e| StoreError::Write {
                what: "the case history tree".to_string(),
                source: backend(e),
            })
    }

    /// Replaces case `id` by `image` (and `label`) in one transaction, appending `reason` to its
    /// history; imports it when absent. The same content as stored is `AlreadyPresent`. A
    /// labelled case is not replaced by an image without labels (`CaseConflict`): the labels
    /// would be lost. Flushed before `Imported` is returned.
    pub fn replace_volume(
        &self,
        id: &str,
        split: Split,
        image: &Volume<f32>,
        label: Option<&Volume<u8>>,
        provenance: Provenance,
        reason: &str,
    ) -> Result<ImportOutcome, StoreError> {
        let PreparedVolume {
            meta,
            meta_bytes,
            image_bytes,
            label_bytes,
        } = prepare_volume(id, split, image, label, provenance)?;
        self.check_reserve(
            format!("case {id}"),
            (meta_bytes.len() + image_bytes.len() + label_bytes.len()) as u64,
        )?;
        let history = self.history_tree()?;
        let key = id.as_bytes();
        let at_unix = meta.provenance.imported_at_unix;
        let written =
            (&self.cases, &self.images, &self.labels, &history).transaction(|(m, i, l, h)| {
                let mut changes: Vec<CaseChange> = Vec::new();
                if let Some(existing) = m.get(key)? {
                    let Ok(stored) = serde_json::from_slice::<CaseMeta>(&existing) else {
                        return abort(Refused::Unreadable);
                    };
                    if stored.image_sha256 == meta.image_sha256
                        && stored.label_sha256 == meta.label_sha256
                        && stored.split == meta.split
                    {
                        return abort(Refused::Same);
                    }
                    if stored.split != Split::Unlabelled && meta.split == Split::Unlabelled {
                        return abort(Refused::WouldDropLabels);
                    }
                    if let Some(old) = h.get(key)? {
                        changes = serde_json::from_slice(&old).unwrap_or_default();
                    }
                    changes.push(CaseChange {
                        at_unix,
                        reason: reason.to_string(),
                        previous_image_sha256: stored.image_sha256,
                        previous_label_sha256: stored.label_sha256,
                        previous_source: stored.provenance.image_file,
                    });
                }
                if !changes.is_empty() {
                    let bytes = serde_json::to_vec(&changes).unwrap_or_default();
                    h.insert(key, IVec::from(bytes))?;
                }
                m.insert(key, meta_bytes.clone())?;
                i.insert(key, image_bytes.clone())?;
                l.insert(key, label_bytes.clone())?;
                Ok(())
            });
        match written {
            Ok(()) => {
                self.flush()?;
                Ok(ImportOutcome::Imported)
            }
            Err(TransactionError::Abort(Refused::Same)) => Ok(ImportOutcome::AlreadyPresent),
            Err(TransactionError::Abort(Refused::WouldDropLabels)) => {
                Err(StoreError::CaseConflict {
                    id: id.to_string(),
                    differs: "labels (the stored case has them, the replacement has none)"
                        .to_string(),
                })
            }
            Err(TransactionError::Abort(Refused::Unreadable)) => Err(StoreError::CaseConflict {
                id: id.to_string(),
                differs: "metadata (the stored case's cannot be read)".to_string(),
            }),
            Err(TransactionError::Storage(e)) => Err(StoreError::Write {
                what: format!("replacement of case {id}"),
                source: backend(e),
            }),
        }
    }

    /// The changes made to case `id` after its first import, oldest first.
    pub fn case_history(&self, id: &str) -> Result<Vec<CaseChange>, StoreError> {
        let tree = self.history_tree()?;
        let Some(bytes) = tree.get(id.as_bytes()).map_err(|e| StoreError::Write {
            what: format!("history of case {id}"),
            source: backend(e),
        })?
        else {
            return Ok(Vec::new());
        };
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode {
            what: format!("history of case {id}"),
            source,
        })
    }
}

/// Why a replacement transaction stopped.
#[derive(Debug, Clone, Copy)]
enum Refused {
    Same,
    WouldDropLabels,
    Unreadable,
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosilo_sdk::volume::Geometry;

    fn provenance(what: &str) -> Provenance {
        Provenance {
            source: "dicom CT".into(),
            image_file: what.into(),
            label_file: String::new(),
            hospital: "h1".into(),
            imported_at_unix: 7,
            tool_version: "test".into(),
        }
    }

    #[test]
    fn a_more_complete_series_replaces_the_case_in_one_transaction_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let partial = Volume::new(
            Geometry::axis_aligned([4, 3, 2], [1.0, 1.0, 2.0], [0.0; 3]),
            (0..24).map(|i| i as f32).collect(),
        )
        .unwrap();
        let full = Volume::new(
            Geometry::axis_aligned([4, 3, 5], [1.0, 1.0, 2.0], [0.0; 3]),
            (0..60).map(|i| i as f32).collect(),
        )
        .unwrap();
        let id = "P1-2.25.9";
        store
            .import_volume(
                id,
                Split::Unlabelled,
                &partial,
                None,
                provenance("2 slices"),
            )
            .unwrap();
        // The plain import path refuses a different version of the same id...
        assert!(store
            .import_volume(id, Split::Unlabelled, &full, None, provenance("5 slices"))
            .is_err());
        // ... the replacement takes it, once.
        let why = "series resent: 5 instances where the case had 2";
        let put = || {
            store.replace_volume(
                id,
                Split::Unlabelled,
                &full,
                None,
                provenance("5 slices"),
                why,
            )
        };
        assert_eq!(put().unwrap(), ImportOutcome::Imported);
        assert_eq!(put().unwrap(), ImportOutcome::AlreadyPresent);
        let case = store.load_case(id).unwrap();
        assert_eq!(case.image.data, full.data);
        assert_eq!(case.meta.geometry.dims, [4, 3, 5]);
        let history = store.case_history(id).unwrap();
        assert_eq!(history.len(), 1, "{history:?}");
        assert_eq!(history[0].reason, why);
        assert_eq!(history[0].previous_source, "2 slices");
        assert_eq!(store.case_ids(None).unwrap(), vec![id.to_string()]);

        // A labelled case is not replaced by an image without labels.
        let label = Volume::new(full.geometry.clone(), vec![1u8; 60]).unwrap();
        store
            .replace_volume(
                id,
                Split::Train,
                &full,
                Some(&label),
                provenance("5"),
                "seg",
            )
            .unwrap();
        assert!(matches!(
            store.replace_volume(id, Split::Unlabelled, &full, None, provenance("5"), "x"),
            Err(StoreError::CaseConflict { .. })
        ));
        assert_eq!(store.load_case(id).unwrap().meta.split, Split::Train);
    }
}
