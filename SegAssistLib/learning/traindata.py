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
place of cases, each held out with all its cases, and a subject with any case a stored version was
trained on never validates, even when that case has since left the usable set (the trainer looks up
the subjects of every trained-on case still in the store). ``max_val`` still counts cases: subjects
validate in rank order while their cases fit in it (so it bounds the validation's cost whatever a
subject holds; the first that does not fit ends the validation set, so the split stays stable), and
``min_val`` counts subjects (the units the validation score averages over); a split that cannot hold
``min_val`` subjects within ``max_val`` cases is refused, naming what to change.
A case without a subject is its own subject, with the number it always had: a store without subjects
splits as before.

Memory: a run holds its cases in memory from loading to the end. :func:`fit_in_memory` keeps the
training cases within a budget once the validation cases are counted, the most recently submitted
first; the cost of each case is estimated before it is read (:func:`training_bytes`,
:func:`validation_bytes`), from the shape the store recorded and, for a validation case, the pixel
type in its image file's header.

Torch-free at import (``active`` uses it); ``SegAssistLib.training`` is imported when training.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from SegAssistLib.image import Volume, guess_modality
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.records import CaseRecord, LabelVersion

if TYPE_CHECKING:
    from SegAssistLib.training.data import TrainCase

HOLDOUT_SALT = "segassist-holdout-v1"
SUBJECT_KEY = "subject:"  # before a subject's name in its key (an image's key is a hex content hash)
TARGET = (1,)
TRAIN_BYTES_PER_VOXEL = 6  # a training case as held: its image as float32 and its target as int16 (TrainCase)
NAMES_SHOWN = 5  # cases a message names, before "and N more"


