//! FedSM's site selector: a small K-way image classifier that says which hospital's distribution
//! an axial slice comes from (Xu et al., CVPR 2022; docs/FEDSM.md).
//!
//! Level `l` (0..depth): one conv3×3 (padding 1) → GroupNorm → ReLU block with `base · 2^l`
//! channels (the U-Net's block, on Cosilo's CPU kernels), then a 2×2 max-pool; then a global
//! average over the spatial axes and one linear layer to K logits; softmax gives the site
//! probabilities (in the loss, and as the last node of the ONNX export).
//!
//! Departure from the published FedSM: the paper's selector is a VGG-style classifier pretrained
//! on ImageNet; this one is a few hundred to a few thousand parameters trained from scratch, so
//! that it costs little next to the U-Net at inference (the routed bundle's time budget is +10 %)
//! and needs no downloaded weights. It sees the same normalised slices the U-Net sees.
//!
//! Parameter names (the ONNX exporter and the federation's flat weights rely on them):
//! `sel{l}.conv0.{weight,bias}`, `sel{l}.norm0.{weight,bias}`, `fc.{weight,bias}` (`[K, C]`, `[K]`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use cosilo_federation::weights::{FlatWeights, Layout};

use crate::data::{Augment, SliceSet};
use crate::flat;
use crate::optim::AdamW;
use crate::unet::{ConvBlock, Ops};
use crate::TrainError;
use cosilo_rng::Rng;

/// Shape of the selector.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorConfig {
    /// Input channels (as the U-Net's).
    pub in_channels: usize,
    /// Number of sites K (the classes of the classifier), at least 2.
    pub sites: usize,
    /// Channels of the first level; level l has `base << l`.
    pub base: usize,
    /// Conv levels, each followed by a 2×2 max-pool: inputs must have sides divisible by `2^depth`.
    pub depth: usize,
    /// GroupNorm groups (must divide `base`).
    pub groups: usize,
}

impl Default for SelectorConfig {
    fn default() -> Self {
        SelectorConfig {
            in_channels: 1,
            sites: 3,
            base: 8,
            depth: 3,
            groups: 4,
        }
    }
}

impl SelectorConfig {
    /// Checks the configuration is buildable.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.in_channels == 0 || self.sites < 2 || self.base == 0 {
            return Err("in_channels ≥ 1, sites ≥ 2 and base ≥ 1 are required".into());
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

    /// Channels entering the linear layer.
    pub fn features(&self) -> usize {
        self.width(self.depth - 1)
    }

    /// Side lengths must be multiples of this.
    pub fn multiple(&self) -> usize {
        1 << self.depth
    }
}

/// The selector network.
#[derive(Debug, Clone)]
pub struct SiteSelector {
    config: SelectorConfig,
    blocks: Vec<ConvBlock>,
    fc: Linear,
}

impl SiteSelector {
    /// Builds the network's variables under `vb` (names in the module docs).
    pub fn new(config: &SelectorConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::msg)?;
        let mut blocks = Vec::with_capacity(config.depth);
        for l in 0..config.depth {
            let cin = if l == 0 {
                config.in_channels
            } else {
                config.width(l - 1)
            };
            blocks.push(ConvBlock::new(
                cin,
                config.width(l),
                config.groups,
                vb.pp(format!("sel{l}")),
                0,
            )?);
        }
        let fc = candle_nn::linear(config.features(), config.sites, vb.pp("fc"))?;
        Ok(SiteSelector {
            config: config.clone(),
            blocks,
            fc,
        })
    }

    /// The configuration the network was built with.
    pub fn config(&self) -> &SelectorConfig {
        &self.config
    }

    /// Site logits `(b, sites)` for input `(b, in_channels, h, w)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, Ops::Fast)
    }

    /// [`SiteSelector::forward`] with a chosen implementation of the layers.
    pub fn forward_with(&self, x: &Tensor, kind: Ops) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let m = self.config.multiple();
        if h % m != 0 || w % m != 0 {
            candle_core::bail!("input {h}×{w} is not a multiple of {m} on both sides");
        }
        let mut x = x.clone();
        for block in &self.blocks {
            x = block.forward(&x, kind)?;
            x = match kind {
                Ops::Fast => crate::ops::max_pool_2x2(&x)?,
                Ops::Reference => crate::ops::reference::max_pool_2x2(&x)?,
            };
        }
        // Global average pool: (b, c, h, w) → (b, c).
        let pooled = x.flatten_from(2)?.mean(2)?;
        self.fc.forward(&pooled)
    }

    /// Site probabilities `(b, sites)`.
    pub fn probabilities(&self, x: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(&self.forward(x)?, 1)
    }
}

