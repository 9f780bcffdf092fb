"""Small helpers shared by tests: models from ONNX text, file hashes, onnxruntime runs."""

from __future__ import annotations

import collections
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnxruntime as ort

from models import digits
from onnx_shrink.compiler.io import data_files


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


def digits_images(count: int = 16) -> np.ndarray:
    """The first ``count`` images of the digits model's test data."""
    return data_files.load_npz(digits.TEST_DATA_PATH)["image"][:count]


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


def optimized_ops(model: bytes | str | Path) -> collections.Counter[str]:
    """The op types of the graph onnxruntime's CPU provider runs, after its optimizations."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        source = model if isinstance(model, bytes) else str(model)
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The cosine of the angle between two arrays, read as flat vectors."""
    return float(a.ravel() @ b.ravel() / (np.linalg.norm(a) * np.linalg.norm(b)))


def resident_kib() -> int:
    """This process's resident memory (Linux's VmRSS), in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


class OneSampleReader:
    """A one-shot reader of one sample per ``get_next()`` as input ``name``, as a user's
    onnxruntime calibration reader is; ``calls`` counts the reads."""

    def __init__(self, rows: np.ndarray, name: str) -> None:
        self.rows = list(rows)
        self.name = name
        self.calls = 0

    def get_next(self):
        self.calls += 1
        return {self.name: self.rows.pop(0)[np.newaxis]} if self.rows else None


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


# An If on a flag input whose branches are one Conv each: Silero VAD computes its whole
# network inside an If on its sample rate.
CONVS_IN_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (bool c, float[1, 4, 8, 8] x) => (float[1, 8, 8, 8] y) {
  y = If (c) <
    then_branch = t () => (float[1, 8, 8, 8] a) { a = Conv <pads = [1, 1, 1, 1]> (x, w1) },
    else_branch = e () => (float[1, 8, 8, 8] b) { b = Conv <pads = [1, 1, 1, 1]> (x, w2) }
  >
}
"""


def convs_in_if(main_conv: bool = False) -> onnx.ModelProto:
    """``CONVS_IN_IF`` with seeded weights; ``main_conv``: one more Conv after the If, in the
    main graph (output ``z``)."""
    text = CONVS_IN_IF
    if main_conv:
        text = text.replace("=> (float[1, 8, 8, 8] y) {", "=> (float[1, 8, 8, 8] z) {")
        text = text.replace("\n}\n", "\n  z = Conv <pads = [1, 1, 1, 1]> (y, w3)\n}\n")
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 4, 3, 3), "w2": (8, 4, 3, 3), "w3": (8, 8, 3, 3)}
    for name, shape in shapes.items():
        if name != "w3" or main_conv:
            weight = rng.normal(size=shape).astype(np.float32)
            proto.graph.initializer.append(onnx.numpy_helper.from_array(weight, name))
    onnx.checker.check_model(proto, full_check=True)
    return proto


def convs_in_if_x(samples: int = 1) -> np.ndarray:
    """Seeded values for ``convs_in_if``'s input ``x``: ``samples`` images [4, 8, 8]."""
    return np.random.default_rng(1).normal(size=(samples, 4, 8, 8)).astype(np.float32)


def transposed_attention(dtype: int = onnx.TensorProto.FLOAT) -> onnx.ModelProto:
    """pythainlp's thai2rom decoder's attention step in ``dtype``, inputs and outputs too:
    encoder states through a MatMul on a constant weight and a Reshape, scored against the
    decoder's hidden state transposed [1, 1, H] -> [1, H, 1], which a Tanh reads as well. At
    opset 13, as thai2rom's: onnxruntime 1.32's CPU session crashes (SIGSEGV) on it in
    float16 (at opset 14 it opens)."""
    oh = onnx.helper
    as_type = oh.tensor_dtype_to_np_dtype(dtype)
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(as_type) * 0.1
    graph = oh.make_graph(
        [
            oh.make_node("MatMul", ["states", "W"], ["projected"]),
            oh.make_node("Reshape", ["projected", "shape"], ["keys"]),
            oh.make_node("Transpose", ["hidden"], ["query"], perm=[1, 2, 0]),
            oh.make_node("MatMul", ["keys", "query"], ["y"]),
            oh.make_node("Tanh", ["hidden"], ["state"]),
        ],
        "g",
        [
            oh.make_tensor_value_info("states", dtype, ["N", 64]),
            oh.make_tensor_value_info("hidden", dtype, [1, 1, 64]),
            oh.make_tensor_value_info("shape", onnx.TensorProto.INT64, [3]),
        ],
        [
            oh.make_tensor_value_info("y", dtype, [1, "N", 1]),
            oh.make_tensor_value_info("state", dtype, [1, 1, 64]),
        ],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)


def transposed_attention_feed(seed: int) -> dict[str, np.ndarray]:
    """One float32 feed of ``transposed_attention``: 5 encoder states."""
    rng = np.random.default_rng(seed)
    return {
        "states": rng.standard_normal((5, 64)).astype(np.float32),
        "hidden": rng.standard_normal((1, 1, 64)).astype(np.float32),
        "shape": np.array([1, -1, 64], np.int64),
    }


def open_in_child(path: str | Path) -> int:
    """The exit status of a fresh process that opens ``path`` in an onnxruntime session
    (negative: the signal it died of): a crash ends that process, not the test run."""
    import subprocess
    import sys

    code = f"import onnxruntime as o; o.InferenceSession({str(path)!r})"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode


def target_outcome(**fields):
    """A ``quant.max_error`` search's outcome (``accuracy_target.TargetOutcome``) as 16
    calibration samples of cal.npz would give it: 0.05 met with one layer float, unless
    ``fields`` say otherwise."""
    from onnx_shrink.runtime_check import accuracy_target

    defaults = dict(
        max_error=0.05,
        met=True,
        layers=1,
        exclude=("qkv",),
        added=("qkv",),
        error=0.0313,
        bytes=32_400_000,
        whole_error=0.189,
        whole_bytes=20_400_000,
        attempts=(),
        samples=16,
        data="cal.npz",
        seconds=1.0,
        without_bias_correction=False,
    )
    return accuracy_target.TargetOutcome(**(defaults | fields))
