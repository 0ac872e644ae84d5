"""An object's answers take voxels from other segments (the Segment Editor's default overwrite mode);
reset and prompt undo give them back, redo takes them again. Real MRML (slicer-core), written
through vtkSlicerSegmentEditorLogic as the effect writes through modifySelectedSegmentByLabelmap.
A volume or segmentation that moves while the object is open (a transform changes) refuses the
object's later answers, and reset still restores the segment.
Also: a batch write into the segmentation the Segment Editor edits is one step of its undo."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import add_linear_transform, add_volume, affine, editor_modules, random_volume

from SegAssistLib.engine.base import MaskUpdate

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import segments  # noqa: E402
from SegAssistLib.slicer.object_writes import ObjectWrites, PlacementChanged, PlacementWatch  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402

SHAPE = (10, 12, 14)


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _setup(ctx, volume_spacing=1.0, parent=None, tumor=None):
    scene = ctx.scene
    vol = add_volume(scene, random_volume(SHAPE), affine(np.eye(3) * volume_spacing, (0, 0, 0)), "v", parent)
    seg = segments.create_segmentation(scene, vol, "seg")
    segments.add_segment(seg, "tumor", segment_id="tumor")
    segments.add_segment(seg, "liver", segment_id="liver")
    liver = np.zeros(SHAPE, np.uint8)
    liver[2:8, 2:10, 2:12] = 1
    segments.array_to_segment(liver, seg, "liver", vol)
    if tumor is not None:  # what the tumor holds when the object starts
        segments.array_to_segment(tumor, seg, "tumor", vol)
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")  # Slicer's defaults: overwrite all
    assert editor_node.GetOverwriteMode() == slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(seg)
    logic.SetSourceVolumeNode(vol)
    editor_node.SetSelectedSegmentID("tumor")

    def modify(add, remove, extent):  # what the effect's modifySelectedSegmentByLabelmap calls do
        logic.ModifySegmentByLabelmap(seg, "tumor", add, logic.ModificationModeAdd, extent, True, False)
        logic.ModifySegmentByLabelmap(seg, "tumor", remove, logic.ModificationModeRemove, extent, True, False)

    writes = ObjectWrites(seg, "tumor", vol, modify, logic.SaveStateForUndo)
    return vol, seg, liver, writes, logic


def _read(seg, sid, vol):
    return segments.segment_to_array(seg, sid, vol)


@pytest.mark.parametrize("layers", ["shared", "separate"])
def test_reset_gives_back_what_the_answers_took(ctx, layers):
    vol, seg, liver, writes, _ = _setup(ctx)
    spleen = np.zeros(SHAPE, np.uint8)
    if layers == "separate":  # overlapping the liver: in a layer of its own
        spleen[6:9, 8:12, 10:14] = 1
        segments.add_segment(seg, "spleen", segment_id="spleen")
        segments.array_to_segment(spleen, seg, "spleen", vol)
        assert seg.GetSegmentation().GetNumberOfLayers() == 2
    baseline = _read(seg, "tumor", vol)
    first = np.zeros(SHAPE, np.uint8)
    first[3:6, 3:7, 3:9] = 1
    writes.apply(MaskUpdate.between(baseline, first), depth=1)
    second = first.copy()
    second[6:9, 6:11, 8:13] = 1  # partly outside the liver
    writes.apply(MaskUpdate.between(first, second), depth=2)
    assert np.array_equal(_read(seg, "liver", vol), liver & ~second)  # the editor took them
    assert writes.taken_voxels == int((liver & second).sum() + (spleen & second).sum())

    writes.reset()
    assert not _read(seg, "tumor", vol).any()
    assert np.array_equal(_read(seg, "liver", vol), liver)
    if layers == "separate":
        assert np.array_equal(_read(seg, "spleen", vol), spleen)
    assert writes.taken_voxels == 0


def test_undo_gives_back_and_redo_takes_again(ctx):
    vol, seg, liver, writes, logic = _setup(ctx)
    empty = _read(seg, "tumor", vol)
    a = np.zeros(SHAPE, np.uint8)
    a[3:5, 3:5, 3:5] = 1
    b = a.copy()
    b[5:7, 5:8, 5:9] = 1
    writes.apply(MaskUpdate.between(empty, a), depth=1)
    writes.apply(MaskUpdate.between(a, b), depth=2)
    writes.apply(MaskUpdate.between(b, a), depth=1, undo=True)  # the backend's answer to undo
    assert np.array_equal(_read(seg, "tumor", vol), a)
    assert np.array_equal(_read(seg, "liver", vol), liver & ~a)  # only prompt 2's voxels came back
    writes.apply(MaskUpdate.between(a, b), depth=2)  # redo
    assert np.array_equal(_read(seg, "liver", vol), liver & ~b)
    writes.apply(MaskUpdate.between(b, a), depth=1, undo=True)
    writes.apply(MaskUpdate.between(a, empty), depth=0, undo=True)
    assert np.array_equal(_read(seg, "liver", vol), liver)
    logic.Undo()  # one editor undo step holds the answer and what was given back
    assert np.array_equal(_read(seg, "tumor", vol), a)
    assert np.array_equal(_read(seg, "liver", vol), liver & ~a)


def test_a_new_prompt_after_undo_forgets_the_undone_branch(ctx):
    vol, seg, liver, writes, _ = _setup(ctx)
    empty = _read(seg, "tumor", vol)
    a = np.zeros(SHAPE, np.uint8)
    a[3:5, 3:5, 3:5] = 1
    writes.apply(MaskUpdate.between(empty, a), depth=1)
    writes.apply(MaskUpdate.between(a, empty), depth=0, undo=True)
    c = np.zeros(SHAPE, np.uint8)
    c[6:8, 6:8, 6:8] = 1
    writes.apply(MaskUpdate.between(empty, c), depth=1)
    assert writes.taken_voxels == int(c.sum())
    writes.reset()
    assert np.array_equal(_read(seg, "liver", vol), liver)


def test_nothing_is_held_when_the_editor_overwrites_nothing(ctx):
    vol, seg, liver, writes, logic = _setup(ctx)
    logic.GetSegmentEditorNode().SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    a = np.zeros(SHAPE, np.uint8)
    a[3:5, 3:5, 3:5] = 1
    writes.apply(MaskUpdate.between(_read(seg, "tumor", vol), a), depth=1)
    assert np.array_equal(_read(seg, "liver", vol), liver)
    assert writes.taken_voxels == 0


def _move(transform, shift):
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(affine(np.eye(3), shift)))


@pytest.mark.parametrize("undo", [False, True])
def test_answers_after_the_volume_moved_are_refused_and_reset_still_restores(ctx, undo):
    registration = add_linear_transform(ctx.scene, affine(np.eye(3), (0, 0, 0)), "registration")
    start = np.zeros(SHAPE, np.uint8)
    start[6:9, 6:9, 6:9] = 1
    vol, seg, liver, writes, _ = _setup(ctx, parent=registration, tumor=start)  # the segmentation is not under it
    first = start.copy()
    first[5:11, 5:12, 5:13] = 1
    writes.apply(MaskUpdate.between(start, first), depth=1)
    assert not writes.moved
    written = (_read(seg, "tumor", vol), _read(seg, "liver", vol))

    _move(registration, (4, 0, 0))  # the user nudges the registration while the object is open
    assert writes.moved
    second = first.copy()
    second[5:10, 5:10, 12:14] = 1
    update = MaskUpdate.between(second, first) if undo else MaskUpdate.between(first, second)
    with pytest.raises(PlacementChanged, match="moved"):
        writes.apply(update, depth=1 if undo else 2, undo=undo)
    _move(registration, (0, 0, 0))  # back where it was: the object stays over
    assert writes.moved
    with pytest.raises(PlacementChanged):
        writes.apply(update, depth=2)
    assert np.array_equal(_read(seg, "tumor", vol), written[0])  # nothing written, nothing lost
    assert np.array_equal(_read(seg, "liver", vol), written[1])

    _move(registration, (-3, 2, 0))
    writes.reset()  # the segment's own voxels: wherever the volume lies now
    _move(registration, (0, 0, 0))
    assert np.array_equal(_read(seg, "tumor", vol), start)
    assert np.array_equal(_read(seg, "liver", vol), liver)


@pytest.mark.parametrize(
    "change",
    ["volume transform", "outer transform", "segmentation transform", "volume origin", "nothing: both move together"],
)
def test_placement_watch_notices_a_move_once(ctx, change):
    outer = add_linear_transform(ctx.scene, affine(np.eye(3), (0, 0, 0)), "outer")
    inner = add_linear_transform(ctx.scene, affine(np.eye(3), (0, 0, 0)), "inner", outer)
    vol, seg, _, writes, _ = _setup(ctx, parent=inner)
    calls = []
    watch = PlacementWatch(writes, lambda: calls.append(writes.moved))
    vol.SetName("renamed")  # fires ModifiedEvent: no move
    seg.SetAndObserveTransformNodeID(outer.GetID())
    seg.SetAndObserveTransformNodeID(None)  # swapped and back: where it was
    _move(ctx.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode"), (9, 9, 9))  # an unrelated transform
    assert calls == [] and watch.active
    if change == "volume transform":
        _move(inner, (0, 2.5, 0))
    elif change == "outer transform":
        _move(outer, (0, 0, -1))
    elif change == "segmentation transform":
        own = add_linear_transform(ctx.scene, affine(np.eye(3), (0, 0, 0)), "own")
        seg.SetAndObserveTransformNodeID(own.GetID())  # under an identity: still where it was
        assert calls == []
        _move(own, (1, 0, 0))
    elif change == "nothing: both move together":
        seg.SetAndObserveTransformNodeID(inner.GetID())
        _move(outer, (5, 0, 0))
        _move(inner, (0, 5, 0))
        assert calls == [] and watch.active and not writes.moved
        return
    else:
        vol.SetOrigin(0.5, 0, 0)
    assert calls == [True] and not watch.active
    _move(outer, (7, 7, 7))  # stopped: no second call
    assert calls == [True]


def test_a_stopped_placement_watch_stays_silent(ctx):
    registration = add_linear_transform(ctx.scene, affine(np.eye(3), (0, 0, 0)), "registration")
    _, _, _, writes, _ = _setup(ctx, parent=registration)
    calls = []
    PlacementWatch(writes, lambda: calls.append(1)).stop()
    _move(registration, (3, 0, 0))
    assert calls == [] and writes.moved


def test_a_batch_write_into_the_edited_segmentation_is_one_editor_undo_step(ctx):
    from types import SimpleNamespace

    from SegAssistLib.headless import EngineRun
    from SegAssistLib.slicer.logic import write_result

    vol = add_volume(ctx.scene, random_volume(SHAPE), affine(np.eye(3), (0, 0, 0)), "v")
    seg = segments.create_segmentation(ctx.scene, vol, "seg")
    segments.add_segment(seg, "liver", segment_id="liver")
    other = segments.create_segmentation(ctx.scene, vol, "other")
    editor = segments.SegmentEditor(seg, vol)  # the Segment Editor editing this segmentation
    modules = editor_modules(editor)
    paint = np.zeros(SHAPE, np.uint8)
    paint[1:3, 1:3, 1:3] = 1
    editor.write("liver", MaskUpdate((0, 0, 0), paint))  # the user's stroke
    mask = np.zeros(SHAPE, np.uint8)
    mask[5:8, 5:8, 5:8] = 1

    assert not segments.save_editor_undo_state(other, modules)  # not the one being edited
    assert not segments.save_editor_undo_state(seg, SimpleNamespace())  # no Segment Editor panel
    assert segments.save_editor_undo_state(seg, modules)  # what SegAssistLogic.writeResult does first
    result = write_result(EngineRun(mask, None, "m", []), vol, segmentation_node=seg, segment_name="SegAssist")
    editor.undo()  # Ctrl+Z undoes the batch result
    assert seg.GetSegmentation().GetSegment(result.segment_id) is None
    assert np.array_equal(_read(seg, "liver", vol), paint)  # the stroke is still there
    editor.redo()
    assert np.array_equal(_read(seg, result.segment_id, vol), mask)
    editor.close()


@pytest.mark.parametrize("mask_mode", ["EditAllowedOutsideAllSegments", "EditAllowedOutsideVisibleSegments"])
def test_an_answer_after_accept_is_masked_for_its_own_segment_not_the_selected_one(ctx, mask_mode):
    """After Accept, with an answer still pending, the user selects 'liver'; the answer lands in
    'tumor'. The editor builds its editable-area mask for the selected segment, so without
    ``editing_segment`` 'liver' would count as editable and lose voxels to the tumor."""
    import vtk

    from SegAssistLib.slicer.object_writes import editing_segment

    vol, seg, liver, _, logic = _setup(ctx)
    editor_node = logic.GetSegmentEditorNode()
    editor_node.SetMaskMode(getattr(slicer.vtkMRMLSegmentationNode, mask_mode))
    editor_node.SetSelectedSegmentID("liver")  # the next segment, selected after Accept
    seen = []  # the selection each Modified event of the editor node shows
    editor_node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda node, event: seen.append(node.GetSelectedSegmentID()))

    def write(add, remove, extent):  # the effect's _modifySegment: into 'tumor', through the editor
        logic.ModifySegmentByLabelmap(seg, "tumor", add, logic.ModificationModeAdd, extent, True, False)
        logic.ModifySegmentByLabelmap(seg, "tumor", remove, logic.ModificationModeRemove, extent, True, False)

    def modify(add, remove, extent):
        with editing_segment(editor_node, "tumor"):
            write(add, remove, extent)

    answer = np.zeros(SHAPE, np.uint8)
    answer[3:7, 3:8, 8:14] = 1  # half in the liver, half outside every segment
    ObjectWrites(seg, "tumor", vol, modify, logic.SaveStateForUndo).apply(MaskUpdate((0, 0, 0), answer), 1)
    assert np.array_equal(_read(seg, "liver", vol), liver)  # not editable: the tumor took none of it
    assert np.array_equal(_read(seg, "tumor", vol), answer & ~liver)
    assert editor_node.GetSelectedSegmentID() == "liver"
    assert seen and set(seen) == {"liver"}  # no observer ever saw 'tumor' selected

    # what the editor does unasked: masked for 'liver', the liver is editable and loses voxels
    segments.array_to_segment(np.zeros(SHAPE, np.uint8), seg, "tumor", vol)
    ObjectWrites(seg, "tumor", vol, write, logic.SaveStateForUndo).apply(MaskUpdate((0, 0, 0), answer), 1)
    assert _read(seg, "liver", vol).sum() < liver.sum()


def test_editing_segment_changes_nothing_when_the_segment_is_selected_or_there_is_no_editor(ctx):
    import vtk

    from SegAssistLib.slicer.object_writes import editing_segment

    editor_node = ctx.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editor_node.SetSelectedSegmentID("tumor")
    events = []
    editor_node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda node, event: events.append(event))
    with editing_segment(editor_node, "tumor"), editing_segment(None, "tumor"):
        assert editor_node.GetSelectedSegmentID() == "tumor"
    assert not events
    with pytest.raises(RuntimeError), editing_segment(editor_node, "liver"):  # a failed write: put back
        raise RuntimeError("write failed")
    assert editor_node.GetSelectedSegmentID() == "tumor"


def test_an_object_on_a_large_segment_does_not_list_its_voxels(ctx):
    """The first prompt keeps a copy of the segment (for reset): its box is found a few rows at a
    time, not by listing every voxel (np.argwhere, 24 bytes each: gigabytes for a body segment)."""
    import tracemalloc

    shape = (64, 160, 160)
    vol = add_volume(ctx.scene, np.zeros(shape, np.int16), affine(np.eye(3), (0, 0, 0)), "v")
    seg = segments.create_segmentation(ctx.scene, vol, "seg")
    segments.add_segment(seg, "body", segment_id="body")
    body = np.zeros(shape, np.uint8)
    body[2:62, 5:155, 5:155] = 1
    segments.array_to_segment(body, seg, "body", vol)
    tracemalloc.start()
    try:
        writes = ObjectWrites(seg, "body", vol, lambda add, remove, extent: None)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    voxels = int(body.sum())
    assert peak < 4 * voxels  # the copy itself is 1 byte a voxel; listing them took 24 and more
    writes.reset()  # nothing changed: the copy is the segment
    assert np.array_equal(_read(seg, "body", vol), body)


# ---- a segment that overlapped the object's segment, and one edited after the request ----------------
def _overlapping(ctx):
    """'tumor' (the object's) and 'node' overlap in 8 voxels when the object starts (an imported
    segmentation, 'allow overlap'): separate layers. Written through the editor as the effect writes."""
    tumor = np.zeros(SHAPE, np.uint8)
    tumor[2:6, 2:6, 2:6] = 1
    vol, seg, liver, writes, logic = _setup(ctx, tumor=tumor)
    node = np.zeros(SHAPE, np.uint8)
    node[4:8, 4:8, 4:8] = 1
    segments.add_segment(seg, "node", segment_id="node")
    segments.array_to_segment(node, seg, "node", vol)
    assert seg.GetSegmentation().GetLayerIndex("node") != seg.GetSegmentation().GetLayerIndex("tumor")
    assert int((tumor & node).sum()) == 8
    writes = ObjectWrites(seg, "tumor", vol, writes._modify, logic.SaveStateForUndo)  # starts with the overlap
    return vol, seg, tumor, node, writes


@pytest.mark.parametrize("how", ["reset", "undo every prompt"])
def test_a_segment_overlapping_the_object_at_the_start_gets_its_overlap_back(ctx, how):
    """A negative click drops the overlap from the tumor, the next click brings it back, which the
    editor's overwrite takes from 'node'. Reset once gave 'node' nothing back there, because the
    tumor held those voxels again (as it did at the start): 'node' lost them for good."""
    vol, seg, tumor, node, writes = _overlapping(ctx)
    without = tumor.copy()
    without[4:6, 4:6, 4:6] = 0  # the answer to a negative click: the overlap leaves the tumor
    writes.apply(MaskUpdate.between(tumor, without), depth=1)
    writes.apply(MaskUpdate.between(without, tumor), depth=2)  # the next click brings it back
    assert int(_read(seg, "node", vol).sum()) == int(node.sum()) - 8  # taken by the editor's overwrite
    if how == "reset":
        writes.reset()
    else:
        writes.apply(MaskUpdate.between(tumor, without), depth=1, undo=True)
        writes.apply(MaskUpdate.between(without, tumor), depth=0, undo=True)
    assert np.array_equal(_read(seg, "tumor", vol), tumor)
    assert np.array_equal(_read(seg, "node", vol), node)  # the overlap is back in both
    assert writes.taken_voxels == 0


def test_an_undo_takes_nothing_from_other_segments(ctx):
    """Undoing a negative click puts the overlap back into the tumor; written through the editor, the
    undo's answer took it from 'node', which held it at that prompt (prompt 1 never touched it)."""
    vol, seg, tumor, node, writes = _overlapping(ctx)
    first = tumor.copy()
    first[0:2, 0:2, 0:2] = 1  # prompt 1: a corner away from 'node'
    second = first.copy()
    second[4:6, 4:6, 4:6] = 0  # prompt 2 (negative): the overlap leaves the tumor
    writes.apply(MaskUpdate.between(tumor, first), depth=1)
    writes.apply(MaskUpdate.between(first, second), depth=2)
    writes.apply(MaskUpdate.between(second, first), depth=1, undo=True)  # Undo prompt: the backend's answer
    assert np.array_equal(_read(seg, "tumor", vol), first)
    assert np.array_equal(_read(seg, "node", vol), node)  # as it was at prompt 1
    writes.apply(MaskUpdate.between(first, tumor), depth=0, undo=True)
    assert np.array_equal(_read(seg, "tumor", vol), tumor) and np.array_equal(_read(seg, "node", vol), node)


