"""Sampling DeepNets-1M-like architectures (GHN2_FACTS §5.1) and their per-draw widths (§5.2).

All randomness comes from a caller-supplied :class:`numpy.random.Generator`, so a draw is fully
determined by the generator's seed. The reference samples ops through ``argmax(softmax(1e-3 ·
N(0,1)))``, which is uniform; we sample uniformly directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ghn_onnx.training.network import count_params, plan_network
from ghn_onnx.training.ops import CELL_OPS, POOL_ONLY_OPS
from ghn_onnx.training.spec import ArchSpec, Genotype

#: Width at which parameter limits are checked (the reference generates at C=32, fc_dim=256).
GEN_C = 32
GEN_FC_DIM = 256
#: Per-draw widths (§5.2): C in {32, 48, ..., 128}, fc_dim in {64, 128, ..., 512}.
WIDTHS = tuple(range(32, 129, 16))
FC_DIMS = tuple(range(64, 513, 64))
#: Kernel sizes of the first stem conv.
STEM_KS = (3, 5, 7)
LARGE_CONVS = ("conv_5x5", "conv_7x7")


@dataclass(frozen=True)
class SplitSettings:
    """Generator settings of one DeepNets-1M split (``net_generator.py``)."""

    min_cells: int = 4
    max_cells: int = 18
    deep_thresholds: tuple[int, ...] = (7, 8, 9, 10)  # nets deeper than this get few steps
    min_steps: int = 1
    medium_steps: int = 2
    max_steps: int = 4
    max_params: int = 10 ** 7                          # at GEN_C / GEN_FC_DIM, CIFAR-10
    bn_free: bool = False


SPLITS: dict[str, SplitSettings] = {
    "train": SplitSettings(),
    "test": SplitSettings(),
    "wide": SplitSettings(),  # test architectures, evaluated 4x wider
    "deep": SplitSettings(min_cells=10, max_cells=36, deep_thresholds=(18,), max_params=10 ** 8),
    "dense": SplitSettings(min_steps=2, medium_steps=6, max_steps=10, max_params=10 ** 8),
    "bnfree": SplitSettings(bn_free=True),
}


def split_settings(split: str) -> SplitSettings:
    try:
        return SPLITS[split]
    except KeyError:
        raise ValueError(f"Expected a split from {sorted(SPLITS)} (got {split!r})") from None


def sample_genotype(rng: np.random.Generator, steps: int, only_pool: bool, drop_concat: bool,
                    allow_none: bool) -> Genotype:
    """Each step reads two distinct earlier states through two uniformly drawn ops; normal and
    reduction cells share the concat list (the last step is always concatenated)."""
    normal_ops = [op for op in CELL_OPS if allow_none or op != "none"]
    reduce_ops = [op for op in (POOL_ONLY_OPS if only_pool else CELL_OPS) if allow_none or op != "none"]

    def gene(ops: list[str]) -> tuple[tuple[str, int], ...]:
        out = []
        for j in range(steps):
            for src in rng.choice(2 + j, size=2, replace=False):
                out.append((ops[int(rng.integers(len(ops)))], int(src)))
        return tuple(out)

    normal, reduce = gene(normal_ops), gene(reduce_ops)
    last = steps + 1
    concat = tuple(s for s in range(2, steps + 2) if not drop_concat or s == last or rng.random() > 0.5)
    return Genotype(normal, concat, reduce, concat)


def rejection_reason(spec: ArchSpec, settings: SplitSettings) -> str | None:
    """Why the generator rejects ``spec`` (GHN2_FACTS §5.1), or None if it is accepted."""
    g = spec.genotype
    ops = g.ops()
    has_conv = any("conv" in op for op in ops)
    if "cse" in ops and not has_conv:
        return "cse without any conv"
    for gene in (g.normal, g.reduce):
        cell_ops = [op for op, _ in gene]
        if cell_ops.count("cse") > 1:
            return "more than one cse in a cell type"
        if sum(op in LARGE_CONVS for op in cell_ops) > 1:
            return "more than one conv_5x5/conv_7x7 in a cell type"
    if not (has_conv or "msa" in ops or "cse" in ops):
        return "no conv, msa or cse"
    if not plan_network(spec, GEN_C).valid:
        return "'none' ops disconnect the input from the logits"
    n = count_params_cached(spec)
    if n > settings.max_params:
        return f"{n} parameters > {settings.max_params}"
    return None


@functools.lru_cache(maxsize=65536)
def count_params_cached(spec: ArchSpec) -> int:
    """Parameters at the generation width (C=32, fc_dim=256, 10 classes)."""
    return count_params(spec, GEN_C, GEN_FC_DIM, 10)


def sample_arch(rng: np.random.Generator, split: str = "train") -> ArchSpec:
    """Draw architectures from ``split``'s distribution until one passes the rejection rules."""
    s = split_settings(split)
    while True:
        spec = _draw(rng, s)
        if rejection_reason(spec, s) is None:
            return spec


