"""Segments <-> numpy masks on a reference volume's grid; region writes with undo; ``.seg.nrrd`` IO.

Masks are ``uint8`` arrays ``[k, j, i]`` of 0 and 1 with the reference volume's shape. A segment's
own labelmap may be stored on another grid, cropped, or shared with other segments in one layer
(label values 1, 2, ...): reads resample it (nearest neighbour) onto the volume's grid and keep only
this segment's label. Writes land on the segmentation's own reference geometry, as Slicer's effects'
do: an answer on the volume's grid is resampled (nearest neighbour) onto it when the two differ (a
segmentation made on another series, cropped, or oversampled), so the layer is never re-gridded and
the other segments in it keep every voxel. Different parent transforms on the volume and the
segmentation are accounted for (linear only), as they are at each call (:func:`volume_placement`;
an interactive object records it and refuses to write once it changed, see ``object_writes``).

The volume-to-segmentation matrix comes from ``vtkMRMLTransformNode.GetMatrixTransformBetweenNodes``,
not from ``CreateOrientedImageDataFromVolumeNode`` or ``ExportSegmentsToLabelmapNode``: in slicer-core
5.13 those misplace the grid when the path between the nodes has two or more linear transforms
(nested transforms came out in the wrong order; one transform on each node was dropped).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.errors import ImageError, SegAssistError, SessionError
from SegAssistLib.prompts import set_voxel_bounds
from SegAssistLib.slicer.scene import read_node_file, write_node_file

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"
_Logic = slicer.vtkSlicerSegmentationsModuleLogic


def create_segmentation(
    scene: slicer.vtkMRMLScene,
    reference_volume_node: slicer.vtkMRMLScalarVolumeNode,
    name: str = "SegAssist",
) -> slicer.vtkMRMLSegmentationNode:
    """A segmentation node whose reference geometry (the grid segments are stored on) is the volume's."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    return node


def add_segment(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    name: str,
    color: Optional[Sequence[float]] = None,
    segment_id: str = "",
) -> str:
    """Add an empty segment and return its ID."""
    segmentation = segmentation_node.GetSegmentation()
    if color is None:
        new_id = segmentation.AddEmptySegment(segment_id, name)
    else:
        new_id = segmentation.AddEmptySegment(segment_id, name, [float(c) for c in color])
    if not new_id:
        raise SegAssistError(f"could not add segment {name!r} (is the Segmentations logic set on the scene?)")
    return new_id


def _segment(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> slicer.vtkSegment:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        ids = list(segmentation_node.GetSegmentation().GetSegmentIDs())
        raise SegAssistError(f"segmentation {segmentation_node.GetName()!r} has no segment {segment_id!r} (has {ids})")
    return segment


def segment_holds_voxels(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str) -> bool:
    """Whether the segment holds anything, wherever it lies: read from its own representation, not
    resampled onto some volume's grid (which would find a segment outside that grid empty)."""
    segment = _segment(segmentation_node, segment_id)
    labelmap = segment.GetRepresentation(BINARY_LABELMAP)
    if labelmap is not None:
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is None:
            return False
        return bool(np.any(numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue()))
    surface = segment.GetRepresentation(CLOSED_SURFACE)
    return surface is not None and surface.GetNumberOfPoints() > 0


def reference_geometry(
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
) -> slicer.vtkOrientedImageData:
    """An empty oriented image with the volume's grid, expressed in the segmentation node's frame."""
    image_data = reference_volume_node.GetImageData()
    if image_data is None:
        raise ImageError(f"volume {reference_volume_node.GetName()!r} has no image data")
    geometry = slicer.vtkOrientedImageData()
    geometry.SetExtent(image_data.GetExtent())
    geometry.SetImageToWorldMatrix(_volume_to_segmentation_ijk(reference_volume_node, segmentation_node))
    return geometry


def volume_placement(
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
) -> np.ndarray:
    """The 4x4 matrix from the volume's IJK to the segmentation node's frame: where each voxel of
    the volume lands among the segment's voxels. It changes when a parent transform of either node,
    or the volume's own placement (origin, spacing, directions), changes."""
    return _numpy_matrix(_volume_to_segmentation_ijk(reference_volume_node, segmentation_node))


def _volume_to_segmentation_ijk(
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
) -> vtk.vtkMatrix4x4:
    volume_to_segmentation = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        reference_volume_node.GetParentTransformNode(),
        segmentation_node.GetParentTransformNode(),
        volume_to_segmentation,
    ):
        raise SegAssistError(
            f"the transform between volume {reference_volume_node.GetName()!r} and segmentation "
            f"{segmentation_node.GetName()!r} is not linear: harden it first"
        )
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_volume_node.GetIJKToRASMatrix(ijk_to_ras)
    image_to_segmentation = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Multiply4x4(volume_to_segmentation, ijk_to_ras, image_to_segmentation)
    return image_to_segmentation


