"""The interactive object notices every change of its segment made outside SegAssist, on real MRML
scenes (slicer-core): the Segment Editor's undo (which fires SegmentModified only), a script's
write; and nothing else: its own writes, renaming the segment."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import add_nested_oblique_volume, random_volume, segment_editor_logic

from SegAssistLib.engine.base import MaskUpdate

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import segments  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402
from SegAssistLib.slicer.segment_watch import SegmentChangeWatch, labelmap_stamp  # noqa: E402

SHAPE = (10, 12, 14)


@pytest.fixture
def scene():
    with create_headless_scene() as ctx:
        volume = add_nested_oblique_volume(ctx.scene, random_volume(SHAPE))
        seg = segments.create_segmentation(ctx.scene, volume, "seg")
        segments.add_segment(seg, "liver", segment_id="liver")
        segments.add_segment(seg, "spleen", segment_id="spleen")
        other = np.zeros(SHAPE, np.uint8)
        other[6:9, 8:11, 9:13] = 1
        segments.array_to_segment(other, seg, "spleen", volume)
        editor = segments.SegmentEditor(seg, volume)
        yield ctx.scene, volume, seg, editor
        editor.close()


def _box(k, j, i) -> MaskUpdate:
    voxels = np.ones((2, 2, 2), np.uint8)
    return MaskUpdate(offset=(k, j, i), voxels=voxels)


def test_the_editors_undo_ends_the_object_and_its_own_writes_do_not(scene):
    _, volume, seg, editor = scene
    changes = []
    watch = SegmentChangeWatch(seg, "liver", lambda: changes.append("outside"))
    for offset in ((1, 1, 1), (3, 4, 5)):  # two answers of the model, written as SegAssist does
        with watch.writing():
            editor.write("liver", _box(*offset))
    assert changes == [] and watch.active
    seg.GetSegmentation().GetSegment("liver").SetName("liver (edited)")  # a rename is no change of voxels
    assert changes == []

    editor.undo()  # Ctrl+Z in the Segment Editor
    assert changes == ["outside"] and not watch.active
    editor.redo()  # the watch has ended: one call only
    assert changes == ["outside"]


def test_a_scripts_write_ends_the_object(scene):
    _, volume, seg, _ = scene
    changes = []
    watch = SegmentChangeWatch(seg, "liver", lambda: changes.append("outside"))
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    segments.array_to_segment(mask, seg, "liver", volume)
    assert changes == ["outside"] and not watch.active


def test_a_segment_in_another_layer_changing_leaves_the_object_alone(scene):
    """Writing "SegAssist 2" from markups while the user prompts on the liver, in another layer of the
    same segmentation, once ended the liver's object (its pending answers dropped)."""
    _, volume, seg, editor = scene
    segmentation = seg.GetSegmentation()
    liver = np.zeros(SHAPE, np.uint8)
    liver[5:8, 7:10, 8:11] = 1  # overlaps the spleen: the two go to separate layers
    segments.array_to_segment(liver, seg, "liver", volume)
    assert segmentation.GetLayerIndex("liver") != segmentation.GetLayerIndex("spleen")
    changes = []
    watch = SegmentChangeWatch(seg, "liver", lambda: changes.append("outside"))
    spleen = segments.segment_to_array(seg, "spleen", volume)
    spleen[0:2, 0:2, 10:12] = 1
    segments.array_to_segment(spleen, seg, "spleen", volume)  # a script writes the other layer
    editor.write("spleen", _box(5, 5, 5))  # so does the editor
    assert changes == [] and watch.active
    assert segmentation.GetLayerIndex("liver") != segmentation.GetLayerIndex("spleen")
    segments.array_to_segment(liver * 0, seg, "liver", volume)  # the liver itself still counts
    assert changes == ["outside"]
    watch.stop()


def test_stop_ends_the_watch_without_a_call(scene):
    _, volume, seg, editor = scene
    changes = []
    watch = SegmentChangeWatch(seg, "liver", lambda: changes.append("outside"))
    watch.stop()
    editor.write("liver", _box(1, 1, 1))
    editor.undo()
    assert changes == [] and not watch.active
    assert labelmap_stamp(seg, "liver") is not None and labelmap_stamp(seg, "no such segment") is None


