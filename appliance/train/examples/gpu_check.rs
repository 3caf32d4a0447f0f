//! Verifies the training code on a CUDA GPU against the CPU path, and times a training step.
//!
//! Built with `--features cuda --release` and carried to a GPU machine by `bench/gpu/run.sh`
//! (no Rust there). Without a GPU (or in the CPU build) it dry-runs: the "device" side is then the
//! CPU with candle's own ops (`Ops::Reference`, the formulation the CUDA path uses), so every check
//! still compares two implementations.
//!
//! `gpu_check check OUT.json`: the checks, each with its tolerance, exit status 1 if any fails:
//! - `ops`: each training op (conv2d 3×3 and 1×1, conv → GroupNorm → ReLU, GroupNorm → ReLU,
//!   2×2 max-pool by reshape + max, 2×2 stride-2 transposed convolution, channel concatenation,
//!   nearest upsampling, the Dice + cross-entropy loss), forward and the gradient of
//!   `sum(f(x) · r)` for every input, f32, on the device against Cosilo's CPU path (its own
//!   kernels); relative L2 error `‖dev − cpu‖ / ‖cpu‖`;
//! - `gradcheck`: finite differences in f64 on the device (candle's ops there) at sampled
//!   coordinates, for the ops whose candle gradients Cosilo relies on;
//! - `unet`: the default U-Net's logits, loss and every parameter's gradient, device vs CPU;
//! - `training`: a short run from the same seed on the same synthetic batches on both; the loss
//!   curves must agree within a stated share of the first loss, and both must fall.
//!
//! `gpu_check bench BATCH SIZE STEPS [SECONDS]`: times the training step of the default U-Net (forward,
//! loss, backward, AdamW) on the device after 3 warm-up steps, synchronising before every clock
//! read, for STEPS steps or until SECONDS (default 20) have passed; prints one JSON
//! line with the median ms per step, slices/s and the device memory high-water mark.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use cosilo_rng::Rng;
use cosilo_train::loss::{dice_cross_entropy, dice_cross_entropy_reference, one_hot};
use cosilo_train::ops::{self, reference};
use cosilo_train::optim::{AdamW, AdamWConfig};
use cosilo_train::unet::{build, Ops, UNet, UNetConfig};
use serde_json::{json, Value};

/// The side under test: the GPU, or in a dry run the CPU with candle's own ops.
struct Side {
    dev: Device,
    ops: Ops,
    name: String,
}

impl Side {
    fn pick() -> anyhow::Result<Side> {
        let dev = cosilo_train::device()?;
        Ok(if dev.is_cpu() {
            Side {
                dev,
                ops: Ops::Reference,
                name: "cpu-reference (dry run: no GPU)".into(),
            }
        } else {
            Side {
                dev,
                ops: Ops::Fast,
                name: gpu_name(),
            }
        })
    }
    fn gpu(&self) -> bool {
        !self.dev.is_cpu()
    }
}

fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,driver_version", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| format!("cuda:0 ({})", s.trim()))
        .unwrap_or_else(|| "cuda:0".into())
}

fn randn(shape: &[usize], rng: &mut Rng) -> Vec<f32> {
    (0..shape.iter().product())
        .map(|_| rng.normal() as f32)
        .collect()
}

/// Relative L2 error and max abs error of `a` against the reference `b` (compared in f64 on the
/// CPU). NaN anywhere makes the error infinite.
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<(f64, f64)> {
    let a: Vec<f64> = a
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let b: Vec<f64> = b
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    if a.len() != b.len() {
        bail!("{} elements against {}", a.len(), b.len());
    }
    let (mut num, mut den, mut max) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() || !y.is_finite() {
            return Ok((f64::INFINITY, f64::INFINITY));
        }
        num += (x - y) * (x - y);
        den += y * y;
        max = max.max((x - y).abs());
    }
    Ok(((num / den.max(1e-300)).sqrt(), max))
}

/// An op under test: builds its output from its inputs, on the CPU path or the device path.
type OpFn = dyn Fn(&[Tensor], bool) -> candle_core::Result<Tensor>;

