"""Weights stored in float16/bfloat16 behind a Cast to float32 ("fp16 weights, fp32 maths")
are quantized like float32 ones, and those a pass leaves float keep their half-precision
storage."""

from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import onnx
import onnx.helper as oh
import onnx_ir as ir
import pytest

from onnx_shrink import shrink
from onnx_shrink.compiler import graph_edit, io
from onnx_shrink.passes import half_weights
from tests.helpers import make_model, run_ort

F = onnx.TensorProto.FLOAT
RNG = np.random.default_rng(5)


def _half_weight_model() -> onnx.ModelProto:
    """Conv (weight and bias in float16) -> Relu -> Flatten -> MatMul (weight in float16)."""
    nodes = [
        oh.make_node("Cast", ["cw16"], ["cw"], to=F, name="cast_cw"),
        oh.make_node("Cast", ["cb16"], ["cb"], to=F, name="cast_cb"),
        oh.make_node("Cast", ["mw16"], ["mw"], to=F, name="cast_mw"),
        oh.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        oh.make_node("Relu", ["c"], ["r"], name="relu"),
        oh.make_node("Flatten", ["r"], ["f"], name="flatten"),
        oh.make_node("MatMul", ["f", "mw"], ["y"], name="matmul"),
    ]
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 8, 8, 8])],
        [oh.make_tensor_value_info("y", F, ["N", 32])],
        {
            "cw16": (0.2 * RNG.standard_normal((16, 8, 3, 3))).astype(np.float16),
            "cb16": (0.1 * RNG.standard_normal(16)).astype(np.float16),
            "mw16": (0.05 * RNG.standard_normal((16 * 64, 32))).astype(np.float16),
        },
    )


def _data(samples: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((samples, 8, 8, 8), np.float32)}


def _error(model: bytes, proto: onnx.ModelProto) -> float:
    feed = _data(16, seed=1)
    want = run_ort(proto.SerializeToString(), feed)[0]
    got = run_ort(model, feed)[0]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _ops(model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_quant_quantizes_weights_stored_in_float16_behind_a_cast():
    proto = _half_weight_model()
    result = shrink(proto, "quant", data=_data(32, seed=0), check=False)
    model = result.model
    weights = {
        n.op_type: n.inputs[1].producer().op_type
        for n in model.graph
        if n.op_type in ("Conv", "MatMul")
    }
    assert weights["Conv"] == weights["MatMul"] == "DequantizeLinear", weights
    saved = io.to_bytes(model)
    assert len(saved) < 0.7 * proto.ByteSize()  # int8 weights, from float16 ones
    assert _error(saved, proto) < 0.05


def test_a_half_weight_the_pass_leaves_float_keeps_its_float16_storage():
    proto = _half_weight_model()
    result = shrink(
        proto, "quant", sets=["quant.exclude=matmul"], data=_data(32, seed=0), check=False
    )
    model = result.model
    (cast,) = [n for n in model.graph if n.op_type == "Cast"]
    assert cast.inputs[0].dtype == onnx.TensorProto.FLOAT16
    assert [u.node.name for u in cast.outputs[0].uses()] == ["matmul"]
    assert cast.outputs[0].name == "mw"
    float32 = [v for v in model.graph.initializers.values() if v.dtype == onnx.TensorProto.FLOAT]
    assert all(v.const_value.size < 1024 for v in float32), [v.name for v in float32]
    assert _error(io.to_bytes(model), proto) < 0.05


@pytest.mark.parametrize(
    ("passes", "op"), [("quant-dynamic", "DynamicQuantizeMatMul"), ("quant-weight", "MatMulNBits")]
)
def test_weight_quantizing_passes_take_half_weights_too(passes, op):
    proto = _half_weight_model()
    model = shrink(proto, passes, sets=[f"{passes}.min_weight_elements=0"], check=False).model
    assert op in _ops(model), _ops(model)
    # The Conv's weight is none of theirs: it keeps its float16 storage behind the Cast.
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].producer().op_type == "Cast"
    assert _error(io.to_bytes(model), proto) < 0.1


