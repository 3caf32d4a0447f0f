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

/// `cosilo writeback`: spool's done/ series → SDK segmentation → re-identified SEG → outbox
/// ([`cosilo_bridge::writeback::write_back_case`]).
pub(crate) fn writeback(args: WritebackArgs) -> anyhow::Result<()> {
    use cosilo_bridge::pipeline::{BridgeConfig, PipelineError};
    use cosilo_bridge::writeback::{self, SendOutcome, WritebackError};

    let cfg = match BridgeConfig::from_file(&args.config) {
        Ok(cfg) => cfg,
        Err(e @ (PipelineError::ParseConfig { .. } | PipelineError::Invalid(_))) => {
            return Err(anyhow::Error::new(BadConfig(format!("{e:#}"))))
        }
        Err(e) => return Err(e.into()),
    };
    let queued = match writeback::write_back_case(&cfg, &args.case, &args.bundle, args.threads) {
        Ok(queued) => queued,
        Err(WritebackError::NoPacs) => {
            return Err(anyhow::Error::new(BadConfig(format!(
                "{}: no [network.pacs] to write back to",
                args.config.display()
            ))))
        }
        Err(e) => return Err(e.into()),
    };
    let item = &queued.item;
    println!(
        "queued {} for {} ({}): case {} segmented in {:.2} s",
        item.id,
        item.destination.ae_title,
        item.destination.address,
        args.case,
        queued.segment_seconds
    );
    if args.send_now {
        match writeback::send_now(&cfg, item)? {
            SendOutcome::Sent => println!("sent {}", item.id),
            SendOutcome::Pending(r) => println!("not sent yet (the bridge retries it): {r:?}"),
            SendOutcome::GivenUp(dead) => {
                anyhow::bail!("{} was given up (see {})", item.id, dead.display())
            }
        }
    }
    Ok(())
}