/// Forward and input gradients of `sum(f(inputs) · r)` on the CPU (Cosilo's path) and on the
/// side under test, compared.
fn op_parity(
    side: &Side,
    name: &str,
    shapes: &[&[usize]],
    f: &OpFn,
    tol: f64,
    seed: u64,
) -> anyhow::Result<Value> {
    let mut rng = Rng::new(seed);
    let host: Vec<Vec<f32>> = shapes.iter().map(|s| randn(s, &mut rng)).collect();
    let run = |dev: &Device, device_path: bool| -> anyhow::Result<(Tensor, Vec<Tensor>, f64)> {
        let vars: Vec<Var> = host
            .iter()
            .zip(shapes)
            .map(|(v, s)| Var::from_tensor(&Tensor::from_vec(v.clone(), *s, dev)?))
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let t0 = Instant::now();
        let y = f(&ts, device_path)?;
        let mut r = Rng::new(seed ^ 0x5eed);
        let rv = randn(y.dims(), &mut r);
        let r = Tensor::from_vec(rv, y.dims(), dev)?;
        let grads = (&y * &r)?.sum_all()?.backward()?;
        let gs = ts
            .iter()
            .map(|t| {
                grads
                    .get(t)
                    .cloned()
                    .context("no gradient reached an input")
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        dev.synchronize()?;
        Ok((y, gs, t0.elapsed().as_secs_f64() * 1e3))
    };
    let (y0, g0, ms_cpu) = run(&Device::Cpu, false)?;
    let (y1, g1, ms_dev) = run(&side.dev, true)?;
    let (fwd, fwd_max) = rel_err(&y1, &y0)?;
    let mut worst = fwd;
    let mut grads = Vec::new();
    for (a, b) in g1.iter().zip(&g0) {
        let (e, m) = rel_err(a, b)?;
        worst = worst.max(e);
        grads.push(json!({"rel_l2": e, "max_abs": m}));
    }
    let pass = worst <= tol;
    println!(
        "  {:4} {name:44} forward {fwd:.2e}  worst gradient {:.2e}  (tolerance {tol:.0e})",
        if pass { "ok" } else { "FAIL" },
        grads
            .iter()
            .map(|g| g["rel_l2"].as_f64().unwrap_or(f64::INFINITY))
            .fold(0f64, f64::max)
    );
    Ok(json!({
        "name": name, "shapes": shapes, "forward_rel_l2": fwd, "forward_max_abs": fwd_max,
        "gradients": grads, "tolerance": tol, "pass": pass,
        "first_call_ms_cpu": ms_cpu, "first_call_ms_device": ms_dev,
    }))
}

fn ops_checks(side: &Side) -> Vec<Value> {
    // f32 throughout: the CPU kernels accumulate in a different order (and some in f64) than
    // cuDNN-free candle CUDA (im2col + cuBLAS SGEMM), so a few 1e-6 of relative error is
    // expected; 1e-4 leaves room for reductions over 10^5 terms and still catches any real bug
    // (a wrong index or a missing term is ≥ 1e-2).
    const TOL: f64 = 1e-4;
    let dev_ops = side.ops;
    let fast = move |device_path: bool| !device_path || dev_ops == Ops::Fast;
    type Case = (&'static str, Vec<Vec<usize>>, Box<OpFn>, f64);
    let cases: Vec<Case> = vec![
        (
            "conv2d 3x3 pad 1, 16->32, 4x16x64x64",
            vec![vec![4, 16, 64, 64], vec![32, 16, 3, 3], vec![32]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::conv2d(&t[0], &t[1], &t[2], 1)
                } else {
                    reference::conv2d(&t[0], &t[1], &t[2], 1)
                }
            }),
            TOL,
        ),
        (
            "conv2d 3x3 pad 1, 1->16 (first layer), 4x1x128x128",
            vec![vec![4, 1, 128, 128], vec![16, 1, 3, 3], vec![16]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::conv2d(&t[0], &t[1], &t[2], 1)
                } else {
                    reference::conv2d(&t[0], &t[1], &t[2], 1)
                }
            }),
            TOL,
        ),
        (
            "conv2d 1x1 (head), 16->5, 4x16x64x64",
            vec![vec![4, 16, 64, 64], vec![5, 16, 1, 1], vec![5]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::conv2d(&t[0], &t[1], &t[2], 0)
                } else {
                    reference::conv2d(&t[0], &t[1], &t[2], 0)
                }
            }),
            TOL,
        ),
        (
            "conv -> GroupNorm(4) -> ReLU, 32->16, 4x32x64x64",
            vec![
                vec![4, 32, 64, 64],
                vec![16, 32, 3, 3],
                vec![16],
                vec![16],
                vec![16],
            ],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::conv_group_norm_relu(&t[0], &t[1], &t[2], &t[3], &t[4], 1, 4, 1e-5)
                } else {
                    let y = reference::conv2d(&t[0], &t[1], &t[2], 1)?;
                    reference::group_norm_relu(&y, &t[3], &t[4], 4, 1e-5)
                }
            }),
            TOL,
        ),
        (
            "GroupNorm(4) -> ReLU, 4x64x32x32",
            vec![vec![4, 64, 32, 32], vec![64], vec![64]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::group_norm_relu(&t[0], &t[1], &t[2], 4, 1e-5)
                } else {
                    reference::group_norm_relu(&t[0], &t[1], &t[2], 4, 1e-5)
                }
            }),
            TOL,
        ),
        (
            "max-pool 2x2 (reshape + max), 4x16x64x64",
            vec![vec![4, 16, 64, 64]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::max_pool_2x2(&t[0])
                } else {
                    reference::max_pool_2x2(&t[0])
                }
            }),
            // Selection, no arithmetic: exact unless a tie or a wrong index.
            1e-7,
        ),
        (
            "conv-transpose 2x2 stride 2, 32->16, 4x32x32x32",
            vec![vec![4, 32, 32, 32], vec![32, 16, 2, 2], vec![16]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::conv_transpose_2x2(&t[0], &t[1], &t[2])
                } else {
                    reference::conv_transpose_2x2(&t[0], &t[1], &t[2])
                }
            }),
            TOL,
        ),
        (
            "concatenate channels, 2 x 4x16x64x64",
            vec![vec![4, 16, 64, 64], vec![4, 16, 64, 64]],
            Box::new(move |t, d| {
                if fast(d) {
                    ops::cat_channels(&t[0], &t[1])
                } else {
                    reference::cat_channels(&t[0], &t[1])
                }
            }),
            1e-7,
        ),
        (
            "upsample nearest 2x (candle's; not in the U-Net), 4x16x32x32",
            vec![vec![4, 16, 32, 32]],
            Box::new(|t, _| t[0].upsample_nearest2d(64, 64)),
            1e-7,
        ),
        (
            "softmax over classes, 4x5x64x64",
            vec![vec![4, 5, 64, 64]],
            Box::new(|t, _| candle_nn::ops::softmax(&t[0], 1)),
            TOL,
        ),
    ];
    let mut out = Vec::new();
    for (i, (name, shapes, f, tol)) in cases.into_iter().enumerate() {
        let shapes: Vec<&[usize]> = shapes.iter().map(|s| s.as_slice()).collect();
        out.push(
            op_parity(side, name, &shapes, &*f, tol, 100 + i as u64).unwrap_or_else(|e| {
                println!("  FAIL {name}: {e:#}");
                json!({"name": name, "error": format!("{e:#}"), "pass": false})
            }),
        );
    }
    // The loss: its gradient with respect to the logits (the one-hot target is data).
    out.push(loss_parity(side, TOL).unwrap_or_else(|e| {
        println!("  FAIL loss: {e:#}");
        json!({"name": "loss", "error": format!("{e:#}"), "pass": false})
    }));
    out
}

