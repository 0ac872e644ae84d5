"""Exporting the datastore: the MSD / nnU-Net layout and Slicer ``.seg.nrrd`` files. Torch-free.

An MSD export is a folder ``imagesTr/<name>.nii.gz``, ``labelsTr/<name>.nii.gz`` (optionally
``segmentations/<name>.seg.nrrd``) and ``dataset.json``. ``dataset.json`` carries, beside the MSD
keys, a ``segassist`` section with each case's label version, provenance and subject (the patient,
null when the case is its own: see ``Datastore.subjects``). A label version's ``n_interactions`` and
``seconds_spent`` are null where they are unknown (a mask saved without a prompt log or a count, a
time not measured), never 0: a script summing them must leave those cases out, not count them as
labels made in no prompt and no time.

Every file to export is checked against its recorded checksum before anything is written: a damaged
image or label stops the export naming its cases (``skip_damaged``: they are left out, each named,
and listed in ``dataset.json``). A target that is not empty, lies under a file, or lies inside the store
elsewhere than under its ``exports/`` is refused before anything is read.
The export is written in a hidden work folder and put in place when complete: an export that fails is
removed. One killed leaves that hidden folder; into a new target, nothing else, never a half export
under the target's name; into an existing empty folder, killed while its entries moved up (a few renames),
some entries beside the hidden folder, which still holds ``dataset.json`` (moved last): a next export
there names what the interrupted one left, as it does for a lone hidden folder. A
new target: the work folder is made beside it (``.<name>.exporting-<id>``) and renamed to it. An
existing empty folder (``.``, a link to a folder, a mount point): it stays as it is (its permissions,
owner and ACLs), the work folder is made inside it (``.exporting-<id>``) and its entries are moved up
into it, ``dataset.json`` last, the work folder then removed. A target that got entries of anyone's
during the export is refused then, nothing of theirs replaced, nothing of the export left.

File names come from case names, reduced to ``[A-Za-z0-9_-]`` (a case name may have come from a
client) and made unique with the case id when two cases share a name.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from SegAssistLib.files import atomic_write, atomic_write_bytes, fsync_dir, output_problem, sha256_file
from SegAssistLib.image import guess_modality
from SegAssistLib.io import load_mask, save_segmentation_nrrd
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.errors import CorruptDataError, DatastoreError
from SegAssistLib.learning.records import CaseRecord, CaseStatus, LabelVersion, iso_time, new_label_id

DEFAULT_EXPORT_STATUSES = (CaseStatus.SUBMITTED, CaseStatus.REVIEWED)
_SHOWN_DAMAGED = 5  # damaged cases a refusal names
_WORK_INSIDE = ".exporting-"  # the work folder's name inside an existing (empty) target, before its id
_DATASET_JSON = "dataset.json"  # moved into place last: an export that has it is whole


def safe_file_stem(name: str, fallback: str = "case") -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:64]
    return stem or fallback


def _unique_stems(cases: Sequence[CaseRecord]) -> Dict[str, str]:
    """A file stem per case, unique also ignoring case (macOS and Windows file systems): a name shared
    by several cases gets the case id, and any stem still taken a number after it."""
    stems = {c.id: safe_file_stem(c.name) for c in cases}
    counts: Dict[str, int] = {}
    for stem in stems.values():
        counts[stem.lower()] = counts.get(stem.lower(), 0) + 1
    taken, out = set(), {}
    for cid, stem in stems.items():
        wanted = stem if counts[stem.lower()] == 1 else f"{stem}_{cid}"
        candidate, n = wanted, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{wanted}_{n}"
        taken.add(candidate.lower())
        out[cid] = candidate
    return out


def _copy_checked(src: Path, digest: str, dest: Path, what: str) -> None:
    """Copy a stored file checked beforehand (:func:`_damage`); the copy's checksum is compared too, so
    a file changed since is not exported either."""
    copied = atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    if copied != digest:
        raise CorruptDataError(f"{what} changed during the export: it no longer matches its checksum")


def _file_problem(path: Path, digest: str, what: str) -> Optional[str]:
    if not path.is_file():
        return f"{what} is missing"
    if sha256_file(path) != digest:
        return f"{what} does not match its checksum"
    return None


def _damage(store: Datastore, case: CaseRecord, label: LabelVersion) -> Optional[str]:
    """What is wrong with the stored files of a case to export (None: both match their checksums)."""
    problems = [
        _file_problem(store.image_path(case.id), case.image_sha256, "its image file"),
        _file_problem(store.label_path(case.id, label.id), label.sha256, f"the file of label version {label.id}"),
    ]
    found = [p for p in problems if p]
    return "; ".join(found) if found else None


def _check_dest(dest: Path, store_root: Path) -> None:
    """Refuse a target the export cannot fill as a new folder of its own, before anything is read: a
    file, a folder under a file, one that is not empty (or holds what an interrupted export left), a
    folder this user cannot write, or one inside the store but under its ``exports/``."""
    if dest.exists() and not dest.is_dir():
        raise DatastoreError(f"export folder {dest} is a file: choose a new folder")
    _refuse_inside_store(dest, store_root)
    entries = sorted(os.listdir(dest)) if dest.exists() else []
    work = [name for name in entries if name.startswith(_WORK_INSIDE) and (dest / name).is_dir()]
    # killed while moving its entries up: dataset.json (moved last) is still in the hidden folder
    moving = _DATASET_JSON not in entries and any((dest / name / _DATASET_JSON).exists() for name in work)
    if entries and (len(work) == len(entries) or moving):
        raise DatastoreError(
            f"export folder {dest} holds only what an interrupted export left ({', '.join(entries)}): "
            "remove it, or choose a new folder"
        )
    if entries:
        raise DatastoreError(f"export folder {dest} is not empty: choose a new folder")
    problem = output_problem(dest, folder=True)  # under a file, or in a folder this user cannot write
    if problem is not None:
        raise DatastoreError(f"cannot export to {dest}: {problem}")


def _refuse_inside_store(dest: Path, store_root: Path) -> None:
    """An export inside the store goes under its ``exports/`` (the default) and nowhere else: in
    ``images/`` or ``labels/`` its files would be taken for the store's own (``verify`` would call them
    unrecorded, ``recover`` move them away)."""
    root = store_root.resolve()
    target = dest.resolve()
    if target != root and root not in target.parents:
        return
    if (root / "exports") in target.parents:
        return
    raise DatastoreError(
        f"cannot export to {dest}: it lies inside the datastore {store_root}, where only its exports/ folder "
        f"may hold exports (its images/ and labels/ are the store's own files): choose a folder outside the "
        f"store, or one under {store_root / 'exports'}"
    )


def _default_dest(store: Datastore, dest: Optional[Union[str, Path]]) -> Path:
    if dest is None:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        dest = store.root / "exports" / f"{stamp}-{new_label_id()[:6]}"
    return Path(dest)


def _filled(dest: Path) -> DatastoreError:
    return DatastoreError(f"export folder {dest} was filled during the export: export again to a new folder")


def _move_into_place(work: Path, dest: Path) -> None:
    """Rename the finished export folder ``work`` (beside ``dest``) to ``dest``, which did not exist when
    the export began; one made meanwhile, empty, gets the export's entries (:func:`_move_entries_up`)."""
    try:
        os.rename(work, dest)  # POSIX: also onto a folder made empty meanwhile; never onto one with entries
    except OSError as exc:
        if not dest.is_dir():
            raise
        if any(dest.iterdir()):
            raise _filled(dest) from exc
        _move_entries_up(work, dest)  # it cannot be replaced (a mount point, Windows): it stays as it is
        return
    fsync_dir(dest.parent)


