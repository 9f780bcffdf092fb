"""The model the statistics engine runs: the user's graph with statistics as extra outputs.

For ``collect``: every ranged tensor gets its min, max and size reduced inside the graph; raw
tensors are exposed as they are; every histogram request gets its lattice (every ``stride``-th
element of the tensor, as float32) and that lattice's int16 bin indices,
``QuantizeLinear(x - centre, width)`` (onnxruntime's, which saturates): the arithmetic of
``compiler.statistics.HistogramAccumulator``, in two nodes. The stride, first bin's centre and
bin width of each request are graph *inputs*, so one session serves the probe (before edges
exist), the counting pass and any recount over wider edges.

The lattice shifts from sample to sample. Sample ``k``'s part (``elements`` of them) starts at
``(-k * elements) mod stride``: where samples have one size, the lattice of all samples laid end
to end, every ``stride``-th element from the first sample's first. A fixed lattice visited the
same positions in every sample, so a value that sits at one position in every sample (a
transformer's massive activation: one channel of the class token) was counted in every sample or
in none; the stride is a prime that does not divide the first sample's size, so over any
``stride`` consecutive samples of that size the shift takes every value from 0 to stride - 1 (a
sample of a size the stride divides starts at 0). The graph computes the start from two more
inputs, the number of samples in the run (``RUN_SAMPLES``, each ``elements`` = size /
RUN_SAMPLES: the first axis holds the samples) and the run's first sample's index, negated
(``MINUS_FIRST_SAMPLE``): a run of several samples counts what they would count one at a time.
The tensor is first cut into RUN_SAMPLES rows, so a tensor that does not grow with the run (a
constant, a position table) fails the joined run, whose samples then run one at a time, instead
of being counted once for all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import statistics as st

RUN_SAMPLES = "onnx_shrink::run_samples"
"""The input (int64[1]) that holds how many samples a run joins, with histogram requests."""
MINUS_FIRST_SAMPLE = "onnx_shrink::minus_first_sample"
"""The input (int64[1]) that holds minus the index of a run's first sample in the pass."""

# onnxruntime's QuantizeLinear, which gives int16 at any opset (ONNX's needs opset 21).
_ORT_DOMAIN = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class HistogramIO:
    """The names one histogram request adds to the graph."""

    stride: str  # input: int64[1]
    centre: str  # input: float32 scalar, the first bin's centre
    width: str  # input: float32 scalar, the bins' width
    lattice: str  # output: float32 values on the lattice, 1-D
    bins: str  # output: int16 bin indices of the lattice, 1-D

    @classmethod
    def of(cls, request: st.StatRequest) -> HistogramIO:
        # One set of names per request: the same tensor may be asked for at two lattices.
        lattices = f"{request.per_sample}/{request.later_per_sample}"
        prefix = f"{request.tensor}::hist{request.bins}/{lattices}"
        parts = ("stride", "centre", "width", "lattice", "bins")
        return cls(*(f"{prefix}::{part}" for part in parts))

    def feed(self, stride: int, centre: float, width: float) -> dict[str, np.ndarray]:
        return {
            self.stride: np.array([stride], np.int64),
            self.centre: np.array(centre, np.float32),
            self.width: np.array(width, np.float32),
        }


def range_names(tensor: str) -> tuple[str, str, str]:
    """(min, max, size) outputs of a ranged tensor."""
    return f"{tensor}::min", f"{tensor}::max", f"{tensor}::size"


def nonfinite_name(tensor: str) -> str:
    return f"{tensor}::nonfinite"


def instrument(
    model: ir.Model,
    ranged: Sequence[str],
    raw: Sequence[str],
    histograms: Sequence[st.StatRequest] = (),
    careful: bool = False,
) -> ir.Model:
    """A clone of ``model`` whose outputs are only the statistics' (see the module doc).

    ``careful``: the ranges count non-finite elements and leave them out (slower: only for
    tensors known to hold inf/NaN).
    """
    clone = model.clone()
    graph = clone.graph
    values = ir.convenience.create_value_mapping(graph, include_subgraphs=False)
    graph.outputs.clear()
    for name in raw:
        graph.outputs.append(values[name])
    for name in ranged:
        with _beside(graph, values[name]):
            graph.outputs.extend(_range_nodes(graph, values[name], careful))
    if not histograms:
        return clone
    clone.opset_imports.setdefault(_ORT_DOMAIN, 1)
    before = len(graph)
    shared = _LatticeConstants.add(graph)
    constants = _last_nodes(graph, len(graph) - before)
    for request in histograms:
        names = HistogramIO.of(request)
        with _beside(graph, values[request.tensor]):
            graph.outputs.extend(_histogram_nodes(graph, values[request.tensor], names, shared))
    # First of all: a histogram of a graph input, at the start too, reads them.
    graph.remove(constants)
    graph.insert_before(graph.node(0), constants)
    return clone


def _last_nodes(graph: ir.Graph, count: int) -> list[ir.Node]:
    """The last ``count`` nodes of ``graph``, in order (walked from the end: O(count))."""
    return list(itertools.islice(reversed(graph), count))[::-1]


