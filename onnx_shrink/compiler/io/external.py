"""External data as the loader takes it: every file a model names for its weights present,
readable, long enough and inside the model's folder (as onnxruntime requires), and links
into other folders (Hugging Face's cache) followed."""

from __future__ import annotations

import math
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_shrink.compiler import walk
from onnx_shrink.compiler.io import embedded_weights
from onnx_shrink.errors import BadModelError


def external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in onnx.external_data_helper._get_all_tensors(proto)
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]


def check_external_data(proto: onnx.ModelProto, base_dir: Path, where: str) -> None:
    for tensor in external_tensors(proto):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        data_path = base_dir / location
        if location and not _names_a_file_inside(base_dir, location):
            raise BadModelError(
                f"{where}: tensor '{tensor.name}' keeps its weights at '{location}', outside "
                "the model's folder, where onnxruntime refuses to read; move the file beside "
                "the model and name it by its file name"
            )
        if not location or not data_path.is_file():
            raise BadModelError(
                f"{where}: external data file '{location}' of tensor '{tensor.name}' is missing"
            )
        if not os.access(data_path, os.R_OK):
            raise BadModelError(
                f"{where}: external data file '{location}' of tensor '{tensor.name}' cannot be "
                "read (permission denied)"
            )
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        size = data_path.stat().st_size
        if end > size:
            raise BadModelError(
                f"{where}: external data file '{location}' is shorter than tensor "
                f"'{tensor.name}' needs ({size} < {end} bytes)"
            )
        needed = _fixed_size_bytes(tensor)
        if "length" in info and needed is not None and int(info["length"]) != needed:
            raise BadModelError(
                f"{where}: tensor '{tensor.name}' holds {info['length']} bytes of data; its "
                f"shape and type need {needed}"
            )


def _names_a_file_inside(base_dir: Path, location: str) -> bool:
    """Whether ``location`` names a path inside ``base_dir`` by its words (neither absolute
    nor climbing out with ``..``), as onnxruntime requires; a symbolic link inside may point
    anywhere (``follow_linked_data``)."""
    if os.path.isabs(location):
        return False
    base = os.path.normpath(os.path.abspath(base_dir))
    path = os.path.normpath(os.path.join(base, location))
    return path.startswith(base + os.sep)


def follow_linked_data(model: ir.Model) -> None:
    """Point every external tensor read through a symbolic link at the file the link names.

    Hugging Face's cache keeps ``model.onnx.data`` as a link into a ``blobs`` folder beside
    the snapshot's: onnxruntime reads it, but onnx_ir refuses a link that leaves the model's
    folder. The link itself is inside the folder (``_names_a_file_inside``), which is what
    onnxruntime checks too."""
    tensors = [*walk.initializer_tensors(model), *walk.constant_node_tensors(model)]
    for owner, tensor in tensors:
        if not isinstance(tensor, ir.ExternalTensor) or not tensor.base_dir:
            continue
        linked = Path(tensor.base_dir) / tensor.location
        real = linked.resolve()
        if real == linked.absolute() or not real.is_file():
            continue
        followed = embedded_weights.external_tensor(
            tensor, tensor.name, real.name, tensor.offset, tensor.length, base_dir=real.parent
        )
        if isinstance(owner, ir.Value):
            owner.const_value = followed
        else:
            owner.attributes["value"] = ir.AttrTensor("value", followed)


def _fixed_size_bytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of a tensor of a whole-byte type (None for strings, packed and unknown types)."""
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError):  # not a type onnx_ir knows, or STRING (no bit width)
        return None
    return math.prod(tensor.dims) * bits // 8 if bits % 8 == 0 else None
