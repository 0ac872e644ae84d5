"""Slice-view XY -> world RAS -> continuous IJK of a volume, and prompts drawn on slice views.

XY is a slice view's pixel position (origin bottom-left, as Slicer's interactor reports it; the
third coordinate is the lightbox slice index, 0 in a normal view). ``vtkMRMLSliceNode.GetXYToRAS()``
takes it to world RAS; the volume's parent transforms (even non-linear ones) and its RAS-to-IJK
matrix take it to continuous IJK, voxel centres at integers. IJK here, as in prompts, indexes the
node's voxel array from 0 (``arrayFromVolume``, what the engine gets): image data whose extent
starts elsewhere has its IJK shifted by that start (:func:`~SegAssistLib.slicer.volumes.extent_start`).

Boxes: a box drawn on a slice whose plane is aligned with the volume's grid (any two IJK axes in
the view, so the usual axial, sagittal and coronal views of a non-oblique volume) becomes a
:class:`BoxPrompt` flat along the third axis. On any other slice (oblique views, oblique volumes, or
a view rotated in-plane) its four corners become a 4-vertex :class:`LassoPrompt`: the same "the
object lies within this outline" on a plane that no axis-aligned box can describe.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type, TypeVar, Union

import numpy as np
import slicer
import slicer.util
import vtk
from pydantic import ValidationError

from SegAssistLib.errors import PromptError
from SegAssistLib.prompts import BoxPrompt, LassoPrompt, PointPrompt, ScribblePrompt
from SegAssistLib.slicer.volumes import extent_start

#: Largest angle (radians) between a slice axis and an IJK axis for the slice to count as aligned.
ALIGNMENT_TOLERANCE_RAD = 1e-3

P = TypeVar("P")
Points = Union[Sequence[float], Sequence[Sequence[float]], np.ndarray]


def _as_points(points: Points, dim: int, what: str) -> Tuple[np.ndarray, bool]:
    arr = np.asarray(points, dtype=float)
    single = arr.ndim == 1
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[1] != dim or arr.shape[0] == 0:
        raise PromptError(f"{what} must be {dim} coordinates or a list of them, got shape {np.shape(points)}")
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{what} has non-finite coordinates")
    return arr, single


def _transform_points(transform: vtk.vtkAbstractTransform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformDoublePoint(*p) for p in points], dtype=float)


def _parent_transform(node: slicer.vtkMRMLTransformableNode, to_world: bool) -> Optional[vtk.vtkGeneralTransform]:
    """The node's own frame -> world RAS (``to_world``) or back, or None without a parent transform."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return None
    transform = vtk.vtkGeneralTransform()
    source, target = (parent, None) if to_world else (None, parent)
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(source, target, transform)
    return transform


def world_to_node_transform(node: slicer.vtkMRMLTransformableNode) -> Optional[vtk.vtkGeneralTransform]:
    """World RAS -> the node's own frame, or None when the node has no parent transform."""
    return _parent_transform(node, to_world=False)


def node_to_world_transform(node: slicer.vtkMRMLTransformableNode) -> Optional[vtk.vtkGeneralTransform]:
    """The node's own frame -> world RAS, or None when the node has no parent transform."""
    return _parent_transform(node, to_world=True)


