//! Time per volume of a FedSM routed bundle (selector + the chosen U-Net) against the single-model
//! SDK path (the same U-Net alone), side by side in one process, alternating, on the same volume.
//!
//! `cargo run --release -p cosilo-train --example routed_bench -- [SIZE SLICES ROUNDS THREADS]`
//! (default 256 × 256 × 24 slices, 5 rounds, 2 ONNX Runtime threads). Models: the training default
//! U-Net (base 16, depth 3, 5 classes) and the default selector (base 8, depth 3, 3 sites), seeded
//! and untrained (speed does not depend on the weights); the selector is made sure of this
//! hospital so the routed path runs the personalised model, i.e. selector + one U-Net. Prints one
//! JSON line per timed call and a summary line.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use cosilo_rng::Rng;
use cosilo_sdk::bundle::{rfc3339_utc, Metrics, Provenance};
use cosilo_sdk::route::{write_routed, ModelFiles, RoutedModel, RoutedSegmenter, RoutingRule};
use cosilo_sdk::segment::{Segmenter, SegmenterOptions};
use cosilo_sdk::{Geometry, Volume};
use cosilo_train::export;
use cosilo_train::export::selector::selector_onnx;
use cosilo_train::selector::{self, SelectorConfig};
use cosilo_train::{unet, TrainConfig};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .context("usage: routed_bench [SIZE SLICES ROUNDS THREADS]")?;
    let size = args.first().copied().unwrap_or(256);
    let slices = args.get(1).copied().unwrap_or(24);
    let rounds = args.get(2).copied().unwrap_or(5);
    let threads = args.get(3).copied().unwrap_or(2);

    let cfg = TrainConfig::default();
    let (_, gvars) = unet::build(&cfg.model, &Device::Cpu, 1)?;
    let (_, pvars) = unet::build(&cfg.model, &Device::Cpu, 2)?;
    let manifest = export::manifest_for(
        &cfg,
        "bench-unet",
        Provenance {
            training_run: "untrained".into(),
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
    let sc = SelectorConfig::default();
    let (_, svars) = selector::build(&sc, &Device::Cpu, DType::F32, 3)?;
    {
        let data = svars.data().lock().unwrap();
        data["fc.bias"].set(&Tensor::new(&[12f32, 0.0, 0.0], &Device::Cpu)?)?;
    }
    let tmp = tempfile::tempdir()?;
    let single_dir = tmp.path().join("single");
    export::write_bundle(&single_dir, &cfg.model, &pvars, &manifest)?;
    let routed_dir = tmp.path().join("routed");
    let (g, p) = (
        export::onnx_model(&cfg.model, &gvars)?,
        export::onnx_model(&cfg.model, &pvars)?,
    );
    let rule = RoutingRule::new(vec!["a".into(), "b".into(), "c".into()], 0);
    write_routed(
        &routed_dir,
        ModelFiles {
            model: &g,
            manifest: &manifest,
        },
        ModelFiles {
            model: &p,
            manifest: &manifest,
        },
        &selector_onnx(&sc, &svars)?,
        &rule,
        sc.multiple(),
    )?;
    let options = SegmenterOptions {
        intra_threads: Some(threads),
        ..Default::default()
    };
    let single = Segmenter::open_with(&single_dir, &options)?;
    let routed = RoutedSegmenter::open_with(&routed_dir, &options)?;
    let mut rng = Rng::new(4);
    let data: Vec<f32> = (0..size * size * slices)
        .map(|_| 100.0 + 30.0 * rng.normal() as f32)
        .collect();
    let volume = Volume::new(
        Geometry::axis_aligned([size, size, slices], [1.0; 3], [0.0; 3]),
        data,
    )?;
    // Warm-up, and the routed path must run selector + personalised model.
    single.segment(&volume)?;
    let r = routed.segment(&volume)?;
    anyhow::ensure!(r.route.model == RoutedModel::Personalised, "{:?}", r.route);
    let (mut ts, mut tr, mut tsel) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = std::time::Instant::now();
        single.segment(&volume)?;
        let s = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        routed.route(&volume)?;
        let sel = t.elapsed().as_secs_f64();
        let t = std::time::Instant::now();
        routed.segment(&volume)?;
        let r = t.elapsed().as_secs_f64();
        println!(
            "{{\"round\": {round}, \"single_s\": {s:.4}, \"routed_s\": {r:.4}, \"selector_only_s\": {sel:.4}}}"
        );
        ts.push(s);
        tr.push(r);
        tsel.push(sel);
    }
    let (ms, mr, msel) = (median(&mut ts), median(&mut tr), median(&mut tsel));
    println!(
        "{{\"summary\": true, \"size\": {size}, \"slices\": {slices}, \"threads\": {threads}, \"rounds\": {rounds}, \
         \"single_median_s\": {ms:.4}, \"routed_median_s\": {mr:.4}, \"selector_median_s\": {msel:.4}, \
         \"routed_over_single\": {:.4}}}",
        mr / ms
    );
    Ok(())
}
