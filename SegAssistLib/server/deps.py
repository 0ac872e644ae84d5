"""Request dependencies: the server state, the authenticated user, the reply codec."""

from __future__ import annotations

from typing import Optional

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from SegAssistLib.api_models import ACCEPT_CODECS_HEADER, REQUEST_ID_PATTERN, ErrorCode, parse_codecs
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.state import ServerState
from SegAssistLib.transport import best_codec

bearer = HTTPBearer(
    auto_error=False,
    description="a per-user token: `Authorization: Bearer <token>` (every endpoint but health)",
)
ANONYMOUS_USER = "local"


def get_state(request: Request) -> ServerState:
    return request.app.state.segassist


def current_user(
    state: ServerState = Depends(get_state),
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),
) -> str:
    """The user a bearer token belongs to (``local`` when the server runs without tokens)."""
    if not state.verifier.enabled:
        return ANONYMOUS_USER
    user = state.verifier.user_for(credentials.credentials if credentials else None)
    if user is None:
        reason = "no token was sent" if credentials is None else "the token is not valid"
        raise ApiError(
            401, ErrorCode.UNAUTHORIZED,
            f"{reason}: send 'Authorization: Bearer <token>' with a token this server issued",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    return user


def reply_codec(
    accept: Optional[str] = Header(
        None, alias=ACCEPT_CODECS_HEADER, description="codecs the client reads, best first: zstd,zlib"
    ),
) -> str:
    return best_codec(parse_codecs(accept))


def request_id(
    value: Optional[str] = Header(
        None,
        alias="X-SegAssist-Request-Id",
        pattern=REQUEST_ID_PATTERN,
        description=("client-chosen id of a mutating request; a repeat gets the first answer, not a second change"),
    ),
) -> Optional[str]:
    return value
