"""A remote session shared by threads (a batch script's pool): calls take turns, so the local mask
and undo history stay the server's; and a session whose opening fails does not stay on the server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from test_server_fixtures import TOKENS

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BackendTimeoutError
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


def test_threads_sharing_a_session_take_turns_and_leave_it_as_the_server_has_it(
    server_factory, blob_volume, monkeypatch
):
    server = server_factory.start()
    client = SegAssistClient(server.url, TOKENS["alice"])
    real, guard, in_flight, peak = client.http.request, threading.Lock(), [0], [0]

    def counted(method, path, **kwargs):  # a slow network: calls that do not take turns overlap here
        with guard:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            time.sleep(0.05)
            return real(method, path, **kwargs)
        finally:
            with guard:
                in_flight[0] -= 1

    with client.open_session(blob_volume) as session:
        errors = []
        monkeypatch.setattr(client.http, "request", counted)

        def work(offset: int) -> None:  # each undo follows the thread's own prompt: valid in any order
            try:
                for n in range(3):
                    session.add_prompt(PointPrompt(position=(20 + offset, 16 + n, 12), positive=n != 2))
                    if n == 1:
                        session.undo()
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        monkeypatch.undo()
        assert not errors and peak[0] == 1, (errors, peak)
        assert np.array_equal(session.result(), session.fetch_result())
        assert session.local_prompts() == list(session.prompt_log().prompts)


def test_a_session_whose_opening_reply_is_lost_is_closed_on_the_server(server_factory, blob_volume, monkeypatch):
    server = server_factory.start(max_sessions_per_user=1)
    client = SegAssistClient(server.url, TOKENS["alice"])
    client.ensure_image(blob_volume)
    real = client.http.json

    def result_times_out(method, path, **kwargs):  # the network drops the replayed session's mask
        if path.endswith("/result"):
            raise BackendTimeoutError(f"no reply to GET {path} (timed out)")
        return real(method, path, **kwargs)

    monkeypatch.setattr(client.http, "json", result_times_out)
    for _ in range(2):  # the first failed open holds no place: the second gets as far, not a 429
        with pytest.raises(BackendTimeoutError):
            client.open_session(blob_volume, prompts=[PointPrompt(position=(24, 20, 12))])
    assert len(server.app.state.segassist.sessions) == 0
    monkeypatch.undo()
    client.open_session(blob_volume, prompts=[PointPrompt(position=(24, 20, 12))]).close()


def test_a_status_reply_read_before_a_prompts_reply_does_not_undo_its_state(shared_server, blob_volume, monkeypatch):
    """A UI polls status() while a prompt runs on another thread: a status reply the server sent
    before the prompt, reaching the poller after the prompt's reply was applied, set can_undo,
    can_redo and n_prompts back to before the prompt (status() alone did not take turns)."""
    client = SegAssistClient(shared_server.url, TOKENS["alice"])
    with client.open_session(blob_volume) as session:
        real = client.http.json
        answered, release = threading.Event(), threading.Event()

        def late_status(method, path, **kwargs):  # the status reply reaches its thread late
            out = real(method, path, **kwargs)
            if method == "GET" and path == session._path and not release.is_set():
                answered.set()
                release.wait(30)
            return out

        monkeypatch.setattr(client.http, "json", late_status)
        replies = []
        poller = threading.Thread(target=lambda: replies.append(session.status()))
        poller.start()
        assert answered.wait(30)  # the server answered: no prompt yet
        t0 = time.monotonic()
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))  # does not wait for the poll
        assert time.monotonic() - t0 < 20
        release.set()
        poller.join(30)
        assert session.can_undo and not session.can_redo and session.info.n_prompts == 1
        assert replies[0].state == "idle" and replies[0].n_prompts == 1  # the queue state, with the later undo state
        monkeypatch.undo()
        fresh = session.status()
        assert fresh.can_undo and fresh.n_prompts == 1
    client.close()
