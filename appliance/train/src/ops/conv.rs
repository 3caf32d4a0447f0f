//! Stride-1 convolutions: `conv2d` + bias (the 2×2 stride-2 transposed convolution is in
//! `conv_transpose`, which shares this file's per-image drivers).
//!
//! `conv2d` forward, per image and per tile of output rows: unfold the input (im2col) into a
//! `(cin·k·k) × pixels` matrix small enough to stay in cache, then `y = W · cols (+ b)` with
//! `gemm`. Backward: the input gradient of a stride-1 convolution is itself a stride-1 convolution
//! of `dy` with the kernel flipped in space and transposed in channels (padding `k − 1 − p`), so it
//! reuses the forward kernel; the weight gradient is `Σ dy_tile · cols_tileᵀ` and the bias
//! gradient the sum of `dy`, both accumulated per thread and then added.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

use super::direct::{self, CO_BLOCK};
use super::gemm::{matmul, MatMut, MatRef};
use super::{custom_path, data, dispatch, par, reference, storage, threads, zero, Real};

/// Elements of one im2col tile (512 KiB in f32): keeps the unfolded tile in L2 for the product.
const TILE_ELEMS: usize = 1 << 17;
/// ... but never fewer output pixels than this per product, so that `gemm` stays efficient.
const TILE_MIN_PIXELS: usize = 256;

/// `conv2d(x, w, padding, stride 1) + b` for `x (n, cin, h, w)`, `w (cout, cin, k, k)`,
/// `b (cout)`. Same result as `candle_nn::Conv2d` with that padding.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, padding: usize) -> Result<Tensor> {
    let (_, _, k, k2) = w.dims4()?;
    if !custom_path(x) || k != k2 || padding >= k {
        return reference::conv2d(x, w, b, padding);
    }
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv2d { padding })
}

/// Geometry of one stride-1 convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geom {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub k: usize,
    pub pad: usize,
    pub ho: usize,
    pub wo: usize,
}

/// The convolution kernels for one element type: the direct AVX2 ones for f32 where they apply,
/// im2col + `gemm` otherwise.
pub(super) trait Convolve: Real {
    /// `y = conv(x, w) (+ b)`, `(n, cout, ho, wo)`.
    fn conv(x: &[Self], w: &[Self], b: Option<&[Self]>, g: &Geom) -> Vec<Self> {
        conv_forward(x, w, b, g)
    }

    /// `[dw, db]` for `dy (n, cout, ho, wo)` of the convolution `g` of `x`.
    fn conv_weight_grad(x: &[Self], dy: &[Self], g: &Geom) -> Vec<Self> {
        weight_grad_im2col(x, dy, g)
    }
}

/// `[dw, db]` with im2col tiles × `gemm`, per image, summed over the images.
fn weight_grad_im2col<T: Real>(x: &[T], dy: &[T], g: &Geom) -> Vec<T> {
    let kk = g.patch();
    let (per_x, per_y) = (g.cin * g.h * g.w, g.cout * g.ho * g.wo);
    sum_over_images::<T>(g.n, g.cout * kk + g.cout, |i, acc, gt| {
        weight_grad_image(
            &x[i * per_x..][..per_x],
            &dy[i * per_y..][..per_y],
            g,
            acc,
            gt,
        )
    })
}

impl Convolve for f64 {}

impl Convolve for f32 {
    fn conv(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &Geom) -> Vec<f32> {
        if use_direct(g) {
            direct_forward(x, w, b, g)
        } else {
            conv_forward(x, w, b, g)
        }
    }

    fn conv_weight_grad(x: &[f32], dy: &[f32], g: &Geom) -> Vec<f32> {
        if use_direct(g) {
            direct_weight_grad(x, dy, g)
        } else {
            weight_grad_im2col(x, dy, g)
        }
    }
}

