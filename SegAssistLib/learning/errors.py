"""Errors of the learning loop (datastore, adapters), each with a machine-readable ``code``. Torch-free."""

from __future__ import annotations

from SegAssistLib.errors import SegAssistError


class DatastoreError(SegAssistError, RuntimeError):
    """The datastore cannot do what was asked: bad input, a missing or inconsistent file."""

    code = "datastore_error"


class InvalidIdentifierError(DatastoreError, ValueError):
    """A case id, label id or user name is not of the allowed form."""

    code = "invalid_identifier"


class NotFoundError(DatastoreError, LookupError):
    """No case or label version with that id."""

    code = "not_found"


class DuplicateCaseError(DatastoreError):
    """The image is already in the store (same voxels and geometry)."""

    code = "duplicate_case"

    def __init__(self, message: str, case_id: str) -> None:
        super().__init__(message)
        self.case_id = case_id


class CaseLockedError(DatastoreError):
    """The case is locked by another annotator."""

    code = "case_locked"


class InvalidStateError(DatastoreError):
    """The case's status does not allow the operation (for example reviewing a case never submitted)."""

    code = "invalid_state"


class NotLockedError(InvalidStateError):
    """Releasing the lock of a case nobody holds a live lock of (``unlock(require_lock=True)``)."""

    code = "not_locked"


class CorruptDataError(DatastoreError):
    """A stored file does not match the checksum recorded when it was written."""

    code = "corrupt_data"


class StoreAccessError(DatastoreError):
    """The store's database cannot be read or written: read-only to this user, locked by another
    process for too long, a disk error. The store's state, not the request's fault. ``public``: the
    message without the store's path (a server's reply must not show where its files are)."""

    code = "storage_unavailable"

    def __init__(self, message: str, public: str = "") -> None:
        super().__init__(message)
        self.public = public or message


class DamagedStoreError(StoreAccessError, CorruptDataError):
    """The store's database file is damaged, or is not a SQLite database at all."""

    code = "corrupt_data"


class AdapterError(SegAssistError, RuntimeError):
    """An adapter cannot be applied, saved or loaded (wrong base model, wrong file, bad rank)."""

    code = "adapter_error"
