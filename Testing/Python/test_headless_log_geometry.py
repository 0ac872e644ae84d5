"""A prompt log replays only on the image it was recorded on: shape and spacing, and (schema 1.3) origin
and direction, so that a mirror image or a moved copy of the scan (same shape, same spacing) is refused;
the same scan stored with its voxels in another order gets the prompts moved onto the same anatomy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.errors import PromptError
from SegAssistLib.headless import ReplayImage, image_of, read_prompt_file
from SegAssistLib.image import Volume
from SegAssistLib.io import load_volume, volume_to_sitk
from SegAssistLib.prompt_log import ImageInfo, PromptLog
from SegAssistLib.prompts import PointPrompt

SAMPLE = Path(__file__).resolve().parents[2] / "Resources" / "Samples" / "hippocampus_001_image.nii.gz"
CLICK = PointPrompt(position=(16.0, 27.0, 15.0))


def _flipped_along_j(volume: Volume) -> Volume:
    """The same scan on a grid whose j axis runs the other way: every voxel in the same place in space."""
    last = volume.shape_ijk[1] - 1
    direction = volume.direction.copy()
    direction[:, 1] *= -1
    return Volume(volume.array[:, ::-1, :].copy(), volume.spacing, volume.ijk_to_physical((0, last, 0)), direction)


def _log_on(volume: Volume, path: Path, info: ImageInfo = None) -> Path:
    PromptLog(image=info or ImageInfo.from_volume(volume), prompts=[CLICK]).save(path)
    return path


def test_a_log_reads_on_its_image_and_on_a_copy_stored_the_other_way_and_is_refused_elsewhere(tmp_path):
    sitk.WriteImage(volume_to_sitk(_flipped_along_j(load_volume(SAMPLE))), str(tmp_path / "flipped.nii.gz"))
    original, flipped = load_volume(SAMPLE), load_volume(tmp_path / "flipped.nii.gz")
    assert flipped.shape_ijk == original.shape_ijk and flipped.spacing == original.spacing
    assert np.allclose(flipped.ijk_to_physical((3, 4, 5)), original.ijk_to_physical((3, 51 - 1 - 4, 5)), atol=1e-4)

    log = _log_on(original, tmp_path / "log.json")
    recorded = PromptLog.load(log).image
    assert np.allclose(recorded.origin, original.origin) and np.allclose(recorded.direction, original.direction)
    assert read_prompt_file(log, image_of(load_volume(SAMPLE), "the sample")) == [CLICK]  # read again from disk
    # the same voxels in space, j stored the other way: the click moves to the voxel it named
    (moved_click,) = read_prompt_file(log, image_of(flipped, "flipped.nii.gz"))
    assert moved_click.position == (16.0, 51 - 1 - 27.0, 15.0)
    assert np.allclose(flipped.ijk_to_physical(moved_click.position), original.ijk_to_physical(CLICK.position))

    turned = Volume(original.array, original.spacing, original.origin, flipped.direction)  # same origin
    with pytest.raises(PromptError, match="has direction"):
        read_prompt_file(log, image_of(turned, "turned"))
    moved = Volume(original.array, original.spacing, np.asarray(original.origin) + (0.0, 0.0, 10.0), original.direction)
    with pytest.raises(PromptError, match="has origin"):
        read_prompt_file(log, image_of(moved, "moved"))


def test_a_log_without_origin_and_direction_still_reads_and_a_caller_without_them_checks_shape_and_spacing(tmp_path):
    original = load_volume(SAMPLE)
    flipped = _flipped_along_j(original)
    old = _log_on(original, tmp_path / "old.json", ImageInfo(shape_ijk=original.shape_ijk, spacing=original.spacing))
    assert read_prompt_file(old, image_of(flipped, "flipped")) == [CLICK]  # a 1.2 log says nothing more
    new = _log_on(original, tmp_path / "new.json")
    assert read_prompt_file(new, (flipped.shape_ijk, flipped.spacing, "flipped")) == [CLICK]  # the Slicer caller
    with pytest.raises(PromptError, match=r"recorded on an image of \[35, 51, 35\] voxels"):
        read_prompt_file(new, (original.shape_ijk, (1.0, 1.0, 2.0), "thicker"))
    # the tuple form of earlier versions is a ReplayImage: with origin and direction, the log's order counts
    placed = (flipped.shape_ijk, flipped.spacing, "flipped", flipped.origin, flipped.direction)
    image = ReplayImage.coerce(placed)
    assert (image.shape_ijk, image.spacing, image.name, image.origin, image.voxels) == (
        flipped.shape_ijk, flipped.spacing, "flipped", flipped.origin, None)  # fmt: skip
    assert np.array_equal(image.direction, flipped.direction) and image.placed
    assert read_prompt_file(new, placed)[0].position == (16.0, 51 - 1 - 27.0, 15.0)
    with pytest.raises(TypeError, match="got a sequence of 2"):
        read_prompt_file(new, (flipped.shape_ijk, flipped.spacing))


def test_a_log_recorded_on_the_datasets_nifti_of_the_dicom_series_replays_on_the_series(shared_data, tmp_path):
    """The dataset's NIfTI of the series runs j the other way: same shape, same spacing, the same voxels
    in space; the log's click is moved to the series' voxel at the same place."""
    folder = shared_data / "totalsegmentator_examples"
    if not (folder / "dicom_ct").is_dir():
        pytest.skip(f"no DICOM example at {folder}")
    dicom, nifti = load_volume(folder / "dicom_ct"), load_volume(folder / "dicom_ct_seg.nii.gz")
    assert dicom.shape_ijk == nifti.shape_ijk and np.allclose(dicom.spacing, nifti.spacing)
    on_nifti = _log_on(nifti, tmp_path / "on_nifti.json")
    (on_series,) = read_prompt_file(on_nifti, image_of(dicom, "dicom_ct"))
    assert on_series.position != CLICK.position
    assert np.allclose(dicom.ijk_to_physical(on_series.position), nifti.ijk_to_physical(CLICK.position), atol=1e-2)
    assert read_prompt_file(on_nifti, image_of(nifti, "the NIfTI")) == [CLICK]
    # the series written as NIfTI (float32 origin) is the same grid: its log replays on the series
    sitk.WriteImage(volume_to_sitk(dicom), str(tmp_path / "ct.nii.gz"))
    assert read_prompt_file(_log_on(load_volume(tmp_path / "ct.nii.gz"), tmp_path / "ct.json"),
                            image_of(dicom, "dicom_ct")) == [CLICK]  # fmt: skip