def test_edits_of_segments_in_other_layers_are_remembered_for_the_answers_of_earlier_requests(scene):
    """The object goes on when a segment in another layer changes; the watch remembers which changed
    after each request was made (its mark), and SegAssist's own writes, which take voxels from other
    segments and give them back, are no such edit."""
    _, volume, seg, editor = scene
    segmentation = seg.GetSegmentation()
    liver = np.zeros(SHAPE, np.uint8)
    liver[5:8, 7:10, 8:11] = 1  # overlaps the spleen: separate layers
    segments.array_to_segment(liver, seg, "liver", volume)
    assert segmentation.GetLayerIndex("liver") != segmentation.GetLayerIndex("spleen")
    changes = []
    watch = SegmentChangeWatch(seg, "liver", lambda: changes.append("outside"))
    before = watch.mark()  # a request is made
    assert watch.edited_since(before) == set()
    with watch.writing():  # SegAssist's answer, taking spleen voxels (overwrite all segments)
        segments.SegmentEditor(seg, volume, overwrite_other_segments=True).write("liver", _box(6, 8, 9))
    assert watch.edited_since(before) == set() and changes == []
    editor.write("spleen", _box(0, 0, 0))  # the user paints the spleen meanwhile
    assert watch.edited_since(before) == {"spleen"} and changes == [] and watch.active
    after = watch.mark()  # a request made after the paint
    assert watch.edited_since(after) == set()
    watch.stop()


def test_a_late_answer_keeps_the_paint_the_user_added_to_another_segment_after_the_request(scene):
    """Click, then switch to Paint before the answer is in, and paint a segment in another layer: the
    answer, written with the editor's "overwrite all segments", erased the new strokes (27 of 64
    voxels); the watch ignored that layer. Now the answer spares a segment edited after its request."""

    from SegAssistLib.slicer.object_writes import ObjectWrites, editing_segment

    scene_, volume, seg, _ = scene
    segments.add_segment(seg, "node", segment_id="node")
    corner = np.zeros(SHAPE, np.uint8)
    corner[0:3, 0:3, 0:3] = 1
    segments.array_to_segment(corner, seg, "node", volume)
    segments.array_to_segment(corner, seg, "liver", volume)  # node overlaps liver: another layer than the liver
    segmentation = seg.GetSegmentation()
    assert segmentation.GetLayerIndex("node") != segmentation.GetLayerIndex("liver")
    logic, editor_node = segment_editor_logic(scene_, seg, volume, "liver")  # Slicer's defaults: overwrite all

    def modify(add, remove, extent):  # the effect's _modifySegment
        with editing_segment(editor_node, "liver"):
            logic.ModifySegmentByLabelmap(seg, "liver", add, logic.ModificationModeAdd, extent, True, False)
            logic.ModifySegmentByLabelmap(seg, "liver", remove, logic.ModificationModeRemove, extent, True, False)

    writes = ObjectWrites(seg, "liver", volume, modify, logic.SaveStateForUndo)
    watch = SegmentChangeWatch(seg, "liver", lambda: None)
    mark = watch.mark()  # the click's request is made
    editor_node.SetSelectedSegmentID("node")  # Enter, the next segment, the Paint effect
    paint = np.zeros(SHAPE, np.uint8)
    paint[4:8, 4:8, 4:8] = 1
    logic.SaveStateForUndo()
    grid = segments.reference_geometry(volume, seg)
    stroke = segments.oriented_labelmap(paint, grid)
    logic.ModifySegmentByLabelmap(seg, "node", stroke, logic.ModificationModeAdd, [0, 13, 0, 11, 0, 9], True, False)
    painted = segments.segment_to_array(seg, "node", volume)
    assert painted[4:8, 4:8, 4:8].all() and watch.active
    answer = segments.segment_to_array(seg, "liver", volume)
    answer[3:7, 3:7, 3:7] = 1  # the click's answer arrives
    with watch.writing():  # as the effect's _writeOrEnd
        writes.apply(MaskUpdate.between(corner, answer), depth=1, spare=watch.edited_since(mark))
    assert np.array_equal(segments.segment_to_array(seg, "node", volume), painted)  # every stroke kept
    assert np.array_equal(segments.segment_to_array(seg, "liver", volume), answer)
    watch.stop()
