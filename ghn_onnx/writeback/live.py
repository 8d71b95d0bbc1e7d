"""Predictions into a live model: what the framework initialisers (:mod:`ghn_onnx.torch`,
:mod:`ghn_onnx.keras`, :mod:`ghn_onnx.flax`) share once their framework has exported the model.

Each initialiser exports its model to ONNX, predicts the export (:func:`predict_export`) or only
calibrates it (:func:`calibrate_export`), maps every predicted tensor back to the framework's
variable (its own rule: names, values, markers) and says, for every variable it did not set,
why (:func:`kept_reasons`), in one :class:`Report`. BN statistics are read back by BN output
name (:func:`calibrated_statistics`): a BN node keeps its first output's name through prediction
and calibration, so the calibrated value of each statistic is found in the export's BN node of
that name. Nothing here imports a framework.
"""

from __future__ import annotations

import dataclasses
import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.bn.calibration import calibrate_bn, calibration_targets, iter_batches
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.onnx_io.storage import ALIAS_OPS, alias_source, is_batch_norm, stored_tensors
from ghn_onnx.pipeline import (NO_BN_TO_CALIBRATE, Prediction, PredictOptions, _calibrate, _set_bn_metadata,
                               bn_status, load_ghn, predict, prepare, renamed_options)

# PredictOptions fields that make no sense here: the initialisers export with BN kept, and take
# calibration data as their own ``calibrate=`` argument.
NOT_OPTIONS = frozenset({"unfold_bn", "calibrate"})
# The PredictOptions fields calibration reads (what the calibrate-only functions take).
CALIBRATION_OPTIONS = frozenset({"calibration_images", "calibration_batch", "seed", "mean", "std", "no_normalize"})

NOT_IN_EXPORT = "not in the ONNX export (unused by the forward pass, not a float, or computed into another tensor)"
STATISTIC_UNCALIBRATED = "BN moving statistic: never predicted (calibrate= measures it)"
STATISTIC_NOT_REACHED = "BN moving statistic of a BN the calibration did not reach"


