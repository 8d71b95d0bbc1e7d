"""Node shape features: four embedding lookups (out-channels, in-channels, kh, kw).

GHN2_FACTS §1.5: values outside the vocabularies map to the nearest listed value (ties to the
lower one), except channels 4-7 → 8 and spatial 2 → 3; shape-free nodes use a last "dummy" row.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ghn_onnx.graph.graph import Shape


def channel_vocabulary(num_classes: int) -> np.ndarray:
    values = [1, 3, num_classes, *range(8, 64, 8), *range(64, 4096, 16), *range(4096, 8193, 32)]
    return np.unique(values)


def spatial_vocabulary(s: int) -> np.ndarray:
    return np.unique([*range(1, max(12, s), 2), 14, 16])


def _nearest(vocab: np.ndarray, value: int) -> int:
    # argmin takes the first minimum: ties go to the lower (earlier) value.
    return int(np.argmin(np.abs(vocab - value)))


class ShapeEncoder(nn.Module):
    """``shape_ind (N, 4)`` → ``(N, hid)``: concatenated channel and spatial embeddings."""

    def __init__(self, hid: int, num_classes: int, s: int) -> None:
        super().__init__()
        self.channels = channel_vocabulary(num_classes)
        self.spatial = spatial_vocabulary(s)
        self.embed_channel = nn.Embedding(len(self.channels) + 1, hid // 4)
        self.embed_spatial = nn.Embedding(len(self.spatial) + 1, hid // 4)
        self._cache: dict[Shape | None, tuple[int, int, int, int]] = {}

    def vocabulary_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What :meth:`indices` depends on: the two vocabularies."""
        return tuple(int(c) for c in self.channels), tuple(int(k) for k in self.spatial)

    def indices(self, shape4d: Shape | None) -> tuple[int, int, int, int]:
        """Vocabulary rows for one node's 4-D shape (``None`` → the dummy rows)."""
        if shape4d in self._cache:
            return self._cache[shape4d]
        if shape4d is None:
            ind = (len(self.channels),) * 2 + (len(self.spatial),) * 2
        else:
            ind = tuple(self._channel(c) for c in shape4d[:2]) + tuple(self._spatial(k) for k in shape4d[2:])
        self._cache[shape4d] = ind
        return ind

    def _channel(self, c: int) -> int:
        if 4 <= c <= 7:
            c = 8
        return _nearest(self.channels, min(c, 8192))

    def _spatial(self, k: int) -> int:
        if k == 2:
            k = 3
        return _nearest(self.spatial, min(k, int(self.spatial[-1])))

    def forward(self, shape_ind: torch.Tensor) -> torch.Tensor:
        ch = self.embed_channel(shape_ind[:, :2])  # (N, 2, hid/4)
        sp = self.embed_spatial(shape_ind[:, 2:])  # (N, 2, hid/4)
        return torch.cat([ch, sp], dim=1).flatten(1)  # (N, hid)
