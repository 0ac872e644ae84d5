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
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

from SegAssistLib.errors import SegAssistError

REPO_ROOT = Path(__file__).resolve().parents[1]


def dataset_labels(folder: Path) -> Dict[int, str]:
    """The named, numeric, non-background labels of a dataset folder's ``dataset.json``, by id;
    SegAssistError naming the file when it is missing, not JSON, or names none."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise SegAssistError(f"{path} not found: pass --labels")
    try:
        labels = json.loads(path.read_text()).get("labels", {})
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise SegAssistError(f"{path} is not a dataset.json (a JSON object with 'labels'): {exc}") from exc
    if not isinstance(labels, dict):
        raise SegAssistError(f"{path}: 'labels' must map label ids to names")
    out = {int(k): v for k, v in labels.items() if k.isascii() and k.isdigit() and int(k) > 0 and isinstance(v, str)}
    if not out:
        raise SegAssistError(f"{path} names no numeric labels at its top level: pass --labels")
    return dict(sorted(out.items()))


def default_data_root() -> Path:
    """``$SEGASSIST_SHARED_DATA``, else ``../shared/data`` next to the repository (not the current folder)."""
    return Path(os.environ.get("SEGASSIST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

REPO_ROOT = Path(__file__).resolve().parents[1]
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


def list_cases(dataset_dir: Union[str, Path], channel: int = 0) -> List[Case]:
    """Cases that have both an image (channel ``channel`` for multi-channel cases) and a label."""
    root = Path(dataset_dir)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise SegAssistError(f"{root} is not a dataset folder: it needs imagesTr/ and labelsTr/")
    labels: Dict[str, Path] = {}
    for path in labels_dir.iterdir():
        stem = _strip_suffix(path.name)
        if stem is not None and not path.name.startswith("."):
            labels[stem] = path
    cases = []
    for path in sorted(images_dir.iterdir()):
        stem = _strip_suffix(path.name)
        if stem is None or path.name.startswith("."):
            continue
        match = re.match(r"^(.*)_(\d{4})$", stem)
        inside = channel
        if match and match.group(1) in labels:
            if int(match.group(2)) != channel:
                continue
            stem, inside = match.group(1), None
        if stem in labels:
            cases.append(Case(root.name, stem, path, labels[stem], inside))
    return cases


def load_splits() -> Dict[str, List[str]]:
    """Evaluation cases per dataset name."""
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
