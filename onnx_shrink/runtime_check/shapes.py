"""Shapes of a real run: the dims the tensors around each MAC node take on one feed.

``compiler.stats`` counts MACs from inferred shapes, symbolic dims as 1, so its figure
compares models, not workloads. Where a workload's MACs are wanted (a benchmark setting MACs
beside latency), ``stats.measure(model, observed(model, feed))`` counts what a session really
computed on ``feed``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import stats
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.runtime_check import sessions
from onnx_shrink.runtime_check.layers import with_outputs


def observed(
    model: ir.Model, feed: Mapping[str, np.ndarray], provider: str = "cpu"
) -> dict[str, tuple[int, ...]]:
    """Dims by value name of the graph inputs in ``feed`` and of every main-graph value that
    a node counted for MACs (``stats.is_mac_node``) reads or writes, from one run on ``feed``
    (``model`` is not modified; subgraph values are not recorded)."""
    inputs = {v.name for v in model.graph.inputs}
    wanted = []
    for node in model.graph:
        if not stats.is_mac_node(node):
            continue
        for value in (*node.inputs, *node.outputs[:1]):
            if value is None or not value.name or value.name in inputs:
                continue
            if value.const_value is None and not value.is_initializer():
                wanted.append(value.name)
    names = list(dict.fromkeys(wanted))
    session = sessions.create_session(
        large_tensors.session_source(with_outputs(model, names)), provider=provider
    )
    given = {k: v for k, v in feed.items() if k in inputs}
    arrays = session.run(names, given) if names else []
    result = {name: tuple(np.shape(array)) for name, array in zip(names, arrays, strict=True)}
    result.update({name: tuple(np.shape(array)) for name, array in given.items()})
    return result