impl Geom {
    pub(super) fn new(
        n: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        pad: usize,
    ) -> Result<Self> {
        if h + 2 * pad < k || w + 2 * pad < k {
            candle_core::bail!(
                "conv2d: kernel {k} larger than the padded input {h}×{w} (padding {pad})"
            );
        }
        Ok(Geom {
            n,
            cin,
            h,
            w,
            cout,
            k,
            pad,
            ho: h + 2 * pad + 1 - k,
            wo: w + 2 * pad + 1 - k,
        })
    }

    /// Rows of the unfolded matrix (`cin · k · k`).
    pub(super) fn patch(&self) -> usize {
        self.cin * self.k * self.k
    }

    /// Output rows per im2col tile.
    fn tile_rows(&self) -> usize {
        let by_cache = TILE_ELEMS / (self.patch() * self.wo).max(1);
        let by_gemm = TILE_MIN_PIXELS.div_ceil(self.wo);
        by_cache.max(by_gemm).clamp(1, self.ho.max(1))
    }
}

/// Whether the direct AVX2 kernels ([`direct`]) handle this convolution (f32 is checked by the
/// callers): 3×3, padding 1, output channels in blocks of 4.
fn use_direct(g: &Geom) -> bool {
    g.k == 3 && g.pad == 1 && g.cout % CO_BLOCK == 0 && direct::available()
}

/// All images of `x (n, c, h, w)` in [`direct::pad_input`]'s layout.
fn pad_images(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let plane = c * (h + 2) * direct::padded_width(w);
    let mut xp = par::zeroed(n * plane);
    par::for_each_chunk(&mut xp, plane, |i, o| {
        direct::pad_input(&x[i * c * h * w..][..c * h * w], c, h, w, o)
    });
    xp
}

/// [`conv_forward`] with the direct kernels; one task per (image, block of 4 output channels).
fn direct_forward(x: &[f32], wt: &[f32], bias: Option<&[f32]>, g: &Geom) -> Vec<f32> {
    let xp = pad_images(x, g.n, g.cin, g.h, g.w);
    let plane = g.cin * (g.h + 2) * direct::padded_width(g.w);
    let hw = g.h * g.w;
    let blocks = g.cout / CO_BLOCK;
    let mut y = par::zeroed(g.n * g.cout * hw);
    par::for_each_chunk(&mut y, CO_BLOCK * hw, |t, yb| {
        let (img, cb) = (t / blocks, t % blocks);
        direct::forward_block(
            &xp[img * plane..][..plane],
            g.cin,
            g.h,
            g.w,
            wt,
            cb * CO_BLOCK,
            bias,
            yb,
        );
    });
    y
}

/// `[dw, db]` of a 3×3 convolution with the direct kernels: one task per (image, block of 4
/// output channels) over all input channels, then a sum over the images.
fn direct_weight_grad(x: &[f32], dy: &[f32], g: &Geom) -> Vec<f32> {
    let (n, cin, cout, h, w) = (g.n, g.cin, g.cout, g.h, g.w);
    let xp = pad_images(x, n, cin, h, w);
    let plane = cin * (h + 2) * direct::padded_width(w);
    let wr = w.div_ceil(8) * 8;
    let padded_dy;
    let dyp: &[f32] = if wr == w {
        dy
    } else {
        let mut p = par::zeroed(n * cout * h * wr);
        par::for_each_chunk(&mut p, wr, |row, o| {
            o[..w].copy_from_slice(&dy[row * w..][..w])
        });
        padded_dy = p;
        &padded_dy
    };
    let blocks = cout / CO_BLOCK;
    let hw = h * w;
    // Per task: dw of its 4 output channels for every input channel, then their 4 bias sums.
    let per_task: Vec<Vec<f64>> = par::map(n * blocks, |t| {
        let (img, cb) = (t / blocks, t % blocks);
        let mut out = vec![0f64; cin * CO_BLOCK * 9 + CO_BLOCK];
        for j in 0..CO_BLOCK {
            let plane = &dy[(img * cout + cb * CO_BLOCK + j) * hw..][..hw];
            out[cin * CO_BLOCK * 9 + j] = plane.iter().map(|&v| v as f64).sum();
        }
        for ci in 0..cin {
            let acc: &mut [f64; CO_BLOCK * 9] = (&mut out[ci * CO_BLOCK * 9..][..CO_BLOCK * 9])
                .try_into()
                .expect("a block of CO_BLOCK · 9");
            direct::weight_grad_block(
                &xp[img * plane..][..plane],
                &dyp[img * cout * h * wr..][..cout * h * wr],
                h,
                w,
                ci,
                cb * CO_BLOCK,
                acc,
            );
        }
        out
    });
    let mut dw = vec![0f64; cout * cin * 9];
    let mut db = vec![0f64; cout];
    for (t, out) in per_task.iter().enumerate() {
        let cb = t % blocks;
        for j in 0..CO_BLOCK {
            db[cb * CO_BLOCK + j] += out[cin * CO_BLOCK * 9 + j];
        }
        for ci in 0..cin {
            for j in 0..CO_BLOCK {
                for tap in 0..9 {
                    dw[((cb * CO_BLOCK + j) * cin + ci) * 9 + tap] +=
                        out[(ci * CO_BLOCK + j) * 9 + tap];
                }
            }
        }
    }
    dw.iter().chain(&db).map(|&v| v as f32).collect()
}

