"""ONNX op → GHN primitive rules.

Each rule is a small function registered for the op types it reads. It looks at one ONNX node
(and, through the :class:`~ghn_onnx.convert.context.ConversionContext`, at its neighbourhood)
and returns an :class:`Emission`: the GHN nodes that stand for it. Returning ``None`` means
"no primitive": the node is dropped and edges are rewired through it (activations, reshapes,
casts, dropout, ...). Which ops are read at all is visible in :data:`RULES`.

Where GHN-2 and GHN-3 read a network differently, the difference is a named :class:`RuleSet`
(:data:`RULE_SETS`, chosen by the GHN configuration's ``rules``): graph rewrites applied to the
converted graph, each a small class with ``match`` and ``rewrite``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import onnx

from ghn_onnx.convert.context import einsum_weight
from ghn_onnx.convert.tensors import get_attr
from ghn_onnx.graph.graph import Graph, LayoutStep, Node, ParamRef
from ghn_onnx.graph.primitives import Primitive


@dataclass
class Emission:
    """What one ONNX node becomes in the GHN graph.

    Attributes:
        chain: nodes in data-flow order (a weight, then its bias); edges run along the chain.
        inputs: the data inputs whose producers feed ``chain[0]``.
        leaves: parameter nodes with no inputs that also feed ``chain[0]`` (a positional encoding
            feeding its ``sum``).
        min_preds: keep the emission only if ``chain[0]`` gets at least this many distinct
            predecessors (sum and concat need two); otherwise the node is dropped.
        claimed: stored tensors this rule accounts for, predicted or deliberately left alone
            (BN running statistics), so they are not reported as unsupported.
    """

    chain: list[Node]
    inputs: list[str]
    leaves: list[Node] = field(default_factory=list)
    min_preds: int = 0
    claimed: list[str] = field(default_factory=list)


Rule = Callable[[onnx.NodeProto, "ConversionContext"], "Emission | None"]  # noqa: F821
RULES: dict[str, Rule] = {}


def rule(*op_types: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in op_types:
            if op in RULES:
                raise ValueError(f"Two rules for {op}: {RULES[op].__name__} and {fn.__name__}")
            RULES[op] = fn
        return fn

    return register


# -- parametrised layers -------------------------------------------------------------------------

def _weight_and_bias(ctx, node, weight_input: str, bias_input: str | None, primitive: Primitive,
                     extra: tuple[LayoutStep, ...] = (), groups: int = 1) -> Emission | None:
    w = ctx.param_ref(weight_input, "weight", extra)
    if w is None or len(w.canonical_shape) not in (2, 3, 4) or min(w.canonical_shape) < 1:
        return None  # computed at run time, or a layout no GHN primitive has (e.g. 3-D convs)
    chain = [Node(primitive, w.tensor, w.canonical_shape, (w,), groups=groups)]
    b = ctx.param_ref(bias_input, "bias") if bias_input else None
    if b is not None and b.numel > 1:
        chain.append(Node(Primitive.BIAS, b.tensor, b.canonical_shape, (b,)))
    return Emission(chain, ctx.data_inputs(node)[:1], claimed=[p.tensor for n in chain for p in n.params])


@rule("Conv")
def conv(node, ctx) -> Emission | None:
    groups = int(get_attr(node, "group", 1))
    dilations = get_attr(node, "dilations", [1])
    if groups > 1:
        primitive = Primitive.DIL_CONV if min(dilations) > 1 else Primitive.SEP_CONV
    else:
        primitive = Primitive.CONV
    return _weight_and_bias(ctx, node, node.input[1], node.input[2] if len(node.input) > 2 else None,
                            primitive, groups=groups)


@rule("ConvTranspose")
def conv_transpose(node, ctx) -> Emission | None:
    if int(get_attr(node, "group", 1)) != 1:
        return None
    w = ctx.tensors.stored(node.input[1])
    if w is None:
        return None
    rank = len(w.layout.canonical_shape(w.shape))
    # Stored (in, out, kh, kw): the GHN's canonical form is (out, in, kh, kw).
    perm = (1, 0) + tuple(range(2, rank))
    return _weight_and_bias(ctx, node, node.input[1], node.input[2] if len(node.input) > 2 else None,
                            Primitive.CONV, (LayoutStep("transpose", perm),))


@rule("Gemm")
def gemm(node, ctx) -> Emission | None:
    if get_attr(node, "transA", 0) or not ctx.tensors.is_data(node.input[0]):
        return None
    extra = () if get_attr(node, "transB", 0) else (LayoutStep("transpose", (1, 0)),)
    return _weight_and_bias(ctx, node, node.input[1], node.input[2] if len(node.input) > 2 else None,
                            Primitive.CONV, extra)


@rule("MatMul")
def matmul(node, ctx) -> Emission | None:
    if ctx.is_attention_product(node):
        return _shape_free(node, ctx, Primitive.MSA)
    if not ctx.tensors.is_data(node.input[0]) or ctx.tensors.is_data(node.input[1]):
        return None  # activation x activation (q k^T) or weight on the left: no layer here
    w = ctx.tensors.stored(node.input[1])
    if w is None or len(w.layout.canonical_shape(w.shape)) != 2:
        return None
    # MatMul computes x @ W with W stored (in, out); the canonical linear weight is (out, in).
    return _weight_and_bias(ctx, node, node.input[1], None, Primitive.CONV,
                            (LayoutStep("transpose", (1, 0)),))


@rule("Einsum")
def einsum(node, ctx) -> Emission | None:
    """``x . W`` with a stored ``W`` (Keras ``EinsumDense``, Flax ``LinearGeneral``): a linear
    layer, canonically ``(out, in)``: W's output axes first, then its contracted axes, flattened
    (``abc,cde->abde`` stores (in, heads, head_dim) -> (heads * head_dim, in)). An einsum of two
    activations is attention's ``softmax @ v`` (msa) or nothing."""
    if ctx.is_attention_product(node):
        return _shape_free(node, ctx, Primitive.MSA)
    found = einsum_weight(node, ctx.tensors)
    if found is None:
        return None
    name, ew = found
    st = ctx.tensors.stored(name)
    steps: list[LayoutStep] = []
    if ew.perm != tuple(range(len(ew.perm))):
        steps.append(LayoutStep("transpose", ew.perm))
    shape = tuple(st.layout.canonical_shape(st.shape)[p] for p in ew.perm)
    if shape != (ew.out_features, ew.in_features):
        steps.append(LayoutStep("reshape", (shape, (ew.out_features, ew.in_features))))
    w = ctx.param_ref(name, "weight", tuple(steps))
    if w is None:
        return None
    return Emission([Node(Primitive.CONV, w.tensor, w.canonical_shape, (w,))], ctx.data_inputs(node),
                    claimed=[w.tensor])


