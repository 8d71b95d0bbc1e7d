"""What the rules may ask about a node's neighbourhood: parameters behind an input, whether a
``Mul`` is a squeeze-excitation gate, whether a ``MatMul`` applies attention, whether a ``Mul``
and an ``Add`` are a normalisation's affine, and so on.

Structural facts that need a look at the whole graph (which ``Mul`` nodes gate an SE block and
which means squeeze it; which elementwise ops spell out a BatchNorm, LayerNorm or GroupNorm) are
computed once, up front.

Normalisations that an exporter wrote out as arithmetic are recognised by *statistics*: tensors
computed by elementwise arithmetic alone from reductions that are put back against the tensor
they reduced (``x - mean(x)``, ``x * rsqrt(mean((x - m)^2) + eps)``); a global pooling or an SE
squeeze is no statistic. A per-channel ``Mul`` (then ``Add``) of stored vectors on a normalised
activation is the normalisation's affine. The same ``Mul`` + ``Add`` on an activation that no
statistic touched is an inference-mode BatchNorm whose statistics the exporter folded into the two
vectors (Keras via tf2onnx: ``gamma / sqrt(var + eps)`` and ``beta - mean * that``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ghn_onnx.convert.tensors import TensorIndex, get_attr
from ghn_onnx.graph.graph import Layout, LayoutStep, ParamRef
from ghn_onnx.graph.primitives import Primitive

# Activations that turn an SE branch into a channel gate (ppuda uses Hardswish, torchvision
# and Keras use (hard) sigmoid).
GATE_OPS = frozenset({"Sigmoid", "HardSigmoid", "HardSwish"})
# Arithmetic with constants that spells a hard sigmoid (relu6(x + 3) / 6), and the clips in it.
HARD_GATE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Clip", "Relu", "Min", "Max"})
CLIP_OPS = frozenset({"Clip", "Relu", "Min", "Max"})
# Reductions that squeeze an SE branch.
SQUEEZE_OPS = frozenset({"ReduceMean", "GlobalAveragePool", "ReduceSum", "ReduceMax", "GlobalMaxPool"})
# Ops that combine an attention matrix with values.
ATTENTION_PRODUCT_OPS = frozenset({"MatMul", "Einsum"})
# Layers whose output can take a separate bias ``Add``.
BIASABLE_OPS = frozenset({"MatMul", "Conv", "ConvTranspose", "Gemm", "Einsum"})
# Reductions whose result is a statistic (a mean, a second moment) when it is put back against
# the tensor it was computed from.
REDUCE_OPS = frozenset({"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "GlobalAveragePool"})
# Elementwise arithmetic that keeps a statistic a statistic (mean -> variance -> 1/std ...).
STAT_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Max", "Min", "Clip",
    "Cast", "Identity", "Reshape", "Squeeze", "Unsqueeze", "Expand", "Transpose",
})
# Ops that output their input normalised but apply no parameters of their own that matter: an
# affine ``Mul`` + ``Add`` after them is the normalisation's (torch GroupNorm exports, tf2onnx).
NORMALIZING_OPS = frozenset({"InstanceNormalization", "MeanVarianceNormalization"})


@dataclass(frozen=True)
class AffineNorm:
    """A normalisation written as arithmetic, read at the node that outputs it.

    Attributes:
        primitive: ``BN`` (an affine on an activation no statistic touched: an inference-mode
            BatchNorm folded into two vectors) or ``LN`` (the affine of a per-sample
            normalisation: LayerNorm, GroupNorm, InstanceNorm).
        scale: the input (of a ``Mul``) that holds the stored scale vector.
        bias: the input (of an ``Add`` / ``Sub``) that holds the stored shift vector, if any.
        inputs: the output node's data inputs that carry the normalised activation.
        claimed: stored tensors inside the pattern that are no parameters of their own (an
            ``InstanceNormalization``'s unit scale and zero shift).
    """

    primitive: Primitive
    scale: str
    bias: str | None
    inputs: tuple[str, ...]
    claimed: tuple[str, ...] = ()


class ConversionContext:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.tensors = TensorIndex(model)
        self._cse: set[int] = set()
        self._squeeze: set[int] = set()
        self._stat: dict[str, bool] = {}
        self._sources: dict[str, frozenset[str]] = {}
        self._norm_stat: dict[int, bool] = {}
        self._norms: dict[int, AffineNorm] = {}
        self._absorbed: set[int] = set()
        self._find_se_gates(model)
        self._find_affine_norms(model)

    # -- parameters ----------------------------------------------------------------------------
    def param_ref(self, name: str | None, role: str, extra: tuple[LayoutStep, ...] = ()) -> ParamRef | None:
        """The stored float tensor behind input ``name``, with the layout that maps it to the
        canonical form (the chain it came through, then ``extra``), or None."""
        if not name:
            return None
        st = self.tensors.stored(name)
        if st is None or not st.is_float or 0 in st.shape:  # an empty tensor: nothing to predict
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
        # Which squeezes feed a tensor, as a bit mask per tensor filled in once for the whole graph:
        # a walk over the ancestors of every gate is quadratic in the depth of the network.
        outputs = [o for n in model.graph.node if n.op_type in SQUEEZE_OPS for o in n.output if o]
        bits = {o: 1 << k for k, o in enumerate(outputs)}
        behind: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type != "Mul":
                continue
            data = t.data_inputs(node)
            if len(data) != 2:
                continue
            for x, g in (data, data[::-1]):
                gate_input = self._gate_input(g)
                if gate_input is None:
                    continue
                x0 = t.through_shape_ops(x)
                if t.through_shape_ops(gate_input) == x0:
                    continue  # x * sigmoid(x): SiLU / Swish, an activation
                branch = _marks_behind(t, gate_input, bits, behind) & ~_marks_behind(t, x0, bits, behind)
                if branch:  # a squeeze on the gate's side only
                    self._cse.add(id(node))
                    self._squeeze.update(id(t.producer[o]) for o in outputs if branch & bits[o])
                    break

    def _gate_input(self, g: str) -> str | None:
        """What the gate ``g`` squashes, if ``g`` is a gate: a sigmoid-like op, or a hard sigmoid
        written out as arithmetic with constants around a clip (Keras: ``relu6(x + 3) / 6``)."""
        t = self.tensors
        node = t.producer.get(t.through_shape_ops(g))
        if node is not None and node.op_type in GATE_OPS:
            return node.input[0]
        clipped = False
        while node is not None and node.op_type in HARD_GATE_OPS and len(t.data_inputs(node)) == 1:
            clipped = clipped or node.op_type in CLIP_OPS
            inp = t.data_inputs(node)[0]
            node = t.producer.get(t.through_shape_ops(inp))
            if clipped and (node is None or node.op_type not in HARD_GATE_OPS):
                return inp
        return None

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
        if layer.op_type == "Einsum":
            return einsum_weight(layer, t) is not None
        weight = layer.input[1] if len(layer.input) > 1 else ""
        if not weight or t.is_data(weight):
            return False
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        return not has_bias

    def layer_out_features(self, data: str) -> int | None:
        """How many features the weight layer that produced ``data`` outputs (its bias size)."""
        t = self.tensors
        layer = t.producer.get(t.through_shape_ops(data))
        if layer is None or layer.op_type not in BIASABLE_OPS:
            return None
        if layer.op_type == "Einsum":
            found = einsum_weight(layer, t)
            return None if found is None else found[1].out_features
        w = t.stored(layer.input[1]) if len(layer.input) > 1 else None
        if w is None:
            return None
        shape = w.layout.canonical_shape(w.shape)
        if not shape:
            return None
        if layer.op_type == "Conv":
            return shape[0]
        if layer.op_type == "ConvTranspose":
            return shape[1] * int(get_attr(layer, "group", 1)) if len(shape) > 1 else None
        if layer.op_type == "Gemm":
            return shape[0] if get_attr(layer, "transB", 0) else shape[-1]
        return shape[-1]  # MatMul: x @ W with W (in, out)

    # -- attention -----------------------------------------------------------------------------
    def is_attention_product(self, node: onnx.NodeProto) -> bool:
        """``softmax(q k^T) @ v``: the product of attention weights (a softmax, through reshapes
        and dropout) with another activation. The msa node sits here, reading q, k and v, as the
        ONNX ``Attention`` op does."""
        t = self.tensors
        if node.op_type not in ATTENTION_PRODUCT_OPS:
            return False
        data = t.data_inputs(node)
        if len(data) < 2:
            return False
        for name in data:
            src = t.producer.get(t.through_shape_ops(name))
            if src is not None and src.op_type == "Softmax":
                return True
        return False

    # -- normalisations written as arithmetic (see the module docstring) ------------------------
    def sources(self, name: str) -> frozenset[str]:
        """The tensors ``name`` is computed from by elementwise arithmetic alone: walking up
        through :data:`STAT_OPS`, the outputs of anything else (layers, reductions) and the
        graph inputs."""
        t = self.tensors
        stack = [name]
        while stack:  # iterative: residual chains are long
            x = stack[-1]
            if x in self._sources:
                stack.pop()
                continue
            node = t.producer.get(x)
            if node is None or node.op_type not in STAT_OPS:
                self._sources[x] = frozenset([x])
            else:
                data = t.data_inputs(node)
                pending = [i for i in data if i not in self._sources]
                if pending:
                    stack.extend(pending)
                    continue
                self._sources[x] = frozenset().union(*(self._sources[i] for i in data))
            stack.pop()
        return self._sources[name]

    def is_norm_statistic(self, node: onnx.NodeProto) -> bool:
        """A reduction whose result is put back against the tensor it reduced, by elementwise
        arithmetic (``x - mean(x)``, ``(x - m) / sqrt(mean((x - m)^2))``): part of a
        normalisation, not a pooling. An SE squeeze or a classifier's pooling reaches a layer
        first; a LayerNorm after a global pooling puts its own means back, not the pooling's."""
        key = id(node)
        if key in self._norm_stat:
            return self._norm_stat[key]
        t = self.tensors
        reduced = self.sources(node.input[0]) if node.input and t.is_data(node.input[0]) else frozenset()
        found = False
        frontier = [o for o in node.output if o]
        seen: set[int] = set()
        while frontier and not found:
            name = frontier.pop()
            for c in t.consumers.get(name, []):
                if id(c) in seen or c.op_type not in STAT_OPS:
                    continue
                seen.add(id(c))
                others = [i for i in t.data_inputs(c) if i != name]
                if any(self.sources(o) & reduced for o in others):
                    found = True
                    break
                frontier.append(c.output[0])
        self._norm_stat[key] = found
        return found

    def is_statistic(self, name: str) -> bool:
        """``name`` is computed by elementwise arithmetic from normalisation statistics alone (a
        mean, a variance, ``1 / sqrt(var + eps)``): per-sample statistics, not an activation."""
        if not self.tensors.is_data(name):
            return False
        if name not in self._stat:
            t = self.tensors
            producers = [t.producer.get(s) for s in self.sources(name)]
            self._stat[name] = all(p is not None and p.op_type in REDUCE_OPS and self.is_norm_statistic(p)
                                   for p in producers)
        return self._stat[name]

    def affine_norm(self, node: onnx.NodeProto) -> AffineNorm | None:
        """The normalisation whose output ``node`` computes, if it is written as arithmetic."""
        return self._norms.get(id(node))

    def is_absorbed(self, node: onnx.NodeProto) -> bool:
        """An ``InstanceNormalization`` (or the like) whose affine follows as ``Mul`` + ``Add``:
        the normalisation is read at that ``Add``, so this node is no primitive of its own."""
        return id(node) in self._absorbed

    def normalizer_of(self, name: str) -> onnx.NodeProto | None:
        """The node that normalises ``name`` (through reshapes): an ``InstanceNormalization``,
        or a ``Div`` / ``Mul`` of an activation by a statistic (``(x - mean) / std``); else None."""
        t = self.tensors
        node = t.producer.get(t.through_shape_ops(name))
        if node is None:
            return None
        if node.op_type in NORMALIZING_OPS:
            return node
        data = t.data_inputs(node)
        if node.op_type not in ("Div", "Mul") or len(data) != 2:
            return None
        stat = [self.is_statistic(d) for d in data]
        if node.op_type == "Div":
            return node if stat == [False, True] else None
        return node if sum(stat) == 1 else None

    def _vector(self, name: str, single_axis: bool) -> bool:
        """A stored float tensor of more than one element (varying along one axis only when
        ``single_axis``)."""
        st = self.tensors.stored(name) if name and not self.tensors.is_data(name) else None
        if st is None or not st.is_float or st.numel <= 1:
            return False
        return not single_axis or sum(1 for d in st.layout.canonical_shape(st.shape) if d > 1) == 1

    def _same_channel_axis(self, a: str, b: str) -> bool:
        """Both vary along one axis, the same one once broadcast (aligned from the right)."""
        if not (self._vector(a, single_axis=True) and self._vector(b, single_axis=True)):
            return False
        axes = []
        for name in (a, b):
            st = self.tensors.stored(name)
            shape = st.layout.canonical_shape(st.shape)
            axes.append(next(i - len(shape) for i, d in enumerate(shape) if d > 1))
        return axes[0] == axes[1]

    def _numel(self, name: str) -> int:
        return self.tensors.stored(name).numel

    def _split(self, node: onnx.NodeProto) -> tuple[str, str] | None:
        """``(data input, stored input)`` of a binary node with exactly one of each."""
        if len(node.input) != 2:
            return None
        a, b = node.input
        da, db = self.tensors.is_data(a), self.tensors.is_data(b)
        if da == db:
            return None
        return (a, b) if da else (b, a)

    def _find_affine_norms(self, model: onnx.ModelProto) -> None:
        for node in model.graph.node:
            if node.op_type != "Mul":
                continue
            split = self._split(node)
            if split is None or not self._vector(split[1], single_axis=False):
                continue
            data, scale = split
            if not (self.is_statistic(data) and self._find_fused_norm(node, scale)):
                self._find_affine_pair(node, data, scale)

    def _find_affine_pair(self, mul: onnx.NodeProto, h: str, scale: str) -> None:
        """``h * scale + shift``: a BatchNorm's folded affine, or (when ``h`` is normalised) a
        LayerNorm / GroupNorm / InstanceNorm affine; ``h * scale`` alone only in the latter case."""
        t = self.tensors
        out = mul.output[0]
        consumers = t.consumers.get(out, [])
        add = consumers[0] if len(consumers) == 1 and consumers[0].op_type == "Add" else None
        split = self._split(add) if add is not None else None
        shift = split[1] if split is not None and split[0] == out else None
        if shift is not None and not (self._vector(shift, single_axis=False)
                                      and self._numel(shift) == self._numel(scale)):
            shift = None
        normalizer = self.normalizer_of(h)
        if normalizer is None and (shift is None or not self._same_channel_axis(scale, shift)):
            return  # a scale alone (ConvNeXt's layer scale), or no per-channel affine
        claimed: tuple[str, ...] = ()
        if normalizer is not None and normalizer.op_type in NORMALIZING_OPS:
            self._absorbed.add(id(normalizer))
            claimed = tuple(st.name for st in (t.stored(i) for i in normalizer.input[1:] if i) if st is not None)
        primitive = Primitive.BN if normalizer is None else Primitive.LN
        if shift is not None:
            self._norms[id(add)] = AffineNorm(primitive, scale, shift, (out,), claimed)
        else:
            self._norms[id(mul)] = AffineNorm(primitive, scale, None, (h,), claimed)

    def _find_fused_norm(self, g: onnx.NodeProto, scale: str) -> bool:
        """The fused form Keras writes LayerNorm and GroupNorm in (through tf2onnx):
        ``m = rsqrt(var + eps) * gamma; y = x * m + (beta - mean * m)`` (the shift either
        ``beta - mean * m`` or ``(-mean) * m + beta``), read at the final ``Add``. True if found."""
        t = self.tensors
        m = g.output[0]
        apply, centre = [], []
        for c in t.consumers.get(m, []):
            other = [i for i in c.input if i != m]
            if c.op_type != "Mul" or len(other) != 1 or not t.is_data(other[0]):
                return False
            (centre if self.is_statistic(other[0]) else apply).append(c)
        if len(apply) != 1 or len(centre) > 1:
            return False
        (xm,) = apply
        if not centre:  # no shift (LayerNorm(center=False))
            x = next(i for i in xm.input if i != m)
            self._norms[id(xm)] = AffineNorm(Primitive.LN, scale, None, (x,))
            return True
        mean_m = centre[0].output[0]
        shifts = t.consumers.get(mean_m, [])
        ends = t.consumers.get(xm.output[0], [])
        if len(shifts) == 1 and len(ends) == 1 and shifts[0] is ends[0] and ends[0].op_type == "Add":
            # x * m + (-mean) * m: an exporter dropped a zero beta (an untrained LayerNorm)
            self._norms[id(ends[0])] = AffineNorm(Primitive.LN, scale, None, (xm.output[0], mean_m))
            return True
        if len(shifts) != 1 or shifts[0].op_type not in ("Add", "Sub"):
            return False
        s = shifts[0]
        split = self._split(s)
        if split is None or split[0] != mean_m or not self._vector(split[1], single_axis=False):
            return False
        if s.op_type == "Sub" and s.input[0] != split[1]:
            return False  # mean * m - beta is no LayerNorm
        shift = split[1]
        if len(ends) != 1 or ends[0].op_type != "Add" or set(ends[0].input) != {xm.output[0], s.output[0]}:
            return False
        if self._numel(shift) != self._numel(scale):
            return False
        self._norms[id(ends[0])] = AffineNorm(Primitive.LN, scale, shift, (xm.output[0], s.output[0]))
        return True


@dataclass(frozen=True)
class EinsumWeight:
    """How an einsum with one stored operand is a linear layer ``(out, in)``.

    Attributes:
        index: which einsum input is the stored weight.
        perm: orders the weight's axes as (output features ..., contracted ...).
        out_features, in_features: the products of those axes' sizes.
    """

    index: int
    perm: tuple[int, ...]
    out_features: int
    in_features: int


def einsum_weight(node: onnx.NodeProto, tensors: TensorIndex):
    """``(stored input name, EinsumWeight)`` when the einsum is ``x . W`` with a stored ``W``
    whose every axis is either contracted with ``x`` or an output feature (Keras ``EinsumDense``,
    Flax ``LinearGeneral``); None for batched weights and activation-by-activation einsums."""
    equation = get_attr(node, "equation")
    if equation is None or len(node.input) != 2:
        return None
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    if "->" not in equation:
        return None
    lhs, out = equation.split("->")
    operands = lhs.split(",")
    data = [tensors.is_data(i) for i in node.input]
    if len(operands) != 2 or sorted(data) != [False, True]:
        return None
    index = data.index(False)
    st = tensors.stored(node.input[index])
    if st is None:
        return None
    shape = st.layout.canonical_shape(st.shape)
    w, x = operands[index], operands[1 - index].replace("...", "")
    out = out.replace("...", "")
    if "." in w or len(w) != len(shape) or len(set(w)) != len(w):
        return None
    outs = [c for c in out if c in w and c not in x]  # in output order
    ins = [c for c in x if c in w and c not in out]  # in the activation's order
    if not outs or not ins or len(outs) + len(ins) != len(w):
        return None
    perm = tuple(w.index(c) for c in outs + ins)
    return node.input[index], EinsumWeight(index, perm, int(np.prod([shape[w.index(c)] for c in outs])),
                                           int(np.prod([shape[w.index(c)] for c in ins])))


def _marks_behind(t: TensorIndex, name: str, bits: dict[str, int], memo: dict[str, int]) -> int:
    """The union of ``bits`` over the data tensors ``name`` is computed from, itself included
    (tensors without a bit count 0), memoised in ``memo`` across calls."""
    stack = [name]
    while stack:  # iterative post-order: graphs can be thousands of nodes deep
        x = stack[-1]
        if x in memo:
            stack.pop()
            continue
        node = t.producer.get(x)
        if node is None or not t.is_data(x):
            memo[x] = 0
            stack.pop()
            continue
        pending = [i for i in node.input if i and i not in memo]
        if pending:
            stack.extend(pending)
            continue
        mask = bits.get(x, 0)
        for i in node.input:
            if i:
                mask |= memo[i]
        memo[x] = mask
        stack.pop()
    return memo[name]
