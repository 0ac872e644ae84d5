"""The one error shape: every failure becomes ``{"error": {status, code, message, details}}``.

Library exceptions (prompt, image, session, transport errors) map to 4xx by their type; FastAPI's
own validation and routing errors are reshaped; anything else is a bug and answers 500 with a
message pointing at the server log, never a traceback.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, FrozenSet, List, Optional, Pattern, Sequence, Tuple

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from SegAssistLib.api_models import ErrorBody, ErrorCode, ErrorReply
from SegAssistLib.errors import ImageError, PromptError, SessionError
from SegAssistLib.transport import TransportError

log = logging.getLogger("segassist.server")

#: HTTP status of each transport error code (the rest are 400).
_TRANSPORT_STATUS = {
    ErrorCode.IMAGE_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_DTYPE: 422,
    ErrorCode.INVALID_SHAPE: 422,
    ErrorCode.UNSUPPORTED_CODEC: 422,
    ErrorCode.INVALID_REQUEST: 422,  # a field an upload frame's header does not have
}


class ApiError(StarletteHTTPException):
    """An error with its code; raise it anywhere in a request (FastAPI passes HTTPExceptions through)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Optional[Dict[str, Any]] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.message = message
        self.details = details


def error_response(
    status: int, code: str, message: str, details: Optional[Dict[str, Any]] = None, headers=None
) -> JSONResponse:
    body = ErrorReply(error=ErrorBody(status=status, code=code, message=message, details=details))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def from_library_error(exc: Exception) -> ApiError:
    """The API error for an exception the library raises on purpose."""
    if isinstance(exc, TransportError):
        return ApiError(_TRANSPORT_STATUS.get(exc.code, 400), exc.code, str(exc), exc.details)
    if isinstance(exc, PromptError):
        return ApiError(422, ErrorCode.INVALID_PROMPT, str(exc))
    if isinstance(exc, ImageError):
        return ApiError(422, ErrorCode.INVALID_IMAGE, str(exc))
    if isinstance(exc, SessionError):
        return ApiError(409, ErrorCode.SESSION_STATE, str(exc))
    raise TypeError(f"not a library error: {exc!r}")


LIBRARY_ERRORS = (TransportError, PromptError, ImageError, SessionError)

_STATUS_CODES = {
    400: ErrorCode.MALFORMED_BODY,
    401: ErrorCode.UNAUTHORIZED,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    408: ErrorCode.UPLOAD_TIMEOUT,
    413: ErrorCode.BODY_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
}


def _about_a_prompt(error: dict) -> bool:
    """Inside a prompt (not a missing ``prompt`` field, which is a malformed request)."""
    loc = tuple(error.get("loc", ()))
    if "prompt" not in loc and "prompts" not in loc:
        return False
    return len(loc) > 2 or error.get("type") != "missing"


def _validation_code(exc: RequestValidationError) -> tuple:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, ErrorCode.MALFORMED_BODY
    if any(_about_a_prompt(e) for e in errors):
        return 422, ErrorCode.INVALID_PROMPT
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):  # no body, or not a JSON object
        return 400, ErrorCode.MALFORMED_BODY
    if any(
        tuple(e.get("loc", ()))[-1:] in (("image_id",), ("session_id",)) and e.get("type") != "missing" for e in errors
    ):
        return 400, ErrorCode.INVALID_ID
    if any(tuple(e.get("loc", ()))[:1] == ("path",) for e in errors):
        return 400, ErrorCode.INVALID_ID
    return 422, ErrorCode.INVALID_REQUEST


def _not_json(request: Request, exc: RequestValidationError) -> Optional[str]:
    """The media type of a body that failed validation because it was not read as JSON, else None.

    FastAPI reads a body as JSON only when its Content-Type says JSON; any other body (one of another
    type, or one with no Content-Type) it validates as raw bytes, which fails as a "malformed" body
    with a message about the model. That is the client's content type, not its body: 415.
    """
    if not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in exc.errors()):
        return None
    declared = request.headers.get("content-type")
    media = (declared or "").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return None
    if declared is None and not isinstance(exc.body, (bytes, bytearray)):  # no body was sent at all
        return None
    return media or "untyped"


def describe_errors(errors: Sequence[Dict[str, Any]]) -> str:
    """Pydantic's errors as one line, ``field: message`` each (the first five): the message of a
    request that fails validation, never pydantic's multi-line text."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{loc or 'body'}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def error_list(errors: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Pydantic's errors as the ``details.errors`` of a reply: ``loc`` (as strings), ``msg`` and
    ``type`` of the first 20 (not the input, which may be large or private)."""
    return [
        {"loc": [str(x) for x in e.get("loc", ())], **{k: e[k] for k in ("msg", "type") if k in e}} for e in errors[:20]
    ]


RouteMethods = List[Tuple[Pattern[str], FrozenSet[str]]]


def route_methods(prefix: str, routers: Sequence[APIRouter]) -> RouteMethods:
    """The path pattern and methods of every route of ``routers`` (included under ``prefix``), for
    :func:`allowed_methods`; the app keeps them as ``app.state.route_methods``."""
    return [
        (compile_path(prefix + route.path)[0], frozenset(route.methods))
        for router in routers
        for route in router.routes
        if isinstance(route, APIRoute)
    ]


def allowed_methods(request: Request) -> List[str]:
    """Every method some route takes at the request's path. Starlette's own 405 names only those of
    the first route that matches the path (``GET /v1/sessions/{id}``, not its ``DELETE`` beside it)."""
    table: RouteMethods = getattr(request.app.state, "route_methods", [])
    path = request.scope.get("path", "")
    return sorted({m for pattern, methods in table if pattern.match(path) for m in methods})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        media = _not_json(request, exc)
        if media is not None:
            sent = "a body without a Content-Type" if media == "untyped" else f"a body of type {media}"
            return error_response(
                415, ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                f"{request.method} {request.url.path} takes a JSON body: send it with 'Content-Type: "
                f"application/json', not {sent}",
            )  # fmt: skip
        status, code = _validation_code(exc)
        return error_response(status, code, describe_errors(exc.errors()), {"errors": error_list(exc.errors())})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, ErrorCode.MALFORMED_BODY)
        message = str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 404:
            message = f"no endpoint {request.method} {request.url.path}: see /docs or docs/api.md"
        elif exc.status_code == 405 and (allowed := allowed_methods(request)):
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
            message = f"{request.url.path} takes {', '.join(allowed)}, not {request.method}"
        return error_response(exc.status_code, code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            ErrorCode.INTERNAL_ERROR,
            f"internal error ({type(exc).__name__}); the server log has the details",
        )
