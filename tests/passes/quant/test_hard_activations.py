"""Rule 12: HardSwish and HardSigmoid between integer kernels become the Add, Clip and Mul
onnxruntime runs on integers, exact in float and integer in onnxruntime's optimized graph."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import hard_activations
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.sensitivity import sensitivity
from tests.helpers import cosine, make_model, optimized_ops, run_ort

F = onnx.TensorProto.FLOAT
RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
W2 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32) * 0.5
W3 = RNG.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3
X = (RNG.standard_normal((24, 3, 8, 8)) * 2).astype(np.float32)


def _network(pooled: bool = False, gate_shared: bool = False) -> onnx.ModelProto:
    """Conv -> HardSwish -> Conv -> HardSigmoid -> Mul(., hard-swish) -> Conv: a hard-swish
    and a squeeze-and-excitation-like gate. ``pooled``: a GlobalAveragePool reads the
    hard-swish too (its 1/6 cannot go into a Conv); ``gate_shared``: a graph output reads the
    gate Conv's output beside the HardSigmoid."""
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("HardSwish", ["c1"], ["h"], name="swish"),
        oh.make_node("Conv", ["h", "w2"], ["c2"], name="conv2"),
        oh.make_node("HardSigmoid", ["c2"], ["g"], alpha=0.2, beta=0.5, name="sigmoid"),
        oh.make_node("Mul", ["h", "g"], ["m"], name="gated"),
        oh.make_node("Conv", ["m", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    outputs = [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])]
    if pooled:
        nodes.append(oh.make_node("GlobalAveragePool", ["h"], ["p"], name="pool"))
        outputs.append(oh.make_tensor_value_info("p", F, ["N", 8, 1, 1]))
    if gate_shared:
        outputs.append(oh.make_tensor_value_info("c2", F, ["N", 8, 8, 8]))
    inputs = [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])]
    return make_model(nodes, inputs, outputs, {"w1": W1, "w2": W2, "w3": W3}, opset=17)


