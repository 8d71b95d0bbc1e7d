"""The figure of ``ghn-onnx explain --png``: one row per layer, three bar panels side by side.

Rows are in the explanation's order (most harmful re-initialisation at the top). Panels: the
top-1 lost when the layer alone is re-initialised (red: it hurts, blue: random init does
better); the norm ratio to PyTorch's default init on a log axis with 1 marked (bars go left for
too small, right for too large); the share of repeated rows and input channels (tiling).
Needs matplotlib (the ``viz`` extra).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ghn_onnx.report.drawing import DrawingUnavailableError, _save_atomically
from ghn_onnx.report.explain import Explanation

_ROW_IN, _MAX_HEIGHT_IN = 0.24, 250.0


def plot_explanation(explanation: Explanation, path: str | os.PathLike) -> Path:
    """Write the figure of ``explanation`` to ``path`` (PNG), atomically; return the path.

    Raises:
        DrawingUnavailableError: matplotlib is not installed.
        OSError: the file cannot be written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DrawingUnavailableError("the figure needs matplotlib: pip install 'ghn-onnx[viz]'") from None
    path = Path(path)
    e = explanation
    rows = e.layers
    n = len(rows)
    labels = [f"{r.name} ({r.op}, {'x'.join(map(str, r.shape))})" for r in rows]
    y = list(range(n))
    fig = Figure(figsize=(15, min(max(3.0, 1.4 + n * _ROW_IN), _MAX_HEIGHT_IN)))
    ax_drop, ax_norm, ax_rep = fig.subplots(1, 3, sharey=True, gridspec_kw={"width_ratios": [1.2, 1, 1]})

    drops = [r.accuracy_drop(e.accuracy) for r in rows]
    if any(d is not None for d in drops):
        values = [100 * (d or 0.0) for d in drops]
        ax_drop.barh(y, values, color=["#d62728" if v > 0 else "#1f77b4" for v in values], height=0.7)
        ax_drop.axvline(0, color="black", linewidth=0.6)
        reach = max([abs(v) for v in values] + [1.0]) * 1.1  # at least ±1 point, so no drop still reads as 0
        ax_drop.set_xlim(min(-reach * 0.25, min(values) * 1.1), reach)
        for i, d in enumerate(drops):
            if d is None:
                ax_drop.text(0, i, " not re-initialised", va="center", fontsize=7, color="0.4")
        ax_drop.set_xlabel(f"top-1 lost when re-initialised (points; model {100 * e.accuracy:.1f}%)")
    else:
        ax_drop.text(0.5, 0.5, "no accuracy: pass --data with labelled images", ha="center", va="center",
                     transform=ax_drop.transAxes, fontsize=9, color="0.4")
        ax_drop.set_xlabel("top-1 lost when re-initialised")
    ax_drop.set_yticks(y, labels, fontsize=7)
    ax_drop.invert_yaxis()  # most harmful at the top

    ratios = [r.norm_ratio for r in rows]
    logs = [math.log10(v) if v else 0.0 for v in ratios]
    ax_norm.barh(y, logs, color=["#ff7f0e" if abs(v) > math.log10(2) else "#7f7f7f" for v in logs], height=0.7)
    ax_norm.axvline(0, color="black", linewidth=0.6)
    for i, v in enumerate(ratios):
        if v is None:
            ax_norm.text(0, i, " no reference", va="center", fontsize=7, color="0.4")
    span = max([abs(v) for v in logs] + [math.log10(2)]) * 1.1
    ax_norm.set_xlim(-span, span)
    marks = (1, math.log10(5), math.log10(2), 0)  # 10x, 5x, 2x, 1
    ticks = sorted({s * t for t in marks + (2, 3) for s in (-1, 1) if abs(t) <= span})
    ax_norm.set_xticks(ticks, [f"{10 ** t:.3g}" for t in ticks], fontsize=8)
    ax_norm.set_xlabel("norm / PyTorch default init (log; orange: off by 2x or more)")

    height = 0.35
    ax_rep.barh([i - height / 2 for i in y], [100 * r.repeated_rows for r in rows], height=height,
                color="#2ca02c", label="output rows")
    ax_rep.barh([i + height / 2 for i in y], [100 * (r.repeated_channels or 0.0) for r in rows], height=height,
                color="#9467bd", label="input channels")
    ax_rep.set_xlim(0, 100)
    ax_rep.set_xlabel("exact repeats, % (tiling of the decoder's blocks)")
    ax_rep.legend(loc="lower right", fontsize=8, frameon=False)
    for ax in (ax_drop, ax_norm, ax_rep):
        ax.grid(axis="x", color="0.9", linewidth=0.6)
        ax.set_axisbelow(True)
    data = "" if e.data is None else (f"; {e.data['images']} {e.data['split']} images from "
                                      f"{Path(e.data['source']).name}, BN {e.bn} statistics")
    fig.suptitle(f"{e.model}: {n} predicted layers{data}", x=0.01, ha="left", fontsize=10)
    fig.tight_layout()
    _save_atomically(fig, path, "png")
    return path
