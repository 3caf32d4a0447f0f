//! Soft Dice + cross-entropy from logits in one op (the formulation of `train::loss`).
//!
//! Forward: per pixel the softmax over the class axis (kept for the backward), the cross-entropy
//! term and the per-class sums `Σ p·t`, `Σ p`, `Σ t`; the result is `[total, ce, dice_loss]`.
//! Backward, with `N = b·h·w`, `S = Σ_k t_k` per pixel, `D_c = Σ p_c + Σ t_c + s`,
//! `I_c = 2·Σ p_c·t_c + s`:
//! `∂ce/∂z_j = (p_j·S − t_j) / N`; `∂dice_loss/∂p_c = −(2·t_c·D_c − I_c) / (D_c²·(C − 1))` for
//! the foreground classes (0 for class 0), taken through the softmax as
//! `∂/∂z_j = p_j·(g_j − Σ_k p_k·g_k)`. candle's formulation is ~20 tensor-wide ops each way,
//! reducing over a non-innermost axis.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};

use super::{data, dispatch, par, storage, Real};

/// `[ce + dice_loss, ce, dice_loss]` for `logits` and a one-hot (or soft) `target`, both
/// `(b, classes, h, w)`, f32/f64 on the CPU (the caller falls back to candle's ops elsewhere).
pub fn dice_cross_entropy(logits: &Tensor, target: &Tensor, smooth: f64) -> Result<Tensor> {
    logits.contiguous()?.apply_op2(
        &target.contiguous()?,
        DiceCrossEntropy {
            smooth,
            saved: Mutex::new(None),
        },
    )
}

struct DiceCrossEntropy {
    smooth: f64,
    /// Softmax probabilities and per-class `(Σ p·t, Σ p, Σ t)` of the forward, for the backward.
    saved: Mutex<Option<(CpuStorage, Vec<[f64; 3]>)>>,
}

fn dims(l: &Layout, t: &Layout) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    if l.shape() != t.shape() || c < 2 {
        candle_core::bail!(
            "dice_cross_entropy: logits {:?}, target {:?}",
            l.shape(),
            t.shape()
        );
    }
    Ok((b, c, h * w))
}

/// Per image (one task each): softmax into `p`, and (Σ −t·log p, per-class [Σ p·t, Σ p, Σ t]).
fn forward<T: Real>(z: &[T], t: &[T], p: &mut [T], c: usize, hw: usize) -> (f64, Vec<[f64; 3]>) {
    let parts: Vec<(f64, Vec<[f64; 3]>)> = par::map_chunks(p, c * hw, |img, p| {
        let (z, t) = (&z[img * c * hw..][..c * hw], &t[img * c * hw..][..c * hw]);
        let mut ce = 0f64;
        let mut sums = vec![[0f64; 3]; c];
        let mut e = vec![0f64; c];
        for i in 0..hw {
            let mut max = f64::NEG_INFINITY;
            for k in 0..c {
                e[k] = z[k * hw + i].to_f64();
                max = max.max(e[k]);
            }
            let mut se = 0f64;
            for ek in e.iter_mut() {
                *ek = (*ek - max).exp();
                se += *ek;
            }
            let log_se = se.ln();
            for k in 0..c {
                let idx = k * hw + i;
                let pk = e[k] / se;
                let tk = t[idx].to_f64();
                p[idx] = T::from_f64(pk);
                // log p_k = z_k − max − log Σ exp.
                if tk != 0.0 {
                    ce -= tk * (z[idx].to_f64() - max - log_se);
                }
                sums[k][0] += pk * tk;
                sums[k][1] += pk;
                sums[k][2] += tk;
            }
        }
        (ce, sums)
    });
    let mut ce = 0f64;
    let mut sums = vec![[0f64; 3]; c];
    for (e, s) in parts {
        ce += e;
        for (acc, v) in sums.iter_mut().zip(s) {
            for j in 0..3 {
                acc[j] += v[j];
            }
        }
    }
    (ce, sums)
}

