//! Running one arm for one seed: the federated arms and local-only as one `cosilo run` process per
//! hospital over the embedded broker (signed messages, the real daemon), the pooled arm in this
//! process (one store with every hospital's cases, one trainer).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use cosilo_federation::strategy::StrategyKind;
use cosilo_store::{Split, Store};
use cosilo_train::TrainConfig;

use super::plan::{Arm, Plan};
use super::{ArmRun, ExperimentError, HospitalScore, HOSPITALS};
use crate::config::SiteConfig;
use crate::daemon::RunSummary;
use crate::local::{self, StoreCheckpoints};
use crate::plan::FederationPlan;

/// The largest MQTT packet of the experiment's broker and sites.
const MAX_PACKET: usize = 1 << 20;

/// A site's configuration for `arm`: the plan's budget and training overrides.
fn site_config(
    plan: &Plan,
    fed: &FederationPlan,
    kind: StrategyKind,
    site: &str,
    seed: u64,
    port: u16,
) -> SiteConfig {
    let mut cfg = fed.site_config(site, kind, port, MAX_PACKET);
    let f = &mut cfg.federation;
    f.rounds = plan.rounds;
    f.steps_per_round = plan.steps_per_round;
    f.patience = plan.patience;
    f.personalise_steps = 0;
    f.eval_every = 1;
    f.round_deadline_s = 600;
    f.update_timeout_s = 900;
    let t = &mut cfg.train;
    t.seed = Some(seed);
    t.base = plan.train.base;
    t.depth = plan.train.depth;
    t.batch_size = plan.train.batch_size;
    t.patch = plan.train.patch;
    t.lr = plan.train.lr;
    cfg
}

/// Each hospital's store (its own cases), keys and roster, in `dir`.
fn federation_folder(
    dir: &Path,
    manifest: &Path,
    name: &str,
) -> Result<FederationPlan, ExperimentError> {
    let fed = FederationPlan::new(name, &HOSPITALS, dir);
    fed.import_cohort(manifest)?;
    fed.write_keys_and_roster()?;
    Ok(fed)
}

/// Runs the hospitals as `cosilo run` processes with `kind` (local-only included) until all exit.
pub(super) fn run_sites(
    plan: &Plan,
    cosilo: &Path,
    manifest: &Path,
    dir: &Path,
    arm: Arm,
    seed: u64,
) -> Result<ArmRun, ExperimentError> {
    let kind = match arm {
        Arm::Federated(k) => k,
        Arm::Local => StrategyKind::Local,
        Arm::Pooled => {
            return Err(ExperimentError::Plan(
                "the pooled arm runs in-process, not as sites".into(),
            ))
        }
    };
    let t0 = Instant::now();
    let fed = federation_folder(dir, manifest, &format!("exp-{}", arm.name()))?;
    let broker = cosilo_federation::broker::EmbeddedBroker::start(
        "127.0.0.1:0".parse().expect("a literal address"),
        MAX_PACKET,
    )?;
    let port = broker.addr().port();
    let mut children = Vec::new();
    for h in HOSPITALS {
        let cfg = site_config(plan, &fed, kind, h, seed, port);
        let cfg_path = dir.join(format!("{h}.toml"));
        fed.write_config(&cfg, &cfg_path)?;
        let summary = dir.join(format!("{h}-summary.json"));
        let log = dir.join(format!("{h}.log"));
        let io = |source| ExperimentError::Io {
            path: log.clone(),
            source,
        };
        let out = std::fs::File::create(&log).map_err(io)?;
        let err = out.try_clone().map_err(io)?;
        let child = Command::new(cosilo)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .arg("--summary")
            .arg(&summary)
            // The sites share the machine's cores: one kernel thread each.
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| ExperimentError::Io {
                path: cosilo.to_path_buf(),
                source,
            })?;
        children.push((h, child, summary, log));
    }
    let mut summaries = Vec::new();
    let mut failed = None;
    for (h, mut child, summary, log) in children {
        let status = child.wait().map_err(|source| ExperimentError::Io {
            path: log.clone(),
            source,
        })?;
        if !status.success() {
            failed.get_or_insert(ExperimentError::Site {
                site: h.to_string(),
                arm: arm.name().to_string(),
                log,
            });
            continue;
        }
        let text = std::fs::read_to_string(&summary).map_err(|source| ExperimentError::Io {
            path: summary.clone(),
            source,
        })?;
        let s: RunSummary = serde_json::from_str(&text)
            .map_err(|e| ExperimentError::Plan(format!("{}: {e}", summary.display())))?;
        summaries.push(s);
    }
    drop(broker);
    if let Some(e) = failed {
        return Err(e);
    }
    let mut test_reads = BTreeMap::new();
    for h in HOSPITALS {
        let store = Store::open(&fed.store_path(h))?;
        test_reads.insert(h.to_string(), store.test_reads()?.values().sum());
    }
    let hospitals = summaries
        .iter()
        .map(|s| HospitalScore {
            hospital: s.site.clone(),
            dice: s.final_dice.clone(),
        })
        .collect();
    // Validation tissue Dice per round, averaged over the sites that scored it.
    let rounds = summaries.iter().map(|s| s.rounds.len()).max().unwrap_or(0);
    let curve = (0..rounds)
        .filter_map(|r| {
            let v: Vec<f64> = summaries
                .iter()
                .filter_map(|s| s.rounds.get(r).and_then(|l| l.tissue_mean))
                .collect();
            (!v.is_empty()).then(|| (r as f64 + 1.0, v.iter().sum::<f64>() / v.len() as f64))
        })
        .collect();
    Ok(ArmRun {
        arm: arm.name().to_string(),
        seed,
        hospitals,
        bytes_sent: summaries.iter().map(|s| s.bytes_sent).sum(),
        bytes_received: summaries.iter().map(|s| s.bytes_received).sum(),
        seconds: t0.elapsed().as_secs_f64(),
        test_reads,
        curve,
    })
}

