"""``shrink``'s calibration: the data its data-aware passes read, the pipeline's collector
over it, and progress reports as ``shrink``'s ``on_calibration`` takes them."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from onnx_shrink.compiler.data_aware import Look
from onnx_shrink.compiler.io import large_tensors
from onnx_shrink.errors import BadModelError
from onnx_shrink.runtime_check import batch_mixing, sample_batches, sessions
from onnx_shrink.runtime_check import checker as check_mod
from onnx_shrink.runtime_check import collect as collect_mod
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import progress as progress_mod

logger = logging.getLogger(__name__)

CalibrationProgress = Callable[[str, int, int | None], None]
"""``shrink``'s ``on_calibration``: (phase, samples done, samples in all or None)."""


def calibration_data(
    model: ir.Model,
    source: check_mod.DataSource,
    input_shapes: Mapping[str, Sequence[int]] | None,
    stack: contextlib.ExitStack,
    held: Mapping[str, float] | None = None,
    provider: str = "cpu",
    label: str = "the input model",
) -> data_mod.Dataset:
    """Calibration inputs, checked against the model now and readable once per pass;
    without a source, synthetic inputs of ``input_shapes``. Run one sample at a time where
    the model mixes the samples of a batch (``batch_mixing.vetted``, on ``provider``), or
    where the input model does not load there to be tried: the passes before the data-aware
    one may make it load (``fold`` drops a dead node no kernel takes). ``held``: inputs
    fold.freeze holds at one value (``data_mod.prepare``). ``label``: how warnings name the
    model, as the check's do (its path where it came from a file)."""
    specs = data_mod.specs_from_model(model)
    if source is None:
        dataset = data_mod.synthetic(specs, input_shapes, held=held)
    else:
        dataset = data_mod.replayable(data_mod.prepare(specs, source, held=held), stack)
    if dataset.independent_samples or not sample_batches.splittable(dataset, specs):
        return dataset  # the check's data, vetted already, or nothing that could be joined
    try:  # unoptimized and unpacked: a trial of three small runs
        session = sessions.create_session(
            large_tensors.session_source(model), provider=provider, optimize=False, prepack=False
        )
    except BadModelError as e:
        # Whether a batch's samples stay apart is untried: one a run is right either way.
        logger.info("calibration: each sample runs alone: untried on the input model (%s)", e)
        return batch_mixing.each_sample_alone(dataset, specs)
    return batch_mixing.vetted(dataset, specs, session, label, model)


def reporting(
    progress: CalibrationProgress | None, samples: int | None, purpose: str = ""
) -> progress_mod.Progress | None:
    """The engine's (phase, samples done) reports as ``progress`` takes them: with the
    samples in all (``samples``, unless the report gives the phase's own), each phase named
    after ``purpose`` where there is one ("bias correction: statistics")."""
    if progress is None:
        return None

    def report(phase: str, done: int, total: int | None = None) -> None:
        progress(phase, done, samples if total is None else total)

    return progress_mod.named(report, purpose)


def collect(
    model: ir.Model,
    requests,
    look: Look | None = None,
    *,
    dataset: data_mod.Dataset,
    provider: str,
    progress: CalibrationProgress | None,
):
    """``pipeline.Collector`` over ``dataset``, read as ``look`` says.

    Raises:
        BadModelError: onnxruntime cannot load ``model`` (the model as the passes before
            leave it) on ``provider``; the message says it was calibration's run.
    """
    look = look or Look()
    if look.samples:
        specs = data_mod.specs_from_model(model)
        dataset = sample_batches.first_samples(dataset, specs, look.samples)
    if dataset.synthetic:
        logger.warning(
            "NO CALIBRATION DATA: calibrating on random inputs (%s); the statistics say nothing "
            "about real data: give --calibration FILE (or --data)",
            dataset.description,
        )
    try:
        return collect_mod.collect(
            model,
            requests,
            dataset,
            provider=provider,
            progress=reporting(progress, dataset.samples, look.purpose),
            run_samples=look.run_samples,
        )
    except BadModelError as e:
        # "the model" alone read as the input file, which the check may well load.
        raise BadModelError(f"calibration on {provider}: {e}") from e
