"""Quantization sensitivity: every quantized layer measured alone, ranked, with an exact hint."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shlex
import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink import FoldPass, shrink
from onnx_shrink.compiler import io, spec
from onnx_shrink.console import sensitivity_lines
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.quant import placement, value_types
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import (
    checker,
    collect,
    layer_sensitivity,
    sensitivity_runs,
)
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import progress as progress_mod
from onnx_shrink.runtime_check import sensitivity as sens
from onnx_shrink.runtime_check.sensitivity_report import (
    HINT_LAYERS,
    LayerSensitivity,
    SensitivityReport,
)
from onnx_shrink.wording import human_bytes

HARD = "/head/head.1/Gemm"


def _folded() -> ir.Model:
    return FoldPass()(io.load(digits.MODEL_PATH)).model


def _dataset(model: ir.Model) -> data_mod.Dataset:
    return data_mod.prepare(data_mod.specs_from_model(model), digits.TEST_DATA_PATH)


def _with_hard_layer(model: ir.Model) -> ir.Model:
    """One output row of HARD's weight 1000x larger, all negative, with a negative bias: the
    unit is dead after the Relu (the float model barely notices), but one per-tensor weight
    scale for the whole matrix now rounds every other row to a few levels."""
    node = next(n for n in model.graph if n.name == HARD)
    weight, bias = node.inputs[1], node.inputs[2]
    w, b = weight.const_value.numpy().copy(), bias.const_value.numpy().copy()
    w[0] = -1000 * np.abs(w).max() * np.abs(w[0] + 1e-3) / np.abs(w[0] + 1e-3).max()
    b[0] = -1.0
    weight.const_value = ir.tensor(w, name=weight.name)
    bias.const_value = ir.tensor(b, name=bias.name)
    return model


def _quantized(
    model: ir.Model, quant: QuantPass, dataset: data_mod.Dataset, stats=None
) -> ir.Model:
    if stats is None:
        stats = collect.collect(model, quant.requests(model), dataset)
    copy = model.clone()
    io.unshare_tensors(copy)
    return quant.bind(stats)(copy).model


def _error(model: ir.Model, candidate: ir.Model, dataset: data_mod.Dataset):
    return checker.compare(io.to_bytes(model), io.to_bytes(candidate), dataset).outputs[0]


def test_every_quantized_layer_is_listed_once_with_finite_errors():
    model = _folded()
    dataset = _dataset(model)
    before = io.to_bytes(model)
    report = layer_sensitivity(model, QuantPass(), dataset, batch_layers=3)
    assert io.to_bytes(model) == before  # the caller's model is not touched
    stats = collect.collect(model, QuantPass().requests(model), dataset)
    probe = model.clone()
    value_types.infer_types(probe)
    stats = QuantPass().completed_statistics(probe, stats)  # as the pass plans
    planned = placement.plan(probe.graph, stats, placement.Exclusions()).nodes
    positions = {node: i for i, node in enumerate(probe.graph)}
    assert sorted(layer.position for layer in report.layers) == sorted(
        positions[n] for n in planned
    )
    # one run per batch of layers, and those measuring the hint
    assert report.runs == math.ceil(len(planned) / 3) + sens.HINT_RUNS
    assert report.samples == 450
    assert not report.unmeasured
    for layer in report.layers:
        assert math.isfinite(layer.relative_error) and layer.relative_error >= 0, layer
        assert -1 <= layer.cosine <= 1 and layer.nonfinite == 0
    errors = [layer.relative_error for layer in report.layers]
    assert errors == sorted(errors, reverse=True)
    # How layers are batched into combined models changes nothing but float rounding: the
    # copies share the float layers before their quantized ones, and onnxruntime picks those
    # layers' kernels (blocked layouts, fusions) by what reads them, which differs with the
    # batch (digits: 5e-7 relative, since a float Conv reads a float MaxPool's output, not
    # the DQ the Add quantized alone reads).
    one_run = layer_sensitivity(model, QuantPass(), dataset, batch_layers=100)
    assert one_run.runs == 1 + sens.HINT_RUNS
    assert [x.relative_error for x in one_run.layers] == pytest.approx(errors, rel=1e-5)


def test_a_copy_in_the_combined_model_measures_what_a_separate_run_measures():
    model = _folded()
    dataset = _dataset(model)
    quant = QuantPass()
    report = layer_sensitivity(model, quant, dataset)
    base = model.clone()  # names the nodes fold left unnamed, as sensitivity() does
    # The full pass's statistics: onnxruntime fuses the statistics graph differently for
    # other requested tensors, and a range can then differ in its last bits.
    stats = collect.collect(base, quant.requests(base), dataset)
    for layer in report.layers:
        key = layer.node or base.graph.node(layer.position).name
        alone = _quantized(base, dataclasses.replace(quant, only=(key,)), dataset, stats)
        separate = _error(base, alone, dataset)
        # The combined runs take one sample at a time, the separate one the data's 64:
        # onnxruntime's kernels round in other places per batch size (1e-6 apart here).
        assert layer.relative_error == pytest.approx(separate.relative_error, rel=1e-5), key
        assert layer.cosine == pytest.approx(separate.cosine, rel=1e-6), key
        assert layer.snr_db == pytest.approx(separate.snr_db, rel=1e-5), key


def test_the_hint_is_measured_against_the_whole_pass_on_the_same_samples():
    """Single-layer errors do not add up (on PP-OCRv4 rec keeping the three worst float made
    the error worse): the report says what the hint does, as the two models really give it."""
    model = _folded()
    dataset = _dataset(model)
    quant = QuantPass()
    report = layer_sensitivity(model, quant, dataset)
    effect = report.hint_effect
    assert effect is not None and effect.layers == 3 and not effect.without_bias_correction
    hinted = dataclasses.replace(quant, exclude=report.exclude_patterns(3))
    for candidate, expected, size in (
        (quant, effect.whole, effect.whole_bytes),
        (hinted, effect.hinted, effect.hinted_bytes),
    ):
        quantized = _quantized(model, candidate, dataset)
        error = _error(model, quantized, dataset).relative_error
        assert error == pytest.approx(expected, rel=1e-6)
        assert size == len(io.to_bytes(quantized))  # what keeping them float costs
    assert effect.whole_bytes < effect.hinted_bytes
    assert effect.helps and "with these 3 in float (" in effect.summary()
    assert human_bytes(effect.hinted_bytes) in effect.summary()
    assert "does not help" in dataclasses.replace(effect, hinted=effect.whole).summary()


def test_the_combined_model_shares_the_float_weights_and_names_quantized_ones_apart():
    base = _folded().clone()
    dataset = _dataset(base)
    quant = QuantPass()
    stats = collect.collect(base, quant.requests(base), dataset)
    keys = ["/head/head.1/Gemm", "/head/head.4/Gemm", base.graph.node(0).name]
    alone = [dataclasses.replace(quant, only=(key,)) for key in keys]
    combined = sensitivity_runs.Runner(base, quant, stats, dataset, "cpu", None).combined(alone)
    initializers = combined.graph.initializers
    for name, value in base.graph.initializers.items():
        assert initializers[name].const_value is value.const_value  # shared, not copied
    own = [name for name in initializers if name not in base.graph.initializers]
    assert own and all(name.rsplit("#", 1)[-1] in ("0", "1", "2") for name in own)
    assert {"head.1.weight_quantized#0", "head.4.weight_quantized#1"} <= set(own)
    proto = io.serialize_proto(combined)
    onnx.checker.check_model(proto)
    assert [o.name for o in proto.graph.output] == ["logits", "logits#0", "logits#1", "logits#2"]
    assert io.tensor_bytes(combined) < 1.5 * io.tensor_bytes(base)


def test_a_layer_hard_to_quantize_ranks_first_and_the_hint_excluding_it_helps():
    model = _with_hard_layer(_folded())
    dataset = _dataset(model)
    quant = QuantPass(per_channel=False)
    report = layer_sensitivity(model, quant, dataset)
    assert report.layers[0].node == HARD
    assert report.layers[0].relative_error > 10 * report.layers[1].relative_error
    hint = report.exclude_hint(1)
    assert hint == f"--set quant.exclude={HARD}"
    (excluding,) = spec.parse_spec("quant", [shlex.split(hint)[1], "quant.per_channel=no"])
    assert excluding == dataclasses.replace(quant, exclude=(HARD,))
    full = _error(model, _quantized(model, quant, dataset), dataset)
    kept = _error(model, _quantized(model, excluding, dataset), dataset)
    assert kept.relative_error < full.relative_error / 5
    assert kept.cosine > full.cosine


def _report(names: list[str], excluded: tuple[str, ...] = ()) -> SensitivityReport:
    layers = tuple(
        LayerSensitivity(name, "MatMul", i, "y", 1.0 / (i + 1), 0.9, 10.0, 1.0, 0)
        for i, name in enumerate(names)
    )
    return SensitivityReport(layers, 1, "d", False, 1, 0.0, (), excluded)


def test_an_inert_layer_the_hint_names_as_a_companion_is_not_said_left_out():
    """A detector: node_add_55 was in the hint, as a Conv's quantized producer, and the note
    under it said it was "left out, as float they change nothing"."""
    conv, add, pool, worse, *rest = _report(["/conv", "/add", "/pool", "/head", "/a", "/b"]).layers
    report = SensitivityReport(
        (
            dataclasses.replace(conv, companions=("/add",)),
            dataclasses.replace(add, inert=True),
            dataclasses.replace(pool, inert=True),
            worse,
            *rest,
        ),
        1,
        "d",
        False,
        1,
        0.0,
        (),
    )
    assert report.exclude_hint(2) == "--set quant.exclude=/conv,/add,/head"
    (shared, left_out) = report.hint_notes(2)
    assert shared.startswith("/conv: kept float alone, would still read a quantized input")
    assert left_out.startswith("/pool: left out, as float they change nothing")


def _excluded_by(hint: str, names: list[str]) -> list[str]:
    (quant,) = spec.parse_spec("quant", [shlex.split(hint)[1]])
    exclusions = placement.Exclusions(nodes=quant.exclude)
    return [n for n in names if exclusions.excludes(ir.Node("", "MatMul", [], name=n))]


def test_the_hint_excludes_exactly_the_worst_names_whatever_they_contain():
    names = ["a/b,c", "/enc/layer.1/MatMul", "x[0", " pad", "/enc/layer11/MatMul", "plain/n.1"]
    report = _report(names)
    hint = report.exclude_hint(4)
    assert _excluded_by(hint, names) == names[:4]
    notes = " ".join(report.hint_notes(4))
    assert "a/b,c" in notes and "regex" in notes
    # Never all six: keeping every layer float would quantize nothing.
    assert report.exclude_hint(6).count(",") == 4
    assert _excluded_by(report.exclude_hint(6), names) == names[:5]
    plain = _report(["/a/b.c", "/d/e"], excluded=("/keep/.*",))
    assert plain.exclude_hint(1) == "--set 'quant.exclude=/keep/.*,/a/b.c'"  # '*': quoted
    assert plain.hint_notes(1) == ()


def test_the_hint_never_keeps_every_layer_that_matters_float_and_says_how_many_it_keeps():
    """DTLN: of 3 layers, one inert; the hint kept the other two float, so the pass it
    measured quantized nothing ("quant: no node could be quantized" reached the console).
    openWakeWord's mel model: "to keep the 3 worst in float" named 2."""
    layers = _report(["/a", "/b", "/c"]).layers
    inert = SensitivityReport(
        (layers[0], layers[1], dataclasses.replace(layers[2], inert=True)),
        1,
        "d",
        False,
        1,
        0.0,
        (),
    )
    assert inert.exclude_hint(3) == "--set quant.exclude=/a"
    assert inert.hint_caption(3) == "to keep 1 of the 2 worst in float: --set quant.exclude=/a"
    three = _report(["/a", "/b", "/c"])
    assert three.hinted(3) == 2
    assert three.hint_caption(3).startswith("to keep 2 of the 3 worst in float: ")
    assert three.hint_caption(2) == "to keep the 2 worst in float: --set quant.exclude=/a,/b"


