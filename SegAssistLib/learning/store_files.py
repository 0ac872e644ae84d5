"""The datastore's folder: where its image and label files lie, whether a folder is fit for a new
store, and its files checked against the database's records (verify, recover: temporary files deleted,
complete files no record names moved to ``quarantine/``, never deleted). Torch-free."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import suppress
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from SegAssistLib.errors import ImageError
from SegAssistLib.files import atomic_write, fsync_dir, is_temp_file, make_folder_durable, sha256_file
from SegAssistLib.learning.errors import DatastoreError, StoreAccessError
from SegAssistLib.learning.records import (
    IntegrityReport,
    RecoveryReport,
    check_case_id,
    check_label_id,
    new_label_id,
)
from SegAssistLib.learning.store_db import DB_NAME, StoreDatabase, store_folders_with_files

DEFAULT_RECOVER_AGE_S = 600.0
QUARANTINE = "quarantine"  # the store's folder of files no record points at, moved there by recover


def _move_aside(path: Path, target: Path) -> None:
    """Move ``path`` to ``target`` (a new name in the same store: a rename), its folders made and synced."""
    make_folder_durable(target.parent)
    os.rename(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)


def check_new_store_folder(root: Path) -> None:
    """A new store goes into a new folder or one holding only folders (a server's upload folder, a
    disk's lost+found): never into a folder of someone's files, which it would mix with its own."""
    if not root.exists():
        return
    if not root.is_dir():
        raise DatastoreError(f"{root} is a file, not a datastore folder")
    # a database beside it: another process made the store a moment ago (opening it at once with this one)
    files = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith((".", DB_NAME)))
    if files:
        shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
        raise DatastoreError(
            f"{root} holds files ({shown}) and no SegAssist datastore: make the new store in a "
            "new folder, or one that holds only folders"
        )
    for sub in store_folders_with_files(root):
        # a store whose database was moved or lost: a new, empty one would call every image and label
        # in it unrecorded
        raise DatastoreError(
            f"{root} holds a datastore's {sub} but not its database {DB_NAME}: it was moved or lost. "
            f"Put it back (with its -wal file, if any) to open the store; a new store goes into a new folder"
        )


class StoreFiles(StoreDatabase):
    """The files of the store in the folder ``root``, each named by the id of the record that makes it
    visible (see the datastore's module docstring)."""

    def image_path(self, case_id: str) -> Path:
        return self.root / "images" / f"{check_case_id(case_id)}.nii.gz"

    def label_path(self, case_id: str, label_id: str) -> Path:
        return self.root / "labels" / check_case_id(case_id) / f"{check_label_id(label_id)}.nii.gz"

    def _write_new_file(self, path: Path, writer: Callable[[Path], object], what: str) -> str:
        """Write a new file of the store (``atomic_write``); returns its SHA-256.

        A write the file system refuses (a full disk, an I/O error, a folder that cannot be made, a
        file written short: ``OSError``, or the ``ImageError`` of a file that does not read back
        whole) is the store's state, not the caller's fault: :class:`StoreAccessError`, its ``public``
        message without the store's path. Nothing is left behind and nothing was recorded, so the
        change can be tried again."""
        try:
            return atomic_write(path, writer)
        except (OSError, ImageError) as exc:
            reason = (exc.strerror or type(exc).__name__) if isinstance(exc, OSError) else "it did not read back whole"
            raise StoreAccessError(
                f"datastore {self.root}: cannot write {what} ({exc}); nothing was saved",
                f"the datastore cannot write {what} right now ({reason}): nothing was saved; try again later, "
                "or ask the server's operator (a full disk?)",
            ) from exc

    def _drop_unrecorded_file(self, path: Path, table: str, row_id: str) -> None:
        """After a failed write: delete its new file unless the row that names it was committed.

        An interrupt (Ctrl-C) can land after ``COMMIT``: the row is saved, and deleting its file would
        turn a saved label into a lost one. When the store cannot tell, the file stays (an orphan file
        costs disk space; a row without its file is lost work).
        """
        try:
            recorded = bool(self._read(f"SELECT 1 FROM {table} WHERE id = ?", (row_id,)))
        except (sqlite3.Error, StoreAccessError):
            return
        if not recorded:
            path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ integrity

    def _referenced_files(self) -> Dict[Path, Tuple[str, str]]:
        """Every file a record points at -> (what, recorded sha256)."""
        files: Dict[Path, Tuple[str, str]] = {}
        for row in self._read("SELECT id, image_sha256 FROM cases"):
            files[self.image_path(row["id"])] = (f"image of case {row['id']}", row["image_sha256"])
        for row in self._read("SELECT id, case_id, sha256 FROM labels"):
            files[self.label_path(row["case_id"], row["id"])] = (f"label version {row['id']}", row["sha256"])
        return files

    def _label_folders(self) -> List[Path]:
        """The per-case folders of ``labels/`` (none when ``labels/`` itself is gone)."""
        labels = self.root / "labels"
        return [p for p in labels.iterdir() if p.is_dir()] if labels.is_dir() else []

    def _stored_files(self) -> List[Path]:
        """Every file in ``images/`` and the label folders; a folder that is gone holds none (verify then
        names each of its recorded files as missing, instead of failing on the folder)."""
        images = self.root / "images"
        out = [p for p in images.iterdir() if p.is_file()] if images.is_dir() else []
        for folder in self._label_folders():
            out.extend(p for p in folder.iterdir() if p.is_file())
        return out

    def verify(self, check_images: bool = True) -> IntegrityReport:
        """Check every referenced file exists and matches its checksum; list unreferenced files."""
        referenced = self._referenced_files()
        corrupt = []
        for path, (what, digest) in sorted(referenced.items()):
            if not check_images and path.parent.name == "images":
                continue
            if not path.is_file():
                corrupt.append(f"{what}: file missing")
            elif sha256_file(path) != digest:
                corrupt.append(f"{what}: checksum mismatch")
        orphans = sorted(str(p.relative_to(self.root)) for p in self._stored_files() if p not in referenced)
        return IntegrityReport(corrupt=tuple(corrupt), orphans=tuple(orphans))

    def recover(self, min_age_s: float = DEFAULT_RECOVER_AGE_S) -> RecoveryReport:
        """Tidy the leftovers of interrupted writes: delete the temporary files (``.tmp-*``, never a whole
        image or label) and move each complete file no record points at into the quarantine folder
        (:meth:`quarantine_folder`), never deleting it.

        Such a file is normally one a write published just before it was killed, before its record was
        saved; it is also every label saved since the backup a database was restored from, the only copy
        of that annotation. Only files older than ``min_age_s`` are touched, so that a write in progress
        in another process is left alone; pass 0 when no other process uses the store. A store read-only
        here refuses (:class:`StoreAccessError`), as every change does.
        """
        self._refuse_if_read_only()
        referenced = self._referenced_files()
        now = time.time()
        removed: List[str] = []
        quarantined: List[Tuple[str, str]] = []
        batch = self.quarantine_folder() / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(now))}-{new_label_id()[:6]}"
        for path in sorted(self._stored_files()):
            if path in referenced:
                continue
            relative = path.relative_to(self.root)
            try:
                if now - path.stat().st_mtime < min_age_s:
                    continue
                if is_temp_file(path):
                    path.unlink()
                    removed.append(relative.as_posix())
                else:
                    target = batch / relative
                    _move_aside(path, target)
                    quarantined.append((relative.as_posix(), target.relative_to(self.root).as_posix()))
            except FileNotFoundError:
                continue
        for folder in self._label_folders():
            if not any(folder.iterdir()):
                with suppress(OSError):
                    folder.rmdir()
        return RecoveryReport(removed=tuple(removed), quarantined=tuple(quarantined))

    def quarantine_folder(self) -> Path:
        """Where :meth:`recover` moves complete files no record points at: ``quarantine/<time>-<id>/``
        below it, each file under its path in the store (``labels/<case id>/<label id>.nii.gz``)."""
        return self.root / QUARANTINE

    def quarantined_files(self) -> List[Path]:
        """The files earlier recoveries moved into the quarantine folder (kept until someone deletes them)."""
        folder = self.quarantine_folder()
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []

    def pending_writes(self) -> List[Path]:
        """Temporary files of writes in progress (or interrupted) right now."""
        return [p for p in self._stored_files() if is_temp_file(p)]
