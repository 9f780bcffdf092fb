"""Quantization of a real file-type classifier (magika standard_v3_3) on real files.

onnxruntime's ``quantize_static`` fails on this model (its bias-scale adjustment compares an
array as a truth value), and its ``quantize_dynamic`` takes the one Conv, which holds 95 % of
the weights, as ConvInteger: several times slower than float (``benchmarks/quant_vs_ort.py
--models magika``; RESULTS.md's magika table). ``quant`` quantizes it whole on the files'
statistics; ``quant-dynamic`` takes its MatMuls and says the Conv is ``quant``'s.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

import onnx_shrink
from onnx_shrink.compiler import io
from tests.helpers import run_ort

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def classifier():
    from models import files
    from models.fetch import fetch

    calibrating, evaluated = files.calibration_split(files.python_files(400, seed=0))
    calibration = files.features(calibrating)  # 80 files, none evaluated
    evaluation = files.features(evaluated)
    path = fetch("magika")
    reference = run_ort(path, {"bytes": evaluation})[0]
    return path, calibration, evaluation, reference


def test_quant_keeps_the_labels_of_real_files(classifier):
    path, calibration, evaluation, reference = classifier
    result = onnx_shrink.shrink(
        path, passes="fold,quant", check=False, calibration={"bytes": calibration}
    )
    ops = {n.op_type for n in result.model.graph}
    assert "QuantizeLinear" in ops
    weights = io.to_bytes(result.model)
    assert len(weights) < 0.3 * path.stat().st_size  # the Conv's weights in int8
    candidate = run_ort(weights, {"bytes": evaluation})[0]
    agreement = (candidate.argmax(1) == reference.argmax(1)).mean()
    assert agreement >= 0.95, agreement  # 0.975 on the 320 files of Python 3.11.7 here
    assert np.abs(candidate - reference).sum(1).mean() < 0.1  # scores, not only labels


def test_quant_dynamic_says_the_conv_it_leaves_is_most_of_the_model(classifier, caplog):
    path, _, evaluation, reference = classifier
    with caplog.at_level(logging.WARNING):
        result = onnx_shrink.shrink(path, passes="fold,quant-dynamic", check=False)
    (warned,) = [r.getMessage() for r in caplog.records if "stay float in" in r.getMessage()]
    assert warned.startswith("quant-dynamic: 2.5 MiB of weights") and "1 Conv node" in warned
    candidate = run_ort(io.to_bytes(result.model), {"bytes": evaluation})[0]
    assert (candidate.argmax(1) == reference.argmax(1)).mean() >= 0.98
