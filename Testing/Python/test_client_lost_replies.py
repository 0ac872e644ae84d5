"""The client's copy of a session stays the server's when replies are lost or sessions replayed.

A real server on loopback with the real built-in engine (tiny network); the one thing faked is time:
the engine is wrapped so that its prompts take as long as a test says, to outlast the client's read
timeout as a busy server would.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import numpy as np
import pytest
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BackendTimeoutError, BackendUnavailableError, InvalidPromptError
from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


class _SlowEngine(Engine):
    """The real engine, whose prompts (also those an open replays) take ``delay["s"]`` seconds more;
    records the modality each session's image carries."""

    def __init__(self, engine: Engine, delay: Dict[str, float], modalities: List[Optional[str]]) -> None:
        self.engine, self.delay, self.modalities = engine, delay, modalities

    def capabilities(self):
        return self.engine.capabilities()

    def open_session(self, volume, prompts=None) -> EngineSession:
        self.modalities.append(volume.modality)
        time.sleep(self.delay["s"] * len(prompts or []))  # its replay is slow too, prompt by prompt
        session = self.engine.open_session(volume, prompts)
        add_prompt, delay = session.add_prompt, self.delay

        def slow_add_prompt(prompt):
            time.sleep(delay["s"])
            return add_prompt(prompt)

        session.add_prompt = slow_add_prompt  # type: ignore[method-assign]
        return session


def _start_slow_server(checkpoint, **limits):
    from SegAssistLib.engine.builtin import load_default_engine
    from SegAssistLib.server.app import create_app
    from SegAssistLib.server.auth import hash_token
    from SegAssistLib.server.runner import ServerThread
    from SegAssistLib.server.settings import Limits, ServerSettings

    delay: Dict[str, float] = {"s": 0.0}
    modalities: List[Optional[str]] = []
    settings = ServerSettings(
        model=checkpoint, token_hashes=[("alice", hash_token(TOKENS["alice"]))], limits=Limits(**limits)
    )

    def factory(device: str) -> Engine:
        return _SlowEngine(load_default_engine(checkpoint, device=device), delay, modalities)

    return ServerThread(create_app(settings, engine_factory=factory)).start(), delay, modalities


@pytest.fixture
def slow_server(server_checkpoint):
    server, delay, modalities = _start_slow_server(server_checkpoint)
    yield server, delay, modalities
    server.stop()


def _agrees_with_server(session) -> None:
    np.testing.assert_array_equal(session.result(), session.fetch_result())
    assert [p.model_dump() for p in session.local_prompts()] == [p.model_dump() for p in session.prompt_log().prompts]


def test_a_prompt_whose_reply_is_lost_is_neither_missed_nor_applied_twice(slow_server):
    server, delay, _ = slow_server
    volume = make_volume()
    # margins of seconds, not tenths: a loaded 2-core machine answers a prompt of the tiny network in
    # up to a second
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 3.0)) as client:
        session = client.open_session(volume)
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))

        # the reply outlasts the read timeout once: asked again under the same id, the server answers
        # from its record of the request after the original finished (not a second prompt)
        delay["s"] = 3.3  # the repeat, sent at 3.0 s, waits for the original until about 3.3 s
        session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        assert session.status().n_prompts == 2
        _agrees_with_server(session)

        # lost twice: the call fails, the server applies the prompt all the same; the next call
        # takes the server's state and reports what changed meanwhile with its own change
        delay["s"] = 8.0  # beyond both reads (2 x 3.0 s)
        seen = session.result()
        with pytest.raises(BackendTimeoutError):
            session.add_prompt(PointPrompt(position=(14.0, 14.0, 8.0)))
        time.sleep(3.0)
        delay["s"] = 0.0
        with pytest.raises(InvalidPromptError):  # a refused call in between returns no update: the gap waits
            session.add_prompt(PointPrompt(position=(500.0, 26.0, 14.0)))
        update = session.add_prompt(PointPrompt(position=(24.0, 26.0, 14.0)))
        update.apply_to(seen)
        np.testing.assert_array_equal(seen, session.fetch_result())  # the caller's copy is whole again
        assert session.status().n_prompts == 4
        _agrees_with_server(session)
        # a reset, then a client that attaches (as a resync does): it starts from the empty state
        # and knows nothing of the steps before it; undoing the reset reads them back
        mask = session.result()
        session.reset()
        attached = client.session(session.session_id)
        assert attached.local_prompts() == []
        attached.undo()
        np.testing.assert_array_equal(attached.result(), mask)
        _agrees_with_server(attached)
        attached.redo()
        attached.undo()
        _agrees_with_server(attached)
        # the read-back fails once (the connection drops): the undo was done and its update stands;
        # the next call takes the server's prompts and mask
        attached.redo()
        real_log = attached.prompt_log

        def dropped():
            attached.prompt_log = real_log
            raise BackendUnavailableError("connection dropped")

        attached.prompt_log = dropped
        seen = attached.result()
        attached.undo().apply_to(seen)
        np.testing.assert_array_equal(seen, attached.fetch_result())
        attached.redo().apply_to(seen)
        np.testing.assert_array_equal(seen, attached.fetch_result())
        attached.undo()
        _agrees_with_server(attached)
        assert len(attached.local_prompts()) == 4
        attached.client.http.request("DELETE", attached._path)  # the server loses the session
        attached.recover()  # replays what the mask came from: the same mask, not an empty one
        np.testing.assert_array_equal(attached.fetch_result(), mask)
        _agrees_with_server(attached)


