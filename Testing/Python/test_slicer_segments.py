"""Segments <-> masks, region writes with undo, and .seg.nrrd files, on real MRML scenes (slicer-core)."""

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
    segment_ids,
    world_image_geometry,
)

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import ImageError, SegAssistError, SessionError
from SegAssistLib.io import save_segmentation_nrrd

slicer = pytest.importorskip("slicer")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from SegAssistLib.slicer import segments, volumes  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402

SHAPE = (12, 14, 16)  # [k, j, i]


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _volume(scene):
    return add_nested_oblique_volume(scene, random_volume(SHAPE))


def _masks():
    a = np.zeros(SHAPE, np.uint8)
    a[2:7, 3:9, 4:10] = 1
    b = np.zeros(SHAPE, np.uint8)
    b[5:10, 6:12, 8:14] = 1
    b[a > 0] = 0  # a and b touch but do not overlap, so they can share a layer
    c = np.zeros(SHAPE, np.uint8)
    c[9:11, 0:3, 0:4] = 1
    return {"a": a, "b": b, "c": c}


def _segmentation(ctx, volume, masks, transform=None):
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    if transform is not None:
        seg.SetAndObserveTransformNodeID(add_linear_transform(ctx.scene, transform, "seg frame").GetID())
        seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    colors = {"a": (1.0, 0.0, 0.0), "b": (0.0, 1.0, 0.0), "c": (0.0, 0.0, 1.0)}
    for sid, mask in masks.items():
        assert segments.add_segment(seg, f"segment {sid}", colors[sid], segment_id=sid) == sid
        segments.array_to_segment(mask, seg, sid, volume)
    return seg


def _slicer_export(seg, segment_id, volume):
    """Oracle: Slicer's own export of one segment onto the volume's grid."""
    labelmap = seg.GetScene().AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg, [segment_id], labelmap, volume)
    out = slicer.util.arrayFromVolume(labelmap).copy()
    seg.GetScene().RemoveNode(labelmap)
    return out


def _read_all(seg, volume):
    return {sid: segments.segment_to_array(seg, sid, volume) for sid in segment_ids(seg)}


def test_masks_round_trip_on_a_transformed_oblique_volume(ctx):
    volume = _volume(ctx.scene)
    masks = _masks()
    seg = _segmentation(ctx, volume, masks, transform=affine(rotation((0, 1, 1), -20), (1.5, 2.5, -4.0)))

    assert seg.GetSegmentation().GetNumberOfLayers() < 3  # some segments share a layer
    for sid, mask in masks.items():
        got = segments.segment_to_array(seg, sid, volume)
        assert got.dtype == np.uint8 and got.shape == SHAPE
        assert np.array_equal(got, mask), sid
    # Where Slicer itself puts the stored segments in the world (it applies the segmentation's parent
    # transform) is where the volume's voxels are (nested transforms, composed by transform nodes).
    ijk_from_world = np.linalg.inv(world_image_geometry(volume))
    for sid, mask in masks.items():
        assert np.array_equal(_voxels_in_world_frame(seg, sid, ijk_from_world), np.argwhere(mask > 0)), sid

    # Slicer's own export agrees when only one linear transform lies between the nodes (with more,
    # slicer-core 5.13's export misplaces the grid; see SegAssistLib.slicer.segments).
    volume.SetAndObserveTransformNodeID(None)
    seg2 = _segmentation(ctx, volume, masks, transform=affine(rotation((0, 1, 1), -20), (1.5, 2.5, -4.0)))
    for sid, mask in masks.items():
        assert np.array_equal(_slicer_export(seg2, sid, volume), mask), sid


def _voxels_in_world_frame(seg, segment_id, ijk_from_world):
    """[k, j, i] indices, sorted, of the segment's voxels, placed by Slicer in world RAS."""
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(seg, segment_id, image, True)
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    label = seg.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    e = image.GetExtent()
    ijk = np.argwhere(values == label)[:, ::-1] + [e[0], e[2], e[4]]
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)
    world = slicer.util.arrayFromVTKMatrix(m) @ np.column_stack([ijk, np.ones(len(ijk))]).T
    volume_ijk = np.rint((ijk_from_world @ world).T[:, :3]).astype(int)
    return volume_ijk[np.lexsort(volume_ijk.T)][:, ::-1] if len(volume_ijk) else volume_ijk


