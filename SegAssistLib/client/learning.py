"""The learning loop over HTTP: cases, labels, training jobs, versions, next case. Torch-free.

Reached as ``SegAssistClient(...).learning``. A typical annotator's round::

    learning = client.learning
    nxt = learning.next_case()                        # locked to me, with the model's proposal
    volume = learning.case_volume(nxt.case.id)        # to show it
    with client.open_session(nxt.image_id, nxt.initial_prompts()) as session:
        ...                                           # correct with clicks, scribbles, ...
        learning.submit(nxt.case.id, session, seconds_spent=95)
    job = learning.train(kind="salt", time_budget_s=600)
    learning.wait_for_job(job.job_id, progress=print)  # the server swaps in a promoted version
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, TypeVar, Union

import numpy as np

from SegAssistLib.api_learning import (
    DEFAULT_LOCK_TTL_S,
    CaseInfo,
    CurrentVersion,
    JobStatus,
    LabelInfo,
    LearningStatus,
    NextCaseReply,
    ReviewInfo,
    VersionList,
)
from SegAssistLib.api_models import API_PREFIX, ArrayPayload, box_voxels, check_box
from SegAssistLib.client.errors import (
    BackendTimeoutError,
    ClientError,
    JobWaitTimeoutError,
    ServerBusyError,
)
from SegAssistLib.client.http import Timeout, _reply_lost, list_of, parsed_reply, path_id
from SegAssistLib.image import Volume
from SegAssistLib.labels import as_labels
from SegAssistLib.prompts import MaskPrompt
from SegAssistLib.transport import available_codecs, decode_frame

if TYPE_CHECKING:
    from SegAssistLib.client.remote import SegAssistClient
    from SegAssistLib.client.session import RemoteSession

FINAL_JOB_STATES = ("done", "cancelled", "failed")
_MIN_POLL_S = 0.05  # the shortest timeout a poll is sent with (the last one, at the deadline)
MIN_POLL_INTERVAL_S = 0.05  # wait_for_job polls no more often than this, whatever poll_s says
_BASE = f"{API_PREFIX}/learn"
T = TypeVar("T")


def _case_path(case_id: str) -> str:
    """The case's URL path: the id escaped, or refused before anything is sent (:func:`path_id`)."""
    return f"{_BASE}/cases/{path_id(case_id, 'case id')}"


def _job_path(job_id: str) -> str:
    return f"{_BASE}/jobs/{path_id(job_id, 'job id')}"


# label replies with an unknown count or time as null (a server sends 0 to a client that does not ask: one
# from before unknown counts requires a number); a server from before them ignores it and sends its numbers
_UNKNOWN_AS_NULL = {"unknown": "null"}


def _seconds(seconds_spent: Optional[float]) -> dict:
    """The body's ``seconds_spent``: left out when not measured (the server records it as unknown; a
    server before that defaults it to 0 and would refuse a null)."""
    return {} if seconds_spent is None else {"seconds_spent": float(seconds_spent)}


@dataclass
class NextCase:
    """The chosen case, the image id to open a session on, and the proposal as a full mask."""

    reply: NextCaseReply
    proposal: Optional[np.ndarray]  # uint8 [k, j, i] of the case's shape; None without a proposal

    @property
    def case(self) -> CaseInfo:
        return self.reply.case

    @property
    def image_id(self) -> str:
        return self.reply.image_id

    @property
    def resumed(self) -> bool:
        """Whether this is the caller's own case handed back (locked to them before, no label version yet),
        not a new one (False from a server before resuming)."""
        return self.reply.resumed

    def proposal_prompt(self) -> Optional[MaskPrompt]:
        """The proposal as an initial-mask prompt (the first prompt of the correcting session), naming the
        model version that proposed it: a label saved from it uncorrected credits that version."""
        if self.proposal is None or not self.proposal.any():
            return None
        maker = self.reply.proposal.engine_version if self.reply.proposal is not None else None
        return MaskPrompt.from_array(self.proposal, made_by=maker or None)

    def initial_prompts(self) -> List[MaskPrompt]:
        """What to open the correcting session with: the proposal, when there is one."""
        prompt = self.proposal_prompt()
        return [prompt] if prompt is not None else []


