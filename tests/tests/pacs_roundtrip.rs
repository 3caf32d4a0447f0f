//! The PACS bridge end to end (issue 4's "done when"), against a real Orthanc:
//!
//! 1. The real head CT (108 instances, `cosilo data dicom`) and an MR series made from a cohort
//!    case (`write_series`), both with fictitious but realistic patient names and IDs, are uploaded
//!    to Orthanc through its REST API.
//! 2. The bridge runs as the real `cosilo bridge` process (SCP → de-identification → spool →
//!    assembler → the appliance's store); the bridge library's SCU C-FINDs the studies by modality
//!    and by study description and C-MOVEs them to the bridge's SCP.
//! 3. Both series arrive in the store as volumes whose grid equals what was uploaded (computed here
//!    from the files' own ImagePositionPatient / ImageOrientationPatient / PixelSpacing, LPS turned
//!    into RAS) with the voxel values of the volumes they were written from; no file under the
//!    store or the spool, no case's metadata and no line of the bridge's log holds an original
//!    name, ID, birth date, accession number or UID. Moving a study again, after a bridge restart,
//!    gives the same pseudonym and the same case.
//! 4. `cosilo writeback` segments the de-identified MR series with an exported (untrained) bundle,
//!    writes the SEG against the series re-identified by the bridge (`writeback::reidentify_at_pacs`:
//!    UIDs and PatientID through the mapping store, the other patient/study attributes from a
//!    C-FIND at the PACS) and queues it in the outbox; the running bridge fails to deliver it while
//!    the PACS is down, keeps it, and C-STOREs it once the PACS is back. It
//!    then sits in the MR study in Orthanc; downloaded from there, pydicom and highdicom
//!    (`tests/py/check_seg.py`) rebuild the SDK's labels voxel for voxel on the source geometry,
//!    and `dciodvfy` reports no error.
//! 5. Moving the MR study once more brings the SEG through the bridge too: the case is now a
//!    training case whose labels equal the SDK's.
//!
//! Needs Orthanc (`apt-get install orthanc`), dcmtk/dicom3tools' `dciodvfy`, curl, the fetched
//! anatomy (`cosilo data fetch`), ONNX Runtime (`scripts/setup-ort.sh`) and the project's Python
//! venv with pydicom, highdicom and numpy. A missing one fails the test saying so; it never skips.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::Device;
use cosilo_bridge::assemble::{DONE_DIR, REFUSED_DIR};
use cosilo_bridge::deid::{DatePolicy, MappingStore};
use cosilo_bridge::outbox::Outbox;
use cosilo_bridge::pipeline::BridgeConfig;
use cosilo_bridge::scu::{self, MoveTarget, PeerAe, QueryFilter, QueryLevel};
use cosilo_bridge::writeback;
use cosilo_lab::cohort::{self, CohortSpec};
use cosilo_lab::dicom_data::{read_cranium_ct, write_dicom_data};
use cosilo_lab::fetch::{cached_path, default_cache_dir, INVESALIUS_CT};
use cosilo_sdk::bundle::{rfc3339_utc, Metrics, Provenance};
use cosilo_sdk::dicom::segments_for_classes;
use cosilo_sdk::segment::{Segmenter, SegmenterOptions};
use cosilo_sdk::volume::read_nifti;
use cosilo_sdk::Geometry;
use cosilo_store::{Split, Store};
use cosilo_tests::bridge_process::{cosilo_with_bridge, BridgeProcess};
use cosilo_tests::orthanc::{free_port, Orthanc};
use cosilo_train::export;
use cosilo_train::{unet, TrainConfig};
use dicom::dictionary_std::tags;
use dicom::object::open_file;
use serde_json::{json, Value};

/// Our AE title; Orthanc knows it as modality `cosilo`.
const OUR_AE: &str = "COSILO";

