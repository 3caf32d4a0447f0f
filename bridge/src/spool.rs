//! The spool: where received instances are made durable, next to its write-ahead
//! [`crate::journal`]. [`SpoolSink`] is the durable [`InstanceSink`] the SCP (or the
//! de-identifying sink in front of it) writes through.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use dicom::dictionary_std::tags;
use dicom::object::FileMetaTableBuilder;
use tracing::warn;

use crate::journal::{Journal, JournalConfig, JournalError};
use crate::scp::{Accepted, InstanceSink, ReceivedInstance, SinkError};

/// A durable [`InstanceSink`]: `<dir>/<study>/<series>/<sop>.dcm`, each a DICOM file with meta in
/// the received transfer syntax. When `accept` returns `Ok` the instance is durable (a synced
/// record in the spool's journal, `<dir>/.journal/`) and its file exists at [`SpoolSink::path_for`]
/// (written by temp file + rename; a background flusher syncs it later, and opening the sink after
/// a crash replays the journal). It refuses (A700) when the write would leave less than
/// `reserve_bytes` free on the disk. Clones share one journal.
#[derive(Debug, Clone)]
pub struct SpoolSink {
    dir: PathBuf,
    reserve: cosilo_hardware::DiskReserve,
    journal: Arc<Journal>,
}

fn journal_err(e: JournalError) -> SinkError {
    let (path, source) = e.into_parts();
    SinkError::Io { path, source }
}

impl SpoolSink {
    /// A sink writing under `dir` (created if missing); replays what a previous run left in the
    /// journal before returning.
    pub fn new(dir: impl Into<PathBuf>, reserve_bytes: u64) -> Result<SpoolSink, SinkError> {
        SpoolSink::with_journal(dir, reserve_bytes, JournalConfig::default())
    }

    /// [`SpoolSink::new`] with explicit journal sizes and timing.
    pub fn with_journal(
        dir: impl Into<PathBuf>,
        reserve_bytes: u64,
        journal: JournalConfig,
    ) -> Result<SpoolSink, SinkError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| SinkError::Io {
            path: dir.clone(),
            source,
        })?;
        let journal = Journal::open(&dir, journal).map_err(journal_err)?;
        Ok(SpoolSink {
            reserve: cosilo_hardware::DiskReserve {
                path: dir.clone(),
                reserve_bytes,
            },
            dir,
            journal: Arc::new(journal),
        })
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Instances the journal replayed into the spool when this sink opened (left by a crash).
    pub fn replayed(&self) -> usize {
        self.journal.replayed().records
    }

    /// Syncs every instance accepted so far into its own file and empties the journal (the
    /// background flusher does this within [`JournalConfig::checkpoint_after`] anyway).
    pub fn checkpoint(&self) -> Result<(), SinkError> {
        self.journal.checkpoint().map_err(journal_err)
    }

    /// Where an instance is (or would be) stored.
    pub fn path_for(&self, study_uid: &str, series_uid: &str, sop_instance_uid: &str) -> PathBuf {
        self.dir
            .join(study_uid)
            .join(series_uid)
            .join(format!("{sop_instance_uid}.dcm"))
    }
}

/// A UID safe to use as a file name: 1-64 characters of digits and dots.
fn checked_uid(what: &str, v: Option<String>) -> Result<String, SinkError> {
    let v = v.ok_or_else(|| SinkError::Refused(format!("{what} missing")))?;
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && !v.starts_with('.');
    if ok {
        Ok(v)
    } else {
        Err(SinkError::Refused(format!(
            "{what} {v:?} is not a valid UID"
        )))
    }
}

impl InstanceSink for SpoolSink {
    fn accept(&self, inst: ReceivedInstance) -> Result<Accepted, SinkError> {
        let get = |tag| {
            inst.dataset
                .element(tag)
                .ok()
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        let study = checked_uid("StudyInstanceUID", get(tags::STUDY_INSTANCE_UID))?;
        let series = checked_uid("SeriesInstanceUID", get(tags::SERIES_INSTANCE_UID))?;
        let sop = checked_uid("SOPInstanceUID", Some(inst.sop_instance_uid.clone()))?;
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid(inst.sop_class_uid.as_str())
            .media_storage_sop_instance_uid(sop.as_str())
            .transfer_syntax(inst.transfer_syntax.as_str())
            .build()
            .map_err(|e| SinkError::Refused(format!("cannot build file meta: {e}")))?;
        let mut bytes = Vec::new();
        inst.dataset
            .with_exact_meta(meta)
            .write_all(&mut bytes)
            .map_err(|e| SinkError::Refused(format!("cannot encode the instance: {e}")))?;

        let final_path = self.path_for(&study, &series, &sop);
        if let Ok(existing) = std::fs::read(&final_path) {
            if existing == bytes {
                return Ok(Accepted::Duplicate);
            }
            warn!(path = %final_path.display(), "instance received again with different content; replacing");
        }
        self.reserve.check(bytes.len() as u64).map_err(|e| {
            warn!(error = %e, "C-STORE refused by the disk reserve");
            SinkError::OutOfResources(e.to_string())
        })?;
        self.journal
            .commit(&format!("{study}/{series}/{sop}.dcm"), &bytes)
            .map_err(journal_err)?;
        Ok(Accepted::Stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dimse::Status;
    use dicom::core::{DataElement, PrimitiveValue, VR};
    use dicom::object::InMemDicomObject;

    fn instance(study: &str, sop: &str) -> ReceivedInstance {
        let mut ds = InMemDicomObject::new_empty();
        ds.put(DataElement::new(
            tags::SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
        ));
        ds.put(DataElement::new(
            tags::SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop),
        ));
        ds.put(DataElement::new(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(study),
        ));
        ds.put(DataElement::new(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from("1.2.3.2"),
        ));
        ReceivedInstance {
            calling_ae: "T".into(),
            sop_class_uid: "1.2.840.10008.5.1.4.1.1.2".into(),
            sop_instance_uid: sop.into(),
            transfer_syntax: "1.2.840.10008.1.2.1".into(),
            dataset: ds,
        }
    }

    #[test]
    fn spool_sink_stores_once_then_reports_duplicates() {
        let d = tempfile::tempdir().unwrap();
        let sink = SpoolSink::new(d.path(), 0).unwrap();
        assert_eq!(
            sink.accept(instance("1.2.3", "1.2.3.4")).unwrap(),
            Accepted::Stored
        );
        assert_eq!(
            sink.accept(instance("1.2.3", "1.2.3.4")).unwrap(),
            Accepted::Duplicate
        );
        let p = sink.path_for("1.2.3", "1.2.3.2", "1.2.3.4");
        let back = dicom::object::open_file(&p).unwrap();
        assert_eq!(
            back.meta()
                .media_storage_sop_instance_uid()
                .trim_end_matches('\0'),
            "1.2.3.4"
        );
        // No temp files left behind.
        let left: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn spool_sink_refuses_path_like_uids_and_a_full_disk() {
        let d = tempfile::tempdir().unwrap();
        let sink = SpoolSink::new(d.path(), 0).unwrap();
        assert!(matches!(
            sink.accept(instance("../../etc", "1.2")),
            Err(SinkError::Refused(_))
        ));
        let full = SpoolSink::new(d.path(), u64::MAX / 2).unwrap();
        let e = full.accept(instance("1.2.3", "1.2.3.9")).unwrap_err();
        assert!(matches!(e, SinkError::OutOfResources(_)), "{e}");
        assert_eq!(e.status(), Status::OUT_OF_RESOURCES);
        assert!(!full.path_for("1.2.3", "1.2.3.2", "1.2.3.9").exists());
    }
}
