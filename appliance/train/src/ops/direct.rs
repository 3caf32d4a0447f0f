//! Direct 3×3 (padding 1, stride 1) convolution kernels for f32 with AVX2 + FMA.
//!
//! im2col + `gemm` spends half its time outside the multiply (unfolding 9 copies of the input,
//! `gemm`'s own packing, an output only 8-16 channels wide). These kernels instead keep a block of
//! the output in registers and stream the input straight from a zero-padded copy:
//!
//! - forward (and the input gradient, which is the forward on the flipped, transposed kernel):
//!   4 output channels × 24 pixels of one row in 12 accumulators (16 or 8 pixels at the end of a
//!   row); per input channel and tap, three unaligned loads, four weight broadcasts, twelve FMAs;
//! - weight gradient: for one input channel, one kernel row and 4 output channels, 4 × 3
//!   accumulators over all pixels of all images; per 8 pixels, three input loads, four gradient
//!   loads and twelve FMAs. Lanes are summed in f64 once per image.
//!
//! Callers check [`available`] and the shapes (`cout % 4 == 0`); everything else takes the
//! im2col path. The padded layouts: input `(c, h + 2, wp)` with `wp = round_up(w, 8) + 10`, value
//! `(r, col)` at `(r + 1, col + 1)`; the weight gradient reads `dy` as `(cout, h, wr)` with
//! `wr = round_up(w, 8)`, zero beyond `w`.

/// Output channels per register block.
pub const CO_BLOCK: usize = 4;

/// Whether the CPU has the instructions these kernels use.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| {
            let off = std::env::var_os("COSILO_DIRECT_CONV").is_some_and(|v| v == "0");
            !off && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Width of a padded input row for output width `w`: the left border, `w` values, and zeros up
/// to the furthest load of the last (partial) pixel block.
pub fn padded_width(w: usize) -> usize {
    w.div_ceil(8) * 8 + 10
}

/// Copies `x (c, h, w)` into the padded layout `(c, h + 2, padded_width(w))`; `out` must be
/// zero (only the interior is written).
pub fn pad_input(x: &[f32], c: usize, h: usize, w: usize, out: &mut [f32]) {
    let wp = padded_width(w);
    let plane = (h + 2) * wp;
    for ci in 0..c {
        for r in 0..h {
            let src = &x[(ci * h + r) * w..][..w];
            out[ci * plane + (r + 1) * wp + 1..][..w].copy_from_slice(src);
        }
    }
}

