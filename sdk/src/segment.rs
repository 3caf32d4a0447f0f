//! Segmenting volumes with a bundle's model through ONNX Runtime.
//!
//! ```no_run
//! use cosilo_sdk::segment::Segmenter;
//! use cosilo_sdk::volume::{read_nifti, write_nifti_labels};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let segmenter = Segmenter::open("bundles/brain-unet")?;
//! let image = read_nifti("patient.nii.gz")?;
//! let result = segmenter.segment(&image)?;
//! write_nifti_labels("labels.nii.gz", &result.labels)?; // same grid and affine as the input
//! for class in &result.classes {
//!     println!("{}: {:.1} ml", class.name, class.ml);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! What [`Segmenter::segment`] does, matching training exactly: it normalises the whole volume with
//! the manifest's [`Normalisation`](crate::preprocess::Normalisation), cuts it into axial slices
//! (`dims[1]` rows × `dims[0]` columns), zero-pads each slice centred to the manifest's size
//! multiple (any in-plane size works), runs them through the network in batches of
//! [`SegmenterOptions::batch_slices`], crops back, and
//! writes each voxel's most probable class as that class's label value. The label volume has the
//! input's geometry, dims and affine unchanged.
//!
//! ONNX Runtime is loaded at run time, once per process, from the first of:
//! 1. the path in [`SegmenterOptions::ort_library`];
//! 2. the `ORT_DYLIB_PATH` environment variable (set for cargo runs by `.cargo/config.toml`);
//! 3. [`ORT_LIBRARY_NAME`] next to the running executable (how the appliance image installs it);
//! 4. `.ort/` + [`ORT_LIBRARY_NAME`] under the current directory (what `scripts/setup-ort.sh`
//!    makes in a checkout).
//!
//! A missing library is reported as [`SegmentError::OrtLibraryMissing`], whose message says to run
//! `scripts/setup-ort.sh`; ONNX Runtime is never asked to load a file that is not there (it would
//! panic).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use crate::bundle::{Bundle, BundleError, Manifest};
use crate::volume::{Geometry, Volume};

/// The ONNX Runtime library file Cosilo is built and tested against (ONNX Runtime 1.31.1).
pub const ORT_LIBRARY_NAME: &str = "libonnxruntime.so.1.31.1";

/// Errors opening a segmenter or segmenting a volume.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error(
        "ONNX Runtime is not installed: no library at {}. Run `scripts/setup-ort.sh` in the Cosilo \
         repository (it puts {ORT_LIBRARY_NAME} in .ort/), or set ORT_DYLIB_PATH to the library file",
        display_paths(.tried)
    )]
    OrtLibraryMissing { tried: Vec<PathBuf> },
    #[error("cannot load ONNX Runtime from {path} (run `scripts/setup-ort.sh` to install version 1.31.1): {source}")]
    OrtLibraryLoad {
        path: PathBuf,
        #[source]
        source: ort::LoadDynamicError,
    },
    #[error("cannot create the ONNX Runtime environment: {0}")]
    OrtEnvironment(#[source] ort::Error),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("ONNX Runtime cannot load the model of bundle {path}: {source}")]
    Session {
        path: PathBuf,
        #[source]
        source: ort::Error,
    },
    #[error("bundle {path} cannot be used by this SDK: {reason}")]
    UnsupportedBundle { path: PathBuf, reason: String },
    #[error("cannot segment an empty volume (dims {dims:?})")]
    EmptyVolume { dims: [usize; 3] },
    #[error("inference failed on slices {first}..={last}: {source}")]
    Inference {
        first: usize,
        last: usize,
        #[source]
        source: ort::Error,
    },
    #[error("the model gave no output named {name:?}")]
    MissingOutput { name: String },
    #[error("the model's output has shape {found:?}; expected {expected:?}")]
    OutputShape { expected: Vec<i64>, found: Vec<i64> },
    #[error("input of {got} values does not fill the batch shape {shape:?}")]
    InputShape { shape: [usize; 4], got: usize },
    #[error("the truth volume's grid {truth:?} differs from the segmentation's {segmentation:?}")]
    GeometryMismatch {
        segmentation: Box<Geometry>,
        truth: Box<Geometry>,
    },
    #[error("the inference session is unusable after an earlier inference panicked")]
    Poisoned,
    #[error(transparent)]
    Dicom(#[from] crate::dicom::DicomError),
}

fn display_paths(paths: &[PathBuf]) -> String {
    let v: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    v.join(" or ")
}

/// The loaded runtime: its library path, and the environment ort needs kept alive.
struct Runtime {
    library: PathBuf,
    environment: ort::environment::Environment,
}

static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

/// Where ONNX Runtime would be looked for, in order (see the module docs).
pub fn ort_library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut v = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        v.push(dir.join(ORT_LIBRARY_NAME));
    }
    v.push(Path::new(".ort").join(ORT_LIBRARY_NAME));
    v
}