fn random_labels(b: usize, classes: usize, h: usize, w: usize, rng: &mut Rng) -> Vec<u8> {
    (0..b * h * w).map(|_| rng.below(classes) as u8).collect()
}

fn loss_parity(side: &Side, tol: f64) -> anyhow::Result<Value> {
    let (b, c, h, w) = (4, 5, 64, 64);
    let mut rng = Rng::new(7);
    let logits = randn(&[b, c, h, w], &mut rng);
    let labels = random_labels(b, c, h, w, &mut rng);
    let oh = one_hot(&labels, b, c, h, w);
    let run = |dev: &Device, reference: bool| -> anyhow::Result<(f32, Tensor)> {
        let x = Var::from_tensor(&Tensor::from_vec(logits.clone(), (b, c, h, w), dev)?)?;
        let t = Tensor::from_vec(oh.clone(), (b, c, h, w), dev)?;
        let parts = if reference {
            dice_cross_entropy_reference(x.as_tensor(), &t)?
        } else {
            dice_cross_entropy(x.as_tensor(), &t)?
        };
        let g = parts.total.backward()?;
        let gx = g.get(x.as_tensor()).cloned().context("no gradient")?;
        Ok((parts.total.to_scalar::<f32>()?, gx))
    };
    let (l0, g0) = run(&Device::Cpu, false)?;
    let (l1, g1) = run(&side.dev, !side.gpu())?;
    let fwd = ((l1 - l0) / l0).abs() as f64;
    let (ge, gm) = rel_err(&g1, &g0)?;
    let pass = fwd <= tol && ge <= tol;
    println!(
        "  {:4} {:44} forward {fwd:.2e}  worst gradient {ge:.2e}  (tolerance {tol:.0e})",
        if pass { "ok" } else { "FAIL" },
        "Dice + cross-entropy loss, 4x5x64x64"
    );
    Ok(
        json!({"name": "Dice + cross-entropy loss, 4x5x64x64", "forward_rel": fwd,
        "loss_cpu": l0, "loss_device": l1,
        "gradients": [{"rel_l2": ge, "max_abs": gm}], "tolerance": tol, "pass": pass}),
    )
}

