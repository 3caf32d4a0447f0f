//! Unit tests of the store: cases, refusals, checkpoints, damage detection, format versions.

use std::path::{Path, PathBuf};

use cosilo_sdk::volume::{write_nifti_f32, write_nifti_labels, Geometry, Volume};

use super::checkpoint::checkpoint_key;
use super::import::read_manifest;
use super::*;

fn geometry() -> Geometry {
    Geometry::axis_aligned([6, 5, 4], [1.0, 1.5, 2.0], [-3.0, 4.0, 10.0])
}

fn volumes(seed: u32) -> (Volume<f32>, Volume<u8>) {
    let g = geometry();
    let image: Vec<f32> = (0..g.len())
        .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 100.0)
        .collect();
    let label: Vec<u8> = (0..g.len())
        .map(|i| ((i as u32 + seed) % 3) as u8)
        .collect();
    (
        Volume::new(g.clone(), image).unwrap(),
        Volume::new(g, label).unwrap(),
    )
}

/// Writes a valid pair named `name` and returns the paths and volumes.
fn write_pair(dir: &Path, name: &str, seed: u32) -> (PathBuf, PathBuf, Volume<f32>, Volume<u8>) {
    let (image, label) = volumes(seed);
    let ip = dir.join(format!("{name}_img.nii.gz"));
    let lp = dir.join(format!("{name}_seg.nii.gz"));
    write_nifti_f32(&ip, &image).unwrap();
    write_nifti_labels(&lp, &label).unwrap();
    (ip, lp, image, label)
}

/// A minimal uncompressed NIfTI-1 file of f32 voxels with any number of dimensions.
fn write_raw_nifti(path: &Path, dims: &[u16], data: &[f32]) {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    h[40..42].copy_from_slice(&(dims.len() as i16).to_le_bytes());
    for (i, d) in dims.iter().enumerate() {
        h[42 + 2 * i..44 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&16i16.to_le_bytes()); // float32
    h[72..74].copy_from_slice(&32i16.to_le_bytes());
    for i in 0..8 {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&1f32.to_le_bytes());
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes());
    h[112..116].copy_from_slice(&1f32.to_le_bytes());
    h[344..348].copy_from_slice(b"n+1\0");
    for v in data {
        h.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, h).unwrap();
}

/// Every key and value hash in every tree: equal snapshots mean an untouched store.
fn snapshot(store: &Store) -> Vec<(Vec<u8>, Vec<u8>, String)> {
    let mut out = Vec::new();
    for name in store.db.tree_names() {
        let tree = store.db.open_tree(&name).unwrap();
        for kv in tree.iter() {
            let (k, v) = kv.unwrap();
            out.push((name.to_vec(), k.to_vec(), sha256_hex(&v)));
        }
    }
    out
}

fn open_temp() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

#[test]
fn case_round_trip_keeps_voxels_geometry_and_provenance() {
    let (dir, store) = open_temp();
    let (ip, lp, image, label) = write_pair(dir.path(), "c1", 1);
    let out = store
        .import_case("c1", Split::Train, &ip, &lp, "north")
        .unwrap();
    assert_eq!(out, ImportOutcome::Imported);
    assert_eq!(store.case_ids(None).unwrap(), vec!["c1"]);
    assert_eq!(store.case_ids(Some(Split::Train)).unwrap(), vec!["c1"]);
    assert!(store.case_ids(Some(Split::Test)).unwrap().is_empty());

    let case = store.load_case("c1").unwrap();
    assert_eq!(case.image.data, image.data);
    assert_eq!(case.label.data, label.data);
    assert!(case.image.geometry.same_grid(&geometry(), 1e-6));
    assert_eq!(case.meta, store.case_meta("c1").unwrap());
    let m = &case.meta;
    assert_eq!(m.split, Split::Train);
    assert_eq!(m.label_counts.iter().sum::<u64>(), geometry().len() as u64);
    assert_eq!(m.label_counts.len(), 3);
    assert_eq!(m.provenance.hospital, "north");
    assert_eq!(m.provenance.source, "nifti");
    assert!(m.provenance.image_file.ends_with("c1_img.nii.gz"));
    assert!(m.provenance.tool_version.starts_with("cosilo-appliance "));
    assert_eq!(m.image_sha256.len(), 64);

    let stats = store.stats().unwrap();
    assert_eq!((stats.train_cases, stats.test_cases), (1, 0));
    assert_eq!(stats.voxel_bytes, geometry().len() as u64 * 5);

    // Still there after closing and reopening.
    let path = store.dir().to_path_buf();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.load_case("c1").unwrap().image.data, image.data);
    assert!(matches!(
        store.load_case("nope"),
        Err(StoreError::CaseNotFound { .. })
    ));
}

