r"""GHN-2 decoding in Triton: node states straight to every final parameter, in one flat buffer.

The compute stays in PyTorch (cuBLAS). Per group of nodes with the same kernel taps, the template
``fc`` and the pointwise channel MLP give one block per node, computed once: the top-left
``min(out, 64) × min(in, 64) × kh × kw`` corner of the 64×64 block, all that tiling reads (only
those rows of the last layer, written straight into a source buffer). The classifier heads act
on their blocks; ``decoder_1d`` / ``bias_class`` give the 1-D rows. The kernel does the rest in
one launch: for every predicted tensor ``t`` of target shape ``(T0, T1, T2, T3)`` (rank padded
with 1s),

.. math::
    \mathrm{out}_t[o, i, y, x] = f_t\big(\mathrm{block}[o \bmod P_0,\ i \bmod P_1,\
    y \bmod P_2,\ x \bmod P_3]\big), \qquad P_d = \min(B_d, T_d),

which is :func:`~ghn_onnx.ghn.parameters.tile` (slice to the target, repeat the whole block,
chop; spatial taps from the top-left) without materialising a repeat, and ``f_t`` is the
normalisation: ``w · weight_scale(target)`` for weights (1 for positional encodings),
``2σ(p/2)`` for norm scales, ``tanh(p/5)`` for biases, identity without ``weight_norm``. Each
value is cast to the output dtype in the store.

The target is walked as a 2-D ``(T0, T1·T2·T3)`` matrix in ``(BLOCK_R, BLOCK_C)`` tiles listed in
a chunk table, so all tensors of a batch go in one launch and the integer divisions are paid per
row and per column of a tile, not per element. 1-D targets are laid out as ``(1, C, 1, 1)``.

File layout (Triton tutorial habit): kernel → launcher → plain reference; tests in
``tests/test_kernels.py``, timings in :mod:`ghn_onnx.kernels.bench`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ghn_onnx.batch import GraphBatch
from ghn_onnx.ghn.model import GHN, TAPS_PER_CHUNK, classifier_nodes
from ghn_onnx.ghn.parameters import weight_scale
from ghn_onnx.kernels._common import check_kernel_device
from ghn_onnx.kernels.message_passing import _tanh
from ghn_onnx.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive

# Normalisation applied by the store (the ``mode`` field of a tensor's metadata).
MODE_SCALE, MODE_NORM_SCALE, MODE_BIAS = 0, 1, 2
# One tensor's metadata row, int64: source offset, 4 strides, 4 periods, 4 dims (from _SHAPE),
# output offset, mode.
_SHAPE, _META = 9, 15

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- kernel -------------------------------------------------------------------------------------
@triton.jit
def _tile_store_kernel(
    src_ptr,  # fp32 decoded blocks and rows, every tensor's source back to back
    out_ptr,  # flat output, fp32 / fp16 / bf16
    meta_ptr,  # (T, META) int64 per tensor: src offset, 4 strides, 4 periods, 4 dims, out offset, mode
    scale_ptr,  # (T,) fp32 weight-normalisation factor per tensor
    chunk_ptr,  # (C, 3) int32 per program: tensor, row tile, column tile
    META: tl.constexpr,  # int64 fields per tensor
    BLOCK_R: tl.constexpr,  # target rows (dim 0) per tile
    BLOCK_C: tl.constexpr,  # target columns (dims 1-3 flattened) per tile
):
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + 3 * pid)
    rows = tl.load(chunk_ptr + 3 * pid + 1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.load(chunk_ptr + 3 * pid + 2) * BLOCK_C + tl.arange(0, BLOCK_C)
    meta = meta_ptr + t.to(tl.int64) * META
    src_off = tl.load(meta + 0)
    s0, s1, s2, s3 = tl.load(meta + 1), tl.load(meta + 2), tl.load(meta + 3), tl.load(meta + 4)
    p0, p1, p2, p3 = tl.load(meta + 5), tl.load(meta + 6), tl.load(meta + 7), tl.load(meta + 8)
    t0, t1, t2, t3 = tl.load(meta + 9), tl.load(meta + 10), tl.load(meta + 11), tl.load(meta + 12)
    out_off = tl.load(meta + 13)
    mode = tl.load(meta + 14)
    scale = tl.load(scale_ptr + t)

    # column → (i, y, x) of the target, then each index modulo its block period
    n_cols = t1 * t2 * t3
    x = cols % t3
    rest = cols // t3
    y = rest % t2
    i = rest // t2
    col_src = (i % p1) * s1 + (y % p2) * s2 + (x % p3) * s3
    row_src = (rows % p0) * s0
    mask = (rows < t0)[:, None] & (cols < n_cols)[None, :]
    v = tl.load(src_ptr + src_off + row_src[:, None] + col_src[None, :], mask=mask, other=0.0)

    v = tl.where(mode == 1, 2.0 * tl.sigmoid(0.5 * v), tl.where(mode == 2, _tanh(0.2 * v), v * scale))
    dst = out_ptr + out_off + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask)


# -- launcher -----------------------------------------------------------------------------------
@dataclass
class _WeightGroup:
    """Nodes decoded together: same taps ``kh × kw``, same ``rows × cols`` corner of the channel
    block, classifier or not."""

    kh: int
    kw: int
    rows: int
    cols: int
    is_cls: bool
    nodes: torch.Tensor  # (n,) global node ids
    src_off: int  # first element of the group's blocks in the source buffer
    block_numel: int


@dataclass
class DecodePlan:
    """Everything about a batch's decoding that does not depend on the node states.

    Attributes:
        index: ``(graph, tensor name, offset, canonical shape)`` per predicted tensor, graph by
            graph in node order; tensor ``k`` is ``flat[offset : offset + numel].view(shape)``.
        total: elements of the flat output.
        groups: the weight groups and where their blocks go in the source buffer.
        vec_nodes: ``(n_v,)`` nodes decoded by ``decoder_1d`` (rows at ``vec_off``, ``(n_v, 2, 64)``).
        cls_vec: ``(n_c,)`` positions in ``vec_nodes`` of classifier biases (``bias_class`` rows at
            ``cls_off``, ``(n_c, 2, num_classes)``).
        src_numel: elements of the fp32 source buffer.
        meta, scale: the kernel's per-tensor metadata.
    """

    index: list[tuple[int, str, int, tuple[int, ...]]]
    total: int
    groups: list[_WeightGroup]
    vec_nodes: torch.Tensor
    vec_off: int
    cls_vec: torch.Tensor
    cls_off: int
    src_numel: int
    meta: torch.Tensor
    scale: torch.Tensor
    _chunks: dict

    def chunks(self, block_rows: int, block_cols: int) -> torch.Tensor:
        """``(C, 3)`` int32 program table: tensor, row tile, column tile."""
        key = (block_rows, block_cols)
        if key not in self._chunks:
            meta = self.meta.cpu().numpy()
            n_r = -(-meta[:, _SHAPE] // block_rows)
            n_c = -(-meta[:, _SHAPE + 1:_SHAPE + 4].prod(axis=1) // block_cols)
            per = n_r * n_c
            tensor = np.repeat(np.arange(len(meta)), per)
            k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
            table = np.stack([tensor, k // np.repeat(n_c, per), k % np.repeat(n_c, per)], axis=1)
            self._chunks[key] = torch.as_tensor(table.astype(np.int32), device=self.meta.device)
        return self._chunks[key]


def decode_plan(ghn: GHN, batch: GraphBatch, device: torch.device) -> DecodePlan:
    """The :class:`DecodePlan` of ``batch`` for ``ghn``'s configuration, built once per device."""
    cfg = ghn.config
    cache = batch.__dict__.setdefault("_triton_decode", {})
    key = (str(device), cfg.max_shape, cfg.num_classes, cfg.weight_norm)
    if key not in cache:
        cache[key] = _build_plan(ghn, batch, device)
    return cache[key]


