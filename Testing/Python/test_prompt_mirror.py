"""Prompts moved to the same image stored with axes in reverse order (SegAssistLib.prompt_mirror),
and a prompt log read on such a copy (headless.read_prompt_file): every prompt names the same voxels."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.errors import PromptError
from SegAssistLib.headless import image_of, read_prompt_file
from SegAssistLib.image import Volume
from SegAssistLib.io import load_volume, volume_to_sitk
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompt_mirror import mirror_prompt, mirrored_axes
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, MaskPrompt, PointPrompt, ScribblePrompt, to_slab

SHAPE_KJI = (7, 9, 11)
ALL_FLIPS = [f for f in itertools.product((False, True), repeat=3) if any(f)]


def _flip(array: np.ndarray, flips_kji) -> np.ndarray:
    return np.flip(array, axis=tuple(a for a in range(3) if flips_kji[a]))


def _voxels(prompt) -> np.ndarray:
    """The prompt's voxels as a boolean image (strokes and lassos rasterised as the engine does)."""
    out = np.zeros(SHAPE_KJI, bool)
    if isinstance(prompt, MaskPrompt):
        return prompt.to_array(SHAPE_KJI) > 0
    k, j, i = to_slab(prompt, SHAPE_KJI).slab.voxels_kji().T
    out[k, j, i] = True
    return out


STROKES = [
    ScribblePrompt(points=[(1, 2, 3), (6, 2, 3), (6, 7, 3)], width=3.0),  # on the axial slice k = 3
    ScribblePrompt(points=[(2, 4, 1), (2, 4, 5)], normal=(1.0, 0.0, 0.0)),  # straight, on a sagittal slice
    LassoPrompt(points=[(1, 1, 4), (8, 1, 4), (8, 6, 4), (2, 7, 4)]),
    LassoPrompt(points=[(3, 1, 1), (3, 7, 1), (3, 7, 5)], positive=False),
]


@pytest.mark.parametrize("flips", ALL_FLIPS)
@pytest.mark.parametrize("stroke", STROKES, ids=lambda p: f"{p.kind}")
def test_strokes_and_their_slabs_cover_the_mirrored_voxels(stroke, flips):
    expected = _flip(_voxels(stroke), flips)
    assert np.array_equal(_voxels(mirror_prompt(stroke, flips, SHAPE_KJI)), expected)
    slab = to_slab(stroke, SHAPE_KJI)
    moved = mirror_prompt(slab, flips, SHAPE_KJI)
    assert moved.slab is not None and np.array_equal(_voxels(moved), expected)
    assert mirror_prompt(moved, flips, SHAPE_KJI) == slab  # twice: where it started


@pytest.mark.parametrize("flips", ALL_FLIPS)
def test_points_boxes_and_masks_name_the_mirrored_voxels(flips):
    last_ijk = np.asarray(SHAPE_KJI[::-1]) - 1
    flips_ijk = np.asarray(flips[::-1])
    point = PointPrompt(position=(1.0, 2.5, 6.0), positive=False)
    moved = mirror_prompt(point, flips, SHAPE_KJI)
    assert moved.positive is False
    assert np.allclose(moved.position, np.where(flips_ijk, last_ijk - point.position, point.position))

    box = BoxPrompt(min_corner=(1, 2, 3), max_corner=(8, 5, 3))  # a 2D box on k = 3
    moved_box = mirror_prompt(box, flips, SHAPE_KJI)
    assert np.all(np.asarray(moved_box.min_corner) <= moved_box.max_corner) and moved_box.is_2d
    assert mirror_prompt(moved_box, flips, SHAPE_KJI) == box

    blob = np.zeros(SHAPE_KJI, np.uint8)
    blob[1:3, 2:7, 4:10] = 1
    blob[2, 6, 9] = 0  # not symmetric in its box
    mask = MaskPrompt.from_array(blob)
    assert np.array_equal(mirror_prompt(mask, flips, SHAPE_KJI).to_array(SHAPE_KJI), _flip(blob, flips))


def test_a_scribbles_slice_normal_turns_with_the_reversed_axes():
    stroke = ScribblePrompt(points=[(2, 4, 1), (2, 4, 5)], normal=(1.0, 0.5, 0.0))
    assert mirror_prompt(stroke, (False, False, True), SHAPE_KJI).normal == (-1.0, 0.5, 0.0)
    assert mirror_prompt(stroke, (True, True, False), SHAPE_KJI).normal == (1.0, -0.5, 0.0)


def _stored_reversed(volume: Volume, flips_kji) -> Volume:
    """The same image (every voxel at the same place in space) with its voxels in reverse order along ``flips_kji``."""
    flips_ijk = np.asarray(flips_kji[::-1])
    last = np.asarray(volume.shape_ijk) - 1
    direction = np.asarray(volume.direction, float) * np.where(flips_ijk, -1.0, 1.0)
    origin = volume.ijk_to_physical(np.where(flips_ijk, last, 0))
    return Volume(_flip(volume.array, flips_kji).copy(), volume.spacing, tuple(origin), direction)


