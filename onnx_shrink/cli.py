"""The ``onnx-shrink`` command: a thin shell over the library (args in, report out, exit code).

    onnx-shrink MODEL.onnx --passes fold ...     compile (and check against the original)
    onnx-shrink check REF.onnx CAND.onnx ...     compare two models
    onnx-shrink bench MODEL.onnx ...             latency, throughput, memory, size

Exit codes (the README lists what each covers): 0 done; 1 a tolerance broken (the check's:
reports are still written; a pass's under --strict: nothing is); 2 bad input (model, pass
spec, data, options) or a pass that failed, one line on stderr; 3 the result written but
unchecked; 4 out of memory, or a bug (with its traceback); 130 interrupted. With 2 and 3 the
result may be written: the line says so, and the summary and reports still come.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import logging
import math
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from rich.console import Console
from rich.status import Status

from onnx_shrink import console, preflight
from onnx_shrink.api import CheckOptions, ShrinkResult, default_output_path, shrink
from onnx_shrink.cli_args import (
    DEFAULT_LATENCY_RUNS,
    build_bench_parser,
    build_check_parser,
    build_parser,
)
from onnx_shrink.compiler import io, registry, spec
from onnx_shrink.compiler.io import data_files
from onnx_shrink.errors import CheckFailed, ShrinkError
from onnx_shrink.runtime_check import bench, checker, report
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.numeric_report import DEFAULT_TOLERANCES, NumericReport, Tolerances
from onnx_shrink.runtime_check.progress import Progress
from onnx_shrink.warning_records import WarningRecords

logger = logging.getLogger("onnx_shrink")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: Callable[[argparse.Namespace, Console], int]
    if argv and argv[0] == "check":
        args, command = build_check_parser().parse_args(argv[1:]), _run_check
    elif argv and argv[0] == "bench":
        args, command = build_bench_parser().parse_args(argv[1:]), _run_bench
    else:
        args, command = build_parser().parse_args(argv), _run_compile
    _configure_logging(args)
    warned = WarningRecords()
    logger.addHandler(warned)
    args.warnings = warned.messages  # the reports carry them
    try:
        return _run(args, command)
    finally:
        logger.removeHandler(warned)


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace, Console], int]) -> int:
    """``command`` with its console, its exceptions turned into messages and exit codes."""
    # onnxruntime can crash the process outright (a float16 FusedMatMul's session: SIGSEGV):
    # then at least the Python stack says what was running, not an empty log.
    if sys.__stderr__ is not None:
        faulthandler.enable(sys.__stderr__)
    out = Console(quiet=args.quiet, highlight=False)
    if not out.is_terminal:
        out.width = 120  # logs and CI captures: wide enough that table cells don't wrap
    try:
        _check_report_paths(args)
        return command(args, out)
    except CheckFailed as e:
        if args.debug:
            traceback.print_exc()
        print(f"onnx-shrink: check failed: {e}", file=sys.stderr)
        return e.exit_code
    except ShrinkError as e:
        if args.debug:
            traceback.print_exc()
        print(f"onnx-shrink: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnx-shrink: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:  # a size asked for (an --input-shape) or a model too large
        if args.debug:
            traceback.print_exc()
        print(f"onnx-shrink: out of memory: {e or 'MemoryError'}", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as e:  # a bug: never exit 1, which scripts read as a failed check
        traceback.print_exc()
        print(
            f"onnx-shrink: internal error: {type(e).__name__}: {e} (a bug in onnx-shrink; "
            "please report it with the traceback above)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


EXIT_INTERNAL = 4
"""Exit code of running out of memory, or of a bug outside a pass (an error onnx-shrink did
not raise on purpose; inside a pass it is that pass's failure, exit 2, naming the pass):
1 is a broken tolerance, 2 bad input, 3 a result that could not be checked."""


def _tolerances(args: argparse.Namespace, default: Tolerances = Tolerances()) -> Tolerances:
    """The tolerances given on the command line, or ``default`` when none is."""
    given = Tolerances(
        atol=args.atol,
        rtol=args.rtol,
        min_cosine=args.min_cosine,
        max_accuracy_drop=args.max_accuracy_drop,
        min_agreement=args.min_agreement,
    )
    return given if given.any else default


def _run_compile(args: argparse.Namespace, out: Console) -> int:
    if args.list_passes:
        console.print_all(out, console.pass_list_tables(registry.PASS_CLASSES))
        return 0
    if args.model is None:
        raise ShrinkError("no model given (usage: onnx-shrink MODEL.onnx --passes fold)")
    if args.passes is None and args.recipe is None:
        raise ShrinkError("no passes given; use --passes NAME[,NAME...] or --recipe FILE")
    # Validate everything cheap before the model is touched: a typo must cost nothing.
    _refuse_idle_flags(args)
    _at_least(0, runs=args.runs)  # 0: no latency
    spec.parse_spec(args.passes, args.sets, args.recipe)
    options = CheckOptions(
        data=args.data,
        labels=args.labels,
        input_shapes=data_mod.parse_input_shapes(args.input_shape),
        tolerances=_tolerances(args),
        provider=args.ep,
        layers=args.layers,
        **_latency(args),
        verify_each=args.verify_each,
        strict=args.strict,
    )
    with _shown_if_unchecked(args, out), out.status("compiling...") as status:
        result = shrink(
            args.model,
            args.passes,
            output=args.output or default_output_path(args.model),
            sets=args.sets,
            recipe=args.recipe,
            dump_dir=args.dump_dir,
            external_data={"auto": None, "yes": True, "no": False}[args.external_data],
            check=False if args.no_check else options,
            data=args.data,  # calibrates (by default) even without the check
            calibration=args.calibration,
            input_shapes=options.input_shapes,
            on_pass_start=lambda i, p: status.update(f"running pass {i + 1}: {p.name}..."),
            on_calibration=_shown(status, out),
            sensitivity=args.sensitivity,
        )
    _show(args, out, result)
    if result.verification is not None:
        _judge(result.verification.numeric)
    return 0


def _show(args: argparse.Namespace, out: Console, result: ShrinkResult) -> None:
    """The summary on the console and the ``--report`` / ``--html`` files."""
    _print_compile(out, result)
    _write_reports(args, result.to_dict(), lambda: report.html_report(shrink=result))


@contextlib.contextmanager
def _shown_if_unchecked(args: argparse.Namespace, out: Console) -> Iterator[None]:
    """A check that cannot run on the saved result (exit 3, or a later sample that does not
    fit: exit 2) still shows what was gained and writes the reports, before its error."""
    try:
        yield
    except ShrinkError as e:
        if isinstance(e.result, ShrinkResult):
            _show(args, out, e.result)
        raise


def _judge(numeric: NumericReport) -> None:
    """Exit 1 on a broken tolerance."""
    if numeric.failures:
        raise CheckFailed("; ".join(numeric.failures))


def _print_compile(out: Console, result: ShrinkResult) -> None:
    out.print(console.summary_table(result))
    for outcome in result.accuracy_targets:
        console.print_all(out, console.target_lines(outcome))
    if result.verification is not None:
        console.print_all(out, console.check_tables(result.verification))
    if result.sensitivity is not None:
        console.print_all(out, console.sensitivity_lines(result.sensitivity))
    out.print(f"wrote {result.output_path}")


def _at_least(low: int, **counts: int | None) -> None:
    """Counts given on the command line must be at least ``low`` (named by their flags)."""
    preflight.at_least(low, **{f"--{flag}": value for flag, value in counts.items()})


def _run_check(args: argparse.Namespace, out: Console) -> int:
    _at_least(0, runs=args.runs)  # 0: no latency
    with out.status("checking...") as status:
        result = checker.check(
            args.reference,
            args.candidate,
            args.data,
            labels=args.labels,
            input_shapes=data_mod.parse_input_shapes(args.input_shape),
            tolerances=_tolerances(args, default=DEFAULT_TOLERANCES),  # check gives a verdict
            provider=args.ep,
            layers=args.layers,
            **_latency(args),
            progress=_shown(status, out),
        )
    console.print_all(out, console.check_tables(result))
    _write_reports(args, result.to_dict(), lambda: report.html_report(check=result))
    _judge(result.numeric)
    return 0


def _run_bench(args: argparse.Namespace, out: Console) -> int:
    _at_least(1, runs=args.runs)
    _at_least(0, warmup=args.warmup)
    batch_sizes = _int_list(args.batch_sizes, "--batch-sizes") or [1]
    threads: list[int | None] = list(_int_list(args.threads, "--threads")) or [None]
    with out.status("benchmarking...") as status:
        result = bench.benchmark(
            args.model,
            data=args.data,
            input_shapes=data_mod.parse_input_shapes(args.input_shape),
            batch_sizes=batch_sizes,
            threads=threads,
            runs=args.runs,
            warmup=args.warmup,
            provider=args.ep,
            memory=not args.no_memory,
            progress=_shown(status, out),
        )
    out.print(console.benchmark_table(result))
    _write_reports(args, result.to_dict(), lambda: report.html_report(bench=result))
    return 0


def _shown(status: Status, out: Console) -> Progress:
    """A progress callback that puts each phase on ``status``, within ``out``'s width."""

    def show(phase: str, done: int, total: int | None = None) -> None:
        status.update(console.phase_status(phase, done, total, columns=out.width))

    return show


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ShrinkError(f"{option} expects comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise ShrinkError(f"{option} values must be at least 1, got {text!r}")
    return values


def _latency(args: argparse.Namespace) -> dict[str, object]:
    """The check's latency options: the default runs within the check's time budget, or
    exactly the --runs given."""
    if args.runs is None:
        return {"latency_runs": DEFAULT_LATENCY_RUNS, "latency_seconds": checker.LATENCY_SECONDS}
    return {"latency_runs": args.runs, "latency_seconds": None}


def _refuse_idle_flags(args: argparse.Namespace) -> None:
    """Flags that would do nothing are errors, not silence: the user meant something."""
    if args.strict and not args.verify_each:
        raise ShrinkError(
            "--strict stops at the first pass that breaks the tolerances under --verify-each; "
            "add --verify-each (or drop --strict)"
        )
    # Data without labels is refused by shrink as it opens the data, also before any work
    # (preflight.refuse_unmeasurable_accuracy); no data at all costs not even the model's load.
    if args.max_accuracy_drop is not None and args.data is None and not args.no_check:
        raise ShrinkError(
            "--max-accuracy-drop needs labelled --data: synthetic inputs have no labels"
        )
    if not args.no_check:
        return
    given = {
        "--verify-each": args.verify_each,
        "--strict": args.strict,
        "--labels": args.labels is not None,
        "--atol": args.atol is not None,
        "--rtol": args.rtol is not None,
        "--min-cosine": args.min_cosine is not None,
        "--max-accuracy-drop": args.max_accuracy_drop is not None,
        "--min-agreement": args.min_agreement is not None,
        "--layers": args.layers,
        "--runs": args.runs is not None,
    }
    idle = [flag for flag, on in given.items() if on]
    if idle:
        raise ShrinkError(
            f"--no-check skips the check, so {', '.join(idle)} would do nothing; drop "
            f"{'them' if len(idle) > 1 else 'it'} or --no-check"
        )


# What a command reads, by flag (the attribute argparse gives it): never written over.
_MODEL_FLAGS = ("model", "reference", "candidate")
_READ_FLAGS = {
    "model": "the input model",
    "reference": "the reference model",
    "candidate": "the candidate model",
    "data": "--data",
    "calibration": "--calibration",
    "labels": "--labels",
    "recipe": "--recipe",
}


def _check_report_paths(args: argparse.Namespace) -> None:
    """Report files must be writable before any work is done (a typo costs nothing), and no
    file the run writes may be one it reads or another it writes."""
    writes: dict[str, str] = {}
    for flag in ("report", "html"):
        if getattr(args, flag, None):
            io.check_writable(getattr(args, flag), f"--{flag}")
            writes[f"--{flag}"] = getattr(args, flag)
    if getattr(args, "passes", None) is not None or getattr(args, "recipe", None) is not None:
        if args.model is not None:  # the compile command writes its result too
            writes["-o"] = args.output or str(default_output_path(args.model))
    reads: dict[str, str | Path] = {}
    for name, what in _READ_FLAGS.items():
        path = getattr(args, name, None)
        if path is not None:
            reads.update(io.model_reads(what, path) if name in _MODEL_FLAGS else {what: path})
    io.refuse_clashes(writes, reads)


def _write_reports(args: argparse.Namespace, figures: dict, html: Callable[[], str]) -> None:
    figures = {**figures, "warnings": list(args.warnings)}
    writers = {
        "report": lambda: json.dumps(_strict_json(figures), indent=2) + "\n",
        "html": html,
    }
    for flag, text in writers.items():
        path = getattr(args, flag, None)
        if not path:
            continue
        try:
            data_files.write_text(path, text())
        except OSError as e:  # the folder went away or read-only since the start
            raise ShrinkError(f"{path}: cannot write the --{flag} file ({e.strerror})") from e


def _strict_json(value: object) -> object:
    """JSON has no inf/NaN: write them as the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _configure_logging(args: argparse.Namespace) -> None:
    # -q and -v exclude each other: -q quiets the console handler below, not our loggers.
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnx-shrink: %(levelname)s: %(message)s"))
    if args.quiet:  # quiet on the console; the report still records the warnings
        handler.setLevel(logging.ERROR)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Our own loggers follow -v (warnings at least); onnxscript and onnx_ir stay at warnings
    # unless -vv.
    logging.getLogger("onnx_shrink").setLevel(level)
    if args.verbose >= 2:
        root.setLevel(logging.DEBUG)


if __name__ == "__main__":
    sys.exit(main())
