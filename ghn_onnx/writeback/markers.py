"""Which stored tensor of an export holds which variable, when the exporter's names cannot say.

An exporter that names initializers anonymously (jax2onnx: ``const_12``, ``kernel_oih_0``) and
stores kernels transposed leaves neither names nor positions to map a predicted tensor back to
the variable it came from. So the model is exported on *marker* variables: every element of
every floating variable ("leaf") gets its own float32 value, ``2**-100`` upwards in steps of one
unit in the last place (no model constant is that small), so each stored element says which
leaf and which element it came from (:func:`marker_index`). A stored tensor whose elements are
exactly the elements of one leaf, in any order, is that leaf, stored permuted
(:func:`find_leaves`); :func:`to_leaf` undoes the permutation. :func:`substitute` turns the
marker export into the export of the real values.

Nothing here knows a framework: leaves are paths, shapes and offsets (``ghn_onnx.flax`` builds
them from a pytree), values are numpy arrays.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.onnx_io.storage import stored_tensors
from ghn_onnx.writeback.live import raise_unmatched, tensors_per_variable

# float32 bits of 2**-100: markers are 2**-100, its next float up, ... (2**-100 .. ~2**-60 for
# 335 million elements). Far below any epsilon, scale or bound a model stores as a constant.
MARKER_BASE = 0x0D800000
MAX_MARKED_ELEMENTS = 0x1F800000 - MARKER_BASE  # up to 2**-64: markers stay normal, tiny floats

# How a stored tensor orders its leaf's elements: None (as is), an axes permutation
# (``np.transpose(leaf, order)``), "reshaped" (same element order, another shape) or "reordered".
Order = tuple[int, ...] | str | None


@dataclass(frozen=True)
class Leaf:
    """One floating variable, as the export saw it.

    Attributes:
        path: its name (``/``-joined keys of a pytree: ``params/Conv_0/kernel``).
        shape: its shape.
        offset: the marker index of its first element (leaves are marked one after another).
    """

    path: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


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


def owners(index: np.ndarray, leaves: Sequence[Leaf]) -> list[Leaf]:
    """The leaves whose markers ``index`` holds, in leaf order."""
    starts = np.array([leaf.offset for leaf in leaves], dtype=np.int64)
    return [leaves[int(k)] for k in np.unique(np.searchsorted(starts, index.ravel(), side="right") - 1)]


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


def find_leaves(model: onnx.ModelProto, leaves: Sequence[Leaf], tensors: Iterable[str]
                ) -> list[tuple[str, str, Order]]:
    """``(tensor, leaf path, order)`` for each of ``tensors`` (stored tensors of the marker
    export ``model``): a tensor is a leaf's when its elements are the markers of that leaf's
    elements, each once, in any order; ``order`` says which order.

    Raises:
        GhnOnnxError: a tensor that is not a marker tensor (computed by the export, or a
            constant), one made of part of a leaf or of several leaves, or two tensors for one
            leaf. The message lists every such tensor.
    """
    marked = marked_tensors(model, leaves)
    problems, found = [], []
    for t in tensors:
        index = marked.get(t)
        if index is None:
            problems.append(f"{t!r} holds no variable's values (the export computed it, or it is a constant)")
            continue
        held = owners(index, leaves)
        leaf = held[0]
        if len(held) > 1 or index.size != leaf.size or len(np.unique(index)) != leaf.size:
            which = ", ".join(repr(h.path) for h in held[:4])
            problems.append(f"{t!r} {tuple(index.shape)} holds part of {which}, not one whole variable")
            continue
        found.append((t, leaf.path, order_of(index - leaf.offset, leaf.shape)))
    problems += tensors_per_variable([(t, path) for t, path, _ in found])
    raise_unmatched(problems, "copied into the variables")
    return found


def order_of(index: np.ndarray, shape: tuple[int, ...]) -> Order:
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
