"""Large initializers kept out of protobuf serialization.

Serializing a model copies every weight into the protobuf, and protobuf's size computation
serializes it once more: on a 0.6 GB model each costs seconds and a full copy of the weights.
These need neither:

* ``saved_bytes(model)``: the exact size ``io.save`` would write, computed from a
  protobuf whose large initializers are stand-ins (the size of a raw-data field is known
  arithmetic: tag, varint length, bytes).
* ``weightless_proto(model)``: the graph with stand-ins for its weights, for what needs every
  tensor's type and shape but no large tensor's values: onnx's shape inference and checker,
  as onnxruntime runs them on loading, in ``load_error(model)``.
* ``session_source(model)``: what onnxruntime needs to open the model in memory: the protobuf
  without its large initializers, plus those as arrays that onnxruntime uses in place
  (``SessionOptions.add_external_initializers``): memory-mapped weights stay mapped, in-memory
  weights are not copied, and no temporary file is written whatever the model's size.

Large means at least ``LARGE_TENSOR_BYTES`` in the main graph; smaller tensors and those in
subgraphs or Constant nodes are serialized as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnx_shrink.compiler import graph_edit, io, walk
from onnx_shrink.compiler.io import embedded_weights, wire

LARGE_TENSOR_BYTES = 1 << 20

# Element types numpy holds natively, so onnxruntime can take their arrays as they are.
_NATIVE_DTYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.INT16,
        ir.DataType.INT32,
        ir.DataType.INT64,
        ir.DataType.UINT8,
        ir.DataType.UINT16,
        ir.DataType.UINT32,
        ir.DataType.UINT64,
        ir.DataType.BOOL,
    }
)


SIZED_TENSOR_BYTES = 4096
"""``saved_bytes`` counts tensors of this size or more by arithmetic instead of serializing
them: a CNN's many sub-megabyte weights cost more to copy into the protobuf than the
arithmetic (YOLOv8n: 54 -> 27 ms a call), while each tensor counted costs a little Python
(1 KiB made PP-OCRv4 rec and the digits CNN slower)."""


def saved_bytes(
    model: ir.Model,
    min_bytes: int = SIZED_TENSOR_BYTES,
    naming: graph_edit.Naming | None = None,
) -> int:
    """Bytes the model takes when ``io.save`` writes it (deciding on external data by size).

    Exact when the model is saved as one file (``len(io.to_bytes(model))``), memory-mapped
    weights included: they are counted by size instead of being read. A model saved with
    external data counts the protobuf plus its memory-mapped tensors' bytes. With
    ``naming``, the size once ``graph_edit.restore_names`` has taken the names it gave back.
    """
    if io.tensor_bytes(model) > io.EXTERNAL_DATA_THRESHOLD_BYTES:
        external = sum(
            t.nbytes for t in walk.all_tensors(model) if isinstance(t, ir.ExternalTensor)
        )
        with _stand_ins(model, min_bytes, _serializes_as_raw_bytes) as swapped:
            proto = io.serialize_proto(model, keep_in_file=True)
    else:
        external = 0
        with _stand_ins(model, min_bytes, _embeds_as_raw_bytes) as swapped:
            proto = io.serialize_proto(model)  # what is not a stand-in is small: as saved
    if naming is not None:
        graph_edit.restore_proto_names(proto, naming)
    return _size_with_raw_data(proto, {n: t.nbytes for n, t in swapped.items()}) + external


SHAPES_ONLY_BYTES = 1024
"""Where only types and shapes are read (shape inference), tensors of this size or more are
stand-ins: shape inference reads the values of small ones only (a Reshape's target shape)."""


def weightless_proto(model: ir.Model, min_bytes: int = SHAPES_ONLY_BYTES) -> onnx.ModelProto:
    """The model as a ModelProto whose main-graph initializers of ``min_bytes`` or more are
    external-data stand-ins (name, type and shape, no data), and smaller memory-mapped ones
    stay references to their file: for what reads only the graph and the tensors' shapes
    (shape inference), at the cost of serializing the graph alone. Other small tensors (shape
    constants) keep their data."""
    with _stand_ins(model, min_bytes, lambda tensor: True):
        return io.serialize_proto(model, keep_in_file=True)


def write_embedded(model: ir.Model, path: Path, min_bytes: int = LARGE_TENSOR_BYTES) -> None:
    """Write ``model`` to ``path`` as one protobuf file, byte for byte what serializing it
    whole writes, but each large initializer's bytes go to the file straight from its array
    (a memory-mapped weight from its mapping): the weights are never held twice."""
    with _stand_ins(model, min_bytes, _embeds_as_raw_bytes) as swapped:
        serialized = io.serialize_proto(model).SerializeToString()
    with open(path, "wb") as handle:
        for piece in _with_raw_data(serialized, swapped):
            handle.write(piece)


def _with_raw_data(serialized: bytes, tensors: dict[str, ir.TensorProtocol]) -> list[wire.Piece]:
    """``serialized`` (a ModelProto with stand-ins) as pieces, each stand-in initializer
    rewritten as the TensorProto protobuf would write with the tensor's raw data."""

    def with_raw_data(field: wire.Field) -> list[wire.Piece] | None:
        proto = onnx.TensorProto.FromString(serialized[field.payload : field.end])
        tensor = tensors.get(proto.name) if proto.external_data else None
        return None if tensor is None else _tensor_field(proto, tensor)

    return wire.replace_initializers(serialized, with_raw_data)


def _tensor_field(proto: onnx.TensorProto, tensor: ir.TensorProtocol) -> list[wire.Piece]:
    """GraphProto.initializer field of ``proto`` (a stand-in) holding ``tensor``'s raw data,
    its fields in protobuf's order (by number: raw_data, 9, after name, 8)."""
    del proto.external_data[:]
    proto.ClearField("data_location")
    head_and_tail = proto.SerializeToString()
    after_raw_data = (
        f.start
        for f in wire.fields(head_and_tail, 0, len(head_and_tail))
        if f.number > wire.TENSOR_RAW_DATA
    )
    split = next(after_raw_data, len(head_and_tail))
    data = _raw_bytes(tensor)
    raw_header = wire.delimited_header(wire.TENSOR_RAW_DATA, len(data))
    length = len(head_and_tail) + len(raw_header) + len(data)
    return [
        wire.delimited_header(wire.GRAPH_INITIALIZER, length),
        head_and_tail[:split],
        raw_header,
        data,
        head_and_tail[split:],
    ]


def _raw_bytes(tensor: ir.TensorProtocol) -> wire.Piece:
    """The tensor's raw data without a copy where numpy holds it as stored (little-endian,
    whole bytes); else ``tobytes()`` (packed 4-bit types)."""
    if tensor.dtype.bitwidth >= 8 and tensor.dtype in _NATIVE_DTYPES:
        array = np.ascontiguousarray(tensor.numpy())
        if array.dtype.byteorder != ">":
            return memoryview(array).cast("B")
    return tensor.tobytes()


def load_error(model: ir.Model, min_bytes: int = SHAPES_ONLY_BYTES) -> str | None:
    """What onnxruntime would refuse on loading ``model``, as onnx finds it: the first error
    of its strict shape inference, or of its checker on the nodes (an attribute the op does
    not have at the model's opset); None if both pass.

    onnxruntime runs the same inference and checks when it loads a model. Tensors of
    ``min_bytes`` or more are stand-ins: copying a CNN's many sub-megabyte weights into the
    protobuf cost more than the inference (YOLOv8n: 48 -> 13 ms).
    """
    proto = weightless_proto(model, min_bytes)
    if proto.ByteSize() > io.EXTERNAL_DATA_THRESHOLD_BYTES:
        return None  # past protobuf's limit even without large tensors; onnxruntime checks it
    try:
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        # The stand-ins as typed inputs: the checker judges the nodes without their data.
        onnx.checker.check_model(embedded_weights.checker_view(proto))
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        return io.first_line(e)
    return None


@dataclasses.dataclass(frozen=True)
class SessionSource:
    """A model as onnxruntime opens it in memory (``runtime_check.sessions``)."""

    proto: bytes
    """the serialized model; each name in ``initializers`` is a stand-in for external data"""
    initializers: dict[str, np.ndarray]
    """the large initializers, C-contiguous, shared with the model (never copies)"""
    data_folder: str | None = None
    """the folder of the files that hold the proto's other external data (relative locations);
    onnxruntime maps those itself"""


def session_source(model: ir.Model, min_bytes: int = LARGE_TENSOR_BYTES) -> SessionSource:
    """The model without its large main-graph initializers, and those as arrays.

    Memory-mapped main-graph initializers of one folder (a weight still in the input file,
    see ``io.embedded_weights``) stay references that onnxruntime reads from the file: no
    page of them is touched here. The arrays share memory with ``model``: keep it unchanged
    while a session uses them.
    """
    folder, in_file = _readable_from_files(model)

    def kept(tensor: ir.TensorProtocol) -> bool:
        return id(tensor) in in_file

    with _stand_ins(model, min_bytes, lambda t: _numpy_native(t) and not kept(t)) as swapped:
        proto = io.serialize_proto(model, keep_in_file=kept).SerializeToString()
    arrays = {name: np.ascontiguousarray(tensor.numpy()) for name, tensor in swapped.items()}
    return SessionSource(proto, arrays, folder)


def _readable_from_files(model: ir.Model) -> tuple[str | None, set[int]]:
    """The data folder onnxruntime is given (that of the first memory-mapped main-graph
    initializer) and the ids of the main-graph initializers it can read from their file
    there: relative locations inside that folder only, since onnxruntime refuses others."""
    folder: Path | None = None
    readable: set[int] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor) or tensor.location == io.IN_MEMORY_LOCATION:
            continue
        base = Path(tensor.base_dir).resolve()
        folder = folder or base
        location = Path(tensor.location)
        if base == folder and not location.is_absolute() and ".." not in location.parts:
            readable.add(id(tensor))
    return (str(folder) if folder is not None else None), readable


