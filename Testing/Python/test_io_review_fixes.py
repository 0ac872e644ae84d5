"""Image reading and writing refuse what they would get wrong: DICOM slices without geometry, NIfTI
headers whose two geometries disagree or that announce more than they hold, masks of another shape,
4D images whose time axis is not last; damaged files and odd names get errors that say what is wrong;
a flock that fails for another reason than a busy lock is not reported as busy."""

from __future__ import annotations

import errno
import gzip
import os
import resource
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from test_dicom_series import write_series, write_slice

from SegAssistLib import file_locks
from SegAssistLib.errors import ImageError
from SegAssistLib.file_locks import LockUnsupportedError, exclusive_lock
from SegAssistLib.files import output_problem
from SegAssistLib.image import Volume
from SegAssistLib.io import load_volume, save_mask_nifti, save_segmentation_nrrd

# --------------------------------------------------------------------------------------------- DICOM


def _strip(folder: Path, tag: str, names=None) -> Path:
    for path in sorted(folder.iterdir()):
        if names is None or path.name in names:
            ds = dcmread(path)
            delattr(ds, tag)
            ds.save_as(path)
    return folder


def test_a_gap_in_a_series_without_orientations_is_refused_as_with_them(tmp_path):
    folder = _strip(write_series(tmp_path / "gap", [(0, 0, 2.0 * k) for k in (0, 1, 2, 4, 5, 6)]),
                    "ImageOrientationPatient")
    with pytest.raises(ImageError, match=r"uneven slice spacing, steps from 2 to 4 mm"):
        load_volume(folder)


def test_two_echoes_without_orientations_are_refused_not_interleaved(tmp_path):
    folder = _strip(write_series(tmp_path / "echo", [(0, 0, 2.0 * k) for k in range(4)] * 2),
                    "ImageOrientationPatient")
    with pytest.raises(ImageError, match=r"8 slices at only 4 positions"):
        load_volume(folder)


def test_a_slice_without_a_position_is_refused_naming_it(tmp_path):
    folder = _strip(write_series(tmp_path / "b", [(0, 0, 2.0 * k) for k in range(6)]), "ImagePositionPatient",
                    {"slice002.dcm"})
    with pytest.raises(ImageError, match=r"1 of the 6 slices has no image position \(0020,0032\) \(slice002\.dcm"):
        load_volume(folder)


def test_an_image_without_geometry_filed_in_a_regular_series_is_refused_naming_it(tmp_path):
    folder = write_series(tmp_path / "e", [(0, 0, 2.0 * k) for k in range(6)])
    write_slice(folder / "zz_capture.dcm", np.full((6, 7), 5000, np.int16), (0, 0, 0), number=99)
    ds = dcmread(folder / "zz_capture.dcm")
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.save_as(folder / "zz_capture.dcm")
    with pytest.raises(ImageError, match=r"1 of the 7 slices has no image position .*zz_capture\.dcm"):
        load_volume(folder)


@pytest.mark.parametrize("step", [(0, 0, 2.0), (0, 0, -2.0), (2.0, 0, 0)])
def test_a_regular_series_without_orientations_still_loads_slice_by_slice(tmp_path, step):
    positions = [tuple(k * np.asarray(step)) for k in range(6)]
    vol = load_volume(_strip(write_series(tmp_path / "s", positions), "ImageOrientationPatient"))
    assert vol.array.shape == (6, 6, 7)
    assert np.isclose(vol.spacing[2], 2.0)
    values = vol.array[:, 0, 0]
    assert np.array_equal(np.sort(values), 10 * np.arange(6)) and np.all(np.abs(np.diff(values)) == 10)


def test_slices_without_orientations_stacked_out_of_position_order_are_refused(tmp_path):
    # no orientation and one x-position for all: the reader stacks them by instance number, not position
    folder = _strip(write_series(tmp_path / "s", [(2.0 * k, 0, 0) for k in (0, 3, 1, 2, 4, 5)]),
                    "ImageOrientationPatient")
    with pytest.raises(ImageError, match=r"would not stack them in the order of their positions"):
        load_volume(folder)


