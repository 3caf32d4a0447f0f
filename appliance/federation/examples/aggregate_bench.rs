//! Throughput and memory of the aggregation kernel (`federation::aggregate`).
//!
//! For the U-Net's 483,221 parameters and a 64 Mi-value buffer, and N = 2, 4, 8 updates:
//! GB/s of `WeightedAverage::add` (bytes of update read per second) against a plain
//! `copy_from_slice` of the same bytes, the `f16` and `f16+zstd` streaming paths, and the peak
//! extra resident memory (VmHWM) of aggregating N encoded updates, each in a fresh process.
//!
//! `cargo run --release -p cosilo-appliance --example aggregate_bench [-- --quick]`

use std::hint::black_box;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cosilo_federation::aggregate::WeightedAverage;
use cosilo_federation::weights::{encode_values, WeightFormat};

const SMALL: usize = 483_221;
const BIG: usize = 64 << 20;

fn random(n: usize, seed: u64) -> Vec<f32> {
    // A small xorshift: values in [-1, 1), like trained weights.
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Best time of `reps` runs of `f` (the machine is shared: the minimum is the least disturbed).
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn vm_hwm() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?;
    Ok(kib * 1024.0)
}

/// Child mode: aggregate `updates` encoded updates of `n` values and print the VmHWM growth.
fn mem_child(n: usize, updates: usize, fmt: WeightFormat) -> Result<()> {
    let inputs: Vec<Vec<u8>> = (0..2).map(|k| encode_values(&random(n, k), fmt)).collect();
    // Reset the high-water mark to the current RSS (Linux >= 4.0): making the inputs peaked.
    std::fs::write("/proc/self/clear_refs", "5").context("resetting VmHWM")?;
    let base = vm_hwm()?;
    let mut avg = WeightedAverage::new(n);
    for k in 0..updates {
        avg.add_encoded(&inputs[k % 2], fmt, 1.0 + k as f64)?;
    }
    let out = avg.finish()?;
    black_box(&out);
    println!("{}", vm_hwm()? - base);
    Ok(())
}

fn mem_run(n: usize, updates: usize, fmt: WeightFormat) -> Result<f64> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args([
            "--mem-child",
            &n.to_string(),
            &updates.to_string(),
            fmt.name(),
        ])
        .output()?;
    if !out.status.success() {
        bail!("child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().parse()?)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 5 && args[1] == "--mem-child" {
        return mem_child(args[2].parse()?, args[3].parse()?, args[4].parse()?);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let reps = if quick { 2 } else { 5 };
    let gb = |bytes: f64, s: f64| bytes / s / 1e9;

    println!("## Throughput (best of {reps}; GB/s = bytes of update input read per second)\n");
    println!("| values | N | copy f32 | add f32 | add/copy | add_many f32 (one pass) | add_many/copy | add f32, rayon | add f16 (GB/s of f16; Gvalues/s) | add f16+zstd (GB/s of compressed; Gvalues/s) | zstd ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &[SMALL, BIG] {
        // Two distinct inputs cycled: beyond the caches for the big buffer, like N distinct ones.
        let inputs: Vec<Vec<f32>> = (0..2).map(|k| random(n, k + 1)).collect();
        let f16s: Vec<Vec<u8>> = inputs
            .iter()
            .map(|x| encode_values(x, WeightFormat::F16))
            .collect();
        let zs: Vec<Vec<u8>> = inputs
            .iter()
            .map(|x| encode_values(x, WeightFormat::F16Zstd))
            .collect();
        let ratio = (n * 2) as f64 / zs[0].len() as f64;
        let mut dst = vec![0f32; n];
        for &updates in &[2usize, 4, 8] {
            let bytes = (updates * n * 4) as f64;
            let t_copy = best(reps, || {
                for k in 0..updates {
                    dst.copy_from_slice(&inputs[k % 2]);
                    black_box(&mut dst);
                }
            });
            let mut avg = WeightedAverage::new(n);
            let t_add = best(reps, || {
                for k in 0..updates {
                    avg.add(&inputs[k % 2], 1.0 + k as f64).expect("add");
                }
                black_box(&avg);
            });
            let mut par = WeightedAverage::new(n).parallel(true);
            let t_par = best(reps, || {
                for k in 0..updates {
                    par.add(&inputs[k % 2], 1.0 + k as f64).expect("add");
                }
                black_box(&par);
            });
            let refs: Vec<(&[f32], f64)> = (0..updates)
                .map(|k| (inputs[k % 2].as_slice(), 1.0 + k as f64))
                .collect();
            let mut many = WeightedAverage::new(n);
            let t_many = best(reps, || {
                many.add_many(&refs).expect("add_many");
                black_box(&many);
            });
            let mut avg16 = WeightedAverage::new(n);
            let t_f16 = best(reps, || {
                for k in 0..updates {
                    avg16
                        .add_encoded(&f16s[k % 2], WeightFormat::F16, 1.0)
                        .expect("f16");
                }
            });
            let mut avgz = WeightedAverage::new(n);
            let t_z = best(reps.min(3), || {
                for k in 0..updates {
                    avgz.add_encoded(&zs[k % 2], WeightFormat::F16Zstd, 1.0)
                        .expect("zstd");
                }
            });
            let values = (updates * n) as f64;
            let zbytes: f64 = (0..updates).map(|k| zs[k % 2].len() as f64).sum();
            println!(
                "| {n} | {updates} | {:.1} | {:.1} | {:.0}% | {:.1} | {:.0}% | {:.1} | {:.1}; {:.2} | {:.2}; {:.2} | {ratio:.3} |",
                gb(bytes, t_copy),
                gb(bytes, t_add),
                100.0 * t_copy / t_add,
                gb(bytes, t_many),
                100.0 * t_copy / t_many,
                gb(bytes, t_par),
                gb(values * 2.0, t_f16),
                values / t_f16 / 1e9,
                gb(zbytes, t_z),
                values / t_z / 1e9,
            );
        }
    }

    println!("\n## Peak extra memory (VmHWM growth while aggregating N encoded updates; fresh process each)\n");
    println!("| values | model f32 MiB | format | N | extra MiB | extra / model |");
    println!("|---|---|---|---|---|---|");
    for &n in &[SMALL, BIG] {
        let model = (n * 4) as f64;
        for fmt in [WeightFormat::F16, WeightFormat::F16Zstd] {
            for updates in [2usize, 4, 8] {
                let extra = mem_run(n, updates, fmt)?;
                println!(
                    "| {n} | {:.1} | {fmt} | {updates} | {:.1} | {:.2} |",
                    model / 1048576.0,
                    extra / 1048576.0,
                    extra / model
                );
            }
        }
    }
    Ok(())
}
