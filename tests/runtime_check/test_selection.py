"""Outputs a TopK chooses and orders (an NMS-free detector's): their reordered rows are no
measure of a change, so the check says so, and the accuracy target measures the values the
TopK chose from (isbnx's YOLOv10-style model: fp16 read relative error 0.64 with the same
detections, and quant.max_error=0.05 kept 135 nodes float chasing it)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.helper as oh

import onnx_shrink
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant import value_types
from onnx_shrink.runtime_check import check_notes, selection
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check.checker import compare
from tests.helpers import make_model, save_proto

F = onnx.TensorProto.FLOAT
ANCHORS, FEATURES, KEPT = 64, 8, 32


def _detector(score_noise: float = 0.0) -> onnx.ModelProto:
    """Per anchor a box (MatMul) and a score (MatMul, Sigmoid); TopK keeps the KEPT best
    scored, whose boxes GatherElements takes: ``detections`` [N, KEPT, 5] (box, score). The
    scores lie close together, so a small change reorders them. ``features`` (Relu of the
    input) is an output no selection orders. ``score_noise``: a change of the score weights,
    relative to them."""
    rng = np.random.default_rng(20261206)
    w_score = rng.standard_normal((FEATURES, 1))
    w_score += score_noise * rng.standard_normal((FEATURES, 1))
    nodes = [
        oh.make_node("MatMul", ["x", "w_box"], ["boxes"], name="box_head"),
        oh.make_node("MatMul", ["x", "w_score"], ["logits"], name="score_head"),
        oh.make_node("Sigmoid", ["logits"], ["scores3"]),
        oh.make_node("Squeeze", ["scores3", "last"], ["scores"]),
        oh.make_node("TopK", ["scores", "k"], ["best", "index"], name="topk"),
        oh.make_node("Unsqueeze", ["index", "last"], ["index3"]),
        oh.make_node("Tile", ["index3", "repeats"], ["index_boxes"]),
        oh.make_node("GatherElements", ["boxes", "index_boxes"], ["kept"], axis=1),
        oh.make_node("Unsqueeze", ["best", "last"], ["best3"]),
        oh.make_node("Concat", ["kept", "best3"], ["detections"], axis=2),
        oh.make_node("Relu", ["x"], ["features"]),
    ]
    inits = {
        "w_box": (100 * rng.standard_normal((FEATURES, 4))).astype(np.float32),
        "w_score": (0.01 * w_score).astype(np.float32),
        "last": np.array([2], np.int64),
        "k": np.array([KEPT], np.int64),
        "repeats": np.array([1, 1, 4], np.int64),
    }
    return make_model(
        nodes,
        [oh.make_tensor_value_info("x", F, ["N", ANCHORS, FEATURES])],
        [
            oh.make_tensor_value_info("detections", F, ["N", KEPT, 5]),
            oh.make_tensor_value_info("features", F, ["N", ANCHORS, FEATURES]),
        ],
        inits,
    )


def _inputs(tmp_path, samples: int = 8):
    x = np.random.default_rng(7).standard_normal((samples, ANCHORS, FEATURES), np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    return tmp_path / "x.npz"


def test_a_topk_orders_the_detections_but_not_the_features_and_they_come_from_three_values():
    model = io.load(_detector())
    value_types.infer_types(model)  # sources are told by their types
    ordered = selection.ordered_outputs(model.graph)
    assert {value.name: node.name for value, node in ordered.items()} == {"detections": "topk"}
    detections = model.graph.outputs[0]
    # What the TopK ranks, and the boxes GatherElements takes rows of; not the ordered ones.
    assert {v.name for v in selection.sources(model.graph, detections)} == {"scores", "boxes"}
    assert selection.sources(model.graph, model.graph.outputs[1]) == []


def test_a_topk_whose_choice_is_mixed_into_the_values_orders_nothing():
    """A mixture of experts' router: TopK picks 2 of 4 experts, whose weights a MatMul mixes
    into the hidden state (2 wide, as k: its order does not carry through a MatMul), and an
    output of the TopK's values without an axis of k; only the chosen rows are ordered."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4] router, float[N, 2, 2] experts) => (float[N, 2] mixed, float[N] best,
                                                      float[N, 2] chosen) {
      k = Constant <value = int64[1] {2}> ()
      one = Constant <value = int64[1] {1}> ()
      weights, index = TopK (router, k)
      row = Unsqueeze (weights, one)
      mixed3 = MatMul (row, experts)
      mixed = Squeeze (mixed3, one)
      best = ReduceMax <keepdims = 0, axes = [1]> (weights)
      chosen = Identity (weights)
    }
    """
    model = io.load(onnx.parser.parse_model(text))
    ordered = selection.ordered_outputs(model.graph)
    assert [value.name for value in ordered] == ["chosen"]


def test_measurements_compare_the_chosen_from_values_in_place_of_the_ordered_output():
    view = io.load(_detector())
    added = combined_mod.add_scored_outputs(view)
    assert sorted(added) == ["boxes_scored", "scores_scored"]
    compared = [view.graph.outputs[i].name for i in combined_mod.compared_outputs(view, "test")]
    assert compared == ["features", *added]
    # Without the chosen-from values beside it, an ordered output is still measured.
    alone = io.load(_detector())
    alone.graph.outputs.pop(1)
    assert [alone.graph.outputs[i].name for i in combined_mod.compared_outputs(alone, "t")] == [
        "detections"
    ]


def test_the_check_says_the_error_of_reordered_rows_overstates_the_change(tmp_path):
    reference = save_proto(_detector(), tmp_path / "ref.onnx")
    candidate = save_proto(_detector(score_noise=0.05), tmp_path / "cand.onnx")
    report = compare(reference, candidate, _inputs(tmp_path))
    worst = report.large_errors[0]
    assert worst is not None and worst.name == "detections"
    assert report.ordered_by == (("detections", "TopK 'topk'"),)
    note = next(line for line in check_notes.notes(report) if line.startswith("large error"))
    assert "TopK 'topk' chooses and orders its rows" in note
    assert "--sensitivity ranks" not in note  # no layer of this model moved a box
    assert note.endswith("which quant.max_error and --sensitivity measure instead")
    # After fp16, which has neither: where to look, no more.
    (after_fp16,) = check_notes.notes(report, ("fp16",))
    assert after_fp16.endswith("--layers shows the error of the values it chooses from")


def test_the_accuracy_target_is_met_on_the_values_the_topk_chose_from(tmp_path):
    data = _inputs(tmp_path, samples=16)
    result = onnx_shrink.shrink(
        str(save_proto(_detector(), tmp_path / "m.onnx")),
        "quant",
        sets=("quant.max_error=0.05",),
        data=str(data),
        check=onnx_shrink.CheckOptions(data=str(data), latency_runs=0),
    )
    (outcome,) = result.accuracy_targets
    # Every layer quantized meets it on boxes and scores; the detections' rows still move.
    assert outcome.met and outcome.added == ()
    assert outcome.error <= 0.05
    detections = result.verification.numeric.outputs[0]
    assert detections.name == "detections" and detections.relative_error > 0.05
