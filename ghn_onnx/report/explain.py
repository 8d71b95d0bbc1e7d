"""Which layers does the GHN get wrong? Per-layer diagnostics of a predicted ONNX model.

:func:`explain` reads a file written by ``ghn-onnx predict`` (its ``ghn_onnx.predicted_tensors``
metadata names what was predicted), or predicts a raw model first with a given checkpoint, and
reports one :class:`LayerReport` per parametrised GHN node (the graph ``predict`` reads, so rows
are the GHN's nodes: name, primitive, canonical shape). Without data, from the tensors alone:

* **norm ratio** ``‖W_pred‖ / E‖W_init‖`` against PyTorch's default init (:func:`reference_init`):
  conv / linear weights ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(±1/sqrt(fan_in))``, element
  std ``1/sqrt(3·fan_in)``, ``fan_in = in/groups·kh·kw``, so ``E‖W_init‖ = sqrt(numel/(3·fan_in))``;
  layer biases ``U(±1/sqrt(fan_in))`` of their layer; norm scales ones (``sqrt(C)``); positional
  embeddings ``N(0, 0.02²)`` (torchvision's ViT);
* **repeated rows / channels**: the share of output rows (``W`` as ``(out, -1)``; the elements of a
  1-D tensor) and of input channels (``W`` as ``(in, -1)`` along axis 1) that are exact copies of
  an earlier one. The decoder predicts blocks of its ``max_shape`` and tiles them to the target
  (GHN2_FACTS §4.5), so a conv with 256 outputs from 64-row blocks has 75% repeated rows;
* **effective rank** of ``W`` as ``(out, -1)``: ``exp(H(p))``, ``p_k = σ_k / Σσ``, the
  entropy-based effective rank of Roy & Vetterli, "The effective rank: a measure of effective
  dimensionality", EUSIPCO 2007; between 1 and ``min(out, in)`` (``max_rank``).

With data (:func:`~ghn_onnx.report.explain_data.labelled_images`: images of the held-out split
when the source has one, since nothing here calibrates): the mean, std and dead share (units
never positive on the batch, so a ReLU after them is always 0) of each layer's output on the
first batch; the model's top-1; and for each layer, the top-1 after re-initialising that layer
alone with its reference init (seeded per layer). BatchNorm normalises with batch statistics by
default (``bn="batch"``, what the GHN papers measure, and all an uncalibrated file can do), or
with the stored running statistics (``bn="stored"``). The layers are then sorted by accuracy drop.

All the re-initialisations run through one onnxruntime session in which the swept tensors are
graph inputs, so the sweep costs one evaluation per layer and no session rebuilds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.default_init import ReferenceInit, reference_init, sample_init
from ghn_onnx.graph.graph import Graph, Node, ParamRef
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.loading import load_model
from ghn_onnx.onnx_io.storage import cast_to_stored, stored_tensors
from ghn_onnx.report.explain_data import LabelledImages, labelled_images
from ghn_onnx.writeback.write import METADATA_PREFIX, resolve_shared

SCHEMA = "ghn-onnx.explain/1"
PREDICTED_KEY = "ghn_onnx.predicted_tensors"
# Effective rank from the Gram matrix of the smaller side; beyond this side it is not computed.
MAX_RANK_SIDE = 4096
# Ops whose output holds channels on axis 1 (NCHW); other layers' units are on the last axis.
CHANNEL_FIRST_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization",
                               "GroupNormalization"})
# Ops a parameter may pass through before the layer that uses it (layout and dtype only).
PASS_THROUGH_OPS = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Unsqueeze", "Squeeze", "Flatten",
                              "CastLike"})


@dataclass(frozen=True)
class Activation:
    """One layer output on one batch: ``output`` (the ONNX tensor), its mean and std over all
    elements, and ``dead``: the share of units (channels) never positive on the batch."""

    output: str
    mean: float
    std: float
    dead: float | None


@dataclass
class LayerReport:
    """The diagnostics of one parametrised GHN node (see the module docstring)."""

    index: int                   # position in the GHN graph
    name: str
    op: str                      # the primitive's label
    onnx_op: str | None          # the ONNX op of the layer that reads the main tensor
    shape: tuple[int, ...]       # canonical shape of the main tensor
    tensors: list[str]           # the predicted tensors this node owns
    elements: int
    init: str                    # ReferenceInit.description
    norm: float
    init_norm: float | None
    repeated_rows: float
    repeated_channels: float | None
    effective_rank: float | None
    max_rank: int | None
    activation: Activation | None = None
    reinit_accuracy: float | None = None

    @property
    def norm_ratio(self) -> float | None:
        return self.norm / self.init_norm if self.init_norm else None

    def accuracy_drop(self, accuracy: float | None) -> float | None:
        return None if accuracy is None or self.reinit_accuracy is None else accuracy - self.reinit_accuracy


@dataclass
class Explanation:
    """:func:`explain`'s result: the layers (sorted by impact when accuracy was measured, else in
    graph order), the model's top-1 (``None`` without labelled data), what data was used, notes."""

    model: str
    layers: list[LayerReport]
    metadata: dict[str, str]
    bn: str
    accuracy: float | None = None
    data: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types, keys in a fixed order; the schema is ``SCHEMA`` (README, Explain)."""
        def num(x: float | None, digits: int = 6) -> float | None:
            return None if x is None else round(float(x), digits)

        return {
            "schema": SCHEMA,
            "model": self.model,
            "metadata": dict(self.metadata),
            "bn": self.bn,
            "data": self.data,
            "accuracy": num(self.accuracy),
            "notes": list(self.notes),
            "layers": [{
                "index": r.index, "name": r.name, "op": r.op, "onnx_op": r.onnx_op, "shape": list(r.shape),
                "tensors": list(r.tensors), "elements": r.elements, "init": r.init, "norm": num(r.norm), "init_norm": num(r.init_norm),
                "norm_ratio": num(r.norm_ratio), "repeated_rows": num(r.repeated_rows),
                "repeated_channels": num(r.repeated_channels), "effective_rank": num(r.effective_rank, 3),
                "max_rank": r.max_rank,
                "activation": None if r.activation is None else {
                    "output": r.activation.output, "mean": num(r.activation.mean), "std": num(r.activation.std),
                    "dead": num(r.activation.dead)},
                "reinit_accuracy": num(r.reinit_accuracy), "accuracy_drop": num(r.accuracy_drop(self.accuracy)),
            } for r in self.layers],
        }

    def format(self) -> str:
        """The text table, one layer a row, most harmful re-initialisation first."""
        head = f"{self.model}: {len(self.layers)} predicted layers, BN {self.bn} statistics"
        lines = [head]
        if self.data is not None:
            lines.append(f"data: {self.data['images']} images from {self.data['source']} ({self.data['split']}), "
                         f"batches of {self.data['batch_size']}, seed {self.data['seed']}")
        if self.accuracy is not None:
            lines.append(f"top-1 as predicted: {100 * self.accuracy:.2f}%; 'drop' is top-1 lost when that layer "
                         "alone is re-initialised with PyTorch's default init")
        lines += [f"note: {n}" for n in self.notes]
        cols = ("#", "layer", "op", "onnx", "shape", "norm/init", "rep.rows", "rep.ch", "erank", "act.mean", "act.std",
                "dead", "drop")
        rows = [cols]
        for r in self.layers:
            a = r.activation
            rows.append((str(r.index), _clip(r.name, 40), r.op, r.onnx_op or "-", "x".join(map(str, r.shape)),
                         _f(r.norm_ratio, "3f"), _pct(r.repeated_rows), _pct(r.repeated_channels),
                         "-" if r.effective_rank is None else f"{r.effective_rank:.1f}/{r.max_rank}",
                         _f(a and a.mean, "3f"), _f(a and a.std, "3f"), _pct(a and a.dead),
                         _pct(r.accuracy_drop(self.accuracy), signed=True)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
        left = {1, 2, 3}
        lines.append("")
        for row in rows:
            lines.append("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in
                                   enumerate(zip(row, widths))).rstrip())
        return "\n".join(lines)


def _clip(s: str, n: int) -> str:
    return s if len(s) <= n else "…" + s[-(n - 1):]


def _f(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, "." + spec)


def _pct(x: float | None, signed: bool = False) -> str:
    return "-" if x is None else f"{100 * x:{'+' if signed else ''}.1f}%"


# -- the layers and their reference init -----------------------------------------------------------

def predicted_layers(model: onnx.ModelProto, graph: Graph) -> list[tuple[int, Node, list[ParamRef]]]:
    """``(index, node, owned refs)`` for each GHN node with a tensor the file says was predicted
    (its ``ghn_onnx.predicted_tensors`` metadata); a tied tensor belongs to its first reader."""
    names = predicted_names(model)
    owners = resolve_shared(graph)
    out = []
    for i, node in enumerate(graph.nodes):
        refs = [p for p in node.params if p.tensor in names and owners[p.tensor] is p]
        if refs:
            out.append((i, node, refs))
    return out


def predicted_names(model: onnx.ModelProto) -> set[str]:
    """The tensors a ``ghn-onnx predict`` output says it predicted; an error for any other file."""
    value = next((p.value for p in model.metadata_props if p.key == PREDICTED_KEY), None)
    if value is None:
        raise GhnOnnxError(f"not a ghn-onnx prediction (no {PREDICTED_KEY} metadata): run `ghn-onnx predict` "
                           "first, or pass a checkpoint (--checkpoint) to predict it here")
    try:
        return set(json.loads(value)["names"])
    except (ValueError, KeyError, TypeError):
        raise GhnOnnxError(f"{PREDICTED_KEY} metadata is not what ghn-onnx writes ({value[:60]!r})") from None


# -- statistics of one tensor ----------------------------------------------------------------------

def _rows(w: np.ndarray, pos_enc: bool) -> np.ndarray:
    """The (rows, -1) matrix view: tokens of a (1, T, C) positional embedding, else output rows."""
    if pos_enc and w.ndim == 3 and w.shape[0] == 1:
        return w.reshape(w.shape[1], -1)
    return w.reshape(w.shape[0], -1) if w.ndim > 1 else w.reshape(-1, 1)


def repeated_share(m: np.ndarray) -> float:
    """The share of rows of ``m`` that are bit-for-bit copies of an earlier row."""
    if len(m) == 0:
        return 0.0
    rows = np.ascontiguousarray(m).view(np.dtype((np.void, m.dtype.itemsize * m.shape[1])))
    return 1.0 - len(np.unique(rows)) / len(m)


def effective_rank(m: np.ndarray) -> float | None:
    """Roy & Vetterli's (2007) effective rank ``exp(-Σ p_k log p_k)``, ``p = σ / ‖σ‖₁``; ``None``
    for a zero matrix or one whose smaller side exceeds ``MAX_RANK_SIDE``."""
    if min(m.shape) > MAX_RANK_SIDE:
        return None
    m = m.astype(np.float64)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m  # σ² from the smaller side
    sigma = np.sqrt(np.clip(np.linalg.eigvalsh(gram), 0.0, None))
    total = sigma.sum()
    if total <= 0:
        return None
    p = sigma[sigma > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def tensor_report(graph: Graph, index: int, refs: list[ParamRef], stored: dict[str, onnx.TensorProto],
                  onnx_op: str | None = None) -> LayerReport:
    """The data-free part of a layer's report, from its main (first) tensor."""
    node, main = graph.nodes[index], refs[0]
    pos_enc = node.primitive is Primitive.POS_ENC
    w = main.layout.to_canonical(numpy_helper.to_array(stored[main.tensor]))
    w64 = w.astype(np.float64)
    init = reference_init(graph, index, main)
    rows = _rows(w, pos_enc)
    matrix = w.ndim > 1
    channels = None
    if matrix and not pos_enc:
        channels = repeated_share(np.moveaxis(w, 1, 0).reshape(w.shape[1], -1))
    return LayerReport(
        index=index, name=node.name, op=node.primitive.label, onnx_op=onnx_op, shape=tuple(main.canonical_shape),
        tensors=[r.tensor for r in refs], elements=int(sum(r.numel for r in refs)), init=init.description,
        norm=float(np.linalg.norm(w64)), init_norm=None if init.rms is None else init.rms * math.sqrt(w.size),
        repeated_rows=repeated_share(rows), repeated_channels=channels,
        effective_rank=effective_rank(rows) if matrix else None, max_rank=min(rows.shape) if matrix else None,
    )


