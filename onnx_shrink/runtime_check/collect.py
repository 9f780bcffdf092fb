"""The statistics engine: streaming tensor statistics over calibration data.

``collect(model, requests, dataset)`` runs the model one batch at a time and folds each batch
into running statistics (``compiler.statistics``). Memory is one batch's requested tensors
plus the statistics, whatever the number of samples.

* Ranges are reduced inside the graph: for each tensor the session returns only its finite
  min, finite max and non-finite count (``Where(IsInf|IsNaN, 0, x)`` then ReduceMin/Max), so
  a range costs no transfer of the tensor.
* Histograms need edges before counting: a probe of the first samples fixes them (and, for a
  request with ``per_sample``, the lattice stride), so the counts are identical however
  samples are batched; a tensor that leaves its edges is counted again over its exact range.
  A one-shot reader is spilled to a temporary folder during the first pass and replayed.
* Per-channel and Gram statistics are folded in numpy from the batch's tensor.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import statistics as st
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sessions

logger = logging.getLogger(__name__)

Progress = Callable[[str, int], None]
"""Called with (phase, batches done) after every batch."""


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
    histograms = [r for r in requests if r.kind == "histogram"]
    with contextlib.ExitStack() as stack:
        replay = data_mod.replayable(dataset, stack) if ranged else dataset
        others = {r: _accumulator(r) for r in requests if r.tensor in raw and r.kind != "minmax"}
        binned, strides = _probe_bins(model, histograms, replay, provider, progress)
        ranges, samples = _range_pass(
            model, ranged, others, replay, provider, progress, binned=binned
        )
        # Fast reductions let inf/NaN through; only tensors that hold them (attention masks)
        # are measured again, with the non-finite values counted and kept out of the range.
        flagged = [name for name, acc in ranges.items() if not acc.finite]
        if flagged:
            repaired, _ = _range_pass(model, flagged, {}, replay, provider, progress, careful=True)
            ranges.update(repaired)
        results: dict[st.StatRequest, st.StatResult] = {
            r: ranges[r.tensor].result() for r in requests if r.kind == "minmax"
        }
        results.update({r: acc.result() for r, acc in others.items()})
        # A tensor whose values left the probe's edges (or held inf/NaN) is counted again over
        # its exact range; every other histogram was counted in the main pass.
        recount = [r for r in histograms if r not in binned or _overflowed(r, binned[r], ranges)]
        results.update({r: binned[r].result() for r in histograms if r not in recount})
        if recount:
            results.update(_histograms(model, recount, ranges, strides, replay, provider, progress))
    return st.Statistics(
        results={r: results[r] for r in requests}, samples=samples, source=dataset.description
    )


def _range_pass(model, ranged, others, dataset, provider, progress, careful=False, binned=None):
    """One pass: ranges of ``ranged`` reduced in the graph, ``others`` folded from raw tensors,
    and ``binned`` histograms counted from bin indices computed in the graph."""
    binned = binned or {}
    raw = sorted({r.tensor for r in others})
    if not ranged and not raw and not binned:  # nothing to measure: count samples, run nothing
        return {}, sum(batch.samples for batch in dataset.batches())
    specs = data_mod.specs_from_model(model)
    session = _session(_with_range_outputs(model, ranged, raw, careful, binned), provider)
    ranges = {name: st.MinMaxAccumulator() for name in ranged}
    samples = 0
    # One sample per run: the session returns every requested tensor of the run, so memory
    # is two samples' tensors (the one folded, the one running) however large the source's
    # batches are.
    runs = _overlapped_runs(session, data_mod.single_samples(dataset, specs))
    for done, (batch, outputs) in enumerate(runs, 1):
        for name, acc in ranges.items():
            low, high, size = (outputs[f"{name}::{s}"] for s in ("min", "max", "size"))
            bad = outputs[f"{name}::nonfinite"] if careful else 0
            acc.add_reduced(low, high, bad, size)
        for request, acc in others.items():
            acc.add(outputs[request.tensor])
        for request, acc in binned.items():
            acc.add_indices(outputs[_bins_name(request)])
        samples += batch.samples
        if progress is not None:
            progress("non-finite ranges" if careful else "statistics", done)
    return ranges, samples


def _overlapped_runs(session, batches: Iterator[data_mod.Batch]):
    """Yield (batch, outputs), the next batch's run already started while this one's outputs
    are folded: onnxruntime runs without Python's lock, so its work and numpy's counting
    overlap instead of taking turns."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for batch in batches:
            running = (batch, pool.submit(_run, session, batch.feed))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = running
        if pending is not None:
            yield pending[0], pending[1].result()


