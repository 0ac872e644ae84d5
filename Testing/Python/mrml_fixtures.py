"""Helpers for tests on real MRML scenes (slicer-core): transforms, oblique volumes, oracles.

The oracles use Slicer's own code paths, not SegAssist's: world geometry of a volume from
``vtkMRMLTransformNode.GetMatrixTransformToWorld`` and the node's IJK-to-RAS matrix, and slice-view
clicks from ``vtkSlicerSegmentEditorLogic.XyToIjk`` (the function Slicer's segment editor effects
use). Not ``CreateOrientedImageDataFromVolumeNode(node, None)``: in slicer-core 5.13 it composes
two nested linear transforms in the wrong order (B @ A instead of A @ B).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")
import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    """3x3 rotation about ``axis`` (Rodrigues)."""
    a = np.asarray(axis, float)
    a = a / np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def affine(linear: np.ndarray, translation: Sequence[float]) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = linear
    m[:3, 3] = translation
    return m


def add_linear_transform(scene, to_parent: np.ndarray, name: str = "T", parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.asarray(to_parent, float)))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_volume(
    scene,
    array: np.ndarray,
    ijk_to_ras: np.ndarray,
    name: str = "volume",
    parent=None,
):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras, float)))
    node.CreateDefaultDisplayNodes()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def oblique_ijk_to_ras(
    spacing: Sequence[float] = (0.8, 1.1, 2.5),
    origin: Sequence[float] = (12.5, -30.0, 7.25),
    axis: Sequence[float] = (1.0, 2.0, 0.5),
    degrees: float = 23.0,
) -> np.ndarray:
    return affine(rotation(axis, degrees) * np.asarray(spacing, float), origin)


def random_volume(shape: Tuple[int, int, int] = (9, 11, 13), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


def add_nested_oblique_volume(scene, array: Optional[np.ndarray] = None, name: str = "oblique"):
    """An oblique volume (:func:`oblique_ijk_to_ras`) under two nested rotated and shifted linear
    transforms; its voxels are ``array`` (default: a ``random_volume`` of shape (20, 24, 28))."""
    outer = add_linear_transform(scene, affine(rotation((0, 0, 1), 90), (5, -7, 3)), "outer")
    inner = add_linear_transform(scene, affine(rotation((1, -1, 2), 35), (-20.5, 4.0, 11.0)), "inner", outer)
    voxels = random_volume((20, 24, 28)) if array is None else array
    return add_volume(scene, voxels, oblique_ijk_to_ras(), name, parent=inner)


def world_image_geometry(volume_node) -> np.ndarray:
    """Oracle: the volume's IJK -> world RAS matrix as Slicer's transform node composes it."""
    to_world = vtk.vtkMatrix4x4()
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        parent.GetMatrixTransformToWorld(to_world)
    return slicer.util.arrayFromVTKMatrix(to_world) @ local_ijk_to_ras(volume_node)


def world_oriented_image(volume_node):
    """An empty oriented image on the volume's grid in world RAS."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(volume_node.GetImageData().GetExtent())
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(world_image_geometry(volume_node)))
    return image


def slicer_xy_to_voxel(slice_node, xy: Sequence[float], volume_node) -> Tuple[int, int, int]:
    """Oracle: the voxel Slicer's segment editor would paint for a click at ``xy``."""
    image = world_oriented_image(volume_node)
    out = [0, 0, 0]
    slicer.vtkSlicerSegmentEditorLogic.XyToIjk([float(xy[0]), float(xy[1])], out, slice_node, image, None)
    return (int(out[0]), int(out[1]), int(out[2]))


def voxel_world(volume_node, ijk: Sequence[float]) -> np.ndarray:
    """Oracle: world RAS of a voxel position, from :func:`world_image_geometry`."""
    m = world_image_geometry(volume_node)
    return (m @ np.append(np.asarray(ijk, float), 1.0))[:3]


def segment_ids(segmentation_node) -> list:
    s = segmentation_node.GetSegmentation()
    return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]


def local_ijk_to_ras(volume_node) -> np.ndarray:
    """The node's own IJK-to-RAS matrix (parent transforms not applied)."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


class EditorWidget:
    """What SegAssist uses of Slicer's qMRMLSegmentEditorWidget, over a real segment editor logic
    (``SegAssistLib.slicer.segments.SegmentEditor``)."""

    def __init__(self, editor):
        self._editor = editor

    def segmentationNode(self):
        return self._editor.segmentation_node

    def saveStateForUndo(self):
        self._editor.logic.SaveStateForUndo()


def editor_modules(editor):
    """A stand-in for ``slicer.modules`` whose Segment Editor edits with ``editor`` (where
    ``save_editor_undo_state`` looks for it)."""
    from types import SimpleNamespace

    return SimpleNamespace(SegmentEditorWidget=SimpleNamespace(editor=EditorWidget(editor)))


def segment_editor_logic(scene, segmentation_node, volume_node, segment_id: str):
    """Slicer's segment editor logic on ``segmentation_node`` and ``volume_node`` with the editor's defaults
    (overwrite all segments), ``segment_id`` selected: (logic, editor node)."""
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(volume_node)
    editor_node.SetSelectedSegmentID(segment_id)
    return logic, editor_node
