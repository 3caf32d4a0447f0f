//! `cosilo demo`: three hospitals federated on one machine, against each training alone.
//!
//! Fetches the real anatomy if needed, builds the 3-hospital cohort (h1/h2/h3 with 40/15/5
//! training and 4 held-out patients), imports each hospital's cases into its own store, makes a
//! key pair per site and the roster, starts the embedded MQTT broker, and runs each site as its
//! own `cosilo run --config hN.toml` child process: first local-only (the baseline), then the
//! federation (gossip-avg by default). Each process sees only its own hospital's cases.
//!
//! Both arms train the same number of steps on the same learning-rate schedule: `rounds ×
//! steps_per_round` rounds, then `personalise_steps` more on the site's own cases. For the
//! local-only arm those are simply more local steps; for the federated arm they fine-tune the
//! final shared (consensus) model on the site's own cases (FedAvg + fine-tuning
//! personalisation), and the shared model is scored before that too. Held-out cases are scored
//! before training, at the end of the rounds and after personalisation (and every `eval_every`
//! rounds when asked), not every round: scoring costs a third of a round on two cores. It
//! prints, per hospital and class, initial / local-only / federated (shared) / federated +
//! personalised Dice and writes `federation-demo.{md,json,svg}`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::daemon::RunSummary;
use crate::plan::{FederationPlan, PlanError};
use cosilo_federation::broker::{BrokerError, EmbeddedBroker};
use cosilo_federation::strategy::StrategyKind;

/// The demo's hospitals.
pub const HOSPITALS: [&str; 3] = ["h1", "h2", "h3"];

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("fetching the anatomy failed: {0}")]
    Fetch(#[from] cosilo_lab::fetch::FetchError),
    #[error("building the cohort failed: {0}")]
    Cohort(#[from] cosilo_lab::cohort::CohortError),
    #[error("setting up the federation failed: {0}")]
    Plan(#[from] PlanError),
    #[error("embedded broker: {0}")]
    Broker(#[from] BrokerError),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("site {site} ({phase}) exited with {status}; its log: {log}")]
    Site {
        site: String,
        phase: String,
        status: String,
        log: PathBuf,
    },
    #[error("unreadable run summary {path}: {reason}")]
    Summary { path: PathBuf, reason: String },
    #[error("unknown strategy {0:?} (braintorrent, gossip-avg, fedavg, ciil, iil)")]
    Strategy(String),
}

/// What `cosilo demo` does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Working folder.
    pub out: PathBuf,
    /// Results folder (`federation-demo.*`).
    pub results: PathBuf,
    /// The anatomy cache.
    pub cache: PathBuf,
    pub rounds: u64,
    pub steps_per_round: usize,
    /// Steps of personalisation after the rounds (and of extra local training in the local-only
    /// arm, so that both train as many steps); 0 = off.
    pub personalise_steps: usize,
    /// Score the held-out cases every this many rounds (0 = only before and at the end).
    pub eval_every: u64,
    /// The federated run's strategy.
    pub strategy: String,
    /// The `cosilo` binary the sites run as.
    pub cosilo: PathBuf,
}

/// One model's held-out scores at one hospital.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelScore {
    /// What the model is ("initial", "local only", ...).
    pub model: String,
    /// Optimiser steps this site's model had taken (0 for the initial model).
    pub steps: usize,
    /// Mean held-out 3-D Dice per class (background first; None: class absent everywhere).
    pub dice: Vec<Option<f64>>,
    /// Mean of CSF, grey and white matter.
    pub tissue_mean: Option<f64>,
    /// Mean of every foreground class (tissues and tumour).
    pub all_mean: Option<f64>,
}

impl ModelScore {
    fn new(model: &str, steps: usize, dice: &[Option<f64>]) -> ModelScore {
        ModelScore {
            model: model.to_string(),
            steps,
            dice: dice.to_vec(),
            tissue_mean: class_mean(dice, &TISSUE),
            all_mean: class_mean(dice, &FOREGROUND),
        }
    }
}

/// Tissue classes (CSF, GM, WM) and every foreground class (with the tumour) of the label map.
const TISSUE: [usize; 3] = [1, 2, 3];
const FOREGROUND: [usize; 4] = [1, 2, 3, 4];

/// The mean of `classes`' Dice; None when one of them is missing.
fn class_mean(dice: &[Option<f64>], classes: &[usize]) -> Option<f64> {
    let v: Option<Vec<f64>> = classes
        .iter()
        .map(|&c| dice.get(c).copied().flatten())
        .collect();
    v.filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

/// One hospital's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HospitalResult {
    pub site: String,
    pub training_cases: u64,
    pub test_cases: usize,
    pub class_names: Vec<String>,
    /// In order: initial, local only (rounds only), local only (all steps), federated (shared
    /// model), federated + personalised (the last two absent without personalisation).
    pub models: Vec<ModelScore>,
    /// Tissue Dice per round where scored: (round, Dice).
    pub local_curve: Vec<(u64, Option<f64>)>,
    pub federated_curve: Vec<(u64, Option<f64>)>,
    pub federated_bytes_sent: u64,
    pub federated_bytes_received: u64,
}

impl HospitalResult {
    /// The score of the model named `model`.
    pub fn model(&self, model: &str) -> Option<&ModelScore> {
        self.models.iter().find(|m| m.model == model)
    }
}

/// Model names in the results.
pub const INITIAL: &str = "initial";
/// Local-only after the rounds (fewer steps than the federated + personalised model).
pub const LOCAL_ROUNDS: &str = "local only, rounds";
/// Local-only after all steps (as many as the federated + personalised model).
pub const LOCAL: &str = "local only";
/// The federation's final shared model.
pub const FEDERATED: &str = "federated (shared)";
/// The shared model fine-tuned on the site's own cases.
pub const PERSONALISED: &str = "federated + personalised";

/// The demo's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoResults {
    pub strategy: String,
    pub rounds: u64,
    pub steps_per_round: usize,
    pub personalise_steps: usize,
    pub eval_every: u64,
    /// The load average (1 min) before and after, a sign of how shared the machine was.
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
    pub hospitals: Vec<HospitalResult>,
    pub local_seconds: f64,
    pub federated_seconds: f64,
    pub total_seconds: f64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |source| DemoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, text: &str) -> Result<(), DemoError> {
    std::fs::write(path, text).map_err(io(path))
}

