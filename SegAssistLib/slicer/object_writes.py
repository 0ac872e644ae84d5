"""One interactive object's writes into its segment, and the voxels they take from other segments.

Slicer's Segment Editor lets a segment's new voxels overwrite the other segments (its default
overwrite mode is "all segments"): each answer written with ``modifySegmentByLabelmap``
erases those voxels from every other segment. Reset and prompt undo must give them back, so each
write remembers, under the prompt count it leaves the object at, which voxels of which other
segments it took: only inside the box it wrote, only segments that lost some, cropped to what they
lost. Undo of that prompt and reset give them back, also where the object's segment holds them
then (the two overlapped before that prompt: a segment that overlapped the object's segment when
the object started gets its overlap back); redo writes the answer again, which takes them again.
An undo's own answer puts the segment back as it was before that prompt, when the other segments
held all they hold now: what it takes from them is given back at once. So is what an answer takes
from a segment edited outside SegAssist after its request was made (``spare``): the newer edit
wins. Qt-free: the effect passes the write itself.

Reset, and an undo back to before the first prompt, put the segment back exactly as it was when the
object started: a copy of its own labelmap, on its own grid, is kept from the start. Not the
segment as read on the volume's grid (the model's starting mask): a segment kept on a finer grid
than the volume (thin slices drawn on another series, an oversampled geometry, a rotated series)
would come back with the detail between the volume's voxels lost.

Answers are on the volume's grid and land in the segmentation where the volume lies when they are
written: if the volume or the segmentation moves while the object is open (a parent transform
changes, the volume's origin or spacing is edited), the model's masks no longer describe the
segment there, so writes are refused (:class:`PlacementChanged`) and the object is over; what was
written stays, and reset still restores the segment, which needs no volume. :class:`PlacementWatch`
notices the move when it happens.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Collection, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import SegAssistError
from SegAssistLib.prompts import set_voxel_bounds
from SegAssistLib.slicer import segments

#: ``modify(add, remove, extent)``: add then remove voxels of the object's segment, limited to the
#: extent (the effect: ``modifySegmentByLabelmap`` twice, honouring masking and overwrite). Into the
#: object's own segment, not the one selected: after Accept the last answers arrive while the user may
#: have selected the next segment already; the editor's mask must then be made for the object's
#: segment too (:func:`editing_segment`).
Modify = Callable[[slicer.vtkOrientedImageData, slicer.vtkOrientedImageData, List[int]], None]


@contextlib.contextmanager
def editing_segment(editor_node: Optional[slicer.vtkMRMLSegmentEditorNode], segment_id: str) -> Iterator[None]:
    """While inside, ``editor_node``'s selected segment is ``segment_id``: a write into that segment
    through the segment editor logic (``modifySegmentByLabelmap``) is masked for it. The logic builds
    its editable-area mask (``GenerateEditMask``) for the *selected* segment, so with "outside all
    segments" (or "outside visible segments") a segment selected after Accept would count as
    editable while the accepted object's last answer is written, and (overwrite: all segments) lose
    its voxels to it. The node's Modified events are held meanwhile, so nothing observing it sees the
    other selection; the selection is put back afterwards (one Modified event then, if it was changed).
    ``editor_node`` None, or already on ``segment_id``: nothing changes."""
    if editor_node is None or (editor_node.GetSelectedSegmentID() or "") == segment_id:
        yield
        return
    selected = editor_node.GetSelectedSegmentID()
    was_modifying = editor_node.StartModify()
    editor_node.SetSelectedSegmentID(segment_id)
    try:
        yield
    finally:
        editor_node.SetSelectedSegmentID(selected)
        editor_node.EndModify(was_modifying)


_Taken = Tuple[str, slicer.vtkOrientedImageData]  # (other segment ID, the voxels it lost, cropped)


def _mask(image: slicer.vtkOrientedImageData) -> np.ndarray:
    ni, nj, nk = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni) > 0


#: How much an entry of the volume's IJK-to-segmentation matrix (mm, mm per voxel step) may change
#: before the volume counts as moved: far below any voxel, far above rounding.
PLACEMENT_TOLERANCE = 1e-6


class PlacementChanged(SegAssistError):
    """The volume or the segmentation moved while an object was open: its answers are refused."""


class _Snapshot(NamedTuple):
    """A segment's own voxels: ``mask`` [k, j, i] (cropped to what it holds) at array ``offset`` of
    ``grid`` (its labelmap's geometry, in the segmentation's frame; an empty segment: no voxel)."""

    grid: slicer.vtkOrientedImageData
    offset: Tuple[int, int, int]
    mask: np.ndarray

    def same(self, other: _Snapshot) -> bool:
        """Whether both hold the same voxels of the same grid (both empty: the same)."""
        if not self.mask.any() or not other.mask.any():
            return not self.mask.any() and not other.mask.any()
        return (
            self._first_voxel() == other._first_voxel()
            and _matrix(self.grid) == _matrix(other.grid)
            and np.array_equal(self.mask, other.mask)
        )

    def _first_voxel(self) -> List[int]:
        """The IJK index of the mask's first voxel on the grid."""
        return [int(e) + int(o) for e, o in zip(self.grid.GetExtent()[::2], self.offset[::-1])]

    def labelmap(self) -> slicer.vtkOrientedImageData:
        """As a 0/1 labelmap on the grid (an empty segment: one empty voxel)."""
        if not self.mask.size:
            return segments.oriented_labelmap(np.zeros((1, 1, 1), np.uint8), self.grid)
        return segments.oriented_labelmap(self.mask, self.grid, self.offset)


