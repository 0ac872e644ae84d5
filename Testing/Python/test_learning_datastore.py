"""The datastore: import, list and filter, locks, versioned labels with provenance, review, export,
integrity, and a real SIGKILL during a label save."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from SegAssistLib.errors import PromptError
from SegAssistLib.image import Volume
from SegAssistLib.io import load_mask, load_volume, volume_to_sitk
from SegAssistLib.learning import (
    CaseLockedError,
    CaseStatus,
    CorruptDataError,
    Datastore,
    DatastoreError,
    DuplicateCaseError,
    InvalidIdentifierError,
    InvalidStateError,
    NotFoundError,
    export_msd,
    export_seg_nrrd,
    open_datastore,
)
from SegAssistLib.learning.errors import DamagedStoreError, StoreAccessError
from SegAssistLib.learning.records import RecoveryReport
from SegAssistLib.learning.store_db import DB_NAME
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import BoxPrompt, PointPrompt
from SegAssistLib.transport import wire_volume

REPO_ROOT = Path(__file__).resolve().parents[2]
pytest_plugins = ["test_server_fixtures"]


def make_volume(shape=(12, 16, 20), seed=0, spacing=(0.8, 0.9, 2.0)) -> Volume:
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    array = (100 * np.sin(k / 3.0) + j * i + rng.integers(0, 5, shape)).astype(np.int16)
    return Volume(array=array, spacing=spacing, origin=(1.0, -2.0, 3.0))


def box_mask(shape, lo, hi) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return m


class Clock:
    """A settable clock for lock expiry (the store takes any ``() -> float``)."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    ds = Datastore(tmp_path / "store", clock=clock)
    yield ds
    ds.close()


def add_case(ds: Datastore, seed=0, name=None, shape=(12, 16, 20)):
    return ds.import_volume(make_volume(shape, seed), name=name or f"case_{seed:03d}", user="admin")


def write_dicom_series(folder: Path, array: np.ndarray, slice_gap: float = 2.0) -> None:
    folder.mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.2.1125.1.4242"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        sl = sitk.GetImageFromArray(array[k])
        sl.SetSpacing((0.8, 0.8))
        tags = {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{uid}.3.{k + 1}",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0020|0013": str(k + 1),
            "0020|0032": f"0\\0\\{k * slice_gap}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(slice_gap),
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


# ---------------------------------------------------------------------------------------- import


def test_a_cases_image_as_served_is_the_same_case_when_imported_again(store: Datastore):
    """NIfTI keeps spacing and origin in float32: the image a case serves hashes differently from the
    one imported when its geometry is not a float32 number (0.7 mm, -180.3 mm); imported again it
    once became a second case of the same scan."""
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(0, 100, (8, 10, 12)).astype(np.int16), spacing=(0.7, 0.7, 1.3),
                    origin=(-180.3, 12.1, 7.7))  # fmt: skip
    case = store.import_volume(volume, name="ct", user="alice")
    served = store.load_image(case.id)
    assert served.content_hash() != volume.content_hash()  # what made it look like a new image
    with pytest.raises(DuplicateCaseError, match=case.id):
        store.import_volume(served, name="ct again", user="bob")
    with pytest.raises(DuplicateCaseError, match=case.id):
        store.import_volume(volume, name="ct again", user="bob")
    assert [c.id for c in store.list_cases()] == [case.id]
    assert sorted(p.name for p in (store.root / "images").iterdir()) == [f"{case.id}.nii.gz"]  # nothing left
    assert store.image_hashes_of(case.id) == {volume.content_hash(), wire_volume(served).content_hash()}


def test_import_folder_of_formats_and_dicom_skips_duplicates_and_bad_images(tmp_path: Path, store: Datastore):
    src = tmp_path / "incoming"
    src.mkdir()
    for n, suffix in enumerate((".nii.gz", ".nrrd", ".mha")):
        sitk.WriteImage(volume_to_sitk(make_volume(seed=n)), str(src / f"img{n}{suffix}"))
    sitk.WriteImage(volume_to_sitk(make_volume(seed=0)), str(src / "zz_copy_of_img0.nii.gz"))  # duplicate
    constant = Volume(array=np.zeros((8, 8, 8), np.int16))
    sitk.WriteImage(volume_to_sitk(constant), str(src / "blank.nrrd"))  # cannot be segmented
    sitk.WriteImage(volume_to_sitk(make_volume(seed=9)), str(src / "old.seg.nrrd"))  # not an image to annotate
    dicom = (np.arange(6 * 20 * 24).reshape(6, 20, 24) % 97).astype(np.int16)
    write_dicom_series(src / "series1", dicom)

    report = store.import_images(src, user="alice")
    names = sorted(c.name for c in report.added)
    assert names == ["img0", "img1", "img2", "series1"]
    reasons = dict((Path(p).name, r) for p, r in report.skipped)
    assert set(reasons) == {"zz_copy_of_img0.nii.gz", "blank.nrrd"}
    assert "already imported" in reasons["zz_copy_of_img0.nii.gz"]
    assert "constant" in reasons["blank.nrrd"]

    series = next(c for c in report.added if c.name == "series1")
    assert series.shape == (6, 20, 24) and series.spacing[2] == pytest.approx(2.0)
    assert np.array_equal(store.load_image(series.id).array, dicom)
    # every case is new, ids are generated, nothing of the source name is in the stored file names
    for case in report.added:
        assert case.status is CaseStatus.NEW and case.imported_by == "alice"
        assert store.image_path(case.id).name == f"{case.id}.nii.gz"
    # a second import adds nothing
    again = store.import_images(src, user="alice")
    assert again.added == [] and len(again.skipped) == 6


