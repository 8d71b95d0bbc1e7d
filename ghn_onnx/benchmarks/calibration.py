"""Benchmark of BN calibration: time and accuracy of each :data:`~ghn_onnx.bn.calibration.CALIBRATION_MODES`.

    python -m ghn_onnx.benchmarks.calibration --data CIFAR10 [--images 512] [--repeats 3] [--json F]

Two parts, on CIFAR-10 training images (a seeded random subset of the 45k training part,
normalised as in training), in onnxruntime on CPU:

* :func:`time_calibration`: seconds (wall, and CPU seconds of the process, all its threads: on a
  busy machine wall time mostly measures the other processes) of
  :func:`~ghn_onnx.bn.calibration.calibrate_bn` per mode on
  CIFAR variants of torchvision's ResNet-50 and DenseNet-121 (3x3 stride-1 stem, no max-pool, 10
  classes, BN kept, random init: time does not depend on the weights). Modes run in turn, round
  after round, so that background load hits each alike; the figure is the median. The
  sequential mode costs ~(BN levels / 2) forward passes, so it may be timed on fewer images
  (``sequential_images``): its time grows linearly with them.
* :func:`calibration_accuracy`: CIFAR-10 test accuracy (a seeded random subset) of GHN-predicted
  torchvision models (the shipped checkpoint, as ``ghn-onnx eval`` predicts them) after each mode's
  calibration, several calibration subsets; with the share of test images on which each mode's
  top-1 class equals the sequential mode's, and the largest relative gap in the statistics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Sequence

import numpy as np
import onnx
import torch

from ghn_onnx.bn.calibration import CALIBRATION_MODES, calibrate_bn, iter_batches
from ghn_onnx.onnx_io.storage import stored_tensors

Log = Callable[[str], None]


def cifar_densenet121() -> torch.nn.Module:
    """torchvision DenseNet-121 for 32x32 images: 3x3 stride-1 stem, no max-pool, 10 classes."""
    import torchvision

    net = torchvision.models.densenet121(num_classes=10)
    net.features.conv0 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.features.pool0 = torch.nn.Identity()
    return net


def timing_models() -> dict[str, Callable[[], torch.nn.Module]]:
    """The models :func:`time_calibration` times, seeded (random init)."""
    from ghn_onnx.training.cifar_models import cifar_model

    return {"resnet50": lambda: cifar_model("resnet50", seed=0), "densenet121": cifar_densenet121}


def _calibration_images(data: dict, n: int, seed: int) -> np.ndarray:
    from ghn_onnx.training.datasets import normalize, train_val_split
    from ghn_onnx.training.evaluation import random_subset

    train, _ = train_val_split(data["train"])
    return normalize(random_subset(train, n, seed).images).numpy()


def time_calibration(data: dict, images: int = 512, batch_size: int = 64, repeats: int = 3,
                     modes: Sequence[str] = CALIBRATION_MODES, sequential_images: int | None = None,
                     threads: int | None = None, log: Log = lambda m: None) -> list[dict]:
    """Median seconds of ``calibrate_bn`` per model and mode (see the module docstring).

    ``sequential_images`` (default ``images``): images of the sequential mode, which runs
    ``min(repeats, 1 if sequential_images differs else repeats)`` times.
    """
    from ghn_onnx.training.cifar_models import export_model

    x = _calibration_images(data, images, seed=0)
    seq_n = sequential_images or images
    out = []
    for name, factory in timing_models().items():
        torch.manual_seed(0)
        model = export_model(factory())
        times: dict[str, list[float]] = {m: [] for m in modes}
        cpu: dict[str, list[float]] = {m: [] for m in modes}
        for r in range(repeats):
            for mode in modes:
                n = seq_n if mode == "sequential" else images
                if mode == "sequential" and seq_n != images and r > 0:
                    continue  # a shortened reference: once is enough to scale it
                t0, c0 = time.perf_counter(), time.process_time()
                calibrate_bn(model, iter_batches(x[:n], batch_size), mode=mode, threads=threads)
                times[mode].append(time.perf_counter() - t0)
                cpu[mode].append(time.process_time() - c0)
                log(f"{name} {mode} {n} images: {times[mode][-1]:.1f} s, {cpu[mode][-1]:.1f} CPU s "
                    f"(load {os.getloadavg()[0]:.1f})")
        for mode in modes:
            n = seq_n if mode == "sequential" else images
            out.append({"model": name, "mode": mode, "images": n, "batch_size": batch_size, "runs": len(times[mode]),
                        "median_s": statistics.median(times[mode]), "all_s": times[mode],
                        "median_cpu_s": statistics.median(cpu[mode]), "all_cpu_s": cpu[mode]})
    return out


def calibration_accuracy(data: dict, models: Sequence[str] = ("resnet18", "mobilenet_v2"), images: int = 512,
                         batch_size: int = 64, test_images: int = 2000, seeds: Sequence[int] = (0, 1),
                         threads: int | None = None, log: Log = lambda m: None) -> list[dict]:
    """Test accuracy after each mode's calibration, per GHN-predicted model and calibration seed."""
    from ghn_onnx.threads import inference_session

    from ghn_onnx.pipeline import load_ghn
    from ghn_onnx.training.datasets import normalize
    from ghn_onnx.training.eval_suite import predict_torchvision
    from ghn_onnx.training.evaluation import random_subset

    ghn = load_ghn()
    test = random_subset(data["test"], test_images, seed=0)
    xt = normalize(test.images).numpy()
    out = []
    for name in models:
        p = predict_torchvision(ghn, name, seed=0)
        for seed in seeds:
            x = _calibration_images(data, images, seed)
            row: dict = {"model": name, "seed": seed, "images": images, "test_images": len(test)}
            tops, calibrated = {}, {}
            for mode in CALIBRATION_MODES:
                t0 = time.perf_counter()
                calibrated[mode] = calibrate_bn(p.predicted, iter_batches(x, batch_size), graph=p.graph, mode=mode,
                                                threads=threads)
                seconds = time.perf_counter() - t0
                sess = inference_session(calibrated[mode], threads)
                tops[mode] = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: b})[0].argmax(1)
                                             for b in iter_batches(xt, 250)])
                row[mode] = {"accuracy": float((tops[mode] == test.labels).mean()), "seconds": seconds}
                log(f"{name} seed {seed} {mode}: {row[mode]['accuracy']:.4f} ({seconds:.1f} s)")
            ref = stored_tensors(calibrated["sequential"])
            for mode in ("one-pass", "two-pass"):
                row[mode]["top1_agrees_with_sequential"] = float((tops[mode] == tops["sequential"]).mean())
                row[mode]["max_relative_var_gap"] = _var_gap(calibrated[mode], ref)
            out.append(row)
    return out