@contextlib.contextmanager
def _stand_ins(
    model: ir.Model, min_bytes: int, eligible: Callable[[ir.TensorProtocol], bool]
) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Swap each eligible main-graph initializer of ``min_bytes`` or more for an external-data
    stand-in of the same name, type and shape; yield the originals by name; swap them back."""
    swapped: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= min_bytes and eligible(tensor):
            swapped[name] = (value, tensor)
            value.const_value = embedded_weights.external_tensor(
                tensor, name, io.IN_MEMORY_LOCATION, 0, tensor.nbytes
            )
    try:
        yield {name: tensor for name, (_, tensor) in swapped.items()}
    finally:
        for value, tensor in swapped.values():
            value.const_value = tensor


def _serializes_as_raw_bytes(tensor: ir.TensorProtocol) -> bool:
    """Will ``io.serialize_proto`` write this tensor as ``nbytes`` of raw data?"""
    if isinstance(tensor, ir.ExternalTensor):
        return False  # written as a reference, counted apart
    if isinstance(tensor, ir.serde.TensorProtoTensor):
        raw = tensor.raw
        return raw.HasField("raw_data") and len(raw.raw_data) == tensor.nbytes
    return isinstance(tensor, ir.Tensor) and tensor.dtype != ir.DataType.STRING


def _embeds_as_raw_bytes(tensor: ir.TensorProtocol) -> bool:
    """Will ``io.save`` write this tensor, once embedded, as ``nbytes`` of raw data?"""
    if isinstance(tensor, ir.ExternalTensor):
        # io.serialize_proto embeds it from its numpy view.
        return tensor.location != io.IN_MEMORY_LOCATION and tensor.dtype != ir.DataType.STRING
    return _serializes_as_raw_bytes(tensor)


def _numpy_native(tensor: ir.TensorProtocol) -> bool:
    return tensor.dtype in _NATIVE_DTYPES


def _size_with_raw_data(proto: onnx.ModelProto, raw_sizes: dict[str, int]) -> int:
    """Size of ``proto`` once each named main-graph initializer holds its bytes as raw data.

    Only lengths change: the tensor's (raw-data field in, external-data fields out), then the
    graph's and the model's length prefixes, whose varints may grow.
    """
    model_size = proto.ByteSize()
    if not raw_sizes:
        return model_size
    graph_size = proto.graph.ByteSize()
    growth = 0
    for tensor in proto.graph.initializer:
        n = raw_sizes.get(tensor.name)
        if n is None:
            continue
        stand_in = tensor.ByteSize()
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        # raw_data is field 9, length-delimited: a one-byte tag, a varint length, the bytes.
        embedded = tensor.ByteSize() + 1 + _varint_bytes(n) + n
        growth += _field_bytes(embedded) - _field_bytes(stand_in)
    return model_size - _field_bytes(graph_size) + _field_bytes(graph_size + growth)


def _field_bytes(size: int) -> int:
    """A nested message's bytes after its one-byte tag: varint length plus the message."""
    return _varint_bytes(size) + size


def _varint_bytes(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)