def test_import_hippocampus_real_data(tmp_path: Path, hippocampus_dir: Path, store: Datastore):
    files = sorted((hippocampus_dir / "imagesTr").glob("*.nii.gz"))[:3]
    src = tmp_path / "hippo" / "imagesTr"
    src.mkdir(parents=True)
    for f in files:
        shutil.copy(f, src)
    report = store.import_images(src.parent, user="alice")  # an MSD folder: only imagesTr is read
    assert [c.name for c in report.added] == [f.name[: -len(".nii.gz")] for f in files]
    for case, f in zip(report.added, files):
        original = load_volume(f)
        stored = store.load_image(case.id)
        assert np.array_equal(stored.array, original.array)
        assert np.allclose(stored.spacing, original.spacing) and np.allclose(stored.origin, original.origin)
        assert case.shape == original.array.shape
    assert store.count_by_status()["new"] == 3


def test_import_errors_are_clear(tmp_path: Path, store: Datastore):
    with pytest.raises(DatastoreError, match="neither a file nor a folder"):
        store.import_images(tmp_path / "missing", user="alice")
    with pytest.raises(InvalidIdentifierError, match="user name"):
        store.import_images(tmp_path, user="../root")
    add_case(store, seed=1)
    with pytest.raises(DuplicateCaseError, match="already imported"):
        add_case(store, seed=1, name="other name")


def test_a_new_store_is_never_made_in_a_folder_of_someones_files(tmp_path: Path):
    folder = tmp_path / "my_scans"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(DatastoreError, match=r"holds files \(notes.txt\) and no SegAssist datastore"):
        Datastore(folder, create=True)
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    (tmp_path / "srv" / "uploads").mkdir(parents=True)  # a server's upload folder inside its store
    Datastore(tmp_path / "srv", create=True).close()
    Datastore(tmp_path / "new_store", create=True).close()
    Datastore(tmp_path / "new_store", create=True).close()  # an existing store opens as it is


def test_odd_file_names_and_the_store_itself_do_not_spoil_a_folder_import(tmp_path: Path):
    """A file name with a non-breaking space or a tab stopped a folder import halfway (the case name
    must be printable); re-importing a folder that holds the store imported its label files as
    images to annotate."""
    data = tmp_path / "data"
    data.mkdir()
    for seed, name in enumerate(["a_case", "b\u00a0case", "c\tcase", "d_case"]):
        sitk.WriteImage(volume_to_sitk(make_volume((12, 16, 20), seed)), str(data / f"{name}.nii.gz"))
    with Datastore(data / "store") as ds:
        report = ds.import_images(data, user="admin")
        assert sorted(c.name for c in report.added) == ["a_case", "b?case", "c?case", "d_case"]
        case = report.added[0]
        ds.save_label(case.id, np.ones(case.shape, np.uint8), user="alice")
        again = ds.import_images(data, user="admin")  # the store's own images and labels are not sources
        assert again.added == [] and len(again.skipped) == 4
        assert all("store" not in Path(path).relative_to(data).parts for path, _ in again.skipped)
        with pytest.raises(DatastoreError, match="lies inside the datastore"):
            ds.import_images(data / "store" / "labels", user="admin")
        assert len(ds.list_cases()) == 4


def test_a_store_that_lost_its_database_is_not_made_afresh_over_its_files(tmp_path: Path):
    """segassist.sqlite moved away (or a partial copy): the folder held only folders, so it was opened
    as a new, empty store, and recovery then deleted every image and label as an orphan."""
    root = tmp_path / "store"
    ds = Datastore(root)
    case = add_case(ds)
    ds.save_label(case.id, np.ones(case.shape, np.uint8), user="alice")
    ds.close()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent != root)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for db_file in root.glob(f"{DB_NAME}*"):
        db_file.rename(moved / db_file.name)
    with pytest.raises(DatastoreError, match=f"holds a datastore's images/ but not its database {DB_NAME}"):
        Datastore(root, create=True)
    assert sorted(p for p in root.rglob("*") if p.is_file()) == files and not (root / DB_NAME).exists()
    for db_file in moved.iterdir():
        db_file.rename(root / db_file.name)
    with Datastore(root) as restored:
        assert [c.id for c in restored.list_cases()] == [case.id] and restored.recover(min_age_s=0) == RecoveryReport()
        assert restored.latest_label(case.id).n_foreground == int(np.prod(case.shape))


def test_learn_import_exit_code_says_whether_every_image_came_in(tmp_path: Path, capsys):
    from SegAssistLib.cli import main

    src = tmp_path / "src"
    src.mkdir()
    store = str(tmp_path / "store")
    assert main(["learn", "import", str(src), "--store", store, "--user", "admin"]) == 1
    assert "no image found" in capsys.readouterr().err
    sitk.WriteImage(volume_to_sitk(make_volume((6, 8, 10), 1)), str(src / "a.nrrd"))
    assert main(["learn", "import", str(src), "--store", store, "--user", "admin"]) == 0
    assert main(["learn", "import", str(src), "--store", store, "--user", "admin"]) == 0  # a duplicate is fine
    (src / "b.nii.gz").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["learn", "import", str(src), "--store", store, "--user", "admin"]) == 1
    assert "1 image(s) could not be imported" in capsys.readouterr().err
    for argv in (["lock", "x", "--hours", "-1"], ["lock", "x", "--hours", "nan"], ["lock", "x", "--hours", "25"]):
        with pytest.raises(SystemExit):
            main(["learn", *argv, "--store", store, "--user", "ann"])
        assert "must be more than 0 and at most 24 hours" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- list, locks


