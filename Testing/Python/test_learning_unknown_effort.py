"""A label version whose number of prompts (or time spent) is unknown says so: never 0.

A mask saved without a prompt log (``learn save`` with a mask file only, a mask over HTTP) claimed "0
interactions" and "0 seconds", false provenance that statistics then counted as a case made without a
click. Schema 3 stores unknown as NULL. Here: a schema-2 store (the tables the release before wrote,
with rows) upgraded when opened, every row and value kept; an upgrade that fails or is killed midway
leaving the schema-2 store as it was; two processes opening it at once upgrading it once; and an
unknown count read back as None / null through the Python API, ``segassist learn``, the export and
a real server on loopback, while a save with a prompt log still counts its prompts.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import SimpleITK as sitk
from learning_fixtures import SCHEMA_2_DDL
from test_server_fixtures import TOKENS, raw
from test_server_fixtures import make_volume as server_volume

from SegAssistLib.api_models import ArrayPayload
from SegAssistLib.cli import main
from SegAssistLib.client import SegAssistClient
from SegAssistLib.image import Volume
from SegAssistLib.io import volume_to_sitk
from SegAssistLib.learning import datastore as datastore_module
from SegAssistLib.learning import export_msd
from SegAssistLib.learning.datastore import Datastore
from SegAssistLib.learning.errors import StoreAccessError
from SegAssistLib.learning.store_db import DB_NAME
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import PointPrompt
from SegAssistLib.transport import available_codecs

pytest_plugins = ["test_server_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SHAPE = (8, 10, 12)  # array order k, j, i

TABLES = ("cases", "labels", "image_hashes", "reviews", "meta")


def make_volume(seed: int) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(array=(rng.random(SHAPE) * 100 + seed).astype(np.int16), spacing=(0.8, 0.9, 2.0))


def box() -> np.ndarray:
    m = np.zeros(SHAPE, np.uint8)
    m[2:5, 3:6, 4:8] = 1
    return m


def three_prompts() -> PromptLog:
    return PromptLog(model="builtin-v1", prompts=[PointPrompt(position=(3 + i, 4, 3)) for i in range(3)])


def table_rows(db: Path) -> Dict[str, list]:
    """Every row of every table, every column, in rowid order (the order of saving)."""
    con = sqlite3.connect(db)
    try:
        out = {}
        for table in TABLES:
            columns = ", ".join(r[1] for r in con.execute(f"PRAGMA table_info({table})"))
            out[table] = con.execute(f"SELECT {columns} FROM {table} ORDER BY rowid").fetchall()
        return out
    finally:
        con.close()


def schema_of(db: Path) -> List[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    finally:
        con.close()


def nullable(db: Path) -> Dict[str, bool]:
    """labels.n_interactions and labels.seconds_spent: may each be NULL?"""
    con = sqlite3.connect(db)
    try:
        info = {r[1]: not r[3] for r in con.execute("PRAGMA table_info(labels)")}
        return {name: info[name] for name in ("n_interactions", "seconds_spent")}
    finally:
        con.close()


def schema_2_store(root: Path) -> Dict[str, list]:
    """A store as the release before left it: its files, and a database of the schema-2 tables holding
    the same rows, a label's unknown count and time written as 0 (what that release recorded). Three
    cases: a mask saved without a log (0, 0), one with a log of three prompts and 12.5 s, a draft with
    7 prompts and 30 s given; a review points at the first label. Returns the rows."""
    store = Datastore(root)
    a, b, c = (store.import_volume(make_volume(i), name=f"case_{i}", user="admin") for i in range(3))
    store.save_label(a.id, box(), "alice")
    store.save_label(b.id, box(), "alice", prompt_log=three_prompts(), model="builtin-v1", seconds_spent=12.5)
    store.lock(c.id, "bob")
    store.save_label(c.id, box(), "bob", n_interactions=7, seconds_spent=30.0, submit=False)
    store.review(a.id, "carol", accepted=True, note="fine")
    store.close()
    db = root / DB_NAME
    rebuilt = root.parent / "schema2.sqlite"
    con = sqlite3.connect(rebuilt)
    con.executescript(SCHEMA_2_DDL)
    con.execute("ATTACH DATABASE ? AS current", (str(db),))
    for table in ("cases", "labels", "image_hashes", "reviews"):
        names = [r[1] for r in con.execute(f"PRAGMA main.table_info({table})")]
        # what the schema-2 release wrote for a count or a time not given
        chosen = [f"COALESCE({n}, 0)" if n in ("n_interactions", "seconds_spent") else n for n in names]
        con.execute(
            f"INSERT INTO main.{table} (rowid, {', '.join(names)}) "
            f"SELECT rowid, {', '.join(chosen)} FROM current.{table} ORDER BY rowid"
        )
    con.execute("INSERT INTO main.meta (key, value) VALUES ('schema_version', '2')")
    con.commit()
    con.execute("DETACH DATABASE current")
    con.close()
    for leftover in (db, db.with_name(DB_NAME + "-wal"), db.with_name(DB_NAME + "-shm")):
        leftover.unlink(missing_ok=True)
    shutil.move(rebuilt, db)
    rows = table_rows(db)
    assert [r[8:10] for r in rows["labels"]] == [(0, 0.0), (3, 12.5), (7, 30.0)]  # n_interactions, seconds_spent
    assert nullable(db) == {"n_interactions": False, "seconds_spent": False}
    return rows


def schema_version(db: Path) -> str:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    finally:
        con.close()


# ------------------------------------------------------------------------------- the upgrade 2 -> 3


def test_a_schema_2_store_is_upgraded_to_3_when_opened_keeping_every_row_and_value(tmp_path: Path):
    root = tmp_path / "store"
    before = schema_2_store(root)
    db = root / DB_NAME
    with Datastore(root, create=False) as store:
        assert store._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1  # checked again after the rebuild
        cases = store.list_cases()
        assert [c.id for c in cases] == [r[0] for r in before["cases"]]
        labels = [store.label_versions(c.id)[0] for c in cases]
        # the 0 the old release recorded stays 0: the store cannot tell a default from a count
        assert [(v.n_interactions, v.seconds_spent) for v in labels] == [(0, 0.0), (3, 12.5), (7, 30.0)]
        assert [v.has_prompt_log for v in labels] == [False, True, False]
        assert store.prompt_log(labels[1].id) == three_prompts()
        assert [r.note for r in store.reviews(cases[0].id)] == ["fine"]
        assert store.verify().ok and not store.verify().orphans
        assert all(store.load_label(v.id).any() for v in labels)
        assert [c.id for c, _ in store.training_cases()] == [cases[0].id, cases[1].id]

        # a new save without a log (a mask file) reads back unknown; explicit counts as given
        new = store.import_volume(make_volume(7), name="new", user="admin")
        unknown = store.save_label(new.id, box(), "dave")
        assert (unknown.n_interactions, unknown.seconds_spent) == (None, None)
        store.lock(new.id, "dave")
        counted = store.save_label(new.id, box(), "dave", prompt_log=three_prompts(), seconds_spent=4)
        assert (counted.n_interactions, counted.seconds_spent) == (3, 4.0)
    assert schema_version(db) == "3"
    assert nullable(db) == {"n_interactions": True, "seconds_spent": True}
    after = table_rows(db)
    for table, rows in before.items():
        if table == "meta":
            assert dict(after["meta"]) == {**dict(rows), "schema_version": "3"}
        elif table == "labels":
            assert after[table][: len(rows)] == rows, table  # rowids kept: the same order
            assert [r[8:10] for r in after[table][len(rows):]] == [(None, None), (3, 4.0)]
        elif table != "cases":  # the new case and its lock changed that table
            assert after[table][: len(rows)] == rows, table
    assert after["cases"][: len(before["cases"])] == before["cases"]
    con = sqlite3.connect(db)
    try:  # the constraints and the index of the labels table came along
        assert {r[3] for r in con.execute("PRAGMA index_list(labels)") if r[2]} == {"pk", "u"}  # id, (case, version)
        assert not con.execute("SELECT name FROM sqlite_master WHERE name = 'labels_v3'").fetchall()
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        con.execute("PRAGMA foreign_keys=ON")
        with pytest.raises(sqlite3.IntegrityError):  # (case_id, version) is unique still
            con.execute("INSERT INTO labels SELECT * FROM labels LIMIT 1")
        with pytest.raises(sqlite3.IntegrityError):  # a review names a label that exists
            con.execute("INSERT INTO reviews VALUES ('r', 'no-such-label', 'x', 1, NULL, 0)")
        with pytest.raises(sqlite3.IntegrityError):  # the other columns kept their NOT NULL
            con.execute("UPDATE labels SET user = NULL")
    finally:
        con.close()
    schema = schema_of(db)
    with Datastore(root, create=False):  # opened again: nothing left to upgrade
        pass
    assert schema_of(db) == schema and schema_version(db) == "3"


def journal(db: Path, mode: str) -> None:
    """Set the database's journal mode (WAL stays in the file: what a store made by SegAssist has)."""
    con = sqlite3.connect(db)
    try:
        assert con.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode
    finally:
        con.close()


