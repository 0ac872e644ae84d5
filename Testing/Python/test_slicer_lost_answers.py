"""The effect's object stays the server's when answers are lost or the backend restarts.

Real servers on loopback with the real built-in engine on a tiny network (``test_server_fixtures``):
the effect's Qt-free halves, :class:`PromptState` (main thread) and :class:`InteractiveSession`
(worker thread), driven request by request as the effect drives them. A lost answer is either real
(the slow server of ``test_client_lost_replies``: the prompt outlasts both of the client's reads) or
dropped at the client's HTTP layer after the server answered (the server did the request) or
before it was sent (it did not).
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import pytest
from test_client_lost_replies import _start_slow_server
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BackendTimeoutError, BackendUnavailableError
from SegAssistLib.engine.base import MaskUpdate
from SegAssistLib.prompts import PointPrompt

pytest.importorskip("slicer")
from SegAssistLib.slicer.session_state import (  # noqa: E402
    InteractiveSession,
    ObjectOutOfStep,
    Op,
    PromptState,
    describe_error,
    redo_steps_lost,
)

pytest_plugins = ["test_server_fixtures"]

P = [
    PointPrompt(position=(24.0, 20.0, 12.0)),
    PointPrompt(position=(14.0, 14.0, 8.0)),
    PointPrompt(position=(30.0, 22.0, 12.0), positive=False),
    PointPrompt(position=(24.0, 26.0, 14.0)),
]


class Effect:
    """What the effect does with each request: the worker runs it, the main thread takes the answer
    and writes it into its copy of the segment (``segment``: the model's view, [k, j, i])."""

    def __init__(self, session: InteractiveSession, shape) -> None:
        self.session, self.state = session, PromptState()
        self.segment = np.zeros(shape, np.uint8)
        self.errors: List[BaseException] = []
        self.settled = 0  # answers that came from asking the server what a lost request did

    def step(self, op: Op, prompt=None) -> Optional[BaseException]:
        request = self.state.request(op, prompt)
        try:
            value, error = self.session.run(request), None
        except Exception as exc:  # the worker hands errors to the main thread
            value, error = None, exc
        self.settled += bool(value is not None and value.info.get("settled"))
        update = self.state.accept(request, value, error)
        if update is not None:
            update.apply_to(self.segment)
        if error is not None:
            self.errors.append(error)
        return error

    @property
    def remote(self):
        return self.session._session  # the RemoteSession the object works on now

    def server_prompts(self) -> int:
        return len(self.remote.prompt_log().prompts)

    def agrees_with_server(self) -> None:
        """The segment is the server's mask, and the object counts the prompts the server holds."""
        np.testing.assert_array_equal(self.segment, self.remote.fetch_result())
        assert len(self.state.confirmed_prompts) == self.server_prompts()


def _drop_answer(client: SegAssistClient, op: str, sent: bool) -> None:
    """The next POST .../``op`` loses its answer as a twice-timed-out read does (``outcome_unknown``):
    after the server did it (``sent``) or before it reached the server."""
    real = client.http.request

    def request(method, path, *args, **kwargs):
        if method == "POST" and path.endswith("/" + op):
            client.http.request = real  # once
            if sent:
                real(method, path, *args, **kwargs)
            error = BackendTimeoutError(f"{method} {path}: no answer within the read timeout (dropped)")
            error.outcome_unknown = True
            raise error
        return real(method, path, *args, **kwargs)

    client.http.request = request


def _unreachable_once(client: SegAssistClient) -> None:
    """The next attach (``client.session``: how the object asks what the server did) gets no answer."""
    real = client.session

    def session(session_id):
        client.session = real
        raise BackendTimeoutError("GET session: no answer within the read timeout (dropped)")

    client.session = session


# ---- lost answers ----------------------------------------------------------------------------------
def test_a_prompt_whose_answer_is_lost_but_done_counts_and_its_answer_is_written(server_checkpoint):
    server, delay, _ = _start_slow_server(server_checkpoint)
    try:
        volume = make_volume()
        # reads of 4 s: the slow prompt (9 s) outlasts both (8 s); the server's mask, asked for right
        # after, comes once it is done (about 9-10 s, within the next read)
        client = SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 4.0))
        effect = Effect(InteractiveSession(lambda: client, volume), volume.array.shape)
        assert effect.step(Op.PROMPT, P[0]) is None
        delay["s"] = 9.0
        assert effect.step(Op.PROMPT, P[1]) is None  # settled: done on the server, so done here
        delay["s"] = 0.0
        assert effect.settled == 1
        assert effect.state.prompts == P[:2] and effect.state.error_text == ""
        effect.agrees_with_server()
        assert effect.step(Op.PROMPT, P[2]) is None
        effect.agrees_with_server()
        for depth in (2, 1, 0):  # undo steps back through what the server did, the lost prompt's too
            assert effect.step(Op.UNDO) is None
            assert len(effect.state.prompts) == depth
            effect.agrees_with_server()
        assert not effect.state.can_undo and not effect.segment.any()
        assert effect.step(Op.REDO) is None and effect.step(Op.REDO) is None
        effect.agrees_with_server()
        effect.session.close()
    finally:
        server.stop()