impl CustomOp2 for DiceCrossEntropy {
    fn name(&self) -> &'static str {
        "cosilo-dice-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(zl, tl)?;
        super::profile::timed(self.name(), || {
            dispatch!("dice_cross_entropy", zs, |T| {
                let z = data::<T>(self.name(), zs, zl)?;
                let t = data::<T>(self.name(), ts, tl)?;
                let mut p = par::zeroed(z.len());
                let (ce_sum, sums) = forward(z, t, &mut p, c, hw);
                let ce = ce_sum / (b * hw).max(1) as f64;
                let s = self.smooth;
                let dice_mean = sums[1..]
                    .iter()
                    .map(|v| (2.0 * v[0] + s) / (v[1] + v[2] + s))
                    .sum::<f64>()
                    / (c - 1) as f64;
                let dice_loss = 1.0 - dice_mean;
                if let Ok(mut saved) = self.saved.lock() {
                    *saved = Some((storage(p), sums));
                }
                let out = vec![
                    T::from_f64(ce + dice_loss),
                    T::from_f64(ce),
                    T::from_f64(dice_loss),
                ];
                Ok((storage(out), Shape::from(3)))
            })
        })
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().ok().and_then(|s| s.clone());
        let Some((p, sums)) = saved else {
            candle_core::bail!("dice_cross_entropy: backward without a forward");
        };
        let g: Vec<f64> = grad.to_dtype(candle_core::DType::F64)?.to_vec1()?;
        let op = DiceCrossEntropyGrad {
            smooth: self.smooth,
            p: Mutex::new(Some(p)),
            sums,
            grad: [g[0], g[1], g[2]],
        };
        Ok((Some(z.apply_op2_no_bwd(t, &op)?), None))
    }
}

/// `∂/∂logits` of `grad · [total, ce, dice_loss]`, from `(logits, target)` and the forward's
/// saved softmax.
struct DiceCrossEntropyGrad {
    smooth: f64,
    p: Mutex<Option<CpuStorage>>,
    sums: Vec<[f64; 3]>,
    grad: [f64; 3],
}

impl CustomOp2 for DiceCrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cosilo-dice-cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, hw) = dims(zl, tl)?;
        let n = (b * hw).max(1) as f64;
        let w_ce = (self.grad[0] + self.grad[1]) / n;
        let w_dice = (self.grad[0] + self.grad[2]) / (c - 1) as f64;
        let s = self.smooth;
        // ∂dice_loss/∂p_k = −(2 t_k D_k − I_k)/D_k² · w_dice = a_k + b_k·t_k.
        let mut coef = vec![(0f64, 0f64); c];
        for (k, v) in self.sums.iter().enumerate().skip(1) {
            let d = v[1] + v[2] + s;
            let i2 = 2.0 * v[0] + s;
            coef[k] = (w_dice * i2 / (d * d), -w_dice * 2.0 / d);
        }
        let Some(p) = self.p.lock().ok().and_then(|mut p| p.take()) else {
            candle_core::bail!("dice_cross_entropy backward: the softmax was not saved");
        };
        super::profile::timed(self.name(), || {
            dispatch!("dice_cross_entropy backward", zs, |T| {
                let t = data::<T>(self.name(), ts, tl)?;
                let p = p.as_slice::<T>()?;
                let mut dz = par::zeroed(p.len());
                par::for_each_chunk(&mut dz, c * hw, |img, dz| {
                    let (p, t) = (&p[img * c * hw..][..c * hw], &t[img * c * hw..][..c * hw]);
                    let mut gk = vec![0f64; c];
                    let mut pk = vec![0f64; c];
                    let mut tk = vec![0f64; c];
                    for i in 0..hw {
                        let mut st = 0f64;
                        let mut pg = 0f64;
                        for k in 0..c {
                            tk[k] = t[k * hw + i].to_f64();
                            pk[k] = p[k * hw + i].to_f64();
                            st += tk[k];
                            gk[k] = coef[k].0 + coef[k].1 * tk[k];
                            pg += pk[k] * gk[k];
                        }
                        for k in 0..c {
                            let d = w_ce * (pk[k] * st - tk[k]) + pk[k] * (gk[k] - pg);
                            dz[k * hw + i] = T::from_f64(d);
                        }
                    }
                });
                Ok((storage(dz), zl.shape().clone()))
            })
        })
    }
}
