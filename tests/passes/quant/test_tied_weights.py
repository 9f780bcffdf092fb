"""A language model's output layer tied to its embedding table (``Gather(E)`` and
``MatMul(h, Transpose(E))``): every weight pass quantizes both readers and stores no float
table, and a table left float keeps its Transpose as it came."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import pytest

import onnx_shrink
from onnx_shrink.compiler import io, tied_weights
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.weight_only import WeightOnlyQuantPass
from tests.helpers import cosine, run_ort

VOCABULARY, WIDTH, TOKENS = 400, 64, 8


def tied_model() -> onnx.ModelProto:
    """ids -> Gather(table) -> Tanh -> MatMul(Transpose(table)) -> logits."""
    rng = np.random.default_rng(41)
    table = (rng.standard_normal((VOCABULARY, WIDTH)) * 0.2).astype(np.float32)
    nodes = [
        oh.make_node("Gather", ["table", "ids"], ["embedding"], name="embed", axis=0),
        oh.make_node("Tanh", ["embedding"], ["hidden"], name="act"),
        oh.make_node("Transpose", ["table"], ["head"], name="tie", perm=[1, 0]),
        oh.make_node("MatMul", ["hidden", "head"], ["logits"], name="lm_head"),
    ]
    graph = oh.make_graph(
        nodes,
        "tied",
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, TOKENS])],
        [oh.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, TOKENS, VOCABULARY])],
        [onh.from_array(table, "table")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    return model


def ids(seed: int, samples: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCABULARY, (samples, 1, TOKENS))


def float_tables(model: onnx.ModelProto) -> list[str]:
    """The float initializers of the table's size."""
    return [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) == VOCABULARY * WIDTH
    ]


def test_materialize_makes_the_transposed_weight_and_restore_puts_the_transpose_back():
    model = io.load(tied_model())
    assert tied_weights.materialize(model)
    assert "Transpose" not in [n.op_type for n in model.graph]
    copy = model.graph.initializers["table_transposed"]
    table = model.graph.initializers["table"].const_value.numpy()
    np.testing.assert_array_equal(copy.const_value.numpy(), table.T)
    feed = {"ids": ids(3)[0]}
    (expected,) = run_ort(tied_model().SerializeToString(), feed)
    (materialized,) = run_ort(io.serialize_proto(model).SerializeToString(), feed)
    np.testing.assert_array_equal(materialized, expected)
    # Both still float: the model goes back to storing the table once, named as it came.
    tied_weights.restore(model)
    proto = io.serialize_proto(model)
    assert float_tables(proto) == ["table"]
    (tie,) = [n for n in proto.graph.node if n.op_type == "Transpose"]
    assert (tie.name, list(tie.input), list(tie.output)) == ("tie", ["table"], ["head"])
    np.testing.assert_array_equal(run_ort(proto.SerializeToString(), feed)[0], expected)


@pytest.mark.parametrize("spec", ["quant-dynamic", "quant-weight", "quant"])
def test_every_weight_pass_quantizes_both_readers_of_a_tied_table(spec, tmp_path, caplog):
    """The tied model from torch's dynamo exporter grew under each pass (quant: 330,483 ->
    342,248 bytes), the float table kept for its Transpose beside the Gather's int8 copy."""
    source = tmp_path / "tied.onnx"
    onnx.save(tied_model(), source)
    output = tmp_path / "q.onnx"
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(
            str(source),
            spec,
            output=str(output),
            calibration={"ids": ids(5, 16)},
            check=False,
        )
    written = onnx.load(output)
    assert float_tables(written) == []
    assert "also read as float" not in caplog.text
    # Two int8 copies (one per reader's layout) and their scales: 0.52x of the float table.
    assert result.output_bytes < 0.6 * result.input_bytes
    feed = {"ids": ids(7)[0]}
    (expected,) = run_ort(source, feed)
    (got,) = run_ort(output, feed)
    assert cosine(expected, got) > 0.99


def test_a_table_both_readers_keep_float_is_stored_once_as_it_came(caplog):
    excluded = QuantDynamicPass(exclude=("embed", "lm_head"), narrow_storage=False)
    with caplog.at_level(logging.WARNING):
        result = excluded(io.load(tied_model()))
    assert "nothing quantized" in caplog.text
    proto = io.serialize_proto(result.model)
    assert float_tables(proto) == ["table"]
    assert [(n.name, n.op_type) for n in proto.graph.node if n.op_type == "Transpose"] == [
        ("tie", "Transpose")
    ]
    # The head alone float: the Gather reads int8 codes, the head its own float copy.
    head_float = WeightOnlyQuantPass(exclude=("lm_head",), bits=8)(io.load(tied_model()))
    proto = io.serialize_proto(head_float.model)
    assert float_tables(proto) == ["table_transposed"]
    assert "Transpose" not in [n.op_type for n in proto.graph.node]