/// The 1-minute load average (Linux), if readable.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Runs the whole demo and returns its results (also written to `opts.results`).
pub fn run_demo(opts: &DemoOptions) -> Result<DemoResults, DemoError> {
    let t0 = Instant::now();
    let load_before = load_average();
    let kind = federated_strategy(&opts.strategy)?;
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let out = std::fs::canonicalize(&opts.out).map_err(io(&opts.out))?;

    let manifest = prepare_cohort(&opts.cache, &out)?;
    let mut plan = FederationPlan::new("demo", &HOSPITALS, &out);
    // Keys are made once in their own folder; a rerun keeps them.
    plan.keys = out.join("keys");
    plan.import_cohort(&manifest)?;
    plan.write_keys_and_roster()?;

    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().expect("literal"), MAX_PACKET)?;
    println!("== embedded MQTT broker on {}", broker.addr());
    let port = broker.addr().port();
    println!(
        "== local-only baseline: each hospital alone, {} rounds x {} steps + {} steps (3 processes)",
        opts.rounds, opts.steps_per_round, opts.personalise_steps
    );
    let (local, local_seconds) = run_phase(opts, &plan, port, StrategyKind::Local)?;
    println!("   {local_seconds:.0} s");
    println!(
        "== federation ({}): 3 appliances over MQTT, {} rounds x {} steps, then {} steps of personalisation",
        kind.name(),
        opts.rounds,
        opts.steps_per_round,
        opts.personalise_steps
    );
    let (fed, federated_seconds) = run_phase(opts, &plan, port, kind)?;
    println!("   {federated_seconds:.0} s");
    drop(broker);

    let results = DemoResults {
        strategy: kind.name().into(),
        rounds: opts.rounds,
        steps_per_round: opts.steps_per_round,
        personalise_steps: opts.personalise_steps,
        eval_every: opts.eval_every,
        load_before,
        load_after: load_average(),
        hospitals: hospital_results(opts, &local, &fed),
        local_seconds,
        federated_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    write_results(&opts.results, &results)?;
    Ok(results)
}

