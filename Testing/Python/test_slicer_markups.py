"""Markups point lists and ROIs -> prompts, parent transforms included, on real MRML scenes."""

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
    voxel_world,
)

from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.prompts import BoxPrompt, PointPrompt

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402

from SegAssistLib.slicer import coordinates, markups  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


TARGETS = [
    ((4.0, 5.0, 6.0), "1"),
    ((10.25, 3.5, 7.75), "-2"),
    ((0.0, 23.0, 19.0), "rim"),
    ((12, 12, 12), " -4"),
]


def _point_list(ctx, volume, name="points"):
    """A point list under its own transform, its points placed at known voxel positions in the world."""
    transform = add_linear_transform(ctx.scene, affine(rotation((2, 1, 0), 50) * 1.0, (-3.0, 8.0, 1.5)), "pts frame")
    node = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.SetAndObserveTransformNodeID(transform.GetID())
    for ijk, label in TARGETS:
        node.AddControlPointWorld(vtk.vtkVector3d(*voxel_world(volume, ijk)), label)
    return node


def test_point_list_becomes_point_prompts_through_both_transforms(ctx):
    volume = add_nested_oblique_volume(ctx.scene)
    node = _point_list(ctx, volume)
    local = [0.0, 0.0, 0.0]
    node.GetNthControlPointPosition(0, local)
    assert not np.allclose(local, voxel_world(volume, TARGETS[0][0]))  # stored in its own frame

    prompts = markups.point_prompts(node, volume)
    assert all(isinstance(p, PointPrompt) for p in prompts)
    assert [p.positive for p in prompts] == [True, False, True, False]  # label prefix '-' = negative
    for prompt, (ijk, _) in zip(prompts, TARGETS):
        assert np.allclose(prompt.position, ijk, atol=1e-9)


def test_node_polarity_attribute_overrides_labels(ctx):
    volume = add_nested_oblique_volume(ctx.scene)
    node = _point_list(ctx, volume)
    markups.set_polarity(node, positive=False)
    assert node.GetAttribute(markups.POLARITY_ATTRIBUTE) == "negative"
    assert [p.positive for p in markups.point_prompts(node, volume)] == [False] * 4
    markups.set_polarity(node, positive=True)
    assert [p.positive for p in markups.point_prompts(node, volume)] == [True] * 4
    markups.set_polarity(node, None)
    assert [p.positive for p in markups.point_prompts(node, volume)] == [True, False, True, False]
    node.SetAttribute(markups.POLARITY_ATTRIBUTE, "maybe")
    with pytest.raises(SegAssistError, match="positive' or 'negative"):
        markups.point_prompts(node, volume)


def test_unplaced_points_are_skipped(ctx):
    volume = add_nested_oblique_volume(ctx.scene)
    node = _point_list(ctx, volume)
    node.SetNthControlPointPositionMissing(1)
    node.UnsetNthControlPointPosition(2)
    prompts = markups.point_prompts(node, volume)
    assert len(prompts) == 2
    assert np.allclose(prompts[1].position, TARGETS[3][0], atol=1e-9)


def test_mrk_json_file_reloads_to_the_same_prompts(ctx, tmp_path):
    volume = add_nested_oblique_volume(ctx.scene)
    node = _point_list(ctx, volume)
    before = markups.point_prompts(node, volume)
    storage = node.CreateDefaultStorageNode()
    ctx.scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "clicks.mrk.json"))
    assert storage.WriteData(node)

    with create_headless_scene() as other:
        volume2 = add_nested_oblique_volume(other.scene)
        loaded = markups.load_markups(other.markups_logic, tmp_path / "clicks.mrk.json")
        # The file holds positions in the list's own frame: put it back under the same transform.
        frame = add_linear_transform(other.scene, affine(rotation((2, 1, 0), 50), (-3.0, 8.0, 1.5)), "frame")
        loaded.SetAndObserveTransformNodeID(frame.GetID())
        after = markups.point_prompts(loaded, volume2)
    assert [p.positive for p in after] == [p.positive for p in before]
    assert np.allclose([p.position for p in after], [p.position for p in before], atol=1e-6)
    with pytest.raises(SegAssistError, match="could not read"):
        markups.load_markups(ctx.markups_logic, tmp_path / "missing.mrk.json")


def _lps_volume(scene):
    scanner = add_linear_transform(scene, affine(np.eye(3), (4.0, -6.0, 2.5)), "scanner")
    ijk_to_ras = affine(np.diag([-0.9, -0.9, 2.0]), (50.0, 40.0, -20.0))
    return add_volume(scene, random_volume((20, 24, 28)), ijk_to_ras, "lps", parent=scanner)


