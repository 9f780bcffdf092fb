"""``fuse_gelu``: an erf GELU after an integer kernel becomes one Gelu node, which
onnxruntime would not fuse behind a DequantizeLinear; numbers unchanged."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import fuse_gelu
from tests.helpers import cosine, make_model, optimized_ops, run_ort
from tests.passes.quant.test_static_placement import _quantize

F = onnx.TensorProto.FLOAT
SQRT_2 = math.sqrt(2.0)

# The groupings exporters write, x / sqrt(2) as a Div (PaddlePaddle, PyTorch) or a Mul.
FORMS = {
    "(x*gate)*0.5": lambda gate: [("Mul", ["x", gate], "p"), ("Mul", ["p", "half"], "y")],
    "x*(gate*0.5)": lambda gate: [("Mul", [gate, "half"], "p"), ("Mul", ["x", "p"], "y")],
    "(x*0.5)*gate": lambda gate: [("Mul", ["half", "x"], "p"), ("Mul", ["p", gate], "y")],
}


def _gelu_nodes(by_division: bool, grouping: str, x: str = "x", y: str = "y"):
    if by_division:
        scaled = oh.make_node("Div", [x, "sqrt2"], ["s"])
    else:
        scaled = oh.make_node("Mul", [x, "inv_sqrt2"], ["s"])
    nodes = [scaled, oh.make_node("Erf", ["s"], ["e"]), oh.make_node("Add", ["one", "e"], ["g"])]
    rename = {"x": x, "y": y}
    for op, inputs, out in FORMS[grouping]("g"):
        nodes.append(oh.make_node(op, [rename.get(i, i) for i in inputs], [rename.get(out, out)]))
    return nodes


GELU_CONSTANTS = {
    "sqrt2": np.array(SQRT_2, np.float32),
    "inv_sqrt2": np.array(1 / SQRT_2, np.float32),
    "one": np.array(1.0, np.float32),
    "half": np.array(0.5, np.float32),
}


@pytest.mark.parametrize("grouping", list(FORMS))
@pytest.mark.parametrize("by_division", [True, False], ids=["div", "mul"])
def test_each_written_form_after_a_dequantize_becomes_one_gelu(by_division, grouping):
    nodes = [
        oh.make_node("QuantizeLinear", ["t", "scale", "zero"], ["q"]),
        oh.make_node("DequantizeLinear", ["q", "scale", "zero"], ["x"]),
        *_gelu_nodes(by_division, grouping),
    ]
    constants = {
        **GELU_CONSTANTS,
        "scale": np.array(0.05, np.float32),
        "zero": np.array(128, np.uint8),
    }
    proto = make_model(
        nodes,
        [oh.make_tensor_value_info("t", F, [2, 8])],
        [oh.make_tensor_value_info("y", F, [2, 8])],
        constants,
    )
    t = np.linspace(-4, 4, 16, dtype=np.float32).reshape(2, 8)
    reference = run_ort(proto.SerializeToString(), {"t": t})[0]
    model = io.load(proto)
    assert fuse_gelu.fuse(model, com_microsoft=True) == 1
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ("com.microsoft", "Gelu") in ops and ("", "Erf") not in ops
    fused = run_ort(io.serialize_proto(model).SerializeToString(), {"t": t})[0]
    np.testing.assert_allclose(fused, reference, atol=1e-6)


def test_a_gelu_of_a_float_tensor_is_left_to_onnxruntime():
    proto = make_model(
        _gelu_nodes(True, "(x*gate)*0.5"),
        [oh.make_tensor_value_info("x", F, [2, 8])],
        [oh.make_tensor_value_info("y", F, [2, 8])],
        GELU_CONSTANTS,
    )
    model = io.load(proto)
    assert fuse_gelu.fuse(model, com_microsoft=True) == 0
    assert "Erf" in [n.op_type for n in model.graph]


def _conv_gelu_conv(opset: int) -> onnx.ModelProto:
    """PP-OCRv6's detector in small: Conv -> erf GELU -> Conv."""
    rng = np.random.default_rng(31)

    def weight(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    nodes = [
        oh.make_node("Conv", ["x", "w0"], ["a"], "first", pads=[1] * 4),
        *_gelu_nodes(True, "(x*gate)*0.5", x="a", y="h"),
        oh.make_node("Conv", ["h", "w1"], ["y"], "second", pads=[1] * 4),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 8, 16, 16])],
        [oh.make_tensor_value_info("y", F, ["N", 8, 16, 16])],
        {"w0": weight(16, 8, 3, 3), "w1": weight(8, 16, 3, 3), **GELU_CONSTANTS},
        opset=opset,
    )


@pytest.mark.parametrize(
    ("opset", "fused", "expected"),
    [(17, True, ("com.microsoft", "Gelu")), (20, False, ("", "Gelu")), (17, False, None)],
    ids=["contrib", "standard", "standard-qdq-only"],
)
def test_quant_writes_the_gelu_between_its_integer_convs(tmp_path, opset, fused, expected):
    proto = _conv_gelu_conv(opset)
    x = np.random.default_rng(32).standard_normal((16, 8, 16, 16)).astype(np.float32)
    path, model = _quantize(proto, {"x": x}, tmp_path, float_stem=False, fused=fused)
    ops = [(n.domain, n.op_type) for n in model.graph]
    if expected is None:  # before opset 20 only onnxruntime has a Gelu: left as written
        assert ("", "Erf") in ops
    else:
        gelu = next(n for n in model.graph if (n.domain, n.op_type) == expected)
        assert gelu.inputs[0].producer().op_type == "DequantizeLinear"
        assert ("", "Erf") not in ops
        assert optimized_ops(path)["QLinearConv"] == 2
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    assert cosine(run_ort(path, {"x": x})[0], reference) > 0.99
