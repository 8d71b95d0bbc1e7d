"""Triton kernels for the GHN's message passing and parameter decoding (see README.md).

The kernel modules import Triton; this package file does not, so ``available`` is cheap to call.
"""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device | str, hid: int = 32) -> bool:
    """Whether the Triton kernels can run on ``device`` for node states of size ``hid``: a CUDA
    device, Triton installed, and ``hid`` a power of two >= 32 (GHN-2: 32)."""
    return (torch.device(device).type == "cuda" and hid >= 32 and hid & (hid - 1) == 0
            and importlib.util.find_spec("triton") is not None)
