"""GHN checkpoints: safetensors weights with the JSON config in the file's header metadata.

One file, no pickle. The reference GHN-2 state dict (ppuda key names, GHN2_FACTS §9) loads from
``.npz`` or from a ppuda ``.pt`` training checkpoint (read with ``torch.load(weights_only=True)``,
which refuses arbitrary objects); its configuration is given explicitly, never guessed from keys.

Hostile files: the configuration is checked field by field (:class:`GHNConfig`) and the shapes it
implies (a GHN built on the ``meta`` device: no memory) are compared with the shapes the file
declares before any tensor is read or any module is built, so a header cannot make the loader
allocate more than the file holds. ``.npz`` members are read as ``.npy`` arrays only (no pickles,
no strings, no other members).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ghn_onnx.errors import CheckpointError, OutputError
from ghn_onnx.ghn.config import LEGACY_KEYS, GHNConfig
from ghn_onnx.onnx_io.files import check_output_file, regular_file_stat

if TYPE_CHECKING:
    import torch

    from ghn_onnx.ghn.model import GHN

# torch and the GHN are imported where a function needs them: reading a checkpoint's configuration
# (`ghn-onnx inspect`, the registry) needs neither.

FORMAT = "ghn-onnx/ghn2-v1"


def save(ghn: GHN, path: str | os.PathLike, extra: Mapping[str, str] | None = None, *,
         source_path: str | os.PathLike | None = None) -> None:
    """Write ``ghn`` to ``path`` (atomically: temp file + rename). An existing ``path`` must be a
    regular file and not ``source_path`` (the file the weights came from) under any name.

    Raises:
        GhnOnnxError: an output path that may not be written. OutputError: the write failed.
    """
    from safetensors.torch import save_file

    path = check_output_file(path, [] if source_path is None else [source_path])
    meta = {"format": FORMAT, "config": ghn.config.to_json(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in ghn.state_dict().items()}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GHN:
    """Load a GHN saved by :func:`save`; raise :class:`CheckpointError` saying what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path, "a .safetensors checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "config" not in meta:
                raise CheckpointError(f"{path}: not a ghn-onnx checkpoint (format {meta.get('format')!r}); "
                                      "convert reference checkpoints with `ghn-onnx convert-checkpoint`")
            config = _config_of(meta["config"], path)
            declared = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
            check_declared(declared, config, str(path))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({first_line(exc)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to read it") from None
    return from_state_dict(tensors, config, str(path)).to(device)


def read_config(path: str | os.PathLike) -> GHNConfig:
    """The configuration in a checkpoint's header, without reading its tensors (milliseconds)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_file(path, "a .safetensors checkpoint")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({first_line(exc)})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a ghn-onnx checkpoint (format {meta.get('format')!r}); "
                              "convert reference checkpoints with `ghn-onnx convert-checkpoint`")
    return _config_of(meta["config"], path)


def _check_file(path: Path, what: str) -> None:
    try:
        regular_file_stat(path, CheckpointError, what)
    except CheckpointError as exc:
        if "no such file" in str(exc):
            raise CheckpointError(f"{path}: no such checkpoint file") from None
        raise


def _config_of(text: str, path: Path) -> GHNConfig:
    try:
        return GHNConfig.from_dict(json.loads(text))
    except (json.JSONDecodeError, TypeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({first_line(exc)})") from None
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "float16", "bfloat16", "float32", "float64"})


def _skip_init():
    """A torch function mode in which ``torch.nn.init``'s initialisers do nothing. On the meta
    device they only cost time: ``normal_`` has no C++ meta kernel, and its Python reference takes
    seconds to set up."""
    import torch

    class SkipInit(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if getattr(func, "__module__", "") == "torch.nn.init":
                return args[0] if args else kwargs.get("tensor")
            return func(*args, **kwargs)

    return SkipInit()


def expected_shapes(config: GHNConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key → shape of a GHN with ``config``, from a GHN built on the ``meta`` device
    (no memory is allocated for its parameters, nothing is initialised; milliseconds)."""
    import torch

    from ghn_onnx.ghn.model import GHN

    with torch.device("meta"), _skip_init():
        ghn = GHN(config)
    return {k: tuple(v.shape) for k, v in ghn.state_dict().items()}


def check_declared(declared: Mapping[str, tuple[tuple[int, ...], str]], config: GHNConfig, source: str) -> None:
    """Compare the keys, shapes and dtypes a file declares (``key → (shape, dtype name)``) with
    those of a GHN with ``config``, before any tensor is read."""
    expected = expected_shapes(config)
    _check_keys(set(declared), expected, config, source)
    for k, shape in expected.items():
        got, dtype = declared[k]
        if tuple(got) != shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(got)}, expected {shape} for {config}")
        if str(dtype) not in FLOAT_DTYPES:
            raise CheckpointError(f"{source}: {k} holds {dtype} values, expected floating point")


def _check_keys(keys: set[str], expected: Mapping[str, tuple[int, ...]], config: GHNConfig, source: str) -> None:
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(map(str, unexpected[:4]))}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source}: keys do not match a GHN-2 with {config}: {'; '.join(parts)}")


