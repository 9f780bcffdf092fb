"""LSTM weights as int8 (com.microsoft.DynamicQuantizeLSTM), in quant-dynamic and quant, run
on onnxruntime's CPU provider; GRU and RNN stay float."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import run_ort

SEQ, BATCH, INPUT, HIDDEN = 7, 3, 24, 16
FLOAT = onnx.TensorProto.FLOAT


def lstm_model(
    directions: int = 2, *, layout: int = 0, peepholes: bool = True, op: str = "LSTM"
) -> onnx.ModelProto:
    """``X -> LSTM`` with every optional input but sequence_lens; Y feeds a Relu, and Y_h
    and Y_c are graph outputs themselves (each of the three outputs has a reader)."""
    rng = np.random.default_rng(0)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    shape_x = (BATCH, SEQ, INPUT) if layout else (SEQ, BATCH, INPUT)
    state = (BATCH, directions, HIDDEN) if layout else (directions, BATCH, HIDDEN)
    arrays = {
        "W": rng.standard_normal((directions, gates * HIDDEN, INPUT)) * 0.3,
        "R": rng.standard_normal((directions, gates * HIDDEN, HIDDEN)) * 0.3,
        "B": rng.standard_normal((directions, 2 * gates * HIDDEN)) * 0.1,
        "h0": rng.standard_normal(state) * 0.5,
    }
    inputs = ["X", "W", "R", "B", "", "h0"]
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        arrays["c0"] = rng.standard_normal(state) * 0.5
        inputs.append("c0")
        outputs.append("Y_c")
        if peepholes:
            arrays["P"] = rng.standard_normal((directions, 3 * HIDDEN)) * 0.2
            inputs.append("P")
    sequence = (BATCH, SEQ, directions, HIDDEN) if layout else (SEQ, directions, BATCH, HIDDEN)
    shapes = {"y": sequence, "Y_h": state, "Y_c": state}
    direction = "bidirectional" if directions == 2 else "forward"
    attributes = {"hidden_size": HIDDEN, "direction": direction}
    if layout:
        attributes["layout"] = layout
    nodes = [
        oh.make_node(op, inputs, outputs, name="rnn", **attributes),
        oh.make_node("Relu", ["Y"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("X", FLOAT, shape_x)],
        [oh.make_tensor_value_info(name, FLOAT, shapes[name]) for name in ["y", *outputs[1:]]],
        [onh.from_array(a.astype(np.float32), name) for name, a in arrays.items()],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 14)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def inputs(layout: int = 0) -> dict[str, np.ndarray]:
    shape = (BATCH, SEQ, INPUT) if layout else (SEQ, BATCH, INPUT)
    return {"X": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


def quantized(model: onnx.ModelProto, **options) -> tuple[ir.Model, bool]:
    options.setdefault("narrow_storage", False)
    options.setdefault("min_weight_elements", 0)  # the toy LSTMs are small
    result = QuantDynamicPass(**options)(io.load(model))
    onnx.checker.check_model(io.serialize_proto(result.model), full_check=True)
    return result.model, result.modified


def initializer(model: ir.Model, name: str | None) -> np.ndarray:
    value = model.graph.initializers[name]
    assert value.const_value is not None
    return value.const_value.numpy()


@pytest.mark.parametrize("directions", [1, 2])
def test_an_lstm_becomes_dynamic_quantize_lstm_with_int8_weights_per_gate_row(directions):
    proto = lstm_model(directions)
    model, modified = quantized(proto)
    assert modified
    (node,) = [n for n in model.graph if n.op_type != "Relu"]
    assert (node.op_type, node.domain) == ("DynamicQuantizeLSTM", "com.microsoft")
    assert node.attributes.get_int("hidden_size") == HIDDEN
    floats = {t.name: onh.to_array(t) for t in proto.graph.initializer}
    for position, source in ((1, "W"), (2, "R")):
        codes = initializer(model, node.inputs[position].name)
        scale = initializer(model, node.inputs[6 + 2 * position].name)
        zero = initializer(model, node.inputs[7 + 2 * position].name)
        w = floats[source]
        # The kernel's layout: [D, K, 4H], one symmetric scale per gate row.
        assert codes.dtype == np.int8 and codes.shape == (directions, w.shape[2], 4 * HIDDEN)
        assert scale.shape == zero.shape == (directions, 4 * HIDDEN) and not zero.any()
        np.testing.assert_allclose(scale, np.abs(w).max(axis=2) / 127, rtol=1e-6)
        dequantized = codes.transpose(0, 2, 1) * scale[:, :, None]
        assert np.all(np.abs(dequantized - w) <= scale[:, :, None] / 2 + 1e-7)
    # W and R share one zero point; B, h0, c0 and P are the float originals.
    assert node.inputs[9] is node.inputs[11]
    assert [v.name if v else None for v in node.inputs[3:8]] == ["B", None, "h0", "c0", "P"]
    feed = inputs()
    reference = run_ort(proto.SerializeToString(), feed)
    got = run_ort(io.serialize_proto(model).SerializeToString(), feed)
    assert len(got) == 3
    for want, have in zip(reference, got, strict=True):
        assert want.shape == have.shape
        assert np.abs(want - have).max() < 0.03  # tanh-bounded outputs: |y| < 1


def test_per_tensor_lstm_weights_get_one_scale_per_direction():
    model, _ = quantized(lstm_model(2), per_channel=False)
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeLSTM")
    assert initializer(model, node.inputs[8].name).shape == (2,)
    assert initializer(model, node.inputs[10].name).shape == (2,)
    feed = inputs()
    reference = run_ort(lstm_model(2).SerializeToString(), feed)
    got = run_ort(io.serialize_proto(model).SerializeToString(), feed)
    assert max(np.abs(a - b).max() for a, b in zip(reference, got, strict=True)) < 0.05


def test_narrow_storage_keeps_the_lstm_loadable_and_a_quarter_of_the_bytes(tmp_path):
    proto = lstm_model(2, peepholes=False)
    model, _ = quantized(proto, narrow_storage=True)
    saved = io.save(model, tmp_path / "q.onnx")
    weights = sum(t.ByteSize() for t in proto.graph.initializer if t.name in ("W", "R"))
    assert saved.bytes_on_disk < len(proto.SerializeToString()) - 0.7 * weights
    feed = inputs()
    reference = run_ort(proto.SerializeToString(), feed)
    got = run_ort(saved.path, feed)
    assert max(np.abs(a - b).max() for a, b in zip(reference, got, strict=True)) < 0.03


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        ({"fused": False}, "standard ONNX has no integer LSTM"),
        ({"min_weight_elements": 10**6}, "W and R hold"),
    ],
)
def test_lstms_the_options_rule_out_stay_float_with_the_reason(caplog, options, reason):
    with caplog.at_level(logging.WARNING):
        model, modified = quantized(lstm_model(1), op_types=("LSTM",), **options)
    assert not modified and "LSTM" in [n.op_type for n in model.graph]
    assert reason in caplog.text


def test_a_batch_first_lstm_stays_float_since_the_contrib_op_has_no_layout(caplog):
    proto = lstm_model(1, layout=1)
    with caplog.at_level(logging.WARNING):
        model, modified = quantized(proto, op_types=("LSTM",))
    assert not modified
    assert [n.op_type for n in model.graph] == ["LSTM", "Relu"]
    assert "layout=1" in caplog.text


def test_an_lstm_whose_weight_is_a_graph_input_stays_float(caplog):
    proto = lstm_model(1)
    proto.graph.input.append(oh.make_tensor_value_info("R", FLOAT, [1, 4 * HIDDEN, HIDDEN]))
    with caplog.at_level(logging.DEBUG):
        model, modified = quantized(proto, op_types=("LSTM",))
    assert not modified
    assert "graph input" in caplog.text


@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gru_and_rnn_stay_float_and_a_warning_says_why_where_they_hold_the_weights(caplog, op):
    proto = lstm_model(1, op=op)
    with caplog.at_level(logging.WARNING):
        model, modified = quantized(proto)
    assert not modified and op in [n.op_type for n in model.graph]
    assert f"quant-dynamic: 1 {op} stay float, holding 100% of the model's float weights" in (
        caplog.text
    )


def _big_matmul_then_gru() -> onnx.ModelProto:
    """A GRU (2,064 floats with its bias and initial state) after a MatMul of 24,576: 7.7 %
    of the float weight bytes."""
    proto = lstm_model(1, op="GRU")
    weight = np.random.default_rng(2).standard_normal((1024, INPUT)) * 0.05
    proto.graph.initializer.append(onh.from_array(weight.astype(np.float32), "M"))
    proto.graph.node.insert(0, oh.make_node("MatMul", ["X0", "M"], ["X"]))
    proto.graph.input[0].CopyFrom(oh.make_tensor_value_info("X0", FLOAT, [SEQ, BATCH, 1024]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_a_gru_holding_few_of_the_weights_stays_float_with_an_info_line(caplog):
    with caplog.at_level(logging.INFO):
        model, modified = quantized(_big_matmul_then_gru())
    assert modified and "GRU" in [n.op_type for n in model.graph]
    (record,) = [r for r in caplog.records if "stay float" in r.getMessage()]
    assert record.levelno == logging.INFO
    assert "quant-dynamic: 1 GRU stay float: onnxruntime has no integer kernel" in record.message


def test_static_quant_names_itself_when_a_gru_stays_float(caplog):
    """Found in an audit (NSNet2): under fold,quant the GRUs' line said quant-dynamic."""
    model = io.load(_big_matmul_then_gru())
    quant = QuantPass()
    dataset = data.prepare(data.specs_from_model(model), None)
    with caplog.at_level(logging.INFO):
        quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    (line,) = [r.getMessage() for r in caplog.records if "GRU stay float" in r.getMessage()]
    assert line.startswith("quant: 1 GRU stay float")


