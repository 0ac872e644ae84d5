"""``/v1/sessions``: open a session on a held image, prompt it, undo, redo, reset, read, close."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any, Callable, List, Optional

import anyio
from fastapi import APIRouter, Depends, Path, Query, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from SegAssistLib.api_models import (
    SESSION_ID_PATTERN,
    AddPrompt,
    ArrayPayload,
    CreateSession,
    ErrorCode,
    MaskUpdateReply,
    ResultReply,
    SessionInfo,
    validate_prompt,
    validate_prompts,
)
from SegAssistLib.engine.base import EngineSession, MaskUpdate
from SegAssistLib.prompt_log import PromptLog
from SegAssistLib.prompts import Prompt
from SegAssistLib.server.deps import current_user, get_state, reply_codec, request_id
from SegAssistLib.server.errors import ApiError
from SegAssistLib.server.limits import check_prompt_inside, check_reply_codec
from SegAssistLib.server.responses import (
    ARRAY_REPLY_RESPONSES,
    ERROR_RESPONSES,
    PROMPT_LIMIT,
    SESSION_STATE,
    conflict,
    json_reply,
)
from SegAssistLib.server.sessions import ServerSession
from SegAssistLib.server.state import Outcome, ServerState

router = APIRouter(tags=["sessions"], responses=ERROR_RESPONSES)

SessionId = Path(pattern=SESSION_ID_PATTERN, description="32 lowercase hex digits, from POST /v1/sessions")
#: Threads that check added prompts at once. A slab's check is tens of ms of CPU, mostly under the
#: GIL: a flood of them on every pool thread starved the event loop of the GIL (health took 100 ms);
#: bounded, they queue here and every other request goes on.
PROMPT_CHECK_THREADS = 2
#: Engine seconds a job of a replayed log (``POST /v1/sessions`` with prompts) runs before it gives the
#: worker to the other sessions' jobs (at least one prompt per job).
REPLAY_SLICE_S = 0.05


def _check_prompt(state: ServerState, session_shape, prompt: Prompt) -> None:
    kinds = state.pool.capabilities.prompt_kinds
    if prompt.kind not in kinds:
        raise ApiError(
            422, ErrorCode.UNSUPPORTED_PROMPT,
            f"this model does not take {prompt.kind!r} prompts (it takes {', '.join(kinds)})",
        )  # fmt: skip
    check_prompt_inside(prompt, session_shape)


def _check_codec(state: ServerState, session: ServerSession, codec: str) -> None:
    """Refuse (406) a reply of this session's mask, whole or a box of it, that could be too large to
    send uncompressed: checked before the request changes anything, by the whole mask's size."""
    check_reply_codec(codec, math.prod(session.shape), state.limits.max_uncompressed_reply_bytes)


async def _reply(session: ServerSession, outcome: Outcome, queue_wait_s: float, codec: str) -> Response:
    update = outcome.update

    def build() -> Response:  # compression and serialisation run in the thread pool, off the worker and loop
        empty = update.voxels.size == 0
        reply = MaskUpdateReply(  # the session as the operation left it, not as it is now (see Outcome)
            session_id=session.session_id,
            offset=update.offset,
            shape=(0, 0, 0) if empty else tuple(int(n) for n in update.voxels.shape),
            mask=None if empty else ArrayPayload.from_array(update.voxels.astype("uint8", copy=False), codec),
            can_undo=outcome.can_undo,
            can_redo=outcome.can_redo,
            n_prompts=outcome.n_prompts,
            latency_s=float(update.latency_s),
            queue_wait_s=queue_wait_s,
            model_version=outcome.model_version,
            info=update.info,
        )
        return json_reply(reply)

    return await run_in_threadpool(build)


@router.post(
    "/sessions",
    response_model=SessionInfo,
    status_code=201,
    summary="Open a session on a held image",
    responses=conflict("prompt_limit: more prompts to replay than max_prompts_per_session"),
)
async def create_session(
    body: CreateSession,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
    req_id: Optional[str] = Depends(request_id),
) -> SessionInfo:
    # a retry while an earlier try still opens (a long replay): wait for it, then answer its session
    while (opening := state.sessions.opening(user, req_id)) is not None:
        await asyncio.shield(opening)
    earlier = state.sessions.created_by(user, req_id)
    if earlier is not None:  # a retry of a create whose reply was lost
        return state.session_info(earlier)
    state.sessions.begin_create(user, req_id)
    session = None
    try:
        session = await _open_session(body, state, user)
    finally:
        state.sessions.end_create(user, req_id, session)
    return state.session_info(session)


