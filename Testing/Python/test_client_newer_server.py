"""A client talks to a newer server of the same API version: replies that carry fields this client
does not know (additive changes) are read, not refused. The Slicer side is updated less often than a
shared GPU server, so this is the common case. A real server on loopback behind a real HTTP proxy
that adds unknown fields to every JSON reply object (not to the arrays' encoding, which a reader must
understand whole); requests stay strict."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS, assert_error, make_volume, raw

from SegAssistLib.api_learning import CaseInfo, ImportCase
from SegAssistLib.api_models import ArrayPayload, CreateSession, ReplyModel
from SegAssistLib.client import InvalidPromptError, SegAssistClient
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]

ADDED = "added_by_a_newer_server"


def _with_added_fields(value: Any) -> Any:
    if isinstance(value, list):
        return [_with_added_fields(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _with_added_fields(v) for k, v in value.items()}
    if not {"codec", "data"} <= set(value):  # an array payload keeps its exact form
        out[ADDED] = {"note": "a field this client has never heard of"}
    return out


class _NewerServerProxy:
    """Forwards every request to ``upstream``; JSON replies come back with :data:`ADDED` fields."""

    def __init__(self, upstream: str):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                reply = requests.request(self.command, upstream + self.path, data=body, headers=headers, timeout=60)
                content = reply.content
                if reply.headers.get("content-type", "").startswith("application/json") and content:
                    content = json.dumps(_with_added_fields(reply.json())).encode()
                    outer.rewritten += 1
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _forward

        self.rewritten = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def newer_server(shared_server) -> Iterator[_NewerServerProxy]:
    proxy = _NewerServerProxy(shared_server.url)
    yield proxy
    proxy.close()


def test_a_session_runs_against_a_server_whose_replies_carry_unknown_fields(newer_server, blob_volume):
    assert ADDED in requests.get(newer_server.url + "/v1/health", timeout=10).json()  # the proxy does add them
    with SegAssistClient(newer_server.url, TOKENS["alice"], timeout=(5.0, 60.0)) as client:
        assert client.health().status == "ok"
        info = client.info()
        assert info.limits.max_voxels > 0 and info.model.name
        with client.open_session(blob_volume) as session:
            update = session.add_prompt(PointPrompt(position=(24, 20, 12)))
            assert update is not None
            mask = session.result()
            assert mask.shape == blob_volume.array.shape and mask.sum() > 0
            session.undo()
            assert session.status().n_prompts == 1 and not np.any(session.result())
            with pytest.raises(InvalidPromptError) as error:  # an error reply with unknown fields: still typed
                session.add_prompt(PointPrompt(position=(100, 1, 1)))
            assert error.value.code == "prompt_outside_image"
    assert newer_server.rewritten >= 6


def test_requests_and_array_payloads_stay_strict(shared_server):
    """What a server or a decoder must understand whole refuses fields it does not know."""
    with pytest.raises(ValueError, match="Extra inputs"):
        CreateSession.model_validate({"image_id": "0" * 64, ADDED: 1})
    with pytest.raises(ValueError, match="Extra inputs"):
        ImportCase.model_validate({"image_id": "0" * 64, "name": "case", ADDED: 1})
    payload = ArrayPayload.from_array(np.ones((2, 3, 4), np.uint8)).model_dump()
    with pytest.raises(ValueError, match="Extra inputs"):
        ArrayPayload.model_validate({**payload, ADDED: 1})
    reply = raw(shared_server, "POST", "/v1/sessions", json={"image_id": "0" * 64, ADDED: 1})
    assert ADDED in assert_error(reply, 422, "invalid_request")["message"]
    case = {"id": "c1", "name": "case", "status": "new", "shape": [1, 2, 3], "spacing": [1, 1, 1],
            "image_sha256": "0" * 64, "content_hash": "1" * 64, "source": "upload", "imported_at": 0.0,
            "imported_by": "alice", "n_labels": 0}  # fmt: skip
    assert CaseInfo.model_validate({**case, ADDED: {"x": 1}}).id == "c1"  # a learning reply reads too


class OldLabelInfo(ReplyModel):
    """``LabelInfo`` of a client from before unknown counts (a count and a time were always numbers)."""

    id: str
    case_id: str
    version: int
    user: str
    created_at: float
    created_at_iso: Optional[str] = None
    sha256: str
    model: Optional[str] = None
    adapter_version: Optional[str] = None
    n_interactions: int
    seconds_spent: float
    submitted: bool
    n_foreground: int
    has_prompt_log: bool


def test_an_older_client_reads_a_label_saved_without_a_count(server_factory, tmp_path: Path):
    """A newer server records a mask saved without a count as unknown (null). An older client, whose
    LabelInfo wants a number, failed on the reply to a save that had succeeded (a save again made a second
    version) and on every later listing of the case's labels. Null goes only to a client that asks
    (``?unknown=null``, as this one does); any other reads 0, as from the server it knew."""
    server = server_factory.start(learn_store=tmp_path / "store", max_json_bytes=2_000_000)
    volume = make_volume(shape=(12, 16, 16))
    mask = (volume.array > 100).astype(np.uint8)
    with SegAssistClient(server.url, TOKENS["alice"], timeout=(5.0, 120.0)) as alice:
        case = alice.learning.import_image(volume, name="case")
        path = f"/v1/learn/cases/{case.id}/labels"
        payload = ArrayPayload.from_array(mask).model_dump()
        # what the older client's save_mask sent: its default time 0.0, no count
        old_body = {"mask": payload, "submit": True, "seconds_spent": 0.0, "n_interactions": None}
        reply = raw(server, "POST", path, json=old_body)
        assert reply.status_code == 201, reply.text
        saved = OldLabelInfo.model_validate(reply.json())
        assert (saved.n_interactions, saved.seconds_spent, saved.version) == (0, 0.0, 1)

        alice.learning.lock(case.id)
        new = alice.learning.save_mask(case.id, mask, submit=False)  # this client: unknown reads None
        assert (new.n_interactions, new.seconds_spent) == (None, None)
        assert [(v.n_interactions, v.seconds_spent) for v in alice.learning.labels(case.id)] == [
            (None, 0.0),  # the older client sent its time, 0.0: recorded as given
            (None, None),
        ]
        listed = raw(server, "GET", path)
        assert listed.status_code == 200, listed.text
        old_view = [OldLabelInfo.model_validate(v) for v in listed.json()]
        assert [(v.n_interactions, v.seconds_spent) for v in old_view] == [(0, 0.0), (0, 0.0)]
        asked = raw(server, "GET", path, params={"unknown": "null"}).json()
        assert [(v["n_interactions"], v["seconds_spent"]) for v in asked] == [(None, 0.0), (None, None)]
        assert raw(server, "GET", path, params={"unknown": "maybe"}).status_code == 422
