"""Volume nodes <-> :class:`SegAssistLib.image.Volume`, geometry included.

A volume node stores voxels ``[k, j, i]`` and an IJK-to-RAS matrix in its own frame; a parent
transform places that frame in the world. :class:`Volume` holds ITK/LPS geometry (spacing, origin,
direction columns = i, j, k axes): LPS and RAS differ by the sign of x and y.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import slicer
import slicer.util
import vtk

from SegAssistLib.errors import ImageError, SegAssistError
from SegAssistLib.image import ORTHONORMAL_TOLERANCE, Volume
from SegAssistLib.slicer.scene import read_node_file, write_node_file

#: Multiplying RAS coordinates by this gives LPS ones, and back (it is its own inverse).
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def transform_to_world(node: slicer.vtkMRMLTransformableNode) -> np.ndarray:
    """The 4x4 matrix from the node's frame to world RAS (identity without a parent transform).

    Raises :class:`SegAssistError` for a non-linear parent transform: a grid cannot follow it;
    harden it (:func:`harden_transform`, which resamples) or use linear transforms.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(parent, None, matrix):
        raise SegAssistError(
            f"node {node.GetName()!r} is under a non-linear transform ({parent.GetName()!r}): "
            "harden the transform first, or use a linear one"
        )
    return slicer.util.arrayFromVTKMatrix(matrix)


def extent_start(volume_node: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    """The (i, j, k) of the first voxel of the node's image data: its extent's start, 0 for nearly
    every volume (one put together by VTK filters, ``vtkExtractVOI``, may start elsewhere)."""
    image_data = volume_node.GetImageData()
    if image_data is None:
        return np.zeros(3)
    e = image_data.GetExtent()
    return np.array([e[0], e[2], e[4]], float)


def ijk_to_ras_matrix(volume_node: slicer.vtkMRMLVolumeNode, world: bool = True) -> np.ndarray:
    """The 4x4 matrix from a voxel's index in the node's voxel array (``arrayFromVolume``'s
    ``[k, j, i]`` reversed, from 0: the indices of prompts and of :class:`Volume`) to RAS; with
    ``world`` its parent transforms are applied. That is the node's IJK-to-RAS matrix after a shift
    by :func:`extent_start` (none for image data starting at 0, where both indices agree)."""
    shift = np.eye(4)
    shift[:3, 3] = extent_start(volume_node)
    matrix = slicer.util.arrayFromVTKMatrix(_vtk_ijk_to_ras(volume_node)) @ shift
    return transform_to_world(volume_node) @ matrix if world else matrix


def _vtk_ijk_to_ras(volume_node: slicer.vtkMRMLVolumeNode) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return matrix


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple:
    """(spacing, origin, direction) in ITK/LPS convention from a 4x4 IJK-to-RAS matrix."""
    lps = RAS_TO_LPS @ np.asarray(ijk_to_ras, float)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing == 0) or not np.all(np.isfinite(lps)):
        raise ImageError(f"the IJK-to-RAS matrix is degenerate:\n{np.asarray(ijk_to_ras)}")
    return tuple(spacing), tuple(lps[:3, 3]), columns / spacing


def ijk_to_ras_from_volume(volume: Volume) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a :class:`Volume` (its LPS geometry turned into RAS)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(volume.direction, float) * np.asarray(volume.spacing, float)
    lps[:3, 3] = volume.origin
    return RAS_TO_LPS @ lps


def nearest_orthogonal(direction: np.ndarray) -> np.ndarray:
    """``direction`` itself when its columns are orthonormal (within what :func:`~SegAssistLib.image.validate_image`
    allows), else the orthogonal matrix nearest to it: the orthogonal factor of its polar decomposition
    (``U @ Vt`` of its SVD), which keeps its handedness (a mirrored grid stays mirrored)."""
    d = np.asarray(direction, float)
    if np.abs(d.T @ d - np.eye(3)).max() <= ORTHONORMAL_TOLERANCE:
        return d
    u, _, vt = np.linalg.svd(d)
    return u @ vt


