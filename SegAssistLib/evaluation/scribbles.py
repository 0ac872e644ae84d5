"""Simulated scribbles: a stroke a user would draw on one slice through the object, in any orientation.

How a scribble is made (deterministic for a given ``seed``):

1. **The plane.** ``axial``, ``coronal`` and ``sagittal`` are the image's own slices (array axes
   ``k``, ``j`` and ``i``; they are the anatomical planes when the image was acquired axially with a
   near-identity direction). The slice is the one nearest the object's centre of mass that holds the
   object. ``oblique`` is a plane through the centre of mass whose normal is tilted
   ``OBLIQUE_TILT_DEG`` away from the slice axis, about an in-plane axis drawn from ``seed`` (or the
   ``normal`` given); the object is resampled on it (nearest neighbour, pixels as large as the finest
   voxel side), so every pixel of the section is the voxel the engines' rasterisers will hit.
2. **The stroke.** On the largest 8-connected piece of the section: either the longest path of its
   skeleton (``skeleton``: a centre-line stroke), or the longest path along the outline of the
   piece shrunk by ``CONTOUR_INSET`` of its half-thickness (``contour``: about half the outline,
   drawn just inside the border, as users trace a boundary). Where one gives a dot (the skeleton
   of a round section) or nothing (the outline of a thin one), the other is used.
3. **Jitter.** A smooth random displacement (Gaussian noise smoothed along the stroke, standard
   deviation ``jitter_mm``), clamped at each vertex to twice ``jitter_mm`` and to its distance from
   the section's border minus one pixel, so that a wobbly hand does not leave the object.
4. **Check.** The polyline is sampled as the engines rasterise it (every half voxel, rounded to the
   nearest voxel); if a sample falls outside the object the jitter is halved (three times, then
   dropped), and as a last resort the longest run of vertices whose segments stay inside is kept.
   A positive scribble therefore always lies inside the object.

Points come out as continuous voxel coordinates ``(i, j, k)``; on an oblique plane they are not
integers (a :class:`~SegAssistLib.prompts.ScribblePrompt` is any 3D polyline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import dijkstra

from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import ScribblePrompt
from SegAssistLib.rasterize import polyline_samples

ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
SOURCES = ("skeleton", "contour")
OBLIQUE_TILT_DEG = 35.0
CONTOUR_INSET = 0.35
_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # array axis normal to the slice ([k, j, i])
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class ScribbleSpec:
    """How the simulated user draws the first scribble of the scribble-then-clicks protocol."""

    orientation: str = "axial"
    source: str = "skeleton"
    jitter_mm: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.orientation not in ORIENTATIONS:
            raise ValueError(
                f"unknown scribble orientation {self.orientation!r} (choose from {', '.join(ORIENTATIONS)})"
            )
        if self.source not in SOURCES:
            raise ValueError(f"unknown scribble source {self.source!r} (choose from {', '.join(SOURCES)})")
        if self.jitter_mm < 0:
            raise ValueError("scribble jitter must not be negative")

    def to_dict(self) -> dict:
        return {"orientation": self.orientation, "source": self.source, "jitter_mm": self.jitter_mm, "seed": self.seed}


@dataclass
class Section:
    """A planar section of the object: a 2D mask and the map from its pixels to voxel ``[k, j, i]``.

    ``origin`` is the voxel coordinate of pixel (0, 0); moving one pixel along rows (columns) adds
    ``row_step`` (``col_step``) in voxels; ``pixel_mm`` is the pixel's (row, column) size in mm.
    """

    mask: np.ndarray
    origin: np.ndarray
    row_step: np.ndarray
    col_step: np.ndarray
    pixel_mm: Tuple[float, float]
    orientation: str

    def to_voxels(self, rc: np.ndarray) -> np.ndarray:
        rc = np.asarray(rc, float).reshape(-1, 2)
        return self.origin + rc[:, :1] * self.row_step + rc[:, 1:] * self.col_step


def _spacing_kji(spacing: Sequence[float]) -> np.ndarray:
    sp = np.asarray([float(s) for s in spacing], float)
    if sp.shape != (3,) or np.any(sp <= 0):
        raise ValueError(f"spacing must be 3 positive numbers (i, j, k), got {spacing}")
    return sp[::-1]


def axis_section(target: np.ndarray, spacing: Sequence[float], orientation: str) -> Section:
    """The image slice normal to ``orientation``'s axis nearest the object's centre of mass."""
    axis = _AXIS[orientation]
    sp = _spacing_kji(spacing)
    centre = ndimage.center_of_mass(target)[axis]
    others = tuple(a for a in range(3) if a != axis)
    holding = np.flatnonzero(target.any(axis=others))
    index = int(holding[np.argmin(np.abs(holding - centre))])  # first of equals: the lower slice
    origin = np.zeros(3)
    origin[axis] = index
    row_step, col_step = np.zeros(3), np.zeros(3)
    row_step[others[0]] = 1.0
    col_step[others[1]] = 1.0
    return Section(
        mask=np.take(target, index, axis=axis),
        origin=origin,
        row_step=row_step,
        col_step=col_step,
        pixel_mm=(float(sp[others[0]]), float(sp[others[1]])),
        orientation=orientation,
    )


def oblique_normal(seed: int, tilt_deg: float = OBLIQUE_TILT_DEG) -> np.ndarray:
    """Unit normal (physical, ``[k, j, i]`` order) tilted ``tilt_deg`` from the slice axis ``k``."""
    angle = np.random.default_rng(seed).uniform(0.0, 2.0 * np.pi)
    tilt = np.deg2rad(tilt_deg)
    return np.array([np.cos(tilt), np.sin(tilt) * np.sin(angle), np.sin(tilt) * np.cos(angle)])


def oblique_section(target: np.ndarray, spacing: Sequence[float], normal_kji: Sequence[float]) -> Section:
    """The object resampled on the plane through its centre of mass with the given physical normal."""
    sp = _spacing_kji(spacing)
    n = np.asarray(normal_kji, float)
    if n.shape != (3,) or not np.isfinite(n).all() or np.linalg.norm(n) == 0:
        raise ValueError(f"the oblique plane's normal must be a non-zero 3-vector, got {normal_kji}")
    n = n / np.linalg.norm(n)
    helper = np.eye(3)[int(np.argmin(np.abs(n)))]
    u = np.cross(n, helper)
    u /= np.linalg.norm(u)
    v = np.cross(n, u)
    h = float(sp.min())
    centre_mm = np.asarray(ndimage.center_of_mass(target)) * sp
    voxels_mm = np.argwhere(target) * sp - centre_mm
    a, b = voxels_mm @ u, voxels_mm @ v
    a0, a1 = int(np.floor(a.min() / h)) - 1, int(np.ceil(a.max() / h)) + 1
    b0, b1 = int(np.floor(b.min() / h)) - 1, int(np.ceil(b.max() / h)) + 1
    rows, cols = np.mgrid[a0 : a1 + 1, b0 : b1 + 1]
    points_mm = centre_mm + (rows[..., None] * h) * u + (cols[..., None] * h) * v
    index = np.rint(points_mm / sp).astype(np.int64)
    inside = np.all((index >= 0) & (index < np.asarray(target.shape)), axis=-1)
    mask = np.zeros(rows.shape, bool)
    hit = index[inside]
    mask[inside] = target[hit[:, 0], hit[:, 1], hit[:, 2]]
    origin = (centre_mm + a0 * h * u + b0 * h * v) / sp
    return Section(mask, origin, h * u / sp, h * v / sp, (h, h), "oblique")


def longest_path(curve: np.ndarray, pixel_mm: Tuple[float, float]) -> np.ndarray:
    """Pixels ``(row, col)`` of the longest shortest path through a thin 2D curve, in order."""
    pix = np.argwhere(curve)
    n = len(pix)
    if n <= 1:
        return pix
    index = -np.ones(curve.shape, np.int64)
    index[tuple(pix.T)] = np.arange(n)
    rows, cols, weights = [], [], []
    h, w = curve.shape
    for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):
        r2, c2 = pix[:, 0] + dr, pix[:, 1] + dc
        ok = (r2 >= 0) & (r2 < h) & (c2 >= 0) & (c2 < w)
        src = np.flatnonzero(ok)
        dst = index[r2[ok], c2[ok]]
        keep = dst >= 0
        rows.append(src[keep])
        cols.append(dst[keep])
        weights.append(np.full(int(keep.sum()), np.hypot(dr * pixel_mm[0], dc * pixel_mm[1])))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    d0 = dijkstra(graph, directed=False, indices=0)
    far = int(np.argmax(np.where(np.isfinite(d0), d0, -1)))
    dist, pred = dijkstra(graph, directed=False, indices=far, return_predecessors=True)
    end = int(np.argmax(np.where(np.isfinite(dist), dist, -1)))
    path = [end]
    while path[-1] != far:
        path.append(int(pred[path[-1]]))
    return pix[path[::-1]]


def _largest_piece(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(mask.shape, bool)
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def _outline_path(piece: np.ndarray, pixel_mm: Tuple[float, float]) -> Optional[np.ndarray]:
    """About half the outline of the piece shrunk by ``CONTOUR_INSET`` of its half-thickness."""
    depth = ndimage.distance_transform_edt(np.pad(piece, 1), sampling=pixel_mm)[1:-1, 1:-1]
    inset = max(CONTOUR_INSET * float(depth.max()), max(pixel_mm))
    shrunk = _largest_piece(depth > inset)
    if shrunk.sum() < 4:
        return None  # too thin for an outline inside it
    outline = shrunk & ~ndimage.binary_erosion(shrunk, border_value=0)
    return longest_path(_largest_piece(outline), pixel_mm)


def _skeleton_path(piece: np.ndarray, pixel_mm: Tuple[float, float]) -> np.ndarray:
    from skimage.morphology import skeletonize  # here: `segassist --help` and the client run without it

    skeleton = skeletonize(piece)
    return longest_path(skeleton if skeleton.any() else piece, pixel_mm)


def stroke_path(piece: np.ndarray, pixel_mm: Tuple[float, float], source: str) -> np.ndarray:
    """The unjittered stroke (pixel ``(row, col)`` in order) on one 2D piece.

    Each source falls back on the other where it gives fewer than three pixels: a round section has
    a one-pixel skeleton (then the stroke follows the inner outline), a thin one has no outline
    inside it (then the stroke follows the centre line).
    """
    first, second = (_outline_path, _skeleton_path) if source == "contour" else (_skeleton_path, _outline_path)
    path = first(piece, pixel_mm)
    if path is None or len(path) < 3:
        other = second(piece, pixel_mm)
        if other is not None and (path is None or len(other) > len(path)):
            path = other
    return path


def _jitter(path: np.ndarray, depth_mm: np.ndarray, pixel_mm: Tuple[float, float], jitter_mm: float,
            rng: np.random.Generator) -> np.ndarray:
    """Smoothly displaced vertices (pixel units), each kept closer to its pixel than the border."""
    pts = path.astype(float)
    if jitter_mm <= 0 or len(pts) < 2:
        return pts
    noise = rng.normal(size=pts.shape)
    noise = ndimage.gaussian_filter1d(noise, sigma=max(1.0, len(pts) / 8.0), axis=0, mode="nearest")
    noise /= max(float(noise.std()), 1e-9)
    shift_mm = noise * jitter_mm
    room = np.clip(depth_mm[path[:, 0], path[:, 1]] - max(pixel_mm), 0.0, 2.0 * jitter_mm)
    norm = np.linalg.norm(shift_mm, axis=1)
    scale = np.minimum(1.0, room / np.maximum(norm, 1e-9))
    return pts + shift_mm * scale[:, None] / np.asarray(pixel_mm)


def _segment_inside(a: np.ndarray, b: np.ndarray, target: np.ndarray) -> bool:
    index = np.rint(polyline_samples(np.stack([a, b]))).astype(np.int64)
    if np.any(index < 0) or np.any(index >= np.asarray(target.shape)):
        return False
    return bool(target[index[:, 0], index[:, 1], index[:, 2]].all())


def _inside_run(points_kji: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The longest run of consecutive vertices whose segments all stay inside the object."""
    ok = [_segment_inside(a, b, target) for a, b in zip(points_kji[:-1], points_kji[1:])]
    best, start = (0, 0), 0
    for i, good in enumerate(ok + [False]):
        if not good:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = i + 1
    return points_kji[best[0] : best[1] + 1]


