"""``ghn-onnx eval``: how good a GHN checkpoint's predicted parameters are, beside the baselines.

The result is one JSON-able dict; every figure in it carries what produced it (images, networks,
seed, BN mode). Sections:

1. ``generated``: held-out generated architectures (:func:`eval_specs`: in-distribution ``test``,
   out-of-distribution ``wide`` / ``deep`` / ``dense`` / ``bnfree``), GHN parameters, BN on batch
   statistics of each batch of 64 (the paper's protocol, GHN2_FACTS §5.6): mean ± standard error
   and every network's value.
2. ``torchvision``: ResNet-18 / ResNet-50 / MobileNetV2 adjusted for 32x32
   (:mod:`.cifar_models`), exported to ONNX, predicted through the product pipeline
   (:func:`ghn_onnx.pipeline.predict_models`) and run in onnxruntime with BN on batch statistics
   (:func:`batch_stats_model`) and calibrated (:func:`calibrate_bn` on training images, then plain
   inference); the same models at PyTorch's default initialisation in both modes as baseline.
3. ``training``: SGD (the GHN-2 protocol of :func:`sgd_curve`) from random initialisation and
   from the GHN's prediction for a fixed budget, on the first ID architectures; random-init SGD on
   chosen torchvision models (GHN-init fine-tuning of those is opt-in: minutes per 100 steps).

Test images are a seeded random subset of the CIFAR-10 test set in random order (the archive is
class-ordered; batch statistics depend on the batch). Training and calibration images come from
the 45k training part of :func:`train_val_split`.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from ghn_onnx.version import __version__
from ghn_onnx.bn.calibration import batch_stats_model, calibrate_bn, iter_batches
from ghn_onnx.training.datasets import ImageSet, normalize, train_val_split
from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.ghn.model import GHN
from ghn_onnx.graph.graph import Graph
from ghn_onnx.pipeline import predict_models
from ghn_onnx.onnx_io.storage import untie_aliases
from ghn_onnx.training.cifar_models import TORCHVISION_MODELS, cifar_model, export_model, parameters_from_onnx
from ghn_onnx.training.evaluation import accuracy, mean_and_sem, onnx_accuracy, random_subset, sgd_curve
from ghn_onnx.training.generator import EVAL_SIZES, arch_graph, eval_specs, eval_width
from ghn_onnx.training.network import build_net, count_params

OOD_SPLITS = ("wide", "deep", "dense", "bnfree")
BN_MODES = {
    "batch_stats": "every BN normalises with the statistics of its test batch (GHN-2's bn_train=True)",
    "calibrated": "BN running statistics measured on training images, then plain inference",
}
SGD_PROTOCOL = ("SGD lr 0.025, momentum 0.9, weight decay 3e-4, cosine to the last step, gradient clip 5, "
                "RandomCrop(32, 4) + flip; accuracy with BN on batch statistics")

Log = Callable[[str], None]


class EvalConfigError(GhnOnnxError):
    """An evaluation setting is out of range (more networks than held out, an unknown model, ...)."""


@dataclass(frozen=True)
class EvalConfig:
    """What :func:`evaluate` measures. Defaults are sized for a 2-core CPU (roughly 2 hours there
    with ``threads=1`` beside a training run); the held-out sets hold 200 ID architectures and 50
    per OOD split, all usable here (GHN-2 evaluated 500 / 100 on all 10,000 test images)."""

    test_images: int = 2000          # random CIFAR-10 test images (the paper: all 10,000)
    id_nets: int = 50                # first N of the 200 held-out ID architectures
    ood_nets: int = 10               # first N of the 50 held out per OOD split
    ood_splits: tuple[str, ...] = OOD_SPLITS
    batch_size: int = 64             # test batch: batch-statistics BN uses this batch's statistics
    calibration_images: int = 512    # training images for calibrated BN
    torchvision: tuple[str, ...] = TORCHVISION_MODELS
    sgd_steps: tuple[int, ...] = (100, 500)           # marks of every training curve
    finetune_steps: int = 500        # budget of GHN-init vs random-init training (generated nets)
    finetune_archs: int = 3          # first N ID architectures trained from both inits
    sgd_torchvision: tuple[str, ...] = ("resnet18",)  # random-init SGD curves
    finetune_torchvision: tuple[str, ...] = ()        # GHN-init curves too (slow on CPU)
    sgd_batch_size: int = 64         # images per SGD step
    seed: int = 0                    # test / calibration subsets, initialisations, SGD batches
    device: str = "cpu"              # generated nets and SGD; onnxruntime always runs on CPU
    threads: int = 0                 # torch and onnxruntime CPU threads (0: their defaults); 1 is
                                     # much faster when other processes keep the cores busy

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise EvalConfigError(what)

        check(self.test_images >= 1, f"test_images: expected >= 1 (got {self.test_images})")
        check(0 <= self.id_nets <= EVAL_SIZES["test"],
              f"id_nets: expected 0..{EVAL_SIZES['test']}, the held-out ID set (got {self.id_nets})")
        check(0 <= self.ood_nets <= min(EVAL_SIZES[s] for s in OOD_SPLITS),
              f"ood_nets: expected 0..{EVAL_SIZES['wide']}, the held-out set per OOD split (got {self.ood_nets})")
        check(set(self.ood_splits) <= set(OOD_SPLITS),
              f"ood_splits: expected names from {OOD_SPLITS} (got {self.ood_splits})")
        check(0 <= self.finetune_archs <= EVAL_SIZES["test"],
              f"finetune_archs: expected 0..{EVAL_SIZES['test']} (got {self.finetune_archs})")
        check(self.batch_size >= 2, f"batch_size: expected >= 2 for batch statistics (got {self.batch_size})")
        check(self.calibration_images >= 1, f"calibration_images: expected >= 1 (got {self.calibration_images})")
        check(all(k >= 1 for k in self.sgd_steps), f"sgd_steps: expected step counts >= 1 (got {self.sgd_steps})")
        check(self.finetune_steps >= 1, f"finetune_steps: expected >= 1 (got {self.finetune_steps})")
        check(self.threads >= 0, f"threads: expected >= 0 (got {self.threads})")
        check(self.sgd_batch_size >= 2, f"sgd_batch_size: expected >= 2 (got {self.sgd_batch_size})")
        for name in (*self.torchvision, *self.sgd_torchvision, *self.finetune_torchvision):
            check(name in TORCHVISION_MODELS,
                  f"expected torchvision models from {', '.join(TORCHVISION_MODELS)} (got {name!r})")

    @property
    def finetune_marks(self) -> list[int]:
        """Steps at which generated nets' curves are measured: 0, every SGD mark, the budget."""
        return sorted({0, *self.sgd_steps, self.finetune_steps})

    @property
    def sgd_marks(self) -> list[int]:
        return sorted({0, *self.sgd_steps})


