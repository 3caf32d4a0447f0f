//! One site's own pipeline: cases from the store → training with checkpoints in the store →
//! whole-volume evaluation → a report a person can read (table, JSON, SVG curve).
//!
//! Federation strategies (and the `cosilo train` / `evaluate` commands) build on these pieces.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use cosilo_lab::chart::{LineChart, Series};
use cosilo_store::{FinalEvaluation, Split, Store, StoreError};
use cosilo_train::data::{LabelledVolume, PreparedVolume};
use cosilo_train::eval::{mean_per_class, score, CaseScore};
use cosilo_train::trainer::{load_weights, CheckpointSink, EpochRecord, LocalProgress};
use cosilo_train::{unet, TrainConfig, TrainError, TrainEvent, UNet};

/// Errors of the site pipeline.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error("no {split} cases{} in the store", hospital.as_ref().map(|h| format!(" of hospital {h}")).unwrap_or_default())]
    NoCases {
        split: Split,
        hospital: Option<String>,
    },
    #[error("run {0:?} has no checkpoint in the store; train it first")]
    NoRun(String),
    #[error(transparent)]
    Export(#[from] cosilo_train::export::ExportError),
    #[error("cannot write the report to {path}: {source}")]
    Report {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The store as the trainer's checkpoint sink (the trait lives in the training crate, the store
/// knows nothing of training: this adapter joins them).
pub struct StoreCheckpoints<'a>(pub &'a Store);

impl CheckpointSink for StoreCheckpoints<'_> {
    fn save(&self, run: &str, meta: &serde_json::Value, bytes: &[u8]) -> Result<u64, String> {
        let seq = self
            .0
            .put_checkpoint(run, meta, bytes)
            .map_err(|e| e.to_string())?;
        // Keep the last few: enough to fall back from a damaged newest one, bounded on disk.
        self.0
            .prune_checkpoints(run, 3)
            .map_err(|e| e.to_string())?;
        Ok(seq)
    }

    fn latest(&self, run: &str) -> Result<Option<(serde_json::Value, Vec<u8>)>, String> {
        Ok(self
            .0
            .latest_checkpoint(run)
            .map_err(|e| e.to_string())?
            .map(|(_, meta, bytes)| (meta, bytes)))
    }
}

/// Loads a split's cases (optionally of one hospital) as labelled volumes, in id order. The test
/// split is sealed (the store refuses it): read it with [`load_test_volumes`].
pub fn load_volumes(
    store: &Store,
    hospital: Option<&str>,
    split: Split,
) -> Result<Vec<LabelledVolume>, LocalError> {
    let ids = store.case_ids(Some(split))?;
    collect_volumes(store, &ids, hospital, split, |id| store.load_case(id))
}

/// Loads the test cases (optionally of one hospital) through the final evaluation that opened
/// them, in id order.
pub fn load_test_volumes(
    fin: &FinalEvaluation<'_>,
    hospital: Option<&str>,
) -> Result<Vec<LabelledVolume>, LocalError> {
    let ids = fin.case_ids()?;
    collect_volumes(fin.store(), &ids, hospital, Split::Test, |id| {
        fin.load_case(id)
    })
}

/// The number of cases of `split` (optionally of one hospital), from their metadata alone.
pub fn count_cases(
    store: &Store,
    hospital: Option<&str>,
    split: Split,
) -> Result<usize, LocalError> {
    let mut n = 0;
    for id in store.case_ids(Some(split))? {
        if hospital.is_none_or(|h| {
            store
                .case_meta(&id)
                .is_ok_and(|m| m.provenance.hospital == h)
        }) {
            n += 1;
        }
    }
    Ok(n)
}

fn collect_volumes(
    store: &Store,
    ids: &[String],
    hospital: Option<&str>,
    split: Split,
    load: impl Fn(&str) -> Result<cosilo_store::Case, StoreError>,
) -> Result<Vec<LabelledVolume>, LocalError> {
    let mut out = Vec::new();
    for id in ids {
        let meta = store.case_meta(id)?;
        if hospital.is_some_and(|h| meta.provenance.hospital != h) {
            continue;
        }
        let case = load(id)?;
        out.push(LabelledVolume {
            id: id.clone(),
            image: case.image,
            label: case.label,
        });
    }
    if out.is_empty() {
        return Err(LocalError::NoCases {
            split,
            hospital: hospital.map(str::to_string),
        });
    }
    Ok(out)
}

