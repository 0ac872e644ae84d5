"""DICOM series folders: regular grids load where the scanner put them; series one grid cannot hold
(gantry tilt, missing slices, several echoes, a localizer) are refused with the reason; per-slice
rescale slopes are honoured."""

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from SegAssistLib.errors import ImageError
from SegAssistLib.io import load_volume

SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.1"


def write_slice(path: Path, pixels: np.ndarray, position, orientation=(1, 0, 0, 0, 1, 0), number: int = 1,
                slope: float = 1.0, intercept: float = -1024.0, pixel_spacing=(0.8, 0.8), series_uid: str = SERIES_UID,
                description: str = "") -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.PatientID = "CT", "Test", "1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = SERIES_UID + ".0", series_uid
    if description:
        ds.SeriesDescription = description
    ds.FrameOfReferenceUID, ds.SeriesNumber, ds.InstanceNumber = SERIES_UID + ".9", 1, number
    ds.ImagePositionPatient = [float(x) for x in position]
    ds.ImageOrientationPatient = [float(x) for x in orientation]
    ds.PixelSpacing, ds.SliceThickness = [float(x) for x in pixel_spacing], 2.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.asarray(pixels, np.int16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_series(folder: Path, positions, orientation=(1, 0, 0, 0, 1, 0), slopes=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, position in enumerate(positions):
        slope = 1.0 if slopes is None else slopes[k]
        write_slice(folder / f"slice{k:03d}.dcm", np.full((6, 7), 1024 + 10 * k, np.int16), position,
                    orientation, number=k + 1, slope=slope)
    return folder


def test_an_oblique_regular_series_loads_with_every_slice_where_the_scanner_put_it(tmp_path):
    angle = np.deg2rad(30)
    row, column = np.array([1.0, 0, 0]), np.array([0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, column)
    positions = [np.array([5.0, -3.0, 2.0]) + 2.5 * k * normal for k in range(6)]
    vol = load_volume(write_series(tmp_path / "s", positions, (*row, *column)))
    assert vol.array.shape == (6, 6, 7)
    assert np.allclose(vol.spacing, (0.8, 0.8, 2.5))
    for k in range(6):
        assert np.allclose(vol.ijk_to_physical([0, 0, k]), positions[k], atol=1e-4)
        assert vol.array[k, 0, 0] == 10 * k  # 1024 + 10 k stored, intercept -1024


def test_positions_rounded_to_two_decimals_are_an_even_grid(tmp_path):
    folder = write_series(tmp_path / "fine", [(0, 0, round(0.625 * k, 2)) for k in range(8)])
    assert load_volume(folder).array.shape == (8, 6, 7)


def test_a_gantry_tilted_series_is_refused_not_sheared(tmp_path):
    angle = np.deg2rad(20)
    orientation = (1, 0, 0, 0, np.cos(angle), np.sin(angle))
    folder = write_series(tmp_path / "tilt", [(0, 0, 5.0 * k) for k in range(8)], orientation)
    with pytest.raises(ImageError, match=r"gantry tilt of about 20\.0 degrees"):
        load_volume(folder)


def test_a_series_with_a_missing_slice_is_refused(tmp_path):
    folder = write_series(tmp_path / "gap", [(0, 0, z) for z in (0, 1, 2, 3, 4, 6, 7)])
    with pytest.raises(ImageError, match=r"uneven slice spacing, steps from 1 to 2 mm"):
        load_volume(folder)


def test_two_echoes_at_the_same_positions_are_refused(tmp_path):
    folder = write_series(tmp_path / "echoes", [(0, 0, 2.0 * (k % 4)) for k in range(8)])
    with pytest.raises(ImageError, match=r"8 slices at only 4 positions"):
        load_volume(folder)


def test_a_localizer_in_the_series_is_refused(tmp_path):
    folder = write_series(tmp_path / "loc", [(0, 0, 2.0 * k) for k in range(5)])
    write_slice(folder / "localizer.dcm", np.zeros((6, 7), np.int16), (-4, 0, 4), (0, 1, 0, 0, 0, -1), number=6)
    with pytest.raises(ImageError, match=r"2 different orientations"):
        load_volume(folder)


def test_slices_with_their_own_rescale_slope_are_read_as_float(tmp_path):
    folder = write_series(tmp_path / "slopes", [(0, 0, 2.0 * k) for k in range(3)], slopes=[1.0, 0.001, 0.5])
    vol = load_volume(folder)
    assert vol.array.dtype == np.float32
    expected = [1024 * 1.0 - 1024, 1034 * 0.001 - 1024, 1044 * 0.5 - 1024]
    assert np.allclose(vol.array[:, 0, 0], expected, atol=1e-3)


def test_slices_of_another_pixel_spacing_are_refused_not_loaded_with_one_slices_spacing(tmp_path):
    folder = write_series(tmp_path / "spacing", [(0, 0, 2.0 * k) for k in range(3)])
    for k in (3, 4):  # same size, same grid of positions: only (0028,0030) tells them apart
        write_slice(folder / f"slice{k:03d}.dcm", np.full((6, 7), 1024, np.int16), (0, 0, 2.0 * k), number=k + 1,
                    pixel_spacing=(0.5, 0.5))
    with pytest.raises(ImageError, match=r"2 different pixel spacings \(0\.8 x 0\.8, 0\.5 x 0\.5 mm\)"):
        load_volume(folder)
    # written with fewer digits on some slices, the same spacing
    same = write_series(tmp_path / "digits", [(0, 0, 2.0 * k) for k in range(2)])
    write_slice(same / "slice002.dcm", np.full((6, 7), 1024, np.int16), (0, 0, 4.0), number=3,
                pixel_spacing=(0.80000001, 0.8))
    assert np.allclose(load_volume(same).spacing, (0.8, 0.8, 2.0))


def test_slices_of_another_size_are_refused_with_the_sizes(tmp_path):
    folder = write_series(tmp_path / "sizes", [(0, 0, 2.0 * k) for k in range(3)])
    write_slice(folder / "slice003.dcm", np.full((8, 7), 1024, np.int16), (0, 0, 6.0), number=4)
    with pytest.raises(ImageError, match=r"2 different sizes \(rows x columns 6 x 7, 8 x 7\)"):
        load_volume(folder)


def test_two_series_in_one_folder_are_named_so_that_they_can_be_told_apart(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for k in range(3):  # an anonymiser emptied this series' UID: GDCM calls it ""
        write_slice(folder / f"a{k}.dcm", np.zeros((6, 7), np.int16), (0, 0, 2.0 * k), number=k + 1, series_uid="",
                    description="Axial 2 mm")
    for k in range(2):
        write_slice(folder / f"b{k}.dcm", np.zeros((6, 7), np.int16), (0, 0, 2.0 * k), number=k + 1,
                    series_uid=SERIES_UID + ".2")
    with pytest.raises(ImageError) as refused:
        load_volume(folder)
    message = str(refused.value)
    assert "holds 2 DICOM series" in message and "(, " not in message, message
    assert "'Axial 2 mm', no series UID: 3 files, such as a" in message, message
    assert f"UID {SERIES_UID}.2: 2 files, such as b" in message, message
