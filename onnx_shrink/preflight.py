"""What ``shrink`` checks and settles before any pass runs, so that bad input costs nothing
and leaves nothing behind: files it would write over, the input in onnxruntime on the
check's first sample, Q/DQ at an opset onnxruntime cannot run, and weights an exporter listed
as graph inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, io
from onnx_shrink.compiler.dumps import dump_files
from onnx_shrink.compiler.walk import onnx_opset
from onnx_shrink.errors import BadModelError, DataError, ShrinkError
from onnx_shrink.runtime_check import batch_mixing, labels, sample_batches, sessions, synthetic
from onnx_shrink.runtime_check import data as data_mod

# By name: the package's ``compare`` is checker's function, which hides the module.
from onnx_shrink.runtime_check.numeric_report import Tolerances

if TYPE_CHECKING:
    from onnx_shrink.api import CheckOptions
    from onnx_shrink.runtime_check.checker import DataSource

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Input:
    """The model ``shrink`` was given, loaded and vetted."""

    model: ir.Model
    reference: Path | bytes  # what the check runs as the original: the file, or its bytes
    input_bytes: int  # on disk, weight files included
    where: str  # how messages name it
    naming: graph_edit.Naming  # names given to unnamed nodes (graph_edit.restore_names)


def read_input(
    model: io.ModelSource,
    read: Mapping[str, object],
    pass_list: Sequence[ir.passes.PassBase],
    dump_dir: str | os.PathLike | None,
    output: str | os.PathLike | None,
    external_data: bool | None,
) -> Input:
    """Load ``model`` once every file the run reads (``read``, by role) and writes has been
    vetted (``preflight.refuse_bad_files``), then make its listed weights plain constants
    and refuse Q/DQ onnxruntime will not run (below)."""
    from_file = isinstance(model, (str, os.PathLike))
    # The input and its weight files, read once: every clash check and the input's size.
    model_files = io.model_reads("the input model", model) if from_file else {}
    refuse_bad_files(read, model_files, pass_list, dump_dir, output, external_data)
    loaded = io.load(model)
    reference = Path(model) if from_file else io.to_bytes(loaded)
    input_bytes = (
        sum(p.stat().st_size for p in model_files.values()) if from_file else len(reference)
    )
    unlist_weight_inputs(loaded)
    naming = graph_edit.name_unnamed_nodes(loaded)
    if naming.given:
        logger.info(
            "%d nodes without a name are named by op type and position (Conv_12) while the "
            "passes run, so options and reports can name them; the result has them unnamed",
            len(naming.given),
        )
    refuse_unrunnable_qdq(loaded, pass_list)
    where = str(model) if from_file else "the input model"
    return Input(loaded, reference, input_bytes, where, naming)


def data_sources(
    given: Input,
    options: CheckOptions | None,
    calibration: DataSource,
    data: DataSource,
    stack: contextlib.ExitStack,
    held: Mapping[str, float] | None = None,
) -> tuple[data_mod.Dataset | None, DataSource]:
    """(the check's dataset, vetted on its first sample; calibration's source). Bad data is
    rejected here, before any work is done. ``held``: inputs fold.freeze holds at one value
    (``data_mod.prepare``)."""
    dataset = None
    if options is not None:
        dataset = checked_dataset(given.reference, given.model, given.where, options, held)
    check_data = options.data if options else None
    # Without data, calibration draws what the check runs on (synthetic): the same seed,
    # with any dims the first run had to grow (``synthetic.first_that_runs``).
    sources = (calibration, data, check_data, dataset)
    source = next((s for s in sources if s is not None), None)
    if dataset is not None and source is not None and source is check_data:
        # One source for calibration, the check and the MACs, opened once; a reader is
        # read once, spilled as calibration reads it and replayed for the check.
        dataset = source = data_mod.replayable(dataset, stack)
    return dataset, source


def at_least(low: int, **counts: int | None) -> None:
    """Counts a user gave, each named as they named it (``--runs`` on the command line,
    ``latency_runs`` in ``CheckOptions``), must be at least ``low``; None is not given.

    Raises:
        ShrinkError: naming the first count below ``low`` and its value.
    """
    for name, value in counts.items():
        if value is not None and value < low:
            raise ShrinkError(f"{name} must be at least {low}, not {value}")


def parse_shapes(
    input_shapes: Mapping[str, Sequence[int] | str] | None,
) -> dict[str, tuple[int, ...]] | None:
    """``input_shapes`` with dims given as text (``"1x3x320x320"``, as ``--input-shape``
    takes them) parsed; a string read as a sequence made one dim of each character.

    Raises:
        DataError: as ``--input-shape`` would: text not ``DxDx...``, a dim not positive.
    """
    if input_shapes is None:
        return None
    return {
        name: synthetic.parse_input_shapes([f"{name}={dims}"])[name]
        if isinstance(dims, str)
        else synthetic.checked_dims(name, dims)
        for name, dims in input_shapes.items()
    }


def refuse_bad_files(
    read: Mapping[str, object],
    model_files: Mapping[str, Path],
    pass_list: Sequence[ir.passes.PassBase],
    dump_dir: str | os.PathLike | None,
    output: str | os.PathLike | None,
    external_data: bool | None,
) -> None:
    """Before any work: every file named in ``read`` (what -> source; paths only) exists,
    and nothing the run writes (``output``, its weights, a dump) is a file it reads
    (``read``'s, or ``model_files``: the input model's, the model first)."""
    named = {k: v for k, v in read.items() if isinstance(v, (str, os.PathLike))}
    refuse_missing(named)  # before any work or warning (--calibration is read late)
    reads = named | dict(model_files)
    if dump_dir is not None:
        check_dump_dir(Path(dump_dir), pass_list, reads, output)
    if output is not None:
        io.check_writable(output)
        if model_files:
            model, *weights = model_files.values()
            refuse_overwrite(model, Path(output), external_data, weights)
        io.refuse_clashes({"the result": output}, reads)


def checked_dataset(
    reference: Path | bytes,
    loaded: ir.Model,
    where: str,
    options: CheckOptions,
    held: Mapping[str, float] | None = None,
) -> data_mod.Dataset:
    """The check's data, once it, the model (on onnxruntime) and the labels where accuracy
    is asked for are known to work together: run on the first sample, before any pass.

    Raises:
        BadModelError, DataError, RunFailedError: as ``shrink`` documents them.
    """
    probe = reference_session(reference, options.provider)
    specs = data_mod.specs_from_model(loaded)
    dataset = data_mod.prepare(
        specs, options.data, options.input_shapes, labels=options.labels, held=held
    )
    refuse_unmeasurable_accuracy(options.tolerances, dataset)
    outputs, dataset = synthetic.first_that_runs(
        dataset,
        specs,
        options.input_shapes,
        lambda data: run_first_sample(probe, data, where, specs),
        label=where,
        purpose="for the check and calibration",
        held=held,
    )
    samples = dataset.samples_in(dataset.first_feed(), specs)
    binary = labels.binary_score_outputs(loaded.graph)
    refuse_unusable_labels(options.tolerances, dataset, outputs, samples, binary)
    dataset = batch_mixing.vetted(dataset, specs, probe, where, loaded)
    return dataset  # the session goes: kept through the compile, it would add the model's size


def refuse_missing(paths: Mapping[str, str | os.PathLike]) -> None:
    """Every file or folder named (the data, labels, recipe: what -> path) must exist: one
    read only at calibration would fail after the check's preparations and warnings."""
    for path in paths.values():
        if not Path(path).exists():
            raise DataError(f"{path}: no such file or folder")


