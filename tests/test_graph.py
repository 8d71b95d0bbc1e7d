"""The graph data model: 4-D shape view, layouts, virtual edges."""

from __future__ import annotations

import numpy as np
import pytest

from ghn_onnx.graph.graph import Graph, Layout, LayoutStep, Node, ParamRef, to_4d, topological_order
from ghn_onnx.graph.primitives import Primitive


@pytest.mark.parametrize("shape, expected", [
    ((10,), (10, 1, 1, 1)),                    # 1-D: bias, norm scale
    ((10, 512), (10, 512, 1, 1)),              # 2-D: linear weight
    ((1, 197, 768), (1, 768, 14, 14)),         # (1, T, C) positional embedding: floor(sqrt(197)) = 14
    ((1, 50, 8), (1, 8, 7, 7)),                # floor(sqrt(50)) = 7
    ((1, 1, 8), (1, 1, 8, 1)),                 # T == 1: not a positional embedding
    ((4, 5, 6), (4, 5, 6, 1)),                 # other 3-D
    ((64, 3, 3, 3), (64, 3, 3, 3)),            # 4-D as it is
])
def test_to_4d(shape, expected):
    assert to_4d(shape) == expected


def test_to_4d_rejects_rank_5():
    with pytest.raises(ValueError, match="rank 1-4"):
        to_4d((1, 2, 3, 4, 5))


def test_layout_round_trip():
    stored = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    layout = Layout().then(LayoutStep("transpose", (2, 0, 1))).then(LayoutStep("reshape", ((4, 2, 3), (4, 6))))
    canonical = layout.to_canonical(stored)
    assert canonical.shape == layout.canonical_shape(stored.shape) == (4, 6)
    np.testing.assert_array_equal(canonical, stored.transpose(2, 0, 1).reshape(4, 6))
    back = layout.to_stored(canonical)
    np.testing.assert_array_equal(back, stored)
    assert back.flags["C_CONTIGUOUS"]
    assert layout.describe() == "transpose[2, 0, 1] -> reshape[4, 6]"
    assert Layout().describe() == "as stored"


def test_param_ref_shapes():
    ref = ParamRef("w", "weight", (3, 10), 1, Layout((LayoutStep("transpose", (1, 0)),)))
    assert ref.canonical_shape == (10, 3)
    assert ref.numel == 30


def chain(n: int) -> Graph:
    nodes = [Node(Primitive.INPUT, "input")] + [Node(Primitive.CONV, f"c{i}", (4, 4, 1, 1)) for i in range(n - 1)]
    return Graph(nodes, [(i, i + 1) for i in range(n - 1)])


def test_virtual_edges_of_a_chain():
    ve = chain(4).edges_with_virtual()
    # Every ordered pair along a 4-chain: 3 at distance 1, 2 at distance 2, 1 at distance 3.
    assert len(ve) == 6
    assert sorted(ve[:, 2].tolist()) == [1, 1, 1, 2, 2, 3]
    assert all(d == dst - src for src, dst, d in ve.tolist())


def test_virtual_edge_cutoff():
    assert len(chain(4).edges_with_virtual(cutoff=2)) == 5
    assert len(chain(4).edges_with_virtual(cutoff=1)) == 3


def test_graph_rejects_backward_edges():
    with pytest.raises(ValueError, match="topological order"):
        Graph([Node(Primitive.INPUT, "input"), Node(Primitive.SUM, "s")], [(1, 0)])


def test_topological_order_keeps_a_sorted_numbering_and_finds_cycles():
    assert topological_order(4, [(0, 1), (0, 2), (1, 3), (2, 3)]) == [0, 1, 2, 3]
    assert topological_order(3, [(2, 0), (0, 1)]) == [2, 0, 1]
    with pytest.raises(ValueError, match="cycle"):
        topological_order(2, [(0, 1), (1, 0)])


def test_counts():
    assert chain(3).counts() == {"input": 1, "conv": 2}


def _bfs_distances(n: int, edges: list[tuple[int, int]], cutoff: int) -> np.ndarray:
    out = np.zeros((n, n), np.int64)
    succ: list[list[int]] = [[] for _ in range(n)]
    for s, d in edges:
        succ[s].append(d)
    for s in range(n):
        seen, frontier, depth = {s}, [s], 0
        while frontier and depth < cutoff:
            depth += 1
            frontier = [d for u in frontier for d in succ[u] if d not in seen and not seen.add(d)]
            for d in frontier:
                out[s, d] = depth
    return out


@pytest.mark.parametrize("seed", range(20))
def test_distances_equal_breadth_first_search(seed):
    """Random DAGs (skips, fan-in, repeated edges, unreachable nodes) against a plain BFS."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 60))
    edges = sorted({(int(s), int(d)) for d in range(1, n) for s in rng.integers(0, d, rng.integers(0, 4))})
    edges += edges[:3]  # a repeated edge changes nothing
    g = Graph([Node(Primitive.INPUT, "input")] + [Node(Primitive.SUM, f"s{i}") for i in range(1, n)], edges)
    for cutoff in (1, 2, 5, 50):
        assert np.array_equal(g.distances(cutoff), _bfs_distances(n, edges, cutoff)), cutoff
