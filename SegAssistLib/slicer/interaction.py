"""The SegAssist segment editor effect without Qt: gestures, prompts from gestures, display.

The effect (``SegAssist/SegAssistEffect``) forwards slice-view events here and draws what this
module computes; everything that can be decided without Qt is decided here, so CI tests it on
slicer-core. Tools and keys are in :mod:`.shortcuts` (re-exported here); the prompt bookkeeping
(pending requests, stale replies, undo/redo) is in :mod:`.session_state`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import slicer

from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import (
    BoxPrompt,
    LassoPrompt,
    PointPrompt,
    Prompt,
    ScribblePrompt,
    check_prompt_inside,
    lasso_in_image,
    prompt_vertices_kji,
)
from SegAssistLib.slicer import coordinates
from SegAssistLib.slicer.shortcuts import (
    SEGMENT_EDITOR_KEYS,
    SHORTCUTS,
    SLICE_VIEW_KEYS,
    TOOL_FOR_ACTION,
    TOOL_TITLES,
    Action,
    Shortcut,
    Tool,
    help_rows,
    mouse_help,
    normalize_key,
    reserved_key,
    resolve_key,
    shortcut_labels,
    tooltip,
)

__all__ = [
    "SEGMENT_EDITOR_KEYS",
    "SHORTCUTS",
    "SLICE_VIEW_KEYS",
    "TOOL_FOR_ACTION",
    "TOOL_TITLES",
    "Action",
    "Feedback",
    "Gesture",
    "GestureRecorder",
    "Shortcut",
    "Tool",
    "check_inside",
    "gesture_to_prompt",
    "help_rows",
    "mouse_help",
    "normalize_key",
    "project_to_slice",
    "prompt_points_ijk",
    "reserved_key",
    "resolve_key",
    "shortcut_labels",
    "tooltip",
]

XY = Tuple[float, float]


# ---- gestures -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gesture:
    """A finished mouse gesture in one slice view: positions in the view's XY pixels."""

    tool: Tool
    positive: bool
    view: str
    xy: Tuple[XY, ...]


@dataclass(frozen=True)
class Feedback:
    """What to draw while a gesture is in progress."""

    view: str
    tool: Tool
    positive: bool
    xy: Tuple[XY, ...]
    closed: bool


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.hypot(float(a[0]) - float(b[0]), float(a[1]) - float(b[1]))


