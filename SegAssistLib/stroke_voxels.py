"""The voxels of a stroke drawn on a slice: a scribble's polyline with its width, a lasso's filled
polygon. Torch-free (numpy).

Coordinates are in array order ``[k, j, i]`` (continuous voxel indices, voxel centres at integers),
as :func:`~SegAssistLib.prompts.prompt_vertices_kji` gives a prompt's. The voxels are those of a
stroke's slab form (:func:`~SegAssistLib.prompts.to_slab`); the line and polygon drawing itself is
:mod:`SegAssistLib.rasterize`'s. Whatever a client sends, drawing a stroke takes bounded memory and
time: a stroke beyond :mod:`SegAssistLib.prompt_limits` is refused before it is drawn.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable, Hashable, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib import rasterize
from SegAssistLib.errors import PromptError
from SegAssistLib.prompt_limits import MAX_SCRIBBLE_POINTS, MAX_SCRIBBLE_SAMPLES, MAX_SLAB_AXIS, MAX_SLAB_VOXELS

if TYPE_CHECKING:  # types only: prompts imports this module
    from SegAssistLib.prompts import LassoPrompt, ScribblePrompt

_SCRIBBLE_CHUNK_POINTS = 2**18  # points rounded at once: ~6 MB per working array

#: bytes of voxel lists each process keeps of the strokes it drew (:func:`scribble_voxels`) and, apart,
#: of the slabs it decoded (:meth:`~SegAssistLib.prompts.Slab.voxels_kji`): 24 bytes a voxel, so a
#: cache counted in entries (or a list held on each prompt for a session's life) grew without bound
VOXEL_CACHE_BYTES = 64 << 20


class ByteBudgetCache:
    """Bytes values made once per key and kept while their total size, with what their keys hold,
    stays within ``max_bytes`` (the least recently used go first); a value above a quarter of it is
    made each time it is asked for and never kept. Thread-safe: a server's sessions share one."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Hashable, Tuple[bytes, int]] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """What the kept values and their keys hold, as counted."""
        return self._held

    def get(self, key: Hashable, make: Callable[[], bytes], key_bytes: int = 0) -> bytes:
        """The value of ``key``, made by ``make()`` when not kept; ``key_bytes``: what the key holds."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found[0]
        value = make()  # outside the lock: another thread's lookups do not wait for it
        size = len(value) + int(key_bytes)
        if size <= self.max_bytes // 4:
            with self._lock:
                if key not in self._items:
                    self._items[key] = (value, size)
                    self._held += size
                    while self._held > self.max_bytes:
                        self._held -= self._items.popitem(last=False)[1][1]
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._held = 0


def _stroke_plane_axes(verts_kji: np.ndarray, normal_kji: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Two orthonormal in-plane directions of the slice a polyline was drawn on.

    The slice of ``normal_kji`` when given. Otherwise: vertices that share a coordinate lie on that
    axis-aligned slice (axial first, then coronal, sagittal), else the best-fit plane. A straight
    oblique stroke does not define its slice: the plane through it closest to an axis-aligned one is used.
    """
    eye = np.eye(3)
    flat = [axis for axis in range(3) if np.ptp(verts_kji[:, axis]) < 1e-6]
    if normal_kji is not None:
        normal = np.asarray(normal_kji, float) / np.linalg.norm(normal_kji)
    elif flat:
        normal = eye[flat[0]]
    else:
        centred = verts_kji - verts_kji.mean(0)
        _, sv, vt = np.linalg.svd(centred, full_matrices=False)
        if len(sv) == 3 and sv[1] > 1e-6 * max(sv[0], 1.0):
            normal = vt[2]
        else:  # collinear: the plane holding the line whose normal is nearest an axis
            direction = vt[0]
            axis = int(np.argmin(np.abs(direction)))
            normal = eye[axis] - direction * direction[axis]
            normal /= np.linalg.norm(normal)
    u = np.cross(normal, eye[int(np.argmin(np.abs(normal)))])
    u /= np.linalg.norm(u)
    return u, np.cross(normal, u)


