"""Integer and boolean outputs (class ids, tags, masks) are judged by the share of elements
equal to the reference's, not by cosine: the cosine of ids reads 0.85 where a third of the
tags changed, and far below any tolerance where one tag of thousands did."""

from __future__ import annotations

import dataclasses
import re
from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_shrink import shrink
from onnx_shrink.api import CheckOptions
from onnx_shrink.compiler import io
from onnx_shrink.passes.quant.static import QuantPass
from onnx_shrink.runtime_check import combined as combined_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sensitivity as sensitivity_mod
from onnx_shrink.runtime_check.checker import check
from onnx_shrink.runtime_check.compare import ErrorAccumulator, compare_batches
from onnx_shrink.runtime_check.numeric_report import DEFAULT_TOLERANCES, Tolerances
from onnx_shrink.runtime_check.report import html_report
from tests.helpers import make_model, run_ort, save_proto

TAGS, FEATURES = 5, 8


def tagger(weight: np.ndarray) -> onnx.ModelProto:
    """x [N, T, 8] -> MatMul -> ArgMax: a tag id per position, int64 [N, T]."""
    return make_model(
        [
            onnx.helper.make_node("MatMul", ["x", "w"], ["scores"]),
            onnx.helper.make_node("ArgMax", ["scores"], ["tags"], axis=-1, keepdims=0),
        ],
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 12, FEATURES])],
        [onnx.helper.make_tensor_value_info("tags", onnx.TensorProto.INT64, ["N", 12])],
        {"w": weight},
    )


