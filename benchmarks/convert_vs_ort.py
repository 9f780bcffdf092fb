"""Side by side: ``fp16`` and ``quant-weight`` against the converters onnxruntime ships.

* ``fp16``: ours (calibrated float islands, rule 3 of ``passes/fp16.py``) against
  ``onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True)`` with its
  default op block list, the converter ORT's transformer optimizer and most export scripts use.
* ``quant-weight``: ours (4-bit, blocks of 32, symmetric, MatMul and Gather, MatMulNBits with
  accuracy_level 4) against ``onnxruntime.quantization.matmul_nbits_quantizer
  .MatMulNBitsQuantizer`` (RTN) twice: with its defaults (blocks of 128, asymmetric, MatMul
  only) and with our settings.

* ``fp32``: ``fold,fp32,quant`` on models that come in half precision
  (``benchmarks.half_models``) against ``quantize_static`` and ``quantize_dynamic`` on the
  same files, and ``quantize_static`` on our widened file.

Same models (``benchmarks.quant_data`` tasks; ``half_models`` for ``fp32``), same held-out
evaluation data and fidelity metrics as ``quant_vs_ort.py``. Per row:

* fidelity against fp32 (``fp32``: the original model) on the evaluation split, and whether
  onnxruntime CPU runs the model with every optimization on (a failure is reported, not raised);
* latency x fp32: median of per-pair ratios over interleaved runs on the task's latency input
  (onnxruntime CPU, default threads); on CPU, float16 runs through Casts around kernels that
  have no float16 version, so fp16 rows show its cost, not a speed-up;
* bytes on disk; conversion wall time (in this process, the same for every tool; loading and
  saving included), median of ``--repeat`` calls; Casts in the saved graph (fp16).

Run from the repository root: ``.venv/bin/python benchmarks/convert_vs_ort.py fp16`` (or
``quant-weight``, ``fp32``, or several); ``--no-write`` leaves RESULTS.md alone. Each
writes its section.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import half_models, quant_data  # noqa: E402
from benchmarks.results import cell, command_line, first_line, provenance, publish  # noqa: E402
from onnx_shrink.compiler import io  # noqa: E402
from onnx_shrink.runtime_check import bench, sessions  # noqa: E402

PACKAGES = ("onnx", "onnx-ir", "onnxscript", "onnxruntime")
CALIBRATION = 32
LATENCY_RUNS = 40


@dataclasses.dataclass
class Row:
    config: str
    fidelity: dict[str, float] = dataclasses.field(default_factory=dict)
    latency: float | None = None
    bytes_on_disk: int | None = None
    seconds: float | None = None
    casts: int | None = None
    note: str = ""


Convert = Callable[[Path, Path, Path], None]  # (model, calibration .npz, output)


@dataclasses.dataclass(frozen=True)
class Suite:
    heading: str
    models: tuple[str, ...]
    configs: tuple[tuple[str, Convert], ...]
    explain: str
    load: Callable[[str, int], quant_data.Task] = quant_data.load_task
    reference: str = "fp32"  # the first row: the model as it comes


def ours(passes: str, *sets: str) -> Convert:
    def convert(model: Path, calib: Path, out: Path) -> None:
        import onnx_shrink

        onnx_shrink.shrink(
            str(model), passes=passes, sets=sets, output=str(out), check=False, calibration=calib
        )

    return convert


def ort_fp16(model: Path, calib: Path, out: Path) -> None:
    from onnxruntime.transformers import float16

    converted = float16.convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    onnx.save_model(converted, str(out))


def ort_static(widen_first: bool = False) -> Convert:
    """``quantize_static`` (QDQ, per-channel, MinMax: its defaults but per-channel) on the
    model, or on the model ``fp32`` widened (what a user of it would have to write)."""

    def convert(model: Path, calib: Path, out: Path) -> None:
        from onnxruntime import quantization as q

        import onnx_shrink

        if widen_first:
            widened = out.with_suffix(".fp32.onnx")
            onnx_shrink.shrink(str(model), passes="fp32", output=str(widened), check=False)
            model = widened
        inputs = [i.name for i in onnx.load(str(model), load_external_data=False).graph.input]
        q.quantize_static(
            str(model),
            str(out),
            quant_data.NpyStreamReader(calib.parent, inputs),
            quant_format=q.QuantFormat.QDQ,
            per_channel=True,
        )

    return convert


def ort_dynamic(model: Path, calib: Path, out: Path) -> None:
    from onnxruntime import quantization as q

    q.quantize_dynamic(str(model), str(out), weight_type=q.QuantType.QInt8)


def ort_nbits(**options) -> Convert:
    def convert(model: Path, calib: Path, out: Path) -> None:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), **options)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return convert


def ort_gptq(**options) -> Convert:
    """``MatMulNBitsQuantizer`` with its GPTQ config, fed the calibration file one sample a
    run through a ``CalibrationDataReader`` (its GPTQ code converts inputs through torch)."""

    def convert(model: Path, calib: Path, out: Path) -> None:
        from onnxruntime.quantization import CalibrationDataReader
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        try:
            import torch  # noqa: F401  (onnxruntime's GPTQ imports it; say so plainly)
        except ImportError as e:
            raise RuntimeError("needs torch (pip install torch==2.13.0+cpu)") from e

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                with np.load(calib) as arrays:
                    count = len(arrays[arrays.files[0]])
                    self.feeds = [
                        {k: arrays[k][i : i + 1] for k in arrays.files} for i in range(count)
                    ]
                self.index = 0

            def get_next(self):
                if self.index >= len(self.feeds):
                    return None
                self.index += 1
                return self.feeds[self.index - 1]

            def __iter__(self):  # onnxruntime's GPTQ iterates a copy of the reader
                return iter(self.feeds)

        algo = nbits.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=Reader(), actorder=True, op_types_to_quantize=("MatMul",)
        )
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), algo_config=algo, **options)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return convert


def ort_hqq(**options) -> Convert:
    """``MatMulNBitsQuantizer`` with its HQQ config (data-free; it runs through torch)."""

    def convert(model: Path, calib: Path, out: Path) -> None:
        from onnxruntime.quantization import matmul_nbits_quantizer as nbits

        try:
            import torch  # noqa: F401  (onnxruntime's HQQ imports it; say so plainly)
        except ImportError as e:
            raise RuntimeError("needs torch (pip install torch==2.13.0+cpu)") from e
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
        quantizer = nbits.MatMulNBitsQuantizer(onnx.load(str(model)), algo_config=algo, **options)
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)

    return convert


SUITES = {
    "fp16": Suite(
        "## fp16 vs onnxruntime's float16 converter",
        ("digits", "minilm", "ppocr-rec", "ppocr-det"),
        (
            ("ours: fp16", ours("fp16")),
            ("ours: fold,fp16", ours("fold,fp16")),
            ("ORT convert_float_to_float16(keep_io_types=True)", ort_fp16),
        ),
        "Ours calibrates on the first 32 calibration samples (float islands where values leave "
        "float16's range); ORT's converter uses none.",
    ),
    "quant-weight": Suite(
        "## quant-weight vs onnxruntime's MatMulNBitsQuantizer",
        ("minilm", "ppocr-rec"),
        (
            ("ours: quant-weight", ours("quant-weight")),
            ("ours: fold,quant-weight", ours("fold,quant-weight")),
            (
                "ours: fold,quant-weight --set quant-weight.rounding=gptq",
                ours("fold,quant-weight", "quant-weight.rounding=gptq"),
            ),
            (
                "ours: fold,quant-weight --set quant-weight.ranges=mse",
                ours("fold,quant-weight", "quant-weight.ranges=mse"),
            ),
            (
                "ours: fold,quant-weight --set quant-weight.ranges=mse quant-weight.rounding=gptq",
                ours("fold,quant-weight", "quant-weight.ranges=mse", "quant-weight.rounding=gptq"),
            ),
            (
                "ours: fold,quant-weight, MatMul only",
                ours("fold,quant-weight", "quant-weight.op_types=MatMul"),
            ),
            (
                "ours: fold,quant-weight --set quant-weight.rounding=gptq, MatMul only",
                ours(
                    "fold,quant-weight",
                    "quant-weight.rounding=gptq",
                    "quant-weight.op_types=MatMul",
                ),
            ),
            (
                "ours: fold,quant-weight --set quant-weight.symmetric=false "
                "quant-weight.ranges=mse "
                "quant-weight.rounding=gptq, MatMul only",
                ours(
                    "fold,quant-weight",
                    "quant-weight.symmetric=false",
                    "quant-weight.ranges=mse",
                    "quant-weight.rounding=gptq",
                    "quant-weight.op_types=MatMul",
                ),
            ),
            ("ORT MatMulNBitsQuantizer, defaults", ort_nbits()),
            (
                "ORT MatMulNBitsQuantizer, our settings",
                ort_nbits(
                    block_size=32,
                    is_symmetric=True,
                    accuracy_level=4,
                    op_types_to_quantize=("MatMul", "Gather"),
                ),
            ),
            (
                "ORT MatMulNBitsQuantizer HQQ, blocks of 32, MatMul only",
                ort_hqq(block_size=32, accuracy_level=4, op_types_to_quantize=("MatMul",)),
            ),
            (
                "ORT MatMulNBitsQuantizer GPTQ, our settings, MatMul only",
                ort_gptq(
                    block_size=32,
                    is_symmetric=True,
                    accuracy_level=4,
                    op_types_to_quantize=("MatMul",),
                ),
            ),
        ),
        "Defaults: 4-bit RTN, blocks of 128, asymmetric, MatMul only. Our settings: blocks of "
        "32, symmetric, accuracy_level 4, MatMul and Gather (ours' defaults). GPTQ: "
        "onnxruntime's `GPTQWeightOnlyQuantConfig(actorder=True)` (it takes MatMul only) at our "
        "settings, against ours with `rounding=gptq`; both calibrate on the first 32 "
        "calibration samples, one a run (onnxruntime's GPTQ needs torch installed). "
        "`ranges=mse`: each block's range shrunk to the factor with the least squared error "
        "(no data); onnxruntime's data-free counterpart is HQQ (asymmetric, through torch).",
    ),
    "fp32": Suite(
        "## fp32,quant on half-precision models vs onnxruntime's quantizers",
        ("slovorez-fp16", "csmask-fp16"),
        (
            ("ours: fold,quant", ours("fold,quant")),
            ("ours: fold,fp32", ours("fold,fp32")),
            ("ours: fold,fp32,quant", ours("fold,fp32,quant")),
            ("ORT quantize_static (QDQ, per-channel, MinMax)", ort_static()),
            ("ORT quantize_dynamic", ort_dynamic),
            ("ORT quantize_static on the fp32-widened file", ort_static(widen_first=True)),
        ),
        "Models that compute in float16 (half_models.py); fidelity and latency against the "
        "original file, which computes in float16. `quant` alone leaves float16 layers as they "
        "are; `fp32` widens them first. onnxruntime's quantizers have no such step: the last "
        "row gives them our widened file. Calibration: the first 32 samples.",
        load=half_models.load_task,
        reference="original (float16)",
    ),
}


@dataclasses.dataclass(frozen=True)
class Subject:
    """One model's task, its calibration file, its fp32 session and predictions."""

    task: quant_data.Task
    calib: Path
    fp32: ort.InferenceSession
    reference: object


