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
import dataclasses
import functools
import itertools
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.bn.calibration import calibrate_bn, calibration_targets, iter_batches
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.onnx_io.storage import alias_source, is_batch_norm, stored_tensors
from ghn_onnx.pipeline import Prediction, PredictOptions, load_ghn, predict
from ghn_onnx.torch import NOT_OPTIONS, _calibrate_on_inputs
from ghn_onnx.writeback.write import resolve_shared

# float32 bits of 2**-100: markers are 2**-100, its next float up, ... (2**-100 .. ~2**-60 for
# 335 million elements). Far below any epsilon, scale or bound a model stores as a constant.
MARKER_BASE = 0x0D800000
MAX_MARKED_ELEMENTS = 0x1F800000 - MARKER_BASE  # up to 2**-64: markers stay normal, tiny floats

CalibrationData = str | os.PathLike | np.ndarray


@dataclass(frozen=True)
class Leaf:
    """One floating leaf of the variables, as the export saw it.

    Attributes:
        path: ``/``-joined keys, as ``flax.traverse_util.flatten_dict(..., sep="/")`` writes them
            (``params/Conv_0/kernel``; nnx: ``conv1/kernel``).
        shape: the leaf's shape.
        offset: the marker index of its first element (leaves are marked in flattening order).
    """

    path: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


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
    transpose: tuple[int, ...] | str | None = None