@dataclass
class _Entry:
    """One predicted tensor while planning: where its source lies and how it is stored."""

    source: tuple  # ("w", group key, member) | ("v", vector node, row) | ("c", classifier bias, row)
    block: tuple[int, ...]  # dims of the contiguous source block
    target: tuple[int, ...]  # canonical shape
    mode: int  # MODE_*
    scale: float  # weight-normalisation factor (MODE_SCALE)


def _build_plan(ghn: GHN, batch: GraphBatch, device: torch.device) -> DecodePlan:
    cfg = ghn.config
    out_ch = cfg.max_shape[0]
    index, entries, total = [], [], 0
    groups: dict[tuple[int, int, int, int, bool], list[int]] = {}  # key → member nodes
    vec_nodes, cls_vec = [], []
    for b, g in enumerate(batch.graphs):
        cls_w, cls_b = classifier_nodes(g)
        for i, n in enumerate(g.nodes):
            if not n.params:
                continue
            node = int(batch.offsets[b]) + i
            if n.primitive in WEIGHT_PRIMITIVES or n.primitive is Primitive.POS_ENC:
                new = [_weight_entry(cfg, n, node, i == cls_w, groups)]
            else:
                if i == cls_b:
                    cls_vec.append(len(vec_nodes))
                new = _vector_entries(cfg, n, len(vec_nodes), i == cls_b, len(cls_vec) - 1)
                vec_nodes.append(node)
            for p, e in zip(n.params, new):  # a weight node: params[0] only
                index.append((b, p.tensor, total, p.canonical_shape))
                entries.append(e)
                total += math.prod(p.canonical_shape)

    # the source buffer: weight groups, then decoder_1d rows (n_v, 2, out), then bias_class rows
    offset, placed = 0, {}
    for key, members in sorted(groups.items()):
        kh, kw, rows, cols, is_cls = key
        numel = cfg.num_classes * cols if is_cls else rows * cols * kh * kw
        placed[key] = _WeightGroup(kh, kw, rows, cols, is_cls, torch.as_tensor(members, device=device),
                                   offset, numel)
        offset += numel * len(members)
    vec_off = offset
    cls_off = vec_off + len(vec_nodes) * 2 * out_ch
    starts = {"v": lambda k, j: vec_off + (2 * k + j) * out_ch,
              "c": lambda k, j: cls_off + (2 * k + j) * cfg.num_classes,
              "w": lambda key, j: placed[key].src_off + j * placed[key].block_numel}
    meta = [_tensor_meta(starts[e.source[0]](*e.source[1:]), e.block, e.target, off, e.mode)
            for e, (_, _, off, _) in zip(entries, index)]
    return DecodePlan(
        index=index, total=total, groups=list(placed.values()),
        vec_nodes=torch.as_tensor(vec_nodes, dtype=torch.int64, device=device), vec_off=vec_off,
        cls_vec=torch.as_tensor(cls_vec, dtype=torch.int64, device=device), cls_off=cls_off,
        src_numel=cls_off + len(cls_vec) * 2 * cfg.num_classes,
        meta=torch.as_tensor(np.array(meta, dtype=np.int64).reshape(-1, _META), device=device),
        scale=torch.as_tensor([e.scale for e in entries], dtype=torch.float32, device=device), _chunks={},
    )