# -- running the model -----------------------------------------------------------------------------

def layer_outputs(model: onnx.ModelProto, tensors: Iterable[str]) -> dict[str, tuple[str, str]]:
    """tensor → ``(output name, op type)`` of the layer that uses it: its first reader, past ops
    that only change layout or dtype; tensors no such layer reads are left out."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    out = {}
    for tensor in tensors:
        name, seen = tensor, set()
        while name not in seen and readers.get(name):
            seen.add(name)
            node = readers[name][0]
            if node.op_type in PASS_THROUGH_OPS and node.output:
                name = node.output[0]
                continue
            if node.output and node.output[0]:
                out[tensor] = (node.output[0], node.op_type)
            break
    return out


def _activation(value: np.ndarray, output: str, op: str, units: int) -> Activation:
    x = value.astype(np.float64, copy=False)
    dead = None
    axes = [1, -1] if op in CHANNEL_FIRST_OPS else [-1, 1]
    axis = next((a for a in axes if x.ndim >= 2 and x.shape[a] == units), None)
    if axis is not None:
        alive = (np.moveaxis(x, axis, 0).reshape(units, -1) > 0).any(axis=1)
        dead = float(1.0 - alive.mean())
    return Activation(output, float(x.mean()), float(x.std()), dead)


class _Runner:
    """One onnxruntime session of ``model`` in which the ``swept`` tensors are graph inputs
    (fed the predicted values, or a re-initialisation) and ``probes`` are extra outputs."""

    def __init__(self, model: onnx.ModelProto, swept: list[str], probes: list[str]) -> None:
        from ghn_onnx.threads import inference_session

        m = onnx.ModelProto()
        m.CopyFrom(model)
        g = m.graph
        stored = stored_tensors(m)
        self.values = {name: numpy_helper.to_array(stored[name]) for name in swept}
        inputs = {i.name for i in g.input}
        keep = [t for t in g.initializer if t.name not in self.values]
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = [n for n in g.node if not (n.op_type == "Constant" and n.output and n.output[0] in self.values)]
        del g.node[:]
        g.node.extend(nodes)
        for name, value in self.values.items():
            if name not in inputs:
                g.input.append(helper.make_tensor_value_info(name, stored[name].data_type, list(value.shape)))
        self.logits = g.output[0].name
        outputs = {o.name for o in g.output}
        g.output.extend(onnx.ValueInfoProto(name=p) for p in dict.fromkeys(probes) if p not in outputs)
        try:
            serialized = m.SerializeToString()
        except ValueError:  # protobuf's 2 GB limit
            raise GhnOnnxError("the model is over 2 GB: explain runs models that fit in one protobuf; "
                               "explain it without --data") from None
        try:
            self.session = inference_session(serialized)  # errors only: shape-merge notes are not the user's
        except Exception as exc:  # onnxruntime raises its own types, with multi-line messages
            raise GhnOnnxError(f"onnxruntime cannot load the model ({_first_line(exc)})") from None
        self.input = next(i.name for i in self.session.get_inputs() if i.name not in self.values)

    def run(self, x: np.ndarray, outputs: list[str], replaced: dict[str, np.ndarray] | None = None) -> list:
        feeds = {self.input: x, **self.values, **(replaced or {})}
        try:
            return self.session.run(outputs, feeds)
        except Exception as exc:
            raise GhnOnnxError(f"onnxruntime cannot run the model ({_first_line(exc)})") from None

    def top1(self, data: LabelledImages, replaced: dict[str, np.ndarray] | None = None) -> float:
        correct = 0
        for x, y in data.batches():
            logits = self.run(x, [self.logits], replaced)[0]
            correct += int((logits.reshape(len(x), -1).argmax(1) == y).sum())
        return correct / data.images


def _first_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text[:300]


# -- the whole explanation -------------------------------------------------------------------------

def explain(model: onnx.ModelProto | str | os.PathLike, data: str | os.PathLike | None = None, *,
            checkpoint=None, images: int = 256, layers: int | None = None, batch_size: int = 64, seed: int = 0,
            bn: Literal["batch", "stored"] = "batch", mean=None, std=None, no_normalize: bool = False,
            name: str | None = None, progress: Callable[[Iterable], Iterable] = lambda it: it) -> Explanation:
    """Per-layer diagnostics of a predicted model (module docstring); nothing is written.

    Args:
        model: a file written by ``ghn-onnx predict`` (or its ``ModelProto``); with
            ``checkpoint``, any model, predicted here first.
        data: images (folder, ``.zip``, ``.npy`` / ``.npz``, see
            :func:`~ghn_onnx.report.explain_data.labelled_images`); ``None``: tensor statistics only.
        checkpoint: a ``GHN``, checkpoint name or path: predict ``model`` with it first.
        images: how many images to draw (at random, ``seed``) for activations and accuracy.
        layers: re-initialise only the ``layers`` largest layers (by elements); ``None``: all.
        batch_size: images per batch (batch-statistics BN depends on it; the papers use 64).
        bn: ``"batch"`` (batch statistics) or ``"stored"`` (the file's running statistics).
        mean, std, no_normalize: image normalisation, as for calibration.
        progress: wraps the re-initialisation sweep (e.g. ``tqdm``).

    Raises:
        GhnOnnxError: the model cannot be read or is not a prediction; bad data; the model does
            not run in onnxruntime.
    """
    if bn not in ("batch", "stored"):
        raise GhnOnnxError(f"bn must be 'batch' or 'stored' (got {bn!r})")
    if layers is not None and layers < 0:
        raise GhnOnnxError(f"layers must be 0 or more (got {layers})")
    model, graph, label = _prepared(model, checkpoint, name)
    stored = stored_tensors(model)
    found = predicted_layers(model, graph)
    if not found:
        raise GhnOnnxError(f"{label}: none of the predicted tensors the metadata names is a GHN node's parameter")
    outputs = layer_outputs(model, [refs[0].tensor for _, _, refs in found])
    reports = [tensor_report(graph, i, refs, stored, outputs.get(refs[0].tensor, (None, None))[1])
               for i, _, refs in found]
    meta = {p.key: p.value for p in model.metadata_props
            if p.key.startswith(METADATA_PREFIX) and p.key != PREDICTED_KEY}
    result = Explanation(model=label, layers=reports, metadata=meta, bn=bn)
    if data is not None:
        _measure(result, model, graph, data, outputs, images=images, layers=layers, batch_size=batch_size, seed=seed,
                 normalisation={"mean": mean, "std": std, "no_normalize": no_normalize}, progress=progress)
    return result


def _measure(result: Explanation, model: onnx.ModelProto, graph: Graph, data, outputs: dict[str, tuple[str, str]], *,
             images: int, layers: int | None, batch_size: int, seed: int, normalisation: dict,
             progress: Callable[[Iterable], Iterable]) -> None:
    """The data part of :func:`explain`, into ``result``: activations, top-1, the sweep, the order."""
    from ghn_onnx.bn.batch_stats import batch_stats_model
    from ghn_onnx.onnx_io.storage import is_batch_norm

    imgs = labelled_images(model, data, images, batch_size, seed, **normalisation)
    result.data = {"source": str(data), "split": imgs.split, "images": imgs.images, "batch_size": imgs.batch_size,
                   "seed": seed}
    result.notes += imgs.notes
    batch_stats = result.bn == "batch" and any(is_batch_norm(n) for n in model.graph.node)
    if result.bn == "stored" and result.metadata.get("ghn_onnx.bn") == "uncalibrated":
        result.notes.append("BN running statistics were never calibrated (ghn_onnx.bn = uncalibrated): "
                            "accuracy with bn='stored' means little; use batch statistics")
    reports = result.layers
    swept = sorted(reports, key=lambda r: (-r.elements, r.index))[:layers]  # [:None] is all
    # Layer outputs are found on the model as stored: batch statistics rewrite each BN into
    # several nodes but keep its output's name.
    probes = [(r, outputs[r.tensors[0]]) for r in reports if r.tensors[0] in outputs]
    runner = _Runner(batch_stats_model(model) if batch_stats else model, [t for r in swept for t in r.tensors],
                     [o for _, (o, _) in probes])
    values = runner.run(next(imgs.batches())[0], [runner.logits] + [o for _, (o, _) in probes])
    for (r, (out, op)), value in zip(probes, values[1:]):
        units = r.shape[-1] if graph.nodes[r.index].primitive is Primitive.POS_ENC else r.shape[0]
        r.activation = _activation(np.asarray(value), out, op, units)
    classes = int(np.prod(np.asarray(values[0]).shape[1:]))
    if imgs.labels is None:
        result.notes.append(f"{data}: no class labels (an array without labels, or images outside class "
                            "folders): accuracy and the re-initialisation sweep skipped")
        return
    if not imgs.fits(classes):
        have = f"{imgs.classes} classes" if imgs.classes_exact else f"labels up to {imgs.classes - 1}"
        result.notes.append(f"the model's head has {classes} outputs and the data {have}: "
                            "accuracy and the re-initialisation sweep skipped")
        return
    result.accuracy = runner.top1(imgs)
    stored = stored_tensors(model)
    for r in progress(swept):
        r.reinit_accuracy = runner.top1(imgs, reinitialised(graph, r, stored, seed))
    # Most harmful first; layers left out of the sweep after the others, in graph order.
    reports.sort(key=lambda r: (r.reinit_accuracy is None, -(r.accuracy_drop(result.accuracy) or 0.0), r.index))


def reinitialised(graph: Graph, layer: LayerReport, stored: dict[str, onnx.TensorProto], seed: int
                  ) -> dict[str, np.ndarray]:
    """The layer's tensors drawn from their reference init, in stored layout and dtype. Each
    layer has its own stream, ``default_rng([seed, index])``: any subset swept draws the same."""
    rng = np.random.default_rng([seed, layer.index])
    out = {}
    for t in layer.tensors:
        ref = next(p for p in graph.nodes[layer.index].params if p.tensor == t)
        value = ref.layout.to_stored(sample_init(reference_init(graph, layer.index, ref), ref.canonical_shape, rng))
        out[t] = cast_to_stored(value, stored[t].data_type, repr(t))
    return out


def _prepared(model, checkpoint, name: str | None) -> tuple[onnx.ModelProto, Graph, str]:
    """The predicted model (untied, as ``predict`` writes it), its GHN graph, and its label."""
    from ghn_onnx.pipeline import predict, prepare

    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        model = load_model(model)
    label = name or "model"
    if checkpoint is not None:
        from ghn_onnx.ghn.model import GHN
        from ghn_onnx.pipeline import load_ghn

        ghn = checkpoint if isinstance(checkpoint, GHN) else load_ghn(checkpoint)
        pred = predict(model, ghn, name=label)
        return pred.model, pred.graph, label
    try:
        predicted_names(model)
    except GhnOnnxError as exc:
        raise GhnOnnxError(f"{label}: {exc}") from None
    model, graph = prepare(model, label)  # the layers are the same under either rule set
    return model, graph, label
