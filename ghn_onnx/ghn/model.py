"""GHN-2 and GHN-3: graph in, every parameter out.

``h0 = embed[primitive] + shape_enc(shape)`` → the configuration's hypernetwork
(:data:`HYPERNETS`: GHN-2's :class:`GatedGNN`, forward + backward sweep; GHN-3's
:class:`GraphTransformer`) → LayerNorm → decoders → tile to the target shape → normalise, with
the decoding rules the configuration names (:data:`~ghn_onnx.ghn.decode.rules.DECODE_RULES`).
Module names follow the reference's state-dict keys (GHN2_FACTS §9) so its checkpoints load
without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from ghn_onnx.graph.batch import GraphBatch
from ghn_onnx.ghn.decode import flat as flat_decode, stores
from ghn_onnx.ghn.hypernet import engines
from ghn_onnx.ghn.config import GHNConfig
from ghn_onnx.ghn.decode.decoder import ConvDecoder, Decoder1D
from ghn_onnx.ghn.decode.flat import TAPS_PER_CHUNK
from ghn_onnx.ghn.hypernet import transformer
from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN
from ghn_onnx.ghn.hypernet.transformer import GraphTransformer
from ghn_onnx.ghn.decode.parameters import (interpolate_taps, normalize_weight, tile, tokens_with_class_token,
                                            weight_scale)
from ghn_onnx.ghn.decode.rules import (BIAS_CLASS, ROW_NORMALIZERS, DecodeSpec, WeightBlock, as_tokens,
                                       classifier_nodes, interpolated, is_weight, vector_row, weight_block,
                                       weight_normalized, whole_block)
from ghn_onnx.ghn.shape_encoder import ShapeEncoder
from ghn_onnx.graph.graph import Graph
from ghn_onnx.graph.primitives import Primitive


@dataclass(frozen=True)
class _Target:
    """One node to decode: where it is and what it must become."""

    node: int  # global node id
    graph: int
    local: int


@dataclass(frozen=True)
class NodeInputs:
    """What the initial states read per node: a plan of the batch (:meth:`GraphBatch.plan`),
    which depends on the graphs and the shape vocabularies only."""

    device: torch.device
    primitive: torch.Tensor  # (N,) int64 primitive ids
    shape_rows: torch.Tensor  # (N, 4) int64 shape-vocabulary rows


@dataclass(frozen=True)
class _Vocabulary:
    """A shape encoder's vocabularies as a plan key: compared by value, carrying their lookup."""

    key: tuple
    indices: Callable = field(compare=False, hash=False)


def node_inputs(batch: GraphBatch, device: torch.device, vocabulary: _Vocabulary) -> NodeInputs:
    """The :class:`NodeInputs` of ``batch`` (use ``batch.plan(node_inputs, device, (vocabulary,))``)."""
    nodes = [n for g in batch.graphs for n in g.nodes]
    prim = np.array([n.primitive.value for n in nodes], dtype=np.int64)
    shape_rows = np.array([vocabulary.indices(n.shape4d) for n in nodes], dtype=np.int64).reshape(-1, 4)
    return NodeInputs(torch.device(device), torch.as_tensor(prim, device=device),
                      torch.as_tensor(shape_rows, device=device))


@dataclass(frozen=True)
class Hypernet:
    """A message-passing network the GHN can run: how to build it from the configuration, and
    the rule that picks the engine running it (``select(device, grad, hid, sequential)``, as
    :func:`ghn_onnx.ghn.hypernet.engines.select`; an engine has ``run(gnn, h, batch)`` and
    ``prepare(batch, device)``)."""

    build: Callable[[GHNConfig], nn.Module]
    select: Callable


#: The configuration's ``hypernet`` → the network (the names of ``GHNConfig``'s choices).
HYPERNETS: dict[str, Hypernet] = {
    "gatedgnn": Hypernet(lambda c: GatedGNN(c.hid, ve=c.ve), engines.select),
    "transformer": Hypernet(lambda c: GraphTransformer(c.hid, c.layers, c.heads), transformer.select),
}