def refuse_unrunnable_qdq(loaded: ir.Model, pass_list: Sequence[ir.passes.PassBase]) -> None:
    """Refuse, before any work, a pass that would write Q/DQ at an opset this onnxruntime has
    no kernel for (onnx's newest): its result would not load, found only by the check."""
    writers = [p for p in pass_list if getattr(p, "writes_qdq", False)]
    opset = onnx_opset(loaded)
    # Every onnxruntime this package allows (>= 1.20) runs Q/DQ up to opset 21: no probe.
    if writers and opset > 21 and not sessions.runs_qdq(opset, loaded.ir_version):
        raise ShrinkError(
            f"{writers[0].name}: this onnxruntime has no kernel for QuantizeLinear at opset "
            f"{opset}, the model's; convert the model to an older opset first "
            "(onnx.version_converter)"
        )


def unlist_weight_inputs(loaded: ir.Model) -> None:
    """Weights an old exporter also listed as graph inputs become plain constants, which the
    passes compress: left inputs, they were skipped (prune, lowrank, quant-dynamic...) or
    kept in float beside their int8 copies (quant: the file grew)."""
    version = loaded.ir_version
    count = graph_edit.unlist_weight_inputs(loaded)
    if count:
        why = (
            f"as IR {version} requires"
            if version < graph_edit.NO_DEFAULT_INPUTS_IR_VERSION
            else "as exporters with keep_initializers_as_inputs do"
        )
        logger.warning(
            "the model lists its %d initializer%s as graph inputs too (%s): the result keeps "
            "them as constants only, so the passes can compress them, and a caller can no "
            "longer feed them",
            count,
            "" if count == 1 else "s",
            why,
        )


