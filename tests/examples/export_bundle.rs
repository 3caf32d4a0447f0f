//! Writes the bundle of a seeded, untrained U-Net: a real exported model for benchmarks and
//! smoke tests of the SDK when no trained run is at hand.
//!
//! `cargo run --release -p cosilo-tests --example export_bundle -- DIR [BASE DEPTH [SEED]]`
//! (default: the training default, base 16, depth 3, 5 classes).

use anyhow::{Context, Result};
use candle_core::Device;
use cosilo_sdk::bundle::{rfc3339_utc, Metrics, Provenance};
use cosilo_train::export;
use cosilo_train::{unet, TrainConfig};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .first()
        .context("usage: export_bundle DIR [BASE DEPTH [SEED]]")?;
    let mut cfg = TrainConfig::default();
    if let (Some(base), Some(depth)) = (args.get(1), args.get(2)) {
        cfg.model.base = base.parse().context("BASE")?;
        cfg.model.depth = depth.parse().context("DEPTH")?;
    }
    let seed: u64 = args
        .get(3)
        .map(|s| s.parse())
        .transpose()
        .context("SEED")?
        .unwrap_or(1);
    cfg.validate()?;
    let (_, vars) = unet::build(&cfg.model, &Device::Cpu, seed)?;
    let manifest = export::manifest_for(
        &cfg,
        &format!("untrained-unet-b{}-d{}", cfg.model.base, cfg.model.depth),
        Provenance {
            training_run: format!("untrained (seed {seed})"),
            sites: vec![],
            cases: 0,
            created: rfc3339_utc(std::time::SystemTime::now()),
            cosilo_version: env!("CARGO_PKG_VERSION").into(),
        },
        Metrics {
            dice: vec![],
            cases: 0,
        },
    );
    let info = export::write_bundle(dir.as_ref(), &cfg.model, &vars, &manifest)?;
    println!(
        "{}: {} nodes, {} parameters, {} bytes, sha256 {}",
        info.dir.display(),
        info.nodes,
        info.parameters,
        info.model_bytes,
        info.manifest.model_sha256
    );
    Ok(())
}
