//! Grid maths for the cohort builder: affine inversion, resampling through world coordinates,
//! cropping that keeps the world affine, separable Gaussian blur and binary morphology.
//!
//! Every function keeps the invariant of [`Geometry`]: a voxel's world position (its affine applied
//! to its index) names the same anatomy before and after the operation.

use cosilo_sdk::volume::{Geometry, Volume};

/// A row-major 4×4 affine.
pub type Affine = [[f64; 4]; 4];

/// The product `a · b`.
pub fn compose(a: &Affine, b: &Affine) -> Affine {
    let mut m = [[0.0; 4]; 4];
    for (r, row) in m.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|t| a[r][t] * b[t][c]).sum();
        }
    }
    m
}

/// The inverse of an affine whose last row is (0, 0, 0, 1); `None` when its 3×3 part is singular.
pub fn invert(a: &Affine) -> Option<Affine> {
    let m = |r: usize, c: usize| a[r][c];
    let det = m(0, 0) * (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1))
        - m(0, 1) * (m(1, 0) * m(2, 2) - m(1, 2) * m(2, 0))
        + m(0, 2) * (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0));
    if det.abs() < 1e-12 || !det.is_finite() {
        return None;
    }
    let mut inv = [[0.0; 4]; 4];
    // Adjugate (cofactors transposed) over the determinant.
    for (r, row) in inv.iter_mut().enumerate().take(3) {
        for (c, v) in row.iter_mut().enumerate().take(3) {
            let (r1, r2) = ((c + 1) % 3, (c + 2) % 3);
            let (c1, c2) = ((r + 1) % 3, (r + 2) % 3);
            *v = (m(r1, c1) * m(r2, c2) - m(r1, c2) * m(r2, c1)) / det;
        }
    }
    for row in inv.iter_mut().take(3) {
        row[3] = -(0..3).map(|c| row[c] * a[c][3]).sum::<f64>();
    }
    inv[3][3] = 1.0;
    Some(inv)
}

/// Applies an affine to a point.
#[inline]
pub fn apply(a: &Affine, p: [f64; 3]) -> [f64; 3] {
    [
        a[0][0] * p[0] + a[0][1] * p[1] + a[0][2] * p[2] + a[0][3],
        a[1][0] * p[0] + a[1][1] * p[1] + a[1][2] * p[2] + a[1][3],
        a[2][0] * p[0] + a[2][1] * p[1] + a[2][2] * p[2] + a[2][3],
    ]
}

/// The voxel axis that runs most nearly along world axis `r`.
fn axis_along_world(g: &Geometry, r: usize) -> usize {
    (0..3)
        .max_by(|&x, &y| g.affine[r][x].abs().total_cmp(&g.affine[r][y].abs()))
        .unwrap_or(r)
}

/// The world axis that voxel axis `c` runs most nearly along.
pub fn world_axis_of(g: &Geometry, c: usize) -> usize {
    (0..3)
        .max_by(|&x, &y| g.affine[x][c].abs().total_cmp(&g.affine[y][c].abs()))
        .unwrap_or(c)
}

/// For each world axis (R, A, S) the spacing of the voxel axis that runs most nearly along it.
/// For a grid whose axes are a permutation (with flips) of the world axes this is exact.
pub fn spacing_along_world_axes(g: &Geometry) -> [f64; 3] {
    let sp = g.spacing();
    [0, 1, 2].map(|r| sp[axis_along_world(g, r)])
}

/// World-space bounding box of a grid's voxel centres.
pub fn world_box(g: &Geometry) -> ([f64; 3], [f64; 3]) {
    let d = g.dims.map(|n| n.saturating_sub(1) as f64);
    let mut lo = [f64::INFINITY; 3];
    let mut hi = [f64::NEG_INFINITY; 3];
    for ci in 0..8 {
        let corner = [
            if ci & 1 == 0 { 0.0 } else { d[0] },
            if ci & 2 == 0 { 0.0 } else { d[1] },
            if ci & 4 == 0 { 0.0 } else { d[2] },
        ];
        let w = g.world(corner);
        for a in 0..3 {
            lo[a] = lo[a].min(w[a]);
            hi[a] = hi[a].max(w[a]);
        }
    }
    (lo, hi)
}

