"""Errors of the background trainer, the adapter version registry and active learning. Torch-free.

Each carries a machine-readable ``code`` (the server maps them to 4xx replies).
"""

from __future__ import annotations

from SegAssistLib.errors import SegAssistError
from SegAssistLib.learning.errors import AdapterError, CorruptDataError


class TrainingError(SegAssistError, RuntimeError):
    """A training job cannot start or failed: too few labelled cases, a bad setting, no patch found."""

    code = "training_error"


class TrainingBusyError(TrainingError):
    """Another training job is running on this datastore (one at a time)."""

    code = "training_busy"


class JobNotFoundError(TrainingError, LookupError):
    """No training job with that id (or none at all) in this datastore."""

    code = "job_not_found"


class VersionNotFoundError(AdapterError, LookupError):
    """No adapter version with that id in the registry."""

    code = "adapter_version_not_found"


class RegistryError(AdapterError):
    """The version registry refuses the change (nothing to roll back to, a rejected version, ...)."""

    code = "adapter_registry_error"


class CorruptRegistryError(RegistryError, CorruptDataError):
    """The registry file cannot be read (not JSON, not a registry, a damaged record): the store's
    fault, not the request's. ``rollback --to base`` sets it aside and starts a new one."""

    code = "corrupt_data"


class OtherBaseModelError(RegistryError):
    """The version was made for other base weights than the loaded model's: it cannot answer with them."""


class NoCandidateError(SegAssistError, LookupError):
    """Active learning has no case left to propose (every case is labelled or locked)."""

    code = "no_case_left"


class ActiveLearningError(SegAssistError, ValueError):
    """An active-learning request cannot be served as asked (unknown strategy, no engine for it)."""

    code = "active_learning_error"
