"""The reference implementations' weight files: what they hold, read without running their code.

ppuda's and ghn3's released files carry no configuration our loader can trust (ghn3's are a
joblib/pickle of a bare state dict; ppuda's ``.npz`` conversions are arrays only), so the
configuration is *read off the tensors* here, as ghn3's own loader does (GHN2_FACTS §9), and
nowhere else: our checkpoints always carry theirs (:mod:`~ghn_onnx.ghn.checkpoint`).

* :func:`infer_config`: family (GHN-2 by ``gnn.gru.*``, GHN-3 by ``gnn.{l}.ln1.*``), hid
  (``embed``), classes (``class_layer_predictor``), the block ``(out, in, s, s)``
  (``decoder.conv.2`` rows = out·in, ``decoder.fc.0`` rows = 4·hid·s²), the transformer's layers and
  heads (its edge projection's outputs), virtual edges and LayerNorm by their keys.
  ``weight_norm`` cannot be seen in weights: it is assumed on, as both references' released
  models use it.
* :func:`to_our_layout`: ghn3's layouts to ours: the structural tables at the top level of the
  released files (``centrality_embed_in.weight``, ...) move into layer 0 (``gnn.0.``), where
  ghn3's loader moves them (both layouts load to the same weights); its decoder ``Linear``
  weights ``(o, i)`` become the ``(o, i, 1, 1)`` 1×1 convs they compute.
* :class:`RestrictedUnpickler`: a pickle stream may name only the functions that rebuild torch
  tensors and storages, ``collections.OrderedDict`` and plain containers; anything else (the
  ``os.system`` of a hostile file) raises :class:`~ghn_onnx.errors.CheckpointError` before it is
  called. Storages come as bytes of a ``torch.save``, read with ``torch.load(weights_only=True)``.
* :func:`load`: a reference file (``.npz``; a ``.pt`` in torch's zip format, read with
  ``torch.load(weights_only=True)``, or a plain pickle / uncompressed joblib stream) → a GHN.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ghn_onnx.errors import CheckpointError
from ghn_onnx.ghn.checkpoint import from_state_dict
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.model import GHN

#: ghn3's structural tables, kept at the top level of its released files, in layer 0 in ours.
STRUCTURAL_TABLES = ("centrality_embed_in.weight", "centrality_embed_out.weight", "input_dist_embed.weight")
#: Decoder weights that ghn3 stores as ``Linear`` ``(o, i)`` and ppuda (and we) as 1×1 convs.
LINEAR_DECODER_WEIGHTS = ("decoder.conv.0.weight", "decoder.conv.2.weight", "decoder.class_layer_predictor.1.weight")
#: GHN-3's published sizes by (hid, layers) (GHN2_FACTS §7).
GHN3_VARIANTS = {(64, 3): "T", (128, 5): "S", (256, 12): "L", (384, 24): "XL"}
#: Largest reference file read into memory (a GHN-3-XL is 2.6 GB).
MAX_FILE_BYTES = 4 << 30


@dataclass(frozen=True)
class Inferred:
    """What a reference state dict is: its configuration and a name for it."""

    config: GHNConfig
    family: str  # "GHN-2" or "GHN-3"
    variant: str  # "CIFAR-10", "ImageNet" (GHN-2); "T", "S", "L", "XL" (GHN-3); or a description

    def describe(self) -> str:
        return f"{self.family}-{self.variant}"


# -- configuration from shapes -------------------------------------------------------------------

def infer_config(shapes: Mapping[str, tuple[int, ...]], source: str = "state dict") -> Inferred:
    """The configuration of a reference state dict from its key names and shapes (``key →
    shape``, either layout of :func:`to_our_layout`)."""
    shapes = {str(k): tuple(int(d) for d in v) for k, v in shapes.items()}

    def shape(key: str, rank: int | None = None) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: expected a GHN-2 or GHN-3 state dict with {key!r} (got keys "
                                  f"{', '.join(sorted(shapes)[:4])}{' ...' if len(shapes) > 4 else ''})")
        got = shapes[key]
        if rank is not None and len(got) != rank:
            raise CheckpointError(f"{source}: expected {key} of rank {rank} (got shape {got})")
        return got

    hid = shape("embed.weight", 2)[1]
    num_classes = shape("decoder.class_layer_predictor.1.weight")[0]
    block = shape("decoder.conv.2.weight")[0]
    out_ch = math.isqrt(block)
    template = shape("decoder.fc.0.weight", 2)[0]
    s = math.isqrt(template // (4 * hid)) if hid else 0
    if out_ch * out_ch != block or s * s * 4 * hid != template:
        raise CheckpointError(f"{source}: expected decoder.conv.2 rows out·out and decoder.fc.0 rows 4·hid·s² "
                              f"(got {block} and {template} for hid {hid})")
    layers = sorted({int(m.group(1)) for k in shapes for m in [re.fullmatch(r"gnn\.(\d+)\.ln1\.weight", k)] if m})
    common = dict(max_shape=(out_ch, out_ch, s, s), num_classes=num_classes, hid=hid, weight_norm=True,
                  layernorm="ln.weight" in shapes)
    if "gnn.gru.weight_ih" in shapes:
        if layers:
            raise CheckpointError(f"{source}: holds both a gated GNN (gnn.gru) and transformer layers (gnn.0.ln1)")
        config = _config(source, **common, ve="gnn.mlp_ve.fc.0.weight" in shapes)
        variant = {(10, 11): "CIFAR-10", (1000, 16): "ImageNet"}.get((num_classes, s), f"{num_classes} classes, s={s}")
        return Inferred(config, "GHN-2", variant)
    if not layers:
        raise CheckpointError(f"{source}: expected a gated GNN (gnn.gru.*) or transformer layers (gnn.0.ln1.*)")
    if layers != list(range(len(layers))):
        raise CheckpointError(f"{source}: expected transformer layers 0..{len(layers) - 1} (got {layers})")
    heads = shape("gnn.0.attn.proj_e.2.weight", 2)[0]
    config = _config(source, **common, ve=True, hypernet="transformer", layers=len(layers), heads=heads,
                     rules="ghn3")
    return Inferred(config, "GHN-3", GHN3_VARIANTS.get((hid, len(layers)), f"hid {hid}, {len(layers)} layers"))


def _config(source: str, **fields: Any) -> GHNConfig:
    try:
        return GHNConfig(**fields)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from None


# -- layouts -------------------------------------------------------------------------------------

def to_our_layout(shapes: Mapping[str, Any], source: str = "state dict") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Our key and shape for each key of a reference state dict (``key → shape``): the renaming
    and reshaping :func:`convert_state` applies. Both layouts of ghn3's structural tables are
    accepted, not both at once."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        ours = f"gnn.0.{key}" if key in STRUCTURAL_TABLES else key
        if key in LINEAR_DECODER_WEIGHTS and len(shape) == 2:
            shape = (*shape, 1, 1)
        out[key] = (ours, shape)
    targets = collections.Counter(ours for ours, _ in out.values())
    twice = sorted(k for k, n in targets.items() if n > 1)
    if twice:
        raise CheckpointError(f"{source}: holds {twice[0]} twice (at the top level and in layer 0)")
    return out


def convert_state(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """A reference state dict in our key names and shapes (:func:`to_our_layout`)."""
    layout = to_our_layout({k: tuple(v.shape) for k, v in state.items()}, source)
    return {ours: state[k].reshape(shape) for k, (ours, shape) in layout.items()}


# -- reading files -------------------------------------------------------------------------------

class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: :meth:`find_class` resolves only
    :data:`ALLOWED` (torch's tensor-rebuild functions, ``collections.OrderedDict``, plain
    containers, the codec that protocol-2 pickles use for bytes) and the storage loader, which reads its bytes with
    ``torch.load(weights_only=True)``; every other global raises :class:`CheckpointError`
    before anything is called."""

    ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("_codecs", "encode"): lambda text, encoding="utf-8": _encode(text, encoding),
        # plain containers, under Python 3's module name and the one protocol-2 pickles use
        **{(m, c.__name__): c for c in (dict, list, tuple, set, frozenset) for m in ("builtins", "__builtin__")},
    }

    def __init__(self, file, source: str) -> None:
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._storage
        found = self.ALLOWED.get((module, name))
        if found is None:
            raise CheckpointError(f"{self.source}: the pickle asks for {module}.{name}, which a state dict of "
                                  "tensors does not need: refused (nothing was run)")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.source}: the pickle refers to external storage ({str(pid)[:40]}): refused")

    def _storage(self, data: bytes) -> Any:
        if not isinstance(data, (bytes, bytearray)):
            raise CheckpointError(f"{self.source}: expected a storage's bytes (got {type(data).__name__})")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign bytes
            raise CheckpointError(f"{self.source}: a storage cannot be read ({_first_line(exc)})") from None