def casts(path: Path) -> int:
    return sum(n.op_type == "Cast" for n in onnx.load(str(path)).graph.node)


def measure(name: str, convert: Convert, subject: Subject, out: Path, repeat: int) -> Row:
    task, row, times = subject.task, Row(name), []
    for _ in range(repeat):
        started = time.perf_counter()
        convert(task.model, subject.calib, out)
        times.append(time.perf_counter() - started)
    row.seconds = statistics.median(times)
    row.bytes_on_disk = io.file_bytes(out)
    row.casts = casts(out)
    try:
        candidate = sessions.create_session(out, stop_spinning=True)
        row.fidelity = task.fidelity(subject.reference, task.predict(candidate))
        row.latency = bench.compare_latency(
            subject.fp32, candidate, task.latency_feed, runs=LATENCY_RUNS
        ).ratio
    except Exception as e:  # noqa: BLE001 - a model onnxruntime cannot run is a result
        row.note = f"RUN FAILED: {first_line(e)}"
    return row


def bench_model(suite: Suite, name: str, workdir: Path, repeat: int) -> tuple[object, list[Row]]:
    task = suite.load(name, CALIBRATION)
    calib = quant_data.write_calibration(task, CALIBRATION, workdir / name)
    fp32 = sessions.create_session(task.model, stop_spinning=True)
    subject = Subject(task, calib, fp32, task.predict(fp32))
    fidelity = task.fidelity(subject.reference, subject.reference)
    rows = [Row(suite.reference, fidelity, 1.0, io.file_bytes(task.model), casts=casts(task.model))]
    for config, convert in suite.configs:
        print(f"  {name}: {config}", file=sys.stderr, flush=True)
        out = workdir / name / f"{len(rows)}.onnx"
        try:
            rows.append(measure(config, convert, subject, out, repeat))
        except Exception as e:  # noqa: BLE001 - a failing tool is a result, not a crash
            rows.append(Row(config, note=f"FAILED: {first_line(e)}"))
    return task, rows


