//! DICOM image series in and out: geometry (LPS ↔ RAS, oblique, anisotropic), rescaled signed
//! values, slice sorting, the refusals, and transfer syntaxes re-encoded by dcmtk.

mod dicom_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use cosilo_sdk::dicom::{
    read_series, read_series_dir, write_series, DicomError, Modality, SeriesMeta,
};
use cosilo_sdk::Geometry;
use dicom_support::{affine_diff, ct_phantom, dciodvfy, oblique_geometry};

#[test]
fn ct_series_round_trips_hu_and_geometry() {
    let dir = tempfile::tempdir().unwrap();
    let g = Geometry::axis_aligned([40, 32, 12], [0.957, 0.957, 1.5], [-120.0, 95.5, -30.0]);
    let ct = ct_phantom(g);
    assert!(ct.data.iter().any(|&v| v < -1000.0) && ct.data.iter().any(|&v| v > 1000.0));
    let meta = SeriesMeta::new(Modality::Ct, "round-trip-ct");
    let files = write_series(&ct, &meta, dir.path()).unwrap();
    assert_eq!(files.len(), 12);
    let s = read_series_dir(dir.path()).unwrap();
    assert_eq!(s.volume.geometry.dims, [40, 32, 12]);
    assert!(
        affine_diff(&s.volume.geometry, &ct.geometry) < 1e-4,
        "{:?}",
        s.volume.geometry
    );
    assert_eq!(
        s.volume.data, ct.data,
        "whole HU values must round-trip exactly (signed)"
    );
    assert_eq!(s.modality, "CT");
    assert_eq!(s.series_uid, meta.series_uid());
    assert_eq!(s.study_uid, meta.study_uid());
    assert_eq!(s.frame_of_reference_uid, meta.frame_of_reference_uid());
    assert_eq!(s.study.patient_id, meta.patient_id);
    assert_eq!(s.sop_instances.len(), 12);
    assert!(s
        .sop_instances
        .iter()
        .all(|i| i.class_uid == "1.2.840.10008.5.1.4.1.1.2"));
    // RAS origin (-120, 95.5) is LPS (120, -95.5).
    assert!((s.positions[0][0] - 120.0).abs() < 1e-6 && (s.positions[0][1] + 95.5).abs() < 1e-6);
    // Same seed, same files: deterministic UIDs.
    let dir2 = tempfile::tempdir().unwrap();
    write_series(&ct, &meta, dir2.path()).unwrap();
    assert_eq!(
        read_series_dir(dir2.path()).unwrap().sop_instances,
        s.sop_instances
    );
}

#[test]
fn oblique_anisotropic_mr_series_keeps_its_affine() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique_geometry([24, 20, 9], [0.8, 1.1, 2.5]);
    let mut mr = ct_phantom(g.clone()).map(|v| (v + 1024.0) * 0.37 + 0.125);
    mr.data[5] = 3.3; // not a whole number: forces a non-unit rescale
    let meta = SeriesMeta::new(Modality::Mr, "oblique-mr");
    let mut files = write_series(&mr, &meta, dir.path()).unwrap();
    // Any file order gives the same volume: sorting is by position, not name.
    files.reverse();
    files.swap(1, 5);
    let s = read_series(&files).unwrap();
    let d = affine_diff(&s.volume.geometry, &g);
    assert!(
        d < 1e-4,
        "affine differs by {d}: {:?} vs {:?}",
        s.volume.geometry.affine,
        g.affine
    );
    let (lo, hi) = mr
        .data
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let half_step = (hi - lo) as f64 / 65535.0 / 2.0 * 1.01;
    let worst = s
        .volume
        .data
        .iter()
        .zip(&mr.data)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, f64::max);
    assert!(
        worst <= half_step + 1e-4,
        "worst error {worst} > {half_step}"
    );
    assert_eq!(s.modality, "MR");
    // In-slice order is DICOM's row-major order: voxel (i, j, k) is column i of row j.
    assert_eq!(s.files[0], dir.path().join("MR_0001.dcm"));
}