def _checked_prompts(raw: Any) -> List[Prompt]:
    """The prompts of a CreateSession body, validated (CPU work: run in the thread pool); a bad one
    answers as if the body had failed validation (422 invalid_prompt)."""
    return _checked(validate_prompts, raw, "prompts")


def _checked_prompt(raw: Any) -> Prompt:
    """The prompt of an AddPrompt body, validated as :func:`_checked_prompts` validates a replay."""
    return _checked(validate_prompt, raw, "prompt")


def _checked(validate: Callable[[Any], Any], raw: Any, field: str) -> Any:
    try:
        return validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", field, *e.get("loc", ()))} for e in exc.errors(include_url=False)]
        ) from None


async def _open_session(body: CreateSession, state: ServerState, user: str) -> ServerSession:
    limit = state.limits.max_prompts_per_session
    if isinstance(body.prompts, list) and len(body.prompts) > limit:  # counted before any is validated
        raise ApiError(
            409, ErrorCode.PROMPT_LIMIT, f"{len(body.prompts)} prompts to replay, above the limit of {limit}"
        )
    # the cheap checks first (the user's session limit, the image), so a create that would be refused
    # anyway does no prompt work; then the prompts, off the event loop (slabs decompress) and a few
    # at a time, on the threads that check added prompts
    state.sessions.reserve(user)
    try:
        volume = await run_in_threadpool(state.images.get, body.image_id)
        if volume is None:
            raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"no image {body.image_id} on this server: upload it first")
        assert state.prompt_checks is not None  # made by the app's lifespan, which runs before any request
        checked = await anyio.to_thread.run_sync(_checked_prompts, body.prompts, limiter=state.prompt_checks)
        if body.modality:
            volume = dataclasses.replace(volume, modality=body.modality)
        shape = tuple(int(n) for n in volume.array.shape)
        for prompt in checked:
            _check_prompt(state, shape, prompt)
        session = state.sessions.add(user, body.image_id, shape, state.pool.pick())  # type: ignore[arg-type]
    finally:
        state.sessions.release(user)
    try:
        await state.open(session, lambda engine: engine.open_session(volume))
        await _replay(state, session, list(checked))
    except BaseException:  # the create fails whole: the user gets no session, and its memory is freed
        state.sessions.remove(session.session_id)
        state.close_in_background(session)
        raise
    return session


async def _replay(state: ServerState, session: ServerSession, prompts: List[Prompt]) -> None:
    """Apply a create's prompts to its new (empty) engine session as the engine's own
    ``open_session(volume, prompts)`` does, one ``add_prompt`` (one undo step) each, but in jobs of
    about :data:`REPLAY_SLICE_S` of engine time on the session's queue: other sessions' jobs on the
    worker run between them (a replay of hundreds of prompts held every other user's click for
    minutes as one job). A prompt that fails fails the create (the caller removes the session)."""
    done = 0
    while done < len(prompts):

        def job(es: EngineSession, start: int = done) -> int:
            began, n = time.perf_counter(), start
            try:
                while n < len(prompts):
                    es.add_prompt(prompts[n])
                    n += 1
                    if time.perf_counter() - began >= REPLAY_SLICE_S:
                        break
            finally:
                session.n_prompts = n
                session.model_version = es.model_version
                session.can_undo, session.can_redo = es.can_undo, es.can_redo
            return n

        done, _ = await state.submit(session, job)


