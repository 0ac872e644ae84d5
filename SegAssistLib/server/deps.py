"""Request dependencies: the server state, the authenticated user, the reply codec."""

from __future__ import annotations

from typing import Iterable, Optional

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from SegAssistLib.api_models import ACCEPT_CODECS_HEADER, REQUEST_ID_PATTERN, ErrorCode, parse_codecs
from SegAssistLib.server.errors import ApiError, error_response
from SegAssistLib.server.state import ServerState
from SegAssistLib.transport import best_codec

bearer = HTTPBearer(
    auto_error=False,
    description="a per-user token: `Authorization: Bearer <token>` (every endpoint but health)",
)
ANONYMOUS_USER = "local"


def get_state(request: Request) -> ServerState:
    return request.app.state.segassist


def _unauthorized(token_sent: bool) -> ApiError:
    reason = "the token is not valid" if token_sent else "no token was sent"
    return ApiError(
        401, ErrorCode.UNAUTHORIZED,
        f"{reason}: send 'Authorization: Bearer <token>' with a token this server issued",
        headers={"WWW-Authenticate": "Bearer"},
    )  # fmt: skip


USER_SCOPE_KEY = "segassist.user"  # where TokenGateMiddleware leaves the user it verified


def current_user(
    request: Request,
    state: ServerState = Depends(get_state),
    credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer),  # documents the scheme in the API
) -> str:
    """The user a bearer token belongs to (``local`` when the server runs without tokens), as the
    token gate verified it before the request's body was read."""
    if not state.verifier.enabled:
        return ANONYMOUS_USER
    user = request.scope.get(USER_SCOPE_KEY)
    if user is None:  # a public path (the gate let it through unverified) that asks for a user
        raise _unauthorized(credentials is not None)
    return user


class TokenGateMiddleware:
    """Answer 401 before a byte of the body is read when the token is missing or wrong: FastAPI reads
    and parses a JSON body before it runs the dependencies (``current_user``), so without this a
    stranger could make the server parse a large body. ``public`` paths (health, the API docs) pass."""

    def __init__(self, app: ASGIApp, state: ServerState, public: Iterable[str]) -> None:
        self.app = app
        self.state = state
        self.public = frozenset(public)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.state.verifier.enabled and scope["path"] not in self.public:
            token = _bearer_token(scope)
            user = self.state.verifier.user_for(token)
            if user is None:
                err = _unauthorized(token is not None)
                response = error_response(err.status_code, err.code, err.message, headers=err.headers)
                await response(scope, receive, send)
                return
            scope[USER_SCOPE_KEY] = user  # current_user reads it: the token is checked once
        await self.app(scope, receive, send)


def _bearer_token(scope: Scope) -> Optional[str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


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
