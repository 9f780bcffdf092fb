"""The ``onnx-shrink`` command line's arguments: the three parsers (compile, ``check``,
``bench``) and their help. Parsing only: what the arguments mean is ``cli``'s."""

from __future__ import annotations

import argparse

from onnx_shrink import __version__
from onnx_shrink.api import CheckOptions
from onnx_shrink.compiler import registry
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.numeric_report import DEFAULT_TOLERANCES

DEFAULT_LATENCY_RUNS = CheckOptions().latency_runs
LATENCY_SECONDS = CheckOptions().latency_seconds

EXAMPLES = """examples:
  onnx-shrink model.onnx --passes fold -o small.onnx
  onnx-shrink model.onnx --passes fold --set fold.max_growth_bytes=4096 --data calib.npz
  onnx-shrink model.onnx --recipe recipe.toml --report report.json --html report.html
  onnx-shrink check model.onnx small.onnx --data val.npz --layers --min-cosine 0.999
  onnx-shrink bench small.onnx --batch-sizes 1,8 --threads 1,2
  onnx-shrink --list-passes
"""


def _add_common(parser: argparse.ArgumentParser) -> None:
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_data(parser: argparse.ArgumentParser, labels: bool = True) -> None:
    """The input options; ``labels`` only where accuracy is measured (not ``bench``)."""
    group = parser.add_argument_group("inputs")
    group.add_argument(
        "--data",
        help=".npz (input name -> samples on axis 0, optional 'labels'), a folder of .npy, or "
        "a folder of test_data_set_*/input_*.pb; default: seeded synthetic inputs",
    )
    if labels:
        group.add_argument("--labels", help=".npy or .npz with 'labels' for task accuracy")
    group.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=1x128",
        help="shape for synthetic inputs with dynamic dims (default: first dim "
        f"{data_mod.DEFAULT_BATCH}, others {data_mod.DEFAULT_DIM}); repeatable",
    )
    group.add_argument(
        "--ep",
        default="cpu",
        help="execution provider, with options after a colon: cpu, cuda, cuda:device_id=1, "
        "tensorrt, ... (default cpu)",
    )


def _add_tolerances(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tolerances (exit 1 when broken)")
    group.add_argument("--atol", type=float, help="absolute tolerance per element")
    group.add_argument("--rtol", type=float, help="relative tolerance per element")
    group.add_argument("--min-cosine", type=float, help="lowest acceptable output cosine")
    group.add_argument(
        "--max-accuracy-drop", type=float, help="largest acceptable accuracy drop (0.01 = 1%%)"
    )
    group.add_argument(
        "--min-agreement",
        type=float,
        help="lowest acceptable share of equal elements in 32/64-bit integer or boolean "
        "outputs (class ids, tags, masks), which cosine does not judge (0.99 = 99%%)",
    )
    group.add_argument("--layers", action="store_true", help="localize error per layer")
    group.add_argument(
        "--runs",
        type=int,
        help=f"latency runs of each model (default: {DEFAULT_LATENCY_RUNS}, fewer where they "
        f"take over {LATENCY_SECONDS:.0f} s; given, exactly that many)",
    )
    _add_reports(group)


def _add_reports(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--report", help="write the figures as JSON to this file")
    parser.add_argument("--html", help="write a self-contained HTML report to this file")


def _with_check_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``parser`` with what every command that checks takes: inputs, tolerances, verbosity."""
    _add_data(parser)
    _add_tolerances(parser)
    _add_common(parser)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The compile command's parser (``check`` and ``bench`` have their own)."""
    parser = argparse.ArgumentParser(
        prog="onnx-shrink",
        description="Compress an ONNX model with a pass pipeline and check what it cost. "
        "Also: 'onnx-shrink check REF CAND' and 'onnx-shrink bench MODEL'.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", help="input .onnx file (never modified)")
    parser.add_argument("--passes", help=f"comma-separated passes: {', '.join(registry.REGISTRY)}")
    parser.add_argument("-o", "--output", help="output file (default: MODEL.shrunk.onnx)")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="PASS.OPTION=VALUE",
        help="set a pass option; repeatable (see --list-passes)",
    )
    parser.add_argument("--recipe", help="TOML file: passes = [...] and a [pass] table each")
    parser.add_argument("--list-passes", action="store_true", help="list passes and options")
    parser.add_argument(
        "--dump-dir",
        help="save the model after each pass into this folder (with --verify-each, a "
        "rolled-back pass's output too, as NN-PASS.rolled-back.onnx)",
    )
    parser.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="store tensors beside the model (auto: only when it would pass 2 GB)",
    )
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    parser.add_argument(
        "--calibration",
        help="inputs for data-aware passes (quant, fp16), in any --data form (default: --data)",
    )
    parser.add_argument(
        "--verify-each",
        action="store_true",
        help="check after every pass; roll back a pass that breaks the tolerances (default "
        "tolerances: cosine 0.999, accuracy drop 1%%)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="with --verify-each: stop instead of rolling back"
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="with quant: measure each quantized layer's output error alone (on the "
        "calibration data), print them worst first with the --set quant.exclude=... that "
        "keeps the worst in float",
    )
    parser.add_argument("--version", action="version", version=f"onnx-shrink {__version__}")
    return _with_check_args(parser)


def build_check_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-shrink check",
        description="Compare a candidate model with its reference on onnxruntime: numerics, "
        "accuracy, per-layer error, latency and size.",
    )
    parser.epilog = (
        f"Without tolerance options: --min-cosine {DEFAULT_TOLERANCES.min_cosine} "
        f"--max-accuracy-drop {DEFAULT_TOLERANCES.max_accuracy_drop} "
        f"--min-agreement {DEFAULT_TOLERANCES.min_agreement}."
    )
    parser.add_argument("reference", help="the original .onnx")
    parser.add_argument("candidate", help="the compressed .onnx")
    return _with_check_args(parser)


def build_bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-shrink bench",
        description="Latency (p50/p90/p99), throughput, session peak memory and size of a model.",
    )
    parser.add_argument("model", help=".onnx file")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (1)")
    parser.add_argument("--threads", default="", help="comma-separated intra-op thread counts")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per setting (50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (5)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probe")
    _add_reports(parser)
    _add_data(parser, labels=False)
    _add_common(parser)
    return parser