/// Unfolds output rows `r0..r1` of one image `x (cin, h, w)` into `cols`, row-major
/// `(cin·k·k) × ((r1 − r0)·wo)`, zero where the window reaches into the padding.
fn im2col<T: Real>(x: &[T], g: &Geom, r0: usize, r1: usize, cols: &mut [T]) {
    let p = (r1 - r0) * g.wo;
    let plane = g.h * g.w;
    for ci in 0..g.cin {
        let src_plane = &x[ci * plane..(ci + 1) * plane];
        for ky in 0..g.k {
            for kx in 0..g.k {
                let row = &mut cols[((ci * g.k + ky) * g.k + kx) * p..][..p];
                // Output column c reads input column c + kx − pad when that is inside 0..w.
                let c_lo = g.pad.saturating_sub(kx).min(g.wo);
                let c_hi = (g.w + g.pad).saturating_sub(kx).min(g.wo).max(c_lo);
                for r in r0..r1 {
                    let dst = &mut row[(r - r0) * g.wo..][..g.wo];
                    let sr = r + ky;
                    if sr < g.pad || sr - g.pad >= g.h {
                        dst.fill(zero());
                        continue;
                    }
                    let src = &src_plane[(sr - g.pad) * g.w..][..g.w];
                    dst[..c_lo].fill(zero());
                    dst[c_hi..].fill(zero());
                    let s0 = c_lo + kx - g.pad;
                    dst[c_lo..c_hi].copy_from_slice(&src[s0..s0 + (c_hi - c_lo)]);
                }
            }
        }
    }
}

/// One image: `y (cout, ho·wo) = wmat (cout, cin·k·k) · im2col(x) (+ bias)`.
fn conv_image<T: Real>(
    x: &[T],
    wmat: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    y: &mut [T],
    gemm_threads: usize,
) {
    let hw = g.ho * g.wo;
    if let Some(bias) = bias {
        for (co, plane) in y.chunks_mut(hw).enumerate() {
            plane.fill(bias[co]);
        }
    }
    let kk = g.patch();
    let rows = g.tile_rows();
    let mut cols = vec![zero::<T>(); kk * rows * g.wo];
    let mut r0 = 0;
    while r0 < g.ho {
        let r1 = (r0 + rows).min(g.ho);
        let p = (r1 - r0) * g.wo;
        let cols = &mut cols[..kk * p];
        im2col(x, g, r0, r1, cols);
        let dst = MatMut {
            data: &mut y[r0 * g.wo..],
            rows: g.cout,
            cols: p,
            rs: hw,
            cs: 1,
        };
        matmul(
            dst,
            bias.is_some(),
            MatRef::rows(wmat, g.cout, kk),
            MatRef::rows(cols, kk, p),
            gemm_threads,
        );
        r0 = r1;
    }
}

