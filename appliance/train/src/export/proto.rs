//! The subset of `onnx.proto` the exporter writes, as hand-written prost messages (no protoc).
//!
//! Field numbers and types follow `onnx/onnx.proto` (proto2) of the `onnx` 1.23 package. Two
//! proto2 details are kept on purpose:
//! - `AttributeProto`'s scalar values are `optional` (prost `Option`), so a zero (`axis = 0`,
//!   `keepdims = 0`) is still written: ONNX's checker requires exactly one value field present.
//! - Repeated `int64`/`float` fields that proto2 does not declare `[packed = true]` (`dims`,
//!   `ints`, `floats`) are written unpacked, byte for byte what the reference `onnx` package
//!   writes. (Parsers accept both; this keeps the output identical to the reference.)
//!
//! - `OperatorSetIdProto::domain` is `optional` too, written as `""` for the default domain.
//!
//! Other scalars use proto3-style implicit presence: a zero or empty value is left out, which
//! proto2 readers read back as the same default. `ModelProto::ir_version` must therefore be set
//! (ONNX Runtime rejects a model without one).

/// `TensorProto.DataType.FLOAT`.
pub const FLOAT: i32 = 1;
/// `TensorProto.DataType.INT64`.
pub const INT64: i32 = 7;

/// `AttributeProto.AttributeType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, prost::Enumeration)]
#[repr(i32)]
pub enum AttributeType {
    Undefined = 0,
    Float = 1,
    Int = 2,
    String = 3,
    Tensor = 4,
    Graph = 5,
    Floats = 6,
    Ints = 7,
    Strings = 8,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ModelProto {
    #[prost(int64, tag = "1")]
    pub ir_version: i64,
    #[prost(string, tag = "2")]
    pub producer_name: String,
    #[prost(string, tag = "3")]
    pub producer_version: String,
    #[prost(string, tag = "4")]
    pub domain: String,
    #[prost(int64, tag = "5")]
    pub model_version: i64,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(message, optional, tag = "7")]
    pub graph: Option<GraphProto>,
    #[prost(message, repeated, tag = "8")]
    pub opset_import: Vec<OperatorSetIdProto>,
    #[prost(message, repeated, tag = "14")]
    pub metadata_props: Vec<StringStringEntryProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct OperatorSetIdProto {
    /// `""` for the default `ai.onnx` domain (written explicitly, as the reference does).
    #[prost(string, optional, tag = "1")]
    pub domain: Option<String>,
    #[prost(int64, tag = "2")]
    pub version: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StringStringEntryProto {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    pub node: Vec<NodeProto>,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(message, repeated, tag = "5")]
    pub initializer: Vec<TensorProto>,
    #[prost(string, tag = "10")]
    pub doc_string: String,
    #[prost(message, repeated, tag = "11")]
    pub input: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "12")]
    pub output: Vec<ValueInfoProto>,
    #[prost(message, repeated, tag = "13")]
    pub value_info: Vec<ValueInfoProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NodeProto {
    #[prost(string, repeated, tag = "1")]
    pub input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub output: Vec<String>,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(string, tag = "4")]
    pub op_type: String,
    #[prost(message, repeated, tag = "5")]
    pub attribute: Vec<AttributeProto>,
    #[prost(string, tag = "6")]
    pub doc_string: String,
    #[prost(string, tag = "7")]
    pub domain: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AttributeProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(float, optional, tag = "2")]
    pub f: Option<f32>,
    #[prost(int64, optional, tag = "3")]
    pub i: Option<i64>,
    #[prost(bytes = "vec", optional, tag = "4")]
    pub s: Option<Vec<u8>>,
    #[prost(message, optional, tag = "5")]
    pub t: Option<TensorProto>,
    #[prost(float, repeated, packed = "false", tag = "7")]
    pub floats: Vec<f32>,
    #[prost(int64, repeated, packed = "false", tag = "8")]
    pub ints: Vec<i64>,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub strings: Vec<Vec<u8>>,
    #[prost(enumeration = "AttributeType", optional, tag = "20")]
    pub r#type: Option<i32>,
}

impl AttributeProto {
    pub fn int(name: &str, value: i64) -> Self {
        AttributeProto {
            name: name.into(),
            i: Some(value),
            r#type: Some(AttributeType::Int as i32),
            ..Default::default()
        }
    }

    pub fn ints(name: &str, values: &[i64]) -> Self {
        AttributeProto {
            name: name.into(),
            ints: values.to_vec(),
            r#type: Some(AttributeType::Ints as i32),
            ..Default::default()
        }
    }

