"""The model onnxruntime's quantizer gets in ``quant_vs_ort``: ``quant_pre_process`` of the
fetched model, as ORT's docs say (converted to opset 13 first where ORT's per-channel QDQ of
the original's opset would not load), and the activation scales of its results.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from benchmarks.quant_child import run_child
from benchmarks.results import first_line


def preprocess(src: Path, out: Path) -> tuple[Path, str, float]:
    """ORT's ``quant_pre_process`` of ``src`` (path, note, seconds); ``src`` when it fails.

    Runs in ``out``'s folder: when symbolic shape inference fails, ORT dumps
    ``sym_shape_infer_temp.onnx`` (and its external data) into the working directory.
    """
    with contextlib.chdir(out.parent):
        return _preprocess(src, out)


def _preprocess(src: Path, out: Path) -> tuple[Path, str, float]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    try:
        quant_pre_process(str(src), str(out))
        seconds = time.perf_counter() - started
        return out, f"`quant_pre_process` ({seconds:.1f} s)", seconds
    except Exception as e:  # noqa: BLE001
        first = first_line(e)
    # ORT's documented fallback when symbolic shape inference fails (transformers).
    started = time.perf_counter()
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001
        return src, f"`quant_pre_process` failed ({first}; {first_line(e)}): the original", 0.0
    seconds = time.perf_counter() - started
    return (
        out,
        f"`quant_pre_process(skip_symbolic_shape=True)` ({seconds:.1f} s; with symbolic shape "
        f"inference: {first.removeprefix('Exception: ')})",
        seconds,
    )


def ort_input(src: Path, folder: Path, calib: dict, args) -> tuple[Path, str, float]:
    """The model ORT quantizes, how it was made from ``src``, and the seconds that took.

    ``quant_pre_process`` first, as ORT's docs say. If ``quantize_static`` of its output gives
    a model onnxruntime rejects (PP-OCR is opset 12: once ``quant_pre_process`` has turned
    the Constant weights into initializers and fused Conv+BatchNormalization, the per-channel
    DequantizeLinear nodes get an ``axis``, which opset 12 does not have), the model is first
    converted to opset 13 with ``onnx.version_converter``, which is what a user would do. Only
    if that fails too does ORT get the original (whose Constant-node weights it cannot quantize).
    """
    import onnx
    from onnx import version_converter

    pre, note, seconds = preprocess(src, folder / "pre.onnx")
    if pre == src:
        return src, note, 0.0
    reason = _probe(pre, calib, args)
    if reason is None:
        return pre, note, seconds
    try:
        converted = version_converter.convert_version(onnx.load_model(str(src)), 13)
        onnx.save_model(converted, str(folder / "opset13.onnx"))
    except Exception as e:  # noqa: BLE001
        note = f"the original ({note} gives {reason}; opset 13 conversion: {first_line(e)})"
        return src, note, 0.0
    pre13, note13, seconds13 = preprocess(folder / "opset13.onnx", folder / "pre13.onnx")
    reason13 = _probe(pre13, calib, args) if pre13 != folder / "opset13.onnx" else note13
    if reason13 is None:
        note = (
            f"opset {_opset(src)} → 13 (`onnx.version_converter`), then {note13}; without the "
            f"conversion onnxruntime rejects the quantized model: {reason}"
        )
        return pre13, note, seconds13
    note = f"the original ({note} gives {reason}; after opset 13 conversion: {reason13})"
    return src, note, 0.0


def _opset(path: Path) -> int:
    import onnx

    proto = onnx.load_model(str(path), load_external_data=False)
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _probe(model: Path, calib: dict, args) -> str | None:
    """None if ``quantize_static`` (MinMax) of ``model`` loads in onnxruntime, else why not."""
    import onnxruntime as ort

    n = min(calib)
    out = model.with_name("probe.onnx")
    job = {"tool": "ort-static", "method": "MinMax", "model": str(model), "out": str(out)}
    job |= {"calib_dir": str(calib[n].parent), "calib_npz": str(calib[n]), "config": None}
    result = run_child(job, args, out.parent)
    try:
        if "error" in result:
            return result["error"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        text = " ".join(str(e).split())
        return text[text.rfind("Error ") + 6 :][:120] if "Error " in text else first_line(e)
    finally:
        out.unlink(missing_ok=True)
    return None


def activation_scales(path: Path) -> dict[str, float]:
    """Input tensor -> scale of every QuantizeLinear on a non-constant tensor."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_model(str(path), load_external_data=False).graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    scales = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            scale = constants.get(node.input[1])
            if scale is not None and scale.size == 1:
                scales[node.input[0]] = float(scale)
    return scales


def same_ranges(a: Path, b: Path) -> tuple[int, int]:
    """How many activation scales of ``b`` equal ``a``'s (relative 1e-5), out of the common."""
    sa, sb = activation_scales(a), activation_scales(b)
    common = sorted(set(sa) & set(sb))
    same = sum(abs(sa[k] - sb[k]) <= 1e-5 * max(abs(sa[k]), 1e-30) for k in common)
    return same, len(common)
