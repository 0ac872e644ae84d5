"""Floods one user can send: prompt work before the cheap checks, large JSON bodies parsed all at once.

A create naming no held image, or a prompt to no session, is answered 404 with no prompt checked; a
create's replayed prompts are checked on the few threads added prompts are checked on; JSON bodies
over 1 MiB are parsed a few at a time; the default JSON limit admits the largest prompt.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Tuple

import pytest
from test_server_api import _slab_log
from test_server_fixtures import TOKENS, assert_error, raw

from SegAssistLib.server.limits import LARGE_JSON_BYTES, BodyLimitMiddleware, ParseSlots
from SegAssistLib.server.settings import Limits

pytest_plugins = ["test_server_fixtures"]

NO_IMAGE = "0" * 64
NO_SESSION = "0" * 32


def _count_slab_checks(monkeypatch, delay: float = 0.0) -> dict:
    """Patches slab decoding (off the engine's threads) to count its calls and the most at once."""
    from SegAssistLib import prompts

    unpack, lock, seen = prompts._unpack_bits, threading.Lock(), {"calls": 0, "running": 0, "most": 0}

    def counted(*args, **kwargs):
        if threading.current_thread().name.startswith("segassist-infer"):
            return unpack(*args, **kwargs)
        with lock:
            seen["calls"] += 1
            seen["running"] += 1
            seen["most"] = max(seen["most"], seen["running"])
        time.sleep(delay)
        with lock:
            seen["running"] -= 1
        return unpack(*args, **kwargs)

    monkeypatch.setattr(prompts, "_unpack_bits", counted)
    return seen


def test_unknown_image_or_session_is_refused_before_any_prompt_is_checked(shared_server, blob_volume, monkeypatch):
    """40 creates naming no image, 150 slabs each, held every pool thread checking slabs (another
    user's prompt waited 47 s): the image and the session are looked up first."""
    slabs = _slab_log(blob_volume)  # made (and checked) here first
    seen = _count_slab_checks(monkeypatch)
    reply = raw(shared_server, "POST", "/v1/sessions", json={"image_id": NO_IMAGE, "prompts": slabs * 20})
    assert_error(reply, 404, "image_not_found")
    reply = raw(shared_server, "POST", f"/v1/sessions/{NO_SESSION}/prompts", json={"prompt": slabs[0]})
    assert_error(reply, 404, "session_not_found")
    assert seen["calls"] == 0


def test_replayed_prompts_are_checked_a_few_at_a_time(shared_server, alice, blob_volume, monkeypatch):
    from SegAssistLib.server.routes_sessions import PROMPT_CHECK_THREADS

    image_id = alice.ensure_image(blob_volume)
    body = {"image_id": image_id, "prompts": _slab_log(blob_volume)}
    seen = _count_slab_checks(monkeypatch, delay=0.05)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: raw(shared_server, "POST", "/v1/sessions", json=body), range(6)))
    try:
        assert all(r.status_code == 201 for r in replies), [r.text for r in replies]
        assert seen["calls"] >= 6 * 3
        assert seen["most"] <= PROMPT_CHECK_THREADS
    finally:
        for r in replies:
            if r.status_code == 201:
                raw(shared_server, "DELETE", f"/v1/sessions/{r.json()['session_id']}")


def test_the_default_json_limit_admits_the_largest_prompt_and_refuses_just_above_it():
    import numpy as np

    from SegAssistLib.prompts import LassoPrompt, Slab, dumps_prompt

    limit = Limits().max_json_bytes
    assert limit <= 16 * 1024**2  # was 32 MiB: parsed, up to 25 times that in Python objects
    worst = np.random.default_rng(0).random((1, 4096, 4096)) < 0.5  # incompressible: the largest slab
    assert 4 * len(dumps_prompt(LassoPrompt(slab=Slab.from_mask(worst)))) < limit


@pytest.fixture(scope="module")
def default_server(server_checkpoint):
    from test_server_fixtures import Servers

    servers = Servers(server_checkpoint)
    yield servers.start()  # the default limits
    servers.stop_all()


