"""The datastore's SQLite side: connecting (WAL, or read-only as the file is on disk), the schema,
the upgrade of an older schema (or reading it as it is), write transactions, and the database's
failures as the store's errors. Torch-free.

:class:`StoreDatabase` is a base of :class:`~SegAssistLib.learning.datastore.Datastore`, which sets
its attributes; that module's docstring tells what each schema version holds and how a store is
upgraded.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from SegAssistLib.learning.errors import DamagedStoreError, DatastoreError, StoreAccessError

SCHEMA_VERSION = 3
DB_NAME = "segassist.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    shape TEXT NOT NULL,
    spacing TEXT NOT NULL,
    origin TEXT NOT NULL,
    direction TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    content_hash TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    imported_at REAL NOT NULL,
    imported_by TEXT NOT NULL,
    locked_by TEXT,
    lock_expires REAL,
    updated_at REAL NOT NULL,
    subject TEXT
);
CREATE INDEX IF NOT EXISTS cases_status ON cases(status);
CREATE TABLE IF NOT EXISTS labels (
    id TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id),
    version INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    model TEXT,
    adapter_version TEXT,
    n_interactions INTEGER,
    seconds_spent REAL,
    submitted INTEGER NOT NULL,
    n_foreground INTEGER NOT NULL,
    prompt_log TEXT,
    UNIQUE (case_id, version)
);
CREATE TABLE IF NOT EXISTS image_hashes (
    hash TEXT PRIMARY KEY,
    case_id TEXT NOT NULL REFERENCES cases(id)
);
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY,
    label_id TEXT NOT NULL REFERENCES labels(id),
    reviewer TEXT NOT NULL,
    accepted INTEGER NOT NULL,
    note TEXT,
    created_at REAL NOT NULL
);
"""
_SCHEMA_STATEMENTS = tuple(s.strip() for s in _SCHEMA.split(";") if s.strip())  # run one by one in a transaction
_LABELS_TABLE = next(s for s in _SCHEMA_STATEMENTS if s.startswith("CREATE TABLE IF NOT EXISTS labels ("))
_UNKNOWABLE = ("n_interactions", "seconds_spent")  # NULL when unknown (schema 3); NOT NULL before
_LABELS_REBUILT = "labels_v3"  # the labels table of schema 3 while it is filled (only inside the upgrade)
# errors of the calling code, not of the store: never turned into a StoreAccessError
_CODE_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError)

# a writer waiting for another process's write lock tries in steps this long, this process's lock released
# between them (StoreDatabase._begin_immediate)
_BEGIN_TRY_MS = 50
_BEGIN_PAUSE_S = 0.005

_DAMAGED_MESSAGES = ("file is not a database", "database disk image is malformed")
STORE_FOLDERS = ("images", "labels")  # the store's folders of stored files


def store_folders_with_files(root: Path) -> List[str]:
    """Which of the store's folders (``images/``, ``labels/``) under ``root`` hold a file, at any depth."""
    return [f"{sub}/" for sub in STORE_FOLDERS if _holds_a_file(root / sub)]