/// The max MQTT packet of the demo's broker and sites.
const MAX_PACKET: usize = 1 << 20;

/// The federated arm's strategy from its name (not `local`: that is the baseline).
fn federated_strategy(name: &str) -> Result<StrategyKind, DemoError> {
    let kind: StrategyKind = serde_json::from_value(serde_json::json!(name))
        .map_err(|_| DemoError::Strategy(name.to_string()))?;
    if kind == StrategyKind::Local {
        return Err(DemoError::Strategy(name.to_string()));
    }
    Ok(kind)
}

/// Fetches the anatomy if needed and builds the 3-hospital cohort in `out/cohort` unless it is
/// there; returns its manifest.
fn prepare_cohort(cache: &Path, out: &Path) -> Result<PathBuf, DemoError> {
    println!("== real anatomy (cached after the first run)");
    cosilo_lab::fetch::fetch_all(cache)?;
    let cohort = out.join("cohort");
    let manifest = cohort.join(cosilo_lab::cohort::MANIFEST_FILE);
    if !manifest.exists() {
        println!("== cohort: 3 hospitals, 40 / 15 / 5 training patients, 4 held out each");
        let spec = cosilo_lab::cohort::CohortSpec::new(7, "40,15,5", 4)?;
        cosilo_lab::cohort::build_cohort(cache, &cohort, &spec)?;
    }
    Ok(manifest)
}

/// A site process of one phase: its id, the child, its summary file and its log.
struct PhaseSite {
    site: String,
    child: Child,
    summary: PathBuf,
    log: PathBuf,
}

/// Runs every hospital as a `cosilo run` process with `strategy` until all exit; returns their
/// summaries and the phase's seconds.
fn run_phase(
    opts: &DemoOptions,
    plan: &FederationPlan,
    broker_port: u16,
    strategy: StrategyKind,
) -> Result<(Vec<RunSummary>, f64), DemoError> {
    let t = Instant::now();
    let mut sites = Vec::new();
    for h in HOSPITALS {
        sites.push(start_site(opts, plan, broker_port, strategy, h)?);
    }
    let mut summaries = Vec::new();
    let mut failure = None;
    for PhaseSite {
        site,
        mut child,
        summary,
        log,
    } in sites
    {
        let status = child.wait().map_err(io(&log))?;
        if !status.success() {
            failure.get_or_insert(DemoError::Site {
                site,
                phase: strategy.name().into(),
                status: status.to_string(),
                log,
            });
            continue;
        }
        let text = std::fs::read_to_string(&summary).map_err(io(&summary))?;
        summaries.push(serde_json::from_str::<RunSummary>(&text).map_err(|e| {
            DemoError::Summary {
                path: summary.clone(),
                reason: e.to_string(),
            }
        })?);
    }
    if let Some(e) = failure {
        return Err(e);
    }
    Ok((summaries, t.elapsed().as_secs_f64()))
}

