"""Every error the client raises is a ClientError, whatever answers in the server's place.

A tiny HTTP server in a thread answers every request with a 2xx whose JSON is not what the API
promises (``{}``, ``[]``, ``null``, a string, not JSON at all), or redirects to itself forever: each
call of the client and of its learning and session parts raises :class:`ProtocolError` with one line
naming the route, never pydantic's ValidationError, a TypeError or requests' TooManyRedirects.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import requests
from http_fakes import QuietHandler, serving

from SegAssistLib.api_models import SessionInfo
from SegAssistLib.client import SegAssistClient
from SegAssistLib.client import http as client_http
from SegAssistLib.client.errors import BackendUnavailableError, ClientError, ProtocolError
from SegAssistLib.client.session import RemoteSession
from SegAssistLib.prompts import PointPrompt

IMAGE_ID = "a" * 64
SESSION_ID = "b" * 32
CASE_ID = "c" * 16

BODIES: Dict[str, bytes] = {
    "object": b"{}",
    "list": b"[]",
    "null": b"null",
    "string": b'"x"',
    "not JSON": b"<html>hello</html>",
}


class _Fake(QuietHandler):
    mode: Dict[str, Any] = {}

    def _answer(self) -> None:
        self.read_body()
        if self.mode["body"] == "redirect":  # to itself, forever
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_json(BODIES[self.mode["body"]], self.mode.get("status", 200))

    do_GET = do_POST = do_DELETE = _answer


@pytest.fixture(scope="module")
def fake() -> Iterator[Tuple[str, Dict[str, Any]]]:
    mode: Dict[str, Any] = {"body": "object"}
    with serving(type("Handler", (_Fake,), {"mode": mode})) as url:
        yield url, mode


def _session(client: SegAssistClient) -> RemoteSession:
    info = SessionInfo(
        session_id=SESSION_ID, image_id=IMAGE_ID, shape=(4, 5, 6), device="cpu", n_prompts=0, can_undo=False,
        can_redo=False, state="idle", queue_length=0, idle_timeout_s=60.0, expires_in_s=60.0,
    )  # fmt: skip
    return RemoteSession(client, info, None, [])


#: (name, call, the route its error names)
CALLS: List[Tuple[str, Callable[[SegAssistClient], Any], str]] = [
    ("health", lambda c: c.health(), "/v1/health"),
    ("info", lambda c: c.info(refresh=True), "/v1/info"),
    ("image", lambda c: c.image(IMAGE_ID), f"/v1/images/{IMAGE_ID}"),
    ("attach to a session", lambda c: c.session(SESSION_ID), f"/v1/sessions/{SESSION_ID}"),
    ("open a session", lambda c: c.open_session(IMAGE_ID), "/v1/sessions"),
    ("session status", lambda c: _session(c).status(), f"/v1/sessions/{SESSION_ID}"),
    ("session result", lambda c: _session(c).fetch_result(), f"/v1/sessions/{SESSION_ID}/result"),
    ("session prompt log", lambda c: _session(c).prompt_log(), f"/v1/sessions/{SESSION_ID}/prompt-log"),
    ("add a prompt", lambda c: _session(c).add_prompt(PointPrompt(position=(1, 1, 1))), "prompts"),
    ("learning status", lambda c: c.learning.status(), "/v1/learn/status"),
    ("cases", lambda c: c.learning.cases(), "/v1/learn/cases"),
    ("case", lambda c: c.learning.case(CASE_ID), f"/v1/learn/cases/{CASE_ID}"),
    ("case image", lambda c: c.learning.case_volume(CASE_ID), f"/v1/learn/cases/{CASE_ID}/image"),
    ("lock", lambda c: c.learning.lock(CASE_ID), f"/v1/learn/cases/{CASE_ID}/lock"),
    ("labels", lambda c: c.learning.labels(CASE_ID), f"/v1/learn/cases/{CASE_ID}/labels"),
    ("save a mask", lambda c: c.learning.save_mask(CASE_ID, np.zeros((2, 2, 2), np.uint8)), "/labels"),
    ("review", lambda c: c.learning.review(CASE_ID, True), f"/v1/learn/cases/{CASE_ID}/review"),
    ("train", lambda c: c.learning.train(), "/v1/learn/train"),
    ("jobs", lambda c: c.learning.jobs(), "/v1/learn/jobs"),
    ("job", lambda c: c.learning.job("20240101-000000-abcdef"), "/v1/learn/jobs/20240101-000000-abcdef"),
    ("versions", lambda c: c.learning.versions(), "/v1/learn/versions"),
    ("rollback", lambda c: c.learning.rollback(), "/v1/learn/rollback"),
    ("next case", lambda c: c.learning.next_case(), "/v1/learn/next"),
]
#: calls whose reply may rightly be an empty list, or an empty object (a log of no prompts: every field has a default)
LISTS = {"cases", "labels", "jobs"}
OBJECTS = {"session prompt log"}


@pytest.mark.parametrize("body", list(BODIES))
def test_a_reply_that_is_not_what_the_api_promises_is_a_protocol_error(fake, body):
    url, mode = fake
    mode["body"] = body
    with SegAssistClient(url, "token-0123456789abcdef", retries=0, timeout=(5.0, 10.0)) as client:
        for name, call, route in CALLS:
            if body == "list" and name in LISTS:
                assert call(client) == [], name
                continue
            if body == "object" and name in OBJECTS:
                assert call(client).prompts == [], name
                continue
            with pytest.raises(ClientError) as caught:
                call(client)
            error = caught.value
            assert isinstance(error, ProtocolError), (name, type(error), error)
            assert route in str(error) and "\n" not in str(error), (name, str(error))


def test_a_redirect_loop_is_a_protocol_error(fake):
    url, mode = fake
    mode["body"] = "redirect"
    with SegAssistClient(url, "token-0123456789abcdef", retries=0, timeout=(5.0, 10.0)) as client:
        for name, call, _ in CALLS:
            with pytest.raises(ProtocolError, match="redirects") as caught:
                call(client)
            assert url in str(caught.value), name


def test_any_other_failure_of_requests_is_a_client_error(fake, monkeypatch):
    url, mode = fake
    mode["body"] = "object"

    def broken(self, *args: Any, **kwargs: Any) -> None:
        raise requests.exceptions.InvalidHeader("a header value requests refuses")

    monkeypatch.setattr(client_http._Session, "request", broken)
    client = SegAssistClient(url, "token-0123456789abcdef", retries=0)
    with client, pytest.raises(BackendUnavailableError, match="requests refuses") as caught:
        client.info(refresh=True)
    assert f"{url}/v1/info" in str(caught.value)
