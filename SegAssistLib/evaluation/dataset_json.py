"""What ``segassist eval`` and ``segassist bench`` say about a dataset folder's ``dataset.json`` labels.

:func:`~SegAssistLib.datasets.dataset_targets` passes over every ``labels`` entry that is neither MSD's
``"1": "liver"``, nnU-Net v2's ``"liver": 1`` nor an nnU-Net region: per-case label tables and notes
(``"see": "class_map.json"``) belong there. Some entries passed over were meant as labels, though
(``" 1": "liver"`` with a stray space, ``"liver": 1.0`` written as a float, ``"liver": "1"`` as
text): a structure then went unevaluated without a word, or the error said only that no labels
were found. This module names them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from SegAssistLib.datasets import _labels_of, dataset_targets, whole
from SegAssistLib.errors import SegAssistError

_NUMBER = re.compile(r"^\s*[+-]?\d+(\.\d*)?\s*$")  # " 1", "1.0", "+2": a label id typed loosely
LABEL_FORMS = 'MSD "1": "liver" or nnU-Net "liver": 1'


def _shown(key: str, value: object) -> str:
    return f"{json.dumps(key)}: {json.dumps(value)}"


def _why_passed_over(key: str, value: object) -> Optional[str]:
    """Why an entry that looks like a label is not one (None: it is a label, a region, or plainly no
    label, such as a note or a per-case table)."""
    if isinstance(value, str):
        if key.isascii() and key.isdigit():
            return None  # MSD: id -> name
        if _NUMBER.match(key) or key.strip().isdigit():
            return "a label id is written with the digits 0-9 alone, no spaces, signs or decimals"
        if _NUMBER.match(value):
            return "a label value is a number, not text"
        return None
    if isinstance(value, float):
        if math.isfinite(value) and value == int(value):
            return f"a label value is a whole number: {int(value)}, not {value}"
        return "a label value is a whole number"
    return None


def passed_over_labels(folder: Union[str, Path]) -> List[str]:
    """The entries of ``folder/dataset.json``'s ``labels`` that look like labels but are passed over,
    each as ``"key": value (why)``; empty where there are none or the file cannot be read."""
    path = Path(folder) / "dataset.json"
    try:
        labels = _labels_of(path) if path.is_file() else {}
    except SegAssistError:
        return []
    notes = []
    for key, value in labels.items():
        if key == "ignore" and whole(value):
            continue
        why = _why_passed_over(key, value)
        if why:
            notes.append(f"{_shown(key, value)} ({why})")
    return notes


def passed_over_warning(folder: Union[str, Path]) -> Optional[str]:
    """A ``warning:`` line naming the label-like entries of ``dataset.json`` left out (None: none)."""
    notes = passed_over_labels(folder)
    if not notes:
        return None
    return (f"warning: {Path(folder) / 'dataset.json'}: labels entr{'ies' if len(notes) > 1 else 'y'} passed over, "
            f"not evaluated: {'; '.join(notes)}")


def named_targets(folder: Union[str, Path]) -> Dict[Tuple[int, ...], str]:
    """:func:`~SegAssistLib.datasets.dataset_targets`, whose error, when the file names no usable label,
    also names the entries that were meant as labels and why each was passed over."""
    try:
        return dataset_targets(Path(folder))
    except SegAssistError as exc:
        notes = passed_over_labels(folder)
        if not notes or "names no numeric labels" not in str(exc):
            raise
        path = Path(folder) / "dataset.json"
        raise SegAssistError(f"{path} names no numeric labels at its top level; passed over: {'; '.join(notes)}: "
                             f"write each label as {LABEL_FORMS}, or pass --labels") from None
