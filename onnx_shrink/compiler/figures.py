"""A model's figures in a pipeline: measured at once on inferred shapes, and counted again
on the dims of one real run where inference leaves a MAC count a bound (the run goes on in
a thread while the pipeline's next pass runs)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence

import onnx_ir as ir

from onnx_shrink.compiler import stats

ShapeObserver = Callable[[ir.Model], Callable[[], stats.Shapes | None]]
"""Starts one sample's real run of a model (``runtime_check.shapes.observer``) and returns
what waits for its dims (None where it cannot run). The model is read before it returns: the
run may go on while the model changes."""


def measure(
    model: ir.Model,
    input_dims: stats.Shapes | None,
    observe: ShapeObserver | None,
    observed: dict[str, Sequence[int]],
) -> stats.ModelStats:
    """``stats.measure`` on inferred shapes and the dims of runs so far (``observed``),
    counted again on a new run's dims (added to ``observed``) where they leave MAC nodes
    uncounted or counted on a dim inference could not fix (a Paddle Reshape's)."""
    return Figures.start(model, input_dims, observe, observed).final(model, input_dims, observed)


@dataclasses.dataclass(frozen=True)
class Figures:
    """A model's figures, waiting (``dims``) for a real run ``observe`` started where
    inferred shapes leave a bound; ``final`` counts again on its dims."""

    measured: stats.ModelStats
    dims: Callable[[], stats.Shapes | None] | None

    @classmethod
    def start(
        cls,
        model: ir.Model,
        input_dims: stats.Shapes | None,
        observe: ShapeObserver | None,
        observed: dict[str, Sequence[int]],
    ) -> Figures:
        measured = stats.measure(model, observed or None, input_dims)
        bound = measured.nodes_without_macs and observe is not None
        return cls(measured, observe(model) if bound else None)

    def final(
        self,
        model: ir.Model,
        input_dims: stats.Shapes | None,
        observed: dict[str, Sequence[int]],
    ) -> stats.ModelStats:
        """The figures, counted again on the run's dims (added to ``observed``) if it gave
        any; ``model``: the one ``start`` measured, as it was then."""
        real = self.dims() if self.dims is not None else None
        if not real:
            return self.measured
        observed.update(real)
        return stats.measure(model, observed, input_dims)

    def abandon(self) -> None:
        """Wait for the run, its dims unused: a pass raised, and no run may outlive the
        call that started it (a library caller that catches the error goes on without a
        session still running, holding memory, beside it)."""
        if self.dims is not None:
            with contextlib.suppress(Exception):  # the pass's error is the one to raise
                self.dims()
