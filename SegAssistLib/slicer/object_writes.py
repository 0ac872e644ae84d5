"""One interactive object's writes into its segment, and the voxels they take from other segments.

Slicer's Segment Editor lets a segment's new voxels overwrite the other segments (its default
overwrite mode is "all segments"): each answer written with ``modifySelectedSegmentByLabelmap``
erases those voxels from every other segment. Reset and prompt undo must give them back, so each
write remembers, under the prompt count it leaves the object at, which voxels of which other
segments it took: only inside the box it wrote, only segments that lost some, cropped to what they
lost. Undo of that prompt and reset give them back (where the segment does not hold them then);
redo writes the answer again, which takes them again. Qt-free: the effect passes the write itself.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import slicer
from vtk.util import numpy_support

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.slicer import segments

#: ``modify(add, remove, extent)``: add then remove voxels of the object's segment, limited to the
#: extent (the effect: ``modifySelectedSegmentByLabelmap`` twice, honouring masking and overwrite).
Modify = Callable[[slicer.vtkOrientedImageData, slicer.vtkOrientedImageData, List[int]], None]

_Taken = Tuple[str, slicer.vtkOrientedImageData]  # (other segment ID, the voxels it lost, cropped)


def _mask(image: slicer.vtkOrientedImageData) -> np.ndarray:
    ni, nj, nk = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nk, nj, ni) > 0


class ObjectWrites:
    """The answers of one object written into its segment; what they took from other segments is
    given back on undo of the prompt that took it and on :meth:`reset`.

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

    @property
    def taken_voxels(self) -> int:
        """How many voxels (of the segmentation's grid) are held to give back."""
        return sum(int(_mask(image).sum()) for records in self._taken.values() for _, image in records)

    def apply(self, update: Optional[MaskUpdate], depth: int, undo: bool = False) -> None:
        """Write an answer that leaves the object at ``depth`` prompts in effect (after a prompt, a
        redo, or with ``undo`` an undo; ``update`` None or empty: the segment does not change)."""
        if not undo:  # a prompt or redo replaces what was done at this depth and above
            self._taken = {d: r for d, r in self._taken.items() if d < depth}
        back = self._pop_above(depth) if undo else []
        writes = update is not None and update.voxels.size > 0
        if not writes and not back:
            return
        self._save_undo()
        if writes:
            assert update is not None
            self._write(update, depth)
        self._give_back(back)

    def reset(self, baseline: np.ndarray) -> None:
        """Put the segment back to ``baseline`` ([k, j, i] on the volume's grid) and give back every
        voxel the object's answers took from other segments."""
        current = segments.segment_to_array(self.segmentation_node, self.segment_id, self.volume_node)
        update = MaskUpdate.between(current, baseline)
        back = self._pop_above(-1)
        if update.voxels.size == 0 and not back:
            return
        self._save_undo()
        if update.voxels.size:
            self._write(update, None)
        self._give_back(back)

    def _pop_above(self, depth: int) -> List[_Taken]:
        """Forget what was taken above ``depth``, newest first."""
        above = sorted((d for d in self._taken if d > depth), reverse=True)
        return [record for d in above for record in reversed(self._taken.pop(d))]

    def _write(self, update: MaskUpdate, depth: Optional[int]) -> None:
        node, sid = self.segmentation_node, self.segment_id
        add, remove, extent = segments.update_labelmaps(update, node, self.volume_node, sid)
        adds = _mask(add)
        before: Dict[str, np.ndarray] = {}
        if depth is not None and adds.any():  # only added voxels can be taken from another segment
            before = {other: had & adds for other, had in self._others_on(add).items() if (had & adds).any()}
        self._modify(add, remove, [int(e) for e in extent])
        if depth is None:
            return
        records = self._taken.setdefault(depth, [])
        after = self._others_on(add, only=set(before)) if before else {}
        for other, had in before.items():
            if other not in after:  # a segment deleted meanwhile has nothing to get back
                continue
            taken = had & ~after[other]
            if taken.any():
                where = np.argwhere(taken)
                lo, hi = where.min(0), where.max(0) + 1
                box = tuple(slice(a, b) for a, b in zip(lo, hi))
                records.append((other, segments.oriented_labelmap(taken[box], add, tuple(int(v) for v in lo))))

    def _others_on(
        self, grid: slicer.vtkOrientedImageData, only: Optional[set] = None
    ) -> Dict[str, np.ndarray]:
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
            ids = [i for i in segmentation.GetSegmentIDsForLayer(layer)
                   if i != self.segment_id and (only is None or i in only)]
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
        """Add the voxels back to their segments where the object's segment does not hold them now.
        Through a segment editor logic of its own (no masking, no overwriting; shared layers as the
        editor handles them): ``SetBinaryLabelmapToSegment`` merges raw 0/1 values into a shared layer,
        which hands the voxels to whichever segment has label value 1."""
        node = self.segmentation_node
        logic = None
        for other, image in records:
            if node.GetSegmentation().GetSegment(other) is None:
                continue  # deleted meanwhile: nothing to give back to
            free = _mask(image) & ~(segments.segment_on_grid(node, self.segment_id, image) > 0)
            if not free.any():
                continue
            if logic is None:
                logic = _plain_editor_logic(node)
            labelmap = segments.oriented_labelmap(free, image)
            extent = [int(e) for e in labelmap.GetExtent()]
            logic.ModifySegmentByLabelmap(node, other, labelmap, logic.ModificationModeAdd, extent, True, True)


def _plain_editor_logic(segmentation_node: slicer.vtkMRMLSegmentationNode) -> slicer.vtkSlicerSegmentEditorLogic:
    """A segment editor logic on its own editor node (not in the scene): edits anywhere, overwrites nothing."""
    editor_node = slicer.vtkMRMLSegmentEditorNode()
    editor_node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    return logic