def test_list_and_filter_by_status(store: Datastore):
    cases = [add_case(store, seed=s) for s in range(5)]
    store.lock(cases[1].id, "alice")
    store.save_label(cases[2].id, box_mask(cases[2].shape, (1, 1, 1), (5, 5, 5)), "bob")
    store.save_label(cases[3].id, box_mask(cases[3].shape, (1, 1, 1), (5, 5, 5)), "bob")
    store.review(cases[3].id, "carol", accepted=True)

    assert [c.id for c in store.list_cases()] == [c.id for c in cases]
    assert {c.id for c in store.list_cases(status="new")} == {cases[0].id, cases[4].id}
    assert [c.id for c in store.list_cases(status="in progress")] == [cases[1].id]
    assert [c.id for c in store.list_cases(status=CaseStatus.SUBMITTED)] == [cases[2].id]
    assert [c.id for c in store.list_cases(status=["submitted", "reviewed"])] == [cases[2].id, cases[3].id]
    assert [c.id for c in store.list_cases(locked_by="alice")] == [cases[1].id]
    assert [c.id for c in store.list_cases(limit=2, offset=1)] == [cases[1].id, cases[2].id]
    assert [c.id for c in store.list_cases(offset=3)] == [cases[3].id, cases[4].id]  # was ignored without a limit
    for bad in ({"offset": -1}, {"limit": -1}):
        with pytest.raises(DatastoreError, match="must not be negative"):
            store.list_cases(**bad)
    assert store.count_by_status() == {"new": 2, "in_progress": 1, "submitted": 1, "reviewed": 1}
    with pytest.raises(InvalidIdentifierError, match="unknown case status"):
        store.list_cases(status="done")


def test_lock_belongs_to_one_annotator_and_expires(store: Datastore, clock: Clock):
    case = add_case(store)
    locked = store.lock(case.id, "alice", ttl_s=600)
    assert locked.locked_by == "alice" and locked.status is CaseStatus.IN_PROGRESS
    with pytest.raises(CaseLockedError, match=r"locked by alice for about 10 more minute"):
        store.lock(case.id, "bob")
    with pytest.raises(CaseLockedError, match="locked by alice"):
        store.save_label(case.id, np.zeros(case.shape, np.uint8), "bob")
    with pytest.raises(CaseLockedError):
        store.unlock(case.id, "bob")
    assert store.lock(case.id, "alice", ttl_s=600).lock_expires == clock.t + 600  # renewal

    clock.t += 601  # alice's lock has expired: bob may take the case
    assert store.get_case(case.id).locked_by is None
    assert store.lock(case.id, "bob").locked_by == "bob"
    with pytest.raises(CaseLockedError, match="locked by bob"):
        store.lock(case.id, "alice")
    released = store.unlock(case.id, "admin", force=True)  # an administrator's override
    assert released.locked_by is None and released.status is CaseStatus.NEW  # no label: back to new
    with pytest.raises(DatastoreError, match="lock duration"):
        store.lock(case.id, "alice", ttl_s=0)


# ------------------------------------------------------------------------------------- labels


def test_label_versions_are_new_files_with_provenance_never_overwritten(store: Datastore, clock: Clock):
    case = add_case(store)
    log = PromptLog(model="builtin-v1", prompts=[PointPrompt(position=(5, 6, 7)), PointPrompt(position=(4, 4, 4))])
    store.lock(case.id, "alice")
    m1 = box_mask(case.shape, (2, 2, 2), (6, 8, 9))
    v1 = store.save_label(
        case.id,
        m1,
        "alice",
        prompt_log=log,
        model="builtin-v1",
        adapter_version="salt-3",
        seconds_spent=42.5,
        submit=False,
    )
    assert (v1.version, v1.user, v1.model, v1.adapter_version) == (1, "alice", "builtin-v1", "salt-3")
    assert v1.n_interactions == 2 and v1.seconds_spent == 42.5 and v1.n_foreground == int(m1.sum())
    assert v1.created_at == clock.t and not v1.submitted and v1.has_prompt_log
    assert store.get_case(case.id).status is CaseStatus.IN_PROGRESS  # a draft keeps the lock
    assert store.get_case(case.id).locked_by == "alice"
    path1 = store.label_path(case.id, v1.id)
    bytes1, stat1 = path1.read_bytes(), path1.stat()

    clock.t += 10
    m2 = box_mask(case.shape, (1, 1, 1), (7, 9, 10))
    log2 = PromptLog(prompts=[BoxPrompt(min_corner=(1, 1, 1), max_corner=(9, 8, 6))])
    v2 = store.save_label(case.id, m2, "alice", prompt_log=log2.to_json(), n_interactions=5, seconds_spent=3)
    assert v2.version == 2 and v2.id != v1.id and v2.n_interactions == 5 and v2.submitted
    case_now = store.get_case(case.id)
    assert case_now.status is CaseStatus.SUBMITTED and case_now.locked_by is None
    assert case_now.n_labels == 2 and case_now.latest_label_id == v2.id

    # version 1 is untouched, on disk and in content
    assert path1.read_bytes() == bytes1 and path1.stat().st_mtime_ns == stat1.st_mtime_ns
    assert np.array_equal(store.load_label(v1.id), m1)
    assert np.array_equal(store.load_label(v2.id), m2)
    assert [v.id for v in store.label_versions(case.id)] == [v1.id, v2.id]
    assert store.latest_label(case.id).id == v2.id
    assert store.prompt_log(v1.id) == log and store.prompt_log(v2.id) == log2
    # labels are written on the image's grid
    written = sitk.ReadImage(str(store.label_path(case.id, v2.id)))
    assert np.allclose(written.GetSpacing(), (0.8, 0.9, 2.0)) and np.allclose(written.GetOrigin(), (1, -2, 3))