def test_region_write_keeps_other_segments_and_undo_restores(ctx):
    volume = _volume(ctx.scene)
    masks = _masks()
    seg = _segmentation(ctx, volume, masks)
    editor = segments.SegmentEditor(seg, volume)
    assert not editor.can_undo
    with pytest.raises(SessionError):
        editor.undo()

    rng = np.random.default_rng(7)
    box = (rng.random((4, 5, 6)) > 0.4).astype(np.uint8)
    update = MaskUpdate(offset=(4, 5, 6), voxels=box)  # overlaps a and b, not c
    expected_a = masks["a"].copy()
    update.apply_to(expected_a)
    assert np.any(expected_a & masks["b"])  # the write covers voxels of b

    editor.write("a", update)
    after = _read_all(seg, volume)
    assert np.array_equal(after["a"], expected_a)
    assert np.array_equal(after["b"], masks["b"])  # never overwritten
    assert np.array_equal(after["c"], masks["c"])

    second = MaskUpdate(offset=(0, 0, 0), voxels=np.zeros((3, 4, 5), np.uint8))
    editor.write("a", second)
    expected_a2 = expected_a.copy()
    second.apply_to(expected_a2)
    assert np.array_equal(segments.segment_to_array(seg, "a", volume), expected_a2)

    editor.undo()
    assert np.array_equal(segments.segment_to_array(seg, "a", volume), expected_a)
    editor.undo()
    restored = _read_all(seg, volume)
    for sid, mask in masks.items():
        assert np.array_equal(restored[sid], mask), sid
    assert editor.can_redo
    editor.redo()
    assert np.array_equal(segments.segment_to_array(seg, "a", volume), expected_a)
    assert np.array_equal(segments.segment_to_array(seg, "b", volume), masks["b"])
    editor.close()
    assert editor.editor_node.GetScene() is None


def test_overwriting_write_takes_voxels_only_inside_the_box(ctx):
    volume = _volume(ctx.scene)
    masks = _masks()
    seg = _segmentation(ctx, volume, masks)
    editor = segments.SegmentEditor(seg, volume, overwrite_other_segments=True)
    update = MaskUpdate(offset=(4, 5, 6), voxels=np.ones((4, 5, 6), np.uint8))
    editor.write("a", update)

    expected_b = masks["b"].copy()
    expected_b[update.slices] = 0
    after = _read_all(seg, volume)
    assert np.array_equal(after["b"], expected_b)
    assert after["a"][update.slices].all()
    assert np.array_equal(after["c"], masks["c"])
    editor.undo()
    assert np.array_equal(segments.segment_to_array(seg, "b", volume), masks["b"])


def test_region_write_into_an_empty_segment_of_a_transformed_segmentation(ctx):
    volume = _volume(ctx.scene)
    seg = _segmentation(ctx, volume, {}, transform=affine(rotation((0, 1, 1), -20), (1.5, 2.5, -4.0)))
    sid = segments.add_segment(seg, "new")
    editor = segments.SegmentEditor(seg, volume)
    voxels = (np.random.default_rng(3).random((5, 6, 7)) > 0.5).astype(np.uint8)
    update = MaskUpdate(offset=(3, 4, 5), voxels=voxels)
    editor.write(sid, update)
    expected = np.zeros(SHAPE, np.uint8)
    update.apply_to(expected)
    assert np.array_equal(segments.segment_to_array(seg, sid, volume), expected)
    ijk_from_world = np.linalg.inv(world_image_geometry(volume))
    assert np.array_equal(_voxels_in_world_frame(seg, sid, ijk_from_world), np.argwhere(expected > 0))
    editor.undo()
    assert not segments.segment_to_array(seg, sid, volume).any()


def test_update_labelmaps_cover_exactly_the_box(ctx):
    volume = _volume(ctx.scene)
    seg = _segmentation(ctx, volume, {})
    voxels = np.zeros((2, 3, 4), np.uint8)
    voxels[1, 2, 3] = 1
    add, remove, extent = segments.update_labelmaps(MaskUpdate((5, 6, 7), voxels), seg, volume)
    assert extent == (7, 10, 6, 8, 5, 6)  # i, j, k ranges, inclusive
    assert add.GetExtent() == remove.GetExtent() == extent
    assert add.GetPointData().GetScalars().GetRange() == (0.0, 1.0)
    with pytest.raises(ImageError, match="does not fit"):
        segments.update_labelmaps(MaskUpdate((11, 0, 0), voxels), seg, volume)


