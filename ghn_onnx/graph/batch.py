"""Several graphs as one structure for the GHN: global node ids, edges with distances, and the
topological levels that let a sweep update every independent node at once (GHN-2's message
passing; computed on first use of :attr:`GraphBatch.forward` / :attr:`GraphBatch.backward`, as a
plan, so a GHN-3 transformer, which never reads them, never pays for them).

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


@dataclass(frozen=True)
class SweepLevels:
    """The forward and backward sweeps of a batch (see the module docstring)."""

    device: str
    forward: list[SweepLevel]
    backward: list[SweepLevel]


@dataclass
class GraphBatch:
    graphs: list[Graph]
    offsets: np.ndarray  # (B + 1,)
    edges: np.ndarray  # (E, 3) global [src, dst, dist], dist == 1 for one-hop edges
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
    def forward(self) -> list[SweepLevel]:
        """The levels of the forward sweep, lowest first."""
        return self.plan(sweep_levels).forward

    @property
    def backward(self) -> list[SweepLevel]:
        """The levels of the backward sweep (longest path to a sink), lowest first."""
        return self.plan(sweep_levels).backward

    @property
    def n_nodes(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def build(cls, graphs: list[Graph], cutoff: int = 50, virtual: bool = True) -> "GraphBatch":
        if not graphs:
            raise ValueError("Expected at least one graph")
        sizes = np.array([len(g) for g in graphs], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        all_edges = []
        for g, off in zip(graphs, offsets[:-1]):
            e = g.edges_with_virtual(cutoff) if virtual else np.concatenate(
                [g.edges, np.ones((len(g.edges), 1), dtype=np.int64)], axis=1)
            all_edges.append(e + np.array([off, off, 0]))
        edges = np.concatenate(all_edges) if all_edges else np.zeros((0, 3), dtype=np.int64)
        return cls(list(graphs), offsets, edges)


def sweep_levels(batch: GraphBatch, device: object = "cpu") -> SweepLevels:
    """The batch's forward and backward sweeps (numpy, so one plan serves every device): levels
    from each graph's one-hop edges, messages along every edge of :attr:`GraphBatch.edges`."""
    levels = [longest_path_levels(len(g), g.edges) for g in batch.graphs]
    fwd = np.concatenate([f for f, _ in levels])
    bwd = np.concatenate([b for _, b in levels])
    e = batch.edges
    return SweepLevels(str(device), _sweep(fwd, e[:, 0], e[:, 1], e[:, 2]), _sweep(bwd, e[:, 1], e[:, 0], e[:, 2]))


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