def _var_gap(model: onnx.ModelProto, reference: dict) -> float:
    """Largest relative difference of a running variance from the reference's."""
    gaps = [0.0]
    for name, t in stored_tensors(model).items():
        if "running_var" in name and name in reference:
            a = onnx.numpy_helper.to_array(t).astype(np.float64)
            b = onnx.numpy_helper.to_array(reference[name]).astype(np.float64)
            gaps.append(float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))))
    return max(gaps)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="CIFAR-10 (as ghn-onnx eval --data)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sequential-images", type=int, default=None)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--accuracy-models", default="resnet18,mobilenet_v2", help="'none': skip the accuracy part")
    parser.add_argument("--timing-modes", default=",".join(CALIBRATION_MODES), help="'none': skip the timing part")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    from ghn_onnx.training.datasets import load_cifar10

    def log(m: str) -> None:
        print(m, flush=True)

    data = load_cifar10(args.data)
    result: dict = {"command": "python -m ghn_onnx.benchmarks.calibration " + " ".join(argv or []),
                    "load_before": os.getloadavg()}
    if args.timing_modes != "none":
        result["timing"] = time_calibration(data, args.images, args.batch_size, args.repeats,
                                            args.timing_modes.split(","), args.sequential_images, args.threads, log)
    if args.accuracy_models != "none":
        result["accuracy"] = calibration_accuracy(data, args.accuracy_models.split(","), args.images, args.batch_size,
                                                  args.test_images, [int(s) for s in args.seeds.split(",")],
                                                  args.threads, log)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
