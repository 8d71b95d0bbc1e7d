"""PyTorch's default initialisation of a graph's parameters: the baseline a prediction is
compared with (``ghn-onnx explain``) and the scale ``predict --for-training`` restores.

conv / linear weights ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(±1/sqrt(fan_in))``, element std
``1/sqrt(3·fan_in)``, ``fan_in = in/groups·kh·kw`` (the canonical shape's trailing dimensions),
so ``E‖W_init‖ = sqrt(numel/(3·fan_in))``; layer biases ``U(±1/sqrt(fan_in))`` of their layer;
norm scales ones; positional embeddings ``N(0, 0.02²)`` (torchvision's ViT); anything else zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ghn_onnx.graph.graph import Graph, ParamRef
from ghn_onnx.graph.primitives import Primitive

POS_ENC_STD = 0.02  # torchvision's ViT: pos_embedding ~ N(0, 0.02²)


@dataclass(frozen=True)
class ReferenceInit:
    """PyTorch's default init of a layer, the baseline a prediction is compared with.

    ``description`` names it; ``rms`` is the root mean square of one element (``None`` when it
    is zero or unknown, then no norm ratio); ``fan_in`` the layer's, when it has one."""

    description: str
    rms: float | None
    fan_in: int | None = None


def reference_init(graph: Graph, index: int, ref: ParamRef) -> ReferenceInit:
    """PyTorch's default init of the tensor ``ref`` of node ``index`` (module docstring)."""
    node = graph.nodes[index]
    shape = ref.canonical_shape
    if node.primitive is Primitive.POS_ENC:
        return ReferenceInit(f"normal(0, {POS_ENC_STD})", POS_ENC_STD)
    if ref.role == "scale":
        return ReferenceInit("ones", 1.0)
    if ref.role == "weight":
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        return ReferenceInit("kaiming_uniform(a=sqrt(5))", 1.0 / math.sqrt(3 * fan_in), fan_in)
    if node.primitive is Primitive.BIAS:  # a layer's bias follows its weight node (convert.rules)
        prev = graph.nodes[index - 1] if index else None
        if prev is not None and prev.params and prev.params[0].role == "weight" \
                and prev.params[0].canonical_shape[0] == math.prod(shape):
            fan_in = math.prod(prev.params[0].canonical_shape[1:])
            return ReferenceInit("uniform(±1/sqrt(fan_in))", 1.0 / math.sqrt(3 * fan_in), fan_in)
    return ReferenceInit("zeros", None)


def sample_init(init: ReferenceInit, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A canonical-shape float64 draw of ``init``."""
    if init.description == "ones":
        return np.ones(shape)
    if init.rms is None:
        return np.zeros(shape)
    if init.description.startswith("normal"):
        return rng.normal(0.0, init.rms, size=shape)
    bound = init.rms * math.sqrt(3.0)  # U(-b, b) has rms b/sqrt(3)
    return rng.uniform(-bound, bound, size=shape)
