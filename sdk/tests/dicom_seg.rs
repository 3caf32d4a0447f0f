//! DICOM SEG out and in, checked against independent readers: dciodvfy (dicom3tools), pydicom and
//! highdicom; a highdicom FRACTIONAL SEG and the real `liver.dcm` SEG (pydicom-data 1.0.0) read.

mod dicom_support;

use std::path::{Path, PathBuf};
use std::process::Command;

use cosilo_sdk::dicom::{
    read_seg, read_seg_segments, read_series_dir, write_seg, write_series, AlgorithmInfo,
    DicomError, Modality, SegmentDescription, SeriesMeta, SeriesVolume, SopInstance,
};
use cosilo_sdk::{Geometry, Volume};
use dicom_support::{ct_phantom, dciodvfy, label_phantom, oblique_geometry, reference};

fn segments() -> Vec<SegmentDescription> {
    vec![
        SegmentDescription::for_class(1, "csf"),
        SegmentDescription::for_class(2, "white_matter"),
        SegmentDescription::for_class(3, "tumour"),
    ]
}

fn read_bytes(path: &Path, n: usize) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    assert_eq!(b.len(), n, "{}", path.display());
    b
}

/// Frames a SEG of `labels` should hold: one per segment per slice where the segment has a voxel.
fn expected_frames(labels: &Volume<u8>, values: &[u8]) -> usize {
    let [nx, ny, nz] = labels.geometry.dims;
    values
        .iter()
        .map(|&v| {
            (0..nz)
                .filter(|&k| labels.data[k * nx * ny..(k + 1) * nx * ny].contains(&v))
                .count()
        })
        .sum()
}

fn series_and_labels(dir: &Path, modality: Modality, g: Geometry) -> (SeriesVolume, Volume<u8>) {
    let image = ct_phantom(g.clone());
    write_series(
        &image,
        &SeriesMeta::new(modality, format!("seg-{modality:?}")),
        dir,
    )
    .unwrap();
    let source = read_series_dir(dir).unwrap();
    let labels = label_phantom(source.volume.geometry.clone());
    (source, labels)
}

#[test]
fn seg_round_trips_and_matches_highdicom_voxel_for_voxel() {
    let tmp = tempfile::tempdir().unwrap();
    for (modality, g) in [
        (
            Modality::Mr,
            oblique_geometry([30, 26, 11], [0.9, 1.2, 2.2]),
        ),
        (
            Modality::Ct,
            Geometry::axis_aligned([36, 28, 9], [0.957, 0.957, 1.5], [5.0, -7.0, 11.0]),
        ),
    ] {
        let series_dir = tmp.path().join(format!("{modality:?}"));
        let (source, labels) = series_and_labels(&series_dir, modality, g);
        let counts: Vec<usize> = (1..=3)
            .map(|l| labels.data.iter().filter(|&&v| v == l).count())
            .collect();
        assert!(
            counts.iter().all(|&c| c > 0),
            "every label present: {counts:?}"
        );
        let seg_path = tmp.path().join(format!("{modality:?}-seg.dcm"));
        write_seg(
            &labels,
            &source,
            &segments(),
            &AlgorithmInfo::new("brain-unet", "1.2"),
            &seg_path,
        )
        .unwrap();

        // Our own reader: exact.
        let back = read_seg(&seg_path, &source).unwrap();
        assert_eq!(back.geometry, source.volume.geometry);
        assert!(
            back.data == labels.data,
            "{modality:?}: read_seg differs from the labels written"
        );
        let described = read_seg_segments(&seg_path).unwrap();
        assert_eq!(
            described
                .iter()
                .map(|(n, d)| (*n, d.property_type.value.as_str()))
                .collect::<Vec<_>>(),
            [(1, "65216001"), (2, "389080008"), (3, "108369006")]
        );

        // dciodvfy: no errors.
        let (errors, warnings) = dciodvfy(&seg_path);
        println!(
            "dciodvfy SEG on {modality:?}: {} warnings {warnings:#?}",
            warnings.len()
        );
        assert!(errors.is_empty(), "dciodvfy errors: {errors:#?}");

        // highdicom + pydicom: same labels on the source slices, same references.
        let out = tmp.path().join(format!("{modality:?}-highdicom.u8"));
        let info = reference(&[
            "labels",
            seg_path.to_str().unwrap(),
            series_dir.to_str().unwrap(),
            out.to_str().unwrap(),
        ]);
        let theirs = read_bytes(&out, labels.data.len());
        let differing = theirs
            .iter()
            .zip(&labels.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "{modality:?}: highdicom's labels differ in {differing} voxels"
        );
        assert_eq!(
            info["frames"].as_u64().unwrap() as usize,
            expected_frames(&labels, &[1, 2, 3])
        );
        assert_eq!(info["study_uid"], source.study_uid.as_str());
        assert_eq!(
            info["frame_of_reference_uid"],
            source.frame_of_reference_uid.as_str()
        );
        assert_eq!(info["patient_id"], source.study.patient_id.as_str());
        assert_eq!(
            info["referenced_instances"].as_u64().unwrap() as usize,
            source.sop_instances.len()
        );
        assert_eq!(
            info["voxels"].as_u64().unwrap() as usize,
            counts.iter().sum::<usize>()
        );
    }
}