def test_mirrored_axes_tells_a_reordered_copy_from_a_moved_or_flipped_image():
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    original = Volume(np.zeros((5, 6, 7), np.int16), (0.8, 1.1, 2.5), (-31.5, 12.25, 48.0), direction)
    info = ImageInfo.from_volume(original)

    def axes(volume: Volume):
        return mirrored_axes(volume.shape_ijk, volume.spacing, volume.origin, volume.direction,
                             info.spacing, info.origin, info.direction)  # fmt: skip

    for flips in ALL_FLIPS:
        assert axes(_stored_reversed(original, flips)) == flips
    assert axes(original) is None  # the same grid: nothing to move
    flipped_in_place = Volume(original.array, original.spacing, original.origin, direction * [1.0, -1.0, 1.0])
    assert axes(flipped_in_place) is None  # a mirror image of the scan, not the scan
    moved = _stored_reversed(original, (True, False, False))
    moved.origin = tuple(np.asarray(moved.origin) + (0.0, 0.0, 5.0))
    assert axes(moved) is None


def test_a_log_read_on_a_copy_stored_the_other_way_names_the_same_places(tmp_path):
    """``segassist segment --prompts LOG`` on another converter's copy of the scan (here: its slices and
    rows stored in reverse) gets the prompts where they were drawn; a mirror image of the scan is refused."""
    rng = np.random.default_rng(0)
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    voxels = rng.integers(0, 1000, (12, 14, 16)).astype(np.int16)
    original = Volume(voxels, (0.8, 1.1, 2.5), (-3.0, 4.0, 5.0), direction)
    prompts = [PointPrompt(position=(3.0, 4.0, 5.0)), ScribblePrompt(points=[(2, 3, 6), (9, 3, 6), (9, 11, 6)])]
    log = tmp_path / "log.json"
    PromptLog(image=ImageInfo.from_volume(original), prompts=prompts).save(log)

    copy = _stored_reversed(original, (True, True, False))
    sitk.WriteImage(volume_to_sitk(copy), str(tmp_path / "copy.nrrd"))
    reread = load_volume(tmp_path / "copy.nrrd")
    point, stroke = read_prompt_file(log, image_of(reread, "copy.nrrd"))
    assert np.allclose(reread.ijk_to_physical(point.position), original.ijk_to_physical(prompts[0].position))
    k, j, i = np.rint(point.position[::-1]).astype(int)
    assert reread.array[k, j, i] == original.array[5, 4, 3]
    drawn = to_slab(prompts[1], original.array.shape).slab.voxels_kji()
    moved = to_slab(stroke, reread.array.shape).slab.voxels_kji()
    assert np.array_equal(np.sort(reread.array[tuple(moved.T)]), np.sort(original.array[tuple(drawn.T)]))

    mirror_image = Volume(original.array, original.spacing, original.origin, direction * [1.0, 1.0, -1.0])
    with pytest.raises(PromptError, match="placed otherwise in space"):
        read_prompt_file(log, image_of(mirror_image, "mirror image"))


@pytest.mark.parametrize("flips", ALL_FLIPS)
def test_the_reversed_volume_is_the_same_image_stored_the_other_way(flips):
    """reversed_volume: the voxels reversed along the axes, every voxel where it was in space; the grid
    mirrored_axes tells is that image; twice: the volume again."""
    from SegAssistLib.prompt_mirror import reversed_volume

    rng = np.random.default_rng(1)
    volume = Volume(rng.normal(size=SHAPE_KJI).astype(np.float32), (0.8, 1.1, 2.5), (5.0, -3.0, 7.0),
                    sitk_direction(), modality="MR")  # fmt: skip
    there = reversed_volume(volume, flips)
    assert there.array.flags.c_contiguous and there.modality == "MR"
    assert np.array_equal(there.array, _flip(volume.array, flips))
    last = np.asarray(SHAPE_KJI[::-1]) - 1
    for ijk in [(0, 0, 0), (3, 4, 5), tuple(last)]:
        moved = np.where(np.asarray(flips[::-1]), last - np.asarray(ijk), ijk)
        assert np.allclose(there.ijk_to_physical(moved), volume.ijk_to_physical(ijk))
        assert there.array[tuple(moved[::-1])] == volume.array[tuple(np.asarray(ijk)[::-1])]
    assert mirrored_axes(there.shape_ijk, there.spacing, there.origin, there.direction, volume.spacing,
                         volume.origin, volume.direction) == flips  # fmt: skip
    back = reversed_volume(there, flips)
    assert np.array_equal(back.array, volume.array) and np.allclose(back.origin, volume.origin)
    assert np.allclose(back.direction, volume.direction)


def sitk_direction() -> np.ndarray:
    """An oblique rotation, nothing like the identity."""
    angle = np.deg2rad(23.0)
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0],
                                                                          [0.0, 1.0, 0.0]])  # fmt: skip


def test_some_flips_is_none_when_no_axis_is_reversed():
    from SegAssistLib.prompt_mirror import some_flips

    assert some_flips(None) is None and some_flips((False, False, False)) is None
    assert some_flips(np.array([0, 1, 0])) == (False, True, False)  # plain booleans, whatever came in
    assert all(type(f) is bool for f in some_flips([np.True_, 0, 1]))