def _move_entries_up(work: Path, dest: Path) -> None:
    """Move the finished export's entries from ``work`` into ``dest``, an existing folder that stays as it
    is, ``dataset.json`` last, then remove ``work``. Refused (:func:`_filled`) when ``dest`` holds other
    entries, before or meanwhile: no entry of anyone's is replaced, and the entries moved go back into
    ``work`` (which the caller removes)."""
    if any(name != work.name for name in os.listdir(dest)):
        raise _filled(dest)
    moved: List[str] = []
    try:
        for name in sorted(os.listdir(work), key=lambda n: (n == _DATASET_JSON, n)):
            _rename_new(work / name, dest / name)
            moved.append(name)
    except BaseException as exc:
        for name in reversed(moved):
            with suppress(OSError):
                os.rename(dest / name, work / name)
        if isinstance(exc, FileExistsError):
            raise _filled(dest) from exc
        raise
    work.rmdir()
    fsync_dir(dest)


def _rename_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, which must not exist: a :class:`FileExistsError` when it does, never
    replacing it (a file by a hard link then the old name removed; a folder is never renamed onto a
    folder with entries or onto a file, and the check before keeps it off an empty one)."""
    if not src.is_dir():
        try:
            os.link(src, dst)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: checked, then renamed
            pass
        else:
            os.unlink(src)
            return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(exc.errno, exc.strerror, str(dst)) from exc
        raise


def export_seg_nrrd(
    store: Datastore,
    label_id: str,
    dest: Path,
    segment_names: Sequence[str] = ("SegAssist",),
) -> Path:
    """Write one label version as a Slicer segmentation (``dest`` must end in ``.seg.nrrd``)."""
    dest = Path(dest)
    if not dest.name.endswith(".seg.nrrd"):
        raise DatastoreError(f"a Slicer segmentation file name ends in .seg.nrrd, got {dest.name}")
    label = store.get_label(label_id)
    return _write_seg_nrrd(store, label.case_id, store.load_label(label_id), dest, segment_names)


def _write_seg_nrrd(store: Datastore, case_id: str, mask: np.ndarray, dest: Path, names: Sequence[str]) -> Path:
    reference = store.reference_geometry(case_id)
    atomic_write(dest, lambda tmp: save_segmentation_nrrd(mask, reference, tmp, segment_names=names))
    return dest


def export_msd(
    store: Datastore,
    dest: Optional[Union[str, Path]] = None,
    statuses: Iterable[Union[str, CaseStatus]] = DEFAULT_EXPORT_STATUSES,
    label_names: Sequence[str] = ("foreground",),
    dataset_name: str = "SegAssist",
    modality: Optional[str] = None,
    seg_nrrd: bool = True,
    on_case: Optional[Callable[[int, int, CaseRecord], None]] = None,
    skip_damaged: bool = False,
    on_damaged: Optional[Callable[[CaseRecord, str], None]] = None,
) -> Path:
    """Export each case of the given statuses with its latest submitted label version;
    ``on_case(done, total, case)`` after each (a store of CT scans takes minutes).

    Every file is checked first: a case whose image or label file is missing or damaged stops the
    export before anything is written (:class:`CorruptDataError` naming the cases), unless
    ``skip_damaged``: the case is then left out, ``on_damaged(case, problem)`` told, and
    ``dataset.json`` lists it under ``segassist.skipped_damaged``.

    ``dataset.json`` names every label value the exported labels hold: ``label_names[n - 1]`` for
    value ``n``, ``Segment n`` past the names given (as the ``.seg.nrrd`` files do).

    ``dest`` must be a new or empty folder (default: ``<store>/exports/<time>-<id>``), outside the store
    or under its ``exports/``; it appears complete or not at all (see the module's docstring). Returns
    the folder. ``modality`` (``"CT"``/``"MR"``) is guessed from the first image when not given.
    """
    pairs: List[Tuple[CaseRecord, LabelVersion]] = store.training_cases(statuses)
    if not pairs:
        raise DatastoreError("nothing to export: no case of those statuses has a submitted label")
    if not label_names:
        raise DatastoreError("label_names must name at least one label")
    dest = _default_dest(store, dest)
    _check_dest(dest, store.root)
    damaged = [(case, problem) for case, label in pairs for problem in [_damage(store, case, label)] if problem]
    if damaged and (not skip_damaged or len(damaged) == len(pairs)):
        shown = "; ".join(f"case {c.id} ({c.name}): {p}" for c, p in damaged[:_SHOWN_DAMAGED])
        more = f"; and {len(damaged) - _SHOWN_DAMAGED} more" if len(damaged) > _SHOWN_DAMAGED else ""
        if len(damaged) == len(pairs):
            raise CorruptDataError(f"nothing to export: every case to export has damaged files in the store "
                                   f"({shown}{more})")  # fmt: skip
        raise CorruptDataError(
            f"nothing exported: {len(damaged)} of the {len(pairs)} case(s) to export have damaged files in the "
            f"store ({shown}{more}). `segassist learn verify --store {store.root}` lists every damaged file; "
            "restore them from a backup, or export the other cases with --skip-damaged (the damaged cases' "
            "annotations are then left out)"
        )
    left_out = {case.id for case, _ in damaged}
    pairs = [(case, label) for case, label in pairs if case.id not in left_out]
    # the folder itself: "." has no name to put a work folder beside, a link or a mount point is no
    # folder a rename can replace
    target = dest.resolve()
    inside = target.is_dir()  # an existing empty folder: it stays, with its permissions, owner and ACLs
    if inside:
        work = target / f"{_WORK_INSIDE}{new_label_id()[:8]}"
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = target.parent / f".{target.name}.exporting-{new_label_id()[:8]}"
    work.mkdir()
    try:
        for case, problem in damaged:  # told once the export is under way: these cases are left out of it
            if on_damaged is not None:
                on_damaged(case, problem)
        _write_msd(store, work, pairs, damaged, label_names, dataset_name, modality, seg_nrrd, on_case)
        if inside:
            _move_entries_up(work, target)
        else:
            _move_into_place(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return dest


def _write_msd(
    store: Datastore,
    out: Path,
    pairs: List[Tuple[CaseRecord, LabelVersion]],
    damaged: List[Tuple[CaseRecord, str]],
    label_names: Sequence[str],
    dataset_name: str,
    modality: Optional[str],
    seg_nrrd: bool,
    on_case: Optional[Callable[[int, int, CaseRecord], None]],
) -> None:
    stems = _unique_stems([c for c, _ in pairs])
    if modality is None:
        modality = guess_modality(store.load_image(pairs[0][0].id))
    training, provenance = [], []
    subjects = store.subjects([c.id for c, _ in pairs])  # a patient-level split downstream needs them
    values = set(range(1, len(label_names) + 1))  # every named label, and every value a label holds
    for done, (case, label) in enumerate(pairs, 1):
        stem = stems[case.id]
        _copy_checked(store.image_path(case.id), case.image_sha256, out / "imagesTr" / f"{stem}.nii.gz", "image")
        label_file = out / "labelsTr" / f"{stem}.nii.gz"
        _copy_checked(store.label_path(case.id, label.id), label.sha256, label_file, f"label version {label.id}")
        mask = load_mask(label_file).astype(np.uint8, copy=False)  # the copy, checked: not hashed again
        values.update(int(v) for v in np.unique(mask) if v)
        if seg_nrrd:
            _write_seg_nrrd(store, case.id, mask, out / "segmentations" / f"{stem}.seg.nrrd", label_names)
        training.append({"image": f"./imagesTr/{stem}.nii.gz", "label": f"./labelsTr/{stem}.nii.gz"})
        provenance.append(
            {
                "file": f"{stem}.nii.gz",
                "case_id": case.id,
                "case_name": case.name,
                "subject": subjects[case.id],
                "status": case.status.value,
                "label_id": label.id,
                "label_version": label.version,
                "user": label.user,
                "created_at": iso_time(label.created_at),
                "model": label.model,
                "adapter_version": label.adapter_version,
                "n_interactions": label.n_interactions,
                "seconds_spent": label.seconds_spent,
            }
        )
        if on_case is not None:
            on_case(done, len(pairs), case)
    dataset = {
        "name": dataset_name,
        "description": "Exported from a SegAssist datastore",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI" if modality == "MR" else modality},
        "labels": {"0": "background", **{str(v): _label_name(label_names, v) for v in sorted(values)}},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
        "segassist": {
            "exported_at": iso_time(time.time()),
            "cases": provenance,
            # left out with skip_damaged: their stored files did not match their checksums
            "skipped_damaged": [{"case_id": c.id, "case_name": c.name, "problem": p} for c, p in damaged],
        },
    }
    atomic_write_bytes(out / "dataset.json", json.dumps(dataset, indent=1).encode())


def _label_name(names: Sequence[str], value: int) -> str:
    """The name of label ``value``: given, or ``Segment n`` as in the ``.seg.nrrd`` files."""
    return names[value - 1] if value <= len(names) else f"Segment {value}"
