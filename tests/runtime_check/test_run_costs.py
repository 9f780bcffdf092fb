"""A combined run's cost: the float graph plus what each copy's edit changes downstream."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_shrink.runtime_check import run_costs
from tests.helpers import make_model


def _chain() -> ir.Model:
    """x [1, 64] -> MatMul a (64x64) -> Relu -> MatMul b (64x32) -> MatMul c (32x8) -> y."""
    rng = np.random.default_rng(0)
    inits = {
        name: rng.standard_normal(shape).astype(np.float32)
        for name, shape in (("a", (64, 64)), ("b", (64, 32)), ("c", (32, 8)))
    }
    nodes = [
        oh.make_node("MatMul", ["x", "a"], ["h"], name="first"),
        oh.make_node("Relu", ["h"], ["r"], name="relu"),
        oh.make_node("MatMul", ["r", "b"], ["g"], name="second"),
        oh.make_node("MatMul", ["g", "c"], ["y"], name="last"),
    ]
    inputs = [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])]
    outputs = [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])]
    return ir.from_proto(
        onnx.shape_inference.infer_shapes(make_model(nodes, inputs, outputs, inits))
    )


def test_a_copy_costs_its_node_and_everything_downstream_of_it():
    graph = _chain().graph
    first, _, second, last = list(graph)
    costs = run_costs.node_costs(graph)
    assert [costs[n] for n in graph] == [64 * 64, 0, 64 * 32, 32 * 8]
    whole = 64 * 64 + 64 * 32 + 32 * 8
    assert run_costs.downstream_cost(first, costs) == whole
    assert run_costs.downstream_cost(last, costs) == 32 * 8
    assert run_costs.run_costs(graph, [[first, second], [last]]) == [
        whole + whole + 64 * 32 + 32 * 8,
        whole + 32 * 8,
    ]


def test_a_graph_without_known_macs_counts_nodes():
    model = make_model(
        [oh.make_node("Relu", ["x"], ["r"]), oh.make_node("Neg", ["r"], ["y"])],
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])],
        {},
    )
    graph = ir.from_proto(model).graph
    relu = next(iter(graph))
    assert run_costs.run_costs(graph, [[relu]]) == [2 + 2]


def test_the_time_left_follows_the_costs_not_the_count_of_runs():
    """The first run repeats the whole network per copy, the others a classifier: counted
    as runs, the 3 left would take 150 s at the first one's pace; weighted, 15 s."""
    costs = [100.0, 10.0, 10.0, 10.0]
    assert run_costs.seconds_left(50.0, costs, 1) == pytest.approx(15.0)
    assert run_costs.seconds_left(60.0, costs, 2) == pytest.approx(60.0 * 20 / 110)
    assert run_costs.seconds_left(70.0, costs, 4) == 0.0
