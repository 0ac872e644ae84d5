"""Reset, and undo back to before the first prompt, give the segment back exactly as it was, also
when the segmentation keeps it on another grid than the volume SegAssist segments (an oversampled
geometry, thin slices drawn on another series, a rotated series): its own voxels, not the volume's
view of them, which would lose the detail between the volume's voxels. Real MRML (slicer-core),
written through vtkSlicerSegmentEditorLogic as the effect writes through modifySelectedSegmentByLabelmap."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import add_volume, affine, random_volume, rotation, segment_editor_logic

from SegAssistLib.engine.base import MaskUpdate

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import segments  # noqa: E402
from SegAssistLib.slicer.object_writes import ObjectWrites  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _oversampled(scene):
    """A 2 mm volume; the segmentation's geometry oversamples it twice (1 mm), and the tumor is a
    hollow box with walls one fine voxel thick, as drawn there: most of it falls between the
    volume's voxel centres."""
    shape = (8, 10, 12)
    vol = add_volume(scene, random_volume(shape), affine(np.eye(3) * 2.0, (0, 0, 0)), "v")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    seg.CreateDefaultDisplayNodes()
    fine = slicer.vtkOrientedImageData()
    fine.SetExtent(0, 2 * shape[2] - 1, 0, 2 * shape[1] - 1, 0, 2 * shape[0] - 1)
    fine.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(affine(np.eye(3), (-0.5, -0.5, -0.5))))
    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    seg.GetSegmentation().SetConversionParameter(name, slicer.vtkSegmentationConverter.SerializeImageGeometry(fine))
    segments.add_segment(seg, "tumor", segment_id="tumor")
    shell = np.zeros((2 * shape[0], 2 * shape[1], 2 * shape[2]), np.uint8)
    shell[4:12, 4:14, 4:18] = 1
    shell[5:11, 5:13, 5:17] = 0
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.SetBinaryLabelmapToSegment(segments.oriented_labelmap(shell, fine), seg, "tumor", logic.MODE_REPLACE)
    box = (slice(2, 6), slice(2, 7), slice(2, 9))  # the model's answer: the object filled in
    return vol, seg, box


def _thin_slices(scene):
    """The lesion drawn on a 1 mm series; SegAssist runs on a 5 mm series of the same field of view."""
    thick = add_volume(scene, random_volume((20, 32, 32)), affine(np.diag([1, 1, 5.0]), (0, 0, 0)), "thick")
    thin = add_volume(scene, random_volume((100, 32, 32)), affine(np.diag([1, 1, 1.0]), (0, 0, -2)), "thin")
    seg = segments.create_segmentation(scene, thin, "seg")
    segments.add_segment(seg, "tumor", segment_id="tumor")
    k, j, i = np.mgrid[0:100, 0:32, 0:32]
    ellipsoid = ((i - 16) / 8.0) ** 2 + ((j - 16) / 6.0) ** 2 + ((k - 50) / 23.0) ** 2 <= 1
    segments.array_to_segment(ellipsoid.astype(np.uint8), seg, "tumor", thin)
    return thick, seg, (slice(4, 17), slice(8, 24), slice(6, 26))


def _rotated_series(scene):
    """The lesion drawn on series A; SegAssist runs on series B, rotated by 12 degrees and shifted."""
    a = add_volume(scene, random_volume((30, 40, 40)), affine(np.eye(3), (0, 0, 0)), "A")
    b = add_volume(scene, random_volume((30, 40, 40)), affine(rotation((0, 0, 1), 12), (1.3, -2.1, 0.4)), "B")
    seg = segments.create_segmentation(scene, a, "seg")
    segments.add_segment(seg, "tumor", segment_id="tumor")
    k, j, i = np.mgrid[0:30, 0:40, 0:40]
    ellipsoid = ((i - 20) / 9.0) ** 2 + ((j - 20) / 7.0) ** 2 + ((k - 15) / 8.0) ** 2 <= 1
    segments.array_to_segment(ellipsoid.astype(np.uint8), seg, "tumor", a)
    return b, seg, (slice(6, 24), slice(8, 32), slice(8, 34))


