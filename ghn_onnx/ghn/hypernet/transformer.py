r"""GHN-3's graph transformer: a stack of pre-LN transformer layers over every node at once.

The graph enters only through structure (GHN2_FACTS §7; ``ghn3-parity/README.md``). With ``A`` the
``(N, N)`` shortest-path distances of a graph (0 = no path or longer than the cut-off, 1 = an edge,
up to 50), layer 0 first adds to every node state

.. math::
    x_v \mathrel{+}= E_{in}[\min(\deg^-_v, 100)] + E_{out}[\min(\deg^+_v, 100)]
        + E_{dist}[\min(A_{0v}, 1000)]

(one-hop in- and out-degrees, distance from the input node 0), and computes one attention bias
per head, shared by all layers:

.. math::
    b_{ij} = W_2\,\mathrm{ReLU}(W_1 [E_e[A_{ij} + 2] \,\|\, E_e[A_{ji} + 2]] + c_1) + c_2
    \in \mathbb{R}^{heads}.

Every layer ``l`` then computes (pre-LN, no dropout)

.. math::
    x \mathrel{+}= W_o\,\mathrm{Attn}(\mathrm{LN}_1(x); b) + c_o, \qquad
    x \mathrel{+}= \mathrm{FFN}(\mathrm{LN}_2(x)),

with ``Attn`` multi-head softmax attention (``qkv`` without bias, scale ``head_dim^-1/2``, the
bias added to the logits: :func:`torch.nn.functional.scaled_dot_product_attention` with an
additive mask) and ``FFN = Linear(hid, 4 hid) → GELU (erf) → Linear(4 hid, hid)``. The GHN's own
LayerNorm follows, as for GHN-2.

Several graphs run as one dense batch: per graph its distance matrix, zero-padded to
``(B, Nmax, Nmax)``; attention between a real and a padded node is masked (a logit of
:data:`MASKED` ≈ −2¹⁵: ``exp`` of it is 0 in fp32, so a graph's result does not depend on what it is
batched with), padded states are zeroed after the structural embeddings and dropped at the end.
Node ``i`` of graph ``b`` is row ``b · Nmax + i`` of the dense states (not GHN-3's unpadded offset,
GHN2_FACTS §7's bug).

The bias MLP depends on the pair ``(A_ij, A_ji)`` only, and a batch has few distinct distances
(at most ``cutoff + 1``), so it is evaluated once per distinct pair, ``(U, U, heads)``, and
gathered: the same values as running it on the ``(B, N, N, 2 hid)`` pair embeddings, without
that tensor (2 GB for GHN-3-XL on an 816-node graph).

Module and parameter names are ghn3's state-dict keys (``gnn.{l}.attn.to_qkv.weight``, ...), so
its weights load without renaming (:mod:`~ghn_onnx.ghn.reference_formats` moves its top-level
structural tables into layer 0).

Shapes: ``h (N, hid)`` node states of the batch (sparse rows, graph by graph) → ``(N, hid)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ghn_onnx.ghn.hypernet.engines import MessagePassingEngine
from ghn_onnx.graph.batch import GraphBatch

#: Clip of the degree tables (101 rows) and of the input-distance table (1001 rows).
MAX_DEGREE = 100
MAX_INPUT_DIST = 1000
#: Rows of the edge-distance table: distances up to 254 (the lookup adds 2).
EDGE_TABLE_ROWS = 257
#: The logit added where attention is masked (padded nodes); finite, so no row is all -inf.
MASKED = -(2.0 ** 15)


@dataclass(frozen=True)
class DensePlan:
    """A batch as dense padded graphs: a plan of the batch (``batch.plan(dense_plan, device)``).

    Attributes:
        device: where the tensors live.
        n_max: ``Nmax``, the largest graph's node count.
        rows: ``(N,)`` int64, the dense row ``b · Nmax + i`` of every node of the batch.
        pad: ``(B, Nmax)`` bool, True for padding.
        in_degree, out_degree: ``(B, Nmax)`` int64 one-hop degrees, clipped to :data:`MAX_DEGREE`.
        input_dist: ``(B, Nmax)`` int64 ``A[0, v]`` clipped to :data:`MAX_INPUT_DIST`.
        values: ``(U,)`` int64, the distinct distances of the batch (0 included).
        pair_index: ``(B, Nmax, Nmax)`` int64 ``u(A_ij) · U + u(A_ji)``, ``u`` the position in
            ``values``: which row of the per-pair bias table each pair reads.
    """

    device: torch.device
    n_max: int
    rows: torch.Tensor
    pad: torch.Tensor
    in_degree: torch.Tensor
    out_degree: torch.Tensor
    input_dist: torch.Tensor
    values: torch.Tensor
    pair_index: torch.Tensor


def dense_plan(batch: GraphBatch, device: torch.device | str) -> DensePlan:
    """The :class:`DensePlan` of ``batch`` on ``device``, from the batch's edges (their distances
    are the virtual-edge cut-off's, or 1 for one-hop edges only when virtual edges are off)."""
    sizes = np.diff(batch.offsets).astype(np.int64)
    n_graphs, n_max = len(sizes), int(sizes.max())
    graph_of_node = np.repeat(np.arange(n_graphs), sizes)
    local = np.arange(int(batch.offsets[-1])) - batch.offsets[:-1][graph_of_node]
    rows = graph_of_node * n_max + local
    dist = np.zeros((n_graphs * n_max, n_max), dtype=np.int64)
    src, dst, d = batch.edges[:, 0], batch.edges[:, 1], batch.edges[:, 2]
    dist[rows[src], local[dst]] = d
    dist = dist.reshape(n_graphs, n_max, n_max)
    one_hop = (dist == 1)
    pad = np.ones((n_graphs, n_max), dtype=bool)
    pad[graph_of_node, local] = False
    if dist.max(initial=0) > EDGE_TABLE_ROWS - 3:
        raise ValueError(f"Expected distances up to {EDGE_TABLE_ROWS - 3} (got {dist.max()}): lower the cut-off")
    values = np.flatnonzero(np.bincount(dist.ravel(), minlength=1))  # the distinct distances, without a sort
    position = np.zeros(EDGE_TABLE_ROWS, dtype=np.int64)
    position[values] = np.arange(len(values))
    inverse = position[dist]
    pair = inverse * len(values) + inverse.transpose(0, 2, 1)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), device=device)

    return DensePlan(
        device=torch.device(device), n_max=n_max, rows=t(rows), pad=t(pad),
        in_degree=t(np.minimum(one_hop.sum(1), MAX_DEGREE)), out_degree=t(np.minimum(one_hop.sum(2), MAX_DEGREE)),
        input_dist=t(np.minimum(dist[:, 0, :], MAX_INPUT_DIST)), values=t(values), pair_index=t(pair),
    )