# Histogram edges come from the first samples (a fixed prefix of the data, so no batching can
# change them), widened by this fraction of their span on each open side. Values past them are
# caught by the exact ranges of the main pass, and such a tensor is counted again.
PROBE_SAMPLES = 16
PROBE_MARGIN = 0.5


def _probe_bins(model, histograms, dataset, provider, progress):
    """Histogram accumulators with edges from the first ``PROBE_SAMPLES`` samples, and every
    histogram request's lattice stride (from the same samples' sizes)."""
    if not histograms:
        return {}, {}
    specs = data_mod.specs_from_model(model)
    first = list(itertools.islice(data_mod.single_samples(dataset, specs), PROBE_SAMPLES))
    probe = data_mod.Dataset(dataset.description, dataset.synthetic, False, lambda: iter(first))
    tensors = sorted({r.tensor for r in histograms})
    ranges, _ = _range_pass(model, tensors, {}, probe, provider, progress)
    strides = {
        r: lattice_stride(ranges[r.tensor].elements // max(len(first), 1), r.per_sample)
        for r in histograms
    }
    binned = {}
    for request in histograms:
        acc = ranges[request.tensor]
        if not acc.finite:
            continue  # inf/NaN: counted later from its careful, exact range
        low, high = acc.minimum, acc.maximum
        span = max(high - low, abs(high), abs(low), 1e-12)
        # Widen, but never across zero: a one-sided range (after ReLU) stays one-sided.
        low = low - PROBE_MARGIN * span if low < 0 else max(0.0, low - PROBE_MARGIN * span)
        high = high + PROBE_MARGIN * span if high > 0 else min(0.0, high + PROBE_MARGIN * span)
        binned[request] = st.HistogramAccumulator(low, high, request.bins, strides[request])
    return binned, strides


def lattice_stride(elements: int, per_sample: int) -> int:
    """The stride that counts at most about ``per_sample`` of ``elements`` (1: count all).

    A prime that does not divide ``elements``, so it divides none of the tensor's trailing
    dimension products either: successive rows start at shifting offsets and the lattice
    visits every channel and column instead of striping one of them.
    """
    if per_sample <= 0 or elements <= per_sample:
        return 1
    stride = -(-elements // per_sample)
    while not _is_prime(stride) or elements % stride == 0:
        stride += 1
    return stride


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _overflowed(request: st.StatRequest, acc: st.HistogramAccumulator, ranges) -> bool:
    """Did the tensor's exact range leave the edges the probe chose?"""
    exact = ranges[request.tensor].result()
    return exact.minimum < acc.edges[0] or exact.maximum > acc.edges[-1]


def _bins_name(request: st.StatRequest) -> str:
    """One output name per histogram request: the same tensor may be asked for twice."""
    return f"{request.tensor}::bins{request.bins}::per{request.per_sample}"


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
        return st.GramAccumulator(request.axis, request.patch)
    return st.ChannelAccumulator(request.kind, request.axis)  # type: ignore[arg-type]


def _with_range_outputs(
    model: ir.Model,
    ranged: Sequence[str],
    raw: Sequence[str],
    careful: bool,
    binned: dict[st.StatRequest, st.HistogramAccumulator] | None = None,
) -> ir.Model:
    """A clone whose outputs are each ranged tensor's reductions, each raw tensor, and the
    bin indices of each ``binned`` histogram."""
    clone = model.clone()
    graph = clone.graph
    values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
    graph.outputs.clear()
    for name in raw:
        graph.outputs.append(values[name])
    for name in ranged:
        graph.outputs.extend(_range_nodes(graph, values[name], careful))
    for request, acc in (binned or {}).items():
        output = _bin_index_nodes(graph, values[request.tensor], acc)
        output.name = _bins_name(request)
        graph.outputs.append(output)
    return clone


def _range_nodes(graph: ir.Graph, x: ir.Value, careful: bool) -> list[ir.Value]:
    """Append nodes reducing ``x`` to its min, max and size (and, ``careful``, non-finite count).

    Careful: non-finite elements are replaced by 0 before reducing, so the range includes 0
    when a tensor holds inf/NaN, which quantization ranges always include anyway.
    """
    tape = ir.tape.Tape(graph)
    named = {"size": tape.op("Size", [x])}
    source = x
    if careful:
        dtype = x.dtype or ir.DataType.FLOAT
        zero = tape.op("Constant", [], attributes={"value": ir.tensor(np.zeros((), dtype.numpy()))})
        bad = tape.op("Or", [tape.op("IsInf", [x]), tape.op("IsNaN", [x])])
        source = tape.op("Where", [bad, zero, x])
        cast = tape.op("Cast", [bad], attributes={"to": ir.DataType.INT64})
        named["nonfinite"] = tape.op("ReduceSum", [cast], attributes={"keepdims": 0})
    # Reducing with no axes reduces over every axis; keepdims=0 gives scalars.
    named["min"] = tape.op("ReduceMin", [source], attributes={"keepdims": 0})
    named["max"] = tape.op("ReduceMax", [source], attributes={"keepdims": 0})
    for suffix, output in named.items():
        output.name = f"{x.name}::{suffix}"
    return list(named.values())


def _session(model: ir.Model, provider: str):
    # Weights are handed over in place: no serialized copy, no temporary file, any size.
    return sessions.create_session(large_tensors.session_source(model), provider=provider)


def _run(session, feed) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    try:
        return dict(zip(names, session.run(names, feed), strict=True))
    except Exception as e:  # onnxruntime raises several unrelated exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(
            f"the model failed on a calibration sample ({data_mod.describe_feed(feed)}): "
            f"{first[:300]}. Give samples it accepts (--calibration / --data), or other "
            "synthetic shapes with --input-shape"
        ) from e


def _histograms(model, requests, ranges, strides, dataset, provider, progress):
    """Count ``requests`` again over each tensor's exact range: finite tensors as bin indices
    computed in the graph, tensors holding inf/NaN as values binned in numpy (which drops the
    non-finite ones)."""
    exact = {
        r: st.HistogramAccumulator(
            ranges[r.tensor].result().minimum,
            ranges[r.tensor].result().maximum,
            r.bins,
            strides.get(r, 1),
        )
        for r in requests
    }
    as_values = {r: acc for r, acc in exact.items() if ranges[r.tensor].nonfinite}
    as_indices = {r: acc for r, acc in exact.items() if r not in as_values}
    _range_pass(model, [], as_values, dataset, provider, progress, binned=as_indices)
    return {r: acc.result() for r, acc in exact.items()}


def _bin_index_nodes(graph: ir.Graph, x: ir.Value, acc: st.HistogramAccumulator) -> ir.Value:
    """``int32(clip((float(x) - lo) * scale, 0, bins - 1))``: the accumulator's arithmetic,
    on every ``acc.stride``-th element of the flattened tensor."""
    tape = ir.tape.Tape(graph)
    low, scale, top = acc.index_constants()

    def const(value: np.generic | np.ndarray) -> ir.Value:
        return tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(value))})

    if acc.stride > 1:
        dtype = x.dtype
        flat = tape.op("Reshape", [x, const(np.array([-1], np.int64))])
        ends = np.array([np.iinfo(np.int64).max], np.int64)
        bounds = [const(np.array([0], np.int64)), const(ends), const(np.array([0], np.int64))]
        x = tape.op("Slice", [flat, *bounds, const(np.array([acc.stride], np.int64))])
        if dtype is not None:
            x.dtype = dtype  # so a float tensor is still used without a Cast below

    # A float tensor is used as it is: a Cast to its own type would still copy it.
    as_float = (
        x
        if x.dtype == ir.DataType.FLOAT
        else tape.op("Cast", [x], attributes={"to": ir.DataType.FLOAT})
    )
    position = tape.op("Mul", [tape.op("Sub", [as_float, const(low)]), const(scale)])
    clipped = tape.op("Clip", [position, const(np.float32(0)), const(top)])
    return tape.op("Cast", [clipped], attributes={"to": ir.DataType.INT32})
