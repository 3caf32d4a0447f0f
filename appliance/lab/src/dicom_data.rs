//! `cosilo data dicom`: DICOM image series to exercise the PACS bridge and the SDK's DICOM path,
//! written with [`cosilo_sdk::dicom::write_series`]:
//!
//! - a real head CT: InVesalius' `Cranium.inv3` example (Debian `invesalius-examples`, fetched by
//!   [`crate::fetch::INVESALIUS_CT`]), 108 axial slices of 256 × 256 int16 HU at
//!   0.957 × 0.957 × 1.5 mm, as 108 CT Image Storage instances;
//! - optionally an MR series from a cohort case (the first held-out case of the first hospital),
//!   as MR Image Storage instances carrying the case's (fake) patient name and ID.
//!
//! Both carry plausible, fictitious patient names, IDs, birth dates and accession numbers, so the
//! bridge's de-identification has something to remove.
//!
//! The `.inv3` file is a gzip'd tar holding `main.plist` (shape, dtype and spacing of the volume)
//! and `matrix.dat` (the raw voxels, C order `[slice][row][column]`, little-endian int16). The
//! layout is taken as DICOM's axial one: columns toward the patient's left, rows toward
//! posterior, slices from inferior to superior (the head's cross-section shrinks toward the last
//! slices, the vertex); the series is centred on the origin.

use std::io::Read;
use std::path::{Path, PathBuf};

use cosilo_sdk::dicom::{write_series, DicomError, Modality, SeriesMeta};
use cosilo_sdk::volume::{read_nifti, VolumeError};
use cosilo_sdk::{Geometry, Volume};

use crate::cohort::{CohortError, Manifest};
use crate::fetch::{cached_path, FetchError, INVESALIUS_CT};
use cosilo_store::Split;