def test_lift_then_restore_gives_the_half_tensors_back_exactly():
    proto = _half_weight_model()
    model = io.load(proto)
    bf16 = (0.2 * RNG.standard_normal((16, 8, 3, 3))).astype(ml_dtypes.bfloat16)
    weight = model.graph.initializers["cw16"]
    weight.const_value = ir.Tensor(bf16, name="cw16")
    weight.type = ir.TensorType(ir.DataType.BFLOAT16)
    before = {
        name: value.const_value.numpy().copy() for name, value in model.graph.initializers.items()
    }
    assert half_weights.lift(model) == 3
    assert "Cast" not in _ops(model)
    assert half_weights.restore(model) == 3
    assert sorted(_ops(model)).count("Cast") == 3
    after = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    assert before.keys() == after.keys()
    for name, array in before.items():
        assert after[name].dtype == array.dtype and np.array_equal(after[name], array), name


def test_a_cast_read_as_anything_but_a_weight_is_left_alone(caplog):
    nodes = [
        oh.make_node("Cast", ["w16"], ["w"], to=F),
        oh.make_node("MatMul", ["x", "w"], ["m"]),
        oh.make_node("Add", ["m", "w"], ["y"]),  # also read as an activation
    ]
    proto = make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, [4, 4])],
        [oh.make_tensor_value_info("y", F, [4, 4])],
        {"w16": RNG.standard_normal((4, 4)).astype(np.float16)},
    )
    model = io.load(proto)
    assert half_weights.lift(model) == 0
    assert _ops(model) == ["Cast", "MatMul", "Add"]


def test_a_conv_whose_weight_is_computed_is_said_so(caplog):
    """The reason is the weight, not "no range measured" for an input whose range the pass
    never asked for (it plans no node without a constant weight)."""
    nodes = [
        oh.make_node("Relu", ["wx"], ["w"]),
        oh.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    proto = make_model(
        nodes,
        [
            oh.make_tensor_value_info("x", F, [1, 2, 4, 4]),
            oh.make_tensor_value_info("wx", F, [3, 2, 1, 1]),
        ],
        [oh.make_tensor_value_info("y", F, [1, 3, 4, 4])],
        {},
    )
    data = {
        "x": RNG.standard_normal((4, 1, 2, 4, 4)).astype(np.float32),
        "wx": RNG.standard_normal((4, 3, 2, 1, 1)).astype(np.float32),
    }
    with caplog.at_level(logging.WARNING):
        shrink(proto, "quant", data=data, check=False)
    assert "weight is not a constant" in caplog.text, caplog.text
    assert "no range measured" not in caplog.text


def test_prune_zeroes_half_weights_and_keeps_their_float16_storage():
    proto = _half_weight_model()
    model = shrink(proto, "prune", sets=["prune.sparsity=0.5"], check=False).model
    casts = {n.outputs[0].name: n for n in model.graph if n.op_type == "Cast"}
    assert sorted(casts) == ["cb", "cw", "mw"]  # where they were, by the same names
    assert casts["mw"].name == "cast_mw"
    for name in ("cw", "mw"):
        half = casts[name].inputs[0]
        assert half.dtype == onnx.TensorProto.FLOAT16
        assert np.mean(half.const_value.numpy() == 0) == pytest.approx(0.5, abs=0.01), name
    # The pruned model is no larger: no float32 copy of a weight.
    assert len(io.to_bytes(model)) <= proto.ByteSize() + 256
    assert 0 < _error(io.to_bytes(model), proto) < 0.9


def test_a_refit_prune_rounds_its_new_half_weights_to_float16():
    proto = _half_weight_model()
    sets = ["prune.sparsity=0.5", "prune.method=wanda"]
    model = shrink(proto, "prune", sets=sets, calibration=_data(32, seed=0), check=False).model
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    half = matmul.inputs[1].producer().inputs[0].const_value.numpy()
    assert half.dtype == np.float16 and np.mean(half == 0) == pytest.approx(0.5, abs=0.01)
    # The kept weights are the refit's, not the stored ones: the refit was kept too.
    (stored,) = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == "mw16"]
    kept = half != 0
    assert not np.array_equal(half[kept], stored[kept])


def test_prune_keeps_bfloat16_weights_in_bfloat16():
    proto = _half_weight_model()
    for tensor in proto.graph.initializer:
        if tensor.name == "mw16":
            values = onnx.numpy_helper.to_array(tensor).astype(ml_dtypes.bfloat16)
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, "mw16"))
    model = shrink(proto, "prune", sets=["prune.sparsity=0.5"], check=False).model
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    half = matmul.inputs[1].producer().inputs[0]
    assert half.dtype == onnx.TensorProto.BFLOAT16
    assert np.mean(half.const_value.numpy().astype(np.float32) == 0) == pytest.approx(0.5, abs=0.01)


