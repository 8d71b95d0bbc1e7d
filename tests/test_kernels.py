"""The Triton kernels against their PyTorch references, on fresh random GHN weights and graphs.

Message passing here covers what is Triton's own (launch strategies, tiles and edge chunks,
levels wider than a tile, input checks, the CUDA dispatch); every engine's values against the
reference loop, on every kind of graph, are in ``tests/test_message_passing_engines.py``.

Without CUDA the kernels run in Triton's interpreter on CPU tensors. Triton reads
``TRITON_INTERPRET`` when a ``@triton.jit`` function is defined, its own library functions
(``tl.zeros``, ``tl.sigmoid``, ...) included, i.e. when Triton is first imported. So this file sets
it before importing Triton; if another test module imported Triton earlier in this process (a full
``pytest`` run: torch libraries import it), the kernel tests cannot run here and
``test_kernels_in_fresh_process`` runs this file again in a fresh process instead. The interpreter
costs milliseconds per program and per loop step: small graphs, large tiles. With CUDA (and the
interpreter off) the same comparisons run compiled on the GPU: select them with ``-k cuda``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import triton.language as tl  # noqa: E402

from ghn_onnx.ghn import triton_support  # noqa: E402
from ghn_onnx.graph.batch import GraphBatch  # noqa: E402
from ghn_onnx.convert import convert_file  # noqa: E402
from ghn_onnx.ghn import GHN  # noqa: E402
from ghn_onnx.ghn import checkpoint  # noqa: E402
from ghn_onnx.ghn.decode import stores  # noqa: E402
from ghn_onnx.ghn.decode.flat import split_flat  # noqa: E402
from ghn_onnx.ghn.decode.parameters import tile, tile_periods  # noqa: E402
from ghn_onnx.graph.graph import Graph  # noqa: E402

from ghn_onnx.benchmarks.kernels import bench_kernels  # noqa: E402
from ghn_graphs import (assert_same_predictions, fresh_ghn, odd_shapes_graph, random_dag,  # noqa: E402
                        small_head_graph, two_node_graph)
from ghn_onnx.ghn.hypernet.triton_sweep import (_sweep_kernel, message_passing,  # noqa: E402
                                              message_passing_reference)

# Triton and our kernels were both set up in the mode this process runs the kernels in.
IN_PROCESS = triton_support.interpreted(tl.sigmoid) == INTERPRET == triton_support.interpreted(_sweep_kernel)
_ELSEWHERE = "Triton was imported before TRITON_INTERPRET was set: see test_kernels_in_fresh_process"

DEVICES = [
    pytest.param("cpu", id="cpu-interpreter", marks=[
        pytest.mark.skipif(not INTERPRET, reason="CPU runs need TRITON_INTERPRET=1"),
        pytest.mark.skipif(not IN_PROCESS, reason=_ELSEWHERE)]),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.skipif(not _CUDA or INTERPRET, reason="needs CUDA, interpreter off"),
        pytest.mark.skipif(not IN_PROCESS, reason=_ELSEWHERE)]),
]
# Interpreter cost is per program and per loop step: big tiles on CPU, the defaults on a GPU.
MP_BLOCKS = {"cpu": dict(block_nodes=64, block_edges=512), "cuda": {}}
DEC_BLOCKS = {"cpu": dict(block_rows=32, block_cols=2048), "cuda": {}}
RTOL, ATOL = 1e-5, 1e-5  # fp32: the same maths summed in another order


@pytest.fixture(scope="module")
def parity(shared_dir):
    d = shared_dir / "reference" / "ghn2-parity"
    return {"dir": d, "ghn": checkpoint.load_reference(d / "ghn2_random_cifar10.npz").eval(), "graphs": {}}


def fixture_graph(parity, name: str) -> Graph:
    if name not in parity["graphs"]:
        parity["graphs"][name] = convert_file(parity["dir"] / f"{name}.onnx")
    return parity["graphs"][name]


# -- message passing ----------------------------------------------------------------------------
def _check_mp(ghn: GHN, batch: GraphBatch, device: str, **kw) -> None:
    torch.manual_seed(1)
    h = torch.randn(batch.n_nodes, ghn.config.hid, device=device)
    expected = message_passing_reference(ghn.gnn, h, batch)
    got = message_passing(ghn.gnn, h, batch, **{**MP_BLOCKS[device], **kw})
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert not torch.equal(got, h)


def _widest_level(batch: GraphBatch) -> int:
    return max(len(lv.nodes) for lv in batch.forward + batch.backward)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "per-level"])
def test_message_passing_small_batch(device, persistent):
    """Graphs of 2, 17 and 40 nodes in one batch, both launch strategies, small tiles (several
    tiles per level and several edge chunks per tile)."""
    ghn = fresh_ghn(device)
    batch = GraphBatch.build([random_dag(40, 0), two_node_graph(), random_dag(17, 1)])
    assert _widest_level(batch) > 16  # some level spans two tiles
    _check_mp(ghn, batch, device, persistent=persistent, block_nodes=16, block_edges=16)


@pytest.mark.parametrize("device", DEVICES)
def test_message_passing_800_node_dag(device):
    ghn = fresh_ghn(device, seed=2)
    batch = GraphBatch.build([random_dag(800, 3, fan=3, window=400)])
    assert _widest_level(batch) > 64 and len(batch.edges) > 30_000
    _check_mp(ghn, batch, device, persistent=True)


def test_message_passing_rejects_bad_input():
    ghn = fresh_ghn("cpu")
    batch = GraphBatch.build([random_dag(5, 0)])
    with pytest.raises(ValueError, match="Expected h of shape"):
        message_passing(ghn.gnn, torch.zeros(4, 32), batch)
    with pytest.raises(ValueError, match="float32"):
        message_passing(ghn.gnn, torch.zeros(5, 32, dtype=torch.float64), batch)
    with pytest.raises(ValueError, match="power of two"):
        message_passing(ghn.gnn, torch.zeros(5, 32), batch, block_nodes=8)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_fresh_process():
    """This file again, in a process whose first Triton import sees TRITON_INTERPRET."""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                         cwd=repo, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "skipped" in run.stdout


def test_compiled_kernel_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="Expected a CUDA tensor"):
        triton_support.check_kernel_device(torch.zeros(1), kernel=object())


def test_available_needs_cuda_and_a_supported_size():
    assert not triton_support.available("cpu")
    assert not triton_support.available("cuda", hid=48)
    assert triton_support.available("cuda") == (importlib.util.find_spec("triton") is not None)


@pytest.mark.parametrize("device", DEVICES[1:])
def test_node_states_dispatch_uses_triton_on_cuda(device, parity):
    """Without autograd on CUDA, GHN.node_states takes the Triton path: same states as the
    level path (with autograd)."""
    ghn = parity["ghn"].to(device)
    batch = ghn.batch([fixture_graph(parity, "deepnets_6")])
    with torch.no_grad():
        fast = ghn.node_states(batch)
    level = ghn.node_states(batch).detach()
    torch.testing.assert_close(fast, level, rtol=RTOL, atol=ATOL)
    ghn.cpu()


@pytest.mark.parametrize("device", DEVICES[1:])
def test_decode_dispatch_uses_triton_on_cuda(device, parity):
    """Without autograd on CUDA, GHN.decode writes through the Triton store: views of one flat
    buffer, the values of the tensor-by-tensor path."""
    ghn = parity["ghn"].to(device)
    batch = ghn.batch([fixture_graph(parity, "deepnets_6"), fixture_graph(parity, "resnet18")])
    with torch.no_grad():
        h = ghn.node_states(batch)
        fast = ghn.decode(h, batch)
        slow = ghn.decode_tensors(h, batch)
    storages = {t.untyped_storage().data_ptr() for g in fast for t in g.values()}
    assert len(storages) == 1
    assert_same_predictions(fast, slow, rtol=RTOL, atol=ATOL)
    ghn.cpu()


# -- decoding -----------------------------------------------------------------------------------
def tile_by_index(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """The stores' indexing rule: ``out[o, i, y, x] = block[o % P0, i % P1, y % P2, x % P3]``."""
    idx = [torch.arange(t) % p for p, t in zip(tile_periods(tuple(block.shape), target), target)]
    return block[torch.meshgrid(*idx, indexing="ij")] if idx else block


