"""fold's cone rule: constant expressions over weights only they read fold whole, where
onnxscript's folder declines each node of them (an input above its size limit, read twice)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.fold import FoldPass
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from tests.helpers import run_ort

FLOAT = onnx.TensorProto.FLOAT
HIDDEN, INPUT = 64, 128  # W [256, 128]: 32,768 elements, past onnxscript's 8,192
RNG = np.random.default_rng(0)


def _int64(name: str, *values: int) -> onnx.TensorProto:
    return onh.from_array(np.array(values, np.int64), name)


def torch_lstm(input_size: int = INPUT) -> onnx.ModelProto:
    """torch's LSTM export reordering ``weight_ih`` (gates i, f, g, o) into ONNX's i, o, f, c
    at run time: four Slices of one weight, a Concat and an Unsqueeze."""
    w = (RNG.standard_normal((4 * HIDDEN, input_size)) * 0.1).astype(np.float32)
    r = (RNG.standard_normal((1, 4 * HIDDEN, HIDDEN)) * 0.1).astype(np.float32)
    bounds = [0, HIDDEN, 2 * HIDDEN, 3 * HIDDEN, 4 * HIDDEN]
    order = [0, 3, 1, 2]  # ONNX's i, o, f, c from torch's i, f, g, o
    nodes, slices = [], []
    for k, gate in enumerate(order):
        nodes.append(oh.make_node("Slice", ["w", f"s{gate}", f"e{gate}", "a0"], [f"gate{k}"]))
        slices.append(f"gate{k}")
    nodes += [
        oh.make_node("Concat", slices, ["reordered"], axis=0),
        oh.make_node("Unsqueeze", ["reordered", "a0"], ["W"]),
        oh.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=HIDDEN),
    ]
    inits = [onh.from_array(w, "w"), onh.from_array(r, "R"), _int64("a0", 0)]
    for gate in range(4):
        inits += [_int64(f"s{gate}", bounds[gate]), _int64(f"e{gate}", bounds[gate + 1])]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [5, 2, input_size])],
        [oh.make_tensor_value_info("y", FLOAT, [5, 1, 2, HIDDEN])],
        inits,
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def weight_norm(tied: bool = False) -> onnx.ModelProto:
    """torch's weight_norm: ``W = g * v / ||v||`` per output row, computed at run time; with
    ``tied``, ``v`` is also read by a Gather on a graph input (so it cannot die)."""
    v = (RNG.standard_normal((INPUT, 4 * HIDDEN))).astype(np.float32)
    g = RNG.uniform(0.5, 2.0, (1, 4 * HIDDEN)).astype(np.float32)
    nodes = [
        oh.make_node("ReduceL2", ["v", "axis0"], ["norm"], keepdims=1),
        oh.make_node("Div", ["v", "norm"], ["direction"]),
        oh.make_node("Mul", ["g", "direction"], ["W"]),
        oh.make_node("MatMul", ["x", "W"], ["y"]),
    ]
    inputs = [oh.make_tensor_value_info("x", FLOAT, [3, INPUT])]
    outputs = [oh.make_tensor_value_info("y", FLOAT, [3, 4 * HIDDEN])]
    if tied:
        nodes.append(oh.make_node("Gather", ["v", "ids"], ["rows"], axis=0))
        inputs.append(oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2]))
        outputs.append(oh.make_tensor_value_info("rows", FLOAT, [2, 4 * HIDDEN]))
    graph = oh.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        [onh.from_array(v, "v"), onh.from_array(g, "g"), _int64("axis0", 0)],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=8)


def folded(proto: onnx.ModelProto):
    onnx.checker.check_model(proto, full_check=True)
    result = FoldPass()(io.load(proto))
    return result.model, io.serialize_proto(result.model)


def test_a_torch_lstm_gate_reorder_folds_into_the_weight_and_outputs_stay_exact():
    proto = torch_lstm()
    model, saved = folded(proto)
    assert [n.op_type for n in model.graph] == ["LSTM"]
    assert model.graph.node(0).inputs[1].is_initializer()
    assert saved.ByteSize() <= proto.ByteSize()
    feed = {"x": RNG.standard_normal((5, 2, INPUT)).astype(np.float32)}
    np.testing.assert_array_equal(
        run_ort(proto.SerializeToString(), feed)[0], run_ort(saved.SerializeToString(), feed)[0]
    )
    # Now a weight-quantizing pass sees the LSTM's weights.
    assert QuantDynamicPass(narrow_storage=False)(model).modified
    assert [n.op_type for n in model.graph] == ["DynamicQuantizeLSTM"]


def test_a_cone_over_a_weight_read_in_place_from_the_model_file_folds(tmp_path):
    # io.load leaves weights of 1 MiB and more in the file (ExternalTensor), which onnx's
    # reference evaluator refused: on a file, no cone over a large weight ever folded.
    proto = torch_lstm(input_size=1024)  # W: 256 x 1024 float32, 1 MiB
    path = tmp_path / "lstm.onnx"
    onnx.save(proto, path)
    model = FoldPass()(io.load(str(path))).model
    assert [n.op_type for n in model.graph] == ["LSTM"]
    saved = io.serialize_proto(model)
    feed = {"x": RNG.standard_normal((5, 2, 1024)).astype(np.float32)}
    np.testing.assert_array_equal(
        run_ort(proto.SerializeToString(), feed)[0], run_ort(saved.SerializeToString(), feed)[0]
    )


def test_a_weight_read_once_through_a_cast_and_a_split_folds_to_its_parts():
    # tf2onnx's Keras LSTM: a float32 kernel Cast to float16 and split into its gates.
    # onnxscript folds neither (a Split with two outputs), though the parts take half the bytes.
    w = RNG.standard_normal((INPUT, 2 * INPUT)).astype(np.float32)
    half = onnx.TensorProto.FLOAT16
    nodes = [
        oh.make_node("Cast", ["w"], ["w16"], to=half),
        oh.make_node("Split", ["w16"], ["wa", "wb"], axis=1, num_outputs=2),
        oh.make_node("MatMul", ["x", "wa"], ["ya"]),
        oh.make_node("MatMul", ["x", "wb"], ["yb"]),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", half, [3, INPUT])],
        [oh.make_tensor_value_info(y, half, [3, INPUT]) for y in ("ya", "yb")],
        [onh.from_array(w, "w")],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 18)], ir_version=8)
    model, saved = folded(proto)
    assert [n.op_type for n in model.graph] == ["MatMul", "MatMul"]
    assert saved.ByteSize() < 0.6 * proto.ByteSize()
    feed = {"x": RNG.standard_normal((3, INPUT)).astype(np.float16)}
    want = run_ort(proto.SerializeToString(), feed)
    got = run_ort(saved.SerializeToString(), feed)
    for name, (expected, actual) in enumerate(zip(want, got, strict=True)):
        np.testing.assert_array_equal(actual, expected, err_msg=f"output {name}")


def test_weight_normalization_folds_and_outputs_stay_within_rounding():
    proto = weight_norm()
    model, saved = folded(proto)
    assert [n.op_type for n in model.graph] == ["MatMul"]
    assert saved.ByteSize() <= proto.ByteSize()
    feed = {"x": RNG.standard_normal((3, INPUT)).astype(np.float32)}
    want = run_ort(proto.SerializeToString(), feed)[0]
    got = run_ort(saved.SerializeToString(), feed)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_weight_something_else_reads_too_stays_unfolded():
    # Folding W would store v twice: once for the Gather, once normalized.
    proto = weight_norm(tied=True)
    model, saved = folded(proto)
    assert "ReduceL2" in [n.op_type for n in model.graph]
    assert saved.ByteSize() <= proto.ByteSize()


@pytest.mark.parametrize("parts", [("b", "a"), ("b", "a", "a")])
def test_a_cone_folds_only_where_its_result_fits_in_the_weight_it_frees(parts):
    # w is read by two Slices (so onnxscript declines each). Swapping its halves stores as
    # many bytes; repeating one half would store 1.5 times as many: that stays unfolded.
    w = RNG.standard_normal((INPUT, 2 * HIDDEN)).astype(np.float32)
    half = INPUT // 2
    graph = oh.make_graph(
        [
            oh.make_node("Slice", ["w", "zero", "half", "zero"], ["a"]),
            oh.make_node("Slice", ["w", "half", "end", "zero"], ["b"]),
            oh.make_node("Concat", list(parts), ["both"], axis=0),
            oh.make_node("MatMul", ["x", "both"], ["y"]),
        ],
        "g",
        [oh.make_tensor_value_info("x", FLOAT, [3, half * len(parts)])],
        [oh.make_tensor_value_info("y", FLOAT, [3, 2 * HIDDEN])],
        [
            onh.from_array(w, "w"),
            _int64("zero", 0),
            _int64("half", half),
            _int64("end", INPUT),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model, saved = folded(proto)
    ops = [n.op_type for n in model.graph]
    assert ops == (["MatMul"] if len(parts) == 2 else ["Slice", "Slice", "Concat", "MatMul"])
    assert saved.ByteSize() <= proto.ByteSize()
    feed = {"x": RNG.standard_normal((3, half * len(parts))).astype(np.float32)}
    np.testing.assert_array_equal(
        run_ort(proto.SerializeToString(), feed)[0], run_ort(saved.SerializeToString(), feed)[0]
    )
