"""Graph interfaces exporters write that the passes must respect: weights listed as inputs,
inputs that are outputs, an output listed twice, a constant that is an output. Every result is
run by the check (``shrink``'s default), which compares outputs by name and shape."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import pytest
from onnx import TensorProto

import onnx_shrink
from tests.helpers import run_ort

RNG = np.random.default_rng(0)
SHAPES = {"w1": (64, 128), "b1": (128,), "w2": (128, 32)}
ALL_PASSES = ("fold", "quant", "quant-dynamic", "quant-weight", "fp16", "prune", "prune-channels")


def mlp(ir_version: int = 8, opset: int = 17) -> onnx.ModelProto:
    """x [N, 64] -> MatMul w1 -> Add b1 -> Relu -> MatMul w2 -> y [N, 32]."""
    weights = [
        onnx.numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)
        for name, shape in SHAPES.items()
    ]
    nodes = [
        oh.make_node("MatMul", ["x", "w1"], ["t1"], name="mm1"),
        oh.make_node("Add", ["t1", "b1"], ["t2"], name="add1"),
        oh.make_node("Relu", ["t2"], ["t3"], name="relu"),
        oh.make_node("MatMul", ["t3", "w2"], ["y"], name="mm2"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
        weights,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=ir_version)


def listing(model: onnx.ModelProto, names) -> onnx.ModelProto:
    for name in names:
        info = oh.make_tensor_value_info(name, TensorProto.FLOAT, list(SHAPES[name]))
        model.graph.input.append(info)
    return model


def shrunk(model: onnx.ModelProto, passes: str) -> onnx.ModelProto:
    result = onnx_shrink.shrink(
        model, passes, data={"x": RNG.standard_normal((4, 64)).astype(np.float32)}
    )
    return onnx.load_from_string(onnx_shrink.compiler.io.to_bytes(result.model))


@pytest.mark.parametrize("ir_version", [3, 8])
def test_weights_an_exporter_listed_as_inputs_become_constants_and_are_compressed(
    ir_version, caplog
):
    model = listing(mlp(ir_version=ir_version, opset=11), SHAPES)
    with caplog.at_level(logging.WARNING):
        result = shrunk(model, "quant-dynamic")
    assert "lists its 3 initializers as graph inputs too" in caplog.text
    assert [i.name for i in result.graph.input] == ["x"] and result.ir_version >= 4
    assert result.ByteSize() < model.ByteSize() / 2  # before: nothing quantized at all


def test_weights_listed_beside_an_unlisted_non_weight_constant_are_taken_as_weights(caplog):
    # torch's constant folding adds constants after the listing (a Reshape's shape): one
    # unlisted initializer that is no layer's weight left 52 listed weights inputs.
    model = listing(mlp(), ["w1", "w2"])  # b1, a bias, unlisted
    with caplog.at_level(logging.WARNING):
        result = shrunk(model, "quant-dynamic")
    assert "lists its 2 initializers as graph inputs too" in caplog.text
    assert [i.name for i in result.graph.input] == ["x"]
    assert result.ByteSize() < model.ByteSize() / 2


def test_a_weight_a_caller_may_feed_is_never_replaced_by_a_quantized_copy(caplog):
    # Only w1 is listed: a default the caller may override. Its reader stays float, so a
    # fed w1 still counts; the other weights are compressed.
    model = listing(mlp(), ["w1"])
    with caplog.at_level(logging.WARNING):
        result = shrunk(model, "quant")
    assert "'w1', graph inputs with a default" in caplog.text
    assert [i.name for i in result.graph.input] == ["x", "w1"]
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    fed = {"x": x, "w1": np.zeros((64, 128), np.float32)}
    relu_of_bias = np.maximum(onnx.numpy_helper.to_array(model.graph.initializer[1]), 0)
    expected = relu_of_bias @ onnx.numpy_helper.to_array(model.graph.initializer[2])
    (got,) = run_ort(result.SerializeToString(), fed)
    assert next(n for n in result.graph.node if n.name == "mm1").input[1] == "w1"
    # What the fed w1 gives, within the quantization of the tensors after it.
    assert np.corrcoef(got.ravel(), np.broadcast_to(expected, got.shape).ravel())[0, 1] > 0.99
    (channels,) = [shrunk(listing(mlp(), ["w1"]), "prune-channels")]
    assert [i.name for i in channels.graph.input] == ["x", "w1"]
    w1 = next(i for i in channels.graph.input if i.name == "w1")
    assert [d.dim_value for d in w1.type.tensor_type.shape.dim] == [64, 128]


@pytest.mark.parametrize("passes", ALL_PASSES)
def test_an_input_that_is_also_an_output_keeps_its_name(passes):
    model = mlp()
    model.graph.output.append(oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64]))
    result = shrunk(model, passes)
    assert [i.name for i in result.graph.input] == ["x"]
    assert [o.name for o in result.graph.output] == ["y", "x"]


@pytest.mark.parametrize("passes", ALL_PASSES)
def test_an_output_listed_twice_stays_listed_twice(passes):
    model = mlp()
    model.graph.output.append(oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32]))
    result = shrunk(model, passes)
    assert [o.name for o in result.graph.output] == ["y", "y"]


def test_a_constant_that_is_an_output_keeps_its_shape():
    model = mlp()
    model.graph.output.append(oh.make_tensor_value_info("b1", TensorProto.FLOAT, [128]))
    result = shrunk(model, "prune-channels")
    (b1,) = [o for o in result.graph.output if o.name == "b1"]
    assert [d.dim_value for d in b1.type.tensor_type.shape.dim] == [128]


def test_q_dq_at_an_opset_onnxruntime_cannot_run_is_refused_before_any_work(monkeypatch):
    # onnx's newest opset can run ahead of onnxruntime's kernels (onnx 1.23: QuantizeLinear
    # 28; onnxruntime 1.32 has none): the result would not load.
    from onnx_shrink.errors import ShrinkError
    from onnx_shrink.runtime_check import sessions

    newest = mlp(opset=onnx.defs.onnx_opset_version(), ir_version=onnx.IR_VERSION)
    if sessions.runs_qdq(onnx.defs.onnx_opset_version(), onnx.IR_VERSION):
        pytest.skip("this onnxruntime runs Q/DQ at onnx's newest opset")
    for passes in ("quant", "quant-dynamic", "quant-weight"):
        sets = {
            "quant-dynamic": "quant-dynamic.fused=false",
            "quant-weight": "quant-weight.format=dequantize_linear",
        }.get(passes, ())
        with pytest.raises(ShrinkError, match="no kernel for QuantizeLinear at opset"):
            onnx_shrink.shrink(newest, passes, sets=sets, check=False)
    # Fused MatMuls only: no standard Q/DQ written, nothing to refuse.
    onnx_shrink.shrink(newest, "quant-dynamic", sets="quant-dynamic.op_types=MatMul", check=False)


def test_a_model_whose_only_initializer_is_a_default_keeps_it_an_input():
    # Every initializer is listed, but none is a layer's weight: it is a default a caller
    # may feed (y = x * scale), not an exporter's habit.
    model = oh.make_model(
        oh.make_graph(
            [oh.make_node("Mul", ["x", "scale"], ["y"])],
            "g",
            [
                oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                oh.make_tensor_value_info("scale", TensorProto.FLOAT, []),
            ],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            [oh.make_tensor("scale", TensorProto.FLOAT, [], [2.0])],
        ),
        opset_imports=[oh.make_opsetid("", 17)],
        ir_version=8,
    )
    for passes in ("fold", "quant"):
        data = {"x": RNG.standard_normal((4, 4)).astype(np.float32)}
        result = onnx_shrink.shrink(model, passes, data=data)
        assert [v.name for v in result.model.graph.inputs] == ["x", "scale"]


def test_sensitivity_measures_a_model_whose_weights_were_listed_as_inputs():
    data = {"x": RNG.standard_normal((8, 64)).astype(np.float32)}
    result = onnx_shrink.shrink(
        listing(mlp(), SHAPES), "quant", data=data, sensitivity=True, check=False
    )
    assert {layer.node for layer in result.sensitivity.layers} >= {"mm1", "mm2"}


def test_a_gather_s_dequantize_linear_counts_as_q_dq_for_the_opset_probe():
    from onnx_shrink.errors import ShrinkError
    from onnx_shrink.runtime_check import sessions

    newest, ir_version = onnx.defs.onnx_opset_version(), onnx.IR_VERSION
    if sessions.runs_qdq(newest, ir_version):
        pytest.skip("this onnxruntime runs Q/DQ at onnx's newest opset")
    table = onnx.numpy_helper.from_array(RNG.standard_normal((100, 64)).astype(np.float32), "t")
    model = oh.make_model(
        oh.make_graph(
            [oh.make_node("Gather", ["t", "ids"], ["y"])],
            "g",
            [oh.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
            [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
            [table],
        ),
        opset_imports=[oh.make_opsetid("", newest)],
        ir_version=ir_version,
    )
    with pytest.raises(ShrinkError, match="no kernel for QuantizeLinear at opset"):
        onnx_shrink.shrink(model, "quant-dynamic", check=False)  # fused, but a Gather
