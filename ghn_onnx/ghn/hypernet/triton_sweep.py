r"""GHN-2 message passing in Triton: the forward and backward GRU sweeps over topological levels.

For every node :math:`v` of a level (forward sweep: in-edges :math:`u \to v`; backward sweep: the
same edges reversed), with the senders' projections :math:`P_u = [\mathrm{MLP}(h_u),
\mathrm{MLP}_{ve}(h_u)]` already final:

.. math::
    m_v = \sum_{u \to v} \big( [d_{uv} = 1]\, P_u[:H] + P_u[H:] / d_{uv} \big),
    \qquad h_v \leftarrow \mathrm{GRUCell}(m_v, h_v),
    \qquad P_v \leftarrow [\mathrm{MLP}(h_v), \mathrm{MLP}_{ve}(h_v)]

(:class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNN` documents the maths; this file computes exactly
``GatedGNN.forward``). It takes the same inputs as the numba loop: the weights as
:class:`~ghn_onnx.ghn.hypernet.gatedgnn.GatedGNNWeights` and the edges as the shared
:class:`~ghn_onnx.ghn.hypernet.sweep_plan.SweepCSR`, in level order (copied to the device once per
batch: :class:`TritonSweepPlan`). One program takes ``BLOCK_N`` nodes of a level: it walks their
edges in chunks of ``BLOCK_E`` (the edges of consecutive slots are contiguous),
gathers the senders' projection rows, weights them by the one-hop mask and ``1/d`` and sums them
per receiver with a one-hot ``(BLOCK_N, BLOCK_E)`` matrix product; then runs the GRU cell and
both MLPs on the ``(BLOCK_N, H)`` tile with every weight held in registers, and writes ``h`` and
``P`` back in place for later levels.

Two launch strategies run the same kernel:

* *persistent*: one program walks every level of a sweep, with a CTA barrier between levels
  (one launch per sweep: no launch latency, but one SM);
* *per level*: one launch per level, ``cdiv(level width, BLOCK_N)`` programs (wide batches).

Shapes: ``h (N, H)`` fp32 with ``H`` a power of two ≥ 32 (GHN-2: 32); ``N`` = nodes of the batch.
File layout (Triton tutorial habit): kernel → launcher → plain reference; the tests live in
``tests/test_message_passing_engines.py`` (every engine against the reference loop) and
``tests/test_kernels.py`` (launch strategies, tiles, input checks), the timings in
:mod:`ghn_onnx.benchmarks.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN
from ghn_onnx.ghn.hypernet.sweep_plan import RowOrder, SweepCSR, sweep_csr_plan
from ghn_onnx.ghn.triton_support import check_kernel_device
from ghn_onnx.graph.batch import GraphBatch

# A single program runs a whole sweep while the widest level has at most this many nodes; wider
# batches get one launch per level. Not tuned on a GPU yet (see docs/engines.md).
PERSISTENT_MAX_WIDTH = 256


# -- kernel -------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    """tanh from exp, odd-symmetric; a short Taylor series near 0 keeps the relative error small."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    near = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0))))
    t = tl.where(ax < 0.1, near, far)
    return tl.where(x < 0, -t, t)


@triton.jit
def _load_w(w_ptr, col0, K_IN: tl.constexpr, N_OUT: tl.constexpr, STRIDE: tl.constexpr):
    """Columns ``col0 … col0+N_OUT`` of a row-major ``(K_IN, STRIDE)`` weight stored ``(in, out)``
    (:class:`GatedGNNWeights`): the ``(K_IN, N_OUT)`` tile of ``x @ W``."""
    k = tl.arange(0, K_IN)
    j = tl.arange(0, N_OUT)
    return tl.load(w_ptr + k[:, None] * STRIDE + col0 + j[None, :])


@triton.jit
def _mlp(x, w1t, b1, w2t, b2):
    """``relu(relu(x @ w1t + b1) @ w2t + b2)``: ``(BLOCK_N, H)`` → ``(BLOCK_N, H)``."""
    y = tl.maximum(tl.dot(x, w1t, input_precision="ieee") + b1[None, :], 0.0)
    return tl.maximum(tl.dot(y, w2t, input_precision="ieee") + b2[None, :], 0.0)