/// Mean cross-entropy of `logits` `(b, K)` against one site index per row.
pub fn cross_entropy(logits: &Tensor, sites: &[u32]) -> Result<Tensor> {
    let target = Tensor::from_slice(sites, sites.len(), logits.device())?;
    candle_nn::loss::cross_entropy(logits, &target)
}

/// Builds a selector with deterministic weights from `seed`: He-normal convolution and linear
/// weights, zero biases, GroupNorm scale 1 and shift 0 (as [`crate::unet::build`]).
pub fn build(
    config: &SelectorConfig,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<(SiteSelector, VarMap)> {
    let vars = VarMap::new();
    let vb = VarBuilder::from_varmap(&vars, dtype, device);
    let net = SiteSelector::new(config, vb)?;
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
        let values: Vec<f64> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.contains(".norm") {
            vec![1.0; n]
        } else {
            let fan_in: usize = shape.dims()[1..].iter().product();
            let std = (2.0 / fan_in as f64).sqrt();
            (0..n).map(|_| rng.normal() * std).collect()
        };
        var.set(&Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)?;
    }
    drop(data);
    Ok((net, vars))
}

/// The selector's weights followed by its AdamW moments (`opt.m.<var>` for every variable in name
/// order, then `opt.v.<var>`), as one flat vector: FedSM averages the selector's optimiser moments
/// with its weights, by sample count, as the strategy averages the global model. (Averaging the
/// second moments linearly is what the reference implementation does with the optimiser's state.)
pub fn state_flat(vars: &VarMap, opt: &AdamW) -> std::result::Result<FlatWeights, TrainError> {
    let weights = flat::flatten(vars).map_err(Box::new)?;
    let state = opt.state();
    let mut layout = weights.layout.tensors.clone();
    let mut data = weights.data;
    for kind in ["m", "v"] {
        for (name, shape) in &weights.layout.tensors {
            let key = format!("opt.{kind}.{name}");
            let t = state
                .get(&key)
                .ok_or_else(|| TrainError::Checkpoint(format!("the optimiser has no {key}")))?;
            data.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            layout.push((key, shape.clone()));
        }
    }
    Ok(FlatWeights {
        layout: Layout { tensors: layout },
        data,
    })
}

/// Sets the selector's weights and moments from a vector [`state_flat`] made (or an average of
/// such vectors). Fails, changing nothing, unless the layout is exactly this selector's.
pub fn restore_state_flat(
    state: &FlatWeights,
    vars: &VarMap,
    opt: &mut AdamW,
) -> std::result::Result<(), TrainError> {
    let expected = state_flat(vars, opt)?.layout;
    if state.layout != expected || state.data.len() != expected.numel() {
        return Err(TrainError::Config(
            "the selector state does not have this selector's layout".into(),
        ));
    }
    let weights = flat::flatten(vars).map_err(Box::new)?;
    let n = weights.data.len();
    let device = opt_device(vars)?;
    let mut moments = std::collections::HashMap::new();
    let mut offset = n;
    for (name, shape) in &expected.tensors[weights.layout.tensors.len()..] {
        let len: usize = shape.iter().product();
        let values = state.data[offset..offset + len].to_vec();
        moments.insert(
            name.clone(),
            Tensor::from_vec(values, shape.clone(), &device)?,
        );
        offset += len;
    }
    let step = opt.step;
    opt.restore(&moments, step)?;
    flat::apply(
        &FlatWeights {
            layout: weights.layout,
            data: state.data[..n].to_vec(),
        },
        vars,
    )
    .map_err(Box::new)?;
    Ok(())
}

fn opt_device(vars: &VarMap) -> std::result::Result<Device, TrainError> {
    Ok(vars
        .all_vars()
        .first()
        .map(|v| v.device().clone())
        .unwrap_or(Device::Cpu))
}