/// An axis-aligned RAS grid with the given spacing covering every voxel centre of `src`; its
/// first voxel sits on the lowest world corner of `src`, so with the source's own spacing along
/// each world axis the new voxel centres coincide with the old ones (a lossless reorientation).
pub fn ras_grid_covering(src: &Geometry, spacing: [f64; 3]) -> Geometry {
    let (lo, hi) = world_box(src);
    let dims = [0, 1, 2].map(|a| ((hi[a] - lo[a]) / spacing[a] + 1e-6).floor() as usize + 1);
    Geometry::axis_aligned(dims, spacing, lo)
}

/// Trilinear interpolation at continuous voxel index (x, y, z); voxels outside the grid count as 0.
#[inline]
pub fn trilinear(data: &[f32], dims: [usize; 3], x: f64, y: f64, z: f64) -> f32 {
    let (fx, fy, fz) = (x.floor(), y.floor(), z.floor());
    let (nx, ny, nz) = (dims[0] as isize, dims[1] as isize, dims[2] as isize);
    if !(fx >= -1.0 && fy >= -1.0 && fz >= -1.0)
        || fx >= nx as f64
        || fy >= ny as f64
        || fz >= nz as f64
    {
        return 0.0;
    }
    let (i0, j0, k0) = (fx as isize, fy as isize, fz as isize);
    let (tx, ty, tz) = ((x - fx) as f32, (y - fy) as f32, (z - fz) as f32);
    let sx = nx as usize;
    let sxy = (nx * ny) as usize;
    if i0 >= 0 && j0 >= 0 && k0 >= 0 && i0 + 1 < nx && j0 + 1 < ny && k0 + 1 < nz {
        let o = i0 as usize + sx * j0 as usize + sxy * k0 as usize;
        let c00 = data[o] + tx * (data[o + 1] - data[o]);
        let c10 = data[o + sx] + tx * (data[o + sx + 1] - data[o + sx]);
        let c01 = data[o + sxy] + tx * (data[o + sxy + 1] - data[o + sxy]);
        let c11 = data[o + sxy + sx] + tx * (data[o + sxy + sx + 1] - data[o + sxy + sx]);
        let c0 = c00 + ty * (c10 - c00);
        let c1 = c01 + ty * (c11 - c01);
        return c0 + tz * (c1 - c0);
    }
    let mut acc = 0.0f32;
    for dk in 0..2 {
        let k = k0 + dk;
        if k < 0 || k >= nz {
            continue;
        }
        let wz = if dk == 0 { 1.0 - tz } else { tz };
        for dj in 0..2 {
            let j = j0 + dj;
            if j < 0 || j >= ny {
                continue;
            }
            let wy = if dj == 0 { 1.0 - ty } else { ty };
            for di in 0..2 {
                let i = i0 + di;
                if i < 0 || i >= nx {
                    continue;
                }
                let wx = if di == 0 { 1.0 - tx } else { tx };
                acc += wx * wy * wz * data[i as usize + sx * j as usize + sxy * k as usize];
            }
        }
    }
    acc
}

/// The voxel nearest continuous index (x, y, z), or `None` outside the grid.
#[inline]
pub fn nearest_index(dims: [usize; 3], x: f64, y: f64, z: f64) -> Option<usize> {
    let (i, j, k) = (x.round(), y.round(), z.round());
    if !(i >= 0.0 && j >= 0.0 && k >= 0.0) {
        return None;
    }
    let (i, j, k) = (i as usize, j as usize, k as usize);
    if i >= dims[0] || j >= dims[1] || k >= dims[2] {
        return None;
    }
    Some(i + dims[0] * (j + dims[1] * k))
}

/// Calls `f(linear index, continuous source index)` for every voxel of `target`, mapping through
/// world coordinates into `src`.
fn for_each_source_point(src: &Geometry, target: &Geometry, mut f: impl FnMut(usize, [f64; 3])) {
    let src_inv = invert(&src.affine).expect("source affine is invertible (checked on read)");
    let t = compose(&src_inv, &target.affine);
    let [nx, ny, nz] = target.dims;
    let mut idx = 0;
    for k in 0..nz {
        for j in 0..ny {
            let base = apply(&t, [0.0, j as f64, k as f64]);
            for i in 0..nx {
                let fi = i as f64;
                let p = [
                    base[0] + t[0][0] * fi,
                    base[1] + t[1][0] * fi,
                    base[2] + t[2][0] * fi,
                ];
                f(idx, p);
                idx += 1;
            }
        }
    }
}

