"""Which part of the decoders' output each predicted tensor reads (GHN2_FACTS §4.1-§4.4, §7): the
one definition of each rule, used by the flat plan (:mod:`~ghn_onnx.ghn.decode.flat`) and by
``GHN.decode_tensors``.

* :func:`classifier_nodes`: the nodes GHN-2 decodes with its class heads; :func:`classifier_head`
  says how a head whose size is not the GHN's class count is filled (:class:`ClassifierHead`).
* :func:`decoded_taps`: the window of the ``s × s`` template a ``kh × kw`` kernel reads:
  ``min(kh, s) × min(kw, s)`` taps, from the top-left (GHN-2) or the centre (GHN-3).
* :func:`weight_block`: the decode group of a weight: its taps, the top-left ``rows × cols``
  corner of the ``out × in`` channel block that tiling reads (all ``out`` rows for the
  classifier, whose head mixes them), classifier or not.
* :func:`interpolated`, :func:`as_tokens`: GHN-3's kernels larger than ``s`` (bilinear, not
  tiled) and its ViT positional embedding (tokens with a class token).
* :func:`vector_row`: the 1-D decoder row a 1-D parameter takes: row 0 (:data:`SCALE_ROW`) of
  ``decoder_1d`` for a norm's scale, row 1 (:data:`BIAS_ROW`) for every bias, of ``bias_class``
  for the classifier's; :data:`ROW_NORMALIZERS` the normalisation of each row.
* :func:`weight_normalized`: whether a weight gets GHN-2's weight normalisation.

Where GHN-2 and GHN-3 differ, the rule is a field of a named :class:`DecodeRules`
(:data:`DECODE_RULES`), chosen by the configuration's ``rules``; nothing else branches on it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, NamedTuple

from ghn_onnx.graph.graph import Graph, Node, ParamRef
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive

if TYPE_CHECKING:
    import torch

    from ghn_onnx.ghn.config import GHNConfig


@dataclass(frozen=True)
class DecodeRules:
    """The decoding rules on which GHN-2 and GHN-3 differ (``ghn3-parity/README.md``, "Decoding").

    Attributes:
        name: the rule set's name in :data:`DECODE_RULES` (the configuration's ``rules``).
        centre_taps: a kernel reads the centre of the template, rows and columns
            ``[s/2 - ⌊k/2⌋, s/2 + ⌈k/2⌉)`` (GHN-3), instead of the top-left ``[0, k)`` (GHN-2).
        interpolate_large: a kernel larger than ``s`` is the whole ``s × s`` block resized
            bilinearly (GHN-3), instead of the block repeated by tiling (GHN-2).
        token_embeddings: a ``(1, T, C)`` positional embedding is decoded as ``(1, C, s, s)``, read
            as tokens in row-major order behind a random class token (GHN-3), instead of GHN-2's
            ``(1, C, s)`` slice of that block.
    """

    name: str
    centre_taps: bool
    interpolate_large: bool
    token_embeddings: bool


#: Every decoding rule set by name (the configuration's ``rules`` chooses one).
DECODE_RULES = {
    "ghn2": DecodeRules("ghn2", centre_taps=False, interpolate_large=False, token_embeddings=False),
    "ghn3": DecodeRules("ghn3", centre_taps=True, interpolate_large=True, token_embeddings=True),
}


@dataclass(frozen=True)
class DecodeSpec:
    """What decoding depends on in a GHN's configuration (hashable: it keys the decode plan)."""

    max_shape: tuple[int, int, int, int]  # the decoded block (out, in, s, s)
    num_classes: int  # rows of the classifier heads
    weight_norm: bool  # GHN-2's parameter normalisation
    rules: str = "ghn2"  # the name of the DecodeRules

    @classmethod
    def of(cls, config: "GHNConfig") -> "DecodeSpec":
        return cls(tuple(config.max_shape), config.num_classes, config.weight_norm, config.rules)

    @property
    def rule_set(self) -> DecodeRules:
        if self.rules not in DECODE_RULES:
            raise ValueError(f"Expected decoding rules, one of {sorted(DECODE_RULES)} (got {self.rules!r})")
        return DECODE_RULES[self.rules]


@dataclass(frozen=True, order=True)
class WeightBlock:
    """The decode group of a weight (ordered as the tuple ``(kh, kw, rows, cols, is_cls, y0, x0)``):
    its member blocks are ``(rows, cols, kh, kw)`` from the template taps ``[y0, y0 + kh) ×
    [x0, x0 + kw)``, classifiers' ``(classes, cols)``."""

    kh: int
    kw: int
    rows: int
    cols: int
    is_cls: bool
    y0: int = 0
    x0: int = 0


