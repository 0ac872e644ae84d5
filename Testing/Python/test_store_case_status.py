"""No case is stranded by its status, and none is listed as what it is not.

- A draft saved to a reviewed case (a correction, by the holder of its lock) took the case back to
  ``in_progress`` for good once the lock was released or lapsed: its accepted label dropped out of
  training and export, and the case could no longer be reviewed.
- A case rejected in review was ``in_progress``, unlocked, and never handed out again by ``next``.
- An unlabelled case whose lock lapsed was listed and counted as ``in_progress``, held by nobody.

The rule (records.CaseStatus): a draft leaves a submitted or reviewed case as it is; an
``in_progress`` case nobody holds is read at rest (``new`` without a label; as its latest submitted
label left it when only drafts came after); a rejected case is handed out again by ``next``.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from SegAssistLib.cli import main
from SegAssistLib.image import Volume
from SegAssistLib.learning.active import NoCandidateError, next_case
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.export import export_msd
from SegAssistLib.learning.records import CaseStatus
from SegAssistLib.learning.store_db import DB_NAME

SHAPE = (6, 7, 8)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock):
    with Datastore(tmp_path / "store", clock=clock) as ds:
        yield ds


def add(store: Datastore, seed: int = 0):
    rng = np.random.default_rng(seed)
    return store.import_volume(Volume((rng.random(SHAPE) * 100).astype(np.int16), spacing=(1.0, 1.0, 2.0)),
                               name=f"case{seed}", user="admin")  # fmt: skip


def mask(value: int = 1) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[1:4, 2:5, 3 : 3 + value] = 1
    return m


def training(store: Datastore) -> List[Tuple[str, str]]:
    return [(case.id, label.id) for case, label in store.training_cases()]


def reviewed_case(store: Datastore):
    case = add(store)
    accepted = store.save_label(case.id, mask(1), "alice")
    store.review(case.id, "carol", accepted=True, label_id=accepted.id)
    return case, accepted


def test_a_draft_on_a_reviewed_case_keeps_it_reviewed_and_in_training_after_unlock(store: Datastore, tmp_path: Path):
    case, accepted = reviewed_case(store)
    store.lock(case.id, "bob")
    draft = store.save_label(case.id, mask(2), "bob", submit=False)
    assert store.get_case(case.id).status is CaseStatus.REVIEWED and training(store) == [(case.id, accepted.id)]
    store.unlock(case.id, "bob")
    now = store.get_case(case.id)
    assert now.status is CaseStatus.REVIEWED and now.latest_label_id == draft.id and now.n_labels == 2
    assert training(store) == [(case.id, accepted.id)]
    out = export_msd(store, tmp_path / "out", seg_nrrd=False)
    assert [c["label_id"] for c in json.loads((out / "dataset.json").read_text())["segassist"]["cases"]] == [
        accepted.id
    ]
    store.review(case.id, "carol", accepted=True)  # still reviewable
    assert store.get_case(case.id).status is CaseStatus.REVIEWED


def test_a_draft_on_a_reviewed_case_whose_lock_lapsed_stays_in_training(store: Datastore, clock: Clock):
    case, accepted = reviewed_case(store)
    store.lock(case.id, "bob", ttl_s=60)
    store.save_label(case.id, mask(2), "bob", submit=False)
    clock.now += 3600  # bob never came back
    assert store.get_case(case.id).status is CaseStatus.REVIEWED and training(store) == [(case.id, accepted.id)]


def test_a_case_an_earlier_release_stranded_is_read_at_rest_and_reviewable(store: Datastore):
    """An earlier release set a reviewed case in_progress on a draft: read, it is reviewed again; a
    submitted one submitted again, reviewable; neither is taken for a case nobody labelled."""
    case, accepted = reviewed_case(store)
    other = add(store, seed=1)
    submitted = store.save_label(other.id, mask(1), "alice")
    for c, author in ((case, "bob"), (other, "dave")):
        store.lock(c.id, author)
        store.save_label(c.id, mask(3), author, submit=False)
        store.unlock(c.id, author)
    db = sqlite3.connect(store.root / DB_NAME)
    db.execute("UPDATE cases SET status = 'in_progress'")  # as the earlier release left them
    db.commit()
    db.close()
    assert [c.status for c in store.list_cases()] == [CaseStatus.REVIEWED, CaseStatus.SUBMITTED]
    assert store.count_by_status() == {"new": 0, "in_progress": 0, "submitted": 1, "reviewed": 1}
    assert training(store) == [(case.id, accepted.id), (other.id, submitted.id)]
    store.review(other.id, "carol", accepted=True, label_id=submitted.id)
    assert store.get_case(other.id).status is CaseStatus.REVIEWED


def test_a_rejected_case_is_handed_out_again_by_next(store: Datastore):
    case = add(store)
    store.save_label(case.id, mask(1), "alice")
    store.review(case.id, "carol", accepted=False, note="redo the border")
    rejected = store.get_case(case.id)
    assert rejected.status is CaseStatus.IN_PROGRESS and rejected.needs_rework and rejected.locked_by is None
    chosen = next_case(store, None, "first", user="alice", lock=True, with_proposal=False)
    assert chosen.case.id == case.id and chosen.case.locked_by == "alice"
    again = next_case(store, None, "first", user="alice", lock=True, with_proposal=False, resume=True)
    assert again.case.id == case.id and again.resumed  # held and not reworked yet: handed back
    store.save_label(case.id, mask(2), "alice", submit=False)  # reworking: a draft
    store.unlock(case.id, "alice")
    assert not store.get_case(case.id).needs_rework
    with pytest.raises(NoCandidateError, match="holds a draft nobody submitted yet"):
        next_case(store, None, "first", user="bob", lock=True, with_proposal=False)
    store.lock(case.id, "alice")
    store.save_label(case.id, mask(2), "alice")
    assert store.get_case(case.id).status is CaseStatus.SUBMITTED


def test_learn_next_hands_out_a_rejected_case(tmp_path: Path, capsys):
    root = tmp_path / "store"
    with Datastore(root) as store:
        case = add(store)
        store.save_label(case.id, mask(1), "alice")
        store.review(case.id, "carol", accepted=False)
    code = main(["learn", "next", "--store", str(root), "--strategy", "first", "--no-proposal", "--user", "alice",
                 "--lock"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and case.id in out, err
    assert main(["learn", "cases", "--store", str(root)]) == 0
    assert "in_progress 1 label(s), rejected in review, locked by alice" in capsys.readouterr().out


def test_an_unlabelled_case_whose_lock_lapsed_is_listed_and_counted_as_new(store: Datastore, clock: Clock):
    case = add(store)
    store.lock(case.id, "alice", ttl_s=60)
    assert store.count_by_status()["in_progress"] == 1
    clock.now += 3600
    assert store.get_case(case.id).status is CaseStatus.NEW
    assert [c.id for c in store.list_cases(status="new")] == [case.id] and store.list_cases(status="in_progress") == []
    assert store.count_by_status() == {"new": 1, "in_progress": 0, "submitted": 0, "reviewed": 0}
    # with a draft, it is someone's work in progress: listed as such
    store.lock(case.id, "alice", ttl_s=60)
    store.save_label(case.id, mask(1), "alice", submit=False)
    clock.now += 3600
    assert store.get_case(case.id).status is CaseStatus.IN_PROGRESS


def test_learn_unlock_says_the_case_is_back_to_its_finished_status(tmp_path: Path, capsys):
    root = tmp_path / "store"
    with Datastore(root) as store:
        case, _ = reviewed_case(store)
        store.lock(case.id, "bob")
        store.save_label(case.id, mask(2), "bob", submit=False)
        db = sqlite3.connect(store.root / DB_NAME)
        db.execute("UPDATE cases SET status = 'in_progress'")  # a case of an earlier release, locked
        db.commit()
        db.close()
        assert store.get_case(case.id).status is CaseStatus.IN_PROGRESS  # bob holds it
    assert main(["learn", "unlock", case.id, "--store", str(root), "--user", "bob"]) == 0
    out = capsys.readouterr().out
    assert "back to reviewed, as its latest submitted label left it" in out, out
