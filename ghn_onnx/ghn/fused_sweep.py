"""The GatedGNN sweeps as one compiled loop over nodes (numba), for inference on CPU.

Why a compiled loop: with hidden size 32, one node update is ~8k multiply-adds, far less than
the fixed cost of a PyTorch op (~5-20 µs), and a graph has as many levels as it has depth, so a
level-by-level PyTorch sweep still launches ~10 ops per level (ResNet-50: 118 levels).
Here each node costs a few microseconds and there is no per-op overhead; bench/RESULTS.md
records the comparison. Same maths as :class:`~ghn_onnx.ghn.gatedgnn.GatedGNN`; no autograd
(training uses the PyTorch path).
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; keep the PyTorch path working
    numba = None

from ghn_onnx.batch import GraphBatch


def available() -> bool:
    return numba is not None


def _csr(n: int, recv: np.ndarray, send: np.ndarray, dist: np.ndarray):
    order = np.argsort(recv, kind="stable")
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, recv + 1, 1)
    indptr = np.cumsum(indptr)
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


def run(gnn, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
    """Forward then backward sweep of ``gnn`` (a GatedGNN) on CPU states ``h (N, hid)``."""
    def np32(t):
        return t.detach().cpu().numpy().astype(np.float32, copy=False)

    mlp, ve = gnn.mlp.fc, gnn.mlp_ve.fc if gnn.mlp_ve is not None else gnn.mlp.fc
    weights = (np32(mlp[0].weight), np32(mlp[0].bias), np32(mlp[2].weight), np32(mlp[2].bias),
               np32(ve[0].weight), np32(ve[0].bias), np32(ve[2].weight), np32(ve[2].bias),
               np32(gnn.gru.weight_ih), np32(gnn.gru.bias_ih), np32(gnn.gru.weight_hh), np32(gnn.gru.bias_hh))
    state = np.array(np32(h), dtype=np.float32, copy=True)
    _sweeps(state, *sweep_structure(batch), *weights, gnn.mlp_ve is not None)
    return torch.from_numpy(state)


if numba is not None:
    @numba.njit(cache=True, fastmath=False)
    def _mlp(x, w1, b1, w2, b2, out):
        hid_half = w1.shape[0]
        tmp = np.empty(hid_half, dtype=np.float32)
        for j in range(hid_half):
            acc = b1[j]
            for k in range(x.shape[0]):
                acc += w1[j, k] * x[k]
            tmp[j] = acc if acc > 0 else 0.0
        for j in range(w2.shape[0]):
            acc = b2[j]
            for k in range(hid_half):
                acc += w2[j, k] * tmp[k]
            out[j] = acc if acc > 0 else 0.0

    @numba.njit(cache=True, fastmath=False)
    def _gru(m, h, w_ih, b_ih, w_hh, b_hh, out):
        hid = h.shape[0]
        gi = np.empty(3 * hid, dtype=np.float32)
        gh = np.empty(3 * hid, dtype=np.float32)
        for j in range(3 * hid):
            a = b_ih[j]
            c = b_hh[j]
            for k in range(hid):
                a += w_ih[j, k] * m[k]
                c += w_hh[j, k] * h[k]
            gi[j] = a
            gh[j] = c
        for j in range(hid):
            r = 1.0 / (1.0 + np.exp(-(gi[j] + gh[j])))
            z = 1.0 / (1.0 + np.exp(-(gi[hid + j] + gh[hid + j])))
            n = np.tanh(gi[2 * hid + j] + r * gh[2 * hid + j])
            out[j] = (1.0 - z) * n + z * h[j]

    @numba.njit(cache=True, fastmath=False)
    def _sweeps(h, f_ptr, f_src, f_one, f_inv, b_ptr, b_src, b_one, b_inv,
                w1, b1, w2, b2, v1, vb1, v2, vb2, w_ih, b_ih, w_hh, b_hh, use_ve):
        n, hid = h.shape
        proj = np.zeros((n, 2 * hid), dtype=np.float32)
        m = np.empty(hid, dtype=np.float32)
        new = np.empty(hid, dtype=np.float32)
        for i in range(n):
            _mlp(h[i], w1, b1, w2, b2, proj[i, :hid])
            if use_ve:
                _mlp(h[i], v1, vb1, v2, vb2, proj[i, hid:])
        for sweep in range(2):
            ptr, src, one, inv = (f_ptr, f_src, f_one, f_inv) if sweep == 0 else (b_ptr, b_src, b_one, b_inv)
            for step in range(n):
                v = step if sweep == 0 else n - 1 - step
                m[:] = 0.0
                for e in range(ptr[v], ptr[v + 1]):
                    u = src[e]
                    c1 = one[e]
                    cw = inv[e] if use_ve else 0.0
                    for k in range(hid):
                        m[k] += c1 * proj[u, k] + cw * proj[u, hid + k]
                _gru(m, h[v], w_ih, b_ih, w_hh, b_hh, new)
                h[v, :] = new
                _mlp(h[v], w1, b1, w2, b2, proj[v, :hid])
                if use_ve:
                    _mlp(h[v], v1, vb1, v2, vb2, proj[v, hid:])