def _shape_kji(image: vtk.vtkImageData) -> Tuple[int, int, int]:
    ni, nj, nk = image.GetDimensions()
    return (nk, nj, ni)


def oriented_labelmap(
    voxels: np.ndarray,
    geometry: slicer.vtkOrientedImageData,
    offset: Sequence[int] = (0, 0, 0),
) -> slicer.vtkOrientedImageData:
    """A ``uint8`` oriented image holding ``voxels`` [k, j, i] at array ``offset`` of the grid."""
    voxels = np.asarray(voxels)
    if voxels.ndim != 3:
        raise ImageError(f"a labelmap needs a 3D array [k, j, i], got shape {voxels.shape}")
    e = geometry.GetExtent()
    ok, oj, oi = (int(o) for o in offset)
    nk, nj, ni = voxels.shape
    image = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    image.SetExtent(e[0] + oi, e[0] + oi + ni - 1, e[2] + oj, e[2] + oj + nj - 1, e[4] + ok, e[4] + ok + nk - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (voxels > 0).astype(np.uint8).ravel()
    return image


def _ensure_binary_labelmap_source(segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
    """Voxels are written into labelmaps: a segmentation kept as another representation (surfaces of
    imported models) is converted only while it holds no segment, as converting would replace every
    segment's own surface by one regenerated from voxels. Slicer's Segment Editor asks first; this asks
    the caller to convert it deliberately."""
    segmentation = segmentation_node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    if source == BINARY_LABELMAP:
        return
    if segmentation.GetNumberOfSegments():
        raise SegAssistError(
            f"segmentation {segmentation_node.GetName()!r} keeps its segments as {source.lower()}s: writing "
            "voxels would replace each segment's own surface by one regenerated from a labelmap. Make "
            "'Binary labelmap' its source representation first (Segmentations module) or choose another "
            "segmentation"
        )
    if not segmentation.CreateRepresentation(BINARY_LABELMAP):
        raise SegAssistError(f"segmentation {segmentation_node.GetName()!r} cannot be converted to a binary labelmap")
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)


def segment_to_array(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    box: Optional[Tuple[Sequence[int], Sequence[int]]] = None,
) -> np.ndarray:
    """The segment as a 0/1 ``uint8`` mask ``[k, j, i]`` on the reference volume's grid; with ``box``
    (array offset and shape, ``[k, j, i]``, inside the grid) that box of it only (resampled alone)."""
    geometry = reference_geometry(reference_volume_node, segmentation_node)
    if box is not None:
        offset, size = box
        _check_box(MaskUpdate(tuple(offset), np.empty(tuple(size), np.uint8)), _shape_kji(geometry))
        e = geometry.GetExtent()
        (ok, oj, oi), (nk, nj, ni) = (int(o) for o in offset), (int(n) for n in size)
        geometry.SetExtent(e[0] + oi, e[0] + oi + ni - 1, e[2] + oj, e[2] + oj + nj - 1, e[4] + ok, e[4] + ok + nk - 1)
    return segment_on_grid(segmentation_node, segment_id, geometry)


def segment_on_grid(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    geometry: slicer.vtkOrientedImageData,
) -> np.ndarray:
    """The segment resampled (nearest neighbour) onto ``geometry`` (its extent), as a 0/1 mask.

    The segment's labelmap is read with a margin of one empty voxel: VTK's resampling takes a point
    up to half a voxel outside an image as on its edge, so a voxel of ``geometry`` exactly on the
    outer boundary of a cropped labelmap (a tie: a 2x oversampled geometry puts its boundaries on
    the volume's voxel centres) would read as inside on every face, a whole extra layer of voxels;
    inside the margin such ties go one way, as everywhere else in the labelmap."""
    segment = _segment(segmentation_node, segment_id)
    shape = _shape_kji(geometry)
    segmentation_node.GetSegmentation().CreateRepresentation(BINARY_LABELMAP)
    labelmap = slicer.vtkOrientedImageData()
    if not _Logic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, labelmap, False):
        raise SegAssistError(f"segment {segment_id!r} has no binary labelmap representation")
    if labelmap.IsEmpty() or labelmap.GetPointData().GetScalars() is None:
        return np.zeros(shape, np.uint8)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        _padded(labelmap), geometry, resampled
    ):
        raise SegAssistError(f"could not resample segment {segment_id!r} onto the reference grid")
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape)
    # A layer shared by several segments holds each one as its own label value.
    return (values == segment.GetLabelValue()).astype(np.uint8)