/// Every axial slice of `volumes` as a [`SliceSet`] for the selector. The U-Net's set
/// ([`SliceSet::new`]) keeps only slices with foreground; the selector sees every slice of a study
/// at inference (its probabilities are pooled over all of them), so it trains on all of them too.
pub fn every_slice(volumes: Vec<crate::data::PreparedVolume>) -> SliceSet {
    let slices = volumes
        .iter()
        .enumerate()
        .flat_map(|(vi, v)| (0..v.nz).map(move |k| (vi, k)))
        .collect();
    SliceSet {
        volumes,
        slices,
        rare: Vec::new(),
    }
}

/// What one selector epoch did.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectorEpoch {
    pub steps: usize,
    pub slices: usize,
    pub mean_loss: f32,
}

/// One local epoch of the selector on a site's own slices (all of them: [`every_slice`]), every
/// slice labelled `site`: batches of
/// `batch` random `crop × crop` crops with augmentation, in an order drawn from `rng`. FedSM's
/// selector learns the other sites' labels only through the averaging of its weights.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch(
    net: &SiteSelector,
    opt: &mut AdamW,
    slices: &SliceSet,
    site: usize,
    batch: usize,
    crop: usize,
    augment: &Augment,
    rng: &mut Rng,
) -> std::result::Result<SelectorEpoch, TrainError> {
    if site >= net.config.sites {
        return Err(TrainError::Config(format!(
            "site index {site} is outside the selector's {} sites",
            net.config.sites
        )));
    }
    if slices.is_empty() {
        return Err(TrainError::NoData(
            "no slices to train the selector on".into(),
        ));
    }
    if crop == 0 || crop % net.config.multiple() != 0 || batch == 0 {
        return Err(TrainError::Config(format!(
            "the selector's crop ({crop}) must be a positive multiple of {} and the batch positive",
            net.config.multiple()
        )));
    }
    let mut order: Vec<usize> = (0..slices.len()).collect();
    rng.shuffle(&mut order);
    let device = net.fc.weight().device().clone();
    let (mut total, mut steps) = (0f64, 0usize);
    for chunk in order.chunks(batch) {
        let b = slices.batch(chunk, crop, crop, augment, rng);
        let x = Tensor::from_vec(b.image, (b.b, net.config.in_channels, b.h, b.w), &device)?;
        let loss = cross_entropy(&net.forward(&x)?, &vec![site as u32; b.b])?;
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(TrainError::Diverged {
                epoch: 0,
                step: steps,
            });
        }
        opt.apply(&loss.backward()?)?;
        total += value as f64;
        steps += 1;
    }
    Ok(SelectorEpoch {
        steps,
        slices: order.len(),
        mean_loss: (total / steps as f64) as f32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    fn small(sites: usize) -> SelectorConfig {
        SelectorConfig {
            in_channels: 1,
            sites,
            base: 4,
            depth: 2,
            groups: 2,
        }
    }

    #[test]
    fn shapes_parameters_and_determinism() {
        let c = small(3);
        let (net, vars) = build(&c, &Device::Cpu, DType::F32, 5).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 16, 12), &Device::Cpu).unwrap();
        let p = net.probabilities(&x).unwrap();
        assert_eq!(p.dims(), &[2, 3]);
        let sums: Vec<f32> = p.sum(1).unwrap().to_vec1().unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        // 1→4 conv block, 4→8 conv block, 8→3 linear.
        let n = (4 * 9 + 4 + 8) + (8 * 4 * 9 + 8 + 16) + (3 * 8 + 3);
        assert_eq!(crate::UNet::parameter_count(&vars), n);
        let (net2, _) = build(&c, &Device::Cpu, DType::F32, 5).unwrap();
        let diff = (net2.forward(&x).unwrap() - net.forward(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0);
        assert!(net.forward(&x.narrow(3, 0, 10).unwrap()).is_err());
        assert!(SelectorConfig { sites: 1, ..c }.validate().is_err());
    }

    #[test]
    fn state_with_moments_round_trips_and_averages() {
        let c = small(3);
        let (net, vars) = build(&c, &Device::Cpu, DType::F32, 7).unwrap();
        let mut opt = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 1, 8, 8), &Device::Cpu).unwrap();
        let loss = cross_entropy(&net.forward(&x).unwrap(), &[0, 2]).unwrap();
        opt.apply(&loss.backward().unwrap()).unwrap();
        let s = state_flat(&vars, &opt).unwrap();
        let n = crate::UNet::parameter_count(&vars);
        assert_eq!(s.data.len(), 3 * n);
        assert!(
            s.data[n..].iter().any(|&v| v != 0.0),
            "moments are in the state"
        );
        // An average of two states (here: this one and zeros) restores as weights and moments.
        let half: Vec<f32> = s.data.iter().map(|v| v * 0.5).collect();
        let avg = FlatWeights {
            layout: s.layout.clone(),
            data: half.clone(),
        };
        restore_state_flat(&avg, &vars, &mut opt).unwrap();
        assert_eq!(state_flat(&vars, &opt).unwrap().data, half);
        let other = build(&small(2), &Device::Cpu, DType::F32, 7).unwrap().1;
        let opt2 = AdamW::new(&other, AdamWConfig::default()).unwrap();
        let wrong = state_flat(&other, &opt2).unwrap();
        assert!(restore_state_flat(&wrong, &vars, &mut opt).is_err());
        assert_eq!(state_flat(&vars, &opt).unwrap().data, half, "unchanged");
    }

    /// Two "sites" whose slices differ in look (the same disc, smooth at one and noisy at the
    /// other, as two scanners would show it) are told apart after training on both. Steps on the
    /// two sites alternate (one batch of all six slices each), the way averaging mixes them.
    #[test]
    fn learns_to_tell_two_looks_apart() {
        use crate::data::PreparedVolume;
        let c = small(2);
        let (net, vars) = build(&c, &Device::Cpu, DType::F32, 2).unwrap();
        let mut opt = AdamW::new(
            &vars,
            AdamWConfig {
                lr: 3e-2,
                ..Default::default()
            },
        )
        .unwrap();
        let look = |site: usize, seed: u64| {
            let mut rng = Rng::new(seed);
            let (n, nz) = (16, 6);
            let mut image = vec![0f32; n * n * nz];
            for z in 0..nz {
                for y in 0..n {
                    for x in 0..n {
                        let (dy, dx) = (y as f32 - 7.5, x as f32 - 7.5);
                        if dy * dy + dx * dx < 40.0 {
                            let noise = [0.02, 0.4][site] * rng.normal() as f32;
                            image[(z * n + y) * n + x] = (1.0 + noise).max(0.01);
                        }
                    }
                }
            }
            every_slice(vec![PreparedVolume {
                id: format!("s{site}"),
                nx: n,
                ny: n,
                nz,
                image,
                classes: vec![0; n * n * nz],
            }])
        };
        let sets = [look(0, 1), look(1, 2)];
        let aug = Augment::default();
        let mut rng = Rng::new(9);
        let first = train_epoch(&net, &mut opt, &sets[0], 0, 4, 16, &aug, &mut rng).unwrap();
        assert_eq!((first.steps, first.slices), (2, 6));
        let aug = Augment {
            flip: true,
            intensity: 0.0,
            gamma: 0.0,
        };
        for _ in 0..100 {
            for (k, s) in sets.iter().enumerate() {
                train_epoch(&net, &mut opt, s, k, 6, 16, &aug, &mut rng).unwrap();
            }
        }
        for (k, s) in sets.iter().enumerate() {
            let v = &s.volumes[0];
            let x = Tensor::from_vec(v.image.clone(), (v.nz, 1, v.ny, v.nx), &Device::Cpu).unwrap();
            let p: Vec<Vec<f32>> = net.probabilities(&x).unwrap().to_vec2().unwrap();
            assert!(p.iter().all(|row| row[k] > 0.8), "site {k}'s slices: {p:?}");
        }
        assert!(matches!(
            train_epoch(&net, &mut opt, &sets[0], 2, 4, 16, &aug, &mut rng),
            Err(TrainError::Config(_))
        ));
        assert!(matches!(
            train_epoch(&net, &mut opt, &sets[0], 0, 4, 6, &aug, &mut rng),
            Err(TrainError::Config(_))
        ));
    }
}
