"""Which part of the decoders' output each predicted tensor reads (GHN2_FACTS §4.1-§4.4): the
one definition of each rule, used by the flat plan (:mod:`~ghn_onnx.ghn.decode.flat`) and by
``GHN.decode_tensors``.

* :func:`classifier_nodes`: the nodes GHN-2 decodes with its class heads.
* :func:`decoded_taps`: a ``kh × kw`` kernel reads the top-left ``min(kh, s) × min(kw, s)`` taps
  of the ``s × s`` template (a larger kernel repeats them: that is tiling).
* :func:`weight_block`: the decode group of a weight: its taps, the top-left ``rows × cols``
  corner of the ``out × in`` channel block that tiling reads (all ``out`` rows for the
  classifier, whose head mixes them), classifier or not.
* :func:`vector_row`: the 1-D decoder row a 1-D parameter takes: row 0 (:data:`SCALE_ROW`) of
  ``decoder_1d`` for a norm's scale, row 1 (:data:`BIAS_ROW`) for every bias, of ``bias_class``
  for the classifier's; :data:`ROW_NORMALIZERS` the normalisation of each row.
* :func:`weight_normalized`: whether a weight gets GHN-2's weight normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from ghn_onnx.ghn.decode.parameters import normalize_bias, normalize_scale
from ghn_onnx.graph.graph import Graph, Node, ParamRef
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive

if TYPE_CHECKING:
    from ghn_onnx.ghn.config import GHNConfig


@dataclass(frozen=True)
class DecodeSpec:
    """What decoding depends on in a GHN's configuration (hashable: it keys the decode plan)."""

    max_shape: tuple[int, int, int, int]  # the decoded block (out, in, s, s)
    num_classes: int  # rows of the classifier heads
    weight_norm: bool  # GHN-2's parameter normalisation

    @classmethod
    def of(cls, config: "GHNConfig") -> "DecodeSpec":
        return cls(tuple(config.max_shape), config.num_classes, config.weight_norm)


@dataclass(frozen=True, order=True)
class WeightBlock:
    """The decode group of a weight (ordered as the tuple ``(kh, kw, rows, cols, is_cls)``):
    its member blocks are ``(rows, cols, kh, kw)``, classifiers' ``(classes, cols)``."""

    kh: int
    kw: int
    rows: int
    cols: int
    is_cls: bool


def classifier_nodes(graph: Graph) -> tuple[int | None, int | None]:
    """The classifier: the last weight node if it is a linear (2-D) weight, and its bias if that
    is the node right after it. GHN-2 decodes these with its class heads."""
    weights = [i for i, n in enumerate(graph.nodes) if n.primitive in WEIGHT_PRIMITIVES]
    if not weights or len(graph.nodes[weights[-1]].shape) != 2:
        return None, None
    w = weights[-1]
    b = w + 1 if w + 1 < len(graph.nodes) and graph.nodes[w + 1].primitive is Primitive.BIAS else None
    return w, b


def is_weight(node: Node) -> bool:
    """Decoded by the conv decoder (else by the 1-D decoder)."""
    return node.primitive in WEIGHT_PRIMITIVES or node.primitive is Primitive.POS_ENC


def decoded_taps(node: Node, s: int) -> tuple[int, int]:
    """The template taps a weight reads: the top-left ``min(kh, s) × min(kw, s)`` of ``s × s``
    (``kh, kw`` of the node's 4-D shape)."""
    _, _, kh, kw = node.shape4d
    return min(kh, s), min(kw, s)


def weight_block(spec: DecodeSpec, node: Node, is_cls: bool) -> WeightBlock:
    """The decode group of weight ``node`` (``params[0]``, canonical shape ``T``): its taps and
    the ``rows × cols = min(out, T0) × min(in, T1)`` corner that tiling reads (``cols = 1`` for a
    1-D target; ``rows = out`` for the classifier)."""
    out_ch, in_ch, s, _ = spec.max_shape
    target = node.params[0].canonical_shape
    rows = out_ch if is_cls else min(out_ch, target[0])
    cols = min(in_ch, target[1]) if len(target) > 1 else 1
    return WeightBlock(*decoded_taps(node, s), rows, cols, is_cls)


def whole_block(spec: DecodeSpec, block: WeightBlock) -> WeightBlock:
    """``block`` with the whole ``out × in`` channel block: what GHN-2 itself decodes."""
    return replace(block, rows=spec.max_shape[0], cols=spec.max_shape[1])


def weight_normalized(spec: DecodeSpec, node: Node) -> bool:
    """Whether the weight of ``node`` is normalised (never a positional encoding)."""
    return spec.weight_norm and node.primitive is not Primitive.POS_ENC


# The 1-D decoder's rows and heads.
SCALE_ROW, BIAS_ROW = 0, 1
DECODER_1D, BIAS_CLASS = "decoder_1d", "bias_class"
ROW_NORMALIZERS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {SCALE_ROW: normalize_scale,
                                                                      BIAS_ROW: normalize_bias}


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
