"""Per-layer error localization: where along the graph does the candidate leave the reference?

Every intermediate tensor that exists in both models is compared, sample by sample, so memory
stays at one sample's activations however many samples run. Tensors are matched by name; in a
quantized candidate, the output of ``DequantizeLinear(QuantizeLinear(X))`` stands for the float
tensor ``X`` it replaces.

The *first jump* is the first tensor in graph order whose relative error is at least
``jump_threshold`` and at least ``jump_factor`` times the largest error upstream of it (over
the inputs of the node that produces it): the layer where error is born, which a user should
exclude from compression or keep in higher precision.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.passes.quant import placement
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sample_batches, sessions
from onnx_shrink.runtime_check.compare import ErrorAccumulator

logger = logging.getLogger(__name__)

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
)


@dataclasses.dataclass(frozen=True)
class LayerError:
    """The error of one intermediate tensor and of what flows into the node producing it."""

    tensor: str
    candidate_tensor: str
    op_type: str
    node: str
    position: int
    relative_error: float
    max_abs_error: float
    cosine: float
    snr_db: float
    upstream_relative_error: float

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """Matched tensors in graph order, their ranking by error, and the first error jump."""

    layers: tuple[LayerError, ...]
    ranked: tuple[str, ...]
    first_jump: LayerError | None
    samples: int
    unmatched: int
    jump_threshold: float
    jump_factor: float
    reshaped: int = 0
    """tensors matched by name whose shape the candidate changed (pruned channels): not
    compared, and the error upstream of what they feed is unknown (NaN)"""

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    name: str
    candidate_name: str
    op_type: str
    node: str
    position: int


def localize(
    reference: ir.Model,
    candidate: ir.Model,
    dataset: data_mod.Dataset,
    specs: Sequence[data_mod.InputSpec],
    *,
    provider: str = "cpu",
    jump_threshold: float = 1e-3,
    jump_factor: float = 10.0,
) -> LayerReport:
    """Compare every shared intermediate tensor of two models over ``dataset``, per sample."""
    tensors, unmatched = match_tensors(reference, candidate)
    ref_session = sessions.create_session(
        large_tensors.session_source(with_outputs(reference, [t.name for t in tensors])),
        provider=provider,
        stop_spinning=True,  # the two sessions take turns
    )
    cand_session = sessions.create_session(
        large_tensors.session_source(with_outputs(candidate, [t.candidate_name for t in tensors])),
        provider=provider,
        stop_spinning=True,  # the two sessions take turns
    )
    accumulators = {t.name: ErrorAccumulator(t.name) for t in tensors}
    ref_names = [t.name for t in tensors]
    cand_names = [t.candidate_name for t in tensors]
    samples, reshaped = 0, set()
    for feed in (b.feed for b in sample_batches.single_samples(dataset, specs)):
        ref_out = ref_session.run(ref_names, feed)
        cand_out = cand_session.run(cand_names, sessions.fitted_feed(cand_session, feed))
        for name, ref, cand in zip(ref_names, ref_out, cand_out, strict=True):
            ref, cand = np.asarray(ref), np.asarray(cand)
            if ref.shape != cand.shape:
                reshaped.add(name)
            elif np.issubdtype(ref.dtype, np.floating):
                accumulators[name].add(*_without_shared_sentinels(ref, cand))
        samples += 1
    inputs_of = {
        out.name: tuple(i.name for i in node.inputs if i is not None and i.name)
        for node in reference.graph
        for out in node.outputs
        if out.name
    }
    report = (tensors, accumulators, samples, unmatched, inputs_of, reshaped)
    return _report(*report, jump_threshold, jump_factor)


def _without_shared_sentinels(ref: np.ndarray, cand: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ref`` and ``cand`` with 0 where both hold a mask sentinel of the same sign. Such an
    element is exact, and left in, its size would make any error around it vanish: an ALBERT
    tagger's masked scores read a relative error of 1.6e-39, so the Softmax after them
    looked as if it made its 0.553 alone."""
    # Every tensor of every sample comes here: two reductions, which allocate nothing, rule
    # out the common case before any whole-tensor mask is made.
    if not (_holds_sentinels(ref) and _holds_sentinels(cand)):
        return ref, cand
    shared = _sentinels(ref) & _sentinels(cand)
    shared &= np.signbit(ref) == np.signbit(cand)
    if not shared.any():
        return ref, cand
    return np.where(shared, 0, ref), np.where(shared, 0, cand)


def _sentinels(values: np.ndarray) -> np.ndarray:
    """Where ``values`` hold a mask sentinel (``_sentinel_limit`` or more in magnitude)."""
    return np.abs(values) >= _sentinel_limit(values.dtype)


def _holds_sentinels(values: np.ndarray) -> bool:
    """Whether ``values`` hold any mask sentinel (NaN ignored)."""
    if not values.size:
        return False
    limit = _sentinel_limit(values.dtype)
    return bool(
        np.fmax.reduce(values, axis=None) >= limit or np.fmin.reduce(values, axis=None) <= -limit
    )


def _sentinel_limit(dtype: np.dtype) -> np.floating:
    """A mask sentinel's least magnitude in ``dtype``: quant's ``SENTINEL_MAGNITUDE`` (a
    mask's stand-in for -inf is -3.4e38), or a half-precision type's largest finite value
    (the stand-in cast to float16 is -inf or -65504; comparing float16 with 1e20 overflowed,
    and numpy warned of it in the middle of the run)."""
    return dtype.type(min(placement.SENTINEL_MAGNITUDE, float(np.finfo(dtype).max)))


