r"""GHN-2 decoding in Triton: the store of :mod:`ghn_onnx.ghn.decode.flat` on CUDA.

The compute stays in PyTorch (cuBLAS, :func:`~ghn_onnx.ghn.decode.flat.decode_sources`). The
kernel does the rest in one launch: for every predicted tensor ``t`` of target shape
``(T0, T1, T2, T3)``, ``out_t[o, i, y, x] = f_t · block[o mod P0, i mod P1, y mod P2, x mod P3]``
with ``P_d = min(B_d, T_d)`` and ``f_t`` the weight-normalisation factor (see ``flat_decode``),
each value cast to the output dtype in the store.

The target is walked as a 2-D ``(T0, T1·T2·T3)`` matrix in ``(BLOCK_R, BLOCK_C)`` tiles listed in
a chunk table, so all tensors of a batch go in one launch and the integer divisions are paid per
row and per column of a tile, not per element. 1-D targets are laid out as ``(1, C, 1, 1)``.

File layout (Triton tutorial habit): kernel → launcher → plain reference; tests in
``tests/test_kernels.py``, timings in :mod:`ghn_onnx.benchmarks.kernels`.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ghn_onnx.graph.batch import GraphBatch
from ghn_onnx.ghn.decode.flat import META, SHAPE, DecodePlan, decode_plan, decode_sources, split_flat
from ghn_onnx.ghn.model import GHN
from ghn_onnx.ghn.triton_support import check_kernel_device

__all__ = ["decode_flat", "decode_reference", "split_flat", "tile_reference"]

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- kernel -------------------------------------------------------------------------------------
@triton.jit
def _tile_store_kernel(
    src_ptr,  # fp32 decoded blocks and rows, every tensor's source back to back
    out_ptr,  # flat output, fp32 / fp16 / bf16
    meta_ptr,  # (T, META) int64 per tensor: src offset, 4 strides, 4 periods, 4 dims, out offset
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

    v = v * scale
    dst = out_ptr + out_off + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask)


# -- launcher -----------------------------------------------------------------------------------
def _chunks(plan: DecodePlan, block_rows: int, block_cols: int) -> torch.Tensor:
    """``(C, 3)`` int32 program table: tensor, row tile, column tile."""
    key = ("triton", block_rows, block_cols)
    if key not in plan.cache:
        meta = plan.meta.cpu().numpy()
        n_r = -(-meta[:, SHAPE] // block_rows)
        n_c = -(-meta[:, SHAPE + 1:SHAPE + 4].prod(axis=1) // block_cols)
        per = n_r * n_c
        tensor = np.repeat(np.arange(len(meta)), per)
        k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
        table = np.stack([tensor, k // np.repeat(n_c, per), k % np.repeat(n_c, per)], axis=1)
        plan.cache[key] = torch.as_tensor(table.astype(np.int32), device=plan.meta.device)
    return plan.cache[key]


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
        src = decode_sources(ghn, h.float(), plan)
    flat = torch.empty(plan.total, dtype=dtype, device=h.device)
    chunks = _chunks(plan, block_rows, block_cols)
    if len(chunks):
        _tile_store_kernel[(len(chunks),)](src, flat, plan.meta, plan.scale, chunks, META=META,
                                           BLOCK_R=block_rows, BLOCK_C=block_cols)
    return flat, plan.index


# -- reference ----------------------------------------------------------------------------------
def decode_reference(ghn: GHN, h: torch.Tensor, batch: GraphBatch) -> list[dict[str, torch.Tensor]]:
    """The same parameters in plain PyTorch: ``GHN.decode_tensors``.

    Per tensor it slices the block, materialises the tiled tensor (``expand_tile``: one write of
    the target, plus the reads of the block) and normalises; one or more PyTorch ops per tensor.
    """
    with torch.no_grad():
        return ghn.decode_tensors(h, batch)


def tile_reference(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """The kernel's indexing rule in PyTorch: ``out[o, i, y, x] = block[o % P0, i % P1, y % P2,
    x % P3]`` with ``P_d = min(block_d, target_d)``; equals :func:`~ghn_onnx.ghn.decode.parameters.tile`."""
    idx = [torch.arange(t) % min(b, t) for b, t in zip(block.shape, target)]
    return block[torch.meshgrid(*idx, indexing="ij")] if idx else block
