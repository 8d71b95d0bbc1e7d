"""Timings of the Triton kernels against the PyTorch paths they replace.

    python -m ghn_onnx.benchmarks.kernels [--device cuda] [--repeats 20]

Case: a meta-batch of 8 DeepNets graphs (the five ghn2-parity DeepNets fixtures, the first three
repeated, as ``bench/bench_predict.py``), random GHN-2 weights (speed does not depend on them).
Each figure is the median of ``repeats`` runs after warm-up, synchronised on CUDA.

* message passing: Triton kernel vs ``GatedGNN.forward_sequential`` (the reference loop) and
  ``GatedGNN.forward`` (level by level); on CPU also the numba fused sweep;
* decoding: ``GHN.decode_flat(h, batch, "triton")`` (:mod:`~ghn_onnx.ghn.decode.triton_store`) vs ``GHN.decode_tensors`` (tensor by
  tensor in PyTorch; ``GHN.decode`` itself takes the flat path without autograd), and the bandwidth
  bound of the decode: bytes of predicted parameters written / the device's copy bandwidth
  (``2 · bytes / time`` of a large tensor copy, read plus write).

On CPU the Triton timings are skipped (the interpreter's speed means nothing) and the result says
so; the PyTorch timings still run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from ghn_onnx.benchmarks.timing import copy_bandwidth, median_time
from ghn_onnx.ghn import GHN, GHNConfig
from ghn_onnx.ghn.hypernet import numba_sweep as fused_sweep
from ghn_onnx.graph.graph import Graph

DEEPNETS = ["deepnets_1", "deepnets_6", "deepnets_9", "deepnets_11", "deepnets_17", "deepnets_1", "deepnets_6",
            "deepnets_9"]


def parity_dir() -> Path:
    """``$GHN_ONNX_SHARED/reference/ghn2-parity`` (default shared folder: ``<repo>/../shared``)."""
    repo = Path(__file__).resolve().parents[2]
    return Path(os.environ.get("GHN_ONNX_SHARED") or repo.parent / "shared") / "reference" / "ghn2-parity"


def deepnets_graphs() -> list[Graph]:
    from ghn_onnx.convert import convert_file

    cache: dict[str, Graph] = {}
    for name in DEEPNETS:
        if name not in cache:
            cache[name] = convert_file(parity_dir() / f"{name}.onnx")
    return [cache[n] for n in DEEPNETS]


def bench_kernels(device: str | torch.device = "cuda", graphs: list[Graph] | None = None,
                  repeats: int = 20, seq_repeats: int = 3) -> dict:
    """Time message passing and decoding on ``device``; see the module docstring.

    Args:
        device: where to run ("cuda" or "cpu").
        graphs: the meta-batch (default: the 8 DeepNets fixture graphs).
        repeats: runs per figure (median).
        seq_repeats: runs of the slow sequential reference loop.

    Returns:
        A JSON-friendly dict: the case, ``message_passing`` and ``decode`` timings in seconds
        (``None`` where skipped), the copy bandwidth and decode bound, and ``notes``.
    """
    device = torch.device(device)
    graphs = graphs if graphs is not None else deepnets_graphs()
    torch.manual_seed(0)
    ghn = GHN(GHNConfig()).to(device).eval()
    batch = ghn.batch(graphs)
    with torch.no_grad():
        h0 = ghn.initial_states(batch)
    triton_ok = device.type == "cuda"
    notes = [] if triton_ok else ["no CUDA device: Triton timings skipped (the interpreter's speed is meaningless)"]
    out: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "graphs": [g.name for g in graphs],
        "nodes": batch.n_nodes,
        "edges_with_virtual": int(len(batch.edges)),
        "levels": [len(batch.forward), len(batch.backward)],
        "repeats": repeats,
    }

    with torch.no_grad():
        mp = {
            "sequential_s": median_time(lambda: ghn.gnn.forward_sequential(h0, batch), device, seq_repeats, 1),
            "levels_s": median_time(lambda: ghn.gnn(h0, batch), device, repeats),
            "numba_s": None,
            "triton_s": None,
        }
        if device.type == "cpu":
            mp["numba_s"] = median_time(lambda: fused_sweep.run(ghn.gnn, h0, batch), device, repeats)
        if triton_ok:
            from ghn_onnx.ghn.hypernet.triton_sweep import message_passing

            mp["triton_s"] = median_time(lambda: message_passing(ghn.gnn, h0, batch), device, repeats)
            mp["triton_per_level_s"] = median_time(
                lambda: message_passing(ghn.gnn, h0, batch, persistent=False), device, repeats)
        out["message_passing"] = mp

        h = ghn.gnn(h0, batch)
        h = ghn.ln(h) if ghn.ln is not None else h
        n_params = sum(p.numel for g in graphs for n in g.nodes for p in n.params)
        bw = copy_bandwidth(device, nbytes=(1 << 28) if device.type == "cuda" else (1 << 26))
        dec = {"torch_s": median_time(lambda: ghn.decode_tensors(h, batch), device, repeats),
               "triton_s": None, "triton_fp16_s": None,
               "params": n_params, "bytes_written_fp32": 4 * n_params,
               "copy_bandwidth_GBps": bw / 1e9, "bound_fp32_s": 4 * n_params / bw}
        if triton_ok:
            dec["triton_s"] = median_time(lambda: ghn.decode_flat(h, batch, "triton"), device, repeats)
            dec["triton_fp16_s"] = median_time(lambda: ghn.decode_flat(h, batch, "triton", torch.float16),
                                               device, repeats)
            dec["triton_GBps_written"] = 4 * n_params / dec["triton_s"] / 1e9
        out["decode"] = dec
    out["notes"] = notes
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to time on (default: cuda when available, else cpu)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per figure, median (default: 20)")
    args = parser.parse_args(argv)
    print(json.dumps(bench_kernels(args.device, repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
