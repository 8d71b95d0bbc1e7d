"""BatchNorm statistics for predicted networks: a GHN predicts BN scales and biases, never running
statistics (GHN2_FACTS §5.6). Two ways to give a predicted ONNX model usable BN layers:

* :func:`calibrate_bn` measures every BN input's per-channel mean and variance on calibration
  data and stores them as the running statistics (a model that then runs in plain eval mode):
  by default in one forward per batch with the BNs on batch statistics (PyTorch's training
  mode), or level by level as the calibrated model will run (:data:`CALIBRATION_MODES`);
* :func:`batch_stats_model` rewrites every BN to normalise with the statistics of the batch it
  is given, as the GHN papers evaluate (``bn_train=True``; results depend on the batch).

Calibration data comes from :func:`calibration_batches` / :func:`load_calibration_data` (see
:mod:`ghn_onnx.bn.images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.bn.batch_stats import batch_stats_model, statistics_model
from ghn_onnx.bn.images import (CIFAR10_MEAN, CIFAR10_STD, CalibrationSet, InputSpec, calibration_batches,
                                calibration_set, data_input, input_spec, iter_batches, load_calibration_data)
from ghn_onnx.bn.modes import CALIBRATION_MODES, CalibrationMode
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import Graph, reachable
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.storage import (alias_source, cast_to_stored, consumer_counts, is_batch_norm, np_dtype,
                              set_tensor_values, stored_tensors, topological_nodes, unique_name)
from ghn_onnx.threads import inference_session

__all__ = ["calibrate_bn", "CALIBRATION_MODES", "CalibrationMode", "calibration_targets", "batch_stats_model", "calibration_set", "calibration_batches",
           "CalibrationSet", "load_calibration_data", "iter_batches", "data_input", "input_spec", "InputSpec",
           "CIFAR10_MEAN", "CIFAR10_STD"]

Batch = np.ndarray | Mapping[str, np.ndarray]


@dataclass
class _Bn:
    """One BatchNormalization node being calibrated: its input and the tensors it owns."""

    x: str      # the BN input (the activation whose statistics we measure)
    y: str      # the BN's first output (names it in copies of the model)
    mean: str   # stored tensor holding running_mean (owned by this BN alone)
    var: str    # stored tensor holding running_var
    level: int = 0


class _Moments:
    """Exact per-channel mean and population variance over all of ``N x spatial`` positions of
    every batch seen, merged batch by batch in float64 (Chan et al.'s pairwise update, which
    avoids the cancellation of a plain sum-of-squares)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def update(self, x: np.ndarray) -> None:
        """Add the positions of a BN input ``x`` (N, C, ...)."""
        if x.ndim < 2:
            raise GhnOnnxError(f"BatchNormalization input must have rank >= 2 (got shape {x.shape})")
        flat = np.moveaxis(np.asarray(x, dtype=np.float64), 1, 0).reshape(x.shape[1], -1)  # (C, N*H*W)
        mb = flat.mean(axis=1)
        self.merge(flat.shape[1], mb, np.square(flat - mb[:, None]).sum(axis=1) / max(flat.shape[1], 1))

    def merge(self, nb: int, mb: np.ndarray, vb: np.ndarray) -> None:
        """Add ``nb`` positions whose per-channel mean is ``mb`` and biased variance ``vb``."""
        mb, m2b = np.asarray(mb, np.float64).ravel(), np.asarray(vb, np.float64).ravel() * nb
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + np.square(delta) * (self.n * nb / n)
        self.n = n

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.mean, self.m2 / self.n  # biased: what BN divides by in training