/// Loads ONNX Runtime once per process and returns the library it was loaded from. Later calls
/// return the loaded library (ONNX Runtime cannot be swapped within a process), but still fail if
/// the library they ask for does not exist.
pub fn init_onnx_runtime(explicit: Option<&Path>) -> Result<PathBuf, SegmentError> {
    runtime(explicit).map(|(library, _)| library)
}

/// The process's ONNX Runtime environment, created on first use.
pub(crate) fn runtime(
    explicit: Option<&Path>,
) -> Result<(PathBuf, ort::environment::Environment), SegmentError> {
    let tried = ort_library_candidates(explicit);
    let found = tried.iter().find(|p| p.is_file()).cloned();
    let Some(found) = found else {
        return Err(SegmentError::OrtLibraryMissing { tried });
    };
    let mut runtime = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = runtime.as_ref() {
        return Ok((rt.library.clone(), rt.environment.clone()));
    }
    // ort resolves relative paths against the executable's directory first; be explicit.
    let library = std::path::absolute(&found).unwrap_or(found);
    let builder = ort::init_from(&library).map_err(|source| SegmentError::OrtLibraryLoad {
        path: library.clone(),
        source,
    })?;
    let environment = builder
        .with_name("cosilo")
        .build()
        .map_err(SegmentError::OrtEnvironment)?;
    *runtime = Some(Runtime {
        library: library.clone(),
        environment: environment.clone(),
    });
    Ok((library, environment))
}

/// How a [`Segmenter`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmenterOptions {
    /// The ONNX Runtime library; `None` searches as the module docs say.
    pub ort_library: Option<PathBuf>,
    /// ONNX Runtime intra-op threads; `None` lets ONNX Runtime choose (one per physical core).
    pub intra_threads: Option<usize>,
    /// Slices per inference call. On CPU one slice per call is fastest, because a slice's
    /// activations stay in cache: with 2 threads, 256² slices took ~41 ms each one at a time and
    /// ~52 ms each 16 at a time (`bench/sdk_inference.sh`). Larger batches suit GPU providers.
    pub batch_slices: usize,
}

impl Default for SegmenterOptions {
    fn default() -> Self {
        SegmenterOptions {
            ort_library: None,
            intra_threads: None,
            batch_slices: 1,
        }
    }
}

/// Voxel count and volume of one class in a segmentation.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassVolume {
    pub name: String,
    /// The label value the class is written as.
    pub label: u8,
    pub voxels: usize,
    /// Millilitres: voxels × voxel volume (from the affine) / 1000.
    pub ml: f64,
}

/// The result of segmenting a volume.
#[derive(Debug, Clone, PartialEq)]
pub struct Segmentation {
    /// One label value per voxel, on exactly the input's geometry.
    pub labels: Volume<u8>,
    /// Per class, in manifest order (background first).
    pub classes: Vec<ClassVolume>,
    /// Per class probability maps on the input's geometry, when asked for
    /// ([`Segmenter::segment_with_probabilities`]).
    pub probabilities: Option<Vec<Volume<f32>>>,
}

/// A bundle's model loaded into ONNX Runtime, ready to segment volumes. `Send + Sync`: calls from
/// several threads take turns on one session.
pub struct Segmenter {
    manifest: Manifest,
    dir: PathBuf,
    session: Mutex<Session>,
    batch_slices: usize,
}

impl std::fmt::Debug for Segmenter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segmenter")
            .field("bundle", &self.dir)
            .field("model", &self.manifest.model_name)
            .field("batch_slices", &self.batch_slices)
            .finish()
    }
}

impl Segmenter {
    /// Opens the bundle in `bundle_dir` with default options.
    pub fn open(bundle_dir: impl AsRef<Path>) -> Result<Self, SegmentError> {
        Self::open_with(bundle_dir, &SegmenterOptions::default())
    }

