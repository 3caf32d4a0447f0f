//! Series assembly through the pipeline's sink, without the network: series written by the SDK
//! are offered instance by instance to [`DeidSink`] (de-identify → spool → notify), and the
//! assembler hands complete series (and SEG labels) to a recording [`SeriesSink`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cosilo_bridge::assemble::{
    AssembledSeries, ManualClock, SeriesAssembler, SeriesSink, SeriesSinkError, SinkOutcome,
    DONE_DIR, REFUSED_DIR,
};
use cosilo_bridge::deid::{DatePolicy, Deidentifier};
use cosilo_bridge::pipeline::{BridgeConfig, DeidSink};
use cosilo_bridge::scp::{InstanceSink, ReceivedInstance, SpoolSink};
use cosilo_sdk::dicom::seg::{write_seg, AlgorithmInfo, SegmentDescription};
use cosilo_sdk::dicom::series::read_series;
use cosilo_sdk::dicom::write::{write_series, Modality, SeriesMeta};
use cosilo_sdk::volume::{Geometry, Volume};
use dicom::core::Tag;
use dicom::object::open_file;

const SECRET: &[u8] = b"assembly-test-secret-0123456789";
const QUIET: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<AssembledSeries>>,
    fail: Mutex<bool>,
}

impl SeriesSink for Recorder {
    fn import(&self, series: AssembledSeries) -> Result<SinkOutcome, SeriesSinkError> {
        if *self.fail.lock().unwrap() {
            return Err(SeriesSinkError {
                case_id: series.case_id,
                source: "store unavailable".into(),
            });
        }
        self.got.lock().unwrap().push(series);
        Ok(SinkOutcome::Stored)
    }
}

fn volume(seed: u32) -> Volume<f32> {
    let g = Geometry::axis_aligned([16, 12, 6], [0.8, 0.8, 2.5], [-10.0, 20.0, 5.0]);
    let data = (0..g.len())
        .map(|i| ((i as u32 * 7 + seed) % 200) as f32 - 100.0)
        .collect();
    Volume::new(g, data).unwrap()
}

fn labels(g: &Geometry) -> Volume<u8> {
    let [nx, ny, _] = g.dims;
    let data = (0..g.len())
        .map(|i| {
            let (x, y, z) = (i % nx, (i / nx) % ny, i / (nx * ny));
            u8::from((2..=3).contains(&z) && (4..10).contains(&x) && (3..8).contains(&y))
        })
        .collect();
    Volume::new(g.clone(), data).unwrap()
}

fn write(dir: &Path, seed: &str, patient: &str) -> Vec<PathBuf> {
    let mut meta = SeriesMeta::new(Modality::Ct, seed);
    meta.patient_id = patient.to_string();
    meta.patient_name = "Testperson^Anna".to_string();
    write_series(&volume(seed.len() as u32), &meta, dir).unwrap()
}

/// Offers each file to `sink` as the SCP would, in one association that ends with a release.
fn offer(sink: &DeidSink, files: &[PathBuf]) {
    offer_in_association(sink, files);
    sink.association_ended(true);
}

