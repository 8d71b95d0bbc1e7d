"""Predicted parameters → ONNX file.

:func:`write_predictions` puts canonical-form predictions back into the tensors they were read
from (inverting each :class:`~ghn_onnx.graph.graph.Layout`, casting to the stored dtype) and stamps
``ghn_onnx.*`` metadata; :func:`save_model` writes the result atomically, with external data when
the model needs it. :func:`predicted_model` and :func:`save_predicted` do the same in two steps,
the predicted values held aside, so that the file is written without serialising them
(:mod:`ghn_onnx.writeback.raw`): ``predict_files``'s route.

Shared tensors: when several :class:`~ghn_onnx.graph.graph.ParamRef` point at one stored tensor (tied
weights), the first one in ``graph.nodes`` order (topological order) owns it: its canonical shape
is the one predictions must have and its prediction is the one written (:func:`resolve_shared`).
Tensors the exporter merged only because their values were equal (PyTorch's ``Identity``
aliases) are not tied weights: split them with :func:`~ghn_onnx.onnx_io.storage.untie_aliases` before
converting.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from ghn_onnx.errors import GhnOnnxError, OutputError
from ghn_onnx.graph.graph import Graph, ParamRef
from ghn_onnx.onnx_io.files import READ_FLAGS, check_output_file, read_regular_file
from ghn_onnx.onnx_io.storage import (DATA_FIELDS, FLOAT_TYPES, cast_to_stored, np_dtype, set_tensor_values,
                                      stored_tensors, tensor_nbytes)
from ghn_onnx.version import __version__
from ghn_onnx.writeback import raw

METADATA_PREFIX = "ghn_onnx."
# Keys this module writes itself; a caller's metadata may not override them.
RESERVED_KEYS = frozenset({"ghn_onnx.version", "ghn_onnx.predicted_tensors"})
# Output models at or above this serialized size are saved with external data (protobuf's limit).
MAX_PROTOBUF_BYTES = onnx.checker.MAXIMUM_PROTOBUF
EXTERNAL_SIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inline
LOCATION_KEY = b"location"  # the external_data key naming a tensor's data file
SCAN_CHUNK = 1 << 20  # bytes per read when scanning an input for LOCATION_KEY: stays in cache


def resolve_shared(graph: Graph) -> dict[str, ParamRef]:
    """Stored tensor name → the ParamRef that owns it: the first in ``graph.nodes`` order.

    A tensor reached by several ParamRefs (tied weights) is predicted once, in the layout of
    the node that comes first topologically; later references are ignored. Dict order is
    ``graph.nodes`` order, so iterating it is deterministic.
    """
    owners: dict[str, ParamRef] = {}
    for node in graph.nodes:
        for ref in node.params:
            owners.setdefault(ref.tensor, ref)
    return owners


@dataclass
class PredictedModel:
    """A predicted model with the predicted tensors' values held aside, so that it can be written
    without serialising them (:func:`save_predicted`).

    Attributes:
        model: the output model, except that the tensors named in ``data`` hold no values yet.
        data: stored tensor name → its values (the tensor's dims and numpy dtype), in graph order.
    """

    model: onnx.ModelProto
    data: dict[str, np.ndarray]

    def fill(self) -> onnx.ModelProto:
        """Put the values into ``model`` (once) and return it: what :func:`write_predictions` returns."""
        stored = stored_tensors(self.model)
        for name, values in self.data.items():
            set_tensor_values(stored[name], values)
        self.data = {}
        return self.model


def write_predictions(model: onnx.ModelProto, graph: Graph, predictions: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the predicted tensors replaced and ``ghn_onnx.*`` metadata set:
    ``predicted_model(...).fill()``.

    Args:
        model: the model ``graph`` was converted from (not modified).
        graph: its GHN graph; tells where each tensor lives and its layout.
        predictions: ParamRef.tensor → float array of shape ``ParamRef.canonical_shape``
            (conv ``(out, in/groups, kh, kw)``, linear ``(out, in)``, 1-D ``(C,)``).
        metadata: extra metadata (e.g. checkpoint sha256, BN status); keys are prefixed with
            ``ghn_onnx.`` unless they already are, values must be strings.

    Returns:
        a new ModelProto. Each predicted tensor keeps its name, dims, dtype and place (its
        position in ``graph.initializer``, or its Constant node); its values are
        ``layout.to_stored(prediction)`` rounded to the stored dtype (nearest even). Everything
        else, including other metadata_props, is left as it was; earlier ``ghn_onnx.*`` keys are
        replaced.

    Raises:
        GhnOnnxError: unknown tensor name, wrong canonical shape, non-finite values, or values
            that overflow the stored dtype.
    """
    return predicted_model(model, graph, predictions, metadata=metadata).fill()


def predicted_model(model: onnx.ModelProto, graph: Graph, predictions: Mapping[str, np.ndarray], *,
                    metadata: Mapping[str, str] | None = None) -> PredictedModel:
    """:func:`write_predictions` with the values held aside (:class:`PredictedModel`); the same
    arguments, checks and errors (a wrong stored shape or dtype: when filled)."""
    owners = resolve_shared(graph)
    unknown = sorted(set(predictions) - set(owners))
    if unknown:
        raise GhnOnnxError(f"predictions for tensors the graph does not have: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''}")
    extra = _namespaced(metadata or {})

    out = _copy_without_data(model, set(predictions))
    stored = stored_tensors(out)
    data: dict[str, np.ndarray] = {}
    for name, ref in owners.items():  # graph order: deterministic metadata
        if name not in predictions:
            continue
        if name not in stored:
            raise GhnOnnxError(f"{name!r}: not an initializer or Constant of this model "
                               "(was the graph converted from another model?)")
        data[name] = _to_stored(ref, predictions[name])
    written = list(data)

    _set_metadata(out, {
        **extra,
        "ghn_onnx.version": __version__,
        "ghn_onnx.predicted_tensors": json.dumps({"count": len(written), "names": written},
                                                 separators=(",", ":")),
    })
    return PredictedModel(out, data)


def _copy_without_data(model: onnx.ModelProto, replaced: set[str]) -> onnx.ModelProto:
    """A copy of ``model`` in which the initializers named in ``replaced`` have no data yet
    (everything else as it was): their data is about to be overwritten, and copying it costs
    as much as writing it (a ResNet-50: 94 MB)."""
    out = onnx.ModelProto()
    _copy_fields(model, out, skip={"graph"})
    _copy_fields(model.graph, out.graph, skip={"initializer"})
    for t in model.graph.initializer:
        if t.name in replaced:
            _copy_fields(t, out.graph.initializer.add(), skip=DATA_FIELDS)
        else:
            out.graph.initializer.add().CopyFrom(t)
    return out


def _copy_fields(src, dst, skip: set[str] | frozenset[str]) -> None:
    """Copy every set field of the message ``src`` into ``dst``, except those in ``skip``."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def _to_stored(ref: ParamRef, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise GhnOnnxError(f"{ref.tensor!r}: expected a float array (got dtype {value.dtype})")
    if tuple(value.shape) != tuple(ref.canonical_shape):
        raise GhnOnnxError(f"{ref.tensor!r}: expected a prediction of canonical shape "
                           f"{tuple(ref.canonical_shape)} (got {tuple(value.shape)})")
    if not np.all(np.isfinite(value)):
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise GhnOnnxError(f"{ref.tensor!r}: prediction has {bad} non-finite value(s)")
    stored = ref.layout.to_stored(value)
    if tuple(stored.shape) != tuple(ref.stored_shape):  # a Layout that does not invert is a bug
        raise GhnOnnxError(f"{ref.tensor!r}: layout {ref.layout.describe()} maps {value.shape} to "
                           f"{stored.shape}, expected stored shape {tuple(ref.stored_shape)}")
    if ref.dtype in FLOAT_TYPES and stored.dtype == np_dtype(ref.dtype):
        return stored  # nothing to round, and finite values cannot overflow: no second pass over them
    return cast_to_stored(stored, ref.dtype, repr(ref.tensor))


def _namespaced(metadata: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise GhnOnnxError(f"metadata keys and values must be strings (got {key!r}: {value!r})")
        full = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        if full in RESERVED_KEYS:
            raise GhnOnnxError(f"metadata key {full!r} is set by ghn_onnx itself")
        out[full] = value
    return out


def _set_metadata(model: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    """Drop every earlier ``ghn_onnx.*`` entry, keep the others in order, append ours sorted
    (sorted so the bytes do not depend on the caller's dict order)."""
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(METADATA_PREFIX)]
    del model.metadata_props[:]
    for key, value in kept + sorted(entries.items()):
        model.metadata_props.add(key=key, value=value)


# -- saving ------------------------------------------------------------------------------------

def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
               source_path: str | os.PathLike | None = None,
               source_data_files: Sequence[str | os.PathLike] | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: to a temporary file in the same directory, then
    ``os.replace``. An interrupted write leaves no partial file and any older ``path`` intact.

    Args:
        model: the model to write (not modified). Its tensors must hold their data in memory
            (load with :func:`ghn_onnx.onnx_io.loading.load_model`).
        path: the output file. An existing one must be a regular file (or a symbolic link, which
            is replaced, not written through); devices, FIFOs and folders are refused.
        external_data: store tensors of 1 KiB or more in an external data file next to ``path``,
            named ``<path name>.<16 hex digits>.data`` after a hash of its content.
            ``None`` (default): only if the model would exceed protobuf's 2 GB limit.
        source_path: the file ``model`` was read from; writing over it or over its external data
            files, under any name (symbolic or hard links included), is refused.
        source_data_files: those external data files, where the caller knows them (the second
            value of :func:`~ghn_onnx.onnx_io.loading.read_model`); ``None``: found by reading
            ``source_path`` when the output exists.

    Returns:
        the output path. With external data the pair is replaced atomically: the data file
        goes in first under its new, content-derived name (never over a file the old model
        reads, unless it holds these very bytes), then the model is renamed over the old one,
        which is the commit; the old model's data file is removed last. A crash before the
        commit leaves the old pair (and possibly an unreferenced new data file), after it the
        new pair (and possibly the old, unreferenced data file).

    Raises:
        GhnOnnxError: an output path that may not be written (see above).
        OutputError: the file system refused the write (permissions, read-only, full).
    """
    out, protected = _checked_output(path, source_path, source_data_files)
    _refuse_unloaded_external_data(model)
    serialized = None
    if external_data is None:
        serialized = _serialized_if_small(model)
        external_data = serialized is None
    try:
        return _save(model, out, serialized, external_data, protected)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None


def save_predicted(pred: PredictedModel, path: str | os.PathLike, *, source_path: str | os.PathLike | None = None,
                   source_data_files: Sequence[str | os.PathLike] | None = None, reserialize: bool = False,
                   fill: bool = True) -> Path:
    """``save_model(pred.fill(), path, source_path=..., source_data_files=...)``: the same file, checks, errors
    and atomic write, but without serialising the predicted tensors where that is possible
    (:mod:`ghn_onnx.writeback.raw`): every predicted tensor is an initializer of the main graph
    whose values have its dims and dtype, the host is little-endian, and the file stays under
    protobuf's 2 GB (no external data). Otherwise, or with ``reserialize``, it is
    ``save_model``. ``pred`` is filled either way, unless ``fill`` is false and the file was
    written without it (filling copies every predicted tensor twice: to bytes, into protobuf).
    """
    pieces = None if reserialize else _raw_pieces(pred)
    if pieces is None:
        return save_model(pred.fill(), path, source_path=source_path, source_data_files=source_data_files)
    out, protected = _checked_output(path, source_path, source_data_files)
    try:
        _save(pred.model, out, pieces, False, protected)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    if fill:
        pred.fill()
    return out


def _raw_pieces(pred: PredictedModel) -> list[bytes | memoryview] | None:
    """The output file's bytes as pieces (the skeleton's and the arrays' own memory), or None
    where :func:`save_predicted` must serialise (see there)."""
    if sys.byteorder != "little" or not pred.data:  # raw_data is little-endian; nothing to gain
        return None
    _refuse_unloaded_external_data(pred.model)
    tensors = pred.model.graph.initializer
    index = {t.name: i for i, t in enumerate(tensors)}
    if len(index) != len(tensors):  # duplicate names: leave which one is meant to the one rule
        return None
    data = {}
    for name, values in pred.data.items():
        i = index.get(name)
        if i is None:  # a Constant node's value, inside a node
            return None
        t = tensors[i]
        if values.dtype != np_dtype(t.data_type) or values.shape != tuple(t.dims):
            return None  # set_tensor_values says what is wrong
        data[i] = memoryview(np.ascontiguousarray(values).reshape(-1).view(np.uint8))
    try:
        skeleton = pred.model.SerializeToString()
        pieces = raw.with_raw_data(skeleton, data)
    except Exception:  # noqa: BLE001 - over protobuf's limit (its error types vary), or a WireError
        return None
    if sum(len(p) if isinstance(p, bytes) else p.nbytes for p in pieces) >= MAX_PROTOBUF_BYTES:
        return None  # external data
    return pieces


def _checked_output(path: str | os.PathLike, source_path: str | os.PathLike | None,
                    source_data_files: Sequence[str | os.PathLike] | None = None) -> tuple[Path, list[Path]]:
    """The output path, checked (see :func:`save_model`), and the input files it must not be."""
    out = Path(path)
    protected = [] if source_path is None else [Path(source_path)]
    if source_data_files is not None:
        protected += [Path(f) for f in source_data_files]
    elif protected and os.path.lexists(out):  # only an existing file can be one of the source's data files
        protected += _external_data_files(protected[0])
    check_output_file(out, protected)
    return out, protected


def _save(model: onnx.ModelProto, out: Path, serialized: bytes | Sequence[bytes | memoryview] | None,
          external_data: bool, protected: list[Path]) -> Path:
    old_data = _old_data_files(out, protected)  # before the commit: what the old model reads
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    data_name: str | None = None
    new_data: Path | None = None  # the data file this call created
    committed = False
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            skeleton, data_name = _write_external(model, tmpdir, out.name)
            if data_name is not None:
                target = out.parent / data_name
                if not os.path.lexists(target):
                    _fsync(tmpdir / data_name)
                    os.replace(tmpdir / data_name, target)  # a new name: nothing reads it yet
                    new_data = target
                    _fsync_dir(out.parent)
                elif not _same_bytes(target, tmpdir / data_name):  # the name says the content
                    raise GhnOnnxError(f"{target}: exists with other content than its name says; "
                                       "remove it or choose another output path")
            _write_bytes(tmp_model, skeleton)
        else:
            _write_bytes(tmp_model, serialized if serialized is not None else model.SerializeToString())
        _fsync(tmp_model)
        os.replace(tmp_model, out)  # the commit
        committed = True
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not committed and new_data is not None:
            new_data.unlink(missing_ok=True)  # nothing refers to it
    kept = {data_name} if external_data and data_name is not None else set()
    for stale in old_data:
        if stale.name not in kept:
            stale.unlink(missing_ok=True)
    return out


def _same_bytes(a: Path, b: Path) -> bool:
    if not (a.is_file() and os.path.getsize(a) == os.path.getsize(b)):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def _write_external(model: onnx.ModelProto, tmpdir: Path, out_name: str) -> tuple[bytes, str | None]:
    """The serialized skeleton of ``model`` with every initializer of ``EXTERNAL_SIZE_THRESHOLD``
    bytes or more in one data file in ``tmpdir``, and that file's final name (None: no tensor
    was big enough). The name is derived from the file's content, so the same model saved again
    gives the same bytes."""
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    copy = onnx.ModelProto()  # the data moves out of the proto it is written from: work on a copy
    copy.CopyFrom(model)
    pending = f"{out_name}.pending.data"
    moved = [t for t in copy.graph.initializer
             if t.HasField("raw_data") and sys.getsizeof(t.raw_data) >= EXTERNAL_SIZE_THRESHOLD]
    for t in moved:
        set_external_data(t, pending)
    write_external_data_tensors(copy, str(tmpdir))
    if not moved:
        return copy.SerializeToString(), None
    digest = hashlib.sha256()
    with open(tmpdir / pending, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    name = f"{out_name}.{digest.hexdigest()[:16]}.data"
    os.replace(tmpdir / pending, tmpdir / name)
    for t in moved:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = name
    return copy.SerializeToString(), name


def _old_data_files(out: Path, protected: list[Path]) -> list[Path]:
    """The external data files of the model now at ``out`` that are ours to remove once it is
    replaced: named as :func:`save_model` names them (or ``<name>.data``), next to it, regular,
    and not one of the ``protected`` input files."""
    pattern = re.compile(re.escape(out.name) + r"(\.[0-9a-f]{16})?\.data")
    try:
        candidates = [p for p in out.parent.iterdir() if pattern.fullmatch(p.name)]
    except OSError:
        return []
    if not candidates or not out.is_file():
        return []
    referenced = {p.resolve() for p in _external_data_files(out)}
    keep = {(s.st_dev, s.st_ino) for s in map(_stat_or_none, protected) if s is not None}
    stale = []
    for p in candidates:
        st = _stat_or_none(p)
        if (st is not None and stat.S_ISREG(os.lstat(p).st_mode) and p.resolve() in referenced
                and (st.st_dev, st.st_ino) not in keep):
            stale.append(p)
    return stale


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _external_data_files(model_path: Path) -> list[Path]:
    """The external data files that the model file at ``model_path`` refers to (none if it is
    not a readable ONNX file)."""
    try:
        if not _may_name_data_files(model_path):
            return []
        data = read_regular_file(model_path, MAX_PROTOBUF_BYTES, GhnOnnxError, "an .onnx file",
                                 "an ONNX file can hold")
        skeleton = onnx.load_model_from_string(data)
    except Exception:  # not readable as ONNX: it has no data files we could clobber
        return []
    tensors = list(skeleton.graph.initializer) + list(stored_tensors(skeleton).values())
    locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
    return [model_path.parent / loc for loc in sorted(locations) if isinstance(loc, str)]


def _may_name_data_files(path: Path) -> bool:
    """False only where the file at ``path`` surely refers to no external data file: a regular
    file without the bytes ``location`` (every reference holds that key, verbatim). A scan through
    one small buffer: no copy of the file, no parse (the input of a ResNet-50 is 94 MB)."""
    keep = len(LOCATION_KEY) - 1  # carried from one read to the next: a key across two reads
    try:
        fd = os.open(path, READ_FLAGS)
    except OSError:
        return True
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return True  # the full read refuses it
        buf = bytearray(SCAN_CHUNK + keep)
        view, carried, total = memoryview(buf), 0, 0
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while True:
                n = f.readinto(view[carried:])
                if not n:
                    return False
                total += n
                end = carried + n
                if total > MAX_PROTOBUF_BYTES or buf.find(LOCATION_KEY, 0, end) >= 0:
                    return True
                carried = min(keep, end)
                buf[:carried] = buf[end - carried:end]
    except OSError:
        return True
    finally:
        os.close(fd)


def _refuse_unloaded_external_data(model: onnx.ModelProto) -> None:
    from onnx.external_data_helper import uses_external_data

    missing = [t.name for t in stored_tensors(model).values() if uses_external_data(t) and not t.raw_data]
    if missing:
        raise GhnOnnxError(f"tensor {missing[0]!r} (and {len(missing) - 1} more) still refers to an "
                           "external data file: load the model with its external data first")


def _serialized_if_small(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None where they would reach protobuf's 2 GB limit (one pass: the
    bytes are what gets written)."""
    tensor_bytes = sum(tensor_nbytes(t) or 0 for t in stored_tensors(model).values())
    if tensor_bytes >= MAX_PROTOBUF_BYTES:  # a lower bound: no need to try
        return None
    try:
        data = model.SerializeToString()
    except Exception:  # protobuf refuses messages over 2 GB (its error types vary by backend)
        return None
    return data if len(data) < MAX_PROTOBUF_BYTES else None


def _write_bytes(path: Path, data: bytes | Sequence[bytes | memoryview]) -> None:
    """Write ``data``, or the concatenation of its pieces, to ``path``."""
    with open(path, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            f.writelines(data)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make the rename durable; not every platform can open a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
