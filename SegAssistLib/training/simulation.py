"""Simulated interactions in patch coordinates, for training.

A simulated annotator gives a first prompt of a random kind (click, 3D box, 2D box, scribble,
lasso), then corrections at the largest error, the rule the evaluation protocol uses, so the
network learns to answer the prompts users and benchmarks actually give. A correction is a click,
a scribble, or a lasso drawn around the error on one slice: negative around a spill (the engine
erases inside it), positive around a missed part.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours
from skimage.morphology import skeletonize

from SegAssistLib import rasterize
from SegAssistLib.engine.encoding import PatchPrompt
from SegAssistLib.evaluation.simulator import largest_component, most_interior_voxel

FIRST_KINDS = ("point", "box3d", "box2d", "scribble", "lasso")
FIRST_KIND_WEIGHTS = (0.45, 0.13, 0.14, 0.14, 0.14)
CORRECTION_SCRIBBLE_SHARE = 0.15  # corrections drawn as a scribble rather than a click
CORRECTION_LASSO_SHARE = 0.1  # the trainers' share of corrections drawn as a lasso around the error
# a correction lasso is kept only if at most this share of what it fills on its slice (its outline
# drawn included) lies farther than a voxel from the error there: the outline of a spill shaped
# like a shell would enclose the object too, and a click is given instead
LASSO_OFF_ERROR_SHARE = 0.1
# A click or a scribble inside one structure names that structure; only a prompt that shows the
# extent (a box, an outline) can name a group of touching structures such as the whole heart.
EXTENT_KINDS = ("box3d", "box2d", "lasso")


def interior_point(
    mask: np.ndarray, rng: np.random.Generator, exact: bool, one_component: bool = False
) -> Optional[np.ndarray]:
    """A voxel deep inside ``mask``: exactly the evaluation protocol's click (the distance-transform
    maximum of the largest component, ties to its centre), or a random voxel near the maximum.
    ``one_component``: ``mask`` is one connected region already (a largest error region), so it
    is not labelled again."""
    nz = np.argwhere(mask)
    if len(nz) == 0:
        return None
    if exact:
        region = mask if one_component else largest_component(mask)[0]
        return np.asarray(most_interior_voxel(region), float)
    lo, hi = nz.min(0), nz.max(0) + 1  # the transform on the region's box only: errors are often small
    crop = mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    dist = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1, 1:-1]
    candidates = np.argwhere(dist >= 0.5 * dist.max())
    return (candidates[rng.integers(len(candidates))] + lo).astype(float)


def _slice_through(mask: np.ndarray, rng: np.random.Generator):
    """A random axis and an index of a slice with a good share of the object on it."""
    axis = int(rng.integers(3))
    other = tuple(a for a in range(3) if a != axis)
    areas = mask.sum(axis=other)
    good = np.flatnonzero(areas >= 0.3 * areas.max())
    index = int(good[rng.integers(len(good))])
    return axis, index, np.take(mask, index, axis=axis)


def _lift(coords2d: np.ndarray, axis: int, index: int) -> np.ndarray:
    out = np.insert(np.asarray(coords2d, float), axis, index, axis=1)
    return out


def _box3d(mask, rng) -> PatchPrompt:
    nz = np.argwhere(mask)
    lo, hi = nz.min(0).astype(float), nz.max(0).astype(float)
    jitter = rng.uniform(-2, 2, size=(2, 3))
    return PatchPrompt("box", True, np.stack([lo + jitter[0], hi + jitter[1]]))


def _box2d(mask, rng) -> PatchPrompt:
    axis, index, sl = _slice_through(mask, rng)
    nz = np.argwhere(sl)
    lo, hi = nz.min(0).astype(float), nz.max(0).astype(float)
    jitter = rng.uniform(-2, 2, size=(2, 2))
    corners = np.stack([lo + jitter[0], hi + jitter[1]])
    return PatchPrompt("box", True, _lift(corners, axis, index))


def _scribble_on(mask2d: np.ndarray, axis: int, index: int, positive: bool, rng) -> Optional[PatchPrompt]:
    skel = skeletonize(mask2d)
    pts = np.argwhere(skel)
    if len(pts) == 0:
        pts = np.argwhere(mask2d)
    if len(pts) == 0:
        return None
    if len(pts) > 8 and rng.random() < 0.5:  # a partial stroke: the part near a random skeleton point
        centre = pts[rng.integers(len(pts))]
        d = np.linalg.norm(pts - centre, axis=1)
        pts = pts[d <= np.quantile(d, rng.uniform(0.3, 1.0))]
    return PatchPrompt("scribble", positive, _lift(pts, axis, index))


def _scribble(mask, rng) -> Optional[PatchPrompt]:
    axis, index, sl = _slice_through(mask, rng)
    return _scribble_on(sl, axis, index, True, rng)


def _outline(sl: np.ndarray, rng) -> Optional[np.ndarray]:
    """A hand-drawn outline of the largest contour of a 2D mask: up to about 40 jittered vertices."""
    contours = find_contours(np.pad(sl, 1).astype(float), 0.5)
    if not contours:
        return None
    contour = max(contours, key=len)[:-1] - 1.0
    step = max(1, len(contour) // 40)
    verts = contour[::step] + rng.normal(0, 0.4, size=contour[::step].shape)
    return verts if len(verts) >= 3 else None


def _lasso(mask, rng, positive: bool = True) -> Optional[PatchPrompt]:
    axis, index, sl = _slice_through(mask, rng)
    grow = int(rng.integers(0, 3))
    if grow:
        sl = ndimage.binary_dilation(sl, iterations=grow)
    verts = _outline(sl, rng)
    return None if verts is None else PatchPrompt("lasso", positive, _lift(verts, axis, index))


def _correction_lasso(region: np.ndarray, positive: bool, rng) -> Optional[PatchPrompt]:
    """A lasso drawn tightly around the error ``region`` on a slice of a random orientation through
    it (negative around a spill, positive around a missed part), or ``None`` where the filled
    outline would not be mostly that error."""
    axis, index, sl = _slice_through(region, rng)
    if sl.sum() < 6:
        return None
    verts = _outline(sl, rng)
    if verts is None:
        return None
    lasso = PatchPrompt("lasso", positive, _lift(verts, axis, index))
    filled = np.zeros(region.shape, bool)
    rasterize.fill_planar_polygon(filled, lasso.coords)  # on the slice's plane: the slice's voxels
    filled = np.take(filled, index, axis=axis)
    if (filled & ~ndimage.binary_dilation(sl)).sum() > LASSO_OFF_ERROR_SHARE * filled.sum():
        return None
    return lasso


def first_prompt(
    mask: np.ndarray,
    rng: np.random.Generator,
    kinds: Sequence[str] = FIRST_KINDS,
    weights: Optional[Mapping[str, float]] = None,
) -> PatchPrompt:
    """A first prompt of one of ``kinds``, drawn with ``weights`` (kind -> weight; default
    :data:`FIRST_KIND_WEIGHTS`), renormalised over ``kinds``."""
    table = weights if weights is not None else dict(zip(FIRST_KINDS, FIRST_KIND_WEIGHTS))
    p = np.asarray([float(table.get(k, 0.0)) for k in kinds])
    if not p.sum() > 0:  # none of these kinds has weight: draw them evenly
        p = np.ones(len(kinds))
    kind = rng.choice(list(kinds), p=p / p.sum())
    prompt: Optional[PatchPrompt] = None
    if kind == "box3d":
        prompt = _box3d(mask, rng)
    elif kind == "box2d":
        prompt = _box2d(mask, rng)
    elif kind == "scribble":
        prompt = _scribble(mask, rng)
    elif kind == "lasso":
        prompt = _lasso(mask, rng)
    if prompt is None and "point" not in kinds:
        prompt = _box3d(mask, rng)
    if prompt is None:
        point = interior_point(mask, rng, exact=rng.random() < 0.5)
        prompt = PatchPrompt("point", True, point[None])
    return prompt


def largest_error(target: np.ndarray, prediction: np.ndarray):
    """(component mask, positive?) of the largest connected error region, or (None, None)."""
    best, best_size, best_positive = None, 0, None
    for positive, err in ((True, target & ~prediction), (False, prediction & ~target)):
        if not err.any():
            continue
        labels, n = ndimage.label(err)
        sizes = np.bincount(labels.ravel())[1:]
        k = int(np.argmax(sizes))
        if sizes[k] > best_size:
            best, best_size, best_positive = labels == (k + 1), sizes[k], positive
    return best, best_positive


def correction_prompt(
    target: np.ndarray,
    prediction: np.ndarray,
    rng: np.random.Generator,
    scribble_share: float = CORRECTION_SCRIBBLE_SHARE,
    lasso_share: float = 0.0,
) -> Optional[PatchPrompt]:
    """A correction of the largest error region: with probability ``scribble_share`` a scribble on
    it, with probability ``lasso_share`` a lasso around it (both on a slice through it, for a region
    of more than 20 voxels), else a click at its most interior voxel. Negative where the region is
    a spill. (The trainers pass :data:`CORRECTION_LASSO_SHARE`.)"""
    region, positive = largest_error(target, prediction)
    if region is None:
        return None
    draw = rng.random()
    if draw < scribble_share + lasso_share and region.sum() > 20:
        if draw < scribble_share:
            axis, index, sl = _slice_through(region, rng)
            drawn = _scribble_on(sl, axis, index, bool(positive), rng)
        else:
            drawn = _correction_lasso(region, bool(positive), rng)
        if drawn is not None:
            return drawn
    point = interior_point(region, rng, exact=rng.random() < 0.7, one_component=True)
    return PatchPrompt("point", bool(positive), point[None])


def corrupt_mask(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible imperfect previous mask: eroded or dilated, shifted, with a piece missing or extra."""
    out = mask.copy()
    op = rng.integers(4)
    it = int(rng.integers(1, 4))
    if op == 0:
        out = ndimage.binary_erosion(out, iterations=it)
    elif op == 1:
        out = ndimage.binary_dilation(out, iterations=it)
    elif op == 2:
        out = np.roll(out, tuple(int(s) for s in rng.integers(-3, 4, size=3)), axis=(0, 1, 2))
    if rng.random() < 0.5:
        centre = np.argwhere(mask)[rng.integers(mask.sum())]
        r = rng.uniform(3, 10)
        grid = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
        ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= r * r
        out = out & ~ball if rng.random() < 0.5 else out | ball
    return out


