"""Human-in-the-loop learning: the datastore of versioned labels, exports, and (in
``SegAssistLib.learning.adapters``, which needs torch) LoRA and SALT adapters.

Importing this package does not import torch, so the datastore also runs in a torch-free Python.
"""

from SegAssistLib.learning.datastore import DEFAULT_LOCK_TTL_S, Datastore, open_datastore
from SegAssistLib.learning.errors import (
    AdapterError,
    CaseLockedError,
    CorruptDataError,
    DamagedStoreError,
    DatastoreError,
    DuplicateCaseError,
    InvalidIdentifierError,
    InvalidStateError,
    NotFoundError,
    StoreAccessError,
)
from SegAssistLib.learning.export import export_msd, export_seg_nrrd
from SegAssistLib.learning.records import (
    CaseRecord,
    CaseStatus,
    ImportReport,
    IntegrityReport,
    LabelVersion,
    Review,
)

__all__ = [
    "DEFAULT_LOCK_TTL_S",
    "AdapterError",
    "CaseLockedError",
    "CaseRecord",
    "CaseStatus",
    "CorruptDataError",
    "DamagedStoreError",
    "Datastore",
    "DatastoreError",
    "DuplicateCaseError",
    "ImportReport",
    "IntegrityReport",
    "InvalidIdentifierError",
    "InvalidStateError",
    "LabelVersion",
    "NotFoundError",
    "Review",
    "StoreAccessError",
    "export_msd",
    "export_seg_nrrd",
    "open_datastore",
]
