"""What a training job learns from and validates on: the datastore's submitted labels.

The hold-out split is deterministic and stable as the store grows. Each case gets a fixed
pseudo-random number ``u`` from a hash of its image's content hash (voxels and geometry, so the
same image is held out in every datastore it is imported into, whatever its random case id: two
stores, or a campaign's modes, validate on the same cases); the validation set is the (at most ``max_val``)
cases with the smallest ``u`` below ``fraction``, topped up to ``min_val`` with the next smallest.
Adding cases only pushes a case's rank down, so a case can move from validation into training
but never from training into validation (a store whose every case is held out that way is refused,
not split otherwise). Cases also leave the usable set (a reviewer rejects one, a draft reopens
it), which would move the next-ranked case, perhaps one a version was trained on, into
validation: a case any stored version was trained on (``trained_on``) is never chosen to
validate. So a promoted version was never trained on a case that now validates its successor.
(The incumbent is also re-scored on today's validation cases in the same run as the candidate,
so the comparison is always like with like.)

Subjects: cases of one patient (ACDC's two frames, follow-up scans, several series of a study) are
near-duplicates, and one in training would inflate the validation Dice of the other. A case that
names a subject (``Datastore.subjects``) draws its number from the subject's name instead, so all
cases of a subject rank together and land on the same side; everything above holds with subjects in
place of cases (``min_val``/``max_val`` count subjects, each held out with all its cases), and a
subject with any case a stored version was trained on never validates. A case without a subject is
its own subject, with the number it always had: a store without subjects splits as before.

Torch-free at import (``active`` uses it); ``SegAssistLib.training`` is imported when training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from SegAssistLib.image import Volume, guess_modality
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.records import CaseRecord, LabelVersion

if TYPE_CHECKING:
    from SegAssistLib.training.data import TrainCase

HOLDOUT_SALT = "segassist-holdout-v1"
SUBJECT_KEY = "subject:"  # before a subject's name in its key (an image's key is a hex content hash)
TARGET = (1,)


def holdout_number(case_id: str, salt: str = HOLDOUT_SALT) -> float:
    """The case's fixed number in [0, 1) that decides its split."""
    digest = hashlib.sha256(f"{salt}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def check_enough_cases(n_cases: int) -> None:
    """Training needs two labelled cases: one to learn from, one to validate on."""
    if n_cases < 2:
        raise TrainingError(
            f"training needs at least 2 submitted cases with a non-empty label (one to learn from, one "
            f"to validate on); the datastore has {n_cases} (when one label value is learned, --label-value, "
            f"only the cases whose label holds enough voxels of that value count)"
        )


def subject_groups(
    case_ids: Sequence[str], subjects: Optional[Mapping[str, Optional[str]]] = None
) -> Dict[str, List[str]]:
    """The cases by subject, in the order given: a subject's cases under ``subject:<name>`` (the
    key its hold-out number is drawn from), a case without a subject alone under its id."""
    groups: Dict[str, List[str]] = {}
    for c in dict.fromkeys(case_ids):
        subject = (subjects or {}).get(c)
        groups.setdefault(SUBJECT_KEY + subject if subject is not None else c, []).append(c)
    return groups


def check_enough_subjects(
    case_ids: Sequence[str], subjects: Optional[Mapping[str, Optional[str]]] = None
) -> Dict[str, List[str]]:
    """:func:`subject_groups`, refused unless there are two: one subject to learn from, one to validate on."""
    groups = subject_groups(case_ids, subjects)
    if len(groups) < 2 and case_ids:
        raise TrainingError(
            f"training needs labelled cases of at least 2 subjects (one to learn from, one to validate on): "
            f"the {len(list(dict.fromkeys(case_ids)))} usable labelled cases all belong to subject "
            f"{(subjects or {}).get(case_ids[0])!r}; submit a case of another subject"
        )
    return groups


def holdout_split(
    case_ids: Sequence[str],
    fraction: float = 0.2,
    min_val: int = 1,
    max_val: int = 8,
    keys: Optional[Mapping[str, str]] = None,
    trained_on: Iterable[str] = (),
    subjects: Optional[Mapping[str, Optional[str]]] = None,
) -> Tuple[List[str], List[str]]:
    """``(training ids, validation ids)``, each in the order given. See the module docstring.

    ``keys``: what each case's number is drawn from (default: the id itself). ``trained_on``:
    cases an earlier version learned from, never chosen to validate, nor any case of their subjects.
    ``subjects``: each case's subject (missing or None: its own); ``min_val`` and ``max_val`` count
    subjects."""
    if not 0.0 <= fraction < 1.0:
        raise TrainingError(f"the validation fraction must be in [0, 1), got {fraction}")
    if min_val < 1 or max_val < min_val:
        raise TrainingError(f"need 1 <= min_val <= max_val, got {min_val}, {max_val}")
    ids = list(dict.fromkeys(case_ids))
    check_enough_cases(len(ids))
    subjects = subjects or {}
    groups = check_enough_subjects(ids, subjects)
    by_subject = any(subjects.get(c) is not None for c in ids)
    # a case without a subject keeps the number it always had (from its key): the split is unchanged
    number = {
        g: holdout_number(g if subjects.get(members[0]) is not None else (keys or {}).get(g, g))
        for g, members in groups.items()
    }
    trained = set(trained_on)
    ranked = [
        g for g in sorted(groups, key=lambda g: (number[g], min(groups[g])))
        if not trained.intersection(groups[g])
    ]  # fmt: skip
    below = [g for g in ranked if number[g] < fraction][:max_val]
    n_val = max(len(below), min_val)
    if n_val > len(ranked) and n_val < len(groups):
        if not by_subject:
            raise TrainingError(
                f"{len(ids) - len(ranked)} of the {len(ids)} usable labelled cases were trained on by an earlier "
                f"version, which would then validate its successor, and {len(ranked)} are left to validate on "
                f"(at least {min_val}): submit {n_val - len(ranked)} more case(s)"
            )
        raise TrainingError(
            f"{len(groups) - len(ranked)} of the {len(groups)} subjects of the {len(ids)} usable labelled cases "
            f"have a case an earlier version was trained on, which would then validate its successor (the "
            f"subject's other cases as near-duplicates of it), and {len(ranked)} are left to validate on (at "
            f"least {min_val}): submit cases of {n_val - len(ranked)} more subject(s)"
        )
    if n_val >= len(groups):
        # shrinking validation to leave one case to train on would train on a case that validates
        # once the store grows (the split would not be stable): wait for one more case instead
        if not by_subject:
            raise TrainingError(
                f"all {len(ids)} usable labelled cases are held out for validation (at least {min_val}, and "
                f"every case drawn below the validation fraction {fraction:g}): submit one more case to train on"
            )
        raise TrainingError(
            f"all {len(groups)} subjects of the {len(ids)} usable labelled cases are held out for validation, "
            f"each with all its cases (at least {min_val}, and every subject drawn below the validation fraction "
            f"{fraction:g}): submit a case of one more subject to train on"
        )
    val = {c for g in ranked[:n_val] for c in groups[g]}
    return [c for c in ids if c not in val], [c for c in ids if c in val]


def foreground(labels: np.ndarray, label_value: Optional[int] = None) -> np.ndarray:
    """The structure being learned: every labelled voxel, or those of one label value."""
    return labels > 0 if label_value is None else labels == int(label_value)


@dataclass
class LabelledCase:
    """A case with its image and target mask, ready for training (``train_case``) or validation."""

    case: CaseRecord
    label: LabelVersion
    volume: Volume
    target: np.ndarray  # bool, array order

    def train_case(self) -> TrainCase:
        from SegAssistLib.training.data import TrainCase

        return TrainCase(
            name=self.case.name,
            image=np.asarray(self.volume.array, np.float32),
            labels=self.target.astype(np.int16),
            spacing_kji=tuple(float(s) for s in self.volume.spacing[::-1]),
            modality=guess_modality(self.volume),
            targets=[TARGET],
        )


def usable_cases(
    store: Datastore, label_value: Optional[int] = None
) -> List[Tuple[CaseRecord, LabelVersion]]:
    """Submitted and reviewed cases whose latest submitted label has enough foreground to learn from."""
    from SegAssistLib.training.data import MIN_TARGET_VOXELS

    out = []
    for case, label in store.training_cases():
        if label.n_foreground >= MIN_TARGET_VOXELS:
            out.append((case, label))
    if label_value is not None:
        out = [
            (c, lv) for c, lv in out
            if int(foreground(store.load_label(lv.id), label_value).sum()) >= MIN_TARGET_VOXELS
        ]
    return out


def load_labelled(
    store: Datastore, pairs: Sequence[Tuple[CaseRecord, LabelVersion]], label_value: Optional[int] = None
) -> List[LabelledCase]:
    out = []
    for case, label in pairs:
        volume = store.load_image(case.id)
        target = foreground(store.load_label(label.id), label_value)
        out.append(LabelledCase(case, label, volume, target))
    return out