def _disc_coefficients(width: float) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """In-plane coordinates of the points that widen each sample of a stroke of ``width``: a disc on
    the half-voxel grid centred on the sample, so a stroke widens by the same amount on both sides
    whatever its width (None below width 2, where the disc holds the sample alone)."""
    radius = (width - 1.0) / 2.0
    half_steps = int(np.floor(2.0 * radius + 1e-9)) if radius > 0 else 0
    if half_steps == 0:
        return None
    steps = 0.5 * np.arange(-half_steps, half_steps + 1)
    a, b = np.meshgrid(steps, steps, indexing="ij")
    keep = a**2 + b**2 <= radius**2 + 1e-9
    return a[keep], b[keep]


_TIE_NUDGE = 1e-9  # voxels: see _scribble_disc


def _scribble_disc(verts_kji: np.ndarray, width: float, normal_kji: Optional[np.ndarray] = None) -> np.ndarray:
    """Offsets (array order) of the points that widen each sample of a stroke: a disc of the
    stroke's width in the slice it was drawn on (one zero offset at width 1).

    Each offset is nudged towards the disc's centre by far less than any coordinate's precision,
    so that a point half-way between two voxels rounds to the one nearer the sample: otherwise
    rounding (half to even) made a stroke on an even row wider or narrower than one on an odd row.
    """
    coefficients = _disc_coefficients(width)
    if coefficients is None:
        return np.zeros((1, 3))
    u, v = _stroke_plane_axes(verts_kji, normal_kji)
    a, b = coefficients
    disc = a[:, None] * u + b[:, None] * v
    return disc - _TIE_NUDGE * np.sign(disc)


def _scribble_budget_error(verts: np.ndarray, width: float) -> Optional[str]:
    """Why a polyline of ``width`` is beyond :data:`MAX_SCRIBBLE_SAMPLES` or :data:`MAX_SCRIBBLE_POINTS`
    (None when within both): the work and memory of :func:`_scribble_voxels` follow these counts."""
    coefficients = _disc_coefficients(width)
    n_disc = 1 if coefficients is None else len(coefficients[0])
    n_samples = rasterize.polyline_sample_count(verts, step=0.5)
    n_points = n_samples * n_disc
    if n_samples <= MAX_SCRIBBLE_SAMPLES and n_points <= MAX_SCRIBBLE_POINTS:
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        length = float(np.sum(np.linalg.norm(np.diff(verts, axis=0), axis=1)))
    return (
        f"scribble too large to rasterise: {n_samples} samples (every half voxel along its {length:.0f} voxels, "
        f"{len(verts)} vertices) x {n_disc} points of its width {width:g} = {n_points} points, above the limits of "
        f"MAX_SCRIBBLE_SAMPLES = {MAX_SCRIBBLE_SAMPLES} samples and MAX_SCRIBBLE_POINTS = {MAX_SCRIBBLE_POINTS} "
        "points; draw a shorter or thinner stroke"
    )


