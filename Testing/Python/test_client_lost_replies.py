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
from SegAssistLib.client.errors import BackendTimeoutError, InvalidPromptError
from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


class _SlowEngine(Engine):
    """The real engine, whose prompts take ``delay["s"]`` seconds more; records the modality each
    session's image carries."""

    def __init__(self, engine: Engine, delay: Dict[str, float], modalities: List[Optional[str]]) -> None:
        self.engine, self.delay, self.modalities = engine, delay, modalities

    def capabilities(self):
        return self.engine.capabilities()

    def open_session(self, volume, prompts=None) -> EngineSession:
        self.modalities.append(volume.modality)
        session = self.engine.open_session(volume, prompts)
        add_prompt, delay = session.add_prompt, self.delay

        def slow_add_prompt(prompt):
            time.sleep(delay["s"])
            return add_prompt(prompt)

        session.add_prompt = slow_add_prompt  # type: ignore[method-assign]
        return session


@pytest.fixture
def slow_server(server_checkpoint):
    from SegAssistLib.engine.builtin import load_default_engine
    from SegAssistLib.server.app import create_app
    from SegAssistLib.server.auth import hash_token
    from SegAssistLib.server.runner import ServerThread
    from SegAssistLib.server.settings import ServerSettings

    delay: Dict[str, float] = {"s": 0.0}
    modalities: List[Optional[str]] = []
    settings = ServerSettings(model=server_checkpoint, token_hashes=[("alice", hash_token(TOKENS["alice"]))])

    def factory(device: str) -> Engine:
        return _SlowEngine(load_default_engine(server_checkpoint, device=device), delay, modalities)

    server = ServerThread(create_app(settings, engine_factory=factory)).start()
    yield server, delay, modalities
    server.stop()


def _agrees_with_server(session) -> None:
    np.testing.assert_array_equal(session.result(), session.fetch_result())
    assert [p.model_dump() for p in session.local_prompts()] == [p.model_dump() for p in session.prompt_log().prompts]


def test_a_prompt_whose_reply_is_lost_is_neither_missed_nor_applied_twice(slow_server):
    server, delay, _ = slow_server
    volume = make_volume()
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 1.5)) as client:
        session = client.open_session(volume)
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))

        # the reply outlasts the read timeout once: asked again under the same id, the server answers
        # from its record of the request after the original finished (not a second prompt)
        delay["s"] = 1.8
        session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        assert session.status().n_prompts == 2
        _agrees_with_server(session)

        # lost twice: the call fails, the server applies the prompt all the same; the next call
        # takes the server's state and reports what changed meanwhile with its own change
        delay["s"] = 4.0
        seen = session.result()
        with pytest.raises(BackendTimeoutError):
            session.add_prompt(PointPrompt(position=(14.0, 14.0, 8.0)))
        time.sleep(2.5)
        delay["s"] = 0.0
        with pytest.raises(InvalidPromptError):  # a refused call in between returns no update: the gap waits
            session.add_prompt(PointPrompt(position=(500.0, 26.0, 14.0)))
        update = session.add_prompt(PointPrompt(position=(24.0, 26.0, 14.0)))
        update.apply_to(seen)
        np.testing.assert_array_equal(seen, session.fetch_result())  # the caller's copy is whole again
        assert session.status().n_prompts == 4
        _agrees_with_server(session)
        session.undo()
        _agrees_with_server(session)


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
