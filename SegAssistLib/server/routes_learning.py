"""``/v1/learn``: cases, label versions, training jobs, adapter versions and the next case.

Blocking datastore work runs in the thread pool; anything that needs the model (the proposal of
the next case) runs as a job on an inference worker, like a prompt; training runs in its own
process (``SegAssistLib.learning.jobs``), never in the server.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, List, Literal, Optional, Sequence, Tuple, TypeVar

import anyio.from_thread
import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from SegAssistLib.api_learning import (
    CASE_ID_PATTERN,
    JOB_ID_PATTERN,
    CaseInfo,
    CaseStatusName,
    CurrentVersion,
    ImportCase,
    JobStatus,
    LabelInfo,
    LearningStatus,
    LockRequest,
    NextCaseReply,
    NextCaseRequest,
    ProposalReply,
    ReviewInfo,
    ReviewRequest,
    RollbackRequest,
    SaveLabel,
    TrainRequest,
    VersionList,
)
from SegAssistLib.api_models import FRAME_MEDIA_TYPE, ArrayPayload, ErrorCode
from SegAssistLib.image import Volume
from SegAssistLib.learning.errors import AdapterError, CorruptDataError, StoreAccessError
from SegAssistLib.learning.records import CaseRecord, iso_time
from SegAssistLib.learning.registry import BASE, VersionRecord, adapter_id_of
from SegAssistLib.server.deps import current_user, get_state, reply_codec, request_id
from SegAssistLib.server.errors import LIBRARY_ERRORS, ApiError, from_library_error
from SegAssistLib.server.learning import LEARNING_ERRORS, LearningState, api_error_for, learning_or_404
from SegAssistLib.server.limits import check_reply_codec
from SegAssistLib.server.responses import (
    ARRAY_REPLY_RESPONSES,
    ERROR_RESPONSES,
    LEARNING_CONFLICTS,
    conflict,
    json_reply,
)
from SegAssistLib.server.state import ServerState, queue_job
from SegAssistLib.server.worker import InferenceWorker, WorkerStopped
from SegAssistLib.transport import encode_frame

router = APIRouter(prefix="/learn", tags=["learning"], responses={**ERROR_RESPONSES, **conflict(LEARNING_CONFLICTS)})

CaseId = Path(pattern=CASE_ID_PATTERN, description="16 lowercase hex digits")
JobId = Path(pattern=JOB_ID_PATTERN, description="as returned by POST /v1/learn/train")
UnknownAs = Literal["0", "null"]
Unknown = Query(
    "0",
    description="how a label version's n_interactions and seconds_spent are sent when they are unknown (a mask "
    "saved without a count, a time not measured): null (ask for it), or 0 (the default, for a client from before "
    "unknown counts, which requires a number; it reads such a label as made in 0 prompts and 0 seconds)",
)
T = TypeVar("T")


async def _call(fn: Callable[[], T]) -> T:
    """Run blocking learning-library code in the thread pool, mapping its errors to the error shape."""
    try:
        return await run_in_threadpool(fn)
    except StoreAccessError as exc:  # the store's database, not the request: its path stays out of the reply
        if isinstance(exc, CorruptDataError):
            raise ApiError(500, ErrorCode.CORRUPT_DATA, exc.public) from exc
        raise ApiError(503, ErrorCode.STORAGE_UNAVAILABLE, exc.public, headers={"Retry-After": "2"}) from exc
    except LEARNING_ERRORS as exc:
        raise api_error_for(exc) from exc
    except LIBRARY_ERRORS as exc:
        raise from_library_error(exc) from exc


def _learning(state: ServerState = Depends(get_state)) -> LearningState:
    return learning_or_404(state)


def _case(learning: LearningState, record: CaseRecord) -> CaseInfo:
    """The case's reply with its subject (reads the store: call it in the thread pool, ``_call``)."""
    return _cases(learning, [record])[0]


