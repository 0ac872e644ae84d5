"""Simulated interactions in patch coordinates, for training.

A simulated annotator gives a first prompt of a random kind (click, 3D box, 2D box, scribble,
lasso), then corrections at the largest error, the rule the evaluation protocol uses, so the
network learns to answer the prompts users and benchmarks actually give.
"""

from __future__ import annotations

from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours
from skimage.morphology import skeletonize

from SegAssistLib.engine.encoding import PatchPrompt
from SegAssistLib.evaluation.simulator import largest_component, most_interior_voxel

FIRST_KINDS = ("point", "box3d", "box2d", "scribble", "lasso")
FIRST_KIND_WEIGHTS = (0.45, 0.13, 0.14, 0.14, 0.14)
CORRECTION_SCRIBBLE_SHARE = 0.15  # corrections drawn as a scribble rather than a click
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


def _lasso(mask, rng, positive: bool = True) -> Optional[PatchPrompt]:
    axis, index, sl = _slice_through(mask, rng)
    grow = int(rng.integers(0, 3))
    if grow:
        sl = ndimage.binary_dilation(sl, iterations=grow)
    contours = find_contours(np.pad(sl, 1).astype(float), 0.5)
    if not contours:
        return None
    contour = max(contours, key=len)[:-1] - 1.0
    step = max(1, len(contour) // 40)
    verts = contour[::step] + rng.normal(0, 0.4, size=contour[::step].shape)
    if len(verts) < 3:
        return None
    return PatchPrompt("lasso", positive, _lift(verts, axis, index))


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
) -> Optional[PatchPrompt]:
    """A click (a scribble with probability ``scribble_share``) at the most interior voxel of the
    largest error region."""
    region, positive = largest_error(target, prediction)
    if region is None:
        return None
    if rng.random() < scribble_share and region.sum() > 20:
        axis, index, sl = _slice_through(region, rng)
        scribble = _scribble_on(sl, axis, index, bool(positive), rng)
        if scribble is not None:
            return scribble
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
) -> Tuple[List[PatchPrompt], Optional[np.ndarray]]:
    """How a training sample begins: (prompts, previous mask or ``None``).

    Usually a first prompt on an empty mask; with probability ``corrupt_share`` an imperfect previous
    mask instead (as after an earlier session or a pre-segmentation) with a correction at its largest
    error, half the time after the first prompt. ``weights``/``scribble_share``: see
    :func:`first_prompt` and :func:`correction_prompt`.
    """
    prompts = [first_prompt(mask, rng, kinds, weights)]
    if rng.random() >= corrupt_share:
        return prompts, None
    prior = corrupt_mask(mask, rng)
    correction = correction_prompt(mask, prior, rng, scribble_share)
    prompts = ([] if rng.random() < 0.5 else prompts) + ([correction] if correction else [])
    if not prompts:
        prompts = [first_prompt(mask, rng, kinds, weights)]
    return prompts, prior