def reference_session(reference: Path | bytes, provider: str):
    """The input in an onnxruntime session, opened before any work (with
    ``run_first_sample``): an input the check cannot load or run is bad input (exit 2,
    nothing written), not a result written and then found unchecked."""
    try:
        # prepack=False: onnxruntime need not copy the weights into its kernels for one run.
        return sessions.create_session(reference, provider=provider, prepack=False)
    except BadModelError as e:
        raise BadModelError(
            f"{e} (the check runs the input in onnxruntime: skip it with --no-check, or check "
            "on a provider that runs it with --ep)"
        ) from e


def run_first_sample(
    session, dataset: data_mod.Dataset, label: str, specs: Sequence[data_mod.InputSpec]
) -> tuple[dict[str, np.ndarray], data_mod.Dataset]:
    """The input's outputs on the check's first batch, and the dataset to check with; a
    failure is bad input (exit 2). Where the model fails on a first batch of several samples
    but runs its first sample alone, the outputs are that sample's and the dataset runs one
    sample at a time (the check's ``alone_after_failure``, said once, here). Where it is the
    other way round, and the data are feeds as given (a reader, test_data_set folders), the
    first axis is no batch axis (a model of [T] frames): each feed is one whole sample,
    never cut, as onnxruntime's quantizer feeds a reader's."""
    feed = dataset.first_feed()
    joined = dataset.samples_in(feed, specs)

    def run(feed: data_mod.Feed, what: str) -> dict[str, np.ndarray]:
        where = "a synthetic check sample" if dataset.synthetic else f"the first check {what}"
        fitted = sessions.fitted_feed(session, feed)
        failed = f"{label} failed on {where}"
        return sessions.run(session, fitted, failed=failed, hint=data_mod.unfit_hint(dataset))

    try:
        outputs = run(feed, "sample" if joined == 1 else f"batch of {joined}")
    except ShrinkError as e:
        if joined <= 1 or not sample_batches.joinable(specs):
            raise
        outputs = run(dataset.first_sample(specs), "sample")
        sample_batches.warn_alone("check", joined, e)
        return outputs, sample_batches.one_sample_a_run(dataset, specs)
    # Calibration cuts a feed along every dynamic first axis (inputs without one whole).
    if joined > 1 and dataset.samples is None and sample_batches.dynamic_inputs(specs):
        try:
            run(dataset.first_sample(specs), "sample")
        except ShrinkError as e:
            logger.warning(
                "%s: the model runs a whole feed but not its first row alone (%s): its first "
                "axis is no batch axis, so each feed is one sample",
                dataset.description,
                io.first_line(e.__cause__ or e)[:160],
            )
            return outputs, sample_batches.whole_feeds(dataset)
    return outputs, dataset


