"""CIFAR-10 for training and evaluation: readers, the cached decode, the validation split, and
augmentation (GHN2_FACTS §5.3).

Sources, in order of preference: an image-folder layout (``train/<class>/*.jpg``,
``test/<class>/*.jpg``) as a directory or a ``.zip``; the official ``cifar-10-batches-py``
folder; or the official download when online. Images are decoded once and cached as uint8 NHWC
arrays (``.npz``) next to nothing the user owns: under ``$GHN_ONNX_CACHE`` (default
``~/.cache/ghn-onnx``), keyed by the source's size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ghn_onnx.errors import GhnOnnxError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass
class ImageSet:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx])


def cache_dir() -> Path:
    return Path(os.environ.get("GHN_ONNX_CACHE") or Path.home() / ".cache" / "ghn-onnx")


def load_cifar10(source: str | os.PathLike | None = None) -> dict[str, ImageSet]:
    """``{"train": 50k, "test": 10k}`` from ``source`` (see the module docstring).

    With ``source=None``, downloads the official archive into the cache (needs internet) and
    says what to pass instead when offline.
    """
    if source is None:
        source = _download()
    source = Path(source)
    if not source.exists():
        raise GhnOnnxError(f"{source}: no such CIFAR-10 folder or archive")
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"cifar10-{key}.npz"
    if cached.is_file():
        with np.load(cached) as z:
            return {s: ImageSet(z[f"{s}_x"], z[f"{s}_y"]) for s in ("train", "test")}
    if source.is_dir() and (source / "data_batch_1").is_file():
        splits = _read_batches_py(source)
    elif source.is_dir() and (source / "cifar-10-batches-py").is_dir():
        splits = _read_batches_py(source / "cifar-10-batches-py")
    elif source.suffix == ".gz" and tarfile.is_tarfile(source):
        splits = _read_tar(source)
    else:
        splits = _read_image_folder(source)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"{s}_x": v.images for s, v in splits.items()}, **{f"{s}_y": v.labels for s, v in splits.items()})
    os.replace(tmp, cached)
    return splits


def train_val_split(train: ImageSet, n_val: int = 5000, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """A fixed, class-balanced random hold-out (``n_val / 10`` images per class)."""
    rng = np.random.default_rng(seed)
    per_class = n_val // len(CLASSES)
    val = np.concatenate([rng.permutation(np.nonzero(train.labels == c)[0])[:per_class]
                          for c in range(len(CLASSES))])
    mask = np.ones(len(train), dtype=bool)
    mask[val] = False
    return train.subset(np.nonzero(mask)[0]), train.subset(np.sort(val))


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC → float32 NCHW, normalised with the CIFAR-10 mean and std."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def augment(images: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """RandomCrop(32, padding 4) + horizontal flip, then :func:`normalize`."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    dy = rng.integers(0, 9, n)
    dx = rng.integers(0, 9, n)
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return normalize(out)


class BatchStream:
    """Endless shuffled mini-batches with augmentation; resumable from (epoch, position)."""

    def __init__(self, data: ImageSet, batch_size: int, seed: int = 0, epoch: int = 0, position: int = 0) -> None:
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.position = epoch, position
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.data))

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position + self.batch_size > len(self.data):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.position:self.position + self.batch_size]
        rng = np.random.default_rng([self.seed, self.epoch, self.position, 1])
        self.position += self.batch_size
        return augment(self.data.images[idx], rng), torch.as_tensor(self.data.labels[idx])


# -- readers -------------------------------------------------------------------------------------

def _read_image_folder(source: Path) -> dict[str, ImageSet]:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        raise GhnOnnxError("reading JPEG/PNG images needs Pillow: pip install pillow") from None

    def decode(data: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    entries: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    if source.is_dir():
        files = [p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
        names = sorted(str(p.relative_to(source)) for p in files)
        read = lambda name: (source / name).read_bytes()  # noqa: E731
        zf = None
    elif zipfile.is_zipfile(source):
        zf = zipfile.ZipFile(source)
        names = sorted(i.filename for i in zf.infolist() if Path(i.filename).suffix.lower() in IMAGE_SUFFIXES)
        read = zf.read
    else:
        raise GhnOnnxError(f"{source}: expected an image folder, a .zip of one, or cifar-10-batches-py")
    for name in names:
        parts = Path(name).parts
        split = next((p for p in parts if p in entries), None)
        label = next((p for p in parts if p in CLASSES), None)
        if split and label:
            entries[split].append((name, label))
    if not entries["train"] or not entries["test"]:
        raise GhnOnnxError(f"{source}: expected train/<class>/*.jpg and test/<class>/*.jpg with the 10 CIFAR-10 classes")
    out = {}
    for split, items in entries.items():
        images = np.stack([decode(read(n)) for n, _ in items])
        if images.shape[1:] != (32, 32, 3):
            raise GhnOnnxError(f"{source}: expected 32x32 RGB images (got {images.shape[1:]})")
        out[split] = ImageSet(images.astype(np.uint8), np.array([CLASSES.index(c) for _, c in items], dtype=np.int64))
    if zf is not None:
        zf.close()
    return out


class _ArraysOnly(pickle.Unpickler):
    """The official batches are pickles: allow only what they contain (dicts, bytes, lists and
    numpy arrays), never arbitrary objects."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise GhnOnnxError(f"refusing to unpickle {module}.{name} from a CIFAR-10 batch file")


def _load_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x), np.asarray(d[b"labels"], dtype=np.int64)


def _from_batches(read) -> dict[str, ImageSet]:
    train = [_load_batch(read(f"data_batch_{i}")) for i in range(1, 6)]
    test = _load_batch(read("test_batch"))
    return {"train": ImageSet(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
            "test": ImageSet(*test)}


def _read_batches_py(folder: Path) -> dict[str, ImageSet]:
    return _from_batches(lambda name: (folder / name).read_bytes())


def _read_tar(path: Path) -> dict[str, ImageSet]:
    with tarfile.open(path) as tf:
        members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        return _from_batches(lambda name: tf.extractfile(members[name]).read())


def _download() -> Path:
    target = cache_dir() / "cifar-10-python.tar.gz"
    if target.is_file():
        return target
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(URL, tmp)
    except OSError as exc:
        raise GhnOnnxError(f"CIFAR-10 not given and the download failed ({exc}); pass --data with an "
                           "image folder or .zip (train/<class>/*.jpg, test/<class>/*.jpg) or the "
                           "cifar-10-batches-py folder") from None
    os.replace(tmp, target)
    return target
