"""Back into Flax in one call: :func:`init` predicts a model's variables with a GHN and returns
new ones, functionally, as ``module.init`` does::

    variables = model.init(jax.random.key(0), x)
    variables = ghn_onnx.flax.init(model, variables, x, apply_kwargs={"train": False})
    variables, report = ghn_onnx.flax.init(model, variables, x, apply_kwargs={"train": False},
                                           return_report=True)

The model is exported with jax2onnx (its defaults: opset 23, NHWC input transposed to NCHW before
each Conv), predicted with :func:`ghn_onnx.pipeline.predict`, and each predicted tensor is copied
into the leaf of ``variables`` it was exported from. jax2onnx names initializers anonymously
(``const_12``, ``kernel_oih_0``) and stores kernels transposed, so names cannot say which leaf a
tensor holds. The export is therefore traced on *marker* variables: every element of every
floating leaf gets its own float32 value, ``2**-100`` upwards in steps of one unit in the last
place (no model constant is that small), so each stored element says which leaf and which
element it came from (:func:`marker_index`). A predicted tensor whose elements are exactly the
elements of one leaf, in any order, is that leaf, stored permuted (:func:`match_leaves`); the
permutation (a kernel's ``HWIO -> OIHW`` transpose) is undone on copy. The model that is
predicted is the marker export with every marker tensor replaced by the real variables' values,
so tensors the GHN leaves alone (BN statistics, the kept leaves) hold the model's own values.
Finally the Flax forward with the new variables is checked against onnxruntime on the predicted
model, on ``example_input`` (``verify=True``): a mapping error cannot pass silently.

No silent misses: a predicted tensor that is not one leaf (a constant the export computed from
several variables, a slice of one) is an error, and nothing is returned; the :class:`Report` says,
for every leaf not predicted, why it kept its value.

Supported: ``flax.linen`` modules (``variables`` from ``module.init``) and ``flax.nnx`` modules
(``variables=None``: the model's state via ``nnx.split``; a new model is returned, built with
``nnx.merge``, the one given is left as it is). Calibration data sets the BN statistics
(``batch_stats`` in linen, ``nnx.BatchStat`` in nnx), measured on the predicted ONNX model
(:mod:`ghn_onnx.bn`, which reads the NHWC input layout from the export).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.pipeline import Prediction
from ghn_onnx.writeback.live import (CALIBRATION_OPTIONS, NOT_OPTIONS, Report, calibrate_export, calibrated_statistics,
                                     check_options, kept_reasons, predict_export)
from ghn_onnx.writeback.markers import (MARKER_BASE, MAX_MARKED_ELEMENTS, Leaf, Order, find_leaves, marked_tensors,
                                        marker_index, markers, owners, substitute, to_leaf)
from ghn_onnx.writeback.write import resolve_shared

__all__ = ["init", "calibrate", "copy_prediction", "export", "match_leaves", "markers", "marker_index",
           "marked_tensors", "substitute", "to_leaf", "Leaf", "Match", "Report", "NOT_OPTIONS", "MARKER_BASE",
           "MAX_MARKED_ELEMENTS"]

CalibrationData = str | os.PathLike | np.ndarray


@dataclass(frozen=True)
class Match:
    """Where one predicted ONNX tensor goes in the variables.

    Attributes:
        tensor: the ONNX initializer the prediction was written to.
        leaf: the leaf's path.
        transpose: the axes permutation that turns the leaf into the stored tensor
            (``np.transpose(leaf, transpose)``, e.g. ``(3, 2, 0, 1)`` for a conv kernel), ``None``
            when stored as is; ``"reshaped"`` (same element order, another shape, e.g. attention
            heads merged) or ``"reordered"`` (any other order of its elements).
    """

    tensor: str
    leaf: str
    transpose: Order = None


def init(module: Any, variables: Any, example_input: Any, *, checkpoint: str | os.PathLike | GHN | None = None,
         calibrate: CalibrationData | None = None, apply_kwargs: Mapping[str, Any] | None = None,
         return_report: bool = False, verify: bool = True, **predict_options) -> Any:
    """New variables for ``module``, predicted by a GHN; ``variables`` is not modified.

    Args:
        module: a ``flax.linen.Module``, or a ``flax.nnx.Module`` (then ``variables=None``).
        variables: linen: the variables from ``module.init`` (``{"params": ..., "batch_stats": ...}``);
            every floating leaf the GHN predicts is replaced, the others are returned as given.
        example_input: an array, or a tuple of arrays, that ``module`` takes; only shapes matter
            (a floating input's first dimension is exported as dynamic).
        checkpoint: a loaded :class:`~ghn_onnx.ghn.model.GHN`, a checkpoint path or shipped name,
            or ``None`` for the shipped checkpoint.
        calibrate: calibration data for the BN statistics: images (folder, ``.zip``, ``.npy`` /
            ``.npz``, as ``PredictOptions.calibrate``: NHWC for a jax2onnx export, normalised
            with ``mean`` / ``std``), or an array of model inputs ``(N, ...)`` taken as they are.
            ``None``: BN statistics keep the values in ``variables``.
        apply_kwargs: keyword arguments of the inference call, e.g. ``{"train": False}`` for a
            linen model whose BatchNorm reads ``use_running_average=not train`` (the export and
            the check run ``module.apply(variables, *inputs, **apply_kwargs)``; nnx:
            ``model(*inputs, **apply_kwargs)``, so give an nnx model in eval mode).
        return_report: return ``(variables, report)`` instead of the variables alone, as
            ``module.apply(..., mutable=...)`` returns ``(output, state)``.
        verify: check the Flax forward with the new variables against onnxruntime on the
            predicted model, on ``example_input`` (cheap for small inputs).
        predict_options: :class:`~ghn_onnx.pipeline.PredictOptions` fields (``calibration_images``,
            ``calibration_batch``, ``seed``, ``mean``, ``std``, ``no_normalize``, ``device``, ``metadata``).

    Returns:
        the new variables (same tree structure and dtypes; nnx: a new model), or
        ``(variables, Report)`` with ``return_report=True``.

    Raises:
        GhnOnnxError: the model cannot be exported or predicted, bad calibration data, a predicted
            tensor that is not one leaf, a forward that does not match the predicted ONNX model.
        TypeError: an unknown option, or ``unfold_bn`` / ``calibrate`` given as an option.
    """
    predict_options = check_options("init", predict_options)  # before the export, which takes seconds
    state = _State.of(module, variables)
    exported = export(module, state, example_input, apply_kwargs)
    real = substitute(exported, state.leaves, state.float_values())
    pred = predict_export(real, type(module).__name__, checkpoint, _inputs_array(calibrate), predict_options)
    values, report = copy_prediction(state, pred, exported)
    tree = state.rebuild(values)
    if verify:
        _verify(module, state, tree, example_input, apply_kwargs, pred.model)
    result = state.result(tree)
    return (result, report) if return_report else result


def calibrate(module: Any, variables: Any, example_input: Any, data: CalibrationData, *,
              apply_kwargs: Mapping[str, Any] | None = None, verify: bool = True, **options) -> Any:
    """New variables whose BN statistics are measured on ``data``, everything else as given: the
    calibration half of :func:`init`, for variables initialised some other way (the default
    init that a GHN init is compared with). Arguments as :func:`init`; ``options``:
    ``calibration_images``, ``calibration_batch``, ``seed``, ``mean``, ``std``, ``no_normalize``.
    A model without BatchNormalization comes back as given.

    Raises:
        GhnOnnxError: the model cannot be exported, bad calibration data, statistics that are
            not one leaf each, a forward that does not match the calibrated ONNX model.
        TypeError: an option that does not apply.
    """
    options = check_options("calibrate", options, CALIBRATION_OPTIONS)
    state = _State.of(module, variables)
    exported = export(module, state, example_input, apply_kwargs)
    real = substitute(exported, state.leaves, state.float_values())
    pred = calibrate_export(real, type(module).__name__, _inputs_array(data), options)
    if not pred.bn_status.startswith("calibrated"):
        return state.result(state.rebuild({}))
    tree = state.rebuild(_statistics(pred.model, pred.graph, exported, state, marked_tensors(exported, state.leaves)))
    if verify:
        _verify(module, state, tree, example_input, apply_kwargs, pred.model)
    return state.result(tree)


def _inputs_array(data: CalibrationData | None) -> CalibrationData | None:
    """Calibration data as the shared calibration takes it: a path as it is, inputs as float32 numpy."""
    return data if data is None or isinstance(data, (str, os.PathLike)) else np.asarray(data, np.float32)


# -- the variables ---------------------------------------------------------------------------------

@dataclass
class _State:
    """The variables as flat leaves: linen variables, or an nnx model's split state."""

    leaves: list[Leaf]  # the floating leaves, in flattening order
    values: list[Any]  # every leaf, in flattening order
    floating: list[int]  # index in ``values`` of each of ``leaves``
    paths: list[str]  # every leaf's path
    treedef: Any
    graphdef: Any = None  # nnx only

    @classmethod
    def of(cls, module: Any, variables: Any) -> _State:
        import jax

        graphdef = None
        if _is_nnx(module):
            from flax import nnx

            if variables is not None:
                raise GhnOnnxError("an nnx model holds its own variables: call init(model, None, x)")
            graphdef, variables = nnx.split(module)
        elif variables is None:
            raise GhnOnnxError(f"Expected the variables of {type(module).__name__} (from module.init), got None")
        flat, treedef = jax.tree_util.tree_flatten_with_path(variables)
        paths = [_path(p) for p, _ in flat]
        values = [v for _, v in flat]
        leaves, floating, offset = [], [], 0
        for i, (path, v) in enumerate(zip(paths, values)):
            if hasattr(v, "dtype") and np.issubdtype(np.dtype(v.dtype), np.floating):
                leaves.append(Leaf(path, tuple(int(d) for d in v.shape), offset))
                floating.append(i)
                offset += leaves[-1].size
        if offset > MAX_MARKED_ELEMENTS:
            raise GhnOnnxError(f"{offset:,} variable elements: at most {MAX_MARKED_ELEMENTS:,} can be marked")
        return cls(leaves, values, floating, paths, treedef, graphdef)

    def float_values(self) -> list[np.ndarray]:
        return [np.asarray(self.values[i], np.float32) for i in self.floating]

    def pytree(self, floats: Sequence[Any]) -> Any:
        """The variables (nnx: the state) with the floating leaves replaced by ``floats``."""
        import jax

        values = list(self.values)
        for i, v in zip(self.floating, floats):
            values[i] = v
        return jax.tree_util.tree_unflatten(self.treedef, values)

    def rebuild(self, new: Mapping[str, np.ndarray]) -> Any:
        """The variables (nnx: the state) with the leaves named in ``new`` replaced, each in its
        own dtype."""
        import jax.numpy as jnp

        return self.pytree([jnp.asarray(new[leaf.path], dtype=self.values[i].dtype) if leaf.path in new
                            else self.values[i] for leaf, i in zip(self.leaves, self.floating)])

    def result(self, tree: Any) -> Any:
        """What :func:`init` returns for ``tree``: the variables, or an nnx model built from the state."""
        if self.graphdef is None:
            return tree
        from flax import nnx

        return nnx.merge(self.graphdef, tree)


def _is_nnx(module: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:
        return False
    return isinstance(module, nnx.Module)


def _path(keys: Iterable[Any]) -> str:
    parts = []
    for k in keys:
        part = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(part))
    if len(parts) > 1 and parts[-1] == "value":  # nnx: the Variable's value field
        parts.pop()
    return "/".join(parts)


# -- matching (the markers: ghn_onnx.writeback.markers) ---------------------------------------------

def match_leaves(model: onnx.ModelProto, leaves: Sequence[Leaf], tensors: Iterable[str]) -> list[Match]:
    """The leaf behind each of ``tensors`` (stored tensors of the marker export ``model``), as
    :func:`~ghn_onnx.writeback.markers.find_leaves` finds it: a tensor is a leaf's when its
    elements are the markers of that leaf's elements, each once, in any order;
    :attr:`Match.transpose` names the order.

    Raises:
        GhnOnnxError: as :func:`~ghn_onnx.writeback.markers.find_leaves` (a tensor that is not one
            whole leaf, two tensors for one leaf), listing every such tensor.
    """
    return [Match(t, path, order) for t, path, order in find_leaves(model, leaves, tensors)]


# -- export and copy -------------------------------------------------------------------------------

def export(module: Any, state: _State, example_input: Any, apply_kwargs: Mapping[str, Any] | None = None
           ) -> onnx.ModelProto:
    """The jax2onnx export of ``module`` on marker variables (:func:`markers`), inputs as
    ``example_input`` with a dynamic first dimension for floating inputs."""
    import jax
    from jax2onnx import to_onnx

    args = _inputs(example_input)
    specs = [("B", *a.shape[1:]) if np.issubdtype(a.dtype, np.floating) and a.ndim
             else jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    apply, tree = _apply(module, state.graphdef, _kwargs(apply_kwargs)), state.pytree(markers(state.leaves))
    fn = lambda *x: apply(tree, *x)  # noqa: E731 -- the variables are constants of the export
    try:
        with _without_equinox_plugins():
            model = to_onnx(fn, specs, model_name=type(module).__name__)
    except Exception as exc:  # jax and jax2onnx raise many types; all mean "cannot be exported"
        raise GhnOnnxError(f"{type(module).__name__}: the jax2onnx export failed: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    # jax2onnx (0.17) keeps the NHWC shapes of intermediate tensors in value_info after it moves
    # ops between its layout Transposes (a Relu computed in NCHW is declared NHWC; onnxruntime
    # warns "Error merging shape info"); shapes are inferred from the nodes instead.
    del model.graph.value_info[:]
    return model


# jax2onnx imports every plugin tree before its first export. Its equinox plugins build equinox
# modules at import, dozens of XLA compilations (~30 s of a first export on a loaded 2-core
# machine, README "Flax / JAX"), and its examples tree only registers test cases: a Flax model needs
# neither. These trees are left out of the first export only: the flag is reset afterwards, so a
# later jax2onnx export in the process imports them as usual (the others are in sys.modules by then).
SKIPPED_PLUGIN_TREES = frozenset({"equinox", "examples"})


@contextlib.contextmanager
def _without_equinox_plugins():
    try:
        from jax2onnx.plugins import plugin_system
    except ImportError:
        yield
        return
    if getattr(plugin_system, "_already_imported_plugins", True) or not hasattr(plugin_system, "_import_tree"):
        yield  # imported already, or a jax2onnx whose discovery works otherwise: leave it alone
        return
    root = Path(plugin_system.__file__).parent
    for tree in sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        if tree not in SKIPPED_PLUGIN_TREES:
            plugin_system._import_tree(root / tree, f"jax2onnx.plugins.{tree}")
    plugin_system._already_imported_plugins = True
    try:
        yield
    finally:
        plugin_system._already_imported_plugins = False


def _inputs(example_input: Any) -> list[np.ndarray]:
    args = list(example_input) if isinstance(example_input, (tuple, list)) else [example_input]
    if not args or not all(hasattr(a, "shape") and hasattr(a, "dtype") for a in args):
        raise GhnOnnxError(f"Expected example_input as an array or a tuple of arrays (got {type(example_input)})")
    return [np.asarray(a, np.float32) if np.issubdtype(np.dtype(a.dtype), np.floating) else np.asarray(a)
            for a in args]


def _kwargs(apply_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((apply_kwargs or {}).items()))


def _apply(module: Any, graphdef: Any, kwargs: tuple[tuple[str, Any], ...]) -> Callable:
    """The inference call ``f(variables, *x)``: ``module.apply(variables, *x, **kwargs)``; nnx:
    the model merged from ``graphdef`` and the state ``variables``, called on ``x``."""
    if graphdef is not None:
        from flax import nnx

        return lambda state, *x: nnx.merge(graphdef, state)(*x, **dict(kwargs))
    return lambda variables, *x: module.apply(variables, *x, **dict(kwargs))


@functools.lru_cache(maxsize=8)
def _jitted(module: Any, graphdef: Any, kwargs: tuple[tuple[str, Any], ...]) -> Callable:
    """:func:`_apply` compiled once per model and input shapes, not once per :func:`init` call."""
    import jax

    return jax.jit(_apply(module, graphdef, kwargs))


def copy_prediction(state: _State, prediction: Prediction, exported: onnx.ModelProto
                    ) -> tuple[dict[str, np.ndarray], Report]:
    """Leaf path → new value, for every predicted leaf and (calibrated) BN statistic, and the
    :class:`Report`. Every predicted tensor is matched first; a failure raises before anything
    is returned."""
    leaves = {leaf.path: leaf for leaf in state.leaves}
    matches = match_leaves(exported, state.leaves, list(resolve_shared(prediction.graph)))
    marked = marked_tensors(exported, state.leaves)
    values = stored_tensors(prediction.model)
    new = {m.leaf: to_leaf(numpy_helper.to_array(values[m.tensor]), marked[m.tensor], leaves[m.leaf])
           for m in matches}
    calibrated = prediction.bn_status.startswith("calibrated")
    stats = _statistics(prediction.model, prediction.graph, exported, state, marked) if calibrated else {}
    new.update(stats)
    predicted = {m.leaf: m for m in matches}
    kept = _kept(state, set(predicted) | set(stats), exported, marked, prediction.bn_status)
    return new, Report(predicted=predicted, kept=kept, statistics=list(stats), bn_status=prediction.bn_status,
                       warnings=list(prediction.warnings), prediction=prediction, unit="leaves",
                       statistics_unit="leaves")


def _statistics(model: onnx.ModelProto, graph: Graph, exported: onnx.ModelProto, state: _State,
                marked: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Leaf path → calibrated value, for the statistics of every calibrated BN of ``model``; in
    the export its BN node reads marker tensors."""
    found = calibrated_statistics(model, graph, exported)
    try:
        matches = match_leaves(exported, state.leaves, [name for _, name, _ in found])
    except GhnOnnxError as exc:
        raise GhnOnnxError(f"calibrated BN statistics: {exc}") from None
    leaves = {leaf.path: leaf for leaf in state.leaves}
    return {m.leaf: to_leaf(v, marked[m.tensor], leaves[m.leaf]) for m, (_, _, v) in zip(matches, found)}


def _kept(state: _State, done: set[str], exported: onnx.ModelProto, marked: Mapping[str, np.ndarray],
          bn_status: str) -> dict[str, str]:
    """Every leaf not set (predicted or calibrated) → why it kept its value."""
    holders: dict[str, list[str]] = defaultdict(list)  # leaf → the stored tensors holding its markers
    for name, index in marked.items():
        for leaf in owners(index, state.leaves):
            holders[leaf.path].append(name)
    floating = {leaf.path for leaf in state.leaves}
    reasons = kept_reasons({p: holders[p] for p in floating - done}, exported, bn_status)
    return {path: "not a floating-point array" if path not in floating else reasons[path]
            for path in state.paths if path not in done}


def _verify(module: Any, state: _State, tree: Any, example_input: Any, apply_kwargs: Mapping[str, Any] | None,
            model: onnx.ModelProto) -> None:
    """The Flax forward with variables ``tree`` equals onnxruntime on ``model``, on ``example_input``."""
    import jax

    from ghn_onnx.threads import inference_session

    args = _inputs(example_input)
    kwargs = _kwargs(apply_kwargs)
    try:
        try:
            forward = _jitted(None if state.graphdef is not None else module, state.graphdef, kwargs)
        except TypeError:  # a module or an argument that cannot be hashed: compiled for this call only
            forward = jax.jit(_apply(module, state.graphdef, kwargs))
        outputs = forward(tree, *args)
    except Exception as exc:  # flax raises many types (a collection not mutable, shapes...)
        raise GhnOnnxError(f"{type(module).__name__}: the Flax forward failed: {' '.join(str(exc).split())[:300]}"
                           ) from None
    expected = [np.asarray(y, np.float64) for y in jax.tree_util.tree_leaves(outputs)]
    sess = inference_session(model, log_level=2)
    got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), args)})
    for k, (y, o) in enumerate(zip(expected, got)):
        scale = max(1.0, float(np.abs(y).max(initial=0.0)))
        diff = float(np.abs(y - o).max(initial=0.0)) if y.shape == o.shape else float("inf")
        if not diff <= 1e-3 * scale:
            raise GhnOnnxError(f"{type(module).__name__}: output {k} of the Flax forward with the predicted "
                               f"variables differs from onnxruntime on the predicted ONNX model (max difference "
                               f"{diff:.3g}, shapes {y.shape} and {o.shape}): the export's tensors were not "
                               "mapped back to the variables correctly")
