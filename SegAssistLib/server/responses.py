"""The error replies every route documents in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Dict, Union

from SegAssistLib.api_models import ErrorReply

ERROR_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    status: {"model": ErrorReply, "description": description}
    for status, description in (
        (400, "malformed or truncated body, malformed id"),
        (401, "token missing or wrong"),
        (404, "unknown image or session, or expired session"),
        (408, "upload body not received in time"),
        (409, "nothing to undo or redo; prompt limit reached"),
        (413, "body or image above the limits"),
        (415, "wrong content type: a JSON body needs application/json, an image upload its frame type"),
        (422, "invalid prompt, image, dtype or shape"),
        (429, "too many sessions"),
        (500, "internal_error (a bug: the server log has the details); corrupt_data (a damaged datastore file)"),
        (503, "queue full or shutting down"),
    )
}