@pytest.mark.parametrize("mode", ["wal", "delete"])
def test_a_schema_2_store_this_user_can_only_read_is_read_as_it_is(tmp_path: Path, mode: str):
    """Since schema 3, a schema-2 store on a read-only disk (or another user's) was refused ("needs its
    schema 2 upgraded to 3") where the release before read it: `learn status`, `cases`, `export`. A WAL
    database (as SegAssist makes them) is read as it is on disk; one of another journal mode opens as
    usual, and its upgrade is refused by the disk."""
    from test_learning_datastore import _read_only_runner

    root = tmp_path / "store"
    before = schema_2_store(root)
    journal(root / DB_NAME, mode)
    files = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    case_ids = [r[0] for r in before["cases"]]
    run, undo = _read_only_runner(root)
    try:
        status = run("learn", "status", "--store", str(root), "--json")
        assert status.returncode == 0, status.stderr
        counts = json.loads(status.stdout)["cases"]
        assert (counts["reviewed"], counts["submitted"], counts["in_progress"]) == (1, 1, 1), counts
        listed = run("learn", "cases", "--store", str(root), "--json")
        assert listed.returncode == 0, listed.stderr
        assert [c["id"] for c in json.loads(listed.stdout)] == case_ids
        assert [c["n_labels"] for c in json.loads(listed.stdout)] == [1, 1, 1]
        verified = run("learn", "verify", "--store", str(root), "--json")
        assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True, verified.stderr
        out = tmp_path / "export"
        exported = run("learn", "export", str(out), "--store", str(root), "--no-seg-nrrd")
        assert exported.returncode == 0, exported.stderr
        provenance = json.loads((out / "dataset.json").read_text())["segassist"]["cases"]
        # read as stored: the 0 the schema-2 release recorded (as the upgrade keeps it)
        assert [(c["case_id"], c["n_interactions"], c["seconds_spent"]) for c in provenance] == [
            (case_ids[0], 0, 0.0),
            (case_ids[1], 3, 12.5),
        ]
        locked = run("learn", "lock", case_ids[1], "--user", "bob", "--store", str(root))
        assert locked.returncode == 2 and f"datastore {root} is read-only here" in locked.stderr, locked.stderr
    finally:
        undo()
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == files  # not upgraded, nothing written
    assert schema_version(root / DB_NAME) == "2"


