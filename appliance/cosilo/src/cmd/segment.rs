//! `cosilo segment`: a NIfTI volume or DICOM series through a bundle.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub(crate) struct SegmentArgs {
    /// The bundle directory (model.onnx + manifest.json).
    #[arg(long)]
    pub(crate) bundle: PathBuf,
    /// The image to segment (NIfTI).
    #[arg(long, required_unless_present = "dicom", conflicts_with = "dicom")]
    pub(crate) input: Option<PathBuf>,
    /// A folder holding one DICOM image series to segment instead of --input.
    #[arg(long)]
    pub(crate) dicom: Option<PathBuf>,
    /// Where to write the labels (uint8 NIfTI on the input's grid).
    #[arg(long, required_unless_present = "seg_out")]
    pub(crate) output: Option<PathBuf>,
    /// With --dicom: write the labels as a DICOM SEG referencing the series.
    #[arg(long, requires = "dicom")]
    pub(crate) seg_out: Option<PathBuf>,
    /// An annotation of the same image: prints 3-D Dice per class.
    #[arg(long)]
    pub(crate) truth: Option<PathBuf>,
    /// ONNX Runtime intra-op threads (default: one per physical core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

/// `cosilo segment`: labels on the input's grid, each class's volume, and Dice with --truth.
pub(crate) fn segment(args: SegmentArgs) -> anyhow::Result<()> {
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
