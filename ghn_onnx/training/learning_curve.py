"""The learning curve of a training run, beside the reference trainer's measured points.

    python -m ghn_onnx.training.learning_curve runs/ghn2-cifar10 docs/learning_curve.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# shared/reference/TRAINING_BUDGET.md: ppuda's trainer on a 2-core CPU (meta-batch 8, 64 images,
# 6.6 s per step), mean accuracy of 60 held-out generated networks on 2,000 test images.
REFERENCE = [{"step": 198, "minutes": 22.0, "acc": 0.184, "sem": 0.003},
             {"step": 396, "minutes": 44.0, "acc": 0.206, "sem": 0.004}]


def read_run(run: Path) -> tuple[list[dict], list[dict]]:
    logs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    vals = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines() if x.strip()] \
        if (run / "val.jsonl").exists() else []
    return logs, vals


def plot(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs, vals = read_run(run)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x_key, ref_key, label in ((axes[0], "step", "step", "training steps"),
                                      (axes[1], "minutes", "minutes", "wall time (minutes)")):
        xs = [r["step"] if x_key == "step" else r["wall_seconds"] / 60 for r in logs]
        ax.plot(xs, [100 * r["avg_acc"] for r in logs], color="0.7", lw=1, label="running training top-1 (ours)")
        vx = [v["step"] if x_key == "step" else v["wall_seconds"] / 60 for v in vals]
        ax.errorbar(vx, [100 * v["val_acc"] for v in vals], yerr=[100 * v["val_sem"] for v in vals], marker="o",
                    color="tab:blue", capsize=3, label="held-out networks, validation images (ours)")
        ax.errorbar([r[ref_key] for r in REFERENCE], [100 * r["acc"] for r in REFERENCE],
                    yerr=[100 * r["sem"] for r in REFERENCE], marker="s", ls="--", color="tab:red", capsize=3,
                    label="reference trainer (TRAINING_BUDGET.md)")
        ax.axhline(10, color="k", lw=0.5, ls=":")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("GHN-2 on CIFAR-10, 2-core CPU: accuracy of predicted parameters (BN batch statistics)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