def test_a_copy_a_pass_made_of_a_lifted_weight_is_restored_too_and_overflow_stays_float32():
    model = io.load(_half_weight_model())
    half_weights.lift(model)
    graph = model.graph
    lifted = graph.initializers["mw"]
    copy = graph_edit.add_initializer(graph, "mw_copy", lifted.const_value.numpy() * 2)
    half_weights.mark_like(copy, lifted)
    matmul = next(n for n in graph if n.op_type == "MatMul")
    matmul.replace_input_with(1, copy)  # as prune-channels gives a reader its own cut
    conv = next(n for n in graph if n.op_type == "Conv")
    big = graph.initializers["cw"]
    big.const_value = ir.tensor(np.full(big.shape.numpy(), 1e6, np.float32), name="cw")
    assert half_weights.restore(model) == 2  # mw_copy and cb; cw overflows float16
    cast = matmul.inputs[1].producer()
    assert cast.op_type == "Cast" and cast.inputs[0].dtype == onnx.TensorProto.FLOAT16
    assert conv.inputs[1].is_initializer() and conv.inputs[1].dtype == onnx.TensorProto.FLOAT
    assert np.isfinite(conv.inputs[1].const_value.numpy()).all()
    names = [n.name for n in graph if n.name]
    assert len(names) == len(set(names))


def test_fp16_runs_half_weights_as_stored_and_an_island_keeps_its_cast():
    proto = _half_weight_model()
    data = _data(16, seed=0)
    model = shrink(proto, "fp16", calibration=data, check=False).model
    assert "Cast" not in [n.op_type for n in model.graph if n.inputs[0].is_initializer()]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].is_initializer() and conv.inputs[1].dtype == onnx.TensorProto.FLOAT16
    assert _error(io.to_bytes(model), proto) < 0.01
    island = shrink(proto, "fp16", sets=["fp16.exclude=matmul"], calibration=data, check=False)
    matmul = next(n for n in island.model.graph if n.op_type == "MatMul")
    cast = matmul.inputs[1].producer()
    assert cast.op_type == "Cast" and cast.inputs[0].dtype == onnx.TensorProto.FLOAT16
    assert len(io.to_bytes(island.model)) <= proto.ByteSize() + 256


def test_prune_channels_slices_half_weights_and_keeps_their_float16_storage():
    proto = _half_weight_model()
    model = shrink(proto, "prune-channels", sets=["prune-channels.ratio=0.5"], check=False).model
    conv = next(n for n in model.graph if n.op_type == "Conv")
    weight, bias = (conv.inputs[i].producer() for i in (1, 2))
    assert weight.op_type == bias.op_type == "Cast"
    assert weight.inputs[0].dtype == onnx.TensorProto.FLOAT16
    assert weight.inputs[0].const_value.shape[0] < 16  # output channels cut
    assert len(io.to_bytes(model)) < 0.75 * proto.ByteSize()  # no float32 copies
    feed = _data(4, seed=1)
    assert run_ort(io.to_bytes(model), feed)[0].shape == (4, 32)


def test_lowrank_splits_half_weights_and_stores_both_factors_in_float16():
    rng = np.random.default_rng(3)
    weight = 0.1 * rng.standard_normal((64, 4)) @ rng.standard_normal((4, 48))
    nodes = [
        oh.make_node("Cast", ["w16"], ["w"], to=F, name="cast_w"),
        oh.make_node("MatMul", ["x", "w"], ["y"], name="matmul"),
    ]
    proto = make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", 64])],
        [oh.make_tensor_value_info("y", F, ["N", 48])],
        {"w16": weight.astype(np.float16)},
    )
    model = shrink(proto, "lowrank", sets=["lowrank.min_params=0"], check=False).model
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert len(matmuls) == 2  # split, where "weight is not a constant" left it dense
    for matmul in matmuls:
        cast = matmul.inputs[1].producer()
        assert cast.op_type == "Cast" and cast.inputs[0].dtype == onnx.TensorProto.FLOAT16
    saved = io.to_bytes(model)
    assert len(saved) < 0.7 * proto.ByteSize()  # no float32 copy of either factor
    feed = {"x": rng.standard_normal((5, 64)).astype(np.float32)}
    want = run_ort(proto.SerializeToString(), feed)[0]
    got = run_ort(saved, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3  # float16 rounding
