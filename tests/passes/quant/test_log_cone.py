"""Placement rule 9 (``log_cone``): what reaches a Log through linear ops stays float in
``quant`` and ``quant-dynamic``, unless asked; where the cone ends (an op that compresses, a
parameter input, two weighted layers back)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import log_cone
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass
from tests.helpers import make_model, parse, run_ort
from tests.passes.quant.test_dynamic import with_weights
from tests.passes.quant.test_static_placement import _quantize

F = onnx.TensorProto.FLOAT
WINDOW, HOP, BINS, MELS = 32, 16, 17, 8


def _log_mel():
    """A log-mel front end as openWakeWord's: a Conv STFT (real and imaginary DFT rows over a
    Hann window), power, a non-negative filterbank MatMul, Clip at 1e-10, Log."""
    t = np.arange(WINDOW)
    k = np.arange(BINS)[:, None]
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * t / WINDOW)
    real = (np.cos(2 * np.pi * k * t / WINDOW) * hann)[:, None, :].astype(np.float32)
    imag = (-np.sin(2 * np.pi * k * t / WINDOW) * hann)[:, None, :].astype(np.float32)
    mel = np.abs(np.random.default_rng(0).standard_normal((BINS, MELS))).astype(np.float32)
    nodes = [
        oh.make_node("Unsqueeze", ["x", "one"], ["x1"]),
        oh.make_node("Conv", ["x1", "real"], ["re"], strides=[HOP]),
        oh.make_node("Conv", ["x1", "imag"], ["im"], strides=[HOP]),
        oh.make_node("Mul", ["re", "re"], ["re2"]),
        oh.make_node("Mul", ["im", "im"], ["im2"]),
        oh.make_node("Add", ["re2", "im2"], ["power"]),
        oh.make_node("Transpose", ["power"], ["frames"], perm=[0, 2, 1]),
        oh.make_node("MatMul", ["frames", "mel"], ["m"]),
        oh.make_node("Clip", ["m", "floor"], ["c"]),
        oh.make_node("Log", ["c"], ["y"]),
    ]
    inits = {
        "one": np.array([1], np.int64),
        "real": real,
        "imag": imag,
        "mel": mel,
        "floor": np.array(1e-10, np.float32),
    }
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 256])],
        [oh.make_tensor_value_info("y", F, ["N", 15, MELS])],
        inits,
    )


def _clips(seed: int, count: int) -> np.ndarray:
    """Noisy tones 0-60 dB apart in loudness, as a microphone's gain leaves them."""
    rng = np.random.default_rng(seed)
    t = np.arange(256)
    gains = 10.0 ** np.linspace(0, 3, count)
    clips = [g * (np.sin(0.3 * t) + 0.1 * rng.standard_normal(256)) for g in gains]
    return np.stack(clips).astype(np.float32)


def test_a_log_mel_front_end_stays_float_and_asked_its_quiet_clips_lose_their_bins(
    tmp_path, caplog
):
    proto, clips = _log_mel(), _clips(0, 8)
    reference = run_ort(proto.SerializeToString(), {"x": clips})[0]
    with caplog.at_level(logging.WARNING):
        path, model = _quantize(proto, {"x": clips}, tmp_path)
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph)
    assert np.array_equal(run_ort(path, {"x": clips})[0], reference)
    warning = next(r.getMessage() for r in caplog.records if "no node" in r.getMessage())
    assert "2 Conv: its output reaches a Log through linear ops" in warning
    assert "quant.log_inputs=true" in warning

    path, model = _quantize(proto, {"x": clips}, tmp_path, log_inputs=True)
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph) >= 3
    error = np.abs(run_ort(path, {"x": clips})[0] - reference)  # natural log: 1 is 4.3 dB
    # The loudest clip keeps its spectrum; the quietest, 60 dB down, is lost in the steps.
    assert error[-1].mean() < 0.5
    assert error[0].mean() > 3.0


