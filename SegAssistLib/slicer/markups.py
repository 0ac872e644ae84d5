"""Markups as prompts: point lists -> :class:`PointPrompt`, ROI boxes -> 3D :class:`BoxPrompt`.

Positions are read in the markups node's frame and taken through its parent transforms to world
RAS, then through the reference volume's transforms to its continuous IJK.

Polarity convention (positive = "this is the object", negative = "this is background"):

1. A node attribute ``SegAssist.Polarity`` set to ``"negative"`` (or ``"positive"``) makes every
   point of the list negative (or positive) whatever its label: the effect keeps one list per
   polarity, so colours and undo stay per list.
2. Without it, a control point whose label starts with ``-`` (e.g. ``-1`` or ``-vessel``) is
   negative and every other point is positive, so one list can hold both, and a ``.mrk.json``
   written by hand stays readable.

Control points not placed yet (preview, undefined or missing positions) are skipped.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import slicer
import slicer.util

from SegAssistLib.errors import PromptError, SegAssistError
from SegAssistLib.prompts import BoxPrompt, PointPrompt
from SegAssistLib.slicer.coordinates import build_prompt, node_to_world_transform, ras_to_ijk

POLARITY_ATTRIBUTE = "SegAssist.Polarity"
NEGATIVE_LABEL_PREFIX = "-"


def set_polarity(markups_node: slicer.vtkMRMLMarkupsNode, positive: Optional[bool]) -> None:
    """Mark every point of the list positive or negative; None returns to per-point labels."""
    if positive is None:
        markups_node.RemoveAttribute(POLARITY_ATTRIBUTE)
    else:
        markups_node.SetAttribute(POLARITY_ATTRIBUTE, "positive" if positive else "negative")


def is_positive(markups_node: slicer.vtkMRMLMarkupsNode, index: int) -> bool:
    """The polarity of control point ``index`` under the convention above."""
    polarity = (markups_node.GetAttribute(POLARITY_ATTRIBUTE) or "").strip().lower()
    if polarity in ("positive", "negative"):
        return polarity == "positive"
    if polarity:
        raise SegAssistError(
            f"markups {markups_node.GetName()!r} has {POLARITY_ATTRIBUTE}={polarity!r}: use 'positive' or 'negative'"
        )
    label = markups_node.GetNthControlPointLabel(index) or ""
    return not label.strip().startswith(NEGATIVE_LABEL_PREFIX)


def point_prompts(
    markups_node: slicer.vtkMRMLMarkupsNode,
    volume_node: slicer.vtkMRMLVolumeNode,
) -> List[PointPrompt]:
    """One :class:`PointPrompt` per placed control point, in the list's order."""
    prompts: List[PointPrompt] = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue
        world = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, world)
        position = ras_to_ijk(world, volume_node)
        prompts.append(
            build_prompt(
                PointPrompt,
                f"control point {index} of {markups_node.GetName()!r}",
                position=position,
                positive=is_positive(markups_node, index),
            )
        )
    return prompts


def roi_corners_ras(roi_node: slicer.vtkMRMLMarkupsROINode) -> np.ndarray:
    """The 8 corners of an ROI box in world RAS (rotated ROIs and parent transforms included)."""
    size = np.asarray(roi_node.GetSize(), float)
    if not np.all(np.isfinite(size)) or np.any(size < 0):
        raise PromptError(f"ROI {roi_node.GetName()!r} has an invalid size {size.tolist()}")
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], float)
    local = signs * size / 2.0
    object_to_node = slicer.util.arrayFromVTKMatrix(roi_node.GetObjectToNodeMatrix())
    corners = local @ object_to_node[:3, :3].T + object_to_node[:3, 3]
    transform = node_to_world_transform(roi_node)
    if transform is not None:
        corners = np.array([transform.TransformDoublePoint(*c) for c in corners])
    return corners


def roi_box_prompt(
    roi_node: slicer.vtkMRMLMarkupsROINode,
    volume_node: slicer.vtkMRMLVolumeNode,
) -> BoxPrompt:
    """An ROI as a box in the volume's IJK.

    The box is the IJK bounding box of the ROI's corners: exact when the ROI is aligned with the
    volume's grid, enclosing it otherwise. An ROI thinner than one voxel along one axis gives a 2D
    box.
    """
    if (
        roi_node.GetNumberOfControlPoints() == 0
        or roi_node.GetNthControlPointPositionStatus(0) != roi_node.PositionDefined
    ):
        raise PromptError(f"ROI {roi_node.GetName()!r} is not placed yet")
    corners = ras_to_ijk(roi_corners_ras(roi_node), volume_node)
    image = volume_node.GetImageData()
    if image is not None:  # an ROI fitted to the volume ends on its edge up to float noise (-0.5000006)
        edges = (np.full(3, -0.5), np.asarray(image.GetDimensions(), float) - 0.5)
        for edge in edges:
            corners = np.where(np.abs(corners - edge) < 1e-4, edge, corners)
    return build_prompt(
        BoxPrompt,
        f"box from ROI {roi_node.GetName()!r}",
        min_corner=corners.min(axis=0),
        max_corner=corners.max(axis=0),
    )


def load_markups(
    logic: slicer.vtkSlicerMarkupsLogic,
    path: str,
    name: Optional[str] = None,
) -> slicer.vtkMRMLMarkupsNode:
    """Read a markups file (``.mrk.json``, ``.fcsv``) into the logic's scene through its storage node."""
    return load_all_markups(logic, path, name)[0]


def load_all_markups(
    logic: slicer.vtkSlicerMarkupsLogic,
    path: str,
    name: Optional[str] = None,
) -> List[slicer.vtkMRMLMarkupsNode]:
    """Every markups node a file holds (a ``.mrk.json`` may hold several), in the file's order."""
    scene = logic.GetMRMLScene()
    before = {scene.GetNthNodeByClass(i, "vtkMRMLMarkupsNode").GetID()
              for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsNode"))}  # fmt: skip
    node_id = logic.LoadMarkups(str(path), name) if name else logic.LoadMarkups(str(path))
    first = scene.GetNodeByID(node_id) if node_id else None
    if first is None:
        raise SegAssistError(f"could not read markups from {path}")
    added = [scene.GetNthNodeByClass(i, "vtkMRMLMarkupsNode")
             for i in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsNode"))]  # fmt: skip
    return [first] + [n for n in added if n.GetID() not in before and n.GetID() != first.GetID()]