def test_unnamed_layers_are_measured_but_left_out_of_the_hint_with_a_note():
    report = _report(["", "/named"])
    assert report.layers[0].label == "<unnamed MatMul #0>"
    assert report.exclude_hint(2) == "--set quant.exclude=/named"
    assert "<unnamed MatMul #0>" in report.hint_notes(2)[0]
    assert report.exclude_hint(1) is None
    assert json.dumps(report.to_dict())


def test_unnamed_nodes_are_measured_like_named_ones():
    """Unnamed nodes went unmeasured ("share their name"): the clone does not name them. The
    same model with and without names gives the same errors, the unnamed ones so labelled,
    and the caller's model keeps its empty names."""
    named = _folded()
    dataset = _dataset(named)
    expected = {
        x.position: x.relative_error for x in layer_sensitivity(named, QuantPass(), dataset).layers
    }
    unnamed = _folded()
    for node in unnamed.graph:
        node.name = ""
    report = layer_sensitivity(unnamed, QuantPass(), dataset)
    assert not report.unmeasured and all(not node.name for node in unnamed.graph)
    assert {x.position: x.relative_error for x in report.layers} == pytest.approx(expected)
    assert all(x.label.startswith("<unnamed ") for x in report.layers)
    assert report.exclude_hint(1) is None
    # Found in review: a pattern the pass matches against "" matched the names given here,
    # and the Gemms the pass quantizes went unmeasured.
    patterned = layer_sensitivity(unnamed, QuantPass(exclude=(".*Gemm.*",)), dataset)
    assert {x.position for x in patterned.layers} == set(expected)


