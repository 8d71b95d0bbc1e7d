"""From decoded blocks to parameters of the exact target shape (GHN2_FACTS §4.5, §4.6).

Tiling (:func:`tile`, the one statement of the rule; the flat stores implement it through
:func:`tile_periods`): slice each dimension to the target, or repeat the whole block along it and
chop (channel order 0..63, 0..63, ...). Normalisation (GHN-2's ``-n``), on the tiled tensor:

* weights: :math:`w \\cdot \\sqrt{\\beta / \\text{fan\\_in}}`, fan_in = ``w[0].numel()``;
  β = 1 for 4-D depthwise kernels (``in/groups == 1``) and for ``kh < kw`` (the 1×k half of a
  ``k×1, 1×k`` pair), else 2. Positional encodings (4-D, ``out == 1``, ``kh >= 11``) are not
  normalised.
* 1-D: scales :math:`2\\sigma(p/2) \\in (0, 2)`; biases :math:`\\tanh(p/5) \\in (-1, 1)`.

GHN-3's two reshapings of a decoded block (``ghn3-parity/README.md``), before tiling:
:func:`interpolate_taps` (kernels larger than ``s``) and :func:`tokens_with_class_token` (ViT
positional embeddings).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Standard deviation of GHN-3's random class-token row.
CLASS_TOKEN_STD = 0.02


def tile_periods(block: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...]:
    """The tiling rule's periods ``P_d = min(B_d, T_d)``: :func:`tile` gives
    ``out[o, i, y, x] = block[o mod P0, i mod P1, y mod P2, x mod P3]``."""
    return tuple(min(b, t) for b, t in zip(block, target))


def tile(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """``block`` sliced or repeated to ``target`` dimension by dimension (same rank): GHN-2's
    slice to the target, repeat the whole block, chop; i.e. ``out[k] = block[k mod P]`` with
    :func:`tile_periods` ``P``. Differentiable; a fresh contiguous tensor.

    Written in one copy: the repeats are broadcast dimensions of a view ``(r0, P0, r1, P1, ...)``
    copied once into the output.

    Shapes: ``block (B0, ..., Bk)`` → ``(T0, ..., Tk)``.
    """
    if block.dim() != len(target):
        raise ValueError(f"Expected a block of rank {len(target)} (got {tuple(block.shape)})")
    block = block[tuple(slice(0, p) for p in tile_periods(tuple(block.shape), target))]
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


def interpolate_taps(block: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """``(rows, cols, h, w)`` → ``(rows, cols, kh, kw)``, resized bilinearly (``align_corners``
    off; an axis already of its size is unchanged)."""
    if tuple(block.shape[2:]) == (kh, kw):
        return block
    return F.interpolate(block, size=(kh, kw), mode="bilinear", align_corners=False)


def tokens_with_class_token(block: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A decoded ``(1, C, s, s)`` positional block as a ``(1, 1 + s², C)`` token sequence: token
    ``1 + y·s + x`` is the block's ``(y, x)`` column, token 0 a class-token row drawn from
    ``N(0, 0.02²)`` with PyTorch's generator (``generator``, else the default one), as GHN-3
    draws it: it differs from call to call."""
    _, c, kh, kw = block.shape
    tokens = block[0].permute(1, 2, 0).reshape(1, kh * kw, c)
    cls = torch.randn(1, 1, c, generator=generator, dtype=block.dtype, device=block.device) * CLASS_TOKEN_STD
    return torch.cat([cls, tokens], dim=1)
