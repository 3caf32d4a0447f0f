//! Helpers shared by the SDK's DICOM integration tests: phantom volumes, an oblique geometry, the
//! Python reference scripts (pydicom, highdicom) and dciodvfy.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cosilo_sdk::{Geometry, Volume};

/// The Python with pydicom and highdicom: `COSILO_PYTHON`, else the workspace's `.venv`.
pub fn python() -> PathBuf {
    std::env::var_os("COSILO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Runs `sdk/tests/py/seg_reference.py` with `args`; panics with its stderr on failure.
pub fn reference(args: &[&str]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/seg_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    assert!(
        out.status.success(),
        "seg_reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("bad JSON from the script ({e}): {stdout}"))
}

/// dciodvfy's messages for `path`: (error lines, warning lines).
pub fn dciodvfy(path: &Path) -> (Vec<String>, Vec<String>) {
    let out = Command::new("dciodvfy")
        .arg(path)
        .output()
        .expect("dciodvfy (dicom3tools) must be installed: apt-get install dicom3tools");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors = text
        .lines()
        .filter(|l| l.starts_with("Error"))
        .map(String::from)
        .collect();
    let warnings = text
        .lines()
        .filter(|l| l.starts_with("Warning"))
        .map(String::from)
        .collect();
    (errors, warnings)
}

/// A grid rotated about two axes, anisotropic, off-centre: voxel axes not aligned with the world.
pub fn oblique_geometry(dims: [usize; 3], spacing: [f64; 3]) -> Geometry {
    let (a, b) = (0.35f64, -0.2f64); // radians about z, then about x
    let rz = [
        [a.cos(), -a.sin(), 0.0],
        [a.sin(), a.cos(), 0.0],
        [0.0, 0.0, 1.0],
    ];
    let rx = [
        [1.0, 0.0, 0.0],
        [0.0, b.cos(), -b.sin()],
        [0.0, b.sin(), b.cos()],
    ];
    let mut affine = [[0.0; 4]; 4];
    for r in 0..3 {
        for c in 0..3 {
            let m: f64 = (0..3).map(|t| rx[r][t] * rz[t][c]).sum();
            affine[r][c] = m * spacing[c];
        }
    }
    affine[0][3] = -41.25;
    affine[1][3] = 17.5;
    affine[2][3] = -63.125;
    affine[3][3] = 1.0;
    Geometry { dims, affine }
}

/// A CT-like phantom in whole HU: air, a water ellipsoid, a bone shell, a gradient.
pub fn ct_phantom(geometry: Geometry) -> Volume<f32> {
    let [nx, ny, nz] = geometry.dims;
    let mut data = Vec::with_capacity(geometry.len());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let x = (i as f64 + 0.5) / nx as f64 - 0.5;
                let y = (j as f64 + 0.5) / ny as f64 - 0.5;
                let z = (k as f64 + 0.5) / nz as f64 - 0.5;
                let r = (x * x / 0.16 + y * y / 0.2 + z * z / 0.2).sqrt();
                let v = if r > 1.0 {
                    -1024.0
                } else if r > 0.85 {
                    1200.0 + (i as f64 * 7.0) % 300.0
                } else {
                    (j as f64 * 3.0 - k as f64 * 5.0 + i as f64).round() - 40.0
                };
                data.push(v as f32);
            }
        }
    }
    Volume::new(geometry, data).expect("phantom fills its grid")
}

/// Labels 1..=3 in nested / neighbouring ellipsoids (no overlap by construction), 0 elsewhere.
pub fn label_phantom(geometry: Geometry) -> Volume<u8> {
    let [nx, ny, nz] = geometry.dims;
    let mut data = Vec::with_capacity(geometry.len());
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let x = (i as f64 + 0.5) / nx as f64 - 0.5;
                let y = (j as f64 + 0.5) / ny as f64 - 0.5;
                let z = (k as f64 + 0.5) / nz as f64 - 0.5;
                let r = (x * x + y * y + z * z).sqrt();
                let l = if (x - 0.15).powi(2) + (y + 0.1).powi(2) + (z * 0.5).powi(2) < 0.01 {
                    3
                } else if r < 0.2 {
                    1
                } else if r < 0.4 {
                    2
                } else {
                    0
                };
                data.push(l);
            }
        }
    }
    Volume::new(geometry, data).expect("phantom fills its grid")
}

/// Largest difference between two affines.
pub fn affine_diff(a: &Geometry, b: &Geometry) -> f64 {
    (0..4)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (a.affine[r][c] - b.affine[r][c]).abs())
        .fold(0.0, f64::max)
}