/// Central-difference check of d/dx sum(f(x) · r) on the side under test, in f64.
fn fd_check(
    side: &Side,
    name: &str,
    shape: &[usize],
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
    seed: u64,
) -> anyhow::Result<Value> {
    const SAMPLES: usize = 12;
    const TOL: f64 = 1e-5;
    let dev = &side.dev;
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let base: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
    let x = Var::from_tensor(&Tensor::from_vec(base.clone(), shape, dev)?)?;
    let y = f(x.as_tensor())?;
    let rv: Vec<f64> = (0..y.elem_count()).map(|_| rng.normal()).collect();
    let r = Tensor::from_vec(rv, y.dims(), dev)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let analytic: Vec<f64> = grads
        .get(x.as_tensor())
        .context("no gradient reached the input")?
        .flatten_all()?
        .to_vec1()?;
    let objective = |v: Vec<f64>| -> anyhow::Result<f64> {
        let t = Tensor::from_vec(v, shape, dev)?;
        Ok((f(&t)? * &r)?.sum_all()?.to_scalar::<f64>()?)
    };
    let h = 1e-5;
    let mut worst = 0f64;
    for _ in 0..SAMPLES {
        let i = rng.below(n);
        let mut plus = base.clone();
        plus[i] += h;
        let mut minus = base.clone();
        minus[i] -= h;
        let numeric = (objective(plus)? - objective(minus)?) / (2.0 * h);
        let err = (numeric - analytic[i]).abs() / (1.0 + numeric.abs());
        worst = worst.max(if err.is_finite() { err } else { f64::INFINITY });
    }
    let pass = worst <= TOL;
    println!(
        "  {:4} {name:44} worst error {worst:.2e} at {SAMPLES} coordinates (tolerance {TOL:.0e})",
        if pass { "ok" } else { "FAIL" }
    );
    Ok(json!({"name": name, "samples": SAMPLES, "worst": worst, "tolerance": TOL, "pass": pass}))
}

fn gradchecks(side: &Side) -> Vec<Value> {
    let dev = side.dev.clone();
    let mut rng = Rng::new(11);
    let mut param = |shape: &[usize]| -> candle_core::Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.normal() * 0.5).collect();
        Tensor::from_vec(v, shape, &dev)
    };
    let w3 = param(&[4, 3, 3, 3]);
    let b4 = param(&[4]);
    let wt = param(&[3, 4, 2, 2]);
    let gamma = param(&[8]);
    let beta = param(&[8]);
    let (w3, b4, wt, gamma, beta) = match (w3, b4, wt, gamma, beta) {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e)) => (a, b, c, d, e),
        _ => {
            println!("  FAIL f64 tensors on the device");
            return vec![json!({"name": "f64 tensors", "pass": false})];
        }
    };
    let mut oh_rng = Rng::new(12);
    let labels = random_labels(2, 5, 6, 6, &mut oh_rng);
    let oh = one_hot(&labels, 2, 5, 6, 6);
    let oh: Vec<f64> = oh.iter().map(|&v| v as f64).collect();
    let target = Tensor::from_vec(oh, (2, 5, 6, 6), &side.dev);
    type Fd<'a> = (
        &'static str,
        Vec<usize>,
        Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + 'a>,
    );
    let mut cases: Vec<Fd> = vec![
        (
            "conv2d 3x3 pad 1 (f64)",
            vec![2, 3, 7, 5],
            Box::new(|x| reference::conv2d(x, &w3, &b4, 1)),
        ),
        (
            "conv-transpose 2x2 stride 2 (f64)",
            vec![2, 3, 4, 5],
            Box::new(|x| reference::conv_transpose_2x2(x, &wt, &b4)),
        ),
        (
            "GroupNorm(4) -> ReLU (f64)",
            vec![2, 8, 5, 6],
            Box::new(|x| reference::group_norm_relu(x, &gamma, &beta, 4, 1e-5)),
        ),
        (
            "max-pool 2x2 by reshape + max (f64)",
            vec![2, 3, 6, 8],
            Box::new(reference::max_pool_2x2),
        ),
        (
            "concatenate channels (f64)",
            vec![2, 3, 4, 4],
            Box::new(|x| reference::cat_channels(&x.sqr()?, x)),
        ),
    ];
    if let Ok(t) = &target {
        let t = t.clone();
        cases.push((
            "Dice + cross-entropy loss (f64)",
            vec![2, 5, 6, 6],
            Box::new(move |x| Ok(dice_cross_entropy_reference(x, &t)?.total)),
        ));
    }
    cases
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, f))| {
            fd_check(side, name, &shape, &*f, 200 + i as u64).unwrap_or_else(|e| {
                println!("  FAIL {name}: {e:#}");
                json!({"name": name, "error": format!("{e:#}"), "pass": false})
            })
        })
        .collect()
}

fn default_unet() -> UNetConfig {
    cosilo_train::TrainConfig::default().model
}

/// Gradients by variable name.
type NamedGrads = Vec<(String, Tensor)>;

/// Named gradients of every variable.
fn var_grads(
    vars: &VarMap,
    grads: &candle_core::backprop::GradStore,
) -> anyhow::Result<NamedGrads> {
    let data = vars
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned var map"))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let g = grads
                .get(data[n].as_tensor())
                .with_context(|| format!("no gradient for {n}"))?;
            Ok((n.clone(), g.clone()))
        })
        .collect()
}

