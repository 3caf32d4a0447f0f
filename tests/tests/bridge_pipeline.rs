//! The whole PACS bridge pipeline over the network, as separate processes: `cosilo bridge`
//! (SCP → length guard → de-identification → spool → assembly → the appliance's store) receives a
//! small CT series from dcmtk's `storescu`, then a DICOM SEG for it; a resend of the series must
//! land on the same case; no original identifier may appear in the spool or the store; and a
//! `kill -9` after instances were acknowledged but before the series was assembled must lose
//! nothing (the restarted bridge assembles and imports it).
//!
//! Needs the release `cosilo` binary (`cargo build --release -p cosilo-appliance --bin cosilo`) and
//! dcmtk's `storescu`; a missing one fails the test saying so.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cosilo_sdk::dicom::{
    read_series_dir, write_seg, write_series, AlgorithmInfo, Modality, SegmentDescription,
    SeriesMeta,
};
use cosilo_sdk::volume::{Geometry, Volume};
use cosilo_store::{Split, Store};

const PATIENT_NAME: &str = "Lindqvist^Ingrid";
const PATIENT_ID: &str = "PID-H9-77310";
const ACCESSION: &str = "ACCH9X4471";
/// Quiet period the test configures: a series is complete after this long without instances.
const QUIET_S: u64 = 2;

fn cosilo_bin() -> Result<PathBuf> {
    let bin = cosilo_tests::workspace_root().join("target/release/cosilo");
    let ok = Command::new(&bin)
        .args(["bridge", "--help"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ensure!(
        ok,
        "{} has no `bridge` command: cargo build --release -p cosilo-appliance --bin cosilo",
        bin.display()
    );
    Ok(bin)
}

/// A bridge configuration under `root`: loopback port 0, short quiet period, no disk reserve.
fn write_config(root: &Path) -> Result<PathBuf> {
    let secret = root.join("deid.key");
    std::fs::write(&secret, b"bridge-pipeline-test-secret-0123456789")?;
    let mut text = cosilo_bridge::pipeline::DEFAULT_CONFIG.to_string();
    for (from, to) in [
        (
            "state_dir = \"/var/lib/cosilo/bridge\"".to_string(),
            format!("state_dir = {:?}", root.join("state")),
        ),
        (
            "bind = \"0.0.0.0:11112\"".into(),
            "bind = \"127.0.0.1:0\"".into(),
        ),
        (
            "spool_dir = \"/var/lib/cosilo/spool\"".into(),
            format!("spool_dir = {:?}", root.join("spool")),
        ),
        (
            "reserve_bytes = 5368709120".into(),
            "reserve_bytes = 0".into(),
        ),
        (
            "outbox_dir = \"/var/lib/cosilo/outbox\"".into(),
            format!("outbox_dir = {:?}", root.join("outbox")),
        ),
        (
            "secret_file = \"/etc/cosilo/deid.key\"".into(),
            format!("secret_file = {secret:?}"),
        ),
        (
            "quiet_period_s = 30".into(),
            format!("quiet_period_s = {QUIET_S}"),
        ),
        (
            "poll_interval_ms = 1000".into(),
            "poll_interval_ms = 200".into(),
        ),
    ] {
        ensure!(text.contains(&from), "default config lacks {from}");
        text = text.replace(&from, &to);
    }
    let path = root.join("bridge.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// `cosilo bridge` as a child process; SIGTERMed (then killed) on drop.
struct BridgeProcess {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl BridgeProcess {
    fn start(bin: &Path, config: &Path, store: &Path, log: PathBuf) -> Result<BridgeProcess> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut child = Command::new(bin)
            .args(["bridge", "--hospital", "h9", "--config"])
            .arg(config)
            .arg("--store")
            .arg(store)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .context("starting cosilo bridge")?;
        let out = child.stdout.take().context("bridge stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut p = BridgeProcess {
            child,
            log,
            port: 0,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with("listening on") => {
                    let addr = line.trim_start_matches("listening on").trim();
                    p.port = addr
                        .rsplit(':')
                        .next()
                        .and_then(|s| s.parse().ok())
                        .with_context(|| format!("no port in {line:?}"))?;
                    return Ok(p);
                }
                Ok(_) => {}
                Err(_) => {
                    if let Some(s) = p.child.try_wait()? {
                        bail!("the bridge exited with {s}:\n{}", p.log_text());
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "the bridge did not listen in 20 s"
                    );
                }
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; the exit must be clean within 20 s.
    fn stop(mut self) -> Result<()> {
        let st = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()?;
        ensure!(st.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait()? {
                ensure!(s.success(), "bridge exited with {s}:\n{}", self.log_text());
                return Ok(());
            }
            ensure!(Instant::now() < deadline, "no exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, no chance to clean up.
    fn kill9(mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for BridgeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
    let b = BridgeProcess::start(&bin, &config, &store_dir, log.clone())?;
    storescu(b.port, &files)?;
    std::thread::sleep(Duration::from_secs(QUIET_S + 3));
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

    // 2. A resend lands on the same case.
    let b = BridgeProcess::start(&bin, &config, &store_dir, log.clone())?;
    storescu(b.port, &files)?;
    std::thread::sleep(Duration::from_secs(QUIET_S + 3));
    b.stop()?;
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
    let b = BridgeProcess::start(&bin, &config, &store_dir, log.clone())?;
    storescu(b.port, std::slice::from_ref(&seg))?;
    std::thread::sleep(Duration::from_secs(QUIET_S + 3));
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

    let b = BridgeProcess::start(&bin, &config, &store_dir, log.clone())?;
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
    let b = BridgeProcess::start(&bin, &config, &store_dir, log.clone())?;
    std::thread::sleep(Duration::from_secs(6 + 4));
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
