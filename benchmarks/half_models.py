"""Benchmark tasks for models that come in half precision (``convert_vs_ort.py fp32``): the
same ``quant_data.Task`` contract, with the original (float16) model as the reference.

* slovorez-fp16: a Russian morpheme tagger; words from the package's own dictionary, each
  character encoded by its vocabulary. Fidelity: the share of real characters (padding
  aside) whose tag is the original model's, and of words whose every tag is.
* csmask-fp16: a cloud and cloud-shadow mask for Sentinel-2 tiles. No imagery ships with the
  package: the tiles are *synthetic* scenes, fields of vegetation, soil, water and towns under
  clouds and their shadows, with the band reflectances of those surfaces, normalized by the
  statistics in the package's model card. Fidelity: the share of pixels whose class is the
  original model's, and the output's relative error.
"""

from __future__ import annotations

import json

import numpy as np

from benchmarks.quant_data import Task, one_input, run_batches
from models.fetch import fetch, fetch_members

SLOVOREZ_FOLDER = "slovorez/models/slovorez-test/"
WORD_LENGTH = 16
TILE = 256


def slovorez_task(calibration: int, evaluation_words: int = 400) -> Task:
    config, dictionary = fetch_members(
        "slovorez-fp16", [SLOVOREZ_FOLDER + "config.json", SLOVOREZ_FOLDER + "base_dict.json"]
    )
    vocabulary = json.loads(config.read_text())["mapping"]["tokenizer_vocab"]
    words = [w for w in json.loads(dictionary.read_text()) if 3 <= len(w) <= WORD_LENGTH]
    chosen = np.random.default_rng(0).choice(len(words), calibration + evaluation_words, False)
    ids = np.zeros((len(chosen), WORD_LENGTH), np.int32)
    for row, index in enumerate(chosen):
        codes = [vocabulary.get(c, 1) for c in words[index].lower()]
        ids[row, : len(codes)] = codes
    calib, evaluation = ids[:calibration], ids[calibration:]
    real = evaluation > 0

    def predict(session) -> np.ndarray:
        return run_batches(session, {"input_layer": evaluation}, "output_0", 64).argmax(-1)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        equal = (reference == candidate) | ~real
        return {
            "tags equal": float(equal[real].mean()),
            "words equal": float(equal.all(axis=1).mean()),
        }

    return Task(
        name="slovorez-fp16",
        model=fetch("slovorez-fp16"),
        **one_input("input_layer", calib, evaluation, latency=64),
        latency_input=f"64 words of {WORD_LENGTH} characters",
        predict=predict,
        fidelity=fidelity,
        metrics=("tags equal", "words equal"),
        split=f"words of 3-16 letters from the package's dictionary (seed 0): {calibration} "
        f"calibration, {evaluation_words} evaluation; tags on real characters (padding aside)",
    )


# Reflectance of surfaces in the model's six bands (B, G, R, NIR, SWIR 1.6, SWIR 2.2).
_SURFACES = {
    "vegetation": [0.03, 0.06, 0.04, 0.35, 0.17, 0.08],
    "soil": [0.09, 0.13, 0.17, 0.26, 0.32, 0.24],
    "water": [0.06, 0.06, 0.04, 0.02, 0.01, 0.005],
    "town": [0.12, 0.13, 0.14, 0.2, 0.22, 0.2],
    "cloud": [0.55, 0.55, 0.56, 0.6, 0.4, 0.28],
}


def _field(rng: np.random.Generator, beta: float = 3.0) -> np.ndarray:
    """A smooth random field (power spectrum 1/k^beta), zero mean, unit variance."""
    f = np.fft.fftfreq(TILE)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    k[0, 0] = 1.0
    z = np.fft.ifft2(np.fft.fft2(rng.normal(size=(TILE, TILE))) / k ** (beta / 2)).real
    return (z - z.mean()) / z.std()


def synthetic_tiles(count: int, seed: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``count`` normalized 6-band tiles: land cover under clouds (every 4th tile clear) and
    their shadows, offset from them."""
    rng = np.random.default_rng(seed)
    s = {name: np.array(values) for name, values in _SURFACES.items()}
    tiles = []
    for index in range(count):
        a, b, c = _field(rng), _field(rng), _field(rng)
        land = np.where(a[..., None] > 0.3, s["soil"], s["vegetation"]) * (1 + 0.15 * c[..., None])
        land = np.where(b[..., None] > 1.4, s["water"], land)
        land = np.where((c[..., None] > 1.6) & (a[..., None] < 0), s["town"], land)
        cover = 5.0 if index % 4 == 0 else -rng.uniform(-1.5, 1.0)
        density = np.clip(_field(rng, 3.5) - cover, 0, 1)
        shadow = np.roll(density, tuple(rng.integers(10, 30, 2)), axis=(0, 1))
        image = land * (1 - 0.7 * shadow[..., None])
        clouds = s["cloud"] * (1 + 0.2 * _field(rng)[..., None])
        image = image * (1 - density[..., None]) + clouds * density[..., None]
        image = np.clip(image + 0.005 * rng.normal(size=image.shape), 0, 1.5)
        tiles.append(((image - mean) / std).transpose(2, 0, 1))
    return np.asarray(tiles, np.float32)


def csmask_task(calibration: int, evaluation_tiles: int = 16) -> Task:
    (card,) = fetch_members("csmask-fp16", ["ukis_csmask/model_6b_l2a.json"])
    mean, std = (
        np.array(v) for v in json.loads(card.read_text())["data"]["dataset_statistics"]["img"]
    )
    calib = synthetic_tiles(calibration, 0, mean, std)
    evaluation = synthetic_tiles(evaluation_tiles, 1, mean, std)

    def predict(session) -> np.ndarray:
        return run_batches(session, {"input": evaluation}, "output", 4)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        error = np.linalg.norm(candidate - reference) / np.linalg.norm(reference)
        agree = reference.argmax(1) == candidate.argmax(1)
        return {"pixel classes equal": float(agree.mean()), "rel err": float(error)}

    return Task(
        name="csmask-fp16",
        model=fetch("csmask-fp16"),
        **one_input("input", calib, evaluation),
        latency_input=f"1 tile 6x{TILE}x{TILE}",
        predict=predict,
        fidelity=fidelity,
        metrics=("pixel classes equal", "rel err"),
        split=f"SYNTHETIC 6-band scenes ({calibration} calibration, seed 0; "
        f"{evaluation_tiles} evaluation, seed 1): no imagery ships with the model",
    )


def load_task(name: str, calibration: int) -> Task:
    if name == "slovorez-fp16":
        return slovorez_task(calibration)
    if name == "csmask-fp16":
        return csmask_task(calibration)
    raise KeyError(f"unknown half-precision model {name!r}")