@dataclass
class Report:
    """What :func:`init` did.

    Attributes:
        predicted: leaf path → the :class:`Match` it was copied from, in GHN graph order.
        kept: leaf path → why it kept its value (every leaf not in ``predicted`` or ``statistics``).
        statistics: BN statistics leaves set from calibration.
        bn_status: as :attr:`Prediction.bn_status` (``none``, ``uncalibrated``, ``calibrated:<images>``).
        warnings: the prediction's warnings (how the graph was read, calibration notes).
        prediction: the predicted ONNX model (:class:`~ghn_onnx.pipeline.Prediction`); the Flax
            forward with the returned variables equals onnxruntime on it.
    """

    predicted: dict[str, Match]
    kept: dict[str, str]
    statistics: list[str]
    bn_status: str
    warnings: list[str] = field(default_factory=list)
    prediction: Prediction | None = field(default=None, repr=False)

    def format(self) -> str:
        """A few lines for people: counts, BN status, every kept leaf with its reason."""
        total = len(self.predicted) + len(self.kept) + len(self.statistics)
        lines = [f"predicted {len(self.predicted)} of {total} leaves; BN {self.bn_status}"
                 + (f" ({len(self.statistics)} statistics leaves set)" if self.statistics else "")]
        lines += [f"kept its value: {path}: {why}" for path, why in self.kept.items()]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


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
            ``batch_size``, ``seed``, ``mean``, ``std``, ``no_normalize``, ``device``, ``metadata``).

    Returns:
        the new variables (same tree structure and dtypes; nnx: a new model), or
        ``(variables, Report)`` with ``return_report=True``.

    Raises:
        GhnOnnxError: the model cannot be exported or predicted, bad calibration data, a predicted
            tensor that is not one leaf, a forward that does not match the predicted ONNX model.
        TypeError: an unknown option, or ``unfold_bn`` / ``calibrate`` given as an option.
    """
    _check_options(predict_options)
    state = _State.of(module, variables)
    exported = export(module, state, example_input, apply_kwargs)
    real = substitute(exported, state.leaves, state.float_values())
    ghn = checkpoint if isinstance(checkpoint, GHN) or checkpoint is None else load_ghn(
        checkpoint, predict_options.get("device") or "cpu")
    by_path = calibrate if isinstance(calibrate, (str, os.PathLike)) else None
    pred = predict(real, ghn, name=type(module).__name__, calibrate=by_path, **predict_options)
    if calibrate is not None and by_path is None:
        _calibrate_on_inputs(pred, np.asarray(calibrate, np.float32),
                             predict_options.get("batch_size", PredictOptions.batch_size))
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
    ``calibration_images``, ``batch_size``, ``seed``, ``mean``, ``std``, ``no_normalize``.
    A model without BatchNormalization comes back as given.

    Raises:
        GhnOnnxError: the model cannot be exported, bad calibration data, statistics that are
            not one leaf each, a forward that does not match the calibrated ONNX model.
        TypeError: an option that does not apply.
    """
    known = {"calibration_images", "batch_size", "seed", "mean", "std", "no_normalize"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")
    state = _State.of(module, variables)
    exported = export(module, state, example_input, apply_kwargs)
    real = substitute(exported, state.leaves, state.float_values())
    if not calibration_targets(real):
        return state.result(state.rebuild({}))
    if isinstance(data, (str, os.PathLike)):
        batches = PredictOptions(calibrate=data, **options).calibration_set(real).batches
    else:
        batches = list(iter_batches(np.asarray(data, np.float32), options.get("batch_size", PredictOptions.batch_size)))
    model = calibrate_bn(real, batches)
    tree = state.rebuild(_statistics(model, None, exported, state, marked_tensors(exported, state.leaves)))
    if verify:
        _verify(module, state, tree, example_input, apply_kwargs, model)
    return state.result(tree)


def _check_options(options: Mapping[str, Any]) -> None:
    bad = sorted(NOT_OPTIONS & set(options))
    if bad:
        raise TypeError(f"init does not take {', '.join(bad)} as an option (it exports with BN kept; pass "
                        "calibration data as calibrate=)")
    known = {f.name for f in dataclasses.fields(PredictOptions)} - NOT_OPTIONS
    unknown = sorted(set(options) - known)
    if unknown:  # before the export, which takes seconds
        raise TypeError(f"unknown option(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}")


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


# -- markers ---------------------------------------------------------------------------------------

def markers(leaves: Sequence[Leaf]) -> list[np.ndarray]:
    """The marker value of every element of every leaf (float32, leaf shapes)."""
    return [(np.arange(leaf.offset, leaf.offset + leaf.size, dtype=np.uint32) + np.uint32(MARKER_BASE))
            .view(np.float32).reshape(leaf.shape) for leaf in leaves]


def marker_index(value: np.ndarray, total: int) -> np.ndarray | None:
    """The marker index of each element of ``value`` (int64, same shape), or None when any
    element is not a marker of the ``total`` marked elements."""
    if value.dtype != np.float32 or value.size == 0:
        return None
    index = value.view(np.uint32).astype(np.int64) - MARKER_BASE
    return index if bool(((index >= 0) & (index < total)).all()) else None


def marked_tensors(model: onnx.ModelProto, leaves: Sequence[Leaf]) -> dict[str, np.ndarray]:
    """Stored tensor name → marker index of each of its elements, for every stored tensor of the
    marker export made of markers only (a leaf, permuted, sliced or gathered from several)."""
    total = leaves[-1].offset + leaves[-1].size if leaves else 0
    out = {}
    for name, proto in stored_tensors(model).items():
        index = marker_index(numpy_helper.to_array(proto), total)
        if index is not None:
            out[name] = index
    return out


def substitute(model: onnx.ModelProto, leaves: Sequence[Leaf], values: Sequence[np.ndarray]) -> onnx.ModelProto:
    """A copy of the marker export ``model`` with every marker replaced by the element of
    ``values`` (one float32 array per leaf) it marks: the export of the real variables."""
    flat = np.concatenate([np.asarray(v, np.float32).ravel() for v in values]) if values else np.zeros(0, np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    stored = stored_tensors(out)
    for name, index in marked_tensors(model, leaves).items():
        stored[name].CopyFrom(numpy_helper.from_array(flat[index], name))
    return out


# -- matching --------------------------------------------------------------------------------------

def match_leaves(model: onnx.ModelProto, leaves: Sequence[Leaf], tensors: Iterable[str]) -> list[Match]:
    """The leaf behind each of ``tensors`` (stored tensors of the marker export ``model``).

    A tensor is a leaf's when its elements are the markers of that leaf's elements, each once,
    in any order; :attr:`Match.transpose` names the order.

    Raises:
        GhnOnnxError: a tensor that is not a marker tensor (computed by the export, or a
            constant), one made of part of a leaf or of several leaves, or two tensors for one
            leaf. The message lists every such tensor.
    """
    marked = marked_tensors(model, leaves)
    starts = np.array([leaf.offset for leaf in leaves], dtype=np.int64)
    problems, matches = [], []
    for t in tensors:
        index = marked.get(t)
        if index is None:
            problems.append(f"{t!r} holds no variable's values (the export computed it, or it is a constant)")
            continue
        owners = np.unique(np.searchsorted(starts, index.ravel(), side="right") - 1)
        leaf = leaves[int(owners[0])]
        if len(owners) > 1 or index.size != leaf.size or len(np.unique(index)) != leaf.size:
            which = ", ".join(repr(leaves[int(k)].path) for k in owners[:4])
            problems.append(f"{t!r} {tuple(index.shape)} holds part of {which}, not one whole variable")
            continue
        matches.append(Match(t, leaf.path, _order(index - leaf.offset, leaf.shape)))
    owner: dict[str, list[str]] = defaultdict(list)
    for m in matches:
        owner[m.leaf].append(m.tensor)
    problems += [f"tensors {', '.join(map(repr, ts))} are all predictions for {leaf!r}"
                 for leaf, ts in owner.items() if len(ts) > 1]
    if problems:
        more = f"; ... and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise GhnOnnxError(f"{len(problems)} predicted tensor(s) cannot be copied into the variables: "
                           + "; ".join(problems[:5]) + more)
    return matches


def _order(index: np.ndarray, shape: tuple[int, ...]) -> tuple[int, ...] | str | None:
    """How ``index`` (element ``i`` of the tensor is element ``index[i]`` of the leaf) orders the
    leaf: None (as is), ``"reshaped"``, an axes permutation, or ``"reordered"``."""
    if np.array_equal(index.ravel(), np.arange(index.size)):
        return None if index.shape == shape else "reshaped"
    if len(shape) <= 5:
        base = np.arange(index.size).reshape(shape)
        for perm in itertools.permutations(range(len(shape))):
            moved = base.transpose(perm)
            if moved.shape == index.shape and np.array_equal(moved, index):
                return perm
    return "reordered"


def to_leaf(value: np.ndarray, index: np.ndarray, leaf: Leaf) -> np.ndarray:
    """The leaf's values from a tensor stored in marker order ``index`` (a permutation of the leaf)."""
    out = np.empty(leaf.size, dtype=value.dtype)
    out[index.ravel() - leaf.offset] = value.ravel()
    return out.reshape(leaf.shape)


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
    kept = _kept(state, set(predicted) | set(stats), exported, marked)
    return new, Report(predicted=predicted, kept=kept, statistics=list(stats), bn_status=prediction.bn_status,
                       warnings=list(prediction.warnings), prediction=prediction)


def _bn_statistics(model: onnx.ModelProto) -> dict[str, str]:
    """Stored tensor → the output of the BatchNormalization that reads it as mean or variance."""
    return {node.input[k]: node.output[0] for node in model.graph.node if is_batch_norm(node) for k in (3, 4)}


def _statistics(model: onnx.ModelProto, graph: Graph | None, exported: onnx.ModelProto, state: _State,
                marked: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Leaf path → calibrated value, for the statistics of every BN of ``model`` (calibrated;
    restricted to ``graph``'s BNs when given). A BN node keeps its output name through prediction
    and calibration; in the export it reads marker tensors."""
    source = {n.output[0]: n for n in exported.graph.node if is_batch_norm(n)}
    stored = stored_tensors(model)
    producer = {o: n for n in model.graph.node for o in n.output if o}
    targets = set(calibration_targets(model, graph))
    tensors, values = [], []
    for node in model.graph.node:
        if not is_batch_norm(node) or (node.name or node.output[0]) not in targets:
            continue
        if node.output[0] not in source:
            raise GhnOnnxError(f"BatchNormalization {node.output[0]!r} of the prediction is not in the export")
        for k in (3, 4):
            tensors.append(source[node.output[0]].input[k])
            values.append(numpy_helper.to_array(stored[alias_source(node.input[k], stored, producer)]))
    try:
        matches = match_leaves(exported, state.leaves, tensors)
    except GhnOnnxError as exc:
        raise GhnOnnxError(f"calibrated BN statistics: {exc}") from None
    leaves = {leaf.path: leaf for leaf in state.leaves}
    return {m.leaf: to_leaf(v, marked[m.tensor], leaves[m.leaf]) for m, v in zip(matches, values)}


def _kept(state: _State, done: set[str], exported: onnx.ModelProto, marked: Mapping[str, np.ndarray]
          ) -> dict[str, str]:
    """Every leaf not set (predicted or calibrated) → why it kept its value."""
    readers: dict[str, set[str]] = defaultdict(set)
    for node in exported.graph.node:
        for x in node.input:
            readers[x].add(node.op_type)
    statistics = _bn_statistics(exported)
    starts = np.array([leaf.offset for leaf in state.leaves], dtype=np.int64)
    where: dict[str, list[str]] = defaultdict(list)  # leaf → the stored tensors holding its markers
    for name, index in marked.items():
        for k in np.unique(np.searchsorted(starts, index.ravel(), side="right") - 1):
            where[state.leaves[int(k)].path].append(name)
    floating = {leaf.path for leaf in state.leaves}
    kept = {}
    for path in state.paths:
        if path in done:
            continue
        if path not in floating:
            kept[path] = "not a floating-point array"
        elif not where[path]:
            kept[path] = "not in the ONNX export (unused by the forward, or computed into another tensor)"
        elif any(t in statistics for t in where[path]):
            kept[path] = "BN running statistics: never predicted (calibrate= measures them)"
        else:
            ops = ", ".join(sorted(set().union(*(readers[t] for t in where[path])))) or "nothing"
            kept[path] = f"read by {ops}: no GHN node predicts it"
    return kept


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
