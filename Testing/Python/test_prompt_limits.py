"""Limits on what a prompt may ask of the rasterisers: bounded memory whatever a client sends, the
same voxels as before for every stroke within the limits, and clear errors naming the limit."""

from __future__ import annotations

import base64
import json
import tracemalloc
import zlib

import numpy as np
import pytest

from SegAssistLib import rasterize, stroke_voxels
from SegAssistLib.errors import PromptError
from SegAssistLib.prompt_limits import (
    MAX_MASK_VOXELS,
    MAX_SCRIBBLE_POINTS,
    MAX_SCRIBBLE_SAMPLES,
    MAX_SLAB_VOXELS,
    MAX_STROKE_VERTICES,
)
from SegAssistLib.prompts import LassoPrompt, MaskPrompt, ScribblePrompt, Slab, parse_prompt, to_slab

MEMORY_LIMIT = 200e6  # bytes: what any one rasterisation below may hold at its peak


def _peak_bytes(fn, *args):
    """(fn's result or the exception it raised, the peak bytes traced while it ran)."""
    tracemalloc.start()
    try:
        try:
            result = fn(*args)
        except Exception as exc:  # the refusal is the result
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- the previous algorithms, kept as references (their memory grows with the input) -------------


def _old_scribble_voxels(verts_kji: np.ndarray, width: float) -> np.ndarray:
    points = rasterize.polyline_samples(verts_kji, step=0.5)
    radius = (width - 1.0) / 2.0
    if radius > 0:
        u, v = stroke_voxels._stroke_plane_axes(verts_kji)
        half_steps = int(np.floor(2 * radius + 1e-9))  # the disc's grid is centred on each sample
        steps = 0.5 * np.arange(-half_steps, half_steps + 1)
        a, b = np.meshgrid(steps, steps, indexing="ij")
        keep = a**2 + b**2 <= radius**2 + 1e-9
        disc = a[keep][:, None] * u + b[keep][:, None] * v
        disc -= 1e-9 * np.sign(disc)  # half-way points round towards the sample
        points = (points[:, None, :] + disc[None]).reshape(-1, 3)
    return np.unique(np.rint(points).astype(np.int64), axis=0)


