"""The GatedGNN sweeps as one compiled loop over nodes (numba), for inference on CPU.

Why a compiled loop: with hidden size 32, one node update is ~8k multiply-adds, far less than
the fixed cost of a PyTorch op (~5-20 µs), and a graph has as many levels as it has depth, so a
level-by-level PyTorch sweep still launches ~10 ops per level (ResNet-50: 118 levels).
Here each node costs a few microseconds and there is no per-op overhead; bench/RESULTS.md
records the comparison. Same maths as :class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNN` (message
= ``one_hop · MLP(h_u) + inv_dist · MLP_ve(h_u)`` summed over a node's edges, then the GRU cell,
then both MLPs on the new state), no autograd (training uses the PyTorch path). It takes the
weights as :class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNNWeights` and the edges as the
node-order :class:`~ghn_onnx.ghn.hypernet.sweep_plan.SweepCSR`, like the Triton kernel (level
order). Graphs of a batch never exchange messages, so threads sweep different graphs
(:func:`graph_parts`); the order within a graph, hence every value, is the same for any thread
count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ghn_onnx.ghn import cpu_threads
from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN
from ghn_onnx.ghn.hypernet.sweep_plan import RowOrder, sweep_csr_plan
from ghn_onnx.graph.batch import GraphBatch


@dataclass(frozen=True)
class GraphParts:
    """The graphs of a batch dealt to threads: part ``p`` sweeps
    ``graph_ids[part_ptr[p]:part_ptr[p + 1]]``, one graph after another (host arrays, int64)."""

    device: str
    part_ptr: np.ndarray  # (parts + 1,)
    graph_ids: np.ndarray  # (B,) every graph once, ascending within a part


def _deal_graphs(batch: GraphBatch, device: object, parts: int) -> GraphParts:
    """:meth:`GraphBatch.plan` builder of :func:`graph_parts`."""
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
    return GraphParts(str(device), ptr, ids)


def graph_parts(batch: GraphBatch, parts: int) -> GraphParts:
    """The graphs dealt to ``parts`` threads, balanced by work (nodes and edges): graphs are
    independent, so each thread sweeps its graphs one after another. Built once per batch and
    part count."""
    return batch.plan(_deal_graphs, "cpu", (parts,))


#: Sweep work (:func:`_deal_graphs`' units: 200 per node plus 1 per edge) worth a thread of its
#: own: ~0.5 ms, a DeepNets graph; below it waking a worker costs more than it saves.
WORK_PER_THREAD = 25_000


def _threads(batch: GraphBatch) -> int:
    """The parts graphs are dealt to: the configured thread count, at most one per graph."""
    return max(1, min(cpu_threads.numba_configured_threads(), len(batch.graphs)))


def _work(batch: GraphBatch) -> int:
    return 200 * batch.n_nodes + len(batch.edges)


def prepare(batch: GraphBatch) -> None:
    """Build now what :func:`run` derives from ``batch`` alone (the CSR and the graph parts)."""
    sweep_csr_plan(batch, RowOrder.NODE)
    graph_parts(batch, _threads(batch))


def run(gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
    """Forward then backward sweep of ``gnn`` on CPU states ``h (N, hid)`` (not modified);
    returns the final states ``(N, hid)`` fp32, without autograd."""
    if h.device.type != "cpu":
        raise ValueError(f"Expected node states on the CPU (got {h.device})")
    if h.dim() != 2 or h.shape != (batch.n_nodes, gnn.hid):
        raise ValueError(f"Expected h of shape ({batch.n_nodes}, {gnn.hid}) (got {tuple(h.shape)})")
    w = gnn.packed_weights("cpu")  # transposed (in, out): the loops keep the output axis innermost
    csr = sweep_csr_plan(batch, RowOrder.NODE)
    parts = graph_parts(batch, _threads(batch))
    fwd, bwd = csr.forward, csr.backward
    state = np.array(np.ascontiguousarray(h.detach().numpy(), dtype=np.float32), dtype=np.float32, copy=True)
    # the parts run on as many threads as the machine spares (cpu_threads): same values for any count
    with cpu_threads.numba_threads(_work(batch), WORK_PER_THREAD, limit=len(parts.part_ptr) - 1):
        _sweeps(state, batch.offsets.astype(np.int64), parts.part_ptr, parts.graph_ids,
                fwd.edge_ptr, fwd.edge_src, fwd.edge_one_hop, fwd.edge_inv_dist,
                bwd.edge_ptr, bwd.edge_src, bwd.edge_one_hop, bwd.edge_inv_dist,
                *(t.numpy() for t in w.tensors()), w.use_ve)
    return torch.from_numpy(state)


# -- kernels ------------------------------------------------------------------------------------
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
            mlp_w1, mlp_b1, mlp_w2, mlp_b2, ve_w1, ve_b1, ve_w2, ve_b2, w_ih, b_ih, w_hh, b_hh, use_ve):
    """Both sweeps, in place on ``h (N, hid)``: arguments are :func:`run`'s ``GraphParts``, the
    forward and backward node-order ``SweepCSR`` (``edge_ptr, edge_src, edge_one_hop,
    edge_inv_dist``) and the 12 ``GatedGNNWeights`` tensors in field order."""
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
                _mlp(h, i, mlp_w1, mlp_b1, mlp_w2, mlp_b2, tmp, p1)
                if use_ve:
                    _mlp(h, i, ve_w1, ve_b1, ve_w2, ve_b2, tmp, p2)
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
                            m[k] += c1 * p1[u, k] + cw * p2[u, k]  # message, summed in edge order
                    _gru(h, v, m, w_ih, b_ih, w_hh, b_hh, gi, gh)
                    _mlp(h, v, mlp_w1, mlp_b1, mlp_w2, mlp_b2, tmp, p1)
                    if use_ve:
                        _mlp(h, v, ve_w1, ve_b1, ve_w2, ve_b2, tmp, p2)