def test_the_cone_ends_two_layers_back_at_a_compressing_op_and_at_a_parameter():
    model = io.load(
        parse(
            """
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[1, 4, 8] x) => (float[1, 4, 8] y, float[1, 4, 8] z, float[1, 4, 8] u)
              <float[4, 4, 1] w = {W}> {
              a = Conv (x, w)
              ra = Relu (a)
              b = Conv (ra, w)
              rb0 = Identity (b)
              rb = Relu (rb0)
              c = Conv (rb, w)
              y = Log (c)
              d = Conv (x, w)
              s = Softmax <axis = 1> (d)
              z = Log (s)
              e = Conv (x, w)
              f = Mul (e, e)
              p = ReduceMax <keepdims = 1> (f)
              lo = Sigmoid (p)
              q = Clip (x, lo)
              u = Log (q)
            }
            """.replace("W", ", ".join(["0.5"] * 16))
        )
    )
    by_name = {out.name: node for node in model.graph for out in node.outputs}
    feeding = {name for name, node in by_name.items() if log_cone.feeds_log(node)}
    # Two layers back from y: c, b and what b reads (a's Relu: a, a third layer, is quantized
    # and its output, after the Relu, is b's input); the Softmax ends z's cone (the Softmax is
    # in it: the Log reads its output); Clip's min is a parameter (e, f, p, lo are not in u's).
    assert feeding == {"c", "rb", "rb0", "b", "ra", "s", "q"}


# Tails of ``_dynamic``'s MatMul: through a Relu it is in the Log's cone; a Softmax, which
# compresses, ends the cone.
POWER_LOG = "c = Relu (m)\n          y = Log (c)"
SCORES_LOG = "s = Softmax <axis = 1> (m)\n          y = Log (s)"


