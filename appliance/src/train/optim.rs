//! AdamW whose state can be saved with the weights, so training resumes exactly after a restart.
//!
//! candle-nn's `AdamW` keeps its moments private; checkpoint/resume needs them, so the update is
//! written here (Loshchilov & Hutter's decoupled weight decay, bias-corrected moments). Weight decay
//! applies to convolution weights only, not to biases or normalisation parameters.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, Var};
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
            let zeros = var.as_tensor().zeros_like()?;
            slots.push(Slot {
                name: name.clone(),
                decay: name.ends_with(".weight") && !name.contains(".norm"),
                m: zeros.clone(),
                v: zeros,
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

    /// The moments as named tensors (`opt.m.<var>`, `opt.v.<var>`), for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("opt.m.{}", s.name), s.m.clone());
            out.insert(format!("opt.v.{}", s.name), s.v.clone());
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
                candle_core::bail!("checkpoint optimiser state for {} has the wrong shape", s.name);
            }
            s.m = m.to_device(s.m.device())?;
            s.v = v.to_device(s.v.device())?;
        }
        self.step = step;
        Ok(())
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
        let w = vars.get(3, "lin.weight", candle_nn::Init::Const(1.0), DType::F32, &dev).unwrap();
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