@dataclass
class Report:
    """What an initialiser did to a model: every variable predicted, calibrated or kept, and why.

    Attributes:
        predicted: variable name → the framework's ``Match`` (the ONNX tensor it was copied from),
            in GHN graph order.
        kept: variable name → why it kept its own value (every variable neither predicted nor
            calibrated; tied names of one variable appear under their first name only).
        statistics: the BN statistics set from calibration.
        bn_status: as :attr:`Prediction.bn_status` (``none``, ``uncalibrated``, ``calibrated:<images>``...).
        warnings: the prediction's warnings (how the graph was read, calibration notes).
        prediction: the predicted ONNX model and its graph (:class:`~ghn_onnx.pipeline.Prediction`);
            the framework's forward with the new values equals onnxruntime on it.
        unit: what ``predicted`` and ``kept`` name (``parameters``; Flax: ``leaves``).
        statistics_unit: what ``statistics`` name (``buffers``; Flax: ``leaves``); they count in
            the total of :meth:`format` when they are of ``unit``.
    """

    predicted: dict[str, Any]
    kept: dict[str, str]
    statistics: list[str]
    bn_status: str
    warnings: list[str] = field(default_factory=list)
    prediction: Prediction | None = field(default=None, repr=False)
    unit: str = "parameters"
    statistics_unit: str = "buffers"

    def format(self) -> str:
        """A few lines for people: counts, BN status, every kept variable with its reason."""
        total = len(self.predicted) + len(self.kept) + (len(self.statistics) if self.statistics_unit == self.unit
                                                         else 0)
        lines = [f"predicted {len(self.predicted)} of {total} {self.unit}; BN {self.bn_status}"
                 + (f" ({len(self.statistics)} statistics {self.statistics_unit} set)" if self.statistics else "")]
        lines += [f"kept its own init: {name}: {why}" for name, why in self.kept.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def match_by_value(tensor: str, value: np.ndarray, free: Mapping[str, np.ndarray],
                   layouts: Mapping[str, Callable[[np.ndarray], np.ndarray | None]], noun: str,
                   constant: str) -> tuple[str, str] | str:
    """``(variable, layout)``: the one variable of ``free`` (name → its value in the framework)
    whose value the stored tensor ``value`` holds under one of ``layouts`` (name → framework value
    → its stored form, ``None`` where the layout does not apply); or why there is none. A tensor
    that holds one value repeated matches nothing: there is nothing to identify it by (``constant``
    says what such a tensor is; ``noun``: what a variable is called)."""
    if value.size < 2 or np.all(value == value.flat[0]):
        return f"{tensor!r} {value.shape} matches no {noun} by name, and holds one value repeated {constant}"
    found = []
    for name, ref in free.items():
        for layout, to_stored in layouts.items():
            candidate = to_stored(ref)
            if candidate is not None and candidate.shape == value.shape and np.array_equal(candidate, value):
                found.append((name, layout))
                break  # one variable, one match: a symmetric kernel equals itself under several layouts
    if len(found) != 1:
        return (f"{tensor!r} {value.shape} matches no {noun} by name, and "
                + ("none by value" if not found else f"{', '.join(n for n, _ in found)} by value (ambiguous)"))
    return found[0]


def tensors_per_variable(matches: Iterable[tuple[str, str]], noun: str = "") -> list[str]:
    """A problem for each variable that two or more tensors are predictions for; ``matches``:
    ``(tensor, variable)`` pairs, ``noun`` what a variable is called (``"parameter "``)."""
    owners: dict[str, list[str]] = defaultdict(list)
    for tensor, variable in matches:
        owners[variable].append(tensor)
    return [f"tensors {', '.join(map(repr, ts))} are all predictions for {noun}{v!r}"
            for v, ts in owners.items() if len(ts) > 1]


def raise_unmatched(problems: list[str], into: str) -> None:
    """Raise one GhnOnnxError that lists (the first five of) ``problems``, if there are any:
    nothing may be copied when a predicted tensor has no variable. ``into``: ``"copied into X"``."""
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise GhnOnnxError(f"{len(problems)} predicted tensor(s) cannot be {into}: " + "; ".join(problems[:5]) + more)


def check_options(caller: str, options: Mapping[str, object], known: Iterable[str] | None = None) -> dict:
    """``options`` with old names renamed (:func:`~ghn_onnx.pipeline.renamed_options`); raise
    TypeError for an option ``caller`` does not take: ``unfold_bn`` / ``calibrate``, or a name
    that is not in ``known`` (default: every :class:`PredictOptions` field but those two).
    Called before the export, which takes seconds."""
    options = renamed_options(options, caller)
    bad = sorted(NOT_OPTIONS & set(options))
    if bad:
        raise TypeError(f"{caller} does not take {', '.join(bad)} as an option (it exports with BN kept; pass "
                        "calibration data as calibrate=)")
    known = set(known) if known is not None else {f.name for f in dataclasses.fields(PredictOptions)} - NOT_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
    return options


def predict_export(exported: onnx.ModelProto, name: str, checkpoint: str | os.PathLike | GHN | None,
                   calibrate: str | os.PathLike | np.ndarray | None, options: Mapping[str, Any]) -> Prediction:
    """``exported`` predicted by ``checkpoint`` (a GHN, a checkpoint path or name, None: the
    shipped one) with ``options`` (:class:`PredictOptions` fields); BN calibrated on
    ``calibrate``: images by path (as ``PredictOptions.calibrate``), or an array of model inputs
    taken as they are (:func:`calibrate_on_inputs`)."""
    ghn = checkpoint if isinstance(checkpoint, GHN) or checkpoint is None else load_ghn(
        checkpoint, options.get("device") or "cpu")
    by_path = calibrate if isinstance(calibrate, (str, os.PathLike)) else None
    pred = predict(exported, ghn, name=name, calibrate=by_path, **options)
    if calibrate is not None and by_path is None:
        calibrate_on_inputs(pred, calibrate, options.get("calibration_batch", PredictOptions.calibration_batch))
    return pred


def calibrate_export(exported: onnx.ModelProto, name: str, data: str | os.PathLike | np.ndarray,
                     options: Mapping[str, Any]) -> Prediction:
    """``exported``, nothing predicted, with its BN statistics calibrated as
    :func:`predict_export` calibrates them (so a model's own init calibrated so is the fair
    baseline for a GHN init). Check ``bn_status`` for ``calibrated`` before reading them."""
    model, graph = prepare(exported, name)
    pred = Prediction(name=name, model=model, graph=graph, predicted_tensors=0, predicted_elements=0,
                      bn_status=bn_status(graph))
    if isinstance(data, (str, os.PathLike)):
        _calibrate(pred, PredictOptions(calibrate=data, **options))
    else:
        calibrate_on_inputs(pred, data, options.get("calibration_batch", PredictOptions.calibration_batch))
    return pred


def calibrate_on_inputs(pred: Prediction, inputs: np.ndarray, batch_size: int) -> None:
    """Calibrate ``pred`` in place on model inputs ``(N, ...)`` given as an array, as
    ``PredictOptions.calibrate`` does for images; BN status ``calibrated:<N>``."""
    x = np.asarray(inputs, np.float32)
    if not calibration_targets(pred.model, pred.graph):
        pred.warnings.append(f"{NO_BN_TO_CALIBRATE} (BN status stays {pred.bn_status})")
        return
    pred.model = calibrate_bn(pred.model, list(iter_batches(x, batch_size)), graph=pred.graph)
    pred.bn_status = f"calibrated:{len(x)}"
    _set_bn_metadata(pred.model, pred.bn_status)


def calibrated_statistics(model: onnx.ModelProto, graph: Graph | None, exported: onnx.ModelProto
                          ) -> list[tuple[str, str, np.ndarray]]:
    """``(BN name, statistic, value)`` for the mean and variance of every calibrated BN of
    ``model`` (restricted to ``graph``'s BNs when given): ``statistic`` is the input the BN node
    of the same output name reads in ``exported`` (the framework's variable, or an alias of it),
    ``value`` the calibrated value in ``model``.

    Raises:
        GhnOnnxError: a calibrated BN that is not in ``exported``.
    """
    source = {n.output[0]: n for n in exported.graph.node if is_batch_norm(n)}
    stored = stored_tensors(model)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    targets = set(calibration_targets(model, graph))
    out = []
    for node in model.graph.node:
        if not is_batch_norm(node) or (node.name or node.output[0]) not in targets:
            continue
        if node.output[0] not in source:
            raise GhnOnnxError(f"BatchNormalization {node.output[0]!r} of the prediction is not in the export given")
        for k in (3, 4):
            value = numpy_helper.to_array(stored[alias_source(node.input[k], stored, producer)])
            out.append((node.name or node.output[0], source[node.output[0]].input[k], value))
    return out


def kept_reasons(holders: Mapping[str, Iterable[str]], model: onnx.ModelProto, bn_status: str) -> dict[str, str]:
    """Why each variable kept its own value. ``holders``: every variable neither predicted nor
    calibrated → the stored tensors of ``model`` (its export) that hold its values (none: it is
    not in the export). A variable a BatchNormalization reads as mean or variance is a BN
    statistic (never predicted; calibration measures it); any other is read by ops no GHN node
    predicts (found through ``Identity`` / ``Cast``)."""
    uses = _uses(model)
    calibrated = bn_status.startswith("calibrated")
    kept = {}
    for name, tensors in holders.items():
        found = set().union(*(uses(t) for t in tensors)) if tensors else None
        if found is None:
            kept[name] = NOT_IN_EXPORT
        elif {("BatchNormalization", 3), ("BatchNormalization", 4)} & found:
            kept[name] = STATISTIC_NOT_REACHED if calibrated else STATISTIC_UNCALIBRATED
        else:
            kept[name] = f"read by {', '.join(sorted({op for op, _ in found})) or 'nothing'}: no GHN node predicts it"
    return kept


def _uses(model: onnx.ModelProto) -> Callable[[str], set[tuple[str, int]]]:
    """tensor → the ``(op type, input index)`` of every node that reads it, through Identity / Cast."""
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            consumers[x].append((node, i))

    def uses(name: str, seen: set[str] | None = None) -> set[tuple[str, int]]:
        seen = set() if seen is None else seen
        out: set[tuple[str, int]] = set()
        for node, i in consumers[name]:
            if node.op_type in ALIAS_OPS:
                if node.output[0] not in seen:
                    seen.add(node.output[0])
                    out |= uses(node.output[0], seen)
            else:
                out.add((node.op_type, i))
        return out

    return uses
