"""Just enough of protobuf's wire format to walk a model without decoding its payloads.

A message is a sequence of fields: a varint tag (field number << 3 | wire type), then a varint
(type 0), 8 bytes (1), a varint length and that many bytes (2), or 4 bytes (5).
``replace_initializers`` rewrites a ModelProto's main-graph initializers and copies the rest.
"""

from __future__ import annotations

import dataclasses
import mmap
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

LENGTH_DELIMITED = 2

# ONNX's field numbers: ModelProto.graph, GraphProto.initializer, TensorProto.raw_data,
# TensorProto.external_data and TensorProto.data_location.
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_RAW_DATA = 9
TENSOR_EXTERNAL_DATA = 13
TENSOR_DATA_LOCATION = 14


class Buffer(Protocol):
    def __getitem__(self, index: int) -> int: ...


Piece = bytes | memoryview


class Malformed(ValueError):
    """The bytes are not a well-formed protobuf message (truncated, or not protobuf)."""


@dataclasses.dataclass(frozen=True)
class Field:
    number: int
    wire: int
    start: int  # the field's tag
    payload: int  # its payload (after the length prefix, for length-delimited fields)
    end: int


def fields(data: Buffer, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``data[start:end]``.

    Raises:
        Malformed: a field is cut off or of a wire type protobuf 3 does not write.
    """
    position = start
    while position < end:
        key, payload = varint(data, position, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise Malformed(f"field number 0 at byte {position}")
        if wire == 0:
            _, stop = varint(data, payload, end)
        elif wire == 1:
            stop = payload + 8
        elif wire == LENGTH_DELIMITED:
            length, payload = varint(data, payload, end)
            stop = payload + length
        elif wire == 5:
            stop = payload + 4
        else:
            raise Malformed(f"wire type {wire} at byte {position}")
        if stop > end:
            raise Malformed(f"a field at byte {position} runs past its message (truncated?)")
        yield Field(number, wire, position, payload, stop)
        position = stop


def varint(data: Buffer, position: int, end: int) -> tuple[int, int]:
    """The varint at ``position`` and the position after it."""
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


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited_header(number: int, length: int) -> bytes:
    """The tag and length prefix of a length-delimited field of ``length`` bytes."""
    return encode_varint(number << 3 | LENGTH_DELIMITED) + encode_varint(length)


def replace_initializers(
    data: bytes | mmap.mmap, replace: Callable[[Field], Sequence[Piece] | None]
) -> list[Piece]:
    """The ModelProto in ``data`` as pieces to be joined or written in order: each main-graph
    initializer field (``GraphProto.initializer``, tag and all) becomes the pieces ``replace``
    returns for it, or stays as it is where it returns None (the graph's length prefix is
    written anew). The rest of the message is copied as it is.

    Raises:
        Malformed: as ``fields``.
    """
    pieces: list[Piece] = []
    for field in fields(data, 0, len(data)):
        if field.number != MODEL_GRAPH or field.wire != LENGTH_DELIMITED:
            pieces.append(data[field.start : field.end])
            continue
        graph: list[Piece] = []
        for inner in fields(data, field.payload, field.end):
            replaced = None
            if inner.number == GRAPH_INITIALIZER and inner.wire == LENGTH_DELIMITED:
                replaced = replace(inner)
            graph += [data[inner.start : inner.end]] if replaced is None else replaced
        pieces += [delimited_header(MODEL_GRAPH, sum(map(len, graph))), *graph]
    return pieces