def _padded(labelmap: slicer.vtkOrientedImageData) -> slicer.vtkOrientedImageData:
    """``labelmap`` (any scalar type) with one voxel of 0 around it, on its grid."""
    e = labelmap.GetExtent()
    pad = vtk.vtkImageConstantPad()
    pad.SetInputData(labelmap)
    pad.SetConstant(0)
    pad.SetOutputWholeExtent(e[0] - 1, e[1] + 1, e[2] - 1, e[3] + 1, e[4] - 1, e[5] + 1)
    pad.Update()
    padded = slicer.vtkOrientedImageData()
    padded.ShallowCopy(pad.GetOutput())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    padded.SetImageToWorldMatrix(matrix)
    return padded


def segmentation_geometry(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
) -> slicer.vtkOrientedImageData:
    """The grid the segmentation keeps its segments on (in its own frame), which Slicer's effects
    write on, taken as Slicer's editor takes it (``vtkSlicerSegmentEditorLogic.
    GetReferenceImageGeometryStringFromSegmentation``): its reference image geometry, widened to
    contain every segment it holds (an imported segment, or a geometry cropped since, may reach
    beyond it). A segmentation that names none (one converted from a labelmap) keeps the grid of the
    segments it holds, over their extent and the volume's; one holding nothing takes the volume's
    grid."""
    segmentation = segmentation_node.GetSegmentation()
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    serialized = segmentation.GetConversionParameter(parameter)
    from_segments = not serialized
    if hasattr(slicer, "vtkSlicerSegmentEditorLogic"):  # before Slicer 5.10: the parameter as it is
        serialized = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(segmentation)
    if not serialized:
        return reference_geometry(reference_volume_node, segmentation_node)
    geometry = slicer.vtkOrientedImageData()
    if not slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialized, geometry, False):
        raise SegAssistError(
            f"segmentation {segmentation_node.GetName()!r} has an unreadable reference geometry {serialized!r}"
        )
    if from_segments:  # their grid, not their extent (cut to what they hold): it also spans the volume
        spans = _target_box(reference_geometry(reference_volume_node, segmentation_node), geometry, clip=False)
        e, v = geometry.GetExtent(), spans.GetExtent()
        geometry.SetExtent(*(min(e[n], v[n]) if n % 2 == 0 else max(e[n], v[n]) for n in range(6)))
    return geometry


