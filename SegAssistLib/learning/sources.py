"""Finding the images to import in a folder: single-file images and DICOM series folders. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Set, Tuple

import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.files import sitk_path

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files that hold segmentations or sidecar data, not images to annotate.
_SKIP_SUFFIXES = (".seg.nrrd", ".seg.nhdr")


def image_stem(path: Path) -> str:
    """The file name without its image suffix: ``case_001.nii.gz`` -> ``case_001`` (and a
    segmentation's: ``organs.seg.nrrd`` -> ``organs``)."""
    name = path.name
    for suffix in _SKIP_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_image_file(path: Path) -> bool:
    name = path.name.lower()
    if name.startswith(".") or any(name.endswith(s) for s in _SKIP_SUFFIXES):
        return False
    return path.is_file() and any(name.endswith(s) for s in IMAGE_SUFFIXES)


def is_dicom_series_dir(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        folder = sitk_path(path)
    except ImageError:
        return False  # the files in it are listed (and refused by name) on their own
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns for every folder without DICOM
    try:
        return bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


#: Sub-folders of a dataset that hold its labels, never images to annotate: an MSD / nnU-Net dataset's
#: ``labelsTr``/``labelsTs`` and an export's ``segmentations`` (Slicer ``.seg.nrrd`` files). Never read.
LABEL_FOLDERS = ("labelsTr", "labelsTs", "segmentations")
#: The image folders of an MSD / nnU-Net dataset: a folder holding one of them is read only there.
MSD_IMAGE_FOLDERS = ("imagesTr", "imagesTs")


def _named(folder: Path, names: Sequence[str]) -> bool:
    return folder.name.lower() in {n.lower() for n in names}


def msd_image_folders(folder: Path) -> List[Path]:
    """``imagesTr`` and ``imagesTs`` of ``folder`` when it is an MSD / nnU-Net dataset (an earlier
    export too); empty otherwise."""
    try:
        children = sorted(c for c in folder.iterdir() if c.is_dir())
    except OSError:
        return []
    return [c for c in children if _named(c, MSD_IMAGE_FOLDERS)]


def find_sources(
    source: Path,
    recursive: bool = True,
    skip: Optional[Path] = None,
    passed_over: Optional[List[Tuple[Path, str]]] = None,
) -> List[Tuple[Path, str]]:
    """``(path, display name)`` of every image below ``source``, sorted by path.

    ``source`` may be one image file, one DICOM series folder, or a folder holding image files and
    DICOM series folders (searched recursively when ``recursive``). Labels are never imported as
    images, at any depth: a folder holding ``imagesTr`` or ``imagesTs`` (an MSD / nnU-Net dataset, or
    an earlier ``learn export``) is read only there, and folders named ``labelsTr``, ``labelsTs`` or
    ``segmentations`` are not entered. The folder ``skip`` (a datastore inside ``source``, whose files
    are not images to annotate) is not entered. ``passed_over`` (when given) receives each folder
    not read, with the reason, for the caller to show.
    """
    source = Path(source)
    if source.is_file():
        return [(source, image_stem(source))]
    if not source.is_dir():
        raise FileNotFoundError(f"nothing to import: {source} is neither a file nor a folder")
    skipped = None if skip is None else skip.resolve()
    seen: Set[Tuple[int, int]] = set()
    passed = passed_over if passed_over is not None else []
    found = _scan(source, recursive, skipped, seen, passed)
    return sorted(found, key=lambda item: str(item[0]))


def _scan(
    folder: Path,
    recursive: bool,
    skip: Optional[Path],
    seen: Set[Tuple[int, int]],
    passed: List[Tuple[Path, str]],
) -> List[Tuple[Path, str]]:
    """The images in ``folder`` (and below). ``seen``: the folders (device, inode) scanned already, so
    a folder reached again through a symbolic link (to an ancestor: a loop; or to a sibling) is
    not scanned again, and each image is found once. A dataset folder (``imagesTr``/``imagesTs``) is
    read only there, at any depth; label folders are never entered (``passed`` names them)."""
    info = folder.stat()
    if (info.st_dev, info.st_ino) in seen:
        return []
    seen.add((info.st_dev, info.st_ino))
    dataset = msd_image_folders(folder)
    if dataset:  # an MSD / nnU-Net dataset or an export: its images folders only, never its labels
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child not in dataset and (
                skip is None or child.resolve() != skip
            ):
                passed.append((child, _why_not_read(child)))
        found: List[Tuple[Path, str]] = []
        for images in dataset:  # the dataset folder given itself, or met while recursing
            found.extend(_scan(images, recursive, skip, seen, passed))
        return found
    found = []
    if is_dicom_series_dir(folder):
        found.append((folder, folder.name))
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if is_image_file(child):
            found.append((child, image_stem(child)))
        elif child.is_dir() and recursive and (skip is None or child.resolve() != skip):
            if _named(child, LABEL_FOLDERS):
                passed.append((child, _why_not_read(child)))
                continue
            found.extend(_scan(child, recursive, skip, seen, passed))
    return found


def _why_not_read(folder: Path) -> str:
    if _named(folder, LABEL_FOLDERS):
        return "labels, not images to annotate"
    return "beside the imagesTr/imagesTs of a dataset, which alone are read"
