"""The datastore never loses annotations to a database that lost rows or holds no SegAssist schema.

- ``recover`` deleted every complete image or label file without a row, as it deletes temporary files:
  after the database was restored from a backup, every label saved since (the only copy) was deleted.
  It now deletes temporary files only and moves the others to ``quarantine/``.
- A 0-byte ``segassist.sqlite`` was quietly set up as a new, empty store (``learn cases``: "no case";
  ``verify``: all fine; ``--recover``: every image and label deleted).
- A foreign SQLite file (another program's) was turned into a store by a read command.
- A case's first label went into a new folder whose own entry in ``labels/`` was never synced.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest

from SegAssistLib import files as files_module
from SegAssistLib.cli import main
from SegAssistLib.image import Volume
from SegAssistLib.learning.datastore import Datastore, open_datastore
from SegAssistLib.learning.errors import DamagedStoreError, DatastoreError
from SegAssistLib.learning.store_db import DB_NAME

SHAPE = (6, 7, 8)


def volume(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume((rng.random(SHAPE) * 100).astype(np.int16), spacing=(1.0, 1.0, 2.0))


def mask(value: int = 1) -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[1:4, 2:5, 3:6] = value
    return m


def stored_files(root: Path) -> List[Path]:
    return sorted(p for sub in ("images", "labels") for p in (root / sub).rglob("*") if p.is_file())


def age(paths: List[Path], seconds: float = 3600.0) -> None:
    then = time.time() - seconds
    for path in paths:
        os.utime(path, (then, then))


def run(capsys, *argv: str) -> Tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def store_with_backup(root: Path, backup: Path) -> Tuple[str, Path]:
    """A store whose database was backed up after a draft, then got a submitted label: the case id and
    the file of the label saved after the backup."""
    with Datastore(root) as store:
        case = store.import_volume(volume(1), name="a", user="admin")
        store.save_label(case.id, mask(1), "alice", submit=False)
        src, dst = sqlite3.connect(root / DB_NAME), sqlite3.connect(backup)
        src.backup(dst)
        src.close()
        dst.close()
        later = store.save_label(case.id, mask(2), "alice")
        return case.id, store.label_path(case.id, later.id)


def restore(root: Path, backup: Path) -> None:
    (root / DB_NAME).write_bytes(backup.read_bytes())
    for extra in ("-wal", "-shm"):
        (root / (DB_NAME + extra)).unlink(missing_ok=True)


def test_recover_after_a_restored_backup_moves_the_newer_label_to_quarantine_never_deletes_it(tmp_path: Path):
    root, backup = tmp_path / "store", tmp_path / "backup.sqlite"
    case_id, newer = store_with_backup(root, backup)
    content = newer.read_bytes()
    restore(root, backup)
    temporary = root / "labels" / case_id / ".tmp-0123456789ab-x.nii.gz"
    temporary.write_bytes(b"partial")
    age(stored_files(root))

    with Datastore(root, create=False) as store:
        report = store.verify()
        relative = newer.relative_to(root).as_posix()
        assert report.ok and report.unrecorded == (relative,) and report.temporary == (temporary.relative_to(
            root).as_posix(),)  # fmt: skip
        recovery = store.recover()
        assert recovery.removed == (temporary.relative_to(root).as_posix(),)
        assert [old for old, _ in recovery.quarantined] == [relative]
        moved = root / recovery.quarantined[0][1]
        assert moved.is_relative_to(store.quarantine_folder()) and moved.read_bytes() == content
        assert moved.name == newer.name and moved.parent.name == case_id  # under its path in the store
        assert not newer.exists() and not temporary.exists()
        assert store.verify().orphans == () and store.quarantined_files() == [moved]
        assert len(store.label_versions(case_id)) == 1  # the backup's draft, still readable
        assert store.load_label(store.latest_label(case_id).id).max() == 1


def test_learn_verify_recover_says_where_the_unrecorded_label_went(tmp_path: Path, capsys):
    root, backup = tmp_path / "store", tmp_path / "backup.sqlite"
    case_id, newer = store_with_backup(root, backup)
    restore(root, backup)
    age(stored_files(root))
    relative = newer.relative_to(root).as_posix()

    code, out, err = run(capsys, "learn", "verify", "--store", str(root))
    assert code == 0, err
    assert f"1 complete image or label file(s) that no record names: {relative}" in out, out
    assert "restored from an older backup" in out and "--recover moves those" in out and newer.exists()

    code, out, err = run(capsys, "learn", "verify", "--store", str(root), "--recover", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [q["file"] for q in data["quarantined"]] == [relative] and data["removed"] == []
    moved = root / data["quarantined"][0]["moved_to"]
    assert moved.is_file() and data["files_in_quarantine"] == 1 and not newer.exists()
    code, out, _ = run(capsys, "learn", "verify", "--store", str(root))
    assert code == 0 and f"1 file(s) in {root / 'quarantine'}" in out, out


def make_stored(root: Path) -> List[Path]:
    with Datastore(root) as store:
        case = store.import_volume(volume(2), name="b", user="admin")
        store.save_label(case.id, mask(), "alice")
    return stored_files(root)


@pytest.mark.parametrize("create", [False, True])
def test_an_empty_database_beside_stored_files_is_refused_and_nothing_is_touched(tmp_path: Path, create: bool):
    root = tmp_path / "store"
    files = make_stored(root)
    contents = [p.read_bytes() for p in files]
    for extra in ("-wal", "-shm"):
        (root / (DB_NAME + extra)).unlink(missing_ok=True)
    (root / DB_NAME).write_bytes(b"")  # emptied
    with pytest.raises(DamagedStoreError, match="database segassist.sqlite is empty, yet its images/ and labels/ hold"):
        Datastore(root, create=create)
    assert (root / DB_NAME).stat().st_size == 0 and stored_files(root) == files
    assert [p.read_bytes() for p in files] == contents


def test_learn_cases_and_verify_refuse_a_0_byte_database_beside_stored_files(tmp_path: Path, capsys):
    root = tmp_path / "store"
    files = make_stored(root)
    (root / DB_NAME).write_bytes(b"")
    for extra in ("-wal", "-shm"):
        (root / (DB_NAME + extra)).unlink(missing_ok=True)
    for command in (["cases"], ["verify", "--recover"]):
        code, out, err = run(capsys, "learn", *command, "--store", str(root))
        assert code == 2 and out == "" and "is empty, yet its images/ and labels/ hold files" in err, (command, err)
    assert stored_files(root) == files


def test_an_empty_database_without_stored_files_is_a_new_store_only_when_making_one(tmp_path: Path):
    root = tmp_path / "store"
    root.mkdir()
    (root / DB_NAME).write_bytes(b"")  # what another process making the store has just created
    with pytest.raises(DatastoreError, match="no SegAssist datastore at .*is empty"):
        open_datastore(root)
    assert sorted(os.listdir(root)) == [DB_NAME] and (root / DB_NAME).stat().st_size == 0
    with Datastore(root, create=True) as store:
        assert store.list_cases() == []
    with open_datastore(root) as store:
        assert store.count_by_status()["new"] == 0


def foreign_database(path: Path, tables: Tuple[str, ...] = ("foo",)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    for table in tables:
        con.execute(f"CREATE TABLE {table} (a)")
        con.execute(f"INSERT INTO {table} VALUES (1)")
    con.commit()
    con.close()


def schema(path: Path) -> Tuple[list, str]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall(),
                con.execute("PRAGMA journal_mode").fetchone()[0])  # fmt: skip
    finally:
        con.close()


@pytest.mark.parametrize("create", [False, True])
def test_a_foreign_sqlite_file_is_refused_and_left_as_it_was(tmp_path: Path, create: bool):
    root = tmp_path / "other"
    foreign_database(root / DB_NAME)
    before, data = schema(root / DB_NAME), (root / DB_NAME).read_bytes()
    with pytest.raises(DamagedStoreError, match=r"is not a SegAssist datastore \(it holds the table\(s\) foo"):
        Datastore(root, create=create)
    assert schema(root / DB_NAME) == before and (root / DB_NAME).read_bytes() == data
    assert sorted(os.listdir(root)) == [DB_NAME]  # no images/, labels/, -wal


def test_learn_cases_on_a_foreign_database_exits_2_and_writes_nothing(tmp_path: Path, capsys):
    root = tmp_path / "other"
    foreign_database(root / DB_NAME)
    before = schema(root / DB_NAME)
    code, out, err = run(capsys, "learn", "cases", "--store", str(root))
    assert code == 2 and out == "" and "is not a SegAssist datastore" in err, err
    assert len(err.strip().splitlines()) == 1
    assert schema(root / DB_NAME) == before and sorted(os.listdir(root)) == [DB_NAME]


def test_a_store_database_that_lost_its_schema_version_is_refused(tmp_path: Path):
    root = tmp_path / "store"
    make_stored(root)
    con = sqlite3.connect(root / DB_NAME)
    con.execute("DELETE FROM meta")
    con.commit()
    con.close()
    with pytest.raises(DamagedStoreError, match="no SegAssist schema version"):
        open_datastore(root)
    con = sqlite3.connect(root / DB_NAME)
    assert con.execute("SELECT COUNT(*) FROM cases").fetchone()[0] == 1  # nothing set up over it
    con.close()


def test_a_cases_first_label_folder_is_synced_in_labels(tmp_path: Path, monkeypatch):
    """The first label of a case makes labels/<case id>/: its entry in labels/ is synced too, or a power
    loss could lose the folder while the label's row survives."""
    synced: List[Path] = []
    real = files_module.fsync_dir
    monkeypatch.setattr(files_module, "fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder)))
    with Datastore(tmp_path / "store") as store:
        case = store.import_volume(volume(3), name="c", user="admin")
        synced.clear()
        store.save_label(case.id, mask(), "alice")
        assert store.root / "labels" in synced and store.root / "labels" / case.id in synced
