"""GHN hyperparameters: one frozen dataclass, saved beside every checkpoint."""

from __future__ import annotations

import dataclasses
import json
import numbers
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
# The range of each integer field: wide enough for every published GHN-2 / GHN-3 size (hid 32-384,
# blocks up to 64 x 64 x 16 x 16, ImageNet-21k's classes), narrow enough that a checkpoint
# header cannot ask for a network that does not fit in memory before its tensors are compared
# with the file's.
INT_RANGES = {"hid": (4, 1024), "num_classes": (1, 100_000), "ve_cutoff": (1, 10_000)}
CHANNEL_RANGE = (1, 1024)  # max_shape[0], max_shape[1]
SPATIAL_RANGE = (1, 64)  # max_shape[2] == max_shape[3]
BOOL_FIELDS = ("weight_norm", "ve", "layernorm")


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
        """Check every field's type and range (:data:`INT_RANGES`, :data:`CHANNEL_RANGE`,
        :data:`SPATIAL_RANGE`); raise :class:`CheckpointError` naming the first bad one."""
        shape = self.max_shape
        if (not isinstance(shape, tuple) or len(shape) != 4 or not all(_is_int(v) for v in shape)
                or shape[2] != shape[3]):
            raise CheckpointError(f"GHN config max_shape: expected 4 integers (out, in, s, s) (got {shape!r})")
        for v, (lo, hi), what in ((shape[0], CHANNEL_RANGE, "out"), (shape[1], CHANNEL_RANGE, "in"),
                                  (shape[2], SPATIAL_RANGE, "s")):
            if not lo <= v <= hi:
                raise CheckpointError(f"GHN config max_shape: expected {what} in [{lo}, {hi}] (got {shape!r})")
        for name, (lo, hi) in INT_RANGES.items():
            v = getattr(self, name)
            if not _is_int(v) or not lo <= v <= hi:
                raise CheckpointError(f"GHN config {name}: expected an integer in [{lo}, {hi}] (got {v!r})")
        if self.hid % 4:
            raise CheckpointError(f"GHN config hid: expected a multiple of 4, the shape encoder's four "
                                  f"embeddings (got {self.hid})")
        for name in BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise CheckpointError(f"GHN config {name}: expected true or false (got {v!r})")

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
        if not isinstance(d, dict):
            raise CheckpointError(f"GHN config: expected a JSON object (got {type(d).__name__})")
        d = dict(d)
        for key, only in LEGACY_KEYS.items():
            got = d.pop(key, only)
            if got != only:
                raise CheckpointError(f"GHN config {key!r}: only {only!r} is implemented (got {got!r})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(map(str, set(d) - known))
        if unknown:
            raise CheckpointError(f"unknown GHN config keys: {', '.join(unknown)}")
        if isinstance(d.get("max_shape"), list):  # JSON has no tuples; the elements are checked as given
            d["max_shape"] = tuple(d["max_shape"])
        return cls(**d)


def _is_int(v: Any) -> bool:
    """An integer, not a bool (JSON ``true`` is not a size)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
