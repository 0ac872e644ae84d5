"""Gallery pictures of the benchmark: three orthogonal slices with the result, the reference and
*every* prompt of the session.

It follows :func:`SegAssistLib.visualize.save_overlay_png` (same slices through the object's centre,
same aspect from the spacing, result filled in orange, reference outlined in green, positive prompts
cyan, negative red) with two changes a gallery needs: each view is cropped around the object, and
the prompts are projected onto every view and numbered in the order they were given. (The overlay
function draws a prompt only where it lies within one slice of the view, which hides most clicks of
a session: they are placed in error regions, rarely on the central slices.) A prompt off the slice is
drawn hollow (points) or dashed (strokes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.image import Volume
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, Prompt, ScribblePrompt, prompt_vertices_kji
from SegAssistLib.visualize import RESULT_COLOUR

VIEWS = (("axial", 0), ("coronal", 1), ("sagittal", 2))  # name, array axis normal to the view ([k, j, i])


def _crop_box(shape: Sequence[int], *masks: Optional[np.ndarray], extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """``[[lo, hi), ...]`` per array axis around the masks and prompt points, with a margin."""
    pts = [np.argwhere(m > 0) for m in masks if m is not None and np.any(m)]
    pts += [np.asarray(e, float).reshape(-1, 3) for e in extra if len(e)]
    if not pts:
        return np.array([[0, n] for n in shape])
    allp = np.concatenate(pts)
    lo, hi = np.floor(allp.min(0)), np.ceil(allp.max(0)) + 1
    margin = np.maximum(0.25 * (hi - lo), 8)
    lo = np.maximum(lo - margin, 0).astype(int)
    hi = np.minimum(hi + margin, shape).astype(int)
    return np.stack([lo, hi], 1)


def render_case(
    volume: Volume,
    mask: np.ndarray,
    reference: np.ndarray,
    prompts: Sequence[Prompt],
    path: Path,
    title: str = "",
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    arr = np.asarray(volume.array, np.float32)
    spacing_kji = np.asarray(volume.spacing[::-1], float)
    prompts = list(prompts)
    prompt_pts = [prompt_vertices_kji(p) for p in prompts]
    box = _crop_box(arr.shape, reference, mask, extra=prompt_pts)
    crop = tuple(slice(int(a), int(b)) for a, b in box)
    lo_win, hi_win = np.percentile(arr[crop], [0.5, 99.5])
    focus = reference if np.any(reference) else mask
    centre = np.round(np.argwhere(focus > 0).mean(0)).astype(int) if np.any(focus) else np.asarray(arr.shape) // 2
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (name, axis) in zip(axes, VIEWS):
        rows_axis, cols_axis = [a for a in range(3) if a != axis]
        index = int(centre[axis])
        (r0, r1), (c0, c1) = box[rows_axis], box[cols_axis]
        aspect = spacing_kji[rows_axis] / spacing_kji[cols_axis]
        extent = (c0 - 0.5, c1 - 0.5, r0 - 0.5, r1 - 0.5)
        def view(a: np.ndarray, axis=axis, index=index, r0=r0, r1=r1, c0=c0, c1=c1) -> np.ndarray:
            return np.take(a, index, axis=axis)[r0:r1, c0:c1]

        style = {"origin": "lower", "aspect": aspect, "extent": extent, "interpolation": "nearest"}
        ax.imshow(view(arr), cmap="gray", vmin=lo_win, vmax=hi_win, **style)
        m = view(mask) > 0
        ax.imshow(np.ma.masked_where(~m, m), cmap=ListedColormap([RESULT_COLOUR]), alpha=0.45, **style)
        ref = view(reference) > 0
        if ref.any() and not ref.all():
            ax.contour(np.arange(c0, c1), np.arange(r0, r1), ref.astype(float), levels=[0.5], colors="lime",
                       linewidths=1.0)
        for number, (p, pts) in enumerate(zip(prompts, prompt_pts), start=1):
            _draw(ax, p, pts, number, axis, index, rows_axis, cols_axis, spacing_kji)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_title(f"{name} (slice {index})", fontsize=10)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw(ax, p: Prompt, pts: np.ndarray, number: int, axis: int, index: int, rows_axis: int, cols_axis: int,
          spacing_kji: np.ndarray) -> None:
    if len(pts) == 0:
        return
    x, y = pts[:, cols_axis], pts[:, rows_axis]
    off_mm = np.abs(pts[:, axis] - index) * spacing_kji[axis]
    on_slice = bool(np.all(off_mm <= spacing_kji[axis] * 1.0 + 1e-6))
    colour = "cyan" if getattr(p, "positive", True) else "red"
    if isinstance(p, PointPrompt):
        ax.plot(x, y, "o", ms=6, mec="black" if on_slice else colour, mfc=colour if on_slice else "none", mew=1.2)
        ax.annotate(str(number), (x[0], y[0]), xytext=(3, 3), textcoords="offset points", color=colour, fontsize=7)
    elif isinstance(p, (ScribblePrompt, LassoPrompt)) and p.slab is not None:  # the voxels drawn, as dots
        ax.plot(x, y, ".", color=colour, ms=3 if on_slice else 1.5)
        ax.annotate(str(number), (x[0], y[0]), xytext=(3, 3), textcoords="offset points", color=colour, fontsize=7)
    elif isinstance(p, (ScribblePrompt, LassoPrompt)):
        xs, ys = (np.append(x, x[0]), np.append(y, y[0])) if isinstance(p, LassoPrompt) else (x, y)
        ax.plot(xs, ys, "-" if on_slice else "--", color=colour, lw=1.5 if on_slice else 1.0)
        ax.annotate(str(number), (x[0], y[0]), xytext=(3, 3), textcoords="offset points", color=colour, fontsize=7)
    elif isinstance(p, BoxPrompt):
        (x0, x1), (y0, y1) = sorted(x), sorted(y)
        crosses = pts[:, axis].min() - 1 <= index <= pts[:, axis].max() + 1
        ax.plot([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], "--" if crosses else ":", color="yellow", lw=1.2)


def gallery_title(record: dict) -> str:
    hd = record.get("final_hd95_mm")
    hd_text = "–" if hd is None else f"{hd:.1f} mm"
    return (
        f"{record['dataset']} / {record['case']} / {record['structure']} — {record['engine']}, "
        f"{record['protocol']}: Dice {record['final_dice']:.3f}, HD95 {hd_text} after "
        f"{len(record['interactions'])} interactions"
    )


def pick_best_median_worst(records: Sequence[dict]) -> Tuple[Tuple[str, dict], ...]:
    """``(("best", r), ("median", r), ("worst", r))`` by final Dice, fewer when records are few."""
    if not records:
        return ()
    ranked = sorted(records, key=lambda r: (-r["final_dice"], r["case"], r["structure"]))
    picks = [("best", ranked[0]), ("median", ranked[(len(ranked) - 1) // 2]), ("worst", ranked[-1])]
    out, seen = [], set()
    for name, r in picks:
        key = (r["case"], r["structure"])
        if key not in seen:
            seen.add(key)
            out.append((name, r))
    return tuple(out)
