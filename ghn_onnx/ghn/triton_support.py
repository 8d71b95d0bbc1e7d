"""Where the Triton engines can run (they live beside their CPU twins in ``hypernet/`` and
``decode/``). This module does not import Triton, so ``available`` is cheap to call."""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device | str, hid: int = 32) -> bool:
    """Whether the Triton kernels can run on ``device`` for node states of size ``hid``: a CUDA
    device, Triton installed, and ``hid`` a power of two >= 32 (GHN-2: 32)."""
    return (torch.device(device).type == "cuda" and hid >= 32 and hid & (hid - 1) == 0
            and importlib.util.find_spec("triton") is not None)


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by Triton's interpreter (``TRITON_INTERPRET=1`` was set when
    its module was imported): it then runs on CPU tensors, slowly, for tests."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_kernel_device(t: torch.Tensor, kernel) -> None:
    """Raise unless ``kernel`` can run on ``t``'s device."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreted(kernel)):
        return
    raise ValueError(f"Expected a CUDA tensor (got {t.device}): on CPU the Triton kernels run only in "
                     "Triton's interpreter, with TRITON_INTERPRET=1 set before ghn_onnx.ghn.triton_support.* is imported")
