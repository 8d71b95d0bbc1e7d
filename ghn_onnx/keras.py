"""Back into Keras 3 in one call: :func:`init_` predicts a Keras model's weights with a GHN and
assigns them to ``model.weights``, in place::

    >>> import os; os.environ["KERAS_BACKEND"] = "torch"     # before keras is imported
    >>> import keras, ghn_onnx.keras
    >>> net = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(8, 3, name="conv"),
    ...                         keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(),
    ...                         keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, name="fc")], name="tiny")
    >>> report = ghn_onnx.keras.init_(net)
    >>> list(report.predicted)
    ['tiny/conv/kernel', 'tiny/conv/bias', 'tiny/bn/gamma', 'tiny/bn/beta', 'tiny/fc/kernel', 'tiny/fc/bias']
    >>> report.predicted["tiny/conv/kernel"]
    Match(tensor='_functional._torch_params.tiny/conv/kernel', weight='tiny/conv/kernel', layout='as stored')
    >>> sorted(report.kept), report.bn_status
    (['tiny/bn/moving_mean', 'tiny/bn/moving_variance'], 'uncalibrated')

The route that needs least to install: Keras on the torch backend is a ``torch.nn.Module``, so
the model is exported by PyTorch's TorchScript exporter (as :mod:`ghn_onnx.torch` does: eval,
no constant folding, opset 17, dynamic batch), with no TensorFlow or tf2onnx. One thing is
changed, for that export only: Keras's BatchNormalization, which the torch backend computes as
``(x - mean) * rsqrt(var + eps) * gamma + beta``, is traced as ``torch.nn.functional.batch_norm``
(one ``BatchNormalization`` node, which the GHN and the calibration know; same values). The other
route, TensorFlow and tf2onnx (Keras's own ``model.export(format="onnx")``), needs ~1.6 GB more and
folds every BatchNormalization into constants. Each weight is stored as its own initializer, named
``<module path>._torch_params.<variable path>`` in its Keras layout (HWIO and depthwise
``(h, w, in, multiplier)`` kernels, Dense ``(in, out)``, BN vectors): the ``Transpose`` /
``Reshape`` nodes the backend adds are in the graph, and the prediction is written back in the
stored layout, so a prediction is assigned as it is stored (:func:`match_names`).

A tensor an exporter created or renamed (constant folding, another exporter) is matched by value
against the weights no name matched, under each layout of :data:`LAYOUTS` (HWIO → OIHW, depthwise
→ ``(in·m, 1, h, w)``, Dense transposed for ``Gemm``), and must match exactly one
(:func:`match_weights`). No silent misses: a predicted tensor without its weight is an error and
nothing is assigned; after assignment every weight is read back and compared with its prediction.
The :class:`~ghn_onnx.writeback.live.Report` (one class for the three frameworks) lists every
weight predicted, calibrated or kept, and why.

Calibration (``calibrate=``) measures BN moving mean and variance on the predicted ONNX model and
assigns them. Keras models take NHWC images; the layout is read off the ONNX input
(:func:`ghn_onnx.bn.images.input_spec`). A model that rescales or normalises its input itself
(``Rescaling`` / ``Normalization`` layers before its first weighted layer, like
``keras.applications.EfficientNetB0``) gets calibration images as pixel values 0..255 unless
``mean`` / ``std`` / ``no_normalize`` say otherwise; a warning says so.

The mapping rules (:func:`match_names`, :func:`match_weights`, :data:`LAYOUTS`) do not import
Keras; committed fixtures (``tests/fixtures/keras/``) test them without Keras installed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.onnx_io.storage import alias_source, stored_tensors, untie_aliases
from ghn_onnx.pipeline import Prediction
from ghn_onnx.torch import OPSET
from ghn_onnx.writeback.live import (CALIBRATION_OPTIONS, NOT_OPTIONS, Report, calibrate_export, calibrated_statistics,
                                     check_options, kept_reasons, match_by_value, predict_export,
                                     raise_unmatched, tensors_per_variable)
from ghn_onnx.writeback.write import resolve_shared

__all__ = ["init_", "calibrate_", "copy_prediction", "export", "match_names", "match_weights", "weight_path",
           "own_preprocessing", "LAYOUTS", "Layout", "Match", "Report", "NOT_OPTIONS"]

# The torch backend registers each variable in a ParameterDict named so; a parameter's name is
# ``<module path>._torch_params.<variable.path>`` (the module path is empty for the model itself).
TORCH_PARAMS = "_torch_params."
# Layers that rescale or normalise images inside the model (calibration then feeds raw pixels).
PREPROCESSING_LAYERS = ("Rescaling", "Normalization")


def _hwio_to_oihw(k: np.ndarray) -> np.ndarray:
    return k.transpose(3, 2, 0, 1)


def _oihw_to_hwio(k: np.ndarray) -> np.ndarray:
    return k.transpose(2, 3, 1, 0)


def _depthwise_to_oihw(k: np.ndarray) -> np.ndarray:  # (h, w, c, m) -> (c·m, 1, h, w), channel-major
    h, w, c, m = k.shape
    return k.reshape(h, w, 1, c * m).transpose(3, 2, 0, 1)


def _depthwise_from_oihw(k: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return k.transpose(2, 3, 1, 0).reshape(shape)


@dataclass(frozen=True)
class Layout:
    """How a Keras weight of one kind is stored by an exporter.

    Attributes:
        applies: whether a Keras weight of this shape can be stored so.
        to_onnx: Keras value → the stored ONNX value.
        to_keras: stored ONNX value, Keras shape → the Keras value (the inverse).
    """

    applies: Callable[[tuple[int, ...]], bool]
    to_onnx: Callable[[np.ndarray], np.ndarray]
    to_keras: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


# Every way a Keras weight may be stored in an ONNX export, tried in this order when matching by
# value. The torch backend stores every weight "as stored"; tf2onnx and constant folding store
# kernels as ONNX's Conv wants them (OIHW) and may transpose Dense kernels for Gemm.
LAYOUTS: dict[str, Layout] = {
    "as stored": Layout(lambda s: True, lambda k: k, lambda k, s: k),
    "HWIO -> OIHW": Layout(lambda s: len(s) == 4, _hwio_to_oihw, lambda k, s: _oihw_to_hwio(k)),
    "depthwise HWCM -> (C*M)1HW": Layout(lambda s: len(s) == 4, _depthwise_to_oihw, _depthwise_from_oihw),
    "Dense transposed": Layout(lambda s: len(s) == 2, lambda k: k.T, lambda k, s: k.T),
}


@dataclass(frozen=True)
class Match:
    """Where one predicted ONNX tensor goes in the Keras model.

    Attributes:
        tensor: the ONNX initializer the prediction was written to.
        weight: the Keras variable's ``path`` (``"block_1_expand/kernel"``).
        layout: the :data:`LAYOUTS` entry from the stored tensor to the Keras value.
    """

    tensor: str
    weight: str
    layout: str = "as stored"

    def keras_value(self, stored: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """The Keras value of ``stored`` (the predicted tensor as the ONNX model stores it)."""
        return LAYOUTS[self.layout].to_keras(stored, tuple(shape))


def weight_path(tensor: str) -> str | None:
    """The Keras variable path an initializer of a torch-backend export is named after, or None.
    Nested models register the same variable once per enclosing model; the innermost
    ``_torch_params.`` is the variable's own path."""
    if TORCH_PARAMS not in tensor:
        return None
    return tensor.rsplit(TORCH_PARAMS, 1)[1] or None


