"""The error replies every route documents in the OpenAPI schema."""

from __future__ import annotations

from typing import Any, Dict, Union

from fastapi import Response
from pydantic import BaseModel

from SegAssistLib.api_models import ErrorReply

ERROR_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    status: {"model": ErrorReply, "description": description}
    for status, description in (
        (400, "malformed or truncated body, malformed id"),
        (401, "token missing or wrong"),
        (404, "unknown image or session, or expired session"),
        (408, "upload body not received in time"),
        (413, "body or image above the limits"),
        (415, "wrong content type: a JSON body needs application/json, an image upload its frame type"),
        (422, "invalid prompt, image, dtype or shape"),
        (429, "too many sessions"),
        (500, "internal_error (a bug: the server log has the details); corrupt_data (a damaged datastore file)"),
        (503, "queue full or shutting down"),
    )
}


def conflict(description: str) -> Dict[Union[int, str], Dict[str, Any]]:
    """The 409 of a route that can answer one, described by the codes it sends (each route its own:
    a 409 of an upload is not one of a session)."""
    return {409: {"model": ErrorReply, "description": description}}


PROMPT_LIMIT = "prompt_limit: the session has had its maximum number of prompts (max_prompts_per_session)"
SESSION_STATE = "session_state: nothing to undo or redo"
IMAGE_CONFLICT = "image_conflict: the image is held already, with another modality than this upload names"
LEARNING_CONFLICTS = (
    "duplicate_case, case_locked, case_state, training_busy or version_state: the learning datastore's state "
    "does not allow this (the message says why)"
)

#: What the routes whose replies carry arrays add to :data:`ERROR_RESPONSES`.
ARRAY_REPLY_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    406: {
        "model": ErrorReply,
        "description": "not_acceptable: the client reads neither zstd nor zlib (X-SegAssist-Accept-Codecs) and the "
        "array is above max_uncompressed_reply_bytes",
    }
}


def json_reply(model: BaseModel) -> Response:
    """``model`` as a JSON reply, serialised here: call it in the thread pool. A route that returns the
    model instead has FastAPI validate and serialise it on the event loop, which for a whole mask in
    base64 (tens of megabytes) holds every other request, /v1/health included. The route keeps its
    ``response_model`` for the schema; the bytes are the ones FastAPI would send."""
    return Response(model.model_dump_json(), media_type="application/json")
