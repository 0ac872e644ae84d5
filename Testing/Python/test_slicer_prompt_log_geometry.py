"""In Slicer, a prompt log replays only on the volume node it was recorded for: shape and spacing, and
(schema 1.3) origin and direction, so that a flipped or moved copy of the same scan (same shape, same
spacing) is refused rather than prompted at the wrong anatomy, and the same scan stored in another
voxel order (Slicer's copy of a left-handed file) gets the prompts moved onto the same anatomy. Real
MRML scenes (slicer-core), the image a real NIfTI written by SimpleITK and read by Slicer's own
storage node, the log written as ``segassist segment --log`` writes it (the image's ITK geometry, LPS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from mrml_fixtures import add_linear_transform, add_volume, affine, local_ijk_to_ras, rotation

from SegAssistLib.errors import PromptError
from SegAssistLib.image import Volume
from SegAssistLib.io import load_volume, volume_to_sitk
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import BoxPrompt, PointPrompt

slicer = pytest.importorskip("slicer")

from SegAssistLib.slicer import volumes  # noqa: E402
from SegAssistLib.slicer.logic import load_prompt_file  # noqa: E402
from SegAssistLib.slicer.scene import create_headless_scene  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
PROMPTS = [PointPrompt(position=(16.0, 27.0, 15.0)), BoxPrompt(min_corner=(9, 20, 13), max_corner=(27, 41, 13))]
SPACING = (0.8, 1.1, 2.5)
ORIGIN = (-31.5, 12.25, 48.0)  # mm, LPS
#: An oblique grid whose i and j axes are swapped and one of them reversed: nothing like the identity.
DIRECTION = rotation((1.0, 2.0, 0.5), 23.0) @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def ctx():
    with create_headless_scene() as context:
        yield context


@pytest.fixture
def scan(tmp_path) -> Path:
    """The sample's voxels written by SimpleITK with an oblique direction, a non-zero origin and
    anisotropic spacing."""
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(volume_to_sitk(Volume(load_volume(SAMPLE).array, SPACING, ORIGIN, DIRECTION)), str(path))
    return path


def _log(image: ImageInfo, path: Path) -> Path:
    """A prompt log as ``segassist segment --log`` and ``segassist demo`` write it."""
    PromptLog(prompts=PROMPTS).model_copy(update={"image": image}).save(path)
    return path


def _placed(ctx, node, ijk_to_ras: np.ndarray, name: str):
    """A node with ``node``'s voxels (same shape, same spacing) on the IJK-to-RAS matrix given."""
    return add_volume(ctx.scene, slicer.util.arrayFromVolume(node).copy(), ijk_to_ras, name)


def test_the_log_loads_on_the_node_read_from_its_image_file(ctx, scan, tmp_path):
    recorded = load_volume(scan)
    log = _log(ImageInfo.from_volume(recorded), tmp_path / "log.json")
    image = PromptLog.load(log).image
    assert image.origin is not None and image.direction is not None
    assert np.allclose(image.origin, ORIGIN, atol=1e-4) and np.allclose(image.direction, DIRECTION, atol=1e-4)

    node = volumes.load_volume_file(ctx.scene, scan, name="scan")
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(recorded.direction) * recorded.spacing
    lps[:3, 3] = recorded.origin
    assert np.allclose(local_ijk_to_ras(node), volumes.RAS_TO_LPS @ lps, atol=1e-5)  # Slicer's reading of the file
    assert load_prompt_file(log, node) == PROMPTS

    # within the tolerances: the same placement through float32 storage (another file format, say)
    nearly = _placed(ctx, node, local_ijk_to_ras(node).astype(np.float32).astype(float), "float32")
    assert load_prompt_file(log, nearly) == PROMPTS
    # the node's own grid is what its voxel indices address: a parent transform (a registration)
    # places the image elsewhere in the world, the voxel a prompt names stays the same voxel
    registered = add_linear_transform(ctx.scene, affine(rotation((0.0, 0.0, 1.0), 30.0), (5.0, -7.0, 20.0)))
    node.SetAndObserveTransformNodeID(registered.GetID())
    assert not np.allclose(volumes.ijk_to_ras_matrix(node, world=True), local_ijk_to_ras(node))
    assert load_prompt_file(log, node) == PROMPTS