def test_seg_nrrd_reloads_identically_through_storage_nodes(tmp_path):
    masks = _masks()
    with create_headless_scene() as first:
        volume = _volume(first.scene)
        seg = _segmentation(first, volume, masks)
        # Save the volume hardened, as a file on its own grid in world space, and the segmentation.
        volumes.harden_transform(volume)
        volume_file = volumes.save_volume_file(volume, tmp_path / "image.nrrd")
        seg_file = segments.save_segmentation(seg, tmp_path / "labels.seg.nrrd")
        names = {sid: seg.GetSegmentation().GetSegment(sid).GetName() for sid in masks}
        colors = {sid: seg.GetSegmentation().GetSegment(sid).GetColor() for sid in masks}

    with create_headless_scene() as second:
        volume = volumes.load_volume_file(second.scene, volume_file)
        seg = segments.load_segmentation(second.scene, seg_file)
        assert seg.GetName() == "labels"
        assert segment_ids(seg) == list(masks)
        for sid, mask in masks.items():
            segment = seg.GetSegmentation().GetSegment(sid)
            assert segment.GetName() == names[sid]
            assert np.allclose(segment.GetColor(), colors[sid])
            assert np.array_equal(segments.segment_to_array(seg, sid, volume), mask), sid


def test_seg_nrrd_written_by_simpleitk_loads_into_slicer(ctx, tmp_path):
    volume = _volume(ctx.scene)
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:5, 2:6, 3:9] = 1
    labels[6:9, 8:12, 2:5] = 2
    path = save_segmentation_nrrd(
        labels,
        volumes.volume_from_node(volume),
        tmp_path / "sitk.seg.nrrd",
        segment_names=("liver", "tumour"),
    )
    seg = segments.load_segmentation(ctx.scene, path)
    ids = segment_ids(seg)
    assert [seg.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["liver", "tumour"]
    for value, sid in enumerate(ids, start=1):
        assert np.array_equal(segments.segment_to_array(seg, sid, volume), (labels == value).astype(np.uint8))


def test_segments_kept_as_surfaces_are_not_converted_behind_the_users_back(ctx):
    """A segmentation of imported models keeps closed surfaces; a write once converted it to labelmaps,
    replacing every segment's surface by one regenerated from voxels."""
    volume = _volume(ctx.scene)
    seg = segments.create_segmentation(ctx.scene, volume, "models")
    seg.GetSegmentation().SetSourceRepresentationName("Closed surface")
    sphere = vtk.vtkSphereSource()
    sphere.SetRadius(3.0)
    sphere.Update()
    seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "liver", [1.0, 0.0, 0.0], "liver")
    target = segments.add_segment(seg, "SegAssist")
    points = sphere.GetOutput().GetNumberOfPoints()
    assert segments.segment_holds_voxels(seg, "liver") and not segments.segment_holds_voxels(seg, target)
    with pytest.raises(SegAssistError, match="Binary labelmap.*source representation first"):
        segments.array_to_segment(_masks()["a"], seg, target, volume)
    assert seg.GetSegmentation().GetSourceRepresentationName() == "Closed surface"
    assert seg.GetSegmentation().GetSegment("liver").GetRepresentation("Closed surface").GetNumberOfPoints() == points


def test_clear_errors(ctx, tmp_path):
    volume = _volume(ctx.scene)
    seg = _segmentation(ctx, volume, {"a": _masks()["a"]})
    with pytest.raises(SegAssistError, match="no segment 'zz'"):
        segments.segment_to_array(seg, "zz", volume)
    with pytest.raises(ImageError, match="shape"):
        segments.array_to_segment(np.zeros((2, 2, 2)), seg, "a", volume)
    with pytest.raises(SegAssistError, match="not found"):
        segments.load_segmentation(ctx.scene, tmp_path / "missing.seg.nrrd")
    empty = segments.add_segment(seg, "empty")
    assert not segments.segment_to_array(seg, empty, volume).any()
    # Slicer's segmentation storage writes NRRD whatever the name says: NRRD bytes in a .nii.gz
    for name in ("labels.nii.gz", "labels.mha", "labels"):
        with pytest.raises(SegAssistError, match=r"cannot write segmentation as .*\.seg\.nrrd"):
            segments.save_segmentation(seg, tmp_path / name)
        assert not (tmp_path / name).exists()
    assert segments.save_segmentation(seg, tmp_path / "labels.nrrd").read_bytes().startswith(b"NRRD")