/// Resamples an image onto `target` with trilinear interpolation (0 outside the source).
pub fn resample_linear(src: &Volume<f32>, target: &Geometry) -> Volume<f32> {
    let mut out = vec![0.0f32; target.len()];
    let dims = src.geometry.dims;
    for_each_source_point(&src.geometry, target, |o, p| {
        out[o] = trilinear(&src.data, dims, p[0], p[1], p[2]);
    });
    Volume {
        geometry: target.clone(),
        data: out,
    }
}

/// Resamples labels onto `target` by nearest neighbour (0 outside the source).
pub fn resample_nearest(src: &Volume<u8>, target: &Geometry) -> Volume<u8> {
    let mut out = vec![0u8; target.len()];
    let dims = src.geometry.dims;
    for_each_source_point(&src.geometry, target, |o, p| {
        if let Some(s) = nearest_index(dims, p[0], p[1], p[2]) {
            out[o] = src.data[s];
        }
    });
    Volume {
        geometry: target.clone(),
        data: out,
    }
}

/// The geometry of the sub-grid `lo..hi` (exclusive) of `g`: same axes, origin moved to voxel `lo`.
pub fn crop_geometry(g: &Geometry, lo: [usize; 3], hi: [usize; 3]) -> Geometry {
    let origin = g.world(lo.map(|v| v as f64));
    let mut affine = g.affine;
    for (r, o) in origin.iter().enumerate() {
        affine[r][3] = *o;
    }
    Geometry {
        dims: [hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]],
        affine,
    }
}

/// The sub-volume `lo..hi` (exclusive), with its geometry.
pub fn crop<T: Copy>(v: &Volume<T>, lo: [usize; 3], hi: [usize; 3]) -> Volume<T> {
    let geometry = crop_geometry(&v.geometry, lo, hi);
    let mut data = Vec::with_capacity(geometry.len());
    for k in lo[2]..hi[2] {
        for j in lo[1]..hi[1] {
            let o = v.geometry.index(0, j, k);
            data.extend_from_slice(&v.data[o + lo[0]..o + hi[0]]);
        }
    }
    Volume { geometry, data }
}

/// The sub-grid `lo..hi` (exclusive) that may reach beyond `v`'s grid on any side; voxels outside
/// `v` get `fill`. The world position of every voxel is kept, as with [`crop`].
pub fn crop_or_pad<T: Copy>(v: &Volume<T>, lo: [isize; 3], hi: [isize; 3], fill: T) -> Volume<T> {
    let origin = v.geometry.world(lo.map(|x| x as f64));
    let mut affine = v.geometry.affine;
    for (r, o) in origin.iter().enumerate() {
        affine[r][3] = *o;
    }
    let dims = [0, 1, 2].map(|a| (hi[a] - lo[a]).max(0) as usize);
    let geometry = Geometry { dims, affine };
    let [nx, ny, nz] = v.geometry.dims.map(|d| d as isize);
    let mut data = Vec::with_capacity(geometry.len());
    for k in lo[2]..hi[2] {
        for j in lo[1]..hi[1] {
            for i in lo[0]..hi[0] {
                let inside = i >= 0 && j >= 0 && k >= 0 && i < nx && j < ny && k < nz;
                data.push(if inside {
                    v.get(i as usize, j as usize, k as usize)
                } else {
                    fill
                });
            }
        }
    }
    Volume { geometry, data }
}

/// Bounding box `(lo, hi)` (hi exclusive) of the voxels where `inside` holds, widened by `margin`
/// voxels and clamped to the grid; `None` when no voxel is inside.
pub fn bounding_box(
    dims: [usize; 3],
    margin: usize,
    inside: impl Fn(usize) -> bool,
) -> Option<([usize; 3], [usize; 3])> {
    let mut lo = [usize::MAX; 3];
    let mut hi = [0usize; 3];
    let mut idx = 0;
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                if inside(idx) {
                    for (a, v) in [i, j, k].into_iter().enumerate() {
                        lo[a] = lo[a].min(v);
                        hi[a] = hi[a].max(v + 1);
                    }
                }
                idx += 1;
            }
        }
    }
    if lo[0] == usize::MAX {
        return None;
    }
    for a in 0..3 {
        lo[a] = lo[a].saturating_sub(margin);
        hi[a] = (hi[a] + margin).min(dims[a]);
    }
    Some((lo, hi))
}

