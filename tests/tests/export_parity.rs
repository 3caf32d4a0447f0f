//! The exported ONNX model computes what the candle network computes, the SDK keeps geometry, and
//! bundle problems are clear errors.
//!
//! Needs ONNX Runtime (`scripts/setup-ort.sh`; `.cargo/config.toml` points `ORT_DYLIB_PATH` at it)
//! and Python's `onnx` package (`python3 -m pip install onnx`; `COSILO_PYTHON` picks the
//! interpreter). Either missing fails the tests with a message saying so: they are never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use cosilo_rng::Rng;
use cosilo_sdk::bundle::{self, BundleError, Metrics, Provenance};
use cosilo_sdk::segment::{SegmentError, Segmenter, SegmenterOptions};
use cosilo_sdk::volume::{read_nifti, read_nifti_labels, write_nifti_f32, write_nifti_labels};
use cosilo_sdk::{Geometry, Volume};
use cosilo_train::data::{LabelledVolume, PreparedVolume};
use cosilo_train::eval;
use cosilo_train::export;
use cosilo_train::unet::{self, UNet, UNetConfig};
use cosilo_train::TrainConfig;

/// Largest allowed |ONNX Runtime − candle| on a probability.
const TOLERANCE: f32 = 1e-4;

fn config(base: usize, depth: usize) -> UNetConfig {
    UNetConfig {
        in_channels: 1,
        classes: 5,
        base,
        depth,
        groups: 4,
    }
}

fn train_config(model: &UNetConfig, label_map: Vec<u8>) -> TrainConfig {
    TrainConfig {
        model: model.clone(),
        class_names: (0..model.classes).map(|c| format!("class{c}")).collect(),
        label_map,
        ..Default::default()
    }
}

struct Exported {
    net: UNet,
    _vars: VarMap,
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    train: TrainConfig,
}

/// A seeded network exported as a bundle in a temporary directory.
fn export_bundle(model: &UNetConfig, seed: u64, label_map: Vec<u8>) -> Result<Exported> {
    let (net, vars) = unet::build(model, &Device::Cpu, seed)?;
    let train = train_config(model, label_map);
    let manifest = export::manifest_for(
        &train,
        "parity",
        Provenance {
            training_run: format!("seed-{seed}"),
            sites: vec!["test".into()],
            cases: 0,
            created: bundle::rfc3339_utc(std::time::SystemTime::now()),
            cosilo_version: env!("CARGO_PKG_VERSION").into(),
        },
        Metrics {
            dice: vec![],
            cases: 0,
        },
    );
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("bundle");
    export::write_bundle(&dir, model, &vars, &manifest)?;
    Ok(Exported {
        net,
        _vars: vars,
        _tmp: tmp,
        dir,
        train,
    })
}

fn open(dir: &Path, batch_slices: usize) -> Result<Segmenter> {
    let options = SegmenterOptions {
        intra_threads: Some(2),
        batch_slices,
        ..Default::default()
    };
    Segmenter::open_with(dir, &options).with_context(|| format!("opening bundle {}", dir.display()))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// An MR-like test volume: smooth blobs and noise, on a 12-bit scale (the normalisation matters).
fn phantom(dims: [usize; 3], seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let [nx, ny, nz] = dims;
    let mut v = Vec::with_capacity(nx * ny * nz);
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let (x, y) = (i as f64 / nx as f64 - 0.5, j as f64 / ny as f64 - 0.5);
                let r2 = x * x + y * y;
                let body = if r2 < 0.2 { 1500.0 } else { 80.0 };
                let lesion = if (x - 0.1).powi(2) + (y + 0.05).powi(2) < 0.01 * (1 + k % 3) as f64 {
                    1200.0
                } else {
                    0.0
                };
                v.push((body + lesion + 150.0 * rng.normal()) as f32);
            }
        }
    }
    v
}

/// (1) ONNX Runtime on the exported model equals candle's probabilities, for two configurations,
/// on inputs whose sides are already multiples.
#[test]
fn onnx_runtime_matches_candle_probabilities() -> Result<()> {
    for (base, depth, h, w, seed) in [(8, 2, 32, 48, 11), (16, 3, 48, 40, 12)] {
        let model = config(base, depth);
        let e = export_bundle(&model, seed, vec![0, 1, 2, 3, 4])?;
        let segmenter = open(&e.dir, 16)?;
        let mut rng = Rng::new(seed + 100);
        // Normalised intensities live in [0, 1]; include a few outliers too.
        let n = 3;
        let x: Vec<f32> = (0..n * h * w)
            .map(|i| {
                if i % 97 == 0 {
                    3.0 * rng.normal() as f32
                } else {
                    rng.uniform() as f32
                }
            })
            .collect();
        let ort = segmenter.run_slices(&x, [n, 1, h, w])?;
        let t = Tensor::from_vec(x, (n, 1, h, w), &Device::Cpu)?;
        let candle: Vec<f32> = e.net.probabilities(&t)?.flatten_all()?.to_vec1()?;
        let d = max_abs_diff(&ort, &candle);
        eprintln!("parity base {base} depth {depth}, {n}×1×{h}×{w}: max |ort − candle| = {d:.3e}");
        assert!(
            d <= TOLERANCE,
            "base {base} depth {depth}: max abs difference {d:e} > {TOLERANCE:e}"
        );
    }
    Ok(())
}

