"""A GHN-initialised Keras model beside Keras's default init, before and after fine-tuning.

    python -m ghn_onnx.examples.keras_init [--model MobileNetV2] [--data CIFAR10] [--steps 20]

Keras runs on the torch backend (``KERAS_BACKEND=torch``, set here unless the environment says
otherwise; :mod:`ghn_onnx.keras` needs it).

1. builds a ``keras.applications`` model (``weights=None``, 32x32 input, 10 classes, logits) and
   a clone with the same weights: Keras's default init;
2. initialises the clone with :func:`ghn_onnx.keras.init_` (shipped checkpoint, or
   ``--checkpoint``), its BN moving statistics calibrated on ``--calibration-images`` training
   images; calibrates the default-init model the same way (:func:`ghn_onnx.keras.calibrate_`),
   so that both are compared as deployed;
3. evaluates both in Keras (``training=False``) on ``--test-images`` random CIFAR-10 test images;
4. fine-tunes both for ``--steps`` SGD steps (``train_on_batch``) on the same randomly flipped
   training batches and evaluates them again.

Images are fed as the calibration fed them: CIFAR-10-normalised, or as pixel values 0..255 to a
model with its own ``Rescaling`` / ``Normalization`` layers (``EfficientNetB0``,
``MobileNetV3Small``). The data is CIFAR-10 as an image folder or ``.zip`` with ``train/<class>/``
and ``test/<class>/`` (default: ``$GHN_ONNX_DATA``, else ``../shared/data/cifar10-jpeg.zip``).
Errors are one line: exit code 2 for bad input (no data, an unknown model, a bad checkpoint), as
the ``ghn-onnx`` commands.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
import numpy as np

from ghn_onnx.examples.options import example_options

MODEL_HELP = "A keras.applications constructor that takes input_shape and classes (MobileNetV2, EfficientNetB0...)."


def build_model(name: str):
    """``keras.applications.<name>`` for 32x32 CIFAR-10 images, random init, logits out."""
    import keras

    constructor = getattr(keras.applications, name, None)
    if not callable(constructor):
        raise click.BadParameter(f"{name!r} is not a keras.applications model", param_hint="--model")
    return constructor(weights=None, input_shape=(32, 32, 3), classes=10, classifier_activation=None)


def inputs(images: np.ndarray, raw: bool) -> np.ndarray:
    """uint8 NHWC images as the model takes them: pixel values, or CIFAR-10-normalised."""
    from ghn_onnx.training.datasets import MEAN, STD

    x = images.astype(np.float32)
    return x if raw else (x / 255 - np.float32(MEAN)) / np.float32(STD)


def test_accuracy(model, images: np.ndarray, labels: np.ndarray, raw: bool, batch_size: int = 256) -> float:
    """Top-1 accuracy with ``training=False`` (BN on its moving statistics, as deployed)."""
    import keras

    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = keras.ops.convert_to_numpy(model(inputs(images[start:start + batch_size], raw), training=False))
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def fine_tune(model, images: np.ndarray, labels: np.ndarray, raw: bool, steps: int, batch_size: int, lr: float,
              seed: int) -> None:
    """Plain SGD (momentum 0.9) on randomly flipped training batches, the same ones for every model of one seed."""
    import keras

    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(labels), batch_size, replace=False)
        x = images[idx].copy()
        flip = rng.random(batch_size) < 0.5
        x[flip] = x[flip, :, ::-1]
        model.train_on_batch(inputs(x, raw), labels[idx])


@click.command()
@click.option("--model", "model_name", default="MobileNetV2", show_default=True, help=MODEL_HELP)
@example_options("SGD", 0.01)
def main(model_name: str, data: Path | None, checkpoint: str | None, calibration_images: int, test_images: int,
         steps: int, batch_size: int, lr: float, seed: int) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")  # before keras is first imported
    import keras

    import ghn_onnx.keras
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
    keras.utils.set_random_seed(seed)
    default = build_model(model_name)
    ghn_net = keras.models.clone_model(default)
    ghn_net.set_weights(default.get_weights())
    options = {"calibration_images": calibration_images, "seed": seed}
    try:
        splits = load_cifar10(data)
        ghn = load_ghn(checkpoint)
        report = ghn_onnx.keras.init_(ghn_net, checkpoint=ghn, calibrate=data, **options)
        ghn_onnx.keras.calibrate_(default, data, **options)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None
    raw = bool(ghn_onnx.keras.own_preprocessing(default))
    click.echo(f"{model_name}: {default.count_params():,} weights; ghn_onnx.keras.init_:")
    click.echo("  " + report.format().replace("\n", "\n  "))

    test = random_subset(splits["test"], test_images, seed=seed)
    train = splits["train"]
    nets = {"GHN init": ghn_net, "default init": default}
    before = {label: test_accuracy(net, test.images, test.labels, raw) for label, net in nets.items()}
    after = {}
    for label, net in nets.items():
        fine_tune(net, train.images, train.labels, raw, steps, batch_size, lr, seed)
        after[label] = test_accuracy(net, test.images, test.labels, raw)
    click.echo(f"\nCIFAR-10 test accuracy ({len(test)} random test images, Keras training=False, BN statistics "
               f"from {calibration_images} training images):")
    click.echo(f"  {'':<12}  {'at init':>8}  {f'after {steps} SGD steps':>20}")
    for label in nets:
        click.echo(f"  {label:<12}  {100 * before[label]:7.2f}%  {100 * after[label]:19.2f}%")


if __name__ == "__main__":
    sys.exit(main())
