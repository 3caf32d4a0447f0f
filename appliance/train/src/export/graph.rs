//! The U-Net as an ONNX graph (opset 17), node for node the maths of [`crate::unet`].
//!
//! - conv block: `Conv` (3×3, pads 1) → GroupNorm → `Relu`;
//! - GroupNorm, decomposed because ONNX's `GroupNormalization` changed meaning between opsets 18
//!   and 21: `Reshape` to `(N, G, -1)` → `InstanceNormalization` (unit scale, zero bias, ε = 1e-5,
//!   biased variance: candle-nn's `(x - mean) / sqrt(var + ε)`) → `Reshape` back to the conv
//!   output's `Shape` → `Mul` by γ and `Add` β, both stored as `(C, 1, 1)`;
//! - down: `MaxPool` 2×2 stride 2 (the same as the trainer's reshape + max on even sides);
//! - up: `ConvTranspose` kernel 2 stride 2, weight `[Cin, Cout, 2, 2]` as candle stores it;
//! - skip: `Concat` on axis 1, encoder features first;
//! - head: 1×1 `Conv`, then `Softmax` on axis 1.
//!
//! Initializers keep the network's parameter names (`enc0.conv0.weight`, ...), so a model can be
//! traced back to its checkpoint.

use candle_core::DType;
use candle_nn::VarMap;

use super::proto::{
    AttributeProto, Dim, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, ValueInfoProto, FLOAT,
};
use super::ExportError;
use crate::unet::UNetConfig;

/// ONNX opset the graph is written for.
pub const OPSET: i64 = 17;
/// ONNX IR version written (ONNX Runtime 1.31 reads up to 13 and needs it set).
pub const IR_VERSION: i64 = 8;
/// GroupNorm's ε, as the trainer builds it.
pub const GROUP_NORM_EPS: f32 = 1e-5;

const INPUT: &str = cosilo_sdk::bundle::INPUT_NAME;
const OUTPUT: &str = cosilo_sdk::bundle::OUTPUT_NAME;
pub(super) const GROUPED_SHAPE: &str = "groupnorm.grouped_shape";
pub(super) const UNIT_SCALE: &str = "groupnorm.unit_scale";
pub(super) const ZERO_BIAS: &str = "groupnorm.zero_bias";

/// Nodes and initializers as they are added (also used by the selector's graph, `super::selector`).
pub(super) struct Builder<'a> {
    pub(super) vars: &'a VarMap,
    pub(super) nodes: Vec<NodeProto>,
    pub(super) initializers: Vec<TensorProto>,
    pub(super) parameters: usize,
}

impl Builder<'_> {
    pub(super) fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let output = name.to_string();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: name.into(),
            op_type: op.into(),
            attribute: attributes,
            ..Default::default()
        });
        output
    }

    /// Adds parameter `name` as an initializer, checking it has `shape` in the var map and storing
    /// it as `stored_shape` (same element count).
    pub(super) fn parameter(
        &mut self,
        name: &str,
        shape: &[usize],
        stored_shape: &[usize],
    ) -> Result<String, ExportError> {
        let values = {
            let data = self
                .vars
                .data()
                .lock()
                .map_err(|_| ExportError::VarMapPoisoned)?;
            let var = data
                .get(name)
                .ok_or_else(|| ExportError::MissingParameter { name: name.into() })?;
            if var.dims() != shape {
                return Err(ExportError::ParameterShape {
                    name: name.into(),
                    expected: shape.to_vec(),
                    found: var.dims().to_vec(),
                });
            }
            let read = |source| ExportError::ReadParameter {
                name: name.into(),
                source,
            };
            var.as_tensor()
                .to_dtype(DType::F32)
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(read)?
        };
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(ExportError::NonFiniteParameter {
                name: name.into(),
                index: i,
            });
        }
        self.parameters += values.len();
        self.initializers
            .push(TensorProto::f32(name, stored_shape, &values));
        Ok(name.to_string())
    }

    /// conv3×3 → GroupNorm → ReLU; `p` is e.g. `enc0`, `a` the block index.
    pub(super) fn conv_block(
        &mut self,
        x: &str,
        p: &str,
        a: usize,
        cin: usize,
        cout: usize,
    ) -> Result<String, ExportError> {
        let w = self.parameter(
            &format!("{p}.conv{a}.weight"),
            &[cout, cin, 3, 3],
            &[cout, cin, 3, 3],
        )?;
        let b = self.parameter(&format!("{p}.conv{a}.bias"), &[cout], &[cout])?;
        let conv = self.node(
            "Conv",
            &format!("{p}.conv{a}"),
            &[x, &w, &b],
            vec![
                AttributeProto::ints("kernel_shape", &[3, 3]),
                AttributeProto::ints("pads", &[1, 1, 1, 1]),
                AttributeProto::ints("strides", &[1, 1]),
                AttributeProto::ints("dilations", &[1, 1]),
                AttributeProto::int("group", 1),
            ],
        );
        let norm = format!("{p}.norm{a}");
        let shape = self.node("Shape", &format!("{norm}.shape"), &[&conv], vec![]);
        let grouped = self.node(
            "Reshape",
            &format!("{norm}.grouped"),
            &[&conv, GROUPED_SHAPE],
            vec![],
        );
        let normed = self.node(
            "InstanceNormalization",
            &format!("{norm}.normalised"),
            &[&grouped, UNIT_SCALE, ZERO_BIAS],
            vec![AttributeProto::float("epsilon", GROUP_NORM_EPS)],
        );
        let back = self.node(
            "Reshape",
            &format!("{norm}.ungrouped"),
            &[&normed, &shape],
            vec![],
        );
        let gamma = self.parameter(&format!("{norm}.weight"), &[cout], &[cout, 1, 1])?;
        let beta = self.parameter(&format!("{norm}.bias"), &[cout], &[cout, 1, 1])?;
        let scaled = self.node("Mul", &format!("{norm}.scaled"), &[&back, &gamma], vec![]);
        let shifted = self.node("Add", &format!("{norm}.shifted"), &[&scaled, &beta], vec![]);
        Ok(self.node("Relu", &format!("{p}.relu{a}"), &[&shifted], vec![]))
    }

    fn level(&mut self, x: &str, p: &str, cin: usize, cout: usize) -> Result<String, ExportError> {
        let a = self.conv_block(x, p, 0, cin, cout)?;
        self.conv_block(&a, p, 1, cout, cout)
    }
}

