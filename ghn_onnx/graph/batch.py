"""Several graphs as one structure for the GHN: global node ids, edges with distances, and the
topological levels that let a sweep update every independent node at once.

Node ``i`` of graph ``b`` has global id ``offsets[b] + i``. A node's forward level is the length
of the longest one-hop path reaching it; all nodes of a level depend only on lower levels, so a
forward sweep can update them together (likewise backwards with the longest path leaving it).
Virtual edges never break this: they join an ancestor to a descendant.

What an engine derives from the graphs alone (device index tensors, CSR arrays, decoding plans)
is a *plan*: a frozen dataclass built once by :meth:`GraphBatch.plan` and owned by the batch,
keyed by the function that builds it, the device it lives on and any extra key. The graphs of a
batch never change, so plans never go stale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, TypeVar

import numpy as np

from ghn_onnx.graph.graph import Graph

P = TypeVar("P")


@dataclass
class SweepLevel:
    """One level of a sweep, with the edges that bring messages into it.

    Attributes:
        nodes: ``(L,)`` global ids of the nodes updated at this level.
        src: ``(E_L,)`` global ids of message senders.
        dst: ``(E_L,)`` position in ``nodes`` of each receiver.
        one_hop: ``(E_L,)`` 1.0 for real edges (they feed the one-hop MLP), else 0.0.
        inv_dist: ``(E_L,)`` 1 / shortest-path length (every edge feeds the virtual-edge MLP).
    """

    nodes: np.ndarray
    src: np.ndarray
    dst: np.ndarray
    one_hop: np.ndarray
    inv_dist: np.ndarray


@dataclass
class GraphBatch:
    graphs: list[Graph]
    offsets: np.ndarray  # (B + 1,)
    edges: np.ndarray  # (E, 3) global [src, dst, dist], dist == 1 for one-hop edges
    forward: list[SweepLevel]
    backward: list[SweepLevel]
    _plans: dict[tuple, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def plan(self, build: Callable[..., P], device: object = "cpu", key: tuple[Hashable, ...] = ()) -> P:
        """``build(self, device, *key)``, built on first use and kept: one plan per builder,
        device and key. ``device`` is anything whose ``str`` names a device (a string or a
        ``torch.device``); the builder receives it as given."""
        cache_key = (build.__module__, build.__qualname__, str(device), key)
        found = self._plans.get(cache_key)
        if found is None:
            found = self._plans[cache_key] = build(self, device, *key)
        return found  # type: ignore[return-value]

    @property
    def n_nodes(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def build(cls, graphs: list[Graph], cutoff: int = 50, virtual: bool = True) -> "GraphBatch":
        if not graphs:
            raise ValueError("Expected at least one graph")
        sizes = np.array([len(g) for g in graphs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        all_edges, fwd_lv, bwd_lv = [], [], []
        for g, off in zip(graphs, offsets[:-1]):
            e = g.edges_with_virtual(cutoff) if virtual else np.concatenate(
                [g.edges, np.ones((len(g.edges), 1), dtype=np.int64)], axis=1)
            all_edges.append(e + np.array([off, off, 0]))
            f, b = longest_path_levels(len(g), g.edges)
            fwd_lv.append(f)
            bwd_lv.append(b)
        edges = np.concatenate(all_edges) if all_edges else np.zeros((0, 3), dtype=np.int64)
        fwd = np.concatenate(fwd_lv)
        bwd = np.concatenate(bwd_lv)
        forward = _sweep(fwd, edges[:, 0], edges[:, 1], edges[:, 2])
        backward = _sweep(bwd, edges[:, 1], edges[:, 0], edges[:, 2])
        return cls(list(graphs), offsets, edges, forward, backward)


def longest_path_levels(n: int, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Forward and backward levels of an edge list given in topological order (src < dst)."""
    fwd = np.zeros(n, dtype=np.int64)
    bwd = np.zeros(n, dtype=np.int64)
    order = np.argsort(edges[:, 1], kind="stable") if len(edges) else []
    for s, d in edges[order] if len(edges) else []:
        fwd[d] = max(fwd[d], fwd[s] + 1)
    order = np.argsort(-edges[:, 0], kind="stable") if len(edges) else []
    for s, d in edges[order] if len(edges) else []:
        bwd[s] = max(bwd[s], bwd[d] + 1)
    return fwd, bwd


def _sweep(level: np.ndarray, src: np.ndarray, dst: np.ndarray, dist: np.ndarray) -> list[SweepLevel]:
    out = []
    # Each node sits in exactly one level: its position there, computed once for all levels.
    by_level = np.argsort(level, kind="stable")
    starts = np.searchsorted(level[by_level], np.arange(int(level.max()) + 2 if len(level) else 1))
    pos = np.empty(len(level), dtype=np.int64)
    pos[by_level] = np.arange(len(level)) - starts[level[by_level]]
    edge_order = np.argsort(level[dst], kind="stable")
    edge_starts = np.searchsorted(level[dst][edge_order], np.arange(len(starts)))
    for lv in range(len(starts) - 1):
        nodes = by_level[starts[lv]:starts[lv + 1]]
        sel = edge_order[edge_starts[lv]:edge_starts[lv + 1]]
        out.append(SweepLevel(
            nodes=nodes,
            src=src[sel],
            dst=pos[dst[sel]],
            one_hop=(dist[sel] == 1).astype(np.float32),
            inv_dist=(1.0 / dist[sel]).astype(np.float32),
        ))
    return out