def _crop_to_box(grid: slicer.vtkOrientedImageData, offset: Sequence[int], shape: Sequence[int]) -> None:
    e = grid.GetExtent()
    (ok, oj, oi), (nk, nj, ni) = (int(o) for o in offset), (int(n) for n in shape)
    grid.SetExtent(e[0] + oi, e[0] + oi + ni - 1, e[2] + oj, e[2] + oj + nj - 1, e[4] + ok, e[4] + ok + nk - 1)


def _target_box(
    source: slicer.vtkOrientedImageData, target: slicer.vtkOrientedImageData, clip: bool = True
) -> Optional[slicer.vtkOrientedImageData]:
    """``target``'s grid cut to the voxels that ``source``'s extent covers; None where they do not
    meet (without ``clip``: ``target``'s grid over the voxels ``source`` covers, inside its extent or not)."""
    se, te = source.GetExtent(), target.GetExtent()
    corners = np.array(
        [
            [i, j, k, 1.0]
            for i in (se[0] - 0.5, se[1] + 0.5)
            for j in (se[2] - 0.5, se[3] + 0.5)
            for k in (se[4] - 0.5, se[5] + 0.5)
        ]
    )
    ijk = (_to_target_ijk(source, target) @ corners.T)[:3]
    lo, hi = np.floor(ijk.min(axis=1)).astype(int), np.ceil(ijk.max(axis=1)).astype(int)
    if clip:
        lo, hi = np.maximum(lo, [te[0], te[2], te[4]]), np.minimum(hi, [te[1], te[3], te[5]])
    if np.any(hi < lo):
        return None
    box = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    target.GetImageToWorldMatrix(matrix)
    box.SetImageToWorldMatrix(matrix)
    box.SetExtent(int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))
    return box


def _numpy_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _resample_mask(labelmap: slicer.vtkOrientedImageData, grid: slicer.vtkOrientedImageData) -> np.ndarray:
    """``labelmap`` resampled (nearest neighbour, 0 outside it) onto ``grid``'s extent, as booleans."""
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, grid, resampled):
        raise SegAssistError("could not resample the answer onto the segmentation's geometry")
    return numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(_shape_kji(grid)) > 0


def _to_target_ijk(source: slicer.vtkOrientedImageData, target: slicer.vtkOrientedImageData) -> np.ndarray:
    """The 4x4 matrix taking ``source``'s IJK to ``target``'s (continuous) IJK."""
    source_to_world, world_to_target = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    source.GetImageToWorldMatrix(source_to_world)
    target.GetWorldToImageMatrix(world_to_target)
    return _numpy_matrix(world_to_target) @ _numpy_matrix(source_to_world)


def _count_outside(
    inside: np.ndarray,
    offset: Sequence[int],
    volume_grid: slicer.vtkOrientedImageData,
    target: slicer.vtkOrientedImageData,
) -> int:
    """How many voxels of ``inside`` (a box at ``offset`` of the volume's grid) lie outside
    ``target``'s extent: farther than half a voxel from it, or exactly half a voxel (a tie, which
    the resampling may hand to the voxel outside)."""
    bounds = set_voxel_bounds(inside.shape, lambda rows: inside[rows])
    if bounds is None:
        return 0
    e, t = volume_grid.GetExtent(), target.GetExtent()
    to_target = _to_target_ijk(volume_grid, target)
    lo = np.array([t[0], t[2], t[4]], float)[:, None] - 0.5 + 1e-6
    hi = np.array([t[1], t[3], t[5]], float)[:, None] + 0.5 - 1e-6

    def outside(points_ijk: np.ndarray) -> np.ndarray:
        mapped = (to_target @ np.vstack([points_ijk, np.ones(points_ijk.shape[1])]))[:3]
        return np.any((mapped < lo) | (mapped > hi), axis=0)

    base = np.array([[e[0] + offset[2]], [e[2] + offset[1]], [e[4] + offset[0]]], float)
    (k0, j0, i0), (k1, j1, i1) = bounds[0], bounds[1] - 1
    corners = np.array([[a, b, c] for a in (i0, i1) for b in (j0, j1) for c in (k0, k1)], float).T
    if not outside(corners + base).any():  # the extent is convex: the box of the voxels lies inside
        return 0
    k, j, i = np.nonzero(inside)  # some lie outside: count them (rare, and the write is refused)
    return int(np.count_nonzero(outside(np.stack([i, j, k]).astype(float) + base)))