    /// Opens the bundle in `bundle_dir`: checks its manifest and model checksum, loads ONNX Runtime
    /// if this process has not yet, and creates the inference session.
    pub fn open_with(
        bundle_dir: impl AsRef<Path>,
        options: &SegmenterOptions,
    ) -> Result<Self, SegmentError> {
        let (_, environment) = runtime(options.ort_library.as_deref())?;
        let bundle = Bundle::open(bundle_dir)?;
        let dir = bundle.dir.clone();
        if bundle.manifest.input.channels != 1 {
            return Err(SegmentError::UnsupportedBundle {
                path: dir,
                reason: format!(
                    "the model takes {} input channels; this SDK segments single-channel volumes",
                    bundle.manifest.input.channels
                ),
            });
        }
        let session_err = |source: ort::Error| SegmentError::Session {
            path: dir.clone(),
            source,
        };
        let mut builder = Session::builder(&environment)
            .map_err(session_err)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| session_err(e.into()))?
            .with_inter_threads(1)
            .map_err(|e| session_err(e.into()))?;
        if let Some(n) = options.intra_threads {
            builder = builder
                .with_intra_threads(n)
                .map_err(|e| session_err(e.into()))?;
        }
        let session = builder
            .commit_from_memory(&bundle.model)
            .map_err(session_err)?;
        Ok(Segmenter {
            manifest: bundle.manifest,
            dir,
            session: Mutex::new(session),
            batch_slices: options.batch_slices.max(1),
        })
    }

    /// The bundle's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Segments a volume: labels on the input's geometry and the volume of each class.
    pub fn segment(&self, volume: &Volume<f32>) -> Result<Segmentation, SegmentError> {
        self.segment_volume(volume, false)
    }

    /// As [`segment`](Self::segment), and also keeps each class's probability map.
    pub fn segment_with_probabilities(
        &self,
        volume: &Volume<f32>,
    ) -> Result<Segmentation, SegmentError> {
        self.segment_volume(volume, true)
    }

    /// Reads the DICOM image series in `dir` ([`crate::dicom::read_series_dir`]) and segments it:
    /// labels on the series' own grid, and the series (UIDs, instances, geometry) to write a SEG
    /// against with [`crate::dicom::write_seg`] and [`crate::dicom::seg::segments_for_classes`].
    pub fn segment_dicom_series(
        &self,
        dir: impl AsRef<Path>,
    ) -> Result<(Segmentation, crate::dicom::SeriesVolume), SegmentError> {
        let series = crate::dicom::read_series_dir(dir)?;
        let segmentation = self.segment(&series.volume)?;
        Ok((segmentation, series))
    }

    /// Runs the network on a batch of prepared slices, `shape = [n, channels, h, w]` with `h` and
    /// `w` multiples of the manifest's `size_multiple`, and returns the class probabilities
    /// `[n, classes, h, w]` row-major. [`segment`](Self::segment) does the preparation for you.
    pub fn run_slices(&self, input: &[f32], shape: [usize; 4]) -> Result<Vec<f32>, SegmentError> {
        let mut out = Vec::new();
        self.run_batch(input, shape, 0, |probs| out.extend_from_slice(probs))?;
        Ok(out)
    }

    /// Runs one batch and hands the output to `f` without copying it.
    fn run_batch(
        &self,
        input: &[f32],
        shape: [usize; 4],
        first_slice: usize,
        f: impl FnOnce(&[f32]),
    ) -> Result<(), SegmentError> {
        if shape.iter().product::<usize>() != input.len() {
            return Err(SegmentError::InputShape {
                shape,
                got: input.len(),
            });
        }
        let infer = |source| SegmentError::Inference {
            first: first_slice,
            last: first_slice + shape[0].saturating_sub(1),
            source,
        };
        let tensor = TensorRef::from_array_view((shape, input)).map_err(infer)?;
        let mut session = self.session.lock().map_err(|_| SegmentError::Poisoned)?;
        let outputs = session
            .run(ort::inputs![self.manifest.input.name.as_str() => tensor])
            .map_err(infer)?;
        let name = &self.manifest.output.name;
        let value = outputs
            .get(name)
            .ok_or_else(|| SegmentError::MissingOutput { name: name.clone() })?;
        let (out_shape, probs) = value.try_extract_tensor::<f32>().map_err(infer)?;
        let expected =
            [shape[0], self.manifest.classes.len(), shape[2], shape[3]].map(|d| d as i64);
        if **out_shape != expected {
            return Err(SegmentError::OutputShape {
                expected: expected.to_vec(),
                found: out_shape.to_vec(),
            });
        }
        f(probs);
        Ok(())
    }

    fn segment_volume(
        &self,
        volume: &Volume<f32>,
        keep_probabilities: bool,
    ) -> Result<Segmentation, SegmentError> {
        let geometry = &volume.geometry;
        let [nx, ny, nz] = geometry.dims;
        if geometry.is_empty() || volume.data.len() != geometry.len() {
            return Err(SegmentError::EmptyVolume {
                dims: geometry.dims,
            });
        }
        let classes = self.manifest.classes.len();
        let labels_of: Vec<u8> = self.manifest.classes.iter().map(|c| c.label).collect();
        let image = self.manifest.normalisation.apply(&volume.data);
        let m = self.manifest.input.size_multiple;
        let (h, w) = (ny.div_ceil(m) * m, nx.div_ceil(m) * m);
        let (py, px) = ((h - ny) / 2, (w - nx) / 2);
        let plane = h * w;
        let slice_len = nx * ny;

        let mut labels = vec![0u8; geometry.len()];
        let mut counts = vec![0usize; classes];
        let mut probabilities =
            keep_probabilities.then(|| vec![vec![0f32; geometry.len()]; classes]);
        let mut input = vec![0f32; self.batch_slices.min(nz) * plane];
        let mut best = vec![0f32; nx];
        let mut k0 = 0;
        while k0 < nz {
            let n = self.batch_slices.min(nz - k0);
            let batch = &mut input[..n * plane];
            batch.fill(0.0);
            for s in 0..n {
                let src = &image[(k0 + s) * slice_len..(k0 + s + 1) * slice_len];
                for y in 0..ny {
                    let dst = s * plane + (y + py) * w + px;
                    batch[dst..dst + nx].copy_from_slice(&src[y * nx..(y + 1) * nx]);
                }
            }
            self.run_batch(batch, [n, 1, h, w], k0, |probs| {
                for s in 0..n {
                    let k = k0 + s;
                    for y in 0..ny {
                        let row = |c: usize| {
                            let o = (s * classes + c) * plane + (y + py) * w + px;
                            &probs[o..o + nx]
                        };
                        let out = &mut labels[k * slice_len + y * nx..k * slice_len + (y + 1) * nx];
                        // Most probable class; the first wins a tie, as candle's argmax does.
                        best.copy_from_slice(row(0));
                        out.fill(0);
                        for c in 1..classes {
                            for ((b, o), &p) in best.iter_mut().zip(out.iter_mut()).zip(row(c)) {
                                if p > *b {
                                    *b = p;
                                    *o = c as u8;
                                }
                            }
                        }
                        if let Some(maps) = probabilities.as_mut() {
                            for (c, map) in maps.iter_mut().enumerate() {
                                map[k * slice_len + y * nx..k * slice_len + (y + 1) * nx]
                                    .copy_from_slice(row(c));
                            }
                        }
                    }
                }
            })?;
            k0 += n;
        }
        for l in labels.iter_mut() {
            counts[*l as usize] += 1;
            *l = labels_of[*l as usize];
        }
        let voxel_ml = geometry.voxel_volume() / 1000.0;
        Ok(Segmentation {
            labels: Volume {
                geometry: geometry.clone(),
                data: labels,
            },
            classes: self
                .manifest
                .classes
                .iter()
                .zip(&counts)
                .map(|(c, &voxels)| ClassVolume {
                    name: c.name.clone(),
                    label: c.label,
                    voxels,
                    ml: voxels as f64 * voxel_ml,
                })
                .collect(),
            probabilities: probabilities.map(|maps| {
                maps.into_iter()
                    .map(|data| Volume {
                        geometry: geometry.clone(),
                        data,
                    })
                    .collect()
            }),
        })
    }

    /// 3-D Dice per class (manifest order) of a segmentation against an annotation. The annotation
    /// may use the class label values or the finer training labels (see
    /// [`ClassSpec::training_labels`](crate::bundle::ClassSpec)); `None` where a class is in
    /// neither volume.
    pub fn dice(
        &self,
        segmentation: &Segmentation,
        truth: &Volume<u8>,
    ) -> Result<Vec<Option<f64>>, SegmentError> {
        dice_per_class(&self.manifest, segmentation, truth)
    }
}

