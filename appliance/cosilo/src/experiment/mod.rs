//! `cosilo experiment --plan plan.toml`: the papers' comparisons in one command.
//!
//! Builds the plan's cohort once (every arm sees the same patients and the same train /
//! validation / test splits), then runs every arm once per seed: the federated arms and local-only
//! as one `cosilo run` process per hospital over the embedded broker (the real daemon, signed
//! messages), the pooled reference in this process. Everything that selects or stops reads
//! validation; each arm reads its test cases once, through the store's final evaluation, and
//! the runner checks the stores' read records afterwards. It writes to `{out}/{plan name}/`:
//! `results.md` and `results.csv` (test Dice per class per hospital, mean ± std over seeds, bytes
//! sent and received, wall time, test-split reads), `curves.svg` (validation tissue Dice per round
//! per arm), `runs.json` (every arm and seed), and `plan.toml`, each stating the commit and the
//! command.
//!
//! - [`plan`]: the plan file and the arms.
//! - [`arms`]: running one arm for one seed.
//! - [`report`]: tables and the chart.
//!
//! Not yet: FedSM (its own issue; the plan refuses it by name), scoring every model on the other
//! hospitals' test patients, and cohorts beyond the three hospitals of `cosilo_lab::cohort`.

pub mod arms;
pub mod plan;
pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use plan::{Arm, Plan};

/// The hospitals of the cohort generator.
pub const HOSPITALS: [&str; 3] = ["h1", "h2", "h3"];

/// Errors of an experiment.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("plan: {0}")]
    Plan(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("building the cohort failed: {0}")]
    Cohort(#[from] cosilo_lab::cohort::CohortError),
    #[error("setting up the sites failed: {0}")]
    Sites(#[from] crate::plan::PlanError),
    #[error("embedded broker: {0}")]
    Broker(#[from] cosilo_federation::broker::BrokerError),
    #[error("site {site} of arm {arm} failed; its log: {log}")]
    Site {
        site: String,
        arm: String,
        log: PathBuf,
    },
    #[error("store: {0}")]
    Store(#[from] cosilo_store::StoreError),
    #[error("reading the cohort manifest: {0}")]
    Manifest(#[from] cosilo_store::import::ManifestError),
    #[error("site configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    #[error("training: {0}")]
    Train(#[from] cosilo_train::TrainError),
    #[error(
        "arm {arm} (seed {seed}) read the test split {reads:?} times per store; \
         the final score must read it exactly once"
    )]
    TestReads {
        arm: String,
        seed: u64,
        reads: BTreeMap<String, u64>,
    },
}

/// A hospital's test Dice per class (background first) under one arm and seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HospitalScore {
    pub hospital: String,
    pub dice: Vec<Option<f64>>,
}

/// One arm run for one seed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    pub arm: String,
    pub seed: u64,
    pub hospitals: Vec<HospitalScore>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub seconds: f64,
    /// Store → how many times its test split was opened (each must be 1).
    pub test_reads: BTreeMap<String, u64>,
    /// (round, validation tissue Dice averaged over hospitals).
    pub curve: Vec<(f64, f64)>,
}

/// Where the experiment runs and how it records itself.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// The output folder; results go to `{out}/{plan.name}/`.
    pub out: PathBuf,
    /// The anatomy cache.
    pub cache: PathBuf,
    /// The `cosilo` binary the sites run as.
    pub cosilo: PathBuf,
    /// The commit the binary was built from, as the results state it.
    pub commit: String,
    /// The exact command, as the results state it.
    pub command: String,
}

/// Runs every arm of `plan` for every seed and writes the results; returns every run.
pub fn run_experiment(
    plan: &Plan,
    opts: &ExperimentOptions,
) -> Result<Vec<ArmRun>, ExperimentError> {
    let arms = plan.arms()?;
    let dir = opts.out.join(&plan.name);
    std::fs::create_dir_all(&dir).map_err(|source| ExperimentError::Io {
        path: dir.clone(),
        source,
    })?;
    let dir = std::fs::canonicalize(&dir).map_err(|source| ExperimentError::Io {
        path: dir.clone(),
        source,
    })?;
    let manifest = prepare_cohort(plan, &opts.cache, &dir)?;
    let total = arms.len() * plan.seeds.len();
    let t0 = Instant::now();
    let mut runs = Vec::new();
    for &seed in &plan.seeds {
        for &arm in &arms {
            let done = runs.len();
            let eta = if done == 0 {
                "–".to_string()
            } else {
                let per = t0.elapsed().as_secs_f64() / done as f64;
                format!("{:.0} s", per * (total - done) as f64)
            };
            println!(
                "== [{}/{total}] arm {} seed {seed} (ETA {eta})",
                done + 1,
                arm.name()
            );
            let run_dir = dir.join("runs").join(format!("{}-s{seed}", arm.name()));
            std::fs::create_dir_all(&run_dir).map_err(|source| ExperimentError::Io {
                path: run_dir.clone(),
                source,
            })?;
            let run = match arm {
                Arm::Pooled => arms::run_pooled(plan, &manifest, &run_dir, seed)?,
                _ => arms::run_sites(plan, &opts.cosilo, &manifest, &run_dir, arm, seed)?,
            };
            if run.test_reads.values().any(|&n| n != 1) {
                return Err(ExperimentError::TestReads {
                    arm: run.arm,
                    seed,
                    reads: run.test_reads,
                });
            }
            println!(
                "   {:.0} s; test mean Dice {}",
                run.seconds,
                run.hospitals
                    .iter()
                    .map(|h| format!(
                        "{} {}",
                        h.hospital,
                        report::foreground_mean(&h.dice)
                            .map_or("–".into(), |d| format!("{d:.3}"))
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            runs.push(run);
        }
    }
    report::write_all(&dir, plan, opts, &runs, t0.elapsed().as_secs_f64())?;
    println!("results: {}", dir.join("results.md").display());
    Ok(runs)
}

/// Builds the plan's cohort in `{dir}/cohort` (train / validation / test per hospital).
fn prepare_cohort(plan: &Plan, cache: &Path, dir: &Path) -> Result<PathBuf, ExperimentError> {
    use cosilo_lab::cohort::{build_cohort, CohortSpec, MANIFEST_FILE};
    let c = &plan.cohort;
    let spec = CohortSpec::new(c.seed, &c.sizes, c.test)?.with_validation(c.validation)?;
    let out = dir.join("cohort");
    println!(
        "== cohort: training {} per hospital, {} validation and {} test each (seed {})",
        c.sizes, c.validation, c.test, c.seed
    );
    build_cohort(cache, &out, &spec)?;
    Ok(out.join(MANIFEST_FILE))
}
