"""Evaluation metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from SegAssistLib.evaluation.metrics import dice, hd95, number_of_clicks, surface


def test_dice_hand_computed():
    a = np.zeros((4, 4, 4), np.uint8)
    b = np.zeros((4, 4, 4), np.uint8)
    a[0:2, 0:2, 0:2] = 1  # 8 voxels
    b[1:3, 0:2, 0:2] = 1  # 8 voxels, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 16)
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0


def test_dice_of_two_empty_masks_is_one():
    empty = np.zeros((3, 3, 3), bool)
    assert dice(empty, empty) == 1.0


def test_dice_rejects_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def test_noc_first_interaction_reaching_the_threshold():
    curve = [0.5, 0.82, 0.86, 0.91]
    assert number_of_clicks(curve, 0.80) == (2, True)
    assert number_of_clicks(curve, 0.85) == (3, True)
    assert number_of_clicks(curve, 0.90) == (4, True)
    assert number_of_clicks([0.95], 0.90) == (1, True)


def test_noc_not_reached_is_capped_at_the_number_allowed():
    curve = [0.3, 0.5, 0.7]
    assert number_of_clicks(curve, 0.9) == (3, False)
    assert number_of_clicks(curve, 0.9, max_clicks=10) == (10, False)
    # a value reached only after the allowed clicks does not count
    assert number_of_clicks([0.1, 0.2, 0.95], 0.9, max_clicks=2) == (2, False)


def test_surface_of_a_cube_is_its_shell():
    cube = np.zeros((5, 5, 5), bool)
    cube[1:4, 1:4, 1:4] = True
    shell = surface(cube)
    assert shell.sum() == 27 - 1 and not shell[2, 2, 2]


def test_hd95_single_voxels_with_anisotropic_spacing():
    a = np.zeros((4, 3, 6), bool)
    b = np.zeros_like(a)
    a[0, 0, 0] = True
    b[2, 0, 0] = True  # two slices apart along k
    assert hd95(a, b, spacing=(0.5, 0.5, 3.0)) == pytest.approx(6.0)
    c = np.zeros_like(a)
    c[0, 0, 4] = True  # four voxels apart along i
    assert hd95(a, c, spacing=(0.5, 0.5, 3.0)) == pytest.approx(2.0)


def test_hd95_parallel_planes():
    a = np.zeros((6, 5, 5), bool)
    b = np.zeros_like(a)
    a[0] = True
    b[3] = True
    assert hd95(a, b, spacing=(1.0, 1.0, 2.5)) == pytest.approx(7.5)


def test_hd95_ignores_a_small_outlier_that_the_full_hausdorff_sees():
    a = np.zeros((10, 5, 5), bool)
    a[0] = True  # 25 surface voxels
    b = a.copy()
    b[9, 2, 2] = True  # one stray voxel 9 slices away: 51 pooled distances, one non-zero
    assert hd95(a, b, spacing=(1.0, 1.0, 2.0)) == pytest.approx(0.0)


def test_hd95_empty_conventions():
    empty = np.zeros((3, 3, 3), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert hd95(empty, empty) == 0.0
    assert math.isinf(hd95(one, empty))
    assert hd95(one, one) == 0.0
