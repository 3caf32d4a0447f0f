//! `cosilo demo`: three hospitals federated on one machine, against each training alone.
//!
//! Fetches the real anatomy if needed, builds the 3-hospital cohort (h1/h2/h3 with 40/15/5
//! training and 4 held-out patients), imports each hospital's cases into its own store, makes a
//! key pair per site and the roster, starts the embedded MQTT broker, and runs each site as its
//! own `cosilo run --config hN.toml` child process: first local-only (the baseline), then the
//! federation (BrainTorrent by default). Each process sees only its own hospital's cases. It
//! prints, per hospital, held-out Dice before training, after local-only training and after
//! federation, and writes `federation-demo.{md,json,svg}`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::chart::{LineChart, Series};
use crate::config::{SiteConfig, StrategyKind};
use crate::federation::broker::{BrokerError, EmbeddedBroker};
use crate::federation::daemon::RunSummary;
use crate::federation::keys::{KeysError, SiteKeys};
use crate::store::{Store, StoreError};

/// The demo's hospitals.
pub const HOSPITALS: [&str; 3] = ["h1", "h2", "h3"];

/// Errors of the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("fetching the anatomy failed: {0}")]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("building the cohort failed: {0}")]
    Cohort(#[from] crate::cohort::CohortError),
    #[error("reading the cohort manifest failed: {0}")]
    Manifest(#[from] crate::store::import::ManifestError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0} of {1}'s cases were refused at import")]
    Refused(usize, String),
    #[error("keys: {0}")]
    Keys(#[from] KeysError),
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
    #[error("unknown strategy {0:?} (braintorrent, fedavg, ciil, iil)")]
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
    /// The federated run's strategy.
    pub strategy: String,
    /// The `cosilo` binary the sites run as.
    pub cosilo: PathBuf,
}

/// One hospital's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HospitalResult {
    pub site: String,
    pub training_cases: u64,
    pub test_cases: usize,
    pub class_names: Vec<String>,
    pub initial: Vec<Option<f64>>,
    pub local: Vec<Option<f64>>,
    pub federated: Vec<Option<f64>>,
    pub initial_tissue: Option<f64>,
    pub local_tissue: Option<f64>,
    pub federated_tissue: Option<f64>,
    pub local_curve: Vec<(u64, Option<f64>)>,
    pub federated_curve: Vec<(u64, Option<f64>)>,
    pub federated_bytes_sent: u64,
    pub federated_bytes_received: u64,
}

/// The demo's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoResults {
    pub strategy: String,
    pub rounds: u64,
    pub steps_per_round: usize,
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

/// Runs the whole demo and returns its results (also written to `opts.results`).
pub fn run_demo(opts: &DemoOptions) -> Result<DemoResults, DemoError> {
    let t0 = Instant::now();
    let kind: StrategyKind = serde_json::from_value(serde_json::json!(opts.strategy))
        .map_err(|_| DemoError::Strategy(opts.strategy.clone()))?;
    if kind == StrategyKind::Local {
        return Err(DemoError::Strategy(opts.strategy.clone()));
    }
    std::fs::create_dir_all(&opts.out).map_err(io(&opts.out))?;
    let out = std::fs::canonicalize(&opts.out).map_err(io(&opts.out))?;

    println!("== real anatomy (cached after the first run)");
    crate::fetch::fetch_all(&opts.cache)?;
    let cohort = out.join("cohort");
    let manifest = cohort.join(crate::cohort::MANIFEST_FILE);
    if !manifest.exists() {
        println!("== cohort: 3 hospitals, 40 / 15 / 5 training patients, 4 held out each");
        let spec = crate::cohort::CohortSpec::new(7, "40,15,5", 4)?;
        crate::cohort::build_cohort(&opts.cache, &cohort, &spec)?;
    }
    for h in HOSPITALS {
        let store = Store::open(&out.join(format!("{h}-store")))?;
        let requests = crate::store::import::read_manifest(&manifest, Some(h))?;
        let report = crate::store::import::import_all(&store, &requests)?;
        if !report.refused.is_empty() {
            return Err(DemoError::Refused(report.refused.len(), h.to_string()));
        }
    }

    // Keys and roster (made once; a rerun keeps them).
    let keys = out.join("keys");
    let mut roster = String::from("[federation]\nname = \"demo\"\n");
    for h in HOSPITALS {
        let path = SiteKeys::key_path(&keys, h);
        let k = if path.exists() {
            SiteKeys::load(&path)?
        } else {
            let k = SiteKeys::generate(h)?;
            k.save(&keys)?;
            k
        };
        roster += &format!("\n{}", k.roster_entry());
    }
    write(&out.join("roster.toml"), &roster)?;

    let max_packet = 1 << 20;
    let broker = EmbeddedBroker::start("127.0.0.1:0".parse().expect("literal"), max_packet)?;
    println!("== embedded MQTT broker on {}", broker.addr());

    let phase = |strategy: StrategyKind| -> Result<(Vec<RunSummary>, f64), DemoError> {
        let t = Instant::now();
        let mut children: Vec<(String, Child, PathBuf, PathBuf)> = Vec::new();
        for h in HOSPITALS {
            let mut cfg = SiteConfig::default();
            cfg.site.id = h.to_string();
            cfg.site.store = out.join(format!("{h}-store"));
            cfg.site.hospital = h.to_string();
            cfg.federation.name = "demo".into();
            cfg.federation.strategy = strategy;
            cfg.federation.roster = out.join("roster.toml");
            cfg.federation.key = SiteKeys::key_path(&keys, h);
            cfg.federation.rounds = opts.rounds;
            cfg.federation.steps_per_round = opts.steps_per_round;
            cfg.federation.round_deadline_s = 300;
            cfg.federation.update_timeout_s = 600;
            cfg.broker.host = "127.0.0.1".into();
            cfg.broker.port = broker.addr().port();
            cfg.broker.max_packet_bytes = max_packet;
            let name = format!("{h}-{}", strategy.name());
            let cfg_path = out.join(format!("{name}.toml"));
            write(&cfg_path, &toml::to_string(&cfg).unwrap_or_default())?;
            let summary = out.join(format!("{name}-summary.json"));
            let log = out.join(format!("{name}.log"));
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
            children.push((h.to_string(), child, summary, log));
        }
        let mut summaries = Vec::new();
        let mut failure = None;
        for (site, mut child, summary, log) in children {
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
    };

    println!(
        "== local-only baseline: each hospital alone, {} rounds x {} steps (3 processes)",
        opts.rounds, opts.steps_per_round
    );
    let (local, local_seconds) = phase(StrategyKind::Local)?;
    println!("   {local_seconds:.0} s");
    println!(
        "== federation ({}): 3 appliances over MQTT, {} rounds x {} steps",
        kind.name(),
        opts.rounds,
        opts.steps_per_round
    );
    let (fed, federated_seconds) = phase(kind)?;
    println!("   {federated_seconds:.0} s");
    drop(broker);

    let class_names: Vec<String> = crate::train::DEFAULT_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let curve = |s: &RunSummary| -> Vec<(u64, Option<f64>)> {
        s.rounds
            .iter()
            .map(|r| (r.round + 1, r.tissue_mean))
            .collect()
    };
    let hospitals: Vec<HospitalResult> = local
        .iter()
        .zip(&fed)
        .map(|(l, f)| HospitalResult {
            site: l.site.clone(),
            training_cases: l.training_cases,
            test_cases: l.test_cases,
            class_names: class_names.clone(),
            initial: l.initial_dice.clone(),
            local: l.final_dice.clone(),
            federated: f.final_dice.clone(),
            initial_tissue: l.initial_tissue_mean,
            local_tissue: l.final_tissue_mean,
            federated_tissue: f.final_tissue_mean,
            local_curve: curve(l),
            federated_curve: curve(f),
            federated_bytes_sent: f.bytes_sent,
            federated_bytes_received: f.bytes_received,
        })
        .collect();
    let results = DemoResults {
        strategy: kind.name().into(),
        rounds: opts.rounds,
        steps_per_round: opts.steps_per_round,
        hospitals,
        local_seconds,
        federated_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    let md = to_markdown(&results);
    println!("\n{md}");
    std::fs::create_dir_all(&opts.results).map_err(io(&opts.results))?;
    write(&opts.results.join("federation-demo.md"), &md)?;
    write(
        &opts.results.join("federation-demo.json"),
        &serde_json::to_string_pretty(&results).unwrap_or_default(),
    )?;
    write(
        &opts.results.join("federation-demo.svg"),
        &chart(&results).to_svg(),
    )?;
    println!(
        "results: {}",
        opts.results.join("federation-demo.md").display()
    );
    Ok(results)
}

/// The side-by-side table.
pub fn to_markdown(r: &DemoResults) -> String {
    let cell = |v: Option<f64>| v.map_or("–".into(), |d| format!("{d:.3}"));
    let mut s = format!(
        "# Federation demo: {} vs local-only\n\n3 hospitals (h1/h2/h3: 40/15/5 training patients, 4 held out each), each appliance its own process \
         with only its own cases; {} rounds x {} steps; held-out 3-D Dice per class.\n\n\
         | hospital | train cases | model | CSF | GM | WM | tumour | tissue mean |\n|---|---|---|---|---|---|---|---|\n",
        r.strategy, r.rounds, r.steps_per_round
    );
    for h in &r.hospitals {
        for (name, dice, tissue) in [
            ("initial", &h.initial, h.initial_tissue),
            ("local only", &h.local, h.local_tissue),
            (r.strategy.as_str(), &h.federated, h.federated_tissue),
        ] {
            let d = |c: usize| cell(dice.get(c).copied().flatten());
            s += &format!(
                "| {} | {} | {name} | {} | {} | {} | {} | **{}** |\n",
                h.site,
                h.training_cases,
                d(1),
                d(2),
                d(3),
                d(4),
                cell(tissue)
            );
        }
    }
    s += &format!(
        "\nLocal-only phase {:.0} s, federated phase {:.0} s, total {:.0} s (3 processes sharing the machine, one kernel thread each).\n",
        r.local_seconds, r.federated_seconds, r.total_seconds
    );
    for h in &r.hospitals {
        s += &format!(
            "- {}: federation sent {} bytes, received {} bytes\n",
            h.site, h.federated_bytes_sent, h.federated_bytes_received
        );
    }
    s
}

/// Tissue Dice per round: local-only (dashed in the legend's words) vs federated, per hospital.
pub fn chart(r: &DemoResults) -> LineChart {
    let mut series = Vec::new();
    for h in &r.hospitals {
        for (label, curve) in [
            ("local", &h.local_curve),
            (r.strategy.as_str(), &h.federated_curve),
        ] {
            series.push(Series {
                name: format!("{} {label}", h.site),
                points: curve
                    .iter()
                    .filter_map(|(x, y)| y.map(|y| (*x as f64, y)))
                    .collect(),
            });
        }
    }
    LineChart {
        title: format!(
            "Held-out tissue Dice per round: {} vs local-only",
            r.strategy
        ),
        x_label: "round".into(),
        y_label: "tissue mean Dice".into(),
        series,
        y_range: Some((0.0, 1.0)),
    }
}
