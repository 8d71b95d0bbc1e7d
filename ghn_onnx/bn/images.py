"""Calibration images: a seeded random subset from a ``.npy`` / ``.npz`` array, an image folder or
a ``.zip`` of images (``train/<class>/*.jpg`` like ``cifar10-jpeg.zip``), normalised to the
model's ``(N, C, H, W)`` float32 input. Resizing is out of scope: image sizes must match."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from ghn_onnx.errors import GhnOnnxError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Array names looked for in an .npz holding several arrays.
NPZ_KEYS = ("x", "images", "data", "arr_0")


def load_calibration_data(path: str | os.PathLike, input_shape: Sequence, n: int, seed: int = 0, *,
                          mean: Sequence[float] = CIFAR10_MEAN,
                          std: Sequence[float] = CIFAR10_STD) -> np.ndarray:
    """``n`` images drawn at random (``numpy.random.default_rng(seed)``) from ``path``.

    Args:
        path: ``.npy`` / ``.npz`` with ``(N, H, W, C)`` or ``(N, C, H, W)`` uint8 images (scaled
            to [0, 1], then normalised) or ``(N, C, H, W)`` float arrays (taken as they are,
            already normalised); or a folder or ``.zip`` holding JPEG / PNG files anywhere.
        input_shape: the model input, ``(C, H, W)`` or ``(N, C, H, W)`` (the batch size is ignored).
        n: how many images; more than the source holds is an error.
        seed: picks the subset and its order.
        mean, std: per-channel normalisation of uint8 images (default: CIFAR-10's).

    Returns:
        ``(n, C, H, W)`` float32.
    """
    c, h, w = _chw(input_shape)
    path = Path(path)
    if not path.exists():
        raise GhnOnnxError(f"{path}: no such calibration data")
    rng = np.random.default_rng(seed)
    if path.suffix.lower() in (".npy", ".npz"):
        arr = _load_array(path)
        pick = _subset(len(arr), n, rng, path)
        return _from_array(np.asarray(arr[pick]), c, h, w, mean, std, path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        pick = _subset(len(files), n, rng, path)
        images = [_decode(files[i].read_bytes(), c, h, w, str(files[i])) for i in pick]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = sorted(i.filename for i in zf.infolist()
                           if not i.is_dir() and Path(i.filename).suffix.lower() in IMAGE_SUFFIXES)
            pick = _subset(len(names), n, rng, path)
            images = [_decode(zf.read(names[i]), c, h, w, f"{path}:{names[i]}") for i in pick]
    else:
        raise GhnOnnxError(f"{path}: expected a .npy / .npz file, an image folder or a .zip of images")
    return _normalise(np.stack(images), mean, std)


def calibration_batches(model: onnx.ModelProto, path: str | os.PathLike, n: int, batch_size: int = 64,
                        seed: int = 0) -> list[np.ndarray]:
    """``n`` images from ``path`` (:func:`load_calibration_data`) shaped for the single data input
    of ``model`` (:func:`data_input`), in batches of ``batch_size`` (:func:`iter_batches`)."""
    x = load_calibration_data(path, data_input(model)[2], n, seed)
    return list(iter_batches(x, batch_size))


def iter_batches(data: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive ``(batch_size, ...)`` slices of ``data`` (the last may be smaller)."""
    if batch_size < 1:
        raise GhnOnnxError(f"batch size must be positive (got {batch_size})")
    for i in range(0, len(data), batch_size):
        yield data[i:i + batch_size]


def data_input(model: onnx.ModelProto) -> tuple[str, int, tuple]:
    """The model's single data input: ``(name, ONNX elem type, shape)``; dims without a fixed
    size are their symbolic names (or ``None``)."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise GhnOnnxError(f"expected a model with one data input (got {len(inputs)}: "
                           f"{', '.join(i.name for i in inputs)})")
    tt = inputs[0].type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return inputs[0].name, tt.elem_type, shape


def _chw(input_shape: Sequence) -> tuple[int, int, int]:
    dims = tuple(input_shape)[-3:]
    if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        raise GhnOnnxError(f"expected an image input shape (C, H, W) with fixed sizes (got {tuple(input_shape)})")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _subset(total: int, n: int, rng: np.random.Generator, path: Path) -> np.ndarray:
    if n < 1:
        raise GhnOnnxError(f"number of calibration images must be positive (got {n})")
    if n > total:
        raise GhnOnnxError(f"{path}: asked for {n} calibration images, found {total}")
    return rng.choice(total, size=n, replace=False)


def _load_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, mmap_mode="r", allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in NPZ_KEYS if k in keys), None)
            if key is None:
                raise GhnOnnxError(f"{path}: holds arrays {keys}; name the images one of {list(NPZ_KEYS)}")
            return z[key]
    except (OSError, ValueError) as exc:
        raise GhnOnnxError(f"{path}: cannot read array ({exc})") from None


def _from_array(arr: np.ndarray, c: int, h: int, w: int, mean, std, path: Path) -> np.ndarray:
    if arr.dtype == np.uint8:
        if arr.shape[1:] == (h, w, c):
            return _normalise(arr, mean, std)
        if arr.shape[1:] == (c, h, w):
            return _normalise(arr.transpose(0, 2, 3, 1), mean, std)
    elif np.issubdtype(arr.dtype, np.floating) and arr.shape[1:] == (c, h, w):
        return np.ascontiguousarray(arr, dtype=np.float32)
    raise GhnOnnxError(f"{path}: expected uint8 images (N, {h}, {w}, {c}) or (N, {c}, {h}, {w}), or float "
                       f"(N, {c}, {h}, {w}) (got {arr.dtype} {tuple(arr.shape)}); resizing is not supported")


def _decode(data: bytes, c: int, h: int, w: int, name: str) -> np.ndarray:
    """One image as ``(H, W, C)`` uint8."""
    from PIL import Image  # a dependency; imported here, as only image folders and zips need it

    if c not in (1, 3):
        raise GhnOnnxError(f"images give 1 or 3 channels; the model input has {c}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB" if c == 3 else "L")
            if img.size != (w, h):
                raise GhnOnnxError(f"{name}: image is {img.size[0]}x{img.size[1]}, the model expects "
                                   f"{w}x{h} (resizing is not supported)")
            arr = np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise GhnOnnxError(f"{name}: not a readable image ({exc})") from None
    return arr.reshape(h, w, c)


def _normalise(images: np.ndarray, mean, std) -> np.ndarray:
    """``(N, H, W, C)`` uint8 → ``(N, C, H, W)`` float32, ``(x / 255 - mean) / std``."""
    c = images.shape[-1]
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    if mean.shape != (c,) or std.shape != (c,) or np.any(std <= 0):
        raise GhnOnnxError(f"expected {c} normalisation means and {c} positive stds "
                           f"(got mean {mean.tolist()}, std {std.tolist()})")
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
