//! The whole PACS bridge pipeline over the network, as separate processes: `cosilo bridge`
//! (SCP → length guard → de-identification → spool → assembly → the appliance's store) receives a
//! small CT series from dcmtk's `storescu`, then a DICOM SEG for it; a resend of the series must
//! land on the same case; no original identifier may appear in the spool or the store; and a
//! `kill -9` after instances were acknowledged but before the series was assembled must lose
//! nothing (the restarted bridge assembles and imports it, and the pseudonym table maps every
//! acknowledged UID back).
//!
//! Needs the release `cosilo` binary (`cargo build --release -p cosilo-appliance --bin cosilo`) and
//! dcmtk's `storescu`; a missing one fails the test saying so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cosilo_bridge::deid::{DatePolicy, Deidentifier, MappingStore};
use cosilo_sdk::dicom::{
    read_series_dir, write_seg, write_series, AlgorithmInfo, Modality, SegmentDescription,
    SeriesMeta,
};
use cosilo_sdk::volume::{Geometry, Volume};
use cosilo_store::{Split, Store};
use cosilo_tests::bridge_process::{assert_log_free_of, cosilo_with_bridge, BridgeProcess};

const PATIENT_NAME: &str = "Lindqvist^Ingrid";
const PATIENT_ID: &str = "PID-H9-77310";
const ACCESSION: &str = "ACCH9X4471";
/// Quiet period the test configures: a series is complete after this long without instances.
const QUIET_S: u64 = 2;

fn cosilo_bin() -> Result<PathBuf> {
    cosilo_with_bridge()
}

/// Log filter: INFO, plus the assembler's DEBUG lines (a resend that changes nothing says so only
/// there).
const RUST_LOG: &str = "info,cosilo_bridge::assemble=debug";
/// Long enough for any wait below on a loaded machine; a pass never waits for it.
const LIMIT: Duration = Duration::from_secs(60);

fn start(bin: &Path, config: &Path, store: &Path, log: &Path) -> Result<BridgeProcess> {
    BridgeProcess::start(bin, config, store, log.to_path_buf(), RUST_LOG)
}

fn write_config(root: &Path) -> Result<PathBuf> {
    cosilo_tests::bridge_process::write_config(root, QUIET_S, 3600)
}

/// dcmtk `storescu` with Nagle off; fails unless every instance was stored.
fn storescu(port: u16, files: &[PathBuf]) -> Result<()> {
    let out = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        // -R: propose only the SOP classes of the files (storescu's default list lacks SEG).
        .args(["-R", "-aec", "COSILO", "127.0.0.1", &port.to_string()])
        .args(files)
        .output()
        .context("running storescu (apt-get install dcmtk)")?;
    ensure!(
        out.status.success(),
        "storescu failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A small CT: 24×20×6 voxels, 0.8 × 0.8 × 2.5 mm, a bright block in a darker body.
fn ct_volume() -> Volume<f32> {
    let g = Geometry::axis_aligned([24, 20, 6], [0.8, 0.8, 2.5], [-10.0, 20.0, 5.0]);
    let mut data = Vec::with_capacity(g.len());
    for k in 0..6 {
        for j in 0..20 {
            for i in 0..24 {
                let inside = (6..16).contains(&i) && (5..14).contains(&j) && (1..5).contains(&k);
                data.push(if inside {
                    300.0
                } else {
                    -50.0 + (i + j + k) as f32
                });
            }
        }
    }
    Volume::new(g, data).expect("volume fills its grid")
}

fn series_meta() -> SeriesMeta {
    let mut m = SeriesMeta::new(Modality::Ct, "bridge-pipeline-h9");
    m.patient_name = PATIENT_NAME.into();
    m.patient_id = PATIENT_ID.into();
    m.accession_number = ACCESSION.into();
    m
}

/// Study, series and instance UIDs of the written files.
fn uids_of(files: &[PathBuf]) -> Result<Vec<String>> {
    use dicom::dictionary_std::tags;
    let mut uids = Vec::new();
    for f in files {
        let obj = dicom::object::open_file(f)?;
        for tag in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ] {
            let v = obj.element(tag)?.to_str()?;
            uids.push(v.trim_end_matches(['\0', ' ']).to_string());
        }
    }
    uids.sort();
    uids.dedup();
    Ok(uids)
}

/// Fails if any file under `dirs` contains one of `needles`.
fn assert_absent(dirs: &[PathBuf], needles: &[String]) -> Result<usize> {
    let mut files = 0;
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p)?;
            files += 1;
            for n in needles {
                ensure!(
                    !bytes.windows(n.len()).any(|w| w == n.as_bytes()),
                    "{} contains the original {n:?}",
                    p.display()
                );
            }
        }
    }
    Ok(files)
}

