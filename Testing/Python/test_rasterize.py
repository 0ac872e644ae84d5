"""Filling lassos: the nonzero winding rule, so a self-overlapping freehand outline leaves no holes."""

import numpy as np
import pytest
from scipy import ndimage

from SegAssistLib import rasterize


def _spiral_kji(turns: float, inward: float, n_per_turn: int = 200, radius: float = 22.0) -> np.ndarray:
    """An outline on slice z = 2 of a (5, 60, 60) grid going round ``turns`` times, drifting
    ``inward`` voxels towards the centre over its length (a hand-drawn lasso)."""
    t = np.arange(int(round(n_per_turn * turns))) * (2 * np.pi / n_per_turn)
    r = radius - inward * t / max(t[-1], 1.0)
    return np.stack([np.full_like(t, 2.0), 30 + r * np.sin(t), 30 + r * np.cos(t)], 1)


def _fill(vertices_kji, shape=(5, 60, 60)) -> np.ndarray:
    out = np.zeros(shape, bool)
    rasterize.fill_planar_polygon(out, vertices_kji)
    return out


def test_a_lasso_whose_end_overshoots_its_start_fills_its_whole_interior():
    """The even-odd rule left the area the outline went round twice empty: a crescent of 46 voxels
    for this quarter-turn overshoot."""
    lasso = _fill(_spiral_kji(1.25, 4.0))
    sl = lasso[2]
    assert not lasso[[0, 1, 3, 4]].any()
    assert np.array_equal(ndimage.binary_fill_holes(sl), sl)  # no hole anywhere
    yy, xx = np.mgrid[:60, :60]
    assert sl[(yy - 30) ** 2 + (xx - 30) ** 2 <= 17**2].all()  # the disc inside the innermost turn


@pytest.mark.parametrize("turns", [1.08, 1.5, 2.0])
def test_a_circle_drawn_round_more_than_once_fills_as_drawn_once(turns):
    once = _fill(_spiral_kji(1.0, 0.0))
    again = _fill(_spiral_kji(turns, 0.0))
    assert np.array_equal(again, once)
    assert np.array_equal(_fill(_spiral_kji(turns, 0.0)[::-1]), once)  # clockwise too


def test_a_figure_eight_fills_both_lobes_and_not_the_gap_between():
    bowtie = [[2, 10, 10], [2, 50, 50], [2, 10, 50], [2, 50, 10]]  # [z, y, x]: lobes left and right
    sl = _fill(bowtie)[2]
    assert sl[30, 15] and sl[30, 45] and sl[20:41, 12].all() and sl[20:41, 48].all()
    assert not sl[15, 30] and not sl[45, 30]


def _star_polygon(rng, n: int, radius: float) -> np.ndarray:
    angle = np.sort(rng.uniform(0, 2 * np.pi, n))
    angle = angle[np.r_[True, np.diff(angle) > 1e-3]]
    gaps = np.diff(np.r_[angle, angle[0] + 2 * np.pi])
    if gaps.max() >= np.pi:  # keep the centre inside: a star-shaped, hence simple, polygon
        angle = np.linspace(0, 2 * np.pi, len(angle), endpoint=False) + angle[0]
    r = rng.uniform(0.3, 1.0, len(angle)) * radius
    return np.stack([r * np.cos(angle), r * np.sin(angle)], 1)


def test_simple_polygons_fill_as_with_the_even_odd_rule_either_way_round():
    """Training and evaluation draw simple polygons: their fill must not change."""
    rng = np.random.default_rng(7)
    grid = np.stack(np.meshgrid(np.arange(-30, 30.5, 0.5), np.arange(-30, 30.5, 0.5)), -1).reshape(-1, 2)
    for trial in range(40):
        polygon = _star_polygon(rng, int(rng.integers(3, 40)), 25.0) + rng.uniform(-2, 2, 2)
        for poly in (polygon, polygon[::-1]):
            nonzero = rasterize.points_in_polygon(grid, poly, "nonzero")
            assert np.array_equal(nonzero, rasterize.points_in_polygon(grid, poly, "even-odd")), trial
        assert np.array_equal(nonzero, rasterize.points_in_polygon(grid, polygon, "nonzero"))


def test_simple_lassos_on_any_plane_fill_the_voxels_of_the_even_odd_rule(monkeypatch):
    rng = np.random.default_rng(11)
    cases = []
    for trial in range(12):
        normal = rng.normal(size=3) if trial % 2 else np.eye(3)[trial % 3]
        normal /= np.linalg.norm(normal)
        e1 = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(normal, e1)
        poly = _star_polygon(rng, int(rng.integers(3, 30)), 14.0)
        verts = 16.0 + poly[:, :1] * e1 + poly[:, 1:] * e2
        cases.append(np.round(verts * 2) / 2 if trial % 4 == 0 else verts)
    nonzero = [_fill(v, (32, 32, 32)) for v in cases]
    reversed_ = [_fill(v[::-1], (32, 32, 32)) for v in cases]
    even_odd = rasterize.points_in_polygon
    monkeypatch.setattr(rasterize, "points_in_polygon", lambda xy, poly, rule="even-odd": even_odd(xy, poly))
    for trial, (verts, got, back) in enumerate(zip(cases, nonzero, reversed_)):
        expected = _fill(verts, (32, 32, 32))
        assert expected.sum() > 20 and np.array_equal(got, expected) and np.array_equal(back, expected), trial


def test_points_in_polygon_refuses_an_unknown_rule():
    with pytest.raises(ValueError, match="fill rule"):
        rasterize.points_in_polygon(np.zeros((1, 2)), np.eye(3)[:, :2], "winding")