@router.get("/sessions/{session_id}", response_model=SessionInfo, summary="Session state and queue position")
async def get_session(
    session_id: str = SessionId,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> SessionInfo:
    return state.session_info(state.sessions.get(user, session_id))


async def _mutate(
    state: ServerState,
    user: str,
    session_id: str,
    req_id: Optional[str],
    codec: str,
    fn: Callable[[EngineSession], MaskUpdate],
) -> Response:
    session = state.sessions.get(user, session_id)
    _check_codec(state, session, codec)
    outcome, wait = await state.mutate(session, req_id, fn)
    return await _reply(session, outcome, wait, codec)


@router.post(
    "/sessions/{session_id}/prompts",
    response_model=MaskUpdateReply,
    responses={**ARRAY_REPLY_RESPONSES, **conflict(PROMPT_LIMIT)},
    summary="Add a prompt; the reply holds only the changed box of the mask",
)
async def add_prompt(
    body: AddPrompt,
    session_id: str = SessionId,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
    codec: str = Depends(reply_codec),
    req_id: Optional[str] = Depends(request_id),
) -> Response:
    assert state.prompt_checks is not None  # made by the app's lifespan, which runs before any request
    session = state.sessions.get(user, session_id)  # first: an unknown session costs no prompt work
    _check_codec(state, session, codec)
    # off the event loop (a slab decompresses), a few at a time
    prompt = await anyio.to_thread.run_sync(_checked_prompt, body.prompt, limiter=state.prompt_checks)
    _check_prompt(state, session.shape, prompt)
    limit = state.limits.max_prompts_per_session

    def add(es: EngineSession) -> MaskUpdate:
        if session.n_prompts >= limit:
            raise ApiError(
                409, ErrorCode.PROMPT_LIMIT,
                f"this session has had {limit} prompts (the limit): accept the result and open a new session",
            )  # fmt: skip
        update = es.add_prompt(prompt)
        session.n_prompts += 1
        return update

    return await _mutate(state, user, session_id, req_id, codec, add)


def _simple_op(name: str, summary: str, conflicts: Optional[str] = None) -> None:
    async def endpoint(
        session_id: str = SessionId,
        state: ServerState = Depends(get_state),
        user: str = Depends(current_user),
        codec: str = Depends(reply_codec),
        req_id: Optional[str] = Depends(request_id),
    ) -> Response:
        return await _mutate(state, user, session_id, req_id, codec, lambda es: getattr(es, name)())

    endpoint.__name__ = name
    router.add_api_route(
        f"/sessions/{{session_id}}/{name}",
        endpoint,
        methods=["POST"],
        response_model=MaskUpdateReply,
        responses={**ARRAY_REPLY_RESPONSES, **(conflict(conflicts) if conflicts else {})},
        summary=summary,
    )


_simple_op("undo", "Undo the last prompt (409 when there is nothing to undo)", SESSION_STATE)
_simple_op("redo", "Redo the last undone prompt (409 when there is nothing to redo)", SESSION_STATE)
_simple_op("reset", "Clear the mask and forget the prompts (itself undoable)")


@router.get(
    "/sessions/{session_id}/result",
    response_model=ResultReply,
    responses=ARRAY_REPLY_RESPONSES,
    summary="The full current mask",
)
async def get_result(
    session_id: str = SessionId,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
    codec: str = Depends(reply_codec),
) -> Response:
    session = state.sessions.get(user, session_id)
    _check_codec(state, session, codec)
    # the prompt count read with the mask: a prompt queued behind this may run before the reply is built
    (mask, n_prompts), _ = await state.submit(session, lambda es: (es.result().copy(), session.n_prompts))

    def build() -> Response:  # a whole mask: compressed and serialised off the event loop
        payload = ArrayPayload.from_array(mask.astype("uint8", copy=False), codec)
        return json_reply(ResultReply(session_id=session_id, mask=payload, n_prompts=n_prompts))

    return await run_in_threadpool(build)


@router.get(
    "/sessions/{session_id}/prompt-log",
    response_model=PromptLog,
    summary="The replayable prompts that produced the current mask",
)
async def get_prompt_log(
    session_id: str = SessionId,
    engine: bool = Query(
        False,
        description="include the engine settings the session answered with (prompt log schema 1.4); "
        "without it they are left out, so that a client reading schema 1.3 logs reads the log",
    ),
    image: bool = Query(
        False,
        description="include the image the session works on (grid and voxel digest, schema 1.3; the digest "
        "takes about 0.15 s for a CT the first time): the log then says which image its voxel coordinates "
        "belong to; without it the log has no image, as before",
    ),
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> PromptLog:
    session = state.sessions.get(user, session_id)
    (log, info), _ = await state.submit(session, lambda es: (es.prompt_log(), es.image_info() if image else None))
    return log.model_copy(update={"engine": log.engine if engine else None, "image": info})


@router.delete("/sessions/{session_id}", status_code=204, summary="Close a session and free its memory")
async def close_session(
    session_id: str = SessionId,
    state: ServerState = Depends(get_state),
    user: str = Depends(current_user),
) -> Response:
    session = state.sessions.get(user, session_id)
    state.sessions.remove(session.session_id)
    state.close_in_background(session)
    return Response(status_code=204)
