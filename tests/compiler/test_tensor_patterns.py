"""A pattern option given a tensor's name (as --layers shows) names the node that writes it;
one that names a node keeps naming just that node."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink import shrink
from onnx_shrink.compiler import tensor_patterns
from onnx_shrink.passes.fp16 import Float16Pass
from onnx_shrink.passes.quant.static import QuantPass
from tests.helpers import save_proto

RNG = np.random.default_rng(71207)


def two_layers(named: bool = True) -> onnx.ModelProto:
    """x -> MatMul -> Relu -> MatMul -> y; with ``named``, the second MatMul is named like
    the first one's output tensor ('h.0'), as fold's names can fall."""
    h = onnx.helper
    first, second = ("mm.first", "h.0") if named else ("", "")
    nodes = [
        h.make_node("MatMul", ["x", "w1"], ["h.0"], name=first),
        h.make_node("Relu", ["h.0"], ["r"]),
        h.make_node("MatMul", ["r", "w2"], ["y"], name=second),
    ]
    weights = [
        onnx.numpy_helper.from_array(RNG.standard_normal((8, 8)).astype(np.float32), name)
        for name in ("w1", "w2")
    ]
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8])],
        weights,
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_a_tensor_name_is_read_as_its_writer_and_a_node_name_stays(caplog):
    model = ir.serde.deserialize_model(two_layers())
    resolved = tensor_patterns.resolved(QuantPass(exclude=("r", "h.0", "nothing")), model)
    # 'r' names only a tensor: its writer, Relu, unnamed here, cannot be named; 'h.0' names
    # the second MatMul (a node), not the first one that writes the tensor 'h.0'.
    assert resolved.exclude == ("r", "h.0", "nothing")
    relu = next(n for n in model.graph if n.op_type == "Relu")
    relu.name = "act"
    with caplog.at_level(logging.INFO):
        resolved = tensor_patterns.resolved(QuantPass(exclude=("r", "h.0"), int16=("r",)), model)
    assert (resolved.exclude, resolved.int16) == (("act", "h.0"), ("act",))
    assert "quant.exclude: 'r' names no node but tensors" in caplog.text
    unchanged = QuantPass(exclude=("mm\\.first",))
    assert tensor_patterns.resolved(unchanged, model) is unchanged


def test_fp16_keeps_float32_the_unnamed_node_that_writes_a_named_tensor(tmp_path):
    """The file's nodes have no names (Swift-F0's): the tensor is all a user can give."""
    model = save_proto(two_layers(named=False), tmp_path / "m.onnx")
    x = RNG.standard_normal((4, 8)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    out = tmp_path / "out.onnx"
    stored = {}
    for exclude in ((), ("h.0",)):
        fp16 = Float16Pass(exclude=exclude, weightless_runs=False)  # 64-value weights
        shrink(model, [fp16], output=out, data=tmp_path / "x.npz", check=False)
        result = onnx.load(out)
        matmuls = [n for n in result.graph.node if n.op_type == "MatMul"]
        weights = {i.name: i.data_type for i in result.graph.initializer}
        stored[exclude] = [weights.get(n.input[1]) for n in matmuls]
    half, single = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    # Excluded by its tensor, the first MatMul (writing h.0) keeps its float32 weight.
    assert stored == {(): [half, half], ("h.0",): [single, half]}
    assert all(not n.name for n in result.graph.node if n.op_type in ("MatMul", "Relu"))
