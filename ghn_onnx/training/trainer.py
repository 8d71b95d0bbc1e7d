"""Training a GHN on CIFAR-10 over random architectures (GHN2_FACTS §5.3).

One step: draw ``meta_batch`` networks, predict all their parameters with the GHN in one batched
pass (fp32, outside autocast), run the same image batch through every network with the predicted
parameters (BN with batch statistics; under ``precision`` bf16 or fp16 the networks' forward and
backward run in autocast, the predicted parameters being cast inside the networks' ops), average
the cross-entropies, and update the GHN with AdamW (weight decay on the weights of its linear,
convolutional and recurrent layers only). With ``torchrun`` the meta-batch is split across ranks:
every rank draws the same specs, builds and runs only its share, and the gradients are summed in
one flat all-reduce.

Randomness inside a network (dropout in its classifier) is seeded per ``(seed, step, network
index)``, so it does not depend on how networks were built, on the number of ranks or on a resume.

Everything needed to resume exactly is in the checkpoint folder: ``ghn.safetensors`` (the model,
loadable on its own), ``trainer.safetensors`` (optimizer moments, the torch RNG state) and
``trainer.json`` (step, counters of the data and architecture streams, GradScaler state, wall
time, configuration, the configuration changes made at resumes, and the best validation so far).
With periodic validation, ``best.safetensors`` holds the weights that validated best. The data stream and the
architecture source use generators seeded from their counters; numpy's and Python's global RNGs
are not used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ghn_onnx.errors import CheckpointError, GhnOnnxError
from ghn_onnx.ghn import GHN, GHNConfig, checkpoint
from ghn_onnx.graph.graph import Graph
from ghn_onnx.training.datasets import BatchStream, ImageSet
from ghn_onnx.training.ops import set_fast_ops

#: ``precision`` → the dtype of the networks' autocast (None: no autocast).
NET_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS: tuple[str, ...] = ("auto", *NET_DTYPES)
#: Configuration fields whose change on resume would desynchronise the data or architecture
#: streams (the batch drawn at step t, the networks drawn at step t, their dropout masks).
STREAM_FIELDS: tuple[str, ...] = ("seed", "batch_size", "meta_batch")
#: Fields that only say how long to train and how often to log, save and evaluate.
SCHEDULE_FIELDS: tuple[str, ...] = ("steps", "log_every", "save_every", "eval_every")
#: What runs saved before a field existed were trained with (their ``trainer.json`` lacks it).
LEGACY_VALUES: dict[str, Any] = {"precision": "fp32", "channels_last": False, "fast_ops": False,
                                 "meta_nets": False}
#: Seed namespace of the per-network generators (dropout).
NET_RNG_NAMESPACE = 0xD409


@dataclass(frozen=True)
class TrainConfig:
    """Attributes mirror ``ghn-onnx train`` options.

    Attributes:
        amp: on CUDA with ``precision="auto"``: fp16 autocast with a GradScaler (else fp32).
        precision: the networks' forward and backward: ``fp32``, ``bf16`` (autocast), ``fp16``
            (CUDA autocast + GradScaler), or ``auto`` (:func:`resolve_precision`). The GHN always
            runs in fp32.
        channels_last: feed the networks NHWC images (convolutions then run NHWC).
        fast_ops: strided ``msa``/``cse`` blocks compute only the pixels they keep, and ``msa``
            uses ``scaled_dot_product_attention`` (:mod:`ghn_onnx.training.ops`).
        meta_nets: build training networks on the ``meta`` device (no memory, no initialisation:
            the GHN supplies every parameter); read by :func:`ghn_onnx.training.run.train`.
    """

    steps: int = 1000
    meta_batch: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    grad_clip: float = 5.0
    seed: int = 0
    amp: bool = True
    precision: str = "auto"
    channels_last: bool = True
    fast_ops: bool = True
    meta_nets: bool = False
    log_every: int = 10
    save_every: int = 100
    eval_every: int = 0  # 0: never during training

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"Expected precision in {PRECISIONS} (got {self.precision!r})")


class PredictionCoverageError(GhnOnnxError):
    """The GHN's prediction for a training network misses some of its parameters (they would
    silently keep their random initialisation) or names tensors the network does not have."""


class NetSample(Protocol):
    graph: Graph | None  # None for a draw made with ``build=False``
    net: nn.Module | None


class NetSource(Protocol):
    """Where training networks come from (:class:`~ghn_onnx.training.generator.ArchPool`):
    graphs plus modules whose parameter names are the graphs' tensor names. ``draw(build=False)``
    advances the source exactly as ``draw()`` does without building anything; it is only used by
    multi-process runs (for the other ranks' networks)."""

    def draw(self) -> NetSample: ...

    def state(self) -> dict[str, Any]: ...

    def add_training_time(self, seconds: float) -> None: ...


# -- pieces of a step ------------------------------------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then a half cosine to zero at ``cfg.steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """The CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16; read from ``/proc/cpuinfo``,
    so False off Linux). Without it oneDNN emulates bf16, which is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device, amp: bool = True) -> str:
    """``auto`` → ``fp16`` on CUDA (``amp``, else ``fp32``), ``bf16`` on a CPU with native bf16,
    else ``fp32``. fp16 needs CUDA (CPU fp16 autocast is slow and would need loss scaling)."""
    if precision == "auto":
        if device.type == "cuda":
            return "fp16" if amp else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise GhnOnnxError(f"precision fp16 needs a CUDA device (got {device.type}); use bf16 or fp32")
    if precision not in NET_DTYPES:
        raise ValueError(f"Expected precision in {PRECISIONS} (got {precision!r})")
    return precision


