"""An open lasso while the view changes between corner clicks, and double-clicks, on real slice nodes."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import coordinates  # noqa: E402
from SegAssistLib.slicer.interaction import GestureRecorder, Tool, gesture_to_prompt  # noqa: E402
from SegAssistLib.slicer.scene import add_slice_node, create_headless_scene  # noqa: E402


@pytest.fixture
def scene():
    with create_headless_scene() as ctx:
        vol = ctx.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
        slicer.util.updateVolumeFromArray(vol, np.zeros((40, 64, 64), np.int16))  # 1 mm voxels, identity
        view = add_slice_node(ctx.scene, "Axial", (256, 256), (64.0, 64.0), center_ras=(31.5, 31.5, 20.0))
        yield vol, view


def _matrix(view):
    return slicer.util.arrayFromVTKMatrix(view.GetXYToRAS())


def _click(rec, view, xy):
    gesture = rec.press("Red", xy, Tool.LASSO, True, _matrix(view))
    return gesture or rec.release("Red", xy)


def test_lasso_corners_stay_where_they_were_clicked_through_zoom_and_pan(scene):
    vol, view = scene
    rec = GestureRecorder()
    clicked = []
    for xy in ((60, 60), (200, 60)):
        clicked.append(coordinates.xy_to_ijk(view, xy, vol))
        _click(rec, view, xy)
    view.SetFieldOfView(32.0, 32.0, 1.0)  # zoom in
    view.UpdateMatrices()
    view.JumpSliceByCentering(40.0, 35.0, 20.0)  # pan, same slice
    view.UpdateMatrices()
    assert rec.view_changed("Red", _matrix(view))  # the rubber band moves with the view
    clicked.append(coordinates.xy_to_ijk(view, (200, 200), vol))
    _click(rec, view, (200, 200))
    gesture = rec.finish()
    prompt = gesture_to_prompt(gesture, view, vol)
    assert np.allclose(np.asarray(prompt.points), np.asarray(clicked), atol=1e-6)


def test_lasso_is_cancelled_when_the_slice_moves_between_corners(scene):
    vol, view = scene
    rec = GestureRecorder()
    _click(rec, view, (60, 60))
    _click(rec, view, (200, 60))
    view.JumpSliceByOffsetting(31.5, 31.5, 23.0)  # scroll 3 slices
    view.UpdateMatrices()
    gesture = _click(rec, view, (200, 200))  # the press notices the new plane
    assert gesture is None and "cancelled" in rec.hint
    assert rec.feedback().xy == ((200.0, 200.0),)  # the click started a new lasso on this slice
    assert rec.view_changed("Red", _matrix(view)) is False


def test_view_changed_cancels_an_open_lasso_on_another_slice(scene):
    _, view = scene
    rec = GestureRecorder()
    _click(rec, view, (60, 60))
    view.JumpSliceByOffsetting(31.5, 31.5, 21.0)
    view.UpdateMatrices()
    assert rec.view_changed("Red", _matrix(view)) and not rec.drawing_lasso
    assert "cancelled" in rec.hint


def test_a_double_click_adds_one_lasso_corner_and_a_click_gesture_each_time():
    rec = GestureRecorder()
    for xy in ((0, 0), (0, 0), (50, 0), (51, 0), (50, 40)):  # the 2nd press of a double-click in place
        rec.press("Red", xy, Tool.LASSO, True)
        rec.release("Red", xy)
    assert rec.feedback().xy == ((0.0, 0.0), (50.0, 0.0), (50.0, 40.0))
    gestures = []
    for _ in range(2):  # a double-click with the click tool: two clicks, the view is not maximized
        rec.press("Red", (10, 10), Tool.CLICK, True)
        gestures.append(rec.release("Red", (10, 10)))
    assert all(g is not None and g.xy == ((10.0, 10.0),) for g in gestures)