def match_names(tensors: Mapping[str, tuple[int, ...]], weights: Mapping[str, tuple[int, ...]]
                ) -> tuple[list[Match], list[str], list[str]]:
    """Predicted tensors (name → stored shape) matched by name to Keras weights (path → shape).

    Returns:
        the matches (each in its stored layout), the tensors no name matched (to be matched by
        value), and problems: a name of a weight the model does not have, a shape that differs.
    """
    matches, unnamed, problems = [], [], []
    for name, shape in tensors.items():
        path = weight_path(name)
        if path is None:
            unnamed.append(name)
        elif path not in weights:
            problems.append(f"{name!r} is named after weight {path!r}, which the model does not have")
        elif tuple(shape) != tuple(weights[path]):
            problems.append(f"{name!r} is stored with shape {tuple(shape)}, weight {path!r} has {tuple(weights[path])}")
        else:
            matches.append(Match(name, path))
    return matches, unnamed, problems


def match_weights(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], tensors: Iterable[str]) -> list[Match]:
    """The Keras weight behind each of ``tensors`` (initializers of ``model``, an export with
    aliases untied); ``weights``: path → current value.

    By name first (:func:`match_names`); a tensor no name matches is matched by value against
    the weights no name matched, under each of :data:`LAYOUTS`: it must equal exactly one, and
    not be a constant (all values equal: nothing to identify it by).

    Raises:
        GhnOnnxError: a tensor with no weight, an ambiguous match, a shape that differs, two
            tensors for one weight. The message lists every such tensor.
    """
    stored = stored_tensors(model)
    tensors = list(tensors)
    missing = [t for t in tensors if t not in stored]
    problems = [f"{t!r} is not an initializer of the export" for t in missing]
    shapes = {t: tuple(int(d) for d in stored[t].dims) for t in tensors if t in stored}
    matches, unnamed, named_problems = match_names(shapes, {p: tuple(np.shape(v)) for p, v in weights.items()})
    problems += named_problems
    free = dict(weights)
    for m in matches:
        free.pop(m.weight, None)
    for t in unnamed:
        found = _by_value(t, numpy_helper.to_array(stored[t]), free)
        if isinstance(found, str):
            problems.append(found)
            continue
        matches.append(found)
        del free[found.weight]
    problems += tensors_per_variable([(m.tensor, m.weight) for m in matches], "weight ")
    raise_unmatched(problems, "assigned to the Keras model")
    order = {t: i for i, t in enumerate(tensors)}
    return sorted(matches, key=lambda m: order[m.tensor])