#: Module type → names of its parameters that get weight decay (the weights of linear maps);
#: its other parameters (biases) get none.
DECAYED: dict[type, tuple[str, ...]] = {
    nn.Linear: ("weight",), nn.Conv1d: ("weight",), nn.Conv2d: ("weight",),
    nn.GRUCell: ("weight_ih", "weight_hh"),
}
#: Module types none of whose parameters get weight decay.
NOT_DECAYED: tuple[type, ...] = (nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups ``[decayed, not decayed]``: decay on the weight matrices and kernels of
    linear, convolutional and recurrent layers (:data:`DECAYED`); none on embeddings, norms and
    biases. Each group also lists its parameter ``names``.

    Raises:
        TypeError: a module type in neither table owns parameters (decide, do not guess).
    """
    decay: dict[str, nn.Parameter] = {}
    other: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if not isinstance(module, (*DECAYED, *NOT_DECAYED)):
            raise TypeError(f"{mod_name or 'model'} ({type(module).__name__}): expected a module type listed in "
                            f"trainer.DECAYED or trainer.NOT_DECAYED (got one in neither)")
        decayed = next((names for t, names in DECAYED.items() if isinstance(module, t)), ())
        for name, p in own:
            full = f"{mod_name}.{name}" if mod_name else name
            (decay if name in decayed else other)[full] = p
    return [{"params": list(decay.values()), "names": list(decay), "weight_decay": weight_decay},
            {"params": list(other.values()), "names": list(other), "weight_decay": 0.0}]


def check_coverage(net: nn.Module, params: dict[str, torch.Tensor], name: str = "network") -> None:
    """Raise :class:`PredictionCoverageError` unless ``params`` names exactly the parameters of
    ``net`` (buffers, such as BN running statistics, are not predicted)."""
    expected = {n for n, _ in net.named_parameters()}
    missing = sorted(expected - params.keys())
    unexpected = sorted(params.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"no prediction for {len(missing)} of its {len(expected)} parameters: {_few(missing)}")
        if unexpected:
            parts.append(f"predicted tensors it does not have: {_few(unexpected)}")
        raise PredictionCoverageError(f"{name}: {'; '.join(parts)}")


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def net_loss(net: nn.Module, params: dict[str, torch.Tensor], images: torch.Tensor,
             labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy (in fp32) and number correct of ``net`` run with ``params`` (BN on batch
    statistics). ``params`` must cover every parameter (:func:`check_coverage`)."""
    net.train()
    logits = torch.func.functional_call(net, params, (images,), strict=False).float()
    return F.cross_entropy(logits, labels), (logits.argmax(1) == labels).sum()


def ready_net(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` usable on ``device`` with supplied parameters: moved there, or, when built on the
    ``meta`` device, given real buffers (BN running statistics, reset); its parameters stay on
    ``meta`` since the GHN supplies all of them."""
    if not any(p.is_meta for p in net.parameters()):
        return net.to(device)
    for module in net.modules():
        if any(b is not None and b.is_meta for b in module._buffers.values()):
            if not isinstance(module, nn.modules.batchnorm._NormBase):
                raise TypeError(f"{type(module).__name__}: cannot materialise the buffers of a meta-device module "
                                "other than a norm layer")
            for k, b in module._buffers.items():
                if b is not None:
                    module._buffers[k] = torch.empty_like(b, device=device)
            module.reset_running_stats()
    return net


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Within the block, the default generator of ``device`` is seeded with ``seed``; its state
    is restored afterwards."""
    if device.type == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    else:
        gen = torch.default_generator
    saved = gen.get_state()
    gen.manual_seed(seed)
    try:
        yield
    finally:
        gen.set_state(saved)


def net_seed(seed: int, step: int, index: int) -> int:
    """The generator seed of network ``index`` of step ``step``."""
    return int(np.random.SeedSequence([NET_RNG_NAMESPACE, seed, step, index]).generate_state(1, np.uint64)[0] >> 1)


def all_reduce_gradients(params: list[nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks in one flat all-reduce, in a fixed order.

    A parameter without a gradient contributes zeros, so every rank calls the collective the same
    way whichever parameters its networks reached; a flag per parameter, reduced in the same
    buffer, keeps the gradient ``None`` where no rank had one (as one process would).
    """
    if not params:
        return
    ref = params[0]
    flags = torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [flags])
    dist.all_reduce(flat)
    reached = flat[-len(params):].tolist()
    offset = 0
    for p, r in zip(params, reached):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p) if r > 0 else None
        offset += n


# -- the trainer -----------------------------------------------------------------------------------

class Trainer:
    def __init__(self, ghn: GHN, cfg: TrainConfig, images: ImageSet, nets: NetSource, out_dir: str | os.PathLike,
                 device: str | torch.device = "cpu") -> None:
        self.ghn, self.cfg, self.nets = ghn.to(device), cfg, nets
        self.device = torch.device(device)
        self.out_dir = Path(out_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.precision = resolve_precision(cfg.precision, self.device, cfg.amp)
        self.data = BatchStream(images, cfg.batch_size, seed=cfg.seed)
        self.opt = torch.optim.AdamW(param_groups(ghn, cfg.weight_decay), lr=cfg.lr)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        self.step = 0
        self.counters = {"images": 0, "networks": 0, "wall_seconds": 0.0}
        self.changes: list[dict[str, Any]] = []  # configuration changes made at resumes
        # The best validation so far and its step; its weights are best.safetensors (see fit).
        self.best: dict[str, Any] | None = None

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        images, labels = self.next_batch()
        mine = self.draw_share()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss, correct = self.forward_backward(images, labels, mine)
        if self.world > 1:
            all_reduce_gradients(list(self.ghn.parameters()))
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
        total = torch.tensor([float(loss) * self.world, correct, len(mine) * len(labels)])
        if self.world > 1:
            dist.all_reduce(total)
        return {"step": self.step, "loss": float(total[0]) / self.world, "acc": float(total[1] / total[2]),
                "grad_norm": grad_norm, "lr": lr_at(self.step - 1, cfg), "seconds": seconds}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.data.next()
        images, labels = images.to(self.device), labels.to(self.device)
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels

    def draw_share(self) -> list[tuple[int, NetSample]]:
        """``(index in the meta-batch, sample)`` of this rank's networks (index ``i`` belongs to
        rank ``i mod world``). Every rank draws the whole meta-batch from the source, so the
        sources stay in lock-step; only its own networks are built."""
        if self.world == 1:
            return [(i, self.nets.draw()) for i in range(self.cfg.meta_batch)]
        drawn = [(i, self.nets.draw(build=i % self.world == self.rank)) for i in range(self.cfg.meta_batch)]
        return [(i, d) for i, d in drawn if i % self.world == self.rank]

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor,
                         samples: list[tuple[int, NetSample]]) -> tuple[torch.Tensor, int]:
        """The meta-batch loss (``sum of the networks' losses / meta_batch``) and its backward
        into the GHN's ``.grad``; returns the loss (detached) and the number of correct labels.

        Each network's backward runs right after its forward, down to the predicted parameters
        only, so that its activations are freed before the next network runs (peak memory is one
        network's, not ``meta_batch`` networks': 3.6 GB instead of 7.4 GB for a meta-batch of 8 at
        64 images in fp32); the GHN's backward then runs once from the collected gradients.
        """
        cfg = self.cfg
        dtype = NET_DTYPES[self.precision]
        with torch.autocast(self.device.type, enabled=False):  # the GHN runs in fp32 whatever the caller's autocast
            params = self.ghn([s.graph for _, s in samples])
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        losses, correct = [], 0
        for (i, s), p in zip(samples, params):
            net = ready_net(s.net, self.device)
            set_fast_ops(net, cfg.fast_ops)
            check_coverage(net, p, name=getattr(s.graph, "name", None) or f"network {i}")
            with seeded_rng(self.device, net_seed(cfg.seed, self.step, i)), \
                    torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss, right = net_loss(net, p, images, labels)
            values = list(p.values())
            for v, g in zip(values, torch.autograd.grad(self.scaler.scale(loss / cfg.meta_batch), values,
                                                        allow_unused=True)):
                if g is not None:
                    outputs.append(v)
                    grads.append(g)
            losses.append(loss.detach())
            correct += int(right)
        torch.autograd.backward(outputs, grads)
        return torch.stack(losses).sum() / cfg.meta_batch, correct

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
                result = evaluate(self)
                self._append("val.jsonl", {"step": self.step, **self.counters, **result})
                self._keep_best(result)
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self.save()
        bar.close()

    def _keep_best(self, result: dict) -> None:
        """Keep the weights of the best validation so far as ``best.safetensors``: at a high
        learning rate the validation moves by points between neighbouring checkpoints, and the
        latest weights (``ghn.safetensors``) need not be the best ones."""
        acc = result.get("val_acc")
        if acc is None or (self.best is not None and acc <= self.best["val_acc"]):
            return
        self.best = {"step": self.step, "val_acc": acc, "val_sem": result.get("val_sem")}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.save(self.ghn, self.out_dir / "best.safetensors",
                        extra={"trained_steps": str(self.step), "images_seen": str(self.counters["images"]),
                               "val_acc": f"{acc:.6f}"})

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
        tensors: dict[str, torch.Tensor] = {}
        for p, st in self.opt.state.items():
            for k, v in st.items():
                tensors[f"{names[id(p)]}::{k}"] = torch.as_tensor(v).detach().cpu().reshape(-1) if k == "step" \
                    else v.detach().cpu().contiguous()
        tensors.update({f"{RNG_PREFIX}{k}": v for k, v in rng_states(self.device).items()})
        tmp = self.out_dir / "trainer.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.out_dir / "trainer.safetensors")
        state = {"step": self.step, "counters": self.counters, "data": self.data.state(),
                 "data_size": len(self.data.data), "nets": self.nets.state(),
                 "config": dataclasses.asdict(self.cfg), "precision": self.precision, "world": self.world,
                 "scaler": self.scaler.state_dict(), "changes": self.changes, "best": self.best}
        tmp = self.out_dir / "trainer.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.out_dir / "trainer.json")

    def load(self) -> dict[str, Any]:
        """Resume from ``out_dir``; returns the saved state (``nets`` holds the stream state to
        restore the architecture source with).

        Raises:
            CheckpointError: the folder cannot be read, or the configuration differs in a field of
                :data:`STREAM_FIELDS` (or the image set in size): resuming would not continue the
                same streams. Other changes are allowed and recorded in ``trainer.json``'s
                ``changes``.
        """
        from safetensors.torch import load_file

        try:
            state = json.loads((self.out_dir / "trainer.json").read_text())
            tensors = load_file(str(self.out_dir / "trainer.safetensors"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.out_dir}: cannot resume ({exc})") from None
        changes = self._resume_changes(state)
        loaded = checkpoint.load(self.out_dir / "ghn.safetensors", device=self.device)
        self.ghn.load_state_dict(loaded.state_dict())
        by_name = dict(self.ghn.named_parameters())
        rng = {}
        for key, v in tensors.items():
            if key.startswith(RNG_PREFIX):
                rng[key[len(RNG_PREFIX):]] = v
                continue
            name, k = key.split("::")
            st = self.opt.state.setdefault(by_name[name], {})
            st[k] = v.reshape(()) if k == "step" else v.to(self.device)
        missing = []
        if rng:
            set_rng_states(rng, self.device)
        else:
            missing.append("RNG state")
        if self.scaler.is_enabled():
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            else:
                missing.append("GradScaler state")
        if missing:
            warnings.warn(f"{self.out_dir}: saved without {' and '.join(missing)} (a run folder from before "
                          "they were checkpointed); resuming from the current ones", stacklevel=2)
        self.step = int(state["step"])
        self.counters = state["counters"]
        self.data = BatchStream(self.data.data, self.cfg.batch_size, seed=self.cfg.seed, **state["data"])
        self.best = state.get("best")
        self.changes = list(state.get("changes", [])) + ([{"step": self.step, **changes}] if changes else [])
        return state

    def _resume_changes(self, state: dict[str, Any]) -> dict[str, list]:
        """``{field: [saved, now]}`` of the allowed changes; raises on a stream-changing one."""
        saved = {**LEGACY_VALUES, **state["config"]}
        now = dataclasses.asdict(self.cfg)
        refused = [f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in STREAM_FIELDS if saved.get(k) != now[k]]
        if "data_size" in state and state["data_size"] != len(self.data.data):
            refused.append(f"training images {state['data_size']} -> {len(self.data.data)}")
        if refused:
            raise CheckpointError(f"{self.out_dir}: cannot resume with {', '.join(refused)}: the data and "
                                  "architecture streams would no longer continue the run's (keep the saved "
                                  "values, or start a new run in another folder)")
        changes = {k: [saved[k], v] for k, v in now.items()
                   if k not in STREAM_FIELDS + SCHEDULE_FIELDS and k in saved and saved[k] != v}
        old_precision = state.get("precision", LEGACY_VALUES["precision"])
        if old_precision != self.precision:
            changes["resolved_precision"] = [old_precision, self.precision]
        if state.get("world", 1) != self.world:
            changes["world"] = [state.get("world", 1), self.world]
        return changes


#: Key prefix of RNG states in ``trainer.safetensors`` (optimizer moments are ``name::key``).
RNG_PREFIX = "rng::"


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The torch generator states a step may draw from: the CPU's, and the device's on CUDA."""
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


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