class EdgeEmbedding(nn.Module):
    """The distance table ``E_e`` (``embed``: :data:`EDGE_TABLE_ROWS` × hid)."""

    def __init__(self, hid: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(EDGE_TABLE_ROWS, hid)

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        """Distances ``(...)`` (0 = none) → ``(..., hid)`` rows ``dist + 2``."""
        return self.embed(dist + 2)


class GraphAttention(nn.Module):
    """Multi-head attention with an additive per-head bias; layer 0 also owns the bias MLP
    (``edge_embed``, ``proj_e``)."""

    def __init__(self, hid: int, heads: int, edge_bias: bool) -> None:
        super().__init__()
        if hid % heads:
            raise ValueError(f"Expected hid divisible by heads (got hid {hid}, heads {heads})")
        self.heads = heads
        self.to_qkv = nn.Linear(hid, 3 * hid, bias=False)
        self.to_out = nn.Sequential(nn.Linear(hid, hid))
        if edge_bias:
            self.edge_embed = EdgeEmbedding(hid)
            self.proj_e = nn.Sequential(nn.Linear(2 * hid, hid), nn.ReLU(), nn.Linear(hid, heads))

    def pair_bias(self, plan: DensePlan) -> torch.Tensor:
        """The attention bias ``(B, heads, Nmax, Nmax)``, :data:`MASKED` where a padded node is
        involved: the MLP on each distinct ``(A_ij, A_ji)`` pair, gathered per pair."""
        e = self.edge_embed(plan.values)  # (U, hid)
        u = len(plan.values)
        pairs = torch.cat([e[:, None].expand(u, u, -1), e[None, :].expand(u, u, -1)], dim=-1)  # (U, U, 2·hid)
        table = self.proj_e(pairs).view(u * u, self.heads)  # (U², heads)
        bias = table[plan.pair_index].permute(0, 3, 1, 2)  # (B, heads, Nmax, Nmax)
        masked = plan.pad[:, None, :, None] | plan.pad[:, None, None, :]
        return bias.masked_fill(masked, MASKED)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x (B, N, hid)``, ``bias (B, heads, N, N)`` → ``(B, N, hid)``."""
        b, n, hid = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, hid // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, H, N, d)
        return self.to_out(y.transpose(1, 2).reshape(b, n, hid))


class FeedForward(nn.Module):
    """``Linear(hid, 4 hid) → GELU → Linear(4 hid, hid)``; index 2 is the (absent) dropout's slot,
    so the layers keep ghn3's names ``net.0`` and ``net.3``."""

    def __init__(self, hid: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hid, 4 * hid), nn.GELU(), nn.Identity(), nn.Linear(4 * hid, hid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerLayer(nn.Module):
    """One pre-LN layer; ``first`` adds the structural embeddings and the bias MLP."""

    def __init__(self, hid: int, heads: int, first: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hid)
        self.attn = GraphAttention(hid, heads, edge_bias=first)
        self.ln2 = nn.LayerNorm(hid)
        self.ff = FeedForward(hid)
        if first:
            self.centrality_embed_in = nn.Embedding(MAX_DEGREE + 1, hid)
            self.centrality_embed_out = nn.Embedding(MAX_DEGREE + 1, hid)
            self.input_dist_embed = nn.Embedding(MAX_INPUT_DIST + 1, hid)

    def structure(self, x: torch.Tensor, plan: DensePlan) -> torch.Tensor:
        """Layer 0's structural embeddings added to ``x (B, N, hid)``; padded rows zeroed."""
        x = (x + self.centrality_embed_in(plan.in_degree) + self.centrality_embed_out(plan.out_degree)
             + self.input_dist_embed(plan.input_dist))
        return x.masked_fill(plan.pad[..., None], 0.0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), bias)
        return x + self.ff(self.ln2(x))


class GraphTransformer(nn.ModuleList):
    """The layer stack (a ``ModuleList``, so its keys are ghn3's ``gnn.{l}.*``).

    Args:
        hid: node state size.
        layers: transformer layers (GHN-3-T: 3).
        heads: attention heads (GHN-3-T: 8).
    """

    def __init__(self, hid: int, layers: int, heads: int) -> None:
        super().__init__([TransformerLayer(hid, heads, first=(i == 0)) for i in range(layers)])
        self.hid = hid
        self.heads = heads

    def forward(self, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """``h (N, hid)`` initial states of the batch's nodes → final states ``(N, hid)``."""
        plan = batch.plan(dense_plan, h.device)
        n_graphs = int(plan.pad.shape[0])
        x = h.new_zeros(n_graphs * plan.n_max, self.hid).index_copy(0, plan.rows, h)
        x = x.view(n_graphs, plan.n_max, self.hid)  # (B, Nmax, hid)
        first = self[0]
        x = first.structure(x, plan)
        bias = first.attn.pair_bias(plan)  # (B, heads, Nmax, Nmax), shared by every layer
        for layer in self:
            x = layer(x, bias)
        return x.reshape(-1, self.hid)[plan.rows]


@dataclass(frozen=True)
class DenseEngine(MessagePassingEngine):
    """The transformer's one engine, a :class:`~ghn_onnx.ghn.hypernet.engines.MessagePassingEngine`
    (not in GHN-2's registry, which lists the gated GNN's): the dense batch in PyTorch, on any
    device, with autograd."""

    name: str = "dense"

    def prepare(self, batch: GraphBatch, device: torch.device | str) -> None:
        batch.plan(dense_plan, torch.device(device))

    def run(self, gnn: GraphTransformer, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        return gnn(h, batch)


ENGINE = DenseEngine()


def select(device: torch.device | str, grad: bool, hid: int = 32, sequential: bool = False) -> DenseEngine:
    """The engine a transformer forward runs (the one there is; ``sequential`` changes nothing),
    with :func:`~ghn_onnx.ghn.hypernet.engines.select`'s signature."""
    return ENGINE