def test_a_schema_2_store_whose_upgrade_is_refused_as_read_only_is_read_as_it_is(tmp_path: Path, monkeypatch):
    """A store a writer holds open is read through that one's WAL index, not as a read-only file: the
    upgrade is tried and refused (the folder is this user's to read only). Read as it is, then."""
    root = tmp_path / "store"
    schema_2_store(root)

    def refused(self: Datastore) -> None:
        with self._sqlite_errors():
            raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(Datastore, "_upgrade", refused)
    with Datastore(root, create=False) as store:
        assert store.read_only
        cases = store.list_cases()
        assert [store.latest_label(c.id).n_interactions for c in cases] == [0, 3, 7]
        with pytest.raises(StoreAccessError, match="is read-only here"):
            store.lock(cases[0].id, "dave")
    assert schema_version(root / DB_NAME) == "2"

    def failed(self: Datastore) -> None:  # any other failure of the upgrade stays one
        with self._sqlite_errors():
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(Datastore, "_upgrade", failed)
    with pytest.raises(StoreAccessError, match="disk I/O error"):
        Datastore(root, create=False)


def failing_connect(statement: str):
    """``datastore._connect`` whose connections fail the first statement holding ``statement``, as a
    disk error there would (the upgrade is then midway through its transaction)."""

    class FailingConnection(sqlite3.Connection):
        def execute(self, sql, parameters=()):  # type: ignore[override]
            if statement in sql:
                raise sqlite3.OperationalError(f"disk I/O error (simulated at {statement!r})")
            return super().execute(sql, parameters)

    def connect(target: str, uri: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            target, uri=uri, timeout=30.0, isolation_level=None, check_same_thread=False, factory=FailingConnection
        )
        conn.row_factory = sqlite3.Row
        return conn

    return connect


