"""Ranges the quant pass derives instead of measuring (``passes.quant.derived``)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx.helper as oh

from onnx_shrink.compiler import io
from onnx_shrink.compiler.statistics import MinMax, Statistics, StatRequest
from onnx_shrink.passes.quant import derived, placement
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, collect_graph, data
from tests.helpers import make_model, optimized_ops, run_ort

F = onnx.TensorProto.FLOAT


def _silu_pool_block():
    """Conv -> SiLU -> MaxPool -> Conv: a Sigmoid output and a shared-scale one in between."""
    rng = np.random.default_rng(7)
    return make_model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            oh.make_node("Sigmoid", ["c"], ["g"]),
            oh.make_node("Mul", ["c", "g"], ["a"]),
            oh.make_node("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
            oh.make_node("Conv", ["p", "w2"], ["y"], pads=[1, 1, 1, 1]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 4, 4, 4])],
        {
            "w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.5,
            "w2": rng.standard_normal((4, 8, 3, 3)).astype(np.float32) * 0.3,
        },
    )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_and_shared_scale_outputs_are_derived_not_measured(tmp_path):
    proto = _silu_pool_block()
    model = io.load(proto)
    x = np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32)
    quant = QuantPass()
    requested = {r.tensor for r in quant.requests(model)}
    assert requested == {"x", "c", "a", "y"}  # not the Sigmoid's g, not the MaxPool's p
    np.savez(tmp_path / "calib.npz", x=x)
    dataset = data.prepare(data.specs_from_model(model), tmp_path / "calib.npz")
    stats = collect.collect(model, quant.requests(model), dataset)
    completed = quant.completed_statistics(model, stats)
    c = stats.minmax("c")
    g = completed.minmax("g")
    assert (g.minimum, g.maximum) == (_sigmoid(c.minimum), _sigmoid(c.maximum))
    assert completed.minmax("p") == stats.minmax("a")  # MaxPool's values are the input's
    quant.bind(stats)(model)
    # The Sigmoid output's uint8 scale spans [0, sigmoid(max c)]: one 255th of it a step.
    q = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "g")
    scale = float(q.inputs[1].const_value.numpy())
    assert scale == np.float32(_sigmoid(c.maximum) / 255)
    path = io.save(model, tmp_path / "q.onnx").path
    reference = run_ort(proto.SerializeToString(), {"x": x})[0]
    got = run_ort(str(path), {"x": x})[0]
    assert np.abs(got - reference).max() < 8 * np.abs(reference).max() / 255


def test_the_calibration_graph_keeps_silu_one_fused_kernel():
    """The point of deriving: a measured Sigmoid output has a second reader, and onnxruntime
    then runs Sigmoid and Mul apart instead of its fused QuickGelu."""
    model = io.load(_silu_pool_block())
    requested = sorted({r.tensor for r in QuantPass(calibration="minmax").requests(model)})

    def instrumented_ops(tensors):
        return optimized_ops(io.to_bytes(collect_graph.instrument(model, tensors, [], [])))

    assert "QuickGelu" in instrumented_ops(requested)
    assert "QuickGelu" not in instrumented_ops([*requested, "g"])


def test_a_measured_range_is_kept_and_chains_derive_in_graph_order():
    graph = io.load(_silu_pool_block()).graph
    a = MinMax(-0.3, 5.0, 0, 100)
    stats = Statistics({StatRequest("c", "minmax"): MinMax(-2.0, 3.0, 0, 100)}, 1, "test")
    # g follows from c; p from a, which is neither measured nor derivable: p gets nothing.
    completed = derived.complete(graph, stats, ["c", "g", "a", "p"])
    assert completed.minmax("g") == MinMax(_sigmoid(-2.0), _sigmoid(3.0), 0, 100)
    assert completed.minmax("p") is None
    measured_g = MinMax(0.2, 0.9, 0, 100)
    stats = Statistics(
        {StatRequest("g", "minmax"): measured_g, StatRequest("a", "minmax"): a}, 1, "test"
    )
    completed = derived.complete(graph, stats, ["c", "g", "a", "p"])
    assert completed.minmax("g") == measured_g and completed.minmax("p") == a
    assert derived.sources(graph, ["c", "g", "a", "p"]) == {"g": "c", "p": "a"}
    assert derived.sources(graph, ["g", "p"]) == {}  # a source outside the set: measured


def test_a_layer_alone_derives_from_the_whole_pass_only_where_a_range_is_missing(monkeypatch):
    """``only`` (sensitivity's one layer at a time) on the whole pass's measurements: the
    second Conv alone plans p but not a, so p's range comes from the whole pass's plan. On
    statistics already completed, the whole pass is not planned again (sensitivity quantizes
    each of YOLOv8n's 207 layers alone on one completed set)."""
    model = io.load(_silu_pool_block())
    for index, node in enumerate(model.graph):
        node.name = f"n{index}"
    whole = QuantPass()
    measured = {
        r.tensor: MinMax(-1.0 - i, 2.0 + i, 0, 100) for i, r in enumerate(whole.requests(model))
    }
    stats = Statistics({StatRequest(t, "minmax"): m for t, m in measured.items()}, 1, "test")
    assert "p" not in measured  # derived from a
    alone = QuantPass(only=("n4",))
    plans = []
    planned_tensors = placement.planned_tensors

    def recorded(graph, exclusions):
        plans.append(exclusions.only)
        return planned_tensors(graph, exclusions)

    monkeypatch.setattr(placement, "planned_tensors", recorded)
    assert alone.completed_statistics(model, stats).minmax("p") == measured["a"]
    assert plans == [("n4",), ()]  # p was missing: the whole pass's plan derives it
    plans.clear()
    completed = whole.completed_statistics(model, stats)
    plans.clear()
    assert alone.completed_statistics(model, completed).results == completed.results
    assert plans == [("n4",)]
