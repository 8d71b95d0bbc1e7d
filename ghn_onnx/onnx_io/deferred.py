"""Reading an ONNX file without reading its large tensors: they are *deferred*, left in the file.

Why: a file to file prediction overwrites nearly every large tensor, so their old values are
never needed. Parsing a CIFAR ResNet-50 (94 MB) reads every byte and copies each tensor into
protobuf (82 ms of a 286 ms file to file, issue 15). Here the file is walked record by record
(:mod:`ghn_onnx.onnx_io.wire`), reading only record headers and the small records; each large
``raw_data`` is skipped, and protobuf parses the kilobytes that remain.

A deferred tensor is an initializer of the main graph whose values are one ``raw_data`` record of
at least :data:`DEFER_MIN_BYTES`, of a float type, holding exactly the bytes its dims say. It is
kept in the model as what it is: external data stored in the model's own file
(``data_location = EXTERNAL``, ``location`` the file's name, ``offset`` and ``length`` of the
bytes), so copies of it (``untie_aliases``) carry the reference, validation checks its declared
size, and a writer refuses to write it unfilled (an output must never point into its input).
:meth:`DeferredFile.fill` reads the values of those still deferred before a model is written or
handed out, from the same file, refusing it if it changed in between.

No rule reads a deferred tensor's values: the converter reads only shape-sized integer constants
(``tests/test_deferred_read.py`` holds the graphs and outputs equal to a full read's on every
fixture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from ghn_onnx.errors import ModelLoadError
from ghn_onnx.onnx_io.files import open_regular_file
from ghn_onnx.onnx_io.storage import FLOAT_TYPES, tensor_nbytes
from ghn_onnx.onnx_io.wire import GRAPH, INITIALIZER, LEN, RAW_DATA, WireError, encode_varint, records

# Smaller tensors are parsed with the rest: their copies cost less than their records' walk.
DEFER_MIN_BYTES = 1 << 14
# Bytes read at a time around a record header (the walker's look-ahead).
WINDOW_BYTES = 1 << 13
# Records the walker visits at most (~5 us each in Python, so about a second) before it leaves the
# file to protobuf's parser: a file of millions of tiny records is parsed faster in C, and the
# walk pays off for few records holding many bytes (a ResNet-50: ~2,000 records).
MAX_RECORDS = 200_000
# TensorProto fields that hold values or say where they are: a tensor with any of them beside
# its one raw_data record is parsed as it is, for validation to judge.
_VALUE_FIELDS = frozenset(onnx.TensorProto.DESCRIPTOR.fields_by_name[f].number for f in (
    "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data",
    "external_data", "data_location"))
EXTERNAL = onnx.TensorProto.EXTERNAL


class _Window:
    """Random access to a file through ``pread``, one small window at a time: the walker reads
    headers and small records only, and jumps over the values it defers."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self.start, self.buf = 0, b""

    def __getitem__(self, i: int) -> int:
        if not self.start <= i < self.start + len(self.buf):
            self.start, self.buf = i, os.pread(self.fd, WINDOW_BYTES, i)
            if not self.buf:
                raise WireError(f"file ends at byte {i}")
        return self.buf[i - self.start]

    def read(self, start: int, end: int) -> bytes:
        if self.start <= start and end <= self.start + len(self.buf):
            return self.buf[start - self.start:end - self.start]
        return pread_exactly(self.fd, start, end - start)