def _report(
    tensors, accumulators, samples, unmatched, inputs_of, reshaped, jump_threshold, jump_factor
) -> LayerReport:
    """``inputs_of``: every reference tensor's producer's inputs, matched in the candidate or
    not, so that the upstream error walks past tensors a pass removed (a BatchNormalization
    folded into its Conv) to the matched ones before them. Past a tensor in ``reshaped``
    (pruned channels) it is unknown: NaN, never a jump's "from 0 upstream" (openWakeWord's
    embedding CNN pruned: its last Conv read as where a 0.29 error was born)."""
    errors = {name: acc.result() for name, acc in accumulators.items() if acc.count}
    upstream_cache: dict[str, float] = {}

    def upstream(name: str) -> float:
        # Largest error among the nearest matched tensors feeding the producer of ``name``.
        if name not in upstream_cache:
            upstream_cache[name] = 0.0  # guards against cycles through odd graphs
            found = []
            for inp in inputs_of.get(name, ()):
                if inp in reshaped:
                    found.append(math.nan)
                else:
                    found.append(errors[inp].relative_error if inp in errors else upstream(inp))
            unknown = any(map(math.isnan, found))
            upstream_cache[name] = math.nan if unknown else max(found, default=0.0)
        return upstream_cache[name]

    layers = []
    for t in tensors:
        if t.name not in errors:
            continue
        e = errors[t.name]
        layers.append(
            LayerError(
                tensor=t.name,
                candidate_tensor=t.candidate_name,
                op_type=t.op_type,
                node=t.node,
                position=t.position,
                relative_error=e.relative_error,
                max_abs_error=e.max_abs_error,
                cosine=e.cosine,
                snr_db=e.snr_db,
                upstream_relative_error=upstream(t.name),
            )
        )
    first_jump = next(
        (
            layer
            for layer in layers
            if layer.relative_error >= jump_threshold
            and layer.relative_error >= jump_factor * layer.upstream_relative_error
            # past a NaN/Inf (error ∞) upstream, nothing downstream jumps
            and math.isfinite(layer.upstream_relative_error)
        ),
        None,
    )
    ranked = tuple(
        layer.tensor for layer in sorted(layers, key=lambda x: x.relative_error, reverse=True)
    )
    return LayerReport(
        tuple(layers),
        ranked,
        first_jump,
        samples,
        unmatched,
        jump_threshold,
        jump_factor,
        len(reshaped),
    )


def match_tensors(reference: ir.Model, candidate: ir.Model) -> tuple[list[_Tensor], int]:
    """Reference tensors (graph order) with their candidate counterparts, and the unmatched count.

    Only float tensors produced by main-graph nodes from the graph's inputs take part: a
    tensor computed from constants alone (a Constant's output, a weight an int8 model casts
    and scales in the graph) is the same for every sample; fetched on every run it cost an
    int8 MiniLM's check 2.5 GB and 73 s instead of 0.5 GB and 8 s.
    """
    candidate_names = {out.name for node in candidate.graph for out in node.outputs if out.name}
    stand_ins = dequantized_stand_ins(candidate)
    varying = _input_dependent(reference.graph)
    tensors, unmatched = [], 0
    for position, node in enumerate(reference.graph):
        if node not in varying:
            continue
        for out in node.outputs:
            if not out.name or (out.dtype is not None and out.dtype not in FLOAT_TYPES):
                continue
            match = stand_ins.get(out.name) or (out.name if out.name in candidate_names else None)
            if match is None:
                unmatched += 1
                continue
            tensors.append(
                _Tensor(
                    name=out.name,
                    candidate_name=match,
                    op_type=node.op_type,
                    node=node.name or "",
                    position=position,
                )
            )
    return tensors, unmatched


def _input_dependent(graph: ir.Graph) -> set[ir.Node]:
    """The nodes whose outputs depend on a graph input (or an outer value, in a body), in
    graph order; nodes with subgraphs count as dependent (their bodies may read inputs)."""
    varying_values = {id(v) for v in graph.inputs}
    nodes: set[ir.Node] = set()
    for node in graph:
        reads = any(
            v is not None
            and (id(v) in varying_values or (v.const_value is None and v.producer() is None))
            for v in node.inputs
        )
        has_body = any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        )
        if reads or has_body:
            nodes.add(node)
            varying_values.update(id(out) for out in node.outputs)
    return nodes


def dequantized_stand_ins(model: ir.Model) -> dict[str, str]:
    """Float tensor name -> name of the ``DequantizeLinear`` output that replaces it."""
    result = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or node.inputs[0] is None:
            continue
        quantize = node.inputs[0].producer()
        if quantize is not None and quantize.op_type == "QuantizeLinear":
            source = quantize.inputs[0]
            if source is not None and source.name and node.outputs[0].name:
                result[source.name] = node.outputs[0].name
    return result


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` whose graph also outputs the tensors ``names``."""
    clone = model.clone()
    values = ir.convenience.create_value_mapping(clone.graph, include_subgraphs=False)
    present = {v.name for v in clone.graph.outputs}
    for name in names:
        if name not in present:
            clone.graph.outputs.append(values[name])
            present.add(name)
    return clone