SETUPS = {"oversampled": _oversampled, "thin slices": _thin_slices, "rotated series": _rotated_series}


def _editor(scene, seg, vol, segment_id="tumor"):
    logic, _ = segment_editor_logic(scene, seg, vol, segment_id)  # Slicer's defaults: overwrite all

    def modify(add, remove, extent):  # what the effect's modifySelectedSegmentByLabelmap calls do
        logic.ModifySegmentByLabelmap(seg, segment_id, add, logic.ModificationModeAdd, extent, True, False)
        logic.ModifySegmentByLabelmap(seg, segment_id, remove, logic.ModificationModeRemove, extent, True, False)

    return logic, modify


def _own(seg, vol, segment_id="tumor"):
    """The segment on the segmentation's own grid (where it is stored: read without loss)."""
    return segments.segment_on_grid(seg, segment_id, segments.segmentation_geometry(seg, vol))


@pytest.mark.parametrize("setup", list(SETUPS))
def test_reset_and_undo_of_the_first_prompt_give_the_segment_back_on_its_own_grid(ctx, setup):
    vol, seg, box = SETUPS[setup](ctx.scene)
    assert not segments.on_volume_grid(seg, vol)
    original = _own(seg, vol)
    logic, modify = _editor(ctx.scene, seg, vol)
    writes = ObjectWrites(seg, "tumor", vol, modify, logic.SaveStateForUndo)
    baseline = segments.segment_to_array(seg, "tumor", vol)  # the model's starting mask (what the effect sends)
    answer = baseline.copy()
    answer[box] = 1

    writes.apply(MaskUpdate.between(baseline, answer), depth=1)
    answered = _own(seg, vol)
    assert (answered != original).any()
    writes.apply(MaskUpdate.between(answer, baseline), depth=0, undo=True)  # the backend's undo answer
    assert np.array_equal(_own(seg, vol), original)
    logic.Undo()  # the undo was one step of the editor's undo
    assert np.array_equal(_own(seg, vol), answered)
    logic.Redo()

    writes.apply(MaskUpdate.between(baseline, answer), depth=1)  # redo
    assert np.array_equal(_own(seg, vol), answered)
    writes.reset()
    assert np.array_equal(_own(seg, vol), original)
    logic.Undo()  # and so was the reset
    assert np.array_equal(_own(seg, vol), answered)


def test_reset_restores_a_fine_segment_and_gives_back_what_the_answers_took(ctx):
    vol, seg, box = _oversampled(ctx.scene)
    segments.add_segment(seg, "liver", segment_id="liver")  # next to the tumor, on the same fine grid
    geometry = segments.segmentation_geometry(seg, vol)
    ni, nj, nk = geometry.GetDimensions()
    liver = np.zeros((nk, nj, ni), np.uint8)
    liver[3:14, 12:20, 3:20] = 1
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.SetBinaryLabelmapToSegment(segments.oriented_labelmap(liver, geometry), seg, "liver", logic.MODE_REPLACE)
    original, liver = _own(seg, vol), _own(seg, vol, "liver")
    editor, modify = _editor(ctx.scene, seg, vol)
    writes = ObjectWrites(seg, "tumor", vol, modify, editor.SaveStateForUndo)
    baseline = segments.segment_to_array(seg, "tumor", vol)
    answer = baseline.copy()
    answer[2:7, 4:9, 2:10] = 1  # into the liver
    writes.apply(MaskUpdate.between(baseline, answer), depth=1)
    assert writes.taken_voxels > 0
    assert (_own(seg, vol, "liver") != liver).any()

    writes.reset()
    assert np.array_equal(_own(seg, vol), original)
    assert np.array_equal(_own(seg, vol, "liver"), liver)
    assert writes.taken_voxels == 0


def test_reset_after_an_object_that_changed_nothing_adds_no_undo_step(ctx):
    vol, seg, _ = _thin_slices(ctx.scene)
    saved = []
    logic, modify = _editor(ctx.scene, seg, vol)
    writes = ObjectWrites(seg, "tumor", vol, modify, lambda: saved.append(logic.SaveStateForUndo()))
    writes.apply(None, depth=1)
    writes.reset()
    assert saved == []
