"""Labelled evaluation images for ``ghn-onnx explain``: a seeded random subset, shaped for the model.

Calibration (:mod:`ghn_onnx.bn.images`) takes training images only, since what it measures is
kept in the model. Explain keeps nothing: it evaluates, so it draws from the held-out split
(``test/``, ``val/``, ...) of a folder or zip that has one, else from the training split (with a
note), else from the whole source. Decoding, resizing, layout and normalisation are calibration's
(the same rules, the same code). Labels are class folders: an image's label is the index of its
parent folder's name among the sorted class folder names (``train/cat/1.jpg`` → ``cat``), as in
torchvision's ``ImageFolder``; for CIFAR-10 that is the official label order. A ``.npz`` may hold
labels beside its images (``y`` or ``labels``); a ``.npy`` holds none.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx

from ghn_onnx.bn import images as calib  # the decoding and normalisation rules, one definition
from ghn_onnx.errors import GhnOnnxError

LABEL_KEYS = ("y", "labels")


@dataclass
class LabelledImages:
    """``x`` in the model's layout (float32, normalised), ``labels`` (int64, or ``None``), the
    number of classes the labels come from (for an array: at least, the largest label + 1),
    the split drawn from, the batch size, notes."""

    x: np.ndarray
    labels: np.ndarray | None
    classes: int | None
    split: str
    batch_size: int
    notes: list[str] = field(default_factory=list)
    classes_exact: bool = True  # False for array labels: classes may be missing from the draw

    def fits(self, outputs: int) -> bool:
        """Whether the labels index a head of ``outputs`` classes."""
        return self.classes is not None and (self.classes == outputs if self.classes_exact else
                                             self.classes <= outputs)

    @property
    def images(self) -> int:
        return len(self.x)

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """``(x, labels)`` slices of ``batch_size`` in the drawn (random) order."""
        for i in range(0, len(self.x), self.batch_size):
            yield self.x[i:i + self.batch_size], None if self.labels is None else self.labels[i:i + self.batch_size]


def labelled_images(model: onnx.ModelProto, path: str | os.PathLike, n: int, batch_size: int = 64, seed: int = 0,
                    *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    no_normalize: bool = False) -> LabelledImages:
    """``n`` images drawn at random (``numpy.random.default_rng(seed)``) from ``path``, for the data
    input of ``model`` (:func:`~ghn_onnx.bn.images.input_spec`); see the module docstring.

    A model with a fixed batch size gets batches of that size, ``n`` rounded down to whole batches.

    Raises:
        GhnOnnxError: no such data, an unreadable image or array, fewer images than ``n``, bad
            normalisation, a model input that is not an image.
    """
    if no_normalize and (mean is not None or std is not None):
        raise GhnOnnxError("no_normalize feeds raw pixel values: give it without mean and std")
    if batch_size < 1 or n < 1:
        raise GhnOnnxError(f"expected a positive number of images and batch size (got {n}, {batch_size})")
    spec = calib.input_spec(model)
    notes: list[str] = []
    if spec.batch is not None:
        if spec.batch != batch_size:
            notes.append(f"input {spec.name!r} has a fixed batch size of {spec.batch}: batches of {spec.batch}")
        batch_size = spec.batch
        if n < batch_size:
            raise GhnOnnxError(f"input {spec.name!r} has a fixed batch size of {batch_size}: explain needs at "
                               f"least {batch_size} images (got {n})")
        n -= n % batch_size
    scale = calib._normalisation(spec.channels, calib.CIFAR10_MEAN if mean is None else mean,
                                 calib.CIFAR10_STD if std is None else std, not no_normalize)
    path = calib.image_source(path)
    rng = np.random.default_rng(seed)
    c, h, w = spec.channels, spec.height, spec.width
    if path.suffix.lower() in (".npy", ".npz"):
        arr, labels = _arrays(path)
        pick = _subset(len(arr), n, rng, path)
        images = calib._from_array(np.asarray(arr[pick]), c, h, w, spec.layout, path)
        x = images if images.dtype != np.uint8 else calib._normalise(images, scale, spec.layout)
        y = None if labels is None else labels[pick].astype(np.int64)
        classes = None if labels is None else int(labels.max()) + 1
        return LabelledImages(x, y, classes, "all", batch_size, notes, classes_exact=False)
    if path.is_dir():
        entries = sorted(str(p.relative_to(path).as_posix()) for p in path.rglob("*")
                         if p.suffix.lower() in calib.IMAGE_SUFFIXES and p.is_file())
        read = lambda e: (path / e).read_bytes()  # noqa: E731
        return _from_entries(entries, read, n, rng, c, h, w, scale, spec.layout, batch_size, notes, path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            entries = sorted(i.filename for i in zf.infolist()
                             if not i.is_dir() and i.filename.lower().endswith(calib.IMAGE_SUFFIXES))
            return _from_entries(entries, zf.read, n, rng, c, h, w, scale, spec.layout, batch_size, notes, path)
    raise GhnOnnxError(f"{path}: expected a .npy / .npz file, an image folder or a .zip of images")


_SPLITS = calib.TRAIN_SPLITS | calib.HELD_OUT_SPLITS


def _split(entry: str) -> str | None:
    """The first split folder on an entry's path (the rule of calibration's training split)."""
    # str.split, not PurePosixPath: a CIFAR-10 zip lists 60,000 entries
    return next((p.lower() for p in entry.split("/")[:-1] if p.lower() in _SPLITS), None)


def _from_entries(entries: list[str], read, n: int, rng: np.random.Generator, c: int, h: int, w: int, scale,
                  layout, batch_size: int, notes: list[str], path: Path) -> LabelledImages:
    splits = [_split(e) for e in entries]
    held = [e for e, s in zip(entries, splits) if s in calib.HELD_OUT_SPLITS]
    train = [e for e, s in zip(entries, splits) if s in calib.TRAIN_SPLITS]
    if held:
        names = sorted({s for s in splits if s in calib.HELD_OUT_SPLITS})
        entries, split = held, "+".join(names)
    elif train:
        entries, split = train, "train"
        notes.append(f"{path}: no held-out split (test/, val/): accuracy on training images, which a GHN "
                     "trained on them may flatter")
    else:
        split = "all"
    pick = _subset(len(entries), n, rng, path)
    images = np.stack([calib._decode(read(entries[i]), c, h, w, f"{path}:{entries[i]}") for i in pick])
    x = calib._normalise(images, scale, layout)
    parents = [e.split("/")[-2] if "/" in e else "" for e in entries]
    if any(not p or p.lower() in _SPLITS for p in parents):
        return LabelledImages(x, None, None, split, batch_size, notes)  # images outside class folders
    classes = sorted(set(parents))
    index = {name: i for i, name in enumerate(classes)}
    y = np.array([index[parents[i]] for i in pick], dtype=np.int64)
    return LabelledImages(x, y, len(classes), split, batch_size, notes)


def _subset(total: int, n: int, rng: np.random.Generator, path: Path) -> np.ndarray:
    if n > total:
        raise GhnOnnxError(f"{path}: asked for {n} images, found {total}")
    return rng.choice(total, size=n, replace=False)


def _arrays(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of an array file (calibration's reader) and the labels of an ``.npz``."""
    images = calib._load_array(path)
    if path.suffix.lower() != ".npz":
        return images, None
    try:
        with np.load(path, allow_pickle=False) as z:
            key = next((k for k in LABEL_KEYS if k in z.files), None)
            if key is None:
                return images, None
            labels = np.asarray(z[key])
    except (OSError, ValueError) as exc:
        raise GhnOnnxError(f"{path}: cannot read array ({exc})") from None
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or \
            (len(labels) and labels.min() < 0):
        raise GhnOnnxError(f"{path}: expected {key!r} to hold one non-negative integer label per image "
                           f"(got {labels.dtype} {tuple(labels.shape)})")
    return images, labels
