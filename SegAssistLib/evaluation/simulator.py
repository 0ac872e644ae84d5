"""The simulated user of the evaluation: where it clicks, and the box or scribble it starts from.

Protocol (deterministic, the same for every engine):

- Each click goes to the most interior voxel of the largest error region: the voxel farthest (in mm,
  Euclidean distance transform with the image spacing) from the region's border. The first click,
  with nothing predicted yet, is therefore at the most interior voxel of the object's largest
  connected component.
- Error regions are the 6-connected components of the missed voxels (target and not predicted: a
  positive click) and of the spilled voxels (predicted and not target: a negative click). The
  largest region by voxel count wins; ties go to the missed region, then to the lowest label.
- The image border counts as a region border (the region is padded with background first).
- Voxels of nnU-Net's ignore label (left unannotated) belong to no error region: the prediction
  there is neither missed nor spilled, and no click lands there.
- Among voxels at the same distance the one closest to the region's centre of mass wins, then the
  first in array order.

Masks are arrays indexed ``[k, j, i]``; prompts come out in voxel coordinates ``(i, j, k)``.
``spacing`` is always given in ``(i, j, k)`` order, as in :class:`SegAssistLib.image.Volume`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from SegAssistLib.errors import PromptError
from SegAssistLib.evaluation.metrics import outside
from SegAssistLib.evaluation.scribbles import simulate_scribble
from SegAssistLib.prompts import BoxPrompt, PointPrompt, ScribblePrompt

Index3 = Tuple[int, int, int]
_FACE = ndimage.generate_binary_structure(3, 1)


def _sampling(spacing: Sequence[float]) -> Tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (i, j, k), got {spacing}")
    return (sp[2], sp[1], sp[0])  # array order [k, j, i]


def kji_to_ijk(index: Sequence[int]) -> Tuple[float, float, float]:
    return (float(index[2]), float(index[1]), float(index[0]))


def most_interior_voxel(region: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Index3:
    """Array index ``(k, j, i)`` of the voxel of ``region`` farthest from its border (in mm)."""
    region = np.asarray(region, bool)
    if not region.any():
        raise ValueError("most_interior_voxel: the region is empty")
    sampling = _sampling(spacing)
    nz = np.argwhere(region)
    lo, hi = nz.min(0), nz.max(0) + 1
    crop = region[tuple(slice(a, b) for a, b in zip(lo, hi))]
    dist = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=sampling)[1:-1, 1:-1, 1:-1]
    best = np.argwhere(dist >= dist.max() - 1e-9)  # C order: ties then go to the first in array order
    if len(best) > 1:
        centre = np.asarray(ndimage.center_of_mass(crop))
        offsets = (best - centre) * np.asarray(sampling)
        best = best[[int(np.argmin(np.einsum("ij,ij->i", offsets, offsets)))]]
    return tuple(int(x) for x in best[0] + lo)  # type: ignore[return-value]


def largest_component(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=_FACE)
    if n == 0:
        return np.zeros(mask.shape, bool), 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))  # first of equal sizes: the lowest label
    return labels == best + 1, int(sizes[best])


def next_click(
    target: np.ndarray,
    prediction: Optional[np.ndarray],
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    ignore: Optional[np.ndarray] = None,
) -> Optional[PointPrompt]:
    """The click the simulated user makes next, or ``None`` when the prediction is already perfect.
    ``ignore``: voxels left unannotated (nnU-Net's ignore label), in neither error region."""
    target = np.asarray(target) > 0
    pred = np.zeros_like(target) if prediction is None else np.asarray(prediction) > 0
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    if ignore is not None:
        target, pred = outside(target, ignore), outside(pred, ignore)
    # Work in the box of target | prediction: every error region lies in it and keeps its shape and
    # scan order there, so the click is the same as on the whole image, only cheaper on big images.
    either = target | pred
    if not either.any():
        return None
    ranges = [np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    lo = [int(r[0]) for r in ranges]
    hi = [int(r[-1]) + 1 for r in ranges]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    target, pred = target[box], pred[box]
    missed, missed_size = largest_component(target & ~pred)
    spilled, spilled_size = largest_component(pred & ~target)
    if missed_size == 0 and spilled_size == 0:
        return None
    positive = missed_size >= spilled_size
    kji = most_interior_voxel(missed if positive else spilled, spacing)
    kji = tuple(int(x + o) for x, o in zip(kji, lo))
    return PointPrompt(position=kji_to_ijk(kji), positive=positive)


def first_click(target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> PointPrompt:
    """The most interior voxel of the object's largest connected component, as a positive click: the
    next-click rule applied to an empty prediction (the whole object is the error). For an object in
    several pieces this is not the global maximum of its distance transform when that lies in a smaller
    piece; the benchmark's numbers depend on this convention (``metrics.CONVENTIONS["first_click"]``)."""
    click = next_click(target, None, spacing)
    if click is None:
        raise ValueError("first_click: the target is empty")
    return click


def box_prompt(target: np.ndarray) -> BoxPrompt:
    """The 3D bounding box of the target (inclusive voxel corners, ``(i, j, k)``)."""
    nz = np.argwhere(np.asarray(target) > 0)
    if len(nz) == 0:
        raise ValueError("box_prompt: the target is empty")
    lo, hi = nz.min(0), nz.max(0)
    try:
        return BoxPrompt(min_corner=kji_to_ijk(lo), max_corner=kji_to_ijk(hi))
    except ValueError as exc:
        raise PromptError(f"the target's bounding box cannot be sent as a box: {exc}") from exc


def scribble_prompt(
    target: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    width: float = 1.0,
    orientation: str = "axial",
    source: str = "skeleton",
    jitter_mm: float = 0.0,
    seed: int = 0,
) -> ScribblePrompt:
    """A positive scribble inside the object on a slice through it (any orientation).

    The defaults give the original protocol: the longest skeleton path of the largest piece of the
    axial slice nearest the object's centre of mass, without jitter. See
    :mod:`SegAssistLib.evaluation.scribbles` for the orientations, sources and jitter.
    """
    return simulate_scribble(target, spacing, orientation, source, jitter_mm, seed, width)
