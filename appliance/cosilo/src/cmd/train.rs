//! `cosilo train`: local training with progress and a held-out table.

use std::path::PathBuf;

use super::StoreDir;

#[derive(clap::Args, Debug)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub(crate) store: StoreDir,
    /// The run's name; an interrupted run of the same name resumes from its last checkpoint.
    #[arg(long, default_value = "local")]
    pub(crate) run: String,
    /// Train on this hospital's cases only (default: every case in the store).
    #[arg(long)]
    pub(crate) hospital: Option<String>,
    /// Training configuration (TOML, see `cosilo print-default-config`).
    #[arg(long)]
    pub(crate) config: Option<PathBuf>,
    /// Override the configuration's number of epochs.
    #[arg(long)]
    pub(crate) epochs: Option<usize>,
    /// Override the configuration's steps per epoch.
    #[arg(long)]
    pub(crate) steps_per_epoch: Option<usize>,
    /// Override the configuration's base width of the U-Net.
    #[arg(long)]
    pub(crate) base: Option<usize>,
    /// Where to write the curve (SVG) and the evaluation tables.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
}

/// `cosilo train`: a progress bar per epoch, a line per epoch, the held-out table at the end.
pub(crate) fn train(args: TrainArgs) -> anyhow::Result<()> {
    use cosilo_appliance::local;
    use cosilo_store::Store;
    use cosilo_train::{TrainConfig, TrainEvent};
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
    let device = cosilo_train::device()?;
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
                    "epoch {:>3}: loss {:.4} (ce {:.4}, dice {:.4})  validation Dice: {}  [{:.0} s]",
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