# ------------------------------------------------------------------------------------- NIfTI header


def _two_forms(path: Path, sform_code: int, shift=(5.0, -7.0, 9.0)) -> Path:
    image = nib.Nifti1Image(np.random.default_rng(0).random((10, 12, 14)).astype(np.float32), None)
    sform = np.eye(4)
    sform[:3, 3] = shift
    image.set_qform(np.eye(4), code=1)
    image.set_sform(sform, code=sform_code)
    nib.save(image, path)
    return path


@pytest.mark.parametrize("code", [1, 2, 4])
def test_a_nifti_whose_qform_and_sform_disagree_is_refused_naming_both(tmp_path, code):
    path = _two_forms(tmp_path / f"in{code}.nii.gz", code)
    with pytest.raises(ImageError, match=rf"sform \(code {code}\) has origin \[5\.0, -7\.0, 9\.0\] mm instead of "
                                         r"\[0\.0, 0\.0, 0\.0\] in the qform \(code 1.*set the wrong one's code to 0"):
        load_volume(path)


def test_a_nifti_whose_qform_and_sform_agree_loads(tmp_path):
    path = _two_forms(tmp_path / "same.nii.gz", 2, shift=(0.0, 0.0, 0.0))
    assert load_volume(path).array.shape == (14, 12, 10)


def test_a_tiny_file_announcing_a_huge_image_is_refused_before_its_voxels_are_allocated(tmp_path):
    header = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).header
    header.set_data_shape((1200, 1200, 1000))
    path = tmp_path / "tiny.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\1" * 1000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"announces 1440000000 voxels .*above the limit"):
        load_volume(path)
    assert time.monotonic() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024  # KiB: not the 1.4 GB


def test_a_truncated_nifti_under_the_limit_is_refused_before_its_voxels_are_read(tmp_path):
    header = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4)).header
    header.set_data_shape((800, 800, 800))  # 512 MB announced, 1 KB held
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + b"\1" * 1000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ImageError, match=r"the file is truncated"):
        load_volume(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


# --------------------------------------------------------------------------------------- mask shape


@pytest.mark.parametrize("save", [save_mask_nifti, save_segmentation_nrrd])
def test_a_mask_of_another_shape_than_the_reference_is_refused_not_written(tmp_path, save):
    reference = Volume(np.zeros((20, 30, 40), np.float32), (0.8, 0.8, 3.0), (10, 20, 30))
    path = tmp_path / ("m.seg.nrrd" if save is save_segmentation_nrrd else "m.nii.gz")
    with pytest.raises(ImageError, match=r"the mask's shape \(40, 30, 20\) is not the image's \(20, 30, 40\)"):
        save(np.zeros((40, 30, 20), np.uint8), reference, path)
    assert not path.exists()
    save(np.zeros((20, 30, 40), np.uint8), reference, path)  # the right shape is written
    assert sitk.ReadImage(str(path)).GetSize() == (40, 30, 20)


# ------------------------------------------------------------------------------------------------ 4D


def test_a_4d_image_whose_time_axis_is_not_last_is_refused(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32), isVector=False)
    direction = np.zeros((4, 4))
    direction[0, 0] = direction[1, 1] = direction[3, 2] = direction[2, 3] = 1  # axes stored x, y, t, z
    image.SetDirection(direction.ravel().tolist())
    image.SetSpacing((1, 1, 2.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "perm4d.mha"))
    with pytest.raises(ImageError, match=r"4th axis is not its time \(or channel\) axis"):
        load_volume(tmp_path / "perm4d.mha", channel=0)


def test_a_4d_image_with_its_time_axis_last_still_loads_each_volume(tmp_path):
    array = np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing((1, 1, 2.5, 3.0))
    sitk.WriteImage(image, str(tmp_path / "t.mha"))
    volume = load_volume(tmp_path / "t.mha", channel=1)
    assert np.array_equal(volume.array, array[1]) and volume.spacing == (1.0, 1.0, 2.5)


# ------------------------------------------------------------------------------- errors that say why


