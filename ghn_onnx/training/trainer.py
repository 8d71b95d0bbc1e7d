"""Training a GHN on CIFAR-10 over random architectures (GHN2_FACTS §5.3).

One step: draw ``meta_batch`` networks, predict all their parameters with the GHN in one batched
pass, run the same image batch through every network with the predicted parameters (BN with
batch statistics), average the cross-entropies, and update the GHN. With ``torchrun`` the
meta-batch is split across ranks (each rank builds and runs its share; gradients are averaged),
as GHN-3 does.

Everything needed to resume exactly is in the checkpoint folder: ``ghn.safetensors`` (the model,
loadable on its own), ``trainer.safetensors`` (optimizer moments) and ``trainer.json`` (step,
counters of the data and architecture streams, wall time, configuration).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ghn_onnx.training.datasets import BatchStream, ImageSet
from ghn_onnx.errors import CheckpointError
from ghn_onnx.ghn import GHN, GHNConfig, checkpoint
from ghn_onnx.graph.graph import Graph


@dataclass(frozen=True)
class TrainConfig:
    """Attributes mirror ``ghn-onnx train`` options."""

    steps: int = 1000
    meta_batch: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    grad_clip: float = 5.0
    seed: int = 0
    amp: bool = True  # on CUDA only
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0  # 0: never during training


class NetSample(Protocol):
    graph: Graph
    net: nn.Module


class NetSource(Protocol):
    """Where training networks come from (:class:`~ghn_onnx.training.generator.ArchPool`):
    graphs plus modules whose parameter names are the graphs' tensor names."""

    def draw(self) -> NetSample: ...

    def state(self) -> dict[str, Any]: ...

    def add_training_time(self, seconds: float) -> None: ...


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a half cosine to zero at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def net_loss(net: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and number correct of ``net`` run with ``params`` (BN on batch statistics)."""
    net.train()
    logits = torch.func.functional_call(net, params, (images,), strict=False)
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum()


class Trainer:
    def __init__(self, ghn: GHN, cfg: TrainConfig, images: ImageSet, nets: NetSource, out_dir: str | os.PathLike,
                 device: str | torch.device = "cpu") -> None:
        self.ghn, self.cfg, self.nets = ghn.to(device), cfg, nets
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.data = BatchStream(images, cfg.batch_size, seed=cfg.seed)
        self.opt = torch.optim.AdamW(ghn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        self.step = 0
        self.counters = {"images": 0, "networks": 0, "wall_seconds": 0.0}

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        images, labels = self.data.next()
        images, labels = images.to(self.device), labels.to(self.device)
        drawn = [self.nets.draw() for _ in range(cfg.meta_batch)]
        mine = drawn[self.rank::self.world]  # every rank draws the same nets, runs its share
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            params = self.ghn([d.graph for d in mine])
            losses, correct = [], 0
            for net, p in zip((d.net for d in mine), params):
                loss, right = net_loss(net.to(self.device), p, images, labels)
                losses.append(loss)
                correct += int(right)
            loss = torch.stack(losses).sum() / cfg.meta_batch
        self.scaler.scale(loss).backward()
        if self.world > 1:
            for p in self.ghn.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        self.scaler.unscale_(self.opt)
        grad_norm = float(nn.utils.clip_grad_norm_(self.ghn.parameters(), cfg.grad_clip))
        self.scaler.step(self.opt)
        self.scaler.update()
        seconds = time.perf_counter() - t0
        self.nets.add_training_time(seconds)
        self.step += 1
        self.counters["images"] += len(labels)
        self.counters["networks"] += cfg.meta_batch
        self.counters["wall_seconds"] += seconds
        total = torch.tensor([loss.item() * self.world, correct, len(mine) * len(labels)])
        if self.world > 1:
            dist.all_reduce(total)
        return {"step": self.step, "loss": float(total[0]) / self.world, "acc": float(total[1] / total[2]),
                "grad_norm": grad_norm, "lr": lr_at(self.step - 1, cfg), "seconds": seconds}

    # -- the loop ------------------------------------------------------------------------------
    def fit(self, on_log: Callable[[dict], None] | None = None,
            evaluate: Callable[["Trainer"], dict] | None = None, progress: bool = True) -> None:
        from tqdm import tqdm

        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or self.rank != 0,
                   desc="train", unit="step", dynamic_ncols=True)
        window: list[dict] = []
        while self.step < cfg.steps:
            rec = self.train_step()
            window.append(rec)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                mean = {k: sum(r[k] for r in window) / len(window) for k in ("loss", "acc", "seconds")}
                rec = {**rec, **{f"avg_{k}": v for k, v in mean.items()}, **self.counters}
                bar.set_postfix(loss=f"{mean['loss']:.3f}", acc=f"{mean['acc']:.3f}",
                                steps_per_s=f"{1 / mean['seconds']:.2f}")
                window = []
                if self.rank == 0:
                    self._append("log.jsonl", rec)
                    if on_log:
                        on_log(rec)
            if evaluate and cfg.eval_every and self.step % cfg.eval_every == 0 and self.rank == 0:
                self._append("val.jsonl", {"step": self.step, **self.counters, **evaluate(self)})
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()

    def _append(self, name: str, rec: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / name, "a") as f:
            f.write(json.dumps(rec) + "\n")

    # -- checkpoints ---------------------------------------------------------------------------
    def save(self) -> None:
        if self.rank != 0:
            return
        from safetensors.torch import save_file

        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.ghn, self.out_dir / "ghn.safetensors",
                        extra={"trained_steps": str(self.step), "images_seen": str(self.counters["images"])})
        names = {id(p): n for n, p in self.ghn.named_parameters()}
        moments: dict[str, torch.Tensor] = {}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                moments[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1) if k == "step" \
                    else v.detach().cpu().contiguous()
        tmp = self.out_dir / "trainer.safetensors.tmp"
        save_file(moments, str(tmp))
        os.replace(tmp, self.out_dir / "trainer.safetensors")
        state = {"step": self.step, "counters": self.counters, "data": self.data.state(),
                 "nets": self.nets.state(), "config": dataclasses.asdict(self.cfg)}
        tmp = self.out_dir / "trainer.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.out_dir / "trainer.json")

    def load(self) -> dict[str, Any]:
        """Resume from ``out_dir``; returns the saved state (``nets`` holds the stream state to
        restore the architecture source with)."""
        from safetensors.torch import load_file

        try:
            state = json.loads((self.out_dir / "trainer.json").read_text())
            moments = load_file(str(self.out_dir / "trainer.safetensors"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.out_dir}: cannot resume ({exc})") from None
        loaded = checkpoint.load(self.out_dir / "ghn.safetensors", device=self.device)
        self.ghn.load_state_dict(loaded.state_dict())
        by_name = dict(self.ghn.named_parameters())
        for key, v in moments.items():
            name, k = key.split("::")
            st = self.opt.state.setdefault(by_name[name], {})
            st[k] = v.reshape(()) if k == "step" else v.to(self.device)
        self.step = int(state["step"])
        self.counters = state["counters"]
        self.data = BatchStream(self.data.data, self.cfg.batch_size, seed=self.cfg.seed, **state["data"])
        return state


def init_ghn(config: GHNConfig | None = None, seed: int = 0) -> GHN:
    """A fresh GHN with the initialisation GHN-3 uses for its last decoder layers (weights / 5,
    bias 0), which keeps early predictions small."""
    torch.manual_seed(seed)
    ghn = GHN(config or GHNConfig())
    for layer in (ghn.decoder.conv[2], ghn.decoder_1d.fc[2], ghn.decoder.class_layer_predictor[1]):
        with torch.no_grad():
            layer.weight.div_(5)
            layer.bias.zero_()
    return ghn.train()