def test_an_answer_adds_and_removes_only_the_voxels_it_changes(ctx):
    """The segment was drawn on a grid twice as fine as the source volume (the segmentation's
    geometry). An answer's box used to be written whole (add inside, remove outside), flattening
    the segment's detail where the answer changed nothing, and on the volume's grid, which made
    Slicer re-grid the layer. Now only the fine voxels of the coarse voxels where the answer differs
    from the segment (read on the volume's grid, in the box alone) are added or removed, on the
    segmentation's own fine grid."""
    coarse = add_volume(ctx.scene, random_volume((10, 12, 14)), affine(np.eye(3) * 2.0, (0.0, 0.0, 0.0)), "coarse")
    fine = add_volume(ctx.scene, random_volume((20, 24, 28)), affine(np.eye(3), (-0.5, -0.5, -0.5)), "fine")
    seg = segments.create_segmentation(ctx.scene, fine, "seg")
    sid = segments.add_segment(seg, "ball")
    k, j, i = np.meshgrid(*[np.arange(n) for n in (20, 24, 28)], indexing="ij")
    ball = (((k - 10) ** 2 + (j - 12) ** 2 + (i - 14) ** 2) < 36).astype(np.uint8)
    segments.array_to_segment(ball, seg, sid, fine)
    on_coarse = segments.segment_to_array(seg, sid, coarse)
    box = ((1, 2, 3), (4, 5, 6))
    assert np.array_equal(segments.segment_to_array(seg, sid, coarse, box), on_coarse[1:5, 2:7, 3:9])
    with pytest.raises(ImageError, match="does not fit"):
        segments.segment_to_array(seg, sid, coarse, ((8, 0, 0), (3, 1, 1)))
    answer = on_coarse[0:8, 0:9, 0:10].copy()
    answer[0, 0, 0] = 1  # the model adds one voxel far from the ball and removes one of its voxels
    inside = np.argwhere(answer)[len(np.argwhere(answer)) // 2]
    answer[tuple(inside)] = 0
    update = MaskUpdate(offset=(0, 0, 0), voxels=answer)
    add, remove, extent = segments.update_labelmaps(update, seg, coarse, sid)
    assert extent[0] == extent[2] == extent[4] == 0  # on the fine grid (coarse voxel c is fine 2c, 2c + 1)
    fine_voxels = lambda image: {tuple(v) for v in np.argwhere(_labelmap_array(image))}  # noqa: E731
    assert fine_voxels(add) == {(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)}
    kk, jj, ii = (2 * int(v) for v in inside)
    removed = {(a, b, c) for a in (kk, kk + 1) for b in (jj, jj + 1) for c in (ii, ii + 1) if ball[a, b, c]}
    assert removed and fine_voxels(remove) == removed
    whole_add, whole_remove, _ = segments.update_labelmaps(update, seg, coarse)  # without a segment: the box
    assert _labelmap_array(whole_add).sum() + _labelmap_array(whole_remove).sum() == 8 * answer.size
    layer_grid = world_image_geometry(fine)
    editor = segments.SegmentEditor(seg, coarse)
    editor.write(sid, update)  # the result on the volume's grid is the answer, as before
    assert np.array_equal(segments.segment_to_array(seg, sid, coarse)[0:8, 0:9, 0:10], answer)
    expected = ball.copy()
    expected[0:2, 0:2, 0:2] = 1
    expected[kk : kk + 2, jj : jj + 2, ii : ii + 2] = 0
    assert np.array_equal(segments.segment_to_array(seg, sid, fine), expected)  # the rest of the detail stays
    assert np.allclose(world_image_geometry(fine), layer_grid)
    editor.close()


def _labelmap_array(image) -> np.ndarray:
    nk, nj, ni = image.GetDimensions()[::-1]
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni)


def _series_pair(ctx, spacing: float, origin):
    """A segmentation made on series 1 (its geometry), holding a hand-painted segment, and series 2
    on another grid (shifted, or coarser) that SegAssist segments into it."""
    series1 = add_volume(ctx.scene, random_volume((30, 30, 30)), affine(np.eye(3), (0.0, 0.0, 0.0)), "series 1")
    series2 = add_volume(ctx.scene, random_volume((20, 20, 20)), affine(np.eye(3) * spacing, origin), "series 2")
    seg = segments.create_segmentation(ctx.scene, series1, "user seg")
    painted = segments.add_segment(seg, "liver, painted by hand")
    k, j, i = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    liver = (((k - 8) ** 2 + (j - 9) ** 2 + (i - 10) ** 2) < 30).astype(np.uint8)
    segments.array_to_segment(liver, seg, painted, series1)
    return series1, series2, seg, painted, liver