def _holds_a_file(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def open_connection(target: str, uri: bool = False) -> sqlite3.Connection:
    """A connection as the store uses it: rows by column name, transactions begun explicitly
    (:meth:`StoreDatabase._write`), shared by threads (behind ``StoreDatabase._lock``)."""
    conn = sqlite3.connect(target, uri=uri, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    return conn


def _is_read_only_error(exc: sqlite3.Error) -> bool:
    """SQLite refused to write (the file, its folder or the disk is read-only to this user)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_READONLY") or "readonly database" in str(exc)


def _is_busy_error(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock SQLite waited for."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_BUSY") or "database is locked" in str(exc)


def _is_cant_open_error(exc: sqlite3.Error) -> bool:
    """SQLite could not open a file it needs (on a read-only disk: the WAL index it would make)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith("SQLITE_CANTOPEN") or "unable to open database file" in str(exc)


class StoreDatabase:
    """The database of the store in the folder ``root``: opened by :meth:`_connect`, made current by
    :meth:`_init_schema`, read by :meth:`_read`, changed in :meth:`_write` transactions."""

    # set by Datastore.__init__, which opens the store
    root: Path
    read_only: bool
    may_create: bool  # an empty database may be set up as a new store (Datastore(create=True))
    _conn: sqlite3.Connection
    _lock: threading.RLock

    def _connect(
        self, db_path: Path, connect: Callable[..., sqlite3.Connection] = open_connection
    ) -> sqlite3.Connection:
        """A connection to the store's database, its first read done: a file that is no database fails here.

        Nothing is written. A WAL database is read through its index file (``-shm``), which SQLite makes
        beside it when no process holding the store open has: in a folder this user cannot write (or on
        a read-only disk), a store nobody has open is read instead as it is on disk, read-only
        (``immutable``; ``self.read_only``). A write another process starts meanwhile is not seen by
        that reader; a store with changes still in its ``-wal`` file is refused rather than read
        without them. ``connect`` opens each connection (:func:`open_connection`, or what the caller
        passes instead).
        """
        conn: Optional[sqlite3.Connection] = None
        try:
            with self._sqlite_errors():
                try:
                    conn = connect(str(db_path))
                    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError as exc:
                    if conn is None or not (_is_read_only_error(exc) or _is_cant_open_error(exc)):
                        raise
                    conn.close()
                    conn = None
                    wal = db_path.with_name(DB_NAME + "-wal")
                    if wal.is_file() and wal.stat().st_size > 0:
                        raise StoreAccessError(
                            f"datastore {self.root} is read-only here and holds changes not yet in its "
                            f"database file (its {wal.name}): open it once with write access to its folder",
                            "the datastore is read-only to this server and holds changes not yet in its database",
                        ) from exc
                    conn = connect(f"{db_path.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
                    conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
                    self.read_only = True
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        return conn

    def _init_schema(self) -> None:
        """A store of a newer schema is refused before anything is written; one of the current schema is
        opened as it is; a new or older one is made current in one transaction (whole or not at all; of
        two processes opening it at once, the second finds it done). A database holding no SegAssist
        schema is never set up as a new store unless :meth:`_check_empty_database` allows it."""
        with self._lock, self._sqlite_errors():
            version = self._schema_version(self._conn)
            self._refuse_newer(version)
            if version == SCHEMA_VERSION:
                self._use_wal()
                return
            if version is None:
                self._check_empty_database()
            if self.read_only:
                self._read_older_schema(version)
                return
            self._use_wal()
            # the labels table is rebuilt (2 -> 3) while the reviews point at it: foreign keys are checked
            # again once it is back (a pragma that only takes effect outside a transaction)
            self._conn.execute("PRAGMA foreign_keys=OFF")
            try:
                try:
                    self._upgrade()
                except StoreAccessError as exc:
                    # opened as usual (a database not in WAL mode, or one a writer holds open: read through
                    # its WAL index), yet this user cannot write it: read it as it is
                    cause = exc.__cause__
                    if not (isinstance(cause, sqlite3.Error) and _is_read_only_error(cause)):
                        raise
                    self.read_only = True
                    self._read_older_schema(version)
            finally:
                self._conn.execute("PRAGMA foreign_keys=ON")

    def _read_older_schema(self, version: Optional[int]) -> None:
        """A store of an older schema that this user can only read, read as it is: its rows hold what the
        current schema reads (a 0 where an unknown count is NULL now: as after the upgrade, which keeps
        them). What it lacks is supplied for this connection alone, in its temporary schema (which names
        resolve to first; nothing is written to the store): schema 1's ``cases.subject``, NULL (every
        case its own subject, as the upgrade makes it), and a table an early schema-1 store lacks, empty.
        Every change is refused (:meth:`_refuse_if_read_only`). A store never set up is refused."""
        if version is None:
            raise StoreAccessError(
                f"datastore {self.root} is read-only here and needs setting up: open it once with "
                "write access to its folder",
                "the datastore is read-only to this server and needs setting up",
            )
        db = self._conn
        db.execute("PRAGMA temp_store=MEMORY")  # the disk may be read-only as a whole
        tables = {r["name"] for r in db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table'")}
        for statement in _SCHEMA_STATEMENTS:
            table = re.match(r"CREATE TABLE IF NOT EXISTS (\w+) \(", statement)
            if table and table.group(1) not in tables:
                db.execute(statement.replace("CREATE TABLE IF NOT EXISTS", "CREATE TEMP TABLE", 1))
        columns = {c["name"] for c in db.execute("PRAGMA main.table_info(cases)")}
        if "subject" not in columns:
            # the rowid named: a view has none of its own (an error in SQLite >= 3.36 built without
            # SQLITE_ALLOW_ROWID_IN_VIEW, NULL with it), and case lists are ordered by it
            db.execute("CREATE TEMP VIEW cases AS SELECT rowid AS rowid, *, NULL AS subject FROM main.cases")

    def _upgrade(self) -> None:
        """A new or older store made current, in one transaction (see :meth:`_init_schema`)."""
        with self._write() as db:
            version = self._schema_version(db)  # again, holding the write lock: another process may have
            self._refuse_newer(version)
            if version == SCHEMA_VERSION:
                return
            for statement in _SCHEMA_STATEMENTS:  # IF NOT EXISTS: a new store, or what schema 1 lacks
                db.execute(statement)
            columns = {c["name"] for c in db.execute("PRAGMA table_info(cases)")}
            if "subject" not in columns:  # schema 1 -> 2: every case stays its own subject
                db.execute("ALTER TABLE cases ADD COLUMN subject TEXT")
            self._rebuild_labels(db)  # 2 -> 3: unknown counts and times may be NULL
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def _rebuild_labels(self, db: sqlite3.Connection) -> None:
        """Schema 2 (or 1) -> 3, in the caller's transaction: the labels table made again without NOT NULL
        on ``n_interactions`` and ``seconds_spent`` (SQLite cannot drop it in place). Every row is copied
        with its rowid (the order of saving) and every value as it was, a 0 included; the indexes and
        triggers made on the old table are made again. Nothing to do for a table that allows NULL."""
        info = db.execute("PRAGMA table_info(labels)").fetchall()
        old = [c["name"] for c in info]
        if not any(c["notnull"] for c in info if c["name"] in _UNKNOWABLE):
            return
        extras = [r["sql"] for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND tbl_name = 'labels' "
            "AND sql IS NOT NULL ORDER BY type, name"
        )]  # fmt: skip
        db.execute(_LABELS_TABLE.replace("CREATE TABLE IF NOT EXISTS labels (", f"CREATE TABLE {_LABELS_REBUILT} (", 1))
        new = {c["name"] for c in db.execute(f"PRAGMA table_info({_LABELS_REBUILT})")}
        unknown = [name for name in old if name not in new]
        if unknown:  # never dropped with the old table: refused, the store left as it was (rolled back)
            raise DatastoreError(
                f"datastore {self.root}: its labels table has column(s) {', '.join(unknown)} that schema "
                f"{SCHEMA_VERSION} does not know; it was not upgraded"
            )
        columns = ", ".join(f'"{name}"' for name in old)
        before = db.execute("SELECT COUNT(*) FROM labels").fetchone()[0]
        db.execute(f"INSERT INTO {_LABELS_REBUILT} (rowid, {columns}) SELECT rowid, {columns} FROM labels")
        copied = db.execute(f"SELECT COUNT(*) FROM {_LABELS_REBUILT}").fetchone()[0]
        if copied != before:
            raise DamagedStoreError(
                f"datastore {self.root}: copying its {before} label versions for the schema upgrade copied "
                f"{copied}; it was not upgraded",
                "the datastore's label versions could not be copied for its schema upgrade",
            )
        db.execute("DROP TABLE labels")
        db.execute(f"ALTER TABLE {_LABELS_REBUILT} RENAME TO labels")
        for sql in extras:
            db.execute(sql)

    def _schema_version(self, db: sqlite3.Connection) -> Optional[int]:
        """The store's schema version, read only; None for an empty database (no table at all: a new
        store). A database with tables but no SegAssist schema version (another program's, or a store's
        that lost its ``meta`` row) is refused (:class:`DamagedStoreError`), never set up over them."""
        tables = [r[0] for r in db.execute("SELECT name FROM main.sqlite_master WHERE type = 'table' ORDER BY name")]
        if not tables:
            return None
        row = None
        if "meta" in tables:
            row = db.execute("SELECT value FROM main.meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
            raise DamagedStoreError(
                f"datastore {self.root}: its database {DB_NAME} is not a SegAssist datastore (it holds the "
                f"table(s) {shown} but no SegAssist schema version): another program's database, or a store's "
                "that lost its schema. Restore the store's database from a backup, or make a new store in a "
                "new folder; nothing was changed",
                "the datastore's database is not a SegAssist datastore (no schema version)",
            )
        try:
            return int(row[0])
        except (TypeError, ValueError):
            raise DamagedStoreError(
                f"datastore {self.root}: its database {DB_NAME} is damaged (schema version {row[0]!r})",
                f"the datastore's database is damaged (schema version {row[0]!r})",
            ) from None

    def _check_empty_database(self) -> None:
        """An empty database (a 0-byte file, or one without a table) is set up as a new store only when the
        store is being made (``create``) in a folder whose ``images/`` and ``labels/`` hold no file: the
        file another process making the store created a moment ago. Otherwise it is refused, nothing
        written: a read never makes a store, and an emptied database beside stored files would make every
        image and label an orphan."""
        holding = store_folders_with_files(self.root)
        if holding:
            raise DamagedStoreError(
                f"datastore {self.root}: its database {DB_NAME} is empty, yet its {' and '.join(holding)} hold "
                "files: the database was emptied or replaced. Restore it from a backup (with its -wal file, if "
                "any); nothing was changed",
                "the datastore's database is empty, yet the store holds images and labels",
            )
        if not self.may_create:
            raise DatastoreError(
                f"no SegAssist datastore at {self.root}: its database {DB_NAME} is empty (never set up); "
                "`segassist learn import` makes a store"
            )

    def _refuse_newer(self, version: Optional[int]) -> None:
        if version is not None and version > SCHEMA_VERSION:
            raise DatastoreError(
                f"datastore {self.root} has schema {version}, newer than this SegAssist reads "
                f"({SCHEMA_VERSION}): upgrade SegAssist"
            )

    def _use_wal(self) -> None:
        """WAL journal (readers never wait for the writer; see :meth:`_begin_immediate`). It stays in the
        file once set, when the store is made: a store made otherwise is switched when it can be, and read
        as it is when it cannot."""
        deadline = time.monotonic() + 30.0
        while not self.read_only and str(self._conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
            except sqlite3.OperationalError as exc:
                if _is_read_only_error(exc):
                    return
                # another process opening the new store at once switches it: look again (no busy handler here)
                if "database is locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    @contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        """A failure of the database (not of the calling code) as a :class:`StoreAccessError` naming the store."""
        try:
            yield
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, _CODE_ERRORS):
                raise
            raise self._store_error(exc) from exc

    def _store_error(self, exc: sqlite3.Error) -> StoreAccessError:
        name = getattr(exc, "sqlite_errorname", "") or ""  # Python 3.11+; the message before
        text = str(exc)
        where = f"datastore {self.root}"
        if name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or text in _DAMAGED_MESSAGES:
            return DamagedStoreError(
                f"{where}: its database {DB_NAME} is damaged or is not a SegAssist database ({text}); "
                "restore it from a backup",
                f"the datastore's database is damaged ({text})",
            )
        if _is_read_only_error(exc):
            return StoreAccessError(
                f"{where} is read-only here ({text}): reading it works, a change needs write access "
                "to its folder and files",
                f"the datastore is read-only to this server ({text})",
            )
        if _is_busy_error(exc):
            return StoreAccessError(
                f"{where} is kept locked by another process ({text}): try again",
                f"the datastore is kept locked by another process ({text}): try again",
            )
        return StoreAccessError(f"{where}: its database {DB_NAME} failed ({text})", f"the datastore failed ({text})")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; ``BEGIN IMMEDIATE`` takes the write lock up front (no upgrade deadlock).

        A failed ``COMMIT`` (disk full, I/O error) is rolled back too: left open, the transaction would
        show its rows to every reader of this shared connection and refuse every later write. A failure
        of the database is a :class:`StoreAccessError` (an ``IntegrityError`` stays itself: the caller's).
        """
        self._refuse_if_read_only()
        with self._sqlite_errors():
            self._begin_immediate()  # returns holding self._lock, until the transaction ends
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    with suppress(sqlite3.Error):  # the original error says more
                        self._conn.execute("ROLLBACK")
                raise
            finally:
                self._lock.release()

    def _begin_immediate(self) -> None:
        """``BEGIN IMMEDIATE`` on the shared connection, returning with ``self._lock`` held.

        While another process holds the store's write lock, the wait (up to the connection's busy
        timeout, 30 s) is spent outside ``self._lock``: tries of :data:`_BEGIN_TRY_MS` each, the lock
        released between them, so that this process's readers go on (WAL: they never wait for a writer)
        instead of queueing behind a writer that waits. Past the timeout, SQLite's "database is locked".
        """
        deadline: Optional[float] = None
        while True:
            self._lock.acquire()
            timeout_ms = 0
            try:
                timeout_ms = int(self._conn.execute("PRAGMA busy_timeout").fetchone()[0])
                self._conn.execute(f"PRAGMA busy_timeout = {min(timeout_ms, _BEGIN_TRY_MS)}")
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                finally:
                    self._conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")
                return
            except sqlite3.OperationalError as exc:
                self._lock.release()
                if deadline is None:
                    deadline = time.monotonic() + timeout_ms / 1000.0
                if not _is_busy_error(exc) or time.monotonic() >= deadline:
                    raise
            except BaseException:
                self._lock.release()
                raise
            time.sleep(_BEGIN_PAUSE_S)

    def _refuse_if_read_only(self) -> None:
        """Before a change (and before the file it writes, if any): a store read as it is on disk refuses it."""
        if self.read_only:
            raise StoreAccessError(
                f"datastore {self.root} is read-only here: reading it works, a change needs write access to its folder",
                "the datastore is read-only to this server",
            )

    def _read(self, sql: str, params: Sequence = ()) -> List[sqlite3.Row]:
        with self._lock, self._sqlite_errors():
            return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