def _weight_entry(cfg, n, node: int, is_cls: bool, groups: dict) -> _Entry:
    """A conv / linear / positional-encoding weight (``params[0]``, as ``GHN.decode``): its node
    joins the group of its taps and of the ``rows × cols`` corner of the 64×64 block that tiling
    reads (all rows for the classifier, whose head mixes them)."""
    out_ch, in_ch, s, _ = cfg.max_shape
    p = n.params[0]
    t = p.canonical_shape
    _, _, kh, kw = n.shape4d
    rows = out_ch if is_cls else min(out_ch, t[0])
    cols = min(in_ch, t[1]) if len(t) > 1 else 1
    key = (min(kh, s), min(kw, s), rows, cols, is_cls)
    members = groups.setdefault(key, [])
    members.append(node)
    normalize = cfg.weight_norm and n.primitive is not Primitive.POS_ENC
    block = (cfg.num_classes, cols) if is_cls else (rows, cols, key[0], key[1])
    return _Entry(("w", key, len(members) - 1), block, t, MODE_SCALE, weight_scale(t) if normalize else 1.0)


def _vector_entries(cfg, n, k: int, is_cls: bool, cls_k: int) -> list[_Entry]:
    """The 1-D parameters of vector node ``k``: a norm's scale from row 0 of ``decoder_1d``,
    every bias from row 1 (of ``bias_class`` for the classifier bias)."""
    out = []
    for p in n.params:
        if len(p.canonical_shape) != 1:
            raise ValueError(f"Expected a 1-D {p.role} for {p.tensor} (got shape {p.canonical_shape})")
        if n.primitive in NORM_PRIMITIVES and p.role == "scale":
            source, length, mode = ("v", k, 0), cfg.max_shape[0], MODE_NORM_SCALE
        elif is_cls:
            source, length, mode = ("c", cls_k, 1), cfg.num_classes, MODE_BIAS
        else:
            source, length, mode = ("v", k, 1), cfg.max_shape[0], MODE_BIAS
        out.append(_Entry(source, (length,), p.canonical_shape, mode if cfg.weight_norm else MODE_SCALE, 1.0))
    return out