def _encode(text: Any, encoding: str) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise CheckpointError("the pickle encodes something other than bytes: refused")
    return text.encode(encoding)


def read_pickle(data: bytes, source: str) -> Any:
    """The object of a plain pickle (or uncompressed joblib) stream, through
    :class:`RestrictedUnpickler`."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), source).load()
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            RuntimeError, MemoryError, RecursionError) as exc:
        raise CheckpointError(f"{source}: not a readable pickle ({_first_line(exc)})") from None


def read_state(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The tensors of a reference ``.pt`` file and the configuration it carries, if any
    (``(state, config)``): torch's zip format through ``torch.load(weights_only=True)``, anything
    else as a pickle stream through :class:`RestrictedUnpickler`. A dict with ``state_dict`` is a
    training checkpoint (ppuda's, ghn3's); otherwise the dict is the state dict."""
    path = Path(path)
    data = _read_bytes(path)
    if data[:2] == b"PK":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                blob = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for foreign or unsafe files
            raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({_first_line(exc)})") from None
    elif data[:2] in (b"\x1f\x8b", b"BZ", b"\xfd7", b"ZF") or data[:1] == b"x":
        raise CheckpointError(f"{path}: a compressed file (joblib compress?): decompress it to a plain pickle first")
    else:
        blob = read_pickle(data, str(path))
    config = None
    if isinstance(blob, Mapping) and "state_dict" in blob:
        config = blob.get("config") if isinstance(blob.get("config"), Mapping) else None
        blob = blob["state_dict"]
    if not isinstance(blob, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in blob.items()):
        raise CheckpointError(f"{path}: expected a state dict of named tensors")
    return {k: v.detach() for k, v in blob.items()}, (dict(config) if config is not None else None)