#[test]
fn written_images_pass_dciodvfy() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique_geometry([16, 12, 3], [0.9, 0.9, 3.0]);
    for (m, seed) in [(Modality::Ct, "v-ct"), (Modality::Mr, "v-mr")] {
        let v = ct_phantom(g.clone()).map(|x| {
            if m == Modality::Mr {
                x * 0.5 + 600.25
            } else {
                x
            }
        });
        let files = write_series(&v, &SeriesMeta::new(m, seed), dir.path().join(seed)).unwrap();
        let (errors, warnings) = dciodvfy(&files[1]);
        println!("dciodvfy {m:?}: {} warnings: {warnings:#?}", warnings.len());
        assert!(errors.is_empty(), "dciodvfy errors for {m:?}: {errors:#?}");
    }
}

fn write_ct(dir: &Path, seed: &str, g: Geometry) -> Vec<PathBuf> {
    write_series(&ct_phantom(g), &SeriesMeta::new(Modality::Ct, seed), dir).unwrap()
}

#[test]
fn a_missing_slice_is_refused_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = write_ct(
        dir.path(),
        "gap",
        Geometry::axis_aligned([8, 8, 6], [1.0, 1.0, 2.0], [0.0; 3]),
    );
    let gone = files.remove(3);
    std::fs::remove_file(&gone).unwrap();
    let err = read_series_dir(dir.path()).unwrap_err();
    assert!(
        matches!(err, DicomError::SliceGap { missing: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("slice gap"), "{err}");
}

#[test]
fn non_uniform_spacing_duplicates_and_mixtures_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = Geometry::axis_aligned([8, 8, 3], [1.0, 1.0, 2.0], [0.0; 3]);
    let a = write_ct(&dir.path().join("a"), "same-series", g.clone());
    // Same series UID, shifted by 0.7 mm: steps of 0.7 and 1.3 mm.
    let shifted = Geometry::axis_aligned([8, 8, 3], [1.0, 1.0, 2.0], [0.0, 0.0, 0.7]);
    let b = write_ct(&dir.path().join("b"), "same-series", shifted);
    let err = read_series(&[a[0].clone(), a[1].clone(), b[0].clone()]).unwrap_err();
    assert!(matches!(err, DicomError::NonUniformSpacing { .. }), "{err}");
    // The same position twice.
    let err = read_series(&[a[0].clone(), a[1].clone(), a[1].clone()]).unwrap_err();
    assert!(matches!(err, DicomError::DuplicatePosition { .. }), "{err}");
    // A rotated grid under the same series UID.
    let c = write_ct(
        &dir.path().join("c"),
        "same-series",
        oblique_geometry([8, 8, 3], [1.0, 1.0, 2.0]),
    );
    let err = read_series(&[a[0].clone(), c[1].clone()]).unwrap_err();
    assert!(matches!(err, DicomError::MixedOrientation { .. }), "{err}");
    // Another grid size.
    let d = write_ct(
        &dir.path().join("d"),
        "same-series",
        Geometry::axis_aligned([8, 6, 3], [1.0, 1.0, 2.0], [0.0; 3]),
    );
    let err = read_series(&[a[0].clone(), d[1].clone()]).unwrap_err();
    assert!(matches!(err, DicomError::MixedGrid { .. }), "{err}");
    // Another series.
    let e = write_ct(&dir.path().join("e"), "other-series", g);
    let err = read_series(&[a[0].clone(), e[1].clone()]).unwrap_err();
    assert!(matches!(err, DicomError::MixedSeries { .. }), "{err}");
}

#[test]
fn missing_geometry_and_multi_frame_are_refused() {
    use dicom::dictionary_std::tags;
    let dir = tempfile::tempdir().unwrap();
    let files = write_ct(
        dir.path(),
        "tags",
        Geometry::axis_aligned([8, 8, 2], [1.0; 3], [0.0; 3]),
    );
    let mut obj = dicom::object::open_file(&files[1]).unwrap();
    obj.remove_element(tags::IMAGE_POSITION_PATIENT);
    obj.write_to_file(&files[1]).unwrap();
    let err = read_series(&files).unwrap_err();
    assert!(
        matches!(
            err,
            DicomError::MissingAttribute {
                attribute: "ImagePositionPatient",
                ..
            }
        ),
        "{err}"
    );
    let mut obj = dicom::object::open_file(&files[0]).unwrap();
    obj.put_str(tags::NUMBER_OF_FRAMES, dicom::core::VR::IS, "2");
    obj.write_to_file(&files[0]).unwrap();
    let err = read_series(&files[..1]).unwrap_err();
    assert!(
        matches!(err, DicomError::MultiFrame { frames: 2, .. }),
        "{err}"
    );
}