/// Failures building the DICOM data.
#[derive(Debug, thiserror::Error)]
pub enum DicomDataError {
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Archive { path: PathBuf, reason: String },
    #[error("cannot write the DICOM series")]
    Dicom(#[from] DicomError),
    #[error(transparent)]
    Cohort(#[from] CohortError),
    #[error("cannot read the cohort case image")]
    Volume(#[from] VolumeError),
    #[error("the cohort in {dir} has no held-out case")]
    NoTestCase { dir: PathBuf },
}

/// What [`write_dicom_data`] wrote.
#[derive(Debug, Clone)]
pub struct DicomDataReport {
    pub ct_dir: PathBuf,
    pub ct_files: usize,
    /// The MR series folder and the cohort case it came from.
    pub mr: Option<(PathBuf, String, usize)>,
}

/// Members of a tar archive (ustar), read whole: `(name, bytes)` for each regular file whose
/// name ends with one of `wanted`.
fn tar_members(
    mut r: impl Read,
    wanted: &[&str],
    path: &Path,
) -> Result<Vec<(String, Vec<u8>)>, DicomDataError> {
    let bad = |reason: String| DicomDataError::Archive {
        path: path.to_path_buf(),
        reason,
    };
    let read_err = |source| DicomDataError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    let mut header = [0u8; 512];
    loop {
        if let Err(e) = r.read_exact(&mut header) {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                break;
            }
            return Err(read_err(e));
        }
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let field = |a: usize, b: usize| {
            let s = &header[a..b];
            let end = s.iter().position(|&c| c == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).trim().to_string()
        };
        let name = field(0, 100);
        let size = u64::from_str_radix(&field(124, 136), 8)
            .map_err(|_| bad(format!("bad size field for member {name:?}")))?;
        let kind = header[156];
        let padded = size.div_ceil(512) * 512;
        if (kind == b'0' || kind == 0) && wanted.iter().any(|w| name.ends_with(w)) {
            let mut data = vec![0u8; size as usize];
            r.read_exact(&mut data).map_err(read_err)?;
            std::io::copy(&mut (&mut r).take(padded - size), &mut std::io::sink())
                .map_err(read_err)?;
            out.push((name, data));
        } else {
            std::io::copy(&mut (&mut r).take(padded), &mut std::io::sink()).map_err(read_err)?;
        }
    }
    Ok(out)
}

/// The numbers inside the plist `<array>` that follows `<key>{key}</key>`.
fn plist_numbers(plist: &str, key: &str) -> Option<Vec<f64>> {
    let start = plist.find(&format!("<key>{key}</key>"))?;
    let rest = &plist[start..];
    let a = rest.find("<array>")?;
    let b = rest.find("</array>")?;
    let body = &rest[a + 7..b];
    let mut v = Vec::new();
    for part in body.split('<') {
        if let Some((tag, value)) = part.split_once('>') {
            if tag == "real" || tag == "integer" {
                v.push(value.trim().parse().ok()?);
            }
        }
    }
    Some(v)
}

/// Reads InVesalius' `Cranium.inv3` as a CT volume in HU (see the module docs for the layout).
pub fn read_cranium_ct(inv3: &Path) -> Result<Volume<f32>, DicomDataError> {
    let file = std::fs::File::open(inv3).map_err(|source| DicomDataError::Read {
        path: inv3.to_path_buf(),
        source,
    })?;
    let members = tar_members(
        flate2::read::GzDecoder::new(std::io::BufReader::new(file)),
        &["main.plist", "matrix.dat"],
        inv3,
    )?;
    let bad = |reason: String| DicomDataError::Archive {
        path: inv3.to_path_buf(),
        reason,
    };
    let get = |suffix: &str| {
        members
            .iter()
            .find(|(n, _)| n.ends_with(suffix))
            .map(|(_, d)| d)
            .ok_or_else(|| bad(format!("no {suffix} in the archive")))
    };
    let plist = String::from_utf8_lossy(get("main.plist")?).into_owned();
    let matrix = get("matrix.dat")?;
    if !plist.contains("<string>int16</string>") {
        return Err(bad("main.plist does not say dtype int16".into()));
    }
    let shape = plist_numbers(&plist, "shape").filter(|s| s.len() == 3);
    let spacing = plist_numbers(&plist, "spacing").filter(|s| s.len() == 3);
    let (Some(shape), Some(spacing)) = (shape, spacing) else {
        return Err(bad("main.plist lacks a 3-value shape or spacing".into()));
    };
    let [nz, ny, nx] = [shape[0], shape[1], shape[2]].map(|v| v as usize);
    if matrix.len() != nx * ny * nz * 2 {
        return Err(bad(format!(
            "matrix.dat has {} bytes for shape {nz} × {ny} × {nx} int16",
            matrix.len()
        )));
    }
    let data: Vec<f32> = matrix
        .chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32)
        .collect();
    // DICOM axial (LPS rows +x, columns +y), centred: RAS columns (-sx, -sy, +sz).
    let half = |n: usize, s: f64| (n as f64 - 1.0) / 2.0 * s;
    let mut affine = [[0.0; 4]; 4];
    affine[0][0] = -spacing[0];
    affine[1][1] = -spacing[1];
    affine[2][2] = spacing[2];
    affine[0][3] = half(nx, spacing[0]);
    affine[1][3] = half(ny, spacing[1]);
    affine[2][3] = -half(nz, spacing[2]);
    affine[3][3] = 1.0;
    Volume::new(
        Geometry {
            dims: [nx, ny, nz],
            affine,
        },
        data,
    )
    .map_err(|e| bad(e.to_string()))
}

/// The real CT's series metadata: a fictitious patient.
pub fn ct_meta() -> SeriesMeta {
    let mut m = SeriesMeta::new(Modality::Ct, "cosilo-data-dicom/ct-cranium");
    m.patient_name = "Moreira^Helena^Sofia".into();
    m.patient_id = "PM-0051-2012".into();
    m.patient_birth_date = "19580312".into();
    m.patient_sex = "F".into();
    m.study_date = "20120914".into();
    m.study_time = "151208".into();
    m.study_id = "CT0051".into();
    m.accession_number = "A2012091401".into();
    m.study_description = "CT HEAD WITHOUT CONTRAST".into();
    m.referring_physician_name = "Tavares^Rui".into();
    m.series_number = 2;
    m.series_description = "Head 1.5 mm (InVesalius Cranium example)".into();
    m.institution_name = "Hospital Sao Lucas".into();
    m
}

/// Writes the real CT series into `<out>/ct-cranium/` and, with a cohort folder, the first
/// hospital's first held-out case as an MR series into `<out>/mr-<case id>/`.
pub fn write_dicom_data(
    cache: &Path,
    out: &Path,
    cohort: Option<&Path>,
) -> Result<DicomDataReport, DicomDataError> {
    let inv3 = cached_path(cache, &INVESALIUS_CT, &INVESALIUS_CT.files[0]);
    crate::fetch::locate_source(cache, &INVESALIUS_CT)?;
    let ct = read_cranium_ct(&inv3)?;
    let ct_dir = out.join("ct-cranium");
    let ct_files = write_series(&ct, &ct_meta(), &ct_dir)?.len();
    let mr = match cohort {
        None => None,
        Some(dir) => {
            let manifest = Manifest::read(dir)?;
            let case = manifest
                .cases
                .iter()
                .find(|c| c.split == Split::Test)
                .ok_or_else(|| DicomDataError::NoTestCase {
                    dir: dir.to_path_buf(),
                })?;
            let image = read_nifti(case.image_path(dir))?;
            let mut meta = SeriesMeta::new(
                Modality::Mr,
                format!("cosilo-data-dicom/mr/{}/{}", manifest.seed, case.case_id),
            );
            meta.patient_name = case.patient_name.clone();
            meta.patient_id = case.patient_id.clone();
            meta.patient_birth_date = "19640502".into();
            meta.patient_sex = "M".into();
            meta.accession_number = format!("MR{}", manifest.seed);
            meta.study_description = "MR BRAIN WITH CONTRAST".into();
            meta.referring_physician_name = "Lindqvist^Anna".into();
            meta.series_number = 5;
            meta.series_description = format!("T1 3D (simulated cohort case {})", case.case_id);
            meta.institution_name = format!("Cosilo cohort hospital {}", case.hospital);
            let dir = out.join(format!("mr-{}", case.case_id));
            let n = write_series(&image, &meta, &dir)?.len();
            Some((dir, case.case_id.clone(), n))
        }
    };
    Ok(DicomDataReport {
        ct_dir,
        ct_files,
        mr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A ustar member header + data padded to 512 bytes.
    fn member(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
        h[156] = b'0';
        h[257..262].copy_from_slice(b"ustar");
        let mut v = h.to_vec();
        v.extend_from_slice(data);
        v.resize(512 + data.len().div_ceil(512) * 512, 0);
        v
    }

    const PLIST: &str = "<plist><dict><key>matrix</key><dict><key>dtype</key><string>int16</string>\
        <key>shape</key><array><integer>2</integer><integer>3</integer><integer>4</integer></array>\
        </dict><key>spacing</key><array><real>0.5</real><real>0.75</real><real>2.0</real></array></dict></plist>";

    #[test]
    fn inv3_archive_becomes_a_ct_volume() {
        let values: Vec<i16> = (0..24).map(|v| v * 100 - 1024).collect();
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut tar = member("tmpx/main.plist", PLIST.as_bytes());
        tar.extend(member("tmpx/surface_0.vtp", b"ignored"));
        tar.extend(member("tmpx/matrix.dat", &raw));
        tar.extend([0u8; 1024]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.inv3");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();

        let v = read_cranium_ct(&path).unwrap();
        assert_eq!(v.geometry.dims, [4, 3, 2]);
        assert_eq!(v.geometry.spacing(), [0.5, 0.75, 2.0]);
        assert_eq!(v.data, values.iter().map(|&x| x as f32).collect::<Vec<_>>());
        // LPS axial: i toward the left (RAS -x), j posterior (RAS -y), k superior; centred.
        assert!(v.geometry.affine[0][0] < 0.0 && v.geometry.affine[1][1] < 0.0);
        let centre = v.geometry.world([1.5, 1.0, 0.5]);
        assert!(centre.iter().all(|c| c.abs() < 1e-9), "{centre:?}");

        // Truncated voxels are refused with the reason.
        let mut short = member("tmpx/main.plist", PLIST.as_bytes());
        short.extend(member("tmpx/matrix.dat", &raw[..40]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&short).unwrap();
        std::fs::write(&path, gz.finish().unwrap()).unwrap();
        let err = read_cranium_ct(&path).unwrap_err().to_string();
        assert!(err.contains("40 bytes"), "{err}");
    }

    #[test]
    fn ct_metadata_has_identifiers_to_remove() {
        let m = ct_meta();
        assert!(!m.patient_name.is_empty() && !m.patient_id.is_empty());
        assert!(!m.accession_number.is_empty() && !m.patient_birth_date.is_empty());
    }
}
