r"""Decoding straight into one flat buffer: the inference path of :meth:`GHN.decode`.

Same values as the per-tensor path, in three stages:

1. **plan** (:func:`decode_plan`, a plan of the batch: :meth:`GraphBatch.plan`): which nodes
   are decoded together (:func:`~ghn_onnx.ghn.decode.rules.weight_block`), where each node's
   block goes in a source buffer, and each predicted tensor's :class:`StoreMeta`;
2. **sources** (:func:`decode_sources`, PyTorch): per group of nodes with the same kernel taps,
   the template ``fc`` rows of those taps and the channel MLP as two matrix products over all
   taps at once, keeping only the ``min(out, 64) × min(in, 64)`` outputs of its last layer that
   tiling reads; then the classifier heads and the 1-D rows, already normalised
   (:func:`~ghn_onnx.ghn.decode.parameters.normalize_scale`, ``normalize_bias``: elementwise, so the
   small rows can be normalised before tiling);
3. **store**: one call writes every tensor, tiled and scaled, into the flat output. For tensor
   ``t`` of target shape ``(T0, T1, T2, T3)`` (rank padded with 1s)

.. math::
    \mathrm{out}_t[o, i, y, x] = f_t \cdot \mathrm{src}[o \bmod P_0,\ i \bmod P_1,\
    y \bmod P_2,\ x \bmod P_3], \qquad P_d = \min(B_d, T_d),

which is :func:`~ghn_onnx.ghn.decode.parameters.tile` (slice to the target, repeat the whole block, chop;
spatial taps from the window :func:`~ghn_onnx.ghn.decode.rules.decoded_taps` names), and ``f_t`` the
weight normalisation ``weight_scale(target)``
(1 for positional encodings, 1-D tensors, and without ``weight_norm``). The stores of
:mod:`~ghn_onnx.ghn.decode.stores` implement it: the numba loop of
:mod:`~ghn_onnx.ghn.decode.numba_store` on CPU and the Triton kernel of
:mod:`~ghn_onnx.ghn.decode.triton_store` on CUDA.

Why: a batch of DeepNets graphs has ~130 tensors per graph, mostly small, and one to three
PyTorch ops per tensor cost more than the values; a ResNet-50 has 94 MB of tiled output, and
writing it once, into one buffer, is the bound.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghn_onnx.ghn.decode.decoder import ConvDecoder
from ghn_onnx.ghn.decode.parameters import interpolate_taps, tile_periods, tokens_with_class_token, weight_scale
from ghn_onnx.ghn.decode.rules import (BIAS_CLASS, BIAS_ROW, DECODER_1D, ROW_NORMALIZERS, SCALE_ROW, DecodeSpec,
                                       VectorRow, WeightBlock, as_tokens, classifier_nodes, interpolated, is_weight,
                                       vector_row, weight_block, weight_normalized)
from ghn_onnx.graph.batch import GraphBatch
from ghn_onnx.graph.graph import Node

T = TypeVar("T")

# Decode at most this many kernel taps at once: bounds memory for big batches (~64 MB fp32).
TAPS_PER_CHUNK = 4096


@dataclass(frozen=True)
class StoreMeta:
    """How a store writes each predicted tensor ``t``, as 4-D (rank padded with 1s; a 1-D
    target laid out as ``(1, C, 1, 1)``), on the plan's device:
    ``out[out_off + flat index of (o, i, y, x)] = scale · src[src_off + Σ_d (k_d mod period_d) · stride_d]``.

    Attributes:
        src_off: ``(T,)`` int64, where the tensor's block starts in the source buffer.
        stride: ``(T, 4)`` int64, the block's strides there, axes ``(o, i, y, x)``.
        period: ``(T, 4)`` int64, ``P_d = min(B_d, T_d)`` (:func:`~ghn_onnx.ghn.decode.parameters.tile_periods`).
        dim: ``(T, 4)`` int64, the target's dims.
        out_off: ``(T,)`` int64, where the tensor starts in the flat output.
        scale: ``(T,)`` fp32, the weight-normalisation factor ``f_t``.
    """

    src_off: torch.Tensor
    stride: torch.Tensor
    period: torch.Tensor
    dim: torch.Tensor
    out_off: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return len(self.src_off)


@dataclass(frozen=True)
class WeightGroup:
    """Nodes decoded together (one :class:`~ghn_onnx.ghn.decode.rules.WeightBlock`). A member's
    block is ``(kh, kw, rows, cols)`` (classifier: ``(classes, cols)``), contiguous, at
    ``src_off + member · block_numel``."""

    block: WeightBlock
    nodes: torch.Tensor  # (n,) global node ids
    src_off: int
    block_numel: int


@dataclass(frozen=True)
class TapPass:
    """Nodes whose template and hidden layer are computed together (same ``kh × kw`` taps from
    ``(y0, x0)``, at most ``TAPS_PER_CHUNK`` taps in all), and the runs of them that belong to
    each group: ``(group, first member, count, first row in the pass)``."""

    kh: int
    kw: int
    nodes: torch.Tensor
    parts: tuple[tuple[WeightGroup, int, int, int], ...]
    y0: int = 0
    x0: int = 0


@dataclass(frozen=True)
class Reshaped:
    """A member block that GHN-3 reshapes before tiling (:func:`~ghn_onnx.ghn.decode.rules.as_tokens`,
    :func:`~ghn_onnx.ghn.decode.rules.interpolated`), written at ``dst`` in the source buffer.

    Attributes:
        kind: ``"tokens"`` (``(1 + kh·kw, cols)``: a class token, then the block's taps) or
            ``"interpolate"`` (``(rows, cols, KH, KW)``, resized bilinearly).
        src: where the member's ``(kh, kw, rows, cols)`` block is.
        block: ``(kh, kw, rows, cols)``.
        size: ``(KH, KW)`` for ``"interpolate"``.
        dst: where the reshaped block goes.
    """

    kind: str
    src: int
    block: tuple[int, int, int, int]
    size: tuple[int, int]
    dst: int


@dataclass(frozen=True)
class DecodePlan:
    """Everything about a batch's decoding that does not depend on the node states.

    Attributes:
        spec: the decoding configuration it was built for.
        device: where its tensors live (node ids, store metadata).
        index: ``(graph, tensor name, offset, canonical shape)`` per predicted tensor, graph by
            graph in node order; tensor ``k`` is ``flat[offset : offset + numel].view(shape)``.
        total: elements of the flat output.
        groups: the weight groups and where their blocks go in the source buffer.
        passes: the groups' members in passes over the decoder (see :class:`TapPass`).
        vec_nodes: ``(n_v,)`` nodes decoded by ``decoder_1d`` (rows at ``vec_off``, ``(n_v, 2, 64)``).
        cls_vec: ``(n_c,)`` positions in ``vec_nodes`` of classifier biases (``bias_class`` rows at
            ``cls_off``, ``(n_c, 2, num_classes)``).
        src_numel: elements of the fp32 source buffer.
        meta: the stores' per-tensor :class:`StoreMeta`.
        reshaped: GHN-3's reshaped blocks (:class:`Reshaped`), after the ``bias_class`` rows.
    """

    spec: DecodeSpec
    device: torch.device
    index: list[tuple[int, str, int, tuple[int, ...]]]
    total: int
    groups: list[WeightGroup]
    passes: list[TapPass]
    vec_nodes: torch.Tensor
    vec_off: int
    cls_vec: torch.Tensor
    cls_off: int
    src_numel: int
    meta: StoreMeta
    reshaped: tuple[Reshaped, ...] = ()
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key: tuple, build: Callable[[], T]) -> T:
        """``build()``, built on first use and kept with the plan (which the batch owns): what a
        store derives from the plan once (work lists, program tables), keyed by store and options."""
        found = self._derived.get(key)
        if found is None:
            found = self._derived[key] = build()
        return found


def decode_plan(batch: GraphBatch, spec: DecodeSpec, device: torch.device | str) -> DecodePlan:
    """The :class:`DecodePlan` of ``batch`` for ``spec`` on ``device``: one plan of the batch
    (:meth:`GraphBatch.plan`), built once (it depends on the graphs only)."""
    return batch.plan(build_plan, torch.device(device), (spec,))


@dataclass
class _Entry:
    """One predicted tensor while planning: where its source lies and how it is stored."""

    source: tuple  # ("w", WeightBlock, member) | (head, vector node or classifier bias, row)
    block: tuple[int, ...]  # the source block's dims, in the target's axis order
    strides: tuple[int, ...]  # and their strides in the source buffer
    target: tuple[int, ...]  # canonical shape
    scale: float  # weight-normalisation factor


def build_plan(batch: GraphBatch, device: torch.device, spec: DecodeSpec) -> DecodePlan:
    """The :class:`DecodePlan` (use :func:`decode_plan`, which keeps it with the batch)."""
    out_ch = spec.max_shape[0]
    index, entries, total = [], [], 0
    groups: dict[WeightBlock, list[int]] = {}  # block → member nodes
    reshapes: list[tuple] = []  # (kind, block key, member, size, numel) per reshaped member
    vec_nodes, cls_vec = [], []
    for b, g in enumerate(batch.graphs):
        cls_w, cls_b = classifier_nodes(g)
        for i, n in enumerate(g.nodes):
            if not n.params:
                continue
            node = int(batch.offsets[b]) + i
            if is_weight(n):
                new = [_weight_entry(spec, n, node, i == cls_w, groups, reshapes)]
            else:
                if i == cls_b:
                    cls_vec.append(len(vec_nodes))
                new = _vector_entries(spec, n, len(vec_nodes), i == cls_b, len(cls_vec) - 1)
                vec_nodes.append(node)
            for p, e in zip(n.params, new):  # a weight node: params[0] only
                index.append((b, p.tensor, total, p.canonical_shape))
                entries.append(e)
                total += math.prod(p.canonical_shape)

    # the source buffer: weight groups, then decoder_1d rows (n_v, 2, out), then bias_class rows
    offset, placed = 0, {}
    for key, members in sorted(groups.items()):
        numel = spec.num_classes * key.cols if key.is_cls else key.rows * key.cols * key.kh * key.kw
        placed[key] = WeightGroup(key, torch.as_tensor(members, device=device), offset, numel)
        offset += numel * len(members)
    vec_off = offset
    cls_off = vec_off + len(vec_nodes) * 2 * out_ch
    reshaped_off = cls_off + len(cls_vec) * 2 * spec.num_classes
    reshaped, dst = [], reshaped_off
    for kind, key, member, size, numel in reshapes:
        src = placed[key].src_off + member * placed[key].block_numel
        reshaped.append(Reshaped(kind, src, (key.kh, key.kw, key.rows, key.cols), size, dst))
        dst += numel
    starts = {DECODER_1D: lambda k, j: vec_off + (2 * k + j) * out_ch,
              BIAS_CLASS: lambda k, j: cls_off + (2 * k + j) * spec.num_classes,
              "w": lambda key, j: placed[key].src_off + j * placed[key].block_numel,
              "reshaped": lambda k: reshaped[k].dst}
    rows = [_tensor_meta(starts[e.source[0]](*e.source[1:]), e, off) for e, (_, _, off, _) in zip(entries, index)]
    return DecodePlan(
        spec=spec, device=device, index=index, total=total, groups=list(placed.values()),
        passes=_passes(list(placed.values()), device),
        vec_nodes=torch.as_tensor(vec_nodes, dtype=torch.int64, device=device), vec_off=vec_off,
        cls_vec=torch.as_tensor(cls_vec, dtype=torch.int64, device=device), cls_off=cls_off,
        src_numel=dst, meta=_store_meta(rows, [e.scale for e in entries], device), reshaped=tuple(reshaped),
    )


def _passes(groups: list[WeightGroup], device: torch.device) -> list[TapPass]:
    """Consecutive groups with the same taps share passes of at most ``TAPS_PER_CHUNK`` taps
    (groups are sorted by taps first)."""
    passes: list[tuple[int, int, list]] = []  # per pass: taps and its parts
    nodes: list[list[torch.Tensor]] = []  # per pass, its runs of group members
    for g in groups:
        kh, kw = g.block.kh, g.block.kw
        window = (kh, kw, g.block.y0, g.block.x0)
        taps = kh * kw
        first = 0
        while first < len(g.nodes):
            p = passes[-1] if passes else None
            rows = sum(c for *_, c, _ in p[1]) if p is not None else 0
            if p is None or p[0] != window or (rows + 1) * taps > TAPS_PER_CHUNK:
                p, rows = (window, []), 0
                passes.append(p)
                nodes.append([])
            count = min(len(g.nodes) - first, max(1, TAPS_PER_CHUNK // taps - rows))
            p[1].append((g, first, count, rows))
            nodes[-1].append(g.nodes[first:first + count])
            first += count
    return [TapPass(kh, kw, torch.cat(runs).to(device), tuple(parts), y0, x0)
            for ((kh, kw, y0, x0), parts), runs in zip(passes, nodes)]


def _weight_entry(spec: DecodeSpec, n: Node, node: int, is_cls: bool, groups: dict, reshapes: list) -> _Entry:
    """A conv / linear / positional-encoding weight (``params[0]``): its node joins the group of
    its :func:`~ghn_onnx.ghn.decode.rules.weight_block`; a block GHN-3 reshapes is read from its
    :class:`Reshaped` copy."""
    t = n.params[0].canonical_shape
    key = weight_block(spec, n, is_cls)
    members = groups.setdefault(key, [])
    members.append(node)
    scale = weight_scale(t) if weight_normalized(spec, n) else 1.0
    source = ("w", key, len(members) - 1)
    if is_cls:
        return _Entry(source, (spec.num_classes, key.cols), (key.cols, 1), t, scale)
    if as_tokens(spec, n):  # (1, 1 + kh·kw, cols), token-major
        tokens = 1 + key.kh * key.kw
        reshapes.append(("tokens", key, len(members) - 1, (0, 0), tokens * key.cols))
        return _Entry(("reshaped", len(reshapes) - 1), (1, tokens, key.cols), (0, key.cols, 1), t, scale)
    if interpolated(spec, n):  # (rows, cols, KH, KW), contiguous
        size = n.shape4d[2:]
        reshapes.append(("interpolate", key, len(members) - 1, size, key.rows * key.cols * size[0] * size[1]))
        block = (key.rows, key.cols, *size)
        strides = (key.cols * size[0] * size[1], size[0] * size[1], size[1], 1)
        return _Entry(("reshaped", len(reshapes) - 1), block, strides, t, scale)
    # stored (kh, kw, rows, cols): the layout of the matrix product, read as (o, i, y, x)
    block = (key.rows, key.cols, key.kh, key.kw)
    strides = (key.cols, 1, key.kw * key.rows * key.cols, key.rows * key.cols)
    return _Entry(source, block, strides, t, scale)


def _vector_entries(spec: DecodeSpec, n: Node, k: int, is_cls: bool, cls_k: int) -> list[_Entry]:
    """The 1-D parameters of vector node ``k`` (classifier bias ``cls_k``), each from the row
    :func:`~ghn_onnx.ghn.decode.rules.vector_row` names."""
    out = []
    for p in n.params:
        if len(p.canonical_shape) != 1:
            raise ValueError(f"Expected a 1-D {p.role} for {p.tensor} (got shape {p.canonical_shape})")
        row: VectorRow = vector_row(n, p, is_cls)
        if row.head == BIAS_CLASS:
            source, length = (BIAS_CLASS, cls_k, row.row), spec.num_classes
        else:
            source, length = (DECODER_1D, k, row.row), spec.max_shape[0]
        out.append(_Entry(source, (length,), (1,), p.canonical_shape, 1.0))
    return out


def _tensor_meta(src: int, e: _Entry, out: int) -> tuple[int, list[int], list[int], list[int], int]:
    """One tensor's ``(src_off, stride, period, dim, out_off)``: the block read at the target's
    rank, as 4-D.

    A rank-r target uses the block's first r dims at index 0 of the others (``_as_rank`` in
    ``GHN.decode``); a 1-D target is laid out as ``(1, C, 1, 1)`` so that it is one row."""
    target, block = e.target, e.block
    r = len(target)
    if not 1 <= r <= 4 or r > len(block):
        raise ValueError(f"Expected a target of rank 1-{len(block)} (got shape {target})")
    dim = list(target) + [1] * (4 - r)
    period = list(tile_periods(block[:r], target)) + [1] * (4 - r)
    stride = list(e.strides[:r]) + [0] * (4 - r)
    if r == 1:
        dim, period, stride = [1, dim[0], 1, 1], [1, period[0], 1, 1], [0, stride[0], 0, 0]
    return src, stride, period, dim, out


def _store_meta(rows: list[tuple], scales: list[float], device: torch.device) -> StoreMeta:
    def column(k: int, width: int | None = None) -> torch.Tensor:
        values = np.array([r[k] for r in rows], dtype=np.int64)
        return torch.as_tensor(values.reshape(-1, width) if width else values, device=device)

    return StoreMeta(src_off=column(0), stride=column(1, 4), period=column(2, 4), dim=column(3, 4),
                     out_off=column(4), scale=torch.as_tensor(scales, dtype=torch.float32, device=device))


def decode_sources(h: torch.Tensor, plan: DecodePlan, decoder: ConvDecoder, decoder_1d: nn.Module,
                   bias_class: nn.Module) -> torch.Tensor:
    """The fp32 source buffer ``(plan.src_numel,)`` (no autograd): each node's block computed
    once, then the 1-D rows (normalised with ``weight_norm``).

    Taps are rows of the matrix products (``(n·kh·kw, channels)``), so a group is three GEMMs:
    the ``fc`` rows of its taps, the first 1×1 conv, and the ``rows × cols`` outputs of the last
    1×1 conv that tiling reads, written in place.

    Args:
        h: ``(N, hid)`` fp32 final node states.
        plan: the batch's :class:`DecodePlan`, on ``h``'s device.
        decoder, decoder_1d, bias_class: the GHN's decoders.
    """
    src = h.new_empty(plan.src_numel)
    ch = decoder.template_ch
    for p in plan.passes:
        taps = p.kh * p.kw
        w_fc, b_fc = decoder.kept("tap_rows", p.kh, p.kw, True, p.y0, p.x0)
        template = F.relu(F.linear(h[p.nodes], w_fc, b_fc)).view(len(p.nodes) * taps, ch)
        hidden = decoder.hidden_rows(template)  # (n·taps, 8·hid)
        for g, start, n, row in p.parts:
            b = g.block
            w_last, b_last = decoder.kept("last_rows", b.rows, b.cols)
            x = hidden[row * taps:(row + n) * taps]
            dst = src[g.src_off + start * g.block_numel:][:n * g.block_numel]
            if b.is_cls:
                blocks = F.linear(x, w_last, b_last).view(n, b.rows, b.cols, 1, 1)
                dst.view(n, -1, b.cols).copy_(decoder.classifier(blocks))
            else:
                torch.addmm(b_last, x, w_last.t(), out=dst.view(n * taps, b.rows * b.cols))
    if len(plan.vec_nodes):
        rows = decoder_1d(h[plan.vec_nodes])  # (n_v, 2, out)
        cls_rows = bias_class(rows[plan.cls_vec]) if len(plan.cls_vec) else None  # (n_c, 2, classes)
        if plan.spec.weight_norm:  # the classifier's row 0 is never read
            rows = torch.stack([ROW_NORMALIZERS[r](rows[:, r]) for r in (SCALE_ROW, BIAS_ROW)], dim=1)
            if cls_rows is not None:
                cls_rows[:, BIAS_ROW] = ROW_NORMALIZERS[BIAS_ROW](cls_rows[:, BIAS_ROW])
        src[plan.vec_off:plan.cls_off].view_as(rows).copy_(rows)
        if cls_rows is not None:
            src[plan.cls_off:][:cls_rows.numel()].view_as(cls_rows).copy_(cls_rows)
    for r in plan.reshaped:
        kh, kw, rows_, cols = r.block
        block = src[r.src:r.src + kh * kw * rows_ * cols].view(kh, kw, rows_, cols).permute(2, 3, 0, 1)
        out = tokens_with_class_token(block) if r.kind == "tokens" else interpolate_taps(block, *r.size)
        src[r.dst:r.dst + out.numel()].view_as(out).copy_(out)
    return src


def split_flat(flat: torch.Tensor, index: list, n_graphs: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Per graph, ``{tensor name: view of flat in canonical shape}``: ``GHN.decode``'s format.

    ``n_graphs`` defaults to one more than the largest graph in ``index`` (pass it to keep
    trailing graphs without parameters)."""
    n = n_graphs if n_graphs is not None else 1 + max((g for g, *_ in index), default=-1)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    base = flat.storage_offset()
    for g, name, offset, shape in index:
        out[g][name] = flat.as_strided(shape, _contiguous_strides(shape), base + offset)  # one op per tensor
    return out


@functools.lru_cache(maxsize=4096)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.prod(shape[d + 1:]) for d in range(len(shape)))