/// Re-encodes every file of `from` into `to` with a dcmtk tool.
fn reencode(tool: &str, args: &[&str], from: &[PathBuf], to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    from.iter()
        .map(|f| {
            let out = to.join(f.file_name().unwrap());
            let st = Command::new(tool)
                .args(args)
                .arg(f)
                .arg(&out)
                .output()
                .unwrap_or_else(|e| panic!("{tool} (dcmtk) must be installed: {e}"));
            assert!(
                st.status.success(),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&st.stderr)
            );
            out
        })
        .collect()
}

fn transfer_syntax(path: &Path) -> String {
    let obj = dicom::object::open_file(path).unwrap();
    obj.meta()
        .transfer_syntax()
        .trim_end_matches('\0')
        .to_string()
}

#[test]
fn transfer_syntaxes_decode_to_the_same_values() {
    let dir = tempfile::tempdir().unwrap();
    let g = Geometry::axis_aligned([32, 24, 4], [0.7, 0.7, 1.25], [10.0, -5.0, 3.0]);
    let ct = ct_phantom(g);
    let files = write_series(
        &ct,
        &SeriesMeta::new(Modality::Ct, "ts"),
        dir.path().join("explicit"),
    )
    .unwrap();
    let reference = read_series(&files).unwrap();
    assert_eq!(reference.transfer_syntax, "1.2.840.10008.1.2.1");
    let cases: [(&str, &str, &[&str], &str); 6] = [
        ("implicit", "dcmconv", &["+ti"], "1.2.840.10008.1.2"),
        ("big-endian", "dcmconv", &["+tb"], "1.2.840.10008.1.2.2"),
        ("deflate", "dcmconv", &["+td"], "1.2.840.10008.1.2.1.99"),
        ("rle", "dcmcrle", &[], "1.2.840.10008.1.2.5"),
        (
            "jpeg-lossless-sv1",
            "dcmcjpeg",
            &["+e1"],
            "1.2.840.10008.1.2.4.70",
        ),
        (
            "jpeg-lossless",
            "dcmcjpeg",
            &["+el"],
            "1.2.840.10008.1.2.4.57",
        ),
    ];
    for (name, tool, args, uid) in cases {
        let re = reencode(tool, args, &files, &dir.path().join(name));
        assert_eq!(transfer_syntax(&re[0]), uid, "{name}");
        let s = read_series(&re).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.transfer_syntax, uid);
        assert_eq!(s.volume.geometry, reference.volume.geometry, "{name}");
        assert_eq!(s.volume.data, ct.data, "{name}: decoded values differ");
    }
}

#[test]
fn pydicom_test_files_decode_like_pydicom() {
    let tmp = tempfile::tempdir().unwrap();
    let path_of = |name: &str| {
        let info = dicom_support::reference(&["testfile", name]);
        PathBuf::from(info["path"].as_str().unwrap())
    };
    // Decoded by dicom-rs with the default features: same values as pydicom.
    for name in [
        "CT_small.dcm",
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
    ] {
        let file = path_of(name);
        let out = tmp.path().join(format!("{name}.f32"));
        dicom_support::reference(&["pixels", file.to_str().unwrap(), out.to_str().unwrap()]);
        let expected: Vec<f32> = std::fs::read(&out)
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let s = read_series(&[file]).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(s.volume.data, expected, "{name}");
        if name == "CT_small.dcm" {
            assert!(
                s.volume.data.iter().any(|&v| v < 0.0),
                "CT values are signed HU"
            );
        }
    }
    // JPEG-LS and JPEG 2000 need codecs dicom-rs does not build by default: a clear error.
    for name in ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"] {
        let err = read_series(&[path_of(name)]).unwrap_err();
        assert!(matches!(err, DicomError::PixelData { .. }), "{name}: {err}");
    }
}