/// See [`Segmenter::dice`].
pub fn dice_per_class(
    manifest: &Manifest,
    segmentation: &Segmentation,
    truth: &Volume<u8>,
) -> Result<Vec<Option<f64>>, SegmentError> {
    let seg = &segmentation.labels;
    if !seg.geometry.same_grid(&truth.geometry, 1e-3) || seg.data.len() != truth.data.len() {
        return Err(SegmentError::GeometryMismatch {
            segmentation: Box::new(seg.geometry.clone()),
            truth: Box::new(truth.geometry.clone()),
        });
    }
    let classes = manifest.classes.len();
    let pred_class = manifest.class_of_label();
    let mut truth_class = pred_class;
    for (c, class) in manifest.classes.iter().enumerate() {
        for &v in &class.training_labels {
            truth_class[v as usize] = c as u8;
        }
    }
    let (mut inter, mut p, mut t) = (
        vec![0u64; classes],
        vec![0u64; classes],
        vec![0u64; classes],
    );
    for (&a, &b) in seg.data.iter().zip(&truth.data) {
        let (a, b) = (
            pred_class[a as usize] as usize,
            truth_class[b as usize] as usize,
        );
        p[a] += 1;
        t[b] += 1;
        if a == b {
            inter[a] += 1;
        }
    }
    Ok((0..classes)
        .map(|c| (p[c] + t[c] > 0).then(|| 2.0 * inter[c] as f64 / (p[c] + t[c]) as f64))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{classes_from_label_map, InputSpec, Metrics, OutputSpec, Provenance};

    #[test]
    fn missing_library_is_a_clear_error() {
        let p = Path::new("/nonexistent/cosilo/libonnxruntime.so.1.31.1");
        let err = init_onnx_runtime(Some(p)).unwrap_err();
        assert!(matches!(err, SegmentError::OrtLibraryMissing { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("scripts/setup-ort.sh") && msg.contains(&p.display().to_string()),
            "{msg}"
        );
        let err = Segmenter::open_with(
            "/nonexistent-bundle",
            &SegmenterOptions {
                ort_library: Some(p.into()),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(err, SegmentError::OrtLibraryMissing { .. }),
            "{err}"
        );
    }

    #[test]
    fn segmenter_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Segmenter>();
    }

    #[test]
    fn candidates_prefer_the_explicit_path() {
        assert_eq!(
            ort_library_candidates(Some(Path::new("/x/lib.so"))),
            [PathBuf::from("/x/lib.so")]
        );
    }

    #[test]
    fn dice_maps_training_labels_to_classes() {
        let names: Vec<String> = ["bg", "a", "tumour"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let manifest = Manifest {
            format_version: crate::bundle::FORMAT_VERSION,
            model_name: "m".into(),
            model_sha256: String::new(),
            input: InputSpec::axial_slices(1, 4),
            output: OutputSpec::default(),
            classes: classes_from_label_map(&names, &[0, 1, 2, 2]),
            normalisation: Default::default(),
            provenance: Provenance {
                training_run: "r".into(),
                sites: vec![],
                cases: 0,
                created: String::new(),
                cosilo_version: String::new(),
            },
            metrics: Metrics {
                dice: vec![],
                cases: 0,
            },
        };
        let g = Geometry::axis_aligned([4, 1, 1], [1.0; 3], [0.0; 3]);
        let seg = Segmentation {
            labels: Volume::new(g.clone(), vec![0, 1, 2, 2]).unwrap(),
            classes: vec![],
            probabilities: None,
        };
        // Training label 3 is the tumour class too.
        let truth = Volume::new(g.clone(), vec![0, 1, 3, 0]).unwrap();
        let d = dice_per_class(&manifest, &seg, &truth).unwrap();
        assert_eq!(
            d,
            vec![Some(2.0 * 1.0 / 3.0), Some(1.0), Some(2.0 * 1.0 / 3.0)]
        );
        let other = Volume::new(
            Geometry::axis_aligned([2, 2, 1], [1.0; 3], [0.0; 3]),
            vec![0; 4],
        )
        .unwrap();
        assert!(matches!(
            dice_per_class(&manifest, &seg, &other),
            Err(SegmentError::GeometryMismatch { .. })
        ));
    }
}