class LearningClient:
    def __init__(self, client: SegAssistClient) -> None:
        self._client = client
        self._http = client.http

    # ---- status and cases --------------------------------------------------------------------------
    def status(self) -> LearningStatus:
        return self._http.reply("GET", f"{_BASE}/status", LearningStatus.model_validate)

    def import_image(
        self,
        volume: Union[Volume, np.ndarray],
        name: str,
        progress: Optional[Callable[[int, int], None]] = None,
        subject: Optional[str] = None,
    ) -> CaseInfo:
        """Add an image as a new case (uploaded only if the server does not hold it yet). ``subject``:
        the patient it shows; training keeps a subject's cases on one side of its split (None: its own)."""
        image_id = self._client.ensure_image(volume, progress)
        body = {"image_id": image_id, "name": name}
        if subject is not None:  # sent only when given: a server from before subjects still takes the rest
            body["subject"] = subject
        return self._http.reply("POST", f"{_BASE}/cases", CaseInfo.model_validate, json=body, safe=False)

    def cases(
        self, status: Union[None, str, Sequence[str]] = None, limit: int = 500, offset: int = 0
    ) -> List[CaseInfo]:
        """The cases, of the given status or statuses (a name such as ``"new"`` or a :class:`CaseStatus`)."""
        statuses = [status] if isinstance(status, str) else list(status or [])
        params = {"limit": int(limit), "offset": int(offset), "status": [_wire_text(s) for s in statuses]}
        return self._http.reply("GET", f"{_BASE}/cases", list_of(CaseInfo), params=params)

    def case(self, case_id: str) -> CaseInfo:
        return self._http.reply("GET", _case_path(case_id), CaseInfo.model_validate)

    def case_volume(self, case_id: str) -> Volume:
        """The case's image (to display it); the server then holds it for sessions too."""
        path = f"{_case_path(case_id)}/image"
        response = self._http.request("GET", path)

        def volume(frame: bytes) -> Volume:
            header, array = decode_frame(frame)
            return Volume(
                array,
                spacing=tuple(header["spacing"]),
                origin=tuple(header["origin"]),
                direction=np.asarray(header["direction"], float).reshape(3, 3),
                modality=header.get("modality"),
            )

        return parsed_reply(f"GET {path}", volume, response.content)

    def lock(self, case_id: str, ttl_s: float = DEFAULT_LOCK_TTL_S) -> CaseInfo:
        return self._http.reply("POST", f"{_case_path(case_id)}/lock", CaseInfo.model_validate, json={"ttl_s": ttl_s})

    def unlock(self, case_id: str) -> CaseInfo:
        return self._http.reply("DELETE", f"{_case_path(case_id)}/lock", CaseInfo.model_validate)

    def labels(self, case_id: str) -> List[LabelInfo]:
        return self._http.reply("GET", f"{_case_path(case_id)}/labels", list_of(LabelInfo), params=_UNKNOWN_AS_NULL)

    # ---- labels ----------------------------------------------------------------------------------
    def submit(
        self,
        case_id: str,
        session: Union[RemoteSession, str],
        seconds_spent: Optional[float] = None,
        submit: bool = True,
        n_interactions: Optional[int] = None,
    ) -> LabelInfo:
        """Save the session's current mask as a label version, with its prompt log and the model
        version that answered as provenance (``submit=False``: a draft, the case stays in progress).
        ``n_interactions`` None: the session's count of prompts (its ``n_prompts``: undone and reset ones
        included, and those it was opened with); ``seconds_spent`` None: not measured (the label version
        says null, unknown)."""
        session_id = session if isinstance(session, str) else session.session_id
        body = {"session_id": session_id, "submit": submit, "n_interactions": n_interactions}
        body.update(_seconds(seconds_spent))
        return self._post_once(f"{_case_path(case_id)}/labels", body, LabelInfo.model_validate, _UNKNOWN_AS_NULL)

    def _post_once(self, path: str, body: dict, parse: Callable[[Any], T], params: Optional[dict] = None) -> T:
        """A POST that must take effect once (a label version, a lock): see ``HttpClient.request``'s
        ``once``; the server answers a repeat with the first's result, read by ``parse``."""
        return self._http.reply("POST", path, parse, json=body, once=True, params=params)

    def save_mask(
        self,
        case_id: str,
        mask: np.ndarray,
        seconds_spent: Optional[float] = None,
        submit: bool = True,
        n_interactions: Optional[int] = None,
    ) -> LabelInfo:
        """Save a mask drawn elsewhere (label values 0-255 ``[k, j, i]``, the case's shape) as a label
        version; :class:`ImageError` for other values, before anything is sent (a cast to uint8 would
        wrap 300 to 44 and -1 to 255, and truncate a soft mask's 0.9 to 0). ``n_interactions`` and
        ``seconds_spent`` None: unknown, recorded as such (null), not as 0."""
        payload = ArrayPayload.from_array(as_labels(mask), available_codecs()[0])
        body = {"mask": payload.model_dump(), "submit": submit, "n_interactions": n_interactions}
        body.update(_seconds(seconds_spent))
        return self._post_once(f"{_case_path(case_id)}/labels", body, LabelInfo.model_validate, _UNKNOWN_AS_NULL)

    def review(
        self, case_id: str, accepted: bool, note: Optional[str] = None, label_id: Optional[str] = None
    ) -> ReviewInfo:
        """Review the case's latest submitted label as the caller: ``accepted`` makes the case
        ``reviewed``, a rejection sends it back to ``in_progress``. ``label_id``: the version looked at
        (refused, ``LearningConflictError``, once a newer one was submitted). Takes effect once, also
        when sent again after a lost reply."""
        body: dict = {"accepted": bool(accepted)}
        if note is not None:
            body["note"] = note
        if label_id is not None:
            body["label_id"] = label_id
        return self._post_once(f"{_case_path(case_id)}/review", body, ReviewInfo.model_validate)

    # ---- training --------------------------------------------------------------------------------
    def train(self, kind: str = "salt", **settings: Any) -> JobStatus:
        """Start a training job on the submitted labels (``LearningConflictError`` when one runs)."""
        body = {"kind": kind, **{k: v for k, v in settings.items() if v is not None}}
        return self._http.reply("POST", f"{_BASE}/train", JobStatus.model_validate, json=body, safe=False)

    def jobs(self) -> List[JobStatus]:
        return self._http.reply("GET", f"{_BASE}/jobs", list_of(JobStatus))

    def job(self, job_id: str, timeout: Optional[Timeout] = None) -> JobStatus:
        """The job's status (``timeout``: this request's, else the client's)."""
        return self._http.reply("GET", _job_path(job_id), JobStatus.model_validate, timeout=timeout)

    def cancel(self, job_id: str) -> JobStatus:
        return self._http.reply("POST", f"{_job_path(job_id)}/cancel", JobStatus.model_validate)

    def wait_for_job(
        self,
        job_id: str,
        timeout: Optional[float] = None,
        poll_s: float = 1.0,
        progress: Optional[Callable[[JobStatus], None]] = None,
    ) -> JobStatus:
        """Poll a job until it ends (its final status, ``failed`` included: check ``state``);
        ``progress(status)`` sees every change of step or state.

        The job runs in its own process on the server: a server out of reach for a while (a restart)
        or slow to answer does not end the wait, which goes on until ``timeout``; then
        :class:`JobWaitTimeoutError` (or, if the server could not be reached again, the last connection
        error). Out of reach is also what a restart looks like behind a reverse proxy or gateway (its
        502, 503 or 504 page, any 5xx not in SegAssist's error shape) and a busy server's 503
        (:class:`ServerBusyError`: queue full, shutting down, storage unavailable). No poll waits past
        ``timeout``: each is sent with the client's timeouts cut to the time left, and one whose reply
        has not come by then ends the wait with JobWaitTimeoutError.

        ``poll_s``: seconds between polls, above 0 (a ``ValueError`` otherwise, as for the client's
        timeouts), at least :data:`MIN_POLL_INTERVAL_S`; ``timeout``: seconds, 0 or more, or None.
        """
        poll_s = _checked_poll(poll_s)
        if timeout is not None and not (_is_seconds(timeout) and timeout >= 0):
            raise ValueError(f"timeout must be seconds, 0 or more, or None (no limit); got {timeout!r}")
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Any = None
        state = "unknown"
        while True:
            try:
                status = self.job(job_id, timeout=self._poll_timeout(deadline))
            except BackendTimeoutError as exc:  # no reply in time: a hung or very busy server
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobWaitTimeoutError(
                        f"training job {job_id}: no reply from the server within the {timeout} s waited "
                        f"(last seen {state}; the job goes on)"
                    ) from exc
            except ClientError as exc:
                if not _out_of_reach(exc) or (deadline is not None and time.monotonic() >= deadline):
                    raise
            else:
                state = status.state
                seen = (status.state, getattr(status, "step", None), getattr(status, "phase", None))
                if progress is not None and seen != last:
                    progress(status)
                last = seen
                if status.state in FINAL_JOB_STATES:
                    return status
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise JobWaitTimeoutError(f"training job {job_id} still {state} after {timeout} s (it goes on)")
            time.sleep(poll_s if remaining is None else min(poll_s, remaining))

    def _poll_timeout(self, deadline: Optional[float]) -> Optional[Timeout]:
        """The client's (connect, read) timeouts, each cut to the time left before ``deadline``."""
        if deadline is None:
            return None
        left = max(deadline - time.monotonic(), _MIN_POLL_S)
        connect, read = self._http._pair()
        return (left if connect is None else min(connect, left), left if read is None else min(read, left))

    # ---- versions --------------------------------------------------------------------------------
    def versions(self) -> VersionList:
        return self._http.reply("GET", f"{_BASE}/versions", VersionList.model_validate)

    def rollback(self, to: Optional[str] = None, expected_current: Optional[str] = None) -> Optional[str]:
        """Make an earlier version current (``to``: a version id, ``"base"``, or one step back); returns the
        version current now (``None``: the base model).

        ``expected_current``: the version the caller saw current (``"base"``: the base model). When another
        is current by the time the server acts (a job promoted one since), nothing changes and
        :class:`LearningConflictError` (``version_state``) says which is; without it, one step back goes
        back from whatever is current then. A server older than this option refuses it (422)."""
        return self.rollback_detailed(to, expected_current).current

    def rollback_detailed(self, to: Optional[str] = None, expected_current: Optional[str] = None) -> CurrentVersion:
        """:meth:`rollback`, also saying which version it replaced (``previous``; ``None``: the base model, or a
        server too old to say)."""
        body: Dict[str, Any] = {"to": to}
        if expected_current is not None:  # sent only when given: an older server refuses unknown fields
            body["expected_current"] = expected_current
        return self._http.reply("POST", f"{_BASE}/rollback", CurrentVersion.model_validate, json=body, safe=False)

    # ---- active learning -------------------------------------------------------------------------
    def next_case(
        self,
        strategy: str = "uncertainty",
        lock: bool = True,
        proposal: bool = True,
        seed: int = 0,
        diversity_weight: float = 0.5,
        max_candidates: int = 16,
        lock_ttl_s: float = DEFAULT_LOCK_TTL_S,
    ) -> NextCase:
        """The case to annotate next (locked to me by default) and the current model's proposal.

        With ``lock``, a case I hold locked and have not saved a label version of yet (an answer that never
        reached me, a lock by hand) comes back first, its lock renewed (``NextCase.resumed``); a new case
        is locked once that one is labelled (a draft counts) or unlocked."""
        body = {
            "strategy": strategy,
            "lock": lock,
            "proposal": proposal,
            "seed": seed,
            "diversity_weight": diversity_weight,
            "max_candidates": max_candidates,
        }
        if lock_ttl_s != DEFAULT_LOCK_TTL_S:  # sent only when asked: servers before it refuse the field
            body["lock_ttl_s"] = lock_ttl_s
        return self._post_once(f"{_BASE}/next", body, _next_case)


