"""Where an ONNX model keeps its tensors, and how to overwrite one without touching anything else.

A *stored tensor* is an initializer or the ``value`` attribute of a ``Constant`` node; both are
addressed by the name a consumer sees (the initializer name or the Constant's output). Both the
write-back of predictions (:mod:`ghn_onnx.writeback.write`) and BN calibration
(:mod:`ghn_onnx.bn.calibration`) replace values through :func:`set_tensor_values`, which keeps the
tensor's name, dims, element type and position and only swaps its data.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import topological_order

FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE})
# Every field a TensorProto can hold its values in: cleared before the new raw_data is set, so a
# tensor that was stored as float_data / int32_data (fp16, bf16) does not keep stale values.
DATA_FIELDS = frozenset({"float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                         "string_data", "raw_data", "external_data", "data_location"})


def stored_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Name → the TensorProto that holds it (a reference into ``model``, so writes go through).

    Covers initializers and ``Constant`` nodes with a tensor ``value`` in the main graph.
    """
    out: dict[str, onnx.TensorProto] = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    out.setdefault(node.output[0], a.t)
    return out


def np_dtype(elem_type: int) -> np.dtype:
    """The numpy dtype of an ONNX element type (``ml_dtypes.bfloat16`` for BFLOAT16)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def tensor_nbytes(t: onnx.TensorProto) -> int | None:
    """Bytes of ``t``'s values as its dims and element type say (None for a type numpy lacks)."""
    try:
        itemsize = np_dtype(t.data_type).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return math.prod(t.dims) * itemsize


def cast_to_stored(values: np.ndarray, elem_type: int, what: str) -> np.ndarray:
    """Cast float values to ``elem_type`` with round-to-nearest-even (numpy for fp16/fp64,
    ml_dtypes for bf16), refusing values that overflow the stored type."""
    if elem_type not in FLOAT_TYPES:
        raise GhnOnnxError(f"{what}: expected a float tensor (got ONNX element type "
                           f"{onnx.TensorProto.DataType.Name(elem_type)})")
    with np.errstate(over="ignore"):  # overflow is reported below, with the tensor's name
        out = np.asarray(values).astype(np_dtype(elem_type), copy=False)
    # numpy's own floats test directly; bf16 (ml_dtypes) through float32, which holds it exactly
    if not np.all(np.isfinite(out if out.dtype.kind == "f" else out.astype(np.float32))):
        raise GhnOnnxError(f"{what}: values overflow {onnx.TensorProto.DataType.Name(elem_type)} "
                           f"(max |value| {float(np.max(np.abs(values))):.4g})")
    return out


def set_tensor_values(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Replace the data of ``tensor`` in place; name, dims, element type, doc string and the
    tensor's position in the model are kept.

    Args:
        tensor: the TensorProto to overwrite (from :func:`stored_tensors`).
        values: array of exactly ``tensor.dims`` and ``tensor.data_type``'s numpy dtype.
    """
    dims = tuple(int(d) for d in tensor.dims)
    if tuple(values.shape) != dims:
        raise GhnOnnxError(f"{tensor.name!r}: expected stored shape {dims} (got {tuple(values.shape)})")
    if values.dtype != np_dtype(tensor.data_type):
        raise GhnOnnxError(f"{tensor.name!r}: expected dtype {np_dtype(tensor.data_type)} (got {values.dtype})")
    if sys.byteorder == "little":  # raw_data is little-endian: the array's bytes as they are
        raw = np.ascontiguousarray(values).tobytes()
    else:
        raw = numpy_helper.from_array(np.ascontiguousarray(values)).raw_data
    # Inline data from now on: an external reference would point into the *input's* data file.
    # (ClearField rather than assigning DEFAULT: an unset field stays unset, byte for byte.)
    for f in sorted(DATA_FIELDS):
        tensor.ClearField(f)
    tensor.raw_data = raw


def is_batch_norm(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in ("", "ai.onnx")


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken``; added to it."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def consumer_counts(model: onnx.ModelProto) -> Counter:
    """How many node input slots read each name (a graph output counts as one more reader)."""
    uses: Counter = Counter(i for n in model.graph.node for i in n.input if i)
    uses.update(o.name for o in model.graph.output)
    return uses


def untie_aliases(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Give every ``Identity`` alias of a stored tensor a stored tensor of its own.

    PyTorch's TorchScript exporter merges parameters with identical values into one initializer
    and re-creates the other names with ``Identity`` nodes. A freshly initialised network thus
    has every BN weight, and every BN ``running_var``, reading the same all-ones tensor. Those
    tensors are tied only by coincidence of their initial values: a GHN predicts different values
    for each, and calibration writes running statistics that must not land in a BN scale. Run this
    before converting the model so each parameter is its own stored tensor.

    Genuinely shared parameters (one initializer consumed directly by several nodes) stay shared.

    Returns:
        a new model and the names that became initializers; the input model itself, unmodified,
        when there is nothing to untie.
    """
    stored_in = stored_tensors(model)
    inputs_in = {i.name for i in model.graph.input}
    if not any(n.op_type == "Identity" and n.domain in ("", "ai.onnx") and n.input and n.input[0] in stored_in
               and n.input[0] not in inputs_in and n.output[0] not in stored_in for n in model.graph.node):
        return model, []  # nothing to untie: no copy (the model is still not modified)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    stored = stored_tensors(out)
    graph_inputs = {i.name for i in g.input}
    keep: list[onnx.NodeProto] = []
    untied: list[str] = []
    new_inits: list[onnx.TensorProto] = []
    for node in g.node:  # topological order, so chains Identity(Identity(w)) resolve in turn
        src = node.input[0] if node.input else ""
        if (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and src in stored
                and src not in graph_inputs and node.output[0] not in stored):
            t = onnx.TensorProto()
            t.CopyFrom(stored[src])
            t.name = node.output[0]
            new_inits.append(t)
            stored[t.name] = t
            untied.append(t.name)
            continue
        keep.append(node)
    if not untied:
        return out, []
    del g.node[:]
    g.node.extend(keep)
    g.initializer.extend(new_inits)
    return out, untied


ALIAS_OPS = frozenset({"Identity", "Cast"})


def alias_source(name: str, stored, producer: dict[str, onnx.NodeProto]) -> str | None:
    """The stored tensor that ``name`` reads through ``Identity`` / ``Cast`` nodes, or None."""
    seen = set()
    while name and name not in stored:
        node = producer.get(name)
        if node is None or node.op_type not in ALIAS_OPS or not node.input or name in seen:
            return None
        seen.add(name)
        name = node.input[0]
    return name or None


def topological_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in topological order. ONNX asks for it but not every exporter keeps
    it, so sort defensively (ties keep file order)."""
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    edges = [(producer[x], j) for j, n in enumerate(nodes) for x in n.input if x in producer and producer[x] != j]
    try:
        order = topological_order(len(nodes), edges)
    except ValueError:
        raise GhnOnnxError("the ONNX graph has a cycle") from None
    return [nodes[i] for i in order]