# -- 1. generated architectures -------------------------------------------------------------------

def evaluate_split(ghn: GHN, split: str, n: int, test: ImageSet, cfg: EvalConfig, log: Log) -> dict:
    """GHN accuracy (batch-statistics BN) of the first ``n >= 1`` held-out architectures of ``split``,
    in PyTorch with the predicted tensors, as the training validator does (the generator's exports
    have a fixed batch of 1, so onnxruntime cannot run them at batch 64)."""
    t0 = time.perf_counter()
    C, fc_dim = eval_width(split)
    per_net = []
    for i, spec in enumerate(eval_specs(split, n)):
        params = _predict_generated(ghn, arch_graph(spec, C, fc_dim))
        acc = accuracy(build_net(spec, C, fc_dim, device=cfg.device), params, test, cfg.batch_size, cfg.device)
        per_net.append({"index": i, "key": spec.key, "params": count_params(spec, C, fc_dim), "acc": acc})
        log(f"generated {split} {i + 1}/{n}: {acc:.4f}")
    mean, sem = mean_and_sem([r["acc"] for r in per_net])
    return {"split": split, "nets": n, "held_out": EVAL_SIZES[split], "width": {"C": C, "fc_dim": fc_dim},
            **_images(test, cfg), "bn": "batch_stats", "batch_size": cfg.batch_size,
            "mean": mean, "sem": sem, "per_net": per_net, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def _predict_generated(ghn: GHN, graph: Graph) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in ghn([graph])[0].items()}