def holdout_number(case_id: str, salt: str = HOLDOUT_SALT) -> float:
    """The case's fixed number in [0, 1) that decides its split."""
    digest = hashlib.sha256(f"{salt}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / float(1 << 64)


def named_cases(names: Sequence[str], shown: int = NAMES_SHOWN) -> str:
    """Case names for a message: the first ``shown``, then how many more."""
    listed = ", ".join(repr(n) for n in names[:shown])
    return listed + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_enough_cases(n_cases: int, too_small: Sequence[str] = ()) -> None:
    """Training needs two labelled cases: one to learn from, one to validate on. ``too_small``: the
    names of the submitted cases left out because their label holds fewer than ``MIN_TARGET_VOXELS``
    voxels (of the label value learned), named in the refusal."""
    if n_cases >= 2:
        return
    from SegAssistLib.training.data import MIN_TARGET_VOXELS  # torch: only to refuse
    left_out = (
        f"; left out, their label holding fewer than {MIN_TARGET_VOXELS} voxels: {named_cases(too_small)}"
        if too_small else ""
    )  # fmt: skip
    raise TrainingError(
        f"training needs at least 2 submitted cases whose label holds at least {MIN_TARGET_VOXELS} voxels of the "
        f"structure (one to learn from, one to validate on); the datastore has {n_cases}{left_out} (when one "
        f"label value is learned, --label-value, only the voxels of that value count)"
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
    ``subjects``: each case's subject (missing or None: its own), for the cases given and for the
    ``trained_on`` cases that are not given (no longer usable): their subjects never validate either.
    ``min_val`` counts subjects, ``max_val`` cases (see :func:`_validation_subjects`)."""
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
    trained_subjects = {SUBJECT_KEY + s for c in trained if (s := subjects.get(c)) is not None}
    ranked = [
        g for g in sorted(groups, key=lambda g: (number[g], min(groups[g])))
        if not trained.intersection(groups[g]) and g not in trained_subjects
    ]  # fmt: skip
    chosen = _validation_subjects(ranked, groups, number, fraction, min_val, max_val)
    n_val = max(len(chosen), min_val)
    if len(chosen) < min_val and n_val < len(groups):
        if len(chosen) < len(ranked):  # the next subject in line does not fit in what max_val leaves
            raise TrainingError(
                f"max_val_cases is {max_val}, but at least {min_val} subject(s) must validate, each with all its "
                f"cases: {len(chosen)} fitted ({sum(len(groups[g]) for g in chosen)} cases) and the next in line "
                f"holds {len(groups[ranked[len(chosen)]])} cases; give a larger max_val_cases"
            )
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
    val = {c for g in chosen for c in groups[g]}
    return [c for c in ids if c not in val], [c for c in ids if c in val]


def _validation_subjects(
    ranked: Sequence[str], groups: Mapping[str, List[str]], number: Mapping[str, float], fraction: float,
    min_val: int, max_val: int,
) -> List[str]:
    """The subjects that validate: the ranked ones from the first on, while each is drawn below
    ``fraction`` or fewer than ``min_val`` are taken, and up to the first whose cases would take the
    total past ``max_val`` (never one after it: so a subject that grows never lets a later one in,
    and the split stays stable). A subject is never split, so ``max_val`` bounds the validation's
    cases, its cost; ``min_val`` counts subjects, the units its score averages over. Without subjects
    (one case each) this is the first ``max(below, min_val)`` ranked, as it always was."""
    chosen: List[str] = []
    cases = 0
    for g in ranked:
        wanted = number[g] < fraction or len(chosen) < min_val
        if not wanted or cases + len(groups[g]) > max_val:
            break
        chosen.append(g)
        cases += len(groups[g])
    return chosen


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


def usable_and_too_small(
    store: Datastore, label_value: Optional[int] = None
) -> Tuple[List[Tuple[CaseRecord, LabelVersion]], List[CaseRecord]]:
    """:func:`usable_cases`, and the submitted cases left out because their label holds fewer than
    ``MIN_TARGET_VOXELS`` voxels (of ``label_value``), in import order."""
    from SegAssistLib.training.data import MIN_TARGET_VOXELS

    usable, too_small = [], []
    for case, label in store.training_cases():
        enough = label.n_foreground >= MIN_TARGET_VOXELS
        if enough and label_value is not None:
            enough = int(foreground(store.load_label(label.id), label_value).sum()) >= MIN_TARGET_VOXELS
        (usable if enough else too_small).append((case, label))
    return usable, [case for case, _ in too_small]


def usable_cases(
    store: Datastore, label_value: Optional[int] = None
) -> List[Tuple[CaseRecord, LabelVersion]]:
    """Submitted and reviewed cases whose latest submitted label has enough foreground to learn from."""
    return usable_and_too_small(store, label_value)[0]


# ---------------------------------------------------------------------------------------- memory


def voxels(case: CaseRecord) -> int:
    return int(np.prod([int(n) for n in case.shape], dtype=np.int64))


def training_bytes(case: CaseRecord) -> int:
    """What a training case holds for the whole run: its image as float32 and its target as int16."""
    return voxels(case) * TRAIN_BYTES_PER_VOXEL


def validation_bytes(store: Datastore, case: CaseRecord) -> int:
    """What a validation case holds for the whole run: its image as stored (the pixel type read from the
    file's header, 8 bytes a voxel when it cannot be read) and its target as bool."""
    return voxels(case) * (_stored_itemsize(store, case) + 1)


def _stored_itemsize(store: Datastore, case: CaseRecord) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(store.image_path(case.id)))
    try:
        reader.ReadImageInformation()
        probe = sitk.Image([1, 1, 1], reader.GetPixelID(), reader.GetNumberOfComponents())
        return int(sitk.GetArrayViewFromImage(probe).dtype.itemsize) * reader.GetNumberOfComponents()
    except RuntimeError:  # missing or unreadable: loading it says so; counted at the most a voxel takes
        return 8


def fit_in_memory(
    pairs: Sequence[Tuple[CaseRecord, LabelVersion]], room: int
) -> Tuple[List[Tuple[CaseRecord, LabelVersion]], List[Tuple[CaseRecord, LabelVersion]]]:
    """``(kept, left out)``, each in the order given: the training cases whose :func:`training_bytes`
    fit in ``room`` bytes, taken from the most recently submitted label back (a case too large for
    what is left is passed over, and older, smaller ones may still fit)."""
    kept = set()
    for i in sorted(range(len(pairs)), key=lambda i: (pairs[i][1].created_at, i), reverse=True):
        cost = training_bytes(pairs[i][0])
        if cost <= room:
            kept.add(i)
            room -= cost
    return [p for i, p in enumerate(pairs) if i in kept], [p for i, p in enumerate(pairs) if i not in kept]


def load_labelled(
    store: Datastore, pairs: Sequence[Tuple[CaseRecord, LabelVersion]], label_value: Optional[int] = None
) -> List[LabelledCase]:
    out = []
    for case, label in pairs:
        volume = store.load_image(case.id)
        target = foreground(store.load_label(label.id), label_value)
        out.append(LabelledCase(case, label, volume, target))
    return out
