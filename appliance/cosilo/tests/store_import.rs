//! `cosilo import` as a real process on real NIfTI files: a refused case does not stop the others
//! but fails the command, and a SIGKILL at any moment leaves a store that holds every case either
//! whole (hashes verify, voxels exact) or not at all, and that a re-run completes.

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cosilo_sdk::volume::{write_nifti_f32, write_nifti_labels, Geometry, Volume};
use cosilo_store::{Split, Store};

const DIMS: [usize; 3] = [48, 48, 40];

struct Expected {
    split: Split,
    hospital: String,
    image: Volume<f32>,
    label: Volume<u8>,
}

struct Cohort {
    manifest: PathBuf,
    cases: BTreeMap<String, Expected>,
}

/// A slightly rotated, anisotropic grid, as scanners produce.
fn geometry() -> Geometry {
    let (s, c) = 0.1f64.sin_cos();
    Geometry {
        dims: DIMS,
        affine: [
            [0.8 * c, -0.8 * s, 0.0, -20.0],
            [0.8 * s, 0.8 * c, 0.0, 15.5],
            [0.0, 0.0, 2.5, -40.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    }
}

/// Case `n`: noise plus a bright ball (label 1) with a core (label 2), placed by `n`.
fn volumes(n: usize) -> (Volume<f32>, Volume<u8>) {
    let g = geometry();
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1);
    let centre = [14.0 + n as f64 * 1.5, 30.0 - n as f64, 12.0 + n as f64];
    let mut image = Vec::with_capacity(g.len());
    let mut label = Vec::with_capacity(g.len());
    for k in 0..DIMS[2] {
        for j in 0..DIMS[1] {
            for i in 0..DIMS[0] {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                let noise = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let d = ((i as f64 - centre[0]).powi(2)
                    + (j as f64 - centre[1]).powi(2)
                    + ((k as f64 - centre[2]) * 3.0).powi(2))
                .sqrt();
                let l = if d < 4.0 {
                    2
                } else if d < 9.0 {
                    1
                } else {
                    0
                };
                image.push(100.0 * f32::from(l) + 20.0 * noise - 1000.0 * (n as f32 * 0.01));
                label.push(l);
            }
        }
    }
    (
        Volume::new(g.clone(), image).unwrap(),
        Volume::new(g, label).unwrap(),
    )
}

/// Writes `n` cases under `root` (hospital folders, like a cohort) and a manifest listing them
/// plus `extra` entries.
fn make_cohort(root: &Path, n: usize, extra: &[serde_json::Value]) -> Cohort {
    let mut cases = BTreeMap::new();
    let mut entries = Vec::new();
    for c in 0..n {
        let id = format!("case{c:02}");
        let hospital = if c % 2 == 0 { "h1" } else { "h2" };
        let split = if c % 4 == 3 {
            Split::Test
        } else {
            Split::Train
        };
        let (image, label) = volumes(c);
        std::fs::create_dir_all(root.join(hospital)).unwrap();
        let image_rel = format!("{hospital}/{id}_img.nii.gz");
        let label_rel = format!("{hospital}/{id}_seg.nii.gz");
        write_nifti_f32(root.join(&image_rel), &image).unwrap();
        write_nifti_labels(root.join(&label_rel), &label).unwrap();
        entries.push(serde_json::json!({
            "case_id": id, "hospital": hospital, "split": split.as_str(),
            "image": image_rel, "label": label_rel, "anatomy": "synthetic",
        }));
        cases.insert(
            id,
            Expected {
                split,
                hospital: hospital.to_string(),
                image,
                label,
            },
        );
    }
    entries.extend_from_slice(extra);
    let manifest = root.join("manifest.json");
    let doc = serde_json::json!({ "seed": 7, "cases": entries });
    std::fs::write(&manifest, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    Cohort { manifest, cases }
}

fn cosilo_import(store: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cosilo"));
    cmd.arg("import")
        .arg("--store")
        .arg(store)
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("COSILO_STORE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `cosilo import --manifest` to completion and checks it succeeded.
fn import_to_completion(store: &Path, manifest: &Path) -> Output {
    let out = cosilo_import(store, &["--manifest", manifest.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "import failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Starts an import, SIGKILLs it after `delay`, and returns whether the kill hit a live process
/// and the cases it had acknowledged (logged as imported) by then.
fn import_killed_after(store: &Path, manifest: &Path, delay: Duration) -> (bool, Vec<String>) {
    let mut child = cosilo_import(store, &["--manifest", manifest.to_str().unwrap()])
        .spawn()
        .unwrap();
    // Not synchronisation: the delay picks the moment of the crash (the test sweeps it), and the
    // checks below hold wherever the kill lands, even before the first case or after the last.
    std::thread::sleep(delay);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let killed = out.status.signal() == Some(9);
    let acked = text(&out.stderr)
        .lines()
        .filter_map(|l| l.split("imported case ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_string)
        .collect();
    (killed, acked)
}

/// Opens the store as the appliance would after a crash and checks every case in it against the
/// cohort: hashes verify (load_case), voxels and grid are exact, and every acknowledged case is
/// there. Returns the number of cases present.
fn check_store(store: &Path, cohort: &Cohort, acknowledged: &[String]) -> usize {
    let s = Store::open(store).unwrap_or_else(|e| panic!("store unusable after a kill: {e:#}"));
    let ids = s.case_ids(None).unwrap();
    // This check reads every split, the sealed test split included.
    let every_split = s.final_evaluation("crash-check").unwrap();
    for id in &ids {
        let want = cohort
            .cases
            .get(id)
            .unwrap_or_else(|| panic!("unknown case {id} in the store"));
        let case = every_split
            .load_case(id)
            .unwrap_or_else(|e| panic!("case {id} damaged: {e:#}"));
        assert_eq!(case.meta.split, want.split, "{id}");
        assert_eq!(case.meta.provenance.hospital, want.hospital, "{id}");
        assert!(case.image.geometry.same_grid(&want.image.geometry, 1e-3));
        assert!(
            case.image.data == want.image.data,
            "{id}: image voxels differ"
        );
        assert!(
            case.label.data == want.label.data,
            "{id}: label voxels differ"
        );
    }
    for id in acknowledged {
        assert!(ids.contains(id), "acknowledged case {id} lost by the kill");
    }
    let stats = s.stats().unwrap();
    assert_eq!(stats.train_cases + stats.test_cases, ids.len());
    ids.len()
}

#[test]
fn import_killed_at_any_moment_leaves_whole_cases_and_a_rerun_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let cohort = make_cohort(&tmp.path().join("cohort"), 12, &[]);
    let n = cohort.cases.len();

    // An uninterrupted import, for reference and timing.
    let t = Instant::now();
    let out = import_to_completion(&tmp.path().join("reference"), &cohort.manifest);
    let wall = t.elapsed();
    let summary = text(&out.stdout);
    assert!(
        summary.starts_with("imported 12, already present 0, refused 0"),
        "{summary}"
    );
    assert_eq!(check_store(&tmp.path().join("reference"), &cohort, &[]), n);
    eprintln!(
        "uninterrupted: {} (process wall time {wall:.2?})",
        summary.trim()
    );

    // Fixed delays, plus three scaled to this machine's speed so that some kills land mid-import
    // even on a slow or busy machine.
    let mut delays_ms = vec![5u64, 10, 15, 20, 30, 40, 50, 65, 80, 100, 125, 150];
    delays_ms.extend([0.3, 0.5, 0.7].map(|f| (wall.as_secs_f64() * 1e3 * f) as u64));
    let (mut kills, mut mid_import, mut acked_total) = (0, 0, 0);

    // Each delay against a fresh store, then a re-run to completion.
    for (round, &ms) in delays_ms.iter().enumerate() {
        let store = tmp.path().join(format!("fresh{round}"));
        let (killed, acked) =
            import_killed_after(&store, &cohort.manifest, Duration::from_millis(ms));
        let present = check_store(&store, &cohort, &acked);
        kills += usize::from(killed);
        mid_import += usize::from(killed && present > 0 && present < n);
        acked_total += acked.len();
        eprintln!("fresh store, kill at {ms:>3} ms: killed {killed}, {present} cases whole, {} acknowledged", acked.len());

        let out = import_to_completion(&store, &cohort.manifest);
        let expect = format!(
            "imported {}, already present {present}, refused 0",
            n - present
        );
        assert!(
            text(&out.stdout).starts_with(&expect),
            "{}",
            text(&out.stdout)
        );
        assert_eq!(check_store(&store, &cohort, &[]), n);
    }

    // One store killed again and again: progress is kept, then a re-run completes.
    let store = tmp.path().join("repeated");
    let mut before = 0;
    for &ms in &delays_ms {
        let (killed, acked) =
            import_killed_after(&store, &cohort.manifest, Duration::from_millis(ms));
        let present = check_store(&store, &cohort, &acked);
        assert!(
            present >= before,
            "a kill lost cases: {before} -> {present}"
        );
        kills += usize::from(killed);
        mid_import += usize::from(killed && present > before && present < n);
        before = present;
    }
    eprintln!("repeated kills on one store: {before} of {n} cases imported before the final run");
    import_to_completion(&store, &cohort.manifest);
    assert_eq!(check_store(&store, &cohort, &[]), n);

    eprintln!(
        "{kills} SIGKILLs of a live import, {mid_import} of them with the store part-filled, \
         {acked_total} acknowledged cases all kept"
    );
    assert!(mid_import > 0, "no kill landed in the middle of an import");
}

#[test]
fn a_refused_case_does_not_stop_the_others_and_fails_the_command() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("cohort");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("junk_seg.nii.gz"), b"not a NIfTI file").unwrap();
    let small = Geometry::axis_aligned([8, 8, 8], [1.0; 3], [0.0; 3]);
    write_nifti_labels(root.join("small_seg.nii.gz"), &Volume::filled(small, 0u8)).unwrap();
    let bad = [
        serde_json::json!({"case_id": "bad_label", "hospital": "h1", "split": "train",
            "image": "h1/case00_img.nii.gz", "label": "junk_seg.nii.gz"}),
        serde_json::json!({"case_id": "bad_grid", "hospital": "h2", "split": "test",
            "image": "h2/case01_img.nii.gz", "label": "small_seg.nii.gz"}),
    ];
    // The bad cases sit between good ones in the manifest.
    let cohort = make_cohort(&root, 4, &bad);
    let manifest = cohort.manifest.to_str().unwrap().to_string();
    let store = tmp.path().join("store");

    let out = cosilo_import(&store, &["--manifest", &manifest])
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("imported 4, already present 0, refused 2"),
        "{stdout}"
    );
    let refused_label = stdout
        .lines()
        .find(|l| l.starts_with("refused bad_label: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(refused_label.contains("junk_seg.nii.gz"), "{refused_label}");
    let refused_grid = stdout
        .lines()
        .find(|l| l.starts_with("refused bad_grid: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(refused_grid.contains("small_seg.nii.gz") && refused_grid.contains("[8, 8, 8]"));
    assert!(stderr.contains("2 of 6 cases refused"), "{stderr}");
    assert_eq!(check_store(&store, &cohort, &[]), 4);

    // Again: nothing new, the same refusals, still a failure.
    let out = cosilo_import(&store, &["--manifest", &manifest])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).starts_with("imported 0, already present 4, refused 2"));

    // One hospital's cases only, into another store.
    let h2_store = tmp.path().join("h2");
    let out = cosilo_import(&h2_store, &["--manifest", &manifest, "--hospital", "h2"])
        .output()
        .unwrap();
    assert!(text(&out.stdout).starts_with("imported 2, already present 0, refused 1"));
    let s = Store::open(&h2_store).unwrap();
    assert_eq!(s.case_ids(None).unwrap(), vec!["case01", "case03"]);
    assert_eq!(s.case_ids(Some(Split::Test)).unwrap(), vec!["case03"]);
    drop(s);

    // One pair by hand.
    let image = root.join("h1/case02_img.nii.gz");
    let label = root.join("h1/case02_seg.nii.gz");
    let out = cosilo_import(
        &h2_store,
        &[
            "--image",
            image.to_str().unwrap(),
            "--label",
            label.to_str().unwrap(),
            "--id",
            "case02",
            "--split",
            "train",
            "--hospital",
            "h1",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("imported 1, already present 0, refused 0"));
    let out = cosilo_import(&h2_store, &["--image", image.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap should refuse a half-given pair"
    );
}
