"""Volume nodes <-> SegAssist volumes on real MRML scenes (slicer-core): geometry, transforms, files."""

from __future__ import annotations

import numpy as np
import pytest
from mrml_fixtures import (
    add_linear_transform,
    add_nested_oblique_volume,
    add_volume,
    affine,
    local_ijk_to_ras,
    oblique_ijk_to_ras,
    random_volume,
    rotation,
    world_image_geometry,
)

from SegAssistLib.errors import ImageError, SegAssistError
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.io import load_volume, volume_to_sitk

slicer = pytest.importorskip("slicer")
from SegAssistLib.slicer import volumes  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


def _transformed_oblique_volume(ctx):
    array = random_volume((9, 11, 13))
    return add_nested_oblique_volume(ctx.scene, array), array


def test_oblique_transformed_volume_round_trips_exactly(ctx):
    node, array = _transformed_oblique_volume(ctx)
    world = world_image_geometry(node)  # Slicer's own composition of the transform chain

    volume = volumes.volume_from_node(node)
    assert volume.array.dtype == np.int16 and np.array_equal(volume.array, array)
    assert volume.shape_ijk == (13, 11, 9)
    # LPS geometry: the same physical point as Slicer's world RAS with x and y negated.
    for ijk in [(0, 0, 0), (12, 10, 8), (3.5, 7.25, 1.0)]:
        ras = (world @ np.append(ijk, 1.0))[:3]
        assert np.allclose(volume.ijk_to_physical(ijk), ras * [-1, -1, 1], atol=1e-9)
    assert np.allclose(volume.spacing, (0.8, 1.1, 2.5), atol=1e-12)  # rigid transforms keep spacing

    # Back into a node with no transform: same world geometry, same voxels.
    plain = volumes.volume_to_node(volume, ctx.scene, "plain")
    assert plain.GetParentTransformNode() is None
    assert np.allclose(local_ijk_to_ras(plain), world, atol=1e-9)
    assert np.array_equal(slicer.util.arrayFromVolume(plain), array)
    assert slicer.util.arrayFromVolume(plain).dtype == np.int16

    # Back into a node under the original transform: its own matrix is the original one.
    again = volumes.volume_to_node(volume, ctx.scene, "again", parent_transform=node.GetParentTransformNode())
    assert np.allclose(local_ijk_to_ras(again), local_ijk_to_ras(node), atol=1e-9)
    assert np.allclose(world_image_geometry(again), world, atol=1e-9)
    assert np.array_equal(slicer.util.arrayFromVolume(again), array)


def test_rigid_transforms_give_the_composed_geometry_exactly(ctx):
    node, _ = _transformed_oblique_volume(ctx)  # rotations and shifts only
    volume = volumes.volume_from_node(node)
    spacing, origin, direction = volumes.geometry_from_ijk_to_ras(volumes.ijk_to_ras_matrix(node))
    assert volume.spacing == spacing and volume.origin == origin
    assert np.array_equal(volume.direction, direction)  # not re-orthonormalised: bit for bit
    validate_image(volume)


#: An affine registration's result: a little shear and anisotropic scale.
SHEARED = np.array([[1.04, 0.03, 0.0], [0.0, 0.97, 0.02], [0.01, 0.0, 1.01]])


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_sheared_or_scaled_transform_gives_a_volume_that_can_be_segmented(ctx, mirrored):
    linear = SHEARED @ np.diag([1.0, 1.0, -1.0]) if mirrored else SHEARED
    registration = add_linear_transform(ctx.scene, affine(linear, (3, -2, 1)), "affine registration")
    array = random_volume((20, 24, 28))
    node = add_volume(ctx.scene, array, oblique_ijk_to_ras(), "followup", parent=registration)
    world = world_image_geometry(node)  # Slicer's own composition: a skewed grid
    volume = volumes.volume_from_node(node)

    validate_image(volume)  # refused before ("image direction must be a rotation")
    assert np.array_equal(volume.array, array)
    lps = np.diag([-1.0, -1.0, 1.0]) @ world[:3, :3]
    assert np.allclose(volume.spacing, np.linalg.norm(lps, axis=0), rtol=0, atol=1e-12)  # world voxel steps
    assert np.allclose(volume.ijk_to_physical((0, 0, 0)), world[:3, 3] * [-1, -1, 1], atol=1e-12)
    d = volume.direction
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-12)
    assert np.sign(np.linalg.det(d)) == np.sign(np.linalg.det(lps))  # a mirrored grid stays mirrored
    unit = lps / np.linalg.norm(lps, axis=0)
    assert np.abs(d - unit).max() < 0.05  # the nearest rotation: off by about the shear
    assert np.abs(d - unit).max() > 1e-3  # (which is there)
    # The geometry a model sees is a box near the displayed one: a far corner within a voxel or two.
    corner = np.array([27.0, 23.0, 19.0])
    assert np.linalg.norm(volume.ijk_to_physical(corner) - (world @ np.append(corner, 1))[:3] * [-1, -1, 1]) < 3.0


