//! Cases: what a case is, how an image/label pair is checked before the store accepts it, and
//! the store operations on cases.
//!
//! A case is kept in three trees under the same key (its id): the metadata as JSON, the image
//! voxels as f32 little-endian bytes and the label voxels as one byte each, all x-fastest. The three
//! are written in one transaction, so a case is either whole in the store or absent.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use cosilo_sdk::volume::{read_nifti, Geometry, Volume};
use serde::{Deserialize, Serialize};
use sled::transaction::{abort, ConflictableTransactionError, TransactionError, Transactional};
use sled::IVec;

use super::{backend, sha256_hex, validate_name, Store, StoreError};

/// How far apart (in millimetres, at the grid's corners) an image's and a label's voxel-to-world
/// affines may be and still count as the same grid.
pub const GRID_TOLERANCE_MM: f64 = 1e-3;

/// Which part of the local data set a case belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    /// Held out from training, read by everything that selects or stops (early stopping, best
    /// model choice, IIL's patience).
    Validation,
    /// Held out from training and from every choice: its voxels are read only through
    /// [`FinalEvaluation`](crate::FinalEvaluation), once per run, for the final score.
    Test,
    /// Image-only cases from the PACS bridge, waiting for labels (a DICOM SEG); never trained on.
    Unlabelled,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Test => "test",
            Split::Unlabelled => "unlabelled",
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "train" => Ok(Split::Train),
            "validation" => Ok(Split::Validation),
            "test" => Ok(Split::Test),
            "unlabelled" => Ok(Split::Unlabelled),
            other => Err(format!(
                "split must be \"train\", \"validation\", \"test\" or \"unlabelled\", not {other:?}"
            )),
        }
    }
}

/// Where a case came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// The input format, e.g. `"nifti"`.
    pub source: String,
    /// The image file as it was named on import.
    pub image_file: String,
    /// The label file as it was named on import.
    pub label_file: String,
    pub hospital: String,
    pub imported_at_unix: u64,
    /// The program that imported it, e.g. `"cosilo-appliance 0.1.0"`.
    pub tool_version: String,
}

/// Everything about a case except its voxels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseMeta {
    pub id: String,
    pub split: Split,
    /// The grid shared by image and label (the image's affine).
    pub geometry: Geometry,
    /// SHA-256 (hex) of the stored image voxels: f32 little-endian, x-fastest. Not of the file.
    pub image_sha256: String,
    /// SHA-256 (hex) of the stored label voxels: one byte each, x-fastest.
    pub label_sha256: String,
    /// Number of voxels with each label value, for values 0 up to the largest present.
    pub label_counts: Vec<u64>,
    pub provenance: Provenance,
}

/// A case with its voxels.
#[derive(Debug, Clone, PartialEq)]
pub struct Case {
    pub meta: CaseMeta,
    pub image: Volume<f32>,
    pub label: Volume<u8>,
}

/// What `import_case` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportOutcome {
    /// The case was written and flushed to disk.
    Imported,
    /// The same case (same voxels, grid, split and hospital) was already there; nothing was written.
    AlreadyPresent,
}

/// A case read from its files and checked, ready to be written.
struct CheckedCase {
    meta: CaseMeta,
    image_bytes: Vec<u8>,
    label_bytes: Vec<u8>,
}

/// Reads and checks an image/label pair. Touches nothing in the store.
fn check_case(
    id: &str,
    split: Split,
    image_path: &Path,
    label_path: &Path,
    hospital: &str,
) -> Result<CheckedCase, StoreError> {
    validate_name("case id", id)?;
    validate_hospital(hospital)?;
    let image = read_nifti(image_path).map_err(|reason| StoreError::ReadImage {
        file: image_path.to_path_buf(),
        reason,
    })?;
    let label = read_nifti(label_path).map_err(|reason| StoreError::ReadLabel {
        file: label_path.to_path_buf(),
        reason,
    })?;
    if let Some((index, &value)) = label
        .data
        .iter()
        .enumerate()
        .find(|(_, v)| !(0.0..=255.0).contains(*v) || v.fract() != 0.0)
    {
        return Err(StoreError::LabelValue {
            file: label_path.to_path_buf(),
            index,
            value,
        });
    }
    let (gi, gl) = (&image.geometry, &label.geometry);
    if gi.dims != gl.dims {
        return Err(StoreError::GridMismatch {
            image: image_path.to_path_buf(),
            label: label_path.to_path_buf(),
            reason: format!("image is {:?} voxels, label is {:?}", gi.dims, gl.dims),
        });
    }
    if !gi.same_grid(gl, GRID_TOLERANCE_MM) {
        return Err(StoreError::GridMismatch {
            image: image_path.to_path_buf(),
            label: label_path.to_path_buf(),
            reason: format!(
                "their voxel-to-world affines differ by more than {GRID_TOLERANCE_MM} mm \
                 (image {:?}, label {:?})",
                gi.affine, gl.affine
            ),
        });
    }

    let image_bytes = image_to_bytes(&image.data);
    let label_bytes: Vec<u8> = label.data.iter().map(|&v| v as u8).collect();
    let mut label_counts = Vec::new();
    for &v in &label_bytes {
        let v = usize::from(v);
        if v >= label_counts.len() {
            label_counts.resize(v + 1, 0u64);
        }
        label_counts[v] += 1;
    }
    let meta = CaseMeta {
        id: id.to_string(),
        split,
        geometry: image.geometry,
        image_sha256: sha256_hex(&image_bytes),
        label_sha256: sha256_hex(&label_bytes),
        label_counts,
        provenance: Provenance {
            source: "nifti".to_string(),
            image_file: image_path.display().to_string(),
            label_file: label_path.display().to_string(),
            hospital: hospital.to_string(),
            imported_at_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            tool_version: concat!("cosilo-appliance ", env!("CARGO_PKG_VERSION")).to_string(),
        },
    };
    Ok(CheckedCase {
        meta,
        image_bytes,
        label_bytes,
    })
}

