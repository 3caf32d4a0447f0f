//! FedSM's site selector exported to ONNX computes what the candle network computes, through the
//! real ONNX Runtime (within 1e-4 on every probability), and the SDK prepares a volume's slices for
//! it as the segmenter does.
//!
//! (In cosilo-train, which links the SDK, so it builds without the appliance.)
//! Needs ONNX Runtime (`scripts/setup-ort.sh`; `ORT_DYLIB_PATH`); missing, the test fails saying so.

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use cosilo_rng::Rng;
use cosilo_sdk::preprocess::Normalisation;
use cosilo_sdk::route::SiteSelectorModel;
use cosilo_sdk::segment::SegmenterOptions;
use cosilo_sdk::{Geometry, Volume};
use cosilo_train::export::selector::selector_onnx;
use cosilo_train::optim::{AdamW, AdamWConfig};
use cosilo_train::selector::{self, SelectorConfig};

const TOLERANCE: f32 = 1e-4;

fn random(n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() as f32).collect()
}

/// A seeded selector moved off its initial values by a few optimiser steps, so that every
/// parameter (biases and GroupNorm shifts included) is non-trivial.
fn trained_selector(c: &SelectorConfig) -> Result<(selector::SiteSelector, candle_nn::VarMap)> {
    let (net, vars) = selector::build(c, &Device::Cpu, DType::F32, 11)?;
    let mut opt = AdamW::new(
        &vars,
        AdamWConfig {
            lr: 5e-2,
            ..Default::default()
        },
    )?;
    let mut rng = Rng::new(12);
    for step in 0..4 {
        let x = Tensor::from_vec(random(4 * 32 * 32, &mut rng), (4, 1, 32, 32), &Device::Cpu)?;
        let sites: Vec<u32> = (0..4).map(|i| ((i + step) % c.sites) as u32).collect();
        let loss = selector::cross_entropy(&net.forward(&x)?, &sites)?;
        opt.apply(&loss.backward()?)?;
    }
    Ok((net, vars))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn onnx_runtime_matches_candle_selector_probabilities() -> Result<()> {
    let c = SelectorConfig {
        in_channels: 1,
        sites: 3,
        base: 8,
        depth: 3,
        groups: 4,
    };
    let (net, vars) = trained_selector(&c)?;
    let model = selector_onnx(&c, &vars)?;
    let onnx = SiteSelectorModel::from_bytes(
        &model,
        Path::new("selector.onnx"),
        c.sites,
        &SegmenterOptions::default(),
    )?;
    let mut rng = Rng::new(13);
    let mut worst = 0f32;
    for shape in [[3usize, 1, 32, 48], [1, 1, 64, 64], [2, 1, 8, 16]] {
        let x = random(shape.iter().product(), &mut rng);
        let candle: Vec<f32> = net
            .probabilities(&Tensor::from_vec(x.clone(), shape.to_vec(), &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1()?;
        let ort = onnx.slice_probabilities(&x, shape)?;
        let d = max_abs_diff(&candle, &ort);
        assert!(d < TOLERANCE, "shape {shape:?}: |ORT - candle| = {d}");
        worst = worst.max(d);
        // Not a constant output: the probabilities differ between slices or sites.
        let spread = candle.iter().cloned().fold(0f32, f32::max)
            - candle.iter().cloned().fold(1f32, f32::min);
        assert!(spread > 1e-3, "degenerate selector output {candle:?}");
    }
    eprintln!("selector parity: worst |ORT - candle| = {worst:e}");

    // A whole volume with an odd in-plane size: the SDK normalises and pads each slice centred to
    // the size multiple, exactly as the segmenter prepares slices.
    let (nx, ny, nz) = (13usize, 10usize, 3usize);
    let data: Vec<f32> = random(nx * ny * nz, &mut rng)
        .into_iter()
        .map(|v| 100.0 + 20.0 * v)
        .collect();
    let volume = Volume::new(
        Geometry::axis_aligned([nx, ny, nz], [1.0; 3], [0.0; 3]),
        data,
    )?;
    let norm = Normalisation::Percentile {
        low: 1.0,
        high: 99.0,
    };
    let sdk = onnx.volume_slice_probabilities(&volume, &norm, c.multiple())?;
    let image = norm.apply(&volume.data);
    let (h, w) = (16usize, 16usize);
    let (py, px) = ((h - ny) / 2, (w - nx) / 2);
    let mut padded = vec![0f32; nz * h * w];
    for k in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                padded[(k * h + y + py) * w + x + px] = image[(k * ny + y) * nx + x];
            }
        }
    }
    let candle: Vec<f32> = net
        .probabilities(&Tensor::from_vec(padded, (nz, 1, h, w), &Device::Cpu)?)?
        .flatten_all()?
        .to_vec1()?;
    let d = max_abs_diff(&candle, &sdk);
    assert!(d < TOLERANCE, "volume slices: |ORT - candle| = {d}");
    Ok(())
}

