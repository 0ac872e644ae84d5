"""Reading images and writing segmentations with SimpleITK. Torch-free.

Reads NIfTI, NRRD, MHA and any other single-file format SimpleITK knows, and DICOM series
directories. Writes masks as NIfTI (``.nii.gz``) and as Slicer segmentations (``.seg.nrrd``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.image import Volume

PathLike = Union[str, Path]


def _read_sitk(path: Path) -> sitk.Image:
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise ImageError(f"no DICOM series found in directory {path}")
        if len(series) > 1:
            raise ImageError(
                f"{path} holds {len(series)} DICOM series ({', '.join(series)}): point at one series' folder"
            )
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
        return reader.Execute()
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from exc


def volume_from_sitk(image: sitk.Image, channel: Optional[int] = None) -> Volume:
    if image.GetDimension() == 4:
        if channel is None:
            raise ImageError(f"image is 4D (size {image.GetSize()}): choose a channel")
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size, [0, 0, 0, channel])
    if image.GetDimension() != 3:
        raise ImageError(f"image must be 3D, got {image.GetDimension()}D (size {image.GetSize()})")
    if image.GetNumberOfComponentsPerPixel() > 1:
        if channel is None:
            raise ImageError(f"image has {image.GetNumberOfComponentsPerPixel()} components: choose a channel")
        image = sitk.VectorIndexSelectionCast(image, channel)
    array = sitk.GetArrayFromImage(image)
    return Volume(
        array=array,
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.asarray(image.GetDirection()).reshape(3, 3),
    )


def read_geometry(path: PathLike) -> Volume:
    """The spacing, origin and direction of an image file (its first three axes), without its voxels
    (the returned volume's array is empty)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageError(f"cannot read {path}: {str(exc).strip().splitlines()[-1]}") from exc
    if reader.GetDimension() < 3:
        raise ImageError(f"image must be 3D, got {reader.GetDimension()}D (size {reader.GetSize()})")
    n = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), float).reshape(n, n)[:3, :3]
    return Volume(np.zeros((0, 0, 0), np.uint8), reader.GetSpacing()[:3], reader.GetOrigin()[:3], direction)


def load_volume(path: PathLike, channel: Optional[int] = None) -> Volume:
    """Load a 3D image from a file or a DICOM series directory."""
    return volume_from_sitk(_read_sitk(Path(path)), channel=channel)


def volume_to_sitk(volume: Volume, array: Optional[np.ndarray] = None) -> sitk.Image:
    image = sitk.GetImageFromArray(volume.array if array is None else array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(np.asarray(volume.direction, float).ravel()))
    return image


def save_mask_nifti(mask: np.ndarray, reference: Volume, path: PathLike) -> Path:
    """Write a label mask on the reference image's grid (``.nii.gz`` or any SimpleITK format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume_to_sitk(reference, np.asarray(mask, np.uint8)), str(path), useCompression=True)
    return path


def save_segmentation_nrrd(
    mask: np.ndarray,
    reference: Volume,
    path: PathLike,
    segment_names: Sequence[str] = ("SegAssist",),
    colors: Sequence[Sequence[float]] = ((0.95, 0.45, 0.2),),
) -> Path:
    """Write a label mask as a Slicer segmentation file (``.seg.nrrd``, one layer).

    Label value ``n`` becomes segment ``n``; the segment metadata keys are the ones Slicer's
    segmentation storage node reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.asarray(mask, np.uint8)
    image = volume_to_sitk(reference, labels)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    ext = " ".join(f"0 {n - 1}" for n in image.GetSize())
    for index, name in enumerate(segment_names):
        value = index + 1
        color = colors[index % len(colors)]
        prefix = f"Segment{index}_"
        image.SetMetaData(prefix + "ID", f"Segment_{value}")
        image.SetMetaData(prefix + "Name", name)
        image.SetMetaData(prefix + "NameAutoGenerated", "0")
        image.SetMetaData(prefix + "Color", " ".join(f"{c:.4f}" for c in color))
        image.SetMetaData(prefix + "ColorAutoGenerated", "0")
        image.SetMetaData(prefix + "LabelValue", str(value))
        image.SetMetaData(prefix + "Layer", "0")
        image.SetMetaData(prefix + "Extent", ext)
        image.SetMetaData(prefix + "Tags", "Segmentation.Status:inprogress|")
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def load_mask(path: PathLike) -> np.ndarray:
    return sitk.GetArrayFromImage(_read_sitk(Path(path)))