def _draw(rng: np.random.Generator, s: SplitSettings) -> ArchSpec:
    n_cells = int(rng.integers(s.min_cells, s.max_cells + 1))
    deep = int(rng.choice(s.deep_thresholds))
    steps = int(rng.integers(s.min_steps, (s.max_steps if n_cells <= deep else s.medium_steps) + 1))
    genotype = sample_genotype(rng, steps, only_pool=bool(rng.random() > 0.5),
                               drop_concat=bool(rng.random() > 0.5) if steps > 1 else False,
                               allow_none=steps > 1)
    ks = int(rng.choice(STEM_KS))
    vit = "msa" in genotype.ops()
    C_mult = int(rng.choice((1, 2)))
    if steps > 1 or C_mult > 1:
        preproc = True
    else:
        preproc = bool(not vit or rng.random() > 0.8)
    glob_avg = bool(vit or n_cells > deep or rng.random() > 0.1)
    if s.bn_free:
        norm = "none"
    elif n_cells <= s.min_cells + 1 and steps <= s.medium_steps:
        norm = "bn" if rng.random() < 0.5 else "none"
    else:
        norm = "bn"
    stem_type = int(rng.choice((0, 1)))
    stem_pool = bool(stem_type == 0 and rng.random() > 0.5)
    fc_layers = int(rng.integers(1, 3))
    if vit:  # the patch stem ignores these: fix them so equal networks hash equal
        ks, stem_type, stem_pool = 3, 0, False
    return ArchSpec(genotype=genotype, n_cells=n_cells, ks=ks, stem_type=stem_type, stem_pool=stem_pool,
                    C_mult=C_mult, preproc=preproc, glob_avg=glob_avg, norm=norm, fc_layers=fc_layers)


def sample_width(rng: np.random.Generator, spec: ArchSpec) -> tuple[int, int]:
    """``(C, fc_dim)`` for one training draw of ``spec`` (GHN2_FACTS §5.2).

    Big nets stay narrow: more than 0.8M parameters (at C=32), a flatten head, any conv_5x5 or
    conv_7x7, or more than 12 cells → C=32; more than 0.4M or 10 cells → C in {32, 48}; more than
    0.2M or 8 cells → C in {32, 48, 64}; otherwise any C in {32..128}. fc_dim in {64..256}, or
    {64..512} for the smallest tier when C <= 64.
    """
    millions = count_params_cached(spec) / 1e6
    large_conv = any(op in LARGE_CONVS for op in spec.genotype.ops())
    fc_dim = FC_DIMS[int(rng.integers(4))]
    if millions > 0.8 or not spec.glob_avg or large_conv or spec.n_cells > 12:
        C = WIDTHS[0]
    elif millions > 0.4 or spec.n_cells > 10:
        C = WIDTHS[int(rng.integers(2))]
    elif millions > 0.2 or spec.n_cells > 8:
        C = WIDTHS[int(rng.integers(3))]
    else:
        C = WIDTHS[int(rng.integers(len(WIDTHS)))]
        if C <= 64:
            fc_dim = FC_DIMS[int(rng.integers(len(FC_DIMS)))]
    return C, fc_dim
