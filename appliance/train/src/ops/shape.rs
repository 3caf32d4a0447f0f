//! Pooling and concatenation: memory-bound ops whose candle forms are slow backward.
//!
//! The reshape + max pool's backward builds broadcast masks over the full-resolution tensor twice;
//! candle's `cat` backward hands each input a strided `narrow` view, which the gradient
//! accumulation then adds element by element through a generic strided iterator.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::{custom_path, data, dispatch, par, reference, storage, zero};

/// 2×2 max-pool, stride 2, for `x (n, c, h, w)` with even `h` and `w`. The gradient of each
/// window goes to every element equal to its maximum, as with `reference::max_pool_2x2`.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    if !custom_path(x) {
        return reference::max_pool_2x2(x);
    }
    x.contiguous()?.apply_op1(MaxPool2x2)
}

/// `cat([a, b], 1)` for `a (n, ca, …)` and `b (n, cb, …)`.
pub fn cat_channels(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !custom_path(a) {
        return reference::cat_channels(a, b);
    }
    a.contiguous()?.apply_op2(&b.contiguous()?, CatChannels)
}

struct MaxPool2x2;

fn pool_dims(l: &Layout) -> Result<(usize, usize, usize, usize)> {
    let (n, c, h, w) = l.shape().dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("max_pool_2x2: {h}×{w} is not even on both sides");
    }
    Ok((n, c, h, w))
}

impl CustomOp1 for MaxPool2x2 {
    fn name(&self) -> &'static str {
        "cosilo-max-pool-2x2"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = pool_dims(xl)?;
        let (ho, wo) = (h / 2, w / 2);
        super::profile::timed(self.name(), || {
            dispatch!("max_pool_2x2", xs, |T| {
                let x = data::<T>(self.name(), xs, xl)?;
                let mut y = par::zeroed(n * c * ho * wo);
                par::for_each_chunk(&mut y, ho * wo, |plane, yp| {
                    let xp = &x[plane * h * w..][..h * w];
                    for i in 0..ho {
                        let r0 = &xp[2 * i * w..][..w];
                        let r1 = &xp[(2 * i + 1) * w..][..w];
                        for (j, yv) in yp[i * wo..(i + 1) * wo].iter_mut().enumerate() {
                            let m0 = if r0[2 * j + 1] > r0[2 * j] {
                                r0[2 * j + 1]
                            } else {
                                r0[2 * j]
                            };
                            let m1 = if r1[2 * j + 1] > r1[2 * j] {
                                r1[2 * j + 1]
                            } else {
                                r1[2 * j]
                            };
                            *yv = if m1 > m0 { m1 } else { m0 };
                        }
                    }
                });
                Ok((storage(y), Shape::from((n, c, ho, wo))))
            })
        })
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &MaxPool2x2Grad,
        )?))
    }
}

/// `dx` of [`MaxPool2x2`] from `(x, y, dy)`.
struct MaxPool2x2Grad;

impl CustomOp3 for MaxPool2x2Grad {
    fn name(&self) -> &'static str {
        "cosilo-max-pool-2x2-grad"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = pool_dims(xl)?;
        let (ho, wo) = (h / 2, w / 2);
        if yl.shape().dims() != [n, c, ho, wo] || dl.shape() != yl.shape() {
            candle_core::bail!(
                "max_pool_2x2 backward: x {:?}, y {:?}, dy {:?}",
                xl.shape(),
                yl.shape(),
                dl.shape()
            );
        }
        super::profile::timed(self.name(), || {
            dispatch!("max_pool_2x2 backward", xs, |T| {
                let x = data::<T>(self.name(), xs, xl)?;
                let y = data::<T>(self.name(), ys, yl)?;
                let dy = data::<T>(self.name(), ds, dl)?;
                let mut dx = par::zeroed(x.len());
                par::for_each_chunk(&mut dx, h * w, |plane, dxp| {
                    let xp = &x[plane * h * w..][..h * w];
                    let yp = &y[plane * ho * wo..][..ho * wo];
                    let dyp = &dy[plane * ho * wo..][..ho * wo];
                    let zero = zero::<T>();
                    for r in 0..h {
                        let xr = &xp[r * w..][..w];
                        let dxr = &mut dxp[r * w..][..w];
                        let yr = &yp[(r / 2) * wo..][..wo];
                        let dyr = &dyp[(r / 2) * wo..][..wo];
                        for (((d, xv), &yv), &g) in dxr
                            .chunks_exact_mut(2)
                            .zip(xr.chunks_exact(2))
                            .zip(yr)
                            .zip(dyr)
                        {
                            d[0] = if xv[0] == yv { g } else { zero };
                            d[1] = if xv[1] == yv { g } else { zero };
                        }
                    }
                });
                Ok((storage(dx), xl.shape().clone()))
            })
        })
    }
}

struct CatChannels;

impl CustomOp2 for CatChannels {
    fn name(&self) -> &'static str {
        "cosilo-cat-channels"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (da, db) = (al.shape().dims(), bl.shape().dims());
        if da.len() < 2 || da.len() != db.len() || da[0] != db[0] || da[2..] != db[2..] {
            candle_core::bail!("cat_channels: {:?} and {:?}", al.shape(), bl.shape());
        }
        let n = da[0];
        let per_a = al.shape().elem_count() / n.max(1);
        let per_b = bl.shape().elem_count() / n.max(1);
        let mut dims = da.to_vec();
        dims[1] += db[1];
        super::profile::timed(self.name(), || {
            dispatch!("cat_channels", as_, |T| {
                let a = data::<T>(self.name(), as_, al)?;
                let b = data::<T>(self.name(), bs, bl)?;
                let mut out = par::zeroed(a.len() + b.len());
                par::for_each_chunk(&mut out, per_a + per_b, |i, o| {
                    o[..per_a].copy_from_slice(&a[i * per_a..(i + 1) * per_a]);
                    o[per_a..].copy_from_slice(&b[i * per_b..(i + 1) * per_b]);
                });
                Ok((storage(out), Shape::from(dims)))
            })
        })
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ca = a.dim(1)?;
        let cb = b.dim(1)?;
        // `contiguous` copies the narrowed channel blocks with one memcpy per image.
        let da = dy.narrow(1, 0, ca)?.contiguous()?;
        let db = dy.narrow(1, ca, cb)?.contiguous()?;
        Ok((Some(da), Some(db)))
    }
}
