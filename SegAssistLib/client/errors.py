"""Typed client exceptions, one per kind of failure, mapped from the server's error ``code``.

Each also derives from the library's own exception where one fits (an invalid prompt raises a
:class:`~SegAssistLib.errors.PromptError` whether the engine runs in-process or remotely), so
callers can handle both the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Type

from SegAssistLib.errors import ImageError, PromptError, SegAssistError, SessionError


class ClientError(SegAssistError):
    """Base class of every error the client raises."""

    code = "client_error"
    # set on the error of a request that carries a request id and was sent again after its reply
    # was lost: the server may have done it all the same (the next request tells)
    outcome_unknown = False

    def __init__(
        self,
        message: str,
        status: Optional[int] = None,
        code: Optional[str] = None,
        details: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        if code:
            self.code = code
        self.details = details or {}

    def __str__(self) -> str:
        prefix = f"[{self.status} {self.code}] " if self.status else ""
        return prefix + self.message


class BackendUnavailableError(ClientError):
    """The server cannot be reached (not running, restarting, network down), or the request failed
    in the HTTP library for another reason (the message names the URL)."""

    code = "backend_unavailable"


class BackendTimeoutError(BackendUnavailableError):
    """The server did not answer within the read timeout (busy, or a very large request)."""

    code = "backend_timeout"


class JobWaitTimeoutError(ClientError, TimeoutError):
    """A training job is still running when ``wait_for_job``'s time is up (the job goes on)."""

    code = "job_wait_timeout"


class ProtocolError(ClientError):
    """The reply is not what the API promises (wrong server, or a proxy answering instead): not JSON,
    a field missing or of the wrong type, an array that does not decode, a redirect loop. The message
    names the route."""

    code = "protocol_error"


class ServerReplyError(ClientError):
    """The server answered with its error shape; ``status``, ``code`` and ``message`` say why."""


class BadRequestError(ServerReplyError, ValueError):
    """400/422: the request itself is malformed (body, id, dtype, shape); 406: a reply the client's
    codecs would have to take uncompressed is above the server's limit for that."""


class AuthenticationError(ServerReplyError):
    """401: the token is missing or wrong."""


class NotFoundError(ServerReplyError):
    """404: no such endpoint, image or session."""


class ImageNotFoundError(NotFoundError):
    """404: the server does not hold this image (upload it)."""


class SessionNotFoundError(NotFoundError, SessionError):
    """404: the session is gone (closed, idle-expired, or the server restarted): ``recover()``."""


class SessionStateError(ServerReplyError, SessionError):
    """409: nothing to undo or redo, or the session's prompt limit is reached."""


class UploadTimeoutError(ServerReplyError):
    """408: the upload's body did not reach the server within its time limit (slow link?)."""


class PayloadTooLargeError(ServerReplyError, ValueError):
    """413: the body or the image is above the server's limits (``details['limit']``)."""


class InvalidPromptError(ServerReplyError, PromptError):
    """422: the prompt is malformed, degenerate, outside the image, or of a kind the model lacks."""


class InvalidImageError(ServerReplyError, ImageError):
    """422: the image cannot be segmented (NaN, constant, not 3D, bad geometry, wrong dtype)."""


class LimitExceededError(ServerReplyError):
    """429: too many sessions (per user or in total)."""


class ServerBusyError(ServerReplyError):
    """503: the queue is full or the server is shutting down; retry later."""


class ImageConflictError(ServerReplyError):
    """409: the server holds this image already with another modality (a held image never changes;
    a session's own modality overrides it, which ``open_session`` sends)."""


class LearningConflictError(ServerReplyError):
    """409 from the learning endpoints: the case is locked by someone else or already imported, a
    training job is already running, or that adapter version cannot be made current."""


class LearningDisabledError(NotFoundError):
    """404: the server runs without a learning datastore (``segassist serve --learn-store DIR``)."""


class ServerError(ServerReplyError):
    """5xx: a server bug or an unexpected failure; its log has the details."""


_BY_CODE: Dict[str, Type[ServerReplyError]] = {
    "image_not_found": ImageNotFoundError,
    "session_not_found": SessionNotFoundError,
    "session_expired": SessionNotFoundError,
    "session_state": SessionStateError,
    "prompt_limit": SessionStateError,
    "invalid_prompt": InvalidPromptError,
    "prompt_outside_image": InvalidPromptError,
    "unsupported_prompt": InvalidPromptError,
    "invalid_image": InvalidImageError,
    "unsupported_dtype": InvalidImageError,
    "invalid_shape": InvalidImageError,
    "image_conflict": ImageConflictError,
    "image_too_large": PayloadTooLargeError,
    "body_too_large": PayloadTooLargeError,
    "learning_disabled": LearningDisabledError,
    "duplicate_case": LearningConflictError,
    "case_locked": LearningConflictError,
    "case_state": LearningConflictError,
    "training_busy": LearningConflictError,
    "version_state": LearningConflictError,
}

_BY_STATUS: Dict[int, Type[ServerReplyError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: AuthenticationError,
    404: NotFoundError,
    405: BadRequestError,
    406: BadRequestError,
    408: UploadTimeoutError,
    409: SessionStateError,
    413: PayloadTooLargeError,
    415: BadRequestError,
    422: BadRequestError,
    429: LimitExceededError,
    503: ServerBusyError,
}


def error_for(status: int, code: str, message: str, details: Optional[Dict[str, Any]] = None) -> ClientError:
    """The typed exception for a server error reply."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServerError if status >= 500 else ServerReplyError)
    return cls(message, status=status, code=code, details=details)


class ImageMismatchError(ClientError, ValueError):
    """The volume given to :meth:`RemoteSession.recover` (or ``move_to``) is not the session's image:
    its content hash (voxels and geometry, the server's image id) differs. Nothing was changed."""

    code = "image_mismatch"


class ImageLostError(ImageNotFoundError):
    """:meth:`RemoteSession.recover` found the server without the session's image and the session
    holds no copy of it (opened by image id, or attached by session id): call ``recover(volume=...)``
    with that image. The session's prompts are kept, so that call brings the mask back."""