def test_the_log_is_refused_on_a_node_flipped_along_one_axis(ctx, scan, tmp_path):
    log = _log(ImageInfo.from_volume(load_volume(scan)), tmp_path / "log.json")
    node = volumes.load_volume_file(ctx.scene, scan, name="scan")
    flip_j = local_ijk_to_ras(node) @ np.diag([1.0, -1.0, 1.0, 1.0])  # same origin, j reversed
    flipped = _placed(ctx, node, flip_j, "flipped")
    assert flipped.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert np.allclose(flipped.GetSpacing(), node.GetSpacing())
    with pytest.raises(PromptError, match=r"placed otherwise in space: volume 'flipped' has direction .* would land"):
        load_prompt_file(log, flipped)

    # the same scan stored the other way along j (every voxel in the same place in space, as another
    # converter may write it), read from its file: the log's voxel indices name other voxels there,
    # so the prompts are moved to them (and land on the same anatomy)
    original = load_volume(scan)
    last = original.shape_ijk[1] - 1
    direction = original.direction.copy()
    direction[:, 1] *= -1
    other_way = Volume(original.array[:, ::-1, :].copy(), original.spacing, original.ijk_to_physical((0, last, 0)),
                       direction)  # fmt: skip
    sitk.WriteImage(volume_to_sitk(other_way), str(tmp_path / "other_way.nii.gz"))
    reread = volumes.load_volume_file(ctx.scene, tmp_path / "other_way.nii.gz", name="other way")
    # Slicer stores a left-handed grid (one axis flipped) with its slices in reverse order: k runs back too
    top = original.shape_ijk[2] - 1
    assert np.array_equal(slicer.util.arrayFromVolume(reread), original.array[::-1, ::-1, :])
    here = volumes.volume_from_node(reread).ijk_to_physical((3, last - 4, top - 5))
    assert np.allclose(here, original.ijk_to_physical((3, 4, 5)), atol=1e-3)
    point, box = load_prompt_file(log, reread)
    assert point.position == (16.0, last - 27.0, top - 15.0)
    assert np.allclose(volumes.volume_from_node(reread).ijk_to_physical(point.position),
                       original.ijk_to_physical(PROMPTS[0].position), atol=1e-3)  # fmt: skip
    assert box.min_corner == (9.0, last - 41.0, top - 13.0) and box.max_corner == (27.0, last - 20.0, top - 13.0)


def test_the_log_is_refused_on_a_node_moved_by_20_mm(ctx, scan, tmp_path):
    log = _log(ImageInfo.from_volume(load_volume(scan)), tmp_path / "log.json")
    node = volumes.load_volume_file(ctx.scene, scan, name="scan")
    shifted = local_ijk_to_ras(node)
    shifted[:3, 3] += (0.0, 0.0, 20.0)
    moved = _placed(ctx, node, shifted, "moved")
    with pytest.raises(PromptError, match=r"placed otherwise in space: volume 'moved' has origin .* instead of"):
        load_prompt_file(log, moved)


def test_a_log_without_origin_and_direction_still_loads_where_shape_and_spacing_match(ctx, scan, tmp_path):
    recorded = load_volume(scan)
    old = tmp_path / "old.json"
    PromptLog(schema_version="1.2", image=ImageInfo(shape_ijk=recorded.shape_ijk, spacing=recorded.spacing),
              prompts=PROMPTS).save(old)  # fmt: skip
    node = volumes.load_volume_file(ctx.scene, scan, name="scan")
    shifted = local_ijk_to_ras(node) @ np.diag([1.0, -1.0, 1.0, 1.0])
    shifted[:3, 3] += (0.0, 0.0, 20.0)
    elsewhere = _placed(ctx, node, shifted, "elsewhere")
    assert load_prompt_file(old, node) == PROMPTS
    assert load_prompt_file(old, elsewhere) == PROMPTS  # the log says nothing about placement
    # shape and spacing are still checked
    thicker = local_ijk_to_ras(node) @ np.diag([1.0, 1.0, 2.0, 1.0])
    with pytest.raises(PromptError, match=r"recorded on an image of \[35, 51, 35\] voxels"):
        load_prompt_file(old, _placed(ctx, node, thicker, "thicker"))


def test_a_log_recorded_on_a_left_handed_file_replays_on_the_same_voxels_of_slicers_node(ctx, shared_data, tmp_path):
    """The dataset's NIfTI of the DICOM series has a left-handed grid: Slicer reads it with its slices
    in reverse order (and k's direction reversed), so voxel (i, j, k) of the file as SimpleITK reads it
    (what ``segassist segment --log`` records) is voxel (i, j, last - k) of the node; same shape, same
    spacing. Replayed as recorded, every prompt would land on the mirrored slice: it is moved."""
    path = shared_data / "totalsegmentator_examples" / "dicom_ct_seg.nii.gz"
    if not path.is_file():
        pytest.skip(f"no {path.name} at {path.parent}")
    recorded = load_volume(path)
    assert np.linalg.det(recorded.direction) < 0
    log = _log(ImageInfo.from_volume(recorded), tmp_path / "log.json")
    node = volumes.load_volume_file(ctx.scene, path, name="dicom_ct_seg", labelmap=True)
    assert np.array_equal(slicer.util.arrayFromVolume(node), recorded.array[::-1])
    assert node.GetImageData().GetDimensions() == recorded.shape_ijk
    assert np.allclose(node.GetSpacing(), recorded.spacing)
    point, box = load_prompt_file(log, node)
    last = recorded.shape_ijk[2] - 1
    assert point.position == (16.0, 27.0, last - 15.0) and box.min_corner == (9.0, 20.0, last - 13.0)
    (i, j, k), (ni, nj, nk) = np.rint(PROMPTS[0].position).astype(int), np.rint(point.position).astype(int)
    assert slicer.util.arrayFromVolume(node)[nk, nj, ni] == recorded.array[k, j, i]  # the voxel the log named
    assert np.allclose(volumes.volume_from_node(node).ijk_to_physical(point.position),
                       recorded.ijk_to_physical(PROMPTS[0].position), atol=1e-3)  # fmt: skip
