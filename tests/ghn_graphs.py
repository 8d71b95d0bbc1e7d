"""Small hand-built graphs and fresh GHNs for the decoding and message-passing tests (odd channel
counts, unusual kernels, positional encodings, classifiers smaller and larger than the heads), and
the comparison of two decodings."""

from __future__ import annotations

import numpy as np
import torch

from ghn_onnx.ghn import GHN, GHNConfig
from ghn_onnx.graph.graph import Graph, Node, ParamRef
from ghn_onnx.graph.primitives import Primitive


def _param(name: str, role: str, shape: tuple[int, ...]) -> ParamRef:
    return ParamRef(name, role, shape, 1)


def random_dag(n: int, seed: int, fan: int = 2, window: int = 20) -> Graph:
    """``n`` nodes in topological order, each fed by 1..fan of the ``window`` nodes before it."""
    rng = np.random.default_rng(seed)
    edges = {(int(rng.integers(max(0, d - window), d)), d) for d in range(1, n)
             for _ in range(int(rng.integers(1, fan + 1)))}
    nodes = [Node(Primitive.INPUT, "input")]
    nodes += [Node(Primitive.CONV, f"c{i}.weight", (8, 8, 3, 3), (_param(f"c{i}.weight", "weight", (8, 8, 3, 3)),))
              for i in range(1, n)]
    return Graph(nodes, np.array(sorted(edges)), name=f"dag{n}")


def chain(specs: list[tuple[Primitive, str, tuple | None, int]]) -> Graph:
    """A chain ``input → specs…``; a spec is ``(primitive, name, main shape, groups)``; norms get
    a scale and a bias, biases a bias, weights a weight, pooling and shape-free nodes nothing."""
    nodes = [Node(Primitive.INPUT, "input")]
    for prim, name, shape, groups in specs:
        if shape is None or prim in (Primitive.MAX_POOL, Primitive.AVG_POOL):
            params = ()
        elif prim in (Primitive.BN, Primitive.LN):
            params = (_param(f"{name}.weight", "scale", shape), _param(f"{name}.bias", "bias", shape))
        elif prim is Primitive.BIAS:
            params = (_param(name, "bias", shape),)
        else:
            params = (_param(name, "weight", shape),)
        nodes.append(Node(prim, name, shape, params, groups))
    return Graph(nodes, np.array([(i, i + 1) for i in range(len(nodes) - 1)]), name="chain")


def odd_shapes_graph() -> Graph:
    """Channel counts that do not divide 64, 1×7 / 7×1 / depthwise / 16×16 kernels, a 2-D hidden
    linear, positional encodings (4-D, and 3-D ``(1, T, C)``), and a 1000-class classifier."""
    P = Primitive
    return chain([
        (P.CONV, "stem.weight", (10, 3, 3, 3), 1),
        (P.BN, "stem.bn", (10,), 1),
        (P.SEP_CONV, "dw.weight", (10, 1, 3, 3), 10),
        (P.CONV, "c17.weight", (96, 10, 1, 7), 1),
        (P.CONV, "c71.weight", (100, 96, 7, 1), 1),
        (P.DIL_CONV, "dil.weight", (100, 1, 5, 5), 100),
        (P.BN, "bn100", (100,), 1),
        (P.MAX_POOL, "pool", (1, 1, 3, 3), 1),
        (P.CONV, "patch.weight", (130, 100, 16, 16), 1),
        (P.BIAS, "patch.bias", (130,), 1),
        (P.POS_ENC, "pos", (1, 130, 11, 11), 1),
        (P.SUM, "add", None, 1),
        (P.POS_ENC, "tokens", (1, 50, 130), 1),
        (P.SUM, "add2", None, 1),
        (P.LN, "ln", (130,), 1),
        (P.GLOB_AVG, "gap", None, 1),
        (P.CONV, "fc1.weight", (96, 130), 1),
        (P.BIAS, "fc1.bias", (96,), 1),
        (P.CONV, "head.weight", (1000, 96), 1),
        (P.BIAS, "head.bias", (1000,), 1),
    ])


def small_head_graph() -> Graph:
    """A classifier with fewer classes (7) than the GHN's heads (10)."""
    P = Primitive
    return chain([(P.CONV, "conv.weight", (20, 3, 3, 3), 1), (P.GLOB_AVG, "gap", None, 1),
                  (P.CONV, "fc.weight", (7, 20), 1), (P.BIAS, "fc.bias", (7,), 1)])


def two_node_graph() -> Graph:
    """The smallest graph with a parameter: input → conv."""
    return chain([(Primitive.CONV, "w", (3, 3, 1, 1), 1)])


def fresh_ghn(device: str, seed: int = 0, **config) -> GHN:
    torch.manual_seed(seed)
    return GHN(GHNConfig(**config)).to(device).eval()




def assert_same_predictions(got: list[dict[str, torch.Tensor]], expected: list[dict[str, torch.Tensor]],
                            **tolerance) -> None:
    """Same graphs, same tensor names in the same order, same shapes, values within ``tolerance``
    (``torch.testing.assert_close`` keywords) after casting ``expected`` to ``got``'s dtype."""
    assert [g.keys() for g in got] == [e.keys() for e in expected]
    for g, e in zip(got, expected):
        for name, value in e.items():
            assert g[name].shape == value.shape, name
            torch.testing.assert_close(g[name], value.to(g[name].dtype), **tolerance,
                                       msg=lambda m, name=name: f"{name}: {m}")
