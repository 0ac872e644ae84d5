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


def test_threads_sharing_a_session_take_turns_and_leave_it_as_the_server_has_it(server_factory, blob_volume,
                                                                               monkeypatch):
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
