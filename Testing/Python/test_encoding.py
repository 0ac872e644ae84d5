"""Drawing prompts into voxel grids and network channels; windows on anisotropic images."""

import numpy as np
import pytest
import torch

from SegAssistLib import rasterize
from SegAssistLib.engine import patching
from SegAssistLib.engine.encoding import (
    CHANNELS,
    LASSO_VERTEX_STEP,
    assemble_input,
    draw_prompts,
    prompts_in_window,
    thin_polygon,
    to_patch_prompt,
)
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt


def test_fill_planar_polygon_axis_aligned_square_is_one_slice_thick():
    out = np.zeros((20, 20, 20), bool)
    rasterize.fill_planar_polygon(out, [(5, 2, 2), (5, 2, 11), (5, 11, 11), (5, 11, 2)])
    assert out[5].sum() == 100 and out.sum() == 100


def test_fill_planar_polygon_oblique_plane_area_and_flatness():
    out = np.zeros((40, 40, 40), bool)
    normal = np.array([1.0, 1.0, 1.0]) / np.sqrt(3)
    u = np.array([1.0, -1.0, 0.0]) / np.sqrt(2)
    v = np.cross(normal, u)
    centre = np.array([20.0, 20.0, 20.0])
    radius = 10.0
    verts = [centre + radius * (np.cos(t) * u + np.sin(t) * v) for t in np.linspace(0, 2 * np.pi, 48, endpoint=False)]
    rasterize.fill_planar_polygon(out, verts)
    pts = np.argwhere(out)
    dist = np.abs((pts - centre) @ normal)
    assert dist.max() <= 0.5 * np.abs(normal).sum() + 1e-6  # a digital plane
    # a standard (6-connected) digital plane holds |n|_1 voxels per unit of area
    expected = np.pi * radius**2 * np.abs(normal).sum()
    assert 0.85 * expected < len(pts) < 1.25 * expected
    assert np.linalg.norm(pts - centre, axis=1).max() <= radius + 1.5


def test_balls_polyline_and_box():
    out = np.zeros((10, 10, 10), bool)
    rasterize.draw_balls(out, [(5, 5, 5)], 1.0)
    assert out.sum() == 7
    out[:] = False
    rasterize.draw_polyline(out, [(0, 0, 0), (0, 0, 9)])
    assert out[0, 0].all() and out.sum() == 10
    out[:] = False
    rasterize.fill_box(out, (2, 2, 2), (4, 5, 2))
    assert out.sum() == 3 * 4 * 1 and out[2:5, 2:6, 2].all()
    out[:] = False
    rasterize.fill_box(out, (-10, 2, 2), (-5, 4, 4))  # wholly before the array (a window): nothing
    rasterize.fill_box(out, (2, 2, 12), (4, 4, 14))  # wholly after it
    assert not out.any()
    rasterize.fill_box(out, (-10, 2, 2), (0.2, 4, 4))  # reaching into the first plane: that plane
    assert out[0, 2:5, 2:5].all() and out.sum() == 9
    out[:] = False
    rasterize.draw_balls(out, [(50, 50, 50)], 2.0)  # outside: nothing, no error
    assert not out.any()


def test_window_on_anisotropic_image_sees_isotropic_millimetres():
    spacing_kji = (5.0, 0.8, 0.8)
    win = patching.window_around((10, 100, 100), spacing_kji, 64, level=0)
    assert win.size == (10, 64, 64)  # 64 voxels of 0.8 mm in plane, 51.2 mm / 5 mm across slices
    win2 = patching.window_around((10, 100, 100), spacing_kji, 64, level=1)
    assert win2.size == (20, 128, 128)
    centre_in_patch = win.to_patch(np.array([10.0, 100.0, 100.0]))
    assert np.allclose(centre_in_patch, 31.5, atol=3.3)