def volume_from_node(volume_node: slicer.vtkMRMLVolumeNode, world: bool = True) -> Volume:
    """A copy of the node's voxels with its geometry.

    With ``world`` (the default) the geometry is where the image is displayed: linear parent
    transforms are folded into spacing, origin and direction (the node itself is not changed).
    Without it, the geometry is the node's own, ignoring its transforms.

    A :class:`Volume`'s grid is a rotated box (direction: a rotation, possibly mirrored), and a
    sheared or anisotropically scaled transform (an affine registration) makes the world grid a
    skewed one that no image file can hold: such a geometry is approximated by the nearest rotated
    box, so the image can still be segmented. Spacing is the length of each world voxel step (the
    world matrix's column norms: the true distance between neighbouring voxels along i, j and k,
    what a model resamples by); origin is where array voxel (0, 0, 0) is (the image data's first
    voxel, also when its extent does not start at 0: :func:`ijk_to_ras_matrix`); direction is the orthogonal
    matrix nearest to the unit world axes (:func:`nearest_orthogonal`, of the normalised columns, so
    a thick-slice axis weighs no more than the others). :meth:`Volume.ijk_to_physical` then misses
    the displayed position by the shear (a voxel's position, not which voxel it is): prompts and
    answers go by the node's voxel indices, which the approximation does not touch, but physical
    points must come from the node's matrices (:func:`ijk_to_ras_matrix`). A geometry that is a
    rotated box already (rigid transforms) is returned exactly as composed.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ImageError("the volume node has no image data")
    array = slicer.util.arrayFromVolume(volume_node)
    if array.ndim != 3:
        raise ImageError(
            f"volume {volume_node.GetName()!r} has voxel shape {array.shape}: "
            "a single-component scalar volume is needed (extract one component first)"
        )
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras_matrix(volume_node, world=world))
    direction = nearest_orthogonal(direction)
    return Volume(array=np.array(array, copy=True), spacing=spacing, origin=origin, direction=direction)


def _slicer_compatible(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ImageError(f"a volume needs a 3D array [k, j, i], got shape {array.shape}")
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        # Slicer rejects 64-bit integer voxels; narrow them when no value is lost.
        target = np.int32 if array.dtype.kind == "i" else np.uint32
        info = np.iinfo(target)
        if array.size and (array.min() < info.min or array.max() > info.max):
            raise ImageError(f"{array.dtype} voxels outside the {np.dtype(target)} range cannot be stored in Slicer")
        return array.astype(target)
    if array.dtype.kind not in "iuf":
        raise ImageError(f"voxel type {array.dtype} cannot be stored in a Slicer volume")
    return array


def volume_to_node(
    volume: Volume,
    scene: slicer.vtkMRMLScene,
    name: str = "SegAssist volume",
    node: Optional[slicer.vtkMRMLVolumeNode] = None,
    parent_transform: Optional[slicer.vtkMRMLTransformNode] = None,
    class_name: str = "vtkMRMLScalarVolumeNode",
) -> slicer.vtkMRMLVolumeNode:
    """Write a :class:`Volume` into a new (or the given) volume node.

    The volume's geometry is taken as world geometry: if the node ends up under a parent transform
    (``parent_transform``, or the one ``node`` already has), its own IJK-to-RAS matrix is set so that
    the image lands at the same world position.
    """
    array = _slicer_compatible(volume.array)
    if node is None:
        node = scene.AddNewNodeByClass(class_name, name)
    elif node.GetScene() is None:
        scene.AddNode(node)
    if parent_transform is not None:
        node.SetAndObserveTransformNodeID(parent_transform.GetID())
    local = np.linalg.inv(transform_to_world(node)) @ ijk_to_ras_from_volume(volume)
    was_modifying = node.StartModify()
    try:
        slicer.util.updateVolumeFromArray(node, array)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(local))
    finally:
        node.EndModify(was_modifying)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def harden_transform(node: slicer.vtkMRMLTransformableNode) -> None:
    """Apply the node's parent transforms to its data and detach it (non-linear ones resample)."""
    if node.GetParentTransformNode() is None:
        return
    if not node.HardenTransform():
        raise SegAssistError(f"could not harden the transform of {node.GetName()!r}")


def load_volume_file(
    scene: slicer.vtkMRMLScene,
    path: Union[str, Path],
    name: Optional[str] = None,
    labelmap: bool = False,
) -> slicer.vtkMRMLVolumeNode:
    """Read an image file (NRRD, NIfTI, MHA, ...) into a new volume node through a storage node.

    ``slicer.util.loadVolume`` needs the Qt application; this works headless too.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image file not found: {path}")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    return read_node_file(scene, path, class_name, storage, name, "an image", ImageError)


def save_volume_file(volume_node: slicer.vtkMRMLVolumeNode, path: Union[str, Path], compress: bool = True) -> Path:
    """Write a volume node to a file through its storage node (its own frame: transforms not applied)."""
    what = f"volume {volume_node.GetName()!r}"
    return write_node_file(volume_node, path, slicer.vtkMRMLVolumeArchetypeStorageNode, compress, what, ImageError)