def _matmul_then_lstm() -> onnx.ModelProto:
    """A MatMul (static QDQ's) feeding an LSTM (dynamic's; 5,120 weights, past quant's
    4,096-element floor)."""
    proto = lstm_model(2, peepholes=False)
    rng = np.random.default_rng(2)
    proto.graph.node.insert(0, oh.make_node("MatMul", ["X0", "M"], ["X"]))
    proto.graph.initializer.append(
        onh.from_array((rng.standard_normal((32, INPUT)) * 0.2).astype(np.float32), "M")
    )
    proto.graph.input[0].CopyFrom(oh.make_tensor_value_info("X0", FLOAT, [SEQ, BATCH, 32]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize(
    ("options", "lstm"),
    [({}, True), ({"lstm": False}, False), ({"exclude_op_types": ("LSTM",)}, False)],
)
def test_static_quant_gives_lstms_dynamic_int8_weights_unless_asked_not_to(options, lstm):
    proto = _matmul_then_lstm()
    model = io.load(proto)
    quant = QuantPass(**options)
    dataset = data.prepare(data.specs_from_model(model), None)
    quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    op_types = [n.op_type for n in model.graph]
    assert ("DynamicQuantizeLSTM" in op_types) is lstm
    assert ("LSTM" in op_types) is not lstm
    assert "QuantizeLinear" in op_types  # the MatMul's input, either way
    feed = {"X0": np.random.default_rng(3).standard_normal((SEQ, BATCH, 32)).astype(np.float32)}
    reference = run_ort(proto.SerializeToString(), feed)
    got = run_ort(io.serialize_proto(model).SerializeToString(), feed)
    # The MatMul's QDQ and the LSTM's int8 weights together, on tanh-bounded outputs.
    assert max(np.abs(a - b).max() for a, b in zip(reference, got, strict=True)) < 0.08


def test_quant_only_quantizes_the_lstm_it_names_and_nothing_else():
    """The sensitivity report measures an LSTM alone with ``only``: just that node becomes
    DynamicQuantizeLSTM (no Q/DQ around the MatMul), and naming the MatMul leaves it float."""
    proto = _matmul_then_lstm()
    model = io.load(proto)
    model.graph.node(0).name = "matmul"
    dataset = data.prepare(data.specs_from_model(model), None)
    stats = collect.collect(model, QuantPass().requests(model), dataset)
    for only, expected in ((("rnn",), "DynamicQuantizeLSTM"), (("matmul",), "LSTM")):
        copy = model.clone()
        io.unshare_tensors(copy)
        result = QuantPass(only=only).bind(stats)(copy)
        op_types = [n.op_type for n in result.model.graph]
        assert result.modified and expected in op_types
        assert ("QuantizeLinear" in op_types) is (only == ("matmul",)), op_types


def test_sensitivity_ranks_lstms_and_the_hint_can_keep_them_float():
    """An LSTM is a quantized layer too (rule 10): it is measured alone, ranked with the
    plan's nodes, and the hint names it, measured to help."""
    from onnx_shrink.runtime_check import sensitivity

    proto = _matmul_then_lstm()
    proto.graph.node[0].name = "matmul"
    # An outlier in each of W's gate rows: one scale per row then rounds the rest coarsely,
    # so the LSTM is the worst layer.
    w = next(t for t in proto.graph.initializer if t.name == "W")
    outlying = onh.to_array(w).copy()
    outlying[:, :, 0] = 40.0
    w.CopyFrom(onh.from_array(outlying, "W"))
    model = io.load(proto)
    feed = np.random.default_rng(3).standard_normal((16, SEQ, BATCH, 32)).astype(np.float32)
    dataset = data.prepare(data.specs_from_model(model), {"X0": feed})
    report = sensitivity.sensitivity(model, QuantPass(), dataset)
    ranked = {layer.node: layer for layer in report.layers}
    assert set(ranked) == {"matmul", "rnn"}
    assert ranked["rnn"].op_type == "LSTM" and ranked["rnn"].relative_error > 0
    assert report.layers[0].node == "rnn" and not ranked["rnn"].companions
    assert report.exclude_patterns(2) == ("rnn",)
    effect = report.hint_effect
    assert effect is not None and effect.hinted < effect.whole


def _mask_cosine(path: str, candidate: str, frames: dict[str, np.ndarray]) -> float:
    """Cosine of the masks of all frames (one run each: the model takes batch 1)."""
    count = len(frames["input_2"])
    reference, got = (
        np.concatenate(
            [
                run_ort(p, {k: v[i : i + 1] for k, v in frames.items()})[0].ravel()
                for i in range(count)
            ]
        )
        for p in (path, candidate)
    )
    return float(reference @ got / (np.linalg.norm(reference) * np.linalg.norm(got)))


@pytest.mark.network
@pytest.mark.slow
def test_dtln_lstms_shrink_4x_and_keep_the_mask_closer_than_onnxruntimes_quantizer(tmp_path):
    """Both LSTMs of a real speech enhancer become DynamicQuantizeLSTM; per gate row, the
    mask stays closer to float than with onnxruntime's quantize_dynamic (per direction)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from models import speech
    from models.fetch import fetch

    path = str(fetch("dtln-1"))
    result = QuantDynamicPass()(io.load(path))
    ours = io.save(result.model, tmp_path / "ours.onnx")
    op_types = [n.op_type for n in result.model.graph]
    assert op_types.count("DynamicQuantizeLSTM") == 2 and "LSTM" not in op_types
    assert ours.bytes_on_disk < 0.3 * io.file_bytes(path)
    quantize_dynamic(path, tmp_path / "ort.onnx", weight_type=QuantType.QInt8)
    frames = speech.dtln_frames(speech.voiced(1.0, seed=4), lambda f: run_ort(path, f), 24)
    ours_cosine = _mask_cosine(path, str(ours.path), frames)
    ort_cosine = _mask_cosine(path, str(tmp_path / "ort.onnx"), frames)
    assert ours_cosine > 0.999
    assert 1 - ours_cosine < 1 - ort_cosine


def test_static_quant_of_a_gru_alone_says_why_nothing_was_quantized(caplog):
    # It said "the model has no node of a type it quantizes", as if GRUs were unknown to it.
    model = io.load(lstm_model(1, op="GRU"))
    quant = QuantPass()
    dataset = data.prepare(data.specs_from_model(model), None)
    with caplog.at_level(logging.WARNING):
        result = quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    assert not result.modified
    assert "no node could be quantized (1 GRU: onnxruntime has no integer kernel" in caplog.text


def test_a_quant_only_naming_no_node_says_so_beside_a_gru():
    """Found in review: the GRU's reason hid that quant.only named no node it quantizes."""
    from onnx_shrink.passes.quant import float_reasons, placement

    graph = io.load(_big_matmul_then_gru()).graph
    unnamed = placement.Exclusions(only=("nope",))
    assert float_reasons.summary(graph, unnamed, {}) == (
        " (quant.only names no node it quantizes: nope)"
    )
    assert "1 GRU" in float_reasons.summary(graph, placement.Exclusions(only=("rnn",)), {})
