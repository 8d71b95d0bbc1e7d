"""An index over an ONNX graph: who produces and consumes each tensor, which tensors carry data
(depend on a graph input) and which are stored constants, and how a node input traces back to
the stored tensor it comes from (through Transpose / Reshape / Cast / Identity / Constant)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.graph.graph import Layout, LayoutStep

# Ops that only move, rename or re-type values: followed when tracing a parameter back to its
# storage, and looked through when matching gates and attention.
SHAPE_ONLY_OPS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose",
    "Expand", "Dropout",
})
# Ops whose output describes a tensor's shape rather than its values.
METADATA_OPS = frozenset({"Shape", "Size"})
# Initializers up to this many elements (shapes, axes, scalars) keep their values for shape inference.
SMALL_TENSOR = 64
# Ops folded when a static value (a Reshape target) is computed rather than stored, and how deep.
SHAPE_FOLDED_OPS = frozenset({"Concat", "Unsqueeze", "Squeeze"})
SHAPE_FOLD_DEPTH = 8


@dataclass(frozen=True)
class StoredTensor:
    """Where a node input's value is stored and how to get from that storage to the input."""

    name: str  # initializer name, or output name of a Constant node
    dtype: int
    shape: tuple[int, ...]
    layout: Layout  # stored -> the value the consuming node sees

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                              onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)


