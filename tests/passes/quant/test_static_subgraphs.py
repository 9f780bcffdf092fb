"""Static quantization reaches weights inside If branches (as dynamic int8 weights)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import run_ort


def _if_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = onh.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w")
    then = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["a"])],
        "then",
        [],
        [oh.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [4, 96])],
    )
    other = oh.make_graph(
        [oh.make_node("MatMul", ["x", "w"], ["b0"]), oh.make_node("Neg", ["b0"], ["b"])],
        "else",
        [],
        [oh.make_tensor_value_info("b", onnx.TensorProto.FLOAT, [4, 96])],
    )
    graph = oh.make_graph(
        [oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
        "g",
        [
            oh.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 64]),
        ],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 96])],
        initializer=[w],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_weights_in_if_branches_are_quantized_and_the_file_shrinks(tmp_path):
    proto = _if_model()
    model = io.load(proto)
    quant = QuantPass()
    dataset = data.prepare(data.specs_from_model(model), None)
    quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    saved = io.save(model, tmp_path / "q.onnx")
    assert saved.bytes_on_disk < 0.4 * len(proto.SerializeToString())
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    for c in (True, False):
        feed = {"c": np.array(c), "x": x}
        reference = run_ort(proto.SerializeToString(), feed)[0]
        got = run_ort(saved.path, feed)[0]
        assert np.abs(got - reference).max() < 0.05 * np.abs(reference).max()
