"""Every message-passing engine of the registry against the reference loop, on every graph kind.

``engines.ENGINES`` lists the engines (sequential, levels, numba, triton); each one runs the
forward and backward sweep of a GatedGNN on the same graphs and initial states, and must give
the states of ``GatedGNN.forward_sequential`` (ppuda's loop) within fp32 rounding. Graphs: the
GHN-2 parity fixtures with the reference weights and real initial states, batches of random
DAGs, a 64-level chain, 1- and 2-node graphs; virtual edges on and off; hidden sizes 32 and 64.
An engine that cannot run here is skipped with its reason.

The Triton engine runs on CUDA, or on CPU in Triton's interpreter. Triton reads
``TRITON_INTERPRET`` when it is first imported, so this file sets it before importing Triton
when there is no CUDA; if Triton was imported earlier in this process (a full ``pytest`` run),
``test_triton_engine_in_fresh_process`` runs the Triton cases of this file in a fresh process
(as ``tests/test_kernels.py`` does). Triton-specific checks (launch strategies, tile sizes,
input errors) stay in ``tests/test_kernels.py``.
"""

from __future__ import annotations

import dataclasses
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
_TRITON = importlib.util.find_spec("triton") is not None

import numba  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from ghn_graphs import fresh_ghn, odd_shapes_graph, random_dag, small_head_graph, two_node_graph  # noqa: E402

from ghn_onnx.convert import convert_file  # noqa: E402
from ghn_onnx.ghn import checkpoint, cpu_threads, triton_support  # noqa: E402
from ghn_onnx.ghn.hypernet import engines, numba_sweep  # noqa: E402
from ghn_onnx.ghn.hypernet.gatedgnn import GatedGNN  # noqa: E402
from ghn_onnx.graph.batch import GraphBatch  # noqa: E402
from ghn_onnx.graph.graph import Graph, Node  # noqa: E402
from ghn_onnx.graph.primitives import Primitive  # noqa: E402

if _TRITON:
    import triton.language as tl  # noqa: E402

    from ghn_onnx.ghn.hypernet.triton_sweep import _sweep_kernel  # noqa: E402

    # Triton and the kernel were both set up in the mode this process runs kernels in.
    TRITON_IN_PROCESS = triton_support.interpreted(tl.sigmoid) == INTERPRET == triton_support.interpreted(_sweep_kernel)
else:
    TRITON_IN_PROCESS = False

RTOL, ATOL = 1e-5, 1e-5  # fp32: the same maths summed in another order
# The interpreter's cost is per program and per loop step: big tiles on CPU.
INTERPRETER_TILES = dict(block_nodes=64, block_edges=512)


# -- the cases ----------------------------------------------------------------------------------
def one_node_graph() -> Graph:
    return Graph([Node(Primitive.INPUT, "input")], np.zeros((0, 2), dtype=np.int64), name="one_node")


@dataclasses.dataclass(frozen=True)
class Case:
    """Graphs, a GatedGNN and initial states: ``fixtures`` names parity fixtures (reference GHN-2
    weights, real initial states), else ``graphs`` builds random-DAG-like graphs for a fresh
    ``GatedGNN(hid, ve)`` with random states."""

    graphs: tuple = ()
    fixtures: tuple[str, ...] = ()
    hid: int = 32
    ve: bool = True
    seed: int = 0


def _dags() -> tuple:
    return (lambda: random_dag(40, 0), two_node_graph, lambda: random_dag(17, 1, fan=3))


CASES = {
    "fixtures-resnet18-deepnets": Case(fixtures=("resnet18", "deepnets_1", "deepnets_17")),
    "dags-h32-ve": Case(graphs=_dags(), seed=1),
    "dags-h32-no-ve": Case(graphs=_dags(), ve=False, seed=2),
    "dags-h64-ve": Case(graphs=_dags(), hid=64, seed=3),
    "dags-h64-no-ve": Case(graphs=_dags(), hid=64, ve=False, seed=4),
    "chain-64-levels": Case(graphs=(lambda: random_dag(64, 4, fan=1, window=1),), seed=5),
    "one-node": Case(graphs=(one_node_graph,), seed=6),
    "two-node": Case(graphs=(two_node_graph,), seed=7),
    "tiny-mixed-no-ve": Case(graphs=(one_node_graph, two_node_graph, one_node_graph), ve=False, seed=8),
}

_BUILT: dict[str, tuple[GatedGNN, torch.Tensor, GraphBatch, torch.Tensor]] = {}


def built(name: str, parity_dir: Path) -> tuple[GatedGNN, torch.Tensor, GraphBatch, torch.Tensor]:
    """``(gnn, h0, batch, expected)`` of a case, on CPU, built once; ``expected`` is the
    reference loop's result."""
    if name not in _BUILT:
        case = CASES[name]
        if case.fixtures:
            ghn = checkpoint.load_reference(parity_dir / "ghn2_random_cifar10.npz").eval()
            batch = ghn.batch([convert_file(parity_dir / f"{n}.onnx") for n in case.fixtures])
            gnn = ghn.gnn
            with torch.no_grad():
                h0 = ghn.initial_states(batch)
        else:
            batch = GraphBatch.build([g() for g in case.graphs], virtual=case.ve)
            torch.manual_seed(case.seed)
            gnn = GatedGNN(case.hid, ve=case.ve).eval()
            h0 = torch.randn(batch.n_nodes, case.hid)
        with torch.no_grad():
            expected = gnn.forward_sequential(h0, batch)
        _BUILT[name] = gnn, h0, batch, expected
    return _BUILT[name]


