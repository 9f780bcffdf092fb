"""Many edited copies of a model measured in one streaming run.

``sensitivity`` (one quantized layer per copy) and ``probe`` (one low-rank edit per copy) both
ask "how much do the model's outputs move when only this is changed?" for many changes. Rather
than one full run per change, the copies run beside the unedited graph in one combined model:

* the unedited graph keeps its float outputs ``<out>``; copy ``i`` adds ``<out><sep>i``;
* graph inputs are shared, and so is every initializer a copy did not change (checked to hold
  the same data), so memory is one model's weights plus each copy's activations and what its
  edit added (renamed with the copy's suffix);
* ``sep`` is a separator no name of the model contains, so every suffixed name is new.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sessions
from onnx_shrink.runtime_check.collect import Progress
from onnx_shrink.runtime_check.layers import FLOAT_TYPES


def compared_outputs(model: ir.Model, who: str) -> list[int]:
    """Indices of the float graph outputs computed by a node (echoed inputs cannot differ).

    Raises:
        ShrinkError: there is none (``who`` names the caller in the message).
    """
    indices = [
        i
        for i, value in enumerate(model.graph.outputs)
        if value.producer() is not None and value.dtype in FLOAT_TYPES
    ]
    if not indices:
        raise ShrinkError(f"{who}: the model has no float output computed by its graph")
    return indices


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
) -> ir.Model:
    """The unedited ``base`` plus, per edit i, ``edits[i](clone of base)`` merged in with
    outputs ``<out><sep>i``. ``base`` should hold unshared tensors (``io.unshare_tensors``):
    serializing names each initializer after its value, so a tensor an edit renames harms
    neither ``base`` nor the caller's model."""
    combined = base.clone()  # nothing of the unedited graph is renamed: tensors stay shared
    kept = [combined.graph.outputs[i] for i in outputs]
    combined.graph.outputs.clear()
    combined.graph.outputs.extend(kept)
    for index, edit in enumerate(edits):
        # The copy shares its tensors with ``base``: one model's weights in memory.
        _merge(combined, edit(base.clone()), outputs, f"{sep}{index}", who)
    return combined


def stream(
    combined: ir.Model,
    data: data_mod.Dataset,
    provider: str,
    progress: Progress | None = None,
    phase: str = "",
) -> Iterator[tuple[data_mod.Batch, dict[str, np.ndarray]]]:
    """Run ``combined`` over ``data``: yield each batch and its outputs by name."""
    session = sessions.create_session(large_tensors.session_source(combined), provider=provider)
    names = [o.name for o in session.get_outputs()]
    for done, batch in enumerate(data.batches(), 1):
        yield batch, dict(zip(names, session.run(names, batch.feed), strict=True))
        if progress is not None:
            progress(phase, done)


def _merge(
    combined: ir.Model, copy: ir.Model, outputs: Sequence[int], suffix: str, who: str
) -> None:
    """Move the nodes of ``copy`` into ``combined``: its inputs and unchanged initializers
    become the combined graph's, every other value and every node name gets ``suffix``."""
    graph, source = combined.graph, copy.graph
    copy_outputs = [source.outputs[i] for i in outputs]
    source.outputs.clear()
    inputs = {v.name: v for v in graph.inputs}
    for value in source.inputs:
        value.replace_all_uses_with(inputs[value.name])
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