fn gaussian_kernel(sigma: f64) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil().max(1.0) as isize;
    let w: Vec<f64> = (-radius..=radius)
        .map(|t| (-(t * t) as f64 / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| (v / s) as f32).collect()
}

/// Separable Gaussian blur in place; `sigma_vox` per voxel axis (≤ 0.05 skips the axis); the edges
/// are extended by replication.
pub fn gaussian_blur(data: &mut [f32], dims: [usize; 3], sigma_vox: [f64; 3]) {
    let [nx, ny, nz] = dims;
    assert_eq!(data.len(), nx * ny * nz);
    if data.is_empty() {
        return;
    }
    // Axis 0: along contiguous rows.
    if sigma_vox[0] > 0.05 {
        let kern = gaussian_kernel(sigma_vox[0]);
        let r = (kern.len() / 2) as isize;
        let mut line = vec![0.0f32; nx];
        for row in data.chunks_exact_mut(nx) {
            line.copy_from_slice(row);
            for (i, out) in row.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for (t, w) in kern.iter().enumerate() {
                    let s = (i as isize + t as isize - r).clamp(0, nx as isize - 1) as usize;
                    acc += w * line[s];
                }
                *out = acc;
            }
        }
    }
    // Axes 1 and 2: whole rows (axis 1) or slices (axis 2) at a time, which vectorises.
    for (axis, stride, n) in [(1usize, nx, ny), (2, nx * ny, nz)] {
        if sigma_vox[axis] <= 0.05 {
            continue;
        }
        let kern = gaussian_kernel(sigma_vox[axis]);
        let r = (kern.len() / 2) as isize;
        let block = stride * n;
        let mut buf = vec![0.0f32; block];
        for chunk in data.chunks_exact_mut(block) {
            buf.copy_from_slice(chunk);
            for p in 0..n {
                let out = &mut chunk[p * stride..(p + 1) * stride];
                out.iter_mut().for_each(|v| *v = 0.0);
                for (t, w) in kern.iter().enumerate() {
                    let s = (p as isize + t as isize - r).clamp(0, n as isize - 1) as usize;
                    let src = &buf[s * stride..(s + 1) * stride];
                    for (o, x) in out.iter_mut().zip(src) {
                        *o += w * x;
                    }
                }
            }
        }
    }
}

/// Binary dilation (`grow = true`) or erosion by a cube of half-width `radius`, separably; the
/// outside of the grid counts as background.
fn morph(mask: &[bool], dims: [usize; 3], radius: usize, grow: bool) -> Vec<bool> {
    let mut cur = mask.to_vec();
    let strides = [1, dims[0], dims[0] * dims[1]];
    for axis in 0..3 {
        let n = dims[axis];
        let stride = strides[axis];
        let prev = cur.clone();
        for (idx, out) in cur.iter_mut().enumerate() {
            let p = (idx / stride) % n;
            let base = idx - p * stride;
            let lo = p.saturating_sub(radius);
            let hi = (p + radius).min(n - 1);
            let window = (lo..=hi).map(|q| prev[base + q * stride]);
            *out = if grow {
                window.into_iter().any(|v| v)
            } else {
                p >= radius && p + radius < n && window.into_iter().all(|v| v)
            };
        }
    }
    cur
}

/// Morphological closing (dilate then erode) by a cube of half-width `radius`.
pub fn close(mask: &[bool], dims: [usize; 3], radius: usize) -> Vec<bool> {
    // Pad so that the erosion does not eat structures the dilation pushed to the grid's edge.
    let pad = radius;
    let pd = dims.map(|d| d + 2 * pad);
    let at = |i: usize, j: usize, k: usize| (i + pad) + pd[0] * ((j + pad) + pd[1] * (k + pad));
    let mut padded = vec![false; pd[0] * pd[1] * pd[2]];
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                padded[at(i, j, k)] = mask[i + dims[0] * (j + dims[1] * k)];
            }
        }
    }
    let closed = morph(&morph(&padded, pd, radius, true), pd, radius, false);
    let mut out = vec![false; mask.len()];
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            for i in 0..dims[0] {
                out[i + dims[0] * (j + dims[1] * k)] = closed[at(i, j, k)];
            }
        }
    }
    out
}

