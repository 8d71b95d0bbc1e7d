"""Drawing a GHN graph to PNG or SVG with matplotlib (the optional ``viz`` extra).

Nodes are placed by topological level, the longest path from the input, top to bottom, and
spread sideways within a level; colours follow the primitive, with a legend. The figure grows
with the graph's depth, so 50 to 800 nodes stay legible (zoom in on big ones).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive

FORMATS = ("png", "svg")

# Inches per level and per node within a level; caps keep very deep graphs inside the sizes
# that matplotlib's raster backend accepts (2**16 pixels a side).
_LEVEL_IN, _SLOT_IN, _MAX_HEIGHT_IN, _MAX_WIDTH_IN = 0.28, 0.7, 250.0, 60.0
_DPI = 100

# One fixed colour per primitive so a primitive looks the same in every drawing; related
# primitives share a hue (pools blue, grouped convs orange, norms red, merges grey).
COLOURS: dict[Primitive, str] = {
    Primitive.MAX_POOL: "#1f77b4", Primitive.AVG_POOL: "#aec7e8",
    Primitive.SEP_CONV: "#ff7f0e", Primitive.DIL_CONV: "#ffbb78",
    Primitive.CONV: "#2ca02c", Primitive.MSA: "#e377c2", Primitive.CSE: "#9467bd",
    Primitive.SUM: "#7f7f7f", Primitive.CONCAT: "#c7c7c7", Primitive.INPUT: "#000000",
    Primitive.BIAS: "#bcbd22", Primitive.BN: "#d62728", Primitive.LN: "#ff9896",
    Primitive.POS_ENC: "#17becf", Primitive.GLOB_AVG: "#8c564b",
}


class DrawingUnavailableError(ImportError):
    """matplotlib, the ``viz`` extra, is not installed."""


def levels(graph: Graph) -> np.ndarray:
    """``(N,)`` longest-path depth of each node from the sources.

    Sources other than the input (a positional encoding feeding its ``sum``) are moved to just
    above their first consumer so that they sit beside what they feed, not at the top.
    """
    n = len(graph)
    level = np.zeros(n, dtype=np.int64)
    has_pred = np.zeros(n, dtype=bool)
    # Edges go forwards (src < dst), so in order of source each source's level is final when read.
    for s, d in graph.edges[np.argsort(graph.edges[:, 0], kind="stable")]:
        level[d] = max(level[d], level[s] + 1)
        has_pred[d] = True
    for i in range(1, n):
        if not has_pred[i]:
            succ = graph.edges[graph.edges[:, 0] == i, 1]
            if len(succ):
                level[i] = max(level[succ].min() - 1, 0)
    return level


def layout(graph: Graph) -> np.ndarray:
    """``(N, 2)`` positions: x spreads a level's nodes around 0, y is minus the level.

    Within a level, nodes are ordered by the mean x of their predecessors, which keeps chains
    straight and reduces crossings.
    """
    level = levels(graph)
    preds: dict[int, list[int]] = {}
    for s, d in graph.edges:
        preds.setdefault(int(d), []).append(int(s))
    pos = np.zeros((len(graph), 2))
    pos[:, 1] = -level
    for lv in range(int(level.max()) + 1 if len(level) else 0):
        members = np.flatnonzero(level == lv)
        centre = [np.mean(pos[preds[i], 0]) if i in preds else 0.0 for i in members]
        ordered = members[np.argsort(centre, kind="stable")]
        pos[ordered, 0] = np.arange(len(ordered)) - (len(ordered) - 1) / 2
    return pos


def edge_lines(graph: Graph, pos: np.ndarray, points: int = 16) -> list[np.ndarray]:
    """One polyline per edge: straight between adjacent levels; an edge that skips levels bows
    out sideways (a quadratic curve) so it is not hidden behind the chain it runs along."""
    t = np.linspace(0.0, 1.0, points)[:, None]
    lines = []
    for s, d in graph.edges:
        a, b = pos[s], pos[d]
        span = a[1] - b[1]
        if span <= 1:
            lines.append(np.stack([a, b]))
            continue
        side = 1.0 if (a[0] + b[0]) >= 0 else -1.0
        control = (a + b) / 2 + np.array([side * min(0.4 + 0.05 * span, 1.5), 0.0])
        lines.append((1 - t) ** 2 * a + 2 * (1 - t) * t * control + t ** 2 * b)
    return lines


def draw_graph(graph: Graph, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Draw ``graph`` to ``path`` (``png`` or ``svg``, by ``fmt`` or the file suffix).

    The figure is written to a temporary file beside ``path`` and renamed over it, so an
    interrupted run never leaves a half-written image.

    Raises:
        DrawingUnavailableError: matplotlib is not installed.
        ValueError: the format is neither png nor svg.
        OSError: the file cannot be written.
    """
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise ValueError(f"Expected an image format in {FORMATS} (got {fmt!r})")
    Figure, LineCollection, Line2D = _matplotlib()

    pos = layout(graph)
    depth = int(-pos[:, 1].min()) + 1
    breadth = int(np.ptp(pos[:, 0])) + 1
    height = min(max(4.0, depth * _LEVEL_IN), _MAX_HEIGHT_IN)
    width = min(max(6.0, breadth * _SLOT_IN + 3.0), _MAX_WIDTH_IN)

    # A bare Figure, not pyplot: no global state, no GUI backend, nothing to close.
    fig = Figure(figsize=(width, height))
    ax = fig.subplots()
    ax.add_collection(LineCollection(edge_lines(graph, pos), colors="0.55", linewidths=0.6, alpha=0.6, zorder=1))
    ax.scatter(pos[:, 0], pos[:, 1], c=[COLOURS[n.primitive] for n in graph.nodes], s=36,
               edgecolors="black", linewidths=0.4, zorder=2)
    counts = graph.counts()
    handles = [Line2D([], [], marker="o", linestyle="", markersize=7, markerfacecolor=COLOURS[p],
                      markeredgecolor="black", label=f"{p.label} ({counts[p.label]})")
               for p in Primitive if p.label in counts]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    ax.set_title(f"{graph.name}: {len(graph)} nodes, {len(graph.edges)} edges", fontsize=10, loc="left")
    ax.set_xlim(pos[:, 0].min() - 1, pos[:, 0].max() + 1)
    ax.set_ylim(pos[:, 1].min() - 1, 1)
    ax.set_axis_off()
    fig.tight_layout()
    _save_atomically(fig, path, fmt)
    return path


def _matplotlib():
    try:
        from matplotlib.collections import LineCollection
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError:
        raise DrawingUnavailableError("drawing needs matplotlib: pip install 'ghn-onnx[viz]'") from None
    return Figure, LineCollection, Line2D


def _save_atomically(fig, path: Path, fmt: str) -> None:
    # A hidden name in the same directory, so the rename is atomic; opened normally (not
    # mkstemp) so the image gets the usual permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format=fmt, dpi=_DPI, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
