"""The client when the reply is not the server's: a reverse proxy's error page or timeout, a reply
damaged on the way; credentials from ~/.netrc; ids that would leave their place in the URL.

Real servers on loopback (the real app, the real engine on a tiny network); in front of them, where a
test needs one, a small real reverse proxy (threaded ``http.server``) that forwards every request and
can answer its own error page after the server did the request, or cut the server's reply short.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import requests
from test_server_fixtures import TOKENS, make_volume

from SegAssistLib.client import SegAssistClient
from SegAssistLib.client.errors import BadRequestError, ProtocolError, ServerReplyError, SessionNotFoundError
from SegAssistLib.client.http import HttpClient, path_id
from SegAssistLib.engine.base import Engine, EngineSession
from SegAssistLib.prompts import PointPrompt

pytest_plugins = ["test_server_fixtures"]

_GATEWAY_PAGE = b"<html><head><title>%d</title></head><body><center>nginx</center></body></html>"
_MUTATIONS = ("/prompts", "/undo", "/redo", "/reset")


class _Gateway:
    """A reverse proxy (what nginx is in front of a server). It forwards every request with its headers
    (the request id too); ``pages``: statuses it answers with its own HTML page instead of the server's
    reply to the next mutating requests, *after* the server did them; ``mangle``: rewrites the body
    of the 2xx replies to mutating requests; a server slower than ``read_timeout`` gets a 504 (and
    ``timed_out`` is set)."""

    def __init__(self, backend: str, read_timeout: float = 60.0) -> None:
        self.backend = backend
        self.read_timeout = read_timeout
        self.pages: List[int] = []
        self.mangle: Optional[Callable[[bytes], bytes]] = None
        self.mutations = 0
        self.timed_out = threading.Event()  # set once it answered a 504
        self._upstream = requests.Session()
        self._upstream.trust_env = False
        self._lock = threading.Lock()
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def forward(self) -> None:
                gateway._forward(self)

            do_GET = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        n = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(n) if n else None
        skip = ("host", "content-length", "connection", "accept-encoding")
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in skip}
        mutation = handler.command == "POST" and handler.path.endswith(_MUTATIONS)
        if mutation:
            with self._lock:
                self.mutations += 1
        try:
            reply = self._upstream.request(
                handler.command, self.backend + handler.path, data=body, headers=headers,
                timeout=(5.0, self.read_timeout),
            )  # fmt: skip
        except requests.exceptions.ReadTimeout:
            self._answer(handler, 504, _GATEWAY_PAGE % 504, "text/html")
            self.timed_out.set()
            return
        status, content = reply.status_code, reply.content
        if mutation:
            with self._lock:
                page = self.pages.pop(0) if self.pages else None
                mangle = self.mangle
            if page is not None:
                self._answer(handler, page, _GATEWAY_PAGE % page, "text/html")
                return
            if mangle is not None and status < 300:
                content = mangle(content)
        self._answer(handler, status, content, reply.headers.get("Content-Type", ""))

    @staticmethod
    def _answer(handler: BaseHTTPRequestHandler, status: int, content: bytes, content_type: str) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._upstream.close()


@pytest.fixture
def gateway(shared_server):
    g = _Gateway(shared_server.url)
    yield g
    g.close()


def _agrees_with_server(session) -> None:
    np.testing.assert_array_equal(session.result(), session.fetch_result())
    assert [p.model_dump() for p in session.local_prompts()] == [p.model_dump() for p in session.prompt_log().prompts]


# ---- 1. a gateway's error or a damaged reply after the server did the request ------------------------------


@pytest.mark.parametrize("status", [502, 503, 504])
def test_a_gateways_error_page_after_the_server_applied_a_prompt_is_asked_again_under_its_id(gateway, status):
    with SegAssistClient(gateway.url, TOKENS["alice"]) as client, client.open_session(make_volume()) as session:
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))

        # the server applied the prompt, the proxy answered its own page: asked again under the same
        # id, the server answers from its record of the first (not a second prompt)
        gateway.pages = [status]
        session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        assert not gateway.pages and gateway.mutations == 3
        assert session.status().n_prompts == 2
        _agrees_with_server(session)

        # every answer a gateway's page: the call fails with its outcome open, and the next call
        # takes the server's state and reports what changed meanwhile with its own change
        seen = session.result()
        gateway.pages = [status] * 10
        with pytest.raises(ServerReplyError) as exc:
            session.add_prompt(PointPrompt(position=(14.0, 14.0, 8.0)))
        assert exc.value.status == status and exc.value.outcome_unknown
        gateway.pages = []
        assert session.status().n_prompts == 3  # the server did apply it
        update = session.add_prompt(PointPrompt(position=(24.0, 26.0, 14.0)))
        update.apply_to(seen)
        np.testing.assert_array_equal(seen, session.fetch_result())
        assert session.status().n_prompts == 4
        _agrees_with_server(session)
        session.undo()  # on the history the server has: the prompt of the failed call is in it
        assert len(session.local_prompts()) == 3
        _agrees_with_server(session)


class _HeldEngine(Engine):
    """The real engine whose prompts, once computed, are held until ``hold["until"]`` (an event) is set:
    a server still working when the gateway in front of it gives up."""

    def __init__(self, engine: Engine, hold: Dict[str, Optional[threading.Event]]) -> None:
        self.engine, self.hold = engine, hold

    def capabilities(self):
        return self.engine.capabilities()

    def open_session(self, volume, prompts=None) -> EngineSession:
        session = self.engine.open_session(volume, prompts)
        add_prompt, hold = session.add_prompt, self.hold

        def held_add_prompt(prompt):
            update = add_prompt(prompt)
            until = hold["until"]
            if until is not None:
                until.wait(60.0)
            return update

        session.add_prompt = held_add_prompt  # type: ignore[method-assign]
        return session


def test_a_gateway_timeout_while_the_server_works_is_answered_by_the_repeat(server_factory):
    """nginx's proxy_read_timeout shorter than a prompt: a 504 page, while the server goes on. The
    repeat under the same id waits for the first's outcome instead of adding the prompt twice."""
    from SegAssistLib.engine.builtin import load_default_engine

    hold: Dict[str, Optional[threading.Event]] = {"until": None}

    def factory(device: str) -> Engine:
        return _HeldEngine(load_default_engine(server_factory.checkpoint, device=device), hold)

    server = server_factory.start(engine_factory=factory)
    proxy = _Gateway(server.url, read_timeout=3.0)
    try:
        with SegAssistClient(proxy.url, TOKENS["alice"]) as client, client.open_session(make_volume()) as session:
            session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            # the prompt is done on the server only once the gateway has answered 504 (timing-proof
            # on a loaded machine); its repeat then gets the first's answer within the gateway's time
            hold["until"] = proxy.timed_out
            session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
            hold["until"] = None
            assert proxy.timed_out.is_set() and proxy.mutations == 3
            assert session.status().n_prompts == 2
            _agrees_with_server(session)
    finally:
        proxy.close()


