//! Deterministic multi-hospital cohorts for federated experiments: **real anatomy, simulated lesions
//! and scanner effects**.
//!
//! Each hospital starts from a different real subject ([`anatomy`]), prepared once onto a coarse
//! grid cropped to the brain. Every patient is a random smooth deformation of that anatomy with a
//! random synthetic tumour ([`patient`]), seen through the hospital's scanner ([`scanner`]). The
//! output folder holds `manifest.json` ([`manifest`]), `<hospital>/<case_id>_image.nii.gz`
//! (float32), `<hospital>/<case_id>_label.nii.gz` (uint8, [`labels`]) and `<hospital>/montage.png`
//! ([`montage`]). A seed reproduces every file byte for byte: patient `n` of a hospital and split
//! draws from its own stream `Rng::derive(seed, stream)`, whichever thread builds it.
//!
//! Module map:
//! - [`grid`]: affine maths, resampling through world coordinates, crop, blur, morphology.
//! - [`anatomy`]: the three real subjects and their tissue labels.
//! - [`patient`]: deformation, tumour and mass effect.
//! - [`scanner`]: contrast curve, bias field, blur, Rician noise, normalisation.
//! - [`identity`]: fake patient names and IDs (manifest only).
//! - [`montage`]: per-hospital PNG montages.
//! - [`manifest`]: the manifest's types.

pub mod anatomy;
pub mod grid;
pub mod identity;
pub mod labels;
pub mod manifest;
pub mod montage;
pub mod patient;
pub mod scanner;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use cosilo_sdk::volume::{write_nifti_f32, write_nifti_labels, Volume, VolumeError};

pub use anatomy::{Subject, SubjectKind};
pub use manifest::{CaseRecord, GridRecord, HospitalRecord, Manifest, Split, MANIFEST_FILE};
pub use scanner::{Normalisation, ScanDraw, ScannerProfile};

use crate::fetch::{AnatomyFiles, FetchError};
use crate::plot::{PngError, RgbImage};
use cosilo_rng::Rng;

/// Bumped whenever the same seed would produce different bytes.
pub const GENERATOR_VERSION: u32 = 1;
/// Identifies the generator in manifests.
pub const GENERATOR: &str = "cosilo cohort generator";

/// The plain statement written into every manifest.
pub const NOTE: &str = "The anatomy is real: each hospital starts from a real brain MRI \
    (Colin27, MNI152 2009a, the ITK example subject). The patients are simulated from it: random \
    deformations of that anatomy, synthetic tumours (oedema, enhancing rim, necrotic core) and \
    simulated scanner effects (contrast curve, bias field, blur, noise, intensity range). Patient \
    names and IDs are fake. No real patient's tumour or scan is in this cohort.";

/// A hospital of the cohort: its real subject, grid and scanner.
#[derive(Debug, Clone, Copy)]
pub struct Hospital {
    pub id: &'static str,
    pub subject: SubjectKind,
    /// Grid spacing along R, A, S in mm; `None` keeps the source's own spacing.
    pub spacing: Option<[f64; 3]>,
    pub scanner: ScannerProfile,
}

/// The three hospitals, each a different real subject and a different scanner.
pub const HOSPITALS: [Hospital; 3] = [
    Hospital {
        id: "h1",
        subject: SubjectKind::Colin27,
        spacing: Some([2.0, 2.0, 2.0]),
        scanner: ScannerProfile {
            gamma: 0.9,
            bias_amplitude: 0.08,
            blur_sigma_mm: 0.6,
            snr: 28.0,
            normalisation: Normalisation::IntegerRange {
                max: 255.0,
                reference: 190.0,
            },
        },
    },
    Hospital {
        id: "h2",
        subject: SubjectKind::Mni152,
        spacing: Some([2.0, 2.0, 2.0]),
        scanner: ScannerProfile {
            gamma: 1.2,
            bias_amplitude: 0.15,
            blur_sigma_mm: 1.0,
            snr: 20.0,
            normalisation: Normalisation::IntegerRange {
                max: 4095.0,
                reference: 3000.0,
            },
        },
    },
    Hospital {
        id: "h3",
        subject: SubjectKind::ItkT1,
        spacing: None,
        scanner: ScannerProfile {
            gamma: 1.05,
            bias_amplitude: 0.12,
            blur_sigma_mm: 0.8,
            snr: 16.0,
            normalisation: Normalisation::ZScore,
        },
    },
];

