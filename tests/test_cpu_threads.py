"""The thread rule of the numba loops (``ghn_onnx.ghn.cpu_threads``): one thread unless there
is work to share and CPUs to spare, the configured count as the bound and restored afterwards,
and the numba store giving the same bits for any count (the sweep's counterpart is in
``tests/test_message_passing_engines.py``)."""

from __future__ import annotations

import os
import numba
import pytest
import torch
from ghn_graphs import fresh_ghn, odd_shapes_graph, random_dag, small_head_graph

from ghn_onnx.ghn import cpu_threads
from ghn_onnx.ghn.decode import flat as flat_decode, numba_store


@pytest.fixture
def free(monkeypatch):
    """Set what the run queue says: ``free(n)`` makes ``n`` other threads runnable."""
    monkeypatch.setattr(cpu_threads, "_last", None)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: 4)

    def set_others(n):
        monkeypatch.setattr(cpu_threads, "_last", None)
        monkeypatch.setattr(cpu_threads, "_runnable_others", lambda: n)
    return set_others


def test_small_work_runs_on_one_thread_without_reading_the_run_queue(monkeypatch):
    def unreadable():
        raise AssertionError("the run queue was read")
    monkeypatch.setattr(cpu_threads, "_runnable_others", unreadable)
    monkeypatch.setattr(cpu_threads, "_last", None)
    assert cpu_threads.threads_for(work=199, grain=100, limit=8) == 1
    assert cpu_threads.threads_for(work=10**9, grain=100, limit=1) == 1


def test_threads_are_bounded_by_work_limit_and_free_cpus(free):
    free(0)
    assert cpu_threads.threads_for(work=1000, grain=100, limit=2) == 2  # the configured bound
    assert cpu_threads.threads_for(work=300, grain=100, limit=8) == 3  # the work
    assert cpu_threads.threads_for(work=1000, grain=100, limit=8) == 4  # the usable CPUs
    free(3)
    assert cpu_threads.threads_for(work=1000, grain=100, limit=8) == 1  # a busy machine
    free(2)
    assert cpu_threads.threads_for(work=1000, grain=100, limit=8) == 2
    free(None)  # no /proc: every usable CPU
    assert cpu_threads.threads_for(work=1000, grain=100, limit=8) == 4


def test_the_run_queue_of_this_machine_reads():
    """On Linux the reading works and leaves at least one CPU."""
    others = cpu_threads._runnable_others()
    assert others is None or others >= 0
    assert 1 <= cpu_threads.free_cpus() <= cpu_threads.usable_cpus()


def test_numba_count_is_set_in_the_block_and_restored(free):
    free(0)
    configured = numba.get_num_threads()
    with cpu_threads.numba_threads(work=10, grain=100) as n:
        assert n == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == configured
    with pytest.raises(RuntimeError):
        with cpu_threads.numba_threads(work=10, grain=100):
            raise RuntimeError("restored on errors too")
    assert numba.get_num_threads() == configured


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs numba to have 2 threads")
def test_numba_store_is_the_same_for_any_thread_count(free, monkeypatch):
    ghn = fresh_ghn("cpu", seed=21)
    batch = ghn.batch([odd_shapes_graph(), small_head_graph(), random_dag(40, 3), random_dag(9, 4)])
    with torch.no_grad():
        h = ghn.node_states(batch)
        plan = flat_decode.decode_plan(batch, ghn.decode_spec, "cpu")
        src = flat_decode.decode_sources(h, plan, ghn.decoder, ghn.decoder_1d, ghn.bias_class)
    monkeypatch.setattr(numba_store, "ELEMENTS_PER_THREAD", 1)
    runs = []
    for others in (3, 0):  # one thread, then every configured one
        free(others)
        assert cpu_threads.threads_for(plan.total, 1, numba.get_num_threads()) == (1 if others else min(numba.get_num_threads(), 4))
        runs.append(numba_store.store(plan, src).clone())
    assert torch.equal(runs[0], runs[1])


def test_numba_leaves_torch_thread_count_alone():
    """numba's omp layer shares torch's OpenMP runtime: starting its pool or a parallel loop must
    not change the caller's torch count (else OMP_NUM_THREADS=1 becomes 2 after the first
    prediction, and later predictions differ in their last bits from earlier ones)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, "tests")
        from test_flat_decode import fresh_ghn, odd_shapes_graph, random_dag
        ghn = fresh_ghn("cpu", seed=1)
        batch = ghn.batch([odd_shapes_graph(), random_dag(30, 3)])
        before = torch.get_num_threads()
        with torch.no_grad():
            ghn(batch)
        print(before, torch.get_num_threads())
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["1", "1"], out.stdout
