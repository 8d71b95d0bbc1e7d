"""Protobuf's wire format, as far as ONNX files need it: records and their byte bounds.

A record is a varint key ``field << 3 | wire type`` and a value; length-delimited values (wire
type 2) carry their length as a varint. A ModelProto's ``graph`` (field 7) is such a record, as
is each of the graph's ``initializer`` records (field 5), and each tensor's ``raw_data`` (field 9).
Two stages use the bounds: reading a model without copying its large tensors
(:mod:`ghn_onnx.onnx_io.deferred`) and writing predictions without serialising them
(:mod:`ghn_onnx.writeback.raw`).

Why hand-written: protobuf's Python API exposes no byte offsets (its decoder module is internal),
and no maintained library walks the wire format with offsets. The walker is small, reads only
varints and record bounds, and raises :class:`WireError` on anything else (a truncated record, a
varint over 10 bytes, a group); every step moves forward, so it ends on any input.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Protocol

import onnx

GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
RAW_DATA = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number
VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5  # wire types; 3 and 4 (groups) do not occur in ONNX
MAX_VARINT_BYTES = 10


class Bytes(Protocol):
    """What the walker reads: ``buf[i]`` is the byte at ``i`` (bytes, a memoryview, a file window)."""

    def __getitem__(self, i: int) -> int: ...


class WireError(ValueError):
    """Bytes that are not the protobuf records the walker expects."""


class Record(NamedTuple):
    """One record of a message: ``bytes[start:end]``; a length-delimited value is
    ``bytes[value_start:end]`` and its length varint ``bytes[key_end:value_start]``."""

    number: int
    wire_type: int
    start: int
    key_end: int
    value_start: int
    end: int


def read_varint(buf: "Bytes", pos: int, end: int) -> tuple[int, int]:
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


def records(buf: "Bytes", start: int, end: int) -> Iterator[Record]:
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
