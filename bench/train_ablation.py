"""Seconds per training step on CPU: the reference configuration, each lever alone, all combined.

    python bench/train_ablation.py [--rounds 3] [--threads 1] [--meta-batch 8] [--batch-size 64]
                                   [--seed 0] [--markdown F]

Every configuration is a :class:`~ghn_onnx.training.trainer.Trainer` with its own GHN (same
initialisation) running :meth:`~ghn_onnx.training.trainer.Trainer.train_step`; all of them run
in this process, interleaved round by round (a round times one step of each, so background load
hits all), after one warm-up step each; the figure is the median over rounds. The networks are
fixed: the first ``--meta-batch`` draws of ``TrainingStream(--seed)``, exported once; every step
builds their modules again (on CPU, or on ``meta`` for that lever), as ``ArchPool`` does for
every draw. The images are 64 random CIFAR-sized images per step from the trainer's data stream.

Levers (``TrainConfig`` fields; the reference has all of them off, as the trainer had before):

* ``per-net backward``: each network's backward right after its forward, down to its predicted
  parameters, then one GHN backward (what ``Trainer.forward_backward`` does; the other single
  levers run with the previous single backward of the summed loss, :class:`JointBackward`);
* ``bf16``: the networks' forward and backward under CPU bf16 autocast (the GHN stays fp32);
* ``channels_last``: NHWC images into the networks;
* ``meta``: networks built on the meta device (no parameter memory, no initialisation);
* ``sdpa``: ``fast_ops``: the ``msa`` op through ``scaled_dot_product_attention``, strided
  ``msa``/``cse`` blocks computing only the pixels they keep.

Then, on one step (fresh GHN, the same images, networks and dropout seeds), the cosine
similarity between the GHN gradient of each configuration and the reference's (flattened over
all GHN parameters), and the smallest per-tensor cosine.

Prints a Markdown table with the command line, date, machine, torch version, thread count and
the load average (``os.getloadavg``) at start and end.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ghn_onnx.graph.graph import Graph
from ghn_onnx.training.datasets import ImageSet
from ghn_onnx.training.generator import TrainingStream, arch_graph, build_net
from ghn_onnx.training.network import count_params
from ghn_onnx.training.ops import set_fast_ops
from ghn_onnx.training.trainer import (NET_DTYPES, TrainConfig, Trainer, check_coverage, cpu_has_native_bf16,
                                       init_ghn, net_loss, net_seed, ready_net, seeded_rng)

REFERENCE = {"precision": "fp32", "channels_last": False, "meta_nets": False, "fast_ops": False}
#: Configuration name → (per-net backward, the fields it changes from :data:`REFERENCE`).
LEVERS: dict[str, tuple[bool, dict]] = {
    "reference (joint backward, fp32, NCHW, CPU-built nets, materialised attention)": (False, {}),
    "per-net backward": (True, {}),
    "bf16 autocast": (False, {"precision": "bf16"}),
    "channels_last": (False, {"channels_last": True}),
    "meta-device nets": (False, {"meta_nets": True}),
    "sdpa (fast msa / cse)": (False, {"fast_ops": True}),
    "defaults (per-net backward, bf16, channels_last, sdpa)": (
        True, {"precision": "bf16", "channels_last": True, "fast_ops": True}),
    "all five": (True, {"precision": "bf16", "channels_last": True, "meta_nets": True, "fast_ops": True}),
}


def timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of one call of ``fn``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


NEXT_BATCH = "reference, next image batch (sampling noise)"


class Sample(NamedTuple):
    graph: Graph
    net: torch.nn.Module


class FixedDraws:
    """A ``NetSource`` serving the same draws in turn, building each network on every draw."""

    def __init__(self, draws: list, graphs: list[Graph], device: str | None) -> None:
        self.draws, self.graphs, self.device, self.n = draws, graphs, device, 0

    def draw(self) -> Sample:
        i = self.n % len(self.draws)
        self.n += 1
        spec, C, fc_dim = self.draws[i]
        return Sample(self.graphs[i], build_net(spec, C, fc_dim, device=self.device))

    def state(self) -> dict:
        return {"draws": self.n}

    def add_training_time(self, seconds: float) -> None:
        pass


class JointBackward(Trainer):
    """The trainer's previous meta-batch backward: every network's forward first, then one
    backward of the summed loss through all of them and the GHN (all activations alive at once)."""

    def forward_backward(self, images, labels, samples):
        cfg = self.cfg
        dtype = NET_DTYPES[self.precision]
        with torch.autocast(self.device.type, enabled=False):
            params = self.ghn([s.graph for _, s in samples])
        losses, correct = [], 0
        for (i, s), p in zip(samples, params):
            net = ready_net(s.net, self.device)
            set_fast_ops(net, cfg.fast_ops)
            check_coverage(net, p)
            with seeded_rng(self.device, net_seed(cfg.seed, self.step, i)), \
                    torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, right = net_loss(net, p, images, labels)
            losses.append(loss)
            correct += int(right)
        loss = torch.stack(losses).sum() / cfg.meta_batch
        self.scaler.scale(loss).backward()
        return loss.detach(), correct


def make_trainer(name: str, cfg: TrainConfig, images: ImageSet, draws: list, graphs: list[Graph],
                 tmp: Path, ghn=None) -> Trainer:
    kind = Trainer if LEVERS[name][0] else JointBackward
    return kind(ghn if ghn is not None else init_ghn(seed=cfg.seed), cfg, images,
                FixedDraws(draws, graphs, "meta" if cfg.meta_nets else None), tmp)


def flat_grad(ghn: torch.nn.Module) -> list[torch.Tensor]:
    return [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone() for p in ghn.parameters()]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def gradient_agreement(configs: dict[str, TrainConfig], images: ImageSet, draws: list, graphs: list[Graph],
                       seed: int, tmp: Path) -> dict[str, dict]:
    """Per configuration: cosine of its GHN gradient with the reference's on one step (same GHN
    weights, images, networks and dropout seeds), the smallest per-tensor cosine, the loss. The
    entry :data:`NEXT_BATCH` is the reference on the next image batch: the scale of the
    gradient's own sampling noise."""
    ghn = init_ghn(seed=seed)
    grads, losses = {}, {}
    ref_name = next(iter(configs))
    for name, cfg in [*configs.items(), (NEXT_BATCH, configs[ref_name])]:
        trainer = make_trainer(ref_name if name == NEXT_BATCH else name, cfg, images, draws, graphs, tmp, ghn)
        ghn.zero_grad(set_to_none=True)
        batch = trainer.next_batch()
        if name == NEXT_BATCH:
            batch = trainer.next_batch()
        loss, _ = trainer.forward_backward(*batch, [(i, trainer.nets.draw()) for i in range(cfg.meta_batch)])
        grads[name], losses[name] = flat_grad(ghn), float(loss)
    ref = grads[ref_name]
    out = {}
    for name, g in grads.items():
        per_tensor = [cosine(a, b) for a, b in zip(g, ref) if float(b.norm()) > 0]
        full, full_ref = torch.cat(g), torch.cat(ref)
        out[name] = {"cosine": cosine(full, full_ref), "min_tensor_cosine": min(per_tensor),
                     "rel_diff": float((full - full_ref).norm() / full_ref.norm()), "loss": losses[name]}
    return out


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="Timed rounds (default 3).")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1).")
    ap.add_argument("--meta-batch", type=int, default=8, help="Networks per step (default 8).")
    ap.add_argument("--batch-size", type=int, default=64, help="Images per step (default 64).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the training stream drawn from (default 0).")
    ap.add_argument("--markdown", type=Path, help="Also write the table to this file.")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    stream = TrainingStream(args.seed)
    draws = [next(stream) for _ in range(args.meta_batch)]
    graphs = [arch_graph(spec, C, fc_dim) for spec, C, fc_dim in draws]
    rng = np.random.default_rng(args.seed)
    images = ImageSet(rng.integers(0, 256, (16 * args.batch_size, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 10, 16 * args.batch_size).astype(np.int64))
    base = TrainConfig(meta_batch=args.meta_batch, batch_size=args.batch_size, seed=args.seed, **REFERENCE)
    configs = {name: TrainConfig(**{**base.__dict__, **change}) for name, (_, change) in LEVERS.items()}

    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: make_trainer(name, cfg, images, draws, graphs, Path(tmp)) for name, cfg in configs.items()}
        for name, trainer in trainers.items():
            print(f"warm-up: {name}", file=sys.stderr)
            timed(trainer.train_step)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in trainers}
        for r in range(args.rounds):
            for name, trainer in trainers.items():
                times[name].append(timed(trainer.train_step))
            print(f"round {r + 1}/{args.rounds} (wall/CPU s): "
                  + ", ".join(f"{v[-1][0]:.1f}/{v[-1][1]:.1f}" for v in times.values()), file=sys.stderr)
        agreement = gradient_agreement(configs, images, draws, graphs, args.seed, Path(tmp))
    load_end = os.getloadavg()

    ref_name = next(iter(LEVERS))
    wall = {k: statistics.median(t for t, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    nets = ", ".join(f"{spec.key[:6]} C={C} ({count_params(spec, C, fc_dim) / 1e6:.2f}M"
                     + "".join(f", {op}" for op in ("msa", "cse") if op in str(spec.genotype)) + ")"
                     for spec, C, fc_dim in draws)
    lines = [
        f"Command: `{shlex.join(['python', 'bench/train_ablation.py', *(argv if argv is not None else sys.argv[1:])])}`",
        "",
        f"Date: {started}. Machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}; torch {torch.__version__}, "
        f"{args.threads} thread(s). Load average (1/5/15 min) at start {_load(load_start)}, "
        f"at end {_load(load_end)}.",
        "",
        f"Step: meta-batch {args.meta_batch}, {args.batch_size} images, one process; medians of {args.rounds} "
        f"interleaved rounds after one warm-up step each; CPU = this process's CPU time (all its threads). "
        f"Networks (first {args.meta_batch} draws of TrainingStream({args.seed})): {nets}.",
        "",
        "| configuration | wall s / step | CPU s / step | cheaper than reference (wall) | (CPU) "
        "| gradient cosine vs reference | min per-tensor cosine | loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in times:
        a = agreement[name]
        lines.append(f"| {name} | {wall[name]:.2f} | {cpu[name]:.2f} | {wall[ref_name] / wall[name]:.2f}x | "
                     f"{cpu[ref_name] / cpu[name]:.2f}x | {a['cosine']:.5f} | {a['min_tensor_cosine']:.4f} | "
                     f"{a['loss']:.4f} |")
    a = agreement[NEXT_BATCH]
    lines.append(f"| {NEXT_BATCH} | | | | | {a['cosine']:.5f} | {a['min_tensor_cosine']:.4f} | {a['loss']:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return table


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


if __name__ == "__main__":
    main()
