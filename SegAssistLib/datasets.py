"""Datasets in the MSD / nnU-Net layout and the fixed evaluation split. Torch-free.

A dataset folder holds ``imagesTr/<case>.nii.gz`` (or ``<case>_0000.nii.gz`` for multi-channel
cases), ``labelsTr/<case>.nii.gz`` and ``dataset.json``. The evaluation split lives in
``Resources/splits.json``: training never reads a case listed there. Cases of one patient (ACDC's
two frames, Sunnybrook's two phases) always fall on the same side.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from SegAssistLib.errors import SegAssistError

REPO_ROOT = Path(__file__).resolve().parents[1]


def _label_entries(path: Path) -> Dict[Tuple[int, ...], str]:
    """The named, non-background entries of ``dataset.json``'s ``labels`` by label ids, in the file's order:
    MSD's ``{"1": "liver"}`` and nnU-Net v2's ``{"liver": 1}`` are ``(1,)``; an nnU-Net v2 region
    (region-based training, ``{"whole tumour": [1, 2, 3]}``) is the union ``(1, 2, 3)``. Entries of
    neither kind (a note, per-case labels) and nnU-Net's ``"ignore"`` label are passed over; the first
    name of the same ids is kept."""
    if not path.is_file():
        raise SegAssistError(f"{path} not found: pass --labels")
    labels = _labels_of(path)
    out: Dict[Tuple[int, ...], str] = {}
    for key, value in labels.items():
        if key.isascii() and key.isdigit() and isinstance(value, str):  # MSD: id -> name
            ids, name = (int(key),), value
        elif whole(value):  # nnU-Net v2: name -> value ("ignore": voxels left unannotated, no structure)
            if key == "ignore":
                continue
            ids, name = (int(value),), key
        elif isinstance(value, list):  # nnU-Net v2 region: name -> the values it unites
            if not value or not all(whole(v) and v >= 0 for v in value):
                raise SegAssistError(f"{path}: label {key!r} is {json.dumps(value)}: an nnU-Net region lists "
                                     "label values (whole numbers, 0 or more), e.g. [1, 2, 3]")
            ids, name = tuple(sorted({int(v) for v in value if v > 0})), key
        else:
            continue
        if ids and min(ids) > 0 and ids not in out:
            out[ids] = name
    return out


def whole(value: object) -> bool:
    """A label value of ``dataset.json``: an int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _labels_of(path: Path) -> dict:
    """The ``labels`` object of a ``dataset.json`` (a UTF-8 byte order mark is allowed); SegAssistError
    naming the file when it cannot be read or is not a JSON object with a ``labels`` mapping."""
    try:
        labels = json.loads(path.read_text(encoding="utf-8-sig")).get("labels", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SegAssistError(f"{path} is not a dataset.json (a JSON object with 'labels'): {exc}") from exc
    if not isinstance(labels, dict):
        raise SegAssistError(f"{path}: 'labels' must map label ids to names (MSD) or names to label values (nnU-Net)")
    return labels


def dataset_ignore_label(folder: Union[str, Path]) -> Optional[int]:
    """The value of nnU-Net v2's ``"ignore"`` label in a dataset folder's ``dataset.json``
    (``{"ignore": 3}``: voxels left unannotated, neither a structure nor background), None where it names
    none or there is no readable ``dataset.json``. The evaluation leaves these voxels out of the metrics
    and of the simulated user's error regions, as nnU-Net does."""
    path = Path(folder) / "dataset.json"
    try:
        value = _labels_of(path).get("ignore") if path.is_file() else None
    except SegAssistError:
        return None
    return int(value) if whole(value) and value > 0 else None


def dataset_targets(folder: Path) -> Dict[Tuple[int, ...], str]:
    """The named, non-background targets of a dataset folder's ``dataset.json`` by label ids: each label
    (MSD's ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}``) by id, then each nnU-Net region
    (``{"whole tumour": [1, 2, 3]}``) as the union of its labels, in the file's order; SegAssistError
    naming the file when it is missing, not JSON, names none, or holds a region that lists no label values."""
    path = Path(folder) / "dataset.json"
    entries = _label_entries(path)
    if not entries:
        raise SegAssistError(f"{path} names no numeric labels at its top level: pass --labels")
    singles = sorted((ids, name) for ids, name in entries.items() if len(ids) == 1)
    return {**dict(singles), **{ids: name for ids, name in entries.items() if len(ids) > 1}}


def dataset_labels(folder: Path) -> Dict[int, str]:
    """The named, numeric, non-background labels of a dataset folder's ``dataset.json``, by id (MSD's
    ``{"1": "liver"}`` or nnU-Net v2's ``{"liver": 1}``; nnU-Net regions are :func:`dataset_targets`');
    SegAssistError naming the file when it is missing, not JSON, or names none."""
    path = Path(folder) / "dataset.json"
    targets = dataset_targets(folder)
    out = {ids[0]: name for ids, name in targets.items() if len(ids) == 1}
    if not out:
        regions = ", ".join(f"{'+'.join(map(str, ids))} ({name})" for ids, name in targets.items())
        raise SegAssistError(f"{path} names only nnU-Net regions, {regions}: pass them as --labels")
    return out


def default_data_root() -> Path:
    """``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` next to the repository (not the current folder)."""
    return Path(os.environ.get("SEGASSIST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def add_data_root_argument(parser) -> None:
    """``--data``, the datasets' folder (default :func:`default_data_root`), as every benchmark takes it."""
    parser.add_argument("--data", type=Path, default=default_data_root(),
                        help="the datasets' folder (default: $SEGASSIST_SHARED_DATA, else ../shared/data beside the "
                             "repository)")  # fmt: skip


SPLITS_FILE = REPO_ROOT / "Resources" / "splits.json"
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


@dataclass(frozen=True)
class Case:
    dataset: str
    name: str
    image: Path
    label: Path
    # the channel to take from inside the image file (a 4D or vector image); None when the channel
    # chose the file itself (``case_0001.nii.gz``)
    channel: Optional[int] = None

    @property
    def patient(self) -> str:
        return patient_of(self.name)


# cases of ../shared/data cut from one scan, whose names do not tell
SAME_SCAN = {"aorta_crop": "totalsegmentator_chest_ct", "pulmonary_crop": "totalsegmentator_chest_ct"}


def patient_of(case_name: str) -> str:
    """Group key: ACDC ``patient001_frame01`` -> ``patient001``; Sunnybrook ``SCD0000101_phase08`` ->
    ``SCD0000101``; crops of one scan (``SAME_SCAN``) -> the scan; otherwise the case name."""
    return SAME_SCAN.get(case_name) or re.sub(r"_(frame|phase)\d+$", "", case_name)


def _strip_suffix(name: str) -> Optional[str]:
    for suffix in _IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_dataset(folder: Path) -> bool:
    return (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir()


def dataset_folder_problem(dataset_dir: Union[str, Path]) -> Optional[str]:
    """Why ``dataset_dir`` is not a dataset folder (None: it has ``imagesTr/`` and ``labelsTr/``); for a
    folder that holds dataset folders (``../shared/data``) the reason names a few of them."""
    root = Path(dataset_dir)
    if _is_dataset(root):
        return None
    lacking = " or ".join(f"{name}/" for name in ("imagesTr", "labelsTr") if not (root / name).is_dir())
    text = f"{root} is not a dataset folder: it needs imagesTr/ and labelsTr/ (it has no {lacking})"
    try:
        inside = sorted(p.name for p in root.iterdir() if p.is_dir() and _is_dataset(p))
    except OSError:
        inside = []
    if inside:
        shown = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
        text += (f"; it holds {len(inside)} dataset folder{'s' if len(inside) > 1 else ''} ({shown}): "
                 f"pass one of them, e.g. {root / inside[0]}")
    return text


def _image_files(folder: Path) -> List[Tuple[str, Path]]:
    """``(name without suffix, path)`` of the image files of a folder, in name order (hidden files and
    other suffixes passed over)."""
    out = []
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path.name)
        if stem is not None and not path.name.startswith("."):
            out.append((stem, path))
    return out


def _channel_file(stem: str, labels: Dict[str, Path]) -> Optional[re.Match]:
    """The match ``(case, channel)`` of a labelled case's per-channel image name ``case_0000``."""
    match = re.match(r"^(.*)_(\d{4})$", stem)
    return match if match and match.group(1) in labels else None


def unpaired_files(dataset_dir: Union[str, Path]) -> Tuple[List[str], List[str]]:
    """The file names in ``imagesTr/`` that have no label in ``labelsTr/`` (a case's per-channel files
    ``case_0000...`` pair with the label ``case``), and those in ``labelsTr/`` that have no image: no
    list of cases holds them."""
    root = Path(dataset_dir)
    labels = dict(_image_files(root / "labelsTr"))
    paired, images = set(), []
    for stem, path in _image_files(root / "imagesTr"):
        match = _channel_file(stem, labels)
        case = match.group(1) if match else stem
        if case in labels:
            paired.add(case)
        else:
            images.append(path.name)
    return images, [path.name for stem, path in labels.items() if stem not in paired]


def list_cases(dataset_dir: Union[str, Path], channel: int = 0) -> List[Case]:
    """Cases that have both an image (channel ``channel`` for multi-channel cases) and a label; labelled
    cases that lack the channel's file are left out with a :class:`UserWarning` (the command lines
    print :func:`left_out_text` as a ``warning:`` line instead, see :func:`cases_and_left_out`)."""
    cases, lacking = cases_and_left_out(dataset_dir, channel)
    if lacking:  # said, not dropped in silence: a mean over fewer cases than the folder holds
        warnings.warn(left_out_text(dataset_dir, channel, lacking), stacklevel=2)
    return cases


def left_out_text(dataset_dir: Union[str, Path], channel: int, lacking: List[str]) -> str:
    """The notice on the labelled cases of a folder that have no file of channel ``channel``."""
    shown = ", ".join(lacking[:5]) + (", ..." if len(lacking) > 5 else "")
    return (f"{dataset_dir}: {len(lacking)} labelled case(s) have no channel {channel} file and are left out: "
            f"{shown}")


def cases_and_left_out(dataset_dir: Union[str, Path], channel: int = 0) -> Tuple[List[Case], List[str]]:
    """:func:`list_cases` without its warning: the cases, and the names of the labelled cases stored
    as per-channel files that have no file of channel ``channel`` (left out)."""
    root = Path(dataset_dir)
    problem = dataset_folder_problem(root)
    if problem:
        raise SegAssistError(problem)
    labels = dict(_image_files(root / "labelsTr"))
    cases = []
    channels = set()  # of the labelled cases' per-channel files (case_0000.nii.gz)
    per_channel = set()  # the labelled cases stored as per-channel files
    for stem, path in _image_files(root / "imagesTr"):
        match = _channel_file(stem, labels)
        inside = channel
        if match:
            channels.add(int(match.group(2)))
            per_channel.add(match.group(1))
            if int(match.group(2)) != channel:
                continue
            stem, inside = match.group(1), None
        if stem in labels:
            cases.append(Case(root.name, stem, path, labels[stem], inside))
    if not cases and channels:  # not "no cases": the channel asked for is not there
        names = ", ".join(str(c) for c in sorted(channels))
        raise SegAssistError(f"channel {channel} does not exist in {root}: its images have channel"
                             f"{'s' if len(channels) > 1 else ''} {names} (imagesTr/<case>_{min(channels):04d}...)")
    return cases, sorted(per_channel - {c.name for c in cases})


def load_splits() -> Dict[str, List[str]]:
    """Evaluation cases per dataset name."""
    from SegAssistLib.files import check_bundled

    check_bundled(SPLITS_FILE, "evaluation split")
    return json.loads(SPLITS_FILE.read_text())["evaluation"]


def split_cases(cases: List[Case], part: str) -> List[Case]:
    """``part`` is ``"evaluation"`` or ``"training"``; datasets absent from the split file are all
    evaluation (a new folder is never trained on by accident). A folder under another name that holds
    evaluation cases of exactly one known dataset is that dataset (a renamed copy would otherwise
    count as evaluation whole, training cases included). A case is evaluation when any case of its
    patient (:func:`patient_of`) is: one patient's cases never sit on both sides."""
    if part not in ("evaluation", "training"):
        raise ValueError(f"unknown split part {part!r}")
    splits = load_splits()
    names: Dict[str, set] = {}
    for case in cases:
        names.setdefault(case.dataset, set()).add(case.name)
    evaluation_of = {dataset: _evaluation_list(dataset, found, splits) for dataset, found in names.items()}
    patients_of = {d: None if e is None else {patient_of(n) for n in e} for d, e in evaluation_of.items()}
    out = []
    for case in cases:
        patients = patients_of[case.dataset]
        is_eval = True if patients is None else case.patient in patients
        if (part == "evaluation") == is_eval:
            out.append(case)
    return out


def _evaluation_list(dataset: str, names: set, splits: Dict[str, List[str]]) -> Optional[List[str]]:
    known = split_dataset(dataset, names, splits)
    return None if known is None else splits[known]


def split_dataset(dataset: str, names: set, splits: Optional[Dict[str, List[str]]] = None) -> Optional[str]:
    """The dataset of the split file whose split a folder named ``dataset`` holding the cases
    ``names`` follows (see :func:`split_cases`); None: none, every case is evaluation."""
    splits = load_splits() if splits is None else splits
    if dataset in splits:
        return dataset
    known = [name for name, evaluation in splits.items() if set(names) & set(evaluation)]
    return known[0] if len(known) == 1 else None
