r"""GHN-2's gated graph network: one forward and one backward sweep of GRU updates.

For node :math:`v` visited in topological order (forward sweep; reversed with out-edges for
the backward sweep), with states of already-visited neighbours:

.. math::
    m_v = \sum_{u \to v,\ d_{uv}=1} \mathrm{MLP}(h_u)
        + \sum_{u \to v,\ d_{uv} \le 50} \mathrm{MLP}_{ve}(h_u) / d_{uv},
    \qquad h_v \leftarrow \mathrm{GRU}(m_v, h_v)

Real edges feed both MLPs (GHN2_FACTS §2). Both MLPs are ``32 → 16 → 32`` with ReLU after each
layer, so messages are non-negative. Every node is updated in every sweep, the input node with
``m = 0``.

This file is the reference definition of the maths, in PyTorch, written as
:meth:`~GatedGNN.project` / :meth:`~GatedGNN.message` / :meth:`~GatedGNN.aggregate` /
:meth:`~GatedGNN.update`. Two sweeps here compute the same thing:

* :meth:`GatedGNN.forward_sequential`: the reference loop, one step per node index across the
  batch (as ppuda does; kept for tests and benchmarks);
* :meth:`GatedGNN.forward`: level by level over a :class:`~ghn_onnx.graph.batch.GraphBatch`; a
  node's messages come from lower levels only, so each level is one batched update.

The compiled engines (numba, Triton) re-express the same rules; they take the weights as one
:class:`GatedGNNWeights` (:meth:`GatedGNN.packed_weights`) and the edges as the shared
:mod:`~ghn_onnx.ghn.hypernet.sweep_plan`. :mod:`~ghn_onnx.ghn.hypernet.engines` lists every engine.

Under autocast (CUDA fp16, CPU bf16) the MLPs and the GRU cell compute in low precision while
the node states stay in their own dtype (fp32): each update is cast back to it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from ghn_onnx.graph.batch import GraphBatch, SweepLevel


class MessageMLP(nn.Module):
    def __init__(self, hid: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


@dataclass(frozen=True)
class GatedGNNWeights:
    """The 12 weight tensors of a :class:`GatedGNN` as the compiled engines take them: fp32,
    contiguous, matrices transposed to ``(in, out)`` so that a layer is ``x @ W + b``.

    Fields are in the order both kernels list them (:meth:`tensors`). Without ``MLP_ve``
    (``use_ve`` False) the ``ve_*`` fields are the message MLP's tensors again: placeholders the
    kernels receive and never read.

    Shapes (``H = hid``): ``mlp_w1 (H, H/2)``, ``mlp_b1 (H/2,)``, ``mlp_w2 (H/2, H)``, ``mlp_b2 (H,)``,
    the same for ``ve_*``; ``w_ih, w_hh (H, 3H)``, ``b_ih, b_hh (3H,)`` with the GRU's gates in
    PyTorch's order ``r, z, n`` along the last axis.
    """

    hid: int
    use_ve: bool
    mlp_w1: torch.Tensor
    mlp_b1: torch.Tensor
    mlp_w2: torch.Tensor
    mlp_b2: torch.Tensor
    ve_w1: torch.Tensor
    ve_b1: torch.Tensor
    ve_w2: torch.Tensor
    ve_b2: torch.Tensor
    w_ih: torch.Tensor
    b_ih: torch.Tensor
    w_hh: torch.Tensor
    b_hh: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The 12 tensors in field order (``mlp_w1`` … ``b_hh``)."""
        return tuple(getattr(self, f.name) for f in fields(self) if f.name not in ("hid", "use_ve"))