def refuse_unmeasurable_accuracy(tolerances: Tolerances, dataset: data_mod.Dataset) -> None:
    """Refuse, before any work, an accuracy tolerance the user gave (not a default, which
    judges accuracy where it can) on data without labels: every pass would be judged on an
    accuracy never measured (``--verify-each`` rolls each back) and the run fail at the end.

    Raises:
        DataError: naming the data and where labels go.
    """
    if not tolerances.accuracy_asked or dataset.has_labels:
        return
    if dataset.synthetic:
        what, fix = "synthetic inputs have none", "give labelled --data"
    elif dataset.samples is None:  # a reader, test_data_set_* folders: no place for labels
        what = f"{dataset.description} carries none"
        fix = "give array data with labels (.npz, a folder of .npy, a dict of arrays)"
    else:
        what = f"{dataset.description} has none"
        fix = "add a 'labels' array to it or give --labels FILE"
    raise DataError(f"--max-accuracy-drop needs labels, and {what}: {fix}, or drop the tolerance")


def refuse_unusable_labels(
    tolerances: Tolerances,
    dataset: data_mod.Dataset,
    outputs: Mapping[str, np.ndarray],
    samples: int,
    binary: Mapping[str, float] | None = None,
) -> None:
    """Under an accuracy tolerance the user gave, refuse before any work labels that cannot
    score accuracy (``labels.scored_classes``) or name a class the scored output has not: that
    output found in ``outputs`` (``binary``: the model's ``labels.binary_score_outputs``), the
    input's on the first batch of ``samples`` samples, as the check will find it (labels a
    source does not hold at hand are checked by the check, batch by batch; without such a
    tolerance the check leaves accuracy unmeasured)."""
    if dataset.labels is None or not tolerances.accuracy_asked:
        return
    target = labels.scored_output(outputs, samples, binary)
    if target is not None:  # else no accuracy: the check says why
        labels.scored_classes(dataset.labels, dataset.description, target)


def check_dump_dir(
    dump_dir: Path,
    pass_list: Sequence[ir.passes.PassBase],
    reads: Mapping[str, str | os.PathLike],
    output,
) -> None:
    """Refuse, before any work, a dump folder that is a file, or whose dumps would write over
    a file the run reads (``reads``: the input model and its weights, data, recipe) or the
    result."""
    if dump_dir.exists() and not dump_dir.is_dir():
        raise ShrinkError(f"{dump_dir}: the dump folder is a file; choose another --dump-dir")
    if output is not None:
        reads = {**reads, "the result": output}
    dumps = dump_files(dump_dir, pass_list)
    io.refuse_clashes({f"the dump folder's {path.name}": path for path in dumps}, reads)


def refuse_overwrite(
    source: Path, output: Path, external_data: bool | None, weights: Sequence[Path]
) -> None:
    """Refuse an output that would write over the input model or over a file its weights
    are in (``weights``): saving ``out.onnx`` with external data writes ``out.onnx.data``,
    which may be the very file an input saved as ``in.onnx`` + ``out.onnx.data`` reads its
    weights from."""
    if not source.exists():
        return
    if output.exists() and io.same_file(output, source):
        raise ShrinkError(f"{output}: refusing to overwrite the input model; choose another -o")
    data = io.external_data_path(output)
    # Only an existing file can be the input's; the input is read only then.
    if external_data is False or not data.exists():
        return
    if any(io.same_file(data, path) for path in weights):
        # Under auto the result's size is not known yet: it may stay embedded.
        limit = f"{io.EXTERNAL_DATA_THRESHOLD_BYTES / 1e9:g} GB"
        would = "would go" if external_data else f"could go (--external-data auto, past {limit})"
        raise ShrinkError(
            f"{output}: refusing to save it: its weights {would} to {data}, which holds the "
            "input model's weights; choose another -o"
            + ("" if external_data else ", or embed them with --external-data no")
        )