def test_a_body_just_over_the_default_json_limit_is_refused(default_server):
    limit = Limits().max_json_bytes
    conn = http.client.HTTPConnection(default_server.host, default_server.port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/sessions")
        conn.putheader("Authorization", f"Bearer {TOKENS['alice']}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(limit + 1))
        conn.endheaders()  # no body: it is refused from its declared length
        reply = conn.getresponse()
        assert reply.status == 413
        assert b"body_too_large" in reply.read()
    finally:
        conn.close()


def _chunked_json_request(server, path: str, body: bytes) -> Tuple[int, Dict[bytes, bytes], dict]:
    """POST ``body`` as one chunk with no Content-Length and no final chunk (a body over the limit is
    refused once it has arrived, so nothing the server leaves unread resets the connection); returns
    the reply's status, headers (lowercase names) and JSON body."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKENS['alice']}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(head + f"{len(body):x}\r\n".encode() + body + b"\r\n")
        data = b""
        while True:
            got = sock.recv(65536)
            assert got, f"the server closed the connection without a full reply: {data!r}"
            data += got
            top, sep, rest = data.partition(b"\r\n\r\n")
            if not sep:
                continue
            lines = top.split(b"\r\n")
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
            if len(rest) >= int(headers[b"content-length"]):
                return int(lines[0].split()[1]), headers, json.loads(rest[: int(headers[b"content-length"])])


def test_a_chunked_json_body_over_the_limit_is_refused_as_a_declared_one_is(shared_server):
    """A JSON body of no declared length is read whole before it is parsed; the limit's refusal was
    raised there, outside the app's error handling: a 500 internal_error and a traceback in the log."""
    limit = 512_000  # the shared server's max_json_bytes
    body = b'{"image_id": "' + NO_IMAGE.encode() + b'", "prompts": []' + b" " * limit + b"}"
    status, headers, reply = _chunked_json_request(shared_server, "/v1/sessions", body)
    assert (status, reply["error"]["code"]) == (413, "body_too_large"), reply
    assert reply["error"]["details"] == {"limit": limit}
    assert headers[b"connection"] == b"close"  # as the refusal by Content-Length: the rest stays unread
    conn = http.client.HTTPConnection(shared_server.host, shared_server.port, timeout=30)
    try:  # the same body with its length declared (and not sent: it is refused by that length)
        conn.putrequest("POST", "/v1/sessions")
        conn.putheader("Authorization", f"Bearer {TOKENS['alice']}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        declared = conn.getresponse()
        assert declared.status == 413 and declared.getheader("Connection") == "close"
        assert json.loads(declared.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()


def test_large_json_bodies_are_parsed_a_few_at_a_time_on_a_real_server(default_server):
    """32 MB of [{},{},...] took 850 MB and a second of the event loop; four at once 3.8 GB."""
    state = default_server.app.state.segassist
    prompts = "[" + ",".join(["{}"] * (LARGE_JSON_BYTES // 2)) + "]"
    body = ('{"image_id": "' + NO_IMAGE + '", "prompts": ' + prompts + "}").encode()
    assert len(body) > LARGE_JSON_BYTES
    headers = {"Content-Type": "application/json"}
    with ThreadPoolExecutor(6) as pool:
        replies = list(
            pool.map(lambda _: raw(default_server, "POST", "/v1/sessions", data=body, headers=headers), range(6))
        )
    assert all(r.status_code == 409 for r in replies), [r.text[:200] for r in replies]  # above the prompt limit
    slots = state.json_parses
    assert 1 <= slots.peak <= slots.size
    assert slots.active == 0 and slots.waiting == 0


def test_the_body_limit_middleware_lets_a_few_large_bodies_through_at_once():
    """Deterministic: an app that holds every request it is handed; only ParseSlots.size get in."""

    async def scenario() -> None:
        slots = ParseSlots(2)
        inside, gate = [], asyncio.Event()

        async def app(scope, receive, send):
            message = await receive()
            inside.append(len(message["body"]))
            await gate.wait()
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        middleware = BodyLimitMiddleware(app, lambda path: 10 * LARGE_JSON_BYTES, lambda path: slots)
        size = 2 * LARGE_JSON_BYTES

        async def request(declared: bool) -> None:
            headers = [(b"content-length", str(size).encode())] if declared else []
            scope = {"type": "http", "method": "POST", "path": "/v1/sessions", "headers": headers}
            chunks = [{"type": "http.request", "body": b"x" * (size // 2), "more_body": True},
                      {"type": "http.request", "body": b"x" * (size // 2), "more_body": False}]  # fmt: skip

            async def receive():
                return chunks.pop(0) if chunks else {"type": "http.disconnect"}

            async def send(message):
                pass

            await middleware(scope, receive, send)

        tasks = [asyncio.ensure_future(request(declared=n % 2 == 0)) for n in range(5)]
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(inside) == 2 and inside == [size, size]  # the whole body, in one message
        assert slots.active == 2 and slots.waiting == 3
        gate.set()
        await asyncio.gather(*tasks)
        assert len(inside) == 5 and slots.peak == 2 and slots.active == 0

    asyncio.run(scenario())
