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

Two ways to run it, computing the same thing:

* :meth:`GatedGNN.forward_sequential`: the reference loop, one step per node index across the
  batch (as ppuda does; kept for tests and benchmarks);
* :meth:`GatedGNN.forward`: level by level over a :class:`~ghn_onnx.graph.batch.GraphBatch`; a
  node's messages come from lower levels only, so each level is one batched update.
"""

from __future__ import annotations

import torch
from torch import nn

from ghn_onnx.graph.batch import GraphBatch, SweepLevel


class MessageMLP(nn.Module):
    def __init__(self, hid: int) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hid, hid // 2), nn.ReLU(), nn.Linear(hid // 2, hid), nn.ReLU())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


class GatedGNN(nn.Module):
    def __init__(self, hid: int, ve: bool = True) -> None:
        super().__init__()
        self.hid = hid
        self.ve = ve
        self.mlp = MessageMLP(hid)
        self.mlp_ve = MessageMLP(hid) if ve else None
        self.gru = nn.GRUCell(hid, hid)

    # -- the three parts -----------------------------------------------------------------------
    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Per-sender message terms ``(N, hid)`` → ``(N, 2·hid)``: ``[MLP(h), MLP_ve(h)]``.

        A message depends on its sender's state and the distance only, so a sweep computes these
        once per node (right after the node is updated) instead of once per edge."""
        out = [self.mlp(h)]
        if self.mlp_ve is not None:
            out.append(self.mlp_ve(h))
        return torch.cat(out, dim=1)

    def message(self, proj_src: torch.Tensor, one_hop: torch.Tensor, inv_dist: torch.Tensor) -> torch.Tensor:
        """Per-edge messages ``(E, hid)`` from the senders' projections ``(E, 2·hid)``."""
        msg = proj_src[:, : self.hid] * one_hop[:, None]
        if self.mlp_ve is not None:
            msg = msg + proj_src[:, self.hid :] * inv_dist[:, None]
        return msg

    @staticmethod
    def aggregate(msg: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
        """Sum of messages per receiver: ``(E, hid)`` → ``(n, hid)``."""
        return torch.zeros(n, msg.shape[1], dtype=msg.dtype, device=msg.device).index_add_(0, dst, msg)

    def update(self, m: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.gru(m, h)

    # -- level by level ------------------------------------------------------------------------
    def forward(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """``h (N, hid)`` → updated ``(N, hid)``: forward then backward sweep, by levels."""
        levels = _device_levels(batch, h.device)
        proj = self.project(h)  # (N, 2·hid), refreshed for each level as it is updated
        for sweep in (levels["forward"], levels["backward"]):
            for lv in sweep:
                nodes = lv["nodes"]
                if lv["src"].numel():
                    msg = self.message(proj[lv["src"]], lv["one_hop"], lv["inv_dist"])
                    m = self.aggregate(msg, lv["dst"], len(nodes))
                else:
                    m = h.new_zeros(len(nodes), self.hid)
                h_new = self.update(m, h[nodes])
                h = h.index_copy(0, nodes, h_new)
                proj = proj.index_copy(0, nodes, self.project(h_new))
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
                    m = m.index_add(0, graph_of_edge[e1], self.mlp(h[send[e1]]))
                    if self.mlp_ve is not None:
                        ve = self.mlp_ve(h[send[e_all]]) / dist[e_all, None]
                        m = m.index_add(0, graph_of_edge[e_all], ve)
                has = torch.nonzero(sizes > i).flatten()
                idx = offsets[has] + i
                h = h.index_copy(0, idx, self.update(m[has], h[idx]))
        return h


def _device_levels(batch: GraphBatch, device: torch.device) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Level index arrays as tensors on ``device``, converted once per batch and device."""
    cache = batch.__dict__.setdefault("_torch_levels", {})
    key = str(device)
    if key not in cache:
        cache[key] = {name: [_level_tensors(lv, device) for lv in levels]
                      for name, levels in (("forward", batch.forward), ("backward", batch.backward))}
    return cache[key]


def _level_tensors(lv: SweepLevel, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        "nodes": torch.as_tensor(lv.nodes, device=device),
        "src": torch.as_tensor(lv.src, device=device),
        "dst": torch.as_tensor(lv.dst, device=device),
        "one_hop": torch.as_tensor(lv.one_hop, device=device),
        "inv_dist": torch.as_tensor(lv.inv_dist, device=device),
    }
