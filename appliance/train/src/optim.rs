//! AdamW whose state can be saved with the weights, so training resumes exactly after a restart.
//!
//! candle-nn's `AdamW` keeps its moments private; checkpoint/resume needs them, so the update is
//! written here (Loshchilov & Hutter's decoupled weight decay, bias-corrected moments). Weight decay
//! applies to convolution weights only, not to biases or normalisation parameters.
//!
//! On the CPU each variable's update is three in-place candle ops (first moment, second moment,
//! weights), one pass each over memory, instead of a dozen tensor-wide ops that allocate; elsewhere
//! the same update is written with candle's tensor ops.

use std::collections::HashMap;

use candle_core::{
    backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor, Var,
    WithDType,
};
use candle_nn::VarMap;

/// Hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    decay: bool,
}

/// The optimiser over every variable of a [`VarMap`], in name order.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Completed update steps (for bias correction).
    pub step: u64,
}

impl AdamW {
    pub fn new(vars: &VarMap, cfg: AdamWConfig) -> Result<Self> {
        let data = vars
            .data()
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned var map"))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut slots = Vec::with_capacity(names.len());
        for name in names {
            let var = data[name].clone();
            // Two allocations: the moments are updated in place.
            slots.push(Slot {
                name: name.clone(),
                decay: name.ends_with(".weight") && !name.contains(".norm"),
                m: var.as_tensor().zeros_like()?,
                v: var.as_tensor().zeros_like()?,
                var,
            });
        }
        Ok(AdamW {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update from the gradients of a backward pass.
    pub fn apply(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let theta = s.var.as_tensor();
            if theta.device().is_cpu() && matches!(theta.dtype(), DType::F32 | DType::F64) {
                let g = g.contiguous()?;
                s.m.inplace_op2(
                    &g,
                    &Moment {
                        beta: c.beta1,
                        square: false,
                    },
                )?;
                s.v.inplace_op2(
                    &g,
                    &Moment {
                        beta: c.beta2,
                        square: true,
                    },
                )?;
                let step = Step {
                    lr: c.lr,
                    eps: c.eps,
                    bc1,
                    bc2,
                    decay: if s.decay {
                        1.0 - c.lr * c.weight_decay
                    } else {
                        1.0
                    },
                };
                theta.inplace_op3(&s.m, &s.v, &step)?;
                continue;
            }
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&s.m / bc1)?;
            let v_hat = (&s.v / bc2)?;
            let delta = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = s.var.as_tensor();
            let decayed = if s.decay {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            s.var.set(&(decayed - (delta * c.lr)?)?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`opt.m.<var>`, `opt.v.<var>`), for a checkpoint. They are
    /// copies: the optimiser updates its own in place.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            for (kind, t) in [("m", &s.m), ("v", &s.v)] {
                // A copy cannot fail for a tensor that exists; keep the shared one if it did.
                let t = t.copy().unwrap_or_else(|_| t.clone());
                out.insert(format!("opt.{kind}.{}", s.name), t);
            }
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| candle_core::Error::msg(format!("checkpoint lacks {k}")))
            };
            let m = get(format!("opt.m.{}", s.name))?;
            let v = get(format!("opt.v.{}", s.name))?;
            if m.dims() != s.m.dims() || v.dims() != s.v.dims() {
                candle_core::bail!(
                    "checkpoint optimiser state for {} has the wrong shape",
                    s.name
                );
            }
            s.m = m.to_device(s.m.device())?.to_dtype(s.m.dtype())?.copy()?;
            s.v = v.to_device(s.v.device())?.to_dtype(s.v.dtype())?.copy()?;
        }
        self.step = step;
        Ok(())
    }
}

/// The contiguous elements of a tensor's storage.
fn elems<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("adamw: tensors must be contiguous"),
    }
}

/// The element range of a contiguous tensor in its storage.
fn range(l: &Layout) -> Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("adamw: tensors must be contiguous"),
    }
}

/// `m ← β·m + (1 − β)·g` (or `g²` when `square`), in place.
struct Moment {
    beta: f64,
    square: bool,
}