#[test]
fn reimporting_the_same_case_writes_nothing() {
    let (dir, store) = open_temp();
    let (ip, lp, ..) = write_pair(dir.path(), "first", 7);
    store
        .import_case("c1", Split::Test, &ip, &lp, "north")
        .unwrap();
    let before = snapshot(&store);
    // The same content under other file names is the same case.
    let (ip2, lp2, ..) = write_pair(dir.path(), "second", 7);
    let out = store
        .import_case("c1", Split::Test, &ip2, &lp2, "north")
        .unwrap();
    assert_eq!(out, ImportOutcome::AlreadyPresent);
    assert_eq!(snapshot(&store), before);
    assert!(store
        .case_meta("c1")
        .unwrap()
        .provenance
        .image_file
        .ends_with("first_img.nii.gz"));
}

#[test]
fn same_id_with_other_content_is_a_conflict() {
    let (dir, store) = open_temp();
    let (ip, lp, ..) = write_pair(dir.path(), "a", 1);
    let (ip2, lp2, ..) = write_pair(dir.path(), "b", 2);
    store
        .import_case("c1", Split::Train, &ip, &lp, "north")
        .unwrap();
    let before = snapshot(&store);

    let err = store
        .import_case("c1", Split::Train, &ip2, &lp2, "north")
        .unwrap_err();
    assert!(matches!(err, StoreError::CaseConflict { .. }), "{err}");
    assert!(err.to_string().contains("image voxels"), "{err}");
    assert!(err.is_refusal());

    let err = store
        .import_case("c1", Split::Test, &ip, &lp, "north")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("split (stored train, offered test)"),
        "{err}"
    );

    let err = store
        .import_case("c1", Split::Train, &ip, &lp, "south")
        .unwrap_err();
    assert!(err.to_string().contains("hospital"), "{err}");
    assert_eq!(snapshot(&store), before);
}