@pytest.fixture
def tagger_files(tmp_path):
    """The tagger, a copy with a perturbed weight, its data, and the share of tags they agree
    on (computed here with onnxruntime, independently of the check)."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((FEATURES, TAGS)).astype(np.float32)
    noisy = weight + 0.3 * rng.standard_normal(weight.shape).astype(np.float32)
    reference = save_proto(tagger(weight), tmp_path / "tagger.onnx")
    candidate = save_proto(tagger(noisy), tmp_path / "noisy.onnx")
    x = rng.standard_normal((20, 12, FEATURES)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    (ref_tags,) = run_ort(reference, {"x": x})
    (cand_tags,) = run_ort(candidate, {"x": x})
    agreement = float(np.mean(ref_tags == cand_tags))
    assert 0.5 < agreement < 0.99  # the perturbation changes some tags, not most
    return reference, candidate, tmp_path / "data.npz", agreement


def test_agreement_is_the_share_of_equal_elements_however_samples_are_batched():
    ref = np.array([[0, 1, 2, 2**60], [3, 3, 3, 3]], np.int64)
    cand = np.array([[0, 1, 4, 2**60 + 1], [3, 3, 3, 0]], np.int64)  # 2**60 + 1: same float64
    whole, parts = ErrorAccumulator("ids"), ErrorAccumulator("ids")
    whole.add(ref, cand)
    parts.add(ref[:1], cand[:1])
    parts.add(ref[1:], cand[1:])
    assert whole.result().agreement == parts.result().agreement == 5 / 8
    assert whole.result().integral


def test_boolean_outputs_have_an_agreement_and_float_outputs_none():
    masks = ErrorAccumulator("mask")
    masks.add(np.array([True, False, True, True]), np.array([True, True, True, True]))
    assert masks.result().agreement == 0.75
    scores = ErrorAccumulator("scores")
    scores.add(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32))
    assert scores.result().agreement is None and not scores.result().integral


def test_min_agreement_judges_integer_outputs_and_min_cosine_judges_floats():
    # One id of a thousand changes from 0 to 50: cosine 0.03, yet 99.9% of the ids hold.
    ref = np.zeros((1, 1000), np.int64)
    ref[0, 1] = 1
    cand = ref.copy()
    cand[0, 0] = 50
    floats = np.ones((1, 4), np.float32)
    batches = [({"ids": ref, "scores": floats}, {"ids": cand, "scores": -floats}, None)]
    report = compare_batches(batches, tolerances=Tolerances(min_cosine=0.9, min_agreement=0.99))
    ids, scores = report.outputs
    assert ids.cosine < 0.1 and ids.agreement == 0.999
    assert report.failures == ("output 'scores': cosine -1.000000 < min 0.9",)
    strict = compare_batches(batches, tolerances=Tolerances(min_agreement=0.9995))
    assert strict.failures == (
        "output 'ids': 99.90% of its elements equal the reference's < min agreement 0.9995",
    )


def test_a_large_change_of_an_integer_output_is_named_not_an_snr():
    ref = np.arange(10, dtype=np.int32)
    cand = np.where(ref < 5, ref, 0).astype(np.int32)
    report = compare_batches([({"ids": ref}, {"ids": cand}, None)])
    assert report.low_agreement.name == "ids" and not report.large_errors


def test_check_with_default_tolerances_fails_a_tagger_whose_tags_changed(run_cli, tagger_files):
    reference, candidate, data, agreement = tagger_files
    result = run_cli("check", reference, candidate, "--data", data, "--runs", "0")
    assert result.code == 1, result.err
    assert (
        f"output 'tags': {agreement:.2%} of its elements equal the reference's < min agreement "
        f"{DEFAULT_TOLERANCES.min_agreement}" in result.err
    )
    assert f"large change: {agreement:.2%} of the elements of 'tags'" in " ".join(
        result.out.split()
    )
    loose = run_cli(
        "check", reference, candidate, "--data", data, "--runs", "0", "--min-agreement", "0.5"
    )
    assert loose.code == 0, loose.out


def test_tolerances_that_leave_integer_outputs_unjudged_say_so(run_cli, tagger_files):
    reference, candidate, data, _ = tagger_files
    result = run_cli(
        "check", reference, candidate, "--data", data, "--runs", "0", "--min-cosine", "0.99"
    )
    assert result.code == 0, result.err
    assert "not judged: integer output 'tags'" in " ".join(result.out.split())
    (row,) = [line for line in result.out.splitlines() if line.startswith("│ tags")]
    cells = [c.strip() for c in row.strip("│ ").split("│")]
    assert cells[4:6] == ["—", "—"], cells  # no cosine, no SNR: ids are judged by "equal"
    assert cells[-1].endswith("%"), cells


def test_the_html_report_leaves_the_cosine_and_snr_of_ids_blank(tagger_files):
    reference, candidate, data, agreement = tagger_files
    page = html_report(check=check(reference, candidate, data, latency_runs=0))
    section = page[page.index("<h2>Numerics</h2>") :]
    row = section[section.index("<code>tags</code>") :]
    row = row[: row.index("</tr>")]
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[3:5] == ["—", "—"], cells  # cosine, SNR
    assert cells[-1] == f"{100 * agreement:.2f} %", cells


@dataclasses.dataclass(frozen=True)
class NoisyWeightPass(ir.passes.InPlacePass):
    """A lossy pass for the test: the tagger's weight as ``tagger_files`` perturbs it."""

    name: ClassVar[str] = "noisy-weight"
    weight: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(1))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers["w"]
        value.const_value = ir.tensor(self.weight, name=value.name)
        return ir.passes.PassResult(model, True)


def test_verify_each_rolls_back_a_pass_that_changes_tags_and_says_by_how_much(tagger_files):
    reference, candidate, data, agreement = tagger_files
    noisy = onnx.numpy_helper.to_array(onnx.load(candidate).graph.initializer[0])
    check = CheckOptions(data=data, verify_each=True, latency_runs=0)
    result = shrink(reference, [NoisyWeightPass(weight=noisy)], check=check)
    (step,) = result.steps
    assert step.rolled_back
    assert f"{agreement:.2%} of its elements equal" in step.verdict
    kept = shrink(
        reference,
        [NoisyWeightPass(weight=noisy)],
        check=dataclasses.replace(check, tolerances=Tolerances(min_agreement=0.5)),
    )
    assert not kept.steps[0].rolled_back
    assert kept.steps[0].verdict == f"lowest integer output agreement {agreement:.2%}"