def _scribble_voxels(verts_kji: np.ndarray, width: float, normal_kji: Optional[np.ndarray] = None) -> np.ndarray:
    """Voxels (array order) of a polyline with its width, thickened within the slice it was drawn on.

    The line's voxels are the ones the engines, the baselines and the scribble simulator take for
    "the voxels a polyline passes through": its points every half voxel, rounded to the nearest
    voxel. Every one of them, and every point of the width's disc, lies on the slice's plane, so the
    voxels form a digital plane (one voxel thick along the slice normal).

    The samples are widened and rounded in chunks (``_SCRIBBLE_CHUNK_POINTS`` points), so memory
    stays bounded; a stroke of more than :data:`MAX_SCRIBBLE_SAMPLES` samples, or more than
    :data:`MAX_SCRIBBLE_POINTS` samples times disc points, is refused with a :class:`PromptError`.
    Returns the sorted unique voxels, shape ``(N, 3)``.
    """
    verts_kji = np.asarray(verts_kji, float).reshape(-1, 3)
    problem = _scribble_budget_error(verts_kji, width)
    if problem:
        raise PromptError(problem)
    radius = max((width - 1.0) / 2.0, 0.0)
    disc = _scribble_disc(verts_kji, width, normal_kji)
    if len(disc) == 0 or len(verts_kji) == 0:
        return np.zeros((0, 3), np.int64)
    # Each voxel becomes one int64 key in a box holding every point (the samples lie between the
    # vertices, the disc within the radius); a sort of keys is a sort of rows, (k, j, i) order.
    base = np.floor(verts_kji.min(0) - radius) - 2
    top = np.ceil(verts_kji.max(0) + radius) + 2
    keyed = bool(np.all(np.abs(np.concatenate([base, top])) < 2.0**52))
    if keyed:
        lo = base.astype(np.int64)
        ext = (top - base + 1).astype(np.int64)
        keyed = int(ext[0]) * int(ext[1]) * int(ext[2]) < 2**62
    rows = max(1, _SCRIBBLE_CHUNK_POINTS // len(disc))
    widen = radius > 0
    merge = np.unique if keyed else (lambda rows_: np.unique(rows_, axis=0))
    found, pending, n_pending = [], [], 0  # found: the unique voxels so far (0 or 1 array)
    for samples in rasterize.polyline_sample_chunks(verts_kji, step=0.5, rows=rows):
        points = (samples[:, None, :] + disc[None]).reshape(-1, 3) if widen else samples
        voxels = np.rint(points).astype(np.int64)
        del points
        if keyed:
            voxels -= lo
            voxels = (voxels[:, 0] * ext[1] + voxels[:, 1]) * ext[2] + voxels[:, 2]
        # else: coordinates beyond 2**52, rows compared directly (slower, same voxels)
        pending.append(merge(voxels))
        n_pending += len(pending[-1])
        if n_pending > max(_SCRIBBLE_CHUNK_POINTS, len(found[0]) if found else 0):  # merged: memory ~ the result
            found, pending, n_pending = [merge(np.concatenate(found + pending))], [], 0
    keys = merge(np.concatenate(found + pending))
    del found, pending
    if not keyed:
        return keys
    out = np.empty((len(keys), 3), np.int64)
    out[:, 2] = keys % ext[2]
    keys //= ext[2]
    out[:, 1] = keys % ext[1]
    keys //= ext[1]
    out[:, 0] = keys
    out += lo
    return out


def _lasso_box(
    verts_kji: np.ndarray, image_shape: Sequence[int], slab_limits: bool = True
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """A filled planar polygon, outline included (``fill_planar_polygon``), drawn on a grid the size
    of its bounding box (clipped to the image) only: (the boolean box, its offset), or None when the
    box misses the image.

    With ``slab_limits``, raises :class:`PromptError` before drawing when the polygon's voxels could
    not fit a slab (:data:`MAX_SLAB_AXIS`, :data:`MAX_SLAB_VOXELS`): the voxel nearest each vertex
    inside the image is drawn, so their extent is a lower bound of the slab's box.
    """
    shape = np.asarray(image_shape, np.int64)
    # clipped in float before the cast: a vertex beyond int64 (1e19) wrapped, and a lasso enclosing
    # the image was refused as lying outside it
    lo = np.maximum(np.floor(verts_kji.min(0)) - 1, 0).astype(np.int64)
    hi = np.minimum(np.ceil(verts_kji.max(0)) + 2, shape).astype(np.int64)
    if np.any(hi <= lo):
        return None
    held = verts_kji[np.all((verts_kji >= 0) & (verts_kji <= shape - 1), axis=1)]
    if slab_limits and len(held):
        # a margin of a voxel for rounding: the voxel drawn nearest a vertex is within 0.5 (+ float error)
        least = np.maximum(np.ceil(held.max(0) - 0.51) - np.floor(held.min(0) + 0.51) + 1, 1).astype(np.int64)
        if np.any(least > MAX_SLAB_AXIS) or int(np.prod(least)) > MAX_SLAB_VOXELS:
            raise PromptError(
                f"the lasso cannot be made a slab: its voxels span at least {least.tolist()} (array order k, j, i), "
                f"too large: at most {MAX_SLAB_AXIS} voxels along an axis and {MAX_SLAB_VOXELS} in its box"
            )
    local = np.zeros(tuple(hi - lo), bool)
    rasterize.fill_planar_polygon(local, verts_kji - lo)
    return local, lo


def _lasso_voxels(verts_kji: np.ndarray, image_shape: Sequence[int], slab_limits: bool = True) -> np.ndarray:
    """Voxels (array order) of a filled planar polygon, outline included (``fill_planar_polygon``),
    drawn on a grid the size of its bounding box (clipped to the image) only."""
    drawn = _lasso_box(verts_kji, image_shape, slab_limits)
    if drawn is None:
        return np.zeros((0, 3), np.int64)
    local, lo = drawn
    return np.argwhere(local) + lo


def stroke_voxels_in_image(prompt: Union[ScribblePrompt, LassoPrompt], image_shape: Sequence[int]) -> np.ndarray:
    """The voxels (array order ``[k, j, i]``, ``(N, 3)``) a scribble or lasso covers in the image of
    ``image_shape``: its slab's, or for the points form those its slab would hold
    (:func:`~SegAssistLib.prompts.to_slab`: a scribble's with its width, a lasso's polygon filled,
    outline included, both cropped to the image). Unlike a slab, not bounded by the slab's size
    limits: an oblique lasso across a whole CT covers a larger box than a slab may hold."""
    if prompt.slab is not None:
        return prompt.slab.voxels_kji()
    shape = np.asarray(tuple(image_shape), np.int64)
    if prompt.kind == "lasso":
        return _lasso_voxels(np.asarray(prompt.points, float)[:, ::-1], shape, slab_limits=False)
    voxels = scribble_voxels(prompt)
    return voxels[np.all((voxels >= 0) & (voxels < shape), axis=1)]


def scribble_voxels(prompt: ScribblePrompt) -> np.ndarray:
    """The voxels (array order ``[k, j, i]``, not clipped to any image, read-only) of a scribble in
    points form with its width, as :func:`~SegAssistLib.prompts.to_slab` draws them; drawn once per
    stroke while they fit :data:`VOXEL_CACHE_BYTES` with the other strokes'.

    Kept by the stroke's content, not on the (frozen) prompt, so that copies, equality and pickles
    of prompts stay as they are: the engine draws every earlier stroke again in each window of each
    click, and the edge snap once more."""
    points = tuple(tuple(float(x) for x in p) for p in prompt.points)
    normal = None if prompt.normal is None else tuple(float(x) for x in prompt.normal)
    width = float(prompt.width)
    key_bytes = _KEY_BYTES_PER_VERTEX * len(points)
    held = _STROKE_VOXELS.get((points, width, normal), lambda: _stroke_voxel_bytes(points, width, normal), key_bytes)
    return np.frombuffer(held, np.int64).reshape(-1, 3)


_STROKE_VOXELS = ByteBudgetCache(VOXEL_CACHE_BYTES)
_KEY_BYTES_PER_VERTEX = 128  # a vertex as a tuple of 3 Python floats


def _stroke_voxel_bytes(
    points: Tuple[Tuple[float, ...], ...], width: float, normal: Optional[Tuple[float, ...]]
) -> bytes:
    normal_kji = None if normal is None else np.asarray(normal, float)[::-1]
    return _scribble_voxels(np.asarray(points, float)[:, ::-1], width, normal_kji).astype(np.int64).tobytes()
