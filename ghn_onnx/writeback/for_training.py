"""Predictions made ready for fine-tuning (``predict --for-training``).

A GHN decodes every weight as tiles of one fixed block (GHN2_FACTS: ``max_shape``), so a layer
wider than the block gets output channels that are exact copies of each other, with identical
norm parameters after them. Copies receive identical gradients, so SGD never separates them: the
layer trains as if it were as narrow as the block ("Pretraining a Neural Network before Knowing
Its Architecture", Knyazev 2022: predicted parameters "lack the diversity necessary to fine-tune").
:func:`for_training` breaks that symmetry:

* **orthogonalisation** (on by default, from the first layer): from the ``orthogonal_from``
  fraction of the weight layers on (0.0 = all, 0.5 = the deeper half), each weight whose output
  is normalised before anything else reads it (``normalised_only``, :func:`normalised_weights`),
  reshaped to
  ``(out, fan_in)`` is replaced by its nearest semi-orthogonal matrix (the polar factor ``U Vᵀ``
  of its SVD), scaled to keep the predicted Frobenius norm; the classifier excepted. Where
  ``out <= fan_in`` repeated rows make the weight rank-deficient and the polar factor completes
  the missing directions, so the copies come out distinct; a tall weight's polar factor keeps them
  (its rows are combinations of the weight's), and the noise below separates them.
* **noise on repeated rows** (after orthogonalisation): in each conv / linear weight, every
  output row (channel) that exactly repeats an earlier one gets Gaussian noise of standard deviation ``noise × std(W)``
  (the spread of the predicted tensor); the first copy stays as predicted, so a layer without
  repeats is unchanged. The classifier is never touched: its rows are the class heads.
* **rescaling** (``rescale``): each normalised weight (the set orthogonalisation uses), with the
  bias right after it, scaled to the Frobenius norm its PyTorch default init has in expectation
  (:mod:`ghn_onnx.graph.default_init`). A normalisation with batch statistics cancels a positive
  scale of what feeds it, so the function is unchanged; what changes is SGD's step: on a
  scale-invariant weight its effective size goes as ``lr / ‖W‖²``, and the GHN predicts such
  weights at 0.3-0.8 of the init's norm (a held-out generated net, 2026-12-04), i.e. steps 2-10x
  larger than the norm scales, biases and classifier beside them receive at the same learning
  rate.
* **perturbation** (``perturb = p``): every conv / linear weight but the classifier becomes
  ``(1 - p) W + p R``, ``R`` a seeded draw of its default init scaled to ``‖W‖`` ("shrink and
  perturb", Ash & Adams, "On Warm-Starting Neural Network Training", NeurIPS 2020: warm-started
  networks train worse than fresh ones, and mixing in fresh random weights restores it).

The defaults were chosen by measurement (RESULTS.md "Fine-tuning from predictions"). Runs 1-4
(one or two of the benchmark's held-out networks, SGD): orthogonalising every layer gave the best
validation accuracy (0.5 next), well above noise alone, which barely changed the raw prediction's
curve; on a BN-free network orthogonalising every layer left it at chance, so only the normalised
layers are (``normalised_only``). Run 6 (three networks of the trainer's validation stream, never
benchmarked on, 2026-12-04): rescaling on top of that matched or beat PyTorch's default init on
all three after 100 SGD steps, the previous default on two, so ``rescale`` is on; the
perturbation won on one and lost on another, so it is off.

Norm scales and shifts, biases and positional embeddings are left as predicted: once the weights
before them differ, their channels no longer see equal inputs. Noise is drawn per tensor from a
generator seeded by ``(seed, crc32(tensor name))``, so the result depends on neither the order of
tensors nor the other models in a batch. What was done is returned and written into the output's
``ghn_onnx.for_training`` metadata (JSON).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.decode.rules import classifier_nodes
from ghn_onnx.graph.default_init import reference_init, sample_init
from ghn_onnx.graph.graph import Graph, ParamRef
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive

METADATA_KEY = "for_training"


@dataclass(frozen=True)
class ForTraining:
    """How predictions are post-processed for fine-tuning (see the module docstring).

    Attributes:
        noise: standard deviation of the noise on repeated rows, relative to the tensor's own
            standard deviation (0 disables it).
        orthogonal_from: orthogonalise the weight layers from this fraction of them on, in graph
            order, the classifier not counted (``0.0``: all, ``0.5``: the deeper half); ``None``: none.
        seed: seed of the noise.
        normalised_only: orthogonalise only weights whose output is normalised (BN / LN)
            before anything else reads it (through biases and further weights only): without a
            normalisation after it, the flattened spectrum of an orthogonalised weight shrinks
            the signal along the directions its input actually has, layer after layer
            (a BN-free held-out network stopped training at chance, RESULTS.md).
        rescale: scale each normalised weight (the same set), and the bias right after it, to the
            Frobenius norm its PyTorch default init has in expectation
            (:func:`~ghn_onnx.graph.default_init.reference_init`). Normalisation with batch
            statistics cancels a positive scale of what feeds it, so the network computes the same
            function, but SGD's effective step on a scale-invariant weight goes as ``lr / ‖W‖²``:
            predicted weights at a fraction of the init's norm take steps many times larger than
            the norm scales, biases and classifier beside them, and a learning rate that suits
            those wrecks the predicted features.
        perturb: the share ``p`` of a seeded default-init draw mixed into every conv / linear
            weight but the classifier, ``(1 - p) W + p R`` with ``R`` at ``‖W‖`` (0: off).
    """

    noise: float = 1e-2
    orthogonal_from: float | None = 0.0
    seed: int = 0
    normalised_only: bool = True
    rescale: bool = True
    perturb: float = 0.0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.noise) and self.noise >= 0):
            raise GhnOnnxError(f"for_training noise: expected a finite value >= 0 (got {self.noise})")
        if self.orthogonal_from is not None and not 0.0 <= self.orthogonal_from <= 1.0:
            raise GhnOnnxError(f"for_training orthogonal_from: expected 0..1 (got {self.orthogonal_from})")
        if not (np.isfinite(self.perturb) and 0.0 <= self.perturb <= 1.0):
            raise GhnOnnxError(f"for_training perturb: expected 0..1 (got {self.perturb})")


@dataclass(frozen=True)
class ForTrainingReport:
    """What :func:`for_training` changed: tensors with repeated rows that got noise, how many rows
    in all, the tensors orthogonalised and the weights rescaled."""

    options: ForTraining
    noised_tensors: int
    noised_rows: int
    orthogonalised: int
    rescaled: int = 0
    perturbed: int = 0

    def metadata(self) -> dict[str, str]:
        """The ``ghn_onnx.for_training`` entry written into the output model."""
        return {METADATA_KEY: json.dumps({**asdict(self.options), "noised_tensors": self.noised_tensors,
                                          "noised_rows": self.noised_rows, "orthogonalised": self.orthogonalised,
                                          "rescaled": self.rescaled, "perturbed": self.perturbed},
                                         sort_keys=True)}


def repeated_rows(weight: np.ndarray) -> np.ndarray:
    """Indices of the output rows of ``weight`` (``(out, ...)``) that exactly repeat an earlier row."""
    # Rows keyed by their bytes: exact (as tiling makes them), and linear time where
    # np.unique(axis=0) sorts rows as structured values (seconds for a ResNet-18).
    rows = np.ascontiguousarray(weight.reshape(weight.shape[0], -1))
    seen: set[bytes] = set()
    repeats = []
    for i, row in enumerate(rows):
        key = row.tobytes()
        if key in seen:
            repeats.append(i)
        else:
            seen.add(key)
    return np.asarray(repeats, dtype=np.int64)


def nearest_orthogonal(weight: np.ndarray) -> np.ndarray:
    """The polar factor of ``weight`` viewed as ``(out, fan_in)``, scaled to the same Frobenius norm."""
    w = weight.reshape(weight.shape[0], -1).astype(np.float64)
    u, _, vt = np.linalg.svd(w, full_matrices=False)
    q = u @ vt
    norm = np.linalg.norm(w)
    q *= norm / max(np.linalg.norm(q), np.finfo(np.float64).tiny)
    return q.reshape(weight.shape).astype(weight.dtype)


def normalised_weights(graph: Graph) -> set[int]:
    """The weight nodes whose output reaches a normalisation (BN / LN) through biases and
    further weights only, before any other node reads it."""
    succ: dict[int, list[int]] = {}
    for s, d in graph.edges[:, :2].tolist():
        succ.setdefault(s, []).append(d)
    linear = WEIGHT_PRIMITIVES | {Primitive.BIAS}
    memo: dict[int, bool] = {}

    def reaches_norm(i: int) -> bool:  # edges run forward, so a walk in reverse node order terminates
        if i not in memo:
            nxt = succ.get(i, [])
            memo[i] = bool(nxt) and all(graph.nodes[j].primitive in NORM_PRIMITIVES
                                        or (graph.nodes[j].primitive in linear and reaches_norm(j)) for j in nxt)
        return memo[i]

    for i in range(len(graph.nodes) - 1, -1, -1):  # deepest first: no deep recursion
        reaches_norm(i)
    return {i for i, n in enumerate(graph.nodes) if n.primitive in WEIGHT_PRIMITIVES and memo[i]}


def for_training(graph: Graph, predictions: Mapping[str, np.ndarray],
                 options: ForTraining = ForTraining()) -> tuple[dict[str, np.ndarray], ForTrainingReport]:
    """``predictions`` (``ParamRef.tensor`` → canonical array, as the GHN returns them for
    ``graph``) post-processed by ``options``; the input arrays are not modified."""
    out = dict(predictions)
    cls_w, _ = classifier_nodes(graph)
    weights = [i for i, n in enumerate(graph.nodes) if n.primitive in WEIGHT_PRIMITIVES and i != cls_w]
    ortho_start = None if options.orthogonal_from is None else options.orthogonal_from * len(weights)
    # the normalised weights are what rescaling touches, and all orthogonalisation may touch
    # when normalised_only; computed only when one of the two needs them
    normalised = normalised_weights(graph) if options.normalised_only or options.rescale else set()
    ortho_set = normalised if options.normalised_only else set(weights)
    noised_tensors = noised_rows = orthogonalised = rescaled = perturbed = 0
    for depth, i in enumerate(weights):
        for ref in graph.nodes[i].params:
            value = out.get(ref.tensor)
            if value is None or value.ndim < 2:
                continue
            if ortho_start is not None and depth >= ortho_start and i in ortho_set:
                value = nearest_orthogonal(value)
                orthogonalised += 1
            if options.rescale and i in normalised and ref.role == "weight":
                factor = _init_norm_factor(graph, i, ref, value)
                if factor is not None:
                    value = value * value.dtype.type(factor)
                    rescaled += 1
                    bias = _bias_after(graph, i)
                    if bias is not None and bias.tensor in out:
                        out[bias.tensor] = out[bias.tensor] * out[bias.tensor].dtype.type(factor)
            if options.perturb > 0 and ref.role == "weight":
                init = reference_init(graph, i, ref)
                norm = float(np.linalg.norm(value))
                if init.rms is not None and norm > 0:
                    rng = np.random.default_rng([options.seed, zlib.crc32(ref.tensor.encode()), 1])
                    fresh = sample_init(init, value.shape, rng)
                    fresh *= norm / max(float(np.linalg.norm(fresh)), np.finfo(np.float64).tiny)
                    value = ((1 - options.perturb) * value + options.perturb * fresh).astype(value.dtype)
                    perturbed += 1
            rows = repeated_rows(value) if options.noise > 0 else np.empty(0, dtype=np.int64)
            if len(rows):
                rng = np.random.default_rng([options.seed, zlib.crc32(ref.tensor.encode())])
                value = value.copy() if value is predictions.get(ref.tensor) else value
                scale = options.noise * float(value.std())
                noise = rng.standard_normal((len(rows), *value.shape[1:]), dtype=np.float32)
                value[rows] += noise.astype(value.dtype) * scale
                noised_tensors += 1
                noised_rows += len(rows)
            out[ref.tensor] = value
    return out, ForTrainingReport(options, noised_tensors, noised_rows, orthogonalised, rescaled, perturbed)


def _init_norm_factor(graph: Graph, index: int, ref: ParamRef, value: np.ndarray) -> float | None:
    """What scales ``value`` to its default init's expected Frobenius norm; None for a zero tensor."""
    init = reference_init(graph, index, ref)
    norm = float(np.linalg.norm(value.astype(np.float64)))
    if init.rms is None or not norm > 0 or not np.isfinite(norm):
        return None
    return init.rms * float(np.sqrt(value.size)) / norm


def _bias_after(graph: Graph, index: int) -> ParamRef | None:
    """The bias of the layer whose weight is node ``index`` (a layer's bias node follows its
    weight node and reads it, :mod:`ghn_onnx.convert.rules`)."""
    nxt = index + 1
    if nxt >= len(graph.nodes) or graph.nodes[nxt].primitive is not Primitive.BIAS or not graph.nodes[nxt].params:
        return None
    if not np.any((graph.edges[:, 0] == index) & (graph.edges[:, 1] == nxt)):
        return None
    return graph.nodes[nxt].params[0]
