"""Static quantization of a real YOLOv8 detector (NudeNet's YOLOv8n) on real photographs.

Its one output concatenates box coordinates (pixels, 0..320) and 18 class scores (0..1):
one uint8 scale for that tensor is about 1.25 wide, so every score below 0.63 reads as 0
(onnxruntime's ``quantize_static`` puts a Q/DQ on the final Concat and its detections
vanish; see benchmarks/RESULTS.md). ``quant`` keeps the tensors that mix the two float (glue
ops are quantized only between integer kernels), so the scores keep their own precision.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PIL", reason="models.photos reads photographs with Pillow")

import onnx_shrink  # noqa: E402
from onnx_shrink.compiler import io  # noqa: E402
from tests.helpers import run_ort  # noqa: E402

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture(scope="module")
def detector():
    from models import photos
    from models.fetch import fetch

    images = photos.photos()
    calibration = photos.crops(8, seed=0, images=images)
    evaluation = photos.crops(32, seed=1, images=images)
    path = fetch("yolov8n-nudenet")
    reference = run_ort(path, {"images": evaluation})[0]
    result = onnx_shrink.shrink(
        path, passes="fold,quant", check=False, calibration={"images": calibration}
    )
    return reference, evaluation, result


def _f1(reference: np.ndarray, candidate: np.ndarray) -> float:
    from models import photos

    return photos.detection_f1(
        [photos.detections(o) for o in reference], [photos.detections(o) for o in candidate]
    )


def _best_scores(output: np.ndarray) -> np.ndarray:
    return output[:, 4:].max(axis=1)


def test_one_scale_for_boxes_and_scores_would_lose_the_detections(detector):
    """What the F1 below guards against: the output rounded on one uint8 scale keeps only the
    detections scored above 0.65 (as 1.3, one step) and loses the rest."""
    reference, _, _ = detector
    scale = (reference.max() - min(reference.min(), 0.0)) / 255
    shared = np.round(reference / scale) * scale
    assert _f1(reference, reference) == 1.0
    assert _f1(reference, shared) < 0.5


def test_quant_keeps_the_class_scores_of_a_concatenated_detector_output(detector):
    reference, evaluation, result = detector
    model = result.model
    (output,) = model.graph.outputs
    final = output.producer()
    assert final is not None and final.op_type != "DequantizeLinear"
    assert all(
        v is None or v.producer() is None or v.producer().op_type != "DequantizeLinear"
        for v in final.inputs
    )
    assert "QuantizeLinear" in {n.op_type for n in model.graph}  # the backbone is int8

    candidate = run_ort(io.to_bytes(model), {"images": evaluation})[0]
    assert _f1(reference, candidate) >= 0.75
    best_ref, best_got = _best_scores(reference), _best_scores(candidate)
    scored = best_ref >= 0.01  # anchors that see something
    assert np.corrcoef(best_ref[scored], best_got[scored])[0, 1] >= 0.85
    boxes = np.abs(candidate[:, :4] - reference[:, :4])
    assert np.median(boxes) < 2.0  # pixels of 320