#[test]
fn bad_inputs_are_refused_by_name_and_leave_the_store_untouched() {
    let (dir, store) = open_temp();
    let d = dir.path();
    let (ip, lp, image, label) = write_pair(d, "good", 3);
    store
        .import_case("good", Split::Train, &ip, &lp, "north")
        .unwrap();
    let before = snapshot(&store);
    let g = geometry();

    let garbage = d.join("garbage_img.nii");
    std::fs::write(&garbage, b"this is not a NIfTI file").unwrap();
    let missing = d.join("missing_img.nii.gz");
    let four_d = d.join("fourd_img.nii");
    write_raw_nifti(&four_d, &[6, 5, 4, 2], &vec![0.0; g.len() * 2]);
    let nan_image = d.join("nan_img.nii.gz");
    let mut v = image.clone();
    v.data[11] = f32::NAN;
    write_nifti_f32(&nan_image, &v).unwrap();
    let inf_image = d.join("inf_img.nii.gz");
    v.data[11] = f32::INFINITY;
    write_nifti_f32(&inf_image, &v).unwrap();
    let fractional = d.join("fractional_seg.nii.gz");
    write_nifti_f32(&fractional, &label.map(|x| x as f32 + 0.5)).unwrap();
    let too_big = d.join("big_seg.nii.gz");
    write_nifti_f32(&too_big, &label.map(|x| x as f32 + 255.0)).unwrap();
    let negative = d.join("negative_seg.nii.gz");
    write_nifti_f32(&negative, &label.map(|x| x as f32 - 1.0)).unwrap();
    let small = d.join("small_seg.nii.gz");
    let gs = Geometry::axis_aligned([6, 5, 3], [1.0, 1.5, 2.0], [-3.0, 4.0, 10.0]);
    write_nifti_labels(&small, &Volume::filled(gs, 0u8)).unwrap();
    let shifted = d.join("shifted_seg.nii.gz");
    let gm = Geometry::axis_aligned([6, 5, 4], [1.0, 1.5, 2.0], [-2.5, 4.0, 10.0]);
    write_nifti_labels(&shifted, &Volume::new(gm, label.data.clone()).unwrap()).unwrap();

    let cases: [(&Path, &Path, &str, &str); 10] = [
        (&garbage, &lp, "garbage_img.nii", "cannot read NIfTI"),
        (&missing, &lp, "missing_img.nii.gz", "cannot read NIfTI"),
        (&four_d, &lp, "fourd_img.nii", "3-D"),
        (&nan_image, &lp, "nan_img.nii.gz", "not a finite number"),
        (&inf_image, &lp, "inf_img.nii.gz", "not a finite number"),
        (
            &ip,
            &fractional,
            "fractional_seg.nii.gz",
            "integers 0..=255",
        ),
        (&ip, &too_big, "big_seg.nii.gz", "integers 0..=255"),
        (&ip, &negative, "negative_seg.nii.gz", "integers 0..=255"),
        (&ip, &small, "small_seg.nii.gz", "[6, 5, 3]"),
        (&ip, &shifted, "shifted_seg.nii.gz", "affines differ"),
    ];
    for (image, label, file, reason) in cases {
        let err = store
            .import_case("new", Split::Train, image, label, "north")
            .unwrap_err();
        let msg = err.to_string();
        assert!(err.is_refusal(), "{msg}");
        assert!(msg.contains(file), "{file}: {msg}");
        assert!(msg.contains(reason), "{file}: {msg}");
        assert_eq!(snapshot(&store), before, "{file} changed the store");
    }

    for bad_id in ["", "../etc", "a b", ".hidden", "x\0y"] {
        let err = store
            .import_case(bad_id, Split::Train, &ip, &lp, "north")
            .unwrap_err();
        assert!(matches!(err, StoreError::InvalidName { .. }), "{err}");
    }
    let err = store
        .import_case("new", Split::Train, &ip, &lp, " ")
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidName { .. }), "{err}");
    assert_eq!(snapshot(&store), before);
}

#[test]
fn checkpoints_put_latest_and_prune() {
    let (_dir, store) = open_temp();
    assert_eq!(store.latest_checkpoint("run1").unwrap(), None);
    for i in 1..=3u64 {
        let meta = serde_json::json!({ "round": i });
        let seq = store
            .put_checkpoint("run1", &meta, &vec![i as u8; 100_000 * i as usize])
            .unwrap();
        assert_eq!(seq, i);
    }
    store
        .put_checkpoint("run10", &serde_json::json!({}), b"other")
        .unwrap();
    // Weights this large live in sled blob files, which flush() fsyncs itself.
    assert!(!store.synced_blobs.lock().unwrap().is_empty());
    let (seq, meta, weights) = store.latest_checkpoint("run1").unwrap().unwrap();
    assert_eq!(seq, 3);
    assert_eq!(meta["round"], 3);
    assert_eq!(weights, vec![3u8; 300_000]);

    store.prune_checkpoints("run1", 1).unwrap();
    assert_eq!(store.checkpoint_seqs("run1").unwrap(), vec![3]);
    assert_eq!(store.checkpoint_seqs("run10").unwrap(), vec![1]);
    // Numbers are not reused after pruning.
    let seq = store
        .put_checkpoint("run1", &serde_json::json!(null), b"w")
        .unwrap();
    assert_eq!(seq, 4);
    store.prune_checkpoints("run1", 0).unwrap();
    assert_eq!(store.latest_checkpoint("run1").unwrap(), None);
    assert_eq!(
        store.latest_checkpoint("run10").unwrap().unwrap().2,
        b"other"
    );
    assert!(store
        .put_checkpoint("bad/run", &serde_json::json!(null), b"")
        .is_err());

    // Durable across reopening.
    let path = store.dir().to_path_buf();
    drop(store);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.latest_checkpoint("run10").unwrap().unwrap().0, 1);
    assert_eq!(store.stats().unwrap().checkpoints, 1);
}

