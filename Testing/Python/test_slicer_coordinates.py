"""Slice-view clicks, boxes, scribbles and lassos -> prompts, on real slice nodes (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import (
    add_linear_transform,
    add_nested_oblique_volume,
    add_volume,
    affine,
    random_volume,
    rotation,
    slicer_xy_to_voxel,
    voxel_world,
    world_image_geometry,
)

from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt, to_slab

slicer = pytest.importorskip("slicer")
from SegAssistLib.slicer import coordinates  # noqa: E402
from SegAssistLib.slicer.scene import add_slice_node, create_headless_scene  # noqa: E402

DIMS = (300, 200)
FOV = (150.0, 100.0)
OBLIQUE_NORMAL = (0.3, -0.5, 0.8)
CENTER = (150.0, 100.0)


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _lps_volume(scene, transform=None):
    """An ordinary axis-aligned scan: i -> left, j -> posterior, k -> superior (LPS identity)."""
    parent = add_linear_transform(scene, transform, "scanner") if transform is not None else None
    ijk_to_ras = affine(np.diag([-0.9, -0.9, 2.0]), (50.0, 40.0, -20.0))
    return add_volume(scene, random_volume((20, 24, 28)), ijk_to_ras, "lps", parent=parent)


def _xy_to_ijk_oracle(slice_node, volume_node, xys):
    """Slicer's matrices only: XY -> RAS by the slice node, RAS -> IJK by the inverted world geometry."""
    xy_to_ras = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    ras_to_ijk = np.linalg.inv(world_image_geometry(volume_node))
    pts = np.column_stack([np.asarray(xys, float), np.zeros(len(xys)), np.ones(len(xys))])
    return (ras_to_ijk @ xy_to_ras @ pts.T).T[:, :3]


@pytest.mark.parametrize("orientation", ["Axial", "Sagittal", "Coronal", OBLIQUE_NORMAL])
def test_clicks_land_on_the_right_voxel(ctx, orientation):
    volume = add_nested_oblique_volume(ctx.scene)
    target = (5, 7, 4)
    view = add_slice_node(ctx.scene, orientation, DIMS, FOV, center_ras=voxel_world(volume, target))

    prompt = coordinates.point_prompt(view, CENTER, volume, positive=False)
    assert isinstance(prompt, PointPrompt) and prompt.positive is False
    assert np.allclose(prompt.position, target, atol=1e-6)
    assert coordinates.voxel_index(prompt.position) == target == slicer_xy_to_voxel(view, CENTER, volume)

    rng = np.random.default_rng(1)
    inside = 0
    for xy in rng.uniform([120, 70], [180, 130], size=(40, 2)):
        ijk = coordinates.xy_to_ijk(view, xy, volume)
        assert np.allclose(ijk, _xy_to_ijk_oracle(view, volume, [xy])[0], atol=1e-9)
        if np.all(ijk > -0.5) and np.all(ijk < np.array([28, 24, 20]) - 0.5):
            # (outside the image Slicer's rounding truncates towards zero; only voxels matter)
            inside += 1
            assert coordinates.voxel_index(ijk) == slicer_xy_to_voxel(view, xy, volume)
    assert inside >= 10


def test_ras_and_ijk_conversions_follow_nested_transforms(ctx):
    volume = add_nested_oblique_volume(ctx.scene)
    ijk = np.array([[0.0, 0.0, 0.0], [3.25, 9.5, 1.75], [27.0, 23.0, 19.0]])
    ras = coordinates.ijk_to_ras(ijk, volume)
    assert np.allclose(ras, [voxel_world(volume, p) for p in ijk], atol=1e-9)
    assert np.allclose(coordinates.ras_to_ijk(ras, volume), ijk, atol=1e-9)
    assert coordinates.ras_to_ijk(ras[1], volume).shape == (3,)
    assert coordinates.voxel_index((2.5, -0.5, 3.49)) == (3, 0, 3)


