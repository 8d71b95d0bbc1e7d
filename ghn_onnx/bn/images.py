"""Calibration images: a seeded random subset from a ``.npy`` / ``.npz`` array, an image folder or
a ``.zip`` of images (``train/<class>/*.jpg`` like ``cifar10-jpeg.zip``), shaped for the model's
data input.

What the model expects is read from its input (:func:`input_spec`): the layout (NCHW or NHWC),
the image size, a fixed batch size. Images are resized to that size and normalised with the
given per-channel mean and std (CIFAR-10's by default; ``normalize=False`` for models that
rescale and normalise their input themselves). Folders and zips with a ``train/`` split give
training images only: calibrating on the test split would leak it into every later evaluation.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterator, Literal, Sequence

import numpy as np
import onnx

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.onnx_io.files import regular_file_stat

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# Array names looked for in an .npz holding several arrays.
NPZ_KEYS = ("x", "images", "data", "arr_0")
# Folder names that mark a dataset split (case-insensitive); the first one on an image's path is its split.
TRAIN_SPLITS = frozenset({"train", "training"})
HELD_OUT_SPLITS = frozenset({"test", "testing", "val", "valid", "validation"})
Layout = Literal["NCHW", "NHWC"]


@dataclass(frozen=True)
class InputSpec:
    """What a model's data input takes, as read from the model.

    Attributes:
        name, elem_type: the input's name and ONNX element type.
        layout: ``"NCHW"`` or ``"NHWC"``.
        channels, height, width: the image shape the input needs.
        batch: the fixed batch size of the input, ``None`` when it is dynamic.
    """

    name: str
    elem_type: int
    layout: Layout
    channels: int
    height: int
    width: int
    batch: int | None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One image in the model's layout: ``(C, H, W)`` or ``(H, W, C)``."""
        c, h, w = self.channels, self.height, self.width
        return (c, h, w) if self.layout == "NCHW" else (h, w, c)


@dataclass
class CalibrationSet:
    """Batches ready to feed (:func:`calibration_set`), how many images they hold, and notes
    for the user (a batch size the model imposed, images left out to fill whole batches)."""

    batches: list[np.ndarray]
    images: int
    notes: list[str] = field(default_factory=list)


def input_spec(model: onnx.ModelProto) -> InputSpec:
    """The single data input of ``model`` as images: layout, size and batch size.

    The layout is NHWC when the input's first reader is a ``Transpose`` with ``perm=[0, 3, 1, 2]``
    (how tf2onnx and jax2onnx feed NHWC images to ONNX's NCHW convolutions), NCHW when a ``Conv``
    reads it directly; otherwise the shape decides when exactly one of dims 1 and 3 is 1 or 3
    channels.

    Raises:
        GhnOnnxError: not one data input, not rank 4, image sizes that are not fixed, or a layout
            that neither the graph nor the shape tells.
    """
    name, elem, shape = data_input(model)
    if len(shape) != 4:
        raise GhnOnnxError(f"expected an image input of rank 4 (got {name!r} of shape {shape})")
    layout = _layout(model, name, shape)
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if not all(isinstance(d, int) and d > 0 for d in (c, h, w)):
        raise GhnOnnxError(f"expected an image input with fixed channels, height and width "
                           f"(got {name!r} of shape {shape}, {layout})")
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return InputSpec(name, elem, layout, c, h, w, batch)


def _layout(model: onnx.ModelProto, name: str, shape: tuple) -> Layout:
    readers = [n for n in model.graph.node if name in n.input]
    for node in readers:
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            if perm == [0, 3, 1, 2]:
                return "NHWC"
        if node.op_type == "Conv" and node.input[0] == name:
            return "NCHW"
    nchw, nhwc = shape[1] in (1, 3), shape[3] in (1, 3)
    if nchw != nhwc:
        return "NCHW" if nchw else "NHWC"
    raise GhnOnnxError(f"cannot tell whether input {name!r} of shape {shape} is NCHW or NHWC (no Conv or "
                       "NHWC->NCHW Transpose reads it, and the shape does not say)")


