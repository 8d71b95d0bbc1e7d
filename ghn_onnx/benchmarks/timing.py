"""How the benchmarks time: one call, interleaved rounds, fast path against reference, copy bandwidth.

Shared by :mod:`ghn_onnx.benchmarks.suite` (``ghn-onnx bench``), :mod:`ghn_onnx.benchmarks.kernels`
and ``bench/bench_predict.py``. On CUDA every call is synchronised before and after, so a figure is
the kernels' time and not the launch's.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

COPY_BYTES = 1 << 28


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call of ``fn`` (its result dropped at once, so big outputs do not pile up)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` calls."""
    sync = synchronizer(device)
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, sync) for _ in range(repeats))


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, sync: Callable[[], None]) -> dict[str, float]:
    """Median seconds of each function over ``rounds`` rounds; a round calls each one once, in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, sync))
    return {k: statistics.median(v) for k, v in times.items()}


def compare(fast: Callable[[], object], reference: Callable[[], object], rounds: int, sync: Callable[[], None],
            cap_s: float = float("inf"), estimate_s: float | None = None,
            variants: dict[str, Callable[[], object]] | None = None) -> dict:
    """Warm up both paths once, then time them interleaved (:func:`interleaved`).

    The reference is not run when ``estimate_s`` (its estimated seconds per call) exceeds
    ``cap_s``; when its warm-up call alone exceeds the cap, that one call is its figure.
    ``variants`` are further fast paths timed in the same rounds (figure ``<name>_s``).

    Returns ``{"fast_s", "reference_s", "rounds", "reference_runs", "note"}`` (``reference_s`` is
    ``None`` when the reference was not run).
    """
    out = {"fast_s": None, "reference_s": None, "rounds": rounds, "reference_runs": 0, "note": ""}
    fns = {"fast": fast, **(variants or {})}
    for fn in fns.values():
        timed(fn, sync)  # warm-up: numba / Triton compile, per-batch plans are cached
    if estimate_s is not None and estimate_s > cap_s:
        out["note"] = f"reference not run: ~{estimate_s:.0f} s per call estimated, cap {cap_s:g} s"
    else:
        first = timed(reference, sync)
        if first > cap_s:
            out.update(reference_s=first, reference_runs=1,
                       note=f"reference: 1 run ({first:.0f} s > cap {cap_s:g} s)")
        else:
            fns["reference"] = reference
    medians = interleaved(fns, rounds, sync)
    out.update({f"{k}_s": medians[k] for k in variants or {}}, fast_s=medians["fast"])
    if "reference" in medians:
        out.update(reference_s=medians["reference"], reference_runs=rounds)
    return out


def copy_bandwidth(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 10) -> float:
    """Bytes per second of a large tensor copy, read and write counted (median of ``repeats``)."""
    sync = synchronizer(device)
    a = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    return 2 * nbytes / statistics.median(timed(lambda: b.copy_(a), sync) for _ in range(repeats))