@contextlib.contextmanager
def _beside(graph: ir.Graph, value: ir.Value) -> Iterator[None]:
    """Move the nodes added inside to just after ``value``'s producer (the graph's start for
    an input). In onnxruntime's priority order (``collect_runs.open_session``) ready nodes
    run earlier ones first: appended at the graph's end, a statistic waited for the rest of
    the model, and the tensor it reads stayed alive until then (its default order ignores the
    graph's: there, statistics ran late wherever they were)."""
    before = len(graph)
    yield
    added = _last_nodes(graph, len(graph) - before)
    producer = value.producer()
    if not added or len(graph) == len(added):
        return
    graph.remove(added)
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, added)
    else:
        graph.insert_before(graph.node(0), added)


def _range_nodes(graph: ir.Graph, x: ir.Value, careful: bool) -> list[ir.Value]:
    """Append nodes reducing ``x`` to its min, max and size (and, ``careful``, non-finite count).

    Careful: non-finite elements are replaced by 0 before reducing, so the range includes 0
    when a tensor holds inf/NaN, which quantization ranges always include anyway.
    """
    tape = ir.tape.Tape(graph)
    low_name, high_name, size_name = range_names(x.name)
    named = {size_name: tape.op("Size", [x])}
    source = x
    if careful:
        dtype = x.dtype or ir.DataType.FLOAT
        zero = tape.op("Constant", [], attributes={"value": ir.tensor(np.zeros((), dtype.numpy()))})
        bad = tape.op("Or", [tape.op("IsInf", [x]), tape.op("IsNaN", [x])])
        source = tape.op("Where", [bad, zero, x])
        cast = tape.op("Cast", [bad], attributes={"to": ir.DataType.INT64})
        named[nonfinite_name(x.name)] = tape.op("ReduceSum", [cast], attributes={"keepdims": 0})
    # Reducing with no axes reduces over every axis; keepdims=0 gives scalars.
    named[low_name] = tape.op("ReduceMin", [source], attributes={"keepdims": 0})
    named[high_name] = tape.op("ReduceMax", [source], attributes={"keepdims": 0})
    for name, output in named.items():
        output.name = name
    return list(named.values())


@dataclasses.dataclass(frozen=True)
class _LatticeConstants:
    """What every histogram's nodes share, added once: fewer nodes to build, serialize and
    hand to onnxruntime."""

    samples: ir.Value  # RUN_SAMPLES
    rows: ir.Value  # [RUN_SAMPLES, -1]: one row per sample
    minus_first: ir.Value  # MINUS_FIRST_SAMPLE
    flat: ir.Value  # [-1]
    end: ir.Value  # [int64 max]
    axis: ir.Value  # [0]
    zero: ir.Value  # the bin index's zero point: int16 0

    @classmethod
    def add(cls, graph: ir.Graph) -> _LatticeConstants:
        tape = ir.tape.Tape(graph)

        def const(value: np.ndarray) -> ir.Value:
            # ir.Tensor: ir.tensor's Protocol isinstance check costs ~0.1 ms per constant.
            return tape.op("Constant", [], attributes={"value": ir.Tensor(value)})

        samples = _graph_input(graph, RUN_SAMPLES, ir.DataType.INT64, [1])
        flat = const(np.array([-1], np.int64))
        return cls(
            samples=samples,
            rows=tape.op("Concat", [samples, flat], attributes={"axis": 0}),
            minus_first=_graph_input(graph, MINUS_FIRST_SAMPLE, ir.DataType.INT64, [1]),
            flat=flat,
            end=const(np.array([np.iinfo(np.int64).max], np.int64)),
            axis=const(np.array([0], np.int64)),
            zero=const(np.zeros((), st.HistogramAccumulator.INDEX_TYPE)),
        )


def _histogram_nodes(
    graph: ir.Graph, x: ir.Value, names: HistogramIO, shared: _LatticeConstants
) -> list[ir.Value]:
    """Append the lattice of ``x`` (shifted for each of its RUN_SAMPLES parts: see the module
    doc) and its bin indices; add the request's three inputs."""
    tape = ir.tape.Tape(graph)
    stride = _graph_input(graph, names.stride, ir.DataType.INT64, [1])
    centre = _graph_input(graph, names.centre, ir.DataType.FLOAT, [])
    width = _graph_input(graph, names.width, ir.DataType.FLOAT, [])
    # A float tensor is used as it is: a Cast to its own type would still copy it.
    if x.dtype != ir.DataType.FLOAT:
        x = tape.op("Cast", [x], attributes={"to": ir.DataType.FLOAT})
    # Rows first: a run's tensor that is not RUN_SAMPLES parts fails here (see the module doc).
    flat = tape.op("Reshape", [tape.op("Reshape", [x, shared.rows]), shared.flat])
    # (-first * elements) mod stride; ONNX's integer Mod takes the divisor's sign.
    elements = tape.op("Div", [tape.op("Size", [flat]), shared.samples])
    start = tape.op("Mod", [tape.op("Mul", [elements, shared.minus_first]), stride])
    lattice = tape.op("Slice", [flat, start, shared.end, shared.axis, stride])
    # One QuantizeLinear divides, rounds and saturates: fewer, cheaper nodes than doing it
    # with Mul, Floor, Clip and Cast, and int16 indices are half the bytes to hand over.
    shifted = tape.op("Sub", [lattice, centre])
    bins = tape.op("QuantizeLinear", [shifted, width, shared.zero], domain=_ORT_DOMAIN)
    lattice.name, bins.name = names.lattice, names.bins
    return [lattice, bins]


def _graph_input(graph: ir.Graph, name: str, dtype: ir.DataType, shape: list[int]) -> ir.Value:
    value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))
    graph.inputs.append(value)
    return value


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