@pytest.mark.parametrize(
    "spacing, origin", [(1.0, (10.5, 10.0, 10.0)), (1.0, (10.0, 10.0, 10.0)), (2.0, (0.0, 0.0, 0.0))]
)
def test_writes_on_another_series_keep_the_segmentations_grid_and_its_other_segments(ctx, spacing, origin):
    """Writes were built on the segmented volume's grid; where the segmentation's geometry was another
    series', Slicer re-gridded the shared layer and resampled the hand-painted segment in it (181 of
    691 voxels changed, no undo). Writes now land on the segmentation's geometry."""
    series1, series2, seg, painted, liver = _series_pair(ctx, spacing, origin)
    answer = np.zeros((20, 20, 20), np.uint8)
    answer[12:15, 12:15, 12:15] = 1  # far from the liver
    whole = segments.add_segment(seg, "SegAssist")
    segments.array_to_segment(answer, seg, whole, series2)  # the module's button
    region = segments.add_segment(seg, "SegAssist 2")
    editor = segments.SegmentEditor(seg, series2)  # the effect's path
    editor.write(region, MaskUpdate(offset=(12, 12, 12), voxels=np.ones((3, 3, 3), np.uint8)))
    editor.close()
    assert np.array_equal(segments.segment_to_array(seg, painted, series1), liver)
    for written in (whole, region):
        assert segments.segment_to_array(seg, written, series1).sum() == 27 * spacing**3  # ties: nearest rounds up
        if origin[0] == int(origin[0]):  # whole voxels apart: nearest neighbour there and back is exact
            assert np.array_equal(segments.segment_to_array(seg, written, series2), answer)
    layer = slicer.util.arrayFromVTKMatrix(_layer_image_to_world(seg, painted))
    assert np.allclose(layer, world_image_geometry(series1))  # the layer keeps the segmentation's grid


@pytest.mark.parametrize("spacing, origin", [(1.0, (10.5, 10.0, 10.0)), (2.0, (0.0, 0.0, 0.0))])
def test_a_segmentation_tells_whether_it_is_on_a_volumes_grid(ctx, spacing, origin):
    """The module writes into a segmentation of another series only knowingly: on its own grid an
    answer is resampled (a thin one lost), so it makes a segmentation of the volume instead."""
    series1, series2, seg, _, _ = _series_pair(ctx, spacing, origin)
    assert segments.on_volume_grid(seg, series1) and not segments.on_volume_grid(seg, series2)
    own = segments.create_segmentation(ctx.scene, series2, "series 2 seg")
    assert segments.on_volume_grid(own, series2) and not segments.on_volume_grid(own, series1)
    empty = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "no geometry yet")
    assert segments.on_volume_grid(empty, series1) and segments.on_volume_grid(empty, series2)


def _layer_image_to_world(seg, segment_id):
    matrix = vtk.vtkMatrix4x4()
    seg.GetSegmentation().GetSegment(segment_id).GetRepresentation(segments.BINARY_LABELMAP).GetImageToWorldMatrix(
        matrix
    )
    return matrix


@pytest.mark.parametrize("geometry_from", ["full", "crop"])
def test_the_editors_masking_applies_when_the_segmentation_has_another_geometry(ctx, geometry_from):
    """Slicer's editor masks on the segmentation's geometry: a labelmap on the volume's grid made it
    write nothing under an intensity range (silently), and ignore "outside all segments"."""
    full = add_volume(ctx.scene, np.full((30, 30, 30), 100, np.int16), affine(np.eye(3), (0.0, 0.0, 0.0)), "full")
    crop = add_volume(ctx.scene, np.full((20, 20, 20), 100, np.int16), affine(np.eye(3), (10.0, 10.0, 10.0)), "crop")
    seg = segments.create_segmentation(ctx.scene, full if geometry_from == "full" else crop, "seg")
    other = segments.add_segment(seg, "other")
    other_mask = np.zeros((20, 20, 20), np.uint8)
    other_mask[12:16, 12:16, 12:14] = 1
    segments.array_to_segment(other_mask, seg, other, crop)
    sid = segments.add_segment(seg, "s")
    cube = MaskUpdate(offset=(12, 12, 12), voxels=np.ones((4, 4, 4), np.uint8))

    editor = segments.SegmentEditor(seg, crop)
    editor.editor_node.SetSourceVolumeIntensityMask(True)
    editor.editor_node.SetSourceVolumeIntensityMaskRange(50, 150)  # every voxel is 100: all allowed
    editor.write(sid, cube)
    assert segments.segment_to_array(seg, sid, crop).sum() == 64
    assert np.array_equal(segments.segment_to_array(seg, other, crop), other_mask)  # overwrite none
    editor.editor_node.SetSourceVolumeIntensityMaskRange(500, 600)  # none allowed
    editor.write(sid, MaskUpdate(offset=(0, 0, 0), voxels=np.ones((2, 2, 2), np.uint8)))
    assert segments.segment_to_array(seg, sid, crop)[0:2, 0:2, 0:2].sum() == 0
    editor.close()

    segments.array_to_segment(np.zeros((20, 20, 20), np.uint8), seg, sid, crop)
    editor = segments.SegmentEditor(seg, crop, overwrite_other_segments=True)
    editor.editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor.write(sid, cube)
    assert segments.segment_to_array(seg, sid, crop).sum() == 32
    assert np.array_equal(segments.segment_to_array(seg, other, crop), other_mask)
    editor.close()