# -- 2. torchvision models ------------------------------------------------------------------------

@dataclass
class TorchvisionPrediction:
    """A torchvision model at its default init, its ONNX export and the GHN's prediction."""

    net: torch.nn.Module
    model: onnx.ModelProto      # random init, aliases untied
    predicted: onnx.ModelProto
    graph: Graph
    predicted_elements: int


def predict_torchvision(ghn: GHN, name: str, seed: int) -> TorchvisionPrediction:
    """Build ``name`` (32x32 variant, seeded default init), export it and predict it as the product
    does (:func:`predict_models`: untie aliases, convert, one GHN pass, write back)."""
    net = cifar_model(name, seed=seed)
    exported = export_model(net)
    pred = predict_models([exported], ghn, [name])[0]
    return TorchvisionPrediction(net, untie_aliases(exported)[0], pred.model, pred.graph, pred.predicted_elements)


def evaluate_torchvision(p: TorchvisionPrediction, name: str, test: ImageSet, calibration: np.ndarray, cfg: EvalConfig,
                         log: Log) -> dict:
    """GHN and random-init accuracy of one torchvision model, each in both BN modes (onnxruntime)."""
    t0 = time.perf_counter()
    out = {"model": name, "params": sum(q.numel() for q in p.net.parameters()),
           "predicted_params": p.predicted_elements, **_images(test, cfg), "batch_size": cfg.batch_size,
           "calibration_images": len(calibration), "calibration_source": "CIFAR-10 train (45k part), random",
           "init_seed": cfg.seed}
    for label, model, graph in (("ghn", p.predicted, p.graph), ("random_init", p.model, None)):
        calibrated = calibrate_bn(model, iter_batches(calibration, cfg.batch_size), graph=graph)
        out[label] = {"batch_stats": onnx_accuracy(batch_stats_model(model), test, cfg.batch_size, cfg.threads),
                      "calibrated": onnx_accuracy(calibrated, test, cfg.batch_size, cfg.threads)}
        log(f"torchvision {name} {label}: batch_stats {out[label]['batch_stats']:.4f}, "
            f"calibrated {out[label]['calibrated']:.4f}")
    out["seconds"] = time.perf_counter() - t0
    return out


# -- 3. training baselines ------------------------------------------------------------------------

def finetune_generated(ghn: GHN, train: ImageSet, test: ImageSet, cfg: EvalConfig, log: Log) -> list[dict]:
    """Random-init and GHN-init SGD curves (same batches, same budget) on the first ID architectures."""
    C, fc_dim = eval_width("test")
    marks = cfg.finetune_marks
    out = []
    for i, spec in enumerate(eval_specs("test", cfg.finetune_archs)):
        t0 = time.perf_counter()
        params = _predict_generated(ghn, arch_graph(spec, C, fc_dim))
        torch.manual_seed(cfg.seed)
        net = build_net(spec, C, fc_dim, device=cfg.device)
        curves = {"random_init": sgd_curve(copy.deepcopy(net), train, test, marks, **_sgd_args(cfg)),
                  "ghn_init": sgd_curve(net, train, test, marks, params=params, **_sgd_args(cfg))}
        out.append({"split": "test", "index": i, "key": spec.key, "params": count_params(spec, C, fc_dim),
                    **{k: _curve(v) for k, v in curves.items()}, "seconds": time.perf_counter() - t0})
        log(f"finetune test/{i}: random init {_fmt(curves['random_init'])}; GHN init {_fmt(curves['ghn_init'])}")
    return out


