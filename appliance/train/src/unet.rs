//! The 2-D segmentation U-Net.
//!
//! Encoder level `l` (0..=depth): two blocks of conv3×3 (padding 1) → GroupNorm → ReLU, with
//! `base · 2^l` channels; levels are joined by a 2×2 max-pool written as reshape + max (candle's
//! `max_pool2d` gradient is wrong, see DEPS.md). Decoder level `l` (depth-1..=0): a 2×2 stride-2
//! transposed convolution up from level l+1, concatenation with the encoder's level-l output on the
//! channel axis, then two conv blocks. A 1×1 convolution gives one logit per class; softmax over the
//! class axis turns them into probabilities (in the loss, and as the last node of the ONNX export).
//!
//! On the CPU the layers run as Cosilo's own kernels ([`super::ops`]: each conv → GroupNorm →
//! ReLU block as one op with direct AVX2 or im2col + `gemm` convolutions, pooling, transposed
//! convolution, concatenation), ~12× faster than candle's for a training step; on other devices,
//! and through [`UNet::forward_with`]`(x, Ops::Reference)`, as candle's ops. Both compute the same
//! function of the same parameters (`gradcheck` compares them).
//!
//! GroupNorm normalises each image on its own, so the model behaves the same at batch size 1
//! (inference, one slice at a time) as at the training batch size.
//!
//! Parameter names (the ONNX exporter and checkpoints rely on them):
//! `enc{l}.conv{a}.{weight,bias}`, `enc{l}.norm{a}.{weight,bias}` (a ∈ {0, 1}),
//! `up{l}.{weight,bias}` (ConvTranspose2d, weight `[Cin, Cout, 2, 2]`),
//! `dec{l}.conv{a}.*`, `dec{l}.norm{a}.*`, `head.{weight,bias}`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{
    Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, GroupNorm, VarBuilder, VarMap,
};

use super::ops;
use serde::{Deserialize, Serialize};

use cosilo_rng::Rng;

/// Shape of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Input channels (1 for a single MR contrast).
    pub in_channels: usize,
    /// Output classes, background included.
    pub classes: usize,
    /// Channels at the first level; level l has `base << l`.
    pub base: usize,
    /// Number of 2× down-samplings. Inputs must have sides divisible by `2^depth`.
    pub depth: usize,
    /// GroupNorm groups (must divide every level's channel count).
    pub groups: usize,
}

impl Default for UNetConfig {
    fn default() -> Self {
        UNetConfig {
            in_channels: 1,
            classes: 5,
            base: 16,
            depth: 3,
            groups: 4,
        }
    }
}

impl UNetConfig {
    /// Checks the configuration is buildable.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.in_channels == 0 || self.classes < 2 || self.base == 0 {
            return Err("in_channels ≥ 1, classes ≥ 2 and base ≥ 1 are required".into());
        }
        if self.depth == 0 || self.depth > 6 {
            return Err(format!("depth must be 1..=6, got {}", self.depth));
        }
        if self.groups == 0 || self.base % self.groups != 0 {
            return Err(format!(
                "groups ({}) must divide the base width ({})",
                self.groups, self.base
            ));
        }
        Ok(())
    }

    /// Channels at level `l`.
    pub fn width(&self, l: usize) -> usize {
        self.base << l
    }

    /// Side lengths must be multiples of this.
    pub fn multiple(&self) -> usize {
        1 << self.depth
    }
}

const GN_EPS: f64 = 1e-5;

/// Which implementation of the layers a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    /// [`super::ops`]: Cosilo's CPU kernels, candle's ops on other devices.
    #[default]
    Fast,
    /// candle's own ops (`candle_nn` layers, reshape + max pool, `Tensor::cat`) everywhere.
    Reference,
}

/// conv3×3 → GroupNorm → ReLU (also the site selector's block, [`crate::selector`]).
#[derive(Debug, Clone)]
pub(crate) struct ConvBlock {
    conv: Conv2d,
    norm: GroupNorm,
    groups: usize,
    /// GroupNorm scale and shift (the same variables `norm` holds).
    gamma: Tensor,
    beta: Tensor,
}

