"""What the kernel files share: where a Triton kernel can run."""

from __future__ import annotations

import torch


def interpreted(kernel) -> bool:
    """Whether ``kernel`` was built by Triton's interpreter (``TRITON_INTERPRET=1`` was set when
    its module was imported): it then runs on CPU tensors, slowly, for tests."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_kernel_device(t: torch.Tensor, kernel) -> None:
    """Raise unless ``kernel`` can run on ``t``'s device."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreted(kernel)):
        return
    raise ValueError(f"Expected a CUDA tensor (got {t.device}): on CPU the Triton kernels run only in "
                     "Triton's interpreter, with TRITON_INTERPRET=1 set before ghn_onnx.kernels.* is imported")