def _by_value(tensor: str, value: np.ndarray, free: Mapping[str, np.ndarray]) -> Match | str:
    """The one free weight whose value ``tensor`` holds under one of :data:`LAYOUTS`, or why not."""
    layouts = {name: functools.partial(_stored_as, layout) for name, layout in LAYOUTS.items()}
    found = match_by_value(tensor, value, {p: np.asarray(v) for p, v in free.items()}, layouts, "weight",
                           "(a constant of the export, e.g. the scale of a BatchNormalization with scale=False): "
                           "the model has no weight for it")
    return found if isinstance(found, str) else Match(tensor, *found)


def _stored_as(layout: Layout, value: np.ndarray) -> np.ndarray | None:
    return layout.to_onnx(value) if layout.applies(value.shape) else None


# -- Keras -----------------------------------------------------------------------------------


def init_(model, *, checkpoint: str | os.PathLike | GHN | None = None, calibrate=None, **predict_options) -> Report:
    """Predict a Keras model's weights with a GHN and assign them, in place.

    Args:
        model: a built ``keras.Model`` (functional, Sequential or subclassed) whose input shape is
            known but for the batch dimension, on the torch backend (``KERAS_BACKEND=torch``).
        checkpoint: a loaded :class:`~ghn_onnx.ghn.model.GHN`, a checkpoint path or shipped name
            (:func:`~ghn_onnx.pipeline.load_ghn`), or ``None`` for the shipped checkpoint.
        calibrate: calibration data for the BN moving statistics: images (folder, ``.zip``,
            ``.npy`` / ``.npz``, as ``PredictOptions.calibrate``; resized to the model's input,
            NHWC), or an array of model inputs ``(N, H, W, C)`` taken as they are. ``None``: the
            moving statistics keep the model's own values.
        predict_options: :class:`~ghn_onnx.pipeline.PredictOptions` fields (``calibration_images``,
            ``calibration_batch``, ``seed``, ``mean``, ``std``, ``no_normalize``, ``device``, ``metadata``).

    Returns:
        a :class:`~ghn_onnx.writeback.live.Report` keyed by weight path (``predicted``: path → :class:`Match`;
        ``statistics``: the BN moving statistics calibrated; ``kept``: every other weight, and why).

    Raises:
        GhnOnnxError: another backend, an input shape not known, the model cannot be exported or
            predicted, bad calibration data, a predicted tensor that matches no weight (nothing
            is assigned then).
        TypeError: an unknown option, or ``unfold_bn`` / ``calibrate`` given as an option.
    """
    predict_options = check_options("init_", predict_options)  # before the export, which takes seconds
    exported = export(model)
    by_path = calibrate if isinstance(calibrate, (str, os.PathLike)) else None
    predict_options, notes = _image_options(model, by_path, predict_options)
    data = calibrate if calibrate is None or by_path is not None else np.asarray(calibrate, np.float32)
    pred = predict_export(exported, model.name, checkpoint, data, predict_options)
    pred.warnings.extend(notes)
    return copy_prediction(model, pred, exported)


