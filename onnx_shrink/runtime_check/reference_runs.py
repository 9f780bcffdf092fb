"""A reference model's runs, kept for comparing many candidates with it.

The accuracy target's search measures up to 16 quantized copies against the float model,
each over all the calibration samples, and every comparison loaded and ran the float model
again: 2.5 s of each 9 s measurement on PP-OCRv4 rec at 128 lines. ``CachedRuns`` wraps the
reference's session: each distinct feed runs once, and its outputs wait on disk in a
temporary folder (``KeptRuns``), to be read back (memory-mapped) when the same feed comes
again. Memory stays at one batch, where keeping the outputs would hold rec's 136 MB at 128
lines, and no session outlives its comparison (the ranking runs between them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onnx_shrink.compiler.io import data_files
from onnx_shrink.runtime_check.data_types import is_numeric


class KeptRuns:
    """Outputs of one model's runs, by feed, in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Path] = {}
        self.reused = 0
        """runs answered from disk"""


class CachedRuns:
    """``session`` (its inputs, outputs and options as they are), each ``run`` of a feed it
    ran before answered from ``kept`` instead of run again, and each other one kept."""

    def __init__(self, session: ort.InferenceSession, kept: KeptRuns) -> None:
        self._session = session
        self._kept = kept

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_outputs, get_session_options
        return getattr(self._session, name)

    def run(
        self,
        names: Sequence[str],
        feed: Mapping[str, np.ndarray],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        kept = self._kept
        key = _digest(names, feed)
        path = kept.files.get(key)
        if path is not None:
            kept.reused += 1
            arrays = data_files.load_npz(path)
            return [arrays[f"output_{i}"] for i in range(len(names))]
        outputs = self._session.run(list(names), dict(feed), run_options)
        # Strings (object arrays) are run again: .npz would pickle them.
        if not all(isinstance(a, np.ndarray) and is_numeric(a) for a in outputs):
            return outputs
        path = kept.folder / f"run_{len(kept.files):06d}.npz"
        data_files.save_npz(path, {f"output_{i}": array for i, array in enumerate(outputs)})
        kept.files[key] = path
        return outputs


def _digest(names: Sequence[str], feed: Mapping[str, np.ndarray]) -> str:
    """A key for the outputs ``names`` on ``feed``: equal only for the same arrays."""
    digest = hashlib.blake2b(repr(list(names)).encode(), digest_size=20)
    for name in sorted(feed):
        array = np.ascontiguousarray(feed[name])
        digest.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.data)
    return digest.hexdigest()
