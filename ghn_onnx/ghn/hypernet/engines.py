"""Every way to run GHN-2's message passing, behind one interface, and the rule that picks one.

An engine runs :class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNN`'s forward then backward sweep:
``engine.run(gnn, h, batch) -> h`` with ``h (N, hid)``. All compute the same values (the tests
hold each to the reference loop, ``tests/test_message_passing_engines.py``):

========== =================================================== ======== ==========
name       implementation                                      devices  autograd
========== =================================================== ======== ==========
sequential ``GatedGNN.forward_sequential``, the reference loop any      yes
levels     ``GatedGNN.forward``, level by level in PyTorch     any      yes
numba      :mod:`~ghn_onnx.ghn.hypernet.numba_sweep`            CPU      no
triton     :mod:`~ghn_onnx.ghn.hypernet.triton_sweep`           CUDA     no
========== =================================================== ======== ==========

:func:`select` is the one rule :meth:`GHN.node_states <ghn_onnx.ghn.model.GHN.node_states>` uses:
``sequential`` when asked, else the first of :data:`PREFERENCE` that is available. An engine says
why it cannot run (:meth:`MessagePassingEngine.unavailable`) rather than just that it cannot.
Importing this module does not import Triton; the Triton engine imports it when it first runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import torch

from ghn_onnx.ghn import triton_support
from ghn_onnx.ghn.hypernet import numba_sweep
from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN, torch_levels
from ghn_onnx.graph.batch import GraphBatch

E = TypeVar("E", bound="type[MessagePassingEngine]")

#: Every engine by name, in registration order (:func:`register`).
ENGINES: dict[str, "MessagePassingEngine"] = {}

#: The order :func:`select` tries the engines in when the reference loop is not asked for.
PREFERENCE = ("numba", "triton", "levels")


class MessagePassingEngine:
    """One way to run the sweeps. Subclasses set :attr:`name` and :attr:`autograd` and implement
    :meth:`run`; they override :meth:`unavailable` where they cannot run everywhere."""

    name: str = ""
    autograd: bool = True  # whether gradients flow through run()

    def unavailable(self, device: torch.device | str, grad: bool, hid: int = 32) -> str | None:
        """Why this engine cannot run on ``device`` for states of size ``hid`` (with autograd on
        when ``grad``), or None when it can."""
        if grad and not self.autograd:
            return f"the {self.name} engine has no autograd"
        return None

    def available(self, device: torch.device | str, grad: bool, hid: int = 32) -> bool:
        return self.unavailable(device, grad, hid) is None

    def prepare(self, batch: GraphBatch, device: torch.device | str) -> None:
        """Build now the plans :meth:`run` derives from ``batch`` alone (they are kept by the batch)."""

    def run(self, gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """Forward then backward sweep of ``gnn``: initial states ``h (N, hid)`` (not modified) →
        final states ``(N, hid)``."""
        raise NotImplementedError


def register(cls: E) -> E:
    """Class decorator: add an instance of the engine to :data:`ENGINES` under its name."""
    engine = cls()
    if not engine.name or engine.name in ENGINES:
        raise ValueError(f"Expected a new engine name (got {engine.name!r})")
    ENGINES[engine.name] = engine
    return cls


def get(name: str) -> MessagePassingEngine:
    """The engine called ``name``; unknown names raise."""
    if name not in ENGINES:
        raise ValueError(f"Expected a message-passing engine, one of {sorted(ENGINES)} (got {name!r})")
    return ENGINES[name]


def select(device: torch.device | str, grad: bool, hid: int = 32, sequential: bool = False) -> MessagePassingEngine:
    """The engine a GHN forward runs: the reference loop if ``sequential``, else the first engine
    of :data:`PREFERENCE` available on ``device`` (numba on CPU and Triton on CUDA without
    autograd; the level sweep otherwise)."""
    if sequential:
        return ENGINES["sequential"]
    for name in PREFERENCE:
        if ENGINES[name].available(device, grad, hid):
            return ENGINES[name]
    raise RuntimeError(f"No message-passing engine can run on {device}")  # pragma: no cover - levels always can


@register
@dataclass(frozen=True)
class SequentialEngine(MessagePassingEngine):
    """``GatedGNN.forward_sequential``: ppuda's loop over node indices (the reference)."""

    name: str = "sequential"

    def run(self, gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        return gnn.forward_sequential(h, batch)


@register
@dataclass(frozen=True)
class LevelsEngine(MessagePassingEngine):
    """``GatedGNN.forward`` (called as the module, so hooks and patches apply): one batched update
    per topological level, differentiable (the training path)."""

    name: str = "levels"

    def prepare(self, batch: GraphBatch, device: torch.device | str) -> None:
        batch.plan(torch_levels, device)

    def run(self, gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        return gnn(h, batch)


@register
@dataclass(frozen=True)
class NumbaEngine(MessagePassingEngine):
    """The compiled CPU loop (:mod:`~ghn_onnx.ghn.hypernet.numba_sweep`), threads over graphs."""

    name: str = "numba"
    autograd: bool = False

    def unavailable(self, device: torch.device | str, grad: bool, hid: int = 32) -> str | None:
        if torch.device(device).type != "cpu":
            return f"the numba engine runs on the CPU (got {device})"
        return super().unavailable(device, grad, hid)

    def prepare(self, batch: GraphBatch, device: torch.device | str) -> None:
        numba_sweep.prepare(batch)

    def run(self, gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        return numba_sweep.run(gnn, h, batch)


@register
@dataclass(frozen=True)
class TritonEngine(MessagePassingEngine):
    """The Triton kernel (:mod:`~ghn_onnx.ghn.hypernet.triton_sweep`) on CUDA; on CPU it runs
    only in Triton's interpreter (tests), which :meth:`unavailable` does not offer."""

    name: str = "triton"
    autograd: bool = False
    block_nodes: int = 16  # BLOCK_N: nodes per program tile
    block_edges: int = 64  # BLOCK_E: edges gathered per step
    persistent: bool | None = None  # one program per sweep; None: while levels are narrow enough

    def unavailable(self, device: torch.device | str, grad: bool, hid: int = 32) -> str | None:
        if not triton_support.available(device, hid):
            return (f"the triton engine needs a CUDA device, Triton installed and a hidden size that is "
                    f"a power of two >= 32 (got {device}, hid {hid})")
        return super().unavailable(device, grad, hid)

    def prepare(self, batch: GraphBatch, device: torch.device | str) -> None:
        from ghn_onnx.ghn.hypernet.triton_sweep import triton_sweep_plan  # imports Triton

        batch.plan(triton_sweep_plan, device)

    def run(self, gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        from ghn_onnx.ghn.hypernet.triton_sweep import message_passing  # imports Triton

        return message_passing(gnn, h, batch, block_nodes=self.block_nodes, block_edges=self.block_edges,
                               persistent=self.persistent)