fn validate_hospital(hospital: &str) -> Result<(), StoreError> {
    let reason = if hospital.trim().is_empty() {
        Some("it is empty")
    } else if hospital.len() > 128 {
        Some("it is longer than 128 bytes")
    } else if hospital.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StoreError::InvalidName {
            what: "hospital",
            name: hospital.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn image_to_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// How a stored case differs from one offered again under the same id; empty when it does not.
fn differences(stored: &CaseMeta, offered: &CaseMeta) -> Vec<String> {
    let mut d = Vec::new();
    if stored.image_sha256 != offered.image_sha256 {
        d.push("image voxels".to_string());
    }
    if stored.label_sha256 != offered.label_sha256 {
        d.push("label voxels".to_string());
    }
    if !stored
        .geometry
        .same_grid(&offered.geometry, GRID_TOLERANCE_MM)
    {
        d.push("geometry".to_string());
    }
    if stored.split != offered.split {
        d.push(format!(
            "split (stored {}, offered {})",
            stored.split, offered.split
        ));
    }
    if stored.provenance.hospital != offered.provenance.hospital {
        d.push(format!(
            "hospital (stored {:?}, offered {:?})",
            stored.provenance.hospital, offered.provenance.hospital
        ));
    }
    d
}

fn decode_meta(id: &str, bytes: &[u8]) -> Result<CaseMeta, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        what: format!("metadata of case {id}"),
        source,
    })
}

fn presence(present: bool) -> &'static str {
    if present {
        "present"
    } else {
        "missing"
    }
}

impl Store {
    /// Checks an image/label pair and stores it as case `id`.
    ///
    /// Nothing in the store changes unless every check passes. The case's metadata, image and
    /// label are written in one transaction and flushed to disk before this returns `Imported`.
    /// Offering the same content again under the same id returns `AlreadyPresent` and writes
    /// nothing; different content (voxels, grid, split or hospital) is a `CaseConflict`.
    pub fn import_case(
        &self,
        id: &str,
        split: Split,
        image: &Path,
        label: &Path,
        hospital: &str,
    ) -> Result<ImportOutcome, StoreError> {
        let checked = check_case(id, split, image, label, hospital)?;
        let meta_bytes =
            serde_json::to_vec(&checked.meta).map_err(|source| StoreError::Encode {
                what: format!("metadata of case {id}"),
                source,
            })?;
        let meta_bytes = IVec::from(meta_bytes);
        let image_bytes = IVec::from(checked.image_bytes);
        let label_bytes = IVec::from(checked.label_bytes);
        let key = id.as_bytes();
        self.check_reserve(
            format!("case {id}"),
            (meta_bytes.len() + image_bytes.len() + label_bytes.len()) as u64,
        )?;

        let written = (&self.cases, &self.images, &self.labels).transaction(|(m, i, l)| {
            if let Some(existing) = m.get(key)? {
                return abort(existing);
            }
            m.insert(key, meta_bytes.clone())?;
            i.insert(key, image_bytes.clone())?;
            l.insert(key, label_bytes.clone())?;
            Ok(())
        });
        match written {
            Ok(()) => {
                self.flush()?;
                Ok(ImportOutcome::Imported)
            }
            Err(TransactionError::Abort(existing)) => {
                let stored = decode_meta(id, &existing)?;
                let differs = differences(&stored, &checked.meta);
                if differs.is_empty() {
                    Ok(ImportOutcome::AlreadyPresent)
                } else {
                    Err(StoreError::CaseConflict {
                        id: id.to_string(),
                        differs: differs.join(", "),
                    })
                }
            }
            Err(TransactionError::Storage(e)) => Err(StoreError::Write {
                what: format!("case {id}"),
                source: backend(e),
            }),
        }
    }

