//! `cosilo import`: NIfTI pairs or a cohort manifest into the store.

use std::path::PathBuf;

use super::StoreDir;

#[derive(clap::Args, Debug)]
pub(crate) struct ImportArgs {
    #[command(flatten)]
    pub(crate) store: StoreDir,
    /// A cohort manifest (manifest.json); its image/label paths are relative to its directory.
    #[arg(long, required_unless_present = "image", conflicts_with_all = ["image", "label", "id", "split"])]
    pub(crate) manifest: Option<PathBuf>,
    /// The image of one case (NIfTI).
    #[arg(long, requires_all = ["label", "id", "split", "hospital"])]
    pub(crate) image: Option<PathBuf>,
    /// The label of that case (NIfTI, integers 0..=255 on the image's grid).
    #[arg(long, requires = "image")]
    pub(crate) label: Option<PathBuf>,
    /// The id of that case.
    #[arg(long, requires = "image")]
    pub(crate) id: Option<String>,
    /// train or test.
    #[arg(long, requires = "image")]
    pub(crate) split: Option<cosilo_store::Split>,
    /// The case's hospital; with --manifest, import only this hospital's cases.
    #[arg(long)]
    pub(crate) hospital: Option<String>,
}

/// `cosilo import`: exits non-zero when any case was refused.
pub(crate) fn import(args: ImportArgs) -> anyhow::Result<()> {
    use cosilo_store::{
        import::{import_all, read_manifest},
        ImportRequest, Store,
    };
    let requests = match (args.manifest, args.image, args.label, args.id, args.split) {
        (Some(manifest), ..) => read_manifest(&manifest, args.hospital.as_deref())?,
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
    let report = import_all(&store, &requests)?;
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
