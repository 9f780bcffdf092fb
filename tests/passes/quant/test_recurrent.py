"""Recurrent weights as int8, in quant-dynamic and quant, run on onnxruntime's CPU provider:
LSTMs as com.microsoft.DynamicQuantizeLSTM; GRU, RNN and the LSTMs the contrib op cannot take
on int8 weights stored behind a Cast and Mul that onnxruntime folds when it loads the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.dynamic import QuantDynamicPass
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import collect, data
from tests.helpers import cosine, run_ort

SEQ, BATCH, INPUT, HIDDEN = 7, 3, 24, 16
FLOAT = onnx.TensorProto.FLOAT


def lstm_model(
    directions: int = 2,
    *,
    layout: int = 0,
    peepholes: bool = True,
    op: str = "LSTM",
    hidden: int = HIDDEN,
) -> onnx.ModelProto:
    """``X -> LSTM`` with every optional input but sequence_lens; Y feeds a Relu, and Y_h
    and Y_c are graph outputs themselves (each of the three outputs has a reader)."""
    rng = np.random.default_rng(0)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    shape_x = (BATCH, SEQ, INPUT) if layout else (SEQ, BATCH, INPUT)
    state = (BATCH, directions, hidden) if layout else (directions, BATCH, hidden)
    arrays = {
        "W": rng.standard_normal((directions, gates * hidden, INPUT)) * 0.3,
        "R": rng.standard_normal((directions, gates * hidden, hidden)) * 0.3,
        "B": rng.standard_normal((directions, 2 * gates * hidden)) * 0.1,
        "h0": rng.standard_normal(state) * 0.5,
    }
    inputs = ["X", "W", "R", "B", "", "h0"]
    outputs = ["Y", "Y_h"]
    if op == "LSTM":
        arrays["c0"] = rng.standard_normal(state) * 0.5
        inputs.append("c0")
        outputs.append("Y_c")
        if peepholes:
            arrays["P"] = rng.standard_normal((directions, 3 * hidden)) * 0.2
            inputs.append("P")
    sequence = (BATCH, SEQ, directions, hidden) if layout else (SEQ, directions, BATCH, hidden)
    shapes = {"y": sequence, "Y_h": state, "Y_c": state}
    direction = "bidirectional" if directions == 2 else "forward"
    attributes = {"hidden_size": hidden, "direction": direction}
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
    got = run_ort(io.to_bytes(model), feed)
    assert len(got) == 3
    for want, have in zip(reference, got, strict=True):
        assert want.shape == have.shape
        assert np.abs(want - have).max() < 0.03  # tanh-bounded outputs: |y| < 1


def test_per_tensor_lstm_weights_get_one_scale_per_direction():
    model, _ = quantized(lstm_model(2), per_channel=False)
    node = next(n for n in model.graph if n.op_type == "DynamicQuantizeLSTM")
    assert initializer(model, node.inputs[8].name).shape == (2,)
    assert initializer(model, node.inputs[10].name).shape == (2,)
    _assert_close_on_ort(lstm_model(2), model, 0.05)


def test_narrow_storage_keeps_the_lstm_loadable_and_a_quarter_of_the_bytes(tmp_path):
    proto = lstm_model(2, peepholes=False)
    model, _ = quantized(proto, narrow_storage=True)
    saved = io.save(model, tmp_path / "q.onnx")
    weights = sum(t.ByteSize() for t in proto.graph.initializer if t.name in ("W", "R"))
    assert saved.bytes_on_disk < len(proto.SerializeToString()) - 0.7 * weights
    _assert_close_on_ort(proto, saved.path, 0.03)


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_small_recurrent_weights_stay_float_with_the_reason(caplog, op):
    with caplog.at_level(logging.DEBUG):
        model, modified = quantized(lstm_model(1, op=op), min_weight_elements=10**6)
    assert not modified and [n.op_type for n in model.graph] == [op, "Relu"]
    assert "W and R hold" in caplog.text


def test_a_standard_onnx_lstm_computes_in_float_on_stored_int8_weights():
    """fused=False: no contrib op, so the LSTM stays, reading int8 weights dequantized by a
    Cast and a Mul (it stayed float before)."""
    proto = lstm_model(2)
    model, modified = quantized(proto, op_types=("LSTM",), fused=False)
    assert modified
    _assert_stored(proto, model, "LSTM", 2)
    _assert_close_on_ort(proto, model, 0.03)


def test_a_batch_first_lstm_gets_stored_int8_weights_since_the_contrib_op_has_no_layout():
    from onnx.reference import ReferenceEvaluator

    proto = lstm_model(1, layout=1)
    model, modified = quantized(proto, op_types=("LSTM",))
    assert modified
    lstm = _assert_stored(proto, model, "LSTM", 1)
    assert lstm.attributes.get_int("layout") == 1
    # onnxruntime's CPU LSTM refuses layout=1; onnx's reference evaluator runs it.
    feed = inputs(layout=1)
    want = ReferenceEvaluator(proto).run(None, feed)
    got = ReferenceEvaluator(io.serialize_proto(model)).run(None, feed)
    assert max(np.abs(a - b).max() for a, b in zip(want, got, strict=True)) < 0.03


def test_an_lstm_whose_weight_is_a_graph_input_stays_float(caplog):
    proto = lstm_model(1)
    proto.graph.input.append(oh.make_tensor_value_info("R", FLOAT, [1, 4 * HIDDEN, HIDDEN]))
    with caplog.at_level(logging.DEBUG):
        model, modified = quantized(proto, op_types=("LSTM",))
    assert not modified
    assert "graph input" in caplog.text


def _assert_stored(proto: onnx.ModelProto, model: ir.Model, op: str, directions: int):
    """``op``'s W and R are ``Cast(int8 codes) * scales`` with one symmetric scale per gate
    row ([D, G, 1], max |row| / 127), each within half a step of the float weight; returns
    the node."""
    (node,) = [n for n in model.graph if n.op_type == op]
    floats = {t.name: onh.to_array(t) for t in proto.graph.initializer}
    for position, source in ((1, "W"), (2, "R")):
        mul = node.inputs[position].producer()
        assert mul is not None and mul.op_type == "Mul"
        cast = mul.inputs[0].producer()
        assert cast is not None and cast.op_type == "Cast"
        codes = initializer(model, cast.inputs[0].name)
        scale = initializer(model, mul.inputs[1].name)
        w = floats[source]
        assert codes.dtype == np.int8 and codes.shape == w.shape
        assert scale.shape == (directions, w.shape[1], 1)
        np.testing.assert_allclose(scale, np.abs(w).max(axis=2, keepdims=True) / 127, rtol=1e-6)
        assert np.all(np.abs(codes * scale - w) <= scale / 2 + 1e-7)
        assert source not in model.graph.initializers  # the float weight is gone
    return node


def _assert_close_on_ort(proto: onnx.ModelProto, model: ir.Model | Path, bound: float) -> None:
    """The quantized ``model`` (or its saved file) within ``bound`` of ``proto`` on ``inputs``."""
    feed = inputs()
    reference = run_ort(proto.SerializeToString(), feed)
    got = run_ort(model if isinstance(model, Path) else io.to_bytes(model), feed)
    assert max(np.abs(a - b).max() for a, b in zip(reference, got, strict=True)) < bound


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("op", ["GRU", "RNN"])
def test_gru_and_rnn_compute_in_float_on_weights_stored_as_int8_per_gate_row(op, directions):
    proto = lstm_model(directions, op=op)
    model, modified = quantized(proto)
    assert modified
    _assert_stored(proto, model, op, directions)
    _assert_close_on_ort(proto, model, 0.05)  # tanh-bounded outputs: |y| < 1
    # Standard ops only: no com.microsoft import that nothing uses.
    assert "com.microsoft" not in model.opset_imports


def test_onnxruntime_folds_the_stored_weights_when_it_loads_the_model(tmp_path):
    """The layer then runs on float weights, as fast as before: no Cast or Mul is left in
    the graph onnxruntime runs, and the GRU reads initializers."""
    import onnxruntime as ort

    model, _ = quantized(lstm_model(2, op="GRU"))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    serialized = io.to_bytes(model)
    ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(options.optimized_model_filepath)
    assert [n.op_type for n in optimized.graph.node] == ["GRU", "Relu"]
    constants = {t.name for t in optimized.graph.initializer}
    assert set(optimized.graph.node[0].input[1:3]) <= constants


def test_a_weight_two_grus_read_is_stored_and_dequantized_once():
    proto = lstm_model(1, op="GRU")
    proto.graph.node.append(oh.make_node("GRU", ["X", "W", "R"], ["Y2"], hidden_size=HIDDEN))
    proto.graph.output.append(oh.make_tensor_value_info("Y2", FLOAT, [SEQ, 1, BATCH, HIDDEN]))
    model, _ = quantized(proto)
    grus = [n for n in model.graph if n.op_type == "GRU"]
    assert grus[0].inputs[1] is grus[1].inputs[1] and grus[0].inputs[2] is grus[1].inputs[2]
    assert [n.op_type for n in model.graph].count("Cast") == 2


def test_narrow_storage_stores_gru_scales_in_float16_and_a_quarter_of_the_bytes(tmp_path):
    proto = lstm_model(2, op="GRU")
    model, _ = quantized(proto, narrow_storage=True)
    saved = io.save(model, tmp_path / "q.onnx")
    weights = sum(t.ByteSize() for t in proto.graph.initializer if t.name in ("W", "R"))
    assert saved.bytes_on_disk < len(proto.SerializeToString()) - 0.7 * weights
    _assert_close_on_ort(proto, saved.path, 0.03)


def _big_matmul_then_gru() -> onnx.ModelProto:
    """A GRU of hidden size 32 (5,664 floats with its bias and initial state) after a
    MatMul of 24,576: 18.7 % of the float weight bytes."""
    proto = lstm_model(1, op="GRU", hidden=32)
    weight = np.random.default_rng(2).standard_normal((1024, INPUT)) * 0.05
    proto.graph.initializer.append(onh.from_array(weight.astype(np.float32), "M"))
    proto.graph.node.insert(0, oh.make_node("MatMul", ["X0", "M"], ["X"]))
    proto.graph.input[0].CopyFrom(oh.make_tensor_value_info("X0", FLOAT, [SEQ, BATCH, 1024]))
    onnx.checker.check_model(proto, full_check=True)
    return proto


@pytest.mark.parametrize(("options", "stored"), [({}, True), ({"rnn": False}, False)])
def test_static_quant_stores_gru_weights_as_int8_unless_rnn_is_off(options, stored):
    """Found in an audit (NSNet2, whose two GRUs hold 71 % of its weights): they stayed
    float, and the quantized file kept 79 % of the bytes."""
    model = io.load(_big_matmul_then_gru())  # W and R: 5,376 weights, past quant's floor
    quant = QuantPass(**options)
    dataset = data.prepare(data.specs_from_model(model), None)
    quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    gru = next(n for n in model.graph if n.op_type == "GRU")
    assert (gru.inputs[1].producer() is not None) is stored
    assert "QuantizeLinear" in [n.op_type for n in model.graph]  # the MatMul's input, either way


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
    got = run_ort(io.to_bytes(model), feed)
    # The MatMul's QDQ and the LSTM's int8 weights together, on tanh-bounded outputs.
    assert max(np.abs(a - b).max() for a, b in zip(reference, got, strict=True)) < 0.08


@pytest.mark.parametrize(
    ("sets", "note"), [((), "1 DynamicQuantizeLSTM"), (("quant.lstm=false",), "")]
)
def test_the_summary_says_which_nodes_static_quant_gives_scales_set_per_run(sets, note):
    """Their activations' scales come from each run, not from the calibration the summary
    reports: a CRNN's two LSTMs and SLANet's Loop body said nothing of it (sweep 12)."""
    proto = _matmul_then_lstm()
    feed = np.random.default_rng(4).standard_normal((8, SEQ, BATCH, 32)).astype(np.float32)
    result = onnx_shrink.shrink(proto, "quant", sets=sets, calibration={"X0": feed}, check=False)
    step = result.steps[0]
    assert step.calibration_samples == 8
    assert step.note == (f"int8 scales set per run in {note}" if note else "")


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
    return cosine(reference, got)


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


@pytest.mark.parametrize(
    ("options", "reason"),
    [({}, "W and R hold 1920 < 4096 elements"), ({"rnn": False}, "quant.rnn=false")],
)
def test_static_quant_of_a_gru_alone_says_why_nothing_was_quantized(caplog, options, reason):
    # It said "the model has no node of a type it quantizes", as if GRUs were unknown to it.
    model = io.load(lstm_model(1, op="GRU"))  # under quant's 4096-element floor
    quant = QuantPass(**options)
    dataset = data.prepare(data.specs_from_model(model), None)
    with caplog.at_level(logging.WARNING):
        result = quant.bind(collect.collect(model, quant.requests(model), dataset))(model)
    assert not result.modified
    assert f"no node could be quantized (1 GRU: {reason})" in caplog.text


def test_a_quant_only_naming_no_node_says_so_beside_a_gru():
    """Found in review: the GRU's reason hid that quant.only named no node it quantizes."""
    from onnx_shrink.passes.quant import float_reasons, placement

    model = io.load(lstm_model(1, op="GRU"))
    graph = model.graph
    small = QuantPass()._dynamic_rules.float_reasons(model)  # the GRU is under the element floor
    unnamed = placement.Exclusions(only=("nope",))
    assert float_reasons.summary(graph, unnamed, {}, small) == (
        " (quant.only names no node it quantizes: nope)"
    )
    named = float_reasons.summary(graph, placement.Exclusions(only=("rnn",)), {}, small)
    assert "1 GRU: W and R hold" in named
