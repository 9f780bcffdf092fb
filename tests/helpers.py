"""Small helpers shared by tests: models from ONNX text, file hashes, onnxruntime runs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort


def parse(text: str) -> onnx.ModelProto:
    """A checked model from ONNX text syntax."""
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def reflect_pad_model(pad: int) -> onnx.ModelProto:
    """``y = Pad(x[N, T], reflect, pad on each side of T)``: onnxruntime refuses a row shorter
    than ``pad`` + 1, as Silero VAD's STFT refuses short audio (synthetic rows have 16)."""
    return parse(f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, T] x) => (float[N, T2] y) {{
      pads = Constant <value = int64[4] {{0, {pad}, 0, {pad}}}> ()
      y = Pad <mode = "reflect"> (x, pads)
    }}
    """)


def save_proto(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_ort(model: bytes | str | Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of a model on onnxruntime's CPU provider."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def files_in(folder: Path) -> set[str]:
    """Names of all files under ``folder`` (to prove nothing was written)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def make_model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    """A checked model from onnx.helper nodes and value infos, with numpy initializers."""
    graph = onnx.helper.make_graph(
        nodes,
        "g",
        inputs,
        outputs,
        initializer=[onnx.numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8
    )
    onnx.checker.check_model(model)
    return model
