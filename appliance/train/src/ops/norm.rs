//! GroupNorm followed by ReLU, fused, with a hand-written backward.
//!
//! Forward, per (image, group), one task each: the group's mean and variance (two passes over the
//! group, which stays in cache), then `y = max(0, x·scale + shift)` with `scale = γ·rstd`,
//! `shift = β − mean·scale` per channel. candle's GroupNorm is ~10 tensor-wide element-wise ops
//! plus ReLU each way. Sums run in 8 independent lanes of the element type (so they vectorise),
//! flushed to f64 every [`BLOCK`] elements. The op keeps each group's mean and rstd for its
//! backward.
//!
//! Backward, per (image, group), with `x̂ = (x − mean)·rstd`, `dz = dy·[y > 0]`:
//! `dβ_c = Σ dz`, `dγ_c = Σ dz·x̂` (summed over the images afterwards) and
//! `dx = rstd·(γ_c·dz − mean_g(γ·dz) − x̂·mean_g(γ·dz·x̂))`. The ReLU mask is recomputed from `x`
//! with the forward's own arithmetic and statistics, so it is bit-identical to the forward's.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::{custom_path, data, dispatch, par, reference, storage, zero, Real};

/// `relu(group_norm(x))` for `x (n, c, …)` with per-channel `gamma`, `beta` (c); same maths as
/// `candle_nn::GroupNorm` (biased variance, `eps` inside the square root) followed by ReLU.
pub fn group_norm_relu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    if !custom_path(x) {
        return reference::group_norm_relu(x, gamma, beta, groups, eps);
    }
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNormRelu {
            groups,
            eps,
            stats: Mutex::new(Vec::new()),
        },
    )
}

struct GroupNormRelu {
    groups: usize,
    eps: f64,
    /// (mean, rstd) per (image, group) of the last forward, for the backward.
    stats: Mutex<Vec<(f64, f64)>>,
}

/// Lanes of the vectorisable sums.
const LANES: usize = 8;
/// Elements summed in the element type before the partial sums are added in f64.
const BLOCK: usize = 1024;