def _norm(node, ctx, primitive: Primitive, scale_input: str, bias_input: str | None,
          statistics: tuple[str, ...] = ()) -> Emission | None:
    scale = ctx.param_ref(scale_input, "scale")
    if scale is None:
        return None
    params = [scale]
    bias = ctx.param_ref(bias_input, "bias") if bias_input else None
    if bias is not None:
        params.append(bias)
    claimed = [p.tensor for p in params]
    for s in statistics:  # running statistics are calibrated, never predicted
        st = ctx.tensors.stored(s)
        if st is not None:
            claimed.append(st.name)
    return Emission([Node(primitive, scale.tensor, scale.canonical_shape, tuple(params))],
                    ctx.data_inputs(node)[:1], claimed=claimed)


@rule("BatchNormalization")
def batch_norm(node, ctx) -> Emission | None:
    return _norm(node, ctx, Primitive.BN, node.input[1], node.input[2], tuple(node.input[3:5]))


@rule("LayerNormalization")
def layer_norm(node, ctx) -> Emission | None:
    return _norm(node, ctx, Primitive.LN, node.input[1], node.input[2] if len(node.input) > 2 else None)


@rule("InstanceNormalization", "GroupNormalization")
def group_norm(node, ctx) -> Emission | None:
    """Per-sample normalisations over channel groups are ``ln``: like LayerNorm they have no
    running statistics, and GHN-3 reads ConvNeXt's channel LayerNorm as ``ln`` too. When the
    affine follows as ``Mul`` + ``Add`` (torch's GroupNorm export: InstanceNormalization with a
    unit scale on (N, groups, -1)), the ``ln`` node is read at that ``Add`` instead."""
    if ctx.is_absorbed(node):
        return None
    return _norm(node, ctx, Primitive.LN, node.input[1], node.input[2] if len(node.input) > 2 else None)


