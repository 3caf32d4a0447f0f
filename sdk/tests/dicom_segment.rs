//! The SDK on DICOM: a bundle segments a DICOM series directly (labels on the series' grid), and
//! the labels go out as a SEG that highdicom reads back voxel for voxel. The bundle's model is a
//! tiny threshold network written with the `onnx` Python package, so the expected labels are
//! known exactly.

mod dicom_support;

use std::process::Command;

use cosilo_sdk::bundle::{
    self, classes_from_label_map, InputSpec, Manifest, Metrics, OutputSpec, Provenance,
};
use cosilo_sdk::dicom::{
    read_seg, segments_for_classes, write_seg, write_series, AlgorithmInfo, Modality, SeriesMeta,
};
use cosilo_sdk::preprocess::Normalisation;
use cosilo_sdk::Segmenter;
use dicom_support::{ct_phantom, oblique_geometry, python, reference};

fn threshold_bundle(dir: &std::path::Path) -> Manifest {
    let model = dir.join("model-src.onnx");
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/threshold_model.py");
    let out = Command::new(python())
        .arg(&script)
        .arg(&model)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&model).unwrap();
    let names: Vec<String> = ["background", "brain"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let manifest = Manifest {
        format_version: bundle::FORMAT_VERSION,
        model_name: "threshold".into(),
        model_sha256: String::new(),
        input: InputSpec::axial_slices(1, 8),
        output: OutputSpec::default(),
        classes: classes_from_label_map(&names, &[0, 1]),
        normalisation: Normalisation::Percentile {
            low: 0.0,
            high: 100.0,
        },
        provenance: Provenance {
            training_run: "none (threshold test model)".into(),
            sites: vec![],
            cases: 0,
            created: bundle::rfc3339_utc(std::time::SystemTime::now()),
            cosilo_version: env!("CARGO_PKG_VERSION").into(),
        },
        metrics: Metrics {
            dice: vec![],
            cases: 0,
        },
    };
    bundle::write(dir.join("bundle"), &bytes, &manifest).unwrap()
}

#[test]
fn bundle_segments_a_dicom_series_and_writes_a_seg() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = threshold_bundle(tmp.path());
    // An oblique MR series whose slices (26 × 21) are not multiples of the model's 8.
    let series_dir = tmp.path().join("series");
    let g = oblique_geometry([26, 21, 7], [0.9, 0.9, 2.0]);
    let image = ct_phantom(g.clone()).map(|v| v * 0.25 + 300.0);
    write_series(
        &image,
        &SeriesMeta::new(Modality::Mr, "sdk-on-dicom"),
        &series_dir,
    )
    .unwrap();

    let segmenter = Segmenter::open(tmp.path().join("bundle")).unwrap();
    let (seg, series) = segmenter.segment_dicom_series(&series_dir).unwrap();
    assert_eq!(
        seg.labels.geometry, series.volume.geometry,
        "labels on the series' grid"
    );
    assert!(dicom_support::affine_diff(&series.volume.geometry, &g) < 1e-4);
    // The model marks normalised values above 0.5: compute that from the series independently.
    let norm = manifest.normalisation.apply(&series.volume.data);
    let expected: Vec<u8> = norm.iter().map(|&x| u8::from(x > 0.5)).collect();
    assert!(expected.contains(&0) && expected.contains(&1));
    assert!(
        seg.labels.data == expected,
        "labels differ from the threshold"
    );
    assert_eq!(
        seg.classes[1].voxels,
        expected.iter().filter(|&&v| v == 1).count()
    );

    let seg_path = tmp.path().join("seg.dcm");
    let segments = segments_for_classes(&segmenter.manifest().classes);
    assert_eq!(segments.len(), 1);
    write_seg(
        &seg.labels,
        &series,
        &segments,
        &AlgorithmInfo::new("threshold", "1"),
        &seg_path,
    )
    .unwrap();
    assert_eq!(read_seg(&seg_path, &series).unwrap().data, seg.labels.data);
    let out = tmp.path().join("highdicom.u8");
    let info = reference(&[
        "labels",
        seg_path.to_str().unwrap(),
        series_dir.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        seg.labels.data,
        "highdicom disagrees ({info})"
    );
}
