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

A segment in another layer edited outside SegAssist is remembered instead (:meth:`SegmentChangeWatch.mark`,
:meth:`~SegmentChangeWatch.edited_since`): an answer to a request made before that edit must not
take its voxels (the editor's "overwrite all segments" would erase the user's newer strokes, for
example paint added while the last answers of an accepted object were on their way).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Set

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
    :meth:`writing`; then stops observing. :meth:`stop` ends the watch without a call. Meanwhile it
    counts the edits of segments in other layers made outside :meth:`writing` (:meth:`edited_since`)."""

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
        self._other_stamps = self._others()
        self._edits = 0  # edits of other segments seen outside SegAssist's writes
        self._edited_at: Dict[str, int] = {}  # other segment -> the edit count when it last changed
        self._tags: List[int] = [self._segmentation.AddObserver(SEGMENT_MODIFIED, self._onSegmentModified)]
        if SOURCE_MODIFIED is not None:
            self._tags.append(self._segmentation.AddObserver(SOURCE_MODIFIED, self._onSourceModified))

    @property
    def active(self) -> bool:
        return bool(self._tags)

    def mark(self) -> int:
        """A mark of now (when a request is made), for :meth:`edited_since`."""
        return self._edits

    def edited_since(self, mark: int) -> Set[str]:
        """The other segments (in other layers than this one) edited outside SegAssist after ``mark``."""
        return {segment_id for segment_id, at in self._edited_at.items() if at > mark}

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """SegAssist's own writes: not a change from outside; the stamps follow them (its answers
        take voxels from other segments, and give them back)."""
        self._writing = True
        try:
            yield
        finally:
            self._writing = False
            self._stamp = labelmap_stamp(self._node, self._segment_id)
            self._other_stamps = self._others()

    def stop(self) -> None:
        for tag in self._tags:
            self._segmentation.RemoveObserver(tag)
        self._tags = []

    def _others(self) -> Dict[str, Optional[int]]:
        """The labelmap stamp of every other segment."""
        ids = self._segmentation.GetSegmentIDs()
        return {i: labelmap_stamp(self._node, i) for i in ids if i != self._segment_id}

    def _onSourceModified(self, caller: object, event: str) -> None:
        self._onSegmentModified(caller, event)  # fired for any segment: counts when this one's labelmap moved

    def _onSegmentModified(self, caller: object, event: str) -> None:
        if self._writing or not self.active:
            return
        if labelmap_stamp(self._node, self._segment_id) != self._stamp:
            self._changed()
            return
        others = self._others()
        edited = [i for i, stamp in others.items() if stamp != self._other_stamps.get(i)]
        self._other_stamps = others
        if edited:
            self._edits += 1
            self._edited_at.update((i, self._edits) for i in edited)

    def _changed(self) -> None:
        self.stop()
        self._on_changed()
