"""What defines a DeepNets-1M-like architecture: a cell genotype plus network-level choices.

An :class:`ArchSpec` is width-free: the channel count ``C`` and the hidden classifier width
``fc_dim`` are chosen separately for every draw (GHN2_FACTS §5.2). Specs are frozen, hashable and
JSON-serialisable; :attr:`ArchSpec.key` hashes the canonical JSON, and is what keeps evaluation
architectures out of training.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from ghn_onnx.training.ops import CELL_OPS

Gene = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Genotype:
    """A DARTS-style cell description shared by every cell of a network.

    Attributes:
        normal: ``(op, input_state)`` pairs, two per step, for normal cells. States 0 and 1 are the
            cell's two inputs; state ``2 + j`` is the output of step ``j`` (the sum of its two ops).
        reduce: the same for reduction cells (stride 2 on ops that read states 0 and 1).
        normal_concat, reduce_concat: the states concatenated into the cell output.
    """

    normal: Gene
    normal_concat: tuple[int, ...]
    reduce: Gene
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for gene, concat in ((self.normal, self.normal_concat), (self.reduce, self.reduce_concat)):
            if not gene or len(gene) % 2:
                raise ValueError(f"Expected two ops per step (got {len(gene)} ops)")
            steps = len(gene) // 2
            for i, (op, state) in enumerate(gene):
                if op not in CELL_OPS:
                    raise ValueError(f"Expected a cell op from {list(CELL_OPS)} (got {op!r})")
                if not 0 <= state < 2 + i // 2:
                    raise ValueError(f"Expected op {i} to read one of states 0..{1 + i // 2} (got {state})")
            if not concat or any(not 2 <= s < 2 + steps for s in concat):
                raise ValueError(f"Expected concat states in 2..{1 + steps} (got {list(concat)})")

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def ops(self) -> list[str]:
        """Every op name of both cell types."""
        return [op for op, _ in self.normal + self.reduce]

    def to_json(self) -> dict[str, Any]:
        return {"normal": [list(g) for g in self.normal], "normal_concat": list(self.normal_concat),
                "reduce": [list(g) for g in self.reduce], "reduce_concat": list(self.reduce_concat)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Genotype":
        return cls(normal=tuple((str(o), int(s)) for o, s in d["normal"]),
                   normal_concat=tuple(int(s) for s in d["normal_concat"]),
                   reduce=tuple((str(o), int(s)) for o, s in d["reduce"]),
                   reduce_concat=tuple(int(s) for s in d["reduce_concat"]))


@dataclass(frozen=True)
class ArchSpec:
    """A network of ``n_cells`` cells sharing one :class:`Genotype` (GHN2_FACTS §5.1).

    Attributes:
        genotype: the cell.
        n_cells: number of cells; cells ``n // 3`` and ``2n // 3`` are reduction cells.
        ks: kernel size of the first stem convolution (3, 5 or 7).
        stem_type: 0 = conv + norm (+ optional max-pool); 1 = the DARTS ImageNet stem (two conv
            blocks, the second with stride 2). Networks with ``msa`` use a ViT patch stem instead.
        stem_pool: 3×3 stride-2 max-pool after stem 0.
        C_mult: channel multiplier at each reduction cell (1 or 2).
        preproc: 1×1 ReLU-Conv-BN (or FactorizedReduce after a reduction) at each cell input.
        glob_avg: global average pooling before the classifier, else a flattening (VGG-style) head.
        norm: ``"bn"`` or ``"none"``.
        fc_layers: classifier depth (1 or 2; the hidden width is the per-draw ``fc_dim``).
    """

    genotype: Genotype
    n_cells: int
    ks: int = 3
    stem_type: int = 0
    stem_pool: bool = False
    C_mult: int = 2
    preproc: bool = True
    glob_avg: bool = True
    norm: str = "bn"
    fc_layers: int = 1

    def __post_init__(self) -> None:
        if self.n_cells < 1:
            raise ValueError(f"Expected at least one cell (got {self.n_cells})")
        if self.stem_type not in (0, 1):
            raise ValueError(f"Expected stem_type 0 or 1 (got {self.stem_type})")
        if self.norm not in ("bn", "none"):
            raise ValueError(f"Expected norm 'bn' or 'none' (got {self.norm!r})")
        if self.fc_layers < 1:
            raise ValueError(f"Expected fc_layers >= 1 (got {self.fc_layers})")
        if self.C_mult < 1:
            raise ValueError(f"Expected C_mult >= 1 (got {self.C_mult})")
        if not self.preproc and (self.steps > 1 or self.C_mult > 1):
            raise ValueError("Expected preproc=True for cells with more than one step or C_mult > 1 "
                             "(cell inputs must be projected to a common width)")
        if self.is_vit and not self.glob_avg:
            raise ValueError("Expected glob_avg=True for a network with msa (ViT-style) cells")

    @property
    def steps(self) -> int:
        return self.genotype.steps

    @property
    def is_vit(self) -> bool:
        """Any ``msa`` op makes a ViT-style network: patch stem, positional encoding, no striding."""
        return "msa" in self.genotype.ops()

    def reduction_cells(self) -> tuple[int, ...]:
        return tuple(sorted({i for i in (self.n_cells // 3, 2 * self.n_cells // 3) if i > 0}))

    def to_json(self) -> dict[str, Any]:
        return {"genotype": self.genotype.to_json(), "n_cells": self.n_cells, "ks": self.ks,
                "stem_type": self.stem_type, "stem_pool": self.stem_pool, "C_mult": self.C_mult,
                "preproc": self.preproc, "glob_avg": self.glob_avg, "norm": self.norm,
                "fc_layers": self.fc_layers}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ArchSpec":
        fields = {k: v for k, v in d.items() if k != "genotype"}
        return cls(genotype=Genotype.from_json(d["genotype"]), **fields)

    def canonical_json(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @property
    def key(self) -> str:
        """sha256 of the canonical JSON (first 20 hex digits): equal iff the specs are equal."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:20]
