"""Many files and start-up (issue 15): ``ghn-onnx predict FOLDER -O OUT --jobs N`` as whole
processes, and what threads would give instead of processes.

    python -m ghn_onnx.benchmarks.many_files [--files 50] [--model F.onnx | --generated] [--jobs 1,2] [--repeats 3] [--startup] [--json F]

* **Folder** (``repeats`` rounds): ``files`` exports (the committed framework fixtures of
  ``tests/fixtures/frameworks``: PyTorch TorchScript and dynamo, Keras, Flax; CNNs, ViTs, mixed
  zoos; copied round-robin into sub-folders; or ``files`` copies of ``--model``; or, with
  ``--generated``, ``files`` different held-out generated architectures, the evaluation sets'
  first ones taken in turn from ``test``, ``wide``, ``deep``, ``dense`` and ``bnfree``, exported
  at their evaluation widths) predicted by ``ghn-onnx predict DIR -O OUT --jobs N``
  in a new interpreter for each ``N``, and ``ghn-onnx predict ONE.onnx -O OUT`` (one file: the
  start-up); within a round the cases run in turn, so background load hits all of them; medians.
  Files per second are reported whole (``files / T``) and past start-up
  (``(files - 1) / (T - T_one)``).
* **Threads** (in-process, ``repeats`` rounds): load + convert of the same files one after
  the other against a pool of two threads: whether the GIL lets threads overlap that work.
* **Start-up** (``--startup``): ``ghn-onnx --help``, ``ghn-onnx inspect`` on a fixture and
  ``ghn-onnx predict`` on the CIFAR ResNet-50 of ``ghn-onnx bench`` as whole processes, and the
  same interpreter doing nothing (``python -c pass``), medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "frameworks"
CLI = [sys.executable, "-m", "ghn_onnx.cli"]


def make_generated_folder(folder: Path, files: int) -> list[Path]:
    """``files`` held-out generated architectures as ONNX files, ``folder/<split>/<i>.onnx``
    (see the module docstring)."""
    import onnx

    from ghn_onnx.training.generator import EVAL_SIZES, arch_onnx, eval_specs, eval_width

    splits = ("test", "wide", "deep", "dense", "bnfree")
    per = -(-files // len(splits))
    if per > min(EVAL_SIZES[s] for s in splits):
        raise ValueError(f"Expected at most {len(splits) * min(EVAL_SIZES[s] for s in splits)} generated files")
    specs = {s: eval_specs(s, per) for s in splits}
    made: list[Path] = []
    for i in range(files):
        split = splits[i % len(splits)]
        path = folder / split / f"{i // len(splits):03d}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(arch_onnx(specs[split][i // len(splits)], *eval_width(split)), str(path))
        made.append(path)
    return made


def make_folder(folder: Path, files: int, model: Path | None = None) -> list[Path]:
    """``files`` copies of the committed exports (with their external data files), round-robin
    into ``folder/set<k>/``; or of ``model``, one per folder."""
    sources = [model] if model is not None else sorted(FIXTURES.glob("*.onnx"))
    made: list[Path] = []
    k = 0
    while len(made) < files:
        sub = folder / f"set{k}"
        sub.mkdir(parents=True, exist_ok=True)
        for src in sources[: files - len(made)]:
            shutil.copy(src, sub / src.name)
            for data in src.parent.glob(src.name + ".data*"):
                shutil.copy(data, sub / data.name)
            made.append(sub / src.name)
        k += 1
    return made


def _wall(cmd: list[str], env: dict | None = None) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    return seconds


def _rounds(cases: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None]) -> dict[str, float]:
    """Each case once per round, in turn; the median of each (seconds)."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, case in cases.items():
            times[name].append(case())
            log(f"round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s")
    return {name: statistics.median(t) for name, t in times.items()}


