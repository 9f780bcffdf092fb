"""Large weights embedded in a model file, read in place instead of parsed into memory.

Parsing a 0.6 GB model copies every weight at least twice (the file's bytes, then the
protobuf's), and onnx's checker given the path parses it once more. Instead, the file's
protobuf wire format is walked without decoding payloads: every main-graph initializer whose
``raw_data`` holds at least ``min_bytes`` becomes an external-data reference to *the model
file itself* (location, offset, length), and only the rest is parsed. onnx_ir then maps those
bytes from the file on first use (``ExternalTensor``), onnxruntime can read them from the same
file, and nothing is copied until a pass needs a weight's values.

The walk (``wire``) needs only the field numbers of ``ModelProto.graph``,
``GraphProto.initializer`` and ``TensorProto``'s ``raw_data``, ``external_data`` and
``data_location``. ``checker_view`` shows such a model to onnx.checker, and
``map_from_file`` points the loaded tensors at the file's real path (``external_tensor``
makes such a reference, and ``large_tensors`` its in-memory stand-ins).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
import onnx_ir as ir

from onnx_shrink.compiler.io import wire
from onnx_shrink.compiler.io.wire import Malformed

MIN_BYTES = 1 << 20

__all__ = [
    "MIN_BYTES",
    "Malformed",
    "checker_view",
    "external_tensor",
    "map_from_file",
    "read_model",
]


def read_model(path: Path, min_bytes: int | None = None) -> tuple[onnx.ModelProto, set[str]]:
    """The ModelProto at ``path``, each embedded main-graph initializer of ``min_bytes``
    (default ``MIN_BYTES``) or more turned into an external-data reference to the file itself
    (``location`` is the file's name), and the names of those initializers.

    Raises:
        Malformed: the file is not a well-formed protobuf message.
        OSError: the file cannot be read.
    """
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise Malformed("the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            limit = MIN_BYTES if min_bytes is None else min_bytes
            pieces, mapped = _model_without_weights(data, path.name, limit)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(b"".join(pieces))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError, or a ValueError
        raise Malformed(str(e)) from e
    return proto, mapped


def _model_without_weights(
    data: mmap.mmap, location: str, min_bytes: int
) -> tuple[list[wire.Piece], set[str]]:
    mapped: set[str] = set()

    def as_reference(field: wire.Field) -> list[wire.Piece] | None:
        tensor = _as_reference(data, field, location, min_bytes)
        if tensor is None:
            return None
        name, message = tensor
        mapped.add(name)
        return [wire.delimited_header(wire.GRAPH_INITIALIZER, len(message)), message]

    return wire.replace_initializers(data, as_reference), mapped


def _as_reference(
    data: mmap.mmap, tensor: wire.Field, location: str, min_bytes: int
) -> tuple[str, bytes] | None:
    """The TensorProto at ``tensor`` with its raw data replaced by a reference to the file,
    and its name; None when it holds no raw data of ``min_bytes`` or more."""
    raw = None
    for field in wire.fields(data, tensor.payload, tensor.end):
        if field.number == wire.TENSOR_RAW_DATA and field.wire == wire.LENGTH_DELIMITED:
            raw = field
        elif field.number in (wire.TENSOR_EXTERNAL_DATA, wire.TENSOR_DATA_LOCATION):
            return None  # already external (or ambiguous): parsed as it is
    if raw is None or raw.end - raw.payload < min_bytes:
        return None
    head = data[tensor.payload : raw.start]
    tail = data[raw.end : tensor.end]
    parsed = onnx.TensorProto()
    parsed.ParseFromString(head + tail)  # small: everything but the raw data
    parsed.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (
        ("location", location),
        ("offset", str(raw.payload)),
        ("length", str(raw.end - raw.payload)),
    ):
        entry = parsed.external_data.add()
        entry.key, entry.value = key, value
    return parsed.name, parsed.SerializeToString()


def checker_view(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for onnx.checker with external main-graph initializers as graph inputs.

    Given a ModelProto, the checker looks for external data in the working folder; the files
    and lengths are checked by ``_check_external_data`` instead, and the graph checks are the
    same for an input of the tensor's type and shape.
    """
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if not external:
        return proto
    view = onnx.ModelProto()
    view.CopyFrom(proto)
    names = {t.name for t in external}
    inputs = {i.name for i in view.graph.input}
    kept = [t for t in view.graph.initializer if t.name not in names]
    del view.graph.initializer[:]
    view.graph.initializer.extend(kept)
    for tensor in external:
        if tensor.name not in inputs:
            view.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return view


def map_from_file(model: ir.Model, names: set[str], path: Path) -> None:
    """Point the initializers ``embedded_weights`` left in the file at the file's real path
    (a symlinked model's data lies beside its target, not beside the link)."""
    for name in names:
        value = model.graph.initializers[name]
        tensor = value.const_value
        assert isinstance(tensor, ir.ExternalTensor)
        value.const_value = external_tensor(
            tensor, name, path.name, tensor.offset, tensor.length, base_dir=path.parent
        )


def external_tensor(
    tensor: ir.TensorProtocol,
    name: str,
    location: str,
    offset: int,
    length: int,
    base_dir: str | os.PathLike = "",
) -> ir.ExternalTensor:
    """An external-data tensor named ``name`` at ``location`` (in ``base_dir``) that stands
    for ``tensor``: its type, shape, doc string and metadata, its bytes at ``offset``."""
    return ir.ExternalTensor(
        location,
        offset,
        length,
        tensor.dtype,
        shape=tensor.shape,
        name=name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props),
        base_dir=base_dir,
    )