#[test]
fn frames_map_by_position_when_instances_are_unknown() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, labels) = series_and_labels(
        &tmp.path().join("s"),
        Modality::Mr,
        oblique_geometry([20, 18, 7], [1.0, 1.0, 3.0]),
    );
    let seg_path = tmp.path().join("seg.dcm");
    write_seg(
        &labels,
        &source,
        &segments(),
        &AlgorithmInfo::new("m", "1"),
        &seg_path,
    )
    .unwrap();
    let mut renamed = source.clone();
    for (k, s) in renamed.sop_instances.iter_mut().enumerate() {
        s.instance_uid = format!("1.2.3.{k}");
    }
    assert_eq!(read_seg(&seg_path, &renamed).unwrap().data, labels.data);
    // A source whose slices are elsewhere is refused, not silently misplaced.
    let mut moved = renamed.clone();
    for p in moved.positions.iter_mut() {
        p[2] += 1.0;
    }
    let err = read_seg(&seg_path, &moved).unwrap_err();
    assert!(matches!(err, DicomError::UnmappedFrame { .. }), "{err}");
}

#[test]
fn empty_labels_give_a_valid_seg_and_bad_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, labels) = series_and_labels(
        &tmp.path().join("s"),
        Modality::Ct,
        Geometry::axis_aligned([12, 10, 4], [1.0; 3], [0.0; 3]),
    );
    let empty = labels.map(|_| 0u8);
    let seg_path = tmp.path().join("empty.dcm");
    write_seg(
        &empty,
        &source,
        &segments(),
        &AlgorithmInfo::new("m", "1"),
        &seg_path,
    )
    .unwrap();
    assert_eq!(read_seg(&seg_path, &source).unwrap().data, empty.data);
    let (errors, _) = dciodvfy(&seg_path);
    assert!(errors.is_empty(), "{errors:#?}");
    // Wrong grid.
    let small = Volume::filled(Geometry::axis_aligned([12, 10, 3], [1.0; 3], [0.0; 3]), 0u8);
    let err = write_seg(
        &small,
        &source,
        &segments(),
        &AlgorithmInfo::new("m", "1"),
        tmp.path().join("x.dcm"),
    )
    .unwrap_err();
    assert!(matches!(err, DicomError::LabelGrid { .. }), "{err}");
    // An image is not a segmentation.
    let err = read_seg(&source.files[0], &source).unwrap_err();
    assert!(matches!(err, DicomError::NotSegmentation { .. }), "{err}");
}

#[test]
fn highdicom_fractional_seg_is_thresholded_at_half() {
    let tmp = tempfile::tempdir().unwrap();
    let (source, _) = series_and_labels(
        &tmp.path().join("s"),
        Modality::Mr,
        oblique_geometry([28, 24, 8], [0.8, 0.8, 2.0]),
    );
    let seg_path = tmp.path().join("fractional.dcm");
    let expected_path = tmp.path().join("expected.u8");
    let info = reference(&[
        "fractional",
        tmp.path().join("s").to_str().unwrap(),
        seg_path.to_str().unwrap(),
        expected_path.to_str().unwrap(),
    ]);
    let expected = read_bytes(&expected_path, source.volume.data.len());
    assert!(info["voxels"].as_u64().unwrap() > 100, "{info}");
    assert!(expected.contains(&1) && expected.contains(&2));
    let ours = read_seg(&seg_path, &source).unwrap();
    let differing = ours
        .data
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "{differing} voxels differ from the thresholded fractions ({info})"
    );
}

/// The real liver SEG from PyPI pydicom-data 1.0.0, fetched by pip into target/test-data once.
fn liver_seg() -> Option<PathBuf> {
    const SHA256: &str = "4f8fb316b6df067bdf2ef7bc2385fd571ad5be67e171aed3ed902a71293d9d5c";
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-data/pydicom-data");
    let file = cache.join("liver.dcm");
    let sha = |p: &Path| {
        use sha2::{Digest, Sha256};
        std::fs::read(p)
            .ok()
            .map(|b| format!("{:x}", Sha256::digest(&b)))
    };
    if sha(&file).as_deref() == Some(SHA256) {
        return Some(file);
    }
    std::fs::create_dir_all(&cache).ok()?;
    let ok = Command::new(dicom_support::python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "pydicom-data==1.0.0",
            "-d",
        ])
        .arg(&cache)
        .status()
        .ok()?
        .success();
    if !ok {
        return None;
    }
    let wheel = cache.join("pydicom_data-1.0.0-py3-none-any.whl");
    let st = Command::new("unzip")
        .args(["-o", "-j", "-q"])
        .arg(&wheel)
        .arg("data_store/data/liver.dcm")
        .arg("-d")
        .arg(&cache)
        .status()
        .ok()?;
    (st.success() && sha(&file).as_deref() == Some(SHA256)).then_some(file)
}

