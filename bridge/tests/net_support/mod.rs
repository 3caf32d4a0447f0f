//! Shared helpers of the `net_*` tests: small synthetic CT/MR/SEG files written with dicom-rs,
//! dcmtk tool runners (with `TCP_NODELAY=1`, see docs/DEPENDENCIES.md), an SCP on a free loopback
//! port spooling into a temp dir, and file listings of the spool.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cosilo_bridge::scp::{self, ScpConfig, ScpHandle, SpoolSink};
use dicom::core::{DataElement, PrimitiveValue, VR};
use dicom::dictionary_std::tags;
use dicom::object::{FileMetaTableBuilder, InMemDicomObject};

pub const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
pub const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
pub const SEG: &str = "1.2.840.10008.5.1.4.1.1.66.4";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

/// What a synthetic series looks like.
pub struct SeriesSpec<'a> {
    pub sop_class: &'a str,
    pub modality: &'a str,
    pub patient_id: &'a str,
    pub study_uid: &'a str,
    pub series_uid: &'a str,
    pub study_date: &'a str,
    pub description: &'a str,
    pub slices: usize,
    pub size: usize,
}

fn put(o: &mut InMemDicomObject, tag: dicom::core::Tag, vr: VR, v: &str) {
    o.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
}

/// The data set of slice `i` of `s` (16-bit signed pixels, a gradient that depends on `i`).
pub fn slice_dataset(s: &SeriesSpec, i: usize) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    put(&mut o, tags::SOP_CLASS_UID, VR::UI, s.sop_class);
    put(
        &mut o,
        tags::SOP_INSTANCE_UID,
        VR::UI,
        &format!("{}.{}", s.series_uid, i + 1),
    );
    put(&mut o, tags::STUDY_DATE, VR::DA, s.study_date);
    put(&mut o, tags::MODALITY, VR::CS, s.modality);
    put(&mut o, tags::STUDY_DESCRIPTION, VR::LO, s.description);
    put(&mut o, tags::PATIENT_NAME, VR::PN, "Test^Patient");
    put(&mut o, tags::PATIENT_ID, VR::LO, s.patient_id);
    put(&mut o, tags::BODY_PART_EXAMINED, VR::CS, "CHEST");
    put(&mut o, tags::STUDY_INSTANCE_UID, VR::UI, s.study_uid);
    put(&mut o, tags::SERIES_INSTANCE_UID, VR::UI, s.series_uid);
    put(&mut o, tags::SERIES_NUMBER, VR::IS, "1");
    put(&mut o, tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string());
    put(
        &mut o,
        tags::IMAGE_POSITION_PATIENT,
        VR::DS,
        &format!("0\\0\\{}", i),
    );
    put(
        &mut o,
        tags::IMAGE_ORIENTATION_PATIENT,
        VR::DS,
        "1\\0\\0\\0\\1\\0",
    );
    put(&mut o, tags::PIXEL_SPACING, VR::DS, "0.7\\0.7");
    put(&mut o, tags::SLICE_THICKNESS, VR::DS, "1");
    put(
        &mut o,
        tags::PHOTOMETRIC_INTERPRETATION,
        VR::CS,
        "MONOCHROME2",
    );
    o.put(DataElement::new(
        tags::SAMPLES_PER_PIXEL,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    o.put(DataElement::new(
        tags::ROWS,
        VR::US,
        PrimitiveValue::from(s.size as u16),
    ));
    o.put(DataElement::new(
        tags::COLUMNS,
        VR::US,
        PrimitiveValue::from(s.size as u16),
    ));
    o.put(DataElement::new(
        tags::BITS_ALLOCATED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    o.put(DataElement::new(
        tags::BITS_STORED,
        VR::US,
        PrimitiveValue::from(16u16),
    ));
    o.put(DataElement::new(
        tags::HIGH_BIT,
        VR::US,
        PrimitiveValue::from(15u16),
    ));
    o.put(DataElement::new(
        tags::PIXEL_REPRESENTATION,
        VR::US,
        PrimitiveValue::from(1u16),
    ));
    put(&mut o, tags::RESCALE_INTERCEPT, VR::DS, "-1024");
    put(&mut o, tags::RESCALE_SLOPE, VR::DS, "1");
    let mut px = Vec::with_capacity(s.size * s.size * 2);
    for y in 0..s.size {
        for x in 0..s.size {
            let v = ((x * 7 + y * 13 + i * 31) % 2000) as i16 - 100;
            px.extend_from_slice(&v.to_le_bytes());
        }
    }
    o.put(DataElement::new(
        tags::PIXEL_DATA,
        VR::OW,
        PrimitiveValue::from(px),
    ));
    o
}

/// Writes the series as DICOM files (explicit VR LE) into `dir`; returns the paths in order.
pub fn write_series(dir: &Path, s: &SeriesSpec) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for i in 0..s.slices {
        let f = slice_dataset(s, i)
            .with_meta(FileMetaTableBuilder::new().transfer_syntax(EXPLICIT_LE))?;
        let p = dir.join(format!("{}-{:04}.dcm", s.modality, i));
        f.write_to_file(&p)?;
        out.push(p);
    }
    Ok(out)
}

/// A small CT series (`slices` × 64² pixels).
pub fn ct_spec<'a>(study_uid: &'a str, series_uid: &'a str, slices: usize) -> SeriesSpec<'a> {
    SeriesSpec {
        sop_class: CT,
        modality: "CT",
        patient_id: "P001",
        study_uid,
        series_uid,
        study_date: "20240105",
        description: "CT CHEST",
        slices,
        size: 64,
    }
}

/// Runs a dcmtk tool with `TCP_NODELAY=1`.
pub fn dcmtk(tool: &str, args: &[&str]) -> Result<Output> {
    Command::new(tool)
        .env("TCP_NODELAY", "1")
        .args(args)
        .output()
        .with_context(|| format!("running {tool} (apt-get install dcmtk)"))
}

/// An SCP spooling into a temp dir, on a free loopback port.
pub struct TestScp {
    pub handle: Option<ScpHandle>,
    pub spool: tempfile::TempDir,
}

impl TestScp {
    pub fn start(cfg: ScpConfig, reserve_bytes: u64) -> Result<TestScp> {
        let spool = tempfile::tempdir()?;
        let sink = SpoolSink::new(spool.path(), reserve_bytes)?;
        let handle = scp::serve(cfg, Arc::new(sink))?;
        Ok(TestScp {
            handle: Some(handle),
            spool,
        })
    }

    pub fn port(&self) -> String {
        self.handle
            .as_ref()
            .map(|h| h.local_addr().port().to_string())
            .unwrap_or_default()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    /// Every file under the spool (including any temp file), except the journal's segments.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![self.spool.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && p.ends_with(cosilo_bridge::journal::JOURNAL_DIR) {
                    continue;
                }
                if p.is_dir() {
                    stack.push(p);
                } else {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }
}

/// Config for a test SCP: AE `COSILO`, loopback, free port, short timeouts.
pub fn scp_config() -> ScpConfig {
    ScpConfig {
        read_timeout: std::time::Duration::from_secs(10),
        grace_period: std::time::Duration::from_secs(2),
        ..ScpConfig::default()
    }
}

/// PixelData bytes of a DICOM file.
pub fn pixel_bytes(p: &Path) -> Result<Vec<u8>> {
    let o = dicom::object::open_file(p)?;
    Ok(o.element(tags::PIXEL_DATA)?.to_bytes()?.into_owned())
}

/// SOPInstanceUID of a DICOM file.
pub fn sop_uid(p: &Path) -> Result<String> {
    let o = dicom::object::open_file(p)?;
    Ok(o.element(tags::SOP_INSTANCE_UID)?
        .to_str()?
        .trim_end_matches('\0')
        .to_string())
}

pub fn ensure_success(o: &Output, what: &str) -> Result<()> {
    if !o.status.success() {
        bail!(
            "{what} failed: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}
