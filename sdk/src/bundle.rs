//! The model bundle: a directory holding `model.onnx` and `manifest.json`.
//!
//! The appliance writes a bundle when it exports a trained network; a clinical application opens it
//! with [`crate::segment::Segmenter`]. The manifest says everything a host needs to use the model
//! the way it was trained: the tensor layout, the size multiple slices are padded to, the intensity
//! [`Normalisation`], what each output class means and which label value it is written as. It also
//! records where the model came from (run, sites, case count, time, Cosilo version), how well it
//! scored, and the SHA-256 of `model.onnx`, which [`Bundle::open`] checks before anything runs.
//!
//! A bundle is immutable: [`write`] refuses to replace a non-empty directory, and writes through a
//! temporary directory that is renamed into place, so a reader sees a complete bundle or none.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use cosilo_hardware::durable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::preprocess::Normalisation;

/// The manifest format this SDK reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name inside a bundle.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The model's file name inside a bundle.
pub const MODEL_FILE: &str = "model.onnx";
/// Name of the network's input tensor.
pub const INPUT_NAME: &str = "image";
/// Name of the network's output tensor.
pub const OUTPUT_NAME: &str = "probabilities";

/// Errors reading, checking or writing a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("cannot read bundle manifest {path}: {source}")]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bundle manifest {path} is not valid: {source}")]
    ParseManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "bundle manifest {path} has format version {found}; this Cosilo SDK reads version {supported} \
         (use an SDK that matches the appliance that exported it)"
    )]
    UnsupportedFormat {
        path: PathBuf,
        found: u64,
        supported: u32,
    },
    #[error("bundle manifest {path} is inconsistent: {reason}")]
    InvalidManifest { path: PathBuf, reason: String },
    #[error("cannot read bundle model {path}: {source}")]
    ReadModel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "bundle model {path} does not match its manifest: SHA-256 is {found}, the manifest says \
         {expected} (the file is corrupt or was replaced; re-export the bundle)"
    )]
    ModelChecksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("cannot write bundle {path}: it already exists and is not empty (bundles are never replaced)")]
    Exists { path: PathBuf },
    #[error("cannot write bundle {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One output class of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSpec {
    /// What the class is, e.g. `"tumour"`.
    pub name: String,
    /// The value written in label volumes for voxels of this class.
    pub label: u8,
    /// The label values of the training annotations that were trained as this class (for scoring
    /// against annotations that use the finer training labels).
    pub training_labels: Vec<u8>,
}

/// The classes of a network trained with `label_map` (training label value → class index): class
/// `c` is written as the smallest label value that maps to it, or `c` where none does.
pub fn classes_from_label_map(names: &[String], label_map: &[u8]) -> Vec<ClassSpec> {
    names
        .iter()
        .enumerate()
        .map(|(c, name)| {
            let training_labels: Vec<u8> = label_map
                .iter()
                .enumerate()
                .filter(|(_, &class)| class as usize == c)
                .filter_map(|(value, _)| u8::try_from(value).ok())
                .collect();
            ClassSpec {
                name: name.clone(),
                label: training_labels.first().copied().unwrap_or(c as u8),
                training_labels,
            }
        })
        .collect()
}

/// The network's input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// Image channels (1: one MR contrast).
    pub channels: usize,
    /// Slice heights and widths must be multiples of this; hosts zero-pad, centred, and crop back.
    pub size_multiple: usize,
    /// How a volume becomes the input tensor, for people.
    pub layout: String,
}

impl InputSpec {
    /// The input of a Cosilo slice network: `image`, float32 `[N, channels, H, W]`.
    pub fn axial_slices(channels: usize, size_multiple: usize) -> Self {
        InputSpec {
            name: INPUT_NAME.into(),
            channels,
            size_multiple,
            layout: format!(
                "float32 [N, C, H, W]: N axial slices (k), H = dims[1] rows (j), W = dims[0] columns (i), \
                 normalised over the whole volume first, then zero-padded centred to multiples of \
                 {size_multiple} and cropped back after inference"
            ),
        }
    }
}

/// The network's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Tensor name in the ONNX graph.
    pub name: String,
    /// What the output holds, for people.
    pub layout: String,
}