fn unlabelled_cases(store: &Store) -> Result<Vec<String>> {
    Ok(store.case_ids(Some(Split::Unlabelled))?)
}

#[test]
fn series_then_seg_through_the_running_bridge() -> Result<()> {
    let bin = cosilo_bin()?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let config = write_config(root)?;
    let store_dir = root.join("store");
    let series_dir = root.join("series");
    let files = write_series(&ct_volume(), &series_meta(), &series_dir)?;
    let source = read_series_dir(&series_dir)?;
    let mut needles: Vec<String> = vec![PATIENT_NAME.into(), PATIENT_ID.into(), ACCESSION.into()];
    needles.extend(uids_of(&files)?);
    let log = root.join("bridge.log");

    // 1. The series arrives, waits out the quiet period, and is imported unlabelled.
    let mut b = start(&bin, &config, &store_dir, &log)?;
    storescu(b.port, &files)?;
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    let case_id = {
        let store = Store::open(&store_dir)?;
        let ids = unlabelled_cases(&store)?;
        ensure!(ids.len() == 1, "expected one unlabelled case, got {ids:?}");
        ensure!(store.case_ids(None)?.len() == 1, "more than one case");
        let meta = store.case_meta(&ids[0])?;
        let g = &meta.geometry;
        ensure!(g.dims == [24, 20, 6], "dims {:?}", g.dims);
        let sp = g.spacing();
        for (a, want) in sp.iter().zip([0.8, 0.8, 2.5]) {
            ensure!((a - want).abs() < 1e-4, "spacing {sp:?}");
        }
        ensure!(
            g.same_grid(&source.volume.geometry, 1e-3),
            "stored grid differs from the series'"
        );
        ids[0].clone()
    };
    let scanned = assert_absent(&[root.join("spool"), store_dir.clone()], &needles)?;
    ensure!(scanned > 0, "no files under the spool and the store");
    for n in &needles {
        ensure!(!case_id.contains(n.as_str()), "case id {case_id} holds {n}");
    }

    // 2. A resend lands on the same case, and says nothing at INFO.
    let mut b = start(&bin, &config, &store_dir, &log)?;
    storescu(b.port, &files)?;
    b.wait_log("series handed over again; the store had it", 1, LIMIT)?;
    b.stop()?;
    ensure!(
        std::fs::read_to_string(&log)?
            .lines()
            .filter(|l| l.contains("series imported"))
            .count()
            == 1,
        "a resend that changed nothing was logged as an import"
    );
    {
        let store = Store::open(&store_dir)?;
        ensure!(
            store.case_ids(None)? == vec![case_id.clone()],
            "resend changed the cases: {:?}",
            store.case_ids(None)?
        );
    }

    // 3. A SEG for the series labels the case with exactly its labels.
    let g = source.volume.geometry.clone();
    let mut labels = Volume::filled(g.clone(), 0u8);
    for k in 0..g.dims[2] {
        for j in 0..g.dims[1] {
            for i in 0..g.dims[0] {
                let v = source.volume.get(i, j, k);
                labels.data[g.index(i, j, k)] = if v > 200.0 {
                    2
                } else if i < 4 && v < 0.0 {
                    1
                } else {
                    0
                };
            }
        }
    }
    let seg = root.join("seg.dcm");
    write_seg(
        &labels,
        &source,
        &[
            SegmentDescription::for_class(1, "csf"),
            SegmentDescription::for_class(2, "tumour"),
        ],
        &AlgorithmInfo::new("bridge-pipeline-test", "1"),
        &seg,
    )?;
    let mut b = start(&bin, &config, &store_dir, &log)?;
    storescu(b.port, std::slice::from_ref(&seg))?;
    b.wait_log("series imported", 2, LIMIT)?;
    b.stop()?;
    {
        let store = Store::open(&store_dir)?;
        ensure!(
            store.case_ids(None)? == vec![case_id.clone()],
            "the SEG changed the cases: {:?}",
            store.case_ids(None)?
        );
        let case = store.load_case(&case_id)?;
        ensure!(
            case.meta.split != Split::Unlabelled,
            "the case is still unlabelled:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        ensure!(
            case.label.data == labels.data,
            "stored labels differ from the SEG's"
        );
        let counts: Vec<u64> = (0..3u8)
            .map(|v| labels.data.iter().filter(|&&x| x == v).count() as u64)
            .collect();
        ensure!(
            case.meta.label_counts == counts,
            "label counts {:?}",
            case.meta.label_counts
        );
    }
    assert_absent(&[root.join("spool"), store_dir.clone()], &needles)?;
    assert_log_free_of(&std::fs::read_to_string(&log)?, &needles)?;
    Ok(())
}

