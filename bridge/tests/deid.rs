//! De-identification on real sample data: the `deid-data` PyPI package (fetched with pip into a
//! cache outside git, like the setup scripts do) and pydicom's own test files.
//!
//! If the sample data cannot be fetched the tests FAIL with the command to run; they never skip.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use cosilo_bridge::deid::{
    days_between, BirthDatePolicy, DatePolicy, DeidError, Deidentifier, MappingStore,
};
use dicom::core::header::Header;
use dicom::core::value::{PrimitiveValue, Value};
use dicom::core::{DataElement, Tag, VR};
use dicom::object::{open_file, FileMetaTableBuilder, InMemDicomObject};
use sha2::{Digest, Sha256};

const DEID_DATA_VERSION: &str = "0.0.20";
const DEID_DATA_SHA256: &str = "33d455f13c82f76a39e8eb52d2808a35d7cde29c120819e246c863432281b8ed";
const SECRET: &[u8] = b"site-secret-for-tests-0123456789";

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("COSILO_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/cosilo/deid-data")
}

/// The `deid_data/data` directory of the deid-data sdist, fetched and checked once.
fn deid_data() -> PathBuf {
    let cache = cache_dir();
    let data = cache.join(format!("deid-data-{DEID_DATA_VERSION}/deid_data/data"));
    if data.join("humans/ctbrain1.dcm").is_file() {
        return data;
    }
    let how = format!(
        "{} -m pip download --no-deps deid-data=={DEID_DATA_VERSION} -d {}",
        python().display(),
        cache.display()
    );
    std::fs::create_dir_all(&cache).expect("create the deid-data cache directory");
    let tarball = cache.join(format!("deid-data-{DEID_DATA_VERSION}.tar.gz"));
    if !tarball.is_file() {
        let status = Command::new(python())
            .args(["-m", "pip", "download", "--no-deps"])
            .arg(format!("deid-data=={DEID_DATA_VERSION}"))
            .arg("-d")
            .arg(&cache)
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()) && tarball.is_file(),
            "the deid-data sample files are missing and could not be fetched; run: {how}"
        );
    }
    let bytes = std::fs::read(&tarball).expect("read the deid-data tarball");
    let sum: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        sum,
        DEID_DATA_SHA256,
        "{} has the wrong SHA-256",
        tarball.display()
    );
    let status = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&cache)
        .status()
        .expect("run tar");
    assert!(status.success(), "cannot unpack {}", tarball.display());
    assert!(data.is_dir(), "{} lacks deid_data/data", tarball.display());
    data
}

