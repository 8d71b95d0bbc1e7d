"""CPU threads: one setting for torch, numba and onnxruntime (``--threads N``), and the one place
onnxruntime sessions are built, so that every session honours it.

Each library has its own thread pool and its own default: torch and onnxruntime one thread per
physical core, numba one per logical CPU, and onnxruntime ignores ``OMP_NUM_THREADS`` (BN
calibration ran at ~150% CPU with ``OMP_NUM_THREADS=1``). :func:`set_threads` gives all three one
count; :func:`inference_session` builds every CPU session of the package with it.

The default (:func:`default_threads`) is the CPUs this process may run on (its affinity mask,
which containers and ``taskset`` restrict), or ``$OMP_NUM_THREADS`` where it is set: a user (or
``torchrun``, which sets it to 1 per process) who limits OpenMP means the process's threads.

The numba loops give the same values for any count (each element is written by one work item,
:mod:`ghn_onnx.ghn.cpu_threads`); torch's and onnxruntime's kernels may differ in the last bits
between counts (how a GEMM or a reduction is split), so results are reproducible for a given count.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Union

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.cpu_threads import usable_cpus  # the affinity mask: taskset, cgroup cpusets

if TYPE_CHECKING:
    import onnx
    import onnxruntime

#: The count :func:`set_threads` last set; ``None``: :func:`default_threads`.
_configured: int | None = None


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` where it is a positive integer, else the CPUs this process may run
    on (:func:`~ghn_onnx.ghn.cpu_threads.usable_cpus`)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    return usable_cpus()


def configured_threads() -> int:
    """The count every library runs with: the last :func:`set_threads`, else the default."""
    return _configured if _configured is not None else default_threads()


def set_threads(n: int | None = None) -> int:
    """Give torch (intra-op), numba and onnxruntime sessions built afterwards ``n`` threads
    (``None``: :func:`default_threads`); returns the count.

    A library not imported yet is not imported for this (``ghn-onnx calibrate`` needs no torch):
    its count is set through the variable it reads when it loads (``OMP_NUM_THREADS`` for torch's
    OpenMP pool, ``NUMBA_NUM_THREADS``), so it starts with ``n`` threads.
    """
    global _configured
    n = default_threads() if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise GhnOnnxError(f"threads: expected an integer >= 1 (got {n!r})")
    _configured = n
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        os.environ["OMP_NUM_THREADS"] = str(n)
    if "numba" in sys.modules:
        numba = sys.modules["numba"]
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))  # its pool's size is fixed at launch
    else:
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    return n


@contextlib.contextmanager
def using_threads(n: int | None = None) -> Iterator[int]:
    """:func:`set_threads` for a block (a command), then the settings before it back: the
    package's count, the environment variables, torch's and numba's counts where they were
    loaded before the block (one loaded inside it keeps ``n``: its pool was made with it).
    Yields the count."""
    global _configured
    before = _configured
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
    torch, numba = sys.modules.get("torch"), sys.modules.get("numba")
    counts = (torch.get_num_threads() if torch else None, numba.get_num_threads() if numba else None)
    try:
        yield set_threads(n)
    finally:
        _configured = before
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if torch is not None:
            torch.set_num_threads(counts[0])
        if numba is not None:
            numba.set_num_threads(counts[1])


ModelSource = Union["onnx.ModelProto", bytes, str, os.PathLike]


def session_options(threads: int | None = None, log_level: int = 3) -> onnxruntime.SessionOptions:
    """onnxruntime options: ``threads`` intra-op threads (``None`` / 0: :func:`configured_threads`),
    one inter-op thread (the package's models run as one sequence of kernels), idle workers that
    sleep instead of spinning (on a shared machine a spinning pool takes cores from others), and
    log messages from ``log_level`` up (3: errors; pruned and exported models make warnings that
    are not the user's to act on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or configured_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = log_level
    return opts


def inference_session(model: ModelSource, threads: int | None = None, log_level: int = 3
                      ) -> onnxruntime.InferenceSession:
    """A CPU onnxruntime session for ``model`` (a ``ModelProto``, its serialised bytes or a path)
    with :func:`session_options`. A ``ModelProto`` over protobuf's 2 GB limit goes through a
    temporary file with external data."""
    import onnxruntime as ort

    opts = session_options(threads, log_level)
    providers = ["CPUExecutionProvider"]
    if isinstance(model, (bytes, str, os.PathLike)):
        return ort.InferenceSession(model if isinstance(model, bytes) else os.fspath(model), opts,
                                    providers=providers)
    try:
        data = model.SerializeToString()
    except ValueError:  # protobuf refuses to serialise over 2 GB: go through a file
        data = None
    if data is not None:
        return ort.InferenceSession(data, opts, providers=providers)
    import onnx

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=providers)