def test_unnamed_nodes_keep_their_label_when_quant_converts_the_opset():
    """Found in review: per-channel quant converts opset 11 to 13, which replaces the nodes;
    the names given to unnamed ones leaked into the report and the hint."""
    proto = io.parse_bytes(io.to_bytes(_folded()))
    proto.opset_import[0].version = 11
    for node in proto.graph.node:
        node.name = ""
    old = io.load(proto)
    report = layer_sensitivity(old, QuantPass(), _dataset(old))
    assert report.layers and all(x.label.startswith("<unnamed ") for x in report.layers)
    assert report.exclude_hint(3) is None


@pytest.mark.parametrize("opset", [11, 17])
def test_nodes_without_a_name_at_all_stay_unnamed_in_the_report_and_the_hint(opset):
    """Found in an audit (CenterFace, opset 9, as fold leaves it): a node whose name is None,
    not "", is given one by the model's clone (node_Conv_0); after the opset conversion
    replaced the nodes, that name passed for the caller's, and the hint named nodes the model
    does not have."""
    proto = io.parse_bytes(io.to_bytes(_folded()))
    proto.opset_import[0].version = opset
    old = io.load(proto)
    for node in old.graph:
        node.name = None
    report = layer_sensitivity(old, QuantPass(), _dataset(old))
    assert report.layers and all(x.label.startswith("<unnamed ") for x in report.layers)
    assert report.exclude_hint(3) is None
    assert all(node.name is None for node in old.graph)


