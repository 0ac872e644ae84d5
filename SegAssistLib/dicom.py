"""Reading a DICOM series folder as one 3D image, refusing series that one regular grid cannot hold.

SimpleITK (GDCM) sorts a series' slices by position and stacks them with the mean step between
them; it does not check that they form one regular grid. A series with a gantry tilt, missing
slices, several echoes or phases at each position, a localizer in another orientation, or slices of
other pixel spacings or sizes would load without an error (with the first slice's spacing) and put
voxels millimetres away from where the scanner saw them. Such series are refused here, with the
reason. Slices with their own rescale slope or intercept are read as float, so that no slice is
truncated to the first one's integer type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.files import sitk_path

POSITION, ORIENTATION, SLOPE, INTERCEPT = "0020|0032", "0020|0037", "0028|1053", "0028|1052"
PIXEL_SPACING, ROWS, COLUMNS, DESCRIPTION = "0028|0030", "0028|0010", "0028|0011", "0008|103e"
PIXEL_SPACING_TOLERANCE = 1e-4  # relative: spacings written with fewer digits on some slices are the same
STEP_TOLERANCE = 0.01  # slice steps that differ from their median by more than this share are uneven
TILT_TOLERANCE = 0.01  # a slice shifted in its own plane by more than this share of the step: a tilt
POSITION_ROUNDING_MM = 0.02  # positions written with 2 decimals: steps and shifts within this are even
SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class SliceHeader:
    position: Optional[np.ndarray]  # image position (patient), mm
    orientation: Optional[np.ndarray]  # row and column direction cosines, 6 numbers
    slope: float
    intercept: float
    pixel_spacing: Optional[np.ndarray] = None  # row and column spacing, mm
    rows: Optional[int] = None
    columns: Optional[int] = None


def _numbers(reader: sitk.ImageFileReader, tag: str, count: int) -> Optional[np.ndarray]:
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        values = np.asarray([float(v) for v in reader.GetMetaData(tag).strip().split("\\")], float)
    except ValueError:
        return None
    return values if values.shape == (count,) and np.all(np.isfinite(values)) else None


def read_slice_header(path: str) -> SliceHeader:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(f"cannot read DICOM file {path}: {str(exc).strip().splitlines()[-1]}") from exc
    slope, intercept = _numbers(reader, SLOPE, 1), _numbers(reader, INTERCEPT, 1)
    rows, columns = _numbers(reader, ROWS, 1), _numbers(reader, COLUMNS, 1)
    return SliceHeader(
        position=_numbers(reader, POSITION, 3),
        orientation=_numbers(reader, ORIENTATION, 6),
        slope=1.0 if slope is None else float(slope[0]),
        intercept=0.0 if intercept is None else float(intercept[0]),
        pixel_spacing=_numbers(reader, PIXEL_SPACING, 2),
        rows=None if rows is None else int(rows[0]),
        columns=None if columns is None else int(columns[0]),
    )


def check_slice_planes(headers: Sequence[SliceHeader], where: str) -> None:
    """Raise :class:`ImageError` unless every slice has the same rows and columns and the same pixel
    spacing (0028,0030): the reader stacks them with the first slice's, so a slice of another spacing
    would be stretched onto the grid of the others."""
    sizes = sorted({(h.rows, h.columns) for h in headers}, key=str)
    if len(sizes) > 1:
        shown = ", ".join("?" if None in size else f"{size[0]} x {size[1]}" for size in sizes[:4])
        raise ImageError(
            f"{where}: the slices have {len(sizes)} different sizes (rows x columns {shown}): keep only the "
            "slices of one acquisition in the folder"
        )
    spacings: List[Optional[np.ndarray]] = []
    for h in headers:
        if not any(_same_spacing(h.pixel_spacing, seen) for seen in spacings):
            spacings.append(h.pixel_spacing)
    if len(spacings) > 1:
        shown = ", ".join("none" if s is None else " x ".join(f"{v:.7g}" for v in s) for s in spacings[:4])
        raise ImageError(
            f"{where}: the slices have {len(spacings)} different pixel spacings ({shown} mm): the series would "
            "load with one slice's spacing; keep only the slices of one acquisition in the folder, or resample them"
        )


def _same_spacing(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.allclose(a, b, rtol=PIXEL_SPACING_TOLERANCE, atol=1e-6))


def check_slice_grid(headers: Sequence[SliceHeader], where: str) -> None:
    """Raise :class:`ImageError` unless the slices are parallel, at distinct positions, evenly spaced
    and stacked straight along their normal. Series without positions or orientations are left to
    the reader (GDCM cannot sort them either)."""
    if len(headers) < 2 or any(h.position is None or h.orientation is None for h in headers):
        return
    orientations = np.stack([h.orientation for h in headers])
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        kinds = len(np.unique(np.round(orientations, 4), axis=0))
        raise ImageError(
            f"{where}: the slices have {kinds} different orientations (a localizer or a reformatted slice in "
            "the series?): keep only the slices of one acquisition in the folder"
        )
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    positions = np.stack([h.position for h in headers])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    at_one = int(np.sum(steps < SAME_POSITION_MM))
    if at_one:
        distinct = len(headers) - at_one
        raise ImageError(
            f"{where}: {len(headers)} slices at only {distinct} positions (several echoes, phases or time "
            "points in one series?): put each volume's slices in a folder of its own"
        )
    median = float(np.median(steps))
    if np.abs(steps - median).max() > max(STEP_TOLERANCE * median, POSITION_ROUNDING_MM):
        raise ImageError(
            f"{where}: uneven slice spacing, steps from {steps.min():.4g} to {steps.max():.4g} mm (median "
            f"{median:.4g}; missing slices?): a regular grid is needed, resample the series first"
        )
    moves = np.diff(positions, axis=0)
    in_plane = np.linalg.norm(moves - np.outer(moves @ normal, normal), axis=1)
    if in_plane.max() > max(TILT_TOLERANCE * median, POSITION_ROUNDING_MM):
        angle = float(np.degrees(np.arctan2(np.median(in_plane), median)))
        raise ImageError(
            f"{where}: each slice is shifted in its own plane from the last (gantry tilt of about {angle:.1f} "
            "degrees): the slices do not stack into one box; resample the series onto a regular grid first"
        )


def _series_name(reader: sitk.ImageSeriesReader, folder: Path, uid: str) -> str:
    """One series of a folder, for a person: its description, its UID (GDCM's series id) or that it has
    none, its number of files and the name of one (which tells the series apart when their UIDs do not)."""
    files = list(reader.GetGDCMSeriesFileNames(sitk_path(folder), uid))
    name = f"UID {uid}" if uid.strip() else "no series UID"
    if files:
        header = sitk.ImageFileReader()
        header.SetImageIO("GDCMImageIO")
        header.SetFileName(files[0])
        try:
            header.ReadImageInformation()
            if header.HasMetaDataKey(DESCRIPTION) and header.GetMetaData(DESCRIPTION).strip():
                name = f"'{header.GetMetaData(DESCRIPTION).strip()}', {name}"
        except RuntimeError:
            pass
    first = f", such as {Path(files[0]).name}" if files else ""
    return f"{name}: {len(files)} file{'s' if len(files) != 1 else ''}{first}"


def read_dicom_series(folder: Path) -> sitk.Image:
    """The one DICOM series in ``folder`` as a SimpleITK image; :class:`ImageError` with the reason
    when the folder holds no series, several, or one that is not a regular grid."""
    reader = sitk.ImageSeriesReader()
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM lists every non-DICOM file it skips
    try:
        series = reader.GetGDCMSeriesIDs(sitk_path(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    if not series:
        raise ImageError(f"no DICOM series found in directory {folder}")
    if len(series) > 1:
        named = "; ".join(_series_name(reader, folder, uid) for uid in series[:4])
        more = f"; and {len(series) - 4} more" if len(series) > 4 else ""
        raise ImageError(
            f"{folder} holds {len(series)} DICOM series ({named}{more}): move each series to a folder of its "
            "own and point at one"
        )
    files: List[str] = list(reader.GetGDCMSeriesFileNames(sitk_path(folder), series[0]))
    headers = [read_slice_header(f) for f in files]
    check_slice_planes(headers, str(folder))
    check_slice_grid(headers, str(folder))
    if len({(h.slope, h.intercept) for h in headers}) > 1:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"cannot read the DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}") from exc