class _Placed(NamedTuple):
    """An update placed on the segmentation's geometry: ``grid`` is that geometry cut to the
    update's box (None if they do not meet), ``inside`` the answer on it, ``touched`` the voxels of
    it whose nearest volume voxel lies in the box (and, with ``changed``, is one of those);
    ``resampled`` is False when the segmentation's geometry holds the box voxel for voxel
    (:func:`_same_grid`)."""

    inside: np.ndarray
    touched: Optional[np.ndarray]
    grid: Optional[slicer.vtkOrientedImageData]
    resampled: bool


def _grids(
    segmentation_node: slicer.vtkMRMLSegmentationNode, reference_volume_node: slicer.vtkMRMLVolumeNode
) -> Tuple[slicer.vtkOrientedImageData, slicer.vtkOrientedImageData]:
    """(the volume's grid in the segmentation's frame, the segmentation's geometry)."""
    return (
        reference_geometry(reference_volume_node, segmentation_node),
        segmentation_geometry(segmentation_node, reference_volume_node),
    )


def _same_grid(grid: slicer.vtkOrientedImageData, target: slicer.vtkOrientedImageData) -> bool:
    """Whether ``target`` has ``grid``'s voxels (origin, spacing, directions) and its extent covers
    ``grid``'s: then every voxel of ``grid`` is one of ``target``, written as it is. Not
    ``DoGeometriesMatch`` alone, which ignores extents: a geometry on the volume's lattice but cut
    smaller (Slicer's *Specify geometry* from a segmentation crops to what its segments hold) does
    not reach every voxel of the volume."""
    if not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(grid, target):
        return False
    g, t = grid.GetExtent(), target.GetExtent()
    return all(t[2 * n] <= g[2 * n] and g[2 * n + 1] <= t[2 * n + 1] for n in range(3))


def on_volume_grid(
    segmentation_node: slicer.vtkMRMLSegmentationNode, reference_volume_node: slicer.vtkMRMLVolumeNode
) -> bool:
    """Whether the segmentation keeps its segments on the volume's voxels, all of them (its geometry
    is the volume's grid, extent included: :func:`_same_grid`); otherwise an answer on the volume is
    resampled onto its geometry when written, and refused where it reaches beyond it (or is too thin
    to land)."""
    volume_grid, target = _grids(segmentation_node, reference_volume_node)
    return _same_grid(volume_grid, target)


