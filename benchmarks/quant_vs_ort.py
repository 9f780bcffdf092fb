"""Side by side: onnx-shrink's quantization passes against onnxruntime.quantization.

Same models, same calibration and evaluation data (``benchmarks/quant_data.py``), one run:

* fp32: the model as fetched;
* ORT ``quantize_static``: QDQ, per-channel, activations QUInt8 / weights QInt8,
  ``reduce_range=False`` (what its docstring recommends for x86 CPUs with VNNI, which this
  machine has), once per ``CalibrationMethod`` (MinMax, Entropy, Percentile) with ORT's
  default options for each; a method that raises is a row with its error;
* ORT ``quantize_dynamic``: QInt8 weights, defaults (for MiniLM and the OCR recognizer; ORT's
  docs recommend dynamic quantization for transformer-like models, static for CNNs);
* ours: ``onnx_shrink.shrink(model, passes=..., data=calib.npz, check=False)``, static
  ("quant") and dynamic ("quant-dynamic") where ORT has the same; a row says "pass not
  available" while the pass is not registered yet. Also our static pass with ORT's default
  calibration method (minmax) and, on the CNNs, with ``quant.bias_correction`` (a second run
  over the calibration data, counted in its calibration time).

ORT's models start from ``quant_pre_process`` (shape inference and ORT graph optimization),
as ORT's quantization docs recommend; its time is given under the table and not counted in
the calibration time. Ours starts from the fetched model.

Columns:

* fidelity: the model's own metrics on the evaluation set (see ``quant_data``), from the model
  calibrated with the most samples; the first metric also at every sample count, and ours
  against ORT's best static method at each count under the table (a quantized model can sit
  on a knife-edge: one tensor's range moved 2 % turned PP-OCRv4 rec's strings equal to fp32
  from 0.855 to 0.53);
* latency x fp32: the two sessions run alternately in one process (``compare_latency``:
  warm-up, then ``--runs`` pairs, median of per-pair ratios), onnxruntime CPU, default threads,
  on one evaluation input;
* bytes on disk of the saved model;
* calibration s: wall time of the whole quantize call (``quantize_static`` /
  ``quantize_dynamic`` / ``shrink``), at each sample count: the median of
  ``--timing-repeats`` fresh processes (one where the first call takes over
  ``REPEAT_UNDER_S``), since a single call on a shared 2-core machine can be 20 % off;
* calibration peak RSS: each quantize call runs in a fresh child process (this script with
  ``--child``); after imports the child resets its peak RSS (``/proc/self/clear_refs`` 5),
  quantizes, and reports VmHWM minus its RSS before the call. The data reader is given the same
  files: ORT's reader streams one sample at a time from .npy files, ours gets the .npz. A child
  whose RSS passes ``--rss-limit-gib`` is killed and reported as such.

Setup and run, from the repository root::

    .venv/bin/python -m pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/quant_vs_ort.py                     # all five models
    .venv/bin/python benchmarks/quant_vs_ort.py --models digits --quick --no-write

The tables go to stdout and, under "## quantization vs onnxruntime.quantization", into
``benchmarks/RESULTS.md`` (that section is replaced; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Standard library only: the measured children import it before their baseline.
from benchmarks.results import cell, first_line  # noqa: E402

HEADING = "## quantization vs onnxruntime.quantization"
HEADING_LARGE = "## quantization vs onnxruntime.quantization: a 0.6 GB model"
PACKAGES = ("onnx", "onnx-ir", "onnxruntime", "numpy", "Pillow")
MIB = 1024 * 1024
STATIC_METHODS = ("MinMax", "Entropy", "Percentile")
DYNAMIC_MODELS = ("minilm", "ppocr-rec")
CONV_MODELS = ("digits", "ppocr-rec", "ppocr-det")
# Models whose quantized Convs bias correction (quant.bias_correction) can correct.
BIAS_CORRECTED_MODELS = (*CONV_MODELS, "yolov8n-nudenet")
OURS_STATIC = {"passes": "fold,quant"}
OURS_DYNAMIC = {"passes": "fold,quant-dynamic"}
REPEATS = 5  # of the direct latency comparison with ORT's best configuration
REPEAT_UNDER_S = 15.0  # quantize calls longer than this are timed once (noise is smaller)


# ---- ours ------------------------------------------------------------------------------------


def ours(model_path: Path, calib_npz: Path, out_path: Path, config: dict) -> None:
    """Quantize with onnx-shrink: ``config`` = {"passes": "quant", "sets": [...]}."""
    import onnx_shrink

    onnx_shrink.shrink(
        str(model_path),
        passes=config["passes"],
        sets=tuple(config.get("sets", ())),
        output=str(out_path),
        check=False,
        data=str(calib_npz),
    )


def missing_passes(config: dict) -> list[str]:
    """Pass names of ``config`` that onnx-shrink does not register (yet)."""
    from onnx_shrink.compiler.registry import REGISTRY

    names = [n.strip() for n in str(config["passes"]).split(",") if n.strip()]
    return [n for n in names if n not in REGISTRY]


# ---- the child: one quantize call, its time and peak memory ---------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child_main(job: dict) -> dict:
    """Run one quantize call (``job``) and measure it; returns the JSON-ready result."""
    import numpy as np  # noqa: F401 - imported before the baseline, like every tool import
    import onnx  # noqa: F401
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    tool = job["tool"]
    if tool == "latency":
        return latency_child(job)
    if tool == "ours":
        import onnx_shrink  # noqa: F401
        import onnx_shrink.runtime_check.collect  # noqa: F401
    else:
        from onnxruntime import quantization as q

        from benchmarks.quant_data import NpyStreamReader
    # Every tool's child opens one session before the baseline (ORT's to read the input
    # names): onnxruntime's first session sets up its environment (~10 MiB, thread pools),
    # which is not the quantize call's memory.
    session = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    del session
    logging.disable(logging.WARNING)
    baseline_kib = _status_kib("VmRSS")
    reset = _reset_peak()
    started = time.perf_counter()
    if tool == "ours":
        ours(Path(job["model"]), Path(job["calib_npz"]), Path(job["out"]), job["config"])
    elif tool == "ort-static":
        q.quantize_static(
            job["model"],
            job["out"],
            NpyStreamReader(Path(job["calib_dir"]), inputs),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            calibrate_method=getattr(q.CalibrationMethod, job["method"]),
        )
    elif tool == "ort-dynamic":
        ops = [job["method"]] if job["method"] else None
        q.quantize_dynamic(
            job["model"], job["out"], weight_type=q.QuantType.QInt8, op_types_to_quantize=ops
        )
    else:
        raise ValueError(f"unknown tool {tool!r}")
    seconds = time.perf_counter() - started
    peak_kib = _status_kib("VmHWM")
    return {
        "seconds": seconds,
        "peak_bytes": (peak_kib - baseline_kib) * 1024,
        "baseline_bytes": baseline_kib * 1024,
        "peak_reset": reset,
    }


def latency_child(job: dict) -> dict:
    """Time ``job["candidate"]`` against ``job["reference"]`` in this fresh process, where no
    other session's threads compete: ``repeats`` medians of ``runs`` interleaved pairs."""
    import numpy as np

    from onnx_shrink.runtime_check.bench import compare_latency
    from onnx_shrink.runtime_check.sessions import create_session

    feed = dict(np.load(job["feed"]))
    reference, candidate = create_session(job["reference"]), create_session(job["candidate"])
    ratios = [
        compare_latency(reference, candidate, feed, runs=job["runs"], warmup=5).ratio
        for _ in range(job["repeats"])
    ]
    return {"ratios": sorted(ratios)}