def pread_exactly(fd: int, offset: int, n: int) -> bytes:
    """``n`` bytes at ``offset``; :class:`WireError` if the file ends first."""
    chunks, got = [], 0
    while got < n:
        chunk = os.pread(fd, n - got, offset + got)
        if not chunk:
            raise WireError(f"file ends at byte {offset + got}, {n - got:,} bytes short")
        chunks.append(chunk)
        got += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def skeleton(fd: int, size: int, min_bytes: int = DEFER_MIN_BYTES) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The ModelProto in ``fd`` (``size`` bytes) without its large initializers' ``raw_data``
    records, and where each left-out value is: initializer index → ``(offset, length)``.

    Raises:
        WireError: not a ModelProto with one graph record, or records that run past the file.
    """
    win = _Window(fd, size)
    visited = 0

    def walk(start: int, end: int):
        nonlocal visited
        for rec in records(win, start, end):
            visited += 1
            if visited > MAX_RECORDS:
                raise WireError(f"more than {MAX_RECORDS:,} records")
            yield rec

    top = list(walk(0, size))
    graphs = [r for r in top if r.number == GRAPH]
    if len(graphs) != 1 or graphs[0].wire_type != LEN:  # protobuf would merge several: parse it whole
        raise WireError(f"expected one length-delimited graph record (got {len(graphs)})")
    pieces: list[bytes] = []
    deferred: dict[int, tuple[int, int]] = {}
    for rec in top:
        if rec.number != GRAPH:
            pieces.append(win.read(rec.start, rec.end))
            continue
        body: list[bytes] = []
        index = 0
        for g in walk(rec.value_start, rec.end):
            if g.number != INITIALIZER or g.wire_type != LEN:
                body.append(win.read(g.start, g.end))
                continue
            fields = list(walk(g.value_start, g.end))
            raw = [f for f in fields if f.number == RAW_DATA]
            if (len(raw) == 1 and raw[0].wire_type == LEN and raw[0].end - raw[0].value_start >= min_bytes
                    and not any(f.number in _VALUE_FIELDS for f in fields)):
                kept = win.read(g.value_start, raw[0].start) + win.read(raw[0].end, g.end)
                body.append(win.read(g.start, g.key_end) + encode_varint(len(kept)) + kept)
                deferred[index] = (raw[0].value_start, raw[0].end - raw[0].value_start)
            else:
                body.append(win.read(g.start, g.end))
            index += 1
        graph = b"".join(body)
        pieces.append(win.read(rec.start, rec.key_end) + encode_varint(len(graph)) + graph)
    return b"".join(pieces), deferred


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass(frozen=True)
class DeferredFile:
    """The file a model's deferred tensors are in, as it was when the model was read."""

    path: Path
    identity: tuple[int, int, int, int]

    def is_deferred(self, t: onnx.TensorProto) -> bool:
        return (t.data_location == EXTERNAL and len(t.external_data) == 3
                and t.external_data[0].key == "location" and t.external_data[0].value == self.path.name)

    def pending(self, model: onnx.ModelProto) -> list[onnx.TensorProto]:
        """The initializers of ``model`` whose values are still in the file."""
        return [t for t in model.graph.initializer if self.is_deferred(t)]

    def fill(self, model: onnx.ModelProto) -> int:
        """Read the values of every tensor of ``model`` still deferred (in place); how many.

        Raises:
            ModelLoadError: the file is gone, was replaced, or changed size or time since it was
                read (its bytes can no longer be trusted to be those the model was checked with).
        """
        todo = self.pending(model)
        if not todo:
            return 0
        fd, st = open_regular_file(self.path, ModelLoadError, "an .onnx file")
        try:
            if _identity(st) != self.identity:
                raise ModelLoadError(f"{self.path}: changed while it was being read; run again")
            for t in todo:
                entries = {e.key: e.value for e in t.external_data}
                values = pread_exactly(fd, int(entries["offset"]), int(entries["length"]))
                t.ClearField("external_data")
                t.ClearField("data_location")
                t.raw_data = values
        except WireError:
            raise ModelLoadError(f"{self.path}: changed while it was being read (truncated); run again") from None
        except OSError as exc:
            raise ModelLoadError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        finally:
            os.close(fd)
        return len(todo)


def read_deferred(path: Path, max_bytes: int, min_bytes: int | None = None
                  ) -> tuple[onnx.ModelProto, DeferredFile] | None:
    """The model in ``path`` with its large initializers deferred, or None where this reader does
    not apply (not the binary format, a name that is not UTF-8, over ``max_bytes``, records it
    does not expect, nothing to defer): the caller reads the file whole, which reports what is
    wrong, if anything.

    Raises:
        ModelLoadError: ``path`` is not a readable regular file.
    """
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:  # the location entry is a protobuf string
        return None
    fd, st = open_regular_file(path, ModelLoadError, "an .onnx file")
    try:
        if st.st_size > max_bytes:
            return None
        try:
            data, deferred = skeleton(fd, st.st_size, DEFER_MIN_BYTES if min_bytes is None else min_bytes)
        except WireError:
            return None
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
        if not deferred:
            return None
        try:
            model = onnx.ModelProto.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf's errors vary; the whole-file parse says what is wrong
            return None
        del data
        source = DeferredFile(path, _identity(st))
        tensors = model.graph.initializer
        for i, (offset, length) in deferred.items():
            t = tensors[i]
            if t.data_type in FLOAT_TYPES and tensor_nbytes(t) == length:
                t.data_location = EXTERNAL
                t.external_data.add(key="location", value=path.name)
                t.external_data.add(key="offset", value=str(offset))
                t.external_data.add(key="length", value=str(length))
            else:  # validation judges it with its values, as a whole-file read would
                t.raw_data = pread_exactly(fd, offset, length)
    except WireError:
        return None
    finally:
        os.close(fd)
    return model, source
