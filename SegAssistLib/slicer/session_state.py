"""Prompt bookkeeping of the segment editor effect, and the backend session its worker thread drives.

Qt-free. The effect works on one object at a time (an *epoch*): the prompts placed on the selected
segment since the last accept or reset. Main thread: :class:`PromptState` numbers each request
(``seq``), tracks which are still pending and tells whether a reply still counts. Worker thread:
:class:`InteractiveSession` owns the backend session of one epoch.

Why epochs and not "newest sequence number wins": a reply carries only the box that changed since
the previous step, so every reply of the current object must be applied, in order (one worker
thread guarantees the order). A reply is stale when its object is gone: the user pressed reset
or accept, or switched segment or volume, while it was in flight. Those are dropped.

A request whose answer was lost on the way back (the client's error says ``outcome_unknown``: the
server may have done it all the same) is settled with the server before anything else is sent: done
there, it counts as done here and its answer is the difference the server's mask makes; not done, it
failed. When the server's history cannot be matched with the object's prompts the object ends
(:class:`ObjectOutOfStep`): the segment and the server must never disagree about what was done.

After the backend lost the session (a restart, idle expiry, a backend that moved to another port)
the object is restored from its prompts: its undo steps come back, its redo steps do not; the
answer (or error) of a request that restored it says so (:func:`redo_steps_lost`), and
:class:`PromptState` forgets them too, so Redo is off.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from SegAssistLib.client.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ClientError,
    SessionNotFoundError,
)
from SegAssistLib.engine.base import Engine, EngineSession, MaskUpdate
from SegAssistLib.errors import SegAssistError, SessionError
from SegAssistLib.image import Volume
from SegAssistLib.prompts import MaskPrompt, Prompt
from SegAssistLib.slicer.worker import ProgressNote

#: Seconds a request may take before the effect shows a progress note (before that: a wait cursor).
NOTE_AFTER_S = 1.0
#: Why an object's request is refused once the backend settings changed (consent withdrawn, another server).
SETTINGS_CHANGED = "the backend settings changed since this object was started: accept or reset it, then prompt again"
#: Why an upload stopped half-way: the settings changed while the image was on its way.
UPLOAD_STOPPED = (
    "the backend settings changed while the image was uploading: the upload stopped and nothing more "
    "was sent; the next prompt uses the new settings"
)


#: The status line once an object is accepted with all its answers in the segment.
ACCEPTED = "Accepted: the result stays in the segment; the next prompt starts a new object"

#: Why an object ends when a lost answer cannot be matched with the server's history.
OUT_OF_STEP = (
    "the backend's answer to a request was lost, and what the backend did since cannot be matched with "
    "this object's prompts: this object ended so that the segment and the backend do not disagree; the "
    "segment keeps what was written, and the next prompt starts a new object from it"
)
#: Why an object ends when a request whose answer was lost turns out to have been done after all.
DONE_AFTER_ALL = (
    "the backend did the request whose answer was lost after all, but the segment did not get its "
    "answer: this object ended so that the segment and the backend do not disagree; the segment keeps "
    "what was written, and the next prompt starts a new object from it"
)
#: Key of a :class:`MaskUpdate`'s ``info``, and attribute of an error, set when the request restored a
#: session the backend had lost: the restored session has no redo steps (:func:`redo_steps_lost`).
REDO_STEPS_LOST = "redo_steps_lost"


class ObjectOutOfStep(SessionError):
    """The backend's session can no longer be matched with the object's segment (an answer was lost
    and the backend's history moved in a way the object cannot account for): the object must end
    (the effect ends it, saying this); every later request of the object is refused with it too."""


def redo_steps_lost(update: Optional[MaskUpdate] = None, error: Optional[BaseException] = None) -> bool:
    """Whether the request that gave this answer or error restored the session (the backend had lost
    it): the restored one keeps the object's prompts and undo steps, not its redo steps."""
    if error is not None and getattr(error, REDO_STEPS_LOST, False):
        return True
    return update is not None and bool(update.info.get(REDO_STEPS_LOST))


class Op(str, Enum):
    PROMPT = "prompt"
    UNDO = "undo"
    REDO = "redo"


@dataclass(frozen=True)
class Request:
    """One prompt, undo or redo of the current object. ``depth``: how many prompts were in effect
    (as the user saw them) when it was made; an undo or redo acts on the prompt at that depth, so
    one whose prompt failed meanwhile is moot rather than acting on an earlier one."""

    seq: int
    epoch: int
    op: Op
    prompt: Optional[Prompt]
    issued_at: float
    depth: int = 0

    @property
    def moves_history(self) -> bool:
        return self.op is not Op.PROMPT


class _Stack:
    """Prompts in effect and prompts undone, as the backend's undo/redo sees them."""

    def __init__(self) -> None:
        self.done: List[Prompt] = []
        self.undone: List[Prompt] = []

    def copy(self) -> _Stack:
        other = _Stack()
        other.done, other.undone = list(self.done), list(self.undone)
        return other

    def allows(self, op: Op) -> bool:
        return op is Op.PROMPT or bool(self.done if op is Op.UNDO else self.undone)

    def apply(self, op: Op, prompt: Optional[Prompt]) -> None:
        if op is Op.PROMPT:
            assert prompt is not None
            self.done.append(prompt)
            self.undone.clear()
        elif op is Op.UNDO:
            self.undone.append(self.done.pop())
        else:
            self.done.append(self.undone.pop())


class PromptState:
    """Requests of the current object: numbering, pending set, stale-reply filter, undo/redo gating.

    ``expected`` is the prompt history as it will be once every pending request succeeds (what the
    user sees and what undo/redo are checked against); ``confirmed`` is what the backend answered.
    Undo cannot go past this object's first prompt: an initial mask taken from the segment is not
    a user prompt.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.epoch = 0
        self._next_seq = 1
        self._pending: Dict[int, Request] = {}
        self._confirmed = _Stack()
        self._expected = _Stack()
        self.dropped = 0
        self.last_error: Optional[BaseException] = None
        #: what the status line shows in red (:meth:`status_line`) until the next request is made or the
        #: object ends (:meth:`new_epoch`): an error of this object is not shown once it is over
        self.error_text = ""
        self.accepting = False  # accept was asked while replies were pending: it waits for them

    # ---- requests ---------------------------------------------------------------------------
    def request(self, op: Op, prompt: Optional[Prompt] = None) -> Request:
        """A numbered request for the worker; raises :class:`SessionError` if undo/redo has nothing to do."""
        if (op is Op.PROMPT) != (prompt is not None):
            raise ValueError("a prompt request needs a prompt, undo and redo none")
        self.check_open()
        if not self._expected.allows(op):
            raise SessionError("nothing to undo" if op is Op.UNDO else "nothing to redo")
        depth = len(self._expected.done)
        self._expected.apply(op, prompt)
        request = Request(self._next_seq, self.epoch, op, prompt, self._clock(), depth)
        self._next_seq += 1
        self._pending[request.seq] = request
        self.error_text = ""
        return request

    def is_current(self, request: Request) -> bool:
        return request.epoch == self.epoch and request.seq in self._pending

    def accept(
        self, request: Request, update: Optional[MaskUpdate] = None, error: Optional[BaseException] = None
    ) -> Optional[MaskUpdate]:
        """Take a reply: the update to write, or None when it is stale, failed or empty."""
        if not self.is_current(request):
            self.dropped += 1
            return None
        del self._pending[request.seq]
        if not redo_steps_lost(update, error):
            return self._take(request, update, error)
        # the backend restored the session from the prompts: what was undone cannot be redone there
        self._confirmed.undone.clear()
        taken = self._take(request, update, error)
        self._replan()
        return taken

    def _take(
        self, request: Request, update: Optional[MaskUpdate], error: Optional[BaseException]
    ) -> Optional[MaskUpdate]:
        if request.moves_history and len(self._confirmed.done) != request.depth:
            return None  # moot: the prompt it was to undo (or redo over) failed; its own error stands
        if error is not None or update is None:
            self.last_error = error
            self._replan()
            return None
        if not self._confirmed.allows(request.op):  # cannot happen while the worker guards its history
            self.last_error = SessionError(f"the backend answered a {request.op.value} with nothing to apply it to")
            self._replan()
            return None
        self.last_error = None
        self._confirmed.apply(request.op, request.prompt)
        return update if update.voxels.size else None

    def ask_accept(self) -> bool:
        """The user accepts the object: True when it can end now; False while answers are pending, so
        the last prompts land before it ends (:attr:`accept_due` says when; no new request meanwhile)."""
        self.accepting = self.busy
        return not self.accepting

    @property
    def accept_due(self) -> bool:
        return self.accepting and not self.busy

    def check_open(self) -> None:
        """Raise :class:`SessionError` while the object is being accepted: no new request, and no new
        object (on another segment either), until its pending answers are in."""
        if self.accepting:
            raise SessionError("the object is being accepted once its pending answers are in: wait for them")

    def accepted_line(self) -> Tuple[str, bool]:
        """The status line for ending this object as accepted (Accept, Enter, leaving the effect), and
        whether it is an error: accepted while the error of a failed request still shows (no request
        made since), that request is not in the segment, and the line keeps saying why."""
        if self.error_text:
            return f"Accepted, but a request failed and is not in the segment: {self.error_text}", True
        return ACCEPTED, False

    @property
    def ends_on_reselect(self) -> bool:
        """Whether selecting another segment or volume ends this object at once (it is accepted as it
        is; answers still on their way are not applied). Not while it is being accepted: the user
        asked for its last answers, so they still land in the object's own segment (the effect writes
        there, whatever is selected now), and the object ends once they are in (:attr:`accept_due`)."""
        return not self.accepting

    def ends_on_switch(self, same_segmentation_and_volume: bool) -> bool:
        """Whether a selection change ends this object at once (:attr:`ends_on_reselect`), given whether
        the editor still edits the object's segmentation and source volume. Another segment of them
        keeps an object being accepted; another segmentation or volume does not: the editor masks a
        write by its editable-area mask and intensity range, made from the segmentation and volume it
        edits, so the last answers would be masked by another segmentation's segments (with "outside
        all segments" they would overwrite the object's neighbours): they are dropped, saying so."""
        return self.ends_on_reselect or not same_segmentation_and_volume

    def new_epoch(self) -> int:
        """Start a new object: every pending reply becomes stale, the history empties."""
        self.epoch += 1
        self.accepting = False
        self._pending.clear()
        self._confirmed = _Stack()
        self._expected = _Stack()
        self.last_error = None
        self.error_text = ""
        return self.epoch

    def _replan(self) -> None:
        """After a failure: the expected history is what the backend confirmed, plus what is still pending."""
        expected = self._confirmed.copy()
        for seq in sorted(self._pending):
            request = self._pending[seq]
            if request.moves_history and len(expected.done) != request.depth:
                continue  # its prompt failed: the undo or redo is moot
            if expected.allows(request.op):
                expected.apply(request.op, request.prompt)
        self._expected = expected

    # ---- state ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self._pending)

    @property
    def pending(self) -> List[Request]:
        return [self._pending[s] for s in sorted(self._pending)]

    @property
    def prompts(self) -> List[Prompt]:
        """The prompts in effect once pending requests succeed (what to draw)."""
        return list(self._expected.done)

    @property
    def confirmed_prompts(self) -> List[Prompt]:
        return list(self._confirmed.done)

    @property
    def can_undo(self) -> bool:
        return self._expected.allows(Op.UNDO)

    @property
    def can_redo(self) -> bool:
        return self._expected.allows(Op.REDO)

    def waited_s(self) -> float:
        """Seconds since the oldest pending request was made (0 when nothing is pending)."""
        if not self._pending:
            return 0.0
        return max(0.0, self._clock() - min(r.issued_at for r in self._pending.values()))

    def progress_note(self, detail: str = "") -> Optional[str]:
        """A line for the user once a reply takes longer than :data:`NOTE_AFTER_S`, else None."""
        waited = self.waited_s()
        if not self._pending or waited < NOTE_AFTER_S:
            return None
        count = len(self._pending)
        text = f"Waiting for the backend ({count} request{'s' if count > 1 else ''}, {waited:.0f} s)"
        return f"{text}: {detail}" if detail else text

    def status_line(self, note: Optional[str], object_open: bool, hint: str = "") -> Optional[Tuple[str, bool]]:
        """What the status line shows now, and whether it is an error; None: leave it as it is (a
        message the effect set itself, such as why the object ended). The object's error first (it
        stays until the next request, or until the object ends), then ``note`` (:meth:`progress_note`),
        then, with an open object and nothing pending, its prompt count and ``hint``."""
        if self.error_text:
            return self.error_text, True
        if note:
            return note, False
        if object_open and not self.busy:
            count = len(self.prompts)
            return f"{count} prompt{'s' if count != 1 else ''} on this object. {hint}".rstrip(), False
        return None