def _matrix(grid: slicer.vtkOrientedImageData) -> List[float]:
    matrix = vtk.vtkMatrix4x4()
    grid.GetImageToWorldMatrix(matrix)
    return [matrix.GetElement(r, c) for r in range(4) for c in range(4)]


def _snapshot(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> _Snapshot:
    """The segment's own binary labelmap, copied (not resampled): its voxels of its label value only
    (a shared layer holds other segments too), cropped to the box holding them."""
    segmentation = segmentation_node.GetSegmentation()
    segmentation.CreateRepresentation(segments.BINARY_LABELMAP)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, False
    ):
        raise SegAssistError(f"segment {segment_id!r} has no binary labelmap representation")
    grid = slicer.vtkOrientedImageData()  # the geometry only
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    grid.SetImageToWorldMatrix(matrix)
    grid.SetExtent(labelmap.GetExtent())
    scalars = labelmap.GetPointData().GetScalars()
    if labelmap.IsEmpty() or scalars is None:
        return _Snapshot(grid, (0, 0, 0), np.zeros((0, 0, 0), bool))
    ni, nj, nk = labelmap.GetDimensions()
    label = segmentation.GetSegment(segment_id).GetLabelValue()
    values = numpy_support.vtk_to_numpy(scalars).reshape(nk, nj, ni)  # a view: nothing copied
    # the box by a few rows at a time: listing the voxels (np.argwhere) took 24 bytes each
    bounds = set_voxel_bounds(values.shape, lambda rows: values[rows] == label)
    if bounds is None:
        return _Snapshot(grid, (0, 0, 0), np.zeros((0, 0, 0), bool))
    box = tuple(slice(int(a), int(b)) for a, b in zip(*bounds))
    return _Snapshot(grid, tuple(int(v) for v in bounds[0]), values[box] == label)


