"""A predicted model's bytes without serialising its predicted tensors: the serialised *skeleton*
(the model less those tensors' values: kilobytes) with each tensor's ``raw_data`` record spliced in.

Why: serialising a model copies every tensor's bytes into protobuf's output buffer, and setting
``raw_data`` copies them once more. For a CIFAR ResNet-50 (94 MB of parameters) that was 159 ms
of 411 ms file to file (issue 15). Here the predicted arrays, already in their stored layout and
dtype, go from numpy's memory to the file.

How (:mod:`ghn_onnx.onnx_io.wire`): adding a ``raw_data`` record (field 9) to an initializer
changes two lengths, the initializer's and the graph's, and nothing else. The record goes where
protobuf's serializer puts it, before the first field numbered above 9, so that the result is,
byte for byte, what ``SerializeToString`` gives for the filled model
(``tests/test_raw_writeback.py`` holds this on every fixture). It only ever walks a skeleton this
process serialised; on a :class:`WireError` the caller serialises instead.
"""

from __future__ import annotations

from typing import Mapping

from ghn_onnx.onnx_io.wire import (GRAPH, INITIALIZER, LEN, RAW_DATA, Record, WireError, encode_varint, read_varint,
                                   records)

__all__ = ["WireError", "encode_varint", "read_varint", "with_raw_data"]


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
