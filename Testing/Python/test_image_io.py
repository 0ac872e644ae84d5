"""Image IO (NIfTI, NRRD, MHA, DICOM series), geometry, and the checks on bad images."""

import gzip
import os
import shutil
import struct

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume, geometry_difference, guess_modality, validate_image
from SegAssistLib.io import (
    load_mask,
    load_volume,
    read_geometry,
    save_mask_nifti,
    save_segmentation_nrrd,
    volume_to_sitk,
)


def _oblique_volume() -> Volume:
    rng = np.random.default_rng(0)
    angle = np.deg2rad(25)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    arr = rng.normal(size=(6, 7, 8)).astype(np.float32)
    return Volume(arr, spacing=(0.7, 0.8, 5.0), origin=(10, -20, 30), direction=direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_file_round_trip_keeps_voxels_and_geometry(tmp_path, suffix):
    vol = _oblique_volume()
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(volume_to_sitk(vol), str(path))
    back = load_volume(path)
    assert np.array_equal(back.array, vol.array)
    assert np.allclose(back.spacing, vol.spacing)
    assert np.allclose(back.origin, vol.origin, atol=1e-4)
    assert np.allclose(back.direction, vol.direction, atol=1e-5)


def test_index_to_physical_matches_simpleitk_on_an_oblique_anisotropic_image():
    vol = _oblique_volume()
    image = volume_to_sitk(vol)
    for ijk in [(0, 0, 0), (3, 4, 5), (7.5, 0.25, 2.0)]:
        expected = image.TransformContinuousIndexToPhysicalPoint(ijk)
        assert np.allclose(vol.ijk_to_physical(ijk), expected)
        assert np.allclose(vol.physical_to_ijk(expected), ijk)


def test_dicom_series_directory(shared_data):
    folder = shared_data / "totalsegmentator_examples" / "dicom_ct"
    vol = load_volume(folder)
    assert vol.array.ndim == 3 and vol.array.shape[0] == 20
    assert guess_modality(vol) == "CT"


def test_masks_are_written_on_the_reference_grid(tmp_path):
    vol = _oblique_volume()
    mask = np.zeros(vol.array.shape, np.uint8)
    mask[1:3, 2:5, 3:6] = 1
    nii = save_mask_nifti(mask, vol, tmp_path / "m.nii.gz")
    seg = save_segmentation_nrrd(mask, vol, tmp_path / "m.seg.nrrd", segment_names=("liver",))
    assert np.array_equal(load_mask(nii), mask)
    back = sitk.ReadImage(str(seg))
    assert np.array_equal(sitk.GetArrayFromImage(back), mask)
    assert back.GetMetaData("Segment0_Name") == "liver"
    assert back.GetMetaData("Segment0_LabelValue") == "1"
    assert np.allclose(back.GetSpacing(), vol.spacing)


def test_content_hash_depends_on_voxels_and_geometry():
    a, b = _oblique_volume(), _oblique_volume()
    assert a.content_hash() == b.content_hash()
    b.array[0, 0, 0] += 1
    assert a.content_hash() != b.content_hash()
    c = _oblique_volume()
    c.spacing = (1.0, 1.0, 1.0)
    assert a.content_hash() != c.content_hash()


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((5, 5), np.float32), "must be 3D"),
        (np.zeros((2, 5, 5, 5), np.float32), "must be 3D"),
        (np.zeros((1, 5, 5, 5), np.float32), "4 dimensions"),
        (np.zeros((0, 5, 5), np.float32), "empty"),
        (np.zeros((1, 5, 5), np.float32), "single slice"),
        (np.full((4, 4, 4), np.nan, np.float32), "NaN"),
        (np.ones((4, 4, 4), np.float32), "constant"),
        (np.array([[["a"]]]), "not numeric"),
        (np.random.default_rng(0).random((4, 4, 4)) > 0.5, "dtype bool: that is a mask"),  # once a TypeError
        (np.random.default_rng(0).random((4, 4, 4)) * 1e300, "beyond the float32 range"),  # once an empty answer
    ],
)
def test_bad_images_are_named(array, message):
    with pytest.raises(ImageError, match=message):
        validate_image(Volume(array) if array.ndim == 3 else _raw(array))


