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
    /// Print the default training configuration (TOML) to start a --config file from.
    PrintDefaultConfig,
    /// Import NIfTI image/label pairs into the store: one pair, or a cohort manifest.
    Import(ImportArgs),
    /// Segment a NIfTI volume with an exported bundle (ONNX Runtime, as a clinical app would).
    Segment(SegmentArgs),
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
}

#[derive(clap::Args, Debug)]
struct SegmentArgs {
    /// The bundle directory (model.onnx + manifest.json).
    #[arg(long)]
    bundle: PathBuf,
    /// The image to segment (NIfTI).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the labels (uint8 NIfTI on the input's grid).
    #[arg(long)]
    output: PathBuf,
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
        Command::Segment(args) => segment(args),
        Command::Train(args) => train(args),
        Command::Evaluate(args) => evaluate(args),
        Command::Export(args) => export(args),
        Command::PrintDefaultConfig => {
            print!("{}", cosilo_appliance::train::DEFAULT_TRAIN_TOML);
            Ok(())
        }
        Command::Data { cmd } => data(cmd, &cache),
    }
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
    let image = read_nifti(&args.input)?;
    let t0 = std::time::Instant::now();
    let seg = segmenter.segment(&image)?;
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(dir) = args.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    write_nifti_labels(&args.output, &seg.labels)?;
    let dice = match &args.truth {
        Some(p) => Some(segmenter.dice(&seg, &read_nifti_labels(p)?)?),
        None => None,
    };
    println!(
        "{} ({}) -> {} in {seconds:.2} s",
        args.input.display(),
        segmenter.manifest().model_name,
        args.output.display()
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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