/// The exported graph and what went into it.
pub struct Graph {
    pub model: ModelProto,
    pub nodes: usize,
    pub parameters: usize,
}

/// Builds the ONNX model of a U-Net with configuration `c` and the weights in `vars`.
pub fn unet_model(c: &UNetConfig, vars: &VarMap) -> Result<Graph, ExportError> {
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
    let mut skips = Vec::with_capacity(c.depth);
    for l in 0..=c.depth {
        let cin = if l == 0 {
            c.in_channels
        } else {
            c.width(l - 1)
        };
        x = b.level(&x, &format!("enc{l}"), cin, c.width(l))?;
        if l < c.depth {
            skips.push(x.clone());
            x = b.node(
                "MaxPool",
                &format!("enc{l}.pool"),
                &[&x],
                vec![
                    AttributeProto::ints("kernel_shape", &[2, 2]),
                    AttributeProto::ints("strides", &[2, 2]),
                ],
            );
        }
    }
    for l in (0..c.depth).rev() {
        let (cin, cout) = (c.width(l + 1), c.width(l));
        let w = b.parameter(
            &format!("up{l}.weight"),
            &[cin, cout, 2, 2],
            &[cin, cout, 2, 2],
        )?;
        let bias = b.parameter(&format!("up{l}.bias"), &[cout], &[cout])?;
        let up = b.node(
            "ConvTranspose",
            &format!("up{l}"),
            &[&x, &w, &bias],
            vec![
                AttributeProto::ints("kernel_shape", &[2, 2]),
                AttributeProto::ints("strides", &[2, 2]),
            ],
        );
        let cat = b.node(
            "Concat",
            &format!("dec{l}.concat"),
            &[&skips[l], &up],
            vec![AttributeProto::int("axis", 1)],
        );
        x = b.level(&cat, &format!("dec{l}"), 2 * cout, cout)?;
    }
    let w = b.parameter(
        "head.weight",
        &[c.classes, c.width(0), 1, 1],
        &[c.classes, c.width(0), 1, 1],
    )?;
    let bias = b.parameter("head.bias", &[c.classes], &[c.classes])?;
    let logits = b.node(
        "Conv",
        "head",
        &[&x, &w, &bias],
        vec![AttributeProto::ints("kernel_shape", &[1, 1])],
    );
    b.nodes.push(NodeProto {
        input: vec![logits],
        output: vec![OUTPUT.into()],
        name: "softmax".into(),
        op_type: "Softmax".into(),
        attribute: vec![AttributeProto::int("axis", 1)],
        ..Default::default()
    });

    let (n, h, w) = (Dim::Named("N"), Dim::Named("H"), Dim::Named("W"));
    let nodes = b.nodes.len();
    let graph = GraphProto {
        node: b.nodes,
        name: "cosilo_unet".into(),
        initializer: b.initializers,
        doc_string: format!(
            "2-D U-Net (base {}, depth {}, {} GroupNorm groups): {INPUT} [N, {}, H, W] with H and W \
             multiples of {} -> {OUTPUT} [N, {}, H, W], softmax over axis 1",
            c.base,
            c.depth,
            c.groups,
            c.in_channels,
            c.multiple(),
            c.classes
        ),
        input: vec![ValueInfoProto::tensor(INPUT, FLOAT, &[n, Dim::Fixed(c.in_channels), h, w])],
        output: vec![ValueInfoProto::tensor(OUTPUT, FLOAT, &[n, Dim::Fixed(c.classes), h, w])],
        value_info: vec![],
    };
    let config_json = serde_json::to_string(c).unwrap_or_default();
    Ok(Graph {
        model: ModelProto {
            ir_version: IR_VERSION,
            producer_name: "cosilo".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            domain: "org.cosilo".into(),
            model_version: 1,
            doc_string: "Cosilo axial-slice segmentation network".into(),
            graph: Some(graph),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: OPSET,
            }],
            metadata_props: vec![StringStringEntryProto {
                key: "cosilo.unet_config".into(),
                value: config_json,
            }],
        },
        nodes,
        parameters: b.parameters,
    })
}
