"""Finding the images to import in a folder: single-file images and DICOM series folders. Torch-free."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import SimpleITK as sitk

from SegAssistLib.errors import ImageError
from SegAssistLib.files import sitk_path
from SegAssistLib.learning.errors import DatastoreError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# Files that hold segmentations or sidecar data, not images to annotate.
_SKIP_SUFFIXES = (".seg.nrrd", ".seg.nhdr")
#: The name endings of a label map stored beside its image: ``<stem>_label`` (and the others) is the
#: label map of the image ``<stem>`` or ``<stem>_image`` in the same folder, or of the DICOM series
#: folder ``<stem>`` beside it (case ignored). ``_gt``: ACDC's ``patient001_frame01_gt``.
LABEL_MAP_ENDINGS = ("_label", "_labels", "_seg", "_mask", "_segmentation", "_gt")
#: The name endings an image may carry beside its label map: ``case_image`` beside ``case_label``.
IMAGE_ENDINGS = ("", "_image")
# a label-map name, its ending after ``_`` or ``-`` (BraTS 2023: ``BraTS-GLI-00000-000-seg``)
_LABEL_MAP_NAME = re.compile(
    r"^(?P<base>.+)(?P<sep>[_-])(?:" + "|".join(e[1:] for e in LABEL_MAP_ENDINGS) + r")$", re.IGNORECASE
)
# KiTS's ``segmentation`` beside ``imaging``, LiTS's ``segmentation-N`` beside ``volume-N``
_SEGMENTATION_NAME = re.compile(r"^segmentation(?P<tail>[-_].+)?$", re.IGNORECASE)
_SEGMENTED_IMAGE_NAMES = ("imaging", "volume")
# nnU-Net's per-channel image file ``<case>_NNNN`` (channel NNNN of the case ``<case>``)
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>[0-9]{4})$")


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


def label_map_image(path: Path, images: Sequence[Path], folders: Optional[Sequence[Path]] = None) -> Optional[Path]:
    """The image of ``images`` (files of the same folder) whose label map ``path`` is by its name, or
    None. ``<stem>_label``, ``_labels``, ``_seg``, ``_mask``, ``_segmentation`` or ``_gt`` (any image
    suffix; ``-`` for ``_`` too) is the label map of ``<stem>`` or ``<stem>_image`` beside it, else of
    an image ``<stem>_<anything>`` beside it that is not itself so named (BraTS: ``<id>_seg`` beside
    ``<id>_flair``, ``<id>_t1``), else of a DICOM series folder ``<stem>`` beside it (of ``folders``,
    the folders beside it; None: looked up). ``segmentation`` and ``segmentation-N`` are the label
    maps of ``imaging`` (KiTS) and ``volume-N`` (LiTS) beside them. Case ignored.
    ``hippocampus_001_label.nii.gz`` is the label map of ``hippocampus_001_image.nii.gz``,
    ``ct_seg.nii.gz`` that of the series folder ``ct``; ``brain_mask.nii.gz`` alone is an image."""
    others = [image for image in images if image != path]
    stem = image_stem(path).lower()
    kits = _SEGMENTATION_NAME.match(stem)
    if kits is not None:
        wanted = {name + (kits.group("tail") or "") for name in _SEGMENTED_IMAGE_NAMES}
        image = next((image for image in others if image_stem(image).lower() in wanted), None)
        if image is not None:
            return image
    named = _LABEL_MAP_NAME.match(stem)
    if named is None:
        return None
    base = named.group("base")
    wanted = {base + e for e in IMAGE_ENDINGS}
    image = next((image for image in others if image_stem(image).lower() in wanted), None)
    if image is None:
        prefix = base + named.group("sep")
        image = next((image for image in others if image_stem(image).lower().startswith(prefix)
                      and _LABEL_MAP_NAME.match(image_stem(image)) is None), None)
    if image is not None:
        return image
    if folders is None:
        try:
            folders = [f for f in path.parent.iterdir() if f.is_dir()]
        except OSError:
            return None
    series = sorted(f for f in folders if f.name.lower() == base)
    return next((folder for folder in series if is_dicom_series_dir(folder)), None)


def nnunet_channel_files(folder: Path, images: Sequence[Path]) -> Dict[Path, Tuple[str, int]]:
    """``path -> (case, channel)`` of the image files of ``folder`` (an ``imagesTr``/``imagesTs``) when
    they are in nnU-Net's per-channel naming, ``<case>_0000``, ``<case>_0001``...; empty when not.

    They are when every file is so named and every case has the same channels 0..n-1, as nnU-Net
    requires, and the case names are names: the labels folder beside (``labelsTr``/``labelsTs``), if
    it holds any, names cases (``<case>``) and no channel file; without labels, at least two cases
    (an export whose cases happen to be named ``scan_0000``, ``scan_0001``... is one "case" of many
    channels, and stays as it is)."""
    found: Dict[Path, Tuple[str, int]] = {}
    channels: Dict[str, Set[int]] = {}
    for image in images:
        match = _CHANNEL_FILE.match(image_stem(image))
        if match is None:
            return {}
        case, channel = match.group("case"), int(match.group("channel"))
        found[image] = (case, channel)
        channels.setdefault(case, set()).add(channel)
    sets = {frozenset(c) for c in channels.values()}
    if len(sets) != 1 or next(iter(sets)) != frozenset(range(len(next(iter(sets))))):
        return {}
    labels = _label_stems(folder)
    if labels:
        named = any(case.lower() in labels for case in channels)
        if not named or any(image_stem(image).lower() in labels for image in found):
            return {}
    elif len(channels) < 2:
        return {}
    return found


def _label_stems(images_folder: Path) -> Set[str]:
    """The names (lower case, no suffix) of the files in the labels folder beside an MSD / nnU-Net
    images folder (``imagesTr`` -> ``labelsTr``, ``imagesTs`` -> ``labelsTs``); empty when none."""
    labels = images_folder.parent / ("labels" + images_folder.name[len("images"):])
    try:
        return {image_stem(f).lower() for f in labels.iterdir() if is_image_file(f)}
    except OSError:
        return set()


def _label_source_reason(source: Path) -> Optional[str]:
    """Why ``source``, given itself to import, holds labels rather than images to annotate (None: it
    does not): a label folder (``labelsTr``, ``labelsTs``, ``segmentations``) or a Slicer segmentation
    file. Any other file given alone is taken as the image it was named as, a label-map name included."""
    if source.is_dir():
        return f"it is a folder of labels ({source.name})" if _named(source, LABEL_FOLDERS) else None
    if any(source.name.lower().endswith(s) for s in _SKIP_SUFFIXES):
        return "it is a Slicer segmentation"
    return None


class LabelSourceError(DatastoreError):
    """The source given to import is a label folder or label file, not images to annotate."""


class _ScanRules(NamedTuple):
    """What a scan takes: below sub-folders too, a folder never entered (resolved), label-map files too,
    the channel whose file an nnU-Net case is imported from."""

    recursive: bool
    skip: Optional[Path]
    include_label_maps: bool
    channel: int = 0


def find_sources(
    source: Path,
    recursive: bool = True,
    skip: Optional[Path] = None,
    passed_over: Optional[List[Tuple[Path, str]]] = None,
    include_label_maps: bool = False,
    channel: int = 0,
) -> List[Tuple[Path, str]]:
    """``(path, display name)`` of every image below ``source``, sorted by path.

    ``source`` may be one image file, one DICOM series folder, or a folder holding image files and
    DICOM series folders (searched recursively when ``recursive``). Labels are not imported as images,
    at any depth: a folder holding ``imagesTr`` or ``imagesTs`` (an MSD / nnU-Net dataset, or an earlier
    ``learn export``) is read only there; folders named ``labelsTr``, ``labelsTs`` or ``segmentations``
    are not entered; ``.seg.nrrd`` files are not images; and a file that is by its name the label map of
    an image file or DICOM series folder in the same folder (:func:`label_map_image`) is passed over,
    unless ``include_label_maps``. A ``source`` that is itself a label folder or a ``.seg.nrrd`` is
    refused (:class:`LabelSourceError`), unless ``include_label_maps``; any other file given alone is
    taken. The folder ``skip`` (a datastore
    inside ``source``, whose files are not images to annotate) is not entered. An ``imagesTr``/``imagesTs``
    in nnU-Net's per-channel naming (:func:`nnunet_channel_files`) gives one image per case, named
    ``<case>``: the file of ``channel`` (a patient's channels never become cases, and subjects, of their
    own). ``passed_over`` (when given) receives each folder, label-map file and other channel's file not
    read, with the reason, for the caller to show.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"nothing to import: {source} is neither a file nor a folder")
    reason = None if include_label_maps else _label_source_reason(source)
    if reason is not None:
        raise LabelSourceError(
            f"cannot import {source}: {reason}, not images to annotate. Import the images it labels (of an MSD "
            "dataset: its folder or its imagesTr), or add --include-label-maps to annotate it as an image"
        )
    if source.is_file():
        return [(source, image_stem(source))]
    if not source.is_dir():
        raise FileNotFoundError(f"nothing to import: {source} is neither a file nor a folder")
    skipped = None if skip is None else skip.resolve()
    seen: Set[Tuple[int, int]] = set()
    passed = passed_over if passed_over is not None else []
    found = _scan(source, _ScanRules(recursive, skipped, include_label_maps, channel), seen, passed)
    return sorted(found, key=lambda item: str(item[0]))



