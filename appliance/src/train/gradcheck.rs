//! Finite-difference checks of the gradient of every operation the U-Net and its loss use, in f64.
//!
//! candle 0.11.1 has wrong or missing gradients for several ops (DEPS.md); these tests pin the ones
//! this model relies on so that a candle upgrade cannot silently break training.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, ConvTranspose2dConfig, VarBuilder, VarMap};

use super::loss::{dice_cross_entropy, one_hot};
use super::unet::{max_pool_2x2, UNet, UNetConfig};
use crate::rng::Rng;

fn random(shape: &[usize], rng: &mut Rng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Checks d/dx sum(f(x) · r) against central differences at `samples` random coordinates.
fn check(name: &str, x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor, samples: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor());
    let r = random(y.dims(), &mut rng);
    let objective = |t: &Tensor| -> f64 {
        (f(t) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let analytic: Vec<f64> = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient reached the input"))
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-5;
    let mut worst = 0f64;
    for _ in 0..samples {
        let i = rng.below(base.len());
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let tp = Tensor::from_vec(plus, x.dims(), &Device::Cpu).unwrap();
        let tm = Tensor::from_vec(minus, x.dims(), &Device::Cpu).unwrap();
        let numeric = (objective(&tp) - objective(&tm)) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / (1.0 + numeric.abs());
        worst = worst.max(err);
        assert!(
            err < 1e-5,
            "{name}: element {i}: finite difference {numeric}, autograd {}",
            analytic[i]
        );
    }
    assert!(worst.is_finite());
}

fn vb(vars: &VarMap) -> VarBuilder<'_> {
    VarBuilder::from_varmap(vars, DType::F64, &Device::Cpu)
}

#[test]
fn conv2d_padding_one() {
    let vars = VarMap::new();
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = candle_nn::conv2d(3, 4, 3, cfg, vb(&vars)).unwrap();
    let x = random(&[2, 3, 7, 5], &mut Rng::new(1));
    check("conv2d", &x, &|t| conv.forward(t).unwrap(), 30, 2);
}

#[test]
fn conv_transpose2d_stride_two() {
    let vars = VarMap::new();
    let cfg = ConvTranspose2dConfig {
        stride: 2,
        ..Default::default()
    };
    let up = candle_nn::conv_transpose2d(4, 3, 2, cfg, vb(&vars)).unwrap();
    let x = random(&[2, 4, 3, 5], &mut Rng::new(3));
    check("conv_transpose2d", &x, &|t| up.forward(t).unwrap(), 30, 4);
}

#[test]
fn group_norm() {
    let vars = VarMap::new();
    let gn = candle_nn::group_norm(2, 4, 1e-5, vb(&vars)).unwrap();
    let x = random(&[2, 4, 3, 3], &mut Rng::new(5));
    check("group_norm", &x, &|t| gn.forward(t).unwrap(), 30, 6);
}

#[test]
fn relu_and_reshape_max_pool() {
    let x = random(&[2, 3, 6, 4], &mut Rng::new(7));
    check("relu", &x, &|t| t.relu().unwrap(), 30, 8);
    check("max_pool_2x2", &x, &|t| max_pool_2x2(t).unwrap(), 40, 9);
}

#[test]
fn concatenation_on_channels() {
    let other = random(&[2, 2, 3, 3], &mut Rng::new(10));
    let x = random(&[2, 3, 3, 3], &mut Rng::new(11));
    check("cat", &x, &|t| Tensor::cat(&[t, &other], 1).unwrap(), 30, 12);
    check("cat (second)", &x, &|t| Tensor::cat(&[&other, t], 1).unwrap(), 30, 13);
}

#[test]
fn log_softmax_over_classes() {
    let x = random(&[2, 4, 3, 3], &mut Rng::new(14));
    check("log_softmax", &x, &|t| candle_nn::ops::log_softmax(t, 1).unwrap(), 30, 15);
}

#[test]
fn dice_cross_entropy_loss() {
    let mut rng = Rng::new(16);
    let classes: Vec<u8> = (0..2 * 4 * 5).map(|_| rng.below(4) as u8).collect();
    let oh: Vec<f64> = one_hot(&classes, 2, 4, 4, 5).into_iter().map(f64::from).collect();
    let target = Tensor::from_vec(oh, (2, 4, 4, 5), &Device::Cpu).unwrap();
    let x = random(&[2, 4, 4, 5], &mut rng);
    check(
        "dice + cross-entropy",
        &x,
        &|t| dice_cross_entropy(t, &target).unwrap().total,
        40,
        17,
    );
}

#[test]
fn whole_unet_input_gradient() {
    // The assembled network in f64: a skip connection feeds both the decoder concat and the pool,
    // so any op that overwrites rather than accumulates gradients would show up here.
    let vars = VarMap::new();
    let cfg = UNetConfig {
        in_channels: 1,
        classes: 3,
        base: 4,
        depth: 2,
        groups: 2,
    };
    let net = UNet::new(&cfg, vb(&vars)).unwrap();
    let x = random(&[1, 1, 8, 8], &mut Rng::new(18));
    check("unet", &x, &|t| net.forward(t).unwrap(), 30, 19);
}

#[test]
fn candle_max_pool2d_gradient_is_still_wrong_upstream() {
    // Documents why the U-Net does not use candle's max_pool2d: its backward gives a unique maximum
    // a quarter of its gradient. When this test fails, candle has fixed it; the reshape pool can
    // then be swapped back after re-running the checks above.
    let x = Var::from_tensor(&Tensor::new(&[[[[1f64, 2.0], [3.0, 4.0]]]], &Device::Cpu).unwrap()).unwrap();
    let g = x.as_tensor().max_pool2d(2).unwrap().sum_all().unwrap().backward().unwrap();
    let gx: Vec<f64> = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(gx, vec![0.0, 0.0, 0.0, 1.0], "candle fixed max_pool2d's gradient: revisit unet::max_pool_2x2");
}
