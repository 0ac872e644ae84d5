"""Interactive sessions: who owns them, which worker runs them, and when they expire.

The store is touched from the event loop only (handlers and the expiry sweep), so it needs no
lock for its own bookkeeping; the engine session inside each entry is touched on its worker only.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from SegAssistLib.api_models import SESSION_ID_PATTERN, ErrorCode
from SegAssistLib.engine.base import EngineSession
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.worker import InferenceWorker

_ID = re.compile(SESSION_ID_PATTERN)
_FORGET_EXPIRED = 1024  # how many expired ids to remember, to answer "expired" rather than "not found"


@dataclass
class ServerSession:
    session_id: str
    user: str
    image_id: str
    shape: Tuple[int, int, int]
    worker: InferenceWorker
    last_used: float
    engine_session: Optional[EngineSession] = None  # worker thread only
    n_prompts: int = 0
    can_undo: bool = False
    can_redo: bool = False
    closed: bool = False
    #: the id and outcome of the last mutating request (a state.KeptOutcome: the changed box's place,
    #: not its voxels): a retried request gets the same answer
    last_request: Optional[Tuple[str, Any]] = None
    pending: int = 0  # requests in flight: a session with work in progress does not expire
    meta: Dict[str, Any] = field(default_factory=dict)
    #: the model version that answered this session's latest job (changes when a new adapter
    #: version is swapped in while the session is open)
    model_version: Optional[str] = None


class SessionStore:
    def __init__(
        self,
        idle_timeout_s: float,
        max_per_user: int,
        max_total: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions: Dict[str, ServerSession] = {}
        self._reserved: Dict[str, int] = {}  # per user: sessions being opened (counted in limits)
        self._expired: OrderedDict[str, None] = OrderedDict()
        #: (user, request id) of recent session creations: a retried create gets the same session
        self._creates: OrderedDict[Tuple[str, str], str] = OrderedDict()
        #: creates still opening, by (user, request id): a retry that arrives meanwhile waits for it
        self._opening: Dict[Tuple[str, str], asyncio.Future] = {}
        self.idle_timeout_s = idle_timeout_s
        self.max_per_user = max_per_user
        self.max_total = max_total
        self.clock = clock
        #: called with each session found idle and removed (the server closes its engine session)
        self.on_expire: Optional[Callable[[ServerSession], None]] = None

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, user: str) -> int:
        return sum(1 for s in self._sessions.values() if s.user == user) + self._reserved.get(user, 0)

    def reserve(self, user: str) -> None:
        """Hold a place for a session about to open; raises 429 when a limit is reached.

        Idle sessions are expired first: the sweep runs only every few seconds, and a session every
        other route already answers as expired must not hold a place.
        """
        self.expire_idle()
        if self.count(user) >= self.max_per_user:
            raise ApiError(
                429, ErrorCode.TOO_MANY_SESSIONS,
                f"user {user!r} already has {self.max_per_user} open sessions (the limit): close one first",
                {"limit": self.max_per_user},
            )  # fmt: skip
        if len(self._sessions) + sum(self._reserved.values()) >= self.max_total:
            raise ApiError(
                429, ErrorCode.TOO_MANY_SESSIONS,
                f"the server holds {self.max_total} sessions (its limit): try again later",
                {"limit": self.max_total},
                {"Retry-After": "30"},
            )  # fmt: skip
        self._reserved[user] = self._reserved.get(user, 0) + 1

    def release(self, user: str) -> None:
        n = self._reserved.get(user, 0) - 1
        if n > 0:
            self._reserved[user] = n
        else:
            self._reserved.pop(user, None)

    def add(self, user: str, image_id: str, shape: Tuple[int, int, int], worker: InferenceWorker) -> ServerSession:
        session = ServerSession(secrets.token_hex(16), user, image_id, shape, worker, self.clock())
        self._sessions[session.session_id] = session
        worker.n_sessions += 1
        return session

    def created_by(self, user: str, request_id: Optional[str]) -> Optional[ServerSession]:
        """The live session an earlier create with this request id made, if any."""
        if request_id is None:
            return None
        sid = self._creates.get((user, request_id))
        session = self._sessions.get(sid) if sid else None
        return session if session is not None and session.engine_session is not None else None

    def opening(self, user: str, request_id: Optional[str]) -> Optional[asyncio.Future]:
        """The future of a create with this request id that is still opening (its result: the
        session, or None when it failed), or None."""
        return self._opening.get((user, request_id)) if request_id is not None else None

    def begin_create(self, user: str, request_id: Optional[str]) -> None:
        """Mark a create as opening, so that a retry with the same request id waits for it."""
        if request_id is not None:
            self._opening[(user, request_id)] = asyncio.get_running_loop().create_future()

    def end_create(self, user: str, request_id: Optional[str], session: Optional[ServerSession]) -> None:
        """The create has opened ``session`` (None: it failed); a retry waiting for it goes on."""
        if request_id is None:
            return
        future = self._opening.pop((user, request_id), None)
        if session is not None:
            self.remember_create(user, request_id, session)
        if future is not None and not future.done():
            future.set_result(session)

    def remember_create(self, user: str, request_id: Optional[str], session: ServerSession) -> None:
        if request_id is None:
            return
        self._creates[(user, request_id)] = session.session_id
        while len(self._creates) > _FORGET_EXPIRED:
            self._creates.popitem(last=False)

    def get(self, user: str, session_id: str) -> ServerSession:
        """The user's session; 400 for a malformed id, 404 for another user's or an unknown one."""
        if not _ID.fullmatch(session_id):
            raise ApiError(400, ErrorCode.INVALID_ID, "session id must be 32 lowercase hex digits")
        session = self._sessions.get(session_id)
        if session is not None and self._is_idle(session):
            self._expire(session_id)
            session = None
        if session is None or session.user != user:
            if session_id in self._expired:
                raise ApiError(
                    404, ErrorCode.SESSION_EXPIRED,
                    f"session {session_id} was closed after {self.idle_timeout_s:.0f} s idle: open a new one",
                )  # fmt: skip
            raise ApiError(
                404, ErrorCode.SESSION_NOT_FOUND,
                f"no session {session_id}: it was closed, or the server restarted; open a new one "
                "(the client's recover() replays its prompts)",
            )  # fmt: skip
        session.last_used = self.clock()
        return session

    def _is_idle(self, session: ServerSession) -> bool:
        return session.pending == 0 and self.clock() - session.last_used > self.idle_timeout_s

    def remove(self, session_id: str, expired: bool = False) -> Optional[ServerSession]:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            session.closed = True
            session.worker.n_sessions -= 1
            if expired:
                self._expired[session_id] = None
                while len(self._expired) > _FORGET_EXPIRED:
                    self._expired.popitem(last=False)
        return session

    def expire_idle(self) -> List[ServerSession]:
        """Remove and return the sessions idle for longer than the timeout."""
        idle = [sid for sid, s in self._sessions.items() if self._is_idle(s)]
        return [s for s in (self._expire(sid) for sid in idle) if s is not None]

    def _expire(self, session_id: str) -> Optional[ServerSession]:
        session = self.remove(session_id, expired=True)
        if session is not None and self.on_expire is not None:
            self.on_expire(session)
        return session

    def all(self) -> List[ServerSession]:
        return list(self._sessions.values())

    def expires_in(self, session: ServerSession) -> float:
        return max(0.0, self.idle_timeout_s - (self.clock() - session.last_used))
