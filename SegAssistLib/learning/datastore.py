"""The embedded datastore: a local folder plus SQLite (stdlib ``sqlite3``). Torch-free.

Layout of the store folder::

    segassist.sqlite              cases, label versions (with provenance and prompt logs), reviews
    images/<case id>.nii.gz       the imported image, converted once to NIfTI
    labels/<case id>/<label id>.nii.gz   one file per label version, written once, never changed
    quarantine/<time>-<id>/...    files no record points at, moved there by recover (see below)
    exports/<time>-<id>/          exports made without a target folder (the one place inside the store
                                  an export may go)

Rules that make it safe to kill the process at any moment:

- Every file is written to a temporary name beside its target, fsynced and renamed (``SegAssistLib.files``);
  a label version is a *new* file named by a fresh random id, so nothing is overwritten in place.
- The database row that makes a file visible is inserted only after the file is complete, in one
  SQLite transaction (WAL journal, ``synchronous=FULL``). A killed writer leaves either no row (the
  old version stays the latest) or a row pointing at a complete file (the new version).
- Leftovers of an interrupted write (temporary files, files without a row) are ignored by readers and
  reported by :meth:`Datastore.verify`. :meth:`Datastore.recover` deletes the temporary files only: a
  complete image or label without a row (also every label saved since the backup a database was
  restored from) is moved to ``quarantine/``, never deleted.
- A database file without SegAssist's schema is never set up over: one with other tables (another
  program's) is refused, and so is an empty one (a 0-byte file) unless a new store is being made in a
  folder without stored files (``create``); a read never makes a store.
- Every stored file's SHA-256 is recorded; labels are checked on every read.

All ids are generated here (random hex) and validated on the way in; user-supplied names (case
names, users, model names, subjects) are never used to build a file path.

A case may name its *subject* (the patient it shows): the hold-out split keeps a subject's cases
together (``traindata``). None (the default, and every case of a store made before subjects
existed) makes the case its own subject. It is set at import, given or drawn from the case's name
by a pattern (:func:`subject_from_name`), or later (:meth:`Datastore.set_subjects`).

Schema versions (``meta.schema_version``): 1, the first; 2, ``cases.subject``; 3, a label version's
``n_interactions`` and ``seconds_spent`` may be NULL, unknown: a label saved without a prompt log or a
count of prompts (a mask file, a mask over HTTP), or without a measured time, is no longer recorded
as made in 0 prompts and 0 seconds (read back as None; see :meth:`Datastore.save_label`).

A store of an older schema is migrated when it is opened, in one transaction (whole or not at all: a
crash midway leaves the store of its old schema, as it was; of two processes opening it at once, the
second finds it done): 1 -> 2 adds the column, every case its own subject; 2 -> 3 rebuilds the labels
table (SQLite cannot drop a NOT NULL constraint in place: a new table, every row copied with its
rowid, the old one dropped, the new one renamed, its indexes made again), every row and value kept as
it was. A 0 recorded before schema 3 stays 0: it may have been the old default for "not given" (a
label saved without a prompt log) as well as a real count, and the store cannot tell which. A store
of a newer schema than this code knows is refused before anything is written to it, never changed.
Older code refuses a migrated store: schema-1 code would split a subject's cases between training and
validation, schema-2 code cannot read an unknown count. Opening a store of the current schema writes
nothing.

A store this user can only read (another user's, on a read-only disk) can still be read (``learn
status``, ``cases``, ``export``), one of an older schema too (read as it is, not upgraded: see
:meth:`Datastore._read_older_schema`); a change to it is refused with a :class:`StoreAccessError`, and so is
any failure of the database itself (locked by another process for too long, a disk error). A damaged
database file is a :class:`DamagedStoreError`. Each names the store.

The store may be opened by several processes at once (the server and a background trainer):
SQLite serialises writers, and a connection here is shared by threads behind a lock. Keep the
store on a local disk: SQLite's WAL mode does not work on network file systems.

The parts with a job of their own are in modules of their own: :class:`Datastore` stands on the
database (``store_db``: connecting, the schema and its upgrades, transactions) and on the folder's
files (``store_files``: their paths, verify and recover); a case's subject is checked and drawn from
its name in ``subjects``, a label version's inputs are checked in ``label_input``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import numpy as np

from SegAssistLib.api_learning import DEFAULT_LOCK_TTL_S, MAX_INTERACTIONS, MAX_LOCK_TTL_S
from SegAssistLib.errors import ImageError
from SegAssistLib.files import sha256_file
from SegAssistLib.image import Volume, validate_image
from SegAssistLib.io import load_mask, load_volume, save_mask_nifti, volume_to_sitk, write_image_checked
from SegAssistLib.learning.errors import (
    CaseLockedError,
    CorruptDataError,
    DatastoreError,
    DuplicateCaseError,
    InvalidStateError,
    NotFoundError,
    NotLockedError,
)
from SegAssistLib.learning.label_input import PromptLogLike, check_mask, is_count, parse_prompt_log
from SegAssistLib.learning.records import (
    DUPLICATE_REASON,
    CaseRecord,
    CaseStatus,
    ImportReport,
    LabelVersion,
    Review,
    check_case_id,
    check_label_id,
    check_text,
    check_user,
    iso_time,
    new_case_id,
    new_label_id,
    parse_statuses,
    printable_text,
)
from SegAssistLib.learning.sources import find_sources
from SegAssistLib.learning.store_db import DB_NAME, SCHEMA_VERSION
from SegAssistLib.learning.store_db import open_connection as _connect  # where Datastore() finds how to connect
from SegAssistLib.learning.store_files import DEFAULT_RECOVER_AGE_S, StoreFiles, check_new_store_folder
from SegAssistLib.learning.subjects import (
    SubjectPattern,
    check_subject,
    compile_subject_pattern,
    subject_from_name,
    subjects_from_names,
)
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.transport import wire_volume

__all__ = [
    # the store's public names, some of them defined in the modules it was split into
    "DB_NAME",
    "DEFAULT_LOCK_TTL_S",
    "DEFAULT_RECOVER_AGE_S",
    "SCHEMA_VERSION",
    "Datastore",
    "NotLockedError",
    "PromptLogLike",
    "SubjectPattern",
    "check_subject",
    "compile_subject_pattern",
    "import_sources",
    "open_datastore",
    "subject_from_name",
    "subjects_from_names",
]


# A case's status as stored is what the last change made it. Read, an ``in_progress`` case nobody holds a
# live lock of (released, or its lock lapsed) is at rest again (see records.CaseStatus): ``new`` without
# a label; ``in_progress`` with drafts only; otherwise as its latest submitted label left it (accepted:
# ``reviewed``; rejected: ``in_progress``, to rework; not reviewed: ``submitted``), a later draft aside.
# One ``?``: the time now. (A store of an earlier release left a case ``in_progress`` after a draft on its
# finished label: read, it is finished again.)
_LATEST_SUBMITTED = (
    "(SELECT l.id FROM labels l WHERE l.case_id = c.id AND l.submitted = 1 ORDER BY l.version DESC LIMIT 1)"
)
_VERDICT = f"(SELECT r.accepted FROM reviews r WHERE r.label_id = {_LATEST_SUBMITTED} ORDER BY r.rowid DESC LIMIT 1)"
_STATUS_SQL = f"""CASE
    WHEN c.status != 'in_progress' OR (c.locked_by IS NOT NULL AND c.lock_expires > ?) THEN c.status
    WHEN NOT EXISTS (SELECT 1 FROM labels l WHERE l.case_id = c.id) THEN 'new'
    WHEN {_LATEST_SUBMITTED} IS NULL THEN 'in_progress'
    ELSE (CASE {_VERDICT} WHEN 1 THEN 'reviewed' WHEN 0 THEN 'in_progress' ELSE 'submitted' END)
