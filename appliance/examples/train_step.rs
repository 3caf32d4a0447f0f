//! Times the candle U-Net training step (forward, loss, backward, AdamW) on random data.
//!
//! `cargo run --release -p cosilo-appliance --example train_step -- BASE DEPTH BATCH H W [STEPS]`
//! prints one JSON line with the median milliseconds per step, slices/s and peak RSS, for
//! `bench/train_vs_pytorch.py` to compare against the same step in PyTorch.

use std::time::Instant;

use candle_core::{Device, Tensor};
use cosilo_appliance::train::loss::{dice_cross_entropy, one_hot};
use cosilo_appliance::train::optim::{AdamW, AdamWConfig};
use cosilo_appliance::train::unet::{build, UNet, UNetConfig};
use cosilo_appliance::rng::Rng;

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
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse()).collect::<Result<_, _>>()?;
    let get = |i: usize, d: usize| a.get(i).copied().unwrap_or(d);
    let (base, depth, batch, h, w, steps) = (get(0, 16), get(1, 3), get(2, 8), get(3, 128), get(4, 128), get(5, 6));
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
    let labels: Vec<u8> = (0..batch * h * w).map(|_| rng.below(cfg.classes) as u8).collect();
    let x = Tensor::from_vec(x, (batch, 1, h, w), &dev)?;
    let t = Tensor::from_vec(one_hot(&labels, batch, cfg.classes, h, w), (batch, cfg.classes, h, w), &dev)?;
    let mut times = Vec::new();
    for i in 0..steps + 1 {
        let t0 = Instant::now();
        let logits = net.forward(&x)?;
        let t1 = Instant::now();
        let loss = dice_cross_entropy(&logits, &t)?;
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
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{{\"impl\":\"candle\",\"base\":{base},\"depth\":{depth},\"batch\":{batch},\"h\":{h},\"w\":{w},\"parameters\":{},\"ms_per_step\":{median:.1},\"slices_per_s\":{:.2},\"peak_rss_mib\":{:.1}}}",
        UNet::parameter_count(&vars),
        batch as f64 / (median / 1e3),
        peak_rss_kib() as f64 / 1024.0
    );
    Ok(())
}