def _tensor_meta(src: int, block: tuple[int, ...], target: tuple[int, ...], out: int, mode: int) -> list[int]:
    """One metadata row: a ``block`` (contiguous) read at the target's rank, as 4-D.

    A rank-r target uses the block's first r dims at index 0 of the others (``_as_rank`` in
    ``GHN.decode``); a 1-D target is laid out as ``(1, C, 1, 1)`` so its tiles are full rows."""
    r = len(target)
    if not 1 <= r <= 4 or r > len(block):
        raise ValueError(f"Expected a target of rank 1-{len(block)} (got shape {target})")
    strides = [math.prod(block[d + 1:]) for d in range(len(block))]
    shape = list(target) + [1] * (4 - r)
    period = [min(block[d], target[d]) for d in range(r)] + [1] * (4 - r)
    stride = strides[:r] + [0] * (4 - r)
    if r == 1:
        shape, period, stride = [1, shape[0], 1, 1], [1, period[0], 1, 1], [0, stride[0], 0, 0]
    return [src, *stride, *period, *shape, out, mode]


def decode_flat(ghn: GHN, h: torch.Tensor, batch: GraphBatch, dtype: torch.dtype = torch.float32, *,
                block_rows: int = 16, block_cols: int = 256) -> tuple[torch.Tensor, list]:
    """Every predicted parameter of ``batch`` from the final node states, in one flat buffer.

    Args:
        ghn: the GHN whose decoders are used.
        h: ``(N, hid)`` final node states (after the LayerNorm), as ``GHN.decode`` takes them; on
            a CUDA device (or on the CPU under ``TRITON_INTERPRET=1``).
        batch: the graphs; the decoding plan is cached on it.
        dtype: output dtype: float32, float16 or bfloat16 (rounded once, in the store).
        block_rows, block_cols: the kernel's ``(BLOCK_R, BLOCK_C)`` tile (powers of two).

    Returns:
        ``(flat, index)``: ``flat`` of shape ``(total,)`` (no autograd); ``index`` lists ``(graph,
        tensor name, offset, canonical shape)``; :func:`split_flat` turns them into
        ``GHN.decode``'s dicts.
    """
    if h.dim() != 2 or h.shape != (batch.n_nodes, ghn.config.hid):
        raise ValueError(f"Expected h of shape ({batch.n_nodes}, {ghn.config.hid}) (got {tuple(h.shape)})")
    if dtype not in OUT_DTYPES:
        raise ValueError(f"Expected an output dtype in {OUT_DTYPES} (got {dtype})")
    for name, b in (("block_rows", block_rows), ("block_cols", block_cols)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"Expected {name} to be a power of two (got {b})")
    check_kernel_device(h, _tile_store_kernel)
    plan = decode_plan(ghn, batch, h.device)
    with torch.no_grad():
        src = _decode_sources(ghn, h.float(), plan)
    flat = torch.empty(plan.total, dtype=dtype, device=h.device)
    chunks = plan.chunks(block_rows, block_cols)
    if len(chunks):
        _tile_store_kernel[(len(chunks),)](src, flat, plan.meta, plan.scale, chunks, META=_META,
                                           BLOCK_R=block_rows, BLOCK_C=block_cols)
    return flat, plan.index