/// Phase timings, printed at the end.
#[derive(Default)]
struct Timings(Vec<(&'static str, f64)>);

impl Timings {
    fn lap(&mut self, what: &'static str, since: &mut Instant) {
        self.0.push((what, since.elapsed().as_secs_f64()));
        *since = Instant::now();
    }
}

/// `text` without ANSI colour sequences (in case the logger colours a file anyway).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What the uploaded files of one series say, read straight from their tags.
struct UploadedSeries {
    /// Files in slice order (along row × column direction).
    files: Vec<PathBuf>,
    study_uid: String,
    series_uid: String,
    /// SOP instance UIDs in slice order.
    sop_uids: Vec<String>,
    /// The grid the tags describe, as an RAS affine.
    geometry: Geometry,
    /// Half the largest RescaleSlope: the quantisation of the stored int16 values.
    half_slope: f64,
    /// Every identifying value the bridge must remove (names, IDs, dates of birth, UIDs, ...).
    identifiers: Vec<String>,
}

fn text(obj: &dicom::object::InMemDicomObject, tag: dicom::core::Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn numbers(obj: &dicom::object::InMemDicomObject, tag: dicom::core::Tag) -> Result<Vec<f64>> {
    let s = text(obj, tag);
    s.split('\\')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .with_context(|| format!("{tag}: {s:?}"))
        })
        .collect()
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Reads the tags of a series folder written for upload; the geometry is computed here, not by the
/// SDK's reader: voxel (i, j, k) is column i, row j of the k-th slice along row × column, at
/// `IPP₀ + i·Δc·row + j·Δr·col + k·(IPP_k − IPP₀)/k` in LPS, and RAS flips x and y.
fn uploaded_series(dir: &Path) -> Result<UploadedSeries> {
    let mut rows = Vec::new();
    let mut identifiers = Vec::new();
    let mut half_slope: f64 = 0.0;
    let mut first = None;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let obj = open_file(&path).with_context(|| format!("reading {}", path.display()))?;
        let ipp = numbers(&obj, tags::IMAGE_POSITION_PATIENT)?;
        let iop = numbers(&obj, tags::IMAGE_ORIENTATION_PATIENT)?;
        let ps = numbers(&obj, tags::PIXEL_SPACING)?;
        ensure!(
            ipp.len() == 3 && iop.len() == 6 && ps.len() == 2,
            "{}",
            path.display()
        );
        let slope = numbers(&obj, tags::RESCALE_SLOPE).unwrap_or_else(|_| vec![1.0]);
        half_slope = half_slope.max(slope[0].abs() / 2.0);
        for tag in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
            tags::FRAME_OF_REFERENCE_UID,
            tags::PATIENT_ID,
            tags::PATIENT_BIRTH_DATE,
            tags::ACCESSION_NUMBER,
            tags::INSTITUTION_NAME,
        ] {
            let v = text(&obj, tag);
            if v.len() >= 6 {
                identifiers.push(v);
            }
        }
        for tag in [tags::PATIENT_NAME, tags::REFERRING_PHYSICIAN_NAME] {
            // The whole name and each part of five letters or more (a 4-byte needle would match
            // ~40 MB of voxels by chance with probability ~0.1).
            let v = text(&obj, tag);
            identifiers.push(v.clone());
            identifiers.extend(v.split('^').filter(|p| p.len() >= 5).map(String::from));
        }
        let cols = text(&obj, tags::COLUMNS).parse::<usize>()?;
        let nrows = text(&obj, tags::ROWS).parse::<usize>()?;
        if first.is_none() {
            first = Some((
                text(&obj, tags::STUDY_INSTANCE_UID),
                text(&obj, tags::SERIES_INSTANCE_UID),
                [iop[0], iop[1], iop[2]],
                [iop[3], iop[4], iop[5]],
                [ps[0], ps[1]],
                [cols, nrows],
            ));
        }
        rows.push((
            path,
            text(&obj, tags::SOP_INSTANCE_UID),
            [ipp[0], ipp[1], ipp[2]],
        ));
    }
    let (study_uid, series_uid, r, c, ps, [nx, ny]) =
        first.ok_or_else(|| anyhow!("no files in {}", dir.display()))?;
    let normal = cross(r, c);
    rows.sort_by(|a, b| dot(a.2, normal).total_cmp(&dot(b.2, normal)));
    let n = rows.len();
    ensure!(n >= 2, "a series needs two slices");
    let p0 = rows[0].2;
    let pn = rows[n - 1].2;
    let step = [0, 1, 2].map(|d| (pn[d] - p0[d]) / (n - 1) as f64);
    // LPS columns: row direction × column spacing, column direction × row spacing, slice step.
    let lps = [
        [r[0] * ps[1], c[0] * ps[0], step[0], p0[0]],
        [r[1] * ps[1], c[1] * ps[0], step[1], p0[1]],
        [r[2] * ps[1], c[2] * ps[0], step[2], p0[2]],
    ];
    let mut affine = [[0.0; 4]; 4];
    for col in 0..4 {
        affine[0][col] = -lps[0][col];
        affine[1][col] = -lps[1][col];
        affine[2][col] = lps[2][col];
    }
    affine[3][3] = 1.0;
    identifiers.sort();
    identifiers.dedup();
    Ok(UploadedSeries {
        files: rows.iter().map(|r| r.0.clone()).collect(),
        sop_uids: rows.iter().map(|r| r.1.clone()).collect(),
        study_uid,
        series_uid,
        geometry: Geometry {
            dims: [nx, ny, n],
            affine,
        },
        half_slope,
        identifiers,
    })
}