def describe_error(error: BaseException) -> str:
    """A message for the status line: what went wrong and what to do."""
    from SegAssistLib.client.errors import (
        AuthenticationError,
        BackendUnavailableError,
        InvalidPromptError,
        LimitExceededError,
        PayloadTooLargeError,
        ServerBusyError,
    )

    text = getattr(error, "message", None) or str(error) or type(error).__name__
    if isinstance(error, BackendTimeoutError):  # before BackendUnavailableError, whose subclass it is
        return (
            f"The backend did not answer in time: {text}. It is reachable but busy (a large image, a slow "
            "device, other users' requests): try again in a moment."
        )
    if isinstance(error, BackendUnavailableError):
        return f"Backend unreachable: {text}. Start the local backend or check the server in the SegAssist module."
    if isinstance(error, AuthenticationError):
        return f"The backend refused the token: {text}. Check the token in the SegAssist module."
    if isinstance(error, (ServerBusyError, LimitExceededError)):
        return f"The backend is busy: {text}. Try again in a moment."
    if isinstance(error, PayloadTooLargeError):
        return f"The image is too large for this backend: {text}"
    if isinstance(error, InvalidPromptError):
        return f"The backend rejected the prompt: {text}"
    if isinstance(error, SegAssistError):
        return text
    return f"Unexpected error ({type(error).__name__}): {text}"


