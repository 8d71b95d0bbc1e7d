"""GHN-3-T end to end against the reference's recorded runtimes (issue 12 item 8).

    python -m ghn_onnx.benchmarks.ghn3 [--device cpu|cuda] [--rounds 7] [--threads 1] [--models A,B]
                                       [--exports resnet50] [--json F]

Cases: every model of ``<shared>/reference/ghn3-parity`` whose ``config.json`` records the
reference's ``runtime_s`` (GHN-3-T, weights ``ghn3_random_T.npz``), ResNet-18 with GHN-2-ImageNet
(``ghn2-imagenet/``), and torchvision's ResNet-50 exported as the fixtures were (ImageNet size,
TorchScript, eval, BN kept, no constant folding, opset 17, zero initializers), in absolute terms:
the reference has no figure for it. Where the fixtures are missing (a GPU machine), GHN-3-T with
random weights on torchvision's ResNet-18 and ResNet-50, exported the same way (speed does not
depend on the weights).

Stages of one prediction, each timed (medians of ``rounds`` rounds, the models interleaved
within a round, after one warm-up round):

* ``load``: read and validate the ONNX file (:func:`~ghn_onnx.onnx_io.loading.load_model`);
* ``convert``: untie exporter aliases, ONNX → graph (:func:`~ghn_onnx.pipeline.prepare`);
* ``batch``: :meth:`GHN.batch` (edges, shortest-path distances, the dense and decoding plans);
* ``forward``: :meth:`GHN.forward` without autograd (transformer, decoders, the flat store).

``end_to_end_s`` = convert + batch + forward, the median of their per-round sums: from the ONNX
model in memory to every predicted tensor, as the reference's ``ghn(model)`` starts from the
PyTorch module (its graph construction included, model construction not). ``speedup`` = the
reference's median over it; ``with_load_s`` adds reading the file. The reference ran with one
thread, so ``--threads`` defaults to 1 (torch and numba).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ghn_onnx.benchmarks.timing import synchronizer

STAGES = ("load", "convert", "batch", "forward")
#: torchvision builders of the fallback cases (and of ResNet-50 in every run).
TORCHVISION = ("resnet18", "resnet50")
#: GHN-3-T as the fixtures' README describes it (random weights for the fallback).
GHN3_T = dict(max_shape=(64, 64, 16, 16), num_classes=1000, hid=64, hypernet="transformer", layers=3,
              heads=8, rules="ghn3")


def fixtures_dir() -> Path:
    """``$GHN_ONNX_SHARED/reference/ghn3-parity`` (default shared folder: ``<repo>/../shared``)."""
    shared = os.environ.get("GHN_ONNX_SHARED", Path(__file__).resolve().parents[2].parent / "shared")
    return Path(shared) / "reference" / "ghn3-parity"


def export_torchvision(name: str, path: Path) -> Path:
    """torchvision's ``name`` with its defaults (ImageNet, 224×224) under ``manual_seed(0)``,
    initializers zeroed, exported as the ghn3-parity fixtures were."""
    import onnx
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, name)().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
    buf = io.BytesIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tracing's one forward pass; two threads crawl on a busy machine
    try:
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), buf, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    finally:
        torch.set_num_threads(threads)
    onnx.save(onnx.load_from_string(buf.getvalue()), str(path))
    return path


@dataclass
class Case:
    name: str  # model, with the GHN when it is not GHN-3-T
    path: Path
    ghn: object  # GHN
    reference_s: float | None  # the reference's median end to end, where recorded


def cases(device: torch.device, tmp: Path, models: tuple[str, ...] | None = None,
          exports: tuple[str, ...] = ("resnet50",), log=lambda m: None) -> list[Case]:
    """The fixture models with a recorded runtime (those named in ``models``; default all) and
    the torchvision ``exports`` (or the fallback, see above)."""
    from ghn_onnx.ghn import GHN, GHNConfig, reference_formats

    root = fixtures_dir()
    out: list[Case] = []
    if (root / "config.json").is_file():
        ghn3, _ = reference_formats.load(root / "ghn3_random_T.npz")
        ghn3 = ghn3.to(device).eval()
        for name, m in json.loads((root / "config.json").read_text())["models"].items():
            if "runtime_s" in m and (root / f"{name}.onnx").is_file() and (models is None or name in models):
                out.append(Case(name, root / f"{name}.onnx", ghn3, m["runtime_s"]["end_to_end_median"]))
        ghn2_dir = root / "ghn2-imagenet"
        recorded = {name: m["runtime_s"]["end_to_end_median"]
                    for name, m in json.loads((ghn2_dir / "config.json").read_text())["models"].items()
                    if "runtime_s" in m and (models is None or name in models)}
        if recorded:
            ghn2 = reference_formats.load(ghn2_dir / "ghn2_random_imagenet.npz")[0].to(device).eval()
            out += [Case(f"{name} (GHN-2-ImageNet)", root / f"{name}.onnx", ghn2, t) for name, t in recorded.items()]
    else:
        log(f"no fixtures at {root}: GHN-3-T with random weights on torchvision exports")
        torch.manual_seed(0)
        ghn3 = GHN(GHNConfig(**GHN3_T)).to(device).eval()
        exports = TORCHVISION
    for name in exports:
        log(f"exporting torchvision {name}")
        out.append(Case(name, export_torchvision(name, tmp / f"{name}.onnx"), ghn3, None))
    return out


def _stages(case: Case, sync) -> dict[str, float]:
    """One prediction of ``case``, stage by stage (seconds), and the graph's node count."""
    from ghn_onnx.onnx_io.loading import load_model
    from ghn_onnx.pipeline import prepare

    ghn = case.ghn
    t = [time.perf_counter()]
    model = load_model(case.path)
    t.append(time.perf_counter())
    _, graph = prepare(model, case.path.name, rules=ghn.config.rules)
    t.append(time.perf_counter())
    batch = ghn.batch([graph])
    sync()
    t.append(time.perf_counter())
    out = ghn(batch)
    sync()
    t.append(time.perf_counter())
    del out
    return {**{s: b - a for s, a, b in zip(STAGES, t, t[1:])}, "nodes": len(graph)}


