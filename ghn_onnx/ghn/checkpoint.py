"""GHN checkpoints: safetensors weights with the JSON config in the file's header metadata.

One file, no pickle. The reference GHN-2 state dict (ppuda key names, GHN2_FACTS §9) loads from
``.npz`` or from a ppuda ``.pt`` training checkpoint (read with ``torch.load(weights_only=True)``,
which refuses arbitrary objects); its configuration is given explicitly, never guessed from keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ghn_onnx.errors import CheckpointError
from ghn_onnx.ghn.config import LEGACY_KEYS, GHNConfig
from ghn_onnx.ghn.model import GHN

FORMAT = "ghn-onnx/ghn2-v1"


def save(ghn: GHN, path: str | os.PathLike, extra: Mapping[str, str] | None = None) -> None:
    """Write ``ghn`` to ``path`` (atomically: temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": FORMAT, "config": ghn.config.to_json(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in ghn.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> GHN:
    """Load a GHN saved by :func:`save`; raise :class:`CheckpointError` saying what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise CheckpointError(f"{path}: not a ghn-onnx checkpoint (format {meta.get('format')!r}); "
                              "convert reference checkpoints with `ghn-onnx convert-checkpoint`")
    try:
        config = GHNConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable config ({exc})") from None
    return from_state_dict(tensors, config, str(path)).to(device)


def from_state_dict(state: Mapping[str, torch.Tensor], config: GHNConfig, source: str = "checkpoint") -> GHN:
    """Build a GHN from a state dict with the reference key names, checking every key and shape."""
    ghn = GHN(config)
    expected = ghn.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
        raise CheckpointError(f"{source}: keys do not match a GHN-2 with {config}: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)} "
                                  f"for {config}")
        if not torch.isfinite(torch.as_tensor(state[k])).all():
            raise CheckpointError(f"{source}: {k} holds non-finite values")
    ghn.load_state_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in state.items()})
    return ghn.eval()


def load_reference(path: str | os.PathLike, config: GHNConfig | None = None) -> GHN:
    """Load a reference GHN-2 state dict from ``.npz`` (arrays named by state-dict key) or a
    ppuda ``.pt`` checkpoint (``{'state_dict', 'config', ...}``). For ``.npz`` the config must be
    given (default: GHN-2 CIFAR-10); a ``.pt`` file carries its own."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: torch.from_numpy(z[k]) for k in z.files}
        except (ValueError, OSError, EOFError) as exc:
            raise CheckpointError(f"{path}: not a readable .npz ({exc})") from None
        return from_state_dict(state, config or GHNConfig(), str(path))
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign or unsafe files
        raise CheckpointError(f"{path}: not a loadable PyTorch checkpoint ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise CheckpointError(f"{path}: expected a ppuda checkpoint with 'state_dict' and 'config'")
    if config is None:
        cfg = dict(blob.get("config") or {})
        if not cfg:
            raise CheckpointError(f"{path}: no 'config' in the checkpoint; pass the configuration explicitly")
        cfg = {k: v for k, v in cfg.items() if k in GHNConfig.__dataclass_fields__ or k in LEGACY_KEYS}
        config = GHNConfig.from_dict(cfg)
    return from_state_dict(blob["state_dict"], config, str(path))


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
