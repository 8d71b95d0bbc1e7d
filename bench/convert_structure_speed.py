"""The converter's structure pass and the batch's GHN-2 levels, alone (issue 12 item 8).

    python bench/convert_structure_speed.py [--repeats 21] [--model F ...]

For each GHN-3 parity fixture (``$GHN_ONNX_SHARED/reference/ghn3-parity``), the ViT of
``tests/fixtures/frameworks`` and any ``--model``, in one process and interleaved repeat by
repeat, medians in milliseconds:

* the squeeze-excitation gate search as it was (a walk over the data ancestors of both sides of
  every candidate ``Mul``, the tests' reference in ``tests/test_structure_caches.py``) and as
  :class:`~ghn_onnx.convert.context.ConversionContext` now runs it (one memoised pass);
* :meth:`GraphBatch.build <ghn_onnx.graph.batch.GraphBatch.build>` and the GHN-2 sweep levels
  (:func:`~ghn_onnx.graph.batch.sweep_levels`) that ``build`` used to compute for every batch and
  now only the gated GNN's engines ask for.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ghn_onnx.convert.context import SQUEEZE_OPS, ConversionContext  # noqa: E402
from ghn_onnx.convert.onnx_to_graph import convert  # noqa: E402
from ghn_onnx.graph.batch import GraphBatch, sweep_levels  # noqa: E402
from ghn_onnx.onnx_io.loading import load_model  # noqa: E402
from tests.test_structure_caches import _ancestors  # noqa: E402


def walk_per_gate(ctx: ConversionContext, model) -> int:
    """The former search: the SE gates found with two ancestor walks per candidate."""
    t, found = ctx.tensors, 0
    for node in model.graph.node:
        data = t.data_inputs(node)
        if node.op_type != "Mul" or len(data) != 2:
            continue
        for x, g in (data, data[::-1]):
            gate_input = ctx._gate_input(g)
            if gate_input is None:
                continue
            x0 = t.through_shape_ops(x)
            if t.through_shape_ops(gate_input) == x0:
                continue
            branch = _ancestors(t, gate_input) - _ancestors(t, x0)
            if any(b in t.producer and t.producer[b].op_type in SQUEEZE_OPS for b in branch):
                found += 1
                break
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--model", action="append", default=[], help="another ONNX file")
    args = ap.parse_args()
    shared = Path(os.environ.get("GHN_ONNX_SHARED", ROOT.parent / "shared"))
    paths = sorted((shared / "reference" / "ghn3-parity").glob("*.onnx"))
    paths += [ROOT / "tests" / "fixtures" / "frameworks" / "torch_vit.onnx"] + [Path(p) for p in args.model]
    print("| model | SE gates | SE search, walk per gate | SE search, one pass | GraphBatch.build | GHN-2 levels |")
    print("|---|---:|---:|---:|---:|---:|")
    for path in paths:
        model = load_model(path)
        ctx = ConversionContext(model)
        graph = convert(model, name=path.name, rules="ghn3")
        gates = walk_per_gate(ctx, model)
        assert gates == sum(ctx.is_cse(n) for n in model.graph.node), path
        times: list[list[float]] = [[], [], [], []]
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            walk_per_gate(ctx, model)
            t1 = time.perf_counter()
            ctx._cse.clear()
            ctx._squeeze.clear()
            ctx._find_se_gates(model)
            t2 = time.perf_counter()
            batch = GraphBatch.build([graph])
            t3 = time.perf_counter()
            sweep_levels(batch)
            t4 = time.perf_counter()
            for column, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                column.append(dt)
        cells = " | ".join(f"{statistics.median(c) * 1e3:.1f}" for c in times)
        print(f"| {path.stem} | {gates} | {cells} |")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
