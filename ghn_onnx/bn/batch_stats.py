"""Batch-statistics BatchNorm: the GHN papers' evaluation mode (GHN2_FACTS §5.6) in plain ONNX.

The papers evaluate predicted networks with ``bn_train=True``: every BN normalises with the mean
and variance of the batch in front of it, since running statistics are never predicted.
:func:`batch_stats_model` bakes that into the graph, so any ONNX runtime reproduces it.
:func:`statistics_model` does the same for chosen BNs and also outputs the statistics each one
normalised with: one-pass calibration (:func:`ghn_onnx.bn.calibration.calibrate_bn`) reads them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.onnx_io.storage import consumer_counts, is_batch_norm, np_dtype, unique_name


def batch_stats_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` where every BatchNormalization normalises with the statistics of the
    current batch, like ``nn.BatchNorm2d`` in training mode without running statistics::

        y = (x - mean_b) / sqrt(var_b + eps) * scale + B,   mean_b, var_b over axes (0, 2, 3, ...)

    with the biased ``var_b``. Each BN becomes ReduceMean / Sub / Mul / ReduceMean / Add / Sqrt /
    Div / Mul / Add; the stored running statistics it no longer reads are removed. Outputs
    depend on the batch: evaluate at a fixed batch size (the papers use 64).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    types = _value_types(out)
    uses = consumer_counts(out)
    names = {t for n in g.node for t in list(n.input) + list(n.output)} | {t.name for t in g.initializer}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    stats: list[str] = []
    for node in g.node:
        if not is_batch_norm(node):
            new_nodes.append(node)
            continue
        if any(o and uses[o] for o in node.output[1:]):
            raise GhnOnnxError(f"BatchNormalization {node.name or node.output[0]!r} in training mode "
                               "exports running statistics that other nodes read; cannot rewrite it")
        x = node.input[0]
        elem, rank = types.get(x, (None, None))
        if rank is None:
            raise GhnOnnxError(f"cannot infer the rank of BatchNormalization input {x!r}")
        elem = elem or onnx.TensorProto.FLOAT
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        base = node.name or node.output[0]

        def fresh(suffix: str, base: str = base) -> str:
            return unique_name(f"{base}/batch_stats/{suffix}", names)

        axes = [0] + list(range(2, rank))
        eps_t = numpy_helper.from_array(np.array(eps, dtype=np_dtype(elem)), fresh("eps"))
        shape_t = numpy_helper.from_array(np.array([1, -1] + [1] * (rank - 2), dtype=np.int64), fresh("shape"))
        new_inits += [eps_t, shape_t]
        reduce_kw: dict = {"keepdims": 1}
        reduce_in: list[str] = []
        if opset >= 18:  # axes moved from attribute to input in opset 18
            axes_t = numpy_helper.from_array(np.array(axes, dtype=np.int64), fresh("axes"))
            new_inits.append(axes_t)
            reduce_in = [axes_t.name]
        else:
            reduce_kw["axes"] = axes
        mean, d, d2, var, ve, sd, xn, s, b, xs = (fresh(k) for k in
                                                   ("mean", "centered", "sq", "var", "var_eps", "std",
                                                    "normed", "scale", "bias", "scaled"))
        y = node.output[0]
        new_nodes += [
            helper.make_node("ReduceMean", [x] + reduce_in, [mean], fresh("ReduceMean_mean"), **reduce_kw),
            helper.make_node("Sub", [x, mean], [d], fresh("Sub")),
            helper.make_node("Mul", [d, d], [d2], fresh("Mul_sq")),
            helper.make_node("ReduceMean", [d2] + reduce_in, [var], fresh("ReduceMean_var"), **reduce_kw),
            helper.make_node("Add", [var, eps_t.name], [ve], fresh("Add_eps")),
            helper.make_node("Sqrt", [ve], [sd], fresh("Sqrt")),
            helper.make_node("Div", [d, sd], [xn], fresh("Div")),
        ]
        for src, dst in ((node.input[1], s), (node.input[2], b)):
            src_elem = types.get(src, (None, None))[0]
            if src_elem is not None and src_elem != elem:  # opset 15 lets scale/B differ from X
                cast = fresh("cast")
                new_nodes.append(helper.make_node("Cast", [src], [cast], fresh("Cast"), to=elem))
                src = cast
            new_nodes.append(helper.make_node("Reshape", [src, shape_t.name], [dst], fresh("Reshape")))
        new_nodes += [helper.make_node("Mul", [xn, s], [xs], fresh("Mul_scale")),
                      helper.make_node("Add", [xs, b], [y], fresh("Add_bias"))]
        stats += [i for i in node.input[3:5] if i]
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    _drop_dead_sources(out, stats)
    return out


def _value_types(model: onnx.ModelProto) -> dict[str, tuple[int | None, int | None]]:
    """name → (elem type, rank) from shape inference on a weight-free copy of the model."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    g = skeleton.graph
    graph_inputs = {i.name for i in g.input}
    for t in g.initializer:
        if t.name not in graph_inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]  # no data: inference on multi-GB models stays cheap
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # best effort: unknown ops only lose facts
        inferred = skeleton
    out: dict[str, tuple[int | None, int | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type"):
            out[vi.name] = (tt.elem_type or None, len(tt.shape.dim) if tt.HasField("shape") else None)
    for node in model.graph.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant" and node.output[0] not in out:
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is not None:
                out[node.output[0]] = (t.data_type, len(t.dims))
    return out


def _drop_dead_sources(model: onnx.ModelProto, names: list[str]) -> None:
    """Remove the stored tensors behind ``names`` (and Identity / Cast / Constant nodes leading to
    them) that nothing reads any more."""
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    pending = list(names)
    while pending:
        uses: Counter = consumer_counts(model)
        name = pending.pop()
        if uses[name] or name in graph_inputs:
            continue
        for i, t in enumerate(g.initializer):
            if t.name == name:
                del g.initializer[i]
                break
        else:
            for i, n in enumerate(g.node):
                if list(n.output) == [name] and n.op_type in ("Identity", "Cast", "Constant"):
                    pending.extend(x for x in n.input if x)
                    del g.node[i]
                    break


@dataclass(frozen=True)
class BnProbe:
    """The outputs of :func:`statistics_model` that report one BN's batch statistics."""

    mean: str   # C values: per-channel mean of the BN input over the batch (N and every position)
    var: str    # C values: per-channel biased variance
    shape: str  # int64: the BN input's shape, (N, C, ...)


#: The first opset whose BatchNormalization has ``training_mode`` (normalise with, and output,
#: the batch statistics).
TRAINING_MODE_OPSET = 14


def statistics_model(model: onnx.ModelProto, bns: Sequence[str], *,
                     batch_statistics: bool = True) -> tuple[onnx.ModelProto, list[BnProbe]]:
    """A copy of ``model`` that outputs the batch statistics of the input of each BatchNormalization
    whose first output is in ``bns``: ``bns[i]``'s are the outputs ``probes[i]``.

    With ``batch_statistics``, those BNs also normalise with them (as :func:`batch_stats_model`,
    i.e. PyTorch's training-mode forward). From opset 14 the BN node itself does it:
    ``training_mode=1, momentum=0`` makes it normalise with the batch's mean and biased variance
    and output them as its running statistics (one fused pass over its input in onnxruntime).
    Before opset 14, the statistics are computed explicitly (:func:`_explicit_statistics`) and the
    BN normalises with them in inference mode. Without ``batch_statistics`` every BN keeps its
    stored statistics and the statistics are computed explicitly: the inputs an eval-mode model
    gives its BNs, measured without fetching them. The graph's outputs are the probes only.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 1)
    uses = consumer_counts(out)
    types: dict[str, int] = {}
    explicit = opset < TRAINING_MODE_OPSET or not batch_statistics
    if explicit:
        types = {name: elem for name, (elem, _) in _value_types(out).items() if elem}
        types.update((t.name, t.data_type) for t in g.initializer)
    names = {t for n in g.node for t in list(n.input) + list(n.output)} | {t.name for t in g.initializer}
    wanted = {name: i for i, name in enumerate(bns)}
    probes: list[BnProbe | None] = [None] * len(bns)
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:
        i = wanted.get(node.output[0]) if is_batch_norm(node) and node.output else None
        if i is None:
            new_nodes.append(node)
            continue
        if any(o and uses[o] for o in node.output[1:]):
            raise GhnOnnxError(f"BatchNormalization {node.name or node.output[0]!r} in training mode "
                               "exports running statistics that other nodes read; cannot rewrite it")
        base = node.name or node.output[0]

        def fresh(suffix: str, base: str = base) -> str:
            return unique_name(f"{base}/statistics/{suffix}", names)

        shape = fresh("shape")
        new_nodes.append(helper.make_node("Shape", [node.input[0]], [shape], fresh("Shape")))
        kept = [a for a in node.attribute if a.name not in ("training_mode", "momentum")]
        del node.attribute[:]
        node.attribute.extend(kept)
        del node.output[1:]
        if not explicit:
            mean, var = fresh("mean"), fresh("var")
            node.attribute.extend([helper.make_attribute("training_mode", 1), helper.make_attribute("momentum", 0.0)])
            node.output.extend([mean, var])
        else:
            mean, var = _explicit_statistics(node, fresh, types, new_nodes, new_inits, rewire=batch_statistics)
        new_nodes.append(node)
        probes[i] = BnProbe(mean, var, shape)
    missing = [b for b, p in zip(bns, probes) if p is None]
    if missing:
        raise GhnOnnxError(f"no BatchNormalization with output(s) {', '.join(missing)}")
    del g.node[:]
    g.node.extend(new_nodes)
    g.initializer.extend(new_inits)
    del g.output[:]
    g.output.extend(onnx.ValueInfoProto(name=n) for p in probes for n in (p.mean, p.var, p.shape))
    return out, probes


def _explicit_statistics(node: onnx.NodeProto, fresh, types: dict[str, int], new_nodes: list[onnx.NodeProto],
                         new_inits: list[onnx.TensorProto], rewire: bool) -> tuple[str, str]:
    """Nodes (appended to ``new_nodes``) computing the batch statistics of BN ``node``'s input
    ``x`` (N, C, ...), which ``node`` is rewired to normalise with when ``rewire``; their names.

    ``r = x`` reshaped to (N, C, positions) (cast to float32 unless it is float32 or float64, so
    that 16-bit sums keep their precision), ``mean = mean(r)`` and ``var = mean((r - mean)^2)``
    over axes (0, 2), reshaped to (C,) and cast to the type of the BN's statistics inputs. Ranks
    need not be known; ReduceMean still takes ``axes`` as an attribute at these opsets.
    """
    x = node.input[0]
    flat_t = numpy_helper.from_array(np.array([0, 0, -1], np.int64), fresh("as_ncl"))
    vec_t = numpy_helper.from_array(np.array([-1], np.int64), fresh("as_c"))
    new_inits += [flat_t, vec_t]
    src, computed = x, types.get(x)
    if computed not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):  # 16-bit, or not inferred
        src, computed = fresh("float"), onnx.TensorProto.FLOAT
        new_nodes.append(helper.make_node("Cast", [x], [src], fresh("Cast"), to=computed))
    r, mean, d, d2, var = (fresh(k) for k in ("ncl", "batch_mean", "centered", "sq", "batch_var"))
    new_nodes += [
        helper.make_node("Reshape", [src, flat_t.name], [r], fresh("Reshape")),
        helper.make_node("ReduceMean", [r], [mean], fresh("ReduceMean_mean"), axes=[0, 2], keepdims=1),
        helper.make_node("Sub", [r, mean], [d], fresh("Sub")),
        helper.make_node("Mul", [d, d], [d2], fresh("Mul_sq")),
        helper.make_node("ReduceMean", [d2], [var], fresh("ReduceMean_var"), axes=[0, 2], keepdims=1),
    ]
    result = []
    for k, stat in ((3, mean), (4, var)):  # the BN reads (C,) statistics of its own statistics type
        vec = fresh(f"{stat.rsplit('/', 1)[-1]}_c")
        new_nodes.append(helper.make_node("Reshape", [stat, vec_t.name], [vec], fresh("Reshape")))
        result.append(vec)
        if not rewire:
            continue
        stat_elem = types.get(node.input[k], onnx.TensorProto.FLOAT)
        if stat_elem != computed:
            cast = fresh("cast")
            new_nodes.append(helper.make_node("Cast", [vec], [cast], fresh("Cast"), to=stat_elem))
            vec = cast
        node.input[k] = vec
    return result[0], result[1]