/// pydicom's bundled test file `name`.
fn pydicom_file(name: &str) -> PathBuf {
    let out = Command::new(python())
        .args([
            "-c",
            "import pydicom, os; print(os.path.dirname(pydicom.__file__))",
        ])
        .output()
        .expect("run python to locate pydicom");
    assert!(
        out.status.success(),
        "pydicom is needed: {} -m pip install pydicom==3.0.2",
        python().display()
    );
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let p = Path::new(&dir).join("data/test_files").join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

fn open(path: &Path) -> (InMemDicomObject, String) {
    let f = open_file(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let ts = f.meta().transfer_syntax().to_string();
    (f.into_inner(), ts)
}

/// Writes a de-identified dataset as a DICOM file and returns the file's bytes.
fn file_bytes(obj: &InMemDicomObject, ts: &str, dir: &Path, name: &str) -> Vec<u8> {
    let file = obj
        .clone()
        .with_meta(FileMetaTableBuilder::new().transfer_syntax(ts.trim_end_matches('\0')))
        .expect("meta");
    let path = dir.join(name);
    file.write_to_file(&path).expect("write de-identified file");
    // It must also read back.
    open_file(&path).expect("re-read de-identified file");
    std::fs::read(&path).expect("read back")
}

fn text(obj: &InMemDicomObject, tag: Tag) -> String {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

const IDENTIFYING: &[(u16, u16)] = &[
    (0x0008, 0x0050), // AccessionNumber
    (0x0008, 0x0080), // InstitutionName
    (0x0008, 0x0081), // InstitutionAddress
    (0x0008, 0x0090), // ReferringPhysicianName
    (0x0008, 0x1010), // StationName
    (0x0008, 0x1040), // InstitutionalDepartmentName
    (0x0008, 0x1048), // PhysiciansOfRecord
    (0x0008, 0x1050), // PerformingPhysicianName
    (0x0008, 0x1060), // NameOfPhysiciansReadingStudy
    (0x0008, 0x1070), // OperatorsName
    (0x0010, 0x0010), // PatientName
    (0x0010, 0x0020), // PatientID
    (0x0010, 0x0021), // IssuerOfPatientID
    (0x0010, 0x0030), // PatientBirthDate
    (0x0010, 0x1000), // OtherPatientIDs
    (0x0010, 0x1001), // OtherPatientNames
    (0x0010, 0x1040), // PatientAddress
    (0x0018, 0x1000), // DeviceSerialNumber
    (0x0020, 0x0010), // StudyID
    (0x0032, 0x1032), // RequestingPhysician
];

/// Every identifying value of `obj` (recursing into sequences): the listed attributes (and each
/// name component), every non-DICOM UID and every date; only values of 4+ characters, so that
/// a short value cannot match by chance.
fn identifying_values(obj: &InMemDicomObject, out: &mut BTreeSet<String>) {
    for elem in obj.iter() {
        let tag = elem.tag();
        if let Value::Sequence(seq) = elem.value() {
            for item in seq.items() {
                identifying_values(item, out);
            }
            continue;
        }
        let listed = IDENTIFYING
            .iter()
            .any(|&(g, e)| tag.group() == g && tag.element() == e);
        let uid = elem.vr() == VR::UI;
        let date = matches!(elem.vr(), VR::DA | VR::DT);
        if !(listed || uid || date) {
            continue;
        }
        let Ok(values) = elem.to_multi_str() else {
            continue;
        };
        for v in values.iter() {
            let v = v.trim_end_matches(['\0', ' ']).trim();
            if uid && v.starts_with("1.2.840.10008.") {
                continue;
            }
            let mut candidates = vec![v.to_string()];
            if elem.vr() == VR::PN {
                candidates.extend(v.split(['^', '=', ' ']).map(str::to_string));
            }
            for c in candidates {
                if c.len() >= 4 {
                    out.insert(c);
                }
            }
        }
    }
}

/// Values of the public, non-sequence attributes that the profile keeps (Manufacturer, ...).
fn kept_values(obj: &InMemDicomObject) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for elem in obj.iter() {
        let tag = elem.tag();
        if tag.group() % 2 == 1
            || cosilo_bridge::deid::profile_action(tag).is_some()
            || matches!(elem.vr(), VR::UI | VR::DA | VR::DT | VR::SQ)
        {
            continue;
        }
        if let Ok(v) = elem.to_str() {
            out.insert(v.trim_end_matches(['\0', ' ']).trim().to_string());
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// All sample files: deid-data's humans and cookies, pydicom's CT and MR.
fn samples() -> Vec<PathBuf> {
    let data = deid_data();
    let mut files = vec![
        data.join("humans/ctbrain1.dcm"),
        data.join("humans/ctbrain2.dcm"),
    ];
    for i in 1..=7 {
        files.push(data.join(format!("dicom-cookies/image{i}.dcm")));
    }
    files.push(pydicom_file("CT_small.dcm"));
    files.push(pydicom_file("MR_small.dcm"));
    files
}

#[test]
fn no_identifying_value_survives_in_the_output_bytes() {
    let dir = tempfile::tempdir().unwrap();
    for policy in [
        DatePolicy::Remove,
        DatePolicy::ShiftPerPatient { max_days: 365 },
    ] {
        let deid = Deidentifier::new(SECRET, policy)
            .unwrap()
            .with_unmarked_pixels_accepted(true);
        let mut checked_values = 0;
        for (n, path) in samples().iter().enumerate() {
            let (obj, ts) = open(path);
            let mut values = BTreeSet::new();
            identifying_values(&obj, &mut values);
            // A value found inside that of a kept, non-identifying attribute (InstitutionName
            // "TOSHIBA" and Manufacturer "TOSHIBA_MEC" in MR_small) cannot be checked this way.
            let kept = kept_values(&obj);
            values.retain(|v| !kept.iter().any(|k| k.contains(v.as_str())));
            assert!(
                !values.is_empty(),
                "{} has nothing to remove",
                path.display()
            );
            // The original file does contain them (the check can fail).
            let original = std::fs::read(path).unwrap();
            let present: Vec<&String> = values.iter().filter(|v| contains(&original, v)).collect();
            assert!(!present.is_empty());
            let out = deid.deidentify(&obj).expect("de-identify");
            let bytes = file_bytes(&out.object, &ts, dir.path(), &format!("{n}.dcm"));
            for v in &present {
                assert!(
                    !contains(&bytes, v),
                    "{:?}: {v:?} from {} is still in the output",
                    policy,
                    path.display()
                );
                checked_values += 1;
            }
            assert_eq!(text(&out.object, Tag(0x0012, 0x0062)), "YES");
            assert_eq!(
                text(&out.object, Tag(0x0010, 0x0020)),
                out.patient_pseudonym
            );
            assert!(out.sop_instance_uid.starts_with("2.25."));
            // No private tags remain, nor any overlay or curve group.
            for e in out.object.iter() {
                let g = e.tag().group();
                assert!(g % 2 == 0, "private {} kept", e.tag());
                assert!(!(0x5000..=0x60FF).contains(&g), "{} kept", e.tag());
            }
            // The pixel data is kept as it was.
            assert_eq!(
                obj.get(Tag(0x7FE0, 0x0010)).map(|e| e.value().clone()),
                out.object
                    .get(Tag(0x7FE0, 0x0010))
                    .map(|e| e.value().clone())
            );
        }
        assert!(checked_values > 100, "only {checked_values} values checked");
    }
}

#[test]
fn same_patient_same_pseudonym_across_runs_and_studies() {
    let data = deid_data();
    let a = Deidentifier::new(SECRET, DatePolicy::Remove)
        .unwrap()
        .with_unmarked_pixels_accepted(true);
    let b = Deidentifier::new(SECRET, DatePolicy::Remove)
        .unwrap()
        .with_unmarked_pixels_accepted(true);
    let other = Deidentifier::new(b"another-site-secret-0123456789ab", DatePolicy::Remove)
        .unwrap()
        .with_unmarked_pixels_accepted(true);
    // Cookies 1 and 4: the same PatientID, two different studies.
    let (c1, _) = open(&data.join("dicom-cookies/image1.dcm"));
    let (c4, _) = open(&data.join("dicom-cookies/image4.dcm"));
    let study = Tag(0x0020, 0x000D);
    assert_eq!(
        text(&c1, Tag(0x0010, 0x0020)),
        text(&c4, Tag(0x0010, 0x0020))
    );
    assert_ne!(text(&c1, study), text(&c4, study));
    let (a1, a4) = (a.deidentify(&c1).unwrap(), a.deidentify(&c4).unwrap());
    assert_eq!(a1.patient_pseudonym, a4.patient_pseudonym);
    assert_ne!(a1.study_uid, a4.study_uid);
    // Their original PatientNames differ, but the pseudonymous name follows the ID.
    assert_ne!(
        text(&c1, Tag(0x0010, 0x0010)),
        text(&c4, Tag(0x0010, 0x0010))
    );
    assert_eq!(
        text(&a1.object, Tag(0x0010, 0x0010)),
        text(&a4.object, Tag(0x0010, 0x0010))
    );
    // A second run (a new de-identifier, same secret): the same pseudonyms and UIDs.
    let b1 = b.deidentify(&c1).unwrap();
    assert_eq!(b1.patient_pseudonym, a1.patient_pseudonym);
    assert_eq!(b1.sop_instance_uid, a1.sop_instance_uid);
    assert_eq!(b1.study_uid, a1.study_uid);
    // Another site's secret: different pseudonyms and UIDs.
    let o1 = other.deidentify(&c1).unwrap();
    assert_ne!(o1.patient_pseudonym, a1.patient_pseudonym);
    assert_ne!(o1.sop_instance_uid, a1.sop_instance_uid);
    assert_ne!(o1.study_uid, a1.study_uid);
    // A different patient: a different pseudonym.
    let (h1, _) = open(&data.join("humans/ctbrain1.dcm"));
    assert_ne!(
        a.deidentify(&h1).unwrap().patient_pseudonym,
        a1.patient_pseudonym
    );
}

/// A CT series of `n` instances made from pydicom's CT_small, plus a SEG-like object referencing
/// it through ReferencedSeriesSequence / ReferencedInstanceSequence.
fn series_and_reference(n: usize) -> (Vec<InMemDicomObject>, InMemDicomObject) {
    let (ct, _) = open(&pydicom_file("CT_small.dcm"));
    let mut series = Vec::new();
    for i in 0..n {
        let mut o = ct.clone();
        o.put(DataElement::new(
            Tag(0x0008, 0x0018),
            VR::UI,
            PrimitiveValue::from(format!("1.2.826.0.1.3680043.8.498.{}", 1000 + i)),
        ));
        series.push(o);
    }
    let refs: Vec<InMemDicomObject> = series
        .iter()
        .map(|o| {
            InMemDicomObject::from_element_iter([
                DataElement::new(
                    Tag(0x0008, 0x1150),
                    VR::UI,
                    PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2"),
                ),
                DataElement::new(
                    Tag(0x0008, 0x1155),
                    VR::UI,
                    PrimitiveValue::from(text(o, Tag(0x0008, 0x0018))),
                ),
            ])
        })
        .collect();
    let item = InMemDicomObject::from_element_iter([
        DataElement::new(
            Tag(0x0020, 0x000E),
            VR::UI,
            PrimitiveValue::from(text(&ct, Tag(0x0020, 0x000E))),
        ),
        DataElement::new(
            Tag(0x0008, 0x114A),
            VR::SQ,
            dicom::core::value::DataSetSequence::from(refs),
        ),
    ]);
    let mut seg = ct.clone();
    seg.put(DataElement::new(
        Tag(0x0008, 0x0016),
        VR::UI,
        PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.66.4"),
    ));
    seg.put(DataElement::new(
        Tag(0x0008, 0x0018),
        VR::UI,
        PrimitiveValue::from("1.2.826.0.1.3680043.8.498.99"),
    ));
    seg.put(DataElement::new(
        Tag(0x0020, 0x000E),
        VR::UI,
        PrimitiveValue::from("1.2.826.0.1.3680043.8.498.98"),
    ));
    seg.put(DataElement::new(
        Tag(0x0008, 0x1115),
        VR::SQ,
        dicom::core::value::DataSetSequence::from(vec![item]),
    ));
    (series, seg)
}

#[test]
fn series_still_group_and_references_stay_consistent() {
    let deid = Deidentifier::new(SECRET, DatePolicy::Remove).unwrap();
    let (series, seg) = series_and_reference(4);
    let outs: Vec<_> = series.iter().map(|o| deid.deidentify(o).unwrap()).collect();
    let series_uids: BTreeSet<&String> = outs.iter().map(|o| &o.series_uid).collect();
    assert_eq!(series_uids.len(), 1, "one series in, one series out");
    let sops: BTreeSet<&String> = outs.iter().map(|o| &o.sop_instance_uid).collect();
    assert_eq!(sops.len(), 4);
    let for_uid = Tag(0x0020, 0x0052);
    assert_eq!(
        text(&outs[0].object, for_uid),
        text(&outs[3].object, for_uid)
    );
    assert_ne!(text(&outs[0].object, for_uid), text(&series[0], for_uid));

    let seg_out = deid.deidentify(&seg).unwrap();
    let rss = seg_out
        .object
        .get(Tag(0x0008, 0x1115))
        .expect("ReferencedSeriesSequence");
    let item = &rss.items().expect("items")[0];
    assert_eq!(
        &text(item, Tag(0x0020, 0x000E)),
        *series_uids.iter().next().unwrap()
    );
    let refs = item.get(Tag(0x0008, 0x114A)).unwrap().items().unwrap();
    let referenced: BTreeSet<String> = refs.iter().map(|r| text(r, Tag(0x0008, 0x1155))).collect();
    assert_eq!(referenced, sops.into_iter().cloned().collect());
    // The SOP class UIDs inside stay standard.
    assert_eq!(
        text(&refs[0], Tag(0x0008, 0x1150)),
        "1.2.840.10008.5.1.4.1.1.2"
    );
}

/// PS3.15 Table E.1-1: PatientBirthDate is `Z` in the Basic Profile and no option retains it, so
/// by default it is emptied under every date policy (a shifted birth date keeps the exact age).
#[test]
fn birth_date_is_emptied_by_default_under_every_date_policy() {
    let (mut ct, _) = open(&pydicom_file("CT_small.dcm"));
    ct.put(DataElement::new(
        Tag(0x0010, 0x0030),
        VR::DA,
        PrimitiveValue::from("19500612"),
    ));
    for policy in [
        DatePolicy::Remove,
        DatePolicy::ShiftPerPatient { max_days: 365 },
        DatePolicy::KeepYear,
    ] {
        let out = Deidentifier::new(SECRET, policy)
            .unwrap()
            .deidentify(&ct)
            .unwrap();
        assert_eq!(text(&out.object, Tag(0x0010, 0x0030)), "", "{policy:?}");
        assert!(
            out.object.element(Tag(0x0010, 0x0030)).is_ok(),
            "type 2: kept, empty"
        );
    }
}

#[test]
fn date_shift_preserves_intervals_within_a_patient() {
    let max_days = 30;
    // The birth date follows the shift only when the site asks for it (beyond PS3.15).
    let deid = Deidentifier::new(SECRET, DatePolicy::ShiftPerPatient { max_days })
        .unwrap()
        .with_birth_date(BirthDatePolicy::FollowDatePolicy);
    let (ct, _) = open(&pydicom_file("CT_small.dcm"));
    let dates = [("19500612", "20040119"), ("19500612", "20051231")];
    let mut shifted = Vec::new();
    for (birth, study) in dates {
        let mut o = ct.clone();
        o.put(DataElement::new(
            Tag(0x0010, 0x0030),
            VR::DA,
            PrimitiveValue::from(birth),
        ));
        o.put(DataElement::new(
            Tag(0x0008, 0x0020),
            VR::DA,
            PrimitiveValue::from(study),
        ));
        let out = deid.deidentify(&o).unwrap();
        let b = text(&out.object, Tag(0x0010, 0x0030));
        let s = text(&out.object, Tag(0x0008, 0x0020));
        assert_ne!(s, study);
        // Age at the study is kept.
        assert_eq!(days_between(&b, &s), days_between(birth, study));
        let shift = days_between(study, &s).unwrap();
        assert!((-(max_days as i64)..=-1).contains(&shift), "shift {shift}");
        shifted.push(s);
    }
    // Follow-up interval is kept.
    assert_eq!(
        days_between(&shifted[0], &shifted[1]),
        days_between(dates[0].1, dates[1].1)
    );
    // KeepYear: the year only.
    let keep = Deidentifier::new(SECRET, DatePolicy::KeepYear).unwrap();
    let mut o = ct.clone();
    o.put(DataElement::new(
        Tag(0x0008, 0x0020),
        VR::DA,
        PrimitiveValue::from("20040119"),
    ));
    let out = keep.deidentify(&o).unwrap();
    assert_eq!(text(&out.object, Tag(0x0008, 0x0020)), "20040101");
    assert_eq!(text(&out.object, Tag(0x0028, 0x0303)), "MODIFIED");
}

#[test]
fn burned_in_and_unmarked_pixels_are_refused() {
    let data = deid_data();
    let strict = Deidentifier::new(SECRET, DatePolicy::Remove).unwrap();
    // Secondary capture with no BurnedInAnnotation: refused by default.
    let (sc, _) = open(&data.join("humans/ctbrain1.dcm"));
    match strict.deidentify(&sc) {
        Err(DeidError::BurnedIn { reason, .. }) => assert!(reason.contains("BurnedInAnnotation")),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Any instance that says YES: refused even when unmarked pixels are accepted.
    let lenient = Deidentifier::new(SECRET, DatePolicy::Remove)
        .unwrap()
        .with_unmarked_pixels_accepted(true);
    let (mut ct, _) = open(&pydicom_file("CT_small.dcm"));
    assert!(lenient.deidentify(&ct).is_ok());
    ct.put(DataElement::new(
        Tag(0x0028, 0x0301),
        VR::CS,
        PrimitiveValue::from("YES"),
    ));
    assert!(matches!(
        lenient.deidentify(&ct),
        Err(DeidError::BurnedIn { .. })
    ));
}

#[test]
fn mapping_store_reverses_pseudonyms_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (ct, _) = open(&pydicom_file("CT_small.dcm"));
    let original_series = text(&ct, Tag(0x0020, 0x000E));
    let original_patient = text(&ct, Tag(0x0010, 0x0020));
    let out = {
        let deid = Deidentifier::new(SECRET, DatePolicy::Remove)
            .unwrap()
            .with_mapping(MappingStore::open(dir.path()).unwrap());
        let out = deid.deidentify(&ct).unwrap();
        // Idempotent: the same instance again adds nothing.
        let n = deid.mapping().unwrap().len();
        deid.deidentify(&ct).unwrap();
        assert_eq!(deid.mapping().unwrap().len(), n);
        out
    };
    let reopened = MappingStore::open(dir.path()).unwrap();
    assert_eq!(
        reopened.original_uid(&out.series_uid),
        Some(original_series)
    );
    assert_eq!(
        reopened.original_patient(&out.patient_pseudonym),
        Some(original_patient)
    );
    // A torn final line (crash mid-append) is ignored.
    let path = dir.path().join(MappingStore::FILE_NAME);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(b"{\"p\":\"uid:2.25.1");
    std::fs::write(&path, bytes).unwrap();
    assert!(MappingStore::open(dir.path()).is_ok());
}

#[test]
fn secret_too_short_is_refused() {
    assert!(matches!(
        Deidentifier::new(b"short", DatePolicy::Remove),
        Err(DeidError::SecretTooShort { len: 5 })
    ));
}

/// The mapping holds re-identification data and the key makes every pseudonym: both 0600, and a
/// looser mode is refused (like the federation's signing key), never silently used.
#[cfg(unix)]
#[test]
fn mapping_is_created_0600_and_loose_key_or_mapping_files_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mapping = MappingStore::open(dir.path()).unwrap();
    let mode = std::fs::metadata(mapping.path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "pseudonyms.jsonl mode {mode:o}");
    drop(mapping);
    let path = dir.path().join(MappingStore::FILE_NAME);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert!(matches!(
        MappingStore::open(dir.path()),
        Err(DeidError::Permissions { mode: 0o644, .. })
    ));

    let key = dir.path().join("deid.key");
    std::fs::write(&key, SECRET).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Deidentifier::from_key_file(&key, DatePolicy::Remove).unwrap_err();
    assert!(
        matches!(err, DeidError::Permissions { mode: 0o644, .. }),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Deidentifier::from_key_file(&key, DatePolicy::Remove).is_ok());
}