def test_shrink_reports_the_sensitivity_of_the_model_before_quant():
    result = _digits_sensitivity()
    model = _folded()
    direct = layer_sensitivity(model, QuantPass(), _dataset(model))
    got = result.sensitivity
    assert [x.position for x in got.layers] == [x.position for x in direct.layers]
    assert [x.relative_error for x in got.layers] == pytest.approx(
        [x.relative_error for x in direct.layers], rel=1e-9
    )
    figures = result.to_dict()["sensitivity"]
    assert figures["exclude_hint"].startswith("--set quant.exclude=")
    assert shrink(digits.MODEL_PATH, "fold", check=False).to_dict()["sensitivity"] is None
    with pytest.raises(ShrinkError, match="no quant pass; nothing to measure"):
        shrink(digits.MODEL_PATH, "fold", check=False, sensitivity=True)


def test_the_reports_rerun_of_the_passes_before_quant_is_its_time_not_the_compiles(
    monkeypatch,
):
    """The report reloads the model and re-runs the passes before quant: that was counted in
    compile_seconds. A slow reload (0.5 s here) now shows in the report's seconds alone."""
    from onnx_shrink.runtime_check import sensitivity

    unlist = sensitivity.graph_edit.unlist_weight_inputs

    def slow_unlist(model):  # called by the report's reload only (preflight has its own)
        time.sleep(0.5)
        return unlist(model)

    monkeypatch.setattr(sensitivity.graph_edit, "unlist_weight_inputs", slow_unlist)
    result = _digits_sensitivity()
    assert result.sensitivity is not None and result.sensitivity.seconds >= 0.5
    assert result.compile_seconds + result.sensitivity.seconds <= result.seconds
    assert result.compile_seconds < result.seconds - 0.5


def test_cli_prints_the_ranking_and_the_hint(run_cli, digits_copy, tmp_path):
    report = tmp_path / "r.json"
    args = ["--passes", "fold,quant", "--calibration", digits.TEST_DATA_PATH, "--no-check"]
    result = run_cli(digits_copy, *args, "--sensitivity", "--report", report)
    assert result.code == 0, result.err
    assert "quantization sensitivity" in result.out
    assert "to keep the 3 worst in float: --set quant.exclude=" in result.out
    figures = json.loads(report.read_text())["sensitivity"]
    assert figures["layers"][0]["relative_error"] >= figures["layers"][-1]["relative_error"]
    hint = figures["exclude_hint"]
    again = run_cli(digits_copy, *args, *shlex.split(hint), "-o", tmp_path / "q.onnx")
    assert again.code == 0, again.err


