"""A client talks to a newer server of the same API version: replies that carry fields this client
does not know (additive changes) are read, not refused. The Slicer side is updated less often than a
shared GPU server, so this is the common case. A real server on loopback behind a real HTTP proxy
that adds unknown fields to every JSON reply object (not to the arrays' encoding, which a reader must
understand whole); requests stay strict."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS, assert_error, raw

from SegAssistLib.api_learning import CaseInfo, ImportCase
from SegAssistLib.api_models import ArrayPayload, CreateSession
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