def test_a_wide_integer_image_is_not_taken_for_constant():
    array = np.full((4, 4, 4), 2**62, np.int64)
    array[0, 0, 0] += 1  # equal to the rest as a float64
    validate_image(Volume(array))
    validate_image(Volume(np.random.default_rng(0).random((4, 4, 4)) * 3e38))  # float64 inside float32's range


def _raw(array):
    vol = Volume(np.zeros((2, 2, 2)))
    vol.array = array
    return vol


def test_partial_nan_is_counted():
    arr = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    arr[0, 0, :2] = np.nan
    with pytest.raises(ImageError, match="2 NaN"):
        validate_image(Volume(arr))


def test_bad_spacing_and_oversize():
    arr = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    with pytest.raises(ImageError, match="spacing"):
        validate_image(Volume(arr, spacing=(1, 0, 1)))
    with pytest.raises(ImageError, match="above the limit"):
        validate_image(Volume(arr), max_voxels=10)


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read"):
        load_volume(bad)
    with pytest.raises(ImageError, match="no DICOM series"):
        load_volume(tmp_path)


def test_four_d_file_needs_a_channel(tmp_path):
    arr = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype(np.float32)
    path = tmp_path / "4d.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(path))
    with pytest.raises(ImageError, match="4D"):
        load_volume(path)
    assert load_volume(path, channel=1).array.shape == (4, 5, 6)


def test_geometry_difference_tolerates_float32_storage_not_a_moved_grid(tmp_path):
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    image = Volume(np.zeros((4, 5, 6), np.float32), spacing=(0.7, 0.7, 2.5), origin=(-101.3, 17.9, 60.1),
                   direction=rotation)
    path = tmp_path / "stored.nii.gz"
    save_mask_nifti(np.zeros((4, 5, 6), np.uint8), image, path)  # NIfTI keeps float32 geometry
    stored = read_geometry(path)
    assert stored.array.size == 0 and geometry_difference(stored, image) is None
    assert np.allclose(stored.direction, rotation, atol=1e-6)
    moved = {
        "spacing": Volume(image.array, (0.7, 0.71, 2.5), image.origin, rotation),
        "origin": Volume(image.array, image.spacing, (-101.3, 17.9, 60.2), rotation),
        "direction": Volume(image.array, image.spacing, image.origin, np.eye(3)),
    }
    for what, other in moved.items():
        assert geometry_difference(other, image).startswith(what)


def test_channels_are_checked_against_what_the_image_has(tmp_path):
    volumes = np.random.default_rng(0).normal(size=(3, 4, 5, 6)).astype(np.float32)
    four_d = tmp_path / "4d.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volumes, isVector=False), str(four_d))
    vector = tmp_path / "vector.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.moveaxis(volumes[:2], 0, -1), isVector=True), str(vector))
    scalar = tmp_path / "scalar.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(volumes[0]), str(scalar))
    for path, count in ((four_d, 3), (vector, 2), (scalar, 1)):
        for bad in (count, -1, 1.5):
            with pytest.raises(ImageError, match=rf"channel {bad!r} does not exist.*channels 0..{count - 1}"):
                load_volume(path, channel=bad)
        assert np.array_equal(load_volume(path, channel=count - 1).array, volumes[count - 1])
    assert np.array_equal(load_volume(scalar).array, volumes[0])


def test_a_four_d_file_with_one_volume_loads_as_three_d(tmp_path):
    arr = np.random.default_rng(0).normal(size=(1, 4, 5, 6)).astype(np.float32)
    path = tmp_path / "one.mha"
    sitk.WriteImage(sitk.GetImageFromArray(arr, isVector=False), str(path))
    assert np.array_equal(load_volume(path).array, arr[0])


@pytest.mark.parametrize("values, message", [
    (np.array([0, 1, 256], np.int32), "0-255, got 0..256"),
    (np.array([0, -1, 2], np.int16), "0-255, got -1..2"),
    (np.array([0.0, 0.9, 1.0], np.float32), "integers 0-255"),
])
def test_labels_are_never_wrapped_into_uint8(tmp_path, values, message):
    vol = _oblique_volume()
    mask = np.zeros(vol.array.shape, values.dtype)
    mask[0, 0, :3] = values
    for save in (save_mask_nifti, save_segmentation_nrrd):
        target = tmp_path / f"m_{save.__name__}.nrrd"
        with pytest.raises(ImageError, match=message):
            save(mask, vol, target)
        assert not target.exists()


