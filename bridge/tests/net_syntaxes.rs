//! Say no at the door, syntax by syntax, with real files and a real peer: pynetdicom sends
//! pydicom's own test files (and dcmtk's re-encodings of its MR) each in its own transfer syntax,
//! one association per file, to the bridge's SCP on loopback.
//!
//! - every syntax in [`cosilo_bridge::door::TRANSFER_SYNTAXES`] is accepted, answered 0000, and
//!   the spooled file decodes to the same number of pixels (the SDK can use it);
//! - JPEG 2000, JPEG-LS and the SOP classes that are no volume (secondary capture, enhanced
//!   multi-frame MR) are rejected at negotiation, so the PACS never sees a success for them;
//! - pixel data shorter than rows × columns, or a JPEG whose first frame does not decode, get a
//!   failure status in the C-STORE response (and nothing is spooled);
//! - README.md lists exactly the accepted syntaxes and names the refused ones.

mod net_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cosilo_bridge::door::TRANSFER_SYNTAXES;
use dicom::pixeldata::PixelDecoder;
use net_support::{dcmtk, ensure_success, scp_config, TestScp};

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("COSILO_PYTHON") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn pydicom_files() -> Result<PathBuf> {
    let out = Command::new(python())
        .args([
            "-c",
            "import pydicom, os; print(os.path.dirname(pydicom.__file__))",
        ])
        .output()
        .context("run python to locate pydicom (scripts/setup.sh makes .venv)")?;
    ensure!(
        out.status.success(),
        "pydicom is needed in {}",
        python().display()
    );
    Ok(Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("data/test_files"))
}

/// One file's fate, as pynetdicom saw it.
#[derive(Debug, serde::Deserialize)]
struct Sent {
    file: String,
    transfer_syntax: String,
    context: String,
    status: Option<u16>,
    comment: String,
}

fn send(scp: &TestScp, files: &[PathBuf]) -> Result<BTreeMap<String, Sent>> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/send_as_is.py");
    let out = Command::new(python())
        .arg(script)
        .args(["127.0.0.1", &scp.port(), "COSILO"])
        .args(files)
        .output()?;
    ensure!(
        out.status.success(),
        "send_as_is.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut got = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let s: Sent = serde_json::from_str(line).with_context(|| line.to_string())?;
        let name = Path::new(&s.file)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        got.insert(name, s);
    }
    ensure!(got.len() == files.len(), "one answer per file: {got:?}");
    Ok(got)
}

/// Writes a copy of `from` with its first JPEG fragment cut short (it cannot decode).
fn corrupt_jpeg(from: &Path, to: &Path) -> Result<()> {
    let code = format!(
        "import pydicom\nfrom pydicom.encaps import generate_fragmented_frames, encapsulate\n\
         ds = pydicom.dcmread({from:?})\n\
         frame = b''.join(next(generate_fragmented_frames(ds.PixelData)))\n\
         ds.PixelData = encapsulate([frame[:len(frame)//3]])\n\
         ds.save_as({to:?})\n"
    );
    let out = Command::new(python()).args(["-c", &code]).output()?;
    ensure_success(&out, "corrupting a JPEG")
}

/// Writes a copy of `from` as Enhanced MR Image Storage (a multi-frame class the bridge refuses).
fn as_enhanced_mr(from: &Path, to: &Path) -> Result<()> {
    let code = format!(
        "import pydicom\nds = pydicom.dcmread({from:?})\n\
         ds.SOPClassUID = '1.2.840.10008.5.1.4.1.1.4.1'\n\
         ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID\n\
         ds.NumberOfFrames = 1\nds.save_as({to:?})\n"
    );
    let out = Command::new(python()).args(["-c", &code]).output()?;
    ensure_success(&out, "making an enhanced MR")
}

