"""The stores of the flat decode path: what writes every predicted tensor, tiled and scaled,
from the source buffer into one flat output (:mod:`~ghn_onnx.ghn.decode.flat`, stage 3).

Every store takes the same arguments (:class:`Store`): the batch's
:class:`~ghn_onnx.ghn.decode.flat.DecodePlan` and its source buffer; none sees the GHN. They are
listed in :data:`STORES` (:func:`register`), and :func:`for_device` is the one place where
``GHN.decode`` picks one:

=========  ==================================================  ===========================
store      runs on                                             module
=========  ==================================================  ===========================
numba      CPU                                                 :mod:`.numba_store`
triton     CUDA; CPU under ``TRITON_INTERPRET=1`` (tests)      :mod:`.triton_store`
=========  ==================================================  ===========================

This module imports neither Triton nor the Triton store until a Triton store is used.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ghn_onnx.ghn import triton_support
from ghn_onnx.ghn.decode import numba_store
from ghn_onnx.ghn.decode.flat import DecodePlan


class Store(Protocol):
    """Writes a plan's tensors into one flat buffer."""

    name: str
    dtypes: tuple[torch.dtype, ...]  # output dtypes it writes

    def unavailable(self, device: torch.device) -> str | None:
        """Why this store cannot write on ``device`` (None: it can)."""

    def write(self, plan: DecodePlan, src: torch.Tensor, dtype: torch.dtype = torch.float32,
              **options) -> torch.Tensor:
        """``(plan.total,)`` output of ``dtype`` from the ``(plan.src_numel,)`` fp32 source
        buffer, both on ``plan.device``; ``options`` are the store's own (tile sizes)."""


STORES: dict[str, Store] = {}

# The store GHN.decode uses on each device type (when it is available there).
DEFAULT = {"cpu": "numba", "cuda": "triton"}


def register(cls: type) -> type:
    """Class decorator: list an instance of the store under its ``name``."""
    store = cls()
    if store.name in STORES:
        raise ValueError(f"Expected a new store name (got {store.name!r}, already registered)")
    STORES[store.name] = store
    return cls


def get(name: str) -> Store:
    try:
        return STORES[name]
    except KeyError:
        raise ValueError(f"Expected a store in {sorted(STORES)} (got {name!r})") from None


def for_device(device: torch.device | str) -> Store | None:
    """The store ``GHN.decode`` uses on ``device`` (:data:`DEFAULT`), or None when that one
    cannot run there (then it decodes tensor by tensor)."""
    name = DEFAULT.get(torch.device(device).type)
    if name is None or get(name).unavailable(torch.device(device)) is not None:
        return None
    return get(name)


@register
class NumbaStore:
    """:func:`.numba_store.store`: first ``P0`` rows element by element, the periodic rest by
    contiguous copies; fp32 into a reused buffer (:data:`.numba_store.OUTPUT`)."""

    name = "numba"
    dtypes = (torch.float32,)

    def unavailable(self, device: torch.device) -> str | None:
        if not numba_store.available():
            return "numba is not installed"
        if torch.device(device).type != "cpu":
            return f"the numba store writes CPU memory (got {device})"
        return None

    def write(self, plan: DecodePlan, src: torch.Tensor, dtype: torch.dtype = torch.float32,
              **options) -> torch.Tensor:
        if dtype not in self.dtypes or options:
            raise ValueError(f"Expected dtype float32 and no options for the numba store (got {dtype}, {options})")
        return numba_store.store(plan, src)


@register
class TritonStore:
    """:func:`.triton_store.store`: one kernel launch over ``(BLOCK_R, BLOCK_C)`` tiles of every
    tensor; fp32, fp16 or bf16."""

    name = "triton"
    dtypes = (torch.float32, torch.float16, torch.bfloat16)

    def unavailable(self, device: torch.device) -> str | None:
        device = torch.device(device)
        if not triton_support.available("cuda"):  # (does not import Triton)
            return "Triton is not installed"
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":  # only in Triton's interpreter (imports Triton)
            from ghn_onnx.ghn.decode import triton_store

            if triton_support.interpreted(triton_store._tile_store_kernel):
                return None
            return ("on CPU the Triton store runs only in Triton's interpreter "
                    "(TRITON_INTERPRET=1 set before Triton is imported)")
        return f"no Triton store for {device}"

    def write(self, plan: DecodePlan, src: torch.Tensor, dtype: torch.dtype = torch.float32,
              **options) -> torch.Tensor:
        from ghn_onnx.ghn.decode import triton_store  # imports Triton

        return triton_store.store(plan, src, dtype, **options)
