//! Times the candle U-Net training step (forward, loss, backward, AdamW) on random data.
//!
//! `cargo run --release -p cosilo-appliance --example train_step -- BASE DEPTH BATCH H W [STEPS]`
//! prints one JSON line with the median milliseconds per step, slices/s and peak RSS, for
//! `bench/train_vs_pytorch.py` to compare against the same step in PyTorch.
//!
//! `COSILO_STEP_DETAIL=1` prints forward / loss / backward / optimiser times per step;
//! `COSILO_OP_PROFILE=1` prints the time per step spent in each of Cosilo's CPU kernels
//! (`train::ops`); `COSILO_REFERENCE_OPS=1` runs the network and the loss with candle's own ops
//! instead (the step before `train::ops`; the optimiser is the in-place AdamW either way).

use std::time::Instant;

use candle_core::{Device, Tensor};
use cosilo_rng::Rng;
use cosilo_train::loss::{dice_cross_entropy, dice_cross_entropy_reference, one_hot};
use cosilo_train::ops::profile;
use cosilo_train::optim::{AdamW, AdamWConfig};
use cosilo_train::unet::{build, Ops, UNet, UNetConfig};

/// User + system CPU seconds of this process so far (from /proc; 0 where it is missing).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // After the command name (which ends with ')'): state, ppid, …; utime and stime are the 12th
    // and 13th of those.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Clock ticks are 100 per second on Linux x86-64 and arm64.
    (field(11) + field(12)) / 100.0
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (base, depth, batch, h, w, steps) = (
        get(0, 16),
        get(1, 3),
        get(2, 8),
        get(3, 128),
        get(4, 128),
        get(5, 6),
    );
    let cfg = UNetConfig {
        in_channels: 1,
        classes: 5,
        base,
        depth,
        groups: 4,
    };
    let dev = Device::Cpu;
    let (net, vars) = build(&cfg, &dev, 1)?;
    let mut opt = AdamW::new(&vars, AdamWConfig::default())?;
    let mut rng = Rng::new(2);
    let x: Vec<f32> = (0..batch * h * w).map(|_| rng.uniform() as f32).collect();
    let labels: Vec<u8> = (0..batch * h * w)
        .map(|_| rng.below(cfg.classes) as u8)
        .collect();
    let x = Tensor::from_vec(x, (batch, 1, h, w), &dev)?;
    let t = Tensor::from_vec(
        one_hot(&labels, batch, cfg.classes, h, w),
        (batch, cfg.classes, h, w),
        &dev,
    )?;
    let kind = if std::env::var_os("COSILO_REFERENCE_OPS").is_some() {
        Ops::Reference
    } else {
        Ops::Fast
    };
    let mut times = Vec::new();
    let mut cpu0 = 0.0;
    for i in 0..steps + 1 {
        if i == 1 {
            profile::take(); // drop the warm-up step's kernel times
            cpu0 = cpu_seconds();
        }
        let t0 = Instant::now();
        let logits = net.forward_with(&x, kind)?;
        let t1 = Instant::now();
        let loss = match kind {
            Ops::Fast => dice_cross_entropy(&logits, &t)?,
            Ops::Reference => dice_cross_entropy_reference(&logits, &t)?,
        };
        let t2 = Instant::now();
        let grads = loss.total.backward()?;
        let t3 = Instant::now();
        opt.apply(&grads)?;
        if std::env::var_os("COSILO_STEP_DETAIL").is_some() {
            eprintln!(
                "forward {:.0} ms, loss {:.0} ms, backward {:.0} ms, optimiser {:.0} ms",
                (t1 - t0).as_secs_f64() * 1e3,
                (t2 - t1).as_secs_f64() * 1e3,
                (t3 - t2).as_secs_f64() * 1e3,
                t3.elapsed().as_secs_f64() * 1e3
            );
        }
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ops = profile::take();
    if !ops.is_empty() {
        let total: f64 = ops.iter().map(|o| o.1.as_secs_f64()).sum();
        eprintln!("kernel time per step (mean of {steps} steps):");
        for (name, d, calls) in &ops {
            eprintln!(
                "  {name:40} {:8.1} ms  {:4} calls",
                d.as_secs_f64() * 1e3 / steps as f64,
                calls / steps
            );
        }
        let mean_step: f64 = times.iter().sum::<f64>() / times.len() as f64;
        eprintln!(
            "  {:40} {:8.1} ms  (of a mean step of {mean_step:.1} ms)",
            "all kernels",
            total * 1e3 / steps as f64
        );
    }
    let cpu_ms = (cpu_seconds() - cpu0) * 1e3 / steps as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let name = match kind {
        Ops::Fast => "candle",
        Ops::Reference => "candle-reference",
    };
    println!(
        "{{\"impl\":\"{name}\",\"base\":{base},\"depth\":{depth},\"batch\":{batch},\"h\":{h},\"w\":{w},\"parameters\":{},\"ms_per_step\":{median:.1},\"cpu_ms_per_step\":{cpu_ms:.1},\"slices_per_s\":{:.2},\"peak_rss_mib\":{:.1}}}",
        UNet::parameter_count(&vars),
        batch as f64 / (median / 1e3),
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}