/// Failures building or reading a cohort.
#[derive(Debug, thiserror::Error)]
pub enum CohortError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("cannot read {path}: {source}")]
    ReadVolume {
        path: String,
        #[source]
        source: VolumeError,
    },
    #[error("cannot write {path}: {source}")]
    WriteVolume {
        path: String,
        #[source]
        source: VolumeError,
    },
    #[error("subject {subject}: {detail}")]
    Anatomy {
        subject: &'static str,
        detail: String,
    },
    #[error("invalid cohort sizes {given:?}: {reason}")]
    Sizes { given: String, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Png(#[from] PngError),
    #[error("cannot parse or write manifest {path}: {source}")]
    Manifest {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: manifest format {found}, this build reads format {expected}")]
    ManifestVersion {
        path: String,
        found: u32,
        expected: u32,
    },
    #[error("a cohort worker thread panicked")]
    WorkerPanicked,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CohortError + 'a {
    move |source| CohortError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// What to build: the seed, training patients per hospital, and validation and test patients per
/// hospital.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CohortSpec {
    pub seed: u64,
    /// Training patients of each hospital, in [`HOSPITALS`] order.
    pub train: [usize; 3],
    /// Held-out validation patients per hospital: what early stopping and model choice read.
    pub validation: usize,
    /// Held-out test patients per hospital: read once per run, for the final score.
    pub test: usize,
}

impl CohortSpec {
    /// A spec from the command line's `--sizes "40,15,5"` form.
    pub fn new(seed: u64, sizes: &str, test: usize) -> Result<CohortSpec, CohortError> {
        let bad = |reason: &str| CohortError::Sizes {
            given: sizes.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = sizes.split(',').map(str::trim).collect();
        if parts.len() != HOSPITALS.len() {
            return Err(bad(
                "give one training-set size per hospital, e.g. \"40,15,5\"",
            ));
        }
        let mut train = [0usize; 3];
        for (t, p) in train.iter_mut().zip(&parts) {
            *t = p
                .parse()
                .map_err(|_| bad("sizes are non-negative whole numbers"))?;
        }
        if train.iter().sum::<usize>() + test == 0 {
            return Err(bad("the cohort would be empty"));
        }
        if train.iter().any(|&n| n > 9999) || test > 9999 {
            return Err(bad("at most 9999 patients per hospital and split"));
        }
        Ok(CohortSpec {
            seed,
            train,
            validation: 0,
            test,
        })
    }

    /// The same cohort with `n` validation patients per hospital. Validation patients draw from
    /// streams of their own and take the identities after the test patients', so adding them
    /// leaves every training and test case byte for byte as it was.
    pub fn with_validation(mut self, n: usize) -> Result<CohortSpec, CohortError> {
        if n > 9999 {
            return Err(CohortError::Sizes {
                given: n.to_string(),
                reason: "at most 9999 patients per hospital and split".into(),
            });
        }
        self.validation = n;
        Ok(self)
    }
}

/// Finds the fetched anatomy in `cache`, prepares every hospital's subject and builds the cohort
/// into `out`, with a progress bar on the terminal.
pub fn build_cohort(cache: &Path, out: &Path, spec: &CohortSpec) -> Result<Manifest, CohortError> {
    let files = AnatomyFiles::locate(cache)?;
    let subjects = load_subjects(&files)?;
    build_from_subjects(&subjects, out, spec, true)
}

/// Prepares the subject of every hospital (in [`HOSPITALS`] order), in parallel.
pub fn load_subjects(files: &AnatomyFiles) -> Result<Vec<Subject>, CohortError> {
    let start = Instant::now();
    let results: Vec<Result<Subject, CohortError>> = std::thread::scope(|s| {
        let handles: Vec<_> = HOSPITALS
            .iter()
            .map(|h| s.spawn(move || Subject::load(h.subject, files, h.spacing)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(CohortError::WorkerPanicked)))
            .collect()
    });
    let subjects = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    for (h, s) in HOSPITALS.iter().zip(&subjects) {
        tracing::info!(
            hospital = h.id,
            subject = s.kind.name(),
            grid = ?s.labels.geometry.dims,
            spacing = ?s.labels.geometry.spacing(),
            "subject prepared"
        );
    }
    tracing::info!(seconds = start.elapsed().as_secs_f64(), "anatomy ready");
    Ok(subjects)
}

/// One patient to simulate.
struct Job {
    hospital: usize,
    split: Split,
    index: usize,
    identity: identity::Identity,
    /// Position among its hospital's cases (montage order).
    order: usize,
}

impl Job {
    fn case_id(&self) -> String {
        format!(
            "{}-{}-{:03}",
            HOSPITALS[self.hospital].id,
            self.split.as_str(),
            self.index
        )
    }

    /// The patient's random stream: hospital, split and index, so a patient does not change when
    /// other hospitals' sizes do.
    fn stream(&self) -> u64 {
        let split = match self.split {
            Split::Train => 0u64,
            Split::Test => 1,
            Split::Unlabelled => 2,
            Split::Validation => 3,
        };
        ((self.hospital as u64 + 1) << 40) | (split << 32) | self.index as u64
    }
}

/// The fake identities of a hospital come from a stream of their own.
fn identity_stream(hospital: usize) -> u64 {
    0x1D00_0000_0000_0000 | hospital as u64
}

fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Builds the cohort from prepared subjects (one per hospital, in [`HOSPITALS`] order).
pub fn build_from_subjects(
    subjects: &[Subject],
    out: &Path,
    spec: &CohortSpec,
    progress: bool,
) -> Result<Manifest, CohortError> {
    assert_eq!(subjects.len(), HOSPITALS.len(), "one subject per hospital");
    let start = Instant::now();
    std::fs::create_dir_all(out).map_err(io_err("cannot create", out))?;
    // A stale manifest must not describe a half-rewritten folder.
    let manifest_path = out.join(MANIFEST_FILE);
    if manifest_path.exists() {
        std::fs::remove_file(&manifest_path).map_err(io_err("cannot remove", &manifest_path))?;
    }
    let jobs = plan_jobs(out, spec)?;
    let built = build_cases(&jobs, subjects, out, spec.seed, progress)?;

    let mut cases = Vec::with_capacity(jobs.len());
    let mut tiles: Vec<Vec<RgbImage>> = vec![Vec::new(); HOSPITALS.len()];
    for (job, (record, tile)) in jobs.iter().zip(built) {
        if let Some(t) = tile {
            tiles[job.hospital].push(t);
        }
        cases.push(record);
    }
    let manifest = Manifest {
        format_version: manifest::FORMAT_VERSION,
        generator: GENERATOR.into(),
        generator_version: GENERATOR_VERSION,
        seed: spec.seed,
        note: NOTE.into(),
        labels: labels::NAMES.iter().map(|s| s.to_string()).collect(),
        hospitals: hospital_records(subjects, spec, out, &tiles)?,
        cases,
    };
    write_manifest(&manifest, out, &manifest_path)?;
    tracing::info!(
        cases = manifest.cases.len(),
        seconds = start.elapsed().as_secs_f64(),
        out = %out.display(),
        "cohort written"
    );
    Ok(manifest)
}

/// Every patient of the cohort, hospital by hospital (training, then held out), each with its
/// fake identity; creates each hospital's folder.
fn plan_jobs(out: &Path, spec: &CohortSpec) -> Result<Vec<Job>, CohortError> {
    let mut jobs = Vec::new();
    for (h, hospital) in HOSPITALS.iter().enumerate() {
        let dir = out.join(hospital.id);
        std::fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let n = spec.train[h] + spec.test + spec.validation;
        let prefix = hospital.id.to_uppercase();
        let ids = identity::identities(&mut Rng::derive(spec.seed, identity_stream(h)), &prefix, n);
        let mut ids = ids.into_iter();
        let mut order = 0;
        // Validation last, so that its identities come after (and leave) the others'.
        let splits = [
            (Split::Train, spec.train[h]),
            (Split::Test, spec.test),
            (Split::Validation, spec.validation),
        ];
        for (split, count) in splits {
            for index in 0..count {
                let identity = ids.next().expect("one identity per case");
                jobs.push(Job {
                    hospital: h,
                    split,
                    index,
                    identity,
                    order,
                });
                order += 1;
            }
        }
    }
    Ok(jobs)
}

/// A progress bar over `len` patients (hidden without `progress`).
fn progress_bar(progress: bool, len: usize) -> indicatif::ProgressBar {
    let bar = if progress {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:32}] {pos}/{len} patients, {elapsed} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix("cohort");
    bar
}

/// Builds every job's case on all cores (stopping at the first error); results in job order.
fn build_cases(
    jobs: &[Job],
    subjects: &[Subject],
    out: &Path,
    seed: u64,
    progress: bool,
) -> Result<Vec<BuiltCase>, CohortError> {
    let bar = progress_bar(progress, jobs.len());
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results: Mutex<Vec<Option<BuiltCase>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let first_error: Mutex<Option<CohortError>> = Mutex::new(None);
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, jobs.len().max(1));
    let panicked = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| loop {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(n) else { break };
                    match build_case(job, &subjects[job.hospital], out, seed) {
                        Ok(r) => {
                            bar.set_message(r.0.case_id.clone());
                            bar.inc(1);
                            if let Ok(mut v) = results.lock() {
                                v[n] = Some(r);
                            }
                        }
                        Err(e) => {
                            failed.store(true, Ordering::Relaxed);
                            if let Ok(mut slot) = first_error.lock() {
                                slot.get_or_insert(e);
                            }
                        }
                    }
                })
            })
            .collect();
        handles.into_iter().any(|h| h.join().is_err())
    });
    if panicked {
        return Err(CohortError::WorkerPanicked);
    }
    if let Some(e) = first_error.into_inner().ok().flatten() {
        bar.abandon();
        return Err(e);
    }
    bar.finish();
    results
        .into_inner()
        .map_err(|_| CohortError::WorkerPanicked)?
        .into_iter()
        .map(|r| r.ok_or(CohortError::WorkerPanicked))
        .collect()
}

