"""The SegAssist client: talks to a backend over HTTP. Needs only numpy, requests and pydantic.

Runs in any Python 3.9+ (Slicer's ``PythonSlicer`` included); no torch, no FastAPI. Uses zstd
when the ``zstandard`` package is present and zlib otherwise.

- :class:`SegAssistClient`: one backend (URL + token); the engine interface
  (``capabilities()``, ``open_session()``) plus health, info and image upload.
- :class:`RemoteSession`: the engine session interface (``add_prompt``, ``undo``, ``redo``,
  ``reset``, ``result``, ``prompt_log``, ``close``), plus ``status()`` (queue position),
  ``fetch_result()`` and ``recover()``.
- :class:`LocalBackend`: starts a backend on this machine for the user and stops it with them.
- Exceptions in :mod:`SegAssistLib.client.errors`, one per failure kind.
"""

from SegAssistLib.client.errors import (
    AuthenticationError,
    BackendTimeoutError,
    BackendUnavailableError,
    BadRequestError,
    ClientError,
    ImageConflictError,
    ImageLostError,
    ImageMismatchError,
    ImageNotFoundError,
    InvalidImageError,
    InvalidPromptError,
    JobWaitTimeoutError,
    LearningConflictError,
    LearningDisabledError,
    LimitExceededError,
    NotFoundError,
    PayloadTooLargeError,
    ProtocolError,
    ServerBusyError,
    ServerError,
    ServerReplyError,
    SessionNotFoundError,
    SessionStateError,
    UploadTimeoutError,
)
from SegAssistLib.client.local import LocalBackend, LocalBackendError
from SegAssistLib.client.remote import SegAssistClient
from SegAssistLib.client.session import RemoteSession

__all__ = [
    "AuthenticationError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "BadRequestError",
    "ClientError",
    "ImageLostError",
    "ImageMismatchError",
    "ImageNotFoundError",
    "InvalidImageError",
    "InvalidPromptError",
    "JobWaitTimeoutError",
    "LearningConflictError",
    "LearningDisabledError",
    "LimitExceededError",
    "LocalBackend",
    "LocalBackendError",
    "NotFoundError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteSession",
    "SegAssistClient",
    "ServerBusyError",
    "ServerError",
    "ServerReplyError",
    "SessionNotFoundError",
    "SessionStateError",
    "ImageConflictError",
    "UploadTimeoutError",
]