def ras_to_ijk(points_ras: Points, volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """World RAS point(s) -> continuous IJK of the volume (its voxel array's, from 0), through its
    parent transforms."""
    pts, single = _as_points(points_ras, 3, "RAS point")
    transform = world_to_node_transform(volume_node)
    if transform is not None:
        pts = _transform_points(transform, pts)
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    ijk = pts @ m[:3, :3].T + m[:3, 3] - extent_start(volume_node)
    return ijk[0] if single else ijk


def ijk_to_ras(points_ijk: Points, volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Continuous IJK point(s) of the volume (its voxel array's, from 0) -> world RAS, through its
    parent transforms."""
    pts, single = _as_points(points_ijk, 3, "IJK point")
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    ras = (pts + extent_start(volume_node)) @ m[:3, :3].T + m[:3, 3]
    transform = node_to_world_transform(volume_node)
    if transform is not None:
        ras = _transform_points(transform, ras)
    return ras[0] if single else ras


def voxel_index(ijk: Sequence[float]) -> Tuple[int, int, int]:
    """The voxel whose centre is nearest a continuous IJK position (halves round up)."""
    i, j, k = (int(np.floor(float(c) + 0.5)) for c in ijk)
    return (i, j, k)


def xy_to_ras(slice_node: slicer.vtkMRMLSliceNode, xy: Points) -> np.ndarray:
    """Slice-view position(s) ``(x, y)`` or ``(x, y, lightbox_index)`` -> world RAS."""
    arr = np.atleast_2d(np.asarray(xy, dtype=float))
    if arr.ndim == 2 and arr.shape[1] == 2:
        arr = np.column_stack([arr, np.zeros(len(arr))])
    pts, _ = _as_points(arr, 3, "slice-view position")
    single = np.asarray(xy).ndim == 1
    m = slicer.util.arrayFromVTKMatrix(slice_node.GetXYToRAS())
    ras = pts @ m[:3, :3].T + m[:3, 3]
    return ras[0] if single else ras


def xy_to_ijk(slice_node: slicer.vtkMRMLSliceNode, xy: Points, volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """Slice-view position(s) -> continuous IJK of the volume."""
    return ras_to_ijk(xy_to_ras(slice_node, xy), volume_node)


def build_prompt(cls: Type[P], what: str, **fields: object) -> P:
    """Construct a prompt, turning validation errors into :class:`PromptError` naming ``what``."""
    try:
        return cls(**fields)
    except ValidationError as exc:
        reasons = "; ".join(err.get("msg", str(err)) for err in exc.errors())
        raise PromptError(f"invalid {what}: {reasons}") from exc


def point_prompt(
    slice_node: slicer.vtkMRMLSliceNode,
    xy: Sequence[float],
    volume_node: slicer.vtkMRMLVolumeNode,
    positive: bool = True,
) -> PointPrompt:
    """A click in a slice view."""
    position = xy_to_ijk(slice_node, xy, volume_node)
    return build_prompt(PointPrompt, "click", position=position, positive=positive)


def slice_flat_axis(
    slice_node: slicer.vtkMRMLSliceNode,
    volume_node: slicer.vtkMRMLVolumeNode,
    at_xy: Sequence[float] = (0.0, 0.0),
    tolerance_rad: float = ALIGNMENT_TOLERANCE_RAD,
) -> Optional[int]:
    """The IJK axis (0=i, 1=j, 2=k) the slice is perpendicular to, when both of the view's x and y
    axes run along IJK axes near ``at_xy``; None for an oblique (or in-plane rotated) slice."""
    x, y = float(at_xy[0]), float(at_xy[1])
    ijk = xy_to_ijk(slice_node, [[x, y], [x + 1.0, y], [x, y + 1.0]], volume_node)
    cos_limit = np.cos(tolerance_rad)
    axes = []
    for edge in (ijk[1] - ijk[0], ijk[2] - ijk[0]):
        unit = edge / np.linalg.norm(edge)
        axis = int(np.argmax(np.abs(unit)))
        if abs(unit[axis]) < cos_limit:
            return None
        axes.append(axis)
    if axes[0] == axes[1]:
        return None
    return 3 - axes[0] - axes[1]


def box_prompt(
    slice_node: slicer.vtkMRMLSliceNode,
    xy_start: Sequence[float],
    xy_end: Sequence[float],
    volume_node: slicer.vtkMRMLVolumeNode,
    tolerance_rad: float = ALIGNMENT_TOLERANCE_RAD,
) -> Union[BoxPrompt, LassoPrompt]:
    """A rectangle dragged in a slice view from ``xy_start`` to ``xy_end`` (any two opposite corners).

    On a grid-aligned slice: a :class:`BoxPrompt` flat along the slice normal's axis (its corners
    are the rectangle's, continuous IJK). Otherwise a 4-vertex :class:`LassoPrompt`.
    """
    (x0, y0), (x1, y1) = (float(v) for v in xy_start[:2]), (float(v) for v in xy_end[:2])
    corners_xy = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    corners = xy_to_ijk(slice_node, corners_xy, volume_node)
    flat = slice_flat_axis(slice_node, volume_node, at_xy=(min(x0, x1), min(y0, y1)), tolerance_rad=tolerance_rad)
    if flat is None:
        return build_prompt(LassoPrompt, "box on an oblique slice", points=corners, positive=True)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    lo[flat] = hi[flat] = float(corners[:, flat].mean())  # one plane, free of rounding noise
    return build_prompt(BoxPrompt, "box", min_corner=lo, max_corner=hi)


def scribble_prompt(
    slice_node: slicer.vtkMRMLSliceNode,
    xys: Points,
    volume_node: slicer.vtkMRMLVolumeNode,
    positive: bool = True,
    width: float = 1.0,
) -> ScribblePrompt:
    """A stroke (polyline of slice-view positions); ``width`` is in voxels, widened within the view's
    slice (whose normal the prompt carries: a straight stroke along an image axis does not tell it)."""
    xy = np.atleast_2d(np.asarray(xys, float))
    points = xy_to_ijk(slice_node, xy, volume_node)
    x, y = float(xy[0, 0]), float(xy[0, 1])
    corner, right, up = xy_to_ijk(slice_node, [[x, y], [x + 1.0, y], [x, y + 1.0]], volume_node)
    normal = np.cross(right - corner, up - corner)
    return build_prompt(ScribblePrompt, "scribble", points=points, positive=positive, width=width, normal=normal)


def lasso_prompt(
    slice_node: slicer.vtkMRMLSliceNode,
    xys: Points,
    volume_node: slicer.vtkMRMLVolumeNode,
    positive: bool = True,
) -> LassoPrompt:
    """A closed outline drawn in a slice view (the last vertex joins the first)."""
    points = xy_to_ijk(slice_node, np.atleast_2d(np.asarray(xys, float)), volume_node)
    return build_prompt(LassoPrompt, "lasso", points=points, positive=positive)