def test_review_flow_and_training_cases(store: Datastore):
    a, b, c = (add_case(store, seed=s) for s in range(3))
    with pytest.raises(InvalidStateError, match="only submitted cases"):
        store.review(a.id, "carol", accepted=True)
    la = store.save_label(a.id, box_mask(a.shape, (0, 0, 0), (3, 3, 3)), "alice")
    store.save_label(b.id, box_mask(b.shape, (0, 0, 0), (3, 3, 3)), "bob")
    store.save_label(c.id, box_mask(c.shape, (0, 0, 0), (3, 3, 3)), "bob", submit=False)  # a draft only
    review = store.review(a.id, "carol", accepted=True, note="fine")
    assert review.label_id == la.id and store.get_case(a.id).status is CaseStatus.REVIEWED
    store.review(b.id, "carol", accepted=False, note="missed the tail")
    assert store.get_case(b.id).status is CaseStatus.IN_PROGRESS
    assert [r.note for r in store.reviews(b.id)] == ["missed the tail"]
    assert [(cs.id, lv.id) for cs, lv in store.training_cases()] == [(a.id, la.id)]


def test_a_review_lands_on_the_version_the_reviewer_saw_or_not_at_all(store: Datastore, clock: Clock):
    """Carol opens version 1; alice locks the case again and submits version 2 (here empty). Carol's
    verdict must not make version 2 the reviewed training label."""
    case = add_case(store)
    v1 = store.save_label(case.id, box_mask(case.shape, (0, 0, 0), (3, 3, 3)), "alice")
    store.lock(case.id, "alice")
    with pytest.raises(InvalidStateError, match="locked by alice"):
        store.review(case.id, "carol", accepted=True, label_id=v1.id)
    v2 = store.save_label(case.id, np.zeros(case.shape, np.uint8), "alice")  # submitting releases the lock
    with pytest.raises(InvalidStateError, match=f"label {v1.id} is no longer the latest.*version 2"):
        store.review(case.id, "carol", accepted=True, label_id=v1.id)
    assert store.get_case(case.id).status is CaseStatus.SUBMITTED and store.reviews(case.id) == []
    review = store.review(case.id, "carol", accepted=False, note="empty", label_id=v2.id)
    assert review.label_id == v2.id and store.get_case(case.id).status is CaseStatus.IN_PROGRESS
    with pytest.raises(ValueError):
        store.review(case.id, "carol", accepted=True, label_id="../x")


def test_a_stray_save_cannot_change_a_submitted_or_reviewed_case(store: Datastore):
    a, b = (add_case(store, seed=s) for s in range(2))
    la = store.save_label(a.id, box_mask(a.shape, (0, 0, 0), (3, 3, 3)), "alice")
    lb = store.save_label(b.id, box_mask(b.shape, (0, 0, 0), (3, 3, 3)), "alice")
    store.review(b.id, "carol", accepted=True)
    draft = box_mask(a.shape, (0, 0, 0), (2, 2, 2))
    for case, status in ((a, CaseStatus.SUBMITTED), (b, CaseStatus.REVIEWED)):
        for user in ("alice", "dave"):  # neither the author nor anyone else, without the lock
            for submit in (False, True):  # a draft would start a correction, a submission undo its review
                with pytest.raises(InvalidStateError, match="lock the case first"):
                    store.save_label(case.id, draft, user, submit=submit)
        assert store.get_case(case.id).status is status and len(store.label_versions(case.id)) == 1
    assert [(cs.id, lv.id) for cs, lv in store.training_cases()] == [(a.id, la.id), (b.id, lb.id)]
    # a correction is deliberate: lock, then save a draft; the case stays reviewed and its accepted label
    # stays the training label until a new one is submitted
    store.lock(b.id, "dave")
    store.save_label(b.id, draft, "dave", submit=False)
    assert store.get_case(b.id).status is CaseStatus.REVIEWED
    assert [(cs.id, lv.id) for cs, lv in store.training_cases()] == [(a.id, la.id), (b.id, lb.id)]
    # a deliberate resubmission: lock, submit; the new version becomes the training label
    store.lock(a.id, "dave")
    la2 = store.save_label(a.id, draft, "dave")
    assert store.get_case(a.id).status is CaseStatus.SUBMITTED
    assert [(cs.id, lv.id) for cs, lv in store.training_cases()] == [(a.id, la2.id), (b.id, lb.id)]
    assert la2.id != la.id