fn unet_parity(side: &Side) -> anyhow::Result<Value> {
    const TOL_FWD: f64 = 1e-4;
    const TOL_GRAD: f64 = 1e-3;
    let cfg = default_unet();
    let (b, h, w) = (4, 128, 128);
    let mut rng = Rng::new(21);
    let x: Vec<f32> = (0..b * h * w).map(|_| rng.uniform() as f32).collect();
    let labels = random_labels(b, cfg.classes, h, w, &mut rng);
    let oh = one_hot(&labels, b, cfg.classes, h, w);
    let run = |dev: &Device, kind: Ops| -> anyhow::Result<(Tensor, f32, NamedGrads)> {
        let (net, vars) = build(&cfg, dev, 1)?;
        let xt = Tensor::from_vec(x.clone(), (b, 1, h, w), dev)?;
        let t = Tensor::from_vec(oh.clone(), (b, cfg.classes, h, w), dev)?;
        let logits = net.forward_with(&xt, kind)?;
        let loss = match kind {
            Ops::Fast => dice_cross_entropy(&logits, &t)?,
            Ops::Reference => dice_cross_entropy_reference(&logits, &t)?,
        };
        let grads = loss.total.backward()?;
        Ok((
            logits,
            loss.total.to_scalar::<f32>()?,
            var_grads(&vars, &grads)?,
        ))
    };
    let (y0, l0, g0) = run(&Device::Cpu, Ops::Fast)?;
    let (y1, l1, g1) = run(&side.dev, side.ops)?;
    let (fwd, _) = rel_err(&y1, &y0)?;
    let loss_rel = ((l1 - l0) / l0).abs() as f64;
    let mut per = Vec::new();
    let mut worst = (0f64, String::new());
    for ((n, a), (_, r)) in g1.iter().zip(&g0) {
        let (e, _) = rel_err(a, r)?;
        if e > worst.0 || !e.is_finite() {
            worst = (e, n.clone());
        }
        per.push(json!({"name": n, "rel_l2": e}));
    }
    let pass = fwd <= TOL_FWD && loss_rel <= TOL_FWD && worst.0 <= TOL_GRAD;
    println!(
        "  {:4} default U-Net, batch {b} x {h}x{w}: logits {fwd:.2e}, loss {loss_rel:.2e} (tolerance {TOL_FWD:.0e}); worst of {} parameter gradients {:.2e} ({}; tolerance {TOL_GRAD:.0e})",
        if pass { "ok" } else { "FAIL" },
        per.len(),
        worst.0,
        worst.1
    );
    Ok(
        json!({"batch": b, "h": h, "w": w, "logits_rel_l2": fwd, "loss_cpu": l0, "loss_device": l1,
        "loss_rel": loss_rel, "worst_gradient_rel_l2": worst.0, "worst_gradient": worst.1,
        "gradients": per, "tolerance_forward": TOL_FWD, "tolerance_gradient": TOL_GRAD, "pass": pass}),
    )
}

/// A synthetic segmentation batch: discs of classes 1..classes on a background, each class with
/// its own mean intensity, plus noise; deterministic from `rng`.
fn synthetic_batch(
    b: usize,
    classes: usize,
    h: usize,
    w: usize,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<u8>) {
    let mut img = vec![0f32; b * h * w];
    let mut lab = vec![0u8; b * h * w];
    for i in 0..b {
        for _ in 0..4 {
            let c = 1 + rng.below(classes - 1);
            let (cy, cx) = (rng.range(0.0, h as f64), rng.range(0.0, w as f64));
            let r = rng.range(h as f64 / 10.0, h as f64 / 4.0);
            for y in 0..h {
                for x in 0..w {
                    let d = ((y as f64 - cy).powi(2) + (x as f64 - cx).powi(2)).sqrt();
                    if d < r {
                        lab[(i * h + y) * w + x] = c as u8;
                    }
                }
            }
        }
        for k in 0..h * w {
            let c = lab[i * h * w + k] as f64;
            img[i * h * w + k] = (0.2 * c + 0.15 * rng.normal()) as f32;
        }
    }
    (img, lab)
}

