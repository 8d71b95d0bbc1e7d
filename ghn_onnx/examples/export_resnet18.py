"""Export a CIFAR-10 ResNet-18 to ONNX the way the GHN expects it: BatchNorm kept.

The network is torchvision's ResNet-18 adjusted for 32x32 inputs as the GHN-2 reference does:
3x3 stem convolution with stride 1, no max-pool, 10 classes. It is exported with the TorchScript
exporter in eval mode without constant folding, so each BatchNorm stays a ``BatchNormalization``
node (the dynamo exporter folds BN into the convolutions, and the GHN was trained on networks
with BN).

    python -m ghn_onnx.examples.export_resnet18 out/resnet18.onnx
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import click
import onnx
import torch
import torchvision


def cifar_resnet18(num_classes: int = 10) -> torch.nn.Module:
    """torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def export_resnet18(path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a freshly initialised CIFAR ResNet-18 to ``path`` (input ``input`` of shape
    ``(batch, 3, 32, 32)``, output ``logits``), via a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = cifar_resnet18().eval()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo; it is chosen on purpose.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model, (torch.zeros(1, 3, 32, 32),), str(tmp), dynamo=False,
                training=torch.onnx.TrainingMode.EVAL, do_constant_folding=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                # Fresh BN layers hold equal values (ones, zeros); without this the exporter
                # merges them into one initializer read by many layers, and the GHN's separate
                # predictions for those layers could not be written back.
                keep_initializers_as_inputs=True,
            )
        _drop_initializers_from_inputs(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _drop_initializers_from_inputs(path: Path) -> None:
    """keep_initializers_as_inputs also lists every weight as a graph input, which makes
    onnxruntime treat weights as overridable inputs; keep them as plain initializers."""
    model = onnx.load(str(path))
    stored = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in stored]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    onnx.save(model, str(path))


@click.command()
@click.argument("output", metavar="OUTPUT.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="torch seed for the initial weights.")
def main(output: Path, seed: int) -> None:
    """Export a CIFAR-10 ResNet-18 with BatchNorm kept to OUTPUT.onnx."""
    click.echo(f"wrote {export_resnet18(output, seed)}")


if __name__ == "__main__":
    main()
