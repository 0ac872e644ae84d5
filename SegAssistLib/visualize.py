"""Pictures a person looks at: three orthogonal slices with the mask, the reference and the prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from SegAssistLib.image import Volume
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, Prompt, ScribblePrompt

RESULT_COLOUR = "#ff8c1a"  # orange: the result in every picture (negative prompts are red)


def _centre(mask: np.ndarray) -> np.ndarray:
    nz = np.argwhere(mask > 0)
    if len(nz) == 0:
        return np.asarray(mask.shape) // 2
    return np.round(nz.mean(0)).astype(int)


def save_overlay_png(
    volume: Volume,
    mask: np.ndarray,
    path: Union[str, Path],
    reference: Optional[np.ndarray] = None,
    prompts: Iterable[Prompt] = (),
    title: str = "",
) -> Path:
    """Axial, coronal and sagittal slices through the mask's centre; mask filled in orange,
    reference outlined in green, prompts drawn where they cross the slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(volume.array, np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    centre = _centre(mask if np.any(mask) else (reference if reference is not None else mask))
    sx, sy, sz = volume.spacing
    views = [  # (name, array axis fixed, aspect of the shown 2D slice)
        ("axial", 0, sy / sx),
        ("coronal", 1, sz / sx),
        ("sagittal", 2, sz / sy),
    ]
    prompts = list(prompts)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, axis, aspect) in zip(axes, views):
        index = int(centre[axis])
        img = np.take(arr, index, axis=axis)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin="lower", interpolation="nearest")
        m = np.take(mask, index, axis=axis) > 0
        overlay = np.ma.masked_where(~m, m)
        ax.imshow(overlay, cmap=ListedColormap([RESULT_COLOUR]), alpha=0.5, aspect=aspect, origin="lower",
                  interpolation="nearest")
        if reference is not None:
            ref = np.take(reference, index, axis=axis) > 0
            if ref.any():
                ax.contour(ref, levels=[0.5], colors="lime", linewidths=1.0)
        _draw_prompts(ax, prompts, axis, index)
        ax.set_title(f"{name} (slice {index})")
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_prompts(ax, prompts, axis: int, index: int) -> None:
    keep = [a for a in range(3) if a != axis]  # array axes (k, j, i) shown as (row, column)

    def project(points_ijk):
        kji = np.asarray(points_ijk, float).reshape(-1, 3)[:, ::-1]
        near = np.abs(kji[:, axis] - index) <= 1.0
        return kji[:, keep][:, ::-1], near  # (x = column, y = row)

    for p in prompts:
        if isinstance(p, PointPrompt):
            xy, near = project([p.position])
            if near[0]:
                ax.plot(xy[0, 0], xy[0, 1], "o", color="cyan" if p.positive else "red", ms=6, mec="black")
        elif isinstance(p, (ScribblePrompt, LassoPrompt)) and p.slab is not None:
            xy, near = project(p.slab.voxels_kji()[:, ::-1])  # the voxels drawn, as dots
            if near.any():
                ax.plot(xy[near, 0], xy[near, 1], ".", color="cyan" if p.positive else "red", ms=3)
        elif isinstance(p, (ScribblePrompt, LassoPrompt)):
            xy, near = project(p.points)
            if near.all():
                closed = np.vstack([xy, xy[:1]]) if isinstance(p, LassoPrompt) else xy
                ax.plot(closed[:, 0], closed[:, 1], "-", color="cyan" if p.positive else "red", lw=1.5)
        elif isinstance(p, BoxPrompt):
            lo, _ = project([p.min_corner])
            hi, _ = project([p.max_corner])
            kji_lo, kji_hi = np.asarray(p.min_corner)[::-1], np.asarray(p.max_corner)[::-1]
            if kji_lo[axis] - 1 <= index <= kji_hi[axis] + 1:
                x0, y0 = lo[0]
                x1, y1 = hi[0]
                ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], "--", color="yellow", lw=1.2)