def test_an_answer_the_segmentations_geometry_does_not_reach_is_refused_whole(ctx):
    """A segmentation whose geometry was set before a transform moved it away from the volume: the
    part of an answer outside its grid cannot be written, and a silently clipped segment is wrong."""
    volume = add_volume(ctx.scene, np.full((20, 20, 20), 100, np.int16), affine(np.eye(3), (10.0, 10.0, 10.0)))
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    seg.SetAndObserveTransformNodeID(
        add_linear_transform(ctx.scene, affine(rotation((0, 0, 1), 30), (3, 2, 1))).GetID()
    )
    sid = segments.add_segment(seg, "s")
    editor = segments.SegmentEditor(seg, volume)
    with pytest.raises(ImageError, match=r"voxels of the answer lie outside the geometry of segmentation 'seg'"):
        editor.write(sid, MaskUpdate(offset=(12, 12, 12), voxels=np.ones((4, 4, 4), np.uint8)))
    assert not segments.segment_holds_voxels(seg, sid) and not editor.can_undo
    editor.close()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # the fix the message names
    segments.array_to_segment(np.pad(np.ones((4, 4, 4), np.uint8), 8), seg, sid, volume)
    assert segments.segment_to_array(seg, sid, volume)[8:12, 8:12, 8:12].all()


def test_a_segmentation_converted_from_a_labelmap_keeps_its_segments_grid(ctx):
    """Such a segmentation names no geometry: writes took the volume's grid, and Slicer re-gridded
    the layer under the hand-painted segment (194 of 691 voxels changed). Its segments' grid is kept,
    over the whole volume (not cut to what the segments hold)."""
    series1 = add_volume(ctx.scene, random_volume((30, 30, 30)), affine(np.eye(3), (0.0, 0.0, 0.0)), "series 1")
    series2 = add_volume(ctx.scene, random_volume((20, 20, 20)), affine(np.eye(3), (10.5, 10.0, 10.0)), "series 2")
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "converted")
    seg.CreateDefaultDisplayNodes()
    k, j, i = np.meshgrid(*[np.arange(30)] * 3, indexing="ij")
    liver = (((k - 8) ** 2 + (j - 9) ** 2 + (i - 10) ** 2) < 30).astype(np.uint8)
    labelmap = ctx.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "liver labelmap")
    slicer.util.updateVolumeFromArray(labelmap, liver)
    assert _Logic().ImportLabelmapToSegmentationNode(labelmap, seg, "")
    painted = seg.GetSegmentation().GetNthSegmentID(0)
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    assert not seg.GetSegmentation().GetConversionParameter(parameter)
    answer = np.zeros((20, 20, 20), np.uint8)
    answer[2:5, 2:5, 2:5] = 1  # outside the liver's box: the segments' extent is not a border
    written = segments.add_segment(seg, "SegAssist")
    segments.array_to_segment(answer, seg, written, series2)
    assert np.array_equal(segments.segment_to_array(seg, painted, series1), liver)
    assert segments.segment_to_array(seg, written, series1).sum() == 27


def _Logic():
    return slicer.vtkSlicerSegmentationsModuleLogic


def _shifted_geometry(seg, origin, spacing: float = 1.0, size: int = 20) -> None:
    geometry = slicer.vtkOrientedImageData()
    geometry.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(affine(np.eye(3) * spacing, origin)))
    geometry.SetExtent(0, size - 1, 0, size - 1, 0, size - 1)
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    seg.GetSegmentation().SetConversionParameter(
        parameter, slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
    )