def test_window_padding_outside_the_image():
    array = np.arange(8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    win = patching.Window(start=(-4, -4, -4), size=(16, 16, 16), patch=16)
    img_sl, win_sl = win.image_slices(array.shape)
    assert img_sl == (slice(0, 8),) * 3 and win_sl == (slice(4, 12),) * 3
    patch = patching.extract_image_patch(array, win)
    assert patch.shape == (16, 16, 16) and torch.isfinite(patch).all()
    assert win.touches_image_border(array.shape).all()


def test_max_level_covers_the_image():
    shape = (300, 512, 512)
    spacing = (1.0, 0.7, 0.7)
    level = patching.max_level(shape, spacing, 64)
    assert all(n >= d for n, d in zip(patching.window_size(spacing, 64, level), shape))
    assert not all(n >= d for n, d in zip(patching.window_size(spacing, 64, level - 1), shape))


def test_each_prompt_kind_lands_in_its_channel_at_the_right_place():
    win = patching.Window(start=(0, 0, 0), size=(32, 32, 32), patch=32)
    prompts = [
        PointPrompt(position=(3, 4, 5)),
        PointPrompt(position=(20, 20, 20), positive=False),
        ScribblePrompt(points=[(10, 10, 12), (15, 10, 12)]),
        ScribblePrompt(points=[(25, 5, 12), (25, 9, 12)], positive=False),
        BoxPrompt(min_corner=(1, 1, 30), max_corner=(6, 6, 30)),
        LassoPrompt(points=[(20, 20, 2), (28, 20, 2), (28, 28, 2)]),
    ]
    ch = draw_prompts(prompts_in_window(prompts, win), 32)
    assert ch.shape == (5, 32, 32, 32) and len(CHANNELS) == 7
    assert ch[0][5, 4, 3] and not ch[0][20, 20, 20]
    assert ch[1][20, 20, 20] and ch[1].sum() == ch[0].sum()
    assert ch[2][12, 10, 10:16].all()
    assert ch[3][12, 5:10, 25].all()
    assert ch[4][30, 1:7, 1:7].all() and ch[4][2, 21, 26]  # the box and the positive lasso
    x = assemble_input(torch.zeros(32, 32, 32), torch.zeros(32, 32, 32), ch)
    assert x.shape == (7, 32, 32, 32)


def test_a_box_covers_its_end_voxels_whole_in_a_magnifying_patch():
    """5 mm slices seen at 1 mm: the patch has five voxels per slice along k. A box over slices 2..6
    must cover their patch voxels 10..34 whole, as training draws boxes around whole objects; mapping
    only the end slices' centres lost 2 of the 5 patch voxels of each end slice. A 2D box keeps its
    single plane."""
    win = patching.Window(start=(0, 0, 0), size=(8, 40, 40), patch=40)  # scale 5 along k, 1 in-plane
    box = BoxPrompt(min_corner=(4, 6, 2), max_corner=(30, 20, 6))  # (i, j, k)
    ch = draw_prompts([to_patch_prompt(box, win)], 40)
    ks = np.flatnonzero(ch[4].any(axis=(1, 2)))
    assert (ks.min(), ks.max()) == (10, 34)
    js, is_ = np.flatnonzero(ch[4].any(axis=(0, 2))), np.flatnonzero(ch[4].any(axis=(0, 1)))
    assert (js.min(), js.max(), is_.min(), is_.max()) == (6, 20, 4, 30)  # scale 1: exactly the voxels
    dragged = BoxPrompt(min_corner=(4.2, 6.4, 1.6), max_corner=(29.7, 20.3, 6.4))  # corners inside voxels
    ks = np.flatnonzero(draw_prompts([to_patch_prompt(dragged, win)], 40)[4].any(axis=(1, 2)))
    assert (ks.min(), ks.max()) == (10, 34)  # the slices its corners fall in, whole
    flat = to_patch_prompt(BoxPrompt(min_corner=(4, 6, 3), max_corner=(30, 20, 3)), win)
    ks = np.flatnonzero(draw_prompts([flat], 40)[4].any(axis=(1, 2)))
    assert len(ks) == 1 and ks[0] == 17  # slice 3's centre, one plane
    # thinner than a slice but not flat (dragged on a coronal view, 0.8 of a slice tall): the slices its
    # corners fall in, whole, as fill_box holds them; a drag 0.01 voxel longer changed nothing there
    for k0, k1, slices in ((3.1, 3.9, (3, 4)), (3.0, 3.99, (3, 4)), (3.0, 4.0, (3, 4)), (3.2, 3.4, (3,))):
        thin = BoxPrompt(min_corner=(4, 6, k0), max_corner=(30, 20, k1))
        drawn = np.zeros((8, 40, 40), bool)
        rasterize.fill_box(drawn, np.asarray(thin.min_corner)[::-1], np.asarray(thin.max_corner)[::-1])
        assert tuple(np.flatnonzero(drawn.any(axis=(1, 2)))) == slices
        ks = np.flatnonzero(draw_prompts([to_patch_prompt(thin, win)], 40)[4].any(axis=(1, 2)))
        assert (ks.min(), ks.max()) == (5 * slices[0], 5 * slices[-1] + 4), (k0, k1)


def test_negative_lasso_is_background_ink():
    win = patching.Window(start=(0, 0, 0), size=(16, 16, 16), patch=16)
    pp = to_patch_prompt(LassoPrompt(points=[(2, 2, 8), (10, 2, 8), (10, 10, 8)], positive=False), win)
    ch = draw_prompts([pp], 16)
    assert ch[3].any() and not ch[4].any()


def test_a_dense_lasso_is_thinned_in_a_coarse_window_and_fills_the_same_voxels():
    # 4000 vertices on a circle of radius 60 image voxels, seen by a window 4x coarser: about 60
    # vertices per patch voxel of outline
    angles = np.linspace(0, 2 * np.pi, 4000, endpoint=False)
    points = [(80 + 60 * np.cos(a), 80 + 60 * np.sin(a), 64.0) for a in angles]
    win = patching.Window(start=(0, 0, 0), size=(128, 160, 160), patch=32)
    pp = to_patch_prompt(LassoPrompt(points=points), win)
    exact = win.to_patch(np.asarray(points)[:, ::-1])
    assert 3 <= len(pp.coords) < len(exact) / 10
    gaps = np.linalg.norm(np.diff(np.vstack([pp.coords, pp.coords[:1]]), axis=0), axis=1)
    assert gaps.max() < 2 * LASSO_VERTEX_STEP + 1e-9  # no vertex moved further than the step
    thinned = draw_prompts([pp], 32)[4]
    full = np.zeros((32,) * 3, bool)
    rasterize.fill_planar_polygon(full, exact)
    assert np.count_nonzero(thinned != full) <= 0.02 * full.sum()


def test_thin_polygon_keeps_sparse_and_tiny_polygons_as_they_are():
    square = np.array([[0, 0, 0], [0, 10, 0], [0, 10, 10], [0, 0, 10]], float)
    assert np.array_equal(thin_polygon(square, LASSO_VERTEX_STEP), square)
    speck = np.array([[0, 0, 0], [0, 0.01, 0], [0, 0.01, 0.01], [0, 0, 0.01], [0, 0.005, 0.005]], float)
    assert np.array_equal(thin_polygon(speck, LASSO_VERTEX_STEP), speck)  # fewer than 3 would be left


@pytest.mark.parametrize("level", [0, 1])
def test_prompt_mapping_follows_the_window_scale(level):
    spacing = (2.0, 1.0, 1.0)
    win = patching.window_around((20, 40, 40), spacing, 32, level)
    pp = to_patch_prompt(PointPrompt(position=(40, 40, 20)), win)
    assert np.allclose(pp.coords[0], win.to_patch(np.array([20.0, 40.0, 40.0])))
    assert np.all(np.abs(pp.coords[0] - 15.5) <= 1.0 + 2 ** level)


def test_prompts_far_outside_the_window_are_left_out():
    win = patching.Window(start=(0, 0, 0), size=(16, 16, 16), patch=16)
    assert prompts_in_window([PointPrompt(position=(100, 100, 100))], win) == []


def test_logits_in_box_equals_full_trilinear_upsampling():
    torch.manual_seed(0)
    logits = torch.randn(8, 8, 8)
    win = patching.Window(start=(0, 0, 0), size=(13, 29, 40), patch=8)
    full = patching.logits_to_window(logits, win)
    lo, hi = (2, 5, 7), (11, 20, 39)
    part = patching.logits_in_box(logits, win, lo, hi)
    assert torch.allclose(part, full[2:11, 5:20, 7:39], atol=1e-5)


def test_positive_box_holds_every_positive_voxel():
    logits = -torch.ones(8, 8, 8)
    logits[3:5, 2:4, 6] = 1.0
    win = patching.Window(start=(0, 0, 0), size=(32, 16, 64), patch=8)
    lo, hi = patching.positive_box(logits, win)
    full = patching.logits_to_window(logits, win) > 0
    nz = np.argwhere(full.numpy())
    assert np.all(nz.min(0) >= lo) and np.all(nz.max(0) < hi)
    assert patching.positive_box(-torch.ones(8, 8, 8), win) is None


def test_large_windows_are_read_with_a_stride_but_keep_their_extent():
    array = np.zeros((64, 512, 512), np.float32)
    array[:, :, 256:] = 1.0  # right half bright
    win = patching.Window(start=(0, 0, 0), size=(64, 512, 512), patch=32)
    assert patching.sampling_strides(win) == (1, 8, 8)
    crop = patching.crop_window(array, win)
    assert crop.shape == (64, 64, 64)
    assert crop[:, :, :32].max() == 0 and crop[:, :, 32:].min() == 1
    patch = patching.extract_image_patch(array, win)
    assert patch[:, :, :15].mean() < 0 < patch[:, :, 17:].mean()


def test_a_thin_stroke_across_thick_slices_stays_one_line_in_the_patch():
    """Sampled every half image voxel, a stroke along 5 mm slices landed about 3.5 patch voxels
    apart in a 1 mm window and broke into beads; training draws strokes as continuous lines."""
    from scipy import ndimage

    spacing_kji = (5.0, 0.7, 0.7)
    win = patching.window_around((15, 80, 80), spacing_kji, 64, level=0)
    stroke = ScribblePrompt(points=[(80, 80, 10), (80, 80, 20)])
    channel = draw_prompts([to_patch_prompt(stroke, win)], 64)[2]
    _, pieces = ndimage.label(channel)
    assert pieces == 1
    ks = np.flatnonzero(channel.any(axis=(1, 2)))
    assert len(ks) == ks[-1] - ks[0] + 1 and len(ks) >= 60  # every plane it crosses, the window's depth
    # only the samples that can ink the patch are kept (the stroke runs far past this window)
    long_stroke = ScribblePrompt(points=[(80, 80, 0), (80, 80, 400)])
    kept = to_patch_prompt(long_stroke, win).coords
    assert len(kept) and kept[:, 0].min() > -3 and kept[:, 0].max() < 66
    assert to_patch_prompt(ScribblePrompt(points=[(5, 5, 300), (9, 5, 300)]), win) is None


def test_a_wide_strokes_voxels_are_rasterised_once_per_prompt():
    """The engine draws every earlier stroke again in each window of each click (and the edge snap
    once more): a wide stroke in points form was rasterised anew every time."""
    from SegAssistLib.prompts import to_slab
    from SegAssistLib.stroke_voxels import scribble_voxels

    stroke = ScribblePrompt(points=[(10, 10, 5), (40, 30, 5)], width=9)
    first, again = scribble_voxels(stroke), scribble_voxels(stroke)
    assert np.shares_memory(first, again) and not first.flags.writeable
    twin = ScribblePrompt(points=[(10, 10, 5), (40, 30, 5)], width=9)
    assert stroke == twin and twin == stroke  # the cached voxels do not enter equality
    slab = to_slab(stroke, (12, 50, 50)).slab
    assert np.array_equal(slab.voxels_kji(), first[np.all((first >= 0) & (first < (12, 50, 50)), axis=1)])
