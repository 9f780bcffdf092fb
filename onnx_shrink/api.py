"""``shrink()``: load, run a pass pipeline, save, and verify against the original.

The same function serves the command line and export pipelines. The caller's model (a path,
an ``onnx.ModelProto`` or an ``onnx_ir.Model``) is never modified.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import onnx_ir as ir

from onnx_shrink.compiler import io, pipeline
from onnx_shrink.errors import ShrinkError
from onnx_shrink.runtime_check import data as data_mod
from onnx_shrink.runtime_check import verify as verify_mod

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShrinkResult:
    """What a run produced and what it measured."""

    model: ir.Model
    steps: tuple[pipeline.StepRecord, ...]
    input_bytes: int
    output_bytes: int
    output_path: Path | None
    seconds: float
    verification: verify_mod.VerificationReport | None

    def to_dict(self) -> dict[str, object]:
        """Everything except the model, as JSON-ready data (the ``--report`` file)."""
        first, last = self.steps[0], self.steps[-1]
        return {
            "output_path": str(self.output_path) if self.output_path else None,
            "seconds": self.seconds,
            "passes": [step.to_dict() for step in self.steps],
            "total": {
                "nodes": [first.before.nodes, last.after.nodes],
                "params": [first.before.params, last.after.params],
                "tensor_bytes": [first.before.tensor_bytes, last.after.tensor_bytes],
                "macs": [first.before.macs, last.after.macs],
                "bytes_on_disk": [self.input_bytes, self.output_bytes],
            },
            "verification": self.verification.to_dict() if self.verification else None,
        }


def shrink(
    model: io.ModelSource,
    passes: str | Sequence[pipeline.PassLike] | None = "fold",
    *,
    output: str | os.PathLike | None = None,
    sets: Sequence[str] = (),
    recipe: str | os.PathLike | None = None,
    dump_dir: str | os.PathLike | None = None,
    external_data: bool | None = None,
    check: bool = True,
    data: str | os.PathLike | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    provider: str = "cpu",
    on_pass_start: pipeline.StepCallback | None = None,
) -> ShrinkResult:
    """Compress ``model`` with ``passes`` and, unless ``check=False``, verify the result.

    Args:
        model: a path to an .onnx file, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.
        passes: ``"fold,quant"``, or a list of pass names and pass instances; None takes the
            list from ``recipe``.
        output: where to save the result; None keeps it in memory only.
        sets: ``"pass.option=value"`` overrides, as on the command line.
        check: run original and result on onnxruntime and report their differences.
        data: ``.npz`` of inputs (and optional ``labels``) for the check; else synthetic.

    Raises:
        PipelineSpecError: the pass spec is wrong (raised before the model is loaded).
        BadModelError: the model cannot be read or is invalid.
        PassFailedError: a pass failed.
    """
    started = time.perf_counter()
    pass_list = pipeline.parse_spec(passes, sets, recipe)
    if output is not None and isinstance(model, (str, os.PathLike)):
        _refuse_overwrite(Path(model), Path(output))
    loaded = io.load(model)
    from_file = isinstance(model, (str, os.PathLike))
    reference = Path(model) if from_file else io.to_bytes(loaded)
    input_bytes = io.file_bytes(model) if from_file else len(reference)
    dataset = None
    if check:  # bad data is bad input: reject it before any work is done or file written
        specs = data_mod.specs_from_model(loaded)
        dataset = data_mod.prepare(specs, data, input_shapes)
    result = pipeline.run(loaded, pass_list, dump_dir=dump_dir, on_start=on_pass_start)
    if output is not None:
        saved = io.save(result.model, output, external_data=external_data)
        candidate: bytes | Path = saved.path
        output_bytes, output_path = saved.bytes_on_disk, saved.path
    else:
        candidate = io.to_bytes(result.model)
        output_bytes, output_path = len(candidate), None
    verification = None
    if dataset is not None:
        verification = verify_mod.verify(reference, candidate, dataset, provider=provider)
    return ShrinkResult(
        model=result.model,
        steps=result.steps,
        input_bytes=input_bytes,
        output_bytes=output_bytes,
        output_path=output_path,
        seconds=time.perf_counter() - started,
        verification=verification,
    )


def _refuse_overwrite(source: Path, output: Path) -> None:
    if output.exists() and source.exists() and output.resolve() == source.resolve():
        raise ShrinkError(f"{output}: refusing to overwrite the input model; choose another -o")


def default_output_path(model_path: str | os.PathLike) -> Path:
    """``model.onnx`` -> ``model.shrunk.onnx`` beside it."""
    path = Path(model_path)
    return path.with_name(f"{path.stem}.shrunk.onnx")
