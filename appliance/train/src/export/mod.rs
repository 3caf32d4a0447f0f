//! Exports a trained U-Net as a bundle the SDK runs: `model.onnx` + `manifest.json`.
//!
//! - [`proto`]: the ONNX protobuf messages, hand-written for prost (no protoc at build time).
//! - [`graph`]: the U-Net as an opset-17 ONNX graph, node for node the candle maths.
//! - [`selector`]: FedSM's site selector as an ONNX graph (the routed bundle's third model).
//!
//! The ONNX model takes `image` float32 `[N, in_channels, H, W]` (N, H, W symbolic; H and W
//! multiples of `2^depth`) and gives `probabilities` float32 `[N, classes, H, W]`. ONNX Runtime's
//! output matches candle's `UNet::probabilities` within 1e-4 (see `tests/tests/export_parity.rs`).
//!
//! ```no_run
//! # use cosilo_train as train;
//! # use cosilo_train::export;
//! # use cosilo_sdk::bundle::{Metrics, Provenance};
//! # fn f(cfg: &train::TrainConfig, vars: &candle_nn::VarMap, provenance: Provenance, metrics: Metrics)
//! #     -> Result<(), export::ExportError> {
//! let manifest = export::manifest_for(cfg, "brain-unet", provenance, metrics);
//! let info = export::write_bundle("bundles/brain-unet".as_ref(), &cfg.model, vars, &manifest)?;
//! println!("wrote {} (sha256 {})", info.dir.display(), info.manifest.model_sha256);
//! # Ok(()) }
//! ```

pub mod graph;
pub mod proto;
pub mod selector;

use std::path::{Path, PathBuf};

use candle_nn::VarMap;
use cosilo_sdk::bundle::{
    self, classes_from_label_map, BundleError, InputSpec, Manifest, Metrics, OutputSpec, Provenance,
};
use prost::Message;

use crate::{TrainConfig, UNetConfig};

pub use graph::{IR_VERSION, OPSET};

/// Errors exporting a model.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    #[error("the weights have no parameter {name:?} (was the checkpoint made with another configuration?)")]
    MissingParameter { name: String },
    #[error("parameter {name:?} has shape {found:?}; the configuration needs {expected:?}")]
    ParameterShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("cannot read parameter {name:?}: {source}")]
    ReadParameter {
        name: String,
        #[source]
        source: candle_core::Error,
    },
    #[error("parameter {name:?} has a non-finite value at element {index}; refusing to export a diverged model")]
    NonFiniteParameter { name: String, index: usize },
    #[error("the variable map's lock is poisoned (a training thread panicked)")]
    VarMapPoisoned,
    #[error("the manifest does not describe this network: {field} is {manifest}, the network has {network}")]
    ManifestMismatch {
        field: &'static str,
        manifest: String,
        network: String,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// What [`write_bundle`] wrote.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    pub dir: PathBuf,
    /// The manifest as written, `model_sha256` filled in.
    pub manifest: Manifest,
    /// Size of `model.onnx` in bytes.
    pub model_bytes: usize,
    /// ONNX graph nodes.
    pub nodes: usize,
    /// Network parameters exported.
    pub parameters: usize,
}

/// The serialized ONNX model (`model.onnx`'s bytes) of a U-Net.
pub fn onnx_model(net_config: &UNetConfig, vars: &VarMap) -> Result<Vec<u8>, ExportError> {
    Ok(graph::unet_model(net_config, vars)?.model.encode_to_vec())
}

/// A manifest for a network trained with `config`: its classes (label values from the label map),
/// normalisation, and input layout. `model_sha256` is left empty for [`write_bundle`] to fill.
pub fn manifest_for(
    config: &TrainConfig,
    model_name: &str,
    provenance: Provenance,
    metrics: Metrics,
) -> Manifest {
    Manifest {
        format_version: bundle::FORMAT_VERSION,
        model_name: model_name.into(),
        model_sha256: String::new(),
        input: InputSpec::axial_slices(config.model.in_channels, config.model.multiple()),
        output: OutputSpec::default(),
        classes: classes_from_label_map(&config.class_names, &config.label_map),
        normalisation: config.normalisation,
        provenance,
        metrics,
    }
}

