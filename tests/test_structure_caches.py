"""The one-pass structure facts of the converter and the lazy sweep levels of a batch: the same
answers as the walks they replace, and no GHN-2 levels for a GHN-3 transformer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from onnx import helper

from ghn_onnx.convert.context import SQUEEZE_OPS, ConversionContext
from ghn_onnx.convert.onnx_to_graph import convert
from ghn_onnx.graph import batch as graph_batch
from ghn_onnx.graph.batch import GraphBatch, longest_path_levels
from ghn_onnx.onnx_io.loading import load_model
from tests.ghn_graphs import fresh_ghn, random_dag
from tests.onnx_builders import model, weights

REPO = Path(__file__).resolve().parents[1]


def _ancestors(t, name: str) -> set[str]:
    """Every data tensor ``name`` is computed from, itself included: the per-gate walk."""
    seen: set[str] = set()
    stack = [name]
    while stack:
        x = stack.pop()
        if x in seen or not t.is_data(x):
            continue
        seen.add(x)
        if x in t.producer:
            stack.extend(i for i in t.producer[x].input if i)
    return seen


def _se_by_walks(m) -> tuple[set[str], set[str]]:
    """(gating Mul outputs, squeeze outputs) found with a full ancestor walk per candidate."""
    ctx = ConversionContext(m)
    t = ctx.tensors
    gates, squeezes = set(), set()
    for node in m.graph.node:
        data = t.data_inputs(node)
        if node.op_type != "Mul" or len(data) != 2:
            continue
        for x, g in (data, data[::-1]):
            gate_input = ctx._gate_input(g)
            if gate_input is None:
                continue
            x0 = t.through_shape_ops(x)
            if t.through_shape_ops(gate_input) == x0:
                continue
            branch = _ancestors(t, gate_input) - _ancestors(t, x0)
            found = [t.producer[b] for b in branch if b in t.producer and t.producer[b].op_type in SQUEEZE_OPS]
            if found:
                gates.add(node.output[0])
                squeezes.update(s.output[0] for s in found)
                break
    return gates, squeezes


def _se_found(m) -> tuple[set[str], set[str]]:
    ctx = ConversionContext(m)
    return ({n.output[0] for n in m.graph.node if ctx.is_cse(n)},
            {n.output[0] for n in m.graph.node if ctx.is_squeeze(n)})


def _se_models(shared_dir: Path) -> list[Path]:
    found = sorted((shared_dir / "reference" / "ghn3-parity").glob("*.onnx"))
    found += sorted((REPO / "tests" / "fixtures" / "frameworks").glob("*.onnx"))
    assert len(found) >= 7
    return found


def test_se_gates_match_the_per_gate_walk(shared_dir):
    gated = 0
    for path in _se_models(shared_dir):
        m = load_model(path)
        expected = _se_by_walks(m)
        assert _se_found(m) == expected, path.name
        gated += bool(expected[0])
    assert gated >= 3  # MobileNetV3, RegNet, EfficientNet at least: the comparison means something


def _se_chain(blocks: int):
    """``blocks`` SE blocks in a row, a SiLU between each: conv -> y; y * sigmoid(conv(mean(y)))."""
    nodes, init, x = [], {}, "x"
    for b in range(blocks):
        init[f"w{b}"], init[f"s{b}"] = weights((4, 4, 1, 1), seed=2 * b), weights((4, 4, 1, 1), seed=2 * b + 1)
        nodes += [helper.make_node("Conv", [x, f"w{b}"], [f"y{b}"]),
                  helper.make_node("ReduceMean", [f"y{b}"], [f"m{b}"], axes=[2, 3], keepdims=1),
                  helper.make_node("Conv", [f"m{b}", f"s{b}"], [f"e{b}"]),
                  helper.make_node("Sigmoid", [f"e{b}"], [f"g{b}"]),
                  helper.make_node("Mul", [f"y{b}", f"g{b}"], [f"z{b}"]),
                  helper.make_node("Sigmoid", [f"z{b}"], [f"a{b}"]),
                  helper.make_node("Mul", [f"a{b}", f"z{b}"], [f"o{b}"])]  # SiLU: no gate
        x = f"o{b}"
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["out"]))
    return model(nodes, {"x": [1, 4, 8, 8]}, ["out"], init)


def test_deep_se_chain_gates_every_block_and_only_its_own_squeeze():
    blocks = 400  # deeper than Python's recursion limit allows a recursive walk
    m = _se_chain(blocks)
    gates, squeezes = _se_found(m)
    assert gates == {f"z{b}" for b in range(blocks)}
    assert squeezes == {f"m{b}" for b in range(blocks)}  # the head's pooling is no squeeze
    g = convert(m)
    assert sum(n.primitive.label == "cse" for n in g.nodes) == blocks
    assert sum(n.primitive.label == "glob_avg" for n in g.nodes) == 1


def _eager_levels(graphs):
    """Levels as the batch built them before they were lazy: one-hop edges per graph."""
    batch = GraphBatch.build(graphs)
    fwd = np.concatenate([longest_path_levels(len(g), g.edges)[0] for g in graphs])
    bwd = np.concatenate([longest_path_levels(len(g), g.edges)[1] for g in graphs])
    return batch, fwd, bwd


def test_lazy_levels_cover_every_node_once_in_dependency_order():
    graphs = [random_dag(40, seed=1), random_dag(25, seed=2)]
    batch, fwd, bwd = _eager_levels(graphs)
    for levels, level_of, recv in ((batch.forward, fwd, 1), (batch.backward, bwd, 0)):
        nodes = np.concatenate([lv.nodes for lv in levels])
        assert sorted(nodes.tolist()) == list(range(batch.n_nodes))
        for k, lv in enumerate(levels):
            assert (level_of[lv.nodes] == k).all()
            # every edge into the level, from a lower level; every such edge of the batch is there
            expected = np.flatnonzero(level_of[batch.edges[:, recv]] == k)
            assert len(lv.src) == len(expected)
            assert (level_of[lv.src] < k).all()
            np.testing.assert_array_equal(lv.one_hop, (batch.edges[expected, 2] == 1).astype(np.float32))
    assert batch.forward is batch.forward  # built once


@pytest.mark.parametrize("hypernet, levels", [("transformer", 0), ("gatedgnn", 1)])
def test_only_gnn_engines_compute_levels(monkeypatch, hypernet, levels):
    calls = []
    build = graph_batch.sweep_levels
    monkeypatch.setattr(graph_batch, "sweep_levels", lambda *a: calls.append(1) or build(*a))
    extra = dict(layers=1, heads=2) if hypernet == "transformer" else {}
    ghn = fresh_ghn("cpu", hid=16, hypernet=hypernet, **extra)
    with torch.no_grad():
        batch = ghn.batch([random_dag(30, seed=3)])
        ghn(batch)
    assert len(calls) == levels