def classifier_nodes(graph: Graph) -> tuple[int | None, int | None]:
    """The classifier: the last weight node if it is a linear (2-D) weight, and its bias if that
    is the node right after it. GHN-2 decodes these with its class heads."""
    weights = [i for i, n in enumerate(graph.nodes) if n.primitive in WEIGHT_PRIMITIVES]
    if not weights or len(graph.nodes[weights[-1]].shape) != 2:
        return None, None
    w = weights[-1]
    b = w + 1 if w + 1 < len(graph.nodes) and graph.nodes[w + 1].primitive is Primitive.BIAS else None
    return w, b


@dataclass(frozen=True)
class ClassifierHead:
    """The classifier :func:`classifier_nodes` finds, and how a GHN with ``classes`` classes
    fills its rows. The rule is the reference's (ppuda's and ghn3's ``_tile_params``), kept for
    parity and stated here, in one place: the class heads decode ``classes`` rows, which are then
    sliced or tiled to the layer's ``outputs`` like any other dimension (:func:`~ghn_onnx.ghn.decode.parameters.tile`):
    output row ``r`` is class row ``r mod classes``. A head of another size is therefore predicted,
    but its rows stand for the GHN's training classes (ImageNet's first ``outputs`` classes, or
    repeats of all of them): :meth:`note` says so, for the warnings and the output's metadata.

    Attributes:
        weight, bias: the stored tensors (``bias`` ``None`` without one).
        outputs: the layer's out-features.
        classes: the GHN's ``num_classes``; ``None`` when no GHN is given (``inspect`` without one).
    """

    weight: str
    bias: str | None
    outputs: int
    classes: int | None = None

    @property
    def rule(self) -> str:
        """``"one row per class"``, ``"sliced"`` (fewer outputs than classes), ``"tiled"`` (more),
        or ``"unknown"`` (no GHN given)."""
        if self.classes is None:
            return "unknown"
        if self.outputs == self.classes:
            return "one row per class"
        return "sliced" if self.outputs < self.classes else "tiled"

    def explanation(self) -> str | None:
        """What the rows of a head of another size than the GHN's classes hold (``None`` otherwise)."""
        if self.rule == "sliced":
            return (f"its rows are the GHN's first {self.outputs} class rows (row r = class r), which stand for "
                    "the GHN's training classes, not this model's")
        if self.rule == "tiled":
            return (f"its rows are the GHN's {self.classes} class rows repeated (row r = class r mod "
                    f"{self.classes}), so rows r and r + {self.classes} start equal")
        return None

    def note(self) -> str | None:
        """The warning for a head whose size is not the GHN's class count (``None`` otherwise)."""
        how = self.explanation()
        if how is None:
            return None
        return (f"classifier {self.weight} has {self.outputs} outputs and the GHN {self.classes} classes: {how} "
                "(the reference implementations' rule); fine-tune the head, or use a GHN trained for "
                f"{self.outputs} classes")

    def metadata(self) -> dict[str, str]:
        """``ghn_onnx.classifier`` metadata for a head of another size than the GHN's classes."""
        if self.note() is None:
            return {}
        return {"classifier": f"{self.weight}: {self.outputs} outputs from {self.classes} GHN classes, {self.rule}"}

    def to_json(self) -> dict:
        return {"weight": self.weight, "bias": self.bias, "outputs": self.outputs, "ghn_classes": self.classes,
                "rule": self.rule}


def classifier_head(graph: Graph, classes: int | None = None) -> ClassifierHead | None:
    """The classifier of ``graph`` (:func:`classifier_nodes`) for a GHN with ``classes`` classes;
    ``None`` when the graph has none (its last weight is not a linear layer)."""
    w, b = classifier_nodes(graph)
    if w is None:
        return None
    weight = graph.nodes[w].params[0]
    bias = graph.nodes[b].params[0].tensor if b is not None and graph.nodes[b].params else None
    return ClassifierHead(weight.tensor, bias, int(weight.canonical_shape[0]), classes)


def is_weight(node: Node) -> bool:
    """Decoded by the conv decoder (else by the 1-D decoder)."""
    return node.primitive in WEIGHT_PRIMITIVES or node.primitive is Primitive.POS_ENC