def calibrate_(model, data, **options) -> list[str]:
    """Set a Keras model's BN moving statistics as ``init_(model, calibrate=data)`` sets them,
    in place, predicting nothing: measured on its ONNX export (:mod:`ghn_onnx.bn`), then assigned.
    A model's own initialisation calibrated so is the fair baseline for an ``init_`` one.

    Args:
        model, data, options: as :func:`init_` (``data`` is its ``calibrate``; ``options`` its
            calibration fields: ``calibration_images``, ``calibration_batch``, ``seed``, ``mean``,
            ``std``, ``no_normalize``). Own preprocessing is detected as by :func:`init_`.

    Returns:
        the weight paths set (``<bn>/moving_mean``, ``<bn>/moving_variance``); empty without BN.

    Raises:
        GhnOnnxError: the model cannot be exported, bad calibration data.
        TypeError: an unknown option.
    """
    options = check_options("calibrate_", options, CALIBRATION_OPTIONS)
    exported = export(model)
    if isinstance(data, (str, os.PathLike)):
        options, _ = _image_options(model, data, options)
    else:
        data = np.asarray(data, np.float32)
    pred = calibrate_export(exported, model.name, data, options)
    if not pred.bn_status.startswith("calibrated"):
        return []
    variables = _variables(model)
    statistics = _statistics(pred, untie_aliases(exported)[0], variables)
    for path, value in statistics.items():
        variables[path].assign(value.astype(_numpy(variables[path]).dtype))
    return list(statistics)


def _image_options(model, images, options: Mapping) -> tuple[dict, list[str]]:
    """``options`` for calibration on ``images``, with ``no_normalize`` when the model
    normalises its input itself and the caller chose no normalisation; and a note saying so."""
    own = own_preprocessing(model)
    if images is None or not own or {"mean", "std", "no_normalize"} & set(options):
        return dict(options), []
    return {**options, "no_normalize": True}, [
        f"the model normalises its input itself ({', '.join(own)}): calibration images are fed as pixel "
        "values 0..255 (pass mean/std or no_normalize to choose otherwise)"]


def copy_prediction(model, prediction: Prediction, exported: onnx.ModelProto) -> Report:
    """Assign ``prediction`` (of ``exported``, an ONNX export of ``model``) to ``model``'s
    weights: the second half of :func:`init_`, for a model exported some other way. Every
    predicted tensor is matched first (:func:`match_weights`); nothing is assigned if one does
    not match. BN moving statistics are assigned when the prediction was calibrated. Each weight
    is read back afterwards and compared with what was meant for it.

    Raises:
        GhnOnnxError: a predicted tensor without its weight, calibrated statistics without their
            weight, an ``unfold_bn`` prediction, a weight that does not read back as assigned.
    """
    if prediction.bn_status.startswith("unfolded"):
        raise GhnOnnxError("an unfold_bn prediction holds BN-folded weights: the model's weights cannot take them")
    variables = _variables(model)
    values = {path: _numpy(v) for path, v in variables.items()}
    untied = untie_aliases(exported)[0]
    matches = match_weights(untied, values, list(resolve_shared(prediction.graph)))
    stored = stored_tensors(prediction.model)
    targets = {m.weight: m.keras_value(numpy_helper.to_array(stored[m.tensor]), values[m.weight].shape)
               for m in matches}
    statistics = _statistics(prediction, untied, variables) if prediction.bn_status.startswith("calibrated") else {}
    targets.update(statistics)
    for path, value in targets.items():
        variables[path].assign(value.astype(values[path].dtype))
    wrong = [p for p, value in targets.items()
             if not np.array_equal(_numpy(variables[p]), value.astype(values[p].dtype))]
    if wrong:  # a backend that keeps another copy, or a layout bug: never leave it unsaid
        raise GhnOnnxError(f"{len(wrong)} weight(s) do not read back as assigned: {', '.join(wrong[:5])}")
    predicted = {m.weight: m for m in matches}
    return Report(predicted=predicted, kept=_kept(variables, set(predicted) | set(statistics), untied, prediction),
                  statistics=list(statistics), bn_status=prediction.bn_status,
                  warnings=list(prediction.warnings), prediction=prediction)


