"""What one running server holds: images, sessions, workers; and the way requests reach a worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Tuple

import anyio
import numpy as np

from SegAssistLib.api_models import ErrorCode, SessionInfo
from SegAssistLib.engine.base import Engine, EngineSession, MaskUpdate
from SegAssistLib.engine.edges import DEFAULT_EDGE_BAND
from SegAssistLib.server.auth import TokenVerifier
from SegAssistLib.server.errors import LIBRARY_ERRORS, ApiError, from_library_error
from SegAssistLib.server.images import ImageStore
from SegAssistLib.server.learning import LearningState, base_checkpoint
from SegAssistLib.server.limits import ParseSlots, UploadSlots
from SegAssistLib.server.sessions import ServerSession, SessionStore
from SegAssistLib.server.settings import ServerSettings
from SegAssistLib.server.worker import InferenceWorker, QueueFull, WorkerPool, WorkerStopped

log = logging.getLogger("segassist.server")

EngineFactory = Callable[[str], Engine]


class Outcome(NamedTuple):
    """What a session operation returns from the worker, all of it read there, when the operation
    ran: a later request of the same session may run before the reply is built, and a repeat of the
    request id is answered with this same outcome."""

    update: MaskUpdate
    can_undo: bool
    can_redo: bool
    #: prompts the session had taken once the operation ran
    n_prompts: int
    #: the version that made the mask now current (None: no model made it, as after a reset)
    model_version: Optional[str]


class KeptOutcome(NamedTuple):
    """An :class:`Outcome` as a session keeps it for a repeat of its request id: the changed box's
    place and size, not its voxels (after a reset or a large re-prediction they are the whole mask,
    tens of MB of a CT, held by every session beside its undo history). A repeat is answered only
    while its request is still the session's last change, so the box's voxels are those of the mask
    now: they are read again from it (:meth:`replayed`)."""

    outcome: Outcome  # its update without voxels
    box: Tuple[int, ...]  # the shape of the update's voxels

    @classmethod
    def keep(cls, outcome: Outcome) -> KeptOutcome:
        update = outcome.update
        light = dataclasses.replace(update, voxels=np.zeros((0, 0, 0), np.uint8))
        return cls(outcome._replace(update=light), tuple(int(n) for n in update.voxels.shape))

    def replayed(self, es: EngineSession) -> Outcome:
        """The outcome as first answered, its voxels read from the session's mask (on its worker)."""
        update = self.outcome.update
        if math.prod(self.box) == 0:  # nothing changed
            return self.outcome
        box = tuple(slice(o, o + n) for o, n in zip(update.offset, self.box))
        voxels = np.array(es.result()[box], dtype=np.uint8)
        return self.outcome._replace(update=dataclasses.replace(update, voxels=voxels))


def default_engine_factory(
    model: Optional[Path], refine_depth: int = 1, edge_band: float = DEFAULT_EDGE_BAND
) -> EngineFactory:
    """Build the built-in engine on a device (imported lazily: torch loads on the worker).
    ``edge_band``: the band of its edge snap in voxels, 0 for none."""

    def build(device: str) -> Engine:
        from SegAssistLib.engine import builtin
        from SegAssistLib.engine.edges import EdgeSnap

        return builtin.load_default_engine(
            model, device=device, refine_depth=refine_depth, edge_snap=EdgeSnap.from_band(edge_band)
        )

    return build


class SessionGone(Exception):
    """A job found its session closed while it waited in the queue."""