/// Writes site `h`'s configuration for `strategy` and starts it, logging to `{h}-{strategy}.log`.
fn start_site(
    opts: &DemoOptions,
    plan: &FederationPlan,
    broker_port: u16,
    strategy: StrategyKind,
    h: &str,
) -> Result<PhaseSite, DemoError> {
    let mut cfg = plan.site_config(h, strategy, broker_port, MAX_PACKET);
    cfg.federation.rounds = opts.rounds;
    cfg.federation.steps_per_round = opts.steps_per_round;
    cfg.federation.personalise_steps = opts.personalise_steps;
    cfg.federation.eval_every = opts.eval_every;
    cfg.federation.round_deadline_s = 300;
    cfg.federation.update_timeout_s = 600;
    let name = format!("{h}-{}", strategy.name());
    let cfg_path = plan.dir.join(format!("{name}.toml"));
    plan.write_config(&cfg, &cfg_path)?;
    let summary = plan.dir.join(format!("{name}-summary.json"));
    let log = plan.dir.join(format!("{name}.log"));
    let _ = std::fs::remove_file(&summary);
    let log_file = std::fs::File::create(&log).map_err(io(&log))?;
    let err_file = log_file.try_clone().map_err(io(&log))?;
    let child = Command::new(&opts.cosilo)
        .arg("run")
        .arg("--config")
        .arg(&cfg_path)
        .arg("--summary")
        .arg(&summary)
        // Three sites share the machine's cores: one kernel thread each.
        .env("RAYON_NUM_THREADS", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(log_file))
        .stderr(Stdio::from(err_file))
        .spawn()
        .map_err(|source| DemoError::Spawn {
            program: opts.cosilo.clone(),
            source,
        })?;
    Ok(PhaseSite {
        site: h.to_string(),
        child,
        summary,
        log,
    })
}

/// Each hospital's scores side by side: initial, local-only (after the rounds and after all
/// steps), federated shared and personalised.
fn hospital_results(
    opts: &DemoOptions,
    local: &[RunSummary],
    fed: &[RunSummary],
) -> Vec<HospitalResult> {
    let class_names: Vec<String> = cosilo_train::DEFAULT_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let curve = |s: &RunSummary| -> Vec<(u64, Option<f64>)> {
        s.rounds
            .iter()
            .filter(|r| !r.dice.is_empty())
            .map(|r| (r.round + 1, r.tissue_mean))
            .collect()
    };
    let rounds_steps = opts.rounds as usize * opts.steps_per_round;
    local
        .iter()
        .zip(fed)
        .map(|(l, f)| {
            let mut models = vec![
                ModelScore::new(INITIAL, 0, &l.initial_dice),
                ModelScore::new(LOCAL_ROUNDS, rounds_steps, &l.final_dice),
            ];
            if l.personalise_steps > 0 {
                let steps = rounds_steps + l.personalise_steps;
                models.push(ModelScore::new(LOCAL, steps, &l.personalised_dice));
            }
            models.push(ModelScore::new(FEDERATED, rounds_steps, &f.final_dice));
            if f.personalise_steps > 0 {
                let steps = rounds_steps + f.personalise_steps;
                models.push(ModelScore::new(PERSONALISED, steps, &f.personalised_dice));
            }
            HospitalResult {
                site: l.site.clone(),
                training_cases: l.training_cases,
                test_cases: l.test_cases,
                class_names: class_names.clone(),
                models,
                local_curve: curve(l),
                federated_curve: curve(f),
                federated_bytes_sent: f.bytes_sent,
                federated_bytes_received: f.bytes_received,
            }
        })
        .collect()
}

/// Prints the Markdown report and writes `federation-demo.{md,json,svg}` into `dir`.
fn write_results(dir: &Path, results: &DemoResults) -> Result<(), DemoError> {
    let md = to_markdown(results);
    println!("\n{md}");
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write(&dir.join("federation-demo.md"), &md)?;
    write(
        &dir.join("federation-demo.json"),
        &serde_json::to_string_pretty(results).unwrap_or_default(),
    )?;
    write(&dir.join("federation-demo.svg"), &chart_svg(results))?;
    println!("results: {}", dir.join("federation-demo.md").display());
    Ok(())
}

/// Formats a Dice value to three decimals ("–" when absent).
fn cell(v: Option<f64>) -> String {
    v.map_or("–".into(), |d| format!("{d:.3}"))
}

/// A signed difference to three decimals ("–" when either side is absent).
fn delta(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.3}", a - b),
        _ => "–".into(),
    }
}