class GestureRecorder:
    """Turns left-button presses, moves and releases in slice views into :class:`Gesture` objects.

    - click: press and release within ``click_tolerance_px`` (a longer drag is not a click);
    - box: press, drag, release; both sides at least ``click_tolerance_px`` long;
    - scribble: press, drag, release; a vertex every ``min_step_px``;
    - lasso: a click per corner (a drag adds corners along the way; a click on the last corner,
      as the second click of a double-click, adds none); clicking within ``close_radius_px`` of the
      first corner, or :meth:`finish` (Enter), closes it (3 corners at least).

    A lasso stays open while the user zooms, pans or scrolls between clicks, so its corners are
    tied to the slice plane: given the view's XY-to-RAS matrix (``xy_to_ras`` of :meth:`press`,
    and :meth:`view_changed` whenever the slice node changes), the corners follow zoom and pan
    (they keep their RAS position); once the plane itself moves (another slice, a rotation) the
    lasso is cancelled, as Slicer's Draw effect does. ``hint`` says why the last gesture produced
    nothing.
    """

    def __init__(self, click_tolerance_px: float = 4.0, min_step_px: float = 2.0, close_radius_px: float = 8.0):
        self.click_tolerance_px = click_tolerance_px
        self.min_step_px = min_step_px
        self.close_radius_px = close_radius_px
        self.hint = ""
        self._reset()

    def _reset(self) -> None:
        self._view: Optional[str] = None
        self._tool: Optional[Tool] = None
        self._positive = True
        self._points: List[XY] = []
        self._current: Optional[XY] = None
        self._pressed = False
        self._xy_to_ras: Optional[np.ndarray] = None  # the view's matrix the XY points are in

    @property
    def active(self) -> bool:
        """A gesture is in progress (a button held, or a lasso not closed yet)."""
        return self._pressed or (self._tool is Tool.LASSO and bool(self._points))

    @property
    def pressed(self) -> bool:
        """The left button went down in a view and has not come up yet."""
        return self._pressed

    @property
    def drawing_lasso(self) -> bool:
        return self._tool is Tool.LASSO and bool(self._points)

    def cancel(self) -> bool:
        was_active = self.active
        self._reset()
        return was_active

    def press(
        self,
        view: str,
        xy: Sequence[float],
        tool: Tool,
        positive: bool,
        xy_to_ras: Optional[np.ndarray] = None,
    ) -> Optional[Gesture]:
        """A left-button press (or the second press of a double-click). ``xy_to_ras``: the slice
        node's ``GetXYToRAS()`` as a 4x4 array, so an open lasso can follow the view."""
        point = (float(xy[0]), float(xy[1]))
        self.hint = ""
        if xy_to_ras is not None:
            self.view_changed(view, xy_to_ras)
        if tool is Tool.LASSO and self.drawing_lasso and self._view == view:
            if len(self._points) >= 3 and _distance(point, self._points[0]) <= self.close_radius_px:
                return self.finish()
            self._pressed = True
            if _distance(point, self._points[-1]) > self.click_tolerance_px:  # not a double-click's 2nd press
                self._add(point, force=True)
            return None
        self._reset()
        self._view, self._tool, self._positive, self._pressed = view, tool, positive, True
        self._points = [point]
        self._current = point
        self._xy_to_ras = None if xy_to_ras is None else np.array(xy_to_ras, float)
        return None

    def view_changed(self, view: str, xy_to_ras: np.ndarray) -> bool:
        """The slice view ``view`` now maps XY to RAS by ``xy_to_ras`` (4x4). An open lasso there
        follows a zoom or pan; it is cancelled (with a hint) if the slice plane moved. True when
        what to draw changed."""
        if not self.drawing_lasso or view != self._view or self._xy_to_ras is None:
            return False
        new = np.asarray(xy_to_ras, float)
        old = self._xy_to_ras
        if np.allclose(new, old, rtol=0.0, atol=1e-9):
            return False
        if not _same_plane(old, new):
            self._reset()
            self.hint = "The slice changed while the lasso was open: lasso cancelled, draw it again on this slice"
            return True
        to_new = np.linalg.solve(new, old)  # old XY -> RAS -> new XY (both map z = 0 to the plane)

        def follow(point: XY) -> XY:
            x, y = (to_new @ np.array([point[0], point[1], 0.0, 1.0]))[:2]
            return (float(x), float(y))

        self._points = [follow(p) for p in self._points]
        self._current = None if self._current is None else follow(self._current)
        self._xy_to_ras = new.copy()
        return True

    def move(self, view: str, xy: Sequence[float]) -> bool:
        """Track the pointer; True when the feedback changed (redraw)."""
        if not self._pressed or view != self._view:
            return False
        point = (float(xy[0]), float(xy[1]))
        self._current = point
        if self._tool in (Tool.SCRIBBLE, Tool.LASSO):
            return self._add(point)
        return self._tool is Tool.BOX

    def release(self, view: str, xy: Sequence[float]) -> Optional[Gesture]:
        if not self._pressed or view != self._view:
            return None
        point = (float(xy[0]), float(xy[1]))
        self._pressed = False
        tool, start = self._tool, self._points[0]
        if tool is Tool.LASSO:
            self._add(point)
            return None
        if tool is Tool.CLICK:
            gesture = self._gesture((start,)) if _distance(start, point) <= self.click_tolerance_px else None
            if gesture is None:
                self.hint = "That was a drag, not a click: no point added"
        elif tool is Tool.BOX:
            big = min(abs(point[0] - start[0]), abs(point[1] - start[1])) >= self.click_tolerance_px
            gesture = self._gesture((start, point)) if big else None
            if gesture is None:
                self.hint = "Drag to draw a box: the rectangle was too small"
        else:
            self._add(point)
            gesture = self._gesture(tuple(self._points))
        self._reset()
        return gesture

    def finish(self) -> Optional[Gesture]:
        """Close the lasso being drawn (Enter or a click on its first corner)."""
        if not self.drawing_lasso:
            return None
        if len(self._points) < 3:
            self.hint = "A lasso needs at least 3 corners"
            return None
        gesture = self._gesture(tuple(self._points))
        self._reset()
        return gesture

    def drop_last_vertex(self) -> bool:
        if not self.drawing_lasso:
            return False
        self._points.pop()
        if not self._points:
            self._reset()
        return True

    def feedback(self) -> Optional[Feedback]:
        """The rubber band to draw now, or None."""
        if self._view is None or self._tool is None or not self.active:
            return None
        if self._tool is Tool.BOX and self._current is not None:
            (x0, y0), (x1, y1) = self._points[0], self._current
            corners = ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
            return Feedback(self._view, self._tool, True, corners, True)
        if self._tool in (Tool.SCRIBBLE, Tool.LASSO):
            return Feedback(self._view, self._tool, self._positive, tuple(self._points), False)
        return None

    def _add(self, point: XY, force: bool = False) -> bool:
        """Append a vertex ``min_step_px`` or more from the last one (``force``: any distance)."""
        if not force and self._points and _distance(point, self._points[-1]) < self.min_step_px:
            return False
        self._points.append(point)
        return True

    def _gesture(self, xy: Tuple[XY, ...]) -> Gesture:
        assert self._view is not None and self._tool is not None
        positive = True if self._tool is Tool.BOX else self._positive
        return Gesture(self._tool, positive, self._view, xy)


