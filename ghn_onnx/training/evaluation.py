"""Accuracy of predicted parameters, and the baselines they are compared with.

Two BN modes (GHN2_FACTS §5.6): *batch statistics* (the paper's: every BN normalises with the
statistics of the test batch of 64) and *calibrated* (running statistics measured on training
images, then ordinary inference; what a deployment uses).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ghn_onnx.training.datasets import BatchStream, ImageSet, normalize


@torch.no_grad()
def accuracy(net: nn.Module, params: dict[str, torch.Tensor] | None, data: ImageSet, batch_size: int = 64,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy with BN on batch statistics (the module in train mode, no state updated)."""
    net = net.to(device)
    was_training = net.training
    _batch_stat_bn(net)
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start:start + batch_size]).to(device)
        y = torch.as_tensor(data.labels[start:start + batch_size], device=device)
        logits = torch.func.functional_call(net, params, (x,), strict=False) if params else net(x)
        correct += int((logits.argmax(1) == y).sum())
    net.train(was_training)
    return correct / len(data)


def _batch_stat_bn(net: nn.Module) -> None:
    net.eval()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.running_mean = m.running_var = None  # normalise with the batch, update nothing


def onnx_accuracy(model: bytes | onnx.ModelProto, data: ImageSet, batch_size: int = 64, threads: int = 0) -> float:
    """Top-1 accuracy of an ONNX model (serialized or a ``ModelProto``) in onnxruntime.

    The batches are ``data`` in its order, ``batch_size`` at a time (the last may be smaller):
    with batch-statistics BN (:func:`ghn_onnx.bn.calibration.batch_stats_model`) the result depends
    on them. ``threads`` sets onnxruntime's intra-op threads (0: the package's setting,
    :func:`~ghn_onnx.threads.configured_threads`). Worker threads do not spin while idle, so a
    concurrent process keeps its CPU.
    """
    from ghn_onnx.threads import inference_session

    sess = inference_session(model, threads, log_level=2)
    name = sess.get_inputs()[0].name
    correct = 0
    for start in range(0, len(data), batch_size):
        x = normalize(data.images[start:start + batch_size]).numpy()
        logits = sess.run(None, {name: x})[0]
        correct += int((logits.argmax(1) == data.labels[start:start + batch_size]).sum())
    return correct / len(data)


def sgd_curve(net: nn.Module, train: ImageSet, test: ImageSet, checkpoints: Iterable[int], *,
              params: dict[str, torch.Tensor] | None = None, lr: float = 0.025, batch_size: int = 64,
              seed: int = 0, device: str | torch.device = "cpu") -> dict[int, float]:
    """Train ``net`` with SGD (momentum 0.9, weight decay 3e-4, cosine to the last checkpoint,
    gradient clip 5: the GHN-2 SGD protocol) from its current parameters, or from ``params``
    (e.g. GHN-predicted) when given; accuracy on ``test`` at each step count in ``checkpoints``
    (0 = before training)."""
    torch.manual_seed(seed)
    if params:
        with torch.no_grad():
            own = dict(net.named_parameters())
            for k, v in params.items():
                if k in own:
                    own[k].copy_(v)
    return train_curve(net, train, test, checkpoints,
                       lambda p: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=3e-4),
                       batch_size=batch_size, seed=seed, device=device)


def train_curve(net: nn.Module, train: ImageSet, test: ImageSet, checkpoints: Iterable[int],
                make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], *, batch_size: int = 64,
                seed: int = 0, device: str | torch.device = "cpu") -> dict[int, float]:
    """Train ``net`` in place with the optimiser ``make_optimizer(net.parameters())`` builds, its
    learning rate on a cosine to 0 at the last checkpoint, gradients clipped to norm 5, batches
    from ``BatchStream(train, batch_size, seed)``; accuracy on ``test`` at each step count in
    ``checkpoints`` (0 = before training)."""
    torch.manual_seed(seed)
    net = net.to(device)
    marks = sorted(set(checkpoints))
    total = max(marks) if marks else 0
    opt = make_optimizer(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(total, 1))))
    stream = BatchStream(train, batch_size, seed=seed)
    out: dict[int, float] = {}
    for step in range(total + 1):
        if step in marks:
            out[step] = accuracy(net, None, test, device=device)
        if step == total:
            break
        net.train()
        x, y = stream.next()
        loss = F.cross_entropy(net(x.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
    return out


def random_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """``n`` images drawn without replacement (``numpy.random.default_rng(seed)``), **in the
    drawn order**, or all of ``data`` shuffled when ``n >= len(data)``.

    The order matters: the image-folder archive lists images class by class, and batch-statistics
    BN normalises each batch of 64 with its own statistics, so batches in index order would hold
    one class each (GHN-2 evaluates CIFAR-10's test batch, whose order is random, and shuffles
    ImageNet with a fixed seed for this reason, GHN2_FACTS §5.6).
    """
    return data.subset(np.random.default_rng(seed).permutation(len(data))[:n])


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``; 0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
