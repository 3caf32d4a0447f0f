//! The test split's only door: [`FinalEvaluation`].
//!
//! Held-out data stays held out. Everything that selects or stops (early stopping, the best model,
//! IIL's patience) reads the validation split; the test split is read once per run, for its final
//! score. [`Store::load_case`] refuses a test case, and the only way to its voxels is a
//! [`FinalEvaluation`], which only [`Store::final_evaluation`] constructs (its field is private).
//! Opening one records the read durably in the store (run name → number of reads), so an
//! experiment can prove afterwards that every run read its test cases exactly once, and never
//! before its final score.

use std::collections::BTreeMap;

use super::{backend, validate_name, Case, Split, Store, StoreError};

/// Permission to read the test split for the final score of one run. Constructed only by
/// [`Store::final_evaluation`], which records the read.
#[derive(Debug)]
pub struct FinalEvaluation<'s> {
    store: &'s Store,
    run: String,
}

impl Store {
    /// Opens the test split for the final score of `run`, recording the read (and flushing the
    /// record) before any test voxel can be read.
    pub fn final_evaluation(&self, run: &str) -> Result<FinalEvaluation<'_>, StoreError> {
        validate_name("run", run)?;
        let write_err = |e: sled::Error| StoreError::Write {
            what: format!("test-split read record of run {run}"),
            source: backend(e),
        };
        self.test_reads
            .update_and_fetch(run.as_bytes(), |old| {
                let n = old.map_or(0, decode_count);
                Some((n + 1).to_le_bytes().to_vec())
            })
            .map_err(write_err)?;
        self.flush()?;
        Ok(FinalEvaluation {
            store: self,
            run: run.to_string(),
        })
    }

    /// How many times each run opened the test split ([`Store::final_evaluation`]).
    pub fn test_reads(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut out = BTreeMap::new();
        for item in self.test_reads.iter() {
            let (k, v) = item.map_err(|e| StoreError::Read {
                what: "test-split read records".to_string(),
                source: backend(e),
            })?;
            out.insert(String::from_utf8_lossy(&k).into_owned(), decode_count(&v));
        }
        Ok(out)
    }
}

fn decode_count(bytes: &[u8]) -> u64 {
    bytes.try_into().map(u64::from_le_bytes).unwrap_or(u64::MAX)
}

impl FinalEvaluation<'_> {
    /// The run whose final score this is.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// The store it reads.
    pub fn store(&self) -> &Store {
        self.store
    }

    /// The ids of the test cases, sorted.
    pub fn case_ids(&self) -> Result<Vec<String>, StoreError> {
        self.store.case_ids(Some(Split::Test))
    }

    /// Test case `id` with its voxels (checked against their recorded hashes). Any case of the
    /// store may be read through it.
    pub fn load_case(&self, id: &str) -> Result<Case, StoreError> {
        self.store.read_case(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Provenance;
    use cosilo_sdk::volume::{Geometry, Volume};

    fn volume_case(store: &Store, id: &str, split: Split) {
        let g = Geometry::axis_aligned([4, 3, 2], [1.0, 1.0, 2.0], [0.0; 3]);
        let image = Volume::new(g.clone(), (0..24).map(|i| i as f32).collect()).unwrap();
        let label = Volume::new(g, (0..24).map(|i| (i % 2) as u8).collect()).unwrap();
        let provenance = Provenance {
            source: "test".into(),
            image_file: format!("{id}_image"),
            label_file: format!("{id}_label"),
            hospital: "h1".into(),
            imported_at_unix: 0,
            tool_version: "test".into(),
        };
        store
            .import_volume(id, split, &image, Some(&label), provenance)
            .unwrap();
    }

    /// The test split is sealed: `load_case` refuses a test case (while it reads training and
    /// validation cases), the only way in is `final_evaluation`, and every opening is counted.
    #[test]
    fn test_cases_are_read_only_through_a_recorded_final_evaluation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s")).unwrap();
        volume_case(&store, "a-train", Split::Train);
        volume_case(&store, "b-val", Split::Validation);
        volume_case(&store, "c-test", Split::Test);

        assert!(store.load_case("a-train").is_ok());
        assert!(store.load_case("b-val").is_ok());
        let err = store.load_case("c-test").unwrap_err();
        assert!(
            matches!(err, StoreError::SealedTestSplit { ref id } if id == "c-test"),
            "{err}"
        );
        assert!(store.test_reads().unwrap().is_empty());

        let fin = store.final_evaluation("run-1").unwrap();
        assert_eq!(fin.case_ids().unwrap(), vec!["c-test".to_string()]);
        assert_eq!(fin.load_case("c-test").unwrap().meta.split, Split::Test);
        drop(fin);
        store.final_evaluation("run-2").unwrap();
        store.final_evaluation("run-2").unwrap();
        let reads = store.test_reads().unwrap();
        assert_eq!(reads.get("run-1"), Some(&1));
        assert_eq!(reads.get("run-2"), Some(&2));
        // Still sealed for everyone else afterwards.
        assert!(store.load_case("c-test").is_err());
    }

    /// The record survives reopening the store (it is flushed before any test voxel is read).
    #[test]
    fn test_read_records_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        {
            let store = Store::open(&path).unwrap();
            volume_case(&store, "c-test", Split::Test);
            store.final_evaluation("arm").unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.test_reads().unwrap().get("arm"), Some(&1));
    }
}