def make_section(target: np.ndarray, spacing: Sequence[float], orientation: str, seed: int = 0,
                 normal: Optional[Sequence[float]] = None) -> Section:
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown scribble orientation {orientation!r} (choose from {', '.join(ORIENTATIONS)})")
    if orientation != "oblique":
        return axis_section(target, spacing, orientation)
    normal_kji = oblique_normal(seed) if normal is None else np.asarray(normal, float)[::-1]
    section = oblique_section(target, spacing, normal_kji)
    if not section.mask.any():  # a thin object the plane grazes between voxel centres
        # the object's shape, not the caller's mistake: the target is skipped with this reason
        raise PromptError("no oblique scribble: the plane through the object's centre of mass misses it")
    return section


def simulate_scribble(
    target: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    orientation: str = "axial",
    source: str = "skeleton",
    jitter_mm: float = 0.0,
    seed: int = 0,
    width: float = 1.0,
    normal: Optional[Sequence[float]] = None,
) -> ScribblePrompt:
    """A positive scribble inside ``target`` (array ``[k, j, i]``); see the module docstring.

    ``normal`` (oblique only) is the plane's normal as a physical direction in ``(i, j, k)`` order.
    """
    target = np.asarray(target) > 0
    if not target.any():
        raise ValueError("scribble_prompt: the target is empty")
    if source not in SOURCES:
        raise ValueError(f"unknown scribble source {source!r} (choose from {', '.join(SOURCES)})")
    if jitter_mm < 0:
        raise ValueError("jitter_mm must not be negative")
    section = make_section(target, spacing, orientation, seed, normal)
    piece = _largest_piece(section.mask)
    path = stroke_path(piece, section.pixel_mm, source)
    depth = ndimage.distance_transform_edt(np.pad(piece, 1), sampling=section.pixel_mm)[1:-1, 1:-1]
    points = section.to_voxels(path)
    for attempt in range(5):
        amplitude = jitter_mm / 2**attempt if attempt < 4 else 0.0
        rng = np.random.default_rng(seed)
        candidate = section.to_voxels(_jitter(path, depth, section.pixel_mm, amplitude, rng))
        if len(candidate) == 1 or all(
            _segment_inside(a, b, target) for a, b in zip(candidate[:-1], candidate[1:])
        ):
            points = candidate
            break
    else:
        points = _inside_run(points, target)
    normal = np.cross(section.row_step, section.col_step)[::-1]  # the section's slice, (i, j, k): as Slicer sends it
    return ScribblePrompt(
        points=[tuple(float(x) for x in p[::-1]) for p in points], positive=True, width=width,
        normal=tuple(float(x) for x in normal),
    )  # fmt: skip