def tile_ghn2(block: torch.Tensor, target: tuple[int, ...]) -> torch.Tensor:
    """GHN-2's own tiling, dimension by dimension: slice, or repeat the whole block and chop."""
    for d, t in enumerate(target):
        have = block.shape[d]
        if have > t:
            block = block.narrow(d, 0, t)
        elif have < t:
            reps = [1] * block.dim()
            reps[d] = -(-t // have)
            block = block.repeat(*reps).narrow(d, 0, t)
    return block


@pytest.mark.parametrize("block, target", [
    ((64, 64, 3, 3), (10, 3, 3, 3)), ((64, 64, 3, 3), (100, 130, 3, 3)), ((64, 64, 1, 7), (96, 10, 1, 7)),
    ((64, 64, 7, 1), (100, 96, 7, 1)), ((64, 64, 3, 3), (100, 1, 3, 3)), ((64, 64, 11, 11), (5, 7, 16, 16)),
    ((64, 64, 11, 11), (3, 200, 2, 5)), ((10, 64), (1000, 2048)), ((10, 64), (7, 3)), ((64,), (100,)),
    ((64,), (3,)), ((64, 64, 5), (129, 2, 3)),
])
def test_tile_by_index_equals_tile(block, target):
    """out[o,i,y,x] = block[o % min(bo,to), …]: repeats of the whole block, top-left spatial taps;
    ``tile`` equals both GHN-2's slice-repeat-chop and the stores' index rule."""
    b = torch.randn(block)
    assert torch.equal(tile(b, target), tile_ghn2(b, target))
    assert torch.equal(tile_by_index(b, target), tile(b, target))


def _check_decode(ghn: GHN, batch: GraphBatch, device: str, dtype=torch.float32) -> None:
    torch.manual_seed(5)
    h = torch.randn(batch.n_nodes, ghn.config.hid, device=device)
    with torch.no_grad():
        expected = ghn.decode_tensors(h, batch)
    flat, index = ghn.decode_flat(h, batch, "triton", dtype, **DEC_BLOCKS[device])
    assert flat.dtype == dtype and flat.numel() == sum(int(np.prod(s)) for *_, s in index)
    tol = {torch.float32: dict(rtol=RTOL, atol=ATOL), torch.float16: dict(rtol=1e-3, atol=1e-5),
           torch.bfloat16: dict(rtol=8e-3, atol=1e-5)}[dtype]
    assert_same_predictions(split_flat(flat, index, len(batch.graphs)), expected, **tol)


# Each store's options on each device (interpreter cost: big tiles on CPU).
STORE_OPTIONS = {("triton", "cpu"): DEC_BLOCKS["cpu"]}


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", sorted(stores.STORES))
def test_every_store_matches_the_reference(name, device, parity):
    """Every registered store, on every device it runs on, against GHN-2's own decoding
    (``decode_tensors(reference=True)``: whole blocks, tile, then normalise)."""
    reason = stores.get(name).unavailable(torch.device(device))
    if reason is None and device == "cuda" and INTERPRET:
        reason = "TRITON_INTERPRET=1: the kernels run on CPU tensors"
    if reason is not None:
        pytest.skip(f"{name} store on {device}: {reason}")
    ghn = fresh_ghn(device, seed=8)
    graphs = [odd_shapes_graph(), two_node_graph(), small_head_graph(), random_dag(12, 7),
              fixture_graph(parity, "deepnets_9")]
    batch = ghn.batch(graphs)
    h = torch.randn(batch.n_nodes, ghn.config.hid, generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        expected = ghn.decode_tensors(h, batch, reference=True)
    flat, index = ghn.decode_flat(h, batch, name, **STORE_OPTIONS.get((name, device), {}))
    assert_same_predictions(split_flat(flat, index, len(graphs)), expected, rtol=RTOL, atol=ATOL)


def test_unknown_store_is_refused():
    with pytest.raises(ValueError, match="Expected a store in"):
        stores.get("cuda-graphs")
    assert stores.for_device("meta") is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_decode_odd_shapes(device, dtype):
    ghn = fresh_ghn(device, seed=6)
    batch = ghn.batch([odd_shapes_graph(), two_node_graph(), small_head_graph(), random_dag(12, 7)])
    _check_decode(ghn, batch, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_without_weight_norm_imagenet_shape(device):
    """Raw decoder outputs (GHN-1 style), s = 16 and 1000 classes."""
    ghn = fresh_ghn(device, seed=7, weight_norm=False, max_shape=(64, 64, 16, 16), num_classes=1000)
    _check_decode(ghn, ghn.batch([odd_shapes_graph()]), device)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_fixture_graphs(device, parity):
    ghn = parity["ghn"].to(device)
    batch = ghn.batch([fixture_graph(parity, n) for n in ("mobilenet_v2", "deepnets_9", "deepnets_17")])
    _check_decode(ghn, batch, device)
    ghn.cpu()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_flat_matches_ppuda_fixture(device, parity):
    """End to end: states from the GHN, parameters from the kernel, values from ppuda."""
    ghn = parity["ghn"].to(device)
    graph = fixture_graph(parity, "deepnets_11")
    batch = ghn.batch([graph])
    with torch.no_grad():
        h = ghn.node_states(batch)
    flat, index = ghn.decode_flat(h, batch, "triton", **DEC_BLOCKS[device])
    pred = split_flat(flat, index, 1)[0]
    expected = np.load(parity["dir"] / "deepnets_11.expected.npz")
    names = {k.split("::")[0] for k in expected.files}
    assert set(pred) == names
    for name in names:
        v = pred[name].cpu().numpy().ravel()
        if f"{name}::index" in expected.files:
            v = v[expected[f"{name}::index"]]
        np.testing.assert_allclose(v, expected[f"{name}::values"].ravel(), atol=1e-4, err_msg=name)
    ghn.cpu()


def test_decode_rejects_bad_input():
    ghn = fresh_ghn("cpu")
    batch = ghn.batch([two_node_graph()])
    with pytest.raises(ValueError, match="Expected h of shape"):
        ghn.decode_flat(torch.zeros(3, 32), batch, "triton")
    with pytest.raises(ValueError, match="output dtype"):
        ghn.decode_flat(torch.zeros(2, 32), batch, "triton", torch.float64)
    with pytest.raises(ValueError, match="output dtype"):
        ghn.decode_flat(torch.zeros(2, 32), batch, "numba", torch.float16)


# -- benchmark ----------------------------------------------------------------------------------
def test_bench_kernels_runs_on_cpu_and_says_triton_was_skipped():
    result = bench_kernels("cpu", graphs=[random_dag(12, 0), odd_shapes_graph()], repeats=1, seq_repeats=1)
    assert result["message_passing"]["triton_s"] is None and result["decode"]["triton_s"] is None
    assert result["message_passing"]["levels_s"] > 0 and result["decode"]["torch_s"] > 0
    assert result["decode"]["bound_fp32_s"] > 0
    assert any("Triton timings skipped" in n for n in result["notes"])