class TensorIndex:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.graph = g
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in g.initializer}
        self.constants: dict[str, onnx.TensorProto] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
            if node.op_type == "Constant" and node.output:
                value = next((a for a in node.attribute if a.name == "value"), None)
                if value is not None and value.type == onnx.AttributeProto.TENSOR:
                    self.constants[node.output[0]] = value.t
        self.inputs = [i.name for i in g.input if i.name not in self.initializers]
        self.outputs = [o.name for o in g.output]
        self.ranks = _ranks(model)
        self._data: dict[str, bool] = {}
        # The rules ask the same questions of a node many times; the graph never changes.
        self._data_inputs: dict[int, tuple[onnx.NodeProto, tuple[str, ...]]] = {}
        self._stored: dict[str, StoredTensor | None] = {}

    # -- data flow ---------------------------------------------------------------------------
    def is_data(self, name: str) -> bool:
        """True if the tensor's values depend on a graph input (activations, not weights).

        Raises:
            GhnOnnxError: the tensor depends on a cycle (:func:`~ghn_onnx.onnx_io.loading.load_model`
                refuses such graphs; this guards models built in memory).
        """
        if not name:
            return False
        if name in self._data:
            return self._data[name]
        stack = [name]
        expanded: set[str] = set()  # waiting for their inputs: met again as an input means a cycle
        while stack:  # iterative post-order: graphs can be thousands of nodes deep
            t = stack[-1]
            if t in self._data:
                stack.pop()
                continue
            if t in self.inputs:
                self._data[t] = True
            elif t in self.initializers or t in self.constants or t not in self.producer:
                self._data[t] = False
            else:
                node = self.producer[t]
                if node.op_type in METADATA_OPS:
                    self._data[t] = False
                else:
                    pending = [i for i in node.input if i and i not in self._data]
                    if pending:
                        if t in expanded or any(i in expanded for i in pending):
                            raise GhnOnnxError(f"the ONNX graph has a cycle through tensor {t!r}")
                        expanded.add(t)
                        stack.extend(pending)
                        continue
                    self._data[t] = any(self._data.get(i, False) for i in node.input if i)
            expanded.discard(t)
            stack.pop()
        return self._data[name]

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        found = self._data_inputs.get(id(node))
        if found is None or found[0] is not node:  # the node is kept: its id is not reused
            found = self._data_inputs[id(node)] = (node, tuple(i for i in node.input if i and self.is_data(i)))
        return list(found[1])

    def through_shape_ops(self, name: str) -> str:
        """Follow a data tensor upwards through shape-only ops to the tensor they re-view."""
        seen = {name}
        while name in self.producer and self.producer[name].op_type in SHAPE_ONLY_OPS:
            node = self.producer[name]
            if not node.input or node.input[0] in seen or not self.is_data(node.input[0]):
                break
            name = node.input[0]
            seen.add(name)
        return name

    # -- stored tensors ----------------------------------------------------------------------
    def stored(self, name: str) -> StoredTensor | None:
        """Trace a non-data input back to the tensor stored in the file, or None if it is
        computed in a way that cannot be inverted (then it is not a predictable parameter)."""
        if name not in self._stored:
            self._stored[name] = self._trace_stored(name)
        return self._stored[name]

    def _trace_stored(self, name: str) -> StoredTensor | None:
        if not name or self.is_data(name):
            return None
        if name in self.initializers or name in self.constants:
            t = self.initializers.get(name) or self.constants[name]
            return StoredTensor(name, t.data_type, tuple(int(d) for d in t.dims), Layout())
        node = self.producer.get(name)
        if node is None or not node.input:
            return None
        src = self.stored(node.input[0])
        if src is None:
            return None
        shape = src.layout.canonical_shape(src.shape)
        op = node.op_type
        if op in ("Identity", "Cast", "CastLike"):
            return src
        if op == "Transpose":
            perm = _attr(node, "perm") or list(reversed(range(len(shape))))
            return _with_step(src, LayoutStep("transpose", tuple(int(p) for p in perm)))
        new_shape = self._reshaped(node, shape)
        if new_shape is None:
            return None
        return _with_step(src, LayoutStep("reshape", (tuple(shape), tuple(new_shape))))

    def _reshaped(self, node: onnx.NodeProto, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        op = node.op_type
        dummy = np.empty(shape, dtype=np.uint8)
        try:
            if op == "Reshape":
                target = self.constant_value(node.input[1])
                if target is None:
                    return None
                target = [shape[i] if (d == 0 and not _attr(node, "allowzero")) else int(d)
                          for i, d in enumerate(target.tolist())]
                return tuple(dummy.reshape(target).shape)
            if op == "Flatten":
                axis = _attr(node, "axis")
                axis = 1 if axis is None else axis
                axis = axis % len(shape) if len(shape) else 0
                return (int(np.prod(shape[:axis])), int(np.prod(shape[axis:])))
            if op in ("Squeeze", "Unsqueeze"):
                axes = _attr(node, "axes")
                if axes is None and len(node.input) > 1:
                    value = self.constant_value(node.input[1])
                    axes = None if value is None else value.tolist()
                if op == "Squeeze":
                    return tuple(np.squeeze(dummy, axis=tuple(axes) if axes is not None else None).shape)
                if axes is None:
                    return None
                return tuple(np.expand_dims(dummy, axis=tuple(axes)).shape)
        except (ValueError, IndexError, TypeError, MemoryError, np.exceptions.AxisError):
            return None
        return None

    def constant_value(self, name: str, _depth: int = 0) -> np.ndarray | None:
        """The value of a static tensor (following Identity/Cast, and folding the small
        Concat/Unsqueeze/Squeeze of constants that TorchScript exports without constant folding
        build target shapes with), or None (also for a tensor whose data does not match its
        declared shape)."""
        seen = {name}
        while name in self.producer and self.producer[name].op_type in ("Identity", "Cast"):
            node = self.producer[name]
            if not node.input or node.input[0] in seen:
                return None
            name = node.input[0]
            seen.add(name)
        t = self.initializers.get(name) or self.constants.get(name)
        if t is None:
            return self._folded_shape(name, _depth)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            # A deferred float weight (ghn_onnx.onnx_io.deferred): no rule reads such values, and
            # a loaded model has no other external tensors.
            return None
        try:
            return numpy_helper.to_array(t)
        except (ValueError, TypeError, KeyError):
            return None

    def _folded_shape(self, name: str, depth: int) -> np.ndarray | None:
        """A shape-sized tensor computed from constants by SHAPE_FOLDED_OPS, or None."""
        node = self.producer.get(name)
        if node is None or node.op_type not in SHAPE_FOLDED_OPS or depth >= SHAPE_FOLD_DEPTH or not node.input:
            return None
        values = [self.constant_value(i, depth + 1) if i else None for i in node.input]
        if values[0] is None or any(v is not None and v.size > SMALL_TENSOR for v in values):
            return None
        try:
            if node.op_type == "Concat":
                if any(v is None for v in values):
                    return None
                out = np.concatenate(values, axis=_attr(node, "axis") or 0)
            else:
                axes = _attr(node, "axes")
                if axes is None and len(values) > 1:
                    axes = None if values[1] is None else values[1].tolist()
                if node.op_type == "Unsqueeze":
                    out = None if axes is None else np.expand_dims(values[0], axis=tuple(axes))
                else:
                    out = np.squeeze(values[0], axis=None if axes is None else tuple(axes))
        except (ValueError, IndexError, TypeError, np.exceptions.AxisError):
            return None
        return out if out is None or out.size <= SMALL_TENSOR else None

    def rank(self, name: str) -> int | None:
        return self.ranks.get(name)


def _with_step(src: StoredTensor, step: LayoutStep) -> StoredTensor:
    return StoredTensor(src.name, src.dtype, src.shape, src.layout.then(step))


def _attr(node: onnx.NodeProto, name: str):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


def get_attr(node: onnx.NodeProto, name: str, default=None):
    """An attribute's value (ints as lists, strings as bytes), or ``default``."""
    value = _attr(node, name)
    return default if value is None else value


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks from ONNX shape inference, on a copy without the weights (so models over
    2 GB work too). Small initializers (target shapes, axes, scalars) keep their values: without
    them a ``Reshape`` has no known rank, and neither has anything after it. Missing entries just
    mean the rank is unknown."""
    def small(t: onnx.TensorProto) -> bool:  # and held in the file itself, not in external data
        return (math.prod(t.dims) <= SMALL_TENSOR
                and t.data_location != onnx.TensorProto.EXTERNAL)

    # Build the skeleton field by field: copying the whole model would copy every weight.
    g = model.graph
    skeleton = onnx.helper.make_model(
        onnx.helper.make_graph(list(g.node), g.name, list(g.input), list(g.output),
                               [t for t in g.initializer if small(t)], value_info=list(g.value_info)),
        opset_imports=list(model.opset_import), ir_version=model.ir_version)
    # An initializer without data would fail inference; keep the weights as typed graph inputs.
    names = {i.name for i in skeleton.graph.input}
    for t in g.initializer:
        if not small(t) and t.name not in names:
            skeleton.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    skeleton.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False)
    except Exception:  # inference is best effort: unknown ops or shapes only lose rank facts
        inferred = skeleton
    ranks: dict[str, int] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
    return ranks