#[test]
fn damaged_values_are_detected() {
    let (dir, store) = open_temp();
    let (ip, lp, ..) = write_pair(dir.path(), "c", 5);
    store
        .import_case("c1", Split::Train, &ip, &lp, "north")
        .unwrap();

    let mut image = store.images.get("c1").unwrap().unwrap().to_vec();
    image[17] ^= 0x01;
    store.images.insert("c1", image.as_slice()).unwrap();
    let err = store.load_case("c1").unwrap_err();
    assert!(matches!(err, StoreError::CaseCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("SHA-256"), "{err}");

    image.truncate(10);
    store.images.insert("c1", image.as_slice()).unwrap();
    assert!(matches!(
        store.load_case("c1"),
        Err(StoreError::CaseCorrupt { .. })
    ));

    store
        .import_case("c2", Split::Train, &ip, &lp, "north")
        .unwrap();
    let mut label = store.labels.get("c2").unwrap().unwrap().to_vec();
    label[0] = label[0].wrapping_add(1);
    store.labels.insert("c2", label.as_slice()).unwrap();
    assert!(matches!(
        store.load_case("c2"),
        Err(StoreError::CaseCorrupt { .. })
    ));
    store.labels.remove("c2").unwrap();
    let err = store.load_case("c2").unwrap_err();
    assert!(err.to_string().contains("label missing"), "{err}");

    store
        .put_checkpoint("run", &serde_json::json!({}), &[1, 2, 3, 4])
        .unwrap();
    store
        .checkpoint_weights
        .insert(checkpoint_key("run", 1), &[1u8, 2, 3, 5][..])
        .unwrap();
    assert!(matches!(
        store.latest_checkpoint("run"),
        Err(StoreError::CheckpointCorrupt { seq: 1, .. })
    ));
}

#[test]
fn remove_case_removes_all_parts() {
    let (dir, store) = open_temp();
    let (ip, lp, ..) = write_pair(dir.path(), "c", 5);
    store
        .import_case("c1", Split::Train, &ip, &lp, "north")
        .unwrap();
    assert!(store.remove_case("c1").unwrap());
    assert!(!store.remove_case("c1").unwrap());
    assert!(store.case_ids(None).unwrap().is_empty());
    assert!(store.images.is_empty() && store.labels.is_empty());
    // And it can come back.
    store
        .import_case("c1", Split::Train, &ip, &lp, "north")
        .unwrap();
    assert!(store.load_case("c1").is_ok());
}

#[test]
fn unknown_format_versions_and_foreign_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let store = Store::open(&path).unwrap();
    // A second opener (here, the same process) is refused while the store is open.
    assert!(matches!(Store::open(&path), Err(StoreError::Open { .. })));
    store.db.insert(FORMAT_KEY, b"2").unwrap();
    store.flush().unwrap();
    drop(store);
    let err = Store::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::UnknownFormat { .. }), "{err}");
    assert!(err.to_string().contains("\"2\""), "{err}");

    let foreign = dir.path().join("home");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), b"hello").unwrap();
    let err = Store::open(&foreign).unwrap_err();
    assert!(matches!(err, StoreError::NotAStore { .. }), "{err}");
    assert_eq!(std::fs::read_dir(&foreign).unwrap().count(), 1);
}

