"""GHN-2: graph in, every parameter out.

``h0 = embed[primitive] + shape_enc(shape)`` → :class:`GatedGNN` (forward + backward sweep) →
LayerNorm → decoders → tile to the target shape → normalise. Module names follow the
reference's state-dict keys (GHN2_FACTS §9) so its checkpoints load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ghn_onnx.ghn import triton_support
from ghn_onnx.graph.batch import GraphBatch
from ghn_onnx.ghn.decode import flat as flat_decode, numba_store as fused_tiling
from ghn_onnx.ghn.hypernet import engines
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.decode.decoder import ConvDecoder, Decoder1D
from ghn_onnx.ghn.decode.flat import TAPS_PER_CHUNK, classifier_nodes
from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN
from ghn_onnx.ghn.decode.parameters import (expand_tile, normalize_bias, normalize_scale, normalize_weight,
                                     tile, weight_scale)
from ghn_onnx.ghn.shape_encoder import ShapeEncoder
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import NORM_PRIMITIVES, WEIGHT_PRIMITIVES, Primitive


@dataclass(frozen=True)
class _Target:
    """One node to decode: where it is and what it must become."""

    node: int  # global node id
    graph: int
    local: int


class GHN(nn.Module):
    def __init__(self, config: GHNConfig = GHNConfig()) -> None:
        super().__init__()
        self.config = config
        hid, (out_ch, _, s, _) = config.hid, config.max_shape
        self.embed = nn.Embedding(len(Primitive), hid)
        self.shape_enc = ShapeEncoder(hid, config.num_classes, s)
        self.gnn = GatedGNN(hid, ve=config.ve)
        self.ln = nn.LayerNorm(hid) if config.layernorm else None
        self.decoder = ConvDecoder(hid, config.max_shape, config.num_classes)
        self.decoder_1d = Decoder1D(hid, out_ch)
        self.bias_class = nn.Sequential(nn.ReLU(), nn.Linear(out_ch, config.num_classes))

    def batch(self, graphs: list[Graph]) -> GraphBatch:
        """The graphs as one :class:`GraphBatch`, with what a no-autograd forward derives from
        the graphs alone built now (node inputs, decoding plan, the plan of the message-passing
        engine a forward in this autograd mode runs), so that a forward does only per-call work.
        Built lazily instead if the GHN moves."""
        batch = GraphBatch.build(graphs, cutoff=self.config.ve_cutoff, virtual=self.config.ve)
        device = self.embed.weight.device
        self._node_inputs(batch)
        flat_decode.decode_plan(self, batch, device)
        engines.select(device, torch.is_grad_enabled(), self.config.hid).prepare(batch, device)
        return batch

    def node_states(self, batch: GraphBatch, sequential: bool = False) -> torch.Tensor:
        """Final node states ``(N, hid)`` for every node of the batch.

        The engine is :func:`ghn_onnx.ghn.hypernet.engines.select`'s: ``sequential`` runs the
        reference loop; otherwise, without autograd, the numba loop on CPU or the Triton kernel on
        CUDA; otherwise (autograd) the level-by-level PyTorch sweep."""
        h = self.initial_states(batch)
        engine = engines.select(h.device, torch.is_grad_enabled(), self.config.hid, sequential)
        h = engine.run(self.gnn, h, batch)
        return self.ln(h) if self.ln is not None else h

    def initial_states(self, batch: GraphBatch) -> torch.Tensor:
        """``h0 = embed[primitive] + shape_enc(shape)`` ``(N, hid)``: where message passing starts."""
        prim, shape_ind = self._node_inputs(batch)
        return self.embed(prim) + self.shape_enc(shape_ind)

    def _node_inputs(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Primitive ids ``(N,)`` and shape-vocabulary rows ``(N, 4)``, cached on the batch per
        vocabulary and device (they depend on the graphs only)."""
        device = self.embed.weight.device
        key = (str(device), self.shape_enc.vocabulary_key())
        cache = batch.__dict__.setdefault("_node_inputs", {})
        if key not in cache:
            nodes = [n for g in batch.graphs for n in g.nodes]
            prim = np.array([n.primitive.value for n in nodes], dtype=np.int64)
            indices = self.shape_enc.indices
            shape_ind = np.array([indices(n.shape4d) for n in nodes], dtype=np.int64).reshape(-1, 4)
            cache[key] = torch.as_tensor(prim, device=device), torch.as_tensor(shape_ind, device=device)
        return cache[key]

    def forward(self, batch: GraphBatch | list[Graph], sequential: bool = False) -> list[dict[str, torch.Tensor]]:
        """Predict every parameter of every graph.

        Returns, per graph, ``{tensor name: tensor in canonical shape}`` (fp32, on the GHN's
        device; differentiable with autograd on, views of one buffer without it).
        """
        if not isinstance(batch, GraphBatch):
            batch = self.batch(batch)
        h = self.node_states(batch, sequential)
        return self.decode(h, batch, reference=sequential)

    # -- decoding ------------------------------------------------------------------------------
    def decode(self, h: torch.Tensor, batch: GraphBatch, reference: bool = False) -> list[dict[str, torch.Tensor]]:
        """Node states ``(N, hid)`` → per graph ``{tensor: canonical-shape tensor}``.

        Without autograd (and not ``reference``) every tensor is written at once into one flat
        buffer (:mod:`~ghn_onnx.ghn.decode.flat`: numba on CPU, Triton on CUDA); the tensors are
        views of it. Otherwise :meth:`decode_tensors`, tensor by tensor. Same values.
        """
        if not reference and not torch.is_grad_enabled():
            flat = self._decode_flat(h, batch)
            if flat is not None:
                return flat
        return self.decode_tensors(h, batch, reference)

    def decode_tensors(self, h: torch.Tensor, batch: GraphBatch,
                       reference: bool = False) -> list[dict[str, torch.Tensor]]:
        """:meth:`decode` in PyTorch ops, tensor by tensor (differentiable: the training path).

        ``reference`` does what GHN-2 does: decode full 64×64 blocks, tile, then normalise the
        tiled tensor. Otherwise (same values): decode only the block rows the target needs
        (``min(out, 64) × min(in, 64)`` of the 64×64; row selection of the last 1×1 conv), apply
        the normalisation to the small block (it is one factor per tensor, or elementwise), and
        write the tiled result in one copy.
        """
        out: list[dict[str, torch.Tensor]] = [{} for _ in batch.graphs]
        weights: dict[tuple[int, int, int, int, bool], list[_Target]] = {}
        vectors: list[_Target] = []
        s, max_o, max_i = self.config.max_shape[2], self.config.max_shape[0], self.config.max_shape[1]
        for b, g in enumerate(batch.graphs):
            cls_w, _ = classifier_nodes(g)
            for i, n in enumerate(g.nodes):
                if not n.params:
                    continue
                t = _Target(int(batch.offsets[b]) + i, b, i)
                if n.primitive in WEIGHT_PRIMITIVES or n.primitive is Primitive.POS_ENC:
                    o, ci, kh, kw = n.shape4d
                    is_cls = i == cls_w
                    rows = max_o if (reference or is_cls) else min(o, max_o)
                    cols = max_i if reference else min(ci, max_i)
                    weights.setdefault((min(kh, s), min(kw, s), rows, cols, is_cls), []).append(t)
                else:
                    vectors.append(t)
        self._decode_weights(h, batch, weights, out, reference)
        self._decode_vectors(h, batch, vectors, out, reference)
        return out

    def _decode_flat(self, h: torch.Tensor, batch: GraphBatch) -> list[dict[str, torch.Tensor]] | None:
        """The inference path: numba store on CPU, Triton on CUDA; None where neither runs."""
        if h.device.type == "cpu" and fused_tiling.available():
            plan = flat_decode.decode_plan(self, batch, h.device)
            flat, index = fused_tiling.store(flat_decode.decode_sources(self, h.float(), plan), plan), plan.index
        elif triton_support.available(h.device, self.config.hid):
            from ghn_onnx.ghn.decode.triton_store import decode_flat  # imports Triton

            flat, index = decode_flat(self, h, batch)
        else:
            return None
        return flat_decode.split_flat(flat, index, len(batch.graphs))

    def _decode_weights(self, h, batch, groups, out, reference: bool) -> None:
        for (kh, kw, rows, cols, is_cls), targets in sorted(groups.items()):
            chunk = max(1, TAPS_PER_CHUNK // (kh * kw))
            for start in range(0, len(targets), chunk):
                part = targets[start:start + chunk]
                idx = torch.as_tensor([t.node for t in part], device=h.device)
                # The reference computes the whole s×s template; the fast path only its kh×kw taps.
                template = self.decoder.template(h[idx], None if reference else (kh, kw))
                blocks = self.decoder.blocks(template, kh, kw, rows, cols)
                if is_cls:
                    blocks = self.decoder.classifier(blocks)  # (n, classes, in)
                for t, block in zip(part, blocks):
                    node = batch.graphs[t.graph].nodes[t.local]
                    p = node.params[0]
                    target = p.canonical_shape
                    w = block if is_cls else _as_rank(block, len(target))
                    normalize = self.config.weight_norm and node.primitive is not Primitive.POS_ENC
                    if reference:
                        w = tile(w, target)
                        w = normalize_weight(w) if normalize else w
                    else:
                        w = w[tuple(slice(0, min(a, b)) for a, b in zip(w.shape, target))]
                        w = expand_tile(w * weight_scale(target) if normalize else w, target)
                    out[t.graph][p.tensor] = w

    def _decode_vectors(self, h, batch, targets, out, reference: bool) -> None:
        if not targets:
            return
        idx = torch.as_tensor([t.node for t in targets], device=h.device)
        rows = self.decoder_1d(h[idx])  # (n, 2, max_ch)
        cls_rows = self.bias_class(rows)  # (n, 2, classes); only used by classifier biases
        wn = self.config.weight_norm
        cls_bias = [classifier_nodes(g)[1] for g in batch.graphs]
        for k, t in enumerate(targets):
            node = batch.graphs[t.graph].nodes[t.local]
            is_cls = t.local == cls_bias[t.graph]
            for p in node.params:
                if node.primitive in NORM_PRIMITIVES and p.role == "scale":
                    v, norm = rows[k, 0], normalize_scale
                else:
                    v, norm = (cls_rows if is_cls else rows)[k, 1], normalize_bias
                if reference:
                    v = tile(v, p.canonical_shape)
                    v = norm(v) if wn else v
                else:
                    v = expand_tile(norm(v[: p.canonical_shape[0]]) if wn else v, p.canonical_shape)
                out[t.graph][p.tensor] = v


def _as_rank(block: torch.Tensor, rank: int) -> torch.Tensor:
    """A decoded ``(o, i, kh, kw)`` block viewed at the target's rank (centre-free, top-left)."""
    if rank == 4:
        return block
    if rank == 3:
        return block[:, :, :, 0]
    if rank == 2:
        return block[:, :, 0, 0]
    return block[:, 0, 0, 0]