def _read_bytes(path: Path) -> bytes:
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise CheckpointError(f"{path}: {size:,} bytes, more than the {MAX_FILE_BYTES:,} a reference GHN takes")
        return path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """``key → (shape, dtype)`` of an ``.npz``'s members, from their ``.npy`` headers alone:
    ``.npy`` members only, float dtypes only (no pickled objects), and no more bytes declared
    than the member holds and than :data:`MAX_FILE_BYTES` in all (a header is no promise)."""
    headers, total = {}, 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{path}: not an .npz of arrays (member {info.filename!r}; a PyTorch "
                                          "checkpoint? name it .pt)")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version not in ((1, 0), (2, 0)):
                        raise CheckpointError(f"{path}: {info.filename}: unsupported .npy format version {version}")
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise CheckpointError(f"{path}: {info.filename} holds Python objects (a pickle): refused")
                if dtype.kind != "f":
                    raise CheckpointError(f"{path}: {info.filename} holds {dtype} values, expected floating point")
                nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
                total += nbytes
                if nbytes > info.file_size or total > MAX_FILE_BYTES:
                    raise CheckpointError(f"{path}: {info.filename} declares {nbytes:,} bytes, more than the file "
                                          "holds or a reference GHN takes")
                headers[info.filename[:-4]] = (tuple(int(d) for d in shape), dtype)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz ({_first_line(exc)})") from None
    return headers


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an ``.npz`` whose headers :func:`npz_headers` accepted."""
    try:
        with zipfile.ZipFile(path) as zf:
            state = {}
            for info in zf.infolist():
                with zf.open(info) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                state[info.filename[:-4]] = torch.from_numpy(np.ascontiguousarray(array))
            return state
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz ({_first_line(exc)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to read it") from None


def expected_shapes(config: GHNConfig) -> dict[str, tuple[int, ...]]:
    """Our key → shape for a GHN with ``config`` (built on the ``meta`` device: no memory)."""
    with torch.device("meta"):
        ghn = GHN(config)
    return {k: tuple(v.shape) for k, v in ghn.state_dict().items()}


def check_shapes(shapes: Mapping[str, tuple[int, ...]], config: GHNConfig, source: str) -> None:
    """Our-layout ``key → shape`` against a GHN with ``config``: the same keys, the same shapes."""
    expected = expected_shapes(config)
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = [f"{what} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{source}: keys do not match a GHN with {config}: {'; '.join(parts)}")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(shapes[k])}, expected {shape} for {config}")


# -- the whole load -------------------------------------------------------------------------------

#: Boolean settings a training checkpoint's own config may give (weights cannot show weight_norm).
CONFIG_FLAGS = ("weight_norm", "ve", "layernorm")


def load(path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> tuple[GHN, Inferred]:
    """A GHN from a reference file, its configuration inferred from the tensors
    (:func:`infer_config`); a training checkpoint's own ``weight_norm`` / ``ve`` / ``layernorm``
    are taken from it; ``overrides`` (GHNConfig fields) replace inferred values, and every key and
    shape is then checked against the result.

    Raises:
        CheckpointError: an unreadable or hostile file, or tensors that are no GHN-2 / GHN-3.
    """
    path = Path(path)
    source = str(path)
    if path.suffix == ".npz":
        shapes, state, file_config = {k: shape for k, (shape, _) in npz_headers(path).items()}, None, None
    else:
        state, file_config = read_state(path)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
    inferred = infer_config(shapes, source)
    fields = {k: file_config[k] for k in CONFIG_FLAGS if file_config and isinstance(file_config.get(k), bool)}
    fields.update(overrides or {})
    if fields:
        try:
            inferred = replace(inferred, config=replace(inferred.config, **fields))
        except (CheckpointError, TypeError) as exc:
            raise CheckpointError(f"{source}: {exc}") from None
    check_shapes(dict(to_our_layout(shapes, source).values()), inferred.config, source)  # before reading
    if state is None:
        state = read_npz(path)
    return from_state_dict(convert_state(state, source), inferred.config, source), inferred


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__
