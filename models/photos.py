"""Real photographs for the YOLOv8 detector (``yolov8n-nudenet``), fed as nudenet feeds them.

Contract:
    * ``photos()`` returns ``PHOTO_MEMBERS``' photographs from the scikit-image wheel
      (``models.fetch`` entry ``skimage-photos``, one download) as RGB Pillow images, grey
      and RGBA ones converted.
    * ``letterbox(image, size)`` is nudenet 3.4's preprocessing: the image padded with black on
      the right or bottom to a square, resized to ``size`` x ``size`` (bilinear), RGB scaled to
      [0, 1], ``[3, size, size]`` float32.
    * ``crops(n, seed, size)``: ``n`` letterboxed random crops (each 50-100 % of a side,
      mirrored half the time), cycling through the photographs: seeded, deterministic; the
      same photographs give different crops for different seeds, so calibration and
      evaluation sets do not share samples.
    * ``detections(output)`` decodes the model's ``[22, anchors]`` output as nudenet does:
      anchors whose best class score is at least ``SCORE_THRESHOLD`` (0.25, nudenet's NMS
      threshold), class-agnostic greedy NMS at IoU ``NMS_IOU`` (0.45); boxes as x0, y0, x1, y1
      pixels of the letterboxed input.
    * ``detection_f1(reference, candidate)`` scores one set of per-image detections against
      another: a candidate detection matches an unmatched reference detection of the same
      class with IoU >= 0.5 (greedy, best score first); F1 = 2 * matches / (total reference +
      total candidate), 1.0 when both are empty.

Needs Pillow (``benchmarks/requirements.txt``) and numpy; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from models.fetch import fetch_members

PHOTO_MEMBERS = tuple(
    f"skimage/data/{name}"
    for name in (
        "astronaut.png",
        "brick.png",
        "camera.png",
        "cell.png",
        "chelsea.png",
        "clock_motion.png",
        "coffee.png",
        "coins.png",
        "color.png",
        "grass.png",
        "gravel.png",
        "hubble_deep_field.jpg",
        "ihc.png",
        "moon.png",
        "motorcycle_left.png",
        "motorcycle_right.png",
        "page.png",
        "retina.jpg",
        "rocket.jpg",
        "text.png",
    )
)
SIZE = 320
SCORE_THRESHOLD = 0.25
NMS_IOU = 0.45
MATCH_IOU = 0.5
BOX_ROWS = 4  # cx, cy, w, h; the class scores follow


@dataclass(frozen=True)
class Detection:
    label: int
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1


def photos() -> list:
    """The photographs, RGB, in ``PHOTO_MEMBERS`` order."""
    from PIL import Image

    images = []
    for path in fetch_members("skimage-photos", list(PHOTO_MEMBERS)):
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def letterbox(image, size: int = SIZE) -> np.ndarray:
    """nudenet's input for ``image``: padded to a square at the bottom/right, resized,
    ``[3, size, size]`` RGB in [0, 1]."""
    from PIL import Image

    side = max(image.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(image, (0, 0))
    pixels = np.asarray(canvas.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return np.ascontiguousarray((pixels / 255.0).transpose(2, 0, 1))


def crops(n: int, seed: int, size: int = SIZE, images: Sequence | None = None) -> np.ndarray:
    """``n`` letterboxed random crops of the photographs, ``[n, 3, size, size]``."""
    from PIL import Image

    images = photos() if images is None else images
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(n):
        image = images[index % len(images)]
        width, height = image.size
        scale = rng.uniform(0.5, 1.0)
        w, h = max(1, int(width * scale)), max(1, int(height * scale))
        x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        crop = image.crop((x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        samples.append(letterbox(crop, size))
    return np.stack(samples)


def detections(output: np.ndarray) -> list[Detection]:
    """nudenet's decoding of one image's ``[4 + classes, anchors]`` output."""
    scores = output[BOX_ROWS:]
    best = scores.max(axis=0)
    keep = np.flatnonzero(best >= SCORE_THRESHOLD)
    keep = keep[np.argsort(-best[keep], kind="stable")]
    cx, cy, w, h = output[:BOX_ROWS, keep]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    chosen: list[int] = []
    for i in range(len(keep)):
        if all(_iou(boxes[i], boxes[j]) <= NMS_IOU for j in chosen):
            chosen.append(i)
    labels = scores[:, keep].argmax(axis=0)
    return [
        Detection(int(labels[i]), float(best[keep[i]]), tuple(float(v) for v in boxes[i]))
        for i in chosen
    ]


def detection_f1(
    reference: Sequence[Sequence[Detection]], candidate: Sequence[Sequence[Detection]]
) -> float:
    """F1 of ``candidate``'s detections against ``reference``'s, over all images."""
    matches = 0
    for ref, cand in zip(reference, candidate, strict=True):
        free = list(ref)
        for detection in sorted(cand, key=lambda d: -d.score):
            hit = next(
                (
                    r
                    for r in free
                    if r.label == detection.label and _iou(r.box, detection.box) >= MATCH_IOU
                ),
                None,
            )
            if hit is not None:
                free.remove(hit)
                matches += 1
    total = sum(map(len, reference)) + sum(map(len, candidate))
    return 1.0 if total == 0 else 2.0 * matches / total


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return 0.0 if union <= 0 else float(inter / union)
