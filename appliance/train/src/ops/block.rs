//! The U-Net's conv → GroupNorm → ReLU block as one graph node.
//!
//! candle's backward gives every input of every node a gradient buffer of its own (a full-size
//! `zeros_like` + `add`), so a separate convolution and GroupNorm node cost one such buffer for
//! the convolution's output on top of the kernels. As one node, the convolution output `z` stays
//! inside the op (kept for the backward, as the graph kept it before) and its gradient is a
//! temporary of the backward kernel. The parameters enter packed, `[w, b, γ, β]` (a small
//! concatenation whose backward splits the packed gradient back to the variables).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{Convolve, Geom};
use super::{custom_path, data, norm, storage};

/// `relu(group_norm(conv2d(x, w, padding) + b))`, the maths of `ops::conv2d` followed by
/// `ops::group_norm_relu`, for `x (n, cin, h, w)`, `w (cout, cin, k, k)`, `b`, `gamma`, `beta`
/// (cout).
#[allow(clippy::too_many_arguments)]
pub fn conv_group_norm_relu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    padding: usize,
    groups: usize,
    eps: f64,
) -> Result<Tensor> {
    let (cout, cin, k, k2) = w.dims4()?;
    if !custom_path(x) || k != k2 || padding >= k {
        // Both fall back to candle's ops off the CPU.
        let z = super::conv2d(x, w, b, padding)?;
        return super::group_norm_relu(&z, gamma, beta, groups, eps);
    }
    let params = Tensor::cat(&[&w.flatten_all()?, b, gamma, beta], 0)?;
    let op = ConvGroupNormRelu {
        cin,
        cout,
        k,
        padding,
        groups,
        eps,
        saved: Mutex::new(None),
    };
    x.contiguous()?.apply_op2(&params, op)
}

/// What the backward needs from the forward: the convolution output and the GroupNorm
/// (mean, rstd) per (image, group).
type Saved = (CpuStorage, Vec<(f64, f64)>);

struct ConvGroupNormRelu {
    cin: usize,
    cout: usize,
    k: usize,
    padding: usize,
    groups: usize,
    eps: f64,
    saved: Mutex<Option<Saved>>,
}

impl ConvGroupNormRelu {
    fn geom(&self, xl: &Layout, pl: &Layout) -> Result<Geom> {
        let (n, cin, h, w) = xl.shape().dims4()?;
        let expected = self.cout * self.cin * self.k * self.k + 3 * self.cout;
        if cin != self.cin || pl.shape().elem_count() != expected || self.cout % self.groups != 0 {
            candle_core::bail!(
                "conv_group_norm_relu: input {:?}, parameters {:?}",
                xl.shape(),
                pl.shape()
            );
        }
        Geom::new(n, cin, h, w, self.cout, self.k, self.padding)
    }

    /// `(w, b, γ, β)` of the packed parameters.
    fn split<'a, T>(&self, p: &'a [T]) -> (&'a [T], &'a [T], &'a [T], &'a [T]) {
        let nw = self.cout * self.cin * self.k * self.k;
        let (w, rest) = p.split_at(nw);
        let (b, rest) = rest.split_at(self.cout);
        let (gamma, beta) = rest.split_at(self.cout);
        (w, b, gamma, beta)
    }

    fn forward<T: Convolve>(
        &self,
        x: &[T],
        p: &[T],
        g: &Geom,
    ) -> (Vec<T>, Vec<T>, Vec<(f64, f64)>) {
        let (w, b, gamma, beta) = self.split(p);
        let z = T::conv(x, w, Some(b), g);
        let (y, stats) = norm::forward(&z, gamma, beta, g.cout, g.ho * g.wo, self.groups, self.eps);
        (z, y, stats)
    }
}