def table(task, rows: list[Row]) -> list[str]:
    metrics = list(task.metrics)
    lines = [
        f"### {task.name}",
        "",
        f"Evaluation: {task.split}. Latency input: {task.latency_input}.",
        "",
        "| configuration | " + " | ".join(metrics) + " | latency × fp32 | bytes | s | Casts "
        "| note |",
        "| --- | " + " | ".join("---:" for _ in metrics) + " | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        values = " | ".join(cell(r.fidelity.get(m), ".4f") for m in metrics)
        lines.append(
            f"| {r.config} | {values} | {cell(r.latency, '.2f')} | {cell(r.bytes_on_disk, ',')} "
            f"| {cell(r.seconds, '.2f')} | {cell(r.casts, 'd')} | {r.note} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suites", nargs="+", choices=sorted(SUITES))
    parser.add_argument("--models", default="", help="comma-separated subset of the suite's")
    parser.add_argument("--repeat", type=int, default=3, help="conversions per tool (median)")
    parser.add_argument("--no-write", action="store_true", help="print only; keep RESULTS.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    ort.set_default_logger_severity(3)
    command = command_line("benchmarks/convert_vs_ort.py", argv)
    for key in args.suites:
        suite = SUITES[key]
        wanted = [m for m in args.models.split(",") if m] or list(suite.models)
        body: list[str] = []
        with tempfile.TemporaryDirectory(prefix=f"{key}-vs-ort-") as tmp:
            for name in wanted:
                print(f"{key}: {name}", file=sys.stderr, flush=True)
                task, rows = bench_model(suite, name, Path(tmp), args.repeat)
                body += table(task, rows)
        text = "\n".join(
            [
                suite.heading,
                "",
                *provenance(command, PACKAGES),
                "",
                f"{suite.explain} Fidelity on the held-out evaluation split (as in the "
                "quantization section); latency: median of "
                f"{LATENCY_RUNS} interleaved fp32/candidate pairs, onnxruntime CPU, default "
                f"threads; s: the conversion call, median of {args.repeat}.",
                "",
                *body,
            ]
        )
        publish(suite.heading, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