def calibrate_bn(model: onnx.ModelProto, batches: Iterable[Batch], *, graph: Graph | None = None,
                 mode: CalibrationMode = "one-pass", threads: int | None = None) -> onnx.ModelProto:
    """Set every BN's running mean and variance to the statistics of its input on ``batches``.

    Per channel, the statistics are the mean and **population** variance (divide by ``N*H*W``)
    of the BN input over every position of every batch, pooled exactly in float64. What differs
    between the modes is how the BNs *above* a BN normalise while its input is measured:

    * ``"one-pass"`` (default): with the statistics of the current batch, as PyTorch's
      training-mode forward does. One onnxruntime run per batch of a rewritten model
      (:func:`~ghn_onnx.bn.batch_stats.statistics_model`) that normalises every calibrated BN
      with its batch's mean and biased variance and outputs them. PyTorch's running statistics
      after the same forwards (``momentum=None``: plain averages over batches) have the same
      mean when the batches are equally big, and ``running_var = avg_b(var_b) * n/(n-1)``
      with ``n`` the positions per batch, where ours is ``avg_b(var_b) + avg_b((mean_b -
      mean)^2)``: the population variance, which also counts how the batch means spread.
    * ``"sequential"``: with the already calibrated population statistics, upstream first, so
      each BN is measured on exactly what the calibrated model feeds it in eval mode. BNs are
      taken in topological levels (level = number of BNs on the longest path above the node);
      each level is one run over the data on the model pruned to what its BN inputs need: cost
      ≈ (levels / 2) full passes (minutes for a ResNet-50).
    * ``"two-pass"``: one-pass, then one eval-mode pass measuring every BN input at once with the
      one-pass statistics above it (in the graph: ReduceMean / Sub / Mul / ReduceMean per BN).
      Not reliably closer to sequential: on a GHN-predicted MobileNetV2 its top-1 agreed with
      sequential's on 35-53% of test images, one-pass's on 95-97% (bench/RESULTS.md).

    The three agree exactly for one batch (batch and population statistics are then equal) and
    for BNs with no calibrated BN above them; otherwise they differ by how much a batch's
    statistics differ from the whole set's (small for batches of 64; bench/RESULTS.md has the
    measured accuracy and time of each).

    Args:
        model: an ONNX model (not modified).
        batches: model inputs: arrays for a single-input model (e.g. ``(B, C, H, W)`` float32),
            or name → array mappings. Held in memory (iterated once per level when sequential).
        graph: if given, only BNs whose scale tensor is a ``bn`` node of this graph (the ones the
            GHN predicted) are calibrated; by default every BN with stored statistics is. The
            others keep their stored statistics in every mode.
        mode: ``"one-pass"``, ``"two-pass"`` or ``"sequential"`` (:data:`CALIBRATION_MODES`).
        threads: onnxruntime intra-op threads; ``None`` / 0: the package's setting (``--threads``,
            :func:`~ghn_onnx.threads.configured_threads`).

    Returns:
        a new model whose running-statistics tensors hold the calibrated values (same dtype as
        stored). A statistics tensor that is shared with anything else (exporters merge tensors
        with equal values, e.g. a fresh ``running_var`` and a BN ``weight``) is first given a
        tensor of its own, so that the calibrated values change nothing but this BN.
    """
    if mode not in CALIBRATION_MODES:
        raise GhnOnnxError(f"calibration mode: expected one of {', '.join(CALIBRATION_MODES)} (got {mode!r})")
    if threads is not None and threads < 0:
        raise GhnOnnxError(f"threads: expected a number >= 0 (got {threads})")
    batches = list(batches)
    if not batches:
        raise GhnOnnxError("calibration needs at least one batch of data")
    out, bns = _own_statistics(model, graph)
    if not bns:
        return out
    inputs = {i.name: np_dtype(i.type.tensor_type.elem_type) for i in out.graph.input
              if i.name not in {t.name for t in out.graph.initializer}}
    feeds = [_feed(b, inputs) for b in batches]
    if mode == "sequential":
        for level in sorted({bn.level for bn in bns}):
            group = [bn for bn in bns if bn.level == level]
            _store(out, group, _measure(out, [bn.x for bn in group], feeds, threads))
        return out
    _store(out, bns, _measure_in_graph(out, bns, feeds, threads, batch_statistics=True))
    if mode == "two-pass":
        _store(out, bns, _measure_in_graph(out, bns, feeds, threads, batch_statistics=False))
    return out


def _store(model: onnx.ModelProto, bns: list[_Bn], moments: list[_Moments]) -> None:
    """Write each BN's measured mean and variance into its (own) running-statistics tensors."""
    stored = stored_tensors(model)
    for bn, m in zip(bns, moments):
        for name, value in zip((bn.mean, bn.var), m.result()):
            t = stored[name]
            if value.size != np.prod(t.dims, dtype=np.int64):
                raise GhnOnnxError(f"BatchNormalization input {bn.x!r} has {value.size} channels, its running "
                                   f"statistics {int(np.prod(t.dims, dtype=np.int64))}")
            value = value.reshape(tuple(int(d) for d in t.dims))
            set_tensor_values(t, cast_to_stored(value, t.data_type, f"BN statistics {name!r}"))


