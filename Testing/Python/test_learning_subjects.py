"""Subjects (patients) in the learning loop: a subject's cases stay on one side of the hold-out split.

Two images of one patient (ACDC's end-diastole and end-systole frames, follow-up scans, several series
of a study) are near-duplicates: one in training and one in validation inflate the validation Dice that
decides whether a new adapter version is promoted. Here: the split with subjects (siblings together,
a subject with a trained-on case never validates, stable as the store grows, unchanged without
subjects), the datastore's subject column (set at import, by name pattern, later; a schema-1 store
migrated when opened, a newer one refused untouched), ``learn import --subject-pattern`` on two real
ACDC frames, a training run, and the import over HTTP.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import pytest
from learning_fixtures import (
    SCHEMA_1_DDL,
    make_store,
    one_thread,  # noqa: F401  (autouse fixture)
    synthetic_case,
)
from learning_fixtures import tiny_checkpoint as make_checkpoint

from SegAssistLib.cli import main
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.errors import DatastoreError, NotFoundError, StoreAccessError
from SegAssistLib.learning.loop_errors import TrainingError
from SegAssistLib.learning.store_db import DB_NAME, SCHEMA_VERSION
from SegAssistLib.learning.subjects import subject_from_name
from SegAssistLib.learning.traindata import holdout_number, holdout_split, subject_groups

pytest_plugins = ["test_server_fixtures"]

ACDC = "^(patient\\d+)_"


def random_ids(rng: np.random.Generator, n: int) -> List[str]:
    return [f"{int(x):016x}" for x in rng.integers(0, 2**62, n)]


def old_holdout_split(
    case_ids: Sequence[str],
    fraction: float = 0.2,
    min_val: int = 1,
    max_val: int = 8,
    keys: Optional[Mapping[str, str]] = None,
    trained_on=(),
):
    """The split before subjects (``traindata.holdout_split`` of the previous release), frozen here to
    compare with; ``None`` where it refused (its error messages left out)."""
    ids = list(dict.fromkeys(case_ids))
    if len(ids) < 2:
        return None
    number = {c: holdout_number((keys or {}).get(c, c)) for c in ids}
    trained = set(trained_on)
    ranked = [c for c in sorted(ids, key=lambda c: (number[c], c)) if c not in trained]
    below = [c for c in ranked if number[c] < fraction][:max_val]
    n_val = max(len(below), min_val)
    if (n_val > len(ranked) and n_val < len(ids)) or n_val >= len(ids):
        return None
    val = set(ranked[:n_val])
    return [c for c in ids if c not in val], [c for c in ids if c in val]


def split_or_none(*args, **kwargs):
    try:
        return holdout_split(*args, **kwargs)
    except TrainingError:
        return None


def random_subjects(rng: np.random.Generator, ids: Sequence[str], share_own: float = 0.2) -> Dict[str, Optional[str]]:
    """Each case a subject of 1 to 4 cases; about ``share_own`` of them without one (their own)."""
    subjects: Dict[str, Optional[str]] = {}
    i, n = 0, 0
    while i < len(ids):
        size = int(rng.integers(1, 5))
        name = None if rng.random() < share_own else f"patient{n:03d}"
        for c in ids[i : i + size]:
            subjects[c] = name
        i += size
        n += 1
    return subjects


# ---------------------------------------------------------------------------------------- the split


def test_without_subjects_the_split_is_the_one_before_subjects():
    """A store without subjects (every store made before them) splits exactly as it did: same
    validation cases, same refusals, with or without content keys and a training history."""
    rng = np.random.default_rng(11)
    compared = refused = 0
    for _ in range(400):
        n = int(rng.integers(2, 6 if rng.random() < 0.4 else 30))  # small stores: refusals too
        ids = random_ids(rng, n)
        keys = dict(zip(ids, random_ids(rng, n))) if rng.random() < 0.5 else None
        trained = [c for c in ids if rng.random() < 0.3] if rng.random() < 0.5 else []
        fraction = float(rng.choice([0.0, 0.1, 0.2, 0.5]))
        min_val = int(rng.integers(1, 4))
        max_val = min_val + int(rng.integers(0, 6))
        expected = old_holdout_split(ids, fraction, min_val, max_val, keys, trained)
        for subjects in (None, {}, dict.fromkeys(ids)):
            got = split_or_none(ids, fraction, min_val, max_val, keys=keys, trained_on=trained, subjects=subjects)
            assert got == expected
        compared += expected is not None
        refused += expected is None
    assert compared > 200 and refused > 20  # both kinds of answer were compared


def test_a_subjects_cases_always_land_on_the_same_side():
    rng = np.random.default_rng(5)
    split_with_siblings = 0
    for _ in range(500):
        ids = random_ids(rng, int(rng.integers(2, 40)))
        subjects = random_subjects(rng, ids)
        trained = [c for c in ids if rng.random() < 0.15] if rng.random() < 0.5 else []
        order = list(rng.permutation(ids))  # a subject's cases need not come together
        got = split_or_none(order, 0.2, 1, int(rng.integers(1, 9)), trained_on=trained, subjects=subjects)
        if got is None:
            continue
        train, val = got
        assert sorted(train + val) == sorted(ids) and not set(train) & set(val)
        for members in subject_groups(ids, subjects).values():
            assert set(members) <= set(train) or set(members) <= set(val), members
            if set(members) & set(val):  # no validation subject has a case a version saw
                assert not set(members) & set(trained), members
                split_with_siblings += len(members) > 1
    assert split_with_siblings > 50


def test_a_subject_with_a_case_trained_on_never_validates():
    """A version trained on one frame of a patient must not be validated on the other frame: neither
    when the subjects come with the cases nor when they are set after versions trained case by case."""
    rng = np.random.default_rng(2)
    ids = random_ids(rng, 40)
    subjects = {c: f"patient{i // 2:03d}" for i, c in enumerate(ids)}  # two frames per patient
    # case by case (as before subjects), a patient's frames end up on both sides: the leak
    train_old, val_old = holdout_split(ids, 0.2)
    assert {subjects[c] for c in val_old} & {subjects[c] for c in train_old}
    # subjects set afterwards, new patients come: no subject of a trained-on frame validates
    grown = ids + random_ids(rng, 20)
    subjects.update({c: f"patient{20 + i // 2:03d}" for i, c in enumerate(grown[40:])})
    _, val_new = holdout_split(grown, 0.2, subjects=subjects, trained_on=train_old)
    assert val_new and not {subjects[c] for c in val_new} & {subjects[c] for c in train_old}
    # with subjects from the start: the held-out patients validate with both frames ...
    _, val = holdout_split(ids, 0.2, subjects=subjects)
    held = subject_groups(val, subjects)
    assert held and all(len(m) == 2 for m in held.values())
    # ... and one whose first frame a version trained on (a subject set later) keeps the second out too
    first, sibling = next(iter(held.values()))
    _, val_after = holdout_split(ids, 0.2, subjects=subjects, trained_on=[first])
    assert first not in val_after and sibling not in val_after and val_after



def lowest_subject_name(prefix: str = "pat") -> str:
    """A subject name whose hold-out number is below 0.002: its subject ranks first to validate."""
    return next(f"{prefix}{i}" for i in range(100_000) if holdout_number(f"subject:{prefix}{i}") < 0.002)


def test_a_subject_whose_trained_case_left_the_usable_set_never_validates():
    """A version trained on frame A of a patient; A then leaves the usable set (rejected in review, or
    reopened): the patient's other frame B was held out, and the version and its successor were both
    scored on a near-duplicate of A. The subjects of trained-on cases no longer given count too."""
    rng = np.random.default_rng(4)
    others = random_ids(rng, 8)
    frame_a, frame_b = random_ids(rng, 2)
    patient = lowest_subject_name()
    subjects = {frame_a: patient, frame_b: patient}
    assert frame_b in holdout_split([frame_b, *others], 0.2, subjects=subjects)[1]  # no history: B validates
    train, val = holdout_split([frame_b, *others], 0.2, subjects=subjects, trained_on=[frame_a])
    assert frame_b in train and frame_b not in val and val


def test_a_training_run_never_validates_on_the_sibling_of_a_rejected_trained_case(tmp_path: Path):
    """The same through a run: a stored version learned from frame A, which a reviewer then rejected;
    frame B of the same patient, submitted later, trains and never validates."""
    from SegAssistLib.learning.registry import AdapterRegistry
    from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training

    store, cases = make_store(tmp_path / "store", n_labelled=6, n_new=0)
    frame_a, frame_b = cases[0], cases[1]
    patient = lowest_subject_name()  # without the fix B, ranked first, would validate
    store.set_subjects({frame_a.id: patient, frame_b.id: patient})
    store.review(frame_a.id, "bob", accepted=False, note="redo")  # A leaves the usable set
    store.close()
    fields = {"base_identity": "another base", "val_dice": 0.5, "incumbent": None, "incumbent_dice": 0.4,
              "train_cases": [frame_a.id], "val_cases": [cases[5].id]}  # fmt: skip
    AdapterRegistry(tmp_path / "store").add_version(
        "lora", lambda path, _: path.write_bytes(b"weights"), fields, promote=False, expected_current=None
    )
    cfg = AdapterTrainConfig(kind="lora", rank=2, max_steps=2, time_budget_s=60.0, val_clicks=1, seed=0)
    result = run_training(tmp_path / "store", make_checkpoint(tmp_path / "tiny.pt"), cfg)
    assert result.state == "done" and result.version.val_cases, result.reason
    assert frame_b.id in result.version.train_cases and frame_b.id not in result.version.val_cases


def test_the_split_with_subjects_is_stable_as_the_store_grows():
    """New cases arrive, of new subjects or of subjects already there: a case (and so its subject)
    that trained never validates later."""
    rng = np.random.default_rng(9)
    for _ in range(100):
        ids, subjects, trained = [], {}, set()
        for _step in range(25):
            case = random_ids(rng, 1)[0]
            known = sorted({s for s in subjects.values() if s is not None})
            if known and rng.random() < 0.4:
                subjects[case] = str(rng.choice(known))
            else:
                subjects[case] = None if rng.random() < 0.2 else f"s{len(known)}"
            ids.append(case)
            got = split_or_none(ids, 0.2, 1, 4, subjects=subjects)
            if got is None:
                continue
            train, val = got
            assert not trained & set(val)
            trained |= set(train)


def test_subjects_are_held_out_by_name_in_every_store():
    """As images are held out by content, subjects are by name: two stores of the same patients,
    with other random case ids, validate on the same patients."""
    rng = np.random.default_rng(4)
    names = [f"patient{i:03d}" for i in range(30) for _ in range(2)]
    ids_a, ids_b = random_ids(rng, 60), random_ids(rng, 60)
    _, val_a = holdout_split(ids_a, subjects=dict(zip(ids_a, names)))
    _, val_b = holdout_split(ids_b, subjects=dict(zip(ids_b, names)))
    assert {names[ids_a.index(c)] for c in val_a} == {names[ids_b.index(c)] for c in val_b}
    assert len(val_a) >= 2


def test_too_few_subjects_are_refused_with_what_to_do():
    rng = np.random.default_rng(6)
    ids = random_ids(rng, 4)
    with pytest.raises(TrainingError, match="at least 2 subjects.*all belong to subject 'patient001'"):
        holdout_split(ids, subjects=dict.fromkeys(ids, "patient001"))
    # two subjects, both drawn below the validation fraction: nothing left to train on
    names = [n for n in (f"p{i}" for i in range(200)) if holdout_number("subject:" + n) < 0.2]
    low_a, low_b = names[:2]
    subjects = {ids[0]: low_a, ids[1]: low_a, ids[2]: low_b, ids[3]: low_b}
    with pytest.raises(TrainingError, match="all 2 subjects of the 4 usable labelled cases are held out.*one more "
                                            "subject"):  # fmt: skip
        holdout_split(ids, 0.2, subjects=subjects)
    # a third subject (its own: no name); two of the three have a case trained on, two must validate
    more = [*ids, random_ids(rng, 1)[0]]
    with pytest.raises(TrainingError, match="2 of the 3 subjects.*have a case an earlier version was trained on"
                                            ".*submit cases of 1 more subject"):  # fmt: skip
        holdout_split(more, 0.2, min_val=2, subjects=subjects, trained_on=[ids[0], more[-1]])
    assert holdout_split(more, 0.2, subjects=subjects, trained_on=[ids[0], more[-1]])[1] == ids[2:4]


# ---------------------------------------------------------------------------------------- the datastore


def test_subject_from_a_case_name():
    assert subject_from_name("patient001_frame01", ACDC) == "patient001"
    assert subject_from_name("patient001_frame12", r"patient\d+") == "patient001"  # no group: the whole match
    assert subject_from_name("scan7", r"^(patient\d+)_|^.+") == "scan7"  # an alternative: its own subject
    assert subject_from_name("scan7", ACDC) is None
    with pytest.raises(DatastoreError, match="invalid subject pattern"):
        subject_from_name("x", "(")


def test_subjects_set_at_import_and_later(tmp_path: Path):
    with Datastore(tmp_path / "store") as store:
        cases = [
            store.import_volume(synthetic_case(i)[0], name=name, user="admin", subject=subject)
            for i, (name, subject) in enumerate(
                [("patient001_frame01", " patient001 "), ("patient001_frame12", "patient001"), ("scan", None)]
            )
        ]
        a, b, c = (case.id for case in cases)
        assert store.subjects() == {a: "patient001", b: "patient001", c: None}
        assert store.subjects([c, a]) == {c: None, a: "patient001"}
        for bad in ("", "   ", "tab\there", "x" * 300):
            with pytest.raises(DatastoreError):
                store.import_volume(synthetic_case(9)[0], name="bad", user="admin", subject=bad)
        with pytest.raises(NotFoundError):
            store.subjects(["0" * 16])

        # later: one case, then every case from its name; a name the pattern misses changes nothing
        assert store.set_subjects({c: "patient009"}) == {c: "patient009"}
        with pytest.raises(DatastoreError, match=r"finds no subject in 1 of the 3 case name\(s\): 'scan'"):
            store.set_subjects(pattern=ACDC)
        assert store.subjects()[c] == "patient009"
        with pytest.raises(NotFoundError):  # nothing set when one case is not there
            store.set_subjects({a: "other", "f" * 16: "x"})
        assert store.subjects()[a] == "patient001"
        store.set_subjects(pattern=ACDC + "|^.+")
        assert store.subjects() == {a: "patient001", b: "patient001", c: "scan"}
        store.set_subjects({c: None})
        assert store.subjects()[c] is None
        with pytest.raises(DatastoreError, match="--none"):  # a blank subject says how to give none
            store.set_subjects({a: " "})


def test_learn_subject_none_makes_a_case_its_own_subject_again(tmp_path: Path, capsys):
    """``learn subject CASE ' '`` said "give none", which neither the command line nor HTTP could."""
    root = tmp_path / "store"
    store, cases = make_store(root, n_labelled=1, n_new=1)
    a, b = (c.id for c in cases)
    store.set_subjects({a: "patient001", b: "patient001"})
    store.close()

    def subject(*argv: str) -> int:
        return main(["learn", "subject", *argv, "--store", str(root)])

    assert subject(a, "--none") == 0
    assert capsys.readouterr().out.strip() == f"{a}  {cases[0].name}  its own subject"
    assert subject(b, "--none", "--json") == 0 and json.loads(capsys.readouterr().out) == {b: None}
    with Datastore(root, create=False) as store:
        assert store.subjects() == {a: None, b: None}
    assert subject(a, " ") == 2
    err = capsys.readouterr().err
    assert "a subject must not be empty" in err and "learn subject CASE --none" in err
    for wrong in ((a, "patient002", "--none"), (a,), ("--pattern", ACDC, "--none"), ("--none",)):
        assert subject(*wrong) == 2
        assert "CASE --none" in capsys.readouterr().err
    with Datastore(root, create=False) as store:
        assert store.subjects() == {a: None, b: None}


def test_an_import_whose_pattern_misses_a_name_imports_nothing(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    import SimpleITK as sitk

    for name, seed in (("patient001_frame01", 1), ("patient001_frame12", 2), ("odd", 3)):
        sitk.WriteImage(sitk.GetImageFromArray(synthetic_case(seed)[0].array), str(src / f"{name}.nii.gz"))
    with Datastore(tmp_path / "store") as store:
        with pytest.raises(DatastoreError, match="'odd'.*No case was imported"):
            store.import_images(src, user="admin", subject_pattern=ACDC)
        assert store.list_cases() == []
        report = store.import_images(src, user="admin", subject_pattern=ACDC + "|^.+")
        assert sorted(store.subjects([c.id for c in report.added]).values()) == ["odd", "patient001", "patient001"]




def schema_1_store(root: Path, schema_version: str = "1") -> Dict[str, list]:
    """A store as the release before subjects left it: its files, and a database of the schema-1
    tables holding the same rows. Returns the rows, to compare with after opening."""
    store, cases = make_store(root, n_labelled=3, n_new=1)
    store.review(cases[0].id, "bob", accepted=True)
    store.close()
    db = root / DB_NAME
    rebuilt = root.parent / "schema1.sqlite"
    con = sqlite3.connect(rebuilt)
    con.executescript(SCHEMA_1_DDL)
    con.execute("ATTACH DATABASE ? AS current", (str(db),))
    rows = {}
    for table in ("cases", "labels", "image_hashes", "reviews"):
        names = [r[1] for r in con.execute(f"PRAGMA main.table_info({table})")]
        columns = ", ".join(names)
        # a count or a time not given (NULL since schema 3) was written as 0 then
        chosen = ", ".join(f"COALESCE({n}, 0)" if n in ("n_interactions", "seconds_spent") else n for n in names)
        con.execute(f"INSERT INTO main.{table} ({columns}) SELECT {chosen} FROM current.{table}")
        rows[table] = con.execute(f"SELECT {columns} FROM main.{table} ORDER BY rowid").fetchall()
    con.execute("INSERT INTO main.meta (key, value) VALUES ('schema_version', ?)", (schema_version,))
    con.commit()
    con.execute("DETACH DATABASE current")
    con.close()
    for leftover in (db, db.with_name(DB_NAME + "-wal"), db.with_name(DB_NAME + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.move(rebuilt, db)
    return rows


def columns_of(db: Path, table: str = "cases") -> List[str]:
    con = sqlite3.connect(db)
    try:
        return [r[1] for r in con.execute(f"PRAGMA table_info({table})")]
    finally:
        con.close()


def test_a_schema_1_store_is_migrated_when_opened_and_keeps_everything(tmp_path: Path):
    root = tmp_path / "store"
    rows = schema_1_store(root)
    assert "subject" not in columns_of(root / DB_NAME)
    with Datastore(root, create=False) as store:
        cases = store.list_cases()
        assert [c.id for c in cases] == [r[0] for r in rows["cases"]]
        assert store.subjects() == dict.fromkeys((c.id for c in cases), None)  # each case its own subject
        assert store.verify().ok and not store.verify().orphans
        for case in rows["cases"]:
            store.load_image(case[0])
        for label in rows["labels"]:
            assert store.load_label(label[0]).any()
        assert len(store.reviews(cases[0].id)) == 1 and len(store.training_cases()) == 3
        # the migrated store splits as before, and takes subjects now
        pairs = store.training_cases()
        ids = [c.id for c, _ in pairs]
        keys = {c.id: c.content_hash for c, _ in pairs}
        assert split_or_none(ids, keys=keys, subjects=store.subjects(ids)) == old_holdout_split(ids, keys=keys)
        store.set_subjects({cases[0].id: "patient001"})
    assert "subject" in columns_of(root / DB_NAME)
    con = sqlite3.connect(root / DB_NAME)
    try:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        for table, before in rows.items():  # every row as it was, the new column aside
            columns = ", ".join(r[1] for r in con.execute(f"PRAGMA table_info({table})") if r[1] != "subject")
            after = con.execute(f"SELECT {columns} FROM {table} ORDER BY rowid").fetchall()
            if table == "cases":  # set_subjects above stamped updated_at of its case
                after = [r[:-1] for r in after]
                before = [r[:-1] for r in before]
            assert after == before, table
    finally:
        con.close()
    with Datastore(root, create=False) as store:  # opened again: nothing left to migrate
        assert store.subjects()[rows["cases"][0][0]] == "patient001"


@pytest.mark.parametrize(
    "image_hashes, journal", [(True, "wal"), (False, "delete")], ids=["schema-1", "early-schema-1"]
)
def test_a_schema_1_store_this_user_can_only_read_is_read_every_case_its_own_subject(
    tmp_path: Path, image_hashes: bool, journal: str
):
    """Refused since subjects ("needs its schema 1 upgraded"): read as it is now, every case its own
    subject (as the upgrade makes it). A store of the first schema-1 releases has no image_hashes table.
    A WAL database is read as it is on disk; another opens as usual, its upgrade refused by the disk."""
    from test_learning_datastore import _read_only_runner

    root = tmp_path / "store"
    rows = schema_1_store(root)
    con = sqlite3.connect(root / DB_NAME)
    if not image_hashes:
        con.execute("DROP TABLE image_hashes")
        con.commit()
    assert con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0] == journal
    con.close()
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    run, undo = _read_only_runner(root)
    try:
        listed = run("learn", "cases", "--store", str(root), "--json")
        assert listed.returncode == 0, listed.stderr
        cases = json.loads(listed.stdout)
        assert [c["id"] for c in cases] == [r[0] for r in rows["cases"]]
        assert [c["subject"] for c in cases] == [None] * len(cases)
        status = run("learn", "status", "--store", str(root), "--json")
        assert status.returncode == 0 and json.loads(status.stdout)["cases"]["submitted"] == 2, status.stderr
        verified = run("learn", "verify", "--store", str(root), "--json")
        assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True, verified.stderr
        out = tmp_path / "export"
        exported = run("learn", "export", str(out), "--store", str(root), "--no-seg-nrrd")
        assert exported.returncode == 0, exported.stderr
        provenance = json.loads((out / "dataset.json").read_text())["segassist"]["cases"]
        assert len(provenance) == 3 and [c["subject"] for c in provenance] == [None] * 3
        named = run("learn", "subject", cases[0]["id"], "p1", "--store", str(root))
        assert named.returncode == 2 and f"datastore {root} is read-only here" in named.stderr, named.stderr
    finally:
        undo()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files  # not upgraded, nothing written
    assert columns_of(root / DB_NAME)[-1] != "subject"


def test_a_store_of_a_newer_schema_is_refused_and_left_untouched(tmp_path: Path):
    root = tmp_path / "store"
    schema_1_store(root, schema_version=str(SCHEMA_VERSION + 1))
    before = columns_of(root / DB_NAME)
    with pytest.raises(DatastoreError, match="newer than this SegAssist reads.*upgrade SegAssist"):
        Datastore(root, create=False)
    assert columns_of(root / DB_NAME) == before and "subject" not in before


def test_a_newer_store_that_dropped_a_table_and_an_index_is_refused_before_anything_is_written(tmp_path: Path):
    """The schema's CREATE ... IF NOT EXISTS ran (each statement committed) before the version was read:
    an older SegAssist made again what a newer schema had dropped, then refused the store."""
    import gc

    root = tmp_path / "store"
    store, _ = make_store(root, n_labelled=1, n_new=1)
    store.close()
    db = root / DB_NAME
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.execute("DROP INDEX cases_status")
    con.execute("DROP TABLE image_hashes")
    con.commit()
    con.close()

    def schema() -> list:
        con = sqlite3.connect(db)
        try:
            return con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        finally:
            con.close()

    before, file_before = schema(), db.read_bytes()
    assert "image_hashes" not in {row[1] for row in before}
    with pytest.raises(DatastoreError, match="newer than this SegAssist reads"):
        Datastore(root, create=False)
    gc.collect()  # a connection the refusal left open is closed (and checkpointed) now, not later
    assert db.read_bytes() == file_before
    assert schema() == before
    assert not db.with_name(DB_NAME + "-wal").exists()


# ---------------------------------------------------------------------------------------- command line


@pytest.fixture
def acdc_frames(shared_data: Path, tmp_path: Path) -> Path:
    """Both frames of one ACDC patient (end-diastole, end-systole) and one frame of another."""
    src = tmp_path / "acdc"
    src.mkdir()
    for name in ("patient001_frame01", "patient001_frame02", "patient002_frame01"):
        path = shared_data / "acdc" / "imagesTr" / f"{name}.nii.gz"
        if not path.is_file():
            pytest.skip(f"{path} not found")
        shutil.copy(path, src / path.name)
    return src


def test_learn_import_draws_each_cases_subject_from_its_name(acdc_frames: Path, tmp_path: Path, capsys):
    store_root = tmp_path / "store"
    argv = ["learn", "import", str(acdc_frames), "--store", str(store_root), "--user", "admin"]
    # a pattern that misses a name: said with the name, before anything is imported or a store made
    assert main([*argv, "--subject-pattern", "^(case\\d+)"]) == 2
    assert "patient001_frame01" in capsys.readouterr().err and not store_root.exists()
    assert main([*argv, "--subject-pattern", "("]) == 2
    assert "invalid subject pattern" in capsys.readouterr().err and not store_root.exists()

    assert main([*argv, "--subject-pattern", ACDC, "--json"]) == 0
    out, err = capsys.readouterr()
    added = {c["name"]: c for c in json.loads(out)["added"]}
    assert {name: c["subject"] for name, c in added.items()} == {
        "patient001_frame01": "patient001", "patient001_frame02": "patient001", "patient002_frame01": "patient002"
    }  # fmt: skip
    assert "(subject patient001)" in err
    with Datastore(store_root, create=False) as store:
        assert store.subjects() == {c["id"]: c["subject"] for c in added.values()}
    assert main(["learn", "cases", "--store", str(store_root)]) == 0
    assert capsys.readouterr().out.count("(subject patient001)") == 2

    # without a pattern each case is its own subject; set later, by case or by pattern
    other = tmp_path / "other"
    assert main(["learn", "import", str(acdc_frames), "--store", str(other), "--user", "admin"]) == 0
    capsys.readouterr()
    assert main(["learn", "cases", "--store", str(other), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["subject"] for c in listed] == [None, None, None]
    first = listed[0]["id"]
    assert main(["learn", "subject", first, "someone", "--store", str(other)]) == 0
    assert "subject someone" in capsys.readouterr().out
    assert main(["learn", "subject", "--store", str(other)]) == 2
    assert "CASE SUBJECT, CASE --none (the case its own subject), or --pattern" in capsys.readouterr().err
    assert main(["learn", "subject", "--pattern", ACDC, "--store", str(other), "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out).values()) == ["patient001", "patient001", "patient002"]


# ---------------------------------------------------------------------------------------- training


def test_a_training_run_validates_on_whole_subjects(tmp_path: Path):
    from SegAssistLib.learning.trainer import AdapterTrainConfig, run_training

    store, cases = make_store(tmp_path / "store", n_labelled=6, n_new=0)
    # three patients of two cases each, named so that one of them is held out
    names = next(
        trio for trio in ([f"a{i}", f"b{i}", f"c{i}"] for i in range(100))
        if sum(holdout_number("subject:" + n) < 0.2 for n in trio) == 1
    )  # fmt: skip
    store.set_subjects({c.id: names[i // 2] for i, c in enumerate(cases)})
    store.close()
    statuses = []
    cfg = AdapterTrainConfig(kind="lora", rank=2, max_steps=2, time_budget_s=60.0, val_clicks=1, seed=0,
                             status_every_s=0.0)  # fmt: skip
    result = run_training(tmp_path / "store", make_checkpoint(tmp_path / "tiny.pt"), cfg, on_progress=statuses.append)
    held = [c.id for i, c in enumerate(cases) if holdout_number("subject:" + names[i // 2]) < 0.2]
    assert result.state == "done" and result.version.val_cases == held and len(held) == 2
    assert result.val_subjects == 1 and statuses[-1]["val_subjects"] == 1 and statuses[-1]["val_cases"] == 2
    assert not set(result.version.train_cases) & set(held)


def test_validation_weighs_each_subject_once():
    """Two held-out frames of one patient and one image of another: the patient does not count twice."""
    import tempfile

    from SegAssistLib.engine.builtin import BuiltinEngine
    from SegAssistLib.learning.traindata import load_labelled, usable_cases
    from SegAssistLib.learning.validation import validate

    with tempfile.TemporaryDirectory() as folder:
        store, _ = make_store(Path(folder) / "store", n_labelled=3, n_new=0)
        cases = load_labelled(store, usable_cases(store))
        store.close()
        engine = BuiltinEngine.from_checkpoint(make_checkpoint(Path(folder) / "tiny.pt"))
        a, b, c = (case.case.id for case in cases)
        plain = validate(engine, cases, n_clicks=2)
        grouped = validate(engine, cases, n_clicks=2, groups={a: "subject:p1", b: "subject:p1"})
    score = {k: float(np.mean(v)) for k, v in plain.per_case.items()}
    assert grouped.per_case == plain.per_case  # the same sessions, only weighed otherwise
    assert plain.dice == pytest.approx(np.mean([score[a], score[b], score[c]]))
    assert grouped.dice == pytest.approx(np.mean([(score[a] + score[b]) / 2, score[c]]))
    first = {k: v[0] for k, v in plain.per_case.items()}
    assert grouped.first_click_dice == pytest.approx(np.mean([(first[a] + first[b]) / 2, first[c]]))


def test_an_export_names_each_cases_subject(tmp_path: Path):
    from SegAssistLib.learning.export import export_msd

    store, cases = make_store(tmp_path / "store", n_labelled=3, n_new=0)
    store.set_subjects({cases[0].id: "patient001", cases[1].id: "patient001"})
    out = export_msd(store, tmp_path / "export", label_names=("object",), seg_nrrd=False)
    store.close()
    exported = json.loads((out / "dataset.json").read_text())["segassist"]["cases"]
    assert {c["case_id"]: c["subject"] for c in exported} == {
        cases[0].id: "patient001", cases[1].id: "patient001", cases[2].id: None,
    }  # fmt: skip


def test_a_store_of_one_subject_is_refused_before_a_training_process_starts(tmp_path: Path):
    from SegAssistLib.learning.jobs import list_jobs, start_training, training_running

    store, cases = make_store(tmp_path / "store", n_labelled=3, n_new=0)
    store.set_subjects({c.id: "patient001" for c in cases})
    store.close()
    with pytest.raises(TrainingError, match="at least 2 subjects.*all belong to subject 'patient001'"):
        start_training(tmp_path / "store", make_checkpoint(tmp_path / "tiny.pt"))
    assert list_jobs(tmp_path / "store") == [] and not training_running(tmp_path / "store")


# ---------------------------------------------------------------------------------------- over HTTP


def test_import_over_http_with_a_subject(server_factory, tmp_path: Path):
    from test_server_fixtures import TOKENS, raw

    from SegAssistLib.client import SegAssistClient

    server = server_factory.start(learn_store=tmp_path / "store")
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 60.0)) as alice:
        first = alice.learning.import_image(synthetic_case(1)[0], name="patient001_frame01", subject="patient001")
        plain = alice.learning.import_image(synthetic_case(2)[0], name="scan")
        assert first.subject == "patient001" and plain.subject is None
        assert [c.subject for c in alice.learning.cases()] == ["patient001", None]
        assert alice.learning.case(first.id).subject == "patient001"
        assert alice.learning.lock(first.id).subject == "patient001"
        image_id = alice.ensure_image(synthetic_case(3)[0])
    for bad in ("", " ", "x" * 300):
        reply = raw(server, "POST", "/v1/learn/cases", json={"image_id": image_id, "name": "n", "subject": bad})
        assert reply.status_code == 422, (bad, reply.text)


def test_a_schema_1_store_read_as_it_is_lists_its_cases_in_import_order_by_their_rowid(tmp_path: Path, monkeypatch):
    """Read as it is, a schema-1 store's cases come through a view adding ``subject``; a view has no
    rowid of its own (the case lists' tie-break): an error in SQLite >= 3.36 built without
    SQLITE_ALLOW_ROWID_IN_VIEW ("no such column: c.rowid", every listing failed), NULL with it (ties
    in no order). The view names the table's rowid."""
    import sqlite3 as sqlite

    root = tmp_path / "store"
    rows = schema_1_store(root)
    con = sqlite.connect(root / DB_NAME)
    expected = [r[0] for r in con.execute("SELECT id FROM cases ORDER BY rowid")]
    con.execute("UPDATE cases SET imported_at = 1.0")  # one import time: the rowid decides the order
    con.commit()
    con.close()

    def refused_by_the_disk(self):
        cause = sqlite.OperationalError("attempt to write a readonly database")
        raise StoreAccessError("read-only", "read-only") from cause

    monkeypatch.setattr(Datastore, "_upgrade", refused_by_the_disk)
    store = Datastore(root, create=False)
    try:
        assert store.read_only
        view_rowids = [r[0] for r in store._conn.execute("SELECT rowid FROM cases ORDER BY rowid")]
        table_rowids = [r[0] for r in store._conn.execute("SELECT rowid FROM main.cases ORDER BY rowid")]
        assert view_rowids == table_rowids and None not in view_rowids
        assert [c.id for c in store.list_cases()] == expected and len(expected) == len(rows["cases"])
    finally:
        store.close()