/// The pooled reference: every hospital's training cases in one store and one trainer, with the
/// same model, training configuration and total sample presentations as the federated arms
/// (`rounds` epochs over the pooled slices; with a fixed `steps_per_round`, the hospitals'
/// rounds added up). Selection reads the pooled validation cases; each hospital's test cases are
/// scored once, through one final evaluation of the pooled store.
pub(super) fn run_pooled(
    plan: &Plan,
    manifest: &Path,
    dir: &Path,
    seed: u64,
) -> Result<ArmRun, ExperimentError> {
    let t0 = Instant::now();
    let store_dir: PathBuf = dir.join("pooled-store");
    if store_dir.exists() {
        std::fs::remove_dir_all(&store_dir).map_err(|source| ExperimentError::Io {
            path: store_dir.clone(),
            source,
        })?;
    }
    let store = Store::open(&store_dir)?;
    let requests = cosilo_store::import::read_manifest(manifest, None)?;
    let report = cosilo_store::import::import_all(&store, &requests)?;
    if !report.refused.is_empty() {
        return Err(ExperimentError::Plan(format!(
            "{} cases refused at import into the pooled store",
            report.refused.len()
        )));
    }
    // The same training configuration the sites derive from their site configuration.
    let fed = FederationPlan::new("exp-pooled", &HOSPITALS, dir);
    let cfg: TrainConfig = {
        let sc = site_config(plan, &fed, StrategyKind::Local, "h1", seed, 1883);
        let mut cfg = sc.train_config()?;
        cfg.steps_per_epoch = plan.steps_per_round * HOSPITALS.len();
        cfg
    };
    let device = cosilo_train::device()?;
    let train = local::load_volumes(&store, None, Split::Train)?;
    let validation = local::load_volumes(&store, None, Split::Validation).unwrap_or_default();
    let stop = AtomicBool::new(false);
    let outcome = cosilo_train::train(
        &cfg,
        "pooled",
        &train,
        &validation,
        &StoreCheckpoints(&store),
        &device,
        &mut |_| {},
        &stop,
    )?;
    let fin = store.final_evaluation("pooled")?;
    let mut hospitals = Vec::new();
    for h in HOSPITALS {
        let test = local::load_test_volumes(&fin, Some(h))?;
        let eval = local::evaluate(&outcome.net, &cfg, "pooled", &test, &device)?;
        hospitals.push(HospitalScore {
            hospital: h.to_string(),
            dice: eval.mean,
        });
    }
    drop(fin);
    let score_classes = [1usize, 2, 3];
    let curve = outcome
        .history
        .iter()
        .filter_map(|e| {
            let v: Vec<f64> = score_classes
                .iter()
                .filter_map(|&c| e.val_dice.get(c).copied().flatten())
                .collect();
            (v.len() == score_classes.len())
                .then(|| (e.epoch as f64 + 1.0, v.iter().sum::<f64>() / v.len() as f64))
        })
        .collect();
    let mut test_reads = BTreeMap::new();
    test_reads.insert("pooled".to_string(), store.test_reads()?.values().sum());
    Ok(ArmRun {
        arm: Arm::Pooled.name().to_string(),
        seed,
        hospitals,
        bytes_sent: 0,
        bytes_received: 0,
        seconds: t0.elapsed().as_secs_f64(),
        test_reads,
        curve,
    })
}