def _child_entry(raw: str) -> int:
    job = json.loads(raw)
    try:
        result = child_main(job)
    except BaseException as e:  # noqa: BLE001 - a crash is a result for the parent
        result = {"error": first_line(e)}
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(job: dict, args: argparse.Namespace, cwd: Path) -> dict:
    """Run ``job`` in a fresh interpreter in ``cwd`` (whatever a tool drops in its working
    directory lands there), killing it past ``args.rss_limit_gib`` or ``args.child_timeout``."""
    rss_limit, timeout = int(args.rss_limit_gib * 2**30), args.child_timeout
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, env=env)
        started, killed, worst = time.monotonic(), None, 0
        while proc.poll() is None:
            worst = max(worst, _rss_of(proc.pid))
            if worst > rss_limit:
                killed = f"killed: RSS passed {rss_limit / 2**30:.0f} GiB"
            elif time.monotonic() - started > timeout:
                killed = f"killed: ran past {timeout:.0f} s"
            if killed:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if killed:
        return {"error": killed, "seconds": time.monotonic() - started, "killed_rss": worst}
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"child exited {proc.returncode}: {tail[:200]}"}


# ---- the parent ------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    key: str
    label: str
    tool: str  # "fp32" | "ort-static" | "ort-dynamic" | "ours"
    method: str | None = None
    ours: dict | None = None

    @property
    def calibrated(self) -> bool:
        return self.tool == "ort-static" or (
            self.tool == "ours" and self.ours is not None and "dynamic" not in self.ours["passes"]
        )