@pytest.mark.network
def test_minilm_excluding_the_three_worst_layers_improves_the_sentence_embedding(tmp_path):
    from models.fetch import fetch
    from models.text import minilm_dataset

    model = FoldPass()(io.load(fetch("minilm"))).model
    path = minilm_dataset(tmp_path / "minilm-32.npz", n=32)
    dataset = data_mod.prepare(data_mod.specs_from_model(model), path)
    quant = QuantPass()
    report = layer_sensitivity(model, quant, dataset)
    # The weight MatMuls (q, k, v, out and two FFN in each of 3 layers); the attention
    # MatMuls of two activations stay float (placement rule 8).
    assert len(report.layers) >= 18 and not report.unmeasured
    worst = dataclasses.replace(quant, exclude=report.exclude_patterns(3))

    def embedding_cosine(candidate: QuantPass) -> float:
        quantized = _quantized(model, candidate, dataset)
        outputs = checker.compare(io.to_bytes(model), io.to_bytes(quantized), path).outputs
        return next(o for o in outputs if o.elements == 32 * 384).cosine

    assert embedding_cosine(worst) > embedding_cosine(quant)


def _digits_sensitivity(exclude: str | None = None):
    """``fold,quant`` of the digits CNN (with ``quant.exclude=exclude``) and its sensitivity."""
    return shrink(
        digits.MODEL_PATH,
        "fold,quant",
        sets=[f"quant.exclude={exclude}"] if exclude else [],
        check=False,
        calibration=digits.TEST_DATA_PATH,
        sensitivity=True,
    )


def test_the_passes_the_report_reruns_before_quant_warn_once(caplog):
    """khmersm, folded already: "fold: no change" was said twice, by the compile and by the
    report's re-run of fold on a fresh load."""
    folded = shrink(digits.MODEL_PATH, "fold", check=False).model
    with caplog.at_level(logging.WARNING):
        shrink(
            folded, "fold,quant", check=False, calibration=digits.TEST_DATA_PATH, sensitivity=True
        )
    assert caplog.text.count("fold: no change") == 1


def test_a_model_without_node_names_gets_a_hint_that_keeps_the_nodes_it_names_float(tmp_path):
    """Found in an audit (CenterFace: a torch 1.2 export naming no node): the hint had to
    leave every layer out, or named nodes that were not there. Nodes are named at load, by
    op type and position, in the compile and in the report's rerun alike, and the result
    has them unnamed again."""
    proto = onnx.load(digits.MODEL_PATH)
    for node in proto.graph.node:
        node.ClearField("name")
    path = tmp_path / "unnamed.onnx"
    onnx.save(proto, path)
    calibration = digits.TEST_DATA_PATH
    result = shrink(path, "fold,quant", check=False, calibration=calibration, sensitivity=True)
    hint = result.to_dict()["sensitivity"]["exclude_hint"]
    names = hint.removeprefix("--set quant.exclude=").split(",")
    assert names and all(re.fullmatch(r"[A-Za-z]+_\d+", name) for name in names), hint
    assert {node.name for node in result.model.graph}.isdisjoint(names)  # unnamed, as they came
    kept = shrink(
        path, "fold,quant", sets=[hint.removeprefix("--set ")], check=False, calibration=calibration
    )
    # The names are positions in the input: the nodes computing those outputs read float.
    outputs = {proto.graph.node[int(name.rsplit("_", 1)[1])].output[0] for name in names}
    excluded = [n for n in kept.model.graph if n.outputs and n.outputs[0].name in outputs]
    assert len(excluded) == len(names)
    for node in excluded:
        producer = node.inputs[0].producer()
        assert producer is None or producer.op_type != "DequantizeLinear", node.op_type


