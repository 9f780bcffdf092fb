"""fold on every ONNX operator conformance case: same outputs on onnxruntime, never larger.

Cases onnxruntime cannot run before the pass are skipped with the reason recorded in
``ort_unsupported_cases.json``; regenerate it with ``python -m tests.passes.conformance_cases``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_shrink.compiler import io
from onnx_shrink.errors import BadModelError
from onnx_shrink.passes.fold import FoldPass
from tests.passes import conformance_cases as conformance

CASES = conformance.all_cases()
DATA = conformance.read_data()
CANNOT_RUN = DATA[conformance.ORT_SECTION]
LOAD_REJECTS = DATA[conformance.LOAD_SECTION]

# Reasons that depend on the machine rather than on the onnxruntime release: a CI image with
# the locale installed runs the StringNormalizer cases, and numeric mismatches depend on which
# SIMD kernels the CPU gets. Whether these still fail is not checked.
MACHINE_DEPENDENT = ("Failed to construct locale", "output mismatch:")


@pytest.mark.parametrize("name", sorted(set(CASES) - set(LOAD_REJECTS)))
def test_fold_reproduces_expected_outputs_and_never_grows(name: str, tmp_path: Path) -> None:
    if name in CANNOT_RUN:
        pytest.skip(f"onnxruntime cannot run the original: {CANNOT_RUN[name]}")
    case = CASES[name]
    original = case.model.SerializeToString()

    result = FoldPass()(io.load(case.model))
    saved = io.save(result.model, tmp_path / "folded.onnx")

    folded = conformance.session(saved.path)
    reason = conformance.outputs_mismatch(case, folded)
    if reason is not None:
        # The recorded outputs come from onnx's reference implementation with this machine's
        # numpy/ml_dtypes (ml_dtypes 0.7 turned out-of-range float->int4 casts into 0 where
        # onnxruntime wraps). When the original misses them too, fold must still reproduce
        # the original exactly as onnxruntime runs it: that is its contract.
        before = conformance.ort_failure(case)
        if before is None:
            pytest.fail(f"folded model differs from the expected outputs: {reason}")
        original_session = conformance.session(original)
        reason = conformance.outputs_mismatch(case, folded, reference=original_session)
        if reason is not None:
            pytest.fail(f"folded model differs from the original on onnxruntime: {reason}")
    # Fold never grows a model: the saved file is at most the input's size.
    assert saved.bytes_on_disk <= len(original), (
        f"saved {saved.bytes_on_disk} bytes from an input of {len(original)}"
    )
    assert case.model.SerializeToString() == original, "the caller's ModelProto was modified"


@pytest.mark.parametrize("name", sorted(LOAD_REJECTS))
def test_load_rejects_case_with_recorded_reason(name: str) -> None:
    with pytest.raises(BadModelError) as raised:
        io.load(CASES[name].model)
    assert str(raised.value) == LOAD_REJECTS[name]


def test_data_file_lists_only_existing_cases() -> None:
    listed = set(CANNOT_RUN) | set(LOAD_REJECTS)
    assert not listed - set(CASES), "regenerate with python -m tests.passes.conformance_cases"
    assert not set(CANNOT_RUN) & set(LOAD_REJECTS)


def test_listed_cases_still_fail_on_onnxruntime() -> None:
    now_running = [
        name
        for name, reason in CANNOT_RUN.items()
        if not any(text in reason for text in MACHINE_DEPENDENT)
        and conformance.ort_failure(CASES[name]) is None
    ]
    assert not now_running, (
        f"onnxruntime now runs {now_running}; regenerate with "
        "python -m tests.passes.conformance_cases"
    )
