"""The store of :mod:`~ghn_onnx.ghn.decode.flat` on CPU: every tensor tiled, scaled and written
into one flat buffer by one compiled (numba) call.

The rule is ``out[o, i, y, x] = f · src[o % P0, i % P1, y % P2, x % P3]``. Only the first
``P0`` rows and, in them, the first ``P1`` input channels are computed element by element; the
rest of a tiled tensor is periodic and is filled by contiguous copies of what is already written
(doubling along a row, whole row blocks down the tensor), which run at memory bandwidth. Work
items are rows and row blocks, shared by the threads of ``numba.prange``; every element is
written once by one item, so the result does not depend on the thread count.

Why numba and not PyTorch ops: the per-tensor op sequence costs ~10 µs per tensor (a batch of
DeepNets graphs has ~1,000 tensors); why not one ``torch.take`` over an index: the int64 index
would be twice the size of the output.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; the per-tensor path still works
    numba = None

from ghn_onnx.ghn import cpu_threads
from ghn_onnx.ghn.decode.flat import DecodePlan

#: Output elements worth a thread of their own (4 MB, ~0.3 ms of writing): below it waking a
#: worker costs more than it saves (:mod:`~ghn_onnx.ghn.cpu_threads`).
ELEMENTS_PER_THREAD = 1 << 20


def available() -> bool:
    return numba is not None


class _Work(NamedTuple):
    """A plan's store metadata as numpy (the fields of :class:`~ghn_onnx.ghn.decode.flat.StoreMeta`)
    and the work items: ``rows`` ``(tensor, row)`` for rows below ``P0``, ``copies`` ``(tensor, k)``
    for row block ``k ≥ 1`` of ``P0`` rows, a copy of block 0."""

    src_off: np.ndarray
    stride: np.ndarray
    period: np.ndarray
    dim: np.ndarray
    out_off: np.ndarray
    scale: np.ndarray
    rows: np.ndarray
    copies: np.ndarray


def _work_lists(plan: DecodePlan) -> _Work:
    """The plan's :class:`_Work`, built once per plan."""
    def build() -> _Work:
        m = plan.meta
        src_off, stride, period, dim, out_off, scale = (
            np.ascontiguousarray(t.cpu().numpy()) for t in (m.src_off, m.stride, m.period, m.dim, m.out_off, m.scale))
        p0, t0 = period[:, 0], dim[:, 0]
        n_blocks = -(-t0 // np.maximum(p0, 1))
        copies = _ranges(np.maximum(n_blocks - 1, 0))  # an empty tensor has no blocks
        copies[:, 1] += 1
        return _Work(src_off, stride, period, dim, out_off, scale, _ranges(p0), copies)

    return plan.derived(("numba",), build)


def _ranges(counts: np.ndarray) -> np.ndarray:
    """``(sum(counts), 2)`` rows ``(t, k)`` for ``k < counts[t]``."""
    counts = counts.astype(np.int64)
    t = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    k = np.arange(len(t), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.stack([t, k], axis=1)


class OutputBuffer:
    """The memory of the last flat output, handed out again once nothing refers to it.

    Fresh memory is paid for at first touch (the kernel zeroes each page: for a ResNet-50,
    94 MB, that is slower than writing the parameters), so like PyTorch's CUDA caching
    allocator this keeps the last buffer. It is reused only when every tensor of the previous
    result is gone (the numpy array's reference count: the tensors and their views hold it);
    otherwise a new one is allocated and the old one is left to its users. At most one buffer is
    kept, of at most ``max_bytes`` (default: a quarter of the machine's memory; first touch of
    2.3 GB, a batch of 512 small networks, took 2 s here, as long as predicting them);
    :meth:`release` drops it.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = _quarter_of_memory() if max_bytes is None else max_bytes
        self._buf: np.ndarray | None = None
        self._lock = threading.Lock()

    def get(self, n: int) -> np.ndarray:
        with self._lock:
            # 2 = this attribute + getrefcount's argument: no tensor or view refers to it any more
            if self._buf is not None and self._buf.size >= n and sys.getrefcount(self._buf) == 2:
                return self._buf[:n]
            # numpy asks the kernel for transparent huge pages on large buffers (torch does not):
            # one page fault per 2 MB instead of per 4 KB
            buf = np.empty(max(n, 1), dtype=np.float32)
            if buf.nbytes <= self.max_bytes:
                self._buf = buf
            return buf[:n]

    def release(self) -> None:
        with self._lock:
            self._buf = None


def _quarter_of_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (AttributeError, ValueError, OSError):  # not POSIX: a fixed 1 GiB
        return 1 << 30


OUTPUT = OutputBuffer()


def store(plan: DecodePlan, src: torch.Tensor) -> torch.Tensor:
    """The flat fp32 output ``(plan.total,)`` from the source buffer of
    :func:`~ghn_onnx.ghn.decode.flat.decode_sources` (CPU), in :data:`OUTPUT`'s memory."""
    if numba is None:
        raise RuntimeError("the numba store needs numba (a dependency of ghn-onnx)")
    if src.device.type != "cpu" or src.dtype != torch.float32 or src.shape != (plan.src_numel,):
        raise ValueError(f"Expected an fp32 CPU source buffer of {plan.src_numel} elements "
                         f"(got {src.dtype} {tuple(src.shape)} on {src.device})")
    work = _work_lists(plan)
    out = OUTPUT.get(plan.total)
    with cpu_threads.numba_threads(plan.total, ELEMENTS_PER_THREAD):  # same values for any count
        _store(src.detach().contiguous().numpy(), out, *work)  # _Work's fields in order
    return torch.from_numpy(out)


if numba is not None:
    @numba.njit(cache=True, inline="always")
    def _copy(out, dst, src, n):
        """``out[dst:dst+n] = out[src:src+n]`` (no overlap): a plain loop for short runs, where
        a slice assignment's setup costs more than the copy."""
        if n < 4096:
            for j in range(n):
                out[dst + j] = out[src + j]
        else:
            out[dst:dst + n] = out[src:src + n]

    @numba.njit(cache=True, parallel=True)
    def _store(src, out, src_off, stride, period, dim, out_off, scale, rows, copies):
        for w in numba.prange(len(rows)):
            t, o = rows[w, 0], rows[w, 1]
            s_off = src_off[t] + o * stride[t, 0]
            s1, s2, s3 = stride[t, 1], stride[t, 2], stride[t, 3]
            p1, p2, p3 = period[t, 1], period[t, 2], period[t, 3]
            t1, t2, t3 = dim[t, 1], dim[t, 2], dim[t, 3]
            f = scale[t]
            row_len = t1 * t2 * t3
            d = out_off[t] + o * row_len
            if t2 * t3 == 1:  # linear layers, 1x1 convs, 1-D tensors: a strided run of p1 values
                for i in range(p1):
                    out[d + i] = src[s_off + i * s1] * f
            elif p2 == t2 and p3 == t3:  # kernels no larger than the decoder's
                # tap by tap: a contiguous run of source values to every t2·t3-th output
                t23 = t2 * t3
                for y in range(t2):
                    for x in range(t3):
                        sb = s_off + y * s2 + x * s3
                        db = d + y * t3 + x
                        for i in range(p1):
                            out[db + i * t23] = src[sb + i * s1] * f
            else:
                k = d
                for i in range(p1):
                    for y in range(t2):
                        for x in range(t3):
                            # y % p2, x % p3: kernels larger than the decoder's repeat its taps
                            out[k] = src[s_off + i * s1 + (y % p2) * s2 + (x % p3) * s3] * f
                            k += 1
            # the row is periodic in i with period p1·t2·t3: double what is written
            filled = p1 * t2 * t3
            while filled < row_len:
                n = min(filled, row_len - filled)
                _copy(out, d + filled, d, n)
                filled += n
        for w in numba.prange(len(copies)):
            t, b = copies[w, 0], copies[w, 1]
            p0, t0 = period[t, 0], dim[t, 0]
            row_len = dim[t, 1] * dim[t, 2] * dim[t, 3]
            d = out_off[t]
            first = b * p0
            n = (min(t0, first + p0) - first) * row_len
            _copy(out, d + first * row_len, d, n)