#[test]
fn accepted_and_refused_syntaxes_match_the_door_and_the_readme() -> Result<()> {
    let test_files = pydicom_files()?;
    let tmp = tempfile::tempdir()?;
    let mr = test_files.join("MR_small.dcm");
    let made = |name: &str| tmp.path().join(name);
    // dcmtk's encoders make the JPEG and deflate variants of the same real MR.
    for (opt, name) in [
        ("+eb", "mr_jpeg_baseline.dcm"),
        ("+ee", "mr_jpeg_extended.dcm"),
        ("+el", "mr_jpeg_lossless.dcm"),
        ("+e1", "mr_jpeg_lossless_sv1.dcm"),
    ] {
        let p = made(name);
        let out = dcmtk(
            "dcmcjpeg",
            &[opt, &mr.to_string_lossy(), &p.to_string_lossy()],
        )?;
        ensure_success(&out, &format!("dcmcjpeg {opt}"))?;
    }
    let p = made("mr_deflate.dcm");
    let out = dcmtk(
        "dcmconv",
        &["+td", &mr.to_string_lossy(), &p.to_string_lossy()],
    )?;
    ensure_success(&out, "dcmconv +td")?;
    corrupt_jpeg(&made("mr_jpeg_baseline.dcm"), &made("mr_jpeg_corrupt.dcm"))?;
    as_enhanced_mr(&mr, &made("mr_enhanced.dcm"))?;

    let accepted: Vec<PathBuf> = [
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_RLE.dcm",
    ]
    .iter()
    .map(|n| test_files.join(n))
    .chain(
        [
            "mr_deflate.dcm",
            "mr_jpeg_baseline.dcm",
            "mr_jpeg_lossless.dcm",
            "mr_jpeg_lossless_sv1.dcm",
        ]
        .iter()
        .map(|n| made(n)),
    )
    .collect();
    let rejected_context: Vec<PathBuf> = [
        "MR_small_jp2klossless.dcm", // JPEG 2000 lossless
        "JPEG2000.dcm",              // JPEG 2000 (and secondary capture)
        "MR_small_jpeg_ls_lossless.dcm",
        "SC_rgb_jpeg.dcm", // secondary capture: no volume
    ]
    .iter()
    .map(|n| test_files.join(n))
    // JPEG Extended with 12-bit samples (what CT/MR use it for): dicom-rs cannot decode it.
    .chain([made("mr_enhanced.dcm"), made("mr_jpeg_extended.dcm")])
    .collect();
    let failed_store: Vec<PathBuf> = vec![
        test_files.join("MR_truncated.dcm"), // pixel data shorter than rows × columns
        made("mr_jpeg_corrupt.dcm"),         // first frame does not decode
    ];

    let scp = TestScp::start(scp_config(), 0)?;
    let all: Vec<PathBuf> = accepted
        .iter()
        .chain(&rejected_context)
        .chain(&failed_store)
        .cloned()
        .collect();
    let got = send(&scp, &all)?;
    let name = |p: &PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();

    let mut proven = Vec::new();
    for f in &accepted {
        let s = &got[&name(f)];
        assert_eq!(s.context, "accepted", "{s:?}");
        assert_eq!(s.status, Some(0), "{s:?}");
        proven.push(s.transfer_syntax.clone());
    }
    for f in &rejected_context {
        let s = &got[&name(f)];
        assert_eq!(s.context, "rejected", "{s:?}");
        assert_eq!(s.status, None, "{s:?}");
    }
    for f in &failed_store {
        let s = &got[&name(f)];
        assert_eq!(s.context, "accepted", "{s:?}");
        let status = s.status.expect("a C-STORE status");
        assert!(
            (0xA900..=0xCFFF).contains(&status),
            "{}: a failure status, got {status:04X}",
            s.file
        );
        assert!(
            s.comment.contains("unusable pixel data"),
            "the PACS is told why: {s:?}"
        );
    }

    // Every spooled file decodes to 64 × 64 pixels: accepted means usable.
    let spooled: Vec<PathBuf> = scp
        .files()
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    // pydicom's MR variants share one SOP Instance UID: the spool holds one file per instance.
    let mut instances: Vec<String> = accepted
        .iter()
        .map(|p| net_support::sop_uid(p))
        .collect::<Result<_>>()?;
    instances.sort();
    instances.dedup();
    assert_eq!(spooled.len(), instances.len(), "{spooled:?}");
    for p in &spooled {
        let obj = dicom::object::open_file(p)?;
        let values = obj.decode_pixel_data()?.to_vec::<f32>()?;
        assert_eq!(values.len(), 64 * 64, "{}", p.display());
    }

    // The door's list is exactly what was proven here, and the README says the same.
    let mut door: Vec<String> = TRANSFER_SYNTAXES
        .iter()
        .map(|(u, _)| u.to_string())
        .collect();
    door.sort();
    proven.sort();
    proven.dedup();
    assert_eq!(door, proven, "every accepted syntax proven by a real file");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))?;
    for (uid, _) in TRANSFER_SYNTAXES {
        assert!(readme.contains(uid), "README.md lists {uid}");
    }
    for refused in ["JPEG 2000", "JPEG-LS", "JPEG Extended", "Enhanced"] {
        assert!(readme.contains(refused), "README.md names {refused}");
    }
    Ok(())
}