def test_a_segmentation_file_names_every_label_it_holds(tmp_path):
    vol = _oblique_volume()
    mask = np.zeros(vol.array.shape, np.uint8)
    mask[0, 0, 0], mask[1, 1, 1] = 1, 3
    path = save_segmentation_nrrd(mask, vol, tmp_path / "m.seg.nrrd", segment_names=("liver", "spleen"))
    header = sitk.ReadImage(str(path))
    segments = {}
    index = 0
    while header.HasMetaDataKey(f"Segment{index}_ID"):
        key = f"Segment{index}_"
        segments[int(header.GetMetaData(key + "LabelValue"))] = (header.GetMetaData(key + "Name"),
                                                                  header.GetMetaData(key + "Extent"))
        index += 1
    full = " ".join(f"0 {n - 1}" for n in header.GetSize())
    assert segments == {1: ("liver", full), 2: ("spleen", "0 -1 0 -1 0 -1"), 3: ("Segment 3", full)}


def test_bool_and_big_endian_arrays_are_written(tmp_path):
    vol = _oblique_volume()
    big = Volume(vol.array.astype(">f4"), vol.spacing, vol.origin, vol.direction)
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(volume_to_sitk(big), str(path))
    assert np.array_equal(load_volume(path).array, vol.array)
    flags = np.zeros(vol.array.shape, bool)
    flags[2, 3, 4] = True
    assert np.array_equal(sitk.GetArrayFromImage(volume_to_sitk(vol, flags)), flags.astype(np.uint8))


@pytest.mark.parametrize("direction", [2 * np.eye(3), np.array([[1, 0.2, 0], [0, 1, 0], [0, 0, 1.0]])])
def test_a_scaled_or_sheared_direction_is_refused(direction):
    arr = np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32)
    with pytest.raises(ImageError, match="must be a rotation"):
        validate_image(Volume(arr, direction=direction))
    validate_image(Volume(arr, direction=np.diag([-1.0, -1.0, 1.0])))  # LPS <-> RAS flip is fine


def test_an_unreadable_file_is_called_unreadable_not_missing(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "secret.nrrd"
    sitk.WriteImage(volume_to_sitk(_oblique_volume()), str(path))
    path.chmod(0)
    code = f"from SegAssistLib.io import load_volume\nload_volume({str(path)!r})"
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        drop = "-dac_override,-dac_read_search"
        command = ["setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "permission denied" in result.stderr and "not found" not in result.stderr


def test_a_name_that_is_not_utf8_is_refused_not_a_crash(tmp_path, shared_data):
    """Linux names may hold any bytes; SimpleITK aborts the whole process on them (no exception to
    catch), so the check runs in a child process that must survive to report each refusal."""
    import subprocess
    import sys

    bad = os.fsdecode(b"caf\xe9")
    sitk.WriteImage(volume_to_sitk(_oblique_volume()), str(tmp_path / "plain.nii.gz"))
    (tmp_path / "plain.nii.gz").rename(tmp_path / f"{bad}.nii.gz")  # written by name here, it would abort pytest
    dicom = tmp_path / f"series_{bad}"
    shutil.copytree(shared_data / "totalsegmentator_examples" / "dicom_ct", dicom)
    code = f"""
import os
from pathlib import Path
from SegAssistLib.errors import ImageError
from SegAssistLib.io import load_mask, load_volume, read_geometry, save_mask_nifti
from SegAssistLib.learning.sources import find_sources
from SegAssistLib.image import Volume
import numpy as np
root = Path({str(tmp_path)!r})
image = root / os.fsdecode(b"caf\\xe9.nii.gz")
ok = Volume(np.zeros((4, 5, 6), np.int16))
for name, call in [
    ("load_volume", lambda: load_volume(image)), ("read_geometry", lambda: read_geometry(image)),
    ("load_mask", lambda: load_mask(image)), ("dicom", lambda: load_volume(root / os.fsdecode(b"series_caf\\xe9"))),
    ("save", lambda: save_mask_nifti(np.zeros((4, 5, 6), np.uint8), ok, root / os.fsdecode(b"out\\xe9.nii.gz"))),
]:
    try:
        call()
        print(name, "read")
    except ImageError as exc:
        print(name, "refused:", exc)
print("sources", len(find_sources(root)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("load_volume", "read_geometry", "load_mask", "dicom", "save"):
        line = next(x for x in lines if x.startswith(name + " "))
        assert "refused:" in line and "not valid UTF-8; rename it" in line and "\\xe9" in line, line
    assert "sources 1" in lines  # the image file is listed (and refused by name when imported)


def test_a_nii_gz_is_read_whole_when_a_nii_of_the_same_name_lies_beside_it(tmp_path):
    """ITK's NIfTI reader takes x.nii's voxels under x.nii.gz's header when both exist."""
    plain = Volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6))
    gz = Volume(-np.arange(240, dtype=np.int16).reshape(8, 5, 6), spacing=(2.0, 2.0, 3.0))
    sitk.WriteImage(volume_to_sitk(plain), str(tmp_path / "case.nii"))
    sitk.WriteImage(volume_to_sitk(gz), str(tmp_path / "case.nii.gz"))
    for path in (tmp_path / "case.nii.gz", str(tmp_path / "case.nii.gz")):
        np.testing.assert_array_equal(load_volume(path).array, gz.array)
        np.testing.assert_array_equal(load_mask(path), gz.array)
        assert read_geometry(path).spacing == (2.0, 2.0, 3.0)
    np.testing.assert_array_equal(load_volume(tmp_path / "case.nii").array, plain.array)


