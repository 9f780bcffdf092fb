"""Rendered OCR inputs for PP-OCRv4 (``models.ocr``).

Offline tests check the rendering, preprocessing and CTC decoding rules; the network tests
prove them right end to end: the fp32 recognizer reads the rendered lines back, and the
detector's probability map lands on the drawn text boxes.
"""

from __future__ import annotations

import string

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("PIL", reason="models.ocr renders with Pillow (benchmarks/requirements.txt)")

from models import ocr  # noqa: E402
from models.fetch import fetch  # noqa: E402

# ---- offline -------------------------------------------------------------------------------


def test_random_text_uses_the_charset_and_stays_short():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = ocr.random_text(rng)
        assert 2 <= len(text) <= ocr.REC_MAX_CHARS
        assert set(text) <= set(ocr.CHARSET + " ")
        assert "  " not in text and text == text.strip()


def test_rec_dataset_is_seeded_and_normalized_like_rapidocr():
    x, texts = ocr.rec_dataset(6, seed=3)
    again, texts_again = ocr.rec_dataset(6, seed=3)
    assert x.shape == (6, 3, ocr.REC_HEIGHT, ocr.REC_WIDTH) and x.dtype == np.float32
    np.testing.assert_array_equal(x, again)
    assert texts == texts_again
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x[:, :, :, -1] == 0).all()  # short lines: zero padding on the right


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    chars = [ocr.BLANK, "a", "b", " "]
    steps = [0, 1, 1, 0, 1, 2, 2, 3, 0, 2]  # blank a a blank a b b space blank b
    probs = np.eye(4, dtype=np.float32)[steps][None]
    assert ocr.ctc_greedy_decode(probs, chars) == ["aab b"]


def test_char_error_rate_counts_edits_over_reference_length():
    assert ocr.char_error_rate(["abcd", "xy"], ["abcd", "xy"]) == 0.0
    assert ocr.char_error_rate(["abcd", "xy"], ["abed", "x"]) == pytest.approx(2 / 6)


def test_pages_are_multiples_of_32_and_boxes_lie_inside():
    x, boxes = ocr.det_dataset(3, (320, 256), seed=1)
    assert x.shape == (3, 3, 256, 320) and x.dtype == np.float32
    for page_boxes in boxes:
        assert len(page_boxes) >= 3
        for x0, y0, x1, y1 in page_boxes:
            assert 0 <= x0 < x1 <= 320 and 0 <= y0 < y1 <= 256
    with pytest.raises(ValueError, match="multiples of 32"):
        ocr.det_preprocess(ocr.render_page(np.random.default_rng(0), (300, 320)).image)


def test_binary_iou():
    a = ocr.box_mask([(0, 0, 4, 4)], (8, 8))
    b = ocr.box_mask([(2, 0, 6, 4)], (8, 8))
    assert ocr.binary_iou(a, a) == 1.0
    assert ocr.binary_iou(a, b) == pytest.approx(8 / 24)
    assert ocr.binary_iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0


# ---- network: the real PP-OCRv4 models -------------------------------------------------------


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(fetch(name)), options, providers=["CPUExecutionProvider"])


@pytest.mark.network
def test_the_dictionary_holds_the_charset():
    chars = ocr.rec_characters(fetch("ppocr-rec"))
    assert chars[0] == ocr.BLANK and chars[-1] == " "
    assert len(chars) == 6625  # the model's 6625 classes
    assert set(string.ascii_letters + string.digits) <= set(chars)


@pytest.mark.network
def test_fp32_recognizer_reads_the_rendered_lines():
    x, texts = ocr.rec_dataset(60, seed=0)
    session = _session("ppocr-rec")
    chars = ocr.rec_characters(fetch("ppocr-rec"))
    got = ocr.ctc_greedy_decode(session.run(None, {"x": x})[0], chars)
    exact = np.mean([a == b for a, b in zip(texts, got, strict=True)])
    assert exact >= 0.8, list(zip(texts, got, strict=True))
    assert ocr.char_error_rate(texts, got) < 0.05


@pytest.mark.network
def test_fp32_detector_map_covers_the_text_boxes():
    x, boxes = ocr.det_dataset(4, (480, 480), seed=0)
    session = _session("ppocr-det")
    for page, page_boxes in zip(x, boxes, strict=True):
        prob = session.run(None, {"x": page[None]})[0][0, 0]
        assert prob.shape == (480, 480)
        text = ocr.box_mask(page_boxes, prob.shape)
        found = prob > ocr.DET_THRESHOLD
        assert ocr.binary_iou(found, text) > 0.3
        assert found[~text].mean() < 0.01  # nothing found away from the text
