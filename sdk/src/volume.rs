//! Volumes on a grid with a world geometry, and NIfTI-1 input/output.
//!
//! A [`Volume`] stores voxels x-fastest (`i + nx * (j + ny * k)`), the order NIfTI uses on disk, and
//! a [`Geometry`]: the grid size plus the 4×4 affine from voxel indices to world millimetres (RAS+,
//! the NIfTI convention). Everything that crosses a crate boundary in Cosilo (cohort volumes, dataset
//! store cases, SDK input and output) uses these two types, so geometry is never lost on the way.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Errors reading, writing or checking volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("cannot read NIfTI file {path}")]
    Read {
        path: String,
        #[source]
        source: nifti::NiftiError,
    },
    #[error("cannot write NIfTI file {path}")]
    Write {
        path: String,
        #[source]
        source: nifti::NiftiError,
    },
    #[error("{path}: expected a 3-D volume, found dimensions {dims:?}")]
    NotThreeD { path: String, dims: Vec<u16> },
    #[error("{path}: voxel {index} is not a finite number ({value})")]
    NonFinite {
        path: String,
        index: usize,
        value: f32,
    },
    #[error("{path}: the affine is degenerate (a zero-length or collinear voxel axis)")]
    DegenerateAffine { path: String },
    #[error("voxel count {got} does not match the grid {dims:?}")]
    Shape { dims: [usize; 3], got: usize },
}

/// The grid of a volume and where it sits in the world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Geometry {
    /// Voxels along i, j, k.
    pub dims: [usize; 3],
    /// Row-major 4×4 affine from voxel index (i, j, k, 1) to world millimetres (RAS+).
    pub affine: [[f64; 4]; 4],
}

impl Geometry {
    /// An axis-aligned grid with the given spacing and origin.
    pub fn axis_aligned(dims: [usize; 3], spacing: [f64; 3], origin: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for a in 0..3 {
            affine[a][a] = spacing[a];
            affine[a][3] = origin[a];
        }
        affine[3][3] = 1.0;
        Geometry { dims, affine }
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.dims[0] * self.dims[1] * self.dims[2]
    }

    /// True for a grid with no voxels.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Voxel spacing in millimetres: the length of each affine column.
    pub fn spacing(&self) -> [f64; 3] {
        let mut s = [0.0; 3];
        for (c, v) in s.iter_mut().enumerate() {
            *v = (0..3)
                .map(|r| self.affine[r][c] * self.affine[r][c])
                .sum::<f64>()
                .sqrt();
        }
        s
    }

    /// Volume of one voxel in mm³.
    pub fn voxel_volume(&self) -> f64 {
        let a = &self.affine;
        (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))
            .abs()
    }

    /// World position (mm) of voxel (i, j, k).
    pub fn world(&self, ijk: [f64; 3]) -> [f64; 3] {
        let mut w = [0.0; 3];
        for (r, v) in w.iter_mut().enumerate() {
            *v = self.affine[r][0] * ijk[0]
                + self.affine[r][1] * ijk[1]
                + self.affine[r][2] * ijk[2]
                + self.affine[r][3];
        }
        w
    }

    /// True when both grids have the same size and their affines agree within `tol_mm` millimetres
    /// (checked as the largest world-position difference at the grid's corners).
    pub fn same_grid(&self, other: &Geometry, tol_mm: f64) -> bool {
        if self.dims != other.dims {
            return false;
        }
        let d = self.dims.map(|n| n.saturating_sub(1) as f64);
        let corners = [
            [0.0, 0.0, 0.0],
            [d[0], 0.0, 0.0],
            [0.0, d[1], 0.0],
            [0.0, 0.0, d[2]],
            [d[0], d[1], d[2]],
        ];
        corners.iter().all(|c| {
            let a = self.world(*c);
            let b = other.world(*c);
            (0..3).all(|r| (a[r] - b[r]).abs() <= tol_mm)
        })
    }

    /// Linear index of voxel (i, j, k).
    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        i + self.dims[0] * (j + self.dims[1] * k)
    }
}

/// A scalar volume: voxels x-fastest plus their geometry.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    pub geometry: Geometry,
    pub data: Vec<T>,
}

impl<T: Copy> Volume<T> {
    /// A volume from voxels in x-fastest order; checks the count against the grid.
    pub fn new(geometry: Geometry, data: Vec<T>) -> Result<Self, VolumeError> {
        if data.len() != geometry.len() {
            return Err(VolumeError::Shape {
                dims: geometry.dims,
                got: data.len(),
            });
        }
        Ok(Volume { geometry, data })
    }

    /// A volume filled with one value.
    pub fn filled(geometry: Geometry, value: T) -> Self {
        let n = geometry.len();
        Volume {
            geometry,
            data: vec![value; n],
        }
    }

    /// The voxel at (i, j, k).
    #[inline]
    pub fn get(&self, i: usize, j: usize, k: usize) -> T {
        self.data[self.geometry.index(i, j, k)]
    }