def test_roi_becomes_a_3d_box_through_its_transform(ctx):
    volume = _lps_volume(ctx.scene)
    lo, hi = np.array([3.0, 4.5, 2.0]), np.array([11.0, 15.5, 9.0])  # wanted box, continuous IJK
    world_lo, world_hi = voxel_world(volume, lo), voxel_world(volume, hi)
    # The ROI lives under a 90-degree turn about S plus a shift: axis-aligned in the world again.
    turn = affine(rotation((0, 0, 1), 90), (7.0, -2.0, 3.0))
    roi = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    roi.SetAndObserveTransformNodeID(add_linear_transform(ctx.scene, turn, "roi frame").GetID())
    center_world = (world_lo + world_hi) / 2
    center_local = np.linalg.inv(turn) @ np.append(center_world, 1.0)
    size_world = np.abs(world_hi - world_lo)
    roi.SetCenter(*center_local[:3])
    roi.SetSize(size_world[1], size_world[0], size_world[2])  # x and y swap under the turn
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)  # Slicer's own world bounds of the transformed ROI
    assert np.allclose(bounds[0::2], np.minimum(world_lo, world_hi), atol=1e-9)

    box = markups.roi_box_prompt(roi, volume)
    assert isinstance(box, BoxPrompt) and not box.is_2d
    assert np.allclose(box.min_corner, lo, atol=1e-9) and np.allclose(box.max_corner, hi, atol=1e-9)


def test_rotated_roi_gives_its_enclosing_box_and_flat_roi_a_2d_box(ctx):
    volume = _lps_volume(ctx.scene)
    roi = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "tilted")
    roi.SetCenter(*voxel_world(volume, (10, 12, 5)))
    roi.SetSize(9.0, 9.0, 4.0)
    object_to_node = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    object_to_node[:3, :3] = rotation((0, 0, 1), 45)
    roi.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(object_to_node))
    box = markups.roi_box_prompt(roi, volume)
    # The volume's grid is axis-aligned in the world, so the enclosing box is Slicer's RAS bounds.
    bounds = [0.0] * 6
    roi.GetRASBounds(bounds)
    ijk = coordinates.ras_to_ijk([bounds[0::2], bounds[1::2]], volume)
    assert np.allclose(box.min_corner, ijk.min(0), atol=1e-9) and np.allclose(box.max_corner, ijk.max(0), atol=1e-9)
    assert np.asarray(box.max_corner)[0] - np.asarray(box.min_corner)[0] == pytest.approx(9.0 * np.sqrt(2) / 0.9)
    assert len(markups.roi_corners_ras(roi)) == 8

    flat = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "flat")
    flat.SetCenter(*voxel_world(volume, (10, 12, 5)))
    flat.SetSize(9.0, 9.0, 0.0)
    box2 = markups.roi_box_prompt(flat, volume)
    assert box2.is_2d and box2.min_corner[2] == pytest.approx(5.0)
    line = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "line")
    line.SetCenter(0.0, 0.0, 0.0)
    line.SetSize(9.0, 0.0, 0.0)
    with pytest.raises(PromptError, match="degenerate"):
        markups.roi_box_prompt(line, volume)


def test_an_roi_fitted_to_an_oblique_volume_is_a_box_of_the_whole_image(ctx):
    """Slicer stores the fitted ROI's matrix with float noise: its box began at -0.5000006, and the
    engine refused the whole box as reaching outside the image."""
    from mrml_fixtures import oblique_ijk_to_ras

    from SegAssistLib.prompts import check_prompt_inside

    volume = add_volume(ctx.scene, np.zeros((20, 24, 28), np.int16), oblique_ijk_to_ras(), "oblique")
    dims, spacing = np.array(volume.GetImageData().GetDimensions()), np.array(volume.GetSpacing())
    directions = np.zeros((3, 3))
    volume.GetIJKToRASDirections(directions)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    center = (slicer.util.arrayFromVTKMatrix(ijk_to_ras) @ np.r_[(dims - 1) / 2.0, 1])[:3]
    roi = ctx.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "fitted")
    object_to_node = np.eye(4)
    object_to_node[:3, :3], object_to_node[:3, 3] = directions, center
    roi.GetObjectToNodeMatrix().DeepCopy(slicer.util.vtkMatrixFromArray(object_to_node))
    roi.SetSize(*(dims * spacing))
    if roi.GetNumberOfControlPoints() == 0:
        roi.AddControlPoint(*center)
    box = markups.roi_box_prompt(roi, volume)
    assert box.min_corner == (-0.5, -0.5, -0.5) and np.allclose(box.max_corner, dims - 0.5)
    check_prompt_inside(box, tuple(dims[::-1]))