def test_bad_input_is_refused_with_clear_errors(store: Datastore):
    case = add_case(store)
    good = np.zeros(case.shape, np.uint8)
    for bad_id in ("../../etc/passwd", "ABCDEF0123456789", "", None, "0" * 15, case.id + "\n"):
        with pytest.raises(InvalidIdentifierError, match="invalid case id"):
            store.save_label(bad_id, good, "alice")
    with pytest.raises(InvalidIdentifierError, match="invalid label version id"):
        store.load_label("../" + "a" * 29)
    with pytest.raises(InvalidIdentifierError, match="invalid label version id"):
        store.load_label("a" * 32 + "\n")
    for bad_user in ("", "a/b", "..", "x" * 65, "name with space", "\u00e9", "_svc", "alice\n"):
        with pytest.raises(InvalidIdentifierError, match="user name"):
            store.lock(case.id, bad_user)
    with pytest.raises(NotFoundError):
        store.get_case("0123456789abcdef")
    with pytest.raises(DatastoreError, match="does not match the case's image shape"):
        store.save_label(case.id, np.zeros((3, 3, 3), np.uint8), "alice")
    with pytest.raises(DatastoreError, match="0-255"):
        store.save_label(case.id, np.full(case.shape, 300, np.int32), "alice")
    with pytest.raises(DatastoreError, match="integers"):
        store.save_label(case.id, np.full(case.shape, 0.5), "alice")
    # text raised ValueError; None is no error: not measured (test_learning_unknown_effort)
    for seconds in (float("nan"), float("inf"), -1.0, "abc", True):
        with pytest.raises(DatastoreError, match="seconds_spent"):
            store.save_label(case.id, good, "alice", seconds_spent=seconds)
    for count in (-1, 2**63, 1.5, float("nan"), float("inf"), "3"):  # NaN, inf: ValueError, OverflowError
        with pytest.raises(DatastoreError, match="n_interactions"):
            store.save_label(case.id, good, "alice", n_interactions=count)
    with pytest.raises(PromptError, match="invalid prompt log"):
        store.save_label(case.id, good, "alice", prompt_log='{"prompts": [{"kind": "nope"}]}')
    with pytest.raises(DatastoreError, match="model must be printable text") as refused:
        store.save_label(case.id, good, "alice", model="x\n" * 3)
    assert not isinstance(refused.value, InvalidIdentifierError)  # free text, not an id: 422 over HTTP
    assert store.label_versions(case.id) == []  # nothing was written by the refused calls
    assert store.verify().orphans == ()


# ----------------------------------------------------------------------------- integrity, reopen


def test_reopen_keeps_everything_and_corruption_is_detected(tmp_path: Path):
    root = tmp_path / "store"
    with Datastore(root) as ds:
        case = add_case(ds)
        label = ds.save_label(case.id, box_mask(case.shape, (1, 1, 1), (4, 4, 4)), "alice")
    with pytest.raises(DatastoreError, match="no SegAssist datastore"):
        open_datastore(tmp_path / "elsewhere")
    with open_datastore(root) as ds:
        assert ds.get_case(case.id).latest_label_id == label.id
        assert ds.verify().ok
        path = ds.label_path(case.id, label.id)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptDataError, match="checksum"):
            ds.load_label(label.id)
        report = ds.verify()
        assert not report.ok and "checksum mismatch" in report.corrupt[0]


def test_an_image_file_cut_short_is_refused_not_read_as_zeros(tmp_path: Path):
    """A truncated image file still decoded (zeros where its data ended) and was ranked, proposed on and
    trained on as if it were the case's image; it is checked against the recorded checksum as labels are."""
    with Datastore(tmp_path / "store") as ds:
        case = ds.import_volume(make_volume(seed=3), name="cut short", user="admin")
        path = ds.image_path(case.id)
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(CorruptDataError, match="checksum") as refused:
            ds.load_image(case.id)
        message = str(refused.value)
        assert case.id in message and "cut short" in message
        assert str(tmp_path) not in message  # reaches HTTP replies: the server's folders are not shown


class _DiskFailsAtCommit:
    """The store's SQLite connection with a disk that fails the next ``COMMIT`` (a full disk or an
    I/O error at the moment SQLite writes its pages): the one part a test cannot make fail for real."""

    def __init__(self, conn) -> None:
        self.conn, self.armed = conn, True

    def execute(self, sql, *args):
        if sql == "COMMIT" and self.armed:
            self.armed = False
            raise sqlite3.OperationalError("disk I/O error")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_failed_commit_leaves_no_label_behind_and_the_store_writable(store: Datastore):
    case = add_case(store)
    first = store.save_label(case.id, box_mask(case.shape, (1, 1, 1), (4, 4, 4)), "alice", submit=False)
    real = store._conn
    store._conn = _DiskFailsAtCommit(real)
    with pytest.raises(StoreAccessError, match="disk I/O error") as failed:  # named, not a raw sqlite3 error
        store.save_label(case.id, box_mask(case.shape, (2, 2, 2), (6, 6, 6)), "alice")
    assert str(store.root) in str(failed.value) and str(store.root) not in failed.value.public
    store._conn = real
    assert not real.in_transaction  # rolled back: no row without its file for any reader
    assert [v.id for v in store.label_versions(case.id)] == [first.id]
    assert sorted(p.name for p in store.label_path(case.id, first.id).parent.iterdir()) == [
        store.label_path(case.id, first.id).name
    ]
    second = store.save_label(case.id, box_mask(case.shape, (2, 2, 2), (6, 6, 6)), "alice")  # writes go on
    assert second.version == first.version + 1 and store.verify().ok
    np.testing.assert_array_equal(store.load_label(first.id), box_mask(case.shape, (1, 1, 1), (4, 4, 4)))


