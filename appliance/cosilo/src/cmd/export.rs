//! `cosilo export`: a trained run as an ONNX bundle.

use std::path::PathBuf;

use super::StoreDir;

#[derive(clap::Args, Debug)]
pub(crate) struct ExportArgs {
    #[command(flatten)]
    pub(crate) store: StoreDir,
    /// The run to export (its newest checkpoint).
    #[arg(long, default_value = "local")]
    pub(crate) run: String,
    /// The bundle directory to create (must not exist or be empty).
    #[arg(long)]
    pub(crate) out: PathBuf,
}

/// `cosilo export`.
pub(crate) fn export(args: ExportArgs) -> anyhow::Result<()> {
    let store = cosilo_store::Store::open(&args.store.path)?;
    let device = cosilo_train::device()?;
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