def _old_points_in_polygon(xy: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0][:, None], xy[:, 1][:, None]
    px, py = polygon[:, 0][None], polygon[:, 1][None]
    qx, qy = np.roll(polygon[:, 0], -1)[None], np.roll(polygon[:, 1], -1)[None]
    crosses = (py > y) != (qy > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = px + (y - py) * (qx - px) / (qy - py)
    return np.logical_xor.reduce(crosses & (x < x_at), axis=1)


def _old_fill_planar_polygon(out: np.ndarray, vertices) -> None:
    verts = np.asarray(vertices, float).reshape(-1, 3)
    centre = verts.mean(0)
    _, _, vt = np.linalg.svd(verts - centre)
    u, v, normal = vt[0], vt[1], vt[2]
    lo = np.maximum(np.floor(verts.min(0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(verts.max(0)).astype(int) + 2, out.shape)
    if np.any(hi <= lo):
        return
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1).reshape(-1, 3)
    rel = grid - centre
    near_plane = np.abs(rel @ normal) <= 0.5 * np.abs(normal).sum() + 1e-9
    candidates = grid[near_plane]
    rel = rel[near_plane]
    polygon_2d = np.stack([(verts - centre) @ u, (verts - centre) @ v], 1)
    inside = _old_points_in_polygon(np.stack([rel @ u, rel @ v], 1), polygon_2d)
    rasterize._scatter(out, candidates[inside])
    samples = rasterize.polyline_samples(np.concatenate([verts, verts[:1]]))
    rasterize._scatter(out, np.rint(samples))


# --- random strokes and polygons on axis-aligned and oblique planes ---------------------------------


def _plane(rng, oblique: bool):
    normal = rng.normal(size=3) if oblique else np.eye(3)[rng.integers(3)]
    normal = normal / np.linalg.norm(normal)
    e1 = np.cross(normal, [1.0, 0.0, 0.0] if abs(normal[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(normal, e1)


def _stroke(rng, n: int, oblique: bool, centre, spread: float) -> np.ndarray:
    e1, e2 = _plane(rng, oblique)
    st = np.cumsum(rng.normal(scale=spread, size=(n, 2)), axis=0)
    return np.asarray(centre, float) + st[:, :1] * e1 + st[:, 1:] * e2


def _polygon(rng, n: int, oblique: bool, centre, radius: float) -> np.ndarray:
    e1, e2 = _plane(rng, oblique)
    angle = np.sort(rng.uniform(0, 2 * np.pi, n))
    r = rng.uniform(0.2, 1.0, n) * radius
    return np.asarray(centre, float) + (r * np.cos(angle))[:, None] * e1 + (r * np.sin(angle))[:, None] * e2


# --- scribbles ----------------------------------------------------------------------------------------


def _zigzag_json(n_vertices: int, shape_ijk, width: float, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    pts = np.round(rng.uniform(0, 1, (n_vertices, 3)) * (np.asarray(shape_ijk) - 1), 1)
    return json.dumps({"kind": "scribble", "points": pts.tolist(), "width": width})


def test_a_hostile_thick_zigzag_scribble_is_refused_naming_the_limit_without_memory():
    # 5,000 vertices zig-zagging across a 48 x 40 x 24 image at width 20: ~19 GB for the old rasteriser
    body = _zigzag_json(5000, (48, 40, 24), 20.0)
    error, peak = _peak_bytes(parse_prompt, body)
    assert isinstance(error, PromptError), error
    assert "MAX_SCRIBBLE_POINTS" in str(error) and str(MAX_SCRIBBLE_POINTS) in str(error)
    assert peak < MEMORY_LIMIT
    # the rasteriser itself refuses it too (a caller that built the polyline without a prompt)
    verts = np.asarray(json.loads(body)["points"], float)[:, ::-1]
    error, peak = _peak_bytes(stroke_voxels._scribble_voxels, verts, 20.0)
    assert isinstance(error, PromptError) and "MAX_SCRIBBLE_POINTS" in str(error)
    assert peak < MEMORY_LIMIT


def test_a_thin_stroke_beyond_the_sample_limit_is_refused():
    pts = [(0.0, 0.0, 0.0), (MAX_SCRIBBLE_SAMPLES / 2 + 10.0, 0.0, 0.0)]  # one segment, > the limit of samples
    with pytest.raises(PromptError, match="MAX_SCRIBBLE_SAMPLES"):
        parse_prompt({"kind": "scribble", "points": pts, "width": 1.0})


@pytest.mark.parametrize("width, planar", [(20.0, True), (20.0, False), (1.0, False), (3.0, False)])
def test_the_largest_accepted_scribble_rasterises_in_bounded_memory(width, planar):
    """A stroke just within the limits (a zig-zag, across the plane or, worse, in 3D) stays far
    below the memory limit; the old rasteriser held every point at once (~200 MB at width 20)."""
    rng = np.random.default_rng(3)
    n_disc = len(stroke_voxels._scribble_disc(np.eye(3), width))
    budget = min(MAX_SCRIBBLE_SAMPLES, MAX_SCRIBBLE_POINTS // n_disc)
    span = 400.0 if width > 1 else 2000.0
    pts, n = [rng.uniform(0, span, 3)], 1
    while True:
        q = rng.uniform(0, span, 3)
        if planar:
            q[0] = pts[0][0]
        step = rasterize.polyline_sample_count([pts[-1], q])
        if n + step - 1 > budget:
            break
        pts.append(q)
        n += step - 1
    prompt = ScribblePrompt(points=[tuple(p[::-1]) for p in pts], width=width)  # within the limits
    verts = np.asarray(prompt.points, float)[:, ::-1]
    voxels, peak = _peak_bytes(stroke_voxels._scribble_voxels, verts, width)
    assert not isinstance(voxels, Exception), voxels
    assert n > budget * 0.75 and len(voxels) > 0
    assert peak < MEMORY_LIMIT, f"{peak / 1e6:.0f} MB"


@pytest.mark.parametrize("chunk", [1, 97, 5000, stroke_voxels._SCRIBBLE_CHUNK_POINTS])
def test_scribble_voxels_are_those_of_the_previous_rasteriser(monkeypatch, chunk):
    monkeypatch.setattr(stroke_voxels, "_SCRIBBLE_CHUNK_POINTS", chunk)
    rng = np.random.default_rng(chunk)
    for trial in range(24):
        width = float(rng.choice([1.0, 1.5, 1.8, 2.0, 3.0, 4.5, 7.0, 12.3, 20.0]))
        verts = _stroke(rng, int(rng.integers(1, 25)), oblique=trial % 2 == 1, centre=(20, 30, 40), spread=6.0)
        if trial % 3 == 0:
            verts = np.round(verts * 2) / 2  # vertices on half voxels: rounding ties
        expected = _old_scribble_voxels(verts, width)
        got = stroke_voxels._scribble_voxels(verts, width)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial} width {width}")


def test_a_realistic_long_thick_oblique_scribble_keeps_its_voxels_and_its_slab():
    rng = np.random.default_rng(11)
    verts_kji = _stroke(rng, 300, oblique=True, centre=(150, 200, 200), spread=2.5)  # ~1,000 voxels long
    expected = _old_scribble_voxels(verts_kji, 20.0)
    np.testing.assert_array_equal(stroke_voxels._scribble_voxels(verts_kji, 20.0), expected)
    # to_slab: the old slab was the box of these voxels, cropped to the image
    shape = np.array([300, 400, 400])
    prompt = ScribblePrompt(points=[tuple(p) for p in verts_kji[:, ::-1]], width=20.0)
    inside = expected[np.all((expected >= 0) & (expected < shape), axis=1)]
    lo = inside.min(0)
    box = np.zeros(tuple(inside.max(0) - lo + 1), bool)
    box[tuple((inside - lo).T)] = True
    assert to_slab(prompt, shape).slab == Slab.from_mask(box, lo)


def test_polyline_chunks_and_count_match_the_samples():
    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 40):
        verts = rng.uniform(-5, 60, (n, 3))
        samples = rasterize.polyline_samples(verts)
        assert rasterize.polyline_sample_count(verts) == len(samples)
        for rows in (1, 3, 64, 10**6):
            chunks = list(rasterize.polyline_sample_chunks(verts, 0.5, rows))
            assert max(len(c) for c in chunks) < 2 * rows + 1
            np.testing.assert_array_equal(np.concatenate(chunks), samples)


# --- lassos -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 13, 1000, rasterize.CHUNK_ROWS])
def test_filled_polygon_voxels_are_those_of_the_previous_rasteriser(monkeypatch, chunk):
    monkeypatch.setattr(rasterize, "CHUNK_ROWS", chunk)
    rng = np.random.default_rng(chunk)
    for trial in range(16):
        shape = tuple(int(n) for n in rng.integers(10, 36, 3))
        centre = rng.uniform(0, 1, 3) * shape
        verts = _polygon(rng, int(rng.integers(3, 40)), oblique=trial % 2 == 1, centre=centre, radius=20.0)
        if trial % 4 == 0:
            verts = np.round(verts * 2) / 2
        expected = np.zeros(shape, bool)
        _old_fill_planar_polygon(expected, verts)
        got = np.zeros(shape, bool)
        rasterize.fill_planar_polygon(got, verts)
        np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")
        xy = np.round(rng.uniform(-25, 25, (300, 2)), 1)
        polygon = np.round(rng.uniform(-25, 25, (int(rng.integers(3, 30)), 2)))  # shared ys: ties on rows
        np.testing.assert_array_equal(rasterize.points_in_polygon(xy, polygon), _old_points_in_polygon(xy, polygon))


def test_a_lasso_slab_is_the_one_of_the_previous_rasteriser():
    rng = np.random.default_rng(2)
    shape = (30, 40, 50)
    for trial in range(8):
        verts_kji = _polygon(rng, 30, oblique=trial % 2 == 1, centre=(15, 20, 25), radius=18.0)
        prompt = LassoPrompt(points=[tuple(p) for p in verts_kji[:, ::-1]])
        lo = np.maximum(np.floor(verts_kji.min(0)).astype(np.int64) - 1, 0)  # the old _lasso_voxels' grid
        hi = np.minimum(np.ceil(verts_kji.max(0)).astype(np.int64) + 2, np.asarray(shape))
        local = np.zeros(tuple(hi - lo), bool)
        _old_fill_planar_polygon(local, verts_kji - lo)
        assert to_slab(prompt, shape).slab == Slab.from_mask(local, lo)


def test_a_lasso_of_the_most_vertices_over_a_large_slice_fills_in_bounded_memory():
    """16,384 vertices (a star: every ray crosses thousands of edges) around most of a 512 x 512
    slice. The old rasteriser held an (n x n) SVD factor (2 GB) and a candidates x vertices matrix
    (tens of GB)."""
    n = MAX_STROKE_VERTICES
    angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radius = np.where(np.arange(n) % 2 == 0, 240.0, 200.0)
    points = np.stack([256 + radius * np.cos(angle), 256 + radius * np.sin(angle), np.full(n, 300.0)], 1)
    prompt = LassoPrompt(points=[tuple(p) for p in points])
    slab, peak = _peak_bytes(to_slab, prompt, (600, 512, 512))
    assert not isinstance(slab, Exception), slab
    assert peak < MEMORY_LIMIT, f"{peak / 1e6:.0f} MB"
    voxels = slab.slab.voxels_kji()
    assert np.all(voxels[:, 0] == 300)
    assert len(voxels) > np.pi * 200**2  # the disc under the star's inner radius, at least
    assert slab.slab.to_box()[0, 256 - slab.slab.offset[1], 256 - slab.slab.offset[2]]  # its centre


def test_a_lasso_too_large_for_a_slab_is_refused_before_it_is_drawn():
    angle = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    tilt = np.array([1.0, 1.0, 0.3]) / np.linalg.norm([1.0, 1.0, 0.3])
    e1 = np.cross(tilt, [0.0, 0.0, 1.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(tilt, e1)
    verts = np.array([300.0, 256.0, 256.0]) + 240 * np.cos(angle)[:, None] * e1 + 240 * np.sin(angle)[:, None] * e2
    prompt = LassoPrompt(points=[tuple(p) for p in verts[:, ::-1]])
    error, peak = _peak_bytes(to_slab, prompt, (600, 512, 512))
    assert isinstance(error, PromptError) and "too large" in str(error) and str(MAX_SLAB_VOXELS) in str(error)
    assert peak < 10e6


@pytest.mark.parametrize("kind", ["scribble", "lasso"])
def test_too_many_vertices_are_refused_naming_the_cap(kind):
    angle = np.linspace(0, 2 * np.pi, MAX_STROKE_VERTICES + 1, endpoint=False)
    pts = np.stack([20 + 10 * np.cos(angle), 20 + 10 * np.sin(angle), np.full_like(angle, 5.0)], 1).tolist()
    with pytest.raises(PromptError, match=f"MAX_STROKE_VERTICES = {MAX_STROKE_VERTICES}"):
        parse_prompt({"kind": kind, "points": pts})
    assert parse_prompt({"kind": kind, "points": pts[:MAX_STROKE_VERTICES]}).kind == kind  # at the cap: fine


# --- masks and slabs ----------------------------------------------------------------------------------


def _mask(offset, shape, data=None):
    data = data or base64.b64encode(zlib.compress(b"\xff")).decode()
    return {"kind": "mask", "offset": list(offset), "shape": list(shape), "data": data}


@pytest.mark.parametrize(
    "offset, shape, field",
    [
        ((0, 0, 0), (-1, 5, 5), "mask shape"),
        ((0, 0, 0), (4, 0, 4), "mask shape"),
        ((0, -3, 0), (2, 2, 2), "mask offset"),
        ((0, 0, 2**31), (1, 1, 1), "mask offset"),
        ((0, 0, 0), (2**11, 2**11, 2**10), "too large"),
        ((0, 0, 0), (2**70, 1, 1), "mask"),
    ],
)
def test_a_mask_box_that_cannot_exist_is_refused_naming_the_field(offset, shape, field):
    with pytest.raises(PromptError, match=field):
        parse_prompt(_mask(offset, shape))


def test_the_mask_limit_allows_a_whole_large_image():
    assert MAX_MASK_VOXELS >= 512 * 512 * 600
    mask = MaskPrompt.model_validate(_mask((0, 0, 0), (512, 512, 600)))  # the box is valid; its data is not
    with pytest.raises(PromptError, match="initial mask data is truncated"):
        mask.to_array((512, 512, 600))


@pytest.mark.parametrize("shape, message", [((4, 4, 4), "truncated"), ((2, 2, 2), "more than the 8 bits")])
def test_mask_data_that_does_not_match_its_shape_is_a_prompt_error(shape, message):
    data = MaskPrompt.from_array(np.ones((2, 2, 3), np.uint8)).data  # 12 bits: two bytes
    mask = MaskPrompt(offset=(0, 0, 0), shape=shape, data=data)
    with pytest.raises(PromptError, match=message):
        mask.to_array((4, 4, 4))


def test_a_mask_outside_the_image_is_refused_before_its_data_is_read():
    mask = MaskPrompt(offset=(3, 0, 0), shape=(2, 2, 2), data="not base64 at all")
    with pytest.raises(PromptError, match="outside image"):
        mask.to_array((4, 4, 4))


@pytest.mark.parametrize(
    "field, value, message", [("offset", [2**70, 0, 0], "slab offset"), ("shape", [2**70, 1, 1], "too large")]
)
def test_a_slab_box_beyond_any_image_is_a_validation_error(field, value, message):
    good = Slab.from_mask(np.ones((1, 2, 2), bool), (3, 4, 5)).model_dump()
    with pytest.raises(ValueError, match=message):  # pydantic's ValidationError (a 422), not an int64 overflow
        Slab.model_validate({**good, field: value})
    with pytest.raises(PromptError, match=message):
        parse_prompt({"kind": "scribble", "slab": {**good, field: value}})


@pytest.mark.parametrize("width", [1.2, 1.5, 1.9])
def test_a_scribble_just_wider_than_a_voxel_is_drawn_like_a_one_voxel_line(width):
    """Below width 2 the disc holds the sample alone (once, widths 1.2-1.5 gave no voxels at all,
    "outside the image"): these strokes draw the line itself, as width 1 does."""
    points = [(2.0, 3.0, 4.0), (12.0, 9.0, 4.0)]
    thin = to_slab(ScribblePrompt(points=points, width=1.0), (10, 20, 20))
    wider = to_slab(ScribblePrompt(points=points, width=width), (10, 20, 20))
    assert wider.slab.to_box().sum() == thin.slab.to_box().sum() > 0
    np.testing.assert_array_equal(wider.slab.voxels_kji(), thin.slab.voxels_kji())


@pytest.mark.parametrize("width", [2.4, 3.0, 4.4, 5.3, 7.9])
def test_a_scribble_widens_equally_on_both_sides_whatever_its_width(width):
    """The disc's half-voxel grid is centred on each sample: a width that is not a multiple of a
    half voxel (a brush size in mm over a voxel size) used to start the grid at -radius, so the
    stroke came out shifted to one side (width 4.4: two voxels on one side, one on the other)."""
    points = [(5.0, 20.0, 10.0), (25.0, 20.0, 10.0), (25.0, 35.0, 10.0)]  # (i, j, k): an L on slice k=10
    voxels = to_slab(ScribblePrompt(points=points, width=width), (20, 60, 60)).slab.voxels_kji()
    assert set(voxels[:, 0]) == {10}
    radius = (width - 1) / 2
    reach = int(np.floor(radius + 1e-9))  # half-way points round towards the stroke
    across = set(range(20 - reach, 20 + reach + 1))  # the disc across the leg
    for i in range(8, 22):  # along the first leg, away from its ends and the corner
        j = voxels[voxels[:, 2] == i, 1]
        assert j.min() + j.max() == 40, f"i={i}: j from {j.min()} to {j.max()}"
        assert set(j) == across
    assert len(across) > 1 or width < 3


@pytest.mark.parametrize("width", [2.0, 3.0, 4.4, 6.0])
def test_a_stroke_is_as_wide_on_an_even_row_as_on_an_odd_one(width):
    """Half-way points of the disc used to round half to even: width 2 drew 1 voxel on an even row
    and 3 on an odd one, width 4.4 5 and 3."""
    spans = []
    for row in (20, 21):
        points = [(5.0, float(row), 10.0), (25.0, float(row), 10.0)]  # (i, j, k): along i on row j
        voxels = to_slab(ScribblePrompt(points=points, width=width), (20, 60, 60)).slab.voxels_kji()
        j = voxels[voxels[:, 2] == 15, 1]
        spans.append((int(j.min()) - row, int(j.max()) - row))
    assert spans[0] == spans[1] and spans[0][0] == -spans[0][1]
