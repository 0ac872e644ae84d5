"""Finding the images to import in a folder: single-file images and DICOM series folders. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Set, Tuple

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


def find_sources(source: Path, recursive: bool = True, skip: Optional[Path] = None) -> List[Tuple[Path, str]]:
    """``(path, display name)`` of every image below ``source``, sorted by path.

    ``source`` may be one image file, one DICOM series folder, or a folder holding image files and
    DICOM series folders (searched recursively when ``recursive``). For an MSD-style dataset folder
    only ``imagesTr`` and ``imagesTs`` are read, so its labels are not imported as images. The
    folder ``skip`` (a datastore inside ``source``, whose files are not images to annotate) is not
    entered.
    """
    source = Path(source)
    if source.is_file():
        return [(source, image_stem(source))]
    if not source.is_dir():
        raise FileNotFoundError(f"nothing to import: {source} is neither a file nor a folder")
    msd = [source / d for d in ("imagesTr", "imagesTs") if (source / d).is_dir()]
    roots = msd or [source]
    found: List[Tuple[Path, str]] = []
    skipped = None if skip is None else skip.resolve()
    seen: Set[Tuple[int, int]] = set()
    for root in roots:
        found.extend(_scan(root, recursive, skipped, seen))
    return sorted(found, key=lambda item: str(item[0]))


def _scan(folder: Path, recursive: bool, skip: Optional[Path], seen: Set[Tuple[int, int]]) -> List[Tuple[Path, str]]:
    """The images in ``folder`` (and below). ``seen``: the folders (device, inode) scanned already, so
    a folder reached again through a symbolic link (to an ancestor: a loop; or to a sibling) is
    not scanned again, and each image is found once."""
    info = folder.stat()
    if (info.st_dev, info.st_ino) in seen:
        return []
    seen.add((info.st_dev, info.st_ino))
    found: List[Tuple[Path, str]] = []
    if is_dicom_series_dir(folder):
        found.append((folder, folder.name))
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if is_image_file(child):
            found.append((child, image_stem(child)))
        elif child.is_dir() and recursive and (skip is None or child.resolve() != skip):
            found.extend(_scan(child, recursive, skip, seen))
    return found