def _cut_in_half(content: bytes) -> bytes:
    return content[: len(content) // 2]


def _box_outside_the_image(content: bytes) -> bytes:
    reply = json.loads(content)
    assert reply["mask"] is not None, "the prompt changed nothing: no box to move"
    reply["offset"] = [1000, 0, 0]
    return json.dumps(reply).encode()


@pytest.mark.parametrize("mangle", [_cut_in_half, _box_outside_the_image], ids=["truncated", "box_outside"])
def test_a_reply_damaged_on_the_way_leaves_the_session_to_resync(gateway, mangle):
    with SegAssistClient(gateway.url, TOKENS["alice"]) as client, client.open_session(make_volume()) as session:
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        seen = session.result()
        gateway.mangle = mangle
        with pytest.raises(ProtocolError) as exc:
            session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        gateway.mangle = None
        assert exc.value.outcome_unknown  # a 2xx came: the server did it
        assert session.status().n_prompts == 2
        # the next call takes the server's mask and prompts first; its update covers the missed change
        update = session.add_prompt(PointPrompt(position=(14.0, 14.0, 8.0)))
        update.apply_to(seen)
        np.testing.assert_array_equal(seen, session.fetch_result())
        _agrees_with_server(session)
        session.undo()
        assert len(session.local_prompts()) == 2
        _agrees_with_server(session)


def test_recover_after_a_damaged_reply_replays_the_servers_prompts(gateway):
    with SegAssistClient(gateway.url, TOKENS["alice"]) as client, client.open_session(make_volume()) as session:
        session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
        gateway.mangle = _cut_in_half
        with pytest.raises(ProtocolError):
            session.add_prompt(PointPrompt(position=(30.0, 22.0, 12.0), positive=False))
        gateway.mangle = None
        old = session.session_id
        server_prompts = [p.model_dump() for p in session.prompt_log().prompts]
        server_mask = session.fetch_result()
        assert len(server_prompts) == 2
        session.recover()  # a new server session from the prompts the server had, not the stale local ones
        assert session.session_id != old
        assert [p.model_dump() for p in session.local_prompts()] == server_prompts
        np.testing.assert_array_equal(session.fetch_result(), server_mask)
        _agrees_with_server(session)
        with pytest.raises(SessionNotFoundError):  # the session it replaced is closed, not left to expire
            client.session(old)


# ---- 2. ~/.netrc never replaces the token ----------------------------------------------------------------


def _resolves_to_loopback(host: str) -> bool:
    try:
        return socket.getaddrinfo(host, 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0] == "127.0.0.1"
    except OSError:
        return False


class _Recorder:
    """Answers every GET with 200 ``{}`` (or a redirect to ``location``), recording Authorization."""

    def __init__(self, location: Optional[str] = None) -> None:
        self.seen: List[Tuple[str, Optional[str]]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                recorder.seen.append((self.path, self.headers.get("Authorization")))
                if location is not None:
                    self.send_response(307)
                    self.send_header("Location", location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_netrc_entry_never_replaces_the_token_nor_follows_a_redirect(shared_server, tmp_path, monkeypatch):
    """For a server that is not a loopback literal the client trusts the environment (proxies); a
    ``default`` netrc entry must not turn its Bearer token into Basic credentials, nor be sent after
    a redirect to another host."""
    host = "127.1"  # 127.0.0.1 to the resolver, but not a loopback literal to the client
    if not _resolves_to_loopback(host):
        pytest.skip(f"{host} does not resolve to 127.0.0.1 here")
    netrc = tmp_path / "netrc"
    netrc.write_text("default login someone password netrc-secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    url = shared_server.url.replace("127.0.0.1", host)
    with SegAssistClient(url, TOKENS["alice"], allow_insecure_token=True) as client:
        assert client.http.session.trust_env  # the environment counts for this URL
        sent: List[Optional[str]] = []
        client.http.session.hooks["response"].append(
            lambda r, *a, **k: sent.append(r.request.headers.get("Authorization"))
        )
        assert client.info(refresh=True).user == "alice"
        assert client.health().status == "ok"
        assert sent == [f"Bearer {TOKENS['alice']}", None]  # health needs no token: none sent

    sink = _Recorder()
    redirector = _Recorder(location=f"http://localhost:{sink.port}/v1/info")  # another host
    try:
        http = HttpClient(f"http://{host}:{redirector.port}", TOKENS["alice"], allow_insecure_token=True)
        assert http.json("GET", "/v1/info") == {}
        assert redirector.seen == [("/v1/info", f"Bearer {TOKENS['alice']}")]
        assert sink.seen == [("/v1/info", None)]  # neither the token nor the netrc password
        http.close()
    finally:
        sink.close()
        redirector.close()


# ---- 3. ids stay in their place in the URL ----------------------------------------------------------------


def test_path_id_escapes_or_refuses():
    assert path_id("0123456789abcdef") == "0123456789abcdef"
    assert path_id("a?b#c d%2F") == "a%3Fb%23c%20d%252F"
    for bad in ("", ".", "..", "a/b", "../../info", "a\\b", "a\x00b", "a\nb"):
        with pytest.raises(ValueError, match="not a valid case id"):
            path_id(bad, "case id")
    with pytest.raises(TypeError):
        path_id(5)  # type: ignore[arg-type]


def test_hostile_ids_never_reach_another_endpoint(server_factory, tmp_path):
    server = server_factory.start(learn_store=tmp_path / "store")
    with SegAssistClient(server.url, TOKENS["alice"]) as client:
        paths: List[str] = []
        client.http.session.hooks["response"].append(
            lambda r, *a, **k: paths.append(f"{r.request.method} {r.request.path_url} {r.status_code}")
        )
        with client.open_session(make_volume()) as session:
            session.add_prompt(PointPrompt(position=(24.0, 20.0, 12.0)))
            voxels = int(session.fetch_result().sum())
            assert voxels > 0
            paths.clear()

            # a label save that would have been a POST to the session's reset
            with pytest.raises(ValueError, match="not a valid case id"):
                client.learning.submit(f"../../sessions/{session.session_id}/reset?", session)
            with pytest.raises(ValueError, match="not a valid session id"):
                client.session("../info")
            with pytest.raises(ValueError, match="not a valid job id"):
                client.learning.cancel("..")
            assert paths == []  # refused before anything was sent
            assert session.status().n_prompts == 1 and int(session.fetch_result().sum()) == voxels
            paths.clear()

            # anything else is escaped and answered by the endpoint it was meant for
            with pytest.raises(BadRequestError):
                client.image("a?b#c d")
            with pytest.raises(BadRequestError):
                client.learning.case("%2E%2E")
            sent = [p.rsplit(" ", 1)[0] for p in paths]
            assert sent == ["GET /v1/images/a%3Fb%23c%20d", "GET /v1/learn/cases/%252E%252E"]
            assert all(p.rsplit(" ", 1)[1] in ("400", "422") for p in paths), paths  # the id refused there

        # a status is one value of the query, never more parameters
        for seed in (1, 2):
            client.learning.import_image(make_volume(seed=seed), name=f"case_{seed}")
        assert len(client.learning.cases(status="new")) == 2
        assert len(client.learning.cases(status=["new", "in_progress"], limit=1)) == 1
        with pytest.raises(BadRequestError):
            client.learning.cases(status="new&limit=1")