class _InterruptAfterCommit:
    """The store's SQLite connection, with a Ctrl-C that lands just after the next ``COMMIT`` went
    through (a signal's timing, which a test cannot arrange for real)."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, sql, *args):
        out = self.conn.execute(sql, *args)
        if sql == "COMMIT":
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_an_interrupt_just_after_the_commit_keeps_the_saved_label_and_its_file(store: Datastore):
    case = add_case(store)
    real = store._conn
    store._conn = _InterruptAfterCommit(real)
    with pytest.raises(KeyboardInterrupt):
        store.save_label(case.id, box_mask(case.shape, (2, 2, 2), (6, 6, 6)), "alice")
    with pytest.raises(KeyboardInterrupt):
        add_case(store, seed=5, name="second")
    store._conn = real
    saved = store.latest_label(case.id, submitted_only=True)  # the row was committed: so is its file
    assert saved is not None and store.verify().ok
    np.testing.assert_array_equal(store.load_label(saved.id), box_mask(case.shape, (2, 2, 2), (6, 6, 6)))
    second = [c for c in store.list_cases() if c.name == "second"]
    assert len(second) == 1 and store.load_image(second[0].id).array.shape == case.shape


def test_a_damaged_database_file_is_one_line_naming_the_store_and_is_left_as_it_is(tmp_path: Path, capsys):
    """Garbage where segassist.sqlite should be was a sqlite3 traceback ("file is not a database")."""
    from SegAssistLib.cli import main

    root = tmp_path / "store"
    root.mkdir()
    garbage = b"not a database at all " * 300
    (root / DB_NAME).write_bytes(garbage)
    with pytest.raises(DamagedStoreError, match="is damaged or is not a SegAssist database") as refused:
        Datastore(root, create=False)
    assert isinstance(refused.value, CorruptDataError) and str(root) in str(refused.value)
    for command in ("status", "cases", "versions"):
        assert main(["learn", command, "--store", str(root)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"segassist learn {command}: error: datastore {root}: its database {DB_NAME} is damaged")
    assert (root / DB_NAME).read_bytes() == garbage and os.listdir(root) == [DB_NAME]


def test_a_failing_read_names_the_store(store: Datastore):
    case = add_case(store)

    class DiskFailsAtRead:
        def execute(self, sql, *args):
            raise sqlite3.OperationalError("disk I/O error")

        def __getattr__(self, name):
            return getattr(real, name)

    real = store._conn
    store._conn = DiskFailsAtRead()
    try:
        with pytest.raises(StoreAccessError, match=f"datastore {store.root}: its database {DB_NAME} failed"):
            store.get_case(case.id)
    finally:
        store._conn = real
    assert store.get_case(case.id).id == case.id


# run argv read-only: the store folder ($1) bound read-only over itself in a private mount namespace
_READ_ONLY_MOUNT = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"'


def test_a_failing_database_answers_over_http_without_the_stores_path(server_factory, tmp_path: Path):
    from test_server_fixtures import raw

    server = server_factory.start(learn_store=tmp_path / "store")
    store = server.app.state.segassist.learning.store
    real = store._conn

    class Failing:
        def __init__(self, error: sqlite3.Error) -> None:
            self.error = error

        def execute(self, sql, *args):
            raise self.error

        def __getattr__(self, name):
            return getattr(real, name)

    for error, status, code in (
        (sqlite3.OperationalError("database is locked"), 503, "storage_unavailable"),
        (sqlite3.DatabaseError("database disk image is malformed"), 500, "corrupt_data"),
    ):
        store._conn = Failing(error)
        try:
            reply = raw(server, "GET", "/v1/learn/cases")
        finally:
            store._conn = real
        assert reply.status_code == status and reply.json()["error"]["code"] == code, reply.text
        assert str(error) in reply.json()["error"]["message"] and str(tmp_path) not in reply.text
    assert raw(server, "GET", "/v1/learn/cases").status_code == 200


def _read_only_runner(store_root: Path):
    """``run(*argv)``: ``segassist`` in a process that can read the store and not write it, and ``undo()``.

    As root (whose writes no permission stops): in a private mount namespace where the store folder is a
    read-only bind mount of itself, a read-only disk to that process alone (root's writes fail there with
    EROFS); gone when the process ends. As another user: the store's write permissions taken away."""
    root_user = os.geteuid() == 0
    paths = [store_root, *store_root.rglob("*")]
    modes = {path: os.stat(path).st_mode for path in paths}
    if root_user:
        unshare = shutil.which("unshare")
        if unshare is None:
            pytest.skip("as root (permissions never stop root) and without unshare(1) to mount the store read-only")
        prefix = [unshare, "--mount", "sh", "-c", _READ_ONLY_MOUNT, "sh", str(store_root)]
    else:
        for path in paths:
            os.chmod(path, 0o555 if path.is_dir() else 0o444)
        prefix = []

    def undo() -> None:
        if not root_user:
            for path, mode in modes.items():
                os.chmod(path, mode)

    def run(*argv: str) -> subprocess.CompletedProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        return subprocess.run([*prefix, sys.executable, "-m", "SegAssistLib.cli", *argv], cwd=str(REPO_ROOT),
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    if root_user:
        probe = subprocess.run([*prefix, "sh", "-c", f"touch '{store_root}/probe'"], capture_output=True, text=True)
        if probe.returncode == 0 or "Read-only file system" not in probe.stderr:
            (store_root / "probe").unlink(missing_ok=True)
            pytest.skip(f"running as root, and no read-only mount of the store could be made: {probe.stderr.strip()}")
    return run, undo


def test_a_store_this_user_can_only_read_can_be_read_and_a_change_is_one_line(tmp_path: Path):
    """A read-only store could not even be read: every open set the WAL journal, ran the schema's DDL and a
    write transaction (sqlite3 traceback, "attempt to write a readonly database")."""
    from learning_fixtures import make_store

    root = tmp_path / "store"
    ds, cases = make_store(root, n_labelled=2, n_new=1)
    ds.close()
    out = tmp_path / "out"
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run, undo = _read_only_runner(root)
    try:
        # nobody holds the store open: there is no WAL index (-shm) to read it through, and none can be made
        status = run("learn", "status", "--store", str(root))
        assert status.returncode == 0, status.stderr
        assert "submitted 2" in status.stdout and "new 1" in status.stdout
        listed = run("learn", "cases", "--store", str(root), "--json")
        assert listed.returncode == 0, listed.stderr
        assert sorted(c["id"] for c in json.loads(listed.stdout)) == sorted(c.id for c in cases)
        exported = run("learn", "export", str(out), "--store", str(root))
        assert exported.returncode == 0, exported.stderr
        assert len(json.loads((out / "dataset.json").read_text())["training"]) == 2
        locked = run("learn", "lock", cases[2].id, "--user", "bob", "--store", str(root))
        assert locked.returncode == 2 and locked.stderr.strip() == (
            f"segassist learn lock: error: datastore {root} is read-only here: reading it works, a change needs "
            "write access to its folder"
        ), locked.stderr
        verified = run("learn", "verify", "--store", str(root))
        assert verified.returncode == 0, verified.stderr
        recovered = run("learn", "verify", "--recover", "--store", str(root))  # a change: refused, in one line
        assert recovered.returncode == 2 and "Traceback" not in recovered.stderr, recovered.stderr
        assert f"datastore {root} is read-only here" in recovered.stderr
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before  # nothing written
        _a_server_on_it_is_refused_at_start(run, root, tmp_path)
        if os.geteuid() != 0:
            return  # below, a process that writes the store: this user cannot
        # a process that writes it holds it open (a server): the reader reads through that one's WAL index
        # and sees what it wrote
        with Datastore(root) as writer:
            writer.lock(cases[2].id, "alice")
            listed = run("learn", "cases", "--store", str(root), "--status", "in_progress")
            assert listed.returncode == 0, listed.stderr
            assert cases[2].id in listed.stdout and "locked by alice" in listed.stdout
            unlocked = run("learn", "unlock", cases[2].id, "--user", "alice", "--store", str(root))
            assert unlocked.returncode == 2 and "Traceback" not in unlocked.stderr, unlocked.stderr
            assert f"datastore {root} is read-only here" in unlocked.stderr
            assert writer.get_case(cases[2].id).locked_by == "alice"
    finally:
        undo()


def _a_server_on_it_is_refused_at_start(run, root: Path, tmp_path: Path) -> None:
    """Not started to answer 503 to the first label save."""
    served = run("serve", "--port", "0", "--learn-store", str(root), "--data-dir", str(tmp_path / "data"))
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip() == f"segassist serve: error: --learn-store {root}: folder {root} is not writable"


def test_recover_removes_only_old_leftovers(store: Datastore):
    case = add_case(store)
    folder = store.root / "labels" / case.id
    folder.mkdir(parents=True, exist_ok=True)
    leftover = folder / ".tmp-abc-0123.nii.gz"
    leftover.write_bytes(b"partial")
    assert store.verify().orphans == (f"labels/{case.id}/.tmp-abc-0123.nii.gz",)
    assert store.recover() == RecoveryReport()  # too recent: it may be another process's write in progress
    old = time.time() - 3600
    os.utime(leftover, (old, old))
    assert store.recover().removed == (f"labels/{case.id}/.tmp-abc-0123.nii.gz",)
    assert store.verify().orphans == ()


def test_verify_names_the_files_of_a_folder_that_is_gone(store: Datastore):
    """A store whose images/ or labels/ folder was deleted (or never restored from a backup): verify
    names each recorded file as missing, and recover leaves nothing to do; both failed on the folder
    (FileNotFoundError, a traceback)."""
    case = add_case(store)
    label = store.save_label(case.id, box_mask(case.shape, (1, 1, 1), (4, 4, 4)), "alice")
    shutil.rmtree(store.root / "labels")
    report = store.verify()
    assert report.corrupt == (f"label version {label.id}: file missing",), report
    assert store.recover(min_age_s=0) == RecoveryReport()
    shutil.rmtree(store.root / "images")
    report = store.verify()
    assert f"image of case {case.id}: file missing" in report.corrupt, report


# ------------------------------------------------------------------------------------- export


def test_export_msd_layout_and_seg_nrrd(tmp_path: Path, store: Datastore):
    a = add_case(store, seed=0, name="liver 01/../x")  # an unsafe name becomes a safe file name
    b = add_case(store, seed=1, name="liver_02")
    c = add_case(store, seed=2, name="liver_03")  # never labelled: not exported
    ma = box_mask(a.shape, (2, 3, 4), (6, 7, 8))
    store.save_label(a.id, np.zeros(a.shape, np.uint8), "alice", submit=False)  # a draft, then the submission
    la = store.save_label(a.id, ma, "alice", model="builtin-v1", adapter_version="lora-2", seconds_spent=9)
    mb = box_mask(b.shape, (1, 1, 1), (3, 3, 3)) * 2  # label value 2
    store.save_label(b.id, mb, "bob")
    store.review(b.id, "carol", accepted=True)

    out = export_msd(store, tmp_path / "export", label_names=("liver", "tumour"))
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["numTraining"] == 2 and dataset["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert dataset["modality"]["0"] in ("CT", "MRI")
    stems = sorted(Path(t["image"]).name for t in dataset["training"])
    assert stems == ["liver_01_x.nii.gz", "liver_02.nii.gz"]
    for entry in dataset["training"]:
        assert (out / entry["image"]).is_file() and (out / entry["label"]).is_file()
    prov = {p["case_id"]: p for p in dataset["segassist"]["cases"]}
    assert c.id not in prov
    assert prov[a.id]["label_id"] == la.id and prov[a.id]["label_version"] == 2
    assert prov[a.id]["adapter_version"] == "lora-2" and prov[a.id]["user"] == "alice"
    assert np.array_equal(load_mask(out / "labelsTr" / "liver_01_x.nii.gz"), ma)
    assert np.array_equal(load_volume(out / "imagesTr" / "liver_02.nii.gz").array, make_volume(seed=1).array)

    seg = sitk.ReadImage(str(out / "segmentations" / "liver_02.seg.nrrd"))
    assert seg.GetMetaData("Segment1_Name") == "tumour" and seg.GetMetaData("Segment1_LabelValue") == "2"
    assert np.array_equal(sitk.GetArrayFromImage(seg), mb)
    assert not any(p.name.startswith(".tmp-") for p in out.rglob("*"))

    with pytest.raises(DatastoreError, match="not empty"):
        export_msd(store, out)
    single = export_seg_nrrd(store, la.id, tmp_path / "one.seg.nrrd")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(single))), ma)
    with pytest.raises(FileExistsError):  # an export never overwrites either
        export_seg_nrrd(store, la.id, single)
    default = export_msd(store, statuses=["reviewed"], seg_nrrd=False)
    assert default.parent == store.root / "exports"
    defaults = json.loads((default / "dataset.json").read_text())
    # the default names one label; the exported one holds value 2, which dataset.json left out
    assert defaults["numTraining"] == 1 and defaults["labels"] == {
        "0": "background",
        "1": "foreground",
        "2": "Segment 2",
    }