def test_a_lost_answer_of_a_prompt_the_server_did_not_do_is_its_failure(shared_server):
    volume = make_volume()
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    effect = Effect(InteractiveSession(lambda: client, volume), volume.array.shape)
    assert effect.step(Op.PROMPT, P[0]) is None
    _drop_answer(client, "prompts", sent=False)
    error = effect.step(Op.PROMPT, P[1])
    assert isinstance(error, BackendTimeoutError) and "did not answer in time" in describe_error(error)
    assert effect.state.prompts == P[:1]
    effect.agrees_with_server()
    assert effect.step(Op.PROMPT, P[2]) is None and effect.step(Op.UNDO) is None
    assert effect.state.prompts == P[:1]
    effect.agrees_with_server()
    effect.session.close()


def test_a_lost_answer_of_an_undo_the_server_did_counts(shared_server):
    volume = make_volume()
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    effect = Effect(InteractiveSession(lambda: client, volume), volume.array.shape)
    for prompt in P[:3]:
        assert effect.step(Op.PROMPT, prompt) is None
    _drop_answer(client, "undo", sent=True)
    assert effect.step(Op.UNDO) is None and effect.settled == 1
    assert effect.state.prompts == P[:2] and effect.state.can_redo
    effect.agrees_with_server()
    assert effect.step(Op.UNDO) is None and effect.step(Op.REDO) is None
    assert effect.state.prompts == P[:2]
    effect.agrees_with_server()
    effect.session.close()


def test_a_lost_answer_that_cannot_be_settled_at_once_is_settled_by_the_next_request(shared_server):
    volume = make_volume()
    shape = volume.array.shape
    # not done on the server: the next request learns it and goes on
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    effect = Effect(InteractiveSession(lambda: client, volume), shape)
    assert effect.step(Op.PROMPT, P[0]) is None
    _drop_answer(client, "prompts", sent=False)
    _unreachable_once(client)
    assert isinstance(effect.step(Op.PROMPT, P[1]), BackendTimeoutError)
    assert effect.state.prompts == P[:1]
    assert effect.step(Op.PROMPT, P[2]) is None
    assert effect.state.prompts == [P[0], P[2]]
    effect.agrees_with_server()
    effect.session.close()

    # done on the server after all: the segment never got its answer, so the object ends before the
    # next request is sent, and every request after it is refused the same way
    effect = Effect(InteractiveSession(lambda: client, volume), shape)
    assert effect.step(Op.PROMPT, P[0]) is None
    _drop_answer(client, "prompts", sent=True)
    _unreachable_once(client)
    assert isinstance(effect.step(Op.PROMPT, P[1]), BackendTimeoutError)
    assert effect.server_prompts() == 2 and effect.state.prompts == P[:1]
    error = effect.step(Op.PROMPT, P[2])
    assert isinstance(error, ObjectOutOfStep) and "this object ended" in describe_error(error)
    assert effect.server_prompts() == 2  # nothing was sent
    assert isinstance(effect.step(Op.UNDO), ObjectOutOfStep)
    assert effect.server_prompts() == 2
    effect.session.close()


def test_a_lost_answer_whose_history_matches_nothing_ends_the_object(shared_server):
    """The server's history moved by more than the lost request (another client on the session):
    the object cannot tell what its segment lacks, so it ends rather than go on out of step."""
    volume = make_volume()
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    effect = Effect(InteractiveSession(lambda: client, volume), volume.array.shape)
    assert effect.step(Op.PROMPT, P[0]) is None
    other = client.session(effect.remote.session_id)
    real = client.http.request

    def request(method, path, *args, **kwargs):
        if method == "POST" and path.endswith("/prompts"):
            client.http.request = real
            real(method, path, *args, **kwargs)
            other.add_prompt(P[3])  # and someone else's prompt after it
            error = BackendUnavailableError("connection lost (dropped)")
            error.outcome_unknown = True
            raise error
        return real(method, path, *args, **kwargs)

    client.http.request = request
    assert isinstance(effect.step(Op.PROMPT, P[1]), ObjectOutOfStep)
    assert isinstance(effect.step(Op.PROMPT, P[2]), ObjectOutOfStep)
    assert effect.server_prompts() == 3
    effect.session.close()


