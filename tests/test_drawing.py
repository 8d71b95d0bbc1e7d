"""Graph drawing: levels, positions, files."""

from __future__ import annotations

import numpy as np
import pytest

from ghn_onnx.report.drawing import draw_graph, edge_lines, layout, levels
from ghn_onnx.graph.graph import Graph, Node
from ghn_onnx.graph.primitives import Primitive


def residual() -> Graph:
    """input -> conv -> conv -> sum, with input -> sum, and a pos_enc leaf into the sum."""
    nodes = [Node(Primitive.INPUT, "input"), Node(Primitive.CONV, "a", (4, 3, 3, 3)),
             Node(Primitive.POS_ENC, "p", (1, 4, 2, 2)), Node(Primitive.CONV, "b", (4, 4, 3, 3)),
             Node(Primitive.SUM, "s")]
    return Graph(nodes, [(0, 1), (1, 3), (0, 4), (2, 4), (3, 4)], name="residual")


def test_levels_are_longest_paths_and_leaves_sit_above_their_consumer():
    assert levels(residual()).tolist() == [0, 1, 2, 2, 3]


def test_levels_do_not_depend_on_edge_order():
    g = residual()
    shuffled = Graph(g.nodes, g.edges[::-1].copy())
    assert levels(shuffled).tolist() == levels(g).tolist()


def test_layout_gives_distinct_positions():
    pos = layout(residual())
    assert pos.shape == (5, 2)
    assert len({tuple(p) for p in pos.tolist()}) == 5
    assert pos[:, 1].tolist() == [0, -1, -2, -2, -3]


def test_edges_that_skip_levels_bow_out():
    g = residual()
    lines = edge_lines(g, layout(g))
    assert len(lines) == len(g.edges)
    skip = lines[[tuple(e) for e in g.edges.tolist()].index((0, 4))]
    assert len(skip) > 2 and np.ptp(skip[:, 0]) > 0.2  # curved, not along the x = 0 column


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_draw_writes_the_file_and_nothing_else(tmp_path, suffix):
    out = draw_graph(residual(), tmp_path / f"g.{suffix}")
    assert out.stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir()] == [f"g.{suffix}"]


def test_draw_rejects_other_formats(tmp_path):
    with pytest.raises(ValueError, match="image format"):
        draw_graph(residual(), tmp_path / "g.pdf")
    assert list(tmp_path.iterdir()) == []