def test_the_hint_skips_layers_whose_exclusion_would_change_nothing(tmp_path):
    # With the head's Gemm already float, the MaxPool between quantized Convs ranks in the
    # top three, yet excluding it leaves the file byte-identical: its neighbours keep its
    # Q/DQ (the Add after it was so too, until a float Add's Relu stopped reading a DQ).
    report = _digits_sensitivity("/head/head.4/Gemm").sensitivity
    inert = [x.node for x in report.layers if x.inert]
    assert "/pool/MaxPool" in inert
    hint = report.exclude_hint()
    assert "/pool/MaxPool" not in hint and hint.count(",") == 3  # the user's exclusion and 3 layers
    assert any("/pool/MaxPool" in note and "change nothing" in note for note in report.hint_notes())

    def quantized(patterns: str) -> bytes:
        run = shrink(
            digits.MODEL_PATH,
            "fold,quant",
            sets=[f"quant.exclude={patterns}"],
            check=False,
            calibration=digits.TEST_DATA_PATH,
        )
        return io.to_bytes(run.model)

    patterns = shlex.split(hint)[1].split("=", 1)[1]
    assert quantized(patterns) == quantized(patterns + ",/pool/MaxPool")


def test_the_hints_measuring_runs_say_nothing_the_run_did_not(caplog):
    """Their passes said again what the user's run had said, and things of their own
    ("quant: no node could be quantized") as if of the run."""
    import logging

    with caplog.at_level(logging.WARNING):
        result = _digits_sensitivity("/no/such/node")
    assert result.sensitivity.hint_effect is not None
    assert caplog.text.count("/no/such/node") == 1, caplog.text


def test_every_statistics_logger_is_quiet_while_measuring():
    """Logger names nest on dots: collect_runs and collect_graph are collect's siblings, and
    collect_runs' "failed on N samples joined" came again during sensitivity."""
    import logging

    from onnx_shrink.runtime_check import collect_graph, collect_runs, sensitivity

    with sensitivity.quiet(*sensitivity.QUIET):
        for module in (collect_runs, collect_graph, sensitivity.collect_mod):
            assert logging.getLogger(module.__name__).getEffectiveLevel() == logging.ERROR
    assert logging.getLogger(collect_runs.__name__).getEffectiveLevel() < logging.ERROR


def _shared_input_model() -> onnx.ModelProto:
    """Two Convs read one spiky input (audio-like: quiet, with rare loud samples, which u8
    rounds to zero), three more follow their sum."""
    rng = np.random.default_rng(0)
    weights = {
        "wa": rng.normal(size=(4, 1, 5)).astype(np.float32),
        "wb": rng.normal(size=(4, 1, 5)).astype(np.float32),
        "wc": rng.normal(size=(4, 4, 3)).astype(np.float32),
        "wd": rng.normal(size=(4, 4, 3)).astype(np.float32),
        "we": rng.normal(size=(2, 4, 3)).astype(np.float32),
    }
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 1, 64] x) => (float[N, 2, 54] y) {
      a = Conv <pads = [0, 0]> (x, wa)
      b = Conv <pads = [0, 0]> (x, wb)
      s = Add(a, b)
      c = Conv <pads = [0, 0]> (s, wc)
      d = Conv <pads = [0, 0]> (c, wd)
      y = Conv <pads = [0, 0]> (d, we)
    }
    """
    proto = onnx.parser.parse_model(text)
    names = ("/a", "/b", "/add", "/c", "/d", "/e")
    for node, name in zip(proto.graph.node, names, strict=True):
        node.name = name
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in weights.items())
    onnx.checker.check_model(proto, full_check=True)
    return proto


def test_the_hint_keeps_the_inputs_of_its_layers_float_with_the_nodes_sharing_them():
    """basic-pitch's CQT reads the padded audio with pairs of Convs: the hint excluded the
    worst one, whose input stayed quantized for its twin, and changed nothing (output cosine
    0.8036 both ways). The twin comes into the hint; so does a quantized Conv producing a
    hinted layer's input (its output is always quantized)."""
    from onnx_shrink.runtime_check import sensitivity_hint

    proto = _shared_input_model()
    base = io.load(proto)
    quant = QuantPass()
    dataset = data_mod.synthetic(data_mod.specs_from_model(base), {"x": (4, 1, 64)})
    stats = quant.completed_statistics(base, collect.collect(base, quant.requests(base), dataset))
    nodes = {node.name: (i, node) for i, node in enumerate(base.graph)}

    def layer(name: str) -> LayerSensitivity:
        position, node = nodes[name]
        return LayerSensitivity(name, node.op_type, position, "y", 0.1, 0.9, 10.0, 1.0, 0)

    ranked = [layer(name) for name in ("/a", "/e", "/c", "/b", "/d")]  # worst first
    targets = [sensitivity_hint.Target(x.node, x.node, x.op_type, x.position) for x in ranked]
    caller = {node: node.name for _, node in nodes.values()}
    planned = sensitivity_hint.plan_hint(ranked, targets, base, quant, stats, caller)
    assert [(x.node, x.companions) for x in planned[:3]] == [
        ("/a", ("/b",)),  # reads x with /b
        ("/e", ("/d",)),  # reads /d's output, quantized while /d is
        ("/c", ()),  # reads the Add of /a and /b, float once both are
    ]
    report = SensitivityReport(planned, 4, "synthetic", True, 1, 0.0, ())
    # With /c too, every layer would be float: the hint stops before it.
    assert report.exclude_patterns(3) == ("/a", "/b", "/e", "/d")
    words = "to keep 2 of the 3 worst in float with their inputs (2 more nodes)"
    assert report.hint_words(3) == words
    for patterns, float_input in ((["/a"], False), (["/a", "/b"], True)):
        hinted = shrink(proto, "quant", sets=[f"quant.exclude={','.join(patterns)}"], check=False)
        q = {n.inputs[0].name for n in hinted.model.graph if n.op_type == "QuantizeLinear"}
        assert ("x" not in q) is float_input
    notes = report.hint_notes(3)
    assert any("/a" in note and "quantized input" in note for note in notes)
    assert "/c: not in the hint: with it, every layer would be float" in notes
    assert not any(note.startswith("/c") and "in the hint too" in note for note in notes)