def decoded_taps(node: Node, s: int, centre: bool = False) -> tuple[int, int, int, int]:
    """The template window a weight reads, ``(kh', kw', y0, x0)``: ``kh' × kw' = min(kh, s) ×
    min(kw, s)`` taps of the ``s × s`` template (``kh, kw`` of the node's 4-D shape), from the
    top-left (``y0 = x0 = 0``) or, with ``centre``, from ``s/2 - ⌊k/2⌋`` (GHN-3: 1×1 reads tap
    ``(s/2, s/2)``; a kernel of ``s`` or more the whole template)."""
    _, _, kh, kw = node.shape4d
    kh, kw = min(kh, s), min(kw, s)
    if not centre:
        return kh, kw, 0, 0
    return kh, kw, s // 2 - kh // 2 if kh < s else 0, s // 2 - kw // 2 if kw < s else 0


def as_tokens(spec: DecodeSpec, node: Node) -> bool:
    """A ``(1, T, C)`` positional embedding that GHN-3 decodes as tokens (:data:`DecodeRules`)."""
    target = node.params[0].canonical_shape if node.params else ()
    return spec.rule_set.token_embeddings and node.primitive is Primitive.POS_ENC and len(target) == 3


def interpolated(spec: DecodeSpec, node: Node) -> bool:
    """A kernel larger than ``s`` that GHN-3 resizes bilinearly from the whole template."""
    _, _, kh, kw = node.shape4d
    s = spec.max_shape[2]
    return spec.rule_set.interpolate_large and (kh > s or kw > s) and not as_tokens(spec, node)


def weight_block(spec: DecodeSpec, node: Node, is_cls: bool) -> WeightBlock:
    """The decode group of weight ``node`` (``params[0]``, canonical shape ``T``): its taps and
    the ``rows × cols = min(out, T0) × min(in, T1)`` corner that tiling reads (``cols = 1`` for a
    1-D target; ``rows = out`` for the classifier; ``1 × min(in, C)`` for GHN-3's ``(1, T, C)``
    token embeddings, whose channels are the last axis)."""
    out_ch, in_ch, s, _ = spec.max_shape
    target = node.params[0].canonical_shape
    rows = out_ch if is_cls else min(out_ch, target[0])
    cols = min(in_ch, target[1]) if len(target) > 1 else 1
    if as_tokens(spec, node):
        cols = min(in_ch, target[2])
    kh, kw, y0, x0 = decoded_taps(node, s, spec.rule_set.centre_taps)
    return WeightBlock(kh, kw, rows, cols, is_cls, y0, x0)


def whole_block(spec: DecodeSpec, block: WeightBlock) -> WeightBlock:
    """``block`` with the whole ``out × in`` channel block: what GHN-2 itself decodes."""
    return replace(block, rows=spec.max_shape[0], cols=spec.max_shape[1])


def weight_normalized(spec: DecodeSpec, node: Node) -> bool:
    """Whether the weight of ``node`` is normalised (never a positional encoding)."""
    return spec.weight_norm and node.primitive is not Primitive.POS_ENC


# The 1-D decoder's rows and heads.
SCALE_ROW, BIAS_ROW = 0, 1
DECODER_1D, BIAS_CLASS = "decoder_1d", "bias_class"


class VectorRow(NamedTuple):
    """Where a 1-D parameter comes from: row ``row`` of head ``head`` (``decoder_1d`` rows
    ``(n, 2, out)``, ``bias_class`` rows ``(n, 2, classes)``)."""

    head: str
    row: int


def vector_row(node: Node, param: ParamRef, is_cls_bias: bool) -> VectorRow:
    """A norm's scale: row 0 of ``decoder_1d``; a bias: row 1, of ``bias_class`` for the
    classifier's bias (the node :func:`classifier_nodes` names)."""
    if node.primitive in NORM_PRIMITIVES and param.role == "scale":
        return VectorRow(DECODER_1D, SCALE_ROW)
    return VectorRow(BIAS_CLASS if is_cls_bias else DECODER_1D, BIAS_ROW)


def __getattr__(name: str):
    """:data:`ROW_NORMALIZERS` (row → its normalisation), built on first access: the normalisers
    are torch code, and ``inspect`` reads this module's rules without torch."""
    if name == "ROW_NORMALIZERS":
        from ghn_onnx.ghn.decode.parameters import normalize_bias, normalize_scale

        normalizers: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {SCALE_ROW: normalize_scale,
                                                                          BIAS_ROW: normalize_bias}
        globals()[name] = normalizers
        return normalizers
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
