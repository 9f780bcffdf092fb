"""Photographs and nudenet's decoding for the YOLOv8 detector (``models.photos``).

Offline tests check letterboxing, NMS and the F1 score on hand-made outputs; the network
tests prove the preprocessing right end to end: the fp32 detector finds the astronaut's face
where it is.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("PIL", reason="models.photos reads photographs with Pillow")

from PIL import Image  # noqa: E402

from models import photos  # noqa: E402
from models.fetch import fetch  # noqa: E402

FACE_FEMALE = 1


def _output(anchors: list[tuple[float, float, float, float, int, float]], classes: int = 18):
    """A ``[4 + classes, anchors]`` output: each anchor (cx, cy, w, h, label, score)."""
    out = np.zeros((4 + classes, len(anchors)), np.float32)
    for i, (cx, cy, w, h, label, score) in enumerate(anchors):
        out[:4, i] = cx, cy, w, h
        out[4 + label, i] = score
    return out


def test_letterbox_pads_right_and_bottom_then_scales_to_unit_range():
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    x = photos.letterbox(image, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32
    assert x[0, :30].min() == 1.0 and x[1:, :30].max() == 0.0  # the red top half, RGB order
    assert x[:, 34:].max() == 0.0  # the black padding below


def test_crops_are_seeded_and_differ_between_seeds():
    images = [Image.new("RGB", (90, 60), (i * 40, 100, 200 - i * 40)) for i in range(3)]
    for i, image in enumerate(images):
        image.paste((250, 250, 250), (10 * i, 5, 10 * i + 30, 40))
    a = photos.crops(6, seed=0, size=32, images=images)
    assert a.shape == (6, 3, 32, 32)
    assert np.array_equal(a, photos.crops(6, seed=0, size=32, images=images))
    assert not np.array_equal(a, photos.crops(6, seed=1, size=32, images=images))


def test_detections_threshold_then_suppress_overlaps_keeping_the_best():
    out = _output(
        [
            (50, 50, 20, 20, 3, 0.9),
            (52, 50, 20, 20, 5, 0.6),  # overlaps the first (IoU 0.82): suppressed
            (150, 150, 10, 10, 7, 0.3),
            (200, 200, 10, 10, 2, 0.2),  # under the score threshold
        ]
    )
    found = photos.detections(out)
    assert [(d.label, round(d.score, 2)) for d in found] == [(3, 0.9), (7, 0.3)]
    assert found[0].box == (40.0, 40.0, 60.0, 60.0)


def test_f1_needs_the_same_class_and_overlap():
    ref = photos.detections(_output([(50, 50, 20, 20, 3, 0.9), (150, 150, 10, 10, 7, 0.5)]))
    same = photos.detections(_output([(51, 50, 20, 20, 3, 0.8), (150, 150, 10, 10, 7, 0.4)]))
    relabelled = photos.detections(_output([(50, 50, 20, 20, 4, 0.9)]))
    assert photos.detection_f1([ref], [same]) == 1.0
    assert photos.detection_f1([ref], [relabelled]) == 0.0
    assert photos.detection_f1([ref], [same[:1]]) == pytest.approx(2 / 3)
    assert photos.detection_f1([[]], [[]]) == 1.0


@pytest.mark.network
def test_fp32_detector_finds_the_astronauts_face():
    astronaut = photos.photos()[0]
    session = ort.InferenceSession(
        str(fetch("yolov8n-nudenet")), providers=["CPUExecutionProvider"]
    )
    out = session.run(None, {"images": photos.letterbox(astronaut)[None]})[0]
    assert out.shape == (1, 22, 2100)  # 40x40 + 20x20 + 10x10 anchors at 320
    (face,) = photos.detections(out[0])
    assert face.label == FACE_FEMALE and face.score > 0.7
    x0, y0, x1, y1 = face.box  # her face, upper middle of the 512x512 photograph
    assert 90 < x0 < x1 < 190 and 30 < y0 < y1 < 130