    /// Axial slice `k` as a row-major image of `dims[1]` rows by `dims[0]` columns.
    pub fn axial_slice(&self, k: usize) -> &[T] {
        let n = self.geometry.dims[0] * self.geometry.dims[1];
        &self.data[k * n..(k + 1) * n]
    }

    /// Maps every voxel, keeping the geometry.
    pub fn map<U: Copy>(&self, f: impl Fn(T) -> U) -> Volume<U> {
        Volume {
            geometry: self.geometry.clone(),
            data: self.data.iter().map(|&v| f(v)).collect(),
        }
    }
}

fn read_header_and_data(path: &Path) -> Result<(nifti::NiftiHeader, Vec<f32>), VolumeError> {
    use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
    let p = path.display().to_string();
    let obj = ReaderOptions::new()
        .read_file(path)
        .map_err(|source| VolumeError::Read {
            path: p.clone(),
            source,
        })?;
    let header = obj.header().clone();
    let dims = header
        .dim()
        .map_err(|source| VolumeError::Read {
            path: p.clone(),
            source,
        })?
        .to_vec();
    // A trailing singleton dimension (x, y, z, 1) is still a 3-D volume.
    let rank3 = dims.len() == 3 || (dims.len() == 4 && dims[3] == 1);
    if !rank3 || dims.contains(&0) {
        return Err(VolumeError::NotThreeD { path: p, dims });
    }
    let array = obj
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|source| VolumeError::Read {
            path: p.clone(),
            source,
        })?;
    let (nx, ny, nz) = (dims[0] as usize, dims[1] as usize, dims[2] as usize);
    if array.ndim() != dims.len() {
        return Err(VolumeError::NotThreeD { path: p, dims });
    }
    let mut data = Vec::with_capacity(nx * ny * nz);
    let mut idx = ndarray::IxDyn(&vec![0; dims.len()]);
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                idx[0] = i;
                idx[1] = j;
                idx[2] = k;
                data.push(array[&idx]);
            }
        }
    }
    Ok((header, data))
}

/// The voxel-to-world affine of a NIfTI-1 header: the sform when set, else the qform quaternion,
/// else the pixdim diagonal (NIfTI-1 "method 1").
fn header_affine(h: &nifti::NiftiHeader) -> [[f64; 4]; 4] {
    let px = |i: usize| {
        let v = h.pixdim[i] as f64;
        if v > 0.0 {
            v
        } else {
            1.0
        }
    };
    if h.sform_code > 0 {
        let r = |row: [f32; 4]| row.map(|v| v as f64);
        return [r(h.srow_x), r(h.srow_y), r(h.srow_z), [0.0, 0.0, 0.0, 1.0]];
    }
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let rot = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [px(1), px(2), px(3) * qfac];
        let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        let mut m = [[0.0; 4]; 4];
        for r in 0..3 {
            for c in 0..3 {
                m[r][c] = rot[r][c] * s[c];
            }
            m[r][3] = t[r];
        }
        m[3][3] = 1.0;
        return m;
    }
    let mut m = [[0.0; 4]; 4];
    for (a, row) in m.iter_mut().enumerate().take(3) {
        row[a] = px(a + 1);
    }
    m[3][3] = 1.0;
    m
}

/// Reads a 3-D NIfTI-1 file (`.nii` or `.nii.gz`) as f32, applying the header's scaling.
/// Refuses non-finite voxels and degenerate affines with the file's name in the error.
pub fn read_nifti(path: impl AsRef<Path>) -> Result<Volume<f32>, VolumeError> {
    let path = path.as_ref();
    let p = path.display().to_string();
    let (header, data) = read_header_and_data(path)?;
    if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(VolumeError::NonFinite {
            path: p,
            index,
            value,
        });
    }
    let dims = header.dim().map_err(|source| VolumeError::Read {
        path: p.clone(),
        source,
    })?;
    let geometry = Geometry {
        dims: [dims[0] as usize, dims[1] as usize, dims[2] as usize],
        affine: header_affine(&header),
    };
    if geometry.voxel_volume() < 1e-9 || !geometry.affine.iter().flatten().all(|v| v.is_finite()) {
        return Err(VolumeError::DegenerateAffine { path: p });
    }
    Volume::new(geometry, data)
}

/// Reads a label volume: every voxel must be a non-negative integer below 256.
pub fn read_nifti_labels(path: impl AsRef<Path>) -> Result<Volume<u8>, VolumeError> {
    let path = path.as_ref();
    let v = read_nifti(path)?;
    if let Some((index, &value)) = v
        .data
        .iter()
        .enumerate()
        .find(|(_, x)| **x < 0.0 || **x > 255.0 || x.fract() != 0.0)
    {
        return Err(VolumeError::NonFinite {
            path: format!("{} (labels must be integers 0..=255)", path.display()),
            index,
            value,
        });
    }
    Ok(v.map(|x| x as u8))
}

