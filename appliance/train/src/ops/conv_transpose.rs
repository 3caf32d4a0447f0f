//! The 2×2 stride-2 transposed convolution + bias (the U-Net's up-sampling), as one `gemm` per
//! image: forward `t (cout·4, h·w) = w_matᵀ · x`, each column of `t` scattered to its 2×2 output
//! block; backward gathers `dy` into the same `(cout·4, h·w)` layout, so the input gradient is
//! `w_mat · gather(dy)` and the weight gradient `x · gather(dy)ᵀ`, summed over the images.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::conv::{for_each_image, sum_over_images};
use super::gemm::{matmul, MatMut, MatRef};
use super::{custom_path, data, dispatch, par, reference, storage, zero, Real};

/// `conv_transpose2d(x, w, stride 2, kernel 2, padding 0) + b` for `x (n, cin, h, w)`,
/// `w (cin, cout, 2, 2)`, `b (cout)`; the result is `(n, cout, 2h, 2w)`.
pub fn conv_transpose_2x2(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !custom_path(x) {
        return reference::conv_transpose_2x2(x, w, b);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, ConvTranspose2x2)
}

/// Transposed convolution, kernel 2, stride 2: `t (cout·4, h·w) = w_matᵀ · x`, then each column
/// of `t` is scattered to its 2×2 output block.
struct ConvTranspose2x2;

fn ct_dims(xl: &Layout, wl: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, cin, h, w) = xl.shape().dims4()?;
    let (wcin, cout, k0, k1) = wl.shape().dims4()?;
    if wcin != cin || k0 != 2 || k1 != 2 {
        candle_core::bail!(
            "conv_transpose_2x2: input {:?}, weight {:?}",
            xl.shape(),
            wl.shape()
        );
    }
    Ok((n, cin, h, w, cout))
}

/// `dy (cout, 2h, 2w)` → `g (cout·4, h·w)`, the layout of the transposed convolution's product.
fn gather_2x2<T: Real>(dy: &[T], cout: usize, h: usize, w: usize, g: &mut [T]) {
    let hw = h * w;
    let w2 = 2 * w;
    for co in 0..cout {
        let plane = &dy[co * 4 * hw..][..4 * hw];
        for a in 0..2 {
            for b in 0..2 {
                let row = &mut g[(co * 4 + a * 2 + b) * hw..][..hw];
                for i in 0..h {
                    let src = &plane[(2 * i + a) * w2..][..w2];
                    for (j, d) in row[i * w..(i + 1) * w].iter_mut().enumerate() {
                        *d = src[2 * j + b];
                    }
                }
            }
        }
    }
}

