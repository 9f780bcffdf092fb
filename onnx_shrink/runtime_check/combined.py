"""Many edited copies of a model measured in one streaming run.

``sensitivity`` (one quantized layer per copy) and ``probe`` (one low-rank edit per copy) both
ask "how much do the model's outputs move when only this is changed?" for many changes. Rather
than one full run per change, the copies run beside the unedited graph in one combined model:

* the unedited graph keeps its float outputs ``<out>``; copy ``i`` adds ``<out><sep>i``;
* graph inputs are shared, and so is every initializer a copy did not change (checked to hold
  the same data), so memory is one model's weights plus each copy's activations and what its
  edit added (renamed with the copy's suffix);
* ``sep`` is a separator no name of the model contains, so every suffixed name is new;
* what an edit left unchanged runs once: a copy's node that repeats an unedited node (same
  op, attributes and inputs) is dropped for it, so a copy computes only what its edit changed
  and the nodes downstream of that. An edit near the outputs (PP-OCRv4 rec's low-rank layers
  after its CNN backbone) costs a few nodes, not a model, to build, load and run.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, walk
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import ShrinkError
from onnx_shrink.passes.quant import value_types
from onnx_shrink.runtime_check import collect_runs, selection, sessions
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check.layers import FLOAT_TYPES
from onnx_shrink.runtime_check.progress import Progress

logger = logging.getLogger(__name__)


def compared_outputs(model: ir.Model, who: str) -> list[int]:
    """Indices of the float graph outputs computed by a node (echoed inputs cannot differ),
    less those ordered by a selection where others remain (``add_scored_outputs`` outputs
    what the selection chose from: its reordered rows are no measure of the change).

    Raises:
        ShrinkError: there is none (``who`` names the caller in the message).
    """
    graph = model.graph
    indices = [i for i, value in enumerate(graph.outputs) if _computed_float(value)]
    if not indices:
        raise ShrinkError(f"{who}: the model has no float output computed by its graph")
    ordered = selection.ordered_outputs(graph)
    unordered = [i for i in indices if graph.outputs[i] not in ordered]
    return unordered or indices


def computes_float_output(model: ir.Model) -> bool:
    """Whether a graph output is a float value a node computes."""
    return any(map(_computed_float, model.graph.outputs))


def _computed_float(value: ir.Value) -> bool:
    return value.producer() is not None and value.dtype in FLOAT_TYPES


SCORE_DEPTH = 8
"""Nodes walked back from an integer output to the float values it is decided from."""


def scores_elsewhere(model: ir.Model) -> bool:
    """Whether ``add_scored_outputs`` would add outputs to ``model`` (it may add none)."""
    return bool(_decided_outputs(model.graph) or selection.ordered_outputs(model.graph))


def add_scored_outputs(model: ir.Model) -> list[str]:
    """Output the float values the measurements rank by, where the model's outputs are no
    measure of a change (in place), and return the new outputs' names (``<value>_scored``):

    * the values its computed integer and boolean outputs are decided from: a tagger's or a
      classifier's ``ArgMax`` reads its scores, a mask's ``Greater`` its probabilities (the
      error of ids is no distance); nothing where they come from no float value within
      ``SCORE_DEPTH`` nodes. Also beside float outputs: trueocr's recogniser outputs its ids
      (an ArgMax of the logits) and a float confidence, and ``quant.max_error`` judged the
      confidence alone while 0.7% of the ids changed;
    * where a float output is ordered by a selection (a detector's ``TopK``), the values the
      selection chose from (``selection.sources``), which ``compared_outputs`` then measures
      in its place.

    A value the graph outputs already, or scores already (an earlier call), is not added
    again. Each is an Identity's output, so that the value itself is no graph output:
    ``quant`` quantizes a graph output its layer writes, and the measured copies would be
    rounded where the pass's result is not."""
    graph = model.graph
    reasons, scores = [], []
    ordered = selection.ordered_outputs(graph)
    decided = _decided_outputs(graph)
    if ordered or decided:
        value_types.infer_types(model)  # sources and the walk tell floats by their types
    if ordered and computes_float_output(model):
        scores += selection.sources(graph, *ordered)
        chosen = (f"'{v.name}' by {selection.describe(node)}" for v, node in ordered.items())
        reasons.append(f"are rows a selection orders ({', '.join(chosen)})")
    if decided:
        scores += [score for value in decided for score in _float_sources(value)]
        reasons.append("are integers")
    added = _scored_aliases(graph, [s for s in dict.fromkeys(scores) if not _output_already(s)])
    if added:
        logger.info(
            "the model's outputs %s; errors are measured on the float values they are "
            "decided from: %s",
            " or ".join(reasons),
            ", ".join(added),
        )
    return added


def _decided_outputs(graph: ir.Graph) -> list[ir.Value]:
    """The graph outputs a node computes that are no float values (ids, masks)."""
    return [v for v in graph.outputs if v.producer() is not None and not _computed_float(v)]


def _output_already(value: ir.Value) -> bool:
    """Whether ``value`` is a graph output, or an Identity of it is (``_scored_aliases``)."""
    readers = (node for node, _ in value.uses() if node.op_type == "Identity")
    return value.is_graph_output() or any(n.outputs[0].is_graph_output() for n in readers)


def _scored_aliases(graph: ir.Graph, scores: Sequence[ir.Value]) -> list[str]:
    """Output each of ``scores`` as a new Identity's output, ``<value>_scored``."""
    taken = graph_edit.value_names(graph)
    added: list[str] = []
    for score in scores:
        alias = ir.node("Identity", [score])
        alias.outputs[0].name = graph_edit.fresh_name(f"{score.name}_scored", taken)
        alias.outputs[0].type, alias.outputs[0].shape = score.type, score.shape
        graph.append(alias)
        graph.outputs.append(alias.outputs[0])
        added.append(alias.outputs[0].name)
    return added


def _float_sources(value: ir.Value) -> list[ir.Value]:
    """The computed float inputs of the first node upstream of ``value`` that has any,
    following computed inputs back through at most ``SCORE_DEPTH`` nodes."""
    frontier = [value]
    for _ in range(SCORE_DEPTH):
        # Shape and Size read no values: a float input of theirs decides nothing.
        producers = (v.producer() for v in frontier)
        nodes = [n for n in dict.fromkeys(producers) if n and n.op_type not in ("Shape", "Size")]
        if not nodes:
            return []
        inputs = [v for node in nodes for v in node.inputs if v is not None]
        computed = list(dict.fromkeys(v for v in inputs if v.producer() is not None))
        floats = [v for v in computed if v.dtype in FLOAT_TYPES]
        if floats:
            return floats
        frontier = computed
    return []


def separator(model: ir.Model) -> str:
    """A suffix separator no value or node name of the model contains."""
    names = {v.name or "" for v in model.graph.inputs}
    names |= set(model.graph.initializers)
    names |= {out.name or "" for node in model.graph for out in node.outputs}
    names |= {node.name or "" for node in model.graph}
    sep = "#"
    while any(sep in name for name in names):
        sep += "~"
    return sep


def build(
    base: ir.Model,
    edits: Sequence[Callable[[ir.Model], ir.Model]],
    outputs: Sequence[int],
    sep: str,
    who: str,
    anchors: Sequence[Sequence[str]] = (),
) -> ir.Model:
    """The unedited ``base`` plus, per edit i, ``edits[i](clone of base)`` merged in with
    outputs ``<out><sep>i``. ``anchors[i]`` (optional) names the nodes edit i rewrites: its
    copy then holds only those nodes and the ones downstream of them (``_Downstream``), which
    is all the edit can change. ``base`` should hold unshared tensors
    (``io.unshare_tensors``): serializing names each initializer after its value, so a tensor
    an edit renames harms neither ``base`` nor the caller's model."""
    combined = base.clone()  # nothing of the unedited graph is renamed: tensors stay shared
    kept = [combined.graph.outputs[i] for i in outputs]
    combined.graph.outputs.clear()
    combined.graph.outputs.extend(kept)
    # The unedited graph's values by name (node outputs and what they read).
    unedited = ir.convenience.create_value_mapping(combined.graph, include_subgraphs=False)
    downstream = _Downstream(base)
    for index, edit in enumerate(edits):
        names = anchors[index] if index < len(anchors) else ()
        # The copy shares its tensors with ``base``: one model's weights in memory.
        copy = downstream.copy(names) if names else base.clone()
        _merge(combined, edit(copy), outputs, f"{sep}{index}", who, unedited)
    return combined


def copy_sizes(base: ir.Model, anchors: Sequence[Sequence[str]]) -> list[int]:
    """How many nodes of ``base`` the copy ``build`` makes for each edit holds, by the edit's
    anchors: those downstream of them, or the whole graph (no anchors, or a cut that cannot
    be made). What a copy costs to build, load and run grows with it: on PP-OCRv4 rec a copy
    of its first layer holds 700 nodes, one of its last 4."""
    downstream = _Downstream(base)
    whole = len(base.graph)
    sizes: dict[tuple[str, ...], int] = {}
    for names in anchors:
        key = tuple(names)
        if key not in sizes:
            cone = downstream.cone(names) if names else None
            sizes[key] = whole if cone is None else len(cone)
    return [sizes[tuple(names)] for names in anchors]


def stream(
    combined: ir.Model,
    data: data_mod.Dataset,
    provider: str,
    progress: Progress | None = None,
    phase: str = "",
) -> Iterator[tuple[data_mod.Batch, dict[str, np.ndarray]]]:
    """Run ``combined`` over ``data``: yield each batch and its outputs by name, in order;
    ``progress`` gets the samples done and ``data``'s in all (a run over the first samples
    counts to theirs, not the dataset's).

    Two runs go at once on a CPU of two cores or more, a thread each, as calibration's do
    (``collect_runs.overlapped_runs``): a combined run is the float graph and each copy's
    downstream side by side, many kernels that onnxruntime's threads share poorly within
    one run. The sensitivity report on 32 samples: PP-OCRv4 rec 32.5 -> 20.2 s, YOLOv8n
    55.0 -> 43.7 s. A failed run raises ``RunFailedError``."""
    # Unpacked weights: a copy shares the unedited weights it reads, which prepacking would
    # copy into each of its kernels (16 copies of a 0.6 GB encoder's downstream: 5 GB).
    source = large_tensors.session_source(combined)
    threads = collect_runs.session_threads(provider)
    session = sessions.create_session(source, provider=provider, prepack=False, threads=threads)
    names = [o.name for o in session.get_outputs()]
    in_flight = collect_runs.parallel_runs(provider)
    done = 0
    for batch, outputs in collect_runs.overlapped_runs(
        session, data.batches(), names, {}, in_flight=in_flight
    ):
        yield batch, outputs
        done += batch.samples
        if progress is not None:
            progress(phase, done, data.samples)


def _merge(
    combined: ir.Model,
    copy: ir.Model,
    outputs: Sequence[int],
    suffix: str,
    who: str,
    unedited: Mapping[str, ir.Value],
) -> None:
    """Move the nodes of ``copy`` into ``combined``: its inputs (graph inputs, or the values
    a partial copy reads from upstream) and unchanged initializers become the combined
    graph's, and so do the outputs of the nodes that repeat an unedited one; every other
    value and every node name gets ``suffix``."""
    graph, source = combined.graph, copy.graph
    copy_outputs = [source.outputs[i] for i in outputs]
    source.outputs.clear()
    shared: dict[ir.Value, ir.Value] = {}
    for value in source.inputs:
        shared[value] = unedited[value.name or ""]
        value.replace_all_uses_with(shared[value])
    added = []
    for name in list(source.initializers):
        value = source.initializers.pop(name)
        original = graph.initializers.get(name)
        if original is not None:
            _check_same_tensor(original, value, who)
            value.replace_all_uses_with(original)
        else:  # made by the edit (quantized weight, scale, factors): this copy's own
            value.name = name + suffix
            added.append(value)
    shared.update(_share_unchanged(source, unedited))
    echoes: dict[ir.Value, ir.Value] = {}  # one per value: an output may be listed twice
    for position, value in enumerate(copy_outputs):
        if value in shared:  # computed by an unedited node: the copy echoes it
            if value not in echoes:
                echoes[value] = ir.Value(name=value.name, type=value.type, shape=value.shape)
                source.append(ir.node("Identity", [shared[value]], outputs=[echoes[value]]))
            copy_outputs[position] = echoes[value]
    nodes = list(source)
    for node in nodes:
        if node.name:
            node.name += suffix
        for out in node.outputs:
            # A node output's const_value is an annotation whose tensor the unedited model
            # shares; renaming the value would rename that tensor.
            out.const_value = None
            out.name = (out.name or "") + suffix
    source.remove(nodes)
    graph.extend(nodes)
    for value in added:
        graph.register_initializer(value)
    graph.outputs.extend(copy_outputs)
    for domain, version in copy.opset_imports.items():
        if combined.opset_imports.setdefault(domain, version) != version:
            raise ShrinkError(f"{who}: the edited copy changed opset '{domain}'")


class _Downstream:
    """Partial copies of a model: some nodes (by name) and every node downstream of them,
    with the values they read from upstream as graph inputs of the same names, every
    initializer, and the graph outputs (those computed upstream as inputs too). Where that
    cannot be cut cleanly (a name missing or repeated, a subgraph on the way, a value read
    inside one), the copy is whole."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        graph = model.graph
        self.order = {node: index for index, node in enumerate(graph)}
        names = collections.Counter(node.name for node in graph)
        self.by_name = {node.name: node for node in graph if node.name and names[node.name] == 1}
        self.initializers = list(graph.initializers.values())
        # A pass probes one layer at several ranks in a row: its view is made once.
        self._last: tuple[tuple[str, ...], ir.GraphView | None] | None = None

    def copy(self, names: Sequence[str]) -> ir.Model:
        if self._last is None or self._last[0] != tuple(names):
            self._last = (tuple(names), self._view(names))
        view = self._last[1]
        if view is None:
            return self.model.clone()
        return ir.Model(
            view.clone(),
            ir_version=self.model.ir_version,
            functions=list(self.model.functions.values()),
        )

    def _view(self, names: Sequence[str]) -> ir.GraphView | None:
        """The nodes ``names`` and downstream as a view to clone; None: copy it whole."""
        cone = self.cone(names)
        if cone is None:
            return None
        graph = self.model.graph
        initializers = set(self.initializers)
        produced = {out for node in cone for out in node.outputs}
        read = [v for node in cone for v in node.inputs if v is not None]
        upstream = [
            v for v in (*read, *graph.outputs) if v not in produced and v not in initializers
        ]
        return ir.GraphView(
            list(dict.fromkeys(upstream)),
            list(graph.outputs),
            nodes=cone,
            initializers=self.initializers,
            opset_imports=dict(graph.opset_imports),
        )

    def cone(self, names: Sequence[str]) -> list[ir.Node] | None:
        """The nodes ``names`` and those downstream of them, in graph order; None when the
        copy must be whole."""
        edited = [self.by_name.get(name) for name in names]
        if not edited or any(node is None for node in edited):
            return None
        cone = walk.downstream(edited)
        graph = self.model.graph
        for node in cone:
            if node.graph is not graph:  # a value read inside a subgraph
                return None
            if any(a.type in _SUBGRAPHS for a in node.attributes.values()):
                return None
        return sorted(cone, key=self.order.__getitem__)


_SUBGRAPHS = frozenset({ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS})


def _share_unchanged(
    source: ir.Graph, unedited: Mapping[str, ir.Value]
) -> dict[ir.Value, ir.Value]:
    """Drop each node of ``source`` (in order) that repeats its unedited twin (the producer
    of the ``unedited`` value of its output's name), its outputs' uses replaced by the
    twin's; returns {dropped output: the twin's}."""
    shared: dict[ir.Value, ir.Value] = {}
    for node in list(source):
        twin = _twin(node, unedited)
        if twin is None:
            continue
        for out, replacement in zip(node.outputs, twin.outputs, strict=True):
            out.replace_all_uses_with(replacement)
            shared[out] = replacement
        source.remove(node)
    return shared


def _twin(node: ir.Node, unedited: Mapping[str, ir.Value]) -> ir.Node | None:
    """The unedited node ``node`` repeats: it has the same outputs' names, op, attributes and
    input values (graph inputs, shared initializers, outputs of nodes already shared). Nodes
    with subgraphs never repeat one: a body's reads of outer values are not compared."""
    named = next((out.name for out in node.outputs if out.name), None)
    value = unedited.get(named) if named else None
    twin = value.producer() if value is not None else None
    if (
        twin is None
        or (twin.domain, twin.op_type, twin.overload) != (node.domain, node.op_type, node.overload)
        or [o.name for o in twin.outputs] != [o.name for o in node.outputs]
        or len(twin.inputs) != len(node.inputs)
        or any(a is not b for a, b in zip(twin.inputs, node.inputs, strict=True))
        or twin.attributes.keys() != node.attributes.keys()
    ):
        return None
    for name, attr in node.attributes.items():
        if not _same_attribute(attr, twin.attributes[name]):
            return None
    return twin


def _same_attribute(a: ir.Attr, b: ir.Attr) -> bool:
    if a.type != b.type or a.is_ref() != b.is_ref():
        return False
    if a.is_ref():
        return a.ref_attr_name == b.ref_attr_name
    if a.type == ir.AttributeType.TENSOR:
        x, y = a.value, b.value
        return x is y or (x.dtype == y.dtype and np.array_equal(x.numpy(), y.numpy()))
    if a.type in _PLAIN_ATTRIBUTES:
        return a.value == b.value
    return False  # graphs, sparse tensors, type protos, tensor lists: taken as changed


_PLAIN_ATTRIBUTES = frozenset(
    {
        ir.AttributeType.INT,
        ir.AttributeType.FLOAT,
        ir.AttributeType.STRING,
        ir.AttributeType.INTS,
        ir.AttributeType.FLOATS,
        ir.AttributeType.STRINGS,
    }
)


def _check_same_tensor(original: ir.Value, value: ir.Value, who: str) -> None:
    """A shared initializer must hold the same data in the unedited model and in the copy."""
    a, b = original.const_value, value.const_value
    if a is b or (a is not None and getattr(a, "raw", a) is getattr(b, "raw", b)):
        return
    same = (
        a is not None
        and b is not None
        and a.dtype == b.dtype
        and np.array_equal(a.numpy(), b.numpy(), equal_nan=a.dtype.is_floating_point())
    )
    if not same:
        raise ShrinkError(
            f"{who}: initializer '{original.name}' differs between the unedited model and "
            "an edited copy; the copies cannot share it"
        )
