"""From decoded blocks to parameters of the exact target shape (GHN2_FACTS §4.5, §4.6).

Tiling: slice each dimension to the target, or repeat the whole block along it and chop
(channel order 0..63, 0..63, ...). Normalisation (GHN-2's ``-n``), on the tiled tensor:

* weights: :math:`w \\cdot \\sqrt{\\beta / \\text{fan\\_in}}`, fan_in = ``w[0].numel()``;
  β = 1 for 4-D depthwise kernels (``in/groups == 1``) and for ``kh < kw`` (the 1×k half of a
  ``k×1, 1×k`` pair), else 2. Positional encodings (4-D, ``out == 1``, ``kh >= 11``) are not
  normalised.
* 1-D: scales :math:`2\\sigma(p/2) \\in (0, 2)`; biases :math:`\\tanh(p/5) \\in (-1, 1)`.
"""

from __future__ import annotations

import math

import torch


def tile(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """Slice or repeat ``block`` to ``target`` dimension by dimension (same rank)."""
    if block.dim() != len(target):
        raise ValueError(f"Expected a block of rank {len(target)} (got {tuple(block.shape)})")
    for d, t in enumerate(target):
        have = block.shape[d]
        if have > t:
            block = block.narrow(d, 0, t)
        elif have < t:
            reps = [1] * block.dim()
            reps[d] = math.ceil(t / have)
            block = block.repeat(*reps).narrow(d, 0, t)
    return block


def normalize_weight(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 4 and w.shape[0] == 1 and w.shape[2] >= 11:
        return w  # a positional encoding
    beta = 1.0 if w.dim() == 4 and (w.shape[1] == 1 or w.shape[2] < w.shape[3]) else 2.0
    fan_in = w[0].numel()
    return w * math.sqrt(beta / fan_in)


def normalize_scale(p: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sigmoid(0.5 * p)


def normalize_bias(p: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.2 * p)
