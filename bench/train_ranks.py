"""Seconds per training step: one process of two threads against two gloo ranks of one thread.

    python bench/train_ranks.py --data cifar10-jpeg.zip [--steps 8] [--rounds 2] [--batch-size 64]
                                [--precision fp32,bf16] [--json F]

The training issue's lever "two gloo ranks of one thread each instead of one process of two
threads" on this 2-core machine. Each case is a whole ``ghn-onnx train`` run from scratch (seed
0, meta-batch 8, no validation) in a fresh folder, the ranks started as ``torchrun`` would (one
process per rank, gloo, each building only its half of the meta-batch); the cases alternate
round by round, so background load hits all alike. The figure is the median ``seconds`` that
rank 0 logs per step (a step ends with the all-reduce, so rank 0's time is the step's), over the
steps after the first two (numba compiling, the first networks built). The architecture pool
grows by timing in one process and every 8 steps under ranks, so the cases train on the same
stream of draws but not always on the same networks: compare medians, not single steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(out: Path, data: str, steps: int, batch: int, precision: str, ranks: int) -> list[float]:
    args = ["train", "--out", str(out), "--data", data, "--steps", str(steps), "--warmup", "1",
            "--batch-size", str(batch), "--meta-batch", "8", "--save-every", "100000", "--log-every", "1", "--seed", "0",
            "--precision", precision]
    code = f"import sys; sys.argv = ['ghn-onnx'] + {args!r}; from ghn_onnx.cli import main; main()"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if ranks == 1:
        env.update(OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
        procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1", WORLD_SIZE=str(ranks),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs = [subprocess.Popen([sys.executable, "-c", code],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for r in range(ranks)]
    if any(p.wait() for p in procs):
        raise SystemExit(f"train failed in {out}")
    # log.jsonl has one record per log_every steps; per-step seconds come from the step records.
    return [json.loads(x)["seconds"] for x in (out / "log.jsonl").read_text().splitlines() if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default="fp32,bf16")
    ap.add_argument("--json")
    a = ap.parse_args()
    cases = [(p, r) for p in a.precision.split(",") for r in (1, 2)]
    seconds: dict[str, list[float]] = {}
    load0, t0 = os.getloadavg(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.rounds):
            for p, r in cases:
                name = f"{p}, " + ("one process, 2 threads" if r == 1 else f"{r} gloo ranks, 1 thread each")
                per_step = _run(Path(tmp) / f"{rnd}-{p}-{r}", a.data, a.steps, a.batch_size, p, r)
                seconds.setdefault(name, []).extend(per_step[2:])
                print(f"round {rnd + 1}: {name}: {statistics.median(per_step[2:]):.2f} s/step", file=sys.stderr)
    base = {p: statistics.median(v) for k, v in seconds.items() for p in [k.split(",")[0]] if "one process" in k}
    ref = base.get("fp32")
    print(f"{t0}, load average {load0[0]:.2f} -> {os.getloadavg()[0]:.2f}, batch {a.batch_size}, meta-batch 8, "
          f"{a.steps} steps x {a.rounds} rounds per case (median of steps 3..)")
    print("| case | s / step | vs one process, same precision | vs fp32 one process |\n|---|---|---|---|")
    for k, v in seconds.items():
        m = statistics.median(v)
        p = k.split(",")[0]
        print(f"| {k} | {m:.2f} | {base[p] / m:.2f}x | {f'{ref / m:.2f}x' if ref else ''} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"date": t0, "load": [load0[0], os.getloadavg()[0]],
                                            "batch_size": a.batch_size, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