@pytest.mark.parametrize(
    "statement",
    [
        "CREATE TABLE labels_v3",  # the new table
        "INSERT INTO labels_v3",  # the copy
        "DROP TABLE labels",  # the old table
        "RENAME TO labels",  # the new one in its place, the old one dropped
        "INSERT OR REPLACE INTO meta",  # the new schema version, the labels table rebuilt
    ],
)
def test_an_upgrade_that_fails_midway_leaves_the_schema_2_store_as_it_was(tmp_path: Path, monkeypatch, statement):
    root = tmp_path / "store"
    before = schema_2_store(root)
    db = root / DB_NAME
    schema = schema_of(db)
    monkeypatch.setattr(datastore_module, "_connect", failing_connect(statement))
    with pytest.raises(StoreAccessError, match="simulated"):
        Datastore(root, create=False)
    assert schema_version(db) == "2" and schema_of(db) == schema and table_rows(db) == before
    assert nullable(db) == {"n_interactions": False, "seconds_spent": False}
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        con.close()
    monkeypatch.undo()
    with Datastore(root, create=False) as store:  # a working store: upgraded when opened again
        labels = [store.label_versions(c.id)[0] for c in store.list_cases()]
        assert [(v.n_interactions, v.seconds_spent) for v in labels] == [(0, 0.0), (3, 12.5), (7, 30.0)]
    assert schema_version(db) == "3" and table_rows(db)["labels"] == before["labels"]


KILLED_MIDWAY = textwrap.dedent(
    """
    import os, sqlite3, sys
    from SegAssistLib.learning import datastore

    class Killed(sqlite3.Connection):
        def execute(self, sql, parameters=()):
            if "RENAME TO labels" in sql:  # the old labels table dropped, the new one not in place
                os._exit(9)
            return super().execute(sql, parameters)

    def connect(target, uri=False):
        conn = sqlite3.connect(target, uri=uri, timeout=30.0, isolation_level=None, check_same_thread=False,
                               factory=Killed)
        conn.row_factory = sqlite3.Row
        return conn

    datastore._connect = connect
    datastore.Datastore(sys.argv[1], create=False).close()
    """
)


