"""Predicted parameters → ONNX file.

:func:`write_predictions` puts canonical-form predictions back into the tensors they were read
from (inverting each :class:`~ghn_onnx.graph.graph.Layout`, casting to the stored dtype) and stamps
``ghn_onnx.*`` metadata; :func:`save_model` writes the result atomically, with external data when
the model needs it.

Shared tensors: when several :class:`~ghn_onnx.graph.graph.ParamRef` point at one stored tensor (tied
weights), the first one in ``graph.nodes`` order (topological order) owns it: its canonical shape
is the one predictions must have and its prediction is the one written (:func:`resolve_shared`).
Tensors the exporter merged only because their values were equal (PyTorch's ``Identity``
aliases) are not tied weights: split them with :func:`~ghn_onnx.onnx_io.storage.untie_aliases` before
converting.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import Graph, ParamRef
from ghn_onnx.onnx_io.storage import DATA_FIELDS, cast_to_stored, set_tensor_values, stored_tensors, tensor_nbytes
from ghn_onnx.version import __version__

METADATA_PREFIX = "ghn_onnx."
# Keys this module writes itself; a caller's metadata may not override them.
RESERVED_KEYS = frozenset({"ghn_onnx.version", "ghn_onnx.predicted_tensors"})
# Output models at or above this serialized size are saved with external data (protobuf's limit).
MAX_PROTOBUF_BYTES = onnx.checker.MAXIMUM_PROTOBUF
EXTERNAL_SIZE_THRESHOLD = 1024  # bytes; smaller tensors stay inline


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


def write_predictions(model: onnx.ModelProto, graph: Graph, predictions: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` with the predicted tensors replaced and ``ghn_onnx.*`` metadata set.

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
    owners = resolve_shared(graph)
    unknown = sorted(set(predictions) - set(owners))
    if unknown:
        raise GhnOnnxError(f"predictions for tensors the graph does not have: {', '.join(unknown[:5])}"
                           f"{' ...' if len(unknown) > 5 else ''}")
    extra = _namespaced(metadata or {})

    out = _copy_without_data(model, set(predictions))
    stored = stored_tensors(out)
    written: list[str] = []
    for name, ref in owners.items():  # graph order: deterministic metadata
        if name not in predictions:
            continue
        if name not in stored:
            raise GhnOnnxError(f"{name!r}: not an initializer or Constant of this model "
                               "(was the graph converted from another model?)")
        set_tensor_values(stored[name], _to_stored(ref, predictions[name]))
        written.append(name)

    _set_metadata(out, {
        **extra,
        "ghn_onnx.version": __version__,
        "ghn_onnx.predicted_tensors": json.dumps({"count": len(written), "names": written},
                                                 separators=(",", ":")),
    })
    return out


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
               source_path: str | os.PathLike | None = None) -> Path:
    """Write ``model`` to ``path`` atomically: to a temporary file in the same directory, then
    ``os.replace``. An interrupted write leaves no partial file and any older ``path`` intact.

    Args:
        model: the model to write (not modified). Its tensors must hold their data in memory
            (load with :func:`ghn_onnx.onnx_io.loading.load_model`).
        path: the output file.
        external_data: store tensors of 1 KiB or more in ``<path name>.data`` next to ``path``.
            ``None`` (default): only if the model would exceed protobuf's 2 GB limit.
        source_path: the file ``model`` was read from; writing over it, or over its external
            data file, is refused.

    Returns:
        the output path. With external data the data file is written first (also via a
        temporary file), then the model, so a crash in between leaves the old model next to the
        new data file, never a half-written file.
    """
    out = Path(path)
    data_path = out.with_name(out.name + ".data")
    _refuse_overwriting_source(out, data_path, source_path)
    if not out.parent.is_dir():
        raise GhnOnnxError(f"{out}: directory {out.parent} does not exist")
    _refuse_unloaded_external_data(model)
    serialized = None
    if external_data is None:
        serialized = _serialized_if_small(model)
        external_data = serialized is None

    tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = tmpdir / out.name
        if external_data:
            # onnx.save_model moves the data out of the proto it is given: work on a copy.
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(tmp_model), format="protobuf", save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_path.name,
                            size_threshold=EXTERNAL_SIZE_THRESHOLD)
            del copy
            tmp_data = tmpdir / data_path.name
            # Every tensor under the threshold: still replace any stale data file of an earlier run.
            if not tmp_data.exists():
                tmp_data.write_bytes(b"")
            _fsync(tmp_data)
            os.replace(tmp_data, data_path)
        else:
            _write_bytes(tmp_model, serialized if serialized is not None else model.SerializeToString())
        _fsync(tmp_model)
        os.replace(tmp_model, out)
        _fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def _refuse_overwriting_source(out: Path, data_path: Path, source_path) -> None:
    if source_path is None:
        return
    src = Path(source_path).resolve()
    # The source's data files exist and lie under its directory: only an existing file there
    # could be one, and only then is the source read again to list them.
    at_risk = [p for p in (out, data_path) if p.resolve() == src or (p.is_file() and src.parent in p.resolve().parents)]
    if not at_risk:
        return
    protected = {src} | {p.resolve() for p in _external_data_files(src)}
    for p in at_risk:
        if p.resolve() in protected:
            raise GhnOnnxError(f"{p}: refusing to overwrite the input model's files "
                               f"(read from {source_path}); choose another output path")


def _external_data_files(model_path: Path) -> list[Path]:
    """The external data files that the model file at ``model_path`` refers to."""
    if not model_path.is_file():
        return []
    try:
        skeleton = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # not readable as ONNX: it has no data files we could clobber
        return []
    tensors = list(skeleton.graph.initializer) + list(stored_tensors(skeleton).values())
    locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
    return [model_path.parent / loc for loc in sorted(locations)]


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


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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