/// The model of a run as its newest checkpoint holds it, with that checkpoint's configuration.
pub fn load_model(
    store: &Store,
    run: &str,
    device: &Device,
) -> Result<(UNet, VarMap, TrainConfig), LocalError> {
    let (_, meta, bytes) = store
        .latest_checkpoint(run)?
        .ok_or_else(|| LocalError::NoRun(run.to_string()))?;
    let cfg: TrainConfig = serde_json::from_value(meta.get("config").cloned().unwrap_or_default())
        .map_err(|e| {
            TrainError::Checkpoint(format!("checkpoint of {run:?} has no readable config: {e}"))
        })?;
    let (net, vars) = unet::build(&cfg.model, device, cfg.seed).map_err(TrainError::from)?;
    load_weights(&vars, &bytes, device)?;
    Ok((net, vars, cfg))
}

/// Per-case and per-class results of an evaluation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub run: String,
    pub class_names: Vec<String>,
    pub cases: Vec<CaseScore>,
    pub mean: Vec<Option<f64>>,
    /// Mean over CSF, grey and white matter (classes 1-3), when the model has them.
    pub tissue_mean: Option<f64>,
    pub seconds: f64,
}

impl Evaluation {
    /// Summarises per-case scores.
    pub fn from_scores(run: &str, cfg: &TrainConfig, cases: Vec<CaseScore>, seconds: f64) -> Self {
        let mean = mean_per_class(&cases, cfg.model.classes);
        let tissue: Vec<f64> = (1..4.min(cfg.model.classes))
            .filter_map(|c| mean[c])
            .collect();
        Evaluation {
            run: run.to_string(),
            class_names: cfg.class_names.clone(),
            tissue_mean: (tissue.len() == 3).then(|| tissue.iter().sum::<f64>() / 3.0),
            cases,
            mean,
            seconds,
        }
    }

    /// A markdown table: one row per case, one column per foreground class.
    pub fn to_markdown(&self) -> String {
        let names = &self.class_names[1..];
        let mut s = format!(
            "| case | {} |\n|---|{}\n",
            names.join(" | "),
            "---|".repeat(names.len())
        );
        let cell = |v: Option<f64>| v.map(|d| format!("{d:.3}")).unwrap_or_else(|| "–".into());
        for c in &self.cases {
            let row: Vec<String> = (1..self.class_names.len())
                .map(|k| cell(c.dice.get(k).copied().flatten()))
                .collect();
            s += &format!("| {} | {} |\n", c.case, row.join(" | "));
        }
        let mean: Vec<String> = (1..self.class_names.len())
            .map(|k| cell(self.mean.get(k).copied().flatten()))
            .collect();
        s += &format!("| **mean** | {} |\n", mean.join(" | "));
        if let Some(t) = self.tissue_mean {
            s += &format!("\nMean Dice over CSF, grey and white matter: **{t:.3}**\n");
        }
        s
    }
}

/// Scores a model on volumes with whole-volume 3-D Dice.
pub fn evaluate(
    net: &UNet,
    cfg: &TrainConfig,
    run: &str,
    volumes: &[LabelledVolume],
    device: &Device,
) -> Result<Evaluation, LocalError> {
    let t0 = Instant::now();
    let mut cases = Vec::with_capacity(volumes.len());
    for v in volumes {
        let prepared = PreparedVolume::new(v, &cfg.normalisation, &cfg.label_map);
        cases.push(score(net, &prepared, device).map_err(TrainError::from)?);
    }
    Ok(Evaluation::from_scores(
        run,
        cfg,
        cases,
        t0.elapsed().as_secs_f64(),
    ))
}

/// Training curve: loss per epoch and validation Dice per class.
pub fn curve(history: &[EpochRecord], class_names: &[String], title: &str) -> LineChart {
    let mut series = vec![Series {
        name: "train loss".into(),
        points: history
            .iter()
            .map(|h| (h.epoch as f64 + 1.0, h.loss))
            .collect(),
    }];
    for (c, name) in class_names.iter().enumerate().skip(1) {
        series.push(Series {
            name: format!("Dice {name}"),
            points: history
                .iter()
                .filter_map(|h| {
                    h.val_dice
                        .get(c)
                        .copied()
                        .flatten()
                        .map(|d| (h.epoch as f64 + 1.0, d))
                })
                .collect(),
        });
    }
    LineChart {
        title: title.to_string(),
        x_label: "epoch".into(),
        y_label: "loss / validation Dice".into(),
        series,
        y_range: None,
    }
}

fn write(path: &Path, text: &str) -> Result<(), LocalError> {
    std::fs::write(path, text).map_err(|source| LocalError::Report {
        path: path.display().to_string(),
        source,
    })
}

