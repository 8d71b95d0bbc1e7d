"""The environment of a benchmark run and the tables made from :func:`ghn_onnx.benchmarks.suite.run_benchmarks`.

One row per figure: ``case``, ``unit``, the fast path, the reference and the speedup
(reference time / fast time, so also fast rate / reference rate), and a note. :func:`format_table`
is the plain table ``ghn-onnx bench`` prints last; :func:`to_markdown` is the same table with the
machine, versions, date and command, as bench/RESULTS.md records it.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata

import torch

VERSIONED = ("ghn-onnx", "torch", "numpy", "numba", "onnx", "onnxruntime", "triton")


@dataclass(frozen=True)
class Row:
    case: str
    unit: str
    fast: float | None
    reference: float | None = None
    speedup: float | None = None
    note: str = ""
    missing: str = "-"  # printed for a reference that was not run


# -- environment ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    """Date, device, machine (CPU model, cores, torch threads, load) and package versions."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "cpus_usable": usable,
               "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
               "load_average_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": str(device), "machine": machine,
            "versions": {"python": platform.python_version(), **{d: _version(d) for d in VERSIONED}}}


# -- rows -----------------------------------------------------------------------------------------

def _speedup(r: dict) -> float | None:
    return r["reference_s"] / r["fast_s"] if r.get("reference_s") and r.get("fast_s") else None


def _ms(r: dict, key: str) -> float | None:
    return None if r.get(key) is None else r[key] * 1e3


def latency_rows(lat: dict) -> list[Row]:
    m, bound = lat["model"], lat["bound_s"]
    fwd = lat["ghn_forward"]
    rows = [Row(f"{m} GHN forward", "ms", _ms(fwd, "fast_s"), _ms(fwd, "reference_s"), _speedup(fwd),
                f"{_count(lat['params'])} params, {lat['nodes']} nodes; fast = {fwd['fast_s'] / bound:.1f}x the bound")]
    if fwd.get("flat_decode_s"):
        flat = fwd["flat_decode_s"]
        rows.append(Row(f"{m} GHN forward, flat decode", "ms", flat * 1e3, _ms(fwd, "reference_s"),
                        _div(fwd["reference_s"], flat), f"node states + Triton decode_flat; {flat / bound:.1f}x the bound"))
    f2f = lat["file_to_file"]
    rows.append(Row(f"{m} file to file", "ms", _ms(f2f, "fast_s"), _ms(f2f, "reference_s"), _speedup(f2f),
                    "load, convert, predict, write back, save"))
    rows.append(Row(f"{m} write bound", "ms", bound * 1e3, note=f"{_count(4 * lat['params'])} bytes fp32 / "
                    f"{lat['copy_bandwidth_GBps']:.1f} GB/s copy"))
    return rows


def throughput_rows(tp: dict) -> list[Row]:
    rows = []
    for r in tp["sizes"].values():
        n, p = r["networks"], r["params"]
        ref = r["reference_s"]
        a = r["architectures"]
        note = f"{a} architecture{'s' if a != 1 else ''}, {r['nodes']} nodes"
        note = f"{note}; {r['note']}" if r["note"] else note
        rows.append(Row(f"throughput {n} nets", "nets/s", n / r["fast_s"], ref and n / ref, _speedup(r), note,
                        missing="not run"))
        rows.append(Row(f"throughput {n} nets", "Mparams/s", p / r["fast_s"] / 1e6, ref and p / ref / 1e6,
                        _speedup(r), f"{_count(p)} params per batch", missing="not run"))
    return rows


def train_rows(tr: dict) -> list[Row]:
    mb, amp = tr["meta_batch"], " (AMP; reference loop fp32)" if tr["amp"] else ""
    step, fb = tr["train_step"], tr["ghn_forward_backward"]
    return [Row(f"train step, meta-batch {mb}", "s", step["fast_s"], step["reference_s"], _speedup(step),
                f"{tr['batch_size']} images, {tr['nodes']} nodes{amp}"),
            Row(f"GHN fwd+bwd, meta-batch {mb}", "s", fb["fast_s"], fb["reference_s"], _speedup(fb),
                f"{_count(tr['params'])} params")]


