r"""GHN-2 decoding in Triton: the store of :mod:`ghn_onnx.ghn.decode.flat` on CUDA.

The compute stays in PyTorch (cuBLAS, :func:`~ghn_onnx.ghn.decode.flat.decode_sources`). The
kernel does the rest in one launch: for every predicted tensor ``t`` of target shape
``(T0, T1, T2, T3)``, ``out_t[o, i, y, x] = f_t · block[o mod P0, i mod P1, y mod P2, x mod P3]``
with ``P_d = min(B_d, T_d)`` and ``f_t`` the weight-normalisation factor (the plan's
:class:`~ghn_onnx.ghn.decode.flat.StoreMeta`), each value cast to the output dtype in the store.

The target is walked as a 2-D ``(T0, T1·T2·T3)`` matrix in ``(BLOCK_R, BLOCK_C)`` tiles listed in
a chunk table, so all tensors of a batch go in one launch and the integer divisions are paid per
row and per column of a tile, not per element. 1-D targets are laid out as ``(1, C, 1, 1)``.

File layout (Triton tutorial habit): kernel → launcher; the plain reference is
:func:`~ghn_onnx.ghn.decode.parameters.tile` and ``GHN.decode_tensors(reference=True)``; tests in
``tests/test_kernels.py``, timings in :mod:`ghn_onnx.benchmarks.kernels`.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ghn_onnx.ghn.decode.flat import DecodePlan
from ghn_onnx.ghn.triton_support import check_kernel_device

__all__ = ["OUT_DTYPES", "store"]

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- kernel -------------------------------------------------------------------------------------
@triton.jit
def _tile_store_kernel(
    src_ptr,  # fp32 decoded blocks and rows, every tensor's source back to back
    out_ptr,  # flat output, fp32 / fp16 / bf16
    src_off_ptr,  # (T,) int64 per tensor: where its block starts in src
    stride_ptr,  # (T, 4) int64: the block's strides in src, axes (o, i, y, x)
    period_ptr,  # (T, 4) int64: P_d = min(B_d, T_d)
    dim_ptr,  # (T, 4) int64: the target's dims T_d
    out_off_ptr,  # (T,) int64: where the tensor starts in out
    scale_ptr,  # (T,) fp32 weight-normalisation factor per tensor
    chunk_ptr,  # (C, 3) int32 per program: tensor, row tile, column tile
    BLOCK_R: tl.constexpr,  # target rows (dim 0) per tile
    BLOCK_C: tl.constexpr,  # target columns (dims 1-3 flattened) per tile
):
    pid = tl.program_id(0)
    t = tl.load(chunk_ptr + 3 * pid)
    rows = tl.load(chunk_ptr + 3 * pid + 1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.load(chunk_ptr + 3 * pid + 2) * BLOCK_C + tl.arange(0, BLOCK_C)
    t64 = t.to(tl.int64)
    stride, period, dim = stride_ptr + 4 * t64, period_ptr + 4 * t64, dim_ptr + 4 * t64
    src_off = tl.load(src_off_ptr + t64)
    s0, s1, s2, s3 = tl.load(stride + 0), tl.load(stride + 1), tl.load(stride + 2), tl.load(stride + 3)
    p0, p1, p2, p3 = tl.load(period + 0), tl.load(period + 1), tl.load(period + 2), tl.load(period + 3)
    t0, t1, t2, t3 = tl.load(dim + 0), tl.load(dim + 1), tl.load(dim + 2), tl.load(dim + 3)
    out_off = tl.load(out_off_ptr + t64)
    scale = tl.load(scale_ptr + t64)

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
    """``(C, 3)`` int32 program table: tensor, row tile, column tile. Built once per plan and tile."""
    def build() -> torch.Tensor:
        dim = plan.meta.dim.cpu().numpy()
        n_r = -(-dim[:, 0] // block_rows)
        n_c = -(-dim[:, 1:].prod(axis=1) // block_cols)
        per = n_r * n_c
        tensor = np.repeat(np.arange(len(dim)), per)
        k = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
        table = np.stack([tensor, k // np.repeat(n_c, per), k % np.repeat(n_c, per)], axis=1)
        return torch.as_tensor(table.astype(np.int32), device=plan.device)

    return plan.derived(("triton", block_rows, block_cols), build)


def store(plan: DecodePlan, src: torch.Tensor, dtype: torch.dtype = torch.float32, *,
          block_rows: int = 16, block_cols: int = 256) -> torch.Tensor:
    """Every predicted parameter of the plan, tiled and scaled, in one flat buffer.

    Args:
        plan: the batch's decode plan, on ``src``'s device.
        src: ``(plan.src_numel,)`` fp32 source buffer
            (:func:`~ghn_onnx.ghn.decode.flat.decode_sources`), on a CUDA device (or on the CPU
            under ``TRITON_INTERPRET=1``).
        dtype: output dtype: float32, float16 or bfloat16 (rounded once, in the store).
        block_rows, block_cols: the kernel's ``(BLOCK_R, BLOCK_C)`` tile (powers of two).

    Returns:
        ``(plan.total,)`` (no autograd); :func:`~ghn_onnx.ghn.decode.flat.split_flat` with
        ``plan.index`` gives ``GHN.decode``'s dicts.
    """
    if dtype not in OUT_DTYPES:
        raise ValueError(f"Expected an output dtype in {OUT_DTYPES} (got {dtype})")
    for name, b in (("block_rows", block_rows), ("block_cols", block_cols)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"Expected {name} to be a power of two (got {b})")
    if src.dtype != torch.float32 or src.shape != (plan.src_numel,):
        raise ValueError(f"Expected an fp32 source buffer of {plan.src_numel} elements "
                         f"(got {src.dtype} {tuple(src.shape)})")
    check_kernel_device(src, _tile_store_kernel)
    flat = torch.empty(plan.total, dtype=dtype, device=src.device)
    chunks = _chunks(plan, block_rows, block_cols)
    m = plan.meta
    if len(chunks):
        _tile_store_kernel[(len(chunks),)](src, flat, m.src_off, m.stride, m.period, m.dim, m.out_off, m.scale,
                                           chunks, BLOCK_R=block_rows, BLOCK_C=block_cols)
    return flat