fn training_parity(side: &Side, steps: usize) -> anyhow::Result<Value> {
    // Two float orders of summation drift apart as the weights move; 2 % of the first loss
    // bounds that over a short run, while a wrong gradient anywhere moves the curve by far more.
    const TOL: f64 = 0.02;
    let cfg = default_unet();
    let (b, h, w) = (4, 64, 64);
    let mut rng = Rng::new(31);
    let batches: Vec<(Vec<f32>, Vec<f32>)> = (0..steps)
        .map(|_| {
            let (x, l) = synthetic_batch(b, cfg.classes, h, w, &mut rng);
            (x, one_hot(&l, b, cfg.classes, h, w))
        })
        .collect();
    let run = |dev: &Device, kind: Ops| -> anyhow::Result<(Vec<f64>, f64)> {
        let (net, vars) = build(&cfg, dev, 1)?;
        let mut opt = AdamW::new(&vars, AdamWConfig::default())?;
        let mut losses = Vec::new();
        let t0 = Instant::now();
        for (x, t) in &batches {
            let xt = Tensor::from_vec(x.clone(), (b, 1, h, w), dev)?;
            let tt = Tensor::from_vec(t.clone(), (b, cfg.classes, h, w), dev)?;
            let logits = net.forward_with(&xt, kind)?;
            let loss = match kind {
                Ops::Fast => dice_cross_entropy(&logits, &tt)?,
                Ops::Reference => dice_cross_entropy_reference(&logits, &tt)?,
            };
            let grads = loss.total.backward()?;
            opt.apply(&grads)?;
            losses.push(loss.total.to_scalar::<f32>()? as f64);
        }
        Ok((losses, t0.elapsed().as_secs_f64()))
    };
    let (c, tc) = run(&Device::Cpu, Ops::Fast)?;
    let (g, tg) = run(&side.dev, side.ops)?;
    let worst = c
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b).abs() / c[0])
        .fold(0f64, |m, v| {
            if v.is_finite() {
                m.max(v)
            } else {
                f64::INFINITY
            }
        });
    let tail = |v: &[f64]| v[v.len() - 5..].iter().sum::<f64>() / 5.0;
    let falls = tail(&c) < 0.8 * c[0] && tail(&g) < 0.8 * g[0];
    let pass = worst <= TOL && falls;
    println!(
        "  {:4} {steps} AdamW steps, batch {b} x {h}x{w}, synthetic discs: loss {:.4} -> {:.4} (CPU) / {:.4} -> {:.4} (device); worst |difference| {:.2e} of the first loss (tolerance {TOL}); CPU {tc:.1} s, device {tg:.1} s",
        if pass { "ok" } else { "FAIL" },
        c[0], c[steps - 1], g[0], g[steps - 1], worst
    );
    Ok(
        json!({"steps": steps, "batch": b, "h": h, "w": w, "loss_cpu": c, "loss_device": g,
        "worst_rel_to_first": worst, "tolerance": TOL, "both_fall": falls, "pass": pass,
        "seconds_cpu": tc, "seconds_device": tg}),
    )
}

fn check(out: &str, train_steps: usize) -> anyhow::Result<bool> {
    let side = Side::pick()?;
    println!("gpu_check: device under test: {}", side.name);
    println!("ops (device vs Cosilo's CPU path, f32, relative L2 error):");
    let ops = ops_checks(&side);
    println!("finite-difference gradients on the device (f64):");
    let fd = gradchecks(&side);
    println!("whole U-Net forward + backward:");
    let unet = unet_parity(&side).unwrap_or_else(|e| {
        println!("  FAIL U-Net: {e:#}");
        json!({"error": format!("{e:#}"), "pass": false})
    });
    println!("training run:");
    let train = training_parity(&side, train_steps).unwrap_or_else(|e| {
        println!("  FAIL training: {e:#}");
        json!({"error": format!("{e:#}"), "pass": false})
    });
    let all = ops
        .iter()
        .chain(&fd)
        .chain([&unet, &train])
        .all(|v| v["pass"].as_bool() == Some(true));
    let doc = json!({
        "device": side.name, "gpu": side.gpu(), "pass": all,
        "ops": ops, "gradcheck": fd, "unet": unet, "training": train,
    });
    std::fs::write(out, serde_json::to_string_pretty(&doc)?)?;
    println!("checks: {}", if all { "all passed" } else { "SOME FAILED" });
    Ok(all)
}

/// The device memory high-water mark of candle's allocations: cudarc allocates from the device's
/// default stream-ordered memory pool (cuMemAllocAsync), whose statistics the driver keeps.
#[cfg(feature = "cuda")]
mod gpu_mem {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    fn pool(dev: &Device) -> Option<sys::CUmemoryPool> {
        let cd = dev.as_cuda_device().ok()?;
        let stream = cd.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().ok()?;
        let mut p: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: a valid device handle from a live context; `p` is written by the driver.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut p, ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(p)
    }