def _affine_norm(node, ctx) -> Emission | None:
    """A BatchNorm or LayerNorm that the exporter wrote out as ``Mul`` + ``Add`` (see
    :class:`~ghn_onnx.convert.context.AffineNorm`): one node whose scale is the ``Mul``'s
    vector and whose shift is the ``Add``'s, both flattened to ``(C,)``."""
    norm = ctx.affine_norm(node)
    if norm is None:
        return None
    params = [_flat_vector(ctx, norm.scale, "scale")]
    if norm.bias is not None:
        params.append(_flat_vector(ctx, norm.bias, "bias"))
    if any(p is None for p in params):
        return None
    scale = params[0]
    return Emission([Node(norm.primitive, scale.tensor, scale.canonical_shape, tuple(params))],
                    list(norm.inputs), claimed=[p.tensor for p in params] + list(norm.claimed))


def _flat_vector(ctx, name: str, role: str):
    """A stored vector as ``(numel,)``, whatever broadcast shape it is stored in ((1, C, 1, 1),
    Keras GroupNorm's (1, 1, 1, groups, C / groups), ...)."""
    st = ctx.tensors.stored(name)
    shape = st.layout.canonical_shape(st.shape)
    steps = () if len(shape) == 1 else (LayoutStep("reshape", (tuple(shape), (st.numel,))),)
    return ctx.param_ref(name, role, steps)


# -- parameter-free primitives -------------------------------------------------------------------

def _pool(node, ctx, primitive: Primitive) -> Emission:
    k = [int(v) for v in get_attr(node, "kernel_shape", [1, 1])]
    kh, kw = (k + [1])[:2] if len(k) < 2 else k[-2:]
    return Emission([Node(primitive, node.name or node.output[0], (1, 1, kh, kw))], ctx.data_inputs(node))


@rule("MaxPool")
def max_pool(node, ctx) -> Emission:
    return _pool(node, ctx, Primitive.MAX_POOL)


@rule("AveragePool")
def avg_pool(node, ctx) -> Emission:
    return _pool(node, ctx, Primitive.AVG_POOL)


def _shape_free(node, ctx, primitive: Primitive, min_preds: int = 0) -> Emission:
    return Emission([Node(primitive, node.name or node.output[0])], ctx.data_inputs(node), min_preds=min_preds)


@rule("GlobalAveragePool", "ReduceMean", "ReduceSum")
def global_average(node, ctx) -> Emission | None:
    """A spatial mean is the network's global pooling, unless it squeezes an SE gate or is a
    normalisation's statistic. JAX writes a mean as ``ReduceSum`` then a division by the count."""
    if ctx.is_squeeze(node) or ctx.is_norm_statistic(node):
        return None
    if node.op_type != "GlobalAveragePool" and not ctx.is_spatial_mean(node):
        return None
    if node.op_type == "ReduceSum" and not _divided_by_a_constant(node, ctx):
        return None
    return _shape_free(node, ctx, Primitive.GLOB_AVG)