@triton.jit(do_not_specialize=["level_begin", "level_end"])  # one binary for every level range
def _sweep_kernel(
    h_ptr,  # (N, HID) fp32 node states, updated in place
    proj_ptr,  # (N, 2*HID) fp32 [MLP(h), MLP_ve(h)] of every node, refreshed in place
    slot_node_ptr,  # (N,) int32 node id of each slot (slots: nodes in level order)
    level_ptr,  # (n_levels + 1,) int32 first slot of each level
    edge_ptr,  # (N + 1,) int32 first edge of each slot
    edge_src_ptr,  # (E,) int32 sender node of each edge
    edge_slot_ptr,  # (E,) int32 receiving slot of each edge
    edge_one_ptr,  # (E,) fp32 1.0 for a one-hop edge, else 0.0
    edge_inv_ptr,  # (E,) fp32 1 / shortest-path distance
    mlp_w1, mlp_b1, mlp_w2, mlp_b2,  # message MLP, (in, out): (HID, HID/2), (HID/2,), (HID/2, HID), (HID,)
    ve_w1, ve_b1, ve_w2, ve_b2,  # virtual-edge MLP, same shapes (unused unless USE_VE)
    w_ih, b_ih, w_hh, b_hh,  # GRUCell, (in, out): (HID, 3*HID), (3*HID,), (HID, 3*HID), (3*HID,); gates r, z, n
    level_begin,  # first level this launch runs
    level_end,  # one past the last level this launch runs
    stride_h,  # row stride of h
    stride_p,  # row stride of proj
    HID: tl.constexpr,  # node state size (power of two, >= 32)
    USE_VE: tl.constexpr,  # the virtual-edge MLP exists
    BLOCK_N: tl.constexpr,  # nodes per tile (>= 16, tl.dot's minimum)
    BLOCK_E: tl.constexpr,  # edges gathered per step (>= 16)
    SYNC: tl.constexpr,  # barrier after each level (a program that runs several levels)
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    HALF: tl.constexpr = HID // 2
    cols = tl.arange(0, HID)

    # Every weight once, as register tiles of x @ W.
    m_w1 = _load_w(mlp_w1, 0, HID, HALF, HALF)
    m_b1 = tl.load(mlp_b1 + tl.arange(0, HALF))
    m_w2 = _load_w(mlp_w2, 0, HALF, HID, HID)
    m_b2 = tl.load(mlp_b2 + cols)
    v_w1 = _load_w(ve_w1, 0, HID, HALF, HALF)  # loaded even without USE_VE (then a copy of the MLP)
    v_b1 = tl.load(ve_b1 + tl.arange(0, HALF))
    v_w2 = _load_w(ve_w2, 0, HALF, HID, HID)
    v_b2 = tl.load(ve_b2 + cols)
    w_ir = _load_w(w_ih, 0, HID, HID, 3 * HID)
    w_iz = _load_w(w_ih, HID, HID, HID, 3 * HID)
    w_in = _load_w(w_ih, 2 * HID, HID, HID, 3 * HID)
    w_hr = _load_w(w_hh, 0, HID, HID, 3 * HID)
    w_hz = _load_w(w_hh, HID, HID, HID, 3 * HID)
    w_hn = _load_w(w_hh, 2 * HID, HID, HID, 3 * HID)
    b_r = tl.load(b_ih + cols) + tl.load(b_hh + cols)
    b_z = tl.load(b_ih + HID + cols) + tl.load(b_hh + HID + cols)
    b_in = tl.load(b_ih + 2 * HID + cols)
    b_hn = tl.load(b_hh + 2 * HID + cols)

    for lv in range(level_begin, level_end):
        lo = tl.load(level_ptr + lv)
        hi = tl.load(level_ptr + lv + 1)
        for start in range(lo + pid * BLOCK_N, hi, n_prog * BLOCK_N):
            slots = start + tl.arange(0, BLOCK_N)
            valid = slots < hi
            node = tl.load(slot_node_ptr + slots, mask=valid, other=0).to(tl.int64)

            # message + aggregate: the tile's edges are one contiguous range
            e_lo = tl.load(edge_ptr + start)
            e_hi = tl.load(edge_ptr + tl.minimum(start + BLOCK_N, hi))
            m = tl.zeros((BLOCK_N, HID), dtype=tl.float32)
            for e_start in range(e_lo, e_hi, BLOCK_E):
                e = e_start + tl.arange(0, BLOCK_E)
                e_ok = e < e_hi
                src = tl.load(edge_src_ptr + e, mask=e_ok, other=0).to(tl.int64)
                recv = tl.load(edge_slot_ptr + e, mask=e_ok, other=-1)
                one = tl.load(edge_one_ptr + e, mask=e_ok, other=0.0)
                row = proj_ptr + src[:, None] * stride_p + cols[None, :]
                msg = one[:, None] * tl.load(row, mask=e_ok[:, None], other=0.0, cache_modifier=".cg")
                if USE_VE:
                    inv = tl.load(edge_inv_ptr + e, mask=e_ok, other=0.0)
                    msg += inv[:, None] * tl.load(row + HID, mask=e_ok[:, None], other=0.0,
                                                  cache_modifier=".cg")
                hit = (slots[:, None] == recv[None, :]).to(tl.float32)  # (BLOCK_N, BLOCK_E) one-hot
                m += tl.dot(hit, msg, input_precision="ieee")

            # update: GRUCell(m, h)
            h_row = h_ptr + node[:, None] * stride_h + cols[None, :]
            h = tl.load(h_row, mask=valid[:, None], other=0.0, cache_modifier=".cg")
            r = tl.sigmoid(tl.dot(m, w_ir, input_precision="ieee")
                           + tl.dot(h, w_hr, input_precision="ieee") + b_r[None, :])
            z = tl.sigmoid(tl.dot(m, w_iz, input_precision="ieee")
                           + tl.dot(h, w_hz, input_precision="ieee") + b_z[None, :])
            n = _tanh(tl.dot(m, w_in, input_precision="ieee") + b_in[None, :]
                      + r * (tl.dot(h, w_hn, input_precision="ieee") + b_hn[None, :]))
            h_new = (1.0 - z) * n + z * h
            tl.store(h_row, h_new, mask=valid[:, None])

            # project: refresh this node's message terms for the levels after it
            p_row = proj_ptr + node[:, None] * stride_p + cols[None, :]
            tl.store(p_row, _mlp(h_new, m_w1, m_b1, m_w2, m_b2), mask=valid[:, None])
            if USE_VE:
                tl.store(p_row + HID, _mlp(h_new, v_w1, v_b1, v_w2, v_b2), mask=valid[:, None])
        if SYNC:
            tl.debug_barrier()  # this level's stores are visible to the whole program


# -- launcher -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSweep:
    """One sweep's level-order :class:`~ghn_onnx.ghn.hypernet.sweep_plan.SweepCSR` as the kernel
    reads it: int32 / fp32 tensors on the device (*slots* are the rows: nodes level-major).

    Attributes:
        slot_node: ``(N,)`` node id of each slot; level ``l`` holds slots
            ``level_ptr[l] … level_ptr[l+1]``.
        level_ptr: ``(n_levels + 1,)``.
        edge_ptr: ``(N + 1,)`` the edges into slot ``j`` are ``edge_ptr[j] … edge_ptr[j+1]``, so
            the edges of consecutive slots are one contiguous range.
        edge_src, edge_slot, edge_one, edge_inv: ``(E,)`` sender node, receiving slot, one-hop
            mask and ``1 / distance`` of each edge.
        widths: level widths on the host (grids of the per-level launches).
    """

    slot_node: torch.Tensor
    level_ptr: torch.Tensor
    edge_ptr: torch.Tensor
    edge_src: torch.Tensor
    edge_slot: torch.Tensor
    edge_one: torch.Tensor
    edge_inv: torch.Tensor
    widths: np.ndarray

    @classmethod
    def build(cls, csr: SweepCSR, device: torch.device | str) -> "DeviceSweep":
        def i32(a):
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.int32), device=device)

        def f32(a):
            return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)

        return cls(slot_node=i32(csr.row_node), level_ptr=i32(csr.level_ptr), edge_ptr=i32(csr.edge_ptr),
                   edge_src=i32(csr.edge_src), edge_slot=i32(csr.edge_row), edge_one=f32(csr.edge_one_hop),
                   edge_inv=f32(csr.edge_inv_dist), widths=csr.level_widths)