def bench_folder(files: int = 50, jobs: tuple[int, ...] = (1, 2), repeats: int = 3,
                 log: Callable[[str], None] = lambda m: None, model: Path | None = None,
                 generated: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if generated:
            log(f"exporting {files} generated architectures")
            made = make_generated_folder(tmp / "in", files)
        else:
            made = make_folder(tmp / "in", files, model)
        total_bytes = sum(p.stat().st_size for p in made)
        one = tmp / "one" / made[0].name
        one.parent.mkdir()
        shutil.copy(made[0], one)

        def run(inputs: Path, n: int) -> Callable[[], float]:
            def case() -> float:
                out = tmp / f"out{n}"
                shutil.rmtree(out, ignore_errors=True)
                return _wall([*CLI, "predict", str(inputs), "-O", str(out), "--jobs", str(n), "--json"])
            return case

        _wall([*CLI, "predict", str(one), "-O", str(tmp / "warm")])  # numba's cache, the page cache
        cases = {"one file": run(one.parent, 1), **{f"--jobs {n}": run(tmp / "in", n) for n in jobs}}
        med = _rounds(cases, repeats, log)
        threads = _threads(made, repeats, log)
    start = med["one file"]
    rows = {name: {"seconds": t, "files_per_s": files / t,
                   "files_per_s_past_startup": (files - 1) / (t - start) if t > start else None}
            for name, t in med.items() if name != "one file"}
    base = rows[f"--jobs {jobs[0]}"]
    for r in rows.values():
        r["speedup"] = r["files_per_s"] / base["files_per_s"]
        past = base["files_per_s_past_startup"]
        r["speedup_past_startup"] = (r["files_per_s_past_startup"] / past
                                     if past and r["files_per_s_past_startup"] else None)
    source = ("generated held-out architectures" if generated else str(model) if model
              else "tests/fixtures/frameworks/*.onnx")
    return {"files": files, "model": source, "bytes": total_bytes, "repeats": repeats, "startup_one_file_s": start,
            "jobs": rows, "threads": threads}


def _threads(paths: list[Path], repeats: int, log: Callable[[str], None]) -> dict:
    """Load + convert of ``paths``: one thread against a pool of two (seconds, medians)."""
    from ghn_onnx.onnx_io.loading import load_model
    from ghn_onnx.pipeline import prepare

    def one(p: Path):
        return prepare(load_model(p), p.name)

    def serial() -> float:
        t0 = time.perf_counter()
        for p in paths:
            one(p)
        return time.perf_counter() - t0

    def pooled() -> float:
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(one, paths))
        return time.perf_counter() - t0

    serial()
    med = _rounds({"load+convert, 1 thread": serial, "load+convert, 2 threads": pooled}, repeats, log)
    return {**med, "speedup": med["load+convert, 1 thread"] / med["load+convert, 2 threads"]}


def bench_startup(repeats: int = 5, log: Callable[[str], None] = lambda m: None) -> dict:
    from ghn_onnx.benchmarks.suite import export_cifar_resnet50

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        r50 = export_cifar_resnet50(tmp / "resnet50.onnx")
        fixture = FIXTURES / "torch_cnn.onnx"
        cases = {
            "python -c pass": lambda: _wall([sys.executable, "-c", "pass"]),
            "ghn-onnx --help": lambda: _wall([*CLI, "--help"]),
            "ghn-onnx inspect torch_cnn.onnx": lambda: _wall([*CLI, "inspect", str(fixture)]),
            "ghn-onnx predict resnet50.onnx": lambda: _wall([*CLI, "predict", str(r50), "-o", str(tmp / "o.onnx")]),
        }
        cases["ghn-onnx predict resnet50.onnx"]()  # warm: numba's cache, the page cache
        return _rounds(cases, repeats, log)


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ghn_onnx.benchmarks.many_files", description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=50)
    source = ap.add_mutually_exclusive_group()
    source.add_argument("--model", type=Path, default=None, help="copies of this export instead of the fixtures")
    source.add_argument("--generated", action="store_true", help="held-out generated architectures instead")
    ap.add_argument("--jobs", default="1,2", help="comma-separated --jobs values")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--startup", action="store_true", help="also time start-up (--help, inspect, predict ResNet-50)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    result: dict = {"command": " ".join(["python -m ghn_onnx.benchmarks.many_files", *(argv or sys.argv[1:])]),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": len(os.sched_getaffinity(0)),
                    "load_before": _load()}
    result["folder"] = bench_folder(args.files, tuple(int(j) for j in args.jobs.split(",")), args.repeats, log,
                                    args.model, args.generated)
    if args.startup:
        result["startup"] = bench_startup(max(args.repeats, 3), log)
    result["load_after"] = _load()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
