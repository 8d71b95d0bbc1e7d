"""Back into PyTorch in one call: :func:`init_` predicts a module's parameters with a GHN and
copies them into the module, in place, like ``torch.nn.init.*_``::

    >>> import torch, torchvision, ghn_onnx.torch
    >>> net = torchvision.models.resnet18(num_classes=10)
    >>> report = ghn_onnx.torch.init_(net, torch.randn(2, 3, 32, 32))
    >>> len(report.predicted), report.kept
    (62, {})

The module is exported to ONNX the way the GHN reads it (TorchScript exporter, eval mode, BN
kept, no constant folding, opset 17), predicted with :func:`ghn_onnx.pipeline.predict`, and each
predicted tensor is copied back into the parameter it was exported from (:func:`match_parameters`),
cast to the parameter's dtype on the parameter's device. Calibration data, when given, also sets
the BN running statistics, measured on the predicted ONNX model (:mod:`ghn_onnx.bn`). The module
keeps its device, dtype and train/eval mode; only a copy is exported. :func:`calibrate_` sets
the BN statistics alone, the same way (a fair baseline: the module's own init, calibrated).

No silent misses: a predicted tensor that cannot be matched to one parameter is an error, and the
:class:`Report` says, for every parameter not predicted, why it kept its own initialisation.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ghn_onnx.bn.calibration import calibrate_bn, calibration_targets, iter_batches
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.onnx_io.storage import alias_source, is_batch_norm, stored_tensors, untie_aliases
from ghn_onnx.pipeline import (NO_BN_TO_CALIBRATE, Prediction, PredictOptions, _calibrate, _set_bn_metadata,
                               bn_status, load_ghn, predict, prepare)
from ghn_onnx.writeback.write import resolve_shared

OPSET = 17
# PredictOptions fields that make no sense here: init_ exports with BN kept, calibrate is an argument.
NOT_OPTIONS = frozenset({"unfold_bn", "calibrate"})

CalibrationData = str | os.PathLike | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Match:
    """Where one predicted ONNX tensor goes in the module.

    Attributes:
        tensor: the ONNX initializer the prediction was written to.
        parameter: its ``module.named_parameters()`` name.
        transposed: the initializer stores the parameter transposed (a 2-D weight a MatMul reads
            as ``(in, out)``): the value is transposed back on copy.
    """

    tensor: str
    parameter: str
    transposed: bool = False


@dataclass
class Report:
    """What :func:`init_` did to the module.

    Attributes:
        predicted: parameter name → the :class:`Match` it was copied from, in GHN graph order.
        kept: parameter name → why it kept its own initialisation (for every parameter not in
            ``predicted``; tied names of one parameter appear under their first name only).
        statistics: BN buffer names set from calibration (``running_mean`` / ``running_var``).
        bn_status: as :attr:`Prediction.bn_status` (``none``, ``uncalibrated``, ``calibrated:<images>``...).
        warnings: the prediction's warnings (how the graph was read, calibration notes).
        prediction: the predicted ONNX model and its graph (:class:`~ghn_onnx.pipeline.Prediction`).
    """

    predicted: dict[str, Match]
    kept: dict[str, str]
    statistics: list[str]
    bn_status: str
    warnings: list[str] = field(default_factory=list)
    prediction: Prediction | None = field(default=None, repr=False)

    def format(self) -> str:
        """A few lines for people: counts, BN status, every kept parameter with its reason."""
        total = len(self.predicted) + len(self.kept)
        lines = [f"predicted {len(self.predicted)} of {total} parameters; BN {self.bn_status}"
                 + (f" ({len(self.statistics)} statistics buffers set)" if self.statistics else "")]
        lines += [f"kept its own init: {name}: {why}" for name, why in self.kept.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def init_(module: torch.nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], *,
          checkpoint: str | os.PathLike | GHN | None = None, calibrate: CalibrationData | None = None,
          **predict_options) -> Report:
    """Predict ``module``'s parameters with a GHN and copy them into it, in place.

    Args:
        module: any ``nn.Module`` the TorchScript exporter can trace (not put in eval mode; its
            device and dtypes are kept).
        example_input: a tensor, or a tuple of tensors, that ``module`` takes (small is fine:
            only shapes matter; the batch dimension is exported as dynamic).
        checkpoint: a loaded :class:`~ghn_onnx.ghn.model.GHN`, a checkpoint path or shipped name
            (:func:`~ghn_onnx.pipeline.load_ghn`), or ``None`` for the shipped checkpoint.
        calibrate: calibration data for the BN running statistics: images (folder, ``.zip``,
            ``.npy`` / ``.npz``, as ``PredictOptions.calibrate``; normalised with ``mean`` /
            ``std``), or an array / tensor of model inputs ``(N, ...)`` taken as they are.
            ``None``: BN statistics keep the module's own values.
        predict_options: :class:`~ghn_onnx.pipeline.PredictOptions` fields (``calibration_images``,
            ``batch_size``, ``seed``, ``mean``, ``std``, ``no_normalize``, ``device``, ``metadata``).

    Returns:
        a :class:`Report`: every parameter predicted, every one kept and why, the BN statistics set.

    Raises:
        GhnOnnxError: the module cannot be exported or predicted, bad calibration data, or a
            predicted tensor that matches no parameter (nothing is copied then).
        TypeError: an unknown option, or ``unfold_bn`` / ``calibrate`` given as an option.
    """
    _check_options("init_", predict_options)  # before the export, which takes seconds
    exported = export(module, example_input)
    ghn = checkpoint if isinstance(checkpoint, GHN) or checkpoint is None else load_ghn(
        checkpoint, predict_options.get("device") or "cpu")
    by_path = calibrate if isinstance(calibrate, (str, os.PathLike)) else None
    pred = predict(exported, ghn, name=type(module).__name__, calibrate=by_path, **predict_options)
    if calibrate is not None and by_path is None:
        _calibrate_on_inputs(pred, calibrate, predict_options.get("batch_size", PredictOptions.batch_size))
    return copy_prediction(module, pred, exported)


def calibrate_(module: torch.nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
               data: CalibrationData, **options) -> list[str]:
    """Set ``module``'s BN running statistics as ``init_(..., calibrate=data)`` sets them, in
    place, without predicting anything: measured on its ONNX export by :mod:`ghn_onnx.bn`, then
    copied into the BN buffers. The parameters are not touched. A module's own initialisation
    calibrated this way is the fair baseline for an ``init_`` one.

    Args:
        module, example_input, data, options: as :func:`init_` (``data`` is its ``calibrate``;
            ``options`` its calibration fields: ``calibration_images``, ``batch_size``, ``seed``,
            ``mean``, ``std``, ``no_normalize``).

    Returns:
        the BN buffer names set (``running_mean`` / ``running_var``); empty for a module without BN.

    Raises:
        GhnOnnxError: the module cannot be exported, bad calibration data.
        TypeError: an unknown option.
    """
    _check_options("calibrate_", options)
    exported = export(module, example_input)
    model, graph = prepare(exported, type(module).__name__)
    pred = Prediction(name=type(module).__name__, model=model, graph=graph, predicted_tensors=0,
                      predicted_elements=0, bn_status=bn_status(graph))
    if isinstance(data, (str, os.PathLike)):
        _calibrate(pred, PredictOptions(calibrate=data, **options))
    else:
        _calibrate_on_inputs(pred, data, options.get("batch_size", PredictOptions.batch_size))
    if not pred.bn_status.startswith("calibrated"):
        return []
    statistics = _statistics(pred, exported, module)
    buffers = dict(module.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in statistics.items():
            _copy(buffers[name], value, name)
    return list(statistics)


def _check_options(caller: str, options: Mapping[str, object]) -> None:
    bad = sorted(NOT_OPTIONS & set(options))
    if bad:
        raise TypeError(f"{caller} does not take {', '.join(bad)} as an option (it exports with BN kept; pass "
                        "calibration data as an argument)")
    known = {f.name for f in dataclasses.fields(PredictOptions)} - NOT_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")


def copy_prediction(module: torch.nn.Module, prediction: Prediction, exported: onnx.ModelProto) -> Report:
    """Copy ``prediction`` (of ``exported``, an ONNX export of ``module``) into ``module``, in
    place: the second half of :func:`init_`, for a module exported some other way (constant
    folding on, another opset). Every predicted tensor is matched first (:func:`match_parameters`);
    nothing is copied if one does not match. BN running statistics are copied when the
    prediction was calibrated.

    Raises:
        GhnOnnxError: a predicted tensor without its parameter, calibrated statistics without
            their buffer, an ``unfold_bn`` prediction (its tensors are folded: no parameter holds them).
    """
    if prediction.bn_status.startswith("unfolded"):
        raise GhnOnnxError("an unfold_bn prediction holds BN-folded weights: the module's parameters cannot take them")
    matches = match_parameters(untie_aliases(exported)[0], module, list(resolve_shared(prediction.graph)))
    values = stored_tensors(prediction.model)
    params = dict(module.named_parameters(remove_duplicate=False))
    statistics = _statistics(prediction, exported, module) if prediction.bn_status.startswith("calibrated") else {}
    with torch.no_grad():
        for m in matches:
            value = numpy_helper.to_array(values[m.tensor])
            _copy(params[m.parameter], value.T if m.transposed else value, m.parameter)
        buffers = dict(module.named_buffers(remove_duplicate=False))
        for name, value in statistics.items():
            _copy(buffers[name], value, name)
    predicted = {m.parameter: m for m in matches}
    return Report(predicted=predicted, kept=_kept(module, predicted, prediction.model), statistics=list(statistics),
                  bn_status=prediction.bn_status, warnings=list(prediction.warnings), prediction=prediction)


def export(module: torch.nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor]) -> onnx.ModelProto:
    """``module`` as the GHN reads it: a float32 CPU copy in eval mode through the TorchScript
    exporter, BN kept, no constant folding, opset 17, inputs ``input`` (or ``input_0``, ...)
    with a dynamic batch dimension. Initializer names are the parameter names; equal tensors
    merged by the exporter come back as ``Identity`` aliases named after their parameters. A
    LayerNorm built without a bias reads no bias (:func:`drop_constant_norm_biases`)."""
    args = (example_input,) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise GhnOnnxError(f"Expected example_input as a tensor or a tuple of tensors (got {type(example_input)})")
    args = tuple(a.detach().cpu().float() if a.is_floating_point() else a.detach().cpu() for a in args)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    clone = copy.deepcopy(module).cpu().float().eval()
    f = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated; it is chosen on purpose
            torch.onnx.export(clone, args, f, dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                              do_constant_folding=False, opset_version=OPSET, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n, a in zip(names, args) if a.dim()})
    except Exception as exc:  # the exporter raises many types; all mean "this module cannot be exported"
        raise GhnOnnxError(f"{type(module).__name__}: the TorchScript ONNX exporter failed: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    model = onnx.load_from_string(f.getvalue())
    return drop_constant_norm_biases(model, {n for n, _ in module.named_parameters(remove_duplicate=False)})


def drop_constant_norm_biases(model: onnx.ModelProto, parameters: set[str]) -> onnx.ModelProto:
    """``model`` without the zero bias the exporter writes for a LayerNorm that has none
    (``nn.LayerNorm(bias=False)``, timm's ``LayerNorm2dNoBias``), in place.

    ``LayerNormalization``'s bias input is optional and an absent one adds nothing, so dropping a
    stored all-zero bias that is none of ``parameters`` computes the same; left in, the GHN would
    predict a bias the module has no parameter for.
    """
    stored = stored_tensors(model)
    dropped = set()
    for node in model.graph.node:
        if node.op_type != "LayerNormalization" or len(node.input) < 3 or node.input[2] in parameters:
            continue
        bias = stored.get(node.input[2])
        if bias is not None and not numpy_helper.to_array(bias).any():
            dropped.add(node.input[2])
            del node.input[2]
    still_read = {x for node in model.graph.node for x in node.input} | {o.name for o in model.graph.output}
    orphans = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in dropped - still_read]
    for n in orphans:
        model.graph.node.remove(n)
    kept = [t for t in model.graph.initializer if t.name not in dropped - still_read]
    if len(kept) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def match_parameters(model: onnx.ModelProto, module: torch.nn.Module, tensors: Iterable[str]) -> list[Match]:
    """The parameter of ``module`` behind each of ``tensors`` (initializers of ``model``, the
    module's export with aliases untied).

    A tensor named like a parameter (``named_parameters(remove_duplicate=False)``) is that
    parameter, and must have its shape. Any other tensor (one the exporter created, e.g. a
    constant-folded transposed weight ``onnx::MatMul_12``) is matched by value against the
    parameters no name matched: equal as stored, or as the transpose of a 2-D parameter. It must
    match exactly one, and not be a constant (all values equal: nothing to identify it by).

    Raises:
        GhnOnnxError: a tensor with no parameter, an ambiguous match, a shape that differs, or
            two tensors for one parameter. The message lists every such tensor.
    """
    tensors = list(tensors)
    params = dict(module.named_parameters(remove_duplicate=False))
    stored = stored_tensors(model)
    first_name = {}  # id(parameter) → the first name it goes by (tied names share one)
    for name, p in params.items():
        first_name.setdefault(id(p), name)
    problems: list[str] = []
    matches: list[Match] = []
    unnamed = [t for t in tensors if t not in params]
    for t in tensors:
        if t not in params:
            continue
        shape = tuple(int(d) for d in stored[t].dims) if t in stored else None
        if shape != tuple(params[t].shape):
            problems.append(f"{t!r} is stored with shape {shape}, the parameter has {tuple(params[t].shape)}")
            continue
        matches.append(Match(t, t))
    named = {id(params[m.parameter]) for m in matches}
    free = {n: p for n, p in params.items() if id(p) not in named and first_name[id(p)] == n}
    for t in unnamed:
        found = _by_value(t, stored.get(t), free)
        if isinstance(found, str):
            problems.append(found)
            continue
        matches.append(found)
        named.add(id(params[found.parameter]))
        del free[found.parameter]
    owners: dict[int, list[str]] = defaultdict(list)
    for m in matches:
        owners[id(params[m.parameter])].append(m.tensor)
    problems += [f"tensors {', '.join(map(repr, ts))} are all predictions for parameter {first_name[k]!r}"
                 for k, ts in owners.items() if len(ts) > 1]
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise GhnOnnxError(f"{len(problems)} predicted tensor(s) cannot be copied into {type(module).__name__}: "
                           + "; ".join(problems[:5]) + more)
    return matches


def _by_value(tensor: str, proto: onnx.TensorProto | None, free: Mapping[str, torch.nn.Parameter]) -> Match | str:
    """The one free parameter whose values ``tensor`` holds (as is, or transposed), or why not."""
    if proto is None:
        return f"{tensor!r} is not an initializer of the export"
    value = numpy_helper.to_array(proto)
    if value.size < 2 or np.all(value == value.flat[0]):
        return (f"{tensor!r} {value.shape} matches no parameter by name, and holds one value repeated (a constant "
                "of the export, e.g. the scale of a norm without affine parameters): the module has no "
                "parameter for it")
    found = []
    for name, p in free.items():
        ref = p.detach().cpu().float().numpy()
        for transposed, candidate in ((False, value), (True, value.T if value.ndim == 2 else None)):
            if candidate is not None and candidate.shape == ref.shape and np.array_equal(candidate, ref):
                found.append(Match(tensor, name, transposed))
    if len(found) != 1:
        return (f"{tensor!r} {value.shape} matches no parameter by name, and "
                + ("none by value" if not found else f"{', '.join(m.parameter for m in found)} by value (ambiguous)"))
    return found[0]


def _copy(target: torch.Tensor, value: np.ndarray, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):  # match_parameters checked; a guard against a layout bug
        raise GhnOnnxError(f"{name!r}: predicted shape {tuple(value.shape)}, the module has {tuple(target.shape)}")
    target.copy_(torch.tensor(value).to(device=target.device, dtype=target.dtype))


def _calibrate_on_inputs(pred: Prediction, data: np.ndarray | torch.Tensor, batch_size: int) -> None:
    """Calibrate ``pred`` in place on model inputs given as an array (as :func:`pipeline._calibrate` does
    for images)."""
    x = data.detach().cpu().float().numpy() if isinstance(data, torch.Tensor) else np.asarray(data, np.float32)
    if not calibration_targets(pred.model, pred.graph):
        pred.warnings.append(f"{NO_BN_TO_CALIBRATE} (BN status stays {pred.bn_status})")
        return
    pred.model = calibrate_bn(pred.model, list(iter_batches(x, batch_size)), graph=pred.graph)
    pred.bn_status = f"calibrated:{len(x)}"
    _set_bn_metadata(pred.model, pred.bn_status)


def _statistics(pred: Prediction, exported: onnx.ModelProto, module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Buffer name → calibrated value, for the running statistics of every calibrated BN. A BN
    node keeps its output name through prediction and calibration; its export reads the
    module's buffers by name."""
    source = {n.output[0]: n for n in exported.graph.node if is_batch_norm(n)}
    buffers = dict(module.named_buffers(remove_duplicate=False))
    stored = stored_tensors(pred.model)
    producer = {o: n for n in pred.model.graph.node for o in n.output if o}
    targets = set(calibration_targets(pred.model, pred.graph))
    out: dict[str, np.ndarray] = {}
    for node in pred.model.graph.node:
        if not is_batch_norm(node) or (node.name or node.output[0]) not in targets:
            continue
        if node.output[0] not in source:
            raise GhnOnnxError(f"BatchNormalization {node.output[0]!r} of the prediction is not in the export given")
        for k in (3, 4):
            name = source[node.output[0]].input[k]
            if name not in buffers:
                raise GhnOnnxError(f"BatchNormalization {node.name or node.output[0]!r}: its statistics "
                                   f"{name!r} are not a buffer of {type(module).__name__}")
            out[name] = numpy_helper.to_array(stored[alias_source(node.input[k], stored, producer)])
    return out


def _kept(module: torch.nn.Module, predicted: Mapping[str, Match], model: onnx.ModelProto) -> dict[str, str]:
    """Every parameter not predicted (by its first name) → why it kept its own init."""
    done = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in predicted}
    readers: dict[str, set[str]] = defaultdict(set)
    for node in model.graph.node:
        for x in node.input:
            readers[x].add(node.op_type)
    stored = stored_tensors(model)
    kept = {}
    for name, p in module.named_parameters():
        if id(p) in done:
            continue
        if name not in stored:
            kept[name] = "not in the ONNX export (unused by forward, or computed into another tensor)"
        else:
            ops = ", ".join(sorted(readers[name])) or "nothing"
            kept[name] = f"read by {ops}: no GHN node predicts it"
    return kept
