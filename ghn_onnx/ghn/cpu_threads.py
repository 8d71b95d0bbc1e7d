"""How many threads the compiled CPU loops (numba) use for one call: the one rule, for
:mod:`~ghn_onnx.ghn.hypernet.numba_sweep` and :mod:`~ghn_onnx.ghn.decode.numba_store`.

Why a rule at all: a parallel region ends at a barrier, so it lasts as long as its slowest
thread. When the machine's cores are taken by other work (here: a training run and other
engineers' tests on 2 cores), a worker thread is often descheduled, and a region that needs a
millisecond waits for it for a scheduler slice: at load 10 the numba store of a CIFAR ResNet-50
took 56-68 ms with 2 threads and 24-39 ms with 1, the sweep of one DeepNets graph 52-64 ms
against 0.5-0.8 ms (``bench/RESULTS.md``, 2026-12-02). numba's OpenMP layer runs in the OpenMP
runtime PyTorch loaded (libgomp), whose workers also busy-wait after each region (GNU OpenMP's
default spin, milliseconds), taking a core from the thread that goes on. So a loop uses more
than one thread only when there are CPUs to spare (:func:`free_cpus`) and enough work to share
(:func:`threads_for`).

The numba loops' results do not depend on their thread count (every element is written once,
by one work item), so this rule changes only speed. PyTorch's ops are left alone: their results
do depend on ``torch.get_num_threads()`` (a GEMM's blocking), and a count chosen by the load
would make predictions depend on it. The configured numba count (``numba.set_num_threads``,
``NUMBA_NUM_THREADS``) stays the upper bound and is restored after each call.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

#: How long a reading of the run queue is reused (seconds): a forward asks several times.
_FRESH_S = 0.05
_last: tuple[float, int] | None = None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _runnable_others() -> int | None:
    """Threads of other processes runnable right now (Linux: ``/proc/loadavg``'s running count
    less this process's running threads, the caller and any of its own spinning workers), or
    None where it cannot be read."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                own += f.read().rpartition(b")")[2].split()[0] == b"R"
    except (OSError, ValueError, IndexError):
        return None
    return max(0, running - max(own, 1))


def free_cpus() -> int:
    """CPUs not taken by other runnable threads at the moment (at least 1; all usable CPUs where
    the run queue cannot be read). Re-read at most every :data:`_FRESH_S` seconds."""
    global _last
    now = time.monotonic()
    if _last is not None and now - _last[0] < _FRESH_S:
        return _last[1]
    others = _runnable_others()
    cpus = usable_cpus()
    free = cpus if others is None else max(1, cpus - others)
    _last = (now, free)
    return free


def threads_for(work: int, grain: int, limit: int) -> int:
    """Threads for ``work`` units when one thread should have at least ``grain`` of them: at
    most ``limit`` (the configured count) and :func:`free_cpus` (read only when the work could
    use more than one), at least 1."""
    n = min(limit, work // max(grain, 1))
    return 1 if n <= 1 else min(n, free_cpus())


def numba_configured_threads() -> int:
    """numba's configured thread count, with torch's count in this thread left as it was: the
    first ``numba.get_num_threads()`` starts numba's pool, and under the ``omp`` layer that sets
    the calling thread's OpenMP count (torch's) to numba's, e.g. 2 where ``OMP_NUM_THREADS=1``."""
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    n = numba.get_num_threads()
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
    return n


@contextlib.contextmanager
def numba_threads(work: int, grain: int, limit: int | None = None) -> Iterator[int]:
    """numba's thread count (for parallel loops launched from this thread) set to
    :func:`threads_for` for the block, then restored; yields the count. ``limit`` defaults to
    the current setting, and never exceeds torch's count in this thread (what the user set, e.g.
    through ``OMP_NUM_THREADS``).

    numba's ``omp`` threading layer shares torch's OpenMP runtime, so ``numba.set_num_threads``
    also sets torch's count in the calling thread; torch's count is put back after the block, or
    a numba call would change how later torch ops in this thread split their work (and so their
    last bits)."""
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    configured = numba_configured_threads()
    cap = min(configured, torch_threads) if limit is None else min(limit, configured, torch_threads)
    n = threads_for(work, grain, cap)
    if n != configured:
        numba.set_num_threads(n)
    try:
        yield n
    finally:
        if n != configured:
            numba.set_num_threads(configured)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
