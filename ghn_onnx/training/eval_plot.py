"""The evaluation's figures: test accuracy against SGD steps, random init vs GHN init
(:func:`plot_curves`), and per initialisation for the fine-tuning benchmark (:func:`plot_finetune`).

Curves come from ``result["training"]`` of :func:`ghn_onnx.training.eval_suite.evaluate`; the
GHN's accuracy without any training (``result["generated"]["test"]`` and the torchvision models,
batch-statistics BN) is drawn as a dotted horizontal line in the colour of the same networks.
The title and footer say which checkpoint, images, networks and seed produced every point.
"""

from __future__ import annotations

from pathlib import Path

from ghn_onnx.errors import GhnOnnxError
from ghn_onnx.training.eval_suite import describe_training


class PlotUnavailableError(GhnOnnxError):
    """matplotlib (the ``viz`` extra) is not installed."""


_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def plot_curves(result: dict, path: str | Path) -> Path:
    """Write the accuracy-vs-steps figure of ``result`` to ``path`` (PNG); return the path."""
    plt = _pyplot()
    meta, training = result["meta"], result["training"]
    fig, ax = plt.subplots(figsize=(8.5, 5.5), dpi=120)
    families = []
    mean = training.get("generated_mean") or {}
    if mean.get("random_init"):
        families.append((f"generated ID nets (mean of {mean['random_init']['nets']})", mean,
                         _generated_line(result)))
    for name, r in training.get("torchvision", {}).items():
        curves = {k: {"steps": r[k]["steps"], "mean": r[k]["acc"], "sem": None} for k in ("random_init", "ghn_init")
                  if k in r}
        tv = result.get("torchvision", {}).get(name)
        families.append((name, curves, tv["ghn"]["batch_stats"] if tv else None))
    for (label, curves, ghn_acc), colour in zip(families, _COLOURS * 4):
        for key, style, what in (("random_init", "-o", "random init + SGD"), ("ghn_init", "--s", "GHN init + SGD")):
            c = curves.get(key)
            if not c:
                continue
            y = [100 * a for a in c["mean"]]
            ax.plot(c["steps"], y, style, color=colour, label=f"{label}: {what}", markersize=4)
            if c.get("sem"):
                lo = [100 * (a - s) for a, s in zip(c["mean"], c["sem"])]
                hi = [100 * (a + s) for a, s in zip(c["mean"], c["sem"])]
                ax.fill_between(c["steps"], lo, hi, color=colour, alpha=0.12, linewidth=0)
        if ghn_acc is not None:
            ax.axhline(100 * ghn_acc, color=colour, linestyle=":", linewidth=1.5,
                       label=f"{label}: GHN, no training ({100 * ghn_acc:.1f}%)")
    ax.axhline(10, color="grey", linewidth=0.8, linestyle="-.", label="chance (10%)")
    ax.set_xlabel(f"SGD steps (batch {training['batch_size']})")
    ax.set_ylabel("CIFAR-10 test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="best")
    name = Path(str(meta.get("checkpoint", "?"))).name
    ax.set_title(f"GHN init vs random init: checkpoint {name} ({describe_training(meta)})", fontsize=10)
    fig.text(0.01, 0.005, _footer(result), fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _generated_line(result: dict) -> float | None:
    """GHN accuracy (no training) averaged over the generated nets that were trained."""
    curves = result["training"].get("generated") or []
    if not curves:
        return None
    points = [c["ghn_init"]["acc"][c["ghn_init"]["steps"].index(0)] for c in curves if 0 in c["ghn_init"]["steps"]]
    return sum(points) / len(points) if points else None


def _footer(result: dict) -> str:
    meta, t = result["meta"], result["training"]
    cfg = meta["config"]
    sha = str(meta.get("checkpoint_sha256", ""))[:12]
    return (f"{meta['test_images']} random CIFAR-10 test images (seed {cfg['seed']}), BN on batch statistics "
            f"(batch {cfg['batch_size']}); {t['protocol']}; {t['train_images']} training images; "
            f"generated nets: first {cfg['finetune_archs']} held-out ID architectures; "
            f"checkpoint sha256 {sha}; ghn-onnx {meta['ghn_onnx']}, {meta['date']}")


_INIT_COLOURS = ("#7f7f7f", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def plot_finetune(result: dict, path: str | Path) -> Path:
    """Accuracy vs steps per initialisation of the fine-tuning benchmark
    (:func:`ghn_onnx.training.finetune.finetune_benchmark`): one panel per optimiser, the mean over
    networks that ran the init as a thick line, each network as a thin one. Returns ``path`` (PNG)."""
    plt = _pyplot()
    meta = result["meta"]
    cfg = meta["config"]
    opts, inits = cfg["optimizers"], cfg["inits"]
    fig, axes = plt.subplots(1, len(opts), figsize=(6.5 * len(opts), 5.0), dpi=120, squeeze=False)
    for ax, opt in zip(axes[0], opts):
        for spec, colour in zip(inits, _INIT_COLOURS * 4):
            runs = [e["runs"][opt][spec] for e in result["nets"] if spec in e["runs"].get(opt, {})]
            if not runs:  # a merged result need not have every init on every net
                continue
            steps = runs[0]["steps"]
            for r in runs:
                ax.plot(steps, [100 * a for a in r["acc"]], "-", color=colour, alpha=0.25, linewidth=0.8)
            mean = [100 * sum(r["acc"][j] for r in runs) / len(runs) for j in range(len(steps))]
            lrs = sorted({r["lr"] for r in runs})
            ax.plot(steps, mean, "-o", color=colour, linewidth=2, markersize=4,
                    label=f"{spec} ({len(runs)} nets, lr {', '.join(f'{v:g}' for v in lrs)})")
        ax.axhline(10, color="grey", linewidth=0.8, linestyle="-.")
        ax.set_xlabel(f"{opt} steps (batch {cfg['batch_size']})")
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.set_title(f"{opt}: mean of {len(result['nets'])} nets (thin: each net)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    nets = ", ".join(e["net"] for e in result["nets"])
    fig.text(0.01, 0.005, (f"nets: {nets}; {meta['test_images']} random CIFAR-10 test images (seed {meta['seed']}), "
                           f"BN on batch statistics; lr per init chosen by {meta['lr_rule']}; {meta['date']}"),
             fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailableError("the plot needs matplotlib: pip install 'ghn-onnx[viz]'") from None
    return plt
