"""A small trained CNN on scikit-learn's digits, committed with the script that trained it.

Contract: ``MODEL_PATH`` is an ONNX model (opset 17, input "image" float32 [batch, 1, 8, 8]
with pixels in [0, 1], output "logits" [batch, 10]) that still holds BatchNormalization
nodes; ``TEST_DATA_PATH`` is an ``.npz`` with "image" (float32 [N, 1, 8, 8]) and "labels"
(int64 [N]) for the held-out split. Both are produced by ``python -m models.digits.train``;
using them needs only numpy and onnx/onnxruntime, never torch.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

MODEL_PATH: Path = _HERE / "digits_cnn.onnx"
TEST_DATA_PATH: Path = _HERE / "digits_test.npz"

__all__ = ["MODEL_PATH", "TEST_DATA_PATH"]
