"""A GHN-initialised Flax CNN beside Flax's default init, before and after fine-tuning with optax.

    python -m ghn_onnx.examples.flax_init [--data CIFAR10] [--width 16] [--steps 20]

1. builds a small linen CNN with BatchNorm and residual blocks (NHWC, 32x32, 10 classes) and
   its default variables (``model.init``);
2. initialises a copy with :func:`ghn_onnx.flax.init` and the shipped checkpoint (or
   ``--checkpoint``), its BN statistics calibrated on ``--calibration-images`` training images of
   the image folder; the default variables get statistics measured the same way
   (:func:`ghn_onnx.flax.calibrate`), so both are compared as deployed;
3. evaluates both (``train=False``: BN on its statistics) on ``--test-images`` random CIFAR-10
   test images;
4. fine-tunes both for ``--steps`` Adam steps (optax) on the same training batches (random
   horizontal flips) and evaluates them again.

The data is CIFAR-10 as an image folder or ``.zip`` with ``train/<class>/`` and
``test/<class>/`` (default: ``$GHN_ONNX_DATA``, else ``../shared/data/cifar10-jpeg.zip``). Needs
JAX, Flax, jax2onnx and optax (the ``dev`` extra). Errors are one line: exit code 2 for bad
input (no data, a bad checkpoint), as the ``ghn-onnx`` commands.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
import numpy as np

from ghn_onnx.examples.options import example_options


def make_model(width: int):
    """The linen CNN: a 3x3 stem, two residual stages (the second at stride 2), mean pool, Dense."""
    import flax.linen as nn

    class Residual(nn.Module):
        features: int
        stride: int = 1

        @nn.compact
        def __call__(self, x, train: bool = False):
            bn = lambda: nn.BatchNorm(use_running_average=not train)  # noqa: E731
            y = nn.relu(bn()(nn.Conv(self.features, (3, 3), (self.stride, self.stride), use_bias=False)(x)))
            y = bn()(nn.Conv(self.features, (3, 3), use_bias=False)(y))
            if self.stride != 1 or x.shape[-1] != self.features:  # projection shortcut
                x = bn()(nn.Conv(self.features, (1, 1), (self.stride, self.stride), use_bias=False)(x))
            return nn.relu(x + y)

    class CNN(nn.Module):
        width: int

        @nn.compact
        def __call__(self, x, train: bool = False):  # (B, 32, 32, 3)
            x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3), use_bias=False)(x)))
            x = Residual(self.width)(x, train)
            x = Residual(2 * self.width, stride=2)(x, train)  # (B, 16, 16, 2 * width)
            return nn.Dense(10)(x.mean((1, 2)))

    return CNN(width)


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images → float32, CIFAR-10's per-channel mean and std (as calibration does)."""
    from ghn_onnx.training.datasets import MEAN, STD

    return ((images.astype(np.float32) / 255 - np.float32(MEAN)) / np.float32(STD)).astype(np.float32)


def test_accuracy(forward, variables, data, batch_size: int = 250) -> float:
    """Top-1 accuracy of ``forward(variables, x)``, the model with BN on its statistics
    (``train=False``), as deployed."""
    correct = 0
    for start in range(0, len(data), batch_size):
        logits = np.asarray(forward(variables, normalize(data.images[start:start + batch_size])))
        correct += int((logits.argmax(1) == data.labels[start:start + batch_size]).sum())
    return correct / len(data)


def train_step(model, tx):
    """One optimiser step on a batch, compiled once: BN in training mode (batch statistics,
    running averages updated)."""
    import jax
    import optax

    @jax.jit
    def step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, updated = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                          mutable=["batch_stats"])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updated["batch_stats"]

        (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state

    return step


def fine_tune(step, tx, variables, train, steps: int, batch_size: int, seed: int):
    """``steps`` of ``step`` on random training batches with random horizontal flips, the same
    ones for every variables of one seed."""
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(train), batch_size)
        images = train.images[idx]
        flip = rng.random(batch_size) < 0.5
        images[flip] = images[flip, :, ::-1]
        params, batch_stats, opt_state = step(params, batch_stats, opt_state, normalize(images), train.labels[idx])
    return {"params": params, "batch_stats": batch_stats}


@click.command()
@example_options("Adam", 1e-3, "variables")
@click.option("--width", type=click.IntRange(1), default=16, show_default=True, help="Channels of the first stage.")
def main(data: Path | None, checkpoint: str | None, width: int, calibration_images: int, test_images: int,
         steps: int, batch_size: int, lr: float, seed: int) -> None:
    import jax
    import optax

    import ghn_onnx.flax
    from ghn_onnx.cli import InputError
    from ghn_onnx.errors import GhnOnnxError
    from ghn_onnx.examples.demo import find_data
    from ghn_onnx.pipeline import load_ghn
    from ghn_onnx.training.datasets import load_cifar10
    from ghn_onnx.training.evaluation import random_subset

    data = find_data(data)
    if data is None:
        raise InputError("CIFAR-10 not found: pass --data PATH (an image folder or .zip with train/<class>/*.jpg "
                         "and test/<class>/*.jpg) or set GHN_ONNX_DATA")
    try:
        splits = load_cifar10(data)
        ghn = load_ghn(checkpoint)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None
    model = make_model(width)
    example = np.zeros((2, 32, 32, 3), np.float32)
    default = jax.jit(lambda k, x: model.init(k, x, train=False))(jax.random.key(seed), example)
    options = {"calibration_images": calibration_images, "seed": seed}
    eval_mode = {"train": False}
    try:
        ghn_vars, report = ghn_onnx.flax.init(model, default, example, checkpoint=ghn, calibrate=data,
                                              apply_kwargs=eval_mode, return_report=True, **options)
        default = ghn_onnx.flax.calibrate(model, default, example, data, apply_kwargs=eval_mode, **options)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None
    params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(default["params"]))
    click.echo(f"Flax CNN (width {width}): {params:,} parameters; ghn_onnx.flax.init:")
    click.echo("  " + report.format().replace("\n", "\n  "))

    test = random_subset(splits["test"], test_images, seed=seed)
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
    tx = optax.adam(lr)
    step = train_step(model, tx)
    variables = {"GHN init": ghn_vars, "default init": default}
    before = {label: test_accuracy(forward, v, test) for label, v in variables.items()}
    after = {label: test_accuracy(forward, fine_tune(step, tx, v, splits["train"], steps, batch_size, seed), test)
             for label, v in variables.items()}
    click.echo(f"\nCIFAR-10 test accuracy ({len(test)} random test images, train=False, BN statistics "
               f"from {calibration_images} training images):")
    click.echo(f"  {'':<12}  {'at init':>8}  {f'after {steps} Adam steps':>21}")
    for label in variables:
        click.echo(f"  {label:<12}  {100 * before[label]:7.2f}%  {100 * after[label]:20.2f}%")


if __name__ == "__main__":
    sys.exit(main())