def export(model) -> onnx.ModelProto:
    """``model`` as the GHN reads it: the torch backend's module through PyTorch's TorchScript
    exporter (eval, BN kept as ``BatchNormalization``, no constant folding, opset 17), input
    ``input`` with a dynamic batch dimension. Initializers are named
    ``<module path>._torch_params.<variable path>``; equal tensors merged by the exporter come
    back as ``Identity`` aliases named after their variables."""
    import keras
    import torch

    if keras.backend.backend() != "torch":
        raise GhnOnnxError(f"ghn_onnx.keras needs Keras on the torch backend (got {keras.backend.backend()!r}): "
                           "set KERAS_BACKEND=torch before importing keras")
    shape = _input_shape(model)
    example = torch.zeros((2, *shape), dtype=torch.float32)
    f = io.BytesIO()
    try:
        with warnings.catch_warnings(), _native_batch_norm():
            warnings.simplefilter("ignore")  # TorchScript exporter deprecation, tracer warnings: chosen on purpose
            torch.onnx.export(model, (example,), f, dynamo=False, training=torch.onnx.TrainingMode.EVAL,
                              do_constant_folding=False, opset_version=OPSET, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
    except GhnOnnxError:
        raise
    except Exception as exc:  # the exporter raises many types; all mean "this model cannot be exported"
        raise GhnOnnxError(f"{model.name}: the TorchScript ONNX exporter failed: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    return onnx.load_from_string(f.getvalue())


def own_preprocessing(model) -> list[str]:
    """Names of the ``Rescaling`` / ``Normalization`` layers a model applies to its input
    before its first layer with trainable weights (in the model's layer order)."""
    found = []
    for layer in _flat_layers(model):
        if type(layer).__name__ in PREPROCESSING_LAYERS:
            found.append(layer.name)
        elif layer.trainable_weights:
            break
    return found


def _flat_layers(model) -> Iterator:
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None):  # a nested model: its own layers, in its order
            yield from _flat_layers(layer)
        else:
            yield layer


def _input_shape(model) -> tuple[int, ...]:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise GhnOnnxError(f"{model.name}: the model has no known input (build it with an input shape, "
                           "e.g. keras.Input((32, 32, 3)), or call it once)")
    if len(inputs) != 1:
        raise GhnOnnxError(f"{model.name}: Expected a model with one input (got {len(inputs)})")
    shape = tuple(inputs[0].shape[1:])
    if any(d is None for d in shape):
        raise GhnOnnxError(f"{model.name}: the input shape {tuple(inputs[0].shape)} is not fully known "
                           "(only the batch dimension may be None): build the model with a fixed image size")
    return tuple(int(d) for d in shape)


@contextlib.contextmanager
def _native_batch_norm() -> Iterator[None]:
    """Trace the torch backend's batch normalisation as ``F.batch_norm`` (one ONNX
    ``BatchNormalization``) instead of its arithmetic, which no GHN node or calibration reads as
    BN. Same values; channels moved to axis 1 and back (``Transpose`` nodes around it)."""
    import torch
    from keras.src.backend.torch import nn as backend_nn

    original = getattr(backend_nn, "batch_normalization", None)
    if original is None:
        raise GhnOnnxError("this Keras version has no torch-backend batch_normalization to export as BN")

    def batch_normalization(x, mean, variance, axis, offset=None, scale=None, epsilon=1e-3):
        x = backend_nn.convert_to_tensor(x)
        axis = axis % x.ndim
        moved = x.movedim(axis, 1) if axis != 1 else x
        y = torch.nn.functional.batch_norm(
            moved, backend_nn.convert_to_tensor(mean), backend_nn.convert_to_tensor(variance),
            None if scale is None else backend_nn.convert_to_tensor(scale),
            None if offset is None else backend_nn.convert_to_tensor(offset), training=False, eps=epsilon)
        return y.movedim(1, axis) if axis != 1 else y

    backend_nn.batch_normalization = batch_normalization
    try:
        yield
    finally:
        backend_nn.batch_normalization = original


def _variables(model) -> dict:
    """Weight path → variable; paths must be unique (they are what tensors are named after)."""
    out: dict = {}
    for v in model.weights:
        if v.path in out and out[v.path] is not v:
            raise GhnOnnxError(f"{model.name}: two weights share the path {v.path!r}: rename a layer")
        out[v.path] = v
    return out


def _numpy(variable) -> np.ndarray:
    import keras

    return np.asarray(keras.ops.convert_to_numpy(variable.value))


def _statistics(pred: Prediction, exported: onnx.ModelProto, variables: Mapping) -> dict[str, np.ndarray]:
    """Weight path → calibrated value, for the moving statistics of every calibrated BN; the
    export's BN nodes read the variables through ``Cast`` / ``Identity``."""
    stored = stored_tensors(exported)
    producer = {o: n for n in exported.graph.node for o in n.output if o}
    out: dict[str, np.ndarray] = {}
    for bn, name, value in calibrated_statistics(pred.model, pred.graph, exported):
        tensor = alias_source(name, stored, producer)
        path = weight_path(tensor or "")
        if path not in variables:
            raise GhnOnnxError(f"BatchNormalization {bn!r}: its statistics {tensor!r} are not a weight of the model")
        out[path] = value
    return out


def _kept(variables: Mapping, done: set[str], exported: onnx.ModelProto, pred: Prediction) -> dict[str, str]:
    """Every weight neither predicted nor calibrated (``done``) → why it kept its own value."""
    by_path = {weight_path(t): t for t in stored_tensors(exported) if weight_path(t)}
    holders = {path: [by_path[path]] if path in by_path else [] for path in variables if path not in done}
    return kept_reasons(holders, exported, pred.bn_status)