class GHN(nn.Module):
    def __init__(self, config: GHNConfig = GHNConfig()) -> None:
        super().__init__()
        self.config = config
        hid, (out_ch, _, s, _) = config.hid, config.max_shape
        self.embed = nn.Embedding(len(Primitive), hid)
        self.shape_enc = ShapeEncoder(hid, config.num_classes, s)
        self.gnn = self.hypernet.build(config)
        self.ln = nn.LayerNorm(hid) if config.layernorm else None
        self.decoder = ConvDecoder(hid, config.max_shape, config.num_classes)
        self.decoder_1d = Decoder1D(hid, out_ch)
        self.bias_class = nn.Sequential(nn.ReLU(), nn.Linear(out_ch, config.num_classes))

    @property
    def hypernet(self) -> Hypernet:
        """The configuration's message-passing network (:data:`HYPERNETS`)."""
        return HYPERNETS[self.config.hypernet]

    def batch(self, graphs: list[Graph]) -> GraphBatch:
        """The graphs as one :class:`GraphBatch`, with what a no-autograd forward derives from
        the graphs alone built now (node inputs, the decoding plan when autograd is off, the
        plan of the message-passing engine a forward in this autograd mode runs), so that a
        forward does only per-call work. Built lazily instead if the GHN moves."""
        batch = GraphBatch.build(graphs, cutoff=self.config.ve_cutoff, virtual=self.config.ve)
        device = self.embed.weight.device
        self._node_inputs(batch)
        if not torch.is_grad_enabled() and stores.for_device(device) is not None:  # training never uses it
            flat_decode.decode_plan(batch, self.decode_spec, device)
        self.hypernet.select(device, torch.is_grad_enabled(), self.config.hid).prepare(batch, device)
        return batch

    def node_states(self, batch: GraphBatch, sequential: bool = False) -> torch.Tensor:
        """Final node states ``(N, hid)`` for every node of the batch.

        The engine is the hypernetwork's ``select``; for the gated GNN
        :func:`ghn_onnx.ghn.hypernet.engines.select`'s: ``sequential`` runs the reference loop;
        otherwise, without autograd, the numba loop on CPU or the Triton kernel on CUDA; otherwise
        (autograd) the level-by-level PyTorch sweep. The transformer has one (dense) engine."""
        h = self.initial_states(batch)
        engine = self.hypernet.select(h.device, torch.is_grad_enabled(), self.config.hid, sequential)
        h = engine.run(self.gnn, h, batch)
        return self.ln(h) if self.ln is not None else h

    def initial_states(self, batch: GraphBatch) -> torch.Tensor:
        """``h0 = embed[primitive] + shape_enc(shape)`` ``(N, hid)``: where message passing starts."""
        prim, shape_ind = self._node_inputs(batch)
        return self.embed(prim) + self.shape_enc(shape_ind)

    def _node_inputs(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Primitive ids ``(N,)`` and shape-vocabulary rows ``(N, 4)``: the batch's
        :class:`NodeInputs` plan for this device and vocabulary."""
        vocabulary = _Vocabulary(self.shape_enc.vocabulary_key(), self.shape_enc.indices)
        plan = batch.plan(node_inputs, self.embed.weight.device, (vocabulary,))
        return plan.primitive, plan.shape_rows

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
    @property
    def decode_spec(self) -> DecodeSpec:
        """What decoding depends on in the configuration (it keys the batch's decode plan)."""
        return DecodeSpec.of(self.config)

    def decode(self, h: torch.Tensor, batch: GraphBatch, reference: bool = False) -> list[dict[str, torch.Tensor]]:
        """Node states ``(N, hid)`` → per graph ``{tensor: canonical-shape tensor}``.

        Without autograd (and not ``reference``) every tensor is written at once into one flat
        buffer by the device's store (:meth:`decode_flat`; :func:`~ghn_onnx.ghn.decode.stores.for_device`:
        numba on CPU, Triton on CUDA); the tensors are views of it. Otherwise, or where no store
        runs, :meth:`decode_tensors`, tensor by tensor. Same values.
        """
        if not reference and not torch.is_grad_enabled():
            flat = self._decode_flat(h, batch)
            if flat is not None:
                return flat
        return self.decode_tensors(h, batch, reference)

    def decode_flat(self, h: torch.Tensor, batch: GraphBatch, store: str | None = None,
                    dtype: torch.dtype = torch.float32, **options) -> tuple[torch.Tensor, list]:
        """Every predicted parameter of ``batch`` in one flat buffer (no autograd).

        Args:
            h: ``(N, hid)`` final node states (after the LayerNorm), on the device the store
                writes to.
            batch: the graphs; their decode plan is kept with the batch.
            store: a name in :data:`~ghn_onnx.ghn.decode.stores.STORES` (default: the device's,
                :func:`~ghn_onnx.ghn.decode.stores.for_device`).
            dtype: output dtype, one of the store's ``dtypes`` (Triton: fp32, fp16, bf16).
            options: the store's own (Triton: ``block_rows``, ``block_cols``).

        Returns:
            ``(flat, index)``: ``flat`` of shape ``(total,)``; ``index`` lists ``(graph, tensor
            name, offset, canonical shape)``; :func:`~ghn_onnx.ghn.decode.flat.split_flat` turns
            them into :meth:`decode`'s dicts.
        """
        if h.dim() != 2 or h.shape != (batch.n_nodes, self.config.hid):
            raise ValueError(f"Expected h of shape ({batch.n_nodes}, {self.config.hid}) (got {tuple(h.shape)})")
        chosen = stores.get(store) if store is not None else stores.for_device(h.device)
        if chosen is None:
            raise ValueError(f"Expected a device with a flat-decode store (got {h.device})")
        if dtype not in chosen.dtypes:
            raise ValueError(f"Expected an output dtype in {chosen.dtypes} for the {chosen.name} store (got {dtype})")
        plan = flat_decode.decode_plan(batch, self.decode_spec, h.device)
        with torch.no_grad():
            src = flat_decode.decode_sources(h.float(), plan, self.decoder, self.decoder_1d, self.bias_class)
            return chosen.write(plan, src, dtype, **options), plan.index

    def _decode_flat(self, h: torch.Tensor, batch: GraphBatch) -> list[dict[str, torch.Tensor]] | None:
        """The inference path through the device's store; None where no store runs."""
        store = stores.for_device(h.device)
        if store is None:
            return None
        flat, index = self.decode_flat(h, batch, store.name)
        return flat_decode.split_flat(flat, index, len(batch.graphs))

    def decode_tensors(self, h: torch.Tensor, batch: GraphBatch,
                       reference: bool = False) -> list[dict[str, torch.Tensor]]:
        """:meth:`decode` in PyTorch ops, tensor by tensor (differentiable: the training path).

        ``reference`` does what GHN-2 does, and is the oracle of the flat path: decode the whole
        64×64 block from the whole ``s × s`` template, tile, then normalise the tiled tensor.
        Otherwise (same values): decode only the block rows the target needs (its
        :func:`~ghn_onnx.ghn.decode.rules.weight_block`, row selection of the last 1×1 conv) from
        only the template taps it reads, apply the normalisation to the small block (one factor
        per tensor, or elementwise), and write the tiled result in one copy.

        Which taps, which classifier nodes and which 1-D rows are the rules of
        :mod:`~ghn_onnx.ghn.decode.rules`, shared with the flat plan; the maths here (whole blocks,
        tiling by :func:`~ghn_onnx.ghn.decode.parameters.tile`, normalising after it) is not.
        """
        spec = self.decode_spec
        out: list[dict[str, torch.Tensor]] = [{} for _ in batch.graphs]
        weights: dict[WeightBlock, list[_Target]] = {}
        vectors: list[_Target] = []
        for b, g in enumerate(batch.graphs):
            cls_w, _ = classifier_nodes(g)
            for i, n in enumerate(g.nodes):
                if not n.params:
                    continue
                t = _Target(int(batch.offsets[b]) + i, b, i)
                if is_weight(n):
                    block = weight_block(spec, n, i == cls_w)
                    weights.setdefault(whole_block(spec, block) if reference else block, []).append(t)
                else:
                    vectors.append(t)
        self._decode_weights(h, batch, weights, out, reference)
        self._decode_vectors(h, batch, vectors, out, reference)
        return out

    def _decode_weights(self, h, batch, groups: dict[WeightBlock, list[_Target]], out, reference: bool) -> None:
        spec = self.decode_spec
        for key, targets in sorted(groups.items()):
            kh, kw = key.kh, key.kw
            chunk = max(1, TAPS_PER_CHUNK // (kh * kw))
            for start in range(0, len(targets), chunk):
                part = targets[start:start + chunk]
                idx = torch.as_tensor([t.node for t in part], device=h.device)
                # The reference computes the whole s×s template and crops the window; the fast
                # path only the window's kh×kw taps.
                if reference:
                    template = self.decoder.template(h[idx])[:, :, key.y0:key.y0 + kh, key.x0:key.x0 + kw]
                else:
                    template = self.decoder.template(h[idx], (kh, kw), (key.y0, key.x0))
                blocks = self.decoder.blocks(template, kh, kw, key.rows, key.cols)
                if key.is_cls:
                    blocks = self.decoder.classifier(blocks)  # (n, classes, in)
                for t, block in zip(part, blocks):
                    node = batch.graphs[t.graph].nodes[t.local]
                    p = node.params[0]
                    target = p.canonical_shape
                    w = block if key.is_cls else _shaped(spec, node, block, len(target))
                    normalize = weight_normalized(spec, node)
                    if reference:
                        w = tile(w, target)
                        w = normalize_weight(w) if normalize else w
                    else:
                        w = w[tuple(slice(0, min(a, b)) for a, b in zip(w.shape, target))]
                        w = tile(w * weight_scale(target) if normalize else w, target)
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
                row = vector_row(node, p, is_cls)
                v = (cls_rows if row.head == BIAS_CLASS else rows)[k, row.row]
                norm = ROW_NORMALIZERS[row.row]
                if reference:
                    v = tile(v, p.canonical_shape)
                    v = norm(v) if wn else v
                else:
                    v = tile(norm(v[: p.canonical_shape[0]]) if wn else v, p.canonical_shape)
                out[t.graph][p.tensor] = v


def _shaped(spec: DecodeSpec, node, block: torch.Tensor, rank: int) -> torch.Tensor:
    """A decoded ``(o, i, kh', kw')`` block as what tiling reads for a target of ``rank``: GHN-3's
    token sequence (:func:`~ghn_onnx.ghn.decode.rules.as_tokens`), its resized large kernels
    (:func:`~ghn_onnx.ghn.decode.rules.interpolated`), else the block at the target's rank."""
    if as_tokens(spec, node):
        return tokens_with_class_token(block)
    if interpolated(spec, node):
        block = interpolate_taps(block, *node.shape4d[2:])
    return _as_rank(block, rank)


def _as_rank(block: torch.Tensor, rank: int) -> torch.Tensor:
    """A decoded ``(o, i, kh, kw)`` block viewed at the target's rank (centre-free, top-left)."""
    if rank == 4:
        return block
    if rank == 3:
        return block[:, :, :, 0]
    if rank == 2:
        return block[:, :, 0, 0]
    return block[:, 0, 0, 0]
