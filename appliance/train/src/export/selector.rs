//! FedSM's site selector ([`crate::selector`]) as an ONNX graph (opset 17), node for node the
//! candle maths: per level the U-Net's conv block (`Conv` → decomposed GroupNorm → `Relu`, see
//! [`super::graph`]) and a 2×2 `MaxPool`; then `GlobalAveragePool`, `Flatten`, `Gemm` with the
//! linear layer's `[K, C]` weight (`transB = 1`) and `Softmax` on axis 1.
//!
//! Input `image` float32 `[N, in_channels, H, W]` (H and W multiples of `2^depth`), output
//! [`SELECTOR_OUTPUT`] float32 `[N, K]`: each slice's probability of coming from each site.

use candle_nn::VarMap;
use prost::Message;

use super::graph::{Builder, Graph, GROUPED_SHAPE, IR_VERSION, OPSET, UNIT_SCALE, ZERO_BIAS};
use super::proto::{
    AttributeProto, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, ValueInfoProto, FLOAT,
};
use super::ExportError;
use crate::selector::SelectorConfig;

/// The selector model's output: per-slice site probabilities `[N, K]`.
pub const SELECTOR_OUTPUT: &str = "site_probabilities";

const INPUT: &str = cosilo_sdk::bundle::INPUT_NAME;

/// Builds the ONNX model of a site selector with configuration `c` and the weights in `vars`.
pub fn selector_model(c: &SelectorConfig, vars: &VarMap) -> Result<Graph, ExportError> {
    c.validate().map_err(ExportError::InvalidConfig)?;
    let g = c.groups;
    let mut b = Builder {
        vars,
        nodes: Vec::new(),
        initializers: vec![
            TensorProto::i64(GROUPED_SHAPE, &[3], &[0, g as i64, -1]),
            TensorProto::f32(UNIT_SCALE, &[g], &vec![1.0; g]),
            TensorProto::f32(ZERO_BIAS, &[g], &vec![0.0; g]),
        ],
        parameters: 0,
    };
    let mut x = INPUT.to_string();
    for l in 0..c.depth {
        let cin = if l == 0 {
            c.in_channels
        } else {
            c.width(l - 1)
        };
        let p = format!("sel{l}");
        x = b.conv_block(&x, &p, 0, cin, c.width(l))?;
        x = b.node(
            "MaxPool",
            &format!("{p}.pool"),
            &[&x],
            vec![
                AttributeProto::ints("kernel_shape", &[2, 2]),
                AttributeProto::ints("strides", &[2, 2]),
            ],
        );
    }
    let pooled = b.node("GlobalAveragePool", "gap", &[&x], vec![]);
    let flat = b.node(
        "Flatten",
        "gap.flatten",
        &[&pooled],
        vec![AttributeProto::int("axis", 1)],
    );
    let (k, f) = (c.sites, c.features());
    let w = b.parameter("fc.weight", &[k, f], &[k, f])?;
    let bias = b.parameter("fc.bias", &[k], &[k])?;
    let logits = b.node(
        "Gemm",
        "fc",
        &[&flat, &w, &bias],
        vec![AttributeProto::int("transB", 1)],
    );
    b.nodes.push(NodeProto {
        input: vec![logits],
        output: vec![SELECTOR_OUTPUT.into()],
        name: "softmax".into(),
        op_type: "Softmax".into(),
        attribute: vec![AttributeProto::int("axis", 1)],
        ..Default::default()
    });
    let (n, h, w) = (Dim::Named("N"), Dim::Named("H"), Dim::Named("W"));
    let nodes = b.nodes.len();
    let graph = GraphProto {
        node: b.nodes,
        name: "cosilo_site_selector".into(),
        initializer: b.initializers,
        doc_string: format!(
            "FedSM site selector (base {}, depth {}, {} sites): {INPUT} [N, {}, H, W] with H and W \
             multiples of {} -> {SELECTOR_OUTPUT} [N, {}], softmax over axis 1",
            c.base,
            c.depth,
            c.sites,
            c.in_channels,
            c.multiple(),
            c.sites
        ),
        input: vec![ValueInfoProto::tensor(
            INPUT,
            FLOAT,
            &[n, Dim::Fixed(c.in_channels), h, w],
        )],
        output: vec![ValueInfoProto::tensor(
            SELECTOR_OUTPUT,
            FLOAT,
            &[n, Dim::Fixed(c.sites)],
        )],
        value_info: vec![],
    };
    Ok(Graph {
        model: ModelProto {
            ir_version: IR_VERSION,
            producer_name: "cosilo".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: "org.cosilo".into(),
            model_version: 1,
            doc_string: "Cosilo FedSM site selector".into(),
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: OPSET,
            }],
            metadata_props: vec![StringStringEntryProto {
                key: "cosilo.selector_config".into(),
                value: serde_json::to_string(c).unwrap_or_default(),
            }],
        },
        nodes,
        parameters: b.parameters,
    })
}

/// The serialized ONNX model of a site selector.
pub fn selector_onnx(c: &SelectorConfig, vars: &VarMap) -> Result<Vec<u8>, ExportError> {
    Ok(selector_model(c, vars)?.model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selector::build;
    use candle_core::{DType, Device};
    use std::collections::BTreeSet;

    #[test]
    fn selector_graph_uses_every_parameter_once() {
        let c = SelectorConfig {
            sites: 3,
            base: 4,
            depth: 2,
            groups: 2,
            in_channels: 1,
        };
        let (_, vars) = build(&c, &Device::Cpu, DType::F32, 1).unwrap();
        let g = selector_model(&c, &vars).unwrap();
        let graph = g.model.graph.as_ref().unwrap();
        let names: BTreeSet<String> = vars.data().lock().unwrap().keys().cloned().collect();
        let params: BTreeSet<String> = graph
            .initializer
            .iter()
            .map(|t| t.name.clone())
            .filter(|n| !n.starts_with("groupnorm."))
            .collect();
        assert_eq!(params, names);
        assert_eq!(g.parameters, crate::UNet::parameter_count(&vars));
        // Per level 8 block nodes + MaxPool; then GAP, Flatten, Gemm, Softmax.
        assert_eq!(g.nodes, c.depth * 9 + 4);
        assert_eq!(graph.node.last().unwrap().output, [SELECTOR_OUTPUT]);
        let wrong = SelectorConfig {
            sites: 4,
            ..c.clone()
        };
        assert!(matches!(
            selector_onnx(&wrong, &vars),
            Err(ExportError::ParameterShape { .. })
        ));
        assert_eq!(
            selector_onnx(&c, &vars).unwrap(),
            selector_onnx(&c, &vars).unwrap()
        );
    }
}