/// Each hospital's record (source subject, grid, scanner, case counts); writes its montage of
/// the first few cases' `tiles`.
fn hospital_records(
    subjects: &[Subject],
    spec: &CohortSpec,
    out: &Path,
    tiles: &[Vec<RgbImage>],
) -> Result<Vec<HospitalRecord>, CohortError> {
    let mut hospitals = Vec::new();
    for (h, hospital) in HOSPITALS.iter().enumerate() {
        let g = &subjects[h].labels.geometry;
        if !tiles[h].is_empty() {
            let path = out.join(hospital.id).join("montage.png");
            montage::assemble(&tiles[h]).write_png(&path)?;
        }
        hospitals.push(HospitalRecord {
            id: hospital.id.into(),
            source_subject: hospital.subject.name().into(),
            source_description: hospital.subject.description().into(),
            source_files: hospital
                .subject
                .files()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            grid: GridRecord {
                dims: g.dims,
                spacing_mm: g.spacing().map(|v| round_to(v, 6)),
                affine: g.affine,
            },
            scanner: hospital.scanner,
            train_cases: spec.train[h],
            validation_cases: spec.validation,
            test_cases: spec.test,
        });
    }
    Ok(hospitals)
}

/// Writes the manifest to `path` atomically (a temporary file in `out`, then a rename).
fn write_manifest(manifest: &Manifest, out: &Path, path: &Path) -> Result<(), CohortError> {
    let mut text =
        serde_json::to_string_pretty(manifest).map_err(|source| CohortError::Manifest {
            path: path.display().to_string(),
            source,
        })?;
    text.push('\n');
    let tmp = out.join(".manifest.json.tmp");
    std::fs::write(&tmp, text).map_err(io_err("cannot write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot rename into place", path))
}