# -- where each engine runs ---------------------------------------------------------------------
def engine_device(name: str) -> str:
    return "cuda" if _CUDA and name in ("triton", "levels") else "cpu"


def skip_reason(name: str, device: str, hid: int) -> str | None:
    """Why engine ``name`` cannot run on ``device`` in this process (None: it can)."""
    if name == "triton":
        if not _TRITON:
            return "Triton is not installed"
        if not TRITON_IN_PROCESS:
            return "Triton was imported before TRITON_INTERPRET was set: see test_triton_engine_in_fresh_process"
        if device == "cpu":
            return None if INTERPRET else "Triton runs on CPU only under TRITON_INTERPRET=1"
        if INTERPRET:
            return "TRITON_INTERPRET=1: the kernels run on CPU tensors"
    return engines.get(name).unavailable(device, grad=False, hid=hid)


def runnable(name: str, device: str) -> engines.MessagePassingEngine:
    engine = engines.get(name)
    if name == "triton" and device == "cpu":
        engine = dataclasses.replace(engine, **INTERPRETER_TILES)
    return engine


# -- every engine against the reference loop ----------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(engines.ENGINES))
def test_engine_matches_reference_loop(name, case, parity_dir):
    device = engine_device(name)
    reason = skip_reason(name, device, CASES[case].hid)
    if reason is not None:
        pytest.skip(f"{name} on {device}: {reason}")
    gnn, h0, batch, expected = built(case, parity_dir)
    gnn.to(device)
    try:
        with torch.no_grad():
            got = runnable(name, device).run(gnn, h0.to(device), batch)
    finally:
        gnn.cpu()
    assert got.shape == h0.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), expected, rtol=RTOL, atol=ATOL)
    assert not torch.equal(got.cpu(), h0)


@pytest.mark.skipif(TRITON_IN_PROCESS or not _TRITON, reason="the Triton cases run in this process")
def test_triton_engine_in_fresh_process():
    """This file's Triton cases again, in a process whose first Triton import sees TRITON_INTERPRET."""
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                         cwd=repo, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def test_autograd_engines_give_gradients():
    """The engines that say they support autograd do: gradients reach the GNN's weights."""
    gnn, h0, batch, _ = built("dags-h32-ve", Path())
    for name, engine in engines.ENGINES.items():
        if not engine.autograd:
            continue
        gnn.zero_grad()
        engine.run(gnn, h0, batch).square().sum().backward()
        grads = [p.grad for p in gnn.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert gnn.gru.weight_hh.grad.abs().sum() > 0, name
    gnn.zero_grad(set_to_none=True)


# -- the interface ------------------------------------------------------------------------------
def test_registry_lists_every_engine_and_refuses_unknown_names():
    assert list(engines.ENGINES) == ["sequential", "levels", "numba", "triton"]
    assert all(e.name == n for n, e in engines.ENGINES.items())
    with pytest.raises(ValueError, match="Expected a message-passing engine"):
        engines.get("cuda-graphs")


def test_select_is_todays_rule():
    """sequential if asked; numba on CPU without autograd; Triton on CUDA without autograd where
    it can run; the level sweep otherwise."""
    name = lambda *a, **k: engines.select(*a, **k).name  # noqa: E731
    assert name("cpu", grad=False, sequential=True) == name("cuda", grad=True, sequential=True) == "sequential"
    assert name("cpu", grad=False) == "numba"
    assert name("cpu", grad=True) == "levels"
    assert name("cuda", grad=False) == ("triton" if _TRITON else "levels")
    assert name("cuda", grad=False, hid=48) == "levels"  # Triton needs a power of two >= 32
    assert name("cuda", grad=True) == "levels"
    assert "CPU" in engines.get("numba").unavailable("cuda", grad=False)
    assert "autograd" in engines.get("numba").unavailable("cpu", grad=True)
    assert engines.get("triton").unavailable("cpu", grad=False) is not None


def test_node_states_runs_the_selected_engine():
    """``GHN.node_states`` is the selected engine's states (bitwise), then the LayerNorm."""
    ghn = fresh_ghn("cpu", seed=9)
    batch = ghn.batch([odd_shapes_graph(), random_dag(20, 2), small_head_graph()])
    with torch.no_grad():
        h0 = ghn.initial_states(batch)
        assert torch.equal(ghn.node_states(batch), ghn.ln(engines.get("numba").run(ghn.gnn, h0, batch)))
        assert torch.equal(ghn.node_states(batch, sequential=True), ghn.ln(ghn.gnn.forward_sequential(h0, batch)))
    assert torch.equal(ghn.node_states(batch), ghn.ln(ghn.gnn(ghn.initial_states(batch), batch)))


def test_plans_are_typed_frozen_and_per_device():
    """What the engines derive from a batch lives in ``GraphBatch.plan``: frozen dataclasses that
    record their device, built once; nothing else is written into the batch."""
    gnn, h0, _, _ = built("dags-h32-ve", Path())
    batch = GraphBatch.build([random_dag(30, 3), two_node_graph()])
    for name in ("levels", "numba"):
        engines.get(name).prepare(batch, "cpu")
        with torch.no_grad():
            engines.get(name).run(gnn, torch.randn(batch.n_nodes, 32), batch)
    plans = dict(batch._plans)
    assert len(plans) == 4  # sweep levels, level tensors, node-order CSR, graph parts
    for plan in plans.values():
        assert dataclasses.is_dataclass(plan) and type(plan).__dataclass_params__.frozen
        assert plan.device == "cpu"
    with torch.no_grad():
        engines.get("levels").run(gnn, torch.randn(batch.n_nodes, 32), batch)
    assert batch._plans == plans
    assert not {k for k in vars(batch) if k.startswith("_")} - {"_plans"}


def test_packed_weights_name_the_twelve_tensors():
    gnn = GatedGNN(64, ve=False)
    w = gnn.packed_weights()
    assert len(w.tensors()) == 12 and not w.use_ve and w.hid == 64
    assert w.mlp_w1.shape == (64, 32) and w.mlp_w2.shape == (32, 64) and w.w_ih.shape == (64, 192)
    assert torch.equal(w.w_hh, gnn.gru.weight_hh.detach().t())
    assert torch.equal(w.ve_w1, w.mlp_w1)  # placeholders without MLP_ve
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in w.tensors())