def sgd_torchvision(name: str, p: TorchvisionPrediction | None, train: ImageSet, test: ImageSet, cfg: EvalConfig,
                    log: Log) -> dict:
    """Random-init SGD curve of a torchvision model and, when ``p`` is given, the GHN-init curve."""
    t0 = time.perf_counter()
    out: dict = {"model": name}
    net = cifar_model(name, seed=cfg.seed)
    curve = sgd_curve(copy.deepcopy(net), train, test, cfg.sgd_marks, **_sgd_args(cfg))
    out["random_init"] = _curve(curve)
    log(f"sgd {name} random init: {_fmt(curve)}")
    if p is not None:
        curve = sgd_curve(net, train, test, cfg.sgd_marks, params=parameters_from_onnx(p.predicted, net),
                          **_sgd_args(cfg))
        out["ghn_init"] = _curve(curve)
        log(f"sgd {name} GHN init: {_fmt(curve)}")
    out["seconds"] = time.perf_counter() - t0
    return out


def _sgd_args(cfg: EvalConfig) -> dict:
    return {"batch_size": cfg.sgd_batch_size, "seed": cfg.seed, "device": cfg.device}


def _curve(points: dict[int, float]) -> dict:
    steps = sorted(points)
    return {"steps": steps, "acc": [points[s] for s in steps]}


def _fmt(points: dict[int, float]) -> str:
    return ", ".join(f"{k}: {v:.4f}" for k, v in sorted(points.items()))


def _mean_curves(curves: list[dict]) -> dict:
    if not curves:
        return {}
    steps = curves[0]["steps"]
    stats = [mean_and_sem([c["acc"][j] for c in curves]) for j in range(len(steps))]
    return {"steps": steps, "mean": [m for m, _ in stats], "sem": [s for _, s in stats], "nets": len(curves)}


# -- the whole evaluation -------------------------------------------------------------------------

def _images(test: ImageSet, cfg: EvalConfig) -> dict:
    return {"images": len(test), "image_source": "CIFAR-10 test, random subset in random order",
            "image_seed": cfg.seed}


def evaluate(ghn: GHN, splits: dict[str, ImageSet], cfg: EvalConfig = EvalConfig(), *,
             log: Log = lambda _: None, source: dict | None = None,
             on_section: Callable[[dict], None] | None = None) -> dict:
    """Run every section of the evaluation (module docstring) and return the JSON-able result.

    Args:
        ghn: the GHN (its device is where it predicts).
        splits: ``{"train": ..., "test": ...}`` from :func:`~ghn_onnx.training.datasets.load_cifar10`.
        cfg: what to measure.
        log: called with one line of progress per network and model.
        source: what the GHN is (checkpoint path, hash, trained steps), copied into ``meta``.
        on_section: called with the result so far (``meta["complete"]`` false) after each split
            and each torchvision model: the full held-out sets take hours on a CPU, and an
            interrupted run should keep what it measured (``ghn-onnx eval --out`` rewrites its
            file each time).
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _evaluate(ghn, splits, cfg, log, source, on_section or (lambda _: None))
    finally:
        torch.set_num_threads(threads)


def _evaluate(ghn: GHN, splits: dict[str, ImageSet], cfg: EvalConfig, log: Log, source: dict | None,
              on_section: Callable[[dict], None]) -> dict:
    t_start = time.perf_counter()
    ghn.eval()
    test = random_subset(splits["test"], cfg.test_images, cfg.seed)
    train, _ = train_val_split(splits["train"])
    calibration = normalize(random_subset(train, cfg.calibration_images, cfg.seed).images).numpy()
    result: dict = {"meta": _meta(cfg, source, test), "generated": {}, "torchvision": {},
                    "training": {"protocol": SGD_PROTOCOL, "batch_size": cfg.sgd_batch_size,
                                 "train_images": len(train),
                                 **_images(test, cfg), "init_seed": cfg.seed, "generated": [],
                                 "torchvision": {}}}
    result["meta"]["complete"] = False
    for split, n in (("test", cfg.id_nets), *((s, cfg.ood_nets) for s in cfg.ood_splits)):
        if n:
            result["generated"][split] = evaluate_split(ghn, split, n, test, cfg, log)
            on_section(result)
    predicted: dict[str, TorchvisionPrediction] = {}
    for name in dict.fromkeys((*cfg.torchvision, *cfg.finetune_torchvision)):
        predicted[name] = predict_torchvision(ghn, name, cfg.seed)
        if name in cfg.torchvision:
            result["torchvision"][name] = evaluate_torchvision(predicted[name], name, test, calibration, cfg, log)
            on_section(result)
    training = result["training"]
    if cfg.finetune_archs:
        training["generated"] = finetune_generated(ghn, train, test, cfg, log)
        training["generated_mean"] = {k: _mean_curves([r[k] for r in training["generated"]])
                                      for k in ("random_init", "ghn_init")}
    for name in dict.fromkeys((*cfg.sgd_torchvision, *cfg.finetune_torchvision)):
        p = predicted.get(name) if name in cfg.finetune_torchvision else None
        training["torchvision"][name] = sgd_torchvision(name, p, train, test, cfg, log)
    result["meta"]["seconds"] = time.perf_counter() - t_start
    result["meta"]["complete"] = True
    return result


def checkpoint_source(path: str | Path) -> dict:
    """Path, sha256 and the training metadata stored in a checkpoint's header."""
    from safetensors import safe_open

    from ghn_onnx.ghn.checkpoint import file_sha256

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta.pop("config", None)
    return {"checkpoint": str(path), "checkpoint_sha256": file_sha256(path), **meta}


