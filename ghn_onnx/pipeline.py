"""ONNX in, ONNX with predicted parameters out: the product's main entry point.

:func:`predict_models` converts each model to a GHN graph, runs the GHN once over the batch of
graphs, writes the predictions back in each tensor's stored layout and dtype, and applies the
:class:`PredictOptions` (BN calibration, BN unfolding). :func:`predict` does it for one model,
:func:`predict_files` file to file. ``ghn-onnx predict`` builds a :class:`PredictOptions` from
its flags and calls :func:`predict_files`; the package root re-exports this API::

    >>> from ghn_onnx.pipeline import PredictOptions, load_ghn, predict
    >>> ghn = load_ghn()  # the checkpoint shipped with the package
    >>> result = predict("tests/fixtures/frameworks/torch_cnn.onnx", ghn, PredictOptions(seed=1))
    >>> result.name, len(result.graph), result.bn_status, result.warnings
    ('torch_cnn.onnx', 16, 'uncalibrated', [])

Tied tensors: PyTorch exporters alias parameters whose values happen to be equal (every BN scale
of a fresh network reads one all-ones tensor through ``Identity`` nodes); these are untied first,
so each parameter gets its own prediction. Parameters genuinely shared by several layers are
predicted once, from the first layer in topological order.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch

from ghn_onnx.bn.calibration import CalibrationSet, calibrate_bn, calibration_set, calibration_targets
from ghn_onnx.bn.modes import CALIBRATION_MODES
from ghn_onnx.convert import convert
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn import checkpoint, registry
from ghn_onnx.ghn.decode.rules import classifier_head
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive
from ghn_onnx.onnx_io.loading import load_model, open_model, read_model
from ghn_onnx.onnx_io.storage import untie_aliases
from ghn_onnx.writeback.for_training import ForTraining, for_training
from ghn_onnx.writeback.unfold import fold_back, folded_convs, is_virtual, unfolded_graph, with_explicit_bn
from ghn_onnx.writeback.write import (PredictedModel, predicted_model, resolve_shared, save_model, save_predicted,
                                      write_predictions)

# Graphs decoded together in one GHN call; bounds memory when predicting many files.
MAX_NODES_PER_CALL = 20_000
NO_BN_TO_CALIBRATE = "calibration skipped: no BatchNormalization with stored running statistics to calibrate"
UNCALIBRATED_UNFOLD_WARNING = ("BN unfolded without calibration images: the unfolded BNs' statistics are "
                               "mean 0, var 1; pass calibration images (--calibrate IMAGES) to measure them")


# Old PredictOptions names still taken (with a DeprecationWarning), and what they are now.
RENAMED_OPTIONS = {"batch_size": "calibration_batch"}


@dataclass(frozen=True)
class PredictOptions:
    """How to predict; ``ghn-onnx predict``'s flags, as one value.

    Attributes:
        calibrate: calibration images (folder, ``.zip``, ``.npy`` / ``.npz``; see
            :func:`~ghn_onnx.bn.images.load_calibration_data`): measure BN running statistics on
            them after prediction. ``None``: statistics stay as stored (BN status ``uncalibrated``).
        calibration_images: how many images to draw, at random, from the training images of
            ``calibrate`` (``train/`` of a folder or zip that has splits).
        calibration_batch: calibration batch size (a model with a fixed batch size is calibrated at
            its own). Its old name ``batch_size`` is still taken, with a DeprecationWarning.
        calibration_mode: how BN statistics are measured (:data:`~ghn_onnx.bn.modes.CALIBRATION_MODES`;
            see :func:`~ghn_onnx.bn.calibration.calibrate_bn`).
        seed: seed of the calibration subset.
        mean, std: per-channel normalisation of calibration images, ``(x / 255 - mean) / std``
            (one value or one per channel). ``None``: CIFAR-10's.
        no_normalize: feed calibration images as pixel values ``0..255`` (models with their own
            rescaling / normalisation layers); excludes ``mean`` and ``std``.
        unfold_bn: predict BN-folded exports as their BN-kept originals (:func:`predict_unfolded`).
        device: where the GHN runs. ``None``: CPU when the GHN is loaded here, else where the GHN
            given is; a GHN given on another device is an error.
        metadata: extra ``ghn_onnx.*`` metadata written into each output (string values).
        reference: the sequential reference propagation (benchmarks and tests).
        for_training: post-process the predictions for fine-tuning (noise on tiled rows,
            orthogonalisation and rescaling of normalised weights;
            :mod:`ghn_onnx.writeback.for_training`), recorded in the output's
            ``ghn_onnx.for_training`` metadata. ``True`` means ``ForTraining()``; ``None``: as predicted.
        reserialize: :func:`predict_files` writes each output by serialising the whole model, not
            by splicing the predicted values into its serialised skeleton
            (:func:`~ghn_onnx.writeback.write.save_predicted`); the same file, slower (benchmarks
            and tests).
    """

    calibrate: str | os.PathLike | None = None
    calibration_images: int = 512
    calibration_batch: int = 64
    seed: int = 0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    no_normalize: bool = False
    unfold_bn: bool = False
    calibration_mode: str = CALIBRATION_MODES[0]
    device: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    reference: bool = False
    for_training: ForTraining | None = None
    reserialize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "metadata", types.MappingProxyType(dict(self.metadata)))
        if self.calibration_mode not in CALIBRATION_MODES:
            raise GhnOnnxError(f"calibration_mode: expected one of {', '.join(CALIBRATION_MODES)} "
                               f"(got {self.calibration_mode!r})")
        if isinstance(self.for_training, bool):
            object.__setattr__(self, "for_training", ForTraining() if self.for_training else None)
        elif self.for_training is not None and not isinstance(self.for_training, ForTraining):
            raise GhnOnnxError(f"for_training: expected a ForTraining, True or None (got {self.for_training!r})")
        for name in ("mean", "std"):  # tuples: hashable, like the rest of the options
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in np.atleast_1d(value)))
        if self.no_normalize and (self.mean is not None or self.std is not None):
            raise GhnOnnxError("no_normalize feeds raw pixel values: give it without mean and std")

    def calibration_set(self, model: onnx.ModelProto) -> CalibrationSet:
        """The calibration batches these options give for ``model`` (:func:`calibration_set`)."""
        return calibration_set(model, self.calibrate, self.calibration_images, self.calibration_batch, self.seed,
                               mean=self.mean, std=self.std, no_normalize=self.no_normalize)


@dataclass
class Prediction:
    """One predicted model and what a user should know about it.

    Attributes:
        name: the model's name (the file name for a file).
        model: the model with its predicted parameters (and calibrated BN statistics, if asked);
            ``None`` from ``predict_files(..., return_models=False)``.
        graph: the GHN graph the prediction was made on (the unfolded graph with ``unfold_bn``).
        predicted_tensors, predicted_elements: what was predicted.
        bn_status: ``none`` (no BN), ``uncalibrated``, ``calibrated:<images>``, ``folded`` (BN
            folded into convs, predicted as a BN-free network), ``unfolded:calibrated`` or
            ``unfolded:uncalibrated``. Also written as ``ghn_onnx.bn`` metadata.
        warnings: how the graph was read, and what to do about it.
        output: where it was written (:func:`predict_files`), else ``None``.
        seconds: wall time for this model (:func:`predict_files`).
    """

    name: str
    model: onnx.ModelProto | None
    graph: Graph
    predicted_tensors: int
    predicted_elements: int
    bn_status: str
    warnings: list[str] = field(default_factory=list)
    output: str | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        """What ``ghn-onnx predict --json`` prints for this model (plain JSON types)."""
        return {
            "name": self.name,
            "output": self.output,
            "nodes": len(self.graph),
            "predicted_tensors": self.predicted_tensors,
            "predicted_elements": self.predicted_elements,
            "bn": self.bn_status,
            "warnings": list(self.warnings),
            "seconds": round(self.seconds, 4),
        }


# -- the GHN -------------------------------------------------------------------------------------

def resolve_checkpoint(name_or_path: str | os.PathLike | None = None) -> Path:
    """The checkpoint file: the shipped one for ``None``, a named one from the cache (downloaded
    and converted on first use, :func:`~ghn_onnx.ghn.registry.resolve`), else the path itself."""
    return registry.resolve(name_or_path, log=_stderr)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def load_ghn(name_or_path: str | os.PathLike | None = None, device: str = "cpu") -> GHN:
    """A GHN from a checkpoint, ready to predict.

    Args:
        name_or_path: ``None`` for the checkpoint shipped with the package, a name from
            ``ghn-onnx checkpoints`` (:data:`~ghn_onnx.ghn.registry.REGISTRY`: fetched into the
            cache on first use unless ``GHN_ONNX_OFFLINE=1``), or a ``.safetensors`` file
            (``ghn-onnx train`` / ``convert-checkpoint``).
        device: ``"cpu"`` or ``"cuda"``.

    Raises:
        CheckpointError: no such file or name, not a ghn-onnx checkpoint, keys or shapes that
            do not match its configuration; a name not cached while offline, or whose download
            fails or does not check out. GhnOnnxError: no CUDA device for ``device="cuda"``.

    >>> load_ghn().config.hid
    32
    """
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise GhnOnnxError(f"device {device!r}: no CUDA device is available")
    return checkpoint.load(resolve_checkpoint(name_or_path), device=device)


def _ghn_and_metadata(ghn: GHN | None, options: PredictOptions) -> tuple[GHN, dict[str, str]]:
    """The GHN to run (the shipped one, stamped with its sha256, for ``None``) and the metadata."""
    metadata = dict(options.metadata)
    if ghn is None:
        path = resolve_checkpoint(None)
        ghn = load_ghn(path, options.device or "cpu")
        metadata.setdefault("checkpoint_sha256", checkpoint.file_sha256(path))
    elif options.device is not None:
        want, have = torch.device(options.device), ghn.embed.weight.device
        if want.type != have.type or (want.index is not None and want.index != have.index):
            raise GhnOnnxError(f"Expected the GHN on {want} (got {have}): load it with "
                               f"load_ghn(..., device={options.device!r}) or leave device unset")
    return ghn, metadata


def renamed_options(options: Mapping[str, object], caller: str) -> dict:
    """``options`` with old option names (:data:`RENAMED_OPTIONS`) replaced by their new ones,
    each with a DeprecationWarning; both spellings at once is a TypeError."""
    out = dict(options)
    for old, new in RENAMED_OPTIONS.items():
        if old in out:
            if new in out:
                raise TypeError(f"{caller}: give {new} only ({old} is its old name)")
            warnings.warn(f"{caller}: the option {old} is now {new}", DeprecationWarning, stacklevel=3)
            out[new] = out.pop(old)
    return out


def _options(options: PredictOptions | None, overrides: dict) -> PredictOptions:
    overrides = renamed_options(overrides, "predict")
    known = {f.name for f in dataclasses.fields(PredictOptions)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
    return dataclasses.replace(options or PredictOptions(), **overrides)


# -- prediction ----------------------------------------------------------------------------------

def prepare(model: onnx.ModelProto, name: str, rules: str = "ghn2", validated: bool = False
            ) -> tuple[onnx.ModelProto, Graph]:
    """Untie exporter aliases and convert with the rule set ``rules`` (the GHN configuration's):
    the model the predictions are written into, and its graph. ``validated``: ``model`` comes
    from :func:`~ghn_onnx.onnx_io.loading.load_model`, which validated it (untying adds only
    copies of its initializers under new names), so conversion need not walk it again."""
    model, _ = untie_aliases(model)
    return model, convert(model, name=name, rules=rules, validated=validated)


def bn_status(graph: Graph) -> str:
    if graph.info.get("bn_folded"):
        return "folded"
    if any(n.primitive is Primitive.BN for n in graph.nodes):
        return "uncalibrated"  # running statistics untouched: evaluate with batch statistics or calibrate
    return "none"


@torch.no_grad()
def predict_graphs(ghn: GHN, graphs: Sequence[Graph], reference: bool = False) -> list[dict[str, np.ndarray]]:
    """Run the GHN over ``graphs`` in as few calls as memory allows; canonical fp32 arrays.
    ``reference`` uses the sequential reference propagation (for benchmarks and tests)."""
    out: list[dict[str, np.ndarray]] = []
    start = 0
    while start < len(graphs):
        end, nodes = start, 0
        while end < len(graphs) and (end == start or nodes + len(graphs[end]) <= MAX_NODES_PER_CALL):
            nodes += len(graphs[end])
            end += 1
        out.extend(host_arrays(ghn(list(graphs[start:end]), sequential=reference)))
        start = end
    return out


def host_arrays(predictions: Sequence[Mapping[str, torch.Tensor]], *, batched: bool | None = None
                ) -> list[dict[str, np.ndarray]]:
    """Every predicted tensor as a numpy array. On the CPU they are the tensors' own memory; on a
    GPU (or ``batched``) they go back in one copy, into pinned memory where CUDA has it: one
    synchronisation for the whole batch instead of one per tensor (a ResNet-50: 161)."""
    tensors = [v.detach() for params in predictions for v in params.values()]
    if not tensors:
        return [{} for _ in predictions]
    if batched is None:
        batched = tensors[0].device.type != "cpu"
    if not batched or len({t.dtype for t in tensors}) > 1:
        return [{k: v.detach().cpu().numpy() for k, v in params.items()} for params in predictions]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda)
    host.copy_(flat, non_blocking=flat.is_cuda)
    if flat.is_cuda:
        torch.cuda.current_stream(flat.device).synchronize()
    values = host.numpy()  # the arrays below are views of it, and keep it alive
    out, at = [], 0
    for params in predictions:
        arrays = {}
        for k, v in params.items():
            arrays[k] = values[at:at + v.numel()].reshape(v.shape)
            at += v.numel()
        out.append(arrays)
    return out


def predict_unfolded(model: onnx.ModelProto, graph: Graph, ghn: GHN, batches: Iterable[np.ndarray] | None = None,
                     metadata: Mapping[str, str] | None = None, reference: bool = False,
                     post: ForTraining | None = None, mode: str = CALIBRATION_MODES[0]) -> Prediction:
    """Predict a BN-folded ``model`` as its BN-kept original (:mod:`ghn_onnx.writeback.unfold`):
    the GHN predicts the unfolded graph, each unfolded BN is made explicit, calibrated on
    ``batches`` and folded back into its conv. ``graph`` must come from :func:`prepare`. Without
    ``batches`` the statistics stay ``μ = 0, σ² = 1`` (and the prediction warns). ``post``, ``mode``: as
    :attr:`PredictOptions.for_training` and :attr:`PredictOptions.calibration_mode`."""
    folds = folded_convs(model, graph)
    if not folds:
        raise GhnOnnxError(f"{graph.name}: --unfold-bn: no folded BatchNorm found (no exporter marks, "
                           "no folding evidence)")
    ugraph = unfolded_graph(graph, folds)
    pred = predict_graphs(ghn, [ugraph], reference)[0]
    virtual = {k for f in folds for k in (f.scale_key, f.shift_key)}
    owners = resolve_shared(ugraph)
    real = {k: v for k, v in pred.items() if k not in virtual and k in owners}
    status = "unfolded:calibrated" if batches is not None else "unfolded:uncalibrated"
    real, metadata = _post_process(ugraph, real, post, metadata or {})
    predicted = write_predictions(model, ugraph, real, metadata={**metadata, "bn": status})
    explicit = with_explicit_bn(predicted, folds, pred)
    if batches is not None:
        explicit = calibrate_bn(explicit, batches, mode=mode)
    refs = [p for node in ugraph.nodes for p in node.params if not is_virtual(p)]
    warnings = list(ugraph.warnings) + ([] if batches is not None else [UNCALIBRATED_UNFOLD_WARNING])
    return Prediction(name=graph.name, model=fold_back(predicted, explicit, folds), graph=ugraph,
                      predicted_tensors=len(refs), predicted_elements=int(sum(p.numel for p in refs)),
                      bn_status=status, warnings=warnings)


def _predict_batch(models: Sequence[onnx.ModelProto], ghn: GHN, names: Sequence[str], options: PredictOptions,
                   metadata: Mapping[str, str]) -> list[Prediction]:
    """Every model predicted, BN statistics not calibrated yet (see :func:`_calibrate`)."""
    prepared = [prepare(m, n, ghn.config.rules) for m, n in zip(models, names)]
    results = _predict_prepared(prepared, ghn, names, options, metadata)
    for _, held in results:
        if held is not None:
            held.fill()  # the prediction's model is held.model
    return [pred for pred, _ in results]


def _predict_prepared(prepared: Sequence[tuple[onnx.ModelProto, Graph]], ghn: GHN, names: Sequence[str],
                      options: PredictOptions, metadata: Mapping[str, str]
                      ) -> list[tuple[Prediction, PredictedModel | None]]:
    """:func:`_predict_batch` for models already through :func:`prepare`, the predicted values
    held aside where the model is written with them as they are (``pred.model`` is
    ``held.model``, complete once ``held.fill()`` ran); None for unfolded models."""
    folded = [options.unfold_bn and is_bn_folded(m, g) for m, g in prepared]
    params = iter(predict_graphs(ghn, [g for (_, g), f in zip(prepared, folded) if not f], options.reference))
    results = []
    for (model, graph), name, fold in zip(prepared, names, folded):
        metadata_of = {**metadata, **_classifier_rule(graph, ghn)}
        if fold:
            data = options.calibration_set(model) if options.calibrate is not None else None
            pred = predict_unfolded(model, graph, ghn, data and data.batches, metadata_of, options.reference,
                                    options.for_training, options.calibration_mode)
            notes = data.notes if data else []
            results.append((dataclasses.replace(pred, name=name, warnings=pred.warnings + notes), None))
            continue
        pred = next(params)
        status = bn_status(graph)
        owners = resolve_shared(graph)
        pred = {k: v for k, v in pred.items() if k in owners}
        pred, metadata_of = _post_process(graph, pred, options.for_training, metadata_of)
        held = predicted_model(model, graph, pred, metadata={**metadata_of, "bn": status})
        results.append((Prediction(
            name=name, model=held.model, graph=graph, predicted_tensors=len(pred),
            predicted_elements=int(sum(v.size for v in pred.values())), bn_status=status,
            warnings=list(graph.warnings),
        ), held))
    return results


def _post_process(graph: Graph, pred: dict[str, np.ndarray], post: ForTraining | None,
                  metadata: Mapping[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if post is None:
        return pred, dict(metadata)
    pred, report = for_training(graph, pred, post)
    return pred, {**metadata, **report.metadata()}


def _classifier_rule(graph: Graph, ghn: GHN) -> dict[str, str]:
    """How ``ghn`` fills a classifier whose size is not its class count
    (:class:`~ghn_onnx.ghn.decode.rules.ClassifierHead`): a warning on the graph (once), and the
    output's ``ghn_onnx.classifier`` metadata."""
    head = classifier_head(graph, ghn.config.num_classes)
    note = head and head.note()
    if note is None:
        return {}
    if note not in graph.warnings:
        graph.warnings.append(note)
    return head.metadata()


def _calibrate(pred: Prediction, options: PredictOptions) -> None:
    """Calibrate ``pred``'s BN statistics in place when ``options`` asks for it (unfolded models
    were calibrated before folding back). A model with no BatchNormalization statistics to
    calibrate keeps its BN status, with a warning, and no images are read."""
    if options.calibrate is None or pred.bn_status.startswith("unfolded"):
        return
    if not calibration_targets(pred.model, pred.graph):
        pred.warnings.append(f"{NO_BN_TO_CALIBRATE} (BN status stays {pred.bn_status})")
        return
    data = options.calibration_set(pred.model)
    pred.model = calibrate_bn(pred.model, data.batches, graph=pred.graph, mode=options.calibration_mode)
    pred.bn_status = f"calibrated:{data.images}"
    pred.warnings.extend(data.notes)
    _set_bn_metadata(pred.model, pred.bn_status)


def is_bn_folded(model: onnx.ModelProto, graph: Graph) -> bool:
    return bool(folded_convs(model, graph))


def predict_models(models: Sequence[onnx.ModelProto], ghn: GHN | None = None, names: Sequence[str] | None = None,
                   options: PredictOptions | None = None, **overrides) -> list[Prediction]:
    """Predict the parameters of several models with one batched GHN pass (the models are not
    modified). ``ghn=None`` loads the shipped checkpoint; ``options`` (or its fields as keyword
    arguments) as :class:`PredictOptions`."""
    options = _options(options, overrides)
    ghn, metadata = _ghn_and_metadata(ghn, options)
    names = list(names or [f"model_{i}" for i in range(len(models))])
    preds = _predict_batch(models, ghn, names, options, metadata)
    for pred in preds:
        _calibrate(pred, options)
    return preds


def predict(model: onnx.ModelProto | str | os.PathLike, ghn: GHN | None = None, options: PredictOptions | None = None,
            *, name: str | None = None, **overrides) -> Prediction:
    """Predict every supported parameter of one model; nothing is written to disk.

    Args:
        model: an ``onnx.ModelProto`` (not modified) or the path of an ONNX file.
        ghn: from :func:`load_ghn`; ``None`` loads the shipped checkpoint (and stamps its sha256).
        options: a :class:`PredictOptions`; keyword arguments override its fields
            (``predict(m, calibrate="images.zip", calibration_images=64)``).
        name: the name in reports (default: the file name, or ``"model"``).

    Returns:
        a :class:`Prediction`: the predicted ``onnx.ModelProto`` (``.model``), the graph,
        counts, BN status and warnings.

    Raises:
        GhnOnnxError: the model cannot be read or served, bad calibration data, bad checkpoint.

    >>> p = predict("tests/fixtures/frameworks/torch_cnn.onnx")
    >>> p.bn_status, p.predicted_tensors, p.model.graph.name == onnx.load(
    ...     "tests/fixtures/frameworks/torch_cnn.onnx").graph.name
    ('uncalibrated', 14, True)
    """
    if not isinstance(model, onnx.ModelProto):
        name = name or Path(model).name
        options = _options(options, overrides)
        if options.calibrate is None and not options.unfold_bn:  # as predict_files: see there
            model, _, source = open_model(model)
            pred = predict_models([model], ghn, [name], options)[0]
            if source is not None:
                source.fill(pred.model)  # the deferred tensors the GHN does not predict
            return pred
        return predict_models([load_model(model)], ghn, [name], options)[0]
    return predict_models([model], ghn, [name or "model"], options, **overrides)[0]


def predict_files(inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], ghn: GHN | None = None,
                  options: PredictOptions | None = None, *,
                  progress: Callable[[Iterable], Iterable] = lambda it: it,
                  on_error: Callable[[str | os.PathLike, GhnOnnxError], None] | None = None,
                  return_models: bool = True, **overrides) -> list[Prediction]:
    """File to file: all ``inputs`` through the GHN in one batch, each prediction calibrated
    (if asked) and written to its output. Inputs are only read; each output is written
    atomically (temp + rename), with external data when it needs it.

    Args:
        inputs, outputs: one output path per input, all different.
        ghn, options, overrides: as for :func:`predict`.
        progress: wraps the per-file loop (calibration and writing), e.g. ``tqdm``.
        on_error: called as ``on_error(input, error)`` for each input that cannot be read,
            converted, calibrated or written; that input is left out (its output is not written)
            and the others go on (``ghn-onnx predict -O``). ``None``: the first such error is
            raised.
        return_models: ``False``: the predictions' ``model`` is ``None``; where the file was
            written without re-serialising, the predicted values then never go into a ModelProto
            (which copies each tensor twice). ``ghn-onnx predict``, which writes files only.

    Returns:
        one :class:`Prediction` per input (per input that succeeded, with ``on_error``), with
        ``output`` and ``seconds`` set.

    >>> [p.output for p in predict_files(["tests/fixtures/frameworks/torch_cnn.onnx"], ["torch_cnn_ghn.onnx"])]
    ['torch_cnn_ghn.onnx']
    """
    options = _options(options, overrides)
    if len(inputs) != len(outputs):
        raise GhnOnnxError(f"expected one output per input (got {len(inputs)} inputs, {len(outputs)} outputs)")
    resolved = [Path(o).resolve() for o in outputs]
    if len(set(resolved)) != len(resolved):
        raise GhnOnnxError("two inputs would be written to the same output file")
    ghn, metadata = _ghn_and_metadata(ghn, options)
    t0 = time.perf_counter()
    # Calibration and unfolding read the model's own values; a plain prediction overwrites most
    # large tensors, so those are left in the file until written (ghn_onnx.onnx_io.deferred).
    defer = options.calibrate is None and not options.unfold_bn
    loaded = []
    for src, dst in zip(inputs, outputs):  # every file is read before any is converted, as one batch
        try:
            loaded.append((src, dst, *(open_model(src) if defer else (*read_model(src), None))))
        except GhnOnnxError as exc:
            if on_error is None:
                raise
            on_error(src, exc)
    jobs, prepared = [], []
    for src, dst, model, data_files, source in loaded:
        try:
            prepared.append(prepare(model, Path(src).name, ghn.config.rules, validated=True))
            jobs.append((src, dst, data_files, source))
        except GhnOnnxError as exc:
            if on_error is None:
                raise
            on_error(src, exc)
    del loaded
    preds = _predict_prepared(prepared, ghn, [Path(src).name for src, *_ in jobs], options, metadata)
    share = (time.perf_counter() - t0) / max(len(preds), 1)
    written = []
    for (pred, held), (src, dst, data_files, source) in progress(list(zip(preds, jobs))):
        t1 = time.perf_counter()
        try:
            if source is not None:
                source.fill(pred.model)  # the deferred tensors the GHN does not predict
            if held is not None and options.calibrate is None:  # written without re-serialising
                save_predicted(held, dst, source_path=src, source_data_files=data_files,
                               reserialize=options.reserialize, fill=return_models)
            else:
                if held is not None:
                    held.fill()
                _calibrate(pred, options)
                save_model(pred.model, dst, source_path=src, source_data_files=data_files)
        except GhnOnnxError as exc:
            if on_error is None:
                raise
            on_error(src, exc)
            continue
        pred.output = str(dst)
        pred.seconds = share + time.perf_counter() - t1
        if not return_models:
            pred.model = None
        written.append(pred)
    return written


def _set_bn_metadata(model: onnx.ModelProto, status: str) -> None:
    for prop in model.metadata_props:
        if prop.key == "ghn_onnx.bn":
            prop.value = status
            return
    model.metadata_props.add(key="ghn_onnx.bn", value=status)