def _decode_sources(ghn: GHN, h: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """The fp32 source buffer: each node's block computed once (template fc, then the channel
    MLP with only the ``rows × cols`` outputs of its last layer that tiling reads, written in
    place; the classifier head on its blocks), then the 1-D rows."""
    dec = ghn.decoder
    src = h.new_empty(plan.src_numel)
    last = dec.conv[2]
    for g in plan.groups:
        taps = g.kh * g.kw
        w_last = last.weight.view(dec.out_ch, dec.in_ch, -1)[:g.rows, :g.cols].reshape(g.rows * g.cols, -1)
        b_last = last.bias.view(dec.out_ch, dec.in_ch)[:g.rows, :g.cols].reshape(-1, 1)
        chunk = max(1, TAPS_PER_CHUNK // taps)
        for start in range(0, len(g.nodes), chunk):
            nodes = g.nodes[start:start + chunk]
            n = len(nodes)
            template = dec.template(h[nodes])[:, :, :g.kh, :g.kw]
            hidden = F.relu(dec.conv[0](template)).flatten(2)  # (n, 8·hid, kh·kw)
            dst = src[g.src_off + start * g.block_numel:][:n * g.block_numel]
            if g.is_cls:
                blocks = torch.matmul(w_last, hidden).add_(b_last)  # (n, out·cols, 1)
                dst.view(n, -1, g.cols).copy_(dec.classifier(blocks.view(n, g.rows, g.cols, 1, 1)))
            else:
                torch.matmul(w_last, hidden, out=dst.view(n, g.rows * g.cols, taps)).add_(b_last)
    if len(plan.vec_nodes):
        rows = ghn.decoder_1d(h[plan.vec_nodes])  # (n_v, 2, out)
        src[plan.vec_off:plan.cls_off].view_as(rows).copy_(rows)
        if len(plan.cls_vec):
            cls_rows = ghn.bias_class(rows[plan.cls_vec])  # (n_c, 2, classes)
            src[plan.cls_off:].view_as(cls_rows).copy_(cls_rows)
    return src


def split_flat(flat: torch.Tensor, index: list, n_graphs: int | None = None) -> list[dict[str, torch.Tensor]]:
    """Per graph, ``{tensor name: view of flat in canonical shape}``: ``GHN.decode``'s format.

    ``n_graphs`` defaults to one more than the largest graph in ``index`` (pass it to keep
    trailing graphs without parameters)."""
    n = n_graphs if n_graphs is not None else 1 + max((g for g, *_ in index), default=-1)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for g, name, offset, shape in index:
        out[g][name] = flat[offset:offset + math.prod(shape)].view(shape)
    return out


# -- reference ----------------------------------------------------------------------------------
def decode_reference(ghn: GHN, h: torch.Tensor, batch: GraphBatch) -> list[dict[str, torch.Tensor]]:
    """The same parameters in plain PyTorch: ``GHN.decode``.

    Per tensor it slices the block, materialises the tiled tensor (``expand_tile``: one write of
    the target, plus the reads of the block) and normalises; one or more PyTorch ops per tensor.
    """
    with torch.no_grad():
        return ghn.decode(h, batch)


def tile_reference(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """The kernel's indexing rule in PyTorch: ``out[o, i, y, x] = block[o % P0, i % P1, y % P2,
    x % P3]`` with ``P_d = min(block_d, target_d)``; equals :func:`~ghn_onnx.ghn.parameters.tile`."""
    idx = [torch.arange(t) % min(b, t) for b, t in zip(block.shape, target)]
    return block[torch.meshgrid(*idx, indexing="ij")] if idx else block
