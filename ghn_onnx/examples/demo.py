"""The end-to-end demo: ONNX in, predicted ONNX out, accuracy measured in onnxruntime.

    python -m ghn_onnx.examples.demo --out out [--data CIFAR10] [--test-images 10000]

1. exports a CIFAR-10 ResNet-18 (BN kept) to ``out/resnet18.onnx``;
2. predicts all its parameters with the shipped GHN checkpoint -> ``out/resnet18_ghn.onnx``;
3. calibrates BN statistics on training images (in both the predicted and the randomly
   initialised model, so the comparison is fair);
4. evaluates both on the CIFAR-10 test set in onnxruntime and prints GHN init vs random init.

Without CIFAR-10 it still predicts, and says how to get the data.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

DEFAULT_DATA = ("../shared/data/cifar10-jpeg.zip",)


def find_data(given: Path | None) -> Path | None:
    if given is not None:
        return given
    env = os.environ.get("GHN_ONNX_DATA")
    candidates = [Path(env)] if env else [Path(p) for p in DEFAULT_DATA]
    return next((p for p in candidates if p.exists()), None)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("out"), show_default=True,
              help="Where the ONNX files go.")
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="CIFAR-10 (image folder / .zip / cifar-10-batches-py). Default: $GHN_ONNX_DATA, "
                   "else ../shared/data/cifar10-jpeg.zip.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GHN checkpoint. Default: the one shipped with the package.")
@click.option("--test-images", type=int, default=10000, show_default=True, help="Test images to evaluate on.")
@click.option("--calibration-images", type=int, default=512, show_default=True, help="Images for BN statistics.")
def main(out: Path, data: Path | None, checkpoint: Path | None, test_images: int, calibration_images: int) -> None:
    from ghn_onnx.bn.calibration import calibrate_bn, iter_batches
    from ghn_onnx.onnx_io.loading import load_model
    from ghn_onnx.training.datasets import load_cifar10, normalize
    from ghn_onnx.errors import GhnOnnxError
    from ghn_onnx.examples.export_resnet18 import export_resnet18
    from ghn_onnx.ghn import checkpoint as ckpt
    from ghn_onnx.pipeline import predict_files
    from ghn_onnx.training.evaluation import onnx_accuracy, random_subset
    from ghn_onnx.writeback.write import save_model

    ckpt_path = checkpoint or ckpt.default_checkpoint()
    if ckpt_path is None:
        raise click.ClickException("no trained checkpoint ships with this version; pass --checkpoint")
    src = export_resnet18(out / "resnet18.onnx")
    click.echo(f"exported {src} (CIFAR-10 ResNet-18, BatchNorm kept, random init)")
    t0 = time.perf_counter()
    ghn = ckpt.load(ckpt_path)
    dst = out / "resnet18_ghn.onnx"
    pred = predict_files([src], [dst], ghn, metadata={"checkpoint_sha256": ckpt.file_sha256(ckpt_path)})[0]
    click.echo(f"predicted {pred.predicted_elements:,} parameters in {time.perf_counter() - t0:.2f} s "
               f"with {ckpt_path.name} -> {dst}")
    data = find_data(data)
    if data is None:
        click.echo("CIFAR-10 not found: BN statistics not calibrated, accuracy not measured. Get the data with\n"
                   "  python -c \"from ghn_onnx.training.datasets import load_cifar10; load_cifar10()\"   (downloads it)\n"
                   "or pass --data PATH (image folder or .zip with train/<class>/*.jpg, or cifar-10-batches-py).")
        return
    try:
        splits = load_cifar10(data)
    except GhnOnnxError as exc:
        raise click.ClickException(str(exc)) from None
    calib = normalize(random_subset(splits["train"], calibration_images, seed=0).images).numpy()
    test = random_subset(splits["test"], test_images, seed=0)
    results = {}
    for label, path in (("GHN init", dst), ("random init", src)):
        model = calibrate_bn(load_model(path), iter_batches(calib, 64))
        if label == "GHN init":
            save_model(model, out / "resnet18_ghn_calibrated.onnx")
        results[label] = onnx_accuracy(model.SerializeToString(), test)
    click.echo(f"\nCIFAR-10 test accuracy ({len(test)} images, onnxruntime, BN calibrated on "
               f"{calibration_images} training images):")
    for label, acc in results.items():
        click.echo(f"  {label:<12} {100 * acc:6.2f}%")
    click.echo(f"\nONNX files in {out}/: resnet18.onnx (random init), resnet18_ghn.onnx (predicted), "
               "resnet18_ghn_calibrated.onnx (predicted + BN statistics)")


if __name__ == "__main__":
    sys.exit(main())