class ObjectWrites:
    """The answers of one object written into its segment; what they took from other segments is
    given back on undo of the prompt that took it and on :meth:`reset`, and the segment itself comes
    back as it was at the start (made when the object starts: the segment as it is then).

    ``save_undo()`` is called once before each change (the editor's ``saveStateForUndo``: one editor
    undo step holds the answer and the voxels given back).
    """

    def __init__(
        self,
        segmentation_node: slicer.vtkMRMLSegmentationNode,
        segment_id: str,
        volume_node: slicer.vtkMRMLVolumeNode,
        modify: Modify,
        save_undo: Callable[[], None] = lambda: None,
    ) -> None:
        self.segmentation_node = segmentation_node
        self.segment_id = segment_id
        self.volume_node = volume_node
        self._modify = modify
        self._save_undo = save_undo
        self._taken: Dict[int, List[_Taken]] = {}  # prompt count after the write -> what it took
        self._start = _snapshot(segmentation_node, segment_id)  # the segment before the first prompt
        self._placement = segments.volume_placement(volume_node, segmentation_node)
        self._moved = False

    @property
    def taken_voxels(self) -> int:
        """How many voxels (of the segmentation's grid) are held to give back."""
        return sum(int(_mask(image).sum()) for records in self._taken.values() for _, image in records)

    @property
    def moved(self) -> bool:
        """Whether the volume's grid lies elsewhere in the segmentation's frame than when the object
        started (a parent transform of either node, or the volume's origin, spacing or directions,
        changed; or they cannot be related any more). Once moved, always moved: the object is over."""
        if not self._moved:
            try:
                now = segments.volume_placement(self.volume_node, self.segmentation_node)
            except SegAssistError:  # a non-linear transform between them now
                self._moved = True
            else:
                self._moved = not np.allclose(now, self._placement, rtol=0.0, atol=PLACEMENT_TOLERANCE)
        return self._moved

    def apply(self, update: Optional[MaskUpdate], depth: int, undo: bool = False, spare: Collection[str] = ()) -> None:
        """Write an answer that leaves the object at ``depth`` prompts in effect (after a prompt, a
        redo, or with ``undo`` an undo; ``update`` None or empty: the segment does not change). An
        undo back to ``depth`` 0 puts the segment back exactly as it was at the start instead.

        ``spare``: other segments this answer must take no voxel from (edited outside SegAssist after
        its request was made: the newer edit wins); an undo's answer takes from none. What the
        editor's overwrite takes from them anyway is given back in the same undo step.

        Raises :class:`PlacementChanged`, writing nothing, once the volume or the segmentation moved
        (:attr:`moved`): the answer is on the volume's grid as it lay when the object started."""
        if self.moved:
            raise PlacementChanged(
                f"volume {self.volume_node.GetName()!r} or segmentation {self.segmentation_node.GetName()!r} "
                "moved while SegAssist was segmenting (a transform, or the volume's origin, spacing or "
                "directions, changed): the answer would land in the wrong place, so it was not written and "
                "this object ended; what was written stays, and the next prompt starts a new object"
            )
        if not undo:  # a prompt or redo replaces what was done at this depth and above
            self._taken = {d: r for d, r in self._taken.items() if d < depth}
        back = self._pop_above(depth) if undo else []
        if undo and depth <= 0:  # before the first prompt: the segment's own voxels, not the model's mask
            self._restore(back)
            return
        writes = update is not None and update.voxels.size > 0
        if not writes and not back:
            return
        self._save_undo()
        if writes:
            assert update is not None
            taken = self._write(update)
            kept = [record for record in taken if not undo and record[0] not in spare]
            if kept:
                self._taken[depth] = kept
            # an undo restores the segment as it was before that prompt, when the others held all
            # they hold now; a spared segment keeps its newer edit
            back = [record for record in taken if undo or record[0] in spare] + back
        self._give_back(back)

    def reset(self) -> None:
        """Put the segment back exactly as it was when the object started (its own voxels, on its own
        grid) and give back every voxel the object's answers took from other segments. Needs no
        volume: it works also after the volume or the segmentation moved."""
        self._restore(self._pop_above(-1))

    def _restore(self, back: List[_Taken]) -> None:
        """The segment as at the start, then ``back`` given back: one undo step, none if nothing changes."""
        node, sid = self.segmentation_node, self.segment_id
        changed = not self._start.same(_snapshot(node, sid))
        if not changed and not back:
            return
        self._save_undo()
        if changed:
            # Replaces the segment's labelmap by the copy (on the grid it came from, so nothing is
            # resampled); other segments keep theirs (a shared layer is split where they would overlap).
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            if not logic.SetBinaryLabelmapToSegment(self._start.labelmap(), node, sid, logic.MODE_REPLACE):
                raise SegAssistError(f"could not put segment {sid!r} back as it was")
        self._give_back(back)

    def _pop_above(self, depth: int) -> List[_Taken]:
        """Forget what was taken above ``depth``, newest first."""
        above = sorted((d for d in self._taken if d > depth), reverse=True)
        return [record for d in above for record in reversed(self._taken.pop(d))]

    def _write(self, update: MaskUpdate) -> List[_Taken]:
        """Write the answer through ``modify``; what it took from each other segment (cropped)."""
        node, sid = self.segmentation_node, self.segment_id
        add, remove, extent = segments.update_labelmaps(update, node, self.volume_node, sid)
        adds = _mask(add)
        before: Dict[str, np.ndarray] = {}
        if adds.any():  # only added voxels can be taken from another segment
            before = {other: had & adds for other, had in self._others_on(add).items() if (had & adds).any()}
        self._modify(add, remove, [int(e) for e in extent])
        records: List[_Taken] = []
        after = self._others_on(add, only=set(before)) if before else {}
        for other, had in before.items():
            if other not in after:  # a segment deleted meanwhile has nothing to get back
                continue
            taken = had & ~after[other]
            bounds = set_voxel_bounds(taken.shape, lambda rows, t=taken: t[rows])
            if bounds is not None:
                box = tuple(slice(int(a), int(b)) for a, b in zip(*bounds))
                records.append((other, segments.oriented_labelmap(taken[box], add, tuple(int(v) for v in bounds[0]))))
        return records

    def _others_on(self, grid: slicer.vtkOrientedImageData, only: Optional[set] = None) -> Dict[str, np.ndarray]:
        """The other segments (``only`` these, when given) on ``grid`` (its extent), as masks: each layer
        is resampled once, not each segment (a segmentation of a hundred organs in a few shared layers
        stays quick), and a layer holding none of them not at all."""
        segmentation = self.segmentation_node.GetSegmentation()
        ni, nj, nk = grid.GetDimensions()
        found: Dict[str, np.ndarray] = {}
        if segmentation.GetSourceRepresentationName() != segments.BINARY_LABELMAP:
            for other in segmentation.GetSegmentIDs():
                if other != self.segment_id and (only is None or other in only):
                    found[other] = segments.segment_on_grid(self.segmentation_node, other, grid) > 0
            return found
        for layer in range(segmentation.GetNumberOfLayers()):
            ids = [
                i
                for i in segmentation.GetSegmentIDsForLayer(layer)
                if i != self.segment_id and (only is None or i in only)
            ]
            labelmap = segmentation.GetLayerDataObject(layer)
            if not ids or labelmap is None or labelmap.GetPointData().GetScalars() is None:
                continue
            resampled = slicer.vtkOrientedImageData()
            slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, grid, resampled)
            scalars = resampled.GetPointData().GetScalars()
            values = None if scalars is None else numpy_support.vtk_to_numpy(scalars).reshape(nk, nj, ni)
            for other in ids:
                label = segmentation.GetSegment(other).GetLabelValue()
                found[other] = np.zeros((nk, nj, ni), bool) if values is None else values == label
        return found

    def _give_back(self, records: List[_Taken]) -> None:
        """Add the voxels back to their segments, also where the object's segment holds them now: each
        segment held them just before the write that took them, and an undo or reset puts the segments
        back to before that write (the two overlapped then). Through a segment editor logic of its own
        (no masking, no overwriting; shared layers as the editor handles them, split where two
        segments overlap): ``SetBinaryLabelmapToSegment`` merges raw 0/1 values into a shared layer,
        which hands the voxels to whichever segment has label value 1."""
        node = self.segmentation_node
        logic = None
        for other, image in records:
            if node.GetSegmentation().GetSegment(other) is None:
                continue  # deleted meanwhile: nothing to give back to
            if logic is None:
                logic = _plain_editor_logic(node)
            extent = [int(e) for e in image.GetExtent()]
            logic.ModifySegmentByLabelmap(node, other, image, logic.ModificationModeAdd, extent, True, True)