/// Visits the 6-connected neighbours of voxel `idx`.
#[inline]
fn neighbours6(dims: [usize; 3], idx: usize, mut f: impl FnMut(usize)) {
    let [nx, ny, nz] = dims;
    let i = idx % nx;
    let j = (idx / nx) % ny;
    let k = idx / (nx * ny);
    if i > 0 {
        f(idx - 1);
    }
    if i + 1 < nx {
        f(idx + 1);
    }
    if j > 0 {
        f(idx - nx);
    }
    if j + 1 < ny {
        f(idx + nx);
    }
    if k > 0 {
        f(idx - nx * ny);
    }
    if k + 1 < nz {
        f(idx + nx * ny);
    }
}

/// Fills enclosed holes: background not 6-connected to the grid's border becomes foreground.
pub fn fill_holes(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nx, ny, nz] = dims;
    let mut outside = vec![false; mask.len()];
    let mut stack = Vec::new();
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                let border =
                    i == 0 || j == 0 || k == 0 || i + 1 == nx || j + 1 == ny || k + 1 == nz;
                let idx = i + nx * (j + ny * k);
                if border && !mask[idx] && !outside[idx] {
                    outside[idx] = true;
                    stack.push(idx);
                }
            }
        }
    }
    while let Some(idx) = stack.pop() {
        neighbours6(dims, idx, |n| {
            if !mask[n] && !outside[n] {
                outside[n] = true;
                stack.push(n);
            }
        });
    }
    outside.iter().map(|o| !o).collect()
}

