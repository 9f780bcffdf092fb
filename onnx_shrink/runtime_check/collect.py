"""The statistics engine: streaming tensor statistics over calibration data.

``collect(model, requests, dataset)`` runs the model one batch at a time and folds each batch
into running statistics (``compiler.statistics``). Memory is one batch's requested tensors
plus the statistics, whatever the number of samples.

* Ranges are reduced inside the graph: for each tensor the session returns only its finite
  min, finite max and non-finite count (``Where(IsInf|IsNaN, 0, x)`` then ReduceMin/Max), so
  a range costs no transfer of the tensor.
* Histograms need every tensor's range first: a range pass, then a counting pass over fixed
  edges, so the counts are identical however samples are batched. A one-shot reader is
  spilled to a temporary folder during the first pass and replayed from disk.
* Per-channel and Gram statistics are folded in numpy from the batch's tensor.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.compiler import statistics as st
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sessions

logger = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
"""Called with (phase, batches done) after every batch."""

_RANGE_SUFFIXES = ("min", "max", "nonfinite", "size")


def collect(
    model: ir.Model,
    requests: Sequence[st.StatRequest],
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    progress: Progress | None = None,
) -> st.Statistics:
    """Compute every request over ``dataset`` on ``model`` (which is not modified).

    Raises:
        ShrinkError: a requested tensor is not produced in the main graph.
    """
    requests = list(dict.fromkeys(requests))
    _check_tensors(model, requests)
    ranged = sorted({r.tensor for r in requests if r.kind in ("minmax", "histogram")})
    raw = sorted(
        {r.tensor for r in requests if r.kind in ("channel_absmax", "channel_sqnorm", "gram")}
    )
    with contextlib.ExitStack() as stack:
        replay = data_mod.replayable(dataset, stack) if st.needs_range_pass(requests) else dataset
        session = _session(_with_range_outputs(model, ranged, raw), provider, stack)
        ranges = {name: st.MinMaxAccumulator() for name in ranged}
        others = {r: _accumulator(r) for r in requests if r.tensor in raw and r.kind != "minmax"}
        samples = 0
        for done, batch in enumerate(replay.batches(), 1):
            outputs = _run(session, batch.feed)
            for name, acc in ranges.items():
                acc.add_reduced(*(outputs[f"{name}::{s}"] for s in _RANGE_SUFFIXES))
            for request, acc in others.items():
                acc.add(outputs[request.tensor])
            samples += batch.samples
            if progress is not None:
                progress("ranges", done)
        results: dict[st.StatRequest, st.StatResult] = {
            r: ranges[r.tensor].result() for r in requests if r.kind == "minmax"
        }
        results.update({r: acc.result() for r, acc in others.items()})
        histograms = [r for r in requests if r.kind == "histogram"]
        if histograms:
            results.update(
                _histograms(model, histograms, ranges, replay, provider, progress, stack)
            )
    return st.Statistics(
        results={r: results[r] for r in requests}, samples=samples, source=dataset.description
    )


def _check_tensors(model: ir.Model, requests: Sequence[st.StatRequest]) -> None:
    produced = {out.name for node in model.graph for out in node.outputs}
    produced |= {v.name for v in model.graph.inputs}
    missing = sorted({r.tensor for r in requests} - produced)
    if missing:
        raise ShrinkError(
            f"statistics requested for tensors the main graph does not produce: "
            f"{', '.join(missing[:5])}"
        )


def _accumulator(request: st.StatRequest):
    if request.kind == "gram":
        return st.GramAccumulator()
    return st.ChannelAccumulator(request.kind, request.axis)  # type: ignore[arg-type]


def _with_range_outputs(model: ir.Model, ranged: Sequence[str], raw: Sequence[str]) -> ir.Model:
    """A clone whose outputs are each ranged tensor's reductions and each raw tensor."""
    clone = model.clone()
    graph = clone.graph
    values = {v.name: v for v in graph.inputs}
    values.update({out.name: out for node in graph for out in node.outputs})
    graph.outputs.clear()
    for name in raw:
        graph.outputs.append(values[name])
    for name in ranged:
        graph.outputs.extend(_range_nodes(graph, values[name]))
    return clone


def _range_nodes(graph: ir.Graph, x: ir.Value) -> list[ir.Value]:
    """Append nodes computing finite min, finite max, non-finite count and size of ``x``.

    Non-finite elements are replaced by 0 before reducing: the range then includes 0 when a
    tensor holds inf/NaN, which quantization ranges always include anyway.
    """
    tape = ir.tape.Tape(graph)
    dtype = x.dtype or ir.DataType.FLOAT
    zero = tape.op("Constant", [], attributes={"value": ir.tensor(np.zeros((), dtype.numpy()))})
    bad = tape.op("Or", [tape.op("IsInf", [x]), tape.op("IsNaN", [x])])
    clean = tape.op("Where", [bad, zero, x])
    # Reducing with no axes reduces over every axis; keepdims=0 gives scalars.
    outputs = [
        tape.op("ReduceMin", [clean], attributes={"keepdims": 0}),
        tape.op("ReduceMax", [clean], attributes={"keepdims": 0}),
        tape.op(
            "ReduceSum",
            [tape.op("Cast", [bad], attributes={"to": ir.DataType.INT64})],
            attributes={"keepdims": 0},
        ),
        tape.op("Size", [x]),
    ]
    for output, suffix in zip(outputs, _RANGE_SUFFIXES, strict=True):
        output.name = f"{x.name}::{suffix}"
    return outputs


def _session(model: ir.Model, provider: str, stack: contextlib.ExitStack):
    if io.tensor_bytes(model) < io.EXTERNAL_DATA_THRESHOLD_BYTES:
        return sessions.create_session(io.to_bytes(model), provider=provider)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnx-shrink-")))
    saved = io.save(model, folder / "statistics.onnx", external_data=True)
    return sessions.create_session(saved.path, provider=provider)


def _run(session, feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed), strict=True))


def _histograms(model, requests, ranges, dataset, provider, progress, stack):
    tensors = sorted({r.tensor for r in requests})
    clone = model.clone()
    values = {v.name: v for v in clone.graph.inputs}
    values.update({out.name: out for node in clone.graph for out in node.outputs})
    clone.graph.outputs.clear()
    for name in tensors:
        clone.graph.outputs.append(values[name])
    session = _session(clone, provider, stack)
    accumulators = {
        r: st.HistogramAccumulator(
            ranges[r.tensor].result().minimum, ranges[r.tensor].result().maximum, r.bins
        )
        for r in requests
    }
    for done, batch in enumerate(dataset.batches(), 1):
        outputs = _run(session, batch.feed)
        for request, acc in accumulators.items():
            acc.add(outputs[request.tensor])
        if progress is not None:
            progress("histograms", done)
    return {r: acc.result() for r, acc in accumulators.items()}
