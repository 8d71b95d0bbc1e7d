"""A predicted model's bytes without serialising its predicted tensors: the serialised *skeleton*
(the model less those tensors' values: kilobytes) with each tensor's ``raw_data`` record spliced in.

Why: serialising a model copies every tensor's bytes into protobuf's output buffer, and setting
``raw_data`` copies them once more. For a CIFAR ResNet-50 (94 MB of parameters) that was 159 ms
of 411 ms file to file (issue 15). Here the predicted arrays, already in their stored layout and
dtype, go from numpy's memory to the file.

How (protobuf's wire format): a record is a varint key ``field << 3 | wire type`` and a value;
length-delimited values (wire type 2) carry their length as a varint. A ModelProto's ``graph``
(field 7) is such a record, as is each of the graph's ``initializer`` records (field 5). Adding a
``raw_data`` record (field 9) to an initializer changes two lengths, the initializer's and the
graph's, and nothing else. The record goes where protobuf's serializer puts it, before the first
field numbered above 9, so that the result is, byte for byte, what ``SerializeToString`` gives
for the filled model (``tests/test_raw_writeback.py`` holds this on every fixture).

Why hand-written: protobuf's Python API exposes no byte offsets (its decoder module is internal),
and no maintained library walks the wire format with offsets. The walker is small, reads only
varints and record bounds, and raises :class:`WireError` on anything else (a truncated record, a
varint over 10 bytes, a group); every step moves forward, so it ends on any input. It only ever
walks a skeleton this process serialised; on a :class:`WireError` the caller serialises instead.
"""

from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple

import onnx

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) do not occur in ONNX
MAX_VARINT_BYTES = 10


class WireError(ValueError):
    """Bytes that are not the protobuf records the splicer expects."""


class Record(NamedTuple):
    """One record of a message: ``bytes[start:end]``; a length-delimited value is
    ``bytes[value_start:end]`` and its length varint ``bytes[key_end:value_start]``."""

    number: int
    wire_type: int
    start: int
    key_end: int
    value_start: int
    end: int


def read_varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[pos:]`` (not past ``end``) and the position after it."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= end:
            raise WireError(f"varint truncated at byte {pos + i}")
        byte = buf[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    raise WireError(f"varint at byte {pos} is longer than {MAX_VARINT_BYTES} bytes")


def encode_varint(value: int) -> bytes:
    """The shortest varint of ``value >= 0`` (the form protobuf writes)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def records(buf: bytes | memoryview, start: int, end: int) -> Iterator[Record]:
    """The records of the message ``buf[start:end]``, in order."""
    pos = start
    while pos < end:
        key, key_end = read_varint(buf, pos, end)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise WireError(f"field number 0 at byte {pos}")
        value_start = key_end
        if wire_type == VARINT:
            stop = read_varint(buf, key_end, end)[1]
        elif wire_type == FIXED64:
            stop = key_end + 8
        elif wire_type == FIXED32:
            stop = key_end + 4
        elif wire_type == LEN:
            length, value_start = read_varint(buf, key_end, end)
            stop = value_start + length
        else:
            raise WireError(f"wire type {wire_type} at byte {pos}")
        if stop > end:
            raise WireError(f"record at byte {pos} runs past its message (byte {end})")
        yield Record(number, wire_type, pos, key_end, value_start, stop)
        pos = stop


def _only(found: list[Record], what: str) -> Record:
    if len(found) != 1 or found[0].wire_type != LEN:
        raise WireError(f"expected one length-delimited {what} record (got {len(found)})")
    return found[0]


def with_raw_data(skeleton: bytes, data: Mapping[int, memoryview]) -> list[bytes | memoryview]:
    """Pieces whose concatenation is the ModelProto ``skeleton`` with ``data[i]`` as the
    ``raw_data`` of ``graph.initializer[i]``.

    Args:
        skeleton: a serialised ModelProto in which those initializers have no ``raw_data``.
        data: initializer index → its bytes (a flat byte memoryview; not copied).

    Raises:
        WireError: ``skeleton`` is not that (no single graph, fewer initializers, an initializer
            that already has ``raw_data``, malformed records).
    """
    view = memoryview(skeleton)
    graph = _only([r for r in records(view, 0, len(view)) if r.number == GRAPH], "graph")
    inits = [r for r in records(view, graph.value_start, graph.end) if r.number == INITIALIZER]
    if data and (min(data) < 0 or max(data) >= len(inits)):
        raise WireError(f"initializer index out of range (the graph has {len(inits)})")
    body: list[bytes | memoryview] = []
    cursor = graph.value_start
    for i in sorted(data):
        tensor = _only([inits[i]], f"initializer {i}")
        fields = list(records(view, tensor.value_start, tensor.end))
        if any(r.number == RAW_DATA for r in fields):
            raise WireError(f"initializer {i} already has raw_data")
        at = next((r.start for r in fields if r.number > RAW_DATA), tensor.end)
        values = data[i]
        head = encode_varint(RAW_DATA << 3 | LEN) + encode_varint(values.nbytes)
        length = tensor.end - tensor.value_start + len(head) + values.nbytes
        body += [view[cursor:tensor.key_end], encode_varint(length), view[tensor.value_start:at], head, values]
        cursor = at
    body.append(view[cursor:graph.end])
    graph_length = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in body)
    return [view[:graph.key_end], encode_varint(graph_length), *body, view[graph.end:]]