def _on_segmentation_grid(
    update: MaskUpdate,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    grids: Tuple[slicer.vtkOrientedImageData, slicer.vtkOrientedImageData],
    changed: Optional[np.ndarray] = None,
    need_touched: bool = True,
) -> _Placed:
    """An update on the volume's grid placed on the segmentation's geometry (see :class:`_Placed`;
    without ``need_touched`` its ``touched`` is not computed, and is None).

    Raises when the update holds voxels the segmentation's geometry does not reach, or voxels of
    which none lands on it (an answer thinner than a coarser geometry's voxels): they could not be
    written, and a silently clipped or vanished answer is a wrong segment. ``grids``: :func:`_grids`.
    """
    volume_grid, target = grids
    _check_box(update, _shape_kji(volume_grid))
    inside = np.asarray(update.voxels) > 0
    decides = np.ones_like(inside) if changed is None else np.asarray(changed) > 0
    box = slicer.vtkOrientedImageData()  # a geometry only: no voxels to copy
    box.DeepCopy(volume_grid)
    _crop_to_box(box, update.offset, inside.shape)
    if _same_grid(box, target):  # the segmentation holds the box voxel for voxel
        return _Placed(inside, decides, box, resampled=False)
    outside = _count_outside(inside, update.offset, volume_grid, target)
    if outside:
        raise ImageError(
            f"{outside} voxels of the answer lie outside the geometry of segmentation "
            f"{segmentation_node.GetName()!r}, so they cannot be written: set its geometry to volume "
            f"{reference_volume_node.GetName()!r} (Segment Editor, 'Specify geometry') or segment into "
            "another segmentation"
        )
    grid = _target_box(oriented_labelmap(inside, volume_grid, update.offset), target)
    if grid is None:
        return _Placed(inside, decides, None, resampled=True)
    # A margin of empty voxels around the box: VTK's resampling takes a point up to half a voxel
    # outside an image as on its edge, which would hand ties just past the box to the box.
    margin = tuple(int(o) - 1 for o in update.offset)
    landed = _resample_mask(oriented_labelmap(np.pad(inside, 1), volume_grid, margin), grid)
    if inside.any() and not landed.any():
        raise ImageError(
            f"the answer ({int(inside.sum())} voxels) is thinner than the voxels of segmentation "
            f"{segmentation_node.GetName()!r}'s geometry, so none of it would be written: set its geometry to "
            f"volume {reference_volume_node.GetName()!r} (Segment Editor, 'Specify geometry') or segment into "
            "another segmentation"
        )
    touched = None
    if need_touched:
        touched = _resample_mask(oriented_labelmap(np.pad(decides, 1), volume_grid, margin), grid)
    return _Placed(landed, touched, grid, resampled=True)


def array_to_segment(
    mask: np.ndarray,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segment_id: str,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
) -> None:
    """Replace the whole segment by ``mask`` (nonzero = inside), ``[k, j, i]`` on the volume's grid.

    Written on the segmentation's geometry (resampled when that is not the volume's grid). Other
    segments are left as they are (a shared layer is split if they would overlap). No undo: use
    :class:`SegmentEditor` for that.
    """
    _segment(segmentation_node, segment_id)
    grids = _grids(segmentation_node, reference_volume_node)
    volume_grid, target = grids
    shape = _shape_kji(volume_grid)
    if np.shape(mask) != shape:
        raise ImageError(f"mask shape {np.shape(mask)} differs from the reference volume's {shape} [k, j, i]")
    _ensure_binary_labelmap_source(segmentation_node)
    mask = np.asarray(mask)
    update = MaskUpdate((0, 0, 0), mask)
    if not _same_grid(volume_grid, target):
        # resampled: only the box holding the mask (the rest of the segment is replaced by nothing)
        bounds = set_voxel_bounds(shape, lambda rows: mask[rows] != 0)
        lo, hi = (np.zeros(3, int), np.ones(3, int)) if bounds is None else bounds
        update = MaskUpdate(tuple(int(v) for v in lo), mask[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))])
    placed = _on_segmentation_grid(update, segmentation_node, reference_volume_node, grids, need_touched=False)
    labelmap = _nothing_to_write(target) if placed.grid is None else oriented_labelmap(placed.inside, placed.grid)
    if not _Logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, _Logic.MODE_REPLACE):
        raise SegAssistError(f"could not write segment {segment_id!r}")


def _check_box(update: MaskUpdate, shape: Tuple[int, int, int]) -> None:
    lo = np.asarray(update.offset, int)
    hi = lo + np.asarray(update.voxels.shape, int)
    if update.voxels.ndim != 3 or np.any(lo < 0) or np.any(hi > np.asarray(shape)):
        raise ImageError(
            f"mask update box {lo.tolist()}..{hi.tolist()} [k, j, i] does not fit in the volume {list(shape)}"
        )