def test_embedding_tables_are_ranked_like_the_plans_layers():
    """A Gather quant stores as int8 rows (rule 6) is a quantized layer of its own: measured
    alone and ranked, with the MatMul the plan quantizes."""
    import onnx.helper as oh

    from tests.helpers import make_model

    rng = np.random.default_rng(0)
    proto = make_model(
        [
            oh.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            oh.make_node("MatMul", ["e", "W"], ["y"], name="dense"),
        ],
        [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 5])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 5, 64])],
        {
            "table": rng.standard_normal((256, 32)).astype(np.float32),
            "W": rng.standard_normal((32, 64)).astype(np.float32),
        },
    )
    model = io.load(proto)
    ids = rng.integers(0, 256, (16, 5)).astype(np.int64)
    dataset = data_mod.prepare(data_mod.specs_from_model(model), {"ids": ids})
    report = layer_sensitivity(model, QuantPass(), dataset)
    ranked = {layer.node: layer for layer in report.layers}
    assert set(ranked) == {"embed", "dense"}
    assert ranked["embed"].op_type == "Gather" and ranked["embed"].relative_error > 0


def test_combined_runs_take_one_sample_and_a_long_measurement_says_how_long(monkeypatch, caplog):
    """Each combined run holds nine graphs' activations per sample: runs take one sample (a
    U-Net over runs of 32 peaked at 7.4 GB). Off a terminal no progress bar shows: the pace
    is logged, and a long measurement is a warning after its first run."""
    model = _folded()
    dataset = _dataset(model)  # batches of 64 images
    seen = []
    stream = sens.combined_mod.stream

    def recorded(combined, data, *args, **kwargs):
        for batch, result in stream(combined, data, *args, **kwargs):
            seen.append(batch.samples)
            yield batch, result

    monkeypatch.setattr(sens.combined_mod, "stream", recorded)
    monkeypatch.setattr(sensitivity_runs, "LONG_SECONDS", 0.0)
    with caplog.at_level(logging.INFO, logger="onnx_shrink.runtime_check.sensitivity_runs"):
        report = sens.sensitivity(model, QuantPass(), dataset, hint=False, batch_layers=2)
    assert seen and max(seen) == 1 and sum(seen) == report.samples * report.runs
    assert f"sensitivity: 7 layers: run {report.runs} of {report.runs}," in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "at the first run's pace" in warnings[0].getMessage()