def kernel_rows(k: dict) -> list[Row]:
    if "skipped" in k:
        return []
    mp, dec = k["message_passing"], k["decode"]
    seq = mp["sequential_s"]
    rows = [Row("kernel message passing", "ms", _ms(mp, "triton_s"), seq * 1e3, _div(seq, mp["triton_s"]),
                f"{len(k['graphs'])} graphs from {k['graphs_from']}; level path {mp['levels_s'] * 1e3:.1f} ms"),
            Row("kernel message passing, per level", "ms", _ms(mp, "triton_per_level_s"), seq * 1e3,
                _div(seq, mp.get("triton_per_level_s")))]
    rows.append(Row("kernel decode fp32", "ms", _ms(dec, "triton_s"), dec["torch_s"] * 1e3,
                    _div(dec["torch_s"], dec["triton_s"]), f"reference: GHN.decode_tensors; {_count(dec['params'])} params"))
    rows.append(Row("kernel decode fp16", "ms", _ms(dec, "triton_fp16_s"), dec["torch_s"] * 1e3,
                    _div(dec["torch_s"], dec["triton_fp16_s"])))
    rows.append(Row("kernel decode bound", "ms", dec["bound_fp32_s"] * 1e3,
                    note=f"{dec['copy_bandwidth_GBps']:.0f} GB/s copy"))
    return rows


def _count(n: int) -> str:
    """``23.5M``, ``716k``, ``950``."""
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}k" if n >= 1e4 else str(n)


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


ROW_MAKERS = {"latency": latency_rows, "throughput": throughput_rows, "train": train_rows, "kernels": kernel_rows}


def rows(results: dict) -> list[Row]:
    out: list[Row] = []
    for section, make in ROW_MAKERS.items():
        if section in results:
            out += make(results[section])
        if section in results.get("errors", {}):
            out.append(Row(section, "", None, note=f"FAILED: {results['errors'][section]}"))
    return out


# -- rendering ------------------------------------------------------------------------------------

def _num(v: float | None, missing: str = "-") -> str:
    if v is None:
        return missing
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.3g}"


def _cells(r: Row) -> list[str]:
    return [r.case, r.unit, _num(r.fast), _num(r.reference, r.missing),
            "-" if r.speedup is None else f"{r.speedup:.1f}x", r.note]


HEADER = ["case", "unit", "fast", "reference", "speedup", "note"]


def format_table(results: dict) -> str:
    """The plain-text table: one line per figure, numbers right-aligned."""
    table = [HEADER] + [_cells(r) for r in rows(results)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    lines = []
    for row in table:
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [c.rjust(w) for c, w in zip(row[2:5], widths[2:5])] + [row[5]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def describe(results: dict) -> list[str]:
    """One line each: device, machine, versions, settings, command."""
    m, cfg = results["machine"], results["config"]
    load = m.get("load_average_at_start")
    machine = (f"{m['cpu']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable), torch threads {m['torch_threads']}"
               + (f", load average {load:.1f} at start" if load is not None else ""))
    if "gpu" in m:
        machine = f"{m['gpu']} (CUDA {m['cuda']}); {machine}"
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    tp = results.get("throughput")
    graphs = (f"generated networks (training stream, seed {cfg['seed']}): the first {tp['distinct']} exported "
              f"through ONNX, the rest re-use those architectures at re-sampled widths (generation "
              f"{results['generation_s']:.0f} s, not timed)") if tp else ""
    rounds = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in results["rounds"].items())
    settings = (f"repeats {cfg['repeats']}, medians of interleaved rounds ({rounds}) after one warm-up call "
                f"each; reference cap {cfg['reference_cap_s']:g} s per call")
    lines = [f"Date: {results['date']}", f"Device: {results['device']}", f"Machine: {machine}",
             f"Versions: {versions}", f"Settings: {settings}"]
    if graphs:
        lines.append(f"Graphs: {graphs}")
    if results.get("peak_rss_GB"):
        lines.append(f"Peak memory: {results['peak_rss_GB']:.1f} GB resident")
    if results.get("command"):
        lines.append(f"Command: `{results['command']}`")
    return lines


def to_markdown(results: dict) -> str:
    """A RESULTS.md section: what ran where, then the table."""
    out = [f"## `ghn-onnx bench` on {results['device']}, {results['date']}", ""]
    out += [f"- {line}" for line in describe(results)] + [""]
    out += ["| " + " | ".join(HEADER) + " |", "|---|---|---:|---:|---:|---|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows(results)]
    if "kernels" in results and "skipped" in results["kernels"]:
        out += ["", f"Kernels: {results['kernels']['skipped']}."]
    return "\n".join(out) + "\n"
