"""A session opened with a prompt log replays it between the other sessions' jobs, not as one job.

A real server on loopback with the real built-in engine (tiny network), one inference worker; the
engine is wrapped so that each prompt takes a little longer and is counted, with the image it was
applied to. Nothing is timed against a threshold: the tests look at how many replayed prompts had
run when another session's click was answered.
"""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Tuple

import pytest
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.client import SegAssistClient
from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.errors import PromptError

pytest_plugins = ["test_server_fixtures"]

REPLAY_SHAPE = (20, 40, 48)  # the replayed session's image; the other session's is make_volume's default
N_REPLAYED = 24
#: a point the wrapped engine refuses when it is applied (it passes the server's own checks)
REFUSED_AT = (9.0, 9.0, 9.0)


class _CountingEngine(Engine):
    """The real engine; each prompt, also one an open replays, sleeps ``delay`` seconds more and is
    recorded with its image's shape once applied. An open replays its prompts through the same
    wrapped ``add_prompt`` as the built-in engine's ``open_session(volume, prompts)`` does, so the
    count is the same whichever way the server replays."""

    def __init__(self, engine: Engine, delay: float) -> None:
        self.engine, self.delay = engine, delay
        self.applied: List[Tuple[int, ...]] = []
        self.closed: List[Tuple[int, ...]] = []

    def capabilities(self):
        return self.engine.capabilities()

    def open_session(self, volume, prompts=None) -> EngineSession:
        session = self.engine.open_session(volume)
        shape = tuple(volume.array.shape)
        add_prompt, close = session.add_prompt, session.close

        def counted_add_prompt(prompt):
            time.sleep(self.delay)
            if tuple(getattr(prompt, "position", ())) == REFUSED_AT:
                raise PromptError("refused by the test's engine")
            update = add_prompt(prompt)
            self.applied.append(shape)
            return update

        def counted_close():
            self.closed.append(shape)
            close()

        session.add_prompt = counted_add_prompt  # type: ignore[method-assign]
        session.close = counted_close  # type: ignore[method-assign]
        for prompt in prompts or []:
            session.add_prompt(prompt)
        return session


@pytest.fixture
def counting_server(server_factory):
    engines: List[_CountingEngine] = []

    def factory(device: str) -> Engine:
        from SegAssistLib.engine.builtin import load_default_engine

        engines.append(_CountingEngine(load_default_engine(server_factory.checkpoint, device=device), 0.05))
        return engines[-1]

    server = server_factory.start(engine_factory=factory, max_sessions_per_user=1)
    assert len(engines) == 1  # one device, one worker: every job of every session queues on it
    return server, engines[0]


def _points(count: int) -> List[dict]:
    """Points inside the replayed image, mostly positive."""
    return [
        {"kind": "point", "position": [10.0 + n % 25, 12.0 + n % 15, 4.0 + n % 12], "positive": n % 3 != 1}
        for n in range(count)
    ]


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_long_replay_lets_another_sessions_click_through(counting_server):
    server, engine = counting_server
    replayed = make_volume(shape=REPLAY_SHAPE, seed=7)
    with SegAssistClient(server.url, TOKENS["alice"]) as alice, SegAssistClient(server.url, TOKENS["bob"]) as bob:
        replay_image = alice.upload_image(replayed).image_id
        bobs = bob.open_session(make_volume(seed=8))
        body = {"image_id": replay_image, "prompts": _points(N_REPLAYED)}
        replies: List[Optional[object]] = [None, None]

        def open_with_log(n: int) -> None:  # twice, under one request id: a retry of a lost reply
            replies[n] = raw(server, "POST", "/v1/sessions", json=body, headers={"X-SegAssist-Request-Id": "replay-1"})

        opening = [threading.Thread(target=open_with_log, args=(n,)) for n in range(2)]
        opening[0].start()
        _wait_for(lambda: engine.applied.count(REPLAY_SHAPE) >= 1)  # the replay runs
        opening[1].start()

        update = bobs.add_prompt({"kind": "point", "position": [24.0, 20.0, 12.0]})
        replayed_by_then = engine.applied.count(REPLAY_SHAPE)
        assert update.voxels.size > 0 and bobs.status().n_prompts == 1
        # answered between the replay's jobs: most of the log was still to come (the old server ran
        # the whole replay as one job, and the click waited for all of it)
        assert replayed_by_then < N_REPLAYED - 5, replayed_by_then

        for thread in opening:
            thread.join(120)
        first, again = replies
        assert first.status_code == 201, first.text  # type: ignore[union-attr]
        assert again.status_code == 201, again.text  # type: ignore[union-attr]
        info = first.json()  # type: ignore[union-attr]
        assert again.json()["session_id"] == info["session_id"]  # type: ignore[union-attr]  # one session
        assert info["n_prompts"] == N_REPLAYED and info["can_undo"] and not info["can_redo"]
        assert engine.applied.count(REPLAY_SHAPE) == N_REPLAYED  # each prompt once

        # the same session as the engine's own replay makes: every prompt in the log, one undo step each
        session = alice.session(info["session_id"])
        assert len(session.prompt_log().prompts) == N_REPLAYED
        session.undo()
        assert session.status().n_prompts == N_REPLAYED and len(session.prompt_log().prompts) == N_REPLAYED - 1
        session.close()
        bobs.close()


def test_a_replay_that_fails_part_way_opens_nothing(counting_server):
    server, engine = counting_server
    volume = make_volume(shape=REPLAY_SHAPE, seed=9)
    with SegAssistClient(server.url, TOKENS["alice"]) as alice:
        image_id = alice.upload_image(volume).image_id
        prompts = _points(6)
        prompts[4] = {"kind": "point", "position": list(REFUSED_AT)}
        reply = raw(server, "POST", "/v1/sessions", json={"image_id": image_id, "prompts": prompts})
        error = assert_error(reply, 422, "invalid_prompt")
        assert "refused by the test's engine" in error["message"]
        assert engine.applied.count(REPLAY_SHAPE) == 4
        _wait_for(lambda: engine.closed.count(REPLAY_SHAPE) == 1, 10.0)  # its memory is given back
        assert server.app.state.segassist.sessions.all() == []
        # the user's one session place was given back too
        with alice.open_session(image_id, [prompts[0]]) as session:
            assert session.status().n_prompts == 1