/// The largest 6-connected component of a mask (ties: the one met first in voxel order).
pub fn largest_component(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let mut comp = vec![0u32; mask.len()];
    let mut best = (0u32, 0usize);
    let mut next = 0u32;
    let mut stack = Vec::new();
    for start in 0..mask.len() {
        if !mask[start] || comp[start] != 0 {
            continue;
        }
        next += 1;
        comp[start] = next;
        stack.push(start);
        let mut size = 0usize;
        while let Some(idx) = stack.pop() {
            size += 1;
            neighbours6(dims, idx, |n| {
                if mask[n] && comp[n] == 0 {
                    comp[n] = next;
                    stack.push(n);
                }
            });
        }
        if size > best.1 {
            best = (next, size);
        }
    }
    comp.iter().map(|&c| c != 0 && c == best.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Geometry {
        // A coronal-like acquisition: i runs right-to-left, j runs up, k runs forward, slightly tilted.
        Geometry {
            dims: [20, 18, 12],
            affine: [
                [-2.0, 0.05, 0.0, 30.0],
                [0.0, 0.1, 3.0, -40.0],
                [0.0, 2.0, -0.1, -5.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        }
    }

    #[test]
    fn inverse_affine_round_trips() {
        let a = oblique().affine;
        let inv = invert(&a).unwrap();
        let id = compose(&a, &inv);
        for (r, row) in id.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((v - want).abs() < 1e-12, "{id:?}");
            }
        }
    }

    /// A value that is a linear function of the world position, which trilinear interpolation
    /// reproduces exactly: resampling must keep it at every voxel's world position.
    fn world_linear(w: [f64; 3]) -> f64 {
        0.5 * w[0] - 1.5 * w[1] + 2.0 * w[2] + 7.0
    }

    #[test]
    fn resampling_keeps_world_positions() {
        let g = oblique();
        let mut data = Vec::with_capacity(g.len());
        for k in 0..g.dims[2] {
            for j in 0..g.dims[1] {
                for i in 0..g.dims[0] {
                    data.push(world_linear(g.world([i as f64, j as f64, k as f64])) as f32);
                }
            }
        }
        let src = Volume::new(g.clone(), data).unwrap();
        let target = ras_grid_covering(&g, [1.7, 1.7, 1.7]);
        let out = resample_linear(&src, &target);
        let inv = invert(&g.affine).unwrap();
        let mut checked = 0;
        for k in 0..target.dims[2] {
            for j in 0..target.dims[1] {
                for i in 0..target.dims[0] {
                    let w = target.world([i as f64, j as f64, k as f64]);
                    let s = apply(&inv, w);
                    let inside = (0..3).all(|a| s[a] >= 0.0 && s[a] <= (g.dims[a] - 1) as f64);
                    if inside {
                        let got = out.get(i, j, k) as f64;
                        assert!((got - world_linear(w)).abs() < 1e-3, "at {w:?}: {got}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1000, "{checked}");
        // A crop of the result keeps the world position and value of every voxel.
        let c = crop(&out, [2, 3, 4], [10, 12, 9]);
        assert_eq!(c.geometry.dims, [8, 9, 5]);
        let padded = crop_or_pad(&c, [-2, -1, 0], [9, 10, 6], -1.0);
        assert_eq!(padded.geometry.dims, [11, 11, 6]);
        assert_eq!(padded.get(0, 0, 0), -1.0);
        assert_eq!(padded.get(2, 1, 0), c.get(0, 0, 0));
        assert_eq!(padded.get(10, 10, 5), -1.0);
        let (a, b) = (
            padded.geometry.world([2.0, 1.0, 0.0]),
            c.geometry.world([0.0; 3]),
        );
        assert!((0..3).all(|r| (a[r] - b[r]).abs() < 1e-9));
        for (i, j, k) in [(0, 0, 0), (7, 8, 4), (3, 2, 1)] {
            let a = c.geometry.world([i as f64, j as f64, k as f64]);
            let b = out
                .geometry
                .world([(i + 2) as f64, (j + 3) as f64, (k + 4) as f64]);
            assert!((0..3).all(|r| (a[r] - b[r]).abs() < 1e-9));
            assert_eq!(c.get(i, j, k), out.get(i + 2, j + 3, k + 4));
        }
    }

    #[test]
    fn reorientation_at_native_spacing_is_lossless() {
        // ITK-like: i → −x (2 mm), j → +z (2 mm), k → +y (3 mm).
        let g = Geometry {
            dims: [6, 5, 4],
            affine: [
                [-2.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 3.0, -254.0],
                [0.0, 2.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        assert_eq!(spacing_along_world_axes(&g), [2.0, 3.0, 2.0]);
        let t = ras_grid_covering(&g, spacing_along_world_axes(&g));
        assert_eq!(t.dims, [6, 4, 5]);
        let labels =
            Volume::new(g.clone(), (0..g.len()).map(|v| (v % 251) as u8).collect()).unwrap();
        let image = labels.map(|v| v as f32 * 1.5);
        let rl = resample_nearest(&labels, &t);
        let ri = resample_linear(&image, &t);
        let mut seen: Vec<u8> = rl.data.clone();
        seen.sort_unstable();
        let mut want = labels.data.clone();
        want.sort_unstable();
        assert_eq!(seen, want, "every voxel appears exactly once");
        for (l, v) in rl.data.iter().zip(&ri.data) {
            assert!((*l as f32 * 1.5 - v).abs() < 1e-4);
        }
        // The voxel at the same world position holds the same value.
        let w = g.world([1.0, 2.0, 3.0]);
        let ti = apply(&invert(&t.affine).unwrap(), w).map(|x| x.round() as usize);
        assert_eq!(rl.get(ti[0], ti[1], ti[2]), labels.get(1, 2, 3));
    }

    #[test]
    fn blur_keeps_constants_and_mass() {
        let dims = [9, 7, 5];
        let mut c = vec![3.0f32; 9 * 7 * 5];
        gaussian_blur(&mut c, dims, [1.0, 1.5, 0.8]);
        assert!(c.iter().all(|v| (v - 3.0).abs() < 1e-5));
        // Away from the edges a blurred impulse keeps its mass.
        let dims = [11, 11, 11];
        let mut d = vec![0.0f32; 11 * 11 * 11];
        d[5 + 11 * (5 + 11 * 5)] = 1.0;
        gaussian_blur(&mut d, dims, [0.7, 0.9, 1.2]);
        let s: f32 = d.iter().sum();
        assert!((s - 1.0).abs() < 1e-4, "{s}");
    }

    #[test]
    fn morphology_fills_and_closes() {
        let dims = [7, 7, 7];
        let idx = |i: usize, j: usize, k: usize| i + 7 * (j + 7 * k);
        // A solid cube with a one-voxel cavity, plus a stray voxel.
        let mut m = vec![false; 343];
        for k in 1..6 {
            for j in 1..6 {
                for i in 1..6 {
                    m[idx(i, j, k)] = true;
                }
            }
        }
        m[idx(3, 3, 3)] = false;
        let filled = fill_holes(&m, dims);
        assert!(filled[idx(3, 3, 3)]);
        assert!(!filled[idx(0, 0, 0)]);
        let mut with_stray = filled.clone();
        with_stray[idx(0, 0, 6)] = true;
        assert_eq!(largest_component(&with_stray, dims), filled);
        let mut gap = filled.clone();
        gap[idx(3, 1, 3)] = false;
        assert_eq!(close(&gap, dims, 1), filled);
    }
}
