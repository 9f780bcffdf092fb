"""Real OCR inputs for PP-OCRv4: text lines and pages rendered with Pillow, as rapidocr sees them.

Contract:
    * Text is drawn with Pillow's own TrueType font (``ImageFont.load_default(size)``, Pillow
      >= 10.1 with FreeType), dark ink on a light background, so the images are the same on
      every machine; ``random_text(rng)`` makes words of ASCII letters and digits (all in the
      recognizer's dictionary) separated by single spaces.
    * Recognizer (``ppocr-rec``) input, as rapidocr 1.4.4's ``TextRecognizer`` builds it
      (``rec_img_shape: [3, 48, 320]`` in its config.yaml): the line image resized to height
      48 keeping its aspect ratio (width ``ceil(48 * w / h)``, at most 320), scaled to
      ``(x / 255 - 0.5) / 0.5``, channels in BGR order (rapidocr reads with OpenCV), zero-padded
      on the right to width 320. Lines are kept short (``REC_MAX_CHARS``) and a line that
      would still be squeezed to fit 320 wide is redrawn, so every sample has one shape and a
      dataset is one array ``[N, 3, 48, 320]``.
    * ``rec_characters(model_path)`` is rapidocr's ``CTCLabelDecode`` list: ``"blank"`` at index
      0, the dictionary from the model's metadata key ``"character"`` (one per line), and a
      space at the end. ``ctc_greedy_decode(probs, chars)`` takes the argmax per time step,
      merges repeats and drops blanks: the strings rapidocr returns.
    * Detector (``ppocr-det``) input: a page of several lines, its size a multiple of 32 (no
      resize needed), normalized with config.yaml's Det mean/std (0.5, 0.5, 0.5) as
      ``(x / 255 - mean) / std``, BGR, CHW. ``render_page`` returns the drawn text boxes;
      ``box_mask`` rasterizes them; the model's output is a probability map ``[N, 1, H, W]``
      that rapidocr thresholds at ``DET_THRESHOLD`` (config.yaml ``thresh: 0.3``).
    * ``rec_dataset(n, seed)`` / ``det_dataset(n, size, seed)``: seeded, deterministic.

Needs Pillow (``benchmarks/requirements.txt``); numpy and onnx otherwise.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

REC_HEIGHT = 48
REC_WIDTH = 320
REC_MAX_CHARS = 12
DET_MEAN = (0.5, 0.5, 0.5)
DET_STD = (0.5, 0.5, 0.5)
DET_THRESHOLD = 0.3
CHARSET = string.ascii_letters + string.digits
BLANK = "blank"

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels


@lru_cache(maxsize=8)
def font(size: int):
    """Pillow's bundled TrueType font at ``size`` pixels."""
    from PIL import ImageFont

    loaded = ImageFont.load_default(size=size)
    if not isinstance(loaded, ImageFont.FreeTypeFont):  # Pillow < 10.1 or no FreeType
        raise RuntimeError("Pillow >= 10.1 with FreeType is needed for a scalable font")
    return loaded


def random_text(rng: np.random.Generator, max_chars: int = REC_MAX_CHARS) -> str:
    """One to three words of letters and digits, at most ``max_chars`` characters in all."""
    words: list[str] = []
    budget = max_chars
    for _ in range(int(rng.integers(1, 4))):
        if budget < 2:
            break
        length = int(rng.integers(2, min(8, budget) + 1))
        kind = rng.random()
        if kind < 0.2:
            alphabet = string.digits
        elif kind < 0.5:
            alphabet = string.ascii_lowercase
        elif kind < 0.7:
            alphabet = string.ascii_uppercase
        else:
            alphabet = CHARSET
        words.append("".join(rng.choice(list(alphabet), size=length)))
        budget -= length + 1
    return " ".join(words)