/// (1) The SDK's padding of an odd-sized volume gives candle's probabilities on the same padded
/// slices, cropped back.
#[test]
fn padded_odd_sized_volume_matches_candle() -> Result<()> {
    let model = config(8, 3);
    let e = export_bundle(&model, 21, vec![0, 1, 2, 3, 4])?;
    let segmenter = open(&e.dir, 2)?;
    let dims = [37, 29, 5];
    let g = Geometry::axis_aligned(dims, [1.0, 1.0, 3.0], [0.0; 3]);
    let image = Volume::new(g, phantom(dims, 5))?;
    let seg = segmenter.segment_with_probabilities(&image)?;
    let probs = seg.probabilities.context("probabilities were asked for")?;

    // Candle on the same normalised slices, padded centred to multiples of 8 (40 × 32).
    let norm = e.train.normalisation.apply(&image.data);
    let [nx, ny, nz] = dims;
    let (h, w) = (32, 40);
    let (py, px) = ((h - ny) / 2, (w - nx) / 2);
    let mut x = vec![0f32; nz * h * w];
    for k in 0..nz {
        for j in 0..ny {
            let src = &norm[(k * ny + j) * nx..(k * ny + j + 1) * nx];
            x[k * h * w + (j + py) * w + px..][..nx].copy_from_slice(src);
        }
    }
    let t = Tensor::from_vec(x, (nz, 1, h, w), &Device::Cpu)?;
    let candle: Vec<f32> = e.net.probabilities(&t)?.flatten_all()?.to_vec1()?;
    let mut d = 0f32;
    for (c, map) in probs.iter().enumerate() {
        assert_eq!(map.geometry, image.geometry);
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let cv = candle[((k * model.classes + c) * h + j + py) * w + i + px];
                    d = d.max((map.get(i, j, k) - cv).abs());
                }
            }
        }
    }
    eprintln!("parity padded {nx}×{ny}×{nz} volume, base 8 depth 3: max |ort − candle| = {d:.3e}");
    assert!(d <= TOLERANCE, "max abs difference {d:e} > {TOLERANCE:e}");
    Ok(())
}

use cosilo_tests::python;