def test_every_other_segment_is_as_it_was_at_each_depth_over_random_prompts_undos_and_redos(ctx):
    """Random prompts, undos and redos over three segments that overlap when the object starts: after
    each undo the other segments are exactly as they were when the object was last at that depth,
    and after reset every segment is as it started."""
    rng = np.random.default_rng(7)
    vol, seg, _, _, logic = _setup(ctx)
    start = {}
    for sid in ("tumor", "liver", "node"):
        if seg.GetSegmentation().GetSegment(sid) is None:
            segments.add_segment(seg, sid, segment_id=sid)
        segments.array_to_segment((rng.random(SHAPE) < 0.25).astype(np.uint8), seg, sid, vol)
        start[sid] = _read(seg, sid, vol)
    writes = ObjectWrites(seg, "tumor", vol, _editor_write(logic, seg), logic.SaveStateForUndo)
    others = lambda: {sid: _read(seg, sid, vol) for sid in ("liver", "node")}  # noqa: E731
    masks, undone, seen = [start["tumor"]], [], [others()]
    for _ in range(14):
        op = rng.choice(["prompt", "prompt", "undo", "redo"])
        if op == "undo" and len(masks) > 1:
            undone.append(masks.pop())
            seen.pop()
            writes.apply(MaskUpdate.between(undone[-1], masks[-1]), len(masks) - 1, undo=True)
            now = others()
            assert all(np.array_equal(now[sid], seen[-1][sid]) for sid in now)
        elif op == "redo" and undone:
            masks.append(undone.pop())
            writes.apply(MaskUpdate.between(masks[-2], masks[-1]), len(masks) - 1)
            seen.append(others())
        else:
            new = masks[-1].copy()
            lo = rng.integers(0, 6, 3)
            hi = lo + rng.integers(1, 5, 3)
            new[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = rng.random() < 0.7
            undone = []
            masks.append(new)
            writes.apply(MaskUpdate.between(masks[-2], new), len(masks) - 1)
            seen.append(others())
    writes.reset()
    assert all(np.array_equal(_read(seg, sid, vol), start[sid]) for sid in start)


def _editor_write(logic, seg):
    def modify(add, remove, extent):  # the effect's write: into 'tumor', through the editor (overwrite all)
        logic.ModifySegmentByLabelmap(seg, "tumor", add, logic.ModificationModeAdd, extent, True, False)
        logic.ModifySegmentByLabelmap(seg, "tumor", remove, logic.ModificationModeRemove, extent, True, False)

    return modify


def test_an_answer_takes_nothing_from_a_segment_spared_for_a_newer_edit(ctx):
    """The user painted 'node' after the request was made (the effect's watch tells which): the answer
    lands in the tumor and 'node' keeps every voxel; the liver, not edited since, loses its part as
    the editor's overwrite wants; undo gives the liver back and leaves 'node' alone."""
    vol, seg, liver, writes, _ = _setup(ctx)
    node = np.zeros(SHAPE, np.uint8)
    node[4:8, 6:10, 6:10] = 1  # overlapping the liver: a layer of its own
    segments.add_segment(seg, "node", segment_id="node")
    segments.array_to_segment(node, seg, "node", vol)
    answer = np.zeros(SHAPE, np.uint8)
    answer[3:7, 5:9, 5:9] = 1
    empty = np.zeros(SHAPE, np.uint8)
    writes.apply(MaskUpdate.between(empty, answer), depth=1, spare={"node"})
    assert np.array_equal(_read(seg, "tumor", vol), answer)
    assert np.array_equal(_read(seg, "node", vol), node)  # the newer edit wins
    assert np.array_equal(_read(seg, "liver", vol), liver & ~answer)
    writes.apply(MaskUpdate.between(answer, empty), depth=0, undo=True)
    assert np.array_equal(_read(seg, "liver", vol), liver) and np.array_equal(_read(seg, "node", vol), node)