def _measure_in_graph(model: onnx.ModelProto, bns: list[_Bn], feeds: list[dict[str, np.ndarray]],
                      threads: int | None, batch_statistics: bool) -> list[_Moments]:
    """Pooled moments of every BN input, the BNs on batch statistics or (not ``batch_statistics``)
    on their stored ones: one run per feed, the statistics computed in the graph."""
    probing, probes = statistics_model(model, [bn.y for bn in bns], batch_statistics=batch_statistics)
    names = [n for p in probes for n in (p.mean, p.var, p.shape)]
    session = inference_session(_prune(probing, names), threads)
    moments = [_Moments() for _ in bns]
    for feed in feeds:
        values = dict(zip(names, _run(session, names, feed)))
        for p, m in zip(probes, moments):
            shape = values[p.shape]
            m.merge(int(np.prod(shape)) // max(int(shape[1]), 1), values[p.mean], values[p.var])
    return moments


def _feed(batch: Batch, inputs: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    if isinstance(batch, Mapping):
        missing = sorted(set(inputs) - set(batch))
        if missing:
            raise GhnOnnxError(f"calibration batch lacks model input(s) {', '.join(missing)}")
        return {k: np.asarray(batch[k]).astype(inputs[k], copy=False) for k in inputs}
    if len(inputs) != 1:
        raise GhnOnnxError(f"the model has {len(inputs)} inputs ({', '.join(inputs)}): pass each "
                           "batch as a name -> array mapping")
    (name, dtype), = inputs.items()
    return {name: np.asarray(batch).astype(dtype, copy=False)}


def _measure(model: onnx.ModelProto, names: list[str], feeds: list[dict[str, np.ndarray]],
             threads: int | None) -> list[_Moments]:
    """Moments of tensors ``names`` over all feeds, running only the nodes they depend on."""
    moments = [_Moments() for _ in names]
    computed = [n for n in names if n not in feeds[0]]  # a BN right on a graph input needs no run
    session = inference_session(_prune(model, computed), threads) if computed else None
    for feed in feeds:
        values = dict(zip(computed, _run(session, computed, feed))) if session else {}
        for name, m in zip(names, moments):
            m.update(feed[name] if name in feed else values[name])
    return moments


def _run(session, names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:  # onnxruntime raises its own exception types, with multi-line messages
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feed.items())
        detail = " ".join(str(exc).split())
        raise GhnOnnxError(f"onnxruntime cannot run the model on the calibration batch ({shapes}): "
                           f"{detail[:300]}") from None


def _own_statistics(model: onnx.ModelProto, graph: Graph | None) -> tuple[onnx.ModelProto, list[_Bn]]:
    """A copy of ``model`` where each BN to calibrate reads its statistics from tensors it alone
    uses, plus those BNs with their levels. BNs whose statistics are computed are skipped."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = topological_nodes(g)
    stored = stored_tensors(out)
    uses = consumer_counts(out)
    protected = {i.name for i in g.input} | {o.name for o in g.output}
    producer = {o: n for n in nodes for o in n.output if o}
    taken: set[str] = set()
    names = {t for n in nodes for t in list(n.input) + list(n.output)} | set(stored)
    drop: set[str] = set()  # outputs of alias nodes to remove (names are unique; ids may not be)
    new_inits: list[onnx.TensorProto] = []
    bns: list[_Bn] = []
    levels = _bn_levels(nodes)
    for node in _targets(nodes, stored, producer, graph):
        values = [_static_value(node.input[k], stored, producer) for k in (3, 4)]
        owned = []
        for k, value in zip((3, 4), values):
            name = node.input[k]
            if name in stored and uses[name] == 1 and name not in protected and name not in taken:
                owned.append(name)  # already exclusively this BN's: overwrite in place
                continue
            src = producer.get(name)
            if (src is not None and src.op_type in ("Identity", "Cast") and len(src.output) == 1
                    and uses[name] == 1 and name not in protected):
                drop.add(name)  # an alias only this slot reads: make it a tensor of its own
            else:
                name = unique_name(f"{name}.calibrated", names)
                node.input[k] = name
            names.add(name)
            new_inits.append(numpy_helper.from_array(value, name))
            owned.append(name)
        taken.update(owned)
        bns.append(_Bn(node.input[0], node.output[0], owned[0], owned[1], levels[id(node)]))
    if drop:
        keep = [n for n in g.node if not (len(n.output) == 1 and n.output[0] in drop)]
        del g.node[:]
        g.node.extend(keep)
    g.initializer.extend(new_inits)
    return out, bns


def calibration_targets(model: onnx.ModelProto, graph: Graph | None = None) -> list[str]:
    """The BatchNormalization nodes :func:`calibrate_bn` would calibrate (their names, or first
    outputs): those with stored running statistics, restricted to ``graph``'s BN nodes when
    given. Empty for a model with nothing to calibrate; cheap (no copy, no run)."""
    g = model.graph
    nodes = list(g.node)
    producer = {o: n for n in nodes for o in n.output if o}
    return [n.name or n.output[0] for n in _targets(nodes, stored_tensors(model), producer, graph)]


def _targets(nodes: list[onnx.NodeProto], stored: dict, producer: dict,
             graph: Graph | None) -> Iterator[onnx.NodeProto]:
    """The BNs to calibrate, in ``nodes`` order: statistics stored (behind Identity / Cast at
    most; statistics computed at run time leave nothing to calibrate), and scale predicted as a
    ``bn`` node of ``graph`` when one is given."""
    wanted = None
    if graph is not None:
        wanted = {p.tensor for n in graph.nodes if n.primitive is Primitive.BN for p in n.params
                  if p.role == "scale"}
    for node in nodes:
        if not is_batch_norm(node) or len(node.input) < 5:
            continue
        if wanted is not None and alias_source(node.input[1], stored, producer) not in wanted:
            continue
        if all(alias_source(node.input[k], stored, producer) is not None for k in (3, 4)):
            yield node


def _bn_levels(nodes: list[onnx.NodeProto]) -> dict[int, int]:
    """id(BN node) → number of BN nodes on the longest path from a graph input to it."""
    depth: dict[str, int] = {}
    levels: dict[int, int] = {}
    for node in nodes:
        d = max((depth.get(x, 0) for x in node.input if x), default=0)
        if is_batch_norm(node):
            levels[id(node)] = d
            d += 1
        for o in node.output:
            depth[o] = d
    return levels


def _static_value(name: str, stored: dict, producer: dict) -> np.ndarray | None:
    """The value a stored tensor has after Identity / Cast nodes, as the consumer sees it."""
    casts = []
    while name not in stored:
        node = producer.get(name)
        if node is None or node.op_type not in ("Identity", "Cast") or not node.input:
            return None
        if node.op_type == "Cast":
            casts.append(next(a.i for a in node.attribute if a.name == "to"))
        name = node.input[0]
    value = numpy_helper.to_array(stored[name])
    for to in reversed(casts):
        value = value.astype(np_dtype(to))
    return value


def _prune(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The sub-model computing ``outputs`` (onnxruntime runs every node of a graph whatever is
    fetched, so unpruned each level would cost a full forward pass)."""
    g = model.graph
    producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
    needed = reachable(outputs, lambda t: _node_reads(g.node[producer[t]]) if t in producer else ())
    needed_nodes = {producer[t] for t in needed if t in producer}
    sub = onnx.ModelProto()
    sub.ir_version = model.ir_version
    sub.opset_import.extend(model.opset_import)
    sub.functions.extend(model.functions)
    sub.graph.name = g.name
    sub.graph.node.extend(n for i, n in enumerate(g.node) if i in needed_nodes)
    sub.graph.initializer.extend(t for t in g.initializer if t.name in needed)
    inits = {t.name for t in g.initializer}
    sub.graph.input.extend(i for i in g.input if i.name not in inits or i.name in needed)
    for i in sub.graph.input:  # exporters often fix the batch size; calibration batches differ
        dims = i.type.tensor_type.shape.dim
        if i.name not in inits and len(dims):
            dims[0].Clear()
            dims[0].dim_param = "calibration_batch"
    sub.graph.output.extend(onnx.ValueInfoProto(name=o) for o in outputs)
    return sub


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """A node's inputs and the outer names its sub-graphs read."""
    names = [x for x in node.input if x]
    for a in node.attribute:
        for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sg.node:
                names.extend(_node_reads(n))
    return names