/// A written case's record and, for the first few of a hospital, its montage tile.
type BuiltCase = (CaseRecord, Option<RgbImage>);

/// Simulates, writes and describes one patient; renders its montage tile when it is shown.
fn build_case(
    job: &Job,
    subject: &Subject,
    out: &Path,
    seed: u64,
) -> Result<BuiltCase, CohortError> {
    let hospital = &HOSPITALS[job.hospital];
    let mut rng = Rng::derive(seed, job.stream());
    let clean = patient::simulate(subject, &mut rng);
    let (data, scan) = scanner::acquire(&clean, &hospital.scanner, &mut rng);
    let image = Volume {
        geometry: clean.image.geometry.clone(),
        data,
    };
    let case_id = job.case_id();
    let rel = |kind: &str| format!("{}/{case_id}_{kind}.nii.gz", hospital.id);
    let (image_rel, label_rel) = (rel("image"), rel("label"));
    let image_path: PathBuf = out.join(&image_rel);
    let label_path: PathBuf = out.join(&label_rel);
    write_nifti_f32(&image_path, &image).map_err(|source| CohortError::WriteVolume {
        path: image_path.display().to_string(),
        source,
    })?;
    write_nifti_labels(&label_path, &clean.labels).map_err(|source| CohortError::WriteVolume {
        path: label_path.display().to_string(),
        source,
    })?;
    let mut counts = [0u64; labels::NUM_LABELS];
    for &l in &clean.labels.data {
        counts[(l as usize).min(labels::NUM_LABELS - 1)] += 1;
    }
    let tumour_voxels: u64 = counts[labels::OEDEMA as usize..].iter().sum();
    let voxel_ml = clean.labels.geometry.voxel_volume() / 1000.0;
    let tile =
        (job.order < montage::MAX_TILES).then(|| montage::render_tile(&image, &clean.labels));
    let record = CaseRecord {
        case_id,
        hospital: hospital.id.into(),
        split: job.split,
        image: image_rel,
        label: label_rel,
        patient_name: job.identity.name.clone(),
        patient_id: job.identity.id.clone(),
        tumour_volume_ml: round_to(tumour_voxels as f64 * voxel_ml, 3),
        label_voxels: counts,
        scan: ScanDraw {
            gamma: round_to(scan.gamma, 4),
            bias_amplitude: round_to(scan.bias_amplitude, 4),
            snr: round_to(scan.snr, 2),
        },
    };
    Ok((record, tile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::OnceLock;

    use cosilo_sdk::volume::{read_nifti, read_nifti_labels};

    #[test]
    fn sizes_parse_and_refuse_nonsense() {
        let s = CohortSpec::new(7, "40, 15,5", 4).unwrap();
        assert_eq!(s.train, [40, 15, 5]);
        assert!(CohortSpec::new(7, "40,15", 4).is_err());
        assert!(CohortSpec::new(7, "40,x,5", 4).is_err());
        assert!(CohortSpec::new(7, "0,0,0", 0).is_err());
    }

    /// Three splits: adding validation patients leaves the training and test patients (ids,
    /// identities, random streams) as they were, and the validation patients are distinct.
    #[test]
    fn validation_patients_leave_training_and_test_patients_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let plain = CohortSpec::new(7, "3,2,1", 2).unwrap();
        let three = plain.clone().with_validation(2).unwrap();
        assert!(plain.clone().with_validation(10_000).is_err());
        let key = |j: &Job| (j.case_id(), j.identity.id.clone(), j.stream());
        let a: Vec<_> = plan_jobs(dir.path(), &plain)
            .unwrap()
            .iter()
            .map(key)
            .collect();
        let b: Vec<_> = plan_jobs(dir.path(), &three)
            .unwrap()
            .iter()
            .map(key)
            .collect();
        let before: Vec<_> = b
            .iter()
            .filter(|(id, _, _)| !id.contains("-validation-"))
            .cloned()
            .collect();
        assert_eq!(a, before);
        let val: Vec<_> = b
            .iter()
            .filter(|(id, _, _)| id.contains("-validation-"))
            .collect();
        assert_eq!(val.len(), 3 * 2);
        for (id, ident, stream) in &val {
            assert!(a
                .iter()
                .all(|(i, p, s)| i != id && p != ident && s != stream));
        }
    }

    /// The real anatomy, prepared once per test process. Fails (never skips) without the cache.
    fn real_subjects() -> &'static Vec<Subject> {
        static SUBJECTS: OnceLock<Vec<Subject>> = OnceLock::new();
        SUBJECTS.get_or_init(|| {
            let cache = crate::fetch::default_cache_dir();
            let files = AnatomyFiles::locate(&cache).unwrap_or_else(|e| {
                panic!(
                    "this test needs the real anatomy; run `cosilo data fetch` first \
                     (looked in {}, from COSILO_CACHE or the default cache): {e}",
                    cache.display()
                )
            });
            load_subjects(&files).expect("prepare the real subjects")
        })
    }

    fn hashes(dir: &Path) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    let rel = p.strip_prefix(dir).unwrap().display().to_string();
                    out.insert(rel, crate::fetch::sha256_file(&p).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn real_cohort_is_byte_identical_for_a_seed_and_differs_for_another() {
        let subjects = real_subjects();
        let spec = CohortSpec::new(7, "2,1,1", 1).unwrap();
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        build_from_subjects(subjects, a.path(), &spec, false).unwrap();
        build_from_subjects(subjects, b.path(), &spec, false).unwrap();
        let (ha, hb) = (hashes(a.path()), hashes(b.path()));
        // 7 cases × 2 volumes, 3 montages, the manifest.
        assert_eq!(ha.len(), 7 * 2 + 3 + 1, "{:?}", ha.keys());
        assert_eq!(ha, hb);

        let c = tempfile::tempdir().unwrap();
        let other = CohortSpec::new(8, "1,1,1", 0).unwrap();
        build_from_subjects(subjects, c.path(), &other, false).unwrap();
        let hc = hashes(c.path());
        for h in ["h1", "h2", "h3"] {
            let key = format!("{h}/{h}-train-000_image.nii.gz");
            assert_ne!(ha[&key], hc[&key], "{key} should change with the seed");
        }
    }

    #[test]
    fn real_cohort_cases_are_complete_and_on_their_grids() {
        let subjects = real_subjects();
        let dir = tempfile::tempdir().unwrap();
        let spec = CohortSpec::new(3, "1,1,1", 1).unwrap();
        let m = build_from_subjects(subjects, dir.path(), &spec, false).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), m);
        assert!(m.note.contains("anatomy is real"));
        for case in &m.cases {
            let img = read_nifti(case.image_path(dir.path())).unwrap();
            let lab = read_nifti_labels(case.label_path(dir.path())).unwrap();
            assert_eq!(img.geometry, lab.geometry, "{}", case.case_id);
            let h = m.hospitals.iter().find(|h| h.id == case.hospital).unwrap();
            assert_eq!(img.geometry.dims, h.grid.dims);
            assert_eq!(img.geometry.affine, h.grid.affine);
            // Every label, tumour included, is present.
            assert!(
                case.label_voxels.iter().all(|&n| n > 0),
                "{}: {:?}",
                case.case_id,
                case.label_voxels
            );
            let mut counts = [0u64; labels::NUM_LABELS];
            for &l in &lab.data {
                counts[l as usize] += 1;
            }
            assert_eq!(counts, case.label_voxels);
            assert!(case.tumour_volume_ml > 1.0);
            // Brain-extracted.
            assert!(img
                .data
                .iter()
                .zip(&lab.data)
                .all(|(&v, &l)| l != 0 || v == 0.0));
            // In-plane size small enough for cheap training.
            assert!(
                h.grid.dims[0] <= 100 && h.grid.dims[1] <= 116,
                "{:?}",
                h.grid.dims
            );
            // The fake identity appears in the manifest only, never in the volumes.
            for p in [case.image_path(dir.path()), case.label_path(dir.path())] {
                let mut raw = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap()),
                    &mut raw,
                )
                .unwrap();
                for needle in [&case.patient_name, &case.patient_id] {
                    assert!(!raw.windows(needle.len()).any(|w| w == needle.as_bytes()));
                }
            }
        }
        for (h, s) in m.hospitals.iter().zip(subjects) {
            let tile = montage::tile_size(&s.labels);
            let path = dir.path().join(&h.id).join("montage.png");
            let mut reader = png::Decoder::new(std::fs::File::open(&path).unwrap())
                .read_info()
                .unwrap();
            let mut buf = vec![0; reader.output_buffer_size()];
            let info = reader.next_frame(&mut buf).unwrap();
            let want = montage::montage_size(tile, 2);
            assert_eq!(
                (info.width as usize, info.height as usize),
                want,
                "{path:?}"
            );
        }
    }

    /// A prepared subject's voxels sit where the source says the brain is: map each voxel's world
    /// position back into the original 1 mm Colin27 mask and compare.
    #[test]
    fn prepared_grid_keeps_world_positions_of_the_real_anatomy() {
        let subjects = real_subjects();
        let files = AnatomyFiles::locate(&crate::fetch::default_cache_dir()).unwrap();
        let bet = read_nifti(&files.colin_brain).unwrap();
        let s = &subjects[0];
        assert_eq!(s.kind, SubjectKind::Colin27);
        let inv = grid::invert(&bet.geometry.affine).unwrap();
        let g = &s.labels.geometry;
        let (mut agree, mut total) = (0usize, 0usize);
        for k in 0..g.dims[2] {
            for j in 0..g.dims[1] {
                for i in 0..g.dims[0] {
                    let w = g.world([i as f64, j as f64, k as f64]);
                    let src = grid::apply(&inv, w);
                    let inside = grid::nearest_index(bet.geometry.dims, src[0], src[1], src[2])
                        .map(|o| bet.data[o] > 0.0)
                        .unwrap_or(false);
                    let brain = s.labels.get(i, j, k) != 0;
                    agree += (inside == brain) as usize;
                    total += 1;
                }
            }
        }
        let frac = agree as f64 / total as f64;
        assert!(
            frac > 0.97,
            "only {frac:.3} of voxels agree with the source mask"
        );
        // And the brain sits where MNI-space anatomy is: roughly centred on the origin.
        let (lo, hi) = grid::world_box(g);
        assert!(
            lo.iter().all(|&v| v < -50.0) && hi.iter().all(|&v| v > 50.0),
            "{lo:?} {hi:?}"
        );
    }
}
