"""Observed shapes: a run records the dims around every MAC node, and MACs counted on them
are the workload's, where shape inference knows none."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir

from onnx_shrink.compiler import io, stats
from onnx_shrink.runtime_check import shapes
from tests.helpers import make_model

F, I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64


def test_macs_on_observed_shapes_are_those_of_the_run():
    weight = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    proto = make_model(
        [
            oh.make_node("Reshape", ["x", "s"], ["h"]),
            oh.make_node("MatMul", ["h", "w"], ["m"]),
            oh.make_node("Relu", ["m"], ["y"]),
        ],
        [oh.make_tensor_value_info("x", F, ["N", 16]), oh.make_tensor_value_info("s", I64, ["L"])],
        [oh.make_tensor_value_info("y", F, ["a", "b", "c"])],
        {"w": weight},
    )
    model = io.load(proto)
    feed = {"x": np.ones((6, 16), np.float32), "s": np.array([2, 3, 16], np.int64)}
    seen = shapes.observed(model, feed)
    # y: the output of what reads the MatMul's, the name a fold would give a Conv's output.
    assert seen == {"h": (2, 3, 16), "m": (2, 3, 32), "y": (2, 3, 32), "x": (6, 16), "s": (3,)}
    assert stats.measure(model, seen).macs == 6 * 16 * 32
    assert stats.measure(model).macs == 16 * 32  # inferred: unknown rows count once
    assert [v.name for v in model.graph.outputs] == ["y"]  # the model is not modified


def test_the_observer_reads_the_model_at_once_and_runs_beside_what_follows():
    """The observer's run goes on in a thread while the pipeline's next pass changes the
    model: what it counts is the model as it was when asked."""
    proto = make_model(
        [oh.make_node("Reshape", ["x", "s"], ["h"]), oh.make_node("MatMul", ["h", "w"], ["y"])],
        [oh.make_tensor_value_info("x", F, ["N", 16])],
        [oh.make_tensor_value_info("y", F, ["a", "b", "c"])],
        {"w": np.ones((8, 32), np.float32), "s": np.array([1, 2, 8], np.int64)},
    )
    model = io.load(proto)
    feed = {"x": np.ones((1, 16), np.float32)}  # one sample (``Dataset.first_sample``)
    observe = shapes.observer(model, feed, None)
    dims = observe(model)
    # What a pass may do next, in place: a weight replaced, a node's input rewired.
    model.graph.initializers["s"].const_value = ir.tensor(np.array([4, 4], np.int64))
    model.graph.node(1).replace_input_with(1, model.graph.inputs[0])
    assert dims() == {"h": (1, 2, 8), "y": (1, 2, 32), "x": (1, 16)}