class PlacementWatch:
    """Calls ``on_moved()`` once, the first time the object's volume or segmentation moves
    (:attr:`ObjectWrites.moved`); then stops observing. :meth:`stop` ends the watch without a call.

    Observes both nodes' ``TransformModifiedEvent`` (a parent transform, or one above it, changed or
    was swapped) and ``ModifiedEvent`` (the volume's origin, spacing or directions set); each event
    only compares two matrices, so renaming a node or the like costs nothing and counts for nothing.
    """

    def __init__(self, writes: ObjectWrites, on_moved: Callable[[], None]) -> None:
        self._writes = writes
        self._on_moved = on_moved
        self._observed: List[Tuple[vtk.vtkObject, int]] = []
        events = (slicer.vtkMRMLTransformableNode.TransformModifiedEvent, vtk.vtkCommand.ModifiedEvent)
        for node in (writes.volume_node, writes.segmentation_node):
            for event in events:
                self._observed.append((node, node.AddObserver(event, self._onEvent)))

    @property
    def active(self) -> bool:
        return bool(self._observed)

    def stop(self) -> None:
        for node, tag in self._observed:
            node.RemoveObserver(tag)
        self._observed = []

    def _onEvent(self, caller: object, event: str) -> None:
        if self.active and self._writes.moved:
            self.stop()
            self._on_moved()


def _plain_editor_logic(segmentation_node: slicer.vtkMRMLSegmentationNode) -> slicer.vtkSlicerSegmentEditorLogic:
    """A segment editor logic on its own editor node (not in the scene): edits anywhere, overwrites nothing."""
    editor_node = slicer.vtkMRMLSegmentEditorNode()
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    return logic