impl Default for OutputSpec {
    /// `probabilities`, float32 `[N, classes, H, W]`, softmax over the class axis.
    fn default() -> Self {
        OutputSpec {
            name: OUTPUT_NAME.into(),
            layout: "float32 [N, classes, H, W]: softmax over axis 1, classes in manifest order"
                .into(),
        }
    }
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The training run (federated or local) that produced the weights.
    pub training_run: String,
    /// Sites whose data trained the model.
    pub sites: Vec<String>,
    /// Training cases over all sites.
    pub cases: usize,
    /// When the bundle was made, RFC 3339 UTC (see [`rfc3339_utc`]).
    pub created: String,
    /// Version of the Cosilo software that exported it.
    pub cosilo_version: String,
}

/// How well the model scored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// 3-D Dice per class, in class order; `None` where the class was absent from the evaluation.
    pub dice: Vec<Option<f64>>,
    /// Number of evaluation cases the Dice values average over.
    pub cases: usize,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_VERSION`] when written by this SDK.
    pub format_version: u32,
    pub model_name: String,
    /// Lower-case hex SHA-256 of `model.onnx`; [`write`] fills it in.
    pub model_sha256: String,
    pub input: InputSpec,
    pub output: OutputSpec,
    /// Output classes in channel order, background first.
    pub classes: Vec<ClassSpec>,
    /// Intensity normalisation applied to the whole volume before slicing.
    pub normalisation: Normalisation,
    pub provenance: Provenance,
    pub metrics: Metrics,
}

impl Manifest {
    /// Reads and checks the manifest of the bundle in `dir`, including the model's checksum.
    pub fn read(dir: impl AsRef<Path>) -> Result<Manifest, BundleError> {
        Bundle::open(dir).map(|b| b.manifest)
    }

    /// Parses manifest JSON; `path` names it in errors. Checks the format version before anything
    /// else, so a newer manifest fails with [`BundleError::UnsupportedFormat`], not a parse error.
    pub fn from_json(json: &[u8], path: &Path) -> Result<Manifest, BundleError> {
        let parse = |source| BundleError::ParseManifest {
            path: path.to_path_buf(),
            source,
        };
        let value: serde_json::Value = serde_json::from_slice(json).map_err(parse)?;
        let found = value.get("format_version").and_then(|v| v.as_u64());
        match found {
            Some(v) if v == FORMAT_VERSION as u64 => {}
            Some(found) => {
                return Err(BundleError::UnsupportedFormat {
                    path: path.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                })
            }
            None => {
                return Err(BundleError::InvalidManifest {
                    path: path.to_path_buf(),
                    reason: "no numeric format_version".into(),
                })
            }
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(parse)?;
        manifest
            .validate()
            .map_err(|reason| BundleError::InvalidManifest {
                path: path.to_path_buf(),
                reason,
            })?;
        Ok(manifest)
    }

    /// Pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data (no maps with non-string keys) cannot fail.
        let mut s = serde_json::to_vec_pretty(self).unwrap_or_default();
        s.push(b'\n');
        s
    }

    /// Checks the fields against each other (not the model file).
    pub fn validate(&self) -> Result<(), String> {
        if self.format_version != FORMAT_VERSION {
            return Err(format!(
                "format_version {} (expected {FORMAT_VERSION})",
                self.format_version
            ));
        }
        if self.classes.len() < 2 {
            return Err(format!(
                "{} classes; at least 2 are needed",
                self.classes.len()
            ));
        }
        for (i, a) in self.classes.iter().enumerate() {
            if let Some(b) = self.classes[..i].iter().find(|b| b.label == a.label) {
                return Err(format!(
                    "classes {:?} and {:?} are both written as label {}",
                    b.name, a.name, a.label
                ));
            }
        }
        if self.input.channels == 0 || self.input.size_multiple == 0 {
            return Err("input channels and size_multiple must be at least 1".into());
        }
        if self.input.name.is_empty() || self.output.name.is_empty() {
            return Err("input and output tensor names must not be empty".into());
        }
        if !self.metrics.dice.is_empty() && self.metrics.dice.len() != self.classes.len() {
            return Err(format!(
                "{} Dice values for {} classes",
                self.metrics.dice.len(),
                self.classes.len()
            ));
        }
        if !self.model_sha256.is_empty()
            && (self.model_sha256.len() != 64
                || !self
                    .model_sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        {
            return Err(format!(
                "model_sha256 {:?} is not 64 lower-case hex digits",
                self.model_sha256
            ));
        }
        Ok(())
    }

    /// The class index of every label value (0..=255); values no class is written as map to 0.
    pub fn class_of_label(&self) -> [u8; 256] {
        let mut lut = [0u8; 256];
        for (c, class) in self.classes.iter().enumerate() {
            lut[class.label as usize] = c as u8;
        }
        lut
    }

    /// The class index of every training label value (0..=255), from `training_labels`; values no
    /// class lists map to 0 (background).
    pub fn class_of_training_label(&self) -> [u8; 256] {
        let mut lut = [0u8; 256];
        for (c, class) in self.classes.iter().enumerate() {
            for &v in &class.training_labels {
                lut[v as usize] = c as u8;
            }
        }
        lut
    }
}

/// An opened bundle: its checked manifest and the model bytes that were checked.
#[derive(Debug, Clone)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// The ONNX model, exactly the bytes whose SHA-256 matched the manifest.
    pub model: Vec<u8>,
}

impl Bundle {
    /// Reads the manifest (checking its format version and consistency) and the model (checking
    /// its SHA-256 against the manifest).
    pub fn open(dir: impl AsRef<Path>) -> Result<Bundle, BundleError> {
        let dir = dir.as_ref().to_path_buf();
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = fs::read(&manifest_path).map_err(|source| BundleError::ReadManifest {
            path: manifest_path.clone(),
            source,
        })?;
        let manifest = Manifest::from_json(&json, &manifest_path)?;
        let model_path = dir.join(MODEL_FILE);
        let model = fs::read(&model_path).map_err(|source| BundleError::ReadModel {
            path: model_path.clone(),
            source,
        })?;
        let found = sha256_hex(&model);
        if found != manifest.model_sha256 {
            return Err(BundleError::ModelChecksum {
                path: model_path,
                expected: manifest.model_sha256,
                found,
            });
        }
        Ok(Bundle {
            dir,
            manifest,
            model,
        })
    }
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Writes a bundle to `dir` (which must not exist, or be empty): `model.onnx` and `manifest.json`
/// with `model_sha256` set to the model's checksum. Both files are written into a temporary
/// directory beside `dir`, synced, and renamed into place, then the parent directory is synced.
/// Returns the manifest as written.
pub fn write(
    dir: impl AsRef<Path>,
    model: &[u8],
    manifest: &Manifest,
) -> Result<Manifest, BundleError> {
    let dir = dir.as_ref();
    let mut manifest = manifest.clone();
    manifest.model_sha256 = sha256_hex(model);
    manifest
        .validate()
        .map_err(|reason| BundleError::InvalidManifest {
            path: dir.join(MANIFEST_FILE),
            reason,
        })?;
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Write { path, source }
    };
    if let Ok(mut entries) = fs::read_dir(dir) {
        if entries.next().is_some() {
            return Err(BundleError::Exists {
                path: dir.to_path_buf(),
            });
        }
    }
    let name = dir.file_name().ok_or_else(|| {
        werr(dir)(std::io::Error::other(
            "the bundle path has no final component",
        ))
    })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(werr(&parent))?;
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = parent.join(format!(
        ".{}.tmp-{}-{nanos}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        fs::create_dir(&tmp).map_err(werr(&tmp))?;
        let model_path = tmp.join(MODEL_FILE);
        durable::write_synced(&model_path, model).map_err(werr(&model_path))?;
        let manifest_path = tmp.join(MANIFEST_FILE);
        durable::write_synced(&manifest_path, &manifest.to_json()).map_err(werr(&manifest_path))?;
        durable::sync_dir(&tmp).map_err(werr(&tmp))?;
        fs::rename(&tmp, dir).map_err(|source| match source.kind() {
            std::io::ErrorKind::DirectoryNotEmpty | std::io::ErrorKind::AlreadyExists => {
                BundleError::Exists {
                    path: dir.to_path_buf(),
                }
            }
            _ => BundleError::Write {
                path: dir.to_path_buf(),
                source,
            },
        })?;
        durable::sync_dir(&parent).map_err(werr(&parent))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result.map(|()| manifest)
}

/// `t` as RFC 3339 UTC with whole seconds, e.g. `2026-11-22T09:30:00Z`.
pub fn rfc3339_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    pub(crate) fn sample() -> Manifest {
        let names: Vec<String> = ["background", "csf", "grey_matter", "white_matter", "tumour"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        Manifest {
            format_version: FORMAT_VERSION,
            model_name: "brain-unet".into(),
            model_sha256: String::new(),
            input: InputSpec::axial_slices(1, 8),
            output: OutputSpec::default(),
            classes: classes_from_label_map(&names, &[0, 1, 2, 3, 4, 4, 4]),
            normalisation: Normalisation::default(),
            provenance: Provenance {
                training_run: "fed-2026-11".into(),
                sites: vec!["north".into(), "south".into()],
                cases: 24,
                created: rfc3339_utc(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
                cosilo_version: "0.1.0".into(),
            },
            metrics: Metrics {
                dice: vec![Some(0.99), Some(0.8), Some(0.85), Some(0.9), None],
                cases: 6,
            },
        }
    }

    #[test]
    fn label_map_gives_first_label_per_class() {
        let m = sample();
        let labels: Vec<u8> = m.classes.iter().map(|c| c.label).collect();
        assert_eq!(labels, [0, 1, 2, 3, 4]);
        assert_eq!(m.classes[4].training_labels, [4, 5, 6]);
        assert_eq!(m.class_of_training_label()[6], 4);
        assert_eq!(m.class_of_training_label()[9], 0);
        // A class nothing maps to keeps its index as its label.
        let names = vec!["bg".to_string(), "a".into(), "b".into()];
        let c = classes_from_label_map(&names, &[0, 2]);
        assert_eq!((c[1].label, c[2].label), (1, 1));
        assert!(c[1].training_labels.is_empty());
    }

    #[test]
    fn json_round_trip_and_format_check() {
        let mut m = sample();
        m.model_sha256 = sha256_hex(b"model");
        let json = m.to_json();
        let p = Path::new("x/manifest.json");
        assert_eq!(Manifest::from_json(&json, p).unwrap(), m);
        let text = String::from_utf8(json).unwrap();
        assert!(
            text.contains("\"normalisation\": {\n    \"method\": "),
            "{text}"
        );

        let newer = text.replace("\"format_version\": 1", "\"format_version\": 2");
        match Manifest::from_json(newer.as_bytes(), p) {
            Err(BundleError::UnsupportedFormat {
                found: 2,
                supported: 1,
                ..
            }) => {}
            other => panic!("{other:?}"),
        }
        // A newer format is reported as such even when the rest would not parse.
        let alien = br#"{"format_version": 7, "everything": "different"}"#;
        assert!(matches!(
            Manifest::from_json(alien, p),
            Err(BundleError::UnsupportedFormat { found: 7, .. })
        ));
        assert!(matches!(
            Manifest::from_json(b"{}", p),
            Err(BundleError::InvalidManifest { .. })
        ));
        assert!(matches!(
            Manifest::from_json(b"not json", p),
            Err(BundleError::ParseManifest { .. })
        ));
    }

    #[test]
    fn validate_catches_inconsistencies() {
        let mut m = sample();
        m.classes[2].label = 1;
        assert!(m.validate().unwrap_err().contains("label 1"));
        let mut m = sample();
        m.metrics.dice.pop();
        assert!(m.validate().is_err());
        let mut m = sample();
        m.model_sha256 = "ABC".into();
        assert!(m.validate().is_err());
    }

    #[test]
    fn write_then_open_checks_the_model() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundles").join("b1");
        let written = write(&dir, b"onnx bytes", &sample()).unwrap();
        assert_eq!(written.model_sha256, sha256_hex(b"onnx bytes"));
        let b = Bundle::open(&dir).unwrap();
        assert_eq!(b.manifest, written);
        assert_eq!(b.model, b"onnx bytes");
        // No temporary directory is left beside the bundle.
        let siblings: Vec<_> = fs::read_dir(dir.parent().unwrap()).unwrap().collect();
        assert_eq!(siblings.len(), 1);

        assert!(matches!(
            write(&dir, b"other", &sample()),
            Err(BundleError::Exists { .. })
        ));

        fs::write(dir.join(MODEL_FILE), b"onnx bytez").unwrap();
        let err = Manifest::read(&dir).unwrap_err();
        assert!(matches!(err, BundleError::ModelChecksum { .. }), "{err}");
        assert!(err.to_string().contains("re-export"), "{err}");

        // An empty directory may be written into.
        let empty = tmp.path().join("empty");
        fs::create_dir(&empty).unwrap();
        write(&empty, b"m", &sample()).unwrap();
        assert!(Bundle::open(&empty).is_ok());
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723); // 2000-02-29 01:02:03
        assert_eq!(rfc3339_utc(t), "2000-02-29T01:02:03Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339_utc(t), "2026-12-31T23:59:59Z");
    }
}