def test_an_answer_that_would_vanish_on_the_segmentations_grid_is_refused_not_dropped(ctx):
    """Two ways an answer wrote nothing, silently: a voxel half a voxel beyond the segmentation's
    grid (a tie the resampling hands outside), and a sheet thinner than a coarser grid's voxels."""
    volume = add_volume(ctx.scene, random_volume((20, 20, 20)), affine(np.eye(3), (0.0, 0.0, 0.0)), "volume")
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    sid = segments.add_segment(seg, "s")
    _shifted_geometry(seg, (0.5, 0.0, 0.0))  # the volume's grid moved half a voxel along i
    edge = np.zeros((20, 20, 20), np.uint8)
    edge[5, 5, 0] = 1
    with pytest.raises(ImageError, match="1 voxels of the answer lie outside the geometry"):
        segments.array_to_segment(edge, seg, sid, volume)
    editor = segments.SegmentEditor(seg, volume)
    with pytest.raises(ImageError, match="outside the geometry"):
        editor.write(sid, MaskUpdate((5, 5, 0), np.ones((1, 1, 1), np.uint8)))
    editor.write(sid, MaskUpdate((5, 5, 19), np.ones((1, 1, 1), np.uint8)))  # the other end is written
    assert segments.segment_holds_voxels(seg, sid)
    editor.close()

    _shifted_geometry(seg, (0.5, 0.5, 0.5), spacing=2.0, size=10)  # a 2 mm grid under a 1 mm volume
    sheet = np.zeros((20, 20, 20), np.uint8)
    sheet[4:16, 4:16, 8] = 1  # one voxel thick, between the 2 mm grid's samples
    with pytest.raises(ImageError, match=r"the answer \(144 voxels\) is thinner than the voxels"):
        segments.array_to_segment(sheet, seg, sid, volume)
    sheet = np.roll(sheet, 1, axis=2)
    segments.array_to_segment(sheet, seg, sid, volume)
    assert segments.segment_to_array(seg, sid, volume).sum() == 288  # on the grid's samples: written


def _set_geometry(seg, image_to_world: np.ndarray, extent) -> None:
    """Set the segmentation's reference geometry parameter (its grid, in its own frame)."""
    geometry = slicer.vtkOrientedImageData()
    geometry.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(np.asarray(image_to_world, float)))
    geometry.SetExtent(*extent)
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    seg.GetSegmentation().SetConversionParameter(
        parameter, slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
    )


def test_a_geometry_on_the_volumes_voxels_but_cut_smaller_is_not_the_volumes_grid(ctx):
    """Slicer's *Specify geometry* from a segmentation crops it to what the segments hold. Such a
    geometry has the volume's origin, spacing and directions (``DoGeometriesMatch`` holds, as it
    ignores extents), and answers beyond its extent were written there without the check: they are
    refused whole, as on any other geometry; the module makes a new segmentation instead."""
    volume = add_volume(ctx.scene, random_volume((10, 12, 14)), affine(np.diag([-1.0, -1.0, 2.0]), (5, 6, 7)), "v")
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    _set_geometry(seg, slicer.util.arrayFromVTKMatrix(ijk_to_ras), (0, 6, 0, 5, 0, 4))  # i 0..6, j 0..5, k 0..4
    sid = segments.add_segment(seg, "s")
    assert not segments.on_volume_grid(seg, volume)
    editor = segments.SegmentEditor(seg, volume)
    beyond = MaskUpdate((6, 6, 6), np.ones((4, 4, 4), np.uint8))
    with pytest.raises(ImageError, match="64 voxels of the answer lie outside the geometry of segmentation 'seg'"):
        editor.write(sid, beyond)
    whole = np.zeros((10, 12, 14), np.uint8)
    whole[6:10, 6:10, 6:10] = 1
    with pytest.raises(ImageError, match="64 voxels of the answer lie outside"):
        segments.array_to_segment(whole, seg, sid, volume)
    assert not segments.segment_holds_voxels(seg, sid)

    inside = np.zeros((10, 12, 14), np.uint8)
    inside[1:4, 2:5, 3:6] = 1
    editor.write(sid, MaskUpdate((0, 0, 0), inside[:5, :6, :7]))  # the box is the geometry's extent
    crossing = np.zeros((4, 4, 4), np.uint8)
    crossing[:2, :3, :4] = 1  # a box reaching beyond the extent, its voxels not
    editor.write(sid, MaskUpdate((3, 3, 3), crossing))
    editor.close()
    expected = inside.copy()
    expected[3:7, 3:7, 3:7] = crossing
    assert np.array_equal(segments.segment_to_array(seg, sid, volume), expected)

    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)  # the whole volume: its grid again
    assert segments.on_volume_grid(seg, volume)


