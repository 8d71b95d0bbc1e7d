"""GHN forward and file-to-file latency: fast CPU path vs the sequential reference, side by side.

    python bench/bench_predict.py [--repeats 15] [--json out.json]

Cases: ResNet-50 (CIFAR variant: 3x3 stem, no max-pool, 10 classes, TorchScript export with BN
kept) and a meta-batch of 8 DeepNets graphs (the five ghn2-parity DeepNets fixtures, the first
three repeated). Both paths run in the same process, interleaved, on the same prebuilt graphs;
the figure is the median of ``--repeats`` runs. "cold" is the fast path with its output memory
handed back before each call (fresh pages, as for a result that is kept). GHN weights: the
reference fixture ``ghn2_random_cifar10.npz`` (speed does not depend on the values).

The full suite (throughput over generated networks, a training step, the write bound, the GPU
kernels) is ``ghn-onnx bench``; see README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ghn_onnx.benchmarks.kernels import DEEPNETS, parity_dir
from ghn_onnx.benchmarks.suite import export_cifar_resnet50
from ghn_onnx.benchmarks.timing import interleaved, synchronizer, timed
from ghn_onnx.convert import convert_file
from ghn_onnx.ghn import checkpoint
from ghn_onnx.ghn.decode import numba_store as fused_tiling
from ghn_onnx.pipeline import predict_files

NO_SYNC = synchronizer(torch.device("cpu"))


def interleaved_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms of each function, alternating between them so background load hits both."""
    return {k: v * 1e3 for k, v in interleaved(fns, repeats, NO_SYNC).items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    parity = parity_dir()
    ghn = checkpoint.load_reference(parity / "ghn2_random_cifar10.npz")
    results: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "python": platform.python_version(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats, "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        r50 = export_cifar_resnet50(tmp / "resnet50.onnx")
        cases = {"resnet50": [r50], "deepnets_batch8": [parity / f"{n}.onnx" for n in DEEPNETS]}
        for case, files in cases.items():
            graphs = [convert_file(f) for f in files]
            # GHN.batch: edges, levels and the fast path's plans; outside the forward's timing
            build_ms = 1e3 * statistics.median(timed(lambda: ghn.batch(graphs), NO_SYNC) for _ in range(5))
            batch = ghn.batch(graphs)
            with torch.no_grad():
                ghn(batch)
                ghn(batch, sequential=True)  # warm-up (numba compiles on first use)
                fwd = interleaved_ms({
                    "fast": lambda: ghn(batch),
                    # the fast path with its output memory handed back first: fresh pages each call
                    "fast_cold": lambda: (fused_tiling.OUTPUT.release(), ghn(batch)),
                    "reference": lambda: ghn(batch, sequential=True),
                }, args.repeats)
            outs = [tmp / f"out_{i}.onnx" for i in range(len(files))]
            f2f_repeats = max(3, args.repeats // 3)
            f2f = interleaved_ms({
                "fast": lambda: predict_files(files, outs, ghn),
                "reference": lambda: predict_files(files, outs, ghn, reference=True),
            }, f2f_repeats)
            results["cases"][case] = {
                "graphs": len(graphs), "nodes": sum(len(g) for g in graphs), "batch_build_ms": build_ms,
                "edges_with_virtual": int(len(batch.edges)),
                "ghn_forward_ms": fwd, "ghn_forward_speedup": fwd["reference"] / fwd["fast"],
                "ghn_forward_cold_speedup": fwd["reference"] / fwd["fast_cold"],
                "file_to_file_ms": f2f, "file_to_file_speedup": f2f["reference"] / f2f["fast"],
            }
    print(f"{'case':<18}{'what':<18}{'fast ms':>10}{'reference ms':>14}{'speedup':>9}")
    for case, r in results["cases"].items():
        rows = [("ghn_forward", "fast", r["ghn_forward_speedup"]),
                ("ghn_forward", "fast_cold", r["ghn_forward_cold_speedup"]),
                ("file_to_file", "fast", r["file_to_file_speedup"])]
        for what, variant, speedup in rows:
            ms = r[f"{what}_ms"]
            label = what + (" (cold)" if variant == "fast_cold" else "")
            print(f"{case:<18}{label:<18}{ms[variant]:>10.1f}{ms['reference']:>14.1f}{speedup:>8.1f}x")
        print(f"{case:<18}{'GHN.batch build':<18}{r['batch_build_ms']:>10.1f}{'(untimed above)':>23}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