def _chain() -> onnx.ModelProto:
    """Conv -> HardSwish -> Conv: the hard-swish read by a Conv alone."""
    nodes = [
        oh.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("HardSwish", ["c1"], ["h"], name="swish"),
        oh.make_node("Conv", ["h", "w3"], ["y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    inputs = [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])]
    outputs = [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])]
    return make_model(nodes, inputs, outputs, {"w1": W1, "w3": W3}, opset=17)


def _rewritten(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.from_proto(proto)
    hard_activations.rewrite(model, lambda node: True, lambda node: False)
    return ir.to_proto(model)


def _run(proto: onnx.ModelProto) -> list[np.ndarray]:
    return run_ort(proto.SerializeToString(), {"x": X})


def _ops(proto: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in proto.graph.node)


@pytest.mark.parametrize("proto", [_chain(), _network(), _network(pooled=True)])
def test_the_rewrite_is_exact_in_float(proto):
    rewritten = _rewritten(proto)
    assert not {"HardSwish", "HardSigmoid"} & set(_ops(rewritten))
    onnx.checker.check_model(rewritten)
    for want, got in zip(_run(proto), _run(rewritten), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_constant_steps_go_into_the_convs_next_to_them():
    """A hard-swish read by a Conv alone: its 1/6 into that Conv's weights. A hard-sigmoid
    after a Conv: its 0.2 and 0.5 into that Conv's weights and bias, leaving Conv -> Clip."""
    chain = _rewritten(_chain())
    assert _ops(chain) == {"Conv": 2, "Add": 1, "Clip": 1, "Mul": 1}
    network = _rewritten(_network())
    clip = next(n for n in network.graph.node if n.op_type == "Clip" and n.output[0] == "g")
    producer = next(n for n in network.graph.node if clip.input[0] in n.output)
    assert producer.op_type == "Conv"


def test_only_the_steps_written_are_folded():
    """A scale and an offset the model had around a Conv (input normalisation, a scale after
    the last Conv) are fold's to take, not quant's: they stay, while the hard-swish's 1/6
    still goes into the Conv reading it."""
    nodes = [
        oh.make_node("Mul", ["x", "norm"], ["xn"], name="normalise"),
        oh.make_node("Conv", ["xn", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        oh.make_node("HardSwish", ["c1"], ["h"], name="swish"),
        oh.make_node("Conv", ["h", "w3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
        oh.make_node("Mul", ["c3", "gain"], ["y"], name="gain"),
    ]
    inputs = [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])]
    outputs = [oh.make_tensor_value_info("y", F, ["N", 4, 8, 8])]
    constants = {"w1": W1, "w3": W3, "norm": np.float32(0.5), "gain": np.float32(2.0)}
    proto = make_model(nodes, inputs, outputs, constants, opset=17)
    rewritten = _rewritten(proto)
    assert {"normalise", "gain"} <= {n.name for n in rewritten.graph.node}
    assert _ops(rewritten) == {"Conv": 2, "Add": 1, "Clip": 1, "Mul": 3}
    for want, got in zip(_run(proto), _run(rewritten), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_hard_swish_read_by_other_ops_scales_its_input_first():
    """(c1 / 6) * Clip(c1 + 3, 0, 6): a Mul and a pool read it, and the 1/6 has no Conv."""
    for proto in (_network(), _network(pooled=True)):
        rewritten = _rewritten(proto)
        h = next(n for n in rewritten.graph.node if n.output[0] == "h")
        assert h.op_type == "Mul"
        scaled = next(n for n in rewritten.graph.node if h.input[0] in n.output)
        assert scaled.op_type == "Mul" and scaled.input[0] == "c1"


def test_a_hard_sigmoid_beside_another_reader_of_its_input_stays():
    rewritten = _rewritten(_network(gate_shared=True))
    assert _ops(rewritten)["HardSigmoid"] == 1 and _ops(rewritten)["HardSwish"] == 0


def test_quantized_onnxruntime_runs_them_on_integers():
    """Kept as ops, onnxruntime ran each between a DequantizeLinear and a QuantizeLinear in
    float (HardSigmoid and Mul for the hard-swish, HardSigmoid for the gate)."""
    proto = _network()
    calibration = {"x": X[:16]}
    kept = onnx_shrink.shrink(
        proto, [QuantPass(hard_activations=False)], calibration=calibration, check=False
    )
    rewritten = onnx_shrink.shrink(proto, "quant", calibration=calibration, check=False)
    before, after = (optimized_ops(io.to_bytes(r.model)) for r in (kept, rewritten))
    assert before["HardSigmoid"] == 2
    assert after["HardSigmoid"] == 0 and after["Mul"] == 0 and after["Clip"] == 0
    # The hard-swish's (c1 / 6) and product, and the gate's Mul.
    assert after["QLinearConv"] == 3 and after["QLinearAdd"] == 1 and after["QLinearMul"] == 3
    # Conversions only at the model's edges: the input's Q and the output's DQ.
    assert after["QuantizeLinear"] == 1 and after["DequantizeLinear"] == 1
    reference = run_ort(proto.SerializeToString(), {"x": X[16:]})[0]
    for result in (kept, rewritten):
        got = run_ort(io.to_bytes(result.model), {"x": X[16:]})[0]
        assert cosine(got, reference) > 0.99


@pytest.mark.parametrize(
    "sets",
    [
        "quant.hard_activations=false",
        "quant.exclude_op_types=HardSwish,HardSigmoid",
        "quant.exclude=swish,sigmoid",
        "quant.exclude=conv1,conv2",  # no integer kernel before them
    ],
)
def test_kept_float_where_asked_or_where_nothing_integer_comes_before(sets):
    result = onnx_shrink.shrink(_network(), "quant", sets=sets, calibration={"x": X}, check=False)
    ops = _ops(ir.to_proto(result.model))
    assert ops["HardSwish"] == 1 and ops["HardSigmoid"] == 1


def test_the_sensitivity_report_names_the_steps_by_the_activation_they_replace():
    """The rewrite's own steps (``swish_sixth_x``, ``swish_plus3``) are in no model of the
    user's: tabcls's max_error search kept 'p2o.HardSwish.26_sixth_x' float, and the run
    that followed warned that the name matched no node. They go by the activation's name,
    which keeps the whole activation float (``exclude=swish``, the test above)."""
    model = ir.from_proto(_network(pooled=True))
    names = {node.name for node in model.graph}
    dataset = data_mod.prepare(data_mod.specs_from_model(model), {"x": X[:8]})
    report = sensitivity(model, QuantPass(), dataset, hint=False)
    layers = {(layer.node, layer.op_type) for layer in report.layers}
    assert {("swish", "Add"), ("swish", "Mul")} <= layers
    assert {layer.node for layer in report.layers} <= names
    every = report.exclude_patterns(len(report.layers), every=True)
    assert set(every) <= names
