"""An :class:`~ghn_onnx.training.spec.ArchSpec` at a given width → a PyTorch network.

The network follows the DeepNets-1M construction (GHN2_FACTS §5.1): a stem, ``n_cells`` cells
each reading the outputs of the two cells before it, reductions at cells ``n // 3`` and ``2n // 3``,
and a classifier head. Parameter names follow the reference (``stem.0.weight``,
``cells.4._ops.0.op.1.weight``, ``cells.5.preprocess0.conv_1.weight``, ``classifier.0.weight``).

``none`` ops make parts of a network dead: a state whose ops are all ``none`` is absent, and an
op or preprocessing layer whose output reaches no logit contributes nothing. The reference prunes
such layers after building its graph (their weights become ``None``). :func:`plan_network` finds
them up front and :func:`build_net` never creates them, so every parameter of a built network
is used by its forward pass and appears in its graph. A network whose logits do not depend on
the input at all is invalid (the generator rejects it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from ghn_onnx.training.ops import FactorizedReduce, NormFactory, PosEnc, ReLUConvBN, Subsample, make_op, norm_factory
from ghn_onnx.training.spec import ArchSpec

#: CIFAR input side; the flatten head and the ViT positional encoding assume it.
IMAGE_SIZE = 32
#: The ViT patch stem: 3×3 patches with stride 3 and padding 1 turn 32×32 into 11×11 tokens.
VIT_PATCH = 3
VIT_TOKENS_SIDE = 11


@dataclass(frozen=True)
class CellPlan:
    """Which parts of one cell are computed.

    Attributes:
        reduction, reduction_prev: this cell / the previous one halves the resolution.
        c_prev_prev, c_prev: channels of the cell's two inputs.
        c_out: channels of each step output; the cell outputs ``len(concat) * c_out``.
        gene, concat: the cell type's ops and concatenated states.
        live_ops: indices into ``gene`` of the ops that contribute to the logits.
        live_states: states (0, 1 = inputs, 2 + j = steps) that are computed.
        zero_states: concatenated states that are absent (filled with zeros of the right shape).
    """

    reduction: bool
    reduction_prev: bool
    c_prev_prev: int
    c_prev: int
    c_out: int
    gene: tuple[tuple[str, int], ...]
    concat: tuple[int, ...]
    live_ops: frozenset[int]
    live_states: frozenset[int]
    zero_states: frozenset[int]

    @property
    def is_live(self) -> bool:
        return bool(self.live_states)


@dataclass(frozen=True)
class NetworkPlan:
    """Channel counts and liveness for every cell.

    Attributes:
        valid: False when the input reaches no logit ('none' ops disconnect it).
        c_stem: the stem's output channels; ``c_head`` the classifier's input width (after global
            pooling or flattening).
        stem1_live: the second block of the DARTS stem (``stem_type == 1``) is read by a cell.
    """

    cells: tuple[CellPlan, ...]
    c_stem: int
    c_head: int
    valid: bool
    stem1_live: bool


def plan_network(spec: ArchSpec, C: int) -> NetworkPlan:
    """Channel bookkeeping (as the reference ``Network``) and a forward/backward liveness pass."""
    reductions = set(spec.reduction_cells())
    vit = spec.is_vit
    c_stem = 3 * C if (spec.stem_type == 0 and spec.preproc and not vit) else C
    c_pp = c_p = c_stem
    c_curr = C
    reduction_prev = spec.stem_type == 1 and not vit
    shapes = []
    for i in range(spec.n_cells):
        reduction = i in reductions
        if reduction:
            c_curr *= spec.C_mult
        gene, concat = ((spec.genotype.reduce, spec.genotype.reduce_concat) if reduction
                        else (spec.genotype.normal, spec.genotype.normal_concat))
        shapes.append((reduction, reduction_prev, c_pp, c_p, c_curr, gene, concat))
        reduction_prev = reduction
        c_pp, c_p = c_p, len(concat) * c_curr

    # Forward: which states exist. Both stem outputs always do.
    out_avail = {-2: True, -1: True}
    avail_states: list[set[int]] = []
    for i, (_, _, _, _, _, gene, concat) in enumerate(shapes):
        avail = {s for s, ok in ((0, out_avail[i - 2]), (1, out_avail[i - 1])) if ok}
        for j in range(len(gene) // 2):
            if any(op != "none" and src in avail for op, src in gene[2 * j: 2 * j + 2]):
                avail.add(2 + j)
        avail_states.append(avail)
        out_avail[i] = any(s in avail for s in concat)

    # Backward: which ops and states the logits depend on.
    n = spec.n_cells
    needed_out = {n - 1: out_avail[n - 1]}
    cells: list[CellPlan] = []
    for i in reversed(range(n)):
        reduction, reduction_prev, c_pp_i, c_p_i, c_out, gene, concat = shapes[i]
        avail = avail_states[i]
        needed: set[int] = set()
        live_ops: set[int] = set()
        if needed_out.get(i, False):
            needed.update(s for s in concat if s in avail)
            for j in reversed(range(len(gene) // 2)):
                if 2 + j not in needed:
                    continue
                for k in (2 * j, 2 * j + 1):
                    op, src = gene[k]
                    if op != "none" and src in avail:
                        live_ops.add(k)
                        needed.add(src)
        if 0 in needed:
            needed_out[i - 2] = True
        if 1 in needed:
            needed_out[i - 1] = True
        zero = {s for s in concat if s not in avail} if needed else set()
        cells.append(CellPlan(reduction, reduction_prev, c_pp_i, c_p_i, c_out, gene, concat,
                              frozenset(live_ops), frozenset(needed), frozenset(zero)))
    cells.reverse()

    c_head = c_p
    if not spec.glob_avg:
        side = IMAGE_SIZE // (2 if (spec.stem_type == 1 or spec.stem_pool) else 1) // 2 ** len(reductions)
        c_head *= side ** 2
    # Cell i reads the outputs of cells i-2 and i-1; "cells" -2 and -1 are the stem (stem0 and
    # stem1 for the DARTS stem), and every state that exists derives from the input.
    return NetworkPlan(tuple(cells), c_stem, c_head, valid=bool(out_avail[n - 1]),
                       stem1_live=bool(needed_out.get(-1, False)))


class Cell(nn.Module):
    """One DARTS cell: preprocess both inputs, compute each step as the sum of its live ops,
    concatenate the chosen states. Dead ops are absent from ``_ops`` (a ModuleDict keyed by the
    op's index in the genotype, so names match the reference's ``_ops.<i>``)."""

    def __init__(self, plan: CellPlan, spec: ArchSpec, norm: NormFactory) -> None:
        super().__init__()
        self.plan = plan
        vit = spec.is_vit
        c_in = plan.c_out if spec.preproc else plan.c_prev
        if 0 in plan.live_states:
            if spec.preproc:
                self.preprocess0 = (FactorizedReduce(plan.c_prev_prev, plan.c_out, norm)
                                    if plan.reduction_prev and not vit else
                                    ReLUConvBN(plan.c_prev_prev, plan.c_out, 1, 1, norm))
            else:
                self.preprocess0 = Subsample() if plan.reduction_prev and not vit else nn.Identity()
        if 1 in plan.live_states:
            self.preprocess1 = ReLUConvBN(plan.c_prev, plan.c_out, 1, 1, norm) if spec.preproc else nn.Identity()
        self._ops = nn.ModuleDict()
        for k in sorted(plan.live_ops):
            op, src = plan.gene[k]
            stride = 2 if (plan.reduction and src < 2 and not vit) else 1
            self._ops[str(k)] = make_op(op, c_in if src < 2 else plan.c_out, plan.c_out, stride, norm)

    def forward(self, s0: torch.Tensor | None, s1: torch.Tensor | None) -> torch.Tensor:
        plan = self.plan
        states: dict[int, torch.Tensor] = {}
        if 0 in plan.live_states:
            states[0] = self.preprocess0(s0)
        if 1 in plan.live_states:
            states[1] = self.preprocess1(s1)
        for j in range(len(plan.gene) // 2):
            if 2 + j not in plan.live_states:
                continue
            terms = [self._ops[str(k)](states[plan.gene[k][1]]) for k in (2 * j, 2 * j + 1)
                     if k in plan.live_ops]
            states[2 + j] = terms[0] if len(terms) == 1 else terms[0] + terms[1]
        like = next(states[s] for s in plan.concat if s in states)
        return torch.cat([states[s] if s in states else torch.zeros_like(like) for s in plan.concat], dim=1)


class Network(nn.Module):
    """A DeepNets-1M network; ``forward`` returns the logits ``(B, num_classes)``."""

    def __init__(self, spec: ArchSpec, C: int, fc_dim: int, num_classes: int = 10,
                 track_running_stats: bool = False) -> None:
        super().__init__()
        plan = plan_network(spec, C)
        if not plan.valid:
            raise ValueError(f"invalid architecture {spec.key}: 'none' ops disconnect the input from the logits")
        self.spec = spec
        self.plan = plan
        norm = norm_factory(spec.norm, track_running_stats)
        if spec.is_vit:
            self.stem0 = nn.Conv2d(3, C, VIT_PATCH, stride=VIT_PATCH, padding=1, bias=False)
            self.pos_enc = PosEnc(C, VIT_TOKENS_SIDE)
        elif spec.stem_type == 0:
            self.stem = nn.Sequential(
                nn.Conv2d(3, plan.c_stem, spec.ks, padding=spec.ks // 2, bias=False),
                norm(plan.c_stem),
                nn.MaxPool2d(3, stride=2, padding=1) if spec.stem_pool else nn.Identity(),
            )
        else:
            self.stem0 = nn.Sequential(
                nn.Conv2d(3, C // 2, spec.ks, padding=spec.ks // 2, bias=False), norm(C // 2), nn.ReLU(),
                nn.Conv2d(C // 2, C, 3, padding=1, bias=False), norm(C))
            if plan.stem1_live:
                self.stem1 = nn.Sequential(nn.ReLU(), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), norm(C))
        self.cells = nn.ModuleList(Cell(c, spec, norm) for c in plan.cells)
        self.global_pooling = nn.AdaptiveAvgPool2d(1) if spec.glob_avg else None
        fc: list[nn.Module] = [nn.Linear(plan.c_head, fc_dim if spec.fc_layers > 1 else num_classes)]
        for i in range(spec.fc_layers - 1):
            last = i == spec.fc_layers - 2
            fc += [nn.ReLU(), nn.Dropout(0.5), nn.Linear(fc_dim, num_classes if last else fc_dim)]
        self.classifier = nn.Sequential(*fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_vit:
            s0 = s1 = self.pos_enc(self.stem0(x))
        elif self.spec.stem_type == 0:
            s0 = s1 = self.stem(x)
        else:
            s0 = self.stem0(x)
            s1 = self.stem1(s0) if hasattr(self, "stem1") else None
        for cell in self.cells:
            out = cell(s0, s1) if cell.plan.is_live else None
            s0, s1 = s1, out
        out = self.global_pooling(s1) if self.global_pooling is not None else s1
        return self.classifier(out.reshape(out.shape[0], -1))


def build_net(spec: ArchSpec, C: int, fc_dim: int, num_classes: int = 10, *,
              track_running_stats: bool = False, device: torch.device | str | None = None) -> Network:
    """The network of ``spec`` at width ``C`` (and hidden classifier width ``fc_dim``).

    Args:
        track_running_stats: BatchNorm keeps running statistics. DeepNets use batch statistics
            only (False, the default); ONNX exports need True so that eval-mode export emits
            ``BatchNormalization`` nodes (the parameter names and shapes do not change).
        device: where to allocate parameters; ``"meta"`` builds the structure without memory or
            initialisation cost (for counting parameters).
    """
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Network(spec, C, fc_dim, num_classes, track_running_stats)


def count_params(spec: ArchSpec, C: int = 32, fc_dim: int = 256, num_classes: int = 10) -> int:
    """Trainable parameters of ``build_net(spec, C, fc_dim, num_classes)``, computed from the plan
    (about 100x faster than building the module; a test checks the two agree)."""
    plan = plan_network(spec, C)
    bn = spec.norm == "bn"
    nb = (lambda c: 2 * c) if bn else (lambda c: 0)
    if spec.is_vit:
        total = 3 * C * VIT_PATCH ** 2 + C * VIT_TOKENS_SIDE ** 2
    elif spec.stem_type == 0:
        total = 3 * plan.c_stem * spec.ks ** 2 + nb(plan.c_stem)
    else:
        total = 3 * (C // 2) * spec.ks ** 2 + nb(C // 2) + (C // 2) * C * 9 + nb(C)
        total += C * C * 9 + nb(C) if plan.stem1_live else 0
    for cell in plan.cells:
        c_in = cell.c_out if spec.preproc else cell.c_prev
        if spec.preproc and 0 in cell.live_states:
            total += cell.c_prev_prev * cell.c_out + nb(cell.c_out)  # 1x1 conv or 2 half-width 1x1 convs
        if spec.preproc and 1 in cell.live_states:
            total += cell.c_prev * cell.c_out + nb(cell.c_out)
        for k in cell.live_ops:
            op, src = cell.gene[k]
            stride = 2 if (cell.reduction and src < 2 and not spec.is_vit) else 1
            total += _op_params(op, c_in if src < 2 else cell.c_out, cell.c_out, stride, nb)
    fc = [plan.c_head] + [fc_dim] * (spec.fc_layers - 1) + [num_classes]
    total += sum(a * b + b for a, b in zip(fc[:-1], fc[1:]))
    return total


def _op_params(op: str, ci: int, co: int, stride: int, nb) -> int:
    if op in ("none", "max_pool_3x3", "avg_pool_3x3"):
        return 0
    if op == "skip_connect":
        return 0 if stride == 1 else ci * co + nb(co)
    kind, _, size = op.partition("_")
    if op == "conv_7x1_1x7":
        return ci * ci * 7 + ci * co * 7 + nb(co)
    if kind == "conv":
        k = int(size.split("x")[0])
        return ci * co * k * k + nb(co)
    if kind == "sep":  # sep_conv_KxK
        k = int(op[-1])
        return 2 * ci * k * k + ci * ci + nb(ci) + ci * co + nb(co)
    if kind == "dil":
        k = int(op[-1])
        return ci * k * k + ci * co + nb(co)
    if op == "cse":
        h = ci // 2
        return 2 * ci * h + h + ci
    if op == "msa":
        return 4 * ci + 3 * ci * ci + 3 * (ci * ci + ci)
    raise ValueError(f"Expected a cell op (got {op!r})")
