"""The committed digits CNN: loadable, BatchNorm kept, >= 95% held-out accuracy (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.digits import MODEL_PATH, TEST_DATA_PATH


def test_files_exist_and_small() -> None:
    assert MODEL_PATH.is_file() and TEST_DATA_PATH.is_file()
    assert MODEL_PATH.stat().st_size < 500_000


def test_model_contract() -> None:
    model = onnx.load(str(MODEL_PATH))
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "image" and dims[1:] == [1, 8, 8] and isinstance(dims[0], str)
    assert [o.name for o in model.graph.output] == ["logits"]
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("BatchNormalization") == 3  # exported unfused, for the fold pass


def test_accuracy_with_onnxruntime() -> None:
    data = np.load(TEST_DATA_PATH)
    images, labels = data["image"], data["labels"]
    assert images.dtype == np.float32 and images.shape[1:] == (1, 8, 8)
    assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
    assert 0.0 <= images.min() and images.max() <= 1.0
    sess = ort.InferenceSession(str(MODEL_PATH), providers=["CPUExecutionProvider"])
    (logits,) = sess.run(None, {"image": images})
    assert logits.shape == (len(labels), 10)
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    assert accuracy >= 0.95, accuracy


def test_runtime_does_not_need_torch() -> None:
    code = (
        "import sys, models.builders, models.digits, models.fetch; "
        "sys.exit(int('torch' in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