def test_a_repeat_answered_by_another_error_still_resyncs(slow_server):
    """The first try's reply is lost and the repeat under its id is refused (here: the queue is full,
    injected at the HTTP layer): the server may have done the first, so the next call resyncs."""
    from SegAssistLib.client.errors import ServerBusyError

    server, delay, _ = slow_server
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 2.5)) as client:
        session = client.open_session(make_volume())
        seen = session.result()
        real_send, calls = client.http._send, []

        def busy_on_repeat(method, path, *args):
            calls.append(path)
            if len(calls) == 2:
                raise ServerBusyError("inference queue full", status=503, code="queue_full")
            return real_send(method, path, *args)

        client.http._send = busy_on_repeat
        delay["s"] = 3.0
        with pytest.raises(ServerBusyError):
            session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        client.http._send = real_send
        delay["s"] = 0.0
        # the server did apply it: once its 3 s job is done (later than that on a loaded machine, where a
        # fixed 2 s wait after the lost reply was at times too short)
        deadline = time.monotonic() + 60.0
        while session.status().n_prompts == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session.status().n_prompts == 1
        update = session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        update.apply_to(seen)
        np.testing.assert_array_equal(seen, session.fetch_result())
        _agrees_with_server(session)


def test_an_open_whose_replay_outlasts_the_timeout_is_asked_again_not_opened_twice(server_checkpoint):
    """Opening with a log replays it before answering; a reply later than the read timeout (already
    given one second per prompt) is asked for again under the same id: the server answers the session
    it opened. With one session per user allowed, a second open would be refused."""
    server, delay, _ = _start_slow_server(server_checkpoint, max_sessions_per_user=1)
    try:
        prompts = [PointPrompt(position=(24.0, 20.0, 12.0)), PointPrompt(position=(30.0, 22.0, 12.0))]
        with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 1.5)) as client:
            # 4 s of replay against 1.5 + 2 x 1.0 s of read timeout; the second try waits as long again,
            # time enough for the real engine's replay on a loaded machine (1.8 s was not, at times)
            delay["s"] = 2.0
            session = client.open_session(make_volume(), prompts)
            delay["s"] = 0.0
            _agrees_with_server(session)
            assert len(session.local_prompts()) == 2
            session.close()
    finally:
        server.stop()


def test_replayed_prompts_are_undo_steps_on_both_sides_and_the_modality_survives_recovery(slow_server):
    server, _, modalities = slow_server
    volume = make_volume(seed=3)
    volume.modality = "CT"
    prompts = [PointPrompt(position=(24.0, 20.0, 12.0)), PointPrompt(position=(30.0, 22.0, 12.0), positive=False)]
    with SegAssistClient(server.url, TOKENS["alice"]) as client:
        client.upload_image(volume.__class__(volume.array, volume.spacing))  # held already, without modality
        session = client.open_session(volume, prompts)
        session.undo()  # the second replayed prompt
        _agrees_with_server(session)
        assert len(session.local_prompts()) == 1
        session.client.http.request("DELETE", session._path)  # the server loses the session
        session.recover()
        _agrees_with_server(session)
        assert len(session.local_prompts()) == 1  # the undone prompt stays undone
        assert modalities == ["CT", "CT"]  # opened, then recovered: the volume's modality both times
