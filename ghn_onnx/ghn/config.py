"""GHN hyperparameters: one frozen dataclass, saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ghn_onnx.errors import CheckpointError

# Keys of configs saved by earlier versions, with the only value each could hold.
LEGACY_KEYS = {"hypernet": "gatedgnn", "decoder": "conv"}


@dataclass(frozen=True)
class GHNConfig:
    """GHN-2 configuration (GHN2_FACTS §9; the CIFAR-10 defaults of the released GHN-2).

    Attributes:
        max_shape: the decoded block ``(out, in, s, s)``; s = 11 for CIFAR-10, 16 for ImageNet.
        num_classes: rows of the classifier heads.
        hid: node state size.
        weight_norm: apply the parameter normalisation of §4.6 (GHN-2's ``-n``).
        ve: use virtual edges up to ``ve_cutoff`` (GHN-2's ``-v 50``).
        layernorm: LayerNorm on the final node states before decoding (GHN-2's ``--ln``).
    """

    max_shape: tuple[int, int, int, int] = (64, 64, 11, 11)
    num_classes: int = 10
    hid: int = 32
    weight_norm: bool = True
    ve: bool = True
    layernorm: bool = True
    ve_cutoff: int = 50

    def __post_init__(self) -> None:
        if len(self.max_shape) != 4 or self.max_shape[2] != self.max_shape[3]:
            raise CheckpointError(f"max_shape must be (out, in, s, s) (got {self.max_shape})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GHNConfig":
        """The config saved by :meth:`to_json`. Checkpoints written before the single-valued
        ``hypernet`` / ``decoder`` fields were dropped still load: those keys are ignored when
        they hold the one value there ever was, and refused otherwise."""
        d = dict(d)
        for key, only in LEGACY_KEYS.items():
            got = d.pop(key, only)
            if got != only:
                raise CheckpointError(f"GHN config {key!r}: only {only!r} is implemented (got {got!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"unknown GHN config keys: {', '.join(unknown)}")
        if "max_shape" in d:
            d["max_shape"] = tuple(int(v) for v in d["max_shape"])
        return cls(**d)