def test_the_segmentations_geometry_holds_its_segments_as_the_editors_does(ctx):
    """An imported segment beyond the geometry parameter's extent: Slicer's editor widens the
    geometry to contain every segment; an answer trimming that segment was refused as outside."""
    volume = add_volume(ctx.scene, random_volume((10, 12, 14)), affine(np.eye(3), (0, 0, 0)), "v")
    seg = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    fine = affine(np.eye(3) * 0.5, (0.25, 0.25, 0.25))  # 2x oversampled: covers volume voxels 0..5
    _set_geometry(seg, fine, (0, 11, 0, 11, 0, 11))
    sid = segments.add_segment(seg, "imported")
    imported = slicer.vtkOrientedImageData()
    imported.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(fine))
    imported.SetExtent(14, 17, 14, 17, 14, 17)  # volume voxels 7..8
    imported.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    imported.GetPointData().GetScalars().Fill(1)
    assert _Logic().SetBinaryLabelmapToSegment(imported, seg, sid, _Logic().MODE_REPLACE)
    slicers = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(seg.GetSegmentation())
    expected_extent = tuple(int(v) for v in slicers.strip(";").split(";")[-6:])
    assert segments.segmentation_geometry(seg, volume).GetExtent() == expected_extent == (0, 17, 0, 17, 0, 17)

    trimmed = np.ones((2, 2, 2), np.uint8)
    trimmed[0, 0, 0] = 0  # the model trims one voxel of the imported segment
    editor = segments.SegmentEditor(seg, volume)
    editor.write(sid, MaskUpdate((7, 7, 7), trimmed))
    editor.close()
    assert np.array_equal(segments.segment_to_array(seg, sid, volume)[7:9, 7:9, 7:9], trimmed)
    assert segments.segment_to_array(seg, sid, volume).sum() == 7


@pytest.mark.parametrize("fine_range", [(8, 13), (9, 12), (8, 12), (9, 13)])
def test_a_segment_on_an_oversampled_geometry_reads_without_an_extra_layer(ctx, fine_range):
    """With Slicer's oversampling factor 2 the fine voxels' boundaries lie on the volume's voxel
    centres. VTK takes a point up to half a voxel outside an image as on its edge, so such a centre
    on the outer boundary of the segment's (cropped) labelmap read as inside on every face: one
    layer of volume voxels too many (one whole slice of a thick-slice volume's starting mask).
    Ties now go one way everywhere: half up, as nearest-neighbour resampling rounds them."""
    volume = add_volume(ctx.scene, random_volume((12, 12, 12)), affine(np.eye(3), (0, 0, 0)), "v")
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    geometry = segments.reference_geometry(volume, seg)
    slicer.vtkCalculateOversamplingFactor.ApplyOversamplingOnImageGeometry(geometry, 2.0)  # as Slicer's editor
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    seg.GetSegmentation().SetConversionParameter(
        parameter, slicer.vtkSegmentationConverter.SerializeImageGeometry(geometry)
    )
    sid = segments.add_segment(seg, "s")
    lo, hi = fine_range
    fine = np.zeros((24, 24, 24), np.uint8)
    fine[lo:hi, lo:hi, lo:hi] = 1
    assert _Logic().SetBinaryLabelmapToSegment(
        segments.oriented_labelmap(fine, geometry), seg, sid, _Logic().MODE_REPLACE
    )
    # oracle: the fine voxel each volume voxel centre falls in, a tie rounded up
    centres = (np.arange(12) - geometry.GetOrigin()[0]) / geometry.GetSpacing()[0]
    nearest = np.floor(centres + 0.5).astype(int)
    along = ((nearest >= lo) & (nearest < hi)).astype(np.uint8)
    expected = along[:, None, None] * along[None, :, None] * along[None, None, :]
    assert geometry.GetSpacing() == (0.5, 0.5, 0.5)
    assert np.array_equal(segments.segment_to_array(seg, sid, volume), expected)
    box = ((3, 3, 3), (5, 5, 5))  # a box of it, resampled alone, reads the same
    assert np.array_equal(segments.segment_to_array(seg, sid, volume, box), expected[3:8, 3:8, 3:8])


def test_writing_a_large_mask_on_another_geometry_does_not_list_its_voxels(ctx):
    """The box of a whole-segment write onto another geometry was found with np.argwhere (24 bytes
    a voxel of the segment, then more); a few bytes a voxel now, for the resampling itself."""
    import tracemalloc

    shape = (64, 160, 160)
    volume = add_volume(ctx.scene, np.zeros(shape, np.int16), affine(np.eye(3), (0, 0, 0)), "v")
    seg = segments.create_segmentation(ctx.scene, volume, "seg")
    _set_geometry(seg, affine(np.eye(3), (0.5, 0.0, 0.0)), (-2, 170, -2, 170, -2, 70))  # half a voxel along i
    sid = segments.add_segment(seg, "body")
    body = np.zeros(shape, np.uint8)
    body[2:62, 5:155, 5:155] = 1
    tracemalloc.start()
    try:
        segments.array_to_segment(body, seg, sid, volume)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 12 * int(body.sum())
    assert segments.segment_to_array(seg, sid, volume).sum() == body.sum()