/// `Σ f(x)` over `xs`, in [`LANES`] lanes of `T` flushed to f64 every [`BLOCK`] elements.
fn lane_sum<T: Real>(xs: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0f64;
    for block in xs.chunks(BLOCK) {
        let mut acc = [zero::<T>(); LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            // A fixed-size array: no bounds checks, so the lanes vectorise.
            let c: &[T; LANES] = c.try_into().expect("chunks_exact yields LANES elements");
            for l in 0..LANES {
                acc[l] += f(c[l]);
            }
        }
        for &v in chunks.remainder() {
            acc[0] += f(v);
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

/// `(n, c, elements per channel)` of a GroupNorm input, checked against the parameters.
fn dims(l: &Layout, c_params: usize, groups: usize) -> Result<(usize, usize, usize)> {
    let d = l.shape().dims();
    if d.len() < 3 || d[1] != c_params || groups == 0 || d[1] % groups != 0 {
        candle_core::bail!(
            "group_norm_relu: input {:?}, {c_params} channels, {groups} groups",
            l.shape()
        );
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// Mean and `1/sqrt(var + eps)` of one group's elements (the variance about the mean, in a
/// second pass, as candle computes it).
fn stats<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let cnt = x.len().max(1) as f64;
    let mean = lane_sum(x, |v| v) / cnt;
    let m = T::from_f64(mean);
    let q = lane_sum(x, |v| (v - m) * (v - m));
    (mean, 1.0 / (q / cnt + eps).sqrt())
}

/// The per-channel affine map of the normalised, scaled and shifted value, in the element type.
fn affine<T: Real>(gamma: T, beta: T, mean: f64, rstd: f64) -> (T, T) {
    let scale = gamma.to_f64() * rstd;
    (
        T::from_f64(scale),
        T::from_f64(beta.to_f64() - mean * scale),
    )
}

pub(super) fn forward<T: Real>(
    x: &[T],
    gamma: &[T],
    beta: &[T],
    c: usize,
    hw: usize,
    groups: usize,
    eps: f64,
) -> (Vec<T>, Vec<(f64, f64)>) {
    let cpg = c / groups;
    let mut y = par::zeroed(x.len());
    let gl = cpg * hw;
    let stats: Vec<(f64, f64)> = par::map_chunks(&mut y, gl, |i, yg| {
        let xg = &x[i * gl..][..yg.len()];
        let (mean, rstd) = stats(xg, eps);
        let c0 = (i % groups) * cpg;
        for ci in 0..cpg {
            let (scale, shift) = affine(gamma[c0 + ci], beta[c0 + ci], mean, rstd);
            let zero = zero::<T>();
            for (yv, &xv) in yg[ci * hw..(ci + 1) * hw]
                .iter_mut()
                .zip(&xg[ci * hw..(ci + 1) * hw])
            {
                let z = xv * scale + shift;
                *yv = if z > zero { z } else { zero };
            }
        }
        (mean, rstd)
    });
    (y, stats)
}

impl CustomOp3 for GroupNormRelu {
    fn name(&self) -> &'static str {
        "cosilo-group-norm-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = gl.shape().elem_count();
        let (_, _, hw) = dims(xl, c, self.groups)?;
        if bl.shape().elem_count() != c {
            candle_core::bail!(
                "group_norm_relu: gamma {:?}, beta {:?}",
                gl.shape(),
                bl.shape()
            );
        }
        super::profile::timed(self.name(), || {
            dispatch!("group_norm_relu", xs, |T| {
                let (y, stats) = forward::<T>(
                    data(self.name(), xs, xl)?,
                    data(self.name(), gs, gl)?,
                    data(self.name(), bs, bl)?,
                    c,
                    hw,
                    self.groups,
                    self.eps,
                );
                if let Ok(mut saved) = self.stats.lock() {
                    *saved = stats;
                }
                Ok((storage(y), xl.shape().clone()))
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let params = Tensor::cat(&[gamma, beta], 0)?;
        let stats = self.stats.lock().map(|s| s.clone()).unwrap_or_default();
        let packed = x.apply_op3_no_bwd(
            &dy.contiguous()?,
            &params,
            &GroupNormReluGrad {
                groups: self.groups,
                eps: self.eps,
                stats,
            },
        )?;
        let n = x.elem_count();
        let c = gamma.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// `[dx, dγ, dβ]` packed in one vector, from `(x, dy, [γ, β])`.
struct GroupNormReluGrad {
    groups: usize,
    eps: f64,
    /// The forward's (mean, rstd) per (image, group); recomputed when absent.
    stats: Vec<(f64, f64)>,
}

/// `Σ f(a, b)` over two slices, lanes and blocks as [`lane_sum`].
fn lane_sum2<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> f64 {
    let mut total = 0f64;
    for (ab, bb) in a.chunks(BLOCK).zip(b.chunks(BLOCK)) {
        let mut acc = [zero::<T>(); LANES];
        let mut ac = ab.chunks_exact(LANES);
        let mut bc = bb.chunks_exact(LANES);
        for (av, bv) in (&mut ac).zip(&mut bc) {
            let av: &[T; LANES] = av.try_into().expect("chunks_exact yields LANES elements");
            let bv: &[T; LANES] = bv.try_into().expect("chunks_exact yields LANES elements");
            for l in 0..LANES {
                acc[l] += f(av[l], bv[l]);
            }
        }
        for (&av, &bv) in ac.remainder().iter().zip(bc.remainder()) {
            acc[0] += f(av, bv);
        }
        total += acc.iter().map(|a| a.to_f64()).sum::<f64>();
    }
    total
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Real>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    beta: &[T],
    hw: usize,
    groups: usize,
    eps: f64,
    saved: &[(f64, f64)],
    spare: usize,
) -> Vec<T> {
    let c = gamma.len();
    let cpg = c / groups;
    let len = x.len();
    // `spare` zeros at the end are the caller's, to pack more gradients without a copy.
    let mut packed = par::zeroed(len + 2 * c + spare);
    let (dx, dparams) = packed.split_at_mut(len);
    let dparams = &mut dparams[..2 * c];
    // Per (image, channel): (Σ dz, Σ dz·x̂).
    let gl = cpg * hw;
    let sums: Vec<Vec<(f64, f64)>> = par::map_chunks(dx, gl, |i, dxg| {
        let (xg, dyg) = (&x[i * gl..][..dxg.len()], &dy[i * gl..][..dxg.len()]);
        let (mean, rstd) = saved.get(i).copied().unwrap_or_else(|| stats(xg, eps));
        let c0 = (i % groups) * cpg;
        let zero = zero::<T>();
        let tmean = T::from_f64(mean);
        let mut sums = Vec::with_capacity(cpg);
        let (mut m1, mut m2) = (0f64, 0f64);
        for ci in 0..cpg {
            let (scale, shift) = affine(gamma[c0 + ci], beta[c0 + ci], mean, rstd);
            let xs = &xg[ci * hw..(ci + 1) * hw];
            let dys = &dyg[ci * hw..(ci + 1) * hw];
            // dz (the gradient through the ReLU) goes into dx's place first.
            let dzs = &mut dxg[ci * hw..(ci + 1) * hw];
            for ((dz, &xv), &dv) in dzs.iter_mut().zip(xs).zip(dys) {
                *dz = if xv * scale + shift > zero { dv } else { zero };
            }
            let sdz = lane_sum(dzs, |d| d);
            let sdzx = lane_sum2(dzs, xs, |d, xv| d * (xv - tmean));
            let sdzx = sdzx * rstd;
            let g = gamma[c0 + ci].to_f64();
            m1 += g * sdz;
            m2 += g * sdzx;
            sums.push((sdz, sdzx));
        }
        let cnt = (cpg * hw) as f64;
        let (m1, m2) = (m1 / cnt, m2 / cnt);
        // dx = a·dz + (x − mean)·c1 + c0, from rstd·(γ·dz − m1 − (x − mean)·rstd·m2).
        let c1 = T::from_f64(-rstd * rstd * m2);
        let cc = T::from_f64(-rstd * m1);
        for ci in 0..cpg {
            let a = T::from_f64(gamma[c0 + ci].to_f64() * rstd);
            let xs = &xg[ci * hw..(ci + 1) * hw];
            for (d, &xv) in dxg[ci * hw..(ci + 1) * hw].iter_mut().zip(xs) {
                *d = a * *d + (xv - tmean) * c1 + cc;
            }
        }
        sums
    });
    let (dgamma, dbeta) = dparams.split_at_mut(c);
    let mut acc = vec![(0f64, 0f64); c];
    for (i, group) in sums.iter().enumerate() {
        let c0 = (i % groups) * cpg;
        for (ci, &(sdz, sdzx)) in group.iter().enumerate() {
            acc[c0 + ci].0 += sdz;
            acc[c0 + ci].1 += sdzx;
        }
    }
    for (ch, &(sdz, sdzx)) in acc.iter().enumerate() {
        dbeta[ch] = T::from_f64(sdz);
        dgamma[ch] = T::from_f64(sdzx);
    }
    packed
}

impl CustomOp3 for GroupNormReluGrad {
    fn name(&self) -> &'static str {
        "cosilo-group-norm-relu-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c2 = pl.shape().elem_count();
        let (_, c, hw) = dims(xl, c2 / 2, self.groups)?;
        if dl.shape() != xl.shape() || c2 != 2 * c {
            candle_core::bail!(
                "group_norm_relu backward: x {:?}, dy {:?}",
                xl.shape(),
                dl.shape()
            );
        }
        super::profile::timed(self.name(), || {
            dispatch!("group_norm_relu backward", xs, |T| {
                let params = data::<T>(self.name(), ps, pl)?;
                let (gamma, beta) = params.split_at(c);
                let n = xl.shape().dims()[0];
                let saved = if self.stats.len() == n * self.groups {
                    &self.stats[..]
                } else {
                    &[]
                };
                let packed = backward::<T>(
                    data(self.name(), xs, xl)?,
                    data(self.name(), ds, dl)?,
                    gamma,
                    beta,
                    hw,
                    self.groups,
                    self.eps,
                    saved,
                    0,
                );
                let len = packed.len();
                Ok((storage(packed), Shape::from(len)))
            })
        })
    }
}