/// `y[j] (h, w) = bias[co0 + j] + Σ_ci,ky,kx wt[co0 + j, ci, ky, kx] · xp[ci, r + ky, c + kx]` for
/// `j < 4`, with `xp` from [`pad_input`] and `wt (cout, cin, 3, 3)`.
#[allow(clippy::too_many_arguments)]
pub fn forward_block(
    xp: &[f32],
    cin: usize,
    h: usize,
    w: usize,
    wt: &[f32],
    co0: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let wp = padded_width(w);
    assert!(xp.len() >= cin * (h + 2) * wp, "padded input too short");
    assert!(wt.len() >= (co0 + CO_BLOCK) * cin * 9, "weights too short");
    assert!(y.len() >= CO_BLOCK * h * w, "output too short");
    assert!(
        bias.is_none_or(|b| b.len() >= co0 + CO_BLOCK),
        "bias too short"
    );
    assert!(
        available(),
        "AVX2/FMA kernels called without the instructions"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX2 + FMA (checked), and every access is inside the slices: rows
    // r + ky ≤ h + 1 of planes of h + 2 rows; a block starting at c0 covers < w + 8 columns, so
    // loads reach column < w + 10 ≤ wp; stores stop at w.
    unsafe {
        x86::forward_block(xp, cin, h, w, wp, wt, co0, bias, y)
    }
}

/// Adds `Σ_pixels dy[co0 + j, r, c] · xp[ci, r + ky, c + kx]` to `out[j·9 + ky·3 + kx]` for one
/// image, `dyp (cout, h, wr)` zero beyond `w`, `xp` from [`pad_input`].
#[allow(clippy::too_many_arguments)]
pub fn weight_grad_block(
    xp: &[f32],
    dyp: &[f32],
    h: usize,
    w: usize,
    ci: usize,
    co0: usize,
    out: &mut [f64; CO_BLOCK * 9],
) {
    let wp = padded_width(w);
    let wr = w.div_ceil(8) * 8;
    assert!(
        xp.len() >= (ci + 1) * (h + 2) * wp,
        "padded input too short"
    );
    assert!(dyp.len() >= (co0 + CO_BLOCK) * h * wr, "gradient too short");
    assert!(
        available(),
        "AVX2/FMA kernels called without the instructions"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 + FMA present (checked); rows r + ky ≤ h + 1, columns c0 + kx + 7 ≤ wr + 1 < wp
    // of the padded input, and rows < h, columns < wr of the padded gradient.
    unsafe {
        x86::weight_grad_block(xp, dyp, h, wr, wp, ci, co0, out)
    }
}

#[cfg(target_arch = "x86_64")]
// Register blocks index several arrays by the same channel / pixel counters.
#[allow(clippy::needless_range_loop)]
mod x86 {
    use std::arch::x86_64::*;

    use super::CO_BLOCK;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn forward_block(
        xp: &[f32],
        cin: usize,
        h: usize,
        w: usize,
        wp: usize,
        wt: &[f32],
        co0: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
    ) {
        let mut init = [_mm256_setzero_ps(); CO_BLOCK];
        if let Some(b) = bias {
            for (j, v) in init.iter_mut().enumerate() {
                *v = _mm256_set1_ps(b[co0 + j]);
            }
        }
        let k = Kernel {
            xp: xp.as_ptr(),
            plane: (h + 2) * wp,
            wp,
            wt: wt.as_ptr().add(co0 * cin * 9),
            wstride: cin * 9,
            cin,
            init,
        };
        let (yp, plane_out) = (y.as_mut_ptr(), h * w);
        for r in 0..h {
            let mut c0 = 0;
            while c0 < w {
                let rem = w - c0;
                // 24-pixel blocks (12 accumulators) while they fit, then 16 or 8.
                let px = if rem >= 24 {
                    k.block::<3>(r, c0, yp.add(r * w + c0), plane_out, rem)
                } else if rem > 8 {
                    k.block::<2>(r, c0, yp.add(r * w + c0), plane_out, rem)
                } else {
                    k.block::<1>(r, c0, yp.add(r * w + c0), plane_out, rem)
                };
                c0 += px;
            }
        }
    }

    /// What one forward block needs: the padded input, the block's weights and initial values.
    struct Kernel {
        xp: *const f32,
        plane: usize,
        wp: usize,
        /// Weights of the block's first output channel, `(cin, 3, 3)`; the next at `+ wstride`.
        wt: *const f32,
        wstride: usize,
        cin: usize,
        init: [__m256; CO_BLOCK],
    }

    impl Kernel {
        /// Output row `r`, columns `c0..c0 + 8·PX` (the first `rem` of them stored) of the
        /// block's 4 channels, each `plane_out` apart from `dst`. Returns the columns covered.
        #[inline(always)]
        unsafe fn block<const PX: usize>(
            &self,
            r: usize,
            c0: usize,
            dst: *mut f32,
            plane_out: usize,
            rem: usize,
        ) -> usize {
            let mut acc = [[_mm256_setzero_ps(); PX]; CO_BLOCK];
            for j in 0..CO_BLOCK {
                acc[j] = [self.init[j]; PX];
            }
            for ci in 0..self.cin {
                let wbase = self.wt.add(ci * 9);
                for ky in 0..3 {
                    let row = self.xp.add(ci * self.plane + (r + ky) * self.wp + c0);
                    for kx in 0..3 {
                        let mut xv = [_mm256_setzero_ps(); PX];
                        for (p, v) in xv.iter_mut().enumerate() {
                            *v = _mm256_loadu_ps(row.add(kx + 8 * p));
                        }
                        let t = ky * 3 + kx;
                        for j in 0..CO_BLOCK {
                            let wv = _mm256_broadcast_ss(&*wbase.add(j * self.wstride + t));
                            for p in 0..PX {
                                acc[j][p] = _mm256_fmadd_ps(wv, xv[p], acc[j][p]);
                            }
                        }
                    }
                }
            }
            let valid = rem.min(8 * PX);
            for (j, a) in acc.iter().enumerate() {
                let out = dst.add(j * plane_out);
                if valid == 8 * PX {
                    for (p, v) in a.iter().enumerate() {
                        _mm256_storeu_ps(out.add(8 * p), *v);
                    }
                } else {
                    let mut tmp = [0f32; 24];
                    for (p, v) in a.iter().enumerate() {
                        _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * p), *v);
                    }
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, valid);
                }
            }
            8 * PX
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256) -> f64 {
        let mut t = [0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), v);
        t.iter().map(|&x| x as f64).sum()
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weight_grad_block(
        xp: &[f32],
        dyp: &[f32],
        h: usize,
        wr: usize,
        wp: usize,
        ci: usize,
        co0: usize,
        out: &mut [f64; CO_BLOCK * 9],
    ) {
        let plane = (h + 2) * wp;
        let xp = xp.as_ptr().add(ci * plane);
        let dyp = dyp.as_ptr();
        for ky in 0..3 {
            let mut acc = [[_mm256_setzero_ps(); 3]; CO_BLOCK];
            for r in 0..h {
                let xrow = xp.add((r + ky) * wp);
                let mut c0 = 0;
                while c0 < wr {
                    let x0 = _mm256_loadu_ps(xrow.add(c0));
                    let x1 = _mm256_loadu_ps(xrow.add(c0 + 1));
                    let x2 = _mm256_loadu_ps(xrow.add(c0 + 2));
                    for j in 0..CO_BLOCK {
                        let d = _mm256_loadu_ps(dyp.add(((co0 + j) * h + r) * wr + c0));
                        acc[j][0] = _mm256_fmadd_ps(d, x0, acc[j][0]);
                        acc[j][1] = _mm256_fmadd_ps(d, x1, acc[j][1]);
                        acc[j][2] = _mm256_fmadd_ps(d, x2, acc[j][2]);
                    }
                    c0 += 8;
                }
            }
            for (j, a) in acc.iter().enumerate() {
                for (kx, v) in a.iter().enumerate() {
                    out[j * 9 + ky * 3 + kx] += hsum(*v);
                }
            }
        }
    }
}
