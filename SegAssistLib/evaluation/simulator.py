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
- Among voxels at the same distance the one closest to the region's centre of mass wins, then the
  first in array order.

Masks are arrays indexed ``[k, j, i]``; prompts come out in voxel coordinates ``(i, j, k)``.
``spacing`` is always given in ``(i, j, k)`` order, as in :class:`SegAssistLib.image.Volume`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra
from skimage.morphology import skeletonize

from SegAssistLib.errors import PromptError
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


def _largest_component(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    labels, n = ndimage.label(mask, structure=_FACE)
    if n == 0:
        return np.zeros(mask.shape, bool), 0
    sizes = np.bincount(labels.ravel())[1:]
    best = int(np.argmax(sizes))  # first of equal sizes: the lowest label
    return labels == best + 1, int(sizes[best])


def next_click(
    target: np.ndarray, prediction: Optional[np.ndarray], spacing: Sequence[float] = (1.0, 1.0, 1.0)
) -> Optional[PointPrompt]:
    """The click the simulated user makes next, or ``None`` when the prediction is already perfect."""
    target = np.asarray(target) > 0
    pred = np.zeros_like(target) if prediction is None else np.asarray(prediction) > 0
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {target.shape}")
    missed, missed_size = _largest_component(target & ~pred)
    spilled, spilled_size = _largest_component(pred & ~target)
    if missed_size == 0 and spilled_size == 0:
        return None
    positive = missed_size >= spilled_size
    kji = most_interior_voxel(missed if positive else spilled, spacing)
    return PointPrompt(position=kji_to_ijk(kji), positive=positive)


def first_click(target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> PointPrompt:
    """The most interior voxel of the object's largest connected component, as a positive click."""
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


def _skeleton_path(skeleton: np.ndarray, sampling2d: Tuple[float, float]) -> np.ndarray:
    """Pixels ``(row, col)`` of the longest shortest path in a 2D skeleton (its diameter), in order."""
    pix = np.argwhere(skeleton)
    n = len(pix)
    if n == 1:
        return pix
    index = -np.ones(skeleton.shape, np.int64)
    index[tuple(pix.T)] = np.arange(n)
    rows, cols, weights = [], [], []
    h, w = skeleton.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r2, c2 = pix[:, 0] + dr, pix[:, 1] + dc
        ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        src = np.flatnonzero(ok)
        dst = index[r2[ok], c2[ok]]
        keep = dst >= 0
        rows.append(src[keep])
        cols.append(dst[keep])
        weights.append(np.full(int(keep.sum()), np.hypot(dr * sampling2d[0], dc * sampling2d[1])))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    d0 = dijkstra(graph, directed=False, indices=0)
    far = int(np.argmax(np.where(np.isfinite(d0), d0, -1)))
    dist, pred = dijkstra(graph, directed=False, indices=far, return_predecessors=True)
    end = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
    path = [end]
    while path[-1] != far:
        path.append(int(pred[path[-1]]))
    return pix[path[::-1]]


def scribble_prompt(
    target: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0), width: float = 1.0
) -> ScribblePrompt:
    """A positive scribble along the skeleton of the object on the axial slice through its centre.

    The slice is the one nearest the object's centre of mass that holds the object; on it, the
    stroke follows the longest path of the skeleton of the largest 8-connected piece.
    """
    target = np.asarray(target) > 0
    if not target.any():
        raise ValueError("scribble_prompt: the target is empty")
    centre_k = ndimage.center_of_mass(target)[0]
    slices = np.flatnonzero(target.any(axis=(1, 2)))
    k = int(slices[np.argmin(np.abs(slices - centre_k))])  # first of equals: the lower slice
    labels, n = ndimage.label(target[k], structure=np.ones((3, 3), bool))
    piece = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    skeleton = skeletonize(piece)
    if not skeleton.any():
        skeleton = piece
    sampling = _sampling(spacing)
    path = _skeleton_path(skeleton, (sampling[1], sampling[2]))
    points = [(float(c), float(r), float(k)) for r, c in path]
    return ScribblePrompt(points=points, positive=True, width=width)
