"""The ``onnx-shrink`` command: a thin shell over ``onnx_shrink.shrink`` (args in, report out).

Exit codes: 0 done; 1 a check failed a tolerance; 2 bad input (model, pass spec, data), with
one line on stderr and nothing written; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from rich.console import Console

from onnx_shrink import __version__, console
from onnx_shrink.api import ShrinkResult, default_output_path, shrink
from onnx_shrink.compiler import io, pipeline, registry
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod

logger = logging.getLogger("onnx_shrink")

EXAMPLES = """examples:
  onnx-shrink model.onnx --passes fold -o small.onnx
  onnx-shrink model.onnx --passes fold --set fold.max_growth_bytes=4096 --data calib.npz
  onnx-shrink model.onnx --recipe recipe.toml --report report.json
  onnx-shrink --list-passes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-shrink",
        description="Compress an ONNX model with a pass pipeline and verify what it cost.",
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
    parser.add_argument("--dump-dir", help="save the model after each pass into this folder")
    parser.add_argument("--report", help="write the run's figures as JSON to this file")
    parser.add_argument(
        "--external-data",
        choices=("auto", "yes", "no"),
        default="auto",
        help="store tensors beside the model (auto: only when it would pass 2 GB)",
    )
    check = parser.add_argument_group("verification")
    check.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    check.add_argument("--data", help=".npz of inputs (samples on axis 0) and optional labels")
    check.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="NAME=1x128",
        help="shape for synthetic inputs with dynamic dims (default: batch 1, other dims "
        f"{data_mod.DEFAULT_DIM}); repeatable",
    )
    check.add_argument("--ep", default="cpu", help="execution provider for the check (cpu)")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="version", version=f"onnx-shrink {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args)
    out = Console(quiet=args.quiet, highlight=False)
    if not out.is_terminal:
        out.width = 110  # logs and CI captures: wide enough that table cells don't wrap
    try:
        return _dispatch(args, out)
    except ShrinkError as e:
        if args.debug:
            raise
        print(f"onnx-shrink: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("onnx-shrink: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace, out: Console) -> int:
    if args.list_passes:
        console.print_all(Console(), console.pass_list_tables(registry.PASS_CLASSES))
        return 0
    if args.model is None:
        raise ShrinkError("no model given (usage: onnx-shrink MODEL.onnx --passes fold)")
    if args.passes is None and args.recipe is None:
        raise ShrinkError("no passes given; use --passes NAME[,NAME...] or --recipe FILE")
    # Validate everything cheap before the model is touched: a typo must cost nothing.
    pipeline.parse_spec(args.passes, args.sets, args.recipe)
    input_shapes = data_mod.parse_input_shapes(args.input_shape)
    output = args.output or default_output_path(args.model)
    if not args.input_shape and not args.data and not args.no_check:
        logger.info(
            "synthetic check inputs: dynamic dims default to batch %d, others %d",
            data_mod.DEFAULT_BATCH,
            data_mod.DEFAULT_DIM,
        )
    with out.status("compiling...") as status:
        result = shrink(
            args.model,
            args.passes,
            output=output,
            sets=args.sets,
            recipe=args.recipe,
            dump_dir=args.dump_dir,
            external_data={"auto": None, "yes": True, "no": False}[args.external_data],
            check=not args.no_check,
            data=args.data,
            input_shapes=input_shapes,
            provider=args.ep,
            on_pass_start=lambda i, p: status.update(f"running pass {i + 1}: {p.name}..."),
        )
    _print_result(out, result)
    if args.report:
        io.write_text(args.report, json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _print_result(out: Console, result: ShrinkResult) -> None:
    out.print(console.summary_table(result))
    if result.verification is not None:
        out.print(console.check_table(result.verification))
    out.print(f"wrote {result.output_path}")


def _configure_logging(args: argparse.Namespace) -> None:
    level = (
        logging.ERROR
        if args.quiet
        else (logging.WARNING, logging.INFO, logging.DEBUG)[min(args.verbose, 2)]
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("onnx-shrink: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # Our own loggers follow -q/-v; onnxscript and onnx_ir stay at warnings unless -vv.
    logging.getLogger("onnx_shrink").setLevel(level)
    if args.verbose >= 2:
        root.setLevel(logging.DEBUG)


if __name__ == "__main__":
    sys.exit(main())