/// Offers each file to `sink` as the SCP would, leaving the association's end to the caller.
fn offer_in_association(sink: &DeidSink, files: &[PathBuf]) {
    for f in files {
        let obj = open_file(f).unwrap();
        let ts = obj
            .meta()
            .transfer_syntax()
            .trim_end_matches('\0')
            .to_string();
        let text = |t| {
            obj.get(t)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .unwrap()
        };
        let inst = ReceivedInstance {
            calling_ae: "PACS".to_string(),
            sop_class_uid: text(Tag(0x0008, 0x0016)),
            sop_instance_uid: text(Tag(0x0008, 0x0018)),
            transfer_syntax: ts,
            dataset: obj.into_inner(),
        };
        sink.accept(inst).unwrap();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    root: PathBuf,
    spool: PathBuf,
    clock: Arc<ManualClock>,
    assembler: Arc<SeriesAssembler>,
    sink: DeidSink,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let spool = root.join("spool");
    let clock = Arc::new(ManualClock::default());
    let assembler = Arc::new(SeriesAssembler::open(&spool, QUIET, clock.clone()).unwrap());
    let deid = Deidentifier::new(SECRET, DatePolicy::ShiftPerPatient { max_days: 100 }).unwrap();
    let sink = DeidSink::new(deid, SpoolSink::new(&spool, 0).unwrap(), assembler.clone());
    Setup {
        _dir: dir,
        root,
        spool,
        clock,
        assembler,
        sink,
    }
}

#[test]
fn series_complete_after_quiet_period_with_geometry_and_pseudonyms() {
    let s = setup();
    let files = write(&s.root.join("in/a"), "series-a", "MRN-1234567");
    let original = read_series(&files).unwrap();
    let rec = Recorder::default();
    offer(&s.sink, &files[..3]);
    s.clock.advance(QUIET / 2);
    offer(&s.sink, &files[3..]);
    s.clock.advance(QUIET / 2);
    // Only half the quiet period since the last instance: still waiting.
    let r = s.assembler.poll(&rec).unwrap();
    assert!(r.imported.is_empty());
    assert_eq!(r.waiting, 1);
    s.clock.advance(QUIET);
    let r = s.assembler.poll(&rec).unwrap();
    assert_eq!(r.imported.len(), 1, "{r:?}");
    let got = rec.got.lock().unwrap();
    let a = &got[0];
    assert_eq!(a.instances, files.len());
    assert!(a.image.geometry.same_grid(&original.volume.geometry, 1e-4));
    assert_eq!(a.image.data, original.volume.data);
    assert!(a.labels.is_none());
    // Pseudonyms only.
    assert!(a.patient_pseudonym.starts_with('P'));
    assert!(!a.case_id.contains("MRN-1234567"));
    assert_ne!(a.series_uid, original.series_uid);
    assert!(a.series_uid.starts_with("2.25."));
    assert_eq!(a.modality, "CT");
    // Moved out of the spool's queue into done/.
    assert_eq!(s.assembler.pending(), 0);
    assert!(s
        .spool
        .join(DONE_DIR)
        .join(&a.study_uid)
        .join(&a.series_uid)
        .is_dir());
    assert!(!s.spool.join(&a.study_uid).join(&a.series_uid).exists());
}

#[test]
fn seg_after_its_series_becomes_labels_on_its_grid() {
    let s = setup();
    let files = write(&s.root.join("in/a"), "series-seg", "MRN-77");
    let original = read_series(&files).unwrap();
    let truth = labels(&original.volume.geometry);
    let seg_path = s.root.join("in/seg.dcm");
    write_seg(
        &truth,
        &original,
        &[SegmentDescription::for_class(1, "tumour")],
        &AlgorithmInfo::new("test", "1"),
        &seg_path,
    )
    .unwrap();
    let rec = Recorder::default();
    offer(&s.sink, &files);
    s.clock.advance(QUIET);
    assert_eq!(s.assembler.poll(&rec).unwrap().imported.len(), 1);
    offer(&s.sink, &[seg_path]);
    s.clock.advance(QUIET);
    let r = s.assembler.poll(&rec).unwrap();
    assert_eq!(r.imported.len(), 1, "{r:?}");
    let got = rec.got.lock().unwrap();
    assert_eq!(
        got[1].case_id, got[0].case_id,
        "the SEG labels the same case"
    );
    let l = got[1].labels.as_ref().expect("labels");
    assert_eq!(l.data, truth.data);
    assert!(got[1].seg_series_uid.is_some());
}

#[test]
fn restart_picks_up_partial_series_and_sink_failure_keeps_it() {
    let s = setup();
    let files = write(&s.root.join("in/a"), "series-r", "MRN-5");
    // The bridge stops mid-association: no release.
    offer_in_association(&s.sink, &files[..2]);
    // "Restart": a new assembler over the same spool, the rest arrives afterwards.
    let clock = Arc::new(ManualClock::default());
    let assembler = Arc::new(SeriesAssembler::open(&s.spool, QUIET, clock.clone()).unwrap());
    assert_eq!(assembler.pending(), 1);
    let deid = Deidentifier::new(SECRET, DatePolicy::ShiftPerPatient { max_days: 100 }).unwrap();
    let sink = DeidSink::new(
        deid,
        SpoolSink::new(&s.spool, 0).unwrap(),
        assembler.clone(),
    );
    offer(&sink, &files[2..]);
    clock.advance(QUIET);
    let rec = Recorder::default();
    *rec.fail.lock().unwrap() = true;
    let r = assembler.poll(&rec).unwrap();
    assert_eq!(r.deferred.len(), 1);
    assert_eq!(assembler.pending(), 1, "kept until the sink acknowledges");
    *rec.fail.lock().unwrap() = false;
    clock.advance(QUIET);
    let r = assembler.poll(&rec).unwrap();
    assert_eq!(r.imported.len(), 1);
    assert_eq!(rec.got.lock().unwrap()[0].instances, files.len());
}

#[test]
fn series_with_a_gap_is_refused_with_a_reason() {
    let s = setup();
    let mut files = write(&s.root.join("in/a"), "series-gap", "MRN-9");
    files.remove(3);
    offer(&s.sink, &files);
    s.clock.advance(QUIET);
    let rec = Recorder::default();
    let r = s.assembler.poll(&rec).unwrap();
    assert_eq!(r.refused.len(), 1, "{r:?}");
    assert!(rec.got.lock().unwrap().is_empty());
    let refused = s.spool.join(REFUSED_DIR);
    let reason = walk(&refused)
        .into_iter()
        .find(|p| p.ends_with("reason.txt"))
        .expect("reason.txt");
    let text = std::fs::read_to_string(reason).unwrap();
    assert!(!text.trim().is_empty());
    assert_eq!(text.trim(), r.refused[0].1);
}

#[test]
fn default_config_parses_and_validates() {
    let cfg = BridgeConfig::default_config().unwrap();
    cfg.validate().unwrap();
    let mut bad = cfg.clone();
    bad.assembly.quiet_period_s = 0;
    assert!(bad.validate().is_err());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The retention of `done/`: by age and by size, oldest first, never a SEG or the image series a
/// SEG labels.
#[test]
fn done_retention_removes_old_and_excess_series_but_never_a_labelled_one() {
    use cosilo_bridge::assemble::retention::{apply, Retention};
    use std::time::SystemTime;
    let s = setup();
    let rec = Recorder::default();
    // A: labelled by a SEG; B then C: image only (B older).
    let a = write(&s.root.join("in/a"), "series-a", "MRN-1");
    let original = read_series(&a).unwrap();
    let seg_path = s.root.join("in/seg.dcm");
    write_seg(
        &labels(&original.volume.geometry),
        &original,
        &[SegmentDescription::for_class(1, "tumour")],
        &AlgorithmInfo::new("test", "1"),
        &seg_path,
    )
    .unwrap();
    offer(&s.sink, &a);
    s.clock.advance(QUIET);
    assert_eq!(s.assembler.poll(&rec).unwrap().imported.len(), 1);
    offer(&s.sink, &[seg_path]);
    s.clock.advance(QUIET);
    assert_eq!(s.assembler.poll(&rec).unwrap().imported.len(), 1);
    let b = write(&s.root.join("in/b"), "series-bb", "MRN-2");
    offer(&s.sink, &b);
    s.clock.advance(QUIET);
    assert_eq!(s.assembler.poll(&rec).unwrap().imported.len(), 1);
    let c = write(&s.root.join("in/c"), "series-ccc", "MRN-3");
    offer(&s.sink, &c);
    s.clock.advance(QUIET);
    assert_eq!(s.assembler.poll(&rec).unwrap().imported.len(), 1);
    let series_in_done = || {
        let mut out = Vec::new();
        for study in std::fs::read_dir(s.spool.join(DONE_DIR)).unwrap() {
            for series in std::fs::read_dir(study.unwrap().path()).unwrap() {
                out.push(series.unwrap().file_name().into_string().unwrap());
            }
        }
        out.sort();
        out
    };
    let got = rec.got.lock().unwrap();
    let (a_uid, seg_uid) = (
        got[1].series_uid.clone(),
        got[1].seg_series_uid.clone().unwrap(),
    );
    let (b_uid, c_uid) = (got[2].series_uid.clone(), got[3].series_uid.clone());
    drop(got);
    assert_eq!(series_in_done().len(), 4);
    let total: u64 = walk(&s.spool.join(DONE_DIR))
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "dcm"))
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);

    // Young and within the size: nothing goes.
    let keep_all = Retention {
        max_age: day,
        max_bytes: total,
    };
    let r = apply(&s.spool, &keep_all, now).unwrap();
    assert!(r.removed.is_empty(), "{r:?}");
    assert_eq!((r.protected, r.bytes_after), (2, total));

    // One byte over the size: the oldest unlabelled series (B) goes, and only it.
    let r = apply(
        &s.spool,
        &Retention {
            max_age: day,
            max_bytes: total - 1,
        },
        now,
    )
    .unwrap();
    assert_eq!(
        r.removed.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        [b_uid.as_str()]
    );
    let mut left = vec![a_uid.clone(), seg_uid.clone(), c_uid.clone()];
    left.sort();
    assert_eq!(series_in_done(), left);

    // Ten days later with a one-week age limit: C goes; A and its SEG stay, however old.
    let r = apply(
        &s.spool,
        &Retention {
            max_age: 7 * day,
            max_bytes: u64::MAX,
        },
        now + 10 * day,
    )
    .unwrap();
    assert_eq!(r.removed.len(), 1);
    assert_eq!(r.removed[0].1, c_uid);
    let mut left = vec![a_uid.clone(), seg_uid.clone()];
    left.sort();
    assert_eq!(series_in_done(), left);
    // Even a size limit of zero keeps the labelled case's series.
    let r = apply(
        &s.spool,
        &Retention {
            max_age: Duration::ZERO,
            max_bytes: 0,
        },
        now + 10 * day,
    )
    .unwrap();
    assert!(r.removed.is_empty());
    assert_eq!(series_in_done(), left);
    assert!(r.bytes_after > 0);
    // Nothing of the removal is left for the spool scan to find.
    assert!(!s.spool.join(".retention-trash").exists());
}
