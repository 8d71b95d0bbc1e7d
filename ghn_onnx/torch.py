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
:class:`Report` (:mod:`ghn_onnx.writeback.live`, shared with Keras and Flax) says, for every parameter
not predicted, why it kept its own initialisation.
"""

from __future__ import annotations

import copy
import io
import os
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.onnx_io.storage import stored_tensors, untie_aliases
from ghn_onnx.pipeline import Prediction
from ghn_onnx.writeback.live import (CALIBRATION_OPTIONS, NOT_OPTIONS, Report, calibrate_export, calibrated_statistics,
                                     check_options, kept_reasons, match_by_value, predict_export,
                                     raise_unmatched, tensors_per_variable)
from ghn_onnx.writeback.write import resolve_shared

__all__ = ["init_", "calibrate_", "copy_prediction", "export", "match_parameters", "drop_constant_norm_biases",
           "Match", "Report", "NOT_OPTIONS", "OPSET"]

OPSET = 17

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
            ``calibration_batch``, ``seed``, ``mean``, ``std``, ``no_normalize``, ``device``, ``metadata``).

    Returns:
        a :class:`Report`: every parameter predicted, every one kept and why, the BN statistics set.

    Raises:
        GhnOnnxError: the module cannot be exported or predicted, bad calibration data, or a
            predicted tensor that matches no parameter (nothing is copied then).
        TypeError: an unknown option, or ``unfold_bn`` / ``calibrate`` given as an option.
    """
    predict_options = check_options("init_", predict_options)  # before the export, which takes seconds
    exported = export(module, example_input)
    pred = predict_export(exported, type(module).__name__, checkpoint, _inputs_array(calibrate), predict_options)
    return copy_prediction(module, pred, exported)


def calibrate_(module: torch.nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor],
               data: CalibrationData, **options) -> list[str]:
    """Set ``module``'s BN running statistics as ``init_(..., calibrate=data)`` sets them, in
    place, without predicting anything: measured on its ONNX export by :mod:`ghn_onnx.bn`, then
    copied into the BN buffers. The parameters are not touched. A module's own initialisation
    calibrated this way is the fair baseline for an ``init_`` one.

    Args:
        module, example_input, data, options: as :func:`init_` (``data`` is its ``calibrate``;
            ``options`` its calibration fields: ``calibration_images``, ``calibration_batch``, ``seed``,
            ``mean``, ``std``, ``no_normalize``).

    Returns:
        the BN buffer names set (``running_mean`` / ``running_var``); empty for a module without BN.

    Raises:
        GhnOnnxError: the module cannot be exported, bad calibration data.
        TypeError: an unknown option.
    """
    options = check_options("calibrate_", options, CALIBRATION_OPTIONS)
    exported = export(module, example_input)
    pred = calibrate_export(exported, type(module).__name__, _inputs_array(data), options)
    if not pred.bn_status.startswith("calibrated"):
        return []
    statistics = _statistics(pred, exported, module)
    buffers = dict(module.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, value in statistics.items():
            _copy(buffers[name], value, name)
    return list(statistics)


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
    return Report(predicted=predicted, kept=_kept(module, predicted, prediction), statistics=list(statistics),
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
    problems += tensors_per_variable([(m.tensor, first_name[id(params[m.parameter])]) for m in matches], "parameter ")
    raise_unmatched(problems, f"copied into {type(module).__name__}")
    return matches


# How a parameter may be stored by the exporter (a Linear weight that a MatMul reads is transposed).
_LAYOUTS = {"as stored": lambda p: p, "transposed": lambda p: p.T if p.ndim == 2 else None}


def _by_value(tensor: str, proto: onnx.TensorProto | None, free: Mapping[str, torch.nn.Parameter]) -> Match | str:
    """The one free parameter whose values ``tensor`` holds (as is, or transposed), or why not."""
    if proto is None:
        return f"{tensor!r} is not an initializer of the export"
    values = {name: p.detach().cpu().float().numpy() for name, p in free.items()}
    found = match_by_value(tensor, numpy_helper.to_array(proto), values, _LAYOUTS, "parameter",
                           "(a constant of the export, e.g. the scale of a norm without affine parameters): the "
                           "module has no parameter for it")
    return found if isinstance(found, str) else Match(tensor, found[0], found[1] == "transposed")


def _copy(target: torch.Tensor, value: np.ndarray, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):  # match_parameters checked; a guard against a layout bug
        raise GhnOnnxError(f"{name!r}: predicted shape {tuple(value.shape)}, the module has {tuple(target.shape)}")
    target.copy_(torch.tensor(value).to(device=target.device, dtype=target.dtype))


def _inputs_array(data: CalibrationData | None) -> str | os.PathLike | np.ndarray | None:
    """Calibration data as the shared calibration takes it: a path as it is, inputs as float32 numpy."""
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().float().numpy()
    return data if data is None or isinstance(data, (str, os.PathLike)) else np.asarray(data, np.float32)


def _statistics(pred: Prediction, exported: onnx.ModelProto, module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Buffer name → calibrated value, for the running statistics of every calibrated BN; the
    export's BN nodes read the module's buffers by name."""
    buffers = dict(module.named_buffers(remove_duplicate=False))
    out: dict[str, np.ndarray] = {}
    for bn, name, value in calibrated_statistics(pred.model, pred.graph, exported):
        if name not in buffers:
            raise GhnOnnxError(f"BatchNormalization {bn!r}: its statistics {name!r} are not a buffer of "
                               f"{type(module).__name__}")
        out[name] = value
    return out


def _kept(module: torch.nn.Module, predicted: Mapping[str, Match], prediction: Prediction) -> dict[str, str]:
    """Every parameter not predicted (by its first name) → why it kept its own init."""
    done = {id(p) for n, p in module.named_parameters(remove_duplicate=False) if n in predicted}
    stored = stored_tensors(prediction.model)
    holders = {name: [name] if name in stored else [] for name, p in module.named_parameters() if id(p) not in done}
    return kept_reasons(holders, prediction.model, prediction.bn_status)