class ServerState:
    def __init__(
        self,
        settings: ServerSettings,
        engine_factory: EngineFactory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        limits = settings.limits
        self.settings = settings
        self.limits = limits
        self.verifier = TokenVerifier(settings.token_hashes)
        self.images = ImageStore(settings.data_dir, limits.image_cache_bytes, limits.max_voxels, limits.max_axis)
        self.sessions = SessionStore(
            limits.idle_timeout_s, limits.max_sessions_per_user, limits.max_sessions_total, clock
        )
        self.sessions.on_expire = self._expired  # found idle by the sweep or by a request: closed
        self.pool = WorkerPool(settings.devices, engine_factory, limits.max_queued_jobs, limits.max_queued_per_session)
        # made by the app's lifespan on the server's event loop (the state is built before it runs)
        self.upload_slots: Optional[UploadSlots] = None  # uploads received and decoded at once (routes_images)
        self.prompt_checks: Optional[anyio.CapacityLimiter] = None  # threads checking added prompts (routes_sessions)
        self.json_parses: Optional[ParseSlots] = None  # large JSON bodies read and parsed at once (limits)
        self.clock = clock
        self.learning: Optional[LearningState] = None
        if settings.learn_store is not None:
            self.learning = LearningState(settings.learn_store, base_checkpoint(settings.model))
            for worker in self.pool.workers:
                worker.before_job = self.learning.sync_hook()

    async def submit(self, session: ServerSession, fn: Callable[[EngineSession], Any]) -> Tuple[Any, float]:
        """Run ``fn(engine_session)`` on the session's worker; returns its value and the queue wait.
        The session's model version is left alone: only a change of the mask (:meth:`mutate`,
        :meth:`open`) sets it, so reading the result under a version swapped in since does not credit
        that version."""

        def job(engine: Engine) -> Any:
            if session.closed:
                raise SessionGone()
            return fn(session.engine_session)  # type: ignore[arg-type]

        return await self._await_job(session, job)

    async def _await_job(self, session: ServerSession, job: Callable[[Engine], Any]) -> Tuple[Any, float]:
        session.pending += 1
        try:
            future = queue_job(session.worker, session.session_id, job)
            try:
                value = await await_job(future)
            except LIBRARY_ERRORS as exc:
                raise from_library_error(exc) from exc
            except SessionGone as exc:
                raise ApiError(
                    404, ErrorCode.SESSION_NOT_FOUND, f"session {session.session_id} was closed meanwhile"
                ) from exc
            return value, float(getattr(future, "queue_wait_s", 0.0))
        finally:
            session.pending -= 1
            session.last_used = self.clock()

    async def open(self, session: ServerSession, fn: Callable[[Engine], EngineSession]) -> None:
        def job(engine: Engine) -> None:
            if session.closed:  # the request went away while the job waited
                return
            es = fn(engine)
            session.engine_session = es
            session.model_version = es.model_version
            session.can_undo, session.can_redo = es.can_undo, es.can_redo

        await self._await_job(session, job)

    async def mutate(
        self, session: ServerSession, request_id: Optional[str], fn: Callable[[EngineSession], MaskUpdate]
    ) -> Tuple[Outcome, float]:
        """A state-changing operation, answered from the cache when it repeats the last request id.
        The session's model version becomes the one that made the mask now current (undo and redo
        bring back an earlier mask and its version; a model swapped in since runs for no undo)."""

        def op(es: EngineSession) -> Outcome:
            if request_id is not None and session.last_request and session.last_request[0] == request_id:
                return session.last_request[1].replayed(es)  # nothing changed the mask since (see KeptOutcome)
            update = fn(es)
            session.model_version = es.model_version
            session.can_undo, session.can_redo = es.can_undo, es.can_redo
            outcome = Outcome(update, es.can_undo, es.can_redo, session.n_prompts, session.model_version)
            session.last_request = (request_id, KeptOutcome.keep(outcome)) if request_id is not None else None
            return outcome

        return await self.submit(session, op)

    def close_in_background(self, session: ServerSession) -> None:
        """Release the engine session on its worker without waiting (after queued jobs)."""

        def job(engine: Engine) -> None:
            if session.engine_session is not None:
                session.engine_session.close()
                session.engine_session = None

        try:
            future = session.worker.submit(session.session_id, job, force=True)
        except WorkerStopped:
            return
        future.add_done_callback(_log_failure)

    def session_info(self, session: ServerSession) -> SessionInfo:
        state, position, length = session.worker.state(session.session_id)
        return SessionInfo(
            session_id=session.session_id,
            image_id=session.image_id,
            shape=session.shape,
            device=session.worker.device,
            n_prompts=session.n_prompts,
            can_undo=session.can_undo,
            can_redo=session.can_redo,
            state=state,  # type: ignore[arg-type]
            queue_position=position,
            queue_length=length,
            idle_timeout_s=self.limits.idle_timeout_s,
            expires_in_s=self.sessions.expires_in(session),
            model_version=session.model_version,
        )

    def expire_idle(self) -> int:
        return len(self.sessions.expire_idle())

    def _expired(self, session: ServerSession) -> None:
        log.info("session %s expired after %.0f s idle", session.session_id, self.limits.idle_timeout_s)
        self.close_in_background(session)


def queue_job(worker: InferenceWorker, key: str, job: Callable[[Engine], Any]) -> concurrent.futures.Future:
    """Queue a job on a worker behind ``key``'s earlier jobs; a full queue or a stopping worker is a 503."""
    try:
        return worker.submit(key, job)
    except QueueFull as exc:
        raise ApiError(
            503, ErrorCode.QUEUE_FULL, f"the inference queue is full ({exc}): retry shortly",
            headers={"Retry-After": "2"},
        ) from exc  # fmt: skip
    except WorkerStopped as exc:
        raise ApiError(503, ErrorCode.SHUTTING_DOWN, str(exc)) from exc


async def await_job(future: concurrent.futures.Future) -> Any:
    """The job's result; a job the worker dropped because the server is stopping is a 503."""
    try:
        return await asyncio.wrap_future(future)
    except WorkerStopped as exc:
        raise ApiError(503, ErrorCode.SHUTTING_DOWN, str(exc)) from exc


def _log_failure(future: concurrent.futures.Future) -> None:
    if future.cancelled() or isinstance(future.exception(), WorkerStopped):
        return  # shutting down: the process is about to release everything anyway
    if future.exception() is not None:
        log.error("closing a session failed: %r", future.exception())