/// Writes `curve.svg`, `history.json`, `evaluation.json` and `evaluation.md` into `dir`.
pub fn write_report(
    dir: &Path,
    history: &[EpochRecord],
    eval: &Evaluation,
    title: &str,
) -> Result<(), LocalError> {
    std::fs::create_dir_all(dir).map_err(|source| LocalError::Report {
        path: dir.display().to_string(),
        source,
    })?;
    write(
        &dir.join("curve.svg"),
        &curve(history, &eval.class_names, title).to_svg(),
    )?;
    write(&dir.join("history.json"), &to_json(&history))?;
    write(&dir.join("evaluation.json"), &to_json(eval))?;
    write(&dir.join("evaluation.md"), &eval.to_markdown())?;
    Ok(())
}

/// Pretty JSON of a plain data structure (these cannot fail to serialise).
fn to_json<T: Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Trains run `run` of `hospital` from the store's training cases, resuming from its
/// checkpoints; the epochs are scored on the validation cases, and a finished run once on the
/// test cases (the store's final evaluation of `run`).
pub fn train_site(
    store: &Store,
    cfg: &TrainConfig,
    run: &str,
    hospital: Option<&str>,
    device: &Device,
    on_event: &mut dyn FnMut(&TrainEvent),
    stop: &AtomicBool,
) -> Result<(cosilo_train::TrainOutcome, Option<Evaluation>), LocalError> {
    let train = load_volumes(store, hospital, Split::Train)?;
    let validation = match load_volumes(store, hospital, Split::Validation) {
        Ok(v) => v,
        Err(LocalError::NoCases { .. }) => Vec::new(),
        Err(e) => return Err(e),
    };
    let outcome = cosilo_train::train(
        cfg,
        run,
        &train,
        &validation,
        &StoreCheckpoints(store),
        device,
        on_event,
        stop,
    )?;
    let eval = if outcome.finished && count_cases(store, hospital, Split::Test)? > 0 {
        Some(final_score(
            store,
            &outcome.net,
            cfg,
            run,
            hospital,
            device,
        )?)
    } else {
        None
    };
    Ok((outcome, eval))
}

/// The final score of `run`'s model `net` on the test cases (of `hospital`, when given): opens
/// the store's final evaluation of `run` (recording the read) and scores every test case.
pub fn final_score(
    store: &Store,
    net: &UNet,
    cfg: &TrainConfig,
    run: &str,
    hospital: Option<&str>,
    device: &Device,
) -> Result<Evaluation, LocalError> {
    let fin = store.final_evaluation(run)?;
    let test = load_test_volumes(&fin, hospital)?;
    evaluate(net, cfg, run, &test, device)
}

/// Exports the newest checkpoint of `run` as an ONNX bundle in `out`. The manifest records the
/// sites and number of training cases (never patient identities) and the validation Dice of the
/// run's last epoch.
pub fn export_run(
    store: &Store,
    run: &str,
    out: &Path,
    device: &Device,
) -> Result<cosilo_train::export::BundleInfo, LocalError> {
    use cosilo_sdk::bundle::{rfc3339_utc, Metrics, Provenance};
    let (_, meta, _) = store
        .latest_checkpoint(run)?
        .ok_or_else(|| LocalError::NoRun(run.to_string()))?;
    let (_, vars, cfg) = load_model(store, run, device)?;
    let history = LocalProgress::history_of(&meta);
    let mut sites = std::collections::BTreeSet::new();
    let train_ids = store.case_ids(Some(Split::Train))?;
    for id in &train_ids {
        sites.insert(store.case_meta(id)?.provenance.hospital);
    }
    // The last epoch's scores are on the validation cases.
    let validation_cases = store.case_ids(Some(Split::Validation))?.len();
    let provenance = Provenance {
        training_run: run.to_string(),
        sites: sites.into_iter().collect(),
        cases: train_ids.len(),
        created: rfc3339_utc(std::time::SystemTime::now()),
        cosilo_version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let metrics = Metrics {
        dice: history
            .last()
            .map(|h| h.val_dice.clone())
            .unwrap_or_default(),
        cases: if history.last().is_some_and(|h| !h.val_dice.is_empty()) {
            validation_cases
        } else {
            0
        },
    };
    let manifest = cosilo_train::export::manifest_for(&cfg, run, provenance, metrics);
    Ok(cosilo_train::export::write_bundle(
        out, &cfg.model, &vars, &manifest,
    )?)
}
