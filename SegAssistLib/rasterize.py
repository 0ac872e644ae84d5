"""Drawing prompt geometry into voxel grids. Torch-free (numpy).

Every function takes coordinates in the target grid's array order ``[z, y, x]`` (continuous voxel
indices, voxel centres at integers) and writes into a boolean array of that grid. The engine uses
them on model patches (prompt coordinates mapped through the patch's affine), the evaluation code on
full images.

Memory is bounded whatever the coordinates: polylines, polygon candidates and the inside test are
handled in chunks of at most :data:`CHUNK_ROWS` rows, so no working array grows with the length of
a stroke or the size of a polygon's bounding box (the voxels drawn are the same as in one pass).
Time is bounded too: a polygon reaching far past the grid is clipped to the grid (widened by
:data:`POLYGON_CLIP_MARGIN`) before its outline is drawn (:func:`clip_polygon_to_box`).
"""

from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import numpy as np

CHUNK_ROWS = 1 << 18  # points (or candidate voxels) a chunked rasteriser handles at once: ~6 MB per (N, 3) array
#: voxels: a polygon with a vertex farther than this past the grid it is filled on is first clipped to the
#: grid widened by this much (:func:`fill_planar_polygon`): its outline was drawn every half voxel along its
#: whole length, so a lasso with vertices 1e7 voxels out took half a minute, and one at 1e19 never ended.
#: Polygons within it (every lasso drawn on an image) are filled exactly as they always were.
POLYGON_CLIP_MARGIN = 4096.0


def _ball_offsets(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    grid = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1].reshape(3, -1).T
    return grid[(grid**2).sum(1) <= radius**2 + 1e-6]


def ball_offsets_mm(radius_vox: float, spacing_kji: Sequence[float]) -> np.ndarray:
    """``(N, 3)`` integer offsets within ``radius_vox`` voxels of the finest axis, measured in mm,
    on a grid of ``spacing_kji`` (a coarse axis gets fewer offsets, none where it is coarser than
    the radius)."""
    spacing = np.asarray(spacing_kji, float)
    radius_mm = radius_vox * float(spacing.min())
    reach = np.floor(radius_mm / spacing + 1e-9).astype(int)
    grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij"), -1).reshape(-1, 3)
    return grid[np.sum((grid * spacing) ** 2, axis=1) <= radius_mm**2 + 1e-9]


def _scatter(out: np.ndarray, coords: np.ndarray) -> None:
    if len(coords) == 0:
        return
    coords = np.rint(coords).astype(np.int64)
    inside = np.all((coords >= 0) & (coords < np.asarray(out.shape)), axis=1)
    c = coords[inside]
    out[c[:, 0], c[:, 1], c[:, 2]] = True


def draw_balls(out: np.ndarray, centres: Sequence[Sequence[float]], radius: float) -> None:
    """Mark a ball of ``radius`` voxels around each centre (at least the nearest voxel)."""
    centres = np.asarray(centres, float).reshape(-1, 3)
    if len(centres) == 0:
        return
    offsets = _ball_offsets(max(radius, 0.0))
    _scatter(out, (np.rint(centres)[:, None, :] + offsets[None]).reshape(-1, 3))


def polyline_samples(points: Sequence[Sequence[float]], step: float = 0.5) -> np.ndarray:
    """Points along a polyline, at most ``step`` voxels apart (the vertices included)."""
    pts = np.asarray(points, float).reshape(-1, 3)
    if len(pts) == 1:
        return pts
    samples = [pts[:1]]
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        t = np.arange(1, n + 1)[:, None] / n
        samples.append(a + t * (b - a))
    return np.concatenate(samples)


def polyline_sample_count(points: Sequence[Sequence[float]], step: float = 0.5) -> float:
    """How many points :func:`polyline_samples` returns, without making them (``inf`` when a
    segment is too long for a float)."""
    pts = np.asarray(points, float).reshape(-1, 3)
    if len(pts) <= 1:
        return len(pts)
    total = 1
    for a, b in zip(pts[:-1], pts[1:]):
        ratio = np.linalg.norm(b - a) / step
        if not np.isfinite(ratio):
            return float("inf")
        total += max(1, int(np.ceil(ratio)))
    return total