impl ConvBlock {
    pub(crate) fn new(
        cin: usize,
        cout: usize,
        groups: usize,
        vb: VarBuilder,
        a: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = candle_nn::conv2d(cin, cout, 3, cfg, vb.pp(format!("conv{a}")))?;
        // What `candle_nn::group_norm` creates, kept at hand for the fused kernel.
        let nb = vb.pp(format!("norm{a}"));
        let gamma = nb.get_with_hints(cout, "weight", candle_nn::Init::Const(1.))?;
        let beta = nb.get_with_hints(cout, "bias", candle_nn::Init::Const(0.))?;
        let norm = GroupNorm::new(gamma.clone(), beta.clone(), cout, groups, GN_EPS)?;
        Ok(ConvBlock {
            conv,
            norm,
            groups,
            gamma,
            beta,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, kind: Ops) -> Result<Tensor> {
        match (kind, self.conv.bias()) {
            (Ops::Fast, Some(bias)) => ops::conv_group_norm_relu(
                x,
                self.conv.weight(),
                bias,
                &self.gamma,
                &self.beta,
                self.conv.config().padding,
                self.groups,
                GN_EPS,
            ),
            _ => self.norm.forward(&self.conv.forward(x)?)?.relu(),
        }
    }
}

#[derive(Debug, Clone)]
struct Level {
    a: ConvBlock,
    b: ConvBlock,
}

impl Level {
    fn new(cin: usize, cout: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Level {
            a: ConvBlock::new(cin, cout, groups, vb.clone(), 0)?,
            b: ConvBlock::new(cout, cout, groups, vb, 1)?,
        })
    }

    fn forward(&self, x: &Tensor, kind: Ops) -> Result<Tensor> {
        self.b.forward(&self.a.forward(x, kind)?, kind)
    }
}

/// 2×2 max-pool with a correct gradient: reshape to (b, c, h/2, 2, w/2, 2) and take the maximum
/// over the two window axes.
pub fn max_pool_2x2(x: &Tensor) -> Result<Tensor> {
    ops::reference::max_pool_2x2(x)
}

/// The U-Net.
#[derive(Debug, Clone)]
pub struct UNet {
    config: UNetConfig,
    enc: Vec<Level>,
    up: Vec<ConvTranspose2d>,
    dec: Vec<Level>,
    head: Conv2d,
}

impl UNet {
    /// Builds the network's variables under `vb` (names in the module docs).
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let g = config.groups;
        let mut enc = Vec::new();
        for l in 0..=config.depth {
            let cin = if l == 0 {
                config.in_channels
            } else {
                config.width(l - 1)
            };
            enc.push(Level::new(
                cin,
                config.width(l),
                g,
                vb.pp(format!("enc{l}")),
            )?);
        }
        let mut up = Vec::new();
        let mut dec = Vec::new();
        for l in 0..config.depth {
            let cfg = ConvTranspose2dConfig {
                stride: 2,
                ..Default::default()
            };
            up.push(candle_nn::conv_transpose2d(
                config.width(l + 1),
                config.width(l),
                2,
                cfg,
                vb.pp(format!("up{l}")),
            )?);
            dec.push(Level::new(
                2 * config.width(l),
                config.width(l),
                g,
                vb.pp(format!("dec{l}")),
            )?);
        }
        let head = candle_nn::conv2d(
            config.width(0),
            config.classes,
            1,
            Default::default(),
            vb.pp("head"),
        )?;
        Ok(UNet {
            config: config.clone(),
            enc,
            up,
            dec,
            head,
        })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Logits `(b, classes, h, w)` for input `(b, in_channels, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Ops::Fast)
    }

    /// [`UNet::forward`] with a chosen implementation of the layers (`Ops::Reference`: candle's
    /// own ops, to check the fast kernels against).
    pub fn forward_with(&self, x: &Tensor, kind: Ops) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = self.config.multiple();
        if h % m != 0 || w % m != 0 {
            candle_core::bail!("input {h}×{w} is not a multiple of {m} on both sides");
        }
        let mut skips = Vec::with_capacity(self.config.depth);
        let mut x = x.clone();
        for (l, level) in self.enc.iter().enumerate() {
            x = level.forward(&x, kind)?;
            if l < self.config.depth {
                skips.push(x.clone());
                x = match kind {
                    Ops::Fast => ops::max_pool_2x2(&x)?,
                    Ops::Reference => max_pool_2x2(&x)?,
                };
            }
        }
        for l in (0..self.config.depth).rev() {
            let up = &self.up[l];
            x = match (kind, up.bias()) {
                (Ops::Fast, Some(b)) => {
                    let up = ops::conv_transpose_2x2(&x, up.weight(), b)?;
                    ops::cat_channels(&skips[l], &up)?
                }
                _ => Tensor::cat(&[&skips[l], &up.forward(&x)?], 1)?,
            };
            x = self.dec[l].forward(&x, kind)?;
        }
        match (kind, self.head.bias()) {
            (Ops::Fast, Some(b)) => ops::conv2d(&x, self.head.weight(), b, 0),
            _ => self.head.forward(&x),
        }
    }

    /// Class probabilities `(b, classes, h, w)`.
    pub fn probabilities(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(&self.forward(x)?, 1)
    }

    /// Number of trainable parameters.
    pub fn parameter_count(vars: &VarMap) -> usize {
        vars.all_vars().iter().map(|v| v.elem_count()).sum()
    }
}

/// Builds a U-Net with deterministic weights from `seed`: He-normal convolution weights
/// (std = √(2 / fan_in)), zero biases, GroupNorm scale 1 and shift 0. candle's own initialisers
/// draw from an unseeded generator, so every variable is overwritten here in name order.
pub fn build(config: &UNetConfig, device: &Device, seed: u64) -> Result<(UNet, VarMap)> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
    let net = UNet::new(config, vb)?;
    let mut rng = Rng::new(seed);
    let data = vars
        .data()
        .lock()
        .map_err(|_| candle_core::Error::msg("poisoned var map"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let shape = var.shape().clone();
        let n = shape.elem_count();
        let values: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains(".norm") {
            vec![1.0; n]
        } else {
            let dims = shape.dims();
            // Conv: [cout, cin, kh, kw] → fan_in = cin·kh·kw. ConvTranspose: [cin, cout, kh, kw],
            // whose fan-in per output is cin·kh·kw / stride² = cin for k = s = 2.
            let fan_in = if name.starts_with("up") {
                dims[0]
            } else {
                dims[1..].iter().product()
            };
            let std = (2.0 / fan_in as f64).sqrt();
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        var.set(&Tensor::from_vec(values, shape, device)?)?;
    }
    drop(data);
    Ok((net, vars))
}

/// Predicted class per pixel, `(b, h, w)` as u8, from logits or probabilities.
pub fn argmax_classes(scores: &Tensor) -> Result<Tensor> {
    scores.argmax(D::Minus(3))?.to_dtype(DType::U8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_parameters_and_determinism() {
        let cfg = UNetConfig {
            base: 8,
            depth: 2,
            classes: 5,
            groups: 4,
            in_channels: 1,
        };
        let dev = Device::Cpu;
        let (net, vars) = build(&cfg, &dev, 3).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 16, 24), &dev).unwrap();
        let y = net.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 5, 16, 24]);
        let p = net.probabilities(&x).unwrap().sum(1).unwrap();
        let max_dev = (p - 1.0).unwrap().abs().unwrap().max_all().unwrap();
        assert!(max_dev.to_scalar::<f32>().unwrap() < 1e-5);
        // enc: 1→8 (8·9+8 + 8·8·9+8) ... count by formula for a check against the var map.
        assert_eq!(UNet::parameter_count(&vars), expected_params(&cfg));
        let (net2, _) = build(&cfg, &dev, 3).unwrap();
        let y2 = net2.forward(&x).unwrap();
        let diff = (y - y2).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        assert!(net
            .forward(&Tensor::zeros((1, 1, 10, 16), DType::F32, &dev).unwrap())
            .is_err());
    }

    fn expected_params(c: &UNetConfig) -> usize {
        let conv = |cin: usize, cout: usize, k: usize| cin * cout * k * k + cout;
        let block = |cin: usize, cout: usize| conv(cin, cout, 3) + 2 * cout;
        let mut n = 0;
        for l in 0..=c.depth {
            let cin = if l == 0 {
                c.in_channels
            } else {
                c.width(l - 1)
            };
            n += block(cin, c.width(l)) + block(c.width(l), c.width(l));
        }
        for l in 0..c.depth {
            n += c.width(l + 1) * c.width(l) * 4 + c.width(l);
            n += block(2 * c.width(l), c.width(l)) + block(c.width(l), c.width(l));
        }
        n + conv(c.width(0), c.classes, 1)
    }
}
