"""A GHN-initialised PyTorch model beside PyTorch's default init, before and after fine-tuning.

    python -m ghn_onnx.examples.torch_init [--model resnet18] [--data CIFAR10] [--steps 20]

1. builds the model twice from one seed: PyTorch's default init, and a copy initialised by
   :func:`ghn_onnx.torch.init_` with the shipped checkpoint (or ``--checkpoint``), its BN
   statistics calibrated on ``--calibration-images`` training images of the image folder;
2. calibrates the default-init model's BN statistics on the same images, the same way
   (:func:`ghn_onnx.torch.calibrate_`), so that both are compared as deployed;
3. evaluates both in PyTorch (eval mode) on ``--test-images`` random CIFAR-10 test images;
4. fine-tunes both for ``--steps`` SGD steps on the same augmented training batches and
   evaluates them again.

``--model resnet18`` is torchvision's ResNet-18 adjusted for 32x32 images (as ``make demo``);
any other name is a torchvision classifier built with 10 classes (``mobilenet_v2``,
``efficientnet_b0``...). The data is CIFAR-10 as an image folder or ``.zip`` with
``train/<class>/`` and ``test/<class>/`` (default: ``$GHN_ONNX_DATA``, else
``../shared/data/cifar10-jpeg.zip``). Errors are one line: exit code 2 for bad input (no data,
an unknown model, a bad checkpoint), as the ``ghn-onnx`` commands.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import click

from ghn_onnx.examples.options import example_options

MODEL_HELP = "resnet18 (the CIFAR ResNet-18 of make demo) or a torchvision classifier name."


def build_model(name: str):
    """The CIFAR ResNet-18 for ``resnet18``, else ``torchvision.models.<name>(num_classes=10)``."""
    import torchvision

    from ghn_onnx.examples.export_resnet18 import cifar_resnet18

    if name == "resnet18":
        return cifar_resnet18()
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise click.BadParameter(f"{name!r} is not a torchvision classifier", param_hint="--model")
    return torchvision.models.get_model(name, num_classes=10)


def test_accuracy(net, data, batch_size: int = 256) -> float:
    """Top-1 accuracy in eval mode (BN on its running statistics, as deployed)."""
    import torch

    from ghn_onnx.training.datasets import normalize

    was = net.training
    net.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = net(normalize(data.images[start:start + batch_size]))
            correct += int((logits.argmax(1) == torch.as_tensor(data.labels[start:start + batch_size])).sum())
    net.train(was)
    return correct / len(data)


def fine_tune(net, train, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Plain SGD (momentum 0.9) on augmented training batches, the same ones for every net of one seed."""
    import torch
    import torch.nn.functional as F

    from ghn_onnx.training.datasets import BatchStream

    torch.manual_seed(seed)
    stream = BatchStream(train, batch_size, seed=seed)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        x, y = stream.next()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


@click.command()
@click.option("--model", "model_name", default="resnet18", show_default=True, help=MODEL_HELP)
@example_options("SGD", 0.01)
def main(model_name: str, data: Path | None, checkpoint: str | None, calibration_images: int, test_images: int,
         steps: int, batch_size: int, lr: float, seed: int) -> None:
    import torch

    import ghn_onnx.torch
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
    torch.manual_seed(seed)
    default = build_model(model_name)
    ghn_net = copy.deepcopy(default)
    example = torch.randn(2, 3, 32, 32)
    options = {"calibration_images": calibration_images, "seed": seed}
    try:
        splits = load_cifar10(data)
        ghn = load_ghn(checkpoint)
        report = ghn_onnx.torch.init_(ghn_net, example, checkpoint=ghn, calibrate=data, **options)
        ghn_onnx.torch.calibrate_(default, example, data, **options)
    except GhnOnnxError as exc:
        raise InputError(str(exc)) from None
    params = sum(p.numel() for p in default.parameters())
    click.echo(f"{model_name}: {params:,} parameters; ghn_onnx.torch.init_:")
    click.echo("  " + report.format().replace("\n", "\n  "))

    test = random_subset(splits["test"], test_images, seed=seed)
    nets = {"GHN init": ghn_net, "default init": default}
    before = {label: test_accuracy(net, test) for label, net in nets.items()}
    after = {}
    for label, net in nets.items():
        fine_tune(net, splits["train"], steps, batch_size, lr, seed)
        after[label] = test_accuracy(net, test)
    click.echo(f"\nCIFAR-10 test accuracy ({len(test)} random test images, PyTorch eval mode, BN statistics "
               f"from {calibration_images} training images):")
    click.echo(f"  {'':<12}  {'at init':>8}  {f'after {steps} SGD steps':>20}")
    for label in nets:
        click.echo(f"  {label:<12}  {100 * before[label]:7.2f}%  {100 * after[label]:19.2f}%")


if __name__ == "__main__":
    sys.exit(main())
