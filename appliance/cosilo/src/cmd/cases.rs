//! `cosilo cases list | show | remove`: the store's cases as an operator sees them.
//!
//! The store is opened by one process at a time (sled holds a lock on its folder). While
//! `cosilo bridge` or `cosilo run` holds it, these commands stop with a message that says so and
//! change nothing; `remove` never runs against a store another process is writing.

use std::path::Path;

use anyhow::Context;

use cosilo_store::{CaseMeta, Store, StoreError};

/// What `cosilo cases` does.
#[derive(clap::Subcommand, Debug)]
pub enum CasesCommand {
    /// One line per case: id, hospital, split, grid, spacing, labels present, source, import time.
    List,
    /// Everything known about one case, with its history (replacements and their reasons).
    Show {
        /// The case id.
        id: String,
    },
    /// Remove one case (image, label and metadata in one transaction).
    Remove {
        /// The case id.
        id: String,
    },
}

fn open(dir: &Path) -> anyhow::Result<Store> {
    Store::open(dir).map_err(|e| {
        let locked = matches!(&e, StoreError::Open { .. })
            && cosilo_hardware::error_text::error_chain(&e).contains("lock");
        if locked {
            anyhow::anyhow!(
                "the store {} is in use by another cosilo process (bridge or run); stop it \
                 first: nothing was changed",
                dir.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("cannot open the store {}", dir.display()))
        }
    })
}

fn labels_present(meta: &CaseMeta) -> String {
    let present: Vec<String> = meta
        .label_counts
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &n)| n > 0)
        .map(|(v, _)| v.to_string())
        .collect();
    if present.is_empty() {
        "-".to_string()
    } else {
        present.join(",")
    }
}

fn grid(meta: &CaseMeta) -> (String, String, String) {
    let g = &meta.geometry;
    let s = g.spacing();
    let o = [g.affine[0][3], g.affine[1][3], g.affine[2][3]];
    (
        format!("{}x{}x{}", g.dims[0], g.dims[1], g.dims[2]),
        format!("{:.3}x{:.3}x{:.3}", s[0], s[1], s[2]),
        format!("{:.1},{:.1},{:.1}", o[0], o[1], o[2]),
    )
}

/// Runs `cosilo cases …` against the store in `store_dir`, writing to stdout.
pub fn run(store_dir: &Path, cmd: CasesCommand) -> anyhow::Result<()> {
    let store = open(store_dir)?;
    match cmd {
        CasesCommand::List => {
            println!("id\thospital\tsplit\tgrid\tspacing_mm\torigin_mm\tlabels\tsource\timported_at_unix");
            for id in store.case_ids(None)? {
                let m = store.case_meta(&id)?;
                let (dims, spacing, origin) = grid(&m);
                println!(
                    "{id}\t{}\t{}\t{dims}\t{spacing}\t{origin}\t{}\t{}\t{}",
                    m.provenance.hospital,
                    m.split,
                    labels_present(&m),
                    m.provenance.image_file,
                    m.provenance.imported_at_unix
                );
            }
        }
        CasesCommand::Show { id } => {
            let m = store
                .case_meta(&id)
                .with_context(|| format!("no case {id}"))?;
            let (dims, spacing, origin) = grid(&m);
            println!("id: {id}");
            println!("hospital: {}", m.provenance.hospital);
            println!("split: {}", m.split);
            println!("grid: {dims}  spacing (mm): {spacing}  origin (mm, RAS): {origin}");
            println!("labels present: {}", labels_present(&m));
            println!("label voxel counts: {:?}", m.label_counts);
            println!(
                "source: {} {} {}",
                m.provenance.source, m.provenance.image_file, m.provenance.label_file
            );
            println!("imported at (unix): {}", m.provenance.imported_at_unix);
            println!("by: {}", m.provenance.tool_version);
            println!("image sha256: {}", m.image_sha256);
            for c in store.case_history(&id)? {
                println!(
                    "replaced at (unix) {}: {} (was {}, image sha256 {})",
                    c.at_unix, c.reason, c.previous_source, c.previous_image_sha256
                );
            }
        }
        CasesCommand::Remove { id } => {
            if store.remove_case(&id)? {
                println!("removed {id}");
            } else {
                anyhow::bail!("no case {id} in the store");
            }
        }
    }
    Ok(())
}
