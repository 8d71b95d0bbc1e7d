"""What the rules may ask about a node's neighbourhood: parameters behind an input, whether a
``Mul`` is a squeeze-excitation gate, whether a ``Softmax`` is attention, and so on.

Structural facts that need a look at the whole graph (which ``Mul`` nodes gate an SE block and
which means squeeze it) are computed once, up front.
"""

from __future__ import annotations

import onnx

from ghn_onnx.converters.tensors import TensorIndex, get_attr
from ghn_onnx.graph import Layout, LayoutStep, ParamRef

# Activations that turn an SE branch into a channel gate (ppuda uses Hardswish, torchvision
# and Keras use (hard) sigmoid).
GATE_OPS = frozenset({"Sigmoid", "HardSigmoid", "HardSwish"})
# Reductions that squeeze an SE branch.
SQUEEZE_OPS = frozenset({"ReduceMean", "GlobalAveragePool", "ReduceSum", "ReduceMax", "GlobalMaxPool"})
# Ops that combine an attention matrix with values.
ATTENTION_PRODUCT_OPS = frozenset({"MatMul", "Einsum"})
# Layers whose output can take a separate bias ``Add``.
BIASABLE_OPS = frozenset({"MatMul", "Conv", "ConvTranspose", "Gemm"})


class ConversionContext:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.tensors = TensorIndex(model)
        self._cse: set[int] = set()
        self._squeeze: set[int] = set()
        self._find_se_gates(model)

    # -- parameters ----------------------------------------------------------------------------
    def param_ref(self, name: str | None, role: str, extra: tuple[LayoutStep, ...] = ()) -> ParamRef | None:
        """The stored float tensor behind input ``name``, with the layout that maps it to the
        canonical form (the chain it came through, then ``extra``), or None."""
        if not name:
            return None
        st = self.tensors.stored(name)
        if st is None or not st.is_float:
            return None
        ref = ParamRef(st.name, role, st.shape, st.dtype, Layout(st.layout.steps + tuple(extra)))
        if role in ("bias", "scale"):
            # Per-channel vectors are canonically 1-D, whatever broadcast shape they are stored in.
            shape = ref.canonical_shape
            if sum(1 for d in shape if d > 1) > 1:
                return None
            if len(shape) != 1:
                ref = ParamRef(st.name, role, st.shape, st.dtype,
                               ref.layout.then(LayoutStep("reshape", (shape, (ref.numel,)))))
        return ref

    def data_inputs(self, node: onnx.NodeProto) -> list[str]:
        return self.tensors.data_inputs(node)

    # -- structure -----------------------------------------------------------------------------
    def _find_se_gates(self, model: onnx.ModelProto) -> None:
        t = self.tensors
        for node in model.graph.node:
            if node.op_type != "Mul":
                continue
            data = t.data_inputs(node)
            if len(data) != 2:
                continue
            for x, g in (data, data[::-1]):
                gate = t.producer.get(t.through_shape_ops(g))
                if gate is None or gate.op_type not in GATE_OPS:
                    continue
                x0 = t.through_shape_ops(x)
                if t.through_shape_ops(gate.input[0]) == x0:
                    continue  # x * sigmoid(x): SiLU / Swish, an activation
                branch = t.data_ancestors(gate.input[0]) - t.data_ancestors(x0)
                squeezes = [t.producer[b] for b in branch
                            if b in t.producer and t.producer[b].op_type in SQUEEZE_OPS]
                if squeezes:
                    self._cse.add(id(node))
                    self._squeeze.update(id(s) for s in squeezes)
                    break

    def is_cse(self, node: onnx.NodeProto) -> bool:
        """``x * gate(f(mean(x)))``: the channel gate of a squeeze-excitation block."""
        return id(node) in self._cse

    def is_squeeze(self, node: onnx.NodeProto) -> bool:
        """The reduction at the start of an SE gate (not the network's global pooling)."""
        return id(node) in self._squeeze

    def is_spatial_mean(self, node: onnx.NodeProto) -> bool:
        """A ``ReduceMean`` over the spatial axes of an image tensor (NCHW or NHWC), or over the
        tokens of a ``(N, T, C)`` sequence."""
        axes = get_attr(node, "axes")
        if axes is None and len(node.input) > 1:
            value = self.tensors.constant_value(node.input[1])
            axes = None if value is None else value.tolist()
        rank = self.tensors.rank(node.input[0])
        if axes is None or rank is None:
            return bool(get_attr(node, "keepdims", 1))
        axes = {int(a) % rank for a in axes}
        if rank == 4:
            return axes in ({2, 3}, {1, 2})
        if rank == 3:
            return axes == {1}
        return False

    def is_attention_softmax(self, node: onnx.NodeProto) -> bool:
        """A softmax whose result multiplies another activation (the values): attention."""
        t = self.tensors
        frontier = list(node.output)
        seen = set()
        while frontier:
            name = frontier.pop()
            for c in t.consumers.get(name, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op_type in ("Dropout", "Identity", "Cast", "Reshape", "Transpose", "Squeeze",
                                 "Unsqueeze", "Expand"):
                    frontier.extend(c.output)
                elif c.op_type in ATTENTION_PRODUCT_OPS and len(t.data_inputs(c)) >= 2:
                    return True
        return False

    def is_bias_free_layer_output(self, data: str) -> bool:
        """``data`` is produced by a weight layer that has no bias of its own (so a following
        ``Add`` of a stored vector is that layer's bias)."""
        t = self.tensors
        src = t.through_shape_ops(data)
        layer = t.producer.get(src)
        if layer is None or layer.op_type not in BIASABLE_OPS:
            return False
        if len(t.consumers.get(src, [])) != 1:
            return False
        weight = layer.input[1] if len(layer.input) > 1 else ""
        if not weight or t.is_data(weight):
            return False
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        return not has_bias