END"""
# 1 when the case's latest version is a submitted label rejected in review (nothing saved since: a
# case to rework, which ``next`` hands out again once nobody holds it); read for in_progress cases only
_REWORK_SQL = """(CASE WHEN c.status = 'in_progress' THEN COALESCE((
    SELECT r.accepted = 0 FROM reviews r JOIN labels l ON l.id = r.label_id
    WHERE l.id = (SELECT l2.id FROM labels l2 WHERE l2.case_id = c.id ORDER BY l2.version DESC LIMIT 1)
      AND l.submitted = 1
    ORDER BY r.rowid DESC LIMIT 1), 0) ELSE 0 END)"""
# every case as read (its status as above); one ``?``, the time now, before any of a WHERE that follows
_CASE_QUERY = f"""
SELECT * FROM (
    SELECT c.*, c.rowid AS seq,
           (SELECT COUNT(*) FROM labels l WHERE l.case_id = c.id) AS n_labels,
           (SELECT l.id FROM labels l WHERE l.case_id = c.id ORDER BY l.version DESC LIMIT 1) AS latest_label_id,
           {_STATUS_SQL} AS current_status,
           {_REWORK_SQL} AS rework
    FROM cases c
) AS c
"""
_LABEL_COLUMNS = (
    "id, case_id, version, sha256, user, created_at, model, adapter_version, n_interactions, "
    "seconds_spent, submitted, n_foreground, prompt_log IS NOT NULL AS has_prompt_log"
)


def import_sources(
    source: Union[str, Path],
    store_root: Union[str, Path],
    recursive: bool = True,
    passed_over: Optional[List[Tuple[Path, str]]] = None,
    include_label_maps: bool = False,
) -> List[Tuple[Path, str]]:
    """The images (path, case name) an import of ``source`` would read, found without opening the
    store (see :func:`~SegAssistLib.learning.sources.find_sources`; ``passed_over`` receives the
    folders and label-map files not read, with the reason; ``include_label_maps``: a file named as
    the label map of an image beside it is read too). A source that is the store folder or lies
    inside it is refused; a store folder inside the source is not entered."""
    store = Path(store_root).resolve()
    resolved = Path(source).resolve()
    if store == resolved:
        raise DatastoreError(
            f"cannot import from {source} into {store_root}: the store folder must not be the source folder "
            "(nor hold it); choose another --store, a new folder outside the source"
        )
    if store in resolved.parents:
        what = "the datastore" if (store / DB_NAME).is_file() else "the store folder"
        raise DatastoreError(
            f"cannot import from {source}: it lies inside {what} {store_root}; the store folder must not be "
            "the source folder nor hold it: choose another --store, a new folder outside the source"
        )
    try:
        return find_sources(Path(source), recursive=recursive, skip=store, passed_over=passed_over,
                            include_label_maps=include_label_maps)
    except DatastoreError:
        raise
    except (OSError, RuntimeError) as exc:
        raise DatastoreError(f"cannot import from {source}: {exc}") from exc


class Datastore(StoreFiles):
    """Cases, locks and versioned labels in a folder. See the module docstring for the guarantees."""

    def __init__(
        self,
        root: Union[str, Path],
        create: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root)
        self._clock = clock
        self.read_only = False  # read as it is on disk, this user cannot write its folder (see _connect)
        self.may_create = create  # an empty database may be set up (see _check_empty_database)
        db_path = self.root / DB_NAME
        if not db_path.is_file():
            if not create:
                raise DatastoreError(f"no SegAssist datastore at {self.root} (missing {DB_NAME})")
            check_new_store_folder(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = self._connect(db_path, _connect)  # this module's, looked up now: a test may replace it
        try:
            self._init_schema()
            if not self.read_only:  # after the checks: a store refused is left as it was
                (self.root / "images").mkdir(exist_ok=True)
                (self.root / "labels").mkdir(exist_ok=True)
        except BaseException:
            self._conn.close()
            raise

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ import

    def import_images(
        self,
        source: Union[str, Path],
        user: str,
        channel: Optional[int] = None,
        recursive: bool = True,
        sources: Optional[List[Tuple[Path, str]]] = None,
        on_image: Optional[Callable[[int, int, Path, Union[CaseRecord, str]], None]] = None,
        subject_pattern: Optional[SubjectPattern] = None,
    ) -> ImportReport:
        """Import one image file, one DICOM series folder, or every image in a folder.

        Images already in the store (same voxels and geometry) and images that cannot be
        segmented are skipped with the reason; the rest become cases with status ``new``.
        ``source`` is a path on this machine given by the operator, not by a remote client.
        ``sources``: what :func:`import_sources` found there, when the caller looked first;
        ``on_image(done, total, path, case or the reason it was skipped)`` after each image (a large
        image takes seconds to convert and hash).
        ``subject_pattern``: each case's subject is drawn from its name (:func:`subject_from_name`);
        a name it finds none in stops the import before any image is read. None: each case is its
        own subject.
        """
        check_user(user)
        if sources is None:
            sources = import_sources(source, self.root, recursive)
        # a file's name may hold a tab or an undecodable byte, and its path be very long:
        # shown as printable text, not a reason to stop the import halfway
        names = [printable_text(name) or "?" for _, name in sources]
        subjects: List[Optional[str]] = [None] * len(names)
        if subject_pattern is not None:
            subjects = list(subjects_from_names(names, subject_pattern))
        report = ImportReport()
        for done, ((path, _), name, subject) in enumerate(zip(sources, names, subjects), 1):
            try:
                volume = load_volume(path, channel=channel)
                case = self.import_volume(
                    volume,
                    name=name,
                    user=user,
                    source=printable_text(str(path), limit=4096, keep_end=True),
                    subject=subject,
                )
                report.added.append(case)
                result: Union[CaseRecord, str] = case
            except (ImageError, DuplicateCaseError) as exc:
                report.skipped.append((str(path), str(exc)))
                result = str(exc)
            if on_image is not None:
                on_image(done, len(sources), path, result)
        return report

    def import_volume(
        self, volume: Volume, name: str, user: str, source: str = "", subject: Optional[str] = None
    ) -> CaseRecord:
        """Add an in-memory image as a new case; raises :class:`DuplicateCaseError` if already stored.
        ``subject``: the patient it shows (see :func:`check_subject`); None: its own subject."""
        check_user(user)
        name = check_text(name, "case name") or ""
        if not name:
            raise DatastoreError("a case needs a non-empty name")
        source = check_text(source, "source", limit=4096) or ""
        subject = check_subject(subject)
        validate_image(volume)
        self._refuse_if_read_only()
        content_hash = volume.content_hash()
        self._raise_if_duplicate(content_hash)
        case_id = new_case_id()
        path = self.image_path(case_id)
        # read back whole before it is the case's image: a full disk leaves a short file and no error
        digest = self._write_new_file(
            path, lambda tmp: write_image_checked(volume_to_sitk(volume), Path(tmp)), "the image"
        )
        now = self._clock()
        try:
            # the image as read back (NIfTI keeps geometry in float32) is what the case serves: a copy
            # of that imported again is the same case, although its hash differs from the original's
            hashes = {content_hash, wire_volume(load_volume(path)).content_hash()}
            self._raise_if_duplicate(*hashes)
            with self._write() as db:
                db.execute(
                    "INSERT INTO cases (id, name, status, shape, spacing, origin, direction, image_sha256, "
                    "content_hash, source, imported_at, imported_by, updated_at, subject) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        case_id,
                        name,
                        CaseStatus.NEW.value,
                        json.dumps([int(n) for n in volume.array.shape]),
                        json.dumps(list(volume.spacing)),
                        json.dumps(list(volume.origin)),
                        json.dumps(np.asarray(volume.direction, float).ravel().tolist()),
                        digest,
                        content_hash,
                        source,
                        now,
                        user,
                        now,
                        subject,
                    ),
                )
                db.executemany(
                    "INSERT INTO image_hashes (hash, case_id) VALUES (?, ?)", [(h, case_id) for h in sorted(hashes)]
                )
        except sqlite3.IntegrityError:
            path.unlink(missing_ok=True)
            self._raise_if_duplicate(*hashes)
            raise
        except BaseException:
            self._drop_unrecorded_file(path, "cases", case_id)
            raise
        return self.get_case(case_id)

    def _raise_if_duplicate(self, *hashes: str) -> None:
        marks = ", ".join("?" * len(hashes))
        rows = self._read(
            f"SELECT id, name FROM cases WHERE content_hash IN ({marks}) OR id IN "
            f"(SELECT case_id FROM image_hashes WHERE hash IN ({marks}))",
            (*hashes, *hashes),
        )
        if rows:
            raise DuplicateCaseError(f"{DUPLICATE_REASON} {rows[0]['id']} ({rows[0]['name']})", rows[0]["id"])

    # ------------------------------------------------------------------ cases

    def _case_from_row(self, row: sqlite3.Row) -> CaseRecord:
        locked_by, expires = row["locked_by"], row["lock_expires"]
        if locked_by is not None and (expires is None or expires <= self._clock()):
            locked_by, expires = None, None  # an expired lock is no lock
        return CaseRecord(
            id=row["id"],
            name=row["name"],
            status=CaseStatus(row["current_status"]),
            shape=tuple(json.loads(row["shape"])),
            spacing=tuple(json.loads(row["spacing"])),
            image_sha256=row["image_sha256"],
            content_hash=row["content_hash"],
            source=row["source"],
            imported_at=row["imported_at"],
            imported_by=row["imported_by"],
            locked_by=locked_by,
            lock_expires=expires,
            n_labels=int(row["n_labels"]),
            latest_label_id=row["latest_label_id"],
            needs_rework=row["current_status"] == CaseStatus.IN_PROGRESS.value and bool(row["rework"]),
        )

    def image_hashes_of(self, case_id: str) -> Set[str]:
        """The content hashes a case's image is known by: as imported and as served (read back from
        its stored file). Empty for a case imported before the store kept the served one."""
        rows = self._read("SELECT hash FROM image_hashes WHERE case_id = ?", (check_case_id(case_id),))
        return {row["hash"] for row in rows}

    def subjects(self, case_ids: Optional[Iterable[str]] = None) -> Dict[str, Optional[str]]:
        """Each case's subject (None: the case is its own subject), of the given cases or of all."""
        if case_ids is None:
            return {row["id"]: row["subject"] for row in self._read("SELECT id, subject FROM cases")}
        wanted = [check_case_id(c) for c in case_ids]
        found: Dict[str, Optional[str]] = {}
        for start in range(0, len(wanted), 500):  # below SQLite's limit of parameters
            chunk = wanted[start : start + 500]
            rows = self._read(f"SELECT id, subject FROM cases WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            found.update((row["id"], row["subject"]) for row in rows)
        missing = next((c for c in wanted if c not in found), None)
        if missing is not None:
            raise NotFoundError(f"no case {missing}")
        return {c: found[c] for c in wanted}

    def set_subjects(
        self, subjects: Optional[Dict[str, Optional[str]]] = None, pattern: Optional[SubjectPattern] = None
    ) -> Dict[str, Optional[str]]:
        """Set the subject of some cases (``subjects``: case id -> subject, None: its own) or of every
        case from its name (``pattern``, see :func:`subject_from_name`), in one transaction: a case that
        is not there, a bad subject or a name the pattern finds none in changes nothing. Returns what
        was set. A case an adapter version was trained on never validates, whatever its subject
        becomes, and neither does any case of its subject (``traindata``)."""
        if (subjects is None) == (pattern is None):
            raise DatastoreError("give either subjects by case or a pattern, not both")
        with self._write() as db:
            if pattern is not None:
                rows = db.execute("SELECT id, name FROM cases ORDER BY imported_at, rowid").fetchall()
                found = subjects_from_names([r["name"] for r in rows], pattern)
                wanted: Dict[str, Optional[str]] = dict(zip([r["id"] for r in rows], found))
            else:
                wanted = {check_case_id(c): check_subject(s) for c, s in (subjects or {}).items()}
                for case_id in wanted:
                    self._case_row(db, case_id)
            now = self._clock()
            db.executemany(
                "UPDATE cases SET subject = ?, updated_at = ? WHERE id = ?", [(s, now, c) for c, s in wanted.items()]
            )
        return wanted

    def get_case(self, case_id: str) -> CaseRecord:
        rows = self._read(_CASE_QUERY + " WHERE c.id = ?", (self._clock(), check_case_id(case_id)))
        if not rows:
            raise NotFoundError(f"no case {case_id}")
        return self._case_from_row(rows[0])

    def list_cases(
        self,
        status: Union[None, str, CaseStatus, Iterable[Union[str, CaseStatus]]] = None,
        locked_by: Optional[str] = None,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> List[CaseRecord]:
        """Cases in import order, optionally only those of some statuses (as read: see
        :class:`~SegAssistLib.learning.records.CaseStatus`) or locked by one user."""
        now = self._clock()
        where: List[str] = []
        params: List[object] = [now]
        statuses = parse_statuses(status)
        if statuses is not None:
            if not statuses:
                return []
            where.append(f"c.current_status IN ({', '.join('?' * len(statuses))})")
            params.extend(s.value for s in statuses)
        if locked_by is not None:
            where.append("c.locked_by = ? AND c.lock_expires > ?")
            params.extend([check_user(locked_by), now])
        sql = _CASE_QUERY + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY c.imported_at, c.seq"
        if (limit is not None and int(limit) < 0) or int(offset) < 0:
            raise DatastoreError("limit and offset must not be negative")
        if limit is not None or int(offset):  # SQLite takes an offset only after a limit (-1: none)
            sql += " LIMIT ? OFFSET ?"
            params.extend([-1 if limit is None else int(limit), int(offset)])
        return [self._case_from_row(r) for r in self._read(sql, params)]

    def count_by_status(self) -> Dict[str, int]:
        """How many cases are of each status, as read (see :meth:`list_cases`)."""
        counts = {s.value: 0 for s in CaseStatus}
        rows = self._read(f"SELECT {_STATUS_SQL} AS status, COUNT(*) AS n FROM cases c GROUP BY 1", (self._clock(),))
        for row in rows:
            counts[row["status"]] = int(row["n"])
        return counts

    def _geometry(self, case_id: str) -> Tuple[Tuple[int, ...], Volume]:
        rows = self._read("SELECT shape, spacing, origin, direction FROM cases WHERE id = ?", (check_case_id(case_id),))
        if not rows:
            raise NotFoundError(f"no case {case_id}")
        row = rows[0]
        reference = Volume(
            array=np.zeros((0, 0, 0), np.uint8),
            spacing=tuple(json.loads(row["spacing"])),
            origin=tuple(json.loads(row["origin"])),
            direction=np.asarray(json.loads(row["direction"]), float).reshape(3, 3),
        )
        return tuple(json.loads(row["shape"])), reference

    def load_image(self, case_id: str) -> Volume:
        """The case's image, checked against the recorded checksum first: a file cut short (a full
        disk, a copy interrupted) can still decode, as zeros where its data ended."""
        case = self.get_case(case_id)
        path = self.image_path(case_id)
        if not path.is_file():
            raise CorruptDataError(f"the image file of case {case_id} is missing from the store")
        if sha256_file(path) != case.image_sha256:
            raise CorruptDataError(
                f"the image file of case {case_id} ({case.name}) does not match its checksum: it is damaged "
                "or was replaced"
            )
        return load_volume(path)

    def reference_geometry(self, case_id: str) -> Volume:
        """The case's geometry (spacing, origin, direction) without reading its voxels."""
        return self._geometry(case_id)[1]

    # ------------------------------------------------------------------ locks

    def _case_row(self, db: sqlite3.Connection, case_id: str, now: Optional[float] = None) -> sqlite3.Row:
        """The case's whole row, read in ``db``'s transaction, with its status as read at ``now``
        (``current_status``), whether it is a case to rework (``rework``) and its count of label versions
        (``n_labels``); :class:`NotFoundError` when there is none."""
        row = db.execute(
            f"SELECT c.*, {_STATUS_SQL} AS current_status, {_REWORK_SQL} AS rework, "
            "(SELECT COUNT(*) FROM labels l WHERE l.case_id = c.id) AS n_labels FROM cases c WHERE c.id = ?",
            (self._clock() if now is None else now, case_id),
        ).fetchone()
        if row is None:
            raise NotFoundError(f"no case {case_id}")
        return row

    def _check_lock(self, row: sqlite3.Row, user: str, now: float) -> None:
        holder, expires = row["locked_by"], row["lock_expires"]
        if holder is not None and holder != user and expires is not None and expires > now:
            minutes = max(1, int(round((expires - now) / 60.0)))
            raise CaseLockedError(
                f"case {row['id']} ({row['name']}) is locked by {holder} for about {minutes} more "
                "minute(s); pick another case or ask them to release it"
            )

    def _check_finished(self, row: sqlite3.Row, user: str, now: float) -> None:
        """Any save to a submitted or reviewed case is a change of a finished label: a draft starts a
        correction (the case stays as it is, its submitted label the training label), a submission replaces
        the training label and undoes a review. Only a user who locked the case may do either, never a
        stray save."""
        if row["current_status"] not in (CaseStatus.SUBMITTED.value, CaseStatus.REVIEWED.value):
            return
        expires = row["lock_expires"]
        if row["locked_by"] != user or expires is None or expires <= now:
            raise InvalidStateError(
                f"case {row['id']} ({row['name']}) is {row['current_status']}: a new version would replace its "
                "finished label; lock the case first to change it"
            )

    def lock(
        self, case_id: str, user: str, ttl_s: float = DEFAULT_LOCK_TTL_S, unlabelled_only: bool = False
    ) -> CaseRecord:
        """Lock a case to ``user`` for ``ttl_s`` seconds (renews the user's own lock).

        A ``new`` case becomes ``in_progress``; any other keeps its status (as read: see
        :class:`~SegAssistLib.learning.records.CaseStatus`). Raises :class:`CaseLockedError` when another
        user holds an unexpired lock; with ``unlabelled_only`` (handing out the next case),
        :class:`InvalidStateError` when the case has a label version by now, unless it is a case to
        rework (its latest version a submitted label rejected in review), checked in the same
        transaction as the lock.
        """
        check_case_id(case_id)
        check_user(user)
        ttl = float(ttl_s)
        if not (0 < ttl <= MAX_LOCK_TTL_S):
            raise DatastoreError(f"lock duration must be between 0 and {MAX_LOCK_TTL_S:.0f} s, got {ttl_s}")
        with self._write() as db:
            now = self._clock()
            row = self._case_row(db, case_id, now)
            self._check_lock(row, user, now)
            if unlabelled_only and row["n_labels"] and not row["rework"]:
                raise InvalidStateError(f"case {case_id} ({row['name']}) was labelled meanwhile")
            status = row["current_status"]
            if status == CaseStatus.NEW.value:
                status = CaseStatus.IN_PROGRESS.value
            db.execute(
                "UPDATE cases SET locked_by = ?, lock_expires = ?, status = ?, updated_at = ? WHERE id = ?",
                (user, now + ttl, status, now, case_id),
            )
        return self.get_case(case_id)

    def unlock(self, case_id: str, user: str, force: bool = False, require_lock: bool = False) -> CaseRecord:
        """Release a lock. Only its holder may, unless ``force`` (an administrator's override).

        An ``in_progress`` case is at rest again (see :class:`~SegAssistLib.learning.records.CaseStatus`):
        without any label ``new``; with a submitted label and only drafts after it, what that label made
        it (a draft never takes a finished label out of training). A case nobody holds a live lock of is
        left as it is: unchanged when ``require_lock`` (a :class:`NotLockedError` says so, and whose lock
        lapsed when one did), otherwise (a client releasing what it may no longer hold) its status is
        tidied as for a release.
        """
        check_case_id(case_id)
        check_user(user)
        with self._write() as db:
            now = self._clock()
            row = self._case_row(db, case_id, now)
            holder, expires = row["locked_by"], row["lock_expires"]
            if require_lock and (holder is None or expires is None or expires <= now):
                lapsed = (
                    f" (the lock of {holder} lapsed at {iso_time(expires)})" if holder is not None and expires else ""
                )
                raise NotLockedError(f"case {case_id} ({row['name']}) is not locked{lapsed}: nothing to release")
            if not force:
                self._check_lock(row, user, now)
            db.execute(
                "UPDATE cases SET locked_by = NULL, lock_expires = NULL, updated_at = ? WHERE id = ?", (now, case_id)
            )
            status = self._case_row(db, case_id, now)["current_status"]  # unlocked: at rest
            db.execute("UPDATE cases SET status = ? WHERE id = ?", (status, case_id))
        return self.get_case(case_id)

    # ------------------------------------------------------------------ labels

    def save_label(
        self,
        case_id: str,
        mask: np.ndarray,
        user: str,
        prompt_log: PromptLogLike = None,
        model: Optional[str] = None,
        adapter_version: Optional[str] = None,
        n_interactions: Optional[int] = None,
        seconds_spent: Optional[float] = None,
        submit: bool = True,
    ) -> LabelVersion:
        """Save a new label version of a case with its provenance; never changes an earlier version.

        ``mask`` is in array order ``[k, j, i]`` on the case's grid, integer values 0-255.
        ``n_interactions``: the prompts it took; None: the number of prompts in ``prompt_log``, and
        without a prompt log unknown (stored as NULL, read back as None: a mask drawn elsewhere is not
        a label made in 0 prompts). A session's log holds only the prompts behind its mask (an undo or
        reset drops some): a caller saving from an interactive session passes its count of prompts,
        undone ones included (the effort; the server passes ``SessionInfo.n_prompts``); a log of a run
        without undo (``segassist segment``, ``headless.run_prompts``) counts them all.
        ``seconds_spent``: the annotation time; None: not measured (unknown, as the count). An
        explicit 0 is recorded as 0. With ``submit`` the case becomes ``submitted`` and its lock is
        released; otherwise the version is a draft: a submitted or reviewed case keeps its status (its
        submitted label stays the one trained on and exported until a new one is submitted), any other
        is ``in_progress``. Raises
        :class:`CaseLockedError` when another user holds the case, and :class:`InvalidStateError` for any
        save to a submitted or reviewed case whose lock the user does not hold (a draft would reopen the
        case and take it out of training, a submission would replace its training label and undo its
        review). A label file the file system refuses to write (a full disk) is a :class:`StoreAccessError`,
        nothing saved.
        """
        check_case_id(case_id)
        check_user(user)
        model = check_text(model, "model")
        adapter_version = check_text(adapter_version, "adapter version")
        log = parse_prompt_log(prompt_log)
        if n_interactions is None and log is not None:
            n_interactions = len(log.prompts)
        if n_interactions is not None and not is_count(n_interactions, MAX_INTERACTIONS):
            raise DatastoreError(
                f"n_interactions must be an integer from 0 to {MAX_INTERACTIONS} (or None: unknown), "
                f"got {n_interactions!r}"
            )
        seconds: Optional[float] = None
        if seconds_spent is not None:
            number = not isinstance(seconds_spent, (bool, str)) and isinstance(seconds_spent, (int, float, np.number))
            seconds = float(seconds_spent) if number else float("nan")
            if not np.isfinite(seconds) or seconds < 0:
                raise DatastoreError(
                    f"seconds_spent must be a finite non-negative number (or None: not measured), got {seconds_spent!r}"
                )
        shape, reference = self._geometry(case_id)
        labels = check_mask(mask, shape)
        with self._lock, self._sqlite_errors():
            row = self._case_row(self._conn, case_id)
        self._check_lock(row, user, self._clock())  # fail before the (slow) write
        self._check_finished(row, user, self._clock())
        self._refuse_if_read_only()

        label_id = new_label_id()
        path = self.label_path(case_id, label_id)
        digest = self._write_new_file(path, lambda tmp: save_mask_nifti(labels, reference, tmp), "a label file")
        try:
            with self._write() as db:
                now = self._clock()
                row = self._case_row(db, case_id, now)
                self._check_lock(row, user, now)
                self._check_finished(row, user, now)
                version = db.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM labels WHERE case_id = ?", (case_id,)
                ).fetchone()[0]
                db.execute(
                    "INSERT INTO labels (id, case_id, version, sha256, user, created_at, model, "
                    "adapter_version, n_interactions, seconds_spent, submitted, n_foreground, prompt_log) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        label_id,
                        case_id,
                        int(version),
                        digest,
                        user,
                        now,
                        model,
                        adapter_version,
                        int(n_interactions) if n_interactions is not None else None,
                        seconds,
                        int(bool(submit)),
                        int(np.count_nonzero(labels)),
                        log.to_json() if log is not None else None,
                    ),
                )
                if submit:
                    db.execute(
                        "UPDATE cases SET status = ?, locked_by = NULL, lock_expires = NULL, updated_at = ? "
                        "WHERE id = ?",
                        (CaseStatus.SUBMITTED.value, now, case_id),
                    )
                else:  # a draft: a finished case stays finished until a new label is submitted
                    status = row["current_status"]
                    if status not in (CaseStatus.SUBMITTED.value, CaseStatus.REVIEWED.value):
                        status = CaseStatus.IN_PROGRESS.value
                    db.execute("UPDATE cases SET status = ?, updated_at = ? WHERE id = ?", (status, now, case_id))
        except BaseException:
            self._drop_unrecorded_file(path, "labels", label_id)
            raise
        return self.get_label(label_id)

    @staticmethod
    def _label_from_row(row: sqlite3.Row) -> LabelVersion:
        return LabelVersion(
            id=row["id"],
            case_id=row["case_id"],
            version=int(row["version"]),
            user=row["user"],
            created_at=row["created_at"],
            sha256=row["sha256"],
            model=row["model"],
            adapter_version=row["adapter_version"],
            n_interactions=None if row["n_interactions"] is None else int(row["n_interactions"]),  # None: unknown
            seconds_spent=None if row["seconds_spent"] is None else float(row["seconds_spent"]),
            submitted=bool(row["submitted"]),
            n_foreground=int(row["n_foreground"]),
            has_prompt_log=bool(row["has_prompt_log"]),
        )

    def get_label(self, label_id: str) -> LabelVersion:
        rows = self._read(f"SELECT {_LABEL_COLUMNS} FROM labels WHERE id = ?", (check_label_id(label_id),))
        if not rows:
            raise NotFoundError(f"no label version {label_id}")
        return self._label_from_row(rows[0])

    def label_versions(self, case_id: str) -> List[LabelVersion]:
        """Every label version of a case, oldest first."""
        self.get_case(case_id)
        rows = self._read(f"SELECT {_LABEL_COLUMNS} FROM labels WHERE case_id = ? ORDER BY version", (case_id,))
        return [self._label_from_row(r) for r in rows]

    def latest_label(self, case_id: str, submitted_only: bool = False) -> Optional[LabelVersion]:
        self.get_case(case_id)
        sql = f"SELECT {_LABEL_COLUMNS} FROM labels WHERE case_id = ?"
        if submitted_only:
            sql += " AND submitted = 1"
        rows = self._read(sql + " ORDER BY version DESC LIMIT 1", (case_id,))
        return self._label_from_row(rows[0]) if rows else None

    def load_label(self, label_id: str) -> np.ndarray:
        """The label version's voxels (uint8, array order), checked against the recorded checksum."""
        label = self.get_label(label_id)
        path = self.label_path(label.case_id, label.id)
        if not path.is_file():
            raise CorruptDataError(f"the file of label version {label_id} is missing from the store")
        if sha256_file(path) != label.sha256:
            raise CorruptDataError(f"the file of label version {label_id} does not match its checksum")
        return load_mask(path).astype(np.uint8, copy=False)

    def prompt_log(self, label_id: str) -> Optional[PromptLog]:
        rows = self._read("SELECT prompt_log FROM labels WHERE id = ?", (check_label_id(label_id),))
        if not rows:
            raise NotFoundError(f"no label version {label_id}")
        text = rows[0]["prompt_log"]
        return PromptLog.from_json(text) if text is not None else None

    def training_cases(
        self, statuses: Iterable[Union[str, CaseStatus]] = (CaseStatus.SUBMITTED, CaseStatus.REVIEWED)
    ) -> List[Tuple[CaseRecord, LabelVersion]]:
        """Each case of the given statuses with its latest submitted label version: what a trainer reads."""
        out = []
        for case in self.list_cases(status=list(statuses)):
            label = self.latest_label(case.id, submitted_only=True)
            if label is not None:
                out.append((case, label))
        return out

    # ------------------------------------------------------------------ reviews

    def review(
        self, case_id: str, reviewer: str, accepted: bool, note: Optional[str] = None, label_id: Optional[str] = None
    ) -> Review:
        """Record a review of the case's latest submitted label: accepted -> ``reviewed``, rejected ->
        back to ``in_progress``.

        ``label_id``: the version the reviewer looked at; the review is refused when it is no longer
        the latest submitted one (a newer submission arrived meanwhile), so a verdict never lands on
        a label nobody reviewed. A case another user holds the lock of (being corrected) is refused too.
        """
        check_case_id(case_id)
        check_user(reviewer)
        if label_id is not None:
            check_label_id(label_id)
        note = check_text(note, "review note", limit=2000)
        review_id = new_label_id()
        with self._write() as db:
            now = self._clock()
            row = self._case_row(db, case_id, now)
            if row["current_status"] not in (CaseStatus.SUBMITTED.value, CaseStatus.REVIEWED.value):
                raise InvalidStateError(
                    f"case {case_id} is {row['current_status']}: only submitted cases can be reviewed"
                )
            holder, expires = row["locked_by"], row["lock_expires"]
            if holder is not None and holder != reviewer and expires is not None and expires > now:
                raise InvalidStateError(f"case {case_id} is locked by {holder}, who may submit a new version: "
                                        "review it once the lock is released")  # fmt: skip
            label = db.execute(
                "SELECT id, version FROM labels WHERE case_id = ? AND submitted = 1 ORDER BY version DESC LIMIT 1",
                (case_id,),
            ).fetchone()
            if label is None:
                raise InvalidStateError(f"case {case_id} has no submitted label to review")
            if label_id is not None and label["id"] != label_id:
                raise InvalidStateError(f"label {label_id} is no longer the latest submitted version of case "
                                        f"{case_id} (version {label['version']} is): review that one")  # fmt: skip
            db.execute(
                "INSERT INTO reviews (id, label_id, reviewer, accepted, note, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                (review_id, label["id"], reviewer, int(bool(accepted)), note, now),
            )
            status = CaseStatus.REVIEWED if accepted else CaseStatus.IN_PROGRESS
            db.execute("UPDATE cases SET status = ?, updated_at = ? WHERE id = ?", (status.value, now, case_id))
        return Review(review_id, label["id"], reviewer, bool(accepted), note, now)

    def reviews(self, case_id: str) -> List[Review]:
        self.get_case(case_id)
        rows = self._read(
            "SELECT r.* FROM reviews r JOIN labels l ON r.label_id = l.id WHERE l.case_id = ? ORDER BY r.created_at",
            (case_id,),
        )
        return [
            Review(r["id"], r["label_id"], r["reviewer"], bool(r["accepted"]), r["note"], r["created_at"]) for r in rows
        ]


def open_datastore(root: Union[str, Path], create: bool = False) -> Datastore:
    """Open an existing store (``create=False``: a missing store is an error, not a new empty one)."""
    root = Path(os.fspath(root))
    return Datastore(root, create=create)
