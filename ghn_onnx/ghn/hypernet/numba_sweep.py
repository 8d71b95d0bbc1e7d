"""The GatedGNN sweeps as one compiled loop over nodes (numba), for inference on CPU.

Why a compiled loop: with hidden size 32, one node update is ~8k multiply-adds, far less than
the fixed cost of a PyTorch op (~5-20 µs), and a graph has as many levels as it has depth, so a
level-by-level PyTorch sweep still launches ~10 ops per level (ResNet-50: 118 levels).
Here each node costs a few microseconds and there is no per-op overhead; bench/RESULTS.md
records the comparison. Same maths as :class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNN`; no autograd
(training uses the PyTorch path). Graphs of a batch never exchange messages, so threads sweep
different graphs (:func:`graph_parts`); the order within a graph, hence every value, is the
same for any thread count.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; keep the PyTorch path working
    numba = None

from ghn_onnx.graph.batch import GraphBatch


def available() -> bool:
    return numba is not None


def _csr(n: int, recv: np.ndarray, send: np.ndarray, dist: np.ndarray):
    order = np.argsort(recv, kind="stable")
    indptr = np.concatenate([[0], np.cumsum(np.bincount(recv, minlength=n))]).astype(np.int64)
    d = dist[order].astype(np.float32)
    return indptr, send[order].astype(np.int64), (d == 1).astype(np.float32), (1.0 / d).astype(np.float32)


def sweep_structure(batch: GraphBatch) -> tuple:
    """In-edge (forward) and out-edge (backward) CSR arrays, built once per batch."""
    cache = batch.__dict__.get("_fused_csr")
    if cache is None:
        e = batch.edges
        n = batch.n_nodes
        cache = _csr(n, e[:, 1], e[:, 0], e[:, 2]) + _csr(n, e[:, 0], e[:, 1], e[:, 2])
        batch.__dict__["_fused_csr"] = cache
    return cache


def graph_parts(batch: GraphBatch, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """The graphs dealt to ``parts`` threads, balanced by work (nodes and edges): graphs are
    independent, so each thread sweeps its graphs one after another. Returns ``(part_ptr,
    graph_ids)``: part ``p`` sweeps ``graph_ids[part_ptr[p]:part_ptr[p + 1]]``."""
    key = ("_fused_parts", parts)
    if key not in batch.__dict__:
        sizes = np.diff(batch.offsets)
        edges = np.bincount(np.searchsorted(batch.offsets, batch.edges[:, 1], side="right") - 1,
                            minlength=len(sizes)) if len(batch.edges) else np.zeros(len(sizes), np.int64)
        work = 200 * sizes + edges  # a node update costs about as much as 200 edge messages
        load = np.zeros(parts)
        dealt: list[list[int]] = [[] for _ in range(parts)]
        for g in np.argsort(-work, kind="stable"):  # largest first, to the least loaded part
            p = int(np.argmin(load))
            dealt[p].append(int(g))
            load[p] += work[g]
        ptr = np.cumsum([0] + [len(d) for d in dealt]).astype(np.int64)
        ids = np.array([g for d in dealt for g in sorted(d)], dtype=np.int64)
        batch.__dict__[key] = (ptr, ids)
    return batch.__dict__[key]


def run(gnn, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
    """Forward then backward sweep of ``gnn`` (a GatedGNN) on CPU states ``h (N, hid)``."""
    def np32(t, transpose=False):
        t = t.detach().cpu()
        return np.ascontiguousarray((t.t() if transpose else t).numpy(), dtype=np.float32)

    mlp, ve = gnn.mlp.fc, gnn.mlp_ve.fc if gnn.mlp_ve is not None else gnn.mlp.fc
    # weights transposed (in, out): the loops keep the output axis innermost, see _mlp
    weights = (np32(mlp[0].weight, True), np32(mlp[0].bias), np32(mlp[2].weight, True), np32(mlp[2].bias),
               np32(ve[0].weight, True), np32(ve[0].bias), np32(ve[2].weight, True), np32(ve[2].bias),
               np32(gnn.gru.weight_ih, True), np32(gnn.gru.bias_ih), np32(gnn.gru.weight_hh, True),
               np32(gnn.gru.bias_hh))
    state = np.array(np32(h), dtype=np.float32, copy=True)
    part_ptr, graph_ids = graph_parts(batch, max(1, min(numba.get_num_threads(), len(batch.graphs))))
    _sweeps(state, batch.offsets.astype(np.int64), part_ptr, graph_ids, *sweep_structure(batch), *weights,
            gnn.mlp_ve is not None)
    return torch.from_numpy(state)


if numba is not None:
    @numba.njit(cache=True, inline="always")
    def _mlp(h, row, w1t, b1, w2t, b2, tmp, out):
        """``out[row] = relu(W2 relu(W1 h[row] + b1) + b2)`` with transposed weights: the output
        index is the inner loop, so LLVM vectorises it without reassociating any sum (the order
        of a dot product, bit for bit). Whole arrays and row indices rather than row views:
        views cost a reference count each."""
        half = w1t.shape[1]
        hid = h.shape[1]
        for j in range(half):
            tmp[j] = b1[j]
        for k in range(hid):
            xk = h[row, k]
            for j in range(half):
                tmp[j] += w1t[k, j] * xk
        for j in range(half):
            tmp[j] = max(tmp[j], np.float32(0.0))
        for j in range(hid):
            out[row, j] = b2[j]
        for k in range(half):
            tk = tmp[k]
            for j in range(hid):
                out[row, j] += w2t[k, j] * tk
        for j in range(hid):
            out[row, j] = max(out[row, j], np.float32(0.0))

    @numba.njit(cache=True, inline="always")
    def _gru(h, v, m, w_iht, b_ih, w_hht, b_hh, gi, gh):
        """``h[v] = GRUCell(m, h[v])`` (PyTorch's gate order r, z, n)."""
        hid = h.shape[1]
        for j in range(3 * hid):
            gi[j] = b_ih[j]
            gh[j] = b_hh[j]
        for k in range(hid):
            mk = m[k]
            hk = h[v, k]
            for j in range(3 * hid):
                gi[j] += w_iht[k, j] * mk
                gh[j] += w_hht[k, j] * hk
        one = np.float32(1.0)
        for j in range(hid):
            r = one / (one + np.exp(-(gi[j] + gh[j])))
            z = one / (one + np.exp(-(gi[hid + j] + gh[hid + j])))
            n = np.tanh(gi[2 * hid + j] + r * gh[2 * hid + j])
            h[v, j] = (one - z) * n + z * h[v, j]

    @numba.njit(cache=True, parallel=True)
    def _sweeps(h, offsets, part_ptr, graph_ids, f_ptr, f_src, f_one, f_inv, b_ptr, b_src, b_one, b_inv,
                w1, b1, w2, b2, v1, vb1, v2, vb2, w_ih, b_ih, w_hh, b_hh, use_ve):
        hid = h.shape[1]
        p1 = np.zeros(h.shape, dtype=np.float32)  # MLP(h) per node, refreshed after each update
        p2 = np.zeros(h.shape, dtype=np.float32)  # MLP_ve(h)
        for part in numba.prange(len(part_ptr) - 1):
            m = np.empty(hid, dtype=np.float32)
            tmp = np.empty(hid, dtype=np.float32)
            gi = np.empty(3 * hid, dtype=np.float32)
            gh = np.empty(3 * hid, dtype=np.float32)
            for gk in range(part_ptr[part], part_ptr[part + 1]):
                start, end = offsets[graph_ids[gk]], offsets[graph_ids[gk] + 1]
                for i in range(start, end):
                    _mlp(h, i, w1, b1, w2, b2, tmp, p1)
                    if use_ve:
                        _mlp(h, i, v1, vb1, v2, vb2, tmp, p2)
                for sweep in range(2):
                    ptr, src, one, inv = (f_ptr, f_src, f_one, f_inv) if sweep == 0 else (b_ptr, b_src, b_one, b_inv)
                    for step in range(end - start):
                        v = start + step if sweep == 0 else end - 1 - step
                        for k in range(hid):
                            m[k] = 0.0
                        for e in range(ptr[v], ptr[v + 1]):
                            u = src[e]
                            c1 = one[e]
                            cw = inv[e] if use_ve else np.float32(0.0)
                            for k in range(hid):
                                m[k] += c1 * p1[u, k] + cw * p2[u, k]
                        _gru(h, v, m, w_ih, b_ih, w_hh, b_hh, gi, gh)
                        _mlp(h, v, w1, b1, w2, b2, tmp, p1)
                        if use_ve:
                            _mlp(h, v, v1, vb1, v2, vb2, tmp, p2)
