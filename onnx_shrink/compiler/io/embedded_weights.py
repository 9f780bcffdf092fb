"""Large weights embedded in a model file, read in place instead of parsed into memory.

Parsing a 0.6 GB model copies every weight at least twice (the file's bytes, then the
protobuf's), and onnx's checker given the path parses it once more. Instead, the file's
protobuf wire format is walked without decoding payloads: every main-graph initializer whose
``raw_data`` holds at least ``min_bytes`` becomes an external-data reference to *the model
file itself* (location, offset, length), and only the rest is parsed. onnx_ir then maps those
bytes from the file on first use (``ExternalTensor``), onnxruntime can read them from the same
file, and nothing is copied until a pass needs a weight's values.

The walk understands just enough of protobuf: tags and varints, and the field numbers of
``ModelProto.graph`` (7), ``GraphProto.initializer`` (5), ``TensorProto.raw_data`` (9),
``external_data`` (13) and ``data_location`` (14).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

MIN_BYTES = 1 << 20

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_TENSOR_EXTERNAL_DATA = 13
_TENSOR_DATA_LOCATION = 14
_LENGTH_DELIMITED = 2


class Malformed(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or not protobuf)."""


@dataclasses.dataclass(frozen=True)
class _Field:
    number: int
    wire: int
    start: int  # the field's tag
    payload: int  # its payload (after the length prefix, for length-delimited fields)
    end: int


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
) -> tuple[list[bytes], set[str]]:
    pieces: list[bytes] = []
    mapped: set[str] = set()
    for field in _fields(data, 0, len(data)):
        if field.number != _MODEL_GRAPH or field.wire != _LENGTH_DELIMITED:
            pieces.append(data[field.start : field.end])
            continue
        graph: list[bytes] = []
        for inner in _fields(data, field.payload, field.end):
            tensor = None
            if inner.number == _GRAPH_INITIALIZER and inner.wire == _LENGTH_DELIMITED:
                tensor = _as_reference(data, inner, location, min_bytes)
            if tensor is None:
                graph.append(data[inner.start : inner.end])
            else:
                name, message = tensor
                mapped.add(name)
                graph.append(_delimited_field(_GRAPH_INITIALIZER, message))
        pieces.append(_delimited_field(_MODEL_GRAPH, b"".join(graph)))
    return pieces, mapped


def _as_reference(
    data: mmap.mmap, tensor: _Field, location: str, min_bytes: int
) -> tuple[str, bytes] | None:
    """The TensorProto at ``tensor`` with its raw data replaced by a reference to the file,
    and its name; None when it holds no raw data of ``min_bytes`` or more."""
    raw = None
    for field in _fields(data, tensor.payload, tensor.end):
        if field.number == _TENSOR_RAW_DATA and field.wire == _LENGTH_DELIMITED:
            raw = field
        elif field.number in (_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION):
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


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[_Field]:
    position = start
    while position < end:
        key, payload = _varint(data, position, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Malformed(f"field number 0 at byte {position}")
        if wire == 0:
            _, stop = _varint(data, payload, end)
        elif wire == 1:
            stop = payload + 8
        elif wire == _LENGTH_DELIMITED:
            length, payload = _varint(data, payload, end)
            stop = payload + length
        elif wire == 5:
            stop = payload + 4
        else:
            raise Malformed(f"wire type {wire} at byte {position}")
        if stop > end:
            raise Malformed(f"a field at byte {position} runs past its message (truncated?)")
        yield _Field(number, wire, position, payload, stop)
        position = stop


def _varint(data: mmap.mmap, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise Malformed(f"a varint at byte {position} is cut off")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _delimited_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