def _meta(cfg: EvalConfig, source: dict | None, test: ImageSet) -> dict:
    return {"ghn_onnx": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": asdict(cfg), **(source or {}),
            "test_images": len(test), "test_label_counts": np.bincount(test.labels, minlength=10).tolist(),
            "bn_modes": BN_MODES}


# -- reporting ------------------------------------------------------------------------------------

def format_summary(result: dict) -> str:
    """A few lines of text: every headline figure with what produced it."""
    m = result["meta"]
    lines = [(f"GHN {m.get('checkpoint', '?')} ({describe_training(m)}); "
              f"{m['test_images']} CIFAR-10 test images (random, seed {m['config']['seed']}); "
              f"BN batch statistics at batch {m['config']['batch_size']} unless said")]
    for split, r in result["generated"].items():
        lines.append(f"  generated {split:6s} {r['nets']:3d} nets (of {r['held_out']}): "
                     f"{100 * r['mean']:5.1f} ± {100 * r['sem']:.1f} %")
    for name, r in result["torchvision"].items():
        g, z = r["ghn"], r["random_init"]
        lines.append(f"  {name:12s} GHN {100 * g['batch_stats']:5.1f} % (calibrated {100 * g['calibrated']:5.1f}); "
                     f"random init {100 * z['batch_stats']:5.1f} % (calibrated {100 * z['calibrated']:5.1f})")
    t = result["training"]
    if t.get("generated_mean"):
        for k, label in (("random_init", "random init"), ("ghn_init", "GHN init")):
            c = t["generated_mean"][k]
            pts = ", ".join(f"{s}: {100 * a:.1f}" for s, a in zip(c["steps"], c["mean"]))
            lines.append(f"  SGD {label:11s} {c['nets']} ID nets, steps -> % : {pts}")
    for name, r in t["torchvision"].items():
        for k, label in (("random_init", "random init"), ("ghn_init", "GHN init")):
            if k in r:
                pts = ", ".join(f"{s}: {100 * a:.1f}" for s, a in zip(r[k]["steps"], r[k]["acc"]))
                lines.append(f"  SGD {name} {label}, steps -> % : {pts}")
    lines.append(f"  {m['seconds']:.0f} s")
    return "\n".join(lines)


def describe_training(meta: dict) -> str:
    """What the checkpoint's header says about its training, in a few words."""
    if "trained_steps" in meta:
        return f"{meta['trained_steps']} training steps"
    if "converted_from" in meta:
        return f"converted from {meta['converted_from']}"
    return "no training record"


def write_json(result: dict, path: str | Path) -> None:
    """Write ``result`` to ``path`` through a temporary file and a rename (it is rewritten while
    an evaluation runs, and an interrupted write must not leave half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)