def _cases(learning: LearningState, records: Sequence[CaseRecord]) -> List[CaseInfo]:
    subjects = learning.store.subjects(r.id for r in records)
    return [CaseInfo(**r.to_dict(), subject=subjects[r.id]) for r in records]


def _label_reply(label: LabelInfo, unknown: UnknownAs) -> LabelInfo:
    """A label version's reply: an unknown count or time as null only to a client that asks
    (``?unknown=null``); to any other, 0, as before unknown counts (its ``LabelInfo`` requires a number:
    a null would fail it after the save, and a save again would make a second version)."""
    if unknown == "null":
        return label
    return label.model_copy(
        update={"n_interactions": label.n_interactions or 0, "seconds_spent": label.seconds_spent or 0.0}
    )


def _hold_case_image(state: ServerState, learning: LearningState, case_id: str) -> Tuple[str, Volume]:
    """Put the case's image into the server's image store; returns its image id (content hash)."""
    image_id, volume = learning.case_image(case_id)
    if not state.images.has(image_id):
        state.images.put(image_id, volume, None)
    return image_id, volume


# ---------------------------------------------------------------------------------------- status


@router.get("/status", response_model=LearningStatus, summary="Cases by status, current version, last job")
async def status(
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> LearningStatus:
    from SegAssistLib.learning.jobs import list_jobs

    await learning.settle_version(state.pool.workers)

    def read() -> LearningStatus:
        current = learning.registry.current()
        jobs = list_jobs(learning.store_root)
        return LearningStatus(
            cases=learning.store.count_by_status(),
            current_version=current.to_dict() if current is not None else None,
            last_job=jobs[0] if jobs else None,
            engine_version=state.pool.capabilities.version,
            version_error=learning.version_error(),
        )

    return await _call(read)


# ---------------------------------------------------------------------------------------- cases


@router.post("/cases", response_model=CaseInfo, status_code=201, summary="Import a held image as a new case")
async def import_case(
    body: ImportCase,
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> CaseInfo:
    volume = await run_in_threadpool(state.images.get, body.image_id)
    if volume is None:
        raise ApiError(404, ErrorCode.IMAGE_NOT_FOUND, f"no image {body.image_id} on this server: upload it first")
    return await _call(lambda: _case(learning, learning.store.import_volume(
        volume, name=body.name, user=user, source="upload", subject=body.subject)))  # fmt: skip


@router.get("/cases", response_model=List[CaseInfo], summary="Cases in import order, optionally by status")
async def list_cases(
    status: Optional[List[CaseStatusName]] = Query(None, description="repeat to give several"),
    limit: int = Query(500, ge=1, le=10_000),
    offset: int = Query(0, ge=0, le=2**63 - 1),  # SQLite's integers
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> List[CaseInfo]:
    return await _call(lambda: _cases(learning, learning.store.list_cases(status=status, limit=limit, offset=offset)))


@router.get("/cases/{case_id}", response_model=CaseInfo, summary="One case")
async def get_case(
    case_id: str = CaseId, learning: LearningState = Depends(_learning), user: str = Depends(current_user)
) -> CaseInfo:
    return await _call(lambda: _case(learning, learning.store.get_case(case_id)))


@router.get(
    "/cases/{case_id}/image",
    summary="The case's image as an upload frame; the server holds it for sessions",
    response_class=Response,
    responses={
        200: {"content": {FRAME_MEDIA_TYPE: {}}, "description": "the frame (see docs/api.md)"},
        **ARRAY_REPLY_RESPONSES,
    },
)
async def case_image(
    case_id: str = CaseId,
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
    codec: str = Depends(reply_codec),
) -> Response:
    """The same frame format as ``POST /v1/images``; its header's ``sha256`` is the image id to open
    a session on (``POST /v1/sessions``)."""

    def frame() -> bytes:  # in the thread pool: the frame is the whole image
        image_id, volume = _hold_case_image(state, learning, case_id)
        check_reply_codec(codec, volume.array.nbytes, state.limits.max_uncompressed_reply_bytes)
        header = {
            "spacing": list(volume.spacing), "origin": list(volume.origin),
            "direction": [float(x) for x in np.asarray(volume.direction).ravel()],
            "modality": volume.modality, "sha256": image_id, "case_id": case_id,
        }  # fmt: skip
        return encode_frame(volume.array, header, codec=codec)

    return Response(content=await _call(frame), media_type=FRAME_MEDIA_TYPE)


@router.post("/cases/{case_id}/lock", response_model=CaseInfo, summary="Lock the case to the caller")
async def lock_case(
    body: Optional[LockRequest] = None,
    case_id: str = CaseId,
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> CaseInfo:
    ttl = (body or LockRequest()).ttl_s
    return await _call(lambda: _case(learning, learning.store.lock(case_id, user, ttl_s=ttl)))


@router.delete("/cases/{case_id}/lock", response_model=CaseInfo, summary="Release the caller's lock")
async def unlock_case(
    case_id: str = CaseId, learning: LearningState = Depends(_learning), user: str = Depends(current_user)
) -> CaseInfo:
    return await _call(lambda: _case(learning, learning.store.unlock(case_id, user)))


@router.get("/cases/{case_id}/labels", response_model=List[LabelInfo], summary="The case's label versions")
async def list_labels(
    case_id: str = CaseId,
    unknown: UnknownAs = Unknown,
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> List[LabelInfo]:
    versions = await _call(lambda: learning.store.label_versions(case_id))
    return [_label_reply(LabelInfo(**v.to_dict()), unknown) for v in versions]


@router.post("/cases/{case_id}/labels", response_model=LabelInfo, status_code=201, summary="Save a label version")
async def save_label(
    body: SaveLabel,
    case_id: str = CaseId,
    unknown: UnknownAs = Unknown,
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
    req_id: Optional[str] = Depends(request_id),
) -> LabelInfo:
    """From a session of the caller (its mask, prompt log and model version are the provenance; its
    count of prompts, undone and reset ones included, the ``n_interactions`` unless the body gives one)
    or from a mask; ``submit`` makes the case ``submitted``, otherwise the version is a draft. A repeat
    under the same request id gets the first answer (one version saved)."""
    saved = await learning.once.run(
        user, f"label:{case_id}", req_id, lambda: _save_label(body, case_id, state, learning, user)
    )
    return _label_reply(saved, unknown)


async def _save_label(
    body: SaveLabel, case_id: str, state: ServerState, learning: LearningState, user: str
) -> LabelInfo:
    if (body.session_id is None) == (body.mask is None):
        raise ApiError(422, ErrorCode.INVALID_REQUEST, "give exactly one of session_id and mask")
    case = await _call(lambda: learning.store.get_case(case_id))
    prompt_log, model = None, None  # a mask drawn elsewhere: no model to credit
    n_interactions = body.n_interactions  # for a mask: given, or unknown
    if body.session_id is not None:
        session = state.sessions.get(user, body.session_id)
        if tuple(session.shape) != tuple(case.shape):
            raise ApiError(
                422, ErrorCode.INVALID_SHAPE,
                f"session {body.session_id} is on an image of shape {list(session.shape)}, not the case's "
                f"{list(case.shape)}: open the session on the case's image (GET /v1/learn/cases/{case_id}/image)",
            )  # fmt: skip
        if not await _call(lambda: learning.is_case_image(case_id, session.image_id)):
            raise ApiError(
                422, ErrorCode.IMAGE_MISMATCH,
                f"session {body.session_id} is on image {session.image_id[:12]}..., not on case {case_id}'s image "
                f"(same shape, other voxels or geometry): its mask is not a label of this case; open the session "
                f"on the case's image (GET /v1/learn/cases/{case_id}/image)",
            )  # fmt: skip
        # the version and the count of prompts are read in the same job as the mask: a prompt queued behind
        # this save may change them; the stored log names its image (grid and voxel digest), as a log written
        # by segassist segment does
        (mask, prompt_log, model, n_prompts), _ = await state.submit(
            session,
            lambda es: (es.result().copy(), es.prompt_log().model_copy(update={"image": es.image_info()}),
                        session.model_version, session.n_prompts),  # fmt: skip
        )
        if n_interactions is None:  # the effort: every prompt the session took, undone and reset ones too
            n_interactions = n_prompts
    else:
        mask = await _call(lambda: _label_mask(body.mask, case.shape))  # type: ignore[arg-type]
    adapter = adapter_id_of(model)

    def save():
        return learning.store.save_label(
            case_id, mask, user=user, prompt_log=prompt_log, model=model, adapter_version=adapter,
            n_interactions=n_interactions, seconds_spent=body.seconds_spent, submit=body.submit,
        )  # fmt: skip

    return LabelInfo(**(await _call(save)).to_dict())


@router.post("/cases/{case_id}/review", response_model=ReviewInfo, status_code=201,
             summary="Accept or reject the case's latest submitted label")
async def review_case(
    body: ReviewRequest,
    case_id: str = CaseId,
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
    req_id: Optional[str] = Depends(request_id),
) -> ReviewInfo:
    """The caller reviews the latest submitted label version: accepted, the case becomes ``reviewed``;
    rejected, it goes back to ``in_progress`` (out of the training set until submitted again; ``/next`` hands
    it out again). Refused
    (409 ``case_state``) for a case not submitted, one another user holds the lock of, or when
    ``label_id`` is no longer the latest submitted version. A repeat under the same request id gets
    the first answer (one review recorded)."""

    def review() -> ReviewInfo:
        done = learning.store.review(case_id, user, body.accepted, note=body.note, label_id=body.label_id)
        return ReviewInfo(
            **done.to_dict(), created_at_iso=iso_time(done.created_at),
            case=_case(learning, learning.store.get_case(case_id)),
        )  # fmt: skip

    return await learning.once.run(user, f"review:{case_id}", req_id, lambda: _call(review))


# ---------------------------------------------------------------------------------------- training


@router.post("/train", response_model=JobStatus, status_code=202, summary="Start a training job (409 if busy)")
async def train(
    body: TrainRequest, learning: LearningState = Depends(_learning), user: str = Depends(current_user)
) -> JobStatus:
    from SegAssistLib.learning.jobs import start_training

    job = await _call(lambda: start_training(learning.store_root, learning.checkpoint, body.settings()))
    return JobStatus(**job.status())


@router.get("/jobs", response_model=List[JobStatus], summary="Training jobs, newest first")
async def list_jobs(learning: LearningState = Depends(_learning), user: str = Depends(current_user)) -> List[JobStatus]:
    from SegAssistLib.learning.jobs import list_jobs as jobs_of

    return [JobStatus(**j) for j in await _call(lambda: jobs_of(learning.store_root))]


@router.get("/jobs/{job_id}", response_model=JobStatus, summary="A training job's progress")
async def get_job(
    job_id: str = JobId, learning: LearningState = Depends(_learning), user: str = Depends(current_user)
) -> JobStatus:
    from SegAssistLib.learning.jobs import get_job as job_of

    return JobStatus(**await _call(lambda: job_of(learning.store_root, job_id).status()))


@router.post("/jobs/{job_id}/cancel", response_model=JobStatus, summary="Ask a training job to stop")
async def cancel_job(
    job_id: str = JobId, learning: LearningState = Depends(_learning), user: str = Depends(current_user)
) -> JobStatus:
    from SegAssistLib.learning.jobs import cancel_job as cancel

    return JobStatus(**await _call(lambda: cancel(learning.store_root, job_id)))


# ---------------------------------------------------------------------------------------- versions


@router.get("/versions", response_model=VersionList, summary="The adapter version history")
async def versions(learning: LearningState = Depends(_learning), user: str = Depends(current_user)) -> VersionList:
    reg = await _call(learning.registry.read)
    return VersionList(current=reg.current, versions=[r.to_dict() for r in reg.versions], events=reg.events)


@router.post("/rollback", response_model=CurrentVersion, summary="Make an earlier version (or the base) current")
async def rollback(
    body: RollbackRequest,
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
) -> CurrentVersion:
    """The target version is loaded on an inference worker before the registry changes: one this server
    cannot load (a damaged file, weights that do not fit) is refused, 409 ``version_state``, nothing changed
    (made current, the workers would go on answering with the version it was meant to replace)."""
    worker = state.pool.pick()

    def loads(record: VersionRecord) -> None:  # in the thread pool, under the registry's lock
        _version_loads(worker, learning, record)

    done = await _call(
        lambda: learning.registry.rollback_detailed(
            body.to,
            user=user,
            base_identity=None if body.to == BASE else learning.base_identity(),
            expected_current=body.expected_current,
            check=loads,
        )
    )
    return CurrentVersion(current=done.record.id if done.record is not None else None, previous=done.previous)


def _version_loads(worker: InferenceWorker, learning: LearningState, record: VersionRecord) -> None:
    """Load ``record`` on ``worker`` as a swap would (``deploy.check_version``), and drop it; a version it
    cannot load is a 409 ``version_state`` naming why (the store's files named from the store)."""
    from SegAssistLib.learning.jobs import public_text

    def job(engine: Any) -> None:
        from SegAssistLib.learning.deploy import check_version  # torch: the worker has it loaded already

        check_version(engine, learning.registry, record)

    try:
        _wait_on_worker(worker, "learn:rollback", job)
    except AdapterError as exc:
        reason = public_text(str(exc), learning.store_root, learning.checkpoint)
        raise ApiError(
            409, ErrorCode.VERSION_STATE,
            f"version {record.id} cannot be loaded by this server ({reason}): nothing was rolled back",
        ) from exc  # fmt: skip


def _wait_on_worker(worker: InferenceWorker, key: str, job: Callable[[Any], T]) -> T:
    """Run ``job(engine)`` on ``worker`` behind ``key``'s earlier jobs and wait for it (from the thread
    pool); a full queue or a stopping worker is a 503."""
    try:
        return queue_job(worker, key, job).result()
    except WorkerStopped as exc:
        raise ApiError(503, ErrorCode.SHUTTING_DOWN, str(exc)) from exc


# ---------------------------------------------------------------------------------------- next case


def _proposal_reply(proposal: Any, codec: str, max_uncompressed: int) -> ProposalReply:
    mask = np.asarray(proposal.mask, np.uint8)
    nz = np.argwhere(mask)
    if len(nz):
        lo, hi = nz.min(0), nz.max(0) + 1
        box = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
        check_reply_codec(codec, box.nbytes, max_uncompressed)
        payload: Optional[ArrayPayload] = ArrayPayload.from_array(np.ascontiguousarray(box), codec)
    else:
        lo, box, payload = np.zeros(3, int), np.zeros((0, 0, 0), np.uint8), None
    d = proposal.to_dict()
    return ProposalReply(
        offset=tuple(int(x) for x in lo), shape=tuple(int(x) for x in box.shape), mask=payload,
        agreement=d["agreement"], uncertainty=d["uncertainty"], members=d["members"],
        engine_version=d["engine_version"], prompts=d["prompts"],
    )  # fmt: skip


def _label_mask(payload: ArrayPayload, case_shape: Sequence[int]) -> np.ndarray:
    """A label sent as a mask: its declared shape and dtype are checked before it is decompressed (a
    few kilobytes may declare gigabytes; only the case's own voxel count, as uint8, is ever made)."""
    if list(payload.shape) != [int(n) for n in case_shape]:
        raise ApiError(
            422, ErrorCode.INVALID_SHAPE,
            f"the mask's shape {list(payload.shape)} is not the case's {list(case_shape)} (array order k, j, i)",
        )  # fmt: skip
    if payload.dtype not in ("|u1", "uint8"):
        raise ApiError(422, ErrorCode.UNSUPPORTED_DTYPE, f"a label mask is uint8 ('|u1'), got dtype {payload.dtype!r}")
    return payload.to_array(max_voxels=int(np.prod(case_shape)))


@router.post(
    "/next",
    response_model=NextCaseReply,
    responses=ARRAY_REPLY_RESPONSES,
    summary="The case to annotate next, with the model's proposal",
)
async def next_case(
    request: Request,
    body: NextCaseRequest,
    state: ServerState = Depends(get_state),
    learning: LearningState = Depends(_learning),
    user: str = Depends(current_user),
    codec: str = Depends(reply_codec),
    req_id: Optional[str] = Depends(request_id),
) -> Response:
    """Scoring by uncertainty and the proposal run the model: one job per case on an inference worker,
    queued fairly with the prompts of open sessions (which are answered between them). A repeat under
    the same request id gets the first answer (one case locked).

    With ``lock``, a case the caller holds locked and has not labelled yet (an answer that never
    reached them, a lock by hand) is handed back first (``resumed``), its lock renewed, nothing ranked:
    a caller who gave up waiting does not leave a case locked for hours while it gets another. A
    request that fails after that unlocks a case it locked, but leaves that lock as the caller held it. A
    request without a request id whose caller went away while it ranked locks nothing (with an id,
    its resend gets the first answer)."""
    still_there = _caller_still_there(request) if req_id is None else None
    return await learning.once.run(
        user, "next", req_id, lambda: _next_case(body, state, learning, user, codec, still_there)
    )


def _caller_still_there(request: Request) -> Callable[[CaseRecord], None]:
    """A check, for the thread pool, that the caller has not gone away (a read timeout, the app closed):
    a case locked for a caller who never learns which it was stays locked to them for hours."""

    def check(case: CaseRecord) -> None:
        if anyio.from_thread.run(request.is_disconnected):
            raise ApiError(499, ErrorCode.CLIENT_GONE, "the client went away before a case was locked: none was")

    return check


async def _next_case(
    body: NextCaseRequest,
    state: ServerState,
    learning: LearningState,
    user: str,
    codec: str,
    before_lock: Optional[Callable[[CaseRecord], None]] = None,
) -> Response:
    from SegAssistLib.learning import active

    needs_model = body.proposal or body.strategy in active.NEEDS_ENGINE
    worker = state.pool.pick() if needs_model else None

    def on_worker(job: Callable[[Any], T]) -> T:  # called from the thread pool: waits for the job
        return _wait_on_worker(worker, f"learn:{user}", job)  # type: ignore[arg-type]

    # AsyncExitStack, not nullcontext: that one takes ``async with`` only from Python 3.10
    async with learning.ranking_slots() if needs_model else contextlib.AsyncExitStack():
        chosen = await _call(
            lambda: active.next_case(
                learning.store, None, body.strategy, seed=body.seed, user=user, lock=body.lock,
                lock_ttl_s=body.lock_ttl_s, with_proposal=body.proposal, diversity_weight=body.diversity_weight,
                max_candidates=body.max_candidates, runner=on_worker if needs_model else None,
                prepare=lambda case: _hold_case_image(state, learning, case.id)[0],  # a damaged image: skipped
                resume=True, before_lock=before_lock,
            )
        )  # fmt: skip
    image_id = chosen.prepared

    def build() -> Response:  # the proposal may be a whole mask: compressed and serialised off the event loop
        limit = state.limits.max_uncompressed_reply_bytes
        return json_reply(NextCaseReply(
            case=_case(learning, chosen.case), image_id=image_id, strategy=body.strategy, score=chosen.score.to_dict(),
            proposal=_proposal_reply(chosen.proposal, codec, limit) if chosen.proposal is not None else None,
            resumed=chosen.resumed,
        ))  # fmt: skip

    try:
        return await run_in_threadpool(build)
    except BaseException:
        if body.lock:  # the caller never learns which case it was: not locked to them for hours, unless it
            with contextlib.suppress(Exception):  # is their own case handed back, whose lock they keep
                await run_in_threadpool(lambda: active.release_next_case(learning.store, chosen, user))
        raise