def _scan(
    folder: Path,
    rules: _ScanRules,
    seen: Set[Tuple[int, int]],
    passed: List[Tuple[Path, str]],
) -> List[Tuple[Path, str]]:
    """The images in ``folder`` (and below). ``seen``: the folders (device, inode) scanned already, so
    a folder reached again through a symbolic link (to an ancestor: a loop; or to a sibling) is
    not scanned again, and each image is found once. A dataset folder (``imagesTr``/``imagesTs``) is
    read only there, at any depth; label folders are never entered, label-map files beside their
    image not taken (``passed`` names them)."""
    info = folder.stat()
    if (info.st_dev, info.st_ino) in seen:
        return []
    seen.add((info.st_dev, info.st_ino))
    dataset = msd_image_folders(folder)
    if dataset:  # an MSD / nnU-Net dataset or an export: its images folders only, never its labels
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith(".") and child not in dataset and (
                rules.skip is None or child.resolve() != rules.skip
            ):
                passed.append((child, _why_not_read(child)))
        found: List[Tuple[Path, str]] = []
        for images in dataset:  # the dataset folder given itself, or met while recursing
            found.extend(_scan(images, rules, seen, passed))
        return found
    found = []
    if is_dicom_series_dir(folder):
        found.append((folder, folder.name))
    children = [child for child in sorted(folder.iterdir()) if not child.name.startswith(".")]
    images = [child for child in children if is_image_file(child)]
    folders = [child for child in children if child.is_dir()]
    channel_of = nnunet_channel_files(folder, images) if _named(folder, MSD_IMAGE_FOLDERS) else {}
    for child in children:
        if child in channel_of:
            case, channel = channel_of[child]
            if channel == rules.channel:
                found.append((child, case))
            else:
                passed.append((child, f"channel {channel} of the nnU-Net case {case}, imported once, from its "
                               f"channel {rules.channel} file ({case}_{rules.channel:04d})"))
        elif child in images:
            image = None if rules.include_label_maps else label_map_image(child, images, folders)
            if image is not None:
                passed.append((child, f"the label map of {image.name} beside it, not an image to annotate; "
                               "--include-label-maps imports it"))
                continue
            found.append((child, image_stem(child)))
        elif child.is_dir() and rules.recursive and (rules.skip is None or child.resolve() != rules.skip):
            if _named(child, LABEL_FOLDERS):
                passed.append((child, _why_not_read(child)))
                continue
            found.extend(_scan(child, rules, seen, passed))
    return found


def _why_not_read(folder: Path) -> str:
    if _named(folder, LABEL_FOLDERS):
        return "labels, not images to annotate"
    return "beside the imagesTr/imagesTs of a dataset, which alone are read"
