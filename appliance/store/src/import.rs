//! Importing many cases at once: reading a cohort manifest, importing each case with a progress
//! bar, and reporting what was imported, what was already there and what was refused (and why).
//!
//! A refused case (bad file, mismatched grid, conflicting content) does not stop the others; an
//! error of the store itself (disk full, damaged store) does.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cosilo_hardware::error_text::error_chain;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use super::{ImportOutcome, Split, Store, StoreError};

/// One image/label pair to import.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportRequest {
    pub id: String,
    pub split: Split,
    pub image: PathBuf,
    pub label: PathBuf,
    pub hospital: String,
}

/// Errors reading a cohort manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {file} is not a valid case list")]
    Parse {
        file: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("manifest {file} lists no cases for hospital {hospital:?} (it has: {})", .present.join(", "))]
    NoCasesForHospital {
        file: PathBuf,
        hospital: String,
        present: Vec<String>,
    },
    #[error("manifest {file} lists no cases")]
    Empty { file: PathBuf },
}

/// The part of a cohort manifest that import reads; other fields are ignored.
#[derive(Debug, Deserialize)]
struct Manifest {
    cases: Vec<ManifestCase>,
}

#[derive(Debug, Deserialize)]
struct ManifestCase {
    case_id: String,
    hospital: String,
    split: Split,
    image: PathBuf,
    label: PathBuf,
}

/// Reads a cohort manifest (`{"cases": [{"case_id", "hospital", "split", "image", "label"}, ...]}`,
/// paths relative to the manifest's directory) into import requests, keeping only `hospital`'s
/// cases when given.
pub fn read_manifest(
    path: &Path,
    hospital: Option<&str>,
) -> Result<Vec<ImportRequest>, ManifestError> {
    let text = std::fs::read(path).map_err(|source| ManifestError::Read {
        file: path.to_path_buf(),
        source,
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|source| ManifestError::Parse {
            file: path.to_path_buf(),
            source,
        })?;
    if manifest.cases.is_empty() {
        return Err(ManifestError::Empty {
            file: path.to_path_buf(),
        });
    }
    let base = path.parent().unwrap_or(Path::new(""));
    let mut present: Vec<String> = manifest.cases.iter().map(|c| c.hospital.clone()).collect();
    present.sort();
    present.dedup();
    let requests: Vec<ImportRequest> = manifest
        .cases
        .into_iter()
        .filter(|c| hospital.is_none_or(|h| h == c.hospital))
        .map(|c| ImportRequest {
            id: c.case_id,
            split: c.split,
            image: base.join(c.image),
            label: base.join(c.label),
            hospital: c.hospital,
        })
        .collect();
    match hospital {
        Some(h) if requests.is_empty() => Err(ManifestError::NoCasesForHospital {
            file: path.to_path_buf(),
            hospital: h.to_string(),
            present,
        }),
        _ => Ok(requests),
    }
}

/// A case the store refused, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: String,
    pub reason: String,
}

/// What a batch import did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportReport {
    pub imported: Vec<String>,
    pub already_present: Vec<String>,
    pub refused: Vec<Refusal>,
    /// Voxel bytes written for the newly imported cases (image f32 + label u8).
    pub bytes_written: u64,
    pub elapsed: Duration,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        write!(
            f,
            "imported {}, already present {}, refused {}",
            self.imported.len(),
            self.already_present.len(),
            self.refused.len()
        )?;
        if !self.imported.is_empty() && secs > 0.0 {
            write!(
                f,
                " ({:.1} MB of voxels in {:.2} s: {:.1} cases/s, {:.1} MB/s)",
                self.bytes_written as f64 / 1e6,
                secs,
                self.imported.len() as f64 / secs,
                self.bytes_written as f64 / 1e6 / secs
            )?;
        }
        writeln!(f)?;
        for r in &self.refused {
            writeln!(f, "refused {}: {}", r.id, r.reason)?;
        }
        Ok(())
    }
}

/// Imports each request in turn, showing a progress bar on a terminal and logging each outcome.
/// Refused cases are collected in the report; a store error stops the import and is returned.
pub fn import_all(store: &Store, requests: &[ImportRequest]) -> Result<ImportReport, StoreError> {
    let start = Instant::now();
    let bar = ProgressBar::new(requests.len() as u64);
    if let Ok(style) =
        ProgressStyle::with_template("[{elapsed_precise}] {wide_bar} {pos}/{len} cases {msg}")
    {
        bar.set_style(style);
    }
    let mut report = ImportReport::default();
    for r in requests {
        bar.set_message(r.id.clone());
        match store.import_case(&r.id, r.split, &r.image, &r.label, &r.hospital) {
            Ok(ImportOutcome::Imported) => {
                let meta = store.case_meta(&r.id)?;
                report.bytes_written += meta.geometry.len() as u64 * 5;
                bar.suspend(|| {
                    tracing::info!(
                        "imported case {} ({}, {}, {:?} voxels)",
                        r.id,
                        r.split,
                        r.hospital,
                        meta.geometry.dims
                    )
                });
                report.imported.push(r.id.clone());
            }
            Ok(ImportOutcome::AlreadyPresent) => {
                bar.suspend(|| tracing::info!("case {} is already present", r.id));
                report.already_present.push(r.id.clone());
            }
            Err(e) if e.is_refusal() => {
                let reason = error_chain(&e);
                bar.suspend(|| tracing::warn!("refused case {}: {reason}", r.id));
                report.refused.push(Refusal {
                    id: r.id.clone(),
                    reason,
                });
            }
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    report.elapsed = start.elapsed();
    Ok(report)
}
