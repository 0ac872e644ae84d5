"""The simulated user: clicks in the largest error region with the right sign, boxes, scribbles."""

from __future__ import annotations

import numpy as np
import pytest

from SegAssistLib.evaluation.simulator import (
    box_prompt,
    first_click,
    most_interior_voxel,
    next_click,
    scribble_prompt,
)
from SegAssistLib.prompts import BoxPrompt, PointPrompt, ScribblePrompt


def _ijk_to_kji(position):
    return tuple(int(round(x)) for x in position[::-1])


def test_most_interior_voxel_of_a_box_is_its_centre():
    region = np.zeros((12, 14, 20), bool)
    region[2:7, 3:10, 8:17] = True  # 5 x 7 x 9, centre (4, 6, 12)
    assert most_interior_voxel(region) == (4, 6, 12)


def test_most_interior_voxel_uses_the_spacing():
    region = np.zeros((8, 20, 40), bool)
    region[1:6, 1:6, 1:6] = True  # cube: 3 voxels from its border in every direction
    region[2:5, 3:14, 20:31] = True  # slab 3 slices thick: 2 voxels from its border along k
    assert most_interior_voxel(region, spacing=(1, 1, 1)) == (3, 3, 3)
    # with 3 mm slices the slab's centre is 6 mm from its border, the cube's 3 mm
    assert most_interior_voxel(region, spacing=(1, 1, 3)) == (3, 8, 25)


def test_most_interior_voxel_breaks_ties_deterministically():
    region = np.zeros((4, 4, 4), bool)
    region[1:3, 1:3, 1:3] = True  # 8 voxels, all equally deep and equally far from the centre
    picks = {most_interior_voxel(region) for _ in range(3)}
    assert picks == {(1, 1, 1)}


def test_first_click_is_positive_in_the_largest_component_in_ijk_order():
    target = np.zeros((10, 20, 30), np.uint8)
    target[1:4, 1:4, 1:4] = 1  # small piece
    target[4:9, 10:17, 15:26] = 1  # big piece, centre k=6, j=13, i=20
    click = first_click(target)
    assert isinstance(click, PointPrompt) and click.positive
    assert click.position == (20.0, 13.0, 6.0)


def test_next_click_is_negative_in_a_larger_spill():
    target = np.zeros((20, 20, 20), np.uint8)
    target[5:15, 5:15, 5:15] = 1
    pred = target.copy()
    pred[7:9, 7:9, 7:9] = 0  # 8 missed voxels
    pred[5:10, 15:20, 2:7] = 1  # 125 spilled voxels outside the target
    click = next_click(target, pred)
    assert click is not None and not click.positive
    k, j, i = _ijk_to_kji(click.position)
    assert pred[k, j, i] == 1 and target[k, j, i] == 0
    assert (k, j, i) == (7, 17, 4)


def test_next_click_is_positive_in_a_larger_miss():
    target = np.zeros((20, 20, 20), np.uint8)
    target[5:15, 5:15, 5:15] = 1
    pred = target.copy()
    pred[5:12, 5:12, 5:12] = 0  # 343 missed voxels
    pred[0:2, 0:2, 0:2] = 1  # 8 spilled voxels
    click = next_click(target, pred)
    assert click is not None and click.positive
    k, j, i = _ijk_to_kji(click.position)
    assert target[k, j, i] == 1 and pred[k, j, i] == 0
    assert (k, j, i) == (8, 8, 8)


def test_next_click_none_when_perfect_and_shape_checked():
    target = np.zeros((5, 5, 5), np.uint8)
    target[1:3, 1:3, 1:3] = 1
    assert next_click(target, target.copy()) is None
    with pytest.raises(ValueError, match="shape"):
        next_click(target, np.zeros((5, 5, 4)))


def test_box_prompt_is_the_bounding_box_in_ijk():
    target = np.zeros((10, 20, 30), np.uint8)
    target[2:5, 3:9, 4:20] = 1
    box = box_prompt(target)
    assert isinstance(box, BoxPrompt)
    assert box.min_corner == (4.0, 3.0, 2.0) and box.max_corner == (19.0, 8.0, 4.0)


def test_scribble_follows_the_object_on_its_central_axial_slice():
    target = np.zeros((9, 20, 40), np.uint8)
    target[2:7, 8:11, 5:35] = 1  # a bar along i, 3 voxels wide, slices 2..6 (centre 4)
    scribble = scribble_prompt(target)
    assert isinstance(scribble, ScribblePrompt) and scribble.positive
    pts = np.asarray(scribble.points)
    assert np.all(pts[:, 2] == 4.0)
    for i, j, k in pts:
        assert target[int(k), int(j), int(i)] == 1
    assert np.ptp(pts[:, 0]) >= 20  # it runs along the bar
    steps = np.linalg.norm(np.diff(pts, axis=0), axis=1)
    assert np.all(steps <= np.sqrt(2) + 1e-9)  # an ordered, connected path


def test_empty_target_is_an_error():
    empty = np.zeros((4, 4, 4), np.uint8)
    for make in (first_click, box_prompt, scribble_prompt):
        with pytest.raises(ValueError, match="empty"):
            make(empty)
