"""Accuracy of a BN-folded ResNet-18 export predicted with and without --unfold-bn.

    python bench/unfold_accuracy.py [--data ../shared/data/cifar10-jpeg.zip] [--test-images 1000]

Exports the CIFAR ResNet-18 with the dynamo exporter (which folds BN into the convolutions; BN
statistics are randomised first so the fold is not trivial), predicts it with the shipped
checkpoint as is and with --unfold-bn (BN statistics calibrated on 128 training images), and
evaluates both in onnxruntime on random CIFAR-10 test images.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ghn_onnx.training.datasets import load_cifar10, normalize
from ghn_onnx.examples.export_resnet18 import cifar_resnet18
from ghn_onnx.training.evaluation import random_subset


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = ort.InferenceSession(str(path))
    name = sess.get_inputs()[0].name
    pred = [int(sess.run(None, {name: x[i:i + 1]})[0].argmax()) for i in range(len(x))]  # batch fixed at 1
    return float(np.mean(np.array(pred) == y))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/cifar10-jpeg.zip")
    ap.add_argument("--test-images", type=int, default=1000)
    args = ap.parse_args()
    torch.manual_seed(0)
    net = cifar_resnet18()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    test = random_subset(load_cifar10(args.data)["test"], args.test_images, seed=0)
    x, y = normalize(test.images).numpy(), test.labels
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.onnx.export(net.eval(), (torch.zeros(1, 3, 32, 32),), str(tmp / "folded.onnx"), dynamo=True)
        cli = [sys.executable, "-m", "ghn_onnx.cli", "predict", str(tmp / "folded.onnx")]
        subprocess.run(cli + ["-o", str(tmp / "as_is.onnx")], check=True)
        subprocess.run(cli + ["-o", str(tmp / "unfolded.onnx"), "--unfold-bn", "--calibrate", args.data,
                              "--calibration-images", "128"], check=True)
        for label, f in (("predicted as is (BN-free network)", "as_is.onnx"),
                         ("predicted with --unfold-bn --calibrate", "unfolded.onnx")):
            print(f"{label:<42} {100 * accuracy(tmp / f, x, y):5.1f}% on {len(y)} test images")


if __name__ == "__main__":
    main()
