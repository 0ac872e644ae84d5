"""Notice when a segment's voxels change behind an interactive object's back.

An object's prompts and the model's answers describe the segment as SegAssist last wrote it; once
anything else changes the segment (the Segment Editor's undo, another effect, a script), the next
answer, which carries only the box that changed, would be pasted onto a segment it no longer
matches. Slicer's editor undo restores segments with ``CopySegment``, which fires
``SegmentModified`` only, not ``SourceRepresentationModified``; so both are observed, and a
``SegmentModified`` counts when the segment's binary labelmap was modified since SegAssist's own
last write (its modification time is the stamp). Renaming or recolouring a segment fires
``SegmentModified`` too and leaves the labelmap alone: it does not count. Both events fire for
a change to any segment: only one that moves this segment's labelmap counts. Segments that share
a layer share its labelmap, so a change to one of them counts too: the object ends, nothing is
lost; a segment in another layer is another labelmap and does not.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, List, Optional

import slicer

from SegAssistLib.slicer.segments import BINARY_LABELMAP

SOURCE_MODIFIED = getattr(slicer.vtkSegmentation, "SourceRepresentationModified", None) or getattr(
    slicer.vtkSegmentation, "MasterRepresentationModified", None
)
SEGMENT_MODIFIED = slicer.vtkSegmentation.SegmentModified


def labelmap_stamp(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> Optional[int]:
    """The modification time of the segment's binary labelmap (None when it has none, or is gone)."""
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        return None
    labelmap = segment.GetRepresentation(BINARY_LABELMAP)
    return None if labelmap is None else int(labelmap.GetMTime())


class SegmentChangeWatch:
    """Calls ``on_changed()`` once, the first time the segment changes other than inside
    :meth:`writing`; then stops observing. :meth:`stop` ends the watch without a call."""

    def __init__(
        self,
        segmentation_node: slicer.vtkMRMLSegmentationNode,
        segment_id: str,
        on_changed: Callable[[], None],
    ) -> None:
        self._node = segmentation_node
        self._segment_id = segment_id
        self._on_changed = on_changed
        self._writing = False
        self._stamp = labelmap_stamp(segmentation_node, segment_id)
        self._segmentation = segmentation_node.GetSegmentation()
        self._tags: List[int] = [self._segmentation.AddObserver(SEGMENT_MODIFIED, self._onSegmentModified)]
        if SOURCE_MODIFIED is not None:
            self._tags.append(self._segmentation.AddObserver(SOURCE_MODIFIED, self._onSourceModified))

    @property
    def active(self) -> bool:
        return bool(self._tags)

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """SegAssist's own writes: not a change from outside; the stamp follows them."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
            self._stamp = labelmap_stamp(self._node, self._segment_id)

    def stop(self) -> None:
        for tag in self._tags:
            self._segmentation.RemoveObserver(tag)
        self._tags = []

    def _onSourceModified(self, caller: object, event: str) -> None:
        self._onSegmentModified(caller, event)  # fired for any segment: counts when this one's labelmap moved

    def _onSegmentModified(self, caller: object, event: str) -> None:
        if not self._writing and self.active and labelmap_stamp(self._node, self._segment_id) != self._stamp:
            self._changed()

    def _changed(self) -> None:
        self.stop()
        self._on_changed()