def starting_point(
    mask: np.ndarray,
    rng: np.random.Generator,
    kinds: Sequence[str] = FIRST_KINDS,
    corrupt_share: float = 0.0,
    weights: Optional[Mapping[str, float]] = None,
    scribble_share: float = CORRECTION_SCRIBBLE_SHARE,
    lasso_share: float = 0.0,
) -> Tuple[List[PatchPrompt], Optional[np.ndarray]]:
    """How a training sample begins: (prompts, previous mask or ``None``).

    Usually a first prompt on an empty mask; with probability ``corrupt_share`` an imperfect previous
    mask instead (as after an earlier session or a pre-segmentation) with a correction at its largest
    error, half the time after the first prompt. ``weights``/``scribble_share``/``lasso_share``: see
    :func:`first_prompt` and :func:`correction_prompt`.
    """
    prompts = [first_prompt(mask, rng, kinds, weights)]
    if rng.random() >= corrupt_share:
        return prompts, None
    prior = corrupt_mask(mask, rng)
    correction = correction_prompt(mask, prior, rng, scribble_share, lasso_share)
    prompts = ([] if rng.random() < 0.5 else prompts) + ([correction] if correction else [])
    if not prompts:
        prompts = [first_prompt(mask, rng, kinds, weights)]
    return prompts, prior
