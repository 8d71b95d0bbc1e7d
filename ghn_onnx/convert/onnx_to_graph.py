"""ONNX model → GHN :class:`~ghn_onnx.graph.graph.Graph`.

One pass over the ONNX nodes in topological order. Each node is either *emitted* (a rule in
:mod:`.rules` turns it into GHN nodes) or *dropped*, in which case whatever consumes its output
is wired to whatever fed it. Every tensor therefore carries a *frontier*: the GHN nodes that
produced it, after rewiring.

Exporters merge identical parameter-free ops (common-subexpression elimination): two
``avg_pool`` modules applied to the same input become one ``AveragePool`` feeding ``Add(y, y)``.
The source network, which is what the GHN was trained on, had two. So before the pass, each
parameter-free node gets a *copy count*: how many times its result is used in the same slot
set of one consumer (``Add(y, y)`` needs two copies of ``y``, and so, recursively, of ``y``'s
parameter-free producers). Parametrised nodes are never copied: they cannot have been merged.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx

from ghn_onnx.convert.context import ConversionContext
from ghn_onnx.onnx_io.loading import check_supported, load_model, validate_model
from ghn_onnx.convert.rules import RULES, Emission, rule_set
from ghn_onnx.errors import UnsupportedModelError
from ghn_onnx.graph.graph import Graph, Node, reachable, topological_order
from ghn_onnx.onnx_io.storage import topological_nodes
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive

# Ops whose stored float inputs are configuration, not parameters.
NON_PARAMETER_INPUT_OPS = frozenset({
    "Resize", "Upsample", "Pad", "Clip", "Reshape", "Expand", "Tile", "Slice", "Range",
    "ConstantOfShape", "Shape", "Size", "Squeeze", "Unsqueeze", "Gather", "GatherElements",
    "ScatterND", "Where", "Cast", "CastLike", "Equal", "Less", "Greater", "Split", "TopK",
})


def convert_file(path: str | os.PathLike, rules: str = "ghn2") -> Graph:
    """Read an ONNX file and convert it; see :func:`convert`."""
    model = load_model(path)
    return convert(model, name=Path(path).name, rules=rules)


def convert(model: onnx.ModelProto, name: str = "model", rules: str = "ghn2", validated: bool = False) -> Graph:
    """Build the GHN graph of ``model``, read with the rule set ``rules``
    (:data:`~ghn_onnx.convert.rules.RULE_SETS`: ``"ghn2"`` or ``"ghn3"``, the GHN
    configuration's ``rules``).

    Raises:
        ModelLoadError: a graph :func:`~ghn_onnx.onnx_io.loading.validate_model` refuses (cycles,
            two producers of a tensor, bad UTF-8, declared sizes over the budget): models built
            in memory are checked here as files are on load.
        UnsupportedModelError: quantized weights, control flow, or no parametrised layer at all.

    ``validated=True`` skips that check for a model :func:`~ghn_onnx.onnx_io.loading.load_model`
    returned (it ran the same check, and more), or one derived from it by adding initializers.
    """
    if not validated:
        validate_model(model, name, check_data=False)
    reading = rule_set(rules)
    check_supported(model, name)
    ctx = ConversionContext(model)
    t = ctx.tensors
    nodes = topological_nodes(model.graph)
    emissions = {id(n): RULES[n.op_type](n, ctx) if n.op_type in RULES else None for n in nodes}
    copies, node_copies = _copy_counts(nodes, emissions, t)

    graph_nodes: list[Node] = [Node(Primitive.INPUT, "input")]
    edges: set[tuple[int, int]] = set()
    frontier: dict[tuple[str, int], list[int]] = {}
    for name_ in t.inputs:
        for j in range(copies.get(name_, 1)):
            frontier[(name_, j)] = [0]

    def add_node(node: Node, preds: list[int]) -> int:
        graph_nodes.append(node)
        idx = len(graph_nodes) - 1
        edges.update((p, idx) for p in preds)
        return idx

    claimed: set[str] = set()
    for node in nodes:
        data = t.data_inputs(node)
        if not data:
            continue
        em = emissions[id(node)]
        for j in range(node_copies[id(node)]):
            preds = _preds(node, j, data, em, frontier, copies)
            out: list[int]
            if em is not None and len(preds) + len(em.leaves) >= em.min_preds:
                leaves = [add_node(leaf, []) for leaf in em.leaves]
                prev = preds + leaves
                for gnode in em.chain:
                    prev = [add_node(gnode, prev)]
                out = prev
                if j == 0:
                    claimed.update(em.claimed)
            else:
                out = preds
            for o in node.output:
                if o:
                    frontier[(o, j)] = out

    sinks = sorted({i for o in t.outputs for j in range(copies.get(o, 1)) for i in frontier.get((o, j), [])})
    graph = reading.apply(_finish(graph_nodes, edges, sinks, name))
    graph.unsupported = _unsupported(nodes, t, claimed)
    graph.warnings.extend(_warnings(graph, model))
    if not any(n.params for n in graph.nodes):
        raise UnsupportedModelError(f"{name}: no parametrised layers a GHN can predict "
                                    f"(ops: {', '.join(sorted({n.op_type for n in nodes}))})")
    return graph


def _copy_counts(nodes, emissions, t) -> tuple[dict[str, int], dict[int, int]]:
    """How many copies of each tensor and of each node the source network computed (see the
    module docstring)."""
    copies: dict[str, int] = {}
    node_copies: dict[int, int] = {}
    for node in reversed(nodes):
        em = emissions[id(node)]
        parametrised = em is not None and any(n.params for n in em.chain + em.leaves)
        n_copies = 1 if parametrised else max((copies.get(o, 1) for o in node.output if o), default=1)
        node_copies[id(node)] = n_copies
        uses = Counter(t.data_inputs(node))
        for name, k in uses.items():
            # Only a primitive reading a tensor twice (Add(y, y)) shows a merged duplicate; a
            # dropped op doing so is arithmetic on one tensor (x * x in a normalisation's variance).
            k = k if em is not None else 1
            copies[name] = max(copies.get(name, 1), n_copies * k)
    return copies, node_copies


def _preds(node, j: int, data: list[str], em: Emission | None, frontier, copies) -> list[int]:
    """The GHN nodes feeding copy ``j`` of ``node``; the r-th use of a tensor in this node
    reads copy ``j * k + r`` of it, so merged duplicates are split apart again."""
    wanted = em.inputs if em is not None else data
    seen_count: Counter = Counter()
    k = Counter(data)
    preds: list[int] = []
    for name in data:
        r = seen_count[name]
        seen_count[name] += 1
        if name not in wanted:
            continue
        copy = (j * k[name] + r) % copies.get(name, 1)
        for p in frontier.get((name, copy), frontier.get((name, 0), [])):
            if p not in preds:
                preds.append(p)
    return preds


def _finish(nodes: list[Node], edges: set[tuple[int, int]], sinks: list[int], name: str) -> Graph:
    """Keep what the outputs depend on, renumber in topological order."""
    preds: dict[int, list[int]] = {}
    for s, d in edges:
        preds.setdefault(d, []).append(s)
    alive = reachable(sinks, lambda i: preds.get(i, ())) | {0}  # the input node stays
    keep = sorted(alive)
    remap = {old: new for new, old in enumerate(keep)}
    kept_edges = [(remap[s], remap[d]) for s, d in edges if s in remap and d in remap]
    order = topological_order(len(keep), kept_edges)
    rank = {old: new for new, old in enumerate(order)}
    new_nodes = [nodes[keep[i]] for i in order]
    new_edges = sorted((rank[s], rank[d]) for s, d in kept_edges)
    graph = Graph(new_nodes, np.array(new_edges, dtype=np.int64).reshape(-1, 2), name=name)
    dead = [n.name for i, n in enumerate(nodes) if i not in alive and n.params]
    if dead:
        graph.warnings.append(f"{len(dead)} parametrised node(s) do not reach any output and are "
                              f"left untouched: {', '.join(dead[:5])}{' ...' if len(dead) > 5 else ''}")
    return graph


def _unsupported(nodes, t, claimed: set[str]) -> dict[str, list[str]]:
    """Stored float tensors (more than one element) that reach the data path through an op no
    rule turned into a primitive: they keep the values they have."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        if node.op_type in NON_PARAMETER_INPUT_OPS or not t.data_inputs(node):
            continue
        for i in node.input:
            st = t.stored(i) if i and not t.is_data(i) else None
            if st is None or not st.is_float or st.numel <= 1 or st.name in claimed:
                continue
            names = out.setdefault(node.op_type, [])
            if st.name not in names:
                names.append(st.name)
    return out


def _warnings(graph: Graph, model: onnx.ModelProto) -> list[str]:
    warnings = []
    if graph.unsupported:
        listing = ", ".join(f"{op} ({len(v)})" for op, v in sorted(graph.unsupported.items()))
        warnings.append(f"parameters of ops with no GHN primitive are left untouched: {listing}")
    folded = bn_folding_evidence(graph, model)
    graph.info["bn_folded"] = folded is not None
    if folded:
        warnings.append(f"BN appears folded into Conv ({folded}): predictions will be those for a "
                        "BN-free network; export with BatchNorm kept for GHN-quality predictions")
    return warnings


def bn_folding_evidence(graph: Graph, model: onnx.ModelProto) -> str | None:
    """Why we think the exporter folded BatchNorm into (some of) the convolutions, or None.

    The exporter's own record counts even when other BatchNorms were kept (Keras via tf2onnx
    folds a BN into a bias-free conv before it, but keeps one after a biased conv or a Dense as
    ``Mul`` + ``Add``); the structural guess only when the graph has no normalisation at all, and
    only when conv weights carry names the exporter made up: a fold writes new tensors, named by
    the exporter (``onnx::Conv_41``), while a network built without BN (SqueezeNet, VGG) keeps
    its parameters' own names, constant folding or not.
    """
    fused = sum(1 for node in model.graph.node for prop in node.metadata_props if "FuseBatchNorm" in prop.value)
    if fused:
        return f"the exporter's optimiser ran FuseBatchNormIntoConv on {fused} node(s)"
    folded = [n.name for n in graph.nodes if n.primitive is Primitive.BIAS and _folded_bn_name(n.name)]
    if folded:
        return (f"{len(folded)} convolution bias(es) named as a folded BatchNorm, e.g. {folded[0]!r} "
                "(PyTorch '*.weight_bias', tf2onnx 'batchnorm/')")
    if any(n.primitive in NORM_PRIMITIVES for n in graph.nodes):
        return None
    convs = [i for i, n in enumerate(graph.nodes) if n.primitive in WEIGHT_PRIMITIVES and n.shape and len(n.shape) == 4]
    biased = [i for i in convs if i + 1 < len(graph.nodes) and graph.nodes[i + 1].primitive is Primitive.BIAS]
    made = [graph.nodes[i].params[0].tensor for i in convs
            if graph.nodes[i].params and _exporter_made_name(graph.nodes[i].params[0].tensor)]
    if len(convs) >= 2 and len(biased) == len(convs) and made:
        return (f"every convolution has a bias, there is no normalisation layer, and {len(made)} of {len(convs)} "
                f"conv weights are tensors the exporter made, e.g. {made[0]!r}: a guess, from the structure only")
    return None


def _exporter_made_name(name: str) -> bool:
    """A tensor an exporter computed and named itself, as its constant folding names a conv weight
    it folded a BatchNorm into: the TorchScript exporter's ``onnx::Conv_41``, tf2onnx's
    ``const_fold_opt__600``."""
    return name.startswith(("onnx::", "const_fold_opt__"))


def _folded_bn_name(name: str) -> bool:
    """A bias an optimiser made out of a BatchNorm: the dynamo exporter's ``conv.weight_bias``,
    tf2onnx's ``.../batch_normalization/batchnorm/sub``."""
    return name.endswith("weight_bias") or "batchnorm/" in name.lower()
