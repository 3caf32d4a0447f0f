//! `cosilo evaluate`: score a trained run on the held-out test cases (the store's final
//! evaluation of the run: the read is recorded).

use std::path::PathBuf;

use super::StoreDir;

#[derive(clap::Args, Debug)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) store: StoreDir,
    /// The run to score.
    #[arg(long, default_value = "local")]
    pub(crate) run: String,
    /// Score this hospital's held-out cases only.
    #[arg(long)]
    pub(crate) hospital: Option<String>,
    /// Where to write evaluation.md / evaluation.json.
    #[arg(long)]
    pub(crate) report: Option<PathBuf>,
}

/// `cosilo evaluate`.
pub(crate) fn evaluate(args: EvalArgs) -> anyhow::Result<()> {
    use cosilo_appliance::local;
    use cosilo_store::Store;
    let store = Store::open(&args.store.path)?;
    let device = cosilo_train::device()?;
    let (net, _, cfg) = local::load_model(&store, &args.run, &device)?;
    let fin = store.final_evaluation(&args.run)?;
    let test = local::load_test_volumes(&fin, args.hospital.as_deref())?;
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
