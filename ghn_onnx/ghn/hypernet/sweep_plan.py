r"""The message edges of each sweep as CSR arrays over receivers: the plan the compiled engines share.

A sweep updates every node once; node :math:`v` receives the messages of its in-edges
:math:`u \to v` in the forward sweep and of its out-edges (reversed) in the backward sweep
(:mod:`~ghn_onnx.ghn.hypernet.gatedgnn` gives the maths). A :class:`SweepCSR` stores those edges
grouped by receiving *row*, each row's edges in the order of ``GraphBatch.edges`` (so every engine
sums a node's messages in the same order). Rows come in two orders:

* :attr:`RowOrder.NODE`: row ``r`` is node ``r`` (the numba loop walks each graph's nodes in
  index order, a topological order);
* :attr:`RowOrder.LEVEL`: rows are *slots*, the nodes level-major as the batch's
  :class:`~ghn_onnx.graph.batch.SweepLevel` lists give them, so the nodes of a level, and the
  edges into them, are contiguous ranges (the Triton kernel takes a level's slots in tiles).

Host (numpy) arrays, built once per batch and order by :func:`sweep_csr` through
:meth:`GraphBatch.plan`; engines that need them on a device convert them into their own plan.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from ghn_onnx.graph.batch import GraphBatch, SweepLevel


class RowOrder(enum.Enum):
    NODE = "node"
    LEVEL = "level"


@dataclass(frozen=True)
class SweepCSR:
    """One sweep's message edges, CSR over receiving rows.

    Attributes:
        order: what a row is (:class:`RowOrder`).
        row_node: ``(N,)`` int64 node of each row (``arange(N)`` in node order).
        level_ptr: ``(n_levels + 1,)`` int64, level ``l`` is rows ``level_ptr[l] … level_ptr[l+1]``
            (level order); ``None`` in node order, where a level is not a range of rows.
        edge_ptr: ``(N + 1,)`` int64, the edges into row ``r`` are ``edge_ptr[r] … edge_ptr[r+1]``.
        edge_src: ``(E,)`` int64 sender node of each edge.
        edge_row: ``(E,)`` int64 receiving row of each edge (non-decreasing).
        edge_one_hop: ``(E,)`` float32, 1.0 for a one-hop edge (it feeds the message MLP), else 0.0.
        edge_inv_dist: ``(E,)`` float32, 1 / shortest-path distance (every edge feeds ``MLP_ve``).
    """

    order: RowOrder
    row_node: np.ndarray
    level_ptr: np.ndarray | None
    edge_ptr: np.ndarray
    edge_src: np.ndarray
    edge_row: np.ndarray
    edge_one_hop: np.ndarray
    edge_inv_dist: np.ndarray

    @property
    def level_widths(self) -> np.ndarray:
        """``(n_levels,)`` nodes per level (level order only)."""
        if self.level_ptr is None:
            raise ValueError("Expected a level-order SweepCSR (got node order)")
        return np.diff(self.level_ptr)


@dataclass(frozen=True)
class SweepCSRPlan:
    """Both sweeps of a batch in one row order: :attr:`forward` over in-edges, :attr:`backward`
    over out-edges. Host arrays: :attr:`device` is always ``"cpu"``."""

    device: str
    forward: SweepCSR
    backward: SweepCSR


def sweep_csr(batch: GraphBatch, device: object = "cpu", order: RowOrder = RowOrder.NODE) -> SweepCSRPlan:
    """The :class:`SweepCSRPlan` of ``batch`` in ``order``: a :meth:`GraphBatch.plan` builder, so
    call it as ``batch.plan(sweep_csr, "cpu", (order,))`` (see :func:`sweep_csr_plan`)."""
    if str(device) != "cpu":
        raise ValueError(f"Expected device 'cpu' for host CSR arrays (got {device})")
    e = batch.edges
    src, dst, dist = e[:, 0], e[:, 1], e[:, 2]
    return SweepCSRPlan("cpu", _sweep(batch, order, batch.forward, recv=dst, send=src, dist=dist),
                        _sweep(batch, order, batch.backward, recv=src, send=dst, dist=dist))


def sweep_csr_plan(batch: GraphBatch, order: RowOrder) -> SweepCSRPlan:
    """``batch``'s :class:`SweepCSRPlan` in ``order``, built on first use and kept by the batch."""
    return batch.plan(sweep_csr, "cpu", (order,))


def _sweep(batch: GraphBatch, order: RowOrder, levels: list[SweepLevel], recv: np.ndarray, send: np.ndarray,
           dist: np.ndarray) -> SweepCSR:
    n = batch.n_nodes
    if order is RowOrder.NODE:
        row_node = np.arange(n, dtype=np.int64)
        level_ptr = None
        edge_row = recv.astype(np.int64)
    else:
        widths = np.array([len(lv.nodes) for lv in levels], dtype=np.int64)
        level_ptr = np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)
        row_node = np.concatenate([lv.nodes for lv in levels]).astype(np.int64)
        row_of_node = np.empty(n, dtype=np.int64)
        row_of_node[row_node] = np.arange(n, dtype=np.int64)
        edge_row = row_of_node[recv]
    by_row = np.argsort(edge_row, kind="stable")  # a row's edges keep the batch's edge order
    edge_ptr = np.concatenate([[0], np.cumsum(np.bincount(edge_row, minlength=n))]).astype(np.int64)
    d = dist[by_row].astype(np.float32)
    return SweepCSR(
        order=order,
        row_node=row_node,
        level_ptr=level_ptr,
        edge_ptr=edge_ptr,
        edge_src=send[by_row].astype(np.int64),
        edge_row=edge_row[by_row],
        edge_one_hop=(d == 1).astype(np.float32),
        edge_inv_dist=(1.0 / d).astype(np.float32),
    )
