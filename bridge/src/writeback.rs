//! Write-back: results computed on de-identified data go back to the hospital's PACS, filed
//! against the PACS's own identifiers.
//!
//! The SDK segments a de-identified series (pseudonymous UIDs, pseudonymous PatientID); a DICOM SEG
//! written against that would create a stray study in the PACS. [`reidentify`] maps every UID the
//! SEG refers to (StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID, each SOPInstanceUID)
//! and the PatientID back through the bridge's [`MappingStore`]; the other patient and study
//! attributes the SEG must repeat (PatientName, PatientBirthDate, PatientSex, AccessionNumber,
//! StudyID, StudyDate, StudyTime, ReferringPhysicianName, StudyDescription) are not in the mapping
//! and come from a C-FIND of the study at the PACS ([`apply_pacs_study`], [`reidentify_at_pacs`]).
//! [`queue_seg`] writes the SEG and puts it durably in the [`Outbox`]; the bridge's poll loop
//! ([`crate::pipeline::Bridge::run`]) delivers it with retries. [`done_series_dir`] finds a case's
//! de-identified series in the spool's `done/` folder. [`write_back_case`] strings these steps
//! together for one imported case (`cosilo writeback`), and [`send_now`] makes one delivery
//! attempt instead of leaving it to the running bridge.
//!
//! Errors name pseudonymous identifiers only, never the originals.

use std::path::{Path, PathBuf};

use cosilo_sdk::dicom::{
    segments_for_classes, write_seg, AlgorithmInfo, DicomError, SegmentDescription, SeriesVolume,
};
use cosilo_sdk::segment::{SegmentError, Segmenter, SegmenterOptions};
use cosilo_sdk::volume::Volume;
use dicom::core::Tag;
use dicom::dictionary_std::tags;
use dicom::object::InMemDicomObject;

use crate::assemble::DONE_DIR;
use crate::deid::{DeidError, Deidentifier, MappingStore};
use crate::outbox::{Outbox, OutboxError, OutboxItem, RunReport};
use crate::pipeline::BridgeConfig;
use crate::scu::{self, PeerAe, QueryFilter, QueryLevel, ScuError};