class GatedGNN(nn.Module):
    def __init__(self, hid: int, ve: bool = True) -> None:
        super().__init__()
        self.hid = hid
        self.ve = ve
        self.mlp = MessageMLP(hid)
        self.mlp_ve = MessageMLP(hid) if ve else None
        self.gru = nn.GRUCell(hid, hid)

    # -- the four parts ------------------------------------------------------------------------
    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sender message terms ``(N, hid)`` → ``(N, 2·hid)``: ``[MLP(h), MLP_ve(h)]``.

        A message depends on its sender's state and the distance only, so a sweep computes these
        once per node (right after the node is updated) instead of once per edge."""
        out = [self.mlp(h)]
        if self.mlp_ve is not None:
            out.append(self.mlp_ve(h))
        return torch.cat(out, dim=1)

    def message(self, proj_src: torch.Tensor, one_hop: torch.Tensor, inv_dist: torch.Tensor) -> torch.Tensor:
        r"""Per-edge messages :math:`[d_{uv}=1]\,\mathrm{MLP}(h_u) + \mathrm{MLP}_{ve}(h_u)/d_{uv}`.

        Shapes: ``proj_src (E, 2·hid)`` (the senders' :meth:`project` rows), ``one_hop (E,)``,
        ``inv_dist (E,)`` → ``(E, hid)``."""
        msg = proj_src[:, : self.hid] * one_hop[:, None]
        if self.mlp_ve is not None:
            msg = msg + proj_src[:, self.hid :] * inv_dist[:, None]
        return msg

    @staticmethod
    def aggregate(msg: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
        """Sum of messages per receiver: ``msg (E, hid)``, ``dst (E,)`` in ``[0, n)`` → ``(n, hid)``."""
        return torch.zeros(n, msg.shape[1], dtype=msg.dtype, device=msg.device).index_add_(0, dst, msg)

    def update(self, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``GRUCell(m, h)`` ``(n, hid)``, in ``h``'s dtype (autocast computes the cell in low
        precision; node states keep theirs)."""
        return self.gru(m, h).to(h.dtype)

    def packed_weights(self, device: torch.device | str = "cpu") -> GatedGNNWeights:
        """This GNN's weights as one :class:`GatedGNNWeights` on ``device`` (detached copies)."""
        mlp = self.mlp.fc
        ve = self.mlp_ve.fc if self.mlp_ve is not None else mlp  # placeholders when use_ve is off

        def mat(w: torch.Tensor) -> torch.Tensor:  # (out, in) -> (in, out)
            return w.detach().to(device=device, dtype=torch.float32).t().contiguous()

        def vec(b: torch.Tensor) -> torch.Tensor:
            return b.detach().to(device=device, dtype=torch.float32).contiguous()

        gru = self.gru
        return GatedGNNWeights(
            hid=self.hid, use_ve=self.mlp_ve is not None,
            mlp_w1=mat(mlp[0].weight), mlp_b1=vec(mlp[0].bias), mlp_w2=mat(mlp[2].weight), mlp_b2=vec(mlp[2].bias),
            ve_w1=mat(ve[0].weight), ve_b1=vec(ve[0].bias), ve_w2=mat(ve[2].weight), ve_b2=vec(ve[2].bias),
            w_ih=mat(gru.weight_ih), b_ih=vec(gru.bias_ih), w_hh=mat(gru.weight_hh), b_hh=vec(gru.bias_hh),
        )

    # -- level by level ------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """``h (N, hid)`` → updated ``(N, hid)``: forward then backward sweep, by levels."""
        levels = batch.plan(torch_levels, h.device)
        proj = self.project(h)  # (N, 2·hid), refreshed for each level as it is updated
        for sweep in (levels.forward, levels.backward):
            for lv in sweep:
                if lv.src.numel():
                    msg = self.message(proj[lv.src], lv.one_hop, lv.inv_dist)
                    m = self.aggregate(msg, lv.dst, len(lv.nodes))
                else:
                    m = h.new_zeros(len(lv.nodes), self.hid)
                h_new = self.update(m, h[lv.nodes])
                h = h.index_copy(0, lv.nodes, h_new)
                proj = proj.index_copy(0, lv.nodes, self.project(h_new).to(proj.dtype))
        return h

    # -- the reference loop --------------------------------------------------------------------
    def forward_sequential(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """The reference algorithm (ppuda's loop): for node index i = 0 … Nmax-1 (then back),
        find the edges into node i of every graph, run both MLPs on the senders, scatter the
        messages into one row per graph and update node i of every graph with the GRU."""
        offsets = torch.as_tensor(batch.offsets, device=h.device)
        sizes = offsets[1:] - offsets[:-1]
        edges = torch.as_tensor(batch.edges, device=h.device)
        graph_of_edge = torch.bucketize(edges[:, 0].contiguous(), offsets[1:].contiguous(), right=True)
        local = (edges[:, 0] - offsets[graph_of_edge], edges[:, 1] - offsets[graph_of_edge])
        dist = edges[:, 2].to(h.dtype)
        n_max, n_graphs = int(sizes.max()), len(sizes)
        for forward in (True, False):
            recv, send = (local[1], edges[:, 0]) if forward else (local[0], edges[:, 1])
            for i in range(n_max) if forward else range(n_max - 1, -1, -1):
                m = h.new_zeros(n_graphs, self.hid)
                e_all = torch.nonzero(recv == i).flatten()
                if e_all.numel():
                    e1 = e_all[dist[e_all] == 1]
                    m = m.index_add(0, graph_of_edge[e1], self.mlp(h[send[e1]]).to(m.dtype))
                    if self.mlp_ve is not None:
                        ve = self.mlp_ve(h[send[e_all]]) / dist[e_all, None]
                        m = m.index_add(0, graph_of_edge[e_all], ve.to(m.dtype))
                has = torch.nonzero(sizes > i).flatten()
                idx = offsets[has] + i
                h = h.index_copy(0, idx, self.update(m[has], h[idx]))
        return h


@dataclass(frozen=True)
class LevelTensors:
    """One :class:`~ghn_onnx.graph.batch.SweepLevel` as int64 / fp32 tensors on a device."""

    nodes: torch.Tensor  # (L,) global ids of the nodes updated at this level
    src: torch.Tensor  # (E_L,) sender of each message
    dst: torch.Tensor  # (E_L,) position in ``nodes`` of each receiver
    one_hop: torch.Tensor  # (E_L,)
    inv_dist: torch.Tensor  # (E_L,)


@dataclass(frozen=True)
class TorchLevels:
    """The level sweep's plan: both sweeps' levels as tensors on :attr:`device`."""

    device: str
    forward: tuple[LevelTensors, ...]
    backward: tuple[LevelTensors, ...]


def torch_levels(batch: GraphBatch, device: torch.device | str) -> TorchLevels:
    """``batch``'s levels on ``device``: a :meth:`GraphBatch.plan` builder (``batch.plan(torch_levels,
    device)``), converted once per batch and device."""

    def tensors(lv: SweepLevel) -> LevelTensors:
        def t(a):
            return torch.as_tensor(a, device=device)

        return LevelTensors(nodes=t(lv.nodes), src=t(lv.src), dst=t(lv.dst), one_hop=t(lv.one_hop),
                            inv_dist=t(lv.inv_dist))

    return TorchLevels(str(device), tuple(map(tensors, batch.forward)), tuple(map(tensors, batch.backward)))