    fn attr(dev: &Device, a: sys::CUmemPool_attribute) -> Option<u64> {
        let p = pool(dev)?;
        let mut v: u64 = 0;
        // SAFETY: the attribute is a cuuint64_t; `v` outlives the call.
        let r = unsafe { sys::cuMemPoolGetAttribute(p, a, &mut v as *mut u64 as *mut _) };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// (used, reserved) high-water marks in bytes since the last reset.
    pub fn high_water(dev: &Device) -> (Option<u64>, Option<u64>) {
        (
            attr(dev, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH),
            attr(
                dev,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ),
        )
    }

    /// Bytes of the pool in use now.
    pub fn used_now(dev: &Device) -> Option<u64> {
        attr(
            dev,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        )
    }

    pub fn reset(dev: &Device) {
        if let Some(p) = pool(dev) {
            for a in [
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero: u64 = 0;
                // SAFETY: resetting a high-water mark takes a cuuint64_t of 0.
                unsafe { sys::cuMemPoolSetAttribute(p, a, &mut zero as *mut u64 as *mut _) };
            }
        }
    }

    /// Bytes in use on the device by every process (cuMemGetInfo: total − free).
    pub fn in_use() -> Option<u64> {
        let (free, total) =
            candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
        Some((total - free) as u64)
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu_mem {
    use candle_core::Device;
    pub fn high_water(_: &Device) -> (Option<u64>, Option<u64>) {
        (None, None)
    }
    pub fn reset(_: &Device) {}
    pub fn used_now(_: &Device) -> Option<u64> {
        None
    }
    pub fn in_use() -> Option<u64> {
        None
    }
}

fn bench(batch: usize, size: usize, steps: usize, budget_s: f64) -> anyhow::Result<()> {
    let side = Side::pick()?;
    let dev = &side.dev;
    let cfg = default_unet();
    let (net, vars) = build(&cfg, dev, 1)?;
    let mut opt = AdamW::new(&vars, AdamWConfig::default())?;
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..batch * size * size)
        .map(|_| rng.uniform() as f32)
        .collect();
    let labels = random_labels(batch, cfg.classes, size, size, &mut rng);
    let x = Tensor::from_vec(x, (batch, 1, size, size), dev)?;
    let t = Tensor::from_vec(
        one_hot(&labels, batch, cfg.classes, size, size),
        (batch, cfg.classes, size, size),
        dev,
    )?;
    let kind = Ops::Fast;
    let mut times = Vec::new();
    let mut phases = [0f64; 3];
    const WARMUP: usize = 3;
    let mut in_use_max = 0u64;
    let start = Instant::now();
    for i in 0..steps + WARMUP {
        if i == WARMUP {
            dev.synchronize()?;
            gpu_mem::reset(dev);
        }
        dev.synchronize()?;
        let t0 = Instant::now();
        let logits = net.forward_with(&x, kind)?;
        let loss = dice_cross_entropy(&logits, &t)?;
        dev.synchronize()?;
        let t1 = Instant::now();
        let grads = loss.total.backward()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        in_use_max = in_use_max.max(gpu_mem::in_use().unwrap_or(0));
        opt.apply(&grads)?;
        drop(grads);
        let l = loss.total.to_scalar::<f32>()?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if !l.is_finite() {
            bail!("non-finite loss at step {i}");
        }
        if i >= WARMUP {
            times.push((t3 - t0).as_secs_f64() * 1e3);
            phases[0] += (t1 - t0).as_secs_f64() * 1e3;
            phases[1] += (t2 - t1).as_secs_f64() * 1e3;
            phases[2] += (t3 - t2).as_secs_f64() * 1e3;
            if start.elapsed().as_secs_f64() > budget_s && times.len() >= 3 {
                break;
            }
        }
    }
    let timed = times.len() as f64;
    for p in &mut phases {
        *p /= timed;
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let (used, reserved) = gpu_mem::high_water(dev);
    let mib = |v: Option<u64>| v.map(|b| b as f64 / (1u64 << 20) as f64);
    println!(
        "{}",
        json!({
            "impl": "candle", "device": if side.gpu() { side.name.as_str() } else { "cpu (Cosilo's ops)" }, "base": cfg.base, "depth": cfg.depth,
            "batch": batch, "h": size, "w": size, "parameters": UNet::parameter_count(&vars),
            "steps": times.len(), "ms_per_step": median, "ms_min": times[0], "ms_max": times[times.len() - 1],
            "slices_per_s": batch as f64 / (median / 1e3),
            "ms_forward_loss": phases[0], "ms_backward": phases[1], "ms_optimiser": phases[2],
            "pool_used_high_mib": mib(used), "pool_reserved_high_mib": mib(reserved),
            "device_in_use_max_mib": mib(Some(in_use_max).filter(|&v| v > 0)),
        })
    );
    Ok(())
}

/// `gpu_check profile BATCH`: each U-Net op of the default model at its largest shape, forward and
/// forward + backward of `sum(f(x) · r)`, median of 5 synchronised runs after 2 warm-up runs, with
/// the memory pool's high-water mark over one forward + backward (inputs excluded). One JSON line
/// per op.
fn profile(batch: usize) -> anyhow::Result<()> {
    let side = Side::pick()?;
    let dev = side.dev.clone();
    let b = batch;
    type P = (&'static str, Vec<Vec<usize>>, Box<OpFn>);
    let cases: Vec<P> = vec![
        (
            "conv3x3 16->16 @128",
            vec![vec![b, 16, 128, 128], vec![16, 16, 3, 3], vec![16]],
            Box::new(|t, _| ops::conv2d(&t[0], &t[1], &t[2], 1)),
        ),
        (
            "conv3x3 32->16 @128",
            vec![vec![b, 32, 128, 128], vec![16, 32, 3, 3], vec![16]],
            Box::new(|t, _| ops::conv2d(&t[0], &t[1], &t[2], 1)),
        ),
        (
            "conv3x3 128->128 @16",
            vec![vec![b, 128, 16, 16], vec![128, 128, 3, 3], vec![128]],
            Box::new(|t, _| ops::conv2d(&t[0], &t[1], &t[2], 1)),
        ),
        (
            "groupnorm+relu 16 @128",
            vec![vec![b, 16, 128, 128], vec![16], vec![16]],
            Box::new(|t, _| ops::group_norm_relu(&t[0], &t[1], &t[2], 4, 1e-5)),
        ),
        (
            "maxpool2x2 16 @128",
            vec![vec![b, 16, 128, 128]],
            Box::new(|t, _| ops::max_pool_2x2(&t[0])),
        ),
        (
            "convT2x2 32->16 @64->128",
            vec![vec![b, 32, 64, 64], vec![32, 16, 2, 2], vec![16]],
            Box::new(|t, _| ops::conv_transpose_2x2(&t[0], &t[1], &t[2])),
        ),
        (
            "cat 16+16 @128",
            vec![vec![b, 16, 128, 128], vec![b, 16, 128, 128]],
            Box::new(|t, _| ops::cat_channels(&t[0], &t[1])),
        ),
        (
            "conv1x1 16->5 @128",
            vec![vec![b, 16, 128, 128], vec![5, 16, 1, 1], vec![5]],
            Box::new(|t, _| ops::conv2d(&t[0], &t[1], &t[2], 0)),
        ),
    ];
    for (name, shapes, f) in cases {
        let mut rng = Rng::new(5);
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::from_tensor(&Tensor::from_vec(randn(s, &mut rng), s.as_slice(), &dev)?))
            .collect::<candle_core::Result<_>>()?;
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y0 = f(&ts, true)?;
        let r = Tensor::from_vec(randn(y0.dims(), &mut rng), y0.dims(), &dev)?;
        drop(y0);
        let (mut fwd, mut all) = (Vec::new(), Vec::new());
        let mut high = None;
        let mut base = None;
        for i in 0..7 {
            dev.synchronize()?;
            if i == 6 {
                gpu_mem::reset(&dev);
                base = gpu_mem::used_now(&dev);
            }
            let t0 = Instant::now();
            let y = f(&ts, true)?;
            dev.synchronize()?;
            let t1 = Instant::now();
            let g = (&y * &r)?.sum_all()?.backward()?;
            drop(g);
            drop(y);
            dev.synchronize()?;
            let t2 = Instant::now();
            if i == 6 {
                high = gpu_mem::high_water(&dev).0;
            } else if i >= 2 {
                fwd.push((t1 - t0).as_secs_f64() * 1e3);
                all.push((t2 - t0).as_secs_f64() * 1e3);
            }
        }
        fwd.sort_by(f64::total_cmp);
        all.sort_by(f64::total_cmp);
        let input_mib: f64 = shapes
            .iter()
            .map(|s| s.iter().product::<usize>() as f64 * 4.0)
            .sum::<f64>()
            / (1u64 << 20) as f64;
        println!(
            "{}",
            json!({"impl": "candle", "op": name, "batch": b, "ms_forward": fwd[fwd.len() / 2],
                "ms_forward_backward": all[all.len() / 2], "inputs_mib": input_mib,
                "pool_used_high_mib": high.map(|v| v as f64 / (1u64 << 20) as f64),
                "peak_above_inputs_mib": high.zip(base).map(|(h, b)| h.saturating_sub(b) as f64 / (1u64 << 20) as f64)})
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize, d: usize| -> anyhow::Result<usize> {
        args.get(i)
            .map(|s| s.parse().with_context(|| format!("argument {i}: {s:?}")))
            .unwrap_or(Ok(d))
    };
    match args.first().map(String::as_str) {
        Some("check") => {
            let out = args.get(1).map(String::as_str).unwrap_or("gpu_check.json");
            let ok = check(out, num(2, 40)?)?;
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Some("bench") => {
            let budget = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20.0);
            bench(num(1, 8)?, num(2, 128)?, num(3, 10)?, budget)
        }
        Some("profile") => profile(num(1, 8)?),
        Some("device") => {
            // Which device `train::device()` picks (and its one log line).
            let d = cosilo_train::device()?;
            println!("{}", if d.is_cpu() { "cpu" } else { "cuda" });
            Ok(())
        }
        _ => bail!("usage: gpu_check check OUT.json [TRAIN_STEPS] | bench BATCH SIZE STEPS [SECONDS] | profile BATCH | device"),
    }
}