@pytest.mark.parametrize(
    ("transform", "orientation", "flat_axis"),
    [
        (None, "Axial", 2),
        (None, "Sagittal", 0),
        (None, "Coronal", 1),
        (affine(rotation((0, 0, 1), 90), (3, 2, 1)), "Axial", 2),  # in-plane axes swap, still aligned
        (affine(rotation((0, 1, 0), 90), (0, 0, 0)), "Axial", 0),  # the scan lies on its side
        (affine(rotation((1, 0, 0), -90), (0, 0, 0)), "Coronal", 2),
    ],
)
def test_box_on_a_grid_aligned_slice_is_a_flat_box(ctx, transform, orientation, flat_axis):
    volume = _lps_volume(ctx.scene, transform)
    target = (14, 12, 8)
    view = add_slice_node(ctx.scene, orientation, DIMS, FOV, center_ras=voxel_world(volume, target))
    start, end = (162.0, 113.5), (131.25, 88.0)  # dragged right-to-left, top-to-bottom

    box = coordinates.box_prompt(view, start, end, volume)
    assert isinstance(box, BoxPrompt) and box.is_2d
    assert coordinates.slice_flat_axis(view, volume) == flat_axis
    corners = _xy_to_ijk_oracle(view, volume, [start, (end[0], start[1]), end, (start[0], end[1])])
    lo, hi = np.asarray(box.min_corner), np.asarray(box.max_corner)
    assert lo[flat_axis] == hi[flat_axis]
    assert abs(lo[flat_axis] - target[flat_axis]) < 1e-6  # the slice shown: through the target voxel
    assert np.allclose(lo, corners.min(0), atol=1e-6) and np.allclose(hi, corners.max(0), atol=1e-6)
    # The box's corner voxels are the ones Slicer's segment editor paints at the drag's corners.
    painted = np.array([slicer_xy_to_voxel(view, start, volume), slicer_xy_to_voxel(view, end, volume)])
    assert coordinates.voxel_index(lo) == tuple(painted.min(0))
    assert coordinates.voxel_index(hi) == tuple(painted.max(0))


@pytest.mark.parametrize("case", ["oblique slice", "oblique volume", "rotated in plane"])
def test_box_on_an_oblique_slice_is_a_four_vertex_lasso(ctx, case):
    volume = add_nested_oblique_volume(ctx.scene) if case == "oblique volume" else _lps_volume(ctx.scene)
    orientation = OBLIQUE_NORMAL if case == "oblique slice" else "Axial"
    view = add_slice_node(ctx.scene, orientation, DIMS, FOV, center_ras=voxel_world(volume, (14, 12, 8)))
    if case == "rotated in plane":
        slice_to_ras = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())
        slice_to_ras[:3, :3] = slice_to_ras[:3, :3] @ rotation((0, 0, 1), 30)
        view.GetSliceToRAS().DeepCopy(slicer.util.vtkMatrixFromArray(slice_to_ras))
        view.UpdateMatrices()
    start, end = (136.0, 90.0), (161.0, 112.5)

    lasso = coordinates.box_prompt(view, start, end, volume)
    assert isinstance(lasso, LassoPrompt) and lasso.positive
    assert coordinates.slice_flat_axis(view, volume) is None
    corners_xy = [start, (end[0], start[1]), end, (start[0], end[1])]
    assert np.allclose(lasso.points, _xy_to_ijk_oracle(view, volume, corners_xy), atol=1e-6)
    assert [coordinates.voxel_index(p) for p in lasso.points] == [
        slicer_xy_to_voxel(view, xy, volume) for xy in corners_xy
    ]


def test_scribbles_and_lassos_on_an_oblique_slice(ctx):
    volume = add_nested_oblique_volume(ctx.scene)
    view = add_slice_node(ctx.scene, OBLIQUE_NORMAL, DIMS, FOV, center_ras=voxel_world(volume, (10, 10, 8)))
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    stroke = np.column_stack([150 + 40 * t / np.pi, 100 + 15 * np.sin(t)])
    outline = np.column_stack([150 + 30 * np.cos(t), 100 + 20 * np.sin(t)])

    scribble = coordinates.scribble_prompt(view, stroke, volume, positive=False, width=2.5)
    assert isinstance(scribble, ScribblePrompt) and not scribble.positive and scribble.width == 2.5
    assert [coordinates.voxel_index(p) for p in scribble.points] == [
        slicer_xy_to_voxel(view, xy, volume) for xy in stroke
    ]
    lasso = coordinates.lasso_prompt(view, outline, volume)
    assert isinstance(lasso, LassoPrompt) and len(lasso.points) == 24
    assert np.allclose(lasso.points, _xy_to_ijk_oracle(view, volume, outline), atol=1e-6)


@pytest.mark.parametrize("orientation", ["Coronal", "Sagittal"])
def test_a_wide_straight_stroke_or_dot_stays_on_its_coronal_or_sagittal_slice(ctx, orientation):
    """A straight stroke along an image axis (or a dot) does not say which slice it was drawn on:
    without the view's normal it was widened across the slices the user never saw."""
    volume = _lps_volume(ctx.scene)
    view = add_slice_node(ctx.scene, orientation, DIMS, FOV, center_ras=voxel_world(volume, (14, 12, 8)))
    flat = coordinates.slice_flat_axis(view, volume)  # the IJK axis the view looks along
    assert flat is not None
    shape = volume.GetImageData().GetDimensions()[::-1]
    for stroke in ([(120.0, 100.0), (170.0, 100.0)], [(150.0, 80.0), (150.0, 120.0)], [(150.0, 100.0)]):
        scribble = coordinates.scribble_prompt(view, stroke, volume, width=5)
        voxels = to_slab(scribble, shape).slab.voxels_kji()
        assert np.ptp(voxels[:, 2 - flat]) == 0, (stroke, np.ptp(voxels, axis=0))
        assert np.ptp(voxels[:, [a for a in range(3) if a != 2 - flat]], axis=0).min() >= 4  # widened in the slice