def test_sensitivity_ranks_a_tagger_by_the_scores_its_argmax_reads(tagger_files):
    reference, _, data, _ = tagger_files
    model = io.load(reference)
    report = sensitivity_mod.sensitivity(
        model, QuantPass(), data_mod.prepare(data_mod.specs_from_model(model), data)
    )
    (layer,) = report.layers
    assert layer.op_type == "MatMul" and layer.output == "scores_scored"
    assert 0 < layer.relative_error < 0.1
    assert [v.name for v in model.graph.outputs] == ["tags"]  # the caller's model untouched


def test_scores_are_found_behind_casts_and_not_behind_shapes():
    cast = make_model(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"]),
            onnx.helper.make_node("ArgMax", ["r"], ["ids"], axis=-1),
            onnx.helper.make_node("Cast", ["ids"], ["ids32"], to=onnx.TensorProto.INT32),
            onnx.helper.make_node("Sigmoid", ["x"], ["s"]),
            onnx.helper.make_node("Shape", ["s"], ["shape"]),
        ],
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [
            onnx.helper.make_tensor_value_info("ids32", onnx.TensorProto.INT32, [2, 1]),
            onnx.helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]),
        ],
        {},
    )
    model = ir.serde.deserialize_model(cast)
    # Not "s": the Shape reads no value of it. As an Identity's output: "r" itself stays no
    # graph output (quant would put Q/DQ on it).
    assert combined_mod.add_scored_outputs(model) == ["r_scored"]
    assert [v.name for v in model.graph.outputs] == ["ids32", "shape", "r_scored"]
    assert model.graph.outputs[2].producer().inputs[0].name == "r"
    assert combined_mod.add_scored_outputs(model) == []  # a float output now exists


def test_ids_beside_a_float_output_are_judged_by_their_scores_too():
    """trueocr's recogniser outputs ids (an ArgMax of its logits) and a float confidence:
    quant.max_error judged the confidence alone, and said "met with every layer quantized"
    while 0.7% of the ids changed."""
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w"], ["logits"]),
        onnx.helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1),
        onnx.helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        onnx.helper.make_node("ReduceMax", ["p"], ["conf"], keepdims=0),
    ]
    model = ir.serde.deserialize_model(
        make_model(
            nodes,
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
            [
                onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 1]),
                onnx.helper.make_tensor_value_info("conf", onnx.TensorProto.FLOAT, []),
            ],
            {"w": np.ones((3, 4), np.float32)},
        )
    )
    assert combined_mod.scores_elsewhere(model)
    assert combined_mod.add_scored_outputs(model) == ["logits_scored"]
    assert [v.name for v in model.graph.outputs] == ["ids", "conf", "logits_scored"]
    assert combined_mod.compared_outputs(model, "test") == [1, 2]
    assert combined_mod.add_scored_outputs(model) == []  # scored already


def test_8_and_16_bit_integer_outputs_are_signals_judged_by_cosine():
    pixels = ErrorAccumulator("image")
    ref = np.arange(200, dtype=np.uint8)
    pixels.add(ref, (ref + 1).astype(np.uint8))  # every pixel off by one
    result = pixels.result()
    assert result.agreement is None and not result.integral and result.cosine > 0.99


def test_ids_that_fail_checks_default_agreement_are_named_without_tolerances():
    """2.5% of the tags changed: ``check`` fails it by default, so a run given no tolerances
    says so too."""
    ref = np.arange(1000, dtype=np.int64) % 7
    cand = ref.copy()
    cand[:25] += 1
    report = compare_batches([({"tags": ref}, {"tags": cand}, None)])
    assert report.low_agreement.name == "tags"
    assert report.low_agreement.agreement == 0.975
    nearly = cand.copy()
    nearly[:20] = ref[:20]  # 99.5% equal: within the default
    assert compare_batches([({"tags": ref}, {"tags": nearly}, None)]).low_agreement is None