#[test]
fn real_liver_seg_reads_like_pydicom() {
    // A test that cannot get its real input fails: the registry is reachable wherever the tests
    // run (scripts/test.sh installs everything else from it too).
    let liver = liver_seg().expect(
        "pydicom-data 1.0.0 could not be fetched: run `python -m pip download --no-deps \
         pydicom-data==1.0.0` where PyPI is reachable",
    );
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("frames.u8");
    let info = reference(&["frames", liver.to_str().unwrap(), out.to_str().unwrap()]);
    let (rows, cols) = (
        info["rows"].as_u64().unwrap() as usize,
        info["columns"].as_u64().unwrap() as usize,
    );
    let frames = info["frames"].as_array().unwrap();
    let pixels = read_bytes(&out, frames.len() * rows * cols);
    // The source CT is not in the package: describe its grid from the SEG's own geometry, slices
    // sorted along the normal, instances named as the SEG references them.
    let o: Vec<f64> = info["orientation"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let ps: Vec<f64> = info["pixel_spacing"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let normal = [
        o[1] * o[5] - o[2] * o[4],
        o[2] * o[3] - o[0] * o[5],
        o[0] * o[4] - o[1] * o[3],
    ];
    let pos = |f: &serde_json::Value| -> [f64; 3] {
        let p = f["position"].as_array().unwrap();
        [0, 1, 2].map(|a| p[a].as_f64().unwrap())
    };
    let mut order: Vec<usize> = (0..frames.len()).collect();
    let along = |f: usize| (0..3).map(|a| pos(&frames[f])[a] * normal[a]).sum::<f64>();
    order.sort_by(|&a, &b| along(a).total_cmp(&along(b)));
    let nz = order.len();
    let p0 = pos(&frames[order[0]]);
    let pn = pos(&frames[order[nz - 1]]);
    let step: [f64; 3] = std::array::from_fn(|a| (pn[a] - p0[a]) / (nz - 1) as f64);
    let mut affine = [[0.0; 4]; 4];
    for a in 0..3 {
        let s = if a < 2 { -1.0 } else { 1.0 };
        affine[a][0] = s * o[a] * ps[1];
        affine[a][1] = s * o[3 + a] * ps[0];
        affine[a][2] = s * step[a];
        affine[a][3] = s * p0[a];
    }
    affine[3][3] = 1.0;
    let geometry = Geometry {
        dims: [cols, rows, nz],
        affine,
    };
    let mut source = SeriesVolume {
        volume: Volume::filled(geometry, 0.0f32),
        study_uid: String::new(),
        series_uid: String::new(),
        frame_of_reference_uid: String::new(),
        sop_instances: order
            .iter()
            .map(|&f| SopInstance {
                class_uid: frames[f]["source_class"].as_str().unwrap().into(),
                instance_uid: frames[f]["source_uid"].as_str().unwrap().into(),
            })
            .collect(),
        positions: order.iter().map(|&f| pos(&frames[f])).collect(),
        files: vec![],
        modality: "CT".into(),
        series_number: None,
        series_description: String::new(),
        study: Default::default(),
        transfer_syntax: String::new(),
    };
    let mut expected = vec![0u8; cols * rows * nz];
    for (k, &f) in order.iter().enumerate() {
        let seg = frames[f]["segment"].as_u64().unwrap() as u8;
        for (p, &v) in pixels[f * rows * cols..(f + 1) * rows * cols]
            .iter()
            .enumerate()
        {
            if v != 0 {
                expected[k * rows * cols + p] = seg;
            }
        }
    }
    assert!(expected.iter().filter(|&&v| v != 0).count() > 100_000);
    let by_reference = read_seg(&liver, &source).unwrap();
    assert!(
        by_reference.data == expected,
        "liver.dcm read by reference differs from pydicom"
    );
    for s in source.sop_instances.iter_mut() {
        s.instance_uid.push_str(".9");
    }
    let by_position = read_seg(&liver, &source).unwrap();
    assert!(
        by_position.data == expected,
        "liver.dcm read by position differs from pydicom"
    );
    let segs = read_seg_segments(&liver).unwrap();
    assert_eq!(segs[0].1.label, "Liver");
}