impl CustomOp3 for ConvTranspose2x2 {
    fn name(&self) -> &'static str {
        "cosilo-conv-transpose-2x2"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, w, cout) = ct_dims(xl, wl)?;
        if bl.shape().dims1()? != cout {
            candle_core::bail!(
                "conv_transpose_2x2: bias {:?} for {cout} channels",
                bl.shape()
            );
        }
        let hw = h * w;
        super::profile::timed(self.name(), || {
            dispatch!("conv_transpose_2x2", xs, |T| {
                let x = data::<T>(self.name(), xs, xl)?;
                let wt = data::<T>(self.name(), ws, wl)?;
                let bias = data::<T>(self.name(), bs, bl)?;
                let mut y = par::zeroed(n * cout * 4 * hw);
                for_each_image(&mut y, cout * 4 * hw, |i, out, gt| {
                    let mut t = vec![zero::<T>(); cout * 4 * hw];
                    matmul(
                        MatMut::rows(&mut t, cout * 4, hw),
                        false,
                        MatRef::rows_t(wt, cin, cout * 4),
                        MatRef::rows(&x[i * cin * hw..][..cin * hw], cin, hw),
                        gt,
                    );
                    let w2 = 2 * w;
                    for co in 0..cout {
                        let plane = &mut out[co * 4 * hw..][..4 * hw];
                        for a in 0..2 {
                            for b in 0..2 {
                                let row = &t[(co * 4 + a * 2 + b) * hw..][..hw];
                                for ii in 0..h {
                                    let dst = &mut plane[(2 * ii + a) * w2..][..w2];
                                    for (j, &v) in row[ii * w..(ii + 1) * w].iter().enumerate() {
                                        dst[2 * j + b] = v + bias[co];
                                    }
                                }
                            }
                        }
                    }
                });
                Ok((storage(y), Shape::from((n, cout, 2 * h, 2 * w))))
            })
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(dy.apply_op2_no_bwd(w, &ConvTranspose2x2InputGrad)?)
        } else {
            None
        };
        let packed = dy.apply_op2_no_bwd(x, &ConvTranspose2x2WeightGrad)?;
        let nw = w.elem_count();
        let dw = packed.narrow(0, 0, nw)?.reshape(w.shape())?;
        let db = packed.narrow(0, nw, b.elem_count())?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `dx (cin, h·w) = w_mat (cin, cout·4) · gather(dy)` per image.
struct ConvTranspose2x2InputGrad;

impl CustomOp2 for ConvTranspose2x2InputGrad {
    fn name(&self) -> &'static str {
        "cosilo-conv-transpose-2x2-input-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, h2, w2) = dl.shape().dims4()?;
        let (cin, wcout, _, _) = wl.shape().dims4()?;
        if wcout != cout || h2 % 2 != 0 || w2 % 2 != 0 {
            candle_core::bail!(
                "conv_transpose_2x2 backward: dy {:?}, weight {:?}",
                dl.shape(),
                wl.shape()
            );
        }
        let (h, w) = (h2 / 2, w2 / 2);
        let hw = h * w;
        super::profile::timed(self.name(), || {
            dispatch!("conv_transpose_2x2 backward", ds, |T| {
                let dy = data::<T>(self.name(), ds, dl)?;
                let wt = data::<T>(self.name(), ws, wl)?;
                let mut dx = par::zeroed(n * cin * hw);
                for_each_image(&mut dx, cin * hw, |i, out, gt| {
                    let mut g = vec![zero::<T>(); cout * 4 * hw];
                    gather_2x2(
                        &dy[i * cout * 4 * hw..][..cout * 4 * hw],
                        cout,
                        h,
                        w,
                        &mut g,
                    );
                    matmul(
                        MatMut::rows(out, cin, hw),
                        false,
                        MatRef::rows(wt, cin, cout * 4),
                        MatRef::rows(&g, cout * 4, hw),
                        gt,
                    );
                });
                Ok((storage(dx), Shape::from((n, cin, h, w))))
            })
        })
    }
}

/// `[dw (cin·cout·4), db (cout)]` of [`ConvTranspose2x2`] from `(dy, x)`.
struct ConvTranspose2x2WeightGrad;

impl CustomOp2 for ConvTranspose2x2WeightGrad {
    fn name(&self) -> &'static str {
        "cosilo-conv-transpose-2x2-weight-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, h2, w2) = dl.shape().dims4()?;
        let (xn, cin, h, w) = xl.shape().dims4()?;
        if xn != n || h2 != 2 * h || w2 != 2 * w {
            candle_core::bail!(
                "conv_transpose_2x2 backward: dy {:?}, x {:?}",
                dl.shape(),
                xl.shape()
            );
        }
        let hw = h * w;
        let nw = cin * cout * 4;
        super::profile::timed(self.name(), || {
            dispatch!("conv_transpose_2x2 backward", ds, |T| {
                let dy = data::<T>(self.name(), ds, dl)?;
                let x = data::<T>(self.name(), xs, xl)?;
                let packed = sum_over_images::<T>(n, nw + cout, |i, acc, gt| {
                    let dyi = &dy[i * cout * 4 * hw..][..cout * 4 * hw];
                    let (dw, db) = acc.split_at_mut(nw);
                    for (co, plane) in dyi.chunks(4 * hw).enumerate() {
                        let mut s = zero::<T>();
                        for &v in plane {
                            s += v;
                        }
                        db[co] += s;
                    }
                    let mut g = vec![zero::<T>(); cout * 4 * hw];
                    gather_2x2(dyi, cout, h, w, &mut g);
                    matmul(
                        MatMut::rows(dw, cin, cout * 4),
                        true,
                        MatRef::rows(&x[i * cin * hw..][..cin * hw], cin, hw),
                        MatRef::rows_t(&g, cout * 4, hw),
                        gt,
                    );
                });
                Ok((storage(packed), Shape::from(nw + cout)))
            })
        })
    }
}