def update_labelmaps(
    update: MaskUpdate,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    reference_volume_node: slicer.vtkMRMLVolumeNode,
    segment_id: Optional[str] = None,
) -> Tuple[slicer.vtkOrientedImageData, slicer.vtkOrientedImageData, Tuple[int, ...]]:
    """A :class:`MaskUpdate` as segment editor input: (voxels to add, voxels to remove, extent).

    Both labelmaps lie on the segmentation's geometry (Slicer's editor masks and writes on that
    grid) and cover the update's box there; the extent limits the write to it. This is what
    ``scriptedEffect.modifySelectedSegmentByLabelmap(labelmap, mode, extent)`` takes in Slicer.
    With ``segment_id``, only the voxels where the update differs from that segment (read on the
    volume's grid) are added or removed: a segment kept on a finer grid than the volume keeps its
    detail wherever the answer leaves it as it is.
    """
    changed = None
    if segment_id is not None:
        was_on_volume = segment_to_array(
            segmentation_node, segment_id, reference_volume_node, (update.offset, update.voxels.shape)
        )
        changed = (np.asarray(update.voxels) > 0) != (was_on_volume > 0)
    grids = _grids(segmentation_node, reference_volume_node)
    placed = _on_segmentation_grid(update, segmentation_node, reference_volume_node, grids, changed)
    if placed.grid is None:  # an empty answer wholly outside the segmentation's geometry
        empty = _nothing_to_write(grids[1])
        return empty, empty, tuple(empty.GetExtent())
    inside, touched = placed.inside, placed.touched
    if segment_id is None:
        to_add, to_remove = inside & touched, ~inside & touched
    else:
        # on the volume's own grid the segment is already read; on another grid, read it there
        was = segment_on_grid(segmentation_node, segment_id, placed.grid) if placed.resampled else was_on_volume
        was = was > 0
        to_add, to_remove = inside & touched & ~was, ~inside & touched & was
    add = oriented_labelmap(to_add, placed.grid)
    remove = oriented_labelmap(to_remove, placed.grid)
    return add, remove, tuple(add.GetExtent())


def _nothing_to_write(geometry: slicer.vtkOrientedImageData) -> slicer.vtkOrientedImageData:
    """One empty voxel of the segmentation's geometry: a write that changes nothing."""
    return oriented_labelmap(np.zeros((1, 1, 1), np.uint8), geometry)