fn max_affine_diff(a: &Geometry, b: &Geometry) -> f64 {
    let mut m: f64 = 0.0;
    for r in 0..4 {
        for c in 0..4 {
            m = m.max((a.affine[r][c] - b.affine[r][c]).abs());
        }
    }
    m
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            let t = entry.file_type()?;
            if t.is_dir() {
                stack.push(entry.path());
            } else if t.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

/// `(file or "meta of <case>", identifier)` for every identifier found, ignoring ASCII case, in
/// `haystacks`. Identifiers are bucketed by their first byte, so the scan of ~40 MB of mostly
/// binary voxels against a few hundred identifiers stays well under a second.
fn leaks<'a>(
    haystacks: impl IntoIterator<Item = (String, Vec<u8>)>,
    identifiers: &'a [String],
) -> Vec<(String, &'a str)> {
    let mut by_first: Vec<Vec<(Vec<u8>, &'a str)>> = vec![Vec::new(); 256];
    for id in identifiers.iter().filter(|i| !i.is_empty()) {
        let lower = id.as_bytes().to_ascii_lowercase();
        by_first[lower[0] as usize].push((lower, id.as_str()));
    }
    let mut found = Vec::new();
    for (name, mut bytes) in haystacks {
        bytes.make_ascii_lowercase();
        let mut hits: Vec<&'a str> = Vec::new();
        for (at, &b) in bytes.iter().enumerate() {
            for (needle, original) in &by_first[b as usize] {
                if bytes[at..].starts_with(needle) && !hits.contains(original) {
                    hits.push(original);
                }
            }
        }
        found.extend(hits.into_iter().map(|h| (name.clone(), h)));
    }
    found
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after `limit`.
fn wait_for<T>(
    what: &str,
    limit: Duration,
    bridge: &mut BridgeProcess,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        bridge.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The case ids a bridge log names as imported.
fn bridge_imported(log: &Path) -> Vec<String> {
    strip_ansi(&std::fs::read_to_string(log).unwrap_or_default())
        .lines()
        .filter(|l| l.contains("series imported"))
        .filter_map(|l| l.split("case=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}

/// Reasons of refused series in the spool, if any.
fn refusals(spool: &Path) -> Result<Vec<String>> {
    let dir = spool.join(REFUSED_DIR);
    if !dir.exists() {
        return Ok(Vec::new());
    }
    Ok(files_under(&dir)?
        .into_iter()
        .filter(|p| p.ends_with("reason.txt"))
        .map(|p| {
            format!(
                "{}: {}",
                p.display(),
                std::fs::read_to_string(&p).unwrap_or_default()
            )
        })
        .collect())
}

/// Writes an untrained, seeded U-Net bundle (small: base 8, depth 2) with the default classes.
fn tiny_bundle(dir: &Path) -> Result<()> {
    let mut cfg = TrainConfig::default();
    cfg.model.base = 8;
    cfg.model.depth = 2;
    cfg.validate()?;
    let (_, vars) = unet::build(&cfg.model, &Device::Cpu, 5)?;
    let manifest = export::manifest_for(
        &cfg,
        "untrained-unet-b8-d2",
        Provenance {
            training_run: "untrained (seed 5)".into(),
            sites: vec![],
            cases: 0,
            created: rfc3339_utc(std::time::SystemTime::now()),
            cosilo_version: env!("CARGO_PKG_VERSION").into(),
        },
        Metrics {
            dice: vec![],
            cases: 0,
        },
    );
    export::write_bundle(dir, &cfg.model, &vars, &manifest)?;
    Ok(())
}

/// Raw bytes of a REST path (Orthanc's harness parses JSON only).
fn rest_bytes(orthanc: &Orthanc, path: &str, out: &Path) -> Result<()> {
    let url = format!("http://127.0.0.1:{}{}", orthanc.http_port, path);
    let st = Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "30", "-o"])
        .arg(out)
        .arg(&url)
        .status()
        .context("running curl")?;
    ensure!(st.success(), "GET {url} failed");
    Ok(())
}

/// The Orthanc id of the study with `study_uid`.
fn orthanc_study(orthanc: &Orthanc, study_uid: &str) -> Result<String> {
    let found = orthanc.post_json(
        "/tools/find",
        &json!({"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}),
    )?;
    match found.as_array().map(|a| a.as_slice()) {
        Some([Value::String(id)]) => Ok(id.clone()),
        _ => bail!("Orthanc has no single study {study_uid}: {found}"),
    }
}

#[test]
fn pacs_roundtrip_deidentifies_imports_and_writes_back_a_seg() -> Result<()> {
    let t_all = Instant::now();
    let mut t = Instant::now();
    let mut timings = Timings::default();
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();

    // --- Data: the real CT and a cohort case as MR, with realistic identities. ---
    let cache = default_cache_dir();
    let cohort_dir = root.join("cohort");
    let manifest = cohort::build_cohort(&cache, &cohort_dir, &CohortSpec::new(7, "0,0,0", 1)?)
        .context("building a one-case-per-hospital cohort (run `cosilo data fetch` first)")?;
    let data_dir = root.join("dicom");
    let report = write_dicom_data(&cache, &data_dir, Some(&cohort_dir))?;
    let (mr_dir, mr_case, _) = report.mr.clone().context("no MR series written")?;
    ensure!(
        report.ct_files == 108,
        "{} CT instances, not 108",
        report.ct_files
    );
    let ct = uploaded_series(&report.ct_dir)?;
    let mr = uploaded_series(&mr_dir)?;
    let mr_source = read_nifti(
        manifest
            .cases
            .iter()
            .find(|c| c.case_id == mr_case)
            .context("the MR case is not in the manifest")?
            .image_path(&cohort_dir),
    )?;
    let ct_source = read_cranium_ct(&cached_path(
        &cache,
        &INVESALIUS_CT,
        &INVESALIUS_CT.files[0],
    ))?;
    timings.lap("cohort + DICOM series written", &mut t);

    // --- The PACS, with both studies. ---
    let bridge_port = free_port()?;
    let mut orthanc = Orthanc::start(OUR_AE, bridge_port)?;
    timings.lap("Orthanc started", &mut t);
    for f in ct.files.iter().chain(&mr.files) {
        orthanc.upload(f)?;
    }
    ensure!(orthanc.instances()?.len() == ct.files.len() + mr.files.len());
    ensure!(
        orthanc.studies()?.len() == 2,
        "two studies expected in Orthanc"
    );
    timings.lap("uploaded 2 series to Orthanc (REST)", &mut t);

    // --- The bridge into a store, with a short quiet period. ---
    let secret = root.join("deid.key");
    cosilo_tests::bridge_process::write_key(&secret, b"h8 pacs round-trip test secret, 32+ bytes")?;
    let mut cfg = BridgeConfig::default_config()?;
    cfg.state_dir = root.join("bridge-state");
    cfg.network.ae_title = OUR_AE.into();
    cfg.network.bind = format!("127.0.0.1:{bridge_port}").parse()?;
    cfg.network.spool_dir = root.join("spool");
    cfg.network.outbox_dir = root.join("outbox");
    cfg.network.reserve_bytes = 64 << 20;
    cfg.network.pacs = Some(PeerAe::new(&orthanc.aet, &orthanc.dicom_addr(), OUR_AE));
    // Retry write-back every second while Orthanc is down (the defaults wait 30 s and more).
    cfg.network.outbox_max_attempts = 100;
    cfg.network.outbox_base_delay_s = 1;
    cfg.network.outbox_max_delay_s = 1;
    cfg.deid.secret_file = secret;
    cfg.deid.date_policy = DatePolicy::ShiftPerPatient { max_days: 365 };
    cfg.assembly.quiet_period_s = 1;
    cfg.assembly.poll_interval_ms = 100;
    cfg.validate()?;
    let config_path = root.join("bridge.toml");
    std::fs::write(&config_path, toml::to_string(&cfg)?)?;
    let spool = cfg.network.spool_dir.clone();
    let store_dir = root.join("store");
    let bin = cosilo_with_bridge()?;
    let mut bridge = BridgeProcess::start(
        &bin,
        &config_path,
        &store_dir,
        root.join("bridge-1.log"),
        "info",
    )?;
    let pacs = PeerAe::new(&orthanc.aet, &orthanc.dicom_addr(), OUR_AE);
    scu::echo(&pacs)?;
    timings.lap("bridge started", &mut t);

    // --- Query/retrieve: C-FIND by modality and by description, C-MOVE to ourselves. ---
    let mr_found = scu::find(
        &pacs,
        QueryLevel::Study,
        &QueryFilter {
            modality: Some("MR".into()),
            ..Default::default()
        },
    )?;
    let ct_found = scu::find(
        &pacs,
        QueryLevel::Study,
        &QueryFilter {
            study_description: Some("CT HEAD*".into()),
            ..Default::default()
        },
    )?;
    let uids = |m: &[scu::FindMatch]| m.iter().map(|x| x.study_uid.clone()).collect::<Vec<_>>();
    assert_eq!(
        uids(&mr_found),
        std::slice::from_ref(&mr.study_uid),
        "C-FIND by modality MR"
    );
    assert_eq!(
        uids(&ct_found),
        std::slice::from_ref(&ct.study_uid),
        "C-FIND by description CT HEAD*"
    );
    timings.lap("C-FIND x2", &mut t);
    for (study_uid, n) in [
        (&ct.study_uid, ct.files.len()),
        (&mr.study_uid, mr.files.len()),
    ] {
        let target = MoveTarget::Study {
            study_uid: study_uid.clone(),
        };
        let outcome = scu::move_(&pacs, &target, OUR_AE)?;
        assert_eq!(
            (outcome.completed as usize, outcome.failed),
            (n, 0),
            "C-MOVE of {study_uid}: {outcome:?}"
        );
    }
    timings.lap(
        "C-MOVE x2 (Orthanc → bridge SCP, de-identified, spooled)",
        &mut t,
    );

    // --- Assembly into the store: both series handed over (moved to done/), then a clean stop. ---
    let imported = wait_for(
        "both series imported",
        Duration::from_secs(60),
        &mut bridge,
        || {
            let refused = refusals(&spool)?;
            ensure!(refused.is_empty(), "series refused: {refused:?}");
            let ids = bridge_imported(&root.join("bridge-1.log"));
            Ok((ids.len() >= 2).then_some(ids))
        },
    )?;
    timings.lap("assembled + imported into the store", &mut t);
    let bridge_log_1 = bridge.log_text();
    let said = bridge.stop()?;
    assert!(
        said.iter()
            .any(|l| l.contains("2 series imported, 0 refused")),
        "bridge output: {said:?}"
    );
    let store = Store::open(&store_dir)?;
    let case_ids = store.case_ids(None)?;
    let mut sorted_imported = imported.clone();
    sorted_imported.sort();
    assert_eq!(
        case_ids, sorted_imported,
        "the store holds what the bridge logged"
    );

    let mapping = MappingStore::open(&root.join("bridge-state"))?;
    let mut by_series: BTreeMap<String, String> = BTreeMap::new(); // original series → case id
    for id in &case_ids {
        let (_, pseudo_series) = id
            .rsplit_once('-')
            .ok_or_else(|| anyhow!("case id {id} is not <pseudonym>-<series UID>"))?;
        let original = mapping
            .original_uid(pseudo_series)
            .ok_or_else(|| anyhow!("mapping store lacks series {pseudo_series}"))?;
        by_series.insert(original, id.clone());
    }
    for (name, up, source) in [("CT", &ct, &ct_source), ("MR", &mr, &mr_source)] {
        let id = by_series
            .get(&up.series_uid)
            .ok_or_else(|| anyhow!("no case for the {name} series"))?;
        let case = store.load_case(id)?;
        let g = &case.image.geometry;
        assert_eq!(g.dims, up.geometry.dims, "{name} dims");
        let d = max_affine_diff(g, &up.geometry);
        assert!(
            d < 1e-3,
            "{name}: stored affine {:?} differs from the uploaded tags' {:?} by {d}",
            g.affine,
            up.geometry.affine
        );
        assert!(
            g.same_grid(&source.geometry, 1e-3),
            "{name}: stored grid differs from the volume the series was written from"
        );
        let worst = case
            .image
            .data
            .iter()
            .zip(&source.data)
            .map(|(a, b)| (a - b).abs() as f64)
            .fold(0.0, f64::max);
        assert!(
            worst <= up.half_slope + 1e-3,
            "{name}: voxel values differ by up to {worst} (int16 rescale allows {})",
            up.half_slope
        );
        eprintln!(
            "{name}: case {id}, dims {:?}, spacing {:?}, affine diff {d:.2e}, max voxel diff {worst:.4}",
            g.dims,
            g.spacing()
        );
    }

    // --- Nothing identifying in the store or the spool. ---
    let identifiers: Vec<String> = ct
        .identifiers
        .iter()
        .chain(&mr.identifiers)
        .cloned()
        .collect();
    ensure!(
        identifiers.len() > 200,
        "{} identifiers collected",
        identifiers.len()
    );
    // The scan itself works: an uploaded file is full of them.
    let control = leaks(
        [("control".to_string(), std::fs::read(&mr.files[0])?)],
        &identifiers,
    );
    for must in [&mr.study_uid, &mr.series_uid, &mr.sop_uids[0]] {
        assert!(
            control.iter().any(|(_, id)| id == must),
            "the scan misses {must} in an original file"
        );
    }
    let mut haystacks = Vec::new();
    for f in files_under(&store_dir)?
        .into_iter()
        .chain(files_under(&spool)?)
    {
        haystacks.push((f.display().to_string(), std::fs::read(&f)?));
    }
    haystacks.push(("bridge log".into(), bridge_log_1.into_bytes()));
    let scanned = haystacks.len();
    for id in &case_ids {
        let meta = serde_json::to_vec(&store.case_meta(id)?)?;
        haystacks.push((format!("metadata of case {id}"), meta));
        haystacks.push((format!("case id {id}"), id.as_bytes().to_vec()));
    }
    let found = leaks(haystacks, &identifiers);
    assert!(found.is_empty(), "identifiers left behind: {found:?}");
    eprintln!(
        "de-identification: {} identifiers, none in {scanned} files under store + spool",
        identifiers.len()
    );
    timings.lap("leak scan", &mut t);

    // --- The same study moved again: same pseudonym, same case. ---
    let mr_case_id = by_series[&mr.series_uid].clone();
    let ct_case_id = by_series[&ct.series_uid].clone();
    for id in [&mr_case_id, &ct_case_id] {
        assert_eq!(store.case_meta(id)?.split, Split::Unlabelled, "{id}");
    }
    let (pseudo_patient, pseudo_series) = mr_case_id
        .rsplit_once('-')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .ok_or_else(|| anyhow!("bad case id"))?;
    let pseudo_study = done_study_of(&spool, &pseudo_series)?;
    assert_eq!(
        mapping.original_uid(&pseudo_study).as_deref(),
        Some(mr.study_uid.as_str()),
        "the spooled study maps back to the uploaded one"
    );
    let spooled = spool.join(&pseudo_study).join(&pseudo_series);
    let before = store.case_meta(&mr_case_id)?;
    drop(store); // one process at a time may open the store

    let mut bridge = BridgeProcess::start(
        &bin,
        &config_path,
        &store_dir,
        root.join("bridge-2.log"),
        "info",
    )?;
    let outcome = scu::move_(
        &pacs,
        &MoveTarget::Study {
            study_uid: mr.study_uid.clone(),
        },
        OUR_AE,
    )?;
    assert_eq!(outcome.completed as usize, mr.files.len());
    let again = wait_for(
        "the re-sent series to be imported",
        Duration::from_secs(30),
        &mut bridge,
        || {
            let refused = refusals(&spool)?;
            ensure!(refused.is_empty(), "series refused: {refused:?}");
            // Handled once its folder left the spool's queue (merged into done/).
            Ok((!spooled.exists()).then(|| bridge_imported(&root.join("bridge-2.log"))))
        },
    )?;
    // The same case, unchanged: nothing is logged as an import (INFO says only what changed).
    assert!(
        again.is_empty(),
        "a resend that changed nothing was logged as an import: {again:?}"
    );
    bridge.stop()?;
    let store = Store::open(&store_dir)?;
    assert_eq!(
        store.case_ids(None)?,
        case_ids,
        "moving the study again made new cases"
    );
    let after = store.case_meta(&mr_case_id)?;
    assert_eq!(after.image_sha256, before.image_sha256);
    assert_eq!(after.geometry, before.geometry);
    drop(store);
    eprintln!(
        "second C-MOVE after a bridge restart: same case {mr_case_id} (patient pseudonym {pseudo_patient})"
    );
    timings.lap("bridge restart + second C-MOVE, idempotent", &mut t);

    // --- The SDK segments the de-identified MR series; a SEG against the original goes back. ---
    let bundle = root.join("bundle");
    tiny_bundle(&bundle)?;
    let segmenter = Segmenter::open_with(
        &bundle,
        &SegmenterOptions {
            intra_threads: Some(2),
            ..Default::default()
        },
    )?;
    let done_series = spool
        .join(DONE_DIR)
        .join(&pseudo_study)
        .join(&pseudo_series);
    let (segmentation, pseudo) = segmenter.segment_dicom_series(&done_series)?;
    let labels = segmentation.labels;
    assert_eq!(labels.geometry.dims, mr.geometry.dims);
    assert!(max_affine_diff(&labels.geometry, &mr.geometry) < 1e-3);
    let segments = segments_for_classes(&segmenter.manifest().classes);
    let present: Vec<u8> = segments
        .iter()
        .map(|s| s.label_value)
        .filter(|v| labels.data.contains(v))
        .collect();
    ensure!(
        !present.is_empty(),
        "the untrained model labelled everything background; the SEG would be empty"
    );
    timings.lap("bundle exported + SDK segmented the MR", &mut t);

    // Re-identification through the bridge's API: the mapping store gives the UIDs and PatientID
    // back, a C-FIND of the study at the PACS the other patient and study attributes.
    let mr_study_id = orthanc_study(&orthanc, &mr.study_uid)?;
    let study_tags = orthanc.get(&format!("/studies/{mr_study_id}"))?;
    let original = writeback::reidentify_at_pacs(&pseudo, &mapping, &pacs)?;
    let sop_order: Vec<String> = original
        .sop_instances
        .iter()
        .map(|s| s.instance_uid.clone())
        .collect();
    assert_eq!(
        sop_order, mr.sop_uids,
        "re-identified instances in the uploaded slice order"
    );
    assert_eq!(original.series_uid, mr.series_uid);
    assert_eq!(original.study_uid, mr.study_uid);
    let tag = |group: &str, name: &str| study_tags[group][name].as_str().unwrap_or("").to_string();
    for (what, got, pacs_says) in [
        (
            "PatientID",
            &original.study.patient_id,
            tag("PatientMainDicomTags", "PatientID"),
        ),
        (
            "PatientName",
            &original.study.patient_name,
            tag("PatientMainDicomTags", "PatientName"),
        ),
        (
            "PatientBirthDate",
            &original.study.patient_birth_date,
            tag("PatientMainDicomTags", "PatientBirthDate"),
        ),
        (
            "AccessionNumber",
            &original.study.accession_number,
            tag("MainDicomTags", "AccessionNumber"),
        ),
        (
            "StudyDate",
            &original.study.study_date,
            tag("MainDicomTags", "StudyDate"),
        ),
    ] {
        assert!(!pacs_says.is_empty(), "Orthanc has no {what}");
        assert_eq!(
            got, &pacs_says,
            "re-identified {what} (C-FIND) equals Orthanc's record"
        );
    }

    // `cosilo writeback` segments the case, writes the SEG and queues it (durably) in the outbox.
    let out = Command::new(&bin)
        .args([
            "writeback",
            "--threads",
            "2",
            "--case",
            &mr_case_id,
            "--config",
        ])
        .arg(&config_path)
        .arg("--bundle")
        .arg(&bundle)
        .env("NO_COLOR", "1")
        .output()
        .context("running cosilo writeback")?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && said.starts_with("queued "),
        "cosilo writeback failed:\n{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let outbox = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())?;
    let queued = outbox.pending()?;
    assert_eq!(queued.len(), 1, "one SEG queued: {said}");
    assert_eq!(queued[0].attempts, 0);

    // The PACS goes down; the bridge's outbox fails, keeps the item and retries; the PACS comes
    // back and the bridge delivers it.
    orthanc.stop();
    let mut bridge = BridgeProcess::start(
        &bin,
        &config_path,
        &store_dir,
        root.join("bridge-3.log"),
        "info",
    )?;
    wait_for(
        "a failed write-back attempt while the PACS is down",
        Duration::from_secs(30),
        &mut bridge,
        || {
            let items = outbox.pending()?;
            Ok(items
                .first()
                .is_some_and(|i| i.attempts >= 1 && i.last_error.is_some())
                .then_some(()))
        },
    )?;
    assert!(outbox.dead()?.is_empty(), "given up too early");
    assert!(
        bridge.log_text().contains("write-back failed, will retry"),
        "the bridge logs the failed attempt"
    );
    orthanc.restart()?;
    wait_for(
        "the bridge to deliver the SEG once the PACS is back",
        Duration::from_secs(60),
        &mut bridge,
        || Ok(outbox.pending()?.is_empty().then_some(())),
    )?;
    assert!(outbox.dead()?.is_empty(), "the SEG was given up");
    assert!(
        bridge.log_text().contains("write-back sent"),
        "the bridge logs the delivery"
    );
    timings.lap(
        "cosilo writeback (SEG queued), PACS down, bridge retried + C-STOREd",
        &mut t,
    );

    // --- The SEG is in the MR study in Orthanc; read it back independently. ---
    ensure!(orthanc.studies()?.len() == 2, "the SEG made a new study");
    let series = orthanc.get(&format!("/studies/{mr_study_id}/series"))?;
    let seg_series: Vec<&Value> = series
        .as_array()
        .context("series list")?
        .iter()
        .filter(|s| s["MainDicomTags"]["Modality"] == "SEG")
        .collect();
    assert_eq!(
        seg_series.len(),
        1,
        "one SEG series in the MR study: {series}"
    );
    let instances = seg_series[0]["Instances"].as_array().context("instances")?;
    assert_eq!(instances.len(), 1);
    let instance = instances[0].as_str().context("instance id")?;
    let back = root.join("seg-from-orthanc.dcm");
    rest_bytes(&orthanc, &format!("/instances/{instance}/file"), &back)?;

    let labels_raw = root.join("labels.u8");
    std::fs::write(&labels_raw, &labels.data)?;
    let spec = json!({
        "seg": back,
        "source_files": mr.files,
        "labels": labels_raw,
        "dims": labels.geometry.dims,
        "segments": segments.iter().map(|s| json!({"label": s.label, "value": s.label_value})).collect::<Vec<_>>(),
    });
    let spec_path = root.join("check.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec)?)?;
    let script = cosilo_tests::workspace_root().join("tests/py/check_seg.py");
    let out = Command::new(cosilo_tests::python())
        .arg(&script)
        .arg(&spec_path)
        .output()
        .with_context(|| {
            format!(
                "running {} (the project venv: scripts/test.sh)",
                cosilo_tests::python()
            )
        })?;
    assert!(
        out.status.success(),
        "check_seg.py failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "check_seg.py: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let dv = Command::new("dciodvfy")
        .arg(&back)
        .output()
        .context("running dciodvfy (apt-get install dicom3tools)")?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&dv.stdout),
        String::from_utf8_lossy(&dv.stderr)
    );
    let errors: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("Error") || l.starts_with("Abort"))
        .collect();
    assert!(
        dv.status.success() && errors.is_empty() && report.contains("Segmentation"),
        "dciodvfy did not validate the SEG as a Segmentation without errors:\n{report}"
    );
    eprintln!(
        "dciodvfy: 0 errors, {} warnings",
        report.lines().filter(|l| l.starts_with("Warning")).count()
    );
    timings.lap(
        "SEG downloaded, checked (pydicom, highdicom, dciodvfy)",
        &mut t,
    );

    // --- The loop closed: the study moved once more brings the SEG in; the case gets labels. ---
    // (Through the same bridge process that delivered the SEG.) The image series comes again
    // unchanged (not logged as an import); the SEG makes one import: the labelled case.
    let imported_before = bridge_imported(&root.join("bridge-3.log")).len();
    let outcome = scu::move_(
        &pacs,
        &MoveTarget::Study {
            study_uid: mr.study_uid.clone(),
        },
        OUR_AE,
    )?;
    assert_eq!(
        outcome.completed as usize,
        mr.files.len() + 1,
        "{outcome:?}"
    );
    wait_for(
        "the SEG to label the case",
        Duration::from_secs(30),
        &mut bridge,
        || {
            let refused = refusals(&spool)?;
            ensure!(refused.is_empty(), "series refused: {refused:?}");
            let ids = bridge_imported(&root.join("bridge-3.log"));
            Ok((ids.len() > imported_before).then_some(()))
        },
    )?;
    bridge.stop()?;
    let store = Store::open(&store_dir)?;
    assert_eq!(store.case_ids(None)?, case_ids, "the SEG made a new case");
    let case = store.load_case(&mr_case_id)?;
    assert_eq!(
        case.meta.split,
        Split::Train,
        "a labelled case is for training"
    );
    assert_eq!(case.label.geometry, case.image.geometry);
    let differ = case
        .label
        .data
        .iter()
        .zip(&labels.data)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differ, 0,
        "labels read back from the PACS's SEG differ from the SDK's in {differ} voxels"
    );
    assert_eq!(
        store.case_meta(&ct_case_id)?.split,
        Split::Unlabelled,
        "the CT has no SEG"
    );
    drop(store);
    timings.lap("SEG moved back through the bridge: case labelled", &mut t);

    for (what, s) in &timings.0 {
        eprintln!("  {s:7.2} s  {what}");
    }
    eprintln!("  {:7.2} s  total", t_all.elapsed().as_secs_f64());
    Ok(())
}

/// The pseudonymous study folder of `series` under the spool's `done/`.
fn done_study_of(spool: &Path, series: &str) -> Result<String> {
    for entry in std::fs::read_dir(spool.join(DONE_DIR))? {
        let entry = entry?;
        if entry.path().join(series).is_dir() {
            return Ok(entry.file_name().to_string_lossy().into_owned());
        }
    }
    bail!(
        "series {series} is not under {}",
        spool.join(DONE_DIR).display()
    )
}
