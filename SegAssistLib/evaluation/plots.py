"""PNG plots of the benchmark report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

from SegAssistLib.evaluation.aggregate import Summary

ENGINE_COLOURS = {"builtin": "tab:blue", "ablation": "tab:orange", "growcut": "tab:green", "randomwalker": "tab:red"}
ENGINE_LABELS = {
    "builtin": "SegAssist model",
    "ablation": "model, no prompt history",
    "growcut": "Grow from seeds",
    "randomwalker": "random walker",
}
FIRST_TICK = {"clicks": "1", "box+clicks": "box", "scribble+clicks": "scr."}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour(engine: str, index: int = 0) -> str:
    return ENGINE_COLOURS.get(engine, f"C{4 + index % 6}")


def label(engine: str) -> str:
    return ENGINE_LABELS.get(engine, engine)


def dice_curves(
    dataset: str, curves: Dict[Tuple[str, str], Summary], protocols: Sequence[str], engines: Sequence[str],
    path: Path,
) -> Path:
    """Dice (mean, 95 % bootstrap band) and median HD95 against the interaction, one column per protocol."""
    plt = _plt()
    from matplotlib import ticker

    protocols = [p for p in protocols if any((p, e) in curves for e in engines)]
    hd95 = np.array([v for s in curves.values() for v in s.hd95_median_curve if v is not None], float)
    log_hd95 = bool(np.any(np.isfinite(hd95) & (hd95 > 0)))  # all 0 (every answer exact) or none: linear
    fig, axes = plt.subplots(2, len(protocols), figsize=(4.2 * len(protocols), 6.4), squeeze=False, sharey="row")
    for col, protocol in enumerate(protocols):
        top, bottom = axes[0, col], axes[1, col]
        for i, engine in enumerate(engines):
            s = curves.get((protocol, engine))
            if s is None:
                continue
            x = np.arange(1, len(s.dice_curve) + 1)
            mean = np.array([e.mean for e in s.dice_curve])
            low = np.array([e.low for e in s.dice_curve])
            high = np.array([e.high for e in s.dice_curve])
            c = colour(engine, i)
            top.plot(x, mean, "-o", color=c, ms=3, lw=1.6, label=f"{label(engine)} (n={s.n})")
            top.fill_between(x, low, high, color=c, alpha=0.15, lw=0)
            bottom.plot(x, s.hd95_median_curve, "-o", color=c, ms=3, lw=1.4)
        n = max(len(s.dice_curve) for (p, _), s in curves.items() if p == protocol)
        ticks = np.arange(1, n + 1)
        # after a box or scribble, tick t is click t - 1
        names = [FIRST_TICK.get(protocol, "1")] + [str(t if protocol == "clicks" else t - 1) for t in ticks[1:]]
        if n > 12:
            names = [name if i % 2 == 0 else "" for i, name in enumerate(names)]
        for ax in (top, bottom):
            ax.set_xticks(ticks)
            ax.set_xticklabels(names)
            ax.grid(alpha=0.3)
        top.set_title(protocol)
        top.set_ylim(0, 1)
        bottom.set_xlabel("interaction" if protocol == "clicks" else "interaction (then clicks)")
        if log_hd95:
            bottom.set_yscale("log")
            bottom.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            bottom.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            bottom.yaxis.set_minor_formatter(ticker.NullFormatter())
        if col == 0:
            top.set_ylabel("Dice (mean, 95 % CI)")
            bottom.set_ylabel("HD95 mm (median)")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{dataset}: Dice and HD95 after each interaction")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_boxes(latencies: Dict[Tuple[str, str], List[float]], datasets: Sequence[str], engines: Sequence[str],
                  path: Path) -> Path:
    """Per-interaction latency: one box per engine within each dataset, log scale."""
    plt = _plt()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 * len(datasets) * max(1, len(engines)) / 2), 4.2))
    width = 0.8 / max(1, len(engines))
    for i, engine in enumerate(engines):
        data, positions = [], []
        for d, dataset in enumerate(datasets):
            values = latencies.get((dataset, engine))
            if values:
                data.append(np.maximum(values, 1e-4))
                positions.append(d + (i - (len(engines) - 1) / 2) * width)
        if not data:
            continue
        parts = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=True,
                           flierprops={"markersize": 2, "alpha": 0.4})
        for box in parts["boxes"]:
            box.set_facecolor(colour(engine, i))
            box.set_alpha(0.6)
        ax.plot([], [], "s", color=colour(engine, i), label=label(engine))
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
    ax.set_xticks(range(len(datasets)))
    ax.set_xticklabels(datasets, rotation=20, ha="right")
    ax.set_ylabel("seconds per interaction")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title("Latency per interaction")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