fn header_for(geometry: &Geometry) -> nifti::NiftiHeader {
    let a = &geometry.affine;
    let spacing = geometry.spacing();
    let mut h = nifti::NiftiHeader {
        sform_code: 2, // aligned anatomical
        qform_code: 0,
        srow_x: [
            a[0][0] as f32,
            a[0][1] as f32,
            a[0][2] as f32,
            a[0][3] as f32,
        ],
        srow_y: [
            a[1][0] as f32,
            a[1][1] as f32,
            a[1][2] as f32,
            a[1][3] as f32,
        ],
        srow_z: [
            a[2][0] as f32,
            a[2][1] as f32,
            a[2][2] as f32,
            a[2][3] as f32,
        ],
        xyzt_units: 2, // millimetres
        ..Default::default()
    };
    h.pixdim = [
        1.0,
        spacing[0] as f32,
        spacing[1] as f32,
        spacing[2] as f32,
        1.0,
        1.0,
        1.0,
        1.0,
    ];
    h
}

fn write_array<A>(
    path: &Path,
    geometry: &Geometry,
    data: Vec<A>,
    write: impl FnOnce(&nifti::writer::WriterOptions, &ndarray::Array3<A>) -> nifti::Result<()>,
) -> Result<(), VolumeError> {
    let p = path.display().to_string();
    let [nx, ny, nz] = geometry.dims;
    let got = data.len();
    let array = ndarray::Array3::from_shape_vec(ndarray::ShapeBuilder::f((nx, ny, nz)), data)
        .map_err(|_| VolumeError::Shape {
            dims: geometry.dims,
            got,
        })?;
    let header = header_for(geometry);
    let options = nifti::writer::WriterOptions::new(path).reference_header(&header);
    write(&options, &array).map_err(|source| VolumeError::Write { path: p, source })
}

/// Writes an f32 volume as NIfTI-1 (`.nii.gz` compresses); the bytes depend only on the input.
pub fn write_nifti_f32(path: impl AsRef<Path>, v: &Volume<f32>) -> Result<(), VolumeError> {
    write_array(path.as_ref(), &v.geometry, v.data.clone(), |w, a| {
        w.write_nifti(a)
    })
}

/// Writes a label volume as uint8 NIfTI-1.
pub fn write_nifti_labels(path: impl AsRef<Path>, v: &Volume<u8>) -> Result<(), VolumeError> {
    write_array(path.as_ref(), &v.geometry, v.data.clone(), |w, a| {
        w.write_nifti(a)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Geometry {
        Geometry {
            dims: [5, 4, 3],
            affine: [
                [0.9, 0.1, 0.0, -10.0],
                [-0.1, 0.9, 0.0, 20.5],
                [0.0, 0.0, 2.5, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    #[test]
    fn nifti_round_trip_keeps_voxels_and_geometry() {
        let dir = tempfile::tempdir().unwrap();
        let g = oblique();
        let data: Vec<f32> = (0..g.len()).map(|i| i as f32 * 0.5 - 3.0).collect();
        let v = Volume::new(g.clone(), data).unwrap();
        let path = dir.path().join("v.nii.gz");
        write_nifti_f32(&path, &v).unwrap();
        let back = read_nifti(&path).unwrap();
        assert_eq!(back.data, v.data);
        assert!(back.geometry.same_grid(&g, 1e-5), "{:?}", back.geometry);
        // x-fastest: voxel (1,0,0) is the second element.
        assert_eq!(back.get(1, 0, 0), -2.5);
        assert_eq!(back.get(0, 1, 0), v.data[5]);

        let labels = v.map(|x| (x.abs() as u8) % 7);
        let lp = dir.path().join("l.nii");
        write_nifti_labels(&lp, &labels).unwrap();
        assert_eq!(read_nifti_labels(&lp).unwrap().data, labels.data);
    }

    #[test]
    fn same_bytes_for_same_volume() {
        let dir = tempfile::tempdir().unwrap();
        let v = Volume::filled(oblique(), 1.25f32);
        let a = dir.path().join("a.nii.gz");
        let b = dir.path().join("b.nii.gz");
        write_nifti_f32(&a, &v).unwrap();
        write_nifti_f32(&b, &v).unwrap();
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }

    #[test]
    fn refuses_nan_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Volume::filled(oblique(), 0.0f32);
        v.data[7] = f32::NAN;
        let p = dir.path().join("bad.nii.gz");
        write_nifti_f32(&p, &v).unwrap();
        let err = read_nifti(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.nii.gz") && err.contains("voxel 7"),
            "{err}"
        );
    }

    #[test]
    fn refuses_garbage_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("junk.nii");
        std::fs::write(&p, b"not a nifti file at all").unwrap();
        let err = read_nifti(&p).unwrap_err().to_string();
        assert!(err.contains("junk.nii"), "{err}");
    }

    #[test]
    fn spacing_and_same_grid() {
        let g = Geometry::axis_aligned([4, 4, 4], [2.0, 2.0, 3.0], [0.0, 0.0, 0.0]);
        assert_eq!(g.spacing(), [2.0, 2.0, 3.0]);
        assert!((g.voxel_volume() - 12.0).abs() < 1e-12);
        let mut h = g.clone();
        h.affine[0][3] = 0.5;
        assert!(!g.same_grid(&h, 0.1));
        assert!(g.same_grid(&h, 0.6));
    }
}
