"""Side by side: ``prune-channels`` against onnxsim 0.8.1's ``apply_structured_pruning``.

Both tools prune the same ``fold``-ed model (PP-OCR's Constant weights lifted first) at the
same target (``--ratio`` of each group's channels; onnxsim's ``sparsity``). Per model:

* coverage: the share of Conv/MatMul/Gemm MACs in nodes whose weight the tool slices (ours:
  nodes in an accepted group; onnxsim: nodes whose weight shape changed);
* fidelity against the unpruned model (``benchmarks.quant_data`` tasks for digits, MiniLM and
  PP-OCR; cosine of the logits on seeded random inputs for the CNN and transformer builders),
  ours with and without reconstruction (statistics of ``--calibration`` samples: the task's
  calibration split; for the builders, random inputs of another seed than the evaluation's);
* ORT CPU latency ratio pruned / unpruned (interleaved, median of per-pair ratios);
* bytes on disk and zipped (zlib level 9).

Run from the repository root: ``.venv/bin/python benchmarks/prune_channels_vs_onnxsim.py``
(``--quick`` for fewer evaluation samples; ``--no-write`` to leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx_ir.passes.common as common_passes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import quant_data, results  # noqa: E402
from models import builders  # noqa: E402
from onnx_shrink.compiler import io, stats  # noqa: E402
from onnx_shrink.passes.fold import FoldPass  # noqa: E402
from onnx_shrink.passes.prune_channels import PruneChannelsPass  # noqa: E402
from onnx_shrink.runtime_check import bench, collect, data, sessions  # noqa: E402

HEADING = "## prune-channels vs onnxsim 0.8.1 (structured)"
MODELS = ("digits", "cnn", "transformer", "ppocr-det", "ppocr-rec", "minilm")
WEIGHTED = ("Conv", "MatMul", "Gemm")


def prepared(source) -> object:
    """The model both tools start from: Constant weights lifted, then our ``fold``."""
    model = io.load(source)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16)(model)
    return FoldPass()(model).model


def builder_task(name: str) -> quant_data.Task:
    proto = builders.BUILDERS[name]()

    def draw(seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        if name == "cnn":
            return {"image": rng.standard_normal((64, 3, 32, 32)).astype(np.float32)}
        return {"hidden": rng.standard_normal((16, 32, 64)).astype(np.float32)}

    feed, calibration = draw(0), draw(1)
    path = Path("/tmp") / f"prune_channels_{name}.onnx"
    io.save(io.load(proto), path)

    def predict(session) -> np.ndarray:
        return session.run(None, feed)[0]

    def fidelity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
        cosines = quant_data.cosine_rows(
            reference.reshape(len(reference), -1), candidate.reshape(len(candidate), -1)
        )
        return {"cosine": float(cosines.mean())}

    latency = {k: v[:8] for k, v in feed.items()}
    return quant_data.Task(
        name,
        path,
        calibration,
        feed,
        latency,
        "8 samples",
        predict,
        fidelity,
        ("cosine",),
        "seeded random inputs",
    )


def load(name: str, quick: bool, calibration: int) -> quant_data.Task:
    if name in ("cnn", "transformer"):
        return builder_task(name)
    return quant_data.load_task(name, calibration=calibration, quick=quick)


def coverage(model, sliced: set[str]) -> tuple[float, int]:
    """Share of weighted-op MACs in the named nodes, and how many such nodes there are."""
    shapes = stats.mac_shapes(model)
    total = covered = 0
    for node in model.graph:
        if node.op_type in WEIGHTED:
            macs = stats.node_macs(node, shapes) or 0
            total += macs
            covered += macs if node.name in sliced else 0
    return covered / max(total, 1), len(sliced)


def ours(model, ratio: float, calibration: dict[str, np.ndarray] | None = None):
    """Pruned alone, or (``calibration``) with reconstruction from its statistics."""
    pass_ = PruneChannelsPass(ratio=ratio, reconstruct="off" if calibration is None else "on")
    groups = pass_.groups(model)
    sliced = {n.name for g in groups if g.reason is None for n in g.weighted_nodes}
    declined = [g.reason for g in groups if g.reason is not None]
    pruned = model.clone()
    if calibration is None:
        pruned = pass_(pruned).model
    else:
        specs = data.specs_from_model(pruned)
        dataset = data.from_arrays(calibration, specs, labels=None, where="calibration")
        pruned = pass_.bind(collect.collect(pruned, pass_.requests(pruned), dataset))(pruned).model
    return io.to_bytes(pruned), sliced, declined


def onnxsim_prune(model, ratio: float):
    import onnxsim

    proto = onnxsim.apply_structured_pruning(io.serialize_proto(model), sparsity=ratio)
    data = proto.SerializeToString()
    before = {n.name: _weight_shape(n) for n in model.graph if n.op_type in WEIGHTED}
    after = {n.name: _weight_shape(n) for n in io.load(proto).graph if n.op_type in WEIGHTED}
    sliced = {name for name, shape in before.items() if after.get(name, shape) != shape}
    return data, sliced, []


def _weight_shape(node) -> tuple | None:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return None if weight is None or weight.shape is None else tuple(weight.shape)


def measure(task: quant_data.Task, base, data: bytes, reference) -> dict[str, object]:
    """Fidelity, latency against the ``base`` session and sizes of the pruned ``data``."""
    candidate = sessions.create_session(data, stop_spinning=True)
    row: dict[str, object] = dict(task.fidelity(reference, task.predict(candidate)))
    comparison = bench.compare_latency(base, candidate, task.latency_feed, runs=40)
    row["latency"] = comparison.ratio
    row["bytes"] = len(data)
    row["zipped"] = len(zlib.compress(data, 9))
    return row


def run_model(name: str, ratio: float, quick: bool, calibration: int) -> list[str]:
    task = load(name, quick, calibration)
    model = prepared(str(task.model))
    base = io.to_bytes(model)
    base_session = sessions.create_session(base, stop_spinning=True)  # scored and timed against
    reference = task.predict(base_session)
    lines = []
    refit = functools.partial(ours, calibration=task.calibration_slice(calibration))
    tools = (("prune-channels", ours), ("+ reconstruction", refit), ("onnxsim", onnxsim_prune))
    for tool, prune in tools:
        try:
            data, sliced, declined = prune(model, ratio)
            share, count = coverage(model, sliced)
            row = measure(task, base_session, data, reference)
        except Exception as e:  # noqa: BLE001 - a tool that fails is reported, not fatal
            lines.append(f"| {name} | {tool} | failed: {str(e).splitlines()[0][:80]} |")
            continue
        metrics = ", ".join(f"{k} {row[k]:.3f}" for k in task.metrics)
        lines.append(
            f"| {name} | {tool} | {share:.1%} ({count} nodes) | {metrics} | {row['latency']:.2f} "
            f"| {row['bytes'] / len(base):.2f} | {row['zipped'] / len(zlib.compress(base, 9)):.2f} "
            f"| {len(declined)} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--calibration", type=int, default=32, help="samples for the refit")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, args.ratio, args.quick, args.calibration)
        print("\n".join(rows[-3:]), flush=True)
    command = results.command_line("benchmarks/prune_channels_vs_onnxsim.py", argv)
    text = "\n".join(
        [
            HEADING,
            "",
            *results.provenance(command, ("onnxruntime", "onnx-ir", "onnxsim")),
            "",
            f"Ratio {args.ratio} of each group's channels (onnxsim: "
            f"sparsity {args.ratio}); both tools on the fold-ed model; latency and sizes are "
            "pruned / unpruned (latency: median of 40 interleaved per-pair ratios). "
            "`+ reconstruction`: the same pruning with MatMul/Gemm/Conv (group 1) consumers refit "
            f"from the first {args.calibration} calibration samples (builders: random inputs "
            "of another seed than the evaluation's).",
            "",
            "| model | tool | coverage (MACs) | fidelity vs unpruned | latency | bytes | zipped "
            "| declined groups |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    )
    results.publish(HEADING, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
