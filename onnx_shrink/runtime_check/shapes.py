"""Shapes of a real run: the dims the tensors around each MAC node take on one feed.

``compiler.stats`` counts MACs from inferred shapes, symbolic dims as 1, so its figure
compares models, not workloads. Where a workload's MACs are wanted (a benchmark setting MACs
beside latency), ``stats.measure(model, observed(model, feed))`` counts what a session really
computed on ``feed``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import stats
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import sessions
from onnx_shrink.runtime_check.layers import with_outputs
from onnx_shrink.runtime_check.synthetic import synthetic_feed

if TYPE_CHECKING:
    from onnx_shrink.compiler.figures import ShapeObserver

logger = logging.getLogger(__name__)

T = TypeVar("T")


def observed(
    model: ir.Model, feed: Mapping[str, np.ndarray], provider: str = "cpu"
) -> dict[str, tuple[int, ...]]:
    """Dims by value name of the graph inputs in ``feed``, of every main-graph value that a
    node counted for MACs (``stats.is_mac_node``) reads or writes, and of the first output
    of each node reading one, from one run on ``feed`` (``model`` is not modified; subgraph
    values are not recorded)."""
    return _Run.of(model, feed)(provider)


@dataclasses.dataclass(frozen=True)
class _Run:
    """One observing run, its model already serialized: what ``observed`` does after it
    reads ``model``, so the run can go on in another thread while ``model`` changes."""

    source: large_tensors.SessionSource
    names: list[str]
    given: dict[str, np.ndarray]

    @classmethod
    def of(cls, model: ir.Model, feed: Mapping[str, np.ndarray]) -> _Run:
        inputs = {v.name for v in model.graph.inputs}
        wanted = []
        for node in model.graph:
            if not stats.is_mac_node(node):
                continue
            # And what reads a MAC node's output: after ``fold`` a Conv writes the value of
            # the BatchNormalization or scale it absorbed, and a later pass counts it by that
            # name.
            readers = [use.node.outputs[0] for use in node.outputs[0].uses() if use.node.outputs]
            for value in (*node.inputs, *node.outputs[:1], *readers):
                if value is None or not value.name or value.name in inputs:
                    continue
                if value.const_value is None and not value.is_initializer():
                    wanted.append(value.name)
        names = list(dict.fromkeys(wanted))
        source = large_tensors.session_source(with_outputs(model, names))
        return cls(source, names, {k: v for k, v in feed.items() if k in inputs})

    def __call__(self, provider: str) -> dict[str, tuple[int, ...]]:
        # Unoptimized: the same shapes, a third less time to load (PP-OCRv4 rec: 109 -> 74 ms).
        session = sessions.create_session(
            self.source, provider=provider, optimize=False, prepack=False
        )
        arrays = session.run(self.names, self.given) if self.names else []
        result = {n: tuple(np.shape(a)) for n, a in zip(self.names, arrays, strict=True)}
        result.update({name: tuple(np.shape(array)) for name, array in self.given.items()})
        return result


def first_real_sample(
    model: ir.Model, calib: data_mod.Dataset | None, source: object
) -> data_mod.Feed | None:
    """The first sample of the real data (calibration's, else the check's, opened for it
    alone where it is not open yet; ``Dataset.first_sample``), whose dims the MACs count
    whether or not a pass calibrates; None without real data, or for a reader not yet
    opened, which would lose that feed to the check (an open one's first feed is peeked, or
    replayed)."""
    specs = data_mod.specs_from_model(model)
    opened = calib if calib is not None else source
    if isinstance(opened, data_mod.Dataset):
        return None if opened.synthetic else opened.first_sample(specs)
    if source is None or hasattr(source, "get_next"):
        return None
    return data_mod.prepare(specs, source).first_sample(specs)


def sample_dims(
    model: ir.Model,
    first_sample: data_mod.Feed | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
) -> dict[str, tuple[int, ...]] | None:
    """The dims of one sample for counting MACs: the shapes asked for (``input_shapes``),
    their batch axes as 1, else those of the real data's ``first_sample`` as they are (a
    model without a batch axis keeps its frames), else the batch as 1 where the model fixes
    every other dim (``_determined_dims``); None (symbolic dims count as 1) otherwise:
    synthetic data's default dims would make the figure up."""
    specs = data_mod.specs_from_model(model)
    if first_sample is not None and not input_shapes:
        return {name: tuple(array.shape) for name, array in first_sample.items()}
    if not input_shapes:
        return _determined_dims(specs)
    dims = {
        s.name: data_mod.concrete_shape(s, input_shapes[s.name])
        for s in specs
        if s.name in input_shapes
    }
    return {
        s.name: (1, *dims[s.name][1:]) if s.batch_axis and dims[s.name] else dims[s.name]
        for s in specs
        if s.name in dims
    }


def _determined_dims(specs: Sequence[data_mod.InputSpec]) -> dict[str, tuple[int, ...]] | None:
    """One sample's dims where the model fixes every dim but the batch (``[N, 32]`` token
    ids, ``[N, 3, 224, 224]`` images): the batch as 1, nothing made up; None where another
    dim is symbolic. Inference alone loses dims a Reshape to ``[-1, H]`` flattens (g2p-id's
    BERT: 1 row of 32 counted, 184k MACs a sample for 6.4M)."""
    dims = {}
    for spec in specs:
        rest = spec.shape[1:] if spec.batch_axis else spec.shape
        if not all(isinstance(d, int) and d > 0 for d in rest):
            return None
        dims[spec.name] = (1, *rest) if spec.batch_axis else tuple(rest)
    return dims  # type: ignore[return-value]


def observer(
    model: ir.Model,
    first_sample: data_mod.Feed | None,
    input_shapes: Mapping[str, Sequence[int]] | None,
    provider: str = "cpu",
) -> ShapeObserver | None:
    """What ``pipeline.run`` asks for the dims of a run where inferred shapes leave a MAC
    count a bound (``stats.ModelStats.nodes_without_macs``): one sample of the dims
    ``sample_dims`` counts (a synthetic one of ``input_shapes``, else ``first_sample``, else
    a synthetic one where the model fixes every dim but the batch), run as ``observed`` runs
    it, in a thread: the observer reads the model at once and returns what waits for the
    dims. None otherwise: symbolic dims then count as 1 by definition. A model that cannot
    run where it is checked (bfloat16 on the CPU) keeps its bound."""
    if first_sample is not None and not input_shapes:
        feed = dict(first_sample)
    else:
        dims = sample_dims(model, None, input_shapes)
        if dims is None:
            return None
        feed = synthetic_feed(data_mod.specs_from_model(model), dims)

    def observe(candidate: ir.Model) -> Callable[[], stats.Shapes | None]:
        run = _or_bound(lambda: _Run.of(candidate, feed))  # ``candidate`` may change after
        if run is None:
            return lambda: None
        # The session is made and run in a thread, while the pipeline's next pass runs:
        # PP-OCRv4 rec's 0.07-0.10 s and MiniLM's ~0.1 s go on beside fold instead of before
        # it (a run lets go of Python's lock; making the session may hold it, onnxruntime
        # issue 27063).
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="onnx-shrink-dims")
        future = pool.submit(run, provider)
        pool.shutdown(wait=False)
        return lambda: _or_bound(future.result)

    return observe


def _or_bound(call: Callable[[], T]) -> T | None:
    """``call()``, or None where it fails: accounting must not fail a run, a bound stays."""
    try:
        return call()
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        logger.debug("no real run to count MACs on: %s", e)
        return None