/// Runs the reference ONNX checker (with shape inference) on a model file.
fn onnx_check(path: &Path) -> Result<()> {
    let py = python();
    let script = "import sys, onnx; onnx.checker.check_model(sys.argv[1], full_check=True); \
                  m = onnx.load(sys.argv[1]); print(m.ir_version, m.opset_import[0].version)";
    let out = Command::new(&py).args(["-c", script]).arg(path).output().with_context(|| {
        format!("cannot run {py:?}: the ONNX checker test needs Python 3 with `onnx` (python3 -m pip install onnx)")
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'onnx'") {
        bail!("Python's `onnx` package is missing from {py:?}: install it with `{py} -m pip install onnx`");
    }
    if !out.status.success() {
        bail!("onnx.checker rejected {}:\n{stderr}", path.display());
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        "8 17",
        "IR version and opset as read by onnx"
    );
    Ok(())
}

/// (2) Every configuration's export passes `onnx.checker.check_model(full_check=True)`.
#[test]
fn exported_models_pass_the_onnx_checker() -> Result<()> {
    for (base, depth, classes, groups) in [(8, 2, 5, 4), (16, 3, 5, 4), (4, 1, 2, 2), (8, 4, 3, 8)]
    {
        let model = UNetConfig {
            in_channels: 1,
            classes,
            base,
            depth,
            groups,
        };
        let e = export_bundle(&model, 3, (0..classes as u8).collect())?;
        onnx_check(&e.dir.join(bundle::MODEL_FILE)).with_context(|| {
            format!("base {base} depth {depth} classes {classes} groups {groups}")
        })?;
    }
    Ok(())
}

/// (3) Segmenting an oblique, odd-sized NIfTI volume keeps its grid exactly, and the labels are
/// candle's whole-volume prediction (`eval::predict`), mapped to the manifest's label values.
#[test]
fn segmentation_keeps_geometry_and_equals_candle_prediction() -> Result<()> {
    let model = config(8, 2);
    // Classes written as labels other than their index: 1 → 2, 2 → 1, 3 → 4, 4 → 3.
    let e = export_bundle(&model, 31, vec![0, 2, 1, 4, 3])?;
    let manifest = bundle::Manifest::read(&e.dir)?;
    let labels: Vec<u8> = manifest.classes.iter().map(|c| c.label).collect();
    assert_eq!(labels, [0, 2, 1, 4, 3]);

    let dims = [45, 33, 7];
    let geometry = Geometry {
        dims,
        affine: [
            [0.93, 0.12, -0.05, -91.5],
            [-0.11, 0.95, 0.21, 12.25],
            [0.04, -0.2, 2.9, -30.0],
            [0.0, 0.0, 0.0, 1.0],
        ],
    };
    let tmp = tempfile::tempdir()?;
    let input_path = tmp.path().join("in.nii.gz");
    write_nifti_f32(&input_path, &Volume::new(geometry, phantom(dims, 9))?)?;
    let image = read_nifti(&input_path)?;

    let segmenter = open(&e.dir, 3)?; // 7 slices: batches of 3, 3, 1
    let seg = segmenter.segment(&image)?;
    assert_eq!(seg.labels.geometry.dims, image.geometry.dims);
    assert_eq!(
        seg.labels.geometry.affine, image.geometry.affine,
        "affine kept exactly"
    );

    let out_path = tmp.path().join("labels.nii.gz");
    write_nifti_labels(&out_path, &seg.labels)?;
    let back = read_nifti_labels(&out_path)?;
    assert_eq!(
        back.geometry, image.geometry,
        "the written label file has the input's grid"
    );
    assert_eq!(back.data, seg.labels.data);

    let prepared = PreparedVolume::new(
        &LabelledVolume {
            id: "phantom".into(),
            image: image.clone(),
            label: image.map(|_| 0u8),
        },
        &e.train.normalisation,
        &e.train.label_map,
    );
    let classes = eval::predict(&e.net, &prepared, &Device::Cpu, 4)?;
    let expected: Vec<u8> = classes.iter().map(|&c| labels[c as usize]).collect();
    let mismatches = expected
        .iter()
        .zip(&seg.labels.data)
        .filter(|(a, b)| a != b)
        .count();
    let mut histogram = [0usize; 5];
    classes.iter().for_each(|&c| histogram[c as usize] += 1);
    eprintln!("segmentation {dims:?}: class histogram {histogram:?}, {mismatches} voxels differ from candle");
    assert!(
        histogram.iter().filter(|&&n| n > 0).count() >= 2,
        "a test needs more than one class"
    );
    assert_eq!(mismatches, 0, "SDK labels differ from candle's prediction");

    let total: usize = seg.classes.iter().map(|c| c.voxels).sum();
    assert_eq!(total, image.geometry.len());
    let ml: f64 = seg.classes.iter().map(|c| c.ml).sum();
    assert!(
        (ml - image.geometry.len() as f64 * image.geometry.voxel_volume() / 1000.0).abs() < 1e-9
    );
    Ok(())
}

/// (4) A missing ONNX Runtime, a model that does not match its checksum, and a manifest from a
/// newer format are each a clear, typed error.
#[test]
fn bundle_and_runtime_problems_are_clear_errors() -> Result<()> {
    let e = export_bundle(&config(4, 1), 41, vec![0, 1, 2, 3, 4])?;

    let missing = Path::new("/nonexistent/ort/libonnxruntime.so.1.31.1");
    let options = SegmenterOptions {
        ort_library: Some(missing.into()),
        ..Default::default()
    };
    match Segmenter::open_with(&e.dir, &options) {
        Err(err @ SegmentError::OrtLibraryMissing { .. }) => {
            let msg = err.to_string();
            assert!(msg.contains("scripts/setup-ort.sh"), "{msg}");
            assert!(msg.contains(&missing.display().to_string()), "{msg}");
        }
        other => panic!("expected OrtLibraryMissing, got {other:?}"),
    }

    let copy = |name: &str| -> Result<PathBuf> {
        let d = e._tmp.path().join(name);
        std::fs::create_dir(&d)?;
        for f in [bundle::MODEL_FILE, bundle::MANIFEST_FILE] {
            std::fs::copy(e.dir.join(f), d.join(f))?;
        }
        Ok(d)
    };

    let tampered = copy("tampered")?;
    let mut model = std::fs::read(tampered.join(bundle::MODEL_FILE))?;
    let last = model.len() - 1;
    model[last] ^= 1;
    std::fs::write(tampered.join(bundle::MODEL_FILE), model)?;
    match Segmenter::open(&tampered) {
        Err(SegmentError::Bundle(err @ BundleError::ModelChecksum { .. })) => {
            assert!(err.to_string().contains("SHA-256"), "{err}");
        }
        other => panic!("expected ModelChecksum, got {other:?}"),
    }

    let newer = copy("newer")?;
    let path = newer.join(bundle::MANIFEST_FILE);
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    json["format_version"] = 99.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
    match Segmenter::open(&newer) {
        Err(SegmentError::Bundle(err @ BundleError::UnsupportedFormat { found: 99, .. })) => {
            assert!(err.to_string().contains("version 99"), "{err}");
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }

    // The untouched bundle still opens, and the grid check in scoring is enforced.
    let segmenter = open(&e.dir, 16)?;
    let g = Geometry::axis_aligned([9, 7, 2], [1.0; 3], [0.0; 3]);
    let seg = segmenter.segment(&Volume::new(g, phantom([9, 7, 2], 1))?)?;
    let other = Volume::filled(Geometry::axis_aligned([9, 7, 3], [1.0; 3], [0.0; 3]), 0u8);
    assert!(matches!(
        segmenter.dice(&seg, &other),
        Err(SegmentError::GeometryMismatch { .. })
    ));
    Ok(())
}