# ------------------------------------------------------------------------------ kill during save

_SAVE_IN_CHILD = """
import sys
import numpy as np
from SegAssistLib.learning import Datastore
root, case_id, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mask = (np.random.default_rng(7).random((n, n, n), dtype=np.float32) < 0.5).astype(np.uint8)
ds = Datastore(root, create=False)
ds.save_label(case_id, mask, "killed", model="child")
print("saved", flush=True)
"""


@pytest.mark.parametrize("kill_when", ["temp file appears", "final file appears"])
def test_sigkill_during_save_leaves_old_or_new_version_never_corrupt(tmp_path: Path, kill_when: str):
    n = 192  # a random mask of 192^3 voxels takes ~0.4 s to compress and write
    root = tmp_path / "store"
    with Datastore(root) as ds:
        case = ds.import_volume(make_volume((n, n, n)), name="big", user="admin")
        old_mask = box_mask(case.shape, (10, 10, 10), (50, 60, 70))
        old = ds.save_label(case.id, old_mask, "alice", submit=False)
    new_mask = (np.random.default_rng(7).random((n, n, n), dtype=np.float32) < 0.5).astype(np.uint8)
    folder = root / "labels" / case.id
    old_file = folder / f"{old.id}.nii.gz"

    def watched() -> bool:
        names = [p.name for p in folder.iterdir()]
        if kill_when == "temp file appears":
            return any(name.startswith(".tmp-") for name in names)
        return any(not name.startswith(".tmp-") and name != old_file.name for name in names)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVE_IN_CHILD, str(root), case.id, str(n)],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    try:
        while not watched():  # poll the folder: the child's write is what we wait for
            if child.poll() is not None:
                break
            assert time.monotonic() < deadline, "the child never started writing"
            time.sleep(0.001)
        seen_pending = [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    err = child.stderr.read().decode()
    child.stdout.close()
    child.stderr.close()
    assert "Traceback" not in err, err
    if kill_when == "temp file appears":
        # the kill really landed mid-write: the child died by the signal with its temp file on disk
        assert child.returncode == -signal.SIGKILL and seen_pending

    with Datastore(root, create=False) as ds:
        versions = ds.label_versions(case.id)
        assert [v.id for v in versions][:1] == [old.id] and len(versions) in (1, 2)
        latest = ds.latest_label(case.id)
        loaded = ds.load_label(latest.id)  # checksum-verified
        if latest.id == old.id:
            assert np.array_equal(loaded, old_mask)
        else:
            assert latest.version == 2 and latest.user == "killed" and np.array_equal(loaded, new_mask)
        assert np.array_equal(ds.load_label(old.id), old_mask)
        report = ds.verify(check_images=False)
        assert report.ok, report.corrupt
        recovery = ds.recover(min_age_s=0)  # a killed write's complete file is moved aside, never deleted
        assert recovery.removed == report.temporary and [old for old, _ in recovery.quarantined] == list(
            report.unrecorded
        )
        assert ds.verify().orphans == ()
        # the store goes on working: the next version gets the next number
        nxt = ds.save_label(case.id, old_mask, "alice")
        assert nxt.version == len(versions) + 1


def test_export_file_names_are_unique_also_ignoring_case():
    """Two cases named "dup" became dup_<id>, which a third case could already be called (the export
    stopped half-way on FileExistsError); "Liver" and "liver" collide on macOS and Windows."""
    from types import SimpleNamespace

    from SegAssistLib.learning.export import _unique_stems

    cases = [
        SimpleNamespace(id=i, name=n)
        for i, n in [("a1", "dup"), ("b2", "dup"), ("c3", "dup_a1"), ("d4", "Liver"), ("e5", "liver"), ("f6", "x")]
    ]
    stems = _unique_stems(cases)
    assert len({s.lower() for s in stems.values()}) == len(cases)
    assert stems["f6"] == "x" and stems["b2"] == "dup_b2"


def test_learn_cancel_on_a_missing_store_says_so(tmp_path: Path, capsys):
    """It said "no training job has run on this datastore yet" where every other subcommand names
    the missing store."""
    from SegAssistLib.cli import main

    assert main(["learn", "cancel", "--store", str(tmp_path / "nowhere")]) == 2
    assert f"no SegAssist datastore at {tmp_path / 'nowhere'}" in capsys.readouterr().err