def _nifti_gz(path: Path) -> Path:
    array = np.random.default_rng(0).integers(0, 1000, (40, 50, 60)).astype(np.int16)
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_a_nii_gz_damaged_in_its_compressed_data_is_called_damaged(tmp_path, where):
    data = bytearray(_nifti_gz(tmp_path / "ok.nii.gz").read_bytes())
    data[int(200 + where * (len(data) - 220))] ^= 0x10
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ImageError) as caught:
        load_volume(bad)
    assert "the file is damaged" in str(caught.value) and "ImageIO" not in str(caught.value)


def test_gzip_data_under_a_nii_name_is_told_to_be_renamed(tmp_path):
    gz = _nifti_gz(tmp_path / "ok.nii.gz")
    named = tmp_path / "scan.nii"
    named.write_bytes(gz.read_bytes())
    with pytest.raises(ImageError, match=r"gzip-compressed but named \.nii: rename it to \.nii\.gz"):
        load_volume(named)


def test_an_upper_case_mhd_reads(tmp_path):
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "x.mhd"))
    os.rename(tmp_path / "x.mhd", tmp_path / "scan.MHD")  # its data file keeps its name
    assert np.array_equal(load_volume(tmp_path / "scan.MHD").array, array)


def test_an_output_under_a_symbolic_link_loop_is_refused_up_front(tmp_path):
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    assert "symbolic link that loops" in output_problem(tmp_path / "loop1" / "x.nii.gz")
    assert "symbolic link that loops" in output_problem(tmp_path / "loop1", folder=True)
    assert output_problem(tmp_path / "new" / "x.nii.gz") is None


# -------------------------------------------------------------------------------------------- flock


@pytest.mark.skipif(not file_locks.HAVE_FLOCK, reason="flock is POSIX")
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_flock_the_filesystem_refuses_is_an_error_not_a_busy_lock(tmp_path, monkeypatch, code):
    # no filesystem here lacks flock: the call fails as it does on one (an NFS mount without its lock service)
    def refused(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(file_locks.fcntl, "flock", refused)
    opened = len(os.listdir("/proc/self/fd"))
    started = time.monotonic()
    with pytest.raises(LockUnsupportedError, match=r"cannot lock the file: .*filesystem support file locks") as caught:
        exclusive_lock(tmp_path / "x.lock", patience_s=1.0)
    assert time.monotonic() - started < 0.5  # not retried as a busy lock
    assert caught.value.errno == code and caught.value.filename == str(tmp_path / "x.lock")
    assert len(os.listdir("/proc/self/fd")) == opened  # its descriptor closed


@pytest.mark.skipif(not file_locks.HAVE_FLOCK, reason="flock is POSIX")
def test_a_lock_held_by_another_descriptor_is_still_busy(tmp_path):
    held = exclusive_lock(tmp_path / "x.lock")
    try:
        assert held is not None and exclusive_lock(tmp_path / "x.lock") is None
    finally:
        os.close(held)


@pytest.mark.skipif(not file_locks.HAVE_FLOCK, reason="flock is POSIX")
def test_a_training_job_on_a_filesystem_without_flock_is_refused_as_such_not_as_busy(tmp_path, monkeypatch):
    """start_training used to answer 'a training job is already running' for ever on such a filesystem."""
    from learning_fixtures import make_store, tiny_checkpoint

    from SegAssistLib.learning import jobs

    store, _ = make_store(tmp_path / "store", n_labelled=3, n_new=0)
    store.close()
    checkpoint = tiny_checkpoint(tmp_path / "base.pt")

    def refused(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(file_locks.fcntl, "flock", refused)
    with pytest.raises(jobs.TrainingSetupError, match="cannot start a training job: cannot lock the file") as caught:
        jobs.start_training(tmp_path / "store", checkpoint, {"kind": "lora", "max_steps": 1})
    assert "does not support file locks" in caught.value.public and str(tmp_path) not in caught.value.public
    assert not jobs.jobs_folder(tmp_path / "store").exists() or not any(jobs.jobs_folder(tmp_path / "store").iterdir())
    assert jobs.training_running(tmp_path / "store")  # cannot tell: a job is judged by its worker's pid