def test_the_nii_gz_beside_a_nii_is_read_whole_where_symlinks_are_refused(tmp_path, monkeypatch):
    """Windows without the symlink privilege: the link falls back to a hard link, then to a copy."""
    from pathlib import Path

    def refused(self, target, target_is_directory=False):
        raise OSError(1314, "A required privilege is not held by the client")

    gz = Volume(-np.arange(240, dtype=np.int16).reshape(8, 5, 6))
    sitk.WriteImage(volume_to_sitk(Volume(np.arange(120, dtype=np.int16).reshape(4, 5, 6))), str(tmp_path / "c.nii"))
    sitk.WriteImage(volume_to_sitk(gz), str(tmp_path / "c.nii.gz"))
    monkeypatch.setattr(Path, "symlink_to", refused)
    np.testing.assert_array_equal(load_volume(tmp_path / "c.nii.gz").array, gz.array)
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(OSError(1, "no hard links here")))
    np.testing.assert_array_equal(load_volume(tmp_path / "c.nii.gz").array, gz.array)


@pytest.mark.parametrize(
    "geometry", [dict(direction=np.eye(2)), dict(direction=None), dict(spacing=("a", 1, 1)), dict(origin=None)]
)
def test_malformed_geometry_is_an_image_error(geometry):
    with pytest.raises(ImageError, match="image geometry"):
        Volume(np.zeros((2, 3, 4), np.float32), **geometry)


def test_a_volumes_modality_is_ct_mr_or_none_whatever_its_case():
    """``Volume(modality="ct")`` was taken for MR (the engine compares with "CT"): no CT windowing."""
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert Volume(array, modality="ct").modality == "CT" and Volume(array, modality=" mri ").modality == "MR"
    assert Volume(array).modality is None
    with pytest.raises(ImageError, match="modality must be 'CT', 'MR' or None"):
        Volume(array, modality="PET")


def _with_nonfinite(shape=(5, 6, 7), dtype=np.float32) -> np.ndarray:
    array = np.random.default_rng(1).normal(size=shape).astype(dtype)
    flat = array.reshape(-1)
    flat[[3, 40, 41, -1]] = [np.nan, np.inf, -np.inf, np.nan]
    return array


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".hdr", ".NII.GZ"])
def test_nan_and_infinite_voxels_of_a_nifti_file_are_read_as_from_nrrd(tmp_path, suffix, dtype):
    """ITK's NIfTI reader sets NaN and infinite floats to 0: such a scan was segmented as NIfTI and refused as
    NRRD (validate_image's refusal never fired for NIfTI)."""
    array = _with_nonfinite(dtype=dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.5, 0.6, 2.0))
    sitk.WriteImage(image, str(tmp_path / "scan.nrrd"))
    sitk.WriteImage(image, str(tmp_path / f"scan{suffix.lower()}"))
    if suffix != suffix.lower():
        os.rename(tmp_path / f"scan{suffix.lower()}", tmp_path / f"scan{suffix}")
    nrrd, nifti = load_volume(tmp_path / "scan.nrrd"), load_volume(tmp_path / f"scan{suffix}")
    assert nifti.array.dtype == dtype and np.array_equal(nifti.array, array, equal_nan=True)
    assert np.array_equal(nifti.array, nrrd.array, equal_nan=True) and np.allclose(nifti.spacing, nrrd.spacing)
    assert np.array_equal(load_mask(tmp_path / f"scan{suffix}"), array, equal_nan=True)
    for volume in (nrrd, nifti):
        with pytest.raises(ImageError, match="^image has 4 NaN or infinite voxels: fill or mask them"):
            validate_image(volume)


