"""The model version a long-lived client reports: the server swaps in a promoted adapter (or rolls
one back) while clients stay connected, and the version is what a mask's provenance records."""

from __future__ import annotations

import dataclasses

from test_server_fixtures import TOKENS

from SegAssistLib.client import SegAssistClient
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]


def test_capabilities_follow_the_servers_model_and_no_prompt_asks_for_them(server_factory, blob_volume, monkeypatch):
    server = server_factory.start()
    client = SegAssistClient(server.url, TOKENS["alice"])
    before = client.capabilities()
    worker = server.app.state.segassist.pool.workers[0]
    # what promoting an adapter (or a rollback) does on the server: the worker answers with another version
    worker.capabilities = dataclasses.replace(worker.capabilities, version=before.version + "+adapter-3")
    with SegAssistClient(server.url, TOKENS["alice"]) as another:
        assert another.info().model.version == before.version + "+adapter-3"
    after = client.capabilities()  # was cached forever: the version the server no longer runs
    assert after.version == before.version + "+adapter-3"
    assert dataclasses.replace(after, version=before.version) == before

    paths = []
    real = client.http.request

    def seen(method, path, **kwargs):
        paths.append(path)
        return real(method, path, **kwargs)

    monkeypatch.setattr(client.http, "request", seen)
    with client.open_session(blob_volume) as session:
        update = session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        session.add_prompt(PointPrompt(position=(26.0, 20.0, 12.0)))
        session.undo()
        # each reply names the version that made the mask: the session's info follows it
        assert update.info["model_version"] and session.info.model_version == update.info["model_version"]
    assert paths and not any(path.endswith("/info") for path in paths)  # nothing per prompt
    client.close()
