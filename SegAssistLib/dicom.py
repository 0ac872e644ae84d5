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
from typing import List, Optional, Sequence, Tuple

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


def check_geometry_tags(headers: Sequence[SliceHeader], names: Sequence[str], where: str) -> None:
    """Raise :class:`ImageError` naming the files when some slices have a position (0020,0032) or an
    orientation (0020,0037) and others do not: GDCM places a slice without them at the origin (a secondary
    capture or a screen save filed in the series), and the grid checks could not see it."""
    for what, missing in (
        ("position (0020,0032)", [h.position is None for h in headers]),
        ("orientation (0020,0037)", [h.orientation is None for h in headers]),
    ):
        if any(missing) and not all(missing):
            lacking = [Path(name).name for name, gone in zip(names, missing) if gone]
            shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
            raise ImageError(
                f"{where}: {len(lacking)} of the {len(headers)} slices {'has' if len(lacking) == 1 else 'have'} no "
                f"image {what} ({shown}; a secondary capture or a screen save filed with the series?): keep only "
                "the slices of one acquisition in the folder"
            )


def _stack_normal(headers: Sequence[SliceHeader], positions: np.ndarray, where: str) -> Tuple[np.ndarray, bool]:
    """The direction the slices are stacked along, and whether it is their orientation's normal: without
    an orientation, the direction their positions move in (the reader stacks them the same way)."""
    if headers[0].orientation is not None:
        orientations = np.stack([h.orientation for h in headers])
        if np.abs(orientations - orientations[0]).max() > 1e-4:
            kinds = len(np.unique(np.round(orientations, 4), axis=0))
            raise ImageError(
                f"{where}: the slices have {kinds} different orientations (a localizer or a reformatted slice in "
                "the series?): keep only the slices of one acquisition in the folder"
            )
        return np.cross(orientations[0][:3], orientations[0][3:]), True
    spread = positions - positions.mean(axis=0)
    if np.linalg.norm(spread, axis=1).max() < SAME_POSITION_MM:
        raise ImageError(
            f"{where}: {len(headers)} slices at only 1 position and none has an orientation (0020,0037): a "
            "regular grid cannot be told; put each volume's slices in a folder of its own"
        )
    direction = np.linalg.svd(spread, full_matrices=False)[2][0]
    return direction if (positions[-1] - positions[0]) @ direction >= 0 else -direction, False


def check_slice_grid(headers: Sequence[SliceHeader], where: str) -> None:
    """Raise :class:`ImageError` unless the slices are parallel, at distinct positions, evenly spaced
    and stacked straight along their normal (without orientations: along the line their positions
    move on, in the order the reader stacks them). Series without positions are left to the reader
    (GDCM cannot sort them either); a series where only some slices have them is refused first
    (:func:`check_geometry_tags`)."""
    if len(headers) < 2 or any(h.position is None for h in headers):
        return
    if any(h.orientation is None for h in headers) and not all(h.orientation is None for h in headers):
        return  # check_geometry_tags refuses it
    given = np.stack([h.position for h in headers])  # in the reader's order
    normal, oriented = _stack_normal(headers, given, where)
    along = given @ normal
    order = np.argsort(along, kind="stable")
    positions, along = given[order], along[order]
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
        if not oriented:
            raise ImageError(
                f"{where}: the slices have no orientation (0020,0037) and their positions do not lie on one line: "
                "the slices do not stack into one box; resample the series onto a regular grid first"
            )
        angle = float(np.degrees(np.arctan2(np.median(in_plane), median)))
        raise ImageError(
            f"{where}: each slice is shifted in its own plane from the last (gantry tilt of about {angle:.1f} "
            "degrees): the slices do not stack into one box; resample the series onto a regular grid first"
        )
    if not oriented and np.any(np.diff(given @ normal) <= 0):
        raise ImageError(
            f"{where}: the slices have no orientation (0020,0037) and the reader would not stack them in the "
            "order of their positions: add the orientation, or resample the series onto a regular grid first"
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
    check_geometry_tags(headers, files, str(folder))
    check_slice_planes(headers, str(folder))
    check_slice_grid(headers, str(folder))
    if len({(h.slope, h.intercept) for h in headers}) > 1:
        reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"cannot read the DICOM series in {folder}: {str(exc).strip().splitlines()[-1]}") from exc
