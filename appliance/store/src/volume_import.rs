//! Importing volumes already in memory, as the PACS bridge hands them over: an image with an
//! optional label volume on its grid.
//!
//! The checks are those of a NIfTI pair (finite voxels, the label on the image's grid, 3-D) on
//! volumes instead of files. An image-only case is stored with the [`Split::Unlabelled`] split and
//! an all-zero label; when its labels arrive later (a DICOM SEG), importing the same id again
//! with labels replaces the unlabelled case in one transaction.

use sled::transaction::{abort, TransactionError, Transactional};
use sled::IVec;

use cosilo_sdk::volume::Volume;

use super::{backend, sha256_hex, validate_name, CaseMeta, ImportOutcome, Provenance, Split};
use super::{Store, StoreError, GRID_TOLERANCE_MM};

impl Store {
    /// Stores `image` (with `label`, if given, on the same grid) as case `id`.
    ///
    /// Without a label the case must go to [`Split::Unlabelled`]; with one, to any split. An
    /// existing unlabelled case with the same id and image is replaced by a labelled import; the
    /// same content again is `AlreadyPresent`; anything else is a `CaseConflict`. Flushed to disk
    /// before `Imported` is returned.
    pub fn import_volume(
        &self,
        id: &str,
        split: Split,
        image: &Volume<f32>,
        label: Option<&Volume<u8>>,
        provenance: Provenance,
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

        let key = id.as_bytes();
        let offered = meta.clone();
        let written = (&self.cases, &self.images, &self.labels).transaction(|(m, i, l)| {
            if let Some(existing) = m.get(key)? {
                let stored: Option<CaseMeta> = serde_json::from_slice(&existing).ok();
                let upgrade = stored.as_ref().is_some_and(|s| {
                    s.split == Split::Unlabelled
                        && offered.split != Split::Unlabelled
                        && s.image_sha256 == offered.image_sha256
                });
                if !upgrade {
                    return abort(existing);
                }
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
            Err(TransactionError::Abort(existing)) => {
                let stored: CaseMeta =
                    serde_json::from_slice(&existing).map_err(|source| StoreError::Decode {
                        what: format!("metadata of case {id}"),
                        source,
                    })?;
                let same = stored.image_sha256 == meta.image_sha256
                    && stored.label_sha256 == meta.label_sha256
                    && stored.geometry.same_grid(&meta.geometry, GRID_TOLERANCE_MM);
                // A labelled case offered again without labels is already further along.
                let downgrade = meta.split == Split::Unlabelled
                    && stored.split != Split::Unlabelled
                    && stored.image_sha256 == meta.image_sha256;
                if (same && stored.split == meta.split) || downgrade {
                    Ok(ImportOutcome::AlreadyPresent)
                } else {
                    Err(StoreError::CaseConflict {
                        id: id.to_string(),
                        differs: "image or label voxels, grid or split".to_string(),
                    })
                }
            }
            Err(TransactionError::Storage(e)) => Err(StoreError::Write {
                what: format!("case {id}"),
                source: backend(e),
            }),
        }
    }
}

/// A volume checked and encoded for the store, not yet written.
pub(super) struct PreparedVolume {
    pub(super) meta: CaseMeta,
    pub(super) meta_bytes: IVec,
    pub(super) image_bytes: IVec,
    pub(super) label_bytes: IVec,
}

/// The checks of [`Store::import_volume`] (3-D, finite, the label on the image's grid, the split
/// that fits) and the encoding of what it writes. Touches nothing in the store.
pub(super) fn prepare_volume(
    id: &str,
    split: Split,
    image: &Volume<f32>,
    label: Option<&Volume<u8>>,
    provenance: Provenance,
) -> Result<PreparedVolume, StoreError> {
    validate_name("case id", id)?;
    let what = |p: &Provenance| std::path::PathBuf::from(&p.image_file);
    let image_path = what(&provenance);
    if (label.is_none()) != (split == Split::Unlabelled) {
        return Err(StoreError::InvalidName {
            what: "split",
            name: split.to_string(),
            reason: "image-only cases go to \"unlabelled\", labelled ones to train or test",
        });
    }
    let n = image.geometry.len();
    if n == 0 || image.data.len() != n {
        return Err(StoreError::GridMismatch {
            image: image_path.clone(),
            label: image_path.clone(),
            reason: format!(
                "image has {} voxels for grid {:?}",
                image.data.len(),
                image.geometry.dims
            ),
        });
    }
    if let Some((index, value)) = image.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(StoreError::LabelValue {
            file: image_path,
            index,
            value: *value,
        });
    }
    let label_bytes: Vec<u8> = match label {
        Some(l) => {
            if l.geometry.dims != image.geometry.dims
                || !l.geometry.same_grid(&image.geometry, GRID_TOLERANCE_MM)
                || l.data.len() != n
            {
                return Err(StoreError::GridMismatch {
                    image: image_path,
                    label: std::path::PathBuf::from(&provenance.label_file),
                    reason: format!(
                        "label grid {:?} is not the image grid {:?}",
                        l.geometry, image.geometry
                    ),
                });
            }
            l.data.clone()
        }
        None => vec![0u8; n],
    };
    let mut image_bytes = Vec::with_capacity(n * 4);
    for v in &image.data {
        image_bytes.extend_from_slice(&v.to_le_bytes());
    }
    let mut label_counts = Vec::new();
    for &v in &label_bytes {
        let v = usize::from(v);
        if v >= label_counts.len() {
            label_counts.resize(v + 1, 0u64);
        }
        label_counts[v] += 1;
    }
    let meta = CaseMeta {
        id: id.to_string(),
        split,
        geometry: image.geometry.clone(),
        image_sha256: sha256_hex(&image_bytes),
        label_sha256: sha256_hex(&label_bytes),
        label_counts,
        provenance,
    };
    let meta_bytes =
        IVec::from(
            serde_json::to_vec(&meta).map_err(|source| StoreError::Encode {
                what: format!("metadata of case {id}"),
                source,
            })?,
        );
    Ok(PreparedVolume {
        meta,
        meta_bytes,
        image_bytes: IVec::from(image_bytes),
        label_bytes: IVec::from(label_bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cosilo_sdk::volume::Geometry;

    fn provenance() -> Provenance {
        Provenance {
            source: "dicom".into(),
            image_file: "series 2.25.1".into(),
            label_file: String::new(),
            hospital: "site".into(),
            imported_at_unix: 0,
            tool_version: "test".into(),
        }
    }

    #[test]
    fn unlabelled_then_labelled_replaces_and_repeats_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        let g = Geometry::axis_aligned([4, 3, 2], [1.0, 1.0, 2.0], [0.0; 3]);
        let image = Volume::new(g.clone(), (0..24).map(|i| i as f32).collect()).unwrap();
        let label = Volume::new(g.clone(), (0..24).map(|i| (i % 2) as u8).collect()).unwrap();
        let put = |split, l| store.import_volume("P1-2.25.1", split, &image, l, provenance());
        assert_eq!(
            put(Split::Unlabelled, None).unwrap(),
            ImportOutcome::Imported
        );
        assert_eq!(
            put(Split::Unlabelled, None).unwrap(),
            ImportOutcome::AlreadyPresent
        );
        assert_eq!(store.stats().unwrap().unlabelled_cases, 1);
        assert!(store.case_ids(Some(Split::Train)).unwrap().is_empty());
        assert_eq!(
            put(Split::Train, Some(&label)).unwrap(),
            ImportOutcome::Imported
        );
        let case = store.load_case("P1-2.25.1").unwrap();
        assert_eq!(case.meta.split, Split::Train);
        assert_eq!(case.label.data, label.data);
        assert_eq!(case.image.data, image.data);
        // The image alone again does not undo the labels.
        assert_eq!(
            put(Split::Unlabelled, None).unwrap(),
            ImportOutcome::AlreadyPresent
        );
        assert_eq!(
            store.load_case("P1-2.25.1").unwrap().meta.split,
            Split::Train
        );
        // Labels without a split that takes them are refused.
        assert!(put(Split::Unlabelled, Some(&label)).is_err());
        // A label on another grid is refused.
        let other = Volume::new(
            Geometry::axis_aligned([4, 3, 2], [2.0, 1.0, 2.0], [0.0; 3]),
            label.data.clone(),
        )
        .unwrap();
        assert!(matches!(
            store.import_volume(
                "P2-2.25.2",
                Split::Train,
                &image,
                Some(&other),
                provenance()
            ),
            Err(StoreError::GridMismatch { .. })
        ));
    }
}