/// Errors of the write-back path, one per failed step.
#[derive(Debug, thiserror::Error)]
pub enum WritebackError {
    /// A pseudonymous UID of the series is not in the mapping store (not received by this bridge,
    /// or the state directory is another site's).
    #[error("the mapping store does not know the {what} {uid}: was this series received by this bridge (same state_dir)?")]
    UnknownUid { what: &'static str, uid: String },
    /// The patient pseudonym is not in the mapping store.
    #[error("the mapping store does not know the patient pseudonym {pseudonym}")]
    UnknownPatient { pseudonym: String },
    /// The series has no instances to refer to.
    #[error("the series {series_uid} has no instances to refer to")]
    NoInstances { series_uid: String },
    /// The C-FIND of the study at the PACS failed.
    #[error("cannot query the PACS {peer} for the study of series {pseudo_series}")]
    QueryStudy {
        peer: String,
        pseudo_series: String,
        #[source]
        source: Box<ScuError>,
    },
    /// The PACS did not return exactly one study for the original StudyInstanceUID.
    #[error("the PACS {peer} returned {found} studies for the study of series {pseudo_series} (expected 1)")]
    StudyNotFound {
        peer: String,
        pseudo_series: String,
        found: usize,
    },
    /// The PACS's record of the study disagrees with the mapping store.
    #[error("the PACS's {field} for the study of series {pseudo_series} differs from the mapping store's")]
    StudyMismatch {
        field: &'static str,
        pseudo_series: String,
    },
    /// A case id is not `<patient pseudonym>-<series UID>`.
    #[error("case id {case_id:?} is not <patient pseudonym>-<series UID>")]
    BadCaseId { case_id: String },
    /// The case's series is not in the spool's `done/` folder.
    #[error("no series {series_uid} (case {case_id}) under {done}")]
    NoDoneSeries {
        case_id: String,
        series_uid: String,
        done: PathBuf,
    },
    /// The spool's `done/` folder cannot be listed.
    #[error("cannot list {path}")]
    ListSpool {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the SEG failed.
    #[error("cannot write the SEG {path}")]
    WriteSeg {
        path: PathBuf,
        #[source]
        source: Box<DicomError>,
    },
    /// Putting the SEG into the outbox failed.
    #[error("cannot queue the SEG for write-back")]
    Enqueue(#[source] OutboxError),
    /// The configuration names no PACS to write back to.
    #[error("the bridge configuration has no [network.pacs] to write back to")]
    NoPacs,
    /// The model bundle cannot be opened (or ONNX Runtime is missing).
    #[error("cannot open the bundle {bundle}")]
    OpenBundle {
        bundle: PathBuf,
        #[source]
        source: Box<SegmentError>,
    },
    /// Reading or segmenting the case's series failed.
    #[error("cannot segment case {case_id}")]
    Segment {
        case_id: String,
        #[source]
        source: Box<SegmentError>,
    },
    /// The mapping store or the de-identification key cannot be opened, or recording into the
    /// store failed.
    #[error("cannot use the pseudonym mapping")]
    Mapping(#[source] DeidError),
    /// The outbox cannot be opened or its delivery pass failed.
    #[error("the write-back outbox failed")]
    Outbox(#[source] OutboxError),
    /// The instance-level C-FIND that recovers instance UIDs failed.
    #[error("cannot query the PACS {peer} for the instances of series {pseudo_series}")]
    QueryInstances {
        peer: String,
        pseudo_series: String,
        #[source]
        source: Box<ScuError>,
    },
}

/// A case's SEG, queued for the PACS by [`write_back_case`].
#[derive(Debug, Clone)]
pub struct QueuedSeg {
    /// The durable outbox item.
    pub item: OutboxItem,
    /// Seconds the segmentation took.
    pub segment_seconds: f64,
}

/// Where an item stands after [`send_now`]'s delivery pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Delivered and removed from the outbox.
    Sent,
    /// Still pending: the running bridge retries it (the pass's report says why).
    Pending(RunReport),
    /// Given up after its last attempt; the record is in this dead-letter folder.
    GivenUp(PathBuf),
}

/// Segments imported case `case_id` (its de-identified series in the spool's `done/`) with the
/// bundle in `bundle`, re-identifies the result against the PACS of `cfg` ([`reidentify_at_pacs`])
/// and queues its SEG durably in `cfg`'s outbox ([`queue_seg`]). `intra_threads` is ONNX Runtime's
/// intra-op thread count (`None`: one per physical core).
pub fn write_back_case(
    cfg: &BridgeConfig,
    case_id: &str,
    bundle: &Path,
    intra_threads: Option<usize>,
) -> Result<QueuedSeg, WritebackError> {
    let pacs = cfg.network.pacs.as_ref().ok_or(WritebackError::NoPacs)?;
    let series_dir = done_series_dir(&cfg.network.spool_dir, case_id)?;
    let options = SegmenterOptions {
        intra_threads,
        ..Default::default()
    };
    let segmenter =
        Segmenter::open_with(bundle, &options).map_err(|source| WritebackError::OpenBundle {
            bundle: bundle.to_path_buf(),
            source: Box::new(source),
        })?;
    let t0 = std::time::Instant::now();
    let (segmentation, pseudo) = segmenter
        .segment_dicom_series(&series_dir)
        .map_err(|source| WritebackError::Segment {
            case_id: case_id.to_string(),
            source: Box::new(source),
        })?;
    let segment_seconds = t0.elapsed().as_secs_f64();
    let mapping = MappingStore::open(&cfg.state_dir).map_err(WritebackError::Mapping)?;
    let keyed_hash = Deidentifier::from_key_file(&cfg.deid.secret_file, cfg.deid.date_policy)
        .map_err(WritebackError::Mapping)?;
    recover_instance_uids(&pseudo, &mapping, &keyed_hash, pacs)?;
    let source = reidentify_at_pacs(&pseudo, &mapping, pacs)?;
    let m = segmenter.manifest();
    let version = m.model_sha256.get(..16).unwrap_or(&m.model_sha256);
    let outbox = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())
        .map_err(WritebackError::Outbox)?;
    let item = queue_seg(
        &segmentation.labels,
        &source,
        &segments_for_classes(&m.classes),
        &AlgorithmInfo::new(&m.model_name, version),
        &outbox,
        pacs,
    )?;
    Ok(QueuedSeg {
        item,
        segment_seconds,
    })
}

/// One delivery pass of `cfg`'s outbox now, and where `item` stands after it.
pub fn send_now(cfg: &BridgeConfig, item: &OutboxItem) -> Result<SendOutcome, WritebackError> {
    let outbox = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())
        .map_err(WritebackError::Outbox)?;
    let report = outbox.run_once().map_err(WritebackError::Outbox)?;
    let holds = |items: Vec<OutboxItem>| items.iter().any(|i| i.id == item.id);
    if holds(outbox.pending().map_err(WritebackError::Outbox)?) {
        Ok(SendOutcome::Pending(report))
    } else if holds(outbox.dead().map_err(WritebackError::Outbox)?) {
        Ok(SendOutcome::GivenUp(outbox.dead_dir()))
    } else {
        Ok(SendOutcome::Sent)
    }
}

/// The original behind pseudonymous UID `uid` (a `what`), or [`WritebackError::UnknownUid`].
fn original_uid(
    mapping: &MappingStore,
    what: &'static str,
    uid: &str,
) -> Result<String, WritebackError> {
    mapping
        .original_uid(uid)
        .ok_or_else(|| WritebackError::UnknownUid {
            what,
            uid: uid.to_string(),
        })
}

/// `series` (as the SDK read it from the de-identified spool) with the original UIDs and PatientID
/// from `mapping`. The other patient and study attributes are cleared (they hold de-identified
/// values): fill them with [`apply_pacs_study`]. `files` is cleared too (they are the
/// pseudonymous files).
pub fn reidentify(
    series: &SeriesVolume,
    mapping: &MappingStore,
) -> Result<SeriesVolume, WritebackError> {
    let original = |what, uid: &str| original_uid(mapping, what, uid);
    if series.sop_instances.is_empty() {
        return Err(WritebackError::NoInstances {
            series_uid: series.series_uid.clone(),
        });
    }
    let mut s = series.clone();
    s.study_uid = original("StudyInstanceUID", &series.study_uid)?;
    s.series_uid = original("SeriesInstanceUID", &series.series_uid)?;
    if !series.frame_of_reference_uid.is_empty() {
        s.frame_of_reference_uid = original("FrameOfReferenceUID", &series.frame_of_reference_uid)?;
    }
    for inst in &mut s.sop_instances {
        inst.instance_uid = original("SOPInstanceUID", &inst.instance_uid)?;
    }
    let patient_id = mapping
        .original_patient(&series.study.patient_id)
        .ok_or_else(|| WritebackError::UnknownPatient {
            pseudonym: series.study.patient_id.clone(),
        })?;
    s.study = cosilo_sdk::dicom::StudyInfo {
        patient_id,
        ..Default::default()
    };
    s.files.clear();
    Ok(s)
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.element(tag)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// Fills `series`' patient and study attributes from the PACS's C-FIND match of its study
/// (`identifier`, as [`scu::find`] returns it), after checking that the PACS's StudyInstanceUID and
/// PatientID equal the re-identified ones. `pseudo_series` names the series in errors.
pub fn apply_pacs_study(
    series: &mut SeriesVolume,
    identifier: &InMemDicomObject,
    pseudo_series: &str,
) -> Result<(), WritebackError> {
    let mismatch = |field| WritebackError::StudyMismatch {
        field,
        pseudo_series: pseudo_series.to_string(),
    };
    if text(identifier, tags::STUDY_INSTANCE_UID) != series.study_uid {
        return Err(mismatch("StudyInstanceUID"));
    }
    if text(identifier, tags::PATIENT_ID) != series.study.patient_id {
        return Err(mismatch("PatientID"));
    }
    let st = &mut series.study;
    st.patient_name = text(identifier, tags::PATIENT_NAME);
    st.patient_birth_date = text(identifier, tags::PATIENT_BIRTH_DATE);
    st.patient_sex = text(identifier, tags::PATIENT_SEX);
    st.study_date = text(identifier, tags::STUDY_DATE);
    st.study_time = text(identifier, tags::STUDY_TIME);
    st.study_id = text(identifier, tags::STUDY_ID);
    st.accession_number = text(identifier, tags::ACCESSION_NUMBER);
    st.referring_physician_name = text(identifier, tags::REFERRING_PHYSICIAN_NAME);
    st.study_description = text(identifier, tags::STUDY_DESCRIPTION);
    Ok(())
}

/// Recovers the mapping of instance UIDs the mapping store lacks (its deferred lines, lost to a
/// power cut before they were synced: see [`MappingStore`]). A pseudonymous UID is a keyed hash of
/// the original ([`Deidentifier::remap_uid`]), so an image-level C-FIND of the original series at
/// `pacs` (its study and series UIDs are durable in the store) gives every candidate; those whose
/// hash is one of `series`' instances are recorded again, durably. Returns how many were
/// recovered (0 without a query when none is missing).
pub fn recover_instance_uids(
    series: &SeriesVolume,
    mapping: &MappingStore,
    keyed_hash: &Deidentifier,
    pacs: &PeerAe,
) -> Result<usize, WritebackError> {
    let missing: std::collections::HashSet<&str> = series
        .sop_instances
        .iter()
        .map(|i| i.instance_uid.as_str())
        .filter(|uid| mapping.original_uid(uid).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(0);
    }
    let original = |what, uid: &str| original_uid(mapping, what, uid);
    let filter = QueryFilter {
        study_uid: Some(original("StudyInstanceUID", &series.study_uid)?),
        series_uid: Some(original("SeriesInstanceUID", &series.series_uid)?),
        ..Default::default()
    };
    let matches = scu::find(pacs, QueryLevel::Image, &filter).map_err(|source| {
        WritebackError::QueryInstances {
            peer: pacs.address.clone(),
            pseudo_series: series.series_uid.clone(),
            source: Box::new(source),
        }
    })?;
    let pairs: Vec<(String, String)> = matches
        .into_iter()
        .filter_map(|m| {
            let pseudo = keyed_hash.remap_uid(&m.sop_instance_uid);
            missing
                .contains(pseudo.as_str())
                .then(|| (format!("uid:{pseudo}"), m.sop_instance_uid))
        })
        .collect();
    mapping.recover(&pairs).map_err(WritebackError::Mapping)?;
    tracing::info!(series = %series.series_uid, missing = missing.len(), recovered = pairs.len(),
        "instance UIDs recovered from the PACS");
    Ok(pairs.len())
}

/// [`reidentify`], then a Study Root C-FIND of the original study at `pacs` and
/// [`apply_pacs_study`] with its one match: the source series exactly as the PACS knows it.
pub fn reidentify_at_pacs(
    series: &SeriesVolume,
    mapping: &MappingStore,
    pacs: &PeerAe,
) -> Result<SeriesVolume, WritebackError> {
    let mut s = reidentify(series, mapping)?;
    let pseudo_series = series.series_uid.clone();
    let filter = QueryFilter {
        study_uid: Some(s.study_uid.clone()),
        ..Default::default()
    };
    let matches = scu::find(pacs, QueryLevel::Study, &filter).map_err(|source| {
        WritebackError::QueryStudy {
            peer: pacs.address.clone(),
            pseudo_series: pseudo_series.clone(),
            source: Box::new(source),
        }
    })?;
    let [found] = matches.as_slice() else {
        return Err(WritebackError::StudyNotFound {
            peer: pacs.address.clone(),
            pseudo_series,
            found: matches.len(),
        });
    };
    apply_pacs_study(&mut s, &found.identifier, &pseudo_series)?;
    Ok(s)
}

/// The folder of case `case_id`'s de-identified series in the spool: `<spool>/done/<study>/<series>`,
/// the case id being `<patient pseudonym>-<pseudonymous series UID>` as the assembler names it.
pub fn done_series_dir(spool_dir: &Path, case_id: &str) -> Result<PathBuf, WritebackError> {
    let series_uid = case_id
        .rsplit_once('-')
        .map(|(_, s)| s)
        .filter(|s| !s.is_empty() && !s.contains(['/', '\\']) && *s != "." && *s != "..")
        .ok_or_else(|| WritebackError::BadCaseId {
            case_id: case_id.to_string(),
        })?;
    let done = spool_dir.join(DONE_DIR);
    let list_err = |source| WritebackError::ListSpool {
        path: done.clone(),
        source,
    };
    for entry in std::fs::read_dir(&done).map_err(list_err)? {
        let candidate = entry.map_err(list_err)?.path().join(series_uid);
        if candidate.is_dir() {
            return Ok(candidate);
        }
    }
    Err(WritebackError::NoDoneSeries {
        case_id: case_id.to_string(),
        series_uid: series_uid.to_string(),
        done,
    })
}

/// Writes `labels` as a SEG against `source` (re-identified: [`reidentify_at_pacs`]) and queues it
/// in `outbox` for `pacs`. When this returns the item is durable; the bridge (or
/// [`Outbox::run_once`]) sends it. The SEG is staged in the outbox's folder and removed once queued.
pub fn queue_seg(
    labels: &Volume<u8>,
    source: &SeriesVolume,
    segments: &[SegmentDescription],
    algorithm: &AlgorithmInfo,
    outbox: &Outbox,
    pacs: &PeerAe,
) -> Result<OutboxItem, WritebackError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let staged = outbox
        .dir()
        .join(format!("seg-{}-{nanos}.dcm.staging", std::process::id()));
    let written = write_seg(labels, source, segments, algorithm, &staged).map_err(|source| {
        WritebackError::WriteSeg {
            path: staged.clone(),
            source: Box::new(source),
        }
    });
    let queued = written.and_then(|()| {
        outbox
            .enqueue(&staged, pacs)
            .map_err(WritebackError::Enqueue)
    });
    let _ = std::fs::remove_file(&staged);
    queued
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::{DatePolicy, Deidentifier};
    use cosilo_sdk::dicom::{read_series_dir, write_series, Modality, SeriesMeta};
    use cosilo_sdk::volume::Geometry;
    use dicom::object::{open_file, FileMetaTableBuilder};

    /// Writes a 4-slice MR series, de-identifies it with a mapping store in `state`, and returns
    /// (original series, de-identified series, mapping store).
    fn deidentified_series(root: &Path) -> (SeriesVolume, SeriesVolume, MappingStore) {
        let geometry = Geometry {
            dims: [6, 5, 4],
            affine: [
                [-0.9, 0.0, 0.0, 10.0],
                [0.0, -0.9, 0.0, 20.0],
                [0.0, 0.0, 2.5, -30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let data = (0..geometry.len()).map(|i| (i % 97) as f32).collect();
        let volume = Volume { geometry, data };
        let mut meta = SeriesMeta::new(Modality::Mr, "writeback-unit-test");
        meta.patient_name = "Rivera^Ana".into();
        meta.patient_id = "MRN-4711".into();
        let orig_dir = root.join("orig");
        let files = write_series(&volume, &meta, &orig_dir).expect("write series");
        let mapping = MappingStore::open(&root.join("state")).expect("mapping");
        let deid = Deidentifier::new(b"unit test secret of 32 bytes....", DatePolicy::Remove)
            .expect("deid")
            .with_mapping(mapping);
        let deid_dir = root.join("deid");
        std::fs::create_dir_all(&deid_dir).expect("mkdir");
        for (k, f) in files.iter().enumerate() {
            let obj = open_file(f).expect("open");
            let ts = obj.meta().transfer_syntax().to_string();
            let out = deid.deidentify(&obj).expect("deidentify");
            let file = out
                .object
                .with_meta(FileMetaTableBuilder::new().transfer_syntax(ts.trim_end_matches('\0')))
                .expect("meta");
            file.write_to_file(deid_dir.join(format!("{k}.dcm")))
                .expect("write");
        }
        let original = read_series_dir(&orig_dir).expect("read original");
        let pseudo = read_series_dir(&deid_dir).expect("read de-identified");
        // Reopen: what the write-back command sees is what was fsynced.
        let mapping = MappingStore::open(&root.join("state")).expect("reopen mapping");
        (original, pseudo, mapping)
    }

    #[test]
    fn reidentify_maps_every_uid_back_exactly() {
        let d = tempfile::tempdir().unwrap();
        let (original, pseudo, mapping) = deidentified_series(d.path());
        // The de-identified series really is pseudonymous.
        assert_ne!(pseudo.study_uid, original.study_uid);
        assert_ne!(pseudo.series_uid, original.series_uid);
        assert_ne!(pseudo.study.patient_id, original.study.patient_id);
        assert_ne!(pseudo.sop_instances, original.sop_instances);
        let back = reidentify(&pseudo, &mapping).unwrap();
        assert_eq!(back.study_uid, original.study_uid);
        assert_eq!(back.series_uid, original.series_uid);
        assert_eq!(back.frame_of_reference_uid, original.frame_of_reference_uid);
        assert!(!back.frame_of_reference_uid.is_empty());
        assert_eq!(
            back.sop_instances, original.sop_instances,
            "instances in the same slice order"
        );
        assert_eq!(back.study.patient_id, "MRN-4711");
        assert!(back.files.is_empty());
        assert_eq!(
            back.volume, pseudo.volume,
            "the grid and values are untouched"
        );
        // The PACS's study record fills the rest; a mismatching one is refused.
        let mut q = InMemDicomObject::new_empty();
        let put = |q: &mut InMemDicomObject, tag, v: &str| {
            q.put(dicom::core::DataElement::new(
                tag,
                dicom::core::VR::LO,
                dicom::core::PrimitiveValue::from(v),
            ));
        };
        put(&mut q, tags::STUDY_INSTANCE_UID, &original.study_uid);
        put(&mut q, tags::PATIENT_ID, "MRN-4711");
        put(&mut q, tags::PATIENT_NAME, "Rivera^Ana");
        put(&mut q, tags::ACCESSION_NUMBER, "ACC0001");
        let mut filled = back.clone();
        apply_pacs_study(&mut filled, &q, &pseudo.series_uid).unwrap();
        assert_eq!(filled.study.patient_name, "Rivera^Ana");
        assert_eq!(filled.study.accession_number, "ACC0001");
        put(&mut q, tags::PATIENT_ID, "MRN-0000");
        let err = apply_pacs_study(&mut back.clone(), &q, &pseudo.series_uid).unwrap_err();
        assert!(
            matches!(
                err,
                WritebackError::StudyMismatch {
                    field: "PatientID",
                    ..
                }
            ),
            "{err}"
        );
        assert!(
            !err.to_string().contains("MRN-"),
            "errors never name originals: {err}"
        );
    }

    #[test]
    fn unknown_pseudonym_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let (_, pseudo, mapping) = deidentified_series(d.path());
        let mut stray = pseudo.clone();
        stray.sop_instances[2].instance_uid = "2.25.12345".into();
        let err = reidentify(&stray, &mapping).unwrap_err();
        assert!(
            matches!(&err, WritebackError::UnknownUid { what: "SOPInstanceUID", uid } if uid == "2.25.12345"),
            "{err}"
        );
        assert!(err.to_string().contains("2.25.12345"), "{err}");
        // Another site's (empty) state directory knows nothing.
        let other = MappingStore::open(&d.path().join("other-state")).unwrap();
        let err = reidentify(&pseudo, &other).unwrap_err();
        assert!(
            matches!(
                &err,
                WritebackError::UnknownUid {
                    what: "StudyInstanceUID",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn done_series_dir_finds_the_case_and_refuses_bad_ids() {
        let d = tempfile::tempdir().unwrap();
        let series = d.path().join(DONE_DIR).join("2.25.1").join("2.25.77");
        std::fs::create_dir_all(&series).unwrap();
        assert_eq!(done_series_dir(d.path(), "PAT123-2.25.77").unwrap(), series);
        assert!(matches!(
            done_series_dir(d.path(), "PAT123-2.25.78"),
            Err(WritebackError::NoDoneSeries { .. })
        ));
        for bad in ["nodash", "PAT-", "PAT-.."] {
            assert!(
                matches!(
                    done_series_dir(d.path(), bad),
                    Err(WritebackError::BadCaseId { .. })
                ),
                "{bad}"
            );
        }
    }
}
