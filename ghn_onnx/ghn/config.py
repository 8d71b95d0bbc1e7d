"""GHN hyperparameters: one frozen dataclass, saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ghn_onnx.errors import CheckpointError

# Keys of configs saved by earlier versions, with the only value each could hold.
LEGACY_KEYS = {"decoder": "conv"}
# The string fields and their choices: the message-passing network (GHN-2's gated GNN, GHN-3's
# graph transformer) and the named set of graph and decoding rules (GHN-2's or GHN-3's).
CHOICES = {"hypernet": ("gatedgnn", "transformer"), "rules": ("ghn2", "ghn3")}
# The transformer's sizes, and the distances its edge table covers (257 rows, read at d + 2).
TRANSFORMER_RANGES = {"layers": (1, 64), "heads": (1, 64)}
TRANSFORMER_MAX_CUTOFF = 254


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
        hypernet: ``"gatedgnn"`` (GHN-2) or ``"transformer"`` (GHN-3; ``layers``, ``heads``).
        layers, heads: the transformer's layers and attention heads (GHN-3-T: 3 and 8; unused by
            the gated GNN).
        rules: the graph and decoding rule set, ``"ghn2"`` or ``"ghn3"`` (see
            :mod:`ghn_onnx.convert.rules` and :mod:`ghn_onnx.ghn.decode.rules`).
    """

    max_shape: tuple[int, int, int, int] = (64, 64, 11, 11)
    num_classes: int = 10
    hid: int = 32
    weight_norm: bool = True
    ve: bool = True
    layernorm: bool = True
    ve_cutoff: int = 50
    hypernet: str = "gatedgnn"
    layers: int = 3
    heads: int = 8
    rules: str = "ghn2"

    def __post_init__(self) -> None:
        if len(self.max_shape) != 4 or self.max_shape[2] != self.max_shape[3]:
            raise CheckpointError(f"max_shape must be (out, in, s, s) (got {self.max_shape})")

        self._check_ghn3_fields()

    def _check_ghn3_fields(self) -> None:
        """``hypernet`` and ``rules`` among :data:`CHOICES`; the transformer's sizes in
        :data:`TRANSFORMER_RANGES`, ``heads`` dividing ``hid``, its cut-off in its edge table."""
        for name, choices in CHOICES.items():
            v = getattr(self, name)
            if not isinstance(v, str) or v not in choices:
                raise CheckpointError(f"GHN config {name}: expected one of {', '.join(choices)} (got {v!r})")
        for name, (lo, hi) in TRANSFORMER_RANGES.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise CheckpointError(f"GHN config {name}: expected an integer in [{lo}, {hi}] (got {v!r})")
        if self.hypernet == "transformer":
            if self.hid % self.heads:
                raise CheckpointError(f"GHN config heads: expected a divisor of hid {self.hid} (got {self.heads})")
            if self.ve_cutoff > TRANSFORMER_MAX_CUTOFF:
                raise CheckpointError(f"GHN config ve_cutoff: expected at most {TRANSFORMER_MAX_CUTOFF} for the "
                                      f"transformer's edge table (got {self.ve_cutoff})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GHNConfig":
        """The config saved by :meth:`to_json`. Checkpoints written before the single-valued
        ``decoder`` field was dropped still load: that key is ignored when it holds the one value
        there ever was, and refused otherwise. ``hypernet`` is a field again: older files hold
        ``"gatedgnn"``, its default; files without the GHN-3 fields get GHN-2's values."""
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