/// The results as a Markdown report: the side-by-side table, what federation gave each hospital,
/// timing and traffic.
pub fn to_markdown(r: &DemoResults) -> String {
    let total = r.rounds as usize * r.steps_per_round + r.personalise_steps;
    let mut s = format!(
        "# Federation demo: {strategy} vs local-only, with personalisation\n\n\
         Three hospitals (h1/h2/h3: 40/15/5 training patients, 4 held out each), each appliance its own \
         process with only its own hospital's cases in its own store, federated over MQTT (embedded broker, \
         signed messages). **The anatomy is real** (a different real subject's brain MRI per hospital); \
         **the lesions (tumours), the patient-to-patient deformations and the scanner effects (contrast \
         curve, resolution, h3's z-scored intensities) are simulated**, so the sites are non-iid on purpose.\n\n\
         Both arms train every site for the same {total} optimiser steps on the same learning-rate schedule: \
         {rounds} rounds x {spr} steps, then {p} steps. In the local-only arm those {p} steps are more local \
         training; in the federated arm they fine-tune the final shared model on the site's own cases \
         (personalisation: FedAvg + local fine-tuning). \"federated (shared)\" is the {strategy} model every \
         site ends with after the rounds, scored before personalisation. Held-out 3-D Dice per class on each \
         hospital's own 4 held-out patients; tissue mean = CSF, GM, WM; all-classes mean = those and the tumour.\n\n\
         | hospital | model | steps | CSF | GM | WM | tumour | tissue mean | all-classes mean |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        strategy = r.strategy,
        rounds = r.rounds,
        spr = r.steps_per_round,
        p = r.personalise_steps,
    );
    for h in &r.hospitals {
        for m in &h.models {
            let d = |c: usize| cell(m.dice.get(c).copied().flatten());
            let _ = writeln!(
                s,
                "| {} ({} cases) | {} | {} | {} | {} | {} | {} | **{}** | **{}** |",
                h.site,
                h.training_cases,
                m.model,
                m.steps,
                d(1),
                d(2),
                d(3),
                d(4),
                cell(m.tissue_mean),
                cell(m.all_mean)
            );
        }
    }
    s += "\n## What federation gave each hospital (same number of training steps)\n\n\
          | hospital | compared | CSF | GM | WM | tumour | tissue mean | all-classes mean |\n\
          |---|---|---|---|---|---|---|---|\n";
    for h in &r.hospitals {
        let Some(local) = h.model(LOCAL).or_else(|| h.model(LOCAL_ROUNDS)) else {
            continue;
        };
        for other in [FEDERATED, PERSONALISED] {
            let Some(m) = h.model(other) else { continue };
            let d = |c: usize| {
                delta(
                    m.dice.get(c).copied().flatten(),
                    local.dice.get(c).copied().flatten(),
                )
            };
            let _ = writeln!(
                s,
                "| {} | {} − {} | {} | {} | {} | {} | {} | {} |",
                h.site,
                m.model,
                local.model,
                d(1),
                d(2),
                d(3),
                d(4),
                delta(m.tissue_mean, local.tissue_mean),
                delta(m.all_mean, local.all_mean)
            );
        }
    }
    s += "\nHow to read it: one shared model must serve three scanners; on the tissue classes, \
          whose intensities each hospital's scanner shapes differently, it can fall below a model \
          trained only on the hospital's own images, while on the rare tumour class the small \
          hospitals gain from the big one's cases. Fine-tuning the shared model on the site's own \
          cases (personalisation) is the standard remedy; it keeps what was learned from the \
          others and adapts to the local scanner. The personalised model stays on the site (store \
          run `<run>-personalised`); only the shared model's weights ever travel. A more \
          principled method for non-iid sites is FedSM (Xu et al., CVPR 2022: a model selector \
          that picks, per input, between the global and the personalised models); it is not \
          implemented here. These are 4 held-out patients per hospital and one seed: differences \
          of a few hundredths are within run-to-run noise.\n\n";
    let _ = writeln!(
        s,
        "Local-only phase {:.0} s, federated phase {:.0} s, total {:.0} s (3 processes sharing the \
         machine, one kernel thread each; load average {} before, {} after; held-out cases scored \
         {}).",
        r.local_seconds,
        r.federated_seconds,
        r.total_seconds,
        r.load_before.map_or("?".into(), |l| format!("{l:.1}")),
        r.load_after.map_or("?".into(), |l| format!("{l:.1}")),
        if r.eval_every == 0 {
            "before training, after the rounds and after personalisation".to_string()
        } else {
            format!(
                "every {} rounds, after the rounds and after personalisation",
                r.eval_every
            )
        }
    );
    for h in &r.hospitals {
        let _ = writeln!(
            s,
            "- {}: federation sent {} bytes, received {} bytes",
            h.site, h.federated_bytes_sent, h.federated_bytes_received
        );
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One bar group's value of a model.
type Measure = fn(&ModelScore) -> Option<f64>;

/// A grouped bar chart, one panel per hospital: held-out Dice per class and the two means for the
/// initial, local-only, federated (shared) and federated + personalised models.
pub fn chart_svg(r: &DemoResults) -> String {
    let shown: Vec<(&str, &str)> = vec![
        (INITIAL, "#bbbbbb"),
        (LOCAL, "#1f77b4"),
        (FEDERATED, "#ff7f0e"),
        (PERSONALISED, "#2ca02c"),
    ];
    // Fall back to the rounds-only local model when there was no extra local phase.
    let pick = |h: &HospitalResult, name: &str| -> Option<ModelScore> {
        h.model(name)
            .or_else(|| (name == LOCAL).then(|| h.model(LOCAL_ROUNDS)).flatten())
            .cloned()
    };
    let groups: [(&str, Measure); 6] = [
        ("CSF", |m| m.dice.get(1).copied().flatten()),
        ("GM", |m| m.dice.get(2).copied().flatten()),
        ("WM", |m| m.dice.get(3).copied().flatten()),
        ("tumour", |m| m.dice.get(4).copied().flatten()),
        ("tissue", |m| m.tissue_mean),
        ("all", |m| m.all_mean),
    ];
    let n = r.hospitals.len().max(1) as f64;
    let (panel_w, ph, mt, mb, ml) = (360.0, 260.0, 70.0, 45.0, 50.0);
    let w = ml + panel_w * n + 20.0;
    let h = mt + ph + mb;
    let bar = (panel_w - 20.0) / (groups.len() as f64 * (shown.len() as f64 + 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="18" text-anchor="middle" font-size="14">{}</text>"#,
        w / 2.0,
        escape(&format!(
            "Held-out Dice per hospital: local-only vs {} (shared) vs + personalised, {} steps each",
            r.strategy,
            r.rounds as usize * r.steps_per_round + r.personalise_steps
        ))
    );
    for (i, (name, colour)) in shown.iter().enumerate() {
        let x = ml + i as f64 * 190.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="30" width="12" height="12" fill="{colour}"/><text x="{}" y="40">{}</text>"#,
            x + 16.0,
            escape(name)
        );
    }
    let sy = |v: f64| mt + ph - v.clamp(0.0, 1.0) * ph;
    for t in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0] {
        let y = sy(t);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" x2="{}" y1="{y}" y2="{y}" stroke="#e0e0e0"/><text x="{}" y="{}" text-anchor="end">{t:.1}</text>"##,
            w - 20.0,
            ml - 4.0,
            y + 4.0
        );
    }
    for (p, hosp) in r.hospitals.iter().enumerate() {
        let x0 = ml + p as f64 * panel_w + 10.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{} ({} training cases)</text>"#,
            x0 + (panel_w - 20.0) / 2.0,
            mt - 8.0,
            escape(&hosp.site),
            hosp.training_cases
        );
        let models: Vec<Option<ModelScore>> =
            shown.iter().map(|(name, _)| pick(hosp, name)).collect();
        for (g, (label, value)) in groups.iter().enumerate() {
            let gx = x0 + g as f64 * bar * (shown.len() as f64 + 1.0);
            for (k, m) in models.iter().enumerate() {
                let Some(v) = m.as_ref().and_then(*value) else {
                    continue;
                };
                let _ = writeln!(
                    s,
                    r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {} {}: {v:.3}</title></rect>"#,
                    gx + k as f64 * bar,
                    sy(v),
                    bar * 0.9,
                    mt + ph - sy(v),
                    shown[k].1,
                    escape(&hosp.site),
                    escape(shown[k].0),
                    label
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + bar * shown.len() as f64 / 2.0,
                mt + ph + 14.0
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{ml}" y="{}" font-size="10">Anatomy real; lesions and scanner effects simulated. Dice on each hospital's 4 held-out patients.</text>"#,
        h - 8.0
    );
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results() -> DemoResults {
        let dice = |x: f64| {
            vec![
                Some(0.99),
                Some(x),
                Some(x + 0.1),
                Some(x + 0.2),
                Some(x / 2.0),
            ]
        };
        let hospitals = ["h1", "h2"]
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let base = 0.4 + 0.1 * i as f64;
                HospitalResult {
                    site: h.to_string(),
                    training_cases: 10,
                    test_cases: 4,
                    class_names: vec![],
                    models: vec![
                        ModelScore::new(INITIAL, 0, &dice(0.0)),
                        ModelScore::new(LOCAL_ROUNDS, 20, &dice(base)),
                        ModelScore::new(LOCAL, 30, &dice(base + 0.05)),
                        ModelScore::new(FEDERATED, 20, &dice(base - 0.1)),
                        ModelScore::new(PERSONALISED, 30, &dice(base + 0.15)),
                    ],
                    local_curve: vec![],
                    federated_curve: vec![],
                    federated_bytes_sent: 1,
                    federated_bytes_received: 2,
                }
            })
            .collect();
        DemoResults {
            strategy: "braintorrent".into(),
            rounds: 2,
            steps_per_round: 10,
            personalise_steps: 10,
            eval_every: 0,
            load_before: Some(1.0),
            load_after: None,
            hospitals,
            local_seconds: 1.0,
            federated_seconds: 2.0,
            total_seconds: 3.0,
        }
    }

    #[test]
    fn means_cover_the_right_classes() {
        let m = ModelScore::new(
            "x",
            1,
            &[Some(1.0), Some(0.3), Some(0.6), Some(0.9), Some(0.2)],
        );
        assert!((m.tissue_mean.unwrap() - 0.6).abs() < 1e-12);
        assert!((m.all_mean.unwrap() - 0.5).abs() < 1e-12);
        // A missing class leaves its mean undefined rather than silently smaller.
        let m = ModelScore::new("x", 1, &[Some(1.0), Some(0.3), None, Some(0.9), Some(0.2)]);
        assert_eq!(m.tissue_mean, None);
        assert_eq!(m.all_mean, None);
    }

    #[test]
    fn report_shows_every_model_and_the_differences() {
        let r = results();
        let md = to_markdown(&r);
        for name in [INITIAL, LOCAL_ROUNDS, LOCAL, FEDERATED, PERSONALISED] {
            assert_eq!(
                md.matches(&format!("| {name} |")).count(),
                2,
                "{name}: {md}"
            );
        }
        assert!(md.contains("anatomy is real"), "{md}");
        assert!(md.contains("simulated"), "{md}");
        assert!(md.contains("FedSM"));
        assert!(md.contains("same 30 optimiser steps"), "{md}");
        // h1: personalised tissue 0.65 vs local-only 0.55 → +0.100; shared 0.40 → -0.150.
        let h1 = &r.hospitals[0];
        let want = delta(
            h1.model(PERSONALISED).unwrap().tissue_mean,
            h1.model(LOCAL).unwrap().tissue_mean,
        );
        assert_eq!(want, "+0.100");
        assert!(md.contains(&want), "{md}");
        assert!(md.contains("-0.150"), "{md}");
        let json = serde_json::to_string(&r).unwrap();
        let back: DemoResults = serde_json::from_str(&json).unwrap();
        assert_eq!(back.hospitals[1].models.len(), 5);
    }

    #[test]
    fn chart_has_a_bar_per_hospital_group_and_model() {
        let svg = chart_svg(&results());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // 2 hospitals × 6 groups × 4 models shown (the rounds-only local model is left out).
        assert_eq!(svg.matches("<rect x=").count() - 4, 2 * 6 * 4);
        assert!(svg.contains("h2 federated + personalised tissue"));
    }
}