    pub fn float(name: &str, value: f32) -> Self {
        AttributeProto {
            name: name.into(),
            f: Some(value),
            r#type: Some(AttributeType::Float as i32),
            ..Default::default()
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorProto {
    #[prost(int64, repeated, packed = "false", tag = "1")]
    pub dims: Vec<i64>,
    #[prost(int32, tag = "2")]
    pub data_type: i32,
    #[prost(float, repeated, tag = "4")]
    pub float_data: Vec<f32>,
    #[prost(int64, repeated, tag = "7")]
    pub int64_data: Vec<i64>,
    #[prost(string, tag = "8")]
    pub name: String,
    /// Little-endian element bytes, row-major.
    #[prost(bytes = "vec", tag = "9")]
    pub raw_data: Vec<u8>,
    #[prost(string, tag = "12")]
    pub doc_string: String,
}

impl TensorProto {
    /// A float32 tensor stored as `raw_data`.
    pub fn f32(name: &str, dims: &[usize], values: &[f32]) -> Self {
        TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: FLOAT,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }

    /// An int64 tensor stored as `raw_data`.
    pub fn i64(name: &str, dims: &[usize], values: &[i64]) -> Self {
        TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: INT64,
            name: name.into(),
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ValueInfoProto {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, optional, tag = "2")]
    pub r#type: Option<TypeProto>,
    #[prost(string, tag = "3")]
    pub doc_string: String,
}

impl ValueInfoProto {
    /// A tensor value of element type `elem_type` whose dimensions are fixed or named.
    pub fn tensor(name: &str, elem_type: i32, dims: &[Dim]) -> Self {
        let dim = dims
            .iter()
            .map(|d| tensor_shape_proto::Dimension {
                value: Some(match d {
                    Dim::Fixed(n) => tensor_shape_proto::dimension::Value::DimValue(*n as i64),
                    Dim::Named(s) => tensor_shape_proto::dimension::Value::DimParam(s.to_string()),
                }),
                denotation: String::new(),
            })
            .collect();
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type,
                    shape: Some(TensorShapeProto { dim }),
                })),
                denotation: String::new(),
            }),
            doc_string: String::new(),
        }
    }
}

/// A dimension of a graph input or output: a number or a symbolic name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Named(&'static str),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TypeProto {
    #[prost(oneof = "type_proto::Value", tags = "1")]
    pub value: Option<type_proto::Value>,
    #[prost(string, tag = "6")]
    pub denotation: String,
}

pub mod type_proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Tensor {
        #[prost(int32, tag = "1")]
        pub elem_type: i32,
        #[prost(message, optional, tag = "2")]
        pub shape: Option<super::TensorShapeProto>,
    }

    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Value {
        #[prost(message, tag = "1")]
        TensorType(Tensor),
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TensorShapeProto {
    #[prost(message, repeated, tag = "1")]
    pub dim: Vec<tensor_shape_proto::Dimension>,
}

pub mod tensor_shape_proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Dimension {
        #[prost(oneof = "dimension::Value", tags = "1, 2")]
        pub value: Option<dimension::Value>,
        #[prost(string, tag = "3")]
        pub denotation: String,
    }

    pub mod dimension {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Value {
            #[prost(int64, tag = "1")]
            DimValue(i64),
            #[prost(string, tag = "2")]
            DimParam(String),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// A one-node model (`Relu`, input `x` float [N, 3]) built with the reference implementation:
    /// `onnx.helper.make_model(make_graph([make_node("Relu", ["x"], ["y"], name="r")], "g",
    /// [make_tensor_value_info("x", FLOAT, ["N", 3])], [make_tensor_value_info("y", FLOAT,
    /// ["N", 3])], [numpy_helper.from_array(np.array([1.5, -2], np.float32), "w")]),
    /// opset_imports=[make_opsetid("", 17)], ir_version=8, producer_name="cosilo")`, with the node
    /// given attributes `make_attribute("axis", 0)` and `make_attribute("pads", [1, 1])` and the
    /// initializer's dims as written; `model.SerializeToString().hex()` from onnx 1.23.2.
    const REFERENCE_HEX: &str = include_str!("testdata/reference_model.hex");

    fn ours() -> ModelProto {
        ModelProto {
            ir_version: 8,
            producer_name: "cosilo".into(),
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    input: vec!["x".into()],
                    output: vec!["y".into()],
                    name: "r".into(),
                    op_type: "Relu".into(),
                    attribute: vec![
                        AttributeProto::int("axis", 0),
                        AttributeProto::ints("pads", &[1, 1]),
                    ],
                    ..Default::default()
                }],
                name: "g".into(),
                initializer: vec![TensorProto::f32("w", &[2], &[1.5, -2.0])],
                input: vec![ValueInfoProto::tensor(
                    "x",
                    FLOAT,
                    &[Dim::Named("N"), Dim::Fixed(3)],
                )],
                output: vec![ValueInfoProto::tensor(
                    "y",
                    FLOAT,
                    &[Dim::Named("N"), Dim::Fixed(3)],
                )],
                ..Default::default()
            }),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: 17,
            }],
            ..Default::default()
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        let s = s.trim();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn encoding_matches_the_reference_onnx_package() {
        assert_eq!(ours().encode_to_vec(), unhex(REFERENCE_HEX));
    }

    #[test]
    fn zero_attribute_is_present_and_round_trips() {
        let a = AttributeProto::int("axis", 0);
        // name (1, "axis"), i (3) = 0 present, type (20) = INT.
        assert_eq!(
            a.encode_to_vec(),
            [0x0a, 4, b'a', b'x', b'i', b's', 0x18, 0x00, 0xa0, 0x01, 0x02]
        );
        let m = ours();
        assert_eq!(ModelProto::decode(m.encode_to_vec().as_slice()).unwrap(), m);
    }

    #[test]
    fn opset_and_unpacked_ints() {
        let o = OperatorSetIdProto {
            domain: Some(String::new()),
            version: 17,
        };
        assert_eq!(o.encode_to_vec(), [0x0a, 0, 0x10, 17]);
        // ints = 8, varint wire type: one key per element.
        let a = AttributeProto::ints("k", &[2, 2]);
        assert_eq!(
            a.encode_to_vec(),
            [0x0a, 1, b'k', 0x40, 2, 0x40, 2, 0xa0, 0x01, 0x07]
        );
    }
}