def from_state_dict(state: Mapping[str, torch.Tensor], config: GHNConfig, source: str = "checkpoint") -> GHN:
    """Build a GHN from a state dict with the reference key names, checking every key and shape
    (against a ``meta``-device GHN, before the real one is built)."""
    import torch

    from ghn_onnx.ghn.model import GHN

    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in state.items()):
        raise CheckpointError(f"{source}: expected a state dict of named tensors")
    check_declared({k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()},
                   config, source)
    import numpy as np

    for k, v in state.items():
        # numpy, not torch.isfinite: torch's first parallel op starts its thread pool (~50 ms
        # of a one-file ``ghn-onnx predict``), and these are small CPU tensors.
        if not np.isfinite(v.detach().to("cpu", torch.float32).numpy()).all():
            raise CheckpointError(f"{source}: {k} holds non-finite values")
    ghn = GHN(config)
    ghn.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return ghn.eval()


def load_reference(path: str | os.PathLike, config: GHNConfig | None = None) -> GHN:
    """Load a reference GHN-2 state dict from ``.npz`` (arrays named by state-dict key) or a
    ppuda ``.pt`` checkpoint (``{'state_dict', 'config', ...}``). For ``.npz`` the config must be
    given (default: GHN-2 CIFAR-10); a ``.pt`` file carries its own."""
    import torch

    path = Path(path)
    regular_file_stat(path, CheckpointError, "a .npz or .pt reference checkpoint")
    if path.suffix == ".npz":
        config = config or GHNConfig()
        return from_state_dict(_read_npz(path, config), config, str(path))
    try:
        with warnings.catch_warnings():  # torch's notes on foreign files would precede the error line
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({first_line(exc)})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"{path}: expected a ppuda checkpoint with 'state_dict' and 'config'")
    if config is None:
        cfg = blob.get("config") or {}
        if not isinstance(cfg, dict) or not cfg:
            raise CheckpointError(f"{path}: no 'config' dict in the checkpoint; pass the configuration explicitly")
        cfg = {k: v for k, v in cfg.items() if k in GHNConfig.__dataclass_fields__ or k in LEGACY_KEYS}
        try:
            config = GHNConfig.from_dict(cfg)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    return from_state_dict(blob["state_dict"], config, str(path))


def _read_npz(path: Path, config: GHNConfig) -> dict[str, torch.Tensor]:
    """The arrays of an ``.npz``, each member's ``.npy`` header checked (name, shape, float
    dtype, no pickled objects) against a GHN with ``config`` before any array is read."""
    import torch

    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.infolist()
            headers = {}
            for info in members:
                if not info.filename.endswith(".npy"):
                    raise CheckpointError(f"{path}: not an .npz of arrays (member {info.filename!r}; a PyTorch "
                                          "checkpoint? name it .pt)")
                with zf.open(info) as f:
                    headers[info.filename[:-4]] = _npy_header(f, path, info.filename)
            check_declared({k: (shape, dtype.name) for k, (shape, dtype) in headers.items()}, config, str(path))
            state = {}
            for info in members:
                with zf.open(info) as f:
                    array = np.lib.format.read_array(f, allow_pickle=False)
                state[info.filename[:-4]] = torch.from_numpy(np.ascontiguousarray(array))
            return state
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError,
            NotImplementedError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz ({first_line(exc)})") from None
    except MemoryError:
        raise CheckpointError(f"{path}: not enough memory to read it") from None


def _npy_header(f, path: Path, member: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise CheckpointError(f"{path}: {member}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise CheckpointError(f"{path}: {member} holds Python objects (a pickle): refused")
    if dtype.kind != "f":
        raise CheckpointError(f"{path}: {member} holds {dtype} values, expected floating point")
    return tuple(int(d) for d in shape), dtype


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_checkpoint() -> Path | None:
    """The trained checkpoint shipped inside the package, if this version has one."""
    path = Path(__file__).resolve().parents[1] / "checkpoints" / "ghn2_cifar10.safetensors"
    return path if path.is_file() else None
