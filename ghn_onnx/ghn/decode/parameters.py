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


def expand_tile(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """Same result as :func:`tile`, written in one copy: repeats become broadcast dimensions
    of a view (``(r0, b0, r1, b1, ...)``) copied once into the output."""
    if block.dim() != len(target):
        raise ValueError(f"Expected a block of rank {len(target)} (got {tuple(block.shape)})")
    block = block[tuple(slice(0, min(b, t)) for b, t in zip(block.shape, target))]
    reps = [math.ceil(t / b) for b, t in zip(block.shape, target)]
    if all(r == 1 for r in reps):
        return block.contiguous()
    inter = [v for b in block.shape for v in (1, b)]
    expanded = [v for r, b in zip(reps, block.shape) for v in (r, b)]
    # copy_ into a fresh contiguous tensor runs as one parallel pass (about 4x faster here than
    # reshaping the expanded view, which copies element by element).
    full = torch.empty([r * b for r, b in zip(reps, block.shape)], dtype=block.dtype, device=block.device)
    full.view(expanded).copy_(block.reshape(inter).expand(expanded))
    if tuple(full.shape) != tuple(target):
        full = full[tuple(slice(0, t) for t in target)].contiguous()
    return full


def weight_scale(shape: tuple[int, ...]) -> float:
    """The factor :func:`normalize_weight` applies to a weight of this (final) shape."""
    if len(shape) == 4 and shape[0] == 1 and shape[2] >= 11:
        return 1.0  # a positional encoding
    beta = 1.0 if len(shape) == 4 and (shape[1] == 1 or shape[2] < shape[3]) else 2.0
    fan_in = math.prod(shape[1:])
    return math.sqrt(beta / fan_in)


def normalize_weight(w: torch.Tensor) -> torch.Tensor:
    return w * weight_scale(tuple(w.shape))


def normalize_scale(p: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.sigmoid(0.5 * p)


def normalize_bias(p: torch.Tensor) -> torch.Tensor:
    return torch.tanh(0.2 * p)