def _dynamic(tail: str) -> onnx.ModelProto:
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 96] y) {{
          m = MatMul (x, w)
          {tail}
        }}
        """
    return with_weights(text, w=np.random.default_rng(0).standard_normal((64, 96), np.float32))


def _dynamic_ops(proto: onnx.ModelProto, **options) -> list[str]:
    result = QuantDynamicPass(**options)(io.load(proto))
    return [n.op_type for n in result.model.graph]


def test_quant_dynamic_keeps_a_filterbank_before_a_log_float_unless_asked():
    power = _dynamic(POWER_LOG)
    assert "MatMul" in _dynamic_ops(power)
    assert "DynamicQuantizeMatMul" in _dynamic_ops(power, log_inputs=True)
    scores = _dynamic(SCORES_LOG)
    assert "DynamicQuantizeMatMul" in _dynamic_ops(scores)
    reasons = QuantDynamicPass().float_reasons(io.load(power))
    assert [why for node, why in reasons.items() if node.op_type == "MatMul"] == [
        log_cone.reason("quant-dynamic")
    ]
    # A weight the pass would not quantize anyway is the reason given, not the Log.
    small = QuantDynamicPass(min_weight_elements=10**6).float_reasons(io.load(power))
    assert [why for node, why in small.items() if node.op_type == "MatMul"] == [
        "weight 'w' has 6144 < 1000000 elements"
    ]


@pytest.mark.network
def test_openwakeword_mel_keeps_its_front_end_float_and_says_why(caplog):
    """The real model: ``quant`` and ``quant-dynamic`` leave it float (its Convs and MatMul
    all feed the Log), the output as it was, and the warning names the rule; ``quant-weight``
    computes its filterbank in fp32."""
    from models.fetch import fetch
    from models.inputs import sample_inputs

    path = str(fetch("oww-mel"))
    check = onnx_shrink.CheckOptions(data=sample_inputs("oww-mel"), latency_runs=0)
    for passes in ("fold,quant", "fold,quant-dynamic"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = onnx_shrink.shrink(path, passes, check=check)
        assert result.verification.numeric.outputs[0].max_abs_error == 0.0
        assert "reaches a Log through linear ops" in caplog.text
    # quant-weight's filterbank gets 8-bit codes and computes in fp32: 44 dB with 4-bit codes
    # (stop 56), 19 dB at level 4 too.
    snr = {}
    for sets in ((), ("quant-weight.log_inputs=true",)):
        result = onnx_shrink.shrink(path, "fold,quant-weight", sets=sets, check=check)
        snr[sets] = result.verification.numeric.outputs[0].snr_db
    assert snr[()] > 55.0
    assert snr[("quant-weight.log_inputs=true",)] < 25.0


def test_quant_weight_gives_a_filterbank_before_a_log_8_bits_and_fp32():
    """MatMulNBits' default accuracy_level 4 quantizes its input to int8 at run time, and 4-bit
    codes are coarse too: before a Log a MatMul gets level 1 (fp32) and 8-bit codes, unless
    asked; elsewhere it keeps level 4 and 4 bits."""
    kept = {}
    for name, tail, options in (
        ("power", POWER_LOG, {}),
        ("asked", POWER_LOG, {"log_inputs": True}),
        ("scores", SCORES_LOG, {}),
    ):
        result = WeightOnlyQuantPass(**options)(io.load(_dynamic(tail)))
        nbits = next(n for n in result.model.graph if n.op_type == "MatMulNBits")
        codes = nbits.inputs[1]
        assert codes is not None and codes.const_value is not None
        kept[name] = (
            nbits.attributes.get_int("accuracy_level"),
            nbits.attributes.get_int("bits"),
            codes.const_value.shape[-1],  # bytes per block of 32 codes
        )
    assert kept == {"power": (1, 8, 32), "asked": (4, 4, 16), "scores": (4, 4, 16)}


def test_quant_weight_leaves_a_filterbank_before_a_log_float_in_dequantize_linear_form(caplog):
    """onnxruntime fuses DequantizeLinear and MatMul into MatMulNBits at its session's accuracy
    level (4 unless set): onnx-asr's NeMo front end gave NaN. So in that form the MatMul keeps
    its float weight, unless asked; a warning says why."""
    ops = {}
    for name, tail, options in (
        ("power", POWER_LOG, {}),
        ("asked", POWER_LOG, {"log_inputs": True}),
        ("scores", SCORES_LOG, {}),
    ):
        quantize = WeightOnlyQuantPass(format="dequantize_linear", **options)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = quantize(io.load(_dynamic(tail)))
        ops[name] = "DequantizeLinear" in {n.op_type for n in result.model.graph}
        if name == "power":
            assert result.model.opset_imports[""] == 17  # nothing to convert it for
            assert "no MatMul/Gather it would quantize" in caplog.text
            assert "reaches a Log" in caplog.text and "format=matmulnbits" in caplog.text
    assert ops == {"power": False, "asked": True, "scores": True}


LOG_IN_IF = """
<ir_version: 9, opset_import: ["" : 17]>
g (bool cond, float[3, 64] x) => (float[3, 96] y) {
  y = If (cond) <
    then_branch = then_g () => (float[3, 96] a) {
      m = MatMul(x, w)
      c = Clip(m, floor)
      a = Log(c)
    },
    else_branch = else_g () => (float[3, 96] b) { b = MatMul(x, w) }
  >
}
"""


def test_in_an_if_body_the_cone_stays_float_and_what_is_said_names_quant(caplog):
    # quant quantizes bodies through quant-dynamic (placement rule 5), whose messages named
    # quant-dynamic, a pass the user never asked for.
    w = np.abs(np.random.default_rng(0).standard_normal((64, 96))).astype(np.float32)
    model = with_weights(LOG_IN_IF, w=w, floor=np.array(1e-10, np.float32))
    feeds = {"cond": np.array(True), "x": np.ones((3, 64), np.float32)}
    with caplog.at_level(logging.INFO):
        result = onnx_shrink.shrink(model, "quant", check=False, calibration=feeds)
    if_node = next(n for n in result.model.graph if n.op_type == "If")
    branches = [if_node.attributes[b].as_graph() for b in ("then_branch", "else_branch")]
    assert "MatMul" in [n.op_type for n in branches[0]]  # the Log's cone
    assert "MatMul" not in [n.op_type for n in branches[1]]
    # The then branch reads w as float, the else branch as int8.
    assert "quant: 1 quantized weight(s) are also read as float" in caplog.text
    assert "quant-dynamic" not in caplog.text
    asked = onnx_shrink.shrink(
        model, "quant", sets=("quant.log_inputs=true",), check=False, calibration=feeds
    )
    if_node = next(n for n in asked.model.graph if n.op_type == "If")
    assert "MatMul" not in [n.op_type for n in if_node.attributes["then_branch"].as_graph()]
