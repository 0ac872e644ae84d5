"""Drawing prompt geometry into voxel grids. Torch-free (numpy).

Every function takes coordinates in the target grid's array order ``[z, y, x]`` (continuous voxel
indices, voxel centres at integers) and writes into a boolean array of that grid. The engine uses
them on model patches (prompt coordinates mapped through the patch's affine), the evaluation code on
full images.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


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


def draw_polyline(out: np.ndarray, points: Sequence[Sequence[float]], radius: float = 0.0) -> None:
    """Mark the voxels a polyline passes through, thickened to ``radius``."""
    samples = polyline_samples(points)
    offsets = _ball_offsets(max(radius, 0.0))
    _scatter(out, (np.rint(samples)[:, None, :] + offsets[None]).reshape(-1, 3))


def fill_box(out: np.ndarray, lo: Sequence[float], hi: Sequence[float]) -> None:
    """Fill the voxels whose centres lie in ``[lo, hi]`` (at least one voxel thick on every axis)."""
    lo_i = np.maximum(np.floor(np.asarray(lo, float) + 0.5).astype(int), 0)
    hi_i = np.ceil(np.asarray(hi, float) - 0.5).astype(int) + 1
    hi_i = np.maximum(hi_i, lo_i + 1)
    hi_i = np.minimum(hi_i, out.shape)
    if np.any(hi_i <= lo_i):
        return
    out[lo_i[0] : hi_i[0], lo_i[1] : hi_i[1], lo_i[2] : hi_i[2]] = True


def points_in_polygon(xy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Even-odd rule test of many 2D points against one polygon (vertices in order)."""
    x, y = xy[:, 0][:, None], xy[:, 1][:, None]
    px, py = polygon[:, 0][None], polygon[:, 1][None]
    qx, qy = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    crosses = (py > y) != (qy > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = px + (y - py) * (qx - px) / (qy - py)
    return np.logical_xor.reduce(crosses & (x < x_at), axis=1)


def fill_planar_polygon(out: np.ndarray, vertices: Sequence[Sequence[float]]) -> None:
    """Fill a closed polygon that lies on a plane of any orientation, one voxel thick.

    The voxels kept form the standard digital plane (centre within ``|n|_1 / 2`` of the polygon's
    plane, which leaves no 6-connected gaps on oblique planes) and project inside the polygon.
    The outline itself is drawn too, so thin polygons never vanish.
    """
    verts = np.asarray(vertices, float).reshape(-1, 3)
    centre = verts.mean(0)
    _, _, vt = np.linalg.svd(verts - centre)
    u, v, normal = vt[0], vt[1], vt[2]
    lo = np.maximum(np.floor(verts.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(verts.max(0)).astype(int) + 2, out.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1
    ).reshape(-1, 3)
    rel = grid - centre
    near_plane = np.abs(rel @ normal) <= 0.5 * np.abs(normal).sum() + 1e-9
    candidates = grid[near_plane]
    rel = rel[near_plane]
    polygon_2d = np.stack([(verts - centre) @ u, (verts - centre) @ v], 1)
    inside = points_in_polygon(np.stack([rel @ u, rel @ v], 1), polygon_2d)
    _scatter(out, candidates[inside])
    draw_polyline(out, np.concatenate([verts, verts[:1]]))