/// Runs `f(image, out_slice, gemm_threads)` for every image's `per`-element slice of `out`,
/// images across threads when there are enough of them, otherwise the threads inside `gemm`.
pub(super) fn for_each_image<T: Real>(
    out: &mut [T],
    per: usize,
    f: impl Fn(usize, &mut [T], usize) + Sync,
) {
    let t = threads();
    let n = out.len() / per.max(1);
    if per == 0 {
        return;
    }
    if t > 1 && n >= t {
        par::for_each_chunk(out, per, |i, o| f(i, o, 1));
    } else {
        out.chunks_mut(per)
            .enumerate()
            .for_each(|(i, o)| f(i, o, t));
    }
}

/// `Σ_images f(image, acc, gemm_threads)` into a `len`-element accumulator: one accumulator per
/// thread (a fixed split of the images, so the summation order is reproducible) when there are
/// enough images, otherwise one accumulator and the threads inside `gemm`.
pub(super) fn sum_over_images<T: Real>(
    n: usize,
    len: usize,
    f: impl Fn(usize, &mut [T], usize) + Sync,
) -> Vec<T> {
    let t = threads();
    if t > 1 && n >= t {
        let parts: Vec<Vec<T>> = par::map(t, |c| {
            let mut acc = vec![zero::<T>(); len];
            for i in (c..n).step_by(t) {
                f(i, &mut acc, 1);
            }
            acc
        });
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or_else(|| vec![zero::<T>(); len]);
        for p in parts {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        out
    } else {
        let mut acc = vec![zero::<T>(); len];
        for i in 0..n {
            f(i, &mut acc, t);
        }
        acc
    }
}

fn conv_forward<T: Real>(x: &[T], wmat: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    let per_in = g.cin * g.h * g.w;
    let per_out = g.cout * g.ho * g.wo;
    let mut y = par::zeroed(g.n * per_out);
    for_each_image(&mut y, per_out, |i, out, gt| {
        conv_image(&x[i * per_in..(i + 1) * per_in], wmat, bias, g, out, gt)
    });
    y
}

/// Flips `w (cout, cin, k, k)` in space and swaps its channel axes: `(cin, cout, k, k)`.
fn flip_transpose<T: Real>(w: &[T], cout: usize, cin: usize, k: usize) -> Vec<T> {
    let kk = k * k;
    let mut out = vec![zero::<T>(); w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            let src = &w[(co * cin + ci) * kk..][..kk];
            let dst = &mut out[(ci * cout + co) * kk..][..kk];
            for (j, d) in dst.iter_mut().enumerate() {
                *d = src[kk - 1 - j];
            }
        }
    }
    out
}

struct Conv2d {
    padding: usize,
}