#[test]
fn acknowledged_instances_survive_kill_9_before_assembly() -> Result<()> {
    let bin = cosilo_bin()?;
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let config = write_config(root)?;
    // A longer quiet period, so the kill surely comes before assembly.
    let text = std::fs::read_to_string(&config)?
        .replace(&format!("quiet_period_s = {QUIET_S}"), "quiet_period_s = 6");
    std::fs::write(&config, text)?;
    let store_dir = root.join("store");
    let files = write_series(&ct_volume(), &series_meta(), root.join("series"))?;
    let log = root.join("bridge.log");

    let b = start(&bin, &config, &store_dir, &log)?;
    let t0 = Instant::now();
    storescu(b.port, &files)?; // every instance acknowledged
    b.kill9()?;
    ensure!(
        t0.elapsed() < Duration::from_secs(6),
        "kill came after the quiet period"
    );
    {
        let store = Store::open(&store_dir)?;
        ensure!(
            store.case_ids(None)?.is_empty(),
            "imported before the quiet period ended"
        );
    }
    // The pseudonym table (one sync per series, the instances' own UIDs riding on the next one)
    // maps every acknowledged UID back after the kill: write-back needs each of them.
    let mapping = MappingStore::open(&root.join("state"))?;
    let keyed_hash = Deidentifier::from_key_file(&root.join("deid.key"), DatePolicy::Remove)?;
    let originals = uids_of(&files)?;
    ensure!(originals.len() == files.len() + 2, "{originals:?}");
    for o in &originals {
        ensure!(
            mapping.original_uid(&keyed_hash.remap_uid(o)).as_deref() == Some(o.as_str()),
            "an acknowledged UID is missing from the mapping after kill -9"
        );
    }
    drop(mapping);
    let mut b = start(&bin, &config, &store_dir, &log)?;
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    let store = Store::open(&store_dir)?;
    let ids = store.case_ids(Some(Split::Unlabelled))?;
    ensure!(
        ids.len() == 1,
        "after kill -9 and restart: {ids:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    ensure!(store.case_meta(&ids[0])?.geometry.dims == [24, 20, 6]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Interrupted transfers of the real 108-slice head CT: each ends with exactly one complete case
// whose voxels equal the full series, never a partial case.

/// The real CT (`cosilo data dicom`: 108 files of 256 × 256) with its identified header, and its
/// volume as the SDK reads it from the original files.
struct RealCt {
    files: Vec<PathBuf>,
    volume: Volume<f32>,
    /// Every original identifier: names, IDs, accession, birth date and all UIDs.
    needles: Vec<String>,
}

fn real_ct(root: &Path) -> Result<RealCt> {
    let cache = cosilo_lab::fetch::default_cache_dir();
    let report = cosilo_lab::dicom_data::write_dicom_data(&cache, &root.join("data"), None)
        .context("the real CT (cosilo data fetch fills the cache)")?;
    let dir = report.ct_dir;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    ensure!(
        files.len() == 108,
        "{} files in {}",
        files.len(),
        dir.display()
    );
    let volume = read_series_dir(&dir)?.volume;
    let meta = cosilo_lab::dicom_data::ct_meta();
    let mut needles = vec![
        meta.patient_name.clone(),
        meta.patient_id.clone(),
        meta.accession_number.clone(),
        meta.patient_birth_date.clone(),
        meta.referring_physician_name.clone(),
        "Moreira".to_string(),
    ];
    needles.extend(uids_of(&files)?);
    Ok(RealCt {
        files,
        volume,
        needles,
    })
}

/// pynetdicom sends the first `n` files in one association and ends it as `mode` says (see
/// tests/py/send_partial.py); returns the child once it printed "sent n".
fn send_partial(port: u16, mode: &str, n: usize, files: &[PathBuf]) -> Result<Child> {
    let script = cosilo_tests::workspace_root().join("tests/py/send_partial.py");
    let mut child = Command::new(cosilo_tests::python())
        .arg(script)
        .args([
            "127.0.0.1",
            &port.to_string(),
            "COSILO",
            mode,
            &n.to_string(),
        ])
        .args(files)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running tests/py/send_partial.py (pynetdicom in .venv)")?;
    let out = child.stdout.take().context("sender stdout")?;
    let want = format!("sent {n}");
    for line in std::io::BufRead::lines(std::io::BufReader::new(out)) {
        let line = line?;
        if line == want {
            return Ok(child);
        }
        ensure!(line.starts_with("sent "), "sender: {line}");
    }
    let status = child.wait()?;
    anyhow::bail!("the sender ended ({status}) before {want}")
}

/// Exactly one case in the store, complete: 108 slices, voxels equal to the full series. Returns
/// its id.
fn one_complete_case(store_dir: &Path, ct: &RealCt) -> Result<String> {
    let store = Store::open(store_dir)?;
    let ids = store.case_ids(None)?;
    ensure!(ids.len() == 1, "exactly one case expected, got {ids:?}");
    let case = store.load_case(&ids[0])?;
    ensure!(
        case.meta.geometry.dims == ct.volume.geometry.dims,
        "dims {:?}, the series has {:?}",
        case.meta.geometry.dims,
        ct.volume.geometry.dims
    );
    ensure!(
        case.meta.geometry.same_grid(&ct.volume.geometry, 1e-3),
        "grid differs"
    );
    ensure!(
        case.image.data == ct.volume.data,
        "voxels differ from the full series"
    );
    Ok(ids[0].clone())
}

/// Lines of the log that say a case was stored.
fn imports(log: &Path) -> Result<usize> {
    Ok(std::fs::read_to_string(log)?
        .lines()
        .filter(|l| l.contains("series imported") || l.contains("case replaced"))
        .count())
}

fn interrupted_setup(root: &Path) -> Result<(PathBuf, PathBuf, PathBuf, PathBuf, RealCt)> {
    let bin = cosilo_bin()?;
    let config = write_config(root)?;
    Ok((
        bin,
        config,
        root.join("store"),
        root.join("bridge.log"),
        real_ct(root)?,
    ))
}

#[test]
fn aborted_association_waits_and_the_resend_makes_one_complete_case() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let t0 = Instant::now();
    let mut b = start(&bin, &config, &store_dir, &log)?;
    let mut sender = send_partial(b.port, "abort", 50, &ct.files)?;
    sender.wait()?;
    // After the quiet period the 50 instances are not a case: they wait for the rest.
    b.wait_log("series incomplete, waiting for the rest", 1, LIMIT)?;
    ensure!(imports(&log)? == 0, "a partial case was imported");
    storescu(b.port, &ct.files)?;
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    one_complete_case(&store_dir, &ct)?;
    ensure!(imports(&log)? == 1);
    let lines = assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    println!(
        "aborted after 50/108, resent: one case of 108 slices in {:.1} s; {lines} log lines, no identifier",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// With a PACS configured, the bridge does not wait for a sender: an association aborted after
/// 50 of the 108 instances leaves the series interrupted, the bridge asks the PACS (a real Orthanc
/// holding the series) which instances the series has, C-MOVEs to itself exactly the 58 it lacks,
/// and imports one complete case.
#[test]
fn aborted_association_is_completed_by_the_bridges_own_c_move() -> Result<()> {
    use cosilo_tests::orthanc::{free_port, Orthanc};
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let port = free_port()?;
    let orthanc = Orthanc::start("COSILO", port)?;
    for f in &ct.files {
        orthanc.upload(f)?;
    }
    let text = std::fs::read_to_string(&config)?.replace(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"127.0.0.1:{port}\""),
    );
    ensure!(text.contains(&format!("127.0.0.1:{port}")), "bind not set");
    let text = format!(
        "{text}\n[network.pacs]\nae_title = {:?}\naddress = {:?}\ncalling_ae = \"COSILO\"\ntimeout_s = 30\n",
        orthanc.aet,
        orthanc.dicom_addr()
    );
    std::fs::write(&config, text)?;
    let t0 = Instant::now();
    let mut b = start(&bin, &config, &store_dir, &log)?;
    ensure!(
        b.port == port,
        "the bridge listens on {} not {port}",
        b.port
    );
    send_partial(b.port, "abort", 50, &ct.files)?.wait()?;
    b.wait_log("asked the PACS for the missing instances", 1, LIMIT)?;
    b.wait_log("series imported", 1, LIMIT)?;
    let text = b.log_text();
    b.stop()?;
    let asked = text
        .lines()
        .find(|l| l.contains("asked the PACS for the missing instances"))
        .context("no fetch line")?;
    for field in [
        "at_pacs=108",
        "held=50",
        "requested=58",
        "moved=58",
        "failed=0",
    ] {
        ensure!(asked.contains(field), "{field} not in {asked:?}");
    }
    one_complete_case(&store_dir, &ct)?;
    ensure!(imports(&log)? == 1, "one import expected");
    let lines = assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    println!(
        "aborted after 50/108, the bridge C-MOVEd the 58 missing from Orthanc: one case of 108 \
         slices in {:.1} s; {lines} log lines, no identifier",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn killed_sender_waits_and_the_resend_makes_one_complete_case() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let t0 = Instant::now();
    let mut b = start(&bin, &config, &store_dir, &log)?;
    // The sender dies without a release or an abort (its socket is closed by the kernel).
    let mut sender = send_partial(b.port, "hold", 12, &ct.files)?;
    sender.kill()?;
    sender.wait()?;
    b.wait_log("series incomplete, waiting for the rest", 1, LIMIT)?;
    ensure!(imports(&log)? == 0, "a partial case was imported");
    storescu(b.port, &ct.files)?;
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    one_complete_case(&store_dir, &ct)?;
    assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    println!(
        "sender killed after 12/108, resent: one case of 108 slices in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn killed_bridge_resent_late_makes_one_complete_case() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let t0 = Instant::now();
    let b = start(&bin, &config, &store_dir, &log)?;
    let mut sender = send_partial(b.port, "hold", 8, &ct.files)?;
    b.kill9()?; // mid-association: 8 instances acknowledged and durable, no release
    sender.kill()?;
    sender.wait()?;
    let mut b = start(&bin, &config, &store_dir, &log)?;
    // The restarted bridge finds the 8 without a clean release: they wait, past the quiet period.
    b.wait_log("series incomplete, waiting for the rest", 1, LIMIT)?;
    ensure!(imports(&log)? == 0, "a partial case was imported");
    storescu(b.port, &ct.files)?; // resent late: after the quiet period
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    one_complete_case(&store_dir, &ct)?;
    assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    println!(
        "bridge killed after 8/108, restarted, resent late: one case of 108 slices in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn gap_filled_late_makes_one_complete_case() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let t0 = Instant::now();
    let mut b = start(&bin, &config, &store_dir, &log)?;
    let mut most = ct.files.clone();
    let missing = most.remove(53);
    storescu(b.port, &most)?;
    b.wait_log("series refused", 1, LIMIT)?;
    ensure!(imports(&log)? == 0, "a case with a gap was imported");
    // The refusal names no spool path (they move) and no identifier.
    let refusal = std::fs::read_to_string(&log)?
        .lines()
        .find(|l| l.contains("series refused"))
        .unwrap_or_default()
        .to_string();
    ensure!(
        !refusal.contains("/spool/"),
        "refusal cites a spool path: {refusal}"
    );
    storescu(b.port, std::slice::from_ref(&missing))?;
    b.wait_log("series imported", 1, LIMIT)?;
    b.stop()?;
    one_complete_case(&store_dir, &ct)?;
    ensure!(imports(&log)? == 1);
    assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    println!(
        "107/108 refused for the gap, the 108th alone later: one case of 108 slices in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

#[test]
fn a_partial_case_is_replaced_by_the_complete_series_with_its_reason() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let (bin, config, store_dir, log, ct) = interrupted_setup(tmp.path())?;
    let mut b = start(&bin, &config, &store_dir, &log)?;
    // A sender that releases after 50: no evidence says the series is incomplete.
    let mut sender = send_partial(b.port, "release", 50, &ct.files)?;
    sender.wait()?;
    b.wait_log("series imported", 1, LIMIT)?;
    storescu(b.port, &ct.files)?;
    b.wait_log("case replaced by a more complete series", 1, LIMIT)?;
    // `cases remove` while the bridge process runs and holds the store: refused, saying why.
    let out = Command::new(&bin)
        .args(["cases", "--store"])
        .arg(&store_dir)
        .args(["remove", "any-case"])
        .output()?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use"),
        "remove while the bridge runs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.check_alive()?;
    b.stop()?;
    // Nothing was changed by the refused remove.
    let id = one_complete_case(&store_dir, &ct)?;
    let history = Store::open(&store_dir)?.case_history(&id)?;
    ensure!(history.len() == 1, "{history:?}");
    ensure!(
        history[0].reason.contains("108") && history[0].reason.contains("50"),
        "{history:?}"
    );
    // Managed from the command line too (the bridge is stopped: the store is free). While a
    // process holds the store, `cases` changes nothing and says why.
    let holder = Store::open(&store_dir)?;
    let out = Command::new(&bin)
        .args(["cases", "--store"])
        .arg(&store_dir)
        .args(["remove", &id])
        .output()?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(holder);
    let out = Command::new(&bin)
        .args(["cases", "--store"])
        .arg(&store_dir)
        .arg("list")
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list = String::from_utf8_lossy(&out.stdout);
    ensure!(list.contains(&id) && list.contains("256x256x108"), "{list}");
    let out = Command::new(&bin)
        .args(["cases", "--store"])
        .arg(&store_dir)
        .args(["show", &id])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("series resent"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(&bin)
        .args(["cases", "--store"])
        .arg(&store_dir)
        .args(["remove", &id])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(Store::open(&store_dir)?.case_ids(None)?.is_empty());
    assert_log_free_of(&std::fs::read_to_string(&log)?, &ct.needles)?;
    Ok(())
}

/// Identified data through every refusal and error path the bridge has, at DEBUG: not one log
/// line names an original identifier.
#[test]
fn identifiers_never_reach_the_log_on_any_refusal_path() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    let (bin, config, store_dir, log, ct) = interrupted_setup(root)?;
    // Bad variants of a real, identified instance, written by pydicom.
    let bad = root.join("bad");
    std::fs::create_dir_all(&bad)?;
    let code = format!(
        "import pydicom\nsrc = {src:?}\nout = {out:?}\n\
         ds = pydicom.dcmread(src); ds.BurnedInAnnotation = 'YES'; ds.save_as(out + '/burned.dcm')\n\
         ds = pydicom.dcmread(src); ds.PixelData = ds.PixelData[:1000]; ds.save_as(out + '/short.dcm')\n\
         ds = pydicom.dcmread(src); del ds.StudyInstanceUID; ds.save_as(out + '/nostudy.dcm')\n",
        src = ct.files[0].display().to_string(),
        out = bad.display().to_string()
    );
    let out = Command::new(cosilo_tests::python())
        .args(["-c", &code])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let send_as_is = cosilo_tests::workspace_root().join("bridge/tests/py/send_as_is.py");

    let mut b = BridgeProcess::start(&bin, &config, &store_dir, log.clone(), "debug")?;
    let port = b.port.to_string();
    // 1. Refused instances: burned-in text, short pixel data, no StudyInstanceUID.
    let out = Command::new(cosilo_tests::python())
        .arg(&send_as_is)
        .args(["127.0.0.1", &port, "COSILO"])
        .args(["burned.dcm", "short.dcm", "nostudy.dcm"].map(|f| bad.join(f)))
        .output()?;
    let answers = String::from_utf8_lossy(&out.stdout);
    ensure!(
        answers.lines().count() == 3 && !answers.contains("\"status\": 0,"),
        "every bad instance refused: {answers}"
    );
    // 2. Wrong called AE title.
    let out = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", "NOT-COSILO", "127.0.0.1", &port])
        .arg(&ct.files[0])
        .output()?;
    ensure!(!out.status.success(), "a wrong called AE must be rejected");
    // 3. An aborted association and a killed sender.
    send_partial(b.port, "abort", 3, &ct.files)?.wait()?;
    let mut s = send_partial(b.port, "hold", 2, &ct.files[3..])?;
    s.kill()?;
    s.wait()?;
    b.wait_log("series incomplete, waiting for the rest", 1, LIMIT)?;
    // 4. A series with a gap, refused.
    let mut gap = ct.files[10..20].to_vec();
    gap.remove(4);
    storescu(b.port, &gap)?;
    b.wait_log("series refused", 1, LIMIT)?;
    // 5. A default storescu association (many contexts rejected) for the rest of the series.
    storescu_default(b.port, &ct.files[20..])?;
    b.stop()?;
    let text = std::fs::read_to_string(&log)?;
    for expected in [
        "BurnedInAnnotation is YES",
        "unusable pixel data",
        "StudyInstanceUID",
        "called AE title is not ours",
        "peer aborted",
        "connection lost",
        "presentation contexts rejected",
    ] {
        ensure!(
            text.to_lowercase().contains(&expected.to_lowercase()),
            "the log never shows {expected:?}: the path was not exercised\n{text}"
        );
    }
    // One INFO line per association for its rejected contexts, not one per context.
    let rejected_info = text
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("presentation contexts rejected"))
        .count();
    ensure!(
        rejected_info == 1,
        "{rejected_info} INFO lines for rejected contexts"
    );
    let lines = assert_log_free_of(&text, &ct.needles)?;
    println!(
        "{lines} DEBUG log lines scanned for {} identifiers: none found",
        ct.needles.len()
    );
    Ok(())
}

/// dcmtk `storescu` with its default (long) list of proposed contexts.
fn storescu_default(port: u16, files: &[PathBuf]) -> Result<()> {
    let out = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", "COSILO", "127.0.0.1", &port.to_string()])
        .args(files)
        .output()
        .context("running storescu")?;
    ensure!(
        out.status.success(),
        "storescu failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