impl Moment {
    fn run<T: WithDType>(&self, m: &mut [T], g: &[T]) -> Result<()> {
        if m.len() != g.len() {
            candle_core::bail!(
                "adamw: moment of {} elements, gradient of {}",
                m.len(),
                g.len()
            );
        }
        let (b, a) = (T::from_f64(self.beta), T::from_f64(1.0 - self.beta));
        for (m, &g) in m.iter_mut().zip(g) {
            let g = if self.square { g * g } else { g };
            *m = *m * b + g * a;
        }
        Ok(())
    }
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "cosilo-adamw-moment"
    }

    fn cpu_fwd(
        &self,
        ms: &mut CpuStorage,
        ml: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<()> {
        let r = range(ml)?;
        match ms {
            CpuStorage::F32(m) => self.run::<f32>(&mut m[r], elems(gs, gl)?),
            CpuStorage::F64(m) => self.run::<f64>(&mut m[r], elems(gs, gl)?),
            _ => candle_core::bail!("adamw: unsupported dtype"),
        }
    }
}

/// `θ ← θ·decay − lr·(m/bc1) / (sqrt(v/bc2) + eps)`, in place.
struct Step {
    lr: f64,
    eps: f64,
    bc1: f64,
    bc2: f64,
    decay: f64,
}

impl Step {
    fn run<T: WithDType>(&self, theta: &mut [T], m: &[T], v: &[T]) -> Result<()> {
        if theta.len() != m.len() || theta.len() != v.len() {
            candle_core::bail!("adamw: parameter and moments differ in size");
        }
        let (bc1, bc2) = (T::from_f64(self.bc1), T::from_f64(self.bc2));
        let (eps, lr, decay) = (
            T::from_f64(self.eps),
            T::from_f64(self.lr),
            T::from_f64(self.decay),
        );
        for ((t, &m), &v) in theta.iter_mut().zip(m).zip(v) {
            let v_hat = (v / bc2).to_f64().sqrt();
            let delta = (m / bc1) / (T::from_f64(v_hat) + eps);
            *t = *t * decay - delta * lr;
        }
        Ok(())
    }
}

impl InplaceOp3 for Step {
    fn name(&self) -> &'static str {
        "cosilo-adamw-step"
    }

    fn cpu_fwd(
        &self,
        ts: &mut CpuStorage,
        tl: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<()> {
        let r = range(tl)?;
        match ts {
            CpuStorage::F32(t) => self.run::<f32>(&mut t[r], elems(ms, ml)?, elems(vs, vl)?),
            CpuStorage::F64(t) => self.run::<f64>(&mut t[r], elems(ms, ml)?, elems(vs, vl)?),
            _ => candle_core::bail!("adamw: unsupported dtype"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn minimises_a_quadratic_and_matches_the_formula() {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let w = vars
            .get(
                3,
                "lin.weight",
                candle_nn::Init::Const(1.0),
                DType::F32,
                &dev,
            )
            .unwrap();
        let target = Tensor::new(&[0.5f32, -2.0, 3.0], &dev).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(&vars, cfg).unwrap();
        // First step of Adam moves every coordinate by lr·sign(g) (bias-corrected, eps small).
        let loss = (&w - &target).unwrap().sqr().unwrap().sum_all().unwrap();
        opt.apply(&loss.backward().unwrap()).unwrap();
        let after: Vec<f32> = w.to_vec1().unwrap();
        // g = 2(w - t) = [1, 6, -4]: the first two coordinates step down, the third up.
        let want = [1.0 - 0.1, 1.0 - 0.1, 1.0 + 0.1];
        for (a, b) in after.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{after:?}");
        }
        for _ in 0..500 {
            let loss = (&w - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.apply(&loss.backward().unwrap()).unwrap();
        }
        let end: Vec<f32> = w.to_vec1().unwrap();
        for (a, b) in end.iter().zip([0.5, -2.0, 3.0]) {
            assert!((a - b).abs() < 0.02, "{end:?}");
        }
        // State round-trips.
        let st = opt.state();
        let mut opt2 = AdamW::new(&vars, cfg).unwrap();
        opt2.restore(&st, opt.step).unwrap();
        assert_eq!(opt2.step, 501);
        assert!(opt2.restore(&HashMap::new(), 1).is_err());
    }
}