impl CustomOp3 for Conv2d {
    fn name(&self) -> &'static str {
        "cosilo-conv2d"
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
        let (n, cin, h, w) = xl.shape().dims4()?;
        let (cout, wcin, k, _) = wl.shape().dims4()?;
        if wcin != cin || bl.shape().dims1()? != cout {
            candle_core::bail!(
                "conv2d: input {:?}, weight {:?}, bias {:?}",
                xl.shape(),
                wl.shape(),
                bl.shape()
            );
        }
        let g = Geom::new(n, cin, h, w, cout, k, self.padding)?;
        super::profile::timed(self.name(), || {
            dispatch!("conv2d", xs, |T| {
                let y = T::conv(
                    data(self.name(), xs, xl)?,
                    data(self.name(), ws, wl)?,
                    Some(data(self.name(), bs, bl)?),
                    &g,
                );
                Ok((storage(y), Shape::from((n, cout, g.ho, g.wo))))
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
            Some(dy.apply_op2_no_bwd(
                w,
                &ConvInputGrad {
                    padding: self.padding,
                },
            )?)
        } else {
            None
        };
        let packed = dy.apply_op2_no_bwd(
            x,
            &ConvWeightGrad {
                padding: self.padding,
            },
        )?;
        let nw = w.elem_count();
        let dw = packed.narrow(0, 0, nw)?.reshape(w.shape())?;
        let db = packed.narrow(0, nw, b.elem_count())?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// `dx` of a stride-1 convolution with `padding` from `dy` and the weights `w`.
pub(super) fn input_grad(dy: &Tensor, w: &Tensor, padding: usize) -> Result<Tensor> {
    dy.apply_op2_no_bwd(w, &ConvInputGrad { padding })
}

/// `dx` of [`Conv2d`] from `(dy, w)`.
struct ConvInputGrad {
    padding: usize,
}

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "cosilo-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, ho, wo) = dl.shape().dims4()?;
        let (wcout, cin, k, _) = wl.shape().dims4()?;
        if wcout != cout || self.padding >= k {
            candle_core::bail!(
                "conv2d backward: dy {:?}, weight {:?}",
                dl.shape(),
                wl.shape()
            );
        }
        // dx = conv(dy, flip(w)ᵀ, padding k − 1 − p): a convolution from cout to cin channels.
        let g = Geom::new(n, cout, ho, wo, cin, k, k - 1 - self.padding)?;
        super::profile::timed(self.name(), || {
            dispatch!("conv2d backward", ds, |T| {
                let wt = flip_transpose::<T>(data(self.name(), ws, wl)?, cout, cin, k);
                let dx = T::conv(data(self.name(), ds, dl)?, &wt, None, &g);
                Ok((storage(dx), Shape::from((n, cin, g.ho, g.wo))))
            })
        })
    }
}

/// `[dw (cout·cin·k·k), db (cout)]` of [`Conv2d`] from `(dy, x)`, packed in one vector.
struct ConvWeightGrad {
    padding: usize,
}

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "cosilo-conv2d-weight-grad"
    }

    fn cpu_fwd(
        &self,
        ds: &CpuStorage,
        dl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cout, ho, wo) = dl.shape().dims4()?;
        let (xn, cin, h, w) = xl.shape().dims4()?;
        let k = (h + 2 * self.padding + 1).saturating_sub(ho);
        let g = Geom::new(n, cin, h, w, cout, k, self.padding)?;
        if xn != n || k == 0 || g.ho != ho || g.wo != wo {
            candle_core::bail!("conv2d backward: dy {:?}, x {:?}", dl.shape(), xl.shape());
        }
        super::profile::timed(self.name(), || {
            dispatch!("conv2d backward", ds, |T| {
                let dy = data::<T>(self.name(), ds, dl)?;
                let x = data::<T>(self.name(), xs, xl)?;
                let packed = T::conv_weight_grad(x, dy, &g);
                let nw = cout * g.patch();
                Ok((storage(packed), Shape::from(nw + cout)))
            })
        })
    }
}

/// Adds one image's `dw = dy · im2col(x)ᵀ` and `db = Σ dy` to `acc = [dw, db]`.
fn weight_grad_image<T: Real>(x: &[T], dy: &[T], g: &Geom, acc: &mut [T], gemm_threads: usize) {
    let hw = g.ho * g.wo;
    let kk = g.patch();
    let (dw, db) = acc.split_at_mut(g.cout * kk);
    for (co, plane) in dy.chunks(hw).enumerate() {
        let mut s = zero::<T>();
        for &v in plane {
            s += v;
        }
        db[co] += s;
    }
    let rows = g.tile_rows();
    let mut cols = vec![zero::<T>(); kk * rows * g.wo];
    let mut r0 = 0;
    while r0 < g.ho {
        let r1 = (r0 + rows).min(g.ho);
        let p = (r1 - r0) * g.wo;
        let cols = &mut cols[..kk * p];
        im2col(x, g, r0, r1, cols);
        let lhs = MatRef {
            data: &dy[r0 * g.wo..],
            rows: g.cout,
            cols: p,
            rs: hw,
            cs: 1,
        };
        matmul(
            MatMut::rows(dw, g.cout, kk),
            true,
            lhs,
            MatRef::rows_t(cols, kk, p),
            gemm_threads,
        );
        r0 = r1;
    }
}