/// Writes the bundle of a U-Net to `dir` (new or empty): `model.onnx` and `manifest.json`, through
/// a temporary directory renamed into place with everything fsynced. The manifest must describe
/// this network (class count, input channels and names, a size multiple of `2^depth`); its
/// `model_sha256` is set to the written model's.
pub fn write_bundle(
    dir: &Path,
    net_config: &UNetConfig,
    vars: &VarMap,
    manifest: &Manifest,
) -> Result<BundleInfo, ExportError> {
    check_manifest(net_config, manifest)?;
    let graph = graph::unet_model(net_config, vars)?;
    let model = graph.model.encode_to_vec();
    let manifest = bundle::write(dir, &model, manifest)?;
    Ok(BundleInfo {
        dir: dir.to_path_buf(),
        manifest,
        model_bytes: model.len(),
        nodes: graph.nodes,
        parameters: graph.parameters,
    })
}

fn check_manifest(c: &UNetConfig, m: &Manifest) -> Result<(), ExportError> {
    let mismatch = |field, manifest: String, network: String| {
        Err(ExportError::ManifestMismatch {
            field,
            manifest,
            network,
        })
    };
    if m.classes.len() != c.classes {
        return mismatch(
            "the class count",
            m.classes.len().to_string(),
            c.classes.to_string(),
        );
    }
    if m.input.channels != c.in_channels {
        return mismatch(
            "input.channels",
            m.input.channels.to_string(),
            c.in_channels.to_string(),
        );
    }
    if m.input.size_multiple == 0 || m.input.size_multiple % c.multiple() != 0 {
        return mismatch(
            "input.size_multiple",
            m.input.size_multiple.to_string(),
            format!(
                "depth {} (a multiple of {} is needed)",
                c.depth,
                c.multiple()
            ),
        );
    }
    if m.input.name != bundle::INPUT_NAME {
        return mismatch(
            "input.name",
            m.input.name.clone(),
            bundle::INPUT_NAME.into(),
        );
    }
    if m.output.name != bundle::OUTPUT_NAME {
        return mismatch(
            "output.name",
            m.output.name.clone(),
            bundle::OUTPUT_NAME.into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unet;
    use candle_core::{Device, Tensor};
    use cosilo_sdk::bundle::rfc3339_utc;
    use std::collections::BTreeSet;

    fn small() -> UNetConfig {
        UNetConfig {
            in_channels: 1,
            classes: 3,
            base: 4,
            depth: 2,
            groups: 2,
        }
    }

    fn manifest(c: &UNetConfig) -> Manifest {
        let cfg = TrainConfig {
            model: c.clone(),
            class_names: (0..c.classes).map(|i| format!("class{i}")).collect(),
            label_map: (0..c.classes as u8).collect(),
            ..Default::default()
        };
        manifest_for(
            &cfg,
            "test",
            Provenance {
                training_run: "run".into(),
                sites: vec!["a".into()],
                cases: 1,
                created: rfc3339_utc(std::time::SystemTime::now()),
                cosilo_version: env!("CARGO_PKG_VERSION").into(),
            },
            Metrics {
                dice: vec![],
                cases: 0,
            },
        )
    }

    #[test]
    fn graph_uses_every_parameter_once_with_its_name() {
        let c = small();
        let (_, vars) = unet::build(&c, &Device::Cpu, 1).unwrap();
        let g = graph::unet_model(&c, &vars).unwrap();
        let graph = g.model.graph.as_ref().unwrap();
        let vars_names: BTreeSet<String> = vars.data().lock().unwrap().keys().cloned().collect();
        let init: Vec<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let params: BTreeSet<String> = init
            .iter()
            .filter(|n| !n.starts_with("groupnorm."))
            .map(|s| s.to_string())
            .collect();
        assert_eq!(params, vars_names);
        assert_eq!(init.len(), params.len() + 3, "no initializer twice");
        assert_eq!(g.parameters, unet::UNet::parameter_count(&vars));
        // Conv blocks: (depth + 1) encoder and depth decoder levels of 2 blocks, 8 nodes each;
        // a MaxPool per down step, ConvTranspose + Concat per up step, the head and Softmax.
        let blocks = 2 * (2 * c.depth + 1);
        assert_eq!(g.nodes, blocks * 8 + c.depth * 3 + 2);
        let ops: BTreeSet<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert!(!ops.contains("GroupNormalization"));
        assert_eq!(graph.node.last().unwrap().op_type, "Softmax");
        assert_eq!(graph.node.last().unwrap().output, ["probabilities"]);
        // Every node input exists before it is used.
        let mut known: BTreeSet<&str> = init.iter().copied().collect();
        known.insert("image");
        for n in &graph.node {
            for i in &n.input {
                assert!(
                    known.contains(i.as_str()),
                    "{} reads {i} before it exists",
                    n.name
                );
            }
            known.extend(n.output.iter().map(String::as_str));
        }
        let m = &g.model;
        assert_eq!((m.ir_version, m.opset_import[0].version), (8, 17));
    }

    #[test]
    fn norm_parameters_are_stored_per_channel() {
        let c = small();
        let (_, vars) = unet::build(&c, &Device::Cpu, 1).unwrap();
        let g = graph::unet_model(&c, &vars).unwrap();
        let graph = g.model.graph.unwrap();
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == "enc1.norm0.weight")
            .unwrap();
        assert_eq!(t.dims, [8, 1, 1]);
        assert_eq!(t.raw_data.len(), 8 * 4);
        let up = graph
            .initializer
            .iter()
            .find(|t| t.name == "up0.weight")
            .unwrap();
        assert_eq!(up.dims, [8, 4, 2, 2]);
    }

    #[test]
    fn wrong_weights_are_typed_errors() {
        let c = small();
        let (_, vars) = unet::build(&c, &Device::Cpu, 1).unwrap();
        let bigger = UNetConfig {
            base: 8,
            groups: 2,
            ..c.clone()
        };
        assert!(matches!(
            onnx_model(&bigger, &vars),
            Err(ExportError::ParameterShape { .. })
        ));
        let deeper = UNetConfig {
            depth: 3,
            ..c.clone()
        };
        assert!(matches!(
            onnx_model(&deeper, &vars),
            Err(ExportError::MissingParameter { .. })
        ));
        let bad = Tensor::full(f32::NAN, 3, &Device::Cpu).unwrap();
        vars.data().lock().unwrap()["head.bias"].set(&bad).unwrap();
        assert!(matches!(
            onnx_model(&c, &vars),
            Err(ExportError::NonFiniteParameter { .. })
        ));
    }

    #[test]
    fn bundle_is_written_with_the_model_checksum() {
        let c = small();
        let (_, vars) = unet::build(&c, &Device::Cpu, 1).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bundle");
        let info = write_bundle(&dir, &c, &vars, &manifest(&c)).unwrap();
        let bytes = std::fs::read(dir.join(bundle::MODEL_FILE)).unwrap();
        assert_eq!(info.model_bytes, bytes.len());
        assert_eq!(info.manifest.model_sha256, bundle::sha256_hex(&bytes));
        assert_eq!(Manifest::read(&dir).unwrap(), info.manifest);
        assert_eq!(
            bytes,
            onnx_model(&c, &vars).unwrap(),
            "export is deterministic"
        );

        let mut wrong = manifest(&c);
        wrong.classes.pop();
        let err = write_bundle(&tmp.path().join("b2"), &c, &vars, &wrong).unwrap_err();
        assert!(matches!(err, ExportError::ManifestMismatch { .. }), "{err}");
        let mut wrong = manifest(&c);
        wrong.input.size_multiple = 6;
        assert!(write_bundle(&tmp.path().join("b3"), &c, &vars, &wrong).is_err());
        assert!(!tmp.path().join("b2").exists() && !tmp.path().join("b3").exists());
    }
}