@dataclass(frozen=True)
class TritonSweepPlan:
    """Both sweeps of a batch on :attr:`device`, as the kernel reads them."""

    device: str
    forward: DeviceSweep
    backward: DeviceSweep


def triton_sweep_plan(batch: GraphBatch, device: torch.device | str) -> TritonSweepPlan:
    """:meth:`GraphBatch.plan` builder: ``batch.plan(triton_sweep_plan, device)``, built once per
    batch and device from the batch's level-order :class:`SweepCSR`."""
    if batch.n_nodes >= 2**31 or len(batch.edges) >= 2**31:
        raise ValueError(f"Expected fewer than 2**31 nodes and edges (got {batch.n_nodes}, "
                         f"{len(batch.edges)})")
    csr = sweep_csr_plan(batch, RowOrder.LEVEL)
    return TritonSweepPlan(str(device), DeviceSweep.build(csr.forward, device), DeviceSweep.build(csr.backward, device))


def message_passing(gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch, *, block_nodes: int = 16,
                    block_edges: int = 64, persistent: bool | None = None) -> torch.Tensor:
    """Forward then backward sweep of ``gnn`` over ``batch``: the same result as ``gnn(h, batch)``.

    Args:
        gnn: the GatedGNN whose weights are used (packed fp32: :meth:`GatedGNN.packed_weights`).
        h: ``(N, H)`` fp32 initial node states on a CUDA device (or on the CPU under
            ``TRITON_INTERPRET=1``); not modified.
        batch: the graphs; their :class:`TritonSweepPlan` is built once per device.
        block_nodes: ``BLOCK_N``, nodes per program tile (power of two ≥ 16).
        block_edges: ``BLOCK_E``, edges gathered per step (power of two ≥ 16).
        persistent: one program per sweep (True) or one launch per level (False); None picks
            persistent while the widest level has at most :data:`PERSISTENT_MAX_WIDTH` nodes.

    Returns:
        ``(N, H)`` final node states (no autograd).
    """
    hid = gnn.hid
    if h.dim() != 2 or h.shape != (batch.n_nodes, hid):
        raise ValueError(f"Expected h of shape ({batch.n_nodes}, {hid}) (got {tuple(h.shape)})")
    if h.dtype != torch.float32:
        raise ValueError(f"Expected float32 node states (got {h.dtype})")
    if hid < 32 or hid & (hid - 1):
        raise ValueError(f"Expected a hidden size that is a power of two >= 32 (got {hid})")
    for name, b in (("block_nodes", block_nodes), ("block_edges", block_edges)):
        if b < 16 or b & (b - 1):
            raise ValueError(f"Expected {name} to be a power of two >= 16 (got {b})")
    check_kernel_device(h, _sweep_kernel)

    plan = batch.plan(triton_sweep_plan, h.device)
    if persistent is None:
        persistent = int(max(plan.forward.widths.max(), plan.backward.widths.max())) <= PERSISTENT_MAX_WIDTH
    with torch.no_grad():
        h = h.detach().contiguous().clone()
        proj = h.new_zeros(len(h), 2 * hid)  # [MLP(h), MLP_ve(h)]; the second half unused without ve
        p0 = gnn.project(h)
        proj[:, : p0.shape[1]] = p0
    weights = gnn.packed_weights(h.device)
    meta = dict(HID=hid, USE_VE=weights.use_ve, BLOCK_N=block_nodes, BLOCK_E=block_edges)
    for sweep in (plan.forward, plan.backward):
        args = (h, proj, sweep.slot_node, sweep.level_ptr, sweep.edge_ptr, sweep.edge_src, sweep.edge_slot,
                sweep.edge_one, sweep.edge_inv, *weights.tensors())
        if persistent:
            _sweep_kernel[(1,)](*args, 0, len(sweep.widths), h.stride(0), proj.stride(0), SYNC=True, **meta)
        else:
            for lv, width in enumerate(sweep.widths.tolist()):
                grid = (triton.cdiv(width, block_nodes),)
                _sweep_kernel[grid](*args, lv, lv + 1, h.stride(0), proj.stride(0), SYNC=False, **meta)
    return h


# -- reference ----------------------------------------------------------------------------------
def message_passing_reference(gnn: GatedGNN, h: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
    """The same sweeps in plain PyTorch: ``GatedGNN.forward``, level by level.

    Per level it gathers ``(E_L, 2H)`` projection rows, materialises ``(E_L, H)`` messages,
    scatter-adds them, runs the GRU and both MLPs, and copies ``h`` and ``P`` whole
    (``index_copy``): about 10 kernels and two ``(N, ·)`` copies per level, against the
    kernel's one pass over the level's edges and nodes.
    """
    with torch.no_grad():
        return gnn(h, batch)
