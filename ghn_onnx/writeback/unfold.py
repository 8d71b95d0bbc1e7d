"""Predicting BN-folded exports as the networks they were before folding (``--unfold-bn``).

Exporters fold each BatchNorm into the convolution before it (``W' = W·g``,
``b' = β + (b - μ)·g`` with ``g = γ / sqrt(σ² + ε)``), so the file holds a BN-free network. A
GHN trained on networks with BN predicts poorly for that network. Unfolding undoes the fold in
the GHN's view: each folded conv ``[weight → bias]`` becomes ``[weight → bn]``, exactly the graph
of the BN-kept export; the GHN predicts ``W``, ``γ`` and ``β``; the BN statistics ``μ, σ²`` are
calibrated on data with the BN in place (upstream BNs first); and ``W'``, ``b'`` are written
into the conv. The result computes what the BN-kept network with calibrated statistics computes.

Which convs were folded: those the exporter's optimiser marked (``FuseBatchNormIntoConv`` in the
node metadata, PyTorch's dynamo exporter); otherwise, when the converter found other evidence of
folding, every convolution with a bias that no norm follows.

This module holds the graph and model surgery; :func:`ghn_onnx.pipeline.predict_unfolded` runs
it around the GHN's prediction and the calibration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ghn_onnx.convert.tensors import TensorIndex
from ghn_onnx.graph.graph import Graph, Layout, Node, ParamRef
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive
from ghn_onnx.onnx_io.storage import cast_to_stored, set_tensor_values, stored_tensors, unique_name

BN_EPS = 1e-5
# Names of the unfolded BNs' predictions: they stand for no tensor of the model.
VIRTUAL_SUFFIXES = ("::bn.scale", "::bn.bias")


def is_virtual(ref: ParamRef) -> bool:
    """True for the ParamRefs of an unfolded BN (predicted, then folded; never written as such)."""
    return ref.tensor.endswith(VIRTUAL_SUFFIXES)


@dataclass(frozen=True)
class FoldedConv:
    """A convolution with a BatchNorm folded into it."""

    conv: onnx.NodeProto
    weight: ParamRef
    bias: ParamRef | None  # None when the exporter dropped a zero folded bias
    scale_key: str  # names of the GHN's predictions for the unfolded BN
    shift_key: str


def folded_convs(model: onnx.ModelProto, graph: Graph) -> list[FoldedConv]:
    """The convs of ``model`` that hold a folded BN, with their weight and bias tensors."""
    index = TensorIndex(model)
    marked = [n for n in model.graph.node if n.op_type == "Conv"
              and any("FuseBatchNormIntoConv" in p.value for p in n.metadata_props)]
    if not marked and not graph.info.get("bn_folded"):
        return []
    by_weight = {n.params[0].tensor: i for i, n in enumerate(graph.nodes)
                 if n.primitive in WEIGHT_PRIMITIVES and n.params}
    candidates = marked or [n for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2 and n.input[2]]
    out = []
    for conv in candidates:
        st = index.stored(conv.input[1])
        if st is None or st.name not in by_weight:
            continue
        i = by_weight[st.name]
        nxt = graph.nodes[i + 1] if i + 1 < len(graph.nodes) else None
        if nxt is not None and nxt.primitive in NORM_PRIMITIVES:
            continue  # a norm follows: nothing was folded here
        stored_bias = index.stored(conv.input[2]) if len(conv.input) > 2 else None
        bias = nxt.params[0] if (nxt is not None and nxt.primitive is Primitive.BIAS and stored_bias is not None
                                 and nxt.params[0].tensor == stored_bias.name) else None
        w = graph.nodes[i].params[0]
        out.append(FoldedConv(conv, w, bias, *(w.tensor + s for s in VIRTUAL_SUFFIXES)))
    return out


def unfolded_graph(graph: Graph, folds: list[FoldedConv]) -> Graph:
    """``graph`` with each folded ``conv → bias`` turned into ``conv → bn`` (BN-kept topology)."""
    weight_of = {f.weight.tensor: f for f in folds}
    nodes: list[Node] = []
    remap: dict[int, int] = {}
    after: dict[int, int] = {}  # conv index (new) → inserted bn index (new), when there was no bias node
    skip: set[int] = set()
    for i, n in enumerate(graph.nodes):
        if i in skip:
            continue
        remap[i] = len(nodes)
        nodes.append(n)
        f = weight_of.get(n.params[0].tensor) if n.primitive in WEIGHT_PRIMITIVES and n.params else None
        if f is None:
            continue
        c = n.shape[0]
        bn = Node(Primitive.BN, f"{f.weight.tensor}::bn", (c,), (
            ParamRef(f.scale_key, "scale", (c,), onnx.TensorProto.FLOAT, Layout()),
            ParamRef(f.shift_key, "bias", (c,), onnx.TensorProto.FLOAT, Layout())))
        if f.bias is not None:  # the bias node becomes the bn node, in place
            skip.add(i + 1)
            remap[i + 1] = len(nodes)
        else:
            after[remap[i]] = len(nodes)
        nodes.append(bn)
    edges = set()
    for s, d in graph.edges.tolist():
        s2, d2 = remap[s], remap[d]
        if s2 in after and d2 != after[s2]:
            s2 = after[s2]  # the conv's consumers now read the inserted bn
        edges.add((s2, d2))
    edges.update((c, b) for c, b in after.items())
    info = {**graph.info, "bn_folded": False, "bn_unfolded": len(folds)}
    warnings = [w for w in graph.warnings if not w.startswith("BN appears folded")]
    return Graph(nodes, np.array(sorted(edges), dtype=np.int64).reshape(-1, 2), graph.name, warnings,
                 dict(graph.unsupported), info)


def with_explicit_bn(model: onnx.ModelProto, folds: list[FoldedConv], predictions: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where each folded conv has no bias and is followed by a real
    BatchNormalization holding the predicted ``γ, β`` and statistics ``μ = 0, σ² = 1`` (to be
    calibrated). Conv weights must already hold the predicted ``W``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    fold_of = {tuple(f.conv.output): f for f in folds}
    new_nodes = []
    for node in out.graph.node:
        new_nodes.append(node)
        f = fold_of.get(tuple(node.output))
        if f is None:
            continue
        c = f.weight.canonical_shape[0]
        if len(node.input) > 2:
            del node.input[2]  # the unfolded conv has no bias of its own
        y = node.output[0]
        pre = unique_name(f"{y}__unfolded", taken)
        node.output[0] = pre
        names = [unique_name(f"{f.weight.tensor}__bn_{k}", taken) for k in ("scale", "bias", "mean", "var")]
        values = [predictions[f.scale_key], predictions[f.shift_key], np.zeros(c, np.float32), np.ones(c, np.float32)]
        out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), n) for n, v in zip(names, values))
        new_nodes.append(helper.make_node("BatchNormalization", [pre, *names], [y], epsilon=BN_EPS,
                                          name=unique_name(f"{node.name or y}__bn", taken)))
    del out.graph.node[:]
    out.graph.node.extend(new_nodes)
    return out


def fold_back(predicted: onnx.ModelProto, calibrated: onnx.ModelProto, folds: list[FoldedConv]) -> onnx.ModelProto:
    """Fold the (calibrated) explicit BNs of ``calibrated`` into the convs of ``predicted``."""
    out = onnx.ModelProto()
    out.CopyFrom(predicted)
    stored = stored_tensors(out)
    cal = {t.name: numpy_helper.to_array(t) for t in calibrated.graph.initializer}
    bn_of = {n.input[0]: n for n in calibrated.graph.node if n.op_type == "BatchNormalization"}
    conv_in_cal = {tuple(n.input[:2]): n for n in calibrated.graph.node if n.op_type == "Conv"}
    taken = {t.name for t in out.graph.initializer} | {o for n in out.graph.node for o in n.output}
    convs = {tuple(n.output): n for n in out.graph.node if n.op_type == "Conv"}
    for f in folds:
        cal_conv = conv_in_cal[tuple(f.conv.input[:2])]
        bn = bn_of[cal_conv.output[0]]
        gamma, beta, mean, var = (cal[n].astype(np.float64) for n in bn.input[1:5])
        g = gamma / np.sqrt(var + BN_EPS)
        w_store = stored[f.weight.tensor]
        w = f.weight.layout.to_canonical(numpy_helper.to_array(w_store).astype(np.float64))
        w = w * g.reshape((-1,) + (1,) * (w.ndim - 1))
        set_tensor_values(w_store, cast_to_stored(f.weight.layout.to_stored(w), w_store.data_type, f.weight.tensor))
        b = beta - mean * g
        conv = convs[tuple(f.conv.output)]
        if f.bias is not None:
            t = stored[f.bias.tensor]
            set_tensor_values(t, cast_to_stored(f.bias.layout.to_stored(b), t.data_type, f.bias.tensor))
        else:
            name = unique_name(f"{f.weight.tensor}_bias", taken)
            out.graph.initializer.append(numpy_helper.from_array(b.astype(onnx.helper.tensor_dtype_to_np_dtype(
                w_store.data_type)), name))
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = name
    return out