def test_a_process_killed_midway_through_the_upgrade_leaves_the_schema_2_store_as_it_was(tmp_path: Path):
    root = tmp_path / "store"
    before = schema_2_store(root)
    db = root / DB_NAME
    schema = schema_of(db)
    done = subprocess.run([sys.executable, "-c", KILLED_MIDWAY, str(root)], cwd=REPO_ROOT, timeout=120,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 9, done.stderr  # killed inside the upgrade's transaction
    assert schema_version(db) == "2" and schema_of(db) == schema and table_rows(db) == before
    with Datastore(root, create=False) as store:
        assert [store.label_versions(c.id)[0].n_interactions for c in store.list_cases()] == [0, 3, 7]
    assert schema_version(db) == "3" and table_rows(db)["labels"] == before["labels"]


OPEN_AT_ONCE = textwrap.dedent(
    """
    import json, sqlite3, sys, time
    from pathlib import Path
    from SegAssistLib.learning import datastore

    rebuilt = []

    class Counting(sqlite3.Connection):
        def execute(self, sql, parameters=()):
            if sql.startswith("CREATE TABLE labels_v3"):
                rebuilt.append(sql)
            return super().execute(sql, parameters)

    def connect(target, uri=False):
        conn = sqlite3.connect(target, uri=uri, timeout=30.0, isolation_level=None, check_same_thread=False,
                               factory=Counting)
        conn.row_factory = sqlite3.Row
        return conn

    datastore._connect = connect
    root, me, other = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    (root.parent / me).touch()
    deadline = time.monotonic() + 60
    while not (root.parent / other).exists() and time.monotonic() < deadline:  # both start together
        time.sleep(0.001)
    with datastore.Datastore(root, create=False) as store:
        counts = [v.n_interactions for c in store.list_cases() for v in store.label_versions(c.id)]
    print(json.dumps({"rebuilt": len(rebuilt), "counts": counts}))
    """
)


def test_two_processes_opening_a_schema_2_store_at_once_upgrade_it_once(tmp_path: Path):
    root = tmp_path / "store"
    before = schema_2_store(root)
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(root), me, other], cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        for me, other in (("ready-1", "ready-2"), ("ready-2", "ready-1"))
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(r["rebuilt"] for r in results) == [0, 1]  # one upgraded, the other found it done
    assert all(r["counts"] == [0, 3, 7] for r in results)
    db = root / DB_NAME
    assert schema_version(db) == "3" and table_rows(db)["labels"] == before["labels"]


# ------------------------------------------------------------------------------- reading unknowns


def test_a_label_saved_without_a_log_is_unknown_through_the_api_the_export_and_the_command_line(
    tmp_path: Path, capsys
):
    root = tmp_path / "store"
    store = Datastore(root)
    a, b, c = (store.import_volume(make_volume(i), name=f"case_{i}", user="admin") for i in range(3))
    unknown = store.save_label(a.id, box(), "alice")  # a mask drawn elsewhere: no log, no count, no time
    assert (unknown.n_interactions, unknown.seconds_spent) == (None, None)
    assert store.get_label(unknown.id).to_dict()["n_interactions"] is None
    counted = store.save_label(b.id, box(), "alice", prompt_log=three_prompts(), seconds_spent=12.5)
    assert (counted.n_interactions, counted.seconds_spent) == (3, 12.5)  # a log still counts its prompts
    zero = store.save_label(c.id, box(), "alice", n_interactions=0, seconds_spent=0)
    assert (zero.n_interactions, zero.seconds_spent) == (0, 0.0)  # an explicit 0 is a 0
    assert [store.latest_label(x.id).n_interactions for x in (a, b, c)] == [None, 3, 0]

    out = export_msd(store, tmp_path / "export", seg_nrrd=False)
    provenance = {p["case_id"]: p for p in json.loads((out / "dataset.json").read_text())["segassist"]["cases"]}
    assert [(provenance[x.id]["n_interactions"], provenance[x.id]["seconds_spent"]) for x in (a, b, c)] == [
        (None, None),
        (3, 12.5),
        (0, 0.0),
    ]
    assert '"n_interactions": null' in (out / "dataset.json").read_text()

    # segassist learn save with a mask file only: unknown, said as such (text) and null (JSON)
    d = store.import_volume(make_volume(5), name="case_5", user="admin")
    store.close()
    mask_file = tmp_path / "mask.nii.gz"
    sitk.WriteImage(volume_to_sitk(Volume(box(), spacing=d.spacing)), str(mask_file))
    base = ["learn", "save", d.id, str(mask_file), "--store", str(root), "--user", "alice", "--draft"]
    assert main(base) == 0
    text = capsys.readouterr().out
    assert "interactions: unknown" in text and "time spent: not measured" in text, text
    assert main([*base, "--json"]) == 0
    label = json.loads(capsys.readouterr().out)
    assert label["n_interactions"] is None and label["seconds_spent"] is None and label["has_prompt_log"] is False
    assert main([*base, "--interactions", "0", "--seconds", "0"]) == 0
    assert "interactions: 0, time spent: 0.0 s" in capsys.readouterr().out
    with Datastore(root, create=False) as store:
        assert [(v.n_interactions, v.seconds_spent) for v in store.label_versions(d.id)] == [
            (None, None),
            (None, None),
            (0, 0.0),
        ]


