"""The command-line options the framework examples share (``torch_init``, ``keras_init``,
``flax_init``): where the images and the GHN come from, how much to calibrate, evaluate and
fine-tune. Only click is imported, so each example's ``--help`` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click


def example_options(optimizer: str, lr: float, initialised: str = "models") -> Callable:
    """--data, --checkpoint, --calibration-images, --test-images, --steps, --batch-size, --lr and
    --seed. ``optimizer`` names the fine-tuning optimiser in the help, ``lr`` is its default rate,
    ``initialised`` what the two initialisations are called (the calibration help)."""
    options = [
        click.option("--data", type=click.Path(path_type=Path), default=None,
                     help="CIFAR-10 image folder or .zip (train/<class>/, test/<class>/). Default: $GHN_ONNX_DATA, "
                          "else ../shared/data/cifar10-jpeg.zip."),
        click.option("--checkpoint", default=None, help="GHN checkpoint file or name. Default: the shipped one."),
        click.option("--calibration-images", type=click.IntRange(1), default=256, show_default=True,
                     help=f"Training images for the BN statistics (both {initialised})."),
        click.option("--test-images", type=click.IntRange(1), default=1000, show_default=True,
                     help="Random test images to evaluate on."),
        click.option("--steps", type=click.IntRange(0), default=20, show_default=True,
                     help=f"{optimizer} steps of fine-tuning."),
        click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
                     help="Fine-tuning batch size."),
        click.option("--lr", type=click.FloatRange(0, min_open=True), default=lr, show_default=True,
                     help="Fine-tuning learning rate."),
        click.option("--seed", type=int, default=0, show_default=True,
                     help="Seeds the default init, the image draws and the batches."),
    ]

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate
