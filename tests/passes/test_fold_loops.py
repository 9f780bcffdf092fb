"""fold: loop-carried values passed through unchanged are read from outside the Loop."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.fold import FoldPass
from tests.helpers import make_model, run_ort

F, I64, B = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.BOOL
RNG = np.random.default_rng(23)


def _recurrent(final_weight_output: bool = False) -> onnx.ModelProto:
    """A tf2onnx-style recurrence: the body gets the weight ``w`` as carried state and hands
    it back unchanged; ``h`` is carried and changed, and each step's ``h`` is scanned out.
    With ``final_weight_output`` the Loop's last ``w`` is a graph output too."""
    body = oh.make_graph(
        [
            oh.make_node("Identity", ["cond"], ["cond_out"]),
            oh.make_node("MatMul", ["h", "w_in"], ["hw"]),
            oh.make_node("Tanh", ["hw"], ["h_out"]),
            oh.make_node("Identity", ["h_out"], ["scan"]),
        ],
        "body",
        [
            oh.make_tensor_value_info("i", I64, []),
            oh.make_tensor_value_info("cond", B, []),
            oh.make_tensor_value_info("h", F, [2, 16]),
            oh.make_tensor_value_info("w_in", F, [16, 16]),
        ],
        [
            oh.make_tensor_value_info("cond_out", B, []),
            oh.make_tensor_value_info("h_out", F, [2, 16]),
            oh.make_tensor_value_info("w_in", F, [16, 16]),
            oh.make_tensor_value_info("scan", F, [2, 16]),
        ],
    )
    outputs = [
        oh.make_tensor_value_info("h_last", F, [2, 16]),
        oh.make_tensor_value_info("steps", F, [3, 2, 16]),
        oh.make_tensor_value_info("y", F, [2, 16]),
    ]
    if final_weight_output:
        outputs.append(oh.make_tensor_value_info("w_last", F, [16, 16]))
    return make_model(
        [
            oh.make_node("Loop", ["n", "", "h0", "w"], ["h_last", "w_last", "steps"], body=body),
            oh.make_node("MatMul", ["h_last", "w_last"], ["y"]),
        ],
        [oh.make_tensor_value_info("h0", F, [2, 16])],
        outputs,
        {
            "n": np.array(3, np.int64),
            "w": (RNG.standard_normal((16, 16)) * 0.3).astype(np.float32),
        },
    )


def _loop(model: ir.Model) -> ir.Node:
    return next(node for node in model.graph if node.op_type == "Loop")


def test_a_weight_carried_through_unchanged_is_read_from_outside_and_outputs_stay_equal():
    proto = _recurrent()
    h0 = RNG.standard_normal((2, 16)).astype(np.float32)
    result = FoldPass()(io.load(proto))
    assert result.modified
    loop = _loop(result.model)
    body = loop.attributes["body"].as_graph()
    assert len(loop.inputs) == 3 and len(body.inputs) == 3 and len(body.outputs) == 3
    assert len(loop.outputs) == 2  # h_last and the scanned steps
    matmul = next(node for node in body if node.op_type == "MatMul")
    assert matmul.inputs[1].is_initializer() and matmul.inputs[1].name == "w"
    # The model's own MatMul reads the weight, not the Loop's last value of it.
    outer = next(node for node in result.model.graph if node.op_type == "MatMul")
    assert outer.inputs[1].name == "w"
    expected = run_ort(proto.SerializeToString(), {"h0": h0})
    got = run_ort(io.to_bytes(result.model), {"h0": h0})
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


def test_a_carried_weight_that_is_a_graph_output_stays_carried():
    result = FoldPass()(io.load(_recurrent(final_weight_output=True)))
    assert len(_loop(result.model).inputs) == 4


@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_after_any_number_of_iterations_the_weight_read_after_the_loop_is_the_same(iterations):
    """With no iteration the Loop's last carried value is its initial one: still equal."""
    proto = _recurrent()
    proto.graph.initializer[0].CopyFrom(
        onnx.numpy_helper.from_array(np.array(iterations, np.int64), "n")
    )
    folded = FoldPass()(io.load(proto)).model
    h0 = RNG.standard_normal((2, 16)).astype(np.float32)
    expected = run_ort(proto.SerializeToString(), {"h0": h0})
    got = run_ort(io.to_bytes(folded), {"h0": h0})
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