def test_a_prompt_log_counts_its_prompts_and_a_count_given_wins(tmp_path: Path):
    with Datastore(tmp_path / "store") as store:
        cases = [store.import_volume(make_volume(i), name=f"c{i}", user="admin") for i in range(3)]
        assert store.save_label(cases[0].id, box(), "alice", prompt_log=three_prompts().to_json()).n_interactions == 3
        assert store.save_label(cases[1].id, box(), "alice", prompt_log=PromptLog()).n_interactions == 0  # it says 0
        given = store.save_label(cases[2].id, box(), "alice", prompt_log=three_prompts(), n_interactions=5)
        assert given.n_interactions == 5 and given.seconds_spent is None


# ------------------------------------------------------------------------------- over HTTP


def test_over_http_a_mask_without_a_count_reads_back_null(server_factory, tmp_path: Path):
    server = server_factory.start(learn_store=tmp_path / "store", max_json_bytes=2_000_000)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        volumes = [server_volume(shape=(12, 16, 16), seed=i) for i in range(3)]
        cases = [alice.learning.import_image(v, name=f"case_{i}") for i, v in enumerate(volumes)]
        mask = (volumes[0].array > 100).astype(np.uint8)

        label = alice.learning.save_mask(cases[0].id, mask)  # drawn elsewhere: nothing known
        assert (label.n_interactions, label.seconds_spent) == (None, None)
        given = alice.learning.save_mask(cases[1].id, mask, seconds_spent=20.0, n_interactions=4)
        assert (given.n_interactions, given.seconds_spent) == (4, 20.0)
        reply = raw(server, "GET", f"/v1/learn/cases/{cases[0].id}/labels?unknown=null")
        assert reply.status_code == 200 and reply.json()[0]["n_interactions"] is None, reply.text
        assert reply.json()[0]["seconds_spent"] is None
        # a client that does not ask (one from before unknown counts requires a number) reads 0
        reply = raw(server, "GET", f"/v1/learn/cases/{cases[0].id}/labels")
        assert (reply.json()[0]["n_interactions"], reply.json()[0]["seconds_spent"]) == (0, 0.0), reply.text

        with alice.open_session(volumes[2]) as session:  # a session: its prompts are counted, time not sent
            session.add_prompt(PointPrompt(position=(8.0, 8.0, 6.0)))
            session.add_prompt(PointPrompt(position=(7.0, 8.0, 6.0)))
            submitted = alice.learning.submit(cases[2].id, session)
        assert submitted.has_prompt_log and submitted.n_interactions == 2 and submitted.seconds_spent is None
        assert [v.n_interactions for v in alice.learning.labels(cases[2].id)] == [2]

        # the client leaves an unknown out; a null sent is taken as unknown too
        extra = alice.learning.import_image(server_volume(shape=(12, 16, 16), seed=9), name="extra")
        payload = ArrayPayload.from_array(mask, available_codecs()[0]).model_dump()
        body = {"mask": payload, "n_interactions": None, "seconds_spent": None}
        reply = raw(server, "POST", f"/v1/learn/cases/{extra.id}/labels?unknown=null", json=body)
        assert reply.status_code == 201, reply.text
        assert (reply.json()["n_interactions"], reply.json()["seconds_spent"]) == (None, None)
    with Datastore(tmp_path / "store", create=False) as store:
        assert [store.latest_label(c.id).n_interactions for c in [*cases, extra]] == [None, 4, 2, None]
        assert [store.latest_label(c.id).seconds_spent for c in [*cases, extra]] == [None, 20.0, None, None]