def _divided_by_a_constant(node, ctx) -> bool:
    """The sum's only use divides it by a stored scalar (or multiplies by one): a mean."""
    consumers = ctx.tensors.consumers.get(node.output[0], [])
    if len(consumers) != 1 or consumers[0].op_type not in ("Div", "Mul"):
        return False
    c = consumers[0]
    other = [i for i in c.input if i != node.output[0]]
    st = ctx.tensors.stored(other[0]) if len(other) == 1 else None
    return st is not None and st.numel == 1 and (c.op_type == "Mul" or c.input[1] == other[0])


@rule("Add", "Sum")
def add(node, ctx) -> Emission | None:
    norm = _affine_norm(node, ctx)
    if norm is not None:
        return norm
    data = ctx.data_inputs(node)
    if len(data) >= 2:
        return _shape_free(node, ctx, Primitive.SUM, min_preds=2)
    static = [i for i in node.input if i and not ctx.tensors.is_data(i)]
    if len(data) != 1 or len(static) != 1:
        return None
    return _added_parameter(node, ctx, data[0], static[0])


def _added_parameter(node, ctx, data: str, static: str) -> Emission | None:
    """``x + p`` with a stored ``p``: a layer's bias, or a positional encoding."""
    st = ctx.tensors.stored(static)
    if st is None or st.numel <= 1:
        return None
    if ctx.is_bias_free_layer_output(data) and st.numel == ctx.layer_out_features(data):
        # A bias, also when stored per head: Keras' EinsumDense adds (heads, head_dim).
        bias = _flat_vector(ctx, static, "bias")
        if bias is not None:
            return Emission([Node(Primitive.BIAS, bias.tensor, bias.canonical_shape, (bias,))], [data],
                            claimed=[bias.tensor])
    if sum(1 for d in st.shape if d > 1) >= 2:  # varies over positions, not just channels
        pos = ctx.param_ref(static, "weight")
        if pos is None or len(pos.canonical_shape) > 4:
            return None
        return Emission([Node(Primitive.SUM, node.name or node.output[0])], [data],
                        leaves=[Node(Primitive.POS_ENC, pos.tensor, pos.canonical_shape, (pos,))],
                        claimed=[pos.tensor])
    bias = ctx.param_ref(static, "bias")
    if bias is not None and ctx.is_bias_free_layer_output(data):
        return Emission([Node(Primitive.BIAS, bias.tensor, bias.canonical_shape, (bias,))], [data],
                        claimed=[bias.tensor])
    return None


@rule("Concat")
def concat(node, ctx) -> Emission:
    return _shape_free(node, ctx, Primitive.CONCAT, min_preds=2)


@rule("Mul")
def mul(node, ctx) -> Emission | None:
    norm = _affine_norm(node, ctx)  # a normalisation with a scale and no shift
    if norm is not None:
        return norm
    if ctx.is_cse(node):
        return _shape_free(node, ctx, Primitive.CSE)
    return None


@rule("Attention")
def attention(node, ctx) -> Emission:
    """The fused attention op (torch's SDPA at opset >= 23): msa reading q, k and v, as the
    decomposed ``softmax(q k^T) @ v`` is read at its product (see ``matmul``)."""
    return _shape_free(node, ctx, Primitive.MSA)



# -- rule sets: GHN-2's and GHN-3's readings -----------------------------------------------------

class GraphRewrite:
    """A rewrite of a converted graph: :meth:`match` finds where it applies (or None),
    :meth:`rewrite` returns the new graph."""

    name: str = ""

    def match(self, graph: Graph) -> object | None:
        raise NotImplementedError

    def rewrite(self, graph: Graph, found: object) -> Graph:
        raise NotImplementedError


@dataclass(frozen=True)
class _ConvHead:
    conv: int  # the classifier conv's node
    pool: int  # the global pooling after it (a sink)