def test_degenerate_shapes_raise_prompt_errors(ctx):
    volume = _lps_volume(ctx.scene)
    axial = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=voxel_world(volume, (14, 12, 8)))
    oblique = add_slice_node(
        ctx.scene,
        OBLIQUE_NORMAL,
        DIMS,
        FOV,
        center_ras=voxel_world(volume, (14, 12, 8)),
        layout_name="Yellow",
    )
    with pytest.raises(PromptError, match="box"):
        coordinates.box_prompt(axial, (100, 50), (100, 90), volume)  # no width
    with pytest.raises(PromptError, match="collinear"):
        coordinates.box_prompt(oblique, (100, 50), (100, 90), volume)
    with pytest.raises(PromptError, match="lasso"):
        coordinates.lasso_prompt(axial, [(10, 10), (20, 20), (30, 30)], volume)
    with pytest.raises(PromptError, match="coordinates"):
        coordinates.xy_to_ijk(axial, [(1.0, 2.0, 3.0, 4.0)], volume)
    with pytest.raises(PromptError, match="non-finite"):
        coordinates.point_prompt(axial, (np.nan, 3.0), volume)


def _volume_with_extent_start(scene, start=(5, 3, 2), shape=(10, 12, 14), bright=(4, 6, 3)):
    """A volume node whose image data's extent starts at ``start`` (i, j, k), as a VTK filter's output
    (``vtkExtractVOI``) put into a node has it; one bright voxel at array index ``bright`` [k, j, i]."""
    import vtk
    from vtk.util import numpy_support

    voxels = np.zeros(shape, np.int16)
    voxels[bright] = 1000
    nk, nj, ni = shape
    image = vtk.vtkImageData()
    image.SetExtent(start[0], start[0] + ni - 1, start[1], start[1] + nj - 1, start[2], start[2] + nk - 1)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().DeepCopy(numpy_support.numpy_to_vtk(voxels.ravel()))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "extracted")
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine(np.diag([-1.0, -1.0, 2.0]), (4.0, -3.0, 1.0))))
    node.CreateDefaultDisplayNodes()
    return node


def test_prompts_index_the_voxel_array_when_the_image_data_does_not_start_at_zero(ctx):
    """Prompts are indices of the voxel array the engine gets (``arrayFromVolume``, from 0). For image
    data whose extent starts elsewhere, Slicer's IJK is that index plus the start: a click on the
    bright voxel became a prompt five voxels off, and the inside check was shifted the same way."""
    from SegAssistLib.slicer import volumes
    from SegAssistLib.slicer.interaction import Gesture, Tool, gesture_to_prompt

    start = np.array([5, 3, 2])
    volume = _volume_with_extent_start(ctx.scene, tuple(start))
    array = volumes.volume_from_node(volume).array
    bright = (3, 6, 4)  # (i, j, k) of the bright voxel in the array
    assert array[bright[::-1]] == 1000
    view = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=voxel_world(volume, start + bright))
    assert np.array_equal(slicer_xy_to_voxel(view, CENTER, volume), start + bright)  # Slicer's IJK

    prompt = gesture_to_prompt(Gesture(Tool.CLICK, True, "Red", (CENTER,)), view, volume)
    assert coordinates.voxel_index(prompt.position) == bright
    ijk = np.array([[0.0, 0.0, 0.0], [3.25, 9.5, 1.75], [13.0, 11.0, 9.0]])
    ras = coordinates.ijk_to_ras(ijk, volume)
    assert np.allclose(ras, [voxel_world(volume, start + p) for p in ijk], atol=1e-9)
    assert np.allclose(coordinates.ras_to_ijk(ras, volume), ijk, atol=1e-9)
    # the Volume's origin is where array voxel (0, 0, 0) is
    origin = volumes.ijk_to_ras_from_volume(volumes.volume_from_node(volume))[:3, 3]
    assert np.allclose(origin, voxel_world(volume, start))

    # the array's last voxel along i is inside; one past its first is outside
    for array_i, inside in ((13, True), (-1, False)):
        at = voxel_world(volume, start + (array_i, 6, 4))
        view = add_slice_node(ctx.scene, "Axial", DIMS, FOV, center_ras=at)
        gesture = Gesture(Tool.CLICK, True, "Red", (CENTER,))
        if inside:
            assert coordinates.voxel_index(gesture_to_prompt(gesture, view, volume).position) == (array_i, 6, 4)
        else:
            with pytest.raises(PromptError, match="outside"):
                gesture_to_prompt(gesture, view, volume)