def _wire_text(value: Any) -> str:
    """A query value as sent: an enum (``CaseStatus.NEW``, a ``str`` enum) by its value, ``"new"``, not
    by ``str()``, which is ``"CaseStatus.NEW"`` on Python 3.11."""
    return str(getattr(value, "value", value))


def _is_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _checked_poll(poll_s: Any) -> float:
    """``poll_s`` if it is finite seconds above 0, raised to :data:`MIN_POLL_INTERVAL_S` (a smaller
    one would poll the server in a tight loop); ``ValueError`` otherwise, before anything is sent."""
    if not (_is_seconds(poll_s) and poll_s > 0):
        raise ValueError(f"poll_s must be seconds above 0; got {poll_s!r}")
    return max(float(poll_s), MIN_POLL_INTERVAL_S)


def _out_of_reach(error: ClientError) -> bool:
    """Whether a poll failed for want of the server, not because of the request: no reply, a gateway's
    or proxy's 5xx page (a server restarting behind it), or the server's own 503 (busy, stopping)."""
    return isinstance(error, ServerBusyError) or _reply_lost(error)


def _next_case(data: Any) -> NextCase:
    """A next-case reply with its proposal's box written into a mask of the case's shape. A box that
    does not lie within the case (an offset below 0 too: numpy would count it from the far end) or
    whose data is not of its declared shape is a ``ValueError``, a :class:`ProtocolError` to the
    caller (:func:`parsed_reply`); the data is decompressed only up to the box's size."""
    reply = NextCaseReply.model_validate(data)
    mask = None
    if reply.proposal is not None:
        shape = tuple(int(n) for n in reply.case.shape)
        lo, size = reply.proposal.offset, reply.proposal.shape
        where = check_box(lo, size, shape, "proposal box", "case")
        mask = np.zeros(shape, np.uint8)
        if reply.proposal.mask is not None:
            mask[where] = box_voxels(lo, size, reply.proposal.mask, shape, "proposal box", "case")
    return NextCase(reply, mask)