class InteractiveSession:
    """The backend session of one object. Every method except :meth:`abandon` runs on the worker thread.

    Opened on the first request: the image is uploaded (once per content hash) and the segment's
    content at that moment, if any, becomes the session's initial mask, so prompts refine what is
    already there. If the server lost the session (restart, idle expiry) it is recovered once by
    replaying the prompts of the current mask; so it is on the backend the engine factory gives now
    when the one it was opened on cannot be reached and that is another (the local backend was
    stopped or died, and a new one runs on another port). A recovered session has the object's undo
    steps, not its redo steps: the answer or error of that request says so (:func:`redo_steps_lost`).

    A prompt, undo or redo whose answer was lost (``outcome_unknown``: the server may have done it) is
    settled at once: the server's history tells whether it was done. Done: it counts, and its answer is
    what the server's mask changed (the session continues from the server's copy). Not done: its error
    stands. When the server cannot be asked now, the next request asks first, and sends nothing if
    the server did it after all (:class:`ObjectOutOfStep`, as for a history that matches neither).
    """

    def __init__(
        self,
        engine_factory: Callable[[], Engine],
        volume: Volume,
        initial_mask: Optional[np.ndarray] = None,
        note: Optional[ProgressNote] = None,
        settings_generation: Optional[Callable[[], int]] = None,
    ) -> None:
        """``settings_generation``: the backend settings' generation (``BackendManager.generation``);
        once it changes, this object's requests are refused instead of going to the backend it was
        opened on (the user may have withdrawn consent to send images there): an upload under way
        stops, and a session that was opening sends no prompt."""
        self._engine_factory = engine_factory
        self._generation = settings_generation
        self._opened_under: Optional[int] = None
        self._volume = volume
        self._initial = None if initial_mask is None or not np.any(initial_mask) else np.asarray(initial_mask)
        self._note = note or ProgressNote()
        self._session: Optional[EngineSession] = None
        self._abandoned = threading.Event()
        # this object's prompts in effect on the backend and undone there: an undo queued behind a
        # prompt that failed must not reach the backend, whose history starts with the initial mask
        self._done = 0
        self._undone = 0
        # a request whose answer was lost and that could not be settled yet: (the session's prompt
        # count before it, the count it leaves when done); the next request settles it first
        self._unsettled: Optional[Tuple[int, int]] = None
        self._out_of_step = ""  # why the object can go on no more (ObjectOutOfStep), once it cannot
        self._restores = 0  # sessions restored (recovered, or moved to another backend) so far
        # the session was re-attached after a lost answer: it holds no copy of the image, so a
        # recovery is given the volume (if the server lost the image too, it is sent again)
        self._attached = False

    def abandon(self) -> None:
        """(Main thread) the user moved on: requests not started yet do nothing."""
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        return self._abandoned.is_set()

    def run(self, request: Request) -> Optional[MaskUpdate]:
        if self._abandoned.is_set():
            return None
        if self._out_of_step:
            raise ObjectOutOfStep(self._out_of_step)
        if self._session is not None and self._settings_changed():
            raise SessionError(SETTINGS_CHANGED)
        restores = self._restores
        try:
            session = self._open()
            if self._settings_changed():  # changed while it opened (a local start, the upload): nothing sent
                raise SessionError(SETTINGS_CHANGED)
            if self._unsettled is not None:
                session = self._settle_earlier(session)
            update = self._send(session, request)
        except BaseException as exc:
            if self._restores != restores:
                with contextlib.suppress(AttributeError, TypeError):  # an exception that takes no attribute
                    setattr(exc, REDO_STEPS_LOST, True)
            raise
        finally:
            self._note.set("")
        if self._restores != restores:
            update.info[REDO_STEPS_LOST] = True
        return update

    def _send(self, session: EngineSession, request: Request) -> MaskUpdate:
        try:
            return self._apply_settling(session, request)
        except SessionNotFoundError:
            recover = getattr(session, "recover", None)
            if recover is None:
                raise
            self._note.set("The backend lost the session: restoring it")
            self._restored()  # the backend kept no redo steps, whatever the recovery gives
            recover(progress=self._uploaded, **self._volume_for_restore())
            self._attached = False
            return self._apply_settling(session, request)
        except BackendTimeoutError:
            raise  # reachable, busy: the same backend
        except BackendUnavailableError:
            if not self._move_to_current_backend(session):
                raise
            return self._apply_settling(session, request)

    def _settings_changed(self) -> bool:
        """Whether the backend settings changed since this object's session was (being) opened."""
        return self._generation is not None and self._generation() != self._opened_under

    def _uploaded(self, sent: int, total: int) -> None:
        """Upload progress (worker thread): shown, and the upload stops (:class:`SessionError`) once
        the settings changed: the user may have withdrawn consent to send images to that server."""
        if self._settings_changed():
            raise SessionError(UPLOAD_STOPPED)
        self._note.set(f"Uploading the image ({100 * sent // max(total, 1)} %)")

    def _restored(self) -> None:
        """The session is being restored from the object's prompts (recovered, or moved to another
        backend): no redo steps there, and a lost answer not settled yet no longer matters (the
        restored session holds the prompts this object counts, not what the lost request did)."""
        self._restores += 1
        self._undone = 0
        self._unsettled = None

    def _volume_for_restore(self) -> Dict[str, Volume]:
        """The ``volume`` argument of a recovery: the object's image for a re-attached session."""
        return {"volume": self._volume} if self._attached else {}

    def _move_to_current_backend(self, session: EngineSession) -> bool:
        """Reopen the object on the backend the factory gives now, if that is not the unreachable one
        (a local backend is started if none runs); False when it is the same backend."""
        from SegAssistLib.client import SegAssistClient

        move_to = getattr(session, "move_to", None)
        if move_to is None or self._abandoned.is_set():
            return False
        if self._settings_changed():
            return False  # the settings changed meanwhile: the next request says so
        self._note.set("The backend is gone: connecting to the current one")
        engine = self._engine_factory()
        if not isinstance(engine, SegAssistClient) or engine.url == session.client.url:  # type: ignore[attr-defined]
            return False
        self._note.set("The backend restarted: restoring this object's prompts there")
        self._restored()
        move_to(engine, progress=self._uploaded, **self._volume_for_restore())
        self._attached = False
        return True

    # ---- answers lost on the way back -----------------------------------------------------------
    def _apply_settling(self, session: EngineSession, request: Request) -> MaskUpdate:
        """:meth:`_apply`; a lost answer (the server may have done it) is settled with the server."""
        try:
            return self._apply(session, request)
        except ClientError as exc:
            if not exc.outcome_unknown or isinstance(exc, SessionNotFoundError):
                raise
            return self._settle(session, request, exc)

    def _settle(self, session: EngineSession, request: Request, error: ClientError) -> MaskUpdate:
        """The request's answer was lost: the server's history says whether it was done. Done: it
        counts, and the answer is what the server's mask changed since the mask this object saw; the
        session goes on as a fresh copy of the server's. Not done: ``error`` stands. Unknowable now
        (the server does not answer): ``error`` stands and the next request asks first."""
        local_prompts = getattr(session, "local_prompts", None)
        client = getattr(session, "client", None)
        if local_prompts is None or client is None:
            raise error
        before = len(local_prompts())  # unchanged by the failed call: what the object has seen
        after = before - 1 if request.op is Op.UNDO else before + 1
        self._note.set("The backend's answer was lost: asking it what it did")
        try:
            server = client.session(session.session_id)  # type: ignore[attr-defined]
        except SessionNotFoundError:
            raise error from None  # gone: a recovery replays the prompts this object counts
        except ClientError:
            self._unsettled = (before, after)
            raise error from None
        done = len(server.local_prompts())
        if done == before:
            raise error  # not done: the failure is what it says
        if done != after:
            self._out_of_step = OUT_OF_STEP
            raise ObjectOutOfStep(OUT_OF_STEP) from error
        update = MaskUpdate.between(session.result(), server.result(), info={"settled": True})
        self._session, self._attached = server, True  # the same server session, its state read afresh
        self._count(request.op)
        return update

    def _settle_earlier(self, session: EngineSession) -> EngineSession:
        """Settle a lost answer of an earlier request before this one is sent (that request failed, as
        far as the object knows): not done, the request goes on; done, or a history matching neither,
        the object ends (:class:`ObjectOutOfStep`, nothing sent). While the server cannot be asked
        nothing is sent either (its error), unless it is gone and the current backend is another: the
        object moves there with its own prompts (the session returned)."""
        assert self._unsettled is not None
        before, after = self._unsettled
        self._note.set("An earlier answer was lost: asking the backend what it did")
        try:
            done = len(session.prompt_log().prompts)  # type: ignore[attr-defined]
        except SessionNotFoundError:
            self._unsettled = None  # gone: a recovery replays the prompts this object counts
            return session
        except BackendTimeoutError:
            raise
        except BackendUnavailableError:
            if not self._move_to_current_backend(session):
                raise
            return session
        if done == before:
            self._unsettled = None
            return session
        self._out_of_step = DONE_AFTER_ALL if done == after else OUT_OF_STEP
        raise ObjectOutOfStep(self._out_of_step)

    # ---- the session ----------------------------------------------------------------------------
    def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(ClientError, SegAssistError, OSError):
                session.close()

    def result(self) -> Optional[np.ndarray]:
        return None if self._session is None else self._session.result()

    def _open(self) -> EngineSession:
        if self._session is not None:
            return self._session
        self._note.set("Connecting to the backend (a local one is started: the model loads)")
        self._opened_under = self._generation() if self._generation is not None else None
        engine = self._engine_factory()
        prompts = [MaskPrompt.from_array(self._initial)] if self._initial is not None else None
        from SegAssistLib.client import SegAssistClient

        if isinstance(engine, SegAssistClient):
            self._session = engine.open_session(self._volume, prompts, progress=self._uploaded)
        else:
            self._session = engine.open_session(self._volume, prompts)
        self._note.set("Segmenting")
        return self._session

    def _apply(self, session: EngineSession, request: Request) -> MaskUpdate:
        if request.op is Op.PROMPT:
            assert request.prompt is not None
            update = session.add_prompt(request.prompt)
        elif self._done != request.depth:
            # the prompt this undo or redo was asked for failed: doing it now would act on another
            return MaskUpdate(offset=(0, 0, 0), voxels=np.zeros((0, 0, 0), np.uint8))
        elif request.op is Op.UNDO:
            if self._done == 0:
                raise SessionError("nothing to undo: the prompt before it failed")
            update = session.undo()
        else:
            if self._undone == 0:
                raise SessionError(
                    "nothing to redo: the prompt before it failed, or the backend restarted (a restored "
                    "object keeps its undo steps, not its redo steps)"
                )
            update = session.redo()
        self._count(request.op)
        return update

    def _count(self, op: Op) -> None:
        """The backend did ``op``: the object's counts of prompts in effect and undone follow."""
        if op is Op.PROMPT:
            self._done, self._undone = self._done + 1, 0
        elif op is Op.UNDO:
            self._done, self._undone = self._done - 1, self._undone + 1
        else:
            self._done, self._undone = self._done + 1, self._undone - 1