class SegmentEditor:
    """Region writes through Slicer's C++ segment editor logic, with its undo and redo.

    The logic honours its editor node's settings: by default editing is allowed everywhere and
    other segments are never overwritten (``overwrite_other_segments=True`` lets a write take
    voxels from them, like painting in Slicer's Segment Editor).
    """

    def __init__(
        self,
        segmentation_node: slicer.vtkMRMLSegmentationNode,
        source_volume_node: slicer.vtkMRMLScalarVolumeNode,
        overwrite_other_segments: bool = False,
        max_undo_states: int = 10,
    ) -> None:
        if not hasattr(slicer, "vtkSlicerSegmentEditorLogic"):
            raise SegAssistError("region writes with undo need Slicer 5.10 or later (vtkSlicerSegmentEditorLogic)")
        scene = segmentation_node.GetScene()
        if scene is None:
            raise SegAssistError("the segmentation node is not in a scene")
        self.segmentation_node = segmentation_node
        self.source_volume_node = source_volume_node
        self.editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "SegAssist editor")
        self.editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedEverywhere)
        self.editor_node.SetOverwriteMode(
            slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments
            if overwrite_other_segments
            else slicer.vtkMRMLSegmentEditorNode.OverwriteNone
        )
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetVerbose(True)
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.editor_node)
        self.logic.SetSegmentationNode(segmentation_node)
        self.logic.SetSourceVolumeNode(source_volume_node)
        self.logic.SetMaximumNumberOfUndoStates(int(max_undo_states))

    def write(self, segment_id: str, update: MaskUpdate, save_undo: bool = True) -> None:
        """Set the segment to ``update.voxels`` inside the update's box; nothing outside it changes."""
        _segment(self.segmentation_node, segment_id)
        if update.voxels.size == 0:
            return
        _ensure_binary_labelmap_source(self.segmentation_node)
        add, remove, extent = update_labelmaps(update, self.segmentation_node, self.source_volume_node, segment_id)
        if save_undo and not self.logic.SaveStateForUndo():
            raise SessionError("the segment editor could not save the state for undo")
        for labelmap, mode in (
            (add, self.logic.ModificationModeAdd),
            (remove, self.logic.ModificationModeRemove),
        ):
            self.logic.ModifySegmentByLabelmap(self.segmentation_node, segment_id, labelmap, mode, extent, False, False)

    def write_mask(self, segment_id: str, mask: np.ndarray, save_undo: bool = True) -> None:
        """Set the whole segment to ``mask`` ([k, j, i] on the volume's grid), undoably."""
        mask = np.asarray(mask)
        self.write(segment_id, MaskUpdate(offset=(0, 0, 0), voxels=(mask > 0).astype(np.uint8)), save_undo)

    @property
    def can_undo(self) -> bool:
        return bool(self.logic.CanUndo())

    @property
    def can_redo(self) -> bool:
        return bool(self.logic.CanRedo())

    def undo(self) -> None:
        if not self.can_undo:
            raise SessionError("nothing to undo")
        self.logic.Undo()

    def redo(self) -> None:
        if not self.can_redo:
            raise SessionError("nothing to redo")
        self.logic.Redo()

    def close(self) -> None:
        """Forget the undo history and remove the editor node from the scene."""
        self.logic.ClearUndoState()
        self.logic.SetSegmentEditorNode(None)
        scene = self.editor_node.GetScene()
        if scene is not None:
            scene.RemoveNode(self.editor_node)


def save_editor_undo_state(segmentation_node: slicer.vtkMRMLSegmentationNode, modules: object = None) -> bool:
    """Before a write the Segment Editor does not make itself (a batch result): if the editor is
    editing ``segmentation_node``, save its state for undo. Its undo restores whole segmentations,
    so otherwise the user's next Ctrl+Z there would also delete the batch result (and with it the
    redo of their own stroke). ``modules``: ``slicer.modules`` (where the Segment Editor module, once
    its panel was built, keeps ``SegmentEditorWidget``); anything missing means no editor to tell.
    True when a state was saved."""
    if modules is None:
        modules = getattr(slicer, "modules", None)
    editor = getattr(getattr(modules, "SegmentEditorWidget", None), "editor", None)
    if editor is None or segmentation_node is None:
        return False
    try:
        edited = editor.segmentationNode()
        if edited is None or edited.GetID() != segmentation_node.GetID():
            return False
        editor.saveStateForUndo()
    except (AttributeError, TypeError, RuntimeError):  # another Slicer's editor API: the write still happens
        return False
    return True


def save_segmentation(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    path: Union[str, Path],
    compress: bool = True,
) -> Path:
    """Write ``.seg.nrrd`` through the node's segmentation storage node (created when missing).

    The file holds the segmentation in its own frame: a parent transform is not saved in it.
    """
    return write_node_file(segmentation_node, path, slicer.vtkMRMLSegmentationStorageNode, compress, "segmentation")


def load_segmentation(
    scene: slicer.vtkMRMLScene,
    path: Union[str, Path],
    name: Optional[str] = None,
) -> slicer.vtkMRMLSegmentationNode:
    """Read a ``.seg.nrrd`` (or any file the segmentation storage node reads) into a new node."""
    path = Path(path)
    if not path.is_file():
        raise SegAssistError(f"segmentation file not found: {path}")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    return read_node_file(scene, path, "vtkMRMLSegmentationNode", storage, name, "a segmentation")