def _same_plane(a: np.ndarray, b: np.ndarray, tolerance_mm: float = 1e-3) -> bool:
    """Whether two XY-to-RAS matrices put z = 0 on the same plane (zoom and pan do not move it)."""
    na, nb = np.cross(a[:3, 0], a[:3, 1]), np.cross(b[:3, 0], b[:3, 1])
    la, lb = np.linalg.norm(na), np.linalg.norm(nb)
    if la == 0 or lb == 0:
        return False
    na, nb = na / la, nb / lb
    parallel = abs(float(na @ nb)) > 1.0 - 1e-9
    return parallel and abs(float((b[:3, 3] - a[:3, 3]) @ na)) <= tolerance_mm


# ---- prompts from gestures ----------------------------------------------------------------------
def check_inside(prompt: Prompt, shape_kji: Sequence[int]) -> None:
    """Raise :class:`PromptError` when a prompt does not lie in the volume of array shape ``shape_kji``,
    by the engine's and the server's rule (:func:`~SegAssistLib.prompts.check_prompt_inside`): a click,
    each box corner and each scribble vertex inside, with half a voxel of slack; a lasso may reach
    past the edge (one drawn around an object at the edge of the field of view, or a box dragged on
    an oblique slice near it, which becomes a 4-vertex lasso): its part in the image counts, and one
    with no part there is refused here (:func:`~SegAssistLib.prompts.lasso_in_image`), not by the
    backend."""
    what = "click" if isinstance(prompt, PointPrompt) else prompt.kind
    try:
        check_prompt_inside(prompt, shape_kji)
    except PromptError as exc:
        raise PromptError(f"the {what} is outside the volume: draw inside the image") from exc
    if isinstance(prompt, LassoPrompt):
        lasso_in_image(prompt, shape_kji)  # rasterises (its part in the image) only one reaching past the edge


