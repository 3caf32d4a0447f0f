//! `manifest.json`: what a cohort folder holds, for the trainer, the dataset import and people.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::labels::NUM_LABELS;
use super::scanner::{ScanDraw, ScannerProfile};
use super::CohortError;

/// Version of the manifest's layout.
pub const FORMAT_VERSION: u32 = 1;
/// Name of the manifest file in a cohort folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A cohort folder's manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// `cosilo cohort generator`.
    pub generator: String,
    /// Bumped whenever the same seed would give different bytes.
    pub generator_version: u32,
    pub seed: u64,
    /// Plain statement of what is real and what is simulated.
    pub note: String,
    /// Label names, indexed by label value.
    pub labels: Vec<String>,
    pub hospitals: Vec<HospitalRecord>,
    pub cases: Vec<CaseRecord>,
}

/// One hospital of the cohort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HospitalRecord {
    /// `h1`, `h2`, ...
    pub id: String,
    /// The real subject every patient of this hospital is derived from.
    pub source_subject: String,
    pub source_description: String,
    /// Cache paths of the source files (`<source id>/<file>`).
    pub source_files: Vec<String>,
    /// The grid every volume of this hospital shares.
    pub grid: GridRecord,
    pub scanner: ScannerProfile,
    pub train_cases: usize,
    /// Absent from manifests written before the validation split: 0.
    #[serde(default)]
    pub validation_cases: usize,
    pub test_cases: usize,
}

/// A voxel grid: size, spacing and the voxel → world (RAS, mm) affine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridRecord {
    pub dims: [usize; 3],
    pub spacing_mm: [f64; 3],
    pub affine: [[f64; 4]; 4],
}

/// Training, validation or held-out test case: the store's own split, so a manifest's cases import as they are.
pub use cosilo_store::Split;

/// One simulated patient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseRecord {
    /// e.g. `h1-train-007`.
    pub case_id: String,
    pub hospital: String,
    pub split: Split,
    /// float32 NIfTI, relative to the cohort folder.
    pub image: String,
    /// uint8 NIfTI (labels 0..=6), relative to the cohort folder.
    pub label: String,
    /// Fake, for leak tests; appears only here.
    pub patient_name: String,
    /// Fake, for leak tests; appears only here.
    pub patient_id: String,
    /// Oedema + enhancing rim + necrotic core, in millilitres.
    pub tumour_volume_ml: f64,
    /// Voxel count of each label value 0..=6.
    pub label_voxels: [u64; NUM_LABELS],
    /// The scanner parameters this patient's scan drew.
    pub scan: ScanDraw,
}

impl CaseRecord {
    /// Absolute path of the image given the cohort folder.
    pub fn image_path(&self, root: &Path) -> PathBuf {
        root.join(&self.image)
    }

    /// Absolute path of the labels given the cohort folder.
    pub fn label_path(&self, root: &Path) -> PathBuf {
        root.join(&self.label)
    }
}

impl Manifest {
    /// Reads `<dir>/manifest.json`.
    pub fn read(dir: &Path) -> Result<Manifest, CohortError> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| CohortError::Io {
            op: "cannot read",
            path: path.display().to_string(),
            source,
        })?;
        let m: Manifest = serde_json::from_str(&text).map_err(|source| CohortError::Manifest {
            path: path.display().to_string(),
            source,
        })?;
        if m.format_version != FORMAT_VERSION {
            return Err(CohortError::ManifestVersion {
                path: path.display().to_string(),
                found: m.format_version,
                expected: FORMAT_VERSION,
            });
        }
        Ok(m)
    }

    /// The cases of one hospital and split, in manifest order.
    pub fn cases_of<'a>(
        &'a self,
        hospital: &'a str,
        split: Split,
    ) -> impl Iterator<Item = &'a CaseRecord> + 'a {
        self.cases
            .iter()
            .filter(move |c| c.hospital == hospital && c.split == split)
    }
}
