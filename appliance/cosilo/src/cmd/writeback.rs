//! `cosilo writeback`: a result back to the PACS as DICOM SEG.

use std::path::PathBuf;

use super::BadConfig;

#[derive(clap::Args, Debug)]
pub(crate) struct WritebackArgs {
    /// The bridge configuration (its spool, state_dir, outbox and [network.pacs]).
    #[arg(long)]
    pub(crate) config: PathBuf,
    /// The case id the bridge imported (`<patient pseudonym>-<series UID>`).
    #[arg(long)]
    pub(crate) case: String,
    /// The bundle directory (model.onnx + manifest.json).
    #[arg(long)]
    pub(crate) bundle: PathBuf,
    /// Also try to send it now (one outbox pass) instead of leaving it to the running bridge.
    #[arg(long)]
    pub(crate) send_now: bool,
    /// ONNX Runtime intra-op threads (default: one per physical core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// `cosilo writeback`: spool's done/ series → SDK segmentation → re-identified SEG → outbox.
pub(crate) fn writeback(args: WritebackArgs) -> anyhow::Result<()> {
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