def gesture_to_prompt(
    gesture: Gesture,
    slice_node: slicer.vtkMRMLSliceNode,
    volume_node: slicer.vtkMRMLVolumeNode,
    scribble_width: float = 1.0,
) -> Prompt:
    """The prompt a gesture makes on this slice view and volume (voxel coordinates of the volume)."""
    xy = [list(p) for p in gesture.xy]
    if gesture.tool is Tool.CLICK:
        prompt: Prompt = coordinates.point_prompt(slice_node, xy[0], volume_node, positive=gesture.positive)
    elif gesture.tool is Tool.BOX:
        prompt = coordinates.box_prompt(slice_node, xy[0], xy[1], volume_node)
    elif gesture.tool is Tool.SCRIBBLE:
        prompt = coordinates.scribble_prompt(slice_node, xy, volume_node, gesture.positive, scribble_width)
    else:
        prompt = coordinates.lasso_prompt(slice_node, xy, volume_node, gesture.positive)
    image = volume_node.GetImageData()
    if image is not None:
        i, j, k = image.GetDimensions()
        check_inside(prompt, (k, j, i))
    return prompt


# ---- display ------------------------------------------------------------------------------------
def prompt_points_ijk(prompt: Prompt) -> Tuple[np.ndarray, bool]:
    """A prompt's vertices in IJK (n, 3) and whether they form a closed outline."""
    if isinstance(prompt, PointPrompt):
        return np.asarray([prompt.position], float), False
    if isinstance(prompt, BoxPrompt):
        lo, hi = np.asarray(prompt.min_corner, float), np.asarray(prompt.max_corner, float)
        if prompt.is_2d:
            flat = int(np.argmin(hi - lo))
            a, b = [axis for axis in range(3) if axis != flat]
            corners = []
            for ua, ub in ((lo[a], lo[b]), (hi[a], lo[b]), (hi[a], hi[b]), (lo[a], hi[b])):
                c = lo.copy()
                c[a], c[b] = ua, ub
                corners.append(c)
            return np.asarray(corners), True
        return np.asarray([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]), False
    if isinstance(prompt, (ScribblePrompt, LassoPrompt)) and prompt.slab is not None:
        return _slab_outline_ijk(prompt)
    if isinstance(prompt, (ScribblePrompt, LassoPrompt)):
        return np.asarray(prompt.points, float), isinstance(prompt, LassoPrompt)
    return np.zeros((0, 3)), False


def _slab_outline_ijk(prompt: Prompt) -> Tuple[np.ndarray, bool]:
    """A line to draw for a scribble or lasso given as a slab: a scribble's voxels in order along
    the stroke's main direction; a lasso's outermost voxel every 5 degrees around its centre, closed."""
    pts = prompt_vertices_kji(prompt)[:, ::-1]
    if len(pts) < 3:
        return pts, False
    centred = pts - pts.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    along, across = centred @ vt[0], centred @ vt[1]
    if isinstance(prompt, ScribblePrompt):
        return pts[np.argsort(along, kind="stable")], False
    angle_bin = np.floor((np.arctan2(across, along) + np.pi) / (2 * np.pi) * 72).astype(int)
    radius = np.hypot(along, across)
    order = np.lexsort((-radius, angle_bin))  # by bin, farthest first
    first = np.r_[True, angle_bin[order][1:] != angle_bin[order][:-1]]
    return pts[order[first]], True


def project_to_slice(
    points_ras: np.ndarray,
    xy_to_ras: np.ndarray,
    tolerance_mm: float,
) -> Tuple[np.ndarray, np.ndarray]:
    """Slice-view XY of RAS points, and which lie within ``tolerance_mm`` of the slice plane.

    ``xy_to_ras`` is the slice node's ``GetXYToRAS()`` as a 4x4 array. Used to draw placed prompts
    only on the slices they were drawn on (or pass through).
    """
    pts = np.atleast_2d(np.asarray(points_ras, float))
    m = np.asarray(xy_to_ras, float)
    normal = np.cross(m[:3, 0], m[:3, 1])
    norm = np.linalg.norm(normal)
    if norm == 0 or len(pts) == 0:
        return np.zeros((len(pts), 2)), np.zeros(len(pts), bool)
    distance = (pts - m[:3, 3]) @ (normal / norm)
    xyz = np.linalg.solve(m, np.column_stack([pts, np.ones(len(pts))]).T).T
    return xyz[:, :2], np.abs(distance) <= tolerance_mm