def test_many_layers_on_many_samples_are_screened_then_the_worst_measured_on_all(monkeypatch):
    """Every layer on the first SCREEN_SAMPLES samples, then the REFINED_LAYERS worst of them
    again on all: those rank first with every sample's figures (the same as an unscreened
    report's), the others after them with the screening's; the report says which is which.
    Scaled down here: digits' 7 layers, 2 refined."""
    model = _folded()
    dataset = _dataset(model)  # 450 samples
    full = layer_sensitivity(model, QuantPass(), dataset, batch_layers=4, hint=False)
    assert full.screened == 0 and {x.samples for x in full.layers} == {450}
    layers = len(full.layers)
    monkeypatch.setattr(sensitivity_runs, "REFINED_LAYERS", 0)  # the screening alone
    first = layer_sensitivity(model, QuantPass(), dataset, batch_layers=4, hint=False)
    assert first.screened == 8 and {x.samples for x in first.layers} == {8}
    monkeypatch.setattr(sensitivity_runs, "REFINED_LAYERS", 2)
    report = layer_sensitivity(model, QuantPass(), dataset, batch_layers=4)
    assert layers > 2 * 2 and report.screened == 8 and report.samples == 450
    assert report.runs == math.ceil(layers / 4) + 1 + sens.HINT_RUNS
    refined, rest = report.layers[:2], report.layers[2:]
    assert {x.position for x in refined} == {x.position for x in first.layers[:2]}
    by_position = {x.position: x for x in full.layers}
    for layer in refined:
        assert layer.samples == 450
        assert layer.relative_error == pytest.approx(by_position[layer.position].relative_error)
    assert [(x.position, x.relative_error) for x in rest] == [
        (x.position, x.relative_error) for x in first.layers[2:]
    ]
    assert refined[0].relative_error >= refined[1].relative_error
    note = report.screening_note()
    assert note == (
        f"every layer was measured on the first 8 samples first, and the 2 worst again on "
        f"all 450; the {layers - 2} after them rank by their first 8 samples' figures"
    )
    assert report.to_dict()["layers"][-1]["samples"] == 8
    assert f"note: {note}" in [str(line) for line in sensitivity_lines(report)]
    # Too few samples or layers for the second look to pay: every layer on every sample.
    monkeypatch.setattr(sensitivity_runs, "REFINED_LAYERS", layers)
    assert layer_sensitivity(model, QuantPass(), dataset, hint=False).screened == 0
    monkeypatch.setattr(sensitivity_runs, "REFINED_LAYERS", 2)
    monkeypatch.setattr(sensitivity_runs, "SCREEN_SAMPLES", 225)
    assert layer_sensitivity(model, QuantPass(), dataset, hint=False).screened == 0


def test_progress_names_each_run_and_counts_its_own_samples(monkeypatch):
    """The report's progress: its calibration's phases, then each run as a phase of its own
    ("7 layers, run 1/2"; the time left from the second run on), counting the samples that
    run reads: the screening's first 8, then every sample for the worst again."""
    model = _folded()
    dataset = _dataset(model)  # 450 samples
    monkeypatch.setattr(sensitivity_runs, "REFINED_LAYERS", 2)
    calls = []

    def progress(phase: str, done: int, total: int | None = None) -> None:
        calls.append((phase, done, total))

    layer_sensitivity(model, QuantPass(), dataset, batch_layers=4, hint=False, progress=progress)
    runs = [call for call in calls if ", run " in call[0]]
    phases = list(dict.fromkeys(phase for phase, _, _ in runs))
    assert len(phases) == 3 and phases[0] == "7 layers, run 1/2"
    assert re.fullmatch(r"7 layers, run 2/2, about \d+ s left", phases[1])
    assert phases[2] == "2 worst again, run 1/1"
    # From 0, as the run's model is built and loaded (the last run's 8/8 showed meanwhile).
    for phase in phases[:2]:
        assert [(d, t) for p, d, t in runs if p == phase] == [(d, 8) for d in range(9)]
    assert [(d, t) for p, d, t in runs if p == phases[2]] == [(d, 450) for d in range(451)]
    # The calibration's, before them: the engine's phases, over the whole dataset.
    assert calls.index(runs[0]) > 0
    assert {(p, t) for p, _, t in calls[: calls.index(runs[0])]} <= {
        (phase, None) for phase in progress_mod.PHASES
    }


def test_the_hints_measurements_report_their_runs():
    """The hint's two comparisons against the float model (2 s of YOLOv8n's report) left the
    status on the hint's calibration: each names its measurement and counts its samples."""
    model = _folded()
    calls = []
    report = layer_sensitivity(
        model,
        QuantPass(),
        _dataset(model),
        hint=True,
        progress=lambda phase, done, total=None: calls.append((phase, done, total)),
    )
    k = min(HINT_LAYERS, len(report.layers))
    outputs = progress_mod.OUTPUTS
    for measurement in ("all quantized", f"{k} worst float"):
        counted = [(d, t) for p, d, t in calls if p == f"the hint: {measurement}: {outputs}"]
        assert counted[0] == (0, 450) and counted[-1] == (450, 450)
    hinted = f"the hint: {k} worst float: {progress_mod.STATISTICS}"
    assert any(p == hinted for p, _, _ in calls)