def test_local_geometry_ignores_transforms_and_hardening_matches_world(ctx):
    node, array = _transformed_oblique_volume(ctx)
    local = volumes.volume_from_node(node, world=False)
    assert np.allclose(volumes.ijk_to_ras_from_volume(local), oblique_ijk_to_ras(), atol=1e-12)

    world = volumes.volume_from_node(node)
    volumes.harden_transform(node)
    assert node.GetParentTransformNode() is None
    hardened = volumes.volume_from_node(node)
    assert np.array_equal(hardened.array, array)
    assert np.allclose(hardened.origin, world.origin, atol=1e-9)
    assert np.allclose(hardened.spacing, world.spacing, atol=1e-9)
    assert np.allclose(hardened.direction, world.direction, atol=1e-9)


def test_file_written_by_simpleitk_loads_with_the_same_lps_geometry(ctx, tmp_path):
    direction = rotation((0.3, -1.0, 0.4), 17)
    volume = Volume(
        array=random_volume((7, 8, 10), seed=3),
        spacing=(0.7, 0.9, 3.0),
        origin=(-101.5, 33.25, -12.0),
        direction=direction,
    )
    import SimpleITK as sitk

    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(volume_to_sitk(volume), str(path))

    node = volumes.load_volume_file(ctx.scene, path)
    read = volumes.volume_from_node(node)
    assert np.array_equal(read.array, volume.array)
    assert np.allclose(read.spacing, volume.spacing, atol=1e-9)
    assert np.allclose(read.origin, volume.origin, atol=1e-9)
    assert np.allclose(read.direction, direction, atol=1e-9)

    # And Slicer's writer produces a file SimpleITK reads with that geometry.
    out = volumes.save_volume_file(volumes.volume_to_node(read, ctx.scene, "copy"), tmp_path / "copy.nrrd")
    back = load_volume(out)
    assert np.array_equal(back.array, volume.array)
    assert np.allclose(back.origin, volume.origin, atol=1e-6)
    assert np.allclose(back.direction, direction, atol=1e-6)


def test_nonlinear_parent_transform_is_refused_with_a_clear_error(ctx):
    node = add_volume(ctx.scene, random_volume(), oblique_ijk_to_ras())
    grid = ctx.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    import vtk
    from vtk.util import numpy_support

    field = vtk.vtkImageData()
    field.SetDimensions(3, 3, 3)
    field.SetOrigin(-50, -50, -50)
    field.SetSpacing(50, 50, 50)
    field.AllocateScalars(vtk.VTK_DOUBLE, 3)
    numpy_support.vtk_to_numpy(field.GetPointData().GetScalars())[:] = 1.0
    warp = slicer.vtkOrientedGridTransform()
    warp.SetDisplacementGridData(field)
    grid.SetAndObserveTransformFromParent(warp)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(SegAssistError, match="non-linear"):
        volumes.volume_from_node(node)
    assert volumes.volume_from_node(node, world=False).shape_ijk == (13, 11, 9)


def test_voxel_types_slicer_cannot_hold_are_narrowed_or_refused(ctx):
    small = Volume(array=np.arange(2 * 3 * 4, dtype=np.int64).reshape(2, 3, 4))
    node = volumes.volume_to_node(small, ctx.scene)
    assert slicer.util.arrayFromVolume(node).dtype == np.int32
    assert np.array_equal(slicer.util.arrayFromVolume(node), small.array)
    big = Volume(array=np.full((2, 2, 2), 2**40, dtype=np.int64))
    with pytest.raises(ImageError, match="range"):
        volumes.volume_to_node(big, ctx.scene)
    with pytest.raises(ImageError, match="3D"):
        volumes.volume_to_node(Volume(array=np.zeros((2, 2, 2, 2))), ctx.scene)