#[test]
fn manifest_paths_are_relative_to_the_manifest_and_filter_by_hospital() {
    let dir = tempfile::tempdir().unwrap();
    let cohort = dir.path().join("cohort");
    std::fs::create_dir(&cohort).unwrap();
    let manifest = cohort.join("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"seed": 1, "cases": [
            {"case_id": "a1", "hospital": "h1", "split": "train", "image": "h1/a1_img.nii.gz", "label": "h1/a1_seg.nii.gz", "tumour": true},
            {"case_id": "b1", "hospital": "h2", "split": "test", "image": "/abs/b1_img.nii.gz", "label": "b1_seg.nii.gz"}
        ]}"#,
    )
    .unwrap();
    let all = read_manifest(&manifest, None).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].image, cohort.join("h1/a1_img.nii.gz"));
    assert_eq!(all[1].image, PathBuf::from("/abs/b1_img.nii.gz"));
    assert_eq!(all[1].split, Split::Test);
    let h2 = read_manifest(&manifest, Some("h2")).unwrap();
    assert_eq!(h2.len(), 1);
    assert_eq!(h2[0].id, "b1");
    let err = read_manifest(&manifest, Some("h3")).unwrap_err();
    assert!(err.to_string().contains("h1, h2"), "{err}");
    std::fs::write(&manifest, r#"{"cases": [{"case_id": "x"}]}"#).unwrap();
    assert!(matches!(
        read_manifest(&manifest, None),
        Err(ManifestError::Parse { .. })
    ));
}

#[test]
fn a_store_creation_interrupted_by_a_crash_is_started_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store");
    let staging = path.join(".data.creating");
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("conf"), b"half").unwrap();
    let store = Store::open(&path).unwrap();
    assert!(!staging.exists());
    assert!(store.case_ids(None).unwrap().is_empty());
    drop(store);
    // An existing empty directory, e.g. a mount point, holds the store.
    let mount = dir.path().join("mount");
    std::fs::create_dir_all(mount.join("lost+found")).unwrap();
    drop(Store::open(&mount).unwrap());
    assert!(mount.join("data").join("conf").is_file());
    drop(Store::open(&mount).unwrap());
}

#[test]
fn writes_that_would_cross_the_disk_reserve_are_refused_and_write_nothing() {
    let (dir, store) = open_temp();
    assert_eq!(store.reserve_bytes(), DEFAULT_RESERVE_BYTES);
    let (ip, lp, image, label) = write_pair(dir.path(), "c1", 1);
    let before = snapshot(&store);
    // A reserve larger than the whole disk: every write crosses it.
    let disk = cosilo_hardware::disk(store.dir()).unwrap();
    store.clone().set_reserve_bytes(disk.total_bytes + 1);
    assert_eq!(
        store.reserve_bytes(),
        disk.total_bytes + 1,
        "clones share it"
    );
    let provenance = Provenance {
        source: "dicom".into(),
        image_file: String::new(),
        label_file: String::new(),
        hospital: "north".into(),
        imported_at_unix: 0,
        tool_version: "t".into(),
    };
    let refusals = [
        store
            .import_case("c1", Split::Train, &ip, &lp, "north")
            .unwrap_err(),
        store
            .import_volume("c2", Split::Train, &image, Some(&label), provenance.clone())
            .unwrap_err(),
        store
            .replace_volume(
                "c3",
                Split::Train,
                &image,
                Some(&label),
                provenance.clone(),
                "more slices",
            )
            .unwrap_err(),
        store
            .put_checkpoint("run", &serde_json::json!({"step": 1}), &[7u8; 4096])
            .unwrap_err(),
    ];
    for e in &refusals {
        assert!(matches!(e, StoreError::DiskReserve { .. }), "{e}");
        let text = format!("{e}: {}", std::error::Error::source(e).unwrap());
        assert!(
            text.contains("nothing written") && text.contains("not enough disk space"),
            "{text}"
        );
        assert!(!e.is_refusal(), "a full disk stops a batch import");
    }
    assert_eq!(
        snapshot(&store),
        before,
        "a refused write changed the store"
    );
    assert!(store.checkpoint_seqs("run").unwrap().is_empty());

    // With room again, the same writes succeed.
    store.set_reserve_bytes(0);
    assert_eq!(
        store
            .import_case("c1", Split::Train, &ip, &lp, "north")
            .unwrap(),
        ImportOutcome::Imported
    );
    assert_eq!(
        store
            .put_checkpoint("run", &serde_json::json!({"step": 1}), &[7u8; 4096])
            .unwrap(),
        1
    );
}