# ---- redo after the backend lost the session ---------------------------------------------------------
def test_redo_is_off_once_the_backend_restarted_elsewhere(server_factory):
    first = server_factory.start()
    current = {"client": SegAssistClient(first.url, TOKENS["alice"])}
    volume = make_volume()
    effect = Effect(InteractiveSession(lambda: current["client"], volume), volume.array.shape)
    for prompt in P[:2]:
        assert effect.step(Op.PROMPT, prompt) is None
    assert effect.step(Op.UNDO) is None and effect.state.can_redo
    first.stop()
    second = server_factory.start()  # the local backend came back on another port
    current["client"] = SegAssistClient(second.url, TOKENS["alice"])
    error = effect.step(Op.REDO)
    assert error is not None and redo_steps_lost(error=error) and "restarted" in str(error)
    assert not effect.state.can_redo and effect.state.prompts == P[:1]
    effect.agrees_with_server()
    assert effect.step(Op.UNDO) is None and not effect.segment.any()  # undo steps came back
    assert effect.state.can_redo and effect.step(Op.REDO) is None
    effect.agrees_with_server()
    effect.session.close()


def test_a_settled_object_moves_to_a_restarted_backend_with_its_image(server_factory):
    """After a settled lost answer the object works on a fresh copy of the server's session, which
    holds no copy of the image: a backend that restarted without it is sent it again."""
    first = server_factory.start()
    current = {"client": SegAssistClient(first.url, TOKENS["alice"])}
    volume = make_volume()
    effect = Effect(InteractiveSession(lambda: current["client"], volume), volume.array.shape)
    assert effect.step(Op.PROMPT, P[0]) is None
    _drop_answer(current["client"], "prompts", sent=True)
    assert effect.step(Op.PROMPT, P[1]) is None and effect.settled == 1
    first.stop()
    second = server_factory.start()  # holds no image
    current["client"] = SegAssistClient(second.url, TOKENS["alice"])
    assert effect.step(Op.PROMPT, P[2]) is None
    assert effect.state.prompts == P[:3]
    effect.agrees_with_server()
    effect.session.close()


def test_redo_steps_lost_with_a_recovered_session_are_forgotten(shared_server):
    volume = make_volume()
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    effect = Effect(InteractiveSession(lambda: client, volume), volume.array.shape)
    for prompt in P[:2]:
        assert effect.step(Op.PROMPT, prompt) is None
    assert effect.step(Op.UNDO) is None
    client.http.request("DELETE", effect.remote._path)  # the server lost the session (expired)
    assert effect.step(Op.UNDO) is None  # recovered from the prompts in effect, then undone there
    assert effect.state.can_redo and not effect.segment.any()
    assert effect.step(Op.REDO) is None
    assert effect.state.prompts == P[:1] and not effect.state.can_redo  # P[1]'s redo went with the session
    effect.agrees_with_server()
    effect.session.close()


# ---- the status line ---------------------------------------------------------------------------------
def test_a_timeout_reads_as_a_busy_backend_not_an_unreachable_one():
    text = describe_error(BackendTimeoutError("POST /v1/x: no answer within the read timeout (60.0 s)"))
    assert text.startswith("The backend did not answer in time") and "(60.0 s)" in text
    assert "Start the local backend" not in text
    assert describe_error(BackendUnavailableError("refused")).startswith("Backend unreachable")


def test_an_error_is_not_shown_once_its_object_ended():
    state = PromptState(clock=lambda: 0.0)
    request = state.request(Op.PROMPT, P[0])
    state.accept(request, None, BackendUnavailableError("refused"))
    state.error_text = describe_error(state.last_error)
    assert state.status_line(None, object_open=True) == (state.error_text, True)
    state.new_epoch()  # Accept or Reset: the object is over, and its error with it
    assert state.status_line(None, object_open=False) is None
    assert state.status_line("Waiting for the backend", object_open=False) == ("Waiting for the backend", False)
    state.error_text = "still wrong"
    state.request(Op.PROMPT, P[1])  # a new request clears it too
    assert state.error_text == ""


def test_the_prompt_count_shows_while_nothing_is_pending():
    state = PromptState(clock=lambda: 0.0)
    answer = MaskUpdate(offset=(0, 0, 0), voxels=np.ones((1, 1, 1), np.uint8))
    state.accept(state.request(Op.PROMPT, P[0]), answer)
    assert state.status_line(None, object_open=True, hint="Click.") == ("1 prompt on this object. Click.", False)
    state.request(Op.PROMPT, P[1])
    assert state.status_line(None, object_open=True) is None  # pending, and no note yet: as it is