class PoolBeforeConvClassifier(GraphRewrite):
    """GHN-3 reads a network whose classifier is a 1×1 conv followed by the global pooling
    (SqueezeNet: ``... → conv (C, K, 1, 1) → [bias] → glob_avg``) as pooling then a linear
    classifier: ``... → glob_avg → conv (C, K) → [bias]``, the weight recorded as 2-D (its stored
    4-D form comes back on writing), so it is decoded as the classifier."""

    name = "pool-before-conv-classifier"

    def match(self, graph: Graph) -> _ConvHead | None:
        preds: dict[int, list[int]] = {}
        succs: dict[int, list[int]] = {}
        for s, d in graph.edges.tolist():
            preds.setdefault(d, []).append(s)
            succs.setdefault(s, []).append(d)
        pools = [i for i, n in enumerate(graph.nodes) if n.primitive is Primitive.GLOB_AVG and not succs.get(i)]
        if len(pools) != 1 or len(preds.get(pools[0], [])) != 1:
            return None
        pool = pools[0]
        conv = preds[pool][0]
        if graph.nodes[conv].primitive is Primitive.BIAS:
            if len(succs[conv]) != 1 or len(preds.get(conv, [])) != 1:
                return None
            conv = preds[conv][0]
        node = graph.nodes[conv]
        if (node.primitive is not Primitive.CONV or node.shape is None or len(node.shape) != 4
                or tuple(node.shape[2:]) != (1, 1) or len(succs[conv]) != 1 or len(node.params) != 1):
            return None
        return _ConvHead(conv, pool)

    def rewrite(self, graph: Graph, found: _ConvHead) -> Graph:
        conv, pool = found.conv, found.pool
        node = graph.nodes[conv]
        w = node.params[0]
        out, inp = node.shape[:2]
        flat = ParamRef(w.tensor, w.role, w.stored_shape, w.dtype,
                        w.layout.then(LayoutStep("reshape", (tuple(w.canonical_shape), (out, inp)))))
        nodes = list(graph.nodes)
        nodes[conv] = Node(node.primitive, node.name, (out, inp), (flat,), node.groups)
        # the pooling takes the conv's place in the order and its inputs; the conv follows it
        order = [i for i in range(len(nodes)) if i != pool]
        order.insert(order.index(conv), pool)
        rank = {old: new for new, old in enumerate(order)}
        edges = []
        for s, d in graph.edges.tolist():
            if d == pool:
                continue  # bias (or conv) → pool: the pooling no longer ends the graph
            edges.append((rank[s], rank[pool] if d == conv else rank[d]))
        edges.append((rank[pool], rank[conv]))
        return Graph([nodes[i] for i in order], sorted(set(edges)), name=graph.name, warnings=list(graph.warnings),
                     unsupported=dict(graph.unsupported), info=dict(graph.info))


@dataclass(frozen=True)
class RuleSet:
    """A named reading of networks: the graph rewrites applied, in order, after conversion."""

    name: str
    rewrites: tuple[GraphRewrite, ...] = ()

    def apply(self, graph: Graph) -> Graph:
        for rewrite in self.rewrites:
            found = rewrite.match(graph)
            if found is not None:
                graph = rewrite.rewrite(graph, found)
        return graph


#: Every rule set by name (the GHN configuration's ``rules``). GHN-3 reads softmax attention
#: (msa), squeeze-excitation gates (cse, their squeeze dropped) and ViT positional embeddings as
#: the op rules above already do; it differs in the classifier of SqueezeNet-like heads.
RULE_SETS: dict[str, RuleSet] = {
    "ghn2": RuleSet("ghn2"),
    "ghn3": RuleSet("ghn3", (PoolBeforeConvClassifier(),)),
}


def rule_set(name: str) -> RuleSet:
    """The rule set called ``name``; unknown names raise."""
    if name not in RULE_SETS:
        raise ValueError(f"Expected a rule set, one of {sorted(RULE_SETS)} (got {name!r})")
    return RULE_SETS[name]
