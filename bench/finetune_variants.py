"""Post-processing variants on *validation-stream* networks, to choose ``ForTraining``'s defaults
without looking at the benchmark's test networks (RESULTS.md, "Fine-tuning from predictions", run 6).

For each network of the trainer's validation stream (:func:`ghn_onnx.training.run.validation_nets`,
never trained on and disjoint from ``eval_specs('test')``), each variant and each learning rate:
the network at its seeded default init, overwritten by the GHN's prediction post-processed by the
variant, is trained with the benchmark's SGD recipe (one cosine to ``STEPS``) and measured on 1,000
random images of the 5,000-image validation split at 0, ``STEPS/2`` and ``STEPS`` steps (BN on batch
statistics). One JSON line per run on stdout; all of them in ``OUT`` at the end.

    OMP_NUM_THREADS=1 python bench/finetune_variants.py NETS VARIANTS LRS STEPS OUT [CHECKPOINT [CIFAR10]]

``NETS``: ``0,1,3``; ``VARIANTS``: ``;``-separated ``default``, ``ghn`` or ``ft:`` + ``ForTraining``
keyword arguments (``ft:noise=0.01,orthogonal_from=0.0,rescale=True``); ``LRS``: ``0.05``.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from ghn_onnx.ghn.checkpoint import load
from ghn_onnx.pipeline import predict_graphs
from ghn_onnx.training.datasets import load_cifar10, train_val_split
from ghn_onnx.training.evaluation import random_subset
from ghn_onnx.training.finetune import RECIPES, load_parameters, train_curve
from ghn_onnx.training.generator import arch_graph
from ghn_onnx.training.network import build_net
from ghn_onnx.training.run import validation_nets
from ghn_onnx.writeback.for_training import ForTraining, for_training


def variant_options(variant: str) -> ForTraining | None:
    """``ft:key=value,...`` -> its ForTraining (values as Python literals); ``ghn`` -> None."""
    if variant == "ghn":
        return None
    if not variant.startswith("ft:"):
        raise SystemExit(f"expected default, ghn or ft:key=value,... (got {variant!r})")
    import ast

    kwargs = {}
    for item in filter(None, variant[3:].split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return ForTraining(**kwargs)


def main(argv: list[str]) -> None:
    nets = [int(x) for x in argv[0].split(",")]
    variants = argv[1].split(";")
    lrs = [float(x) for x in argv[2].split(",")]
    steps, out = int(argv[3]), argv[4]
    checkpoint = argv[5] if len(argv) > 5 else "ghn_onnx/checkpoints/ghn2_cifar10.safetensors"
    torch.set_num_threads(1)
    ghn = load(checkpoint)
    ghn.eval()
    train, val_split = train_val_split(load_cifar10(None if len(argv) <= 6 else argv[6])["train"])
    val = random_subset(val_split, 1000, 7)
    draws = validation_nets(max(nets) + 1)
    results = []
    for k in nets:
        spec, C, fc = draws[k]
        graph = arch_graph(spec, C, fc)
        raw = predict_graphs(ghn, [graph])[0]
        for variant in variants:
            for lr in lrs:
                torch.manual_seed(0)
                net = build_net(spec, C, fc)
                if variant != "default":
                    post = variant_options(variant)
                    values = raw if post is None else for_training(graph, raw, post)[0]
                    load_parameters(net, {n: torch.from_numpy(np.array(v, dtype=np.float32)) for n, v in values.items()})
                t0 = time.time()
                curve = train_curve(net, train, val, [0, steps // 2, steps], RECIPES["sgd"], lr)
                row = dict(net=k, C=C, var=variant, lr=lr, acc=[curve[0], curve[steps // 2], curve[steps]],
                           s=round(time.time() - t0))
                print(json.dumps(row), flush=True)
                results.append(row)
    with open(out, "w") as f:
        json.dump({"checkpoint": checkpoint, "steps": steps, "val_images": len(val), "runs": results}, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