def test_a_four_d_nifti_keeps_its_nan_voxels_in_their_volume(tmp_path):
    array = np.random.default_rng(2).normal(size=(2, 4, 5, 6)).astype(np.float32)
    array[1, 2, 3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=False), str(tmp_path / "4d.nii.gz"))
    first, second = (load_volume(tmp_path / "4d.nii.gz", channel=c) for c in (0, 1))
    assert np.array_equal(first.array, array[0]) and np.array_equal(second.array, array[1], equal_nan=True)


def _nifti2(array: np.ndarray, spacing=(0.5, 0.6, 2.0)) -> bytes:
    """A NIfTI-2 file (float32, little-endian, no qform or sform) holding ``array`` ([k, j, i])."""
    header = bytearray(540)
    struct.pack_into("<i8s2h", header, 0, 540, b"n+2\0\r\n\x1a\n", 16, 32)  # sizeof_hdr, magic, datatype, bitpix
    struct.pack_into("<8q", header, 16, 3, *array.shape[::-1], 1, 1, 1, 1)  # dim
    struct.pack_into("<8d", header, 104, 1.0, *spacing, 0, 0, 0, 0)  # pixdim
    struct.pack_into("<qd", header, 168, 544, 1.0)  # vox_offset, scl_slope
    struct.pack_into("<i", header, 500, 2)  # xyzt_units: mm
    return bytes(header) + bytes(4) + array.astype("<f4").tobytes()


def test_nan_voxels_of_a_nifti_2_file_are_found(tmp_path):
    """The SimpleITK here reads no NIfTI-2 file (one that does sets its NaN to 0 as well): the voxels are put
    back into what it would read."""
    from SegAssistLib.io import _keep_nonfinite

    array = _with_nonfinite()
    (tmp_path / "scan2.nii").write_bytes(_nifti2(array))
    with gzip.open(tmp_path / "scan2.nii.gz", "wb") as f:
        f.write(_nifti2(array))
    as_itk_reads_it = sitk.GetImageFromArray(np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0))
    for name in ("scan2.nii", "scan2.nii.gz"):
        kept = _keep_nonfinite(as_itk_reads_it, tmp_path / name)
        assert np.array_equal(sitk.GetArrayViewFromImage(kept), array, equal_nan=True)
    try:
        volume = load_volume(tmp_path / "scan2.nii")
    except ImageError:  # not read here
        return
    assert np.array_equal(volume.array, array, equal_nan=True)


def test_a_nifti_vector_image_with_nan_components_is_refused_on_reading(tmp_path):
    """Its components lie apart in the file: the NaN cannot be put back in place, so the image is refused
    with validate_image's message."""
    array = np.random.default_rng(3).normal(size=(4, 5, 6, 2)).astype(np.float32)
    array[1, 2, 3, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(tmp_path / "vec.nii.gz"))
    with pytest.raises(ImageError, match="^image has 1 NaN or infinite voxels: fill or mask them"):
        load_volume(tmp_path / "vec.nii.gz", channel=0)
    finite = np.nan_to_num(array)
    sitk.WriteImage(sitk.GetImageFromArray(finite, isVector=True), str(tmp_path / "ok.nii.gz"))
    assert np.array_equal(load_volume(tmp_path / "ok.nii.gz", channel=1).array, finite[..., 1])


def test_integer_and_finite_nifti_files_are_read_as_itk_reads_them(tmp_path):
    for array in (np.arange(210, dtype=np.int16).reshape(5, 6, 7) - 100, _with_nonfinite().clip(-1, 1)):
        array = np.nan_to_num(array)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "plain.nii.gz"))
        volume = load_volume(tmp_path / "plain.nii.gz")
        assert volume.array.dtype == array.dtype and np.array_equal(volume.array, array)
