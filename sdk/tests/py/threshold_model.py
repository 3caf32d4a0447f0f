"""Writes a tiny ONNX segmentation model for the SDK's DICOM tests: two classes, class 1 where the
normalised input is above 0.5. Input `image` float32 [N, 1, H, W]; output `probabilities`
float32 [N, 2, H, W] = softmax(20 * (0.5 - x, x - 0.5)) over axis 1.

  python threshold_model.py OUT.onnx
"""
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

half = numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half")
gain = numpy_helper.from_array(np.array(20.0, dtype=np.float32), "gain")
nodes = [
    helper.make_node("Sub", ["image", "half"], ["above"]),
    helper.make_node("Sub", ["half", "image"], ["below"]),
    helper.make_node("Concat", ["below", "above"], ["logits0"], axis=1),
    helper.make_node("Mul", ["logits0", "gain"], ["logits"]),
    helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
]
graph = helper.make_graph(
    nodes,
    "threshold",
    [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
    [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2, "H", "W"])],
    initializer=[half, gain],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, sys.argv[1])