def load_calibration_data(path: str | os.PathLike, input_shape: Sequence, n: int, seed: int = 0, *,
                          mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD,
                          normalize: bool = True, layout: Layout = "NCHW") -> np.ndarray:
    """``n`` images drawn at random (``numpy.random.default_rng(seed)``) from ``path``.

    Args:
        path: ``.npy`` / ``.npz`` with uint8 images ``(N, H, W, C)`` or ``(N, C, H, W)`` (any size:
            resized, scaled to [0, 1], normalised) or float arrays in the model's own layout and
            size (taken as they are, already normalised); or a folder or ``.zip`` of JPEG / PNG
            files. A folder or zip with a split folder (``train/``, ``test/``, ``val/``, ...)
            on its paths gives the images under ``train/`` only, and is an error without one.
        input_shape: the model input without or with the batch: ``(C, H, W)`` / ``(N, C, H, W)``
            for NCHW, ``(H, W, C)`` / ``(N, H, W, C)`` for NHWC (the batch size is ignored).
        n: how many images; more than the source holds is an error.
        seed: picks the subset and its order.
        mean, std: per-channel normalisation of uint8 images, ``(x / 255 - mean) / std`` (one value
            is used for every channel). Default: CIFAR-10's.
        normalize: ``False`` gives the pixel values ``0..255`` as float32, for models with their
            own rescaling / normalisation layers (``mean`` and ``std`` are then not used).
        layout: of the model input, and of the result.

    Returns:
        ``(n, *input_shape[-3:])`` float32.
    """
    c, h, w = _chw(input_shape, layout)
    path = image_source(path, "calibration")
    rng = np.random.default_rng(seed)
    if path.suffix.lower() in (".npy", ".npz"):
        arr = _load_array(path)
        pick = _subset(len(arr), n, rng, path)
        images = _from_array(np.asarray(arr[pick]), c, h, w, layout, path)
        if images.dtype != np.uint8:
            return images  # float: already normalised
        return _normalise(images, _normalisation(c, mean, std, normalize), layout)
    scale = _normalisation(c, mean, std, normalize)  # checked before decoding anything
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files = _training_entries(files, lambda p: p.relative_to(path).parts, path)
        pick = _subset(len(files), n, rng, path)
        images = np.stack([_decode(files[i].read_bytes(), c, h, w, str(files[i])) for i in pick])
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = sorted(i.filename for i in zf.infolist()
                           if not i.is_dir() and Path(i.filename).suffix.lower() in IMAGE_SUFFIXES)
            names = _training_entries(names, lambda s: PurePosixPath(s).parts, path)
            pick = _subset(len(names), n, rng, path)
            images = np.stack([_decode(zf.read(names[i]), c, h, w, f"{path}:{names[i]}") for i in pick])
    else:
        raise GhnOnnxError(f"{path}: expected a .npy / .npz file, an image folder or a .zip of images")
    return _normalise(images, scale, layout)


def image_source(path: str | os.PathLike, purpose: str | None = None) -> Path:
    """``path`` as a ``Path``, refused in one line unless it exists and is a folder or a regular
    file (a FIFO or a device would block the reader or never end). ``purpose`` (e.g.
    ``"calibration"``) names the data in the messages."""
    path = Path(path)
    if not path.exists():
        raise GhnOnnxError(f"{path}: no such {purpose or 'image'} data")
    if not path.is_dir():
        what = f"{purpose} images" if purpose else "images"
        regular_file_stat(path, GhnOnnxError, f"{what}: a folder, .zip, .npy or .npz")
    return path


def calibration_set(model: onnx.ModelProto, path: str | os.PathLike, n: int, batch_size: int = 64, seed: int = 0,
                    *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    no_normalize: bool = False) -> CalibrationSet:
    """``n`` images from ``path`` (:func:`load_calibration_data`) shaped for the data input of
    ``model`` (:func:`input_spec`), in batches of ``batch_size`` (:func:`iter_batches`).

    A model exported with a fixed batch size is fed batches of that size only (other sizes fail
    in its Reshapes): ``batch_size`` gives way, and ``n`` is rounded down to whole batches.
    ``mean`` / ``std`` default to CIFAR-10's; ``no_normalize`` feeds pixel values ``0..255``
    and excludes ``mean`` and ``std``.
    """
    if no_normalize and (mean is not None or std is not None):
        raise GhnOnnxError("no_normalize feeds raw pixel values: give it without mean and std")
    spec = input_spec(model)
    notes: list[str] = []
    if spec.batch is not None:
        if spec.batch != batch_size:
            notes.append(f"input {spec.name!r} has a fixed batch size of {spec.batch}: calibrating in batches "
                         f"of {spec.batch}, not {batch_size}")
        batch_size = spec.batch
        if n < batch_size:
            raise GhnOnnxError(f"input {spec.name!r} has a fixed batch size of {batch_size}: calibration needs "
                               f"at least {batch_size} images (got {n})")
        if n % batch_size:
            notes.append(f"{n} calibration images rounded down to {n - n % batch_size}, whole batches of "
                         f"{batch_size}")
            n -= n % batch_size
    x = load_calibration_data(path, spec.image_shape, n, seed, mean=CIFAR10_MEAN if mean is None else mean,
                              std=CIFAR10_STD if std is None else std, normalize=not no_normalize,
                              layout=spec.layout)
    return CalibrationSet(list(iter_batches(x, batch_size)), len(x), notes)


def calibration_batches(model: onnx.ModelProto, path: str | os.PathLike, n: int, batch_size: int = 64,
                        seed: int = 0, **normalisation) -> list[np.ndarray]:
    """The batches of :func:`calibration_set` (same arguments)."""
    return calibration_set(model, path, n, batch_size, seed, **normalisation).batches


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


def _chw(input_shape: Sequence, layout: Layout) -> tuple[int, int, int]:
    dims = tuple(input_shape)[-3:]
    if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
        raise GhnOnnxError(f"expected an image input shape with fixed sizes (got {tuple(input_shape)})")
    if layout not in ("NCHW", "NHWC"):
        raise GhnOnnxError(f"layout must be NCHW or NHWC (got {layout!r})")
    c, h, w = dims if layout == "NCHW" else (dims[2], dims[0], dims[1])
    return int(c), int(h), int(w)