def bench_ghn3(device: str = "cpu", rounds: int = 7, threads: int | None = 1, models: tuple[str, ...] | None = None,
               exports: tuple[str, ...] = ("resnet50",), log=lambda m: None) -> dict:
    """Every case's stages (medians), end to end and the speedup over the reference; see the module
    docstring. ``threads`` sets torch's and numba's thread counts for the run (None: leave them);
    ``models`` and ``exports`` as :func:`cases`."""
    import numba

    device = torch.device(device)
    sync, load0 = synchronizer(device), _load()
    saved = torch.get_num_threads(), numba.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            all_cases = cases(device, Path(tmp), models, exports, log)
            times: dict[str, list[dict[str, float]]] = {c.name: [] for c in all_cases}
            for r in range(rounds + 1):  # round 0 warms up (numba compile, first-touch memory)
                log(f"round {r}/{rounds}")
                for c in all_cases:
                    s = _stages(c, sync)
                    if r:
                        times[c.name].append(s)
            summaries = {c.name: _summary(c, times[c.name]) for c in all_cases}
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])
    return {"device": str(device), "rounds": rounds, "threads": threads, "loadavg_start_end": [load0, _load()],
            "models": summaries}


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _summary(case: Case, rounds: list[dict[str, float]]) -> dict:
    med = {f"{s}_s": statistics.median(r[s] for r in rounds) for s in STAGES}
    e2e = statistics.median(r["convert"] + r["batch"] + r["forward"] for r in rounds)
    with_load = statistics.median(sum(r[s] for s in STAGES) for r in rounds)
    return {**med, "end_to_end_s": e2e, "with_load_s": with_load, "reference_s": case.reference_s,
            "speedup": None if case.reference_s is None else case.reference_s / e2e, "nodes": rounds[0]["nodes"],
            "ghn": "GHN-2-ImageNet" if case.ghn.config.hypernet == "gatedgnn" else "GHN-3-T"}


def format_table(result: dict) -> str:
    """A Markdown table of :func:`bench_ghn3`'s result (milliseconds)."""
    lines = ["| model | GHN | nodes | load | convert | batch | forward | end to end | reference | speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in result["models"].items():
        ref = "-" if m["reference_s"] is None else f"{m['reference_s'] * 1e3:.0f}"
        speed = "-" if m["speedup"] is None else f"{m['speedup']:.1f}x"
        lines.append(f"| {name.split(' (')[0]} | {m['ghn']} | {m['nodes']} | " + " | ".join(
            f"{m[f'{s}_s'] * 1e3:.1f}" for s in STAGES) + f" | {m['end_to_end_s'] * 1e3:.1f} | {ref} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="device the GHN runs on (default: cpu)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds, medians (default: 7)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and numba threads, as the reference's one (default: 1; 0 leaves them)")
    parser.add_argument("--models", default=None,
                        help="comma-separated fixture models (default: every one with a recorded runtime)")
    parser.add_argument("--exports", default="resnet50",
                        help="comma-separated torchvision models exported and timed too (default: resnet50; '' for none)")
    parser.add_argument("--json", type=Path, default=None, help="write the full result here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 0:
        parser.error("--rounds must be at least 1 and --threads at least 0")
    result = bench_ghn3(args.device, args.rounds, args.threads or None,
                        tuple(args.models.split(",")) if args.models else None,
                        tuple(e for e in args.exports.split(",") if e), log=lambda m: print(m, file=sys.stderr, flush=True))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"device {result['device']}, threads {result['threads']}, "
          f"load average at start and end {result['loadavg_start_end']}")


if __name__ == "__main__":
    main()
