"""The GHN's view of a network: typed nodes in topological order, one-hop edges, virtual edges.

A :class:`Graph` is what every later stage consumes. Each node is one of the 15
:class:`~ghn_onnx.graph.primitives.Primitive` types; a parametrised node knows the ONNX tensor(s) it
stands for and the :class:`Layout` that maps their stored form to the GHN's canonical form
(conv ``(out, in/groups, kh, kw)``, linear ``(out, in)``, 1-D ``(C,)``), so predictions can be
written back exactly where and how they were read.
"""

from __future__ import annotations

import functools
import math

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Sequence

import numpy as np

from ghn_onnx.graph.primitives import Primitive

#: Longest shortest path kept as a virtual edge (GHN-2's ``ve_cutoff``).
VIRTUAL_EDGE_CUTOFF = 50

Shape = tuple[int, ...]


@dataclass(frozen=True)
class LayoutStep:
    """One invertible step from the stored tensor towards its canonical form.

    ``transpose``: ``arg`` is the permutation; ``reshape``: ``arg`` is ``(from_shape, to_shape)``.
    Casts are not steps: the stored dtype is kept on the :class:`ParamRef` and restored on write.
    """

    kind: Literal["transpose", "reshape"]
    arg: tuple

    def forward(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "transpose":
            return np.transpose(a, self.arg)
        return np.reshape(a, self.arg[1])

    def inverse(self, a: np.ndarray) -> np.ndarray:
        if self.kind == "transpose":
            return np.transpose(a, np.argsort(self.arg))
        return np.reshape(a, self.arg[0])

    def out_shape(self, shape: Shape) -> Shape:
        if self.kind == "transpose":
            return tuple(shape[p] for p in self.arg)
        return tuple(self.arg[1])


@dataclass(frozen=True)
class Layout:
    """Stored → canonical as a sequence of :class:`LayoutStep`; the inverse writes back."""

    steps: tuple[LayoutStep, ...] = ()

    def then(self, step: LayoutStep) -> "Layout":
        return Layout(self.steps + (step,))

    def to_canonical(self, stored: np.ndarray) -> np.ndarray:
        for step in self.steps:
            stored = step.forward(stored)
        return stored

    def to_stored(self, canonical: np.ndarray) -> np.ndarray:
        for step in reversed(self.steps):
            canonical = step.inverse(canonical)
        return np.ascontiguousarray(canonical)

    def canonical_shape(self, stored_shape: Shape) -> Shape:
        for step in self.steps:
            stored_shape = step.out_shape(stored_shape)
        return tuple(stored_shape)

    def describe(self) -> str:
        if not self.steps:
            return "as stored"
        parts = []
        for s in self.steps:
            parts.append(f"transpose{list(s.arg)}" if s.kind == "transpose" else f"reshape{list(s.arg[1])}")
        return " -> ".join(parts)


@dataclass(frozen=True)
class ParamRef:
    """An ONNX tensor that a node's prediction is written to.

    Attributes:
        tensor: name of the stored tensor (an initializer, or the output of a ``Constant`` node).
        role: ``"weight"``, ``"bias"`` or ``"scale"`` (a norm's multiplicative parameter).
        stored_shape: shape as stored in the file.
        dtype: ONNX ``TensorProto`` element type as stored.
        layout: stored → canonical transform.
    """

    tensor: str
    role: Literal["weight", "bias", "scale"]
    stored_shape: Shape
    dtype: int
    layout: Layout = Layout()

    @functools.cached_property  # frozen: computed once (the decoder plans read it per tensor)
    def canonical_shape(self) -> Shape:
        return self.layout.canonical_shape(self.stored_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.stored_shape)


@dataclass(frozen=True)
class Node:
    """One GHN graph node.

    Attributes:
        primitive: the node type.
        name: the parameter name for parametrised nodes (the ONNX initializer name, matching the
            reference's ``module.weight`` names for PyTorch exports), else the ONNX node name.
        shape: canonical shape of the node's main parameter, ``(1, 1, kh, kw)`` for pooling,
            ``None`` for shape-free nodes (input, sum, concat, msa, cse, glob_avg).
        params: the tensors predicted for this node: ``(weight,)`` for convs and linears,
            ``(bias,)`` for bias nodes, ``(scale, bias)`` for norms (bias may be absent),
            ``(weight,)`` for positional encodings.
        groups: convolution groups (1 for everything else); the GHN's weight normalisation needs
            ``in / groups`` as fan-in.
    """

    primitive: Primitive
    name: str
    shape: Shape | None = None
    params: tuple[ParamRef, ...] = ()
    groups: int = 1

    @functools.cached_property  # frozen: computed once
    def shape4d(self) -> Shape | None:
        return to_4d(self.shape) if self.shape is not None else None


def to_4d(shape: Sequence[int]) -> Shape:
    """The GHN's 4-D view of a parameter shape (GHN2_FACTS §1.5 ``tensor_shape_to_4d``)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        return (shape[0], 1, 1, 1)
    if len(shape) == 2:
        return (shape[0], shape[1], 1, 1)
    if len(shape) == 3:
        if shape[0] == 1 and shape[1] > 1 and shape[2] > 1:  # (1, T, C) positional embedding
            s = int(np.floor(np.sqrt(shape[1])))
            return (1, shape[2], s, s)
        return (shape[0], shape[1], shape[2], 1)
    if len(shape) == 4:
        return shape
    raise ValueError(f"Expected a parameter of rank 1-4 (got shape {shape})")


@dataclass
class Graph:
    """A network as the GHN sees it.

    Attributes:
        nodes: in topological order; node 0 is ``input``; the classifier weight and bias are the
            last weight and bias nodes.
        edges: one-hop edges ``(E, 2)`` int64 ``[src, dst]`` with ``src < dst``.
        name: a label for reports (usually the file name).
        warnings: things a user needs to know about how the graph was read.
        unsupported: ONNX op type → parameter tensors that no primitive covers (left untouched).
        info: extra facts the converter found (e.g. ``bn_folded``).
    """

    nodes: list[Node]
    edges: np.ndarray
    name: str = ""
    warnings: list[str] = field(default_factory=list)
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        if len(self.edges) and not np.all(self.edges[:, 0] < self.edges[:, 1]):
            raise ValueError("Expected edges in topological order (src < dst)")

    def __len__(self) -> int:
        return len(self.nodes)

    def predicted_tensors(self) -> list[ParamRef]:
        return [p for n in self.nodes for p in n.params]

    def distances(self, cutoff: int = VIRTUAL_EDGE_CUTOFF) -> np.ndarray:
        """Dense ``(N, N)`` shortest-path lengths along edge direction; 0 where > cutoff or none.

        Why not a graph library: edges run forward (``src < dst``), so one pass in node order
        gives every source's distance to a node from its predecessors' (``d(s, v) = 1 + min over
        u -> v of d(s, u)``), in bytes instead of floats; and scipy's import alone cost 0.13 s
        of ``ghn-onnx predict``'s start-up.
        """
        n = len(self.nodes)
        if not 0 < cutoff < 255:
            raise ValueError(f"Expected 0 < cutoff < 255 (got {cutoff})")
        far = np.uint8(255)
        into = np.full((n, n), far, np.uint8)  # into[v, s]: length of the shortest path s -> v
        preds: list[list[int]] = [[] for _ in range(n)]
        for s, d in self.edges[:, :2].tolist():
            preds[d].append(s)
        for v, p in enumerate(preds):
            if p:
                best = into[p[0]] if len(p) == 1 else into[p].min(axis=0)
                into[v] = np.where(best < cutoff, best + np.uint8(1), far)
            into[v, v] = 0
        into[into == far] = 0
        return into.T.astype(np.int64)

    def edges_with_virtual(self, cutoff: int = VIRTUAL_EDGE_CUTOFF) -> np.ndarray:
        """``(E', 3)`` int64 ``[src, dst, dist]``: every pair joined by a path of length <= cutoff.

        ``dist == 1`` are the one-hop edges; GHN-2 weights the virtual-edge messages by 1/dist.
        """
        dist = self.distances(cutoff)
        src, dst = np.nonzero(dist)
        return np.stack([src, dst, dist[src, dst]], axis=1).astype(np.int64)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for n in self.nodes:
            out[n.primitive.label] = out.get(n.primitive.label, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly description, shaped like the reference's ``<name>.graph.json``."""
        return {
            "name": self.name,
            "nodes": [
                {
                    "index": i,
                    "type": n.primitive.label,
                    "param": n.name,
                    "shape": list(n.shape) if n.shape is not None else None,
                    "tensors": [
                        {"tensor": p.tensor, "role": p.role, "stored_shape": list(p.stored_shape),
                         "layout": p.layout.describe()}
                        for p in n.params
                    ],
                }
                for i, n in enumerate(self.nodes)
            ],
            "edges": self.edges.tolist(),
            "warnings": list(self.warnings),
            "unsupported": {k: list(v) for k, v in self.unsupported.items()},
        }


def reachable(starts: Iterable[Any], neighbours: Callable[[Any], Iterable[Any]]) -> set[Any]:
    """Everything reachable from ``starts`` (themselves included) by following ``neighbours``;
    iterative, since graphs can be thousands of nodes deep."""
    seen: set[Any] = set()
    stack = list(starts)
    while stack:
        x = stack.pop()
        if x not in seen:
            seen.add(x)
            stack.extend(neighbours(x))
    return seen


def topological_order(n: int, edges: Iterable[tuple[int, int]]) -> list[int]:
    """Kahn's algorithm, always taking the smallest ready index, so an already sorted numbering
    is kept as it is and ties are broken deterministically."""
    import heapq

    succ: list[list[int]] = [[] for _ in range(n)]
    indeg = [0] * n
    for s, d in edges:
        succ[s].append(d)
        indeg[d] += 1
    ready = [i for i in range(n) if indeg[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succ[i]:
            indeg[j] -= 1
            if indeg[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != n:
        raise ValueError("Expected an acyclic graph (found a cycle)")
    return order