@dataclasses.dataclass
class Row:
    config: Config
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    latency_ratio: float | None = None
    bytes_on_disk: int | None = None
    seconds: dict[int, float] = dataclasses.field(default_factory=dict)
    peak: dict[int, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    model_path: Path | None = None
    outputs: dict[int, Path] = dataclasses.field(default_factory=dict)  # samples -> model
    # The task's first metric of the model calibrated on each sample count.
    first_metric: dict[int, float] = dataclasses.field(default_factory=dict)


def _ours_with(key: str, ours: dict, setting: str) -> Config:
    """Our configuration ``ours`` with one more ``--set`` option."""
    changed = {**ours, "sets": [*ours.get("sets", ()), setting]}
    return Config(key, f"ours: {ours['passes']} --set {setting}", "ours", ours=changed)


def configs_for(name: str, ours_static: dict, ours_dynamic: dict) -> list[Config]:
    configs = [Config("fp32", "fp32", "fp32")]
    configs += [
        Config(f"ort-{m.lower()}", f"ORT static QDQ per-channel {m}", "ort-static", method=m)
        for m in STATIC_METHODS
    ]
    configs.append(
        Config("ours-static", f"ours: {ours_static['passes']}", "ours", ours=ours_static)
    )
    # The same calibration method as ORT's default, for a like-for-like wall time.
    configs.append(_ours_with("ours-minmax", ours_static, "quant.calibration=minmax"))
    if name in BIAS_CORRECTED_MODELS:
        configs.append(_ours_with("ours-bias", ours_static, "quant.bias_correction=true"))
    if name in DYNAMIC_MODELS:
        configs.append(Config("ort-dynamic", "ORT quantize_dynamic QInt8", "ort-dynamic"))
        if name in CONV_MODELS:  # ORT's default also turns Conv into ConvInteger
            configs.append(
                Config(
                    "ort-dynamic-matmul",
                    "ORT quantize_dynamic QInt8, MatMul only",
                    "ort-dynamic",
                    method="MatMul",
                )
            )
        configs.append(
            Config("ours-dynamic", f"ours: {ours_dynamic['passes']}", "ours", ours=ours_dynamic)
        )
    return configs


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


def bench_model(name: str, args: argparse.Namespace, workdir: Path) -> tuple[list[Row], dict]:
    from benchmarks.quant_data import load_task, write_calibration
    from onnx_shrink.compiler import io
    from onnx_shrink.runtime_check.bench import compare_latency
    from onnx_shrink.runtime_check.sessions import create_session

    samples = sorted(args.samples)
    log(f"{name}: preparing data")
    task = load_task(name, max(samples), quick=args.quick)
    folder = workdir / name
    calib = {n: write_calibration(task, n, folder / f"calib-{n}") for n in samples}
    ort_model, pre_note, pre_seconds = ort_input(task.model, folder, calib, args)
    info = {"split": task.split, "latency_input": task.latency_input, "pre": pre_note}
    info["pre_seconds"] = pre_seconds
    info["fp32_bytes"] = io.file_bytes(task.model)

    reference = create_session(task.model)
    reference_out = task.predict(reference)
    rows = []
    for config in configs_for(name, args.ours_static, args.ours_dynamic):
        row = Row(config)
        rows.append(row)
        if config.tool == "fp32":
            row.model_path = task.model
        else:
            _quantize_all(row, name, task, ort_model, calib, samples, folder, args)
        if row.model_path is None:
            continue
        log(f"{name}: evaluating {config.label}")
        row.bytes_on_disk = io.file_bytes(row.model_path)
        try:
            session = create_session(row.model_path)
            row.metrics = task.fidelity(reference_out, task.predict(session))
            _first_metric_per_count(row, task, reference_out)
            if config.tool != "fp32":
                comparison = compare_latency(
                    reference, session, task.latency_feed, runs=args.runs, warmup=5
                )
                row.latency_ratio = comparison.ratio
            else:
                row.latency_ratio = 1.0
        except Exception as e:  # noqa: BLE001
            row.notes.append(f"RUN FAILED: {first_line(e)}")
        finally:
            session = None
    _note_entropy_ranges(rows)
    info["metrics"] = task.metrics
    reference = None  # no session of this process competes with the direct comparison
    info["versus_best"] = _versus_best(rows, task, args, folder)
    return rows, info


def _first_metric_per_count(row: Row, task, reference_out) -> None:
    """The task's first metric of ``row``'s model at every sample count it was calibrated
    on: a quantized model can sit on a knife-edge that one count's figure hides. The model
    ``row.metrics`` came from is not evaluated again."""
    from onnx_shrink.runtime_check.sessions import create_session

    if not row.config.calibrated:
        return
    metric = task.metrics[0]
    for n, path in sorted(row.outputs.items()):
        if path == row.model_path:
            row.first_metric[n] = row.metrics[metric]
            continue
        session = create_session(path)
        row.first_metric[n] = task.fidelity(reference_out, task.predict(session))[metric]
        session = None


def fidelity_per_count(rows: list[Row], samples: list[int], metric: str) -> list[str]:
    """Our default's (and our bias-corrected) first metric at each sample count against ORT's
    best static row at the same count (higher is better for every task's first metric)."""
    by_key = {r.config.key: r for r in rows}
    theirs = [r for r in rows if r.config.tool == "ort-static"]
    versus = {}  # ORT's best static row at each count, the same for each of our rows
    for n in samples:
        at_n = [r for r in theirs if n in r.first_metric]
        best = max(at_n, key=lambda r: r.first_metric[n]) if at_n else None
        method = best.config.label.rsplit(" ", 1)[-1] if best else ""
        versus[n] = f"{best.first_metric[n]:.3f} ({method})" if best else "—"
    lines = []
    for key, what in (("ours-static", "ours"), ("ours-bias", "ours bias-corrected")):
        ours = by_key.get(key)
        if ours is None or not ours.first_metric:
            continue
        cells = []
        for n in samples:
            mine = f"{ours.first_metric[n]:.3f}" if n in ours.first_metric else "—"
            cells.append(f"{n}: {mine} vs {versus[n]}")
        lines.append(
            f"- {metric}, {what} vs ORT's best static method at each sample count: "
            + "; ".join(cells)
        )
    return lines


def _versus_best(rows: list[Row], task, args, folder: Path) -> list[str]:
    """Our rows timed directly against ORT's best-fidelity row (interleaved pairs, in a fresh
    process): the ratios to fp32 come from separate runs, too noisy on a shared machine to
    rank two quantized models that are close, and sessions left in this process skew them."""
    import numpy as np

    metric = task.metrics[0]  # higher is better for every task's first metric
    theirs = [r for r in rows if r.config.tool.startswith("ort-") and metric in r.metrics]
    if not theirs:
        return []
    best = max(theirs, key=lambda r: r.metrics[metric])
    feed = folder / "latency_feed.npz"
    np.savez(feed, **task.latency_feed)
    lines = []
    for ours in (r for r in rows if r.config.tool == "ours" and r.model_path is not None):
        job = {
            "tool": "latency",
            "reference": str(best.model_path),
            "candidate": str(ours.model_path),
            "feed": str(feed),
            "runs": args.runs,
            "repeats": REPEATS,
        }
        result = run_child(job, args, folder)
        if "error" in result:
            error = result["error"]
            lines.append(f"- {ours.config.label}: direct latency comparison failed: {error}")
            continue
        ratios = result["ratios"]
        lines.append(
            f"- {ours.config.label}: latency ÷ {best.config.label} (ORT's best {metric}): "
            f"median {ratios[REPEATS // 2]:.2f} of {REPEATS} repetitions of {args.runs} "
            f"interleaved pairs (range {ratios[0]:.2f}-{ratios[-1]:.2f})"
        )
    return lines


def _quantize_all(row, name, task, ort_model, calib, samples, folder, args) -> None:
    config = row.config
    if config.tool == "ours":
        missing = missing_passes(config.ours)
        if missing:
            row.notes.append(f"pass not available: {', '.join(missing)}")
            return
    counts = samples if config.calibrated else [max(samples)]
    errors: dict[str, list[int]] = {}
    for n in counts:
        out = folder / f"{config.key}-{n}.onnx"
        job = {
            "tool": config.tool,
            "method": config.method,
            "model": str(task.model if config.tool == "ours" else ort_model),
            "calib_dir": str(calib[n].parent),
            "calib_npz": str(calib[n]),
            "out": str(out),
            "config": config.ours,
        }
        log(
            f"{name}: {config.label}, {n} samples"
            if config.calibrated
            else f"{name}: {config.label}"
        )
        result = _timed_child(job, args, folder)
        if "error" in result:
            errors.setdefault(result["error"], []).append(n)
            if "killed_rss" in result:
                row.peak[n] = -int(result["killed_rss"])  # shown as "> X"
            continue
        row.seconds[n], row.peak[n] = result["seconds"], int(result["peak_bytes"])
        if not result.get("peak_reset", True):
            row.notes.append("peak RSS not reset: includes imports")
        if out.exists():
            row.model_path = row.outputs[n] = out
            row.notes = [x for x in row.notes if not x.startswith("fidelity from")]
            if config.calibrated and n != max(samples):
                row.notes.append(f"fidelity from {n} samples")
    for error, where in errors.items():
        at = f" with {'/'.join(map(str, where))} samples" if config.calibrated else ""
        row.notes.append(f"FAILED{at}: {error}")
    if not config.calibrated and config.tool != "fp32":
        row.notes.append("no calibration (one run)")


def _timed_child(job: dict, args, folder: Path) -> dict:
    """``run_child`` repeated ``args.timing_repeats`` times (once when the first call takes
    over ``REPEAT_UNDER_S`` or fails): the last result, with the median seconds and peak."""
    results = [run_child(job, args, folder)]
    while (
        len(results) < args.timing_repeats
        and "error" not in results[-1]
        and results[0]["seconds"] <= REPEAT_UNDER_S
    ):
        results.append(run_child(job, args, folder))
    if "error" in results[-1]:
        return results[-1]
    seconds = statistics.median_high(r["seconds"] for r in results)
    peak = statistics.median_high(r["peak_bytes"] for r in results)
    return {**results[-1], "seconds": seconds, "peak_bytes": peak}


def _note_entropy_ranges(rows: list[Row]) -> None:
    by_key = {r.config.key: r for r in rows}
    minmax = by_key.get("ort-minmax")
    for key in ("ort-entropy", "ort-percentile"):
        other = by_key.get(key)
        common = sorted(set(minmax.outputs) & set(other.outputs)) if minmax and other else []
        if not common:
            continue
        n = common[-1]  # the same calibration samples for both
        same, total = same_ranges(minmax.outputs[n], other.outputs[n])
        if total:
            other.notes.append(f"{same}/{total} activation scales = MinMax's at {n} samples")


# ---- output ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _per_samples(row: Row, samples: list[int], values: dict[int, float], spec: str) -> str:
    if not row.config.calibrated and values:
        (only,) = values.values()
        return format(only, spec) if only >= 0 else f"> {-only:{spec}}"
    cells = []
    for n in samples:
        value = values.get(n)
        if value is None:
            cells.append("—")
        elif value < 0:
            cells.append(f"> {-value:{spec}}")  # killed at this RSS
        else:
            cells.append(format(value, spec))
    return " / ".join(cells)


def table(rows: list[Row], samples: list[int], metrics: tuple[str, ...]) -> str:
    at = "/".join(str(n) for n in samples)
    header = ["configuration", *metrics, f"{metrics[0]} @{at}", "latency × fp32", "bytes"]
    header.append(f"calib s @{at}")
    header += [f"calib peak RSS MiB @{at}", "note"]
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| --- |" + " ---: |" * (len(header) - 2) + " --- |")
    for r in rows:
        cells = [r.config.label]
        cells += [cell(r.metrics.get(m), ".4f") for m in metrics]
        per_count = _per_samples(r, samples, r.first_metric, ".3f") if r.first_metric else "—"
        cells.append(per_count)
        cells.append(cell(r.latency_ratio, ".2f"))
        cells.append(cell(r.bytes_on_disk, ","))
        if r.config.tool == "fp32":
            cells += ["—", "—"]
        else:
            cells.append(_per_samples(r, samples, r.seconds, ".2f"))
            peak_mib = {n: v / MIB for n, v in r.peak.items()}
            cells.append(_per_samples(r, samples, peak_mib, ".0f"))
        cells.append("; ".join(r.notes))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(results: dict, command: str, args: argparse.Namespace, heading: str) -> str:
    from benchmarks.results import provenance

    samples = sorted(args.samples)
    parts = [
        heading,
        "",
        *provenance(command, PACKAGES),
        "",
        "ORT static = `quantize_static(QDQ, per_channel=True, QUInt8 activations, QInt8 "
        "weights, reduce_range=False)` with each calibration method's defaults, after "
        "`quant_pre_process`; ORT dynamic = `quantize_dynamic(weight_type=QInt8)`. Fidelity "
        f"on held-out data, from the model calibrated on {max(samples)} samples; the first "
        f"metric also from each sample count's model (`@{'/'.join(map(str, samples))}`). "
        "Latency: "
        f"median of {args.runs} interleaved fp32/quantized pairs on one input, ORT CPU, "
        "default threads. Calibration s: the whole quantize call, median of "
        f"{args.timing_repeats} fresh processes (1 where a call takes over "
        f"{REPEAT_UNDER_S:g} s). Peak RSS: peak resident memory of the quantize call in a "
        "fresh process over its RSS before the call (the same median; "
        f'"> X": killed past {args.rss_limit_gib:g} GiB). See benchmarks/quant_vs_ort.py.',
        "",
    ]
    for name, (rows, info, metrics) in results.items():
        parts += [
            f"### {name}",
            "",
            f"Data: {info['split']}. Latency input: {info['latency_input']}. "
            f"ORT input: {info['pre']}. fp32 file: {info['fp32_bytes'] / MIB:.1f} MiB.",
            "",
            table(rows, samples, metrics),
            "",
            *ratios(rows, samples, info["pre_seconds"]),
            *fidelity_per_count(rows, samples, metrics[0]),
            *info["versus_best"],
            "",
        ]
    return "\n".join(parts)


def ratios(rows: list[Row], samples: list[int], pre_seconds: float) -> list[str]:
    """The issue's two cost criteria as ratios: our static quantization's wall time over
    ``quantize_static``'s (MinMax, its default, and the histogram methods; also with ORT's
    recommended ``quant_pre_process`` counted), and our calibration peak RSS over Entropy's."""
    by_key = {r.config.key: r for r in rows}
    ours = by_key.get("ours-static")
    if ours is None or not ours.seconds:
        return []

    def over(values: dict[int, float], theirs: dict[int, float], extra: float = 0.0) -> str:
        cells = []
        for n in samples:
            a, b = values.get(n), theirs.get(n)
            if a is None or b is None or a < 0 or b == 0:
                cells.append("—")
            elif b < 0:  # theirs was killed at -b: the ratio is below a / -b
                cells.append(f"< {a / -b:.2f}")
            else:
                cells.append(f"{a / (b + extra):.2f}")
        return " / ".join(cells)

    at = "/".join(str(n) for n in samples)
    lines = [f"Ours ({ours.config.label.removeprefix('ours: ')}) at {at} samples:"]
    for key in ("ort-minmax", "ort-entropy", "ort-percentile"):
        theirs = by_key.get(key)
        if theirs is None:
            continue
        lines.append(
            f"- wall time ÷ {theirs.config.label}: {over(ours.seconds, theirs.seconds)}; "
            f"with ORT's `quant_pre_process` counted: "
            f"{over(ours.seconds, theirs.seconds, pre_seconds)}"
        )
    minmax, theirs = by_key.get("ours-minmax"), by_key.get("ort-minmax")
    if minmax is not None and theirs is not None and minmax.seconds:
        lines.append(
            f"- the same calibration method: {minmax.config.label.removeprefix('ours: ')} "
            f"÷ {theirs.config.label}: {over(minmax.seconds, theirs.seconds)}"
        )
    entropy = by_key.get("ort-entropy")
    if entropy is not None:
        lines.append(
            "- calibration peak RSS ÷ ORT Entropy's: "
            + over({n: float(v) for n, v in ours.peak.items()}, entropy.peak)
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return _child_entry(argv[1])
    from benchmarks.quant_data import LARGE_MODELS, MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--samples", default=None, help="calibration sample counts (8,32,128)")
    parser.add_argument("--runs", type=int, default=None, help="latency pairs (default 50)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8,32 samples, 10 runs")
    parser.add_argument("--rss-limit-gib", type=float, default=8.0, help="kill a child past it")
    parser.add_argument("--child-timeout", type=float, default=900.0, help="seconds")
    parser.add_argument(
        "--timing-repeats", type=int, default=3, help="fresh processes per quantize call (median)"
    )
    parser.add_argument("--ours-static", default=OURS_STATIC["passes"], help="pass spec")
    parser.add_argument("--ours-dynamic", default=OURS_DYNAMIC["passes"], help="pass spec")
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    args.samples = [
        int(s) for s in (args.samples or ("8,32" if args.quick else "8,32,128")).split(",")
    ]
    args.runs = args.runs or (10 if args.quick else 50)
    args.ours_static = {"passes": args.ours_static}
    args.ours_dynamic = {"passes": args.ours_dynamic}
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS + LARGE_MODELS]
    if unknown:
        known = ", ".join(MODELS + LARGE_MODELS)
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {known}")
    # The large model has a section of its own, so either run leaves the other's table.
    large = all(m in LARGE_MODELS for m in models)
    if any(m in LARGE_MODELS for m in models) and not large:
        parser.error(f"run {', '.join(LARGE_MODELS)} on its own (it has its own section)")
    heading = HEADING_LARGE if large else HEADING

    import onnxruntime as ort

    from benchmarks.results import publish

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ort.set_default_logger_severity(3)
    started = time.perf_counter()
    results = {}
    with tempfile.TemporaryDirectory(prefix="quant-vs-ort-") as tmp:
        for name in models:
            rows, info = bench_model(name, args, Path(tmp))
            results[name] = (rows, info, info["metrics"])
            log(f"{name}: done at {time.perf_counter() - started:.0f} s")
    command = " ".join([".venv/bin/python", "benchmarks/quant_vs_ort.py", *map(shlex.quote, argv)])
    text = section(results, command, args, heading)
    publish(heading, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
