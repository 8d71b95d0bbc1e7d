"""``ghn-onnx train``: set up data, architectures, GHN and trainer; resume when asked.

Single process on CPU or one GPU, or several processes under ``torchrun`` (``WORLD_SIZE`` set):
gloo on CPU, NCCL on GPUs; the meta-batch is split across ranks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from ghn_onnx.errors import CheckpointError
from ghn_onnx.training.datasets import ImageSet, load_cifar10, train_val_split
from ghn_onnx.ghn import GHNConfig
from ghn_onnx.training.evaluation import accuracy, mean_and_sem, random_subset
from ghn_onnx.training.generator import ArchPool, TrainingStream, arch_graph, build_net
from ghn_onnx.training.trainer import TrainConfig, Trainer, init_ghn

# Validation architectures: the first draws of a stream no training run uses (a different seed
# namespace than training seeds), so they are held out like the 5,000 validation images.
VALIDATION_SEED = 1_000_003


def validation_nets(n: int) -> list[tuple]:
    stream = TrainingStream(VALIDATION_SEED)
    return [next(stream) for _ in range(n)]


def make_validator(val_images: ImageSet, n_nets: int, n_images: int):
    """``evaluate(trainer) -> {"val_acc": mean, "val_sem": ...}`` on fixed held-out nets and images."""
    draws = validation_nets(n_nets)
    graphs = [arch_graph(spec, C, fc) for spec, C, fc in draws]
    images = random_subset(val_images, n_images, seed=0)

    def evaluate(trainer: Trainer) -> dict:
        ghn = trainer.ghn
        was = ghn.training
        ghn.eval()
        accs = []
        with torch.no_grad():
            preds = ghn(graphs)
            for (spec, C, fc), p in zip(draws, preds):
                accs.append(accuracy(build_net(spec, C, fc), p, images, device=trainer.device))
        ghn.train(was)
        mean, sem = mean_and_sem(accs)
        return {"val_acc": mean, "val_sem": sem, "val_nets": len(accs), "val_images": len(images)}

    return evaluate


def train(out_dir: str | os.PathLike, data: str | os.PathLike | None, cfg: TrainConfig, *, resume: bool = False,
          device: str = "cpu", val_nets: int = 20, val_images: int = 1000, progress: bool = True,
          ghn_config: GHNConfig | None = None, init: str | os.PathLike | None = None) -> Trainer:
    """Train into ``out_dir``; ``init`` warm-starts a new run from a checkpoint's weights (the
    optimizer and the streams start fresh). A resumed run ignores ``init``: its own state wins."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    splits = load_cifar10(data)
    train_set, val_set = train_val_split(splits["train"])
    out_dir = Path(out_dir)
    # Every rank must draw the same nets: add architectures on a fixed schedule, not by timing.
    add_every = 8 if distributed else None
    ghn = init_ghn(ghn_config, seed=cfg.seed)
    if init is not None and not (resume and (out_dir / "trainer.json").is_file()):
        from ghn_onnx.ghn import checkpoint

        start = checkpoint.load(init)
        if start.config != ghn.config:
            raise CheckpointError(f"{init}: configuration {start.config} differs from the run's {ghn.config}")
        ghn.load_state_dict(start.state_dict())
    # Networks built on the meta device cost no memory and no initialisation: the GHN supplies
    # every parameter (the trainer checks that it does).
    net_device = "meta" if cfg.meta_nets else None
    pool = ArchPool(TrainingStream(cfg.seed), add_every=add_every, device=net_device)
    trainer = Trainer(ghn, cfg, train_set, pool, out_dir, device=device)
    if resume and (out_dir / "trainer.json").is_file():
        state = trainer.load()
        trainer.nets = ArchPool.from_state(state["nets"], device=net_device)
        if distributed and trainer.nets.add_every is None:
            # A single-process run adds architectures by timing, which ranks would not agree on.
            trainer.nets.add_every = add_every
            trainer.changes.append({"step": trainer.step, "add_every": [None, add_every]})
    evaluate = make_validator(val_set, val_nets, val_images) if cfg.eval_every else None
    trainer.fit(evaluate=evaluate, progress=progress)
    if distributed:
        dist.barrier()
    return trainer
