"""--verify-each: a pass that breaks the tolerances is rolled back, or stops a strict run."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx_ir as ir
import pytest

from models import digits
from onnx_shrink import DataError, FoldPass, PassFailedError, Tolerances, shrink
from onnx_shrink.api import CheckOptions
from onnx_shrink.compiler import io
from onnx_shrink.compiler.data_aware import DataAwarePass


@dataclasses.dataclass(frozen=True)
class ScaleWeightPass(ir.passes.InPlacePass):
    """A lossy in-place pass for the test: multiplies one initializer by ``factor``."""

    name: ClassVar[str] = "scale-weight"
    initializer: str = "head.4.weight"
    factor: float = -1.0  # flips the logits: cosine -1, accuracy near 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers[self.initializer]
        value.const_value = ir.tensor(value.const_value.numpy() * self.factor, name=value.name)
        return ir.passes.PassResult(model, True)


def _run(**options):
    return shrink(
        digits.MODEL_PATH,
        [FoldPass(), ScaleWeightPass()],
        check=CheckOptions(data=digits.TEST_DATA_PATH, verify_each=True, latency_runs=0, **options),
    )


def test_a_pass_breaking_the_tolerances_is_rolled_back_and_the_run_goes_on(caplog):
    result = _run()
    fold_step, scale_step = result.steps
    assert not fold_step.rolled_back and fold_step.verdict
    assert scale_step.rolled_back
    assert "cosine" in scale_step.verdict
    assert "pass 'scale-weight' broke the tolerances" in caplog.text
    folded_only = FoldPass()(io.load(digits.MODEL_PATH)).model
    np.testing.assert_array_equal(
        result.model.graph.initializers["head.4.weight"].const_value.numpy(),
        folded_only.graph.initializers["head.4.weight"].const_value.numpy(),
    )
    assert result.verification.numeric.outputs[0].max_abs_error < 1e-4


def test_strict_stops_at_the_pass_that_breaks_the_tolerances():
    with pytest.raises(PassFailedError, match="pass 'scale-weight' broke the tolerances"):
        _run(strict=True)


@dataclasses.dataclass(frozen=True)
class BreakWeightPass(ir.passes.InPlacePass):
    """A pass writing a model onnxruntime cannot run: one weight loses a row."""

    name: ClassVar[str] = "break-weight"
    initializer: str = "head.4.weight"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = model.graph.initializers[self.initializer]
        value.const_value = ir.tensor(value.const_value.numpy()[1:], name=value.name)
        value.shape = ir.Shape(value.const_value.shape)
        return ir.passes.PassResult(model, True)


def test_a_pass_writing_a_model_onnxruntime_cannot_run_is_rolled_back(caplog):
    result = shrink(
        digits.MODEL_PATH,
        [FoldPass(), BreakWeightPass()],
        check=CheckOptions(data=digits.TEST_DATA_PATH, verify_each=True, latency_runs=0),
    )
    fold_step, broken_step = result.steps
    assert not fold_step.rolled_back and broken_step.rolled_back
    assert "candidate is broken" in broken_step.verdict
    assert result.verification.numeric.outputs[0].max_abs_error < 1e-4


def test_the_dump_keeps_what_a_rolled_back_pass_wrote_beside_what_went_on(tmp_path):
    result = shrink(
        digits.MODEL_PATH,
        [FoldPass(), ScaleWeightPass()],
        dump_dir=tmp_path,
        check=CheckOptions(data=digits.TEST_DATA_PATH, verify_each=True, latency_runs=0),
    )
    assert result.steps[1].rolled_back
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "01-fold.onnx",
        "02-scale-weight.onnx",
        "02-scale-weight.rolled-back.onnx",
    ]

    def weight(name: str) -> np.ndarray:
        model = io.load(tmp_path / name)
        return model.graph.initializers["head.4.weight"].const_value.numpy()

    np.testing.assert_array_equal(weight("02-scale-weight.onnx"), weight("01-fold.onnx"))
    np.testing.assert_array_equal(
        weight("02-scale-weight.rolled-back.onnx"), -weight("01-fold.onnx")
    )


def test_an_accuracy_tolerance_given_for_data_without_labels_is_refused_before_any_pass():
    """Every pass was run and rolled back as breaking an accuracy never measured."""
    images = {"image": np.load(digits.TEST_DATA_PATH)["image"][:64]}
    started = []
    asked = Tolerances(max_accuracy_drop=0.01)
    with pytest.raises(DataError, match="--max-accuracy-drop needs labels, and arrays has none"):
        shrink(
            digits.MODEL_PATH,
            [FoldPass(), ScaleWeightPass(factor=1.0)],
            check=CheckOptions(data=images, verify_each=True, tolerances=asked, latency_runs=0),
            on_pass_start=lambda index, p: started.append(p.name),
        )
    assert started == []
    # The defaults judge accuracy where they can: without labels, the cosine alone.
    result = shrink(
        digits.MODEL_PATH,
        [FoldPass(), ScaleWeightPass(factor=1.0)],
        check=CheckOptions(data=images, verify_each=True, latency_runs=0),
    )
    assert not any(step.rolled_back for step in result.steps)


@dataclasses.dataclass(frozen=True)
class FailingRequestsPass(DataAwarePass):
    """A data-aware pass whose ``requests`` hits a bug of its own."""

    name: ClassVar[str] = "failing-requests"

    def requests(self, model: ir.Model):
        raise ValueError("a bug in requests")

    def apply(self, model: ir.Model, stats) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, False)


def test_what_a_data_aware_pass_raises_in_requests_fails_the_pass_as_in_apply():
    expected = r"pass 'failing-requests' failed \(passes before it: fold\): ValueError: a bug"
    with pytest.raises(PassFailedError, match=expected):
        shrink(digits.MODEL_PATH, passes=[FoldPass(), FailingRequestsPass()], check=False)


def test_the_summary_shows_the_verdict_of_each_pass_kept():
    from onnx_shrink import console

    result = _run()
    table = console.summary_table(result)
    cells = list(table.columns[0].cells)
    fold_step = result.steps[0]
    assert f"[verified: {fold_step.verdict}]" in cells[0]
    assert "(rolled back)" in cells[1] and "verified" not in cells[1]