def polyline_sample_chunks(
    points: Sequence[Sequence[float]], step: float = 0.5, rows: int = CHUNK_ROWS
) -> Iterator[np.ndarray]:
    """:func:`polyline_samples` in consecutive pieces of at most about ``2 * rows`` points (the same
    points, bit for bit, in the same order), so that a long polyline never lies in memory at once."""
    pts = np.asarray(points, float).reshape(-1, 3)
    rows = max(1, int(rows))
    pending, count = [pts[:1]], min(len(pts), 1)
    for a, b in zip(pts[:-1], pts[1:]):
        n = max(1, int(np.ceil(np.linalg.norm(b - a) / step)))
        for first in range(1, n + 1, rows):
            t = np.arange(first, min(first + rows, n + 1))[:, None] / n
            pending.append(a + t * (b - a))
            count += len(t)
            if count >= rows:
                yield np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield np.concatenate(pending)


def draw_polyline(out: np.ndarray, points: Sequence[Sequence[float]], radius: float = 0.0) -> None:
    """Mark the voxels a polyline passes through, thickened to ``radius`` (in chunks of samples)."""
    offsets = _ball_offsets(max(radius, 0.0))
    for samples in polyline_sample_chunks(points, 0.5, max(1, CHUNK_ROWS // len(offsets))):
        _scatter(out, (np.rint(samples)[:, None, :] + offsets[None]).reshape(-1, 3))


def fill_box(out: np.ndarray, lo: Sequence[float], hi: Sequence[float]) -> None:
    """Fill the voxels the box ``[lo, hi]`` overlaps (a voxel spans its centre +- 0.5; at least one
    voxel thick on every axis)."""
    first = np.floor(np.asarray(lo, float) + 0.5).astype(int)
    stop = np.maximum(np.ceil(np.asarray(hi, float) - 0.5).astype(int) + 1, first + 1)
    # clipped to ``out`` only now: a box wholly before ``out`` (a window) must not reach its first plane
    lo_i, hi_i = np.maximum(first, 0), np.minimum(stop, out.shape)
    if np.any(hi_i <= lo_i):
        return
    out[lo_i[0] : hi_i[0], lo_i[1] : hi_i[1], lo_i[2] : hi_i[2]] = True


def points_in_polygon(xy: np.ndarray, polygon: np.ndarray, rule: str = "even-odd") -> np.ndarray:
    """Whether many 2D points lie inside one polygon (vertices in order), by ``rule``:

    ``"even-odd"``: inside where a ray crosses the outline an odd number of times. ``"nonzero"``:
    inside where the outline winds around the point (each crossing counts +1 or -1 by the edge's
    direction, inside where the sum is not 0): an area a self-overlapping outline goes around twice
    (a freehand lasso whose end overshoots its start) is inside, not a hole. The two agree on every
    simple polygon, whichever way round it is drawn (its winding number is 0 or +-1).

    A point's ray (towards +x) crosses an edge only where the point's y lies in the edge's
    half-open y range, so the points are sorted by y (a chunk of :data:`CHUNK_ROWS` at a time) and
    each edge is tested against the run of points in its range only: memory stays bounded and the
    work is the number of (point, crossed edge) pairs, not points times vertices. The crossing test
    is the same float expression for every pair, so the answer is that of a dense test.
    """
    if rule not in ("even-odd", "nonzero"):
        raise ValueError(f"unknown fill rule {rule!r}: 'even-odd' or 'nonzero'")
    xy = np.asarray(xy, float).reshape(-1, 2)
    poly = np.asarray(polygon, float).reshape(-1, 2)
    px, py = poly[:, 0], poly[:, 1]
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    edges = np.flatnonzero(py != qy)  # a horizontal edge is crossed by no ray
    y_low, y_high = np.minimum(py, qy)[edges], np.maximum(py, qy)[edges]
    upward = (qy > py)[edges]
    inside = np.zeros(len(xy), bool)
    for start in range(0, len(xy), CHUNK_ROWS):
        chunk = xy[start : start + CHUNK_ROWS]
        order = np.argsort(chunk[:, 1], kind="stable")
        xs, ys = chunk[order, 0], chunk[order, 1]
        first = np.searchsorted(ys, y_low, "left")  # (py > y) != (qy > y)  <=>  y_low <= y < y_high
        stop = np.searchsorted(ys, y_high, "left")
        if rule == "even-odd":
            odd = np.zeros(len(ys), bool)
        else:
            winding = np.zeros(len(ys), np.int32)  # at most MAX_STROKE_VERTICES crossings either way
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for e in np.flatnonzero(stop > first):
                i, lo, hi = edges[e], first[e], stop[e]
                x_at = px[i] + (ys[lo:hi] - py[i]) * (qx[i] - px[i]) / (qy[i] - py[i])
                crossed = xs[lo:hi] < x_at
                if rule == "even-odd":
                    odd[lo:hi] ^= crossed
                elif upward[e]:
                    winding[lo:hi] += crossed
                else:
                    winding[lo:hi] -= crossed
        inside[start + order] = odd if rule == "even-odd" else winding != 0
    return inside


def _near_plane_chunks(
    lo: np.ndarray, hi: np.ndarray, centre: np.ndarray, normal: np.ndarray, half: float
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The voxels of the box ``[lo, hi)`` whose centre ``g`` has ``|(g - centre) . normal| <= half``,
    and their ``g - centre``, in chunks of at most about :data:`CHUNK_ROWS` candidates.

    Along the axis nearest the normal, each column of the box meets that layer in a short run
    (``2 * half / |n_axis|`` voxels, at most about 3 for a unit normal): only a window around it is
    tested, with the exact expression of a dense test, so the result is the same.
    """
    axis = int(np.argmax(np.abs(normal)))
    b_axis, c_axis = [a for a in range(3) if a != axis]
    ext = hi - lo
    n_axis = float(normal[axis])
    reach = half / abs(n_axis)
    # slack for float rounding in the window's centre (none for coordinates of realistic size)
    scale = float(np.abs(centre).max() + np.abs(hi).max() + 1.0)
    slack = 2 + int(np.ceil(1e-12 * scale)) if np.isfinite(scale) else int(ext[axis])
    width = int(min(int(np.ceil(2 * reach)) + 2 * slack + 1, int(ext[axis])))
    n_columns = int(ext[b_axis] * ext[c_axis])
    per_chunk = max(1, CHUNK_ROWS // width)
    steps = np.arange(width, dtype=np.int64)
    for c0 in range(0, n_columns, per_chunk):
        b, c = np.unravel_index(np.arange(c0, min(c0 + per_chunk, n_columns)), (int(ext[b_axis]), int(ext[c_axis])))
        gb, gc = b + lo[b_axis], c + lo[c_axis]
        rest = (gb - centre[b_axis]) * normal[b_axis] + (gc - centre[c_axis]) * normal[c_axis]
        middle = centre[axis] - rest / n_axis  # where the column crosses the plane
        with np.errstate(invalid="ignore"):
            start = np.floor(np.nan_to_num(middle - reach, posinf=hi[axis], neginf=lo[axis])) - slack
        start = np.clip(start, lo[axis], hi[axis] - width).astype(np.int64)
        grid = np.empty((len(start), width, 3), np.int64)
        grid[..., axis] = start[:, None] + steps
        grid[..., b_axis] = gb[:, None]
        grid[..., c_axis] = gc[:, None]
        grid = grid.reshape(-1, 3)
        rel = grid - centre
        near = np.abs(rel @ normal) <= half
        yield grid[near], rel[near]


def _clip_half_space(poly: np.ndarray, axis: int, bound: float, below: bool) -> np.ndarray:
    """One Sutherland-Hodgman step: the closed polygon ``poly`` ``(N, 3)`` cut to the half-space
    ``x[axis] <= bound`` (``below``) or ``x[axis] >= bound``. Each crossing point is interpolated from
    the edge's end nearer the bound (the other may lie 1e19 voxels away) and put on the bound exactly."""
    x = poly[:, axis]
    inside = x <= bound if below else x >= bound
    if inside.all() or not inside.any():
        return poly if inside.all() else poly[:0]
    nxt = np.roll(poly, -1, axis=0)
    crossing = inside != np.roll(inside, -1)
    p, q = poly[crossing], nxt[crossing]
    with np.errstate(over="ignore", invalid="ignore"):
        t = (bound - p[:, axis]) / (q[:, axis] - p[:, axis])
        from_p = p + t[:, None] * (q - p)
        from_q = q + (1.0 - t)[:, None] * (p - q)
    point = np.where((t <= 0.5)[:, None], from_p, from_q)
    point[:, axis] = bound
    rows = np.zeros((len(poly), 2, 3))
    rows[:, 0] = poly
    rows[crossing, 1] = point
    keep = np.stack([inside, crossing], axis=1)  # each vertex kept, then the crossing of its edge
    return rows[keep]


def clip_polygon_to_box(vertices: Sequence[Sequence[float]], lo: Sequence[float], hi: Sequence[float]) -> np.ndarray:
    """The part of a closed polygon ``(N, 3)`` inside the box ``lo <= x <= hi``, as a closed polygon
    (Sutherland-Hodgman, one of the box's six half-spaces at a time); empty when none.

    A planar polygon stays planar, and every point inside the box keeps its winding number (what
    is cut away, with the piece of the box's face that replaces it, is a loop outside the box), so
    both fill rules of :func:`points_in_polygon` answer there as for the whole polygon.
    """
    poly = np.asarray(vertices, float).reshape(-1, 3)
    for axis in range(3):
        for bound, below in ((float(lo[axis]), False), (float(hi[axis]), True)):
            if len(poly):
                poly = _clip_half_space(poly, axis, bound, below)
    return poly


def fill_planar_polygon(out: np.ndarray, vertices: Sequence[Sequence[float]]) -> None:
    """Fill a closed polygon that lies on a plane of any orientation, one voxel thick.

    The voxels kept form the standard digital plane (centre within ``|n|_1 / 2`` of the polygon's
    plane, which leaves no 6-connected gaps on oblique planes) and project inside the polygon by the
    nonzero winding rule (:func:`points_in_polygon`): where a hand-drawn outline overlaps itself
    (its end overshooting its start) the area it goes around twice is filled, not left a hole.
    The outline itself is drawn too, so thin polygons never vanish. The bounding box (clipped to
    ``out``) is scanned in chunks of columns, so memory does not grow with its size. A polygon with
    a vertex more than :data:`POLYGON_CLIP_MARGIN` voxels past ``out`` is clipped to ``out`` widened
    by that margin first (on its own plane), so the time does not grow with how far it reaches.
    """
    verts = np.asarray(vertices, float).reshape(-1, 3)
    centre = verts.mean(0)
    _, _, vt = np.linalg.svd(verts - centre, full_matrices=len(verts) < 3)  # V only: no (n, n) U
    u, v, normal = vt[0], vt[1], vt[2]
    reach_lo = np.full(3, -POLYGON_CLIP_MARGIN)
    reach_hi = np.asarray(out.shape, float) - 1.0 + POLYGON_CLIP_MARGIN
    if np.any(verts < reach_lo) or np.any(verts > reach_hi):
        verts = clip_polygon_to_box(verts, reach_lo, reach_hi)
        if len(verts) < 3:  # the plane misses the widened grid, or only touches its faces: nothing near out
            return
        near = verts.mean(0)
        centre = near - float((near - centre) @ normal) * normal  # the same plane, through a point near out
    # bounds in float before the cast: a vertex beyond int64 (1e19) wrapped to the other side
    lo = np.maximum(np.floor(verts.min(0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(verts.max(0)) + 2, out.shape).astype(int)
    if np.any(hi <= lo):
        return
    polygon_2d = np.stack([(verts - centre) @ u, (verts - centre) @ v], 1)
    half = 0.5 * np.abs(normal).sum() + 1e-9
    for candidates, rel in _near_plane_chunks(lo, hi, centre, normal, half):
        inside = points_in_polygon(np.stack([rel @ u, rel @ v], 1), polygon_2d, "nonzero")
        _scatter(out, candidates[inside])
    draw_polyline(out, np.concatenate([verts, verts[:1]]))
