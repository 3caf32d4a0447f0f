//! `cosilo experiment` as a real process on the reduced plan (docs/plans/reduced.toml): every arm
//! runs on one cohort (federated and local-only arms as `cosilo run` processes over the embedded
//! broker), the results table has its structure, and every arm read its test split exactly once.
//! Needs the real anatomy (`cosilo data fetch`; COSILO_CACHE or the default cache).

use std::path::Path;
use std::process::Command;

use cosilo_store::Store;

const ARMS: [&str; 5] = ["pooled", "local", "fedavg", "braintorrent", "iil"];
const HOSPITALS: [&str; 3] = ["h1", "h2", "h3"];

/// The test-split reads recorded by each store under `run_dir`.
fn store_reads(run_dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run_dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if p.is_dir() && name.ends_with("-store") {
            let store = Store::open(&p).unwrap();
            out.push((name, store.test_reads().unwrap().values().sum()));
        }
    }
    out.sort();
    out
}

#[test]
fn reduced_plan_runs_every_arm_and_reads_each_test_split_once() {
    let tmp = tempfile::tempdir().unwrap();
    let plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/plans/reduced.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_cosilo"))
        .args(["experiment", "--plan"])
        .arg(&plan)
        .arg("--out")
        .arg(tmp.path())
        .env("COSILO_COMMIT", "test-commit")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Progress: one line per arm and seed, with an ETA.
    assert_eq!(stdout.matches("(ETA ").count(), ARMS.len(), "{stdout}");

    let dir = tmp.path().join("reduced");
    let md = std::fs::read_to_string(dir.join("results.md")).unwrap();
    assert!(md.contains("commit `test-commit`"), "{md}");
    assert!(md.contains("cosilo experiment --plan"), "{md}");
    for arm in ARMS {
        for h in HOSPITALS.iter().chain(&["all"]) {
            let row = md
                .lines()
                .find(|l| l.starts_with(&format!("| {arm} | {h} |")))
                .unwrap_or_else(|| panic!("no row for {arm} at {h}:\n{md}"));
            // 11 columns; every Dice cell is a number in [0, 1] ("mean" or "mean ± std").
            let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 11, "{row}");
            for c in &cells[2..7] {
                let mean = c.split_whitespace().next().unwrap_or_default();
                let d: f64 = mean.parse().unwrap_or_else(|_| panic!("{row}"));
                assert!((0.0..=1.0).contains(&d), "{row}");
            }
            assert_eq!(cells[10], "1", "test reads of {arm}: {row}");
        }
    }
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 2 + ARMS.len() * 4, "{csv}");
    let svg = std::fs::read_to_string(dir.join("curves.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("test-commit"));

    // Straight from the stores: every store of every arm opened its test split exactly once.
    for arm in ARMS {
        let reads = store_reads(&dir.join("runs").join(format!("{arm}-s1")));
        let expected = if arm == "pooled" { 1 } else { HOSPITALS.len() };
        assert_eq!(reads.len(), expected, "{arm}: {reads:?}");
        assert!(reads.iter().all(|(_, n)| *n == 1), "{arm}: {reads:?}");
    }
    // The federated BrainTorrent sites pulled from peers as the paper's initiators.
    let log = std::fs::read_to_string(dir.join("runs/braintorrent-s1/h1.log")).unwrap()
        + &std::fs::read_to_string(dir.join("runs/braintorrent-s1/h2.log")).unwrap()
        + &std::fs::read_to_string(dir.join("runs/braintorrent-s1/h3.log")).unwrap();
    assert!(log.contains("initiator: merged"), "no BrainTorrent merge");
}