# -- numba: threads -----------------------------------------------------------------------------
@pytest.mark.parametrize("ve", [True, False])
def test_numba_is_the_same_for_any_thread_count(ve, monkeypatch):
    """Threads sweep different graphs; the order within a graph, hence every bit, is fixed. (The
    thread rule is told the machine is idle and the work big, so the configured count runs.)"""
    monkeypatch.setattr(cpu_threads, "free_cpus", lambda: 64)
    monkeypatch.setattr(numba_sweep, "WORK_PER_THREAD", 1)
    torch.manual_seed(15)
    gnn = GatedGNN(32, ve=ve)
    batch = GraphBatch.build([random_dag(n, seed, fan=3) for seed, n in enumerate([40, 5, 1, 70, 23])], virtual=ve)
    h0 = torch.randn(batch.n_nodes, 32)
    with torch.no_grad():
        expected = gnn.forward_sequential(h0, batch)
    runs = []
    for threads in (1, 2):
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        runs.append(numba_sweep.run(gnn, h0, batch))
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert torch.equal(runs[0], runs[1])
    torch.testing.assert_close(runs[0], expected, rtol=RTOL, atol=ATOL)


def test_graph_parts_cover_every_graph_once():
    batch = GraphBatch.build([random_dag(n, n) for n in (30, 3, 12, 8, 50, 2, 2)])
    parts = numba_sweep.graph_parts(batch, 3)
    assert len(parts.part_ptr) == 4 and sorted(parts.graph_ids.tolist()) == list(range(7))
    assert np.all(np.diff(parts.part_ptr) >= 1)
    assert numba_sweep.graph_parts(batch, 3) is parts


# -- the level sweep under autocast -------------------------------------------------------------
def test_level_sweep_under_cpu_bf16_autocast():
    """Under autocast the GRU cell and the MLPs compute in bf16 while node states stay fp32:
    forward and backward run, gradients are finite, predictions stay close to fp32's."""
    ghn = fresh_ghn("cpu", seed=10).train()
    batch = ghn.batch([odd_shapes_graph(), random_dag(30, 1), small_head_graph()])
    assert engines.select("cpu", grad=True).name == "levels"
    expected = ghn(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ghn.node_states(batch).dtype == torch.float32
        got = ghn(batch)
    loss = sum(v.float().square().sum() for g in got for v in g.values())
    loss.backward()
    grads = [p.grad for p in ghn.parameters() if p.grad is not None]
    assert len(grads) > 20 and all(torch.isfinite(g).all() for g in grads)
    assert ghn.gnn.gru.weight_ih.grad.abs().sum() > 0
    for g, e in zip(got, expected):
        for name, value in e.items():
            scale = value.abs().max().item()
            torch.testing.assert_close(g[name].float(), value, rtol=0, atol=0.05 * scale + 1e-6,
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_reference_loop_under_cpu_bf16_autocast():
    gnn, h0, batch, expected = built("dags-h32-ve", Path())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq = gnn.forward_sequential(h0, batch)
        levels = gnn(h0, batch)
    assert seq.dtype == levels.dtype == torch.float32
    torch.testing.assert_close(seq, levels, rtol=0, atol=1e-3)
    torch.testing.assert_close(seq.detach(), expected, rtol=0, atol=0.1)
