"""Prompt rules written once in SegAssistLib.prompts and shared by the engine, the Slicer effect and
the client: which points lie inside the image, and which scribbles are wide."""

from __future__ import annotations

import numpy as np
import pytest

from SegAssistLib.engine.builtin import BuiltinEngine
from SegAssistLib.engine.encoding import to_patch_prompt
from SegAssistLib.engine.patching import Window
from SegAssistLib.errors import PromptError
from SegAssistLib.image import Volume
from SegAssistLib.prompts import (
    WIDE_SCRIBBLE_WIDTH,
    BoxPrompt,
    PointPrompt,
    ScribblePrompt,
    inside_image,
)

SHAPE_KJI = (5, 6, 7)  # a different length on every axis: a mixed-up axis order shows


def _beyond(x: float, direction: float) -> float:
    return float(np.nextafter(x, direction))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_the_ends_half_a_voxel_past_the_outer_centres_are_inside_and_just_beyond_is_outside(axis):
    n = SHAPE_KJI[axis]
    centre = (np.asarray(SHAPE_KJI, float) - 1) / 2

    def at(x: float) -> np.ndarray:
        p = centre.copy()
        p[axis] = x
        return p

    for x in (-0.5, n - 0.5, 0.0, n - 1.0):
        assert inside_image(at(x), SHAPE_KJI).tolist() == [True], x
    for x in (_beyond(-0.5, -1.0), _beyond(n - 0.5, n), -0.5 - 1e-6, n - 0.5 + 1e-6, -1.0, float(n)):
        assert inside_image(at(x), SHAPE_KJI).tolist() == [False], x


def test_points_and_shape_are_both_in_array_order_kji():
    # i = 6.4 is inside an image 7 voxels along i; k = 6.4 is beyond the 5 voxels along k
    assert inside_image([(0.0, 0.0, 6.4)], SHAPE_KJI).tolist() == [True]
    assert inside_image([(6.4, 0.0, 0.0)], SHAPE_KJI).tolist() == [False]
    assert inside_image([(4.5, 5.5, 6.5), (-0.5, -0.5, -0.5)], SHAPE_KJI).tolist() == [True, True]
    assert inside_image([(4.5, 5.5, 6.5)], np.asarray(SHAPE_KJI)).tolist() == [True]  # an array shape too


def test_one_answer_per_point_and_non_finite_coordinates_are_outside():
    points = [(0, 0, 0), (np.nan, 0, 0), (0, np.inf, 0), (0, 0, -np.inf), (2, 3, 4)]
    out = inside_image(points, SHAPE_KJI)
    assert out.dtype == bool and out.tolist() == [True, False, False, False, True]
    assert inside_image(np.zeros((0, 3)), SHAPE_KJI).shape == (0,)
    with pytest.raises(ValueError, match="3D image shape"):
        inside_image([(0, 0, 0)], (5, 6))


# ---- callers: the engine and the Slicer effect draw the line at the same place --------------------


@pytest.fixture(scope="module")
def engine_session(tiny_checkpoint):
    engine = BuiltinEngine.from_checkpoint(tiny_checkpoint, threads=1)
    k, j, i = np.mgrid[: SHAPE_KJI[0], : SHAPE_KJI[1], : SHAPE_KJI[2]]
    image = (((k - 2) ** 2 + (j - 3) ** 2 + (i - 3) ** 2) < 4) * 100.0 + 10.0
    session = engine.open_session(Volume(image.astype(np.float32), spacing=(1.0, 1.0, 1.0)))
    yield session
    session.close()


def _edge_prompts(inside: bool):
    """Prompts (i, j, k) at the far edge of each axis, on it or a hair beyond it."""
    nudge = 0.0 if inside else 1e-6
    upper_ijk = [n - 0.5 for n in SHAPE_KJI[::-1]]
    for axis in range(3):
        for value in (-0.5 - nudge, upper_ijk[axis] + nudge):
            p = [1.0, 1.0, 1.0]
            p[axis] = value
            yield PointPrompt(position=tuple(p))
    far = tuple(u + nudge for u in upper_ijk)
    yield BoxPrompt(min_corner=(0.0, 0.0, 0.0), max_corner=far)
    yield ScribblePrompt(points=[(1.0, 1.0, 1.0), far])


def test_the_engine_and_the_slicer_effect_agree_just_inside_and_just_outside(engine_session):
    interaction = pytest.importorskip("SegAssistLib.slicer.interaction")
    for prompt in _edge_prompts(inside=True):
        interaction.check_inside(prompt, SHAPE_KJI)  # raises nothing
        engine_session.add_prompt(prompt)  # raises nothing
        engine_session.undo()
    for prompt in _edge_prompts(inside=False):
        with pytest.raises(PromptError, match="outside the volume"):
            interaction.check_inside(prompt, SHAPE_KJI)
        with pytest.raises(PromptError, match="lies outside the image"):
            engine_session.add_prompt(prompt)
    assert engine_session.prompts == []


# ---- the wide scribble -----------------------------------------------------------------------------


def test_a_scribble_as_wide_as_the_rule_is_a_tube_and_a_thinner_one_its_samples():
    stroke = [(2.0, 5.0, 5.0), (8.0, 5.0, 5.0)]  # (i, j, k): along i on an axial slice
    wide = ScribblePrompt(points=stroke, width=WIDE_SCRIBBLE_WIDTH)
    thin = ScribblePrompt(points=stroke, width=WIDE_SCRIBBLE_WIDTH - 1e-6)

    window = Window(start=(0, 0, 0), size=(16, 16, 16), patch=16)  # image voxel = patch voxel
    drawn_wide = to_patch_prompt(wide, window, (16, 16, 16))
    drawn_thin = to_patch_prompt(thin, window, (16, 16, 16))
    assert drawn_wide.kind == drawn_thin.kind == "scribble"
    # widened in the image, then the patch voxels that cover its voxels: whole voxels only
    assert np.array_equal(drawn_wide.coords, np.round(drawn_wide.coords))
    assert {tuple(c) for c in drawn_wide.coords} >= {(5.0, 5.0, float(i)) for i in range(2, 9)}
    assert np.allclose(drawn_thin.coords[:, :2], 5.0)  # samples on the line alone, every half voxel
    assert np.allclose(np.sort(drawn_thin.coords[:, 2]), np.arange(2.0, 8.01, 0.5))