impl CustomOp2 for ConvGroupNormRelu {
    fn name(&self) -> &'static str {
        "cosilo-conv-group-norm-relu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geom(xl, pl)?;
        let shape = Shape::from((g.n, g.cout, g.ho, g.wo));
        super::profile::timed(self.name(), || {
            let (z, y, stats) = match xs {
                CpuStorage::F32(_) => {
                    let (z, y, s) = self.forward::<f32>(
                        data(self.name(), xs, xl)?,
                        data(self.name(), ps, pl)?,
                        &g,
                    );
                    (storage(z), storage(y), s)
                }
                CpuStorage::F64(_) => {
                    let (z, y, s) = self.forward::<f64>(
                        data(self.name(), xs, xl)?,
                        data(self.name(), ps, pl)?,
                        &g,
                    );
                    (storage(z), storage(y), s)
                }
                _ => candle_core::bail!("conv_group_norm_relu: f32 or f64 only"),
            };
            if let Ok(mut saved) = self.saved.lock() {
                *saved = Some((z, stats));
            }
            Ok((y, shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Taken, not copied: one backward per forward (a second one reports it).
        let Some((z, stats)) = self.saved.lock().ok().and_then(|mut s| s.take()) else {
            candle_core::bail!("conv_group_norm_relu: backward without a (new) forward");
        };
        let nz = match &z {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            _ => 0,
        };
        let grad = ConvGroupNormReluGrad {
            block: self,
            z,
            stats,
        };
        // [dz, dw, db, dγ, dβ]; dx is then the convolution input gradient of the dz part.
        let packed = x.apply_op3_no_bwd(&dy.contiguous()?, params, &grad)?;
        let dparams = packed.narrow(0, nz, params.elem_count())?;
        let dx = if x.track_op() {
            let (n, _, ho, wo) = dy.dims4()?;
            let dz = packed.narrow(0, 0, nz)?.reshape((n, self.cout, ho, wo))?;
            let w = params
                .narrow(0, 0, self.cout * self.cin * self.k * self.k)?
                .reshape((self.cout, self.cin, self.k, self.k))?;
            Some(super::conv::input_grad(&dz, &w, self.padding)?)
        } else {
            None
        };
        Ok((dx, Some(dparams)))
    }
}

/// `[dz, dw, db, dγ, dβ]` of [`ConvGroupNormRelu`] from `(x, dy, params)`: the GroupNorm + ReLU
/// backward gives `dz` (the gradient at the convolution output), the convolution's weight
/// gradient follows from it.
struct ConvGroupNormReluGrad<'a> {
    block: &'a ConvGroupNormRelu,
    z: CpuStorage,
    stats: Vec<(f64, f64)>,
}

impl ConvGroupNormReluGrad<'_> {
    fn run<T: Convolve>(&self, x: &[T], dy: &[T], p: &[T], g: &Geom) -> Result<Vec<T>> {
        let b = self.block;
        let (w, _, gamma, beta) = b.split(p);
        let z = self.z.as_slice::<T>()?;
        let (c, nw) = (g.cout, w.len());
        // [dz, dγ, dβ, spare], the spare holding the rest of the parameter gradients.
        let mut packed = norm::backward(
            z,
            dy,
            gamma,
            beta,
            g.ho * g.wo,
            b.groups,
            b.eps,
            &self.stats,
            nw + c,
        );
        let (dz, tail) = packed.split_at_mut(z.len());
        let dnorm: Vec<T> = tail[..2 * c].to_vec();
        let dwb = T::conv_weight_grad(x, dz, g);
        tail[..nw + c].copy_from_slice(&dwb);
        tail[nw + c..].copy_from_slice(&dnorm);
        Ok(packed)
    }
}

impl CustomOp3 for ConvGroupNormReluGrad<'_> {
    fn name(&self) -> &'static str {
        "cosilo-conv-group-norm-relu-grad"
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
        let g = self.block.geom(xl, pl)?;
        if dl.shape().dims() != [g.n, g.cout, g.ho, g.wo] {
            candle_core::bail!("conv_group_norm_relu backward: dy {:?}", dl.shape());
        }
        super::profile::timed(self.name(), || {
            let out = match xs {
                CpuStorage::F32(_) => storage(self.run::<f32>(
                    data(self.name(), xs, xl)?,
                    data(self.name(), ds, dl)?,
                    data(self.name(), ps, pl)?,
                    &g,
                )?),
                CpuStorage::F64(_) => storage(self.run::<f64>(
                    data(self.name(), xs, xl)?,
                    data(self.name(), ds, dl)?,
                    data(self.name(), ps, pl)?,
                    &g,
                )?),
                _ => candle_core::bail!("conv_group_norm_relu backward: f32 or f64 only"),
            };
            let len = out_len(&out).unwrap_or(0);
            Ok((out, Shape::from(len)))
        })
    }
}

/// Elements of an f32/f64 storage.
fn out_len(s: &CpuStorage) -> Option<usize> {
    match s {
        CpuStorage::F32(v) => Some(v.len()),
        CpuStorage::F64(v) => Some(v.len()),
        _ => None,
    }
}