    /// The ids of the stored cases, sorted; only those of `split` when given.
    pub fn case_ids(&self, split: Option<Split>) -> Result<Vec<String>, StoreError> {
        let mut ids = Vec::new();
        // sled iterates in key byte order, which for UTF-8 is the order of `String`'s `Ord`.
        for item in self.cases.iter() {
            let (k, v) = item.map_err(|e| StoreError::Read {
                what: "case list".to_string(),
                source: backend(e),
            })?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if let Some(want) = split {
                if decode_meta(&id, &v)?.split != want {
                    continue;
                }
            }
            ids.push(id);
        }
        Ok(ids)
    }

    /// The metadata of case `id`.
    pub fn case_meta(&self, id: &str) -> Result<CaseMeta, StoreError> {
        let bytes = self
            .cases
            .get(id.as_bytes())
            .map_err(|e| StoreError::Read {
                what: format!("metadata of case {id}"),
                source: backend(e),
            })?
            .ok_or_else(|| StoreError::CaseNotFound { id: id.to_string() })?;
        decode_meta(id, &bytes)
    }

    /// Case `id` with its voxels. The voxels are checked against the hashes recorded on import; a
    /// mismatch is a `CaseCorrupt` error, never silently returned data.
    ///
    /// A case of the test split is refused (`SealedTestSplit`): its voxels are read only through
    /// [`Store::final_evaluation`](crate::Store::final_evaluation).
    pub fn load_case(&self, id: &str) -> Result<Case, StoreError> {
        if self.case_meta(id)?.split == Split::Test {
            return Err(StoreError::SealedTestSplit { id: id.to_string() });
        }
        self.read_case(id)
    }

    /// Case `id` with its voxels, whatever its split (the test split's gate is the caller's).
    pub(crate) fn read_case(&self, id: &str) -> Result<Case, StoreError> {
        let key = id.as_bytes();
        let read = (&self.cases, &self.images, &self.labels).transaction(|(m, i, l)| {
            Ok::<_, ConflictableTransactionError<()>>((m.get(key)?, i.get(key)?, l.get(key)?))
        });
        let (meta, image, label) = read.map_err(|e| StoreError::Read {
            what: format!("case {id}"),
            source: match e {
                TransactionError::Storage(e) => backend(e),
                TransactionError::Abort(()) => "read aborted".into(),
            },
        })?;
        let corrupt = |reason: String| StoreError::CaseCorrupt {
            id: id.to_string(),
            reason,
        };
        let (meta, image, label) = match (meta, image, label) {
            (None, None, None) => return Err(StoreError::CaseNotFound { id: id.to_string() }),
            (Some(meta), Some(image), Some(label)) => (decode_meta(id, &meta)?, image, label),
            (m, i, l) => {
                return Err(corrupt(format!(
                    "metadata {}, image {}, label {}",
                    presence(m.is_some()),
                    presence(i.is_some()),
                    presence(l.is_some())
                )))
            }
        };
        let n = meta.geometry.len();
        if image.len() != n * 4 {
            return Err(corrupt(format!(
                "image holds {} bytes, its grid {:?} needs {}",
                image.len(),
                meta.geometry.dims,
                n * 4
            )));
        }
        if label.len() != n {
            return Err(corrupt(format!(
                "label holds {} bytes, its grid {:?} needs {n}",
                label.len(),
                meta.geometry.dims
            )));
        }
        if sha256_hex(&image) != meta.image_sha256 {
            return Err(corrupt(
                "image voxels do not match their recorded SHA-256".to_string(),
            ));
        }
        if sha256_hex(&label) != meta.label_sha256 {
            return Err(corrupt(
                "label voxels do not match their recorded SHA-256".to_string(),
            ));
        }
        let image_data: Vec<f32> = image
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let image =
            Volume::new(meta.geometry.clone(), image_data).map_err(|e| corrupt(e.to_string()))?;
        let label = Volume::new(meta.geometry.clone(), label.to_vec())
            .map_err(|e| corrupt(e.to_string()))?;
        Ok(Case { meta, image, label })
    }

    /// Removes case `id` (all three parts, in one transaction) and flushes. Returns whether it was
    /// there.
    pub fn remove_case(&self, id: &str) -> Result<bool, StoreError> {
        let key = id.as_bytes();
        let removed = (&self.cases, &self.images, &self.labels)
            .transaction(|(m, i, l)| {
                let was = m.remove(key)?.is_some();
                i.remove(key)?;
                l.remove(key)?;
                Ok::<_, ConflictableTransactionError<()>>(was)
            })
            .map_err(|e| StoreError::Write {
                what: format!("removal of case {id}"),
                source: match e {
                    TransactionError::Storage(e) => backend(e),
                    TransactionError::Abort(()) => "removal aborted".into(),
                },
            })?;
        self.flush()?;
        Ok(removed)
    }
}