def _colors(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    paper = tuple(int(v) for v in rng.integers(200, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
    return paper, ink  # type: ignore[return-value]


def render_line(text: str, rng: np.random.Generator, size: int = 32, margin: int = 4):
    """An RGB image of ``text`` on one line, cropped to the ink plus ``margin`` pixels."""
    from PIL import Image, ImageDraw

    face = font(size)
    x0, y0, x1, y1 = face.getbbox(text)
    paper, ink = _colors(rng)
    image = Image.new("RGB", (x1 - x0 + 2 * margin, y1 - y0 + 2 * margin), paper)
    ImageDraw.Draw(image).text((margin - x0, margin - y0), text, font=face, fill=ink)
    return image


def _to_chw_bgr(image) -> np.ndarray:
    array = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def rec_preprocess(image, height: int = REC_HEIGHT, width: int = REC_WIDTH) -> np.ndarray:
    """rapidocr's recognizer normalization of one line image: float32 ``[3, height, width]``."""
    from PIL import Image

    w, h = image.size
    resized_w = min(width, math.ceil(height * w / h))
    resized = image.resize((resized_w, height), Image.Resampling.BILINEAR)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :resized_w] = (_to_chw_bgr(resized) / 255.0 - 0.5) / 0.5
    return out


def rec_dataset(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """``n`` rendered lines as the recognizer's input ``[n, 3, 48, 320]`` and their texts."""
    rng = np.random.default_rng(seed)
    texts, samples = [], []
    while len(texts) < n:
        text = random_text(rng)
        image = render_line(text, rng, size=int(rng.integers(24, 41)))
        if image.size[0] * REC_HEIGHT > REC_WIDTH * image.size[1]:
            continue  # would be squeezed to fit 320 wide: draw another line
        texts.append(text)
        samples.append(rec_preprocess(image))
    return np.stack(samples), texts


def rec_characters(model_path: str | Path) -> list[str]:
    """rapidocr's CTC label list: blank, the model's dictionary, then a space."""
    import onnx

    proto = onnx.load_model(str(model_path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if "character" not in meta:
        raise ValueError(f"{model_path}: no 'character' metadata; not a PP-OCR recognizer")
    return [BLANK, *meta["character"].splitlines(), " "]


def ctc_greedy_decode(probs: np.ndarray, characters: Sequence[str]) -> list[str]:
    """Strings of a CTC output ``[N, T, C]``: argmax, merge repeats, drop blanks (index 0)."""
    best = np.asarray(probs).argmax(axis=-1)
    texts = []
    for row in best:
        keep = np.ones(row.shape, dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[int(i)] for i in row[keep]))
    return texts


def char_error_rate(reference: Sequence[str], hypothesis: Sequence[str]) -> float:
    """Total edit distance over total reference characters (each pair aligned separately)."""
    edits = sum(_edit_distance(r, h) for r, h in zip(reference, hypothesis, strict=True))
    return edits / max(1, sum(len(r) for r in reference))


def _edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


@dataclass(frozen=True)
class Page:
    image: object  # PIL.Image.Image, RGB
    boxes: tuple[Box, ...]
    texts: tuple[str, ...]


def render_page(rng: np.random.Generator, size: tuple[int, int] = (480, 480)) -> Page:
    """A page ``size`` = (width, height) with lines of text stacked down it, left-aligned."""
    from PIL import Image, ImageDraw

    width, height = size
    paper, ink = _colors(rng)
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    boxes, texts = [], []
    y = int(rng.integers(8, 24))
    while True:
        face = font(int(rng.integers(18, 33)))
        text = random_text(rng, max_chars=int(rng.integers(6, 24)))
        x0, y0, x1, y1 = face.getbbox(text)
        x = int(rng.integers(8, max(9, width // 4)))
        if y + (y1 - y0) + 8 > height:
            break
        if x + (x1 - x0) > width - 8:  # too wide for the page: try a shorter line
            continue
        draw.text((x - x0, y - y0), text, font=face, fill=ink)
        boxes.append((x, y, x + x1 - x0, y + y1 - y0))
        texts.append(text)
        y += (y1 - y0) + int(rng.integers(12, 40))
    return Page(image, tuple(boxes), tuple(texts))


def normalized_chw_bgr(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``(x / 255 - mean) / std`` of ``image``, float32 ``[3, H, W]``, channels in BGR order
    (``mean`` and ``std`` per channel, applied in that order)."""
    shift = np.asarray(mean, dtype=np.float32)[:, None, None]
    scale = np.asarray(std, dtype=np.float32)[:, None, None]
    return ((_to_chw_bgr(image) / 255.0 - shift) / scale).astype(np.float32)


def det_preprocess(image) -> np.ndarray:
    """rapidocr's detector normalization of a page (sides multiples of 32): ``[3, H, W]``."""
    w, h = image.size
    if w % 32 or h % 32:
        raise ValueError(f"page {w}x{h}: both sides must be multiples of 32")
    return normalized_chw_bgr(image, DET_MEAN, DET_STD)


def det_dataset(
    n: int, size: tuple[int, int] = (480, 480), seed: int = 0
) -> tuple[np.ndarray, list[tuple[Box, ...]]]:
    """``n`` rendered pages as the detector's input ``[n, 3, H, W]`` and their text boxes."""
    rng = np.random.default_rng(seed)
    pages = [render_page(rng, size) for _ in range(n)]
    return np.stack([det_preprocess(p.image) for p in pages]), [p.boxes for p in pages]


def box_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """A boolean ``[H, W]`` map, True inside any of ``boxes``."""
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = True
    return mask


def binary_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean maps (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