fn manifest(model: &cosilo_train::UNetConfig, name: &str) -> cosilo_sdk::Manifest {
    use cosilo_sdk::bundle::{rfc3339_utc, Metrics, Provenance};
    let train = cosilo_train::TrainConfig {
        model: model.clone(),
        class_names: (0..model.classes).map(|c| format!("class{c}")).collect(),
        label_map: (0..model.classes as u8).collect(),
        ..Default::default()
    };
    cosilo_train::export::manifest_for(
        &train,
        name,
        Provenance {
            training_run: "routed".into(),
            sites: vec!["a".into(), "b".into(), "c".into()],
            cases: 0,
            created: rfc3339_utc(std::time::SystemTime::now()),
            cosilo_version: env!("CARGO_PKG_VERSION").into(),
        },
        Metrics {
            dice: vec![],
            cases: 0,
        },
    )
}

fn files<'a>(
    model: &'a [u8],
    manifest: &'a cosilo_sdk::Manifest,
) -> cosilo_sdk::route::ModelFiles<'a> {
    cosilo_sdk::route::ModelFiles { model, manifest }
}

/// A routed bundle written and read back: routing goes to the personalised model when the pooled
/// selector probability of this hospital exceeds γ, to the global one otherwise, and the routed
/// segmentation is exactly what the chosen model's own bundle gives.
#[test]
fn routed_bundle_routes_and_segments_with_the_chosen_model() -> Result<()> {
    use cosilo_sdk::route::{
        write_routed, RoutedModel, RoutedSegmenter, RoutingRule, GLOBAL_DIR, PERSONALISED_DIR,
    };
    use cosilo_train::{export, unet};
    let net = cosilo_train::UNetConfig {
        in_channels: 1,
        classes: 3,
        base: 4,
        depth: 2,
        groups: 2,
    };
    let (_, global_vars) = unet::build(&net, &Device::Cpu, 1)?;
    let (_, personal_vars) = unet::build(&net, &Device::Cpu, 2)?;
    let global = export::onnx_model(&net, &global_vars)?;
    let personal = export::onnx_model(&net, &personal_vars)?;
    let (gm, pm) = (manifest(&net, "global"), manifest(&net, "personalised"));
    let sc = SelectorConfig {
        in_channels: 1,
        sites: 3,
        base: 4,
        depth: 2,
        groups: 2,
    };
    // A selector that is sure every slice comes from site 1 ("b").
    let (_, sel_vars) = selector::build(&sc, &Device::Cpu, DType::F32, 3)?;
    {
        let data = sel_vars.data().lock().unwrap();
        data["fc.weight"].set(&Tensor::zeros(
            (3, sc.features()),
            DType::F32,
            &Device::Cpu,
        )?)?;
        data["fc.bias"].set(&Tensor::new(&[0f32, 12.0, 0.0], &Device::Cpu)?)?;
    }
    let sel = selector_onnx(&sc, &sel_vars)?;
    let sites: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let tmp = tempfile::tempdir()?;
    let options = SegmenterOptions::default();
    let mut rng = Rng::new(21);
    let data: Vec<f32> = random(12 * 9 * 4, &mut rng)
        .iter()
        .map(|v| 50.0 + 10.0 * v)
        .collect();
    let volume = Volume::new(Geometry::axis_aligned([12, 9, 4], [1.0; 3], [0.0; 3]), data)?;
    for (this_site, expected) in [(1, RoutedModel::Personalised), (0, RoutedModel::Global)] {
        let dir = tmp.path().join(format!("routed-{this_site}"));
        let rule = RoutingRule::new(sites.clone(), this_site);
        write_routed(
            &dir,
            files(&global, &gm),
            files(&personal, &pm),
            &sel,
            &rule,
            4,
        )?;
        assert!(
            write_routed(
                &dir,
                files(&global, &gm),
                files(&personal, &pm),
                &sel,
                &rule,
                4
            )
            .is_err(),
            "a bundle is never replaced"
        );
        let routed = RoutedSegmenter::open_with(&dir, &options)?;
        let out = routed.segment(&volume)?;
        assert_eq!(out.route.model, expected);
        assert_eq!(
            (out.route.top_site, out.route.top_site_name.as_str()),
            (1, "b")
        );
        assert!(
            out.route.probabilities[1] > 0.99,
            "{:?}",
            out.route.probabilities
        );
        let sub = if expected == RoutedModel::Global {
            GLOBAL_DIR
        } else {
            PERSONALISED_DIR
        };
        let alone = cosilo_sdk::Segmenter::open_with(dir.join(sub), &options)?.segment(&volume)?;
        assert_eq!(out.segmentation, alone);
    }
    // The two models differ, so which one ran is visible in the labels.
    let a =
        cosilo_sdk::Segmenter::open_with(tmp.path().join("routed-1").join(GLOBAL_DIR), &options)?
            .segment(&volume)?;
    let b = cosilo_sdk::Segmenter::open_with(
        tmp.path().join("routed-1").join(PERSONALISED_DIR),
        &options,
    )?
    .segment(&volume)?;
    assert_ne!(a.labels.data, b.labels.data);
    // A replaced selector file is refused by its checksum.
    std::fs::write(tmp.path().join("routed-1/selector.onnx"), b"not a model")?;
    let err = RoutedSegmenter::open_with(tmp.path().join("routed-1"), &options).unwrap_err();
    assert!(err.to_string().contains("SHA-256"), "{err}");
    Ok(())
}