def _training_entries(entries: list, parts, path: Path) -> list:
    """The entries under a training split folder when any entry is under a split folder at all
    (the first split name on an entry's path is its split), else every entry."""
    def split(entry) -> str | None:
        return next((p.lower() for p in parts(entry)[:-1] if p.lower() in TRAIN_SPLITS | HELD_OUT_SPLITS), None)

    splits = [split(e) for e in entries]
    if not any(splits):
        return entries
    kept = [e for e, s in zip(entries, splits) if s in TRAIN_SPLITS]
    if not kept:
        found = sorted({s for s in splits if s})
        raise GhnOnnxError(f"{path}: images under {', '.join(f + '/' for f in found)} but none under train/: "
                           "calibration takes training images only (held-out images would leak into "
                           "evaluation); give a folder of training images")
    return kept


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


def _from_array(arr: np.ndarray, c: int, h: int, w: int, layout: Layout, path: Path) -> np.ndarray:
    """uint8 images as ``(N, h, w, c)`` (resized if need be), or float arrays as they are."""
    own = (c, h, w) if layout == "NCHW" else (h, w, c)
    if arr.dtype == np.uint8 and arr.ndim == 4:
        if arr.shape[3] == c:
            return _resize_all(arr, h, w, path)
        if arr.shape[1] == c:
            return _resize_all(arr.transpose(0, 2, 3, 1), h, w, path)
    elif np.issubdtype(arr.dtype, np.floating) and arr.shape[1:] == own:
        return np.ascontiguousarray(arr, dtype=np.float32)
    raise GhnOnnxError(f"{path}: expected uint8 images (N, H, W, {c}) or (N, {c}, H, W), or float arrays in the "
                       f"model's layout (N, {', '.join(map(str, own))}) ({layout}) (got {arr.dtype} "
                       f"{tuple(arr.shape)})")


def _resize_all(images: np.ndarray, h: int, w: int, path: Path) -> np.ndarray:
    if images.shape[1:3] == (h, w):
        return images
    from PIL import Image

    c = images.shape[3]
    if c not in (1, 3):
        raise GhnOnnxError(f"{path}: cannot resize {c}-channel images to {w}x{h}: give them at that size")
    return np.stack([np.asarray(_resize(Image.fromarray(im[..., 0] if c == 1 else im), h, w)).reshape(h, w, c)
                     for im in images])


def _resize(img, h: int, w: int):
    """``img`` at ``w x h``: the shorter side scaled to fit (bilinear), then centre-cropped to the
    aspect ratio (a plain resize when the aspect ratios agree)."""
    from PIL import Image

    iw, ih = img.size
    if (iw, ih) == (w, h):
        return img
    s = max(w / iw, h / ih)
    sw, sh = max(w, round(iw * s)), max(h, round(ih * s))
    img = img.resize((sw, sh), Image.BILINEAR)
    left, top = (sw - w) // 2, (sh - h) // 2
    return img.crop((left, top, left + w, top + h)) if (sw, sh) != (w, h) else img


def _decode(data: bytes, c: int, h: int, w: int, name: str) -> np.ndarray:
    """One image as ``(H, W, C)`` uint8, resized to ``w x h`` (:func:`_resize`)."""
    from PIL import Image  # a dependency; imported here, as only image folders and zips need it

    if c not in (1, 3):
        raise GhnOnnxError(f"images give 1 or 3 channels; the model input has {c}")
    try:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(_resize(img.convert("RGB" if c == 3 else "L"), h, w), dtype=np.uint8)
    except OSError as exc:
        raise GhnOnnxError(f"{name}: not a readable image ({exc})") from None
    return arr.reshape(h, w, c)


def _normalisation(c: int, mean: Sequence[float], std: Sequence[float],
                   normalize: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel ``(mean, std)`` for :func:`_normalise`, checked; ``None`` without ``normalize``."""
    if not normalize:
        return None
    mean = np.asarray(mean, dtype=np.float32).reshape(-1)
    std = np.asarray(std, dtype=np.float32).reshape(-1)
    mean, std = (np.repeat(v, c) if v.shape == (1,) else v for v in (mean, std))
    if mean.shape != (c,) or std.shape != (c,) or np.any(std <= 0):
        raise GhnOnnxError(f"expected {c} normalisation means and {c} positive stds, or one of each "
                           f"(got mean {mean.tolist()}, std {std.tolist()})")
    return mean, std


def _normalise(images: np.ndarray, scale: tuple[np.ndarray, np.ndarray] | None, layout: Layout) -> np.ndarray:
    """``(N, H, W, C)`` uint8 → float32 in ``layout``: ``(x / 255 - mean) / std`` for ``scale =
    (mean, std)``, the pixel values ``0..255`` for ``None``."""
    x = images.astype(np.float32)
    if scale is not None:
        x = (x / 255.0 - scale[0]) / scale[1]
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)
