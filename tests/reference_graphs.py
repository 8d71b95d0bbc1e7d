"""Comparing our graphs with the reference's ``<name>.graph.json`` up to node order.

Parametrised nodes are identified by the parameter they carry; the others (sum, concat, pooling,
...) by their type and, recursively, the identities of their predecessors. Two graphs are equal
when the multisets of node identities and of edges between identities are equal.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from ghn_onnx.graph.graph import Graph

PARAMETRISED = {"conv", "sep_conv", "dil_conv", "bias", "bn", "ln", "pos_enc"}


def _labels(types: list[str], params: list[str | None], edges: list[tuple[int, int]]) -> list:
    preds: dict[int, list[int]] = {}
    for s, d in edges:
        preds.setdefault(d, []).append(s)
    labels: list = [None] * len(types)
    for i in range(len(types)):  # nodes are in topological order
        if types[i] in PARAMETRISED or types[i] == "input":
            labels[i] = (types[i], params[i])
        else:
            labels[i] = (types[i], tuple(sorted(map(repr, (labels[p] for p in preds.get(i, []))))))
    return labels


def identities(types, params, edges) -> tuple[Counter, Counter]:
    labels = _labels(types, params, edges)
    return Counter(map(repr, labels)), Counter((repr(labels[s]), repr(labels[d])) for s, d in edges)


def load_reference(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def compare(graph: Graph, ref: dict) -> list[str]:
    """Differences between ``graph`` and a reference graph, as readable lines (empty if equal)."""
    ours = identities([n.primitive.label for n in graph.nodes], [n.name for n in graph.nodes],
                      [tuple(e) for e in graph.edges.tolist()])
    theirs = identities([n["type"] for n in ref["nodes"]], [n["param"] for n in ref["nodes"]],
                        [tuple(e) for e in ref["edges"]])
    problems = []
    for what, a, b in (("node", ours[0], theirs[0]), ("edge", ours[1], theirs[1])):
        extra, missing = a - b, b - a
        for k, v in list(extra.items())[:5]:
            problems.append(f"extra {what} x{v}: {k}")
        for k, v in list(missing.items())[:5]:
            problems.append(f"missing {what} x{v}: {k}")
    n_ve = len(graph.edges_with_virtual())
    if n_ve != ref["n_edges_with_virtual"]:
        problems.append(f"edges with virtual: {n_ve} != {ref['n_edges_with_virtual']}")
    return problems


# -- structure only: the same network from another exporter or framework ------------------------

def structural_labels(types: list[str], shapes: list, edges: list[tuple[int, int]]) -> list[str]:
    """A label per node that ignores parameter names: a digest of the node's type, its canonical
    shape (``None`` to leave shapes out) and, recursively, the labels of its predecessors.

    Digests, not nested tuples: ancestors shared along residual paths would make nested labels
    grow exponentially. Nodes in symmetric places (the q, k and v projections of one attention
    block) get the same label; the GHN cannot tell them apart either.
    """
    preds: dict[int, list[int]] = {}
    for s, d in edges:
        preds.setdefault(d, []).append(s)
    labels: list[str] = [""] * len(types)
    for i in range(len(types)):  # nodes are in topological order
        shape = None if shapes[i] is None else tuple(int(v) for v in shapes[i])
        key = repr((types[i], shape, sorted(labels[p] for p in preds.get(i, []))))
        labels[i] = f"{types[i]}:{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    return labels


def graph_structural_labels(graph: Graph, shapes: bool = True) -> list[str]:
    return structural_labels([n.primitive.label for n in graph.nodes],
                             [n.shape if shapes else None for n in graph.nodes],
                             [tuple(e) for e in graph.edges.tolist()])


def structural_identities(types, shapes, edges) -> tuple[Counter, Counter]:
    """Like :func:`identities`, with :func:`structural_labels` in place of parameter names."""
    labels = structural_labels(types, shapes, edges)
    return Counter(labels), Counter((labels[s], labels[d]) for s, d in edges)


def compare_structure(a: Graph, b: Graph, shapes: bool = True) -> list[str]:
    """Differences between two graphs up to node order and parameter names (empty if equal):
    the same primitives with the same canonical shapes (unless ``shapes`` is False), wired the
    same way."""
    ours, theirs = (structural_identities([n.primitive.label for n in g.nodes],
                                          [n.shape if shapes else None for n in g.nodes],
                                          [tuple(e) for e in g.edges.tolist()]) for g in (a, b))
    problems = []
    if len(a) != len(b):
        problems.append(f"node count {len(a)} != {len(b)}")
    for what, x, y in (("node", ours[0], theirs[0]), ("edge", ours[1], theirs[1])):
        for k, v in list((x - y).items())[:5]:
            problems.append(f"extra {what} x{v}: {k}")
        for k, v in list((y - x).items())[:5]:
            problems.append(f"missing {what} x{v}: {k}")
    return problems
